//! The SCIM target against a real SCIM 2.0 server — `scim2-server` from PyPI, started per test
//! on a free port (path in `DIRSYNC_SCIM2_SERVER`; `scripts/test.sh` installs it) — and, for
//! what that server cannot do (429 with `Retry-After`, a 500 mid-run, malformed answers), a tiny
//! in-process HTTP/1.1 server written below.
//!
//! Real server: create, join by externalId and by userName, PATCH update, disable, delete,
//! groups with hundreds of members and membership add/remove, paging, 409 → join, bulk, ETag
//! 412, LDIF → SCIM through the `sync` example, a fresh state joining every user and group the
//! service holds (requests counted by a proxy), referrers losing a deleted object in the same
//! run and following a re-created one. In-process server: 429, 500, malformed JSON,
//! 401.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{build_sync, free_port};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dirsync::connector::memory::MemorySource;
use dirsync::connector::scim::{ScimAuth, ScimConfig, ScimTarget, Secret};
use dirsync::connector::{ErrorKind, Target, TargetOperation};
use dirsync::engine::{EngineConfig, RetryPolicy, Synchronizer};
use dirsync::model::{
    AttrName, AttributeChange, Attributes, Entry, ObjectType, TargetId, Value, Values,
};
use dirsync::rules::ruleset::RuleSet;
use dirsync::state::MemoryStore;
use futures::StreamExt;
use serde_json::{json, Value as Json};

const TOKEN: &str = "test-token-123";

/// A running scim2-server (see `common::scim2_server`).
type Server = common::Scim2Server;

fn server() -> Option<Server> {
    common::scim2_server(TOKEN)
}

fn target(base: &str) -> ScimTarget {
    ScimTarget::new(ScimConfig {
        base_url: base.to_string(),
        auth: ScimAuth::Bearer {
            token: Secret::new(TOKEN),
        },
        page_size: 7,
        member_chunk: 50,
        ..ScimConfig::default()
    })
    .unwrap()
}

/// Raw requests to the server, to set up and check behind the connector's back.
async fn raw(method: &str, url: &str, body: Option<Json>) -> (u16, Json) {
    let c = reqwest::Client::new();
    let mut r = c
        .request(method.parse().unwrap(), url)
        .bearer_auth(TOKEN)
        .header("Content-Type", "application/scim+json");
    if let Some(b) = body {
        r = r.body(b.to_string());
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Json::Null))
}

async fn users(base: &str) -> Vec<Json> {
    let (_, j) = raw("GET", &format!("{base}/Users?count=1000"), None).await;
    j["Resources"].as_array().cloned().unwrap_or_default()
}

const RULES: &str = r#"
[[rule]]
name = "users"
source_type = "user"
target_type = "User"
join = [["externalId"], ["userName"]]
deprovision = { action = "disable", set = { active = false } }

[[rule.flow]]
target = "externalId"
expression = '[id]'

[[rule.flow]]
target = "userName"
expression = 'ToLower([upn])'
ignore_case = true

[[rule.flow]]
target = "name.givenName"
expression = '[givenName]'

[[rule.flow]]
target = 'emails[type eq "work"].value'
expression = '[mail]'

[[rule.flow]]
target = "active"
expression = 'True'

[[rule.flow]]
target = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber"
expression = '[employeeID]'

[[rule]]
name = "groups"
source_type = "group"
target_type = "Group"
join = [["externalId"], ["displayName"]]
deprovision = { action = "delete" }

[[rule.flow]]
target = "externalId"
expression = '[id]'

[[rule.flow]]
target = "displayName"
expression = '[cn]'

[[rule.flow]]
target = "members"
expression = '[member]'
reference = true
"#;

fn user(i: usize) -> Entry {
    Entry::new(format!("u{i}"), "user")
        .with("id", format!("u{i}"))
        .with("upn", format!("User{i}@corp.test"))
        .with("givenName", format!("Given{i}"))
        .with("mail", format!("user{i}@corp.test"))
        .with("employeeID", format!("E{i}"))
}

