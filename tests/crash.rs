//! Crash safety, end to end: a synchronization of an LDIF directory into an LDIF target is killed
//! with SIGKILL again and again — at seeded random times, and at seeded moments chosen on
//! purpose: inside the state store's transaction that journals a batch's intents, inside the one
//! that records its outcomes (before either commits), inside the other transactions (import,
//! dirty set, runs), after the intents are committed but before the target gets the batch, with
//! part of a batch applied by the target, and with the whole batch applied but its outcomes not
//! recorded — while the source changes under it. Then runs to completion must leave the target
//! holding exactly one object per in-scope source object — none duplicated, none lost, every
//! attribute and membership as the rules say — with no create ever sent for an object the target
//! already holds, nothing pending, and a further full plan must find nothing to do.
//!
//! The killed process is this test binary itself, started again with [`CHILD`] set: it runs one
//! cycle of the engine (`Synchronizer::run_cycle`, as the `sync` example's `run` does; one run
//! in five a full sync, as `run --full`) with
//! - a [`tracing`] subscriber that kills the process at the n-th `state: committing` event of a
//!   kind — the event `SqliteStore` emits inside every write transaction, after its work and
//!   before its commit, naming the transaction in `what`;
//! - a [`Target`] wrapper around the `LdifTarget` that kills the process at the n-th batch it is
//!   given: before applying it, after applying its first operations only, or after applying it
//!   whole (before the engine hears of it).
//!
//! The moment (`KILL_AT`, a kind and n) is drawn by the parent from a seeded generator; the
//! child writes where it died to stderr just before it kills itself, so the test reports (and
//! asserts) how often each kind of moment was hit. The same seed makes the same choices; when
//! the engine's behaviour changes, the moments move with it.

#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dirsync::connector::ldif::{
    parse_str, LdifBody, LdifSource, LdifSourceConfig, LdifTarget, LdifTargetConfig,
};
use dirsync::connector::{
    Applied, ConnectorError, ErrorKind, Target, TargetCapabilities, TargetOperation,
};
use dirsync::delta::DeletionGuard;
use dirsync::engine::{EngineConfig, JoinLookup, Synchronizer};
use dirsync::model::{AttrName, Dn, ObjectType, TargetId, TargetObject, Value};
use dirsync::rules::ruleset::RuleSet;
use dirsync::state::SqliteStore;
use futures::stream::BoxStream;

/// The environment variable that makes this test binary the killed process: the directory of
/// the synchronization.
const CHILD: &str = "DIRSYNC_CRASH_CHILD";
/// The moment the child kills itself at: `<kind>:<n>` (see [`Moment`]); absent, it runs to
/// the end (or until the parent kills it).
const KILL_AT: &str = "DIRSYNC_CRASH_KILL_AT";
/// Set (to anything): the child runs a full sync (`delta_import` then `full_sync`, as the
/// `sync` example's `run --full`) instead of the usual cycle.
const FULL: &str = "DIRSYNC_CRASH_FULL";
/// The name of the test, to run it again as the child.
const TEST_NAME: &str = "killed_runs_converge_without_duplicates_or_losses";
/// The most operations one target call carries (the LDIF target rewrites its file once per call).
const MAX_BATCH: usize = 25;

/// Where a kill lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Moment {
    /// Inside the transaction that journals operations as intended, before it commits.
    IntentsCommitting,
    /// Inside the transaction that records operations' outcomes (done or failed), before it
    /// commits: the group commit.
    OutcomesCommitting,
    /// Inside any other write transaction (import, dirty set, escrow, runs).
    OtherCommitting,
    /// A batch handed to the target (its intents committed), none of it applied yet.
    BatchReceived,
    /// A batch of several operations handed to the target, its first ones applied (as a
    /// target that applies a batch operation by operation dies in the middle).
    BatchPartlyApplied,
    /// A batch applied by the target whole; the engine has not heard of it.
    BatchApplied,
    /// A kill by the parent after a random delay (anywhere: start-up, import, planning,
    /// export, recovery).
    Timed,
}

impl Moment {
    const CHOSEN: [Moment; 6] = [
        Moment::IntentsCommitting,
        Moment::OutcomesCommitting,
        Moment::OtherCommitting,
        Moment::BatchReceived,
        Moment::BatchPartlyApplied,
        Moment::BatchApplied,
    ];

