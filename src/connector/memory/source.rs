//! [`MemorySource`]: a source directory held in memory, with a change log that serves delta
//! imports, and fault injection for tests.
//!
//! It behaves like a directory server: anchors and DNs are unique, a non-leaf entry cannot be
//! deleted, a rename moves the whole subtree. It may not do I/O and never holds its lock across
//! an `await`: every import is a snapshot taken under the lock and streamed afterwards.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use futures::StreamExt;

use crate::connector::{
    ConnectorError, ErrorKind, ImportItem, ImportStream, Source, SourceCapabilities, Watermark,
};
use crate::model::{Anchor, AttributeChange, Change, Dn, Entry};

/// The watermark kind a [`MemorySource`] makes and accepts.
pub const WATERMARK_KIND: &str = "memory";

/// An in-memory source directory.
///
/// A cheaply cloneable handle: every clone sees and changes the same content, so a test keeps one
/// handle to change the directory while the engine holds another as a `Box<dyn Source>`.
///
/// Every change ([`add`](MemorySource::add), [`upsert`](MemorySource::upsert),
/// [`modify`](MemorySource::modify), [`rename`](MemorySource::rename),
/// [`delete`](MemorySource::delete)) is appended to a change log under a sequence number; a
/// watermark is a sequence number (kind `"memory"`, data the number in decimal), and a delta
/// import replays the log after it. [`compact`](MemorySource::compact) drops the log, which
/// invalidates every earlier watermark, as an expired DirSync cookie or syncrepl's
/// `e-syncRefreshRequired` does.
///
/// ```
/// use dirsync::connector::memory::MemorySource;
/// use dirsync::connector::{ImportItem, Source};
/// use dirsync::model::{AttributeChange, Change, Entry, Values};
/// use futures::{executor::block_on, TryStreamExt};
///
/// let directory = MemorySource::new("corp");
/// directory.add(Entry::new("a1", "user").with("cn", "Ada"))?;
/// let source: Box<dyn Source> = Box::new(directory.clone());
///
/// // A full import yields the entries, then a checkpoint.
/// let items: Vec<_> = block_on(async { source.full_import().await?.try_collect().await })?;
/// let Some(ImportItem::Checkpoint(mark)) = items.last().cloned() else { panic!() };
///
/// // The test changes the directory; the next delta import reports just that change.
/// directory.modify(&"a1".into(), vec![AttributeChange::replace("cn", Values::one("Ada L."))])?;
/// let delta: Vec<_> = block_on(async { source.delta_import(&mark).await?.try_collect().await })?;
/// assert!(matches!(&delta[0], ImportItem::Item(Change::Modify { .. })));
/// assert!(matches!(&delta[1], ImportItem::Checkpoint(_)));
/// # Ok::<(), dirsync::connector::ConnectorError>(())
/// ```
#[derive(Clone)]
pub struct MemorySource {
    name: Arc<str>,
    inner: Arc<Mutex<State>>,
}

/// A fault armed for the next import.
#[derive(Debug, Clone, Copy)]
enum ImportFault {
    /// The import call itself fails.
    Now(ErrorKind),
    /// The stream yields this many elements, then the error, then ends.
    After(usize, ErrorKind),
}

#[derive(Default)]
struct State {
    entries: BTreeMap<Anchor, Entry>,
    /// DN → the entry that has it.
    dns: HashMap<Dn, Anchor>,
    /// Parent DN → the entries directly below it.
    children: HashMap<Dn, BTreeSet<Anchor>>,
    /// The retained change log, in sequence order; sequences are `log_start + 1 ..= seq`.
    log: Vec<(u64, Change)>,
    /// The latest sequence number issued.
    seq: u64,
    /// The log holds every change after this sequence number.
    log_start: u64,
    no_delta: bool,
    checkpoint_every: usize,
    fault: Option<ImportFault>,
}

impl State {
    fn record(&mut self, change: Change) -> u64 {
        self.seq += 1;
        self.log.push((self.seq, change));
        self.seq
    }

    fn index(&mut self, entry: &Entry) {
        if let Some(dn) = &entry.dn {
            self.dns.insert(dn.clone(), entry.anchor.clone());
            if let Some(parent) = dn.parent() {
                self.children
                    .entry(parent)
                    .or_default()
                    .insert(entry.anchor.clone());
            }
        }
    }

    fn unindex(&mut self, entry: &Entry) {
        if let Some(dn) = &entry.dn {
            if self.dns.get(dn) == Some(&entry.anchor) {
                self.dns.remove(dn);
            }
            if let Some(parent) = dn.parent() {
                if let Some(set) = self.children.get_mut(&parent) {
                    set.remove(&entry.anchor);
                    if set.is_empty() {
                        self.children.remove(&parent);
                    }
                }
            }
        }
    }

    /// Fails when `dn` belongs to an entry other than `anchor`.
    fn check_dn_free(&self, dn: &Dn, anchor: &Anchor) -> Result<(), ConnectorError> {
        match self.dns.get(dn) {
            Some(holder) if holder != anchor => Err(ConnectorError::new(
                ErrorKind::AlreadyExists,
                format!("DN {dn} already belongs to entry {holder}; choose another DN"),
            )
            .with_object(anchor)),
            _ => Ok(()),
        }
    }

    fn child_count(&self, dn: &Dn) -> usize {
        self.children.get(dn).map_or(0, BTreeSet::len)
    }

    /// Stores `entry`, replacing the one with its anchor (keeps the DN indexes right).
    fn put(&mut self, entry: Entry) {
        if let Some(old) = self.entries.remove(&entry.anchor) {
            self.unindex(&old);
        }
        self.index(&entry);
        self.entries.insert(entry.anchor.clone(), entry);
    }

