//! The engine over in-memory connectors and both state stores: every run profile, the
//! watermark contract, escrow, the circuit breaker, staging, on-demand, both guards, crash
//! recovery, and a fresh state against a target (memory, LDIF) that already holds the objects:
//! join lookups, conflicts, whole reads and their age.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use dirsync::connector::memory::{MemorySource, MemoryTarget};
use dirsync::connector::{ErrorKind, TargetOperation};
use dirsync::engine::{Clock, EngineConfig, EngineError, RetryPolicy, Synchronizer};
use dirsync::model::{values, AttributeChange, Dn, Entry, Value};
use dirsync::rules::ruleset::{DeprovisionPolicy, FlowConfig, RuleBuilder, RuleSet};
use dirsync::state::{MemoryStore, SqliteStore, StateStore};

fn rules() -> Arc<RuleSet> {
    Arc::new(
        RuleSet::builder()
            .rule(
                RuleBuilder::new("users", "user", "User")
                    .flow("userName", "ToLower([mail])")
                    .flow("displayName", r#"Join(" ", [givenName], [sn])"#)
                    .flow("department", "[department]")
                    .flow("active", "True")
                    .join(["userName"])
                    .scope(serde_json::from_value(serde_json::json!({
                        "family": "connect-sync",
                        "groups": [[{"attribute": "department", "operator": "NOTEQUAL", "value": "Former"}]]
                    })).unwrap())
                    .disable_with("active", false),
            )
            .rule(
                RuleBuilder::new("groups", "group", "Group")
                    .flow("displayName", "[cn]")
                    .flow_with(FlowConfig { reference: true, ..FlowConfig::new("members", "[member]") })
                    .join(["displayName"]),
            )
            .build()
            .unwrap(),
    )
}

fn dn(s: &str) -> Dn {
    Dn::parse(s).unwrap()
}

fn user(i: usize, dept: &str) -> Entry {
    Entry::new(format!("u{i:03}"), "user")
        .with_dn(dn(&format!("cn=user{i},ou=people,dc=x")))
        .with("mail", format!("User{i}@X.test"))
        .with("givenName", format!("Given{i}"))
        .with("sn", format!("Sur{i}"))
        .with("department", dept)
}

fn group(i: usize, members: impl IntoIterator<Item = usize>) -> Entry {
    Entry::new(format!("g{i:03}"), "group")
        .with_dn(dn(&format!("cn=group{i},ou=groups,dc=x")))
        .with("cn", format!("Group {i}"))
        .with_values(
            "member",
            members
                .into_iter()
                .map(|m| Value::dn_ref(dn(&format!("cn=user{m},ou=people,dc=x"))))
                .collect::<Vec<_>>(),
        )
}

struct Setup {
    source: MemorySource,
    target: MemoryTarget,
    now: Arc<Mutex<DateTime<Utc>>>,
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 8, 0, 0).unwrap()
}

fn setup(
    users: usize,
    store: Box<dyn StateStore>,
    tweak: impl FnOnce(&mut EngineConfig),
) -> (Setup, Synchronizer) {
    let source = MemorySource::new("hr");
    for i in 0..users {
        source.add(user(i, "Eng")).unwrap();
    }
    source.add(group(1, 0..users.min(5))).unwrap();
    let target = MemoryTarget::new("app").unique_attribute("User", "userName");
    let now = Arc::new(Mutex::new(t0()));
    let clock_now = now.clone();
    let mut config = EngineConfig {
        clock: Clock::from_fn(move || *clock_now.lock().unwrap()),
        retry: RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(20),
        },
        ..EngineConfig::default()
    };
    tweak(&mut config);
    let sync = Synchronizer::new(
        Box::new(source.clone()),
        Box::new(target.clone()),
        store,
        rules(),
        config,
    );
    (
        Setup {
            source,
            target,
            now,
        },
        sync,
    )
}

fn stores() -> Vec<(&'static str, Box<dyn StateStore>)> {
    vec![
        ("memory", Box::new(MemoryStore::new())),
        ("sqlite", Box::new(SqliteStore::open_in_memory().unwrap())),
    ]
}

