//! The engine: [`Synchronizer`] drives import → mirror → plan → guard → export → journal,
//! persisting what it needs in a [`StateStore`], so runs are incremental, survive crashes, and
//! never surprise an administrator.
//!
//! Run profiles: [`Synchronizer::full_import`], [`Synchronizer::delta_import`],
//! [`Synchronizer::full_sync`] (re-plan everything from the mirrors), [`Synchronizer::delta_sync`]
//! (plan only the dirty set and its neighbourhood), [`Synchronizer::reconcile`] (read the target,
//! correct drift), [`Synchronizer::run_cycle`] (delta import → delta sync),
//! [`Synchronizer::full_import_cycle`] (full import → delta sync), staging
//! ([`Synchronizer::plan`] / [`Synchronizer::apply`]) and on-demand
//! ([`Synchronizer::sync_object`]).
//!
//! ```
//! use std::sync::Arc;
//! use dirsync::connector::memory::{MemorySource, MemoryTarget};
//! use dirsync::engine::{EngineConfig, Synchronizer};
//! use dirsync::model::Entry;
//! use dirsync::rules::ruleset::{RuleBuilder, RuleSet};
//! use dirsync::state::MemoryStore;
//!
//! # futures::executor::block_on(async {
//! let source = MemorySource::new("hr");
//! source.add(Entry::new("a1", "user").with("mail", "ada@example.com")).unwrap();
//! let target = MemoryTarget::new("app");
//! let rules = RuleSet::builder()
//!     .rule(RuleBuilder::new("users", "user", "User").flow("userName", "[mail]").join(["userName"]))
//!     .build()
//!     .unwrap();
//! let mut sync = Synchronizer::new(
//!     Box::new(source), Box::new(target.clone()), Box::new(MemoryStore::new()),
//!     Arc::new(rules), EngineConfig::default(),
//! );
//! let report = sync.run_cycle().await.unwrap();
//! assert_eq!(report.count("create"), 1);
//! assert_eq!(target.len(), 1);
//! # });
//! ```

mod containers;
mod gone;
mod import;
mod lookup;
mod order;
mod report;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, info_span, warn, Instrument};

pub use lookup::JoinLookup;
pub use report::{Failure, Progress, RunReport, Stage};

use crate::connector::{ConnectorError, ErrorKind, ImportItem, Source, Target, TargetOperation};
use crate::delta::{
    self, DeletionGuard, Issue, Links, Operation, OperationKind, Plan, PlanInput, PlanScope,
    Projected, Projection, ProjectionContext,
};
use crate::model::{Anchor, Change, Dn, Entry, TargetId, TargetObject};
use crate::rules::ruleset::{Explanation, RuleSet};
use crate::state::{JournalEntry, JournalId, RunId, StateError, StateStore, TargetLookup, Views};

/// How a run retries retryable errors (throttling, unavailability, timeouts).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryPolicy {
    /// Attempts per operation in one run, the first included.
    pub max_attempts: u32,
    /// The first backoff; doubled after each retry.
    pub base_delay: Duration,
    /// The longest backoff (and the longest `Retry-After` honoured).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(60),
        }
    }
}

/// Stops a run early when most operations fail.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CircuitBreaker {
    /// Operations a run must have finished before the breaker may trip.
    pub min_operations: u64,
    /// The failure share that trips it (0.5 = half).
    pub failure_ratio: f64,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            min_operations: 20,
            failure_ratio: 0.5,
        }
    }
}

