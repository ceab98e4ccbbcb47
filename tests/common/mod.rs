//! Helpers shared by integration tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Builds the `sync` example and returns its path, as cargo reports it. Every test builds it
/// with the same features as the test build (`--all-features`): one artifact, built once, never
/// replaced under a running test.
pub fn build_sync() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "--all-features",
            "--example",
            "sync",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .expect("cargo build --example sync");
    assert!(out.status.success(), "building the sync example failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "sync")
        .and_then(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo did not report the sync example's executable")
}

/// The example directory, `examples/data/corp.ldif` (an Active Directory export), as a source:
/// anchored on objectGUID, which the file holds as GUID text.
#[cfg(feature = "ldif")]
pub fn example_directory() -> dirsync::connector::ldif::LdifSource {
    use dirsync::connector::ldif::{default_binary_attributes, LdifSource, LdifSourceConfig};
    LdifSource::new(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/corp.ldif"),
        LdifSourceConfig {
            anchor_attribute: dirsync::model::AttrName::new("objectGUID"),
            binary_attributes: default_binary_attributes()
                .into_iter()
                .filter(|a| !a.is("objectGUID"))
                .collect(),
            ..LdifSourceConfig::default()
        },
    )
}

/// The rule set `examples/rules/<name>`.
pub fn example_rules(name: &str) -> dirsync::rules::ruleset::RuleSet {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/rules")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    dirsync::rules::ruleset::RuleSet::from_toml(&text, Some(name)).unwrap()
}

/// The target ids, sorted, of the linked objects that source object `anchor` references in
/// `attribute`: what its target object should hold.
pub fn linked_references(
    views: &dirsync::state::Views,
    anchor: &dirsync::model::Anchor,
    attribute: &str,
) -> Vec<String> {
    let mut ids: Vec<String> = views
        .mirror
        .get(anchor)
        .and_then(|e| e.get(attribute))
        .into_iter()
        .flatten()
        .filter_map(|v| match v {
            dirsync::model::Value::Reference(r) => views.mirror.resolve(r),
            _ => None,
        })
        .filter_map(|a| views.links.get(&a).map(|l| l.target_id.to_string()))
        .collect();
    ids.sort();
    ids
}

/// The objects of a memory target by name (`userName` or `displayName`), to check references.
pub struct Named<'a>(pub &'a dirsync::connector::memory::MemoryTarget);

impl Named<'_> {
    /// The target id of the object named `name`.
    pub fn id(&self, name: &str) -> String {
        self.0
            .objects()
            .into_iter()
            .find(|o| {
                o.attributes.first_str("userName") == Some(name)
                    || o.attributes.first_str("displayName") == Some(name)
            })
            .map(|o| o.id.to_string())
            .unwrap_or_else(|| panic!("{name} is in the target"))
    }

    /// The target ids of `names`, sorted.
    pub fn ids(&self, names: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = names.iter().map(|n| self.id(n)).collect();
        v.sort();
        v
    }

    /// The target ids the object named `name` references in `attr`, sorted.
    pub fn refs(&self, name: &str, attr: &str) -> Vec<String> {
        use dirsync::model::{Reference, Value};
        let id = self.id(name);
        let o = self
            .0
            .objects()
            .into_iter()
            .find(|o| o.id.as_str() == id)
            .unwrap();
        let mut v: Vec<String> = o
            .attributes
            .get(attr)
            .map(|vs| {
                vs.iter()
                    .map(|v| match v {
                        Value::Reference(Reference::Target(t)) => t.to_string(),
                        other => panic!("{attr} of {name}: {other:?}"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}
