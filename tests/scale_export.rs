//! The scale benchmark's generator (`dirsync::testkit::scale`): the same seed writes the same
//! bytes, the export reads through `LdifSource` as the documentation describes it, and the
//! edited export changes, deletes and adds exactly what its counts say.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};

use dirsync::connector::ldif::{LdifSource, LdifSourceConfig};
use dirsync::connector::{ImportItem, Source};
use dirsync::model::{Anchor, AttrName, Dn, Entry, Reference, Value};
use dirsync::testkit::scale::{Edits, ScaleExport};
use futures::StreamExt;

fn bytes(export: &ScaleExport, edits: Option<Edits>) -> Vec<u8> {
    let mut out = Vec::new();
    match edits {
        None => {
            export.write(&mut out).unwrap();
        }
        Some(e) => {
            export.write_edited(&e, &mut out).unwrap();
        }
    }
    out
}

/// The entries `LdifSource` reads from `ldif` (anchored on `objectGUID`), by anchor.
fn import(ldif: &[u8]) -> BTreeMap<Anchor, Entry> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("export.ldif");
    std::fs::write(&path, ldif).unwrap();
    let source = LdifSource::new(
        &path,
        LdifSourceConfig {
            anchor_attribute: AttrName::new("objectGUID"),
            ..LdifSourceConfig::default()
        },
    );
    futures::executor::block_on(async {
        let mut stream = source.full_import().await.unwrap();
        let mut out = BTreeMap::new();
        while let Some(item) = stream.next().await {
            if let ImportItem::Item(e) = item.unwrap() {
                let anchor = e.anchor.clone();
                assert!(
                    out.insert(anchor.clone(), e).is_none(),
                    "two entries {anchor}"
                );
            }
        }
        out
    })
}