/// The engine's settings.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineConfig {
    /// The deletion guard.
    pub guard: DeletionGuard,
    /// A full import delivering fewer than this share of the mirrored objects is refused before
    /// it can plan deletions (an import of nothing always is).
    pub min_import_share: f64,
    /// Operations exported at once.
    pub concurrency: usize,
    /// Entries or changes per state-store transaction during import.
    pub import_batch: usize,
    /// Retries within a run.
    pub retry: RetryPolicy,
    /// The circuit breaker.
    pub circuit_breaker: CircuitBreaker,
    /// The first escrow delay of an object whose export failed; doubled per further failure.
    pub escrow_base: Duration,
    /// The longest escrow delay.
    pub escrow_max: Duration,
    /// The seed of the rules' random choices (initial passwords, `Guid()`).
    pub seed: u64,
    /// Whether (and how) the join keys of objects about to be created are looked up in the
    /// target first, when the target mirror cannot answer for their type: see [`JoinLookup`].
    pub join_lookup: JoinLookup,
    /// How old a whole read of a target object type (a reconcile, or
    /// [`JoinLookup::ReadTarget`]) may be before the target mirror no longer answers for that
    /// type and creates are looked up again. `None` (the default): a read never goes stale.
    /// `Some(Duration::ZERO)`: every create is looked up first, as Entra provisioning does.
    pub target_read_max_age: Option<Duration>,
    /// The clock (`now` for the rules, escrow times, run history). Tests fix it.
    #[serde(skip)]
    pub clock: Clock,
}

/// A source of the current time.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(Arc::new(Utc::now))
    }

    /// A clock that always says `t`.
    pub fn fixed(t: DateTime<Utc>) -> Clock {
        Clock(Arc::new(move || t))
    }

    /// A clock computed by `f`.
    pub fn from_fn(f: impl Fn() -> DateTime<Utc> + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(f))
    }

    /// The time now.
    pub fn now(&self) -> DateTime<Utc> {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            guard: DeletionGuard::default(),
            min_import_share: 0.5,
            concurrency: 8,
            import_batch: 1000,
            retry: RetryPolicy::default(),
            circuit_breaker: CircuitBreaker::default(),
            escrow_base: Duration::from_secs(60),
            escrow_max: Duration::from_secs(24 * 3600),
            seed: 0,
            join_lookup: JoinLookup::default(),
            target_read_max_age: None,
            clock: Clock::system(),
        }
    }
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineConfig")
            .field("guard", &self.guard)
            .field("min_import_share", &self.min_import_share)
            .field("concurrency", &self.concurrency)
            .field("retry", &self.retry)
            .field("circuit_breaker", &self.circuit_breaker)
            .field("join_lookup", &self.join_lookup)
            .field("target_read_max_age", &self.target_read_max_age)
            .finish_non_exhaustive()
    }
}

/// Why a run could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The state store failed.
    #[error("state store: {0}")]
    State(#[from] StateError),
    /// A connector failed outside an operation (an import, a read).
    #[error("connector: {0}")]
    Connector(#[from] ConnectorError),
    /// A guard holds the plan; nothing was written. Allow it explicitly to apply it.
    #[error("held by the deletion guard: {}", .0.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("; "))]
    GuardHeld(Vec<delta::GuardViolation>),
    /// A full import delivered too few objects; nothing was deleted.
    #[error("full import refused: it delivered {seen} objects for a mirror of {mirrored}; check the source's filter, base DN and credentials, or lower min_import_share for one run")]
    ImportTooSmall {
        /// Objects delivered.
        seen: u64,
        /// Objects mirrored.
        mirrored: u64,
    },
    /// A saved plan was computed from a state that has changed since.
    #[error("the plan is stale: it was computed from state {planned:#x}, the state is now {current:#x}; plan again")]
    StalePlan {
        /// The fingerprint the plan carries.
        planned: u64,
        /// The store's fingerprint now.
        current: u64,
    },
    /// The source delivered two objects with one anchor in one import; the import stopped
    /// before its watermark moved (see [`Synchronizer::full_import`]).
    #[error("{during}: the source delivered two objects with the anchor {anchor}: {first} and {second}; an anchor must identify one object, so the import stopped (its watermark did not move, nothing was deleted or exported): make the anchor attribute unique in the source, or anchor on another attribute, then run again")]
    DuplicateAnchor {
        /// `full import` or `delta import`.
        during: &'static str,
        /// The anchor.
        anchor: Anchor,
        /// The DN of the object delivered first.
        first: String,
        /// The DN of the other object.
        second: String,
    },
    /// On-demand: no such object in the source mirror.
    #[error("no object {0} in the source mirror; import first")]
    UnknownObject(String),
    /// The circuit breaker stopped the run.
    #[error("{0}")]
    CircuitOpen(String),
}

/// A plan saved for review and later application ("staging mode").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagedPlan {
    /// The fingerprint of the state the plan was computed from.
    pub fingerprint: u64,
    /// The `now` the rules saw.
    pub now: DateTime<Utc>,
    /// The seed the rules used.
    pub seed: u64,
    /// The plan.
    pub plan: Plan,
}

