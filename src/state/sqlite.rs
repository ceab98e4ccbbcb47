//! [`SqliteStore`]: the embedded durable state store (feature `sqlite`), one SQLite file.
//!
//! The tables are meant to be read by an administrator with the `sqlite3` shell: journal
//! payloads are JSON, times RFC 3339 text, states words. The mirrors are lean (schema version
//! 6): a source object has an integer id keying its state and reference rows, attribute names
//! are stored once (`attr_names`) and a row's attributes are the binary form of
//! [`encoding`](super::encoding), which [`SqliteStore::dump`] prints as JSON. Every mutating
//! call is one `IMMEDIATE` transaction;
//! every lookup the delta path makes goes through a primary key or an index (the tests check the
//! query plans), so a delta costs in proportion to its neighbourhood, not to the store.
//!
//! The journal is two tables: `journal`, one small row per operation (run, anchor, kind, state,
//! target id, the attributes an update changed as a JSON array, error), and `journal_payload`,
//! the planned and sent operations as JSON, kept only while the row is intended or failed
//! (see the [journal's promises](super#the-journal-what-it-keeps-and-for-how-long)). The sent
//! operation is written as the translations of the planned one's pending references alone
//! (`{"derived":{"<anchor>":"<target id>"}}`) when those give it back exactly and that is
//! shorter — a create's attributes are then written once, not twice (`payload.rs`). A batch of
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
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use rustc_hash::FxHashMap;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use smol_str::SmolStr;
use std::cell::{Cell, RefCell};

use super::encoding::{
    decode_attributes, decode_binary, decode_binary_refs, encode_attributes, encode_binary,
    StoredRef,
};
use super::heads::{Heads, TxHeads};
use super::payload;
use super::{
    audit_attributes, check_import_share, done_effect, encode_entry, entry_hash_into,
    entry_references, lookup_key, lower_lookup_attributes, redacted_operation,
    redacted_target_operation, unlinks, Escrow, FullImportSummary, JournalEntry, JournalId,
    JournalOutcome, JournalRecord, JournalState, LookupAttributes, PageMark, Pruned, Reach,
    RefTarget, Retention, RunId, RunRecord, StateError, StateStore, TargetLookup, Views,
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
    /// transaction — except for a full import's batches ([`StateStore::import_entries`]),
    /// which hold none of those: they are committed without waiting (`NORMAL`), and the
    /// import's end, which commits its watermark, waits for them too (the write-ahead log is
    /// written in order). A batch a power loss takes back is read again by the next full
    /// import, as the import it belonged to never finished.
    #[default]
    Full,
    /// `synchronous=NORMAL`: in WAL mode the file is never corrupted, but a power loss or OS
    /// crash (not a process crash) may roll back the last committed transactions; an export
    /// repeated after that relies on the engine's idempotence (a create that collides joins).
    Normal,
}

/// The schema version this build writes.
const SCHEMA_VERSION: i64 = 7;

/// A migration's data step: work SQL cannot do, run in the migration's transaction.
type DataStep = fn(&Db<'_>) -> Result<(), StateError>;

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

/// The triggers that keep `link_counts` (version 2; recreated by version 6 with `links`).
macro_rules! link_count_triggers {
    () => {
        r#"
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
"#
    };
}

/// Version 2: link counts kept by triggers (the deletion guard reads them without counting
/// the link table), and an index of target attribute values for join lookups.
const SCHEMA_V2: &str = concat!(
    r#"
CREATE TABLE link_counts (target_type TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO link_counts (target_type, n) SELECT target_type, COUNT(*) FROM links GROUP BY target_type;
"#,
    link_count_triggers!(),
    r#"CREATE TABLE target_values (
    attribute TEXT NOT NULL,
    value_key TEXT NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (attribute, value_key, id)
) WITHOUT ROWID;
CREATE INDEX target_values_id ON target_values (id);
"#
);

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
    Migration {
        version: 6,
        sql: SCHEMA_V6,
        after: Some(lean_mirrors),
    },
    Migration {
        version: 7,
        sql: SCHEMA_V7,
        after: None,
    },
];

/// Version 7 changes no table: a journal intent may hold its sent form as the translations of
/// its pending references alone (`payload.rs`), which a dirsync that knows version 6 would not
/// read when it recovers; the version makes such a dirsync refuse the file instead.
const SCHEMA_V7: &str = "";

/// Version 6: lean mirrors. Attribute names are stored once, in `attr_names`; a mirror row's
/// `attributes` is the binary form of [`encoding`](super::encoding) naming attributes by id
/// (read them with [`SqliteStore::dump`]). A source object has an integer id (`source_objects.id`,
/// in arrival order), which keys its `source_state` row and its reference rows: `source_refs`
/// holds (referenced id, referrer id) pairs, `source_refs_open` the references to an anchor not
/// mirrored or to a DN no mirrored object has (by text), and which attribute refers is read
/// from the referrer's attributes. The normalized DN is no longer stored: `dn_key` holds its
/// 64-bit hash (indexed; a lookup compares the DNs it finds). Links are keyed by anchor
/// without a rowid. A target value's index key is the lower-cased string itself (other kinds
/// keep their JSON, after a marker). The data step moves every row.
const SCHEMA_V6: &str = concat!(
    r#"
CREATE TABLE attr_names (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
DROP INDEX source_objects_dn_norm;
DROP INDEX source_refs_from;
DROP INDEX source_refs_to_anchor;
DROP INDEX source_refs_to_dn_norm;
ALTER TABLE source_objects RENAME TO source_objects_v5;
ALTER TABLE source_state RENAME TO source_state_v5;
ALTER TABLE source_refs RENAME TO source_refs_v5;
ALTER TABLE target_objects RENAME TO target_objects_v5;
ALTER TABLE links RENAME TO links_v5;
CREATE TABLE source_objects (
    id INTEGER PRIMARY KEY,
    anchor TEXT NOT NULL UNIQUE,
    object_type TEXT NOT NULL,
    dn TEXT,
    dn_key INTEGER,
    attributes BLOB NOT NULL
);
CREATE INDEX source_objects_dn_key ON source_objects (dn_key) WHERE dn_key IS NOT NULL;
CREATE TABLE source_state (
    id INTEGER PRIMARY KEY,
    content_hash INTEGER NOT NULL,
    generation INTEGER NOT NULL
);
CREATE TABLE source_refs (
    to_id INTEGER NOT NULL,
    from_id INTEGER NOT NULL,
    PRIMARY KEY (to_id, from_id)
) WITHOUT ROWID;
CREATE TABLE source_refs_open (
    target TEXT NOT NULL,
    by_dn INTEGER NOT NULL,
    from_id INTEGER NOT NULL,
    PRIMARY KEY (target, by_dn, from_id)
) WITHOUT ROWID;
CREATE TABLE target_objects (
    id TEXT PRIMARY KEY,
    object_type TEXT NOT NULL,
    attributes BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE links (
    anchor TEXT PRIMARY KEY,
    source_type TEXT NOT NULL,
    target_id TEXT NOT NULL UNIQUE,
    target_type TEXT NOT NULL
) WITHOUT ROWID;
INSERT INTO links (anchor, source_type, target_id, target_type)
    SELECT anchor, source_type, target_id, target_type FROM links_v5;
DROP TABLE links_v5;
"#,
    link_count_triggers!()
);

/// Version 6's references, moved by SQL once the objects have their ids.
const SCHEMA_V6_REFS: &str = r#"
INSERT OR IGNORE INTO source_refs (to_id, from_id)
    SELECT t.id, f.id FROM source_refs_v5 r
    JOIN source_objects f ON f.anchor = r.from_anchor
    JOIN source_objects t ON t.anchor = r.to_anchor;
INSERT OR IGNORE INTO source_refs_open (target, by_dn, from_id)
    SELECT r.to_anchor, 0, f.id FROM source_refs_v5 r
    JOIN source_objects f ON f.anchor = r.from_anchor
    WHERE r.to_anchor IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM source_objects t WHERE t.anchor = r.to_anchor);
INSERT OR IGNORE INTO source_refs_open (target, by_dn, from_id)
    SELECT r.to_dn_norm, 1, f.id FROM source_refs_v5 r
    JOIN source_objects f ON f.anchor = r.from_anchor
    WHERE r.to_anchor IS NULL AND r.to_dn_norm IS NOT NULL;
DROP TABLE source_refs_v5;
DROP TABLE source_state_v5;
DROP TABLE source_objects_v5;
DROP TABLE target_objects_v5;
"#;

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

// The statements of the delta path; the tests check each uses an index. Each table's SQL is
// here (and in the few functions that run it), so a layout change is one place.
const ENTRY_COLUMNS: &str = "anchor, object_type, dn, attributes";
const ENTRY_BY_ANCHOR: &str =
    "SELECT anchor, object_type, dn, attributes FROM source_objects WHERE anchor = ?1";
const ANCHORS_BY_DN: &str = "SELECT anchor, dn, id FROM source_objects WHERE dn_key = ?1";
const ROW_STATE: &str = "SELECT s.content_hash, s.generation, o.dn, o.id FROM source_objects o \
     JOIN source_state s ON s.id = o.id WHERE o.anchor = ?1";
/// Moves the generation of the object `?1` to `?3` if its hash is `?2` and its generation is
/// another (an unchanged object a full import sees for the first time).
const SEEN_UNCHANGED: &str = "UPDATE source_state SET generation = ?3 \
     WHERE id = (SELECT id FROM source_objects WHERE anchor = ?1) \
     AND content_hash = ?2 AND generation <> ?3";
/// [`SEEN_UNCHANGED`] for the object with row id `?1`.
const SEEN_UNCHANGED_ID: &str = "UPDATE source_state SET generation = ?3 \
     WHERE id = ?1 AND content_hash = ?2 AND generation <> ?3";
const OBJECT_ID: &str = "SELECT id FROM source_objects WHERE anchor = ?1";
/// The referrers of the object `?1` (an anchor) and of the DN `?2` (normalized).
const REFERRERS: &str = "SELECT f.anchor FROM source_objects t \
     JOIN source_refs r ON r.to_id = t.id JOIN source_objects f ON f.id = r.from_id \
     WHERE t.anchor = ?1 \
     UNION SELECT f.anchor FROM source_refs_open r JOIN source_objects f ON f.id = r.from_id \
     WHERE r.target = ?1 AND r.by_dn = 0 \
     UNION SELECT f.anchor FROM source_refs_open r JOIN source_objects f ON f.id = r.from_id \
     WHERE r.target = ?2 AND r.by_dn = 1";
/// The objects whose references wait for the anchor `?1` (not mirrored until now).
const WAITING_ANCHOR: &str = "SELECT f.anchor FROM source_refs_open r \
     JOIN source_objects f ON f.id = r.from_id WHERE r.target = ?1 AND r.by_dn = 0";
/// The objects whose references wait for the DN `?1` (normalized).
const WAITING: &str = "SELECT f.anchor FROM source_refs_open r \
     JOIN source_objects f ON f.id = r.from_id WHERE r.target = ?1 AND r.by_dn = 1";
/// The objects that refer to the object with id `?1` or anchor `?2`.
const REFERRING: &str =
    "SELECT f.anchor FROM source_refs r JOIN source_objects f ON f.id = r.from_id \
     WHERE r.to_id = ?1 \
     UNION SELECT f.anchor FROM source_refs_open r JOIN source_objects f ON f.id = r.from_id \
     WHERE r.target = ?2 AND r.by_dn = 0";
const REF_INSERT: &str = "INSERT OR IGNORE INTO source_refs (to_id, from_id) VALUES (?1, ?2)";
const REF_DELETE: &str = "DELETE FROM source_refs WHERE to_id = ?1 AND from_id = ?2";
const OPEN_REF_INSERT: &str =
    "INSERT OR IGNORE INTO source_refs_open (target, by_dn, from_id) VALUES (?1, ?2, ?3)";
const OPEN_REF_DELETE: &str =
    "DELETE FROM source_refs_open WHERE target = ?1 AND by_dn = ?2 AND from_id = ?3";
/// The references waiting for anchor `?1` become references to its new object `?2`.
const OPEN_REFS_ADOPT: &str = "INSERT OR IGNORE INTO source_refs (to_id, from_id) \
     SELECT ?2, from_id FROM source_refs_open WHERE target = ?1 AND by_dn = 0";
const OPEN_REFS_ADOPTED: &str = "DELETE FROM source_refs_open WHERE target = ?1 AND by_dn = 0";
/// The dirty objects from `?1` to `?2`, with their stored attributes (references resolve by
/// anchor in them).
const DIRTY_ENTRIES: &str = "SELECT o.anchor, o.object_type, o.dn, o.attributes FROM dirty d \
     JOIN source_objects o ON o.anchor = d.anchor WHERE d.anchor BETWEEN ?1 AND ?2";
const LINK_BY_TARGET: &str =
    "SELECT anchor, source_type, target_id, target_type FROM links WHERE target_id = ?1";
const TARGET_BY_ID: &str = "SELECT id, object_type, attributes FROM target_objects WHERE id = ?1";

// The bulk reads of the plan stage (`{}`: where the `IN` list goes, `?1` to `?n`; a query with
// two `{}` binds the same keys in both); the tests check each uses an index.
const ENTRIES_IN: &str =
    "SELECT anchor, object_type, dn, attributes FROM source_objects WHERE anchor IN {}";
/// [`ENTRIES_IN`] without the attributes.
const HEADS_IN: &str =
    "SELECT anchor, object_type, dn, NULL FROM source_objects WHERE anchor IN {}";
/// [`ENTRIES_AT_DNS_IN`] without the attributes.
const HEADS_AT_DNS_IN: &str =
    "SELECT anchor, object_type, dn, NULL FROM source_objects WHERE dn_key IN {}";
/// The objects whose DN hashes to one of the keys (the caller compares the DNs).
const ENTRIES_AT_DNS_IN: &str =
    "SELECT anchor, object_type, dn, attributes FROM source_objects WHERE dn_key IN {}";
/// The referrers of the objects with one of the anchors (by id, or waiting for the anchor).
const REFERRERS_BY_ANCHOR_IN: &str = "SELECT f.anchor FROM source_objects t \
     JOIN source_refs r ON r.to_id = t.id JOIN source_objects f ON f.id = r.from_id \
     WHERE t.anchor IN {} \
     UNION ALL SELECT f.anchor FROM source_refs_open r JOIN source_objects f ON f.id = r.from_id \
     WHERE r.target IN {} AND r.by_dn = 0";
/// The objects whose references wait for one of the DNs (normalized).
const REFERRERS_BY_DN_IN: &str = "SELECT f.anchor FROM source_refs_open r \
     JOIN source_objects f ON f.id = r.from_id WHERE r.target IN {} AND r.by_dn = 1";
const LINKS_IN: &str =
    "SELECT anchor, source_type, target_id, target_type FROM links WHERE anchor IN {}";
const TARGETS_IN: &str = "SELECT id, object_type, attributes FROM target_objects WHERE id IN {}";
/// A page of source objects in row order ([`scan_rows`]).
const ROWS_PAGE: &str = "SELECT id, anchor, object_type, dn, attributes FROM source_objects \
     WHERE id > ?1 ORDER BY id LIMIT ?2";
/// A page of the linked anchors without a source object, in anchor order.
const UNSOURCED_PAGE: &str = "SELECT anchor FROM links WHERE anchor > ?1 AND NOT EXISTS \
     (SELECT 1 FROM source_objects s WHERE s.anchor = links.anchor) ORDER BY anchor LIMIT ?2";
/// The ids at the keys `?2` to `?n` of the attribute `?1` (join candidates).
const TARGET_LOOKUP_IN: &str =
    "SELECT value_key, id FROM target_values WHERE attribute = ?1 AND value_key IN {}";
const LINKS_BY_TARGETS_IN: &str =
    "SELECT anchor, source_type, target_id, target_type FROM links WHERE target_id IN {}";

/// The bulk reads (for the query-plan test).
#[cfg(test)]
pub(crate) const BULK_QUERIES: &[&str] = &[
    ENTRIES_IN,
    ENTRIES_AT_DNS_IN,
    HEADS_IN,
    HEADS_AT_DNS_IN,
    REFERRERS_BY_ANCHOR_IN,
    REFERRERS_BY_DN_IN,
    LINKS_IN,
    TARGETS_IN,
    TARGET_LOOKUP_IN,
    LINKS_BY_TARGETS_IN,
];

/// The page reads of a full plan (for the query-plan test).
#[cfg(test)]
pub(crate) const PAGE_QUERIES: &[&str] = &[ROWS_PAGE, UNSOURCED_PAGE];

/// The statements of the delta path (for the query-plan test).
#[cfg(test)]
pub(crate) const INDEXED_QUERIES: &[&str] = &[
    ENTRY_BY_ANCHOR,
    ANCHORS_BY_DN,
    ROW_STATE,
    SEEN_UNCHANGED,
    OBJECT_ID,
    REFERRERS,
    WAITING,
    WAITING_ANCHOR,
    REFERRING,
    REF_DELETE,
    OPEN_REF_DELETE,
    OPEN_REFS_ADOPT,
    OPEN_REFS_ADOPTED,
    "DELETE FROM source_refs WHERE to_id = ?1",
    DIRTY_ENTRIES,
    LINK_BY_TARGET,
    TARGET_BY_ID,
    "DELETE FROM target_values WHERE attribute = ?1 AND value_key = ?2 AND id = ?3",
    LINK_DELETE_ANCHOR,
    LINK_DELETE_TARGET,
    "SELECT 1 FROM runs WHERE id = ?1",
    "DELETE FROM journal WHERE run = ?1 AND state <> 'intended'",
    PAYLOADS_DELETE,
    JOURNAL_DONE,
    UNCONFIRMED,
    "UPDATE source_state SET generation = ?2 WHERE id = ?1",
];

const LINK_DELETE_ANCHOR: &str = "DELETE FROM links WHERE anchor = ?1";
const LINK_DELETE_TARGET: &str = "DELETE FROM links WHERE target_id = ?1";
const PAYLOADS_DELETE: &str = "DELETE FROM journal_payload WHERE id BETWEEN ?1 AND ?2";
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
    /// How hard a commit waits for the disk.
    durability: Durability,
    /// Applied at every [`StateStore::finish_run`]; `None`: keep everything.
    retention: Option<Retention>,
    /// The declared lookup attributes (kept in `meta`); `None` until declared: every attribute
    /// is indexed.
    lookup: Option<LookupAttributes>,
    /// The attribute-name dictionary (`attr_names`) as far as this connection has read it.
    names: RefCell<Names>,
    /// The heads of the source objects and the links, in memory once plans read enough of
    /// them ([`HeadsCache`]).
    heads: RefCell<HeadsCache>,
}

/// When a [`SqliteStore`] keeps the heads of its source objects (anchor, type, DN, row id) and
/// its links in memory, so that a plan finds the objects around the ones it plans — the
/// managers its users reference, the members of its groups — and the links of all of them,
/// and an import resolves the DNs its objects refer to and finds their rows, without a random
/// read of the file each. About 200 bytes per object (200 MB at a million), kept up to
/// date by the store's own writes and dropped when another connection writes the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeadIndex {
    /// Built once the plans and imports have read a tenth of the store's heads (at least
    /// 20,000) from the file: a large plan (a full sync, a large delta, an initial load) or
    /// an import resolving many DNs gets it, a small delta does not pay for it.
    #[default]
    Auto,
    /// Built by the first plan that reads context or the first import.
    Always,
    /// Never: every head and link is read from the file.
    Off,
}

/// The in-memory index of source object heads and links ([`Heads`]) and what keeps it true to
/// the file: the temporary triggers that log every change to a head or a link made through
/// this connection (`temp.heads_log`), applied before each read that uses the index, and
/// `PRAGMA data_version`, which says when another connection changed the file (the index is
/// then dropped).
#[derive(Default)]
struct HeadsCache {
    mode: HeadIndex,
    heads: Option<Heads>,
    /// `PRAGMA data_version` as of the index.
    data_version: i64,
    /// Heads and links read from the file since the index was last dropped (or the store
    /// opened): once they would have paid for building it, it is built.
    missed: usize,
}

/// The log and triggers that keep [`HeadsCache`] up to date (temporary: this connection's
/// only, nothing in the file). A trigger body names its table unqualified: `heads_log` is
/// the temporary one. The index takes in the whole log and empties it each time, so its rows
/// are in order without `AUTOINCREMENT`. No column of it has a constraint: a statement whose
/// triggers write it then needs no statement journal for them (the source objects' plain
/// inserts are `INSERT OR FAIL`, which needs none of its own either; see [`add_object`]).
const HEADS_LOG: &str = r#"
CREATE TEMP TABLE IF NOT EXISTS heads_log (
    seq INTEGER PRIMARY KEY,
    kind INTEGER,
    anchor TEXT,
    a TEXT,
    b TEXT,
    c TEXT,
    k INTEGER,
    i INTEGER
);
CREATE TEMP TRIGGER IF NOT EXISTS heads_source_insert AFTER INSERT ON main.source_objects BEGIN
    INSERT INTO heads_log (kind, anchor, a, b, k, i)
        VALUES (1, NEW.anchor, NEW.object_type, NEW.dn, NEW.dn_key, NEW.id);
