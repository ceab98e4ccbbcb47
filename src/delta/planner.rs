//! The planner: a pure function from (projection, mirrors, links) to a [`Plan`].
//!
//! It does no I/O, reads no clock and no randomness: `now` and a seed come in with the input,
//! and the same input gives the same plan, byte for byte, whatever order the objects are stored
//! in and however many threads plan them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::containers::ContainerBindings;
use super::guard::DeletionGuard;
use super::order::{order_creates, CreateOrder, CreateReferences};
use super::plan::{Issue, Operation, OperationKind, Plan, PlanStats, Reason, TargetRef};
use super::projection::{
    Apply, Deprovision, DeprovisionCause, Desired, Flow, Projected, Projection, ProjectionContext,
    WhenEmpty,
};
use super::state::{Link, Links, SourceMirror, TargetMirror};
use crate::model::{
    Anchor, AttrName, AttributeChange, Attributes, Entry, ObjectType, Reference, TargetId,
    TargetObject, Value, Values,
};

/// Which source objects a plan considers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanScope {
    /// Every object of the source mirror and every linked anchor (full sync).
    All,
    /// These anchors (a delta's dirty set), plus the objects in the mirror that reference the
    /// ones whose link this plan makes or ends — creates and joins (their references to them
    /// are pending), deletes and unlinks (their references to them are removed in this plan,
    /// before the delete). Referrers of source changes — a delete at the source, a reference
    /// that resolves — are the caller's to include: the state store marks them dirty when it
    /// applies the change.
    Anchors(Vec<Anchor>),
}

/// Everything the planner reads.
pub struct PlanInput<'a> {
    /// The rules.
    pub projection: &'a dyn Projection,
    /// The source mirror.
    pub mirror: &'a SourceMirror,
    /// The link table.
    pub links: &'a Links,
    /// The target mirror.
    pub target: &'a TargetMirror,
    /// Which objects to plan.
    pub scope: PlanScope,
    /// The instant the plan is made for (handed to the rules as `Now()`).
    pub now: DateTime<Utc>,
    /// The seed of the rules' random choices.
    pub seed: u64,
    /// The deletion guard.
    pub guard: DeletionGuard,
    /// The bindings of the containers the projection names ([`Projection::containers`]), as
    /// the engine remembers them; `None`: bound afresh against `mirror` (which must then hold
    /// the containers).
    pub containers: Option<&'a ContainerBindings>,
    /// Which reference attributes the target accepts in a create (the engine sets it from
    /// the target's capabilities; [`CreateReferences::All`] by default).
    pub create_references: CreateReferences,
    /// The number of linked objects per target type, when `links` holds only some of them (a
    /// delta plan's neighbourhood, a page): what the deletion guard's limits are computed from.
    /// `None`: `links` holds every link, and they are counted.
    pub linked: Option<&'a BTreeMap<ObjectType, usize>>,
    /// Whether a plan also plans the objects without a link that reference an object whose
    /// link it makes or ends (creating them, their reference pending). `true` by default. A
    /// run planned page by page sets it `false`: those objects are dirty and planned in their
    /// own page — when the object they reference is linked, or a later page plans them again
    /// (as linked referrers) to add the reference — so a page does not grow into the objects
    /// that reference it, and theirs.
    pub unlinked_referrers: bool,
    /// The objects planned elsewhere: a run planned page by page plans its dirty objects each
    /// in its own page, so a page does not take in, as an object referencing one whose link
    /// it makes or ends, an object a later page plans anyway (against the links as they are
    /// then). `None` (the default): every such referrer is planned with it.
    pub planned_elsewhere: Option<&'a (dyn Fn(&Anchor) -> bool + Sync)>,
}

impl<'a> PlanInput<'a> {
    /// A full-sync input with `now` at the Unix epoch, seed 0, the default guard, and a target
    /// that takes every reference in a create.
    pub fn new(
        projection: &'a dyn Projection,
        mirror: &'a SourceMirror,
        links: &'a Links,
        target: &'a TargetMirror,
    ) -> Self {
        PlanInput {
            projection,
            mirror,
            links,
            target,
            scope: PlanScope::All,
            now: DateTime::<Utc>::UNIX_EPOCH,
            seed: 0,
            guard: DeletionGuard::default(),
            containers: None,
            create_references: CreateReferences::All,
            linked: None,
            unlinked_referrers: true,
            planned_elsewhere: None,
        }
    }

    /// Whether the plan takes `referrer` in as an object referencing one whose link it makes
    /// or ends (see [`PlanInput::unlinked_referrers`]).
    fn plans_referrer(&self, referrer: &Anchor) -> bool {
        (self.unlinked_referrers || self.links.get(referrer).is_some())
            && !self.planned_elsewhere.is_some_and(|f| f(referrer))
    }
}

/// What phase A decided for one anchor.
enum Decision {
    /// Nothing to do; `in_scope` for the statistics.
    Nothing { in_scope: bool },
    /// A finished operation (deprovision).
    Op(Box<Operation>),
    /// A finished issue.
    Issue(Box<Issue>),
    /// In scope: a create, join or update, whose reference flows still need translating.
    Object(Box<Pending>),
    /// The mirror holds the object as context only ([`SourceMirror::is_partial`]): the plan
    /// must be made again with its whole entry.
    Incomplete(Anchor),
}

#[derive(Clone)]
struct Pending {
    anchor: Anchor,
    source_type: ObjectType,
    desired: Desired,
    action: Action,
    /// The changes that re-enable a linked (or joined) object disabled when it left (see
    /// [`reenable`]).
    enable: Vec<AttributeChange>,
    /// The deprovision of the old object when the target type changed: planned with the new
    /// object's create or join, and dropped with it when phase B drops it.
    retire: Option<Box<Operation>>,
}

#[derive(Clone)]
enum Action {
    Create,
    Join {
        target_id: TargetId,
        group: usize,
        on: Vec<(AttrName, Value)>,
    },
    Update {
        target_id: TargetId,
    },
}

/// Plans. See the module documentation.
///
/// An object the plan must decide whose entry the mirror holds as context only
/// ([`SourceMirror::is_partial`]) is not decided: the plan holds it with an
/// [`Issue::Held`] saying so (the engine plans again with its whole entry instead).
pub fn plan(input: &PlanInput<'_>) -> Plan {
    with_held(plan_or_incomplete(input))
}

/// A plan, or the plan made anyway with the objects the mirror held as context only
/// ([`SourceMirror::is_partial`]) that it had to decide held.
fn with_held(result: Result<Plan, Incomplete>) -> Plan {
    match result {
        Ok(plan) => plan,
        Err(Incomplete { plan, anchors }) => {
            let mut plan = *plan;
            for anchor in anchors {
                plan.issues.push(Issue::Held {
                    anchor,
                    reason: "the mirror held the object as context only; plan it again with \
                             its whole entry"
                        .into(),
                });
            }
            plan.issues
                .sort_by_cached_key(|i| (i.anchor().cloned(), i.to_string()));
            plan
        }
    }
}

/// A plan that had to decide objects the mirror held as context only
/// ([`SourceMirror::is_partial`]): their anchors (sorted, each once), and the plan made without
/// deciding them.
pub(crate) struct Incomplete {
    pub(crate) plan: Box<Plan>,
    pub(crate) anchors: Vec<Anchor>,
}

/// [`plan`], or [`Incomplete`] when it had to decide objects the mirror held as context only:
/// the caller plans again with their whole entries.
pub(crate) fn plan_or_incomplete(input: &PlanInput<'_>) -> Result<Plan, Incomplete> {
    plan_relinking(input).0
}

