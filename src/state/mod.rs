//! The state store: the source mirror, the link table, the target mirror, the dirty set, the
//! export journal, watermarks, escrow and run records — everything the engine must remember
//! between runs — behind one trait, [`StateStore`].
//!
//! Two stores ship with the crate: [`MemoryStore`] (everything in memory; for tests and
//! short-lived programs) and, with the `sqlite` feature (on by default), [`SqliteStore`], the
//! embedded durable default: one SQLite file whose tables an administrator can read with the
//! `sqlite3` shell. Both keep the same promises, checked by one shared test suite
//! (`testkit::store_contract`, exported with the `testkit` feature for downstream stores):
//!
//! * every mutating call is **one transaction**: it takes effect whole or not at all — above all,
//!   a watermark is committed together with the changes it covers, never before them;
//! * a row that does not deserialize is an [`StateError::Corrupt`] error naming the table and
//!   key, never a panic;
//! * reading never changes anything, and [`StateStore::fingerprint`] moves with every change of
//!   what a plan depends on (mirrors, links, dirty set) and with nothing else;
//! * secrets are not stored: a create's secret attributes and the values of redacted attribute
//!   changes are dropped before an operation is journaled or applied to the target mirror (the
//!   target mirror holds what the target would show when read back, and targets never return
//!   passwords).
//!
//! # The journal: what it keeps, and for how long
//!
//! Every export operation is journaled **intended** — the planned operation and the target
//! operation it becomes, in full (secrets removed; a store may write the target operation as
//! what it adds to the planned one, as long as it reads back whole) — and committed before it
//! is sent: that row
//! is what crash recovery ([`StateStore::journal_unconfirmed`]) replays or confirms. Once the
//! operation is recorded **done**, the payload has served: the target mirror holds the result,
//! the source mirror the cause. A done row keeps what the audit trail needs — run (and so
//! time), object (anchor), kind, target id, and for an update the names of the attributes it
//! changed (not their values: the journal is no second copy of the directory's personal data)
//! — and drops the planned and sent payloads. A **failed** row keeps its payloads (they explain
//! the failure) until retention removes it. [`StateStore::journal`] returns these
//! [`JournalRecord`]s.
//!
//! **Retention** ([`Retention`]): finished runs outside both windows — neither among the
//! newest [`Retention::runs`] runs nor finished within [`Retention::days`] days — are pruned
//! with their journal rows, at [`StateStore::finish_run`] (the stores apply their retention,
//! [`Retention::default`] unless set) or on demand ([`StateStore::prune_journal`]). Intended
//! rows and the runs they belong to, and runs never finished, are never pruned.
//!
//! # The target value index
//!
//! Join lookups ([`StateStore::load_join_candidates`]) find target objects by attribute value.
//! A store may index only the attributes the engine declares it looks up
//! ([`StateStore::set_lookup_attributes`], from the rules' join groups); a lookup of an
//! attribute not declared still answers, by a scan of the target objects of its type.
//!
//! # Sources
//!
//! The store holds one source: the mirror of the source the engine imports from. Watermarks are
//! keyed by connector name so the target's own change position (a Graph deltaLink) can be kept
//! too. Times come in as parameters: the store reads no clock. It plans nothing and talks to no
//! connector.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::connector::{TargetOperation, Watermark};
use crate::delta::{Links, Operation, OperationKind, SourceMirror, TargetMirror};
use crate::model::{
    Anchor, AttrName, Attributes, Change, Dn, Entry, ObjectType, Reference, TargetId, TargetObject,
    Value,
};

mod encoding;
mod heads;
mod memory;
mod payload;
#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;

pub use memory::MemoryStore;
#[cfg(feature = "sqlite")]
pub use sqlite::{Durability, HeadIndex, SqliteStore};

/// The id of a run ([`StateStore::begin_run`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunId(pub i64);

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "run {}", self.0)
    }
}

/// The id of a journal row ([`StateStore::journal_intent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JournalId(pub i64);

impl fmt::Display for JournalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "journal entry {}", self.0)
    }
}

/// Where a journaled operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalState {
    /// Journaled before it was sent; not (yet) confirmed.
    Intended,
    /// The target applied it.
    Done,
    /// The target refused it, or it could not be sent.
    Failed,
}

impl JournalState {
    /// The state as stored: `intended`, `done` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            JournalState::Intended => "intended",
            JournalState::Done => "done",
            JournalState::Failed => "failed",
        }
    }

    /// The state named `s`, if it is one.
    pub fn parse(s: &str) -> Option<JournalState> {
        match s {
            "intended" => Some(JournalState::Intended),
            "done" => Some(JournalState::Done),
            "failed" => Some(JournalState::Failed),
            _ => None,
        }
    }
}

/// One journaled export operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// The row's id.
    pub id: JournalId,
    /// The run that exported it.
    pub run: RunId,
    /// The planned operation (secrets removed).
    pub operation: Operation,
    /// The operation as sent to the target, references translated (secrets removed); `None`
    /// for operations that only touch the link table (unlink, join without changes).
    pub sent: Option<TargetOperation>,
    /// Where it stands.
    pub state: JournalState,
    /// The target object, once done (the new id for a create).
    pub target_id: Option<TargetId>,
    /// Why it failed.
    pub error: Option<String>,
    /// Whether the failure may go away by retrying.
    pub retryable: bool,
}

/// One row of the journal as [`StateStore::journal`] shows it: what was exported when, and
/// how it went. Done rows are compact (see the [module documentation](self#the-journal-what-it-keeps-and-for-how-long)):
/// their payloads are dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalRecord {
    /// The row's id.
    pub id: JournalId,
    /// The run that exported it.
    pub run: RunId,
    /// The source object.
    pub anchor: Anchor,
    /// The kind of operation ([`OperationKind::name`]: `create`, `update`, …).
    pub kind: String,
    /// Where it stands.
    pub state: JournalState,
    /// The target object, once done (the new id for a create).
    pub target_id: Option<TargetId>,
    /// The attributes a done update changed (names only), in order; empty for other kinds.
    pub attributes: Vec<AttrName>,
    /// Why it failed.
    pub error: Option<String>,
    /// Whether the failure may go away by retrying.
    pub retryable: bool,
    /// The planned operation (secrets removed) while intended or failed; `None` once done.
    pub operation: Option<Operation>,
    /// The operation as sent (secrets removed) while intended or failed, when it has one;
    /// `None` once done.
    pub sent: Option<TargetOperation>,
}

/// How long the journal and the run records are kept (see the
/// [module documentation](self#the-journal-what-it-keeps-and-for-how-long)): a finished run
/// is pruned, with its journal rows, once it is outside both windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// The newest runs always kept (finished or not).
    pub runs: u64,
    /// Runs finished within this many days (of the time of pruning) are kept.
    pub days: u32,
}

