//! [`SqliteStore`]: the embedded durable state store (feature `sqlite`), one SQLite file.
//!
//! The tables are meant to be read by an administrator with the `sqlite3` shell: payloads are
//! JSON, times RFC 3339 text, states words. Every mutating call is one `IMMEDIATE` transaction;
//! every lookup the delta path makes goes through a primary key or an index (the tests check the
//! query plans), so a delta costs in proportion to its neighbourhood, not to the store.
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

use super::{
    check_import_share, encode_entry, entry_references, link_target, lookup_key, redact_operation,
    redact_target_operation, target_effect, unlinks, Escrow, FullImportSummary, JournalEntry,
    JournalId, JournalState, RefTarget, RunId, RunRecord, StateError, StateStore, TargetLookup,
    Views,
};
use crate::connector::{TargetOperation, Watermark};
use crate::delta::{
    remove_references_to, resolve_change_values, resolve_references, Link, Operation, OperationKind,
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
const SCHEMA_VERSION: i64 = 3;

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
        after: Some(resolve_stored_references),
    },
];

/// Version 3: references are kept by anchor (no table changes; the data step resolves the DN
/// references that name mirrored objects, as an import now does).
const SCHEMA_V3: &str = "";

// The statements of the delta path; the tests check each uses an index.
const ENTRY_COLUMNS: &str = "anchor, object_type, dn, attributes";
const ENTRY_BY_ANCHOR: &str =
    "SELECT anchor, object_type, dn, attributes FROM source_objects WHERE anchor = ?1";
const ENTRY_BY_DN: &str =
    "SELECT anchor, object_type, dn, attributes FROM source_objects WHERE dn_norm = ?1 ORDER BY anchor";
const ANCHORS_BY_DN: &str = "SELECT anchor FROM source_objects WHERE dn_norm = ?1";
const ROW_STATE: &str =
    "SELECT content_hash, generation, dn_norm FROM source_objects WHERE anchor = ?1";
const REFERRERS: &str = "SELECT from_anchor FROM source_refs WHERE to_anchor = ?1 \
     UNION SELECT from_anchor FROM source_refs WHERE to_dn_norm = ?2";
const REFS_FROM: &str =
    "SELECT attribute, to_anchor, to_dn_norm FROM source_refs WHERE from_anchor = ?1";
const WAITING: &str = "SELECT DISTINCT from_anchor FROM source_refs WHERE to_dn_norm = ?1";
const REFERRING: &str = "SELECT DISTINCT from_anchor FROM source_refs WHERE to_anchor = ?1";
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
    REFERRERS,
    REFS_FROM,
    WAITING,
    REFERRING,
    LINK_BY_ANCHOR,
    LINK_BY_TARGET,
    TARGET_BY_ID,
    TARGET_LOOKUP,
    "DELETE FROM source_refs WHERE from_anchor = ?1",
    "DELETE FROM target_values WHERE id = ?1",
    "DELETE FROM links WHERE anchor = ?1 OR target_id = ?2",
    "SELECT 1 FROM runs WHERE id = ?1",
];

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
        let mut store = SqliteStore { conn };
        store.migrate()?;
        Ok(store)
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
        tx.commit().ctx("committing the schema migration")
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
    let mapped = stmt
        .query_map(params, |r| {
            (0..n)
                .map(|i| r.get::<_, SqlValue>(i))
                .collect::<Result<Vec<_>, _>>()
        })
        .ctx(what)?;
    mapped.collect::<Result<Vec<_>, _>>().ctx(what)
}

fn take(row: &mut [SqlValue], i: usize) -> SqlValue {
    row.get_mut(i)
        .map(|v| std::mem::replace(v, SqlValue::Null))
        .unwrap_or(SqlValue::Null)
}

