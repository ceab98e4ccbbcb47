//! [`MemoryStore`]: the state store kept in memory, for tests and short-lived programs. Same
//! semantics as the durable store, nothing survives the process.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};

use super::{
    audit_attributes, check_import_share, done_effect, encode_entry, entry_references, lookup_key,
    redact_operation, redact_target_operation, unlinks, DoneEffect, Escrow, FullImportSummary,
    JournalEntry, JournalId, JournalOutcome, JournalRecord, JournalState, Pruned, Reach, RefTarget,
    Retention, RunId, RunRecord, StateError, StateStore, TargetLookup, Views,
};
use crate::connector::{TargetOperation, Watermark};
use crate::delta::{
    resolve_change_values, resolve_references, Link, Links, Operation, SourceMirror, TargetMirror,
};
use crate::model::{Anchor, AttrName, Change, Dn, Entry, ObjectType, TargetId, TargetObject};

/// An open full import.
#[derive(Debug, Clone)]
struct Session {
    connector: String,
    summary: FullImportSummary,
}

/// The state store in memory. See [`StateStore`](super::StateStore) for what each call does.
///
/// ```
/// use dirsync::model::{Change, Entry};
/// use dirsync::state::{MemoryStore, StateStore};
/// let mut store = MemoryStore::new();
/// store.apply_changes("ldap", &[Change::Add(Entry::new("a1", "user"))], None)?;
/// assert_eq!(store.dirty()?, ["a1".into()]);
/// # Ok::<(), dirsync::state::StateError>(())
/// ```
#[derive(Debug, Clone)]
pub struct MemoryStore {
    mirror: SourceMirror,
    hashes: HashMap<Anchor, (u64, u64)>,
    generation: u64,
    session: Option<Session>,
    watermarks: BTreeMap<String, Watermark>,
    links: Links,
    target: TargetMirror,
    dirty: BTreeSet<Anchor>,
    /// The journal by id (done rows compact, as the SQLite store keeps them).
    journal: BTreeMap<i64, JournalRecord>,
    last_journal_id: i64,
    escrow: BTreeMap<Anchor, Escrow>,
    /// The runs, oldest first.
    runs: Vec<RunRecord>,
    last_run_id: i64,
    retention: Option<Retention>,
    fingerprint: u64,
    containers: crate::delta::ContainerBindings,
}

