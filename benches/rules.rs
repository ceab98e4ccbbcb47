//! Evaluating the example rule set (`examples/rules/ad-to-scim.toml`: Join, Coalesce, ToLower,
//! Replace with a regex, IIF, BitAnd, Switch, FormatDateTime, Split/Item, a scoping filter)
//! over 100k generated AD users, on one thread. Throughput is reported in objects per second.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dirsync::delta::{Projected, Projection, ProjectionContext, SourceMirror, TargetMirror};
use dirsync::rules::ruleset::RuleSet;
use dirsync::testkit::{self, Fixture};

fn bench(c: &mut Criterion) {
    let rules = RuleSet::from_toml(include_str!("../examples/rules/ad-to-scim.toml"), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut fx = Fixture::new(11);
    let users: Vec<_> = (0..100_000).map(|i| testkit::ad_user(i, &mut fx)).collect();
    let (mirror, target) = (SourceMirror::new(), TargetMirror::new());
    let ctx = ProjectionContext::new(chrono::DateTime::UNIX_EPOCH, 1, &mirror, &target);
    let mut g = c.benchmark_group("rules");
    g.sample_size(10);
    g.throughput(Throughput::Elements(users.len() as u64));
    g.bench_function("ad_to_scim_100k_users", |b| {
        b.iter(|| {
            let mut in_scope = 0usize;
            for u in &users {
                if let Projected::InScope(d) = rules.project(u, &ctx) {
                    in_scope += d.flows.len();
                }
            }
            assert!(in_scope > 0);
            in_scope
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
