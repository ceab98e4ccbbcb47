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
mod export;
mod gone;
mod import;
mod ledger;
mod lookup;
mod order;
mod plan;
mod recovery;
mod report;
mod writer;

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
    self, DeletionGuard, Issue, Operation, OperationKind, Plan, PlanInput, PlanScope, Projected,
    Projection, ProjectionContext,
};
use crate::model::{Anchor, Change, Dn, Entry, TargetId, TargetObject};
use crate::rules::ruleset::{Explanation, RuleSet};
use crate::state::{JournalEntry, RunId, StateError, StateStore, TargetLookup, Views};

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
    /// Operations a run must have finished before the breaker may trip. Until then no more
    /// operations are in flight than it takes to reach it (the first batch carries at most
    /// this many), so a target that refuses everything is sent this many, not a batch.
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
    /// Batches exported at once: target calls in flight, each carrying up to the target's
    /// [`max_batch`](crate::connector::TargetCapabilities::max_batch) operations (a target
    /// without batching gets this many operations at once). Crash recovery re-reads this many
    /// objects at once.
    pub concurrency: usize,
    /// Entries or changes per state-store transaction during import. A full import writes on
    /// a thread of its own, and when it falls behind the source it writes the batches waiting
    /// (up to 24 more) in one transaction.
    pub import_batch: usize,
    /// The size of a page when a plan pages through the store: a full plan holds this many
    /// objects at a time; a run's dirty set is paged when it weighs more, and its pages weigh
    /// about this much, each object counting 1 and 1 per reference it makes. What bounds the
    /// memory a run holds, beyond a compact record of each planned object.
    pub plan_page: usize,
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
            plan_page: 20_000,
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
            .field("plan_page", &self.plan_page)
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
    store: writer::SharedStore,
    projection: Arc<dyn Projection>,
    rules: Option<Arc<RuleSet>>,
    config: EngineConfig,
    progress: Option<Arc<dyn Fn(Progress) + Send + Sync>>,
    allow_deletions_once: bool,
    /// The threads freeing what the last export was done with (see `export.rs`), joined
    /// before the next export starts, so no more than one export's leftovers are held.
    freeing: Vec<std::thread::JoinHandle<()>>,
    /// The target attributes the projection's joins look up (every type's), indexed in the
    /// target mirror of each plan's views.
    join_attributes: Vec<crate::model::AttrName>,
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
        let join_attributes: BTreeSet<crate::model::AttrName> = projection
            .join_attributes()
            .into_iter()
            .flat_map(|m| m.into_values().flatten())
            .collect();
        Synchronizer {
            source,
            target,
            store: Arc::new(Mutex::new(store)),
            join_attributes: join_attributes.into_iter().collect(),
            projection,
            rules: None,
            config,
            progress: None,
            allow_deletions_once: false,
            freeing: Vec::new(),
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
        if let Some(attrs) = self.projection.join_attributes() {
            self.store(|s| s.set_lookup_attributes(&attrs))?;
        }
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

    /// Plans and exports: every object (`full`: the plan pages through the store, see
    /// [`Synchronizer::plan`]), or the dirty set — in one plan when it fits in a page
    /// ([`EngineConfig::plan_page`]), else page by page ([`Synchronizer::sync_pages`]).
    async fn sync_inner(&mut self, run: RunId, full: bool) -> Result<RunReport> {
        let mut report = self.recover(run).await?;
        let scope = if full {
            PlanScope::All
        } else {
            let page = self.config.plan_page.max(1);
            let first = self.store(|s| s.dirty_page(None, page.saturating_add(1)))?;
            if first.is_empty() {
                return Ok(report);
            }
            // Paged when the dirty set is more than a page, counted as pages are: an object
            // and the references it makes (a thousand changed groups of a thousand members
            // would otherwise be one plan holding a million members as context).
            let weighed = first.len() > page || {
                let refs = self.store(|s| s.dirty_references_page(None, first.len()))?;
                let weight: usize = refs.iter().map(|(_, r)| 1 + r.len()).sum();
                weight > page
            };
            if weighed {
                report.absorb(self.sync_pages(run).await?);
                return Ok(report);
            }
            PlanScope::Anchors(first.into_iter().map(|(a, _)| a).collect())
        };
        // The dirty anchors this run answers for (see `export`).
        let covered = match &scope {
            PlanScope::Anchors(a) => a.clone(),
            PlanScope::All => self.store(|s| s.dirty())?,
        };
        let t0 = Instant::now();
        let (staged, views) = self.plan_checked(scope, &mut report).await?;
        report.stages.push((Stage::Plan, t0.elapsed()));
        report.absorb(self.export(run, staged.plan, views, &covered).await?);
        Ok(report)
    }

    /// A dirty set weighing more than a page (the initial load; a thousand changed groups),
    /// planned and exported page by page,
    /// so neither the whole mirror nor the whole plan is held at once; a staged plan
    /// ([`Synchronizer::plan`]) stays one plan. The pages go by reference level
    /// ([`Synchronizer::page_order`]): an object's page comes after the pages of the dirty
    /// objects it references, so its create carries those references (a manager is created
    /// before its reports, members before their groups) instead of being completed by a
    /// reference update later. A page closes when its objects and the references they make
    /// reach `plan_page` ([`PageOrder::pages`](order::PageOrder::pages)), so what a page's plan
    /// reads stays about a page, however large the groups.
    ///
    /// What one plan decides across all its objects is decided first, from a survey of the
    /// whole dirty set ([`Synchronizer::survey_pages`]): the deletion guard sees every
    /// deprovision of the run before anything is exported (a run it holds exports nothing),
    /// and objects that would join one target object are planned in one page (so none joins
    /// it, as in one plan). Each page's plan is a delta plan of the page, which includes the
    /// linked objects that reference the page's creates — except the dirty ones a later page
    /// plans anyway ([`PlanInput::planned_elsewhere`]), so a page of users does not plan every
    /// group holding one of them: references to objects of later pages
    /// (a cycle of references, or a dirty object changed since) are completed when those are
    /// created. Deprovisions wait until every page is exported
    /// (as in one plan, references to an object go before it). Each page's export settles only
    /// the page's anchors (those with a deprovision waiting, once it is exported), so a run
    /// that stops (or is killed) leaves the rest dirty; the anchors settled are cleared from
    /// the dirty set many pages at a time (see [`Writer::settle`](writer::Writer::settle)), so
    /// a killed run may also leave some exported ones dirty — planned again with nothing to do.
    async fn sync_pages(&mut self, run: RunId) -> Result<RunReport> {
        /// Anchors no longer dirty held back at most, across pages, before they are cleared:
        /// the dirty set is keyed by anchor, so clearing a page's anchors writes most of its
        /// pages (a million anchors: ~10,000 pages, each page of a run rewriting most of them).
        const CLEAN_HELD: usize = 200_000;
        let mut report = RunReport::default();
        let page = self.config.plan_page.max(1);
        let t0 = Instant::now();
        let order = Arc::new(self.page_order(page)?);
        let survey = self.survey_pages(page, &order, &mut report).await?;
        report.stages.push((Stage::Plan, t0.elapsed()));
        let allowed = if survey.violations.is_empty() {
            false
        } else if std::mem::take(&mut self.allow_deletions_once) {
            true
        } else {
            warn!(
                violations = survey.violations.len(),
                "export held by the deletion guard"
            );
            report.held = true;
            report.guard_violations = survey.violations;
            return Ok(report);
        };
        // The survey looked up the creates (when they are looked up at all): what it found
        // is in the target mirror, so the pages are planned without looking up again.
        let together = plan::Together::pages(survey.contested).planning(order.clone());
        let mut planned_groups: HashSet<usize> = HashSet::new();
        let mut deprovisions: Vec<Operation> = Vec::new();
        let mut planned = 0;
        // The anchors the pages exported, cleared from the dirty set many pages at a time.
        let mut clean: Vec<Anchor> = Vec::new();
        for dirty in order.pages(page) {
            // This page's objects and those before it are planned here or were; the rest are
            // planned in the pages after it.
            planned += dirty.len();
            together.planned_up_to(planned);
            let mut anchors: Vec<Anchor> = Vec::with_capacity(dirty.len());
            for a in dirty {
                match together.group(&a) {
                    // Planned with its group already.
                    Some(g) if !planned_groups.insert(g) => {}
                    _ => anchors.push(a),
                }
            }
            together.expand(&mut anchors);
            let t0 = Instant::now();
            let (staged, views) =
                self.plan_scope_with(PlanScope::Anchors(anchors.clone()), &together)?;
            report.stages.push((Stage::Plan, t0.elapsed()));
            // Deprovisions wait for every page: the references to their objects go first
            // (a target may remove them with the object), as in one plan. Their objects stay
            // dirty until they are exported.
            let mut plan = staged.plan;
            let (last_phase, rest): (Vec<Operation>, Vec<Operation>) =
                std::mem::take(&mut plan.operations)
                    .into_iter()
                    .partition(|o| o.phase() == delta::Phase::Deprovision);
            plan.operations = rest;
            let waiting: HashSet<&Anchor> = last_phase.iter().map(|o| &o.anchor).collect();
            let clear: Vec<Anchor> = anchors
                .iter()
                .filter(|a| !waiting.contains(a))
                .cloned()
                .collect();
            deprovisions.extend(last_phase);
            // A page's plan the guard holds (its deprovisions counted) stops the run, unless
            // the run was allowed.
            self.allow_deletions_once |= allowed;
            let exported = self
                .export_settling(run, plan, views, &clear, (&mut clean, CLEAN_HELD))
                .await?;
            let stop = exported.held || exported.stopped.is_some();
            report.absorb(exported);
            if stop {
                self.allow_deletions_once = false;
                self.clear_settled(clean)?;
                return Ok(report);
            }
        }
        if !deprovisions.is_empty() {
            let mut anchors: Vec<Anchor> = deprovisions.iter().map(|o| o.anchor.clone()).collect();
            anchors.sort();
            anchors.dedup();
            let bindings = self.bind_containers()?;
            let views = self.neighbourhood(&anchors, self.config.clock.now(), &bindings)?;
            let plan = Plan {
                operations: deprovisions,
                ..Plan::default()
            };
            // Deletions the guard let through (or that were allowed) for the whole run.
            self.allow_deletions_once = allowed;
            report.absorb(
                self.export_settling(run, plan, views, &anchors, (&mut clean, 0))
                    .await?,
            );
        }
        self.allow_deletions_once = false;
        self.clear_settled(clean)?;
        Ok(report)
    }

    /// Clears `clean`, the anchors a paged run's exports left to clear, from the dirty set.
    fn clear_settled(&self, mut clean: Vec<Anchor>) -> Result<()> {
        if clean.is_empty() {
            return Ok(());
        }
        clean.sort_unstable();
        self.store(|s| s.clear_dirty(&clean))
    }

    /// The dirty set in the order a paged run plans it, referenced objects first (see
    /// [`order::PageOrder`]): read `page` anchors at a time with what each references; what
    /// it holds is a compact index of the anchors, not the objects. The dirty set as it is
    /// now: objects made dirty during the run are left to the next, as in one plan.
    fn page_order(&self, page: usize) -> Result<order::PageOrder> {
        let mut order = order::PageOrder::default();
        let mut after: Option<Anchor> = None;
        loop {
            let dirty = self.store(|s| s.dirty_references_page(after.as_ref(), page))?;
            let Some((last, _)) = dirty.last() else {
                break;
            };
            after = Some(last.clone());
            for (a, refs) in &dirty {
                order.push(a, refs);
            }
        }
        debug!(
            objects = order.len(),
            "paged run ordered by reference level"
        );
        Ok(order.finish())
    }

    /// What a paged run must know of its whole dirty set before it exports a page: the dirty
    /// objects that may be deprovisioned (the linked ones) or may join (the unlinked ones,
    /// when the target mirror holds objects no link points at, or creates are looked up in
    /// the target — which the survey then does) planned `page` at a time, keeping only their
    /// deprovisions — checked by the deletion guard together — and the target objects more
    /// than one of them would join.
    async fn survey_pages(
        &self,
        page: usize,
        order: &Arc<order::PageOrder>,
        report: &mut RunReport,
    ) -> Result<Survey> {
        let lookups = self.config.join_lookup != JoinLookup::Off && self.target.capabilities().read;
        let joins = lookups || self.store(|s| s.has_unlinked_target_objects())?;
        if !self.config.guard.enabled && !joins {
            return Ok(Survey::default());
        }
        // Deprovisions decided from the dirty objects alone where the rules allow (see
        // `survey_bare`); joins need the whole plan.
        let bare =
            !joins && self.projection.reads_mirror_by_dn() && !self.projection.reads_member_of();
        let mut deprovisions = Plan::default();
        let mut claims: BTreeMap<TargetId, BTreeSet<Anchor>> = BTreeMap::new();
        let mut batch: Vec<Anchor> = Vec::new();
        // What the batch reads, weighed as pages are (see `PageOrder::pages`).
        let mut weight: u64 = 0;
        let full = u64::try_from(page).unwrap_or(u64::MAX);
        let mut after: Option<Anchor> = None;
        let mut dirty = std::collections::VecDeque::new();
        let mut done = false;
        loop {
            if dirty.is_empty() && !done {
                let read = self.store(|s| s.dirty_page(after.as_ref(), page))?;
                done = read.len() < page;
                after = read.last().map(|(a, _)| a.clone());
                dirty.extend(read);
            }
            while weight < full {
                let Some((a, linked)) = dirty.pop_front() else {
                    break;
                };
                if linked || joins {
                    weight += order.weight(&a);
                    batch.push(a);
                }
            }
            let done = done && dirty.is_empty();
            if weight >= full || (done && !batch.is_empty()) {
                weight = 0;
                let anchors = std::mem::take(&mut batch);
                if bare {
                    if let Some(ops) = self.survey_bare(&anchors, order)? {
                        deprovisions
                            .operations
                            .extend(ops.into_iter().filter(|o| o.kind.is_deletion()));
                        if done {
                            break;
                        }
                        continue;
                    }
                }
                let scope = PlanScope::Anchors(anchors);
                let plan = self
                    .plan_checked_with(
                        scope,
                        // Each dirty object is surveyed in a batch of its own: a batch
                        // takes none of them in as a referrer.
                        &plan::Together::pages(Vec::new()).planning(order.clone()),
                        report,
                    )
                    .await?
                    .0
                    .plan;
                for i in &plan.issues {
                    if let Issue::DuplicateJoin { target_id, anchors } = i {
                        claims
                            .entry(target_id.clone())
                            .or_default()
                            .extend(anchors.iter().cloned());
                    }
                }
                for o in plan.operations {
                    match &o.kind {
                        OperationKind::Join { target_id, .. } => {
                            claims
                                .entry(target_id.clone())
                                .or_default()
                                .insert(o.anchor);
                        }
                        k if k.is_deletion() => deprovisions.operations.push(o),
                        _ => {}
                    }
                }
            }
            if done {
                break;
            }
        }
        let counts = self.store(|s| s.link_counts())?;
        Ok(Survey {
            violations: self
                .config
                .guard
                .check_with(&deprovisions, |ty| counts.get(ty).copied().unwrap_or(0)),
            contested: claims
                .into_values()
                .filter(|a| a.len() > 1)
                .map(|a| a.into_iter().collect())
                .collect(),
        })
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
            .export(start.run, staged.plan, views, std::slice::from_ref(&anchor))
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
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// What a paged run learns of its whole dirty set first ([`Synchronizer::survey_pages`]).
#[derive(Default)]
struct Survey {
    /// The deletion guard's violations for every deprovision of the run.
    violations: Vec<delta::GuardViolation>,
    /// Groups of anchors that would join one target object.
    contested: Vec<Vec<Anchor>>,
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
