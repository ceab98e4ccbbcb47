//! The export ledger: every decision of the export stage, without I/O and without a clock — the
//! raft-rs `Ready` shape. The ledger holds a plan's operations; the I/O driver
//! (`export.rs`) asks it for the next [`Batch`] that is ready ([`Ledger::ready`]), journals and
//! sends it, feeds the outcomes back ([`Ledger::settle`]) and persists the [`Write`]s the
//! ledger decided ([`Ledger::take_writes`]), until [`Ledger::is_finished`]. Times are passed in:
//! the run's `now` (escrow times) and the time elapsed since the export began (retries).
//!
//! What it decides:
//! - **phase order**: the phases of [`Phase`] one after the other (creates before the
//!   references that point at them); a phase starts once every operation of the one before
//!   has finished;
//! - **create order**: within a phase, an operation starts once the creates it references
//!   have finished ([`dependencies`]); a cycle from a hand-made plan is broken at its earliest
//!   operation rather than stalling;
//! - **deferral**: an object in escrow until later, or whose operation of an earlier phase
//!   failed, waits for a later run — except that escrow never holds a deprovision (a disable or
//!   delete goes out while the object's failing updates wait);
//! - **batches**: up to `max_batch` operations per [`Target::apply`](crate::connector::Target)
//!   call, at most `concurrency` batches in flight, and — until the circuit breaker may judge
//!   (its `min_operations`) — no more operations in flight than it needs to judge, so a target
//!   that refuses everything is asked `min_operations` times, not `max_batch × concurrency`;
//! - **references**: what a batch sends is translated with the links learned so far (outcomes
//!   are used at once, before they are committed); references to creates that failed are left
//!   out ([`Operation::without_unresolved_replacing`]) and the object stays dirty;
//! - **retries**: a retryable failure is sent again after a backoff with jitter, or after the
//!   target's `Retry-After`, up to the policy's attempts; its journal intent stays unconfirmed
//!   meanwhile (a create is looked up before it is sent again: it may have taken effect);
//! - **failures**: a final failure is journaled, escrowed (the delay doubling per failure in
//!   a row) and reported; a target object found gone is forgotten instead (see `gone.rs`);
//! - **the circuit breaker**, checked after every outcome: once it trips no batch starts, the
//!   batches in flight are still recorded, and retries not yet sent are left to crash
//!   recovery (their intents are unconfirmed);
//! - **the dirty set** at the end ([`Ledger::settlement`]): which anchors are clean, which stay
//!   dirty, which leave escrow.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::order::dependencies;
use super::report::Failure;
use super::{CircuitBreaker, RetryPolicy, RunReport};
use crate::connector::{ConnectorError, ErrorKind, TargetOperation};
use crate::delta::{Issue, Links, Operation, OperationKind, Phase};
use crate::model::{Anchor, ObjectType, TargetId};
use crate::state::{Escrow, JournalId};

/// What the ledger needs to know of the engine's configuration and the target.
#[derive(Debug, Clone, Copy)]
pub(super) struct Settings {
    /// Operations per target call (the target's `max_batch`), at least 1.
    pub max_batch: usize,
    /// Batches in flight at once, at least 1.
    pub concurrency: usize,
    /// Retries within the run.
    pub retry: RetryPolicy,
    /// The circuit breaker.
    pub breaker: CircuitBreaker,
    /// The first escrow delay.
    pub escrow_base: Duration,
    /// The longest escrow delay.
    pub escrow_max: Duration,
}

/// One operation of a batch.
#[derive(Debug, Clone)]
pub(super) struct Item {
    slot: usize,
    /// The operation as journaled: the planned one, or it without the references to creates
    /// that have not been made.
    pub op: Arc<Operation>,
    /// What is sent to the target; `None` for an operation that only touches the link table.
    pub sent: Option<TargetOperation>,
    /// The journal row: `None` until the driver journals the item; a retry keeps its row.
    pub journal: Option<JournalId>,
    /// Attempts made before this one.
    pub attempt: u32,
    /// References were left out: the object stays dirty.
    partial: bool,
}

impl Item {
    /// Whether the target must be searched before this item is sent: a create sent before,
    /// whose error may have come after the target committed it (a lost response).
    pub fn look_up_first(&self) -> bool {
        self.attempt > 0
            && self.sent.is_some()
            && matches!(&self.op.kind, OperationKind::Create { lookup, .. } if !lookup.is_empty())
    }
}

/// Operations to journal (one commit, before any is sent) and send in one target call.
#[derive(Debug, Clone)]
pub(super) struct Batch {
    /// The operations, in the order sent.
    pub items: Vec<Item>,
}

/// What became of one item of a batch, as the driver saw it.
#[derive(Debug)]
pub(super) enum Outcome {
    /// It took effect; the target object (the new one for a create; `None` when the operation
    /// names it, as a link-only one does).
    Done(Option<TargetId>),
    /// The target refused it, or it could not be sent.
    Failed(ConnectorError),
}

/// A decision to persist, in order, after what the ledger decided before it.
#[derive(Debug)]
pub(super) enum Write {
    /// The journal row is done: the link, the target mirror (`journal_done`).
    Done {
        journal: JournalId,
        op: Arc<Operation>,
        sent: Option<TargetOperation>,
        target_id: Option<TargetId>,
    },
    /// The journal row failed.
    Failed {
        journal: JournalId,
        error: String,
        retryable: bool,
    },
    /// The object goes to escrow until `next_retry`.
    Escrow {
        anchor: Anchor,
        error: String,
        next_retry: DateTime<Utc>,
    },
    /// The target object is gone: the mirror forgets it (marking its object dirty).
    Forget(TargetId),
}

/// The dirty set's bookkeeping at the end of an export.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Settlement {
    /// Anchors no longer dirty.
    pub clean: Vec<Anchor>,
    /// Of those, the ones to release from escrow.
    pub released: Vec<Anchor>,
}