END;
CREATE TEMP TRIGGER IF NOT EXISTS heads_source_update
AFTER UPDATE OF id, anchor, object_type, dn, dn_key ON main.source_objects BEGIN
    INSERT INTO heads_log (kind, anchor) VALUES (2, OLD.anchor);
    INSERT INTO heads_log (kind, anchor, a, b, k, i)
        VALUES (1, NEW.anchor, NEW.object_type, NEW.dn, NEW.dn_key, NEW.id);
END;
CREATE TEMP TRIGGER IF NOT EXISTS heads_source_delete AFTER DELETE ON main.source_objects BEGIN
    INSERT INTO heads_log (kind, anchor) VALUES (2, OLD.anchor);
END;
CREATE TEMP TRIGGER IF NOT EXISTS heads_link_insert AFTER INSERT ON main.links BEGIN
    INSERT INTO heads_log (kind, anchor, a, b, c)
        VALUES (3, NEW.anchor, NEW.source_type, NEW.target_id, NEW.target_type);
END;
CREATE TEMP TRIGGER IF NOT EXISTS heads_link_update AFTER UPDATE ON main.links BEGIN
    INSERT INTO heads_log (kind, anchor) VALUES (4, OLD.anchor);
    INSERT INTO heads_log (kind, anchor, a, b, c)
        VALUES (3, NEW.anchor, NEW.source_type, NEW.target_id, NEW.target_type);
END;
CREATE TEMP TRIGGER IF NOT EXISTS heads_link_delete AFTER DELETE ON main.links BEGIN
    INSERT INTO heads_log (kind, anchor) VALUES (4, OLD.anchor);
END;
"#;

const HEADS_UNLOG: &str = r#"
DROP TRIGGER IF EXISTS temp.heads_source_insert;
DROP TRIGGER IF EXISTS temp.heads_source_update;
DROP TRIGGER IF EXISTS temp.heads_source_delete;
DROP TRIGGER IF EXISTS temp.heads_link_insert;
DROP TRIGGER IF EXISTS temp.heads_link_update;
DROP TRIGGER IF EXISTS temp.heads_link_delete;
DROP TABLE IF EXISTS temp.heads_log;
"#;

/// The attribute-name dictionary of the file (table `attr_names`): the mirrors' rows name
/// attributes by id. Read lazily; an id not yet known is looked up again in the table (another
/// connection may have added it). Names are kept as spelled (ids are case-sensitive).
#[derive(Debug, Default)]
pub(crate) struct Names {
    by_id: FxHashMap<u64, AttrName>,
    ids: FxHashMap<SmolStr, u64>,
    loaded: bool,
}

impl Names {
    /// Reads the whole dictionary again.
    fn reload(&mut self, conn: &Connection) -> Result<(), StateError> {
        self.by_id.clear();
        self.ids.clear();
        let mut stmt = conn
            .prepare_cached("SELECT id, name FROM attr_names")
            .ctx("reading attribute names")?;
        let mut q = stmt.query([]).ctx("reading attribute names")?;
        while let Some(r) = q.next().ctx("reading attribute names")? {
            let id: i64 = r.get(0).ctx("reading attribute names")?;
            let name: String = r.get(1).ctx("reading attribute names")?;
            self.ids.insert(SmolStr::from(name.as_str()), id as u64);
            self.by_id.insert(id as u64, AttrName::from(name));
        }
        self.loaded = true;
        Ok(())
    }

    /// The name of `id`, if known.
    fn name(&self, id: u64) -> Option<AttrName> {
        self.by_id.get(&id).cloned()
    }
}

/// A connection (or transaction) with the file's attribute-name dictionary: what every
/// function reading or writing the mirrors works on.
pub(crate) struct Db<'c> {
    conn: &'c Connection,
    names: &'c RefCell<Names>,
}

impl std::ops::Deref for Db<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Db<'_> {
    /// The dictionary, read first if this connection has not yet read it.
    fn names(&self) -> Result<std::cell::Ref<'_, Names>, StateError> {
        if !self.names.borrow().loaded {
            self.names.borrow_mut().reload(self.conn)?;
        }
        Ok(self.names.borrow())
    }

    /// The id of `name`, added to the dictionary (in the current transaction) when new.
    fn id_of(&self, name: &AttrName) -> Result<u64, StateError> {
        if let Some(id) = self.names()?.ids.get(name.as_str()) {
            return Ok(*id);
        }
        self.conn
            .prepare_cached("INSERT OR IGNORE INTO attr_names (name) VALUES (?1)")
            .and_then(|mut s| s.execute([name.as_str()]))
            .ctx("adding an attribute name")?;
        let id: i64 = self
            .conn
            .prepare_cached("SELECT id FROM attr_names WHERE name = ?1")
            .and_then(|mut s| s.query_row([name.as_str()], |r| r.get(0)))
            .ctx("adding an attribute name")?;
        let mut names = self.names.borrow_mut();
        names.ids.insert(SmolStr::from(name.as_str()), id as u64);
        names.by_id.insert(id as u64, name.clone());
        Ok(id as u64)
    }

    /// The stored (binary) form of `attributes`, names by id.
    /// `own`: the row's key (a source object's anchor), which a value equal to it refers to.
    fn encode(&self, attributes: &Attributes, own: Option<&str>) -> Result<Vec<u8>, StateError> {
        let mut out = Vec::with_capacity(16 + attributes.len() * 24);
        encode_binary(attributes, own, &mut out, |n| self.id_of(n))?;
        Ok(out)
    }

    /// Attributes from a mirror's `attributes` column (binary, or JSON text as files before
    /// version 6 held them); `Err` is a description for [`StateError::Corrupt`].
    fn decode(
        &self,
        v: &SqlValue,
        own: Option<&str>,
    ) -> Result<Result<Attributes, String>, StateError> {
        match v {
            SqlValue::Blob(b) => {
                let missing = Cell::new(false);
                let first = {
                    let names = self.names()?;
                    decode_binary(b, own, |id| {
                        let n = names.name(id);
                        missing.set(missing.get() || n.is_none());
                        n
                    })
                };
                if !missing.get() {
                    return Ok(first);
                }
                // An id another connection added: read the dictionary again, once.
                self.names.borrow_mut().reload(self.conn)?;
                let names = self.names()?;
                Ok(decode_binary(b, own, |id| names.name(id)))
            }
            SqlValue::Text(t) => Ok(decode_attributes(t)),
            other => Ok(Err(format!(
                "holds {:?}, not attributes",
                other.data_type()
            ))),
        }
    }
}

/// `PRAGMA data_version`: changes when another connection commits to the file.
fn data_version(conn: &Connection) -> Result<i64, StateError> {
    conn.query_row("PRAGMA data_version", [], |r| r.get(0))
        .ctx("reading the data version")
}

impl SqliteStore {
    /// [`read_neighbourhood`] in one snapshot, with the heads index when there is one.
    fn neighbourhood(
        &self,
        anchors: &[Anchor],
        reach: Reach,
        light: bool,
    ) -> Result<Views, StateError> {
        Ok(self
            .neighbourhood_of(Keys::Anchors(anchors), reach, light)?
            .1)
    }

    /// [`SqliteStore::neighbourhood`] of the anchors `keys` names; with them, and the last row
    /// read when they are a page of rows (`0` when none is left).
    fn neighbourhood_of(
        &self,
        keys: Keys<'_>,
        reach: Reach,
        light: bool,
    ) -> Result<(Vec<Anchor>, Views, i64), StateError> {
        let heads = self.current_heads()?;
        let version = self.heads.borrow().data_version;
        let missed = std::cell::Cell::new(0);
        let stale = std::cell::Cell::new(false);
        let views = self.in_snapshot(|db| {
            // The index is as of `version`: if another connection committed since, this
            // snapshot may hold what the index does not (read the file this time).
            let heads = match heads.as_deref() {
                Some(h) => {
                    db.query_row("SELECT count(*) FROM meta", [], |_| Ok(()))
                        .ctx("starting a snapshot")?;
                    if data_version(db)? == version {
                        Some(h)
                    } else {
                        stale.set(true);
                        None
                    }
                }
                None => None,
            };
            let (anchors, entries, last) = match keys {
                Keys::Anchors(a) => (a.to_vec(), Fetched::default(), 0),
                Keys::Rows { after, limit } => scan_rows(db, after, limit)?,
            };
            if anchors.is_empty() {
                return Ok((anchors, Views::default(), last));
            }
            let views = read_neighbourhood(db, &anchors, reach, light, heads, &missed, entries)?;
            Ok((anchors, views, last))
        })?;
        drop(heads);
        if stale.get() {
            // Another connection wrote (as `current_heads` treats it).
            self.drop_heads()?;
        }
        self.missed_heads(missed.get());
        Ok(views)
    }

    /// `read` in one read transaction: what it reads is one snapshot of the file.
    fn in_snapshot<R>(
        &self,
        read: impl FnOnce(&Db<'_>) -> Result<R, StateError>,
    ) -> Result<R, StateError> {
        let tx = self
            .conn
            .unchecked_transaction()
            .ctx("starting a read transaction")?;
        read(&Db {
            conn: &tx,
            names: &self.names,
        })
    }
}

/// The whole store: every source object, link and target object ([`StateStore::load_all`]).
fn read_all(conn: &Db<'_>) -> Result<Views, StateError> {
    let mut views = Views::default();
    let sql = format!("SELECT {ENTRY_COLUMNS} FROM source_objects");
    let mut stmt = conn.prepare(&sql).ctx("reading the source mirror")?;
    let mut q = stmt.query([]).ctx("reading the source mirror")?;
    let mut raw = Vec::new();
    while let Some(r) = q.next().ctx("reading the source mirror")? {
        raw.push(raw_row(r, 4).ctx("reading the source mirror")?);
    }
    conn.names.borrow_mut().reload(conn)?;
    let names_ref = conn.names()?;
    let names: &Names = &names_ref;
    for e in decode_rows(raw, |r| decode_entry_in(names, r))? {
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
    for o in decode_rows(raw, |r| decode_target_in(names, r))? {
        views.target.insert(o);
    }
    Ok(views)
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

    /// The connection with the attribute-name dictionary.
    fn db(&self) -> Db<'_> {
        Db {
            conn: &self.conn,
            names: &self.names,
        }
    }

    fn setup(conn: Connection, durability: Durability) -> Result<SqliteStore, StateError> {
        conn.busy_timeout(Duration::from_secs(10))
            .ctx("setting the busy timeout")?;
        // A new file frees pages incrementally (this must come before the file is first
        // written, WAL mode included; on an existing file it waits for a VACUUM).
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL")
            .ctx("setting auto-vacuum")?;
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
        // Statement journals, sorts and the temporary tables of `UNION`s in memory: in a
        // transaction of thousands of objects, each statement that changes a page the
        // transaction already changed journals it, and on disk (SQLite's default) an initial
        // import wrote more to temporary files than to the state file.
        conn.pragma_update(None, "temp_store", "MEMORY")
            .ctx("keeping temporary data in memory")?;
        // A 64 MiB page cache and memory-mapped reads: a delta's neighbourhood is scattered
        // over the file, and a 100k-object store outgrows SQLite's 2 MiB default.
        conn.pragma_update(None, "cache_size", -65536)
            .ctx("setting the page cache size")?;
        conn.pragma_update(None, "mmap_size", 268_435_456i64)
            .ctx("setting the memory-mapped I/O size")?;
        // The write-ahead log keeps the size of the largest transaction since it was last
        // reset: cut it back to 4 MiB after each checkpoint.
        conn.pragma_update(None, "journal_size_limit", 4_194_304i64)
            .ctx("limiting the write-ahead log")?;
        let mut store = SqliteStore {
            conn,
            durability,
            retention: Some(Retention::default()),
            lookup: None,
            names: RefCell::new(Names::default()),
            heads: RefCell::new(HeadsCache::default()),
        };
        store.migrate()?;
        store.lookup = lookup_attributes(&store.db())?;
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

    /// When the store keeps the heads of its source objects and its links in memory (see
    /// [`HeadIndex`]; the default is [`HeadIndex::Auto`]).
    pub fn set_head_index(&mut self, mode: HeadIndex) {
        let c = self.heads.get_mut();
        c.mode = mode;
        if mode == HeadIndex::Off && c.heads.is_some() {
            c.heads = None;
            // Without the index the log would only cost: the triggers go with it.
            let _ = self.conn.execute_batch(HEADS_UNLOG);
        }
    }

    /// The heads index, brought up to date with this connection's writes; built first when
    /// the reads it would serve have paid for it; dropped if another connection changed the
    /// file. `None`: read the file.
    fn current_heads(&self) -> Result<Option<std::cell::Ref<'_, Heads>>, StateError> {
        // Inside a transaction the log holds rows that may yet be rolled back.
        if !self.conn.is_autocommit() {
            return Ok(None);
        }
        {
            let mut c = self.heads.borrow_mut();
            if c.heads.is_some() {
                let version = data_version(&self.conn)?;
                let current = version == c.data_version;
                if !current || !self.apply_heads_log(&mut c)? {
                    c.heads = None;
                    // Another connection's write: built again once the plans have paid for
                    // it again (a file written by several processes does not rebuild at every
                    // read). Worn out by this connection's own writes: built again now.
                    if !current {
                        c.missed = 0;
                    }
                    self.conn
                        .execute_batch(HEADS_UNLOG)
                        .ctx("dropping the heads index's log")?;
                }
            }
            let wanted = c.heads.is_none()
                && match c.mode {
                    HeadIndex::Off => false,
                    HeadIndex::Always => true,
                    HeadIndex::Auto => {
                        // Building reads every head once: worth it once the file was read for a
                        // tenth of them (at least 20,000) and the index would not be dropped
                        // straight away.
                        let objects: i64 = self
                            .conn
                            .query_row("SELECT coalesce(max(id), 0) FROM source_objects", [], |r| {
                                r.get(0)
                            })
                            .ctx("counting source objects")?;
                        let objects = usize::try_from(objects).unwrap_or(0);
                        c.missed >= (objects / 10).max(20_000)
                    }
                };
            if wanted {
                if let Err(e) = self.build_heads(&mut c) {
                    // A row the index cannot hold (or read): plans read the file, as without
                    // it, and the plans touching that row say what is wrong with it.
                    tracing::warn!(error = %e, "the heads index is off for this connection");
                    c.heads = None;
                    c.mode = HeadIndex::Off;
                    self.conn
                        .execute_batch(HEADS_UNLOG)
                        .ctx("dropping the heads index's log")?;
                }
            }
        }
        Ok(std::cell::Ref::filter_map(self.heads.borrow(), |c| c.heads.as_ref()).ok())
    }

    /// Counts `n` heads or links read from the file (see [`SqliteStore::current_heads`]).
    fn missed_heads(&self, n: usize) {
        let mut c = self.heads.borrow_mut();
        c.missed = c.missed.saturating_add(n);
    }

    /// Builds the index from the file, with the log that keeps it up to date from now on.
    fn build_heads(&self, c: &mut HeadsCache) -> Result<(), StateError> {
        self.conn
            .execute_batch(HEADS_LOG)
            .and_then(|()| self.conn.execute_batch("DELETE FROM temp.heads_log"))
            .ctx("starting the heads index's log")?;
        let built = self.in_snapshot(|db| {
            let mut heads = Heads::default();
            let mut too_large = false;
            let mut stmt = db
                .prepare("SELECT anchor, object_type, dn, dn_key, id FROM source_objects")
                .ctx("reading the source object heads")?;
            let mut q = stmt.query([]).ctx("reading the source object heads")?;
            while let Some(r) = q.next().ctx("reading the source object heads")? {
                let anchor: String = r.get(0).ctx("reading the source object heads")?;
                let object_type: String = r.get(1).ctx("reading the source object heads")?;
                let dn: Option<String> = r.get(2).ctx("reading the source object heads")?;
                let key: Option<i64> = r.get(3).ctx("reading the source object heads")?;
                let id: i64 = r.get(4).ctx("reading the source object heads")?;
                let dn = dn.as_deref().map(|d| (d, key.unwrap_or(0)));
                too_large |= heads
                    .set_source(&anchor, Some((id, &ObjectType::from(object_type), dn)))
                    .is_err();
            }
            drop(q);
            for l in rows(
                db,
                "SELECT anchor, source_type, target_id, target_type FROM links",
                [],
                "reading the links",
            )? {
                let l = decode_link(l)?;
                too_large |= heads
                    .set_link(
                        l.anchor.as_str(),
                        Some((&l.source_type, l.target_id.as_str(), &l.target_type)),
                    )
                    .is_err();
            }
            // As of this snapshot (another connection's commit since makes it differ).
            let version = data_version(db)?;
            Ok((!too_large).then_some((heads, version)))
        })?;
        match built {
            Some((heads, version)) => {
                tracing::debug!(
                    objects = heads.len(),
                    bytes = heads.bytes(),
                    "heads index built"
                );
                c.heads = Some(heads);
                c.data_version = version;
            }
            None => {
                // Beyond what the index addresses: read the file, as without it.
                c.mode = HeadIndex::Off;
                self.conn
                    .execute_batch(HEADS_UNLOG)
                    .ctx("dropping the heads index's log")?;
            }
        }
        Ok(())
    }

    /// Applies the log's rows to the index, then empties the log;
    /// `false`: the index is to be built again (a text beyond what it addresses, or more of
    /// its texts replaced than in use).
    fn apply_heads_log(&self, c: &mut HeadsCache) -> Result<bool, StateError> {
        let Some(heads) = c.heads.as_mut() else {
            return Ok(true);
        };
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, kind, anchor, a, b, c, k, i FROM temp.heads_log ORDER BY seq",
            )
            .ctx("reading the heads index's log")?;
        let mut q = stmt.query([]).ctx("reading the heads index's log")?;
        let mut any = false;
        let mut fits = true;
        while let Some(r) = q.next().ctx("reading the heads index's log")? {
            let get = |i: usize| -> Result<Option<String>, StateError> {
                r.get(i).ctx("reading the heads index's log")
            };
            any = true;
            let kind: i64 = r.get(1).ctx("reading the heads index's log")?;
            let anchor: String = r.get(2).ctx("reading the heads index's log")?;
            let applied = match kind {
                1 => {
                    let object_type = ObjectType::from(get(3)?.unwrap_or_default());
                    let dn = get(4)?;
                    let key: Option<i64> = r.get(6).ctx("reading the heads index's log")?;
                    let id: i64 = r.get(7).ctx("reading the heads index's log")?;
                    let dn = dn.as_deref().map(|d| (d, key.unwrap_or(0)));
                    heads.set_source(&anchor, Some((id, &object_type, dn)))
                }
                2 => heads.set_source(&anchor, None),
                3 => {
                    let source_type = ObjectType::from(get(3)?.unwrap_or_default());
                    let target_id = get(4)?.unwrap_or_default();
                    let target_type = ObjectType::from(get(5)?.unwrap_or_default());
                    heads.set_link(&anchor, Some((&source_type, &target_id, &target_type)))
                }
                _ => heads.set_link(&anchor, None),
            };
            fits &= applied.is_ok();
        }
        drop(q);
        drop(stmt);
        if any {
            self.conn
                .prepare_cached("DELETE FROM temp.heads_log")
                .and_then(|mut s| s.execute([]))
                .ctx("emptying the heads index's log")?;
        }
        Ok(fits && !heads.is_wasteful())
    }

