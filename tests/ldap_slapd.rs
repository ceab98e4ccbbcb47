//! The LDAP source against a real OpenLDAP slapd started by the test (testkit::slapd): paged
//! full import, a large group, TLS (ldaps:// and StartTLS) with verification, untrusted and
//! explicitly accepted certificates, binds, filter escaping, and the restart after a dropped
//! connection. Each test skips with a reason when slapd is not installed (unless
//! DIRSYNC_REQUIRE_SERVERS is set).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;

use dirsync::connector::ldap::{
    equality_filter, AnchorAttribute, LdapBind, LdapConnection, LdapSource, LdapSourceConfig,
};
use dirsync::connector::{ErrorKind, ImportItem, Secret, Source};
use dirsync::model::{Entry, Reference, Value};
use dirsync::testkit::servers::TestCa;
use dirsync::testkit::slapd::{users_and_groups_ldif, Slapd, SlapdOptions};
use futures::StreamExt;

const SUFFIX: &str = "dc=example,dc=test";
const USERS: usize = 2990;
const GROUPS: usize = 10;

fn start(users: usize, groups: usize) -> Option<Slapd> {
    let s = Slapd::start(SlapdOptions {
        ldif: Some(users_and_groups_ldif(SUFFIX, users, groups, true)),
        ..SlapdOptions::default()
    })
    .unwrap();
    if s.is_none() {
        eprintln!(
            "skipped: slapd is not installed (set DIRSYNC_REQUIRE_SERVERS to make this an error)"
        );
    }
    s
}

fn source_config(url: String) -> LdapSourceConfig {
    let mut c = LdapSourceConfig::new(LdapConnection::new(url), SUFFIX);
    c.anchor = AnchorAttribute::EntryUuid;
    c
}

fn root_bind(s: &Slapd) -> LdapBind {
    LdapBind::Simple {
        dn: s.root_dn(),
        password: Secret::new(s.root_password()),
    }
}

async fn import(source: &LdapSource) -> Result<Vec<Entry>, dirsync::connector::ConnectorError> {
    let mut stream = source.full_import().await?;
    let mut out = Vec::new();
    while let Some(item) = stream.next().await {
        match item? {
            ImportItem::Item(e) => out.push(e),
            ImportItem::Checkpoint(_) | ImportItem::Present(_) => {}
        }
    }
    Ok(out)
}

