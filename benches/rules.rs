//! Evaluating the example rule set (`examples/rules/ad-to-scim.toml`: Join, Coalesce, ToLower,
//! Replace with a regex, IIF, BitAnd, Switch, FormatDateTime, Split/Item, a scoping filter)
//! over 100k generated AD users, on one thread. Throughput is reported in objects per second.
//!
//! Also a full plan of those users, converged (linked, the target holding what the rules
//! want, managers resolving to linked users): with the rule set's `unchanged` fast path, and
//! with it turned off (every object projected, then compared).
//!
//! Environment:
//! - `DIRSYNC_BENCH_USERS`: how many users to generate (default 100000).
//! - `DIRSYNC_BENCH_ONCE`: when set, project every user once through [`project_all`] and exit
//!   without running criterion — for instruction counts, e.g.
//!   `DIRSYNC_BENCH_USERS=5000 DIRSYNC_BENCH_ONCE=1 valgrind --tool=callgrind
//!   --toggle-collect='rules::project_all' target/release/deps/rules-<hash> --bench`.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dirsync::delta::{
    self, Links, PlanInput, Projected, Projection, ProjectionContext, SourceMirror, TargetMirror,
};
use dirsync::model::Entry;
use dirsync::rules::ruleset::RuleSet;
use dirsync::testkit::{self, Fixture};

/// Projects every user once; returns the number of flows of the in-scope ones.
#[inline(never)]
fn project_all(rules: &RuleSet, users: &[Entry], ctx: &ProjectionContext<'_>) -> usize {
    let mut flows = 0usize;
    for u in users {
        if let Projected::InScope(d) = rules.project(u, ctx) {
            flows += d.flows.len();
        }
    }
    flows
}

fn bench(c: &mut Criterion) {
    let rules = RuleSet::from_toml(include_str!("../examples/rules/ad-to-scim.toml"), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let count: usize = std::env::var("DIRSYNC_BENCH_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mut fx = Fixture::new(11);
    let users: Vec<_> = (0..count).map(|i| testkit::ad_user(i, &mut fx)).collect();
    let (mirror, target) = (SourceMirror::new(), TargetMirror::new());
    let ctx = ProjectionContext::new(chrono::DateTime::UNIX_EPOCH, 1, &mirror, &target);
    if std::env::var_os("DIRSYNC_BENCH_ONCE").is_some() {
        let flows = project_all(&rules, &users, &ctx);
        assert!(flows > 0);
        println!("projected {count} users: {flows} flows");
        return;
    }
    let mut g = c.benchmark_group("rules");
    g.sample_size(10);
    g.throughput(Throughput::Elements(count as u64));
    g.bench_function("ad_to_scim_100k_users", |b| {
        b.iter(|| {
            let flows = project_all(&rules, &users, &ctx);
            assert!(flows > 0);
            flows
        })
    });
    g.finish();

    // A converged system: every user's manager is another user.
    drop(users);
    let mut mirror = SourceMirror::new();
    for u in testkit::ad_users_managed(count, 10, &mut Fixture::new(11)) {
        mirror.insert(u);
    }
    let (mut links, mut target) = (Links::new(), TargetMirror::new());
    testkit::converge(&rules, &mirror, &mut links, &mut target, 4)
        .unwrap_or_else(|plan| panic!("{plan}"));
    let mut g = c.benchmark_group("plan");
    g.sample_size(10);
    g.throughput(Throughput::Elements(count as u64));
    let projecting = testkit::Projecting(&rules);
    for (name, projection) in [
        ("full_plan_converged_fast_path", &rules as &dyn Projection),
        ("full_plan_converged_projecting", &projecting),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let plan = delta::plan(&PlanInput::new(projection, &mirror, &links, &target));
                assert!(plan.operations.is_empty());
                plan.stats.unchanged
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
