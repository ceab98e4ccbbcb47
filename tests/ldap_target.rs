//! The LDAP target against real servers started by the test: OpenLDAP slapd (create, value-level
//! and replace updates, rename by a change of the naming attribute, move to another parent,
//! delete, already-exists then a join lookup, missing objects, schema violations naming the DN
//! and attribute, secrets kept out of errors, a fresh state joining every entry the directory
//! holds, with the operations counted by cn=Monitor) and Samba AD in a network namespace of its own
//! (a user created with unicodePwd who can then bind, the refusal of unicodePwd over a cleartext
//! connection, disabling through userAccountControl). Each test skips with a reason when its
//! server is not installed (unless DIRSYNC_REQUIRE_SERVERS is set).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use dirsync::connector::ldap::{
    connect, Directory, LdapBind, LdapConnection, LdapTarget, LdapTargetConfig,
};
use dirsync::connector::{ErrorKind, Secret, Target, TargetOperation};
use dirsync::model::{
    AttributeChange, Attributes, Dn, ObjectType, Reference, TargetId, Value, Values,
};
use dirsync::testkit::samba::{self, SambaDc};
use dirsync::testkit::slapd::{Slapd, SlapdOptions};
use futures::StreamExt;
use std::sync::Arc;

const SUFFIX: &str = "dc=example,dc=test";