impl Default for MemoryStore {
    fn default() -> MemoryStore {
        MemoryStore {
            mirror: SourceMirror::default(),
            hashes: HashMap::new(),
            generation: 0,
            session: None,
            watermarks: BTreeMap::new(),
            links: Links::default(),
            target: TargetMirror::default(),
            dirty: BTreeSet::new(),
            journal: BTreeMap::new(),
            last_journal_id: 0,
            escrow: BTreeMap::new(),
            runs: Vec::new(),
            last_run_id: 0,
            retention: Some(Retention::default()),
            fingerprint: 0,
            containers: crate::delta::ContainerBindings::default(),
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Sets the journal retention applied at every [`StateStore::finish_run`] (the default is
    /// [`Retention::default`]); `None` keeps every run and journal row.
    pub fn set_retention(&mut self, retention: Option<Retention>) {
        self.retention = retention;
    }

    /// Checks a `journal_done` without changing anything.
    fn check_done<'a>(
        &self,
        id: JournalId,
        op: &Operation,
        sent: Option<&'a TargetOperation>,
        target_id: Option<&TargetId>,
    ) -> Result<DoneEffect<'a>, StateError> {
        if !self.journal.contains_key(&id.0) {
            return Err(StateError::UnknownJournalId(id));
        }
        done_effect(op, sent, target_id)
    }

    /// Applies a checked `journal_done` (the caller moves the fingerprint).
    fn apply_done(
        &mut self,
        id: JournalId,
        op: &Operation,
        sent: Option<&TargetOperation>,
        (effect, link_to, recorded): DoneEffect<'_>,
    ) {
        if let Some(row) = self.journal.get_mut(&id.0) {
            row.state = JournalState::Done;
            row.target_id = recorded;
            row.attributes = audit_attributes(sent);
            row.error = None;
            row.retryable = false;
            row.operation = None;
            row.sent = None;
        }
        if let Some(t) = link_to {
            self.links.insert(Link {
                anchor: op.anchor.clone(),
                source_type: op.source_type.clone(),
                target_id: t,
                target_type: op.target_type.clone(),
            });
        } else if let Some(t) = unlinks(op) {
            if self
                .links
                .get(&op.anchor)
                .is_some_and(|l| l.target_id == *t)
            {
                self.links.remove(&op.anchor);
            }
        }
        if let Some((tid, effect)) = effect {
            self.target.record(&effect, &tid);
        }
    }

    fn prune(&mut self, retention: &Retention, now: DateTime<Utc>) -> Pruned {
        let cutoff = retention.cutoff(now);
        let keep_from = usize::try_from(retention.runs)
            .map(|n| self.runs.len().saturating_sub(n))
            .unwrap_or(0);
        let doomed: BTreeSet<RunId> = self.runs[..keep_from]
            .iter()
            .filter(|r| r.finished.is_some_and(|f| f < cutoff))
            .map(|r| r.id)
            .collect();
        let mut out = Pruned::default();
        if doomed.is_empty() {
            return out;
        }
        let before = self.journal.len();
        self.journal
            .retain(|_, j| j.state == JournalState::Intended || !doomed.contains(&j.run));
        out.entries = (before - self.journal.len()) as u64;
        let pinned: BTreeSet<RunId> = self.journal.values().map(|j| j.run).collect();
        let before = self.runs.len();
        self.runs
            .retain(|r| !doomed.contains(&r.id) || pinned.contains(&r.id));
        out.runs = (before - self.runs.len()) as u64;
        out
    }

    /// The neighbourhood of `anchors` reaching as far as `reach` says
    /// ([`StateStore::load_neighbourhood_reaching`]).
    fn neighbourhood(&self, anchors: &[Anchor], reach: Reach) -> Views {
        let mut planned: BTreeSet<Anchor> = anchors.iter().cloned().collect();
        for a in anchors {
            planned.extend(self.referrers(a).filter(|r| match reach {
                Reach::Referrers => true,
                Reach::LinkedReferrers => self.links.get(r).is_some(),
                Reach::Anchors
                | Reach::AnchorsAlone
                | Reach::AnchorsByLink
                | Reach::AnchorsBare => false,
            }));
        }
        let mut context: BTreeSet<Anchor> = BTreeSet::new();
        let bare = reach == Reach::AnchorsBare;
        for p in planned.iter().filter(|_| !bare) {
            context.extend(self.referrers(p));
            if let Some(e) = self.mirror.get(p) {
                for (_, t) in entry_references(e) {
                    let resolved = match t {
                        RefTarget::Anchor(a) => Some(a),
                        RefTarget::Dn(s) => Dn::parse(&s)
                            .ok()
                            .and_then(|d| self.mirror.anchor_of(&d).cloned()),
                    };
                    context.extend(resolved);
                }
            }
        }
        let mut views = Views::default();
        for a in planned.iter().chain(context.iter()) {
            if let Some(e) = self.mirror.get(a) {
                views.mirror.insert(e.clone());
            }
            if let Some(l) = self.links.get(a) {
                views.links.insert(l.clone());
            }
        }
        for p in &planned {
            if let Some(o) = self
                .links
                .get(p)
                .and_then(|l| self.target.get(&l.target_id))
            {
                views.target.insert(o.clone());
            }
        }
        views
    }

    /// The anchors `anchor`'s entry is referenced from, by anchor or by its current DN.
    fn referrers(&self, anchor: &Anchor) -> impl Iterator<Item = Anchor> + '_ {
        self.mirror
            .referrers(anchor)
            .into_iter()
            .map(|(a, _)| a.clone())
    }

