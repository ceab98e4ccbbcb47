//! The Graph target against the in-process Graph emulator: users, joins, updates, disable,
//! delete and restore, large groups through `$batch`, throttling, stale delta links, token
//! expiry, replication delay, AD (LDIF) → Entra through the engine, a fresh state joining every
//! user and group Entra holds, and `$filter` `in`/`or` within Graph's limits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::build_sync;
use std::sync::Arc;
use std::time::Duration;

use dirsync::connector::graph::emulator::{Faults, GraphEmulator};
use dirsync::connector::graph::{
    CertificateCredential, Credential, GraphChange, GraphConfig, GraphTarget,
};
use dirsync::connector::ldif::LdifSource;
use dirsync::connector::memory::MemorySource;
use dirsync::connector::{ErrorKind, Target, TargetOperation};
use dirsync::engine::{EngineConfig, RetryPolicy, Synchronizer};
use dirsync::model::{AttrName, AttributeChange, Attributes, Entry, ObjectType, Value, Values};
use dirsync::rules::ruleset::RuleSet;
use dirsync::state::MemoryStore;
use futures::StreamExt;
use serde_json::json;

const EXT: &str = "extension_0123456789abcdef0123456789abcdef_costCenter";

fn attrs(pairs: &[(&str, Value)]) -> Attributes {
    pairs
        .iter()
        .map(|(k, v)| (*k, Values::one(v.clone())))
        .collect()
}

fn user(n: usize) -> Attributes {
    attrs(&[
        (
            "userPrincipalName",
            Value::string(format!("user{n}@contoso.com")),
        ),
        ("displayName", Value::string(format!("User {n}"))),
        ("mailNickname", Value::string(format!("user{n}"))),
        ("employeeId", Value::string(format!("E{n:05}"))),
        (
            "onPremisesImmutableId",
            Value::string(format!("anchor-{n}")),
        ),
        (
            "onPremisesExtensionAttributes.extensionAttribute1",
            Value::string(format!("CC{n}")),
        ),
        (EXT, Value::string(format!("cost'{n}"))),
        ("accountEnabled", Value::Boolean(true)),
    ])
}

fn create(object_type: &str, attributes: Attributes) -> TargetOperation {
    TargetOperation::Create {
        object_type: object_type.into(),
        attributes,
    }
}

async fn setup() -> (GraphEmulator, GraphTarget) {
    let emu = GraphEmulator::start().await.unwrap();
    let mut cfg = emu.config("app-1", "s3cret");
    cfg.user_select = vec![EXT.to_string()];
    let target = GraphTarget::new("entra", cfg).unwrap();
    (emu, target)
}

/// Applies `ops` in one call, each of which must succeed: the ids.
async fn created(t: &GraphTarget, ops: &[TargetOperation]) -> Vec<String> {
    t.apply(ops)
        .await
        .into_iter()
        .map(|r| r.unwrap().id.as_str().to_string())
        .collect()
}