fn start() -> Option<Slapd> {
    let s = Slapd::start(SlapdOptions {
        ldif: Some(format!(
            "dn: ou=People,{SUFFIX}\nobjectClass: organizationalUnit\nou: People\n\n\
             dn: ou=Groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: Groups\n\n\
             dn: ou=Former,{SUFFIX}\nobjectClass: organizationalUnit\nou: Former\n"
        )),
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

fn target(s: &Slapd) -> LdapTarget {
    let mut conn = LdapConnection::new(s.ldaps_url());
    conn.tls.ca_file = Some(s.ca_file().to_path_buf());
    conn.bind = LdapBind::Simple {
        dn: s.root_dn(),
        password: Secret::new(s.root_password()),
    };
    let mut c = LdapTargetConfig::new(conn)
        .with_object_type(
            "user",
            "uid",
            Dn::parse(&format!("ou=People,{SUFFIX}")).unwrap(),
            ["top", "person", "organizationalPerson", "inetOrgPerson"],
        )
        .with_object_type(
            "group",
            "cn",
            Dn::parse(&format!("ou=Groups,{SUFFIX}")).unwrap(),
            ["top", "groupOfNames"],
        );
    c.base_dn = Some(SUFFIX.to_owned());
    LdapTarget::new(c)
}

fn attrs(pairs: &[(&str, &str)]) -> Attributes {
    let mut a = Attributes::new();
    for (k, v) in pairs {
        a.add(*k, Value::string(*v));
    }
    a
}

fn user() -> ObjectType {
    ObjectType::new("user")
}

async fn one(
    t: &LdapTarget,
    op: TargetOperation,
) -> Result<TargetId, dirsync::connector::ConnectorError> {
    t.apply(std::slice::from_ref(&op))
        .await
        .pop()
        .unwrap()
        .map(|a| a.id)
}

fn create(ty: &str, a: Attributes) -> TargetOperation {
    TargetOperation::Create {
        object_type: ty.into(),
        attributes: a,
    }
}

fn update(ty: &str, id: &TargetId, changes: Vec<AttributeChange>) -> TargetOperation {
    TargetOperation::Update {
        id: id.clone(),
        object_type: ty.into(),
        changes,
    }
}

fn texts(v: Option<&Values>) -> Vec<String> {
    let mut out: Vec<String> = v
        .map(|v| v.iter().map(Value::to_text).collect())
        .unwrap_or_default();
    out.sort();
    out
}

#[tokio::test]
async fn create_update_rename_move_delete() {
    let Some(s) = start() else { return };
    let t = target(&s);
    let id = one(
        &t,
        create(
            "user",
            attrs(&[
                ("uid", "jdoe"),
                ("cn", "Jane Doe"),
                ("sn", "Doe"),
                ("mail", "jane@example.test"),
            ]),
        ),
    )
    .await
    .unwrap();
    assert_eq!(id.as_str(), "uid=jdoe,ou=people,dc=example,dc=test");
    let o = t.get(&user(), &id).await.unwrap().unwrap();
    assert_eq!(texts(o.attributes.get("mail")), ["jane@example.test"]);

    // Value-level add and delete, and a replace, in one modify.
    let id2 = one(
        &t,
        update(
            "user",
            &id,
            vec![
                AttributeChange::add("mail", Values::one("j.doe@example.test")),
                AttributeChange::remove("mail", Values::one("jane@example.test")),
                AttributeChange::replace("title", Values::one("Engineer")),
            ],
        ),
    )
    .await
    .unwrap();
    assert_eq!(id2, id);
    let o = t.get(&user(), &id).await.unwrap().unwrap();
    assert_eq!(texts(o.attributes.get("mail")), ["j.doe@example.test"]);
    assert_eq!(texts(o.attributes.get("title")), ["Engineer"]);
    // Adding a present value: the server's attributeOrValueExists, naming DN and attribute.
    let e = one(
        &t,
        update(
            "user",
            &id,
            vec![AttributeChange::add(
                "mail",
                Values::one("j.doe@example.test"),
            )],
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ValueExists, "{e}");
    assert!(
        e.message().contains("uid=jdoe") && e.message().contains("mail"),
        "{e}"
    );

    // A group referencing the user by target id reads back the reference.
    let mut g = attrs(&[("cn", "Staff")]);
    g.add("member", Value::target_ref(id.as_str()));
    let gid = one(&t, create("group", g)).await.unwrap();
    let go = t.get(&"group".into(), &gid).await.unwrap().unwrap();
    assert_eq!(
        go.attributes.get("member").unwrap().first(),
        Some(&Value::Reference(Reference::Target(id.clone())))
    );

    // Rename by changing the naming attribute: the outcome carries the new id.
    let renamed = one(
        &t,
        update(
            "user",
            &id,
            vec![AttributeChange::replace("uid", Values::one("jdoe2"))],
        ),
    )
    .await
    .unwrap();
    assert_eq!(renamed.as_str(), "uid=jdoe2,ou=people,dc=example,dc=test");
    assert!(t.get(&user(), &id).await.unwrap().is_none());
    let o = t.get(&user(), &renamed).await.unwrap().unwrap();
    assert_eq!(texts(o.attributes.get("uid")), ["jdoe2"]);
    assert_eq!(texts(o.attributes.get("title")), ["Engineer"]);

    // Move to another parent (with an attribute change in the same update).
    let moved = one(
        &t,
        update(
            "user",
            &renamed,
            vec![
                AttributeChange::replace("parent", Values::one(format!("ou=Former,{SUFFIX}"))),
                AttributeChange::replace("title", Values::one("Alumna")),
            ],
        ),
    )
    .await
    .unwrap();
    assert_eq!(moved.as_str(), "uid=jdoe2,ou=former,dc=example,dc=test");
    let o = t.get(&user(), &moved).await.unwrap().unwrap();
    assert_eq!(texts(o.attributes.get("title")), ["Alumna"]);

    // Rename and move at once with an explicit dn.
    let both = one(
        &t,
        update(
            "user",
            &moved,
            vec![AttributeChange::replace(
                "dn",
                Values::one(format!("uid=jd,ou=People,{SUFFIX}")),
            )],
        ),
    )
    .await
    .unwrap();
    assert_eq!(both.as_str(), "uid=jd,ou=people,dc=example,dc=test");

    // read pages through the base and returns only the type's objects.
    let all: Vec<_> = t.read(&user()).await.unwrap().collect::<Vec<_>>().await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].as_ref().unwrap().id, both);
    let groups: Vec<_> = t
        .read(&"group".into())
        .await
        .unwrap()
        .collect::<Vec<_>>()
        .await;
    assert_eq!(groups.len(), 1);

    // Delete; a second delete (and an update) of the missing object is NotFound.
    one(
        &t,
        TargetOperation::Delete {
            id: gid.clone(),
            object_type: "group".into(),
        },
    )
    .await
    .unwrap();
    one(
        &t,
        TargetOperation::Delete {
            id: both.clone(),
            object_type: user(),
        },
    )
    .await
    .unwrap();
    let e = one(
        &t,
        TargetOperation::Delete {
            id: both.clone(),
            object_type: user(),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert_eq!(e.object(), Some(both.as_str()));
    let e = one(
        &t,
        update(
            "user",
            &both,
            vec![AttributeChange::replace("title", Values::one("x"))],
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.message().contains("uid=jd"), "{e}");
}

#[tokio::test]
async fn already_exists_then_find_joins_it() {
    let Some(s) = start() else { return };
    let t = target(&s);
    let a = attrs(&[
        ("uid", "x*y"),
        ("cn", "Star (1)"),
        ("sn", "S"),
        ("mail", "star@example.test"),
    ]);
    let id = one(&t, create("user", a.clone())).await.unwrap();
    let e = one(&t, create("user", a)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert_eq!(e.object(), Some(id.as_str()));
    // The join lookup the engine does next; values are escaped (a `*` is not a wildcard).
    let found = t
        .find(&user(), &"cn".into(), &Value::string("Star (1)"))
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, id);
    let none = t
        .find(&user(), &"uid".into(), &Value::string("x*"))
        .await
        .unwrap();
    assert!(none.is_empty());
    let by_mail = t
        .find(&user(), &"mail".into(), &Value::string("STAR@example.test"))
        .await
        .unwrap();
    assert_eq!(
        by_mail.len(),
        1,
        "equality matching ignores case as the schema says"
    );
    let by_dn = t
        .find(&user(), &"dn".into(), &Value::string(id.as_str()))
        .await
        .unwrap();
    assert_eq!(by_dn.len(), 1);
}

#[tokio::test]
async fn schema_violations_name_dn_and_attribute_and_secrets_stay_hidden() {
    let Some(s) = start() else { return };
    let t = target(&s);
    const PW: &str = "Hunter2-Very-Secret";
    // An undefined attribute: the add fails, naming the DN and the attribute, never the password.
    let mut a = attrs(&[
        ("uid", "bad"),
        ("cn", "Bad"),
        ("sn", "B"),
        ("notAnAttribute", "1"),
    ]);
    a.add("userPassword", Value::string(PW));
    let op = create("user", a);
    let e = one(&t, op).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Constraint, "{e}");
    assert!(e.message().contains("uid=bad,ou=People"), "{e}");
    assert!(e.message().contains("notAnAttribute"), "{e}");
    assert!(
        !e.to_string().contains(PW) && !format!("{e:?}").contains(PW),
        "{e:?}"
    );

    // A missing required attribute (inetOrgPerson needs sn): object class violation.
    let e = one(
        &t,
        create("user", attrs(&[("uid", "nosn"), ("cn", "No Sn")])),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Constraint, "{e}");
    assert!(
        e.message().contains("uid=nosn") && e.message().contains("sn"),
        "{e}"
    );

    // A good user with a password: it is stored (the user can bind), not read back.
    let mut a = attrs(&[("uid", "pw"), ("cn", "Pw"), ("sn", "P")]);
    a.add("userPassword", Value::string(PW));
    let id = one(&t, create("user", a)).await.unwrap();
    let o = t.get(&user(), &id).await.unwrap().unwrap();
    assert!(!o.attributes.contains("userPassword"));
    assert!(!format!("{o:?}").contains(PW));
    let mut c = LdapConnection::new(s.ldaps_url());
    c.tls.ca_file = Some(s.ca_file().to_path_buf());
    c.bind = LdapBind::Simple {
        dn: format!("uid=pw,ou=People,{SUFFIX}"),
        password: Secret::new(PW),
    };
    connect(&c).await.unwrap().close().await;
    c.bind = LdapBind::Simple {
        dn: format!("uid=pw,ou=People,{SUFFIX}"),
        password: Secret::new("wrong"),
    };
    assert_eq!(connect(&c).await.unwrap_err().kind(), ErrorKind::Auth);
    // A replace of a value with an invalid syntax names the attribute.
    let e = one(
        &t,
        update(
            "user",
            &id,
            vec![AttributeChange::replace("manager", Values::one("not a dn"))],
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Constraint, "{e}");
    assert!(e.message().contains("manager"), "{e}");
    // The target's and its configuration's Debug show no bind password.
    let mut conn = LdapConnection::new(s.ldaps_url());
    conn.bind = LdapBind::Simple {
        dn: s.root_dn(),
        password: Secret::new(PW),
    };
    let cfg = LdapTargetConfig::new(conn);
    assert!(!format!("{cfg:?}").contains(PW));
    assert!(!format!("{:?}", LdapTarget::new(cfg)).contains(PW));
}

/// Whether the Samba test should go on here.
fn enter(test_name: &str) -> bool {
    if let Some(reason) = samba::skip_reason().unwrap() {
        eprintln!("{reason}");
        return false;
    }
    samba::in_own_netns(test_name).unwrap()
}

fn ad_target(dc: &SambaDc, url: &str, protected_ca: bool) -> LdapTarget {
    let mut conn = LdapConnection::new(url);
    if protected_ca {
        conn.tls.ca_file = Some(dc.ca_file().to_path_buf());
    } else {
        conn.allow_cleartext_bind = true;
    }
    conn.bind = LdapBind::Simple {
        dn: dc.admin_dn().to_owned(),
        password: Secret::new(dc.admin_password()),
    };
    let mut c = LdapTargetConfig::new(conn).with_object_type(
        "user",
        "cn",
        Dn::parse(samba::PEOPLE_OU).unwrap(),
        ["top", "person", "organizationalPerson", "user"],
    );
    c.directory = Directory::Ad;
    c.base_dn = Some(samba::BASE_DN.to_owned());
    LdapTarget::new(c)
}

#[test]
fn ad_user_with_password_can_bind_and_is_disabled_through_user_account_control() {
    if !enter("ad_user_with_password_can_bind_and_is_disabled_through_user_account_control") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dc = SambaDc::start(dir.path()).unwrap();
    dc.ldbadd(&samba::ous_ldif()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        const PW: &str = "Ad-Target-Passw0rd!";
        let mut a = attrs(&[
            ("cn", "Target User"),
            ("sAMAccountName", "tuser"),
            ("userPrincipalName", "tuser@contoso.test"),
            ("givenName", "Target"),
        ]);
        a.add("unicodePwd", Value::string(PW));
        a.add("accountEnabled", Value::Boolean(true));

        // Over cleartext the password is refused before anything is sent.
        let plain = ad_target(&dc, dc.ldap_url(), false);
        let e = one(&plain, create("user", a.clone())).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        assert!(
            e.message().contains("unicodePwd") && !e.to_string().contains(PW),
            "{e}"
        );

        let t = ad_target(&dc, dc.ldaps_url(), true);
        let id = one(&t, create("user", a)).await.unwrap();
        assert_eq!(id.as_str(), "cn=target user,ou=people,dc=contoso,dc=test");
        let o = t.get(&user(), &id).await.unwrap().unwrap();
        assert_eq!(
            o.attributes.first("accountEnabled"),
            Some(&Value::Boolean(true))
        );
        let uac: i64 = o
            .attributes
            .first_str("userAccountControl")
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(uac & 2, 0, "uac {uac}");

        // The user binds with the password the target set.
        let mut c = LdapConnection::new(dc.ldaps_url());
        c.tls.ca_file = Some(dc.ca_file().to_path_buf());
        c.bind = LdapBind::Simple {
            dn: "tuser@contoso.test".into(),
            password: Secret::new(PW),
        };
        connect(&c).await.unwrap().close().await;

        // Disable: only the ACCOUNTDISABLE bit changes; the user can no longer bind.
        one(
            &t,
            update(
                "user",
                &id,
                vec![AttributeChange::replace(
                    "accountEnabled",
                    Values::one(false),
                )],
            ),
        )
        .await
        .unwrap();
        let o = t.get(&user(), &id).await.unwrap().unwrap();
        assert_eq!(
            o.attributes.first("accountEnabled"),
            Some(&Value::Boolean(false))
        );
        let after: i64 = o
            .attributes
            .first_str("userAccountControl")
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(after, uac | 2);
        assert_eq!(connect(&c).await.unwrap_err().kind(), ErrorKind::Auth);
        // Enable again.
        one(
            &t,
            update(
                "user",
                &id,
                vec![AttributeChange::replace(
                    "accountEnabled",
                    Values::one(true),
                )],
            ),
        )
        .await
        .unwrap();
        connect(&c).await.unwrap().close().await;
        // A duplicate create: AlreadyExists, and the join lookup finds it by sAMAccountName.
        let e = one(
            &t,
            create(
                "user",
                attrs(&[("cn", "Target User"), ("sAMAccountName", "tuser2")]),
            ),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
        let found = t
            .find(&user(), &"sAMAccountName".into(), &Value::string("tuser"))
            .await
            .unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, id);
    });
    drop(dc);
}

// ---------------------------------------------------------------------------------------------
// A fresh state against a directory that already holds the objects (issue 14, failure 7).

/// The completed operations slapd counts (cn=Operations,cn=Monitor), by operation name.
fn completed_operations(s: &Slapd) -> std::collections::BTreeMap<String, u64> {
    let text = s
        .ldapsearch(
            "cn=Operations,cn=Monitor",
            "(monitorOpCompleted=*)",
            &["monitorOpCompleted"],
        )
        .unwrap();
    let mut ops = std::collections::BTreeMap::new();
    let mut name = String::new();
    for line in text.lines() {
        if let Some(dn) = line.strip_prefix("dn: cn=") {
            name = dn.split(',').next().unwrap_or_default().to_string();
        } else if let Some(n) = line.strip_prefix("monitorOpCompleted: ") {
            ops.insert(name.clone(), n.trim().parse().unwrap());
        }
    }
    ops
}

/// The operations of `op` completed between two readings of [`completed_operations`]: a
/// reading's own search completes after it is read, so the first reading's search is counted
/// in the second, and taken off here.
fn delta(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
    op: &str,
) -> u64 {
    let own = u64::from(op == "Search");
    after.get(op).copied().unwrap_or(0) - before.get(op).copied().unwrap_or(0) - own
}

const JOIN_RULES: &str = r#"
[[rule]]
name = "people"
source_type = "user"
target_type = "user"
join = [["mail"]]
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
expression = '[mail]'

[[rule]]
name = "groups"
source_type = "group"
target_type = "group"
join = [["cn"]]
[[rule.flow]]
target = "cn"
expression = '[cn]'
[[rule.flow]]
target = "member"
expression = '[member]'
reference = true
"#;

fn person(i: usize) -> dirsync::model::Entry {
    dirsync::model::Entry::new(format!("p{i}"), "user")
        .with("uid", format!("person{i}"))
        .with("cn", format!("Person {i}"))
        .with("sn", format!("P{i}"))
        .with("mail", format!("person{i}@example.test"))
}

fn staff(name: &str, members: std::ops::Range<usize>) -> dirsync::model::Entry {
    let mut g = dirsync::model::Entry::new(format!("g-{name}"), "group").with("cn", name);
    for m in members {
        g = g.with("member", Value::anchor_ref(format!("p{m}")));
    }
    g
}

#[tokio::test]
async fn a_fresh_state_joins_every_entry_the_directory_already_holds() {
    use dirsync::connector::memory::MemorySource;
    use dirsync::engine::{EngineConfig, Synchronizer};
    use dirsync::rules::ruleset::RuleSet;
    use dirsync::state::MemoryStore;
    // Another tool provisioned 30 people and two groups under ou=Legacy — not where dirsync
    // creates them, so no DN would collide: nothing but a lookup can find them.
    let mut legacy = format!(
        "dn: ou=People,{SUFFIX}\nobjectClass: organizationalUnit\nou: People\n\n\
         dn: ou=Groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: Groups\n\n\
         dn: ou=Legacy,{SUFFIX}\nobjectClass: organizationalUnit\nou: Legacy\n\n"
    );
    for i in 0..30 {
        // One person's cn was spelled otherwise: the join brings it in line.
        let cn = if i == 4 {
            "P. Four".to_string()
        } else {
            format!("Person {i}")
        };
        legacy += &format!(
            "dn: uid=person{i},ou=Legacy,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: person{i}\n\
             cn: {cn}\nsn: P{i}\nmail: person{i}@example.test\n\n"
        );
    }
    for (name, members) in [("Staff", 0..20), ("Sales", 20..30)] {
        legacy +=
            &format!("dn: cn={name},ou=Legacy,{SUFFIX}\nobjectClass: groupOfNames\ncn: {name}\n");
        for m in members {
            legacy += &format!("member: uid=person{m},ou=Legacy,{SUFFIX}\n");
        }
        legacy.push('\n');
    }
    let Some(s) = Slapd::start(SlapdOptions {
        ldif: Some(legacy),
        extra_database_config: "database monitor\naccess to * by * read\n".into(),
        ..SlapdOptions::default()
    })
    .unwrap() else {
        eprintln!("skipped: slapd is not installed");
        return;
    };
    let source = MemorySource::new("hr");
    for i in 0..30 {
        source.add(person(i)).unwrap();
    }
    source.add(staff("Staff", 0..20)).unwrap();
    source.add(staff("Sales", 20..30)).unwrap();
    let engine = |source: &MemorySource| {
        Synchronizer::new(
            Box::new(source.clone()),
            Box::new(target(&s)),
            Box::new(MemoryStore::new()),
            Arc::new(RuleSet::from_toml(JOIN_RULES, Some("rules.toml")).unwrap()),
            EngineConfig::default(),
        )
    };
    let before = completed_operations(&s);
    let mut sync = engine(&source);
    let r = sync.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{r}");
    assert_eq!((r.count("create"), r.count("join")), (0, 32), "{r}");
    let after = completed_operations(&s);
    // One search per type: (|(mail=…)×30) and (|(cn=Staff)(cn=Sales)); no add; one modify
    // (person 4's cn).
    let (searches, adds, modifies) = (
        delta(&before, &after, "Search"),
        delta(&before, &after, "Add"),
        delta(&before, &after, "Modify"),
    );
    assert_eq!((searches, adds, modifies), (2, 0, 1), "{after:?}");
    eprintln!("fresh state, 30 people + 2 groups all present: {searches} searches, {adds} adds, {modifies} modifies");
    let t = target(&s);
    let people: Vec<_> = t.read(&user()).await.unwrap().collect::<Vec<_>>().await;
    assert_eq!(people.len(), 30, "no duplicate");
    let p4 = t
        .get(
            &user(),
            &TargetId::new(format!("uid=person4,ou=legacy,{SUFFIX}")),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(texts(p4.attributes.get("cn")), ["Person 4"]);
    let groups: Vec<_> = t
        .read(&"group".into())
        .await
        .unwrap()
        .collect::<Vec<_>>()
        .await;
    assert_eq!(groups.len(), 2, "no duplicate group");
    // The next run writes nothing.
    let before = completed_operations(&s);
    assert_eq!(sync.run_cycle().await.unwrap().total_done(), 0);
    let after = completed_operations(&s);
    assert_eq!(
        delta(&before, &after, "Modify") + delta(&before, &after, "Add"),
        0
    );

    // The state is lost again, and the source gained 5 people and a group the directory does
    // not hold: only those are added.
    for i in 30..35 {
        source.add(person(i)).unwrap();
    }
    source.add(staff("Ops", 28..35)).unwrap();
    let before = completed_operations(&s);
    let mut sync = engine(&source);
    let r = sync.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{r}");
    assert_eq!((r.count("create"), r.count("join")), (6, 32), "{r}");
    let after = completed_operations(&s);
    assert_eq!(delta(&before, &after, "Add"), 6, "{after:?}");
    assert_eq!(delta(&before, &after, "Search"), 2, "{after:?}");
    assert_eq!(sync.run_cycle().await.unwrap().total_done(), 0);
}

// ---------------------------------------------------------------------------------------------
// References in creates (issue 14): an initial load writes each entry once.

/// The example directory (`examples/data/corp.ldif`, Active Directory users with managers and
/// nested groups) through the shipped `ldap-to-ldap` rules into slapd, which counts the
/// operations it completed (cn=Monitor): an initial load writes each object once (managers and
/// members in the adds), and the directory then holds the managers and members the source names.
#[tokio::test]
async fn initial_load_of_the_example_directory_writes_each_entry_once() {
    use dirsync::engine::{EngineConfig, Synchronizer};
    use dirsync::model::AttrName;
    use dirsync::state::MemoryStore;
    use std::collections::BTreeMap;

    let Some(s) = Slapd::start(SlapdOptions {
        ldif: Some(format!(
            "dn: ou=People,{SUFFIX}\nobjectClass: organizationalUnit\nou: People\n\n\
             dn: ou=Groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: Groups\n"
        )),
        extra_database_config: "database monitor\naccess to * by * read\n".into(),
        ..SlapdOptions::default()
    })
    .unwrap() else {
        eprintln!("skipped: slapd is not installed");
        return;
    };
    let start = completed_operations(&s);
    // Every write the server completed since the start (adds, modifies, renames, deletes).
    let writes = || {
        let now = completed_operations(&s);
        ["Add", "Modify", "Modrdn", "Delete"]
            .iter()
            .map(|op| delta(&start, &now, op))
            .sum::<u64>() as usize
    };
    let mut config = target(&s).config().clone();
    // A group with no member in scope still needs one (groupOfNames).
    config.placeholders = BTreeMap::from([(
        ObjectType::new("group"),
        BTreeMap::from([(AttrName::new("member"), String::new())]),
    )]);
    let mut sync = Synchronizer::new(
        Box::new(common::example_directory()),
        Box::new(LdapTarget::new(config)),
        Box::new(MemoryStore::new()),
        std::sync::Arc::new(common::example_rules("ldap-to-ldap.toml")),
        EngineConfig::default(),
    );
    let r = sync.run_cycle().await.unwrap();
    assert!(r.failures.is_empty(), "{r}");
    let views = sync.with_store(|st| st.load_all()).unwrap();
    let objects = views.links.len();
    assert_eq!(objects, 56, "{r}");
    assert_eq!(
        (writes(), r.count("create"), r.count("references")),
        (objects, objects as u64, 0),
        "{r}"
    );
    // What the directory holds, read back: manager and member DNs as the source names them.
    let t = target(&s);
    let mut held: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for ty in ["user", "group"] {
        let mut read = t.read(&ObjectType::new(ty)).await.unwrap();
        while let Some(o) = read.next().await {
            let o = o.unwrap();
            for attr in ["manager", "member"] {
                let mut ids: Vec<String> = o
                    .attributes
                    .get(attr)
                    .into_iter()
                    .flatten()
                    .filter_map(dirsync::testkit::target_ref)
                    .map(|id| id.to_string())
                    .collect();
                ids.sort();
                if !ids.is_empty() {
                    held.insert(format!("{} {attr}", o.id), ids);
                }
            }
        }
    }
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for link in views.links.iter() {
        for attr in ["manager", "member"] {
            let ids = common::linked_references(&views, &link.anchor, attr);
            if !ids.is_empty() {
                expected.insert(format!("{} {attr}", link.target_id), ids);
            }
        }
    }
    assert_eq!(held, expected);
    assert_eq!(held.keys().filter(|k| k.ends_with(" manager")).count(), 43);
    // A second run writes nothing.
    let before = writes();
    let again = sync.run_cycle().await.unwrap();
    assert_eq!((again.total_done(), writes()), (0, before), "{again}");
}

// ---------------------------------------------------------------------------------------------
// Batches (issue 15): one connection, one bind, the operations of a call pipelined on it.

/// What an LDAP proxy saw: connections, bind requests, and the most requests the client had
/// sent without their answer yet.
#[derive(Default)]
struct Seen {
    connections: std::sync::atomic::AtomicUsize,
    binds: std::sync::atomic::AtomicUsize,
    sent: std::sync::atomic::AtomicUsize,
    answered: std::sync::atomic::AtomicUsize,
    most_outstanding: std::sync::atomic::AtomicUsize,
}

/// The complete BER LDAPMessages at the start of `buf`, drained: each one's protocolOp tag.
fn ldap_messages(buf: &mut Vec<u8>) -> Vec<u8> {
    let mut ops = Vec::new();
    loop {
        if buf.len() < 2 {
            return ops;
        }
        let (len, head) = if buf[1] < 0x80 {
            (buf[1] as usize, 2)
        } else {
            let n = (buf[1] & 0x7f) as usize;
            if buf.len() < 2 + n {
                return ops;
            }
            (
                buf[2..2 + n]
                    .iter()
                    .fold(0usize, |a, b| (a << 8) | *b as usize),
                2 + n,
            )
        };
        if buf.len() < head + len {
            return ops;
        }
        // messageID: INTEGER (tag, short length, value), then the protocolOp's tag.
        let id_len = buf[head + 1] as usize;
        ops.push(buf[head + 2 + id_len]);
        buf.drain(..head + len);
    }
}

/// A TCP proxy in front of `upstream` (host:port) that parses the LDAP messages both ways.
async fn ldap_proxy(upstream: String) -> (u16, Arc<Seen>) {
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            s.connections.fetch_add(1, SeqCst);
            let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let up = s.clone();
            tokio::spawn(async move {
                let (mut buf, mut chunk) = (Vec::new(), [0u8; 65536]);
                while let Ok(n @ 1..) = cr.read(&mut chunk).await {
                    buf.extend_from_slice(&chunk[..n]);
                    for op in ldap_messages(&mut buf) {
                        if op == 0x60 {
                            up.binds.fetch_add(1, SeqCst);
                        }
                        // An abandon or unbind gets no answer.
                        if op != 0x42 && op != 0x50 {
                            let sent = up.sent.fetch_add(1, SeqCst) + 1;
                            let out = sent - up.answered.load(SeqCst).min(sent);
                            up.most_outstanding.fetch_max(out, SeqCst);
                        }
                    }
                    if sw.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                }
            });
            let down = s.clone();
            tokio::spawn(async move {
                let (mut buf, mut chunk) = (Vec::new(), [0u8; 65536]);
                let mut held = false;
                while let Ok(n @ 1..) = sr.read(&mut chunk).await {
                    // The first answer to an operation (not a bind) waits, up to 2 s, for a
                    // second request: a pipelining client sends it without that answer, one
                    // that is not never does. Without the wait, a loaded machine could let the
                    // answer through before this proxy reads the next request, and the count
                    // would say "not pipelined" of a client that is.
                    if !held && down.sent.load(SeqCst) > down.binds.load(SeqCst) {
                        held = true;
                        let t0 = std::time::Instant::now();
                        while down.sent.load(SeqCst) < down.answered.load(SeqCst) + 2
                            && t0.elapsed() < std::time::Duration::from_secs(2)
                        {
                            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                        }
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    // Search entries and references (0x64, 0x73) precede their search's done.
                    let done = ldap_messages(&mut buf)
                        .into_iter()
                        .filter(|op| *op != 0x64 && *op != 0x73)
                        .count();
                    down.answered.fetch_add(done, SeqCst);
                    if cw.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

/// The operations of one apply call go over the target's one connection, bound once, and
/// are pipelined: the target sends the next request before the answer to the previous one.
/// Operations on the same entry still take effect in their order.
#[tokio::test]
async fn a_batch_is_pipelined_on_one_bound_connection() {
    use std::sync::atomic::Ordering::SeqCst;
    let Some(s) = start() else { return };
    let (port, seen) = ldap_proxy(format!("127.0.0.1:{}", s.port())).await;
    let mut conn = LdapConnection::new(format!("ldap://127.0.0.1:{port}"));
    conn.allow_cleartext_bind = true;
    conn.bind = LdapBind::Simple {
        dn: s.root_dn(),
        password: Secret::new(s.root_password()),
    };
    let mut c = LdapTargetConfig::new(conn).with_object_type(
        "user",
        "uid",
        Dn::parse(&format!("ou=People,{SUFFIX}")).unwrap(),
        ["top", "person", "organizationalPerson", "inetOrgPerson"],
    );
    c.base_dn = Some(SUFFIX.to_owned());
    let t = LdapTarget::new(c);
    assert_eq!(t.capabilities().max_batch, 100);
    let person = |i: usize| {
        create(
            "user",
            attrs(&[
                ("uid", &format!("pipe{i}")),
                ("cn", &format!("Pipe {i}")),
                ("sn", "P"),
            ]),
        )
    };
    let mut ops: Vec<TargetOperation> = (0..60).map(person).collect();
    // A duplicate: its own failure only.
    ops.push(person(7));
    let out = t.apply(&ops).await;
    assert_eq!(
        out[60].as_ref().unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    let ids: Vec<TargetId> = out[..60]
        .iter()
        .map(|r| r.as_ref().unwrap().id.clone())
        .collect();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            id.as_str(),
            format!("uid=pipe{i},ou=people,{SUFFIX}").to_lowercase()
        );
    }
    // Updates of 40, and one entry changed twice then deleted, in their order.
    let mut ops: Vec<TargetOperation> = ids[..40]
        .iter()
        .map(|id| {
            update(
                "user",
                id,
                vec![AttributeChange::replace("sn", Values::one("Piped"))],
            )
        })
        .collect();
    ops.push(update(
        "user",
        &ids[50],
        vec![AttributeChange::add("mail", Values::one("a@example.test"))],
    ));
    ops.push(update(
        "user",
        &ids[50],
        vec![AttributeChange::remove(
            "mail",
            Values::one("a@example.test"),
        )],
    ));
    ops.push(TargetOperation::Delete {
        id: ids[50].clone(),
        object_type: user(),
    });
    let out = t.apply(&ops).await;
    assert!(out.iter().all(Result::is_ok), "{out:?}");
    let people: Vec<_> = t.read(&user()).await.unwrap().collect::<Vec<_>>().await;
    assert_eq!(people.len(), 59);
    let piped = people
        .iter()
        .filter(|p| texts(p.as_ref().unwrap().attributes.get("sn")) == ["Piped"])
        .count();
    assert_eq!(piped, 40);
    assert_eq!(seen.connections.load(SeqCst), 1, "one connection");
    assert_eq!(seen.binds.load(SeqCst), 1, "one bind");
    let most = seen.most_outstanding.load(SeqCst);
    eprintln!("at most {most} requests outstanding on the connection");
    assert!(most >= 2, "requests pipelined: at most {most} outstanding");
}