    fn take_fault(&mut self) -> Option<ImportFault> {
        self.fault.take()
    }
}

fn not_found(anchor: &Anchor, what: &str) -> ConnectorError {
    ConnectorError::new(
        ErrorKind::NotFound,
        format!("cannot {what} entry {anchor}: no entry has this anchor"),
    )
    .with_object(anchor)
}

fn watermark_at(seq: u64) -> Watermark {
    Watermark::new(WATERMARK_KIND, seq.to_string().into_bytes())
}

/// The DN `descendant` gets when its ancestor `old` is renamed to `new`.
fn rebase(descendant: &Dn, old: &Dn, new: &Dn) -> Result<Dn, ConnectorError> {
    let d = descendant.to_string();
    let o = old.to_string();
    let derived = d
        .len()
        .checked_sub(o.len())
        .filter(|&split| split > 1 && d.is_char_boundary(split))
        .filter(|&split| crate::model::eq_ignore_case(&d[split..], &o))
        .and_then(|split| d[..split].strip_suffix(','));
    let Some(relative) = derived else {
        return Err(ConnectorError::new(
            ErrorKind::Constraint,
            format!(
                "cannot derive the new DN of {d} from the rename of {o} to {new}: its DN text \
                 does not end with the renamed entry's DN"
            ),
        ));
    };
    let text = format!("{relative},{new}");
    Dn::parse(&text).map_err(|e| {
        ConnectorError::new(
            ErrorKind::Constraint,
            format!("the new DN {text:?} of {d} does not parse"),
        )
        .with_source(e)
    })
}

impl Default for MemorySource {
    fn default() -> Self {
        MemorySource::new("memory")
    }
}

impl MemorySource {
    /// An empty source named `name`, with delta import.
    pub fn new(name: impl Into<String>) -> MemorySource {
        MemorySource {
            name: Arc::from(name.into()),
            inner: Arc::new(Mutex::new(State::default())),
        }
    }

    /// Turns delta import off: the source reports `delta = false`, its full imports end without a
    /// checkpoint, and [`Source::delta_import`] fails with [`ErrorKind::Unsupported`] — a source
    /// the engine has to diff snapshots of.
    pub fn without_delta(self) -> MemorySource {
        self.lock().no_delta = true;
        self
    }