    fn name(self) -> &'static str {
        match self {
            Moment::IntentsCommitting => "intents-committing",
            Moment::OutcomesCommitting => "outcomes-committing",
            Moment::OtherCommitting => "other-committing",
            Moment::BatchReceived => "batch-received",
            Moment::BatchPartlyApplied => "batch-partly-applied",
            Moment::BatchApplied => "batch-applied",
            Moment::Timed => "timed",
        }
    }

    fn parse(s: &str) -> Option<Moment> {
        Moment::CHOSEN.into_iter().find(|m| m.name() == s)
    }

    /// The kind of the state store's transaction named `what` (the `what` field of its
    /// `state: committing` event): journaling operations as intended, recording their outcomes,
    /// or something else.
    fn of_transaction(what: &str) -> Moment {
        let w = what.to_ascii_lowercase();
        if w.starts_with("journaling") || w.contains("intent") {
            Moment::IntentsCommitting
        } else if w.contains("outcome") || w.contains("done operation") || w.contains("failed op") {
            Moment::OutcomesCommitting
        } else {
            Moment::OtherCommitting
        }
    }
}

/// SplitMix64: a small seeded PRNG, so every run of the test makes the same choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Clone)]
struct User {
    uuid: String,
    uid: String,
    given: String,
    sn: String,
    department: String,
}

#[derive(Clone)]
struct Group {
    uuid: String,
    cn: String,
    /// Member uids.
    users: BTreeSet<String>,
    /// Member group names.
    groups: BTreeSet<String>,
}

const OUT_OF_SCOPE: &str = "Service Accounts";
const DEPARTMENTS: [&str; 5] = ["Engineering", "Sales", "Finance", "Research", "Support"];

/// The source directory, as the test knows it.
struct Directory {
    users: BTreeMap<String, User>,
    groups: Vec<Group>,
    next_id: usize,
}

fn uuid_of(n: usize, kind: u8) -> String {
    format!("{:08x}-0000-4000-8{kind:03x}-{n:012x}", n * 7919 + 1)
}

fn user_dn(uid: &str) -> String {
    format!("uid={uid},ou=People,dc=example,dc=com")
}

fn group_dn(cn: &str) -> String {
    format!("cn={cn},ou=Groups,dc=example,dc=com")
}

impl Directory {
    fn new(users: usize, groups: usize, rng: &mut Rng) -> Directory {
        let mut d = Directory {
            users: BTreeMap::new(),
            groups: Vec::new(),
            next_id: 0,
        };
        for _ in 0..users {
            d.add_user(rng);
        }
        for g in 0..groups {
            let cn = format!("team-{g:02}");
            let mut members = BTreeSet::new();
            let uids: Vec<String> = d.in_scope().map(|u| u.uid.clone()).collect();
            // The first group is large (a department-wide list): its member updates are big.
            let size = if g == 0 { 150 } else { 5 + rng.below(25) };
            for _ in 0..size {
                members.insert(uids[rng.below(uids.len())].clone());
            }
            d.groups.push(Group {
                uuid: uuid_of(g, 0x9),
                cn,
                users: members,
                groups: BTreeSet::new(),
            });
        }
        // Nested groups: the first two hold some of the others.
        for g in 2..groups.min(8) {
            let name = d.groups[g].cn.clone();
            d.groups[g % 2].groups.insert(name);
        }
        d
    }

    fn add_user(&mut self, rng: &mut Rng) {
        let n = self.next_id;
        self.next_id += 1;
        let department = if rng.below(20) == 0 {
            OUT_OF_SCOPE
        } else {
            DEPARTMENTS[rng.below(DEPARTMENTS.len())]
        };
        let u = User {
            uuid: uuid_of(n, 0x1),
            uid: format!("user{n:04}"),
            given: format!("Given{n}"),
            sn: format!("Family{n}"),
            department: department.to_owned(),
        };
        self.users.insert(u.uid.clone(), u);
    }

    fn in_scope(&self) -> impl Iterator<Item = &User> {
        self.users.values().filter(|u| u.department != OUT_OF_SCOPE)
    }

    fn random_in_scope(&self, rng: &mut Rng) -> Option<String> {
        let uids: Vec<&User> = self.in_scope().collect();
        (!uids.is_empty()).then(|| uids[rng.below(uids.len())].uid.clone())
    }

    fn forget_member(&mut self, uid: &str) {
        for g in &mut self.groups {
            g.users.remove(uid);
        }
    }

