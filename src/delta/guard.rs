//! Guards: checks that hold a whole plan before its first write.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::plan::{GuardViolation, Plan};
use super::state::Links;
use crate::model::ObjectType;

/// The deletion guard: a plan that would delete or disable more objects of one target type than
/// `min(max_count, max_ratio × linked)` is held — and one where more than `max_container_wave`
/// of them leave a rule's container scope under one container, whatever the ratio.
///
/// On by default with Entra's accidental-deletion defaults: 500 objects or 10 % of the linked
/// objects of the type, whichever is smaller.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeletionGuard {
    /// Whether the guard is on.
    pub enabled: bool,
    /// The most deletions per target type.
    pub max_count: usize,
    /// The most deletions per target type as a share of its linked objects (0.1 = 10 %).
    pub max_ratio: f64,
    /// The most deletions (or disables) of one target type that one container may cause at
    /// once, whatever the ratio: objects that leave a rule's container scope under one
    /// container — it was moved out of an included subtree or into an excluded one, or deleted
    /// while they stayed — are a wave, held above this count (default 5).
    pub max_container_wave: usize,
}

impl Default for DeletionGuard {
    fn default() -> Self {
        DeletionGuard {
            enabled: true,
            max_count: 500,
            max_ratio: 0.10,
            max_container_wave: 5,
        }
    }
}

impl DeletionGuard {
    /// A guard that never holds a plan.
    pub fn off() -> DeletionGuard {
        DeletionGuard {
            enabled: false,
            ..DeletionGuard::default()
        }
    }

    /// The most deletions allowed when `linked` objects of a type are linked.
    pub fn limit(&self, linked: usize) -> usize {
        let by_ratio = (linked as f64 * self.max_ratio).floor();
        let by_ratio = if by_ratio.is_finite() && by_ratio >= 0.0 {
            by_ratio as usize
        } else {
            0
        };
        self.max_count.min(by_ratio)
    }

    /// The violations of `plan`, per target type, sorted by type.
    pub fn check(&self, plan: &Plan, links: &Links) -> Vec<GuardViolation> {
        self.check_with(plan, |ty| links.count(ty))
    }

    /// The violations of `plan` given the number of linked objects of each target type — for a
    /// delta plan, whose link table holds only a neighbourhood, the counts come from the store.
    pub fn check_with(
        &self,
        plan: &Plan,
        linked: impl Fn(&ObjectType) -> usize,
    ) -> Vec<GuardViolation> {
        if !self.enabled {
            return Vec::new();
        }
        let mut deletions: BTreeMap<&ObjectType, usize> = BTreeMap::new();
        for op in plan.operations.iter().filter(|o| o.kind.is_deletion()) {
            *deletions.entry(&op.target_type).or_default() += 1;
        }
        let mut violations: Vec<GuardViolation> = deletions
            .into_iter()
            .filter_map(|(ty, n)| {
                let linked = linked(ty);
                let limit = self.limit(linked);
                (n > limit).then(|| GuardViolation {
                    target_type: ty.clone(),
                    deletions: n,
                    linked,
                    limit,
                    container: None,
                })
            })
            .collect();
        violations.extend(super::containers::waves(
            plan,
            self.max_container_wave,
            &linked,
        ));
        violations
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_is_the_smaller_of_count_and_ratio() {
        let g = DeletionGuard::default();
        assert_eq!(g.limit(100), 10);
        assert_eq!(g.limit(100_000), 500);
        assert_eq!(g.limit(5), 0);
    }
}
