//! Crash recovery: operations journaled as intended and never confirmed are settled against
//! the target before anything else is sent.
//!
//! A crash inside a batch leaves a whole batch unconfirmed (thousands of operations at a large
//! `max_batch` and concurrency): they are settled in chunks, as an export goes — the creates of
//! a chunk looked up by their join keys with [`Target::find_any`] in batches of
//! [`TargetCapabilities::lookup_batch`] values (one join group at a time, as
//! [`JoinLookup`](super::JoinLookup) looks up), the updates and deletes re-read
//! (`concurrency` at once), and the chunk's outcomes recorded in one group commit.
//!
//! [`Target::find_any`]: crate::connector::Target::find_any
//! [`TargetCapabilities::lookup_batch`]: crate::connector::TargetCapabilities

use std::collections::HashMap;

use futures::stream;

use super::lookup::lookup_batches;
use super::*;
use crate::delta::JoinGroup;
use crate::model::ObjectType;
use crate::state::JournalOutcome;

/// Unconfirmed operations settled per group commit.
const CHUNK: usize = 1000;

/// What became of one unconfirmed operation.
enum Settled {
    /// It took effect: the journal row is done (with the target object, for a create).
    Done(Option<TargetId>),
    /// It did not take effect, or only in part: failed (retryable), planned again.
    Failed(&'static str),
}

impl Synchronizer {
    /// Resolves operations a crash left unconfirmed (journaled as intended, never recorded as
    /// done or failed), before anything else is sent: a create is looked up in the target by
    /// its join keys — found, it is recorded as done (never sent twice); an update or delete is
    /// settled by re-reading the object. Every such object is marked dirty, to be planned
    /// again against what the target holds.
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
        let total = pending.len() as u64;
        for chunk in pending.chunks(CHUNK) {
            self.recover_chunk(chunk).await?;
            report.recovered += chunk.len() as u64;
            self.progress(Stage::Recover, report.recovered, Some(total));
        }
        report.stages.push((Stage::Recover, t0.elapsed()));
        Ok(report)
    }

    /// Settles `entries` against the target, then records it all in one go.
    async fn recover_chunk(&self, entries: &[JournalEntry]) -> Result<()> {
        let mut found = self.find_created(entries).await?;
        let reads = self.reread(entries).await?;
        let mut objects: Vec<TargetObject> = Vec::new();
        let mut gone: Vec<TargetId> = Vec::new();
        let mut settled: Vec<Settled> = Vec::with_capacity(entries.len());
        for (k, entry) in entries.iter().enumerate() {
            let op = &entry.operation;
            settled.push(match (&op.kind, &entry.sent) {
                (OperationKind::Create { .. }, _) => match found.remove(&k) {
                    Some(obj) => {
                        info!(anchor = %op.anchor, id = %obj.id, "create was applied before the crash: recorded");
                        let id = obj.id.clone();
                        objects.push(obj);
                        Settled::Done(Some(id))
                    }
                    None => Settled::Failed("not applied before a crash; planned again"),
                },
                (_, Some(sent)) => match (sent.id(), reads.get(&k)) {
                    (Some(_), Some(Some(obj))) => {
                        if matches!(op.kind, OperationKind::Delete { .. }) {
                            Settled::Failed("delete not applied before a crash; planned again")
                        } else {
                            // Whatever part took effect is now in the mirror; the object stays
                            // dirty and is planned again against it.
                            objects.push(obj.clone());
                            Settled::Failed(
                                "interrupted by a crash; planned again against the target's state",
                            )
                        }
                    }
                    (Some(id), Some(None)) => {
                        if matches!(op.kind, OperationKind::Delete { .. }) {
                            Settled::Done(Some(id.clone()))
                        } else {
                            gone.push(id.clone());
                            Settled::Failed("target object gone")
                        }
                    }
                    _ => Settled::Failed("interrupted by a crash"),
                },
                // Link-only operations (unlink, join without changes): do them again.
                (_, None) => Settled::Failed("interrupted by a crash; planned again"),
            });
        }
        let outcomes: Vec<JournalOutcome<'_>> = entries
            .iter()
            .zip(&settled)
            .map(|(entry, s)| match s {
                Settled::Done(target_id) => JournalOutcome::Done {
                    id: entry.id,
                    op: &entry.operation,
                    // A create found: the link only (the object is recorded as read). A delete
                    // that took effect: the mirror forgets the object.
                    sent: match entry.operation.kind {
                        OperationKind::Create { .. } => None,
                        _ => entry.sent.as_ref(),
                    },
                    target_id: target_id.as_ref(),
                },
                Settled::Failed(error) => JournalOutcome::Failed {
                    id: entry.id,
                    error,
                    retryable: true,
                },
            })
            .collect();
        let dirty: Vec<Anchor> = entries.iter().map(|e| e.operation.anchor.clone()).collect();
        self.store(|s| {
            if !objects.is_empty() {
                s.put_target_objects(&objects)?;
            }
            if !gone.is_empty() {
                s.remove_target_objects(&gone)?;
            }
            s.journal_outcomes(&outcomes)?;
            s.mark_dirty(&dirty)
        })
    }

