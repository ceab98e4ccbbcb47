//! The [`Plan`]: the ordered operations the planner returns, each with the reason it exists, and
//! everything the planner noticed but could not plan (conflicts, unresolved references, rule
//! errors, guard violations). A plan is a value: it serializes, prints as a table, and is applied
//! later by the engine.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::state::Links;
use crate::connector::TargetOperation;
use crate::model::{
    Anchor, AttrName, AttributeChange, Attributes, ChangeOp, Dn, ObjectType, Reference, TargetId,
    Value, Values,
};

/// The phase an operation belongs to; a plan is ordered by phase, then anchor — creates by
/// level first: a create comes after the creates it references.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Creates of new target objects.
    Create,
    /// Joins and attribute updates.
    Update,
    /// Reference attributes (members, manager), after every object they may point at exists:
    /// the references a create could not carry (those that close a cycle, those the target does
    /// not take in a create) and the reference changes of existing objects.
    References,
    /// Deletes, disables and unlinks.
    Deprovision,
}

/// A target object an operation changes: an existing one, or one a create of this plan makes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetRef {
    /// An existing target object.
    Existing(TargetId),
    /// The object the create for this source anchor makes.
    Pending(Anchor),
}

/// What an operation does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum OperationKind {
    /// Create a target object with these attributes.
    Create {
        /// The attributes. References name objects that exist ([`Reference::Target`]) or that
        /// a create earlier in the plan makes ([`Reference::Pending`]: the engine sends this
        /// create after that one and resolves the reference to the new object's id).
        attributes: Attributes,
        /// Secret attributes (redacted flows): sent with the create, never shown or serialized
        /// with their values.
        #[serde(
            default,
            skip_serializing_if = "Attributes::is_empty",
            serialize_with = "crate::model::serialize_redacted_attributes"
        )]
        secrets: Attributes,
        /// The join groups the new object can be found by (attribute = value, ANDed): after a
        /// crash between sending a create and recording it, the engine looks the object up by
        /// these before anything is re-sent, so a create is never duplicated.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        lookup: Vec<super::JoinGroup>,
    },
    /// Link to an existing target object found by a join, and bring its attributes in line.
    Join {
        /// The joined object.
        target_id: TargetId,
        /// Attribute changes (may be empty).
        changes: Vec<AttributeChange>,
    },
    /// Change attributes of a linked object.
    Update {
        /// The object.
        target: TargetRef,
        /// The changes.
        changes: Vec<AttributeChange>,
    },
    /// Change reference attributes (after the creates of the plan).
    UpdateReferences {
        /// The object.
        target: TargetRef,
        /// The changes; values may be [`Reference::Pending`].
        changes: Vec<AttributeChange>,
    },
    /// Delete a linked object.
    Delete {
        /// The object.
        target_id: TargetId,
    },
    /// Disable a linked object by setting attributes.
    Disable {
        /// The object.
        target_id: TargetId,
        /// The changes that disable it.
        changes: Vec<AttributeChange>,
    },
    /// Forget the link, leave the target object as it is.
    Unlink {
        /// The object.
        target_id: TargetId,
    },
}

impl OperationKind {
    /// The phase of this kind of operation.
    pub fn phase(&self) -> Phase {
        match self {
            OperationKind::Create { .. } => Phase::Create,
            OperationKind::Join { .. } | OperationKind::Update { .. } => Phase::Update,
            OperationKind::UpdateReferences { .. } => Phase::References,
            OperationKind::Delete { .. }
            | OperationKind::Disable { .. }
            | OperationKind::Unlink { .. } => Phase::Deprovision,
        }
    }

