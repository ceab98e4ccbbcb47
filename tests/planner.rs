//! Planner behaviour, end to end through the in-memory target.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use dirsync::connector::memory::MemoryTarget;
use dirsync::delta::{
    self, DeletionGuard, Deprovision, DeprovisionCause, Desired, Flow, Issue, JoinGroup, Link,
    Links, OperationKind, Phase, Plan, PlanInput, PlanScope, Projected, Projection,
    ProjectionContext, Reason, SnapshotDiff, SourceMirror, TargetMirror, TargetRef,
};
use dirsync::model::{values, Change, ChangeOp, Dn, Entry, Reference, TargetObject, Value, Values};
use dirsync::testkit::{self, UserGroupProjection};

struct World {
    mirror: SourceMirror,
    links: Links,
    target: TargetMirror,
    memory: MemoryTarget,
}

impl World {
    fn new(entries: Vec<Entry>) -> World {
        let mut mirror = SourceMirror::new();
        for e in entries {
            mirror.insert(e);
        }
        World {
            mirror,
            links: Links::new(),
            target: TargetMirror::new()
                .with_index("mail")
                .with_index("displayName"),
            memory: MemoryTarget::new("target"),
        }
    }

    fn plan_with(&self, p: &dyn Projection, scope: PlanScope) -> Plan {
        let mut input = PlanInput::new(p, &self.mirror, &self.links, &self.target);
        input.scope = scope;
        delta::plan(&input)
    }

    fn plan(&self) -> Plan {
        self.plan_with(&UserGroupProjection::default(), PlanScope::All)
    }

    fn apply(&mut self, plan: &Plan) {
        let report = futures::executor::block_on(testkit::export(
            plan,
            &self.memory,
            &mut self.links,
            &mut self.target,
        ));
        assert!(report.failed.is_empty(), "{:?}", report.failed);
    }

    /// Seeds an object that exists in the target before any sync.
    fn seed_target(&mut self, o: TargetObject) {
        self.memory.insert(o.clone());
        self.target.insert(o);
    }
}

fn dn(s: &str) -> Dn {
    Dn::parse(s).unwrap()
}

fn user(a: &str, cn: &str, dept: &str) -> Entry {
    Entry::new(a, "user")
        .with_dn(dn(&format!("cn={cn},ou=People,dc=x")))
        .with("cn", cn)
        .with("mail", format!("{}@x.test", cn.to_lowercase()))
        .with("department", dept)
}

fn group(a: &str, cn: &str, members: &[&str]) -> Entry {
    Entry::new(a, "group")
        .with_dn(dn(&format!("cn={cn},ou=Groups,dc=x")))
        .with("cn", cn)
        .with_values(
            "member",
            members
                .iter()
                .map(|m| Value::dn_ref(dn(&format!("cn={m},ou=People,dc=x"))))
                .collect::<Vec<_>>(),
        )
}

fn kinds(plan: &Plan) -> Vec<(&str, &str)> {
    plan.operations
        .iter()
        .map(|o| (o.kind.name(), o.anchor.as_str()))
        .collect()
}

#[test]
fn initial_load_creates_members_first_with_the_references_in_the_create() {
    let mut w = World::new(vec![
        user("u1", "Ann", "Eng"),
        user("u2", "Bob", "Eng"),
        group("g1", "Staff", &["Ann", "Bob"]),
    ]);
    let plan = w.plan();
    // The members first, then the group, whose create names them: no references write.
    assert_eq!(
        kinds(&plan),
        [("create", "u1"), ("create", "u2"), ("create", "g1")]
    );
    assert!(plan.operations.iter().all(|o| o.phase() == Phase::Create));
    let OperationKind::Create { attributes, .. } = &plan.operations[2].kind else {
        panic!("{plan}")
    };
    assert_eq!(
        attributes.get("member").unwrap()[..],
        [
            Value::Reference(Reference::Pending("u1".into())),
            Value::Reference(Reference::Pending("u2".into()))
        ]
    );
    w.apply(&plan);
    assert_eq!(w.memory.applied().len(), 3, "one write per object");
    // References were resolved at export: the group holds the users' target ids.
    let g = w
        .target
        .get(&w.links.get(&"g1".into()).unwrap().target_id)
        .unwrap();
    let members: Vec<_> = g
        .attributes
        .get("member")
        .unwrap()
        .iter()
        .filter_map(testkit::target_ref)
        .cloned()
        .collect();
    let id = |a: &str| w.links.get(&a.into()).unwrap().target_id.clone();
    assert_eq!(members, [id("u1"), id("u2")]);
    assert_eq!(w.memory.len(), 3);
    let again = w.plan();
    assert!(again.is_empty(), "{again}");
    assert_eq!(again.stats.unchanged, 3);
}