fn user_names(t: &MemoryTarget) -> Vec<String> {
    let mut v: Vec<String> = t
        .objects()
        .into_iter()
        .filter(|o| o.object_type.is("User"))
        .filter_map(|o| o.attributes.first_str("userName").map(str::to_string))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn cycle_creates_updates_disables_and_converges_on_both_stores() {
    for (name, store) in stores() {
        let (s, mut sync) = setup(20, store, |_| {});
        let r = sync.run_cycle().await.unwrap();
        assert_eq!(r.count("create"), 21, "{name}: {r}");
        // The group's members are in its create: one write per object.
        assert_eq!(r.count("references"), 0, "{name}: {r}");
        assert_eq!(s.target.len(), 21);
        assert_eq!(s.target.applied().len(), 21, "{name}");
        let again = sync.run_cycle().await.unwrap();
        assert_eq!(again.total_done(), 0, "{name}: {again}");
        // Edits: a rename, a member removed, a user out of scope.
        s.source
            .modify(
                &"u003".into(),
                vec![AttributeChange::replace("sn", values(["Renamed"]))],
            )
            .unwrap();
        s.source.upsert(group(1, 0..4)).unwrap();
        s.source
            .modify(
                &"u002".into(),
                vec![AttributeChange::replace("department", values(["Former"]))],
            )
            .unwrap();
        let r = sync.run_cycle().await.unwrap();
        assert_eq!(
            (r.count("update"), r.count("references"), r.count("disable")),
            (1, 1, 1),
            "{name}: {r}"
        );
        let u2 = s
            .target
            .objects()
            .into_iter()
            .find(|o| o.attributes.first_str("userName") == Some("user2@x.test"))
            .unwrap();
        assert_eq!(u2.attributes.first("active"), Some(&Value::Boolean(false)));
        assert_eq!(sync.run_cycle().await.unwrap().total_done(), 0, "{name}");
        // The journal recorded every operation as done, with the target id.
        let journal = sync.with_store(|st| st.journal(None)).unwrap();
        assert!(journal.iter().all(|j| j.target_id.is_some()), "{name}");
    }
}

#[tokio::test]
async fn watermark_commits_with_its_changes_and_a_broken_import_loses_nothing() {
    let source = MemorySource::new("hr").with_checkpoint_every(2);
    for i in 0..6 {
        source.add(user(i, "Eng")).unwrap();
    }
    let target = MemoryTarget::new("app").unique_attribute("User", "userName");
    let mut sync = Synchronizer::new(
        Box::new(source.clone()),
        Box::new(target.clone()),
        Box::new(MemoryStore::new()),
        rules(),
        EngineConfig::default(),
    );
    sync.run_cycle().await.unwrap();
    let w0 = sync.with_store(|s| s.watermark("hr")).unwrap().unwrap();
    for i in 6..11 {
        source.add(user(i, "Eng")).unwrap();
    }
    // The delta stream breaks after 3 items: 2 changes and their checkpoint are committed.
    source.fail_import_after(3, ErrorKind::Unavailable);
    assert!(sync.run_cycle().await.is_err());
    let w1 = sync.with_store(|s| s.watermark("hr")).unwrap().unwrap();
    assert_ne!(w0, w1);
    assert_eq!(sync.with_store(|s| s.dirty()).unwrap().len(), 2);
    // The next cycle resumes from there: everything arrives once.
    let r = sync.run_cycle().await.unwrap();
    assert_eq!(r.count("create"), 5, "{r}");
    assert_eq!(user_names(&target).len(), 11);
}

#[tokio::test]
async fn invalid_watermark_runs_a_full_import_and_deletes_only_after_it() {
    let (s, mut sync) = setup(10, Box::new(MemoryStore::new()), |c| {
        c.guard = dirsync::delta::DeletionGuard::off()
    });
    sync.run_cycle().await.unwrap();
    s.source.delete(&"u004".into()).unwrap();
    s.source.compact(); // the log is gone: the watermark is invalid
                        // A full import that breaks midway plans no deletion.
    s.source.fail_import_after(4, ErrorKind::Unavailable);
    assert!(sync.run_cycle().await.is_err());
    assert_eq!(
        s.target
            .objects()
            .iter()
            .filter(|o| o.attributes.first("active") == Some(&Value::Boolean(false)))
            .count(),
        0
    );
    let r = sync.run_cycle().await.unwrap();
    assert_eq!(r.count("disable"), 1, "{r}");
}

#[tokio::test]
async fn deletion_guard_holds_until_allowed_and_import_guard_refuses_empty_imports() {
    // No floor: five deletions of twenty linked users are over 10 %.
    let (s, mut sync) = setup(20, Box::new(MemoryStore::new()), |c| c.guard.floor = 0);
    sync.run_cycle().await.unwrap();
    for i in 0..5 {
        s.source
            .delete(&format!("u{i:03}").as_str().into())
            .unwrap();
    }
    let r = sync.run_cycle().await.unwrap();
    assert!(r.held, "{r}");
    assert_eq!(r.guard_violations[0].deletions, 5);
    assert_eq!(
        s.target
            .applied()
            .iter()
            .filter(|o| matches!(o, TargetOperation::Update { .. }))
            .count(),
        0,
        "the initial load only created (members in the group's create): nothing written"
    );
    sync.allow_deletions_once();
    let r = sync.run_cycle().await.unwrap();
    assert_eq!(r.count("disable"), 5, "{r}");

    // A snapshot source that suddenly returns nothing is refused before deletions.
    let empty = MemorySource::new("hr").without_delta();
    let (s2, mut sync2) = setup(10, Box::new(MemoryStore::new()), |_| {});
    sync2.run_cycle().await.unwrap();
    for e in s2.source.entries() {
        s2.source.delete(&e.anchor).unwrap();
    }
    s2.source.compact();
    let err = sync2.run_cycle().await.unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::ImportTooSmall {
                seen: 0,
                mirrored: 11
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("delivered 0 objects"));
    drop(empty);
}

#[tokio::test]
async fn failing_objects_go_to_escrow_and_are_retried_later() {
    let (s, mut sync) = setup(6, Box::new(SqliteStore::open_in_memory().unwrap()), |_| {});
    s.target.fail_when(|op| matches!(op, TargetOperation::Create { attributes, .. } if attributes.first_str("userName") == Some("user3@x.test")), ErrorKind::Constraint, None);
    let r = sync.run_cycle().await.unwrap();
    assert_eq!(r.failures.len(), 1, "{r}");
    assert!(r.failures[0].escrowed && r.failures[0].error.contains("Constraint"));
    // The group was created all the same, with its other members; it stays dirty for the
    // missing one.
    assert_eq!((r.count("create"), r.count("references")), (6, 0), "{r}");
    let g = s
        .target
        .objects()
        .into_iter()
        .find(|o| o.object_type.is("Group"))
        .unwrap();
    assert_eq!(g.attributes.get("members").map(|m| m.len()), Some(4));
    assert!(sync
        .with_store(|st| st.dirty())
        .unwrap()
        .contains(&"g001".into()));
    let escrow = sync.with_store(|st| st.escrowed()).unwrap();
    assert_eq!(escrow[0].anchor.as_str(), "u003");
    assert!(sync
        .with_store(|st| st.dirty())
        .unwrap()
        .contains(&"u003".into()));
    // Before its retry time the object is deferred, not hammered.
    let r = sync.run_cycle().await.unwrap();
    assert_eq!((r.deferred, r.failures.len()), (1, 0), "{r}");
    // Later, with the fault gone, it goes through and leaves escrow.
    s.target.clear_faults();
    *s.now.lock().unwrap() = t0() + chrono::Duration::hours(2);
    let r = sync.run_cycle().await.unwrap();
    assert_eq!((r.count("create"), r.count("references")), (1, 1), "{r}");
    assert!(sync.with_store(|st| st.escrowed()).unwrap().is_empty());
    assert!(sync.with_store(|st| st.dirty()).unwrap().is_empty());
    assert_eq!(sync.run_cycle().await.unwrap().total_done(), 0);
    assert_eq!(user_names(&s.target).len(), 6);
}

#[tokio::test]
async fn circuit_breaker_stops_a_run_where_most_operations_fail() {
    let (s, mut sync) = setup(60, Box::new(MemoryStore::new()), |c| {
        c.concurrency = 1;
        c.circuit_breaker.min_operations = 10;
    });
    s.target.fail_when(
        |op| matches!(op, TargetOperation::Create { .. }),
        ErrorKind::Auth,
        None,
    );
    let r = sync.run_cycle().await.unwrap();
    let stopped = r.stopped.clone().expect("stopped");
    assert!(
        stopped.contains("circuit breaker") && stopped.contains("Auth"),
        "{stopped}"
    );
    assert_eq!(
        r.failures.len(),
        10,
        "stopped at the threshold, not after all 61: {r}"
    );
}

#[tokio::test]
async fn retries_throttled_operations_and_never_duplicates_a_lost_create() {
    let (s, mut sync) = setup(8, Box::new(MemoryStore::new()), |_| {});
    s.target.throttle_every(3, Duration::from_millis(2));
    // The create of user5 commits, but its response is lost (a timeout).
    s.target.fail_after_apply_when(|op| matches!(op, TargetOperation::Create { attributes, .. } if attributes.first_str("userName") == Some("user5@x.test")), ErrorKind::Timeout);
    let r = sync.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{r}");
    assert!(r.retries > 0);
    s.target.clear_faults();
    let names = user_names(&s.target);
    assert_eq!(names.len(), 8, "{names:?}");
    assert_eq!(sync.run_cycle().await.unwrap().total_done(), 0);
}

#[tokio::test]
async fn staged_plans_apply_exactly_and_refuse_when_stale() {
    let (s, mut sync) = setup(5, Box::new(SqliteStore::open_in_memory().unwrap()), |_| {});
    sync.delta_import().await.unwrap();
    let staged = sync.plan(false).unwrap();
    let json = serde_json::to_string(&staged).unwrap();
    let back: dirsync::engine::StagedPlan = serde_json::from_str(&json).unwrap();
    let r = sync.apply(back).await.unwrap();
    assert_eq!(r.total_done(), staged.plan.operations.len() as u64);
    // A plan made before the state moved is refused.
    s.source
        .modify(
            &"u001".into(),
            vec![AttributeChange::replace("sn", values(["X"]))],
        )
        .unwrap();
    let old = sync.plan(true).unwrap();
    sync.delta_import().await.unwrap();
    let err = sync.apply(old).await.unwrap_err();
    assert!(matches!(err, EngineError::StalePlan { .. }), "{err}");
}

#[tokio::test]
async fn on_demand_syncs_one_object_and_explains_it() {
    let (s, mut sync) = setup(4, Box::new(MemoryStore::new()), |c| {
        c.guard = dirsync::delta::DeletionGuard::off()
    });
    sync.delta_import().await.unwrap();
    let od = sync.sync_object("u002").await.unwrap();
    assert_eq!(od.plan.operations.len(), 1);
    assert_eq!(od.report.count("create"), 1);
    let x = od.explanation.unwrap();
    assert!(x.in_scope);
    assert!(x
        .flows
        .iter()
        .any(|f| f.target == "userName" && f.result.contains("user2@x.test")));
    assert_eq!(s.target.len(), 1);
    // By DN, and a disable through the same path.
    s.source
        .modify(
            &"u002".into(),
            vec![AttributeChange::replace("department", values(["Former"]))],
        )
        .unwrap();
    sync.delta_import().await.unwrap();
    let od = sync.sync_object("cn=USER2, ou=people,dc=x").await.unwrap();
    assert_eq!(od.report.count("disable"), 1, "{}", od.report);
    assert!(!od.explanation.unwrap().in_scope);
    assert!(matches!(
        sync.sync_object("nope").await,
        Err(EngineError::UnknownObject(_))
    ));
}

#[tokio::test]
async fn full_sync_replans_from_mirrors_and_reconcile_corrects_drift() {
    let (s, mut sync) = setup(5, Box::new(MemoryStore::new()), |_| {});
    sync.run_cycle().await.unwrap();
    // Full sync reads nothing from the source: it would fail.
    s.source.fail_next_import(ErrorKind::Unavailable);
    let r = sync.full_sync().await.unwrap();
    assert_eq!(r.total_done(), 0, "{r}");
    // Drift by hand in the target: reconcile reads it and corrects it.
    let mut o = s
        .target
        .objects()
        .into_iter()
        .find(|o| o.object_type.is("User"))
        .unwrap();
    o.attributes
        .set("displayName", Value::string("Edited by hand"));
    s.target.insert(o);
    let r = sync.reconcile().await.unwrap();
    assert_eq!(r.count("update"), 1, "{r}");
    assert!(s
        .target
        .objects()
        .iter()
        .all(|o| o.attributes.first_str("displayName") != Some("Edited by hand")));
}

#[tokio::test]
async fn progress_events_and_run_history() {
    let (_s, mut sync) = setup(30, Box::new(MemoryStore::new()), |c| c.import_batch = 10);
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    sync.on_progress(move |p| sink.lock().unwrap().push(p));
    let r = sync.run_cycle().await.unwrap();
    let events = events.lock().unwrap();
    let last_export = events
        .iter()
        .rev()
        .find(|p| p.stage == dirsync::engine::Stage::Export)
        .unwrap();
    assert_eq!(last_export.done, r.planned);
    assert_eq!(last_export.total, Some(r.planned));
    assert!(events
        .iter()
        .any(|p| p.stage == dirsync::engine::Stage::Import));
    let runs = sync.with_store(|s| s.runs(10)).unwrap();
    assert_eq!(runs[0].profile, "cycle");
    assert_eq!(runs[0].outcome.as_deref(), Some("ok"));
}

#[tokio::test]
async fn a_create_sent_before_a_crash_is_found_not_duplicated() {
    // Simulate a crash between sending a create and recording it: the journal says "intended",
    // the target has the object, the link table does not.
    let (s, mut sync) = setup(3, Box::new(SqliteStore::open_in_memory().unwrap()), |_| {});
    sync.delta_import().await.unwrap();
    let staged = sync.plan(false).unwrap();
    let create = staged
        .plan
        .operations
        .iter()
        .find(|o| o.anchor.as_str() == "u001")
        .unwrap()
        .clone();
    let sent = create
        .to_target_operation(&Default::default())
        .unwrap()
        .unwrap();
    sync.with_store(|st| {
        let run = st.begin_run("crashed", t0())?;
        st.journal_intent(run, &create, Some(&sent))
    })
    .unwrap();
    use dirsync::connector::Target;
    let applied = s
        .target
        .apply(std::slice::from_ref(&sent))
        .await
        .pop()
        .unwrap()
        .unwrap();
    // The next run resolves it by the create's join keys before sending anything.
    let r = sync.run_cycle().await.unwrap();
    assert_eq!(r.recovered, 1, "{r}");
    assert_eq!(r.count("create"), 3, "u001 is not created again: {r}");
    assert_eq!(user_names(&s.target).len(), 3);
    let links = sync.with_store(|st| st.load_all()).unwrap().links;
    assert_eq!(links.get(&"u001".into()).unwrap().target_id, applied.id);
    assert!(sync
        .with_store(|st| st.journal_unconfirmed())
        .unwrap()
        .is_empty());
}

/// A person of the LDIF source: `uid=<uid>,ou=People,dc=src`, mail `<uid>@src.test`.
fn ldif_person(uid: &str, uuid: &str, sn: &str) -> String {
    format!("dn: uid={uid},ou=People,dc=src\nobjectClass: inetOrgPerson\nentryUUID: {uuid}\nuid: {uid}\ncn: {uid} {sn}\nsn: {sn}\nmail: {uid}@src.test\n\n")
}

/// Rules from the LDIF source to an LDIF target: people joined by mail (deleted when they go),
/// groups by cn.
const LDIF_RULES: &str = r#"
[[rule]]
name = "people"
source_type = "user"
target_type = "User"
join = [["mail"]]
deprovision = { action = "delete" }
[[rule.flow]]
target = "objectClass"
expression = '"inetOrgPerson"'
[[rule.flow]]
target = "uid"
expression = '[uid]'
[[rule.flow]]
target = "cn"
expression = '[cn]'
[[rule.flow]]
target = "sn"
expression = '[sn]'
[[rule.flow]]
target = "mail"
expression = 'Replace([mail], , "@src\.test$", , "@dst.test", , )'
[[rule]]
name = "groups"
source_type = "group"
target_type = "Group"
join = [["cn"]]
[[rule.flow]]
target = "objectClass"
expression = '"groupOfNames"'
[[rule.flow]]
target = "cn"
expression = '[cn]'
[[rule.flow]]
target = "member"
expression = '[member]'
reference = true
"#;

#[tokio::test]
async fn ldif_source_and_ldif_target_through_the_engine() {
    use dirsync::connector::ldif::{LdifSource, LdifSourceConfig, LdifTarget, LdifTargetConfig};
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("people.ldif");
    let changes = dir.path().join("changes");
    std::fs::create_dir(&changes).unwrap();
    let mut text = String::from("version: 1\n\n");
    text += &ldif_person("ada", "00000000-0000-4000-8000-000000000001", "Lovelace");
    text += &ldif_person("alan", "00000000-0000-4000-8000-000000000002", "Turing");
    text += &ldif_person("grace", "00000000-0000-4000-8000-000000000003", "Hopper");
    text += "dn: cn=staff,ou=Groups,dc=src\nobjectClass: groupOfNames\nentryUUID: 00000000-0000-4000-8000-0000000000aa\ncn: staff\nmember: uid=ada,ou=People,dc=src\nmember: uid=alan,ou=People,dc=src\n\n";
    std::fs::write(&content, text).unwrap();
    let source = LdifSource::new(
        &content,
        LdifSourceConfig {
            changes_dir: Some(changes.clone()),
            ..LdifSourceConfig::default()
        },
    );
    let target_path = dir.path().join("target.ldif");
    let tconfig = LdifTargetConfig::default()
        .with_object_type(
            "User",
            "uid",
            dn("ou=Users,dc=dst"),
            ["top", "inetOrgPerson"],
        )
        .with_object_type(
            "Group",
            "cn",
            dn("ou=Groups,dc=dst"),
            ["top", "groupOfNames"],
        );
    let target = LdifTarget::open(&target_path, tconfig.clone()).unwrap();
    let rules = RuleSet::from_toml(LDIF_RULES, Some("ldif.toml")).unwrap();
    let store = SqliteStore::open(dir.path().join("state.sqlite")).unwrap();
    let config = EngineConfig {
        guard: dirsync::delta::DeletionGuard::off(),
        ..EngineConfig::default()
    };
    let mut sync = Synchronizer::new(
        Box::new(source),
        Box::new(target),
        Box::new(store),
        Arc::new(rules),
        config,
    );
    let r = sync.run_cycle().await.unwrap();
    assert_eq!((r.count("create"), r.count("references")), (4, 0), "{r}");
    let written = std::fs::read_to_string(&target_path).unwrap();
    assert!(written.contains("dn: uid=ada,ou=Users,dc=dst"), "{written}");
    assert!(
        written.contains("member: uid=alan,ou=Users,dc=dst"),
        "{written}"
    );
    assert!(written.contains("mail: grace@dst.test"), "{written}");
    // A change file: Alan renamed (sn), Grace deleted, Grace added to staff… then removed.
    std::fs::write(
        changes.join("0001.ldif"),
        "version: 1\n\ndn: uid=alan,ou=People,dc=src\nchangetype: modify\nreplace: sn\nsn: Mathison-Turing\n-\n\ndn: uid=grace,ou=People,dc=src\nchangetype: delete\n\ndn: cn=staff,ou=Groups,dc=src\nchangetype: modify\ndelete: member\nmember: uid=ada,ou=People,dc=src\n-\n",
    )
    .unwrap();
    let r = sync.run_cycle().await.unwrap();
    assert_eq!(
        (r.count("update"), r.count("delete"), r.count("references")),
        (1, 1, 1),
        "{r}"
    );
    // The file is the directory: reopened, it holds what the engine wrote.
    let reopened = LdifTarget::open(&target_path, tconfig).unwrap();
    assert_eq!(reopened.len(), 3);
    let written = std::fs::read_to_string(&target_path).unwrap();
    assert!(
        written.contains("sn: Mathison-Turing") && !written.contains("grace"),
        "{written}"
    );
    assert!(!written.contains("member: uid=ada"), "{written}");
    assert_eq!(sync.run_cycle().await.unwrap().total_done(), 0);
}

/// Another synchronizer over `s`'s source and target, with `store` (a fresh state: a new
/// deployment, a lost state file, a migration from another tool).
fn resync(
    s: &Setup,
    store: Box<dyn StateStore>,
    tweak: impl FnOnce(&mut EngineConfig),
) -> Synchronizer {
    let now = s.now.clone();
    let mut config = EngineConfig {
        clock: Clock::from_fn(move || *now.lock().unwrap()),
        ..EngineConfig::default()
    };
    tweak(&mut config);
    Synchronizer::new(
        Box::new(s.source.clone()),
        Box::new(s.target.clone()),
        store,
        rules(),
        config,
    )
}

#[tokio::test]
async fn a_fresh_state_joins_every_object_the_target_already_holds() {
    for ((name, store), (_, fresh)) in stores().into_iter().zip(stores()) {
        // A first deployment provisions 12 users and 2 groups (the second group's display name
        // has no uniqueness rule in this target, as SCIM's Group.displayName).
        let (s, mut first) = setup(12, store, |_| {});
        s.source.add(group(2, [7, 8])).unwrap();
        let r = first.run_cycle().await.unwrap();
        assert_eq!(r.count("create"), 14, "{name}: {r}");
        // Drift while nobody watched: one display name edited by hand in the target.
        let mut o = s
            .target
            .objects()
            .into_iter()
            .find(|o| o.attributes.first_str("userName") == Some("user3@x.test"))
            .unwrap();
        o.attributes.set("displayName", Value::string("By hand"));
        s.target.insert(o);
        let before = s.target.objects().len();
        let (calls, lookups) = (s.target.calls(), s.target.lookups());

        // The state is lost: a new store, the same source and target.
        let mut sync = resync(&s, fresh, |_| {});
        let r = sync.run_cycle().await.unwrap();
        assert!(r.failures.is_empty(), "{name}: {r}");
        assert_eq!(r.count("create"), 0, "{name}: nothing created: {r}");
        assert_eq!(r.count("join"), 14, "{name}: {r}");
        assert_eq!((r.looked_up, r.lookup_found), (14, 14), "{name}: {r}");
        assert_eq!(s.target.objects().len(), before, "{name}: no duplicates");
        // Two lookups (users by userName, groups by displayName, 1,000 values per lookup);
        // one write: the join of the edited user brings its display name back.
        assert_eq!(s.target.lookups() - lookups, 2, "{name}");
        assert_eq!(s.target.calls() - calls, 1, "{name}: {r}");
        let u3 = s
            .target
            .objects()
            .into_iter()
            .find(|o| o.attributes.first_str("userName") == Some("user3@x.test"))
            .unwrap();
        assert_eq!(u3.attributes.first_str("displayName"), Some("Given3 Sur3"));
        // The next run writes nothing and looks nothing up (it creates nothing).
        let (calls, lookups) = (s.target.calls(), s.target.lookups());
        let again = sync.run_cycle().await.unwrap();
        assert_eq!(again.total_done(), 0, "{name}: {again}");
        assert_eq!(
            (s.target.calls(), s.target.lookups()),
            (calls, lookups),
            "{name}"
        );
        // Life goes on: a new member joins group 2, a user leaves scope, a new user arrives
        // (one lookup before its create: the type was never read whole).
        s.source.upsert(group(2, [7, 8, 9])).unwrap();
        s.source
            .modify(
                &"u004".into(),
                vec![AttributeChange::replace("department", values(["Former"]))],
            )
            .unwrap();
        s.source.add(user(40, "Eng")).unwrap();
        let r = sync.run_cycle().await.unwrap();
        assert_eq!(
            (r.count("create"), r.count("references"), r.count("disable")),
            (1, 1, 1),
            "{name}: {r}"
        );
        assert_eq!((r.looked_up, r.lookup_found), (1, 0), "{name}: {r}");
        assert_eq!(s.target.objects().len(), before + 1, "{name}");
        assert_eq!(sync.run_cycle().await.unwrap().total_done(), 0, "{name}");
    }
}

#[tokio::test]
async fn a_fresh_state_creates_only_what_the_target_lacks() {
    let (s, _) = setup(0, Box::new(MemoryStore::new()), |_| {});
    for i in 0..10 {
        s.source.add(user(i, "Eng")).unwrap();
    }
    s.source.add(group(2, [1, 2])).unwrap();
    // The target holds users 0–4 (made by another tool: other ids, userName in another case)
    // and group 2; users 5–9 and group 1 are missing.
    for i in 0..5 {
        s.target.insert(
            dirsync::model::TargetObject::new(format!("old-{i}"), "User")
                .with("userName", format!("USER{i}@X.TEST"))
                .with("displayName", format!("Given{i} Sur{i}"))
                .with("department", "Eng")
                .with("active", true),
        );
    }
    s.target.insert(
        dirsync::model::TargetObject::new("old-g2", "Group")
            .with("displayName", "Group 2")
            .with("members", Value::target_ref("old-1"))
            .with("members", Value::target_ref("old-2")),
    );
    let mut sync = resync(&s, Box::new(SqliteStore::open_in_memory().unwrap()), |_| {});
    let r = sync.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{r}");
    assert_eq!((r.count("create"), r.count("join")), (6, 6), "{r}");
    assert_eq!((r.looked_up, r.lookup_found), (12, 6), "{r}");
    assert_eq!(s.target.len(), 12);
    let joined = sync.with_store(|st| st.load_all()).unwrap().links;
    assert_eq!(
        joined.get(&"u001".into()).unwrap().target_id.as_str(),
        "old-1"
    );
    assert_eq!(
        joined.get(&"g002".into()).unwrap().target_id.as_str(),
        "old-g2"
    );
    assert_eq!(sync.run_cycle().await.unwrap().total_done(), 0);
}

#[tokio::test]
async fn several_candidates_are_a_conflict_never_a_guess() {
    let (s, _) = setup(3, Box::new(MemoryStore::new()), |_| {});
    // Two target groups carry group 1's display name (another tool made it twice).
    for id in ["dup-a", "dup-b"] {
        s.target
            .insert(dirsync::model::TargetObject::new(id, "Group").with("displayName", "GROUP 1"));
    }
    let mut sync = resync(&s, Box::new(MemoryStore::new()), |_| {});
    let r = sync.run_cycle().await.unwrap();
    assert_eq!(r.count("create"), 3, "the users only: {r}");
    assert_eq!(r.count("join"), 0, "{r}");
    assert_eq!(r.lookup_found, 2, "{r}");
    assert!(
        r.issues
            .iter()
            .any(|i| i.contains("g001") && i.contains("matches 2 target objects")),
        "{r}"
    );
    // Neither joined nor created: the target holds the two groups and the three users.
    assert_eq!(s.target.len(), 5);
    // Removing one duplicate by hand settles it at the next run (the group stays dirty).
    use dirsync::connector::Target;
    s.target
        .apply(&[TargetOperation::Delete {
            id: "dup-b".into(),
            object_type: "Group".into(),
        }])
        .await
        .pop()
        .unwrap()
        .unwrap();
    // The mirror still holds both; a reconcile reads the target whole.
    let r = sync.reconcile().await.unwrap();
    assert_eq!(r.count("join"), 1, "{r}");
    assert!(r.issues.is_empty(), "{r}");
    assert_eq!(s.target.len(), 4);
}

#[tokio::test]
async fn a_target_read_whole_answers_until_it_goes_stale() {
    let (s, mut first) = setup(4, Box::new(MemoryStore::new()), |_| {});
    first.run_cycle().await.unwrap();
    // ReadTarget: the fresh state reads each type whole instead of looking values up.
    let mut sync = resync(&s, Box::new(MemoryStore::new()), |c| {
        c.join_lookup = dirsync::engine::JoinLookup::ReadTarget;
        c.target_read_max_age = Some(Duration::from_secs(3600));
    });
    let lookups = s.target.lookups();
    let r = sync.run_cycle().await.unwrap();
    assert_eq!((r.count("create"), r.count("join")), (0, 5), "{r}");
    assert_eq!((r.reconciled, r.looked_up), (5, 0), "{r}");
    assert_eq!(s.target.lookups(), lookups);
    // Read whole, the types answer: a new user is created without a lookup or a read…
    s.source.add(user(10, "Eng")).unwrap();
    let r = sync.run_cycle().await.unwrap();
    assert_eq!((r.count("create"), r.reconciled), (1, 0), "{r}");
    // …until the read is older than the maximum age: then the type is read again first.
    *s.now.lock().unwrap() += chrono::Duration::hours(2);
    s.source.add(user(11, "Eng")).unwrap();
    let r = sync.run_cycle().await.unwrap();
    // (Only users are created, so only users are read: 4 + 1.)
    assert_eq!((r.count("create"), r.reconciled), (1, 5), "{r}");

    // Batched (the default): a reconcile makes the mirror answer too.
    let mut sync = resync(&s, Box::new(MemoryStore::new()), |_| {});
    sync.delta_import().await.unwrap();
    let r = sync.reconcile().await.unwrap();
    assert_eq!((r.count("join"), r.looked_up), (7, 0), "{r}");
    s.source.add(user(12, "Eng")).unwrap();
    let lookups = s.target.lookups();
    let r = sync.run_cycle().await.unwrap();
    assert_eq!((r.count("create"), r.looked_up), (1, 0), "{r}");
    assert_eq!(s.target.lookups(), lookups);

    // Off: nothing is looked up, and the fresh state duplicates what no uniqueness rule
    // refuses (the group).
    let mut blind = resync(&s, Box::new(MemoryStore::new()), |c| {
        c.join_lookup = dirsync::engine::JoinLookup::Off;
    });
    let r = blind.run_cycle().await.unwrap();
    assert_eq!(r.looked_up, 0, "{r}");
    assert_eq!(
        s.target
            .objects()
            .iter()
            .filter(|o| o.object_type.is("Group"))
            .count(),
        2
    );
}

#[tokio::test]
async fn a_staged_plan_is_checked_against_the_target_before_it_creates() {
    let (s, mut first) = setup(3, Box::new(MemoryStore::new()), |_| {});
    first.run_cycle().await.unwrap();
    let mut sync = resync(&s, Box::new(SqliteStore::open_in_memory().unwrap()), |_| {});
    sync.delta_import().await.unwrap();
    // `plan` reads the state only: it would create all four objects again…
    let blind = sync.plan(false).unwrap();
    assert_eq!(blind.plan.count("create"), 4);
    // …and applying it is refused: the target holds what it would create.
    let err = sync.apply(blind).await.unwrap_err();
    assert!(matches!(err, EngineError::StalePlan { .. }), "{err}");
    assert_eq!(s.target.len(), 4);
    // `plan_with_lookups` shows the plan a run makes: joins.
    let staged = sync.plan_with_lookups(false).await.unwrap();
    assert_eq!(
        (staged.plan.count("create"), staged.plan.count("join")),
        (0, 4),
        "{}",
        staged.plan
    );
    let r = sync.apply(staged).await.unwrap();
    assert_eq!(r.count("join"), 4, "{r}");
    assert_eq!(s.target.len(), 4);
}

#[tokio::test]
async fn a_fresh_state_joins_what_an_ldif_target_already_holds() {
    use dirsync::connector::ldif::{LdifSource, LdifSourceConfig, LdifTarget, LdifTargetConfig};
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("version: 1\n\n");
    text += &ldif_person("ada", "00000000-0000-4000-8000-000000000001", "Lovelace");
    text += &ldif_person("alan", "00000000-0000-4000-8000-000000000002", "Turing");
    text += &ldif_person("grace", "00000000-0000-4000-8000-000000000003", "Hopper");
    text += &ldif_person("hedy", "00000000-0000-4000-8000-000000000004", "Lamarr");
    text += "dn: cn=staff,ou=Groups,dc=src\nobjectClass: groupOfNames\nentryUUID: 00000000-0000-4000-8000-0000000000aa\ncn: staff\nmember: uid=ada,ou=People,dc=src\nmember: uid=alan,ou=People,dc=src\n\n";
    text += "dn: cn=ops,ou=Groups,dc=src\nobjectClass: groupOfNames\nentryUUID: 00000000-0000-4000-8000-0000000000bb\ncn: ops\nmember: uid=hedy,ou=People,dc=src\n\n";
    let content = dir.path().join("people.ldif");
    std::fs::write(&content, text).unwrap();
    // The target, provisioned by another tool: ada, alan, grace (grace's cn spelled otherwise)
    // and staff; hedy and ops are missing.
    let target_path = dir.path().join("target.ldif");
    let target_person = |uid: &str, cn: &str, sn: &str| {
        format!("dn: uid={uid},ou=Users,dc=dst\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {cn}\nsn: {sn}\nmail: {uid}@dst.test\n\n")
    };
    let mut held = String::from("version: 1\n\n");
    held += &target_person("ada", "ada Lovelace", "Lovelace");
    held += &target_person("alan", "alan Turing", "Turing");
    held += &target_person("grace", "Amazing Grace", "Hopper");
    held += "dn: cn=staff,ou=Groups,dc=dst\nobjectClass: groupOfNames\ncn: staff\nmember: uid=ada,ou=Users,dc=dst\nmember: uid=alan,ou=Users,dc=dst\n\n";
    std::fs::write(&target_path, held).unwrap();
    let tconfig = LdifTargetConfig::default()
        .with_object_type("User", "uid", dn("ou=Users,dc=dst"), ["inetOrgPerson"])
        .with_object_type("Group", "cn", dn("ou=Groups,dc=dst"), ["groupOfNames"]);
    let rules = RuleSet::from_toml(LDIF_RULES, Some("ldif.toml")).unwrap();
    let mut sync = Synchronizer::new(
        Box::new(LdifSource::new(&content, LdifSourceConfig::default())),
        Box::new(LdifTarget::open(&target_path, tconfig.clone()).unwrap()),
        Box::new(SqliteStore::open(dir.path().join("state.sqlite")).unwrap()),
        Arc::new(rules),
        EngineConfig::default(),
    );
    let r = sync.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{r}");
    // Only the missing are created; the rest is joined, grace's cn brought in line.
    assert_eq!((r.count("create"), r.count("join")), (2, 4), "{r}");
    assert_eq!((r.looked_up, r.lookup_found), (6, 4), "{r}");
    let written = std::fs::read_to_string(&target_path).unwrap();
    assert_eq!(written.matches("dn: ").count(), 6, "{written}");
    assert!(written.contains("cn: grace Hopper"), "{written}");
    assert!(
        written.contains("dn: cn=ops,ou=Groups,dc=dst")
            && written.contains("member: uid=hedy,ou=Users,dc=dst"),
        "{written}"
    );
    // The next run writes nothing: the file is not rewritten.
    let r = sync.run_cycle().await.unwrap();
    assert_eq!(r.total_done(), 0, "{r}");
    assert_eq!(std::fs::read_to_string(&target_path).unwrap(), written);
    assert_eq!(LdifTarget::open(&target_path, tconfig).unwrap().len(), 6);
}

/// An LDIF source anchored on an attribute its entries do not keep unique (`employeeNumber`),
/// in both state stores: a change file adding a second entry with an anchor in use — another
/// added entry's, or an existing entry's — fails the delta import at its line, naming both DNs;
/// a content file holding two entries with one anchor fails the full import, naming the anchor
/// and both DNs. Each time nothing is applied: the mirror, the target and the watermark are as
/// before. Once the files are fixed the next run goes through with nothing to do.
#[tokio::test]
async fn ldif_entries_with_one_anchor_are_refused() {
    use dirsync::connector::ldif::{LdifSource, LdifSourceConfig};
    let person = |uid: &str, number: &str| {
        format!("dn: uid={uid},ou=People,dc=src\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nemployeeNumber: {number}\n\n")
    };
    let content = format!(
        "version: 1\n\n{}{}{}",
        person("ada", "E1"),
        person("alan", "E2"),
        person("grace", "E3")
    );
    let rules = Arc::new(
        RuleSet::builder()
            .rule(
                RuleBuilder::new("people", "user", "User")
                    .flow("userName", "[uid]")
                    .join(["userName"]),
            )
            .build()
            .unwrap(),
    );
    for sqlite in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("people.ldif");
        let changes = dir.path().join("changes");
        std::fs::create_dir(&changes).unwrap();
        std::fs::write(&path, &content).unwrap();
        let source = LdifSource::new(
            &path,
            LdifSourceConfig {
                anchor_attribute: "employeeNumber".into(),
                changes_dir: Some(changes.clone()),
                ..LdifSourceConfig::default()
            },
        );
        let store: Box<dyn StateStore> = if sqlite {
            Box::new(SqliteStore::open(dir.path().join("state.sqlite")).unwrap())
        } else {
            Box::new(MemoryStore::new())
        };
        let target = MemoryTarget::new("app");
        let mut sync = Synchronizer::new(
            Box::new(source),
            Box::new(target.clone()),
            store,
            rules.clone(),
            EngineConfig::default(),
        );
        let report = sync.run_cycle().await.unwrap();
        assert_eq!(report.count("create"), 3, "{report}");
        let objects = target.objects();
        let state = |sync: &Synchronizer| {
            sync.with_store(|s| {
                (
                    s.fingerprint().unwrap(),
                    s.watermark("ldif").unwrap(),
                    s.load_all().unwrap().mirror.len(),
                )
            })
        };
        let before = state(&sync);
        assert!(before.1.is_some());

        // Two adds with one anchor in a change file; then an add of an anchor ada has.
        let add = |uid: &str, number: &str| {
            format!("dn: uid={uid},ou=People,dc=src\nchangetype: add\nobjectClass: inetOrgPerson\nuid: {uid}\nemployeeNumber: {number}\n\n")
        };
        for (file, body, line, first, second) in [
            (
                "001.ldif",
                add("dan", "E9") + &add("eve", "E9"),
                7,
                "uid=dan,ou=People,dc=src",
                "uid=eve,ou=People,dc=src",
            ),
            (
                "002.ldif",
                add("fay", "E1"),
                1,
                "uid=ada,ou=People,dc=src",
                "uid=fay,ou=People,dc=src",
            ),
        ] {
            std::fs::write(changes.join(file), body).unwrap();
            let err = sync.run_cycle().await.unwrap_err().to_string();
            assert!(
                err.contains(&format!("line {line}"))
                    && err.contains(&format!("an add of {second} with the anchor"))
                    && err.contains(&format!("which {first} already has")),
                "sqlite {sqlite}, {file}: {err}"
            );
            assert_eq!(state(&sync), before, "sqlite {sqlite}, {file}");
            assert_eq!(target.objects(), objects, "sqlite {sqlite}, {file}");
            std::fs::remove_file(changes.join(file)).unwrap();
        }

        // Two entries with one anchor in the content file: the full import it takes refuses.
        let duplicated = content.replace("employeeNumber: E3", "employeeNumber: E2");
        std::fs::write(&path, &duplicated).unwrap();
        let err = sync.run_cycle().await.unwrap_err();
        assert!(
            matches!(&err, EngineError::DuplicateAnchor { during: "full import", anchor, first, second }
                if anchor.as_str() == "E2"
                    && first == "uid=alan,ou=People,dc=src"
                    && second == "uid=grace,ou=People,dc=src"),
            "sqlite {sqlite}: {err}"
        );
        let (fingerprint, watermark, mirrored) = state(&sync);
        assert_eq!(
            (fingerprint, mirrored),
            (before.0, before.2),
            "sqlite {sqlite}"
        );
        assert_eq!(watermark, None, "the next import is a full one again");
        assert_eq!(target.objects(), objects, "sqlite {sqlite}");
        // Still refused while the file holds them.
        assert!(matches!(
            sync.run_cycle().await,
            Err(EngineError::DuplicateAnchor { .. })
        ));

        // Fixed: nothing to do.
        std::fs::write(&path, &content).unwrap();
        let report = sync.run_cycle().await.unwrap();
        assert_eq!(report.total_done(), 0, "sqlite {sqlite}: {report}");
        assert_eq!(target.objects(), objects, "sqlite {sqlite}");
    }
}

