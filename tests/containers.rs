//! Container scope through the rules and the planner (no server): a rule scoped to OU=Staff minus
//! OU=Contractors, through an initial load, a rename and move of the OU, single objects moved out
//! of the subtree and into the excluded one, a sub-OU moved out (a wave the guard holds, naming
//! the container), the container deleted under its objects, and the rule-file errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use dirsync::delta::{
    self, ContainerBindings, ContainerRef, DeletionGuard, Links, OperationKind, Plan, PlanInput,
    Projection, ProjectionContext, Reason, SourceMirror, TargetMirror,
};
use dirsync::model::{Dn, Entry};
use dirsync::rules::ruleset::{ContainerConfig, RuleBuilder, RuleSet};
use dirsync::testkit;

const RULES: &str = r#"
[[rule]]
name = "staff"
source_type = "user"
target_type = "User"
join = [["userName"]]

[rule.containers]
include = ["OU=Staff,DC=corp,DC=example"]
exclude = ["ou=contractors, ou=staff, dc=corp, dc=example"]

[[rule.flow]]
target = "userName"
expression = '[cn]'
"#;

fn dn(s: &str) -> Dn {
    Dn::parse(s).unwrap()
}

fn ou(anchor: &str, at: &str) -> Entry {
    Entry::new(anchor, "container").with_dn(dn(at))
}

fn person(anchor: &str, at: &str) -> Entry {
    Entry::new(anchor, "user")
        .with_dn(dn(&format!("CN={anchor},{at}")))
        .with("cn", anchor)
}

const STAFF: &str = "OU=Staff,DC=corp,DC=example";
const CONTRACTORS: &str = "OU=Contractors,OU=Staff,DC=corp,DC=example";
const SALES: &str = "OU=Sales,OU=Staff,DC=corp,DC=example";
const ARCHIVE: &str = "OU=Archive,DC=corp,DC=example";

/// The source, its links and target, and the container bindings the engine would remember.
struct World {
    rules: RuleSet,
    mirror: SourceMirror,
    links: Links,
    target: TargetMirror,
    bindings: ContainerBindings,
    guard: DeletionGuard,
}

/// The OUs; Ann in Staff, Cy in Contractors, Zed in Archive, s0–s6 in Sales.
fn directory() -> Vec<Entry> {
    let mut out = vec![
        ou("staff", STAFF),
        ou("contractors", CONTRACTORS),
        ou("sales", SALES),
        ou("archive", ARCHIVE),
        person("ann", STAFF),
        person("cy", CONTRACTORS),
        person("zed", ARCHIVE),
    ];
    out.extend((0..7).map(|i| person(&format!("s{i}"), SALES)));
    out
}

impl World {
    fn new() -> World {
        let mut mirror = SourceMirror::new();
        for e in directory() {
            mirror.insert(e);
        }
        World {
            rules: RuleSet::from_toml(RULES, Some("rules.toml")).unwrap(),
            mirror,
            links: Links::new(),
            target: TargetMirror::new().with_index("userName"),
            bindings: ContainerBindings::new(),
            // The ratio and count limits out of the way: the container wave is what is tested.
            guard: DeletionGuard {
                max_ratio: 1.0,
                ..DeletionGuard::default()
            },
        }
    }

    /// Binds the rules' containers as the engine does (keeping earlier bindings) and plans.
    fn plan(&mut self) -> Plan {
        let named = self.rules.containers();
        self.bindings = ContainerBindings::resolve(&named, &self.mirror, &self.bindings);
        let mut input = PlanInput::new(&self.rules, &self.mirror, &self.links, &self.target);
        input.containers = Some(&self.bindings);
        input.guard = self.guard;
        delta::plan(&input)
    }

    fn apply(&mut self, plan: &Plan) {
        testkit::apply_accepted(plan, &mut self.links, &mut self.target);
    }

    /// Moves the object `anchor` (and everything below it, as the state store does) to `to`.
    fn rename(&mut self, anchor: &str, to: &str) {
        let from = self.mirror.get(&anchor.into()).unwrap().dn.clone().unwrap();
        let to = dn(to);
        let below: Vec<Entry> = self
            .mirror
            .entries()
            .filter(|e| e.dn.as_ref().is_some_and(|d| d.is_descendant_of(&from)))
            .cloned()
            .collect();
        for mut e in below {
            let d = e.dn.clone().unwrap();
            let keep = d.len() - from.len();
            e.dn = Some(Dn::from_rdns(
                d.rdns().iter().take(keep).chain(to.rdns()).cloned(),
            ));
            self.mirror.insert(e);
        }
        let mut e = self.mirror.get(&anchor.into()).unwrap().clone();
        e.dn = Some(to);
        self.mirror.insert(e);
    }