    /// A short name: `create`, `join`, `update`, `references`, `delete`, `disable`, `unlink`.
    pub fn name(&self) -> &'static str {
        match self {
            OperationKind::Create { .. } => "create",
            OperationKind::Join { .. } => "join",
            OperationKind::Update { .. } => "update",
            OperationKind::UpdateReferences { .. } => "references",
            OperationKind::Delete { .. } => "delete",
            OperationKind::Disable { .. } => "disable",
            OperationKind::Unlink { .. } => "unlink",
        }
    }

    /// Whether the guard counts this operation as a deletion (deletes and disables).
    pub fn is_deletion(&self) -> bool {
        matches!(
            self,
            OperationKind::Delete { .. } | OperationKind::Disable { .. }
        )
    }
}

/// Why an operation exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum Reason {
    /// The object is in scope and has no target object yet.
    EnteredScope,
    /// The linked target object is gone from the target; it is created again.
    TargetMissing,
    /// An unlinked object matched exactly one target object in this join group.
    Joined {
        /// The index of the join group that matched (0-based).
        group: usize,
        /// The attributes and values it matched on.
        on: Vec<(AttrName, Value)>,
    },
    /// Managed attributes differ from the target (the changes carry old and new values).
    AttributesChanged {
        /// The attributes that differ.
        attributes: Vec<AttrName>,
    },
    /// The object left scope.
    LeftScope {
        /// Why it is out of scope.
        why: String,
        /// When it left because of where it is — a rule's container scope (see
        /// [`ContainerScope`](super::ContainerScope)) — the container it is in now (its parent
        /// DN). The deletion guard holds a wave of these under one container.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        container: Option<Dn>,
    },
    /// The object was deleted at the source.
    DeletedAtSource,
    /// The object is in scope, but the rules now make a target object of another type: the
    /// operation deprovisions the old object, or creates (joins) the new one.
    TargetTypeChanged {
        /// The linked object's type.
        from: ObjectType,
        /// The type the rules now make.
        to: ObjectType,
    },
    /// The object is in scope again and its target object, disabled when it left, is
    /// re-enabled (the changes may carry other attributes too).
    Reenabled {
        /// The attributes that re-enable it.
        attributes: Vec<AttrName>,
    },
}

impl Reason {
    /// The deprovision cause, for the reason of a deprovision (and of the create that replaces
    /// an object of another type).
    pub fn cause(&self) -> Option<super::DeprovisionCause> {
        use super::DeprovisionCause as C;
        match self {
            Reason::LeftScope { .. } => Some(C::LeftScope),
            Reason::DeletedAtSource => Some(C::DeletedAtSource),
            Reason::TargetTypeChanged { .. } => Some(C::TypeChanged),
            _ => None,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::EnteredScope => f.write_str("entered scope"),
            Reason::TargetMissing => f.write_str("target object missing"),
            Reason::Joined { group, on } => {
                write!(f, "joined by group {}:", group + 1)?;
                for (a, v) in on {
                    write!(f, " {a}={v}")?;
                }
                Ok(())
            }
            Reason::AttributesChanged { attributes } => {
                f.write_str("changed:")?;
                for a in attributes {
                    write!(f, " {a}")?;
                }
                Ok(())
            }
            Reason::LeftScope { why, .. } => write!(f, "left scope ({why})"),
            Reason::DeletedAtSource => f.write_str("deleted at source"),
            Reason::TargetTypeChanged { from, to } => {
                write!(f, "target type changed: {from} → {to}")
            }
            Reason::Reenabled { attributes } => {
                f.write_str("back in scope: re-enabled by")?;
                for a in attributes {
                    write!(f, " {a}")?;
                }
                Ok(())
            }
        }
    }
}

/// One planned operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    /// The source object.
    pub anchor: Anchor,
    /// The source object type.
    pub source_type: ObjectType,
    /// The target object type.
    pub target_type: ObjectType,
    /// What to do.
    #[serde(flatten)]
    pub kind: OperationKind,
    /// Why.
    #[serde(flatten)]
    pub reason: Reason,
}

/// A pending reference in an operation whose create has not been exported (yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("object {anchor}: references the new object for {pending}, which has not been created")]
pub struct PendingReference {
    /// The operation's source object.
    pub anchor: Anchor,
    /// The anchor whose create is missing.
    pub pending: Anchor,
}

