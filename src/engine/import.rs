//! The engine's import entry points around the readers in the parent module: two objects with
//! one anchor become [`EngineError::DuplicateAnchor`], and the full-import cycle
//! ([`Synchronizer::full_import_cycle`]).

use tracing::{warn, Instrument};

use super::{EngineError, Result, RunReport, Synchronizer};
use crate::state::StateError;

impl Synchronizer {
    /// A full import (see [`Synchronizer::full_import`]).
    pub(super) async fn full_import_inner(&mut self) -> Result<RunReport> {
        let result = duplicate_anchor(self.full_import_read().await, "full import");
        if let Err(EngineError::DuplicateAnchor { .. }) = &result {
            // Earlier batches of this import may be in the mirror: forget the watermark so
            // that no delta builds on an import that did not finish.
            let name = self.source.name().to_string();
            self.store(|s| s.clear_watermark(&name))?;
        }
        result
    }

    /// A delta import (see [`Synchronizer::delta_import`]). A batch holding two objects with
    /// one anchor was not applied, and its watermark not committed.
    pub(super) async fn delta_import_inner(&mut self) -> Result<RunReport> {
        duplicate_anchor(self.delta_import_read().await, "delta import")
    }

    /// Full import, then delta sync: every object of the source is read again, whatever the
    /// watermark says, and what changed in the mirror is planned and exported. The cycle to
    /// run when a delta cannot see a change: after the source's filter or base changed (objects
    /// that entered or left it without changing), after the state was restored from a backup,
    /// or periodically for delta modes that miss some changes (`usn_changed` does not see an
    /// object that moved out of the base or stopped matching the filter). Deletions it finds
    /// go through the deletion guard like any other.
    pub async fn full_import_cycle(&mut self) -> Result<RunReport> {
        let start = self.begin("full-import-cycle")?;
        let run = start.run;
        let result = async {
            let mut report = self.full_import_inner().await?;
            report.absorb(self.sync_inner(run, false).await?);
            Ok(report)
        }
        .instrument(start.span())
        .await;
        self.finish(start, result)
    }
}

/// The state store's refusal of two objects with one anchor, as [`EngineError::DuplicateAnchor`].
fn duplicate_anchor(result: Result<RunReport>, during: &'static str) -> Result<RunReport> {
    match result {
        Err(EngineError::State(StateError::DuplicateAnchor {
            anchor,
            first,
            second,
        })) => {
            warn!(%anchor, first, second, "{during}: two objects with one anchor");
            Err(EngineError::DuplicateAnchor {
                during,
                anchor,
                first,
                second,
            })
        }
        other => other,
    }
}