    /// Makes delta imports emit a checkpoint after every `n` changes (besides the final one);
    /// `0` turns intermediate checkpoints off.
    pub fn with_checkpoint_every(self, n: usize) -> MemorySource {
        self.lock().checkpoint_every = n;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a new entry and logs [`Change::Add`]; returns its sequence number.
    ///
    /// Fails with [`ErrorKind::AlreadyExists`] when the anchor or the DN is taken.
    pub fn add(&self, entry: Entry) -> Result<u64, ConnectorError> {
        let mut s = self.lock();
        if s.entries.contains_key(&entry.anchor) {
            return Err(ConnectorError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "cannot add entry {}: an entry with this anchor exists; use upsert to replace it",
                    entry.anchor
                ),
            )
            .with_object(&entry.anchor));
        }
        if let Some(dn) = &entry.dn {
            s.check_dn_free(dn, &entry.anchor)?;
        }
        s.put(entry.clone());
        Ok(s.record(Change::Add(entry)))
    }

    /// Adds the entry, or replaces the entry with its anchor; logs [`Change::Add`] or
    /// [`Change::Replace`] and returns its sequence number.
    ///
    /// Fails with [`ErrorKind::AlreadyExists`] when the DN belongs to another entry, and with
    /// [`ErrorKind::Constraint`] when it would change the DN of an entry that has children (use
    /// [`rename`](MemorySource::rename)).
    pub fn upsert(&self, entry: Entry) -> Result<u64, ConnectorError> {
        let mut s = self.lock();
        if let Some(dn) = &entry.dn {
            s.check_dn_free(dn, &entry.anchor)?;
        }
        let change = match s.entries.get(&entry.anchor) {
            None => Change::Add(entry.clone()),
            Some(old) => {
                if let Some(old_dn) = &old.dn {
                    let children = s.child_count(old_dn);
                    if entry.dn.as_ref() != Some(old_dn) && children > 0 {
                        return Err(ConnectorError::new(
                            ErrorKind::Constraint,
                            format!(
                                "cannot replace entry {} with a different DN: {old_dn} has \
                                 {children} child entries; use rename to move a subtree",
                                entry.anchor
                            ),
                        )
                        .with_object(&entry.anchor));
                    }
                }
                Change::Replace(entry.clone())
            }
        };
        s.put(entry);
        Ok(s.record(change))
    }

    /// Applies `changes` to the entry leniently (adding a present value or removing an absent
    /// one is skipped) and logs [`Change::Modify`]; returns its sequence number.
    ///
    /// Fails with [`ErrorKind::NotFound`] when no entry has the anchor.
    pub fn modify(
        &self,
        anchor: &Anchor,
        changes: Vec<AttributeChange>,
    ) -> Result<u64, ConnectorError> {
        let mut s = self.lock();
        let Some(entry) = s.entries.get_mut(anchor) else {
            return Err(not_found(anchor, "modify"));
        };
        for change in &changes {
            // Lenient application never fails; the result is still checked rather than assumed.
            entry.attributes.apply(change, false).map_err(|e| {
                ConnectorError::new(
                    ErrorKind::Constraint,
                    format!("cannot modify entry {anchor}: {e}"),
                )
                .with_object(anchor)
            })?;
        }
        let object_type = entry.object_type.clone();
        Ok(s.record(Change::Modify {
            anchor: anchor.clone(),
            object_type,
            changes,
        }))
    }

    /// Renames or moves the entry to `new_dn`, with every entry below it, and logs a
    /// [`Change::Move`] for the entry and then for each descendant (parents before children);
    /// returns the sequence number of the last one.
    ///
    /// Fails with [`ErrorKind::NotFound`] when no entry has the anchor,
    /// [`ErrorKind::AlreadyExists`] when a new DN is taken, and [`ErrorKind::Constraint`] when
    /// `new_dn` lies below the entry itself. Nothing changes when it fails.
    pub fn rename(&self, anchor: &Anchor, new_dn: Dn) -> Result<u64, ConnectorError> {
        let mut s = self.lock();
        let Some(entry) = s.entries.get(anchor) else {
            return Err(not_found(anchor, "rename"));
        };
        let old_dn = entry.dn.clone();
        s.check_dn_free(&new_dn, anchor)?;
        // Every (anchor, new DN) pair, parents before children.
        let mut moves: Vec<(Anchor, Dn)> = vec![(anchor.clone(), new_dn.clone())];
        if let Some(old_dn) = &old_dn {
            if new_dn.is_descendant_of(old_dn) {
                return Err(ConnectorError::new(
                    ErrorKind::Constraint,
                    format!("cannot move entry {old_dn} below itself (to {new_dn})"),
                )
                .with_object(anchor));
            }
            let mut i = 0;
            let mut queue: Vec<Dn> = vec![old_dn.clone()];
            while i < queue.len() {
                let parent = queue[i].clone();
                i += 1;
                let Some(kids) = s.children.get(&parent) else {
                    continue;
                };
                for kid in kids {
                    let Some(kid_dn) = s.entries.get(kid).and_then(|e| e.dn.clone()) else {
                        continue;
                    };
                    let moved = rebase(&kid_dn, old_dn, &new_dn).map_err(|e| e.with_object(kid))?;
                    s.check_dn_free(&moved, kid)?;
                    moves.push((kid.clone(), moved));
                    queue.push(kid_dn);
                }
            }
        }
        let mut last = s.seq;
        for (a, dn) in moves {
            let Some(mut e) = s.entries.get(&a).cloned() else {
                continue;
            };
            e.dn = Some(dn.clone());
            let object_type = e.object_type.clone();
            s.put(e);
            last = s.record(Change::Move {
                anchor: a,
                object_type,
                new_dn: dn,
            });
        }
        Ok(last)
    }

    /// Deletes the entry and logs [`Change::Delete`]; returns its sequence number.
    ///
    /// Fails with [`ErrorKind::NotFound`] when no entry has the anchor, and with
    /// [`ErrorKind::Constraint`] when entries exist below it (as LDAP's `notAllowedOnNonLeaf`).
    pub fn delete(&self, anchor: &Anchor) -> Result<u64, ConnectorError> {
        let mut s = self.lock();
        let Some(entry) = s.entries.get(anchor) else {
            return Err(not_found(anchor, "delete"));
        };
        if let Some(dn) = &entry.dn {
            let children = s.child_count(dn);
            if children > 0 {
                return Err(ConnectorError::new(
                    ErrorKind::Constraint,
                    format!(
                        "cannot delete entry {dn}: it has {children} child entries; delete them first"
                    ),
                )
                .with_object(anchor));
            }
        }
        let Some(entry) = s.entries.remove(anchor) else {
            return Err(not_found(anchor, "delete"));
        };
        s.unindex(&entry);
        Ok(s.record(Change::Delete {
            anchor: entry.anchor,
            object_type: entry.object_type,
        }))
    }

    /// The entry with `anchor`.
    pub fn get(&self, anchor: &Anchor) -> Option<Entry> {
        self.lock().entries.get(anchor).cloned()
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether the source holds no entries.
    pub fn is_empty(&self) -> bool {
        self.lock().entries.is_empty()
    }

    /// Every entry, in anchor order.
    pub fn entries(&self) -> Vec<Entry> {
        self.lock().entries.values().cloned().collect()
    }

    /// The latest sequence number (0 before the first change).
    pub fn sequence(&self) -> u64 {
        self.lock().seq
    }

    /// A watermark at the latest sequence number: a delta import from it reports the changes
    /// made afterwards.
    pub fn watermark(&self) -> Watermark {
        watermark_at(self.lock().seq)
    }

    /// Drops the change log: every watermark issued before is invalid from now on (a delta
    /// import from it fails with [`ErrorKind::InvalidWatermark`]), as when a DirSync cookie
    /// expires. Watermarks issued afterwards work as usual.
    pub fn compact(&self) {
        let mut s = self.lock();
        s.log.clear();
        // Consume a sequence number so that even the latest earlier watermark is too old.
        s.seq += 1;
        s.log_start = s.seq;
    }

    /// Makes the next import (full or delta) fail with an error of `kind` when it is called.
    /// Replaces any fault armed before; it fires once.
    pub fn fail_next_import(&self, kind: ErrorKind) {
        self.lock().fault = Some(ImportFault::Now(kind));
    }

    /// Makes the next import (full or delta) yield `n_items` stream elements (items and
    /// checkpoints alike), then an error of `kind`, and then end; when the stream is shorter, the
    /// error follows its last element. Replaces any fault armed before; it fires once.
    pub fn fail_import_after(&self, n_items: usize, kind: ErrorKind) {
        self.lock().fault = Some(ImportFault::After(n_items, kind));
    }

    fn snapshot_full(&self) -> Result<Vec<ImportResult<Entry>>, ConnectorError> {
        let mut s = self.lock();
        let fault = s.take_fault();
        if let Some(ImportFault::Now(kind)) = fault {
            return Err(injected(kind, &self.name, "full import"));
        }
        let mut items: Vec<ImportResult<Entry>> = s
            .entries
            .values()
            .cloned()
            .map(|e| Ok(ImportItem::Item(e)))
            .collect();
        if !s.no_delta {
            items.push(Ok(ImportItem::Checkpoint(watermark_at(s.seq))));
        }
        Ok(inject_after(items, fault, &self.name, "full import"))
    }

    fn snapshot_delta(
        &self,
        since: &Watermark,
    ) -> Result<Vec<ImportResult<Change>>, ConnectorError> {
        let mut s = self.lock();
        // A delta import refused for its watermark does not use up an armed fault: the fault
        // is for the import that runs (typically the full import that follows).
        if !s.no_delta {
            self.check_watermark(&s, since)?;
        }
        let fault = s.take_fault();
        if let Some(ImportFault::Now(kind)) = fault {
            return Err(injected(kind, &self.name, "delta import"));
        }
        if s.no_delta {
            return Err(ConnectorError::new(
                ErrorKind::Unsupported,
                format!(
                    "source {} does not support delta import (made with without_delta)",
                    self.name
                ),
            ));
        }
        let from = self.check_watermark(&s, since)?;
        let start = s.log.partition_point(|(seq, _)| *seq <= from);
        let every = s.checkpoint_every;
        let pending = s.log.len() - start;
        let mut items = Vec::with_capacity(pending + 1 + pending.checked_div(every).unwrap_or(0));
        for (n, (seq, change)) in s.log[start..].iter().enumerate() {
            items.push(Ok(ImportItem::Item(change.clone())));
            if every > 0 && (n + 1) % every == 0 && n + 1 < pending {
                items.push(Ok(ImportItem::Checkpoint(watermark_at(*seq))));
            }
        }
        items.push(Ok(ImportItem::Checkpoint(watermark_at(s.seq))));
        Ok(inject_after(items, fault, &self.name, "delta import"))
    }

    /// The sequence number `since` stands for, if this source can serve a delta from it.
    fn check_watermark(&self, s: &State, since: &Watermark) -> Result<u64, ConnectorError> {
        let invalid = |msg: String| ConnectorError::new(ErrorKind::InvalidWatermark, msg);
        if since.kind != WATERMARK_KIND {
            return Err(invalid(format!(
                "source {}: watermark of kind {:?} was not made by a memory source (expected \
                 kind {WATERMARK_KIND:?}); run a full import",
                self.name, since.kind
            )));
        }
        let seq = since
            .as_text()
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|t| t.parse::<u64>().ok())
            .ok_or_else(|| {
                invalid(format!(
                    "source {}: watermark data {since:?} is not a decimal sequence number; run a \
                     full import",
                    self.name
                ))
            })?;
        if seq > s.seq {
            return Err(invalid(format!(
                "source {}: watermark at sequence {seq} is ahead of the source (latest sequence \
                 {}); it was made by another source; run a full import",
                self.name, s.seq
            )));
        }
        if seq < s.log_start {
            return Err(invalid(format!(
                "source {}: watermark at sequence {seq} is older than the retained change log \
                 (it starts after sequence {}); run a full import",
                self.name, s.log_start
            )));
        }
        Ok(seq)
    }
}

