//! The heads of a SQLite store's source objects, in memory: each object's anchor, type, DN
//! and link, compact, so the context of a plan (the managers a page's users reference, the
//! members of its groups) and the links of its objects are found without a random read of
//! the file each.
//!
//! [`SqliteStore`](super::SqliteStore) builds the index when the plans it serves have read
//! enough heads from the file to pay for it, keeps it up to date from a log its own writes
//! fill (temporary triggers: every statement of this connection that changes a source
//! object's head or a link is seen, whichever function ran it), and drops it when another
//! connection changes the file.
//!
//! A transaction that writes source objects sees the index as of its start through
//! [`TxHeads`], which lays the heads the transaction wrote over it (the index itself takes them
//! in from the log once the transaction committed; a transaction rolled back leaves it as it
//! was).
//!
//! Pure data structures: no I/O. About 48 bytes a slot plus the texts (anchor, DN, target id)
//! and two hash tables of slot numbers.

use std::hash::BuildHasher;

use hashbrown::HashTable;
use rustc_hash::{FxBuildHasher, FxHashMap};
use smallvec::SmallVec;

use crate::delta::Link;
use crate::model::{Anchor, ObjectType};

/// A text in [`Heads::text`]: offset (40 bits) and length (24 bits).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Span(u64);

impl Span {
    const NONE: Span = Span(u64::MAX);
    const MAX_LEN: usize = (1 << 24) - 1;
    const MAX_AT: usize = (1 << 40) - 1;

    fn at(self) -> usize {
        (self.0 >> 24) as usize
    }

    fn len(self) -> usize {
        (self.0 & 0xFF_FFFF) as usize
    }
}

/// No type: the slot has no source object (only a link) or no link.
const NO_TYPE: u16 = u16::MAX;

/// One anchor: its source object's head, its link, or both.
#[derive(Clone, Copy)]
struct Slot {
    anchor: Span,
    /// The source object's DN ([`Span::NONE`]: none, or no source object).
    dn: Span,
    /// `source_objects.dn_key` (the hash of the normalized DN).
    dn_key: i64,
    /// The source object's row id (`source_objects.id`).
    id: i64,
    /// The link's target id ([`Span::NONE`]: not linked).
    target: Span,
    /// The source object's type ([`NO_TYPE`]: no source object).
    object_type: u16,
    /// The link's source and target types.
    link_source_type: u16,
    link_target_type: u16,
}

impl Slot {
    fn has_source(&self) -> bool {
        self.object_type != NO_TYPE
    }

    fn has_link(&self) -> bool {
        self.target != Span::NONE
    }
}

const _: () = assert!(std::mem::size_of::<Slot>() <= 48);

/// A source object's head as the index holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head<'h> {
    pub anchor: &'h str,
    pub object_type: &'h ObjectType,
    /// The DN as stored (spelled as the source gave it).
    pub dn: Option<&'h str>,
    /// The row id (`source_objects.id`).
    pub id: i64,
}

/// Source object heads and links by anchor, and heads by `dn_key`.
#[derive(Default)]
pub(crate) struct Heads {
    /// The texts one after the other (sliced at the bounds the spans give: whole `&str`s were
    /// pushed, so a slice is at character bounds and needs no check of its bytes).
    text: String,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Slot numbers by the hash of the anchor.
    by_anchor: HashTable<u32>,
    /// Slot numbers of the source objects with a DN, by the hash of their `dn_key`.
    by_dn: HashTable<u32>,
    types: Vec<ObjectType>,
    /// By the type's spelling (an [`ObjectType`] compares ignoring case; the index keeps the
    /// spelling it was given).
    type_ids: FxHashMap<String, u16>,
    /// Bytes of `text` no slot uses any more.
    garbage: usize,
}