fn decode_entry(mut row: Vec<SqlValue>) -> Result<Entry, StateError> {
    const T: &str = "source_objects";
    let anchor = text(T, "?", "anchor", take(&mut row, 0))?;
    let object_type = text(T, &anchor, "object_type", take(&mut row, 1))?;
    let dn = opt_text(T, &anchor, "dn", take(&mut row, 2))?;
    let attributes = text(T, &anchor, "attributes", take(&mut row, 3))?;
    let dn = match dn {
        Some(d) => {
            Some(Dn::try_from(d).map_err(|e| corrupt(T, &anchor, format!("column dn: {e}")))?)
        }
        None => None,
    };
    let attributes: Attributes = json(T, &anchor, "attributes", &attributes)?;
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
    let attributes: Attributes = json(T, &id, "attributes", &attributes)?;
    Ok(TargetObject {
        id: id.into(),
        object_type: object_type.into(),
        attributes,
    })
}

const JOURNAL_COLUMNS: &str = "id, run, op, sent, state, target_id, error, retryable";

fn decode_journal(mut row: Vec<SqlValue>) -> Result<JournalEntry, StateError> {
    const T: &str = "journal";
    let id = int(T, "?", "id", take(&mut row, 0))?;
    let key = id.to_string();
    let run = int(T, &key, "run", take(&mut row, 1))?;
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
    conn.prepare_cached(
        "UPDATE source_objects SET attributes = ?2, \
         content_hash = CASE WHEN ?4 THEN ?3 ELSE content_hash END WHERE anchor = ?1",
    )
    .and_then(|mut s| s.execute(params![entry.anchor.as_str(), json, hash as i64, rehash]))
    .ctx("rewriting a source object")?;
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

/// Migration 3's data step: the DN references that name mirrored objects become anchors.
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
                conn.prepare_cached("UPDATE source_objects SET generation = ?2 WHERE anchor = ?1")
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
            conn.prepare_cached(
                "UPDATE source_objects SET content_hash = ?2, generation = ?3 WHERE anchor = ?1",
            )
            .and_then(|mut s| s.execute(params![anchor.as_str(), h, generation]))
            .ctx("recording a source object's hash")?;
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
                "INSERT INTO source_objects \
                 (anchor, object_type, dn, dn_norm, attributes, content_hash, generation) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                 ON CONFLICT (anchor) DO UPDATE SET object_type = excluded.object_type, \
                 dn = excluded.dn, dn_norm = excluded.dn_norm, attributes = excluded.attributes, \
                 content_hash = excluded.content_hash, generation = excluded.generation",
            )
            .and_then(|mut s| {
                s.execute(params![
                    anchor.as_str(),
                    e.object_type.as_str(),
                    e.dn.as_ref().map(|d| d.as_str()),
                    new_dn,
                    attrs,
                    hash,
                    generation
                ])
            })
            .ctx("writing a source object")?;
            insert_refs(conn, anchor, &new_refs)?;
        }
        _ => {
            conn.prepare_cached("DELETE FROM source_objects WHERE anchor = ?1")
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

/// The index keys of a target object's values: (attribute lower-cased, value key).
fn value_keys(o: &TargetObject) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, values) in o.attributes.iter() {
        for v in values {
            if let Some(k) = value_key(v) {
                out.push((name.as_str().to_lowercase(), k));
            }
        }
    }
    out.sort();
    out.dedup();
    out
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

fn write_target(conn: &Connection, o: &TargetObject) -> Result<(), StateError> {
    let attrs = to_json(&format!("target object {}", o.id), &o.attributes)?;
    conn.prepare_cached(
        "INSERT INTO target_objects (id, object_type, attributes) VALUES (?1, ?2, ?3) \
         ON CONFLICT (id) DO UPDATE SET object_type = excluded.object_type, \
         attributes = excluded.attributes",
    )
    .and_then(|mut s| s.execute(params![o.id.as_str(), o.object_type.as_str(), attrs]))
    .ctx("writing a target object")?;
    index_target(conn, o)
}