async fn apply1(t: &GraphTarget, op: TargetOperation) -> Result<String, ErrorKind> {
    t.apply(&[op])
        .await
        .remove(0)
        .map(|a| a.id.as_str().to_string())
        .map_err(|e| e.kind())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_create_join_update_disable_delete_restore() {
    let (emu, t) = setup().await;
    let id = apply1(&t, create("user", user(1))).await.unwrap();
    let stored = &emu.users()[&id];
    assert_eq!(stored["userPrincipalName"], "user1@contoso.com");
    assert!(
        stored.get("passwordProfile").is_none(),
        "the emulator keeps no password"
    );

    // Join by each supported attribute (with a quote in one value).
    let ty = ObjectType::new("user");
    for (attr, value) in [
        ("userPrincipalName", Value::string("USER1@contoso.com")),
        ("mailNickname", Value::string("user1")),
        ("employeeId", Value::string("E00001")),
        ("onPremisesImmutableId", Value::string("anchor-1")),
        (
            "onPremisesExtensionAttributes.extensionAttribute1",
            Value::string("CC1"),
        ),
        (EXT, Value::string("cost'1")),
        ("displayName", Value::string("User 1")),
        ("id", Value::string(id.clone())),
    ] {
        let found = t.find(&ty, &AttrName::new(attr), &value).await.unwrap();
        assert_eq!(found.len(), 1, "join by {attr}");
        assert_eq!(found[0].id.as_str(), id);
        assert_eq!(
            found[0].attributes.first_str(EXT),
            Some("cost'1"),
            "extension read back"
        );
    }
    let none = t
        .find(&ty, &AttrName::new("employeeId"), &Value::string("nobody"))
        .await
        .unwrap();
    assert!(none.is_empty());

    // A second user with the same UPN is refused as AlreadyExists.
    let mut dup = user(2);
    dup.set("userPrincipalName", Values::one("user1@contoso.com"));
    assert_eq!(
        apply1(&t, create("user", dup)).await,
        Err(ErrorKind::AlreadyExists)
    );
    // Unknown property: Graph's 400, a constraint error (nothing created).
    let mut bad = user(3);
    bad.set("favouriteColour", Values::one("red"));
    assert_eq!(
        apply1(&t, create("user", bad)).await,
        Err(ErrorKind::Config)
    );

    // Update: only the changed property is sent; disable.
    let update = TargetOperation::Update {
        id: id.as_str().into(),
        object_type: "user".into(),
        changes: vec![
            AttributeChange::replace("jobTitle", Values::one("Engineer")),
            AttributeChange::add("businessPhones", Values::one("+1 555 0100")),
            AttributeChange::replace("accountEnabled", Values::one(Value::Boolean(false))),
        ],
    };
    apply1(&t, update).await.unwrap();
    let u = &emu.users()[&id];
    assert_eq!(u["jobTitle"], "Engineer");
    assert_eq!(u["accountEnabled"], false);
    assert_eq!(u["businessPhones"], json!(["+1 555 0100"]));
    assert_eq!(u["displayName"], "User 1", "untouched");

    // Delete: soft-deleted, UPN freed.
    let del = TargetOperation::Delete {
        id: id.as_str().into(),
        object_type: "user".into(),
    };
    apply1(&t, del.clone()).await.unwrap();
    assert!(emu.users().is_empty());
    assert_eq!(emu.deleted_users().len(), 1);
    assert_eq!(apply1(&t, del).await, Err(ErrorKind::NotFound));

    // The anchor comes back: restored (same id), not duplicated.
    let again = apply1(&t, create("user", user(1))).await.unwrap();
    assert_eq!(again, id);
    assert!(emu.deleted_users().is_empty());
    assert_eq!(emu.users()[&id]["userPrincipalName"], "user1@contoso.com");
    assert_eq!(emu.users().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_with_hundreds_of_members_through_batches() {
    let (emu, t) = setup().await;
    let mut ids = Vec::new();
    let ops: Vec<_> = (0..300).map(|n| create("user", user(n))).collect();
    for r in t.apply(&ops).await {
        ids.push(r.unwrap().id);
    }
    let members: Values = ids[..250].iter().cloned().map(Value::target_ref).collect();
    let mut g = attrs(&[
        ("displayName", Value::string("Everyone")),
        ("mailNickname", Value::string("everyone")),
    ]);
    g.set("members", members);
    let before = emu.stats().batches;
    let gid = apply1(&t, create("group", g)).await.unwrap();
    assert_eq!(emu.members(&gid).len(), 250);
    assert!(
        emu.stats().batches - before >= 1,
        "members went through $batch"
    );
    assert_eq!(emu.groups()[&gid]["securityEnabled"], true);

    // Remove 200, add the other 50 (value-level diff, never a rewrite).
    let update = TargetOperation::Update {
        id: gid.as_str().into(),
        object_type: "group".into(),
        changes: vec![
            AttributeChange::remove(
                "members",
                ids[..200]
                    .iter()
                    .cloned()
                    .map(Value::target_ref)
                    .collect::<Values>(),
            ),
            AttributeChange::add(
                "members",
                ids[250..]
                    .iter()
                    .cloned()
                    .map(Value::target_ref)
                    .collect::<Values>(),
            ),
        ],
    };
    apply1(&t, update.clone()).await.unwrap();
    let now = emu.members(&gid);
    assert_eq!(now.len(), 100);
    assert!(ids[200..].iter().all(|i| now.contains(i.as_str())));
    // Applying the same diff again converges (present adds and absent removes are done).
    apply1(&t, update).await.unwrap();
    assert_eq!(emu.members(&gid).len(), 100);

    // Read back through the group delta query, members included.
    let read: Vec<_> = t
        .read(&ObjectType::new("group"))
        .await
        .unwrap()
        .collect::<Vec<_>>()
        .await;
    assert_eq!(read.len(), 1);
    let g = read[0].as_ref().unwrap();
    assert_eq!(g.attributes.get("members").map(|v| v.len()), Some(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_reads_changes_and_a_stale_link_is_an_invalid_watermark() {
    let (emu, t) = setup().await;
    emu.set_page_size(7);
    let ty = ObjectType::new("user");
    let ops: Vec<_> = (0..20).map(|n| create("user", user(n))).collect();
    let ids = created(&t, &ops).await;
    let all: Vec<_> = t.read(&ty).await.unwrap().collect::<Vec<_>>().await;
    assert_eq!(all.len(), 20, "paged with nextLink");
    let w = t.watermark(&ty).unwrap();
    assert!(emu.edit_user(&ids[3], json!({"jobTitle": "Chief"})));
    apply1(
        &t,
        TargetOperation::Delete {
            id: ids[4].as_str().into(),
            object_type: "user".into(),
        },
    )
    .await
    .unwrap();
    let (changes, w2) = t.read_changes(&ty, Some(&w)).await.unwrap();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert!(changes.iter().any(|c| matches!(c, GraphChange::Changed { object, .. }
        if object.id.as_str() == ids[3] && object.attributes.first_str("jobTitle") == Some("Chief"))));
    assert!(changes
        .iter()
        .any(|c| matches!(c, GraphChange::Removed { id } if id.as_str() == ids[4])));
    let (none, _) = t.read_changes(&ty, Some(&w2)).await.unwrap();
    assert!(none.is_empty());

    emu.invalidate_delta_links();
    let e = t.read_changes(&ty, Some(&w2)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidWatermark, "{e}");
    assert!(e.message().contains("syncStateNotFound"));
    // A full re-read works.
    let (again, _) = t.read_changes(&ty, None).await.unwrap();
    assert_eq!(again.len(), 19);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_expiring_mid_run_and_replication_delay() {
    let (emu, t) = setup().await;
    apply1(&t, create("user", user(1))).await.unwrap();
    emu.expire_tokens();
    apply1(&t, create("user", user(2))).await.unwrap();
    assert_eq!(emu.stats().tokens, 2, "a new token after the 401");

    emu.set_faults(Faults {
        visibility_delay: Duration::from_millis(600),
        ..Faults::default()
    });
    let id = apply1(&t, create("user", user(3))).await.unwrap();
    // Right after the create the object is not visible yet: the 404 is retried.
    let update = TargetOperation::Update {
        id: id.as_str().into(),
        object_type: "user".into(),
        changes: vec![AttributeChange::replace("jobTitle", Values::one("New"))],
    };
    apply1(&t, update).await.unwrap();
    assert_eq!(emu.users()[&id]["jobTitle"], "New");
    assert!(t.stats().retries_not_throttled >= 1);
    // An object this target did not create: a 404 is a 404.
    let missing = TargetOperation::Update {
        id: "00000000-0000-0000-0000-000000000000".into(),
        object_type: "user".into(),
        changes: vec![AttributeChange::replace("jobTitle", Values::one("x"))],
    };
    assert_eq!(apply1(&t, missing).await, Err(ErrorKind::NotFound));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_credential_signs_a_client_assertion() {
    let emu = GraphEmulator::start().await.unwrap();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
    let cert = std::fs::read_to_string(format!("{dir}/graph-test-cert.pem")).unwrap();
    let key = std::fs::read_to_string(format!("{dir}/graph-test-key.pem")).unwrap();
    let cred = CertificateCredential::from_pem(&cert, &key).unwrap();
    emu.register_certificate("app-cert", &cred.public_key_der());
    let mut cfg: GraphConfig = emu.config("other", "x");
    cfg.client_id = "app-cert".into();
    cfg.client_secret = None;
    cfg.certificate_path = Some(format!("{dir}/graph-test-cert.pem").into());
    cfg.private_key_path = Some(format!("{dir}/graph-test-key.pem").into());
    let t = GraphTarget::new("entra", cfg.clone()).unwrap();
    apply1(&t, create("user", user(1))).await.unwrap();
    // A wrong key is refused as an authentication error.
    let other =
        GraphTarget::with_credential("entra", cfg, Credential::Secret("guess".into())).unwrap();
    assert_eq!(
        apply1(&other, create("user", user(2))).await,
        Err(ErrorKind::Auth)
    );
}

fn rules() -> Arc<RuleSet> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/rules/ad-to-entra.toml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    Arc::new(RuleSet::from_toml(&text, Some(path)).unwrap())
}

fn ad_user(n: usize) -> Entry {
    Entry::new(format!("u{n}"), "user")
        .with("objectGUID", format!("00000000-0000-4000-8000-{n:012}"))
        .with("userPrincipalName", format!("User{n}@contoso.com"))
        .with("sAMAccountName", format!("user{n}"))
        .with("givenName", "Test")
        .with("sn", format!("User{n}"))
        .with("employeeID", format!("E{n:05}"))
        .with("extensionAttribute1", format!("CC{n}-Eng"))
        .with("telephoneNumber", "+1 425 555 0100")
        .with("userAccountControl", Value::Integer(512))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_with_a_fifth_of_requests_throttled_loses_and_duplicates_nothing() {
    let emu = GraphEmulator::start().await.unwrap();
    let t = GraphTarget::new("entra", emu.config("app-1", "s3cret")).unwrap();
    let source = MemorySource::new("ad");
    let n = 60;
    for i in 0..n {
        source.add(ad_user(i)).unwrap();
    }
    let mut group = Entry::new("g1", "group")
        .with("sAMAccountName", "Staff")
        .with("cn", "Staff");
    for i in 0..n {
        group = group.with("member", Value::anchor_ref(format!("u{i}")));
    }
    source.add(group).unwrap();
    emu.set_faults(Faults {
        throttle_share: 0.2,
        retry_after_secs: 1,
        seed: 11,
        ..Faults::default()
    });
    let mut sync = Synchronizer::new(
        Box::new(source.clone()),
        Box::new(t.clone()),
        Box::new(MemoryStore::new()),
        rules(),
        EngineConfig {
            concurrency: 16,
            retry: RetryPolicy {
                max_attempts: 8,
                base_delay: Duration::from_millis(50),
                max_delay: Duration::from_secs(2),
            },
            ..EngineConfig::default()
        },
    );
    let report = sync.run_cycle().await.unwrap();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    // A fifth of the requests is a random draw per request (their order depends on timing):
    // demand a substantial share, not an exact count.
    let stats = emu.stats();
    assert!(stats.throttled_injected * 20 >= stats.requests, "{stats:?}");
    let users = emu.users();
    assert_eq!(users.len(), n, "nothing lost, nothing duplicated");
    let groups = emu.groups();
    assert_eq!(groups.len(), 1);
    let gid = groups.keys().next().unwrap();
    assert_eq!(emu.members(gid).len(), n);
    let u = users
        .values()
        .find(|u| u["mailNickname"] == "user7")
        .unwrap();
    assert_eq!(u["userPrincipalName"], "user7@contoso.com");
    assert_eq!(
        u["onPremisesExtensionAttributes"]["extensionAttribute1"],
        "CC7-Eng"
    );
    assert_eq!(u["accountEnabled"], true);
    assert_eq!(u["businessPhones"], json!(["+1 425 555 0100"]));

    // Nothing left to do; a reconcile against the target's delta read finds no drift.
    let again = sync.run_cycle().await.unwrap();
    assert_eq!(
        again.count("create") + again.count("update"),
        0,
        "{again:?}"
    );
    emu.set_faults(Faults::default());
    let rec = sync.reconcile().await.unwrap();
    assert_eq!(rec.count("create") + rec.count("update"), 0, "{rec:?}");

    // A user leaves scope (moved to the service accounts): disabled, not deleted; a user
    // deleted in AD: deleted (the example rules follow Entra provisioning).
    source
        .upsert(ad_user(3).with("department", "Service Accounts"))
        .unwrap();
    source.delete(&"u4".into()).unwrap();
    let r = sync.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!((r.count("disable"), r.count("delete")), (1, 1), "{r}");
    let users = emu.users();
    let u3 = users
        .values()
        .find(|u| u["mailNickname"] == "user3")
        .unwrap();
    assert_eq!(u3["accountEnabled"], false);
    assert!(!users.values().any(|u| u["mailNickname"] == "user4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ad_ldif_to_entra_end_to_end() {
    let emu = GraphEmulator::start().await.unwrap();
    let t = GraphTarget::new("entra", emu.config("app-1", "s3cret")).unwrap();
    let ldif = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/corp.ldif");
    let source_config: dirsync::connector::ldif::LdifSourceConfig = toml::from_str(
        "anchor_attribute = \"objectGUID\"\nunmapped = \"skip\"\nbinary_attributes = [\"objectSid\"]\n",
    )
    .unwrap();
    let mut sync = Synchronizer::new(
        Box::new(LdifSource::new(ldif, source_config)),
        Box::new(t),
        Box::new(MemoryStore::new()),
        rules(),
        EngineConfig::default(),
    );
    let before = emu.stats().writes;
    let report = sync.run_cycle().await.unwrap();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let users = emu.users();
    assert!(users.len() >= 20, "{}", users.len());
    // One write per object: every group's members (at most 20 here) are in its create.
    let groups = emu.groups();
    assert_eq!(
        (emu.stats().writes - before, report.count("references")),
        ((users.len() + groups.len()) as u64, 0),
        "{report}"
    );
    // Every group holds the members the source names.
    let views = sync.with_store(|s| s.load_all()).unwrap();
    let mut checked = 0;
    for link in views.links.iter().filter(|l| l.target_type.is("group")) {
        let expected = common::linked_references(&views, &link.anchor, "member");
        let held: Vec<String> = emu.members(link.target_id.as_str()).into_iter().collect();
        assert_eq!(held, expected);
        checked += usize::from(!expected.is_empty());
    }
    assert!(checked >= 6, "{checked}");
    let ada = users
        .values()
        .find(|u| u["userPrincipalName"] == "alovelace@contoso.com")
        .unwrap();
    assert_eq!(
        ada["onPremisesImmutableId"],
        "3beada78-33b2-56dc-9572-e75f55bf426b"
    );
    assert_eq!(ada["jobTitle"], "Engineering Director");
    assert_eq!(ada["employeeId"], "E10026");
    let eng = emu
        .groups()
        .into_iter()
        .find(|(_, g)| g["mailNickname"] == "Engineering")
        .unwrap();
    assert!(emu.members(&eng.0).len() >= 7);
    let again = sync.run_cycle().await.unwrap();
    assert_eq!(again.count("create") + again.count("update"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_example_provisions_entra_from_the_example_config() {
    let emu = GraphEmulator::start().await.unwrap();
    emu.register_secret("00000000-0000-0000-0000-000000000000", "replace-me");
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/examples/config/ad-to-entra.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = text
        .replace("https://login.microsoftonline.com", &emu.authority())
        .replace("https://graph.microsoft.com/v1.0", &emu.graph_url())
        .replace("\"../rules/", &format!("\"{root}/examples/rules/"))
        .replace("\"../data/", &format!("\"{root}/examples/data/"))
        .replace(
            "\"../../target/sync-example/entra-state.sqlite\"",
            &format!("{:?}", dir.path().join("state.sqlite")),
        );
    let cfg = dir.path().join("ad-to-entra.toml");
    std::fs::write(&cfg, text).unwrap();
    let exe = tokio::task::spawn_blocking(build_sync).await.unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(exe)
            .arg("--config")
            .arg(&cfg)
            .arg("run")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "sync run failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(emu.users().len() >= 20);
    assert!(emu
        .users()
        .values()
        .any(|u| u["userPrincipalName"] == "alovelace@contoso.com"));
    assert!(!emu.groups().is_empty());
}

/// The example rules, groups joined by display name (which Entra does not keep unique).
fn rules_joining_groups_by_display_name() -> Arc<RuleSet> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/rules/ad-to-entra.toml"
    );
    let text = std::fs::read_to_string(path).unwrap().replace(
        r#"join = [["mailNickname"]]"#,
        r#"join = [["displayName"]]"#,
    );
    assert!(text.contains(r#"join = [["displayName"]]"#));
    Arc::new(RuleSet::from_toml(&text, Some(path)).unwrap())
}

fn ad_group(name: &str, members: std::ops::Range<usize>) -> Entry {
    let mut g = Entry::new(format!("g-{name}"), "group")
        .with("sAMAccountName", name)
        .with("cn", name);
    for i in members {
        g = g.with("member", Value::anchor_ref(format!("u{i}")));
    }
    g
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_state_joins_every_user_and_group_entra_already_holds() {
    let (emu, t) = setup().await;
    // Another tool provisioned 40 users (no onPremisesImmutableId) and two security groups
    // with their members, under other mail nicknames.
    let mut ids = Vec::new();
    for i in 0..40 {
        let a = attrs(&[
            (
                "userPrincipalName",
                Value::string(format!("user{i}@contoso.com")),
            ),
            ("displayName", Value::string(format!("Test User{i}"))),
            ("mailNickname", Value::string(format!("user{i}"))),
            ("givenName", Value::string("Test")),
            ("surname", Value::string(format!("User{i}"))),
            ("accountEnabled", Value::Boolean(true)),
        ]);
        ids.push(apply1(&t, create("user", a)).await.unwrap());
    }
    for (name, members) in [("Staff", 0..30), ("Sales", 30..40)] {
        let mut a = attrs(&[
            ("displayName", Value::string(name)),
            ("mailNickname", Value::string(format!("legacy-{name}"))),
            ("securityEnabled", Value::Boolean(true)),
            ("mailEnabled", Value::Boolean(false)),
        ]);
        a.set(
            "members",
            members
                .map(|m| Value::target_ref(ids[m].clone()))
                .collect::<Values>(),
        );
        apply1(&t, create("group", a)).await.unwrap();
    }
    let source = MemorySource::new("ad");
    for i in 0..40 {
        source.add(ad_user(i)).unwrap();
    }
    source.add(ad_group("Staff", 0..30)).unwrap();
    source.add(ad_group("Sales", 30..40)).unwrap();
    let engine = |source: &MemorySource| {
        Synchronizer::new(
            Box::new(source.clone()),
            Box::new(GraphTarget::new("entra", emu.config("app-1", "s3cret")).unwrap()),
            Box::new(MemoryStore::new()),
            rules_joining_groups_by_display_name(),
            EngineConfig::default(),
        )
    };
    let before = emu.stats();
    let mut sync = engine(&source);
    let r = sync.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{r}");
    assert_eq!((r.count("create"), r.count("join")), (0, 42), "{r}");
    let after = emu.stats();
    let (requests, writes, lookups) = (
        after.requests - before.requests,
        after.writes - before.writes,
        after.filtered_reads - before.filtered_reads,
    );
    // Lookups: users by onPremisesImmutableId (round 0, none set: 40 values, 15 per `in` →
    // 3 requests), then by userPrincipalName (3 more); groups by displayName (1). Each group
    // found is read with its members (2). Writes: one PATCH per joined object (the flows the
    // other tool did not set: onPremisesImmutableId, employeeId, …; the groups' nickname).
    assert_eq!(lookups, 3 + 3 + 1, "{after:?}");
    assert_eq!(writes, 42, "{after:?}");
    assert_eq!(requests, lookups + 2 + writes, "{after:?}");
    eprintln!(
        "fresh state, 40 users + 2 groups all present: {requests} Graph requests ({lookups} lookups, {writes} writes)"
    );
    assert_eq!(emu.users().len(), 40, "no duplicate user");
    let groups = emu.groups();
    assert_eq!(groups.len(), 2, "no duplicate group");
    let staff = groups
        .iter()
        .find(|(_, g)| g["displayName"] == "Staff")
        .unwrap();
    assert_eq!(staff.1["mailNickname"], "Staff");
    assert_eq!(emu.members(staff.0).len(), 30);
    let u7 = emu
        .users()
        .into_values()
        .find(|u| u["mailNickname"] == "user7")
        .unwrap();
    assert_eq!(
        u7["onPremisesImmutableId"],
        "00000000-0000-4000-8000-000000000007"
    );
    // The next run writes nothing.
    let before = emu.stats();
    let r = sync.run_cycle().await.unwrap();
    assert_eq!(r.total_done(), 0, "{r}");
    assert_eq!(emu.stats().writes, before.writes);

    // The state is lost again, and the source gained 5 users and a group Entra does not hold:
    // only those are created.
    for i in 40..45 {
        source.add(ad_user(i)).unwrap();
    }
    source.add(ad_group("Ops", 38..45)).unwrap();
    let before = emu.stats();
    let mut sync = engine(&source);
    let r = sync.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{r}");
    assert_eq!((r.count("create"), r.count("join")), (6, 42), "{r}");
    let after = emu.stats();
    // Round 0 finds the 40 users by onPremisesImmutableId (45 values → 3 requests) and the
    // two groups (3 values → 1); round 1 looks up the 5 new users by userPrincipalName (1).
    assert_eq!(
        after.filtered_reads - before.filtered_reads,
        3 + 1 + 1,
        "{after:?}"
    );
    assert_eq!(emu.users().len(), 45);
    assert_eq!(emu.groups().len(), 3);
    assert_eq!(sync.run_cycle().await.unwrap().total_done(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_refuses_more_than_15_clauses_and_the_target_batches_within_them() {
    let (emu, t) = setup().await;
    for i in 0..20 {
        apply1(&t, create("user", user(i))).await.unwrap();
    }
    let ty = ObjectType::new("user");
    let upns: Vec<Value> = (0..20)
        .map(|i| Value::string(format!("USER{i}@contoso.com")))
        .collect();
    // 20 values in one call: the target splits them into `in` filters of 15 and 5.
    let before = emu.stats().filtered_reads;
    let found = t
        .find_any(&ty, &AttrName::new("userPrincipalName"), &upns)
        .await
        .unwrap();
    assert_eq!(found.len(), 20);
    assert_eq!(emu.stats().filtered_reads - before, 2);
    // Directory extension properties are or'ed `eq`s, the same limit.
    let costs: Vec<Value> = (0..20)
        .map(|i| Value::string(format!("cost'{i}")))
        .collect();
    let found = t.find_any(&ty, &AttrName::new(EXT), &costs).await.unwrap();
    assert_eq!(found.len(), 20);
    // Advanced queries (onPremisesExtensionAttributes) are bounded by the URL's length
    // instead: 20 short values fit one request.
    let before = emu.stats().filtered_reads;
    let cc: Vec<Value> = (0..20).map(|i| Value::string(format!("CC{i}"))).collect();
    let found = t
        .find_any(
            &ty,
            &AttrName::new("onPremisesExtensionAttributes.extensionAttribute1"),
            &cc,
        )
        .await
        .unwrap();
    assert_eq!(found.len(), 20);
    assert_eq!(emu.stats().filtered_reads - before, 1);
    // Long values do not fit one URL: the target splits them, and the emulator (which refuses
    // a URL over 2,048 characters) accepts every part.
    let before = emu.stats().filtered_reads;
    let long: Vec<Value> = (0..12)
        .map(|i| Value::string(format!("{i}-{}", "y".repeat(200))))
        .collect();
    let found = t
        .find_any(
            &ty,
            &AttrName::new("onPremisesExtensionAttributes.extensionAttribute1"),
            &long,
        )
        .await
        .unwrap();
    assert!(found.is_empty());
    let requests = emu.stats().filtered_reads - before;
    assert!((2..12).contains(&requests), "{requests} requests");
    // The emulator refuses what Graph refuses: 16 clauses without the advanced query
    // parameters, and an advanced query whose URL is over 2,048 characters.
    let token = emu_token(&emu).await;
    let base = emu.config("app-1", "s3cret").graph_url;
    let list: Vec<String> = (0..16).map(|i| format!("'user{i}@contoso.com'")).collect();
    let (status, body) = get(
        &format!(
            "{base}/users?$filter={}",
            enc(&format!("userPrincipalName in ({})", list.join(",")))
        ),
        &token,
        false,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("Too many child clauses") && body.contains("Max allowed: 15"),
        "{body}"
    );
    let ors: Vec<String> = (0..16)
        .map(|i| format!("employeeId eq 'E{i:05}'"))
        .collect();
    let (status, _) = get(
        &format!("{base}/users?$filter={}", enc(&ors.join(" or "))),
        &token,
        false,
    )
    .await;
    assert_eq!(status, 400);
    let (status, body) = get(
        &format!(
            "{base}/users?$filter={}",
            enc(&format!("userPrincipalName in ({})", list[..15].join(",")))
        ),
        &token,
        false,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let long: Vec<String> = (0..120)
        .map(|i| format!("'CC{i}-{}'", "x".repeat(10)))
        .collect();
    let (status, body) = get(
        &format!(
            "{base}/users?$count=true&$filter={}",
            enc(&format!(
                "onPremisesExtensionAttributes/extensionAttribute1 in ({})",
                long.join(",")
            ))
        ),
        &token,
        true,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("2048"), "{body}");
}

/// A token for raw requests to the emulator.
async fn emu_token(emu: &GraphEmulator) -> String {
    let cfg = emu.config("app-1", "s3cret");
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/{}/oauth2/v2.0/token",
            cfg.authority, cfg.tenant
        ))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "app-1"),
            ("client_secret", "s3cret"),
            ("scope", "https://graph.microsoft.com/.default"),
        ])
        .send()
        .await
        .unwrap();
    let j: serde_json::Value = resp.json().await.unwrap();
    j["access_token"].as_str().unwrap().to_string()
}

async fn get(url: &str, token: &str, eventual: bool) -> (u16, String) {
    let mut r = reqwest::Client::new().get(url).bearer_auth(token);
    if eventual {
        r = r.header("ConsistencyLevel", "eventual");
    }
    let resp = r.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn post_batch(
    emu: &GraphEmulator,
    token: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/$batch", emu.graph_url()))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

fn new_user(n: usize) -> serde_json::Value {
    json!({
        "accountEnabled": true,
        "displayName": format!("Batch {n}"),
        "mailNickname": format!("batch{n}"),
        "userPrincipalName": format!("batch{n}@contoso.com"),
        "passwordProfile": {"password": "Xy9!long-enough-pass", "forceChangePasswordNextSignIn": true},
    })
}

fn post_user(id: &str, n: usize) -> serde_json::Value {
    json!({"id": id, "method": "POST", "url": "/users", "body": new_user(n),
        "headers": {"Content-Type": "application/json"}})
}

/// The status of each response of a `$batch` answer, by request id.
fn statuses(answer: &serde_json::Value) -> std::collections::BTreeMap<String, u64> {
    answer["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["status"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The emulator's `$batch` refuses what Microsoft documents Graph refuses ("Combine multiple
/// HTTP requests using JSON batching" and its known issues), whatever our client sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_batch_follows_graphs_documented_rules() {
    let emu = GraphEmulator::start().await.unwrap();
    let token = emu_token(&emu).await;
    let get_me = |id: &str| json!({"id": id, "method": "GET", "url": "/users?$top=1"});
    // Malformed batches are refused whole, with 400, and run nothing.
    let too_many: Vec<_> = (0..21).map(|n| get_me(&n.to_string())).collect();
    let refused = [
        ("21 requests", json!({ "requests": too_many })),
        ("no requests", json!({ "requests": [] })),
        ("not an array", json!({ "requests": {"id": "1"} })),
        (
            "ids not unique ignoring case",
            json!({"requests": [
            post_user("a", 1), {"id": "A", "method": "GET", "url": "/users"}]}),
        ),
        (
            "no id",
            json!({"requests": [{"method": "GET", "url": "/users"}]}),
        ),
        (
            "no method",
            json!({"requests": [{"id": "1", "url": "/users"}]}),
        ),
        (
            "no url",
            json!({"requests": [{"id": "1", "method": "GET"}]}),
        ),
        (
            "absolute url",
            json!({"requests": [
            {"id": "1", "method": "GET", "url": format!("{}/users", emu.graph_url())}]}),
        ),
        (
            "body without Content-Type",
            json!({"requests": [
            {"id": "1", "method": "POST", "url": "/users", "body": new_user(1)}]}),
        ),
        (
            "nested batch",
            json!({"requests": [
            {"id": "1", "method": "POST", "url": "/$batch", "body": {"requests": []},
             "headers": {"Content-Type": "application/json"}}]}),
        ),
        (
            "dependsOn an unknown id",
            json!({"requests": [
            post_user("1", 1), {"id": "2", "dependsOn": ["9"], "method": "GET", "url": "/users"}]}),
        ),
        (
            "dependsOn itself",
            json!({"requests": [
            {"id": "1", "dependsOn": ["1"], "method": "GET", "url": "/users"}]}),
        ),
        (
            "dependsOn two requests",
            json!({"requests": [
            get_me("1"), get_me("2"),
            {"id": "3", "dependsOn": ["1", "2"], "method": "GET", "url": "/users"}]}),
        ),
        // 2 → 1 and 4 → 2, 3 on its own: neither parallel, nor serial, nor the same
        // dependency (the known issue "Request dependencies are limited").
        (
            "mixed dependencies",
            json!({"requests": [
            get_me("1"),
            {"id": "2", "dependsOn": ["1"], "method": "GET", "url": "/users"},
            get_me("3"),
            {"id": "4", "dependsOn": ["2"], "method": "GET", "url": "/users"}]}),
        ),
    ];
    for (what, body) in refused {
        let (status, answer) = post_batch(&emu, &token, body).await;
        assert_eq!(status, 400, "{what}: {answer}");
        assert_eq!(answer["error"]["code"], "BadRequest", "{what}: {answer}");
    }
    assert!(emu.users().is_empty(), "a refused batch runs nothing");

    // Parallel: each request answered on its own (a 400 beside a 201), correlated by id —
    // the emulator answers in an order of its own, not the batch's.
    let (status, answer) = post_batch(
        &emu,
        &token,
        json!({"requests": [post_user("u1", 1), post_user("u2", 2), post_user("dup", 1)]}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let ids: Vec<&str> = answer["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_ne!(
        ids,
        ["u1", "u2", "dup"],
        "responses need not follow the requests' order"
    );
    let st = statuses(&answer);
    assert_eq!(st["u2"], 201);
    // Run in reverse: "dup" made batch1 first, so "u1" (the same userPrincipalName) failed.
    assert_eq!((st["dup"], st["u1"]), (201, 400), "{answer}");

    // Serial: a failure fails everything after it with 424, and those do not run.
    let (status, answer) = post_batch(
        &emu,
        &token,
        json!({"requests": [
            post_user("1", 3),
            {"id": "2", "dependsOn": ["1"], "method": "POST", "url": "/users",
             "body": new_user(3), "headers": {"Content-Type": "application/json"}},
            {"id": "3", "dependsOn": ["2"], "method": "POST", "url": "/users",
             "body": new_user(4), "headers": {"Content-Type": "application/json"}},
        ]}),
    )
    .await;
    assert_eq!(status, 200);
    let st = statuses(&answer);
    assert_eq!((st["1"], st["2"], st["3"]), (201, 400, 424), "{answer}");
    assert!(!emu
        .users()
        .values()
        .any(|u| u["userPrincipalName"] == "batch4@contoso.com"));
    // The same dependency: the dependents run after it, in order.
    let (status, answer) = post_batch(
        &emu,
        &token,
        json!({"requests": [
            post_user("x", 5),
            {"id": "y", "dependsOn": ["x"], "method": "GET", "url": "/users?$top=1"},
            {"id": "z", "dependsOn": ["x"], "method": "GET", "url": "/users?$top=1"},
            get_me("w"),
        ]}),
    )
    .await;
    assert_eq!(status, 200);
    let st = statuses(&answer);
    assert_eq!((st["x"], st["y"], st["z"], st["w"]), (201, 200, 200, 200));
    let stats = emu.stats();
    assert_eq!(stats.batches, 17);
    assert_eq!(stats.http_requests, 17, "a batch is one HTTP request");
}

/// Operations of one apply call share `$batch` envelopes: 60 user creates, 20 updates and 20
/// deletes, and 5 groups' membership changes cost a handful of round trips, not one (or
/// more) per operation; operations on the same object keep their order; a throttled request
/// inside a batch is sent again after its `Retry-After`, alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_of_one_apply_share_batch_envelopes() {
    let (emu, t) = setup().await;
    assert_eq!(t.capabilities().max_batch, 20);
    // Users without restore keys: one request each, 20 to an envelope.
    let plain = |n: usize| {
        attrs(&[
            (
                "userPrincipalName",
                Value::string(format!("p{n}@contoso.com")),
            ),
            ("displayName", Value::string(format!("P {n}"))),
            ("mailNickname", Value::string(format!("p{n}"))),
        ])
    };
    let before = (emu.stats(), t.stats());
    let ops: Vec<_> = (0..60).map(|n| create("user", plain(n))).collect();
    let ids = created(&t, &ops).await;
    let (emu_after, t_after) = (emu.stats(), t.stats());
    assert_eq!(emu.users().len(), 60);
    assert_eq!(emu_after.requests - before.0.requests, 60);
    assert_eq!(emu_after.batches - before.0.batches, 3, "{emu_after:?}");
    assert_eq!(emu_after.http_requests - before.0.http_requests, 3);
    assert_eq!(t_after.http_requests - before.1.http_requests, 3);
    // Each id is the one of its operation's user.
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(
            emu.users()[id]["userPrincipalName"],
            format!("p{n}@contoso.com")
        );
    }
    // Join lookups: 60 values are 4 `$filter … in (…)` queries of 15, in one envelope.
    assert_eq!(t.capabilities().lookup_batch, 300);
    let before = emu.stats();
    let values: Vec<Value> = (0..60)
        .map(|n| Value::string(format!("P{n}@contoso.com")))
        .collect();
    let found = t
        .find_any(&"user".into(), &AttrName::new("userPrincipalName"), &values)
        .await
        .unwrap();
    assert_eq!(found.len(), 60);
    let after = emu.stats();
    assert_eq!(after.filtered_reads - before.filtered_reads, 4);
    assert_eq!(after.http_requests - before.http_requests, 1);
    // With restore keys, a create first looks for a deleted user to restore: two rounds.
    let before = emu.stats();
    let ops: Vec<_> = (0..20).map(|n| create("user", user(n))).collect();
    assert!(t.apply(&ops).await.iter().all(Result::is_ok));
    assert_eq!(emu.stats().http_requests - before.http_requests, 2);

    // Updates of 20 users and deletes of 20 others, and the same user updated then deleted
    // in one call (in that order, or the update would find nothing).
    let mut ops = Vec::new();
    for id in &ids[..20] {
        ops.push(TargetOperation::Update {
            id: id.as_str().into(),
            object_type: "user".into(),
            changes: vec![AttributeChange::replace(
                "jobTitle",
                Values::one("Engineer"),
            )],
        });
    }
    for id in &ids[20..39] {
        ops.push(TargetOperation::Delete {
            id: id.as_str().into(),
            object_type: "user".into(),
        });
    }
    ops.push(TargetOperation::Update {
        id: ids[39].as_str().into(),
        object_type: "user".into(),
        changes: vec![AttributeChange::replace("jobTitle", Values::one("Leaving"))],
    });
    ops.push(TargetOperation::Delete {
        id: ids[39].as_str().into(),
        object_type: "user".into(),
    });
    let before = emu.stats();
    let out = t.apply(&ops).await;
    assert!(out.iter().all(Result::is_ok), "{out:?}");
    let after = emu.stats();
    assert_eq!(after.requests - before.requests, 41);
    // 40 operations on distinct objects in 2 envelopes, then the delete that waited for its
    // update, alone.
    assert_eq!(after.http_requests - before.http_requests, 3, "{after:?}");
    assert_eq!(emu.users().len(), 60 + 20 - 20);
    assert!(ids[..20]
        .iter()
        .all(|id| emu.users()[id]["jobTitle"] == "Engineer"));
    assert_eq!(emu.deleted_users()[&ids[39]]["jobTitle"], "Leaving");

    // Five groups, created with 30 members each (20 in the create, 10 added after it), in one
    // call: 5 creates in one envelope, then their 5 member adds in another.
    let ops: Vec<_> = (0..5)
        .map(|g| {
            let mut a = attrs(&[
                ("displayName", Value::string(format!("G{g}"))),
                ("mailNickname", Value::string(format!("g{g}"))),
            ]);
            a.set(
                "members",
                ids[40..60]
                    .iter()
                    .chain(&ids[..10])
                    .map(|i| Value::target_ref(i.as_str()))
                    .collect::<Values>(),
            );
            create("group", a)
        })
        .collect();
    let before = emu.stats();
    let gids = created(&t, &ops).await;
    assert_eq!(emu.stats().http_requests - before.http_requests, 2);
    assert!(gids.iter().all(|g| emu.members(g).len() == 30));

    // A fifth of the requests throttled: those are sent again, and everything lands once.
    emu.set_faults(Faults {
        throttle_share: 0.2,
        retry_after_secs: 0,
        seed: 11,
        ..Faults::default()
    });
    let ops: Vec<_> = (100..140).map(|n| create("user", plain(n))).collect();
    let out = t.apply(&ops).await;
    assert!(out.iter().all(Result::is_ok), "{out:?}");
    let s = emu.stats();
    assert!(s.throttled_injected > 0, "{s:?}");
    assert_eq!(emu.users().len(), 60 + 40);
    let mut upns: Vec<String> = emu
        .users()
        .values()
        .map(|u| u["userPrincipalName"].as_str().unwrap().to_string())
        .collect();
    upns.sort();
    upns.dedup();
    assert_eq!(upns.len(), 100, "no duplicate");
}

/// Through the engine: an initial load of 120 users and 6 groups of 20 members costs about a
/// twentieth of its requests in HTTP round trips — the engine hands the target batches of up
/// to 20 operations (`max_batch`), and their requests travel in shared `$batch` envelopes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_load_through_the_engine_is_batched() {
    let emu = GraphEmulator::start().await.unwrap();
    let t = GraphTarget::new("entra", emu.config("app-1", "s3cret")).unwrap();
    let source = MemorySource::new("ad");
    let n = 120;
    for i in 0..n {
        source.add(ad_user(i)).unwrap();
    }
    for g in 0..6 {
        let mut group = Entry::new(format!("g{g}"), "group")
            .with("sAMAccountName", format!("Team{g}"))
            .with("cn", format!("Team {g}"));
        for i in g * 20..g * 20 + 20 {
            group = group.with("member", Value::anchor_ref(format!("u{i}")));
        }
        source.add(group).unwrap();
    }
    let mut sync = Synchronizer::new(
        Box::new(source.clone()),
        Box::new(t.clone()),
        Box::new(MemoryStore::new()),
        rules(),
        EngineConfig::default(),
    );
    let before = emu.stats();
    let r = sync.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{r}");
    assert_eq!(r.count("create"), 126, "{r}");
    let s = emu.stats();
    assert_eq!(emu.users().len(), n);
    assert!(emu.groups().keys().all(|g| emu.members(g).len() == 20));
    // Join lookups before the creates (15 values to a query, 20 queries to a `$batch`), a
    // restore lookup and a POST per user, a POST per group: all in envelopes.
    let lookups = s.filtered_reads - before.filtered_reads;
    let requests = s.requests - before.requests;
    let round_trips = s.http_requests - before.http_requests;
    eprintln!(
        "initial load, {n} users + 6 groups: {requests} Graph requests ({lookups} join \
         lookups) in {round_trips} round trips ({} $batch)",
        s.batches - before.batches
    );
    assert_eq!(requests - lookups, 2 * 120 + 6, "{s:?}");
    assert!(
        round_trips * 10 <= requests,
        "{round_trips} round trips for {requests} requests"
    );
}
