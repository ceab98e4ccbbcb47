//! Property tests of the planner over generated directories and edits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use dirsync::connector::memory::MemoryTarget;
use dirsync::delta::{
    self, DeletionGuard, Links, OperationKind, Plan, PlanInput, PlanScope, Projected, Projection,
    ProjectionContext, SourceMirror, TargetMirror,
};
use dirsync::model::{Dn, Entry, TargetObject, Value};
use dirsync::testkit::{self, UserGroupProjection};
use proptest::prelude::*;

const DEPTS: [&str; 3] = ["Eng", "Sales", "Former"];

#[derive(Debug, Clone)]
struct User {
    id: u8,
    name: u8,
    dept: usize,
    titles: Vec<u8>,
    /// The manager (a user id; cycles and self-management happen).
    manager: Option<u8>,
}

#[derive(Debug, Clone)]
struct Group {
    id: u8,
    /// Users (0..40) and groups (100..106: nested, cycles happen).
    members: Vec<u8>,
}

#[derive(Debug, Clone)]
enum Edit {
    Rename(u8, u8),
    Dept(u8, usize),
    Delete(u8),
    Add(User),
    Members(u8, Vec<u8>),
    Titles(u8, Vec<u8>),
    Manager(u8, Option<u8>),
}

fn user_strategy() -> impl Strategy<Value = User> {
    (
        0u8..40,
        0u8..12,
        0usize..3,
        prop::collection::vec(0u8..5, 0..3),
        prop::option::of(0u8..40),
    )
        .prop_map(|(id, name, dept, titles, manager)| User {
            id,
            name,
            dept,
            titles,
            manager,
        })
}

fn members_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop_oneof![4 => 0u8..40, 1 => 100u8..106], 0..8)
}

fn group_strategy() -> impl Strategy<Value = Group> {
    (100u8..106, members_strategy()).prop_map(|(id, members)| Group { id, members })
}

fn edit_strategy() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (0u8..40, 0u8..12).prop_map(|(a, n)| Edit::Rename(a, n)),
        (0u8..40, 0usize..3).prop_map(|(a, d)| Edit::Dept(a, d)),
        (0u8..40).prop_map(Edit::Delete),
        user_strategy().prop_map(Edit::Add),
        (100u8..106, members_strategy()).prop_map(|(g, m)| Edit::Members(g, m)),
        (0u8..40, prop::collection::vec(0u8..5, 0..3)).prop_map(|(a, t)| Edit::Titles(a, t)),
        (0u8..40, prop::option::of(0u8..40)).prop_map(|(a, m)| Edit::Manager(a, m)),
    ]
}

fn user_dn(id: u8) -> Dn {
    Dn::parse(&format!("cn=u{id},ou=People,dc=x")).unwrap()
}

fn group_dn(id: u8) -> Dn {
    Dn::parse(&format!("cn=g{id},ou=Groups,dc=x")).unwrap()
}

fn user_entry(u: &User) -> Entry {
    // Names repeat across users on purpose: `mail` collides, which exercises join conflicts.
    let mut e = Entry::new(format!("u{}", u.id), "user")
        .with_dn(user_dn(u.id))
        .with("cn", format!("Name {}", u.name))
        .with("mail", format!("n{}@x.test", u.name))
        .with("department", DEPTS[u.dept]);
    for t in &u.titles {
        e.attributes
            .add("proxyAddresses", format!("smtp:t{t}@x.test"));
    }
    if let Some(m) = u.manager {
        e.attributes.set("manager", Value::dn_ref(user_dn(m)));
    }
    e
}

fn group_entry(g: &Group) -> Entry {
    let mut e = Entry::new(format!("g{}", g.id), "group")
        .with_dn(group_dn(g.id))
        .with("cn", format!("Group {}", g.id));
    for m in &g.members {
        let v = Value::dn_ref(if *m >= 100 { group_dn(*m) } else { user_dn(*m) });
        if !e.get("member").is_some_and(|vs| vs.contains(&v)) {
            e.attributes.add("member", v);
        }
    }
    e
}

