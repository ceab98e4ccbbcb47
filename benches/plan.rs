//! Planner benchmarks: full plans with no changes and with 1 % changes at 10k / 100k / 1M
//! objects, a delta plan of 1,000 changed anchors in a 10k and a 1M store, and the plan of an
//! initial load (every object created, managers and members first) at 10k / 100k objects.
//!
//! Users have 20 attributes; there is one group of 50 members per 100 users. In the initial
//! load, user `i` reports to user `i / 10`.
//! `DIRSYNC_BENCH_MAX` (default 1000000) caps the sizes, for quick runs.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dirsync::delta::{self, Links, PlanInput, PlanScope, SourceMirror, TargetMirror};
use dirsync::model::{Anchor, Value};
use dirsync::testkit::{self, UserGroupProjection};

struct Store {
    mirror: SourceMirror,
    links: Links,
    target: TargetMirror,
}

/// A directory of `n` objects, planned and applied to the mirrors (as a converged system).
fn converged(n: usize) -> Store {
    let users = n - n / 100;
    let groups = n / 100;
    let mut mirror = SourceMirror::new();
    for e in testkit::directory(users, 20, groups, 50, 42) {
        mirror.insert(e);
    }
    let mut links = Links::new();
    let mut target = TargetMirror::new();
    let projection = UserGroupProjection {
        excluded_departments: vec![],
        ..Default::default()
    };
    let plan = delta::plan(&PlanInput::new(&projection, &mirror, &links, &target));
    testkit::apply_accepted(&plan, &mut links, &mut target);
    Store {
        mirror,
        links,
        target,
    }
}

/// Renames every `step`-th user; returns the changed anchors.
fn edit(store: &mut Store, count: usize) -> Vec<Anchor> {
    let users: Vec<Anchor> = {
        let mut a: Vec<Anchor> = store
            .mirror
            .entries()
            .filter(|e| e.object_type.is("user"))
            .map(|e| e.anchor.clone())
            .collect();
        a.sort();
        a
    };
    let step = (users.len() / count.max(1)).max(1);
    let changed: Vec<Anchor> = users.into_iter().step_by(step).take(count).collect();
    for a in &changed {
        if let Some(mut e) = store.mirror.get(a).cloned() {
            e.attributes.set("title", Value::string("Changed title"));
            store.mirror.insert(e);
        }
    }
    changed
}

fn bench(c: &mut Criterion) {
    let max: usize = std::env::var("DIRSYNC_BENCH_MAX")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let projection = UserGroupProjection {
        excluded_departments: vec![],
        ..Default::default()
    };
    let mut full = c.benchmark_group("plan_full");
    full.sample_size(10);
    for n in [10_000usize, 100_000, 1_000_000]
        .into_iter()
        .filter(|n| *n <= max)
    {
        let mut store = converged(n);
        full.bench_with_input(BenchmarkId::new("no_changes", n), &n, |b, _| {
            b.iter(|| {
                let plan = delta::plan(&PlanInput::new(
                    &projection,
                    &store.mirror,
                    &store.links,
                    &store.target,
                ));
                assert!(plan.is_empty());
                plan
            })
        });
        let changed = edit(&mut store, n / 100);
        full.bench_with_input(BenchmarkId::new("one_percent_changed", n), &n, |b, _| {
            b.iter(|| {
                let plan = delta::plan(&PlanInput::new(
                    &projection,
                    &store.mirror,
                    &store.links,
                    &store.target,
                ));
                assert_eq!(plan.operations.len(), changed.len());
                plan
            })
        });
    }
    full.finish();

    let mut initial = c.benchmark_group("plan_initial");
    initial.sample_size(10);
    for n in [10_000usize, 100_000].into_iter().filter(|n| *n <= max) {
        let mut mirror = SourceMirror::new();
        for (i, mut e) in testkit::directory(n - n / 100, 20, n / 100, 50, 42)
            .into_iter()
            .enumerate()
        {
            if e.object_type.is("user") && i > 0 {
                e.attributes
                    .set("manager", Value::dn_ref(testkit::user_dn(i / 10)));
            }
            mirror.insert(e);
        }
        let (links, target) = (Links::new(), TargetMirror::new());
        initial.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let plan = delta::plan(&PlanInput::new(&projection, &mirror, &links, &target));
                // Every reference is known at create time (user 0 manages nobody).
                assert_eq!(plan.operations.len(), n);
                plan
            })
        });
    }
    initial.finish();

    let mut dg = c.benchmark_group("plan_delta_1000");
    dg.sample_size(20);
    for n in [10_000usize, 1_000_000].into_iter().filter(|n| *n <= max) {
        let mut store = converged(n);
        let changed = edit(&mut store, 1000);
        dg.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let mut input =
                    PlanInput::new(&projection, &store.mirror, &store.links, &store.target);
                input.scope = PlanScope::Anchors(changed.clone());
                let plan = delta::plan(&input);
                assert_eq!(plan.operations.len(), 1000);
                plan
            })
        });
    }
    dg.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
