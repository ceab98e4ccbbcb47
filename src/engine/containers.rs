//! The engine's part in container scope: subtrees follow their renamed or moved containers in
//! the source mirror, and the containers a projection names are bound to their anchors and the
//! bindings remembered in the state store (see [`crate::delta::ContainerBindings`]).

use std::collections::HashMap;

use tracing::{debug, warn};

use super::{Result, Synchronizer};
use crate::connector::Watermark;
use crate::delta::{ContainerBindings, ContainerLookup, ContainerRef};
use crate::model::{Anchor, Change, Dn};
use crate::state::{StateError, StateStore};

/// Applies a delta import's changes to the source mirror (as [`StateStore::apply_changes`]),
/// first moving the subtrees of the objects the changes rename or move: a directory reports a
/// renamed container alone, and its children keep the change numbers (and, in the mirror, the
/// DNs) they had.
pub(super) fn apply_changes(
    store: &mut dyn StateStore,
    connector: &str,
    changes: &[Change],
    watermark: Option<&Watermark>,
) -> Result<(), StateError> {
    let moves: Vec<(Anchor, Dn)> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Add(e) | Change::Replace(e) => Some((e.anchor.clone(), e.dn.clone()?)),
            Change::Move { anchor, new_dn, .. } => Some((anchor.clone(), new_dn.clone())),
            Change::Modify { .. } | Change::Delete { .. } => None,
        })
        .collect();
    if !moves.is_empty() {
        let moved = store.move_subtrees(&moves)?;
        if !moved.is_empty() {
            debug!(
                objects = moved.len(),
                "moved the subtrees of renamed or moved objects"
            );
        }
    }
    store.apply_changes(connector, changes, watermark)
}

/// What the store says about the objects binding needs, read before binding.
#[derive(Default)]
struct Found {
    at: HashMap<Dn, Anchor>,
    located: HashMap<Anchor, Option<Dn>>,
}

impl ContainerLookup for Found {
    fn anchor_at(&self, dn: &Dn) -> Option<Anchor> {
        self.at.get(dn).cloned()
    }

    fn locate(&self, anchor: &Anchor) -> Option<Option<Dn>> {
        self.located.get(anchor).cloned()
    }
}

impl Synchronizer {
    /// Binds the containers the projection names against the source mirror, keeping the
    /// bindings the store remembers, and records them when they changed (a DN seen for the first
    /// time, a container renamed, moved or deleted). Names the containers that cannot be bound.
    pub(super) fn bind_containers(&self) -> Result<ContainerBindings> {
        let named: Vec<ContainerRef> = self.projection.containers();
        if named.is_empty() {
            return Ok(ContainerBindings::new());
        }
        let previous = self.store(|s| s.container_bindings())?;
        let found = self.store(|s| {
            let mut found = Found::default();
            let mut anchors: Vec<Anchor> =
                previous.iter().filter_map(|b| b.anchor.clone()).collect();
            for r in &named {
                match r {
                    ContainerRef::Dn(dn) => {
                        if let Some(a) = s.anchor_by_dn(dn)? {
                            found.at.insert(dn.clone(), a.clone());
                            anchors.push(a);
                        }
                    }
                    ContainerRef::Anchor(a) => anchors.push(a.clone()),
                }
            }
            for a in anchors {
                if found.located.contains_key(&a) {
                    continue;
                }
                if let Some(e) = s.source_entry(&a)? {
                    found.located.insert(a, e.dn);
                }
            }
            Ok(found)
        })?;
        let bindings = ContainerBindings::resolve(&named, &found, &previous);
        if bindings != previous {
            for b in bindings.iter() {
                let was = previous.get(&b.reference);
                if was == Some(b) {
                    continue;
                }
                match (&b.anchor, b.present) {
                    (None, _) => warn!(
                        container = %b.reference,
                        "no container of the source mirror has this DN: objects are placed by \
                         the DN alone, and a rename of the container would take them out of \
                         scope (import the containers: map their object class to an object type \
                         in the source and let its filter take them)"
                    ),
                    (Some(a), false) => warn!(
                        container = %b.reference,
                        anchor = %a,
                        "the container is gone from the source mirror: it takes nothing into \
                         scope any more"
                    ),
                    (Some(a), true) => debug!(
                        container = %b.reference,
                        anchor = %a,
                        dn = ?b.dn,
                        "container bound"
                    ),
                }
            }
            self.store(|s| s.set_container_bindings(&bindings))?;
        }
        Ok(bindings)
    }
}
