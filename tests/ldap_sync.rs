//! LDAP → LDAP end to end through the `sync` example: two slapd servers started by the test,
//! users and groups loaded into the source, `sync run` with the shipped `ldap-to-ldap`
//! configuration pointed at them; the target then holds the users and groups with member DNs
//! translated to target DNs; a change and a deletion in the source reach the target on the next
//! run; a run after that changes nothing. Skips when slapd is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::build_sync;
use dirsync::testkit::slapd::{users_and_groups_ldif, Slapd, SlapdOptions};

const SOURCE: &str = "dc=hr,dc=example";
const TARGET: &str = "dc=apps,dc=example";

fn ldapsearch(s: &Slapd, base: &str, filter: &str, attrs: &[&str]) -> String {
    let out = Command::new("ldapsearch")
        .args([
            "-x",
            "-LLL",
            "-o",
            "ldif-wrap=no",
            "-H",
            &s.url(),
            "-b",
            base,
            filter,
        ])
        .args(attrs)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn slapd_to_slapd_through_the_sync_example() {
    let Some(src) = Slapd::start(SlapdOptions {
        suffix: SOURCE.into(),
        ldif: Some(users_and_groups_ldif(SOURCE, 30, 3, false)),
        ..SlapdOptions::default()
    })
    .unwrap() else {
        eprintln!("skipped: slapd is not installed");
        return;
    };
    let dst = Slapd::start(SlapdOptions {
        suffix: TARGET.into(),
        ldif: Some(format!(
            "dn: ou=People,{TARGET}\nobjectClass: organizationalUnit\nou: People\n\n\
             dn: ou=Groups,{TARGET}\nobjectClass: organizationalUnit\nou: Groups\n"
        )),
        ..SlapdOptions::default()
    })
    .unwrap()
    .unwrap();
    let exe = build_sync();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(root.join("examples/config/ldap-to-ldap.toml")).unwrap();
    let config = shipped
        .replace(
            "../rules/ldap-to-ldap.toml",
            &root
                .join("examples/rules/ldap-to-ldap.toml")
                .display()
                .to_string(),
        )
        .replace(
            "../../target/sync-example/ldap-to-ldap.sqlite",
            &dir.path().join("state.sqlite").display().to_string(),
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
        );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).unwrap();
    let run = || {
        let out = Command::new(&exe)
            .args(["--config", path.to_str().unwrap(), "run"])
            .env("SOURCE_LDAP_PASSWORD", src.root_password())
            .env("TARGET_LDAP_PASSWORD", dst.root_password())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "sync run failed: {text}");
        assert!(!text.contains(src.root_password()) || src.root_password() == "secret");
        text
    };
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
