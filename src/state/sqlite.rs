//! [`SqliteStore`]: the embedded durable state store (feature `sqlite`), one SQLite file.
//!
//! The tables are meant to be read by an administrator with the `sqlite3` shell: payloads are
//! JSON (the mirrors' attributes in the compact form of [`encoding`](super::encoding), which
//! `json_extract` reads), times RFC 3339 text, states words. Every mutating call is one `IMMEDIATE` transaction;
//! every lookup the delta path makes goes through a primary key or an index (the tests check the
//! query plans), so a delta costs in proportion to its neighbourhood, not to the store.
//!
//! The journal is two tables: `journal`, one small row per operation (run, anchor, kind, state,
//! target id, the attributes an update changed as a JSON array, error), and `journal_payload`,
//! the planned and sent operations as JSON, kept only while the row is intended or failed
//! (see the [journal's promises](super#the-journal-what-it-keeps-and-for-how-long)). A batch of
//! intents or outcomes is one transaction ([`StateStore::journal_intents`],
//! [`StateStore::journal_outcomes`]): one commit, one fsync. Retention runs in
//! [`StateStore::finish_run`]'s transaction ([`SqliteStore::set_retention`]).
//!
//! `target_values` indexes target attribute values for join lookups: every attribute until the
//! engine declares the ones it looks up ([`StateStore::set_lookup_attributes`], kept in `meta`),
//! only those afterwards. Writing a target object changes only the keys that changed, computed
//! from the object it replaces.
//!
//! The schema is versioned with `PRAGMA user_version` and migrated forward on open, in one
//! transaction; a file written by a newer dirsync is refused.
//!
//! The file runs in WAL mode (readers do not block the writer) with foreign keys on and a busy
//! timeout of 10 s. Commits wait for the disk (`synchronous=FULL`) unless the caller opens the
//! file with [`Durability::Normal`]: the journal promises that a crash loses nothing, and one
//! fsync per transaction is what that costs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::encoding::{decode_attributes, encode_attributes};
use super::{
    audit_attributes, check_import_share, done_effect, encode_entry, encode_entry_into,
    entry_references, lookup_key, lower_lookup_attributes, redacted_operation,
    redacted_target_operation, unlinks, Escrow, FullImportSummary, JournalEntry, JournalId,
    JournalOutcome, JournalRecord, JournalState, LookupAttributes, Pruned, RefTarget, Retention,
    RunId, RunRecord, StateError, StateStore, TargetLookup, Views,
};
use crate::connector::{TargetOperation, Watermark};
use crate::delta::{
    remove_references_to, resolve_change_values, resolve_references, Link, Operation,
};
use crate::model::{
    Anchor, AttrName, Attributes, Change, Dn, Entry, ObjectType, TargetId, TargetObject, Value,
};

/// How hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=FULL` (the default): a commit returns once it is on disk, so a power loss
    /// or OS crash loses no committed journal row, link or watermark. Costs one fsync per
    /// transaction.
    #[default]
    Full,
    /// `synchronous=NORMAL`: in WAL mode the file is never corrupted, but a power loss or OS
    /// crash (not a process crash) may roll back the last committed transactions; an export
    /// repeated after that relies on the engine's idempotence (a create that collides joins).
    Normal,
}

/// The schema version this build writes.
const SCHEMA_VERSION: i64 = 5;

/// A migration's data step: work SQL cannot do, run in the migration's transaction.
type DataStep = fn(&Connection) -> Result<(), StateError>;

/// One schema migration: from `version - 1` to `version`.
struct Migration {
    version: i64,
    sql: &'static str,
    /// Work SQL cannot do (data that needs Rust to compute), run in the same transaction.
    after: Option<DataStep>,
}

/// Version 1: the tables.
const SCHEMA_V1: &str = r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
INSERT INTO meta (key, value) VALUES ('fingerprint', 0), ('generation', 0);
CREATE TABLE source_objects (
    anchor TEXT PRIMARY KEY,
    object_type TEXT NOT NULL,
    dn TEXT,
    dn_norm TEXT,
    attributes TEXT NOT NULL,
    content_hash INTEGER NOT NULL,
    generation INTEGER NOT NULL
);
CREATE INDEX source_objects_dn_norm ON source_objects (dn_norm);
CREATE TABLE source_refs (
    from_anchor TEXT NOT NULL,
    attribute TEXT NOT NULL,
    to_anchor TEXT,
    to_dn_norm TEXT
);
CREATE INDEX source_refs_from ON source_refs (from_anchor);
CREATE INDEX source_refs_to_anchor ON source_refs (to_anchor);
CREATE INDEX source_refs_to_dn_norm ON source_refs (to_dn_norm);
CREATE TABLE links (
    anchor TEXT PRIMARY KEY,
    source_type TEXT NOT NULL,
    target_id TEXT NOT NULL UNIQUE,
    target_type TEXT NOT NULL
);
CREATE TABLE target_objects (
    id TEXT PRIMARY KEY,
    object_type TEXT NOT NULL,
    attributes TEXT NOT NULL
);
CREATE TABLE dirty (anchor TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    profile TEXT NOT NULL,
    started TEXT NOT NULL,
    finished TEXT,
    outcome TEXT,
    report TEXT
);
CREATE TABLE journal (
    id INTEGER PRIMARY KEY,
    run INTEGER NOT NULL REFERENCES runs (id),
    anchor TEXT NOT NULL,
    kind TEXT NOT NULL,
    op TEXT NOT NULL,
    sent TEXT,
    state TEXT NOT NULL CHECK (state IN ('intended', 'done', 'failed')),
    target_id TEXT,
    error TEXT,
    retryable INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX journal_run ON journal (run);
CREATE INDEX journal_intended ON journal (state) WHERE state = 'intended';
CREATE TABLE watermarks (connector TEXT PRIMARY KEY, kind TEXT NOT NULL, data BLOB NOT NULL);
CREATE TABLE escrow (
    anchor TEXT PRIMARY KEY,
    attempts INTEGER NOT NULL,
    next_retry TEXT NOT NULL,
    last_error TEXT NOT NULL
);
"#;

/// Version 2: link counts kept by triggers (the deletion guard reads them without counting
/// the link table), and an index of target attribute values for join lookups.
const SCHEMA_V2: &str = r#"
CREATE TABLE link_counts (target_type TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO link_counts (target_type, n) SELECT target_type, COUNT(*) FROM links GROUP BY target_type;
CREATE TRIGGER links_count_insert AFTER INSERT ON links BEGIN
    INSERT INTO link_counts (target_type, n) VALUES (NEW.target_type, 1)
        ON CONFLICT (target_type) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER links_count_delete AFTER DELETE ON links BEGIN
    UPDATE link_counts SET n = n - 1 WHERE target_type = OLD.target_type;
END;
CREATE TRIGGER links_count_update AFTER UPDATE OF target_type ON links BEGIN
    UPDATE link_counts SET n = n - 1 WHERE target_type = OLD.target_type;
    INSERT INTO link_counts (target_type, n) VALUES (NEW.target_type, 1)
        ON CONFLICT (target_type) DO UPDATE SET n = n + 1;
END;
CREATE TABLE target_values (
    attribute TEXT NOT NULL,
    value_key TEXT NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (attribute, value_key, id)
) WITHOUT ROWID;
CREATE INDEX target_values_id ON target_values (id);
"#;

static MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: SCHEMA_V1,
        after: None,
    },
    Migration {
        version: 2,
        sql: SCHEMA_V2,
        after: Some(rebuild_target_values),
    },
    Migration {
        version: 3,
        sql: SCHEMA_V3,
        after: None,
    },
    Migration {
        version: 4,
        sql: SCHEMA_V4,
        after: Some(compact_mirrors),
    },
    Migration {
        version: 5,
        sql: SCHEMA_V5,
        after: Some(compact_done_rows),
    },
];

/// Version 3: references are kept by anchor (no table changes; the DN references that name
/// mirrored objects are resolved, as an import now does, by version 4's data step — which runs
/// after this one whenever this one runs, and reads the mirrors in their new form).
const SCHEMA_V3: &str = "";

/// Version 5: a lean journal. The payloads (the planned operation `op` and the target operation
/// `sent`, as JSON) move to `journal_payload`, kept while a row is intended or failed and
/// deleted when it is done; a journal row keeps run, anchor, kind, state, target id, the names
/// of the attributes an update changed, error. (Payloads in the row itself, shrunk once done,
/// would leave each page of a batch nearly empty: SQLite merges pages on deletes, not on
/// updates.) The data step compacts the rows already done. The target value index loses its
/// index by id (as large as the index: an object's old keys are computed from the object
/// instead); it is narrowed to the declared lookup attributes when the engine first declares
/// them.
const SCHEMA_V5: &str = r#"
ALTER TABLE journal RENAME TO journal_v4;
CREATE TABLE journal (
    id INTEGER PRIMARY KEY,
    run INTEGER NOT NULL REFERENCES runs (id),
    anchor TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('intended', 'done', 'failed')),
    target_id TEXT,
    attributes TEXT,
    error TEXT,
    retryable INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE journal_payload (
    id INTEGER PRIMARY KEY REFERENCES journal (id) ON DELETE CASCADE,
    op TEXT NOT NULL,
    sent TEXT
);
INSERT INTO journal (id, run, anchor, kind, state, target_id, error, retryable)
    SELECT id, run, anchor, kind, state, target_id, error, retryable FROM journal_v4;
INSERT INTO journal_payload (id, op, sent)
    SELECT id, op, sent FROM journal_v4 WHERE state <> 'done';
DROP INDEX target_values_id;
"#;

/// Version 4: compact mirrors. Attributes are stored in the compact JSON of
/// [`encoding`](super::encoding) (re-encoded by the data step); the target mirror is keyed by
/// id without a separate rowid (the source mirror keeps its rows in arrival order, so an
/// import appends instead of writing all over the table); a source object's content hash and
/// the generation of the
/// last full import that saw it move to the narrow `source_state`, so a full import that finds
/// an object unchanged rewrites a few bytes, not the object. Its rows are in the order objects
/// first arrived (a rowid), which is the order a source delivers them again: the generations a
/// batch of an import updates share a few pages.
const SCHEMA_V4: &str = r#"
CREATE TABLE source_state (
    id INTEGER PRIMARY KEY,
    anchor TEXT NOT NULL UNIQUE,
    content_hash INTEGER NOT NULL,
    generation INTEGER NOT NULL
);
CREATE TABLE source_objects_v4 (
    anchor TEXT PRIMARY KEY,
    object_type TEXT NOT NULL,
    dn TEXT,
    dn_norm TEXT,
    attributes TEXT NOT NULL
);
CREATE TABLE target_objects_v4 (
    id TEXT PRIMARY KEY,
    object_type TEXT NOT NULL,
    attributes TEXT NOT NULL
) WITHOUT ROWID;
"#;

/// Version 4's last step, once the data step filled the new tables.
const SCHEMA_V4_SWAP: &str = r#"
DROP TABLE source_objects;
ALTER TABLE source_objects_v4 RENAME TO source_objects;
CREATE INDEX source_objects_dn_norm ON source_objects (dn_norm);
DROP TABLE target_objects;
ALTER TABLE target_objects_v4 RENAME TO target_objects;
"#;

// The statements of the delta path; the tests check each uses an index.
const ENTRY_COLUMNS: &str = "anchor, object_type, dn, attributes";
const ENTRY_BY_ANCHOR: &str =
    "SELECT anchor, object_type, dn, attributes FROM source_objects WHERE anchor = ?1";
const ENTRY_BY_DN: &str =
    "SELECT anchor, object_type, dn, attributes FROM source_objects WHERE dn_norm = ?1 ORDER BY anchor";
const ANCHORS_BY_DN: &str = "SELECT anchor FROM source_objects WHERE dn_norm = ?1";
const ROW_STATE: &str = "SELECT s.content_hash, s.generation, o.dn_norm FROM source_state s \
     JOIN source_objects o ON o.anchor = s.anchor WHERE s.anchor = ?1";
const SEEN_STATE: &str = "SELECT id, content_hash, generation FROM source_state WHERE anchor = ?1";
const REFERRERS: &str = "SELECT from_anchor FROM source_refs WHERE to_anchor = ?1 \
     UNION SELECT from_anchor FROM source_refs WHERE to_dn_norm = ?2";
const REFS_FROM: &str =
    "SELECT attribute, to_anchor, to_dn_norm FROM source_refs WHERE from_anchor = ?1";
const WAITING: &str = "SELECT DISTINCT from_anchor FROM source_refs WHERE to_dn_norm = ?1";
const REFERRING: &str = "SELECT DISTINCT from_anchor FROM source_refs WHERE to_anchor = ?1";
/// The references to objects (by anchor) of the dirty anchors from `?1` to `?2`.
const DIRTY_REFERENCES: &str = "SELECT d.anchor, r.to_anchor FROM dirty d \
     JOIN source_refs r ON r.from_anchor = d.anchor \
     WHERE d.anchor BETWEEN ?1 AND ?2 AND r.to_anchor IS NOT NULL";
const LINK_BY_ANCHOR: &str =
    "SELECT anchor, source_type, target_id, target_type FROM links WHERE anchor = ?1";
const LINK_BY_TARGET: &str =
    "SELECT anchor, source_type, target_id, target_type FROM links WHERE target_id = ?1";
const TARGET_BY_ID: &str = "SELECT id, object_type, attributes FROM target_objects WHERE id = ?1";
const TARGET_LOOKUP: &str = "SELECT id FROM target_values WHERE attribute = ?1 AND value_key = ?2";

/// The statements of the delta path (for the query-plan test).
#[cfg(test)]
pub(crate) const INDEXED_QUERIES: &[&str] = &[
    ENTRY_BY_ANCHOR,
    ENTRY_BY_DN,
    ANCHORS_BY_DN,
    ROW_STATE,
    SEEN_STATE,
    REFERRERS,
    REFS_FROM,
    WAITING,
    REFERRING,
    DIRTY_REFERENCES,
    LINK_BY_ANCHOR,
    LINK_BY_TARGET,
    TARGET_BY_ID,
    TARGET_LOOKUP,
    "DELETE FROM source_refs WHERE from_anchor = ?1",
    "DELETE FROM target_values WHERE attribute = ?1 AND value_key = ?2 AND id = ?3",
    "DELETE FROM links WHERE anchor = ?1 OR target_id = ?2",
    "SELECT 1 FROM runs WHERE id = ?1",
    "DELETE FROM journal WHERE run = ?1 AND state <> 'intended'",
    "DELETE FROM journal_payload WHERE id = ?1",
    JOURNAL_DONE,
    UNCONFIRMED,
    "UPDATE source_state SET generation = ?2 WHERE id = ?1",
    "UPDATE source_state SET generation = ?2 WHERE anchor = ?1",
];

const JOURNAL_DONE: &str = "UPDATE journal SET state = 'done', target_id = ?2, attributes = ?3, \
     error = NULL, retryable = 0 WHERE id = ?1";
const UNCONFIRMED: &str = "SELECT j.id, j.run, p.op, p.sent, j.state, j.target_id, j.error, \
     j.retryable FROM journal j LEFT JOIN journal_payload p ON p.id = j.id \
     WHERE j.state = 'intended' ORDER BY j.id";

/// Values longer than this are not indexed for join lookups (a lookup of one scans).
const MAX_INDEXED_VALUE: usize = 256;

/// The durable state store in one SQLite file. See [`StateStore`] for what each call does.
///
/// ```
/// use dirsync::model::{Change, Entry};
/// use dirsync::connector::Watermark;
/// use dirsync::state::{SqliteStore, StateStore};
/// let dir = std::env::temp_dir().join(format!("dirsync-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("state.db");
/// {
///     let mut store = SqliteStore::open(&path)?;
///     let w = Watermark::new("usn", b"42".to_vec());
///     store.apply_changes("ldap", &[Change::Add(Entry::new("a1", "user"))], Some(&w))?;
/// }
/// let store = SqliteStore::open(&path)?;
/// assert_eq!(store.dirty()?, ["a1".into()]);
/// assert!(store.watermark("ldap")?.is_some());
/// # drop(store); std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), dirsync::state::StateError>(())
/// ```
pub struct SqliteStore {
    conn: Connection,
    /// Applied at every [`StateStore::finish_run`]; `None`: keep everything.
    retention: Option<Retention>,
    /// The declared lookup attributes (kept in `meta`); `None` until declared: every attribute
    /// is indexed.
    lookup: Option<LookupAttributes>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.conn.path())
            .finish()
    }
}

/// Attaches what the store was doing to a SQLite error.
trait Ctx<T> {
    fn ctx(self, context: &str) -> Result<T, StateError>;
}