    /// A round of `changes` edits: renames, deletions and scope exits (a few: within the guard),
    /// membership changes, new users. Returns a description for the log.
    fn edit(&mut self, rng: &mut Rng, changes: usize) -> String {
        let mut done = Vec::new();
        for _ in 0..changes {
            match rng.below(10) {
                0..=2 => {
                    if let Some(uid) = self.random_in_scope(rng) {
                        if let Some(u) = self.users.get_mut(&uid) {
                            u.sn = format!(
                                "{}-R{}",
                                u.sn.split("-R").next().unwrap_or(""),
                                rng.below(1000)
                            );
                        }
                        done.push(format!("rename {uid}"));
                    }
                }
                3 => {
                    if let Some(uid) = self.random_in_scope(rng) {
                        self.users.remove(&uid);
                        self.forget_member(&uid);
                        done.push(format!("delete {uid}"));
                    }
                }
                4 => {
                    if let Some(uid) = self.random_in_scope(rng) {
                        if let Some(u) = self.users.get_mut(&uid) {
                            u.department = OUT_OF_SCOPE.to_owned();
                        }
                        self.forget_member(&uid);
                        done.push(format!("out of scope {uid}"));
                    }
                }
                5..=7 => {
                    let g = rng.below(self.groups.len());
                    if let Some(uid) = self.random_in_scope(rng) {
                        let group = &mut self.groups[g];
                        if !group.users.remove(&uid) {
                            group.users.insert(uid.clone());
                        }
                        done.push(format!("membership {} {uid}", group.cn));
                    }
                }
                _ => {
                    self.add_user(rng);
                    done.push("new user".to_owned());
                }
            }
        }
        done.join(", ")
    }

    fn to_ldif(&self) -> String {
        let mut s = String::from("version: 1\n\n");
        for u in self.users.values() {
            s.push_str(&format!(
                "dn: {}\nobjectClass: top\nobjectClass: inetOrgPerson\nentryUUID: {}\nuid: {}\ncn: {} {}\n\
                 givenName: {}\nsn: {}\nmail: {}@example.com\ndepartment: {}\n\n",
                user_dn(&u.uid), u.uuid, u.uid, u.given, u.sn, u.given, u.sn, u.uid, u.department
            ));
        }
        for g in &self.groups {
            s.push_str(&format!(
                "dn: {}\nobjectClass: top\nobjectClass: groupOfNames\nentryUUID: {}\ncn: {}\n",
                group_dn(&g.cn),
                g.uuid,
                g.cn
            ));
            for m in &g.users {
                s.push_str(&format!("member: {}\n", user_dn(m)));
            }
            for m in &g.groups {
                s.push_str(&format!("member: {}\n", group_dn(m)));
            }
            s.push('\n');
        }
        s
    }

