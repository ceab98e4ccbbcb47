//! `scale`: the scale benchmark (issue 15). Generates a deterministic Active Directory export of
//! N users ([`dirsync::testkit::scale`]), then times, one after the other in one process:
//!
//! * `floor`: [`LdifSource::full_import`] of the export, streamed and counted, nothing kept — what
//!   reading the source costs at best; every other phase is also given as a ratio to it;
//! * `initial`: [`Synchronizer::run_cycle`] into a new [`SqliteStore::open`] state (default
//!   durability, `Durability::Full`) with the rules `examples/rules/ad-to-scim.toml`, into a
//!   target that keeps nothing ([`NullTarget`] below: batches of 1,000, every reference in a
//!   create, not readable so creates are not looked up; `--lookups` makes it readable, finding
//!   nothing);
//! * `noop`: `run_cycle` again on the unchanged export;
//! * `full_sync`: [`Synchronizer::full_sync`] with nothing to do;
//! * `edit`: the export rewritten after 1 % edits (changes, deletes, adds:
//!   [`ScaleExport::write_edited`]), then `run_cycle`.
//!
//! Per phase it prints seconds, the ratio to the floor, the operations the run did, operations
//! per second, the phase's peak RSS (the high-water mark is reset before each phase through
//! `/proc/self/clear_refs`; where that is refused, the process's peak so far is shown, marked
//! `*`), the state file's size (file + `-wal`) in all and per object, and the time per stage of
//! the run. At the end, the state file's size per table and index (SQLite's `dbstat`).
//!
//! ```text
//! cargo run --release --example scale -- --users 100000
//! cargo run --release --example scale -- --users 1000000 --dir /var/tmp/scale --json
//! scripts/scale.sh 100000 1000000      # both sizes, one table each
//! ```
//!
//! Options: `--users N` (default 100000), `--dir D` (keep the export and the state there; by
//! default a temporary directory removed at the end), `--phases floor,initial,noop,full_sync,edit`
//! (a subset, run in this order; without `initial` the state already in `--dir` is used),
//! `--seed S`, `--edit-seed S`, `--lookups`, `--create-references all|none|graph` (which references
//! the target takes in a create: `none` writes every reference after its create, as the issue's
//! first measurement did; `graph` as Microsoft Graph: a group's members only), `--durability
//! full|normal` (`normal`: no fsync per commit, for quick set-ups and profiles, not for figures
//! of the default), `--progress` (the engine's progress events on
//! stderr), `--json` (also print each phase as a JSON line, prefixed `{"phase"`), `--label L`
//! (added to every JSON line, e.g. a commit).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dirsync::connector::ldif::{default_binary_attributes, LdifSource, LdifSourceConfig};
use dirsync::connector::{
    Applied, ConnectorError, ImportItem, Source, Target, TargetCapabilities, TargetOperation,
};
use dirsync::delta::CreateReferences;
use dirsync::engine::{EngineConfig, RunReport, Synchronizer};
use dirsync::model::{AttrName, ObjectType, TargetId, TargetObject, Value};
use dirsync::rules::ruleset::RuleSet;
use dirsync::state::{Durability, SqliteStore};
use dirsync::testkit::scale::{Edits, ScaleExport, Written};
use futures::stream::{self, BoxStream};
use futures::StreamExt;

const USAGE: &str =
    "usage: scale [--users N] [--dir D] [--phases floor,initial,noop,full_sync,edit] \
[--seed S] [--edit-seed S] [--lookups] [--create-references all|none|graph] [--durability full|normal] \
[--progress] [--json] [--label L]";

const PHASES: [&str; 5] = ["floor", "initial", "noop", "full_sync", "edit"];