type ImportResult<T> = Result<ImportItem<T>, ConnectorError>;

fn injected(kind: ErrorKind, name: &str, what: &str) -> ConnectorError {
    ConnectorError::new(kind, format!("source {name}: injected {what} failure"))
}

fn inject_after<T>(
    mut items: Vec<ImportResult<T>>,
    fault: Option<ImportFault>,
    name: &str,
    what: &str,
) -> Vec<ImportResult<T>> {
    if let Some(ImportFault::After(n, kind)) = fault {
        items.truncate(n);
        items.push(Err(ConnectorError::new(
            kind,
            format!("source {name}: injected {what} failure after {n} stream elements"),
        )));
    }
    items
}

#[async_trait]
impl Source for MemorySource {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> SourceCapabilities {
        let delta = !self.lock().no_delta;
        SourceCapabilities {
            delta,
            partial_changes: delta,
        }
    }

    async fn full_import(&self) -> Result<ImportStream<'_, Entry>, ConnectorError> {
        let items = self.snapshot_full()?;
        Ok(futures::stream::iter(items).boxed())
    }

    async fn delta_import(
        &self,
        since: &Watermark,
    ) -> Result<ImportStream<'_, Change>, ConnectorError> {
        let items = self.snapshot_delta(since)?;
        Ok(futures::stream::iter(items).boxed())
    }
}

