//! The state writer: a thread that carries out the export's state-store writes, so that a
//! commit (an fsync under `Durability::Full`) never stalls the async export loop — whatever the
//! executor (a tokio runtime, `futures::executor::block_on`).
//!
//! Jobs run in the order they are queued, with two freedoms: the journal intents of all the
//! batches waiting are committed together, after the outcomes and other writes queued with
//! them (an intent only ever waits longer; an outcome is only ever recorded after its own
//! intent, which was committed before its operation was sent); and the outcomes (with the
//! ledger's other decisions) wait, in order, until a call or a flush comes, or enough of them
//! (about a page of a paged run) — then they are committed together with the intents waiting
//! ([`StateStore::journal_commit`]; in a commit of their own, [`StateStore::journal_outcomes`],
//! when other writes follow them). Until then the rounds of batches commit their intents alone
//! ([`StateStore::journal_intents`]: appended rows). The links, target mirror rows and index
//! rows the outcomes write are keyed by anchor, id and value — scattered over their tables — so
//! writing a page's outcomes in one transaction writes each page of those tables about once,
//! not once per round. An outcome not yet committed when the process dies leaves its intent
//! unconfirmed: crash recovery settles it against the target, as it would a batch in flight.
//!
//! The crash promise holds: [`Writer::journaled`] answers once the intents are committed
//! (durable), and only then is a batch sent. The batches of a round (those the ledger makes
//! ready together) are queued as one job, so their intents share one commit.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;
use tracing::info;

use super::ledger::{Batch, Write};
use super::{lock, EngineError, Result};
use crate::connector::TargetOperation;
use crate::delta::Operation;
use crate::model::Anchor;
use crate::state::{JournalId, JournalOutcome, RunId, StateError, StateStore};

/// The store, shared by the engine and its writer thread.
pub(super) type SharedStore = Arc<Mutex<Box<dyn StateStore>>>;

type Call = Box<dyn FnOnce(&mut dyn StateStore) -> Result<(), StateError> + Send>;

enum Job {
    /// Journal the items of the batches not journaled yet, in one commit; answer each batch
    /// its rows.
    Intents(Vec<(Arc<Batch>, oneshot::Sender<Vec<JournalId>>)>),
    /// The ledger's decisions.
    Writes(Vec<Write>),
    /// Anything else, in order.
    Call(Call),
    /// Answer once everything queued before is committed; the anchors no longer dirty are
    /// cleared too when more than this many wait.
    Flush(oneshot::Sender<()>, usize),
    /// Anchors no longer dirty (cleared later: see [`Writer::settle`]), and anchors to release
    /// from escrow (now).
    Settle {
        clean: Vec<Anchor>,
        released: Vec<Anchor>,
    },
}

/// The handle of a writer thread; see the module documentation.
pub(super) struct Writer {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<Vec<Anchor>>>,
    error: Arc<Mutex<Option<StateError>>>,
}

/// A batch whose intents are queued (see [`Writer::queue_intents`]).
pub(super) enum Pending {
    /// Every item was journaled before (a retry): nothing to wait for.
    Ready(Batch),
    /// Waiting for the commit of its intents.
    Waiting(Arc<Batch>, oneshot::Receiver<Vec<JournalId>>),
}