#[derive(Debug)]
enum State {
    /// Not started (waiting for its phase, its dependencies, or a free place).
    Open,
    InFlight,
    /// Failed retryably; sent again at its due time.
    Retry(Item),
    Done,
    Failed,
    /// Deferred to a later run (escrow, or an earlier phase of its object failed).
    Deferred,
}

#[derive(Debug)]
struct Slot {
    op: Arc<Operation>,
    state: State,
}

/// The export ledger: see the module documentation.
#[derive(Debug)]
pub(super) struct Ledger {
    settings: Settings,
    now: DateTime<Utc>,
    slots: Vec<Slot>,
    /// Slot ranges, one per phase present, in phase order.
    phases: Vec<std::ops::Range<usize>>,
    /// Phases entered.
    entered: usize,
    /// Operations of the current phase not finished yet.
    open: usize,
    /// Unfinished dependencies per slot (current phase).
    waiting: HashMap<usize, usize>,
    /// Who waits for whom (current phase).
    dependents: HashMap<usize, Vec<usize>>,
    /// Free to start, by slot (plan order).
    free: BTreeSet<usize>,
    /// Waiting for dependencies, by slot.
    blocked: BTreeSet<usize>,
    /// Scheduled retries: (due, slot).
    retries: BTreeSet<(Duration, usize)>,
    in_flight_batches: usize,
    in_flight_ops: usize,
    links: Links,
    replaced: HashMap<Anchor, TargetId>,
    /// Escrow at the start: anchor → (failures in a row, next retry).
    escrow: HashMap<Anchor, (u32, DateTime<Utc>)>,
    /// Anchors the planner could not place (they stay dirty).
    pending: HashSet<Anchor>,
    failed: HashSet<Anchor>,
    keep_dirty: HashSet<Anchor>,
    finished: u64,
    failures: u64,
    stopped: Option<String>,
    writes: Vec<Write>,
    done: HashMap<(&'static str, ObjectType), u64>,
    failure_list: Vec<Failure>,
    deferred: u64,
    retried: u64,
}

impl Ledger {
    /// A ledger for `operations` (a plan's, in plan order) with `issues` (the plan's), the
    /// links before the export, the escrow at its start and the run's `now`.
    pub fn new(
        settings: Settings,
        operations: Vec<Operation>,
        issues: &[Issue],
        links: Links,
        escrow: Vec<Escrow>,
        now: DateTime<Utc>,
    ) -> Ledger {
        // As `Plan::replaced`: anchors created anew while still linked to an old object.
        let replaced = operations
            .iter()
            .filter(|o| matches!(o.kind, OperationKind::Create { .. }))
            .filter_map(|o| Some((o.anchor.clone(), links.get(&o.anchor)?.target_id.clone())))
            .collect();
        let mut operations = operations;
        // Stable: plan order within each phase.
        operations.sort_by_key(Operation::phase);
        let mut phases: Vec<std::ops::Range<usize>> = Vec::new();
        let mut last: Option<Phase> = None;
        for (i, op) in operations.iter().enumerate() {
            if last != Some(op.phase()) {
                phases.push(i..i + 1);
                last = Some(op.phase());
            } else if let Some(r) = phases.last_mut() {
                r.end = i + 1;
            }
        }
        // Objects the planner could not place stay dirty, to be planned again — except for
        // unresolved references: when the referenced object arrives, the store marks its
        // referrers dirty, so keeping them dirty meanwhile would only replan them for nothing.
        let pending = issues
            .iter()
            .filter(|i| !matches!(i, Issue::UnresolvedReference { .. }))
            .flat_map(|i| match i {
                Issue::DuplicateJoin { anchors, .. } => anchors.clone(),
                other => other.anchor().into_iter().cloned().collect(),
            })
            .collect();
        Ledger {
            settings: Settings {
                max_batch: settings.max_batch.max(1),
                concurrency: settings.concurrency.max(1),
                ..settings
            },
            now,
            slots: operations
                .into_iter()
                .map(|op| Slot {
                    op: Arc::new(op),
                    state: State::Open,
                })
                .collect(),
            phases,
            entered: 0,
            open: 0,
            waiting: HashMap::new(),
            dependents: HashMap::new(),
            free: BTreeSet::new(),
            blocked: BTreeSet::new(),
            retries: BTreeSet::new(),
            in_flight_batches: 0,
            in_flight_ops: 0,
            links,
            replaced,
            escrow: escrow
                .into_iter()
                .map(|e| (e.anchor, (e.attempts, e.next_retry)))
                .collect(),
            pending,
            failed: HashSet::new(),
            keep_dirty: HashSet::new(),
            finished: 0,
            failures: 0,
            stopped: None,
            writes: Vec::new(),
            done: HashMap::new(),
            failure_list: Vec::new(),
            deferred: 0,
            retried: 0,
        }
    }

    /// The operations of the export.
    pub fn total(&self) -> u64 {
        self.slots.len() as u64
    }

    /// Operations finished (done or failed for this run).
    pub fn finished(&self) -> u64 {
        self.finished
    }

    /// Why the run stopped early, if it did.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    /// Enters the next phases while the current one has nothing left.
    fn enter_phases(&mut self) {
        while self.open == 0 && self.stopped.is_none() && self.entered < self.phases.len() {
            let range = self.phases[self.entered].clone();
            self.entered += 1;
            self.waiting.clear();
            self.dependents.clear();
            let mut runnable = Vec::with_capacity(range.len());
            for i in range {
                let op = &self.slots[i].op;
                let anchor = &op.anchor;
                // Escrow holds what keeps failing, never a deprovision: an object disabled or
                // deleted at the source leaves the target now, whatever its failed updates.
                let escrowed = op.phase() != Phase::Deprovision
                    && self
                        .escrow
                        .get(anchor)
                        .is_some_and(|(_, next)| *next > self.now);
                // An earlier phase of this object failed: its later phases wait for the next
                // run.
                if escrowed || self.failed.contains(anchor) {
                    self.slots[i].state = State::Deferred;
                    self.deferred += 1;
                } else {
                    runnable.push(i);
                }
            }
            let ops: Vec<&Operation> = runnable.iter().map(|&i| &*self.slots[i].op).collect();
            for (k, deps) in dependencies(&ops).into_iter().enumerate() {
                let i = runnable[k];
                if deps.is_empty() {
                    self.free.insert(i);
                } else {
                    self.waiting.insert(i, deps.len());
                    self.blocked.insert(i);
                    for d in deps {
                        self.dependents.entry(runnable[d]).or_default().push(i);
                    }
                }
            }
            self.open = runnable.len();
        }
    }