/// [`plan_or_incomplete`], with the anchors whose link the plan's decisions make or end
/// (creates, joins, deletes, unlinks; sorted, each once): the objects whose referrers the plan
/// takes in when it plans them ([`PlanInput::unlinked_referrers`],
/// [`PlanInput::planned_elsewhere`]) and the mirror holds them — a caller that read none can
/// check that none is to be planned.
pub(crate) fn plan_relinking(input: &PlanInput<'_>) -> (Result<Plan, Incomplete>, Vec<Anchor>) {
    let mut fresh = None;
    let containers = bound_containers(input, &mut fresh);
    let ctx = context(input, containers);

    // Phase A: every considered anchor, in parallel where enabled. The common "nothing to do"
    // decisions are only counted; the others are kept for phases B and C.
    let tally = match &input.scope {
        PlanScope::All => {
            let entries: Vec<&Entry> = input.mirror.entries().collect();
            let mut t = par_tally(&entries, |e| {
                let link = input.links.get(&e.anchor);
                (
                    decide(input, &ctx, &e.anchor, Some(e), link, true),
                    link.is_some(),
                )
            });
            // Links whose source object is gone: only looked for when not every link was
            // met above (the common full sync of an unchanged source skips the scan).
            if t.linked != input.links.len() {
                for l in input.links.iter() {
                    if input.mirror.get(&l.anchor).is_none() {
                        t.add((decide(input, &ctx, &l.anchor, None, Some(l), true), true));
                    }
                }
            }
            t
        }
        PlanScope::Anchors(anchors) => {
            let decide_anchor = |a: &&Anchor| {
                let link = input.links.get(a);
                (
                    decide(input, &ctx, a, input.mirror.get(a), link, true),
                    link.is_some(),
                )
            };
            let mut set: BTreeSet<&Anchor> = anchors.iter().collect();
            let list: Vec<&Anchor> = set.iter().copied().collect();
            let mut tally = par_tally(&list, decide_anchor);
            // The objects that reference an object whose link this plan makes or ends must be
            // planned with it: their references to it become pending ones, or go. Those
            // objects may in turn end links: until nothing new is found.
            let mut relinked = tally.relinked();
            loop {
                let mut extra: BTreeSet<&Anchor> = BTreeSet::new();
                for a in &relinked {
                    for (referrer, _) in input.mirror.referrers(a) {
                        if !set.contains(referrer) && input.plans_referrer(referrer) {
                            extra.insert(referrer);
                        }
                    }
                }
                if extra.is_empty() {
                    break;
                }
                set.extend(extra.iter().copied());
                let extra: Vec<&Anchor> = extra.into_iter().collect();
                // Compared in full: against the links as they were, they would hold.
                let more = par_tally(&extra, |a: &&Anchor| {
                    let link = input.links.get(a);
                    let entry = input.mirror.get(a);
                    (decide(input, &ctx, a, entry, link, false), link.is_some())
                });
                relinked = more.relinked();
                tally.absorb(more);
            }
            tally
        }
    };
    let mut relinked = tally.relinked();
    relinked.sort();
    relinked.dedup();
    (conclude(input, containers, &ctx, tally), relinked)
}

/// The bindings of the projection's containers: the input's, or bound afresh against its
/// mirror (in `fresh`).
fn bound_containers<'i>(
    input: &'i PlanInput<'_>,
    fresh: &'i mut Option<ContainerBindings>,
) -> &'i ContainerBindings {
    match input.containers {
        Some(c) => c,
        None => {
            let named = input.projection.containers();
            fresh.insert(ContainerBindings::resolve(
                &named,
                input.mirror,
                &ContainerBindings::new(),
            ))
        }
    }
}

/// `input` as the input of a full plan.
fn as_full<'i>(input: &PlanInput<'i>) -> PlanInput<'i> {
    PlanInput {
        projection: input.projection,
        mirror: input.mirror,
        links: input.links,
        target: input.target,
        scope: PlanScope::All,
        now: input.now,
        seed: input.seed,
        guard: input.guard,
        containers: input.containers,
        create_references: input.create_references.clone(),
        linked: input.linked,
        unlinked_referrers: input.unlinked_referrers,
        planned_elsewhere: input.planned_elsewhere,
    }
}

/// The context the projection is asked in.
fn context<'i>(input: &PlanInput<'i>, containers: &'i ContainerBindings) -> ProjectionContext<'i> {
    let mut ctx = ProjectionContext::new(input.now, input.seed, input.mirror, input.target)
        .with_containers(containers);
    ctx.links = Some(input.links);
    ctx
}

/// Phase A of a full plan ([`PlanScope::All`]) over part of its anchors, for a plan made page
/// by page from a store too large to hold at once: what [`plan`] decides for each of
/// `anchors` (those of the source mirror, and linked anchors whose source object is gone),
/// the "nothing to do" decisions only counted. `input` holds the page's neighbourhood (its
/// entries, their links and target objects, what they reference and what references them, the
/// join candidates of the unlinked ones), as for a delta plan; its scope is ignored. Anchors
/// neither in the mirror nor linked are not considered.
///
/// The pages' decisions, [absorbed](Decisions::absorb) into one, then go to [`plan_decided`]
/// with the neighbourhood of [`Decisions::anchors`]: the plan is the one [`plan`] makes from
/// the whole store, byte for byte.
pub fn decide_page(input: &PlanInput<'_>, anchors: &[Anchor]) -> Decisions {
    let mut fresh = None;
    let containers = bound_containers(input, &mut fresh);
    let ctx = context(input, containers);
    let full = as_full(input);
    let items: Vec<(&Anchor, Option<&Entry>, Option<&Link>)> = anchors
        .iter()
        .map(|a| (a, input.mirror.get(a), input.links.get(a)))
        .filter(|(_, e, l)| e.is_some() || l.is_some())
        .collect();
    Decisions(par_tally(&items, |(a, entry, link)| {
        (decide(&full, &ctx, a, *entry, *link, true), link.is_some())
    }))
}

/// What phase A of a delta plan of some anchors decides that a paged run's survey reads
/// ([`survey`]).
pub(crate) struct Surveyed {
    /// The operations decided for the anchors themselves that are not creates, joins or
    /// updates: deprovisions (deletes, disables, unlinks).
    pub(crate) operations: Vec<Operation>,
    /// The anchors whose link the decisions make or end (their referrers, when planned, are
    /// planned with them).
    pub(crate) relinked: Vec<Anchor>,
    /// Whether these are what [`plan`] decides for the anchors with their whole neighbourhood
    /// in the mirror: not when the mirror held an anchor as context only, the projection
    /// asked the DN of an object the mirror does not hold
    /// ([`SourceMirror::asked_absent`]), or an object changes target type (its old object's
    /// deprovision depends on the new one's flows and phase B).
    pub(crate) exact: bool,
}

/// Phase A of a delta plan ([`PlanScope::Anchors`]) of `anchors`, keeping what a paged run's
/// survey needs of it: the deprovisions of the anchors and the anchors it relinks. `input`
/// may hold the anchors alone (their entries, links and target objects), its mirror
/// watching for the DNs asked of objects it does not hold
/// ([`SourceMirror::watch_absent`]): for a projection that reads the mirror by DN only
/// ([`Projection::reads_mirror_by_dn`]) and not [`ProjectionContext::member_of`], the
/// decisions are then those of a plan with the whole neighbourhood unless
/// [`Surveyed::exact`] says otherwise. What the plan would decide for their referrers is not
/// looked at: the caller checks that none of those is to be planned.
pub(crate) fn survey(input: &PlanInput<'_>, anchors: &[Anchor]) -> Surveyed {
    let mut fresh = None;
    let containers = bound_containers(input, &mut fresh);
    let ctx = context(input, containers);
    let list: Vec<&Anchor> = anchors
        .iter()
        .collect::<BTreeSet<&Anchor>>()
        .into_iter()
        .collect();
    let tally = par_tally(&list, |a: &&Anchor| {
        let link = input.links.get(a);
        (
            decide(input, &ctx, a, input.mirror.get(a), link, true),
            link.is_some(),
        )
    });
    let exact = tally.incomplete.is_empty()
        && tally.pending.iter().all(|p| p.retire.is_none())
        && !input.mirror.asked_absent();
    Surveyed {
        relinked: tally.relinked(),
        operations: tally.ops,
        exact,
    }
}

/// What phase A of a plan decided, page by page ([`decide_page`]): the statistics, and the
/// decisions that are not "nothing to do" — few when little changed, so a full plan of a
/// large store holds only these.
#[derive(Default, Clone)]
pub struct Decisions(Tally);

impl Decisions {
    /// Adds the decisions of another page.
    pub fn absorb(&mut self, other: Decisions) {
        self.0.absorb(other.0);
    }