impl Writer {
    /// Starts a writer for the journal of `run`, with `clean`: anchors no longer dirty whose
    /// clearing an earlier writer of the run left to this one.
    pub fn start(store: SharedStore, run: RunId, clean: Vec<Anchor>) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::channel();
        let error = Arc::new(Mutex::new(None));
        let slot = error.clone();
        // The thread's trace events (the store's among them) go where the caller's go.
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        let thread = std::thread::Builder::new()
            .name("dirsync-state-writer".into())
            .spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    serve(&store, run, &rx, &slot, clean)
                })
            })?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
            error,
        })
    }

    fn send(&self, job: Job) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(job).is_ok())
    }

    /// Queues the new items of `batches` (a round of the export: the batches that start
    /// together) to be journaled as intended, all in one commit; [`journaled`](Self::journaled)
    /// answers each batch with its journal rows once that commit is durable.
    pub fn queue_intents(&self, batches: Vec<Batch>) -> Vec<Pending> {
        let mut jobs = Vec::new();
        let pending: Vec<Pending> = batches
            .into_iter()
            .map(|batch| {
                if batch.items.iter().all(|i| i.journal.is_some()) {
                    return Pending::Ready(batch);
                }
                let shared = Arc::new(batch);
                let (reply, answer) = oneshot::channel();
                jobs.push((shared.clone(), reply));
                Pending::Waiting(shared, answer)
            })
            .collect();
        if !jobs.is_empty() {
            // A refused job drops its replies: each batch then learns the writer's error.
            self.send(Job::Intents(jobs));
        }
        pending
    }

    /// A batch [`queue_intents`](Self::queue_intents) queued, once its intents are durable,
    /// with their journal rows.
    pub async fn journaled(&self, pending: Pending) -> Result<Batch> {
        let (shared, answer) = match pending {
            Pending::Ready(batch) => return Ok(batch),
            Pending::Waiting(shared, answer) => (shared, answer),
        };
        let Ok(ids) = answer.await else {
            return Err(self.error());
        };
        // The writer lets go of the batch before it answers.
        let mut batch = Arc::try_unwrap(shared).unwrap_or_else(|shared| (*shared).clone());
        let mut ids = ids.into_iter();
        for item in batch.items.iter_mut().filter(|i| i.journal.is_none()) {
            item.journal = ids.next();
        }
        Ok(batch)
    }

    /// Queues the ledger's decisions (not waiting for their commit).
    pub fn write(&self, writes: Vec<Write>) {
        if !writes.is_empty() {
            self.send(Job::Writes(writes));
        }
    }

    /// Queues `f` (not waiting for it).
    pub fn call(
        &self,
        f: impl FnOnce(&mut dyn StateStore) -> Result<(), StateError> + Send + 'static,
    ) {
        self.send(Job::Call(Box::new(f)));
    }

    /// Queues the dirty set's settlement: `clean` leaves the dirty set — not at once: the
    /// anchors wait (in the writer, then in what [`finish`](Self::finish) answers) until many
    /// have gathered, so that the dirty set, keyed by anchor, has each of its pages written
    /// once for many pages of a run rather than once per page — or until the writer is about
    /// to write what may mark an object dirty (a forgotten target object, a call), which must
    /// come after. `released` leave escrow once the writes queued before are committed.
    pub fn settle(&self, clean: Vec<Anchor>, released: Vec<Anchor>) {
        self.send(Job::Settle { clean, released });
    }

    /// Waits until everything queued is committed, then stops the thread. Answers the anchors
    /// no longer dirty not cleared yet: none when more than `keep` waited (all were cleared).
    /// Anchors never cleared stay dirty: planned again, with nothing to do.
    pub async fn finish(mut self, keep: usize) -> Result<Vec<Anchor>> {
        let (reply, answer) = oneshot::channel();
        let flushed = self.send(Job::Flush(reply, keep)) && answer.await.is_ok();
        self.tx = None;
        let mut clean = Vec::new();
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(c) => clean = c,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        if !flushed {
            return Err(self.error());
        }
        Ok(clean)
    }

    /// Why the writer stopped: its first error (once; later callers learn only that it
    /// stopped).
    fn error(&self) -> EngineError {
        lock(&self.error)
            .take()
            .unwrap_or_else(|| {
                StateError::Invalid("the state writer stopped after an earlier error".into())
            })
            .into()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // What is queued is still committed (those operations happened); then the thread ends.
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Outcomes (and the other decisions of the ledger) held back at most before they are
/// committed with the next intents: a page of a paged run, as a rule, so that the links, target
/// mirror rows and index rows of a page's operations are written in one transaction — each
/// page of those tables (keyed by anchor, id, value: scattered) written once rather than once
/// per round of batches.
const DEFERRED: usize = 20_000;

/// The writer thread: serves jobs until the handle is dropped, stopping at the first error —
/// which it leaves in `slot` before it lets go of the answers it owes (so a caller whose answer
/// never comes finds the error there).
fn serve(
    store: &SharedStore,
    run: RunId,
    rx: &mpsc::Receiver<Job>,
    slot: &Mutex<Option<StateError>>,
    clean: Vec<Anchor>,
) -> Vec<Anchor> {
    let mut held = Held {
        writes: Vec::new(),
        clean,
    };
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter());
        let mut intents = Vec::new();
        let mut flushes = Vec::new();
        let result = serve_jobs(store, run, jobs, &mut held, &mut intents, &mut flushes);
        if let Err(e) = result {
            *lock(slot) = Some(e);
            return Vec::new();
        }
        for reply in flushes {
            let _ = reply.send(());
        }
    }
    // The handle is gone (dropped without `finish`): what was decided is still recorded.
    if !held.writes.is_empty() {
        let writes = std::mem::take(&mut held.writes);
        if let Err(e) = commit(lock(store).as_mut(), writes, &mut held.clean) {
            *lock(slot) = Some(e);
        }
    }
    held.clean
}