impl Default for Retention {
    /// The newest 100 runs, and every run of the last 30 days.
    fn default() -> Retention {
        Retention {
            runs: 100,
            days: 30,
        }
    }
}

impl Retention {
    /// The finish time before which a run may be pruned, when pruning at `now`.
    pub fn cutoff(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now.checked_sub_signed(chrono::TimeDelta::days(i64::from(self.days)))
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }
}

/// What [`StateStore::prune_journal`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pruned {
    /// Run records removed.
    pub runs: u64,
    /// Journal rows removed.
    pub entries: u64,
}

/// The attributes a done operation's audit record names: those `sent` changed, for an update.
pub(crate) fn audit_attributes(sent: Option<&TargetOperation>) -> Vec<AttrName> {
    match sent {
        Some(TargetOperation::Update { changes, .. }) => {
            let mut out: Vec<AttrName> = Vec::with_capacity(changes.len());
            for c in changes {
                if !out.contains(&c.attribute) {
                    out.push(c.attribute.clone());
                }
            }
            out
        }
        _ => Vec::new(),
    }
}

/// The lookup attributes of target types, names lower-cased (as lookups compare them).
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) type LookupAttributes = BTreeMap<ObjectType, std::collections::BTreeSet<String>>;

/// `attrs` with their names lower-cased.
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) fn lower_lookup_attributes(
    attrs: &BTreeMap<ObjectType, std::collections::BTreeSet<AttrName>>,
) -> LookupAttributes {
    attrs
        .iter()
        .map(|(t, names)| {
            (
                t.clone(),
                names.iter().map(|n| n.as_str().to_lowercase()).collect(),
            )
        })
        .collect()
}

/// The outcome of one journaled operation, for [`StateStore::journal_outcomes`].
#[derive(Debug, Clone, Copy)]
pub enum JournalOutcome<'a> {
    /// It took effect: as [`StateStore::journal_done`].
    Done {
        /// The journal row.
        id: JournalId,
        /// The planned operation.
        op: &'a Operation,
        /// The operation as sent (`None` for link-only operations).
        sent: Option<&'a TargetOperation>,
        /// The target object (required for a create).
        target_id: Option<&'a TargetId>,
    },
    /// It failed: as [`StateStore::journal_failed`].
    Failed {
        /// The journal row.
        id: JournalId,
        /// Why.
        error: &'a str,
        /// Whether retrying may help.
        retryable: bool,
    },
}

/// An anchor whose export keeps failing, held until its next retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Escrow {
    /// The source object.
    pub anchor: Anchor,
    /// How many times its export failed in a row.
    pub attempts: u32,
    /// When to try again.
    pub next_retry: DateTime<Utc>,
    /// The last failure.
    pub last_error: String,
}

/// One recorded run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run's id.
    pub id: RunId,
    /// The run profile (`delta-sync`, `full-import`, …).
    pub profile: String,
    /// When it started.
    pub started: DateTime<Utc>,
    /// When it finished; `None` while running, or when it never finished (a crash).
    pub finished: Option<DateTime<Utc>>,
    /// How it ended (`success`, `failed`, …), as the engine named it.
    pub outcome: Option<String>,
    /// The run report, as JSON.
    pub report_json: Option<String>,
}

/// What a finished full import did to the source mirror.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullImportSummary {
    /// The import's generation.
    pub generation: u64,
    /// Distinct objects the import delivered.
    pub seen: u64,
    /// Objects new to the mirror.
    pub added: u64,
    /// Objects whose content changed.
    pub changed: u64,
    /// Objects removed from the mirror because the import did not deliver them.
    pub deleted: u64,
}

/// The planner's views of the store: the source mirror, the links and the target mirror —
/// all of them ([`StateStore::load_all`]) or a delta's neighbourhood
/// ([`StateStore::load_neighbourhood`]).
#[derive(Debug, Clone, Default)]
pub struct Views {
    /// The source mirror.
    pub mirror: SourceMirror,
    /// The links.
    pub links: Links,
    /// The target mirror.
    pub target: TargetMirror,
}

/// Where a full plan's paging got to ([`StateStore::full_plan_page`]): what a store's page
/// gave, for its next page.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PageMark {
    /// After this anchor, in anchor order.
    Anchor(Anchor),
    /// After this row of the store's source objects, in the order it holds them.
    Row {
        /// The last row read.
        after: i64,
        /// The store's version of its contents when the plan began (another writer's commit
        /// changes it: the store then refuses the mark).
        version: i64,
    },
    /// The source objects done: the linked anchors without one, after this one (or from the
    /// first).
    Unsourced {
        /// The last anchor read, if any.
        after: Option<Anchor>,
        /// As [`PageMark::Row`]'s.
        version: i64,
    },
}

/// Which of the objects referencing a neighbourhood's anchors it plans too
/// ([`StateStore::load_neighbourhood_reaching`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reach {
    /// All of them (a delta plan: [`StateStore::load_neighbourhood`]).
    Referrers,
    /// The linked ones (a page of a run planned page by page, which plans the referrers
    /// without a link in their own page: [`crate::delta::PlanInput::unlinked_referrers`]).
    LinkedReferrers,
    /// None: only the anchors are planned (phase A of a full plan,
    /// [`crate::delta::decide_page`]; a page of a run planned page by page, read light, whose
    /// planner says which referrers it has to decide as well).
    Anchors,
    /// None, and no object referencing them comes as context either: only the anchors are
    /// decided, by rules that do not read `member_of`
    /// ([`Projection::reads_member_of`](crate::delta::Projection::reads_member_of)). What they
    /// reference still comes as context (its links translate their references).
    AnchorsAlone,
    /// As [`Reach::AnchorsAlone`], but what the anchors reference comes as its link alone
    /// when it has one (by anchor; an object referenced without a link, or by DN, comes as its
    /// head): what translating the references reads. For rules that read referenced objects
    /// by DN only ([`Projection::reads_mirror_by_dn`](crate::delta::Projection::reads_mirror_by_dn)):
    /// the planner's mirror says when one was asked for
    /// ([`SourceMirror::watch_absent`](crate::delta::SourceMirror)), and the engine reads the
    /// page again with [`Reach::AnchorsAlone`]. A store may hold more.
    AnchorsByLink,
    /// No context at all: the anchors' entries, their links and the target objects of those
    /// links, and nothing around them — for a paged run's survey of its deprovisions, whose
    /// planner says when a projection asked for more
    /// ([`Projection::reads_mirror_by_dn`](crate::delta::Projection::reads_mirror_by_dn)). A
    /// store may hold more (a wider neighbourhood holds every narrower one).
    AnchorsBare,
}

