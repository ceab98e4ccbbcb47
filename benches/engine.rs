//! The engine with the SQLite store: a delta sync (delta import + plan + export) of 1,000
//! changed users at 10k and 100k objects, and a full sync (plan everything from the mirrors,
//! nothing to do) of 100k objects. In-memory source and target; the store is a SQLite file in
//! a temp dir with `Durability::Normal` (WAL, no fsync per transaction — a process crash loses
//! nothing; see `Durability`).
//!
//! `DIRSYNC_BENCH_MAX` (default 100000) caps the sizes.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use dirsync::connector::memory::{MemorySource, MemoryTarget};
use dirsync::engine::{EngineConfig, Synchronizer};
use dirsync::model::{values, AttributeChange};
use dirsync::rules::ruleset::RuleSet;
use dirsync::state::{Durability, SqliteStore};
use dirsync::testkit::{self, Fixture};

struct World {
    source: MemorySource,
    sync: Synchronizer,
    _dir: tempfile::TempDir,
    users: Vec<dirsync::model::Anchor>,
}

fn world(rt: &tokio::runtime::Runtime, n: usize) -> World {
    let dir = tempfile::tempdir().unwrap();
    let store =
        SqliteStore::open_with(dir.path().join("state.sqlite"), Durability::Normal).unwrap();
    let source = MemorySource::new("ad");
    let mut fx = Fixture::new(5);
    let mut users = Vec::with_capacity(n);
    for i in 0..n {
        let u = testkit::ad_user(i, &mut fx);
        users.push(u.anchor.clone());
        source.add(u).unwrap();
    }
    let rules =
        RuleSet::from_toml(include_str!("../examples/rules/ad-to-scim.toml"), None).unwrap();
    let target = MemoryTarget::new("scim");
    let config = EngineConfig {
        concurrency: 16,
        guard: dirsync::delta::DeletionGuard::off(),
        ..EngineConfig::default()
    };
    let mut sync = Synchronizer::new(
        Box::new(source.clone()),
        Box::new(target),
        Box::new(store),
        Arc::new(rules),
        config,
    );
    let r = rt.block_on(sync.run_cycle()).unwrap();
    assert!(r.failures.is_empty());
    World {
        source,
        sync,
        _dir: dir,
        users,
    }
}

fn bench(c: &mut Criterion) {
    let max: usize = std::env::var("DIRSYNC_BENCH_MAX")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("engine");
    g.sample_size(10);
    for n in [10_000usize, 100_000].into_iter().filter(|n| *n <= max) {
        let mut w = world(&rt, n);
        let mut round = 0u64;
        g.bench_with_input(
            BenchmarkId::new("delta_sync_1000_changes", n),
            &n,
            |b, _| {
                b.iter_batched(
                    || {
                        round += 1;
                        let step = w.users.len() / 1000;
                        for a in w.users.iter().step_by(step).take(1000) {
                            w.source
                                .modify(
                                    a,
                                    vec![AttributeChange::replace(
                                        "title",
                                        values([format!("Title {round}")]),
                                    )],
                                )
                                .unwrap();
                        }
                    },
                    |_| {
                        let r = rt.block_on(w.sync.run_cycle()).unwrap();
                        assert_eq!(r.count("update"), 1000, "{r}");
                    },
                    BatchSize::PerIteration,
                )
            },
        );
        if n == max.min(100_000) {
            g.bench_with_input(BenchmarkId::new("full_sync_no_changes", n), &n, |b, _| {
                b.iter(|| {
                    let r = rt.block_on(w.sync.full_sync()).unwrap();
                    assert_eq!(r.total_done(), 0);
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
