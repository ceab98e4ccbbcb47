//! `journal_bench`: what the export's state-store writes cost in [`SqliteStore`] (default
//! durability, a file on disk) and what they leave in the file — the store alone, no engine.
//!
//! Per phase, like an initial load: creates of users with twenty attributes (one target object
//! each), then one reference update per user (`manager`), every operation journaled intended
//! and then done:
//!
//! * `single`: one call (one commit) per intent and per outcome, as the engine did before group
//!   commit — `--single N` users (default 10,000: at a few milliseconds per commit, 100,000
//!   would take minutes);
//! * `batched`: [`StateStore::journal_intents`] and [`StateStore::journal_outcomes`] over
//!   batches of `--batch B` operations (default 1,000), `--users N` users (default 100,000),
//!   with the lookup attributes declared as the example rules' join groups would
//!   (`userName`, `externalId`).
//!
//! It prints seconds, operations per second, and the state file's bytes per table and index
//! (SQLite's `dbstat`), per object.
//!
//! `--export N` instead replays the state writes of an initial export of `N` user creates as the
//! engine makes them (anchors scattered over the key space, pages of 10,000, rounds of eight
//! batches of 1,000 committed with [`StateStore::journal_commit`], the dirty set cleared per
//! page) and prints the time and the writing thread's CPU time per operation.
//!
//! `--migrate FILE` instead opens an existing state file (migrating it to this version, in
//! place: work on a copy) and prints how long that took and the sizes before and after.
//!
//! ```text
//! cargo run --release --example journal_bench -- --users 100000 --single 10000
//! cargo run --release --example journal_bench -- --export 1000000
//! cargo run --release --example journal_bench -- --migrate /tmp/copy-of-state.sqlite
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

use dirsync::connector::TargetOperation;
use dirsync::delta::{Operation, OperationKind, Reason, TargetRef};
use dirsync::model::{AttrName, AttributeChange, Attributes, ObjectType, TargetId, Value, Values};
use dirsync::state::{JournalOutcome, SqliteStore, StateStore};

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let mut users = 100_000usize;
    let mut single = 10_000usize;
    let mut batch = 1_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num =
            || -> Result<usize, Error> { Ok(args.next().ok_or("a number must follow")?.parse()?) };
        match a.as_str() {
            "--users" => users = num()?,
            "--single" => single = num()?,
            "--batch" => batch = num()?.max(1),
            "--export" => {
                let n = num()?;
                let dir = tempfile::tempdir()?;
                return export(&dir.path().join("export.db"), n);
            }
            "--migrate" => {
                let path = args.next().ok_or("a state file must follow --migrate")?;
                return migrate(Path::new(&path));
            }
            _ => {
                return Err(format!(
                    "unknown argument {a}: use --users N --single N --batch B, \
                     --export N or --migrate FILE"
                )
                .into())
            }
        }
    }
    let dir = tempfile::tempdir()?;
    if single > 0 {
        phase(&dir.path().join("single.db"), "single", single, None)?;
    }
    phase(
        &dir.path().join("batched.db"),
        "batched",
        users,
        Some(batch),
    )?;
    Ok(())
}

fn migrate(path: &Path) -> Result<(), Error> {
    let objects = {
        let conn = rusqlite::Connection::open(path)?;
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM links", [], |r| r.get(0))?;
        n.max(1) as usize
    };
    println!("before ({objects} linked objects):");
    sizes(path, objects, |_| true)?;
    let t0 = Instant::now();
    let store = SqliteStore::open(path)?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "migrated to schema version {} in {secs:.2} s; after:",
        store.schema_version()?
    );
    drop(store);
    sizes(path, objects, |_| true)
}