/// A join lookup for [`StateStore::load_join_candidates`]: target objects of `object_type`
/// whose `attribute` has `value` (strings compared ignoring case).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TargetLookup {
    /// The target object type.
    pub object_type: ObjectType,
    /// The attribute.
    pub attribute: AttrName,
    /// The value.
    pub value: Value,
}

/// Why a state-store call failed. Every message says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// SQLite reported an error.
    #[cfg(feature = "sqlite")]
    #[error("state store: {context}: {source} (check that the state file is writable, on a local disk, and not opened by another dirsync process that holds it locked)")]
    Sqlite {
        /// What the store was doing.
        context: String,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The state file was written by a newer dirsync.
    #[error("state store schema version {found} was written by a newer dirsync (this one supports up to {supported}): upgrade dirsync, or restore a backup of the state file made by this version")]
    SchemaTooNew {
        /// The file's version.
        found: i64,
        /// The newest version this build supports.
        supported: i64,
    },
    /// The state file's schema is too old to migrate automatically.
    #[error("state store schema version {found} is too old to migrate (this dirsync migrates from version {supported} on): run an older dirsync once to migrate it, or delete the state file and run a full import")]
    SchemaTooOld {
        /// The file's version.
        found: i64,
        /// The oldest version this build migrates from.
        supported: i64,
    },
    /// A stored row does not deserialize.
    #[error("state store: corrupt row in table {table}, key {key}: {detail} (restore a backup of the state file, or delete the row and run a full import and reconcile)")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// The row's key.
        key: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A full import delivered too few objects; nothing was deleted.
    #[error("full import saw {seen} objects but the mirror holds {mirrored}: refusing to delete the rest (the source may be unreachable or its search base wrong); check the source, or finish the import with a lower minimum share to accept the deletions")]
    ImportTooSmall {
        /// Distinct objects the import delivered.
        seen: u64,
        /// Objects in the mirror (seen or not).
        mirrored: u64,
    },
    /// A full-import call named a generation that is not the open one.
    #[error("full import generation {generation} is not open{}: call begin_full_import first (a newer import may have replaced this one)", open.map(|g| format!(" (generation {g} is)")).unwrap_or_default())]
    UnknownGeneration {
        /// The generation given.
        generation: u64,
        /// The generation open, if any.
        open: Option<u64>,
    },
    /// `finish_full_import` named another connector than `begin_full_import`.
    #[error(
        "full import generation {generation} was begun for connector {begun:?}, not {given:?}"
    )]
    WrongConnector {
        /// The generation.
        generation: u64,
        /// The connector that began it.
        begun: String,
        /// The connector given.
        given: String,
    },
    /// A delta change modifies or moves an object the mirror does not hold; nothing of the
    /// batch was applied and the watermark did not move.
    #[error("delta import: {change} of object {anchor}, which the source mirror does not hold: clear the watermark and run a full import")]
    UnknownAnchor {
        /// The object.
        anchor: Anchor,
        /// The kind of change (`modify`, `move`).
        change: &'static str,
    },
    /// Two different source objects (two DNs) carry one anchor in one import: the source's
    /// anchor attribute does not identify one object. Nothing of the call was applied.
    #[error("the source delivered two objects with the anchor {anchor}: {first} and {second}; an anchor must identify one object (make the anchor attribute unique in the source, or anchor on another attribute); nothing of this batch was applied")]
    DuplicateAnchor {
        /// The anchor.
        anchor: Anchor,
        /// The DN of the object that had it first.
        first: String,
        /// The DN of the other object.
        second: String,
    },
    /// A journal id that does not exist.
    #[error("{0} does not exist (was the state file replaced during the run?)")]
    UnknownJournalId(JournalId),
    /// A run id that does not exist.
    #[error("{0} does not exist: call begin_run first")]
    UnknownRun(RunId),
    /// A call the store cannot carry out as asked (a caller's mistake).
    #[error("state store: {0}")]
    Invalid(String),
    /// A value could not be serialized for storage.
    #[error("state store: cannot serialize {what}: {detail}")]
    Serialize {
        /// What was being serialized.
        what: String,
        /// The serializer's message.
        detail: String,
    },
}

/// Validates a batch of changes as they would apply in order: a modify or move of an anchor
/// that does not exist (in the mirror, `exists`, or after the batch's earlier changes) fails the
/// whole batch, and so does an add of an anchor that an earlier change of the batch gave another
/// DN (two objects with one anchor: [`StateError::DuplicateAnchor`]). Shared by the stores.
fn check_changes(
    changes: &[Change],
    mut exists: impl FnMut(&Anchor) -> Result<bool, StateError>,
) -> Result<(), StateError> {
    let mut seen: std::collections::HashMap<&Anchor, bool> = std::collections::HashMap::new();
    // The DN each anchor has after the batch's earlier adds, replaces and moves (a change log
    // may replace an object with a renamed copy; it never adds an object that exists).
    let mut dns: std::collections::HashMap<&Anchor, Option<&Dn>> = std::collections::HashMap::new();
    for c in changes {
        let a = c.anchor();
        let now = match seen.get(a) {
            Some(e) => *e,
            None => exists(a)?,
        };
        match c {
            Change::Add(e) | Change::Replace(e) => {
                if let (Change::Add(_), Some(first)) = (c, dns.get(a)) {
                    same_object(a, *first, e.dn.as_ref())?;
                }
                seen.insert(a, true);
                dns.insert(a, e.dn.as_ref());
            }
            Change::Delete { .. } => {
                seen.insert(a, false);
                dns.remove(a);
            }
            Change::Modify { .. } | Change::Move { .. } if !now => {
                return Err(StateError::UnknownAnchor {
                    anchor: a.clone(),
                    change: if matches!(c, Change::Move { .. }) {
                        "move"
                    } else {
                        "modify"
                    },
                })
            }
            Change::Move { new_dn, .. } => {
                dns.insert(a, Some(new_dn));
            }
            Change::Modify { .. } => {}
        }
    }
    Ok(())
}

/// `Err(`[`StateError::DuplicateAnchor`]`)` when two entries of `anchor` delivered by one
/// import, at DNs `first` and `second`, are two objects: both have a DN and the DNs differ.
/// (The same object delivered twice — a restarted search, a re-read — is not an error.) Shared
/// by the stores.
fn same_object(anchor: &Anchor, first: Option<&Dn>, second: Option<&Dn>) -> Result<(), StateError> {
    match (first, second) {
        (Some(f), Some(s)) if f != s => Err(StateError::DuplicateAnchor {
            anchor: anchor.clone(),
            first: f.to_string(),
            second: s.to_string(),
        }),
        _ => Ok(()),
    }
}