impl Operation {
    /// The phase of the operation.
    pub fn phase(&self) -> Phase {
        self.kind.phase()
    }

    /// The target operation to send, with pending references resolved through `links` (a
    /// create is exported before the operations that reference its object, and links it).
    /// `None` for an unlink, or a join without changes: they touch only the link table. A
    /// pending reference to an object not linked is an error; see
    /// [`without_unresolved`](Self::without_unresolved).
    pub fn to_target_operation(
        &self,
        links: &Links,
    ) -> Result<Option<TargetOperation>, PendingReference> {
        let resolve_target = |t: &TargetRef| -> Result<TargetId, PendingReference> {
            match t {
                TargetRef::Existing(id) => Ok(id.clone()),
                TargetRef::Pending(a) => {
                    links
                        .get(a)
                        .map(|l| l.target_id.clone())
                        .ok_or_else(|| PendingReference {
                            anchor: self.anchor.clone(),
                            pending: a.clone(),
                        })
                }
            }
        };
        let resolve_values = |values: &Values| -> Result<Values, PendingReference> {
            values
                .iter()
                .map(|v| match v {
                    Value::Reference(Reference::Pending(a)) => Ok(Value::Reference(
                        Reference::Target(resolve_target(&TargetRef::Pending(a.clone()))?),
                    )),
                    other => Ok(other.clone()),
                })
                .collect()
        };
        let resolve_changes =
            |changes: &[AttributeChange]| -> Result<Vec<AttributeChange>, PendingReference> {
                changes
                    .iter()
                    .map(|c| {
                        Ok(AttributeChange {
                            values: resolve_values(&c.values)?,
                            ..c.clone()
                        })
                    })
                    .collect()
            };
        let ty = self.target_type.clone();
        Ok(match &self.kind {
            OperationKind::Create {
                attributes,
                secrets,
                ..
            } => {
                let mut all = Attributes::with_capacity(attributes.len() + secrets.len());
                for (n, v) in attributes.iter() {
                    if v.iter().any(Value::is_reference) {
                        all.set(n.clone(), resolve_values(v)?);
                    } else {
                        all.set(n.clone(), v.clone());
                    }
                }
                for (n, v) in secrets.iter() {
                    all.set(n.clone(), v.clone());
                }
                Some(TargetOperation::Create {
                    object_type: ty,
                    attributes: all,
                })
            }
            OperationKind::Join { changes, .. } if changes.is_empty() => None,
            OperationKind::Join { target_id, changes } => Some(TargetOperation::Update {
                id: target_id.clone(),
                object_type: ty,
                changes: resolve_changes(changes)?,
            }),
            OperationKind::Update { target, changes }
            | OperationKind::UpdateReferences { target, changes } => {
                Some(TargetOperation::Update {
                    id: resolve_target(target)?,
                    object_type: ty,
                    changes: resolve_changes(changes)?,
                })
            }
            OperationKind::Disable { target_id, changes } => Some(TargetOperation::Update {
                id: target_id.clone(),
                object_type: ty,
                changes: changes.clone(),
            }),
            OperationKind::Delete { target_id } => Some(TargetOperation::Delete {
                id: target_id.clone(),
                object_type: ty,
            }),
            OperationKind::Unlink { .. } => None,
        })
    }
}

impl Operation {
    /// The operation without the reference values that point at creates with no link — creates
    /// that failed, or were held back, in this run — or `None` when every pending reference
    /// resolves (or the operation has none). A create is still sent without them, so its object
    /// is not lost with the one it references: what is left out waits for a later write (the
    /// engine keeps the object dirty, and its next plan brings the references).
    pub fn without_unresolved(&self, links: &Links) -> Option<Operation> {
        self.without_unresolved_replacing(links, &HashMap::new())
    }

