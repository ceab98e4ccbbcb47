//! The Samba AD test harness itself (`dirsync::testkit::samba`): each test starts a domain
//! controller in a network namespace of its own, loads data with `ldbadd` and checks it with the
//! `ldapsearch` command line over LDAPS. The two tests run in parallel without clashing on
//! Samba's fixed ports.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use dirsync::testkit::samba::{self, SambaDc};

/// Whether the test should go on here: false (after printing why) when Samba is not installed,
/// or when this is the outer process whose test ran, and passed, in its own namespace.
fn enter(test_name: &str) -> bool {
    if let Some(reason) = samba::skip_reason().unwrap() {
        eprintln!("{reason}");
        return false;
    }
    samba::in_own_netns(test_name).unwrap()
}

/// The number of result entries in `ldapsearch -LLL` output.
fn count_entries(ldif: &str) -> usize {
    ldif.lines().filter(|l| l.starts_with("dn: ")).count()
}

#[test]
fn loads_two_thousand_users_and_a_large_group() {
    if !enter("loads_two_thousand_users_and_a_large_group") {
        return;
    }
    let t = Instant::now();
    samba::template(None).unwrap();
    eprintln!(
        "template ready in {:?} (provisioned unless cached)",
        t.elapsed()
    );
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let dc = SambaDc::start(dir.path()).unwrap();
    eprintln!("DC started in {:?}", t.elapsed());

    let usn_before = dc.highest_committed_usn().unwrap();
    let t = Instant::now();
    dc.ldbadd(&samba::ous_ldif()).unwrap();
    dc.ldbadd(&samba::users_ldif(0..2000)).unwrap();
    dc.ldbadd(&samba::group_ldif("Everyone Big", 0..2000))
        .unwrap();
    eprintln!(
        "2,000 users and a 2,000-member group loaded in {:?}",
        t.elapsed()
    );
    let usn_after = dc.highest_committed_usn().unwrap();
    assert!(
        usn_after >= usn_before + 2003,
        "ldbadd assigns USNs: {usn_before} -> {usn_after}"
    );

    // Paged search (AD's MaxPageSize is 1000, so this takes several pages).
    let users = dc
        .ldapsearch(&[
            "-LLL",
            "-E",
            "pr=1000/noprompt",
            "-b",
            samba::PEOPLE_OU,
            "(objectClass=user)",
            "sAMAccountName",
        ])
        .unwrap();
    assert_eq!(count_entries(&users), 2000);
    assert!(users.contains("sAMAccountName: user001999\n"));

    // Range retrieval: the first 1,500 values, then the rest.
    let group = samba::group_dn("Everyone Big");
    let first = dc
        .ldapsearch(&[
            "-LLL",
            "-b",
            &group,
            "-s",
            "base",
            "(objectClass=group)",
            "member;range=0-1499",
        ])
        .unwrap();
    assert_eq!(
        first.matches("\nmember;range=0-1499: ").count(),
        1500,
        "{first:.400}"
    );
    let rest = dc
        .ldapsearch(&[
            "-LLL",
            "-b",
            &group,
            "-s",
            "base",
            "(objectClass=group)",
            "member;range=1500-*",
        ])
        .unwrap();
    assert_eq!(
        rest.matches("\nmember;range=1500-*: ").count(),
        500,
        "{rest:.400}"
    );
    drop(dc);
}

#[test]
fn refuses_a_simple_bind_over_plain_ldap() {
    if !enter("refuses_a_simple_bind_over_plain_ldap") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dc = SambaDc::start(dir.path()).unwrap();
    let plain = std::process::Command::new("ldapsearch")
        .args(["-x", "-LLL", "-H", dc.ldap_url(), "-D", dc.admin_dn(), "-w"])
        .args([dc.admin_password(), "-b", dc.base_dn(), "-s", "base", "dn"])
        .output()
        .unwrap();
    assert!(!plain.status.success());
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(err.contains("Strong(er) authentication required"), "{err}");
    assert!(err.contains("Transport encryption required"), "{err}");
    // The same bind over LDAPS with the test CA works.
    let over_tls = dc
        .ldapsearch(&["-LLL", "-b", dc.base_dn(), "-s", "base", "dn"])
        .unwrap();
    assert!(
        over_tls.contains(&format!("dn: {}", dc.base_dn())),
        "{over_tls}"
    );
    // A second DC cannot start in the same namespace: the ports are fixed.
    let other = tempfile::tempdir().unwrap();
    let e = SambaDc::start(other.path()).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
}

#[test]
fn a_wrong_test_name_is_an_error_not_a_silent_pass() {
    if let Some(reason) = samba::skip_reason().unwrap() {
        eprintln!("{reason}");
        return;
    }
    if std::env::var_os(samba::NETNS_ENV).is_some() {
        return;
    }
    let e = samba::in_own_netns("no_such_test").unwrap_err();
    assert!(e.to_string().contains("did not run"), "{e}");
}
