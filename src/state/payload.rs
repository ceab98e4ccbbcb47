//! The journal's payloads: how an intended operation's target form (`sent`) is written.
//!
//! The target operation of a journal row is, as a rule, its planned operation with each pending
//! reference (a create of the same run) translated to the new object's id. Written out in full
//! it repeats every attribute of the planned operation — for a create, the whole object a
//! second time. So when the planned operation, translated through those references alone, gives
//! the target operation back exactly, only the translations are written:
//! `{"derived":{"<anchor>":"<target id>",…}}`; otherwise the target operation itself, as JSON.
//! Both are read back to the same [`TargetOperation`]; of the two, the shorter is written.
//! Pure: no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::connector::TargetOperation;
use crate::delta::{Link, Links, Operation, OperationKind};
use crate::model::{Anchor, Reference, TargetId, Value, Values};

/// The compact form of a target operation derived from its planned operation.
#[derive(Serialize, Deserialize)]
struct Derived<'a> {
    /// Pending reference (the anchor of a create) → the id it was translated to.
    #[serde(borrow)]
    derived: BTreeMap<&'a str, &'a str>,
}

/// The compact form's first bytes (a [`TargetOperation`]'s JSON starts with its tag, `"op"`).
const DERIVED_PREFIX: &str = "{\"derived\":";

/// Translations below which the compact form is taken as the shorter without a comparison.
const FEW: usize = 8;

/// Writes `sent` — the target operation of `op`, both already redacted — into `out` (cleared
/// first): the compact form when `op` gives `sent` back through its pending references' ids
/// alone, else `sent` as JSON.
pub(super) fn write_sent(
    op: &Operation,
    sent: &TargetOperation,
    out: &mut Vec<u8>,
) -> serde_json::Result<()> {
    out.clear();
    if let Some(map) = translations(op, sent) {
        let links = links(op, map.iter().map(|(a, t)| (*a, *t)));
        if op.to_target_operation(&links).ok().flatten().as_ref() == Some(sent) {
            let derived = Derived {
                derived: map.iter().map(|(a, t)| (a.as_str(), t.as_str())).collect(),
            };
            serde_json::to_writer(&mut *out, &derived)?;
            // An anchor is often longer than the id it became: an operation that is mostly
            // references (a group's members) may be shorter written whole.
            if map.len() <= FEW {
                return Ok(());
            }
            let mut whole = Vec::new();
            serde_json::to_writer(&mut whole, sent)?;
            if whole.len() < out.len() {
                *out = whole;
            }
            return Ok(());
        }
    }
    serde_json::to_writer(out, sent)
}

/// Reads what [`write_sent`] wrote for `op` (the planned operation as journaled).
pub(super) fn read_sent(op: &Operation, text: &str) -> Result<TargetOperation, String> {
    if !text.starts_with(DERIVED_PREFIX) {
        return serde_json::from_str(text).map_err(|e| e.to_string());
    }
    let derived: Derived<'_> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let pairs: Vec<(Anchor, TargetId)> = derived
        .derived
        .iter()
        .map(|(a, t)| (Anchor::from(*a), TargetId::from(*t)))
        .collect();
    let links = links(op, pairs.iter().map(|(a, t)| (a, t)));
    match op.to_target_operation(&links) {
        Ok(Some(sent)) => Ok(sent),
        Ok(None) => Err("the operation sends nothing".into()),
        Err(e) => Err(format!("a translation is missing: {e}")),
    }
}

/// The links that translate `pairs` (anchor → target id), typed as `op`'s object.
fn links<'a>(op: &Operation, pairs: impl Iterator<Item = (&'a Anchor, &'a TargetId)>) -> Links {
    let mut links = Links::new();
    for (anchor, target_id) in pairs {
        links.insert(Link {
            anchor: anchor.clone(),
            source_type: op.source_type.clone(),
            target_id: target_id.clone(),
            target_type: op.target_type.clone(),
        });
    }
    links
}