/// Prints the bytes per table and index of the state file (those `show` accepts).
fn sizes(path: &Path, objects: usize, show: impl Fn(&str) -> bool) -> Result<(), Error> {
    let conn = rusqlite::Connection::open(path)?;
    let mut stmt = conn
        .prepare("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY SUM(pgsize) DESC")?;
    let sizes: Vec<(String, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let file = std::fs::metadata(path)?.len();
    println!(
        "  {:<28} {:>10.1} MB {:>8.0} B/object",
        "(file)",
        file as f64 / 1e6,
        file as f64 / objects as f64
    );
    for (table, bytes) in sizes.iter().filter(|(t, _)| show(t)) {
        println!(
            "  {table:<28} {:>10.1} MB {:>8.0} B/object",
            *bytes as f64 / 1e6,
            *bytes as f64 / objects as f64
        );
    }
    Ok(())
}

/// The create of user `i` and the target operation it becomes.
fn create(i: usize) -> (Operation, TargetOperation) {
    let mut attributes = Attributes::new();
    let s = |v: String| Values::from(vec![Value::string(v)]);
    attributes.set("userName", s(format!("user{i}@corp.example.com")));
    attributes.set("externalId", s(format!("{i:08x}-5c1e-4d2a-9f00-{i:012x}")));
    attributes.set("displayName", s(format!("Given{i} Surname{i}")));
    attributes.set("active", Values::from(vec![Value::Boolean(true)]));
    for (k, name) in [
        "name.givenName",
        "name.familyName",
        "title",
        "department",
        "emails[type eq \"work\"].value",
        "phoneNumbers[type eq \"work\"].value",
        "addresses[type eq \"work\"].locality",
        "addresses[type eq \"work\"].country",
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber",
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:costCenter",
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:organization",
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:division",
        "preferredLanguage",
        "locale",
        "timezone",
        "nickName",
    ]
    .iter()
    .enumerate()
    {
        attributes.set(*name, s(format!("value {k} of user {i}")));
    }
    let op = Operation {
        anchor: format!("{i:08x}-aaaa-4bbb-8ccc-{i:012x}").into(),
        source_type: "user".into(),
        target_type: "User".into(),
        kind: OperationKind::Create {
            attributes: attributes.clone(),
            secrets: Attributes::new(),
            lookup: Vec::new(),
        },
        reason: Reason::EnteredScope,
    };
    let sent = TargetOperation::Create {
        object_type: "User".into(),
        attributes,
    };
    (op, sent)
}

/// A GUID-like anchor for user `i`, scattered over the key space as a directory's are.
fn scattered_anchor(i: usize) -> String {
    let mut x = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    format!("{:08x}-{:04x}-4bbb-8ccc-{i:012x}", x >> 32, x & 0xffff)
}

/// This thread's CPU time (user + system) in seconds, where `/proc` tells it.
fn thread_cpu() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/thread-self/stat") else {
        return 0.0;
    };
    let Some(rest) = stat.rsplit(')').next() else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f
        .get(11..13)
        .map(|t| t.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    ticks / 100.0
}

/// `--export N`: the state writes of an initial export of `n` user creates as the engine
/// makes them (`export.rs`, `writer.rs`): anchors scattered over the key space and dirty at
/// the start; pages of 10,000 anchors in anchor order; per page, rounds of 8 batches of
/// 1,000 — each round's intents committed together with the outcomes of the round before
/// ([`StateStore::journal_commit`]), the last outcomes alone, then the page's anchors
/// cleared from the dirty set.
fn export(path: &Path, n: usize) -> Result<(), Error> {
    const PAGE: usize = 10_000;
    const ROUND: usize = 8_000;
    let mut store = SqliteStore::open(path)?;
    declare_lookups(&mut store)?;
    let mut anchors: Vec<(String, usize)> = (0..n).map(|i| (scattered_anchor(i), i)).collect();
    anchors.sort();
    for chunk in anchors.chunks(50_000) {
        let dirty: Vec<dirsync::model::Anchor> =
            chunk.iter().map(|(a, _)| a.as_str().into()).collect();
        store.mark_dirty(&dirty)?;
    }
    let run = store.begin_run("bench", chrono::Utc::now())?;
    let (t0, c0) = (Instant::now(), thread_cpu());
    let mut next_id = 0usize;
    for page in anchors.chunks(PAGE) {
        let mut prev: Vec<(
            Operation,
            TargetOperation,
            TargetId,
            dirsync::state::JournalId,
        )> = Vec::new();
        for round in page.chunks(ROUND) {
            let ops: Vec<(Operation, TargetOperation)> = round
                .iter()
                .map(|(a, i)| {
                    let (mut o, s) = create(*i);
                    o.anchor = a.as_str().into();
                    (o, s)
                })
                .collect();
            let intents: Vec<_> = ops.iter().map(|(o, s)| (o, Some(s))).collect();
            let outcomes = done(&prev);
            let ids = store.journal_commit(run, &outcomes, &intents)?;
            drop(outcomes);
            prev = ops
                .into_iter()
                .zip(ids)
                .map(|((o, s), id)| {
                    next_id += 1;
                    (o, s, TargetId::new(format!("n{next_id}")), id)
                })
                .collect();
        }
        let outcomes = done(&prev);
        store.journal_outcomes(&outcomes)?;
        let clean: Vec<dirsync::model::Anchor> =
            page.iter().map(|(a, _)| a.as_str().into()).collect();
        store.clear_dirty(&clean)?;
    }
    let (secs, cpu) = (t0.elapsed().as_secs_f64(), thread_cpu() - c0);
    store.finish_run(run, chrono::Utc::now(), "ok", "{}")?;
    drop(store);
    println!(
        "export: {n} creates in {secs:.2} s ({cpu:.2} s of CPU) = {:.1} us per operation ({:.1} us of CPU)",
        secs * 1e6 / n as f64,
        cpu * 1e6 / n as f64
    );
    sizes(path, n, |t| {
        t.starts_with("journal") || t.starts_with("target_") || t.starts_with("links")
    })
}

