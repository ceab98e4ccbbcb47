//! The contract every [`StateStore`] keeps, as one test suite: [`store_contract`] runs it
//! against fresh stores from a factory. This crate runs it for [`MemoryStore`](super::MemoryStore)
//! and [`SqliteStore`](super::SqliteStore); a downstream store (PostgreSQL, …) runs it too
//! (feature `testkit`).
//!
//! A failed check panics with what was expected, as test assertions do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use chrono::{DateTime, TimeZone, Utc};

use super::{JournalState, Reach, StateError, StateStore, TargetLookup};
use crate::connector::{TargetOperation, Watermark};
use crate::delta::{Operation, OperationKind, Reason, TargetRef};
use crate::model::{
    values, Anchor, AttributeChange, Attributes, Change, ChangeOp, Dn, Entry, TargetId,
    TargetObject, Value,
};

/// Runs every check of the contract, each against a fresh store from `make`.
pub fn store_contract(make: impl Fn() -> Box<dyn StateStore>) {
    delta_imports_mark_changed_objects_and_their_referrers(make());
    references_follow_anchors_through_imports_renames_and_deletes(make());
    gone_target_objects_mark_their_objects_and_referrers(make());
    watermark_commits_with_its_changes(make());
    full_import_deletes_unseen_and_guards_small_imports(make());
    interrupted_full_import_leaves_state_valid(make());
    neighbourhood_holds_referrers_references_links_and_targets(make());
    narrow_neighbourhoods_plan_fewer_referrers(make());
    join_candidates_are_found_by_value(make());
    join_candidates_come_in_bulk_as_one_by_one(make());
    journal_lifecycle_updates_links_and_target_mirror(make());
    group_commit_is_all_or_nothing(make());
    batched_outcomes_equal_single_calls(make(), make());
    retention_prunes_old_finished_runs_only(make());
    finishing_a_run_applies_the_default_retention(make());
    undeclared_lookup_attributes_are_still_found(make());
    deprovisioning_an_old_object_keeps_the_new_link(make());
    a_done_create_replaces_links_and_objects_in_its_way(make());
    secrets_are_not_stored(make());
    escrow_counts_attempts(make());
    runs_are_recorded(make());
    target_objects_are_kept(make());
    fingerprint_moves_with_plan_inputs_only(make());
    subtrees_move_with_their_container(make());
    container_bindings_are_kept(make());
    duplicate_anchors_are_refused(make());
    anchor_pages_cover_the_mirror_and_the_links_once(make());
    full_plan_pages_cover_every_anchor_once_with_its_views(make());
    dirty_pages_name_what_their_objects_reference(make());
    referrers_waiting_for_a_new_object_adopt_it(make());
}

fn dn(s: &str) -> Dn {
    Dn::parse(s).expect("test DN")
}

fn a(s: &str) -> Anchor {
    Anchor::from(s)
}

fn anchors(list: &[&str]) -> Vec<Anchor> {
    list.iter().map(|s| a(s)).collect()
}

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + secs, 0)
        .single()
        .expect("test time")
}

fn user(anchor: &str, cn: &str) -> Entry {
    Entry::new(anchor, "user")
        .with_dn(dn(&format!("cn={cn},ou=People,dc=x")))
        .with("cn", cn)
}

fn reset_dirty(s: &mut dyn StateStore) {
    let d = s.dirty().unwrap();
    s.clear_dirty(&d).unwrap();
    assert!(s.dirty().unwrap().is_empty());
}

fn op(anchor: &str, kind: OperationKind) -> Operation {
    Operation {
        anchor: a(anchor),
        source_type: "user".into(),
        target_type: "User".into(),
        kind,
        reason: Reason::EnteredScope,
    }
}

/// The create of a `User` for `anchor` with `attributes`, and its target operation.
pub(crate) fn create_op(anchor: &str, attributes: Attributes) -> (Operation, TargetOperation) {
    let o = op(
        anchor,
        OperationKind::Create {
            attributes: attributes.clone(),
            secrets: Attributes::new(),
            lookup: Vec::new(),
        },
    );
    let sent = TargetOperation::Create {
        object_type: "User".into(),
        attributes,
    };
    (o, sent)
}

/// Two groups: g1 (cn=Staff) of Ann by DN and u2 by anchor, g2 (cn=All) of g1.
fn staff_groups() -> [Change; 2] {
    [
        Change::Add(
            Entry::new("g1", "group")
                .with_dn(dn("cn=Staff,ou=Groups,dc=x"))
                .with("member", Value::dn_ref(dn("cn=Ann,ou=People,dc=x")))
                .with("member", Value::anchor_ref("u2")),
        ),
        Change::Add(
            Entry::new("g2", "group")
                .with_dn(dn("cn=All,ou=Groups,dc=x"))
                .with("member", Value::anchor_ref("g1")),
        ),
    ]
}

/// Links `anchor` to `target` through a journaled create.
fn link_by_create(s: &mut dyn StateStore, anchor: &str, target: &str, attrs: Attributes) {
    let run = s.begin_run("test", t(0)).unwrap();
    let (o, sent) = create_op(anchor, attrs);
    let id = s.journal_intent(run, &o, Some(&sent)).unwrap();
    s.journal_done(id, &o, Some(&sent), Some(&TargetId::from(target)))
        .unwrap();
}

fn delta_imports_mark_changed_objects_and_their_referrers(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    let g1 = Entry::new("g1", "group")
        .with_dn(dn("cn=Staff,ou=Groups,dc=x"))
        .with("member", Value::dn_ref(dn("CN=ann,OU=people,DC=x")));
    s.apply_changes(
        "src",
        &[Change::Add(user("u1", "Ann")), Change::Add(g1.clone())],
        None,
    )
    .unwrap();
    assert_eq!(s.dirty().unwrap(), anchors(&["g1", "u1"]));
    // The DN reference names a mirrored object: it is kept by anchor.
    let mut g1_stored = g1.clone();
    g1_stored
        .attributes
        .set("member", values([Value::anchor_ref("u1")]));
    assert_eq!(s.source_entry(&a("g1")).unwrap(), Some(g1_stored));
    assert_eq!(
        s.anchor_by_dn(&dn("cn=ANN,ou=people,dc=x")).unwrap(),
        Some(a("u1"))
    );
    reset_dirty(s);

    // The same content again marks nothing.
    s.apply_changes("src", &[Change::Replace(user("u1", "Ann"))], None)
        .unwrap();
    assert!(
        s.dirty().unwrap().is_empty(),
        "unchanged replace marked dirty"
    );

    // A change marks the object and the group that references it by DN.
    s.apply_changes(
        "src",
        &[Change::Modify {
            anchor: a("u1"),
            object_type: "user".into(),
            changes: vec![AttributeChange::replace("title", values(["Boss"]))],
        }],
        None,
    )
    .unwrap();
    assert_eq!(s.dirty().unwrap(), anchors(&["g1", "u1"]));
    assert_eq!(
        s.source_entry(&a("u1"))
            .unwrap()
            .unwrap()
            .attributes
            .first_str("title"),
        Some("Boss")
    );
    reset_dirty(s);

    // A new reference (by anchor) marks the object newly referenced too.
    s.apply_changes(
        "src",
        &[Change::Add(
            user("u2", "Bob").with("manager", Value::anchor_ref("u1")),
        )],
        None,
    )
    .unwrap();
    assert_eq!(s.dirty().unwrap(), anchors(&["u1", "u2"]));
    reset_dirty(s);

    // A move marks the object and its referrers; they keep referencing it.
    s.apply_changes(
        "src",
        &[Change::Move {
            anchor: a("u1"),
            object_type: "user".into(),
            new_dn: dn("cn=Ann,ou=Former,dc=x"),
        }],
        None,
    )
    .unwrap();
    assert_eq!(s.dirty().unwrap(), anchors(&["g1", "u1", "u2"]));
    assert_eq!(s.anchor_by_dn(&dn("cn=Ann,ou=People,dc=x")).unwrap(), None);
    assert_eq!(
        s.anchor_by_dn(&dn("cn=Ann,ou=Former,dc=x")).unwrap(),
        Some(a("u1"))
    );
    reset_dirty(s);

    // Deleting u2 marks it and the object it referenced; deleting an unknown object is ignored.
    s.apply_changes(
        "src",
        &[
            Change::Delete {
                anchor: a("u2"),
                object_type: "user".into(),
            },
            Change::Delete {
                anchor: a("nobody"),
                object_type: "user".into(),
            },
        ],
        None,
    )
    .unwrap();
    assert_eq!(s.dirty().unwrap(), anchors(&["u1", "u2"]));
    assert_eq!(s.source_entry(&a("u2")).unwrap(), None);

    // A group losing a member by DN (its current one) loses the anchor, and marks the member
    // (its ISMEMBEROF changed); gaining it back by DN does too.
    for op in [ChangeOp::Remove, ChangeOp::Add] {
        reset_dirty(s);
        s.apply_changes(
            "src",
            &[Change::Modify {
                anchor: a("g1"),
                object_type: "group".into(),
                changes: vec![AttributeChange {
                    op,
                    ..AttributeChange::add(
                        "member",
                        values([Value::dn_ref(dn("cn=Ann,ou=Former,dc=x"))]),
                    )
                }],
            }],
            None,
        )
        .unwrap();
        assert_eq!(s.dirty().unwrap(), anchors(&["g1", "u1"]), "{op:?}");
        let members = s
            .source_entry(&a("g1"))
            .unwrap()
            .unwrap()
            .attributes
            .get("member")
            .cloned();
        let expected = (op == ChangeOp::Add).then(|| values([Value::anchor_ref("u1")]));
        assert_eq!(members, expected, "{op:?}");
    }
    s.mark_dirty(&anchors(&["zz"])).unwrap();
    assert_eq!(s.dirty().unwrap(), anchors(&["g1", "u1", "zz"]));
}

/// The references an entry holds in `attribute`, as stored.
fn refs_of(s: &dyn StateStore, anchor: &str, attribute: &str) -> Vec<Value> {
    s.source_entry(&a(anchor))
        .unwrap()
        .unwrap_or_else(|| panic!("{anchor} is mirrored"))
        .attributes
        .get(attribute)
        .map(|v| v.iter().cloned().collect())
        .unwrap_or_default()
}

