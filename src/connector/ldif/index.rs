//! The DN index of [`LdifSource`](super::LdifSource): what the source knows of each DN (the
//! anchor and type of a mapped entry, or that the entry was skipped), kept compact because it
//! holds every entry of the directory.
//!
//! It keeps no [`Dn`] values: each DN's text as written lives in one shared buffer, found
//! through a table keyed by a hash of the normalized DN; two DNs with one hash are told apart
//! exactly (the text is parsed again and the normalized forms compared). A GUID anchor in its
//! canonical form takes its 16 bytes; any other anchor is text in the shared buffer. Each DN also
//! names its parent container (by the parent's normalized text, kept once per container), so
//! the entries below a renamed one are found without reading every DN. About 60 bytes (a slot
//! and its share of the table) and the DN's text per entry, against over 500 for a
//! `HashMap<Dn, _>`; texts and slots are kept in chunks, so growing never copies them.
//!
//! Pure data structure: no I/O.

use std::hash::BuildHasher;

use hashbrown::HashTable;
use rustc_hash::{FxBuildHasher, FxHashMap};

use crate::model::{Anchor, Dn, ObjectType};

/// What the source knows of a DN: its anchor and type, or `None` for an entry it skipped.
pub(super) type Known = Option<(Anchor, ObjectType)>;

/// Bytes of text per chunk of [`DnIndex::text`] (a longer text has a chunk of its own).
const TEXT_CHUNK: usize = 1 << 22;

/// Slots per chunk of [`DnIndex::slots`] (a power of two).
const SLOT_CHUNK: usize = 1 << 16;

/// A piece of [`DnIndex::text`].
#[derive(Clone, Copy)]
struct Span {
    chunk: u32,
    at: u32,
    len: u32,
}

/// How a slot holds its anchor.
#[derive(Clone, Copy)]
enum AnchorRef {
    /// A GUID whose canonical text ([`Anchor::from_guid`]) is the anchor.
    Guid([u8; 16]),
    /// Any other anchor, as text.
    Text(Span),
}

/// What a slot says of its DN.
#[derive(Clone, Copy)]
enum Kind {
    /// The slot is free (its DN was removed).
    Free,
    /// An entry the mapping skipped.
    Skipped,
    /// A mapped entry: its anchor and (an index into [`DnIndex::types`]) its type.
    Mapped(AnchorRef, u16),
}

/// One DN of the index.
struct Slot {
    /// The hash of the normalized DN ([`DnIndex::hash`]).
    hash: u64,
    /// The DN's text as written.
    text: Span,
    /// The parent's container ([`DnIndex::containers`]); `NO_PARENT` for the root DN.
    parent: u32,
    kind: Kind,
}

const NO_PARENT: u32 = u32::MAX;

// What an entry costs besides its texts.
const _: () = assert!(std::mem::size_of::<Slot>() <= 48);

/// DN → [`Known`], compact (see the [module documentation](self)).
#[derive(Default)]
pub(super) struct DnIndex {
    /// Slot numbers, by [`Slot::hash`].
    table: HashTable<u32>,
    /// The slots, in chunks of [`SLOT_CHUNK`] (which are never moved as the index grows).
    slots: Vec<Vec<Slot>>,
    /// Free slots, for reuse.
    free: Vec<u32>,
    /// DN texts and text anchors, one after the other, in chunks of about [`TEXT_CHUNK`] bytes.
    text: Vec<String>,
    /// Bytes in `text`.
    text_len: usize,
    /// Bytes of `text` no live slot uses any more.
    garbage: usize,
    /// The object types of mapped entries (a handful).
    types: Vec<ObjectType>,
    /// The normalized DNs of the entries' parents → container number.
    containers: FxHashMap<Box<str>, u32>,
}

/// The normalized parent of the normalized DN `norm`: the text after its first RDN separator
/// (in a normalized DN every unescaped `,` separates RDNs); `""` (the root) for a DN of one RDN;
/// `None` for the root itself.
fn normalized_parent(norm: &str) -> Option<&str> {
    if norm.is_empty() {
        return None;
    }
    let b = norm.as_bytes();
    let mut escaped = false;
    for (i, c) in b.iter().enumerate() {
        match c {
            b'\\' if !escaped => escaped = true,
            b',' if !escaped => return norm.get(i + 1..),
            _ => escaped = false,
        }
    }
    Some("")
}