    /// The next batch to journal and send, if one may start now (`elapsed`: the time since
    /// the export began). Call it until it answers `None`, then wait for an outcome (or for
    /// [`next_due`](Self::next_due)).
    pub fn ready(&mut self, elapsed: Duration) -> Option<Batch> {
        loop {
            self.enter_phases();
            if self.stopped.is_some() || self.in_flight_batches >= self.settings.concurrency {
                return None;
            }
            let mut room = self.settings.max_batch;
            let min = self.settings.breaker.min_operations;
            if self.finished < min {
                // Until the breaker can judge, no more in flight than it needs to judge.
                let window = (min - self.finished).saturating_sub(self.in_flight_ops as u64);
                room = room.min(usize::try_from(window).unwrap_or(usize::MAX));
                if room == 0 {
                    if self.in_flight_ops > 0 {
                        return None;
                    }
                    room = 1;
                }
            }
            let mut items = Vec::new();
            let mut settled = false;
            while items.len() < room {
                let Some(&(due, i)) = self.retries.first() else {
                    break;
                };
                if due > elapsed {
                    break;
                }
                self.retries.pop_first();
                if let State::Retry(item) =
                    std::mem::replace(&mut self.slots[i].state, State::InFlight)
                {
                    items.push(item);
                }
            }
            while items.len() < room {
                if self.free.is_empty()
                    && items.is_empty()
                    && self.in_flight_ops == 0
                    && self.retries.is_empty()
                {
                    // Nothing runs and nothing is free: a cycle of creates (a hand-made plan).
                    // The earliest starts; its unresolved references are left out.
                    if let Some(i) = self.blocked.pop_first() {
                        self.waiting.remove(&i);
                        self.free.insert(i);
                    }
                }
                let Some(i) = self.free.pop_first() else {
                    break;
                };
                if let Some(item) = self.prepare(i) {
                    items.push(item);
                } else {
                    settled = true;
                    if self.stopped.is_some() {
                        break;
                    }
                }
            }
            if !items.is_empty() {
                self.in_flight_batches += 1;
                self.in_flight_ops += items.len();
                return Some(Batch { items });
            }
            if !settled {
                return None;
            }
        }
    }

    /// Translates the operation of slot `i` with the links known now: an item to send, or
    /// `None` when it settled without I/O.
    fn prepare(&mut self, i: usize) -> Option<Item> {
        let planned = self.slots[i].op.clone();
        self.slots[i].state = State::InFlight;
        // References to objects whose create failed in this run are left out (the rest is
        // applied, a create still creates); the object stays dirty and gets them once those
        // objects exist. An object created anew resolves once its new object exists.
        let stripped = planned.without_unresolved_replacing(&self.links, &self.replaced);
        let partial = stripped.is_some();
        let op = stripped.map(Arc::new).unwrap_or(planned);
        if partial
            && matches!(&op.kind, OperationKind::UpdateReferences { changes, .. } if changes.is_empty())
        {
            self.keep_dirty.insert(op.anchor.clone());
            self.count_done(&op);
            self.finish(i, State::Done);
            return None;
        }
        match op.to_target_operation(&self.links) {
            Ok(sent) => Some(Item {
                slot: i,
                op,
                sent,
                journal: None,
                attempt: 0,
                partial,
            }),
            Err(e) => {
                let error =
                    ConnectorError::new(ErrorKind::NotFound, e.to_string()).with_object(&op.anchor);
                self.fail(i, &op, None, error);
                None
            }
        }
    }

    /// Records the outcomes of a batch [`ready`](Self::ready) gave (`outcomes[k]` for
    /// `batch.items[k]`; the items carry their journal rows). A missing outcome is a failure.
    pub fn settle(&mut self, batch: Batch, outcomes: Vec<Outcome>, elapsed: Duration) {
        self.in_flight_batches = self.in_flight_batches.saturating_sub(1);
        self.in_flight_ops = self.in_flight_ops.saturating_sub(batch.items.len());
        let mut outcomes = outcomes.into_iter();
        for mut item in batch.items {
            let outcome = outcomes.next().unwrap_or_else(|| {
                Outcome::Failed(ConnectorError::new(
                    ErrorKind::Protocol,
                    "the target returned no outcome",
                ))
            });
            let i = item.slot;
            match outcome {
                Outcome::Done(target_id) => {
                    let target_id = target_id.or_else(|| match &item.op.kind {
                        OperationKind::Join { target_id, .. }
                        | OperationKind::Unlink { target_id }
                        | OperationKind::Delete { target_id } => Some(target_id.clone()),
                        _ => None,
                    });
                    self.links.record(&item.op, target_id.as_ref());
                    if item.partial {
                        self.keep_dirty.insert(item.op.anchor.clone());
                    }
                    self.count_done(&item.op);
                    if let Some(journal) = item.journal {
                        self.writes.push(Write::Done {
                            journal,
                            op: item.op,
                            sent: item.sent,
                            target_id,
                        });
                    }
                    self.finish(i, State::Done);
                }
                Outcome::Failed(error) => {
                    let attempts = item.attempt + 1;
                    if self.stopped.is_none()
                        && error.is_retryable()
                        && attempts < self.settings.retry.max_attempts.max(1)
                    {
                        let wait = self.retry_wait(&item, attempts, &error);
                        item.attempt = attempts;
                        self.retried += 1;
                        self.retries.insert((elapsed + wait, i));
                        self.slots[i].state = State::Retry(item);
                        continue;
                    }
                    let op = item.op.clone();
                    self.fail(i, &op, Some(&item), error);
                }
            }
        }
    }

