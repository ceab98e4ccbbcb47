//! The plan stage: the views a plan reads, planning a scope, staging (plan now, apply later).

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::state::Reach;

impl Synchronizer {
    /// The views a plan of `anchors` reads: their neighbourhood
    /// ([`StateStore::load_neighbourhood`]), and the target objects the join groups of the
    /// unlinked ones name.
    pub(super) fn neighbourhood(
        &self,
        anchors: &[Anchor],
        now: DateTime<Utc>,
        bindings: &crate::delta::ContainerBindings,
    ) -> Result<Views> {
        self.views_for(anchors, now, bindings, Reach::Referrers, false)
    }

    /// The views for planning `anchors` with the objects referencing them as far as `reach`
    /// says ([`StateStore::load_neighbourhood_reaching`]), join candidates included; `light`:
    /// the objects around them held as context only
    /// ([`StateStore::load_neighbourhood_light`]), for a plan that says when it needs one
    /// whole.
    fn views_for(
        &self,
        anchors: &[Anchor],
        now: DateTime<Utc>,
        bindings: &crate::delta::ContainerBindings,
        reach: Reach,
        light: bool,
    ) -> Result<Views> {
        if anchors.is_empty() {
            return Ok(Views::default());
        }
        let mut views = if light {
            self.store(|s| s.load_neighbourhood_light(anchors, reach))?
        } else {
            self.store(|s| s.load_neighbourhood_reaching(anchors, reach))?
        };
        if reach == Reach::AnchorsByLink {
            // Said below when the projection asks for a referenced object the views hold as
            // its link only (the join lookups below project too).
            views.mirror.watch_absent();
        }
        self.with_join_candidates(anchors, views, now, bindings)
    }

