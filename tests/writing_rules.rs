//! Every snippet of `docs/writing-rules.md` works: each ```` ```toml ```` block compiles as a rule
//! set, and each ```` ```toml ldap-source ```` block reads as an LDAP source configuration (with
//! the `ldap` feature; without it, as TOML); its ```` ```rust ```` blocks are doctests, and a
//! block of any other kind but ```` ```text ```` (output) is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use dirsync::rules::ruleset::RuleSet;

const GUIDE: &str = include_str!("../docs/writing-rules.md");

/// Every fenced block of `text`: (1-based line of the fence, info string, body).
fn code_blocks(text: &str) -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("```") else {
            continue;
        };
        if rest.contains('`') {
            // Not a fence (CommonMark: a backtick fence's info string has no backtick): inline
            // code at the start of a line, such as ```` ```toml ````.
            continue;
        }
        let body: Vec<&str> = lines
            .by_ref()
            .map(|(_, l)| l)
            .take_while(|l| l.trim_start() != "```")
            .collect();
        out.push((i + 1, rest.trim().to_owned(), body.join("\n")));
    }
    out
}

/// The fenced blocks of `text` with the given info string: (1-based line of the fence, body).
fn blocks(text: &str, info: &str) -> Vec<(usize, String)> {
    code_blocks(text)
        .into_iter()
        .filter(|(_, i, _)| i == info)
        .map(|(line, _, body)| (line, body))
        .collect()
}

/// Only blocks a test checks (rule sets, source configurations, doctests) or output (`text`):
/// a snippet of another kind would go unchecked.
#[test]
fn every_code_block_of_the_guide_is_checked() {
    let all = code_blocks(GUIDE);
    for (line, info, _) in &all {
        assert!(
            matches!(info.as_str(), "toml" | "toml ldap-source" | "rust" | "text"),
            "docs/writing-rules.md:{line}: a ```{info} block; write rule sets as ```toml, \
             source configurations as ```toml ldap-source, code as ```rust (a doctest)"
        );
    }
    // The Rust blocks run as doctests (src/lib.rs includes the guide under cfg(doctest)).
    assert!(all.iter().filter(|(_, i, _)| i == "rust").count() >= 5);
}

#[test]
fn every_rule_set_of_the_guide_compiles() {
    let sets = blocks(GUIDE, "toml");
    assert!(sets.len() >= 10, "found {} rule sets", sets.len());
    for (line, body) in sets {
        if let Err(e) = RuleSet::from_toml(&body, Some("docs/writing-rules.md")) {
            panic!("the rule set at docs/writing-rules.md:{line} does not compile:\n{e}");
        }
    }
}

#[test]
fn every_source_configuration_of_the_guide_reads() {
    let sources = blocks(GUIDE, "toml ldap-source");
    assert!(!sources.is_empty());
    for (line, body) in sources {
        #[cfg(feature = "ldap")]
        {
            let c: dirsync::connector::ldap::LdapSourceConfig = toml::from_str(&body)
                .unwrap_or_else(|e| panic!("docs/writing-rules.md:{line}: {e}"));
            assert!(
                c.object_types.values().any(|t| t.is("container")),
                "docs/writing-rules.md:{line}: the OUs are imported"
            );
        }
        #[cfg(not(feature = "ldap"))]
        {
            let _: toml::Table = toml::from_str(&body)
                .unwrap_or_else(|e| panic!("docs/writing-rules.md:{line}: {e}"));
        }
    }
}

#[test]
fn a_broken_snippet_is_caught() {
    let text = "intro\n```toml\n[[rule]]\nname = 'x'\n```\n";
    let found = blocks(text, "toml");
    assert_eq!(found.len(), 1);
    assert!(RuleSet::from_toml(&found[0].1, None).is_err());
}

/// The Deprovisioning section: the single form applies to every cause, the table form names each,
/// and Entra provisioning's policy (its first rule set) disables a user who leaves scope,
/// re-enables the same object when it returns, and deletes a user deleted at the source.
#[test]
fn the_deprovisioning_snippets_behave_as_the_guide_says() {
    use dirsync::delta::{self, DeprovisionCause, Links, PlanInput, SourceMirror, TargetMirror};
    use dirsync::model::{Entry, Value};
    use dirsync::rules::ruleset::{DeprovisionConfig, DeprovisionPolicy};

    let section = &GUIDE[GUIDE.find("\n## Deprovisioning").unwrap()..];
    let section = &section[..section[1..].find("\n## ").unwrap_or(section.len() - 1) + 1];
    let rules: Vec<RuleSet> = blocks(section, "toml")
        .iter()
        .map(|(_, t)| RuleSet::from_toml(t, None).unwrap())
        .collect();
    assert_eq!(rules.len(), 4);
    let entra = &rules[0];
    let d = &entra.config().rules[0].deprovision;
    assert!(matches!(d.left_scope, DeprovisionPolicy::Disable { .. }));
    assert_eq!(d.deleted, DeprovisionPolicy::Delete);
    assert_eq!(
        d.type_changed,
        DeprovisionPolicy::Delete,
        "a cause not named deletes"
    );
    assert_eq!(
        rules[1].config().rules[0].deprovision,
        DeprovisionConfig::all(DeprovisionPolicy::Unlink)
    );
    assert_eq!(
        rules[2].config().rules[0]
            .deprovision
            .policy(DeprovisionCause::TypeChanged),
        &DeprovisionPolicy::Unlink
    );

    let (mut mirror, mut links, mut target) =
        (SourceMirror::new(), Links::new(), TargetMirror::new());
    let ad = |a: &str, uac: i64| {
        Entry::new(a, "user")
            .with("objectGUID", a)
            .with("userAccountControl", Value::Integer(uac))
    };
    let step = |mirror: &SourceMirror, links: &mut Links, target: &mut TargetMirror| {
        let plan = delta::plan(&PlanInput::new(entra, mirror, links, target));
        dirsync::testkit::apply_accepted(&plan, links, target);
        plan
    };
    mirror.insert(ad("g1", 512));
    mirror.insert(ad("g2", 512));
    assert_eq!(step(&mirror, &mut links, &mut target).count("create"), 2);
    let id = links.get(&"g1".into()).unwrap().target_id.clone();
    mirror.insert(ad("g1", 514));
    assert_eq!(step(&mirror, &mut links, &mut target).count("disable"), 1);
    mirror.insert(ad("g1", 512));
    let p = step(&mirror, &mut links, &mut target);
    assert_eq!((p.count("update"), p.count("create")), (1, 0), "{p}");
    assert_eq!(links.get(&"g1".into()).unwrap().target_id, id);
    let active = target
        .get(&id)
        .and_then(|o| o.attributes.first("active").cloned());
    assert_eq!(active, Some(Value::Boolean(true)));
    mirror.remove(&"g2".into());
    assert_eq!(step(&mirror, &mut links, &mut target).count("delete"), 1);
}