    /// The wait before attempt `attempts + 1`: the target's `Retry-After`, or an exponential
    /// backoff with jitter; at most the policy's longest delay.
    fn retry_wait(&self, item: &Item, attempts: u32, error: &ConnectorError) -> Duration {
        let policy = self.settings.retry;
        let backoff = policy
            .base_delay
            .saturating_mul(2u32.saturating_pow(attempts - 1));
        error
            .retry_after()
            .unwrap_or_else(|| backoff + jitter(item, attempts, backoff))
            .min(policy.max_delay)
    }

    /// A final failure of slot `i`: journaled (when it was), escrowed and reported — or, when
    /// the target object it changes is gone, forgotten and reported.
    fn fail(&mut self, i: usize, op: &Operation, item: Option<&Item>, error: ConnectorError) {
        let msg = error.to_string();
        if let Some(journal) = item.and_then(|it| it.journal) {
            self.writes.push(Write::Failed {
                journal,
                error: msg.clone(),
                retryable: error.is_retryable(),
            });
        }
        let gone = item
            .and_then(|it| it.sent.as_ref())
            .and_then(|sent| super::gone::gone_object(op, sent, &error));
        self.failed.insert(op.anchor.clone());
        let escrowed = if let Some(id) = gone {
            // Planned again at once (the store marks it dirty), not escrowed.
            self.writes.push(Write::Forget(id.clone()));
            false
        } else {
            self.failures += 1;
            let attempts = self.escrow.get(&op.anchor).map_or(0, |(a, _)| *a);
            let factor = 2u32.saturating_pow(attempts.min(20));
            let delay = self
                .settings
                .escrow_base
                .saturating_mul(factor)
                .min(self.settings.escrow_max);
            let next_retry =
                self.now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
            self.escrow
                .insert(op.anchor.clone(), (attempts.saturating_add(1), next_retry));
            self.writes.push(Write::Escrow {
                anchor: op.anchor.clone(),
                error: msg.clone(),
                next_retry,
            });
            true
        };
        self.failure_list.push(Failure {
            anchor: op.anchor.to_string(),
            operation: op.kind.name().to_string(),
            target_type: op.target_type.to_string(),
            error: msg,
            escrowed,
        });
        self.finish(i, State::Failed);
    }

    fn count_done(&mut self, op: &Operation) {
        *self
            .done
            .entry((op.kind.name(), op.target_type.clone()))
            .or_default() += 1;
    }

    /// Slot `i` finished: its dependents may start; the breaker judges.
    fn finish(&mut self, i: usize, state: State) {
        self.slots[i].state = state;
        self.open = self.open.saturating_sub(1);
        self.finished += 1;
        for d in self.dependents.remove(&i).unwrap_or_default() {
            if let Some(w) = self.waiting.get_mut(&d) {
                *w = w.saturating_sub(1);
                if *w == 0 {
                    self.waiting.remove(&d);
                    if self.blocked.remove(&d) {
                        self.free.insert(d);
                    }
                }
            }
        }
        self.check_breaker();
    }

    fn check_breaker(&mut self) {
        let cb = self.settings.breaker;
        if self.stopped.is_some()
            || self.finished < cb.min_operations
            || (self.failures as f64) < cb.failure_ratio * self.finished as f64
        {
            return;
        }
        let why = format!(
            "circuit breaker: {} of {} operations failed ({:.0} %), over the {:.0} % threshold; the rest waits for the next run. Last error: {}",
            self.failures,
            self.finished,
            100.0 * self.failures as f64 / self.finished as f64,
            100.0 * cb.failure_ratio,
            self.failure_list.last().map(|f| f.error.as_str()).unwrap_or("")
        );
        self.stopped = Some(why);
    }

    /// Stops the run: no batch starts any more (what is in flight is still settled).
    pub fn halt(&mut self, why: &str) {
        if self.stopped.is_none() {
            self.stopped = Some(why.to_string());
        }
    }

    /// The decisions to persist since the last call, in order.
    pub fn take_writes(&mut self) -> Vec<Write> {
        std::mem::take(&mut self.writes)
    }

    /// When the earliest scheduled retry is due (time since the export began), if one is
    /// and the run goes on.
    pub fn next_due(&self) -> Option<Duration> {
        if self.stopped.is_some() {
            return None;
        }
        self.retries.first().map(|(due, _)| *due)
    }

    /// Whether the export is over: nothing in flight, and nothing left to start (or the
    /// breaker stopped the run).
    pub fn is_finished(&mut self) -> bool {
        self.enter_phases();
        self.in_flight_batches == 0
            && (self.stopped.is_some() || (self.open == 0 && self.entered == self.phases.len()))
    }

    /// Adds the counts, failures, deferrals, retries and the breaker's verdict to `report`.
    pub fn report_into(&self, report: &mut RunReport) {
        for ((kind, ty), n) in &self.done {
            report.add_done(kind, ty.as_str(), *n);
        }
        report.failures.extend(self.failure_list.iter().cloned());
        report.deferred += self.deferred;
        report.retries += self.retried;
        if let Some(why) = &self.stopped {
            report.stopped = Some(why.clone());
        }
    }