    /// The schema version of the open file.
    pub fn schema_version(&self) -> Result<i64, StateError> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .ctx("reading the schema version")
    }

    /// Writes the mirrors as JSON lines, for an administrator: one line per source object
    /// (`{"source": anchor, "type", "dn", "attributes"}`) in anchor order, then one per target
    /// object (`{"target": id, "type", "attributes"}`), attributes as one JSON object (names as
    /// keys; one value bare, several as an array; references as `{"a": anchor}`, `{"d": DN}`,
    /// `{"r": target id}`, bytes as `{"b": Base64}`, timestamps as `{"t": RFC 3339}`). The
    /// file stores them in a binary form (names by id, from
    /// `attr_names`) the `sqlite3` shell does not decode; this is how to read them
    /// (`cargo run --example state_dump -- state.db`).
    pub fn dump(&self, out: &mut dyn std::io::Write) -> Result<(), StateError> {
        let db = self.db();
        let io = |e: std::io::Error| StateError::Invalid(format!("writing the dump: {e}"));
        let mut line = |v: serde_json::Value| -> Result<(), StateError> {
            serde_json::to_writer(&mut *out, &v)
                .map_err(|e| StateError::Invalid(format!("writing the dump: {e}")))?;
            out.write_all(b"\n").map_err(io)
        };
        let attrs = |a: &Attributes| -> Result<serde_json::Value, StateError> {
            serde_json::from_str(&encode_attributes(a)).map_err(|e| StateError::Serialize {
                what: "attributes".into(),
                detail: e.to_string(),
            })
        };
        let sql = format!("SELECT {ENTRY_COLUMNS} FROM source_objects ORDER BY anchor");
        for r in rows(&db, &sql, [], "reading the source mirror")? {
            let e = decode_entry(&db, r)?;
            line(serde_json::json!({
                "source": e.anchor.as_str(),
                "type": e.object_type.as_str(),
                "dn": e.dn.as_ref().map(|d| d.as_str()),
                "attributes": attrs(&e.attributes)?,
            }))?;
        }
        for r in rows(
            &db,
            "SELECT id, object_type, attributes FROM target_objects ORDER BY id",
            [],
            "reading the target mirror",
        )? {
            let o = decode_target(&db, r)?;
            line(serde_json::json!({
                "target": o.id.as_str(),
                "type": o.object_type.as_str(),
                "attributes": attrs(&o.attributes)?,
            }))?;
        }
        Ok(())
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
        let db = Db {
            conn: &tx,
            names: &self.names,
        };
        for m in MIGRATIONS.iter().filter(|m| m.version > found) {
            db.execute_batch(m.sql)
                .ctx(&format!("migrating the schema to version {}", m.version))?;
            if let Some(after) = m.after {
                after(&db)?;
            }
            tx.pragma_update(None, "user_version", m.version)
                .ctx("recording the schema version")?;
        }
        let committed = tx.commit().ctx("committing the schema migration");
        // The dictionary is read again from what was committed.
        self.names.borrow_mut().loaded = false;
        committed?;
        // (Version 7 rebuilt nothing.)
        if (1..6).contains(&found) {
            // The rebuilt tables left free pages: give them back to the file system, once, and
            // let later frees go back too (incremental auto-vacuum takes a VACUUM to turn on).
            self.conn
                .execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM")
                .ctx("compacting the state file after the migration")?;
        }
        Ok(())
    }

    /// Gives the file's free pages back to the file system (incremental auto-vacuum: a run's
    /// journal payloads, deleted once done, and rewritten rows leave free pages behind), and
    /// checkpoints the write-ahead log and truncates it: once a run, so the file's size is
    /// what it holds.
    fn reclaim(&mut self) -> Result<(), StateError> {
        {
            // Each step frees one page: step to the end.
            let mut stmt = self
                .conn
                .prepare_cached("PRAGMA incremental_vacuum")
                .ctx("reclaiming free pages")?;
            let mut q = stmt.query([]).ctx("reclaiming free pages")?;
            while q.next().ctx("reclaiming free pages")?.is_some() {}
        }
        // Best effort, without waiting: a reader of another connection holding an old
        // snapshot keeps the log until its next reset.
        self.conn
            .busy_timeout(Duration::ZERO)
            .ctx("checkpointing the write-ahead log")?;
        let checkpoint = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .optional();
        self.conn
            .busy_timeout(Duration::from_secs(10))
            .ctx("setting the busy timeout")?;
        match checkpoint {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy =>
            {
                Ok(())
            }
            Err(e) => Err(e).ctx("checkpointing the write-ahead log"),
        }
    }

    /// Runs `f` in one immediate transaction.
    ///
    /// Emits the trace event `state: committing` (field `what`) after `f`'s work and before
    /// the commit: a stable message, on which `tests/crash.rs` kills the process inside the
    /// transaction.
    fn write<T>(
        &self,
        what: &str,
        f: impl FnOnce(&Db<'_>) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        // (No transaction is open: every one this store begins ends before its call returns.)
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)
            .ctx(&format!("{what}: starting a transaction"))?;
        let db = Db {
            conn: &tx,
            names: &self.names,
        };
        let out = f(&db);
        let committed = out.and_then(|out| {
            tracing::trace!(what, "state: committing");
            tx.commit().ctx(&format!("{what}: committing"))?;
            Ok(out)
        });
        if committed.is_err() {
            // Names this transaction added are gone with it.
            self.names.borrow_mut().loaded = false;
        }
        committed
    }

    /// [`SqliteStore::write`] for a transaction that writes source objects: `f` gets the
    /// heads index as the transaction sees it at its start (`None`: the store keeps none, or
    /// another connection wrote since it was brought up to date) and returns, with its
    /// result, the number of heads it read from the file instead (which build the index once
    /// they would have paid for it: see [`SqliteStore::current_heads`]). The index itself does
    /// not change in the transaction: it takes the transaction's writes in from its log once
    /// they are committed.
    fn write_heads<T>(
        &self,
        what: &str,
        f: impl FnOnce(&Db<'_>, Option<&Heads>) -> Result<(T, usize), StateError>,
    ) -> Result<T, StateError> {
        let heads = self.current_heads()?;
        let version = self.heads.borrow().data_version;
        let stale = Cell::new(false);
        let out = self.write(what, |tx| {
            let heads = match heads.as_deref() {
                // (An immediate transaction's snapshot is taken at its start.)
                Some(h) if data_version(tx)? == version => Some(h),
                Some(_) => {
                    stale.set(true);
                    None
                }
                None => None,
            };
            f(tx, heads)
        });
        drop(heads);
        if stale.get() {
            // Another connection wrote (as `current_heads` treats it).
            self.drop_heads()?;
        }
        let (out, missed) = out?;
        self.missed_heads(missed);
        Ok(out)
    }

    /// [`StateStore::import_entries`]'s transaction.
    fn import_batch(&self, generation: u64, entries: &[Entry]) -> Result<(), StateError> {
        self.write_heads("importing entries", |tx, heads| {
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
            let mut w = Writes::new(heads);
            let mut buf = Vec::new();
            let mut seen_now = tx
                .prepare_cached(SEEN_UNCHANGED)
                .ctx("recording a full import's generation")?;
            let mut seen_id = tx
                .prepare_cached(SEEN_UNCHANGED_ID)
                .ctx("recording a full import's generation")?;
            // Whether the last object was in the mirror: new objects come in runs (an initial
            // import is one), and for one the statement below is a lookup for nothing.
            let mut known = true;
            for e in entries {
                // Delivered as last time, first time in this import (most objects of most
                // imports): one statement moves its generation, nothing else is read. With
                // the heads index, by row id (the index also knows a new object is new).
                let hash = entry_hash_into(e, &mut buf) as i64;
                let mirrored = w.mirrored(e.anchor.as_str());
                let unchanged = match mirrored {
                    Some(None) => Ok(0),
                    Some(Some(id)) => seen_id.execute(params![id, hash, g]),
                    None if known => seen_now.execute(params![e.anchor.as_str(), hash, g]),
                    None => Ok(0),
                }
                .ctx("recording a full import's generation")?
                    == 1;
                if unchanged {
                    seen += 1;
                    continue;
                }
                let before = match mirrored {
                    Some(None) => None,
                    _ => row_state(tx, &e.anchor)?,
                };
                known = before.is_some();
                match &before {
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
                if let Some(b) = &before {
                    // Delivered as last time: the hash says so, nothing else is read or written.
                    if b.hash == hash {
                        if b.generation != g {
                            set_generation(tx, b.id, g)?;
                        }
                        continue;
                    }
                }
                let existed = before.is_some();
                if write_hashed(tx, &e.anchor, before, Some((e, hash)), Some(g), &mut w)? && existed
                {
                    changed += 1;
                }
            }
            let missed = w.finish(tx)?;
            s.summary.seen += seen;
            s.summary.added += added;
            s.summary.changed += changed;
            set_session(tx, Some(&s))?;
            if added + changed > 0 {
                bump(tx)?;
            }
            Ok(((), missed))
        })
    }

    /// Drops the heads index after another connection wrote the file: built again once the
    /// reads have paid for it again.
    fn drop_heads(&self) -> Result<(), StateError> {
        let mut c = self.heads.borrow_mut();
        c.heads = None;
        c.missed = 0;
        drop(c);
        self.conn
            .execute_batch(HEADS_UNLOG)
            .ctx("dropping the heads index's log")
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

/// [`text`] of a borrowed column.
fn text_ref<'r>(
    table: &'static str,
    key: &str,
    column: &str,
    v: ValueRef<'r>,
) -> Result<&'r str, StateError> {
    match v {
        ValueRef::Text(s) => {
            std::str::from_utf8(s).map_err(|e| corrupt(table, key, format!("column {column}: {e}")))
        }
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
    conn: &Db<'_>,
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
fn decode_entry(conn: &Db<'_>, row: Vec<SqlValue>) -> Result<Entry, StateError> {
    decode_entry_with(row, |v, own| conn.decode(v, Some(own)))
}

/// [`decode_entry`] with the dictionary already read (for decoding on several threads).
fn decode_entry_in(names: &Names, row: Vec<SqlValue>) -> Result<Entry, StateError> {
    decode_entry_with(row, |v, own| Ok(decode_stored(names, v, Some(own))))
}

/// A source object held as context ([`SourceMirror::is_partial`]): of its attributes only the
/// references `keep` accepts.
fn decode_entry_light(
    names: &Names,
    row: Vec<SqlValue>,
    keep: &Keep<'_>,
) -> Result<Entry, StateError> {
    decode_entry_with(row, |v, _| {
        Ok(match v {
            _ if keep.heads => Ok(Attributes::new()),
            SqlValue::Blob(b) => decode_binary_refs(b, |id| names.name(id), |r| keep.accepts(r)),
            // Files before version 6 (migrated on open, so only in tests of migrations).
            SqlValue::Text(t) => decode_attributes(t).map(|a| keep.filter(a)),
            other => Err(format!("holds {:?}, not attributes", other.data_type())),
        })
    })
}

/// What an entry held as context keeps of its attributes: the references to the planned
/// objects, by anchor or by normalized DN.
struct Keep<'a> {
    anchors: rustc_hash::FxHashSet<&'a str>,
    dns: rustc_hash::FxHashSet<&'a str>,
    /// No attribute at all: the entries are not read for their references
    /// ([`Reach::AnchorsAlone`]).
    heads: bool,
}

impl Keep<'_> {
    fn accepts(&self, r: StoredRef<'_>) -> bool {
        match r {
            StoredRef::Anchor(a) => self.anchors.contains(a),
            StoredRef::Dn(d) => self.dns.contains(d.normalized()),
        }
    }

    /// `attributes` less what [`Keep::accepts`] refuses.
    fn filter(&self, attributes: Attributes) -> Attributes {
        let kept: Vec<(AttrName, crate::model::Values)> = attributes
            .iter()
            .map(|(name, values)| {
                let values: crate::model::Values = values
                    .iter()
                    .filter(|v| match v {
                        Value::Reference(
                            crate::model::Reference::Anchor(a)
                            | crate::model::Reference::Pending(a),
                        ) => self.accepts(StoredRef::Anchor(a.as_str())),
                        Value::Reference(crate::model::Reference::Dn(d)) => {
                            self.accepts(StoredRef::Dn(d))
                        }
                        _ => false,
                    })
                    .cloned()
                    .collect();
                (name.clone(), values)
            })
            .filter(|(_, values)| !values.is_empty())
            .collect();
        Attributes::from(kept)
    }
}

/// A source object from its columns ([`ENTRY_COLUMNS`]) as SQLite holds them, its attributes
/// decoded by `attributes`. Errors are [`StateError::Corrupt`] naming the anchor.
fn decode_entry_with(
    mut row: Vec<SqlValue>,
    attributes: impl FnOnce(&SqlValue, &str) -> Result<Result<Attributes, String>, StateError>,
) -> Result<Entry, StateError> {
    const T: &str = "source_objects";
    let anchor = text(T, "?", "anchor", take(&mut row, 0))?;
    let object_type = text(T, &anchor, "object_type", take(&mut row, 1))?;
    let dn = opt_text(T, &anchor, "dn", take(&mut row, 2))?;
    let dn = match dn {
        Some(d) => Some(Dn::parse(&d).map_err(|e| corrupt(T, &anchor, format!("column dn: {e}")))?),
        None => None,
    };
    let attributes = attributes(&take(&mut row, 3), &anchor)?
        .map_err(|e| corrupt(T, &anchor, format!("column attributes: {e}")))?;
    Ok(Entry {
        anchor: Anchor::from(anchor),
        object_type: ObjectType::from(object_type),
        dn,
        attributes,
    })
}

/// Attributes as a mirror's `attributes` column holds them, with a dictionary already read
/// (binary; or JSON text, as files before version 6 held them).
fn decode_stored(names: &Names, v: &SqlValue, own: Option<&str>) -> Result<Attributes, String> {
    match v {
        SqlValue::Blob(b) => decode_binary(b, own, |id| names.name(id)),
        SqlValue::Text(t) => decode_attributes(t),
        other => Err(format!("holds {:?}, not attributes", other.data_type())),
    }
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

fn decode_target(conn: &Db<'_>, row: Vec<SqlValue>) -> Result<TargetObject, StateError> {
    decode_target_with(row, |v| conn.decode(v, None))
}

/// [`decode_target`] with the dictionary already read (for decoding on several threads).
fn decode_target_in(names: &Names, row: Vec<SqlValue>) -> Result<TargetObject, StateError> {
    decode_target_with(row, |v| Ok(decode_stored(names, v, None)))
}

fn decode_target_with(
    mut row: Vec<SqlValue>,
    attributes: impl FnOnce(&SqlValue) -> Result<Result<Attributes, String>, StateError>,
) -> Result<TargetObject, StateError> {
    const T: &str = "target_objects";
    let id = text(T, "?", "id", take(&mut row, 0))?;
    let object_type = text(T, &id, "object_type", take(&mut row, 1))?;
    let attributes = attributes(&take(&mut row, 2))?
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
    let operation: Operation = json(T, &key, "op", &op)?;
    let sent = match sent {
        Some(s) => Some(sent_json(&key, Some(&operation), &s)?),
        None => None,
    };
    Ok(JournalEntry {
        id: JournalId(id),
        run: RunId(run),
        operation,
        sent,
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
    let operation: Option<Operation> = match opt_text(T, k, "op", take(&mut row, 9))? {
        Some(o) => Some(json(T, k, "op", &o)?),
        None => None,
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
        sent: match opt_text(T, k, "sent", take(&mut row, 10))? {
            Some(o) => Some(sent_json(k, operation.as_ref(), &o)?),
            None => None,
        },
        operation,
    })
}

/// The `sent` column of the journal row `key` (see [`payload`]), read with the row's planned
/// operation `op`.
fn sent_json(key: &str, op: Option<&Operation>, text: &str) -> Result<TargetOperation, StateError> {
    let op = op.ok_or_else(|| corrupt("journal", key, "column sent without op"))?;
    payload::read_sent(op, text).map_err(|e| corrupt("journal", key, format!("column sent: {e}")))
}

// --- bulk reads of the plan stage (a neighbourhood of thousands of anchors) ---
//
// Each reads the rows of many keys with `IN` lists of `IN_CHUNK` keys (one statement, prepared
// once, for every chunk: a short last chunk repeats its last key), and decodes them on all
// cores ([`decode_rows`]). The SQL of the plan stage's reads is here and nowhere else.

/// The keys per `IN` list of a bulk read.
const IN_CHUNK: usize = 256;

/// `sql` with an `IN` list of the `n` parameters `?1` to `?n` wherever its `{}` is.
#[cfg(test)]
fn in_list_sql(sql: &str, n: usize) -> String {
    in_list_sql_from(sql, 1, n)
}

/// [`in_list_sql`] with the list's parameters numbered from `?first` (the ones before it are
/// the query's own).
fn in_list_sql_from(sql: &str, first: usize, n: usize) -> String {
    let list: Vec<String> = (first..first + n).map(|i| format!("?{i}")).collect();
    sql.replace("{}", &format!("({})", list.join(",")))
}

/// The rows `sql` (with `{}` where the `IN` list goes) returns for `keys`, read `IN_CHUNK`
/// keys at a time; each row's first `columns` columns.
fn rows_in<K: rusqlite::ToSql>(
    conn: &Db<'_>,
    sql: &str,
    keys: &[K],
    columns: usize,
    what: &str,
) -> Result<Vec<Vec<SqlValue>>, StateError> {
    rows_in_after(conn, sql, &[], keys, columns, what)
}

/// [`rows_in`] for a query whose first parameters (`?1` on) are `lead`, the `IN` list's after
/// them.
fn rows_in_after<K: rusqlite::ToSql>(
    conn: &Db<'_>,
    sql: &str,
    lead: &[&str],
    keys: &[K],
    columns: usize,
    what: &str,
) -> Result<Vec<Vec<SqlValue>>, StateError> {
    let mut out = Vec::new();
    let Some(n) = (!keys.is_empty()).then(|| IN_CHUNK.min(keys.len())) else {
        return Ok(out);
    };
    let sql = in_list_sql_from(sql, lead.len() + 1, n);
    let mut stmt = conn.prepare_cached(&sql).ctx(what)?;
    for chunk in keys.chunks(IN_CHUNK) {
        let last = &chunk[chunk.len() - 1];
        let padded = chunk.iter().chain(std::iter::repeat(last)).take(n);
        let params = lead
            .iter()
            .map(|l| l as &dyn rusqlite::ToSql)
            .chain(padded.map(|k| k as &dyn rusqlite::ToSql));
        let mut q = stmt.query(rusqlite::params_from_iter(params)).ctx(what)?;
        while let Some(r) = q.next().ctx(what)? {
            out.push(raw_row(r, columns).ctx(what)?);
        }
    }
    Ok(out)
}

/// [`rows_in`], each row decoded by `decode` ([`decode_rows`]: on all cores).
fn decoded_in<K: rusqlite::ToSql, T: Send>(
    conn: &Db<'_>,
    sql: &str,
    keys: &[K],
    columns: usize,
    what: &str,
    decode: impl Fn(Vec<SqlValue>) -> Result<T, StateError> + Sync + Send,
) -> Result<Vec<T>, StateError> {
    decode_rows(rows_in(conn, sql, keys, columns, what)?, decode)
}

/// The source objects of `anchors` (those in the mirror): whole, or held as context with what
/// `keep` keeps.
fn entries_by_anchors(
    conn: &Db<'_>,
    names: &Names,
    anchors: &[&str],
    keep: Option<&Keep<'_>>,
) -> Result<Vec<Entry>, StateError> {
    let sql = [ENTRIES_IN, HEADS_IN];
    entries_in(conn, names, sql, anchors, keep, "reading source objects")
}

/// The source objects the first query of `sql` returns for `keys` (the second when `keep`
/// wants heads alone), whole or held as context with what `keep` keeps.
fn entries_in<K: rusqlite::ToSql>(
    conn: &Db<'_>,
    names: &Names,
    [whole, heads]: [&str; 2],
    keys: &[K],
    keep: Option<&Keep<'_>>,
    what: &str,
) -> Result<Vec<Entry>, StateError> {
    let sql = if keep.is_some_and(|k| k.heads) {
        heads
    } else {
        whole
    };
    decoded_in(conn, sql, keys, 4, what, |r| match keep {
        Some(k) => decode_entry_light(names, r, k),
        None => decode_entry_in(names, r),
    })
}

/// The source objects at the normalized DNs `dns` (by their hashes, less the collisions), as
/// [`entries_by_anchors`] reads them.
fn entries_by_dns(
    conn: &Db<'_>,
    names: &Names,
    dns: &[&str],
    keep: Option<&Keep<'_>>,
) -> Result<Vec<Entry>, StateError> {
    let mut keys: Vec<i64> = dns.iter().map(|d| dn_key(d)).collect();
    keys.sort_unstable();
    keys.dedup();
    let sql = [ENTRIES_AT_DNS_IN, HEADS_AT_DNS_IN];
    let mut out = entries_in(conn, names, sql, &keys, keep, "resolving DNs")?;
    let wanted: rustc_hash::FxHashSet<&str> = dns.iter().copied().collect();
    out.retain(|e| {
        e.dn.as_ref()
            .is_some_and(|d| wanted.contains(d.normalized()))
    });
    Ok(out)
}

/// The anchors of the objects that reference one of `anchors` by anchor, or one of `dns` (the
/// normalized DNs of objects) by DN.
fn referrers_of(
    conn: &Db<'_>,
    anchors: &[&str],
    dns: &[&str],
) -> Result<BTreeSet<Anchor>, StateError> {
    let mut out = BTreeSet::new();
    for (sql, keys) in [(REFERRERS_BY_ANCHOR_IN, anchors), (REFERRERS_BY_DN_IN, dns)] {
        for mut r in rows_in(conn, sql, keys, 1, "reading referrers")? {
            out.insert(text("source_refs", "?", "from_id", take(&mut r, 0))?.into());
        }
    }
    Ok(out)
}

/// The links of `anchors` (those linked).
fn links_by_anchors(conn: &Db<'_>, anchors: &[&str]) -> Result<Vec<Link>, StateError> {
    rows_in(conn, LINKS_IN, anchors, 4, "reading links")?
        .into_iter()
        .map(decode_link)
        .collect()
}

/// The target objects of `ids` (those in the target mirror).
fn targets_by_ids(
    conn: &Db<'_>,
    names: &Names,
    ids: &[&str],
) -> Result<Vec<TargetObject>, StateError> {
    decoded_in(conn, TARGETS_IN, ids, 3, "reading target objects", |r| {
        decode_target_in(names, r)
    })
}

/// A source object held as context with none of its attributes, from the heads index.
fn entry_of_head(head: crate::state::heads::Head<'_>, dn: Option<Dn>) -> Result<Entry, StateError> {
    let dn = match (dn, head.dn) {
        (Some(d), _) => Some(d),
        (None, Some(d)) => Some(
            Dn::parse(d)
                .map_err(|e| corrupt("source_objects", head.anchor, format!("column dn: {e}")))?,
        ),
        (None, None) => None,
    };
    Ok(Entry {
        anchor: Anchor::new(head.anchor),
        object_type: head.object_type.clone(),
        dn,
        attributes: Attributes::new(),
    })
}

/// [`entries_by_dns`] for heads, from the index: the source objects at the DNs `dns`
/// reference (compared normalized). A DN stored as the reference spells it is the
/// reference's own, not parsed again.
fn heads_at_dns(heads: &Heads, dns: &[Dn]) -> Result<Vec<Entry>, StateError> {
    let mut seen: rustc_hash::FxHashSet<&str> = Default::default();
    let mut out = Vec::new();
    for d in dns {
        if !seen.insert(d.normalized()) {
            continue;
        }
        for h in heads.heads_at_key(dn_key(d.normalized())) {
            let Some(stored) = h.dn else { continue };
            let dn = if stored == d.as_str() {
                d.clone()
            } else {
                match Dn::parse(stored) {
                    Ok(p) if p.normalized() == d.normalized() => p,
                    Ok(_) => continue,
                    Err(e) => {
                        return Err(corrupt(
                            "source_objects",
                            h.anchor,
                            format!("column dn: {e}"),
                        ))
                    }
                }
            };
            out.push(entry_of_head(h, Some(dn))?);
        }
    }
    Ok(out)
}

/// [`fetch_entries`] for heads, from the index.
fn fetch_heads<'a>(
    heads: &Heads,
    entries: &mut Fetched,
    want: impl IntoIterator<Item = &'a Anchor>,
) -> Result<(), StateError> {
    for a in want {
        if entries.contains_key(a) {
            continue;
        }
        let e = match heads.head(a.as_str()) {
            Some(h) => Some(entry_of_head(h, None)?),
            None => None,
        };
        entries.insert(a.clone(), e);
    }
    Ok(())
}

/// Source objects read so far for a neighbourhood: `None` for an anchor not in the mirror.
type Fetched = rustc_hash::FxHashMap<Anchor, Option<Entry>>;

/// Reads into `entries` the source objects of `want` not read yet.
fn fetch_entries<'a>(
    conn: &Db<'_>,
    names: &Names,
    entries: &mut Fetched,
    want: impl IntoIterator<Item = &'a Anchor>,
    keep: Option<&Keep<'_>>,
) -> Result<(), StateError> {
    let mut missing: Vec<&Anchor> = want
        .into_iter()
        .filter(|a| !entries.contains_key(*a))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    let keys: Vec<&str> = missing.iter().map(|a| a.as_str()).collect();
    for e in entries_by_anchors(conn, names, &keys, keep)? {
        entries.insert(e.anchor.clone(), Some(e));
    }
    for a in missing {
        entries.entry(a.clone()).or_insert(None);
    }
    Ok(())
}

/// The objects referencing one of `of` (by anchor, or by the DN of its entry in `entries`).
fn referrers_of_read<'a>(
    conn: &Db<'_>,
    entries: &Fetched,
    of: impl IntoIterator<Item = &'a Anchor>,
) -> Result<BTreeSet<Anchor>, StateError> {
    let mut anchors = Vec::new();
    let mut dns = Vec::new();
    for a in of {
        anchors.push(a.as_str());
        if let Some(d) = entries.get(a).and_then(|e| e.as_ref()?.dn.as_ref()) {
            dns.push(d.normalized());
        }
    }
    referrers_of(conn, &anchors, &dns)
}