    /// Whether an object to decide was held as context only by the mirror
    /// ([`SourceMirror::is_partial`]): these decisions are to be made again with its whole
    /// entry.
    pub fn incomplete(&self) -> bool {
        !self.0.incomplete.is_empty()
    }

    /// The anchors considered so far.
    pub fn considered(&self) -> usize {
        self.0.stats.considered
    }

    /// The anchors decided something for (an operation, an object to create, join or update,
    /// an issue), sorted: the ones whose neighbourhood [`plan_decided`] needs.
    pub fn anchors(&self) -> Vec<Anchor> {
        let mut out: Vec<Anchor> = self.0.decided().into_iter().cloned().collect();
        out.sort();
        out
    }
}

impl std::fmt::Debug for Decisions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decisions")
            .field("stats", &self.0.stats)
            .field("operations", &self.0.ops.len())
            .field("objects", &self.0.pending.len())
            .field("issues", &self.0.issues.len())
            .finish()
    }
}

/// The rest of a full plan made page by page: phases B and C over the pages' [`Decisions`].
/// `input` holds the neighbourhood of [`Decisions::anchors`] (as a delta plan's views, join
/// candidates included) and, in [`PlanInput::linked`], the number of linked objects per
/// target type for the guard.
///
/// Objects the mirror holds as context only are held, as in [`plan`].
pub fn plan_decided(input: &PlanInput<'_>, decisions: Decisions) -> Plan {
    with_held(plan_decided_or_incomplete(input, decisions))
}

/// [`plan_decided`], or [`Incomplete`] as [`plan_or_incomplete`].
pub(crate) fn plan_decided_or_incomplete(
    input: &PlanInput<'_>,
    decisions: Decisions,
) -> Result<Plan, Incomplete> {
    let mut fresh = None;
    let containers = bound_containers(input, &mut fresh);
    let full = as_full(input);
    let ctx = context(&full, containers);
    conclude(&full, containers, &ctx, decisions.0)
}

/// Phases B and C, after phase A.
fn conclude(
    input: &PlanInput<'_>,
    containers: &ContainerBindings,
    ctx: &ProjectionContext<'_>,
    mut tally: Tally,
) -> Result<Plan, Incomplete> {
    redecide_referrers(input, ctx, &mut tally);
    replan_referrers_of_recreated(input, containers, &mut tally);
    let mut incomplete = std::mem::take(&mut tally.incomplete);

    let mut stats = tally.stats;
    let mut ops: Vec<Operation> = std::mem::take(&mut tally.ops);
    let mut issues: Vec<Issue> = std::mem::take(&mut tally.issues);
    let mut pending: Vec<Pending> = std::mem::take(&mut tally.pending);
    pending.sort_by(|a, b| a.anchor.cmp(&b.anchor));

    // Phase B: two objects joining one target object join neither; unique values claimed once.
    let mut joins: BTreeMap<TargetId, Vec<Anchor>> = BTreeMap::new();
    for p in &pending {
        if let Action::Join { target_id, .. } = &p.action {
            joins
                .entry(target_id.clone())
                .or_default()
                .push(p.anchor.clone());
        }
    }
    let duplicate: HashSet<Anchor> = joins
        .into_iter()
        .filter(|(_, anchors)| anchors.len() > 1)
        .flat_map(|(target_id, anchors)| {
            issues.push(Issue::DuplicateJoin {
                target_id,
                anchors: anchors.clone(),
            });
            anchors
        })
        .collect();
    pending.retain(|p| !duplicate.contains(&p.anchor));
    claim_unique_values(input, containers, &mut pending, &mut issues);

    // Phase C: references, now that every create and join of the plan is known.
    let creating: HashSet<&Anchor> = pending
        .iter()
        .filter(|p| matches!(p.action, Action::Create))
        .map(|p| &p.anchor)
        .collect();
    let joining: HashMap<&Anchor, &TargetId> = pending
        .iter()
        .filter_map(|p| match &p.action {
            Action::Join { target_id, .. } => Some((&p.anchor, target_id)),
            _ => None,
        })
        .collect();
    // The objects whose target object this plan deletes or unlinks: references to them go.
    let gone: HashSet<Anchor> = ops
        .iter()
        .filter(|o| ends_link(&o.kind))
        .map(|o| o.anchor.clone())
        .collect();
    let resolved = Resolved {
        creating: &creating,
        joining: &joining,
        gone: &gone,
    };
    let order = create_order(input, &pending, &resolved);
    for p in &pending {
        let (o, mut i) = finish(input, p, &resolved, &order, &mut stats);
        if o.is_empty() && matches!(p.action, Action::Update { .. }) {
            stats.unchanged += 1;
        }
        ops.extend(o);
        issues.append(&mut i);
    }

    // Creates by level (a create after the creates it references), then anchor.
    let mut keyed: Vec<(super::Phase, usize, Operation)> = ops
        .into_iter()
        .map(|o| {
            let level = match o.kind {
                OperationKind::Create { .. } => order.level(&o.anchor),
                _ => 0,
            };
            (o.phase(), level, o)
        })
        .collect();
    keyed.sort_by(|(pa, la, a), (pb, lb, b)| {
        (pa, la, &a.anchor, a.kind.name()).cmp(&(pb, lb, &b.anchor, b.kind.name()))
    });
    let ops: Vec<Operation> = keyed.into_iter().map(|(_, _, o)| o).collect();
    issues.sort_by_cached_key(|i| (i.anchor().cloned(), i.to_string()));
    let mut plan = Plan {
        operations: ops,
        issues,
        guard_violations: Vec::new(),
        stats,
    };
    plan.guard_violations = match input.linked {
        Some(counts) => input
            .guard
            .check_with(&plan, |ty| counts.get(ty).copied().unwrap_or(0)),
        None => input.guard.check(&plan, input.links),
    };
    if incomplete.is_empty() {
        return Ok(plan);
    }
    incomplete.sort();
    incomplete.dedup();
    Err(Incomplete {
        plan: Box::new(plan),
        anchors: incomplete,
    })
}

/// Objects this plan creates anew while they are linked — their target object is gone, or the
/// rules now make one of another type — are referred to by their new objects (phase C makes
/// those references pending). Their referrers that phase A found unchanged, because they refer
/// to the old object through its link, are decided again with that link set aside, so the
/// references move to the new object in the same plan.
fn replan_referrers_of_recreated(
    input: &PlanInput<'_>,
    containers: &ContainerBindings,
    tally: &mut Tally,
) {
    let recreated: HashSet<Anchor> = tally.recreated(input).cloned().collect();
    if recreated.is_empty() {
        return;
    }
    let decided = tally.decided();
    let again: Vec<Anchor> = recreated
        .iter()
        .flat_map(|a| input.mirror.referrers(a))
        .map(|(r, _)| r)
        .filter(|r| !decided.contains(r) && input.plans_referrer(r))
        .cloned()
        .collect::<BTreeSet<Anchor>>()
        .into_iter()
        .collect();
    let mut ctx = ProjectionContext::new(input.now, input.seed, input.mirror, input.target)
        .with_containers(containers);
    ctx.links = Some(input.links);
    ctx.recreated = Some(&recreated);
    let more = seq_tally(&again, |a| {
        let link = input.links.get(a);
        (
            decide(input, &ctx, a, input.mirror.get(a), link, false),
            link.is_some(),
        )
    });
    // Phase A counted each of them, the ones in scope as unchanged.
    let stats = &mut tally.stats;
    stats.considered = stats.considered.saturating_sub(more.stats.considered);
    stats.in_scope = stats.in_scope.saturating_sub(more.stats.in_scope);
    stats.unchanged = stats.unchanged.saturating_sub(more.stats.in_scope);
    tally.absorb(more);
}

/// What phase A found: the statistics so far and the decisions that are not "nothing to do".
#[derive(Default, Clone)]
struct Tally {
    stats: PlanStats,
    /// How many of the decided anchors have a link.
    linked: usize,
    ops: Vec<Operation>,
    issues: Vec<Issue>,
    pending: Vec<Pending>,
    /// Objects decided from a context-only entry ([`Decision::Incomplete`]).
    incomplete: Vec<Anchor>,
}