impl<T> Ctx<T> for rusqlite::Result<T> {
    fn ctx(self, context: &str) -> Result<T, StateError> {
        self.map_err(|source| StateError::Sqlite {
            context: context.to_owned(),
            source,
        })
    }
}

/// An open full import, kept in `meta` under `full_import`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Session {
    connector: String,
    summary: FullImportSummary,
}

/// Decodes rows (JSON payloads) on all cores when the `parallel` feature is on.
fn decode_rows<T: Send>(
    rows: Vec<Vec<SqlValue>>,
    decode: impl Fn(Vec<SqlValue>) -> Result<T, StateError> + Sync + Send,
) -> Result<Vec<T>, StateError> {
    #[cfg(feature = "parallel")]
    {
        use rayon::prelude::*;
        rows.into_par_iter().map(decode).collect()
    }
    #[cfg(not(feature = "parallel"))]
    {
        rows.into_iter().map(decode).collect()
    }
}

impl SqliteStore {
    /// Opens (or creates) the state file at `path` with [`Durability::Full`], migrating its
    /// schema to this version.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore, StateError> {
        SqliteStore::open_with(path, Durability::Full)
    }

    /// Opens (or creates) the state file at `path` with the given durability.
    pub fn open_with(
        path: impl AsRef<Path>,
        durability: Durability,
    ) -> Result<SqliteStore, StateError> {
        let path = path.as_ref();
        let conn =
            Connection::open(path).ctx(&format!("opening the state file {}", path.display()))?;
        SqliteStore::setup(conn, durability)
    }

    /// A store in memory (nothing persists; for tests).
    pub fn open_in_memory() -> Result<SqliteStore, StateError> {
        let conn = Connection::open_in_memory().ctx("opening an in-memory state store")?;
        SqliteStore::setup(conn, Durability::Full)
    }

    fn setup(conn: Connection, durability: Durability) -> Result<SqliteStore, StateError> {
        conn.busy_timeout(Duration::from_secs(10))
            .ctx("setting the busy timeout")?;
        conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
            .ctx("switching to WAL mode")?;
        let sync = match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)
            .ctx("setting synchronous")?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .ctx("enabling foreign keys")?;
        // A 64 MiB page cache and memory-mapped reads: a delta's neighbourhood is scattered
        // over the file, and a 100k-object store outgrows SQLite's 2 MiB default.
        conn.pragma_update(None, "cache_size", -65536)
            .ctx("setting the page cache size")?;
        conn.pragma_update(None, "mmap_size", 268_435_456i64)
            .ctx("setting the memory-mapped I/O size")?;
        let mut store = SqliteStore {
            conn,
            retention: Some(Retention::default()),
            lookup: None,
        };
        store.migrate()?;
        store.lookup = lookup_attributes(&store.conn)?;
        Ok(store)
    }

    /// Sets the journal retention applied at every [`StateStore::finish_run`] (the default is
    /// [`Retention::default`]); `None` keeps every run and journal row.
    pub fn set_retention(&mut self, retention: Option<Retention>) {
        self.retention = retention;
    }

    /// The journal retention applied at every [`StateStore::finish_run`].
    pub fn retention(&self) -> Option<Retention> {
        self.retention
    }

    /// The schema version of the open file.
    pub fn schema_version(&self) -> Result<i64, StateError> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .ctx("reading the schema version")
    }

    /// The newest schema version this build reads and writes.
    pub fn supported_schema_version() -> i64 {
        SCHEMA_VERSION
    }

    fn migrate(&mut self) -> Result<(), StateError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Exclusive)
            .ctx("starting the schema migration")?;
        let found: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .ctx("reading the schema version")?;
        if found > SCHEMA_VERSION {
            return Err(StateError::SchemaTooNew {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        let oldest = MIGRATIONS.first().map(|m| m.version - 1).unwrap_or(0);
        if found < oldest {
            return Err(StateError::SchemaTooOld {
                found,
                supported: oldest,
            });
        }
        if found == 0 {
            let tables: i64 = tx
                .query_row(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'",
                    [],
                    |r| r.get(0),
                )
                .ctx("inspecting a new state file")?;
            if tables > 0 {
                return Err(StateError::Invalid(
                    "the file holds tables but is not a dirsync state file (its user_version is 0): \
                     name another file for the state store"
                        .into(),
                ));
            }
        }
        for m in MIGRATIONS.iter().filter(|m| m.version > found) {
            tx.execute_batch(m.sql)
                .ctx(&format!("migrating the schema to version {}", m.version))?;
            if let Some(after) = m.after {
                after(&tx)?;
            }
            tx.pragma_update(None, "user_version", m.version)
                .ctx("recording the schema version")?;
        }
        tx.commit().ctx("committing the schema migration")?;
        if (1..5).contains(&found) {
            // The compacted journal left free pages: give them back to the file system, once.
            self.conn
                .execute_batch("VACUUM")
                .ctx("compacting the state file after the migration")?;
        }
        Ok(())
    }

    /// Runs `f` in one immediate transaction.
    ///
    /// Emits the trace event `state: committing` (field `what`) after `f`'s work and before
    /// the commit: a stable message, on which `tests/crash.rs` kills the process inside the
    /// transaction.
    fn write<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .ctx(&format!("{what}: starting a transaction"))?;
        let out = f(&tx)?;
        tracing::trace!(what, "state: committing");
        tx.commit().ctx(&format!("{what}: committing"))?;
        Ok(out)
    }
}

// --- row decoding ---

fn corrupt(table: &'static str, key: &str, detail: impl Into<String>) -> StateError {
    StateError::Corrupt {
        table,
        key: key.to_owned(),
        detail: detail.into(),
    }
}

fn text(table: &'static str, key: &str, column: &str, v: SqlValue) -> Result<String, StateError> {
    match v {
        SqlValue::Text(s) => Ok(s),
        other => Err(corrupt(
            table,
            key,
            format!("column {column} holds {:?}, not text", other.data_type()),
        )),
    }
}

fn opt_text(
    table: &'static str,
    key: &str,
    column: &str,
    v: SqlValue,
) -> Result<Option<String>, StateError> {
    match v {
        SqlValue::Null => Ok(None),
        other => text(table, key, column, other).map(Some),
    }
}

fn int(table: &'static str, key: &str, column: &str, v: SqlValue) -> Result<i64, StateError> {
    match v {
        SqlValue::Integer(i) => Ok(i),
        other => Err(corrupt(
            table,
            key,
            format!(
                "column {column} holds {:?}, not an integer",
                other.data_type()
            ),
        )),
    }
}

fn json<T: DeserializeOwned>(
    table: &'static str,
    key: &str,
    column: &str,
    s: &str,
) -> Result<T, StateError> {
    serde_json::from_str(s).map_err(|e| corrupt(table, key, format!("column {column}: {e}")))
}

fn to_json<T: Serialize>(what: &str, v: &T) -> Result<String, StateError> {
    serde_json::to_string(v).map_err(|e| StateError::Serialize {
        what: what.to_owned(),
        detail: e.to_string(),
    })
}

fn time_text(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn parse_time(
    table: &'static str,
    key: &str,
    column: &str,
    s: &str,
) -> Result<DateTime<Utc>, StateError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| corrupt(table, key, format!("column {column}: {e}")))
}

/// Reads every row of a prepared query as raw values.
fn rows(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    what: &str,
) -> Result<Vec<Vec<SqlValue>>, StateError> {
    let mut stmt = conn.prepare_cached(sql).ctx(what)?;
    let n = stmt.column_count();
    let mapped = stmt.query_map(params, |r| raw_row(r, n)).ctx(what)?;
    mapped.collect::<Result<Vec<_>, _>>().ctx(what)
}

/// The first `n` columns of a row as raw values.
fn raw_row(r: &rusqlite::Row<'_>, n: usize) -> rusqlite::Result<Vec<SqlValue>> {
    (0..n).map(|i| r.get::<_, SqlValue>(i)).collect()
}

fn take(row: &mut [SqlValue], i: usize) -> SqlValue {
    row.get_mut(i)
        .map(|v| std::mem::replace(v, SqlValue::Null))
        .unwrap_or(SqlValue::Null)
}

/// A source object's row ([`ENTRY_COLUMNS`], in order) as an entry.
fn decode_entry(mut row: Vec<SqlValue>) -> Result<Entry, StateError> {
    const T: &str = "source_objects";
    let anchor = text(T, "?", "anchor", take(&mut row, 0))?;
    let object_type = text(T, &anchor, "object_type", take(&mut row, 1))?;
    let dn = opt_text(T, &anchor, "dn", take(&mut row, 2))?;
    let attributes = text(T, &anchor, "attributes", take(&mut row, 3))?;
    decode_entry_parts(&anchor, &object_type, dn.as_deref(), &attributes)
}

/// A source object from its columns ([`ENTRY_COLUMNS`]) as SQLite holds them: what every
/// read of the source mirror decodes with (a reader stepping through rows may pass the
/// borrowed column text, copying nothing). Errors are [`StateError::Corrupt`] naming the anchor.
fn decode_entry_parts(
    anchor: &str,
    object_type: &str,
    dn: Option<&str>,
    attributes: &str,
) -> Result<Entry, StateError> {
    const T: &str = "source_objects";
    let dn = match dn {
        Some(d) => Some(Dn::parse(d).map_err(|e| corrupt(T, anchor, format!("column dn: {e}")))?),
        None => None,
    };
    let attributes = decode_attributes(attributes)
        .map_err(|e| corrupt(T, anchor, format!("column attributes: {e}")))?;
    Ok(Entry {
        anchor: Anchor::from(anchor),
        object_type: ObjectType::from(object_type),
        dn,
        attributes,
    })
}

fn decode_link(mut row: Vec<SqlValue>) -> Result<Link, StateError> {
    const T: &str = "links";
    let anchor = text(T, "?", "anchor", take(&mut row, 0))?;
    Ok(Link {
        source_type: text(T, &anchor, "source_type", take(&mut row, 1))?.into(),
        target_id: text(T, &anchor, "target_id", take(&mut row, 2))?.into(),
        target_type: text(T, &anchor, "target_type", take(&mut row, 3))?.into(),
        anchor: anchor.into(),
    })
}

fn decode_target(mut row: Vec<SqlValue>) -> Result<TargetObject, StateError> {
    const T: &str = "target_objects";
    let id = text(T, "?", "id", take(&mut row, 0))?;
    let object_type = text(T, &id, "object_type", take(&mut row, 1))?;
    let attributes = text(T, &id, "attributes", take(&mut row, 2))?;
    let attributes = decode_attributes(&attributes)
        .map_err(|e| corrupt(T, &id, format!("column attributes: {e}")))?;
    Ok(TargetObject {
        id: id.into(),
        object_type: object_type.into(),
        attributes,
    })
}

fn decode_journal(mut row: Vec<SqlValue>) -> Result<JournalEntry, StateError> {
    const T: &str = "journal";
    let id = int(T, "?", "id", take(&mut row, 0))?;
    let key = id.to_string();
    let run = int(T, &key, "run", take(&mut row, 1))?;
    // An intended row always has its payload (a missing one is corrupt: NULL is no text).
    let op = text(T, &key, "op", take(&mut row, 2))?;
    let sent = opt_text(T, &key, "sent", take(&mut row, 3))?;
    let state = text(T, &key, "state", take(&mut row, 4))?;
    let target_id = opt_text(T, &key, "target_id", take(&mut row, 5))?;
    let error = opt_text(T, &key, "error", take(&mut row, 6))?;
    let retryable = int(T, &key, "retryable", take(&mut row, 7))?;
    Ok(JournalEntry {
        id: JournalId(id),
        run: RunId(run),
        operation: json(T, &key, "op", &op)?,
        sent: match sent {
            Some(s) => Some(json(T, &key, "sent", &s)?),
            None => None,
        },
        state: JournalState::parse(&state)
            .ok_or_else(|| corrupt(T, &key, format!("column state holds {state:?}")))?,
        target_id: target_id.map(TargetId::from),
        error,
        retryable: retryable != 0,
    })
}

const JOURNAL_RECORDS: &str = "SELECT j.id, j.run, j.anchor, j.kind, j.state, j.target_id, \
     j.attributes, j.error, j.retryable, p.op, p.sent \
     FROM journal j LEFT JOIN journal_payload p ON p.id = j.id";

fn decode_record(mut row: Vec<SqlValue>) -> Result<JournalRecord, StateError> {
    const T: &str = "journal";
    let id = int(T, "?", "id", take(&mut row, 0))?;
    let key = id.to_string();
    let k = key.as_str();
    let state = text(T, k, "state", take(&mut row, 4))?;
    let attributes: Vec<AttrName> = match opt_text(T, k, "attributes", take(&mut row, 6))? {
        Some(a) => json(T, k, "attributes", &a)?,
        None => Vec::new(),
    };
    Ok(JournalRecord {
        id: JournalId(id),
        run: RunId(int(T, k, "run", take(&mut row, 1))?),
        anchor: text(T, k, "anchor", take(&mut row, 2))?.into(),
        kind: text(T, k, "kind", take(&mut row, 3))?,
        state: JournalState::parse(&state)
            .ok_or_else(|| corrupt(T, k, format!("column state holds {state:?}")))?,
        target_id: opt_text(T, k, "target_id", take(&mut row, 5))?.map(TargetId::from),
        attributes,
        error: opt_text(T, k, "error", take(&mut row, 7))?,
        retryable: int(T, k, "retryable", take(&mut row, 8))? != 0,
        operation: match opt_text(T, k, "op", take(&mut row, 9))? {
            Some(o) => Some(json(T, k, "op", &o)?),
            None => None,
        },
        sent: match opt_text(T, k, "sent", take(&mut row, 10))? {
            Some(o) => Some(json(T, k, "sent", &o)?),
            None => None,
        },
    })
}

// --- reading helpers (work on a connection or a transaction) ---

fn load_entry(conn: &Connection, anchor: &Anchor) -> Result<Option<Entry>, StateError> {
    rows(
        conn,
        ENTRY_BY_ANCHOR,
        [anchor.as_str()],
        "reading a source object",
    )?
    .into_iter()
    .next()
    .map(decode_entry)
    .transpose()
}

fn load_link(conn: &Connection, anchor: &Anchor) -> Result<Option<Link>, StateError> {
    rows(conn, LINK_BY_ANCHOR, [anchor.as_str()], "reading a link")?
        .into_iter()
        .next()
        .map(decode_link)
        .transpose()
}

fn load_target(conn: &Connection, id: &TargetId) -> Result<Option<TargetObject>, StateError> {
    rows(conn, TARGET_BY_ID, [id.as_str()], "reading a target object")?
        .into_iter()
        .next()
        .map(decode_target)
        .transpose()
}