fn mirror_of(entries: &[Entry]) -> SourceMirror {
    let mut m = SourceMirror::new();
    for e in entries {
        m.insert(e.clone());
    }
    m
}

fn apply_edit(m: &mut SourceMirror, edit: &Edit) {
    let a = |id: &u8| dirsync::model::Anchor::new(format!("u{id}"));
    match edit {
        Edit::Rename(id, n) => {
            if let Some(mut e) = m.get(&a(id)).cloned() {
                e.attributes.set("cn", Value::string(format!("Name {n}")));
                m.insert(e);
            }
        }
        Edit::Dept(id, d) => {
            if let Some(mut e) = m.get(&a(id)).cloned() {
                e.attributes.set("department", Value::string(DEPTS[*d]));
                m.insert(e);
            }
        }
        Edit::Delete(id) => {
            m.remove(&a(id));
        }
        Edit::Add(u) => {
            m.insert(user_entry(u));
        }
        Edit::Members(g, members) => {
            m.insert(group_entry(&Group {
                id: *g,
                members: members.clone(),
            }));
        }
        Edit::Titles(id, titles) => {
            if let Some(e) = m.get(&a(id)).cloned() {
                let mut e = e;
                e.attributes.remove("proxyAddresses");
                for t in titles {
                    e.attributes
                        .add("proxyAddresses", format!("smtp:t{t}@x.test"));
                }
                m.insert(e);
            }
        }
        Edit::Manager(id, manager) => {
            if let Some(mut e) = m.get(&a(id)).cloned() {
                match manager {
                    Some(b) => e.attributes.set("manager", Value::dn_ref(user_dn(*b))),
                    None => {
                        e.attributes.remove("manager");
                    }
                }
                m.insert(e);
            }
        }
    }
}

fn plan(
    m: &SourceMirror,
    links: &Links,
    t: &TargetMirror,
    guard: DeletionGuard,
    scope: PlanScope,
) -> Plan {
    let rules = UserGroupProjection::default();
    let mut input = PlanInput::new(&rules, m, links, t);
    input.guard = guard;
    input.scope = scope;
    delta::plan(&input)
}

fn apply(p: &Plan, target: &MemoryTarget, links: &mut Links, t: &mut TargetMirror) {
    let report = futures::executor::block_on(testkit::export(p, target, links, t));
    assert!(
        report.failed.is_empty(),
        "export failed: {:?}\n{p}",
        report.failed
    );
}

fn out_of_scope(m: &SourceMirror, anchor: &dirsync::model::Anchor) -> bool {
    let empty_t = TargetMirror::new();
    let ctx = ProjectionContext::new(chrono::DateTime::UNIX_EPOCH, 0, m, &empty_t);
    match m.get(anchor) {
        Some(e) => matches!(
            UserGroupProjection::default().project(e, &ctx),
            Projected::OutOfScope(_)
        ),
        None => true,
    }
}