fn references_follow_anchors_through_imports_renames_and_deletes(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    let boss_dn = "cn=Boss,ou=People,dc=x";
    let report = |manager: &str| user("r1", "Report").with("manager", Value::dn_ref(dn(manager)));
    let group = |boss: &str| {
        Entry::new("g1", "group")
            .with_dn(dn("cn=Team,ou=Groups,dc=x"))
            .with("member", Value::dn_ref(dn("cn=Ann,ou=People,dc=x")))
            .with("member", Value::dn_ref(dn(boss)))
            .with("member", Value::dn_ref(dn("cn=Outside,ou=Elsewhere,dc=x")))
    };

    // A full import delivering referrers before what they reference (in an earlier batch):
    // every reference to a mirrored object is kept by anchor; the one to an object outside
    // the mirror waits by DN.
    for round in 0..2 {
        let g = s.begin_full_import("src").unwrap();
        s.import_entries(g, &[report(boss_dn), group(boss_dn)])
            .unwrap();
        s.import_entries(g, &[user("u1", "Ann"), user("b1", "Boss")])
            .unwrap();
        let sum = s.finish_full_import("src", g, None, 0.5).unwrap();
        assert_eq!(refs_of(s, "r1", "manager"), [Value::anchor_ref("b1")]);
        assert_eq!(
            refs_of(s, "g1", "member"),
            [
                Value::anchor_ref("u1"),
                Value::anchor_ref("b1"),
                Value::dn_ref(dn("cn=Outside,ou=Elsewhere,dc=x"))
            ]
        );
        if round == 1 {
            // The same delivery again changes nothing.
            assert_eq!((sum.changed, sum.added), (0, 0));
            assert!(s.dirty().unwrap().is_empty(), "{:?}", s.dirty().unwrap());
        }
        reset_dirty(s);
    }
    let v = s.load_neighbourhood(&anchors(&["b1"])).unwrap();
    assert!(v.mirror.get(&a("r1")).is_some() && v.mirror.get(&a("g1")).is_some());
    assert_eq!(
        v.mirror.member_of(&a("b1")),
        [&dn("cn=team,ou=groups,dc=x")]
    );

    // A rename (the whole object again, as uSNChanged polling delivers it): its referrers are
    // marked (their view of it changed) and keep referencing it by anchor.
    let renamed = "cn=Boss Two,ou=Other,dc=x";
    let boss_renamed = Entry {
        dn: Some(dn(renamed)),
        ..user("b1", "Boss")
    };
    s.apply_changes("src", &[Change::Replace(boss_renamed)], None)
        .unwrap();
    assert_eq!(s.dirty().unwrap(), anchors(&["b1", "g1", "r1"]));
    assert_eq!(refs_of(s, "r1", "manager"), [Value::anchor_ref("b1")]);
    assert_eq!(s.anchor_by_dn(&dn(boss_dn)).unwrap(), None);
    let v = s.load_neighbourhood(&anchors(&["b1"])).unwrap();
    assert_eq!(
        v.mirror.member_of(&a("b1")),
        [&dn("cn=team,ou=groups,dc=x")]
    );
    reset_dirty(s);
    // Its referrers delivered again with its new DN (a full import): the same once resolved.
    let g = s.begin_full_import("src").unwrap();
    let boss_renamed = Entry {
        dn: Some(dn(renamed)),
        ..user("b1", "Boss")
    };
    s.import_entries(
        g,
        &[
            report(renamed),
            group(renamed),
            user("u1", "Ann"),
            boss_renamed,
        ],
    )
    .unwrap();
    let sum = s.finish_full_import("src", g, None, 0.5).unwrap();
    assert_eq!((sum.changed, sum.deleted), (0, 0));
    assert!(s.dirty().unwrap().is_empty(), "{:?}", s.dirty().unwrap());
    assert_eq!(refs_of(s, "r1", "manager"), [Value::anchor_ref("b1")]);

    // A delete removes the references to the object at once and marks its referrers.
    s.apply_changes(
        "src",
        &[Change::Delete {
            anchor: a("b1"),
            object_type: "user".into(),
        }],
        None,
    )
    .unwrap();
    assert_eq!(s.dirty().unwrap(), anchors(&["b1", "g1", "r1"]));
    assert!(refs_of(s, "r1", "manager").is_empty());
    assert_eq!(
        refs_of(s, "g1", "member"),
        [
            Value::anchor_ref("u1"),
            Value::dn_ref(dn("cn=Outside,ou=Elsewhere,dc=x"))
        ]
    );
    reset_dirty(s);

    // Another object at the deleted one's DN inherits nothing.
    s.apply_changes(
        "src",
        &[Change::Add(Entry {
            dn: Some(dn(renamed)),
            ..user("b2", "Boss")
        })],
        None,
    )
    .unwrap();
    assert_eq!(s.dirty().unwrap(), anchors(&["b2"]));
    assert!(refs_of(s, "r1", "manager").is_empty());
    assert!(s
        .load_neighbourhood(&anchors(&["b2"]))
        .unwrap()
        .mirror
        .member_of(&a("b2"))
        .is_empty());
    reset_dirty(s);

    // The object a reference waited for arrives (a delta): the reference resolves, the
    // referrer is marked. In one batch, a referrer before the object it references resolves too.
    s.apply_changes(
        "src",
        &[
            Change::Add(
                user("r2", "Second").with("manager", Value::dn_ref(dn("cn=New,ou=People,dc=x"))),
            ),
            Change::Add(user("n1", "New")),
            Change::Add(Entry {
                dn: Some(dn("cn=Outside,ou=Elsewhere,dc=x")),
                ..user("o1", "Outside")
            }),
        ],
        None,
    )
    .unwrap();
    assert_eq!(refs_of(s, "r2", "manager"), [Value::anchor_ref("n1")]);
    assert_eq!(
        refs_of(s, "g1", "member"),
        [Value::anchor_ref("u1"), Value::anchor_ref("o1")]
    );
    assert_eq!(s.dirty().unwrap(), anchors(&["g1", "n1", "o1", "r2"]));
    reset_dirty(s);

    // A move (a `Move` change, as LDIF change files and syncrepl-less sources report) keeps
    // references too; the reference to the old DN that arrives afterwards does not resolve.
    s.apply_changes(
        "src",
        &[
            Change::Move {
                anchor: a("n1"),
                object_type: "user".into(),
                new_dn: dn("cn=New,ou=Moved,dc=x"),
            },
            Change::Add(
                user("r3", "Third").with("manager", Value::dn_ref(dn("cn=New,ou=People,dc=x"))),
            ),
        ],
        None,
    )
    .unwrap();
    assert_eq!(refs_of(s, "r2", "manager"), [Value::anchor_ref("n1")]);
    assert_eq!(
        refs_of(s, "r3", "manager"),
        [Value::dn_ref(dn("cn=New,ou=People,dc=x"))]
    );
}

/// An object that comes after the objects referring to it (by anchor and by DN), in a later
/// transaction of a full import, is adopted by them: their references name it, they are marked
/// dirty with it, and they are its referrers from then on. The same delivery again marks
/// nothing; the object's deletion marks them again and takes their references to it.
fn referrers_waiting_for_a_new_object_adopt_it(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    let max_dn = "cn=Max,ou=People,dc=x";
    let referrers = || {
        vec![
            user("r1", "Rae").with("manager", Value::anchor_ref("m1")),
            Entry::new("g1", "group")
                .with_dn(dn("cn=Team,ou=Groups,dc=x"))
                .with("member", Value::dn_ref(dn(max_dn)))
                .with("member", Value::anchor_ref("u1")),
            user("u1", "Ann"),
        ]
    };
    let g = s.begin_full_import("src").unwrap();
    s.import_entries(g, &referrers()).unwrap();
    assert_eq!(
        refs_of(s, "g1", "member"),
        [Value::dn_ref(dn(max_dn)), Value::anchor_ref("u1")]
    );
    reset_dirty(s);
    s.import_entries(g, &[user("m1", "Max")]).unwrap();
    let sum = s.finish_full_import("src", g, None, 0.5).unwrap();
    assert_eq!((sum.seen, sum.added), (4, 4));
    assert_eq!(s.dirty().unwrap(), anchors(&["g1", "m1", "r1"]));
    assert_eq!(refs_of(s, "r1", "manager"), [Value::anchor_ref("m1")]);
    assert_eq!(
        refs_of(s, "g1", "member"),
        [Value::anchor_ref("m1"), Value::anchor_ref("u1")]
    );
    let v = s.load_neighbourhood(&anchors(&["m1"])).unwrap();
    assert!(v.mirror.get(&a("r1")).is_some() && v.mirror.get(&a("g1")).is_some());
    assert_eq!(
        v.mirror.member_of(&a("m1")),
        [&dn("cn=team,ou=groups,dc=x")]
    );
    reset_dirty(s);

    let g = s.begin_full_import("src").unwrap();
    let mut all = referrers();
    all.push(user("m1", "Max"));
    s.import_entries(g, &all).unwrap();
    let sum = s.finish_full_import("src", g, None, 0.5).unwrap();
    assert_eq!((sum.seen, sum.added, sum.changed), (4, 0, 0));
    assert!(s.dirty().unwrap().is_empty(), "{:?}", s.dirty().unwrap());

    let g = s.begin_full_import("src").unwrap();
    s.import_entries(g, &referrers()).unwrap();
    let sum = s.finish_full_import("src", g, None, 0.5).unwrap();
    assert_eq!(sum.deleted, 1);
    assert_eq!(s.dirty().unwrap(), anchors(&["g1", "m1", "r1"]));
    assert!(refs_of(s, "r1", "manager").is_empty());
    assert_eq!(refs_of(s, "g1", "member"), [Value::anchor_ref("u1")]);
}

fn gone_target_objects_mark_their_objects_and_referrers(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    s.apply_changes(
        "src",
        &[
            Change::Add(user("u1", "Ann")),
            Change::Add(user("u2", "Bob").with("manager", Value::anchor_ref("u1"))),
            Change::Add(user("u3", "Cy")),
        ],
        None,
    )
    .unwrap();
    link_by_create(s, "u1", "t1", Attributes::new());
    link_by_create(s, "u3", "t3", Attributes::new());
    reset_dirty(s);
    // t9 is linked to nothing; t1 is u1's, whom u2 references.
    s.put_target_objects(&[TargetObject::new("t9", "User")])
        .unwrap();
    s.remove_target_objects(&["t1".into(), "t9".into(), "t-none".into()])
        .unwrap();
    assert_eq!(s.dirty().unwrap(), anchors(&["u1", "u2"]));
}

fn watermark_commits_with_its_changes(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    let w1 = Watermark::new("usn", b"100".to_vec());
    let w2 = Watermark::new("usn", b"200".to_vec());
    assert_eq!(s.watermark("src").unwrap(), None);
    s.apply_changes("src", &[Change::Add(user("u1", "Ann"))], Some(&w1))
        .unwrap();
    assert_eq!(s.watermark("src").unwrap(), Some(w1.clone()));
    assert_eq!(s.watermark("other").unwrap(), None);
    let before = s.fingerprint().unwrap();
    reset_dirty(s);
    let before_dirty = s.fingerprint().unwrap();
    assert_ne!(before, before_dirty);

    // A batch that fails applies nothing and commits no watermark.
    let err = s
        .apply_changes(
            "src",
            &[
                Change::Add(user("u2", "Bob")),
                Change::Modify {
                    anchor: a("ghost"),
                    object_type: "user".into(),
                    changes: vec![AttributeChange::replace("cn", values(["x"]))],
                },
            ],
            Some(&w2),
        )
        .unwrap_err();
    assert!(
        matches!(&err, StateError::UnknownAnchor { anchor, change: "modify" } if anchor.as_str() == "ghost"),
        "{err}"
    );
    assert!(err.to_string().contains("full import"));
    assert_eq!(s.watermark("src").unwrap(), Some(w1.clone()));
    assert_eq!(s.source_entry(&a("u2")).unwrap(), None);
    assert!(s.dirty().unwrap().is_empty());
    assert_eq!(s.fingerprint().unwrap(), before_dirty);

    // A change then a modify of the object it adds, in one batch, is fine.
    s.apply_changes(
        "src",
        &[
            Change::Add(user("u3", "Cy")),
            Change::Modify {
                anchor: a("u3"),
                object_type: "user".into(),
                changes: vec![AttributeChange::add("mail", values(["cy@x"]))],
            },
        ],
        Some(&w2),
    )
    .unwrap();
    assert_eq!(s.watermark("src").unwrap(), Some(w2));
    // No watermark given: the committed one stays.
    s.apply_changes("src", &[], None).unwrap();
    assert!(s.watermark("src").unwrap().is_some());
    s.clear_watermark("src").unwrap();
    assert_eq!(s.watermark("src").unwrap(), None);
}