/// What an on-demand synchronization of one object did.
#[derive(Debug, Clone)]
pub struct OnDemand {
    /// Scope clauses, join lookups and flow values (when the projection is a [`RuleSet`]).
    pub explanation: Option<Explanation>,
    /// The operations planned for the object.
    pub plan: Plan,
    /// What the export did.
    pub report: RunReport,
}

/// Drives synchronization runs. See the module documentation.
pub struct Synchronizer {
    source: Box<dyn Source>,
    target: Box<dyn Target>,
    store: Mutex<Box<dyn StateStore>>,
    projection: Arc<dyn Projection>,
    rules: Option<Arc<RuleSet>>,
    config: EngineConfig,
    progress: Option<Arc<dyn Fn(Progress) + Send + Sync>>,
    allow_deletions_once: bool,
}

impl std::fmt::Debug for Synchronizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Synchronizer")
            .field("source", &self.source.name())
            .field("target", &self.target.name())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

type Result<T, E = EngineError> = std::result::Result<T, E>;

fn is_not_found(e: &ConnectorError) -> bool {
    e.kind() == ErrorKind::NotFound
}

impl Synchronizer {
    /// A synchronizer with rules loaded as a [`RuleSet`] (which also powers on-demand explain).
    pub fn new(
        source: Box<dyn Source>,
        target: Box<dyn Target>,
        store: Box<dyn StateStore>,
        rules: Arc<RuleSet>,
        config: EngineConfig,
    ) -> Synchronizer {
        let mut s = Synchronizer::with_projection(source, target, store, rules.clone(), config);
        s.rules = Some(rules);
        s
    }

    /// A synchronizer with any [`Projection`] (rules written in plain Rust).
    pub fn with_projection(
        source: Box<dyn Source>,
        target: Box<dyn Target>,
        store: Box<dyn StateStore>,
        projection: Arc<dyn Projection>,
        config: EngineConfig,
    ) -> Synchronizer {
        Synchronizer {
            source,
            target,
            store: Mutex::new(store),
            projection,
            rules: None,
            config,
            progress: None,
            allow_deletions_once: false,
        }
    }

    /// Calls `f` with progress events (stage, done, total) during runs.
    pub fn on_progress(&mut self, f: impl Fn(Progress) + Send + Sync + 'static) {
        self.progress = Some(Arc::new(f));
    }

