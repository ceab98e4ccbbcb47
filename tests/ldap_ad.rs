//! The LDAP source against a real Active Directory protocol implementation: a Samba 4 AD domain
//! controller per test (testkit::samba), each test in a network namespace of its own (Samba's
//! ports are fixed), reached over LDAPS with certificate verification against the test CA.
//!
//! Covers: a paged full import of thousands of users with objectGUID anchors and S-1-5 SIDs;
//! range retrieval of a group with more than 1,500 members; the cleartext simple bind refused by
//! the connector and by the server; DirSync and uSNChanged deltas after add, modify, membership
//! changes, rename, move and delete; invalid watermarks; the engine converging a memory
//! target through a full and a delta cycle; in both delta modes, references by anchor
//! through a life cycle (a manager deleted and its DN reused, members and a manager renamed and
//! moved); and (with the `scim` feature) deprovisioning by cause into a real SCIM service:
//! disabled on leaving scope, the same object re-enabled on return, deleted when deleted in AD.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use dirsync::connector::ldap::{
    DeltaMode, LdapBind, LdapConnection, LdapSource, LdapSourceConfig, UsnWatermark,
    DIRSYNC_WATERMARK,
};
use dirsync::connector::memory::MemoryTarget;
use dirsync::connector::{ErrorKind, ImportItem, Secret, Source, Watermark};
use dirsync::engine::{EngineConfig, Synchronizer};
use dirsync::model::{Anchor, Change, ChangeOp, Entry, Reference, Value};
use dirsync::rules::ruleset::RuleSet;
use dirsync::state::MemoryStore;
use dirsync::testkit::samba::{self, SambaDc};
use futures::StreamExt;