fn full_import_deletes_unseen_and_guards_small_imports(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    let w = Watermark::new("cookie", b"c1".to_vec());
    let g = s.begin_full_import("src").unwrap();
    s.import_entries(g, &[user("a", "A"), user("b", "B")])
        .unwrap();
    s.import_entries(g, &[user("c", "C"), user("a", "A")])
        .unwrap();
    let sum = s.finish_full_import("src", g, Some(&w), 0.5).unwrap();
    assert_eq!(
        (
            sum.generation,
            sum.seen,
            sum.added,
            sum.changed,
            sum.deleted
        ),
        (g, 3, 3, 0, 0)
    );
    assert_eq!(s.dirty().unwrap(), anchors(&["a", "b", "c"]));
    assert_eq!(s.watermark("src").unwrap(), Some(w));
    reset_dirty(s);

    // a unchanged, b changed, c not seen: c is deleted, b and c are dirty.
    let g2 = s.begin_full_import("src").unwrap();
    assert!(g2 > g);
    s.import_entries(g2, &[user("a", "A"), user("b", "B").with("title", "x")])
        .unwrap();
    let sum = s.finish_full_import("src", g2, None, 0.5).unwrap();
    assert_eq!(
        (sum.seen, sum.added, sum.changed, sum.deleted),
        (2, 0, 1, 1)
    );
    assert_eq!(s.dirty().unwrap(), anchors(&["b", "c"]));
    assert_eq!(s.source_entry(&a("c")).unwrap(), None);
    reset_dirty(s);

    // An empty import of a non-empty mirror is refused; nothing is deleted.
    let g3 = s.begin_full_import("src").unwrap();
    let err = s.finish_full_import("src", g3, None, 0.0).unwrap_err();
    assert!(
        matches!(
            err,
            StateError::ImportTooSmall {
                seen: 0,
                mirrored: 2
            }
        ),
        "{err}"
    );
    assert!(s.source_entry(&a("a")).unwrap().is_some());
    // Too small a share is refused, and the import stays open to finish with a lower share.
    s.import_entries(g3, &[user("a", "A")]).unwrap();
    let err = s.finish_full_import("src", g3, None, 0.9).unwrap_err();
    assert!(
        matches!(
            err,
            StateError::ImportTooSmall {
                seen: 1,
                mirrored: 2
            }
        ),
        "{err}"
    );
    assert!(s.source_entry(&a("b")).unwrap().is_some());
    assert!(s.dirty().unwrap().is_empty());
    // Wrong generation and wrong connector are refused.
    assert!(matches!(
        s.import_entries(g3 + 7, &[user("q", "Q")]),
        Err(StateError::UnknownGeneration { open: Some(o), .. }) if o == g3
    ));
    assert!(matches!(
        s.finish_full_import("other", g3, None, 0.5),
        Err(StateError::WrongConnector { .. })
    ));
    let sum = s.finish_full_import("src", g3, None, 0.5).unwrap();
    assert_eq!((sum.seen, sum.deleted), (1, 1));
    assert_eq!(s.dirty().unwrap(), anchors(&["b"]));
    // A finished import is closed.
    assert!(matches!(
        s.import_entries(g3, &[user("a", "A")]),
        Err(StateError::UnknownGeneration { open: None, .. })
    ));
}

fn interrupted_full_import_leaves_state_valid(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    let g = s.begin_full_import("src").unwrap();
    s.import_entries(g, &[user("a", "A"), user("b", "B")])
        .unwrap();
    s.finish_full_import("src", g, None, 1.0).unwrap();
    reset_dirty(s);
    // Interrupted: a changed and z new are kept; nothing is deleted.
    let g2 = s.begin_full_import("src").unwrap();
    s.import_entries(g2, &[user("a", "A2"), user("z", "Z")])
        .unwrap();
    assert_eq!(s.dirty().unwrap(), anchors(&["a", "z"]));
    let g3 = s.begin_full_import("src").unwrap();
    assert!(matches!(
        s.import_entries(g2, &[user("b", "B")]),
        Err(StateError::UnknownGeneration { .. })
    ));
    assert!(s.source_entry(&a("b")).unwrap().is_some());
    assert_eq!(
        s.source_entry(&a("a"))
            .unwrap()
            .unwrap()
            .attributes
            .first_str("cn"),
        Some("A2")
    );
    // The next import counts what it sees itself.
    s.import_entries(g3, &[user("a", "A2"), user("z", "Z"), user("b", "B")])
        .unwrap();
    let sum = s.finish_full_import("src", g3, None, 1.0).unwrap();
    assert_eq!(
        (sum.seen, sum.added, sum.changed, sum.deleted),
        (3, 0, 0, 0)
    );
}

fn neighbourhood_holds_referrers_references_links_and_targets(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    let changes = [
        Change::Add(user("u1", "Ann").with("manager", Value::anchor_ref("m1"))),
        Change::Add(user("u2", "Bob")),
        Change::Add(user("u3", "Cy")),
        Change::Add(user("m1", "Max")),
    ];
    let changes: Vec<Change> = changes.into_iter().chain(staff_groups()).collect();
    s.apply_changes("src", &changes, None).unwrap();
    for (anchor, target) in [
        ("u1", "t-u1"),
        ("u2", "t-u2"),
        ("u3", "t-u3"),
        ("m1", "t-m1"),
        ("g1", "t-g1"),
    ] {
        link_by_create(
            s,
            anchor,
            target,
            [("displayName", values([anchor]))].into_iter().collect(),
        );
    }
    let v = s.load_neighbourhood(&anchors(&["u1"])).unwrap();
    let mut mirrored: Vec<&str> = v.mirror.anchors().map(|a| a.as_str()).collect();
    mirrored.sort();
    assert_eq!(mirrored, ["g1", "g2", "m1", "u1", "u2"]);
    let mut linked: Vec<&str> = v.links.iter().map(|l| l.anchor.as_str()).collect();
    linked.sort();
    assert_eq!(linked, ["g1", "m1", "u1", "u2"]);
    let mut targets: Vec<&str> = v.target.objects().map(|o| o.id.as_str()).collect();
    targets.sort();
    assert_eq!(targets, ["t-g1", "t-u1"]);
    // The views answer what the planner asks.
    assert_eq!(
        v.mirror.member_of(&a("u1")),
        [&dn("cn=staff,ou=groups,dc=x")]
    );
    assert_eq!(v.mirror.member_of(&a("g1")), [&dn("cn=all,ou=groups,dc=x")]);

    // A deleted object's neighbourhood holds its link and target object.
    s.apply_changes(
        "src",
        &[Change::Delete {
            anchor: a("u3"),
            object_type: "user".into(),
        }],
        None,
    )
    .unwrap();
    let v = s.load_neighbourhood(&anchors(&["u3"])).unwrap();
    assert!(v.mirror.is_empty());
    assert_eq!(
        v.links.get(&a("u3")).map(|l| l.target_id.as_str()),
        Some("t-u3")
    );
    assert!(v.target.get(&TargetId::from("t-u3")).is_some());

    let counts = s.link_counts().unwrap();
    assert_eq!(counts.get(&"User".into()), Some(&5));
    assert_eq!(counts.len(), 1);
    let all = s.load_all().unwrap();
    assert_eq!(
        (all.mirror.len(), all.links.len(), all.target.len()),
        (5, 5, 5)
    );
}

fn narrow_neighbourhoods_plan_fewer_referrers(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    // A big group (of u1 and u2) and a group of it; u1 managed by m1, u3 by u1; g1 names u1
    // by DN, u1 names m1 by DN.
    let changes = [
        Change::Add(user("u1", "Ann").with("manager", Value::dn_ref(dn("cn=Max,ou=People,dc=x")))),
        Change::Add(user("u2", "Bob")),
        Change::Add(user("u3", "Cy").with("manager", Value::anchor_ref("u1"))),
        Change::Add(user("m1", "Max")),
        Change::Add(user("x1", "Xi").with("manager", Value::anchor_ref("m1"))),
    ];
    let changes: Vec<Change> = changes.into_iter().chain(staff_groups()).collect();
    s.apply_changes("src", &changes, None).unwrap();
    for anchor in ["u1", "u2", "u3", "m1", "x1", "g1", "g2"] {
        link_by_create(
            s,
            anchor,
            &format!("t-{anchor}"),
            [("displayName", values([anchor]))].into_iter().collect(),
        );
    }
    let sorted = |v: &super::Views| {
        let mut m: Vec<String> = v.mirror.anchors().map(|a| a.to_string()).collect();
        let mut l: Vec<String> = v.links.iter().map(|l| l.anchor.to_string()).collect();
        let mut t: Vec<String> = v.target.objects().map(|o| o.id.to_string()).collect();
        m.sort();
        l.sort();
        t.sort();
        (m, l, t)
    };
    // A store narrows a neighbourhood as `reach` says, or (the default) loads the whole one;
    // the stores of this crate narrow.
    let check = |s: &dyn StateStore, list: &[&str], reach: Reach, want: [&[&str]; 3]| {
        let got = sorted(
            &s.load_neighbourhood_reaching(&anchors(list), reach)
                .unwrap(),
        );
        let whole = sorted(&s.load_neighbourhood(&anchors(list)).unwrap());
        let want = (
            want[0].iter().map(|x| x.to_string()).collect::<Vec<_>>(),
            want[1].iter().map(|x| x.to_string()).collect::<Vec<_>>(),
            want[2].iter().map(|x| x.to_string()).collect::<Vec<_>>(),
        );
        assert!(
            got == want || (!cfg!(test) && got == whole),
            "{list:?} reaching {reach:?}: {got:?}, want {want:?} (or the whole {whole:?})"
        );
        whole
    };
    // u1, what it references (m1, by DN) and what references it (g1 by DN, u3): entries and
    // links; the target object of u1 only. Not g1's other member u2, nor g2 (g1's group), nor
    // m1's other report x1 — which the whole neighbourhood holds.
    let whole = check(
        s,
        &["u1"],
        Reach::Anchors,
        [
            &["g1", "m1", "u1", "u3"],
            &["g1", "m1", "u1", "u3"],
            &["t-u1"],
        ],
    );
    assert!(whole.0.contains(&"u2".to_string()) && whole.2.contains(&"t-g1".to_string()));
    // The anchor alone: its entry, link and target object, nothing around it.
    check(
        s,
        &["u1"],
        Reach::AnchorsBare,
        [&["u1"], &["u1"], &["t-u1"]],
    );
    // What references u1 (g1 by DN, u3 by anchor), each linked.
    assert_eq!(
        s.referrers_linked(&anchors(&["u1"])).unwrap(),
        [(a("g1"), true), (a("u3"), true)]
    );
    let v = s
        .load_neighbourhood_reaching(&anchors(&["u1"]), Reach::Anchors)
        .unwrap();
    assert_eq!(
        v.mirror.member_of(&a("u1")),
        [&dn("cn=staff,ou=groups,dc=x")]
    );

    // Pages: each anchor decided with its own links and target objects; a deleted object
    // keeps its link and target object; an anchor neither mirrored nor linked adds nothing.
    s.apply_changes(
        "src",
        &[Change::Delete {
            anchor: a("x1"),
            object_type: "user".into(),
        }],
        None,
    )
    .unwrap();
    check(
        s,
        &["g2", "nobody", "x1"],
        Reach::Anchors,
        [&["g1", "g2"], &["g1", "g2", "x1"], &["t-g2", "t-x1"]],
    );
    check(s, &[], Reach::Anchors, [&[], &[], &[]]);
    check(
        s,
        &["g2", "nobody", "x1"],
        Reach::AnchorsBare,
        [&["g2"], &["g2", "x1"], &["t-g2", "t-x1"]],
    );
    check(s, &[], Reach::AnchorsBare, [&[], &[], &[]]);
    assert!(s
        .referrers_linked(&anchors(&["nobody"]))
        .unwrap()
        .is_empty());

    // Linked referrers planned: u3 (linked) brings its target object, not g1 (unlinked now),
    // which stays context without its other member u2 or its group g2.
    let run = s.begin_run("x", DateTime::UNIX_EPOCH).unwrap();
    let unlink = op(
        "g1",
        OperationKind::Unlink {
            target_id: "t-g1".into(),
        },
    );
    let id = s.journal_intent(run, &unlink, None).unwrap();
    s.journal_done(id, &unlink, None, None).unwrap();
    let whole = check(
        s,
        &["u1"],
        Reach::LinkedReferrers,
        [
            &["g1", "m1", "u1", "u3"],
            &["m1", "u1", "u3"],
            &["t-u1", "t-u3"],
        ],
    );
    assert_eq!(whole.0, ["g1", "g2", "m1", "u1", "u2", "u3"]);
    assert_eq!(
        s.referrers_linked(&anchors(&["u1"])).unwrap(),
        [(a("g1"), false), (a("u3"), true)]
    );
    // Referrers: the whole neighbourhood, whatever the store.
    let (m, l, t) = whole;
    check(
        s,
        &["u1"],
        Reach::Referrers,
        [
            &m.iter().map(String::as_str).collect::<Vec<_>>(),
            &l.iter().map(String::as_str).collect::<Vec<_>>(),
            &t.iter().map(String::as_str).collect::<Vec<_>>(),
        ],
    );
}