/// A source object's head to hold: its row id, its type, and its DN as stored with the DN's
/// `dn_key` (`None`: no DN).
pub(crate) type NewHead<'a> = (i64, &'a ObjectType, Option<(&'a str, i64)>);

/// Why a head cannot be held: a text or a count beyond what the index can address. The store
/// then reads from the file, as without the index.
#[derive(Debug)]
pub(crate) struct TooLarge;

fn hash_str(s: &str) -> u64 {
    FxBuildHasher.hash_one(s)
}

fn hash_key(k: i64) -> u64 {
    FxBuildHasher.hash_one(k)
}

impl Heads {
    /// The number of source objects and links held (one per anchor).
    pub(crate) fn len(&self) -> usize {
        self.by_anchor.len()
    }

    fn str_of(&self, s: Span) -> &str {
        if s == Span::NONE {
            return "";
        }
        self.text.get(s.at()..s.at() + s.len()).unwrap_or("")
    }

    fn push(&mut self, s: &str) -> Result<Span, TooLarge> {
        let at = self.text.len();
        // (`at` below `MAX_AT`: a span at it could be `NONE`.)
        if s.len() > Span::MAX_LEN || at >= Span::MAX_AT {
            return Err(TooLarge);
        }
        self.text.push_str(s);
        Ok(Span(((at as u64) << 24) | s.len() as u64))
    }

    fn drop_text(&mut self, s: Span) {
        if s != Span::NONE {
            self.garbage += s.len();
        }
    }

    fn type_id(&mut self, t: &ObjectType) -> Result<u16, TooLarge> {
        if let Some(id) = self.type_ids.get(t.as_str()) {
            return Ok(*id);
        }
        let id = u16::try_from(self.types.len())
            .ok()
            .filter(|id| *id < NO_TYPE)
            .ok_or(TooLarge)?;
        self.types.push(t.clone());
        self.type_ids.insert(t.as_str().to_owned(), id);
        Ok(id)
    }

    fn find(&self, anchor: &str) -> Option<u32> {
        self.by_anchor
            .find(hash_str(anchor), |&i| {
                self.str_of(self.slots[i as usize].anchor) == anchor
            })
            .copied()
    }

    /// The slot of `anchor`, made if it has none.
    fn slot_for(&mut self, anchor: &str) -> Result<u32, TooLarge> {
        if let Some(i) = self.find(anchor) {
            return Ok(i);
        }
        let span = self.push(anchor)?;
        let slot = Slot {
            anchor: span,
            dn: Span::NONE,
            dn_key: 0,
            id: 0,
            target: Span::NONE,
            object_type: NO_TYPE,
            link_source_type: NO_TYPE,
            link_target_type: NO_TYPE,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                let i = u32::try_from(self.slots.len()).map_err(|_| TooLarge)?;
                self.slots.push(slot);
                i
            }
        };
        let slots = &self.slots;
        let text = &self.text;
        self.by_anchor.insert_unique(hash_str(anchor), i, |&j| {
            let s = slots[j as usize].anchor;
            hash_str(text.get(s.at()..s.at() + s.len()).unwrap_or(""))
        });
        Ok(i)
    }

    /// Frees slot `i` if it holds neither a source object nor a link.
    fn release_if_empty(&mut self, i: u32) {
        let slot = self.slots[i as usize];
        if slot.has_source() || slot.has_link() {
            return;
        }
        let h = hash_str(self.str_of(slot.anchor));
        if let Ok(e) = self.by_anchor.find_entry(h, |&j| j == i) {
            e.remove();
        }
        self.drop_text(slot.anchor);
        self.free.push(i);
    }

    fn unindex_dn(&mut self, i: u32) {
        let slot = self.slots[i as usize];
        if slot.dn == Span::NONE {
            return;
        }
        if let Ok(e) = self.by_dn.find_entry(hash_key(slot.dn_key), |&j| j == i) {
            e.remove();
        }
    }

    /// Sets (or, `None`, removes) the head of the source object `anchor`: its row id, its type,
    /// its DN as stored and the DN's `dn_key`.
    pub(crate) fn set_source(
        &mut self,
        anchor: &str,
        head: Option<NewHead<'_>>,
    ) -> Result<(), TooLarge> {
        let i = match (self.find(anchor), head) {
            (None, None) => return Ok(()),
            (Some(i), _) => i,
            (None, Some(_)) => self.slot_for(anchor)?,
        };
        self.unindex_dn(i);
        let old = self.slots[i as usize];
        self.drop_text(old.dn);
        let slot = &mut self.slots[i as usize];
        slot.dn = Span::NONE;
        slot.object_type = NO_TYPE;
        let Some((id, object_type, dn)) = head else {
            self.release_if_empty(i);
            return Ok(());
        };
        let t = self.type_id(object_type)?;
        self.slots[i as usize].object_type = t;
        self.slots[i as usize].id = id;
        if let Some((dn, key)) = dn {
            let span = self.push(dn)?;
            let slot = &mut self.slots[i as usize];
            slot.dn = span;
            slot.dn_key = key;
            let slots = &self.slots;
            self.by_dn
                .insert_unique(hash_key(key), i, |&j| hash_key(slots[j as usize].dn_key));
        }
        Ok(())
    }

    /// Sets (or, `None`, removes) the link of `anchor`.
    pub(crate) fn set_link(
        &mut self,
        anchor: &str,
        link: Option<(&ObjectType, &str, &ObjectType)>,
    ) -> Result<(), TooLarge> {
        let i = match (self.find(anchor), link) {
            (None, None) => return Ok(()),
            (Some(i), _) => i,
            (None, Some(_)) => self.slot_for(anchor)?,
        };
        let old = self.slots[i as usize];
        self.drop_text(old.target);
        self.slots[i as usize].target = Span::NONE;
        let Some((source_type, target_id, target_type)) = link else {
            self.release_if_empty(i);
            return Ok(());
        };
        let s = self.type_id(source_type)?;
        let t = self.type_id(target_type)?;
        let span = self.push(target_id)?;
        let slot = &mut self.slots[i as usize];
        slot.target = span;
        slot.link_source_type = s;
        slot.link_target_type = t;
        Ok(())
    }

    fn head_of(&self, i: u32) -> Option<Head<'_>> {
        let slot = &self.slots[i as usize];
        slot.has_source().then(|| Head {
            anchor: self.str_of(slot.anchor),
            object_type: &self.types[slot.object_type as usize],
            dn: (slot.dn != Span::NONE).then(|| self.str_of(slot.dn)),
            id: slot.id,
        })
    }

    /// The head of the source object `anchor`, if the store holds it.
    pub(crate) fn head(&self, anchor: &str) -> Option<Head<'_>> {
        self.head_of(self.find(anchor)?)
    }

    /// The heads of the source objects whose `dn_key` is `key` (the caller compares the DNs).
    pub(crate) fn heads_at_key(&self, key: i64) -> impl Iterator<Item = Head<'_>> + '_ {
        self.by_dn
            .iter_hash(hash_key(key))
            .filter(move |&&i| self.slots[i as usize].dn_key == key)
            .filter_map(|&i| self.head_of(i))
    }

    /// The link of `anchor`, if it has one.
    pub(crate) fn link(&self, anchor: &str) -> Option<Link> {
        let slot = &self.slots[self.find(anchor)? as usize];
        slot.has_link().then(|| Link {
            anchor: Anchor::new(self.str_of(slot.anchor)),
            source_type: self.types[slot.link_source_type as usize].clone(),
            target_id: self.str_of(slot.target).into(),
            target_type: self.types[slot.link_target_type as usize].clone(),
        })
    }

    /// Whether the texts no slot uses outweigh those in use (time to build afresh).
    pub(crate) fn is_wasteful(&self) -> bool {
        self.garbage > 1 << 20 && self.garbage > self.text.len() / 2
    }

    /// The bytes the index takes, about.
    pub(crate) fn bytes(&self) -> usize {
        self.text.capacity()
            + self.slots.capacity() * std::mem::size_of::<Slot>()
            + (self.by_anchor.capacity() + self.by_dn.capacity()) * 5
    }
}