/// Whether the normalized DN `dn` is `ancestor` or below it.
fn at_or_below(dn: &str, ancestor: &str) -> bool {
    if ancestor.is_empty() || dn == ancestor {
        return true;
    }
    let Some(cut) = dn.len().checked_sub(ancestor.len() + 1) else {
        return false;
    };
    if !dn.ends_with(ancestor) || dn.as_bytes().get(cut) != Some(&b',') {
        return false;
    }
    // The `,` is a separator unless an odd run of backslashes escapes it.
    let before = dn.as_bytes().get(..cut).unwrap_or(&[]);
    before.iter().rev().take_while(|c| **c == b'\\').count() % 2 == 0
}

/// Appends `s` to the chunks of `text`; returns where it is. (Texts over 4 GiB, which no LDIF
/// record holds, are cut.)
fn push_text(text: &mut Vec<String>, s: &str) -> Span {
    let fits = text
        .last()
        .is_some_and(|c| c.capacity() - c.len() >= s.len());
    if !fits {
        text.push(String::with_capacity(TEXT_CHUNK.max(s.len())));
    }
    let chunk = text.len() - 1;
    let Some(c) = text.last_mut() else {
        return Span {
            chunk: 0,
            at: 0,
            len: 0,
        };
    };
    let at = c.len();
    c.push_str(s);
    let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    Span {
        chunk: n(chunk),
        at: n(at),
        len: n(s.len()),
    }
}

/// The GUID of `anchor` when it is a GUID's canonical text.
fn guid_of(anchor: &Anchor) -> Option<[u8; 16]> {
    let s = anchor.as_str();
    if s.len() != 36 {
        return None;
    }
    let guid = uuid::Uuid::try_parse(s).ok()?;
    let mut buf = uuid::Uuid::encode_buffer();
    (guid.hyphenated().encode_lower(&mut buf) == s).then(|| *guid.as_bytes())
}

impl DnIndex {
    /// The hash a DN is found by.
    fn hash(dn: &Dn) -> u64 {
        FxBuildHasher.hash_one(dn.normalized())
    }