fn join_candidates_are_found_by_value(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    s.put_target_objects(&[
        TargetObject::new("t9", "User").with("mail", "Ann@X"),
        TargetObject::new("t8", "Group").with("mail", "ann@x"),
        TargetObject::new("t7", "User").with("mail", "bob@x"),
    ])
    .unwrap();
    link_by_create(
        s,
        "u7",
        "t7",
        [("mail", values(["bob@x"]))].into_iter().collect(),
    );
    let mut v = s.load_neighbourhood(&anchors(&["new"])).unwrap();
    assert!(v.target.is_empty());
    s.load_join_candidates(
        &mut v,
        &[
            TargetLookup {
                object_type: "User".into(),
                attribute: "MAIL".into(),
                value: Value::string("ann@x"),
            },
            TargetLookup {
                object_type: "User".into(),
                attribute: "mail".into(),
                value: Value::string("BOB@X"),
            },
        ],
    )
    .unwrap();
    let mut ids: Vec<&str> = v.target.objects().map(|o| o.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["t7", "t9"]);
    // The candidate's link comes along, so the planner sees t7 is taken.
    assert_eq!(
        v.links.anchor_of(&TargetId::from("t7")).map(|a| a.as_str()),
        Some("u7")
    );
    // A long value (beyond any index) is still found.
    let long = "x".repeat(600);
    s.put_target_objects(&[TargetObject::new("t6", "User").with("note", long.as_str())])
        .unwrap();
    s.load_join_candidates(
        &mut v,
        &[TargetLookup {
            object_type: "User".into(),
            attribute: "note".into(),
            value: Value::string(long.to_uppercase()),
        }],
    )
    .unwrap();
    assert!(v.target.get(&TargetId::from("t6")).is_some());
}

/// Many lookups at once (more than a bulk read's few hundred keys, several objects per
/// value, the same lookup twice, objects of another type at the same values) find what each
/// lookup alone finds, with the links of the linked ones.
fn join_candidates_come_in_bulk_as_one_by_one(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    let mut objects = Vec::new();
    for i in 0..600 {
        objects.push(
            TargetObject::new(format!("u{i:03}"), "User")
                .with("mail", format!("m{}", i % 300).as_str()),
        );
    }
    for i in 0..20 {
        objects.push(
            TargetObject::new(format!("g{i:03}"), "Group").with("mail", format!("m{i}").as_str()),
        );
    }
    s.put_target_objects(&objects).unwrap();
    link_by_create(
        s,
        "a7",
        "u007",
        [("mail", values(["m7"]))].into_iter().collect(),
    );
    link_by_create(
        s,
        "a8",
        "u008",
        [("mail", values(["m8"]))].into_iter().collect(),
    );
    let lookup = |i: usize| TargetLookup {
        object_type: "User".into(),
        attribute: "mail".into(),
        value: Value::string(format!("M{i}")),
    };
    // Every even value, some twice, and values no object holds.
    let lookups: Vec<TargetLookup> = (0..300)
        .step_by(2)
        .chain([0, 8, 298])
        .chain(300..320)
        .map(lookup)
        .collect();
    let mut bulk = s.load_neighbourhood(&anchors(&["new"])).unwrap();
    s.load_join_candidates(&mut bulk, &lookups).unwrap();
    let mut single = s.load_neighbourhood(&anchors(&["new"])).unwrap();
    for l in &lookups {
        s.load_join_candidates(&mut single, std::slice::from_ref(l))
            .unwrap();
    }
    let ids = |v: &crate::state::Views| {
        let mut ids: Vec<String> = v
            .target
            .objects()
            .map(|o| o.id.as_str().to_owned())
            .collect();
        ids.sort();
        ids
    };
    let expected: Vec<String> = (0..600)
        .filter(|i| (i % 300) % 2 == 0)
        .map(|i| format!("u{i:03}"))
        .collect();
    assert_eq!(ids(&bulk), expected);
    assert_eq!(ids(&single), expected);
    for id in ["u008", "u308"] {
        assert_eq!(
            bulk.target.get(&TargetId::from(id)),
            single.target.get(&TargetId::from(id))
        );
    }
    // The link of a linked candidate comes along; not that of an object of another type.
    let anchor_of = |v: &crate::state::Views, id: &str| {
        v.links
            .anchor_of(&TargetId::from(id))
            .map(|a| a.as_str().to_owned())
    };
    assert_eq!(
        anchor_of(&bulk, "u007"),
        None,
        "u007 holds an odd value: not a candidate"
    );
    assert_eq!(anchor_of(&bulk, "u008").as_deref(), Some("a8"));
    assert_eq!(anchor_of(&single, "u008").as_deref(), Some("a8"));
    let linked = TargetLookup {
        object_type: "User".into(),
        attribute: "mail".into(),
        value: Value::string("m7"),
    };
    s.load_join_candidates(&mut bulk, &[linked]).unwrap();
    assert_eq!(anchor_of(&bulk, "u007").as_deref(), Some("a7"));
}

fn journal_lifecycle_updates_links_and_target_mirror(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    assert!(matches!(
        s.journal_intent(
            super::RunId(99),
            &op(
                "u1",
                OperationKind::Unlink {
                    target_id: "t".into()
                }
            ),
            None
        ),
        Err(StateError::UnknownRun(_))
    ));
    let run = s.begin_run("delta-sync", t(0)).unwrap();
    let (create, sent) = create_op(
        "u1",
        [("displayName", values(["Ann"]))].into_iter().collect(),
    );
    let j1 = s.journal_intent(run, &create, Some(&sent)).unwrap();
    let unconfirmed = s.journal_unconfirmed().unwrap();
    assert_eq!(unconfirmed.len(), 1);
    assert_eq!(unconfirmed[0].id, j1);
    assert_eq!(unconfirmed[0].state, JournalState::Intended);
    assert_eq!(unconfirmed[0].operation, create);
    assert_eq!(unconfirmed[0].sent.as_ref(), Some(&sent));

    // A create needs the new id.
    assert!(matches!(
        s.journal_done(j1, &create, Some(&sent), None),
        Err(StateError::Invalid(_))
    ));
    assert!(matches!(
        s.journal_done(
            super::JournalId(12345),
            &create,
            Some(&sent),
            Some(&"t1".into())
        ),
        Err(StateError::UnknownJournalId(_))
    ));
    s.journal_done(j1, &create, Some(&sent), Some(&TargetId::from("t1")))
        .unwrap();
    assert!(s.journal_unconfirmed().unwrap().is_empty());
    let v = s.load_neighbourhood(&anchors(&["u1"])).unwrap();
    assert_eq!(
        v.links.get(&a("u1")).map(|l| l.target_id.as_str()),
        Some("t1")
    );
    assert_eq!(
        v.target
            .get(&"t1".into())
            .and_then(|o| o.attributes.first_str("displayName")),
        Some("Ann")
    );

    // An update changes the target mirror.
    let changes = vec![AttributeChange::replace("title", values(["Boss"]))];
    let update = op(
        "u1",
        OperationKind::Update {
            target: TargetRef::Existing("t1".into()),
            changes: changes.clone(),
        },
    );
    let sent_u = TargetOperation::Update {
        id: "t1".into(),
        object_type: "User".into(),
        changes,
    };
    let j2 = s.journal_intent(run, &update, Some(&sent_u)).unwrap();
    s.journal_done(j2, &update, Some(&sent_u), None).unwrap();
    let all = s.load_all().unwrap();
    assert_eq!(
        all.target
            .get(&"t1".into())
            .and_then(|o| o.attributes.first_str("title")),
        Some("Boss")
    );

    // A failure is recorded with its error.
    let j3 = s.journal_intent(run, &update, Some(&sent_u)).unwrap();
    s.journal_failed(j3, "Constraint: title too long", false)
        .unwrap();

    // A join without changes links without a target operation; an unlink forgets the link.
    let join = op(
        "u2",
        OperationKind::Join {
            target_id: "t9".into(),
            changes: vec![],
        },
    );
    let j4 = s.journal_intent(run, &join, None).unwrap();
    s.journal_done(j4, &join, None, None).unwrap();
    assert_eq!(
        s.load_all()
            .unwrap()
            .links
            .get(&a("u2"))
            .map(|l| l.target_id.as_str()),
        Some("t9")
    );
    let unlink = op(
        "u2",
        OperationKind::Unlink {
            target_id: "t9".into(),
        },
    );
    let j5 = s.journal_intent(run, &unlink, None).unwrap();
    s.journal_done(j5, &unlink, None, None).unwrap();

    // A delete removes the link and the target object.
    let delete = op(
        "u1",
        OperationKind::Delete {
            target_id: "t1".into(),
        },
    );
    let sent_d = TargetOperation::Delete {
        id: "t1".into(),
        object_type: "User".into(),
    };
    let run2 = s.begin_run("delta-sync", t(60)).unwrap();
    let j6 = s.journal_intent(run2, &delete, Some(&sent_d)).unwrap();
    s.journal_done(j6, &delete, Some(&sent_d), None).unwrap();
    let all = s.load_all().unwrap();
    assert!(all.links.is_empty());
    assert!(all.target.is_empty());
    // An intent never confirmed stays visible.
    let j7 = s.journal_intent(run2, &update, Some(&sent_u)).unwrap();

    let journal = s.journal(Some(run)).unwrap();
    let states: Vec<(super::JournalId, JournalState)> =
        journal.iter().map(|j| (j.id, j.state)).collect();
    assert_eq!(
        states,
        [
            (j1, JournalState::Done),
            (j2, JournalState::Done),
            (j3, JournalState::Failed),
            (j4, JournalState::Done),
            (j5, JournalState::Done),
        ]
    );
    assert_eq!(journal[0].target_id, Some("t1".into()));
    assert_eq!(journal[3].target_id, Some("t9".into()));
    // Done rows keep what the audit needs, not the payloads; a failed row keeps them.
    assert_eq!(
        journal
            .iter()
            .map(|j| (j.anchor.as_str(), j.kind.as_str()))
            .collect::<Vec<_>>(),
        [
            ("u1", "create"),
            ("u1", "update"),
            ("u1", "update"),
            ("u2", "join"),
            ("u2", "unlink")
        ]
    );
    for j in [&journal[0], &journal[1], &journal[3], &journal[4]] {
        assert_eq!((&j.operation, &j.sent), (&None, &None), "{j:?}");
    }
    assert_eq!(
        journal[1].attributes,
        [crate::model::AttrName::from("title")]
    );
    assert!(journal[0].attributes.is_empty());
    assert_eq!(journal[2].operation.as_ref(), Some(&update));
    assert_eq!(journal[2].sent.as_ref(), Some(&sent_u));
    assert_eq!(
        journal[2].error.as_deref(),
        Some("Constraint: title too long")
    );
    assert!(!journal[2].retryable);
    assert_eq!(s.journal(None).unwrap().len(), 7);
    assert_eq!(s.journal(Some(run2)).unwrap().len(), 2);
    let unconfirmed: Vec<_> = s
        .journal_unconfirmed()
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(unconfirmed, [j7]);
    s.journal_failed(j7, "Unavailable: try later", true)
        .unwrap();
    assert!(s.journal(Some(run2)).unwrap()[1].retryable);
    assert!(s.journal_unconfirmed().unwrap().is_empty());
}

/// What a test compares of a store: journal, unconfirmed rows, links, target mirror, link
/// counts, dirty set (everything the journal's calls may change but the fingerprint's value).
fn journal_state(s: &dyn StateStore) -> String {
    let v = s.load_all().unwrap();
    let mut links: Vec<String> = v.links.iter().map(|l| format!("{l:?}")).collect();
    links.sort();
    let mut targets: Vec<String> = v.target.objects().map(|o| format!("{o:?}")).collect();
    targets.sort();
    format!(
        "{:?}\n{:?}\n{links:?}\n{targets:?}\n{:?}\n{:?}",
        s.journal(None).unwrap(),
        s.journal_unconfirmed().unwrap(),
        s.link_counts().unwrap(),
        s.dirty().unwrap(),
    )
}