fn refs<'a>(e: &'a Entry, attribute: &str) -> Vec<&'a Dn> {
    e.get(attribute)
        .map(|vs| {
            vs.iter()
                .map(|v| match v {
                    Value::Reference(Reference::Dn(dn)) => dn,
                    other => panic!("{}: {attribute} {other:?} is not a DN", e.anchor),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn text(e: &Entry, attribute: &str) -> String {
    match e.get(attribute).and_then(|v| v.first()) {
        Some(Value::String(s)) => s.to_string(),
        other => panic!("{}: {attribute} is {other:?}", e.anchor),
    }
}

/// Checks what every export promises and returns the users' DNs → anchors.
fn check_shape(entries: &BTreeMap<Anchor, Entry>) -> HashMap<Dn, Anchor> {
    let by_dn: HashMap<Dn, Anchor> = entries
        .values()
        .map(|e| (e.dn.clone().unwrap(), e.anchor.clone()))
        .collect();
    for e in entries.values() {
        // Every reference names an entry of the export.
        for attribute in ["manager", "member"] {
            for dn in refs(e, attribute) {
                assert!(
                    by_dn.contains_key(dn),
                    "{}: {attribute} {dn} dangles",
                    e.anchor
                );
            }
        }
        if e.object_type.is("user") {
            // 19 attributes besides the manager (objectClass is one attribute of 4 values).
            let n = e.attributes.iter().count() - usize::from(e.get("manager").is_some());
            assert_eq!(n, 17, "{}: {:?}", e.anchor, e.attributes);
            assert_eq!(e.get("objectClass").unwrap().len(), 4);
            assert!(text(e, "mail").ends_with("@contoso.com"));
            assert!(text(e, "extensionAttribute1").ends_with(&text(e, "department")));
        }
    }
    by_dn
}

#[test]
fn the_same_seed_writes_the_same_bytes() {
    let a = ScaleExport::new(200).with_seed(7);
    assert_eq!(bytes(&a, None), bytes(&a, None));
    assert_ne!(bytes(&a, None), bytes(&a.with_seed(8), None));
    let e = Some(Edits::new(3));
    assert_eq!(bytes(&a, e), bytes(&a, e));
    assert_ne!(bytes(&a, e), bytes(&a, Some(Edits::new(4))));
    assert_ne!(bytes(&a, e), bytes(&a, None));
}

#[test]
fn the_export_holds_users_managers_and_groups_as_documented() {
    let export = ScaleExport {
        big_group: 600,
        ..ScaleExport::new(2500).with_seed(11)
    };
    let ldif = bytes(&export, None);
    let written = export.write(std::io::sink()).unwrap();
    assert_eq!(written.bytes, ldif.len() as u64);
    let entries = import(&ldif);
    let by_dn = check_shape(&entries);
    let users: Vec<&Entry> = entries
        .values()
        .filter(|e| e.object_type.is("user"))
        .collect();
    let groups: Vec<&Entry> = entries
        .values()
        .filter(|e| e.object_type.is("group"))
        .collect();
    assert_eq!((users.len(), groups.len()), (2500, 4));
    assert_eq!((written.users, written.groups, written.ous), (2500, 4, 42));
    assert_eq!(export.groups(), 4);
    // A tree ten wide: one user without a manager, every other one reporting to a user
    // created before it (no cycle), at most ten reports each.
    assert_eq!(written.managed, 2499);
    let roots = users.iter().filter(|u| u.get("manager").is_none()).count();
    assert_eq!(roots, 1);
    let mut reports: HashMap<&Dn, usize> = HashMap::new();
    for u in &users {
        for m in refs(u, "manager") {
            *reports.entry(m).or_default() += 1;
            assert!(entries[&by_dn[m]].object_type.is("user"));
        }
    }
    assert!(reports.values().all(|n| *n <= 10));
    assert_eq!(reports.len(), 250);
    let mut sizes: Vec<(String, usize)> = groups
        .iter()
        .map(|g| (text(g, "cn"), refs(g, "member").len()))
        .collect();
    sizes.sort();
    assert_eq!(
        sizes,
        [
            ("All Staff".to_string(), 600),
            ("Team 00000".to_string(), 1000),
            ("Team 00001".to_string(), 1000),
            ("Team 00002".to_string(), 500),
        ]
    );
    assert_eq!(written.members, 3100);
    // Anchors are the GUIDs the generator names.
    assert!(entries.contains_key(&Anchor::from_guid(export.user_guid(0))));
    assert!(entries.contains_key(&Anchor::from_guid(export.user_guid(2499))));
}

#[test]
fn edits_change_delete_and_add_what_their_counts_say() {
    let export = ScaleExport::new(5000).with_seed(5);
    let before = import(&bytes(&export, None));
    let edits = Edits::new(9);
    let mut ldif = Vec::new();
    let edited = export.write_edited(&edits, &mut ldif).unwrap();
    assert_eq!(edited.written.bytes, ldif.len() as u64);
    let after = import(&ldif);
    check_shape(&after);

    // 1 %: one user in 100 touched, as a cycle of ten: a tenth deleted (unless they have
    // reports: then changed), a tenth joined by a new user, the rest changed.
    assert_eq!(edited.users_touched(), 50);
    assert_eq!(edited.added, 5);
    assert_eq!(edited.deleted + edited.changed, 45);
    assert!(edited.deleted >= 3, "{edited:?}");
    let is_user = |e: &Entry| e.object_type.is("user");
    let deleted: Vec<&Anchor> = before.keys().filter(|a| !after.contains_key(*a)).collect();
    let added: Vec<&Anchor> = after.keys().filter(|a| !before.contains_key(*a)).collect();
    assert_eq!(deleted.len(), edited.deleted);
    assert_eq!(added.len(), edited.added);
    assert!(deleted
        .iter()
        .chain(&added)
        .all(|a| { is_user(before.get(*a).or(after.get(*a)).unwrap()) }));
    assert_eq!(
        (edited.written.users, edited.written.groups),
        (5000 - edited.deleted + edited.added, export.groups())
    );

    let mut changed_users = 0;
    let mut changed_groups = 0;
    let mut what: BTreeSet<String> = BTreeSet::new();
    for (anchor, b) in &before {
        let Some(a) = after.get(anchor) else { continue };
        if a == b {
            continue;
        }
        if is_user(b) {
            changed_users += 1;
            let names: BTreeSet<String> = b
                .attributes
                .iter()
                .chain(a.attributes.iter())
                .filter(|(n, _)| a.get(n.as_str()) != b.get(n.as_str()))
                .map(|(n, _)| n.to_string())
                .collect();
            what.insert(names.into_iter().collect::<Vec<_>>().join("+"));
        } else {
            changed_groups += 1;
        }
    }
    assert_eq!(changed_users, edited.changed);
    assert_eq!(changed_groups, edited.groups_changed);
    assert!(changed_groups >= 2, "a team group and All Staff change");
    // Every kind of change happens.
    for w in [
        "title",
        "telephoneNumber",
        "department+extensionAttribute1+title",
        "userAccountControl",
        "manager",
    ] {
        assert!(what.contains(w), "no {w} change among {what:?}");
    }
    // New users report to a user that stays, and are members of a team and of All Staff.
    for a in added {
        let e = &after[a];
        assert_eq!(refs(e, "manager").len(), 1);
        let dn = e.dn.as_ref().unwrap();
        let groups = after
            .values()
            .filter(|g| refs(g, "member").contains(&dn))
            .count();
        assert_eq!(groups, 2, "{dn}");
    }
}
