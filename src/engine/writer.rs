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
//! The crash promise holds: [`Writer::intents`] answers once the intents are committed
//! (durable), and only then is a batch sent.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;
use tracing::info;

use super::ledger::{Batch, Write};
use super::{lock, EngineError, Result};
use crate::connector::TargetOperation;
use crate::delta::Operation;
use crate::state::{JournalId, JournalOutcome, RunId, StateError, StateStore};

/// The store, shared by the engine and its writer thread.
pub(super) type SharedStore = Arc<Mutex<Box<dyn StateStore>>>;

type Call = Box<dyn FnOnce(&mut dyn StateStore) -> Result<(), StateError> + Send>;

enum Job {
    /// Journal the items of the batch not journaled yet; answer their rows.
    Intents {
        batch: Arc<Batch>,
        reply: oneshot::Sender<Vec<JournalId>>,
    },
    /// The ledger's decisions.
    Writes(Vec<Write>),
    /// Anything else, in order.
    Call(Call),
    /// Answer once everything queued before is committed.
    Flush(oneshot::Sender<()>),
}

/// The handle of a writer thread; see the module documentation.
pub(super) struct Writer {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    error: Arc<Mutex<Option<StateError>>>,
}

impl Writer {
    /// Starts a writer for the journal of `run`.
    pub fn start(store: SharedStore, run: RunId) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::channel();
        let error = Arc::new(Mutex::new(None));
        let slot = error.clone();
        let thread = std::thread::Builder::new()
            .name("dirsync-state-writer".into())
            .spawn(move || serve(&store, run, &rx, &slot))?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
            error,
        })
    }

    fn send(&self, job: Job) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(job).is_ok())
    }

    /// Journals the batch's new items as intended, in one commit, and answers the batch with
    /// their journal rows once that commit is durable.
    pub async fn intents(&self, mut batch: Batch) -> Result<Batch> {
        if batch.items.iter().all(|i| i.journal.is_some()) {
            return Ok(batch);
        }
        let shared = Arc::new(batch);
        let (reply, answer) = oneshot::channel();
        let sent = self.send(Job::Intents {
            batch: shared.clone(),
            reply,
        });
        let ids = match (sent, answer.await) {
            (true, Ok(ids)) => ids,
            _ => return Err(self.error()),
        };
        // The writer lets go of the batch before it answers.
        batch = Arc::try_unwrap(shared).unwrap_or_else(|shared| (*shared).clone());
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

    /// Waits until everything queued is committed, then stops the thread.
    pub async fn finish(mut self) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        let flushed = self.send(Job::Flush(reply)) && answer.await.is_ok();
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
        if !flushed {
            return Err(self.error());
        }
        Ok(())
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
) {
    let mut deferred: Vec<Write> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter());
        let mut intents = Vec::new();
        let mut flushes = Vec::new();
        let result = serve_jobs(store, run, jobs, &mut deferred, &mut intents, &mut flushes);
        if let Err(e) = result {
            *lock(slot) = Some(e);
            return;
        }
        for reply in flushes {
            let _ = reply.send(());
        }
    }
    // The handle is gone (dropped without `finish`): what was decided is still recorded.
    if !deferred.is_empty() {
        if let Err(e) = commit(lock(store).as_mut(), deferred) {
            *lock(slot) = Some(e);
        }
    }
}

type Intents = Vec<(Arc<Batch>, oneshot::Sender<Vec<JournalId>>)>;

/// Carries out `jobs` (see the module documentation for the order); answers the intents.
/// The ledger's decisions wait in `deferred` until a call, a flush or [`DEFERRED`] of them.
fn serve_jobs(
    store: &SharedStore,
    run: RunId,
    jobs: Vec<Job>,
    deferred: &mut Vec<Write>,
    intents: &mut Intents,
    flushes: &mut Vec<oneshot::Sender<()>>,
) -> Result<(), StateError> {
    let mut guard = lock(store);
    let s: &mut dyn StateStore = guard.as_mut();
    for job in jobs {
        match job {
            Job::Intents { batch, reply } => intents.push((batch, reply)),
            Job::Writes(w) => deferred.extend(w),
            Job::Call(f) => {
                commit(s, std::mem::take(deferred))?;
                f(s)?;
            }
            Job::Flush(reply) => flushes.push(reply),
        }
    }
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
            commit(s, writes)?;
            if ops.is_empty() {
                Vec::new()
            } else {
                s.journal_intents(run, &ops)?
            }
        }
    };
    drop(ops);
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
/// [`StateStore::journal_outcomes`], then escrows and forgotten objects, in order.
fn commit(s: &mut dyn StateStore, writes: Vec<Write>) -> Result<(), StateError> {
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
                info!(id = %id, "the target object is gone: forgotten, to be planned again");
                s.remove_target_objects(std::slice::from_ref(id))?;
            }
            Write::Done { .. } | Write::Failed { .. } => {}
        }
    }
    Ok(())
}