fn index_target(conn: &Connection, o: &TargetObject) -> Result<(), StateError> {
    conn.prepare_cached("DELETE FROM target_values WHERE id = ?1")
        .and_then(|mut s| s.execute([o.id.as_str()]))
        .ctx("re-indexing a target object")?;
    let mut ins = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO target_values (attribute, value_key, id) VALUES (?1, ?2, ?3)",
        )
        .ctx("indexing a target object")?;
    for (attr, key) in value_keys(o) {
        ins.execute(params![attr, key, o.id.as_str()])
            .ctx("indexing a target object")?;
    }
    Ok(())
}

fn delete_target(conn: &Connection, id: &TargetId) -> Result<bool, StateError> {
    conn.prepare_cached("DELETE FROM target_values WHERE id = ?1")
        .and_then(|mut s| s.execute([id.as_str()]))
        .ctx("un-indexing a target object")?;
    let n = conn
        .prepare_cached("DELETE FROM target_objects WHERE id = ?1")
        .and_then(|mut s| s.execute([id.as_str()]))
        .ctx("deleting a target object")?;
    Ok(n > 0)
}

/// Migration 2's data step: indexes the values of every stored target object.
fn rebuild_target_values(conn: &Connection) -> Result<(), StateError> {
    conn.execute("DELETE FROM target_values", [])
        .ctx("clearing the target value index")?;
    let all = rows(
        conn,
        "SELECT id, object_type, attributes FROM target_objects",
        [],
        "reading target objects",
    )?;
    for r in all {
        index_target(conn, &decode_target(r)?)?;
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
    super::check_changes(changes, |a| Ok(row_state(conn, a)?.is_some()))
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
            for e in entries {
                let before = row_state(tx, &e.anchor)?;
                match &before {
                    Some(b) if b.generation == g => {
                        // Delivered before in this import: at another DN it is another object.
                        let dn_norm = e.dn.as_ref().map(|d| d.normalized());
                        if b.dn_norm.is_some()
                            && dn_norm.is_some()
                            && b.dn_norm.as_deref() != dn_norm
                        {
                            let first = load_entry(tx, &e.anchor)?.and_then(|f| f.dn);
                            super::same_object(&e.anchor, first.as_ref(), e.dn.as_ref())?;
                        }
                    }
                    Some(_) => seen += 1,
                    None => {
                        seen += 1;
                        added += 1;
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
                "SELECT anchor FROM source_objects WHERE generation <> ?1 ORDER BY anchor",
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
            raw.push(
                (0..4)
                    .map(|i| r.get::<_, SqlValue>(i))
                    .collect::<Result<Vec<_>, _>>()
                    .ctx("reading the source mirror")?,
            );
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
            raw.push(
                (0..3)
                    .map(|i| r.get::<_, SqlValue>(i))
                    .collect::<Result<Vec<_>, _>>()
                    .ctx("reading the target mirror")?,
            );
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
            let found: Vec<TargetObject> = match value_key(&l.value) {
                Some(key) => {
                    let mut out = Vec::new();
                    for mut r in rows(
                        conn,
                        TARGET_LOOKUP,
                        params![l.attribute.as_str().to_lowercase(), key],
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
                    // Values too long (or of a kind) not indexed: scan.
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
        let op_json = to_json("a journaled operation", &redact_operation(op))?;
        let sent_json = match sent {
            Some(s) => Some(to_json(
                "a journaled target operation",
                &redact_target_operation(op, s),
            )?),
            None => None,
        };
        self.write("journaling an operation", |tx| {
            let known = tx
                .prepare_cached("SELECT 1 FROM runs WHERE id = ?1")
                .and_then(|mut s| s.exists([run.0]))
                .ctx("checking the run")?;
            if !known {
                return Err(StateError::UnknownRun(run));
            }
            tx.prepare_cached(
                "INSERT INTO journal (run, anchor, kind, op, sent, state) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 'intended')",
            )
            .and_then(|mut s| {
                s.execute(params![
                    run.0,
                    op.anchor.as_str(),
                    op.kind.name(),
                    op_json,
                    sent_json
                ])
            })
            .ctx("journaling an operation")?;
            Ok(JournalId(tx.last_insert_rowid()))
        })
    }

    fn journal_done(
        &mut self,
        id: JournalId,
        op: &Operation,
        sent: Option<&TargetOperation>,
        target_id: Option<&TargetId>,
    ) -> Result<(), StateError> {
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
        self.write("recording a done operation", |tx| {
            let n = tx
                .prepare_cached(
                    "UPDATE journal SET state = 'done', target_id = ?2, error = NULL, \
                     retryable = 0 WHERE id = ?1",
                )
                .and_then(|mut s| s.execute(params![id.0, recorded.as_ref().map(|t| t.as_str())]))
                .ctx("recording a done operation")?;
            if n == 0 {
                return Err(StateError::UnknownJournalId(id));
            }
            if let Some(t) = link_to {
                put_link(
                    tx,
                    &Link {
                        anchor: op.anchor.clone(),
                        source_type: op.source_type.clone(),
                        target_id: t,
                        target_type: op.target_type.clone(),
                    },
                )?;
            } else if let Some(t) = unlinks(op) {
                tx.prepare_cached("DELETE FROM links WHERE anchor = ?1 AND target_id = ?2")
                    .and_then(|mut s| s.execute([op.anchor.as_str(), t.as_str()]))
                    .ctx("removing a link")?;
            }
            if let Some((tid, effect)) = effect {
                match effect {
                    TargetOperation::Create {
                        object_type,
                        attributes,
                    } => write_target(
                        tx,
                        &TargetObject {
                            id: tid,
                            object_type,
                            attributes,
                        },
                    )?,
                    TargetOperation::Update { changes, .. } => {
                        if let Some(mut o) = load_target(tx, &tid)? {
                            for c in &changes {
                                let _ = o.attributes.apply(c, false);
                            }
                            write_target(tx, &o)?;
                        }
                    }
                    TargetOperation::Delete { .. } => {
                        delete_target(tx, &tid)?;
                    }
                }
            }
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
            let n = tx
                .prepare_cached(
                    "UPDATE journal SET state = 'failed', error = ?2, retryable = ?3 WHERE id = ?1",
                )
                .and_then(|mut s| s.execute(params![id.0, error, retryable]))
                .ctx("recording a failed operation")?;
            if n == 0 {
                return Err(StateError::UnknownJournalId(id));
            }
            Ok(())
        })
    }

    fn journal_unconfirmed(&self) -> Result<Vec<JournalEntry>, StateError> {
        rows(
            &self.conn,
            &format!("SELECT {JOURNAL_COLUMNS} FROM journal WHERE state = 'intended' ORDER BY id"),
            [],
            "reading the journal",
        )?
        .into_iter()
        .map(decode_journal)
        .collect()
    }

    fn journal(&self, run: Option<RunId>) -> Result<Vec<JournalEntry>, StateError> {
        let found = match run {
            Some(r) => rows(
                &self.conn,
                &format!("SELECT {JOURNAL_COLUMNS} FROM journal WHERE run = ?1 ORDER BY id"),
                [r.0],
                "reading the journal",
            )?,
            None => rows(
                &self.conn,
                &format!("SELECT {JOURNAL_COLUMNS} FROM journal ORDER BY id"),
                [],
                "reading the journal",
            )?,
        };
        found.into_iter().map(decode_journal).collect()
    }

    fn put_target_objects(&mut self, objects: &[TargetObject]) -> Result<(), StateError> {
        self.write("writing target objects", |tx| {
            for o in objects {
                write_target(tx, o)?;
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
        let op = Operation {
            anchor: "u1".into(),
            source_type: "user".into(),
            target_type: "User".into(),
            kind: OperationKind::Create {
                attributes: [("displayName", crate::model::values(["Ann"]))]
                    .into_iter()
                    .collect(),
                secrets: Attributes::new(),
                lookup: Vec::new(),
            },
            reason: crate::delta::Reason::EnteredScope,
        };
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
                 UPDATE journal SET op = '{\"kind\":\"explode\"}' WHERE id = 1;
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
            Err(StateError::Corrupt { table: "journal", ref key, .. }) if key == "1"
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
}