    /// Writes `new` as the entry of `anchor` (`None`: deletes it) with its content `hash` (of
    /// the entry as the source delivered it), marking what changed dirty. The entry's DN
    /// references are resolved against the mirror; a delete removes the references to the
    /// object from its referrers. Returns whether the content changed.
    fn write_entry(
        &mut self,
        anchor: &Anchor,
        new: Option<(Entry, u64)>,
        generation: Option<u64>,
    ) -> bool {
        let old = self.hashes.get(anchor).copied();
        // A delta keeps the generation an entry was last seen in (0 for a new one).
        let generation = generation.or(old.map(|(_, g)| g)).unwrap_or(0);
        let new_hash = new.as_ref().map(|(_, h)| *h);
        if old.map(|(h, _)| h) == new_hash {
            if let Some(h) = new_hash {
                self.hashes.insert(anchor.clone(), (h, generation));
            }
            return false;
        }
        let new = new.map(|(e, h)| (self.mirror.resolved(e), h));
        if let Some((e, h)) = &new {
            if self.mirror.get(anchor) == Some(e) {
                // Delivered differently (a referenced object's new DN), the same once resolved.
                self.hashes.insert(anchor.clone(), (*h, generation));
                return false;
            }
        }
        let mut dirty: BTreeSet<Anchor> = BTreeSet::new();
        dirty.insert(anchor.clone());
        dirty.extend(self.referrers(anchor));
        let old_refs: BTreeSet<(AttrName, RefKey)> =
            self.mirror.get(anchor).map(ref_set).unwrap_or_default();
        let new_refs: BTreeSet<(AttrName, RefKey)> =
            new.as_ref().map(|(e, _)| ref_set(e)).unwrap_or_default();
        match new {
            Some((entry, hash)) => {
                self.hashes.insert(anchor.clone(), (hash, generation));
                self.mirror.insert(entry);
            }
            None => {
                self.hashes.remove(anchor);
                if let Some((_, stripped)) = self.mirror.delete(anchor) {
                    // Their stored content changed without the source saying so: their hash
                    // is now that of what is stored, so the next import of them compares with it.
                    for r in stripped {
                        if let Some(e) = self.mirror.get(&r) {
                            let h = encode_entry(e).map(|(_, h)| h).unwrap_or_default();
                            let g = self.hashes.get(&r).map(|(_, g)| *g).unwrap_or(0);
                            self.hashes.insert(r.clone(), (h, g));
                        }
                        dirty.insert(r);
                    }
                }
            }
        }
        dirty.extend(self.referrers(anchor));
        for (_, target) in old_refs.symmetric_difference(&new_refs) {
            match target {
                RefKey::Anchor(a) => {
                    dirty.insert(a.clone());
                }
                RefKey::Dn(dn) => {
                    if let Some(a) = self.mirror.anchor_of(dn) {
                        dirty.insert(a.clone());
                    }
                }
            }
        }
        self.dirty.extend(dirty);
        true
    }

    /// Marks dirty the objects linked to the target objects `ids` and their referrers (the
    /// target objects are gone: the links are stale and the references to them too).
    fn mark_linked_gone(&mut self, ids: &[TargetId]) {
        let mut dirty: BTreeSet<Anchor> = BTreeSet::new();
        for id in ids {
            if let Some(a) = self.links.anchor_of(id).cloned() {
                dirty.extend(self.referrers(&a));
                dirty.insert(a);
            }
        }
        self.dirty.extend(dirty);
    }

    fn bump(&mut self) {
        self.fingerprint = self.fingerprint.wrapping_add(1);
    }

    fn journal_row(&mut self, id: JournalId) -> Result<&mut JournalRecord, StateError> {
        self.journal
            .get_mut(&id.0)
            .ok_or(StateError::UnknownJournalId(id))
    }

    /// Refuses a batch of full import `generation` that delivers an anchor twice at two DNs
    /// (within the batch, or against an entry imported earlier in this import), before anything
    /// is written.
    fn check_import(&self, generation: u64, entries: &[Entry]) -> Result<(), StateError> {
        let mut batch: HashMap<&Anchor, Option<&Dn>> = HashMap::new();
        for e in entries {
            let first = match batch.get(&e.anchor) {
                Some(dn) => *dn,
                None => match self.hashes.get(&e.anchor) {
                    Some((_, g)) if *g == generation => {
                        self.mirror.get(&e.anchor).and_then(|m| m.dn.as_ref())
                    }
                    _ => None,
                },
            };
            super::same_object(&e.anchor, first, e.dn.as_ref())?;
            batch.insert(&e.anchor, e.dn.as_ref());
        }
        Ok(())
    }