/// A source object's head as a transaction wrote it (see [`TxHeads`]).
struct Written {
    id: i64,
    object_type: ObjectType,
    dn: Option<(Box<str>, i64)>,
}

/// The heads of the source objects as a transaction that writes them sees them: the index as
/// of the transaction's start, and over it the heads the transaction wrote since (each write
/// told with [`TxHeads::write`]). Kept for one transaction: the index takes the writes in from
/// its log once the transaction has committed.
pub(crate) struct TxHeads<'h> {
    base: &'h Heads,
    /// The anchors whose head the transaction wrote: the head now (`None`: deleted).
    written: FxHashMap<Box<str>, Option<Written>>,
    /// The anchors the transaction wrote with a DN, by `dn_key` (an anchor written again under
    /// another key stays listed under the old one; [`TxHeads::heads_at_key`] checks).
    by_dn: FxHashMap<i64, SmallVec<[Box<str>; 1]>>,
}

impl<'h> TxHeads<'h> {
    /// The index `base` as of the transaction's start, nothing written yet.
    pub(crate) fn new(base: &'h Heads) -> TxHeads<'h> {
        TxHeads {
            base,
            written: FxHashMap::default(),
            by_dn: FxHashMap::default(),
        }
    }

    fn written_head<'a>(anchor: &'a str, w: &'a Written) -> Head<'a> {
        Head {
            anchor,
            object_type: &w.object_type,
            dn: w.dn.as_ref().map(|(d, _)| &**d),
            id: w.id,
        }
    }

    /// The head of the source object `anchor`, if there is one now.
    pub(crate) fn head(&self, anchor: &str) -> Option<Head<'_>> {
        match self.written.get_key_value(anchor) {
            Some((a, w)) => w.as_ref().map(|w| Self::written_head(a, w)),
            None => self.base.head(anchor),
        }
    }