/// Which anchors a neighbourhood is read for ([`SqliteStore::neighbourhood_of`]).
enum Keys<'a> {
    /// These.
    Anchors(&'a [Anchor]),
    /// Those of the first `limit` source objects after the row `after`, in row order (a
    /// sequential read, where reading by anchor seeks each).
    Rows { after: i64, limit: usize },
}

/// The source objects of the first `limit` rows after `after` (in row order): their anchors
/// (sorted), their entries, and the last row (`0` when none is left).
fn scan_rows(
    conn: &Db<'_>,
    after: i64,
    limit: usize,
) -> Result<(Vec<Anchor>, Fetched, i64), StateError> {
    let what = "reading a page of source objects";
    conn.names.borrow_mut().reload(conn)?;
    let names_ref = conn.names()?;
    let names: &Names = &names_ref;
    let mut raw = Vec::new();
    let mut last = 0;
    {
        let mut stmt = conn.prepare_cached(ROWS_PAGE).ctx(what)?;
        let rows = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut q = stmt.query(params![after, rows]).ctx(what)?;
        // Weighed as the delta's pages are: an object and its references (rows are in the
        // order the import wrote them, so a directory's groups come together — a page of
        // 20,000 of them would hold millions of members).
        let mut weight = 0usize;
        while let Some(r) = q.next().ctx(what)? {
            let row = (0..5)
                .map(|i| r.get::<_, SqlValue>(i))
                .collect::<rusqlite::Result<Vec<_>>>()
                .ctx(what)?;
            let refs = match &row[4] {
                SqlValue::Blob(b) => {
                    let n = Cell::new(0usize);
                    // Counted, not kept (a scan: nothing is decoded); a row it cannot read
                    // weighs one, and says what is wrong with it when decoded below.
                    let _ = decode_binary_refs(
                        b,
                        |id| names.name(id),
                        |_| {
                            n.set(n.get() + 1);
                            false
                        },
                    );
                    n.get()
                }
                _ => 0,
            };
            weight += 1 + refs;
            if weight > limit && !raw.is_empty() {
                break;
            }
            last = match &row[0] {
                SqlValue::Integer(id) => *id,
                _ => {
                    return Err(corrupt(
                        "source_objects",
                        "?",
                        "column id is not an integer",
                    ))
                }
            };
            raw.push(row.into_iter().skip(1).collect::<Vec<_>>());
        }
    }
    let mut anchors = Vec::with_capacity(raw.len());
    let mut entries = Fetched::default();
    for e in decode_rows(raw, |r| decode_entry_in(names, r))? {
        anchors.push(e.anchor.clone());
        entries.insert(e.anchor.clone(), Some(e));
    }
    anchors.sort_unstable();
    Ok((anchors, entries, last))
}

/// The neighbourhood of `anchors` reaching as far as `reach` says
/// ([`StateStore::load_neighbourhood_reaching`]), read with bulk reads: one `IN` list per few
/// hundred keys and table, not a query per anchor.
fn read_neighbourhood(
    conn: &Db<'_>,
    anchors: &[Anchor],
    reach: Reach,
    light: bool,
    heads: Option<&Heads>,
    missed: &std::cell::Cell<usize>,
    mut entries: Fetched,
) -> Result<Views, StateError> {
    let links_of = |keys: &[&str]| -> Result<Vec<Link>, StateError> {
        match heads {
            Some(h) => Ok(keys.iter().filter_map(|a| h.link(a)).collect()),
            None => {
                missed.set(missed.get() + keys.len());
                links_by_anchors(conn, keys)
            }
        }
    };
    // The dictionary as this snapshot has it (another connection may have added names), read
    // once for the decoding on several threads.
    conn.names.borrow_mut().reload(conn)?;
    let names_ref = conn.names()?;
    let names: &Names = &names_ref;
    fetch_entries(conn, names, &mut entries, anchors, None)?;
    let mut planned: BTreeSet<Anchor> = anchors.iter().cloned().collect();
    match reach {
        Reach::AnchorsBare => {
            // The anchors alone: their entries, links and target objects.
            let keys: Vec<&str> = anchors.iter().map(Anchor::as_str).collect();
            let links = links_of(&keys)?;
            let ids: Vec<&str> = links.iter().map(|l| l.target_id.as_str()).collect();
            let targets = targets_by_ids(conn, names, &ids)?;
            let mut views = Views::default();
            for e in entries.into_values().flatten() {
                views.mirror.insert(e);
            }
            for l in links {
                views.links.insert(l);
            }
            for o in targets {
                views.target.insert(o);
            }
            return Ok(views);
        }
        Reach::Anchors | Reach::AnchorsAlone | Reach::AnchorsByLink => {}
        Reach::Referrers => planned.extend(referrers_of_read(conn, &entries, anchors)?),
        Reach::LinkedReferrers => {
            let referrers = referrers_of_read(conn, &entries, anchors)?;
            let keys: Vec<&str> = referrers
                .iter()
                .filter(|r| !planned.contains(*r))
                .map(|r| r.as_str())
                .collect();
            let linked: Vec<Anchor> = links_of(&keys)?.into_iter().map(|l| l.anchor).collect();
            planned.extend(linked);
        }
    }
    if planned.iter().any(|p| !entries.contains_key(p)) {
        fetch_entries(conn, names, &mut entries, &planned, None)?;
    }
    // What references a planned object (the referrers not planned among them).
    let referrers = if matches!(reach, Reach::AnchorsAlone | Reach::AnchorsByLink) {
        BTreeSet::new()
    } else {
        referrers_of_read(conn, &entries, &planned)?
    };
    let mut context = referrers.clone();
    // The DNs referenced, as the references spell them (an index read takes the parsed DN of
    // a reference spelled as the object's own).
    let mut ref_dns: Vec<Dn> = Vec::new();
    for e in planned.iter().filter_map(|p| entries.get(p)?.as_ref()) {
        for (_, values) in e.attributes.iter() {
            for v in values {
                match v {
                    Value::Reference(
                        crate::model::Reference::Anchor(a) | crate::model::Reference::Pending(a),
                    ) => {
                        context.insert(a.clone());
                    }
                    Value::Reference(crate::model::Reference::Dn(d)) => ref_dns.push(d.clone()),
                    _ => {}
                }
            }
        }
    }
    let mut dns: Vec<&str> = ref_dns.iter().map(Dn::normalized).collect();
    dns.sort_unstable();
    dns.dedup();
    // Held light, a referrer keeps its references to the planned objects (what `member_of`
    // and the planner's walks over referrers read); an object only referenced keeps none:
    // translating a reference to it reads its link and DN.
    let keep_heads = Keep {
        anchors: Default::default(),
        dns: Default::default(),
        heads: true,
    };
    let for_referenced = light.then_some(&keep_heads);
    if !referrers.is_empty() {
        let planned_dns: Vec<String> = planned
            .iter()
            .filter_map(|p| {
                Some(
                    entries
                        .get(p)?
                        .as_ref()?
                        .dn
                        .as_ref()?
                        .normalized()
                        .to_owned(),
                )
            })
            .collect();
        let keep_refs = Keep {
            anchors: planned.iter().map(Anchor::as_str).collect(),
            dns: planned_dns.iter().map(String::as_str).collect(),
            heads: false,
        };
        let for_referrers = light.then_some(&keep_refs);
        fetch_entries(conn, names, &mut entries, &referrers, for_referrers)?;
    }
    let referenced = match (light, heads) {
        (true, Some(h)) => heads_at_dns(h, &ref_dns)?,
        _ => {
            missed.set(missed.get() + dns.len());
            entries_by_dns(conn, names, &dns, for_referenced)?
        }
    };
    for e in referenced {
        context.insert(e.anchor.clone());
        if !matches!(entries.get(&e.anchor), Some(Some(_))) {
            entries.insert(e.anchor.clone(), Some(e));
        }
    }
    let all: Vec<&str> = planned
        .iter()
        .chain(context.iter().filter(|a| !planned.contains(*a)))
        .map(|a| a.as_str())
        .collect();
    let links = links_of(&all)?;
    // By link: of what the planned objects reference, only the unlinked ones' heads (those
    // referenced by DN came above).
    let linked: rustc_hash::FxHashSet<&str> = match reach {
        Reach::AnchorsByLink => links.iter().map(|l| l.anchor.as_str()).collect(),
        _ => Default::default(),
    };
    let wanted = context.iter().filter(|a| !linked.contains(a.as_str()));
    match (light, heads) {
        (true, Some(h)) => fetch_heads(h, &mut entries, wanted)?,
        _ => fetch_entries(conn, names, &mut entries, wanted, for_referenced)?,
    }
    let ids: Vec<&str> = links
        .iter()
        .filter(|l| planned.contains(&l.anchor))
        .map(|l| l.target_id.as_str())
        .collect();
    let targets = targets_by_ids(conn, names, &ids)?;
    // Built here: a thread of its own per page saved little and leaves memory with its
    // allocator arena.
    let mut mirror = crate::delta::SourceMirror::default();
    // In the order the planned objects then the context come.
    for a in &planned {
        if let Some(e) = entries.get_mut(a).and_then(Option::take) {
            mirror.insert(e);
        }
    }
    for a in context.iter().filter(|a| !planned.contains(*a)) {
        if let Some(e) = entries.get_mut(a).and_then(Option::take) {
            if light {
                mirror.insert_partial(e);
            } else {
                mirror.insert(e);
            }
        }
    }
    let mut views = Views {
        mirror,
        ..Views::default()
    };
    for l in links {
        views.links.insert(l);
    }
    for o in targets {
        views.target.insert(o);
    }
    Ok(views)
}

// --- reading helpers (work on a connection or a transaction) ---

fn load_entry(conn: &Db<'_>, anchor: &Anchor) -> Result<Option<Entry>, StateError> {
    rows(
        conn,
        ENTRY_BY_ANCHOR,
        [anchor.as_str()],
        "reading a source object",
    )?
    .into_iter()
    .next()
    .map(|r| decode_entry(conn, r))
    .transpose()
}

fn load_target(conn: &Db<'_>, id: &TargetId) -> Result<Option<TargetObject>, StateError> {
    rows(conn, TARGET_BY_ID, [id.as_str()], "reading a target object")?
        .into_iter()
        .next()
        .map(|r| decode_target(conn, r))
        .transpose()
}

/// The key `source_objects.dn_key` holds for a normalized DN: its 64-bit FNV-1a hash.
fn dn_key(dn_norm: &str) -> i64 {
    super::fnv1a(super::FNV_OFFSET, dn_norm.as_bytes()) as i64
}

/// Whether the DN column `dn` (as spelled) normalizes to `dn_norm`.
fn dn_is(dn: &str, dn_norm: &str) -> bool {
    Dn::parse(dn).is_ok_and(|d| d.normalized() == dn_norm)
}

fn anchors_at(conn: &Db<'_>, dn_norm: &str) -> Result<Vec<Anchor>, StateError> {
    anchors_at_spelled(conn, dn_norm, None)
}

/// [`anchors_at`]; a row whose DN is spelled `spelled` (a spelling of `dn_norm`) is at it
/// without parsing its DN (how references to an object are usually spelled).
fn anchors_at_spelled(
    conn: &Db<'_>,
    dn_norm: &str,
    spelled: Option<&str>,
) -> Result<Vec<Anchor>, StateError> {
    Ok(holders_at(conn, dn_norm, spelled)?
        .into_iter()
        .map(|(a, _)| a)
        .collect())
}

/// [`anchors_at_spelled`] with each object's id.
fn holders_at(
    conn: &Db<'_>,
    dn_norm: &str,
    spelled: Option<&str>,
) -> Result<Vec<(Anchor, i64)>, StateError> {
    const T: &str = "source_objects";
    let mut stmt = conn
        .prepare_cached(ANCHORS_BY_DN)
        .ctx("reading source_objects")?;
    let mut q = stmt
        .query([dn_key(dn_norm)])
        .ctx("reading source_objects")?;
    let mut out = Vec::new();
    while let Some(r) = q.next().ctx("reading source_objects")? {
        let anchor = text_ref(
            T,
            dn_norm,
            "anchor",
            r.get_ref(0).ctx("reading source_objects")?,
        )?;
        let at = match r.get_ref(1).ctx("reading source_objects")? {
            ValueRef::Null => false,
            d => {
                let d = text_ref(T, anchor, "dn", d)?;
                spelled == Some(d) || dn_is(d, dn_norm)
            }
        };
        if at {
            let id: i64 = r.get(2).ctx("reading source_objects")?;
            out.push((Anchor::from(anchor), id));
        }
    }
    Ok(out)
}

/// The anchors (first column) a query on `source_refs` returns.
fn ref_rows(
    conn: &Db<'_>,
    sql: &str,
    params: impl rusqlite::Params,
    key: &str,
) -> Result<Vec<Anchor>, StateError> {
    rows(conn, sql, params, "reading references")?
        .into_iter()
        .map(|mut r| text("source_refs", key, "from_anchor", take(&mut r, 0)).map(Anchor::from))
        .collect()
}

fn referrers(
    conn: &Db<'_>,
    anchor: &Anchor,
    dn_norm: Option<&str>,
) -> Result<Vec<Anchor>, StateError> {
    ref_rows(
        conn,
        REFERRERS,
        params![anchor.as_str(), dn_norm],
        anchor.as_str(),
    )
}

