//! Guards: checks that hold a whole plan before its first write.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::plan::{GuardViolation, Plan};
use super::state::Links;
use crate::model::ObjectType;

/// The deletion guard: a plan that would delete or disable more objects of one target type than
/// its limit is held before its first write — and one where more than `max_container_wave` of
/// them leave a rule's container scope under one container, whatever the ratio.
///
/// The limit for a type with `linked` linked objects is
/// `min(max_count, max(floor, ⌊max_ratio × linked⌋))`: the share applies above a floor, so a
/// small directory is not held for one or two ordinary leavers (with 2 linked users, 10 % is 0),
/// and `max_count` caps the share for large ones. On by default: at most 500 objects, 10 % of
/// the linked ones above a floor of 10.
///
/// For comparison: Microsoft Entra Connect Sync stops an export that holds more than 500
/// deletes by default ("prevent accidental deletes", `Enable-ADSyncExportDeletionThreshold`),
/// a count with no share; its tenant setting (`onPremisesAccidentalDeletionPrevention`) is
/// either a count or a percentage. Entra provisioning's "accidental deletions threshold" is a
/// count of disables and deletes per cycle, above which the job is quarantined until an
/// administrator allows them. Both count disables with deletes, as this guard does.
///
/// ```
/// use dirsync::delta::DeletionGuard;
/// let g = DeletionGuard::default();
/// assert_eq!(g.limit(2), 10);         // the floor: a small directory is not held
/// assert_eq!(g.limit(300), 30);       // 10 %
/// assert_eq!(g.limit(100_000), 500);  // the cap
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeletionGuard {
    /// Whether the guard is on.
    pub enabled: bool,
    /// The most deletions per target type.
    pub max_count: usize,
    /// The most deletions per target type as a share of its linked objects (0.1 = 10 %), above
    /// `floor`.
    pub max_ratio: f64,
    /// The share never holds this many deletions or fewer (`max_count` still does, if lower).
    pub floor: usize,
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
            floor: 10,
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
        self.max_count.min(by_ratio.max(self.floor))
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
    fn limit_is_the_ratio_above_the_floor_under_the_count() {
        let g = DeletionGuard::default();
        assert_eq!(g.limit(100), 10);
        assert_eq!(g.limit(101), 10);
        assert_eq!(g.limit(250), 25);
        assert_eq!(g.limit(100_000), 500);
        // Small directories: the floor, not 10 % of almost nothing.
        for linked in [0, 1, 2, 5, 99] {
            assert_eq!(g.limit(linked), 10, "{linked}");
        }
        let no_floor = DeletionGuard {
            floor: 0,
            ..DeletionGuard::default()
        };
        assert_eq!(no_floor.limit(5), 0);
        assert_eq!(no_floor.limit(2), 0);
        // The count caps the floor too.
        let strict = DeletionGuard {
            max_count: 3,
            ..DeletionGuard::default()
        };
        assert_eq!(strict.limit(2), 3);
        assert_eq!(strict.limit(10_000), 3);
        // A broken ratio counts as none: the floor still lets a few through.
        let nan = DeletionGuard {
            max_ratio: f64::NAN,
            ..DeletionGuard::default()
        };
        assert_eq!(nan.limit(1000), 10);
    }

    #[test]
    fn a_config_without_a_floor_gets_the_default() {
        let g: DeletionGuard = serde_json::from_str(r#"{"max_count": 50}"#).unwrap();
        assert_eq!((g.max_count, g.floor, g.max_ratio), (50, 10, 0.10));
        let g: DeletionGuard = serde_json::from_str(r#"{"floor": 0}"#).unwrap();
        assert_eq!(g.limit(2), 0);
    }
}