/// Whether the test goes on here (see `tests/ldap_samba_harness.rs`).
fn enter(test_name: &str) -> bool {
    if let Some(reason) = samba::skip_reason().unwrap() {
        eprintln!("{reason}");
        return false;
    }
    samba::in_own_netns(test_name).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn connection(dc: &SambaDc) -> LdapConnection {
    let mut c = LdapConnection::new(dc.ldaps_url());
    c.tls.ca_file = Some(dc.ca_file().to_path_buf());
    c.bind = LdapBind::Simple {
        dn: dc.admin_dn().to_owned(),
        password: Secret::new(dc.admin_password()),
    };
    c
}

fn config(dc: &SambaDc, base: &str, delta: DeltaMode) -> LdapSourceConfig {
    let mut c = LdapSourceConfig::new(connection(dc), base);
    c.filter = "(|(objectClass=user)(objectClass=group))".to_owned();
    c.delta = delta;
    c
}

async fn full(source: &LdapSource) -> (Vec<Entry>, Option<Watermark>) {
    let mut stream = source.full_import().await.unwrap();
    let mut out = Vec::new();
    let mut last = None;
    while let Some(item) = stream.next().await {
        match item.unwrap() {
            ImportItem::Item(e) => {
                assert!(last.is_none(), "an entry after the checkpoint");
                out.push(e)
            }
            ImportItem::Checkpoint(w) => last = Some(w),
            ImportItem::Present(_) => panic!("an AD full import reports no present phase"),
        }
    }
    (out, last)
}

async fn delta(
    source: &LdapSource,
    since: &Watermark,
) -> Result<(Vec<Change>, Watermark), dirsync::connector::ConnectorError> {
    let mut stream = source.delta_import(since).await?;
    let mut out = Vec::new();
    let mut last = None;
    while let Some(item) = stream.next().await {
        match item? {
            ImportItem::Item(c) => out.push(c),
            ImportItem::Checkpoint(w) => last = Some(w),
            ImportItem::Present(_) => panic!("an AD delta reports no present phase"),
        }
    }
    Ok((out, last.expect("a delta import ends with a checkpoint")))
}

fn by_dn(entries: &[Entry]) -> HashMap<String, Anchor> {
    entries
        .iter()
        .map(|e| {
            (
                e.dn.as_ref().unwrap().to_string().to_ascii_lowercase(),
                e.anchor.clone(),
            )
        })
        .collect()
}

fn dn_ref(v: &Value) -> String {
    match v {
        Value::Reference(Reference::Dn(d)) => d.to_string().to_ascii_lowercase(),
        other => panic!("not a DN reference: {other:?}"),
    }
}

const OTHER_OU: &str = "OU=Other,DC=contoso,DC=test";

/// Loads the OUs, users 0..n and a group "Team" of users 0..5, plus OU=Other.
fn load_small(dc: &SambaDc, n: usize) {
    dc.ldbadd(&samba::ous_ldif()).unwrap();
    dc.ldbadd(&format!(
        "dn: {OTHER_OU}\nobjectClass: organizationalUnit\nou: Other\n\n"
    ))
    .unwrap();
    dc.ldbadd(&samba::users_ldif(0..n)).unwrap();
    dc.ldbadd(&samba::group_ldif("Team", 0..5)).unwrap();
}

/// The same changes for both delta modes, made through LDAP.
fn make_changes(dc: &SambaDc) {
    dc.ldapmodify(&samba::users_ldif(100..101).replace(
        "objectClass: user\n",
        "changetype: add\nobjectClass: user\n",
    ))
    .unwrap();
    dc.ldapmodify(&format!(
        "dn: {}\nchangetype: modify\nreplace: title\ntitle: Principal Engineer\n-\n",
        samba::user_dn(1)
    ))
    .unwrap();
    dc.ldapmodify(&format!(
        "dn: {}\nchangetype: modify\nadd: member\nmember: {}\n-\ndelete: member\nmember: {}\n-\n",
        samba::group_dn("Team"),
        samba::user_dn(6),
        samba::user_dn(0)
    ))
    .unwrap();
    dc.ldap_rename(&samba::user_dn(2), "CN=Renamed Two", None)
        .unwrap();
    dc.ldap_rename(&samba::user_dn(3), "CN=User 000003", Some(OTHER_OU))
        .unwrap();
    dc.ldap_delete(&samba::user_dn(4)).unwrap();
}

#[test]
fn full_import_pages_guids_sids_and_ranges() {
    if !enter("full_import_pages_guids_sids_and_ranges") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dc = SambaDc::start(dir.path()).unwrap();
    dc.ldbadd(&samba::ous_ldif()).unwrap();
    dc.ldbadd(&samba::users_ldif(0..2500)).unwrap();
    dc.ldbadd(&samba::group_ldif("Everyone Big", 0..1600))
        .unwrap();
    runtime().block_on(async {
        // 2,500 users in pages of 1,000 (Samba's MaxPageSize).
        let people = LdapSource::new(config(&dc, samba::PEOPLE_OU, DeltaMode::None));
        let (users, w) = full(&people).await;
        assert!(w.is_none(), "no delta mode, no watermark");
        assert_eq!(users.len(), 2500);
        let mut anchors: Vec<&str> = users.iter().map(|e| e.anchor.as_str()).collect();
        anchors.sort();
        anchors.dedup();
        assert_eq!(anchors.len(), 2500, "objectGUID anchors are unique");
        for u in &users {
            assert!(u.object_type.is("user"));
            let a = u.anchor.as_str();
            assert!(uuid::Uuid::parse_str(a).is_ok(), "anchor {a} is a GUID");
            assert_eq!(u.attributes.first_str("objectGUID"), Some(a));
            let sid = u.attributes.first_str("objectSid").unwrap();
            assert!(sid.starts_with("S-1-5-21-"), "{sid}");
        }
        let u7 = users
            .iter()
            .find(|e| e.attributes.first_str("sAMAccountName") == Some("user000007"))
            .unwrap();
        assert_eq!(u7.attributes.first_str("employeeID"), Some("000007"));

        // A 1,600-member group with forced range retrieval (Samba sends all values to a plain
        // request): 0-1499, then 1500-*, merged whole.
        let mut gc = config(&dc, samba::GROUPS_OU, DeltaMode::None);
        gc.range_retrieval.force = true;
        let groups = LdapSource::new(gc);
        let (gs, _) = full(&groups).await;
        assert_eq!(gs.len(), 1);
        let members = gs[0].get("member").unwrap();
        assert_eq!(members.len(), 1600);
        let mut seen: Vec<String> = members.iter().map(dn_ref).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 1600, "no value twice");
        assert!(seen.contains(&samba::user_dn(1599).to_ascii_lowercase()));
        // A smaller step: several slices.
        let mut gc = config(&dc, samba::GROUPS_OU, DeltaMode::None);
        gc.range_retrieval.force = true;
        gc.range_retrieval.step = 500;
        let (gs, _) = full(&LdapSource::new(gc)).await;
        assert_eq!(gs[0].get("member").unwrap().len(), 1600);

        // A simple bind over cleartext ldap:// is refused by the connector…
        let mut plain = connection(&dc);
        plain.url = dc.ldap_url().to_owned();
        let c = LdapSourceConfig::new(plain.clone(), samba::PEOPLE_OU);
        let e = LdapSource::new(c).full_import().await.err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        assert!(e.message().contains("cleartext"), "{e}");
        // …and, when explicitly allowed, by the server (strong auth required).
        plain.allow_cleartext_bind = true;
        let c = LdapSourceConfig::new(plain, samba::PEOPLE_OU);
        let e = LdapSource::new(c).full_import().await.err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
        assert!(e.message().contains("strongerAuthRequired"), "{e}");
        assert!(e.message().contains("encryption"), "{e}");
    });
}