/// The parsed command line.
struct Args {
    users: usize,
    dir: Option<PathBuf>,
    phases: Vec<&'static str>,
    seed: u64,
    edit_seed: u64,
    lookups: bool,
    create_references: CreateReferences,
    durability: Durability,
    progress: bool,
    json: bool,
    label: Option<String>,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        users: 100_000,
        dir: None,
        phases: PHASES.to_vec(),
        seed: 1,
        edit_seed: 2,
        lookups: false,
        create_references: CreateReferences::All,
        durability: Durability::Full,
        progress: false,
        json: false,
        label: None,
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| {
            v.replace('_', "")
                .parse::<u64>()
                .map_err(|e| format!("{flag} {v}: {e}"))
        };
        match flag.as_str() {
            "--users" => a.users = number(value()?)? as usize,
            "--seed" => a.seed = number(value()?)?,
            "--edit-seed" => a.edit_seed = number(value()?)?,
            "--dir" => a.dir = Some(PathBuf::from(value()?)),
            "--label" => a.label = Some(value()?),
            "--phases" => {
                let v = value()?;
                let mut wanted = Vec::new();
                for p in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let known = PHASES
                        .iter()
                        .find(|k| **k == p)
                        .ok_or_else(|| format!("unknown phase {p:?} (known: {PHASES:?})"))?;
                    wanted.push(*known);
                }
                a.phases = PHASES
                    .iter()
                    .copied()
                    .filter(|p| wanted.contains(p))
                    .collect();
            }
            "--lookups" => a.lookups = true,
            "--durability" => {
                a.durability = match value()?.as_str() {
                    "full" => Durability::Full,
                    "normal" => Durability::Normal,
                    v => return Err(format!("--durability {v}: full or normal")),
                }
            }
            "--create-references" => {
                a.create_references = match value()?.as_str() {
                    "all" => CreateReferences::All,
                    "none" => CreateReferences::None,
                    // Microsoft Graph's: a group's members only.
                    "graph" => CreateReferences::Only(vec![("Group".into(), "members".into())]),
                    v => return Err(format!("--create-references {v}: all, none or graph")),
                }
            }
            "--progress" => a.progress = true,
            "--json" => a.json = true,
            "--help" | "-h" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(a)
}

/// A target that keeps nothing: it counts what it is sent and gives every created object a new
/// id. Batches of up to 1,000 operations; every reference may travel in a create. Not
/// readable unless `read` (then every read and lookup finds nothing).
struct NullTarget {
    read: bool,
    create_references: CreateReferences,
    counts: Arc<Counts>,
}

/// What a [`NullTarget`] was sent.
#[derive(Default)]
struct Counts {
    calls: AtomicU64,
    operations: AtomicU64,
    next_id: AtomicU64,
    /// This process's prefix of new ids (the low six base-36 digits of its start time in
    /// milliseconds, which come round every 25 days): the new ids of two runs do not meet.
    prefix: String,
}

#[async_trait]
impl Target for NullTarget {
    fn name(&self) -> &str {
        "null"
    }

    fn capabilities(&self) -> TargetCapabilities {
        let mut c = TargetCapabilities::default();
        c.max_batch = 1000;
        c.lookup_batch = 1000;
        c.read = self.read;
        c.value_level_changes = true;
        c.create_references = self.create_references.clone();
        c
    }

    async fn read(
        &self,
        _object_type: &ObjectType,
    ) -> Result<BoxStream<'_, Result<TargetObject, ConnectorError>>, ConnectorError> {
        Ok(stream::empty().boxed())
    }

    async fn get(
        &self,
        _object_type: &ObjectType,
        _id: &TargetId,
    ) -> Result<Option<TargetObject>, ConnectorError> {
        Ok(None)
    }

    async fn find(
        &self,
        _object_type: &ObjectType,
        _attribute: &AttrName,
        _value: &Value,
    ) -> Result<Vec<TargetObject>, ConnectorError> {
        Ok(Vec::new())
    }

    async fn find_any(
        &self,
        _object_type: &ObjectType,
        _attribute: &AttrName,
        _values: &[Value],
    ) -> Result<Vec<TargetObject>, ConnectorError> {
        Ok(Vec::new())
    }

    async fn apply(&self, operations: &[TargetOperation]) -> Vec<Result<Applied, ConnectorError>> {
        let c = &self.counts;
        c.calls.fetch_add(1, Ordering::Relaxed);
        c.operations
            .fetch_add(operations.len() as u64, Ordering::Relaxed);
        operations
            .iter()
            .map(|op| {
                let id = match op.id() {
                    Some(id) => id.clone(),
                    None => {
                        // As short as `MemoryTarget`'s (the issue's measure), and unique
                        // across the runs on one state: each process has its own prefix.
                        let n = c.next_id.fetch_add(1, Ordering::Relaxed);
                        TargetId::new(format!("{}{n:06}", c.prefix))
                    }
                };
                Ok(Applied { id })
            })
            .collect()
    }
}