fn title_update(anchor: &str, target: &str, title: &str) -> (Operation, TargetOperation) {
    let changes = vec![AttributeChange::replace("title", values([title]))];
    let o = op(
        anchor,
        OperationKind::Update {
            target: TargetRef::Existing(target.into()),
            changes: changes.clone(),
        },
    );
    let sent = TargetOperation::Update {
        id: target.into(),
        object_type: "User".into(),
        changes,
    };
    (o, sent)
}

/// `journal_intents` and `journal_outcomes` take effect whole or not at all: a batch with one
/// bad entry leaves the journal, links and target mirror as they were.
fn group_commit_is_all_or_nothing(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    link_by_create(
        s,
        "u0",
        "t0",
        [("displayName", values(["Zed"]))].into_iter().collect(),
    );
    let run = s.begin_run("delta-sync", t(10)).unwrap();
    let (c1, sc1) = create_op(
        "u1",
        [("displayName", values(["Ann"]))].into_iter().collect(),
    );
    let (c2, sc2) = create_op(
        "u2",
        [("displayName", values(["Bob"]))].into_iter().collect(),
    );
    let (u0, su0) = title_update("u0", "t0", "Boss");
    let before = journal_state(s);
    // A batch for a run never begun journals nothing.
    assert!(matches!(
        s.journal_intents(super::RunId(999), &[(&c1, Some(&sc1)), (&c2, Some(&sc2))]),
        Err(StateError::UnknownRun(_))
    ));
    assert_eq!(journal_state(s), before);
    let ids = s
        .journal_intents(
            run,
            &[(&c1, Some(&sc1)), (&c2, Some(&sc2)), (&u0, Some(&su0))],
        )
        .unwrap();
    assert_eq!(ids.len(), 3);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let unconfirmed = s.journal_unconfirmed().unwrap();
    assert_eq!(
        unconfirmed.iter().map(|j| j.id).collect::<Vec<_>>(),
        ids,
        "the batch is journaled in order"
    );
    assert_eq!(unconfirmed[2].operation, u0);
    assert_eq!(unconfirmed[2].sent.as_ref(), Some(&su0));

    let before = journal_state(s);
    let fingerprint = s.fingerprint().unwrap();
    let (t1, t2) = (TargetId::from("t1"), TargetId::from("t2"));
    let done = |id, op, sent, target_id| super::JournalOutcome::Done {
        id,
        op,
        sent,
        target_id,
    };
    let bad_batches: Vec<(&str, Vec<super::JournalOutcome<'_>>)> = vec![
        (
            "a create done without its target id",
            vec![
                done(ids[0], &c1, Some(&sc1), Some(&t1)),
                done(ids[2], &u0, Some(&su0), None),
                done(ids[1], &c2, Some(&sc2), None),
            ],
        ),
        (
            "an unknown journal id (done)",
            vec![
                done(ids[0], &c1, Some(&sc1), Some(&t1)),
                done(ids[2], &u0, Some(&su0), None),
                done(super::JournalId(4242), &c2, Some(&sc2), Some(&t2)),
            ],
        ),
        (
            "an unknown journal id (failed)",
            vec![
                done(ids[0], &c1, Some(&sc1), Some(&t1)),
                super::JournalOutcome::Failed {
                    id: ids[1],
                    error: "Conflict",
                    retryable: false,
                },
                super::JournalOutcome::Failed {
                    id: super::JournalId(4243),
                    error: "x",
                    retryable: true,
                },
            ],
        ),
    ];
    for (why, batch) in &bad_batches {
        assert!(s.journal_outcomes(batch).is_err(), "{why}: accepted");
        assert_eq!(journal_state(s), before, "{why}: the batch left traces");
        assert_eq!(s.fingerprint().unwrap(), fingerprint, "{why}");
    }
    // The export's group commit (outcomes with the next intents) is all or nothing too: a bad
    // outcome journals no intent, a run never begun records no outcome.
    let (c3, sc3) = create_op(
        "u3",
        [("displayName", values(["Cy"]))].into_iter().collect(),
    );
    for (why, batch) in &bad_batches {
        assert!(
            s.journal_commit(run, batch, &[(&c3, Some(&sc3))]).is_err(),
            "{why}: accepted with intents"
        );
        assert_eq!(journal_state(s), before, "{why}: the commit left traces");
        assert_eq!(s.fingerprint().unwrap(), fingerprint, "{why}");
    }
    let good = [
        done(ids[0], &c1, Some(&sc1), Some(&t1)),
        super::JournalOutcome::Failed {
            id: ids[1],
            error: "Conflict: userName taken",
            retryable: false,
        },
        done(ids[2], &u0, Some(&su0), None),
    ];
    assert!(matches!(
        s.journal_commit(super::RunId(999), &good, &[(&c3, Some(&sc3))]),
        Err(StateError::UnknownRun(_))
    ));
    assert_eq!(journal_state(s), before, "a run never begun: traces left");
    assert_eq!(s.fingerprint().unwrap(), fingerprint);
    // A good batch takes effect whole, with the intents journaled after it.
    let next = s.journal_commit(run, &good, &[(&c3, Some(&sc3))]).unwrap();
    assert_eq!(next.len(), 1);
    assert!(next[0] > ids[2], "{next:?}");
    assert_ne!(s.fingerprint().unwrap(), fingerprint);
    let unconfirmed = s.journal_unconfirmed().unwrap();
    assert_eq!(
        unconfirmed
            .iter()
            .map(|j| (j.id, &j.operation, j.sent.as_ref()))
            .collect::<Vec<_>>(),
        [(next[0], &c3, Some(&sc3))]
    );
    let t3 = TargetId::from("t3");
    assert!(s
        .journal_commit(run, &[done(next[0], &c3, Some(&sc3), Some(&t3))], &[])
        .unwrap()
        .is_empty());
    assert!(s.journal_unconfirmed().unwrap().is_empty());
    let v = s.load_all().unwrap();
    assert_eq!(
        v.links.get(&a("u1")).map(|l| l.target_id.as_str()),
        Some("t1")
    );
    assert!(v.links.get(&a("u2")).is_none());
    assert_eq!(
        v.target
            .get(&"t0".into())
            .and_then(|o| o.attributes.first_str("title")),
        Some("Boss")
    );
    let j = s.journal(Some(run)).unwrap();
    assert_eq!(
        j.iter().map(|j| j.state).collect::<Vec<_>>(),
        [
            JournalState::Done,
            JournalState::Failed,
            JournalState::Done,
            JournalState::Done
        ]
    );
    assert_eq!(j[1].error.as_deref(), Some("Conflict: userName taken"));
    assert_eq!(
        v.links.get(&a("u3")).map(|l| l.target_id.as_str()),
        Some("t3")
    );
    // An empty batch is nothing.
    assert!(s.journal_intents(run, &[]).unwrap().is_empty());
    s.journal_outcomes(&[]).unwrap();
    assert!(s.journal_commit(run, &[], &[]).unwrap().is_empty());
}

/// A batch of 1,000 outcomes (creates, updates, failures) has the effect of 1,000 single calls.
fn batched_outcomes_equal_single_calls(mut a_: Box<dyn StateStore>, mut b: Box<dyn StateStore>) {
    const N: usize = 1_000;
    let mut ops: Vec<(Operation, TargetOperation, Option<TargetId>, bool)> = Vec::new();
    for i in 0..N {
        // Creates first, then title updates of the creates that worked; every 7th fails.
        let fails = i % 7 == 3;
        if i < 600 {
            let (o, sent) = create_op(
                &format!("u{i}"),
                [
                    ("displayName", values([format!("User {i}").as_str()])),
                    ("mail", values([format!("U{i}@X").as_str()])),
                ]
                .into_iter()
                .collect(),
            );
            ops.push((o, sent, Some(TargetId::from(format!("t{i}"))), fails));
        } else {
            let k = (i - 600) * 3 % 600;
            let k = if k % 7 == 3 { k + 1 } else { k };
            let (o, sent) = title_update(&format!("u{k}"), &format!("t{k}"), &format!("T{i}"));
            ops.push((o, sent, None, fails));
        }
    }
    let runs: Vec<_> = [&mut a_, &mut b]
        .into_iter()
        .map(|s| s.begin_run("delta-sync", t(0)).unwrap())
        .collect();
    // Batched: the creates, then the updates, each as one batch of intents and one of outcomes.
    let (creates, updates) = ops.split_at(600);
    for part in [creates, updates] {
        let batch: Vec<(&Operation, Option<&TargetOperation>)> =
            part.iter().map(|(o, s, _, _)| (o, Some(s))).collect();
        let ids = a_.journal_intents(runs[0], &batch).unwrap();
        let outcomes: Vec<super::JournalOutcome<'_>> = part
            .iter()
            .zip(&ids)
            .map(|((o, s, tid, fails), id)| {
                if *fails {
                    super::JournalOutcome::Failed {
                        id: *id,
                        error: "Throttled",
                        retryable: true,
                    }
                } else {
                    super::JournalOutcome::Done {
                        id: *id,
                        op: o,
                        sent: Some(s),
                        target_id: tid.as_ref(),
                    }
                }
            })
            .collect();
        a_.journal_outcomes(&outcomes).unwrap();
    }
    // One by one.
    for part in [creates, updates] {
        let ids: Vec<_> = part
            .iter()
            .map(|(o, s, _, _)| b.journal_intent(runs[1], o, Some(s)).unwrap())
            .collect();
        for ((o, s, tid, fails), id) in part.iter().zip(ids) {
            if *fails {
                b.journal_failed(id, "Throttled", true).unwrap();
            } else {
                b.journal_done(id, o, Some(s), tid.as_ref()).unwrap();
            }
        }
    }
    let (sa, sb) = (journal_state(a_.as_ref()), journal_state(b.as_ref()));
    assert!(sa == sb, "a batch of outcomes differs from single calls");
    assert_eq!(a_.journal(None).unwrap().len(), N);
    assert_eq!(a_.load_all().unwrap().links.len(), 600 - 600 / 7 - 1);
}

/// `prune_journal` removes the finished runs outside both windows with their rows — never an
/// intended row (nor its run), never a run not finished.
fn retention_prunes_old_finished_runs_only(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    const DAY: i64 = 86_400;
    let mut runs = Vec::new();
    for i in 0..6 {
        let r = s.begin_run("delta-sync", t(i * DAY)).unwrap();
        let (o, sent) = title_update(&format!("u{i}"), &format!("t{i}"), "x");
        let ids = s
            .journal_intents(
                r,
                &[(&o, Some(&sent)), (&o, Some(&sent)), (&o, Some(&sent))],
            )
            .unwrap();
        s.journal_done(ids[0], &o, Some(&sent), None).unwrap();
        s.journal_failed(ids[1], "Throttled", true).unwrap();
        if i != 1 {
            s.journal_failed(ids[2], "Throttled", true).unwrap();
        }
        // Run 3 never finished (a crash); the others finished the day they began.
        if i != 3 {
            s.finish_run(r, t(i * DAY + 60), "success", "{}").unwrap();
        }
        runs.push(r);
    }
    let keep_all = super::Retention { runs: 0, days: 365 };
    assert_eq!(
        s.prune_journal(&keep_all, t(6 * DAY)).unwrap(),
        super::Pruned::default()
    );
    assert_eq!(s.journal(None).unwrap().len(), 18);
    // Keep the newest 2 runs and 2 days: runs 0..=3 are outside both windows.
    let r = super::Retention { runs: 2, days: 2 };
    let pruned = s.prune_journal(&r, t(6 * DAY)).unwrap();
    // Run 0 and 2 go whole; run 1 keeps its intended row (and its record); run 3 never
    // finished.
    assert_eq!(
        pruned,
        super::Pruned {
            runs: 2,
            entries: 8
        }
    );
    let left: Vec<_> = s.runs(100).unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(left, [runs[5], runs[4], runs[3], runs[1]]);
    let rows: Vec<(super::RunId, JournalState)> = s
        .journal(None)
        .unwrap()
        .into_iter()
        .map(|j| (j.run, j.state))
        .collect();
    assert_eq!(rows.len(), 10);
    assert_eq!(rows[0], (runs[1], JournalState::Intended));
    assert!(rows[1..4].iter().all(|(r, _)| *r == runs[3]));
    assert_eq!(s.journal_unconfirmed().unwrap().len(), 1);
    // Pruning again finds nothing more.
    assert_eq!(
        s.prune_journal(&r, t(6 * DAY)).unwrap(),
        super::Pruned::default()
    );
    // Recovered, the intended row and its run go too.
    let j = s.journal_unconfirmed().unwrap()[0].id;
    s.journal_failed(j, "gone", false).unwrap();
    assert_eq!(
        s.prune_journal(&r, t(6 * DAY)).unwrap(),
        super::Pruned {
            runs: 1,
            entries: 1
        }
    );
    // New runs get new ids.
    let next = s.begin_run("delta-sync", t(7 * DAY)).unwrap();
    assert!(next > runs[5]);
}