    fn linked(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .links
            .iter()
            .map(|l| l.anchor.as_str().to_owned())
            .collect();
        v.sort();
        v
    }
}

fn left_scope(plan: &Plan) -> Vec<(String, String, Option<Dn>)> {
    plan.operations
        .iter()
        .filter_map(|o| match &o.reason {
            Reason::LeftScope { why, container } => {
                Some((o.anchor.as_str().to_owned(), why.clone(), container.clone()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn an_ou_scope_survives_rename_and_move_and_holds_waves() {
    let mut w = World::new();
    let first = w.plan();
    assert_eq!(first.count("create"), 8, "{first}");
    assert!(!first.is_held());
    w.apply(&first);
    assert_eq!(
        w.linked(),
        ["ann", "s0", "s1", "s2", "s3", "s4", "s5", "s6"],
        "Staff and its Sales sub-OU, not Contractors, not Archive"
    );

    // OU=Staff renamed "Personnel" and moved under OU=Archive: its objects follow, nothing
    // leaves scope, nothing changes.
    w.rename("staff", "OU=Personnel,OU=Archive,DC=corp,DC=example");
    let after = w.plan();
    assert!(after.is_empty(), "{after}");
    assert_eq!(after.stats.in_scope, 8);
    // Without the remembered bindings the configured DN names nothing any more: all eight
    // would leave scope — the wave the guard holds, naming the container.
    let fresh =
        ContainerBindings::resolve(&w.rules.containers(), &w.mirror, &ContainerBindings::new());
    let mut input = PlanInput::new(&w.rules, &w.mirror, &w.links, &w.target);
    input.containers = Some(&fresh);
    input.guard = w.guard;
    let unbound = delta::plan(&input);
    assert_eq!(left_scope(&unbound).len(), 8, "{unbound}");
    assert!(unbound.is_held());
    let waves: Vec<(Option<Dn>, usize)> = unbound
        .guard_violations
        .iter()
        .map(|v| (v.container.clone(), v.deletions))
        .collect();
    assert_eq!(
        waves,
        [
            (Some(dn("OU=Personnel,OU=Archive,DC=corp,DC=example")), 8),
            (
                Some(dn("OU=Sales,OU=Personnel,OU=Archive,DC=corp,DC=example")),
                7
            )
        ],
        "the renamed OU, and the sub-OU holding most of the wave"
    );
    let shown = unbound.guard_violations[0].to_string();
    assert!(shown.contains("container scope"), "{shown}");

    // Ann moved out of the subtree (to OU=Archive): she leaves scope, the reason names where.
    w.rename("ann", &format!("CN=ann,{ARCHIVE}"));
    // s0 moved into the excluded sub-OU (which moved along with Staff).
    w.rename(
        "s0",
        "CN=s0,OU=Contractors,OU=Personnel,OU=Archive,DC=corp,DC=example",
    );
    let moved = w.plan();
    assert!(!moved.is_held(), "two objects are no wave: {moved}");
    let left = left_scope(&moved);
    assert_eq!(left.len(), 2, "{moved}");
    assert_eq!(left[0].0, "ann");
    assert!(
        left[0].1.contains("outside the included containers"),
        "{}",
        left[0].1
    );
    assert!(
        left[0]
            .1
            .contains("OU=Staff,DC=corp,DC=example (now OU=Personnel,OU=Archive"),
        "the configured DN and where the container is now: {}",
        left[0].1
    );
    assert_eq!(left[0].2, Some(dn(ARCHIVE)));
    assert_eq!(left[1].0, "s0");
    assert!(
        left[1].1.contains("under excluded container"),
        "{}",
        left[1].1
    );
    assert!(moved
        .operations
        .iter()
        .all(|o| matches!(o.kind, OperationKind::Delete { .. })));
    w.apply(&moved);

    // The Sales sub-OU (six objects left) moved out of the subtree: a wave, held; the guard
    // names the container they are under.
    w.rename("sales", "OU=Sales,DC=corp,DC=example");
    let wave = w.plan();
    assert_eq!(left_scope(&wave).len(), 6, "{wave}");
    assert!(wave.is_held(), "{wave}");
    assert_eq!(wave.guard_violations.len(), 1, "{wave}");
    let v = &wave.guard_violations[0];
    assert_eq!(v.container, Some(dn("OU=Sales,DC=corp,DC=example")));
    assert_eq!((v.deletions, v.limit), (6, 5));
    assert!(
        wave.to_string().contains(
            "HELD: deletion guard: 6 linked User objects under OU=Sales,DC=corp,DC=example"
        ),
        "{wave}"
    );
    // A larger limit lets it through (the ratio guard is out of the way here).
    w.guard.max_container_wave = 6;
    assert!(!w.plan().is_held());
    w.guard.max_container_wave = 5;

    // Sales moved back: nothing left scope.
    w.rename(
        "sales",
        "OU=Sales,OU=Personnel,OU=Archive,DC=corp,DC=example",
    );
    assert!(w.plan().is_empty());
}

#[test]
fn a_deleted_container_takes_nothing_into_scope() {
    let mut w = World::new();
    let first = w.plan();
    w.apply(&first);
    // The source reports the OU deleted while objects stay below its last DN (the mirror has
    // not caught up with them): they leave scope, and the reason says the container is gone.
    // Sales is no configured container: its objects stay in Staff's subtree, by their DNs.
    w.mirror.remove(&"sales".into());
    let p = w.plan();
    assert!(p.is_empty(), "{p}");
    // Deleting Staff itself: its objects leave scope as objects of a gone container.
    let mut w = World::new();
    let first = w.plan();
    w.apply(&first);
    w.mirror.remove(&"staff".into());
    let p = w.plan();
    assert_eq!(left_scope(&p).len(), 8, "{p}");
    assert!(
        left_scope(&p)
            .iter()
            .all(|(_, why, _)| why.contains("is gone from the source")),
        "{p}"
    );
    assert!(p.is_held());
}

/// Objects without a DN, containers by anchor, the builder and explain.
#[test]
fn objects_without_a_dn_or_rule_stay_out() {
    let rules = RuleSet::builder()
        .rule(
            RuleBuilder::new("users", "user", "User")
                .flow("userName", "[cn]")
                .include_container(STAFF)
                .exclude_container(ContainerConfig::anchor("contractors")),
        )
        .build()
        .unwrap();
    assert_eq!(
        rules.containers(),
        [
            ContainerRef::Dn(dn(STAFF)),
            ContainerRef::Anchor("contractors".into())
        ]
    );
    let mut mirror = SourceMirror::new();
    mirror.insert(ou("staff", STAFF));
    mirror.insert(ou("contractors", CONTRACTORS));
    mirror.insert(Entry::new("nodn", "user").with("cn", "x"));
    mirror.insert(person("cy", CONTRACTORS));
    mirror.insert(person("ann", STAFF));
    let target = TargetMirror::new();
    let bindings =
        ContainerBindings::resolve(&rules.containers(), &mirror, &ContainerBindings::new());
    let ctx =
        ProjectionContext::new(chrono::Utc::now(), 0, &mirror, &target).with_containers(&bindings);
    let at = |a: &str| rules.project(mirror.get(&a.into()).unwrap(), &ctx);
    assert!(matches!(at("ann"), delta::Projected::InScope(_)));
    assert!(
        matches!(at("cy"), delta::Projected::OutOfContainer { why, .. } if why.contains("anchor contractors") || why.contains("OU=Contractors")),
        "{:?}",
        at("cy")
    );
    assert!(matches!(
        at("nodn"),
        delta::Projected::OutOfContainer {
            container: None,
            ..
        }
    ));
    // Explain shows the container decision.
    let x = rules.explain(mirror.get(&"cy".into()).unwrap(), &ctx);
    assert!(!x.in_scope);
    assert!(
        x.to_string()
            .contains("containers: under excluded container"),
        "{x}"
    );
    let x = rules.explain(mirror.get(&"ann".into()).unwrap(), &ctx);
    assert!(x.in_scope);
    assert!(
        x.to_string().contains(
            "containers: under included container OU=Staff,DC=corp,DC=example, anchor staff"
        ),
        "{x}"
    );
}

#[test]
fn container_errors_point_at_their_line_and_column() {
    let text = r#"
[[rule]]
name = "staff"
source_type = "user"
target_type = "User"

[rule.containers]
include = ["OU=Staff,DC=corp", "OU=Bad,,DC=corp", { anchor = "" }]
exclude = [{ dn = "ou=staff, dc=corp" }]
"#;
    let errs = RuleSet::from_toml(text, Some("rules.toml")).unwrap_err();
    let got: Vec<(&str, Option<usize>, Option<usize>)> = errs
        .0
        .iter()
        .map(|e| (e.code.as_str(), e.line, e.column))
        .collect();
    assert_eq!(
        got,
        [
            ("E0507", Some(8), Some(32)),
            ("E0507", Some(8), Some(51)),
            ("E0508", Some(9), Some(12)),
        ],
        "{errs}"
    );
    let shown = errs.to_string();
    assert!(shown.contains("rules.toml:8:32"), "{shown}");
    assert!(shown.contains("invalid DN \"OU=Bad,,DC=corp\""), "{shown}");
    assert!(shown.contains("both included and excluded"), "{shown}");
    assert!(shown.contains("rule \"staff\""), "{shown}");
    // A table with another key, or both keys, is a syntax error at its place.
    let bad = RuleSet::from_toml(
        "[[rule]]\nname='a'\nsource_type='u'\ntarget_type='U'\n[rule.containers]\ninclude = [{ guid = 'x' }]\n",
        Some("x.toml"),
    )
    .unwrap_err();
    assert_eq!(bad.0[0].code, "E0501");
    assert_eq!(bad.0[0].line, Some(6), "{bad}");
    assert!(bad.to_string().contains("guid"), "{bad}");
    let both = RuleSet::from_toml(
        "[[rule]]\nname='a'\nsource_type='u'\ntarget_type='U'\n[rule.containers]\ninclude = [{ dn = 'ou=a', anchor = 'x' }]\n",
        None,
    )
    .unwrap_err();
    assert!(both.to_string().contains("not both"), "{both}");
    // JSON carries the same structure, and serializes back to it.
    let json = r#"{"rule": [{"name": "a", "source_type": "u", "target_type": "U",
        "containers": {"include": ["OU=Staff,DC=corp"], "exclude": [{"anchor": "c-1"}]}}]}"#;
    let rules = RuleSet::from_json(json, None).unwrap();
    let again = serde_json::to_value(rules.config()).unwrap();
    assert_eq!(
        again["rule"][0]["containers"],
        serde_json::json!({"include": ["OU=Staff,DC=corp"], "exclude": [{"anchor": "c-1"}]})
    );
}

/// The engine remembers the bindings in its state store: across a restart (a reopened SQLite
/// file), a renamed and moved OU keeps its objects in scope; a sub-OU moved out is a wave the
/// engine holds, with the container named in the run report.
#[test]
fn the_engine_remembers_bindings_across_runs() {
    use std::sync::Arc;

    use dirsync::connector::memory::{MemorySource, MemoryTarget};
    use dirsync::engine::{EngineConfig, Synchronizer};
    use dirsync::state::SqliteStore;

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.sqlite");
    let source = MemorySource::new("ad");
    for e in directory() {
        source.add(e).unwrap();
    }
    let target = MemoryTarget::new("app").unique_attribute("User", "userName");
    let rules = Arc::new(RuleSet::from_toml(RULES, Some("rules.toml")).unwrap());
    let engine = |store: SqliteStore| {
        Synchronizer::new(
            Box::new(source.clone()),
            Box::new(target.clone()),
            Box::new(store),
            rules.clone(),
            EngineConfig {
                guard: DeletionGuard {
                    max_ratio: 1.0,
                    ..DeletionGuard::default()
                },
                ..EngineConfig::default()
            },
        )
    };
    futures::executor::block_on(async {
        let mut sync = engine(SqliteStore::open(&state).unwrap());
        let r = sync.run_cycle().await.unwrap();
        assert_eq!(r.count("create"), 8, "{r}");
        let bound = sync.with_store(|s| s.container_bindings()).unwrap();
        assert_eq!(
            bound
                .get(&ContainerRef::Dn(dn(STAFF)))
                .and_then(|b| b.anchor.clone()),
            Some("staff".into())
        );
        drop(sync);

        source
            .rename(
                &"staff".into(),
                dn("OU=Personnel,OU=Archive,DC=corp,DC=example"),
            )
            .unwrap();
        let mut sync = engine(SqliteStore::open(&state).unwrap());
        let r = sync.run_cycle().await.unwrap();
        assert_eq!(r.total_done(), 0, "{r}");
        assert!(!r.held, "{r}");
        assert_eq!(target.len(), 8);
        // A full sync agrees.
        let r = sync.full_sync().await.unwrap();
        assert_eq!(r.total_done(), 0, "{r}");

        source
            .rename(&"sales".into(), dn("OU=Sales,DC=corp,DC=example"))
            .unwrap();
        let r = sync.run_cycle().await.unwrap();
        assert!(r.held, "{r}");
        assert_eq!(target.len(), 8, "nothing written");
        let staged = sync.plan(false).unwrap();
        assert!(staged
            .plan
            .guard_violations
            .iter()
            .any(|v| v.container == Some(dn("OU=Sales,DC=corp,DC=example")) && v.deletions == 7));
        sync.allow_deletions_once();
        let r = sync.run_cycle().await.unwrap();
        assert_eq!(r.count("delete"), 7, "{r}");
        assert_eq!(target.len(), 1);
    });
}