/// A user whose `manager` is the user `manager` names (cn).
fn managed(a: &str, cn: &str, manager: &str) -> Entry {
    user(a, cn, "Eng").with(
        "manager",
        Value::dn_ref(dn(&format!("cn={manager},ou=People,dc=x"))),
    )
}

fn pending(values: &Values) -> Vec<&str> {
    values
        .iter()
        .filter_map(|v| match v {
            Value::Reference(Reference::Pending(a)) => Some(a.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn managers_come_first_and_only_a_cycle_waits_for_a_references_write() {
    // Cy reports to Bob who reports to Ann; Dee and Eve manage each other; Fay manages herself.
    let mut w = World::new(vec![
        managed("u3", "Cy", "Bob"),
        managed("u2", "Bob", "Ann"),
        user("u1", "Ann", "Eng"),
        managed("u4", "Dee", "Eve"),
        managed("u5", "Eve", "Dee"),
        managed("u6", "Fay", "Fay"),
        group("g1", "Staff", &["Cy", "Dee"]),
    ]);
    let plan = w.plan();
    assert_eq!(
        kinds(&plan),
        [
            // Level 0: no manager, or the edge that closes a cycle left out.
            ("create", "u1"),
            ("create", "u5"),
            ("create", "u6"),
            // Level 1, 2, 3.
            ("create", "u2"),
            ("create", "u4"),
            ("create", "u3"),
            ("create", "g1"),
            // The cycles' edges, after every create.
            ("references", "u5"),
            ("references", "u6"),
        ],
        "{plan}"
    );
    let create_refs = |i: usize| -> Vec<&str> {
        let OperationKind::Create { attributes, .. } = &plan.operations[i].kind else {
            panic!()
        };
        attributes.iter().flat_map(|(_, vs)| pending(vs)).collect()
    };
    assert_eq!(create_refs(3), ["u1"]);
    assert_eq!(create_refs(4), ["u5"]);
    assert_eq!(create_refs(6), ["u3", "u4"]);
    assert!(create_refs(1).is_empty() && create_refs(2).is_empty());
    for (i, (referrer, manager)) in [(7, ("u5", "u4")), (8, ("u6", "u6"))] {
        let op = &plan.operations[i];
        let OperationKind::UpdateReferences { target, changes } = &op.kind else {
            panic!("{plan}")
        };
        assert_eq!(target, &TargetRef::Pending(referrer.into()));
        assert_eq!(changes.len(), 1);
        assert_eq!(
            (changes[0].op, pending(&changes[0].values)),
            (ChangeOp::Replace, vec![manager])
        );
    }
    w.apply(&plan);
    // 7 objects, 2 edges on cycles: 9 writes.
    assert_eq!(w.memory.applied().len(), 9);
    let manager_of = |a: &str| {
        let o = w
            .target
            .get(&w.links.get(&a.into()).unwrap().target_id)
            .unwrap();
        let m = o.attributes.get("manager").unwrap()[0].clone();
        let id = testkit::target_ref(&m).unwrap().clone();
        w.links.anchor_of(&id).unwrap().to_string()
    };
    assert_eq!(
        ["u2", "u3", "u4", "u5", "u6"].map(manager_of),
        ["u1", "u2", "u5", "u4", "u6"]
    );
    assert!(w.plan().is_empty());
}

#[test]
fn a_target_that_takes_no_reference_in_a_create_gets_them_all_afterwards() {
    let mut w = World::new(vec![user("u1", "Ann", "Eng")]);
    let p = w.plan();
    w.apply(&p);
    w.mirror.insert(user("u2", "Bob", "Eng"));
    w.mirror.insert(group("g1", "Staff", &["Ann", "Bob"]));
    let plan_for = |create_references| {
        let rules = UserGroupProjection::default();
        let mut input = PlanInput::new(&rules, &w.mirror, &w.links, &w.target);
        input.create_references = create_references;
        delta::plan(&input)
    };
    // Graph's capability: a group's `members` may go in its create, nothing else.
    let only = delta::CreateReferences::Only(vec![("Group".into(), "member".into())]);
    assert_eq!(kinds(&plan_for(only)), [("create", "u2"), ("create", "g1")]);
    // None: the create carries no reference, existing or new; one write adds them after.
    let plan = plan_for(delta::CreateReferences::None);
    assert_eq!(
        kinds(&plan),
        [("create", "g1"), ("create", "u2"), ("references", "g1")]
    );
    let OperationKind::Create { attributes, .. } = &plan.operations[0].kind else {
        panic!()
    };
    assert!(attributes.get("member").is_none(), "{plan}");
    let OperationKind::UpdateReferences { changes, .. } = &plan.operations[2].kind else {
        panic!()
    };
    let u1 = w.links.get(&"u1".into()).unwrap().target_id.clone();
    assert_eq!(
        changes[0].values[..],
        [
            Value::Reference(Reference::Target(u1)),
            Value::Reference(Reference::Pending("u2".into()))
        ]
    );
    w.apply(&plan);
    assert!(w.plan().is_empty());
}

#[test]
fn membership_changes_are_value_level_not_replace() {
    let mut w = World::new(vec![
        user("u1", "Ann", "Eng"),
        user("u2", "Bob", "Eng"),
        user("u3", "Cy", "Eng"),
        group("g1", "Staff", &["Ann", "Bob"]),
    ]);
    let p = w.plan();
    w.apply(&p);
    w.mirror.insert(group("g1", "Staff", &["Bob", "Cy"]));
    let plan = w.plan();
    assert_eq!(kinds(&plan), [("references", "g1")]);
    let OperationKind::UpdateReferences { changes, .. } = &plan.operations[0].kind else {
        panic!()
    };
    let ops: Vec<_> = changes.iter().map(|c| (c.op, c.values.len())).collect();
    assert_eq!(ops, [(ChangeOp::Add, 1), (ChangeOp::Remove, 1)]);
    w.apply(&plan);
    assert!(w.plan().is_empty());
}

#[test]
fn rename_updates_with_old_and_new_values() {
    let mut w = World::new(vec![user("u1", "Ann", "Eng")]);
    let p = w.plan();
    w.apply(&p);
    w.mirror
        .insert(user("u1", "Ann", "Eng").with_values("cn", values(["Anna"])));
    let plan = w.plan();
    assert_eq!(kinds(&plan), [("update", "u1")]);
    let op = &plan.operations[0];
    assert_eq!(
        op.reason,
        Reason::AttributesChanged {
            attributes: vec!["cn".into(), "displayName".into()]
        }
    );
    let OperationKind::Update { changes, .. } = &op.kind else {
        panic!()
    };
    assert_eq!(changes[0].old, values(["Ann"]));
    assert_eq!(changes[0].values, values(["Anna"]));
    let table = plan.to_string();
    assert!(table.contains("cn: Ann → Anna"), "{table}");
    w.apply(&plan);
    assert!(w.plan().is_empty());
}

#[test]
fn leaving_scope_disables_users_and_deletes_groups_once() {
    let mut w = World::new(vec![
        user("u1", "Ann", "Eng"),
        user("u2", "Bob", "Eng"),
        group("g1", "Staff", &["Ann"]),
    ]);
    let p = w.plan();
    w.apply(&p);
    w.mirror.insert(user("u1", "Ann", "Former"));
    w.mirror.remove(&"g1".into());
    let rules = UserGroupProjection::default();
    let mut input = PlanInput::new(&rules, &w.mirror, &w.links, &w.target);
    input.guard = DeletionGuard::off();
    let plan = delta::plan(&input);
    assert_eq!(kinds(&plan), [("delete", "g1"), ("disable", "u1")]);
    assert_eq!(plan.operations[0].reason, Reason::DeletedAtSource);
    assert!(
        matches!(&plan.operations[1].reason, Reason::LeftScope { why, .. } if why.contains("Former"))
    );
    w.apply(&plan);
    // The disabled user stays linked; planning again does nothing; an out-of-scope object
    // gets no update even if it changes.
    w.mirror
        .insert(user("u1", "Ann", "Former").with_values("cn", values(["Ann Z"])));
    let mut input = PlanInput::new(&rules, &w.mirror, &w.links, &w.target);
    input.guard = DeletionGuard::off();
    let again = delta::plan(&input);
    assert!(again.is_empty(), "{again}");
    assert!(w.links.get(&"u1".into()).is_some());
    assert!(w.links.get(&"g1".into()).is_none());
}

#[test]
fn guard_holds_mass_deletion() {
    let entries: Vec<Entry> = (0..200)
        .map(|i| user(&format!("u{i:03}"), &format!("U{i:03}"), "Eng"))
        .collect();
    let mut w = World::new(entries);
    let p = w.plan();
    w.apply(&p);
    for i in 0..21 {
        w.mirror.remove(&format!("u{i:03}").as_str().into());
    }
    let plan = w.plan();
    assert_eq!(plan.count("disable"), 21);
    assert!(plan.is_held());
    let v = &plan.guard_violations[0];
    assert_eq!((v.deletions, v.linked, v.limit), (21, 200, 20));
    assert!(plan.to_string().contains("HELD: deletion guard: 21 of 200"));
    // Twenty deletions are within 10 % of 200.
    w.mirror.insert(user("u000", "U000", "Eng"));
    assert!(!w.plan().is_held());
}

/// The share applies above a floor: a directory of two users can lose one (today's guard held
/// "1 of 2 linked User objects … the limit is 0"), ten deletions go through whatever the size,
/// and a large wave is still held.
#[test]
fn guard_floor_lets_small_directories_delete_and_still_holds_waves() {
    let users = |n: usize| -> Vec<Entry> {
        (0..n)
            .map(|i| user(&format!("u{i:03}"), &format!("U{i:03}"), "Eng"))
            .collect()
    };
    let plan_with = |w: &World, guard: DeletionGuard| {
        let rules = UserGroupProjection::default();
        let mut input = PlanInput::new(&rules, &w.mirror, &w.links, &w.target);
        input.guard = guard;
        delta::plan(&input)
    };
    // Two users, one leaves.
    let mut small = World::new(users(2));
    let p = small.plan();
    small.apply(&p);
    small.mirror.remove(&"u001".into());
    let plan = small.plan();
    assert_eq!(plan.count("disable"), 1);
    assert!(!plan.is_held(), "{plan}");
    let no_floor = DeletionGuard {
        floor: 0,
        ..DeletionGuard::default()
    };
    let old = plan_with(&small, no_floor);
    assert!(old.is_held());
    assert!(
        old.to_string()
            .contains("1 of 2 linked User objects would be deleted or disabled; the limit is 0"),
        "{old}"
    );
    small.apply(&plan);
    assert!(small.plan().is_empty());

    // Thirty users: ten leave (the floor), then an eleventh makes a wave.
    let mut w = World::new(users(30));
    let p = w.plan();
    w.apply(&p);
    for i in 0..11 {
        w.mirror.remove(&format!("u{i:03}").as_str().into());
    }
    let plan = w.plan();
    assert!(plan.is_held(), "{plan}");
    assert_eq!(
        plan.guard_violations[0].to_string(),
        "deletion guard: 11 of 30 linked User objects would be deleted or disabled; the limit is 10"
    );
    w.mirror.insert(user("u000", "U000", "Eng"));
    assert!(!w.plan().is_held());
    // The count still caps the floor.
    let strict = DeletionGuard {
        max_count: 5,
        ..DeletionGuard::default()
    };
    assert!(plan_with(&w, strict).is_held());
}

#[test]
fn joins_existing_objects_by_group_order_and_reports_conflicts() {
    let mut w = World::new(vec![user("u1", "Ann", "Eng"), user("u2", "Bob", "Eng")]);
    // Ann's mail matches exactly one target object: joined, not created.
    w.seed_target(TargetObject::new("pre-1", "User").with("mail", "ANN@x.test"));
    // Bob's mail matches two: a conflict, neither joined nor created.
    w.seed_target(TargetObject::new("pre-2", "User").with("mail", "bob@x.test"));
    w.seed_target(TargetObject::new("pre-3", "User").with("mail", "bob@x.test"));
    let plan = w.plan();
    assert_eq!(kinds(&plan), [("join", "u1")]);
    assert!(matches!(
        &plan.operations[0].reason,
        Reason::Joined { group: 0, .. }
    ));
    assert!(
        matches!(&plan.issues[0], Issue::JoinConflict { anchor, candidates, .. } if anchor.as_str() == "u2" && candidates.len() == 2)
    );
    w.apply(&plan);
    assert_eq!(
        w.links.get(&"u1".into()).unwrap().target_id.as_str(),
        "pre-1"
    );
    // The join brought the attributes in line; the link is sticky.
    assert_eq!(
        w.target
            .get(&"pre-1".into())
            .unwrap()
            .attributes
            .first_str("cn"),
        Some("Ann")
    );
    let again = w.plan();
    assert_eq!(kinds(&again), Vec::<(&str, &str)>::new());
    assert_eq!(again.issues.len(), 1);
}

#[test]
fn two_sources_joining_one_target_join_neither() {
    let w = {
        let mut w = World::new(vec![
            user("u1", "Ann", "Eng"),
            user("u2", "Ann2", "Eng").with_values("mail", values(["ann@x.test"])),
        ]);
        w.seed_target(TargetObject::new("pre-1", "User").with("mail", "ann@x.test"));
        w
    };
    let plan = w.plan();
    assert!(plan.is_empty(), "{plan}");
    assert!(matches!(&plan.issues[0], Issue::DuplicateJoin { anchors, .. } if anchors.len() == 2));
}

#[test]
fn unresolvable_references_are_reported_not_dropped_silently() {
    let w = World::new(vec![
        user("u1", "Ann", "Eng"),
        group("g1", "Staff", &["Ann", "Ghost"]),
    ]);
    let plan = w.plan();
    assert!(plan.issues.iter().any(|i| matches!(i, Issue::UnresolvedReference { anchor, reference, .. } if anchor.as_str() == "g1" && reference.contains("Ghost"))));
    // The resolvable member still flows, in the group's create.
    let OperationKind::Create { attributes, .. } = &plan.operations[1].kind else {
        panic!("{plan}")
    };
    assert_eq!(pending(attributes.get("member").unwrap()), ["u1"]);
}

#[test]
fn references_to_existing_objects_go_inline_in_the_create() {
    let mut w = World::new(vec![user("u1", "Ann", "Eng")]);
    let p = w.plan();
    w.apply(&p);
    w.mirror.insert(group("g1", "Staff", &["Ann"]));
    let plan = w.plan_with(
        &UserGroupProjection::default(),
        PlanScope::Anchors(vec!["g1".into()]),
    );
    assert_eq!(kinds(&plan), [("create", "g1")]);
    let OperationKind::Create { attributes, .. } = &plan.operations[0].kind else {
        panic!()
    };
    let u1 = w.links.get(&"u1".into()).unwrap().target_id.clone();
    assert_eq!(
        attributes.get("member").unwrap()[0],
        Value::Reference(Reference::Target(u1))
    );
}

/// A page of a paged run (`unlinked_referrers: false`) plans the linked objects referencing
/// its creates (their references gain the new object), not the unlinked ones (they have their
/// own page, which finds the new object linked); the two pages end where one plan does.
#[test]
fn a_page_leaves_unlinked_referrers_to_their_own_page() {
    let mut w = World::new(vec![
        user("boss", "Bea", "Former"),
        managed("old", "Olaf", "Bea"),
        managed("new", "Nina", "Bea"),
    ]);
    w.mirror.remove(&"new".into());
    let p = w.plan();
    w.apply(&p);
    // Bea enters scope and Nina arrives: both dirty, in two pages.
    w.mirror.insert(user("boss", "Bea", "Eng"));
    w.mirror.insert(managed("new", "Nina", "Bea"));
    let rules = UserGroupProjection::default();
    let page = |w: &World, anchor: &str, unlinked_referrers: bool| {
        let mut input = PlanInput::new(&rules, &w.mirror, &w.links, &w.target);
        input.scope = PlanScope::Anchors(vec![anchor.into()]);
        input.unlinked_referrers = unlinked_referrers;
        delta::plan(&input)
    };
    // As one delta plan: Nina is created with Bea as her pending manager.
    assert_eq!(
        kinds(&page(&w, "boss", true)),
        [("create", "boss"), ("create", "new"), ("references", "old")]
    );
    let first = page(&w, "boss", false);
    assert_eq!(kinds(&first), [("create", "boss"), ("references", "old")]);
    w.apply(&first);
    let second = page(&w, "new", false);
    assert_eq!(kinds(&second), [("create", "new")]);
    let OperationKind::Create { attributes, .. } = &second.operations[0].kind else {
        unreachable!()
    };
    assert!(attributes
        .get("manager")
        .is_some_and(|v| testkit::target_ref(&v[0]).is_some()));
    w.apply(&second);
    assert!(w.plan().is_empty());
}

#[test]
fn delta_scope_plans_the_referrers_of_changed_anchors() {
    let mut w = World::new(vec![
        user("u1", "Ann", "Former"),
        group("g1", "Staff", &["Ann"]),
    ]);
    let p = w.plan();
    w.apply(&p);
    // Ann enters scope: the delta names only u1, but g1 references her and must gain a member.
    w.mirror.insert(user("u1", "Ann", "Eng"));
    let plan = w.plan_with(
        &UserGroupProjection::default(),
        PlanScope::Anchors(vec!["u1".into()]),
    );
    assert_eq!(kinds(&plan), [("create", "u1"), ("references", "g1")]);
    w.apply(&plan);
    assert!(w.plan().is_empty());
}

#[test]
fn on_create_flows_are_not_reapplied_and_secrets_never_show() {
    let mut w = World::new(vec![
        user("u1", "Ann", "Eng").with("initialPassword", "S3cret!pw")
    ]);
    let plan = w.plan();
    let shown = format!("{plan}\n{}", serde_json::to_string(&plan).unwrap());
    assert!(!shown.contains("S3cret!pw"), "{shown}");
    assert!(shown.contains("password = (redacted)"));
    w.apply(&plan);
    // The secret reached the target.
    let id = w.links.get(&"u1".into()).unwrap().target_id.clone();
    assert_eq!(
        w.memory
            .get_object(&id)
            .unwrap()
            .attributes
            .first_str("password"),
        Some("S3cret!pw")
    );
    w.mirror
        .insert(user("u1", "Ann", "Eng").with("initialPassword", "Other!pw1"));
    assert!(w.plan().is_empty());
}

#[test]
fn missing_target_object_is_recreated_and_deleted_one_unlinked() {
    let mut w = World::new(vec![user("u1", "Ann", "Eng"), group("g1", "G", &[])]);
    let p = w.plan();
    w.apply(&p);
    let uid = w.links.get(&"u1".into()).unwrap().target_id.clone();
    let gid = w.links.get(&"g1".into()).unwrap().target_id.clone();
    w.target.remove(&uid);
    w.target.remove(&gid);
    w.mirror.remove(&"g1".into());
    let plan = w.plan();
    assert_eq!(kinds(&plan), [("create", "u1"), ("unlink", "g1")]);
    assert_eq!(plan.operations[0].reason, Reason::TargetMissing);
}

#[test]
fn plan_is_deterministic_and_serializes() {
    let entries = testkit::directory(200, 8, 10, 30, 7);
    let mut w1 = World::new(entries.clone());
    let mut rev = entries;
    rev.reverse();
    let w2 = World::new(rev);
    let (p1, p2) = (w1.plan(), w2.plan());
    let j1 = serde_json::to_string(&p1).unwrap();
    assert_eq!(j1, serde_json::to_string(&p2).unwrap());
    let back: Plan = serde_json::from_str(&j1).unwrap();
    assert_eq!(back, p1);
    w1.apply(&p1);
    assert!(w1.plan().is_empty());
}

#[test]
fn snapshot_diff_gives_adds_modifies_moves_and_deletes() {
    let mut mirror = SourceMirror::new();
    mirror.insert(user("u1", "Ann", "Eng"));
    mirror.insert(user("u2", "Bob", "Eng"));
    mirror.insert(group("g1", "Staff", &["Ann", "Bob"]));
    let mut diff = SnapshotDiff::new(&mirror);
    let mut moved = user("u1", "Ann", "Eng");
    moved.dn = Some(dn("cn=Ann,ou=Alumni,dc=x"));
    diff.push(moved);
    diff.push(group("g1", "Staff", &["Ann"]));
    diff.push(user("u3", "Cy", "Eng"));
    let changes = diff.finish();
    let summary: Vec<String> = changes
        .iter()
        .map(|c| match c {
            Change::Add(e) => format!("add {}", e.anchor),
            Change::Modify {
                anchor, changes, ..
            } => {
                format!(
                    "modify {anchor} {:?}",
                    changes
                        .iter()
                        .map(|c| (c.op, c.values.len()))
                        .collect::<Vec<_>>()
                )
            }
            Change::Move { anchor, new_dn, .. } => format!("move {anchor} {new_dn}"),
            Change::Delete { anchor, .. } => format!("delete {anchor}"),
            Change::Replace(e) => format!("replace {}", e.anchor),
        })
        .collect();
    assert_eq!(
        summary,
        [
            "modify g1 [(Remove, 1)]",
            "move u1 cn=Ann,ou=Alumni,dc=x",
            "delete u2",
            "add u3"
        ]
    );
    for c in &changes {
        mirror.apply(c);
    }
    assert_eq!(mirror.len(), 3);
    assert_eq!(
        mirror
            .anchor_of(&dn("cn=ann,ou=alumni,dc=x"))
            .map(|a| a.as_str()),
        Some("u1")
    );
}

#[test]
fn projection_failures_and_holds_are_data() {
    struct Picky;
    impl Projection for Picky {
        fn project(&self, e: &Entry, _: &ProjectionContext<'_>) -> Projected {
            match e.anchor.as_str() {
                "bad" => Projected::Failed(dirsync::delta::ProjectionError {
                    rule: Some("users".into()),
                    attribute: Some("mail".into()),
                    message: "Item: index 0 is out of range".into(),
                }),
                "held" => Projected::Held("no unique userName is free".into()),
                _ => Projected::InScope(
                    Desired::new("User")
                        .flow(Flow::new("x", Values::one("1")))
                        .join_on(JoinGroup::on("x", "nope")),
                ),
            }
        }
        fn deprovision(&self, _: &Link, _: Option<&Entry>, _: DeprovisionCause) -> Deprovision {
            Deprovision::Unlink
        }
    }
    let w = World::new(vec![
        Entry::new("bad", "user"),
        Entry::new("held", "user"),
        Entry::new("ok", "user"),
    ]);
    let plan = w.plan_with(&Picky, PlanScope::All);
    assert_eq!(kinds(&plan), [("create", "ok")]);
    let text: Vec<String> = plan.issues.iter().map(|i| i.to_string()).collect();
    assert_eq!(
        text,
        [
            "bad: rule users: attribute mail: Item: index 0 is out of range",
            "held: held: no unique userName is free"
        ]
    );
}

/// [`UserGroupProjection`], but users who leave scope are deleted (not disabled).
struct DeleteUsers(UserGroupProjection);

impl Projection for DeleteUsers {
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
    fn deprovision(&self, _: &Link, _: Option<&Entry>, _: DeprovisionCause) -> Deprovision {
        Deprovision::Delete
    }
}

/// The target ids an object's attribute holds in the target mirror.
fn target_refs(w: &World, anchor: &str, attr: &str) -> Vec<String> {
    let id = &w.links.get(&anchor.into()).unwrap().target_id;
    let mut out: Vec<String> = w
        .target
        .get(id)
        .unwrap()
        .attributes
        .get(attr)
        .map(|vs| {
            vs.iter()
                .filter_map(testkit::target_ref)
                .map(|t| t.to_string())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn a_deleted_target_object_leaves_its_referrers_in_the_same_plan() {
    // Delta (only the leaving object named) and full (its referrers found unchanged by the
    // projection's fast path against the old link) plans alike.
    for full in [false, true] {
        let rules = DeleteUsers(UserGroupProjection::default());
        let mut w = World::new(vec![
            user("u1", "Ann", "Eng"),
            user("u2", "Bob", "Eng").with("manager", Value::dn_ref(dn("cn=Ann,ou=People,dc=x"))),
            group("g1", "Staff", &["Ann", "Bob"]),
        ]);
        let p = w.plan_with(&rules, PlanScope::All);
        w.apply(&p);
        let ann = w.links.get(&"u1".into()).unwrap().target_id.to_string();
        let bob = w.links.get(&"u2".into()).unwrap().target_id.to_string();
        assert_eq!(target_refs(&w, "u2", "manager"), [ann.as_str()]);
        // Ann leaves scope: her target object is deleted.
        w.mirror.insert(user("u1", "Ann", "Former"));
        let scope = if full {
            PlanScope::All
        } else {
            PlanScope::Anchors(vec!["u1".into()])
        };
        let mut input = PlanInput::new(&rules, &w.mirror, &w.links, &w.target);
        input.scope = scope;
        input.guard = DeletionGuard::off();
        let plan = delta::plan(&input);
        assert_eq!(
            kinds(&plan),
            [("references", "g1"), ("references", "u2"), ("delete", "u1")],
            "full: {full}\n{plan}"
        );
        assert!(plan.issues.is_empty(), "{plan}");
        assert_eq!(plan.stats.out_of_scope_references, 2, "full: {full}");
        w.apply(&plan);
        assert_eq!(target_refs(&w, "g1", "member"), [bob.as_str()]);
        assert!(target_refs(&w, "u2", "manager").is_empty());
        let again = w.plan_with(&rules, PlanScope::All);
        assert!(again.is_empty() && again.issues.is_empty(), "{again}");
        assert_eq!(again.stats.out_of_scope_references, 2);
    }
}

#[test]
fn a_recreated_target_object_gets_its_referrers_back() {
    let rules = UserGroupProjection::default();
    let mut w = World::new(vec![
        user("u1", "Ann", "Eng"),
        user("u2", "Bob", "Eng").with("manager", Value::anchor_ref("u1")),
        group("g1", "Staff", &["Ann", "Bob"]),
    ]);
    let p = w.plan();
    w.apply(&p);
    // Ann's target object is gone (deleted by hand, found by a reconcile).
    let old = w.links.get(&"u1".into()).unwrap().target_id.clone();
    w.target.remove(&old);
    let plan = w.plan_with(&rules, PlanScope::All);
    assert_eq!(
        kinds(&plan),
        [("create", "u1"), ("references", "g1"), ("references", "u2")],
        "{plan}"
    );
    w.apply(&plan);
    let new = w.links.get(&"u1".into()).unwrap().target_id.to_string();
    assert_ne!(new, old.to_string());
    assert_eq!(target_refs(&w, "u2", "manager"), [new.as_str()]);
    assert!(target_refs(&w, "g1", "member").contains(&new));
    assert!(!target_refs(&w, "g1", "member").contains(&old.to_string()));
    assert!(w.plan().is_empty());
}

#[test]
fn out_of_scope_references_are_counted_not_reported() {
    let w = World::new(vec![
        user("u1", "Ann", "Eng"),
        user("u9", "Zed", "Former").with("manager", Value::anchor_ref("u1")),
        user("u2", "Bob", "Eng").with("manager", Value::dn_ref(dn("cn=Zed,ou=People,dc=x"))),
        group("g1", "Staff", &["Ann", "Zed", "Ghost"]),
    ]);
    let plan = w.plan();
    // Zed is mirrored but out of scope: two references left out, counted. Ghost is not in the
    // mirror at all: an issue.
    assert_eq!(plan.stats.out_of_scope_references, 2, "{plan}");
    let issues: Vec<String> = plan.issues.iter().map(|i| i.to_string()).collect();
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert!(issues[0].contains("Ghost"), "{issues:?}");
    // Bob's only manager is out of scope: created without one.
    let bob = plan
        .operations
        .iter()
        .find(|o| o.anchor.as_str() == "u2" && o.kind.name() == "create")
        .unwrap();
    let OperationKind::Create { attributes, .. } = &bob.kind else {
        panic!()
    };
    assert!(attributes.get("manager").is_none());
}

/// Light views (`StateStore::load_neighbourhood_light`) hold the objects around the planned
/// ones as context only: a plan from them is the plan from whole views, or says which of them
/// it had to decide. A chain of new users — Cy's manager is Bo, Bo's is Ann — planned for Ann
/// alone: Ann's create takes in Bo (who references her), and Bo's create takes in Cy, whom the
/// light views hold as context. Dee, Ann's manager, is context she references.
#[test]
fn light_views_plan_as_whole_ones_or_say_what_they_need() {
    use dirsync::state::{Reach, SqliteStore, StateStore};
    let dn = |cn: &str| Dn::parse(&format!("cn={cn},ou=People,dc=example,dc=com")).unwrap();
    let person = |cn: &str, manager: Option<&str>| {
        let mut e = Entry::new(cn.to_lowercase(), "user")
            .with_dn(dn(cn))
            .with("cn", cn)
            .with("mail", format!("{}@example.com", cn.to_lowercase()))
            .with("department", "Engineering");
        if let Some(m) = manager {
            e.attributes.set("manager", Value::dn_ref(dn(m)));
        }
        e
    };
    let mut store = SqliteStore::open_in_memory().unwrap();
    let generation = store.begin_full_import("hr").unwrap();
    store
        .import_entries(
            generation,
            &[
                person("Dee", None),
                person("Ann", Some("Dee")),
                person("Bo", Some("Ann")),
                person("Cy", Some("Bo")),
            ],
        )
        .unwrap();
    store
        .finish_full_import("hr", generation, None, 0.0)
        .unwrap();
    let (ann, bo, cy) = (
        testkit::anchor("ann"),
        testkit::anchor("bo"),
        testkit::anchor("cy"),
    );
    let projection = UserGroupProjection::default();
    let plan = |views: &dirsync::state::Views, scope: Vec<dirsync::model::Anchor>| {
        let mut input = PlanInput::new(&projection, &views.mirror, &views.links, &views.target);
        input.scope = PlanScope::Anchors(scope);
        delta::plan(&input)
    };
    let creates = |p: &Plan| -> Vec<String> {
        p.operations
            .iter()
            .filter(|o| matches!(o.kind, OperationKind::Create { .. }))
            .map(|o| o.anchor.to_string())
            .collect()
    };

    let whole = store
        .load_neighbourhood(std::slice::from_ref(&ann))
        .unwrap();
    assert!(!whole.mirror.is_partial(&cy));
    let expected = plan(&whole, vec![ann.clone()]);
    assert_eq!(creates(&expected), ["ann", "bo", "cy"], "{expected}");
    assert!(expected.issues.is_empty(), "{expected}");

    let light = store
        .load_neighbourhood_light(std::slice::from_ref(&ann), Reach::Referrers)
        .unwrap();
    // Ann is planned, Bo too (he references her); Cy is context: her DN and her reference to
    // Bo, nothing else.
    assert!(!light.mirror.is_partial(&ann) && !light.mirror.is_partial(&bo));
    assert!(light.mirror.is_partial(&cy));
    let held = light.mirror.get(&cy).unwrap();
    assert_eq!(held.dn, Some(dn("Cy")));
    let names: Vec<&str> = held.attributes.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["manager"]);
    assert_eq!(
        light
            .mirror
            .get(&bo)
            .unwrap()
            .attributes
            .get("mail")
            .unwrap()[0],
        Value::string("bo@example.com")
    );
    // Dee, whom Ann references, references nothing planned: her anchor, type and DN only.
    let dee = testkit::anchor("dee");
    assert!(light.mirror.is_partial(&dee));
    let held = light.mirror.get(&dee).unwrap();
    assert_eq!(held.dn, Some(dn("Dee")));
    assert!(held.attributes.is_empty(), "{:?}", held.attributes);
    // Planned from the light views, Cy is held, not decided from what the views lack.
    let partial = plan(&light, vec![ann.clone()]);
    assert_eq!(creates(&partial), ["ann", "bo"], "{partial}");
    assert!(
        matches!(&partial.issues[..], [Issue::Held { anchor, reason }]
            if *anchor == cy && reason.contains("context only")),
        "{partial}"
    );
    // Planned again with Cy planned (what the engine does): the whole views' plan.
    let again = store
        .load_neighbourhood_light(&[ann.clone(), cy.clone()], Reach::Referrers)
        .unwrap();
    assert!(!again.mirror.is_partial(&cy));
    let replanned = plan(&again, vec![ann, cy]);
    assert_eq!(replanned.operations, expected.operations);
    assert!(replanned.issues.is_empty(), "{replanned}");
}