/// Where the engine keeps state between runs. See the [module documentation](self) for the
/// promises every implementation keeps.
///
/// Synchronous: each call is short (one transaction), and the engine calls it from async code.
/// Object-safe: a program may hold a `Box<dyn StateStore>`.
pub trait StateStore: Send {
    // --- source mirror: imports ---

    /// Applies the changes of a delta import to the source mirror and, when given, commits
    /// `watermark` for `connector` — all in one transaction. Marks dirty every object whose
    /// content changed, the objects that reference it (by anchor, or by its old or new DN), and
    /// the objects it began or stopped referencing. A change that repeats what the mirror holds
    /// marks nothing. A modify or move of an object the mirror does not hold fails the whole
    /// call with [`StateError::UnknownAnchor`]; a delete of one is ignored. An add of an anchor
    /// that an earlier change of the batch gave another DN fails it with
    /// [`StateError::DuplicateAnchor`].
    ///
    /// References are kept by anchor (see [`SourceMirror`]): a DN reference naming a mirrored
    /// object — before the batch, or by the end of it — is stored as an anchor reference (a
    /// modify's values too, so a value removed by DN finds it); one naming no mirrored object
    /// stays a DN until that object arrives. A delete removes the references to the object from
    /// its referrers (marked dirty); a rename or move changes no reference.
    fn apply_changes(
        &mut self,
        connector: &str,
        changes: &[Change],
        watermark: Option<&Watermark>,
    ) -> Result<(), StateError>;

    /// Begins a full import for `connector` and returns its generation. A full import that was
    /// begun and never finished is abandoned: what it upserted stays (it is newer data) and
    /// nothing is deleted on its account.
    fn begin_full_import(&mut self, connector: &str) -> Result<u64, StateError>;

    /// Upserts a batch of entries of full import `generation` (one transaction), marking dirty
    /// (as [`StateStore::apply_changes`] does, references resolved the same way) only the
    /// entries whose content changed: an entry delivered as last time is not looked at again,
    /// and one delivered differently but the same once its references are resolved (a
    /// referenced object's new DN) marks nothing.
    ///
    /// An entry whose anchor this import already delivered (in this batch or an earlier one) at
    /// another DN is a second object with the same anchor: the call fails with
    /// [`StateError::DuplicateAnchor`], naming both DNs, and applies nothing. The same object
    /// delivered again at the same DN is upserted as usual.
    fn import_entries(&mut self, generation: u64, entries: &[Entry]) -> Result<(), StateError>;

    /// Finishes full import `generation`: removes (and marks dirty) every mirrored object the
    /// import did not deliver, and commits `watermark` for `connector`, in one transaction.
    ///
    /// First it refuses with [`StateError::ImportTooSmall`] — deleting nothing, and leaving the
    /// import open so it can be finished again with a lower `min_share` — when the import
    /// delivered nothing while the mirror is not empty, or fewer than `min_share` × the
    /// mirrored objects.
    fn finish_full_import(
        &mut self,
        connector: &str,
        generation: u64,
        watermark: Option<&Watermark>,
        min_share: f64,
    ) -> Result<FullImportSummary, StateError>;

    /// The committed watermark of `connector`.
    fn watermark(&self, connector: &str) -> Result<Option<Watermark>, StateError>;

    /// Forgets the watermark of `connector` (it became invalid: the next import is full).
    fn clear_watermark(&mut self, connector: &str) -> Result<(), StateError>;

    // --- views for the planner ---

    /// Everything: the whole source mirror, every link and the whole target mirror.
    fn load_all(&self) -> Result<Views, StateError>;

    /// The neighbourhood of `anchors` for a delta plan, at a cost proportional to it, not to
    /// the store:
    ///
    /// * the entries of `anchors` and of the objects that reference them (the objects the
    ///   planner plans), with their links and the target objects of those links;
    /// * as context, the entries those objects reference (so DN references resolve and
    ///   references translate through their links) and the objects that reference them (so
    ///   `member_of` answers for them too), with their links.
    fn load_neighbourhood(&self, anchors: &[Anchor]) -> Result<Views, StateError>;

    /// The neighbourhood of `anchors` as [`StateStore::load_neighbourhood`] reads it, with the
    /// objects that reference them planned too ([`Reach::Referrers`]: that very
    /// neighbourhood), only the linked ones ([`Reach::LinkedReferrers`]) or none
    /// ([`Reach::Anchors`]). A referrer not planned is context: its entry and link, not its
    /// target object, nor what it references or what references it — so a group of 50,000
    /// members that references a page's objects does not bring its members into the page. The
    /// default loads the whole neighbourhood (which holds every narrower one).
    fn load_neighbourhood_reaching(
        &self,
        anchors: &[Anchor],
        reach: Reach,
    ) -> Result<Views, StateError> {
        let _ = reach;
        self.load_neighbourhood(anchors)
    }

    /// [`StateStore::load_neighbourhood_reaching`] with the context held light: an object that
    /// is not planned may come as its anchor, type and DN and, of its attributes, only the
    /// references it makes to the planned objects
    /// ([`SourceMirror::is_partial`](crate::delta::SourceMirror::is_partial)) — what
    /// reference translation and `member_of` read of it. A group of 50,000 members that
    /// references a page's objects then costs the page a scan of its members, not 50,000
    /// decoded values. The planner never decides such an object: the engine plans again with
    /// it planned. The default loads whole entries and marks what is not planned as context
    /// (a context object would otherwise be decided without its target object).
    fn load_neighbourhood_light(
        &self,
        anchors: &[Anchor],
        reach: Reach,
    ) -> Result<Views, StateError> {
        let whole = self.load_neighbourhood_reaching(anchors, reach)?;
        let mut planned: std::collections::BTreeSet<&Anchor> = anchors.iter().collect();
        if matches!(reach, Reach::Referrers | Reach::LinkedReferrers) {
            for a in anchors {
                for (r, _) in whole.mirror.referrers(a) {
                    if reach == Reach::Referrers || whole.links.get(r).is_some() {
                        planned.insert(r);
                    }
                }
            }
        }
        let mut mirror = SourceMirror::default();
        for e in whole.mirror.entries() {
            if planned.contains(&e.anchor) {
                mirror.insert(e.clone());
            } else {
                mirror.insert_partial(e.clone());
            }
        }
        Ok(Views {
            mirror,
            links: whole.links,
            target: whole.target,
        })
    }