    /// Validates a batch of changes against the mirror, as they would apply in order.
    fn check_changes(&self, changes: &[Change]) -> Result<(), StateError> {
        super::check_changes(changes, |a| Ok(self.mirror.get(a).is_some()))
    }
}

/// A reference target, comparable.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum RefKey {
    Anchor(Anchor),
    Dn(Dn),
}

fn ref_set(e: &Entry) -> BTreeSet<(AttrName, RefKey)> {
    entry_references(e)
        .into_iter()
        .filter_map(|(n, t)| match t {
            RefTarget::Anchor(a) => Some((n, RefKey::Anchor(a))),
            RefTarget::Dn(s) => Dn::parse(&s).ok().map(|d| (n, RefKey::Dn(d))),
        })
        .collect()
}

impl StateStore for MemoryStore {
    fn apply_changes(
        &mut self,
        connector: &str,
        changes: &[Change],
        watermark: Option<&Watermark>,
    ) -> Result<(), StateError> {
        self.check_changes(changes)?;
        // Hash every resulting entry before changing anything, so a failure changes nothing.
        // A modify's values are resolved as the mirror will be when it applies (the batch's
        // earlier changes may move DNs: `staged_dn` overlays them).
        let mut staged: HashMap<Anchor, Option<Entry>> = HashMap::new();
        let mut staged_dn: HashMap<Dn, Option<Anchor>> = HashMap::new();
        let mut order: Vec<(Anchor, Option<(Entry, u64)>)> = Vec::with_capacity(changes.len());
        for c in changes {
            let a = c.anchor().clone();
            let current = match staged.get(&a) {
                Some(e) => e.clone(),
                None => self.mirror.get(&a).cloned(),
            };
            let lookup = |d: &Dn| -> Result<Option<Anchor>, StateError> {
                Ok(match staged_dn.get(d) {
                    Some(held) => held.clone(),
                    None => self.mirror.anchor_of(d).cloned(),
                })
            };
            let next: Option<Entry> = match c {
                Change::Add(e) | Change::Replace(e) => Some(e.clone()),
                Change::Delete { .. } => None,
                Change::Modify { changes, .. } => match current.clone() {
                    Some(mut e) => {
                        resolve_references(&mut e, lookup)?;
                        for ch in &resolve_change_values(changes, lookup)? {
                            let _ = e.attributes.apply(ch, false);
                        }
                        Some(e)
                    }
                    None => None,
                },
                Change::Move { new_dn, .. } => current.clone().map(|mut e| {
                    e.dn = Some(new_dn.clone());
                    e
                }),
            };
            let hashed = match &next {
                Some(e) => Some((e.clone(), encode_entry(e)?.1)),
                None => None,
            };
            if let Some(d) = current.as_ref().and_then(|e| e.dn.clone()) {
                staged_dn.insert(d, None);
            }
            if let Some(d) = next.as_ref().and_then(|e| e.dn.clone()) {
                staged_dn.insert(d, Some(a.clone()));
            }
            staged.insert(a.clone(), next);
            order.push((a, hashed));
        }
        let mut changed = false;
        for (a, new) in order {
            changed |= self.write_entry(&a, new, None);
        }
        self.mirror.settle();
        if let Some(w) = watermark {
            self.watermarks.insert(connector.to_owned(), w.clone());
        }
        if changed {
            self.bump();
        }
        Ok(())
    }

    fn begin_full_import(&mut self, connector: &str) -> Result<u64, StateError> {
        self.generation += 1;
        self.session = Some(Session {
            connector: connector.to_owned(),
            summary: FullImportSummary {
                generation: self.generation,
                ..FullImportSummary::default()
            },
        });
        Ok(self.generation)
    }

    fn import_entries(&mut self, generation: u64, entries: &[Entry]) -> Result<(), StateError> {
        let open = self.session.as_ref().map(|s| s.summary.generation);
        if open != Some(generation) {
            return Err(StateError::UnknownGeneration { generation, open });
        }
        self.check_import(generation, entries)?;
        let mut hashed = Vec::with_capacity(entries.len());
        for e in entries {
            hashed.push((e.clone(), encode_entry(e)?.1));
        }
        let (mut seen, mut added, mut changed) = (0, 0, 0);
        for (e, hash) in hashed {
            let anchor = e.anchor.clone();
            let before = self.hashes.get(&anchor).copied();
            match before {
                Some((_, g)) if g == generation => {}
                Some(_) => seen += 1,
                None => {
                    seen += 1;
                    added += 1;
                }
            }
            if self.write_entry(&anchor, Some((e, hash)), Some(generation)) && before.is_some() {
                changed += 1;
            }
        }
        self.mirror.settle();
        if let Some(s) = self.session.as_mut() {
            s.summary.seen += seen;
            s.summary.added += added;
            s.summary.changed += changed;
        }
        if added + changed > 0 {
            self.bump();
        }
        Ok(())
    }

