//! Runs over a dirty set larger than a page ([`EngineConfig::plan_page`]): planned and exported
//! page by page, with the deletion guard seeing the whole run before any page is exported, and
//! a run that stops half way leaving the rest dirty for the next.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use dirsync::connector::memory::{MemorySource, MemoryTarget};
use dirsync::connector::{ErrorKind, TargetOperation};
use dirsync::engine::{CircuitBreaker, EngineConfig, RetryPolicy, Synchronizer};
use dirsync::model::{Entry, Value};
use dirsync::state::SqliteStore;
use dirsync::testkit::{self, UserGroupProjection};

/// 60 users (managed by user i/5) and 3 groups of them, over a SQLite store, pages of 4.
fn world() -> (MemorySource, MemoryTarget, Synchronizer) {
    world_in_pages_of(4)
}

/// [`world`] with pages of `plan_page`.
fn world_in_pages_of(plan_page: usize) -> (MemorySource, MemoryTarget, Synchronizer) {
    let source = MemorySource::new("hr");
    let mut entries = testkit::directory(60, 5, 3, 12, 3);
    for (i, e) in entries.iter_mut().enumerate().take(60).skip(1) {
        e.attributes
            .set("manager", Value::dn_ref(testkit::user_dn(i / 5)));
        // In scope: the generator's "Former" department is not.
        e.attributes.set("department", Value::string("Engineering"));
    }
    for e in entries {
        source.add(e).unwrap();
    }
    let target = MemoryTarget::new("app");
    let config = EngineConfig {
        plan_page,
        retry: RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        },
        circuit_breaker: CircuitBreaker {
            min_operations: 5,
            failure_ratio: 0.5,
        },
        ..EngineConfig::default()
    };
    let sync = Synchronizer::with_projection(
        Box::new(source.clone()),
        Box::new(target.clone()),
        Box::new(SqliteStore::open_in_memory().unwrap()),
        Arc::new(UserGroupProjection::default()),
        config,
    );
    (source, target, sync)
}

fn run(sync: &mut Synchronizer) -> dirsync::engine::RunReport {
    futures::executor::block_on(sync.run_cycle()).unwrap()
}

/// The id of the target object `anchor` is linked to.
fn target_id(sync: &Synchronizer, anchor: &dirsync::model::Anchor) -> dirsync::model::TargetId {
    sync.with_store(|s| {
        s.load_neighbourhood(std::slice::from_ref(anchor))
            .unwrap()
            .links
            .get(anchor)
            .cloned()
    })
    .unwrap()
    .target_id
}

fn dirty(sync: &Synchronizer) -> usize {
    sync.with_store(|s| s.dirty().unwrap().len())
}

#[test]
fn a_mass_deletion_spread_over_many_pages_is_held_whole() {
    let (source, target, mut sync) = world();
    let first = run(&mut sync);
    assert!(first.failures.is_empty(), "{:?}", first.failures);
    assert_eq!(first.count("create"), 63);
    assert_eq!(target.len(), 63);
    // Every manager and member reference made it, across pages.
    let with_manager = target
        .objects()
        .into_iter()
        .filter(|o| o.attributes.get("manager").is_some_and(|v| !v.is_empty()))
        .count();
    assert_eq!(with_manager, 59);
    assert_eq!(dirty(&sync), 0);

    // 40 users deleted at the source (disabled: over the guard's 10 %), one renamed: 41 dirty
    // objects (and their referrers), over a dozen pages of 4.
    let users: Vec<Entry> = source
        .entries()
        .into_iter()
        .filter(|e| e.object_type.is("user"))
        .collect();
    for e in users.iter().skip(20) {
        source.delete(&e.anchor).unwrap();
    }
    let mut renamed = users[3].clone();
    renamed.attributes.set("cn", Value::string("Renamed"));
    source.upsert(renamed).unwrap();
    let before = target.objects();
    let applied = target.applied().len();
    let held = run(&mut sync);
    assert!(held.held, "{held}");
    assert!(!held.guard_violations.is_empty());
    assert_eq!(held.guard_violations[0].deletions, 40, "{held}");
    // Nothing of the run was exported, in any page: not a disable, not the rename.
    assert_eq!(target.applied().len(), applied);
    assert_eq!(target.objects(), before);
    assert!(dirty(&sync) >= 41);

    // Held again the next time; allowed once, every page goes, and nothing is left.
    assert!(run(&mut sync).held);
    sync.allow_deletions_once();
    let allowed = run(&mut sync);
    assert!(!allowed.held, "{allowed}");
    assert!(allowed.failures.is_empty(), "{:?}", allowed.failures);
    assert_eq!(allowed.count("disable"), 40, "{allowed}");
    assert_eq!(dirty(&sync), 0);
    let plan = sync.plan(true).unwrap().plan;
    assert!(plan.operations.is_empty(), "{plan}");
    // The allowance was for that run only.
    for e in users.iter().take(19).skip(10) {
        source.delete(&e.anchor).unwrap();
    }
    for e in users.iter().take(10) {
        let mut e = e.clone();
        e.attributes.set("department", Value::string("Former"));
        source.upsert(e).unwrap();
    }
    assert!(run(&mut sync).held);
}