impl Tally {
    /// The anchors phase A decided something for: an object, an operation or an issue.
    fn decided(&self) -> HashSet<&Anchor> {
        self.pending
            .iter()
            .map(|p| &p.anchor)
            .chain(self.ops.iter().map(|o| &o.anchor))
            .chain(self.issues.iter().filter_map(Issue::anchor))
            .collect()
    }

    /// The objects this plan creates anew while they are linked: their target object is gone,
    /// or the rules now make one of another type.
    fn recreated<'t>(&'t self, input: &'t PlanInput<'_>) -> impl Iterator<Item = &'t Anchor> {
        self.pending
            .iter()
            .filter(|p| matches!(p.action, Action::Create) && input.links.get(&p.anchor).is_some())
            .map(|p| &p.anchor)
    }

    fn add(&mut self, (d, linked): (Decision, bool)) {
        self.stats.considered += 1;
        self.linked += usize::from(linked);
        match d {
            Decision::Nothing { in_scope } => {
                if in_scope {
                    self.stats.in_scope += 1;
                    self.stats.unchanged += 1;
                }
            }
            Decision::Op(op) => self.ops.push(*op),
            Decision::Issue(i) => self.issues.push(*i),
            Decision::Object(p) => {
                self.stats.in_scope += 1;
                self.pending.push(*p)
            }
            Decision::Incomplete(a) => self.incomplete.push(a),
        }
    }

    #[cfg(feature = "parallel")]
    fn merge(mut self, other: Tally) -> Tally {
        self.absorb(other);
        self
    }

    /// The anchors whose link the decisions make or end: creates (new, or of a linked object
    /// whose target object is gone), joins, deletes and unlinks.
    fn relinked(&self) -> Vec<Anchor> {
        let pending = self
            .pending
            .iter()
            .filter(|p| matches!(p.action, Action::Create | Action::Join { .. }))
            .map(|p| p.anchor.clone());
        let ops = self
            .ops
            .iter()
            .filter(|o| ends_link(&o.kind))
            .map(|o| o.anchor.clone());
        pending.chain(ops).collect()
    }

    fn absorb(&mut self, mut other: Tally) {
        self.stats.considered += other.stats.considered;
        self.stats.in_scope += other.stats.in_scope;
        self.stats.unchanged += other.stats.unchanged;
        self.stats.out_of_scope_references += other.stats.out_of_scope_references;
        self.linked += other.linked;
        self.ops.append(&mut other.ops);
        self.issues.append(&mut other.issues);
        self.pending.append(&mut other.pending);
        self.incomplete.append(&mut other.incomplete);
    }
}

/// Decides every item and tallies the decisions (in parallel where enabled; the tally does not
/// depend on the order, because phases B and C sort what they keep).
#[cfg(feature = "parallel")]
fn par_tally<T: Sync>(items: &[T], f: impl Fn(&T) -> (Decision, bool) + Sync + Send) -> Tally {
    use rayon::prelude::*;
    if items.len() < 2048 {
        return seq_tally(items, f);
    }
    items
        .par_iter()
        .with_min_len(512)
        .fold(Tally::default, |mut t, x| {
            t.add(f(x));
            t
        })
        .reduce(Tally::default, Tally::merge)
}

#[cfg(not(feature = "parallel"))]
fn par_tally<T: Sync>(items: &[T], f: impl Fn(&T) -> (Decision, bool) + Sync + Send) -> Tally {
    seq_tally(items, f)
}

fn seq_tally<T>(items: &[T], f: impl Fn(&T) -> (Decision, bool)) -> Tally {
    let mut t = Tally::default();
    for x in items {
        t.add(f(x));
    }
    t
}

/// Whether an operation ends its object's link (its references must go).
fn ends_link(kind: &OperationKind) -> bool {
    matches!(
        kind,
        OperationKind::Delete { .. } | OperationKind::Unlink { .. }
    )
}

/// The objects referencing an object whose link this plan changes (a delete, an unlink, a
/// create of a linked object whose target object is gone) may have been found unchanged
/// against the link as it was: they are decided again without the shortcuts, and planned when
/// their references change.
fn redecide_referrers(input: &PlanInput<'_>, ctx: &ProjectionContext<'_>, tally: &mut Tally) {
    let moved: Vec<&Anchor> = tally
        .ops
        .iter()
        .filter(|o| ends_link(&o.kind))
        .map(|o| &o.anchor)
        .chain(tally.recreated(input))
        .collect();
    if moved.is_empty() {
        return;
    }
    let decided = tally.decided();
    let again: BTreeSet<&Anchor> = moved
        .iter()
        .flat_map(|a| input.mirror.referrers(a))
        .map(|(r, _)| r)
        .filter(|r| !decided.contains(r) && input.plans_referrer(r))
        .collect();
    let mut found = Vec::new();
    for a in again {
        let Some(entry) = input.mirror.get(a) else {
            continue;
        };
        let link = input.links.get(a);
        // Only the shortcuts' "unchanged" can differ: take in-scope objects.
        match decide(input, ctx, a, Some(entry), link, false) {
            Decision::Object(p) => found.push(*p),
            Decision::Incomplete(a) => tally.incomplete.push(a),
            _ => {}
        }
    }
    for p in found {
        tally.stats.unchanged = tally.stats.unchanged.saturating_sub(1);
        tally.pending.push(p);
    }
}

/// Phase A for one anchor. `shortcuts`: ask the projection's fast path first (in full plans),
/// and decide "unchanged" by comparing through the links without building the operations.
fn decide(
    input: &PlanInput<'_>,
    ctx: &ProjectionContext<'_>,
    anchor: &Anchor,
    entry: Option<&Entry>,
    link: Option<&Link>,
    shortcuts: bool,
) -> Decision {
    let Some(entry) = entry else {
        return match link {
            Some(link) => deprovision(
                input,
                link,
                None,
                DeprovisionCause::DeletedAtSource,
                Reason::DeletedAtSource,
            )
            .map_or(Decision::Nothing { in_scope: false }, |op| {
                Decision::Op(Box::new(op))
            }),
            None => Decision::Nothing { in_scope: false },
        };
    };
    if input.mirror.is_partial(anchor) {
        return Decision::Incomplete(anchor.clone());
    }
    // The projection's own fast path: linked, in scope, nothing to change. Asked in full plans
    // only, where most objects are unchanged; a delta plan's objects are dirty, and asking
    // first would mostly evaluate their flows twice.
    if let Some(current) = link
        .filter(|_| shortcuts && matches!(input.scope, PlanScope::All))
        .and_then(|l| input.target.get(&l.target_id))
    {
        if link.is_some_and(|l| l.target_type == current.object_type)
            && input.projection.unchanged(entry, current, ctx) == Some(true)
        {
            return Decision::Nothing { in_scope: true };
        }
    }
    match input.projection.project(entry, ctx) {
        Projected::OutOfScope(why) => match link {
            Some(link) => deprovision(
                input,
                link,
                Some(entry),
                DeprovisionCause::LeftScope,
                Reason::LeftScope {
                    why,
                    container: None,
                },
            )
            .map_or(Decision::Nothing { in_scope: false }, |op| {
                Decision::Op(Box::new(op))
            }),
            None => Decision::Nothing { in_scope: false },
        },
        Projected::OutOfContainer { why, container } => match link {
            Some(link) => deprovision(
                input,
                link,
                Some(entry),
                DeprovisionCause::LeftScope,
                Reason::LeftScope { why, container },
            )
            .map_or(Decision::Nothing { in_scope: false }, |op| {
                Decision::Op(Box::new(op))
            }),
            None => Decision::Nothing { in_scope: false },
        },
        Projected::Held(reason) => Decision::Issue(Box::new(Issue::Held {
            anchor: anchor.clone(),
            reason,
        })),
        Projected::Failed(error) => Decision::Issue(Box::new(Issue::ProjectionFailed {
            anchor: anchor.clone(),
            error,
        })),
        Projected::InScope(desired) => {
            if let Some(link) = link {
                if link.target_type != desired.target_type {
                    return replace_type(input, anchor, entry, link, desired);
                }
                return match input.target.get(&link.target_id) {
                    Some(current) => {
                        let enable = reenable(input, link, entry, &desired, current);
                        // The common case: nothing changed. Decide it without allocating.
                        let mut hint = 0;
                        let refs = ctx.refs();
                        if shortcuts
                            && enable.is_empty()
                            && desired.flows.iter().all(|f| {
                                f.apply == Apply::OnCreate
                                    || flow_holds(
                                        f,
                                        &f.values,
                                        current.attributes.get_hinted(&f.attribute, &mut hint),
                                        refs,
                                    )
                            })
                        {
                            return Decision::Nothing { in_scope: true };
                        }
                        let mut d = object(
                            entry,
                            desired,
                            Action::Update {
                                target_id: link.target_id.clone(),
                            },
                        );
                        if let Decision::Object(p) = &mut d {
                            p.enable = enable;
                        }
                        d
                    }
                    None => object(entry, desired, Action::Create),
                };
            }
            match join(input, anchor, &desired) {
                Ok(Some(found)) => joined(input, entry, desired, found),
                Ok(None) => object(entry, desired, Action::Create),
                Err(issue) => Decision::Issue(Box::new(issue)),
            }
        }
    }
}