/// The rows of a page query (`?1`: the anchor the page starts after, `?2`: its size).
fn page_rows<T>(
    conn: &Db<'_>,
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

fn meta_int(conn: &Db<'_>, key: &str) -> Result<i64, StateError> {
    let v: Option<SqlValue> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")
        .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
        .ctx("reading meta")?;
    match v {
        Some(v) => int("meta", key, "value", v),
        None => Err(corrupt("meta", key, "row missing")),
    }
}

fn bump(conn: &Db<'_>) -> Result<(), StateError> {
    conn.prepare_cached("UPDATE meta SET value = value + 1 WHERE key = 'fingerprint'")
        .and_then(|mut s| s.execute([]))
        .ctx("moving the fingerprint")?;
    Ok(())
}

fn session(conn: &Db<'_>) -> Result<Option<Session>, StateError> {
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

fn set_session(conn: &Db<'_>, s: Option<&Session>) -> Result<(), StateError> {
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

fn put_watermark(conn: &Db<'_>, connector: &str, w: &Watermark) -> Result<(), StateError> {
    conn.prepare_cached(
        "INSERT INTO watermarks (connector, kind, data) VALUES (?1, ?2, ?3) \
         ON CONFLICT (connector) DO UPDATE SET kind = excluded.kind, data = excluded.data",
    )
    .and_then(|mut s| s.execute(params![connector, w.kind, w.data]))
    .ctx("committing a watermark")?;
    Ok(())
}

fn mark(conn: &Db<'_>, anchors: impl IntoIterator<Item = Anchor>) -> Result<usize, StateError> {
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
    id: i64,
    hash: i64,
    generation: i64,
    dn_norm: Option<String>,
}

fn row_state(conn: &Db<'_>, anchor: &Anchor) -> Result<Option<RowState>, StateError> {
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
    let dn_norm = match opt_text(T, a, "dn", take(&mut r, 2))? {
        Some(d) => Some(
            Dn::parse(&d)
                .map_err(|e| corrupt(T, a, format!("column dn: {e}")))?
                .normalized()
                .to_owned(),
        ),
        None => None,
    };
    Ok(Some(RowState {
        hash: int(T, a, "content_hash", take(&mut r, 0))?,
        generation: int(T, a, "generation", take(&mut r, 1))?,
        id: int(T, a, "id", take(&mut r, 3))?,
        dn_norm,
    }))
}

/// Records the hash and generation of the source object `id`.
fn put_state(conn: &Db<'_>, id: i64, hash: i64, generation: i64) -> Result<(), StateError> {
    conn.prepare_cached(
        "INSERT INTO source_state (id, content_hash, generation) VALUES (?1, ?2, ?3) \
         ON CONFLICT (id) DO UPDATE SET content_hash = excluded.content_hash, \
         generation = excluded.generation",
    )
    .and_then(|mut s| s.execute(params![id, hash, generation]))
    .ctx("recording a source object's state")?;
    Ok(())
}

/// The id of the source object `anchor`, if mirrored.
fn object_id(conn: &Db<'_>, anchor: &str) -> Result<Option<i64>, StateError> {
    conn.prepare_cached(OBJECT_ID)
        .and_then(|mut s| s.query_row([anchor], |r| r.get(0)).optional())
        .ctx("reading a source object's id")
}

/// A reference, comparable: attribute and target (anchor, or normalized DN).
type RefKey = (AttrName, bool, String);

fn entry_ref_keys(e: &Entry) -> BTreeSet<RefKey> {
    entry_references(e)
        .into_iter()
        .map(|(n, t)| match t {
            RefTarget::Anchor(a) => (n, true, a.as_str().to_owned()),
            RefTarget::Dn(d) => (n, false, d),
        })
        .collect()
}

/// What an entry's reference rows record: the targets it refers to, (by DN, anchor or
/// normalized DN), whatever the attribute.
fn ref_targets(e: Option<&Entry>) -> BTreeSet<(bool, String)> {
    let Some(e) = e else {
        return BTreeSet::new();
    };
    entry_references(e)
        .into_iter()
        .map(|(_, t)| match t {
            RefTarget::Anchor(a) => (false, a.as_str().to_owned()),
            RefTarget::Dn(d) => (true, d),
        })
        .collect()
}

/// The anchor of the object at `dn` (the least, should two claim it).
fn anchor_at(conn: &Db<'_>, dn: &Dn) -> Result<Option<Anchor>, StateError> {
    Ok(
        anchors_at_spelled(conn, dn.normalized(), Some(dn.as_str()))?
            .into_iter()
            .min(),
    )
}

/// Brings the reference rows of the object `id` from those of its stored entry `old` to
/// those of `new` (the rows follow the entries: which rows an entry has is computed from it).
/// A reference to a mirrored object is a pair of ids; to an anchor not mirrored or a DN, an
/// open row by text.
fn put_refs(
    conn: &Db<'_>,
    id: i64,
    old: Option<&Entry>,
    new: Option<&Entry>,
    known: &FxHashMap<String, i64>,
    w: Option<&Writes<'_>>,
) -> Result<(), StateError> {
    let (old, new) = (ref_targets(old), ref_targets(new));
    let object_id = |conn: &Db<'_>, to: &str| match (known.get(to), w) {
        (Some(id), _) => Ok(Some(*id)),
        (None, Some(w)) => w.object_id(conn, to),
        (None, None) => object_id(conn, to),
    };
    for (by_dn, to) in old.difference(&new) {
        if !by_dn {
            if let Some(t) = object_id(conn, to)? {
                conn.prepare_cached(REF_DELETE)
                    .and_then(|mut s| s.execute(params![t, id]))
                    .ctx("removing references")?;
            }
        }
        conn.prepare_cached(OPEN_REF_DELETE)
            .and_then(|mut s| s.execute(params![to, by_dn, id]))
            .ctx("removing references")?;
    }
    for (by_dn, to) in new.difference(&old) {
        let to_id = if *by_dn { None } else { object_id(conn, to)? };
        match to_id {
            Some(t) => conn
                .prepare_cached(REF_INSERT)
                .and_then(|mut s| s.execute(params![t, id])),
            None => {
                if let Some(w) = w {
                    w.open_refs.set(Some(true));
                }
                conn.prepare_cached(OPEN_REF_INSERT)
                    .and_then(|mut s| s.execute(params![to, by_dn, id]))
            }
        }
        .ctx("writing references")?;
    }
    Ok(())
}

/// Stores `entry` as the content of its existing row (whose stored content is `before`) with
/// its reference rows — a change the mirror makes by itself (a reference resolved or
/// removed). `rehash`: the row's hash becomes that of the stored content (else it stays that
/// of what the source last delivered).
fn rewrite_entry(
    conn: &Db<'_>,
    before: &Entry,
    entry: &Entry,
    rehash: bool,
    w: Option<&Writes<'_>>,
) -> Result<(), StateError> {
    let Some(id) = object_id(conn, entry.anchor.as_str())? else {
        return Ok(());
    };
    let attrs = conn.encode(&entry.attributes, Some(entry.anchor.as_str()))?;
    conn.prepare_cached("UPDATE source_objects SET attributes = ?2 WHERE id = ?1")
        .and_then(|mut s| s.execute(params![id, attrs]))
        .ctx("rewriting a source object")?;
    if rehash {
        let hash = encode_entry(entry)?.1;
        conn.prepare_cached("UPDATE source_state SET content_hash = ?2 WHERE id = ?1")
            .and_then(|mut s| s.execute(params![id, hash as i64]))
            .ctx("rewriting a source object's hash")?;
    }
    put_refs(
        conn,
        id,
        Some(before),
        Some(entry),
        &FxHashMap::default(),
        w,
    )
}

/// Resolves the unresolved references to `dn_norm` of every referrer into references to
/// `anchor` (the object at `dn_norm`, before that DN stops naming it). Returns the referrers.
fn pin(
    conn: &Db<'_>,
    dn_norm: &str,
    anchor: &Anchor,
    w: &Writes<'_>,
) -> Result<Vec<Anchor>, StateError> {
    let mut out = Vec::new();
    for r in ref_rows(conn, WAITING, [dn_norm], dn_norm)? {
        let Some(before) = load_entry(conn, &r)? else {
            continue;
        };
        let mut e = before.clone();
        let changed = resolve_references(&mut e, |d| {
            Ok::<_, StateError>((d.normalized() == dn_norm).then(|| anchor.clone()))
        })?;
        if changed {
            rewrite_entry(conn, &before, &e, false, Some(w))?;
            out.push(r);
        }
    }
    Ok(out)
}

/// Resolves the references waiting for the objects now at `dns` (normalized), each referrer
/// rewritten once.
fn settle(conn: &Db<'_>, dns: BTreeSet<String>, w: Option<&Writes<'_>>) -> Result<(), StateError> {
    let mut referrers: BTreeSet<Anchor> = BTreeSet::new();
    for d in dns {
        if !anchors_at(conn, &d)?.is_empty() {
            referrers.extend(ref_rows(conn, WAITING, [d.as_str()], &d)?);
        }
    }
    for r in referrers {
        let Some(before) = load_entry(conn, &r)? else {
            continue;
        };
        let mut e = before.clone();
        if resolve_references(&mut e, |d| anchor_at(conn, d))? {
            rewrite_entry(conn, &before, &e, false, w)?;
        }
    }
    Ok(())
}

/// Removes the references to `anchor` (whose object had id `id`) from its referrers; returns
/// them.
fn strip(
    conn: &Db<'_>,
    anchor: &Anchor,
    id: i64,
    w: &Writes<'_>,
) -> Result<Vec<Anchor>, StateError> {
    let mut out = Vec::new();
    for r in ref_rows(
        conn,
        REFERRING,
        params![id, anchor.as_str()],
        anchor.as_str(),
    )? {
        let Some(before) = load_entry(conn, &r)? else {
            continue;
        };
        let mut e = before.clone();
        if remove_references_to(&mut e, anchor) {
            rewrite_entry(conn, &before, &e, true, Some(w))?;
            out.push(r);
        }
    }
    Ok(out)
}

/// Migration 4's data step: every mirrored object re-encoded into the version 4 tables (the
/// hash of a source object becomes that of its stored content), then the new tables swapped
/// in. (The DN references that name mirrored objects, migration 3's work for files from
/// version 2, are resolved by version 6's step, on its tables.) Runs on the version 3 tables
/// only: its SQL is its own.
fn compact_mirrors(conn: &Db<'_>) -> Result<(), StateError> {
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
        let mut state = conn
            .prepare(
                "INSERT INTO source_state (anchor, content_hash, generation) VALUES (?1, ?2, ?3)",
            )
            .ctx("migrating the source mirror")?;
        let mut q = read.query([]).ctx("reading the source mirror to migrate")?;
        while let Some(r) = q.next().ctx("reading the source mirror to migrate")? {
            let mut row = raw_row(r, 5).ctx("reading the source mirror to migrate")?;
            let generation = take(&mut row, 4);
            let e = decode_entry(conn, row)?;
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
            state
                .execute(params![e.anchor.as_str(), hash as i64, generation])
                .ctx("migrating the source mirror")?;
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
            let o = decode_target(conn, row)?;
            ins.execute(params![
                o.id.as_str(),
                o.object_type.as_str(),
                encode_attributes(&o.attributes)
            ])
            .ctx("migrating the target mirror")?;
        }
    }
    conn.execute_batch(SCHEMA_V4_SWAP)
        .ctx("replacing the mirror tables")
}

/// Migration 6's data step: every mirrored object moved to the version 6 tables in its
/// binary form (source objects in arrival order, keeping their generation, hashed anew), the
/// references
/// moved by SQL, the old tables dropped; then the references by DN that name mirrored objects
/// are resolved (migration 3's work, for files that come from version 2 or 3).
fn lean_mirrors(conn: &Db<'_>) -> Result<(), StateError> {
    {
        let mut read = conn
            .prepare(
                "SELECT o.anchor, o.object_type, o.dn, o.attributes, s.generation \
                 FROM source_objects_v5 o \
                 LEFT JOIN source_state_v5 s ON s.anchor = o.anchor ORDER BY o.rowid",
            )
            .ctx("reading the source mirror to migrate")?;
        let mut q = read.query([]).ctx("reading the source mirror to migrate")?;
        while let Some(r) = q.next().ctx("reading the source mirror to migrate")? {
            let mut row = raw_row(r, 5).ctx("reading the source mirror to migrate")?;
            let generation = take(&mut row, 4);
            let e = decode_entry(conn, row)?;
            let a = e.anchor.as_str();
            // Version 6 hashes another form: the hash of the stored content (an object
            // delivered otherwise, by DN, is found the same once resolved at the next import,
            // and takes the hash of what was delivered).
            let hash = entry_hash_into(&e, &mut Vec::new()) as i64;
            let generation = match generation {
                SqlValue::Null => 0,
                g => int("source_state", a, "generation", g)?,
            };
            let id = insert_object(conn, &e)?;
            put_state(conn, id, hash, generation)?;
        }
    }
    {
        let mut read = conn
            .prepare("SELECT id, object_type, attributes FROM target_objects_v5")
            .ctx("reading the target mirror to migrate")?;
        let mut q = read.query([]).ctx("reading the target mirror to migrate")?;
        while let Some(r) = q.next().ctx("reading the target mirror to migrate")? {
            let row = raw_row(r, 3).ctx("reading the target mirror to migrate")?;
            let o = decode_target(conn, row)?;
            put_target_row(conn, &o.id, (&o.object_type, &o.attributes))?;
        }
    }
    conn.execute_batch(SCHEMA_V6_REFS)
        .ctx("migrating the references")?;
    // Value keys are shorter: the index is rebuilt for the attributes it held.
    reindex_targets(conn, lookup_attributes(conn)?.as_ref())?;
    let dns: BTreeSet<String> = rows(
        conn,
        "SELECT DISTINCT target FROM source_refs_open WHERE by_dn = 1",
        [],
        "finding references by DN",
    )?
    .into_iter()
    .map(|mut r| text("source_refs_open", "?", "target", take(&mut r, 0)))
    .collect::<Result<_, _>>()?;
    settle(conn, dns, None)
}

/// Inserts or replaces the source object row of `e` (its anchor's row keeps its id); returns
/// the id.
fn insert_object(conn: &Db<'_>, e: &Entry) -> Result<i64, StateError> {
    let attrs = conn.encode(&e.attributes, Some(e.anchor.as_str()))?;
    conn.prepare_cached(
        "INSERT INTO source_objects (anchor, object_type, dn, dn_key, attributes) \
         VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT (anchor) DO UPDATE SET object_type = excluded.object_type, \
         dn = excluded.dn, dn_key = excluded.dn_key, attributes = excluded.attributes \
         RETURNING id",
    )
    .and_then(|mut s| {
        s.query_row(
            params![
                e.anchor.as_str(),
                e.object_type.as_str(),
                e.dn.as_ref().map(|d| d.as_str()),
                e.dn.as_ref().map(|d| dn_key(d.normalized())),
                attrs,
            ],
            |r| r.get(0),
        )
    })
    .ctx("writing a source object")
}

/// Adds the row of `e`, whose anchor has none, with its state; returns its id. (A plain
/// `INSERT OR FAIL`: unlike [`insert_object`]'s upsert it needs no statement journal, which
/// would copy every page of the table and its indexes the statement changes that the
/// transaction changed before. `OR FAIL`, not the default `ABORT`: a statement that fires a
/// trigger, as the heads index's log does, and may abort needs one; one that fails keeps
/// what it changed before failing, which for a single row and `AFTER` triggers is nothing.)
fn add_object(conn: &Db<'_>, e: &Entry, hash: i64, generation: i64) -> Result<i64, StateError> {
    let attrs = conn.encode(&e.attributes, Some(e.anchor.as_str()))?;
    conn.prepare_cached(
        "INSERT OR FAIL INTO source_objects (anchor, object_type, dn, dn_key, attributes) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut s| {
        s.execute(params![
            e.anchor.as_str(),
            e.object_type.as_str(),
            e.dn.as_ref().map(|d| d.as_str()),
            e.dn.as_ref().map(|d| dn_key(d.normalized())),
            attrs,
        ])
    })
    .ctx("writing a source object")?;
    let id = conn.last_insert_rowid();
    conn.prepare_cached(
        "INSERT INTO source_state (id, content_hash, generation) VALUES (?1, ?2, ?3)",
    )
    .and_then(|mut s| s.execute(params![id, hash, generation]))
    .ctx("recording a source object's state")?;
    Ok(id)
}

/// Records that full import `generation` saw the source object `id` (unchanged).
fn set_generation(conn: &Db<'_>, id: i64, generation: i64) -> Result<(), StateError> {
    conn.prepare_cached("UPDATE source_state SET generation = ?2 WHERE id = ?1")
        .and_then(|mut s| s.execute(params![id, generation]))
        .ctx("recording a full import's generation")?;
    Ok(())
}

/// What the writes of source objects in one transaction share: the heads as the transaction
/// sees them, and what is done once for all of them at its end ([`Writes::finish`]).
struct Writes<'h> {
    /// The DNs that unresolved references wait for (for [`settle`]).
    unsettled: BTreeSet<String>,
    /// The anchors to mark dirty. Nothing in a transaction that writes source objects reads
    /// `dirty`, so the marks wait for its end: each once, in key order (one pass over the
    /// table's index instead of a seek per mark).
    dirty: Vec<Anchor>,
    /// The heads index as of the transaction's start with the heads the transaction wrote
    /// over it: DNs resolve, and anchors find their row id, without reading the file. `None`:
    /// the store keeps no index (the file answers).
    heads: Option<TxHeads<'h>>,
    /// The DNs resolved from the file (what the index would have answered: see
    /// [`SqliteStore::current_heads`]).
    missed: Cell<usize>,
    /// Whether `source_refs_open` may hold rows (`None`: not read yet). While it holds none,
    /// no reference waits for an object written, and nothing is read to find out.
    open_refs: Cell<Option<bool>>,
}

impl<'h> Writes<'h> {
    /// Nothing written yet, with the heads index `heads` (up to date as of the transaction's
    /// start) if the store keeps one.
    fn new(heads: Option<&'h Heads>) -> Writes<'h> {
        Writes {
            unsettled: BTreeSet::new(),
            dirty: Vec::new(),
            heads: heads.map(TxHeads::new),
            missed: Cell::new(0),
            open_refs: Cell::new(None),
        }
    }

    /// Whether a reference may wait for an object (by anchor or DN): `source_refs_open` holds
    /// rows, or this transaction wrote one.
    fn may_wait(&self, conn: &Db<'_>) -> Result<bool, StateError> {
        if let Some(b) = self.open_refs.get() {
            return Ok(b);
        }
        let any = conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM source_refs_open)")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .ctx("reading source_refs_open")?;
        self.open_refs.set(Some(any));
        Ok(any)
    }

    /// [`holders_at`], from the index when there is one.
    fn holders_at(
        &self,
        conn: &Db<'_>,
        dn_norm: &str,
        spelled: Option<&str>,
    ) -> Result<Vec<(Anchor, i64)>, StateError> {
        let Some(heads) = &self.heads else {
            self.missed.set(self.missed.get() + 1);
            return holders_at(conn, dn_norm, spelled);
        };
        Ok(heads
            .heads_at_key(dn_key(dn_norm))
            .filter(|h| {
                h.dn.is_some_and(|d| spelled == Some(d) || dn_is(d, dn_norm))
            })
            .map(|h| (Anchor::from(h.anchor), h.id))
            .collect())
    }

    /// [`anchor_at`], from the index when there is one.
    fn anchor_at(&self, conn: &Db<'_>, dn: &Dn) -> Result<Option<Anchor>, StateError> {
        Ok(self
            .holders_at(conn, dn.normalized(), Some(dn.as_str()))?
            .into_iter()
            .map(|(a, _)| a)
            .min())
    }

    /// The row id of the source object `anchor` if it is mirrored: from the index when there is
    /// one ([`object_id`]).
    fn object_id(&self, conn: &Db<'_>, anchor: &str) -> Result<Option<i64>, StateError> {
        match &self.heads {
            Some(h) => Ok(h.head(anchor).map(|h| h.id)),
            None => object_id(conn, anchor),
        }
    }

    /// Whether the source object `anchor` is mirrored, with its row id, as the index says
    /// (`None`: no index).
    fn mirrored(&self, anchor: &str) -> Option<Option<i64>> {
        self.heads.as_ref().map(|h| h.head(anchor).map(|h| h.id))
    }

    /// Tells the index's view that the row `id` now holds `e` (`None`: `anchor`'s row is gone).
    fn wrote(&mut self, anchor: &Anchor, row: Option<(i64, &Entry)>) {
        if let Some(h) = &mut self.heads {
            let dn = row.and_then(|(_, e)| e.dn.as_ref());
            let dn = dn.map(|d| (d.as_str(), dn_key(d.normalized())));
            h.write(anchor.as_str(), row.map(|(id, e)| (id, &e.object_type, dn)));
        }
    }

    /// Resolves the references waiting for the DNs written (see [`settle`]) and marks dirty
    /// what the writes changed. Returns the DNs resolved from the file.
    fn finish(mut self, conn: &Db<'_>) -> Result<usize, StateError> {
        let unsettled = std::mem::take(&mut self.unsettled);
        settle(conn, unsettled, Some(&self))?;
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        mark(conn, dirty)?;
        Ok(self.missed.get())
    }
}

/// Writes `new` as the entry of `anchor` (`None`: deletes it), marking dirty what changed
/// (see [`StateStore::apply_changes`]). `generation`: the full import that saw it, or `None`
/// to keep the stored one. The entry's DN references are resolved against the mirror; DNs that
/// unresolved references wait for are added to `w.unsettled` (for [`settle`]); a delete removes
/// the references to the object from its referrers. The row's hash is that of `new` as given
/// (what the source delivered). Returns whether the content changed.
fn write_entry(
    conn: &Db<'_>,
    anchor: &Anchor,
    new: Option<&Entry>,
    generation: Option<i64>,
    w: &mut Writes<'_>,
) -> Result<bool, StateError> {
    let hash = new.map(|e| entry_hash_into(e, &mut Vec::new()) as i64);
    let old = row_state(conn, anchor)?;
    write_hashed(conn, anchor, old, new.zip(hash), generation, w)
}

/// [`write_entry`] with the row's stored state `old` (as [`row_state`] reads it) and the
/// content hash of `new` (as [`entry_hash_into`] computes it) given.
fn write_hashed(
    conn: &Db<'_>,
    anchor: &Anchor,
    old: Option<RowState>,
    new: Option<(&Entry, i64)>,
    generation: Option<i64>,
    w: &mut Writes<'_>,
) -> Result<bool, StateError> {
    let generation = generation
        .or(old.as_ref().map(|o| o.generation))
        .unwrap_or(0);
    let new_hash = new.map(|(_, h)| h);
    let new = new.map(|(e, _)| e);
    if old.as_ref().map(|o| o.hash) == new_hash {
        if let Some(o) = &old {
            if o.generation != generation {
                set_generation(conn, o.id, generation)?;
            }
        }
        return Ok(false);
    }
    // The ids of the objects the references resolve to (for the reference rows).
    let mut ids: FxHashMap<String, i64> = FxHashMap::default();
    let new = match new {
        Some(e) => {
            let mut e = e.clone();
            resolve_references(&mut e, |d| {
                let found = w
                    .holders_at(conn, d.normalized(), Some(d.as_str()))?
                    .into_iter()
                    .min();
                Ok::<_, StateError>(found.map(|(a, id)| {
                    ids.insert(a.as_str().to_owned(), id);
                    a
                }))
            })?;
            Some(e)
        }
        None => None,
    };
    let stored = match &old {
        Some(_) => load_entry(conn, anchor)?,
        None => None,
    };
    if let (Some(o), Some(e), Some(h)) = (&old, &new, new_hash) {
        if stored.as_ref() == Some(e) {
            // Delivered differently (a referenced object's new DN), the same once resolved.
            put_state(conn, o.id, h, generation)?;
            return Ok(false);
        }
    }
    let old_dn = old.as_ref().and_then(|o| o.dn_norm.clone());
    let new_dn = new
        .as_ref()
        .and_then(|e| e.dn.as_ref())
        .map(|d| d.normalized().to_owned());
    if let Some(d) = old_dn.as_deref().filter(|d| new_dn.as_deref() != Some(*d)) {
        // A rename, move or delete: references still waiting by the old DN meant this object.
        pin(conn, d, anchor, w)?;
    }
    if let Some(d) = new_dn.as_deref().filter(|d| old_dn.as_deref() != Some(*d)) {
        // Another object held this DN until now: what waited for it meant that one.
        let spelled = new.as_ref().and_then(|e| e.dn.as_ref()).map(|d| d.as_str());
        let holders = w.holders_at(conn, d, spelled)?;
        if let Some((holder, _)) = holders.into_iter().find(|(h, _)| h != anchor) {
            pin(conn, d, &holder, w)?;
        }
    }
    w.dirty.push(anchor.clone());
    if old.is_some() {
        // (A new object's referrers are those waiting for its anchor, adopted below, and
        // those waiting for its DN.)
        w.dirty.extend(referrers(conn, anchor, old_dn.as_deref())?);
    }
    // Pinning may have rewritten this very object (a reference to its own old DN).
    let stored = match &old {
        Some(_) => load_entry(conn, anchor)?,
        None => None,
    };
    let old_refs = stored.as_ref().map(entry_ref_keys).unwrap_or_default();
    let new_refs = new.as_ref().map(entry_ref_keys).unwrap_or_default();
    match (&new, new_hash) {
        (Some(e), Some(hash)) => {
            let id = match &old {
                Some(_) => {
                    let id = insert_object(conn, e)?;
                    put_state(conn, id, hash, generation)?;
                    id
                }
                None => add_object(conn, e, hash, generation)?,
            };
            w.wrote(anchor, Some((id, e)));
            if old.is_none() {
                // References that waited for this anchor now name its object.
                let adopted = match w.may_wait(conn)? {
                    true => ref_rows(conn, WAITING_ANCHOR, [anchor.as_str()], anchor.as_str())?,
                    false => Vec::new(),
                };
                if !adopted.is_empty() {
                    conn.prepare_cached(OPEN_REFS_ADOPT)
                        .and_then(|mut s| s.execute(params![anchor.as_str(), id]))
                        .ctx("resolving references")?;
                    conn.prepare_cached(OPEN_REFS_ADOPTED)
                        .and_then(|mut s| s.execute([anchor.as_str()]))
                        .ctx("resolving references")?;
                    w.dirty.extend(adopted);
                }
            }
            put_refs(conn, id, stored.as_ref(), Some(e), &ids, Some(w))?;
        }
        _ => {
            if let Some(o) = &old {
                put_refs(conn, o.id, stored.as_ref(), None, &ids, Some(w))?;
                conn.prepare_cached("DELETE FROM source_objects WHERE id = ?1")
                    .and_then(|mut s| s.execute([o.id]))
                    .ctx("deleting a source object")?;
                w.wrote(anchor, None);
                conn.prepare_cached("DELETE FROM source_state WHERE id = ?1")
                    .and_then(|mut s| s.execute([o.id]))
                    .ctx("deleting a source object")?;
                let stripped = strip(conn, anchor, o.id, w)?;
                w.dirty.extend(stripped);
                // References to the gone object (none once stripped) would dangle.
                conn.prepare_cached("DELETE FROM source_refs WHERE to_id = ?1")
                    .and_then(|mut s| s.execute([o.id]))
                    .ctx("deleting a source object")?;
            }
        }
    }
    if new_dn != old_dn {
        if old.is_some() {
            w.dirty.extend(referrers(conn, anchor, new_dn.as_deref())?);
        }
        if let Some(d) = &new_dn {
            let waiting = match w.may_wait(conn)? {
                true => ref_rows(conn, WAITING, [d.as_str()], d)?,
                false => Vec::new(),
            };
            if !waiting.is_empty() {
                w.unsettled.insert(d.clone());
                w.dirty.extend(waiting);
            }
        }
    }
    for (_, by_anchor, to) in old_refs.symmetric_difference(&new_refs) {
        if *by_anchor {
            w.dirty.push(Anchor::from(to.as_str()));
        } else {
            let at = w.holders_at(conn, to, None)?;
            w.dirty.extend(at.into_iter().map(|(a, _)| a));
        }
    }
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
    // A string is its own key (lower-cased); any other value, or a string that starts as
    // those keys do, is the marker and its JSON (version 6; before, every key was JSON).
    match key {
        Value::String(s) if !s.starts_with(OTHER_KEY) => Some(s.to_string()),
        other => serde_json::to_string(&other)
            .ok()
            .map(|j| format!("{OTHER_KEY}{j}")),
    }
}