/// The example directory (`examples/data/corp.ldif`) through the example rules
/// (`examples/rules/ad-to-scim.toml`) into an in-memory target, as the quickstart loads it.
fn example_directory_sync(target: &MemoryTarget) -> (Synchronizer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let sync = Synchronizer::new(
        Box::new(common::example_directory()),
        Box::new(target.clone()),
        Box::new(SqliteStore::open(dir.path().join("state.sqlite")).unwrap()),
        Arc::new(common::example_rules("ad-to-scim.toml")),
        EngineConfig {
            seed: 42,
            ..EngineConfig::default()
        },
    );
    (sync, dir)
}

/// Every linked source object's reference flows, as the target should hold them: (target id,
/// target attribute, sorted target ids).
fn expected_references(
    sync: &Synchronizer,
    attributes: &[(&str, &str)],
) -> Vec<(String, String, Vec<String>)> {
    let views = sync.with_store(|s| s.load_all()).unwrap();
    let mut out = Vec::new();
    for link in views.links.iter() {
        for (source_attr, target_attr) in attributes {
            let ids = common::linked_references(&views, &link.anchor, source_attr);
            if !ids.is_empty() {
                out.push((link.target_id.to_string(), target_attr.to_string(), ids));
            }
        }
    }
    out.sort();
    out
}