    /// [`Operation::without_unresolved`] in a plan that creates new objects for anchors still
    /// linked to old ones (`replaced`: anchor → old target object, [`Plan::replaced`]): a pending
    /// reference to such an anchor resolves only once its link names the new object, and until
    /// then the old object stays referenced — its removal is left out too.
    pub fn without_unresolved_replacing(
        &self,
        links: &Links,
        replaced: &HashMap<Anchor, TargetId>,
    ) -> Option<Operation> {
        let resolvable = |v: &Value| match v {
            Value::Reference(Reference::Pending(a)) => links
                .get(a)
                .is_some_and(|l| replaced.get(a) != Some(&l.target_id)),
            _ => true,
        };
        let all_values: Box<dyn Iterator<Item = &Value>> = match &self.kind {
            OperationKind::Create { attributes, .. } => {
                Box::new(attributes.iter().flat_map(|(_, vs)| vs.iter()))
            }
            OperationKind::UpdateReferences { changes, .. } => {
                Box::new(changes.iter().flat_map(|c| c.values.iter()))
            }
            _ => return None,
        };
        let still_old: HashSet<&TargetId> = all_values
            .filter(|v| !resolvable(v))
            .filter_map(|v| match v {
                Value::Reference(Reference::Pending(a)) => replaced.get(a),
                _ => None,
            })
            .collect();
        let unresolved = |v: &Value| {
            !resolvable(v)
                || matches!(v, Value::Reference(Reference::Target(id)) if still_old.contains(id))
        };
        let kind = match &self.kind {
            OperationKind::Create {
                attributes,
                secrets,
                lookup,
            } => {
                if !attributes.iter().any(|(_, vs)| vs.iter().any(unresolved)) {
                    return None;
                }
                let mut kept = Attributes::with_capacity(attributes.len());
                for (n, vs) in attributes.iter() {
                    let vs: Values = vs.iter().filter(|v| !unresolved(v)).cloned().collect();
                    if !vs.is_empty() {
                        kept.set(n.clone(), vs);
                    }
                }
                OperationKind::Create {
                    attributes: kept,
                    secrets: secrets.clone(),
                    lookup: lookup.clone(),
                }
            }
            OperationKind::UpdateReferences { target, changes } => {
                if !changes.iter().any(|c| c.values.iter().any(unresolved)) {
                    return None;
                }
                let mut kept = Vec::with_capacity(changes.len());
                for c in changes {
                    let mut c = c.clone();
                    c.values.retain(|v| !unresolved(v));
                    if !c.values.is_empty() || c.op == ChangeOp::Replace {
                        kept.push(c);
                    }
                }
                OperationKind::UpdateReferences {
                    target: target.clone(),
                    changes: kept,
                }
            }
            _ => return None,
        };
        Some(Operation {
            kind,
            ..self.clone()
        })
    }
}

/// Something the planner noticed and did not plan; reported with the object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "issue")]
pub enum Issue {
    /// More than one target object matched a join group: nothing is created or joined.
    JoinConflict {
        /// The source object.
        anchor: Anchor,
        /// The join group (0-based).
        group: usize,
        /// The candidates.
        candidates: Vec<TargetId>,
    },
    /// Two source objects of this plan joined the same target object: neither is joined.
    DuplicateJoin {
        /// The target object.
        target_id: TargetId,
        /// The source objects.
        anchors: Vec<Anchor>,
    },
    /// A reference value points at an object that has no target object and none is planned.
    UnresolvedReference {
        /// The referring source object.
        anchor: Anchor,
        /// The attribute.
        attribute: AttrName,
        /// The reference, as text.
        reference: String,
    },
    /// The rules failed for this object.
    ProjectionFailed {
        /// The source object.
        anchor: Anchor,
        /// The error.
        error: super::ProjectionError,
    },
    /// The object is in scope but held back.
    Held {
        /// The source object.
        anchor: Anchor,
        /// Why.
        reason: String,
    },
}