/// Each pending reference of `op` with the id `sent` has in its place; `None` when the two do
/// not line up (another operation, values added or left out), or one anchor got two ids.
fn translations<'a>(
    op: &'a Operation,
    sent: &'a TargetOperation,
) -> Option<BTreeMap<&'a Anchor, &'a TargetId>> {
    let mut map = BTreeMap::new();
    let mut pair = |planned: &'a Values, sent: &'a Values| -> Option<()> {
        if planned.len() != sent.len() {
            return None;
        }
        for (p, s) in planned.iter().zip(sent.iter()) {
            if let (
                Value::Reference(Reference::Pending(a)),
                Value::Reference(Reference::Target(t)),
            ) = (p, s)
            {
                if *map.entry(a).or_insert(t) != t {
                    return None;
                }
            }
        }
        Some(())
    };
    match (&op.kind, sent) {
        (
            OperationKind::Create { attributes, .. },
            TargetOperation::Create { attributes: s, .. },
        ) => {
            for (name, values) in attributes.iter() {
                if values.iter().any(Value::is_reference) {
                    pair(values, s.get(name.as_str())?)?;
                }
            }
        }
        (
            OperationKind::Join { changes, .. }
            | OperationKind::Update { changes, .. }
            | OperationKind::UpdateReferences { changes, .. }
            | OperationKind::Disable { changes, .. },
            TargetOperation::Update { changes: s, .. },
        ) => {
            if changes.len() != s.len() {
                return None;
            }
            for (c, sc) in changes.iter().zip(s) {
                pair(&c.values, &sc.values)?;
            }
        }
        (OperationKind::Delete { .. }, TargetOperation::Delete { .. }) => {}
        _ => return None,
    }
    Some(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::{Reason, TargetRef};
    use crate::model::{AttributeChange, Attributes};

    fn op(kind: OperationKind) -> Operation {
        Operation {
            anchor: "u1".into(),
            source_type: "user".into(),
            target_type: "User".into(),
            kind,
            reason: Reason::EnteredScope,
        }
    }

    fn round_trip(op: &Operation, sent: &TargetOperation) -> String {
        let mut out = Vec::new();
        write_sent(op, sent, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(read_sent(op, &text).as_ref(), Ok(sent), "{text}");
        text
    }

    #[test]
    fn a_create_is_written_as_its_translations() {
        let mut attributes = Attributes::new();
        attributes.set("userName", Values::from(vec![Value::string("ann")]));
        attributes.set(
            "manager",
            Values::from(vec![Value::Reference(Reference::Pending("boss".into()))]),
        );
        let create = op(OperationKind::Create {
            attributes: attributes.clone(),
            secrets: Attributes::new(),
            lookup: Vec::new(),
        });
        let mut sent_attributes = attributes;
        sent_attributes.set("manager", Values::from(vec![Value::target_ref("t-boss")]));
        let sent = TargetOperation::Create {
            object_type: "User".into(),
            attributes: sent_attributes.clone(),
        };
        assert_eq!(
            round_trip(&create, &sent),
            r#"{"derived":{"boss":"t-boss"}}"#
        );

        // A target operation the planned one does not give: written whole.
        sent_attributes.set("title", Values::from(vec![Value::string("extra")]));
        let other = TargetOperation::Create {
            object_type: "User".into(),
            attributes: sent_attributes,
        };
        assert!(round_trip(&create, &other).starts_with(r#"{"op":"create""#));
    }

    #[test]
    fn a_create_of_references_mostly_is_written_whole_when_shorter() {
        let anchor = |i: usize| Anchor::from(format!("{i:08x}-0000-4000-8000-000000000000"));
        let members = |pending: bool| -> Values {
            (0..20)
                .map(|i| match pending {
                    true => Value::Reference(Reference::Pending(anchor(i))),
                    false => Value::target_ref(format!("n{i}")),
                })
                .collect::<Vec<_>>()
                .into()
        };
        let mut attributes = Attributes::new();
        attributes.set("displayName", Values::from(vec![Value::string("team")]));
        attributes.set("members", members(true));
        let create = op(OperationKind::Create {
            attributes: attributes.clone(),
            secrets: Attributes::new(),
            lookup: Vec::new(),
        });
        attributes.set("members", members(false));
        let sent = TargetOperation::Create {
            object_type: "User".into(),
            attributes,
        };
        assert!(round_trip(&create, &sent).starts_with(r#"{"op":"create""#));
    }

    #[test]
    fn updates_and_deletes_are_written_as_their_translations() {
        let changes = vec![AttributeChange::replace(
            "manager",
            Values::from(vec![Value::Reference(Reference::Pending("boss".into()))]),
        )];
        let update = op(OperationKind::UpdateReferences {
            target: TargetRef::Existing("t-u1".into()),
            changes,
        });
        let sent = TargetOperation::Update {
            id: "t-u1".into(),
            object_type: "User".into(),
            changes: vec![AttributeChange::replace(
                "manager",
                Values::from(vec![Value::target_ref("t-boss")]),
            )],
        };
        assert_eq!(
            round_trip(&update, &sent),
            r#"{"derived":{"boss":"t-boss"}}"#
        );
        // The same anchor translated to two ids cannot be derived.
        let two = TargetOperation::Update {
            id: "t-u1".into(),
            object_type: "User".into(),
            changes: vec![AttributeChange::replace(
                "manager",
                Values::from(vec![Value::target_ref("t-other")]),
            )],
        };
        let twice = op(OperationKind::UpdateReferences {
            target: TargetRef::Existing("t-u1".into()),
            changes: vec![
                AttributeChange::replace(
                    "manager",
                    Values::from(vec![Value::Reference(Reference::Pending("boss".into()))]),
                ),
                AttributeChange::replace(
                    "manager",
                    Values::from(vec![Value::Reference(Reference::Pending("boss".into()))]),
                ),
            ],
        });
        let mut both = vec![];
        if let TargetOperation::Update { changes, .. } = &sent {
            both.extend(changes.iter().cloned());
        }
        if let TargetOperation::Update { changes, .. } = &two {
            both.extend(changes.iter().cloned());
        }
        let sent_twice = TargetOperation::Update {
            id: "t-u1".into(),
            object_type: "User".into(),
            changes: both,
        };
        assert!(round_trip(&twice, &sent_twice).starts_with(r#"{"op":"update""#));

        let delete = op(OperationKind::Delete {
            target_id: "t-u1".into(),
        });
        let sent = TargetOperation::Delete {
            id: "t-u1".into(),
            object_type: "User".into(),
        };
        assert_eq!(round_trip(&delete, &sent), r#"{"derived":{}}"#);
    }

    #[test]
    fn a_compact_form_that_does_not_read_is_an_error() {
        let delete = op(OperationKind::Delete {
            target_id: "t-u1".into(),
        });
        assert!(read_sent(&delete, r#"{"derived":"#).is_err());
        let update = op(OperationKind::UpdateReferences {
            target: TargetRef::Pending("gone".into()),
            changes: Vec::new(),
        });
        assert!(read_sent(&update, r#"{"derived":{}}"#).is_err());
    }
}