    /// The objects that reference one of `anchors` (by anchor, or by the DN of its entry),
    /// sorted, each once and with whether it is linked: the referrers a delta plan of
    /// `anchors` may take in ([`PlanInput::unlinked_referrers`](crate::delta::PlanInput::unlinked_referrers)),
    /// read without their entries. The default reads the neighbourhood.
    fn referrers_linked(&self, anchors: &[Anchor]) -> Result<Vec<(Anchor, bool)>, StateError> {
        let views = self.load_neighbourhood_light(anchors, Reach::Anchors)?;
        let mut out: std::collections::BTreeMap<Anchor, bool> = Default::default();
        for a in anchors {
            for (r, _) in views.mirror.referrers(a) {
                out.insert(r.clone(), views.links.get(r).is_some());
            }
        }
        Ok(out.into_iter().collect())
    }

    /// Adds to `views` the target objects matching `lookups` (for joins of objects without a
    /// link), and the links to them, so a neighbourhood plan joins as a full plan would.
    fn load_join_candidates(
        &self,
        views: &mut Views,
        lookups: &[TargetLookup],
    ) -> Result<(), StateError>;

    /// Declares the attributes join lookups ask for, per target object type (the engine takes
    /// them from the rules' join groups). A store may then index only those values (the
    /// SQLite store does, rebuilding its index when the declaration changes); a lookup of an
    /// attribute not declared must still answer, if more slowly. The default does nothing.
    fn set_lookup_attributes(
        &mut self,
        attributes: &BTreeMap<ObjectType, std::collections::BTreeSet<AttrName>>,
    ) -> Result<(), StateError> {
        let _ = attributes;
        Ok(())
    }

    /// A page of the anchors a full plan considers — those of the source mirror and those
    /// linked (a linked object whose source object is gone is deprovisioned) — each once, in
    /// ascending order, the first `limit` after `after` (from the first when `None`). The default
    /// [`StateStore::full_plan_page`] pages through the store with it.
    fn anchors_page(&self, after: Option<&Anchor>, limit: usize)
        -> Result<Vec<Anchor>, StateError>;

    /// A page of a full plan: up to `limit` of the anchors a full plan considers (those
    /// [`StateStore::anchors_page`] gives, each once over the pages), after `mark` (from the
    /// first when `None`), with their neighbourhood held light
    /// ([`StateStore::load_neighbourhood_light`] reaching as far as `reach`), and the mark to
    /// go on from; `None` once no anchor is left. The pages come in the order the store reads
    /// fastest (the SQLite store: its rows' order): a full plan does not depend on it. The
    /// default pages by anchor.
    fn full_plan_page(
        &self,
        mark: Option<&PageMark>,
        limit: usize,
        reach: Reach,
    ) -> Result<Option<(Vec<Anchor>, Views, PageMark)>, StateError> {
        let after = match mark {
            None => None,
            Some(PageMark::Anchor(a)) => Some(a),
            Some(other) => {
                return Err(StateError::Invalid(format!(
                    "{other:?} is not a mark of this store's pages"
                )))
            }
        };
        let anchors = self.anchors_page(after, limit)?;
        let Some(last) = anchors.last().cloned() else {
            return Ok(None);
        };
        let views = self.load_neighbourhood_light(&anchors, reach)?;
        Ok(Some((anchors, views, PageMark::Anchor(last))))
    }

    /// The entry of `anchor`.
    fn source_entry(&self, anchor: &Anchor) -> Result<Option<Entry>, StateError>;

    /// The anchor of the entry at `dn` (compared as DNs compare).
    fn anchor_by_dn(&self, dn: &crate::model::Dn) -> Result<Option<Anchor>, StateError>;

    /// The number of links per target object type (what the deletion guard's limits are
    /// computed from, when the views hold only a neighbourhood).
    fn link_counts(&self) -> Result<BTreeMap<ObjectType, usize>, StateError>;

    // --- dirty set ---

    /// The dirty anchors, sorted.
    fn dirty(&self) -> Result<Vec<Anchor>, StateError>;

    /// A page of the dirty set: the first `limit` dirty anchors after `after` (from the first
    /// when `None`), in ascending order, each with whether it is linked (only a linked object
    /// can be deprovisioned). A large dirty set is planned and exported page by page with it.
    fn dirty_page(
        &self,
        after: Option<&Anchor>,
        limit: usize,
    ) -> Result<Vec<(Anchor, bool)>, StateError>;

    /// A page of the dirty set as [`dirty_page`](Self::dirty_page) pages it, each anchor with
    /// the anchors its source object references (sorted, each once; none for an anchor with no
    /// source object): by anchor, and by a DN that names a mirrored object. A run too large
    /// for one plan orders its pages with it, referenced objects first, so that a create finds
    /// the objects it references already made. The default reads each page's entries with
    /// [`source_entry`](Self::source_entry).
    fn dirty_references_page(
        &self,
        after: Option<&Anchor>,
        limit: usize,
    ) -> Result<Vec<(Anchor, Vec<Anchor>)>, StateError> {
        let mut out = Vec::new();
        for (anchor, _) in self.dirty_page(after, limit)? {
            let mut refs = Vec::new();
            if let Some(entry) = self.source_entry(&anchor)? {
                for (_, values) in entry.attributes.iter() {
                    for v in values {
                        match v {
                            Value::Reference(Reference::Anchor(a) | Reference::Pending(a)) => {
                                refs.push(a.clone())
                            }
                            Value::Reference(Reference::Dn(dn)) => {
                                refs.extend(self.anchor_by_dn(dn)?);
                            }
                            _ => {}
                        }
                    }
                }
            }
            refs.sort();
            refs.dedup();
            out.push((anchor, refs));
        }
        Ok(out)
    }

    /// Removes `anchors` from the dirty set (they were exported, or need nothing).
    fn clear_dirty(&mut self, anchors: &[Anchor]) -> Result<(), StateError>;

    /// Adds `anchors` to the dirty set.
    fn mark_dirty(&mut self, anchors: &[Anchor]) -> Result<(), StateError>;

    // --- export: journal, links, target mirror ---

    /// Journals `op` as intended, before it is sent; `sent` is the target operation it becomes.
    /// Returns the row's id. Fails with [`StateError::UnknownRun`] for a run never begun.
    fn journal_intent(
        &mut self,
        run: RunId,
        op: &Operation,
        sent: Option<&TargetOperation>,
    ) -> Result<JournalId, StateError>;

    /// Records that `op` took effect, in one transaction: the journal row becomes done (with the
    /// target id), the link is made (create, join) or forgotten (delete, unlink), and `sent` is
    /// applied to the target mirror. `target_id` is the id the target reported; it is required
    /// for a create.
    fn journal_done(
        &mut self,
        id: JournalId,
        op: &Operation,
        sent: Option<&TargetOperation>,
        target_id: Option<&TargetId>,
    ) -> Result<(), StateError>;