impl Issue {
    /// The source object the issue is about (the first, for a duplicate join).
    pub fn anchor(&self) -> Option<&Anchor> {
        match self {
            Issue::JoinConflict { anchor, .. }
            | Issue::UnresolvedReference { anchor, .. }
            | Issue::ProjectionFailed { anchor, .. }
            | Issue::Held { anchor, .. } => Some(anchor),
            Issue::DuplicateJoin { anchors, .. } => anchors.first(),
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Issue::JoinConflict {
                anchor,
                group,
                candidates,
            } => {
                write!(
                f,
                "{anchor}: join group {} matches {} target objects ({}); not joined, not created",
                group + 1,
                candidates.len(),
                candidates.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", ")
            )
            }
            Issue::DuplicateJoin { target_id, anchors } => write!(
                f,
                "target object {target_id} matches {} source objects ({}); none joined",
                anchors.len(),
                anchors
                    .iter()
                    .map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Issue::UnresolvedReference {
                anchor,
                attribute,
                reference,
            } => write!(
                f,
                "{anchor}: {attribute} references {reference}, which has no target object"
            ),
            Issue::ProjectionFailed { anchor, error } => write!(f, "{anchor}: {error}"),
            Issue::Held { anchor, reason } => write!(f, "{anchor}: held: {reason}"),
        }
    }
}

/// A guard that holds the whole plan: more deletions (deletes and disables) of one target type
/// than allowed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuardViolation {
    /// The target object type.
    pub target_type: ObjectType,
    /// Deletions planned.
    pub deletions: usize,
    /// Objects of that type linked before the plan.
    pub linked: usize,
    /// The most deletions allowed.
    pub limit: usize,
    /// For a container wave: the container under which `deletions` objects left the rules'
    /// container scope at once (`limit` is then the guard's `max_container_wave`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<Dn>,
}

impl fmt::Display for GuardViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(c) = &self.container {
            return write!(
                f,
                "deletion guard: {} linked {} objects under {c} left the rules' container scope \
                 at once (the container was moved or renamed out of an included subtree or into \
                 an excluded one, deleted, or the rules' containers changed); the limit for one \
                 container is {}",
                self.deletions, self.target_type, self.limit
            );
        }
        write!(
            f,
            "deletion guard: {} of {} linked {} objects would be deleted or disabled; the limit is {}",
            self.deletions, self.linked, self.target_type, self.limit
        )
    }
}

/// Counts of what the planner saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanStats {
    /// Source objects considered.
    pub considered: usize,
    /// Of those, in scope.
    pub in_scope: usize,
    /// In scope, linked and already as desired.
    pub unchanged: usize,
    /// Reference values left out because the object they name is in the source mirror but has
    /// no target object and none is planned (it is out of scope, or leaves the target in this
    /// plan): ordinary, not an [`Issue`]. A reference to an object the mirror does not hold is
    /// an [`Issue::UnresolvedReference`].
    #[serde(default)]
    pub out_of_scope_references: usize,
}

/// The plan: operations in order, issues, guard violations.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The operations, ordered by phase, then anchor.
    pub operations: Vec<Operation>,
    /// What could not be planned.
    pub issues: Vec<Issue>,
    /// Guards the plan violates; the engine refuses such a plan unless allowed explicitly.
    pub guard_violations: Vec<GuardViolation>,
    /// Counts.
    pub stats: PlanStats,
}

impl Plan {
    /// The objects this plan creates anew for anchors that `links` still links to old ones (a
    /// changed target type, a target object gone): anchor → the old target object, named by the
    /// link until the create succeeds (see [`Operation::without_unresolved_replacing`]).
    pub fn replaced(&self, links: &Links) -> HashMap<Anchor, TargetId> {
        self.operations
            .iter()
            .filter(|o| matches!(o.kind, OperationKind::Create { .. }))
            .filter_map(|o| Some((o.anchor.clone(), links.get(&o.anchor)?.target_id.clone())))
            .collect()
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.operations.is_empty()
    }

    /// Whether a guard holds the plan.
    pub fn is_held(&self) -> bool {
        !self.guard_violations.is_empty()
    }