#[test]
fn a_paged_run_that_stops_half_way_leaves_the_rest_dirty_for_the_next() {
    let (_source, target, mut sync) = world();
    // Creates of groups fail: the breaker stops the run after some pages.
    target.fail_when(
        |op| matches!(op, TargetOperation::Create { object_type, .. } if object_type.is("Group")),
        ErrorKind::Unavailable,
        None,
    );
    target.fail_when(
        |op| matches!(op, TargetOperation::Create { attributes, .. } if attributes.get("cn").is_some_and(|v| v.first().and_then(Value::as_str).is_some_and(|s| s.ends_with('7')))),
        ErrorKind::Unavailable,
        None,
    );
    let first = run(&mut sync);
    assert!(!first.failures.is_empty());
    let created = target.len();
    assert!(created > 0 && created < 63, "{created}");
    // What failed, and what the run did not reach, is still dirty.
    assert!(dirty(&sync) >= 63 - created, "{} dirty", dirty(&sync));
    target.clear_faults();
    sync.with_store(|s| {
        for e in s.escrowed().unwrap() {
            s.release(&e.anchor).unwrap();
        }
    });
    let second = run(&mut sync);
    assert!(second.failures.is_empty(), "{:?}", second.failures);
    // References to objects created in the second run are completed by the next.
    run(&mut sync);
    assert_eq!(target.len(), 63);
    assert_eq!(dirty(&sync), 0);
    let plan = sync.plan(true).unwrap().plan;
    assert!(plan.operations.is_empty(), "{plan}");
    let members: usize = target
        .objects()
        .into_iter()
        .filter(|o| o.object_type.is("Group"))
        .map(|o| o.attributes.get("member").map_or(0, |v| v.len()))
        .sum();
    assert!(members > 0);
}

/// A run of three pages whose manager chain goes against anchor order (each user's manager
/// comes after it, and the group of all of them before them): the pages go by reference
/// level, so every create carries its manager or its members, and no reference update is
/// needed — in anchor order, the first two pages would be created without their managers
/// (and the group without its members) and completed by reference updates.
#[test]
fn pages_go_by_reference_level_so_creates_carry_their_references() {
    let source = MemorySource::new("hr");
    let mut users = testkit::directory(12, 5, 0, 0, 7);
    for (i, e) in users.iter_mut().enumerate() {
        if i + 1 < 12 {
            e.attributes
                .set("manager", Value::dn_ref(testkit::user_dn(i + 1)));
        }
        e.attributes.set("department", Value::string("Engineering"));
    }
    let mut group = testkit::directory(12, 5, 1, 0, 7).pop().unwrap();
    group.attributes.set(
        "member",
        (0..12)
            .map(|i| Value::dn_ref(testkit::user_dn(i)))
            .collect::<dirsync::model::Values>(),
    );
    assert!(group.anchor < users[0].anchor, "the group sorts first");
    for e in users.into_iter().chain([group]) {
        source.add(e).unwrap();
    }
    let target = MemoryTarget::new("app");
    let mut sync = Synchronizer::with_projection(
        Box::new(source),
        Box::new(target.clone()),
        Box::new(SqliteStore::open_in_memory().unwrap()),
        Arc::new(UserGroupProjection::default()),
        EngineConfig {
            plan_page: 4,
            ..EngineConfig::default()
        },
    );
    let report = run(&mut sync);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.count("create"), 13, "{report}");
    assert_eq!(report.count("references"), 0, "{report}");
    assert!(
        target
            .applied()
            .iter()
            .all(|op| matches!(op, TargetOperation::Create { .. })),
        "{:?}",
        target.applied()
    );
    assert_eq!(dirty(&sync), 0);
    // Every reference made it, in the creates.
    let objects = target.objects();
    let with_manager = objects
        .iter()
        .filter(|o| o.attributes.get("manager").is_some_and(|v| !v.is_empty()))
        .count();
    assert_eq!(with_manager, 11);
    let members = objects
        .iter()
        .find(|o| o.object_type.is("Group"))
        .and_then(|g| g.attributes.get("member"))
        .map_or(0, |v| v.len());
    assert_eq!(members, 12);
    let plan = sync.plan(true).unwrap().plan;
    assert!(plan.operations.is_empty(), "{plan}");
}

