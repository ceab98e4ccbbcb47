//! [`LdifSource`]: a directory export in an LDIF content file, with an optional directory of LDIF
//! change files for delta import.
//!
//! It reads files only (the content file and the change files), with plain blocking reads inside
//! the import streams, one record at a time: a large file is never held in memory whole. It never
//! writes.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use futures::StreamExt;
use rustc_hash::{FxBuildHasher, FxHashMap};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use smol_str::SmolStr;

use super::index::DnIndex;
use super::map::{RefForm, Schema};
use super::{LdifBody, LdifError, LdifReader, LdifRecord, LdifValue};
use crate::connector::{
    ConnectorError, ErrorKind, ImportItem, ImportStream, Source, SourceCapabilities, Watermark,
};
use crate::model::{
    guid_from_ad_bytes, Anchor, AttrName, AttributeChange, Attributes, Change, ChangeOp, Dn, Entry,
    ObjectType, Reference, Value, Values,
};

/// What to do with an entry whose `objectClass` values the object type map does not name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unmapped {
    /// Leave it out of the import and count it (see [`LdifSource::skipped`]).
    #[default]
    Skip,
    /// Fail the import, naming the entry and its line.
    Error,
}

/// How an [`LdifSource`] turns LDIF records into entries and changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LdifSourceConfig {
    /// The attribute holding each entry's anchor (default `entryUUID`). It must have exactly one
    /// value in every mapped entry. `objectGUID` values are AD's 16 bytes (as LDIF exports
    /// Base64-encode them) or GUID text and become the canonical GUID
    /// ([`Anchor::from_guid`]); a hyphenated UUID text (`entryUUID`) becomes its canonical
    /// lower-case form; other text is taken as it is and other bytes as their Base64 text.
    pub anchor_attribute: AttrName,
    /// `objectClass` value → object type. Of an entry's classes, the last one listed in the entry
    /// that this map names wins: exports list classes from the most general to the most specific
    /// (`top, person, organizationalPerson, user`). Note that AD computers are `user`s too: map
    /// `computer` to a type of its own to tell them apart. Default:
    /// [`default_object_type_map`](super::default_object_type_map).
    pub object_type_map: BTreeMap<AttrName, ObjectType>,
    /// What to do with entries the map does not cover (default: skip and count).
    pub unmapped: Unmapped,
    /// Attributes whose values are DNs of other objects (options such as `;range=` ignored):
    /// they become [`Value::Reference`]`(`[`Reference::Dn`](crate::model::Reference::Dn)`)`;
    /// a value that is not a DN fails the import. Default:
    /// [`default_reference_attributes`](super::default_reference_attributes).
    pub reference_attributes: Vec<AttrName>,
    /// Attributes whose values are always [`Value::Bytes`], even when they are UTF-8. Default:
    /// [`default_binary_attributes`](super::default_binary_attributes).
    pub binary_attributes: Vec<AttrName>,
    /// A directory of change files (`*.ldif`, holding change records), consumed in file-name
    /// order by delta import. Without it the source supports full import only. Name the files so
    /// that new ones sort after old ones (a sequence number or a UTC timestamp).
    pub changes_dir: Option<PathBuf>,
}

impl Default for LdifSourceConfig {
    fn default() -> Self {
        LdifSourceConfig {
            anchor_attribute: AttrName::new("entryUUID"),
            object_type_map: super::default_object_type_map(),
            unmapped: Unmapped::Skip,
            reference_attributes: super::default_reference_attributes(),
            binary_attributes: super::default_binary_attributes(),
            changes_dir: None,
        }
    }
}

impl LdifSourceConfig {
    fn schema(&self) -> Schema<'_> {
        Schema {
            object_type_map: &self.object_type_map,
            references: &self.reference_attributes,
            binary: &self.binary_attributes,
        }
    }

    /// The model entry of a content or `changetype: add` record: `Ok(None)` when its object
    /// classes are unmapped and [`Unmapped::Skip`] applies. Errors name the DN and line.
    pub fn to_entry(&self, record: &LdifRecord) -> Result<Option<Entry>, LdifError> {
        self.to_entry_cached(record, &mut MapCache::default())
    }

    /// [`LdifSourceConfig::to_entry`], with what the mapping makes of each attribute name and
    /// `objectClass` value remembered in `cache` from one record to the next.
    fn to_entry_cached(
        &self,
        record: &LdifRecord,
        cache: &mut MapCache,
    ) -> Result<Option<Entry>, LdifError> {
        let (LdifBody::Content(values) | LdifBody::Add(values)) = &record.body else {
            return Err(LdifError::new(
                record.line,
                format!("the record for {} is not an entry", record.dn),
            ));
        };
        let dn = &record.dn;
        let schema = self.schema();
        let kinds: SmallVec<[AttrKind; 32]> = values
            .iter()
            .map(|v| cache.kind(&v.attribute, self, &schema))
            .collect();
        let classes = values
            .iter()
            .zip(&kinds)
            .filter(|(_, k)| k.object_class)
            .map(|(v, _)| &v.value);
        let Some(object_type) = cache.object_type(classes.clone(), &schema) else {
            return match self.unmapped {
                Unmapped::Skip => Ok(None),
                Unmapped::Error => {
                    let list: Vec<String> = classes.map(Value::to_text).collect();
                    Err(LdifError::new(
                        record.line,
                        format!(
                            "the entry {dn} has no objectClass that object_type_map maps \
                             (classes: {})",
                            if list.is_empty() {
                                "none".to_owned()
                            } else {
                                list.join(", ")
                            }
                        ),
                    ))
                }
            };
        };
        let mut anchors = values.iter().zip(&kinds).filter(|(_, k)| k.anchor);
        let anchor = match (anchors.next(), anchors.next()) {
            (Some((v, _)), None) => self.anchor(record, v)?,
            _ => {
                let n = kinds.iter().filter(|k| k.anchor).count();
                let attr = &self.anchor_attribute;
                return Err(LdifError::new(
                    record.line,
                    if n == 0 {
                        format!("the entry {dn} has no {attr} (the anchor attribute)")
                    } else {
                        format!("the entry {dn} has {n} values of {attr}; an anchor has one")
                    },
                ));
            }
        };
        let mut entry = Entry::new(anchor, object_type).with_dn(dn.clone());
        // At most one attribute per run of one spelling.
        let runs = 1 + values
            .windows(2)
            .filter(|w| w[0].attribute.as_str() != w[1].attribute.as_str())
            .count();
        entry.attributes = Attributes::with_capacity(runs);
        for (v, k) in values.iter().zip(&kinds) {
            let known = (k.reference && !k.binary)
                .then(|| cache.known_dn(&v.value))
                .flatten();
            let hit = known.is_some();
            let value = match known {
                Some(target) => Value::dn_ref(target),
                None => schema.convert_known(
                    &v.attribute,
                    v.value.clone(),
                    v.line,
                    dn,
                    RefForm::Dn,
                    (k.binary, k.reference),
                )?,
            };
            if let Value::Reference(Reference::Dn(target)) = &value {
                if !hit {
                    cache.remember(target);
                }
            }
            entry.attributes.add(v.attribute.clone(), value);
        }
        Ok(Some(entry))
    }

    /// The anchor of the entry `record` from its one value `v` of the anchor attribute.
    fn anchor(&self, record: &LdifRecord, v: &LdifValue) -> Result<Anchor, LdifError> {
        let attr = &self.anchor_attribute;
        let dn = &record.dn;
        let bad = |what: &str| {
            LdifError::new(
                v.line,
                format!("the entry {dn}: the anchor attribute {attr} {what}"),
            )
        };
        let text_guid = |s: &str| {
            let s = s.trim().trim_start_matches('{').trim_end_matches('}');
            uuid::Uuid::try_parse(s).ok().map(Anchor::from_guid)
        };
        if attr.is("objectGUID") {
            let bytes: &[u8] = match &v.value {
                Value::Bytes(b) => b,
                Value::String(s) => s.as_bytes(),
                _ => &[],
            };
            if let Ok(g) = guid_from_ad_bytes(bytes) {
                return Ok(Anchor::from_guid(g));
            }
            return std::str::from_utf8(bytes)
                .ok()
                .and_then(text_guid)
                .ok_or_else(|| bad("is neither 16 bytes nor GUID text"));
        }
        match &v.value {
            Value::String(s) if s.trim().is_empty() => Err(bad("is empty")),
            Value::String(s) if s.len() == 36 => {
                Ok(text_guid(s).unwrap_or_else(|| Anchor::new(s.as_str())))
            }
            Value::String(s) => Ok(Anchor::new(s.as_str())),
            Value::Bytes(b) if b.is_empty() => Err(bad("is empty")),
            other => Ok(Anchor::new(other.to_text())),
        }
    }
}