/// `finish_run` applies the store's retention (by default, the newest 100 runs and 30 days).
fn finishing_a_run_applies_the_default_retention(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    const DAY: i64 = 86_400;
    let mut first = Vec::new();
    for i in 0..103 {
        let r = s.begin_run("delta-sync", t(i)).unwrap();
        let (o, sent) = title_update("u1", "t1", "x");
        let j = s.journal_intent(r, &o, Some(&sent)).unwrap();
        s.journal_failed(j, "Throttled", true).unwrap();
        if i < 102 {
            s.finish_run(r, t(i + 1), "success", "{}").unwrap();
        }
        first.push(r);
    }
    // All within 30 days so far: nothing pruned.
    assert_eq!(s.runs(1000).unwrap().len(), 103);
    s.finish_run(first[102], t(40 * DAY), "success", "{}")
        .unwrap();
    let runs = s.runs(1000).unwrap();
    assert_eq!(runs.len(), 100);
    assert_eq!(runs.last().map(|r| r.id), Some(first[3]));
    assert_eq!(s.journal(None).unwrap().len(), 100);
}

/// Lookups find target objects by attributes declared for lookup and by those not declared.
fn undeclared_lookup_attributes_are_still_found(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    s.put_target_objects(&[
        TargetObject::new("t1", "User")
            .with("mail", "Ann@X")
            .with("title", "Boss"),
        TargetObject::new("t2", "Group").with("mail", "ann@x"),
    ])
    .unwrap();
    let find = |s: &dyn StateStore, ty: &str, attr: &str, value: &str| {
        let mut v = super::Views::default();
        s.load_join_candidates(
            &mut v,
            &[TargetLookup {
                object_type: ty.into(),
                attribute: attr.into(),
                value: Value::string(value),
            }],
        )
        .unwrap();
        let mut ids: Vec<String> = v.target.objects().map(|o| o.id.to_string()).collect();
        ids.sort();
        ids
    };
    let declare = |s: &mut dyn StateStore, decl: &[(&str, &[&str])]| {
        let m: std::collections::BTreeMap<_, std::collections::BTreeSet<_>> = decl
            .iter()
            .map(|(ty, attrs)| ((*ty).into(), attrs.iter().map(|a| (*a).into()).collect()))
            .collect();
        s.set_lookup_attributes(&m).unwrap();
    };
    for decl in [
        &[("User", &["MAIL"][..])][..],
        &[("User", &["userName"][..]), ("Group", &["displayName"][..])][..],
        &[][..],
    ] {
        declare(s, decl);
        // Objects written after the declaration are found as well as those before.
        s.put_target_objects(&[TargetObject::new("t3", "User").with("title", "boss")])
            .unwrap();
        assert_eq!(find(s, "User", "mail", "ann@x"), ["t1"], "{decl:?}");
        assert_eq!(find(s, "User", "title", "BOSS"), ["t1", "t3"], "{decl:?}");
        assert_eq!(find(s, "Group", "Mail", "ANN@x"), ["t2"], "{decl:?}");
        assert!(find(s, "Group", "title", "boss").is_empty(), "{decl:?}");
    }
}

/// A changed target type: the anchor's new object is created (and linked) before its old object
/// is deleted or unlinked; those keep the new link and remove only the old object.
fn deprovisioning_an_old_object_keeps_the_new_link(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    link_by_create(s, "u1", "old-1", Attributes::new());
    link_by_create(s, "u2", "old-2", Attributes::new());
    link_by_create(s, "u1", "new-1", Attributes::new());
    link_by_create(s, "u2", "new-2", Attributes::new());
    let run = s.begin_run("delta-sync", t(10)).unwrap();
    // Journals a delete (`sent`) or an unlink of `target` for `anchor` as done.
    let mut done = |anchor: &str, target: &str, sent: bool| {
        let target_id = TargetId::from(target);
        let (kind, sent) = if sent {
            let d = TargetOperation::Delete {
                id: target_id.clone(),
                object_type: "User".into(),
            };
            (OperationKind::Delete { target_id }, Some(d))
        } else {
            (OperationKind::Unlink { target_id }, None)
        };
        let o = op(anchor, kind);
        let j = s.journal_intent(run, &o, sent.as_ref()).unwrap();
        s.journal_done(j, &o, sent.as_ref(), None).unwrap();
        s.load_all().unwrap()
    };
    done("u1", "old-1", true);
    let all = done("u2", "old-2", false);
    for (anchor, new) in [("u1", "new-1"), ("u2", "new-2")] {
        assert_eq!(
            all.links.get(&a(anchor)).map(|l| l.target_id.as_str()),
            Some(new),
            "{anchor}"
        );
    }
    assert!(all.target.get(&"old-1".into()).is_none());
    assert!(all.target.get(&"old-2".into()).is_some());
    // The delete of the object still linked removes the link.
    let all = done("u1", "new-1", true);
    assert!(all.links.get(&a("u1")).is_none());
}

/// A done create whose target object is already linked (to another anchor) or stored takes
/// its place: one link per anchor and per target object, the counts and the value index
/// following.
fn a_done_create_replaces_links_and_objects_in_its_way(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    let mail = |m: &str| -> Attributes { [("mail", values([m]))].into_iter().collect() };
    let found = |s: &dyn StateStore, m: &str| -> Vec<String> {
        let mut v = s.load_neighbourhood(&anchors(&["nobody"])).unwrap();
        s.load_join_candidates(
            &mut v,
            &[TargetLookup {
                object_type: "User".into(),
                attribute: "mail".into(),
                value: Value::string(m),
            }],
        )
        .unwrap();
        let mut ids: Vec<String> = v.target.objects().map(|o| o.id.to_string()).collect();
        ids.sort();
        ids
    };
    link_by_create(s, "u1", "t1", mail("one@x"));
    link_by_create(s, "u2", "t2", mail("two@x"));
    // The target object t1 is created again for u2: u1 loses its link, u2 its old one.
    link_by_create(s, "u2", "t1", mail("again@x"));
    let v = s.load_all().unwrap();
    assert!(v.links.get(&a("u1")).is_none());
    assert_eq!(
        v.links.get(&a("u2")).map(|l| l.target_id.as_str()),
        Some("t1")
    );
    assert_eq!(v.links.len(), 1);
    assert_eq!(s.link_counts().unwrap().get(&"User".into()), Some(&1));
    assert_eq!(
        v.target
            .get(&"t1".into())
            .map(|o| format!("{:?}", o.attributes)),
        Some(format!("{:?}", mail("again@x")))
    );
    assert!(found(s, "one@x").is_empty());
    assert_eq!(found(s, "again@x"), ["t1"]);
    // A target object stored by a read (no link) is overwritten by the create that makes it.
    s.put_target_objects(&[TargetObject::new("t3", "User").with("mail", "read@x")])
        .unwrap();
    link_by_create(s, "u3", "t3", mail("made@x"));
    assert!(found(s, "read@x").is_empty());
    assert_eq!(found(s, "made@x"), ["t3"]);
    assert_eq!(s.link_counts().unwrap().get(&"User".into()), Some(&2));
    // The same create recorded twice changes nothing.
    let before = journal_state(s);
    link_by_create(s, "u3", "t3", mail("made@x"));
    let after = journal_state(s);
    let links = |st: &str| st.lines().nth(2).map(str::to_owned);
    assert_eq!(links(&before), links(&after));
    assert_eq!(s.link_counts().unwrap().get(&"User".into()), Some(&2));
}

fn secrets_are_not_stored(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    let run = s.begin_run("delta-sync", t(0)).unwrap();
    let create = op(
        "u1",
        OperationKind::Create {
            attributes: [("displayName", values(["Ann"]))].into_iter().collect(),
            secrets: [("password", values(["hunter2"]))].into_iter().collect(),
            lookup: Vec::new(),
        },
    );
    let sent = create.to_target_operation(&Default::default()).unwrap();
    let j = s.journal_intent(run, &create, sent.as_ref()).unwrap();
    s.journal_done(j, &create, sent.as_ref(), Some(&"t1".into()))
        .unwrap();
    let mut secret = AttributeChange::replace("password", values(["s3cret!"]));
    secret.redacted = true;
    let changes = vec![secret, AttributeChange::replace("title", values(["Boss"]))];
    let update = op(
        "u1",
        OperationKind::Update {
            target: TargetRef::Existing("t1".into()),
            changes: changes.clone(),
        },
    );
    let sent_u = TargetOperation::Update {
        id: "t1".into(),
        object_type: "User".into(),
        changes,
    };
    let j = s.journal_intent(run, &update, Some(&sent_u)).unwrap();
    s.journal_done(j, &update, Some(&sent_u), None).unwrap();

    let journal = format!("{:?}", s.journal(None).unwrap());
    let json = serde_json::to_string(&s.journal(None).unwrap()).unwrap();
    let target = format!("{:?}", s.load_all().unwrap().target);
    for text in [&journal, &json, &target] {
        assert!(!text.contains("hunter2"), "secret stored: {text}");
        assert!(!text.contains("s3cret"), "secret stored: {text}");
    }
    assert!(target.contains("Boss"));
}

fn escrow_counts_attempts(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    assert_eq!(s.escrow(&a("b"), "first", t(10)).unwrap(), 1);
    assert_eq!(s.escrow(&a("a"), "other", t(5)).unwrap(), 1);
    assert_eq!(s.escrow(&a("b"), "second", t(20)).unwrap(), 2);
    let e = s.escrowed().unwrap();
    assert_eq!(e.len(), 2);
    assert_eq!(e[0].anchor, a("a"));
    assert_eq!(
        (e[1].attempts, e[1].next_retry, e[1].last_error.as_str()),
        (2, t(20), "second")
    );
    s.release(&a("b")).unwrap();
    s.release(&a("not-there")).unwrap();
    assert_eq!(s.escrowed().unwrap().len(), 1);
    // Released, a new failure counts from one.
    assert_eq!(s.escrow(&a("b"), "again", t(30)).unwrap(), 1);
}

