//! The order of a plan's creates: referenced objects first (managers before their reports,
//! members before their groups), so that a create can carry its references to objects the same
//! plan creates; and what a target lets a create carry ([`CreateReferences`]).
//!
//! The creates and the references between them form a directed graph (referrer → referenced).
//! A depth-first search over it, in anchor order, finds the edges that close a cycle (its back
//! edges: a user who manages themselves, two managers of each other, groups nested in each
//! other); those references are left to a write after every create, and the rest of the graph is
//! acyclic. Each create gets a *level*: 0 when it references no object the plan creates, else one
//! more than the highest level it references. Creates are ordered by level, then anchor.
//!
//! Pure and deterministic: the same creates and references give the same levels and the same
//! deferred edges, whatever order they are handed in.

use rustc_hash::FxHashMap as HashMap;

use serde::{Deserialize, Serialize};

use crate::model::{Anchor, AttrName, ObjectType};

/// Which reference attributes (members, manager, …) a target accepts in a create, as
/// [`TargetCapabilities::create_references`](crate::connector::TargetCapabilities) reports it.
///
/// For the attributes it allows, the planner puts into the create every reference to an object
/// that exists or that an earlier create of the same plan makes (the engine sends a create only
/// after the creates it references have succeeded); only references that close a cycle wait for a
/// write after the creates. The references of the attributes it does not allow all go in a write
/// after the create.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CreateReferences {
    /// Every reference attribute (LDAP, LDIF, SCIM, the memory target).
    #[default]
    All,
    /// None: references are always written after the create.
    None,
    /// Only these attributes of these target object types (Microsoft Graph: a group's
    /// `members`, which `POST /groups` takes as `members@odata.bind`; a user's manager can only
    /// be assigned after the user exists).
    Only(Vec<(ObjectType, AttrName)>),
}

impl CreateReferences {
    /// Whether a create of an `object_type` may carry references in `attribute`.
    pub fn allows(&self, object_type: &ObjectType, attribute: &AttrName) -> bool {
        match self {
            CreateReferences::All => true,
            CreateReferences::None => false,
            CreateReferences::Only(pairs) => pairs
                .iter()
                .any(|(t, a)| t == object_type && a == attribute),
        }
    }
}

/// The creates of a plan in order, and the references left to a later write.
#[derive(Debug, Default)]
pub(crate) struct CreateOrder {
    /// Each create's level (0: references no object the plan creates).
    pub(crate) levels: HashMap<Anchor, usize>,
    /// Referrer → the referenced creates whose references close a cycle: not in the create.
    pub(crate) deferred: HashMap<Anchor, Vec<Anchor>>,
}

impl CreateOrder {
    /// The level of the create of `anchor` (0 when the plan does not create it).
    pub(crate) fn level(&self, anchor: &Anchor) -> usize {
        self.levels.get(anchor).copied().unwrap_or(0)
    }

    /// Whether the reference from `referrer` to `referenced` must wait for a later write.
    pub(crate) fn is_deferred(&self, referrer: &Anchor, referenced: &Anchor) -> bool {
        self.deferred
            .get(referrer)
            .is_some_and(|to| to.contains(referenced))
    }
}