#[test]
fn dirsync_deltas() {
    if !enter("dirsync_deltas") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dc = SambaDc::start(dir.path()).unwrap();
    load_small(&dc, 10);
    runtime().block_on(async {
        let source = LdapSource::new(config(&dc, dc.base_dn(), DeltaMode::Dirsync));
        assert!(source.capabilities().delta);
        assert!(source.capabilities().partial_changes);
        let (entries, w0) = full(&source).await;
        let w0 = w0.expect("a full import ends with the DirSync cookie");
        assert_eq!(w0.kind, DIRSYNC_WATERMARK);
        assert_eq!(&w0.data[..4], b"MSDS");
        let anchors = by_dn(&entries);
        let anchor = |i: usize| anchors[&samba::user_dn(i).to_ascii_lowercase()].clone();
        let team = anchors[&samba::group_dn("Team").to_ascii_lowercase()].clone();

        // Nothing changed: an empty delta.
        let (none, w1) = delta(&source, &w0).await.unwrap();
        assert!(none.is_empty(), "{none:#?}");
        assert_eq!(w1.kind, DIRSYNC_WATERMARK);

        make_changes(&dc);
        let (changes, w2) = delta(&source, &w1).await.unwrap();
        eprintln!("{changes:#?}");
        let find =
            |a: &Anchor| -> Vec<&Change> { changes.iter().filter(|c| c.anchor() == a).collect() };
        // Added.
        let added: Vec<&Entry> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Add(e) => Some(e),
                _ => None,
            })
            .collect();
        assert_eq!(added.len(), 1, "{changes:#?}");
        assert_eq!(
            added[0].attributes.first_str("sAMAccountName"),
            Some("user000100")
        );
        assert!(!anchors.values().any(|a| *a == added[0].anchor));
        // Modified: only the title, as an attribute-level change.
        let m = find(&anchor(1));
        assert_eq!(m.len(), 1, "{m:#?}");
        let Change::Modify {
            object_type,
            changes: ac,
            ..
        } = m[0]
        else {
            panic!("{m:#?}")
        };
        assert!(object_type.is("user"));
        let title = ac.iter().find(|c| c.attribute.is("title")).unwrap();
        assert_eq!(title.op, ChangeOp::Replace);
        assert_eq!(
            title.values.first().unwrap().to_string(),
            "Principal Engineer"
        );
        // Group membership: value-level add of user 6 and removal of user 0.
        // Its own change as a Modify, and (because members 2 and 3 were renamed or moved, which
        // AD does not report as a change of the group) a whole re-read holding their new DNs.
        let g = find(&team);
        assert_eq!(g.len(), 2, "{g:#?}");
        let Some(Change::Modify {
            object_type,
            changes: gc,
            ..
        }) = g.iter().find(|c| matches!(c, Change::Modify { .. }))
        else {
            panic!("{g:#?}")
        };
        let Some(Change::Replace(whole_team)) = g.iter().find(|c| matches!(c, Change::Replace(_)))
        else {
            panic!("{g:#?}")
        };
        let team_members: Vec<String> = whole_team
            .get("member")
            .unwrap()
            .iter()
            .map(dn_ref)
            .collect();
        assert!(
            team_members
                .contains(&format!("cn=renamed two,{}", samba::PEOPLE_OU).to_ascii_lowercase()),
            "{team_members:?}"
        );
        assert!(object_type.is("group"));
        let add = gc
            .iter()
            .find(|c| c.attribute.is("member") && c.op == ChangeOp::Add)
            .unwrap();
        assert_eq!(
            add.values.iter().map(dn_ref).collect::<Vec<_>>(),
            [samba::user_dn(6).to_ascii_lowercase()]
        );
        let rm = gc
            .iter()
            .find(|c| c.attribute.is("member") && c.op == ChangeOp::Remove)
            .unwrap();
        assert_eq!(
            rm.values.iter().map(dn_ref).collect::<Vec<_>>(),
            [samba::user_dn(0).to_ascii_lowercase()]
        );
        // Renamed and moved: the whole object at its new DN.
        for (i, new_dn) in [
            (2, format!("CN=Renamed Two,{}", samba::PEOPLE_OU)),
            (3, format!("CN=User 000003,{OTHER_OU}")),
        ] {
            let r = find(&anchor(i));
            assert_eq!(r.len(), 1, "{r:#?}");
            let Change::Replace(e) = r[0] else {
                panic!("{r:#?}")
            };
            assert_eq!(
                e.dn.as_ref().unwrap().to_string().to_ascii_lowercase(),
                new_dn.to_ascii_lowercase()
            );
            assert!(e.get("sAMAccountName").is_some(), "a whole object");
        }
        // Deleted: by objectGUID, from the tombstone.
        let d = find(&anchor(4));
        assert!(
            matches!(d.as_slice(), [Change::Delete { object_type, .. }] if object_type.is("user")),
            "{d:#?}"
        );
        // Nothing else of ours changed.
        for i in [0, 5, 6, 7] {
            assert!(find(&anchor(i)).is_empty(), "user {i}");
        }

        // From the new cookie: nothing again.
        let (none, _) = delta(&source, &w2).await.unwrap();
        assert!(none.is_empty(), "{none:#?}");
        // The old cookie still replays the changes (seen twice is fine).
        let (again, _) = delta(&source, &w1).await.unwrap();
        assert_eq!(again.len(), changes.len());

        // Invalid watermarks: another kind, garbage bytes.
        let e = delta(&source, &Watermark::new("usn", w2.data.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidWatermark, "{e}");
        let e = delta(
            &source,
            &Watermark::new(DIRSYNC_WATERMARK, b"garbage".to_vec()),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidWatermark, "{e}");
        let mut mangled = w2.data.clone();
        mangled.truncate(40);
        let e = delta(&source, &Watermark::new(DIRSYNC_WATERMARK, mangled))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidWatermark, "{e}");
    });
}