/// What the mapping makes of an attribute name.
#[derive(Clone, Copy)]
struct AttrKind {
    object_class: bool,
    anchor: bool,
    binary: bool,
    reference: bool,
}

/// How many names (and `objectClass` values) a [`MapCache`] remembers at most.
const CACHE_CAP: usize = 4096;

/// How many reference DNs a full import remembers (a power of two).
const REFS: usize = 4096;

/// What the mapping made of attribute names and `objectClass` values, by their exact spelling
/// (a spelling always maps the same way): an LDIF file repeats a few names in every record.
///
/// A full import also remembers the last reference DNs it has read, by their text (one per
/// slot of a small table, by a hash of the text): a reference read again soon after (a manager
/// of several entries in a row) shares that [`Dn`] instead of parsing the text again. Two DNs of
/// one text are the same in every respect. The table is bounded: memory does not grow with the
/// directory.
#[derive(Default)]
struct MapCache {
    kinds: FxHashMap<SmolStr, AttrKind>,
    classes: FxHashMap<SmolStr, Option<ObjectType>>,
    refs: Option<Box<[Option<Dn>]>>,
}

/// The slot of the reference text `text` in [`MapCache::refs`].
fn ref_slot(text: &str) -> usize {
    use std::hash::BuildHasher;
    FxBuildHasher.hash_one(text) as usize & (REFS - 1)
}

impl MapCache {
    /// A cache that also remembers reference DNs (for one full import).
    fn with_dns() -> MapCache {
        MapCache {
            refs: Some(vec![None; REFS].into_boxed_slice()),
            ..MapCache::default()
        }
    }

    /// Remembers the reference `dn` by its text.
    fn remember(&mut self, dn: &Dn) {
        if let Some(slot) = self
            .refs
            .as_mut()
            .and_then(|r| r.get_mut(ref_slot(dn.as_str())))
        {
            *slot = Some(dn.clone());
        }
    }

    /// The DN of `value` of a reference attribute, when the same text was read recently.
    fn known_dn(&self, value: &Value) -> Option<Dn> {
        let (Some(refs), Value::String(text)) = (&self.refs, value) else {
            return None;
        };
        let dn = refs.get(ref_slot(text.as_str()))?.as_ref()?;
        (dn.as_str() == text.as_str()).then(|| dn.clone())
    }

    fn kind(
        &mut self,
        name: &AttrName,
        config: &LdifSourceConfig,
        schema: &Schema<'_>,
    ) -> AttrKind {
        if let Some(k) = self.kinds.get(name.as_str()) {
            return *k;
        }
        let k = AttrKind {
            object_class: name.is("objectClass"),
            anchor: *name == config.anchor_attribute,
            binary: schema.is_binary(name),
            reference: schema.is_reference(name),
        };
        if self.kinds.len() < CACHE_CAP {
            self.kinds.insert(SmolStr::new(name.as_str()), k);
        }
        k
    }

    /// [`Schema::object_type`], remembering each class looked up.
    fn object_type<'v>(
        &mut self,
        classes: impl DoubleEndedIterator<Item = &'v Value>,
        schema: &Schema<'_>,
    ) -> Option<ObjectType> {
        classes.rev().filter_map(Value::as_str).find_map(|c| {
            if let Some(t) = self.classes.get(c) {
                return t.clone();
            }
            let t = schema.object_type(std::iter::once(&Value::from(c)));
            if self.classes.len() < CACHE_CAP {
                self.classes.insert(SmolStr::new(c), t.clone());
            }
            t
        })
    }
}

/// A content file's identity: a 64-bit FNV-1a hash of its bytes and its size. It detects a
/// replaced or edited file; it is not a defence against deliberate collisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    hash: u64,
    size: u64,
}

/// Where in the content + change files a watermark (or the index) stands.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    content: Fingerprint,
    /// The last change file consumed; empty before the first.
    change_file: String,
}

const KIND: &str = "ldif";

impl Position {
    fn watermark(&self) -> Watermark {
        Watermark::new(
            KIND,
            format!(
                "ldif1;{:016x};{};{}",
                self.content.hash, self.content.size, self.change_file
            )
            .into_bytes(),
        )
    }

    fn parse(w: &Watermark) -> Option<Position> {
        if w.kind != KIND {
            return None;
        }
        let mut parts = w.as_text()?.splitn(4, ';');
        if parts.next()? != "ldif1" {
            return None;
        }
        let hash = u64::from_str_radix(parts.next()?, 16).ok()?;
        let size = parts.next()?.parse().ok()?;
        let change_file = parts.next()?.to_owned();
        Some(Position {
            content: Fingerprint { hash, size },
            change_file,
        })
    }
}

/// Hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hash: u64,
    size: u64,
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            hash: 0xcbf2_9ce4_8422_2325,
            size: 0,
        }
    }

    fn fingerprint(&self) -> Fingerprint {
        Fingerprint {
            hash: self.hash,
            size: self.size,
        }
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        // In a local, the hash stays in a register (not stored and reloaded at every byte).
        let mut hash = self.hash;
        for b in buf.get(..n).unwrap_or(&[]) {
            hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.hash = hash;
        self.size += n as u64;
        Ok(n)
    }
}

#[derive(Default)]
struct State {
    /// DN → anchor and type, as of `at` (kept only with a changes directory: without one it
    /// serves no delta import).
    index: DnIndex,
    /// The position `index` reflects; `None` when it reflects none (never built, or a delta
    /// stream stopped inside a file).
    at: Option<Position>,
    skipped: usize,
}