/// The source configuration of `examples/config/ldif-to-ldif.toml`: `objectGUID` (GUID text)
/// anchors and, not binary here, reaches the rules as text (`externalId`, a join attribute the
/// state indexes; as bytes it would not be, and every join lookup would scan the target mirror);
/// users and groups mapped, OUs skipped.
fn source_config() -> LdifSourceConfig {
    LdifSourceConfig {
        anchor_attribute: AttrName::new("objectGUID"),
        binary_attributes: default_binary_attributes()
            .into_iter()
            .filter(|a| !a.is("objectGUID"))
            .collect(),
        ..LdifSourceConfig::default()
    }
}

/// Resets the peak RSS; false where the kernel refuses.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The peak RSS (`VmHWM`) in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The state's size: the file and its write-ahead log.
fn state_size(path: &Path) -> u64 {
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    [path, wal.as_path()]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// The state file's size per table and index (SQLite's `dbstat`, compiled into rusqlite's
/// bundled SQLite), largest first.
fn table_sizes(path: &Path) -> Result<Vec<(String, String, u64)>, rusqlite::Error> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut q = conn.prepare(
        "SELECT d.name, coalesce(m.tbl_name, d.name), sum(d.pgsize) FROM dbstat d \
         LEFT JOIN sqlite_schema m ON m.name = d.name GROUP BY d.name ORDER BY 3 DESC",
    )?;
    let rows = q.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
    })?;
    rows.collect()
}

/// One phase's figures.
struct Row {
    phase: &'static str,
    seconds: f64,
    operations: u64,
    peak: Option<u64>,
    peak_is_phase: bool,
    state: Option<u64>,
    objects: usize,
    stages: Vec<(String, f64)>,
    detail: String,
}

fn mb(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GB", b as f64 / f64::from(1u32 << 30))
    } else {
        format!("{:.1} MB", b as f64 / f64::from(1u32 << 20))
    }
}

/// Stage times of a run, summed per stage in the order they first ran, and the rest.
fn stages(r: &RunReport, total: Duration) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = Vec::new();
    for (stage, d) in &r.stages {
        let name = format!("{stage:?}").to_lowercase();
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, s)) => *s += d.as_secs_f64(),
            None => out.push((name, d.as_secs_f64())),
        }
    }
    let known: f64 = out.iter().map(|(_, s)| s).sum();
    out.push(("other".into(), (total.as_secs_f64() - known).max(0.0)));
    out
}

fn json_line(args: &Args, row: &Row, floor: Option<f64>) -> String {
    let rate = |n: u64| (row.seconds > 0.0).then(|| n as f64 / row.seconds);
    serde_json::json!({
        "phase": row.phase,
        "users": args.users,
        "objects": row.objects,
        "seconds": row.seconds,
        "floor_ratio": floor.map(|f| row.seconds / f),
        "operations": row.operations,
        "operations_per_s": rate(row.operations),
        "peak_rss_bytes": row.peak,
        "peak_rss_is_phase": row.peak_is_phase,
        "state_bytes": row.state,
        "state_bytes_per_object": row.state.map(|s| s as f64 / row.objects.max(1) as f64),
        "stages": row.stages.iter().map(|(n, s)| (n.clone(), serde_json::json!(s))).collect::<serde_json::Map<_, _>>(),
        "detail": row.detail,
        "durability": format!("{:?}", args.durability),
        "create_references": format!("{:?}", args.create_references),
        "lookups": args.lookups,
        "label": args.label,
    })
    .to_string()
}