#[test]
fn usn_changed_deltas() {
    if !enter("usn_changed_deltas") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dc = SambaDc::start(dir.path()).unwrap();
    load_small(&dc, 10);
    runtime().block_on(async {
        let source = LdapSource::new(config(&dc, dc.base_dn(), DeltaMode::UsnChanged));
        assert!(source.capabilities().delta);
        let (entries, w0) = full(&source).await;
        let w0 = w0.unwrap();
        let parsed = UsnWatermark::parse(&w0).unwrap();
        assert!(parsed.usn > 0);
        let anchors = by_dn(&entries);
        let anchor = |i: usize| anchors[&samba::user_dn(i).to_ascii_lowercase()].clone();
        let team = anchors[&samba::group_dn("Team").to_ascii_lowercase()].clone();

        let (none, w1) = delta(&source, &w0).await.unwrap();
        assert!(none.is_empty(), "{none:#?}");
        make_changes(&dc);
        let (changes, w2) = delta(&source, &w1).await.unwrap();
        eprintln!("{changes:#?}");
        assert!(UsnWatermark::parse(&w2).unwrap().usn > UsnWatermark::parse(&w1).unwrap().usn);
        let whole = |a: &Anchor| -> Entry {
            let r: Vec<&Change> = changes.iter().filter(|c| c.anchor() == a).collect();
            match r.as_slice() {
                [Change::Replace(e)] => e.clone(),
                other => panic!("{a}: {other:#?}"),
            }
        };
        assert_eq!(
            whole(&anchor(1)).attributes.first_str("title"),
            Some("Principal Engineer")
        );
        let mut members: Vec<String> = whole(&team)
            .get("member")
            .unwrap()
            .iter()
            .map(dn_ref)
            .collect();
        members.sort();
        let mut want: Vec<String> = [1, 2, 3, 4, 6]
            .iter()
            .map(|i| samba::user_dn(*i).to_ascii_lowercase())
            .collect();
        // Users 2 and 3 were renamed/moved and 4 deleted: AD updates the group's member values.
        want.retain(|d| !d.contains("000002") && !d.contains("000003") && !d.contains("000004"));
        want.push(format!("cn=renamed two,{}", samba::PEOPLE_OU.to_ascii_lowercase()));
        want.push(format!("cn=user 000003,{}", OTHER_OU.to_ascii_lowercase()));
        want.sort();
        assert_eq!(members, want);
        assert_eq!(
            whole(&anchor(2)).dn.unwrap().to_string().to_ascii_lowercase(),
            format!("cn=renamed two,{}", samba::PEOPLE_OU).to_ascii_lowercase()
        );
        assert!(whole(&anchor(3))
            .dn
            .unwrap()
            .to_string()
            .to_ascii_lowercase()
            .ends_with(&OTHER_OU.to_ascii_lowercase()));
        assert!(changes.iter().any(
            |c| matches!(c, Change::Replace(e) if e.attributes.first_str("sAMAccountName") == Some("user000100"))
        ));
        assert!(
            changes.iter().any(
                |c| matches!(c, Change::Delete { anchor: a, object_type } if *a == anchor(4) && object_type.is("user"))
            ),
            "{changes:#?}"
        );
        for i in [0, 5, 7] {
            assert!(
                changes.iter().all(|c| *c.anchor() != anchor(i)),
                "user {i}"
            );
        }
        let (none, _) = delta(&source, &w2).await.unwrap();
        assert!(none.is_empty(), "{none:#?}");

        // Another DC's database (another invocationId): USNs cannot be compared.
        let other = UsnWatermark {
            invocation_id: "6f1e2d3c-0000-1000-8000-00aa00bb00cc".into(),
            ..parsed
        };
        let e = delta(&source, &other.to_watermark()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidWatermark, "{e}");
        assert!(e.message().contains("invocationId"), "{e}");
        let e = delta(&source, &Watermark::new(DIRSYNC_WATERMARK, b"x".to_vec()))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidWatermark, "{e}");
    });
}