/// What the target holds in reference attributes, in the shape of [`expected_references`].
fn held_references(
    target: &MemoryTarget,
    attributes: &[(&str, &str)],
) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    for o in target.objects() {
        for (_, target_attr) in attributes {
            let mut ids: Vec<String> = o
                .attributes
                .get(target_attr)
                .into_iter()
                .flatten()
                .filter_map(dirsync::testkit::target_ref)
                .map(|t| t.to_string())
                .collect();
            ids.sort();
            if !ids.is_empty() {
                out.push((o.id.to_string(), target_attr.to_string(), ids));
            }
        }
    }
    out.sort();
    out
}

const SCIM_MANAGER: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager";

#[tokio::test]
async fn initial_load_of_the_example_directory_writes_each_object_once() {
    let target = MemoryTarget::new("scim").unique_attribute("User", "userName");
    let (mut sync, _dir) = example_directory_sync(&target);
    let r = sync.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{r}");
    let objects = target.len();
    let writes = target.applied().len();
    let refs = [("manager", SCIM_MANAGER), ("member", "members")];
    let expected = expected_references(&sync, &refs);
    // 43 users have a manager in scope and 8 groups have members; the target holds them all.
    let count = |attr: &str| expected.iter().filter(|(_, a, _)| a == attr).count();
    assert_eq!(
        (count(SCIM_MANAGER), count("members")),
        (43, 8),
        "{expected:?}"
    );
    assert_eq!(held_references(&target, &refs), expected);
    // The example directory has no reference cycle: one write per object.
    assert_eq!(
        (writes, r.count("create"), r.count("references")),
        (objects, objects as u64, 0),
        "{r}"
    );
    // And nothing to do after it.
    let again = sync.run_cycle().await.unwrap();
    assert_eq!(again.total_done(), 0, "{again}");
    assert_eq!(target.applied().len(), writes);
}

