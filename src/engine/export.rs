//! The export stage: operations journaled, sent (with retries), recorded; escrow, the
//! circuit breaker and the dirty set's bookkeeping.

use super::*;

impl Synchronizer {
    pub(super) async fn export(&mut self, run: RunId, plan: Plan, views: Views) -> Result<RunReport> {
        let t0 = Instant::now();
        let mut report = RunReport {
            planned: plan.operations.len() as u64,
            issues: plan.issues.iter().map(|i| i.to_string()).collect(),
            ..RunReport::default()
        };
        if plan.is_held() && !std::mem::take(&mut self.allow_deletions_once) {
            warn!(
                violations = plan.guard_violations.len(),
                "export held by the deletion guard"
            );
            report.held = true;
            report.guard_violations = plan.guard_violations.clone();
            return Ok(report);
        }
        let now = self.config.clock.now();
        let escrowed: HashMap<Anchor, DateTime<Utc>> = self
            .store(|s| s.escrowed())?
            .into_iter()
            .map(|e| (e.anchor, e.next_retry))
            .collect();
        let replaced = plan.replaced(&views.links);
        let links = Arc::new(Mutex::new(views.links));
        let total = plan.operations.len() as u64;
        let mut done_count = 0u64;
        let mut failed_anchors: HashSet<Anchor> = HashSet::new();
        let mut keep_dirty: HashSet<Anchor> = HashSet::new();
        let mut touched: BTreeSet<Anchor> = BTreeSet::new();
        let mut finished = 0u64;
        let mut failures = 0u64;

        // Phases run one after the other (creates before the references that point at them).
        let mut phases: BTreeMap<delta::Phase, Vec<Operation>> = BTreeMap::new();
        for op in plan.operations {
            phases.entry(op.phase()).or_default().push(op);
        }
        'phases: for (_, ops) in phases {
            let mut runnable = Vec::new();
            for op in ops {
                if let Some(next) = escrowed.get(&op.anchor) {
                    if *next > now {
                        report.deferred += 1;
                        continue;
                    }
                }
                if failed_anchors.contains(&op.anchor) {
                    // An earlier phase of this object failed: its later phases wait for the
                    // next run.
                    report.deferred += 1;
                    continue;
                }
                runnable.push(op);
            }
            let concurrency = self.config.concurrency.max(1);
            let this = &*self;
            // A create starts once the creates it references have finished.
            let mut results = order::ordered(runnable, concurrency, |op| {
                let links = links.clone();
                let replaced = &replaced;
                async move {
                    let outcome = this.export_one(run, &op, &links, replaced).await;
                    (op, outcome)
                }
            });
            while let Some((op, outcome)) = results.next().await {
                touched.insert(op.anchor.clone());
                finished += 1;
                match outcome {
                    Ok(exported) => {
                        report.retries += exported.retries;
                        if exported.partial {
                            keep_dirty.insert(op.anchor.clone());
                        }
                        report.add_done(op.kind.name(), op.target_type.as_str());
                        done_count += 1;
                    }
                    Err(OpFailure::State(e)) => return Err(e.into()),
                    Err(OpFailure::Gone { error }) => {
                        // Planned again at once (the store marked it dirty), not escrowed.
                        failed_anchors.insert(op.anchor.clone());
                        report.failures.push(Failure {
                            anchor: op.anchor.to_string(),
                            operation: op.kind.name().to_string(),
                            target_type: op.target_type.to_string(),
                            error,
                            escrowed: false,
                        });
                    }
                    Err(OpFailure::Target { error, retries }) => {
                        report.retries += retries;
                        failures += 1;
                        failed_anchors.insert(op.anchor.clone());
                        let attempts_delay = self.escrow_delay(&op.anchor, &escrowed);
                        let next = now
                            + chrono::Duration::from_std(attempts_delay)
                                .unwrap_or(chrono::Duration::MAX);
                        let msg = error.to_string();
                        this.store(|s| s.escrow(&op.anchor, &msg, next).map(|_| ()))?;
                        report.failures.push(Failure {
                            anchor: op.anchor.to_string(),
                            operation: op.kind.name().to_string(),
                            target_type: op.target_type.to_string(),
                            error: msg,
                            escrowed: true,
                        });
                    }
                }
                this.progress(Stage::Export, finished, Some(total));
                let cb = this.config.circuit_breaker;
                if finished >= cb.min_operations
                    && (failures as f64) >= cb.failure_ratio * finished as f64
                {
                    let why = format!(
                        "circuit breaker: {failures} of {finished} operations failed ({:.0} %), over the {:.0} % threshold; the rest waits for the next run. Last error: {}",
                        100.0 * failures as f64 / finished as f64,
                        100.0 * cb.failure_ratio,
                        report.failures.last().map(|f| f.error.as_str()).unwrap_or("")
                    );
                    warn!("{why}");
                    report.stopped = Some(why);
                    break 'phases;
                }
            }
        }
        // Objects whose every operation succeeded, and dirty objects with nothing to do, are
        // no longer dirty; failed ones stay dirty (and in escrow) for the next run.
        let clean: Vec<Anchor> = if report.stopped.is_some() {
            touched
                .into_iter()
                .filter(|a| !failed_anchors.contains(a) && !keep_dirty.contains(a))
                .collect()
        } else {
            let dirty = self.store(|s| s.dirty())?;
            // Objects the planner could not place stay dirty, to be planned again — except for
            // unresolved references: when the referenced object arrives, the store marks its
            // referrers dirty, so keeping them dirty meanwhile would only replan them for nothing.
            let pending: HashSet<&Anchor> = plan
                .issues
                .iter()
                .filter(|i| !matches!(i, Issue::UnresolvedReference { .. }))
                .flat_map(|i| match i {
                    Issue::DuplicateJoin { anchors, .. } => anchors.iter().collect::<Vec<_>>(),
                    other => other.anchor().into_iter().collect(),
                })
                .collect();
            let mut deferred_anchors: HashSet<Anchor> = HashSet::new();
            for (a, next) in &escrowed {
                if *next > now {
                    deferred_anchors.insert(a.clone());
                }
            }
            dirty
                .into_iter()
                .filter(|a| {
                    !failed_anchors.contains(a)
                        && !pending.contains(a)
                        && !deferred_anchors.contains(a)
                        && !keep_dirty.contains(a)
                })
                .collect()
        };
        let released: Vec<Anchor> = clean
            .iter()
            .filter(|a| escrowed.contains_key(*a))
            .cloned()
            .collect();
        self.store(|s| {
            s.clear_dirty(&clean)?;
            for a in &released {
                s.release(a)?;
            }
            Ok(())
        })?;
        report.stages.push((Stage::Export, t0.elapsed()));
        let _ = done_count;
        Ok(report)
    }

    pub(super) fn escrow_delay(&self, anchor: &Anchor, escrowed: &HashMap<Anchor, DateTime<Utc>>) -> Duration {
        let attempts = self
            .with_store(|s| s.escrowed())
            .ok()
            .and_then(|v| {
                v.into_iter()
                    .find(|e| e.anchor == *anchor)
                    .map(|e| e.attempts)
            })
            .unwrap_or(if escrowed.contains_key(anchor) { 1 } else { 0 });
        let factor = 2u32.saturating_pow(attempts.min(20));
        self.config
            .escrow_base
            .saturating_mul(factor)
            .min(self.config.escrow_max)
    }

    /// Journals, sends (with retries) and records one operation.
    pub(super) async fn export_one(
        &self,
        run: RunId,
        op: &Operation,
        links: &Mutex<Links>,
        replaced: &HashMap<Anchor, TargetId>,
    ) -> Result<Exported, OpFailure> {
        let span = info_span!("op", anchor = %op.anchor, kind = op.kind.name(), target_type = %op.target_type);
        async move {
            // References to objects whose create failed in this run are left out (the rest is
            // applied, a create still creates); the object stays dirty and gets them once those
            // objects exist. An object created anew resolves once its new object exists.
            let stripped = op.without_unresolved_replacing(&lock(links), replaced);
            let partial = stripped.is_some();
            let op = stripped.as_ref().unwrap_or(op);
            if partial && matches!(&op.kind, OperationKind::UpdateReferences { changes, .. } if changes.is_empty()) {
                return Ok(Exported { retries: 0, partial: true });
            }
            let sent = {
                let links = lock(links);
                op.to_target_operation(&links)
            };
            let sent = match sent {
                Ok(s) => s,
                Err(e) => {
                    return Err(OpFailure::Target {
                        error: ConnectorError::new(ErrorKind::NotFound, e.to_string()).with_object(&op.anchor),
                        retries: 0,
                    })
                }
            };
            let journal: JournalId = self
                .with_store(|s| s.journal_intent(run, op, sent.as_ref()))
                .map_err(OpFailure::State)?;
            let Some(top) = sent.as_ref() else {
                // Link-only operation.
                let target_id = match &op.kind {
                    OperationKind::Join { target_id, .. } | OperationKind::Unlink { target_id } => Some(target_id.clone()),
                    _ => None,
                };
                self.with_store(|s| s.journal_done(journal, op, None, target_id.as_ref()))
                    .map_err(OpFailure::State)?;
                lock(links).record(op, target_id.as_ref());
                return Ok(Exported { retries: 0, partial });
            };
            let lookup = match &op.kind {
                OperationKind::Create { lookup, .. } => Some((&op.target_type, lookup.as_slice())),
                _ => None,
            };
            let (outcome, retries) = self.send(top, lookup).await;
            let outcome = match outcome {
                // Idempotent export: a create whose object already exists joins it.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => match &op.kind {
                    OperationKind::Create { lookup, .. } => {
                        match self.find_by_lookup(&op.target_type, lookup).await {
                            Ok(Some(existing)) => {
                                info!(id = %existing.id, "create found the object already there: joined");
                                self.with_store(|s| s.put_target_objects(std::slice::from_ref(&existing)))
                                    .map_err(OpFailure::State)?;
                                Ok(existing.id)
                            }
                            _ => Err(e),
                        }
                    }
                    _ => Err(e),
                },
                // A delete of an object already gone has its effect.
                Err(e) if is_not_found(&e) && matches!(op.kind, OperationKind::Delete { .. }) => match &op.kind {
                    OperationKind::Delete { target_id } => Ok(target_id.clone()),
                    _ => Err(e),
                },
                Err(e) => Err(e),
                Ok(applied) => Ok(applied.id),
            };
            match outcome {
                Ok(id) => {
                    self.with_store(|s| s.journal_done(journal, op, Some(top), Some(&id)))
                        .map_err(OpFailure::State)?;
                    lock(links).record(op, Some(&id));
                    Ok(Exported { retries, partial })
                }
                Err(error) => {
                    let msg = error.to_string();
                    self.with_store(|s| s.journal_failed(journal, &msg, error.is_retryable()))
                        .map_err(OpFailure::State)?;
                    debug!(error = %msg, "operation failed");
                    if let Some(gone) = self.target_gone(op, top, &error)? {
                        return Err(gone);
                    }
                    Err(OpFailure::Target { error, retries })
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Sends one operation, retrying retryable errors with exponential backoff and jitter,
    /// honouring `Retry-After`. Before a create is sent again, the target is searched by the
    /// create's join keys: a create whose response was lost (a timeout after the server
    /// committed) is found, not duplicated.
    pub(super) async fn send(
        &self,
        op: &TargetOperation,
        lookup: Option<(&crate::model::ObjectType, &[delta::JoinGroup])>,
    ) -> (Result<crate::connector::Applied, ConnectorError>, u64) {
        let policy = self.config.retry;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let outcome = self
                .target
                .apply(std::slice::from_ref(op))
                .await
                .pop()
                .unwrap_or_else(|| {
                    Err(ConnectorError::new(
                        ErrorKind::Protocol,
                        "the target returned no outcome",
                    ))
                });
            match outcome {
                Err(e) if e.is_retryable() && attempt < policy.max_attempts.max(1) => {
                    let backoff = policy
                        .base_delay
                        .saturating_mul(2u32.saturating_pow(attempt - 1));
                    let jitter = jitter(op, attempt, backoff);
                    let wait = e
                        .retry_after()
                        .unwrap_or(backoff + jitter)
                        .min(policy.max_delay);
                    debug!(attempt, ?wait, error = %e, "retrying");
                    tokio::time::sleep(wait).await;
                    if let Some((ty, groups)) = lookup {
                        if let Ok(Some(found)) = self.find_by_lookup(ty, groups).await {
                            info!(id = %found.id, "the create took effect before its error: not sent again");
                            if self
                                .with_store(|s| s.put_target_objects(std::slice::from_ref(&found)))
                                .is_ok()
                            {
                                return (
                                    Ok(crate::connector::Applied { id: found.id }),
                                    u64::from(attempt),
                                );
                            }
                        }
                    }
                }
                other => return (other, u64::from(attempt - 1)),
            }
        }
    }
}

/// Up to half the backoff, derived from the operation and attempt (no global randomness).
fn jitter(op: &TargetOperation, attempt: u32, backoff: Duration) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!("{op:?}").hash(&mut h);
    attempt.hash(&mut h);
    let frac = (h.finish() % 1000) as u32;
    backoff / 2 * frac / 1000
}

/// One exported operation: retries it took, and whether part of it had to wait (references to
/// objects not created yet).
pub(super) struct Exported {
    retries: u64,
    partial: bool,
}

/// Why one operation's export failed.
pub(super) enum OpFailure {
    State(StateError),
    Target {
        error: ConnectorError,
        retries: u64,
    },
    /// The target object the operation changes is gone (see `gone.rs`): reported, not escrowed.
    Gone {
        error: String,
    },
}