    /// The heads of the source objects whose `dn_key` is `key` now (the caller compares the
    /// DNs).
    pub(crate) fn heads_at_key(&self, key: i64) -> impl Iterator<Item = Head<'_>> + '_ {
        let base = self
            .base
            .heads_at_key(key)
            .filter(|h| !self.written.contains_key(h.anchor));
        let written = self
            .by_dn
            .get(&key)
            .into_iter()
            .flatten()
            .filter_map(move |a| {
                let (a, w) = self.written.get_key_value(&**a)?;
                let w = w.as_ref()?;
                (w.dn.as_ref().map(|(_, k)| *k) == Some(key)).then(|| Self::written_head(a, w))
            });
        base.chain(written)
    }

    /// Tells that the transaction wrote the head of `anchor` (`None`: deleted it).
    pub(crate) fn write(&mut self, anchor: &str, head: Option<NewHead<'_>>) {
        let head = head.map(|(id, object_type, dn)| Written {
            id,
            object_type: object_type.clone(),
            dn: dn.map(|(d, k)| (Box::from(d), k)),
        });
        if let Some(key) = head.as_ref().and_then(|h| h.dn.as_ref()).map(|(_, k)| *k) {
            let listed = self.by_dn.entry(key).or_default();
            if !listed.iter().any(|a| &**a == anchor) {
                listed.push(Box::from(anchor));
            }
        }
        match self.written.get_mut(anchor) {
            Some(w) => *w = head,
            None => {
                self.written.insert(Box::from(anchor), head);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A source object's head: row id, type, DN and key.
    type ModelHead = (i64, String, Option<(String, i64)>);
    type Model = BTreeMap<String, (Option<ModelHead>, Option<Link>)>;

    /// A pseudo-random walk (xorshift).
    fn walk(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// A random head for step `step` (about one in seven without a DN; eight keys for all).
    fn random_head(step: usize, r: u64) -> ModelHead {
        let t = if r % 2 == 0 { "user" } else { "group" };
        let dn = (r % 7 != 0).then(|| (format!("CN=U{step},DC=x"), (r % 8) as i64));
        (step as i64 + 1, t.to_owned(), dn)
    }

    fn new_head(h: &ModelHead) -> NewHead<'_> {
        // (A test's types: leaked, a few bytes each.)
        let t: &'static ObjectType = Box::leak(Box::new(ObjectType::from(h.1.as_str())));
        (h.0, t, h.2.as_ref().map(|(d, k)| (d.as_str(), *k)))
    }

    fn check(h: &Heads, model: &Model) {
        let live = model
            .values()
            .filter(|(s, l)| s.is_some() || l.is_some())
            .count();
        assert_eq!(h.len(), live);
        for (a, (s, l)) in model {
            let head = h.head(a);
            match s {
                None => assert!(head.is_none(), "{a}"),
                Some((id, t, dn)) => {
                    let head = head.unwrap();
                    assert_eq!(head.anchor, a);
                    assert_eq!(head.id, *id);
                    assert_eq!(head.object_type.as_str(), t);
                    assert_eq!(head.dn, dn.as_ref().map(|(d, _)| d.as_str()));
                    if let Some((d, k)) = dn {
                        assert!(h
                            .heads_at_key(*k)
                            .any(|x| x.anchor == a && x.dn == Some(d.as_str())));
                    }
                }
            }
            let got = h.link(a);
            assert_eq!(&got, l, "{a}");
            // Spelled as given (types compare ignoring case).
            let spelled = |l: &Option<Link>| {
                l.as_ref().map(|l| {
                    (
                        l.source_type.as_str().to_owned(),
                        l.target_id.as_str().to_owned(),
                        l.target_type.as_str().to_owned(),
                    )
                })
            };
            assert_eq!(spelled(&got), spelled(l), "{a}");
        }
    }

    /// A long random walk of sets and removals against a plain map: the index answers as the
    /// map does, keys colliding on purpose (eight `dn_key`s for all).
    #[test]
    fn the_index_answers_as_a_map_through_sets_and_removals() {
        let mut h = Heads::default();
        let mut model: Model = BTreeMap::new();
        let mut next = walk(7);
        for step in 0..60_000 {
            let a = format!("anchor-{}", next() % 3000);
            let r = next();
            let entry = model.entry(a.clone()).or_default();
            match r % 5 {
                0 | 1 => {
                    let head = random_head(step, r);
                    h.set_source(&a, Some(new_head(&head))).unwrap();
                    entry.0 = Some(head);
                }
                2 => {
                    h.set_source(&a, None).unwrap();
                    entry.0 = None;
                }
                3 => {
                    let link = Link {
                        anchor: Anchor::new(&a),
                        source_type: "user".into(),
                        target_id: format!("t-{step}").into(),
                        target_type: "User".into(),
                    };
                    h.set_link(
                        &a,
                        Some((
                            &link.source_type,
                            link.target_id.as_str(),
                            &link.target_type,
                        )),
                    )
                    .unwrap();
                    entry.1 = Some(link);
                }
                _ => {
                    h.set_link(&a, None).unwrap();
                    entry.1 = None;
                }
            }
            if step % 10_000 == 0 {
                check(&h, &model);
            }
        }
        check(&h, &model);
        // Freed slots are used again: the slots stay about the live anchors.
        assert!(h.slots.len() <= 3000, "{}", h.slots.len());
        assert!(h.bytes() > 0);
    }

    /// A transaction's view answers as the index would with the transaction's writes in it:
    /// heads written, rewritten under another DN key, deleted and written again, over an index
    /// of 2,000 heads (eight keys for all, so most lookups mix the two); the index itself is
    /// left as it was.
    #[test]
    fn a_transactions_view_lays_its_writes_over_the_index() {
        let mut h = Heads::default();
        let mut model: BTreeMap<String, Option<ModelHead>> = BTreeMap::new();
        let mut next = walk(11);
        for i in 0..2000 {
            let a = format!("anchor-{i}");
            let head = random_head(i, next());
            h.set_source(&a, Some(new_head(&head))).unwrap();
            model.insert(a, Some(head));
        }
        let before = model.clone();
        let mut tx = TxHeads::new(&h);
        let check = |tx: &TxHeads<'_>, model: &BTreeMap<String, Option<ModelHead>>| {
            for (a, m) in model {
                let got = tx.head(a).map(|h| {
                    (
                        h.id,
                        h.object_type.as_str().to_owned(),
                        h.dn.map(str::to_owned),
                    )
                });
                let want = m
                    .as_ref()
                    .map(|(id, t, dn)| (*id, t.clone(), dn.as_ref().map(|(d, _)| d.clone())));
                assert_eq!(got, want, "{a}");
            }
            for key in 0..8 {
                let mut got: Vec<(String, i64)> = tx
                    .heads_at_key(key)
                    .map(|h| (h.anchor.to_owned(), h.id))
                    .collect();
                got.sort();
                let want: Vec<(String, i64)> = model
                    .iter()
                    .filter_map(|(a, m)| {
                        let (id, _, dn) = m.as_ref()?;
                        (dn.as_ref()?.1 == key).then(|| (a.clone(), *id))
                    })
                    .collect();
                assert_eq!(got, want, "key {key}");
            }
        };
        for step in 0..6000 {
            // Old anchors and new ones.
            let a = format!("anchor-{}", next() % 3000);
            let r = next();
            if r % 4 == 0 {
                tx.write(&a, None);
                model.insert(a, None);
            } else {
                let head = random_head(10_000 + step, r);
                tx.write(&a, Some(new_head(&head)));
                model.insert(a, Some(head));
            }
            if step % 1000 == 0 {
                check(&tx, &model);
            }
        }
        check(&tx, &model);
        drop(tx);
        // The index is as it was.
        check(&TxHeads::new(&h), &before);
    }
}
