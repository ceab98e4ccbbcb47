//! The export order.
//!
//! Within a phase, [`dependencies`] names, for each operation, the creates it must wait for —
//! the creates of the objects its create attributes reference ([`Reference::Pending`] values).
//! The export ledger (`ledger.rs`) starts an operation once those have finished — succeeded, so
//! the reference resolves to the new object's id, or failed, so the create goes without it
//! (see [`Operation::without_unresolved`]) and the object stays dirty for a later write.
//! Per-operation dependencies, not a barrier per level: a report is sent as soon as its manager
//! exists, while other managers are still being created.
//!
//! Across the pages of a run too large for one plan, [`PageOrder`] puts referenced objects in
//! earlier pages than their referrers (by reference level), so that a create finds what it
//! references already made — instead of going without it and being completed by a reference
//! update once the referenced object's page is exported.
//!
//! Pure: no I/O (the engine feeds [`PageOrder`] the dirty set and its references).

use std::borrow::Borrow;
use std::collections::HashMap;

use crate::delta::{Operation, OperationKind};
use crate::model::{Anchor, Reference, Value};

/// For each operation, the indices (in `ops`) of the creates it must wait for: the creates of
/// the anchors its create attributes reference as [`Reference::Pending`]. Other operations wait
/// for nothing.
pub(super) fn dependencies<O: Borrow<Operation>>(ops: &[O]) -> Vec<Vec<usize>> {
    let creates: HashMap<&Anchor, usize> = ops
        .iter()
        .map(Borrow::borrow)
        .enumerate()
        .filter(|(_, o)| matches!(o.kind, OperationKind::Create { .. }))
        .map(|(i, o)| (&o.anchor, i))
        .collect();
    ops.iter()
        .map(Borrow::borrow)
        .enumerate()
        .map(|(i, op)| {
            let OperationKind::Create { attributes, .. } = &op.kind else {
                return Vec::new();
            };
            let mut deps: Vec<usize> = attributes
                .iter()
                .flat_map(|(_, values)| values.iter())
                .filter_map(|v| match v {
                    Value::Reference(Reference::Pending(a)) => creates.get(a).copied(),
                    _ => None,
                })
                .filter(|d| *d != i)
                .collect();
            deps.sort_unstable();
            deps.dedup();
            deps
        })
        .collect()
}

/// The dirty set of a paged run, in the order its pages are planned: by reference level —
/// an object after every dirty object it references, those that reference none first — and in
/// anchor order within a level. A cycle of references is broken where the walk meets it.
///
/// A compact index (the anchors' text in one buffer, a few integers per object and per
/// reference), not the objects: built by [`PageOrder::push`] with the dirty anchors in
/// ascending order and the anchors each references, then [`PageOrder::finish`].
#[derive(Debug, Default)]
pub(super) struct PageOrder {
    /// The anchors' text, one after the other in anchor order.
    names: String,
    /// Where each anchor's text ends in `names`.
    ends: Vec<usize>,
    /// The anchors referenced, as text (resolved to indices by `finish`).
    refs: String,
    /// Per reference: the referrer's index and where the referenced anchor's text ends.
    ref_ends: Vec<(u32, usize)>,
    /// The indices in planning order (once finished).
    order: Vec<u32>,
    /// Per anchor: 1 + the references it makes, what planning it reads (its neighbourhood
    /// holds what it references).
    weight: Vec<u32>,
    /// Per anchor: its position in `order` (once finished).
    rank: Vec<u32>,
}

impl PageOrder {
    /// Adds the next dirty anchor (after every one added before) and what it references.
    pub fn push(&mut self, anchor: &Anchor, references: &[Anchor]) {
        let i = u32::try_from(self.ends.len()).unwrap_or(u32::MAX);
        self.names.push_str(anchor.as_str());
        self.ends.push(self.names.len());
        self.weight.push(
            u32::try_from(references.len())
                .unwrap_or(u32::MAX)
                .saturating_add(1),
        );
        for r in references {
            self.refs.push_str(r.as_str());
            self.ref_ends.push((i, self.refs.len()));
        }
    }