    /// Records that the journaled operation failed.
    fn journal_failed(
        &mut self,
        id: JournalId,
        error: &str,
        retryable: bool,
    ) -> Result<(), StateError>;

    /// Journals a batch of operations as intended, before any of them is sent: the group-commit
    /// form of [`StateStore::journal_intent`]. Returns their ids in order.
    ///
    /// Stores that can should do it in **one transaction** (all or none: a batch naming a run
    /// never begun journals nothing); the default journals them one by one, which keeps every
    /// promise but the single commit. Both shipped stores journal the batch whole.
    fn journal_intents(
        &mut self,
        run: RunId,
        ops: &[(&Operation, Option<&TargetOperation>)],
    ) -> Result<Vec<JournalId>, StateError> {
        ops.iter()
            .map(|(op, sent)| self.journal_intent(run, op, *sent))
            .collect()
    }

    /// Records the outcomes of journaled operations: the group-commit form of
    /// [`StateStore::journal_done`] and [`StateStore::journal_failed`], applied in order.
    ///
    /// Stores that can should do it in **one transaction** (all or none: if any outcome is
    /// invalid — an unknown journal id, a create's done without its target id — nothing of the
    /// batch is recorded, and the journal, links and target mirror are as before); the default
    /// records them one by one, which keeps every promise but the single commit. Both shipped
    /// stores record the batch whole.
    fn journal_outcomes(&mut self, outcomes: &[JournalOutcome<'_>]) -> Result<(), StateError> {
        for o in outcomes {
            match o {
                JournalOutcome::Done {
                    id,
                    op,
                    sent,
                    target_id,
                } => self.journal_done(*id, op, *sent, *target_id)?,
                JournalOutcome::Failed {
                    id,
                    error,
                    retryable,
                } => self.journal_failed(*id, error, *retryable)?,
            }
        }
        Ok(())
    }

    /// Records `outcomes` ([`StateStore::journal_outcomes`]), then journals `intents` as
    /// intended for `run` ([`StateStore::journal_intents`]; their ids in order): the export's
    /// group commit, outcomes of the batches that came back with the intents of the batches
    /// about to go.
    ///
    /// Stores that can should do both in **one transaction** (all or none); the default makes
    /// the two calls, which keeps every promise but the single commit. Both shipped stores
    /// commit once.
    fn journal_commit(
        &mut self,
        run: RunId,
        outcomes: &[JournalOutcome<'_>],
        intents: &[(&Operation, Option<&TargetOperation>)],
    ) -> Result<Vec<JournalId>, StateError> {
        if !outcomes.is_empty() {
            self.journal_outcomes(outcomes)?;
        }
        if intents.is_empty() {
            return Ok(Vec::new());
        }
        self.journal_intents(run, intents)
    }

    /// The operations journaled as intended and never confirmed done or failed (a crash came
    /// between sending and recording), oldest first.
    fn journal_unconfirmed(&self) -> Result<Vec<JournalEntry>, StateError>;

    /// The journal of `run`, or of every run, oldest first, as kept (done rows compact: see
    /// [`JournalRecord`]).
    fn journal(&self, run: Option<RunId>) -> Result<Vec<JournalRecord>, StateError>;

    /// Prunes the finished runs outside `retention` (judged at `now`) and their journal rows,
    /// in one transaction; never an intended row, the run it belongs to, or a run not finished.
    /// The default prunes nothing (a store that keeps everything keeps every promise).
    fn prune_journal(
        &mut self,
        retention: &Retention,
        now: DateTime<Utc>,
    ) -> Result<Pruned, StateError> {
        let _ = (retention, now);
        Ok(Pruned::default())
    }

    // --- target mirror (reconcile) ---

    /// Inserts or replaces target objects (as read from the target).
    fn put_target_objects(&mut self, objects: &[TargetObject]) -> Result<(), StateError>;

    /// Removes target objects (gone from the target), marking dirty the object linked to each
    /// and that object's referrers (the next plan re-creates it and repoints them).
    fn remove_target_objects(&mut self, ids: &[TargetId]) -> Result<(), StateError>;

    /// Whether the target mirror holds an object no link points at (one a new object may
    /// join).
    fn has_unlinked_target_objects(&self) -> Result<bool, StateError>;

    /// Every target object id, sorted.
    fn target_ids(&self) -> Result<Vec<TargetId>, StateError>;

    // --- escrow ---

    /// Holds `anchor` in escrow until `next_retry`, recording `error`; returns how many times
    /// in a row it has now failed.
    fn escrow(
        &mut self,
        anchor: &Anchor,
        error: &str,
        next_retry: DateTime<Utc>,
    ) -> Result<u32, StateError>;

    /// The escrowed anchors, sorted by anchor.
    fn escrowed(&self) -> Result<Vec<Escrow>, StateError>;

    /// Releases `anchor` from escrow (its export succeeded, or an administrator said so).
    fn release(&mut self, anchor: &Anchor) -> Result<(), StateError>;

    // --- runs ---

    /// Records the start of a run of `profile`.
    fn begin_run(&mut self, profile: &str, started: DateTime<Utc>) -> Result<RunId, StateError>;

    /// Records how a run ended, with its report as JSON. The shipped stores then prune the
    /// journal by their retention ([`StateStore::prune_journal`]), in the same transaction.
    fn finish_run(
        &mut self,
        run: RunId,
        finished: DateTime<Utc>,
        outcome: &str,
        report_json: &str,
    ) -> Result<(), StateError>;

    /// The `limit` most recent runs, newest first.
    fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, StateError>;

    // --- staging ---

    /// A number that changes whenever something a plan depends on changes — the source
    /// mirror, the dirty set, the links or the target mirror — and with nothing else (journal,
    /// escrow, runs and watermarks leave it). A staged plan carries it; applying the plan
    /// refuses when it moved.
    fn fingerprint(&self) -> Result<u64, StateError>;

    // --- containers ---

    /// Moves the subtrees of renamed or moved objects, before the changes that move them are
    /// applied: for each `(anchor, new DN)` in order, every mirrored object strictly below the
    /// DN `anchor` has in the mirror (or was given by an earlier pair) is moved to the same
    /// place below the new DN, and marked dirty as [`StateStore::apply_changes`] marks a
    /// changed object. The objects named themselves are not changed. One transaction; returns
    /// the objects moved.
    ///
    /// A directory reports a renamed container alone (its children's change numbers do not
    /// move), so without this the mirror would keep the children's old DNs. Repeating a call
    /// moves nothing more.
    fn move_subtrees(
        &mut self,
        moves: &[(Anchor, crate::model::Dn)],
    ) -> Result<Vec<Anchor>, StateError>;

    /// The container bindings the engine keeps between runs (see
    /// [`ContainerBindings`](crate::delta::ContainerBindings)); empty at first.
    fn container_bindings(&self) -> Result<crate::delta::ContainerBindings, StateError>;

    /// Replaces the container bindings.
    fn set_container_bindings(
        &mut self,
        bindings: &crate::delta::ContainerBindings,
    ) -> Result<(), StateError>;
}

/// The DN `dn` would have if its ancestor `from` moved to `to` (`None` when `dn` is not strictly
/// below `from`). Shared by the stores.
pub(crate) fn rebase_dn(
    dn: &crate::model::Dn,
    from: &crate::model::Dn,
    to: &crate::model::Dn,
) -> Option<crate::model::Dn> {
    if !dn.is_descendant_of(from) {
        return None;
    }
    let keep = dn.len() - from.len();
    Some(crate::model::Dn::from_rdns(
        dn.rdns().iter().take(keep).chain(to.rdns()).cloned(),
    ))
}

// --- helpers shared by the stores ---

/// The references of an entry: (attribute, referenced anchor or referenced DN).
pub(crate) enum RefTarget {
    /// By anchor (also pending references).
    Anchor(Anchor),
    /// By DN, normalized.
    Dn(String),
}

pub(crate) fn entry_references(entry: &Entry) -> Vec<(AttrName, RefTarget)> {
    let mut out = Vec::new();
    for (name, values) in entry.attributes.iter() {
        for v in values {
            match v {
                Value::Reference(Reference::Anchor(a))
                | Value::Reference(Reference::Pending(a)) => {
                    out.push((name.clone(), RefTarget::Anchor(a.clone())))
                }
                Value::Reference(Reference::Dn(dn)) => {
                    out.push((name.clone(), RefTarget::Dn(dn.normalized().to_owned())))
                }
                _ => {}
            }
        }
    }
    out
}

/// The operation as it may be stored: a create's secrets and redacted changes' values removed.
pub(crate) fn redact_operation(op: &Operation) -> Operation {
    redacted_operation(op).into_owned()
}

/// [`redact_operation`], copying `op` only when it holds something to remove.
pub(crate) fn redacted_operation(op: &Operation) -> Cow<'_, Operation> {
    let secret = match &op.kind {
        OperationKind::Create { secrets, .. } => !secrets.is_empty(),
        OperationKind::Join { changes, .. }
        | OperationKind::Update { changes, .. }
        | OperationKind::UpdateReferences { changes, .. }
        | OperationKind::Disable { changes, .. } => changes.iter().any(|c| c.redacted),
        OperationKind::Delete { .. } | OperationKind::Unlink { .. } => false,
    };
    if !secret {
        return Cow::Borrowed(op);
    }
    let mut op = op.clone();
    match &mut op.kind {
        OperationKind::Create { secrets, .. } => *secrets = Attributes::new(),
        OperationKind::Join { changes, .. }
        | OperationKind::Update { changes, .. }
        | OperationKind::UpdateReferences { changes, .. }
        | OperationKind::Disable { changes, .. } => redact_changes(changes),
        OperationKind::Delete { .. } | OperationKind::Unlink { .. } => {}
    }
    Cow::Owned(op)
}

fn redact_changes(changes: &mut [crate::model::AttributeChange]) {
    for c in changes.iter_mut().filter(|c| c.redacted) {
        c.values = Default::default();
        c.old = Default::default();
    }
}

/// The target operation as it may be stored: the create's secret attributes (named by `op`)
/// dropped, redacted changes without values.
pub(crate) fn redact_target_operation(op: &Operation, sent: &TargetOperation) -> TargetOperation {
    redacted_target_operation(op, sent).into_owned()
}

/// [`redact_target_operation`], copying `sent` only when it holds something to remove.
pub(crate) fn redacted_target_operation<'a>(
    op: &Operation,
    sent: &'a TargetOperation,
) -> Cow<'a, TargetOperation> {
    let secret = match (sent, &op.kind) {
        (TargetOperation::Create { attributes, .. }, OperationKind::Create { secrets, .. }) => {
            secrets
                .iter()
                .any(|(name, _)| attributes.get(name.as_str()).is_some())
        }
        (TargetOperation::Update { changes, .. }, _) => changes.iter().any(|c| c.redacted),
        _ => false,
    };
    if !secret {
        return Cow::Borrowed(sent);
    }
    let mut sent = sent.clone();
    match &mut sent {
        TargetOperation::Create { attributes, .. } => {
            if let OperationKind::Create { secrets, .. } = &op.kind {
                for (name, _) in secrets.iter() {
                    attributes.remove(name.as_str());
                }
            }
        }
        TargetOperation::Update { changes, .. } => redact_changes(changes),
        TargetOperation::Delete { .. } => {}
    }
    Cow::Owned(sent)
}

