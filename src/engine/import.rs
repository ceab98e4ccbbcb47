//! The engine's import entry points around the readers in the parent module: two objects with
//! one anchor become [`EngineError::DuplicateAnchor`], and the full-import cycle
//! ([`Synchronizer::full_import_cycle`]).

use super::*;

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

impl Synchronizer {
    /// Reads every object of the source into the mirror. Deletions (objects not delivered) are
    /// applied only when the whole import completed and delivered enough objects.
    ///
    /// Two objects with one anchor stop the import with [`EngineError::DuplicateAnchor`]: the
    /// batch holding the second is not applied, nothing is deleted, and the watermark is
    /// cleared, so the next import is a full one again (a delta from the old watermark would
    /// not see the source being fixed).
    pub async fn full_import(&mut self) -> Result<RunReport> {
        let start = self.begin("full-import")?;
        let result = self.full_import_inner().instrument(start.span()).await;
        self.finish(start, result)
    }

    pub(super) async fn full_import_read(&mut self) -> Result<RunReport> {
        let t0 = Instant::now();
        let name = self.source.name().to_string();
        let generation = self.store(|s| s.begin_full_import(&name))?;
        let mut report = RunReport::default();
        let mut watermark = None;
        let batch_size = self.config.import_batch.max(1);
        let mut batch = Vec::with_capacity(batch_size);
        // The store's side runs on a thread of its own: the source is read (and parsed) here
        // while the batches before are compared with the mirror and written.
        let mut writer = ImportWriter::start(self.store.clone(), generation, batch_size)?;
        let read: Result<()> = async {
            let mut stream = self.source.full_import().await?;
            while let Some(item) = stream.next().await {
                match item? {
                    ImportItem::Item(e) => {
                        batch.push(e);
                        report.imported += 1;
                        if batch.len() >= batch_size {
                            let b = std::mem::replace(&mut batch, Vec::with_capacity(batch_size));
                            if !writer.send(ImportJob::Entries(b)).await {
                                // The writer stopped at an error: `finish` returns it.
                                return Ok(());
                            }
                            self.progress(Stage::Import, report.imported, None);
                        }
                    }
                    ImportItem::Checkpoint(w) => watermark = Some(w),
                    ImportItem::Present(anchors) => {
                        let b = std::mem::take(&mut batch);
                        if !writer.send(ImportJob::Entries(b)).await
                            || !writer.send(ImportJob::Present(anchors)).await
                        {
                            return Ok(());
                        }
                    }
                }
            }
            if !batch.is_empty() {
                writer.send(ImportJob::Entries(batch)).await;
            }
            Ok(())
        }
        .await;
        // A store error concerns objects delivered before any error of the source after it.
        writer.finish()?;
        read?;
        let share = self.config.min_import_share;
        let summary =
            self.with_store(|s| s.finish_full_import(&name, generation, watermark.as_ref(), share));
        match summary {
            Ok(sum) => info!(
                seen = sum.seen,
                added = sum.added,
                changed = sum.changed,
                deleted = sum.deleted,
                "full import finished"
            ),
            Err(StateError::ImportTooSmall { seen, mirrored }) => {
                warn!(seen, mirrored, "full import refused");
                return Err(EngineError::ImportTooSmall { seen, mirrored });
            }
            Err(e) => return Err(e.into()),
        }
        self.progress(Stage::Import, report.imported, Some(report.imported));
        report.stages.push((Stage::Import, t0.elapsed()));
        Ok(report)
    }

    /// Reads the changes since the last watermark. Without a watermark, or when the source
    /// says it is no longer valid, runs a full import instead (and no deletion is planned until
    /// that import has completed).
    pub async fn delta_import(&mut self) -> Result<RunReport> {
        let start = self.begin("delta-import")?;
        let result = self.delta_import_inner().instrument(start.span()).await;
        self.finish(start, result)
    }