    /// How many DNs the index holds.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    fn span(&self, s: Span) -> &str {
        let (at, len) = (s.at as usize, s.len as usize);
        self.text
            .get(s.chunk as usize)
            .and_then(|c| c.get(at..at + len))
            .unwrap_or("")
    }

    fn push_text(&mut self, s: &str) -> Span {
        self.text_len += s.len();
        push_text(&mut self.text, s)
    }

    fn slot(&self, n: u32) -> Option<&Slot> {
        let n = n as usize;
        self.slots.get(n / SLOT_CHUNK)?.get(n % SLOT_CHUNK)
    }

    fn slot_mut(&mut self, n: u32) -> Option<&mut Slot> {
        let n = n as usize;
        self.slots.get_mut(n / SLOT_CHUNK)?.get_mut(n % SLOT_CHUNK)
    }

    fn live_slots(&self) -> impl Iterator<Item = &Slot> {
        self.slots
            .iter()
            .flatten()
            .filter(|s| !matches!(s.kind, Kind::Free))
    }

    /// Whether `slot` holds `dn` (whose hash is `hash`).
    fn holds(&self, slot: u32, hash: u64, dn: &Dn) -> bool {
        let Some(s) = self.slot(slot) else {
            return false;
        };
        if s.hash != hash {
            return false;
        }
        let text = self.span(s.text);
        // One text, one DN; another text (another spelling, or another DN with the same hash)
        // is compared by its normalized form.
        text == dn.as_str() || Dn::parse(text).is_ok_and(|d| d == *dn)
    }

    fn find(&self, hash: u64, dn: &Dn) -> Option<u32> {
        self.table
            .find(hash, |&slot| self.holds(slot, hash, dn))
            .copied()
    }

    /// Whether the index holds `dn`.
    pub(super) fn contains(&self, dn: &Dn) -> bool {
        self.find(Self::hash(dn), dn).is_some()
    }

    fn known(&self, slot: &Slot) -> Known {
        match slot.kind {
            Kind::Free | Kind::Skipped => None,
            Kind::Mapped(anchor, ty) => {
                let anchor = match anchor {
                    AnchorRef::Guid(g) => Anchor::from_guid(uuid::Uuid::from_bytes(g)),
                    AnchorRef::Text(s) => Anchor::new(self.span(s)),
                };
                let ty = self.types.get(usize::from(ty))?.clone();
                Some((anchor, ty))
            }
        }
    }

    /// What the index knows of `dn`, or `None` when it does not hold it.
    pub(super) fn get(&self, dn: &Dn) -> Option<Known> {
        let slot = self.find(Self::hash(dn), dn)?;
        self.slot(slot).map(|s| self.known(s))
    }

    fn type_number(&mut self, ty: &ObjectType) -> u16 {
        if let Some(i) = self.types.iter().position(|t| t.as_str() == ty.as_str()) {
            return i as u16;
        }
        // More types than a u16 numbers cannot come from a configuration's map; the last
        // number is shared rather than failing.
        self.types.push(ty.clone());
        (self.types.len() - 1).min(usize::from(u16::MAX)) as u16
    }

    fn container(&mut self, norm: &str) -> u32 {
        if let Some(&c) = self.containers.get(norm) {
            return c;
        }
        let c = self.containers.len() as u32;
        self.containers.insert(Box::from(norm), c);
        c
    }

    /// Adds `dn` (whose hash is `hash`, and which the index does not hold).
    fn add(&mut self, hash: u64, dn: &Dn, known: Option<(&Anchor, &ObjectType)>) {
        let text = self.push_text(dn.as_str());
        let parent = match normalized_parent(dn.normalized()) {
            Some(p) => self.container(p),
            None => NO_PARENT,
        };
        let kind = match known {
            None => Kind::Skipped,
            Some((anchor, ty)) => {
                let anchor = match guid_of(anchor) {
                    Some(g) => AnchorRef::Guid(g),
                    None => AnchorRef::Text(self.push_text(anchor.as_str())),
                };
                Kind::Mapped(anchor, self.type_number(ty))
            }
        };
        let slot = Slot {
            hash,
            text,
            parent,
            kind,
        };
        let n = match self.free.pop() {
            Some(n) => {
                if let Some(s) = self.slot_mut(n) {
                    *s = slot;
                }
                n
            }
            None => {
                let full = self.slots.last().is_none_or(|c| c.len() == SLOT_CHUNK);
                if full {
                    self.slots.push(Vec::with_capacity(SLOT_CHUNK));
                }
                let chunks = self.slots.len() - 1;
                let last = self.slots.last_mut().map_or(0, |c| {
                    c.push(slot);
                    c.len() - 1
                });
                (chunks * SLOT_CHUNK + last) as u32
            }
        };
        let slots = &self.slots;
        self.table.insert_unique(hash, n, |&s| {
            let s = s as usize;
            slots
                .get(s / SLOT_CHUNK)
                .and_then(|c| c.get(s % SLOT_CHUNK))
                .map_or(0, |s| s.hash)
        });
    }

    /// Adds `dn` unless the index holds it already; returns whether it did.
    pub(super) fn insert_new(&mut self, dn: &Dn, known: Option<(&Anchor, &ObjectType)>) -> bool {
        let hash = Self::hash(dn);
        if self.find(hash, dn).is_some() {
            return false;
        }
        self.add(hash, dn, known);
        true
    }

    /// Sets what the index knows of `dn`, replacing what it knew (as `HashMap::insert`).
    pub(super) fn insert(&mut self, dn: &Dn, known: &Known) -> Option<Known> {
        let old = self.remove(dn);
        self.add(
            Self::hash(dn),
            dn,
            known.as_ref().map(|(anchor, ty)| (anchor, ty)),
        );
        old
    }

    /// Removes `dn`; returns what the index knew of it.
    pub(super) fn remove(&mut self, dn: &Dn) -> Option<Known> {
        let hash = Self::hash(dn);
        let slot = self.find(hash, dn)?;
        if let Ok(entry) = self.table.find_entry(hash, |&s| s == slot) {
            entry.remove();
        }
        let s = self.slot_mut(slot)?;
        let kind = std::mem::replace(&mut s.kind, Kind::Free);
        s.parent = NO_PARENT;
        let (hash, text, parent) = (s.hash, s.text, s.parent);
        let known = self.known(&Slot {
            hash,
            text,
            parent,
            kind,
        });
        self.garbage += text.len as usize
            + match kind {
                Kind::Mapped(AnchorRef::Text(a), _) => a.len as usize,
                _ => 0,
            };
        self.free.push(slot);
        if self.garbage > (1 << 20) && self.garbage > self.text_len / 2 {
            self.compact();
        }
        Some(known)
    }

    /// Rewrites the text buffer without what removed slots left behind.
    fn compact(&mut self) {
        let old = std::mem::take(&mut self.text);
        let mut text = Vec::new();
        let mut keep = |span: &mut Span| {
            let (at, len) = (span.at as usize, span.len as usize);
            let s = old
                .get(span.chunk as usize)
                .and_then(|c| c.get(at..at + len))
                .unwrap_or("");
            *span = push_text(&mut text, s);
        };
        for s in self.slots.iter_mut().flatten() {
            if matches!(s.kind, Kind::Free) {
                s.text = Span {
                    chunk: 0,
                    at: 0,
                    len: 0,
                };
                continue;
            }
            keep(&mut s.text);
            if let Kind::Mapped(AnchorRef::Text(a), _) = &mut s.kind {
                keep(a);
            }
        }
        self.text = text;
        self.text_len = self.text.iter().map(String::len).sum();
        self.garbage = 0;
    }

    /// The bytes the index uses (what its slots, table and texts fill, not spare capacity).
    #[cfg(test)]
    fn bytes_used(&self) -> usize {
        let slots: usize = self.slots.iter().map(Vec::len).sum();
        let containers: usize = self.containers.keys().map(|k| k.len() + 32).sum();
        slots * std::mem::size_of::<Slot>()
            + self.table.capacity() * (std::mem::size_of::<u32>() + 1)
            + self.text_len
            + containers
    }

    /// The DN of a live mapped entry whose anchor is `anchor`, if any (a scan: for the change
    /// records of a delta import, which are few beside the directory).
    pub(super) fn holder_of(&self, anchor: &Anchor) -> Option<&str> {
        let guid = guid_of(anchor);
        self.live_slots()
            .find(|s| match (s.kind, guid) {
                (Kind::Mapped(AnchorRef::Guid(g), _), Some(want)) => g == want,
                (Kind::Mapped(AnchorRef::Text(a), _), None) => self.span(a) == anchor.as_str(),
                _ => false,
            })
            .map(|s| self.span(s.text))
    }

    /// The DNs the index holds strictly below `dn`, as written, in no particular order.
    pub(super) fn descendants(&self, dn: &Dn) -> Vec<Dn> {
        let top = dn.normalized();
        // The containers at or below `dn`: a DN is below `dn` exactly when its parent is.
        let mut below = vec![false; self.containers.len()];
        for (norm, &c) in &self.containers {
            if at_or_below(norm, top) {
                if let Some(b) = below.get_mut(c as usize) {
                    *b = true;
                }
            }
        }
        self.live_slots()
            .filter(|s| below.get(s.parent as usize).copied().unwrap_or(false))
            .filter_map(|s| Dn::parse(self.span(s.text)).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn dn(s: &str) -> Dn {
        Dn::parse(s).unwrap()
    }

    fn known(anchor: &str, ty: &str) -> Known {
        Some((Anchor::new(anchor), ObjectType::new(ty)))
    }

    #[test]
    fn normalized_parents() {
        assert_eq!(normalized_parent(""), None);
        assert_eq!(normalized_parent("cn=a"), Some(""));
        assert_eq!(normalized_parent("cn=a,dc=x"), Some("dc=x"));
        assert_eq!(normalized_parent("cn=a\\,b,dc=x"), Some("dc=x"));
        assert_eq!(normalized_parent("cn=a\\\\,dc=x"), Some("dc=x"));
        assert_eq!(normalized_parent("cn=a\\\\\\,b,dc=x"), Some("dc=x"));
        assert!(at_or_below("cn=a,dc=x", "dc=x"));
        assert!(at_or_below("dc=x", "dc=x"));
        assert!(at_or_below("dc=x", ""));
        assert!(!at_or_below("cn=a,xdc=x", "dc=x"));
        assert!(!at_or_below("cn=a\\,dc=x", "dc=x"));
        assert!(at_or_below("cn=a\\\\,dc=x", "dc=x"));
    }

    #[test]
    fn spellings_of_one_dn_are_one_key() {
        let mut index = DnIndex::default();
        let guid = "12345678-1234-5678-1234-56789abcdef0";
        assert!(index.insert_new(
            &dn("CN=Smith\\, John,OU=Sales,DC=Example"),
            Some((&Anchor::new(guid), &ObjectType::new("user")))
        ));
        assert!(!index.insert_new(&dn("cn=smith\\2c john , ou=sales,dc=example"), None));
        assert_eq!(
            index.get(&dn("cn=SMITH\\, JOHN,ou=Sales,dc=example")),
            Some(known(guid, "user"))
        );
        assert_eq!(index.get(&dn("cn=Smith,ou=Sales,dc=example")), None);
        assert_eq!(
            index.holder_of(&Anchor::new(guid)),
            Some("CN=Smith\\, John,OU=Sales,DC=Example")
        );
        // An anchor that is not a canonical GUID is kept as text, exactly.
        let upper = "12345678-1234-5678-1234-56789ABCDEF1";
        assert!(index.insert_new(
            &dn("cn=b,dc=example"),
            Some((&Anchor::new(upper), &ObjectType::new("group")))
        ));
        assert_eq!(
            index.get(&dn("cn=b,dc=example")),
            Some(known(upper, "group"))
        );
        assert_eq!(index.holder_of(&Anchor::new(upper.to_lowercase())), None);
        assert_eq!(index.len(), 2);
        assert_eq!(
            index.remove(&dn("CN=B,DC=EXAMPLE")),
            Some(known(upper, "group"))
        );
        assert_eq!(index.remove(&dn("CN=B,DC=EXAMPLE")), None);
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn descendants_follow_containers_that_are_not_entries() {
        let mut index = DnIndex::default();
        for (d, k) in [
            ("dc=x", None),
            ("OU=People,dc=x", None),
            ("cn=A,OU=People,dc=x", known("a", "user")),
            // Its parent `ou=Deep,ou=people,dc=x` is not an entry.
            ("cn=B,ou=Deep,ou=people,DC=X", known("b", "user")),
            ("cn=C\\,ou=People,dc=x", known("c", "user")),
            ("cn=D,ou=Peoplex,dc=x", known("d", "user")),
        ] {
            index.insert(&dn(d), &k);
        }
        let mut below: Vec<String> = index
            .descendants(&dn("ou=people,dc=x"))
            .iter()
            .map(|d| d.as_str().to_owned())
            .collect();
        below.sort();
        assert_eq!(
            below,
            ["cn=A,OU=People,dc=x", "cn=B,ou=Deep,ou=people,DC=X"]
        );
        assert_eq!(index.descendants(&dn("dc=x")).len(), 5);
        assert_eq!(index.descendants(&dn("")).len(), 6);
        assert!(index.descendants(&dn("cn=A,ou=people,dc=x")).is_empty());
    }

    /// What an entry of the scale benchmark's shape costs: its DN's text and about 60 bytes.
    #[test]
    fn an_entry_costs_its_text_and_about_sixty_bytes() {
        let mut index = DnIndex::default();
        let n = 100_000u64;
        let mut text = 0;
        for i in 0..n {
            let d = dn(&format!(
                "CN=Given{} Surname{} {i},OU=Region{},OU=Department{},OU=Staff,DC=corp,DC=contoso,DC=com",
                i % 97,
                i % 89,
                i % 4,
                i % 8
            ));
            text += d.as_str().len();
            let anchor = Anchor::from_guid(uuid::Uuid::from_u64_pair(i, i));
            assert!(index.insert_new(&d, Some((&anchor, &ObjectType::new("user")))));
        }
        let per_entry = (index.bytes_used() - text) as f64 / n as f64;
        assert!(
            per_entry < 70.0,
            "{per_entry} bytes per entry besides the text"
        );
    }

    /// The index against a `HashMap<Dn, Known>` over a long run of inserts, replacements and
    /// removals (with enough removed text to compact the buffer several times).
    #[test]
    fn behaves_as_a_hash_map() {
        let mut index = DnIndex::default();
        let mut model: HashMap<Dn, Known> = HashMap::new();
        let mut x: u64 = 7;
        for step in 0..60_000u64 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let n = (x >> 33) % 5_000;
            let pad = "p".repeat((x >> 20) as usize % 300);
            let d = dn(&format!("CN=User {n} {pad},OU=Unit {},DC=Example", n % 7));
            let k = match (x >> 40) % 3 {
                0 => None,
                1 => known(&format!("anchor-{step}"), "user"),
                _ => Some((
                    Anchor::from_guid(uuid::Uuid::from_u64_pair(step, n)),
                    ObjectType::new("group"),
                )),
            };
            match (x >> 50) % 4 {
                0 => assert_eq!(index.remove(&d), model.remove(&d)),
                1 => assert_eq!(index.insert_new(&d, k.as_ref().map(|(a, t)| (a, t))), {
                    let new = !model.contains_key(&d);
                    if new {
                        model.insert(d.clone(), k);
                    }
                    new
                }),
                _ => assert_eq!(index.insert(&d, &k), model.insert(d.clone(), k)),
            }
            assert_eq!(index.len(), model.len());
        }
        for (d, k) in &model {
            assert_eq!(index.get(d).as_ref(), Some(k));
        }
        assert!(index.text_len < 2 * (index.text_len - index.garbage) + (1 << 20));
        assert_eq!(
            index.text_len,
            index.text.iter().map(String::len).sum::<usize>()
        );
    }
}
