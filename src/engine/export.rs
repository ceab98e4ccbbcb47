//! The export stage's I/O: the [`Ledger`] decides (what is ready, retries, escrow, the circuit
//! breaker, the dirty set), this driver journals, sends and records.
//!
//! For the batches the ledger makes ready together (a round): their intents are journaled in
//! one commit, durable before anything is sent; each batch goes to the target in one
//! [`Target::apply`] call
//! (up to `max_batch` operations); the outcomes go back to the ledger, which uses what they
//! teach at once (links for later references) and decides what to record — recorded by the
//! state writer thread (`writer.rs`), which holds them back (about a page of a paged run) and
//! commits them together with the intents waiting, while the next batches are sent.
//! Up to `concurrency` batches are in flight at once.
//!
//! [`Target::apply`]: crate::connector::Target::apply

use std::future::Future;
use std::pin::Pin;

use futures::future::{select, Either};
use futures::stream::FuturesUnordered;

use super::ledger::{Batch, Item, Ledger, Outcome, Settings};
use super::writer::{Pending, Writer};
use super::*;
use crate::connector::Applied;

type Timer = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Synchronizer {
    /// Exports `plan`: journals, sends and records its operations (see the module
    /// documentation), then settles the dirty set: of `covered` — the dirty anchors the plan
    /// answers for — those exported (or with nothing to do) are no longer dirty; see
    /// [`Ledger::settlement`].
    pub(super) async fn export(
        &mut self,
        run: RunId,
        plan: Plan,
        views: Views,
        covered: &[Anchor],
    ) -> Result<RunReport> {
        let mut clean = Vec::new();
        self.export_settling(run, plan, views, covered, (&mut clean, 0))
            .await
    }

    /// [`export`](Self::export), the dirty set's settlement left to a later export of the run
    /// while few anchors wait: `clean` holds the anchors no longer dirty not cleared yet — those
    /// of earlier exports when it starts, those of this one too (or none, once more than
    /// `keep` waited: all cleared) when it ends; see [`Writer::settle`].
    pub(super) async fn export_settling(
        &mut self,
        run: RunId,
        plan: Plan,
        views: Views,
        covered: &[Anchor],
        (clean, keep): (&mut Vec<Anchor>, usize),
    ) -> Result<RunReport> {
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
        // The plan's views are no longer needed but their links: freeing a page's mirrors
        // takes about a tenth of its export (and a delta plan's more than its export), so
        // another thread frees them, while this export runs and after.
        for f in self.freeing.drain(..) {
            let _ = f.join();
        }
        let Views {
            mirror,
            links,
            target,
        } = views;
        self.freeing
            .extend(free_on_another_thread((mirror, target)));
        let now = self.config.clock.now();
        let escrow = self.store(|s| s.escrowed())?;
        let settings = Settings {
            max_batch: self.target.capabilities().max_batch,
            concurrency: self.config.concurrency,
            retry: self.config.retry,
            breaker: self.config.circuit_breaker,
            escrow_base: self.config.escrow_base,
            escrow_max: self.config.escrow_max,
        };
        let mut ledger = Ledger::new(settings, plan.operations, &plan.issues, links, escrow, now);
        let writer =
            Writer::start(self.store.clone(), run, std::mem::take(clean)).map_err(|e| {
                StateError::Invalid(format!("cannot start the state writer thread: {e}"))
            })?;
        self.drive(&mut ledger, &writer, t0).await?;
        if let Some(why) = ledger.stopped() {
            warn!("{why}");
        }
        // Objects whose every operation succeeded, and dirty objects with nothing to do, are
        // no longer dirty; failed ones stay dirty (and in escrow) for the next run.
        let settlement = ledger.settlement(covered);
        writer.settle(settlement.clean, settlement.released);
        *clean = writer.finish(keep).await?;
        ledger.report_into(&mut report);
        // The plan's operations too.
        self.freeing.extend(free_on_another_thread(ledger));
        report.stages.push((Stage::Export, t0.elapsed()));
        Ok(report)
    }

    /// Runs the ledger to its end: batches out, outcomes in, decisions to the writer.
    async fn drive(&self, ledger: &mut Ledger, writer: &Writer, t0: Instant) -> Result<()> {
        let total = ledger.total();
        let mut in_flight = FuturesUnordered::new();
        let mut timer: Option<(Duration, Timer)> = None;
        loop {
            // The batches ready together are journaled in one commit.
            let mut round = Vec::new();
            while let Some(batch) = ledger.ready(t0.elapsed()) {
                round.push(batch);
            }
            for pending in writer.queue_intents(round) {
                in_flight.push(self.send_batch(writer, pending));
            }
            writer.write(ledger.take_writes());
            if ledger.is_finished() {
                return Ok(());
            }
            let next = match ledger.next_due() {
                Some(due) => {
                    if timer.as_ref().map(|(d, _)| *d) != Some(due) {
                        timer = Some((due, sleep(due.saturating_sub(t0.elapsed()))));
                    }
                    let Some((_, wait)) = timer.as_mut() else {
                        continue;
                    };
                    if in_flight.is_empty() {
                        wait.await;
                        timer = None;
                        continue;
                    }
                    match select(in_flight.next(), wait).await {
                        Either::Left((next, _)) => next,
                        Either::Right(((), _)) => {
                            timer = None;
                            continue;
                        }
                    }
                }
                None => in_flight.next().await,
            };
            let Some(next) = next else {
                // Nothing in flight, nothing due, and yet not finished: the ledger would be
                // wrong. Stop rather than spin; what is not done stays dirty.
                ledger.halt("export stopped: no operation could start");
                continue;
            };
            let (batch, outcomes) = next?;
            ledger.settle(batch, outcomes, t0.elapsed());
            self.progress(Stage::Export, ledger.finished(), Some(total));
        }
    }

    /// Waits until a batch is journaled (its round's commit durable: before anything is
    /// sent), sends it in one target call, and answers what became of each item.
    async fn send_batch(&self, writer: &Writer, pending: Pending) -> Result<(Batch, Vec<Outcome>)> {
        let mut batch = writer.journaled(pending).await?;
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(batch.items.len());
        for item in &batch.items {
            outcomes.push(match &item.sent {
                // Link-only: nothing to send.
                None => Some(Outcome::Done(None)),
                Some(_) if item.look_up_first() => self.found_before_resend(item, writer).await,
                Some(_) => None,
            });
        }
        let to_send: Vec<usize> = (0..batch.items.len())
            .filter(|k| outcomes[*k].is_none())
            .collect();
        if !to_send.is_empty() {
            let ops: Vec<TargetOperation> = to_send
                .iter()
                .filter_map(|&k| batch.items[k].sent.take())
                .collect();
            let mut results = self.target.apply(&ops).await.into_iter();
            for (&k, sent) in to_send.iter().zip(ops) {
                let result = results.next().unwrap_or_else(|| {
                    Err(ConnectorError::new(
                        ErrorKind::Protocol,
                        "the target returned no outcome",
                    ))
                });
                let item = &mut batch.items[k];
                outcomes[k] = Some(self.outcome(item, result, writer).await);
                item.sent = Some(sent);
            }
        }
        let outcomes = outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Outcome::Failed(ConnectorError::new(ErrorKind::Protocol, "not sent"))
                })
            })
            .collect();
        Ok((batch, outcomes))
    }

    /// Before a create is sent again, the target is searched by the create's join keys: a
    /// create whose response was lost (a timeout after the server committed) is found, not
    /// duplicated.
    async fn found_before_resend(&self, item: &Item, writer: &Writer) -> Option<Outcome> {
        let OperationKind::Create { lookup, .. } = &item.op.kind else {
            return None;
        };
        let found = self
            .find_by_lookup(&item.op.target_type, lookup)
            .await
            .ok()??;
        info!(anchor = %item.op.anchor, id = %found.id, "the create took effect before its error: not sent again");
        let id = found.id.clone();
        writer.call(move |s| s.put_target_objects(std::slice::from_ref(&found)));
        Some(Outcome::Done(Some(id)))
    }

    /// What a target's answer means for `item`: a create whose object already exists joins
    /// it (idempotent export); a delete of an object already gone has its effect.
    async fn outcome(
        &self,
        item: &Item,
        result: std::result::Result<Applied, ConnectorError>,
        writer: &Writer,
    ) -> Outcome {
        let error = match result {
            Ok(applied) => return Outcome::Done(Some(applied.id)),
            Err(e) => e,
        };
        match &item.op.kind {
            OperationKind::Create { lookup, .. } if error.kind() == ErrorKind::AlreadyExists => {
                if let Ok(Some(existing)) = self.find_by_lookup(&item.op.target_type, lookup).await
                {
                    info!(anchor = %item.op.anchor, id = %existing.id, "create found the object already there: joined");
                    let id = existing.id.clone();
                    writer.call(move |s| s.put_target_objects(std::slice::from_ref(&existing)));
                    return Outcome::Done(Some(id));
                }
            }
            OperationKind::Delete { target_id } if is_not_found(&error) => {
                return Outcome::Done(Some(target_id.clone()));
            }
            _ => {}
        }
        debug!(anchor = %item.op.anchor, kind = item.op.kind.name(), error = %error, "operation failed");
        Outcome::Failed(error)
    }
}

/// Drops `value` on a thread of its own (the handle to join); here when no thread starts (the
/// refused thread's closure, which owns `value`, is dropped before `spawn` returns).
fn free_on_another_thread<T: Send + 'static>(value: T) -> Option<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("dirsync-free".into())
        .spawn(move || drop(value))
        .ok()
}

/// Waits `d`: on the tokio timer when a tokio runtime runs the engine, otherwise on a thread of
/// its own (under any other executor, as `futures::executor::block_on`).
fn sleep(d: Duration) -> Timer {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Box::pin(tokio::time::sleep(d));
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("dirsync-retry-timer".into())
        .spawn(move || {
            std::thread::sleep(d);
            let _ = tx.send(());
        });
    Box::pin(async move {
        if spawned.is_ok() {
            let _ = rx.await;
        }
    })
}