/// Users with a `manager` reference flow and groups with `members`, by name.
fn managed_rules() -> Arc<RuleSet> {
    Arc::new(
        RuleSet::builder()
            .rule(
                RuleBuilder::new("users", "user", "User")
                    .flow("userName", "[cn]")
                    .flow_with(FlowConfig {
                        reference: true,
                        multi: Some(false),
                        ..FlowConfig::new("manager", "[manager]")
                    })
                    .join(["userName"]),
            )
            .rule(
                RuleBuilder::new("groups", "group", "Group")
                    .flow("displayName", "[cn]")
                    .flow_with(FlowConfig {
                        reference: true,
                        ..FlowConfig::new("members", "[member]")
                    })
                    .join(["displayName"]),
            )
            .build()
            .unwrap(),
    )
}

fn person(cn: &str, manager: Option<&str>) -> Entry {
    let e = Entry::new(cn, "user")
        .with_dn(dn(&format!("cn={cn},ou=people,dc=x")))
        .with("cn", cn);
    match manager {
        Some(m) => e.with(
            "manager",
            Value::dn_ref(dn(&format!("cn={m},ou=people,dc=x"))),
        ),
        None => e,
    }
}

/// (userName, the manager's userName) pairs and (group, its members' userNames) pairs.
type Held = (Vec<(String, String)>, Vec<(String, Vec<String>)>);