/// An operation journaled and sent: planned, as sent, the target id it got, its journal row.
type Sent = (
    Operation,
    TargetOperation,
    TargetId,
    dirsync::state::JournalId,
);

/// The outcomes of `sent`: all done.
fn done(sent: &[Sent]) -> Vec<JournalOutcome<'_>> {
    sent.iter()
        .map(|(o, s, tid, id)| JournalOutcome::Done {
            id: *id,
            op: o,
            sent: Some(s),
            target_id: Some(tid),
        })
        .collect()
}

/// Declares the lookup attributes the example rules' join groups would (`userName`,
/// `externalId`), so the store indexes those target values only.
fn declare_lookups(store: &mut SqliteStore) -> Result<(), Error> {
    let lookups: BTreeMap<ObjectType, BTreeSet<AttrName>> = [(
        "User".into(),
        ["userName".into(), "externalId".into()]
            .into_iter()
            .collect(),
    )]
    .into_iter()
    .collect();
    store.set_lookup_attributes(&lookups)?;
    Ok(())
}

/// The target id the create of user `i` gets.
fn target_id(i: usize) -> TargetId {
    format!("{i:08x}-7777-4eee-9fff-{i:012x}").into()
}

/// The reference update of user `i` (its manager).
fn manager(i: usize) -> (Operation, TargetOperation) {
    let changes = vec![AttributeChange::replace(
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager",
        Values::from(vec![Value::string(target_id(i / 10).to_string())]),
    )];
    let op = Operation {
        anchor: format!("{i:08x}-aaaa-4bbb-8ccc-{i:012x}").into(),
        source_type: "user".into(),
        target_type: "User".into(),
        kind: OperationKind::UpdateReferences {
            target: TargetRef::Existing(target_id(i)),
            changes: changes.clone(),
        },
        reason: Reason::AttributesChanged {
            attributes: vec![
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager".into(),
            ],
        },
    };
    let sent = TargetOperation::Update {
        id: target_id(i),
        object_type: "User".into(),
        changes,
    };
    (op, sent)
}

fn phase(path: &Path, name: &str, n: usize, batch: Option<usize>) -> Result<(), Error> {
    let mut store = SqliteStore::open(path)?;
    if batch.is_some() {
        declare_lookups(&mut store)?;
    }
    let run = store.begin_run("bench", chrono::Utc::now())?;
    let t0 = Instant::now();
    for make in [create as fn(usize) -> _, manager] {
        let ops: Vec<(Operation, TargetOperation, Option<TargetId>)> = (0..n)
            .map(|i| {
                let (o, s) = make(i);
                let id = matches!(o.kind, OperationKind::Create { .. }).then(|| target_id(i));
                (o, s, id)
            })
            .collect();
        match batch {
            None => {
                for (o, s, id) in &ops {
                    let j = store.journal_intent(run, o, Some(s))?;
                    store.journal_done(j, o, Some(s), id.as_ref())?;
                }
            }
            Some(b) => {
                for chunk in ops.chunks(b) {
                    let intents: Vec<_> = chunk.iter().map(|(o, s, _)| (o, Some(s))).collect();
                    let ids = store.journal_intents(run, &intents)?;
                    let outcomes: Vec<JournalOutcome<'_>> = chunk
                        .iter()
                        .zip(ids)
                        .map(|((o, s, tid), id)| JournalOutcome::Done {
                            id,
                            op: o,
                            sent: Some(s),
                            target_id: tid.as_ref(),
                        })
                        .collect();
                    store.journal_outcomes(&outcomes)?;
                }
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    store.finish_run(run, chrono::Utc::now(), "ok", "{}")?;
    drop(store);
    let ops = 2 * n;
    println!(
        "{name}: {n} users, {ops} operations in {secs:.2} s = {:.0} operations/s{}",
        ops as f64 / secs,
        batch
            .map(|b| format!(" (batches of {b})"))
            .unwrap_or_default()
    );
    sizes(path, n, |t| {
        t.starts_with("journal") || t.starts_with("target_") || t.starts_with("runs")
    })
}
