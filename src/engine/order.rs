//! The export order within a phase: [`dependencies`] names, for each operation, the creates it
//! must wait for — the creates of the objects its create attributes reference
//! ([`Reference::Pending`] values). The export ledger (`ledger.rs`) starts an operation once
//! those have finished — succeeded, so the reference resolves to the new object's id, or
//! failed, so the create goes without it (see [`Operation::without_unresolved`]) and the object
//! stays dirty for a later write.
//!
//! Per-operation dependencies, not a barrier per level: a report is sent as soon as its manager
//! exists, while other managers are still being created.

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
}