/// The managers and members the target holds, by name.
fn names_held(t: &MemoryTarget) -> Held {
    let objects = t.objects();
    let name_of = |v: &Value| {
        let id = dirsync::testkit::target_ref(v).unwrap();
        let o = objects.iter().find(|o| &o.id == id).unwrap();
        o.attributes.first_str("userName").unwrap().to_string()
    };
    let mut managers = Vec::new();
    let mut members = Vec::new();
    for o in &objects {
        if let Some(m) = o.attributes.first("manager") {
            let user = o.attributes.first_str("userName").unwrap().to_string();
            managers.push((user, name_of(m)));
        }
        if let Some(ms) = o.attributes.get("members") {
            let mut names: Vec<String> = ms.iter().map(name_of).collect();
            names.sort();
            let group = o.attributes.first_str("displayName").unwrap().to_string();
            members.push((group, names));
        }
    }
    managers.sort();
    members.sort();
    (managers, members)
}

#[tokio::test]
async fn a_reference_cycle_and_a_failed_referenced_create_lose_nothing_and_converge() {
    for (name, store) in stores() {
        let source = MemorySource::new("hr");
        // Ann and Bob manage each other; Cy reports to Dee; the group holds Ann, Cy and Dee.
        for e in [
            person("ann", Some("bob")),
            person("bob", Some("ann")),
            person("cy", Some("dee")),
            person("dee", None),
            Entry::new("staff", "group")
                .with_dn(dn("cn=staff,ou=groups,dc=x"))
                .with("cn", "staff")
                .with_values(
                    "member",
                    ["ann", "cy", "dee"]
                        .map(|m| Value::dn_ref(dn(&format!("cn={m},ou=people,dc=x"))))
                        .to_vec(),
                ),
        ] {
            source.add(e).unwrap();
        }
        let target = MemoryTarget::new("app").unique_attribute("User", "userName");
        // Dee's create fails once.
        target.fail_when(
            |op| matches!(op, TargetOperation::Create { attributes, .. } if attributes.first_str("userName") == Some("dee")),
            ErrorKind::Constraint,
            Some(1),
        );
        let now = Arc::new(Mutex::new(t0()));
        let clock = now.clone();
        let mut sync = Synchronizer::new(
            Box::new(source.clone()),
            Box::new(target.clone()),
            store,
            managed_rules(),
            EngineConfig {
                clock: Clock::from_fn(move || *clock.lock().unwrap()),
                ..EngineConfig::default()
            },
        );
        let r = sync.run_cycle().await.unwrap();
        assert_eq!(r.failures.len(), 1, "{name}: {r}");
        // Four creates (Cy without her manager, the group without Dee) and one write for the
        // edge that closes the cycle: Bob is created first, Ann with Bob as her manager, then
        // Bob gets Ann.
        assert_eq!(
            (
                r.count("create"),
                r.count("references"),
                target.applied().len()
            ),
            (4, 1, 5),
            "{name}: {r}"
        );
        let (managers, members) = names_held(&target);
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(managers, pairs(&[("ann", "bob"), ("bob", "ann")]), "{name}");
        assert_eq!(
            members,
            [(
                "staff".to_string(),
                vec!["ann".to_string(), "cy".to_string()]
            )]
        );
        let dirty = sync.with_store(|s| s.dirty()).unwrap();
        for a in ["cy", "dee", "staff"] {
            assert!(
                dirty.contains(&a.into()),
                "{name}: {a} is not dirty: {dirty:?}"
            );
        }
        // After the escrow delay: Dee is created, and Cy and the group get her.
        *now.lock().unwrap() = t0() + chrono::Duration::hours(2);
        let r = sync.run_cycle().await.unwrap();
        assert!(r.failures.is_empty(), "{name}: {r}");
        assert_eq!(
            (
                r.count("create"),
                r.count("references"),
                target.applied().len()
            ),
            (1, 2, 8),
            "{name}: {r}"
        );
        let (managers, members) = names_held(&target);
        assert_eq!(
            managers,
            pairs(&[("ann", "bob"), ("bob", "ann"), ("cy", "dee")]),
            "{name}"
        );
        assert_eq!(
            members,
            [(
                "staff".to_string(),
                ["ann", "cy", "dee"].map(String::from).to_vec()
            )]
        );
        // Converged, nothing duplicated.
        let r = sync.run_cycle().await.unwrap();
        assert_eq!(r.total_done(), 0, "{name}: {r}");
        assert_eq!(target.len(), 5, "{name}");
        assert!(sync.with_store(|s| s.dirty()).unwrap().is_empty(), "{name}");
    }
}