/// Twelve new users (three pages of four) join a group that is itself dirty: the pages of the
/// new users do not each write the group (as the objects referencing their creates) — the
/// group's own page writes it once, with every new member.
#[test]
fn a_dirty_group_is_written_once_in_its_own_page_not_once_per_page_of_new_members() {
    let (source, target, mut sync) = world();
    let first = run(&mut sync);
    assert!(first.failures.is_empty(), "{:?}", first.failures);
    let group = source
        .entries()
        .into_iter()
        .find(|e| e.object_type.is("group"))
        .unwrap();
    let mut fx = testkit::Fixture::new(11);
    let mut members: Vec<Value> = group
        .attributes
        .get("member")
        .map(|v| v.iter().cloned().collect())
        .unwrap_or_default();
    for i in 60..72 {
        let mut u = testkit::user(i, 5, &mut fx);
        u.attributes.set("department", Value::string("Engineering"));
        source.add(u).unwrap();
        members.push(Value::dn_ref(testkit::user_dn(i)));
    }
    let mut grown = group.clone();
    grown.attributes.set(
        "member",
        members.into_iter().collect::<dirsync::model::Values>(),
    );
    source.upsert(grown).unwrap();
    let group_id = target_id(&sync, &group.anchor);
    let applied = target.applied().len();
    let report = run(&mut sync);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.count("create"), 12, "{report}");
    let writes = target.applied()[applied..]
        .iter()
        .filter(|op| matches!(op, TargetOperation::Update { id, .. } if *id == group_id))
        .count();
    assert_eq!(writes, 1, "{report}");
    let members = target
        .get_object(&group_id)
        .and_then(|g| g.attributes.get("member").map(|v| v.len()))
        .unwrap_or(0);
    assert_eq!(
        members,
        group.attributes.get("member").map_or(0, |v| v.len()) + 12
    );
    assert_eq!(dirty(&sync), 0);
    let plan = sync.plan(true).unwrap().plan;
    assert!(plan.operations.is_empty(), "{plan}");
}

/// One dirty group whose members alone are more than a page is planned page by page (its
/// members counted as pages count them), not as one plan holding every member as context.
#[test]
fn a_dirty_set_whose_references_outweigh_a_page_is_planned_in_pages() {
    // Pages of 8: a group of 12 members is more than a page.
    let (source, target, mut sync) = world_in_pages_of(8);
    assert!(run(&mut sync).failures.is_empty());
    let mut group = source
        .entries()
        .into_iter()
        .find(|e| e.object_type.is("group"))
        .unwrap();
    let members = group.attributes.get("member").map_or(0, |v| v.len());
    assert!(members > 8, "{members}");
    group.attributes.set("cn", Value::string("Renamed group"));
    source.upsert(group.clone()).unwrap();
    let report = run(&mut sync);
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.planned, 1, "{report}");
    let plans = report
        .stages
        .iter()
        .filter(|(s, _)| *s == dirsync::engine::Stage::Plan)
        .count();
    assert!(plans > 1, "planned as one plan: {:?}", report.stages);
    assert_eq!(dirty(&sync), 0);
    let id = target_id(&sync, &group.anchor);
    let object = target.get_object(&id).unwrap();
    assert_eq!(
        object.attributes.get("member").map_or(0, |v| v.len()),
        members
    );
    assert!(
        object
            .attributes
            .iter()
            .any(|(_, v)| v.iter().any(|v| v.as_str() == Some("Renamed group"))),
        "{object:?}"
    );
    let plan = sync.plan(true).unwrap().plan;
    assert!(plan.operations.is_empty(), "{plan}");
}