const RULES: &str = r#"
[[rule]]
name = "people"
source_type = "user"
target_type = "User"
join = [["userName"]]
deprovision = { action = "delete" }
[[rule.flow]]
target = "userName"
expression = 'ToLower([sAMAccountName])'
[[rule.flow]]
target = "title"
expression = '[title]'
[[rule]]
name = "groups"
source_type = "group"
target_type = "Group"
join = [["displayName"]]
deprovision = { action = "delete" }
[[rule.flow]]
target = "displayName"
expression = '[sAMAccountName]'
[[rule.flow]]
target = "members"
expression = '[member]'
reference = true
"#;

#[test]
fn engine_converges_through_full_and_delta_cycles() {
    if !enter("engine_converges_through_full_and_delta_cycles") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dc = SambaDc::start(dir.path()).unwrap();
    load_small(&dc, 10);
    runtime().block_on(async {
        let mut c = config(&dc, samba::PEOPLE_OU, DeltaMode::Dirsync);
        c.base_dn = dc.base_dn().to_owned();
        // Only our OUs' objects: built-in accounts stay out.
        c.filter = "(&(|(objectClass=user)(objectClass=group))(|(sAMAccountName=user0*)(sAMAccountName=Team)))".into();
        let target = MemoryTarget::new("app").unique_attribute("User", "userName");
        let config = EngineConfig {
            guard: dirsync::delta::DeletionGuard::off(),
            ..EngineConfig::default()
        };
        let mut sync = Synchronizer::new(
            Box::new(LdapSource::new(c)),
            Box::new(target.clone()),
            Box::new(MemoryStore::new()),
            Arc::new(RuleSet::from_toml(RULES, Some("rules.toml")).unwrap()),
            config,
        );
        let r = sync.run_cycle().await.unwrap();
        assert_eq!(r.count("create"), 11, "{r}");
        let users = |t: &MemoryTarget| {
            let mut v: Vec<(String, Option<String>)> = t
                .objects()
                .into_iter()
                .filter(|o| o.object_type.is("User"))
                .map(|o| {
                    (
                        o.attributes.first_str("userName").unwrap().to_owned(),
                        o.attributes.first_str("title").map(str::to_owned),
                    )
                })
                .collect();
            v.sort();
            v
        };
        let team_size = |t: &MemoryTarget| {
            t.objects()
                .into_iter()
                .find(|o| o.object_type.is("Group"))
                .and_then(|o| o.attributes.get("members").map(|m| m.len()))
                .unwrap_or(0)
        };
        assert_eq!(users(&target).len(), 10);
        assert_eq!(team_size(&target), 5);

        make_changes(&dc);
        let r = sync.run_cycle().await.unwrap();
        eprintln!("{r}");
        let now = users(&target);
        let names: Vec<&str> = now.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.len(), 10, "{now:?}");
        assert!(names.contains(&"user000100"));
        assert!(!names.contains(&"user000004"), "deleted");
        assert!(names.contains(&"user000002") && names.contains(&"user000003"));
        let title = |n: &str| now.iter().find(|(u, _)| u == n).unwrap().1.clone();
        assert_eq!(title("user000001").as_deref(), Some("Principal Engineer"));
        assert_eq!(title("user000005").as_deref(), Some("Engineer"));
        // Team: 0..5 minus 0 (removed) and 4 (deleted) plus 6.
        assert_eq!(team_size(&target), 4);
        // A cycle with no change does nothing.
        let r = sync.run_cycle().await.unwrap();
        assert_eq!(r.total_done(), 0, "{r}");
    });
}