fn print_table(args: &Args, rows: &[Row]) {
    let floor = rows.iter().find(|r| r.phase == "floor").map(|r| r.seconds);
    println!(
        "\n{:<10} {:>9} {:>8} {:>11} {:>9} {:>11} {:>10} {:>10}  stages (s)",
        "phase", "seconds", "× floor", "operations", "ops/s", "peak RSS", "state", "per object"
    );
    for r in rows {
        let ratio = floor.map_or("-".into(), |f| format!("{:.2}", r.seconds / f));
        let rate = if r.seconds > 0.0 {
            format!("{:.0}", r.operations as f64 / r.seconds)
        } else {
            "-".into()
        };
        let peak = r.peak.map_or("-".into(), |p| {
            format!("{}{}", mb(p), if r.peak_is_phase { "" } else { "*" })
        });
        let (state, per) = match r.state {
            Some(s) => (
                mb(s),
                format!("{:.0} B", s as f64 / r.objects.max(1) as f64),
            ),
            None => ("-".into(), "-".into()),
        };
        let st: Vec<String> = r
            .stages
            .iter()
            .map(|(n, s)| format!("{n} {s:.2}"))
            .collect();
        println!(
            "{:<10} {:>9.2} {:>8} {:>11} {:>9} {:>11} {:>10} {:>10}  {}",
            r.phase,
            r.seconds,
            ratio,
            r.operations,
            rate,
            peak,
            state,
            per,
            st.join(", ")
        );
    }
    for r in rows.iter().filter(|r| !r.detail.is_empty()) {
        println!("  {}: {}", r.phase, r.detail);
    }
    if rows.iter().any(|r| !r.peak_is_phase) {
        println!("  * the process's peak so far: /proc/self/clear_refs refused a reset");
    }
    if args.json {
        for r in rows {
            println!("{}", json_line(args, r, floor));
        }
    }
}

fn generate(export: &ScaleExport, path: &Path, edits: Option<&Edits>) -> Result<Written, String> {
    let t0 = Instant::now();
    let file = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (written, what) = match edits {
        None => (export.write(file), String::new()),
        Some(e) => match export.write_edited(e, file) {
            Ok(ed) => (
                Ok(ed.written),
                format!(
                    " after edits: {} users changed, {} deleted, {} added, {} groups changed",
                    ed.changed, ed.deleted, ed.added, ed.groups_changed
                ),
            ),
            Err(err) => (Err(err), String::new()),
        },
    };
    let w = written.map_err(|e| format!("writing {}: {e}", path.display()))?;
    eprintln!(
        "generated {} ({}: {} users, {} groups, {} members, {} managers){what} in {:.2} s",
        path.display(),
        mb(w.bytes),
        w.users,
        w.groups,
        w.members,
        w.managed,
        t0.elapsed().as_secs_f64()
    );
    Ok(w)
}

fn check(report: &RunReport, phase: &str) -> Result<(), String> {
    if report.held || report.stopped.is_some() || !report.failures.is_empty() {
        return Err(format!("{phase}: the run did not complete:\n{report}"));
    }
    if !report.issues.is_empty() {
        eprintln!(
            "{phase}: {} planner issues, the first: {}",
            report.issues.len(),
            report.issues[0]
        );
    }
    Ok(())
}