    /// Writes the file as a directory export would appear: whole, by rename.
    fn write(&self, path: &Path) {
        let tmp = path.with_extension("part");
        std::fs::write(&tmp, self.to_ldif()).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
}

const RULES: &str = r#"
[[rule]]
name = "users"
source_type = "user"
target_type = "User"
join = [["externalId"]]
deprovision = { action = "delete" }

[rule.scope]
family = "connect-sync"
groups = [[ { attribute = "department", operator = "NOTEQUAL", value = "Service Accounts" } ]]

[[rule.flow]]
target = "externalId"
expression = '[entryUUID]'

[[rule.flow]]
target = "userName"
expression = '[uid]'

[[rule.flow]]
target = "displayName"
expression = 'Join(" ", [givenName], [sn])'

[[rule.flow]]
target = "familyName"
expression = '[sn]'

[[rule.flow]]
target = "department"
expression = '[department]'

[[rule.flow]]
target = "active"
expression = 'True'

[[rule]]
name = "groups"
source_type = "group"
target_type = "Group"
join = [["externalId"]]
deprovision = { action = "delete" }

[[rule.flow]]
target = "externalId"
expression = '[entryUUID]'

[[rule.flow]]
target = "displayName"
expression = '[cn]'

[[rule.flow]]
target = "members"
expression = '[member]'
reference = true
"#;

/// The synchronization of `dir` (`source.ldif` → `target.ldif`, state in `state.sqlite`), its
/// target wrapped in `target`'s kill points.
fn synchronizer(dir: &Path, kill: Arc<Killer>) -> Synchronizer {
    let rules = RuleSet::from_toml(RULES, Some("rules.toml")).expect("the rules compile");
    let source = LdifSource::new(dir.join("source.ldif"), LdifSourceConfig::default());
    let mut config = LdifTargetConfig::default()
        .with_object_type(
            "User",
            "userName",
            Dn::parse("ou=Users,o=app").unwrap(),
            ["top", "appUser"],
        )
        .with_object_type(
            "Group",
            "displayName",
            Dn::parse("ou=Groups,o=app").unwrap(),
            ["top", "appGroup"],
        );
    config.object_type_map = [("appUser", "User"), ("appGroup", "Group")]
        .into_iter()
        .map(|(c, t)| (AttrName::new(c), ObjectType::from(t)))
        .collect();
    config.reference_attributes = vec![AttrName::new("members")];
    config.max_batch = MAX_BATCH;
    let target = LdifTarget::open(dir.join("target.ldif"), config).expect("the target opens");
    let mut store = SqliteStore::open(dir.join("state.sqlite")).expect("the state store opens");
    // Plans read their context from the heads index, kept up to date by the writes each
    // killed run made before its death (a new process builds it from the file).
    store.set_head_index(dirsync::state::HeadIndex::Always);
    let engine = EngineConfig {
        guard: DeletionGuard {
            max_ratio: 0.5,
            ..DeletionGuard::default()
        },
        import_batch: 25,
        seed: 7,
        // The target holds nothing this state did not create: the journal and crash recovery
        // alone must keep every create single (a lookup before each create would hide a lost
        // or duplicated one).
        join_lookup: JoinLookup::Off,
        ..EngineConfig::default()
    };
    Synchronizer::new(
        Box::new(source),
        Box::new(Crashing {
            inner: target,
            kill,
        }),
        Box::new(store),
        Arc::new(rules),
        engine,
    )
}

/// The child's kill switch: the moment it dies at, and how many moments of each kind it has
/// passed.
struct Killer {
    at: Option<(Moment, u64)>,
    seen: [AtomicU64; Moment::CHOSEN.len()],
    /// Target calls and the largest batch seen, for the parent's record.
    batches: AtomicU64,
    largest: AtomicUsize,
}

impl Killer {
    fn new(at: Option<(Moment, u64)>) -> Killer {
        Killer {
            at,
            seen: Default::default(),
            batches: AtomicU64::new(0),
            largest: AtomicUsize::new(0),
        }
    }

    /// Counts a moment of `kind`; whether it is the one to die at.
    fn passes(&self, kind: Moment) -> bool {
        let i = Moment::CHOSEN.iter().position(|m| *m == kind).unwrap();
        let n = self.seen[i].fetch_add(1, Ordering::SeqCst) + 1;
        self.at == Some((kind, n))
    }

    /// Target calls, the largest batch, and the moments of each kind passed, in
    /// [`Moment::CHOSEN`]'s order (`seen=3,4,20,4,2,4`).
    fn stats(&self) -> String {
        let seen: Vec<String> = self
            .seen
            .iter()
            .map(|n| n.load(Ordering::SeqCst).to_string())
            .collect();
        format!(
            "batches={} seen={} largest={}",
            self.batches.load(Ordering::SeqCst),
            seen.join(","),
            self.largest.load(Ordering::SeqCst)
        )
    }

    /// Says where, then SIGKILLs this process (through `sh`: the crate forbids `unsafe`).
    fn die(&self, kind: Moment, detail: &str) -> ! {
        eprintln!(
            "crash-child: killed at {} ({detail}) {}",
            kind.name(),
            self.stats()
        );
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -KILL {}", std::process::id()))
            .status();
        // Not reached when the kill worked; the parent sees the abort and fails.
        std::process::abort()
    }
}

/// The target with kill points around each batch the engine hands it. Every create that comes
/// back `AlreadyExists` is reported on stderr: a create sent for an object the target already
/// holds is a create sent twice (the LDIF target refuses it by DN; a target without unique
/// names would hold a duplicate).
struct Crashing {
    inner: LdifTarget,
    kill: Arc<Killer>,
}

#[async_trait]
impl Target for Crashing {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn capabilities(&self) -> TargetCapabilities {
        self.inner.capabilities()
    }

    async fn read(
        &self,
        object_type: &ObjectType,
    ) -> Result<BoxStream<'_, Result<TargetObject, ConnectorError>>, ConnectorError> {
        self.inner.read(object_type).await
    }

    async fn get(
        &self,
        object_type: &ObjectType,
        id: &TargetId,
    ) -> Result<Option<TargetObject>, ConnectorError> {
        self.inner.get(object_type, id).await
    }

    async fn find(
        &self,
        object_type: &ObjectType,
        attribute: &AttrName,
        value: &Value,
    ) -> Result<Vec<TargetObject>, ConnectorError> {
        self.inner.find(object_type, attribute, value).await
    }

