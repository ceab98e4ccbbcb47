//! LDAP → LDAP end to end through the `sync` example: two slapd servers started by the test,
//! users and groups loaded into the source, `sync run` with the shipped `ldap-to-ldap`
//! configuration pointed at them; the target then holds the users and groups with member DNs
//! translated to target DNs; a change and a deletion in the source reach the target on the next
//! run; a run after that changes nothing. The same with Active Directory as the source: a Samba
//! domain controller (in a network namespace of its own, with the target slapd beside it) read
//! over LDAPS through the shipped `ad-to-ldap` configuration. Skips when slapd (or Samba) is not
//! installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::build_sync;
use dirsync::testkit::samba::{self, SambaDc};
use dirsync::testkit::slapd::{users_and_groups_ldif, Slapd, SlapdOptions};

const SOURCE: &str = "dc=hr,dc=example";
const TARGET: &str = "dc=apps,dc=example";

fn ldapsearch(s: &Slapd, base: &str, filter: &str, attrs: &[&str]) -> String {
    s.ldapsearch(base, filter, attrs).unwrap()
}

/// The source slapd: 30 users and `groups` groups under `SOURCE`; `None` (with a note)
/// when slapd is not installed.
fn source_slapd(groups: usize) -> Option<Slapd> {
    let s = Slapd::start(SlapdOptions {
        suffix: SOURCE.into(),
        root_password: "Source-Root-Pw-3".into(),
        ldif: Some(users_and_groups_ldif(SOURCE, 30, groups, false)),
        ..SlapdOptions::default()
    })
    .unwrap();
    if s.is_none() {
        eprintln!("skipped: slapd is not installed");
    }
    s
}

/// The target slapd: empty `ou=People` and `ou=Groups` under `TARGET`.
fn target_slapd() -> Slapd {
    Slapd::start(SlapdOptions {
        suffix: TARGET.into(),
        root_password: "Target-Root-Pw-7".into(),
        ldif: Some(format!(
            "dn: ou=People,{TARGET}\nobjectClass: organizationalUnit\nou: People\n\n\
             dn: ou=Groups,{TARGET}\nobjectClass: organizationalUnit\nou: Groups\n"
        )),
        ..SlapdOptions::default()
    })
    .unwrap()
    .expect("slapd is installed")
}

#[test]
fn slapd_to_slapd_through_the_sync_example() {
    let Some(src) = source_slapd(3) else {
        return;
    };
    let dst = target_slapd();
    let exe = build_sync();
    let dir = tempfile::tempdir().unwrap();
    let config = ldap_to_ldap_config(&src, &dst, &dir.path().join("state.sqlite"));
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).unwrap();
    let env = [
        ("SOURCE_LDAP_PASSWORD", src.root_password()),
        ("TARGET_LDAP_PASSWORD", dst.root_password()),
    ];
    let run = || run_sync(&exe, &path, &env);
    let first = run();
    let users = ldapsearch(
        &dst,
        TARGET,
        "(objectClass=inetOrgPerson)",
        &["uid", "mail", "employeeNumber"],
    );
    assert_eq!(users.matches("dn: ").count(), 30, "{first}\n{users}");
    assert!(
        users.contains("dn: uid=user000007,ou=People,dc=apps,dc=example"),
        "{users}"
    );
    assert!(users.contains("mail: user7@example.test"), "{users}");
    assert!(users.contains("employeeNumber: E000007"), "{users}");
    // group0001 has the users i % 3 == 1, as target DNs.
    let group = ldapsearch(&dst, TARGET, "(cn=group0001)", &["member"]);
    assert_eq!(group.matches("member: ").count(), 10, "{group}");
    let lower = group.to_ascii_lowercase();
    assert!(
        lower.contains("member: uid=user000001,ou=people,dc=apps,dc=example"),
        "{group}"
    );
    assert!(!lower.contains("dc=hr"), "{group}");

    // A change and a deletion in the source reach the target.
    src.ldapmodify(&format!(
        "dn: uid=user000004,ou=People,{SOURCE}\nchangetype: modify\nreplace: mail\nmail: four@example.test\n\n\
         dn: cn=group0001,ou=Groups,{SOURCE}\nchangetype: modify\ndelete: member\nmember: uid=user000004,ou=People,{SOURCE}\n\n\
         dn: uid=user000005,ou=People,{SOURCE}\nchangetype: delete\n"
    ))
    .unwrap();
    let second = run();
    let four = ldapsearch(&dst, TARGET, "(uid=user000004)", &["mail"]);
    assert!(four.contains("mail: four@example.test"), "{second}\n{four}");
    assert!(
        ldapsearch(&dst, TARGET, "(uid=user000005)", &["uid"]).is_empty(),
        "{second}"
    );
    let group = ldapsearch(&dst, TARGET, "(cn=group0001)", &["member"]);
    assert_eq!(group.matches("member: ").count(), 9, "{group}");

    // Nothing left to do.
    let before = ldapsearch(&dst, TARGET, "(objectClass=*)", &["*"]);
    let third = run();
    assert_eq!(
        ldapsearch(&dst, TARGET, "(objectClass=*)", &["*"]),
        before,
        "{third}"
    );
}