fn object(entry: &Entry, desired: Desired, action: Action) -> Decision {
    Decision::Object(Box::new(Pending {
        anchor: entry.anchor.clone(),
        source_type: entry.object_type.clone(),
        desired,
        action,
        enable: Vec::new(),
        retire: None,
    }))
}

/// A join of `entry` to the target object a join group found; a joined object holding the values
/// its rules disable with is re-enabled as a linked one would be ([`reenable`]).
fn joined(input: &PlanInput<'_>, entry: &Entry, desired: Desired, found: JoinMatch) -> Decision {
    let (target_id, group, on) = found;
    let enable = match input.target.get(&target_id) {
        Some(current) => {
            let link = Link {
                anchor: entry.anchor.clone(),
                source_type: entry.object_type.clone(),
                target_id: target_id.clone(),
                target_type: desired.target_type.clone(),
            };
            reenable(input, &link, entry, &desired, current)
        }
        None => Vec::new(),
    };
    let mut d = object(
        entry,
        desired,
        Action::Join {
            target_id,
            group,
            on,
        },
    );
    if let Decision::Object(p) = &mut d {
        p.enable = enable;
    }
    d
}

/// An object linked to a target object of another type than its rules now make: the new object
/// is created (or joined) and the old one deprovisioned by the rules' `type_changed` policy, in
/// the same plan. The create comes first (its phase), the deprovision last: a failed create
/// defers the deprovision (the engine never runs an object's later phases after a failure), so
/// the old object is never gone before the new one exists. A join conflict for the new object
/// leaves the old one as it is.
fn replace_type(
    input: &PlanInput<'_>,
    anchor: &Anchor,
    entry: &Entry,
    link: &Link,
    desired: Desired,
) -> Decision {
    let reason = Reason::TargetTypeChanged {
        from: link.target_type.clone(),
        to: desired.target_type.clone(),
    };
    let mut d = match join(input, anchor, &desired) {
        Ok(Some(found)) => joined(input, entry, desired, found),
        Ok(None) => object(entry, desired, Action::Create),
        Err(issue) => return Decision::Issue(Box::new(issue)),
    };
    let retire = deprovision(
        input,
        link,
        Some(entry),
        DeprovisionCause::TypeChanged,
        reason,
    );
    if let Decision::Object(p) = &mut d {
        p.retire = retire.map(Box::new);
    }
    d
}

/// A join's result: the target object, the group (0-based) and the values it matched on.
type JoinMatch = (TargetId, usize, Vec<(AttrName, Value)>);

/// Join groups in order: the first group with exactly one candidate (not linked to another
/// anchor) wins; several candidates is a conflict.
fn join(
    input: &PlanInput<'_>,
    anchor: &Anchor,
    desired: &Desired,
) -> Result<Option<JoinMatch>, Issue> {
    for (g, group) in desired.join.iter().enumerate() {
        if group.is_empty() {
            continue;
        }
        let mut candidates: Option<Vec<TargetId>> = None;
        for (attr, value) in group.pairs() {
            let found = input.target.find(&desired.target_type, attr, value);
            candidates = Some(match candidates {
                None => found,
                Some(prev) => prev.into_iter().filter(|c| found.contains(c)).collect(),
            });
        }
        let mut candidates = candidates.unwrap_or_default();
        candidates.retain(|c| input.links.anchor_of(c).is_none_or(|a| a == anchor));
        match candidates.len() {
            0 => continue,
            1 => return Ok(Some((candidates.remove(0), g, group.pairs().to_vec()))),
            _ => {
                return Err(Issue::JoinConflict {
                    anchor: anchor.clone(),
                    group: g,
                    candidates,
                })
            }
        }
    }
    Ok(None)
}

/// The operation that deprovisions `link`'s target object for `cause`, as the projection
/// decides; `None` when there is nothing to do (a disable already in place).
fn deprovision(
    input: &PlanInput<'_>,
    link: &Link,
    entry: Option<&Entry>,
    cause: DeprovisionCause,
    reason: Reason,
) -> Option<Operation> {
    let op = |kind| {
        Some(Operation {
            anchor: link.anchor.clone(),
            source_type: link.source_type.clone(),
            target_type: link.target_type.clone(),
            kind,
            reason: reason.clone(),
        })
    };
    let unlink = || {
        op(OperationKind::Unlink {
            target_id: link.target_id.clone(),
        })
    };
    let Some(current) = input.target.get(&link.target_id) else {
        // The target object is already gone: only the link remains to forget.
        return unlink();
    };
    match input.projection.deprovision(link, entry, cause) {
        Deprovision::Delete => op(OperationKind::Delete {
            target_id: link.target_id.clone(),
        }),
        Deprovision::Unlink => unlink(),
        Deprovision::Disable { set, .. } => {
            let changes: Vec<AttributeChange> = set
                .into_iter()
                .filter_map(|(name, values)| {
                    let flow = Flow::new(name, values);
                    diff_flow(
                        &flow,
                        current.attributes.get(flow.attribute.as_str()),
                        false,
                    )
                    .map(|mut c| c.remove(0))
                })
                .collect();
            if !changes.is_empty() {
                op(OperationKind::Disable {
                    target_id: link.target_id.clone(),
                    changes,
                })
            } else if cause == DeprovisionCause::TypeChanged {
                // Already disabled; the new object takes the link.
                unlink()
            } else {
                None
            }
        }
    }
}

/// The changes that re-enable `current`, the target object of a linked object `entry` that is in
/// scope: for each attribute a disable of its rules sets ([`DeprovisionCause::KEEPING_THE_LINK`]:
/// left scope, deleted) that no flow of `desired` writes, when `current` holds the disabled
/// values, the policy's enabled values. State-based, as the rest of the plan: a target object
/// disabled by the rules' values is re-enabled whoever disabled it (the rules manage those
/// attributes).
fn reenable(
    input: &PlanInput<'_>,
    link: &Link,
    entry: &Entry,
    desired: &Desired,
    current: &TargetObject,
) -> Vec<AttributeChange> {
    let mut out: Vec<AttributeChange> = Vec::new();
    for cause in DeprovisionCause::KEEPING_THE_LINK {
        let Deprovision::Disable { set, enable } =
            input.projection.deprovision(link, Some(entry), cause)
        else {
            continue;
        };
        for (attribute, disabled) in set {
            let written = desired.flows.iter().any(|f| {
                f.attribute == attribute
                    && f.apply == Apply::Always
                    && (!f.values.is_empty() || f.when_empty == WhenEmpty::Clear)
            });
            if written || out.iter().any(|c| c.attribute == attribute) {
                continue;
            }
            let Some((_, enabled)) = enable.iter().find(|(a, _)| *a == attribute) else {
                continue;
            };
            let have = current.attributes.get(attribute.as_str());
            if !have.is_some_and(|h| disabled.same_set(h, true)) {
                continue;
            }
            if let Some(mut c) = diff_flow(&Flow::new(attribute, enabled.clone()), have, false) {
                out.append(&mut c);
            }
        }
    }
    out
}

fn has_references(flow: &Flow) -> bool {
    flow.values.iter().any(Value::is_reference)
}