/// The first character of a value key that is not a plain string.
const OTHER_KEY: char = '\u{1}';

/// The declared lookup attributes kept in `meta` (`None`: never declared).
fn lookup_attributes(conn: &Db<'_>) -> Result<Option<LookupAttributes>, StateError> {
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
    conn: &Db<'_>,
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
    conn: &Db<'_>,
    id: &TargetId,
    (object_type, attributes): (&ObjectType, &Attributes),
    old: Result<Option<&TargetObject>, ()>,
    lookup: Option<&LookupAttributes>,
) -> Result<(), StateError> {
    put_target_row(conn, id, (object_type, attributes))?;
    reindex_target(conn, id, Some((object_type, attributes)), old, lookup)
}

/// Writes the row of a target object (not its index rows).
fn put_target_row(
    conn: &Db<'_>,
    id: &TargetId,
    (object_type, attributes): (&ObjectType, &Attributes),
) -> Result<(), StateError> {
    let attrs = conn.encode(attributes, None)?;
    conn.prepare_cached(
        "INSERT INTO target_objects (id, object_type, attributes) VALUES (?1, ?2, ?3) \
         ON CONFLICT (id) DO UPDATE SET object_type = excluded.object_type, \
         attributes = excluded.attributes",
    )
    .and_then(|mut s| s.execute(params![id.as_str(), object_type.as_str(), attrs]))
    .ctx("writing a target object")?;
    Ok(())
}

/// Inserts the row of a target object not stored yet (not its index rows), its attributes
/// in their stored form (`attrs`): false, writing nothing, when one with its id is.
fn insert_target_blob(
    conn: &Db<'_>,
    id: &TargetId,
    object_type: &ObjectType,
    attrs: &[u8],
) -> Result<bool, StateError> {
    let n = conn
        .prepare_cached(
            "INSERT INTO target_objects (id, object_type, attributes) VALUES (?1, ?2, ?3) \
             ON CONFLICT (id) DO NOTHING",
        )
        .and_then(|mut s| s.execute(params![id.as_str(), object_type.as_str(), attrs]))
        .ctx("writing a target object")?;
    Ok(n > 0)
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
    conn: &Db<'_>,
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
    conn: &Db<'_>,
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
    insert_index_keys(conn, id, new.difference(&old))
}

/// Adds the index rows `keys` (attribute lower-cased, value key) of the target object `id`.
fn insert_index_keys<'k>(
    conn: &Db<'_>,
    id: &TargetId,
    keys: impl IntoIterator<Item = &'k (String, String)>,
) -> Result<(), StateError> {
    let mut ins = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO target_values (attribute, value_key, id) VALUES (?1, ?2, ?3)",
        )
        .ctx("indexing a target object")?;
    for (attr, key) in keys {
        ins.execute(params![attr, key, id.as_str()])
            .ctx("indexing a target object")?;
    }
    Ok(())
}

