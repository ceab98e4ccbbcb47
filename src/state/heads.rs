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
//! Pure data structure: no I/O. About 40 bytes a slot plus the texts (anchor, DN, target id)
//! and two hash tables of slot numbers.

use std::hash::BuildHasher;

use hashbrown::HashTable;
use rustc_hash::{FxBuildHasher, FxHashMap};

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

const _: () = assert!(std::mem::size_of::<Slot>() <= 40);

/// A source object's head as the index holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head<'h> {
    pub anchor: &'h str,
    pub object_type: &'h ObjectType,
    /// The DN as stored (spelled as the source gave it).
    pub dn: Option<&'h str>,
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

    /// Sets (or, `None`, removes) the head of the source object `anchor`: its type, its DN as
    /// stored and the DN's `dn_key`.
    pub(crate) fn set_source(
        &mut self,
        anchor: &str,
        head: Option<(&ObjectType, Option<(&str, i64)>)>,
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
        let Some((object_type, dn)) = head else {
            self.release_if_empty(i);
            return Ok(());
        };
        let t = self.type_id(object_type)?;
        self.slots[i as usize].object_type = t;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    type Model = BTreeMap<String, (Option<(String, Option<(String, i64)>)>, Option<Link>)>;

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
                Some((t, dn)) => {
                    let head = head.unwrap();
                    assert_eq!(head.anchor, a);
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
        let mut x: u64 = 7;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for step in 0..60_000 {
            let a = format!("anchor-{}", next() % 3000);
            let r = next();
            let entry = model.entry(a.clone()).or_default();
            match r % 5 {
                0 | 1 => {
                    let t = if r % 2 == 0 { "user" } else { "group" };
                    let dn = (r % 7 != 0).then(|| (format!("CN=U{step},DC=x"), (r % 8) as i64));
                    h.set_source(
                        &a,
                        Some((
                            &ObjectType::from(t),
                            dn.as_ref().map(|(d, k)| (d.as_str(), *k)),
                        )),
                    )
                    .unwrap();
                    entry.0 = Some((t.to_owned(), dn));
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
}