/// What translating a source reference into the target id of its linked object needs.
#[derive(Clone, Copy)]
pub(crate) struct Refs<'a> {
    pub(crate) mirror: &'a SourceMirror,
    pub(crate) links: &'a Links,
    /// Objects this plan creates anew while they are still linked (see [`plan`]): a reference to
    /// one does not resolve through its old link.
    pub(crate) recreated: Option<&'a HashSet<Anchor>>,
}

impl<'a> Refs<'a> {
    /// The target id of `anchor`'s existing link, unless the plan creates it anew.
    fn linked(self, anchor: &Anchor) -> Option<&'a TargetId> {
        if self.recreated.is_some_and(|r| r.contains(anchor)) {
            return None;
        }
        self.links.get(anchor).map(|l| &l.target_id)
    }
}

/// Whether `have`, a linked target object's values, already holds what `flow` wants when it
/// wants `values` (the flow's own or others): true when an update would change nothing.
/// `OnCreate` flows always hold. Source references are translated through `refs`; without them
/// a flow with references does not hold.
pub(crate) fn flow_holds(
    flow: &Flow,
    values: &Values,
    have: Option<&Values>,
    refs: Option<Refs<'_>>,
) -> bool {
    if flow.apply == Apply::OnCreate {
        return true;
    }
    if let ([w], Some([h])) = (&values[..], have.map(|h| &h[..])) {
        // The commonest flow: one plain value, as the target has it.
        if !w.is_reference() && w == h {
            return true;
        }
    }
    if !values.iter().any(Value::is_reference) {
        if flow.multi && have.is_some_and(|h| same_in_order(values, h)) {
            // The common case: the target lists exactly these values, in this order.
            return true;
        }
        return diff_values(flow, values, have, false).is_none();
    }
    let Some(refs) = refs else {
        return false;
    };
    if let Some(h) = have {
        // Compare the translated values in place first: no allocation when they line up.
        if same_in_order_translated(values, h, refs) {
            return true;
        }
    }
    let mut translated = Values::new();
    for v in values {
        match v {
            Value::Reference(r) => match translate_existing(refs, r) {
                Some(id) => translated.push(Value::Reference(Reference::Target(id))),
                None => return false,
            },
            other => translated.push(other.clone()),
        }
    }
    diff_values(flow, &translated, have, false).is_none()
}

/// Whether `want` and `have` hold equal values at every position (then no flow of any kind
/// has anything to change).
fn same_in_order(want: &Values, have: &Values) -> bool {
    want.len() == have.len() && want.iter().zip(have.iter()).all(|(w, h)| w == h)
}

/// A value as the target would hold it: a plain value, or a source reference's target id.
enum TranslatedRef<'a> {
    Value(&'a Value),
    Target(&'a TargetId),
}

/// `v` translated through an existing link without cloning; `None` when a reference does not
/// resolve to a linked object.
fn translate_ref<'a>(refs: Refs<'a>, v: &'a Value) -> Option<TranslatedRef<'a>> {
    match v {
        Value::Reference(Reference::Target(id)) => Some(TranslatedRef::Target(id)),
        Value::Reference(r) => {
            let a = refs.mirror.resolve_ref(r)?;
            refs.linked(a).map(TranslatedRef::Target)
        }
        other => Some(TranslatedRef::Value(other)),
    }
}

/// [`same_in_order`] for translated references.
fn same_in_order_translated(want: &Values, have: &Values, refs: Refs<'_>) -> bool {
    want.len() == have.len()
        && want
            .iter()
            .zip(have.iter())
            .all(|(w, h)| match (translate_ref(refs, w), h) {
                (Some(TranslatedRef::Value(w)), h) => w == h,
                (Some(TranslatedRef::Target(id)), Value::Reference(Reference::Target(t))) => {
                    id == t
                }
                _ => false,
            })
}

/// The target id a source reference resolves to through an existing link.
fn translate_existing(refs: Refs<'_>, r: &Reference) -> Option<TargetId> {
    match r {
        Reference::Target(id) => Some(id.clone()),
        other => {
            let a = refs.mirror.resolve(other)?;
            refs.linked(&a).cloned()
        }
    }
}

/// The changes that bring `current` to what `flow` wants; `None` when there are none.
fn diff_flow(
    flow: &Flow,
    current: Option<&Values>,
    creating: bool,
) -> Option<Vec<AttributeChange>> {
    diff_values(flow, &flow.values, current, creating)
}

/// [`diff_flow`] for `flow` wanting `values` instead of its own.
fn diff_values(
    flow: &Flow,
    values: &Values,
    current: Option<&Values>,
    creating: bool,
) -> Option<Vec<AttributeChange>> {
    if flow.apply == Apply::OnCreate && !creating {
        return None;
    }
    let empty = Values::new();
    let current = current.unwrap_or(&empty);
    if values.is_empty() {
        return match flow.when_empty {
            WhenEmpty::Keep => None,
            WhenEmpty::Clear if current.is_empty() => None,
            WhenEmpty::Clear => Some(vec![change(
                flow,
                crate::model::ChangeOp::Replace,
                Values::new(),
                current,
            )]),
        };
    }
    if !flow.multi {
        if values.same_set(current, flow.ignore_case) {
            return None;
        }
        return Some(vec![change(
            flow,
            crate::model::ChangeOp::Replace,
            values.clone(),
            current,
        )]);
    }
    let (add, remove) = set_difference(values, current, flow.ignore_case);
    let mut out = Vec::new();
    if !add.is_empty() {
        out.push(change(flow, crate::model::ChangeOp::Add, add, &empty));
    }
    if !remove.is_empty() {
        out.push(change(flow, crate::model::ChangeOp::Remove, remove, &empty));
    }
    (!out.is_empty()).then_some(out)
}

fn change(
    flow: &Flow,
    op: crate::model::ChangeOp,
    values: Values,
    old: &Values,
) -> AttributeChange {
    let mut c = match op {
        crate::model::ChangeOp::Add => AttributeChange::add(flow.attribute.clone(), values),
        crate::model::ChangeOp::Remove => AttributeChange::remove(flow.attribute.clone(), values),
        crate::model::ChangeOp::Replace => AttributeChange::replace(flow.attribute.clone(), values),
    };
    if op == crate::model::ChangeOp::Replace {
        c.old = old.clone();
    }
    c.redacted = flow.redacted;
    c
}

/// `(want − have, have − want)`, each sorted; values compared as [`Value::matches`] does.
fn set_difference(want: &Values, have: &Values, ignore_case: bool) -> (Values, Values) {
    let key = |v: &Value| -> Value { v.match_key(ignore_case) };
    let want_keys: HashSet<Value> = want.iter().map(key).collect();
    let have_keys: HashSet<Value> = have.iter().map(key).collect();
    let mut add: Vec<Value> = Vec::new();
    let mut seen: HashSet<Value> = HashSet::new();
    for v in want.iter() {
        let k = key(v);
        if !have_keys.contains(&k) && seen.insert(k) {
            add.push(v.clone());
        }
    }
    let mut remove: Vec<Value> = have
        .iter()
        .filter(|v| !want_keys.contains(&key(v)))
        .cloned()
        .collect();
    add.sort();
    remove.sort();
    remove.dedup();
    (Values::from(add), Values::from(remove))
}

/// The values without repeats (a directory holds each value of an attribute once), in order.
fn distinct(values: &Values, ignore_case: bool) -> Values {
    let (add, _) = set_difference(values, &Values::new(), ignore_case);
    if add.len() == values.len() {
        return values.clone();
    }
    add
}

/// Makes sure no two creates of the plan claim the same unique value: in anchor order, a create
/// whose unique value an earlier one claimed is projected again with the claims known.
fn claim_unique_values(
    input: &PlanInput<'_>,
    containers: &ContainerBindings,
    pending: &mut Vec<Pending>,
    issues: &mut Vec<Issue>,
) {
    let mut held: HashSet<Anchor> = HashSet::new();
    let mut claimed: HashSet<(AttrName, String)> = HashSet::new();
    let keys = |p: &Pending| -> Vec<(AttrName, String)> {
        p.desired
            .flows
            .iter()
            .filter(|f| f.unique)
            .flat_map(|f| {
                f.values
                    .iter()
                    .map(move |v| (f.attribute.clone(), v.to_string().to_lowercase()))
            })
            .collect()
    };
    for p in pending.iter_mut() {
        if !matches!(p.action, Action::Create) {
            continue;
        }
        let mine = keys(p);
        if mine.is_empty() {
            continue;
        }
        if mine.iter().any(|k| claimed.contains(k)) {
            let Some(entry) = input.mirror.get(&p.anchor) else {
                continue;
            };
            let mut ctx = ProjectionContext::new(input.now, input.seed, input.mirror, input.target)
                .with_containers(containers);
            ctx.links = Some(input.links);
            ctx.claimed = Some(&claimed);
            match input.projection.project(entry, &ctx) {
                Projected::InScope(d) => p.desired = d,
                other => {
                    issues.push(Issue::Held {
                        anchor: p.anchor.clone(),
                        reason: match other {
                            Projected::Held(r) => r,
                            _ => "no unique value is free".into(),
                        },
                    });
                    held.insert(p.anchor.clone());
                    continue;
                }
            }
        }
        claimed.extend(keys(p));
    }
    pending.retain(|p| !held.contains(&p.anchor));
}

/// What phase C knows of the plan's objects when it translates references.
struct Resolved<'a> {
    /// The anchors the plan creates.
    creating: &'a HashSet<&'a Anchor>,
    /// The anchors the plan joins, with the target object each joins.
    joining: &'a HashMap<&'a Anchor, &'a TargetId>,
    /// The anchors whose target object the plan deletes or unlinks.
    gone: &'a HashSet<Anchor>,
}