/// `sync run --full-import` reads every source object again, and so sees what the delta mode
/// cannot: after the source filter is narrowed, syncrepl reports nothing (no entry changed since
/// the cookie), so `run` keeps the object that left the filter in the target; `run
/// --full-import` does not deliver it, and its target object is deleted. A `run` after that
/// changes nothing.
#[test]
fn full_import_sees_what_the_delta_cannot() {
    let Some(src) = source_slapd(0) else {
        return;
    };
    let dst = target_slapd();
    let exe = build_sync();
    let dir = tempfile::tempdir().unwrap();
    let config = ldap_to_ldap_config(&src, &dst, &dir.path().join("state.sqlite"));
    let shipped_filter = "(|(objectClass=inetOrgPerson)(objectClass=groupOfNames))";
    assert!(
        config.contains(shipped_filter),
        "the shipped filter changed"
    );
    assert!(
        config.contains("delta = \"syncrepl\""),
        "the shipped delta mode changed"
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, &config).unwrap();
    let env = [
        ("SOURCE_LDAP_PASSWORD", src.root_password()),
        ("TARGET_LDAP_PASSWORD", dst.root_password()),
    ];
    let users = || {
        ldapsearch(&dst, TARGET, "(objectClass=inetOrgPerson)", &["uid"])
            .matches("dn: ")
            .count()
    };
    let three = || !ldapsearch(&dst, TARGET, "(uid=user000003)", &["uid"]).is_empty();
    let first = run_sync_with(&exe, &path, &env, &["run"]);
    assert_eq!(users(), 30, "{first}");
    assert!(three());

    // The administrator narrows the source filter: user000003 is no longer synchronized.
    let narrowed = config.replace(
        shipped_filter,
        "(|(&(objectClass=inetOrgPerson)(!(uid=user000003)))(objectClass=groupOfNames))",
    );
    std::fs::write(&path, narrowed).unwrap();
    let delta = run_sync_with(&exe, &path, &env, &["run"]);
    assert!(three(), "the delta saw the filter change: {delta}");
    assert_eq!(users(), 30, "{delta}");

    let full = run_sync_with(&exe, &path, &env, &["run", "--full-import"]);
    assert!(full.contains("run full-import-cycle"), "{full}");
    assert!(full.contains("done: 1 × delete"), "{full}");
    assert!(!three(), "{full}");
    assert_eq!(users(), 29, "{full}");

    let before = ldapsearch(&dst, TARGET, "(objectClass=*)", &["*"]);
    let after = run_sync_with(&exe, &path, &env, &["run"]);
    assert_eq!(
        ldapsearch(&dst, TARGET, "(objectClass=*)", &["*"]),
        before,
        "{after}"
    );
}

/// The shipped `ldap-to-ldap` configuration pointed at `src` and `dst`, its state at `state`.
fn ldap_to_ldap_config(src: &Slapd, dst: &Slapd, state: &std::path::Path) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let shipped = std::fs::read_to_string(root.join("examples/config/ldap-to-ldap.toml")).unwrap();
    shipped
        .replace(
            "../rules/ldap-to-ldap.toml",
            &root
                .join("examples/rules/ldap-to-ldap.toml")
                .display()
                .to_string(),
        )
        .replace(
            "../../target/sync-example/ldap-to-ldap.sqlite",
            &state.display().to_string(),
        )
        .replace("cn=sync,ou=Services,dc=hr,dc=example", &src.root_dn())
        .replace("ldap://hr-ldap.example:389", &src.url())
        .replace(
            "/etc/dirsync/hr-ca.pem",
            &src.ca_file().display().to_string(),
        )
        .replace("cn=admin,dc=apps,dc=example", &dst.root_dn())
        .replace("ldaps://apps-ldap.example:636", &dst.ldaps_url())
        .replace(
            "/etc/dirsync/apps-ca.pem",
            &dst.ca_file().display().to_string(),
        )
}

/// Runs `sync --config <path> run` with `env`; returns its output, failing the test if it fails
/// or prints a password.
fn run_sync(exe: &std::path::Path, path: &std::path::Path, env: &[(&str, &str)]) -> String {
    run_sync_with(exe, path, env, &["run"])
}

/// Runs `sync --config <path> <args>` with `env`, as [`run_sync`] does.
fn run_sync_with(
    exe: &std::path::Path,
    path: &std::path::Path,
    env: &[(&str, &str)],
    args: &[&str],
) -> String {
    let out = Command::new(exe)
        .args(["--config", path.to_str().unwrap()])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "sync run failed: {text}");
    for (_, secret) in env {
        assert!(
            !text.contains(secret),
            "the output shows a password: {text}"
        );
    }
    text
}