/// The anchors (first column) a query on `table` by `key` returns.
fn anchor_rows(
    conn: &Connection,
    (sql, table, column): (&str, &'static str, &str),
    key: &str,
) -> Result<Vec<Anchor>, StateError> {
    rows(conn, sql, [key], &format!("reading {table}"))?
        .into_iter()
        .map(|mut r| text(table, key, column, take(&mut r, 0)).map(Anchor::from))
        .collect()
}

fn anchors_at(conn: &Connection, dn_norm: &str) -> Result<Vec<Anchor>, StateError> {
    anchor_rows(conn, (ANCHORS_BY_DN, "source_objects", "anchor"), dn_norm)
}

fn referrers(
    conn: &Connection,
    anchor: &Anchor,
    dn_norm: Option<&str>,
) -> Result<Vec<Anchor>, StateError> {
    rows(
        conn,
        REFERRERS,
        params![anchor.as_str(), dn_norm],
        "reading referrers",
    )?
    .into_iter()
    .map(|mut r| {
        text(
            "source_refs",
            anchor.as_str(),
            "from_anchor",
            take(&mut r, 0),
        )
        .map(Anchor::from)
    })
    .collect()
}

/// The rows of a page query (`?1`: the anchor the page starts after, `?2`: its size).
fn page_rows<T>(
    conn: &Connection,
    sql: &str,
    (after, limit): (Option<&Anchor>, usize),
    what: &str,
    row: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, StateError> {
    let mut stmt = conn.prepare_cached(sql).ctx(what)?;
    let after = after.map_or("", |a| a.as_str());
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut q = stmt.query(params![after, limit]).ctx(what)?;
    let mut out = Vec::new();
    while let Some(r) = q.next().ctx(what)? {
        out.push(row(r).ctx(what)?);
    }
    Ok(out)
}

fn meta_int(conn: &Connection, key: &str) -> Result<i64, StateError> {
    let v: Option<SqlValue> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")
        .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
        .ctx("reading meta")?;
    match v {
        Some(v) => int("meta", key, "value", v),
        None => Err(corrupt("meta", key, "row missing")),
    }
}

fn bump(conn: &Connection) -> Result<(), StateError> {
    conn.prepare_cached("UPDATE meta SET value = value + 1 WHERE key = 'fingerprint'")
        .and_then(|mut s| s.execute([]))
        .ctx("moving the fingerprint")?;
    Ok(())
}

fn session(conn: &Connection) -> Result<Option<Session>, StateError> {
    let v: Option<SqlValue> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'full_import'")
        .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
        .ctx("reading the open full import")?;
    match v {
        None => Ok(None),
        Some(v) => {
            let s = text("meta", "full_import", "value", v)?;
            json("meta", "full_import", "value", &s).map(Some)
        }
    }
}

fn set_session(conn: &Connection, s: Option<&Session>) -> Result<(), StateError> {
    match s {
        Some(s) => {
            let j = to_json("the open full import", s)?;
            conn.prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('full_import', ?1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .and_then(|mut st| st.execute([j]))
            .ctx("recording the open full import")?;
        }
        None => {
            conn.execute("DELETE FROM meta WHERE key = 'full_import'", [])
                .ctx("closing the full import")?;
        }
    }
    Ok(())
}

fn put_watermark(conn: &Connection, connector: &str, w: &Watermark) -> Result<(), StateError> {
    conn.prepare_cached(
        "INSERT INTO watermarks (connector, kind, data) VALUES (?1, ?2, ?3) \
         ON CONFLICT (connector) DO UPDATE SET kind = excluded.kind, data = excluded.data",
    )
    .and_then(|mut s| s.execute(params![connector, w.kind, w.data]))
    .ctx("committing a watermark")?;
    Ok(())
}

fn mark(conn: &Connection, anchors: impl IntoIterator<Item = Anchor>) -> Result<usize, StateError> {
    let mut stmt = conn
        .prepare_cached("INSERT OR IGNORE INTO dirty (anchor) VALUES (?1)")
        .ctx("marking dirty")?;
    let mut n = 0;
    for a in anchors {
        n += stmt.execute([a.as_str()]).ctx("marking dirty")?;
    }
    Ok(n)
}

/// The stored state of a source row.
struct RowState {
    hash: i64,
    generation: i64,
    dn_norm: Option<String>,
}

fn row_state(conn: &Connection, anchor: &Anchor) -> Result<Option<RowState>, StateError> {
    const T: &str = "source_objects";
    let Some(mut r) = rows(
        conn,
        ROW_STATE,
        [anchor.as_str()],
        "reading a source object",
    )?
    .into_iter()
    .next() else {
        return Ok(None);
    };
    let a = anchor.as_str();
    Ok(Some(RowState {
        hash: int(T, a, "content_hash", take(&mut r, 0))?,
        generation: int(T, a, "generation", take(&mut r, 1))?,
        dn_norm: opt_text(T, a, "dn_norm", take(&mut r, 2))?,
    }))
}

/// The state of a source row in `source_state` (all an import of an unchanged object reads).
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// The row's id in `source_state`.
    id: i64,
    hash: i64,
    generation: i64,
}

fn seen_state(conn: &Connection, anchor: &Anchor) -> Result<Option<Seen>, StateError> {
    const T: &str = "source_state";
    let found: Option<(SqlValue, SqlValue, SqlValue)> = conn
        .prepare_cached(SEEN_STATE)
        .and_then(|mut s| {
            s.query_row([anchor.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
        })
        .ctx("reading a source object's state")?;
    let Some((id, h, g)) = found else {
        return Ok(None);
    };
    let a = anchor.as_str();
    Ok(Some(Seen {
        id: int(T, a, "id", id)?,
        hash: int(T, a, "content_hash", h)?,
        generation: int(T, a, "generation", g)?,
    }))
}

/// Records the hash and generation of a source row.
fn put_state(
    conn: &Connection,
    anchor: &Anchor,
    hash: i64,
    generation: i64,
) -> Result<(), StateError> {
    conn.prepare_cached(
        "INSERT INTO source_state (anchor, content_hash, generation) VALUES (?1, ?2, ?3) \
         ON CONFLICT (anchor) DO UPDATE SET content_hash = excluded.content_hash, \
         generation = excluded.generation",
    )
    .and_then(|mut s| s.execute(params![anchor.as_str(), hash, generation]))
    .ctx("recording a source object's state")?;
    Ok(())
}

/// A reference, comparable: attribute and target (anchor, or normalized DN).
type RefKey = (AttrName, bool, String);

fn stored_refs(conn: &Connection, anchor: &Anchor) -> Result<BTreeSet<RefKey>, StateError> {
    const T: &str = "source_refs";
    let a = anchor.as_str();
    let mut out = BTreeSet::new();
    for mut r in rows(conn, REFS_FROM, [a], "reading references")? {
        let attr = AttrName::from(text(T, a, "attribute", take(&mut r, 0))?);
        match (
            opt_text(T, a, "to_anchor", take(&mut r, 1))?,
            opt_text(T, a, "to_dn_norm", take(&mut r, 2))?,
        ) {
            (Some(to), _) => out.insert((attr, true, to)),
            (None, Some(dn)) => out.insert((attr, false, dn)),
            (None, None) => return Err(corrupt(T, a, "a reference to neither anchor nor DN")),
        };
    }
    Ok(out)
}

fn entry_ref_keys(e: &Entry) -> BTreeSet<RefKey> {
    entry_references(e)
        .into_iter()
        .map(|(n, t)| match t {
            RefTarget::Anchor(a) => (n, true, a.as_str().to_owned()),
            RefTarget::Dn(d) => (n, false, d),
        })
        .collect()
}

/// The anchor of the object at `dn` (the least, should two claim it).
fn anchor_at(conn: &Connection, dn: &Dn) -> Result<Option<Anchor>, StateError> {
    Ok(anchors_at(conn, dn.normalized())?.into_iter().min())
}

/// The distinct `from_anchor`s of a query on `source_refs`.
fn ref_sources(conn: &Connection, sql: &str, key: &str) -> Result<Vec<Anchor>, StateError> {
    anchor_rows(conn, (sql, "source_refs", "from_anchor"), key)
}

/// Writes the reference rows of `anchor`.
fn insert_refs(
    conn: &Connection,
    anchor: &Anchor,
    refs: &BTreeSet<RefKey>,
) -> Result<(), StateError> {
    let mut ins = conn
        .prepare_cached(
            "INSERT INTO source_refs (from_anchor, attribute, to_anchor, to_dn_norm) \
             VALUES (?1, ?2, ?3, ?4)",
        )
        .ctx("writing references")?;
    for (attr, by_anchor, to) in refs {
        let (to_anchor, to_dn) = if *by_anchor {
            (Some(to.as_str()), None)
        } else {
            (None, Some(to.as_str()))
        };
        ins.execute(params![anchor.as_str(), attr.as_str(), to_anchor, to_dn])
            .ctx("writing references")?;
    }
    Ok(())
}

/// Stores `entry` as the content of its existing row with its reference rows — a change the
/// mirror makes by itself (a reference resolved or removed). `rehash`: the row's hash becomes
/// that of the stored content (else it stays that of what the source last delivered).
fn rewrite_entry(conn: &Connection, entry: &Entry, rehash: bool) -> Result<(), StateError> {
    let (json, hash) = encode_entry(entry)?;
    conn.prepare_cached("UPDATE source_objects SET attributes = ?2 WHERE anchor = ?1")
        .and_then(|mut s| s.execute(params![entry.anchor.as_str(), json]))
        .ctx("rewriting a source object")?;
    if rehash {
        conn.prepare_cached("UPDATE source_state SET content_hash = ?2 WHERE anchor = ?1")
            .and_then(|mut s| s.execute(params![entry.anchor.as_str(), hash as i64]))
            .ctx("rewriting a source object's hash")?;
    }
    conn.prepare_cached("DELETE FROM source_refs WHERE from_anchor = ?1")
        .and_then(|mut s| s.execute([entry.anchor.as_str()]))
        .ctx("removing references")?;
    insert_refs(conn, &entry.anchor, &entry_ref_keys(entry))
}

/// Resolves the unresolved references to `dn_norm` of every referrer into references to
/// `anchor` (the object at `dn_norm`, before that DN stops naming it). Returns the referrers.
fn pin(conn: &Connection, dn_norm: &str, anchor: &Anchor) -> Result<Vec<Anchor>, StateError> {
    let mut out = Vec::new();
    for r in ref_sources(conn, WAITING, dn_norm)? {
        let Some(mut e) = load_entry(conn, &r)? else {
            continue;
        };
        let changed = resolve_references(&mut e, |d| {
            Ok::<_, StateError>((d.normalized() == dn_norm).then(|| anchor.clone()))
        })?;
        if changed {
            rewrite_entry(conn, &e, false)?;
            out.push(r);
        }
    }
    Ok(out)
}

/// Resolves the references waiting for the objects now at `dns` (normalized), each referrer
/// rewritten once.
fn settle(conn: &Connection, dns: BTreeSet<String>) -> Result<(), StateError> {
    let mut referrers: BTreeSet<Anchor> = BTreeSet::new();
    for d in dns {
        if !anchors_at(conn, &d)?.is_empty() {
            referrers.extend(ref_sources(conn, WAITING, &d)?);
        }
    }
    for r in referrers {
        let Some(mut e) = load_entry(conn, &r)? else {
            continue;
        };
        if resolve_references(&mut e, |d| anchor_at(conn, d))? {
            rewrite_entry(conn, &e, false)?;
        }
    }
    Ok(())
}

/// Removes the references to `anchor` from its referrers; returns them.
fn strip(conn: &Connection, anchor: &Anchor) -> Result<Vec<Anchor>, StateError> {
    let mut out = Vec::new();
    for r in ref_sources(conn, REFERRING, anchor.as_str())? {
        let Some(mut e) = load_entry(conn, &r)? else {
            continue;
        };
        if remove_references_to(&mut e, anchor) {
            rewrite_entry(conn, &e, true)?;
            out.push(r);
        }
    }
    Ok(out)
}

/// Migration 4's data step: every mirrored object re-encoded into the new tables (the hash of
/// a source object becomes that of its stored content: one delivered otherwise, but the same
/// once its references are resolved, marks nothing at the next import and takes the hash of
/// what was delivered), the new tables swapped in, and the stored DN references that name
/// mirrored objects resolved (migration 3's work, for files that come from version 2).
fn compact_mirrors(conn: &Connection) -> Result<(), StateError> {
    {
        let mut read = conn
            .prepare("SELECT anchor, object_type, dn, attributes, generation FROM source_objects")
            .ctx("reading the source mirror to migrate")?;
        let mut ins = conn
            .prepare(
                "INSERT INTO source_objects_v4 (anchor, object_type, dn, dn_norm, attributes) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .ctx("migrating the source mirror")?;
        let mut q = read.query([]).ctx("reading the source mirror to migrate")?;
        while let Some(r) = q.next().ctx("reading the source mirror to migrate")? {
            let row = raw_row(r, 5).ctx("reading the source mirror to migrate")?;
            let mut row = row;
            let generation = take(&mut row, 4);
            let e = decode_entry(row)?;
            let generation = int(
                "source_objects",
                e.anchor.as_str(),
                "generation",
                generation,
            )?;
            let (attrs, hash) = encode_entry(&e)?;
            ins.execute(params![
                e.anchor.as_str(),
                e.object_type.as_str(),
                e.dn.as_ref().map(|d| d.as_str()),
                e.dn.as_ref().map(|d| d.normalized()),
                attrs
            ])
            .ctx("migrating the source mirror")?;
            put_state(conn, &e.anchor, hash as i64, generation)?;
        }
    }
    {
        let mut read = conn
            .prepare("SELECT id, object_type, attributes FROM target_objects")
            .ctx("reading the target mirror to migrate")?;
        let mut ins = conn
            .prepare(
                "INSERT INTO target_objects_v4 (id, object_type, attributes) VALUES (?1, ?2, ?3)",
            )
            .ctx("migrating the target mirror")?;
        let mut q = read.query([]).ctx("reading the target mirror to migrate")?;
        while let Some(r) = q.next().ctx("reading the target mirror to migrate")? {
            let row = raw_row(r, 3).ctx("reading the target mirror to migrate")?;
            let o = decode_target(row)?;
            ins.execute(params![
                o.id.as_str(),
                o.object_type.as_str(),
                encode_attributes(&o.attributes)
            ])
            .ctx("migrating the target mirror")?;
        }
    }
    conn.execute_batch(SCHEMA_V4_SWAP)
        .ctx("replacing the mirror tables")?;
    resolve_stored_references(conn)
}

/// The DN references that name mirrored objects become anchors.
fn resolve_stored_references(conn: &Connection) -> Result<(), StateError> {
    let dns: BTreeSet<String> = rows(
        conn,
        "SELECT DISTINCT r.to_dn_norm FROM source_refs r \
         JOIN source_objects o ON o.dn_norm = r.to_dn_norm",
        [],
        "finding references by DN",
    )?
    .into_iter()
    .map(|mut r| text("source_refs", "?", "to_dn_norm", take(&mut r, 0)))
    .collect::<Result<_, _>>()?;
    settle(conn, dns)
}

/// Records that full import `generation` saw the source object of row `id` of `source_state`
/// (unchanged).
fn set_generation(conn: &Connection, id: i64, generation: i64) -> Result<(), StateError> {
    conn.prepare_cached("UPDATE source_state SET generation = ?2 WHERE id = ?1")
        .and_then(|mut s| s.execute(params![id, generation]))
        .ctx("recording a full import's generation")?;
    Ok(())
}

/// Writes `new` as the entry of `anchor` (`None`: deletes it), marking dirty what changed
/// (see [`StateStore::apply_changes`]). `generation`: the full import that saw it, or `None`
/// to keep the stored one. The entry's DN references are resolved against the mirror; DNs that
/// unresolved references wait for are added to `unsettled` (for [`settle`]); a delete removes
/// the references to the object from its referrers. The row's hash is that of `new` as given
/// (what the source delivered). Returns whether the content changed.
fn write_entry(
    conn: &Connection,
    anchor: &Anchor,
    new: Option<&Entry>,
    generation: Option<i64>,
    unsettled: &mut BTreeSet<String>,
) -> Result<bool, StateError> {
    let old = row_state(conn, anchor)?;
    let generation = generation
        .or(old.as_ref().map(|o| o.generation))
        .unwrap_or(0);
    let new_hash = match new {
        Some(e) => Some(encode_entry(e)?.1 as i64),
        None => None,
    };
    if old.as_ref().map(|o| o.hash) == new_hash {
        if let Some(o) = &old {
            if o.generation != generation {
                conn.prepare_cached("UPDATE source_state SET generation = ?2 WHERE anchor = ?1")
                    .and_then(|mut s| s.execute(params![anchor.as_str(), generation]))
                    .ctx("recording a full import's generation")?;
            }
        }
        return Ok(false);
    }
    let new = match new {
        Some(e) => {
            let mut e = e.clone();
            resolve_references(&mut e, |d| anchor_at(conn, d))?;
            Some(e)
        }
        None => None,
    };
    if let (Some(_), Some(e), Some(h)) = (&old, &new, new_hash) {
        if load_entry(conn, anchor)?.as_ref() == Some(e) {
            // Delivered differently (a referenced object's new DN), the same once resolved.
            put_state(conn, anchor, h, generation)?;
            return Ok(false);
        }
    }
    let encoded = match &new {
        Some(e) => Some(encode_entry(e)?.0),
        None => None,
    };
    let old_dn = old.as_ref().and_then(|o| o.dn_norm.clone());
    let new_dn = new
        .as_ref()
        .and_then(|e| e.dn.as_ref())
        .map(|d| d.normalized().to_owned());
    if let Some(d) = old_dn.as_deref().filter(|d| new_dn.as_deref() != Some(*d)) {
        // A rename, move or delete: references still waiting by the old DN meant this object.
        pin(conn, d, anchor)?;
    }
    if let Some(d) = new_dn.as_deref().filter(|d| old_dn.as_deref() != Some(*d)) {
        // Another object held this DN until now: what waited for it meant that one.
        if let Some(holder) = anchors_at(conn, d)?.into_iter().find(|h| h != anchor) {
            pin(conn, d, &holder)?;
        }
    }
    let mut dirty: BTreeSet<Anchor> = BTreeSet::new();
    dirty.insert(anchor.clone());
    dirty.extend(referrers(conn, anchor, old_dn.as_deref())?);
    let old_refs = if old.is_some() {
        stored_refs(conn, anchor)?
    } else {
        BTreeSet::new()
    };
    let new_refs = new.as_ref().map(entry_ref_keys).unwrap_or_default();
    if old.is_some() {
        conn.prepare_cached("DELETE FROM source_refs WHERE from_anchor = ?1")
            .and_then(|mut s| s.execute([anchor.as_str()]))
            .ctx("removing references")?;
    }
    match (&new, encoded, new_hash) {
        (Some(e), Some(attrs), Some(hash)) => {
            conn.prepare_cached(
                "INSERT INTO source_objects (anchor, object_type, dn, dn_norm, attributes) \
                 VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (anchor) DO UPDATE SET object_type = excluded.object_type, \
                 dn = excluded.dn, dn_norm = excluded.dn_norm, attributes = excluded.attributes",
            )
            .and_then(|mut s| {
                s.execute(params![
                    anchor.as_str(),
                    e.object_type.as_str(),
                    e.dn.as_ref().map(|d| d.as_str()),
                    new_dn,
                    attrs,
                ])
            })
            .ctx("writing a source object")?;
            put_state(conn, anchor, hash, generation)?;
            insert_refs(conn, anchor, &new_refs)?;
        }
        _ => {
            conn.prepare_cached("DELETE FROM source_objects WHERE anchor = ?1")
                .and_then(|mut s| s.execute([anchor.as_str()]))
                .ctx("deleting a source object")?;
            conn.prepare_cached("DELETE FROM source_state WHERE anchor = ?1")
                .and_then(|mut s| s.execute([anchor.as_str()]))
                .ctx("deleting a source object")?;
            dirty.extend(strip(conn, anchor)?);
        }
    }
    if new_dn != old_dn {
        dirty.extend(referrers(conn, anchor, new_dn.as_deref())?);
        if let Some(d) = &new_dn {
            if !ref_sources(conn, WAITING, d)?.is_empty() {
                unsettled.insert(d.clone());
            }
        }
    }
    for (_, by_anchor, to) in old_refs.symmetric_difference(&new_refs) {
        if *by_anchor {
            dirty.insert(Anchor::from(to.as_str()));
        } else {
            dirty.extend(anchors_at(conn, to)?);
        }
    }
    mark(conn, dirty)?;
    Ok(true)
}

/// The index key of a value, if such values are indexed: decided on the lower-cased key, so a
/// stored value and a lookup that differ only in case are both indexed or both not.
fn value_key(v: &Value) -> Option<String> {
    let key = lookup_key(v);
    let indexed = match &key {
        Value::String(s) => s.len() <= MAX_INDEXED_VALUE,
        Value::Integer(_) | Value::Boolean(_) | Value::Timestamp(_) => true,
        Value::Bytes(_) | Value::Reference(_) => false,
    };
    if !indexed {
        return None;
    }
    serde_json::to_string(&key).ok()
}

/// The declared lookup attributes kept in `meta` (`None`: never declared).
fn lookup_attributes(conn: &Connection) -> Result<Option<LookupAttributes>, StateError> {
    let v: Option<SqlValue> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'lookup_attributes'")
        .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
        .ctx("reading the lookup attributes")?;
    match v {
        None => Ok(None),
        Some(v) => {
            let s = text("meta", "lookup_attributes", "value", v)?;
            json("meta", "lookup_attributes", "value", &s).map(Some)
        }
    }
}

/// Whether the index holds the values of `attribute` (lower-cased) of objects of `ty`.
fn indexed(lookup: Option<&LookupAttributes>, ty: &ObjectType, attribute: &str) -> bool {
    lookup.is_none_or(|m| m.get(ty).is_some_and(|a| a.contains(attribute)))
}

fn write_target(
    conn: &Connection,
    o: &TargetObject,
    lookup: Option<&LookupAttributes>,
) -> Result<(), StateError> {
    let old = stored_target(conn, &o.id)?;
    write_target_over(
        conn,
        &o.id,
        (&o.object_type, &o.attributes),
        old.as_ref().map(Option::as_ref).map_err(|_| ()),
        lookup,
    )
}

/// Writes the target object `id` (type and attributes, not copied into a [`TargetObject`])
/// over `old`, the stored object it replaces as [`stored_target`] read it.
fn write_target_over(
    conn: &Connection,
    id: &TargetId,
    (object_type, attributes): (&ObjectType, &Attributes),
    old: Result<Option<&TargetObject>, ()>,
    lookup: Option<&LookupAttributes>,
) -> Result<(), StateError> {
    let attrs = encode_attributes(attributes);
    conn.prepare_cached(
        "INSERT INTO target_objects (id, object_type, attributes) VALUES (?1, ?2, ?3) \
         ON CONFLICT (id) DO UPDATE SET object_type = excluded.object_type, \
         attributes = excluded.attributes",
    )
    .and_then(|mut s| s.execute(params![id.as_str(), object_type.as_str(), attrs]))
    .ctx("writing a target object")?;
    reindex_target(conn, id, Some((object_type, attributes)), old, lookup)
}

/// The index keys of an object of type `ty` with `attributes` under `lookup`: (attribute
/// lower-cased, value key), the values of attributes not indexed left alone.
fn indexed_keys(
    ty: &ObjectType,
    attributes: &Attributes,
    lookup: Option<&LookupAttributes>,
) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (name, values) in attributes.iter() {
        let attr = name.as_str().to_lowercase();
        if !indexed(lookup, ty, &attr) {
            continue;
        }
        for v in values {
            if let Some(k) = value_key(v) {
                out.insert((attr.clone(), k));
            }
        }
    }
    out
}

/// The stored object `id` as the index knows it, read before it is overwritten or deleted:
/// `Err(())` when the row does not decode (its index rows are then found by a scan).
fn stored_target(
    conn: &Connection,
    id: &TargetId,
) -> Result<Result<Option<TargetObject>, ()>, StateError> {
    match load_target(conn, id) {
        Ok(o) => Ok(Ok(o)),
        Err(StateError::Corrupt { .. }) => Ok(Err(())),
        Err(e) => Err(e),
    }
}

/// Brings the index rows of the object `id` (`new`: its type and attributes; `None`: removed)
/// from those of `old`, the stored object it replaces, to its own: only the keys that changed
/// are written. The index has no index by id (it would be as large as the index itself): the
/// old keys are computed from the old object.
fn reindex_target(
    conn: &Connection,
    id: &TargetId,
    new: Option<(&ObjectType, &Attributes)>,
    old: Result<Option<&TargetObject>, ()>,
    lookup: Option<&LookupAttributes>,
) -> Result<(), StateError> {
    let new = new
        .map(|(ty, attributes)| indexed_keys(ty, attributes, lookup))
        .unwrap_or_default();
    let old = match old {
        Ok(old) => old
            .map(|o| indexed_keys(&o.object_type, &o.attributes, lookup))
            .unwrap_or_default(),
        Err(()) => {
            // A stored row that does not decode: its keys are unknown; find them by a scan.
            conn.prepare_cached("DELETE FROM target_values WHERE id = ?1")
                .and_then(|mut s| s.execute([id.as_str()]))
                .ctx("re-indexing a target object")?;
            BTreeSet::new()
        }
    };
    if old == new {
        return Ok(());
    }
    let mut del = conn
        .prepare_cached(
            "DELETE FROM target_values WHERE attribute = ?1 AND value_key = ?2 AND id = ?3",
        )
        .ctx("re-indexing a target object")?;
    for (attr, key) in old.difference(&new) {
        del.execute(params![attr, key, id.as_str()])
            .ctx("re-indexing a target object")?;
    }
    let mut ins = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO target_values (attribute, value_key, id) VALUES (?1, ?2, ?3)",
        )
        .ctx("indexing a target object")?;
    for (attr, key) in new.difference(&old) {
        ins.execute(params![attr, key, id.as_str()])
            .ctx("indexing a target object")?;
    }
    Ok(())
}

fn delete_target(conn: &Connection, id: &TargetId) -> Result<bool, StateError> {
    let old = stored_target(conn, id)?;
    reindex_target(
        conn,
        id,
        None,
        old.as_ref().map(Option::as_ref).map_err(|_| ()),
        None,
    )?;
    let n = conn
        .prepare_cached("DELETE FROM target_objects WHERE id = ?1")
        .and_then(|mut s| s.execute([id.as_str()]))
        .ctx("deleting a target object")?;
    Ok(n > 0)
}

/// Migration 2's data step: indexes the values of every stored target object.
fn rebuild_target_values(conn: &Connection) -> Result<(), StateError> {
    reindex_targets(conn, None)
}

/// Rebuilds the target value index: the values of the `lookup` attributes (all, if `None`) of
/// every stored target object.
fn reindex_targets(conn: &Connection, lookup: Option<&LookupAttributes>) -> Result<(), StateError> {
    conn.execute("DELETE FROM target_values", [])
        .ctx("clearing the target value index")?;
    if lookup.is_some_and(|m| m.values().all(|a| a.is_empty())) {
        return Ok(());
    }
    let mut stmt = conn
        .prepare("SELECT id, object_type, attributes FROM target_objects")
        .ctx("reading target objects")?;
    let mut q = stmt.query([]).ctx("reading target objects")?;
    while let Some(r) = q.next().ctx("reading target objects")? {
        let row = (0..3)
            .map(|i| r.get::<_, SqlValue>(i))
            .collect::<Result<Vec<_>, _>>()
            .ctx("reading target objects")?;
        let o = decode_target(row)?;
        reindex_target(
            conn,
            &o.id,
            Some((&o.object_type, &o.attributes)),
            Ok(None),
            lookup,
        )?;
    }
    Ok(())
}

/// Migration 5's data step: the rows already done get the names of the attributes an update
/// changed, from their payloads (a payload that does not decode is dropped all the same:
/// nothing reads it any more); then the old table goes.
fn compact_done_rows(conn: &Connection) -> Result<(), StateError> {
    let mut stmt = conn
        .prepare("SELECT id, sent FROM journal_v4 WHERE state = 'done' AND sent IS NOT NULL")
        .ctx("reading the journal")?;
    let mut upd = conn
        .prepare("UPDATE journal SET attributes = ?2 WHERE id = ?1")
        .ctx("compacting the journal")?;
    let mut q = stmt.query([]).ctx("reading the journal")?;
    while let Some(r) = q.next().ctx("reading the journal")? {
        let id: i64 = r.get(0).ctx("reading the journal")?;
        let sent: Option<String> = r.get(1).unwrap_or(None);
        let sent: Option<TargetOperation> = sent.and_then(|s| serde_json::from_str(&s).ok());
        if let Some(attrs) = audit_json(sent.as_ref())? {
            upd.execute(params![id, attrs])
                .ctx("compacting the journal")?;
        }
    }
    drop(q);
    conn.execute_batch(
        "DROP TABLE journal_v4;
         CREATE INDEX journal_run ON journal (run);
         CREATE INDEX journal_intended ON journal (state) WHERE state = 'intended';",
    )
    .ctx("compacting the journal")
}

/// The `attributes` column of a done row: the names an update changed, as JSON (`NULL`: none).
fn audit_json(sent: Option<&TargetOperation>) -> Result<Option<String>, StateError> {
    let names = audit_attributes(sent);
    if names.is_empty() {
        return Ok(None);
    }
    to_json("the attributes of a journaled update", &names).map(Some)
}

/// Prunes the runs outside `retention` at `now` and their journal rows (see
/// [`StateStore::prune_journal`]).
fn prune(
    conn: &Connection,
    retention: &Retention,
    now: DateTime<Utc>,
) -> Result<Pruned, StateError> {
    let doomed: Vec<i64> = rows(
        conn,
        "SELECT id FROM runs WHERE finished IS NOT NULL          AND julianday(finished) < julianday(?1)          AND id < (SELECT COALESCE(MIN(id), 9223372036854775807) FROM              (SELECT id FROM runs ORDER BY id DESC LIMIT ?2)) ORDER BY id",
        params![
            time_text(&retention.cutoff(now)),
            i64::try_from(retention.runs).unwrap_or(i64::MAX)
        ],
        "finding runs to prune",
    )?
    .into_iter()
    .map(|mut r| int("runs", "?", "id", take(&mut r, 0)))
    .collect::<Result<_, _>>()?;
    let mut out = Pruned::default();
    let mut entries = conn
        .prepare_cached("DELETE FROM journal WHERE run = ?1 AND state <> 'intended'")
        .ctx("pruning the journal")?;
    let mut runs = conn
        .prepare_cached(
            "DELETE FROM runs WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM journal WHERE run = ?1)",
        )
        .ctx("pruning runs")?;
    for id in doomed {
        out.entries += entries.execute([id]).ctx("pruning the journal")? as u64;
        out.runs += runs.execute([id]).ctx("pruning runs")? as u64;
    }
    Ok(out)
}

/// Journals `op` as intended in `conn` (the run is known): the journal row and its payload
/// (`op` and `sent`, redacted, as JSON — encoded into `buf`, reused from one call to the next).
fn intend(
    conn: &Connection,
    run: RunId,
    (op, sent): (&Operation, Option<&TargetOperation>),
    buf: &mut JsonBuffers,
) -> Result<JournalId, StateError> {
    buf.op.clear();
    serde_json::to_writer(&mut buf.op, redacted_operation(op).as_ref())
        .map_err(|e| serialize_error("a journaled operation", &e))?;
    buf.sent.clear();
    if let Some(s) = sent {
        serde_json::to_writer(&mut buf.sent, redacted_target_operation(op, s).as_ref())
            .map_err(|e| serialize_error("a journaled target operation", &e))?;
    }
    let op_json =
        std::str::from_utf8(&buf.op).map_err(|e| serialize_error("a journaled operation", &e))?;
    let sent_json = match sent {
        Some(_) => Some(
            std::str::from_utf8(&buf.sent)
                .map_err(|e| serialize_error("a journaled target operation", &e))?,
        ),
        None => None,
    };
    conn.prepare_cached(
        "INSERT INTO journal (run, anchor, kind, state) VALUES (?1, ?2, ?3, 'intended')",
    )
    .and_then(|mut s| s.execute(params![run.0, op.anchor.as_str(), op.kind.name()]))
    .ctx("journaling an operation")?;
    let id = conn.last_insert_rowid();
    conn.prepare_cached("INSERT INTO journal_payload (id, op, sent) VALUES (?1, ?2, ?3)")
        .and_then(|mut s| s.execute(params![id, op_json, sent_json]))
        .ctx("journaling an operation")?;
    Ok(JournalId(id))
}

/// The buffers [`intend`] encodes payloads into.
#[derive(Default)]
struct JsonBuffers {
    op: Vec<u8>,
    sent: Vec<u8>,
}

fn serialize_error(what: &str, e: &dyn std::fmt::Display) -> StateError {
    StateError::Serialize {
        what: what.to_owned(),
        detail: e.to_string(),
    }
}

/// Journals `ops` as intended for `run` (see [`StateStore::journal_intents`]).
fn intend_all(
    conn: &Connection,
    run: RunId,
    ops: &[(&Operation, Option<&TargetOperation>)],
) -> Result<Vec<JournalId>, StateError> {
    check_run(conn, run)?;
    let mut buf = JsonBuffers::default();
    ops.iter()
        .map(|(op, sent)| intend(conn, run, (op, *sent), &mut buf))
        .collect()
}

/// Records `outcomes` (see [`StateStore::journal_outcomes`]), moving the fingerprint when one
/// is done.
fn record_outcomes(
    conn: &Connection,
    lookup: Option<&LookupAttributes>,
    outcomes: &[JournalOutcome<'_>],
) -> Result<(), StateError> {
    let mut done = false;
    for o in outcomes {
        match o {
            JournalOutcome::Done {
                id,
                op,
                sent,
                target_id,
            } => {
                record_done(conn, lookup, *id, op, *sent, *target_id)?;
                done = true;
            }
            JournalOutcome::Failed {
                id,
                error,
                retryable,
            } => record_failed(conn, *id, error, *retryable)?,
        }
    }
    if done {
        bump(conn)?;
    }
    Ok(())
}

fn check_run(conn: &Connection, run: RunId) -> Result<(), StateError> {
    let known = conn
        .prepare_cached("SELECT 1 FROM runs WHERE id = ?1")
        .and_then(|mut s| s.exists([run.0]))
        .ctx("checking the run")?;
    if known {
        Ok(())
    } else {
        Err(StateError::UnknownRun(run))
    }
}

/// Records in `conn` that `op` took effect (see [`StateStore::journal_done`]); the caller
/// moves the fingerprint.
fn record_done(
    conn: &Connection,
    lookup: Option<&LookupAttributes>,
    id: JournalId,
    op: &Operation,
    sent: Option<&TargetOperation>,
    target_id: Option<&TargetId>,
) -> Result<(), StateError> {
    let (effect, link_to, recorded) = done_effect(op, sent, target_id)?;
    let attrs = audit_json(sent)?;
    let n = conn
        .prepare_cached(JOURNAL_DONE)
        .and_then(|mut s| s.execute(params![id.0, recorded.as_ref().map(|t| t.as_str()), attrs]))
        .ctx("recording a done operation")?;
    conn.prepare_cached("DELETE FROM journal_payload WHERE id = ?1")
        .and_then(|mut s| s.execute([id.0]))
        .ctx("recording a done operation")?;
    if n == 0 {
        return Err(StateError::UnknownJournalId(id));
    }
    if let Some(t) = link_to {
        put_link(
            conn,
            &Link {
                anchor: op.anchor.clone(),
                source_type: op.source_type.clone(),
                target_id: t,
                target_type: op.target_type.clone(),
            },
        )?;
    } else if let Some(t) = unlinks(op) {
        conn.prepare_cached("DELETE FROM links WHERE anchor = ?1 AND target_id = ?2")
            .and_then(|mut s| s.execute([op.anchor.as_str(), t.as_str()]))
            .ctx("removing a link")?;
    }
    if let Some((tid, effect)) = effect {
        match effect.as_ref() {
            TargetOperation::Create {
                object_type,
                attributes,
            } => {
                let old = stored_target(conn, &tid)?;
                write_target_over(
                    conn,
                    &tid,
                    (object_type, attributes),
                    old.as_ref().map(Option::as_ref).map_err(|_| ()),
                    lookup,
                )?;
            }
            TargetOperation::Update { changes, .. } => {
                if let Some(old) = load_target(conn, &tid)? {
                    let mut o = old.clone();
                    for c in changes {
                        let _ = o.attributes.apply(c, false);
                    }
                    write_target_over(
                        conn,
                        &tid,
                        (&o.object_type, &o.attributes),
                        Ok(Some(&old)),
                        lookup,
                    )?;
                }
            }
            TargetOperation::Delete { .. } => {
                delete_target(conn, &tid)?;
            }
        }
    }
    Ok(())
}

/// Records in `conn` that a journaled operation failed.
fn record_failed(
    conn: &Connection,
    id: JournalId,
    error: &str,
    retryable: bool,
) -> Result<(), StateError> {
    let n = conn
        .prepare_cached(
            "UPDATE journal SET state = 'failed', error = ?2, retryable = ?3 WHERE id = ?1",
        )
        .and_then(|mut s| s.execute(params![id.0, error, retryable]))
        .ctx("recording a failed operation")?;
    if n == 0 {
        return Err(StateError::UnknownJournalId(id));
    }
    Ok(())
}

fn put_link(conn: &Connection, link: &Link) -> Result<(), StateError> {
    // Explicit delete then insert (not INSERT OR REPLACE: its implicit deletes skip triggers).
    conn.prepare_cached("DELETE FROM links WHERE anchor = ?1 OR target_id = ?2")
        .and_then(|mut s| s.execute([link.anchor.as_str(), link.target_id.as_str()]))
        .ctx("replacing a link")?;
    conn.prepare_cached(
        "INSERT INTO links (anchor, source_type, target_id, target_type) VALUES (?1, ?2, ?3, ?4)",
    )
    .and_then(|mut s| {
        s.execute([
            link.anchor.as_str(),
            link.source_type.as_str(),
            link.target_id.as_str(),
            link.target_type.as_str(),
        ])
    })
    .ctx("writing a link")?;
    Ok(())
}

/// Marks dirty the object linked to the target object `id` (gone from the target) and its
/// referrers: the link is stale, and the references to it too.
fn mark_linked_gone(conn: &Connection, id: &TargetId) -> Result<(), StateError> {
    let Some(r) = rows(conn, LINK_BY_TARGET, [id.as_str()], "reading a link")?
        .into_iter()
        .next()
    else {
        return Ok(());
    };
    let link = decode_link(r)?;
    let dn = row_state(conn, &link.anchor)?.and_then(|r| r.dn_norm);
    let mut dirty = referrers(conn, &link.anchor, dn.as_deref())?;
    dirty.push(link.anchor);
    mark(conn, dirty)?;
    Ok(())
}

fn check_changes(conn: &Connection, changes: &[Change]) -> Result<(), StateError> {
    super::check_changes(changes, |a| Ok(seen_state(conn, a)?.is_some()))
}

impl StateStore for SqliteStore {
    fn apply_changes(
        &mut self,
        connector: &str,
        changes: &[Change],
        watermark: Option<&Watermark>,
    ) -> Result<(), StateError> {
        self.write("applying a delta import", |tx| {
            check_changes(tx, changes)?;
            let mut changed = false;
            let mut unsettled = BTreeSet::new();
            for c in changes {
                let a = c.anchor();
                let u = &mut unsettled;
                changed |= match c {
                    Change::Add(e) | Change::Replace(e) => write_entry(tx, a, Some(e), None, u)?,
                    Change::Delete { .. } => write_entry(tx, a, None, None, u)?,
                    Change::Modify { changes, .. } => match load_entry(tx, a)? {
                        Some(mut e) => {
                            for ch in &resolve_change_values(changes, |d| anchor_at(tx, d))? {
                                let _ = e.attributes.apply(ch, false);
                            }
                            write_entry(tx, a, Some(&e), None, u)?
                        }
                        None => false,
                    },
                    Change::Move { new_dn, .. } => match load_entry(tx, a)? {
                        Some(mut e) => {
                            e.dn = Some(new_dn.clone());
                            write_entry(tx, a, Some(&e), None, u)?
                        }
                        None => false,
                    },
                };
            }
            settle(tx, unsettled)?;
            if let Some(w) = watermark {
                put_watermark(tx, connector, w)?;
            }
            if changed {
                bump(tx)?;
            }
            Ok(())
        })
    }

    fn begin_full_import(&mut self, connector: &str) -> Result<u64, StateError> {
        self.write("beginning a full import", |tx| {
            let generation = meta_int(tx, "generation")? + 1;
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'generation'",
                [generation],
            )
            .ctx("recording the generation")?;
            let generation = generation as u64;
            set_session(
                tx,
                Some(&Session {
                    connector: connector.to_owned(),
                    summary: FullImportSummary {
                        generation,
                        ..FullImportSummary::default()
                    },
                }),
            )?;
            Ok(generation)
        })
    }

    fn import_entries(&mut self, generation: u64, entries: &[Entry]) -> Result<(), StateError> {
        self.write("importing entries", |tx| {
            let mut s = match session(tx)? {
                Some(s) if s.summary.generation == generation => s,
                other => {
                    return Err(StateError::UnknownGeneration {
                        generation,
                        open: other.map(|s| s.summary.generation),
                    })
                }
            };
            let g = generation as i64;
            let (mut seen, mut added, mut changed) = (0, 0, 0);
            let mut unsettled = BTreeSet::new();
            let mut buf = Vec::new();
            for e in entries {
                let before = seen_state(tx, &e.anchor)?;
                match before {
                    Some(b) if b.generation == g => {
                        // Delivered before in this import: at another DN it is another object.
                        if e.dn.is_some() {
                            let first = entry_dn(tx, &e.anchor)?;
                            super::same_object(&e.anchor, first.as_ref(), e.dn.as_ref())?;
                        }
                    }
                    Some(_) => seen += 1,
                    None => {
                        seen += 1;
                        added += 1;
                    }
                }
                if let Some(b) = before {
                    // Delivered as last time: the hash says so, nothing else is read or written.
                    if b.hash == encode_entry_into(e, &mut buf) as i64 {
                        if b.generation != g {
                            set_generation(tx, b.id, g)?;
                        }
                        continue;
                    }
                }
                if write_entry(tx, &e.anchor, Some(e), Some(g), &mut unsettled)? && before.is_some()
                {
                    changed += 1;
                }
            }
            settle(tx, unsettled)?;
            s.summary.seen += seen;
            s.summary.added += added;
            s.summary.changed += changed;
            set_session(tx, Some(&s))?;
            if added + changed > 0 {
                bump(tx)?;
            }
            Ok(())
        })
    }

    fn finish_full_import(
        &mut self,
        connector: &str,
        generation: u64,
        watermark: Option<&Watermark>,
        min_share: f64,
    ) -> Result<FullImportSummary, StateError> {
        self.write("finishing a full import", |tx| {
            let s = match session(tx)? {
                Some(s) if s.summary.generation == generation => s,
                other => {
                    return Err(StateError::UnknownGeneration {
                        generation,
                        open: other.map(|s| s.summary.generation),
                    })
                }
            };
            if s.connector != connector {
                return Err(StateError::WrongConnector {
                    generation,
                    begun: s.connector,
                    given: connector.to_owned(),
                });
            }
            let mirrored: i64 = tx
                .query_row("SELECT COUNT(*) FROM source_objects", [], |r| r.get(0))
                .ctx("counting the source mirror")?;
            check_import_share(s.summary.seen, mirrored.max(0) as u64, min_share)?;
            let unseen: Vec<Anchor> = rows(
                tx,
                "SELECT anchor FROM source_state WHERE generation <> ?1 ORDER BY anchor",
                [generation as i64],
                "finding objects the import did not see",
            )?
            .into_iter()
            .map(|mut r| text("source_objects", "?", "anchor", take(&mut r, 0)).map(Anchor::from))
            .collect::<Result<_, _>>()?;
            for a in &unseen {
                write_entry(tx, a, None, None, &mut BTreeSet::new())?;
            }
            if let Some(w) = watermark {
                put_watermark(tx, connector, w)?;
            }
            set_session(tx, None)?;
            if !unseen.is_empty() {
                bump(tx)?;
            }
            Ok(FullImportSummary {
                deleted: unseen.len() as u64,
                ..s.summary
            })
        })
    }

    fn watermark(&self, connector: &str) -> Result<Option<Watermark>, StateError> {
        const T: &str = "watermarks";
        let Some(mut r) = rows(
            &self.conn,
            "SELECT kind, data FROM watermarks WHERE connector = ?1",
            [connector],
            "reading a watermark",
        )?
        .into_iter()
        .next() else {
            return Ok(None);
        };
        let kind = text(T, connector, "kind", take(&mut r, 0))?;
        let data = match take(&mut r, 1) {
            SqlValue::Blob(b) => b,
            SqlValue::Text(t) => t.into_bytes(),
            other => {
                return Err(corrupt(
                    T,
                    connector,
                    format!("column data holds {:?}", other.data_type()),
                ))
            }
        };
        Ok(Some(Watermark { kind, data }))
    }

    fn clear_watermark(&mut self, connector: &str) -> Result<(), StateError> {
        self.write("clearing a watermark", |tx| {
            tx.execute("DELETE FROM watermarks WHERE connector = ?1", [connector])
                .ctx("clearing a watermark")?;
            Ok(())
        })
    }

    fn load_all(&self) -> Result<Views, StateError> {
        // One read transaction: the three views are one snapshot.
        let tx = self
            .conn
            .unchecked_transaction()
            .ctx("starting a read transaction")?;
        let conn: &Connection = &tx;
        let mut views = Views::default();
        let sql = format!("SELECT {ENTRY_COLUMNS} FROM source_objects");
        let mut stmt = conn.prepare(&sql).ctx("reading the source mirror")?;
        let mut q = stmt.query([]).ctx("reading the source mirror")?;
        let mut raw = Vec::new();
        while let Some(r) = q.next().ctx("reading the source mirror")? {
            raw.push(raw_row(r, 4).ctx("reading the source mirror")?);
        }
        for e in decode_rows(raw, decode_entry)? {
            views.mirror.insert(e);
        }
        for r in rows(
            conn,
            "SELECT anchor, source_type, target_id, target_type FROM links",
            [],
            "reading the links",
        )? {
            views.links.insert(decode_link(r)?);
        }
        let mut stmt = conn
            .prepare("SELECT id, object_type, attributes FROM target_objects")
            .ctx("reading the target mirror")?;
        let mut q = stmt.query([]).ctx("reading the target mirror")?;
        let mut raw = Vec::new();
        while let Some(r) = q.next().ctx("reading the target mirror")? {
            raw.push(raw_row(r, 3).ctx("reading the target mirror")?);
        }
        for o in decode_rows(raw, decode_target)? {
            views.target.insert(o);
        }
        Ok(views)
    }

    fn load_neighbourhood(&self, anchors: &[Anchor]) -> Result<Views, StateError> {
        let tx = self
            .conn
            .unchecked_transaction()
            .ctx("starting a read transaction")?;
        let conn: &Connection = &tx;
        let mut entries: BTreeMap<Anchor, Option<Entry>> = BTreeMap::new();
        fn get(
            conn: &Connection,
            entries: &mut BTreeMap<Anchor, Option<Entry>>,
            a: &Anchor,
        ) -> Result<Option<Entry>, StateError> {
            if let Some(e) = entries.get(a) {
                return Ok(e.clone());
            }
            let e = load_entry(conn, a)?;
            entries.insert(a.clone(), e.clone());
            Ok(e)
        }
        let dn_of = |e: &Option<Entry>| {
            e.as_ref()
                .and_then(|e| e.dn.as_ref())
                .map(|d| d.normalized().to_owned())
        };
        let mut planned: BTreeSet<Anchor> = anchors.iter().cloned().collect();
        for a in anchors {
            let e = get(conn, &mut entries, a)?;
            planned.extend(referrers(conn, a, dn_of(&e).as_deref())?);
        }
        let mut context: BTreeSet<Anchor> = BTreeSet::new();
        let mut views = Views::default();
        for p in &planned {
            let e = get(conn, &mut entries, p)?;
            context.extend(referrers(conn, p, dn_of(&e).as_deref())?);
            if let Some(e) = &e {
                for (_, t) in entry_references(e) {
                    match t {
                        RefTarget::Anchor(a) => {
                            context.insert(a);
                        }
                        RefTarget::Dn(d) => {
                            for r in rows(conn, ENTRY_BY_DN, [d.as_str()], "resolving a DN")? {
                                let e = decode_entry(r)?;
                                context.insert(e.anchor.clone());
                                entries.insert(e.anchor.clone(), Some(e));
                            }
                        }
                    }
                }
            }
        }
        for a in planned.iter().chain(context.iter()) {
            let e = match entries.get(a) {
                Some(e) => e.clone(),
                None => load_entry(conn, a)?,
            };
            if let Some(e) = e {
                views.mirror.insert(e);
            }
            if let Some(l) = load_link(conn, a)? {
                if planned.contains(a) {
                    if let Some(o) = load_target(conn, &l.target_id)? {
                        views.target.insert(o);
                    }
                }
                views.links.insert(l);
            }
        }
        Ok(views)
    }

    fn load_join_candidates(
        &self,
        views: &mut Views,
        lookups: &[TargetLookup],
    ) -> Result<(), StateError> {
        let conn = &self.conn;
        for l in lookups {
            let attr = l.attribute.as_str().to_lowercase();
            let key = value_key(&l.value)
                .filter(|_| indexed(self.lookup.as_ref(), &l.object_type, &attr));
            let found: Vec<TargetObject> = match key {
                Some(key) => {
                    let mut out = Vec::new();
                    for mut r in rows(
                        conn,
                        TARGET_LOOKUP,
                        params![attr, key],
                        "looking up target values",
                    )? {
                        let id = text("target_values", "?", "id", take(&mut r, 0))?;
                        if let Some(o) = load_target(conn, &TargetId::from(id))? {
                            out.push(o);
                        }
                    }
                    out
                }
                None => {
                    // An attribute not declared, or values too long (or of a kind) not
                    // indexed: scan.
                    let key = lookup_key(&l.value);
                    rows(
                        conn,
                        "SELECT id, object_type, attributes FROM target_objects WHERE object_type = ?1",
                        [l.object_type.as_str()],
                        "scanning target objects",
                    )?
                    .into_iter()
                    .map(decode_target)
                    .filter(|o| {
                        o.as_ref().map_or(true, |o| {
                            o.attributes
                                .get(l.attribute.as_str())
                                .is_some_and(|vs| vs.iter().any(|v| lookup_key(v) == key))
                        })
                    })
                    .collect::<Result<_, _>>()?
                }
            };
            for o in found {
                if o.object_type != l.object_type {
                    continue;
                }
                if let Some(r) = rows(conn, LINK_BY_TARGET, [o.id.as_str()], "reading a link")?
                    .into_iter()
                    .next()
                {
                    views.links.insert(decode_link(r)?);
                }
                views.target.insert(o);
            }
        }
        Ok(())
    }

    fn anchors_page(
        &self,
        after: Option<&Anchor>,
        limit: usize,
    ) -> Result<Vec<Anchor>, StateError> {
        // Both tables are ordered by anchor (their primary key): a merge of two range scans.
        page_rows(
            &self.conn,
            "SELECT anchor FROM source_objects WHERE anchor > ?1 \
             UNION SELECT anchor FROM links WHERE anchor > ?1 \
             ORDER BY anchor LIMIT ?2",
            (after, limit),
            "reading a page of anchors",
            |r| Ok(Anchor::from(r.get::<_, String>(0)?)),
        )
    }

    fn source_entry(&self, anchor: &Anchor) -> Result<Option<Entry>, StateError> {
        load_entry(&self.conn, anchor)
    }

    fn anchor_by_dn(&self, dn: &Dn) -> Result<Option<Anchor>, StateError> {
        Ok(anchors_at(&self.conn, dn.normalized())?.into_iter().min())
    }

    fn link_counts(&self) -> Result<BTreeMap<ObjectType, usize>, StateError> {
        let mut out = BTreeMap::new();
        for mut r in rows(
            &self.conn,
            "SELECT target_type, n FROM link_counts",
            [],
            "reading link counts",
        )? {
            let ty = text("link_counts", "?", "target_type", take(&mut r, 0))?;
            let n = int("link_counts", &ty, "n", take(&mut r, 1))?;
            if n > 0 {
                out.insert(ObjectType::from(ty), n as usize);
            }
        }
        Ok(out)
    }

    fn dirty(&self) -> Result<Vec<Anchor>, StateError> {
        rows(
            &self.conn,
            "SELECT anchor FROM dirty ORDER BY anchor",
            [],
            "reading the dirty set",
        )?
        .into_iter()
        .map(|mut r| text("dirty", "?", "anchor", take(&mut r, 0)).map(Anchor::from))
        .collect()
    }

    fn dirty_page(
        &self,
        after: Option<&Anchor>,
        limit: usize,
    ) -> Result<Vec<(Anchor, bool)>, StateError> {
        page_rows(
            &self.conn,
            "SELECT d.anchor, l.anchor IS NOT NULL FROM dirty d \
             LEFT JOIN links l ON l.anchor = d.anchor \
             WHERE d.anchor > ?1 ORDER BY d.anchor LIMIT ?2",
            (after, limit),
            "reading a page of the dirty set",
            |r| Ok((Anchor::from(r.get::<_, String>(0)?), r.get::<_, bool>(1)?)),
        )
    }

    fn dirty_references_page(
        &self,
        after: Option<&Anchor>,
        limit: usize,
    ) -> Result<Vec<(Anchor, Vec<Anchor>)>, StateError> {
        let mut page: Vec<(Anchor, Vec<Anchor>)> = self
            .dirty_page(after, limit)?
            .into_iter()
            .map(|(a, _)| (a, Vec::new()))
            .collect();
        let (Some((first, _)), Some((last, _))) = (page.first(), page.last()) else {
            return Ok(page);
        };
        let what = "reading the references of the dirty set";
        let mut stmt = self.conn.prepare_cached(DIRTY_REFERENCES).ctx(what)?;
        let mut q = stmt.query([first.as_str(), last.as_str()]).ctx(what)?;
        while let Some(r) = q.next().ctx(what)? {
            let from: String = r.get(0).ctx(what)?;
            let to: String = r.get(1).ctx(what)?;
            if let Ok(k) = page.binary_search_by(|(a, _)| a.as_str().cmp(&from)) {
                page[k].1.push(Anchor::from(to));
            }
        }
        for (_, refs) in &mut page {
            refs.sort();
            refs.dedup();
        }
        Ok(page)
    }

    fn clear_dirty(&mut self, anchors: &[Anchor]) -> Result<(), StateError> {
        self.write("clearing the dirty set", |tx| {
            let mut stmt = tx
                .prepare_cached("DELETE FROM dirty WHERE anchor = ?1")
                .ctx("clearing the dirty set")?;
            let mut n = 0;
            for a in anchors {
                n += stmt.execute([a.as_str()]).ctx("clearing the dirty set")?;
            }
            if n > 0 {
                bump(tx)?;
            }
            Ok(())
        })
    }

    fn mark_dirty(&mut self, anchors: &[Anchor]) -> Result<(), StateError> {
        self.write("marking dirty", |tx| {
            if mark(tx, anchors.iter().cloned())? > 0 {
                bump(tx)?;
            }
            Ok(())
        })
    }

    fn journal_intent(
        &mut self,
        run: RunId,
        op: &Operation,
        sent: Option<&TargetOperation>,
    ) -> Result<JournalId, StateError> {
        self.write("journaling an operation", |tx| {
            check_run(tx, run)?;
            intend(tx, run, (op, sent), &mut JsonBuffers::default())
        })
    }

    fn journal_intents(
        &mut self,
        run: RunId,
        ops: &[(&Operation, Option<&TargetOperation>)],
    ) -> Result<Vec<JournalId>, StateError> {
        self.write("journaling operations", |tx| intend_all(tx, run, ops))
    }

    fn journal_done(
        &mut self,
        id: JournalId,
        op: &Operation,
        sent: Option<&TargetOperation>,
        target_id: Option<&TargetId>,
    ) -> Result<(), StateError> {
        let lookup = self.lookup.clone();
        self.write("recording a done operation", |tx| {
            record_done(tx, lookup.as_ref(), id, op, sent, target_id)?;
            bump(tx)
        })
    }

    fn journal_failed(
        &mut self,
        id: JournalId,
        error: &str,
        retryable: bool,
    ) -> Result<(), StateError> {
        self.write("recording a failed operation", |tx| {
            record_failed(tx, id, error, retryable)
        })
    }

    fn journal_outcomes(&mut self, outcomes: &[JournalOutcome<'_>]) -> Result<(), StateError> {
        let lookup = self.lookup.clone();
        self.write("recording outcomes", |tx| {
            record_outcomes(tx, lookup.as_ref(), outcomes)
        })
    }

    fn journal_commit(
        &mut self,
        run: RunId,
        outcomes: &[JournalOutcome<'_>],
        intents: &[(&Operation, Option<&TargetOperation>)],
    ) -> Result<Vec<JournalId>, StateError> {
        let lookup = self.lookup.clone();
        self.write("journaling intents and recording outcomes", |tx| {
            record_outcomes(tx, lookup.as_ref(), outcomes)?;
            if intents.is_empty() {
                return Ok(Vec::new());
            }
            intend_all(tx, run, intents)
        })
    }

    fn journal_unconfirmed(&self) -> Result<Vec<JournalEntry>, StateError> {
        rows(&self.conn, UNCONFIRMED, [], "reading the journal")?
            .into_iter()
            .map(decode_journal)
            .collect()
    }

    fn journal(&self, run: Option<RunId>) -> Result<Vec<JournalRecord>, StateError> {
        let found = match run {
            Some(r) => rows(
                &self.conn,
                &format!("{JOURNAL_RECORDS} WHERE j.run = ?1 ORDER BY j.id"),
                [r.0],
                "reading the journal",
            )?,
            None => rows(
                &self.conn,
                &format!("{JOURNAL_RECORDS} ORDER BY j.id"),
                [],
                "reading the journal",
            )?,
        };
        found.into_iter().map(decode_record).collect()
    }

    fn prune_journal(
        &mut self,
        retention: &Retention,
        now: DateTime<Utc>,
    ) -> Result<Pruned, StateError> {
        self.write("pruning the journal", |tx| prune(tx, retention, now))
    }

    fn set_lookup_attributes(
        &mut self,
        attributes: &BTreeMap<ObjectType, BTreeSet<AttrName>>,
    ) -> Result<(), StateError> {
        let lookup = lower_lookup_attributes(attributes);
        if self.lookup.as_ref() == Some(&lookup) {
            return Ok(());
        }
        let j = to_json("the lookup attributes", &lookup)?;
        self.write("declaring the lookup attributes", |tx| {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('lookup_attributes', ?1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [j],
            )
            .ctx("recording the lookup attributes")?;
            reindex_targets(tx, Some(&lookup))
        })?;
        self.lookup = Some(lookup);
        Ok(())
    }

    fn put_target_objects(&mut self, objects: &[TargetObject]) -> Result<(), StateError> {
        let lookup = self.lookup.clone();
        self.write("writing target objects", |tx| {
            for o in objects {
                write_target(tx, o, lookup.as_ref())?;
            }
            if !objects.is_empty() {
                bump(tx)?;
            }
            Ok(())
        })
    }

    fn remove_target_objects(&mut self, ids: &[TargetId]) -> Result<(), StateError> {
        self.write("removing target objects", |tx| {
            let mut changed = false;
            for id in ids {
                if delete_target(tx, id)? {
                    changed = true;
                    mark_linked_gone(tx, id)?;
                }
            }
            if changed {
                bump(tx)?;
            }
            Ok(())
        })
    }

    fn has_unlinked_target_objects(&self) -> Result<bool, StateError> {
        self.conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM target_objects t \
                 WHERE NOT EXISTS (SELECT 1 FROM links l WHERE l.target_id = t.id))",
            )
            .and_then(|mut s| s.query_row([], |r| r.get::<_, bool>(0)))
            .ctx("looking for unlinked target objects")
    }

    fn target_ids(&self) -> Result<Vec<TargetId>, StateError> {
        rows(
            &self.conn,
            "SELECT id FROM target_objects ORDER BY id",
            [],
            "reading target ids",
        )?
        .into_iter()
        .map(|mut r| text("target_objects", "?", "id", take(&mut r, 0)).map(TargetId::from))
        .collect()
    }

    fn escrow(
        &mut self,
        anchor: &Anchor,
        error: &str,
        next_retry: DateTime<Utc>,
    ) -> Result<u32, StateError> {
        self.write("escrowing an object", |tx| {
            let attempts: i64 = tx
                .prepare_cached(
                    "INSERT INTO escrow (anchor, attempts, next_retry, last_error) \
                     VALUES (?1, 1, ?2, ?3) ON CONFLICT (anchor) DO UPDATE SET \
                     attempts = attempts + 1, next_retry = excluded.next_retry, \
                     last_error = excluded.last_error RETURNING attempts",
                )
                .and_then(|mut s| {
                    s.query_row(
                        params![anchor.as_str(), time_text(&next_retry), error],
                        |r| r.get(0),
                    )
                })
                .ctx("escrowing an object")?;
            Ok(u32::try_from(attempts).unwrap_or(u32::MAX))
        })
    }

    fn escrowed(&self) -> Result<Vec<Escrow>, StateError> {
        const T: &str = "escrow";
        rows(
            &self.conn,
            "SELECT anchor, attempts, next_retry, last_error FROM escrow ORDER BY anchor",
            [],
            "reading the escrow",
        )?
        .into_iter()
        .map(|mut r| {
            let anchor = text(T, "?", "anchor", take(&mut r, 0))?;
            let attempts = int(T, &anchor, "attempts", take(&mut r, 1))?;
            let next = text(T, &anchor, "next_retry", take(&mut r, 2))?;
            Ok(Escrow {
                attempts: u32::try_from(attempts)
                    .map_err(|_| corrupt(T, &anchor, format!("attempts {attempts}")))?,
                next_retry: parse_time(T, &anchor, "next_retry", &next)?,
                last_error: text(T, &anchor, "last_error", take(&mut r, 3))?,
                anchor: anchor.into(),
            })
        })
        .collect()
    }

    fn release(&mut self, anchor: &Anchor) -> Result<(), StateError> {
        self.write("releasing an object from escrow", |tx| {
            tx.execute("DELETE FROM escrow WHERE anchor = ?1", [anchor.as_str()])
                .ctx("releasing an object from escrow")?;
            Ok(())
        })
    }

    fn begin_run(&mut self, profile: &str, started: DateTime<Utc>) -> Result<RunId, StateError> {
        self.write("recording a run", |tx| {
            tx.execute(
                "INSERT INTO runs (profile, started) VALUES (?1, ?2)",
                [profile, &time_text(&started)],
            )
            .ctx("recording a run")?;
            Ok(RunId(tx.last_insert_rowid()))
        })
    }

    fn finish_run(
        &mut self,
        run: RunId,
        finished: DateTime<Utc>,
        outcome: &str,
        report_json: &str,
    ) -> Result<(), StateError> {
        let retention = self.retention;
        self.write("recording the end of a run", |tx| {
            let n = tx
                .execute(
                    "UPDATE runs SET finished = ?2, outcome = ?3, report = ?4 WHERE id = ?1",
                    params![run.0, time_text(&finished), outcome, report_json],
                )
                .ctx("recording the end of a run")?;
            if n == 0 {
                return Err(StateError::UnknownRun(run));
            }
            if let Some(r) = &retention {
                prune(tx, r, finished)?;
            }
            Ok(())
        })
    }

    fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, StateError> {
        const T: &str = "runs";
        rows(
            &self.conn,
            "SELECT id, profile, started, finished, outcome, report FROM runs \
             ORDER BY id DESC LIMIT ?1",
            [i64::try_from(limit).unwrap_or(i64::MAX)],
            "reading runs",
        )?
        .into_iter()
        .map(|mut r| {
            let id = int(T, "?", "id", take(&mut r, 0))?;
            let key = id.to_string();
            let started = text(T, &key, "started", take(&mut r, 2))?;
            let finished = opt_text(T, &key, "finished", take(&mut r, 3))?;
            Ok(RunRecord {
                id: RunId(id),
                profile: text(T, &key, "profile", take(&mut r, 1))?,
                started: parse_time(T, &key, "started", &started)?,
                finished: match finished {
                    Some(f) => Some(parse_time(T, &key, "finished", &f)?),
                    None => None,
                },
                outcome: opt_text(T, &key, "outcome", take(&mut r, 4))?,
                report_json: opt_text(T, &key, "report", take(&mut r, 5))?,
            })
        })
        .collect()
    }

    fn fingerprint(&self) -> Result<u64, StateError> {
        Ok(meta_int(&self.conn, "fingerprint")? as u64)
    }

    fn move_subtrees(&mut self, moves: &[(Anchor, Dn)]) -> Result<Vec<Anchor>, StateError> {
        self.write("moving subtrees", |tx| {
            let mut now: std::collections::HashMap<Anchor, Dn> = std::collections::HashMap::new();
            let mut moved: BTreeSet<Anchor> = BTreeSet::new();
            let mut unsettled = BTreeSet::new();
            for (anchor, to) in moves {
                let from = match now.get(anchor) {
                    Some(d) => Some(d.clone()),
                    None => entry_dn(tx, anchor)?,
                };
                now.insert(anchor.clone(), to.clone());
                let Some(from) = from.filter(|f| f != to) else {
                    continue;
                };
                for a in below_dn(tx, &from)? {
                    let Some(mut e) = load_entry(tx, &a)? else {
                        continue;
                    };
                    let Some(dn) = e.dn.as_ref().and_then(|d| super::rebase_dn(d, &from, to))
                    else {
                        continue;
                    };
                    e.dn = Some(dn);
                    if write_entry(tx, &a, Some(&e), None, &mut unsettled)? {
                        moved.insert(a);
                    }
                }
            }
            settle(tx, unsettled)?;
            if !moved.is_empty() {
                bump(tx)?;
            }
            Ok(moved.into_iter().collect())
        })
    }

    fn container_bindings(&self) -> Result<crate::delta::ContainerBindings, StateError> {
        let v: Option<SqlValue> = self
            .conn
            .prepare_cached("SELECT value FROM meta WHERE key = 'container_bindings'")
            .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
            .ctx("reading the container bindings")?;
        match v {
            None => Ok(crate::delta::ContainerBindings::new()),
            Some(v) => json(
                "meta",
                "container_bindings",
                "value",
                &text("meta", "container_bindings", "value", v)?,
            ),
        }
    }

    fn set_container_bindings(
        &mut self,
        bindings: &crate::delta::ContainerBindings,
    ) -> Result<(), StateError> {
        let value = to_json("the container bindings", bindings)?;
        self.write("recording the container bindings", |tx| {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('container_bindings', ?1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [value],
            )
            .ctx("recording the container bindings")?;
            Ok(())
        })
    }
}

/// The DN of the mirrored object `anchor`, if it has one.
fn entry_dn(conn: &Connection, anchor: &Anchor) -> Result<Option<Dn>, StateError> {
    let dn: Option<Option<String>> = conn
        .prepare_cached("SELECT dn FROM source_objects WHERE anchor = ?1")
        .and_then(|mut s| s.query_row([anchor.as_str()], |r| r.get(0)).optional())
        .ctx("reading a source object's DN")?;
    match dn.flatten() {
        None => Ok(None),
        Some(t) => Dn::parse(&t)
            .map(Some)
            .map_err(|e| corrupt("source_objects", anchor.as_str(), e.to_string())),
    }
}

/// The mirrored objects whose normalized DN ends with `,` and `dn`'s (candidates below it; the
/// caller checks each as a DN). A scan of the table: called only for an object whose DN
/// changed.
fn below_dn(conn: &Connection, dn: &Dn) -> Result<Vec<Anchor>, StateError> {
    let suffix = format!(",{}", dn.normalized());
    let found: Vec<String> = conn
        .prepare_cached(
            "SELECT anchor FROM source_objects WHERE length(dn_norm) > ?1 \
             AND substr(dn_norm, -?1) = ?2 ORDER BY anchor",
        )
        .and_then(|mut s| {
            s.query_map(params![suffix.chars().count() as i64, suffix], |r| {
                r.get::<_, String>(0)
            })?
            .collect()
        })
        .ctx("finding the objects below a DN")?;
    Ok(found.into_iter().map(Anchor::from).collect())
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::delta::OperationKind;
    use crate::model::Attributes;
    use crate::state::testkit;

    #[test]
    fn sqlite_store_keeps_the_contract_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let n = Cell::new(0);
        testkit::store_contract(|| {
            n.set(n.get() + 1);
            let path = dir.path().join(format!("state-{}.db", n.get()));
            Box::new(SqliteStore::open(path).unwrap())
        });
    }

    #[test]
    fn sqlite_store_keeps_the_contract_in_memory() {
        testkit::store_contract(|| Box::new(SqliteStore::open_in_memory().unwrap()));
    }

    fn dn(s: &str) -> Dn {
        Dn::parse(s).unwrap()
    }

    /// The create of `anchor` (a User) with one attribute.
    fn create_op(anchor: &str, attribute: &str, value: &str) -> Operation {
        Operation {
            anchor: anchor.into(),
            source_type: "user".into(),
            target_type: "User".into(),
            kind: OperationKind::Create {
                attributes: [(attribute, crate::model::values([value]))]
                    .into_iter()
                    .collect(),
                secrets: Attributes::new(),
                lookup: Vec::new(),
            },
            reason: crate::delta::Reason::EnteredScope,
        }
    }

    fn populate(s: &mut SqliteStore) {
        let w = Watermark::new("dirsync", vec![0u8, 159, 255, 1]);
        s.apply_changes(
            "ad",
            &[
                Change::Add(
                    Entry::new("u1", "user")
                        .with_dn(dn("cn=Ann,dc=x"))
                        .with("cn", "Ann"),
                ),
                Change::Add(
                    Entry::new("g1", "group").with("member", Value::dn_ref(dn("CN=ann,dc=x"))),
                ),
            ],
            Some(&w),
        )
        .unwrap();
        let run = s
            .begin_run(
                "delta-sync",
                DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            )
            .unwrap();
        let op = create_op("u1", "displayName", "Ann");
        let sent = op.to_target_operation(&Default::default()).unwrap();
        let j = s.journal_intent(run, &op, sent.as_ref()).unwrap();
        s.journal_done(j, &op, sent.as_ref(), Some(&"t1".into()))
            .unwrap();
        s.journal_intent(run, &op, sent.as_ref()).unwrap();
        s.escrow(
            &"g1".into(),
            "Throttled",
            DateTime::from_timestamp(1_700_000_100, 0).unwrap(),
        )
        .unwrap();
        s.put_target_objects(&[TargetObject::new("t2", "Group").with("displayName", "Staff")])
            .unwrap();
        let g = s.begin_full_import("ad").unwrap();
        s.import_entries(g, &[Entry::new("u9", "user")]).unwrap();
    }

    /// Everything a store shows, as text.
    fn snapshot(s: &SqliteStore) -> String {
        let v = s.load_all().unwrap();
        let mut entries: Vec<String> = v.mirror.entries().map(|e| format!("{e:?}")).collect();
        entries.sort();
        let mut links: Vec<String> = v.links.iter().map(|l| format!("{l:?}")).collect();
        links.sort();
        let mut targets: Vec<String> = v.target.objects().map(|o| format!("{o:?}")).collect();
        targets.sort();
        format!(
            "{entries:?}\n{links:?}\n{targets:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
            s.dirty().unwrap(),
            s.watermark("ad").unwrap(),
            s.journal(None).unwrap(),
            s.escrowed().unwrap(),
            s.runs(10).unwrap(),
            s.link_counts().unwrap(),
            s.fingerprint().unwrap(),
        )
    }

    #[test]
    fn reopening_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let before = {
            let mut s = SqliteStore::open(&path).unwrap();
            populate(&mut s);
            snapshot(&s)
        };
        let mut s = SqliteStore::open_with(&path, Durability::Normal).unwrap();
        assert_eq!(snapshot(&s), before);
        assert!(before.contains("u9") && before.contains("t1") && before.contains("Throttled"));
        // The open full import survived too.
        let g = 1;
        let sum = s.finish_full_import("ad", g, None, 0.0).unwrap();
        assert_eq!((sum.seen, sum.added, sum.deleted), (1, 1, 2));
        assert_eq!(
            s.schema_version().unwrap(),
            SqliteStore::supported_schema_version()
        );
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        drop(SqliteStore::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(
            matches!(err, StateError::SchemaTooNew { found, supported }
                if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade dirsync"), "{err}");
    }

    #[test]
    fn a_foreign_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
            .unwrap();
        drop(conn);
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(
            err.to_string().contains("not a dirsync state file"),
            "{err}"
        );
    }

    #[test]
    fn a_version_1_file_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.execute_batch(
                r#"INSERT INTO links VALUES ('u1', 'user', 't1', 'User'), ('u2', 'user', 't2', 'User'),
                       ('g1', 'group', 't3', 'Group');
                   INSERT INTO target_objects VALUES
                       ('t1', 'User', '[["mail",[{"string":"Ann@X"}]]]');
                   PRAGMA user_version = 1;"#,
            )
            .unwrap();
        }
        let mut s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        let counts = s.link_counts().unwrap();
        assert_eq!(counts.get(&"User".into()), Some(&2));
        assert_eq!(counts.get(&"Group".into()), Some(&1));
        // The value index was built from the stored target objects.
        let mut v = Views::default();
        s.load_join_candidates(
            &mut v,
            &[TargetLookup {
                object_type: "User".into(),
                attribute: "mail".into(),
                value: Value::string("ann@x"),
            }],
        )
        .unwrap();
        assert!(v.target.get(&"t1".into()).is_some());
        assert_eq!(
            v.links.anchor_of(&"t1".into()).map(|a| a.as_str()),
            Some("u1")
        );
        // The triggers keep counting after the migration.
        s.put_target_objects(&[TargetObject::new("t4", "User")])
            .unwrap();
        let run = s.begin_run("x", DateTime::UNIX_EPOCH).unwrap();
        let op = Operation {
            anchor: "u2".into(),
            source_type: "user".into(),
            target_type: "User".into(),
            kind: OperationKind::Unlink {
                target_id: "t2".into(),
            },
            reason: crate::delta::Reason::DeletedAtSource,
        };
        let j = s.journal_intent(run, &op, None).unwrap();
        s.journal_done(j, &op, None, None).unwrap();
        assert_eq!(s.link_counts().unwrap().get(&"User".into()), Some(&1));
    }

    #[test]
    fn an_unchanged_full_import_rewrites_no_object() {
        let mut s = SqliteStore::open_in_memory().unwrap();
        let users: Vec<Entry> = (0..50)
            .map(|i| {
                let e = Entry::new(format!("u{i:02}"), "user")
                    .with_dn(dn(&format!("cn=u{i},dc=x")))
                    .with("cn", format!("u{i}").as_str());
                if i > 0 {
                    e.with("manager", Value::dn_ref(dn("cn=u0,dc=x")))
                } else {
                    e
                }
            })
            .collect();
        let group = Entry::new("g", "group")
            .with_dn(dn("cn=g,dc=x"))
            .with("member", Value::dn_ref(dn("cn=u1,dc=x")))
            .with("member", Value::dn_ref(dn("cn=nobody,dc=x")));
        let mut export = users.clone();
        export.push(group.clone());
        let import = |s: &mut SqliteStore, entries: &[Entry]| {
            let g = s.begin_full_import("src").unwrap();
            for batch in entries.chunks(7) {
                s.import_entries(g, batch).unwrap();
            }
            s.finish_full_import("src", g, None, 0.0).unwrap()
        };
        import(&mut s, &export);
        s.clear_dirty(&s.dirty().unwrap()).unwrap();
        // Record every write to the mirror's object and reference rows from now on.
        s.conn
            .execute_batch(
                "CREATE TEMP TABLE touched (what TEXT);
                 CREATE TEMP TRIGGER o_upd AFTER UPDATE ON main.source_objects
                     BEGIN INSERT INTO touched VALUES ('update ' || NEW.anchor); END;
                 CREATE TEMP TRIGGER o_ins AFTER INSERT ON main.source_objects
                     BEGIN INSERT INTO touched VALUES ('insert ' || NEW.anchor); END;
                 CREATE TEMP TRIGGER o_del AFTER DELETE ON main.source_objects
                     BEGIN INSERT INTO touched VALUES ('delete ' || OLD.anchor); END;
                 CREATE TEMP TRIGGER r_ins AFTER INSERT ON main.source_refs
                     BEGIN INSERT INTO touched VALUES ('ref ' || NEW.from_anchor); END;
                 CREATE TEMP TRIGGER r_del AFTER DELETE ON main.source_refs
                     BEGIN INSERT INTO touched VALUES ('unref ' || OLD.from_anchor); END;",
            )
            .unwrap();
        let touched = |s: &SqliteStore| -> Vec<String> {
            let mut st = s
                .conn
                .prepare("SELECT what FROM touched ORDER BY rowid")
                .unwrap();
            let out = st
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            s.conn.execute("DELETE FROM touched", []).unwrap();
            out
        };
        let fingerprint = s.fingerprint().unwrap();
        // The same export again: nothing written but the generations, nothing dirty.
        let sum = import(&mut s, &export);
        assert_eq!(
            (sum.seen, sum.added, sum.changed, sum.deleted),
            (51, 0, 0, 0)
        );
        assert_eq!(touched(&s), Vec::<String>::new());
        assert_eq!(s.dirty().unwrap(), Vec::<Anchor>::new());
        assert_eq!(s.fingerprint().unwrap(), fingerprint);
        // One user changed, one gone (and out of its group): only they and the group are
        // written.
        let mut edited = export.clone();
        edited[7] = edited[7].clone().with("title", "Boss");
        edited.remove(1);
        *edited.last_mut().unwrap() = Entry::new("g", "group")
            .with_dn(dn("cn=g,dc=x"))
            .with("member", Value::dn_ref(dn("cn=nobody,dc=x")));
        let sum = import(&mut s, &edited);
        assert_eq!((sum.seen, sum.changed, sum.deleted), (50, 2, 1));
        let t = touched(&s);
        assert!(t.contains(&"update u07".to_owned()), "{t:?}");
        assert!(t.contains(&"delete u01".to_owned()), "{t:?}");
        assert!(
            t.iter()
                .all(|w| w.ends_with("u07") || w.ends_with("u01") || w.ends_with(" g")),
            "{t:?}"
        );
        // u01's group and manager are dirty with it.
        assert_eq!(
            s.dirty().unwrap(),
            ["g".into(), "u00".into(), "u01".into(), "u07".into()]
        );
        // And the next import of that export is quiet again.
        s.clear_dirty(&s.dirty().unwrap()).unwrap();
        import(&mut s, &edited);
        assert_eq!(touched(&s), Vec::<String>::new());
        assert_eq!(s.dirty().unwrap(), Vec::<Anchor>::new());
    }

    #[test]
    fn a_version_3_file_is_re_encoded_compactly() {
        // Version 3 stored attributes in their serde form, the hash and generation in the
        // object's row: write such a file by hand, as version 3 wrote it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v3.db");
        let ann = Entry::new("u1", "user")
            .with_dn(dn("cn=Ann,dc=x"))
            .with("cn", "Ann")
            .with("mail", "ann@x")
            .with("objectGUID", Value::Bytes(vec![0, 159, 255]));
        let bob = Entry::new("u2", "user")
            .with_dn(dn("cn=Bob,dc=x"))
            .with("manager", Value::dn_ref(dn("cn=Ann,dc=x")));
        let bob_stored = Entry::new("u2", "user")
            .with_dn(dn("cn=Bob,dc=x"))
            .with("manager", Value::anchor_ref("u1"));
        let staff = TargetObject::new("t1", "Group")
            .with("displayName", "Staff")
            .with("members", Value::target_ref("t2"))
            .with("members", Value::target_ref("t3"));
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.execute_batch(SCHEMA_V2).unwrap();
            // Version 3's hash: FNV-1a over type, DN and the serde JSON, of what was delivered.
            let v3_hash = |e: &Entry| {
                let json = serde_json::to_string(&e.attributes).unwrap();
                let mut h = super::super::fnv1a(
                    super::super::FNV_OFFSET,
                    e.object_type.as_str().as_bytes(),
                );
                h = super::super::fnv1a(h, &[0]);
                h = super::super::fnv1a(h, e.dn.as_ref().unwrap().as_str().as_bytes());
                h = super::super::fnv1a(h, &[0]);
                (json.clone(), super::super::fnv1a(h, json.as_bytes()) as i64)
            };
            for (stored, delivered) in [(&ann, &ann), (&bob_stored, &bob)] {
                let (json, _) = v3_hash(stored);
                let (_, hash) = v3_hash(delivered);
                assert!(json.starts_with("[["), "{json}");
                conn.execute(
                    "INSERT INTO source_objects VALUES (?1, ?2, ?3, ?4, ?5, ?6, 7)",
                    params![
                        stored.anchor.as_str(),
                        stored.object_type.as_str(),
                        stored.dn.as_ref().map(|d| d.as_str()),
                        stored.dn.as_ref().map(|d| d.normalized()),
                        json,
                        hash
                    ],
                )
                .unwrap();
            }
            conn.execute(
                "INSERT INTO source_refs VALUES ('u2', 'manager', 'u1', NULL)",
                [],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO target_objects VALUES ('t1', 'Group', ?1)",
                [serde_json::to_string(&staff.attributes).unwrap()],
            )
            .unwrap();
            conn.execute_batch(
                "UPDATE meta SET value = 7 WHERE key = 'generation';
                 INSERT INTO links VALUES ('u1', 'user', 't2', 'User');
                 PRAGMA user_version = 3;",
            )
            .unwrap();
        }
        let mut s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        // The same objects, now in the compact form an administrator can query.
        assert_eq!(s.source_entry(&"u1".into()).unwrap(), Some(ann.clone()));
        assert_eq!(
            s.source_entry(&"u2".into()).unwrap(),
            Some(bob_stored.clone())
        );
        let v = s.load_all().unwrap();
        assert_eq!(v.target.get(&"t1".into()), Some(&staff));
        assert_eq!(
            v.links.anchor_of(&"t2".into()).map(|a| a.as_str()),
            Some("u1")
        );
        let (mail, members, legacy): (String, String, i64) = s
            .conn
            .query_row(
                "SELECT json_extract(o.attributes, '$.mail'), \
                 (SELECT json_extract(attributes, '$.members') FROM target_objects), \
                 (SELECT COUNT(*) FROM source_objects WHERE attributes LIKE '[%') \
                 FROM source_objects o WHERE anchor = 'u1'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((mail.as_str(), legacy), ("ann@x", 0));
        assert_eq!(members, r#"[{"r":"t2"},{"r":"t3"}]"#);
        // The next full import of the same export finds nothing changed: not Ann (hashed
        // anew), not Bob (delivered by DN, the same once resolved), and deletes nothing.
        let g = s.begin_full_import("ad").unwrap();
        assert_eq!(g, 8);
        s.import_entries(g, &[bob.clone(), ann.clone()]).unwrap();
        let sum = s.finish_full_import("ad", g, None, 1.0).unwrap();
        assert_eq!(
            (sum.seen, sum.added, sum.changed, sum.deleted),
            (2, 0, 0, 0)
        );
        assert_eq!(s.dirty().unwrap(), Vec::<Anchor>::new());
        // Bob now carries the hash of what the source delivers: the next import of him is
        // the unchanged fast path, and a real change is still seen.
        let g = s.begin_full_import("ad").unwrap();
        s.import_entries(g, &[bob.clone(), ann.clone().with("title", "Boss")])
            .unwrap();
        let sum = s.finish_full_import("ad", g, None, 1.0).unwrap();
        assert_eq!((sum.seen, sum.changed), (2, 1));
        // Ann changed: she and her referrer Bob are dirty.
        assert_eq!(s.dirty().unwrap(), ["u1".into(), "u2".into()]);
        // The reference rows survived: deleting Ann removes her from Bob.
        s.apply_changes(
            "ad",
            &[Change::Delete {
                anchor: "u1".into(),
                object_type: "user".into(),
            }],
            None,
        )
        .unwrap();
        let bob_now = s.source_entry(&"u2".into()).unwrap().unwrap();
        assert!(bob_now.attributes.get("manager").is_none(), "{bob_now:?}");
    }

    #[test]
    fn a_version_2_file_gets_its_references_by_anchor() {
        // Version 2 kept DN references as imported: write such a file by hand.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v2.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.execute_batch(SCHEMA_V2).unwrap();
            let raw = |e: &Entry| {
                let (json, hash) = encode_entry(e).unwrap();
                let dn = e.dn.as_ref().map(|d| d.as_str().to_owned());
                let norm = e.dn.as_ref().map(|d| d.normalized().to_owned());
                conn.execute(
                    "INSERT INTO source_objects VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1)",
                    params![
                        e.anchor.as_str(),
                        e.object_type.as_str(),
                        dn,
                        norm,
                        json,
                        hash as i64
                    ],
                )
                .unwrap();
                for (attr, by_anchor, to) in entry_ref_keys(e) {
                    let (ta, td) = if by_anchor {
                        (Some(to), None)
                    } else {
                        (None, Some(to))
                    };
                    conn.execute(
                        "INSERT INTO source_refs VALUES (?1, ?2, ?3, ?4)",
                        params![e.anchor.as_str(), attr.as_str(), ta, td],
                    )
                    .unwrap();
                }
            };
            raw(&Entry::new("u1", "user").with_dn(dn("cn=Ann,dc=x")));
            raw(&Entry::new("g1", "group")
                .with_dn(dn("cn=Staff,dc=x"))
                .with("member", Value::dn_ref(dn("CN=ann,dc=x")))
                .with("member", Value::dn_ref(dn("cn=Gone,dc=x"))));
            conn.pragma_update(None, "user_version", 2).unwrap();
        }
        let mut s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        let g1 = s.source_entry(&"g1".into()).unwrap().unwrap();
        assert_eq!(
            g1.attributes.get("member").unwrap()[..],
            [Value::anchor_ref("u1"), Value::dn_ref(dn("cn=Gone,dc=x"))]
        );
        // The reference rows moved with it: deleting u1 removes it from g1.
        s.apply_changes(
            "src",
            &[Change::Delete {
                anchor: "u1".into(),
                object_type: "user".into(),
            }],
            None,
        )
        .unwrap();
        let g1 = s.source_entry(&"g1".into()).unwrap().unwrap();
        assert_eq!(
            g1.attributes.get("member").unwrap()[..],
            [Value::dn_ref(dn("cn=Gone,dc=x"))]
        );
        assert_eq!(s.dirty().unwrap(), ["g1".into(), "u1".into()]);
    }

    #[test]
    fn corrupt_rows_are_errors_naming_table_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut s = SqliteStore::open(&path).unwrap();
        populate(&mut s);
        s.conn
            .execute(
                "UPDATE source_objects SET attributes = '{broken' WHERE anchor = 'u1'",
                [],
            )
            .unwrap();
        for err in [
            s.source_entry(&"u1".into()).unwrap_err(),
            s.load_all().unwrap_err(),
            s.load_neighbourhood(&["g1".into()]).unwrap_err(),
        ] {
            assert!(
                matches!(&err, StateError::Corrupt { table: "source_objects", key, .. } if key == "u1"),
                "{err}"
            );
            assert!(err.to_string().contains("restore a backup"), "{err}");
        }
        // A column of the wrong type, a bad DN, a bad state, a bad time.
        s.conn
            .execute_batch(
                "UPDATE source_objects SET attributes = 42 WHERE anchor = 'u1';
                 UPDATE source_objects SET dn = 'not a dn' WHERE anchor = 'g1';
                 UPDATE journal_payload SET op = '{\"kind\":\"explode\"}' WHERE id = 2;
                 UPDATE escrow SET next_retry = 'tomorrow';
                 UPDATE target_objects SET attributes = '[1,2]' WHERE id = 't2';",
            )
            .unwrap();
        assert!(matches!(
            s.source_entry(&"u1".into()),
            Err(StateError::Corrupt { .. })
        ));
        assert!(matches!(
            s.source_entry(&"g1".into()),
            Err(StateError::Corrupt { table: "source_objects", ref key, .. }) if key == "g1"
        ));
        assert!(matches!(
            s.journal(None),
            Err(StateError::Corrupt { table: "journal", ref key, .. }) if key == "2"
        ));
        assert!(matches!(
            s.escrowed(),
            Err(StateError::Corrupt { table: "escrow", ref key, .. }) if key == "g1"
        ));
        assert!(matches!(
            s.put_target_objects(&[]).and_then(|_| s.load_all()),
            Err(StateError::Corrupt { .. })
        ));
    }

    #[test]
    fn the_delta_path_uses_indexes_only() {
        let s = SqliteStore::open_in_memory().unwrap();
        // Give the planner statistics that make a scan tempting if an index were missing.
        s.conn.execute_batch("ANALYZE").unwrap();
        for sql in INDEXED_QUERIES {
            let mut stmt = s
                .conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap();
            let nulls = vec![SqlValue::Null; stmt.parameter_count()];
            let details: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(!details.is_empty(), "{sql}");
            for d in &details {
                assert!(!d.starts_with("SCAN"), "{sql}: {d}");
            }
            assert!(
                details.iter().any(|d| d.starts_with("SEARCH")),
                "{sql}: {details:?}"
            );
        }
    }

    #[test]
    fn neighbourhood_reads_do_not_grow_with_the_store() {
        // Count the rows SQLite steps through (its VM step counter) for the same neighbourhood
        // in a small and a large store.
        fn steps(n: usize) -> i64 {
            let mut s = SqliteStore::open_in_memory().unwrap();
            let g = s.begin_full_import("src").unwrap();
            let mut batch = Vec::new();
            for i in 0..n {
                batch.push(
                    Entry::new(format!("u{i}"), "user")
                        .with_dn(dn(&format!("cn=u{i},dc=x")))
                        .with("cn", format!("u{i}").as_str()),
                );
            }
            batch.push(
                Entry::new("g", "group")
                    .with("member", Value::dn_ref(dn("cn=u1,dc=x")))
                    .with("member", Value::anchor_ref("u2")),
            );
            s.import_entries(g, &batch).unwrap();
            s.finish_full_import("src", g, None, 0.0).unwrap();
            // Fresh statements: their counters start at zero.
            s.conn.flush_prepared_statement_cache();
            let v = s.load_neighbourhood(&["u1".into()]).unwrap();
            assert_eq!(v.mirror.len(), 3);
            // Every cached statement's full-scan and VM-step counters.
            let mut total = 0;
            for sql in [
                ENTRY_BY_ANCHOR,
                ENTRY_BY_DN,
                REFERRERS,
                LINK_BY_ANCHOR,
                TARGET_BY_ID,
            ] {
                let stmt = s.conn.prepare_cached(sql).unwrap();
                assert_eq!(
                    stmt.get_status(rusqlite::StatementStatus::FullscanStep),
                    0,
                    "{sql}"
                );
                total += i64::from(stmt.get_status(rusqlite::StatementStatus::VmStep));
            }
            total
        }
        let small = steps(1_000);
        let large = steps(20_000);
        assert!(small > 0);
        assert!(
            large <= small + small / 5,
            "neighbourhood cost grew with the store: {small} steps at 1k, {large} at 20k"
        );
    }

    fn value_index(s: &SqliteStore) -> Vec<(String, String)> {
        let mut stmt = s
            .conn
            .prepare("SELECT attribute, id FROM target_values ORDER BY attribute, id")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn declared_lookup_attributes_narrow_the_value_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut s = SqliteStore::open(&path).unwrap();
        s.put_target_objects(&[TargetObject::new("t1", "User")
            .with("mail", "a@x")
            .with("title", "Boss")
            .with("displayName", "Ann")])
            .unwrap();
        // Never declared: every attribute is indexed (as before version 5).
        assert_eq!(value_index(&s).len(), 3);
        let decl: BTreeMap<ObjectType, BTreeSet<AttrName>> = [
            ("User".into(), ["Mail".into()].into_iter().collect()),
            ("Group".into(), ["displayName".into()].into_iter().collect()),
        ]
        .into_iter()
        .collect();
        let fp = s.fingerprint().unwrap();
        s.set_lookup_attributes(&decl).unwrap();
        assert_eq!(s.fingerprint().unwrap(), fp, "the index is no plan input");
        assert_eq!(value_index(&s), [("mail".into(), "t1".into())]);
        // Objects written later: by a put, by a done create; a User's displayName is not
        // indexed, a Group's is.
        s.put_target_objects(&[
            TargetObject::new("t2", "Group").with("displayName", "Staff"),
            TargetObject::new("t3", "User").with("displayName", "Bob"),
        ])
        .unwrap();
        let run = s.begin_run("x", DateTime::UNIX_EPOCH).unwrap();
        let op = create_op("u4", "mail", "d@x");
        let sent = op.to_target_operation(&Default::default()).unwrap();
        let ids = s.journal_intents(run, &[(&op, sent.as_ref())]).unwrap();
        s.journal_outcomes(&[JournalOutcome::Done {
            id: ids[0],
            op: &op,
            sent: sent.as_ref(),
            target_id: Some(&"t4".into()),
        }])
        .unwrap();
        let want: Vec<(String, String)> = vec![
            ("displayname".into(), "t2".into()),
            ("mail".into(), "t1".into()),
            ("mail".into(), "t4".into()),
        ];
        assert_eq!(value_index(&s), want);
        // The declaration is kept in the file: reopened, the store indexes the same.
        drop(s);
        let mut s = SqliteStore::open(&path).unwrap();
        s.put_target_objects(&[TargetObject::new("t5", "User").with("title", "x")])
            .unwrap();
        assert_eq!(value_index(&s), want);
        s.set_lookup_attributes(&decl).unwrap();
        assert_eq!(value_index(&s), want);
        // A new declaration rebuilds the index.
        let decl: BTreeMap<ObjectType, BTreeSet<AttrName>> =
            [("User".into(), ["title".into()].into_iter().collect())]
                .into_iter()
                .collect();
        s.set_lookup_attributes(&decl).unwrap();
        assert_eq!(
            value_index(&s),
            [("title".into(), "t1".into()), ("title".into(), "t5".into())]
        );
    }

    #[test]
    fn the_value_index_follows_writes_updates_and_deletes() {
        let mut s = SqliteStore::open_in_memory().unwrap();
        let keys = |s: &SqliteStore| -> Vec<(String, String, String)> {
            let mut stmt = s
                .conn
                .prepare("SELECT attribute, value_key, id FROM target_values ORDER BY 1, 2, 3")
                .unwrap();
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        let k = |a: &str, v: &str, id: &str| {
            (
                a.to_owned(),
                format!("{{\"string\":\"{v}\"}}"),
                id.to_owned(),
            )
        };
        s.put_target_objects(&[
            TargetObject::new("t1", "User")
                .with("mail", "A@x")
                .with("cn", "a"),
            TargetObject::new("t2", "User").with("mail", "b@x"),
        ])
        .unwrap();
        assert_eq!(
            keys(&s),
            [
                k("cn", "a", "t1"),
                k("mail", "a@x", "t1"),
                k("mail", "b@x", "t2")
            ]
        );
        // Replaced by a put: the old values leave the index.
        s.put_target_objects(&[TargetObject::new("t1", "User").with("mail", "c@x")])
            .unwrap();
        assert_eq!(keys(&s), [k("mail", "b@x", "t2"), k("mail", "c@x", "t1")]);
        // Updated by a done operation, then deleted.
        let run = s.begin_run("x", DateTime::UNIX_EPOCH).unwrap();
        let changes = vec![crate::model::AttributeChange::replace(
            "mail",
            crate::model::values(["d@x"]),
        )];
        let mut op = create_op("u1", "mail", "c@x");
        op.kind = OperationKind::Update {
            target: crate::delta::TargetRef::Existing("t1".into()),
            changes: changes.clone(),
        };
        let sent = TargetOperation::Update {
            id: "t1".into(),
            object_type: "User".into(),
            changes,
        };
        let j = s.journal_intent(run, &op, Some(&sent)).unwrap();
        s.journal_done(j, &op, Some(&sent), None).unwrap();
        assert_eq!(keys(&s), [k("mail", "b@x", "t2"), k("mail", "d@x", "t1")]);
        s.remove_target_objects(&["t2".into()]).unwrap();
        assert_eq!(keys(&s), [k("mail", "d@x", "t1")]);
        // A stored row that does not decode is re-indexed all the same.
        s.conn
            .execute(
                "UPDATE target_objects SET attributes = '[1' WHERE id = 't1'",
                [],
            )
            .unwrap();
        s.put_target_objects(&[TargetObject::new("t1", "User").with("mail", "e@x")])
            .unwrap();
        assert_eq!(keys(&s), [k("mail", "e@x", "t1")]);
    }

    #[test]
    fn retention_can_be_turned_off() {
        let mut s = SqliteStore::open_in_memory().unwrap();
        assert_eq!(s.retention(), Some(Retention::default()));
        s.set_retention(None);
        let day = chrono::TimeDelta::days(1);
        for i in 0..3 {
            let r = s
                .begin_run("x", DateTime::UNIX_EPOCH + day * (i * 400))
                .unwrap();
            s.finish_run(r, DateTime::UNIX_EPOCH + day * (i * 400), "ok", "{}")
                .unwrap();
        }
        assert_eq!(s.runs(10).unwrap().len(), 3);
        s.set_retention(Some(Retention { runs: 1, days: 1 }));
        let r = s.begin_run("x", DateTime::UNIX_EPOCH + day * 1200).unwrap();
        s.finish_run(r, DateTime::UNIX_EPOCH + day * 1200, "ok", "{}")
            .unwrap();
        assert_eq!(s.runs(10).unwrap().len(), 1);
    }

    #[test]
    fn a_version_3_file_gets_a_lean_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v3.db");
        let create = create_op("u1", "displayName", "Ann");
        let sent_c = create.to_target_operation(&Default::default()).unwrap();
        let changes = vec![crate::model::AttributeChange::replace(
            "title",
            crate::model::values(["Boss"]),
        )];
        let update = Operation {
            kind: OperationKind::Update {
                target: crate::delta::TargetRef::Existing("t1".into()),
                changes: changes.clone(),
            },
            ..create.clone()
        };
        let sent_u = TargetOperation::Update {
            id: "t1".into(),
            object_type: "User".into(),
            changes,
        };
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.execute_batch(SCHEMA_V2).unwrap();
            conn.execute_batch(
                "INSERT INTO runs (id, profile, started, finished) \
                 VALUES (1, 'delta-sync', '2026-01-01T00:00:00Z', '2026-01-01T00:01:00Z');
                 INSERT INTO target_objects VALUES ('t1', 'User', '[[\"title\",[{\"string\":\"Boss\"}]]]');
                 INSERT INTO target_values VALUES ('title', '{\"string\":\"boss\"}', 't1');",
            )
            .unwrap();
            let rows: [(&str, &Operation, &TargetOperation, &str, Option<&str>); 4] = [
                ("u1", &create, sent_c.as_ref().unwrap(), "done", Some("t1")),
                ("u1", &update, &sent_u, "done", Some("t1")),
                ("u1", &update, &sent_u, "failed", None),
                ("u1", &update, &sent_u, "intended", None),
            ];
            for (anchor, op, sent, state, tid) in rows {
                conn.execute(
                    "INSERT INTO journal (run, anchor, kind, op, sent, state, target_id) \
                     VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        anchor,
                        op.kind.name(),
                        serde_json::to_string(op).unwrap(),
                        serde_json::to_string(sent).unwrap(),
                        state,
                        tid
                    ],
                )
                .unwrap();
            }
            conn.pragma_update(None, "user_version", 3).unwrap();
        }
        let before = std::fs::metadata(&path).unwrap().len();
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        let journal = s.journal(None).unwrap();
        let compact: Vec<_> = journal
            .iter()
            .map(|r| {
                (
                    r.kind.as_str(),
                    r.state,
                    r.operation.is_some(),
                    r.sent.is_some(),
                    r.attributes.clone(),
                )
            })
            .collect();
        assert_eq!(
            compact,
            [
                ("create", JournalState::Done, false, false, vec![]),
                (
                    "update",
                    JournalState::Done,
                    false,
                    false,
                    vec!["title".into()]
                ),
                ("update", JournalState::Failed, true, true, vec![]),
                ("update", JournalState::Intended, true, true, vec![]),
            ]
        );
        assert_eq!(journal[0].target_id, Some("t1".into()));
        // Recovery still finds the intended row whole.
        let pending = s.journal_unconfirmed().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].operation, update);
        assert_eq!(pending[0].sent.as_ref(), Some(&sent_u));
        // The value index is kept until the engine declares its lookup attributes.
        assert_eq!(value_index(&s), [("title".into(), "t1".into())]);
        // The migration left no free pages behind.
        let free: i64 = s
            .conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))
            .unwrap();
        assert_eq!(free, 0);
        assert!(before > 0);
    }
}