    /// The anchors added.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    fn name(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.names[start..self.ends[i]]
    }

    /// Orders the anchors added (see [`PageOrder`]); references to anchors not added are
    /// left out.
    pub fn finish(mut self) -> PageOrder {
        let n = self.ends.len();
        let index: HashMap<&str, u32> = (0..n)
            .map(|i| (self.name(i), u32::try_from(i).unwrap_or(u32::MAX)))
            .collect();
        // The references as adjacency lists, one after the other (referrers in order).
        let mut starts: Vec<usize> = Vec::with_capacity(n + 1);
        let mut targets: Vec<u32> = Vec::with_capacity(self.ref_ends.len());
        let mut begin = 0;
        for &(from, end) in &self.ref_ends {
            while starts.len() <= from as usize {
                starts.push(targets.len());
            }
            if let Some(&to) = index.get(&self.refs[begin..end]) {
                targets.push(to);
            }
            begin = end;
        }
        while starts.len() <= n {
            starts.push(targets.len());
        }
        drop(index);
        self.refs = String::new();
        self.ref_ends = Vec::new();
        let level = levels(&starts, &targets);
        let mut order: Vec<u32> = (0..n)
            .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
            .collect();
        order.sort_by_key(|&i| level[i as usize]);
        let mut rank = vec![0u32; n];
        for (position, &i) in order.iter().enumerate() {
            rank[i as usize] = u32::try_from(position).unwrap_or(u32::MAX);
        }
        self.order = order;
        self.rank = rank;
        self
    }

    /// The index of `anchor` among those added (they were added in ascending order).
    fn index_of(&self, anchor: &Anchor) -> Option<usize> {
        let name = anchor.as_str();
        let (mut lo, mut hi) = (0, self.ends.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.name(mid).cmp(name) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    }

    /// Where `anchor` comes in the planning order (the number of anchors planned before it),
    /// if it was added; once finished.
    pub fn position(&self, anchor: &Anchor) -> Option<usize> {
        let i = self.index_of(anchor)?;
        self.rank.get(i).map(|&r| r as usize)
    }

    /// What planning `anchor` reads, as [`PageOrder::pages`] counts it: 1 and 1 per reference
    /// it makes (1 for an anchor not added).
    pub fn weight(&self, anchor: &Anchor) -> u64 {
        self.index_of(anchor)
            .and_then(|i| self.weight.get(i))
            .map_or(1, |&w| u64::from(w))
    }

    /// The pages, in order, each page's anchors sorted. A page closes when what it reads
    /// reaches `page`: each anchor counts 1 and 1 per reference it makes, so a page of users
    /// holds about `page` of them and a page of large groups as many as hold `page` members
    /// together (a group larger than that has a page of its own). The objects a page's plan
    /// reads stay about `page`, whatever the size of the groups.
    pub fn pages(&self, page: usize) -> impl Iterator<Item = Vec<Anchor>> + '_ {
        let page = u64::try_from(page.max(1)).unwrap_or(u64::MAX);
        let mut rest: &[u32] = &self.order;
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let mut read = 0u64;
            let mut taken = 0;
            for &i in rest {
                if taken > 0 && read >= page {
                    break;
                }
                read += u64::from(self.weight[i as usize]);
                taken += 1;
            }
            let (chunk, after) = rest.split_at(taken);
            rest = after;
            let mut anchors: Vec<Anchor> = chunk
                .iter()
                .map(|&i| Anchor::new(self.name(i as usize)))
                .collect();
            anchors.sort();
            Some(anchors)
        })
    }
}