fn sync(source: &MemorySource, target: ScimTarget) -> Synchronizer {
    let rules = RuleSet::from_toml(RULES, None).unwrap();
    let config = EngineConfig {
        concurrency: 4,
        retry: RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_secs(5),
        },
        ..EngineConfig::default()
    };
    Synchronizer::new(
        Box::new(source.clone()),
        Box::new(target),
        Box::new(MemoryStore::new()),
        Arc::new(rules),
        config,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_users_lifecycle_through_the_engine() {
    let Some(srv) = server() else { return };
    let base = srv.base.clone();
    // Two users already there: one with u1's externalId, one with u2's userName (other case).
    let (s, _) = raw("POST", &format!("{base}/Users"), Some(json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "someone-else", "externalId": "u1"}))).await;
    assert_eq!(s, 201);
    let (s, pre2) = raw("POST", &format!("{base}/Users"), Some(json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "USER2@corp.test"}))).await;
    assert_eq!(s, 201);
    let source = MemorySource::new("hr");
    for i in 0..20 {
        source.add(user(i)).unwrap();
    }
    let mut s = sync(&source, target(&base));
    // Import, then reconcile: the target is read (pages of 7), the two existing users join.
    s.full_import().await.unwrap();
    let r = s.reconcile().await.unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(r.reconciled, 2, "{r}");
    assert_eq!(r.count("join"), 2, "{r}");
    assert_eq!(r.count("create"), 18, "{r}");
    let all = users(&base).await;
    assert_eq!(all.len(), 20);
    let u2 = all.iter().find(|u| u["id"] == pre2["id"]).unwrap();
    assert_eq!(u2["externalId"], "u2");
    let u5 = all.iter().find(|u| u["externalId"] == "u5").unwrap();
    assert_eq!(u5["userName"], "user5@corp.test");
    assert_eq!(u5["name"]["givenName"], "Given5");
    assert_eq!(
        u5["emails"],
        json!([{"type": "work", "value": "user5@corp.test"}])
    );
    assert_eq!(
        u5["urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"]["employeeNumber"],
        "E5"
    );
    assert_eq!(u5["active"], true);

    // Update by PATCH.
    source
        .upsert(
            user(5)
                .with_values("givenName", Values::one("Renamed"))
                .with_values("mail", Values::one("new5@corp.test")),
        )
        .unwrap();
    let r = s.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(r.count("update"), 1, "{r}");
    let (_, u5) = raw(
        "GET",
        &format!("{base}/Users/{}", u5["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(u5["name"]["givenName"], "Renamed");
    assert_eq!(u5["emails"][0]["value"], "new5@corp.test");

    // Disable (the rule deprovisions by active = false).
    source.delete(&"u6".into()).unwrap();
    let r = s.run_cycle().await.unwrap();
    assert_eq!(r.count("disable"), 1, "{r}");
    let u6 = users(&base)
        .await
        .into_iter()
        .find(|u| u["externalId"] == "u6")
        .unwrap();
    assert_eq!(u6["active"], false);

    // Reconcile reads every page (page_size 7, 20 users) and finds nothing to do.
    let r = s.reconcile().await.unwrap();
    assert_eq!(r.reconciled, 20, "{r}");
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(r.count("update") + r.count("create"), 0, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_duplicate_user_name_is_joined() {
    let Some(srv) = server() else { return };
    let t = target(&srv.base);
    let mut a = Attributes::new();
    a.set("userName", Values::one("ada@corp.test"));
    let op = TargetOperation::Create {
        object_type: "User".into(),
        attributes: a.clone(),
    };
    let first = t
        .apply(std::slice::from_ref(&op))
        .await
        .pop()
        .unwrap()
        .unwrap();
    let e = t
        .apply(std::slice::from_ref(&op))
        .await
        .pop()
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    assert!(e.message().contains("uniqueness"), "{e}");
    // Through the engine: the create meets the 409 and joins by userName.
    let source = MemorySource::new("hr");
    source
        .add(
            Entry::new("x", "user")
                .with("id", "x")
                .with("upn", "ADA@corp.test")
                .with("givenName", "Ada")
                .with("mail", "a@x")
                .with("employeeID", "1"),
        )
        .unwrap();
    // The engine's target mirror is empty, so it plans a create; the server answers 409
    // uniqueness and the engine joins the existing user found by `userName eq` instead.
    let found = t
        .find(
            &"User".into(),
            &AttrName::new("userName"),
            &Value::string("ADA@corp.test"),
        )
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, first.id);
    let mut s = sync(&source, target(&srv.base));
    let r = s.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(users(&srv.base).await.len(), 1);
    // Filter values are escaped: a quote in the value finds nothing and breaks nothing.
    let none = t
        .find(
            &"User".into(),
            &AttrName::new("userName"),
            &Value::string("a\" or userName pr or \""),
        )
        .await
        .unwrap();
    assert!(none.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_groups_members_delete_bulk_and_etags() {
    let Some(srv) = server() else { return };
    let t = target(&srv.base);
    // 300 users in one apply call: /Bulk (maxOperations 1000).
    let ops: Vec<TargetOperation> = (0..300)
        .map(|i| {
            let mut a = Attributes::new();
            a.set("userName", Values::one(format!("m{i}")));
            TargetOperation::Create {
                object_type: "User".into(),
                attributes: a,
            }
        })
        .collect();
    assert!(t.capabilities().max_batch >= 1);
    let ids: Vec<TargetId> = t
        .apply(&ops)
        .await
        .into_iter()
        .map(|r| r.unwrap().id)
        .collect();
    assert_eq!(ids.len(), 300);
    assert_eq!(users(&srv.base).await.len(), 300);
    assert!(t.capabilities().max_batch > 1, "bulk announced");
    // A group with 250 members.
    let mut g = Attributes::new();
    g.set("displayName", Values::one("Engineering"));
    g.set(
        "members",
        ids[..250]
            .iter()
            .map(|i| Value::target_ref(i.clone()))
            .collect::<Values>(),
    );
    let gid = t
        .apply(&[TargetOperation::Create {
            object_type: "Group".into(),
            attributes: g,
        }])
        .await
        .pop()
        .unwrap()
        .unwrap()
        .id;
    // Add 50, remove 120: chunks of at most 50 values per PATCH.
    let add: Values = ids[250..]
        .iter()
        .map(|i| Value::target_ref(i.clone()))
        .collect();
    let remove: Values = ids[..120]
        .iter()
        .map(|i| Value::target_ref(i.clone()))
        .collect();
    let up = TargetOperation::Update {
        id: gid.clone(),
        object_type: "Group".into(),
        changes: vec![
            AttributeChange::add("members", add),
            AttributeChange::remove("members", remove),
        ],
    };
    t.apply(&[up]).await.pop().unwrap().unwrap();
    let got = t.get(&"Group".into(), &gid).await.unwrap().unwrap();
    let members = got.attributes.get("members").unwrap();
    assert_eq!(members.len(), 180);
    assert!(members.contains(&Value::target_ref(ids[299].clone())));
    assert!(!members.contains(&Value::target_ref(ids[0].clone())));
    // Read: paging with members excluded from pages, read separately.
    let groups: Vec<_> = t.read(&"Group".into()).await.unwrap().collect().await;
    assert_eq!(groups.len(), 1);
    assert_eq!(
        groups[0]
            .as_ref()
            .unwrap()
            .attributes
            .get("members")
            .unwrap()
            .len(),
        180
    );
    let read: Vec<_> = t.read(&"User".into()).await.unwrap().collect().await;
    assert_eq!(read.len(), 300);
    // ETag: someone else changes the group; our stale version gets 412 → Conflict.
    let (s, _) = raw("PATCH", &format!("{}/Groups/{gid}", srv.base), Some(json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": [{"op": "replace", "path": "displayName", "value": "Eng"}]}))).await;
    assert_eq!(s, 204);
    let rename = TargetOperation::Update {
        id: gid.clone(),
        object_type: "Group".into(),
        changes: vec![AttributeChange::replace(
            "displayName",
            Values::one("Engineering 2"),
        )],
    };
    let e = t
        .apply(std::slice::from_ref(&rename))
        .await
        .pop()
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    // The connector re-read the object: the next attempt carries the new version.
    t.apply(std::slice::from_ref(&rename))
        .await
        .pop()
        .unwrap()
        .unwrap();
    // Delete, and a delete of something gone is NotFound.
    let del = TargetOperation::Delete {
        id: ids[0].clone(),
        object_type: "User".into(),
    };
    t.apply(std::slice::from_ref(&del))
        .await
        .pop()
        .unwrap()
        .unwrap();
    assert_eq!(
        t.apply(std::slice::from_ref(&del))
            .await
            .pop()
            .unwrap()
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    assert!(t.get(&"User".into(), &ids[0]).await.unwrap().is_none());
    // Wrong token: Auth.
    let bad = ScimTarget::new(ScimConfig {
        base_url: srv.base.clone(),
        auth: ScimAuth::Bearer {
            token: Secret::new("nope"),
        },
        ..ScimConfig::default()
    })
    .unwrap();
    let e = bad.get(&"User".into(), &ids[1]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_engine_creates_groups_with_hundreds_of_members() {
    let Some(srv) = server() else { return };
    let source = MemorySource::new("hr");
    for i in 0..220 {
        source.add(user(i)).unwrap();
    }
    let members = |r: std::ops::Range<usize>| {
        r.map(|i| Value::anchor_ref(format!("u{i}")))
            .collect::<Values>()
    };
    source
        .add(
            Entry::new("g1", "group")
                .with("id", "g1")
                .with("cn", "All")
                .with_values("member", members(0..200)),
        )
        .unwrap();
    let mut s = sync(&source, target(&srv.base));
    let r = s.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    // The members are created first, the group with all 200 of them in its POST; the creates
    // travel in `/Bulk` requests: a first batch of 20 (the circuit breaker's minimum, before it
    // can judge the target), four of 50, then the group once its members exist.
    assert_eq!((r.count("create"), r.count("references")), (221, 0), "{r}");
    assert_eq!(srv.writes(), 6, "{r}");
    let (_, gs) = raw("GET", &format!("{}/Groups", srv.base), None).await;
    let g = &gs["Resources"][0];
    assert_eq!(g["members"].as_array().unwrap().len(), 200, "{r}");
    let r2 = s.run_cycle().await.unwrap();
    assert_eq!(r2.total_done(), 0, "{r2}");
    // Membership change: 150 out, 20 in.
    source
        .upsert(
            Entry::new("g1", "group")
                .with("id", "g1")
                .with("cn", "All")
                .with_values("member", members(150..220)),
        )
        .unwrap();
    let r = s.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    let (_, g) = raw(
        "GET",
        &format!("{}/Groups/{}", srv.base, g["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(g["members"].as_array().unwrap().len(), 70);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_initial_load_of_the_example_directory_writes_each_object_once() {
    let Some(srv) = server() else { return };
    let mut s = Synchronizer::new(
        Box::new(common::example_directory()),
        Box::new(target(&srv.base)),
        Box::new(MemoryStore::new()),
        Arc::new(common::example_rules("ad-to-scim.toml")),
        EngineConfig::default(),
    );
    let r = s.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    let all = users(&srv.base).await;
    let (_, groups) = raw("GET", &format!("{}/Groups?count=1000", srv.base), None).await;
    let groups = groups["Resources"].as_array().cloned().unwrap_or_default();
    // One create per object: managers and members travel in the creates, which travel in
    // `/Bulk` requests (a create waits for the creates it references, so a manager chain
    // takes several).
    assert_eq!(
        (r.count("create"), r.count("references")),
        ((all.len() + groups.len()) as u64, 0),
        "{r}"
    );
    assert_eq!((all.len(), groups.len()), (44, 8));
    let writes = srv.writes();
    eprintln!("example directory: {writes} bulk requests");
    assert!(
        writes < (all.len() + groups.len()) / 2,
        "{writes} writes for 52 creates"
    );
    // The server holds the managers and members the source names.
    let views = s.with_store(|st| st.load_all()).unwrap();
    let expected = |anchor, attr| common::linked_references(&views, anchor, attr);
    let (mut managers, mut memberships) = (0, 0);
    for link in views.links.iter() {
        let id = link.target_id.as_str();
        if link.target_type.is("User") {
            let u = all.iter().find(|u| u["id"] == id).unwrap();
            let held: Vec<String> = u["urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"]
                ["manager"]["value"]
                .as_str()
                .map(|m| vec![m.to_string()])
                .unwrap_or_default();
            assert_eq!(held, expected(&link.anchor, "manager"), "{u}");
            managers += held.len();
        } else {
            let g = groups.iter().find(|g| g["id"] == id).unwrap();
            let mut held: Vec<String> = g["members"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["value"].as_str().map(str::to_string))
                .collect();
            held.sort();
            assert_eq!(held, expected(&link.anchor, "member"), "{g}");
            memberships += held.len();
        }
    }
    assert_eq!((managers, memberships), (43, 62));
    // Nothing more to write.
    let writes = srv.writes();
    let again = s.run_cycle().await.unwrap();
    assert_eq!((again.total_done(), srv.writes()), (0, writes), "{again}");
}

/// Users deleted when they leave scope, a manager reference and group members.
const REF_RULES: &str = r#"
[[rule]]
name = "users"
source_type = "user"
target_type = "User"
join = [["externalId"]]
deprovision = { action = "delete" }

[rule.scope]
family = "connect-sync"
groups = [[{ attribute = "department", operator = "NOTEQUAL", value = "Contractors" }]]

[[rule.flow]]
target = "externalId"
expression = '[id]'

[[rule.flow]]
target = "userName"
expression = 'ToLower([upn])'
ignore_case = true

[[rule.flow]]
target = "name.givenName"
expression = '[givenName]'

[[rule.flow]]
target = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager"
expression = '[manager]'
reference = true
multi = false

[[rule]]
name = "groups"
source_type = "group"
target_type = "Group"
join = [["externalId"]]

[[rule.flow]]
target = "externalId"
expression = '[id]'

[[rule.flow]]
target = "displayName"
expression = '[cn]'

[[rule.flow]]
target = "members"
expression = '[member]'
reference = true
"#;

/// Failure 5 of issue 14: a referenced object's target object goes — deleted by the plan (its
/// source object left scope), or behind dirsync's back — and its referrers lose the reference
/// in the same run, before the delete. scim2-server keeps a deleted user in its groups
/// (no referential integrity), so only dirsync's own write removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_referrers_lose_a_deleted_object_in_the_same_run() {
    let Some(srv) = server() else { return };
    let base = srv.base.clone();
    const ENT: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
    let source = MemorySource::new("hr");
    let staff = |i: usize| user(i).with("department", "Eng");
    source.add(staff(0)).unwrap();
    source
        .add(staff(1).with("manager", Value::anchor_ref("u0")))
        .unwrap();
    source.add(staff(2)).unwrap();
    let group = |members: &[usize]| {
        Entry::new("g1", "group")
            .with("id", "g1")
            .with("cn", "Team")
            .with_values(
                "member",
                members
                    .iter()
                    .map(|i| Value::anchor_ref(format!("u{i}")))
                    .collect::<Values>(),
            )
    };
    source.add(group(&[0, 1, 2])).unwrap();
    let rules = RuleSet::from_toml(REF_RULES, None).unwrap();
    let mut s = Synchronizer::new(
        Box::new(source.clone()),
        Box::new(target(&base)),
        Box::new(MemoryStore::new()),
        Arc::new(rules),
        EngineConfig::default(),
    );
    let r = s.run_cycle().await.unwrap();
    assert!(r.failures.is_empty() && r.issues.is_empty(), "{r}");
    let ids = |all: &[Json]| -> std::collections::HashMap<String, String> {
        all.iter()
            .map(|u| {
                (
                    u["externalId"].as_str().unwrap().to_owned(),
                    u["id"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let id = ids(&users(&base).await);
    let group_members = || async {
        let (_, gs) = raw("GET", &format!("{base}/Groups"), None).await;
        let mut m: Vec<String> = gs["Resources"][0]["members"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|m| m["value"].as_str().unwrap().to_owned())
            .collect();
        m.sort();
        m
    };
    let manager_of = |uid: String| {
        let base = base.clone();
        async move {
            let (_, u) = raw("GET", &format!("{base}/Users/{uid}"), None).await;
            u[ENT]["manager"]["value"].as_str().map(str::to_owned)
        }
    };
    let mut want = vec![id["u0"].clone(), id["u1"].clone(), id["u2"].clone()];
    want.sort();
    assert_eq!(group_members().await, want);
    assert_eq!(manager_of(id["u1"].clone()).await, Some(id["u0"].clone()));

    // u0 leaves scope: one run deletes its target object and removes it from the group and
    // from u1's manager — the reference updates go before the delete.
    source
        .upsert(user(0).with("department", "Contractors"))
        .unwrap();
    // One of three users deleted: over the guard's default share.
    s.allow_deletions_once();
    let r = s.run_cycle().await.unwrap();
    assert!(r.failures.is_empty() && r.issues.is_empty(), "{r}");
    assert_eq!(r.count("delete"), 1, "{r}");
    assert_eq!(r.count("references"), 2, "{r}");
    let journal = s.with_store(|st| st.journal(None)).unwrap();
    let kinds: Vec<&str> = journal
        .iter()
        .rev()
        .take(3)
        .map(|j| j.kind.as_str())
        .collect();
    assert_eq!(kinds[0], "delete", "{kinds:?}");
    let mut want = vec![id["u1"].clone(), id["u2"].clone()];
    want.sort();
    assert_eq!(group_members().await, want);
    assert_eq!(manager_of(id["u1"].clone()).await, None);
    let (status, _) = raw("GET", &format!("{base}/Users/{}", id["u0"]), None).await;
    assert_eq!(status, 404);
    // Nothing left to do, and the out-of-scope manager is no issue.
    let r = s.run_cycle().await.unwrap();
    assert!(r.issues.is_empty() && r.planned == 0, "{r}");

    // u2's target object is deleted behind dirsync's back; an edit of u2 finds it gone: the
    // next run creates it again and the group gets the new object instead of the old id.
    let (status, _) = raw("DELETE", &format!("{base}/Users/{}", id["u2"]), None).await;
    assert_eq!(status, 204);
    source
        .upsert(staff(2).with_values("givenName", Values::one("Edited")))
        .unwrap();
    let r = s.run_cycle().await.unwrap();
    assert_eq!(r.failures.len(), 1, "{r}");
    assert!(!r.failures[0].escrowed, "{r}");
    let r = s.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{r}");
    assert_eq!(r.count("create"), 1, "{r}");
    let new_u2 = ids(&users(&base).await)["u2"].clone();
    assert_ne!(new_u2, id["u2"]);
    let mut want = vec![id["u1"].clone(), new_u2];
    want.sort();
    assert_eq!(group_members().await, want);
}

// ---------------------------------------------------------------------------------------------
// The in-process server: answers per RFC 7644 for Users, with scripted failures.

#[derive(Clone)]
enum Script {
    /// Answer 429 with `Retry-After: 1` to the first N POSTs.
    Throttle(usize),
    /// Answer 500 to the Nth POST (0-based) once.
    FailOnce(usize),
    /// Answer every POST with a body that is not JSON.
    Garbage,
}

struct Mock {
    base: String,
    posts: Arc<AtomicUsize>,
    created: Arc<AtomicUsize>,
}

async fn mock(script: Script) -> Mock {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let posts = Arc::new(AtomicUsize::new(0));
    let created = Arc::new(AtomicUsize::new(0));
    let (p, c) = (posts.clone(), created.clone());
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let (p, c, script) = (p.clone(), c.clone(), script.clone());
            tokio::spawn(async move {
                let _ = serve(sock, p, c, script).await;
            });
        }
    });
    Mock {
        base: format!("http://127.0.0.1:{port}/v2"),
        posts,
        created,
    }
}

async fn serve(
    mut sock: tokio::net::TcpStream,
    posts: Arc<AtomicUsize>,
    created: Arc<AtomicUsize>,
    script: Script,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    loop {
        // Read one request: headers, then Content-Length bytes.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let len = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            })
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[head_end..head_end + len].to_vec();
        buf.drain(..head_end + len);
        let mut parts = head.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (status, extra, out): (u16, &str, String) = if path.ends_with("/ServiceProviderConfig")
        {
            (200, "", json!({"patch": {"supported": true}, "bulk": {"supported": false}, "filter": {"supported": true, "maxResults": 100}, "etag": {"supported": false}}).to_string())
        } else if path.contains("/ResourceTypes") || path.contains("/Schemas") {
            (
                404,
                "",
                json!({"status": "404", "detail": "not here"}).to_string(),
            )
        } else if method == "POST" {
            let n = posts.fetch_add(1, Ordering::SeqCst);
            match &script {
                Script::Throttle(k) if n < *k => (429, "Retry-After: 1\r\n", json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"], "status": "429", "detail": "slow down"}).to_string()),
                Script::FailOnce(k) if n == *k => (500, "", "internal error".to_string()),
                Script::Garbage => (201, "", "{\"id\": \"x\", ".to_string()),
                _ => {
                    let i = created.fetch_add(1, Ordering::SeqCst);
                    let mut r: Json = serde_json::from_slice(&body).unwrap_or(json!({}));
                    r["id"] = json!(format!("id{i}"));
                    (201, "", r.to_string())
                }
            }
        } else if method == "GET" && path.contains("filter=") {
            (200, "", json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"], "totalResults": 0, "Resources": []}).to_string())
        } else {
            (404, "", json!({"status": "404"}).to_string())
        };
        let resp = format!("HTTP/1.1 {status} X\r\nContent-Type: application/scim+json\r\nContent-Length: {}\r\n{extra}\r\n{out}", out.len());
        sock.write_all(resp.as_bytes()).await?;
    }
}

fn mock_target(base: &str) -> ScimTarget {
    ScimTarget::new(ScimConfig {
        base_url: base.to_string(),
        auth: ScimAuth::Bearer {
            token: Secret::new("t"),
        },
        ..ScimConfig::default()
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_429_with_retry_after_is_honoured() {
    let m = mock(Script::Throttle(2)).await;
    let t = mock_target(&m.base);
    let mut a = Attributes::new();
    a.set("userName", Values::one("a"));
    let op = TargetOperation::Create {
        object_type: "User".into(),
        attributes: a,
    };
    let e = t
        .apply(std::slice::from_ref(&op))
        .await
        .pop()
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Throttled);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(1)));
    assert!(e.message().contains("slow down"), "{e}");
    // Through the engine: waits as asked (≥ 1 s), then succeeds; one object created.
    let source = MemorySource::new("hr");
    source.add(user(1)).unwrap();
    let t0 = Instant::now();
    let mut s = sync(&source, mock_target(&m.base));
    let r = s.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(r.count("create"), 1);
    assert!(
        t0.elapsed() >= Duration::from_millis(950),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(m.created.load(Ordering::SeqCst), 1);
    assert_eq!(m.posts.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_500_mid_run_then_clean_retry() {
    let m = mock(Script::FailOnce(3)).await;
    let source = MemorySource::new("hr");
    for i in 0..8 {
        source.add(user(i)).unwrap();
    }
    let mut s = sync(&source, mock_target(&m.base));
    let r = s.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert_eq!(r.count("create"), 8);
    assert_eq!(m.created.load(Ordering::SeqCst), 8, "no duplicates");
    assert_eq!(m.posts.load(Ordering::SeqCst), 9, "one retry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_malformed_answer_is_a_protocol_error() {
    let m = mock(Script::Garbage).await;
    let t = mock_target(&m.base);
    let mut a = Attributes::new();
    a.set("userName", Values::one("a"));
    let e = t
        .apply(&[TargetOperation::Create {
            object_type: "User".into(),
            attributes: a,
        }])
        .await
        .pop()
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    // Nothing listens: Unavailable (retryable), not a panic.
    let port = free_port();
    let t = mock_target(&format!("http://127.0.0.1:{port}/v2"));
    let e = t
        .get(&ObjectType::new("User"), &TargetId::new("x"))
        .await
        .unwrap_err();
    assert!(e.is_retryable(), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_ldif_to_scim_through_the_sync_example() {
    let Some(srv) = server() else { return };
    let exe = build_sync();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(root.join("examples/config/ad-to-scim.toml")).unwrap();
    let config = shipped
        .replace(
            "../rules/ad-to-scim.toml",
            &root
                .join("examples/rules/ad-to-scim.toml")
                .display()
                .to_string(),
        )
        .replace(
            "../data/corp.ldif",
            &root.join("examples/data/corp.ldif").display().to_string(),
        )
        .replace(
            "../../target/sync-example/scim-state.sqlite",
            &dir.path().join("state.sqlite").display().to_string(),
        )
        .replace("http://127.0.0.1:8080/v2", &srv.base);
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).unwrap();
    let run = || {
        let out = Command::new(&exe)
            .args(["--config", path.to_str().unwrap(), "run"])
            .env("SCIM_TOKEN", TOKEN)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "sync run failed: {text}");
        text
    };
    let first = run();
    let all = users(&srv.base).await;
    assert!(all.len() >= 5, "{first}");
    assert!(
        all.iter()
            .all(|u| u["externalId"].is_string() && u["userName"].is_string()),
        "{first}"
    );
    assert!(all.iter().any(
        |u| u["urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"]["employeeNumber"]
            .is_string()
    ));
    let (_, groups) = raw("GET", &format!("{}/Groups", srv.base), None).await;
    let groups = groups["Resources"].as_array().cloned().unwrap_or_default();
    assert!(!groups.is_empty(), "{first}");
    assert!(
        groups
            .iter()
            .any(|g| g["members"].as_array().is_some_and(|m| !m.is_empty())),
        "{first}"
    );
    // A second run has nothing to create.
    let before = all.len();
    run();
    assert_eq!(users(&srv.base).await.len(), before);
}

// ---------------------------------------------------------------------------------------------
// A fresh state against a service that already holds the objects (issue 14, failure 7).

/// A TCP proxy in front of a scim2-server that records the request line of every request it
/// forwards. scim2-server speaks HTTP/1.0 and closes every connection after its answer, so a
/// connection carries exactly one request.
struct Counting {
    base: String,
    lines: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Counting {
    async fn start(upstream_base: &str) -> Counting {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rest = upstream_base.strip_prefix("http://").unwrap();
        let (upstream, path) = rest.split_once('/').unwrap();
        let upstream = upstream.to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = lines.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (seen, upstream) = (seen.clone(), upstream.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut chunk = [0u8; 4096];
                        match client.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&head)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    seen.lock().unwrap().push(line);
                    let mut up = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                    up.write_all(&head).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                });
            }
        });
        Counting {
            base: format!("http://127.0.0.1:{port}/{path}"),
            lines,
        }
    }

    /// The request lines recorded since the last call, and forgets them.
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.lines.lock().unwrap())
    }
}

/// How many of `lines` are `method` requests whose target starts with `prefix` (`/v2/Users`).
fn count(lines: &[String], method: &str, prefix: &str) -> usize {
    lines
        .iter()
        .filter(|l| {
            let mut p = l.split(' ');
            p.next() == Some(method) && p.next().is_some_and(|t| t.starts_with(prefix))
        })
        .count()
}

fn lookups(lines: &[String]) -> usize {
    lines
        .iter()
        .filter(|l| l.starts_with("GET ") && l.contains("filter="))
        .count()
}

fn writes(lines: &[String]) -> usize {
    lines.iter().filter(|l| !l.starts_with("GET ")).count()
}

/// A group of the source: `cn`, its members by anchor.
fn source_group(i: usize, members: impl IntoIterator<Item = usize>) -> Entry {
    Entry::new(format!("g{i}"), "group")
        .with("id", format!("g{i}"))
        .with("cn", format!("Group {i}"))
        .with_values(
            "member",
            members
                .into_iter()
                .map(|m| Value::anchor_ref(format!("u{m}")))
                .collect::<Values>(),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_a_fresh_state_joins_every_user_and_group_it_holds() {
    let Some(srv) = server() else { return };
    let base = srv.base.clone();
    // Another tool provisioned 60 users (userName in another case, no externalId) and three
    // groups with their members; displayName has no uniqueness rule (RFC 7643 §4.2).
    let mut ids = Vec::new();
    for i in 0..60 {
        let (s, u) = raw(
            "POST",
            &format!("{base}/Users"),
            Some(
                json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                "userName": format!("USER{i}@corp.test"), "active": true}),
            ),
        )
        .await;
        assert_eq!(s, 201, "{u}");
        ids.push(u["id"].as_str().unwrap().to_string());
    }
    let groups: [(usize, std::ops::Range<usize>); 3] = [(1, 0..10), (2, 10..40), (3, 40..41)];
    for (g, members) in groups.clone() {
        let members: Vec<Json> = members.map(|m| json!({"value": ids[m]})).collect();
        let (s, _) = raw(
            "POST",
            &format!("{base}/Groups"),
            Some(
                json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                "displayName": format!("Group {g}"), "members": members}),
            ),
        )
        .await;
        assert_eq!(s, 201);
    }
    let source = MemorySource::new("hr");
    for i in 0..60 {
        source.add(user(i)).unwrap();
    }
    for (g, members) in groups {
        source.add(source_group(g, members)).unwrap();
    }
    // dirsync starts with a fresh state, through a proxy that counts the requests.
    let proxy = Counting::start(&base).await;
    let mut s = sync(&source, target(&proxy.base));
    let r = s.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{r}");
    assert_eq!((r.count("create"), r.count("join")), (0, 63), "{r}");
    assert_eq!((r.looked_up, r.lookup_found), (126, 63), "{r}");
    let lines = proxy.take();
    // Nothing created: no POST but to /Bulk. The lookups: round 0 by externalId (the other tool set none:
    // found nothing), round 1 by userName and displayName — 60 user values in batches of 50 →
    // 2 + 2 queries, 3 group values → 1 + 1.
    assert_eq!(count(&lines, "POST", "/v2/Users"), 0, "{lines:#?}");
    assert_eq!(count(&lines, "POST", "/v2/Groups"), 0, "{lines:#?}");
    assert_eq!(lookups(&lines), 6, "{lines:#?}");
    // The joins bring the flows in: one PATCH per object (externalId, name, emails, …), in
    // `/Bulk` requests: a first batch of 20 (the circuit breaker's minimum), then the 43 others.
    assert_eq!(count(&lines, "POST", "/v2/Bulk"), 2, "{lines:#?}");
    assert_eq!(writes(&lines), 2, "{lines:#?}");
    eprintln!(
        "fresh state, 60 users + 3 groups all present: {} requests ({} lookups, {} writes)",
        lines.len(),
        lookups(&lines),
        writes(&lines)
    );
    assert_eq!(users(&base).await.len(), 60, "no duplicate user");
    let (_, gs) = raw("GET", &format!("{base}/Groups?count=100"), None).await;
    assert_eq!(gs["totalResults"], 3, "no duplicate group: {gs}");
    let g2 = gs["Resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["displayName"] == "Group 2")
        .unwrap();
    assert_eq!(g2["externalId"], "g2");
    assert_eq!(g2["members"].as_array().unwrap().len(), 30);
    // The next run writes nothing — and sends nothing.
    let r = s.run_cycle().await.unwrap();
    assert_eq!(r.total_done(), 0, "{r}");
    assert!(proxy.take().is_empty());

    // The state is lost again, and meanwhile the source gained 5 users and a group the service
    // does not hold: only those are created.
    for i in 60..65 {
        source.add(user(i)).unwrap();
    }
    source.add(source_group(4, 58..65)).unwrap();
    let mut s = sync(&source, target(&proxy.base));
    let r = s.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{r}");
    assert_eq!((r.count("create"), r.count("join")), (6, 63), "{r}");
    let lines = proxy.take();
    // The 5 users in one `/Bulk` request, then the group that references them on its own (a
    // batch of one needs no `/Bulk`); the joins change nothing (the last run set their flows):
    // nothing to send.
    assert_eq!(count(&lines, "POST", "/v2/Bulk"), 1, "{lines:#?}");
    assert_eq!(count(&lines, "POST", "/v2/Groups"), 1, "{lines:#?}");
    assert_eq!(writes(&lines), 2, "{lines:#?}");
    // Round 0 (externalId, set by the last run) finds the 63 — 65 user values in 50 + 15, 4
    // group values in one query; round 1 looks up the 6 others by userName and displayName.
    assert_eq!(lookups(&lines), 2 + 1 + 1 + 1, "{lines:#?}");
    eprintln!(
        "fresh state, 63 of 69 present: {} requests ({} lookups, {} writes)",
        lines.len(),
        lookups(&lines),
        writes(&lines)
    );
    assert_eq!(users(&base).await.len(), 65);
    let (_, gs) = raw("GET", &format!("{base}/Groups?count=100"), None).await;
    assert_eq!(gs["totalResults"], 4, "{gs}");
    assert_eq!(s.run_cycle().await.unwrap().total_done(), 0);
}

fn new_user(name: &str) -> TargetOperation {
    let mut a = Attributes::new();
    a.set("userName", Values::one(name));
    TargetOperation::Create {
        object_type: "User".into(),
        attributes: a,
    }
}

/// One apply call of 40 operations is one `POST /Bulk` (scim2-server announces bulk, up to
/// 1,000 operations): creates, updates and deletes, with a failure in the middle that fails
/// only its own operation (the others run: `failOnErrors` is not sent), outcomes matched to
/// operations by bulkId and location — not by position — and two operations on the same user
/// applied in their order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_one_apply_is_one_bulk_request_with_per_operation_outcomes() {
    let Some(srv) = server() else { return };
    let (_, spc) = raw("GET", &format!("{}/ServiceProviderConfig", srv.base), None).await;
    assert_eq!(spc["bulk"]["supported"], true, "{spc}");
    let proxy = Counting::start(&srv.base).await;
    let t = target(&proxy.base);
    // Before discovery the target already offers batches (its configured size); after it,
    // the size within the service's maxOperations.
    assert_eq!(t.capabilities().max_batch, 50);
    let seed: Vec<TargetOperation> = (0..20).map(|i| new_user(&format!("s{i}"))).collect();
    let ids: Vec<TargetId> = t
        .apply(&seed)
        .await
        .into_iter()
        .map(|r| r.unwrap().id)
        .collect();
    assert_eq!(t.capabilities().max_batch, 50);
    let lines = proxy.take();
    assert_eq!(count(&lines, "POST", "/v2/Bulk"), 1, "{lines:#?}");
    assert_eq!(writes(&lines), 1, "{lines:#?}");

    let title = |v: &str| {
        vec![AttributeChange::replace(
            "title",
            Values::one(v.to_string()),
        )]
    };
    let mut ops: Vec<TargetOperation> = Vec::new();
    for i in 0..10 {
        ops.push(new_user(&format!("n{i}")));
    }
    // A duplicate userName: 409 uniqueness, in the middle of the request.
    ops.push(new_user("s3"));
    for id in &ids[..10] {
        ops.push(TargetOperation::Update {
            id: id.clone(),
            object_type: "User".into(),
            changes: title("Engineer"),
        });
    }
    // An update of a user that does not exist: 404, its own failure only.
    ops.push(TargetOperation::Update {
        id: TargetId::new("no-such-user"),
        object_type: "User".into(),
        changes: title("Ghost"),
    });
    for id in &ids[10..18] {
        ops.push(TargetOperation::Delete {
            id: id.clone(),
            object_type: "User".into(),
        });
    }
    // The same user updated, then deleted.
    ops.push(TargetOperation::Update {
        id: ids[18].clone(),
        object_type: "User".into(),
        changes: title("Leaving"),
    });
    ops.push(TargetOperation::Delete {
        id: ids[18].clone(),
        object_type: "User".into(),
    });
    let out = t.apply(&ops).await;
    assert_eq!(out.len(), ops.len());
    for (i, r) in out.iter().enumerate() {
        match i {
            10 => assert_eq!(r.as_ref().unwrap_err().kind(), ErrorKind::AlreadyExists),
            21 => {
                let e = r.as_ref().unwrap_err();
                assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
            }
            _ => assert!(r.is_ok(), "operation {i}: {r:?}"),
        }
    }
    // The creates' ids are those of their own users.
    let all = users(&srv.base).await;
    for (i, r) in out[..10].iter().enumerate() {
        let id = r.as_ref().unwrap().id.as_str();
        let u = all.iter().find(|u| u["id"] == id).unwrap();
        assert_eq!(u["userName"], format!("n{i}"));
    }
    for id in &ids[..10] {
        let u = all.iter().find(|u| u["id"] == id.as_str()).unwrap();
        assert_eq!(u["title"], "Engineer", "{u}");
    }
    assert_eq!(all.len(), 20 + 10 - 8 - 1, "{all:#?}");
    assert!(!all.iter().any(|u| u["id"] == ids[18].as_str()));
    let lines = proxy.take();
    // The update and delete of one user cannot share a request (If-Match versions, order):
    // two bulk requests, nothing sent one by one.
    assert_eq!(count(&lines, "POST", "/v2/Bulk"), 2, "{lines:#?}");
    assert_eq!(writes(&lines), 2, "{lines:#?}");
}

/// A service without bulk (its ServiceProviderConfig says `bulk.supported: false`): a batch
/// handed to the target before discovery is sent one request per operation, in order, each
/// with its own outcome (a 500 fails only its operation); after discovery the target asks
/// for batches of one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_without_bulk_a_batch_is_one_request_per_operation() {
    let m = mock(Script::FailOnce(2)).await;
    let t = mock_target(&m.base);
    assert_eq!(
        t.capabilities().max_batch,
        50,
        "configured, before discovery"
    );
    let ops: Vec<TargetOperation> = (0..6).map(|i| new_user(&format!("b{i}"))).collect();
    let out = t.apply(&ops).await;
    assert_eq!(out.len(), 6);
    assert_eq!(
        out[2].as_ref().unwrap_err().kind(),
        ErrorKind::Unavailable,
        "{out:?}"
    );
    let ids: Vec<String> = out
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, r)| r.as_ref().unwrap().id.as_str().to_string())
        .collect();
    assert_eq!(ids, ["id0", "id1", "id2", "id3", "id4"], "in order");
    assert_eq!(
        m.posts.load(Ordering::SeqCst),
        6,
        "one POST per operation, no /Bulk"
    );
    assert_eq!(m.created.load(Ordering::SeqCst), 5);
    assert_eq!(t.capabilities().max_batch, 1, "after discovery");
}

/// Through the engine: an initial load of 120 users and 6 groups of 20 members is a handful of
/// `/Bulk` requests (50 operations each at most), not one request per object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_an_initial_load_through_the_engine_is_batched() {
    let Some(srv) = server() else { return };
    let proxy = Counting::start(&srv.base).await;
    let source = MemorySource::new("hr");
    for i in 0..120 {
        source.add(user(i)).unwrap();
    }
    for g in 0..6 {
        source.add(source_group(g, g * 20..g * 20 + 20)).unwrap();
    }
    let mut s = sync(&source, target(&proxy.base));
    let r = s.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{r}");
    assert_eq!(r.count("create"), 126, "{r}");
    let lines = proxy.take();
    let bulk = count(&lines, "POST", "/v2/Bulk");
    eprintln!(
        "initial load, 120 users + 6 groups: {} writes ({bulk} /Bulk), {} lookups",
        writes(&lines),
        lookups(&lines)
    );
    assert_eq!(writes(&lines), bulk, "every write in /Bulk: {lines:#?}");
    assert!(bulk * 20 <= 126, "{bulk} bulk requests for 126 creates");
    assert_eq!(users(&srv.base).await.len(), 120);
    let (_, gs) = raw("GET", &format!("{}/Groups?count=100", srv.base), None).await;
    assert_eq!(gs["totalResults"], 6, "{gs}");
    for g in gs["Resources"].as_array().unwrap() {
        assert_eq!(g["members"].as_array().unwrap().len(), 20, "{g}");
    }
    assert_eq!(s.run_cycle().await.unwrap().total_done(), 0);
}