/// What `journal_done` does to the target mirror: the object id it applies `sent` to, and the
/// operation to apply with redacted changes skipped (their values are not kept) — `sent`
/// itself when it holds nothing redacted.
pub(crate) fn target_effect<'a>(
    op: &Operation,
    sent: &'a TargetOperation,
    target_id: Option<&TargetId>,
) -> Result<(TargetId, Cow<'a, TargetOperation>), StateError> {
    let id = match (target_id, sent.id()) {
        (Some(id), _) | (None, Some(id)) => id.clone(),
        (None, None) => {
            return Err(StateError::Invalid(format!(
                "journal_done for the {} of object {} needs the target id the target reported",
                op.kind.name(),
                op.anchor
            )))
        }
    };
    let mut effect = redacted_target_operation(op, sent);
    if let TargetOperation::Update { changes, .. } = effect.as_ref() {
        if changes.iter().any(|c| c.redacted) {
            if let TargetOperation::Update { changes, .. } = effect.to_mut() {
                changes.retain(|c| !c.redacted);
            }
        }
    }
    Ok((id, effect))
}

/// What recording `op` as done does: the target mirror's effect (see [`target_effect`]), the
/// link it makes, and the target id the journal records. Fails when `op` is a create and no
/// target id is given, or `sent` names no object.
pub(crate) type DoneEffect<'a> = (
    Option<(TargetId, Cow<'a, TargetOperation>)>,
    Option<TargetId>,
    Option<TargetId>,
);

/// The [`DoneEffect`] of `op` (shared by the stores; checked before anything is written).
pub(crate) fn done_effect<'a>(
    op: &Operation,
    sent: Option<&'a TargetOperation>,
    target_id: Option<&TargetId>,
) -> Result<DoneEffect<'a>, StateError> {
    let effect = match sent {
        Some(s) => Some(target_effect(op, s, target_id)?),
        None => None,
    };
    let link_to = link_target(op, target_id).cloned();
    if matches!(op.kind, OperationKind::Create { .. }) && link_to.is_none() {
        return Err(StateError::Invalid(format!(
            "journal_done for the create of object {} needs the new target id",
            op.anchor
        )));
    }
    let recorded = target_id
        .cloned()
        .or_else(|| effect.as_ref().map(|(id, _)| id.clone()))
        .or_else(|| link_to.clone());
    Ok((effect, link_to, recorded))
}