    /// The target objects the creates among `entries` made before the crash, by index: their
    /// join groups looked up one round at a time (round `r` asks each create still unfound for
    /// its group `r`, in batches), a create found when exactly one object matches the group.
    async fn find_created(&self, entries: &[JournalEntry]) -> Result<HashMap<usize, TargetObject>> {
        let creates: Vec<(usize, &ObjectType, &[JoinGroup])> = entries
            .iter()
            .enumerate()
            .filter_map(|(k, e)| match &e.operation.kind {
                OperationKind::Create { lookup, .. } => {
                    Some((k, &e.operation.target_type, lookup.as_slice()))
                }
                _ => None,
            })
            .collect();
        let per_call = self.target.capabilities().lookup_batch;
        let mut found: HashMap<usize, TargetObject> = HashMap::new();
        for round in 0.. {
            let open: Vec<&(usize, &ObjectType, &[JoinGroup])> = creates
                .iter()
                .filter(|(k, _, groups)| groups.len() > round && !found.contains_key(k))
                .collect();
            if open.is_empty() {
                break;
            }
            let mut candidates: HashMap<ObjectType, Vec<TargetObject>> = HashMap::new();
            for b in lookup_batches(open.iter().map(|(_, t, g)| (*t, *g)), round, per_call) {
                let objects = self
                    .target
                    .find_any(&b.object_type, &b.attribute, &b.values)
                    .await?;
                candidates.entry(b.object_type).or_default().extend(objects);
            }
            for (k, ty, groups) in open {
                let group = &groups[round];
                // Distinct objects (one can come back from two batches).
                let matching: HashMap<&TargetId, &TargetObject> = candidates
                    .get(*ty)
                    .into_iter()
                    .flatten()
                    .filter(|o| matches_group(o, group))
                    .map(|o| (&o.id, o))
                    .collect();
                if matching.len() == 1 {
                    if let Some(one) = matching.into_values().next() {
                        found.insert(*k, one.clone());
                    }
                }
            }
        }
        Ok(found)
    }

    /// The target objects the updates and deletes among `entries` name, read again (`None`:
    /// gone), by index; `concurrency` reads at once.
    async fn reread(
        &self,
        entries: &[JournalEntry],
    ) -> Result<HashMap<usize, Option<TargetObject>>> {
        let reads: Vec<(usize, &TargetOperation)> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| !matches!(e.operation.kind, OperationKind::Create { .. }))
            .filter_map(|(k, e)| Some((k, e.sent.as_ref().filter(|s| s.id().is_some())?)))
            .collect();
        let results: Vec<(
            usize,
            std::result::Result<Option<TargetObject>, ConnectorError>,
        )> = stream::iter(reads)
            .map(|(k, sent)| async move {
                let id = sent.id().cloned().unwrap_or_else(|| TargetId::new(""));
                (k, self.target.get(sent.object_type(), &id).await)
            })
            .buffer_unordered(self.config.concurrency.max(1))
            .collect()
            .await;
        let mut out = HashMap::with_capacity(results.len());
        for (k, r) in results {
            out.insert(k, r?);
        }
        Ok(out)
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

/// Whether `object` has every attribute value of `group` (strings ignoring case, as joins and
/// lookups compare them).
fn matches_group(object: &TargetObject, group: &JoinGroup) -> bool {
    group.pairs().iter().all(|(attr, value)| {
        let key = crate::state::lookup_key(value);
        object
            .attributes
            .get(attr.as_str())
            .is_some_and(|vs| vs.iter().any(|v| crate::state::lookup_key(v) == key))
    })
}