    /// The dirty set's bookkeeping, once the export is over. `covered`: the anchors whose
    /// dirtiness the plan answered for (the dirty anchors it was planned from).
    ///
    /// A run that went to its end cleans every covered anchor except those that failed (or
    /// were deferred after an earlier phase failed), those still in escrow, those sent with
    /// references left out, and those the planner could not place. A run the breaker stopped
    /// cleans only covered anchors all of whose operations are done (and none partial): the
    /// rest waits for the next run. Clean anchors in escrow are released.
    pub fn settlement(&self, covered: &[Anchor]) -> Settlement {
        let clean: Vec<Anchor> = if self.stopped.is_some() {
            let mut all_done: HashMap<&Anchor, bool> = HashMap::new();
            for s in &self.slots {
                let done = matches!(s.state, State::Done);
                *all_done.entry(&s.op.anchor).or_insert(true) &= done;
            }
            covered
                .iter()
                .filter(|a| all_done.get(a).copied().unwrap_or(false))
                .filter(|a| !self.failed.contains(*a) && !self.keep_dirty.contains(*a))
                .cloned()
                .collect()
        } else {
            covered
                .iter()
                .filter(|a| {
                    !self.failed.contains(*a)
                        && !self.pending.contains(*a)
                        && !self.keep_dirty.contains(*a)
                        && self
                            .escrow
                            .get(*a)
                            .is_none_or(|(_, next)| *next <= self.now)
                })
                .cloned()
                .collect()
        };
        let released = clean
            .iter()
            .filter(|a| self.escrow.contains_key(*a))
            .cloned()
            .collect();
        Settlement { clean, released }
    }
}

/// Up to half the backoff, derived from the operation and attempt (no global randomness).
fn jitter(item: &Item, attempt: u32, backoff: Duration) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match &item.sent {
        Some(sent) => format!("{sent:?}").hash(&mut h),
        None => item.op.anchor.hash(&mut h),
    }
    attempt.hash(&mut h);
    let frac = (h.finish() % 1000) as u32;
    backoff / 2 * frac / 1000
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::delta::{JoinGroup, Link, Reason, TargetRef};
    use crate::engine::order::tests::create;
    use crate::model::{AttributeChange, Reference, Value, Values};
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 8, 0, 0).unwrap()
    }

    pub(in crate::engine) fn settings(
        max_batch: usize,
        concurrency: usize,
        min_operations: u64,
    ) -> Settings {
        Settings {
            max_batch,
            concurrency,
            retry: RetryPolicy {
                max_attempts: 3,
                base_delay: Duration::from_secs(1),
                max_delay: Duration::from_secs(30),
            },
            breaker: CircuitBreaker {
                min_operations,
                failure_ratio: 0.5,
            },
            escrow_base: Duration::from_secs(60),
            escrow_max: Duration::from_secs(3600),
        }
    }

    pub(in crate::engine) fn ledger(s: Settings, ops: Vec<Operation>) -> Ledger {
        Ledger::new(s, ops, &[], linked(&[]), Vec::new(), now())
    }

    /// Links of `anchors` to target objects `t-<anchor>`.
    fn linked(anchors: &[&str]) -> Links {
        let mut links = Links::new();
        for a in anchors {
            links.insert(Link {
                anchor: Anchor::new(*a),
                source_type: "user".into(),
                target_id: TargetId::new(format!("t-{a}")),
                target_type: "User".into(),
            });
        }
        links
    }

    fn user_create(anchor: &str) -> Operation {
        let mut op = create(anchor, &[]);
        if let OperationKind::Create { lookup, .. } = &mut op.kind {
            lookup.push(JoinGroup::on("userName", anchor));
        }
        op.source_type = "user".into();
        op.target_type = "User".into();
        op
    }

    fn update(anchor: &str) -> Operation {
        Operation {
            anchor: Anchor::new(anchor),
            source_type: "user".into(),
            target_type: "User".into(),
            kind: OperationKind::Update {
                target: TargetRef::Existing(TargetId::new(format!("t-{anchor}"))),
                changes: vec![AttributeChange::replace("title", Values::one("x"))],
            },
            reason: Reason::AttributesChanged {
                attributes: vec!["title".into()],
            },
        }
    }

    /// A reference update of `anchor` adding members: the creates of `refs`.
    fn references(anchor: &str, refs: &[&str]) -> Operation {
        Operation {
            anchor: Anchor::new(anchor),
            source_type: "group".into(),
            target_type: "Group".into(),
            kind: OperationKind::UpdateReferences {
                target: TargetRef::Pending(Anchor::new(anchor)),
                changes: vec![AttributeChange::add(
                    "member",
                    refs.iter()
                        .map(|r| Value::Reference(Reference::Pending(Anchor::new(*r))))
                        .collect::<Values>(),
                )],
            },
            reason: Reason::EnteredScope,
        }
    }

    fn anchors(b: &Batch) -> Vec<&str> {
        b.items.iter().map(|i| i.op.anchor.as_str()).collect()
    }

    /// Journals the batch (rows numbered from `first`).
    fn journaled(mut b: Batch, first: i64) -> Batch {
        for (k, i) in b.items.iter_mut().enumerate() {
            i.journal.get_or_insert(JournalId(first + k as i64));
        }
        b
    }

    /// Every item done, creates given the id `t-<anchor>`.
    fn all_done(b: &Batch) -> Vec<Outcome> {
        b.items
            .iter()
            .map(|i| Outcome::Done(Some(TargetId::new(format!("t-{}", i.op.anchor)))))
            .collect()
    }

    fn fails(kind: ErrorKind) -> Outcome {
        Outcome::Failed(ConnectorError::new(kind, "refused"))
    }

    /// Runs the ledger to its end with every operation succeeding; the batches' anchors.
    fn run_all(l: &mut Ledger) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        let mut id = 0;
        while !l.is_finished() {
            let mut batches = Vec::new();
            while let Some(b) = l.ready(Duration::ZERO) {
                batches.push(b);
            }
            assert!(!batches.is_empty(), "stalled");
            for b in batches {
                out.push(anchors(&b).iter().map(|a| a.to_string()).collect());
                let b = journaled(b, id);
                id += 1000;
                let o = all_done(&b);
                l.settle(b, o, Duration::ZERO);
            }
        }
        out
    }

    #[test]
    fn batches_honour_max_batch_and_the_batches_in_flight() {
        let ops: Vec<Operation> = (0..250).map(|i| user_create(&format!("u{i:03}"))).collect();
        let mut l = ledger(settings(100, 2, 0), ops);
        let b1 = l.ready(Duration::ZERO).unwrap();
        let b2 = l.ready(Duration::ZERO).unwrap();
        assert_eq!((b1.items.len(), b2.items.len()), (100, 100));
        assert_eq!(anchors(&b1)[..2], ["u000", "u001"], "plan order");
        assert!(
            l.ready(Duration::ZERO).is_none(),
            "two batches in flight at most"
        );
        let b1 = journaled(b1, 0);
        let o = all_done(&b1);
        l.settle(b1, o, Duration::ZERO);
        let b3 = l.ready(Duration::ZERO).unwrap();
        assert_eq!(b3.items.len(), 50);
        // Every create is journaled as done with its new object.
        let writes = l.take_writes();
        assert_eq!(writes.len(), 100);
        assert!(
            matches!(&writes[0], Write::Done { journal: JournalId(0), target_id: Some(t), .. } if t.as_str() == "t-u000")
        );
    }

    #[test]
    fn until_the_breaker_can_judge_no_more_is_in_flight_than_it_needs() {
        let ops: Vec<Operation> = (0..100).map(|i| user_create(&format!("u{i:03}"))).collect();
        let mut l = ledger(settings(50, 8, 20), ops);
        let b1 = l.ready(Duration::ZERO).unwrap();
        assert_eq!(b1.items.len(), 20);
        assert!(l.ready(Duration::ZERO).is_none());
        let b1 = journaled(b1, 0);
        let o = all_done(&b1);
        l.settle(b1, o, Duration::ZERO);
        let sizes: Vec<usize> = std::iter::from_fn(|| l.ready(Duration::ZERO))
            .map(|b| b.items.len())
            .collect();
        assert_eq!(sizes, [50, 30]);
    }

    #[test]
    fn phases_run_in_order_and_a_create_waits_for_the_creates_it_references() {
        let ops = vec![
            references("g1", &["u1"]),
            create("g1", &["u1", "u2", "gone"]),
            update("u9"),
            user_create("u1"),
            user_create("u2"),
            create("g2", &["g1"]),
            user_create("u3"),
        ];
        let mut l = Ledger::new(
            settings(10, 4, 0),
            ops,
            &[],
            linked(&["u9"]),
            Vec::new(),
            now(),
        );
        let batches = run_all(&mut l);
        assert_eq!(
            batches,
            [
                vec!["u1", "u2", "u3"],
                vec!["g1"],
                vec!["g2"],
                vec!["u9"],
                vec!["g1"]
            ]
        );
        // The links learned from the outcomes resolve the later references at once.
        let writes = l.take_writes();
        let sent_g1 = writes
            .iter()
            .find_map(|w| match w {
                Write::Done { op, sent, .. } if op.anchor.as_str() == "g1" => sent.clone(),
                _ => None,
            })
            .unwrap();
        let TargetOperation::Create { attributes, .. } = sent_g1 else {
            panic!("{sent_g1:?}")
        };
        let members: Vec<String> = attributes
            .get("member")
            .unwrap()
            .iter()
            .map(|v| v.to_string())
            .collect();
        assert_eq!(members.len(), 2, "{members:?}");
        assert!(members.iter().any(|m| m.contains("t-u1")), "{members:?}");
    }

    #[test]
    fn a_cycle_of_creates_from_a_hand_made_plan_does_not_stall() {
        let ops = vec![create("a", &["b"]), create("b", &["a"]), create("c", &[])];
        let mut l = ledger(settings(10, 4, 0), ops);
        let batches = run_all(&mut l);
        assert_eq!(batches, [vec!["c"], vec!["a"], vec!["b"]]);
        // `a` went without its reference to `b` (not created yet): it stays dirty.
        let covered: Vec<Anchor> = ["a", "b", "c"].map(Anchor::new).to_vec();
        assert_eq!(
            l.settlement(&covered).clean,
            [Anchor::new("b"), Anchor::new("c")]
        );
    }

    #[test]
    fn a_failure_in_a_batch_is_escrowed_the_others_recorded_and_its_later_phases_deferred() {
        let ops = vec![
            user_create("u1"),
            user_create("u2"),
            user_create("u3"),
            references("u2", &["u1"]),
            references("g", &["u2"]),
        ];
        let mut l = ledger(settings(10, 4, 100), ops);
        let b = journaled(l.ready(Duration::ZERO).unwrap(), 0);
        assert_eq!(anchors(&b), ["u1", "u2", "u3"]);
        l.settle(
            b,
            vec![
                Outcome::Done(Some("t-u1".into())),
                fails(ErrorKind::Constraint),
                Outcome::Done(Some("t-u3".into())),
            ],
            Duration::ZERO,
        );
        let writes = l.take_writes();
        assert!(matches!(
            &writes[0],
            Write::Done {
                journal: JournalId(0),
                ..
            }
        ));
        assert!(matches!(
            &writes[1],
            Write::Failed {
                journal: JournalId(1),
                retryable: false,
                ..
            }
        ));
        assert!(
            matches!(&writes[2], Write::Escrow { anchor, next_retry, .. } if anchor.as_str() == "u2" && *next_retry == now() + chrono::Duration::seconds(60))
        );
        assert!(matches!(
            &writes[3],
            Write::Done {
                journal: JournalId(2),
                ..
            }
        ));
        // u2's references wait for the next run; g's reference to u2 is left out: nothing
        // left to send, and g stays dirty for it.
        assert!(l.ready(Duration::ZERO).is_none());
        assert!(l.is_finished());
        let mut report = RunReport::default();
        l.report_into(&mut report);
        assert_eq!(
            (report.count("create"), report.deferred),
            (2, 1),
            "{report:?}"
        );
        assert_eq!(report.failures.len(), 1);
        assert!(report.failures[0].escrowed && report.failures[0].error.contains("refused"));
        let covered: Vec<Anchor> = ["u1", "u2", "u3", "g"].map(Anchor::new).to_vec();
        assert_eq!(
            l.settlement(&covered),
            Settlement {
                clean: vec![Anchor::new("u1"), Anchor::new("u3")],
                released: Vec::new()
            }
        );
    }

    #[test]
    fn escrow_never_holds_a_deprovision() {
        let mut disable = update("u1");
        disable.kind = OperationKind::Disable {
            target_id: TargetId::new("t-u1"),
            changes: vec![AttributeChange::replace("active", Values::one(false))],
        };
        disable.reason = Reason::DeletedAtSource;
        assert_eq!(disable.phase(), Phase::Deprovision);
        let escrow = Escrow {
            anchor: Anchor::new("u1"),
            attempts: 3,
            next_retry: now() + chrono::Duration::hours(6),
            last_error: "refused".into(),
        };
        let mut l = Ledger::new(
            settings(10, 1, 100),
            vec![update("u2"), disable],
            &[],
            linked(&["u1", "u2"]),
            vec![
                escrow.clone(),
                Escrow {
                    anchor: Anchor::new("u2"),
                    ..escrow
                },
            ],
            now(),
        );
        // u2's update waits in escrow; u1's disable goes out at once.
        let b = journaled(l.ready(Duration::ZERO).unwrap(), 0);
        assert_eq!(anchors(&b), ["u1"]);
        l.settle(b, vec![Outcome::Done(None)], Duration::ZERO);
        assert!(l.is_finished());
        let mut report = RunReport::default();
        l.report_into(&mut report);
        assert_eq!(report.deferred, 1);
    }

    #[test]
    fn escrow_defers_until_due_then_releases_and_its_delay_doubles() {
        let escrow = |anchor: &str, attempts, minutes| Escrow {
            anchor: Anchor::new(anchor),
            attempts,
            next_retry: now() + chrono::Duration::minutes(minutes),
            last_error: "earlier".into(),
        };
        let ops = vec![update("u1"), update("u2"), update("u3")];
        let mut l = Ledger::new(
            settings(10, 1, 100),
            ops,
            &[],
            linked(&["u1", "u2", "u3"]),
            vec![escrow("u1", 1, 5), escrow("u2", 2, -5), escrow("u4", 1, -5)],
            now(),
        );
        let b = journaled(l.ready(Duration::ZERO).unwrap(), 0);
        // u1 waits (due in 5 minutes); u2 is due.
        assert_eq!(anchors(&b), ["u2", "u3"]);
        l.settle(
            b,
            vec![fails(ErrorKind::Constraint), Outcome::Done(None)],
            Duration::ZERO,
        );
        let writes = l.take_writes();
        // The third failure in a row waits 60 s × 2².
        assert!(
            writes.iter().any(|w| matches!(w, Write::Escrow { anchor, next_retry, .. } if anchor.as_str() == "u2" && *next_retry == now() + chrono::Duration::seconds(240))),
            "{writes:?}"
        );
        assert!(l.is_finished());
        // u4 (due, nothing to do) is clean and released; u1 (not due) and u2 (failed again)
        // stay dirty and escrowed.
        let covered: Vec<Anchor> = ["u1", "u2", "u3", "u4"].map(Anchor::new).to_vec();
        assert_eq!(
            l.settlement(&covered),
            Settlement {
                clean: vec![Anchor::new("u3"), Anchor::new("u4")],
                released: vec![Anchor::new("u4")]
            }
        );
        let mut report = RunReport::default();
        l.report_into(&mut report);
        assert_eq!(report.deferred, 1);
    }

    #[test]
    fn a_retryable_failure_is_sent_again_after_its_wait_with_its_journal_row() {
        let mut l = ledger(
            settings(10, 4, 100),
            vec![user_create("u1"), user_create("u2")],
        );
        let b = journaled(l.ready(Duration::ZERO).unwrap(), 7);
        l.settle(
            b,
            vec![
                Outcome::Done(Some("t-u1".into())),
                Outcome::Failed(
                    ConnectorError::new(ErrorKind::Throttled, "slow down")
                        .with_retry_after(Duration::from_secs(5)),
                ),
            ],
            Duration::from_secs(1),
        );
        // Nothing recorded for u2 yet: its intent stays as it is until the retry settles.
        assert_eq!(l.take_writes().len(), 1);
        assert!(!l.is_finished());
        assert!(l.ready(Duration::from_secs(5)).is_none());
        assert_eq!(l.next_due(), Some(Duration::from_secs(6)));
        let b = l.ready(Duration::from_secs(6)).unwrap();
        assert_eq!(anchors(&b), ["u2"]);
        let item = &b.items[0];
        assert_eq!((item.journal, item.attempt), (Some(JournalId(8)), 1));
        assert!(
            item.look_up_first(),
            "a create sent before is looked up first"
        );
        // A second failure waits the backoff (2 s, plus up to half of it); the third is final.
        l.settle(
            b,
            vec![fails(ErrorKind::Unavailable)],
            Duration::from_secs(6),
        );
        let due = l.next_due().unwrap();
        assert!(
            due >= Duration::from_secs(8) && due <= Duration::from_secs(9),
            "{due:?}"
        );
        let b = l.ready(due).unwrap();
        assert_eq!(b.items[0].attempt, 2);
        l.settle(b, vec![fails(ErrorKind::Unavailable)], due);
        let writes = l.take_writes();
        assert!(matches!(
            &writes[0],
            Write::Failed {
                journal: JournalId(8),
                retryable: true,
                ..
            }
        ));
        assert!(matches!(&writes[1], Write::Escrow { .. }));
        assert!(l.is_finished());
        let mut report = RunReport::default();
        l.report_into(&mut report);
        assert_eq!((report.retries, report.failures.len()), (2, 1));
    }

    #[test]
    fn the_breaker_trips_mid_batch_records_the_batch_and_starts_nothing_more() {
        let ops: Vec<Operation> = (0..20).map(|i| user_create(&format!("u{i:02}"))).collect();
        let mut l = ledger(settings(6, 1, 2), ops);
        let b = journaled(l.ready(Duration::ZERO).unwrap(), 0);
        assert_eq!(b.items.len(), 2, "the breaker's minimum first");
        let o = all_done(&b);
        l.settle(b, o, Duration::ZERO);
        let b = journaled(l.ready(Duration::ZERO).unwrap(), 100);
        assert_eq!(anchors(&b), ["u02", "u03", "u04", "u05", "u06", "u07"]);
        l.settle(
            b,
            vec![
                fails(ErrorKind::Auth),
                fails(ErrorKind::Auth),
                Outcome::Done(Some("t-u04".into())),
                fails(ErrorKind::Auth),
                fails(ErrorKind::Unavailable),
                Outcome::Done(Some("t-u07".into())),
            ],
            Duration::ZERO,
        );
        // It tripped at the second failure (2 of 4); the rest of the batch is still recorded,
        // and a retryable failure is not retried any more.
        let stopped = l.stopped().unwrap().to_string();
        assert!(stopped.contains("2 of 4 operations failed"), "{stopped}");
        let writes = l.take_writes();
        let done = writes
            .iter()
            .filter(|w| matches!(w, Write::Done { .. }))
            .count();
        let failed = writes
            .iter()
            .filter(|w| matches!(w, Write::Failed { .. }))
            .count();
        assert_eq!((done, failed), (2 + 2, 4));
        assert!(l.ready(Duration::ZERO).is_none());
        assert!(l.is_finished());
        // Only the objects whose operations are all done are clean; the rest waits.
        let covered: Vec<Anchor> = (0..20).map(|i| Anchor::new(format!("u{i:02}"))).collect();
        let clean: Vec<String> = l
            .settlement(&covered)
            .clean
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(clean, ["u00", "u01", "u04", "u07"]);
    }

    #[test]
    fn a_pending_retry_is_left_to_recovery_when_the_breaker_trips() {
        let ops: Vec<Operation> = (0..4).map(|i| user_create(&format!("u{i}"))).collect();
        let mut l = ledger(settings(2, 2, 2), ops);
        let b1 = journaled(l.ready(Duration::ZERO).unwrap(), 0);
        l.settle(
            b1,
            vec![
                Outcome::Failed(ConnectorError::new(ErrorKind::Timeout, "lost")),
                Outcome::Done(Some("t-u1".into())),
            ],
            Duration::ZERO,
        );
        let b2 = journaled(l.ready(Duration::ZERO).unwrap(), 10);
        l.settle(
            b2,
            vec![fails(ErrorKind::Auth), fails(ErrorKind::Auth)],
            Duration::ZERO,
        );
        assert!(l.stopped().is_some());
        assert!(l.is_finished() && l.next_due().is_none());
        // u0's intent (row 0) is neither done nor failed: the next run's recovery looks it up.
        let writes = l.take_writes();
        assert!(!writes.iter().any(|w| matches!(
            w,
            Write::Done {
                journal: JournalId(0),
                ..
            } | Write::Failed {
                journal: JournalId(0),
                ..
            }
        )));
        let covered: Vec<Anchor> = (0..4).map(|i| Anchor::new(format!("u{i}"))).collect();
        assert_eq!(l.settlement(&covered).clean, [Anchor::new("u1")]);
    }

    #[test]
    fn a_gone_target_object_is_forgotten_not_escrowed() {
        let mut l = Ledger::new(
            settings(10, 1, 100),
            vec![update("u1")],
            &[],
            linked(&["u1"]),
            Vec::new(),
            now(),
        );
        let b = journaled(l.ready(Duration::ZERO).unwrap(), 0);
        l.settle(b, vec![fails(ErrorKind::NotFound)], Duration::ZERO);
        let writes = l.take_writes();
        assert!(matches!(&writes[0], Write::Failed { .. }));
        assert!(matches!(&writes[1], Write::Forget(id) if id.as_str() == "t-u1"));
        assert_eq!(writes.len(), 2, "{writes:?}");
        let mut report = RunReport::default();
        l.report_into(&mut report);
        assert!(!report.failures[0].escrowed);
        assert!(l.settlement(&[Anchor::new("u1")]).clean.is_empty());
    }

    #[test]
    fn link_only_operations_go_in_batches_without_a_target_operation() {
        let unlink = Operation {
            kind: OperationKind::Unlink {
                target_id: "t-u1".into(),
            },
            reason: Reason::DeletedAtSource,
            ..update("u1")
        };
        let mut l = Ledger::new(
            settings(10, 1, 0),
            vec![unlink],
            &[],
            linked(&["u1"]),
            Vec::new(),
            now(),
        );
        let b = journaled(l.ready(Duration::ZERO).unwrap(), 0);
        assert!(b.items[0].sent.is_none());
        l.settle(b, vec![Outcome::Done(None)], Duration::ZERO);
        assert!(
            matches!(&l.take_writes()[0], Write::Done { target_id: Some(t), sent: None, .. } if t.as_str() == "t-u1")
        );
        assert!(l.is_finished());
    }

    #[test]
    fn the_settlement_covers_only_the_anchors_given_and_keeps_unplaced_ones_dirty() {
        let issues = vec![
            Issue::Held {
                anchor: "u2".into(),
                reason: "held".into(),
            },
            Issue::UnresolvedReference {
                anchor: "u3".into(),
                attribute: "manager".into(),
                reference: "x".into(),
            },
        ];
        let mut l = Ledger::new(
            settings(10, 1, 0),
            vec![update("u1")],
            &issues,
            linked(&["u1"]),
            Vec::new(),
            now(),
        );
        run_all(&mut l);
        // u9 is dirty but not covered by this plan (another page): not touched.
        let covered: Vec<Anchor> = ["u1", "u2", "u3"].map(Anchor::new).to_vec();
        assert_eq!(
            l.settlement(&covered).clean,
            [Anchor::new("u1"), Anchor::new("u3")]
        );
    }
}
