//! What the engine does when it learns a target object is gone: the target mirror forgets it,
//! and the store marks the object linked to it and that object's referrers dirty, so the next
//! plan re-creates it (a linked object whose target object is missing) and points its
//! referrers at the new one — instead of retrying an update of nothing.

use tracing::info;

use super::export::OpFailure;
use super::{is_not_found, Synchronizer};
use crate::connector::{ConnectorError, TargetOperation};
use crate::delta::{Operation, OperationKind};

impl Synchronizer {
    /// After `op` failed with `error` as sent as `sent`: when the target says the object the
    /// operation changes does not exist, forgets it (see the module documentation) and
    /// answers the failure to report without escrow; otherwise `None`.
    pub(super) fn target_gone(
        &self,
        op: &Operation,
        sent: &TargetOperation,
        error: &ConnectorError,
    ) -> Result<Option<OpFailure>, OpFailure> {
        let changes_existing = matches!(
            op.kind,
            OperationKind::Update { .. }
                | OperationKind::UpdateReferences { .. }
                | OperationKind::Disable { .. }
                | OperationKind::Join { .. }
        );
        let (true, true, TargetOperation::Update { id, .. }) =
            (changes_existing, is_not_found(error), sent)
        else {
            return Ok(None);
        };
        info!(id = %id, "the target object is gone: forgotten, to be planned again");
        self.with_store(|s| s.remove_target_objects(std::slice::from_ref(id)))
            .map_err(OpFailure::State)?;
        Ok(Some(OpFailure::Gone {
            error: error.to_string(),
        }))
    }
}