fn assert_unique_uuid_anchors(entries: &[Entry]) {
    let anchors: HashSet<&str> = entries.iter().map(|e| e.anchor.as_str()).collect();
    assert_eq!(anchors.len(), entries.len(), "duplicate anchors");
    for e in entries {
        assert_eq!(
            e.attributes
                .first_str("entryUUID")
                .map(str::to_lowercase)
                .as_deref(),
            Some(e.anchor.as_str()),
            "{e:?}"
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn full_import_pages_through_thousands_of_entries() {
    let Some(slapd) = start(USERS, GROUPS) else {
        return;
    };
    let source = LdapSource::new(source_config(slapd.url()));
    let entries = import(&source).await.unwrap();
    assert_eq!(entries.len(), USERS + GROUPS);
    // The suffix and the two OUs are not mapped.
    assert_eq!(source.skipped(), 3);
    assert_unique_uuid_anchors(&entries);
    let users: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.object_type.as_str() == "user")
        .collect();
    assert_eq!(users.len(), USERS);
    let u = entries
        .iter()
        .find(|e| e.attributes.first_str("uid") == Some("user001234"))
        .unwrap();
    assert_eq!(
        u.attributes.first_str("mail"),
        Some("user1234@example.test")
    );
    assert_eq!(u.attributes.first_str("employeeNumber"), Some("E001234"));
    assert_eq!(
        u.dn.as_ref().unwrap().to_string(),
        format!("uid=user001234,ou=People,{SUFFIX}")
    );
    // group0000 has every user: more than AD's 1,500-value range, whole.
    let big = entries
        .iter()
        .find(|e| e.attributes.first_str("cn") == Some("group0000"))
        .unwrap();
    assert_eq!(big.object_type.as_str(), "group");
    let members = big.get("member").unwrap();
    assert_eq!(members.len(), USERS);
    assert!(members
        .iter()
        .all(|m| matches!(m, Value::Reference(Reference::Dn(_)))));
    let small = entries
        .iter()
        .find(|e| e.attributes.first_str("cn") == Some("group0003"))
        .unwrap();
    assert_eq!(small.get("member").unwrap().len(), USERS / GROUPS);
}

#[tokio::test(flavor = "current_thread")]
async fn attribute_selection_and_page_size() {
    let Some(slapd) = start(250, 2) else {
        return;
    };
    let mut c = source_config(slapd.url());
    c.attributes = vec!["cn".into(), "mail".into()];
    c.connection.page_size = 7;
    let entries = import(&LdapSource::new(c)).await.unwrap();
    assert_eq!(entries.len(), 252);
    for e in &entries {
        let names: Vec<&str> = e.attributes.iter().map(|(n, _)| n.as_str()).collect();
        for n in &names {
            assert!(
                ["cn", "mail", "objectClass", "entryUUID"]
                    .iter()
                    .any(|k| k.eq_ignore_ascii_case(n)),
                "unexpected attribute {n} in {names:?}"
            );
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn tls_with_verification_ldaps_and_starttls() {
    let Some(slapd) = start(20, 1) else {
        return;
    };
    // ldaps:// with the test CA, simple bind.
    let mut c = source_config(slapd.ldaps_url());
    c.connection.tls.ca_file = Some(slapd.ca_file().to_path_buf());
    c.connection.bind = root_bind(&slapd);
    assert_eq!(import(&LdapSource::new(c)).await.unwrap().len(), 21);
    // StartTLS on ldap://, simple bind allowed because the connection is protected.
    let mut c = source_config(slapd.url());
    c.connection.starttls = true;
    c.connection.tls.ca_file = Some(slapd.ca_file().to_path_buf());
    c.connection.bind = root_bind(&slapd);
    assert_eq!(import(&LdapSource::new(c)).await.unwrap().len(), 21);
}

#[tokio::test(flavor = "current_thread")]
async fn untrusted_certificate_fails_unless_explicitly_accepted() {
    let Some(slapd) = start(5, 1) else {
        return;
    };
    let other = tempfile::tempdir().unwrap();
    let other_ca = TestCa::generate(other.path(), &[]).unwrap();
    for starttls in [false, true] {
        let url = if starttls {
            slapd.url()
        } else {
            slapd.ldaps_url()
        };
        let mut c = source_config(url);
        c.connection.starttls = starttls;
        c.connection.tls.ca_file = Some(other_ca.ca_cert.clone());
        let e = LdapSource::new(c.clone())
            .full_import()
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
        assert!(e.message().contains("TLS"), "{e}");
        assert!(e.message().contains("tls.ca_file"), "{e}");
        assert!(!e.is_retryable());
        c.connection.tls.danger_accept_invalid_certs = true;
        assert_eq!(import(&LdapSource::new(c)).await.unwrap().len(), 6);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn binds_cleartext_refusal_and_wrong_password() {
    let Some(slapd) = start(5, 1) else {
        return;
    };
    let mut c = source_config(slapd.url());
    c.connection.bind = root_bind(&slapd);
    let e = LdapSource::new(c.clone())
        .full_import()
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.message().contains("cleartext"), "{e}");
    c.connection.allow_cleartext_bind = true;
    assert_eq!(import(&LdapSource::new(c.clone())).await.unwrap().len(), 6);
    c.connection.bind = LdapBind::Simple {
        dn: slapd.root_dn(),
        password: Secret::new("wrong-password"),
    };
    let e = LdapSource::new(c).full_import().await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    assert!(e.message().contains("invalidCredentials"), "{e}");
    assert!(!e.to_string().contains("wrong-password"), "{e}");
}

#[tokio::test(flavor = "current_thread")]
async fn sasl_external_over_ldapi() {
    let Some(slapd) = start(5, 1) else {
        return;
    };
    let mut c = source_config(slapd.ldapi_url());
    c.connection.bind = LdapBind::SaslExternal;
    assert_eq!(import(&LdapSource::new(c.clone())).await.unwrap().len(), 6);
    // A simple bind over the local socket is not refused as cleartext.
    c.connection.bind = root_bind(&slapd);
    assert_eq!(import(&LdapSource::new(c)).await.unwrap().len(), 6);
    // SASL EXTERNAL over plain TCP carries no identity: the server refuses it.
    let mut c = source_config(slapd.url());
    c.connection.bind = LdapBind::SaslExternal;
    let e = LdapSource::new(c).full_import().await.err().unwrap();
    assert!(e.message().contains("SASL EXTERNAL"), "{e}");
}

#[tokio::test(flavor = "current_thread")]
async fn filters_built_from_values_are_escaped() {
    let Some(slapd) = start(30, 1) else {
        return;
    };
    slapd
        .ldapadd(&format!(
            "dn: uid=odd,ou=People,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: odd\n\
             cn: odd*(name)\\x\nsn: odd\n"
        ))
        .unwrap();
    let run = |filter: String| {
        let mut c = source_config(slapd.url());
        c.filter = filter;
        async move { import(&LdapSource::new(c)).await }
    };
    // Unescaped, the star is a wildcard: ten users match.
    assert_eq!(run("(cn=User 00001*)".into()).await.unwrap().len(), 10);
    // Escaped, it is a literal star: nobody has it.
    assert_eq!(
        run(equality_filter("cn", "User 00001*"))
            .await
            .unwrap()
            .len(),
        0
    );
    // A value full of filter syntax matches exactly its entry.
    let odd = run(equality_filter("cn", "odd*(name)\\x")).await.unwrap();
    assert_eq!(odd.len(), 1);
    assert_eq!(odd[0].attributes.first_str("uid"), Some("odd"));
    // Pasted raw, the same value is not a valid filter: a configuration error.
    let e = run("(cn=odd*(name)\\x)".into()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_dropped_connection_restarts_the_import_without_duplicates() {
    let Some(mut slapd) = start(USERS, GROUPS) else {
        return;
    };
    let source = LdapSource::new(source_config(slapd.url()));
    let mut stream = source.full_import().await.unwrap();
    let mut entries = Vec::new();
    while entries.len() < 1500 {
        match stream.next().await.unwrap().unwrap() {
            ImportItem::Item(e) => entries.push(e),
            ImportItem::Checkpoint(_) | ImportItem::Present(_) => {}
        }
    }
    // The server dies mid-import and comes back on the same ports and data.
    slapd.restart().unwrap();
    while let Some(item) = stream.next().await {
        if let ImportItem::Item(e) = item.unwrap() {
            entries.push(e);
        }
    }
    assert_eq!(source.reconnects(), 1);
    assert_eq!(entries.len(), USERS + GROUPS);
    assert_unique_uuid_anchors(&entries);

    // Without reconnects the import fails with a retryable error.
    let mut c = source_config(slapd.url());
    c.max_reconnects = 0;
    let source = LdapSource::new(c);
    let mut stream = source.full_import().await.unwrap();
    let mut seen = 0;
    while seen < 1500 {
        stream.next().await.unwrap().unwrap();
        seen += 1;
    }
    slapd.kill();
    let mut failed = None;
    while let Some(item) = stream.next().await {
        if let Err(e) = item {
            failed = Some(e);
        }
    }
    let e = failed.expect("the import must fail when the server is gone");
    assert!(e.is_retryable(), "{e}");
    assert_eq!(source.reconnects(), 0);
}

/// Anchoring on an attribute the directory does not keep unique (`employeeNumber`): when two
/// entries come to share one, the full import stops with an error naming the anchor and both
/// DNs, and nothing of it is applied — the mirror and the target are as before, the watermark
/// is not advanced — in both state stores, whether the two entries arrive in one import batch
/// or in two. A fresh state refuses the same way (nothing mirrored, nothing created). Once the
/// directory is fixed, the next run goes through and changes nothing.
#[tokio::test(flavor = "current_thread")]
async fn two_entries_with_one_anchor_stop_the_import() {
    use std::sync::Arc;

    use dirsync::connector::memory::MemoryTarget;
    use dirsync::engine::{EngineConfig, EngineError, Synchronizer};
    use dirsync::model::Anchor;
    use dirsync::rules::ruleset::{RuleBuilder, RuleSet};
    use dirsync::state::{MemoryStore, SqliteStore, StateStore};

    let Some(slapd) = start(5, 0) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rules = Arc::new(
        RuleSet::builder()
            .rule(
                RuleBuilder::new("users", "user", "User")
                    .flow("userName", "[uid]")
                    .flow("employeeNumber", "[employeeNumber]")
                    .join(["userName"]),
            )
            .build()
            .unwrap(),
    );
    let make = |store: Box<dyn StateStore>, import_batch: usize| {
        let mut config = source_config(slapd.url());
        config.anchor = AnchorAttribute::Attribute("employeeNumber".into());
        let target = MemoryTarget::new("app");
        let sync = Synchronizer::new(
            Box::new(LdapSource::new(config)),
            Box::new(target.clone()),
            store,
            rules.clone(),
            EngineConfig {
                import_batch,
                ..EngineConfig::default()
            },
        );
        (sync, target)
    };
    let stores: Vec<(&str, Box<dyn StateStore>, usize)> = vec![
        ("memory, one batch", Box::new(MemoryStore::new()), 1000),
        (
            "sqlite, batches of 2",
            Box::new(SqliteStore::open(dir.path().join("state.sqlite")).unwrap()),
            2,
        ),
    ];
    let mut synced = Vec::new();
    for (name, store, batch) in stores {
        let (mut sync, target) = make(store, batch);
        let report = sync.run_cycle().await.unwrap();
        assert_eq!(report.count("create"), 5, "{name}: {report}");
        synced.push((name, sync, target));
    }

    // user000004 takes user000001's employee number.
    let user = |i: usize| format!("uid=user{i:06},ou=People,{SUFFIX}");
    slapd
        .ldapmodify(&format!(
            "dn: {}\nchangetype: modify\nreplace: employeeNumber\nemployeeNumber: E000001\n",
            user(4)
        ))
        .unwrap();
    for (name, sync, target) in &mut synced {
        let (fingerprint, watermark) =
            sync.with_store(|s| (s.fingerprint().unwrap(), s.watermark("ldap").unwrap()));
        let objects = target.objects();
        let err = sync.run_cycle().await.unwrap_err();
        let EngineError::DuplicateAnchor {
            anchor,
            first,
            second,
            ..
        } = &err
        else {
            panic!("{name}: {err}");
        };
        assert_eq!(
            (anchor.as_str(), first.as_str(), second.as_str()),
            ("E000001", user(1).as_str(), user(4).as_str()),
            "{name}"
        );
        let text = err.to_string();
        assert!(
            text.contains("E000001") && text.contains(&user(1)) && text.contains(&user(4)),
            "{name}: {text}"
        );
        sync.with_store(|s| {
            assert_eq!(s.fingerprint().unwrap(), fingerprint, "{name}");
            let e1 = s.source_entry(&Anchor::new("E000001")).unwrap().unwrap();
            assert_eq!(e1.dn.unwrap().to_string(), user(1), "{name}");
            assert!(
                s.source_entry(&Anchor::new("E000004")).unwrap().is_some(),
                "{name}"
            );
            let after = s.watermark("ldap").unwrap();
            assert!(after.is_none() || after == watermark, "{name}: {after:?}");
            assert!(s.dirty().unwrap().is_empty(), "{name}");
        });
        assert_eq!(target.objects(), objects, "{name}");
    }

    // A fresh state refuses the same way.
    let (mut fresh, fresh_target) = make(Box::new(MemoryStore::new()), 1000);
    assert!(matches!(
        fresh.run_cycle().await,
        Err(EngineError::DuplicateAnchor { .. })
    ));
    fresh.with_store(|s| assert!(s.load_all().unwrap().mirror.is_empty()));
    assert!(fresh_target.is_empty());

    // Fixed in the directory: the next run goes through, with nothing to change.
    slapd
        .ldapmodify(&format!(
            "dn: {}\nchangetype: modify\nreplace: employeeNumber\nemployeeNumber: E000004\n",
            user(4)
        ))
        .unwrap();
    for (name, sync, target) in &mut synced {
        let objects = target.objects();
        let report = sync.run_cycle().await.unwrap();
        assert_eq!(report.total_done(), 0, "{name}: {report}");
        assert_eq!(target.objects(), objects, "{name}");
    }
}