/// Where a source reference points for this plan.
enum Points<'a> {
    /// At the object the plan creates for this anchor.
    Created(&'a Anchor),
    /// At an existing target object (linked, joined by this plan, or named by id).
    Existing(TargetId),
    /// At an object in the source mirror without a target object, and none planned (out of
    /// scope, or leaving the target in this plan).
    Elsewhere,
    /// At no object the source mirror holds.
    Unknown,
}

/// Where `r` points. An object the plan creates (again, when its linked target object is gone)
/// comes first: its new object is the one to reference.
fn point<'a>(input: &PlanInput<'_>, r: &Reference, resolved: &Resolved<'a>) -> Points<'a> {
    if let Reference::Target(id) = r {
        return Points::Existing(id.clone());
    }
    let Some(a) = input.mirror.resolve_ref(r) else {
        return Points::Unknown;
    };
    if let Some(created) = resolved.creating.get(a) {
        return Points::Created(created);
    }
    let gone = resolved.gone.contains(a);
    if let Some(l) = input.links.get(a).filter(|_| !gone) {
        return Points::Existing(l.target_id.clone());
    }
    match resolved.joining.get(a) {
        Some(id) => Points::Existing((*id).clone()),
        None if gone || input.mirror.get(a).is_some() => Points::Elsewhere,
        None => Points::Unknown,
    }
}

/// The order of the plan's creates: for each create, the creates its inline-able references
/// point at (see [`order_creates`]).
fn create_order(
    input: &PlanInput<'_>,
    pending: &[Pending],
    resolved: &Resolved<'_>,
) -> CreateOrder {
    let graph: Vec<(&Anchor, Vec<&Anchor>)> = pending
        .iter()
        .filter(|p| matches!(p.action, Action::Create))
        .map(|p| {
            let mut refs: Vec<&Anchor> = Vec::new();
            for flow in p.desired.flows.iter().filter(|f| {
                has_references(f)
                    && input
                        .create_references
                        .allows(&p.desired.target_type, &f.attribute)
            }) {
                for v in &flow.values {
                    if let Value::Reference(r) = v {
                        if let Points::Created(a) = point(input, r, resolved) {
                            refs.push(a);
                        }
                    }
                }
            }
            (&p.anchor, refs)
        })
        .collect();
    order_creates(&graph)
}

/// Phase C for one object: translate references and make its operations.
fn finish(
    input: &PlanInput<'_>,
    p: &Pending,
    resolved: &Resolved<'_>,
    order: &CreateOrder,
    stats: &mut PlanStats,
) -> (Vec<Operation>, Vec<Issue>) {
    let mut issues = Vec::new();
    let is_create = matches!(p.action, Action::Create);
    let current: Option<&TargetObject> = match &p.action {
        Action::Create => None,
        Action::Join { target_id, .. } | Action::Update { target_id } => {
            input.target.get(target_id)
        }
    };

    let mut plain: Vec<AttributeChange> = Vec::new();
    let mut refs: Vec<AttributeChange> = Vec::new();
    let mut create_attrs = Attributes::new();
    let mut secrets = Attributes::new();
    for flow in &p.desired.flows {
        let have = current.and_then(|c| c.attributes.get(flow.attribute.as_str()));
        if !has_references(flow) {
            if is_create {
                if !flow.values.is_empty() {
                    let values = if flow.multi {
                        distinct(&flow.values, flow.ignore_case)
                    } else {
                        flow.values.clone()
                    };
                    if flow.redacted {
                        secrets.set(flow.attribute.clone(), values);
                    } else {
                        create_attrs.set(flow.attribute.clone(), values);
                    }
                }
            } else if let Some(mut c) = diff_flow(flow, have, false) {
                plain.append(&mut c);
            }
            continue;
        }
        // Reference flow: translate each value. In a create, references go inline when the
        // target takes the attribute in a create and the referenced object exists or is created
        // before this one; the others wait for a write after the creates.
        let inline_allowed = is_create
            && input
                .create_references
                .allows(&p.desired.target_type, &flow.attribute);
        let mut inline = Values::new();
        let mut later = Values::new();
        let unresolved_before = issues.len();
        for v in &flow.values {
            let Value::Reference(r) = v else {
                if inline_allowed || !is_create {
                    inline.push(v.clone());
                } else {
                    later.push(v.clone());
                }
                continue;
            };
            match point(input, r, resolved) {
                Points::Created(a) => {
                    let deferred = order.is_deferred(&p.anchor, a);
                    let v = Value::Reference(Reference::Pending(a.clone()));
                    if inline_allowed && !deferred {
                        inline.push(v);
                    } else {
                        later.push(v);
                    }
                }
                Points::Existing(id) => {
                    let v = Value::Reference(Reference::Target(id));
                    if inline_allowed || !is_create {
                        inline.push(v);
                    } else {
                        later.push(v);
                    }
                }
                // Out of scope, or leaving the target in this plan: not part of the target.
                Points::Elsewhere => stats.out_of_scope_references += 1,
                Points::Unknown => issues.push(Issue::UnresolvedReference {
                    anchor: p.anchor.clone(),
                    attribute: flow.attribute.clone(),
                    reference: r.to_string(),
                }),
            }
        }
        if inline.is_empty() && later.is_empty() && issues.len() > unresolved_before {
            // Nothing resolved, and what did not is reported: the target stays as it is.
            continue;
        }
        if is_create {
            if !inline.is_empty() {
                create_attrs.set(flow.attribute.clone(), distinct(&inline, false));
            }
            if !later.is_empty() {
                refs.push(change(
                    flow,
                    if flow.multi {
                        crate::model::ChangeOp::Add
                    } else {
                        crate::model::ChangeOp::Replace
                    },
                    distinct(&later, false),
                    &Values::new(),
                ));
            }
            continue;
        }
        let mut all = inline;
        for v in later {
            all.push(v);
        }
        if let Some(mut c) = diff_values(flow, &all, have, false) {
            refs.append(&mut c);
        }
    }

    let op = |kind: OperationKind, reason: Reason| Operation {
        anchor: p.anchor.clone(),
        source_type: p.source_type.clone(),
        target_type: p.desired.target_type.clone(),
        kind,
        reason,
    };
    let changed = |changes: &[AttributeChange]| Reason::AttributesChanged {
        attributes: {
            let mut names: Vec<AttrName> = changes.iter().map(|c| c.attribute.clone()).collect();
            names.dedup();
            names
        },
    };
    let mut ops = Vec::new();
    match &p.action {
        Action::Create => {
            let reason = match (input.links.get(&p.anchor), &p.retire) {
                (Some(_), Some(retire)) => retire.reason.clone(),
                (Some(_), None) => Reason::TargetMissing,
                (None, _) => Reason::EnteredScope,
            };
            ops.push(op(
                OperationKind::Create {
                    attributes: create_attrs,
                    secrets,
                    lookup: p.desired.join.clone(),
                },
                reason.clone(),
            ));
            if !refs.is_empty() {
                ops.push(op(
                    OperationKind::UpdateReferences {
                        target: TargetRef::Pending(p.anchor.clone()),
                        changes: refs,
                    },
                    reason,
                ));
            }
        }
        Action::Join {
            target_id,
            group,
            on,
        } => {
            let reason = Reason::Joined {
                group: *group,
                on: on.clone(),
            };
            plain.extend(p.enable.iter().cloned());
            ops.push(op(
                OperationKind::Join {
                    target_id: target_id.clone(),
                    changes: plain,
                },
                reason,
            ));
            if !refs.is_empty() {
                let r = changed(&refs);
                ops.push(op(
                    OperationKind::UpdateReferences {
                        target: TargetRef::Existing(target_id.clone()),
                        changes: refs,
                    },
                    r,
                ));
            }
        }
        Action::Update { target_id } => {
            if !p.enable.is_empty() {
                let attributes = p.enable.iter().map(|c| c.attribute.clone()).collect();
                plain.extend(p.enable.iter().cloned());
                ops.push(op(
                    OperationKind::Update {
                        target: TargetRef::Existing(target_id.clone()),
                        changes: std::mem::take(&mut plain),
                    },
                    Reason::Reenabled { attributes },
                ));
            }
            if !plain.is_empty() {
                let r = changed(&plain);
                ops.push(op(
                    OperationKind::Update {
                        target: TargetRef::Existing(target_id.clone()),
                        changes: plain,
                    },
                    r,
                ));
            }
            if !refs.is_empty() {
                let r = changed(&refs);
                ops.push(op(
                    OperationKind::UpdateReferences {
                        target: TargetRef::Existing(target_id.clone()),
                        changes: refs,
                    },
                    r,
                ));
            }
        }
    }
    ops.extend(p.retire.as_deref().cloned());
    (ops, issues)
}

