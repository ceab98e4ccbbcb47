//! What the engine does when it learns a target object is gone: the target mirror forgets it,
//! and the store marks the object linked to it and that object's referrers dirty, so the next
//! plan re-creates it (a linked object whose target object is missing) and points its
//! referrers at the new one — instead of retrying an update of nothing.
//!
//! The decision ([`gone_object`]) is the ledger's; the driver forgets the object
//! (`StateStore::remove_target_objects`) in order with the export's other writes.

use super::is_not_found;
use crate::connector::{ConnectorError, TargetOperation};
use crate::delta::{Operation, OperationKind};
use crate::model::TargetId;

/// After `op` failed with `error` as sent as `sent`: the target object it changes, when the
/// target says that object does not exist — to forget it, and to report the failure without
/// escrow; otherwise `None` (a delete of an object already gone has its effect; a create
/// changes nothing existing).
pub(super) fn gone_object<'a>(
    op: &Operation,
    sent: &'a TargetOperation,
    error: &ConnectorError,
) -> Option<&'a TargetId> {
    let changes_existing = matches!(
        op.kind,
        OperationKind::Update { .. }
            | OperationKind::UpdateReferences { .. }
            | OperationKind::Disable { .. }
            | OperationKind::Join { .. }
    );
    match sent {
        TargetOperation::Update { id, .. } if changes_existing && is_not_found(error) => Some(id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::ErrorKind;
    use crate::delta::{Reason, TargetRef};

    fn op(kind: OperationKind) -> Operation {
        Operation {
            anchor: "a".into(),
            source_type: "user".into(),
            target_type: "User".into(),
            kind,
            reason: Reason::EnteredScope,
        }
    }

    #[test]
    fn only_a_not_found_update_of_an_existing_object_is_gone() {
        let update = op(OperationKind::Update {
            target: TargetRef::Existing("t1".into()),
            changes: Vec::new(),
        });
        let sent = TargetOperation::Update {
            id: "t1".into(),
            object_type: "User".into(),
            changes: Vec::new(),
        };
        let not_found = ConnectorError::new(ErrorKind::NotFound, "no such object");
        let refused = ConnectorError::new(ErrorKind::Constraint, "no");
        assert_eq!(gone_object(&update, &sent, &not_found), Some(&"t1".into()));
        assert_eq!(gone_object(&update, &sent, &refused), None);
        let delete = op(OperationKind::Delete {
            target_id: "t1".into(),
        });
        let sent_delete = TargetOperation::Delete {
            id: "t1".into(),
            object_type: "User".into(),
        };
        assert_eq!(gone_object(&delete, &sent_delete, &not_found), None);
    }
}