    /// `views` (read for planning `anchors`) with what joins look up: the target mirror
    /// indexed by the join attributes, and the target objects the join groups of the unlinked
    /// anchors name.
    fn with_join_candidates(
        &self,
        anchors: &[Anchor],
        mut views: Views,
        now: DateTime<Utc>,
        bindings: &crate::delta::ContainerBindings,
    ) -> Result<Views> {
        // Joins look their attributes up in the views' target mirror: index them, or each
        // lookup scans every target object of the neighbourhood (quadratic in a page). Only
        // objects without a link join: a page of linked ones needs no index.
        let unlinked = views
            .mirror
            .entries()
            .any(|e| views.links.get(&e.anchor).is_none() && !views.mirror.is_partial(&e.anchor));
        if unlinked {
            for attr in self.join_attributes.iter() {
                views.target.index_attribute(attr.clone());
            }
        }
        // New objects may join target objects outside the neighbourhood: load the
        // candidates their join groups name.
        let ctx = ProjectionContext::new(now, self.config.seed, &views.mirror, &views.target)
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

    /// The planner's input over `views`, with the run's settings.
    fn plan_input<'v>(
        &'v self,
        views: &'v Views,
        now: DateTime<Utc>,
        bindings: &'v crate::delta::ContainerBindings,
        counts: &'v BTreeMap<crate::model::ObjectType, usize>,
        create_references: &crate::delta::CreateReferences,
    ) -> PlanInput<'v> {
        let mut input = PlanInput::new(
            self.projection.as_ref(),
            &views.mirror,
            &views.links,
            &views.target,
        );
        input.now = now;
        input.seed = self.config.seed;
        input.guard = self.config.guard;
        input.containers = Some(bindings);
        input.create_references = create_references.clone();
        input.linked = Some(counts);
        input
    }

    /// Plans `scope`; returns the plan and the views it was made from (for the export).
    ///
    /// A full plan pages through the store ([`StateStore::full_plan_page`], `plan_page` anchors
    /// at a time): phase A decides each page from the page's neighbourhood and keeps only
    /// what is not "nothing to do"; phases B and C then run over those, from their
    /// neighbourhood. The plan is the one the planner makes from the whole store, byte for
    /// byte (`tests/plan_golden.rs`), and the memory it takes does not grow with the store,
    /// beyond the decisions. The deletion guard counts the links in the store, for full and
    /// delta plans alike, in the planner.
    pub(super) fn plan_scope(&self, scope: PlanScope) -> Result<(StagedPlan, Views)> {
        self.plan_scope_with(scope, &Together::whole())
    }

    /// [`Synchronizer::plan_scope`] for a page of a paged run: planning the anchors
    /// `together` groups with each other (whenever one of a group is planned, all of it is),
    /// and not the unlinked objects referencing the page's creates (they have their own page:
    /// [`PlanInput::unlinked_referrers`]), nor the dirty ones a later page plans
    /// ([`PlanInput::planned_elsewhere`]).
    pub(super) fn plan_scope_with(
        &self,
        scope: PlanScope,
        together: &Together,
    ) -> Result<(StagedPlan, Views)> {
        let t0 = Instant::now();
        let now = self.config.clock.now();
        let fingerprint = self.store(|s| s.fingerprint())?;
        let bindings = self.bind_containers()?;
        let counts = self.store(|s| s.link_counts())?;
        let create_references = self.target.capabilities().create_references;
        let (plan, views) = match scope {
            PlanScope::All => {
                let page = self.config.plan_page.max(1);
                let mut decisions = delta::Decisions::default();
                // Rules that do not read `member_of` need nothing of what references a page.
                let alone = if self.projection.reads_member_of() {
                    Reach::Anchors
                } else if self.projection.reads_mirror_by_dn() {
                    // Nor a referenced object beyond its DN: a linked one comes as its link.
                    Reach::AnchorsByLink
                } else {
                    Reach::AnchorsAlone
                };
                // A page is decided and freed on another thread while the next one is read:
                // reading holds the store, deciding does not. One thread for every page (a thread
                // per page would leave memory with an allocator arena each).
                type Decided = (Vec<Anchor>, delta::Decisions, bool);
                let mut collect = |(anchors, mut page, asked_absent): Decided| -> Result<()> {
                    if page.incomplete() || asked_absent {
                        // A store whose light views hold a page's own object as context, or a
                        // projection that asked for an object held as its link.
                        let views =
                            self.views_for(&anchors, now, &bindings, Reach::Anchors, false)?;
                        page = delta::decide_page(
                            &self.plan_input(&views, now, &bindings, &counts, &create_references),
                            &anchors,
                        );
                    }
                    decisions.absorb(page);
                    self.progress(Stage::Plan, decisions.considered() as u64, None);
                    Ok(())
                };
                std::thread::scope(|scope| -> Result<()> {
                    let (to_decide, inbox) =
                        std::sync::mpsc::sync_channel::<(Vec<Anchor>, Views)>(0);
                    let (to_collect, decided) = std::sync::mpsc::channel::<Decided>();
                    let (b, c, r) = (&bindings, &counts, &create_references);
                    let decider = scope.spawn(move || {
                        for (anchors, views) in inbox {
                            let page = delta::decide_page(
                                &self.plan_input(&views, now, b, c, r),
                                &anchors,
                            );
                            let asked_absent = views.mirror.asked_absent();
                            // Freeing the views takes a tenth of a page's time: here too.
                            drop(views);
                            if to_collect.send((anchors, page, asked_absent)).is_err() {
                                break;
                            }
                        }
                    });
                    // `false` when the decider stopped (it panicked: its panic is resumed
                    // once it is joined, below).
                    let mut read = || -> Result<bool> {
                        let mut mark: Option<crate::state::PageMark> = None;
                        let mut held = false;
                        loop {
                            // Only the page's own objects are decided: what is around them is
                            // context, held light.
                            let Some((anchors, mut views, next)) =
                                self.store(|s| s.full_plan_page(mark.as_ref(), page, alone))?
                            else {
                                break;
                            };
                            if alone == Reach::AnchorsByLink {
                                // Said when the projection (the join lookups' too) asks for a
                                // referenced object the views hold as its link only.
                                views.mirror.watch_absent();
                            }
                            let views =
                                self.with_join_candidates(&anchors, views, now, &bindings)?;
                            if held {
                                let Ok(d) = decided.recv() else {
                                    return Ok(false);
                                };
                                collect(d)?;
                            }
                            if to_decide.send((anchors, views)).is_err() {
                                return Ok(false);
                            }
                            held = true;
                            mark = Some(next);
                        }
                        if held {
                            let Ok(d) = decided.recv() else {
                                return Ok(false);
                            };
                            collect(d)?;
                        }
                        Ok(true)
                    };
                    let result = read();
                    drop(to_decide);
                    if let Err(panic) = decider.join() {
                        std::panic::resume_unwind(panic);
                    }
                    match result? {
                        true => Ok(()),
                        // A decider that stopped without panicking: it only stops when the
                        // answers are no longer wanted, which they still were.
                        false => std::panic::resume_unwind(Box::new(
                            "a full plan's deciding thread stopped",
                        )),
                    }
                })?;
                // Phases B and C decide the referrers of what phase A decided, as the
                // neighbourhood plans them: what is around those comes as context, and what
                // the planner has to decide of it is read whole and planned again (a group
                // that references a created user is planned; its other members are heads).
                // A retry needs the decisions again: kept (a copy) only when they are few;
                // many (a first full sync) are planned from whole entries, in one pass.
                let mut anchors = decisions.anchors();
                let mut light = anchors.len() <= LIGHT_DECISIONS;
                loop {
                    let views =
                        self.views_for(&anchors, now, &bindings, Reach::Referrers, light)?;
                    let input =
                        self.plan_input(&views, now, &bindings, &counts, &create_references);
                    if !light {
                        break (delta::plan_decided(&input, decisions), views);
                    }
                    match delta::plan_decided_or_incomplete(&input, decisions.clone()) {
                        Ok(plan) => break (plan, views),
                        Err(more) => {
                            let before = anchors.len();
                            anchors = merged(anchors, more.anchors);
                            light &= anchors.len() > before;
                        }
                    }
                }
            }
            PlanScope::Anchors(mut anchors) => {
                // Light views, unless a store holds a planned object as context only.
                let mut light = true;
                // A page's referrers are context for `member_of` and for the referrers the
                // plan takes in (those of the objects whose link it makes or ends, but for the
                // ones planned elsewhere): under rules that do not read `member_of`, a page is
                // planned without them first, and again with them only when it would take
                // one in (a page of users does not read every group holding one of them).
                let mut alone = together.paged && !self.projection.reads_member_of();
                // What the page references is read as its links only where the rules read
                // referenced objects by DN alone, until they ask for one (a page of groups
                // does not build an object for each member).
                let mut by_link = alone && self.projection.reads_mirror_by_dn();
                loop {
                    together.expand(&mut anchors);
                    // A page plans the referrers without a link in their own page, and those
                    // the run plans in a later page there too. Held light, the others come as
                    // context, and the planner says which of them it has to decide
                    // (`Incomplete`): only those are read whole.
                    let reach = match (together.paged, light) {
                        (false, _) => Reach::Referrers,
                        (true, true) if by_link => Reach::AnchorsByLink,
                        (true, true) if alone => Reach::AnchorsAlone,
                        (true, true) => Reach::Anchors,
                        (true, false) => Reach::LinkedReferrers,
                    };
                    let views = self.views_for(&anchors, now, &bindings, reach, light)?;
                    let mut input =
                        self.plan_input(&views, now, &bindings, &counts, &create_references);
                    input.scope = PlanScope::Anchors(anchors.clone());
                    input.unlinked_referrers = !together.paged;
                    // Never the plan's own anchors (a group's members come from later pages).
                    let elsewhere = |a: &Anchor| {
                        anchors.binary_search(a).is_err() && together.planned_elsewhere(a)
                    };
                    if together.elsewhere.is_some() {
                        input.planned_elsewhere = Some(&elsewhere);
                    }
                    let (r, relinked) = delta::plan_relinking(&input);
                    if reach == Reach::AnchorsByLink && views.mirror.asked_absent() {
                        by_link = false;
                        continue;
                    }
                    let without_referrers =
                        matches!(reach, Reach::AnchorsAlone | Reach::AnchorsByLink);
                    if without_referrers && !relinked.is_empty() {
                        let referrers = self.store(|s| s.referrers_linked(&relinked))?;
                        let takes = referrers.iter().any(|(r, linked)| {
                            *linked && anchors.binary_search(r).is_err() && !elsewhere(r)
                        });
                        if takes {
                            alone = false;
                            by_link = false;
                            continue;
                        }
                    }
                    let plan = match r {
                        Ok(plan) => plan,
                        Err(more) => {
                            // It had to decide objects the views held as context: plan them. Were
                            // they planned already, the store's light views are not to be trusted.
                            let before = anchors.len();
                            anchors = merged(anchors, more.anchors);
                            light &= anchors.len() > before;
                            continue;
                        }
                    };
                    // The planner also plans the objects that reference the ones it links (and
                    // theirs). A linked one it creates beyond the scope was planned without its
                    // target object, which the views hold for the scope's objects only: it would
                    // be created again. Plan again with it in the scope, until none is.
                    let beyond: BTreeSet<&Anchor> = plan
                        .operations
                        .iter()
                        .filter(|o| {
                            matches!(o.kind, OperationKind::Create { .. })
                                && views.links.get(&o.anchor).is_some()
                                && anchors.binary_search(&o.anchor).is_err()
                        })
                        .map(|o| &o.anchor)
                        .collect();
                    if beyond.is_empty() {
                        break (plan, views);
                    }
                    anchors.extend(beyond.into_iter().cloned());
                }
            }
        };
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

    /// The deprovisions of `anchors` (linked dirty objects of a paged run, planned in the
    /// pages of `order`) as a plan of them in a survey batch decides them
    /// ([`Synchronizer::survey_pages`]), read from the anchors alone ([`Reach::AnchorsBare`])
    /// — a changed group's thousand members are not read for it. `None` when that does not
    /// tell: the projection asked for what the views do not hold, an object changes target
    /// type, or the plan would take in a referrer of an object whose link it makes or ends
    /// (one linked and not planned in a page of its own); the caller then plans the batch.
    /// Only for rules that read the mirror by DN only, not `member_of`.
    pub(super) fn survey_bare(
        &self,
        anchors: &[Anchor],
        order: &super::order::PageOrder,
    ) -> Result<Option<Vec<Operation>>> {
        let now = self.config.clock.now();
        let bindings = self.bind_containers()?;
        let counts = self.store(|s| s.link_counts())?;
        let create_references = self.target.capabilities().create_references;
        let mut views = self.store(|s| s.load_neighbourhood_light(anchors, Reach::AnchorsBare))?;
        views.mirror.watch_absent();
        let mut input = self.plan_input(&views, now, &bindings, &counts, &create_references);
        input.scope = PlanScope::Anchors(anchors.to_vec());
        input.unlinked_referrers = false;
        let surveyed = delta::survey(&input, anchors);
        if !surveyed.exact {
            return Ok(None);
        }
        if !surveyed.relinked.is_empty() {
            // The plan would take in the linked referrers of these, but for the dirty ones
            // (each planned in a batch of its own).
            let referrers = self.store(|s| s.referrers_linked(&surveyed.relinked))?;
            let batch: HashSet<&Anchor> = anchors.iter().collect();
            if referrers
                .iter()
                .any(|(r, linked)| *linked && !batch.contains(r) && order.position(r).is_none())
            {
                return Ok(None);
            }
        }
        Ok(Some(surveyed.operations))
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

    pub(super) fn staging_scope(&self, full: bool) -> Result<PlanScope> {
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
            let views = self.neighbourhood(&anchors, staged.now, &bindings)?;
            let plan =
                self.restore_secrets(staged.plan, &views, &bindings, staged.now, staged.seed);
            // The plan was made from this dirty set (the fingerprint says nothing moved since).
            let covered = self.store(|s| s.dirty())?;
            let mut report = self.export(run, plan, views, &covered).await?;
            report.absorb(looked_up);
            Ok(report)
        }
        .instrument(start.span())
        .await;
        self.finish(start, result)
    }

    /// A serialized plan carries no secret values: project the creates that had secrets again
    /// (same `now` and seed, so the same values) to fill them in.
    pub(super) fn restore_secrets(
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
}

/// The most decisions a full plan's phases B and C read light for (see
/// [`Synchronizer::plan_scope_with`]).
const LIGHT_DECISIONS: usize = 50_000;

/// `anchors` and `more`, sorted, each once.
fn merged(mut anchors: Vec<Anchor>, more: Vec<Anchor>) -> Vec<Anchor> {
    anchors.extend(more);
    anchors.sort();
    anchors.dedup();
    anchors
}

/// Groups of anchors planned together: whenever a plan holds one of a group, it holds all of
/// it (objects that would join one target object, so none joins it, as in one plan).
#[derive(Debug, Default)]
pub(super) struct Together {
    groups: Vec<Vec<Anchor>>,
    by_anchor: HashMap<Anchor, usize>,
    /// Whether the plan is a page of a paged run.
    paged: bool,
    /// A paged run's planning order, and how many of it the pages planned so far hold: the
    /// objects after those are planned in later pages ([`PlanInput::planned_elsewhere`]).
    elsewhere: Option<(Arc<super::order::PageOrder>, AtomicUsize)>,
}

impl Together {
    /// For a plan that is not a page: no groups.
    pub(super) fn whole() -> Together {
        Together::default()
    }

    /// For the pages of a paged run, with these groups.
    pub(super) fn pages(groups: Vec<Vec<Anchor>>) -> Together {
        let mut by_anchor = HashMap::new();
        for (i, g) in groups.iter().enumerate() {
            for a in g {
                by_anchor.insert(a.clone(), i);
            }
        }
        Together {
            groups,
            by_anchor,
            paged: true,
            elsewhere: None,
        }
    }

    /// These groups, in a run that plans the dirty objects of `order` in pages of their own
    /// (see [`Together::planned_up_to`]).
    pub(super) fn planning(mut self, order: Arc<super::order::PageOrder>) -> Together {
        self.elsewhere = Some((order, AtomicUsize::new(0)));
        self
    }

    /// The pages planned so far hold the first `n` objects of the planning order: those
    /// after them are planned elsewhere.
    pub(super) fn planned_up_to(&self, n: usize) {
        if let Some((_, from)) = &self.elsewhere {
            from.store(n, Ordering::Relaxed);
        }
    }

    /// Whether a later page of the run plans `anchor` (in its own page: the members of a
    /// group are planned with the first of them, so none of them is planned elsewhere).
    fn planned_elsewhere(&self, anchor: &Anchor) -> bool {
        self.group(anchor).is_none()
            && self.elsewhere.as_ref().is_some_and(|(order, from)| {
                order
                    .position(anchor)
                    .is_some_and(|p| p >= from.load(Ordering::Relaxed))
            })
    }

    /// The group of `anchor`, if it has one.
    pub(super) fn group(&self, anchor: &Anchor) -> Option<usize> {
        self.by_anchor.get(anchor).copied()
    }

    /// `anchors` with the whole group of each, sorted, each once.
    pub(super) fn expand(&self, anchors: &mut Vec<Anchor>) {
        let groups: BTreeSet<usize> = anchors.iter().filter_map(|a| self.group(a)).collect();
        for g in groups {
            anchors.extend(self.groups[g].iter().cloned());
        }
        anchors.sort();
        anchors.dedup();
    }
}