/// The reference level of each object of a graph given as adjacency lists (`targets[starts[i]
/// .. starts[i + 1]]`: what object `i` references): 0 for an object that references none,
/// else one more than the highest level of what it references. An edge that closes a cycle
/// (found by the depth-first walk, a self-reference included) is left out. Iterative: a chain
/// of a million references does not overflow the stack.
fn levels(starts: &[usize], targets: &[u32]) -> Vec<u32> {
    const UNSEEN: u32 = u32::MAX;
    const ACTIVE: u32 = u32::MAX - 1;
    let n = starts.len().saturating_sub(1);
    let mut level = vec![UNSEEN; n];
    let mut stack: Vec<(usize, usize)> = Vec::new();
    for root in 0..n {
        if level[root] != UNSEEN {
            continue;
        }
        level[root] = ACTIVE;
        stack.push((root, starts[root]));
        while let Some((v, next)) = stack.last_mut() {
            let v = *v;
            if *next < starts[v + 1] {
                let w = targets[*next] as usize;
                *next += 1;
                if level[w] == UNSEEN {
                    level[w] = ACTIVE;
                    stack.push((w, starts[w]));
                }
                continue;
            }
            level[v] = targets[starts[v]..starts[v + 1]]
                .iter()
                .map(|&w| level[w as usize])
                .filter(|&l| l < ACTIVE)
                .map(|l| l.saturating_add(1))
                .max()
                .unwrap_or(0)
                .min(ACTIVE - 1);
            stack.pop();
        }
    }
    level
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::delta::Reason;
    use crate::model::{Attributes, Values};

    /// A create of a group `anchor` whose members are the creates of `refs`.
    pub(in crate::engine) fn create(anchor: &str, refs: &[&str]) -> Operation {
        let mut attributes = Attributes::new();
        if !refs.is_empty() {
            attributes.set(
                "member",
                refs.iter()
                    .map(|r| Value::Reference(Reference::Pending(Anchor::new(*r))))
                    .collect::<Values>(),
            );
        }
        Operation {
            anchor: Anchor::new(anchor),
            source_type: "group".into(),
            target_type: "Group".into(),
            kind: OperationKind::Create {
                attributes,
                secrets: Attributes::new(),
                lookup: Vec::new(),
            },
            reason: Reason::EnteredScope,
        }
    }

    #[test]
    fn a_create_depends_on_the_creates_it_references() {
        let ops = vec![
            create("u1", &[]),
            create("u2", &[]),
            create("g1", &["u1", "u2", "gone"]),
            create("g2", &["g1"]),
            create("u3", &[]),
        ];
        assert_eq!(
            dependencies(&ops),
            [vec![], vec![], vec![0, 1], vec![2], vec![]]
        );
    }

    /// A page order built from `(anchor, references)` in anchor order.
    fn order(objects: &[(&str, &[&str])]) -> PageOrder {
        let mut o = PageOrder::default();
        for (a, refs) in objects {
            let refs: Vec<Anchor> = refs.iter().map(|r| Anchor::new(*r)).collect();
            o.push(&Anchor::new(*a), &refs);
        }
        o.finish()
    }

    fn pages(o: &PageOrder, page: usize) -> Vec<Vec<String>> {
        o.pages(page)
            .map(|p| p.iter().map(|a| a.to_string()).collect())
            .collect()
    }

    #[test]
    fn pages_put_referenced_objects_first() {
        // A manager chain against anchor order (a0 reports to a1, …, a4 to no one), a group
        // of a0 and a4, and an object referencing what is not dirty.
        let o = order(&[
            ("a0", &["a1"]),
            ("a1", &["a2"]),
            ("a2", &["a3"]),
            ("a3", &["a4"]),
            ("a4", &[]),
            ("g", &["a0", "a4", "elsewhere"]),
            ("x", &["elsewhere"]),
        ]);
        assert_eq!(o.len(), 7);
        assert_eq!(
            pages(&o, 2),
            [
                vec!["a4", "x"],
                vec!["a3"],
                vec!["a2"],
                vec!["a1"],
                vec!["a0"],
                vec!["g"]
            ]
            .map(|p| {
                let mut p: Vec<String> = p.iter().map(|s| s.to_string()).collect();
                p.sort();
                p
            })
        );
        // One page: everything, sorted.
        assert_eq!(
            pages(&o, 100),
            [vec!["a0", "a1", "a2", "a3", "a4", "g", "x"]]
        );
    }

    #[test]
    fn pages_of_groups_hold_about_a_page_of_members() {
        // Five users, then three groups of three members each: a page of 4 reads about 4
        // objects, so the groups do not share one page (whose plan would read every member).
        let o = order(&[
            ("g1", &["u0", "u1", "u2"]),
            ("g2", &["u2", "u3", "u4"]),
            ("g3", &["u0", "u3", "u4"]),
            ("u0", &[]),
            ("u1", &[]),
            ("u2", &[]),
            ("u3", &[]),
            ("u4", &[]),
        ]);
        assert_eq!(
            pages(&o, 4),
            [
                vec!["u0", "u1", "u2", "u3"],
                vec!["g1", "u4"],
                vec!["g2"],
                vec!["g3"]
            ]
            .map(|p| p.into_iter().map(String::from).collect::<Vec<_>>())
        );
        // A large page holds them all.
        assert_eq!(pages(&o, 100).len(), 1);
    }

    #[test]
    fn cycles_and_self_references_are_broken_not_looped() {
        // b ↔ c, c references itself; d references the cycle; e nothing.
        let o = order(&[("b", &["c"]), ("c", &["b", "c"]), ("d", &["b"]), ("e", &[])]);
        let flat: Vec<String> = pages(&o, 1).into_iter().flatten().collect();
        assert_eq!(flat.len(), 4);
        let at = |a: &str| flat.iter().position(|x| x == a).unwrap();
        // The walk from b meets c, whose reference back to b closes the cycle: c first.
        assert!(at("c") < at("b"), "{flat:?}");
        assert!(at("b") < at("d"), "{flat:?}");
        assert_eq!(at("e"), 1, "{flat:?}");
    }

    #[test]
    fn a_long_chain_does_not_overflow_the_stack() {
        // Each object references the next: the last is level 0, the first the highest.
        let n = 200_000;
        let names: Vec<String> = (0..n).map(|i| format!("u{i:06}")).collect();
        let mut o = PageOrder::default();
        for i in 0..n {
            let refs: Vec<Anchor> = names.get(i + 1).map(Anchor::new).into_iter().collect();
            o.push(&Anchor::new(&names[i]), &refs);
        }
        let o = o.finish();
        // The last counts 1 (it references none), the others 2 each.
        let first: Vec<Anchor> = o.pages(4).next().unwrap();
        assert_eq!(
            first,
            [&names[n - 3], &names[n - 2], &names[n - 1]].map(Anchor::new)
        );
    }
}