/// What the writer holds back: the ledger's decisions, in order, and the anchors no longer
/// dirty.
struct Held {
    writes: Vec<Write>,
    clean: Vec<Anchor>,
}

/// Clears `clean` from the dirty set (in anchor order), in one transaction.
fn clear(s: &mut dyn StateStore, clean: &mut Vec<Anchor>) -> Result<(), StateError> {
    if clean.is_empty() {
        return Ok(());
    }
    clean.sort_unstable();
    clean.dedup();
    s.clear_dirty(clean)?;
    clean.clear();
    Ok(())
}

type Intents = Vec<(Arc<Batch>, oneshot::Sender<Vec<JournalId>>)>;

/// Carries out `jobs` (see the module documentation for the order); answers the intents.
/// The ledger's decisions wait in `held` until a call, a flush or [`DEFERRED`] of them.
fn serve_jobs(
    store: &SharedStore,
    run: RunId,
    jobs: Vec<Job>,
    held: &mut Held,
    intents: &mut Intents,
    flushes: &mut Vec<oneshot::Sender<()>>,
) -> Result<(), StateError> {
    let mut guard = lock(store);
    let s: &mut dyn StateStore = guard.as_mut();
    let mut keep = usize::MAX;
    for job in jobs {
        match job {
            Job::Intents(round) => intents.extend(round),
            Job::Writes(w) => held.writes.extend(w),
            Job::Call(f) => {
                commit(s, std::mem::take(&mut held.writes), &mut held.clean)?;
                // Whatever the call writes comes after the dirty set's settlement.
                clear(s, &mut held.clean)?;
                f(s)?;
            }
            Job::Settle { clean, released } => {
                held.clean.extend(clean);
                if !released.is_empty() {
                    commit(s, std::mem::take(&mut held.writes), &mut held.clean)?;
                    for a in &released {
                        s.release(a)?;
                    }
                }
            }
            Job::Flush(reply, k) => {
                keep = keep.min(k);
                flushes.push(reply);
            }
        }
    }
    let deferred = &mut held.writes;
    let ops: Vec<(&Operation, Option<&TargetOperation>)> = intents
        .iter()
        .flat_map(|(b, _)| b.items.iter())
        .filter(|i| i.journal.is_none())
        .map(|i| (&*i.op, i.sent.as_ref()))
        .collect();
    let due = !flushes.is_empty() || deferred.len() >= DEFERRED;
    let ids = if !due {
        // The intents alone: small rows, appended.
        if ops.is_empty() {
            Vec::new()
        } else {
            s.journal_intents(run, &ops)?
        }
    } else {
        let writes = std::mem::take(deferred);
        let (outcomes, rest) = outcomes(&writes);
        if outcomes.is_empty() && ops.is_empty() && rest.is_empty() {
            Vec::new()
        } else if rest.is_empty() {
            // The outcomes and the intents in one commit.
            s.journal_commit(run, &outcomes, &ops)?
        } else {
            drop(outcomes);
            commit(s, writes, &mut held.clean)?;
            if ops.is_empty() {
                Vec::new()
            } else {
                s.journal_intents(run, &ops)?
            }
        }
    };
    drop(ops);
    if !flushes.is_empty() && held.clean.len() > keep {
        clear(s, &mut held.clean)?;
    }
    let mut ids = ids.into_iter();
    for (batch, reply) in intents.drain(..) {
        let n = batch.items.iter().filter(|i| i.journal.is_none()).count();
        let mine: Vec<JournalId> = ids.by_ref().take(n).collect();
        drop(batch);
        let _ = reply.send(mine);
    }
    Ok(())
}