    /// Number of operations of a kind (`"create"`, `"update"`, …; see [`OperationKind::name`]).
    pub fn count(&self, kind: &str) -> usize {
        self.operations
            .iter()
            .filter(|o| o.kind.name() == kind)
            .count()
    }
}

fn show_values(values: &Values, redacted: bool) -> String {
    if redacted {
        return "(redacted)".into();
    }
    const MAX: usize = 3;
    let mut parts: Vec<String> = values.iter().take(MAX).map(|v| format!("{v}")).collect();
    if values.len() > MAX {
        parts.push(format!("… {} more", values.len() - MAX));
    }
    if parts.is_empty() {
        "(none)".into()
    } else {
        parts.join(", ")
    }
}

fn show_change(c: &AttributeChange) -> String {
    match c.op {
        ChangeOp::Add => format!("{} += {}", c.attribute, show_values(&c.values, c.redacted)),
        ChangeOp::Remove => format!("{} -= {}", c.attribute, show_values(&c.values, c.redacted)),
        ChangeOp::Replace if c.old.is_empty() => {
            format!("{} = {}", c.attribute, show_values(&c.values, c.redacted))
        }
        ChangeOp::Replace => format!(
            "{}: {} → {}",
            c.attribute,
            show_values(&c.old, c.redacted),
            show_values(&c.values, c.redacted)
        ),
    }
}

impl fmt::Display for Plan {
    /// A human table: one row per operation (with its changes below it), then issues and guard
    /// violations. Redacted values are never shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.operations.is_empty() {
            writeln!(
                f,
                "nothing to do ({} objects considered)",
                self.stats.considered
            )?;
        } else {
            let w_anchor = self
                .operations
                .iter()
                .map(|o| o.anchor.as_str().chars().count())
                .max()
                .unwrap_or(6)
                .clamp(6, 40);
            writeln!(
                f,
                "{:>4}  {:<10}  {:<10}  {:<w$}  {:<14}  reason",
                "#",
                "operation",
                "type",
                "anchor",
                "target",
                w = w_anchor
            )?;
            for (i, op) in self.operations.iter().enumerate() {
                let target = match &op.kind {
                    OperationKind::Create { .. } => "(new)".to_string(),
                    OperationKind::Update { target, .. }
                    | OperationKind::UpdateReferences { target, .. } => match target {
                        TargetRef::Existing(id) => id.to_string(),
                        TargetRef::Pending(_) => "(new)".to_string(),
                    },
                    OperationKind::Join { target_id, .. }
                    | OperationKind::Delete { target_id }
                    | OperationKind::Disable { target_id, .. }
                    | OperationKind::Unlink { target_id } => target_id.to_string(),
                };
                writeln!(
                    f,
                    "{:>4}  {:<10}  {:<10}  {:<w$}  {:<14}  {}",
                    i + 1,
                    op.kind.name(),
                    op.target_type.as_str(),
                    op.anchor.as_str(),
                    target,
                    op.reason,
                    w = w_anchor
                )?;
                let lines: Vec<String> = match &op.kind {
                    OperationKind::Create {
                        attributes,
                        secrets,
                        ..
                    } => attributes
                        .iter()
                        .map(|(n, v)| format!("{n} = {}", show_values(v, false)))
                        .chain(secrets.iter().map(|(n, _)| format!("{n} = (redacted)")))
                        .collect(),
                    OperationKind::Join { changes, .. }
                    | OperationKind::Update { changes, .. }
                    | OperationKind::UpdateReferences { changes, .. }
                    | OperationKind::Disable { changes, .. } => {
                        changes.iter().map(show_change).collect()
                    }
                    _ => Vec::new(),
                };
                for l in lines {
                    writeln!(f, "{:>4}  {:>10}  {l}", "", "")?;
                }
            }
        }
        for issue in &self.issues {
            writeln!(f, "issue: {issue}")?;
        }
        for g in &self.guard_violations {
            writeln!(f, "HELD: {g}")?;
        }
        Ok(())
    }
}