fn delete_target(conn: &Db<'_>, id: &TargetId) -> Result<bool, StateError> {
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
fn rebuild_target_values(conn: &Db<'_>) -> Result<(), StateError> {
    reindex_targets(conn, None)
}

/// Rebuilds the target value index: the values of the `lookup` attributes (all, if `None`) of
/// every stored target object.
fn reindex_targets(conn: &Db<'_>, lookup: Option<&LookupAttributes>) -> Result<(), StateError> {
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
        let o = decode_target(conn, row)?;
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
fn compact_done_rows(conn: &Db<'_>) -> Result<(), StateError> {
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
fn prune(conn: &Db<'_>, retention: &Retention, now: DateTime<Utc>) -> Result<Pruned, StateError> {
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
/// (`op` and `sent`, redacted, as JSON — see [`payload_json`]).
fn intend(
    conn: &Db<'_>,
    run: RunId,
    (op, sent): (&Operation, Option<&TargetOperation>),
) -> Result<JournalId, StateError> {
    let (op_json, sent_json) = payload_json(op, sent)?;
    insert_intent(conn, run, op, (&op_json, sent_json.as_deref()))
}

/// The payload of a journal intent: `op` and `sent`, redacted, as JSON (`sent` as
/// [`payload::write_sent`] writes it). Pure: a batch's payloads are encoded on all cores
/// ([`intend_all`]) while only their rows are written one by one.
fn payload_json(
    op: &Operation,
    sent: Option<&TargetOperation>,
) -> Result<(String, Option<String>), StateError> {
    let redacted = redacted_operation(op);
    let op_json = serde_json::to_string(redacted.as_ref())
        .map_err(|e| serialize_error("a journaled operation", &e))?;
    let sent_json = match sent {
        Some(s) => {
            let mut buf = Vec::new();
            payload::write_sent(&redacted, &redacted_target_operation(op, s), &mut buf)
                .map_err(|e| serialize_error("a journaled target operation", &e))?;
            Some(
                String::from_utf8(buf)
                    .map_err(|e| serialize_error("a journaled target operation", &e))?,
            )
        }
        None => None,
    };
    Ok((op_json, sent_json))
}

/// Writes the journal row of the intent `op` and its payload (as [`payload_json`] encoded it).
fn insert_intent(
    conn: &Db<'_>,
    run: RunId,
    op: &Operation,
    (op_json, sent_json): (&str, Option<&str>),
) -> Result<JournalId, StateError> {
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

fn serialize_error(what: &str, e: &dyn std::fmt::Display) -> StateError {
    StateError::Serialize {
        what: what.to_owned(),
        detail: e.to_string(),
    }
}

/// Journals `ops` as intended for `run` (see [`StateStore::journal_intents`]): the payloads
/// encoded first, on all cores (with the `parallel` feature) — about a third of the work,
/// which the export's writer thread would otherwise do alone while the engine waits — then
/// the rows written in order.
fn intend_all(
    conn: &Db<'_>,
    run: RunId,
    ops: &[(&Operation, Option<&TargetOperation>)],
) -> Result<Vec<JournalId>, StateError> {
    check_run(conn, run)?;
    let payloads = map_all(ops, |(op, sent)| payload_json(op, *sent))?;
    ops.iter()
        .zip(&payloads)
        .map(|((op, _), (o, s))| insert_intent(conn, run, op, (o, s.as_deref())))
        .collect()
}

/// `f` of every item of `items`, in order: on all cores with the `parallel` feature (when
/// there are enough to share), the first error if any.
fn map_all<I: Sync, T: Send>(
    items: &[I],
    f: impl Fn(&I) -> Result<T, StateError> + Sync + Send,
) -> Result<Vec<T>, StateError> {
    #[cfg(feature = "parallel")]
    if items.len() >= 64 {
        use rayon::prelude::*;
        return items.par_iter().with_min_len(32).map(f).collect();
    }
    items.iter().map(f).collect()
}

/// Records `outcomes` (see [`StateStore::journal_outcomes`]), moving the fingerprint when one
/// is done. What the done ones write is computed first, on all cores with the `parallel`
/// feature ([`prepare_done`], [`DonePrep::encoded`]: effects, audit names, the new target
/// rows' encoded attributes and index keys); then the rows are written in order.
fn record_outcomes(
    conn: &Db<'_>,
    lookup: Option<&LookupAttributes>,
    outcomes: &[JournalOutcome<'_>],
) -> Result<(), StateError> {
    let mut preps = map_all(outcomes, |o| match o {
        JournalOutcome::Done {
            op,
            sent,
            target_id,
            ..
        } => prepare_done(op, *sent, *target_id, lookup).map(Some),
        JournalOutcome::Failed { .. } => Ok(None),
    })?;
    encode_created(conn, &mut preps)?;
    let mut done: Vec<i64> = Vec::with_capacity(outcomes.len());
    for (o, prep) in outcomes.iter().zip(preps) {
        match (o, prep) {
            (JournalOutcome::Done { id, op, .. }, Some(prep)) => {
                write_done(conn, lookup, *id, op, prep)?;
                done.push(id.0);
            }
            (
                JournalOutcome::Failed {
                    id,
                    error,
                    retryable,
                },
                _,
            ) => record_failed(conn, *id, error, *retryable)?,
            (JournalOutcome::Done { .. }, None) => {}
        }
    }
    if !done.is_empty() {
        drop_payloads(conn, done)?;
        bump(conn)?;
    }
    Ok(())
}

/// Deletes the payloads of the journal rows `ids` (done: nothing reads them any more), a run of
/// consecutive ids in one statement — a batch's rows are, as a rule.
fn drop_payloads(conn: &Db<'_>, mut ids: Vec<i64>) -> Result<(), StateError> {
    ids.sort_unstable();
    ids.dedup();
    let mut stmt = conn
        .prepare_cached(PAYLOADS_DELETE)
        .ctx("recording a done operation")?;
    let mut k = 0;
    while k < ids.len() {
        let first = ids[k];
        let mut last = first;
        k += 1;
        while k < ids.len() && Some(ids[k]) == last.checked_add(1) {
            last = ids[k];
            k += 1;
        }
        stmt.execute([first, last])
            .ctx("recording a done operation")?;
    }
    Ok(())
}

fn check_run(conn: &Db<'_>, run: RunId) -> Result<(), StateError> {
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

/// What recording a done operation writes, computed before anything is written: the
/// [`DoneEffect`](super::DoneEffect) parts, the journal row's audit names, and for a create's
/// new target object its index keys and (once [`encode_created`] ran) its encoded attributes.
struct DonePrep<'a> {
    effect: Option<(TargetId, std::borrow::Cow<'a, TargetOperation>)>,
    link_to: Option<TargetId>,
    recorded: Option<TargetId>,
    audit: Option<String>,
    /// A create's target object: its index keys and its stored attributes (`None` until
    /// encoded, or when a name was not in the dictionary: encoded as it is written).
    created: Option<(IndexKeys, Option<Vec<u8>>)>,
}

/// A target object's index keys: (attribute lower-cased, value key).
type IndexKeys = BTreeSet<(String, String)>;

/// The [`DonePrep`] of `op` (pure: no I/O).
fn prepare_done<'a>(
    op: &Operation,
    sent: Option<&'a TargetOperation>,
    target_id: Option<&TargetId>,
    lookup: Option<&LookupAttributes>,
) -> Result<DonePrep<'a>, StateError> {
    let (effect, link_to, recorded) = done_effect(op, sent, target_id)?;
    let audit = audit_json(sent)?;
    let created = match effect.as_ref().map(|(_, e)| e.as_ref()) {
        Some(TargetOperation::Create {
            object_type,
            attributes,
        }) => Some((indexed_keys(object_type, attributes, lookup), None)),
        _ => None,
    };
    Ok(DonePrep {
        effect,
        link_to,
        recorded,
        audit,
        created,
    })
}

impl DonePrep<'_> {
    /// The attributes of the target object a create makes, if it does.
    fn created_attributes(&self) -> Option<&Attributes> {
        match self.effect.as_ref().map(|(_, e)| e.as_ref()) {
            Some(TargetOperation::Create { attributes, .. }) if self.created.is_some() => {
                Some(attributes)
            }
            _ => None,
        }
    }

    /// The stored form of the created object's attributes, with the names of `names` (`None`
    /// when one is not there).
    fn encoded(&self, names: &Names) -> Option<Vec<u8>> {
        let attributes = self.created_attributes()?;
        let mut out = Vec::with_capacity(16 + attributes.len() * 24);
        encode_binary(attributes, None, &mut out, |n| {
            names.ids.get(n.as_str()).copied().ok_or(())
        })
        .ok()?;
        Some(out)
    }
}

/// Encodes the attributes of the target objects the creates among `preps` make: their names
/// added to the dictionary first (in order), then every object encoded, on all cores.
fn encode_created(conn: &Db<'_>, preps: &mut [Option<DonePrep<'_>>]) -> Result<(), StateError> {
    for attributes in preps
        .iter()
        .flatten()
        .filter_map(DonePrep::created_attributes)
    {
        for (name, _) in attributes.iter() {
            conn.id_of(name)?;
        }
    }
    let encoded = {
        let names = conn.names()?;
        let names: &Names = &names;
        map_all(preps, |p| Ok(p.as_ref().and_then(|p| p.encoded(names))))?
    };
    for (p, blob) in preps.iter_mut().zip(encoded) {
        if let Some((_, slot)) = p.as_mut().and_then(|p| p.created.as_mut()) {
            *slot = blob;
        }
    }
    Ok(())
}

/// Records in `conn` that `op` took effect (see [`StateStore::journal_done`]); the caller
/// moves the fingerprint.
fn record_done(
    conn: &Db<'_>,
    lookup: Option<&LookupAttributes>,
    id: JournalId,
    op: &Operation,
    sent: Option<&TargetOperation>,
    target_id: Option<&TargetId>,
) -> Result<(), StateError> {
    let prep = prepare_done(op, sent, target_id, lookup)?;
    write_done(conn, lookup, id, op, prep)
}

/// Writes what [`prepare_done`] computed for the done operation `op`, journal row `id`.
fn write_done(
    conn: &Db<'_>,
    lookup: Option<&LookupAttributes>,
    id: JournalId,
    op: &Operation,
    prep: DonePrep<'_>,
) -> Result<(), StateError> {
    let DonePrep {
        effect,
        link_to,
        recorded,
        audit,
        created,
    } = prep;
    let n = conn
        .prepare_cached(JOURNAL_DONE)
        .and_then(|mut s| s.execute(params![id.0, recorded.as_ref().map(|t| t.as_str()), audit]))
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
                // A new object, as a rule: inserted, its keys indexed, without reading first.
                let (keys, blob) = created.unwrap_or_default();
                let blob = match blob {
                    Some(b) => b,
                    None => conn.encode(attributes, None)?,
                };
                if insert_target_blob(conn, &tid, object_type, &blob)? {
                    return insert_index_keys(conn, &tid, &keys);
                }
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
    conn: &Db<'_>,
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

fn put_link(conn: &Db<'_>, link: &Link) -> Result<(), StateError> {
    let row = [
        link.anchor.as_str(),
        link.source_type.as_str(),
        link.target_id.as_str(),
        link.target_type.as_str(),
    ];
    // A new link, as a rule: one insert, which a link of the anchor or to the target object
    // refuses.
    let inserted = conn
        .prepare_cached(
            "INSERT INTO links (anchor, source_type, target_id, target_type) \
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
        )
        .and_then(|mut s| s.execute(row))
        .ctx("writing a link")?;
    if inserted > 0 {
        return Ok(());
    }
    // Replaced: explicit deletes then the insert (not INSERT OR REPLACE: its implicit deletes
    // skip triggers).
    conn.prepare_cached(LINK_DELETE_ANCHOR)
        .and_then(|mut s| s.execute([link.anchor.as_str()]))
        .ctx("replacing a link")?;
    conn.prepare_cached(LINK_DELETE_TARGET)
        .and_then(|mut s| s.execute([link.target_id.as_str()]))
        .ctx("replacing a link")?;
    conn.prepare_cached(
        "INSERT INTO links (anchor, source_type, target_id, target_type) VALUES (?1, ?2, ?3, ?4)",
    )
    .and_then(|mut s| s.execute(row))
    .ctx("writing a link")?;
    Ok(())
}

/// Marks dirty the object linked to the target object `id` (gone from the target) and its
/// referrers: the link is stale, and the references to it too.
fn mark_linked_gone(conn: &Db<'_>, id: &TargetId) -> Result<(), StateError> {
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

fn check_changes(conn: &Db<'_>, changes: &[Change]) -> Result<(), StateError> {
    super::check_changes(changes, |a| Ok(object_id(conn, a.as_str())?.is_some()))
}

impl StateStore for SqliteStore {
    fn apply_changes(
        &mut self,
        connector: &str,
        changes: &[Change],
        watermark: Option<&Watermark>,
    ) -> Result<(), StateError> {
        self.write_heads("applying a delta import", |tx, heads| {
            check_changes(tx, changes)?;
            let mut changed = false;
            let mut w = Writes::new(heads);
            for c in changes {
                let a = c.anchor();
                let u = &mut w;
                changed |= match c {
                    Change::Add(e) | Change::Replace(e) => write_entry(tx, a, Some(e), None, u)?,
                    Change::Delete { .. } => write_entry(tx, a, None, None, u)?,
                    Change::Modify { changes, .. } => match load_entry(tx, a)? {
                        Some(mut e) => {
                            let changes = resolve_change_values(changes, |d| u.anchor_at(tx, d))?;
                            for ch in &changes {
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
            let missed = w.finish(tx)?;
            if let Some(w) = watermark {
                put_watermark(tx, connector, w)?;
            }
            if changed {
                bump(tx)?;
            }
            Ok(((), missed))
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
        // No journal row, link or watermark: the commit need not wait for the disk (see
        // `Durability::Full`).
        let lazy = self.durability == Durability::Full;
        if lazy {
            self.conn
                .pragma_update(None, "synchronous", "NORMAL")
                .ctx("setting synchronous")?;
        }
        let out = self.import_batch(generation, entries);
        if lazy {
            self.conn
                .pragma_update(None, "synchronous", "FULL")
                .ctx("setting synchronous")?;
        }
        out
    }

    fn finish_full_import(
        &mut self,
        connector: &str,
        generation: u64,
        watermark: Option<&Watermark>,
        min_share: f64,
    ) -> Result<FullImportSummary, StateError> {
        self.write_heads("finishing a full import", |tx, heads| {
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
                "SELECT o.anchor FROM source_state s JOIN source_objects o ON o.id = s.id \
                 WHERE s.generation <> ?1 ORDER BY o.anchor",
                [generation as i64],
                "finding objects the import did not see",
            )?
            .into_iter()
            .map(|mut r| text("source_objects", "?", "anchor", take(&mut r, 0)).map(Anchor::from))
            .collect::<Result<_, _>>()?;
            let mut w = Writes::new(heads);
            for a in &unseen {
                write_entry(tx, a, None, None, &mut w)?;
            }
            let missed = w.finish(tx)?;
            if let Some(w) = watermark {
                put_watermark(tx, connector, w)?;
            }
            set_session(tx, None)?;
            if !unseen.is_empty() {
                bump(tx)?;
            }
            let summary = FullImportSummary {
                deleted: unseen.len() as u64,
                ..s.summary
            };
            Ok((summary, missed))
        })
    }

    fn watermark(&self, connector: &str) -> Result<Option<Watermark>, StateError> {
        const T: &str = "watermarks";
        let Some(mut r) = rows(
            &self.db(),
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
        self.in_snapshot(read_all)
    }

    fn load_neighbourhood(&self, anchors: &[Anchor]) -> Result<Views, StateError> {
        self.load_neighbourhood_reaching(anchors, Reach::Referrers)
    }

    fn load_neighbourhood_reaching(
        &self,
        anchors: &[Anchor],
        reach: Reach,
    ) -> Result<Views, StateError> {
        self.neighbourhood(anchors, reach, false)
    }

    fn load_neighbourhood_light(
        &self,
        anchors: &[Anchor],
        reach: Reach,
    ) -> Result<Views, StateError> {
        self.neighbourhood(anchors, reach, true)
    }

    fn referrers_linked(&self, anchors: &[Anchor]) -> Result<Vec<(Anchor, bool)>, StateError> {
        self.in_snapshot(|conn| {
            conn.names.borrow_mut().reload(conn)?;
            let names_ref = conn.names()?;
            let names: &Names = &names_ref;
            // The heads, for the DNs references may name them by.
            let heads = Keep {
                anchors: Default::default(),
                dns: Default::default(),
                heads: true,
            };
            let mut entries = Fetched::default();
            fetch_entries(conn, names, &mut entries, anchors, Some(&heads))?;
            let referrers = referrers_of_read(conn, &entries, anchors)?;
            let keys: Vec<&str> = referrers.iter().map(Anchor::as_str).collect();
            let linked: rustc_hash::FxHashSet<Anchor> = links_by_anchors(conn, &keys)?
                .into_iter()
                .map(|l| l.anchor)
                .collect();
            Ok(referrers
                .into_iter()
                .map(|r| {
                    let l = linked.contains(&r);
                    (r, l)
                })
                .collect())
        })
    }

    fn full_plan_page(
        &self,
        mark: Option<&PageMark>,
        limit: usize,
        reach: Reach,
    ) -> Result<Option<(Vec<Anchor>, Views, PageMark)>, StateError> {
        // The source objects in the order of their rows (a sequential read), then the links
        // without one. Each page is a snapshot of its own: were the file written by another
        // connection in between, an anchor could come twice (its row, then its link alone) or
        // not at all — refused, the plan is made again.
        let now = data_version(&self.conn)?;
        let (after_row, version) = match mark {
            None => (Some(0), now),
            Some(PageMark::Row { after, version }) => (Some(*after), *version),
            Some(PageMark::Unsourced { version, .. }) => (None, *version),
            Some(other) => {
                return Err(StateError::Invalid(format!(
                    "{other:?} is not a mark of this store's pages"
                )))
            }
        };
        let unchanged = || -> Result<(), StateError> {
            if data_version(&self.conn)? == version {
                Ok(())
            } else {
                Err(StateError::Invalid(
                    "another connection wrote the state file while a full plan was reading it: \
                     plan again"
                        .into(),
                ))
            }
        };
        unchanged()?;
        if let Some(after) = after_row {
            let (anchors, views, last) =
                self.neighbourhood_of(Keys::Rows { after, limit }, reach, true)?;
            unchanged()?;
            if !anchors.is_empty() {
                let next = PageMark::Row {
                    after: last,
                    version,
                };
                return Ok(Some((anchors, views, next)));
            }
        }
        let unsourced = match mark {
            Some(PageMark::Unsourced { after, .. }) => after.clone(),
            _ => None,
        };
        let anchors = page_rows(
            &self.db(),
            UNSOURCED_PAGE,
            (unsourced.as_ref(), limit),
            "reading a page of links",
            |r| Ok(Anchor::from(r.get::<_, String>(0)?)),
        )?;
        let Some(last) = anchors.last().cloned() else {
            unchanged()?;
            return Ok(None);
        };
        let views = self.neighbourhood(&anchors, reach, true)?;
        unchanged()?;
        let next = PageMark::Unsourced {
            after: Some(last),
            version,
        };
        Ok(Some((anchors, views, next)))
    }

    fn load_join_candidates(
        &self,
        views: &mut Views,
        lookups: &[TargetLookup],
    ) -> Result<(), StateError> {
        let conn = &self.db();
        // What each lookup asks: the attribute as indexed, and the key when the index holds
        // the value (and the attribute).
        let asks: Vec<(String, Option<String>)> = lookups
            .iter()
            .map(|l| {
                let attr = l.attribute.as_str().to_lowercase();
                let key = value_key(&l.value)
                    .filter(|_| indexed(self.lookup.as_ref(), &l.object_type, &attr));
                (attr, key)
            })
            .collect();
        // The indexed ones in bulk (a read per attribute and a few hundred keys, not one per
        // lookup: a first load of a million objects asks a million), then the objects and
        // links they name.
        let mut keys_of: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (attr, key) in &asks {
            if let Some(k) = key {
                keys_of.entry(attr.as_str()).or_default().insert(k.as_str());
            }
        }
        let mut ids_at: FxHashMap<(&str, String), Vec<String>> = FxHashMap::default();
        for (attr, keys) in &keys_of {
            let keys: Vec<&str> = keys.iter().copied().collect();
            for mut r in rows_in_after(
                conn,
                TARGET_LOOKUP_IN,
                &[attr],
                &keys,
                2,
                "looking up target values",
            )? {
                let id = text("target_values", "?", "id", take(&mut r, 1))?;
                let key = text("target_values", &id, "value_key", take(&mut r, 0))?;
                ids_at.entry((attr, key)).or_default().push(id);
            }
        }
        let mut ids: Vec<&str> = Vec::new();
        for found in ids_at.values_mut() {
            // In the order of the index, as a lookup of one key reads them.
            found.sort_unstable();
            ids.extend(found.iter().map(String::as_str));
        }
        ids.sort_unstable();
        ids.dedup();
        conn.names.borrow_mut().reload(conn)?;
        let objects: FxHashMap<String, TargetObject> = {
            let names_ref = conn.names()?;
            targets_by_ids(conn, &names_ref, &ids)?
                .into_iter()
                .map(|o| (o.id.as_str().to_owned(), o))
                .collect()
        };
        let links: FxHashMap<String, Link> =
            rows_in(conn, LINKS_BY_TARGETS_IN, &ids, 4, "reading links")?
                .into_iter()
                .map(|r| decode_link(r).map(|l| (l.target_id.as_str().to_owned(), l)))
                .collect::<Result<_, _>>()?;
        // Into the views lookup by lookup, as reading each alone would put them.
        for (l, (attr, key)) in lookups.iter().zip(&asks) {
            let found: Vec<TargetObject> = match key {
                Some(key) => ids_at
                    .get(&(attr.as_str(), key.clone()))
                    .into_iter()
                    .flatten()
                    .filter_map(|id| objects.get(id).cloned())
                    .collect(),
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
                    .map(|r| decode_target(conn, r))
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
                let link = match key {
                    Some(_) => links.get(o.id.as_str()).cloned(),
                    None => rows(conn, LINK_BY_TARGET, [o.id.as_str()], "reading a link")?
                        .into_iter()
                        .next()
                        .map(decode_link)
                        .transpose()?,
                };
                if let Some(link) = link {
                    views.links.insert(link);
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
            &self.db(),
            "SELECT anchor FROM source_objects WHERE anchor > ?1 \
             UNION SELECT anchor FROM links WHERE anchor > ?1 \
             ORDER BY anchor LIMIT ?2",
            (after, limit),
            "reading a page of anchors",
            |r| Ok(Anchor::from(r.get::<_, String>(0)?)),
        )
    }

    fn source_entry(&self, anchor: &Anchor) -> Result<Option<Entry>, StateError> {
        load_entry(&self.db(), anchor)
    }

    fn anchor_by_dn(&self, dn: &Dn) -> Result<Option<Anchor>, StateError> {
        Ok(anchors_at(&self.db(), dn.normalized())?.into_iter().min())
    }

    fn link_counts(&self) -> Result<BTreeMap<ObjectType, usize>, StateError> {
        let mut out = BTreeMap::new();
        for mut r in rows(
            &self.db(),
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
            &self.db(),
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
            &self.db(),
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
        let db = self.db();
        let mut stmt = db.prepare_cached(DIRTY_ENTRIES).ctx(what)?;
        let mut q = stmt.query([first.as_str(), last.as_str()]).ctx(what)?;
        while let Some(r) = q.next().ctx(what)? {
            let row = (0..4)
                .map(|i| r.get::<_, SqlValue>(i))
                .collect::<Result<Vec<_>, _>>()
                .ctx(what)?;
            let e = decode_entry(&db, row)?;
            let Ok(k) = page.binary_search_by(|(a, _)| a.cmp(&e.anchor)) else {
                continue;
            };
            for (_, t) in entry_references(&e) {
                if let RefTarget::Anchor(a) = t {
                    page[k].1.push(a);
                }
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
            intend(tx, run, (op, sent))
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
            drop_payloads(tx, vec![id.0])?;
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
        rows(&self.db(), UNCONFIRMED, [], "reading the journal")?
            .into_iter()
            .map(decode_journal)
            .collect()
    }

    fn journal(&self, run: Option<RunId>) -> Result<Vec<JournalRecord>, StateError> {
        let found = match run {
            Some(r) => rows(
                &self.db(),
                &format!("{JOURNAL_RECORDS} WHERE j.run = ?1 ORDER BY j.id"),
                [r.0],
                "reading the journal",
            )?,
            None => rows(
                &self.db(),
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
            &self.db(),
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
            &self.db(),
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
        })?;
        self.reclaim()
    }

    fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, StateError> {
        const T: &str = "runs";
        rows(
            &self.db(),
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
        Ok(meta_int(&self.db(), "fingerprint")? as u64)
    }

    fn move_subtrees(&mut self, moves: &[(Anchor, Dn)]) -> Result<Vec<Anchor>, StateError> {
        self.write("moving subtrees", |tx| {
            let mut now: std::collections::HashMap<Anchor, Dn> = std::collections::HashMap::new();
            let mut moved: BTreeSet<Anchor> = BTreeSet::new();
            let mut w = Writes::new(None);
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
                    if write_entry(tx, &a, Some(&e), None, &mut w)? {
                        moved.insert(a);
                    }
                }
            }
            w.finish(tx)?;
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
fn entry_dn(conn: &Db<'_>, anchor: &Anchor) -> Result<Option<Dn>, StateError> {
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
fn below_dn(conn: &Db<'_>, dn: &Dn) -> Result<Vec<Anchor>, StateError> {
    // The normalized DN is not stored (only its hash): every DN is read and compared. Subtree
    // moves are rare; this scan is their cost.
    let suffix = format!(",{}", dn.normalized());
    let mut out = Vec::new();
    for mut r in rows(
        conn,
        "SELECT anchor, dn FROM source_objects WHERE dn IS NOT NULL ORDER BY anchor",
        [],
        "finding the objects below a DN",
    )? {
        let anchor = text("source_objects", "?", "anchor", take(&mut r, 0))?;
        let d = text("source_objects", &anchor, "dn", take(&mut r, 1))?;
        if Dn::parse(&d).is_ok_and(|d| d.normalized().ends_with(&suffix)) {
            out.push(Anchor::from(anchor));
        }
    }
    Ok(out)
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

    /// The heads index follows this connection's writes (a link made, an object moved, the
    /// reference following it) and is dropped when another connection writes the file: a
    /// light neighbourhood reads the heads and links as the file holds them, every time.
    #[test]
    fn the_heads_index_follows_this_connections_writes_and_drops_at_anothers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut a = SqliteStore::open(&path).unwrap();
        a.set_head_index(HeadIndex::Always);
        let mut b = SqliteStore::open(&path).unwrap();
        a.apply_changes(
            "ad",
            &[
                Change::Add(
                    Entry::new("u1", "user")
                        .with_dn(dn("CN=Ann,DC=x"))
                        .with("manager", Value::dn_ref(dn("cn=bob,dc=x"))),
                ),
                Change::Add(Entry::new("u2", "user").with_dn(dn("CN=Bob,DC=x"))),
            ],
            None,
        )
        .unwrap();
        let u1: Anchor = "u1".into();
        let u2: Anchor = "u2".into();
        let context = |s: &SqliteStore| {
            let v = s
                .load_neighbourhood_light(std::slice::from_ref(&u1), Reach::Anchors)
                .unwrap();
            let dn = v
                .mirror
                .get(&u2)
                .and_then(|e| e.dn.as_ref().map(|d| d.as_str().to_owned()));
            let link = v.links.get(&u2).map(|l| l.target_id.as_str().to_owned());
            (dn, link)
        };
        assert_eq!(context(&a), (Some("CN=Bob,DC=x".to_owned()), None));
        assert!(a.heads.borrow().heads.is_some(), "built by the first read");
        // A link made through this connection.
        let run = a
            .begin_run("sync", DateTime::from_timestamp(1_700_000_000, 0).unwrap())
            .unwrap();
        let op = create_op("u2", "displayName", "Bob");
        let j = a.journal_intent(run, &op, None).unwrap();
        a.journal_done(j, &op, None, Some(&"t2".into())).unwrap();
        assert_eq!(
            context(&a),
            (Some("CN=Bob,DC=x".to_owned()), Some("t2".to_owned()))
        );
        // Moved, and the reference following it.
        a.apply_changes(
            "ad",
            &[
                Change::Move {
                    anchor: u2.clone(),
                    object_type: "user".into(),
                    new_dn: dn("CN=Robert,DC=x"),
                },
                Change::Replace(
                    Entry::new("u1", "user")
                        .with_dn(dn("CN=Ann,DC=x"))
                        .with("manager", Value::dn_ref(dn("CN=Robert,DC=x"))),
                ),
            ],
            None,
        )
        .unwrap();
        assert_eq!(
            context(&a),
            (Some("CN=Robert,DC=x".to_owned()), Some("t2".to_owned()))
        );
        assert!(
            a.heads.borrow().heads.is_some(),
            "kept through its own writes"
        );
        // Another connection moves the manager: the index is built again from the file (the
        // reference is held by anchor; a stale index would give the old DN).
        b.apply_changes(
            "ad",
            &[Change::Move {
                anchor: u2.clone(),
                object_type: "user".into(),
                new_dn: dn("CN=Bobby,DC=x"),
            }],
            None,
        )
        .unwrap();
        assert_eq!(
            context(&a),
            (Some("CN=Bobby,DC=x".to_owned()), Some("t2".to_owned()))
        );
        // And deletes it.
        b.apply_changes(
            "ad",
            &[Change::Delete {
                anchor: u2.clone(),
                object_type: "user".into(),
            }],
            None,
        )
        .unwrap();
        assert_eq!(context(&a), (None, None));
        let links = a
            .load_neighbourhood_light(std::slice::from_ref(&u2), Reach::Anchors)
            .unwrap()
            .links;
        assert_eq!(links.get(&u2).map(|l| l.target_type.as_str()), Some("User"));
    }

    /// A full import's batches commit without waiting for the disk, and only they: a store
    /// opened with `Durability::Full` is back to `synchronous=FULL` after each batch, after a
    /// refused one too, and its import's end and every other write wait as before.
    #[test]
    fn only_import_batches_commit_without_waiting_for_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(dir.path().join("state.db")).unwrap();
        let sync = |s: &SqliteStore| -> i64 {
            s.conn
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(sync(&s), 2);
        let g = s.begin_full_import("ad").unwrap();
        s.import_entries(g, &[Entry::new("a", "user").with_dn(dn("CN=A,DC=x"))])
            .unwrap();
        assert_eq!(sync(&s), 2);
        let twice = [
            Entry::new("b", "user").with_dn(dn("CN=B,DC=x")),
            Entry::new("b", "user").with_dn(dn("CN=C,DC=x")),
        ];
        assert!(s.import_entries(g, &twice).is_err());
        assert_eq!(sync(&s), 2);
        s.finish_full_import("ad", g, None, 0.0).unwrap();
        assert_eq!(sync(&s), 2);
        let mut normal =
            SqliteStore::open_with(dir.path().join("normal.db"), Durability::Normal).unwrap();
        let g = normal.begin_full_import("ad").unwrap();
        normal
            .import_entries(g, &[Entry::new("a", "user").with_dn(dn("CN=A,DC=x"))])
            .unwrap();
        assert_eq!(sync(&normal), 1, "a store opened so stays so");
    }

    /// An import batch into a store with no reference waiting (where nothing is read to find
    /// waiting references) whose first objects refer, by DN and by anchor, to objects later
    /// in the same batch: the references wait, then resolve as those objects arrive — with
    /// the heads index and without — and a later import that changes nothing marks nothing.
    #[test]
    fn references_to_objects_later_in_one_batch_wait_then_resolve() {
        for mode in [HeadIndex::Always, HeadIndex::Off] {
            let mut s = SqliteStore::open_in_memory().unwrap();
            s.set_head_index(mode);
            let batch = [
                Entry::new("g", "group")
                    .with_dn(dn("CN=G,DC=x"))
                    .with("member", Value::dn_ref(dn("cn=later,dc=x"))),
                Entry::new("m", "user")
                    .with_dn(dn("CN=M,DC=x"))
                    .with("manager", Value::anchor_ref("boss")),
                Entry::new("l", "user").with_dn(dn("CN=Later,DC=x")),
                Entry::new("boss", "user").with_dn(dn("CN=Boss,DC=x")),
            ];
            let g = s.begin_full_import("ad").unwrap();
            s.import_entries(g, &batch).unwrap();
            s.finish_full_import("ad", g, None, 0.0).unwrap();
            let group = s.source_entry(&"g".into()).unwrap().unwrap();
            assert_eq!(
                group.attributes.get("member").map(|v| v.to_vec()),
                Some(vec![Value::anchor_ref("l")]),
                "{mode:?}"
            );
            let views = s.load_neighbourhood(&["l".into(), "boss".into()]).unwrap();
            let referrers = |a: &str| -> Vec<Anchor> {
                let mut r: Vec<Anchor> = views
                    .mirror
                    .entries()
                    .filter(|e| {
                        e.attributes
                            .iter()
                            .any(|(_, vs)| vs.iter().any(|v| v == &Value::anchor_ref(a)))
                    })
                    .map(|e| e.anchor.clone())
                    .collect();
                r.sort();
                r
            };
            assert_eq!(referrers("l"), vec![Anchor::from("g")], "{mode:?}");
            assert_eq!(referrers("boss"), vec![Anchor::from("m")], "{mode:?}");
            let mut dirty = s.dirty().unwrap();
            dirty.sort();
            assert_eq!(dirty.len(), 4, "{mode:?}");
            s.clear_dirty(&dirty).unwrap();
            let g = s.begin_full_import("ad").unwrap();
            s.import_entries(g, &batch).unwrap();
            let sum = s.finish_full_import("ad", g, None, 0.0).unwrap();
            assert_eq!((sum.seen, sum.added, sum.changed), (4, 0, 0), "{mode:?}");
            assert!(s.dirty().unwrap().is_empty(), "{mode:?}");
            // No reference waits any more.
            let open: i64 = s
                .conn
                .query_row("SELECT count(*) FROM source_refs_open", [], |r| r.get(0))
                .unwrap();
            assert_eq!(open, 0, "{mode:?}");
        }
    }

    /// Imports through the heads index — each import's transaction sees the index as of its
    /// start with its own writes laid over it — leave the store as imports that read the file
    /// do: the same mirror, reference rows (the fingerprint), dirty set and refusals, through
    /// a seeded life cycle of full imports in batches and delta imports that add objects
    /// referring to objects of the same batch, rename and move objects others refer to (by DN,
    /// spelled in another case), put two objects at one DN, delete and add them again, refer
    /// to DNs nobody holds yet, and deliver one anchor twice in an import (refused, rolled
    /// back, the index left as it was).
    #[test]
    fn imports_through_the_heads_index_write_what_imports_reading_the_file_write() {
        let mut indexed = SqliteStore::open_in_memory().unwrap();
        indexed.set_head_index(HeadIndex::Always);
        let mut plain = SqliteStore::open_in_memory().unwrap();
        plain.set_head_index(HeadIndex::Off);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Thirty names, spelled two ways; forty anchors.
        let name = |k: u64, upper: bool| match upper {
            true => dn(&format!("CN=N{k},OU=Staff,DC=X")),
            false => dn(&format!("cn=n{k},ou=staff,dc=x")),
        };
        let entry = |next: &mut dyn FnMut() -> u64, a: u64, step: usize| {
            let r = next();
            let t = if r % 3 == 0 { "group" } else { "user" };
            let mut e = Entry::new(format!("o{a}"), t)
                .with_dn(name(r % 30, r % 2 == 0))
                .with("n", Value::from(format!("{}", step % 3)));
            for _ in 0..(r >> 8) % 4 {
                let v = next();
                e = e.with("member", Value::dn_ref(name(v % 32, v % 5 == 0)));
            }
            e
        };
        let mut refusals = 0;
        for step in 0..300 {
            let r = next();
            let (got_a, got_b) = if r % 3 == 0 {
                // A full import of a part of the anchors, in batches.
                let mut entries: Vec<Entry> = Vec::new();
                for a in 0..40 {
                    if next() % 4 != 0 {
                        entries.push(entry(&mut next, a, step));
                    }
                }
                if next() % 8 == 0 && !entries.is_empty() {
                    // One anchor twice, at another DN: refused.
                    let mut again = entries[0].clone();
                    again.dn = Some(name(31, false));
                    entries.push(again);
                }
                let cuts: Vec<usize> = (0..entries.len()).filter(|_| next() % 5 == 0).collect();
                let run = |s: &mut SqliteStore| -> Result<FullImportSummary, StateError> {
                    let g = s.begin_full_import("ad")?;
                    let mut from = 0;
                    for &to in cuts.iter().chain(std::iter::once(&entries.len())) {
                        s.import_entries(g, &entries[from..to.max(from)])?;
                        from = to.max(from);
                    }
                    s.finish_full_import("ad", g, None, 0.0)
                };
                let (a, b) = (run(&mut indexed), run(&mut plain));
                (format!("{a:?}"), format!("{b:?}"))
            } else {
                // A delta: adds, replaces, moves, modifies and deletes.
                let changes: Vec<Change> = (0..1 + next() % 6)
                    .map(|_| {
                        let a = next() % 40;
                        match next() % 5 {
                            0 => Change::Delete {
                                anchor: format!("o{a}").into(),
                                object_type: "user".into(),
                            },
                            1 => Change::Move {
                                anchor: format!("o{a}").into(),
                                object_type: "user".into(),
                                new_dn: name(next() % 30, next() % 2 == 0),
                            },
                            _ => Change::Replace(entry(&mut next, a, step)),
                        }
                    })
                    .collect();
                let (a, b) = (
                    indexed.apply_changes("ad", &changes, None),
                    plain.apply_changes("ad", &changes, None),
                );
                (format!("{a:?}"), format!("{b:?}"))
            };
            assert_eq!(got_a, got_b, "step {step}");
            refusals += usize::from(got_a.starts_with("Err"));
            assert_eq!(snapshot(&indexed), snapshot(&plain), "step {step}");
            if step % 7 == 0 {
                let dirty = plain.dirty().unwrap();
                indexed.clear_dirty(&dirty).unwrap();
                plain.clear_dirty(&dirty).unwrap();
            }
        }
        assert!(
            indexed.heads.borrow().heads.is_some(),
            "the imports used the index"
        );
        assert!(plain.heads.borrow().heads.is_none());
        assert!(refusals > 0, "some imports were refused");
    }

    /// A version 6 file opens as version 7 (no table changes): what it holds is kept, and it is
    /// not vacuumed again.
    #[test]
    fn a_version_6_file_is_migrated_to_7_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let mut s = SqliteStore::open(&path).unwrap();
            populate(&mut s);
            s.conn.pragma_update(None, "user_version", 6).unwrap();
        }
        let before = std::fs::metadata(&path).unwrap().len();
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), 7);
        assert!(s.source_entry(&"u1".into()).unwrap().is_some());
        assert_eq!(s.journal(None).unwrap().len(), 2);
        drop(s);
        assert!(std::fs::metadata(&path).unwrap().len() >= before / 2);
    }

    /// With the heads index built by the first read that wants it: the same contract, every
    /// neighbourhood's context and links from the index as the writes left it.
    #[test]
    fn sqlite_store_keeps_the_contract_with_the_heads_index() {
        testkit::store_contract(|| {
            let mut s = SqliteStore::open_in_memory().unwrap();
            s.set_head_index(HeadIndex::Always);
            Box::new(s)
        });
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
                     BEGIN INSERT INTO touched SELECT 'ref ' || anchor FROM main.source_objects
                         WHERE id = NEW.from_id; END;
                 CREATE TEMP TRIGGER r_del AFTER DELETE ON main.source_refs
                     BEGIN INSERT INTO touched SELECT 'unref ' || anchor FROM main.source_objects
                         WHERE id = OLD.from_id; END;
                 CREATE TEMP TRIGGER ro_ins AFTER INSERT ON main.source_refs_open
                     BEGIN INSERT INTO touched SELECT 'ref ' || anchor FROM main.source_objects
                         WHERE id = NEW.from_id; END;
                 CREATE TEMP TRIGGER ro_del AFTER DELETE ON main.source_refs_open
                     BEGIN INSERT INTO touched SELECT 'unref ' || anchor FROM main.source_objects
                         WHERE id = OLD.from_id; END;",
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
        let legacy: i64 = s
            .conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM source_objects WHERE typeof(attributes) <> 'blob') \
                 + (SELECT COUNT(*) FROM target_objects WHERE typeof(attributes) <> 'blob')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(legacy, 0);
        // The dump shows them in the compact JSON.
        let mut dump = Vec::new();
        s.dump(&mut dump).unwrap();
        let dump = String::from_utf8(dump).unwrap();
        assert!(dump.contains(r#""mail":"ann@x""#), "{dump}");
        assert!(
            dump.contains(r#""members":[{"r":"t2"},{"r":"t3"}]"#),
            "{dump}"
        );
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
        let bulk = BULK_QUERIES.iter().map(|q| in_list_sql(q, 3));
        let pages = PAGE_QUERIES.iter().map(|q| q.to_string());
        for sql in INDEXED_QUERIES
            .iter()
            .map(|q| q.to_string())
            .chain(bulk)
            .chain(pages)
        {
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
    fn a_full_plans_pages_of_rows_are_weighed_by_their_references() {
        let mut s = SqliteStore::open_in_memory().unwrap();
        let g = s.begin_full_import("src").unwrap();
        let user =
            |i: usize| Entry::new(format!("u{i}"), "user").with("cn", format!("u{i}").as_str());
        let mut group = Entry::new("g", "group");
        for i in 0..4 {
            group = group.with("member", Value::anchor_ref(format!("u{i}").as_str()));
        }
        // Rows in this order: two users, the group (weighing five), two users.
        s.import_entries(g, &[user(0), user(1), group, user(2), user(3)])
            .unwrap();
        s.finish_full_import("src", g, None, 0.0).unwrap();
        let mut pages = Vec::new();
        let mut mark = None;
        while let Some((anchors, _, next)) =
            s.full_plan_page(mark.as_ref(), 5, Reach::Anchors).unwrap()
        {
            pages.push(
                anchors
                    .iter()
                    .map(|a| a.as_str().to_owned())
                    .collect::<Vec<_>>()
                    .join(","),
            );
            mark = Some(next);
        }
        assert_eq!(pages, ["u0,u1", "g", "u2,u3"]);
    }

    #[test]
    fn a_full_plan_refuses_its_next_page_once_another_connection_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut s = SqliteStore::open(&path).unwrap();
        let g = s.begin_full_import("src").unwrap();
        let entries: Vec<Entry> = (0..5)
            .map(|i| Entry::new(format!("u{i}"), "user").with("cn", format!("u{i}").as_str()))
            .collect();
        s.import_entries(g, &entries).unwrap();
        s.finish_full_import("src", g, None, 0.0).unwrap();
        let page = |s: &SqliteStore, m: Option<&PageMark>| {
            s.full_plan_page(m, 2, Reach::Anchors)
                .map(|p| p.map(|(anchors, _, next)| (anchors, next)))
        };
        let (_, mark) = page(&s, None).unwrap().unwrap();
        // This connection's own writes do not count.
        s.mark_dirty(&["u0".into()]).unwrap();
        let (_, mark) = page(&s, Some(&mark)).unwrap().unwrap();
        let mut other = SqliteStore::open(&path).unwrap();
        other.mark_dirty(&["u1".into()]).unwrap();
        let err = page(&s, Some(&mark)).unwrap_err();
        assert!(err.to_string().contains("another connection"), "{err}");
        // A plan begun afresh reads the file as it is now: every anchor once.
        let (mut seen, mut mark) = (Vec::new(), None);
        while let Some((anchors, next)) = page(&s, mark.as_ref()).unwrap() {
            seen.extend(anchors);
            mark = Some(next);
        }
        seen.sort();
        let all: Vec<Anchor> = (0..5).map(|i| Anchor::from(format!("u{i}"))).collect();
        assert_eq!(seen, all);
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
            // Fresh statements: their counters start at zero (and every one stays cached).
            s.conn.flush_prepared_statement_cache();
            s.conn.set_prepared_statement_cache_capacity(64);
            let v = s.load_neighbourhood(&["u1".into()]).unwrap();
            assert_eq!(v.mirror.len(), 3);
            // Every cached statement's full-scan and VM-step counters (the bulk reads with
            // the `IN` lists of up to 4 keys this neighbourhood asks).
            let mut total = 0;
            let bulk = BULK_QUERIES
                .iter()
                .flat_map(|q| (1..=4).map(move |n| in_list_sql(q, n)));
            for sql in bulk {
                let stmt = s.conn.prepare_cached(&sql).unwrap();
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
        let k = |a: &str, v: &str, id: &str| (a.to_owned(), v.to_owned(), id.to_owned());
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
    /// A version 5 file, as version 5 wrote it: the schema chain's SQL, rows in its form.
    fn write_v5_file(path: &Path, entries: &[&Entry], targets: &[&TargetObject]) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(SCHEMA_V1).unwrap();
        conn.execute_batch(SCHEMA_V2).unwrap();
        conn.execute_batch(SCHEMA_V4).unwrap();
        conn.execute_batch(SCHEMA_V4_SWAP).unwrap();
        conn.execute_batch(
            "ALTER TABLE journal RENAME TO journal_v4_old;
             CREATE TABLE journal_v4 (id INTEGER PRIMARY KEY, run INTEGER, anchor TEXT, kind TEXT,
                 op TEXT, sent TEXT, state TEXT, target_id TEXT, error TEXT, retryable INTEGER);
             DROP TABLE journal_v4_old;",
        )
        .unwrap();
        // Version 5's SQL renames `journal` itself: run it on a journal of version 4's shape.
        conn.execute_batch(
            "ALTER TABLE journal_v4 RENAME TO journal;
             DROP INDEX IF EXISTS journal_run; DROP INDEX IF EXISTS journal_intended;",
        )
        .unwrap();
        conn.execute_batch(SCHEMA_V5).unwrap();
        conn.execute_batch(
            "DROP TABLE journal_v4;
             CREATE INDEX journal_run ON journal (run);
             CREATE INDEX journal_intended ON journal (state) WHERE state = 'intended';",
        )
        .unwrap();
        for e in entries {
            let (json, hash) = encode_entry(e).unwrap();
            conn.execute(
                "INSERT INTO source_objects (anchor, object_type, dn, dn_norm, attributes) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    e.anchor.as_str(),
                    e.object_type.as_str(),
                    e.dn.as_ref().map(|d| d.as_str()),
                    e.dn.as_ref().map(|d| d.normalized()),
                    json
                ],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO source_state (anchor, content_hash, generation) VALUES (?1, ?2, 4)",
                params![e.anchor.as_str(), hash as i64],
            )
            .unwrap();
            for (attr, t) in entry_references(e) {
                let (to_anchor, to_dn) = match t {
                    RefTarget::Anchor(a) => (Some(a.as_str().to_owned()), None),
                    RefTarget::Dn(d) => (None, Some(d)),
                };
                conn.execute(
                    "INSERT INTO source_refs (from_anchor, attribute, to_anchor, to_dn_norm) \
                     VALUES (?1, ?2, ?3, ?4)",
                    params![e.anchor.as_str(), attr.as_str(), to_anchor, to_dn],
                )
                .unwrap();
            }
        }
        for o in targets {
            conn.execute(
                "INSERT INTO target_objects (id, object_type, attributes) VALUES (?1, ?2, ?3)",
                params![
                    o.id.as_str(),
                    o.object_type.as_str(),
                    encode_attributes(&o.attributes)
                ],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO target_values (attribute, value_key, id) VALUES ('displayname', ?1, ?2)",
                params![
                    serde_json::to_string(&Value::string(o.id.as_str())).unwrap(),
                    o.id.as_str()
                ],
            )
            .unwrap();
        }
        conn.execute_batch(
            "UPDATE meta SET value = 4 WHERE key = 'generation';
             INSERT INTO links VALUES ('u1', 'user', 't1', 'User');
             INSERT INTO links VALUES ('g', 'group', 't2', 'Group');
             INSERT INTO runs (id, profile, started, finished, outcome)
                 VALUES (1, 'full-import', '2026-01-01T00:00:00Z', '2026-01-01T00:01:00Z', 'ok');
             INSERT INTO journal (id, run, anchor, kind, state, target_id, attributes)
                 VALUES (1, 1, 'u1', 'create', 'done', 't1', NULL),
                        (2, 1, 'g', 'create', 'done', 't2', NULL),
                        (3, 1, 'u2', 'update', 'done', 't1', '[\"title\"]'),
                        (4, 1, 'u2', 'create', 'failed', NULL, NULL);
             UPDATE journal SET error = 'refused', retryable = 1 WHERE id = 4;",
        )
        .unwrap();
        let op = create_op("u2", "displayName", "Bob");
        conn.execute(
            "INSERT INTO journal (id, run, anchor, kind, state) VALUES (5, 1, 'u2', 'create', 'intended')",
            [],
        )
        .unwrap();
        for id in [4, 5] {
            conn.execute(
                "INSERT INTO journal_payload (id, op, sent) VALUES (?1, ?2, NULL)",
                params![id, serde_json::to_string(&op).unwrap()],
            )
            .unwrap();
        }
        conn.pragma_update(None, "user_version", 5).unwrap();
    }

    #[test]
    fn a_version_5_file_keeps_every_row_in_the_lean_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v5.db");
        let ann = Entry::new("u1", "user")
            .with_dn(dn("cn=Ann,ou=Staff,dc=x"))
            .with("cn", "Ann")
            .with("mail", "ann@x")
            .with("objectGUID", Value::Bytes(vec![0, 159, 255]))
            .with("uac", Value::Integer(-512))
            .with("enabled", Value::Boolean(true))
            .with(
                "when",
                Value::Timestamp(DateTime::from_timestamp(1_700_000_000, 5).unwrap()),
            );
        let bob = Entry::new("u2", "user")
            .with_dn(dn("cn=Bob,ou=Staff,dc=x"))
            .with("cn", "Bob")
            .with("manager", Value::anchor_ref("u1"));
        let group = Entry::new("g", "group")
            .with_dn(dn("cn=G,dc=x"))
            .with("member", Value::anchor_ref("u1"))
            .with("member", Value::anchor_ref("u2"))
            .with("member", Value::anchor_ref("ghost"))
            .with("member", Value::dn_ref(dn("cn=Nobody,dc=x")));
        let t1 = TargetObject::new("t1", "User")
            .with("displayName", "Ann")
            .with("urn:x:manager", Value::target_ref("t9"));
        let t2 = TargetObject::new("t2", "Group")
            .with("displayName", "G")
            .with("members", Value::target_ref("t1"))
            .with("members", Value::target_ref("t3"));
        write_v5_file(&path, &[&ann, &bob, &group], &[&t1, &t2]);
        let mut s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        // Every object, link and target object, as it was.
        for e in [&ann, &bob, &group] {
            assert_eq!(s.source_entry(&e.anchor).unwrap().as_ref(), Some(e));
        }
        let v = s.load_all().unwrap();
        assert_eq!(v.mirror.len(), 3);
        assert_eq!(v.target.get(&"t1".into()), Some(&t1));
        assert_eq!(v.target.get(&"t2".into()), Some(&t2));
        assert_eq!(v.target.len(), 2);
        assert_eq!(
            v.links.anchor_of(&"t1".into()).map(|a| a.as_str()),
            Some("u1")
        );
        assert_eq!(
            v.links.anchor_of(&"t2".into()).map(|a| a.as_str()),
            Some("g")
        );
        assert_eq!(
            s.link_counts().unwrap(),
            BTreeMap::from([("User".into(), 1), ("Group".into(), 1)])
        );
        assert_eq!(
            s.anchor_by_dn(&dn("CN=ann,OU=staff,DC=x")).unwrap(),
            Some("u1".into())
        );
        // Every reference: by id (mirrored objects), by anchor (not mirrored), by DN (unresolved).
        let db = s.db();
        let refs = |a: &str, d: Option<&str>| {
            let mut r = referrers(&db, &a.into(), d).unwrap();
            r.sort();
            r
        };
        assert_eq!(refs("u1", None), ["g".into(), "u2".into()]);
        assert_eq!(refs("u2", None), ["g".into()]);
        assert_eq!(refs("ghost", None), ["g".into()]);
        assert_eq!(refs("nobody", Some("cn=nobody,dc=x")), ["g".into()]);
        let counts: (i64, i64, i64) = s
            .conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM source_refs), (SELECT COUNT(*) FROM source_refs_open), \
                 (SELECT COUNT(*) FROM target_values)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(counts, (3, 2, 2));
        // Every journal row and payload.
        let journal = s.journal(None).unwrap();
        let rows: Vec<_> = journal
            .iter()
            .map(|r| {
                (
                    r.id.0,
                    r.anchor.as_str().to_owned(),
                    r.kind.clone(),
                    r.state,
                    r.target_id.as_ref().map(|t| t.as_str().to_owned()),
                    r.attributes
                        .iter()
                        .map(|a| a.as_str().to_owned())
                        .collect::<Vec<_>>(),
                    r.error.clone(),
                    r.operation.is_some(),
                )
            })
            .collect();
        let t = |s: &str| Some(s.to_owned());
        assert_eq!(
            rows,
            [
                (
                    1,
                    "u1".into(),
                    "create".into(),
                    JournalState::Done,
                    t("t1"),
                    vec![],
                    None,
                    false
                ),
                (
                    2,
                    "g".into(),
                    "create".into(),
                    JournalState::Done,
                    t("t2"),
                    vec![],
                    None,
                    false
                ),
                (
                    3,
                    "u2".into(),
                    "update".into(),
                    JournalState::Done,
                    t("t1"),
                    vec!["title".into()],
                    None,
                    false
                ),
                (
                    4,
                    "u2".into(),
                    "create".into(),
                    JournalState::Failed,
                    None,
                    vec![],
                    t("refused"),
                    true
                ),
                (
                    5,
                    "u2".into(),
                    "create".into(),
                    JournalState::Intended,
                    None,
                    vec![],
                    None,
                    true
                ),
            ]
        );
        assert_eq!(s.journal_unconfirmed().unwrap().len(), 1);
        assert_eq!(s.runs(10).unwrap().len(), 1);
        // The same export is unchanged (hashes and generations kept); then the objects the
        // group waited for arrive and take its references, and a delete strips them again.
        let g = s.begin_full_import("ad").unwrap();
        assert_eq!(g, 5);
        s.import_entries(g, &[ann.clone(), bob.clone(), group.clone()])
            .unwrap();
        let sum = s.finish_full_import("ad", g, None, 1.0).unwrap();
        assert_eq!(
            (sum.seen, sum.added, sum.changed, sum.deleted),
            (3, 0, 0, 0)
        );
        assert_eq!(s.dirty().unwrap(), Vec::<Anchor>::new());
        let ghost = Entry::new("ghost", "user").with_dn(dn("cn=Ghost,dc=x"));
        let nobody = Entry::new("n", "user").with_dn(dn("cn=Nobody,dc=x"));
        s.apply_changes("ad", &[Change::Add(ghost), Change::Add(nobody)], None)
            .unwrap();
        assert!(s.dirty().unwrap().contains(&"g".into()));
        let stored = s.source_entry(&"g".into()).unwrap().unwrap();
        assert!(stored
            .attributes
            .get("member")
            .unwrap()
            .contains(&Value::anchor_ref("n")));
        let db = s.db();
        assert_eq!(referrers(&db, &"n".into(), None).unwrap(), ["g".into()]);
        assert_eq!(referrers(&db, &"ghost".into(), None).unwrap(), ["g".into()]);
        s.apply_changes(
            "ad",
            &[Change::Delete {
                anchor: "ghost".into(),
                object_type: "user".into(),
            }],
            None,
        )
        .unwrap();
        let stored = s.source_entry(&"g".into()).unwrap().unwrap();
        assert!(!stored
            .attributes
            .get("member")
            .unwrap()
            .contains(&Value::anchor_ref("ghost")));
        let open: i64 = s
            .conn
            .query_row("SELECT COUNT(*) FROM source_refs_open", [], |r| r.get(0))
            .unwrap();
        assert_eq!(open, 0);
    }
    #[test]
    fn a_run_gives_free_pages_back_to_the_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut s = SqliteStore::open(&path).unwrap();
        let many: Vec<Entry> = (0..2000)
            .map(|i| {
                Entry::new(format!("u{i:04}"), "user")
                    .with_dn(dn(&format!("cn=u{i},dc=x")))
                    .with("description", "x".repeat(200).as_str())
            })
            .collect();
        let g = s.begin_full_import("src").unwrap();
        s.import_entries(g, &many).unwrap();
        s.finish_full_import("src", g, None, 0.0).unwrap();
        // All but one object gone: their pages are free until a run ends.
        let g = s.begin_full_import("src").unwrap();
        s.import_entries(g, &many[..1]).unwrap();
        s.finish_full_import("src", g, None, 0.0).unwrap();
        let pragma = |s: &SqliteStore, p: &str| -> i64 {
            s.conn
                .query_row(&format!("PRAGMA {p}"), [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(pragma(&s, "auto_vacuum"), 2, "incremental");
        assert!(pragma(&s, "freelist_count") > 100);
        let run = s.begin_run("full-import", Utc::now()).unwrap();
        s.finish_run(run, Utc::now(), "ok", "{}").unwrap();
        assert_eq!(pragma(&s, "freelist_count"), 0);
        // The log was checkpointed and cut back: the file is what it holds.
        let wal = std::fs::metadata(dir.path().join("state.db-wal"))
            .unwrap()
            .len();
        assert_eq!(wal, 0);
        let pages = pragma(&s, "page_count") * pragma(&s, "page_size");
        assert_eq!(std::fs::metadata(&path).unwrap().len() as i64, pages);
        assert!(pages < 200 * 1024, "{pages}");
    }
    #[test]
    fn value_keys_of_different_kinds_never_collide() {
        let keys: Vec<Option<String>> = [
            Value::string("42"),
            Value::Integer(42),
            Value::string("\u{1}42"),
            Value::string(format!(
                "\u{1}{}",
                serde_json::to_string(&Value::Integer(42)).unwrap()
            )),
            Value::Boolean(true),
            Value::string("true"),
        ]
        .iter()
        .map(value_key)
        .collect();
        let distinct: BTreeSet<&Option<String>> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "{keys:?}");
        assert!(keys.iter().all(Option::is_some));
        // A string is its own key, lower-cased; bytes and references are not indexed.
        assert_eq!(value_key(&Value::string("Ann@X")).as_deref(), Some("ann@x"));
        assert_eq!(value_key(&Value::Bytes(vec![1])), None);
        assert_eq!(value_key(&Value::anchor_ref("a")), None);
    }
}