impl std::fmt::Debug for MemorySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("MemorySource")
            .field("name", &self.name)
            .field("entries", &s.entries.len())
            .field("sequence", &s.seq)
            .field("log_start", &s.log_start)
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::model::{values, Values};
    use futures::TryStreamExt;

    fn dn(s: &str) -> Dn {
        Dn::parse(s).unwrap()
    }

    fn user(anchor: &str, cn: &str) -> Entry {
        Entry::new(anchor, "user")
            .with_dn(dn(&format!("cn={cn},ou=people,dc=example,dc=com")))
            .with("cn", cn)
    }

    async fn full(src: &dyn Source) -> Vec<ImportItem<Entry>> {
        src.full_import()
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    }

    async fn delta(src: &dyn Source, since: &Watermark) -> Vec<ImportItem<Change>> {
        src.delta_import(since)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    }

    /// Every element of a stream, errors included.
    async fn drain<T>(stream: ImportStream<'_, T>) -> Vec<Result<ImportItem<T>, ConnectorError>> {
        stream.collect().await
    }

    fn checkpoint<T: std::fmt::Debug>(item: &ImportItem<T>) -> &Watermark {
        match item {
            ImportItem::Checkpoint(w) => w,
            other => panic!("expected a checkpoint, got {other:?}"),
        }
    }

    fn changes(items: &[ImportItem<Change>]) -> Vec<Change> {
        items
            .iter()
            .filter_map(|i| match i {
                ImportItem::Item(c) => Some(c.clone()),
                ImportItem::Checkpoint(_) | ImportItem::Present(_) => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn full_import_yields_entries_in_anchor_order_then_a_checkpoint() {
        let mem = MemorySource::new("corp");
        mem.add(user("b", "Bob")).unwrap();
        mem.add(user("a", "Ada")).unwrap();
        let src: Box<dyn Source> = Box::new(mem.clone());
        assert_eq!(src.name(), "corp");
        assert_eq!(
            src.capabilities(),
            SourceCapabilities {
                delta: true,
                partial_changes: true
            }
        );
        let items = full(&*src).await;
        assert_eq!(items.len(), 3);
        assert_eq!(items[0], ImportItem::Item(user("a", "Ada")));
        assert_eq!(items[1], ImportItem::Item(user("b", "Bob")));
        assert_eq!(checkpoint(&items[2]), &Watermark::new("memory", "2"));
        assert_eq!(mem.watermark(), Watermark::new("memory", "2"));
        assert_eq!(mem.len(), 2);
        assert_eq!(mem.entries(), vec![user("a", "Ada"), user("b", "Bob")]);
    }

    #[tokio::test]
    async fn full_import_is_a_snapshot_of_the_moment_it_was_called() {
        let mem = MemorySource::new("corp");
        mem.add(user("a", "Ada")).unwrap();
        mem.add(user("b", "Bob")).unwrap();
        let src: Box<dyn Source> = Box::new(mem.clone());
        let stream = src.full_import().await.unwrap();
        mem.delete(&"a".into()).unwrap();
        mem.add(user("c", "Cy")).unwrap();
        let items: Vec<ImportItem<Entry>> = stream.try_collect().await.unwrap();
        let anchors: Vec<&str> = items
            .iter()
            .filter_map(|i| match i {
                ImportItem::Item(e) => Some(e.anchor.as_str()),
                ImportItem::Checkpoint(_) | ImportItem::Present(_) => None,
            })
            .collect();
        assert_eq!(anchors, ["a", "b"]);
        // The checkpoint covers the snapshot, so the later changes come in the next delta.
        let mark = checkpoint(&items[2]).clone();
        assert_eq!(mark, Watermark::new("memory", "2"));
        let later = changes(&delta(&*src, &mark).await);
        assert_eq!(later.len(), 2);
        assert!(matches!(&later[0], Change::Delete { anchor, .. } if anchor.as_str() == "a"));
        assert!(matches!(&later[1], Change::Add(e) if e.anchor.as_str() == "c"));
    }

    #[tokio::test]
    async fn delta_reports_each_kind_of_mutation_in_order() {
        let mem = MemorySource::new("corp");
        mem.add(user("a", "Ada")).unwrap();
        let src: Box<dyn Source> = Box::new(mem.clone());
        let mark = mem.watermark();

        assert_eq!(mem.add(user("b", "Bob")).unwrap(), 2);
        assert_eq!(mem.upsert(user("c", "Cy")).unwrap(), 3);
        let replaced = user("c", "Cy").with("title", "Engineer");
        assert_eq!(mem.upsert(replaced.clone()).unwrap(), 4);
        let mods = vec![
            AttributeChange::add("mail", values(["ada@example.com"])),
            // Lenient: adding a value the entry has is skipped, not an error.
            AttributeChange::add("cn", values(["Ada"])),
            AttributeChange::remove("description", values(["absent"])),
        ];
        assert_eq!(mem.modify(&"a".into(), mods.clone()).unwrap(), 5);
        let moved = dn("cn=Ada,ou=alumni,dc=example,dc=com");
        assert_eq!(mem.rename(&"a".into(), moved.clone()).unwrap(), 6);
        assert_eq!(mem.delete(&"b".into()).unwrap(), 7);

        let items = delta(&*src, &mark).await;
        assert_eq!(
            checkpoint(items.last().unwrap()),
            &Watermark::new("memory", "7")
        );
        let got = changes(&items);
        assert_eq!(
            got,
            vec![
                Change::Add(user("b", "Bob")),
                Change::Add(user("c", "Cy")),
                Change::Replace(replaced.clone()),
                Change::Modify {
                    anchor: "a".into(),
                    object_type: "user".into(),
                    changes: mods,
                },
                Change::Move {
                    anchor: "a".into(),
                    object_type: "user".into(),
                    new_dn: moved.clone(),
                },
                Change::Delete {
                    anchor: "b".into(),
                    object_type: "user".into(),
                },
            ]
        );
        let a = mem.get(&"a".into()).unwrap();
        assert_eq!(a.dn, Some(moved));
        assert_eq!(a.attributes.first_str("mail"), Some("ada@example.com"));
        assert_eq!(a.get("cn").unwrap().len(), 1);
        assert_eq!(mem.get(&"c".into()), Some(replaced));
        assert!(mem.get(&"b".into()).is_none());

        // From the final checkpoint nothing is new.
        let again = delta(&*src, &Watermark::new("memory", "7")).await;
        assert_eq!(
            again,
            vec![ImportItem::Checkpoint(Watermark::new("memory", "7"))]
        );
        // A delta from the middle reports the rest.
        let tail = changes(&delta(&*src, &Watermark::new("memory", "5")).await);
        assert_eq!(tail.len(), 2);
        assert!(matches!(tail[0], Change::Move { .. }));
    }

    #[test]
    fn mutations_refuse_what_a_directory_refuses() {
        let mem = MemorySource::new("corp");
        mem.add(user("a", "Ada")).unwrap();
        let kind = |r: Result<u64, ConnectorError>| r.unwrap_err().kind();
        assert_eq!(kind(mem.add(user("a", "Other"))), ErrorKind::AlreadyExists);
        // The same DN under another anchor.
        assert_eq!(kind(mem.add(user("x", "Ada"))), ErrorKind::AlreadyExists);
        assert_eq!(kind(mem.upsert(user("x", "Ada"))), ErrorKind::AlreadyExists);
        let missing: Anchor = "nobody".into();
        assert_eq!(kind(mem.modify(&missing, vec![])), ErrorKind::NotFound);
        assert_eq!(
            kind(mem.rename(&missing, dn("cn=n,dc=example,dc=com"))),
            ErrorKind::NotFound
        );
        let err = mem.delete(&missing).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert_eq!(err.object(), Some("nobody"));
        mem.add(user("b", "Bob")).unwrap();
        assert_eq!(
            kind(mem.rename(&"a".into(), dn("cn=Bob,ou=people,dc=example,dc=com"))),
            ErrorKind::AlreadyExists
        );
        // Nothing was logged for the refused mutations.
        assert_eq!(mem.sequence(), 2);
        assert_eq!(mem.len(), 2);
    }

    #[tokio::test]
    async fn rename_moves_the_subtree_and_non_leaf_entries_cannot_be_deleted() {
        let mem = MemorySource::new("corp");
        let ou = Entry::new("ou", "organizationalUnit").with_dn(dn("ou=people,dc=example,dc=com"));
        mem.add(ou).unwrap();
        mem.add(user("a", "Ada")).unwrap();
        mem.add(user("b", "Bob")).unwrap();
        let mark = mem.watermark();

        let err = mem.delete(&"ou".into()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Constraint);
        assert!(err.message().contains("2 child entries"), "{err}");
        let below = dn("ou=x,ou=people,dc=example,dc=com");
        let err = mem.rename(&"ou".into(), below).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Constraint);
        // Replacing the OU with another DN would orphan its children.
        let moved_ou =
            Entry::new("ou", "organizationalUnit").with_dn(dn("ou=staff,dc=example,dc=com"));
        assert_eq!(
            mem.upsert(moved_ou).unwrap_err().kind(),
            ErrorKind::Constraint
        );

        let last = mem
            .rename(&"ou".into(), dn("ou=staff,dc=example,dc=com"))
            .unwrap();
        assert_eq!(last, 6);
        assert_eq!(
            mem.get(&"a".into()).unwrap().dn,
            Some(dn("cn=Ada,ou=staff,dc=example,dc=com"))
        );
        let moves: Vec<(String, String)> = changes(&delta(&mem, &mark).await)
            .into_iter()
            .map(|c| match c {
                Change::Move { anchor, new_dn, .. } => (anchor.to_string(), new_dn.to_string()),
                other => panic!("expected moves only, got {other:?}"),
            })
            .collect();
        assert_eq!(moves.len(), 3);
        assert_eq!(moves[0].0, "ou");
        assert_eq!(moves[1].0, "a");
        assert_eq!(moves[2].0, "b");
        assert_eq!(dn(&moves[2].1), dn("cn=Bob,ou=staff,dc=example,dc=com"));
        // The old DNs are free again; the children are now below the new DN.
        mem.add(user("c", "Ada")).unwrap();
        mem.delete(&"a".into()).unwrap();
        mem.delete(&"b".into()).unwrap();
        mem.delete(&"ou".into()).unwrap();
    }

    #[tokio::test]
    async fn invalid_watermarks_are_refused_each_with_its_reason() {
        let mem = MemorySource::new("corp");
        mem.add(user("a", "Ada")).unwrap();
        mem.add(user("b", "Bob")).unwrap();
        let src: Box<dyn Source> = Box::new(mem.clone());
        let refuse = |w: Watermark| {
            let src = &src;
            async move {
                match src.delta_import(&w).await {
                    Ok(_) => panic!("watermark {w:?} was accepted"),
                    Err(e) => {
                        assert_eq!(e.kind(), ErrorKind::InvalidWatermark, "{e}");
                        e.message().to_string()
                    }
                }
            }
        };
        assert!(refuse(Watermark::new("usn", "1")).await.contains("\"usn\""));
        for bad in [&b""[..], b"abc", b"+1", b"-1", b"1.0", b" 1", b"\xff\xfe"] {
            let msg = refuse(Watermark::new("memory", bad.to_vec())).await;
            assert!(msg.contains("not a decimal sequence number"), "{msg}");
        }
        let msg = refuse(Watermark::new("memory", "99999999999999999999999")).await;
        assert!(msg.contains("not a decimal"), "{msg}");
        let msg = refuse(Watermark::new("memory", "3")).await;
        assert!(msg.contains("ahead of the source"), "{msg}");
        // 0 and the latest sequence are valid.
        assert_eq!(
            changes(&delta(&*src, &Watermark::new("memory", "0")).await).len(),
            2
        );
        assert_eq!(
            changes(&delta(&*src, &Watermark::new("memory", "2")).await).len(),
            0
        );

        mem.compact();
        for old in ["0", "1", "2"] {
            let msg = refuse(Watermark::new("memory", old)).await;
            assert!(msg.contains("older than the retained change log"), "{msg}");
        }
    }

    #[tokio::test]
    async fn compact_invalidates_earlier_watermarks_and_new_ones_work() {
        let mem = MemorySource::new("corp");
        mem.add(user("a", "Ada")).unwrap();
        let src: Box<dyn Source> = Box::new(mem.clone());
        let items = full(&*src).await;
        let before = checkpoint(items.last().unwrap()).clone();
        mem.compact();
        let err = src.delta_import(&before).await.err().unwrap();
        assert_eq!(err.kind(), ErrorKind::InvalidWatermark);
        // The engine then runs a full import, whose checkpoint serves later deltas.
        let items = full(&*src).await;
        assert_eq!(items.len(), 2);
        let after = checkpoint(&items[1]).clone();
        assert_eq!(changes(&delta(&*src, &after).await), vec![]);
        mem.modify(
            &"a".into(),
            vec![AttributeChange::replace("cn", Values::one("A"))],
        )
        .unwrap();
        assert_eq!(changes(&delta(&*src, &after).await).len(), 1);
        assert!(src.delta_import(&before).await.is_err());
    }

    #[tokio::test]
    async fn intermediate_checkpoints_cover_the_changes_before_them() {
        let mem = MemorySource::new("corp").with_checkpoint_every(2);
        let src: Box<dyn Source> = Box::new(mem.clone());
        let start = mem.watermark();
        for i in 0..5 {
            mem.add(Entry::new(format!("a{i}"), "user")).unwrap();
        }
        let items = delta(&*src, &start).await;
        let shape: String = items
            .iter()
            .map(|i| match i {
                ImportItem::Item(_) => 'c',
                ImportItem::Checkpoint(_) => 'K',
                ImportItem::Present(_) => 'P',
            })
            .collect();
        assert_eq!(shape, "ccKccKcK");
        assert_eq!(checkpoint(&items[2]), &Watermark::new("memory", "2"));
        assert_eq!(checkpoint(&items[5]), &Watermark::new("memory", "4"));
        assert_eq!(checkpoint(&items[7]), &Watermark::new("memory", "5"));
        // Resuming from an intermediate checkpoint yields exactly the rest.
        let rest = changes(&delta(&*src, checkpoint(&items[5])).await);
        assert_eq!(rest, vec![Change::Add(Entry::new("a4", "user"))]);
        // No duplicate checkpoint when the count is a multiple of n.
        let from_one = delta(&*src, &Watermark::new("memory", "1")).await;
        let shape: String = from_one
            .iter()
            .map(|i| match i {
                ImportItem::Item(_) => 'c',
                ImportItem::Checkpoint(_) => 'K',
                ImportItem::Present(_) => 'P',
            })
            .collect();
        assert_eq!(shape, "ccKccK");
        // Full imports carry only the final checkpoint.
        let f = full(&*src).await;
        assert_eq!(
            f.iter()
                .filter(|i| matches!(i, ImportItem::Checkpoint(_)))
                .count(),
            1
        );
    }

    #[tokio::test]
    async fn fail_next_import_fails_one_call() {
        let mem = MemorySource::new("corp");
        mem.add(user("a", "Ada")).unwrap();
        let src: Box<dyn Source> = Box::new(mem.clone());
        mem.fail_next_import(ErrorKind::Unavailable);
        let err = src.full_import().await.err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        assert_eq!(full(&*src).await.len(), 2);

        let mark = mem.watermark();
        mem.fail_next_import(ErrorKind::Timeout);
        let err = src.delta_import(&mark).await.err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Timeout);
        assert_eq!(delta(&*src, &mark).await.len(), 1);
    }

    #[tokio::test]
    async fn fail_import_after_breaks_the_stream_mid_way() {
        let mem = MemorySource::new("corp");
        for (a, cn) in [("a", "Ada"), ("b", "Bob"), ("c", "Cy")] {
            mem.add(user(a, cn)).unwrap();
        }
        let src: Box<dyn Source> = Box::new(mem.clone());
        mem.fail_import_after(2, ErrorKind::Unavailable);
        let got = drain(src.full_import().await.unwrap()).await;
        assert_eq!(got.len(), 3);
        assert!(matches!(&got[0], Ok(ImportItem::Item(e)) if e.anchor.as_str() == "a"));
        assert!(matches!(&got[1], Ok(ImportItem::Item(e)) if e.anchor.as_str() == "b"));
        assert_eq!(got[2].as_ref().unwrap_err().kind(), ErrorKind::Unavailable);
        // Once only.
        assert_eq!(full(&*src).await.len(), 4);

        // A delta broken after its first change: no checkpoint was reached.
        let mark = Watermark::new("memory", "0");
        mem.fail_import_after(1, ErrorKind::Timeout);
        let got = drain(src.delta_import(&mark).await.unwrap()).await;
        assert_eq!(got.len(), 2);
        assert!(matches!(got[0], Ok(ImportItem::Item(Change::Add(_)))));
        assert_eq!(got[1].as_ref().unwrap_err().kind(), ErrorKind::Timeout);

        // Longer than the stream: the error follows the last element.
        mem.fail_import_after(10, ErrorKind::Other);
        let got = drain(src.full_import().await.unwrap()).await;
        assert_eq!(got.len(), 5);
        assert!(matches!(got[3], Ok(ImportItem::Checkpoint(_))));
        assert!(got[4].is_err());
    }

    #[tokio::test]
    async fn without_delta_is_a_snapshot_only_source() {
        let mem = MemorySource::new("csv").without_delta();
        mem.add(user("a", "Ada")).unwrap();
        let src: Box<dyn Source> = Box::new(mem.clone());
        assert_eq!(src.capabilities(), SourceCapabilities::new(false));
        let items = full(&*src).await;
        assert_eq!(items, vec![ImportItem::Item(user("a", "Ada"))]);
        let err = src
            .delta_import(&Watermark::new("memory", "0"))
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
    }

    #[tokio::test]
    async fn imports_run_on_another_task_while_the_test_keeps_a_handle() {
        let mem = MemorySource::default();
        mem.add(user("a", "Ada")).unwrap();
        let src: Box<dyn Source> = Box::new(mem.clone());
        let task = tokio::spawn(async move {
            let items: Vec<ImportItem<Entry>> = src.full_import().await?.try_collect().await?;
            Ok::<usize, ConnectorError>(items.len())
        });
        assert_eq!(task.await.unwrap().unwrap(), 2);
        assert!(format!("{mem:?}").contains("entries: 1"));
        assert!(!mem.is_empty());
    }

    /// One mutation a property test makes.
    #[derive(Debug, Clone)]
    enum Op {
        Add(u8, u8),
        Upsert(u8, u8),
        Modify(u8, u8),
        Rename(u8, u8),
        Delete(u8),
        Compact,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (0..6u8, 0..4u8).prop_map(|(a, v)| Op::Add(a, v)),
            (0..6u8, 0..4u8).prop_map(|(a, v)| Op::Upsert(a, v)),
            (0..6u8, 0..4u8).prop_map(|(a, v)| Op::Modify(a, v)),
            (0..6u8, 0..8u8).prop_map(|(a, d)| Op::Rename(a, d)),
            (0..6u8).prop_map(Op::Delete),
            Just(Op::Compact),
        ]
    }

    /// Anchors 0 and 1 are OUs, the others sit below OU 0 or 1 (or anywhere, after renames).
    fn entry(a: u8, v: u8) -> Entry {
        let dn_text = if a < 2 {
            format!("ou=o{a},dc=x")
        } else {
            format!("cn=e{a},ou=o{},dc=x", a % 2)
        };
        Entry::new(format!("a{a}"), "thing")
            .with_dn(dn(&dn_text))
            .with("v", i64::from(v))
    }

    fn run(mem: &MemorySource, op: &Op) {
        // Refused mutations are part of the test: they must leave no trace.
        let _ = match op {
            Op::Add(a, v) => mem.add(entry(*a, *v)),
            Op::Upsert(a, v) => mem.upsert(entry(*a, *v)),
            Op::Modify(a, v) => mem.modify(
                &format!("a{a}").into(),
                vec![
                    AttributeChange::add("v", values([i64::from(*v)])),
                    AttributeChange::remove("v", values([i64::from(*v) + 1])),
                ],
            ),
            Op::Rename(a, d) => mem.rename(
                &format!("a{a}").into(),
                dn(&format!("cn=r{d},ou=o{},dc=x", d % 2)),
            ),
            Op::Delete(a) => mem.delete(&format!("a{a}").into()),
            Op::Compact => {
                mem.compact();
                Ok(0)
            }
        };
    }

    /// A mirror as the engine keeps one: applies changes leniently.
    fn replay(mirror: &mut BTreeMap<Anchor, Entry>, change: Change) {
        match change {
            Change::Add(e) | Change::Replace(e) => {
                mirror.insert(e.anchor.clone(), e);
            }
            Change::Modify {
                anchor, changes, ..
            } => {
                let e = mirror.get_mut(&anchor).unwrap();
                for c in &changes {
                    e.attributes.apply(c, false).unwrap();
                }
            }
            Change::Move { anchor, new_dn, .. } => {
                mirror.get_mut(&anchor).unwrap().dn = Some(new_dn);
            }
            Change::Delete { anchor, .. } => {
                mirror.remove(&anchor).unwrap();
            }
        }
    }

    proptest::proptest! {
        /// A mirror built from a full import and then deltas — resumed from any checkpoint,
        /// intermediate ones included — always equals the source, and DNs stay unique.
        #[test]
        fn full_import_plus_deltas_reproduce_the_source(
            first in proptest::collection::vec(op(), 0..25),
            second in proptest::collection::vec(op(), 0..25),
            every in 0..4usize,
        ) {
            futures::executor::block_on(async {
                let mem = MemorySource::new("p").with_checkpoint_every(every);
                for o in &first {
                    run(&mem, o);
                }
                let mut mirror = BTreeMap::new();
                let mut mark = None;
                for item in full(&mem).await {
                    match item {
                        ImportItem::Item(e) => { mirror.insert(e.anchor.clone(), e); }
                        ImportItem::Checkpoint(w) => mark = Some(w),
                        ImportItem::Present(_) => {}
                    }
                }
                let mut mark = mark.unwrap();
                for (i, o) in second.iter().enumerate() {
                    run(&mem, o);
                    // Every other step, stop the delta at its first intermediate checkpoint.
                    let stream = match mem.delta_import(&mark).await {
                        Ok(s) => s,
                        Err(e) => {
                            proptest::prop_assert_eq!(e.kind(), ErrorKind::InvalidWatermark);
                            mirror.clear();
                            for item in full(&mem).await {
                                match item {
                                    ImportItem::Item(e) => { mirror.insert(e.anchor.clone(), e); }
                                    ImportItem::Checkpoint(w) => mark = w,
                                    ImportItem::Present(_) => {}
                                }
                            }
                            continue;
                        }
                    };
                    let items: Vec<ImportItem<Change>> = stream.try_collect().await.unwrap();
                    for item in items {
                        match item {
                            ImportItem::Item(c) => replay(&mut mirror, c),
                            ImportItem::Present(_) => {}
                            ImportItem::Checkpoint(w) => {
                                mark = w;
                                if i % 2 == 1 {
                                    break;
                                }
                            }
                        }
                    }
                }
                // Catch up fully, then compare.
                if let Ok(stream) = mem.delta_import(&mark).await {
                    let items: Vec<ImportItem<Change>> = stream.try_collect().await.unwrap();
                    for item in items {
                        if let ImportItem::Item(c) = item {
                            replay(&mut mirror, c);
                        }
                    }
                    let now: BTreeMap<Anchor, Entry> =
                        mem.entries().into_iter().map(|e| (e.anchor.clone(), e)).collect();
                    proptest::prop_assert_eq!(&mirror, &now);
                }
                let dns: std::collections::HashSet<Dn> =
                    mem.entries().into_iter().filter_map(|e| e.dn).collect();
                proptest::prop_assert_eq!(dns.len(), mem.len());
                Ok(())
            })?;
        }
    }
}