/// Orders `creates`: each create's anchor with the anchors (of other creates, or its own) its
/// create would reference. References to anchors that are not among `creates` are ignored.
pub(crate) fn order_creates(creates: &[(&Anchor, Vec<&Anchor>)]) -> CreateOrder {
    let mut nodes: Vec<&Anchor> = creates.iter().map(|(a, _)| *a).collect();
    nodes.sort();
    nodes.dedup();
    let index: HashMap<&Anchor, usize> = nodes.iter().enumerate().map(|(i, a)| (*a, i)).collect();
    let mut adj: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (a, refs) in creates {
        let v = index[a];
        adj[v].extend(refs.iter().filter_map(|r| index.get(r).copied()));
    }
    for list in &mut adj {
        list.sort_unstable();
        list.dedup();
    }

    const WHITE: u8 = 0;
    const GRAY: u8 = 1;
    const BLACK: u8 = 2;
    let mut state = vec![WHITE; nodes.len()];
    let mut level = vec![0usize; nodes.len()];
    let mut deferred: Vec<(usize, usize)> = Vec::new();
    // Iterative: a chain of a hundred thousand managers must not overflow the stack.
    let mut stack: Vec<(usize, usize)> = Vec::new();
    for root in 0..nodes.len() {
        if state[root] != WHITE {
            continue;
        }
        state[root] = GRAY;
        stack.push((root, 0));
        while let Some((v, next)) = stack.last_mut() {
            let v = *v;
            if let Some(&w) = adj[v].get(*next) {
                *next += 1;
                match state[w] {
                    WHITE => {
                        state[w] = GRAY;
                        stack.push((w, 0));
                    }
                    // On the current path (or `v` itself): the edge closes a cycle.
                    GRAY => deferred.push((v, w)),
                    _ => {}
                }
                continue;
            }
            // Every edge of `v` explored: what it references that is finished has its level;
            // what is still on the path is a deferred edge.
            level[v] = adj[v]
                .iter()
                .filter(|w| state[**w] == BLACK)
                .map(|w| level[*w] + 1)
                .max()
                .unwrap_or(0);
            state[v] = BLACK;
            stack.pop();
        }
    }
    CreateOrder {
        levels: nodes
            .iter()
            .zip(level)
            .map(|(a, l)| ((*a).clone(), l))
            .collect(),
        deferred: deferred
            .into_iter()
            .fold(HashMap::default(), |mut m, (v, w)| {
                m.entry(nodes[v].clone())
                    .or_insert_with(Vec::new)
                    .push(nodes[w].clone());
                m
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Anchor {
        Anchor::new(s)
    }

    fn order(edges: &[(&str, &[&str])]) -> CreateOrder {
        let owned: Vec<(Anchor, Vec<Anchor>)> = edges
            .iter()
            .map(|(x, ys)| (a(x), ys.iter().map(|y| a(y)).collect()))
            .collect();
        let input: Vec<(&Anchor, Vec<&Anchor>)> = owned
            .iter()
            .map(|(x, ys)| (x, ys.iter().collect()))
            .collect();
        order_creates(&input)
    }

    fn levels(o: &CreateOrder, names: &[&str]) -> Vec<usize> {
        names.iter().map(|n| o.level(&a(n))).collect()
    }

    #[test]
    fn managers_before_reports_and_members_before_groups() {
        // ceo ← vp ← dev; the group holds dev and ceo; the outer group holds the group.
        let o = order(&[
            ("dev", &["vp"]),
            ("vp", &["ceo"]),
            ("ceo", &[]),
            ("group", &["dev", "ceo"]),
            ("outer", &["group"]),
        ]);
        assert_eq!(
            levels(&o, &["ceo", "vp", "dev", "group", "outer"]),
            [0, 1, 2, 3, 4]
        );
        assert!(o.deferred.is_empty());
    }

    #[test]
    fn a_cycle_defers_exactly_one_edge_and_a_self_reference_its_own() {
        // a manages b, b manages a; c manages itself; d → e → f → d.
        let o = order(&[
            ("a", &["b"]),
            ("b", &["a"]),
            ("c", &["c"]),
            ("d", &["e"]),
            ("e", &["f"]),
            ("f", &["d"]),
        ]);
        let mut deferred: Vec<(String, String)> = o
            .deferred
            .iter()
            .flat_map(|(x, ys)| ys.iter().map(move |y| (x.to_string(), y.to_string())))
            .collect();
        deferred.sort();
        assert_eq!(
            deferred,
            [("b", "a"), ("c", "c"), ("f", "d")].map(|(x, y)| (x.to_string(), y.to_string()))
        );
        // What remains is ordered: b before a, f before e before d.
        assert_eq!(
            levels(&o, &["b", "a", "c", "f", "e", "d"]),
            [0, 1, 0, 0, 1, 2]
        );
    }

    #[test]
    fn the_input_order_does_not_matter_and_unknown_anchors_are_ignored() {
        let edges: [(&str, &[&str]); 4] = [
            ("x", &["y", "outside"]),
            ("y", &["z"]),
            ("z", &["x"]),
            ("w", &["x"]),
        ];
        let one = order(&edges);
        let mut reversed = edges;
        reversed.reverse();
        let two = order(&reversed);
        assert_eq!(one.levels, two.levels);
        assert_eq!(one.deferred, two.deferred);
        assert_eq!(one.deferred.values().map(Vec::len).sum::<usize>(), 1);
        assert!(!one.levels.contains_key(&a("outside")));
    }

    #[test]
    fn a_long_chain_does_not_overflow_the_stack() {
        let names: Vec<String> = (0..200_000).map(|i| format!("u{i:06}")).collect();
        let owned: Vec<(Anchor, Vec<Anchor>)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let refs = if i == 0 {
                    vec![]
                } else {
                    vec![a(&names[i - 1])]
                };
                (a(n), refs)
            })
            .collect();
        let input: Vec<(&Anchor, Vec<&Anchor>)> = owned
            .iter()
            .map(|(x, ys)| (x, ys.iter().collect()))
            .collect();
        let o = order_creates(&input);
        assert_eq!(o.level(&a(&names[199_999])), 199_999);
        assert!(o.deferred.is_empty());
    }

    #[test]
    fn create_references_allow_by_type_and_attribute_ignoring_case() {
        let graph =
            CreateReferences::Only(vec![(ObjectType::new("Group"), AttrName::new("members"))]);
        assert!(graph.allows(&ObjectType::new("group"), &AttrName::new("Members")));
        assert!(!graph.allows(&ObjectType::new("User"), &AttrName::new("manager")));
        assert!(CreateReferences::All.allows(&ObjectType::new("User"), &AttrName::new("manager")));
        assert!(
            !CreateReferences::None.allows(&ObjectType::new("Group"), &AttrName::new("members"))
        );
    }
}
