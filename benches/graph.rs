//! Export throughput against the Graph emulator enforcing Graph's documented identity write
//! limit (3,000 writes per 150 s per app and tenant = 20 writes/s; enforced here over a 10 s
//! sliding window, 200 writes, so that a short run meets it). dirsync paces its writes at its
//! default 19/s; the figure is the sustained write rate as a share of the limit, and the
//! retries beyond those the emulator's 429s caused.
//!
//! `cargo bench --features graph --bench graph` (`DIRSYNC_BENCH_USERS` sets the user count).

#![allow(clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use dirsync::connector::graph::emulator::GraphEmulator;
use dirsync::connector::graph::GraphTarget;
use dirsync::connector::memory::MemorySource;
use dirsync::engine::{EngineConfig, Synchronizer};
use dirsync::model::{Entry, Value};
use dirsync::rules::ruleset::RuleSet;
use dirsync::state::MemoryStore;

const LIMIT_PER_SECOND: f64 = 3000.0 / 150.0;

fn main() {
    let users: usize = std::env::var("DIRSYNC_BENCH_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(users));
}

async fn run(users: usize) {
    let emu = GraphEmulator::start().await.expect("emulator");
    emu.set_write_limit(Some((200, Duration::from_secs(10))));
    let mut cfg = emu.config("bench", "s3cret");
    cfg.writes_per_second = 19.0;
    let target = GraphTarget::new("entra", cfg).expect("target");
    let source = MemorySource::new("ad");
    for n in 0..users {
        source
            .add(
                Entry::new(format!("u{n}"), "user")
                    .with("objectGUID", format!("00000000-0000-4000-8000-{n:012}"))
                    .with("userPrincipalName", format!("user{n}@contoso.com"))
                    .with("sAMAccountName", format!("user{n}"))
                    .with("givenName", "Bench")
                    .with("sn", format!("User{n}"))
                    .with("userAccountControl", Value::Integer(512)),
            )
            .expect("add");
    }
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/rules/ad-to-entra.toml"
    );
    let rules = RuleSet::from_toml(&std::fs::read_to_string(path).expect("rules"), Some(path))
        .expect("rules load");
    let mut sync = Synchronizer::new(
        Box::new(source),
        Box::new(target.clone()),
        Box::new(MemoryStore::new()),
        Arc::new(rules),
        EngineConfig {
            concurrency: 32,
            ..EngineConfig::default()
        },
    );
    let t0 = Instant::now();
    let report = sync.run_cycle().await.expect("run");
    let elapsed = t0.elapsed().as_secs_f64();
    let e = emu.stats();
    let c = target.stats();
    let rate = e.writes as f64 / elapsed;
    println!(
        "graph export: {users} users, {} failures",
        report.failures.len()
    );
    println!(
        "  writes accepted {} in {elapsed:.2} s = {rate:.2}/s; limit {LIMIT_PER_SECOND:.0}/s; sustained {:.1} % of the limit",
        e.writes,
        100.0 * rate / LIMIT_PER_SECOND
    );
    println!(
        "  emulator 429s: write limit {}, injected {}; connector retries {} (not caused by a 429: {}), engine retries {}",
        e.throttled_limit, e.throttled_injected, c.retries, c.retries_not_throttled, report.retries
    );
}