/// Issue 14, failures 2 and 3, in one delta mode: `common::references_life_cycle` against a
/// Samba DC (the same life cycle runs on slapd with syncrepl in `tests/ldap_syncrepl.rs`).
fn references_life_cycle(mode: DeltaMode) {
    let dir = tempfile::tempdir().unwrap();
    let dc = SambaDc::start(dir.path()).unwrap();
    dc.ldbadd(&samba::ous_ldif()).unwrap();
    dc.ldbadd(&format!(
        "dn: {OTHER_OU}\nobjectClass: organizationalUnit\nou: Other\n\n"
    ))
    .unwrap();
    let dn = |cn: &str| format!("CN={cn},{}", samba::PEOPLE_OU);
    let user = |cn: &str, sam: &str, manager: Option<&str>| {
        let mut l = format!("dn: {}\nobjectClass: user\nsAMAccountName: {sam}\n", dn(cn));
        if let Some(m) = manager {
            l.push_str(&format!("manager: {}\n", dn(m)));
        }
        l + "\n"
    };
    dc.ldbadd(&format!(
        "{}{}{}{}{}dn: {}\nobjectClass: group\nsAMAccountName: lc-team\n\
         member: {}\nmember: {}\nmember: {}\nmember: {}\n\n",
        user("Boss", "lc-boss", None),
        user("Report", "lc-report", Some("Boss")),
        user("Mgr", "lc-mgr", None),
        user("Rep2", "lc-rep2", Some("Mgr")),
        user("Mem", "lc-mem", None),
        samba::group_dn("LcTeam"),
        dn("Boss"),
        dn("Report"),
        dn("Mgr"),
        dn("Mem")
    ))
    .unwrap();
    runtime().block_on(async {
        let mut c = config(&dc, dc.base_dn(), mode);
        c.filter = "(&(|(objectClass=user)(objectClass=group))(sAMAccountName=lc-*))".into();
        let target = MemoryTarget::new("app").unique_attribute("User", "userName");
        let rules = common::reference_rules("ToLower([sAMAccountName])", "[sAMAccountName]");
        let mut sync = Synchronizer::new(
            Box::new(LdapSource::new(c)),
            Box::new(target.clone()),
            Box::new(MemoryStore::new()),
            Arc::new(rules),
            EngineConfig {
                guard: dirsync::delta::DeletionGuard::off(),
                ..EngineConfig::default()
            },
        );
        let steps = common::ReferenceSteps {
            delete_boss: &|| dc.ldap_delete(&dn("Boss")).unwrap(),
            reuse_boss_dn: &|| {
                dc.ldapmodify(&format!(
                    "dn: {}\nchangetype: add\nobjectClass: user\nsAMAccountName: lc-boss2\n\n",
                    dn("Boss")
                ))
                .unwrap()
            },
            rename_and_move: &|| {
                dc.ldap_rename(&dn("Mem"), "CN=Mem Renamed", None).unwrap();
                dc.ldap_rename(&dn("Mgr"), "CN=Mgr Moved", Some(OTHER_OU))
                    .unwrap();
            },
            imported: None,
        };
        common::references_life_cycle(&mut sync, &target, &format!("{mode:?}"), steps).await;
    });
}