/// A source reading an LDIF content file (full import) and, optionally, a directory of LDIF
/// change files (delta import).
///
/// **Full import** streams the content records of the file as entries (see
/// [`LdifSourceConfig`] for the mapping), then a checkpoint whose watermark (kind `"ldif"`) is
/// the file's content hash and size. A file holding change records, or a malformed one, yields
/// an error naming the file and line, and nothing after it. The file is read and mapped on a
/// thread of its own, a few batches ahead of the stream: the consumer's work on one batch
/// overlaps the reading of the next, and a dropped stream stops the thread.
///
/// **Delta import** reads the change files of [`LdifSourceConfig::changes_dir`] that sort after
/// the watermark's last file, in file-name order, yielding a checkpoint after each file (its
/// watermark names that file). A watermark whose content hash differs from the content file's,
/// or that names a change file that no longer exists, is [`ErrorKind::InvalidWatermark`].
/// `add` records become [`Change::Add`], `modify` [`Change::Modify`], `modrdn`/`moddn`
/// [`Change::Move`] (with a [`Change::Modify`] of the naming attribute, and a `Move` for every
/// mapped entry below a renamed one), `delete` [`Change::Delete`].
///
/// LDIF change records name objects by DN only, so the source keeps a **DN → anchor index**, in
/// memory only: built by a full import and kept up to date by the change records it streams. It
/// is compact (about 60 bytes and the DN's text per entry: some 150 MB for a million entries)
/// and kept only with a [`changes_dir`](LdifSourceConfig::changes_dir); without one, a full
/// import still uses it to refuse a DN read twice, then lets it go.
/// When a delta import starts from a watermark the index does not reflect (after a restart, or
/// when an earlier stream was not consumed to its end), the index is rebuilt by reading the
/// content file and replaying the change files up to the watermark's. A change naming a DN the
/// index does not know is an error naming the DN, the file and the line; changes to entries the
/// mapping skipped are skipped as well.
pub struct LdifSource {
    name: String,
    path: PathBuf,
    config: LdifSourceConfig,
    state: Mutex<State>,
}

fn io_error(kind: ErrorKind, what: &str, path: &Path, e: std::io::Error) -> ConnectorError {
    ConnectorError::new(kind, format!("{what} {}: {e}", path.display())).with_source(e)
}

fn ldif_error(path: &Path, e: LdifError) -> ConnectorError {
    ConnectorError::new(ErrorKind::Protocol, format!("{}: {e}", path.display())).with_source(e)
}

/// Reads the content file record by record, building the DN index. It owns what it needs, so
/// that a full import can run it on a thread of its own.
struct ContentScan {
    config: LdifSourceConfig,
    path: PathBuf,
    reader: LdifReader<BufReader<Hashing<File>>>,
    index: DnIndex,
    skipped: usize,
    cache: MapCache,
}

impl ContentScan {
    fn open(config: &LdifSourceConfig, path: &Path) -> Result<Self, ConnectorError> {
        if config.anchor_attribute.as_str().is_empty() {
            return Err(ConnectorError::new(
                ErrorKind::Config,
                "the LDIF source's anchor_attribute is empty",
            ));
        }
        let file = File::open(path).map_err(|e| {
            io_error(
                ErrorKind::Config,
                "cannot open the LDIF content file",
                path,
                e,
            )
        })?;
        Ok(ContentScan {
            config: config.clone(),
            path: path.to_path_buf(),
            reader: LdifReader::new(BufReader::new(Hashing::new(file))),
            index: DnIndex::default(),
            skipped: 0,
            cache: MapCache::with_dns(),
        })
    }

    /// The next mapped entry; `None` at the end of the file.
    fn next_entry(&mut self) -> Result<Option<Entry>, ConnectorError> {
        loop {
            let Some(record) = self.reader.next() else {
                return Ok(None);
            };
            let record = record.map_err(|e| ldif_error(&self.path, e))?;
            if record.is_change() {
                return Err(ldif_error(
                    &self.path,
                    LdifError::new(
                        record.line,
                        "the content file holds change records; put them in changes_dir",
                    ),
                ));
            }
            if self.index.contains(&record.dn) {
                return Err(ldif_error(
                    &self.path,
                    LdifError::new(record.line, format!("a second entry {}", record.dn)),
                ));
            }
            match self
                .config
                .to_entry_cached(&record, &mut self.cache)
                .map_err(|e| ldif_error(&self.path, e))?
            {
                Some(entry) => {
                    self.index
                        .insert_new(&record.dn, Some((&entry.anchor, &entry.object_type)));
                    return Ok(Some(entry));
                }
                None => {
                    self.index.insert_new(&record.dn, None);
                    self.skipped += 1;
                }
            }
        }
    }

    fn fingerprint(&self) -> Fingerprint {
        self.reader.get_ref().get_ref().fingerprint()
    }
}

/// Entries a full import hands over at a time, at most.
const SCAN_BATCH: usize = 256;

/// Attribute values a full import hands over at a time, at most (unless one entry holds more):
/// a batch of large groups is as small as a batch of users.
const SCAN_BATCH_VALUES: usize = 8192;

/// Batches a full import's reading thread may be ahead of the stream.
const SCAN_QUEUE: usize = 2;

/// What the thread of a full import hands to its stream.
enum Scanned {
    Entries(Vec<Entry>),
    Failed(ConnectorError),
    /// The end of the file: the index built and the file's fingerprint.
    Done {
        index: DnIndex,
        skipped: usize,
        fingerprint: Fingerprint,
    },
}

/// Runs `scan` to the end of the file (or the first error), sending its entries in batches; stops
/// early when the stream is dropped.
fn scan_in_background(mut scan: ContentScan, tx: &tokio::sync::mpsc::Sender<Scanned>) {
    loop {
        let mut batch = Vec::with_capacity(SCAN_BATCH);
        let mut values = 0;
        let end = loop {
            match scan.next_entry() {
                Ok(Some(entry)) => {
                    values += entry.attributes.iter().map(|(_, v)| v.len()).sum::<usize>();
                    batch.push(entry);
                    if batch.len() == SCAN_BATCH || values >= SCAN_BATCH_VALUES {
                        break None;
                    }
                }
                Ok(None) => break Some(Ok(())),
                Err(e) => break Some(Err(e)),
            }
        };
        if !batch.is_empty() && tx.blocking_send(Scanned::Entries(batch)).is_err() {
            return;
        }
        let last = match end {
            None => continue,
            Some(Ok(())) => Scanned::Done {
                fingerprint: scan.fingerprint(),
                index: scan.index,
                skipped: scan.skipped,
            },
            Some(Err(e)) => Scanned::Failed(e),
        };
        // A dropped stream wants nothing more.
        let _ = tx.blocking_send(last);
        return;
    }
}

impl LdifSource {
    /// A source reading the content file at `path`.
    pub fn new(path: impl Into<PathBuf>, config: LdifSourceConfig) -> LdifSource {
        LdifSource {
            name: "ldif".to_owned(),
            path: path.into(),
            config,
            state: Mutex::new(State::default()),
        }
    }

    /// Sets the name used in logs and errors (default `"ldif"`).
    pub fn with_name(mut self, name: impl Into<String>) -> LdifSource {
        self.name = name.into();
        self
    }

    /// The configuration.
    pub fn config(&self) -> &LdifSourceConfig {
        &self.config
    }