    fn finish_full_import(
        &mut self,
        connector: &str,
        generation: u64,
        watermark: Option<&Watermark>,
        min_share: f64,
    ) -> Result<FullImportSummary, StateError> {
        let Some(session) = self.session.clone() else {
            return Err(StateError::UnknownGeneration {
                generation,
                open: None,
            });
        };
        if session.summary.generation != generation {
            return Err(StateError::UnknownGeneration {
                generation,
                open: Some(session.summary.generation),
            });
        }
        if session.connector != connector {
            return Err(StateError::WrongConnector {
                generation,
                begun: session.connector,
                given: connector.to_owned(),
            });
        }
        let mirrored = self.mirror.len() as u64;
        check_import_share(session.summary.seen, mirrored, min_share)?;
        let mut unseen: Vec<Anchor> = self
            .hashes
            .iter()
            .filter(|(_, (_, g))| *g != generation)
            .map(|(a, _)| a.clone())
            .collect();
        unseen.sort();
        let mut summary = session.summary;
        for a in &unseen {
            self.write_entry(a, None, None);
        }
        summary.deleted = unseen.len() as u64;
        if let Some(w) = watermark {
            self.watermarks.insert(connector.to_owned(), w.clone());
        }
        self.session = None;
        if !unseen.is_empty() {
            self.bump();
        }
        Ok(summary)
    }

    fn watermark(&self, connector: &str) -> Result<Option<Watermark>, StateError> {
        Ok(self.watermarks.get(connector).cloned())
    }

    fn clear_watermark(&mut self, connector: &str) -> Result<(), StateError> {
        self.watermarks.remove(connector);
        Ok(())
    }

    fn load_all(&self) -> Result<Views, StateError> {
        Ok(Views {
            mirror: self.mirror.clone(),
            links: self.links.clone(),
            target: self.target.clone(),
        })
    }

    fn load_neighbourhood(&self, anchors: &[Anchor]) -> Result<Views, StateError> {
        Ok(self.neighbourhood(anchors, Reach::Referrers))
    }

    fn load_neighbourhood_reaching(
        &self,
        anchors: &[Anchor],
        reach: Reach,
    ) -> Result<Views, StateError> {
        Ok(self.neighbourhood(anchors, reach))
    }