/// The rules' target type for users changes (User → Person) on a running system: through the
/// engine, each user's Person is created before its User is deleted, the links move to the new
/// objects, the group's members follow in the same run, and nothing is left to do. A Person whose
/// create fails leaves its User linked and untouched until a later run succeeds.
#[tokio::test]
async fn a_changed_target_type_replaces_objects_through_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.sqlite");
    let (s, mut sync) = setup(4, Box::new(SqliteStore::open(&state).unwrap()), |_| {});
    sync.run_cycle().await.unwrap();
    let ids_of = |t: &MemoryTarget, ty: &str| -> Vec<String> {
        let mut v: Vec<String> = t
            .objects()
            .into_iter()
            .filter(|o| o.object_type.is(ty))
            .map(|o| o.id.to_string())
            .collect();
        v.sort();
        v
    };
    let users = ids_of(&s.target, "User");
    assert_eq!(users.len(), 4);
    drop(sync);

    let person = {
        let mut config = rules().config().clone();
        config.rules[0].target_type = "Person".into();
        config.rules[0].deprovision.type_changed = DeprovisionPolicy::Delete;
        Arc::new(RuleSet::compile(config).unwrap())
    };
    let mut sync = Synchronizer::new(
        Box::new(s.source.clone()),
        Box::new(s.target.clone()),
        Box::new(SqliteStore::open(&state).unwrap()),
        person,
        EngineConfig {
            clock: {
                let now = s.now.clone();
                Clock::from_fn(move || *now.lock().unwrap())
            },
            ..EngineConfig::default()
        },
    );
    // user3's Person cannot be created (yet).
    s.target.fail_when(
        |op| matches!(op, TargetOperation::Create { object_type, attributes } if object_type.is("Person") && attributes.first_str("userName") == Some("user3@x.test")),
        ErrorKind::Constraint,
        Some(1),
    );
    let r = sync.full_sync().await.unwrap();
    assert_eq!((r.count("create"), r.count("delete")), (3, 3), "{r}");
    assert_eq!(r.failures.len(), 1, "{r}");
    let people = ids_of(&s.target, "Person");
    assert_eq!(people.len(), 3);
    // user3's User is still there and linked; the others are gone.
    let left = ids_of(&s.target, "User");
    assert_eq!(left.len(), 1);
    let links = sync.with_store(|st| st.load_all()).unwrap().links;
    let u3 = links.get(&"u003".into()).unwrap();
    assert_eq!(
        (u3.target_type.as_str(), u3.target_id.as_str()),
        ("User", left[0].as_str())
    );
    for a in ["u000", "u001", "u002"] {
        let l = links.get(&a.into()).unwrap();
        assert!(
            l.target_type.is("Person") && people.contains(&l.target_id.to_string()),
            "{a}"
        );
    }
    // The group's members moved to the new objects of the run (user3 still a User).
    let group = s
        .target
        .objects()
        .into_iter()
        .find(|o| o.object_type.is("Group"))
        .unwrap();
    let mut members: Vec<String> = group
        .attributes
        .get("members")
        .unwrap()
        .iter()
        .map(|v| match v {
            Value::Reference(dirsync::model::Reference::Target(id)) => id.to_string(),
            other => other.to_string(),
        })
        .collect();
    members.sort();
    let mut want: Vec<String> = people.iter().cloned().chain(left.iter().cloned()).collect();
    want.sort();
    assert_eq!(members, want);

    // The next run (after the escrow delay) replaces user3 too; then nothing is left.
    *s.now.lock().unwrap() += chrono::Duration::hours(1);
    let r = sync.full_sync().await.unwrap();
    assert_eq!((r.count("create"), r.count("delete")), (1, 1), "{r}");
    assert!(r.failures.is_empty(), "{r}");
    assert!(ids_of(&s.target, "User").is_empty());
    assert_eq!(ids_of(&s.target, "Person").len(), 4);
    let r = sync.full_sync().await.unwrap();
    assert_eq!(r.total_done(), 0, "{r}");
}

/// The engine declares the rules' join attributes: the SQLite store indexes only those target
/// values, and an object that appears in the target (read by reconcile) is joined through
/// that index by a new source object, with nothing created.
#[tokio::test]
async fn the_state_indexes_only_join_attributes_and_joins_through_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.sqlite");
    let (s, mut sync) = setup(3, Box::new(SqliteStore::open(&path).unwrap()), |_| {});
    let r = sync.run_cycle().await.unwrap();
    assert_eq!(r.count("create"), 4, "{r}");
    let indexed = || -> Vec<String> {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let mut stmt = conn
            .prepare("SELECT DISTINCT attribute FROM target_values ORDER BY attribute")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    // users join on userName, groups on displayName; department and the rest are not indexed.
    assert_eq!(indexed(), ["displayname", "username"]);
    // An administrator creates the account by hand; reconcile reads it into the state.
    s.target.insert(
        dirsync::model::TargetObject::new("hand-made", "User")
            .with("userName", "user7@x.test")
            .with("department", "Eng"),
    );
    sync.reconcile().await.unwrap();
    s.source.add(user(7, "Eng")).unwrap();
    let r = sync.run_cycle().await.unwrap();
    assert_eq!((r.count("join"), r.count("create")), (1, 0), "{r}");
    let links = sync.with_store(|st| st.load_all()).unwrap().links;
    assert_eq!(
        links.get(&"u007".into()).map(|l| l.target_id.as_str()),
        Some("hand-made")
    );
    assert_eq!(indexed(), ["displayname", "username"]);
}

/// The journal of the state file at `path`, read through a connection of its own.
fn journal_at(path: &std::path::Path) -> Vec<dirsync::state::JournalRecord> {
    SqliteStore::open(path).unwrap().journal(None).unwrap()
}

#[tokio::test]
async fn batches_of_max_batch_each_journaled_before_it_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.sqlite");
    let store = SqliteStore::open(&path).unwrap();
    let (s, mut sync) = setup(45, Box::new(store), |c| c.concurrency = 2);
    let target = s.target.clone().max_batch(7);
    // Whenever the target receives an operation, the journal (read through another
    // connection: what a crash would leave) already holds it as intended.
    let (seen, missing) = (Arc::new(Mutex::new(0)), Arc::new(Mutex::new(Vec::new())));
    let (n, m, p) = (seen.clone(), missing.clone(), path.clone());
    target.fail_when(
        move |op| {
            *n.lock().unwrap() += 1;
            let journal = journal_at(&p);
            if !journal.iter().any(|e| e.sent.as_ref() == Some(op)) {
                m.lock().unwrap().push(format!("{op:?}"));
            }
            false
        },
        ErrorKind::Other,
        None,
    );
    let r = sync.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{r}");
    assert_eq!(r.count("create"), 46, "{r}");
    assert_eq!(*seen.lock().unwrap(), 46);
    assert!(
        missing.lock().unwrap().is_empty(),
        "{:?}",
        missing.lock().unwrap()
    );
    // 46 creates in calls of at most 7 (the target refuses larger ones): 7 calls at best,
    // one more for the group (it waits for its members) and for what the first calls leave.
    let calls = target.calls();
    assert!(
        (7..=10).contains(&calls),
        "{calls} apply calls for 46 creates"
    );
    // Every operation is confirmed; nothing is left to recover.
    let journal = journal_at(&path);
    assert_eq!(journal.len(), 46);
    assert!(journal
        .iter()
        .all(|e| e.state == dirsync::state::JournalState::Done));
    assert_eq!(sync.run_cycle().await.unwrap().total_done(), 0);
    assert_eq!(target.calls(), calls);
}

