//! Container (OU) scope against real directories: a rule scoped to OU=Staff minus its
//! Contractors sub-OU, through an initial load, the OU renamed (modrdn) and moved under another
//! parent, objects moved out of the subtree and into the excluded OU, and a sub-OU with many
//! objects moved out — on a Samba AD DC (objectGUID anchors; the DirSync and uSNChanged delta
//! modes side by side, which report only the renamed OU, not its children) and on OpenLDAP
//! slapd (entryUUID anchors; syncrepl deltas, then a full import).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use dirsync::connector::ldap::{
    AnchorAttribute, DeltaMode, LdapBind, LdapConnection, LdapSource, LdapSourceConfig,
};
use dirsync::connector::memory::MemoryTarget;
use dirsync::connector::Secret;
use dirsync::delta::{DeletionGuard, Reason};
use dirsync::engine::{EngineConfig, RunReport, Synchronizer};
use dirsync::model::{AttrName, Dn, ObjectType};
use dirsync::rules::ruleset::RuleSet;
use dirsync::state::MemoryStore;

fn dn(s: &str) -> Dn {
    Dn::parse(s).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The rules: users below `staff` but not below `contractors` (each a DN or `{ anchor = … }`),
/// deleted when they leave scope.
fn rules(naming: &str, staff: &str, contractors: &str) -> Arc<RuleSet> {
    Arc::new(
        RuleSet::from_toml(
            &format!(
                r#"
[[rule]]
name = "staff"
source_type = "user"
target_type = "User"
join = [["userName"]]
deprovision = {{ action = "delete" }}

[rule.containers]
include = [{staff}]
exclude = [{contractors}]

[[rule.flow]]
target = "userName"
expression = 'ToLower([{naming}])'
"#
            ),
            Some("rules.toml"),
        )
        .unwrap(),
    )
}

/// The guard with its ratio out of the way (a few users in all): the container wave is what
/// these tests look at.
fn engine_config() -> EngineConfig {
    EngineConfig {
        guard: DeletionGuard {
            max_ratio: 1.0,
            ..DeletionGuard::default()
        },
        ..EngineConfig::default()
    }
}

fn user_names(t: &MemoryTarget) -> Vec<String> {
    let mut v: Vec<String> = t
        .objects()
        .into_iter()
        .filter_map(|o| o.attributes.first_str("userName").map(str::to_owned))
        .collect();
    v.sort();
    v
}

/// The left-scope reasons of the pending plan, by the target's userName of each object.
fn left_scope(sync: &Synchronizer, target: &MemoryTarget) -> BTreeMap<String, (String, Dn)> {
    let staged = sync.plan(false).unwrap();
    let names: BTreeMap<String, String> = target
        .objects()
        .into_iter()
        .map(|o| {
            (
                o.id.to_string(),
                o.attributes.first_str("userName").unwrap_or("").to_owned(),
            )
        })
        .collect();
    staged
        .plan
        .operations
        .iter()
        .filter_map(|op| {
            let Reason::LeftScope { why, container } = &op.reason else {
                return None;
            };
            let id = match &op.kind {
                dirsync::delta::OperationKind::Delete { target_id } => target_id.to_string(),
                other => panic!("{other:?}"),
            };
            Some((
                names.get(&id).cloned().unwrap_or(id),
                (
                    why.clone(),
                    container.clone().expect("the container is named"),
                ),
            ))
        })
        .collect()
}

fn assert_quiet(r: &RunReport) {
    assert_eq!(r.total_done(), 0, "{r}");
    assert!(!r.held, "{r}");
}

/// After the OU holding `child` was renamed or moved: a delta cycle and a full sync change
/// nothing, and the mirror knows `child` at its new DN.
async fn assert_rename_changes_nothing(
    sync: &mut Synchronizer,
    target: &MemoryTarget,
    child: &str,
) {
    let before = target.objects();
    let r = sync.run_cycle().await.unwrap();
    assert_quiet(&r);
    assert_eq!(target.objects(), before);
    let r = sync.full_sync().await.unwrap();
    assert_quiet(&r);
    let at = sync.with_store(|s| s.anchor_by_dn(&dn(child))).unwrap();
    assert!(at.is_some(), "the mirror kept {child}'s old DN");
}

mod samba_ad {
    use super::*;
    use dirsync::testkit::samba::{self, SambaDc};

    fn enter(test_name: &str) -> bool {
        if let Some(reason) = samba::skip_reason().unwrap() {
            eprintln!("{reason}");
            return false;
        }
        samba::in_own_netns(test_name).unwrap()
    }

    const BASE: &str = "DC=contoso,DC=test";
    const CORP: &str = "OU=Corp,DC=contoso,DC=test";
    const STAFF: &str = "OU=Staff,DC=contoso,DC=test";
    const CONTRACTORS: &str = "OU=Contractors,OU=Staff,DC=contoso,DC=test";
    const SALES: &str = "OU=Sales,OU=Staff,DC=contoso,DC=test";
    const ARCHIVE: &str = "OU=Archive,DC=contoso,DC=test";
    /// Where Staff goes: renamed Personnel, under Corp.
    const PERSONNEL: &str = "OU=Personnel,OU=Corp,DC=contoso,DC=test";

    fn ou_ldif(at: &str) -> String {
        let name = dn(at).rdn().unwrap().value().to_owned();
        format!("dn: {at}\nobjectClass: organizationalUnit\nou: {name}\n\n")
    }

    fn user_ldif(name: &str, parent: &str) -> String {
        format!(
            "dn: CN={name},{parent}\nobjectClass: user\nsAMAccountName: ct-{name}\n\
             userPrincipalName: ct-{name}@contoso.test\n\n"
        )
    }

    fn source(dc: &SambaDc, delta: DeltaMode) -> LdapSource {
        let mut conn = LdapConnection::new(dc.ldaps_url());
        conn.tls.ca_file = Some(dc.ca_file().to_path_buf());
        conn.bind = LdapBind::Simple {
            dn: dc.admin_dn().to_owned(),
            password: Secret::new(dc.admin_password()),
        };
        let mut c = LdapSourceConfig::new(conn, BASE);
        c.name = format!("ad-{delta:?}");
        // The OUs come in too, as objects of type "container" that no rule projects.
        c.filter =
            "(|(objectClass=organizationalUnit)(&(objectClass=user)(sAMAccountName=ct-*)))".into();
        c.object_types.insert(
            AttrName::new("organizationalUnit"),
            ObjectType::new("container"),
        );
        c.delta = delta;
        LdapSource::new(c)
    }

    /// Samba AD: DirSync and uSNChanged side by side (each its own engine, state and target)
    /// through the same changes.
    #[test]
    fn ou_scope_follows_renamed_and_moved_ous() {
        if !enter("samba_ad::ou_scope_follows_renamed_and_moved_ous") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let dc = SambaDc::start(dir.path()).unwrap();
        let mut ldif = String::new();
        for ou in [CORP, STAFF, CONTRACTORS, SALES, ARCHIVE] {
            ldif.push_str(&ou_ldif(ou));
        }
        ldif.push_str(&user_ldif("ann", STAFF));
        ldif.push_str(&user_ldif("cy", CONTRACTORS));
        ldif.push_str(&user_ldif("zed", ARCHIVE));
        for i in 0..7 {
            ldif.push_str(&user_ldif(&format!("s{i}"), SALES));
        }
        dc.ldbadd(&ldif).unwrap();

        runtime().block_on(async {
            let rules = rules(
                "sAMAccountName",
                &format!("{STAFF:?}"),
                &format!("{CONTRACTORS:?}"),
            );
            let mut engines: Vec<(Synchronizer, MemoryTarget)> =
                [DeltaMode::Dirsync, DeltaMode::UsnChanged]
                    .into_iter()
                    .map(|mode| {
                        let target = MemoryTarget::new("app").unique_attribute("User", "userName");
                        let sync = Synchronizer::new(
                            Box::new(source(&dc, mode)),
                            Box::new(target.clone()),
                            Box::new(MemoryStore::new()),
                            rules.clone(),
                            engine_config(),
                        );
                        (sync, target)
                    })
                    .collect();
            let sales: Vec<String> = (0..7).map(|i| format!("ct-s{i}")).collect();
            let mut in_scope: Vec<String> = vec!["ct-ann".into()];
            in_scope.extend(sales.iter().cloned());

            for (sync, target) in &mut engines {
                let r = sync.run_cycle().await.unwrap();
                assert_eq!(r.count("create"), 8, "{r}");
                assert_eq!(user_names(target), in_scope);
                let r = sync.run_cycle().await.unwrap();
                assert_quiet(&r);
            }

            // OU=Staff renamed Personnel and moved under OU=Corp (one modrdn): the directory
            // reports the OU alone; its objects stay in scope and keep their target objects.
            dc.ldap_rename(STAFF, "OU=Personnel", Some(CORP)).unwrap();
            for (sync, target) in &mut engines {
                assert_rename_changes_nothing(sync, target, &format!("CN=s3,OU=Sales,{PERSONNEL}"))
                    .await;
            }

            // Ann moved out of the subtree, s0 into the excluded sub-OU: both leave scope, each
            // reason naming where.
            dc.ldap_rename(&format!("CN=ann,{PERSONNEL}"), "CN=ann", Some(ARCHIVE))
                .unwrap();
            dc.ldap_rename(
                &format!("CN=s0,OU=Sales,{PERSONNEL}"),
                "CN=s0",
                Some(&format!("OU=Contractors,{PERSONNEL}")),
            )
            .unwrap();
            for (sync, target) in &mut engines {
                sync.delta_import().await.unwrap();
                let left = left_scope(sync, target);
                assert_eq!(left.len(), 2, "{left:?}");
                let (why, at) = &left["ct-ann"];
                assert!(why.contains("outside the included containers"), "{why}");
                assert!(
                    why.contains(&format!("{STAFF} (now {PERSONNEL}")),
                    "names the configured OU and where it is now: {why}"
                );
                assert_eq!(*at, dn(ARCHIVE));
                let (why, at) = &left["ct-s0"];
                assert!(why.contains("under excluded container"), "{why}");
                assert_eq!(*at, dn(&format!("OU=Contractors,{PERSONNEL}")));
                let r = sync.run_cycle().await.unwrap();
                assert_eq!(r.count("delete"), 2, "{r}");
                assert!(!r.held);
                assert_eq!(user_names(target), sales[1..]);
            }

            // The Sales sub-OU (six users) moved out: a wave, held, the container named.
            dc.ldap_rename(&format!("OU=Sales,{PERSONNEL}"), "OU=Sales", Some(ARCHIVE))
                .unwrap();
            for (sync, target) in &mut engines {
                let r = sync.run_cycle().await.unwrap();
                assert!(r.held, "{r}");
                assert_eq!(user_names(target), sales[1..], "nothing written");
                let staged = sync.plan(false).unwrap();
                let waves: Vec<String> = staged
                    .plan
                    .guard_violations
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                assert_eq!(waves.len(), 1, "{waves:?}");
                assert!(
                    waves[0].contains(&format!("6 linked User objects under OU=Sales,{ARCHIVE}")),
                    "{waves:?}"
                );
                let left = left_scope(sync, target);
                assert_eq!(left.len(), 6);
                assert!(left
                    .values()
                    .all(|(_, at)| *at == dn(&format!("OU=Sales,{ARCHIVE}"))));
                // Moved back before anyone allowed it: nothing to do.
            }
            dc.ldap_rename(&format!("OU=Sales,{ARCHIVE}"), "OU=Sales", Some(PERSONNEL))
                .unwrap();
            for (sync, target) in &mut engines {
                let r = sync.run_cycle().await.unwrap();
                assert_quiet(&r);
                assert_eq!(user_names(target), sales[1..]);
            }
        });
    }
}

mod openldap {
    use super::*;
    use dirsync::testkit::slapd::{Slapd, SlapdOptions};

    const SUFFIX: &str = "dc=example,dc=test";
    const STAFF: &str = "ou=Staff,dc=example,dc=test";
    const CONTRACTORS: &str = "ou=Contractors,ou=Staff,dc=example,dc=test";
    const SALES: &str = "ou=Sales,ou=Staff,dc=example,dc=test";
    const ARCHIVE: &str = "ou=Archive,dc=example,dc=test";
    const CORP: &str = "ou=Corp,dc=example,dc=test";
    const PERSONNEL: &str = "ou=Personnel,ou=Corp,dc=example,dc=test";

    fn ldif() -> String {
        let mut out = String::new();
        for ou in [CORP, STAFF, CONTRACTORS, SALES, ARCHIVE] {
            let name = dn(ou).rdn().unwrap().value().to_owned();
            out.push_str(&format!(
                "dn: {ou}\nobjectClass: organizationalUnit\nou: {name}\n\n"
            ));
        }
        let mut user = |uid: &str, parent: &str| {
            out.push_str(&format!(
                "dn: uid={uid},{parent}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\n\n"
            ));
        };
        user("ann", STAFF);
        user("cy", CONTRACTORS);
        for i in 0..7 {
            user(&format!("s{i}"), SALES);
        }
        out
    }

    fn source(s: &Slapd, delta: DeltaMode) -> LdapSource {
        let mut conn = LdapConnection::new(s.url());
        conn.bind = LdapBind::Simple {
            dn: s.root_dn(),
            password: Secret::new(s.root_password()),
        };
        conn.allow_cleartext_bind = true;
        let mut c = LdapSourceConfig::new(conn, SUFFIX);
        c.anchor = AnchorAttribute::EntryUuid;
        c.object_types.insert(
            AttrName::new("organizationalUnit"),
            ObjectType::new("container"),
        );
        c.delta = delta;
        LdapSource::new(c)
    }

    fn rename(s: &Slapd, at: &str, rdn: &str, parent: &str) {
        s.ldapmodify(&format!(
            "dn: {at}\nchangetype: modrdn\nnewrdn: {rdn}\ndeleteoldrdn: 1\nnewsuperior: {parent}\n"
        ))
        .unwrap();
    }

    /// entryUUID-bound OUs through syncrepl deltas (the excluded OU named by its entryUUID),
    /// then the same state reached by a full import of a second engine.
    #[test]
    fn ou_scope_follows_renamed_and_moved_ous() {
        runtime().block_on(async {
            let Some(slapd) = Slapd::start(SlapdOptions {
                ldif: Some(ldif()),
                ..SlapdOptions::default()
            })
            .unwrap() else {
                eprintln!("skipped: slapd is not installed");
                return;
            };
            // The Contractors OU's entryUUID, as the source reads it.
            let probe = source(&slapd, DeltaMode::None);
            let mut stream = dirsync::connector::Source::full_import(&probe)
                .await
                .unwrap();
            let mut contractors = None;
            while let Some(item) = futures::StreamExt::next(&mut stream).await {
                if let dirsync::connector::ImportItem::Item(e) = item.unwrap() {
                    if e.dn.as_ref() == Some(&dn(CONTRACTORS)) {
                        assert!(e.object_type.is("container"));
                        contractors = Some(e.anchor.clone());
                    }
                }
            }
            drop(stream);
            let contractors = contractors.expect("the OU is imported");
            let rules = rules(
                "uid",
                &format!("{STAFF:?}"),
                &format!("{{ anchor = {:?} }}", contractors.as_str()),
            );
            let target = MemoryTarget::new("app").unique_attribute("User", "userName");
            let mut sync = Synchronizer::new(
                Box::new(source(&slapd, DeltaMode::Syncrepl)),
                Box::new(target.clone()),
                Box::new(MemoryStore::new()),
                rules.clone(),
                engine_config(),
            );
            let sales: Vec<String> = (0..7).map(|i| format!("s{i}")).collect();
            let r = sync.run_cycle().await.unwrap();
            assert_eq!(r.count("create"), 8, "{r}");
            let mut want = vec!["ann".to_owned()];
            want.extend(sales.iter().cloned());
            assert_eq!(user_names(&target), want);

            // A subtree rename and move (slapd's mdb moves the subtree; syncrepl reports the
            // OU alone).
            rename(&slapd, STAFF, "ou=Personnel", CORP);
            assert_rename_changes_nothing(
                &mut sync,
                &target,
                &format!("uid=s3,ou=Sales,{PERSONNEL}"),
            )
            .await;

            // Out of the subtree, and into the excluded OU (bound by entryUUID, moved along).
            rename(&slapd, &format!("uid=ann,{PERSONNEL}"), "uid=ann", ARCHIVE);
            rename(
                &slapd,
                &format!("uid=s0,ou=Sales,{PERSONNEL}"),
                "uid=s0",
                &format!("ou=Contractors,{PERSONNEL}"),
            );
            sync.delta_import().await.unwrap();
            let left = left_scope(&sync, &target);
            assert_eq!(left.len(), 2, "{left:?}");
            assert!(left["ann"].0.contains("outside the included containers"));
            assert!(
                left["s0"].0.contains(&format!(
                    "under excluded container ou=Contractors,{PERSONNEL}"
                )),
                "{:?}",
                left["s0"]
            );
            let r = sync.run_cycle().await.unwrap();
            assert_eq!(r.count("delete"), 2, "{r}");
            assert_eq!(user_names(&target), sales[1..]);

            // The Sales OU (six users) out: held, the container named.
            rename(
                &slapd,
                &format!("ou=Sales,{PERSONNEL}"),
                "ou=Sales",
                ARCHIVE,
            );
            let r = sync.run_cycle().await.unwrap();
            assert!(r.held, "{r}");
            let staged = sync.plan(false).unwrap();
            assert!(
                staged
                    .plan
                    .guard_violations
                    .iter()
                    .any(|v| v.container == Some(dn(&format!("ou=Sales,{ARCHIVE}")))
                        && v.deletions == 6),
                "{}",
                staged.plan
            );
            assert_eq!(user_names(&target), sales[1..], "nothing written");

            // Moved back: nothing to do. Then another rename, seen by a full import this time
            // (every DN fresh): nothing leaves scope either.
            rename(
                &slapd,
                &format!("ou=Sales,{ARCHIVE}"),
                "ou=Sales",
                PERSONNEL,
            );
            let r = sync.run_cycle().await.unwrap();
            assert_quiet(&r);
            rename(&slapd, PERSONNEL, "ou=People", SUFFIX);
            let r = sync.full_import().await.unwrap();
            assert!(r.failures.is_empty(), "{r}");
            let r = sync.full_sync().await.unwrap();
            assert_quiet(&r);
            assert_eq!(user_names(&target), sales[1..]);
        });
    }
}