fn runs_are_recorded(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    let r1 = s.begin_run("full-import", t(0)).unwrap();
    let r2 = s.begin_run("delta-sync", t(100)).unwrap();
    assert_ne!(r1, r2);
    s.finish_run(r1, t(50), "success", r#"{"created":3}"#)
        .unwrap();
    assert!(matches!(
        s.finish_run(super::RunId(4242), t(1), "x", "{}"),
        Err(StateError::UnknownRun(_))
    ));
    let runs = s.runs(10).unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].id, r2);
    assert_eq!(runs[0].finished, None);
    assert_eq!(runs[1].profile, "full-import");
    assert_eq!(runs[1].started, t(0));
    assert_eq!(runs[1].finished, Some(t(50)));
    assert_eq!(runs[1].outcome.as_deref(), Some("success"));
    assert_eq!(runs[1].report_json.as_deref(), Some(r#"{"created":3}"#));
    assert_eq!(s.runs(1).unwrap().len(), 1);
}

fn target_objects_are_kept(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    s.put_target_objects(&[
        TargetObject::new("t2", "User").with("mail", "b@x"),
        TargetObject::new("t1", "User").with("mail", "a@x"),
    ])
    .unwrap();
    s.put_target_objects(&[TargetObject::new("t2", "User").with("mail", "c@x")])
        .unwrap();
    assert_eq!(s.target_ids().unwrap(), [TargetId::from("t1"), "t2".into()]);
    let all = s.load_all().unwrap();
    assert_eq!(
        all.target
            .get(&"t2".into())
            .and_then(|o| o.attributes.first_str("mail")),
        Some("c@x")
    );
    // The replaced value is no longer found by a join lookup.
    let mut v = s.load_neighbourhood(&[]).unwrap();
    s.load_join_candidates(
        &mut v,
        &[TargetLookup {
            object_type: "User".into(),
            attribute: "mail".into(),
            value: Value::string("b@x"),
        }],
    )
    .unwrap();
    assert!(v.target.is_empty());
    s.remove_target_objects(&["t1".into(), "nope".into()])
        .unwrap();
    assert_eq!(s.target_ids().unwrap(), [TargetId::from("t2")]);
}

fn fingerprint_moves_with_plan_inputs_only(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    let mut last = s.fingerprint().unwrap();
    let mut moved = |s: &mut dyn StateStore, what: &str, expect: bool| {
        let now = s.fingerprint().unwrap();
        assert_eq!(now != last, expect, "fingerprint after {what}");
        last = now;
    };
    let reads = |s: &mut dyn StateStore| {
        s.load_all().unwrap();
        s.load_neighbourhood(&anchors(&["a"])).unwrap();
        s.dirty().unwrap();
        s.journal(None).unwrap();
        s.journal_unconfirmed().unwrap();
        s.escrowed().unwrap();
        s.runs(5).unwrap();
        s.target_ids().unwrap();
        s.watermark("src").unwrap();
        s.source_entry(&a("a")).unwrap();
        s.link_counts().unwrap();
    };
    reads(s);
    moved(s, "reads", false);
    s.apply_changes("src", &[Change::Add(user("a", "A"))], None)
        .unwrap();
    moved(s, "a delta change", true);
    s.apply_changes("src", &[Change::Replace(user("a", "A"))], None)
        .unwrap();
    moved(s, "a delta repeating the mirror", false);
    s.apply_changes("src", &[], Some(&Watermark::new("usn", b"1".to_vec())))
        .unwrap();
    moved(s, "a watermark alone", false);
    s.clear_dirty(&anchors(&["a"])).unwrap();
    moved(s, "clear_dirty", true);
    s.clear_dirty(&anchors(&["a"])).unwrap();
    moved(s, "clear_dirty of clean anchors", false);
    s.mark_dirty(&anchors(&["a"])).unwrap();
    moved(s, "mark_dirty", true);
    let g = s.begin_full_import("src").unwrap();
    moved(s, "begin_full_import", false);
    s.import_entries(g, &[user("a", "A")]).unwrap();
    moved(s, "an unchanged import batch", false);
    s.import_entries(g, &[user("b", "B")]).unwrap();
    moved(s, "an import batch with a new entry", true);
    s.finish_full_import("src", g, None, 0.0).unwrap();
    moved(s, "a full import deleting nothing", false);
    let g = s.begin_full_import("src").unwrap();
    s.import_entries(g, &[user("a", "A")]).unwrap();
    s.finish_full_import("src", g, None, 0.5).unwrap();
    moved(s, "a full import deleting b", true);
    let run = s.begin_run("x", t(0)).unwrap();
    moved(s, "begin_run", false);
    let (o, sent) = create_op("a", Attributes::new());
    let j = s.journal_intent(run, &o, Some(&sent)).unwrap();
    moved(s, "journal_intent", false);
    let j2 = s.journal_intent(run, &o, Some(&sent)).unwrap();
    s.journal_failed(j2, "x", true).unwrap();
    moved(s, "journal_failed", false);
    s.journal_done(j, &o, Some(&sent), Some(&"t1".into()))
        .unwrap();
    moved(s, "journal_done", true);
    s.escrow(&a("a"), "x", t(1)).unwrap();
    s.release(&a("a")).unwrap();
    moved(s, "escrow", false);
    s.finish_run(run, t(2), "success", "{}").unwrap();
    moved(s, "finish_run", false);
    s.clear_watermark("src").unwrap();
    moved(s, "clear_watermark", false);
    s.put_target_objects(&[TargetObject::new("t5", "User")])
        .unwrap();
    moved(s, "put_target_objects", true);
    s.remove_target_objects(&["t5".into()]).unwrap();
    moved(s, "remove_target_objects", true);
    s.remove_target_objects(&["t5".into()]).unwrap();
    moved(s, "removing absent target objects", false);
    reads(s);
    moved(s, "reads", false);
}

/// A renamed and moved container's subtree follows it (children, grandchildren, escaped commas
/// and look-alike DNs left alone), dirty; a repeat moves nothing.
fn subtrees_move_with_their_container(mut s: Box<dyn StateStore>) {
    let ou = |anchor: &str, at: &str| Entry::new(anchor, "container").with_dn(dn(at));
    let person = |anchor: &str, at: &str| {
        Entry::new(anchor, "user")
            .with_dn(dn(at))
            .with("cn", anchor)
    };
    s.apply_changes(
        "src",
        &[
            Change::Add(ou("staff", "OU=Staff,DC=x")),
            Change::Add(ou("sales", "OU=Sales,OU=Staff,DC=x")),
            Change::Add(person("ann", "CN=Ann,OU=Staff,DC=x")),
            Change::Add(person("bob", "CN=Bob,OU=Sales,OU=Staff,DC=x")),
            Change::Add(person("cy", "CN=Cy,OU=BigStaff,DC=x")),
            Change::Add(person("di", "CN=Di,OU=Old\\,OU=Staff,DC=x")),
            Change::Add(
                Entry::new("grp", "group")
                    .with("member", Value::dn_ref(dn("CN=Bob,OU=Sales,OU=Staff,DC=x"))),
            ),
        ],
        None,
    )
    .unwrap();
    reset_dirty(s.as_mut());
    let before = s.fingerprint().unwrap();
    let to = dn("OU=People,OU=Corp,DC=x");
    let moved = s.move_subtrees(&[(a("staff"), to.clone())]).unwrap();
    assert_eq!(moved, anchors(&["ann", "bob", "sales"]));
    assert_ne!(s.fingerprint().unwrap(), before);
    let at = |s: &dyn StateStore, anchor: &str| s.source_entry(&a(anchor)).unwrap().unwrap().dn;
    assert_eq!(
        at(s.as_ref(), "ann"),
        Some(dn("CN=Ann,OU=People,OU=Corp,DC=x"))
    );
    assert_eq!(
        at(s.as_ref(), "bob"),
        Some(dn("cn=bob,ou=sales,ou=people,ou=corp,dc=x"))
    );
    assert_eq!(at(s.as_ref(), "cy"), Some(dn("CN=Cy,OU=BigStaff,DC=x")));
    assert_eq!(
        at(s.as_ref(), "di"),
        Some(dn("CN=Di,OU=Old\\,OU=Staff,DC=x"))
    );
    assert_eq!(
        at(s.as_ref(), "staff"),
        Some(dn("OU=Staff,DC=x")),
        "not the container itself"
    );
    assert_eq!(
        s.anchor_by_dn(&dn("CN=Bob,OU=Sales,OU=People,OU=Corp,DC=x"))
            .unwrap(),
        Some(a("bob"))
    );
    let dirty = s.dirty().unwrap();
    for x in ["ann", "bob", "sales"] {
        assert!(dirty.contains(&a(x)), "{x} is dirty: {dirty:?}");
    }
    // The container's own change comes next; repeating the call moves nothing.
    s.apply_changes(
        "src",
        &[Change::Move {
            anchor: a("staff"),
            object_type: "container".into(),
            new_dn: to.clone(),
        }],
        None,
    )
    .unwrap();
    assert!(s
        .move_subtrees(&[(a("staff"), to.clone())])
        .unwrap()
        .is_empty());
    // Two moves of one batch, and a child container named after its parent (as sources that
    // report every moved object do).
    let moved = s
        .move_subtrees(&[
            (a("staff"), dn("OU=Staff,DC=x")),
            (a("sales"), dn("OU=Sales,OU=Staff,DC=x")),
            (a("staff"), dn("OU=Staff2,DC=x")),
        ])
        .unwrap();
    assert_eq!(moved, anchors(&["ann", "bob", "sales"]));
    assert_eq!(
        at(s.as_ref(), "bob"),
        Some(dn("CN=Bob,OU=Sales,OU=Staff2,DC=x"))
    );
    // Unknown anchors and objects without a DN move nothing.
    assert!(s
        .move_subtrees(&[(a("nobody"), dn("OU=Z,DC=x"))])
        .unwrap()
        .is_empty());
    assert!(s
        .move_subtrees(&[(a("grp"), dn("OU=Z,DC=x"))])
        .unwrap()
        .is_empty());
}

/// Container bindings are empty at first and kept as set.
fn container_bindings_are_kept(mut s: Box<dyn StateStore>) {
    use crate::delta::{ContainerBindings, ContainerRef, SourceMirror};
    assert!(s.container_bindings().unwrap().is_empty());
    let mut m = SourceMirror::new();
    m.insert(Entry::new("ou-1", "container").with_dn(dn("OU=Staff,DC=x")));
    let named = [
        ContainerRef::Dn(dn("OU=Staff,DC=x")),
        ContainerRef::Anchor(a("ou-9")),
        ContainerRef::Dn(dn("OU=None,DC=x")),
    ];
    let b = ContainerBindings::resolve(&named, &m, &ContainerBindings::new());
    let before = s.fingerprint().unwrap();
    s.set_container_bindings(&b).unwrap();
    assert_eq!(s.container_bindings().unwrap(), b);
    assert_eq!(
        s.fingerprint().unwrap(),
        before,
        "bindings are not plan state"
    );
    s.set_container_bindings(&ContainerBindings::new()).unwrap();
    assert!(s.container_bindings().unwrap().is_empty());
}

/// Two objects with one anchor in one import (a full import's batch, or across its batches; a
/// delta batch that adds an anchor twice) fail the call, naming both DNs, and change nothing;
/// the same object delivered twice, a rename by replacement and a delete then an add are fine.
fn duplicate_anchors_are_refused(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    let w1 = Watermark::new("usn", b"1".to_vec());
    let w2 = Watermark::new("usn", b"2".to_vec());
    let g = s.begin_full_import("src").unwrap();
    s.import_entries(g, &[user("u1", "Ann"), user("u2", "Bob")])
        .unwrap();
    s.finish_full_import("src", g, Some(&w1), 0.5).unwrap();
    reset_dirty(s);
    let before = s.fingerprint().unwrap();
    let ann = s.source_entry(&a("u1")).unwrap();
    let duplicate = |e: &StateError, first: &str, second: &str| {
        assert!(
            matches!(e, StateError::DuplicateAnchor { anchor, first: f, second: s }
                if anchor.as_str() == "u1" && f == first && s == second),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(text.contains("u1") && text.contains(first) && text.contains(second));
    };

    // Within one batch of a full import: nothing of the batch is written.
    let g = s.begin_full_import("src").unwrap();
    let err = s
        .import_entries(
            g,
            &[
                user("u3", "Cy"),
                user("u1", "Dan").with("mail", "dan@x"),
                user("u1", "Ann"),
            ],
        )
        .unwrap_err();
    duplicate(&err, "cn=Dan,ou=People,dc=x", "cn=Ann,ou=People,dc=x");
    assert_eq!(s.source_entry(&a("u3")).unwrap(), None);
    assert_eq!(s.source_entry(&a("u1")).unwrap(), ann);
    assert!(s.dirty().unwrap().is_empty());
    assert_eq!(s.fingerprint().unwrap(), before);

    // Across batches: the later batch fails whole. The same object again (its DN spelled in
    // another case) is no duplicate.
    s.import_entries(g, &[user("u1", "Ann")]).unwrap();
    s.import_entries(g, &[user("u1", "ANN")]).unwrap();
    let err = s
        .import_entries(g, &[user("u4", "Eve"), user("u1", "Dan")])
        .unwrap_err();
    duplicate(&err, "cn=ANN,ou=People,dc=x", "cn=Dan,ou=People,dc=x");
    assert_eq!(s.source_entry(&a("u4")).unwrap(), None);
    assert_eq!(s.watermark("src").unwrap(), Some(w1.clone()));

    // A delta batch adding one anchor twice applies nothing and commits no watermark.
    let g = s.begin_full_import("src").unwrap();
    s.import_entries(g, &[user("u1", "Ann"), user("u2", "Bob")])
        .unwrap();
    s.finish_full_import("src", g, Some(&w1), 0.5).unwrap();
    reset_dirty(s);
    let before = s.fingerprint().unwrap();
    let err = s
        .apply_changes(
            "src",
            &[
                Change::Add(user("u5", "Fay")),
                Change::Delete {
                    anchor: a("u1"),
                    object_type: "user".into(),
                },
                Change::Add(user("u1", "Dan")),
                Change::Add(user("u1", "Ann")),
            ],
            Some(&w2),
        )
        .unwrap_err();
    duplicate(&err, "cn=Dan,ou=People,dc=x", "cn=Ann,ou=People,dc=x");
    assert_eq!(s.watermark("src").unwrap(), Some(w1));
    assert_eq!(s.source_entry(&a("u5")).unwrap(), None);
    assert_eq!(s.source_entry(&a("u1")).unwrap(), ann);
    assert_eq!(s.fingerprint().unwrap(), before);

    // A change log may replace an object with a renamed copy, or delete it and add it again.
    s.apply_changes(
        "src",
        &[
            Change::Add(user("u6", "Gus")),
            Change::Replace(user("u6", "Gustav")),
            Change::Move {
                anchor: a("u6"),
                object_type: "user".into(),
                new_dn: dn("cn=Gu,ou=People,dc=x"),
            },
            Change::Delete {
                anchor: a("u6"),
                object_type: "user".into(),
            },
            Change::Add(user("u6", "Hal")),
        ],
        Some(&w2),
    )
    .unwrap();
    assert_eq!(
        s.source_entry(&a("u6")).unwrap().and_then(|e| e.dn),
        Some(dn("cn=Hal,ou=People,dc=x"))
    );
    assert_eq!(s.watermark("src").unwrap(), Some(w2));
}

/// Five source objects imported out of anchor order, two links without one (`k5`, `zz`) and
/// one with (`b1`).
fn mirror_and_links(s: &mut dyn StateStore) {
    let g = s.begin_full_import("src").unwrap();
    // Imported out of anchor order: a store may page in the order it holds them.
    let entries: Vec<Entry> = ["m3", "b1", "z9", "a0", "m2"]
        .iter()
        .map(|x| user(x, &format!("cn-{x}")))
        .collect();
    s.import_entries(g, &entries).unwrap();
    s.finish_full_import("src", g, None, 0.0).unwrap();
    link_by_create(s, "b1", "t-b1", Attributes::new());
    link_by_create(s, "k5", "t-k5", Attributes::new());
    link_by_create(s, "zz", "t-zz", Attributes::new());
}

/// `full_plan_page` pages through what `anchors_page` gives, each anchor once whatever the
/// page size (in the store's own order), each page's objects whole in its views with their
/// links and target objects, and a store's own marks only.
fn full_plan_pages_cover_every_anchor_once_with_its_views(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    assert!(s
        .full_plan_page(None, 10, Reach::Anchors)
        .unwrap()
        .is_none());
    mirror_and_links(s);
    let kind = |m: &crate::state::PageMark| match m {
        crate::state::PageMark::Anchor(_) => "anchor",
        crate::state::PageMark::Row { .. } => "row",
        crate::state::PageMark::Unsourced { .. } => "unsourced",
    };
    let mut kinds = std::collections::BTreeSet::new();
    for reach in [Reach::Anchors, Reach::AnchorsAlone] {
        for size in [1, 2, 3, 7, 100] {
            let mut seen: Vec<Anchor> = Vec::new();
            let mut mark = None;
            while let Some((page, views, next)) =
                s.full_plan_page(mark.as_ref(), size, reach).unwrap()
            {
                assert!(
                    !page.is_empty() && page.len() <= size,
                    "page size {size}: {page:?}"
                );
                for a in &page {
                    match views.mirror.get(a) {
                        Some(e) => {
                            assert!(!views.mirror.is_partial(a), "{a} held as context");
                            assert_eq!(
                                e.attributes.first("cn"),
                                Some(&Value::string(format!("cn-{a}")))
                            );
                        }
                        None => assert!(["k5", "zz"].contains(&a.as_str()), "{a} not read"),
                    }
                }
                // As the page's own neighbourhood, read by anchor.
                let alone = s.load_neighbourhood_light(&page, reach).unwrap();
                for a in &page {
                    assert_eq!(views.mirror.get(a), alone.mirror.get(a), "{a}");
                    assert_eq!(views.links.get(a), alone.links.get(a), "{a}");
                    if let Some(l) = alone.links.get(a) {
                        assert_eq!(
                            views.target.get(&l.target_id),
                            alone.target.get(&l.target_id)
                        );
                    }
                }
                kinds.insert(kind(&next));
                if page.contains(&a("b1")) {
                    assert_eq!(
                        views.links.get(&a("b1")).map(|l| l.target_id.as_str()),
                        Some("t-b1")
                    );
                    assert!(views.target.get(&"t-b1".into()).is_some());
                }
                seen.extend(page);
                mark = Some(next);
            }
            seen.sort();
            assert_eq!(
                seen,
                anchors(&["a0", "b1", "k5", "m2", "m3", "z9", "zz"]),
                "page size {size}"
            );
        }
    }
    // A mark of a kind the store does not give is refused, not misread.
    let foreign = [
        crate::state::PageMark::Anchor(a("b1")),
        crate::state::PageMark::Row {
            after: 1,
            version: 0,
        },
        crate::state::PageMark::Unsourced {
            after: None,
            version: 0,
        },
    ];
    for m in foreign.iter().filter(|m| !kinds.contains(kind(m))) {
        assert!(
            s.full_plan_page(Some(m), 2, Reach::Anchors).is_err(),
            "{m:?} accepted"
        );
    }
    assert!(kinds.len() < foreign.len());
}

/// `anchors_page` pages through the source mirror and the links (a link whose source object
/// is gone included, an anchor both mirrored and linked once), in order, whatever the page size.
fn anchor_pages_cover_the_mirror_and_the_links_once(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    assert!(s.anchors_page(None, 10).unwrap().is_empty());
    mirror_and_links(s);
    let all = anchors(&["a0", "b1", "k5", "m2", "m3", "z9", "zz"]);
    for size in [1, 2, 3, 7, 100] {
        let mut seen: Vec<Anchor> = Vec::new();
        let mut after: Option<Anchor> = None;
        loop {
            let page = s.anchors_page(after.as_ref(), size).unwrap();
            assert!(page.len() <= size, "page size {size}: {page:?}");
            let Some(last) = page.last().cloned() else {
                break;
            };
            seen.extend(page);
            after = Some(last);
        }
        assert_eq!(seen, all, "page size {size}");
    }
    assert_eq!(
        s.anchors_page(Some(&a("m2")), 2).unwrap(),
        anchors(&["m3", "z9"])
    );
    assert!(s.anchors_page(Some(&a("zz")), 5).unwrap().is_empty());

    // Every target object is linked (by the creates above) until one is recorded unlinked.
    assert!(!s.has_unlinked_target_objects().unwrap());
    s.put_target_objects(&[TargetObject::new("loose", "User")])
        .unwrap();
    assert!(s.has_unlinked_target_objects().unwrap());

    // The dirty set pages the same way, saying which anchors are linked.
    reset_dirty(s);
    s.mark_dirty(&anchors(&["z9", "b1", "k5", "a0", "zz", "q7"]))
        .unwrap();
    let want: Vec<(Anchor, bool)> = [
        ("a0", false),
        ("b1", true),
        ("k5", true),
        ("q7", false),
        ("z9", false),
        ("zz", true),
    ]
    .iter()
    .map(|(x, l)| (a(x), *l))
    .collect();
    for size in [1, 2, 4, 6, 50] {
        let seen = every_page(size, |after| s.dirty_page(after, size).unwrap());
        assert_eq!(seen, want, "page size {size}");
    }
    // Clearing a page leaves the rest.
    s.clear_dirty(&anchors(&["a0", "b1"])).unwrap();
    assert_eq!(
        s.dirty_page(None, 2).unwrap(),
        vec![(a("k5"), true), (a("q7"), false)]
    );
}

/// `dirty_references_page` pages through the dirty set as `dirty_page` does, each anchor with
/// the mirrored objects its source object references (by anchor, or by a DN resolved when
/// the object arrived), sorted and once each; a reference to an object outside the mirror is
/// not named, and a dirty anchor without a source object references nothing.
fn dirty_pages_name_what_their_objects_reference(mut s: Box<dyn StateStore>) {
    let s = s.as_mut();
    let g = s.begin_full_import("src").unwrap();
    let boss = "cn=Boss,ou=People,dc=x";
    s.import_entries(
        g,
        &[
            user("r1", "Report").with("manager", Value::dn_ref(dn(boss))),
            Entry::new("g1", "group")
                .with_dn(dn("cn=Team,ou=Groups,dc=x"))
                .with("member", Value::dn_ref(dn(boss)))
                .with("member", Value::dn_ref(dn("cn=Ann,ou=People,dc=x")))
                .with("member", Value::dn_ref(dn("cn=Outside,ou=Elsewhere,dc=x")))
                .with("owner", Value::dn_ref(dn(boss))),
        ],
    )
    .unwrap();
    s.import_entries(g, &[user("u1", "Ann"), user("b1", "Boss")])
        .unwrap();
    s.finish_full_import("src", g, None, 0.0).unwrap();
    link_by_create(s, "zz", "t-zz", Attributes::new());
    reset_dirty(s);
    s.mark_dirty(&anchors(&["r1", "g1", "b1", "u1", "zz"]))
        .unwrap();
    let want: Vec<(Anchor, Vec<Anchor>)> = vec![
        (a("b1"), vec![]),
        (a("g1"), anchors(&["b1", "u1"])),
        (a("r1"), anchors(&["b1"])),
        (a("u1"), vec![]),
        (a("zz"), vec![]),
    ];
    for size in [1, 2, 3, 50] {
        let seen = every_page(size, |after| s.dirty_references_page(after, size).unwrap());
        assert_eq!(seen, want, "page size {size}");
    }
    // Only the dirty set is paged.
    s.clear_dirty(&anchors(&["g1", "b1"])).unwrap();
    assert_eq!(
        s.dirty_references_page(None, 10).unwrap(),
        vec![
            (a("r1"), anchors(&["b1"])),
            (a("u1"), vec![]),
            (a("zz"), vec![])
        ]
    );
}

/// Every page of a read of the dirty set `size` anchors at a time (`page(after)`: the page
/// after `after`), each checked to be no larger, one after the other.
fn every_page<T: std::fmt::Debug>(
    size: usize,
    mut page: impl FnMut(Option<&Anchor>) -> Vec<(Anchor, T)>,
) -> Vec<(Anchor, T)> {
    let mut seen = Vec::new();
    let mut after: Option<Anchor> = None;
    loop {
        let p = page(after.as_ref());
        assert!(p.len() <= size, "page size {size}: {p:?}");
        let Some((last, _)) = p.last() else {
            break;
        };
        after = Some(last.clone());
        seen.extend(p);
    }
    seen
}