#[tokio::test]
async fn a_failure_inside_a_batch_is_escrowed_and_retried_next_run_the_rest_recorded() {
    let (s, mut sync) = setup(30, Box::new(MemoryStore::new()), |c| c.concurrency = 1);
    let target = s.target.clone().max_batch(50);
    target.fail_when(
        |op| matches!(op, TargetOperation::Create { attributes, .. } if attributes.first_str("userName") == Some("user17@x.test")),
        ErrorKind::Constraint,
        None,
    );
    let r = sync.run_cycle().await.unwrap();
    // The first call carries the breaker's 20 users (u017 fails among them), the second the
    // group — its members exist by then — and the 10 other users.
    assert_eq!(target.calls(), 2, "{r}");
    assert_eq!(r.failures.len(), 1, "{r}");
    assert!(r.failures[0].escrowed && r.failures[0].anchor == "u017");
    assert_eq!(r.count("create"), 30, "{r}");
    assert_eq!(user_names(&s.target).len(), 29);
    let journal = sync.with_store(|st| st.journal(None)).unwrap();
    assert_eq!(journal.len(), 31);
    let failed: Vec<_> = journal
        .iter()
        .filter(|e| e.state == dirsync::state::JournalState::Failed)
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].anchor.as_str(), "u017");
    assert_eq!(
        sync.with_store(|st| st.dirty()).unwrap(),
        ["u017".into()],
        "only the failed object stays dirty"
    );
    // Next run, before its escrow ends: deferred, nothing sent.
    let r = sync.run_cycle().await.unwrap();
    assert_eq!(
        (r.deferred, r.total_done(), target.calls()),
        (1, 0, 2),
        "{r}"
    );
    // After it, with the fault gone: created, and the run after that has nothing to do.
    target.clear_faults();
    *s.now.lock().unwrap() = t0() + chrono::Duration::hours(1);
    let r = sync.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{r}");
    assert_eq!(r.count("create"), 1, "{r}");
    assert_eq!(user_names(&s.target).len(), 30);
    assert!(sync.with_store(|st| st.escrowed()).unwrap().is_empty());
    assert!(sync.with_store(|st| st.dirty()).unwrap().is_empty());
}

#[tokio::test]
async fn a_throttled_operation_inside_a_batch_is_retried_after_its_retry_after() {
    let (s, mut sync) = setup(30, Box::new(SqliteStore::open_in_memory().unwrap()), |_| {});
    let target = s.target.clone().max_batch(50);
    // Every 7th operation sent is throttled; the lost create's response too.
    target.throttle_every(7, Duration::from_millis(3));
    target.fail_after_apply_when(
        |op| matches!(op, TargetOperation::Create { attributes, .. } if attributes.first_str("userName") == Some("user5@x.test")),
        ErrorKind::Timeout,
    );
    let r = sync.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{r}");
    assert!(r.retries >= 4, "{r}");
    assert_eq!(r.count("create"), 31, "{r}");
    target.clear_faults();
    // Nothing duplicated (user5 was found before it could be sent again), nothing left
    // unconfirmed, and a retry reused its journal row.
    assert_eq!(user_names(&s.target).len(), 30);
    let journal = sync.with_store(|st| st.journal(None)).unwrap();
    assert_eq!(journal.len(), 31);
    assert!(sync
        .with_store(|st| st.journal_unconfirmed())
        .unwrap()
        .is_empty());
    assert_eq!(sync.run_cycle().await.unwrap().total_done(), 0);
}

#[tokio::test]
async fn the_breaker_trips_mid_batch_and_the_next_run_converges() {
    let (s, mut sync) = setup(60, Box::new(SqliteStore::open_in_memory().unwrap()), |c| {
        c.circuit_breaker.min_operations = 10;
    });
    let target = s.target.clone().max_batch(100);
    let number = |op: &TargetOperation| match op {
        TargetOperation::Create { attributes, .. } => {
            attributes.first_str("userName").and_then(|n| {
                n.strip_prefix("user")?
                    .split('@')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
        }
        _ => None,
    };
    target.fail_when(
        move |op| number(op).is_some_and(|i| i >= 20),
        ErrorKind::Auth,
        None,
    );
    let r = sync.run_cycle().await.unwrap();
    let stopped = r.stopped.clone().expect("stopped");
    // A first call of 10 (the breaker's minimum) goes through; the second carries the 50
    // other users and the group: the breaker trips at its 20th failure (20 of 40), and what
    // follows in the same call is recorded too (20 more failures, the group created) —
    // nothing more is sent.
    assert!(stopped.contains("20 of 40"), "{stopped}");
    assert_eq!(target.calls(), 2, "{r}");
    assert_eq!((r.count("create"), r.failures.len()), (21, 40), "{r}");
    assert!(sync
        .with_store(|st| st.journal_unconfirmed())
        .unwrap()
        .is_empty());
    let dirty = sync.with_store(|st| st.dirty()).unwrap();
    assert_eq!(dirty.len(), 40, "the failed objects stay dirty: {dirty:?}");
    // The target is fixed; after the escrow, the next run creates the 40, once.
    target.clear_faults();
    *s.now.lock().unwrap() = t0() + chrono::Duration::hours(1);
    let r = sync.run_cycle().await.unwrap();
    assert!(r.failures.is_empty() && r.stopped.is_none(), "{r}");
    assert_eq!(r.count("create"), 40, "{r}");
    assert_eq!(user_names(&s.target).len(), 60);
    assert!(sync.with_store(|st| st.dirty()).unwrap().is_empty());
    assert_eq!(sync.run_cycle().await.unwrap().total_done(), 0);
}

#[tokio::test]
async fn a_whole_batch_left_unconfirmed_by_a_crash_is_settled_in_batches() {
    // A crash after a batch of 30 creates was journaled and 20 of them were applied: the
    // journal says "intended" for all 30, the target holds 20, the link table none.
    let (s, mut sync) = setup(30, Box::new(SqliteStore::open_in_memory().unwrap()), |c| {
        c.join_lookup = dirsync::engine::JoinLookup::Off;
    });
    sync.delta_import().await.unwrap();
    let staged = sync.plan(false).unwrap();
    let creates: Vec<_> = staged
        .plan
        .operations
        .iter()
        .filter(|o| o.target_type.is("User"))
        .cloned()
        .collect();
    assert_eq!(creates.len(), 30);
    let sent: Vec<TargetOperation> = creates
        .iter()
        .map(|c| c.to_target_operation(&Default::default()).unwrap().unwrap())
        .collect();
    sync.with_store(|st| {
        let run = st.begin_run("crashed", t0())?;
        let intents: Vec<_> = creates
            .iter()
            .zip(&sent)
            .map(|(c, t)| (c, Some(t)))
            .collect();
        st.journal_intents(run, &intents)
    })
    .unwrap();
    use dirsync::connector::Target;
    let applied = s.target.apply(&sent[..20]).await;
    assert!(applied.iter().all(Result::is_ok));
    let lookups = s.target.lookups();
    // The next run settles the 30 with one lookup (the target answers many values per
    // request), records the 20 as done, and creates the 10 others — nothing twice.
    let r = sync.run_cycle().await.unwrap();
    assert_eq!(r.recovered, 30, "{r}");
    assert_eq!(s.target.lookups() - lookups, 1, "{r}");
    assert_eq!(r.count("create"), 10 + 1, "the 10 and the group: {r}");
    assert_eq!(user_names(&s.target).len(), 30);
    let links = sync.with_store(|st| st.load_all()).unwrap().links;
    for a in applied.iter().flatten() {
        assert!(links.anchor_of(&a.id).is_some(), "{a:?} linked");
    }
    assert!(sync
        .with_store(|st| st.journal_unconfirmed())
        .unwrap()
        .is_empty());
    assert_eq!(sync.run_cycle().await.unwrap().total_done(), 0);
}

#[test]
fn the_engine_runs_under_any_executor_retries_and_commits_included() {
    // No tokio runtime: the state writer is a thread of its own, and a retry waits on a timer
    // thread.
    let (s, mut sync) = setup(12, Box::new(SqliteStore::open_in_memory().unwrap()), |_| {});
    s.target.throttle_every(5, Duration::from_millis(2));
    let r = futures::executor::block_on(sync.run_cycle()).unwrap();
    assert!(r.failures.is_empty(), "{r}");
    assert!(r.retries > 0, "{r}");
    assert_eq!(user_names(&s.target).len(), 12);
    s.target.clear_faults();
    let r = futures::executor::block_on(sync.run_cycle()).unwrap();
    assert_eq!(r.total_done(), 0, "{r}");
}