    /// How many entries the last completed full import skipped as unmapped.
    pub fn skipped(&self) -> usize {
        self.lock().skipped
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn content_fingerprint(&self) -> Result<Fingerprint, ConnectorError> {
        let file = File::open(&self.path).map_err(|e| {
            io_error(
                ErrorKind::Config,
                "cannot open the LDIF content file",
                &self.path,
                e,
            )
        })?;
        let mut h = Hashing::new(file);
        std::io::copy(&mut h, &mut std::io::sink())
            .map_err(|e| io_error(ErrorKind::Other, "cannot read", &self.path, e))?;
        Ok(h.fingerprint())
    }

    /// The `*.ldif` files of the changes directory (UTF-8 names only), sorted by name.
    fn change_files(&self, dir: &Path) -> Result<Vec<(String, PathBuf)>, ConnectorError> {
        let list = std::fs::read_dir(dir).map_err(|e| {
            io_error(
                ErrorKind::Config,
                "cannot list the LDIF changes directory",
                dir,
                e,
            )
        })?;
        let mut out = Vec::new();
        for entry in list {
            let entry = entry.map_err(|e| io_error(ErrorKind::Other, "cannot list", dir, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let path = entry.path();
            if name.to_ascii_lowercase().ends_with(".ldif") && path.is_file() {
                out.push((name, path));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Makes the index reflect `at`: reads the content file (checking its fingerprint) and
    /// replays the change files up to `at.change_file`.
    fn rebuild_index(
        &self,
        at: &Position,
        files: &[(String, PathBuf)],
    ) -> Result<(), ConnectorError> {
        let mut scan = ContentScan::open(&self.config, &self.path)?;
        while scan.next_entry()?.is_some() {}
        if scan.fingerprint() != at.content {
            return Err(changed_content(&self.path));
        }
        let mut index = scan.index;
        let mut skipped = 0;
        for (name, path) in files.iter().take_while(|(n, _)| *n <= at.change_file) {
            let file =
                File::open(path).map_err(|e| io_error(ErrorKind::Other, "cannot open", path, e))?;
            for record in LdifReader::new(BufReader::new(file)) {
                let record = record.map_err(|e| ldif_error(path, e))?;
                apply_change(&self.config, &mut index, &record, name, &mut skipped)
                    .map_err(|e| ldif_error(path, e))?;
            }
        }
        let mut st = self.lock();
        st.index = index;
        st.at = Some(at.clone());
        Ok(())
    }
}

fn changed_content(path: &Path) -> ConnectorError {
    ConnectorError::new(
        ErrorKind::InvalidWatermark,
        format!(
            "the content file {} changed since the watermark was taken; a full import is needed",
            path.display()
        ),
    )
}

/// Applies one change record to the DN index and returns the changes it means for mapped
/// entries (none for entries the mapping skips).
fn apply_change(
    config: &LdifSourceConfig,
    index: &mut DnIndex,
    record: &LdifRecord,
    file: &str,
    skipped: &mut usize,
) -> Result<Vec<Change>, LdifError> {
    let dn = &record.dn;
    let unknown = || {
        LdifError::new(
            record.line,
            format!(
                "{dn} is not known to the source (it is not in the last full import nor added by \
                 an earlier change); change file {file}"
            ),
        )
    };
    match &record.body {
        LdifBody::Content(_) => Err(LdifError::new(
            record.line,
            format!("change file {file} holds content records; change files hold change records"),
        )),
        LdifBody::Add(_) => {
            if index.contains(dn) {
                return Err(LdifError::new(
                    record.line,
                    format!("an add of {dn}, which already exists"),
                ));
            }
            match config.to_entry(record)? {
                Some(entry) => {
                    // Another live entry with this anchor: two objects with one anchor (the
                    // later would silently replace the earlier in the mirror). A scan, as a
                    // rename's is: change files are small beside the directory.
                    if let Some(other) = index.holder_of(&entry.anchor) {
                        return Err(LdifError::new(
                            record.line,
                            format!(
                                "an add of {dn} with the anchor {}, which {other} already has \
                                 (the anchor attribute {} must be unique); change file {file}",
                                entry.anchor, config.anchor_attribute
                            ),
                        ));
                    }
                    index.insert_new(dn, Some((&entry.anchor, &entry.object_type)));
                    Ok(vec![Change::Add(entry)])
                }
                None => {
                    index.insert_new(dn, None);
                    *skipped += 1;
                    Ok(Vec::new())
                }
            }
        }
        LdifBody::Delete => match index.remove(dn) {
            None => Err(unknown()),
            Some(None) => Ok(Vec::new()),
            Some(Some((anchor, object_type))) => Ok(vec![Change::Delete {
                anchor,
                object_type,
            }]),
        },
        LdifBody::Modify(mods) => {
            let Some((anchor, object_type)) = index.get(dn).ok_or_else(unknown)? else {
                return Ok(Vec::new());
            };
            let schema = config.schema();
            let mut changes = Vec::with_capacity(mods.len());
            for m in mods {
                let values = m
                    .values
                    .iter()
                    .map(|v| schema.convert(v, dn, RefForm::Dn))
                    .collect::<Result<Values, _>>()?;
                changes.push(match m.op {
                    ChangeOp::Add => AttributeChange::add(m.attribute.clone(), values),
                    ChangeOp::Remove => AttributeChange::remove(m.attribute.clone(), values),
                    ChangeOp::Replace => AttributeChange::replace(m.attribute.clone(), values),
                });
            }
            Ok(vec![Change::Modify {
                anchor,
                object_type,
                changes,
            }])
        }
        LdifBody::ModDn(m) => {
            let known = index.get(dn).ok_or_else(unknown)?;
            let new_dn = m
                .new_dn(dn)
                .ok_or_else(|| LdifError::new(record.line, "the root DN cannot be renamed"))?;
            if new_dn != *dn && index.contains(&new_dn) {
                return Err(LdifError::new(
                    record.line,
                    format!("a rename of {dn} to {new_dn}, which already exists"),
                ));
            }
            let mut out = Vec::new();
            if let Some((anchor, object_type)) = &known {
                out.push(Change::Move {
                    anchor: anchor.clone(),
                    object_type: object_type.clone(),
                    new_dn: new_dn.clone(),
                });
                let naming = naming_changes(config, dn, &new_dn, m.delete_old_rdn, record.line)?;
                if !naming.is_empty() {
                    out.push(Change::Modify {
                        anchor: anchor.clone(),
                        object_type: object_type.clone(),
                        changes: naming,
                    });
                }
            }
            // Everything below the entry moves with it.
            let mut below = index.descendants(dn);
            below.sort();
            index.remove(dn);
            index.insert(&new_dn, &known);
            for old in below {
                let keep = old.len() - dn.len();
                let moved =
                    Dn::from_rdns(old.rdns().iter().take(keep).chain(new_dn.rdns()).cloned());
                let entry = index.remove(&old).flatten();
                if let Some((anchor, object_type)) = &entry {
                    out.push(Change::Move {
                        anchor: anchor.clone(),
                        object_type: object_type.clone(),
                        new_dn: moved.clone(),
                    });
                }
                index.insert(&moved, &entry);
            }
            Ok(out)
        }
    }
}

/// The attribute changes a rename makes to the naming attributes (as LDAP applies them): the
/// old RDN values removed when `delete_old` (and not kept by the new RDN), the new ones added.
fn naming_changes(
    config: &LdifSourceConfig,
    old: &Dn,
    new: &Dn,
    delete_old: bool,
    line: usize,
) -> Result<Vec<AttributeChange>, LdifError> {
    let (Some(old_rdn), Some(new_rdn)) = (old.rdn(), new.rdn()) else {
        return Ok(Vec::new());
    };
    let schema = config.schema();
    let mut out = Vec::new();
    let value = |attr: &str, v: &str| {
        schema.convert_value(
            &AttrName::new(attr),
            Value::string(v),
            line,
            new,
            RefForm::Dn,
        )
    };
    if delete_old {
        for a in old_rdn.avas() {
            let kept = new_rdn
                .avas()
                .iter()
                .any(|n| n.attr().eq_ignore_ascii_case(a.attr()) && n.value() == a.value());
            if !kept {
                out.push(AttributeChange::remove(
                    a.attr(),
                    Values::one(value(a.attr(), a.value())?),
                ));
            }
        }
    }
    for a in new_rdn.avas() {
        out.push(AttributeChange::add(
            a.attr(),
            Values::one(value(a.attr(), a.value())?),
        ));
    }
    Ok(out)
}

#[async_trait]
impl Source for LdifSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities {
            delta: self.config.changes_dir.is_some(),
            partial_changes: true,
        }
    }

    async fn full_import(&self) -> Result<ImportStream<'_, Entry>, ConnectorError> {
        let scan = ContentScan::open(&self.config, &self.path)?;
        let (tx, rx) = tokio::sync::mpsc::channel(SCAN_QUEUE);
        std::thread::Builder::new()
            .name("dirsync-ldif-scan".into())
            .spawn(move || scan_in_background(scan, &tx))
            .map_err(|e| {
                ConnectorError::new(
                    ErrorKind::Other,
                    format!(
                        "cannot start the thread reading {}: {e}",
                        self.path.display()
                    ),
                )
                .with_source(e)
            })?;
        let source = self;
        let batches = futures::stream::unfold(Some(rx), move |rx| async move {
            let mut rx = rx?;
            let items: Vec<Result<ImportItem<Entry>, ConnectorError>> = match rx.recv().await {
                Some(Scanned::Entries(entries)) => {
                    let items = entries.into_iter().map(|e| Ok(ImportItem::Item(e)));
                    return Some((items.collect(), Some(rx)));
                }
                Some(Scanned::Failed(e)) => vec![Err(e)],
                Some(Scanned::Done {
                    index,
                    skipped,
                    fingerprint,
                }) => {
                    let at = Position {
                        content: fingerprint,
                        change_file: String::new(),
                    };
                    let watermark = at.watermark();
                    let mut st = source.lock();
                    // Without a changes directory there is no delta import to serve.
                    st.index = match source.config.changes_dir {
                        Some(_) => index,
                        None => DnIndex::default(),
                    };
                    st.skipped = skipped;
                    st.at = Some(at);
                    vec![Ok(ImportItem::Checkpoint(watermark))]
                }
                None => vec![Err(ConnectorError::new(
                    ErrorKind::Other,
                    format!(
                        "the thread reading {} stopped before the end of the file",
                        source.path.display()
                    ),
                ))],
            };
            Some((items, None))
        });
        Ok(batches.flat_map(futures::stream::iter).boxed())
    }

    async fn delta_import(
        &self,
        since: &Watermark,
    ) -> Result<ImportStream<'_, Change>, ConnectorError> {
        let Some(dir) = &self.config.changes_dir else {
            return Err(ConnectorError::new(
                ErrorKind::Unsupported,
                format!(
                    "source {}: delta import needs changes_dir in the LDIF source configuration",
                    self.name
                ),
            ));
        };
        let Some(at) = Position::parse(since) else {
            return Err(ConnectorError::new(
                ErrorKind::InvalidWatermark,
                format!("{since:?} is not a watermark of an LDIF source"),
            ));
        };
        let files = self.change_files(dir)?;
        if !at.change_file.is_empty() && !files.iter().any(|(n, _)| *n == at.change_file) {
            return Err(ConnectorError::new(
                ErrorKind::InvalidWatermark,
                format!(
                    "the change file {} named by the watermark no longer exists in {}",
                    at.change_file,
                    dir.display()
                ),
            ));
        }
        let current = self.lock().at.as_ref() == Some(&at);
        if current {
            if self.content_fingerprint()? != at.content {
                return Err(changed_content(&self.path));
            }
        } else {
            self.rebuild_index(&at, &files)?;
        }
        let pending: VecDeque<(String, PathBuf)> = files
            .into_iter()
            .filter(|(n, _)| *n > at.change_file)
            .collect();
        let mut delta = DeltaImport {
            source: self,
            content: at.content,
            final_checkpoint: pending.is_empty().then(|| at.watermark()),
            pending,
            current: None,
            queue: VecDeque::new(),
            done: false,
        };
        Ok(futures::stream::iter(std::iter::from_fn(move || delta.next_item())).boxed())
    }
}

/// The iterator behind a delta import stream.
struct DeltaImport<'s> {
    source: &'s LdifSource,
    content: Fingerprint,
    /// The checkpoint to yield when there are no change files to read.
    final_checkpoint: Option<Watermark>,
    pending: VecDeque<(String, PathBuf)>,
    current: Option<(String, PathBuf, LdifReader<BufReader<File>>)>,
    queue: VecDeque<Change>,
    done: bool,
}

impl DeltaImport<'_> {
    fn fail(&mut self, e: ConnectorError) -> Option<Result<ImportItem<Change>, ConnectorError>> {
        self.done = true;
        self.queue.clear();
        Some(Err(e))
    }