    fn load_join_candidates(
        &self,
        views: &mut Views,
        lookups: &[TargetLookup],
    ) -> Result<(), StateError> {
        for l in lookups {
            let key = lookup_key(&l.value);
            for o in self.target.objects() {
                if o.object_type != l.object_type {
                    continue;
                }
                let hit = o
                    .attributes
                    .get(l.attribute.as_str())
                    .is_some_and(|vs| vs.iter().any(|v| lookup_key(v) == key));
                if hit {
                    views.target.insert(o.clone());
                    if let Some(a) = self.links.anchor_of(&o.id) {
                        if let Some(link) = self.links.get(a) {
                            views.links.insert(link.clone());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn anchors_page(
        &self,
        after: Option<&Anchor>,
        limit: usize,
    ) -> Result<Vec<Anchor>, StateError> {
        // A scan per page: this store holds everything in memory anyway.
        let mut page: Vec<&Anchor> = self
            .mirror
            .anchors()
            .chain(
                self.links
                    .iter()
                    .map(|l| &l.anchor)
                    .filter(|a| self.mirror.get(a).is_none()),
            )
            .filter(|a| after.is_none_or(|after| *a > after))
            .collect();
        if page.len() > limit {
            page.select_nth_unstable(limit);
            page.truncate(limit);
        }
        page.sort_unstable();
        Ok(page.into_iter().cloned().collect())
    }

    fn source_entry(&self, anchor: &Anchor) -> Result<Option<Entry>, StateError> {
        Ok(self.mirror.get(anchor).cloned())
    }

    fn anchor_by_dn(&self, dn: &Dn) -> Result<Option<Anchor>, StateError> {
        Ok(self.mirror.anchor_of(dn).cloned())
    }

    fn link_counts(&self) -> Result<BTreeMap<ObjectType, usize>, StateError> {
        let mut out: BTreeMap<ObjectType, usize> = BTreeMap::new();
        for l in self.links.iter() {
            *out.entry(l.target_type.clone()).or_default() += 1;
        }
        Ok(out)
    }

    fn dirty(&self) -> Result<Vec<Anchor>, StateError> {
        Ok(self.dirty.iter().cloned().collect())
    }

    fn dirty_page(
        &self,
        after: Option<&Anchor>,
        limit: usize,
    ) -> Result<Vec<(Anchor, bool)>, StateError> {
        use std::ops::Bound;
        let from = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        Ok(self
            .dirty
            .range::<Anchor, _>((from, Bound::Unbounded))
            .take(limit)
            .map(|a| (a.clone(), self.links.get(a).is_some()))
            .collect())
    }

    fn clear_dirty(&mut self, anchors: &[Anchor]) -> Result<(), StateError> {
        let mut changed = false;
        for a in anchors {
            changed |= self.dirty.remove(a);
        }
        if changed {
            self.bump();
        }
        Ok(())
    }

    fn mark_dirty(&mut self, anchors: &[Anchor]) -> Result<(), StateError> {
        let mut changed = false;
        for a in anchors {
            changed |= self.dirty.insert(a.clone());
        }
        if changed {
            self.bump();
        }
        Ok(())
    }

    fn journal_intent(
        &mut self,
        run: RunId,
        op: &Operation,
        sent: Option<&TargetOperation>,
    ) -> Result<JournalId, StateError> {
        self.journal_intents(run, &[(op, sent)]).map(|ids| {
            ids.first()
                .copied()
                .unwrap_or(JournalId(self.last_journal_id))
        })
    }

    fn journal_intents(
        &mut self,
        run: RunId,
        ops: &[(&Operation, Option<&TargetOperation>)],
    ) -> Result<Vec<JournalId>, StateError> {
        if !self.runs.iter().any(|r| r.id == run) {
            return Err(StateError::UnknownRun(run));
        }
        let mut ids = Vec::with_capacity(ops.len());
        for (op, sent) in ops {
            self.last_journal_id += 1;
            let id = JournalId(self.last_journal_id);
            self.journal.insert(
                id.0,
                JournalRecord {
                    id,
                    run,
                    anchor: op.anchor.clone(),
                    kind: op.kind.name().to_owned(),
                    state: JournalState::Intended,
                    target_id: None,
                    attributes: Vec::new(),
                    error: None,
                    retryable: false,
                    operation: Some(redact_operation(op)),
                    sent: sent.map(|s| redact_target_operation(op, s)),
                },
            );
            ids.push(id);
        }
        Ok(ids)
    }

    fn journal_done(
        &mut self,
        id: JournalId,
        op: &Operation,
        sent: Option<&TargetOperation>,
        target_id: Option<&TargetId>,
    ) -> Result<(), StateError> {
        let done = self.check_done(id, op, sent, target_id)?;
        self.apply_done(id, op, sent, done);
        self.bump();
        Ok(())
    }

    fn journal_failed(
        &mut self,
        id: JournalId,
        error: &str,
        retryable: bool,
    ) -> Result<(), StateError> {
        let row = self.journal_row(id)?;
        row.state = JournalState::Failed;
        row.error = Some(error.to_owned());
        row.retryable = retryable;
        Ok(())
    }

    fn journal_commit(
        &mut self,
        run: RunId,
        outcomes: &[JournalOutcome<'_>],
        intents: &[(&Operation, Option<&TargetOperation>)],
    ) -> Result<Vec<JournalId>, StateError> {
        // All or nothing: the intents can only fail on an unknown run, checked first.
        if !intents.is_empty() && !self.runs.iter().any(|r| r.id == run) {
            return Err(StateError::UnknownRun(run));
        }
        self.journal_outcomes(outcomes)?;
        if intents.is_empty() {
            return Ok(Vec::new());
        }
        self.journal_intents(run, intents)
    }

    fn journal_outcomes(&mut self, outcomes: &[JournalOutcome<'_>]) -> Result<(), StateError> {
        // All or nothing: every outcome is checked before any is applied (applying a checked
        // outcome cannot fail, and an earlier one cannot make a later one invalid).
        let mut checked = Vec::with_capacity(outcomes.len());
        for o in outcomes {
            checked.push(match o {
                JournalOutcome::Done {
                    id,
                    op,
                    sent,
                    target_id,
                } => Some(self.check_done(*id, op, *sent, *target_id)?),
                JournalOutcome::Failed { id, .. } => {
                    if !self.journal.contains_key(&id.0) {
                        return Err(StateError::UnknownJournalId(*id));
                    }
                    None
                }
            });
        }
        let mut done = false;
        for (o, c) in outcomes.iter().zip(checked) {
            match (o, c) {
                (JournalOutcome::Done { id, op, sent, .. }, Some(effect)) => {
                    self.apply_done(*id, op, *sent, effect);
                    done = true;
                }
                (
                    JournalOutcome::Failed {
                        id,
                        error,
                        retryable,
                    },
                    _,
                ) => self.journal_failed(*id, error, *retryable)?,
                (JournalOutcome::Done { .. }, None) => {}
            }
        }
        if done {
            self.bump();
        }
        Ok(())
    }

    fn journal_unconfirmed(&self) -> Result<Vec<JournalEntry>, StateError> {
        self.journal
            .values()
            .filter(|j| j.state == JournalState::Intended)
            .map(|j| {
                Ok(JournalEntry {
                    id: j.id,
                    run: j.run,
                    operation: j.operation.clone().ok_or_else(|| StateError::Corrupt {
                        table: "journal",
                        key: j.id.0.to_string(),
                        detail: "an intended row without its operation".into(),
                    })?,
                    sent: j.sent.clone(),
                    state: j.state,
                    target_id: j.target_id.clone(),
                    error: j.error.clone(),
                    retryable: j.retryable,
                })
            })
            .collect()
    }

    fn journal(&self, run: Option<RunId>) -> Result<Vec<JournalRecord>, StateError> {
        Ok(self
            .journal
            .values()
            .filter(|j| run.is_none_or(|r| j.run == r))
            .cloned()
            .collect())
    }

    fn prune_journal(
        &mut self,
        retention: &Retention,
        now: DateTime<Utc>,
    ) -> Result<Pruned, StateError> {
        Ok(self.prune(retention, now))
    }

    fn put_target_objects(&mut self, objects: &[TargetObject]) -> Result<(), StateError> {
        for o in objects {
            self.target.insert(o.clone());
        }
        if !objects.is_empty() {
            self.bump();
        }
        Ok(())
    }

    fn remove_target_objects(&mut self, ids: &[TargetId]) -> Result<(), StateError> {
        let mut changed = false;
        let mut gone = Vec::new();
        for id in ids {
            if self.target.remove(id).is_some() {
                changed = true;
                gone.push(id.clone());
            }
        }
        self.mark_linked_gone(&gone);
        if changed {
            self.bump();
        }
        Ok(())
    }

    fn has_unlinked_target_objects(&self) -> Result<bool, StateError> {
        Ok(self
            .target
            .objects()
            .any(|o| self.links.anchor_of(&o.id).is_none()))
    }

    fn target_ids(&self) -> Result<Vec<TargetId>, StateError> {
        let mut ids: Vec<TargetId> = self.target.objects().map(|o| o.id.clone()).collect();
        ids.sort();
        Ok(ids)
    }

    fn escrow(
        &mut self,
        anchor: &Anchor,
        error: &str,
        next_retry: DateTime<Utc>,
    ) -> Result<u32, StateError> {
        let e = self.escrow.entry(anchor.clone()).or_insert_with(|| Escrow {
            anchor: anchor.clone(),
            attempts: 0,
            next_retry,
            last_error: String::new(),
        });
        e.attempts = e.attempts.saturating_add(1);
        e.next_retry = next_retry;
        e.last_error = error.to_owned();
        Ok(e.attempts)
    }

    fn escrowed(&self) -> Result<Vec<Escrow>, StateError> {
        Ok(self.escrow.values().cloned().collect())
    }

    fn release(&mut self, anchor: &Anchor) -> Result<(), StateError> {
        self.escrow.remove(anchor);
        Ok(())
    }

    fn begin_run(&mut self, profile: &str, started: DateTime<Utc>) -> Result<RunId, StateError> {
        self.last_run_id += 1;
        let id = RunId(self.last_run_id);
        self.runs.push(RunRecord {
            id,
            profile: profile.to_owned(),
            started,
            finished: None,
            outcome: None,
            report_json: None,
        });
        Ok(id)
    }

    fn finish_run(
        &mut self,
        run: RunId,
        finished: DateTime<Utc>,
        outcome: &str,
        report_json: &str,
    ) -> Result<(), StateError> {
        let r = self
            .runs
            .iter_mut()
            .find(|r| r.id == run)
            .ok_or(StateError::UnknownRun(run))?;
        r.finished = Some(finished);
        r.outcome = Some(outcome.to_owned());
        r.report_json = Some(report_json.to_owned());
        if let Some(retention) = self.retention {
            self.prune(&retention, finished);
        }
        Ok(())
    }

    fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, StateError> {
        Ok(self.runs.iter().rev().take(limit).cloned().collect())
    }

    fn fingerprint(&self) -> Result<u64, StateError> {
        Ok(self.fingerprint)
    }

    fn move_subtrees(&mut self, moves: &[(Anchor, Dn)]) -> Result<Vec<Anchor>, StateError> {
        // Every rewrite is computed (and hashed) first, so a failure changes nothing.
        let mut now: HashMap<Anchor, Dn> = HashMap::new();
        let mut staged: Vec<(Anchor, Entry, u64)> = Vec::new();
        let mut placed: HashMap<Anchor, usize> = HashMap::new();
        for (anchor, to) in moves {
            let from = match (now.get(anchor), placed.get(anchor)) {
                (Some(d), _) => Some(d.clone()),
                (None, Some(&i)) => staged.get(i).and_then(|(_, e, _)| e.dn.clone()),
                (None, None) => self.mirror.get(anchor).and_then(|e| e.dn.clone()),
            };
            now.insert(anchor.clone(), to.clone());
            let Some(from) = from.filter(|f| f != to) else {
                continue;
            };
            let below: Vec<(Anchor, Dn)> = self
                .mirror
                .entries()
                .filter_map(|e| {
                    let current = match placed.get(&e.anchor) {
                        Some(&i) => staged.get(i).and_then(|(_, e, _)| e.dn.clone()),
                        None => e.dn.clone(),
                    }?;
                    Some((e.anchor.clone(), super::rebase_dn(&current, &from, to)?))
                })
                .collect();
            for (a, dn) in below {
                let mut e = match placed.get(&a) {
                    Some(&i) => staged.get(i).map(|(_, e, _)| e.clone()),
                    None => self.mirror.get(&a).cloned(),
                }
                .ok_or_else(|| StateError::Invalid(format!("object {a} vanished")))?;
                e.dn = Some(dn);
                let hash = encode_entry(&e)?.1;
                match placed.get(&a) {
                    Some(&i) => {
                        if let Some(slot) = staged.get_mut(i) {
                            *slot = (a, e, hash);
                        }
                    }
                    None => {
                        placed.insert(a.clone(), staged.len());
                        staged.push((a, e, hash));
                    }
                }
            }
        }
        let mut moved = Vec::with_capacity(staged.len());
        for (a, e, hash) in staged {
            if self.write_entry(&a, Some((e, hash)), None) {
                moved.push(a);
            }
        }
        self.mirror.settle();
        if !moved.is_empty() {
            self.bump();
        }
        moved.sort();
        Ok(moved)
    }

    fn container_bindings(&self) -> Result<crate::delta::ContainerBindings, StateError> {
        Ok(self.containers.clone())
    }

    fn set_container_bindings(
        &mut self,
        bindings: &crate::delta::ContainerBindings,
    ) -> Result<(), StateError> {
        self.containers = bindings.clone();
        Ok(())
    }
}