/// The target id of the link `op` makes when it succeeds (create, join), if any.
pub(crate) fn link_target<'a>(
    op: &'a Operation,
    target_id: Option<&'a TargetId>,
) -> Option<&'a TargetId> {
    match (&op.kind, target_id) {
        (OperationKind::Create { .. }, id) => id,
        (OperationKind::Join { .. }, Some(id)) => Some(id),
        (OperationKind::Join { target_id, .. }, None) => Some(target_id),
        _ => None,
    }
}

/// The target object whose link `op`'s success forgets (a delete's or an unlink's): the anchor's
/// link is removed only while it still points there — a changed target type links the anchor
/// to its new object before the old one is deprovisioned.
pub(crate) fn unlinks(op: &Operation) -> Option<&TargetId> {
    match &op.kind {
        OperationKind::Delete { target_id } | OperationKind::Unlink { target_id } => {
            Some(target_id)
        }
        _ => None,
    }
}

/// Checks the full-import guard.
pub(crate) fn check_import_share(
    seen: u64,
    mirrored: u64,
    min_share: f64,
) -> Result<(), StateError> {
    let share = if min_share.is_finite() {
        min_share.clamp(0.0, 1.0)
    } else {
        0.0
    };
    if (seen == 0 && mirrored > 0) || (seen as f64) < share * mirrored as f64 {
        return Err(StateError::ImportTooSmall { seen, mirrored });
    }
    Ok(())
}

/// The index key of a target value for join lookups: strings lower-cased, as
/// [`TargetMirror::find`] compares them.
pub(crate) fn lookup_key(v: &Value) -> Value {
    match v {
        Value::String(s) if s.chars().any(char::is_uppercase) => {
            Value::String(s.to_lowercase().into())
        }
        other => other.clone(),
    }
}

/// An entry's attributes in the compact JSON of [`encoding`](self::encoding), and its
/// [content hash](entry_hash_into).
pub(crate) fn encode_entry(entry: &Entry) -> Result<(String, u64), StateError> {
    let mut buf = Vec::with_capacity(64 + entry.attributes.len() * 32);
    encoding::encode_attributes_into(&entry.attributes, &mut buf);
    // The encoder writes UTF-8 only.
    let json = String::from_utf8(buf).map_err(|e| StateError::Serialize {
        what: format!("the attributes of entry {}", entry.anchor),
        detail: e.to_string(),
    })?;
    Ok((json, entry_hash_into(entry, &mut Vec::new())))
}

/// An entry's content hash — FNV-1a (64 bits) over its type, its DN as spelled and its
/// attributes in [`encoding::hash_form_into`]'s form, written to `buf` (a buffer the caller
/// reuses; cleared first). Both stores decide "changed" by this hash.
pub(crate) fn entry_hash_into(entry: &Entry, buf: &mut Vec<u8>) -> u64 {
    buf.clear();
    encoding::hash_form_into(&entry.attributes, buf);
    let mut h = fnv1a(FNV_OFFSET, entry.object_type.as_str().as_bytes());
    h = fnv1a(h, &[0]);
    if let Some(dn) = &entry.dn {
        h = fnv1a(h, dn.as_str().as_bytes());
    }
    h = fnv1a(h, &[0]);
    fnv1a(h, buf)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store without a light read of its own (the memory store) holds what a light
    /// neighbourhood does not plan as context, so the planner never decides it without its
    /// target object: the anchors planned, the referrers as far as the reach plans them.
    #[test]
    fn the_default_light_neighbourhood_holds_what_it_does_not_plan_as_context() {
        let mut s = MemoryStore::new();
        let dn = |d: &str| Dn::parse(d).unwrap();
        s.apply_changes(
            "ad",
            &[
                Change::Add(
                    Entry::new("u1", "user")
                        .with_dn(dn("cn=a,dc=x"))
                        .with("manager", Value::dn_ref(dn("cn=b,dc=x"))),
                ),
                Change::Add(Entry::new("u2", "user").with_dn(dn("cn=b,dc=x"))),
            ],
            None,
        )
        .unwrap();
        let (u1, u2): (Anchor, Anchor) = ("u1".into(), "u2".into());
        let v = s
            .load_neighbourhood_light(std::slice::from_ref(&u1), Reach::Anchors)
            .unwrap();
        assert!(!v.mirror.is_partial(&u1));
        assert!(v.mirror.is_partial(&u2), "what u1 references is context");
        let v = s
            .load_neighbourhood_light(std::slice::from_ref(&u2), Reach::Anchors)
            .unwrap();
        assert!(
            v.mirror.is_partial(&u1),
            "a referrer not planned is context"
        );
        let v = s
            .load_neighbourhood_light(std::slice::from_ref(&u2), Reach::Referrers)
            .unwrap();
        assert!(!v.mirror.is_partial(&u1) && !v.mirror.is_partial(&u2));
    }

    #[test]
    fn memory_store_keeps_the_contract() {
        testkit::store_contract(|| Box::new(MemoryStore::new()));
    }

    #[test]
    fn import_share_guard() {
        assert!(check_import_share(0, 0, 0.5).is_ok());
        assert!(check_import_share(0, 1, 0.0).is_err());
        assert!(check_import_share(5, 10, 0.5).is_ok());
        assert!(check_import_share(4, 10, 0.5).is_err());
        // Out-of-range shares are clamped; NaN checks nothing but the empty import.
        assert!(check_import_share(9, 10, 7.0).is_err());
        assert!(check_import_share(1, 10, f64::NAN).is_ok());
    }

    #[test]
    fn encode_entry_hash_sees_dn_spelling_and_content() {
        let dn = |s: &str| crate::model::Dn::parse(s).unwrap();
        let e = Entry::new("a", "user")
            .with_dn(dn("cn=Ann,dc=x"))
            .with("cn", "Ann");
        let h = |e: &Entry| encode_entry(e).unwrap().1;
        assert_eq!(h(&e), h(&e.clone()));
        assert_ne!(h(&e), h(&e.clone().with_dn(dn("cn=ann,dc=x"))));
        assert_ne!(h(&e), h(&e.clone().with("mail", "a@x")));
        assert_ne!(
            h(&e),
            h(&Entry {
                object_type: "group".into(),
                ..e.clone()
            })
        );
    }
}
