//! Every snippet of `docs/writing-rules.md` works: each ```` ```toml ```` block compiles as a rule
//! set, and each ```` ```toml ldap-source ```` block reads as an LDAP source configuration (with
//! the `ldap` feature; without it, as TOML).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use dirsync::rules::ruleset::RuleSet;

const GUIDE: &str = include_str!("../docs/writing-rules.md");

/// The fenced blocks of `text` with the given info string: (1-based line of the fence, body).
fn blocks<'a>(text: &'a str, info: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("```") else {
            continue;
        };
        let body: Vec<&'a str> = lines
            .by_ref()
            .map(|(_, l)| l)
            .take_while(|l| l.trim_start() != "```")
            .collect();
        if rest.trim() == info {
            out.push((i + 1, body.join("\n")));
        }
    }
    out
}

#[test]
fn every_rule_set_of_the_guide_compiles() {
    let sets = blocks(GUIDE, "toml");
    assert!(sets.len() >= 4, "found {} rule sets", sets.len());
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
