//! Crash recovery: operations journaled as intended and never confirmed are settled against
//! the target before anything else is sent.

use super::*;

impl Synchronizer {

    /// Resolves operations a crash left unconfirmed (journaled as intended, never recorded as
    /// done or failed), before anything else is sent: a create is looked up in the target by
    /// its join keys — found, it is recorded as done (never sent twice); an update or delete is
    /// settled by re-reading the object.
    pub(super) async fn recover(&mut self, _run: RunId) -> Result<RunReport> {
        let mut report = RunReport::default();
        let pending = self.store(|s| s.journal_unconfirmed())?;
        if pending.is_empty() {
            return Ok(report);
        }
        let t0 = Instant::now();
        warn!(
            count = pending.len(),
            "resolving operations left unconfirmed by a crash"
        );
        for (i, entry) in pending.iter().enumerate() {
            self.recover_one(entry).await?;
            report.recovered += 1;
            self.progress(Stage::Recover, i as u64 + 1, Some(pending.len() as u64));
        }
        report.stages.push((Stage::Recover, t0.elapsed()));
        Ok(report)
    }

    pub(super) async fn recover_one(&mut self, entry: &JournalEntry) -> Result<()> {
        let op = &entry.operation;
        let id = entry.id;
        match (&op.kind, &entry.sent) {
            (OperationKind::Create { lookup, .. }, _) => {
                let found = self.find_by_lookup(&op.target_type, lookup).await?;
                match found {
                    Some(obj) => {
                        info!(anchor = %op.anchor, id = %obj.id, "create was applied before the crash: recorded");
                        self.store(|s| {
                            s.put_target_objects(std::slice::from_ref(&obj))?;
                            s.journal_done(id, op, None, Some(&obj.id))
                        })?;
                    }
                    None => {
                        self.store(|s| {
                            s.journal_failed(id, "not applied before a crash; planned again", true)
                        })?;
                    }
                }
            }
            (_, Some(sent)) => {
                let Some(target_id) = sent.id() else {
                    self.store(|s| s.journal_failed(id, "interrupted by a crash", true))?;
                    return Ok(());
                };
                match self.target.get(sent.object_type(), target_id).await {
                    Ok(Some(obj)) => {
                        if matches!(op.kind, OperationKind::Delete { .. }) {
                            self.store(|s| {
                                s.journal_failed(
                                    id,
                                    "delete not applied before a crash; planned again",
                                    true,
                                )
                            })?;
                        } else {
                            // Whatever part took effect is now in the mirror; the object stays
                            // dirty and is planned again against it.
                            self.store(|s| {
                                s.put_target_objects(std::slice::from_ref(&obj))?;
                                s.journal_failed(id, "interrupted by a crash; planned again against the target's state", true)
                            })?;
                        }
                    }
                    Ok(None) => {
                        if matches!(op.kind, OperationKind::Delete { .. }) {
                            self.store(|s| s.journal_done(id, op, Some(sent), Some(target_id)))?;
                        } else {
                            self.store(|s| {
                                s.remove_target_objects(std::slice::from_ref(target_id))?;
                                s.journal_failed(id, "target object gone", true)
                            })?;
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            (_, None) => {
                // Link-only operations (unlink, join without changes): do them again.
                self.store(|s| {
                    s.journal_failed(id, "interrupted by a crash; planned again", true)
                })?;
            }
        }
        let anchor = op.anchor.clone();
        self.store(|s| s.mark_dirty(std::slice::from_ref(&anchor)))?;
        Ok(())
    }

    pub(super) async fn find_by_lookup(
        &self,
        object_type: &crate::model::ObjectType,
        lookup: &[delta::JoinGroup],
    ) -> Result<Option<TargetObject>> {
        for group in lookup {
            let mut candidates: Option<Vec<TargetObject>> = None;
            for (attr, value) in group.pairs() {
                let found = self.target.find(object_type, attr, value).await?;
                candidates = Some(match candidates {
                    None => found,
                    Some(prev) => prev
                        .into_iter()
                        .filter(|p| found.iter().any(|f| f.id == p.id))
                        .collect(),
                });
            }
            if let Some(mut c) = candidates {
                if c.len() == 1 {
                    return Ok(c.pop());
                }
            }
        }
        Ok(None)
    }

}