#[test]
fn ad_to_slapd_through_the_sync_example() {
    if let Some(reason) = samba::skip_reason().unwrap() {
        eprintln!("{reason}");
        return;
    }
    if !samba::in_own_netns("ad_to_slapd_through_the_sync_example").unwrap() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dc = SambaDc::start(&dir.path().join("dc")).unwrap();
    dc.ldbadd(&samba::ous_ldif()).unwrap();
    dc.ldbadd(&samba::users_ldif(0..40)).unwrap();
    dc.ldbadd(&samba::group_ldif("Engineers", 0..20)).unwrap();
    dc.ldbadd(&samba::group_ldif("Everyone", 0..40)).unwrap();
    let dst = target_slapd();
    let exe = build_sync();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let shipped = std::fs::read_to_string(root.join("examples/config/ad-to-ldap.toml")).unwrap();
    let filter = "(|(&(objectCategory=person)(objectClass=user))(objectClass=group))";
    assert!(shipped.contains(filter), "the shipped filter changed");
    let config = shipped
        .replace(
            "../rules/ldap-to-ldap.toml",
            &root
                .join("examples/rules/ldap-to-ldap.toml")
                .display()
                .to_string(),
        )
        .replace(
            "../../target/sync-example/ad-to-ldap.sqlite",
            &dir.path().join("state.sqlite").display().to_string(),
        )
        // The generated users and groups only: not Administrator, krbtgt or the built-in groups.
        .replace(
            filter,
            "(|(&(objectCategory=person)(objectClass=user)(sn=*))(&(objectClass=group)(description=generated group)))",
        )
        .replace("DC=corp,DC=example", samba::BASE_DN)
        .replace(
            "CN=svc-dirsync,OU=Service Accounts,DC=contoso,DC=test",
            dc.admin_dn(),
        )
        .replace("ldaps://dc1.corp.example:636", dc.ldaps_url())
        .replace(
            "/etc/dirsync/corp-ca.pem",
            &dc.ca_file().display().to_string(),
        )
        .replace("cn=admin,dc=apps,dc=example", &dst.root_dn())
        .replace("ldap://apps-ldap.example:389", &dst.url())
        .replace(
            "/etc/dirsync/apps-ca.pem",
            &dst.ca_file().display().to_string(),
        );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).unwrap();
    let env = [
        ("AD_PASSWORD", dc.admin_password()),
        ("TARGET_LDAP_PASSWORD", dst.root_password()),
    ];

    let first = run_sync(&exe, &path, &env);
    let users = ldapsearch(
        &dst,
        TARGET,
        "(objectClass=inetOrgPerson)",
        &["uid", "mail", "employeeNumber", "cn"],
    );
    assert_eq!(users.matches("dn: ").count(), 40, "{first}\n{users}");
    let seven = ldapsearch(
        &dst,
        TARGET,
        "(uid=user000007)",
        &["mail", "employeeNumber"],
    );
    assert!(
        seven.contains("dn: uid=user000007,ou=People,dc=apps,dc=example"),
        "{seven}"
    );
    assert!(seven.contains("mail: user000007@contoso.test"), "{seven}");
    assert!(seven.contains("employeeNumber: 000007"), "{seven}");
    let group = ldapsearch(&dst, TARGET, "(cn=Engineers)", &["member"]);
    assert_eq!(group.matches("member: ").count(), 20, "{first}\n{group}");
    let lower = group.to_ascii_lowercase();
    assert!(
        lower.contains("member: uid=user000003,ou=people,dc=apps,dc=example"),
        "{group}"
    );
    assert!(!lower.contains("dc=contoso"), "{group}");

    // A modify, a membership change, a rename in AD (same sAMAccountName: the same target
    // entry) and a deletion reach the target.
    dc.ldapmodify(&format!(
        "dn: {}\nchangetype: modify\nreplace: mail\nmail: four@contoso.test\n\n\
         dn: {}\nchangetype: modify\ndelete: member\nmember: {}\n",
        samba::user_dn(4),
        samba::group_dn("Engineers"),
        samba::user_dn(4),
    ))
    .unwrap();
    dc.ldap_rename(&samba::user_dn(6), "CN=Renamed Six", None)
        .unwrap();
    dc.ldap_delete(&samba::user_dn(5)).unwrap();
    let second = run_sync(&exe, &path, &env);
    let four = ldapsearch(&dst, TARGET, "(uid=user000004)", &["mail"]);
    assert!(four.contains("mail: four@contoso.test"), "{second}\n{four}");
    assert!(
        ldapsearch(&dst, TARGET, "(uid=user000005)", &["uid"]).is_empty(),
        "{second}"
    );
    assert!(
        !ldapsearch(&dst, TARGET, "(uid=user000006)", &["uid"]).is_empty(),
        "{second}"
    );
    let group = ldapsearch(&dst, TARGET, "(cn=Engineers)", &["member"]);
    assert_eq!(group.matches("member: ").count(), 18, "{second}\n{group}");

    // Nothing left to do.
    let before = ldapsearch(&dst, TARGET, "(objectClass=*)", &["*"]);
    let third = run_sync(&exe, &path, &env);
    assert_eq!(
        ldapsearch(&dst, TARGET, "(objectClass=*)", &["*"]),
        before,
        "{third}"
    );
}