    async fn find_any(
        &self,
        object_type: &ObjectType,
        attribute: &AttrName,
        values: &[Value],
    ) -> Result<Vec<TargetObject>, ConnectorError> {
        self.inner.find_any(object_type, attribute, values).await
    }

    async fn apply(&self, operations: &[TargetOperation]) -> Vec<Result<Applied, ConnectorError>> {
        let k = &self.kill;
        let batch = k.batches.fetch_add(1, Ordering::SeqCst) + 1;
        k.largest.fetch_max(operations.len(), Ordering::SeqCst);
        let what = format!("batch {batch} of {} operations", operations.len());
        if k.passes(Moment::BatchReceived) {
            k.die(Moment::BatchReceived, &what);
        }
        if operations.len() > 1 && k.passes(Moment::BatchPartlyApplied) {
            // The first half (at least one), as a target applying one by one would have.
            let part = operations.len() / 2;
            let outcomes = self.inner.apply(&operations[..part]).await;
            report_duplicates(&operations[..part], &outcomes);
            k.die(
                Moment::BatchPartlyApplied,
                &format!("{what}, the first {part} applied"),
            );
        }
        let outcomes = self.inner.apply(operations).await;
        report_duplicates(operations, &outcomes);
        if k.passes(Moment::BatchApplied) {
            k.die(Moment::BatchApplied, &what);
        }
        outcomes
    }
}

fn report_duplicates(ops: &[TargetOperation], outcomes: &[Result<Applied, ConnectorError>]) {
    for (op, outcome) in ops.iter().zip(outcomes) {
        if let (TargetOperation::Create { attributes, .. }, Err(e)) = (op, outcome) {
            if e.kind() == ErrorKind::AlreadyExists {
                eprintln!(
                    "crash-child: duplicate create of externalId {:?}: {e}",
                    attributes.first_str("externalId")
                );
            }
        }
    }
}

/// The `tracing` subscriber of the child: at each `state: committing` event (emitted by the
/// state store inside a write transaction, before its commit) it counts the moment of the
/// transaction's kind and kills the process at the chosen one. Spans are not tracked.
struct Commits(Arc<Killer>);

#[derive(Default)]
struct Fields {
    message: String,
    what: String,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_owned(),
            "what" => self.what = value.to_owned(),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "what" => self.what = format!("{value:?}"),
            _ => {}
        }
    }
}

impl tracing::Subscriber for Commits {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.is_event() && metadata.target().starts_with("dirsync::state")
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut f = Fields::default();
        event.record(&mut f);
        if f.message != "state: committing" {
            return;
        }
        let kind = Moment::of_transaction(&f.what);
        if self.0.passes(kind) {
            self.0.die(kind, &f.what);
        }
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

/// The child: one `run_cycle` (with [`FULL`]: a full sync) of the synchronization in `dir`,
/// dying at `KILL_AT` if it comes.
fn child(dir: &Path) {
    let at = std::env::var(KILL_AT).ok().map(|s| {
        let (kind, n) = s.split_once(':').expect("KILL_AT is kind:n");
        (
            Moment::parse(kind).expect("a known moment"),
            n.parse::<u64>().expect("KILL_AT's n"),
        )
    });
    let kill = Arc::new(Killer::new(at));
    tracing::subscriber::set_global_default(Commits(kill.clone())).expect("one subscriber");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut sync = synchronizer(dir, kill.clone());
    // The stage a timed kill lands in, for the record.
    sync.on_progress(|p| eprintln!("progress {:?} {}", p.stage, p.done));
    let full = std::env::var_os(FULL).is_some();
    let report = runtime
        .block_on(async {
            if full {
                sync.delta_import().await?;
                sync.full_sync().await
            } else {
                sync.run_cycle().await
            }
        })
        .unwrap_or_else(|e| panic!("the run failed: {e}"));
    assert!(
        report.failures.is_empty() && report.stopped.is_none() && !report.held,
        "the run did not finish cleanly:\n{report}"
    );
    eprintln!(
        "crash-child: finished, {} done, {} recovered, {}",
        report.total_done(),
        report.recovered,
        kill.stats()
    );
}

/// One run of the child, as the parent saw it.
struct Outcome {
    /// Where it was killed (`None`: it finished).
    killed: Option<String>,
    stderr: String,
    took: Duration,
}

impl Outcome {
    /// Adds the duplicate creates the child reported to `duplicates`, and its largest batch to
    /// `largest`.
    fn record(&self, duplicates: &mut Vec<String>, largest: &mut usize) {
        duplicates.extend(
            self.stderr
                .lines()
                .filter(|l| l.starts_with("crash-child: duplicate create"))
                .map(str::to_owned),
        );
        *largest = (*largest).max(largest_batch(&self.stderr));
    }
}

/// The parent's handle on the synchronization in `dir`.
struct Runs<'a> {
    dir: &'a Path,
    exe: PathBuf,
}