#[test]
fn references_follow_anchors_with_dirsync() {
    if !enter("references_follow_anchors_with_dirsync") {
        return;
    }
    references_life_cycle(DeltaMode::Dirsync);
}

#[test]
fn references_follow_anchors_with_usn_changed() {
    if !enter("references_follow_anchors_with_usn_changed") {
        return;
    }
    references_life_cycle(DeltaMode::UsnChanged);
}

/// Entra provisioning's policy, from a real AD (Samba, DirSync deltas) through the engine into a
/// real SCIM service (scim2-server): users who leave scope — one disabled in AD, one moved out of
/// the People OU — are deactivated (PATCH `active = false`) and stay linked; back in scope, the
/// same SCIM users are reactivated, though no flow writes `active`, and nothing is created; a user
/// deleted in AD is deleted. Two deprovisions of six users pass the default deletion guard (its
/// floor). Creates and deletes are counted over the whole life cycle.
#[cfg(feature = "scim")]
#[test]
fn deprovision_by_cause_deactivates_reactivates_and_deletes_in_scim() {
    use dirsync::connector::scim::{ScimAuth, ScimConfig, ScimTarget};
    use serde_json::Value as Json;

    if !enter("deprovision_by_cause_deactivates_reactivates_and_deletes_in_scim") {
        return;
    }
    const TOKEN: &str = "deprovision-token";
    let Some(srv) = common::scim2_server(TOKEN) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dc = SambaDc::start(dir.path()).unwrap();
    load_small(&dc, 6);
    // Enabled accounts without passwords: NORMAL_ACCOUNT | PASSWD_NOTREQD.
    let uac = |i: usize, v: u32| {
        dc.ldbmodify(&format!(
            "dn: {}\nchangetype: modify\nreplace: userAccountControl\nuserAccountControl: {v}\n",
            samba::user_dn(i)
        ))
        .unwrap()
    };
    for i in 0..6 {
        uac(i, 544);
    }
    const RULES: &str = r#"
[[rule]]
name = "people"
source_type = "user"
target_type = "User"
join = [["externalId"], ["userName"]]
deprovision = { left_scope = { action = "disable", set = { active = false } }, deleted = { action = "delete" } }

[rule.scope]
family = "connect-sync"
groups = [[
  { attribute = "userAccountControl", operator = "ISNOTBITSET", value = 2 },
  { attribute = "distinguishedName", operator = "ENDSWITH", value = "OU=People,DC=contoso,DC=test" },
]]

[[rule.flow]]
target = "externalId"
expression = '[objectGUID]'

[[rule.flow]]
target = "userName"
expression = 'ToLower([sAMAccountName])'
ignore_case = true

[[rule.flow]]
target = "displayName"
expression = '[displayName]'
"#;
    let base = srv.base.clone();
    let get = |path: String| {
        let base = base.clone();
        async move {
            let resp = reqwest::Client::new()
                .get(format!("{base}{path}"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Json>().await.unwrap_or(Json::Null))
        }
    };
    // userName → (id, active) of every SCIM user.
    let users = || async {
        let (_, j) = get("/Users?count=1000".into()).await;
        let mut v: Vec<(String, String, Json)> = j["Resources"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|u| {
                (
                    u["userName"].as_str().unwrap().to_owned(),
                    u["id"].as_str().unwrap().to_owned(),
                    u["active"].clone(),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    runtime().block_on(async {
        let mut c = config(&dc, dc.base_dn(), DeltaMode::Dirsync);
        c.filter = "(&(objectClass=user)(sAMAccountName=user0*))".into();
        let target = ScimTarget::new(ScimConfig {
            base_url: srv.base.clone(),
            auth: ScimAuth::Bearer {
                token: dirsync::connector::scim::Secret::new(TOKEN),
            },
            ..ScimConfig::default()
        })
        .unwrap();
        let mut sync = Synchronizer::new(
            Box::new(LdapSource::new(c)),
            Box::new(target),
            Box::new(MemoryStore::new()),
            Arc::new(RuleSet::from_toml(RULES, Some("rules.toml")).unwrap()),
            EngineConfig::default(),
        );
        let (mut creates, mut deletes) = (0, 0);
        async fn cycle(sync: &mut Synchronizer) -> dirsync::engine::RunReport {
            let r = sync.run_cycle().await.unwrap();
            assert!(r.failures.is_empty() && !r.held, "{r}");
            r
        }

        // Initial load: six users.
        let r = cycle(&mut sync).await;
        creates += r.count("create");
        assert_eq!(r.count("create"), 6, "{r}");
        let before = users().await;
        assert_eq!(before.len(), 6, "{before:?}");
        let id = |list: &[(String, String, Json)], i: usize| {
            let name = samba::user_sam(i);
            list.iter()
                .find(|(n, _, _)| *n == name)
                .map(|(_, id, a)| (id.clone(), a.clone()))
        };
        // Users 1 and 2 are the SCIM users of the initial load, with `active` as given.
        let same_users = |now: &[(String, String, Json)], active: bool| {
            assert_eq!(now.len(), 6, "{now:?}");
            for i in [1, 2] {
                let (was, _) = id(&before, i).unwrap();
                assert_eq!(id(now, i), Some((was, Json::Bool(active))), "user {i}");
            }
        };

        // User 1 disabled in AD, user 2 moved out of the People OU: deactivated, kept.
        uac(1, 546);
        dc.ldap_rename(&samba::user_dn(2), "CN=User 000002", Some(OTHER_OU))
            .unwrap();
        let r = cycle(&mut sync).await;
        creates += r.count("create");
        deletes += r.count("delete");
        assert_eq!((r.count("disable"), r.total_done()), (2, 2), "{r}");
        let now = users().await;
        same_users(&now, false);
        assert_eq!(
            id(&now, 0).unwrap().1,
            id(&before, 0).unwrap().1,
            "untouched"
        );
        // Still linked: a cycle with no change does nothing.
        let r = cycle(&mut sync).await;
        assert_eq!(r.total_done(), 0, "{r}");

        // Both back in scope: the same SCIM users, reactivated; nothing created.
        uac(1, 544);
        dc.ldap_rename(
            &format!("CN=User 000002,{OTHER_OU}"),
            "CN=User 000002",
            Some(samba::PEOPLE_OU),
        )
        .unwrap();
        let r = cycle(&mut sync).await;
        creates += r.count("create");
        deletes += r.count("delete");
        assert_eq!((r.count("update"), r.total_done()), (2, 2), "{r}");
        same_users(&users().await, true);

        // User 3 deleted in AD: deleted in the service.
        dc.ldap_delete(&samba::user_dn(3)).unwrap();
        let r = cycle(&mut sync).await;
        creates += r.count("create");
        deletes += r.count("delete");
        assert_eq!((r.count("delete"), r.total_done()), (1, 1), "{r}");
        let now = users().await;
        assert_eq!(now.len(), 5, "{now:?}");
        let (gone, _) = id(&before, 3).unwrap();
        assert_eq!(get(format!("/Users/{gone}")).await.0, 404);
        let r = cycle(&mut sync).await;
        assert_eq!(r.total_done(), 0, "{r}");

        // Over the life cycle: one create per user, one delete; no user created twice.
        assert_eq!((creates, deletes), (6, 1));
    });
}
