//! Snapshot diff: a full import compared with the source mirror gives the changes — adds,
//! modifies (attribute by attribute, value by value for multi-valued attributes), moves and
//! deletes — so sources without change tracking still synchronize incrementally.

use std::collections::HashSet;

use super::state::SourceMirror;
use crate::model::{Anchor, AttributeChange, Attributes, Change, Entry, Values};

/// Compares a full import, entry by entry, with the mirror it will replace.
///
/// ```
/// use dirsync::delta::{SnapshotDiff, SourceMirror};
/// use dirsync::model::{Change, Entry};
///
/// let mut mirror = SourceMirror::new();
/// mirror.insert(Entry::new("a", "user").with("cn", "Ann"));
/// mirror.insert(Entry::new("b", "user").with("cn", "Bob"));
/// let mut diff = SnapshotDiff::new(&mirror);
/// diff.push(Entry::new("a", "user").with("cn", "Anna"));
/// let changes = diff.finish();
/// assert!(matches!(&changes[0], Change::Modify { anchor, .. } if anchor.as_str() == "a"));
/// assert!(matches!(&changes[1], Change::Delete { anchor, .. } if anchor.as_str() == "b"));
/// ```
pub struct SnapshotDiff<'a> {
    mirror: &'a SourceMirror,
    seen: HashSet<Anchor>,
    changes: Vec<Change>,
}

impl<'a> SnapshotDiff<'a> {
    /// Starts a diff against `mirror`.
    pub fn new(mirror: &'a SourceMirror) -> Self {
        SnapshotDiff {
            mirror,
            seen: HashSet::new(),
            changes: Vec::new(),
        }
    }

    /// Compares one imported entry. An anchor imported twice counts once (the last wins).
    /// Its DN references are compared as the mirror keeps them: resolved to anchors through the
    /// mirror (a reference by a DN the mirror does not know yet — a referenced object renamed
    /// in the same snapshot — shows as a change, which applies to the same end).
    pub fn push(&mut self, entry: Entry) {
        self.seen.insert(entry.anchor.clone());
        let Some(old) = self.mirror.get(&entry.anchor) else {
            self.changes.push(Change::Add(entry));
            return;
        };
        let entry = self.mirror.resolved(entry);
        if old.object_type != entry.object_type {
            self.changes.push(Change::Replace(entry));
            return;
        }
        if old.dn != entry.dn {
            if let Some(new_dn) = entry.dn.clone() {
                self.changes.push(Change::Move {
                    anchor: entry.anchor.clone(),
                    object_type: entry.object_type.clone(),
                    new_dn,
                });
            }
        }
        let changes = attribute_changes(&old.attributes, &entry.attributes);
        if !changes.is_empty() {
            self.changes.push(Change::Modify {
                anchor: entry.anchor,
                object_type: entry.object_type,
                changes,
            });
        }
    }

    /// The changes, sorted by anchor (deletes of every mirrored anchor not imported included).
    pub fn finish(self) -> Vec<Change> {
        let mut changes = self.changes;
        for e in self.mirror.entries() {
            if !self.seen.contains(&e.anchor) {
                changes.push(Change::Delete {
                    anchor: e.anchor.clone(),
                    object_type: e.object_type.clone(),
                });
            }
        }
        // Stable: a move stays before the modify of the same anchor.
        changes.sort_by(|a, b| a.anchor().cmp(b.anchor()));
        changes
    }
}

/// The attribute changes that turn `old` into `new`: multi-valued attributes value by value,
/// single values by replace.
pub fn attribute_changes(old: &Attributes, new: &Attributes) -> Vec<AttributeChange> {
    let mut out = Vec::new();
    let empty = Values::new();
    let mut names: Vec<_> = old
        .iter()
        .map(|(n, _)| n)
        .chain(new.iter().map(|(n, _)| n))
        .collect();
    names.sort();
    names.dedup();
    for name in names {
        let a = old.get(name.as_str()).unwrap_or(&empty);
        let b = new.get(name.as_str()).unwrap_or(&empty);
        if a == b {
            continue;
        }
        if a.len() > 1 || b.len() > 1 {
            let added: Values = b.iter().filter(|v| !a.contains(v)).cloned().collect();
            let removed: Values = a.iter().filter(|v| !b.contains(v)).cloned().collect();
            if added.is_empty() && removed.is_empty() {
                // Only the order changed: keep the source's order.
                out.push(AttributeChange::replace(name.clone(), b.clone()));
                continue;
            }
            if !removed.is_empty() {
                out.push(AttributeChange::remove(name.clone(), removed));
            }
            if !added.is_empty() {
                out.push(AttributeChange::add(name.clone(), added));
            }
        } else {
            let mut c = AttributeChange::replace(name.clone(), b.clone());
            c.old = a.clone();
            out.push(c);
        }
    }
    out
}