    pub(super) async fn delta_import_read(&mut self) -> Result<RunReport> {
        let t0 = Instant::now();
        let name = self.source.name().to_string();
        let Some(since) = self.store(|s| s.watermark(&name))? else {
            return self.full_import_inner().await;
        };
        if !self.source.capabilities().delta {
            return self.full_import_inner().await;
        }
        let mut report = RunReport::default();
        let mut batch: Vec<Change> = Vec::new();
        let batch_size = self.config.import_batch.max(1);
        // A present phase (see `ImportItem::Present`): the full-import generation its objects
        // are (re)imported into, and the entries of it not written yet.
        let mut phase: Option<u64> = None;
        let mut phase_entries: Vec<Entry> = Vec::new();
        // The anchors changed since the last checkpoint: present too, when a phase begins.
        let mut since_checkpoint: Vec<Anchor> = Vec::new();
        let result: Result<()> = async {
            let mut stream = self.source.delta_import(&since).await?;
            while let Some(item) = stream.next().await {
                match item? {
                    ImportItem::Item(c) => {
                        report.imported += 1;
                        let Some(generation) = phase else {
                            since_checkpoint.push(c.anchor().clone());
                            batch.push(c);
                            continue;
                        };
                        match c {
                            Change::Add(e) | Change::Replace(e) => {
                                phase_entries.push(e);
                                if phase_entries.len() >= batch_size {
                                    let b = std::mem::take(&mut phase_entries);
                                    self.store(|s| s.import_entries(generation, &b))?;
                                }
                            }
                            other => {
                                let b = std::mem::take(&mut phase_entries);
                                self.store(|s| s.import_entries(generation, &b))?;
                                let anchor = other.anchor().clone();
                                let deleted = matches!(other, Change::Delete { .. });
                                self.store(|s| {
                                    containers::apply_changes(s, &name, &[other], None)
                                })?;
                                if !deleted {
                                    self.reimport(generation, std::slice::from_ref(&anchor))?;
                                }
                            }
                        }
                    }
                    ImportItem::Present(anchors) => {
                        let generation = match phase {
                            Some(g) => g,
                            None => {
                                // The changes since the last checkpoint belong to the phase.
                                let b = std::mem::take(&mut batch);
                                self.store(|s| containers::apply_changes(s, &name, &b, None))?;
                                let g = self.store(|s| s.begin_full_import(&name))?;
                                let changed = std::mem::take(&mut since_checkpoint);
                                self.reimport(g, &changed)?;
                                phase = Some(g);
                                g
                            }
                        };
                        let b = std::mem::take(&mut phase_entries);
                        self.store(|s| s.import_entries(generation, &b))?;
                        self.reimport(generation, &anchors)?;
                    }
                    ImportItem::Checkpoint(w) => {
                        since_checkpoint.clear();
                        if let Some(generation) = phase.take() {
                            let b = std::mem::take(&mut phase_entries);
                            self.store(|s| s.import_entries(generation, &b))?;
                            self.finish_present_phase(&name, generation, &w)?;
                        } else {
                            let b = std::mem::take(&mut batch);
                            self.store(|s| containers::apply_changes(s, &name, &b, Some(&w)))?;
                        }
                        self.progress(Stage::Import, report.imported, None);
                    }
                }
            }
            Ok(())
        }
        .await;
        if let Some(generation) = phase {
            // The stream ended inside a present phase: what it delivered is newer data and
            // stays; the phase is abandoned and deletes nothing.
            if !phase_entries.is_empty() {
                self.store(|s| s.import_entries(generation, &phase_entries))?;
            }
        }
        match result {
            Ok(()) => {}
            Err(EngineError::Connector(e)) if e.kind() == ErrorKind::InvalidWatermark => {
                warn!(error = %e, "watermark no longer valid: full import");
                self.store(|s| s.clear_watermark(&name))?;
                return self.full_import_inner().await;
            }
            // A change to an object the mirror does not hold (a source that reported a modify
            // for an object it never delivered): nothing of that batch was applied and its
            // watermark did not move; a full import brings the mirror back in line.
            Err(EngineError::State(e @ StateError::UnknownAnchor { .. })) => {
                warn!(error = %e, "delta import: unknown object, full import");
                self.store(|s| s.clear_watermark(&name))?;
                return self.full_import_inner().await;
            }
            Err(e) => return Err(e),
        }
        if !batch.is_empty() {
            // Changes after the last checkpoint: durable now, their watermark comes next time
            // (applying them again is harmless: the mirror is state, not a log).
            match self.with_store(|s| containers::apply_changes(s, &name, &batch, None)) {
                Ok(()) => {}
                Err(StateError::UnknownAnchor { .. }) => {
                    self.store(|s| s.clear_watermark(&name))?;
                    return self.full_import_inner().await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        report.stages.push((Stage::Import, t0.elapsed()));
        Ok(report)
    }

    /// Imports the mirrored entries of `anchors` unchanged into full import `generation` (the
    /// objects a present phase reports as still there). Anchors the mirror does not hold (the
    /// source left them out before) are skipped.
    pub(super) fn reimport(&self, generation: u64, anchors: &[Anchor]) -> Result<()> {
        let batch = self.config.import_batch.max(1);
        self.store(|s| reimport_into(s, generation, anchors, batch))
    }

    /// Ends a present phase at its checkpoint: deletes what it did not report and commits the
    /// watermark, under the full import's guard.
    pub(super) fn finish_present_phase(
        &self,
        name: &str,
        generation: u64,
        watermark: &crate::connector::Watermark,
    ) -> Result<()> {
        let share = self.config.min_import_share;
        match self.with_store(|s| s.finish_full_import(name, generation, Some(watermark), share)) {
            Ok(sum) => {
                info!(
                    seen = sum.seen,
                    deleted = sum.deleted,
                    "delta import: present phase finished"
                );
                Ok(())
            }
            Err(StateError::ImportTooSmall { seen, mirrored }) => {
                warn!(seen, mirrored, "present phase refused");
                Err(EngineError::ImportTooSmall { seen, mirrored })
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Imports the mirrored entries of `anchors` unchanged into full import `generation`, `batch`
/// per transaction (see [`Synchronizer::reimport`]).
fn reimport_into(
    s: &mut dyn StateStore,
    generation: u64,
    anchors: &[Anchor],
    batch: usize,
) -> Result<(), StateError> {
    for chunk in anchors.chunks(batch.max(1)) {
        let mut entries = Vec::with_capacity(chunk.len());
        for a in chunk {
            if let Some(e) = s.source_entry(a)? {
                entries.push(e);
            }
        }
        s.import_entries(generation, &entries)?;
    }
    Ok(())
}

/// The batches a full import's store thread lets wait (see [`ImportWriter`]).
const QUEUED: usize = 24;

/// What a full import hands its store thread, in the order the source delivered it.
enum ImportJob {
    /// Entries, for [`StateStore::import_entries`].
    Entries(Vec<Entry>),
    /// The anchors a present phase reports as still there (see [`Synchronizer::reimport`]).
    Present(Vec<Anchor>),
}

/// The store's side of a full import, on a thread of its own: it compares each batch with the
/// mirror and writes it while the engine reads the next from the source (a source that parses
/// a file, such as LDIF, keeps one core busy; the mirror's work gets the other). At most
/// [`QUEUED`] batches wait, so memory does not grow with a source faster than the store; the
/// batches waiting when the thread takes the next are written in one transaction (a store
/// behind its source commits less often: in an initial import each commit rewrites pages all
/// over the anchor and DN indexes, whatever the number of objects it adds). Jobs run in
/// order; the first error stops the thread, and the jobs after it are not run.
struct ImportWriter {
    tx: Option<tokio::sync::mpsc::Sender<ImportJob>>,
    thread: Option<std::thread::JoinHandle<Result<(), StateError>>>,
}

impl ImportWriter {
    /// Starts the thread for full import `generation`.
    fn start(store: writer::SharedStore, generation: u64, batch: usize) -> Result<ImportWriter> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<ImportJob>(QUEUED);
        let thread = std::thread::Builder::new()
            .name("dirsync-import".into())
            .spawn(move || {
                let mut next = None;
                loop {
                    let Some(job) = next.take().or_else(|| rx.blocking_recv()) else {
                        return Ok(());
                    };
                    match job {
                        ImportJob::Entries(mut entries) => {
                            while let Ok(more) = rx.try_recv() {
                                match more {
                                    ImportJob::Entries(e) => entries.extend(e),
                                    present => {
                                        next = Some(present);
                                        break;
                                    }
                                }
                            }
                            lock(&store).import_entries(generation, &entries)?;
                        }
                        ImportJob::Present(anchors) => {
                            reimport_into(lock(&store).as_mut(), generation, &anchors, batch)?
                        }
                    }
                }
            })
            .map_err(|e| StateError::Invalid(format!("cannot start the import thread: {e}")))?;
        Ok(ImportWriter {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues `job`; `false` once the thread has stopped at an error (which
    /// [`ImportWriter::finish`] returns).
    async fn send(&mut self, job: ImportJob) -> bool {
        match &self.tx {
            Some(tx) => tx.send(job).await.is_ok(),
            None => false,
        }
    }

    /// Waits until every job queued has run; the first error.
    fn finish(mut self) -> Result<(), StateError> {
        self.tx = None;
        match self.thread.take().map(|t| t.join()) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(panic)) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for ImportWriter {
    /// Waits for the thread (the store is the engine's again once this returns).
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryStore;

    fn user(anchor: &str, cn: &str) -> Entry {
        Entry::new(anchor, "user").with_dn(Dn::parse(&format!("cn={cn},dc=x")).unwrap())
    }

    fn batches(from: usize, n: usize) -> Vec<Entry> {
        (from..from + n)
            .map(|i| user(&format!("a{i:04}"), &format!("u{i}")))
            .collect()
    }

    /// The store thread writes every batch in order, through a present phase, and what it
    /// wrote is there once `finish` returns; then a second import whose fourth batch repeats
    /// an anchor at another DN stops there: `finish` returns the store's refusal, the batches
    /// after it are not written, and the engine's sends fail once the thread has stopped.
    #[test]
    fn the_import_thread_writes_in_order_and_stops_at_the_first_error() {
        futures::executor::block_on(async {
            let store: writer::SharedStore = Arc::new(Mutex::new(Box::new(MemoryStore::new())));
            let generation = lock(&store).begin_full_import("src").unwrap();
            let mut w = ImportWriter::start(store.clone(), generation, 3).unwrap();
            for b in 0..20 {
                assert!(w.send(ImportJob::Entries(batches(b * 3, 3))).await);
            }
            // A present phase: a0000 again (from the mirror), in order after the entries.
            let present = vec![Anchor::from("a0000"), Anchor::from("gone")];
            assert!(w.send(ImportJob::Present(present)).await);
            w.finish().unwrap();
            {
                let mut s = lock(&store);
                let summary = s.finish_full_import("src", generation, None, 0.5).unwrap();
                assert_eq!((summary.seen, summary.added), (60, 60));
                assert!(s.source_entry(&Anchor::from("a0059")).unwrap().is_some());
            }

            let generation = lock(&store).begin_full_import("src").unwrap();
            let mut w = ImportWriter::start(store.clone(), generation, 3).unwrap();
            let mut refused = false;
            for b in 0..40 {
                let mut batch = batches(100 + b * 3, 3);
                if b == 3 {
                    batch[1] = user("a0100", "someone-else");
                }
                if !w.send(ImportJob::Entries(batch)).await {
                    refused = true;
                    break;
                }
            }
            let err = w.finish().unwrap_err();
            assert!(
                matches!(&err, StateError::DuplicateAnchor { anchor, .. } if anchor.as_str() == "a0100"),
                "{err}"
            );
            let s = lock(&store);
            for i in 112..220 {
                let a = Anchor::from(format!("a{i:04}"));
                assert!(
                    s.source_entry(&a).unwrap().is_none(),
                    "{a} after the refusal"
                );
            }
            // The thread stops reading at the error: with 40 batches for a queue of 24, the
            // engine learns it before it has sent them all.
            assert!(refused);
        });
    }
}