/// Every create of `plan` comes after the creates its attributes reference; a reference to a
/// created object that waits for a later write (an `UpdateReferences` of a new object) closes a
/// cycle among the plan's creates (or is a self-reference).
fn check_create_order(plan: &Plan) -> Result<(), TestCaseError> {
    use dirsync::model::{Anchor, Reference};
    use std::collections::HashMap;
    let pending = |vs: &dirsync::model::Values| -> Vec<Anchor> {
        vs.iter()
            .filter_map(|v| match v {
                Value::Reference(Reference::Pending(a)) => Some(a.clone()),
                _ => None,
            })
            .collect()
    };
    let mut position: HashMap<Anchor, usize> = HashMap::new();
    let mut edges: HashMap<Anchor, Vec<Anchor>> = HashMap::new();
    let mut deferred: Vec<(Anchor, Anchor)> = Vec::new();
    for (i, op) in plan.operations.iter().enumerate() {
        match &op.kind {
            OperationKind::Create { attributes, .. } => {
                for (_, vs) in attributes.iter() {
                    for a in pending(vs) {
                        let at = position.get(&a).copied();
                        prop_assert!(
                            at.is_some_and(|p| p < i),
                            "{} references {a}, created later:\n{plan}",
                            op.anchor
                        );
                        edges.entry(op.anchor.clone()).or_default().push(a);
                    }
                }
                position.insert(op.anchor.clone(), i);
            }
            OperationKind::UpdateReferences {
                target: dirsync::delta::TargetRef::Pending(b),
                changes,
            } => {
                for c in changes {
                    for a in pending(&c.values) {
                        edges.entry(b.clone()).or_default().push(a.clone());
                        deferred.push((b.clone(), a));
                    }
                }
            }
            _ => {}
        }
    }
    for (b, a) in deferred {
        // a reaches b: the edge b → a closes a cycle.
        let mut seen = std::collections::HashSet::new();
        let mut stack = vec![a.clone()];
        let mut found = a == b;
        while let Some(x) = stack.pop() {
            if found {
                break;
            }
            for y in edges.get(&x).into_iter().flatten() {
                if *y == b {
                    found = true;
                }
                if seen.insert(y.clone()) {
                    stack.push(y.clone());
                }
            }
        }
        prop_assert!(
            found,
            "the reference {b} → {a} waits, but is on no cycle:\n{plan}"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn apply_then_plan_is_empty_and_plans_are_order_independent(
        users in prop::collection::vec(user_strategy(), 0..25),
        groups in prop::collection::vec(group_strategy(), 0..4),
        preexisting in prop::collection::vec(0u8..12, 0..4),
        edits in prop::collection::vec(edit_strategy(), 0..12),
    ) {
        // One entry per anchor (the generators may repeat ids).
        let mut seen = std::collections::HashSet::new();
        let mut entries: Vec<Entry> = users.iter().filter(|u| seen.insert(u.id)).map(user_entry).collect();
        entries.extend(groups.iter().filter(|g| seen.insert(g.id)).map(group_entry));
        let mut m = mirror_of(&entries);
        let target = MemoryTarget::new("target");
        let mut links = Links::new();
        let mut t = TargetMirror::new().with_index("mail").with_index("displayName");
        for (i, n) in preexisting.iter().enumerate() {
            let o = TargetObject::new(format!("pre{i}"), "User").with("mail", format!("N{n}@X.TEST"));
            target.insert(o.clone());
            t.insert(o);
        }

        // Initial load.
        let p1 = plan(&m, &links, &t, DeletionGuard::off(), PlanScope::All);
        // Order independence: the same content inserted in reverse gives the same plan.
        let mut rev = entries.clone();
        rev.reverse();
        let m_rev = mirror_of(&rev);
        let p1_rev = plan(&m_rev, &links, &t, DeletionGuard::off(), PlanScope::All);
        prop_assert_eq!(serde_json::to_string(&p1).unwrap(), serde_json::to_string(&p1_rev).unwrap());
        // Referenced objects are created first; only cycles wait for a references write.
        check_create_order(&p1)?;
        apply(&p1, &target, &mut links, &mut t);
        let again = plan(&m, &links, &t, DeletionGuard::off(), PlanScope::All);
        prop_assert!(again.is_empty(), "not converged after initial load:\n{}", again);

        // Edits.
        let mut touched = Vec::new();
        for e in &edits {
            let anchor = match e {
                Edit::Rename(a, _) | Edit::Dept(a, _) | Edit::Delete(a) | Edit::Titles(a, _) | Edit::Manager(a, _) => format!("u{a}"),
                Edit::Add(u) => format!("u{}", u.id),
                Edit::Members(g, _) => format!("g{g}"),
            };
            // As the state store does at import: a changed object's referrers are dirty too
            // (found before the change, while a deleted object's DN is still known).
            let referrers: Vec<String> = m.referrers(&anchor.as_str().into()).into_iter().map(|(a, _)| a.to_string()).collect();
            touched.extend(referrers);
            apply_edit(&mut m, e);
            touched.push(anchor);
        }
        let p2 = plan(&m, &links, &t, DeletionGuard::off(), PlanScope::All);
        check_create_order(&p2)?;
        // The projection's fast path (`unchanged`) agrees with projecting and diffing.
        let slow = {
            struct NoFastPath(UserGroupProjection);
            impl Projection for NoFastPath {
                fn project(&self, e: &Entry, ctx: &ProjectionContext<'_>) -> Projected {
                    self.0.project(e, ctx)
                }
                fn deprovision(&self, l: &dirsync::delta::Link, e: Option<&Entry>, c: dirsync::delta::DeprovisionCause) -> dirsync::delta::Deprovision {
                    self.0.deprovision(l, e, c)
                }
            }
            let rules = NoFastPath(UserGroupProjection::default());
            let mut input = PlanInput::new(&rules, &m, &links, &t);
            input.guard = DeletionGuard::off();
            delta::plan(&input)
        };
        prop_assert_eq!(&slow.operations, &p2.operations);
        // An out-of-scope object never gets a create or an update.
        for op in &p2.operations {
            if matches!(op.kind, OperationKind::Create { .. } | OperationKind::Update { .. } | OperationKind::Join { .. }) {
                prop_assert!(!out_of_scope(&m, &op.anchor), "{} is out of scope but got {}", op.anchor, op.kind.name());
            }
        }
        // The delta plan of the dirty anchors — those the edits touched, and those an earlier
        // plan could not place (its issues), as the engine's dirty set keeps them — equals the
        // full plan.
        let mut dirty: Vec<dirsync::model::Anchor> = touched.iter().map(|s| s.as_str().into()).collect();
        for issue in &again.issues {
            match issue {
                dirsync::delta::Issue::DuplicateJoin { anchors, .. } => dirty.extend(anchors.iter().cloned()),
                other => dirty.extend(other.anchor().cloned()),
            }
        }
        let p2_delta = plan(&m, &links, &t, DeletionGuard::off(), PlanScope::Anchors(dirty));
        prop_assert_eq!(&p2_delta.operations, &p2.operations);
        // The guard holds exactly the plans over its threshold.
        let guard = DeletionGuard { enabled: true, max_count: 500, max_ratio: 0.10, floor: 0, ..DeletionGuard::default() };
        let guarded = plan(&m, &links, &t, guard, PlanScope::All);
        let deletions = guarded.operations.iter().filter(|o| o.kind.is_deletion()).count();
        let linked_users = links.count(&"User".into());
        let linked_groups = links.count(&"Group".into());
        let user_del = guarded.operations.iter().filter(|o| o.kind.is_deletion() && o.target_type.is("User")).count();
        let group_del = deletions - user_del;
        let over = user_del > guard.limit(linked_users) || group_del > guard.limit(linked_groups);
        prop_assert_eq!(guarded.is_held(), over);

        apply(&p2, &target, &mut links, &mut t);
        let p3 = plan(&m, &links, &t, DeletionGuard::off(), PlanScope::All);
        prop_assert!(p3.is_empty(), "not converged after edits:\n{}\nfirst:\n{}", p3, p2);
        // The memory target agrees with the mirror the plan was made from.
        prop_assert_eq!(target.len(), t.len());
    }
}

/// A world: its entries (one per anchor), preexisting target objects (by mail number), edits.
fn world_strategy() -> impl Strategy<Value = (Vec<Entry>, Vec<u8>, Vec<Edit>)> {
    (
        prop::collection::vec(user_strategy(), 0..25),
        prop::collection::vec(group_strategy(), 0..4),
        prop::collection::vec(0u8..12, 0..4),
        prop::collection::vec(edit_strategy(), 0..12),
    )
        .prop_map(|(users, groups, preexisting, edits)| {
            let mut seen = std::collections::HashSet::new();
            let mut entries: Vec<Entry> = users
                .iter()
                .filter(|u| seen.insert(u.id))
                .map(user_entry)
                .collect();
            entries.extend(groups.iter().filter(|g| seen.insert(g.id)).map(group_entry));
            (entries, preexisting, edits)
        })
}

/// A guard that holds more than 10 % deletions, even in a small directory.
const GUARD: DeletionGuard = DeletionGuard {
    enabled: true,
    max_count: 500,
    max_ratio: 0.10,
    floor: 0,
    max_container_wave: 5,
};

/// A source with the world's entries, a synchronizer over it (plans in pages of `page`); a
/// SQLite store or the memory store.
fn engine_world(
    entries: &[Entry],
    preexisting: &[u8],
    page: usize,
    sqlite: bool,
) -> (
    dirsync::connector::memory::MemorySource,
    dirsync::engine::Synchronizer,
) {
    let (source, _, sync) = engine_world_with_target(entries, preexisting, page, sqlite);
    (source, sync)
}

/// [`UserGroupProjection`] saying what it reads (nothing of the mirror, never `member_of`):
/// paged runs then plan their pages without the referrers and survey the deprovisions from
/// the dirty objects alone.
struct Alone(UserGroupProjection);

impl Projection for Alone {
    fn project(&self, e: &Entry, ctx: &ProjectionContext<'_>) -> Projected {
        self.0.project(e, ctx)
    }
    fn unchanged(
        &self,
        e: &Entry,
        current: &TargetObject,
        ctx: &ProjectionContext<'_>,
    ) -> Option<bool> {
        self.0.unchanged(e, current, ctx)
    }
    fn reads_member_of(&self) -> bool {
        false
    }
    fn reads_mirror_by_dn(&self) -> bool {
        true
    }
    fn join_attributes(
        &self,
    ) -> Option<
        std::collections::BTreeMap<
            dirsync::model::ObjectType,
            std::collections::BTreeSet<dirsync::model::AttrName>,
        >,
    > {
        self.0.join_attributes()
    }
    fn deprovision(
        &self,
        l: &dirsync::delta::Link,
        e: Option<&Entry>,
        c: dirsync::delta::DeprovisionCause,
    ) -> dirsync::delta::Deprovision {
        self.0.deprovision(l, e, c)
    }
}

/// [`engine_world`], with its target.
fn engine_world_with_target(
    entries: &[Entry],
    preexisting: &[u8],
    page: usize,
    sqlite: bool,
) -> (
    dirsync::connector::memory::MemorySource,
    MemoryTarget,
    dirsync::engine::Synchronizer,
) {
    engine_world_projecting(entries, preexisting, page, sqlite, (false, true))
}

/// [`engine_world_with_target`], the projection [`Alone`] when `alone`, creates looked up in
/// the target when `lookups` (else the dirty objects joining nothing the state does not know
/// of, a paged run surveys only its deprovisions).
fn engine_world_projecting(
    entries: &[Entry],
    preexisting: &[u8],
    page: usize,
    sqlite: bool,
    (alone, lookups): (bool, bool),
) -> (
    dirsync::connector::memory::MemorySource,
    MemoryTarget,
    dirsync::engine::Synchronizer,
) {
    use dirsync::engine::{Clock, EngineConfig, JoinLookup, Synchronizer};
    use std::sync::Arc;
    let source = dirsync::connector::memory::MemorySource::new("src");
    for e in entries {
        source.add(e.clone()).unwrap();
    }
    let target = MemoryTarget::new("target");
    for (i, n) in preexisting.iter().enumerate() {
        target.insert(
            TargetObject::new(format!("pre{i}"), "User").with("mail", format!("N{n}@X.TEST")),
        );
    }
    let store: Box<dyn dirsync::state::StateStore> = if sqlite {
        Box::new(dirsync::state::SqliteStore::open_in_memory().unwrap())
    } else {
        Box::new(dirsync::state::MemoryStore::new())
    };
    let config = EngineConfig {
        clock: Clock::fixed(chrono::DateTime::UNIX_EPOCH),
        guard: GUARD,
        plan_page: page,
        join_lookup: if lookups {
            JoinLookup::default()
        } else {
            JoinLookup::Off
        },
        ..EngineConfig::default()
    };
    let sync = Synchronizer::with_projection(
        Box::new(source.clone()),
        Box::new(target.clone()),
        store,
        if alone {
            Arc::new(Alone(UserGroupProjection::default()))
        } else {
            Arc::new(UserGroupProjection::default())
        },
        config,
    );
    (source, target, sync)
}

/// The target's objects as the source sees them: each by the anchor linked to it (ids differ
/// between runs that create in another order), references by anchor too.
fn target_by_anchor(
    target: &MemoryTarget,
    sync: &dirsync::engine::Synchronizer,
) -> Vec<(String, String, String)> {
    use dirsync::model::Reference;
    let links = sync.with_store(|s| s.load_all().unwrap().links);
    let name = |id: &dirsync::model::TargetId| {
        links
            .anchor_of(id)
            .map_or_else(|| format!("unlinked {id}"), |a| a.to_string())
    };
    let mut out: Vec<(String, String, String)> = target
        .objects()
        .into_iter()
        .map(|o| {
            let attrs: Vec<String> = o
                .attributes
                .iter()
                .map(|(k, vs)| {
                    let mut vs: Vec<String> = vs
                        .iter()
                        .map(|v| match v {
                            Value::Reference(Reference::Target(id)) => format!("-> {}", name(id)),
                            other => format!("{other:?}"),
                        })
                        .collect();
                    vs.sort();
                    format!("{k}={vs:?}")
                })
                .collect();
            (name(&o.id), o.object_type.to_string(), attrs.join(";"))
        })
        .collect();
    out.sort();
    out
}

/// Applies `edits` to the source.
fn edit_source(source: &dirsync::connector::memory::MemorySource, edits: &[Edit]) {
    let mut m = mirror_of(&source.entries());
    for e in edits {
        apply_edit(&mut m, e);
    }
    for e in source.entries() {
        if m.get(&e.anchor).is_none() {
            source.delete(&e.anchor).unwrap();
        }
    }
    for e in m.entries() {
        if source.get(&e.anchor).as_ref() != Some(e) {
            source.upsert(e.clone()).unwrap();
        }
    }
}

/// The plan the planner makes from the whole store (every entry, link and target object at
/// once), with the engine's settings.
fn whole_plan(sync: &dirsync::engine::Synchronizer) -> Plan {
    sync.with_store(|s| {
        let views = s.load_all().unwrap();
        let counts = s.link_counts().unwrap();
        assert_eq!(
            counts.values().sum::<usize>(),
            views.links.len(),
            "the store's link counts"
        );
        let rules = UserGroupProjection::default();
        let mut input = PlanInput::new(&rules, &views.mirror, &views.links, &views.target);
        input.guard = GUARD;
        input.seed = sync.config().seed;
        delta::plan(&input)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// A full plan made page by page from the store (pages of 1 to 6 objects) is the plan the
    /// planner makes from the whole store, byte for byte: at the initial load, after edits
    /// (creates, renames, leavers, deletes, memberships, managers; held by the guard or not).
    #[test]
    fn full_plans_in_pages_are_the_whole_plan(
        (entries, preexisting, edits) in world_strategy(),
        page in 1usize..7,
        sqlite in any::<bool>(),
    ) {
        let (source, mut sync) = engine_world(&entries, &preexisting, page, sqlite);

        futures::executor::block_on(sync.full_import()).unwrap();
        // Before anything is linked (the target mirror holds nothing yet: no joins), then
        // with the target's objects looked up (joins).
        let json = |p: &Plan| serde_json::to_string(p).unwrap();
        prop_assert_eq!(json(&sync.plan(true).unwrap().plan), json(&whole_plan(&sync)));
        futures::executor::block_on(sync.full_sync()).unwrap();
        prop_assert_eq!(json(&sync.plan(true).unwrap().plan), json(&whole_plan(&sync)));

        // Edits at the source, imported.
        edit_source(&source, &edits);
        futures::executor::block_on(sync.delta_import()).unwrap();
        prop_assert_eq!(json(&sync.plan(true).unwrap().plan), json(&whole_plan(&sync)));
        // The export of the paged plan converges: nothing left to do, page by page or whole.
        sync.allow_deletions_once();
        futures::executor::block_on(sync.full_sync()).unwrap();
        let after = sync.plan(true).unwrap().plan;
        prop_assert_eq!(json(&after), json(&whole_plan(&sync)));
        prop_assert!(after.operations.is_empty(), "not converged:\n{}", after);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Runs whose dirty set is planned and exported in pages of 1 to 4 objects end where runs
    /// of one plan do: the same target objects (by the anchors linked to them), the same
    /// references, nothing left dirty, nothing left to do — after the initial load and after
    /// edits.
    #[test]
    fn paged_runs_end_where_unpaged_runs_do(
        (entries, preexisting, edits) in world_strategy(),
        page in 1usize..5,
        sqlite in any::<bool>(),
        lookups in any::<bool>(),
    ) {
        let (paged_source, paged_target, mut paged) = engine_world_projecting(&entries, &preexisting, page, sqlite, (false, lookups));
        let (whole_source, whole_target, mut whole) = engine_world_projecting(&entries, &preexisting, 10_000, sqlite, (false, lookups));
        // The same pages under a projection that says it reads neither `member_of` nor the
        // mirror: planned without their referrers, surveyed from the dirty objects alone —
        // the same runs, operation for operation.
        let (alone_source, alone_target, mut alone) = engine_world_projecting(&entries, &preexisting, page, sqlite, (true, lookups));
        let block = |s: &mut dirsync::engine::Synchronizer| {
            s.allow_deletions_once();
            futures::executor::block_on(s.run_cycle()).unwrap()
        };
        let held = |s: &mut dirsync::engine::Synchronizer| {
            futures::executor::block_on(s.run_cycle()).unwrap()
        };
        for round in 0..2 {
            if round == 1 {
                edit_source(&paged_source, &edits);
                edit_source(&whole_source, &edits);
                edit_source(&alone_source, &edits);
            }
            // Without leave to delete, the guard holds the same runs (seeing every page's
            // deprovisions first), and they export nothing.
            let (hp, ha) = (held(&mut paged), held(&mut alone));
            prop_assert_eq!(hp.held, ha.held, "round {}", round);
            prop_assert_eq!(&hp.guard_violations, &ha.guard_violations, "round {}", round);
            prop_assert_eq!(&hp.done, &ha.done, "round {}", round);
            let (p, w, a) = (block(&mut paged), block(&mut whole), block(&mut alone));
            prop_assert!(p.failures.is_empty() && w.failures.is_empty(), "{:?} {:?}", p.failures, w.failures);
            prop_assert_eq!(target_by_anchor(&paged_target, &paged), target_by_anchor(&whole_target, &whole), "round {}", round);
            prop_assert_eq!((&p.done, p.planned), (&a.done, a.planned), "round {}", round);
            prop_assert_eq!(target_by_anchor(&alone_target, &alone), target_by_anchor(&paged_target, &paged), "round {}", round);
            // One more run changes nothing either way, and nothing is left to do.
            block(&mut paged);
            block(&mut whole);
            block(&mut alone);
            prop_assert_eq!(target_by_anchor(&paged_target, &paged), target_by_anchor(&whole_target, &whole), "round {}, converged", round);
            prop_assert_eq!(target_by_anchor(&alone_target, &alone), target_by_anchor(&paged_target, &paged), "round {}, converged", round);
            let left = paged.plan(true).unwrap().plan;
            prop_assert!(left.operations.is_empty(), "round {}: not converged:\n{}", round, left);
            prop_assert!(paged.with_store(|s| s.dirty().unwrap()).is_empty() == whole.with_store(|s| s.dirty().unwrap()).is_empty());
        }
    }
}