    /// Lets the next export apply deletions over the guard's threshold (once).
    pub fn allow_deletions_once(&mut self) {
        self.allow_deletions_once = true;
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Runs `f` with the state store (for inspection: journal, runs, escrow).
    pub fn with_store<R>(&self, f: impl FnOnce(&mut dyn StateStore) -> R) -> R {
        let mut guard = match self.store.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(guard.as_mut())
    }

    fn store<R>(&self, f: impl FnOnce(&mut dyn StateStore) -> Result<R, StateError>) -> Result<R> {
        self.with_store(f).map_err(EngineError::State)
    }

    fn progress(&self, stage: Stage, done: u64, total: Option<u64>) {
        if let Some(p) = &self.progress {
            p(Progress { stage, done, total });
        }
    }

    fn begin(&self, profile: &'static str) -> Result<RunStart> {
        let started = self.config.clock.now();
        let run = self.store(|s| s.begin_run(profile, started))?;
        Ok(RunStart {
            profile,
            run,
            started,
            clock: Instant::now(),
        })
    }

    fn finish(&self, start: RunStart, result: Result<RunReport>) -> Result<RunReport> {
        let finished = self.config.clock.now();
        let (outcome, report_json) = match &result {
            Ok(r) => (
                if r.held {
                    "held"
                } else if r.stopped.is_some() {
                    "stopped"
                } else if r.failures.is_empty() {
                    "ok"
                } else {
                    "partial"
                },
                serde_json::to_string(r).unwrap_or_default(),
            ),
            Err(e) => (
                "error",
                serde_json::json!({ "error": e.to_string() }).to_string(),
            ),
        };
        self.store(|s| s.finish_run(start.run, finished, outcome, &report_json))?;
        let mut r = result?;
        r.profile = start.profile.to_string();
        r.started = Some(start.started);
        r.duration = start.clock.elapsed();
        info!(profile = start.profile, duration = ?r.duration, done = r.total_done(), failures = r.failures.len(), "run finished");
        Ok(r)
    }

    // ---------------------------------------------------------------------------------------
    // Import
    // ---------------------------------------------------------------------------------------

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

    async fn full_import_read(&mut self) -> Result<RunReport> {
        let t0 = Instant::now();
        let name = self.source.name().to_string();
        let generation = self.store(|s| s.begin_full_import(&name))?;
        let mut report = RunReport::default();
        let mut watermark = None;
        let mut batch = Vec::with_capacity(self.config.import_batch);
        let batch_size = self.config.import_batch.max(1);
        {
            let mut stream = self.source.full_import().await?;
            while let Some(item) = stream.next().await {
                match item? {
                    ImportItem::Item(e) => {
                        batch.push(e);
                        report.imported += 1;
                        if batch.len() >= batch_size {
                            let b = std::mem::take(&mut batch);
                            self.with_store(|s| s.import_entries(generation, &b))?;
                            self.progress(Stage::Import, report.imported, None);
                        }
                    }
                    ImportItem::Checkpoint(w) => watermark = Some(w),
                    ImportItem::Present(anchors) => {
                        let b = std::mem::take(&mut batch);
                        self.with_store(|s| s.import_entries(generation, &b))?;
                        self.reimport(generation, &anchors)?;
                    }
                }
            }
        }
        if !batch.is_empty() {
            self.with_store(|s| s.import_entries(generation, &batch))?;
        }
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

    async fn delta_import_read(&mut self) -> Result<RunReport> {
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
    fn reimport(&self, generation: u64, anchors: &[Anchor]) -> Result<()> {
        for chunk in anchors.chunks(self.config.import_batch.max(1)) {
            let mut entries = Vec::with_capacity(chunk.len());
            for a in chunk {
                if let Some(e) = self.store(|s| s.source_entry(a))? {
                    entries.push(e);
                }
            }
            self.store(|s| s.import_entries(generation, &entries))?;
        }
        Ok(())
    }

    /// Ends a present phase at its checkpoint: deletes what it did not report and commits the
    /// watermark, under the full import's guard.
    fn finish_present_phase(
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

    // ---------------------------------------------------------------------------------------
    // Plan
    // ---------------------------------------------------------------------------------------

    fn views_for(
        &self,
        scope: &PlanScope,
        now: DateTime<Utc>,
        bindings: &crate::delta::ContainerBindings,
    ) -> Result<Views> {
        match scope {
            PlanScope::All => self.store(|s| s.load_all()),
            PlanScope::Anchors(anchors) => {
                let mut views = self.store(|s| s.load_neighbourhood(anchors))?;
                // New objects may join target objects outside the neighbourhood: load the
                // candidates their join groups name.
                let ctx =
                    ProjectionContext::new(now, self.config.seed, &views.mirror, &views.target)
                        .with_containers(bindings);
                let mut lookups = Vec::new();
                for a in anchors {
                    if views.links.get(a).is_some() {
                        continue;
                    }
                    let Some(e) = views.mirror.get(a) else {
                        continue;
                    };
                    if let Projected::InScope(d) = self.projection.project(e, &ctx) {
                        for g in &d.join {
                            for (attr, value) in g.pairs() {
                                lookups.push(TargetLookup {
                                    object_type: d.target_type.clone(),
                                    attribute: attr.clone(),
                                    value: value.clone(),
                                });
                            }
                        }
                    }
                }
                if !lookups.is_empty() {
                    self.store(|s| s.load_join_candidates(&mut views, &lookups))?;
                }
                Ok(views)
            }
        }
    }

    fn plan_scope(&self, scope: PlanScope) -> Result<(StagedPlan, Views)> {
        let t0 = Instant::now();
        let now = self.config.clock.now();
        let fingerprint = self.store(|s| s.fingerprint())?;
        let bindings = self.bind_containers()?;
        let views = self.views_for(&scope, now, &bindings)?;
        let delta_scope = matches!(scope, PlanScope::Anchors(_));
        let mut input = PlanInput::new(
            self.projection.as_ref(),
            &views.mirror,
            &views.links,
            &views.target,
        );
        input.scope = scope;
        input.now = now;
        input.seed = self.config.seed;
        input.guard = self.config.guard;
        input.containers = Some(&bindings);
        input.create_references = self.target.capabilities().create_references;
        let mut plan = delta::plan(&input);
        if delta_scope {
            // The neighbourhood's links are partial: count the linked objects in the store.
            let counts = self.store(|s| s.link_counts())?;
            plan.guard_violations = self
                .config
                .guard
                .check_with(&plan, |ty| counts.get(ty).copied().unwrap_or(0));
        }
        debug!(operations = plan.operations.len(), issues = plan.issues.len(), out_of_scope_references = plan.stats.out_of_scope_references, elapsed = ?t0.elapsed(), "planned");
        self.progress(
            Stage::Plan,
            plan.stats.considered as u64,
            Some(plan.stats.considered as u64),
        );
        Ok((
            StagedPlan {
                fingerprint,
                now,
                seed: self.config.seed,
                plan,
            },
            views,
        ))
    }

    /// Plans without applying ("staging"): every object (`full`) or the dirty set. The result
    /// serializes to JSON for review and carries the fingerprint of the state it came from.
    ///
    /// It reads the state only: creates the target mirror cannot answer for (see
    /// [`JoinLookup`]) are not looked up in the target — [`Synchronizer::apply`] looks them up
    /// and refuses the plan as stale if the target holds objects they would join. To review the
    /// plan a run would make, use [`Synchronizer::plan_with_lookups`].
    pub fn plan(&self, full: bool) -> Result<StagedPlan> {
        Ok(self.plan_scope(self.staging_scope(full)?)?.0)
    }

    /// Plans without applying, as a run would: first looks up in the target the join keys of
    /// the creates the target mirror cannot answer for (see [`JoinLookup`]), records what it
    /// finds in the target mirror, and plans joins for them instead.
    pub async fn plan_with_lookups(&self, full: bool) -> Result<StagedPlan> {
        let scope = self.staging_scope(full)?;
        let mut report = RunReport::default();
        Ok(self.plan_checked(scope, &mut report).await?.0)
    }

    fn staging_scope(&self, full: bool) -> Result<PlanScope> {
        Ok(if full {
            PlanScope::All
        } else {
            PlanScope::Anchors(self.store(|s| s.dirty())?)
        })
    }

    /// Applies a saved plan: exactly its operations, or nothing if the state has moved since it
    /// was made.
    pub async fn apply(&mut self, staged: StagedPlan) -> Result<RunReport> {
        let current = self.store(|s| s.fingerprint())?;
        if current != staged.fingerprint {
            return Err(EngineError::StalePlan {
                planned: staged.fingerprint,
                current,
            });
        }
        let start = self.begin("apply")?;
        let run = start.run;
        let result = async {
            let mut looked_up = RunReport::default();
            self.check_staged_creates(&staged, &mut looked_up).await?;
            let anchors: Vec<Anchor> = staged
                .plan
                .operations
                .iter()
                .map(|o| o.anchor.clone())
                .collect();
            // The container bindings the plan was made with (recorded when it was made).
            let bindings = self.store(|s| s.container_bindings())?;
            let views = self.views_for(&PlanScope::Anchors(anchors), staged.now, &bindings)?;
            let plan =
                self.restore_secrets(staged.plan, &views, &bindings, staged.now, staged.seed);
            let mut report = self.export(run, plan, views).await?;
            report.absorb(looked_up);
            Ok(report)
        }
        .instrument(start.span())
        .await;
        self.finish(start, result)
    }

    /// A serialized plan carries no secret values: project the creates that had secrets again
    /// (same `now` and seed, so the same values) to fill them in.
    fn restore_secrets(
        &self,
        mut plan: Plan,
        views: &Views,
        bindings: &crate::delta::ContainerBindings,
        now: DateTime<Utc>,
        seed: u64,
    ) -> Plan {
        let ctx = ProjectionContext::new(now, seed, &views.mirror, &views.target)
            .with_containers(bindings);
        for op in &mut plan.operations {
            if let OperationKind::Create { secrets, .. } = &mut op.kind {
                if secrets.is_empty() || secrets.iter().all(|(_, v)| !v.is_empty()) {
                    continue;
                }
                let Some(e) = views.mirror.get(&op.anchor) else {
                    continue;
                };
                if let Projected::InScope(d) = self.projection.project(e, &ctx) {
                    for f in d.flows.iter().filter(|f| f.redacted) {
                        if secrets.contains(f.attribute.as_str()) {
                            secrets.set(f.attribute.clone(), f.values.clone());
                        }
                    }
                }
            }
        }
        plan
    }

    // ---------------------------------------------------------------------------------------
    // Sync profiles
    // ---------------------------------------------------------------------------------------

    /// Re-plans every object from the mirrors (after a rule change) and exports.
    pub async fn full_sync(&mut self) -> Result<RunReport> {
        let start = self.begin("full-sync")?;
        let result = self
            .sync_inner(start.run, true)
            .instrument(start.span())
            .await;
        self.finish(start, result)
    }

    /// Plans the dirty set (and the objects that reference it) and exports.
    pub async fn delta_sync(&mut self) -> Result<RunReport> {
        let start = self.begin("delta-sync")?;
        let result = self
            .sync_inner(start.run, false)
            .instrument(start.span())
            .await;
        self.finish(start, result)
    }

    /// The usual cycle: delta import (full import when needed), then delta sync.
    pub async fn run_cycle(&mut self) -> Result<RunReport> {
        let start = self.begin("cycle")?;
        let run = start.run;
        let result = async {
            let mut report = self.delta_import_inner().await?;
            report.absorb(self.sync_inner(run, false).await?);
            Ok(report)
        }
        .instrument(start.span())
        .await;
        self.finish(start, result)
    }

    async fn sync_inner(&mut self, run: RunId, full: bool) -> Result<RunReport> {
        let mut report = self.recover(run).await?;
        let scope = if full {
            PlanScope::All
        } else {
            PlanScope::Anchors(self.store(|s| s.dirty())?)
        };
        if let PlanScope::Anchors(a) = &scope {
            if a.is_empty() {
                return Ok(report);
            }
        }
        let t0 = Instant::now();
        let (staged, views) = self.plan_checked(scope, &mut report).await?;
        report.stages.push((Stage::Plan, t0.elapsed()));
        report.absorb(self.export(run, staged.plan, views).await?);
        Ok(report)
    }

    /// Reads the target (every object type the links and rules name), replaces the target
    /// mirror with what it holds, and re-plans everything: drift made by hand is corrected.
    pub async fn reconcile(&mut self) -> Result<RunReport> {
        let start = self.begin("reconcile")?;
        let run = start.run;
        let result = async {
            let s = &mut *self;
            let t0 = Instant::now();
            let mut report = RunReport::default();
            let mut types: BTreeSet<String> = s
                .store(|st| st.link_counts())?
                .keys()
                .map(|t| t.to_string())
                .collect();
            if let Some(rules) = &s.rules {
                types.extend(rules.config().rules.iter().map(|r| r.target_type.clone()));
            }
            let mut seen: HashSet<TargetId> = HashSet::new();
            for ty in types {
                let ty = crate::model::ObjectType::new(ty);
                seen.extend(s.read_target_type(&ty, &mut report).await?);
            }
            let gone: Vec<TargetId> = s
                .store(|st| st.target_ids())?
                .into_iter()
                .filter(|id| !seen.contains(id))
                .collect();
            s.store(|st| st.remove_target_objects(&gone))?;
            report.stages.push((Stage::Reconcile, t0.elapsed()));
            report.absorb(s.sync_inner(run, true).await?);
            Ok(report)
        }
        .instrument(start.span())
        .await;
        self.finish(start, result)
    }

    /// Synchronizes one object now (by anchor, or by DN through the mirror's DN index), through
    /// the same planner and exporter as a run — deletes and disables included — and explains
    /// the decision.
    pub async fn sync_object(&mut self, object: &str) -> Result<OnDemand> {
        let anchor = match Dn::parse(object) {
            Ok(dn) if !dn.is_root() && object.contains('=') => self
                .store(|s| s.anchor_by_dn(&dn))?
                .ok_or_else(|| EngineError::UnknownObject(object.to_string()))?,
            _ => Anchor::new(object),
        };
        let known = self.store(|s| s.source_entry(&anchor))?;
        let linked = self
            .store(|s| s.load_neighbourhood(std::slice::from_ref(&anchor)))?
            .links
            .get(&anchor)
            .is_some();
        if known.is_none() && !linked {
            return Err(EngineError::UnknownObject(object.to_string()));
        }
        let mut looked_up = RunReport::default();
        let (mut staged, views) = self
            .plan_checked(PlanScope::Anchors(vec![anchor.clone()]), &mut looked_up)
            .await?;
        let explanation = match (&self.rules, views.mirror.get(&anchor)) {
            (Some(rules), Some(e)) => {
                let bindings = self.store(|s| s.container_bindings())?;
                let ctx =
                    ProjectionContext::new(staged.now, staged.seed, &views.mirror, &views.target)
                        .with_containers(&bindings);
                Some(rules.explain(e, &ctx))
            }
            _ => None,
        };
        staged.plan.operations.retain(|o| o.anchor == anchor);
        staged.plan.issues.retain(|i| i.anchor() == Some(&anchor));
        let plan = staged.plan.clone();
        let start = self.begin("on-demand")?;
        let result = self
            .export(start.run, staged.plan, views)
            .instrument(start.span())
            .await
            .map(|mut r| {
                r.absorb(looked_up);
                r
            });
        let report = self.finish(start, result)?;
        Ok(OnDemand {
            explanation,
            plan,
            report,
        })
    }

    // ---------------------------------------------------------------------------------------
    // Export
    // ---------------------------------------------------------------------------------------

    /// Resolves operations a crash left unconfirmed (journaled as intended, never recorded as
    /// done or failed), before anything else is sent: a create is looked up in the target by
    /// its join keys — found, it is recorded as done (never sent twice); an update or delete is
    /// settled by re-reading the object.
    async fn recover(&mut self, _run: RunId) -> Result<RunReport> {
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

    async fn recover_one(&mut self, entry: &JournalEntry) -> Result<()> {
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

    async fn find_by_lookup(
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

    async fn export(&mut self, run: RunId, plan: Plan, views: Views) -> Result<RunReport> {
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

    fn escrow_delay(&self, anchor: &Anchor, escrowed: &HashMap<Anchor, DateTime<Utc>>) -> Duration {
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
    async fn export_one(
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
    async fn send(
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// One exported operation: retries it took, and whether part of it had to wait (references to
/// objects not created yet).
struct Exported {
    retries: u64,
    partial: bool,
}

struct RunStart {
    profile: &'static str,
    run: RunId,
    started: DateTime<Utc>,
    clock: Instant,
}

impl RunStart {
    fn span(&self) -> tracing::Span {
        info_span!("run", profile = self.profile, run = self.run.0)
    }
}

enum OpFailure {
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
