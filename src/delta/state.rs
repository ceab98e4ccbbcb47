//! The in-memory views the planner reads: the source mirror, the link table and the target
//! mirror. The engine's state stores load them (or the neighbourhood of a delta) and keep them
//! up to date with [`SourceMirror::apply`], [`Links::record`] and [`TargetMirror::record`].

use std::collections::BTreeSet;

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::connector::TargetOperation;
use crate::model::{
    Anchor, AttrName, AttributeChange, Change, Dn, Entry, ObjectType, Reference, TargetId,
    TargetObject, Value, Values,
};

/// Where a source object is referenced from: the referring object and the attribute.
type Referrers = BTreeSet<(Anchor, AttrName)>;

/// The last imported state of the source: entries by anchor, with a DN index and a reverse
/// reference index (who references whom, for delta neighbourhoods and `ISMEMBEROF`).
///
/// **References are kept by anchor.** A DN reference ([`Reference::Dn`]) naming an object the
/// mirror holds becomes a [`Reference::Anchor`] when its entry is inserted; one naming an object
/// the mirror does not hold (yet) stays a DN — unresolved — and is resolved when an object with
/// that DN arrives: [`SourceMirror::insert`] queues such referrers and [`SourceMirror::settle`]
/// rewrites them, each once (the state stores settle after every batch, so a group that arrives
/// before its 10,000 members is rewritten once per batch, not once per member). Until then an
/// unresolved reference still resolves through the DN index, so reads never depend on it.
///
/// A rename or move changes no reference: referrers hold the anchor. Removing an object removes
/// the references to it from its referrers' entries ([`SourceMirror::delete`] says which), so a
/// DN later taken by another object is never inherited.
#[derive(Debug, Clone, Default)]
pub struct SourceMirror {
    entries: HashMap<Anchor, Entry>,
    by_dn: HashMap<Dn, Anchor>,
    refs_by_anchor: HashMap<Anchor, Referrers>,
    /// Unresolved references, by the DN they name.
    refs_by_dn: HashMap<Dn, Referrers>,
    /// DNs that name a mirrored object while unresolved references to them wait.
    unsettled: BTreeSet<Dn>,
    /// The entries held as context only ([`SourceMirror::is_partial`]).
    partial: HashSet<Anchor>,
    /// Set when [`SourceMirror::dn_of`] was asked for an object the mirror does not hold
    /// (once [`SourceMirror::watch_absent`] made it).
    absent: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

fn references(entry: &Entry) -> impl Iterator<Item = (&AttrName, &Reference)> {
    entry.attributes.iter().flat_map(|(name, values)| {
        values.iter().filter_map(move |v| match v {
            Value::Reference(r) => Some((name, r)),
            _ => None,
        })
    })
}

/// Rewrites the DN references of `values` that `lookup` resolves into anchor references;
/// returns whether one was. The building block of [`resolve_references`].
pub(crate) fn resolve_values<E>(
    values: &mut Values,
    lookup: &mut impl FnMut(&Dn) -> Result<Option<Anchor>, E>,
) -> Result<bool, E> {
    if !values
        .iter()
        .any(|v| matches!(v, Value::Reference(Reference::Dn(_))))
    {
        return Ok(false);
    }
    let mut changed = false;
    let mut error = None;
    values.retain(|v| {
        if error.is_some() {
            return true;
        }
        if let Value::Reference(Reference::Dn(dn)) = v {
            match lookup(dn) {
                Ok(Some(a)) => {
                    *v = Value::Reference(Reference::Anchor(a));
                    changed = true;
                }
                Ok(None) => {}
                Err(e) => error = Some(e),
            }
        }
        true
    });
    match error {
        Some(e) => Err(e),
        None => Ok(changed),
    }
}

/// Rewrites the DN references of `entry` that name the entry itself or that `lookup` resolves
/// into anchor references; returns whether one was.
pub(crate) fn resolve_references<E>(
    entry: &mut Entry,
    mut lookup: impl FnMut(&Dn) -> Result<Option<Anchor>, E>,
) -> Result<bool, E> {
    let (own_dn, own_anchor) = (entry.dn.clone(), entry.anchor.clone());
    let mut lookup = |dn: &Dn| -> Result<Option<Anchor>, E> {
        if own_dn.as_ref() == Some(dn) {
            return Ok(Some(own_anchor.clone()));
        }
        lookup(dn)
    };
    let mut changed = false;
    let names: Vec<AttrName> = entry
        .attributes
        .iter()
        .filter(|(_, vs)| {
            vs.iter()
                .any(|v| matches!(v, Value::Reference(Reference::Dn(_))))
        })
        .map(|(n, _)| n.clone())
        .collect();
    for name in names {
        if let Some(values) = entry.attributes.get_mut(name.as_str()) {
            changed |= resolve_values(values, &mut lookup)?;
        }
    }
    Ok(changed)
}

/// The changes with their DN reference values resolved as [`resolve_references`] does (so a
/// removal by DN finds the anchor the mirror keeps).
pub(crate) fn resolve_change_values<E>(
    changes: &[AttributeChange],
    mut lookup: impl FnMut(&Dn) -> Result<Option<Anchor>, E>,
) -> Result<Vec<AttributeChange>, E> {
    let mut out = changes.to_vec();
    for c in &mut out {
        resolve_values(&mut c.values, &mut lookup)?;
    }
    Ok(out)
}

/// Removes the references to `anchor` from `entry` (an attribute left without values goes);
/// returns whether there were any.
pub(crate) fn remove_references_to(entry: &mut Entry, anchor: &Anchor) -> bool {
    let mut changed = false;
    let names: Vec<AttrName> = entry
        .attributes
        .iter()
        .filter(|(_, vs)| vs.iter().any(|v| is_reference_to(v, anchor)))
        .map(|(n, _)| n.clone())
        .collect();
    for name in names {
        if let Some(values) = entry.attributes.get_mut(name.as_str()) {
            values.retain(|v| !is_reference_to(v, anchor));
            changed = true;
        }
    }
    entry.attributes.prune();
    changed
}

fn is_reference_to(v: &Value, anchor: &Anchor) -> bool {
    matches!(v, Value::Reference(Reference::Anchor(a)) if a == anchor)
}

impl SourceMirror {
    /// An empty mirror.
    pub fn new() -> SourceMirror {
        SourceMirror::default()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the mirror is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of `anchor`.
    pub fn get(&self, anchor: &Anchor) -> Option<&Entry> {
        self.entries.get(anchor)
    }

    /// Whether the entry of `anchor` is held as context only: its anchor, type and DN, and of
    /// its attributes only the references it makes to the objects a plan decides — what
    /// reference translation and `member_of` read of an object the plan does not decide. A
    /// state store's neighbourhood holds such entries for the objects around the planned
    /// ones ([`crate::state::StateStore::load_neighbourhood_light`]); the planner never
    /// decides one: it says it needs the whole entry instead.
    pub fn is_partial(&self, anchor: &Anchor) -> bool {
        !self.partial.is_empty() && self.partial.contains(anchor)
    }

    /// Inserts an entry held as context only ([`SourceMirror::is_partial`]); a later
    /// [`SourceMirror::insert`] of the anchor replaces it with a whole entry.
    pub(crate) fn insert_partial(&mut self, entry: Entry) -> Option<Entry> {
        let anchor = entry.anchor.clone();
        let old = self.insert(entry);
        self.partial.insert(anchor);
        old
    }

    /// The anchor of the entry at `dn`.
    pub fn anchor_of(&self, dn: &Dn) -> Option<&Anchor> {
        self.by_dn.get(dn)
    }

    /// The current DN of the object `anchor`, if the mirror holds it and it has one.
    pub fn dn_of(&self, anchor: &Anchor) -> Option<&Dn> {
        match self.entries.get(anchor) {
            Some(e) => e.dn.as_ref(),
            None => {
                if let Some(a) = &self.absent {
                    a.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                None
            }
        }
    }

    /// From now on, remember whether [`SourceMirror::dn_of`] was asked for an object the
    /// mirror does not hold ([`SourceMirror::asked_absent`]): a mirror holding only the
    /// objects a plan decides, for a projection that reads the others by DN only
    /// ([`Projection::reads_mirror_by_dn`](super::Projection::reads_mirror_by_dn)).
    pub(crate) fn watch_absent(&mut self) {
        self.absent = Some(Default::default());
    }

    /// Whether [`SourceMirror::dn_of`] was asked for an object the mirror does not hold since
    /// [`SourceMirror::watch_absent`].
    pub(crate) fn asked_absent(&self) -> bool {
        self.absent
            .as_ref()
            .is_some_and(|a| a.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Every entry, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Every anchor, in no particular order.
    pub fn anchors(&self) -> impl Iterator<Item = &Anchor> {
        self.entries.keys()
    }

    fn index(&mut self, entry: &Entry) {
        if let Some(dn) = &entry.dn {
            self.by_dn.insert(dn.clone(), entry.anchor.clone());
        }
        for (name, r) in references(entry) {
            let key = (entry.anchor.clone(), name.clone());
            match r {
                Reference::Dn(dn) => {
                    self.refs_by_dn.entry(dn.clone()).or_default().insert(key);
                }
                Reference::Anchor(a) | Reference::Pending(a) => {
                    self.refs_by_anchor
                        .entry(a.clone())
                        .or_default()
                        .insert(key);
                }
                Reference::Target(_) => {}
            }
        }
    }

    fn unindex(&mut self, entry: &Entry) {
        if let Some(dn) = &entry.dn {
            if self.by_dn.get(dn) == Some(&entry.anchor) {
                self.by_dn.remove(dn);
            }
        }
        for (name, r) in references(entry) {
            let key = (entry.anchor.clone(), name.clone());
            let (map_dn, map_anchor) = (&mut self.refs_by_dn, &mut self.refs_by_anchor);
            match r {
                Reference::Dn(dn) => remove_ref(map_dn, dn, &key),
                Reference::Anchor(a) | Reference::Pending(a) => remove_ref(map_anchor, a, &key),
                Reference::Target(_) => {}
            }
        }
    }

    /// Changes the entry of `anchor` in place with `edit`, keeping the indexes right; returns
    /// whether `edit` said it changed something.
    fn rewrite(&mut self, anchor: &Anchor, edit: impl FnOnce(&mut Entry) -> bool) -> bool {
        let Some(mut e) = self.entries.remove(anchor) else {
            return false;
        };
        self.unindex(&e);
        let changed = edit(&mut e);
        self.index(&e);
        self.entries.insert(anchor.clone(), e);
        changed
    }

    /// Resolves the unresolved references to `dn` into references to `anchor` (the object
    /// that holds `dn`), before `dn` stops naming it.
    fn pin(&mut self, dn: &Dn, anchor: &Anchor) -> Vec<Anchor> {
        let Some(set) = self.refs_by_dn.get(dn) else {
            return Vec::new();
        };
        let referrers: BTreeSet<Anchor> = set.iter().map(|(a, _)| a.clone()).collect();
        let mut out = Vec::new();
        for r in referrers {
            let changed = self.rewrite(&r, |e| {
                let Ok(changed) = resolve_references(e, |d| {
                    Ok::<_, std::convert::Infallible>((d == dn).then(|| anchor.clone()))
                });
                changed
            });
            if changed {
                out.push(r);
            }
        }
        out
    }

    /// The anchor `dn` resolves to: the object at `dn`.
    fn lookup(&self, dn: &Dn) -> Option<Anchor> {
        self.by_dn.get(dn).cloned()
    }

    /// `entry` with its DN references resolved against this mirror (and itself).
    pub fn resolved(&self, mut entry: Entry) -> Entry {
        let Ok(_) = resolve_references(&mut entry, |d| {
            Ok::<_, std::convert::Infallible>(self.lookup(d))
        });
        entry
    }

    /// Inserts or replaces an entry, its DN references resolved against the mirror (see the
    /// type's documentation); returns the previous one.
    pub fn insert(&mut self, entry: Entry) -> Option<Entry> {
        let entry = self.resolved(entry);
        let anchor = entry.anchor.clone();
        if !self.partial.is_empty() {
            self.partial.remove(&anchor);
        }
        if let Some(old_dn) = self.dn_of(&anchor).cloned() {
            if entry.dn.as_ref() != Some(&old_dn) && self.by_dn.get(&old_dn) == Some(&anchor) {
                // A rename or move: references still waiting by the old DN meant this object.
                self.pin(&old_dn, &anchor);
            }
        }
        if let Some(dn) = &entry.dn {
            if let Some(holder) = self.by_dn.get(dn).cloned().filter(|h| *h != anchor) {
                // Another object held this DN until now: what waited for it meant that one.
                self.pin(dn, &holder);
            }
        }
        let old = self.entries.remove(&anchor);
        if let Some(old) = &old {
            self.unindex(old);
        }
        self.index(&entry);
        if let Some(dn) = &entry.dn {
            if self.refs_by_dn.contains_key(dn) {
                self.unsettled.insert(dn.clone());
            }
        }
        self.entries.insert(anchor, entry);
        old
    }

    /// Resolves the references that waited for objects inserted since the last call (each
    /// referrer rewritten once); returns the referrers rewritten, sorted.
    pub fn settle(&mut self) -> Vec<Anchor> {
        let mut referrers: BTreeSet<Anchor> = BTreeSet::new();
        for dn in std::mem::take(&mut self.unsettled) {
            if self.by_dn.contains_key(&dn) {
                if let Some(set) = self.refs_by_dn.get(&dn) {
                    referrers.extend(set.iter().map(|(a, _)| a.clone()));
                }
            }
        }
        let mut out = Vec::new();
        for r in referrers {
            let by_dn = &self.by_dn;
            let Some(mut e) = self.entries.get(&r).cloned() else {
                continue;
            };
            let Ok(changed) = resolve_references(&mut e, |d| {
                Ok::<_, std::convert::Infallible>(by_dn.get(d).cloned())
            });
            if changed {
                self.rewrite(&r, |old| {
                    *old = e;
                    true
                });
                out.push(r);
            }
        }
        out
    }

    /// Removes an entry; returns it.
    pub fn remove(&mut self, anchor: &Anchor) -> Option<Entry> {
        self.delete(anchor).map(|(e, _)| e)
    }

    /// Removes an entry and the references to it: returns it, with the referrers whose
    /// entries lost a reference (sorted).
    pub fn delete(&mut self, anchor: &Anchor) -> Option<(Entry, Vec<Anchor>)> {
        if let Some(dn) = self.dn_of(anchor).cloned() {
            if self.by_dn.get(&dn) == Some(anchor) {
                self.pin(&dn, anchor);
            }
        }
        let old = self.entries.remove(anchor)?;
        self.unindex(&old);
        if !self.partial.is_empty() {
            self.partial.remove(anchor);
        }
        let referrers: BTreeSet<Anchor> = self
            .refs_by_anchor
            .get(anchor)
            .map(|set| set.iter().map(|(a, _)| a.clone()).collect())
            .unwrap_or_default();
        let mut stripped = Vec::new();
        for r in referrers {
            if self.rewrite(&r, |e| remove_references_to(e, anchor)) {
                stripped.push(r);
            }
        }
        Some((old, stripped))
    }

    /// Applies a change from a delta import. Modifies and moves of unknown anchors are
    /// ignored and reported by returning `false` (the engine then asks for a full import).
    pub fn apply(&mut self, change: &Change) -> bool {
        let known = match change {
            Change::Add(e) | Change::Replace(e) => {
                self.insert(e.clone());
                true
            }
            Change::Modify {
                anchor, changes, ..
            } => match self.entries.get(anchor).cloned() {
                Some(mut e) => {
                    let Ok(changes) = resolve_change_values(changes, |d| {
                        Ok::<_, std::convert::Infallible>(self.lookup(d))
                    });
                    for c in &changes {
                        // Lenient: a source's change log may repeat what the mirror has.
                        let _ = e.attributes.apply(c, false);
                    }
                    self.insert(e);
                    true
                }
                None => false,
            },
            Change::Move { anchor, new_dn, .. } => match self.entries.get(anchor).cloned() {
                Some(mut e) => {
                    e.dn = Some(new_dn.clone());
                    self.insert(e);
                    true
                }
                None => false,
            },
            Change::Delete { anchor, .. } => {
                self.remove(anchor);
                true
            }
        };
        self.settle();
        known
    }

    /// The objects that reference `anchor` (by anchor, or by its DN while unresolved), with
    /// the attribute.
    pub fn referrers(&self, anchor: &Anchor) -> Vec<(&Anchor, &AttrName)> {
        let mut out: Vec<(&Anchor, &AttrName)> = Vec::new();
        if let Some(set) = self.refs_by_anchor.get(anchor) {
            out.extend(set.iter().map(|(a, n)| (a, n)));
        }
        if let Some(dn) = self.entries.get(anchor).and_then(|e| e.dn.as_ref()) {
            if let Some(set) = self.refs_by_dn.get(dn) {
                out.extend(set.iter().map(|(a, n)| (a, n)));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// The DNs of the objects that list `anchor` in their `member` attribute.
    pub fn member_of(&self, anchor: &Anchor) -> Vec<&Dn> {
        let mut out: Vec<&Dn> = self
            .referrers(anchor)
            .into_iter()
            .filter(|(_, attr)| attr.is("member"))
            .filter_map(|(a, _)| self.entries.get(a).and_then(|e| e.dn.as_ref()))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// [`SourceMirror::resolve`] without cloning the anchor.
    pub(crate) fn resolve_ref<'a>(&'a self, reference: &'a Reference) -> Option<&'a Anchor> {
        match reference {
            Reference::Anchor(a) => Some(a),
            Reference::Dn(dn) => self.by_dn.get(dn),
            Reference::Pending(_) | Reference::Target(_) => None,
        }
    }

    /// The anchor a reference value points at, if the referenced object is in the mirror.
    pub fn resolve(&self, reference: &Reference) -> Option<Anchor> {
        match reference {
            Reference::Anchor(a) => Some(a.clone()),
            Reference::Dn(dn) => self.by_dn.get(dn).cloned(),
            Reference::Pending(_) | Reference::Target(_) => None,
        }
    }
}

fn remove_ref<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Referrers>,
    key: &K,
    referrer: &(Anchor, AttrName),
) {
    if let Some(set) = map.get_mut(key) {
        set.remove(referrer);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

/// A link: the source object of `anchor` is the target object `target_id`. Made by a create or
/// a join, and sticky: a joined link is never re-decided.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Link {
    /// The source object.
    pub anchor: Anchor,
    /// The source object type.
    pub source_type: ObjectType,
    /// The target object.
    pub target_id: TargetId,
    /// The target object type.
    pub target_type: ObjectType,
}

/// The link table: source anchor ↔ target id.
#[derive(Debug, Clone, Default)]
pub struct Links {
    by_anchor: HashMap<Anchor, Link>,
    by_target: HashMap<TargetId, Anchor>,
    counts: HashMap<ObjectType, usize>,
}

impl Links {
    /// No links.
    pub fn new() -> Links {
        Links::default()
    }

    /// The link of `anchor`.
    pub fn get(&self, anchor: &Anchor) -> Option<&Link> {
        self.by_anchor.get(anchor)
    }

    /// The anchor linked to `target_id`.
    pub fn anchor_of(&self, target_id: &TargetId) -> Option<&Anchor> {
        self.by_target.get(target_id)
    }

    /// Adds or replaces a link.
    pub fn insert(&mut self, link: Link) {
        self.remove(&link.anchor);
        if let Some(other) = self.by_target.get(&link.target_id).cloned() {
            self.remove(&other);
        }
        *self.counts.entry(link.target_type.clone()).or_default() += 1;
        self.by_target
            .insert(link.target_id.clone(), link.anchor.clone());
        self.by_anchor.insert(link.anchor.clone(), link);
    }

    /// Removes the link of `anchor`.
    pub fn remove(&mut self, anchor: &Anchor) -> Option<Link> {
        let link = self.by_anchor.remove(anchor)?;
        self.by_target.remove(&link.target_id);
        if let Some(c) = self.counts.get_mut(&link.target_type) {
            *c -= 1;
        }
        Some(link)
    }

    /// Every link, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Link> {
        self.by_anchor.values()
    }

    /// Number of links.
    pub fn len(&self) -> usize {
        self.by_anchor.len()
    }

    /// Whether there are no links.
    pub fn is_empty(&self) -> bool {
        self.by_anchor.is_empty()
    }

    /// Number of links to target objects of `target_type`.
    pub fn count(&self, target_type: &ObjectType) -> usize {
        self.counts.get(target_type).copied().unwrap_or(0)
    }

    /// Records the outcome of an exported operation: a create or join links, a delete or unlink
    /// unlinks.
    pub fn record(&mut self, op: &super::Operation, target_id: Option<&TargetId>) {
        use super::OperationKind as K;
        match (&op.kind, target_id) {
            (K::Create { .. }, Some(id)) | (K::Join { .. }, Some(id)) => self.insert(Link {
                anchor: op.anchor.clone(),
                source_type: op.source_type.clone(),
                target_id: id.clone(),
                target_type: op.target_type.clone(),
            }),
            (K::Join { target_id, .. }, None) => self.insert(Link {
                anchor: op.anchor.clone(),
                source_type: op.source_type.clone(),
                target_id: target_id.clone(),
                target_type: op.target_type.clone(),
            }),
            // Only the link to the object the operation is about: the anchor may be linked to a
            // new object already (a changed target type creates it first).
            (K::Delete { target_id }, _) | (K::Unlink { target_id }, _)
                if self
                    .get(&op.anchor)
                    .is_some_and(|l| l.target_id == *target_id) =>
            {
                self.remove(&op.anchor);
            }
            _ => {}
        }
    }
}

type JoinIndex = HashMap<Value, SmallVec<[TargetId; 1]>>;

/// The last known state of the target: objects by id, with indexes on join attributes.
#[derive(Debug, Clone, Default)]
pub struct TargetMirror {
    objects: HashMap<TargetId, TargetObject>,
    indexes: HashMap<AttrName, JoinIndex>,
}

/// The index key of a value: strings lower-cased (joins compare ignoring case).
fn index_key(v: &Value) -> Value {
    match v {
        Value::String(s) if s.chars().any(char::is_uppercase) => {
            Value::String(s.to_lowercase().into())
        }
        other => other.clone(),
    }
}

impl TargetMirror {
    /// An empty mirror.
    pub fn new() -> TargetMirror {
        TargetMirror::default()
    }

    /// Keeps an index on `attribute` so joins on it cost O(1); returns self (builder style).
    pub fn with_index(mut self, attribute: impl Into<AttrName>) -> TargetMirror {
        self.index_attribute(attribute.into());
        self
    }

    /// Keeps an index on `attribute`.
    pub fn index_attribute(&mut self, attribute: AttrName) {
        if self.indexes.contains_key(&attribute) {
            return;
        }
        let mut index = JoinIndex::default();
        for o in self.objects.values() {
            for v in o.attributes.get(attribute.as_str()).into_iter().flatten() {
                index.entry(index_key(v)).or_default().push(o.id.clone());
            }
        }
        self.indexes.insert(attribute, index);
    }

    /// Number of objects.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether the mirror is empty.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// The object `id`.
    pub fn get(&self, id: &TargetId) -> Option<&TargetObject> {
        self.objects.get(id)
    }

    /// Every object, in no particular order.
    pub fn objects(&self) -> impl Iterator<Item = &TargetObject> {
        self.objects.values()
    }

    fn unindex(&mut self, o: &TargetObject) {
        for (attr, index) in self.indexes.iter_mut() {
            for v in o.attributes.get(attr.as_str()).into_iter().flatten() {
                let key = index_key(v);
                if let Some(ids) = index.get_mut(&key) {
                    ids.retain(|id| *id != o.id);
                    if ids.is_empty() {
                        index.remove(&key);
                    }
                }
            }
        }
    }

    /// Inserts or replaces an object.
    pub fn insert(&mut self, object: TargetObject) {
        if let Some(old) = self.objects.remove(&object.id) {
            self.unindex(&old);
        }
        for (attr, index) in self.indexes.iter_mut() {
            for v in object.attributes.get(attr.as_str()).into_iter().flatten() {
                index
                    .entry(index_key(v))
                    .or_default()
                    .push(object.id.clone());
            }
        }
        self.objects.insert(object.id.clone(), object);
    }

    /// Removes an object.
    pub fn remove(&mut self, id: &TargetId) -> Option<TargetObject> {
        let old = self.objects.remove(id)?;
        self.unindex(&old);
        Some(old)
    }

    /// The ids of the objects of `object_type` whose `attribute` has `value` (strings compared
    /// ignoring case), sorted. Uses the index when there is one, else scans.
    pub fn find(
        &self,
        object_type: &ObjectType,
        attribute: &AttrName,
        value: &Value,
    ) -> Vec<TargetId> {
        let key = index_key(value);
        let mut out: Vec<TargetId> = match self.indexes.get(attribute) {
            Some(index) => index
                .get(&key)
                .map(|ids| ids.iter().cloned().collect())
                .unwrap_or_default(),
            None => self
                .objects
                .values()
                .filter(|o| {
                    o.attributes
                        .get(attribute.as_str())
                        .is_some_and(|vs| vs.iter().any(|v| index_key(v) == key))
                })
                .map(|o| o.id.clone())
                .collect(),
        };
        out.retain(|id| {
            self.objects
                .get(id)
                .is_some_and(|o| o.object_type == *object_type)
        });
        out.sort();
        out.dedup();
        out
    }

    /// Records an applied target operation: the object is created, changed or removed here as
    /// the target did. `id` is the id the target reported.
    pub fn record(&mut self, op: &TargetOperation, id: &TargetId) {
        match op {
            TargetOperation::Create {
                object_type,
                attributes,
            } => self.insert(TargetObject {
                id: id.clone(),
                object_type: object_type.clone(),
                attributes: attributes.clone(),
            }),
            TargetOperation::Update { changes, .. } => {
                if let Some(mut o) = self.objects.get(id).cloned() {
                    for c in changes {
                        let _ = o.attributes.apply(c, false);
                    }
                    self.insert(o);
                }
            }
            TargetOperation::Delete { .. } => {
                self.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::values;

    fn dn(s: &str) -> Dn {
        Dn::parse(s).unwrap()
    }

    #[test]
    fn mirror_indexes_dns_and_referrers() {
        let mut m = SourceMirror::new();
        m.insert(Entry::new("u1", "user").with_dn(dn("cn=Ann,ou=p,dc=x")));
        m.insert(
            Entry::new("g1", "group")
                .with_dn(dn("cn=Staff,ou=g,dc=x"))
                .with("member", Value::dn_ref(dn("CN=ann, OU=p,DC=x"))),
        );
        m.insert(Entry::new("g2", "group").with("owner", Value::anchor_ref("u1")));
        assert_eq!(
            m.anchor_of(&dn("cn=ann,ou=p,dc=x")).map(|a| a.as_str()),
            Some("u1")
        );
        let r: Vec<_> = m
            .referrers(&"u1".into())
            .into_iter()
            .map(|(a, n)| (a.as_str(), n.as_str()))
            .collect();
        assert_eq!(r, [("g1", "member"), ("g2", "owner")]);
        assert_eq!(m.member_of(&"u1".into()), [&dn("cn=staff,ou=g,dc=x")]);
        // Removing the group removes its references.
        m.remove(&"g1".into());
        assert_eq!(m.referrers(&"u1".into()).len(), 1);
        assert!(m.member_of(&"u1".into()).is_empty());
    }

    fn refs(m: &SourceMirror, anchor: &str, attr: &str) -> Vec<Value> {
        m.get(&anchor.into())
            .and_then(|e| e.attributes.get(attr))
            .map(|v| v.to_vec())
            .unwrap_or_default()
    }

    #[test]
    fn references_resolve_whatever_the_order() {
        let boss = || Entry::new("b", "user").with_dn(dn("cn=Boss,dc=x"));
        let report = || {
            Entry::new("r", "user")
                .with_dn(dn("cn=Report,dc=x"))
                .with("manager", Value::dn_ref(dn("CN=boss,DC=x")))
        };
        let group = || {
            Entry::new("g", "group")
                .with_dn(dn("cn=G,dc=x"))
                .with("member", Value::dn_ref(dn("cn=Report,dc=x")))
                .with("member", Value::dn_ref(dn("cn=Boss,dc=x")))
                .with("member", Value::dn_ref(dn("cn=G,dc=x")))
                .with("member", Value::dn_ref(dn("cn=Nobody,dc=x")))
        };
        let want_group = [
            Value::anchor_ref("r"),
            Value::anchor_ref("b"),
            Value::anchor_ref("g"),
            Value::dn_ref(dn("cn=Nobody,dc=x")),
        ];
        // Every order: the referenced object before, after, or in between.
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]] {
            let mut m = SourceMirror::new();
            for i in order {
                m.insert([boss(), report(), group()][i].clone());
            }
            // Before settling, a reference waiting by DN still resolves through the index.
            let r = m
                .get(&"r".into())
                .unwrap()
                .attributes
                .first("manager")
                .cloned();
            let Some(Value::Reference(r)) = r else {
                panic!("manager")
            };
            assert_eq!(m.resolve(&r), Some("b".into()));
            let rewritten = m.settle();
            assert!(rewritten.len() <= 2, "{rewritten:?}");
            assert_eq!(
                refs(&m, "r", "manager"),
                [Value::anchor_ref("b")],
                "{order:?}"
            );
            assert_eq!(refs(&m, "g", "member"), want_group, "{order:?}");
            assert_eq!(m.member_of(&"b".into()), [&dn("cn=g,dc=x")]);
            assert!(m.settle().is_empty(), "settled once");
        }
    }

    #[test]
    fn a_group_waiting_for_many_members_is_rewritten_once() {
        let mut m = SourceMirror::new();
        let mut g = Entry::new("g", "group");
        for i in 0..200 {
            g.attributes
                .add("member", Value::dn_ref(dn(&format!("cn=u{i},dc=x"))));
        }
        m.insert(g);
        for i in 0..200 {
            m.insert(Entry::new(format!("u{i}"), "user").with_dn(dn(&format!("cn=u{i},dc=x"))));
        }
        assert_eq!(m.settle(), [Anchor::from("g")]);
        assert_eq!(m.referrers(&"u7".into()).len(), 1);
        assert!(refs(&m, "g", "member")
            .iter()
            .all(|v| matches!(v, Value::Reference(Reference::Anchor(_)))));
    }

    #[test]
    fn renames_keep_references_and_deletes_remove_them() {
        let mut m = SourceMirror::new();
        m.insert(Entry::new("b", "user").with_dn(dn("cn=Boss,ou=a,dc=x")));
        m.insert(
            Entry::new("r", "user")
                .with_dn(dn("cn=Report,ou=a,dc=x"))
                .with("manager", Value::dn_ref(dn("cn=Boss,ou=a,dc=x"))),
        );
        m.insert(
            Entry::new("g", "group")
                .with_dn(dn("cn=G,dc=x"))
                .with("member", Value::dn_ref(dn("cn=Boss,ou=a,dc=x")))
                .with("member", Value::dn_ref(dn("cn=Report,ou=a,dc=x"))),
        );
        // Rename and move.
        assert!(m.apply(&Change::Move {
            anchor: "b".into(),
            object_type: "user".into(),
            new_dn: dn("cn=Chief,ou=b,dc=x"),
        }));
        assert_eq!(refs(&m, "r", "manager"), [Value::anchor_ref("b")]);
        assert_eq!(m.member_of(&"b".into()), [&dn("cn=G,dc=x")]);
        assert_eq!(m.dn_of(&"b".into()), Some(&dn("cn=chief,ou=b,dc=x")));
        // A change removing a member by its current DN finds the anchor.
        assert!(m.apply(&Change::Modify {
            anchor: "g".into(),
            object_type: "group".into(),
            changes: vec![crate::model::AttributeChange::remove(
                "member",
                values([Value::dn_ref(dn("cn=Report,ou=a,dc=x"))]),
            )],
        }));
        assert_eq!(refs(&m, "g", "member"), [Value::anchor_ref("b")]);
        assert!(m.member_of(&"r".into()).is_empty());
        // Delete: the references go, the referrers are named.
        let (_, stripped) = m.delete(&"b".into()).unwrap();
        assert_eq!(stripped, [Anchor::from("g"), Anchor::from("r")]);
        assert!(refs(&m, "r", "manager").is_empty());
        assert!(m
            .get(&"g".into())
            .unwrap()
            .attributes
            .get("member")
            .is_none());
        assert!(m.referrers(&"b".into()).is_empty());
        // Reuse of either DN inherits nothing.
        m.insert(Entry::new("b2", "user").with_dn(dn("cn=Chief,ou=b,dc=x")));
        m.insert(Entry::new("b3", "user").with_dn(dn("cn=Boss,ou=a,dc=x")));
        m.settle();
        assert!(m.referrers(&"b2".into()).is_empty());
        assert!(m.referrers(&"b3".into()).is_empty());
        assert!(refs(&m, "r", "manager").is_empty());
    }

    #[test]
    fn an_unsettled_reference_follows_its_object_through_a_rename_or_delete() {
        // The group arrives first, then its member; the member is renamed (or deleted) before
        // anything settles: the group references the member, not its old DN.
        for delete in [false, true] {
            let mut m = SourceMirror::new();
            m.insert(Entry::new("g", "group").with("member", Value::dn_ref(dn("cn=A,dc=x"))));
            m.insert(Entry::new("a", "user").with_dn(dn("cn=A,dc=x")));
            if delete {
                m.remove(&"a".into());
            } else {
                m.insert(Entry::new("a", "user").with_dn(dn("cn=A2,dc=x")));
            }
            m.insert(Entry::new("z", "user").with_dn(dn("cn=A,dc=x")));
            m.settle();
            let want = if delete {
                vec![]
            } else {
                vec![Value::anchor_ref("a")]
            };
            assert_eq!(refs(&m, "g", "member"), want, "delete: {delete}");
            assert!(m.referrers(&"z".into()).is_empty());
        }
    }

    #[test]
    fn links_count_by_type_and_stay_one_to_one() {
        let mut l = Links::new();
        let link = |a: &str, t: &str| Link {
            anchor: a.into(),
            source_type: "user".into(),
            target_id: t.into(),
            target_type: "User".into(),
        };
        l.insert(link("a", "1"));
        l.insert(link("b", "2"));
        assert_eq!(l.count(&"user".into()), 2);
        // Re-linking target 1 to another anchor drops the old link.
        l.insert(link("c", "1"));
        assert_eq!(l.len(), 2);
        assert!(l.get(&"a".into()).is_none());
        assert_eq!(l.anchor_of(&"1".into()).map(|a| a.as_str()), Some("c"));
        l.remove(&"c".into());
        assert_eq!(l.count(&"User".into()), 1);
    }

    #[test]
    fn target_find_uses_index_or_scan_ignoring_case() {
        let mut t = TargetMirror::new();
        t.insert(TargetObject::new("1", "User").with("userName", "Ann@X"));
        t.insert(TargetObject::new("2", "Group").with("userName", "ann@x"));
        let scan = t.find(&"user".into(), &"username".into(), &Value::string("ANN@x"));
        t.index_attribute("userName".into());
        let indexed = t.find(&"user".into(), &"username".into(), &Value::string("ANN@x"));
        assert_eq!(scan, indexed);
        assert_eq!(indexed, [TargetId::from("1")]);
        t.record(
            &TargetOperation::Update {
                id: "1".into(),
                object_type: "User".into(),
                changes: vec![crate::model::AttributeChange::replace(
                    "userName",
                    values(["b@x"]),
                )],
            },
            &"1".into(),
        );
        assert!(t
            .find(&"user".into(), &"userName".into(), &Value::string("ann@x"))
            .is_empty());
        assert_eq!(
            t.find(&"user".into(), &"userName".into(), &Value::string("B@X"))
                .len(),
            1
        );
    }
}