async fn run(args: &Args) -> Result<(), String> {
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
            tmp.path().to_path_buf()
        }
    };
    let ldif = dir.join("export.ldif");
    let state = dir.join("state.sqlite");
    let export = ScaleExport::new(args.users).with_seed(args.seed);
    let mut written = generate(&export, &ldif, None)?;
    println!(
        "scale benchmark: {} users, {} groups ({} objects), export {}; durability {:?}, \
         create references {:?}, join lookups {}",
        written.users,
        written.groups,
        written.objects(),
        mb(written.bytes),
        args.durability,
        args.create_references,
        if args.lookups { "on" } else { "off" }
    );
    let rules_path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/rules/ad-to-scim.toml"
    );
    let rules_text =
        std::fs::read_to_string(rules_path).map_err(|e| format!("{rules_path}: {e}"))?;
    let rules = Arc::new(
        RuleSet::from_toml(&rules_text, Some("ad-to-scim.toml")).map_err(|e| e.to_string())?,
    );
    let mut start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut prefix = String::new();
    for _ in 0..6 {
        prefix.push(char::from_digit((start % 36) as u32, 36).unwrap_or('0'));
        start /= 36;
    }
    let counts = Arc::new(Counts {
        prefix,
        ..Counts::default()
    });
    let mut rows: Vec<Row> = Vec::new();
    let mut sync: Option<Synchronizer> = None;
    for &phase in &args.phases {
        if phase == "initial" {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", state.display()));
            }
        }
        if phase == "edit" {
            written = generate(&export, &ldif, Some(&Edits::new(args.edit_seed)))?;
        }
        if phase != "floor" && sync.is_none() {
            let store = SqliteStore::open_with(&state, args.durability)
                .map_err(|e| format!("{}: {e}", state.display()))?;
            let mut s = Synchronizer::new(
                Box::new(LdifSource::new(&ldif, source_config())),
                Box::new(NullTarget {
                    read: args.lookups,
                    create_references: args.create_references.clone(),
                    counts: counts.clone(),
                }),
                Box::new(store),
                rules.clone(),
                EngineConfig {
                    seed: 42,
                    ..EngineConfig::default()
                },
            );
            if args.progress {
                s.on_progress(|p| eprintln!("  {:?} {} / {:?}", p.stage, p.done, p.total));
            }
            sync = Some(s);
        }
        let (calls0, ops0) = (
            counts.calls.load(Ordering::Relaxed),
            counts.operations.load(Ordering::Relaxed),
        );
        let peak_is_phase = reset_peak();
        let t0 = Instant::now();
        let (operations, report) = match (phase, sync.as_mut()) {
            ("floor", _) => {
                let source = LdifSource::new(&ldif, source_config());
                let mut s = source.full_import().await.map_err(|e| e.to_string())?;
                let mut n = 0u64;
                while let Some(item) = s.next().await {
                    if let ImportItem::Item(_) = item.map_err(|e| e.to_string())? {
                        n += 1;
                    }
                }
                (n, None)
            }
            (_, Some(s)) => {
                if phase == "edit" {
                    // 0.1 % deletions, several per OU: over the default guard's wave limit.
                    s.allow_deletions_once();
                }
                let r = match phase {
                    "full_sync" => s.full_sync().await,
                    _ => s.run_cycle().await,
                }
                .map_err(|e| format!("{phase}: {e}"))?;
                check(&r, phase)?;
                (r.total_done(), Some(r))
            }
            (_, None) => unreachable!("the synchronizer is made before any other phase"),
        };
        let elapsed = t0.elapsed();
        let peak = peak_rss();
        let calls = counts.calls.load(Ordering::Relaxed) - calls0;
        let sent = counts.operations.load(Ordering::Relaxed) - ops0;
        let detail = match &report {
            None => format!("{operations} entries read"),
            Some(r) => {
                let mut done: Vec<String> =
                    r.done.iter().map(|(k, n)| format!("{n} {k}")).collect();
                if done.is_empty() {
                    done.push("nothing done".into());
                }
                format!(
                    "imported {}, planned {}, {}; target: {sent} operations in {calls} calls{}",
                    r.imported,
                    r.planned,
                    done.join(", "),
                    if r.looked_up > 0 {
                        format!(", {} values looked up", r.looked_up)
                    } else {
                        String::new()
                    }
                )
            }
        };
        let row = Row {
            phase,
            seconds: elapsed.as_secs_f64(),
            operations,
            peak,
            peak_is_phase,
            state: (phase != "floor").then(|| state_size(&state)),
            objects: written.objects(),
            stages: report
                .as_ref()
                .map_or_else(Vec::new, |r| stages(r, elapsed)),
            detail,
        };
        eprintln!(
            "{phase}: {:.2} s, {} operations, peak RSS {}",
            row.seconds,
            row.operations,
            row.peak.map_or("-".into(), mb)
        );
        rows.push(row);
    }
    print_table(args, &rows);
    drop(sync);
    if state.exists() && args.phases.iter().any(|p| *p != "floor") {
        match table_sizes(&state) {
            Ok(t) => {
                let total: u64 = t.iter().map(|(_, _, b)| b).sum();
                let mut lines = Vec::new();
                println!("\nstate file by table and index (dbstat), {}:", mb(total));
                for (name, table, bytes) in &t {
                    let of = if name == table {
                        String::new()
                    } else {
                        format!(" (index of {table})")
                    };
                    println!(
                        "  {:<40} {:>11} {:>8.0} B/object{of}",
                        name,
                        mb(*bytes),
                        *bytes as f64 / written.objects().max(1) as f64
                    );
                    lines.push(serde_json::json!({
                        "table": name, "of": table, "bytes": bytes,
                        "users": args.users, "label": args.label,
                    }));
                }
                if args.json {
                    for l in lines {
                        println!("{l}");
                    }
                }
            }
            Err(e) => println!("\nstate file by table: unavailable ({e})"),
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("scale: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(&args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scale: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