impl Runs<'_> {
    fn command(&self, full: bool, at: Option<(Moment, u64)>) -> Command {
        let mut c = Command::new(&self.exe);
        c.args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, self.dir)
            .env_remove(KILL_AT)
            .env_remove(FULL)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("stderr.txt")).unwrap());
        if let Some((kind, n)) = at {
            c.env(KILL_AT, format!("{}:{n}", kind.name()));
        }
        if full {
            c.env(FULL, "1");
        }
        c
    }

    /// Runs the child (a full sync when `full`, else the usual cycle): to the moment `at`, or
    /// (`at` = `None`) until `delay` has passed, or (no delay) to its end. A child that was not
    /// killed must have finished cleanly.
    fn run(
        &self,
        round: usize,
        full: bool,
        at: Option<(Moment, u64)>,
        delay: Option<Duration>,
    ) -> Outcome {
        let t0 = Instant::now();
        let mut child = self.command(full, at).spawn().expect("spawn the child");
        // Without a delay, only a guard against a hung child (the last runs do all the work
        // the kills left, on a busy machine).
        let limit = delay.unwrap_or(Duration::from_secs(600));
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if t0.elapsed() >= limit {
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let took = t0.elapsed();
        let Some(status) = status else {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            assert!(delay.is_some(), "round {round}: the child ran for 600 s");
            let stderr = std::fs::read_to_string(self.dir.join("stderr.txt")).unwrap();
            let stage = last_stage(&stderr);
            return Outcome {
                killed: Some(format!("{} ({stage})", Moment::Timed.name())),
                stderr,
                took,
            };
        };
        let stderr = std::fs::read_to_string(self.dir.join("stderr.txt")).unwrap();
        let marker = stderr
            .lines()
            .find_map(|l| l.strip_prefix("crash-child: killed at "));
        match marker {
            Some(m) => {
                assert_eq!(
                    status.signal(),
                    Some(9),
                    "round {round}: the child meant to die by SIGKILL ({status}):\n{stderr}"
                );
                Outcome {
                    killed: Some(m.to_owned()),
                    stderr,
                    took,
                }
            }
            None => {
                assert!(
                    status.success(),
                    "round {round}: an uninterrupted run failed ({status}):\n{stderr}"
                );
                Outcome {
                    killed: None,
                    stderr,
                    took,
                }
            }
        }
    }
}

/// The last stage named by the child's progress lines.
fn last_stage(stderr: &str) -> &'static str {
    let last = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("progress "))
        .filter_map(|l| l.split(' ').next())
        .next_back();
    match last {
        None => "startup/import",
        Some("Import") => "import/plan",
        Some("Plan") => "plan/export",
        Some("Export") => "export",
        Some("Recover") => "recover",
        Some(_) => "other",
    }
}

/// The moments of each kind a child that finished passed (`seen=…` on its last line).
fn seen(stderr: &str) -> Vec<usize> {
    stderr
        .lines()
        .filter(|l| l.starts_with("crash-child: finished"))
        .filter_map(|l| l.split(" seen=").nth(1))
        .filter_map(|s| s.split(' ').next())
        .flat_map(|s| s.split(',').map(|n| n.parse().unwrap_or(0)))
        .collect()
}