#[cfg(all(test, feature = "testkit"))]
mod tests {
    use super::*;
    use crate::model::TargetId;
    use crate::testkit::{self, UserGroupProjection};

    /// A converged store of `n` generated objects, then edited: some users renamed, one
    /// department left scope (deprovisions), one user deleted at the source.
    fn store(n: usize) -> (UserGroupProjection, SourceMirror, Links, TargetMirror) {
        let mut projection = UserGroupProjection {
            excluded_departments: vec![],
            ..Default::default()
        };
        let mut mirror = SourceMirror::new();
        for e in testkit::directory(n - n / 100, 8, n / 100, 20, 7) {
            mirror.insert(e);
        }
        let (mut links, mut target) = (Links::new(), TargetMirror::new());
        let first = plan(&PlanInput::new(&projection, &mirror, &links, &target));
        for (i, op) in first.operations.iter().enumerate() {
            let Ok(Some(top)) = op.to_target_operation(&links) else {
                continue;
            };
            let id = top
                .id()
                .cloned()
                .unwrap_or_else(|| TargetId::new(format!("t{i}")));
            target.record(&top, &id);
            links.record(op, Some(&id));
        }
        let anchors: Vec<Anchor> = mirror.anchors().cloned().collect();
        for a in anchors.iter().step_by(37) {
            if let Some(mut e) = mirror.get(a).cloned() {
                e.attributes.set("title", Value::string("Changed"));
                mirror.insert(e);
            }
        }
        if let Some(a) = anchors.first() {
            mirror.remove(a);
        }
        projection.excluded_departments = vec!["Legal".into()];
        (projection, mirror, links, target)
    }

    #[test]
    fn parallel_and_sequential_phase_a_agree() {
        let (projection, mirror, links, target) = store(5000);
        let input = PlanInput::new(&projection, &mirror, &links, &target);
        let ctx = ProjectionContext::new(input.now, input.seed, input.mirror, input.target);
        let entries: Vec<&Entry> = mirror.entries().collect();
        let f = |e: &&Entry| {
            let link = links.get(&e.anchor);
            (
                decide(&input, &ctx, &e.anchor, Some(e), link, true),
                link.is_some(),
            )
        };
        let (par, seq) = (par_tally(&entries, f), seq_tally(&entries, f));
        assert_eq!(par.stats, seq.stats);
        assert_eq!(par.linked, seq.linked);
        assert_eq!(
            par.linked,
            links.len() - 1,
            "the deleted object's link is not met"
        );
        assert_eq!(par.ops, seq.ops);
        assert_eq!(par.issues, seq.issues);
        let key = |t: &Tally| -> Vec<(Anchor, Desired)> {
            t.pending
                .iter()
                .map(|p| (p.anchor.clone(), p.desired.clone()))
                .collect()
        };
        assert_eq!(key(&par), key(&seq));
        // The edits show up: updates, deprovisions, a deleted source object.
        assert!(seq.pending.len() > 100, "{}", seq.pending.len());
        assert!(seq.ops.len() > 100, "{}", seq.ops.len());
        let p = plan(&input);
        assert_eq!(p.stats.considered, mirror.len() + 1);
        assert!(p.count("disable") > 100);
    }

    #[test]
    fn a_survey_decides_deprovisions_from_the_anchors_alone_or_says_it_cannot() {
        let (projection, mirror, links, target) = store(2000);
        // Every 7th object and the one deleted at the source (linked, no entry).
        let gone = links
            .iter()
            .find(|l| mirror.get(&l.anchor).is_none())
            .map(|l| l.anchor.clone())
            .unwrap();
        let mut anchors: Vec<Anchor> = mirror.anchors().step_by(7).cloned().collect();
        anchors.push(gone.clone());
        anchors.sort();
        // The mirror, links and target objects of those alone: not what they reference.
        let mut bare = SourceMirror::new();
        let (mut bare_links, mut bare_target) = (Links::new(), TargetMirror::new());
        for a in &anchors {
            if let Some(e) = mirror.get(a) {
                bare.insert(e.clone());
            }
            if let Some(l) = links.get(a) {
                bare_links.insert(l.clone());
                if let Some(o) = target.get(&l.target_id) {
                    bare_target.insert(o.clone());
                }
            }
        }
        bare.watch_absent();
        let scoped = |mirror, links, target| {
            let mut input = PlanInput::new(&projection, mirror, links, target);
            input.scope = PlanScope::Anchors(anchors.clone());
            input
        };
        let surveyed = survey(&scoped(&bare, &bare_links, &bare_target), &anchors);
        assert!(surveyed.exact);
        // The deprovisions a plan of them with everything decides for them.
        let whole = plan(&scoped(&mirror, &links, &target));
        let deprovisions = |ops: &[Operation]| -> Vec<Operation> {
            ops.iter()
                .filter(|o| o.kind.is_deletion() && anchors.binary_search(&o.anchor).is_ok())
                .cloned()
                .collect()
        };
        let mut got = deprovisions(&surveyed.operations);
        got.sort_by(|a, b| a.anchor.cmp(&b.anchor));
        assert_eq!(got, deprovisions(&whole.operations));
        assert!(got.len() > 10 && got.iter().any(|o| o.anchor == gone));
        // What it relinks is among them (their referrers are the caller's to check).
        assert!(surveyed
            .relinked
            .iter()
            .all(|a| anchors.binary_search(a).is_ok()));

        // Rules that read a referenced object's DN: not from a mirror without it.
        struct ByDn(UserGroupProjection);
        impl Projection for ByDn {
            fn project(&self, e: &Entry, ctx: &ProjectionContext<'_>) -> Projected {
                for (_, values) in e.attributes.iter() {
                    for v in values {
                        if let Value::Reference(Reference::Anchor(a)) = v {
                            let _ = ctx.mirror().dn_of(a);
                        }
                    }
                }
                self.0.project(e, ctx)
            }
            fn deprovision(
                &self,
                link: &Link,
                entry: Option<&Entry>,
                cause: DeprovisionCause,
            ) -> Deprovision {
                self.0.deprovision(link, entry, cause)
            }
        }
        let by_dn = ByDn(projection.clone());
        let mut input = PlanInput::new(&by_dn, &bare, &bare_links, &bare_target);
        input.scope = PlanScope::Anchors(anchors.clone());
        assert!(!survey(&input, &anchors).exact);
    }
}