/// The journal outcomes among `writes`, and the other writes (escrows, forgotten objects).
fn outcomes(writes: &[Write]) -> (Vec<JournalOutcome<'_>>, Vec<&Write>) {
    let mut outcomes = Vec::with_capacity(writes.len());
    let mut rest = Vec::new();
    for w in writes {
        match w {
            Write::Done {
                journal,
                op,
                sent,
                target_id,
            } => outcomes.push(JournalOutcome::Done {
                id: *journal,
                op,
                sent: sent.as_ref(),
                target_id: target_id.as_ref(),
            }),
            Write::Failed {
                journal,
                error,
                retryable,
            } => outcomes.push(JournalOutcome::Failed {
                id: *journal,
                error,
                retryable: *retryable,
            }),
            other => rest.push(other),
        }
    }
    (outcomes, rest)
}

/// Commits the ledger's decisions: the journal outcomes in one
/// [`StateStore::journal_outcomes`], then escrows and forgotten objects, in order — the dirty
/// set's settlement `clean` before the first forgotten object (which marks objects dirty).
fn commit(
    s: &mut dyn StateStore,
    writes: Vec<Write>,
    clean: &mut Vec<Anchor>,
) -> Result<(), StateError> {
    if writes.is_empty() {
        return Ok(());
    }
    let (outcomes, rest) = outcomes(&writes);
    if !outcomes.is_empty() {
        s.journal_outcomes(&outcomes)?;
    }
    for w in rest {
        match w {
            Write::Escrow {
                anchor,
                error,
                next_retry,
            } => {
                s.escrow(anchor, error, *next_retry)?;
            }
            Write::Forget(id) => {
                clear(s, clean)?;
                info!(id = %id, "the target object is gone: forgotten, to be planned again");
                s.remove_target_objects(std::slice::from_ref(id))?;
            }
            Write::Done { .. } | Write::Failed { .. } => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Attributes, TargetId, Value, Values};
    use crate::state::testkit::create_op;
    use crate::state::MemoryStore;

    fn create(anchor: &str) -> (Operation, TargetOperation) {
        let mut attributes = Attributes::new();
        attributes.set("userName", Values::from(vec![Value::string(anchor)]));
        create_op(anchor, attributes)
    }

    fn dirty(store: &SharedStore) -> Vec<String> {
        let mut d: Vec<String> = lock(store)
            .dirty()
            .unwrap()
            .iter()
            .map(|a| a.to_string())
            .collect();
        d.sort();
        d
    }

    /// Counts the store's commits by what they do (the `state: committing` trace events).
    #[derive(Clone, Default)]
    struct Commits(Arc<Mutex<Vec<String>>>);

    impl Commits {
        fn of(&self, what: &str) -> usize {
            lock(&self.0).iter().filter(|w| *w == what).count()
        }
    }

    #[derive(Default)]
    struct Fields {
        message: String,
        what: String,
    }

    impl tracing::field::Visit for Fields {
        fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
            if field.name() == "what" {
                self.what = value.to_string();
            }
        }

        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.message = format!("{value:?}");
            }
        }
    }

    impl tracing::Subscriber for Commits {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            let mut f = Fields::default();
            event.record(&mut f);
            if f.message == "state: committing" {
                lock(&self.0).push(f.what);
            }
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// The batches of a round are journaled in one commit, durable before any is answered;
    /// their outcomes are committed later, together, and every row ends done.
    #[test]
    fn a_round_of_batches_is_journaled_in_one_commit() {
        use crate::engine::ledger::tests::{ledger, settings};
        use crate::engine::ledger::Outcome;
        use crate::state::{JournalState, SqliteStore};
        let commits = Commits::default();
        let dispatch = tracing::Dispatch::new(commits.clone());
        tracing::dispatcher::with_default(&dispatch, || {
            let store: SharedStore =
                Arc::new(Mutex::new(Box::new(SqliteStore::open_in_memory().unwrap())));
            let run = lock(&store).begin_run("test", chrono::Utc::now()).unwrap();
            let ops: Vec<Operation> = (0..6).map(|i| create(&format!("a{i}")).0).collect();
            // Batches of 2, 8 in flight, no breaker window: one round of 3 batches.
            let mut l = ledger(settings(2, 8, 0), ops);
            let mut round = Vec::new();
            while let Some(b) = l.ready(std::time::Duration::ZERO) {
                round.push(b);
            }
            assert_eq!(round.len(), 3);
            let before = lock(&commits.0).len();
            let w = Writer::start(store.clone(), run, Vec::new()).unwrap();
            let pending = w.queue_intents(round);
            let batches: Vec<Batch> = pending
                .into_iter()
                .map(|p| futures::executor::block_on(w.journaled(p)).unwrap())
                .collect();
            assert_eq!(commits.of("journaling operations"), 1);
            let unconfirmed = lock(&store).journal_unconfirmed().unwrap();
            assert_eq!(unconfirmed.len(), 6, "durable before they are answered");
            for (k, b) in batches.into_iter().enumerate() {
                assert!(b.items.iter().all(|i| i.journal.is_some()));
                let outcomes = (0..b.items.len())
                    .map(|i| Outcome::Done(Some(TargetId::new(format!("t{k}-{i}")))))
                    .collect();
                l.settle(b, outcomes, std::time::Duration::ZERO);
            }
            w.write(l.take_writes());
            futures::executor::block_on(w.finish(usize::MAX)).unwrap();
            assert!(l.is_finished());
            // Then one more: the outcomes, at the flush.
            let all = lock(&commits.0).clone();
            assert_eq!(
                all[before..],
                [
                    "journaling operations",
                    "journaling intents and recording outcomes"
                ]
            );
            let journal = lock(&store).journal(Some(run)).unwrap();
            assert_eq!(journal.len(), 6);
            assert!(journal.iter().all(|r| r.state == JournalState::Done));
        });
    }

    /// Anchors settled wait across writers until enough gather, and are cleared before a
    /// later write marks objects dirty — which they never undo.
    #[test]
    fn settled_anchors_wait_and_never_undo_a_later_mark() {
        let store: SharedStore = Arc::new(Mutex::new(Box::new(MemoryStore::new())));
        let run = {
            let mut s = lock(&store);
            let run = s.begin_run("test", chrono::Utc::now()).unwrap();
            // a2 is linked to t2 (created in an earlier run).
            let (op, sent) = create("a2");
            let j = s.journal_intent(run, &op, Some(&sent)).unwrap();
            s.journal_done(j, &op, Some(&sent), Some(&TargetId::from("t2")))
                .unwrap();
            s.mark_dirty(&["a1".into(), "a2".into(), "a3".into()])
                .unwrap();
            run
        };
        // A writer settles a1 and a3, keeping them back: still dirty after it.
        let w = Writer::start(store.clone(), run, Vec::new()).unwrap();
        w.settle(vec!["a3".into(), "a1".into()], Vec::new());
        let held = futures::executor::block_on(w.finish(usize::MAX)).unwrap();
        assert_eq!(held.len(), 2);
        assert_eq!(dirty(&store), ["a1", "a2", "a3"]);

        // The next writer settles a2, then finds t2 gone: the held anchors are cleared before
        // the forgotten object marks a2 dirty again, so a2 stays dirty.
        let w = Writer::start(store.clone(), run, held).unwrap();
        w.settle(vec!["a2".into()], Vec::new());
        w.write(vec![Write::Forget("t2".into())]);
        let held = futures::executor::block_on(w.finish(usize::MAX)).unwrap();
        assert!(held.is_empty(), "{held:?}");
        assert_eq!(dirty(&store), ["a2"]);

        // Once more than `keep` wait, a flush clears them.
        let w = Writer::start(store.clone(), run, Vec::new()).unwrap();
        w.settle(vec!["a2".into()], Vec::new());
        let held = futures::executor::block_on(w.finish(0)).unwrap();
        assert!(held.is_empty());
        assert!(dirty(&store).is_empty());
    }
}