    fn next_item(&mut self) -> Option<Result<ImportItem<Change>, ConnectorError>> {
        loop {
            if let Some(c) = self.queue.pop_front() {
                return Some(Ok(ImportItem::Item(c)));
            }
            if self.done {
                return None;
            }
            let Some((name, path, reader)) = &mut self.current else {
                let Some((name, path)) = self.pending.pop_front() else {
                    self.done = true;
                    return self
                        .final_checkpoint
                        .take()
                        .map(|w| Ok(ImportItem::Checkpoint(w)));
                };
                match File::open(&path) {
                    Ok(f) => {
                        // The index leaves every known position while a file is half-read.
                        self.source.lock().at = None;
                        self.current = Some((name, path, LdifReader::new(BufReader::new(f))));
                        continue;
                    }
                    Err(e) => {
                        return self.fail(io_error(ErrorKind::Other, "cannot open", &path, e))
                    }
                }
            };
            match reader.next() {
                Some(Ok(record)) => {
                    let mut st = self.source.lock();
                    let mut skipped = 0;
                    let result = apply_change(
                        &self.source.config,
                        &mut st.index,
                        &record,
                        name,
                        &mut skipped,
                    );
                    drop(st);
                    match result {
                        Ok(changes) => self.queue.extend(changes),
                        Err(e) => {
                            let e = ldif_error(path, e);
                            return self.fail(e);
                        }
                    }
                }
                Some(Err(e)) => {
                    let e = ldif_error(path, e);
                    return self.fail(e);
                }
                None => {
                    let at = Position {
                        content: self.content,
                        change_file: std::mem::take(name),
                    };
                    self.current = None;
                    let watermark = at.watermark();
                    self.source.lock().at = Some(at);
                    return Some(Ok(ImportItem::Checkpoint(watermark)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{values, Reference};
    use base64::Engine as _;

    const CONTENT: &str = "version: 1

dn: dc=example,dc=com
objectClass: top
objectClass: domain
dc: example

dn: ou=People,dc=example,dc=com
objectClass: organizationalUnit
ou: People

dn: cn=Ada Lovelace,ou=People,dc=example,dc=com
objectClass: top
objectClass: person
objectClass: inetOrgPerson
cn: Ada Lovelace
sn: Lovelace
entryUUID: 11111111-1111-1111-1111-11111111111A
manager: cn=Charles Babbage,ou=People,dc=example,dc=com

dn: cn=Charles Babbage,ou=People,dc=example,dc=com
objectClass: inetOrgPerson
cn: Charles Babbage
sn: Babbage
entryUUID: 22222222-2222-2222-2222-222222222222

dn: cn=Engineers,dc=example,dc=com
objectClass: groupOfNames
cn: Engineers
entryUUID: 33333333-3333-3333-3333-333333333333
member: cn=Ada Lovelace,ou=People,dc=example,dc=com
member: cn=Charles Babbage,ou=People,dc=example,dc=com
";

    const ADA: &str = "11111111-1111-1111-1111-11111111111a";
    const CHARLES: &str = "22222222-2222-2222-2222-222222222222";
    const ENGINEERS: &str = "33333333-3333-3333-3333-333333333333";

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new(content: &str) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("directory.ldif"), content).unwrap();
            std::fs::create_dir(dir.path().join("changes")).unwrap();
            Fixture { dir }
        }
        fn content(&self) -> PathBuf {
            self.dir.path().join("directory.ldif")
        }
        fn change(&self, name: &str, text: &str) {
            std::fs::write(self.dir.path().join("changes").join(name), text).unwrap();
        }
        fn source(&self) -> LdifSource {
            LdifSource::new(
                self.content(),
                LdifSourceConfig {
                    changes_dir: Some(self.dir.path().join("changes")),
                    ..LdifSourceConfig::default()
                },
            )
        }
    }

    async fn full(source: &LdifSource) -> Vec<Result<ImportItem<Entry>, ConnectorError>> {
        source.full_import().await.unwrap().collect().await
    }

    async fn delta(
        source: &LdifSource,
        since: &Watermark,
    ) -> Result<Vec<Result<ImportItem<Change>, ConnectorError>>, ConnectorError> {
        Ok(source.delta_import(since).await?.collect().await)
    }

    fn entries(items: &[Result<ImportItem<Entry>, ConnectorError>]) -> Vec<&Entry> {
        items
            .iter()
            .filter_map(|i| match i {
                Ok(ImportItem::Item(e)) => Some(e),
                _ => None,
            })
            .collect()
    }

    fn last_watermark<T>(items: &[Result<ImportItem<T>, ConnectorError>]) -> Watermark {
        match items.last() {
            Some(Ok(ImportItem::Checkpoint(w))) => w.clone(),
            _ => panic!("the stream does not end with a checkpoint"),
        }
    }

    fn dn(s: &str) -> Dn {
        Dn::parse(s).unwrap()
    }

    fn ok_changes(items: &[Result<ImportItem<Change>, ConnectorError>]) -> Vec<Change> {
        items
            .iter()
            .filter_map(|i| match i {
                Ok(ImportItem::Item(c)) => Some(c.clone()),
                Ok(ImportItem::Checkpoint(_) | ImportItem::Present(_)) => None,
                Err(e) => panic!("{e}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn full_import_maps_entries_and_ends_with_a_content_checkpoint() {
        let f = Fixture::new(CONTENT);
        let source = f.source();
        assert!(source.capabilities().delta);
        let items = full(&source).await;
        let es = entries(&items);
        assert_eq!(es.len(), 3);
        assert_eq!(source.skipped(), 2, "the domain and the ou are unmapped");
        let ada = es[0];
        assert_eq!(
            ada.anchor.as_str(),
            ADA,
            "entryUUID in canonical lower case"
        );
        assert_eq!(ada.object_type, ObjectType::new("user"));
        assert_eq!(
            ada.dn,
            Some(dn("cn=Ada Lovelace,ou=People,dc=example,dc=com"))
        );
        assert_eq!(
            ada.attributes.first("manager"),
            Some(&Value::dn_ref(dn(
                "cn=Charles Babbage,ou=People,dc=example,dc=com"
            )))
        );
        let group = es[2];
        assert_eq!(group.object_type, ObjectType::new("group"));
        assert_eq!(group.anchor.as_str(), ENGINEERS);
        assert!(group
            .attributes
            .get("member")
            .unwrap()
            .iter()
            .all(|v| matches!(v, Value::Reference(Reference::Dn(_)))));
        let w = last_watermark(&items);
        assert_eq!(w.kind, "ldif");
        let text = w.as_text().unwrap().to_owned();
        assert!(text.starts_with("ldif1;"), "{text}");
        assert!(text.ends_with(&format!(";{};", CONTENT.len())), "{text}");
        // The same file gives the same watermark.
        assert_eq!(last_watermark(&full(&f.source()).await), w);
    }

    /// References keep their own spelling: a DN read before shares that entry's `Dn` only when
    /// the text is the same, and every reference matches what the mapping alone makes of it.
    #[tokio::test]
    async fn references_keep_their_text_and_match_the_mapping() {
        let text = "dn: CN=Ada,DC=x\nobjectClass: inetOrgPerson\nentryUUID: a\n\n\
                    dn: cn=Bob,dc=x\nobjectClass: inetOrgPerson\nentryUUID: b\nmanager: cn=ada,dc=x\n\n\
                    dn: cn=g,dc=x\nobjectClass: groupOfNames\nentryUUID: g\n\
                    member: CN=Ada,DC=x\nmember: cn=ada, dc=x\nmember: cn=Bob,dc=x\n\
                    member: cn=Carl,dc=x\nmember: cn=Carl,dc=x\nmanager: cn=Bob,dc=x\n";
        let f = Fixture::new(text);
        let source = f.source();
        let items = full(&source).await;
        let es = entries(&items);
        assert_eq!(es.len(), 3);
        let texts = |e: &Entry, name: &str| -> Vec<String> {
            e.attributes
                .get(name)
                .unwrap()
                .iter()
                .map(|v| match v {
                    Value::Reference(Reference::Dn(d)) => d.as_str().to_owned(),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(texts(es[1], "manager"), ["cn=ada,dc=x"]);
        assert_eq!(
            texts(es[2], "member"),
            [
                "CN=Ada,DC=x",
                "cn=ada, dc=x",
                "cn=Bob,dc=x",
                "cn=Carl,dc=x",
                "cn=Carl,dc=x"
            ]
        );
        // The same entries as the record-by-record mapping makes.
        for (record, entry) in crate::connector::ldif::parse_str(text)
            .unwrap()
            .iter()
            .zip(&es)
        {
            let mapped = source.config().to_entry(record).unwrap().unwrap();
            assert_eq!(format!("{mapped:?}"), format!("{entry:?}"));
            assert_eq!(
                serde_json::to_string(&mapped).unwrap(),
                serde_json::to_string(entry).unwrap()
            );
        }
    }

    #[tokio::test]
    async fn object_guid_anchors_decode_ad_bytes() {
        let guid = uuid::Uuid::parse_str("12345678-1234-5678-1234-56789abcdef0").unwrap();
        let b64 =
            base64::engine::general_purpose::STANDARD.encode(crate::model::guid_to_ad_bytes(&guid));
        let text = format!(
            "dn: CN=Ada,OU=Staff,DC=corp\nobjectClass: top\nobjectClass: person\n\
             objectClass: organizationalPerson\nobjectClass: user\nobjectGUID:: {b64}\n\
             objectSid:: AQUAAAAAAAUVAAAA\n\n\
             dn: CN=Text,OU=Staff,DC=corp\nobjectClass: user\n\
             objectGUID: {{12345678-1234-5678-1234-56789ABCDEF1}}\n"
        );
        let f = Fixture::new(&text);
        let source = LdifSource::new(
            f.content(),
            LdifSourceConfig {
                anchor_attribute: "objectGUID".into(),
                ..LdifSourceConfig::default()
            },
        );
        assert!(!source.capabilities().delta);
        let items = full(&source).await;
        let es = entries(&items);
        assert_eq!(
            es[0].anchor.as_str(),
            "12345678-1234-5678-1234-56789abcdef0"
        );
        assert!(
            matches!(es[0].attributes.first("objectGUID"), Some(Value::Bytes(b)) if b.len() == 16)
        );
        assert!(matches!(
            es[0].attributes.first("objectSid"),
            Some(Value::Bytes(_))
        ));
        assert_eq!(
            es[1].anchor.as_str(),
            "12345678-1234-5678-1234-56789abcdef1"
        );
        let e = source
            .delta_import(&last_watermark(&items))
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
    }

    #[tokio::test]
    async fn errors_name_the_file_and_line_and_end_the_stream() {
        let cases: &[(&str, &str)] = &[
            // Missing anchor: names the DN and the record's line.
            (
                "dn: cn=a,dc=x\nobjectClass: inetOrgPerson\ncn: a\nentryUUID: 1\n\n\
                 dn: cn=b,dc=x\nobjectClass: inetOrgPerson\ncn: b\n\n\
                 dn: cn=c,dc=x\nobjectClass: inetOrgPerson\nentryUUID: 3\n",
                "line 6: the entry cn=b,dc=x has no entryUUID",
            ),
            // Malformed LDIF.
            (
                "dn: cn=a,dc=x\nobjectClass: inetOrgPerson\nentryUUID: 1\n\ndn: cn=b,dc=x\nbroken line\n",
                "line 6: expected `attribute: value`",
            ),
            // A reference that is not a DN: the line of the value.
            (
                "dn: cn=a,dc=x\nobjectClass: inetOrgPerson\nentryUUID: 1\nmanager: nobody\n",
                "line 4: attribute manager of cn=a,dc=x: the reference is not a DN",
            ),
            // Two anchor values.
            (
                "dn: cn=a,dc=x\nobjectClass: inetOrgPerson\nentryUUID: 1\nentryUUID: 2\n",
                "line 1: the entry cn=a,dc=x has 2 values of entryUUID",
            ),
            // Change records in the content file.
            ("dn: cn=a,dc=x\nchangetype: delete\n", "line 1: the content file holds change records"),
            // The same DN twice.
            (
                "dn: cn=a,dc=x\nobjectClass: inetOrgPerson\nentryUUID: 1\n\n\
                 dn: CN=A,DC=X\nobjectClass: inetOrgPerson\nentryUUID: 2\n",
                "line 5: a second entry CN=A,DC=X",
            ),
        ];
        for (text, needle) in cases {
            let f = Fixture::new(text);
            let items = full(&f.source()).await;
            let Some(Err(e)) = items.last() else {
                panic!("{text:?}: no error at the end: {items:?}")
            };
            assert_eq!(e.kind(), ErrorKind::Protocol);
            assert!(e.message().contains("directory.ldif: "), "{e}");
            assert!(e.message().contains(needle), "{needle:?} not in {e}");
            assert_eq!(items.iter().filter(|i| i.is_err()).count(), 1);
            assert!(!items
                .iter()
                .any(|i| matches!(i, Ok(ImportItem::Checkpoint(_)))));
        }
    }

    #[tokio::test]
    async fn unmapped_entries_can_be_errors() {
        let f = Fixture::new(CONTENT);
        let source = LdifSource::new(
            f.content(),
            LdifSourceConfig {
                unmapped: Unmapped::Error,
                ..LdifSourceConfig::default()
            },
        );
        let items = full(&source).await;
        let Some(Err(e)) = items.first() else {
            panic!()
        };
        assert!(e.message().contains("line 3: the entry dc=example,dc=com has no objectClass that object_type_map maps (classes: top, domain)"), "{e}");
    }

    #[tokio::test]
    async fn missing_content_file_is_a_config_error() {
        let source = LdifSource::new("/nonexistent/dirsync/x.ldif", LdifSourceConfig::default());
        let e = source.full_import().await.err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.message().contains("/nonexistent/dirsync/x.ldif"));
    }

    const CHANGES_1: &str = "version: 1

dn: cn=Grace Hopper,ou=People,dc=example,dc=com
changetype: add
objectClass: inetOrgPerson
cn: Grace Hopper
sn: Hopper
entryUUID: 44444444-4444-4444-4444-444444444444

dn: cn=Engineers,dc=example,dc=com
changetype: modify
add: member
member: cn=Grace Hopper,ou=People,dc=example,dc=com
-
delete: member
member: cn=Charles Babbage,ou=People,dc=example,dc=com
-

dn: cn=Ada Lovelace,ou=People,dc=example,dc=com
changetype: modrdn
newrdn: cn=Ada King
deleteoldrdn: 1

dn: ou=Unit,dc=example,dc=com
changetype: add
objectClass: organizationalUnit
ou: Unit
";

    const CHANGES_2: &str = "dn: cn=Ada King,ou=People,dc=example,dc=com
changetype: delete

dn: ou=Unit,dc=example,dc=com
changetype: modify
replace: description
description: skipped: the ou is unmapped
-
";

    #[tokio::test]
    async fn delta_import_reads_change_files_in_order() {
        let f = Fixture::new(CONTENT);
        let source = f.source();
        let w0 = last_watermark(&full(&source).await);
        f.change("002.ldif", CHANGES_2);
        f.change("001.ldif", CHANGES_1);
        f.change("notes.txt", "not a change file");

        let items = delta(&source, &w0).await.unwrap();
        let checkpoints: Vec<String> = items
            .iter()
            .filter_map(|i| match i {
                Ok(ImportItem::Checkpoint(w)) => {
                    Some(w.as_text().unwrap().rsplit(';').next().unwrap().to_owned())
                }
                _ => None,
            })
            .collect();
        assert_eq!(checkpoints, ["001.ldif", "002.ldif"]);
        let changes = ok_changes(&items);
        let grace = "44444444-4444-4444-4444-444444444444";
        assert!(
            matches!(&changes[0], Change::Add(e) if e.anchor.as_str() == grace && e.object_type.is("user"))
        );
        assert_eq!(
            changes[1],
            Change::Modify {
                anchor: ENGINEERS.into(),
                object_type: "group".into(),
                changes: vec![
                    AttributeChange::add(
                        "member",
                        Values::one(Value::dn_ref(dn(
                            "cn=Grace Hopper,ou=People,dc=example,dc=com"
                        )))
                    ),
                    AttributeChange::remove(
                        "member",
                        Values::one(Value::dn_ref(dn(
                            "cn=Charles Babbage,ou=People,dc=example,dc=com"
                        )))
                    ),
                ],
            }
        );
        assert_eq!(
            changes[2],
            Change::Move {
                anchor: ADA.into(),
                object_type: "user".into(),
                new_dn: dn("cn=Ada King,ou=People,dc=example,dc=com"),
            }
        );
        assert_eq!(
            changes[3],
            Change::Modify {
                anchor: ADA.into(),
                object_type: "user".into(),
                changes: vec![
                    AttributeChange::remove("cn", values(["Ada Lovelace"])),
                    AttributeChange::add("cn", values(["Ada King"])),
                ],
            }
        );
        assert_eq!(
            changes[4],
            Change::Delete {
                anchor: ADA.into(),
                object_type: "user".into()
            },
            "a delete by the new DN finds the renamed entry"
        );
        assert_eq!(changes.len(), 5, "changes to the unmapped ou are skipped");

        // Nothing new: just a checkpoint at the same place.
        let w2 = last_watermark(&items);
        let again = delta(&source, &w2).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(last_watermark(&again), w2);

        // A new file.
        f.change(
            "003.ldif",
            "dn: cn=Grace Hopper,ou=People,dc=example,dc=com\nchangetype: delete\n",
        );
        let third = delta(&source, &w2).await.unwrap();
        assert_eq!(
            ok_changes(&third),
            vec![Change::Delete {
                anchor: grace.into(),
                object_type: "user".into()
            }]
        );

        // A fresh source (a restart) rebuilds its DN index from the files up to the watermark.
        let restarted = f.source();
        let replayed = delta(&restarted, &w2).await.unwrap();
        assert_eq!(ok_changes(&replayed), ok_changes(&third));
    }

    #[tokio::test]
    async fn a_full_import_dropped_midway_then_run_again() {
        let f = Fixture::new(CONTENT);
        let source = f.source();
        {
            // One entry, then the stream (and its reading thread) is dropped.
            let mut s = source.full_import().await.unwrap();
            assert!(matches!(s.next().await, Some(Ok(ImportItem::Item(_)))));
        }
        assert_eq!(source.lock().at, None, "no position after a dropped import");
        let items = full(&source).await;
        assert_eq!(entries(&items).len(), 3);
        let w0 = last_watermark(&items);
        assert_eq!(
            source.lock().index.len(),
            5,
            "the index holds every entry read"
        );
        // The delta import starts from the index that import built.
        f.change(
            "001.ldif",
            "dn: CN=ADA LOVELACE,ou=people,DC=example,DC=com\nchangetype: delete\n",
        );
        assert_eq!(
            ok_changes(&delta(&source, &w0).await.unwrap()),
            vec![Change::Delete {
                anchor: ADA.into(),
                object_type: "user".into()
            }]
        );
        // Without a changes directory the index is not kept.
        let plain = LdifSource::new(f.content(), LdifSourceConfig::default());
        assert_eq!(entries(&full(&plain).await).len(), 3);
        assert_eq!(plain.lock().index.len(), 0);
        assert_eq!(plain.skipped(), 2);
    }

    #[tokio::test]
    async fn a_stream_dropped_midway_leaves_a_consistent_index() {
        let f = Fixture::new(CONTENT);
        let source = f.source();
        let w0 = last_watermark(&full(&source).await);
        f.change("001.ldif", CHANGES_1);
        f.change("002.ldif", CHANGES_2);
        let all = ok_changes(&delta(&source, &w0).await.unwrap());
        {
            // Read two changes of the first file, then drop the stream.
            let mut s = source.delta_import(&w0).await.unwrap();
            s.next().await.unwrap().unwrap();
            s.next().await.unwrap().unwrap();
        }
        assert_eq!(ok_changes(&delta(&source, &w0).await.unwrap()), all);
    }

    #[tokio::test]
    async fn renaming_a_container_moves_the_mapped_entries_below_it() {
        let f = Fixture::new(CONTENT);
        let source = f.source();
        let w0 = last_watermark(&full(&source).await);
        f.change(
            "001.ldif",
            "dn: ou=People,dc=example,dc=com\nchangetype: moddn\nnewrdn: ou=Staff\ndeleteoldrdn: 1\n\n\
             dn: cn=Ada Lovelace,ou=Staff,dc=example,dc=com\nchangetype: modify\nreplace: sn\nsn: King\n-\n",
        );
        let changes = ok_changes(&delta(&source, &w0).await.unwrap());
        assert_eq!(
            changes,
            vec![
                Change::Move {
                    anchor: ADA.into(),
                    object_type: "user".into(),
                    new_dn: dn("cn=Ada Lovelace,ou=Staff,dc=example,dc=com"),
                },
                Change::Move {
                    anchor: CHARLES.into(),
                    object_type: "user".into(),
                    new_dn: dn("cn=Charles Babbage,ou=Staff,dc=example,dc=com"),
                },
                Change::Modify {
                    anchor: ADA.into(),
                    object_type: "user".into(),
                    changes: vec![AttributeChange::replace("sn", values(["King"]))],
                },
            ]
        );
    }

    #[tokio::test]
    async fn invalid_watermarks() {
        let f = Fixture::new(CONTENT);
        let source = f.source();
        let w0 = last_watermark(&full(&source).await);
        f.change("001.ldif", CHANGES_1);
        let w1 = last_watermark(&delta(&source, &w0).await.unwrap());

        for bad in [
            Watermark::new("usn", w0.data.clone()),
            Watermark::new("ldif", b"garbage".to_vec()),
            Watermark::new("ldif", b"ldif1;zz;1;".to_vec()),
            Watermark::new("ldif", vec![0xff, 0xfe]),
        ] {
            let e = source.delta_import(&bad).await.err().unwrap();
            assert_eq!(e.kind(), ErrorKind::InvalidWatermark, "{bad:?}");
        }

        // The change file the watermark names is gone.
        std::fs::remove_file(f.dir.path().join("changes/001.ldif")).unwrap();
        let e = source.delta_import(&w1).await.err().unwrap();
        assert_eq!(e.kind(), ErrorKind::InvalidWatermark);
        assert!(e.message().contains("001.ldif"), "{e}");

        // The content file changed (same size, other bytes).
        std::fs::write(f.content(), CONTENT.replace("Lovelace", "LOVELACE")).unwrap();
        let e = source.delta_import(&w0).await.err().unwrap();
        assert_eq!(e.kind(), ErrorKind::InvalidWatermark);
        assert!(e.message().contains("changed"), "{e}");
        // A fresh source notices it too (while rebuilding its index).
        let e = f.source().delta_import(&w0).await.err().unwrap();
        assert_eq!(e.kind(), ErrorKind::InvalidWatermark);
    }

    #[tokio::test]
    async fn change_file_errors_name_file_dn_and_line() {
        let cases: &[(&str, &str)] = &[
            (
                "dn: cn=Nobody,dc=example,dc=com\nchangetype: delete\n",
                "001.ldif: line 1: cn=Nobody,dc=example,dc=com is not known to the source",
            ),
            (
                "\n\ndn: cn=Nobody,dc=example,dc=com\nchangetype: modify\nreplace: sn\nsn: x\n-\n",
                "001.ldif: line 3: cn=Nobody,dc=example,dc=com is not known",
            ),
            (
                "dn: cn=Ada Lovelace,ou=People,dc=example,dc=com\ncn: x\n",
                "line 1: change file 001.ldif holds content records",
            ),
            (
                "dn: cn=Ada Lovelace,ou=People,dc=example,dc=com\nchangetype: add\nobjectClass: inetOrgPerson\nentryUUID: 5\n",
                "line 1: an add of cn=Ada Lovelace,ou=People,dc=example,dc=com, which already exists",
            ),
            (
                "dn: cn=Ada Lovelace,ou=People,dc=example,dc=com\nchangetype: modrdn\nnewrdn: cn=Charles Babbage\ndeleteoldrdn: 0\n",
                "which already exists",
            ),
            (
                "dn: cn=Ada Lovelace,ou=People,dc=example,dc=com\nchangetype: modify\nadd: manager\nmanager: ???\n-\n",
                "line 4: attribute manager",
            ),
            (
                "dn: cn=Ada Lovelace,ou=People,dc=example,dc=com\nchangetype: modify\nadd: sn\n-\n\ndn: cn=x\nchangetype frob\n",
                "001.ldif: line 7: expected `attribute: value`",
            ),
        ];
        for (text, needle) in cases {
            let f = Fixture::new(CONTENT);
            let source = f.source();
            let w0 = last_watermark(&full(&source).await);
            f.change("001.ldif", text);
            f.change("002.ldif", "dn: cn=Grace,dc=example,dc=com\nchangetype: add\nobjectClass: inetOrgPerson\nentryUUID: 9\n");
            let items = delta(&source, &w0).await.unwrap();
            let Some(Err(e)) = items.last() else {
                panic!("{text:?}: no error at the end: {items:?}")
            };
            assert_eq!(e.kind(), ErrorKind::Protocol);
            assert!(e.message().contains(needle), "{needle:?} not in {e}");
            assert!(
                !items
                    .iter()
                    .any(|i| matches!(i, Ok(ImportItem::Checkpoint(_)))),
                "{items:?}"
            );
        }
    }

    #[test]
    fn watermark_text_round_trips() {
        let p = Position {
            content: Fingerprint {
                hash: 0xdead_beef,
                size: 42,
            },
            change_file: "2024;01.ldif".into(),
        };
        let w = p.watermark();
        assert_eq!(w.as_text(), Some("ldif1;00000000deadbeef;42;2024;01.ldif"));
        assert_eq!(Position::parse(&w), Some(p));
    }
}