/// The largest batch a child reported (`largest=N` on its last line).
fn largest_batch(stderr: &str) -> usize {
    stderr
        .lines()
        .filter_map(|l| l.split(" largest=").nth(1))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// The target file's objects of one class: externalId → attributes (lower-cased names).
fn target_objects(text: &str, class: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let records = parse_str(text).expect("the target file parses");
    let mut out = BTreeMap::new();
    let mut external_ids = Vec::new();
    for r in records {
        let LdifBody::Content(values) = &r.body else {
            panic!("a change record in the target file");
        };
        let mut attrs: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for v in values {
            attrs
                .entry(v.attribute.as_str().to_ascii_lowercase())
                .or_default()
                .push(v.value.to_text());
        }
        attrs
            .entry("dn".into())
            .or_default()
            .push(r.dn.normalized().to_string());
        let is_class = attrs
            .get("objectclass")
            .is_some_and(|c| c.iter().any(|c| c.eq_ignore_ascii_case(class)));
        if !is_class {
            continue;
        }
        let ext = attrs
            .get("externalid")
            .and_then(|v| v.first())
            .cloned()
            .unwrap_or_else(|| panic!("{} has no externalId", r.dn));
        external_ids.push(ext.clone());
        assert!(
            out.insert(ext.clone(), attrs).is_none(),
            "two {class} objects with externalId {ext}"
        );
    }
    out
}

fn check_target(dir: &Path, d: &Directory) {
    let text = std::fs::read_to_string(dir.join("target.ldif")).expect("the target file exists");
    let users = target_objects(&text, "appUser");
    let groups = target_objects(&text, "appGroup");
    let expected: BTreeMap<&str, &User> = d.in_scope().map(|u| (u.uuid.as_str(), u)).collect();
    let got: BTreeSet<&str> = users.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = expected.keys().copied().collect();
    assert_eq!(
        got.difference(&want).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "users in the target that should not be"
    );
    assert_eq!(
        want.difference(&got).collect::<Vec<_>>(),
        Vec::<&&str>::new(),
        "in-scope users missing from the target"
    );
    let dn_of_uid: BTreeMap<String, String> = users
        .values()
        .map(|a| (a["username"][0].clone(), a["dn"][0].clone()))
        .collect();
    for (ext, attrs) in &users {
        let u = expected[ext.as_str()];
        assert_eq!(attrs["username"], vec![u.uid.clone()], "{ext}");
        assert_eq!(
            attrs["displayname"],
            vec![format!("{} {}", u.given, u.sn)],
            "{ext}"
        );
        assert_eq!(attrs["familyname"], vec![u.sn.clone()], "{ext}");
        assert_eq!(attrs["department"], vec![u.department.clone()], "{ext}");
    }
    assert_eq!(groups.len(), d.groups.len(), "groups in the target");
    let dn_of_group: BTreeMap<String, String> = groups
        .values()
        .map(|a| (a["displayname"][0].clone(), a["dn"][0].clone()))
        .collect();
    for g in &d.groups {
        let attrs = groups
            .get(&g.uuid)
            .unwrap_or_else(|| panic!("group {} missing", g.cn));
        assert_eq!(attrs["displayname"], vec![g.cn.clone()]);
        let want: BTreeSet<String> = g
            .users
            .iter()
            .map(|uid| dn_of_uid[uid].clone())
            .chain(g.groups.iter().map(|cn| dn_of_group[cn].clone()))
            .collect();
        let got: BTreeSet<String> = attrs
            .get("members")
            .map(|m| {
                m.iter()
                    .map(|dn| Dn::parse(dn).expect("member DN").normalized().to_string())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            got == want,
            "members of {}: {:?} too many, {:?} missing",
            g.cn,
            got.difference(&want).collect::<Vec<_>>(),
            want.difference(&got).collect::<Vec<_>>()
        );
    }
}

#[test]
fn killed_runs_converge_without_duplicates_or_losses() {
    if let Some(dir) = std::env::var_os(CHILD) {
        child(Path::new(&dir));
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut rng = Rng(0x5eed_c0de);
    let mut d = Directory::new(400, 24, &mut rng);
    d.write(&dir.join("source.ldif"));
    let runs = Runs {
        dir,
        exe: std::env::current_exe().unwrap(),
    };

    const ROUNDS: usize = 150;
    // How long an uninterrupted run takes; timed kills are drawn as shares of it (so they land
    // inside runs on fast and slow machines alike), updated from runs that finish on their own.
    let mut estimate = Duration::from_millis(1000);
    // Per chosen kind, the bound n is drawn below: how many such moments the last run that
    // finished with any had (or more, when a kill landed further).
    let mut caps: BTreeMap<Moment, usize> = Moment::CHOSEN.iter().map(|m| (*m, 8)).collect();
    let mut landed: BTreeMap<String, usize> = BTreeMap::new();
    let mut kills = 0;
    let mut finished = 0;
    let mut largest = 0;
    let mut duplicates = Vec::new();
    // Whether the last run finished its work (then the next one gets new work).
    let mut idle = true;
    for round in 0..ROUNDS {
        if round % 3 != 0 || idle {
            let changes = 2 + rng.below(12);
            let what = d.edit(&mut rng, changes);
            d.write(&dir.join("source.ldif"));
            eprintln!("round {round}: source edited: {what}");
        }
        // Only a batch of several operations can be partly applied: until the engine has
        // handed the target one, that moment is not drawn.
        let choices: Vec<Moment> = Moment::CHOSEN
            .into_iter()
            .filter(|m| *m != Moment::BatchPartlyApplied || largest > 1)
            .collect();
        let pick = rng.below(choices.len() + 2);
        // One run in five a full sync (every object planned; a large run exported in pages).
        let full = rng.below(5) == 0;
        let (outcome, chosen) = if let Some(&kind) = choices.get(pick) {
            let n = 1 + rng.below(caps[&kind]) as u64;
            let o = runs.run(round, full, Some((kind, n)), None);
            if o.killed.is_some() {
                let cap = caps.get_mut(&kind).unwrap();
                *cap = (*cap).max(n as usize);
            }
            (
                o,
                format!("{}:{n}{}", kind.name(), if full { " full" } else { "" }),
            )
        } else {
            // A third of the timed kills early (start-up, import, planning), the rest anywhere
            // up to a little past the expected end.
            let share = if rng.below(3) == 0 {
                rng.unit() * 0.25
            } else {
                rng.unit() * 1.1
            };
            let delay = estimate.mul_f64(share).max(Duration::from_millis(5));
            let o = runs.run(round, full, None, Some(delay));
            if o.killed.is_none() {
                estimate = (estimate + o.took.max(Duration::from_millis(50))) / 2;
            }
            (
                o,
                format!("timed {delay:.0?}{}", if full { " full" } else { "" }),
            )
        };
        outcome.record(&mut duplicates, &mut largest);
        idle = outcome.killed.is_none();
        for (kind, &n) in Moment::CHOSEN.iter().zip(&seen(&outcome.stderr)) {
            if n > 0 {
                caps.insert(*kind, n);
            }
        }
        match &outcome.killed {
            Some(at) => {
                kills += 1;
                let kind = at.split(' ').next().unwrap_or(at).to_owned();
                *landed.entry(kind).or_default() += 1;
                eprintln!(
                    "round {round} ({chosen}): killed at {at} after {:.0?}",
                    outcome.took
                );
            }
            None => {
                finished += 1;
                let last = outcome.stderr.lines().next_back().unwrap_or("");
                eprintln!(
                    "round {round} ({chosen}): not killed, {last} in {:.0?}",
                    outcome.took
                );
            }
        }
    }
    eprintln!(
        "{kills} kills, by moment: {landed:?}; {finished} of {ROUNDS} runs finished first; \
         largest batch {largest}"
    );

    // Runs to completion: the first resolves what the kills left unconfirmed.
    for round in ROUNDS..ROUNDS + 2 {
        let o = runs.run(round, false, None, None);
        o.record(&mut duplicates, &mut largest);
        eprintln!(
            "round {round}: {} in {:.1?}",
            o.stderr.lines().next_back().unwrap_or(""),
            o.took
        );
    }
    check_target(dir, &d);
    assert_eq!(
        duplicates,
        Vec::<String>::new(),
        "creates sent for objects the target already held"
    );
    // A full plan finds nothing to do; nothing is pending, escrowed or unconfirmed.
    let mut sync = synchronizer(dir, Arc::new(Killer::new(None)));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let staged = runtime
        .block_on(async {
            sync.delta_import().await?;
            sync.plan_with_lookups(true).await
        })
        .unwrap();
    assert!(
        staged.plan.operations.is_empty(),
        "a full plan after convergence should be empty:\n{}",
        staged.plan
    );
    let (dirty, escrow, unconfirmed) = sync.with_store(|s| {
        (
            s.dirty().unwrap(),
            s.escrowed().unwrap(),
            s.journal_unconfirmed().unwrap(),
        )
    });
    assert_eq!(dirty, Vec::new(), "pending (dirty) objects");
    assert!(escrow.is_empty(), "escrow: {escrow:?}");
    assert!(unconfirmed.is_empty(), "unconfirmed: {unconfirmed:?}");

    // The kills were many, and landed at every kind of moment.
    assert!(kills >= 100, "only {kills} kills");
    // The engine exports in batches (the LDIF target takes 25 operations per call).
    assert!(
        largest > 1,
        "the target never received a batch of several operations"
    );
    for kind in Moment::CHOSEN.iter().chain([&Moment::Timed]) {
        let n = landed.get(kind.name()).copied().unwrap_or(0);
        assert!(n >= 3, "only {n} kills at {}: {landed:?}", kind.name());
    }
    eprintln!("crash test took {:.1?}", started.elapsed());
}
