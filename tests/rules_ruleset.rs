//! Rule sets: loading (TOML, JSON, builder), diagnostics with file positions, the realistic
//! example rule set as a projection, and explain.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use dirsync::delta::{
    self, Links, PlanInput, Projected, Projection, ProjectionContext, SourceMirror, TargetMirror,
};
use dirsync::model::{Entry, TargetObject, Value};
use dirsync::rules::ruleset::{RuleBuilder, RuleSet};
use dirsync::testkit::{self, Fixture};

const EXAMPLE: &str = include_str!("../examples/rules/ad-to-scim.toml");

fn example() -> RuleSet {
    RuleSet::from_toml(EXAMPLE, Some("examples/rules/ad-to-scim.toml"))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn project(rules: &RuleSet, e: &Entry) -> Projected {
    let (m, t) = (SourceMirror::new(), TargetMirror::new());
    let ctx = ProjectionContext::new(chrono::DateTime::UNIX_EPOCH, 7, &m, &t);
    rules.project(e, &ctx)
}

fn flow<'a>(p: &'a Projected, name: &str) -> Option<&'a dirsync::model::Values> {
    match p {
        Projected::InScope(d) => d
            .flows
            .iter()
            .find(|f| f.attribute.is(name))
            .map(|f| &f.values),
        _ => None,
    }
}

#[test]
fn example_rule_set_projects_an_ad_user() {
    let rules = example();
    let mut fx = Fixture::new(1);
    let u = testkit::ad_user(5, &mut fx); // i % 5 == 0: no mail
    let p = project(&rules, &u);
    let text = |n: &str| flow(&p, n).and_then(|v| v.first()).map(|v| v.to_string());
    let upn = u
        .attributes
        .first_str("userPrincipalName")
        .unwrap()
        .to_string();
    assert_eq!(text("userName"), Some(upn.to_lowercase()));
    // No mail: the UPN moved to the public domain by the regex Replace.
    assert_eq!(
        text(r#"emails[type eq "work"].value"#),
        Some(upn.replace("@corp.contoso.com", "@contoso.com"))
    );
    assert_eq!(text("active"), Some("TRUE".into()));
    assert_eq!(
        text("displayName"),
        Some(format!(
            "{} {}",
            u.attributes.first_str("givenName").unwrap(),
            u.attributes.first_str("sn").unwrap()
        ))
    );
    assert_eq!(
        text("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:organization"),
        Some("Fabrikam".into())
    );
    assert_eq!(
        text("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:costCenter"),
        Some("CC1005".into())
    );
    assert_eq!(
        text("urn:ietf:params:scim:schemas:extension:dirsync:2.0:User:hireDate"),
        Some("2024-06-06".into())
    );
    let manager = flow(
        &p,
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager",
    )
    .unwrap();
    assert!(manager[0].is_reference());
    let Projected::InScope(d) = &p else { panic!() };
    assert_eq!(d.join.len(), 2);
    // A disabled account (userAccountControl 514) flows active = false.
    let disabled = testkit::ad_user(7, &mut fx);
    assert_eq!(
        flow(&project(&rules, &disabled), "active").unwrap()[0],
        Value::Boolean(false)
    );
}

#[test]
fn scoping_filter_of_the_example_excludes_service_accounts() {
    let rules = example();
    let mut fx = Fixture::new(1);
    let svc = testkit::ad_user(3, &mut fx)
        .with_values("sAMAccountName", dirsync::model::values(["svc-backup"]));
    assert!(matches!(project(&rules, &svc), Projected::OutOfScope(_)));
    let critical = testkit::ad_user(4, &mut fx).with("isCriticalSystemObject", true);
    assert!(matches!(
        project(&rules, &critical),
        Projected::OutOfScope(_)
    ));
    let computer = Entry::new("c1", "computer");
    assert!(
        matches!(project(&rules, &computer), Projected::OutOfScope(r) if r.contains("no rule"))
    );
}

#[test]
fn toml_errors_point_at_file_line_and_column_with_suggestions() {
    let text = r#"
[[rule]]
name = "users"
source_type = "user"
target_type = "User"
join = [["mail"]]

[[rule.flow]]
target = "displayName"
expression = 'Coalese([givenName], "x")'

[[rule.flow]]
target = "userName"
expression = 'ToLower([upn]'
"#;
    let errs = RuleSet::from_toml(text, Some("rules.toml")).unwrap_err();
    let codes: Vec<&str> = errs.0.iter().map(|e| e.code.as_str()).collect();
    assert_eq!(codes, ["E0120", "E0113", "E0502"], "{errs}");
    let e = &errs.0[0];
    assert_eq!(
        (e.rule.as_deref(), e.attribute.as_deref()),
        (Some("users"), Some("displayName"))
    );
    assert_eq!((e.line, e.column), (Some(10), Some(15)));
    let shown = errs.to_string();
    assert!(shown.contains("rules.toml:10:15"), "{shown}");
    assert!(
        shown.contains("Coalesce"),
        "suggests the closest name: {shown}"
    );
    assert!(shown.contains("^"), "{shown}");
    // A TOML syntax error has its position too.
    let bad = RuleSet::from_toml("[[rule]]\nname = \n", Some("x.toml")).unwrap_err();
    assert_eq!(bad.0[0].code, "E0501");
    assert_eq!(bad.0[0].line, Some(2));
    // Unknown fields are errors, not silently ignored.
    let unknown = RuleSet::from_toml(
        "[[rule]]\nname='a'\nsource_type='u'\ntarget_type='U'\nscoping = 1\n",
        None,
    )
    .unwrap_err();
    assert!(unknown.to_string().contains("scoping"), "{unknown}");
}

#[test]
fn scope_and_literal_errors_are_reported_with_the_rule() {
    let text = r#"
[[rule]]
name = "users"
source_type = "user"
target_type = "User"
[rule.scope]
family = "provisioning"
groups = [[{ attribute = "department", operator = "ENDSWITH", value = "x" }]]
[[rule.flow]]
target = "x"
expression = 'Replace([a], , "(unclosed", , "y", , )'
"#;
    let errs = RuleSet::from_toml(text, Some("r.toml")).unwrap_err();
    let codes: Vec<&str> = errs.0.iter().map(|e| e.code.as_str()).collect();
    assert_eq!(codes, ["E0403", "E0210"], "{errs}");
    assert!(errs.0[0].message.contains("ENDS_WITH"), "{errs}");
}

#[test]
fn builder_and_json_compile_the_same_rules() {
    let built = RuleSet::builder()
        .rule(
            RuleBuilder::new("users", "user", "User")
                .flow("userName", "ToLower([userPrincipalName])")
                .join(["userName"])
                .disable_with("active", false),
        )
        .build()
        .unwrap();
    let json = serde_json::to_string(built.config()).unwrap();
    let loaded = RuleSet::from_json(&json, None).unwrap();
    assert_eq!(loaded.config(), built.config());
    let e = Entry::new("a", "user").with("userPrincipalName", "Ada@Contoso.com");
    assert_eq!(
        flow(&project(&loaded, &e), "userName").unwrap()[0],
        Value::string("ada@contoso.com")
    );
}

#[test]
fn explain_shows_scope_join_and_flows() {
    let rules = example();
    let mut fx = Fixture::new(3);
    let u = testkit::ad_user(12, &mut fx);
    let mut m = SourceMirror::new();
    m.insert(u.clone());
    let upn = u
        .attributes
        .first_str("userPrincipalName")
        .unwrap()
        .to_lowercase();
    let t = TargetMirror::new().with_index("userName");
    let mut t = t;
    t.insert(TargetObject::new("scim-1", "User").with("userName", upn.as_str()));
    let ctx = ProjectionContext::new(chrono::DateTime::UNIX_EPOCH, 7, &m, &t);
    let x = rules.explain(&u, &ctx);
    assert!(x.in_scope);
    assert_eq!(x.rule.as_deref(), Some("users"));
    let scope = x.scope.as_ref().unwrap();
    assert_eq!(scope.groups[0].len(), 3);
    assert!(scope.groups[0].iter().all(|c| c.result));
    assert_eq!(x.join[1].candidates, ["scim-1"]);
    assert!(x
        .flows
        .iter()
        .any(|f| f.target == "userName" && f.result.contains(&upn)));
    let shown = x.to_string();
    assert!(shown.contains("join group 2"), "{shown}");
}

#[test]
fn example_rules_plan_an_initial_load_and_converge() {
    let rules = example();
    let mut fx = Fixture::new(9);
    let mut m = SourceMirror::new();
    for i in 0..50 {
        m.insert(testkit::ad_user(i, &mut fx));
    }
    let (links, t) = (Links::new(), TargetMirror::new());
    let plan = delta::plan(&PlanInput::new(&rules, &m, &links, &t));
    assert_eq!(plan.count("create"), 50);
    assert!(
        plan.issues
            .iter()
            .all(|i| matches!(i, delta::Issue::UnresolvedReference { .. })),
        "{plan}"
    );
}

/// A rule set, counting how often its fast path answered "unchanged" and checking every answer
/// against projecting and comparing each flow as the planner does (with the planner's context,
/// so references translate through the plan's links): the fast path must be right and complete.
struct Counting<'a>(&'a RuleSet, std::sync::atomic::AtomicUsize);

impl Projection for Counting<'_> {
    fn project(&self, entry: &Entry, ctx: &ProjectionContext<'_>) -> Projected {
        self.0.project(entry, ctx)
    }
    fn unchanged(
        &self,
        entry: &Entry,
        current: &TargetObject,
        ctx: &ProjectionContext<'_>,
    ) -> Option<bool> {
        let answer = self.0.unchanged(entry, current, ctx);
        let holds = match self.0.project(entry, ctx) {
            Projected::InScope(d) => {
                d.target_type == current.object_type
                    && d.flows.iter().all(|f| {
                        ctx.flow_holds(f, &f.values, current.attributes.get(f.attribute.as_str()))
                    })
            }
            _ => false,
        };
        assert_eq!(answer, Some(holds), "{}", entry.anchor);
        if answer == Some(true) {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        answer
    }
    fn deprovision(
        &self,
        link: &delta::Link,
        entry: Option<&Entry>,
        cause: delta::DeprovisionCause,
    ) -> delta::Deprovision {
        self.0.deprovision(link, entry, cause)
    }
}

/// `n` users whose managers are other users of the same directory, and six groups of them (so
/// `manager` and `members` references resolve to linked objects), synchronized until nothing
/// is left to do.
fn converged(n: usize, seed: u64) -> (SourceMirror, Links, TargetMirror) {
    let rules = example();
    let mut m = SourceMirror::new();
    let users = testkit::ad_users_managed(n, 4, &mut Fixture::new(seed));
    // Groups of every sixth user: a multi-valued reference flow (`members`).
    for g in 0..6u64 {
        let guid = uuid::Uuid::from_u64_pair(0x6700 + g, seed);
        let members = users
            .iter()
            .skip(g as usize)
            .step_by(6)
            .filter_map(|u| u.dn.clone())
            .map(Value::dn_ref);
        let dn = format!("CN=Team {g},OU=Groups,DC=corp,DC=contoso,DC=com");
        let group = Entry::new(dirsync::model::Anchor::from_guid(guid), "group")
            .with_dn(dirsync::model::Dn::parse(&dn).unwrap())
            .with("objectGUID", guid.to_string())
            .with("cn", format!("Team {g}"))
            .with_values("member", members.collect::<dirsync::model::Values>());
        m.insert(group);
    }
    for u in users {
        m.insert(u);
    }
    let (mut links, mut t) = (Links::new(), TargetMirror::new());
    testkit::converge(&rules, &m, &mut links, &mut t, 4).unwrap_or_else(|plan| panic!("{plan}"));
    (m, links, t)
}

#[test]
fn unchanged_fast_path_plans_exactly_what_projecting_plans() {
    let rules = example();
    let mut failed = 0;
    for seed in 0..24u64 {
        let (mut m, links, mut t) = converged(60, seed);
        // Converged: the fast path answers for every in-scope user, and the plan is empty.
        let counting = Counting(&rules, Default::default());
        let plan = delta::plan(&PlanInput::new(&counting, &m, &links, &t));
        assert!(plan.operations.is_empty(), "{plan}");
        let ctx = ProjectionContext::new(chrono::DateTime::UNIX_EPOCH, 0, &m, &t);
        let in_scope = m
            .entries()
            .filter(|e| matches!(rules.project(e, &ctx), Projected::InScope(_)))
            .count();
        assert!(in_scope > 40, "seed {seed}: {in_scope} users in scope");
        assert_eq!(counting.1.into_inner(), in_scope, "seed {seed}");

        // Edits on both sides, chosen by the seed; then both ways of planning must agree.
        let mut fx = Fixture::new(seed ^ 0x5eed);
        let anchors: Vec<_> = m.entries().map(|e| e.anchor.clone()).collect();
        let dns: Vec<_> = m.entries().map(|e| e.dn.clone()).collect();
        let user_dns: Vec<_> = m
            .entries()
            .filter(|e| e.object_type.is("user"))
            .filter_map(|e| e.dn.clone())
            .collect();
        for a in &anchors {
            let mut e = m.get(a).cloned().unwrap();
            if e.object_type.is("group") {
                let mut members = e.get("member").cloned().unwrap_or_default();
                match fx.below(4) {
                    0 => {
                        if let Some(first) = members.first().cloned() {
                            members.remove(&first);
                        }
                    }
                    1 => members.push(Value::dn_ref(
                        user_dns[fx.below(user_dns.len() as u64) as usize].clone(),
                    )),
                    2 => e
                        .attributes
                        .set("displayName", Value::string("Renamed team")),
                    _ => {}
                }
                e.attributes.set("member", members);
                m.insert(e);
                continue;
            }
            let pick = fx.below(20);
            match pick {
                0 => e
                    .attributes
                    .set("title", Value::string("Principal Engineer")),
                // userName is compared ignoring case: an upper-cased UPN changes nothing.
                1 => {
                    let upn = e.attributes.first("userPrincipalName").unwrap().to_string();
                    e.attributes
                        .set("userPrincipalName", Value::string(upn.to_uppercase()));
                }
                2 => {
                    e.attributes.remove("mail");
                }
                3 => {
                    let boss = dns[fx.below(dns.len() as u64) as usize].clone().unwrap();
                    e.attributes.set("manager", Value::dn_ref(boss));
                }
                4 => e.attributes.set("userAccountControl", Value::Integer(514)),
                5 => e
                    .attributes
                    .set("department", Value::string("Service Accounts")),
                // hireDate flows on create only: a new whenCreated changes nothing.
                6 => e
                    .attributes
                    .set("whenCreated", Value::string("20200101000000.0Z")),
                7 => {
                    e.attributes.remove("displayName");
                    e.attributes.set("givenName", Value::string("Zoë"));
                }
                8 => {
                    e.attributes.remove("manager");
                }
                // Out of scope by attributes no flow reads.
                9 => e
                    .attributes
                    .set("sAMAccountName", Value::string("svc-backup")),
                10 => e
                    .attributes
                    .set("isCriticalSystemObject", Value::Boolean(true)),
                // The on-create hireDate flow fails (every compared flow still holds).
                11 => e
                    .attributes
                    .set("whenCreated", Value::string("last tuesday")),
                _ => {}
            }
            m.insert(e);
        }
        let ids: Vec<_> = t.objects().map(|o| o.id.clone()).collect();
        for id in &ids {
            let mut o = t.get(id).cloned().unwrap();
            match fx.below(12) {
                0 => {
                    let v = o.attributes.first("displayName").map(|v| v.to_string());
                    if let Some(v) = v {
                        o.attributes
                            .set("displayName", Value::string(v.to_lowercase()));
                    }
                }
                1 => {
                    o.attributes.remove("title");
                }
                2 => o.attributes.set("active", Value::Boolean(false)),
                3 => {
                    let v = o.attributes.first("userName").map(|v| v.to_string());
                    if let Some(v) = v {
                        o.attributes
                            .set("userName", Value::string(v.to_uppercase()));
                    }
                }
                4 => {
                    let other = ids[fx.below(ids.len() as u64) as usize].clone();
                    o.attributes.set(
                        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager",
                        Value::Reference(dirsync::model::Reference::Target(other)),
                    );
                }
                5 => {
                    o.attributes
                        .remove("urn:ietf:params:scim:schemas:extension:dirsync:2.0:User:hireDate");
                }
                6 => {
                    if let Some(mut members) = o.attributes.get("members").cloned() {
                        if let Some(first) = members.first().cloned() {
                            members.remove(&first);
                        }
                        o.attributes.set("members", members);
                    }
                }
                _ => {}
            }
            t.insert(o);
        }
        if fx.below(4) == 0 {
            m.remove(&anchors[fx.below(anchors.len() as u64) as usize]);
        }
        let counting = Counting(&rules, Default::default());
        let fast = delta::plan(&PlanInput::new(&counting, &m, &links, &t));
        let slow = delta::plan(&PlanInput::new(
            &testkit::Projecting(&rules),
            &m,
            &links,
            &t,
        ));
        assert_eq!(fast, slow, "seed {seed}");
        // `Counting` checked each answer; the fast path still finds what the edits left alone.
        assert!(counting.1.into_inner() > 10, "seed {seed}");
        failed += fast
            .issues
            .iter()
            .filter(|i| matches!(i, delta::Issue::ProjectionFailed { .. }))
            .count();
        assert!(
            !fast.operations.is_empty(),
            "seed {seed}: the edits changed nothing"
        );
    }
    assert!(failed > 0, "no edit made a flow fail");
}

#[test]
fn unchanged_fast_path_draws_random_values_as_project_does() {
    // Random flows share the object's random source: the fast path must draw in the rule's
    // order (here not the order of the target attributes), on-create flows included, to see
    // the values `project` made.
    let rules = RuleSet::from_toml(
        r#"
        [[rule]]
        name = "users"
        source_type = "user"
        target_type = "User"
        join = [["userName"]]
        [[rule.flow]]
        target = "password"
        expression = 'RandomString(16, 2, 2, 2, 2)'
        apply = "on_create"
        [[rule.flow]]
        target = "zeta"
        expression = 'RandomString(10, 1, 0, 1, 1)'
        [[rule.flow]]
        target = "userName"
        expression = 'ToLower([userPrincipalName])'
        [[rule.flow]]
        target = "alpha"
        expression = 'Guid()'
        "#,
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut fx = Fixture::new(4);
    let mut m = SourceMirror::new();
    for i in 0..40 {
        m.insert(testkit::ad_user(i, &mut fx));
    }
    let (mut links, mut t) = (Links::new(), TargetMirror::new());
    testkit::converge(&rules, &m, &mut links, &mut t, 3).unwrap_or_else(|plan| panic!("{plan}"));
    let counting = Counting(&rules, Default::default());
    let plan = delta::plan(&PlanInput::new(&counting, &m, &links, &t));
    assert!(plan.operations.is_empty(), "{plan}");
    assert_eq!(counting.1.into_inner(), 40);
    // A changed random value is seen, as `project` sees it.
    let id = t.objects().next().map(|o| o.id.clone()).unwrap();
    let mut o = t.get(&id).cloned().unwrap();
    o.attributes.set("alpha", Value::string("not the guid"));
    t.insert(o);
    let fast = delta::plan(&PlanInput::new(&rules, &m, &links, &t));
    let slow = delta::plan(&PlanInput::new(
        &testkit::Projecting(&rules),
        &m,
        &links,
        &t,
    ));
    assert_eq!(fast, slow);
    assert_eq!(fast.count("update"), 1, "{fast}");
}

#[test]
fn a_changed_target_type_creates_the_new_object_and_deprovisions_the_old() {
    let (m, mut links, mut t) = converged(30, 5);
    let users = links.count(&"User".into());
    assert_eq!(users, 30);
    let person = RuleSet::from_toml(
        &EXAMPLE.replacen(r#"target_type = "User""#, r#"target_type = "Person""#, 1),
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut input = PlanInput::new(&person, &m, &links, &t);
    input.guard = delta::DeletionGuard::off();
    let fast = delta::plan(&input);
    let slow = delta::plan(&PlanInput {
        projection: &testkit::Projecting(&person),
        ..input
    });
    assert_eq!(fast, slow);
    // Every user: a Person created, the User deleted (the rule names no `type_changed`: delete),
    // both for the same reason; the groups' members follow the new objects.
    let changed = delta::Reason::TargetTypeChanged {
        from: "User".into(),
        to: "Person".into(),
    };
    let of = |kind: &str, ty: &str| {
        fast.operations
            .iter()
            .filter(|o| o.kind.name() == kind && o.target_type.is(ty))
            .inspect(|o| assert_eq!(o.reason, changed, "{}", o.anchor))
            .count()
    };
    assert_eq!(of("create", "Person"), users, "{fast}");
    assert_eq!(of("delete", "User"), users, "{fast}");
    assert!(fast.issues.is_empty(), "{fast}");
    assert!(fast
        .to_string()
        .contains("target type changed: User → Person"));
    // The groups, unchanged themselves, are planned again for their members: each member's new
    // object replaces its old one in the same plan.
    let groups: Vec<_> = fast
        .operations
        .iter()
        .filter(|o| o.target_type.is("Group"))
        .collect();
    assert_eq!(groups.len(), 6, "{fast}");
    assert!(groups.iter().all(|o| o.kind.name() == "references"));
    assert_eq!(fast.stats.considered, m.len());
    testkit::apply_accepted(&fast, &mut links, &mut t);
    // The new objects took the links; the deletes of the old ones did not take them away.
    assert_eq!(links.count(&"Person".into()), users);
    assert_eq!(links.count(&"User".into()), 0);
    let again = delta::plan(&PlanInput::new(&person, &m, &links, &t));
    assert!(again.is_empty(), "{again}");
}

/// Every error of a rule set loaded from TOML has its file line and column, and its report shows
/// that line with a caret under the offending value — scope errors (a filter of the other family,
/// a bad regular expression), duplicate rules and flows, join groups, deprovision values.
#[test]
fn every_rule_set_error_has_a_line_and_column() {
    let text = r#"[[rule]]
name = "users"
source_type = "user"
target_type = "User"
join = [["userName"], [], ["mail"]]
deprovision = { action = "disable", set = { active = [1] } }

[rule.scope]
family = "provisioning"
groups = [
  [{ attribute = "userAccountControl", operator = "ISNOTBITSET", value = 2 }],
  [{ attribute = "department", operator = "REGEX MATCH", value = "^(Sales" }],
]

[[rule.flow]]
target = "userName"
expression = '[mail]'

[[rule.flow]]
target = "userName"
expression = '[upn]'

[[rule]]
name = "again"
source_type = "user"
target_type = "User"
"#;
    let errs = RuleSet::from_toml(text, Some("rules.toml")).unwrap_err();
    let got: Vec<(String, Option<usize>, Option<usize>)> = errs
        .0
        .iter()
        .map(|e| (e.code.clone(), e.line, e.column))
        .collect();
    let want = [
        ("E0403", 11, 51), // ISNOTBITSET: a Connect Sync operator in a provisioning filter
        ("E0410", 12, 68), // the unclosed group of the regex, inside the string
        ("E0503", 20, 10), // userName computed twice: the second flow's target
        ("E0506", 5, 23),  // the empty join group
        ("E0502", 5, 28),  // mail is no flow's target
        ("E0505", 6, 54),  // a list as a deprovision value
        ("E0504", 25, 15), // a second rule for source type user
    ];
    let want: Vec<(String, Option<usize>, Option<usize>)> = want
        .iter()
        .map(|(c, l, col)| (c.to_string(), Some(*l), Some(*col)))
        .collect();
    assert_eq!(got, want, "{errs}");
    let family = errs.0[0].to_string();
    assert!(
        family.starts_with(
            "error[E0403]: scope group 1, clause 1 (userAccountControl ISNOTBITSET): "
        ),
        "{family}"
    );
    assert!(
        family.contains(
            " --> rules.toml:11:51 (rule \"users\")\n   |\n11 |   [{ attribute = \"userAccountControl\", operator = \"ISNOTBITSET\", value = 2 }],\n   |                                                   ^^^^^^^^^^^^^"
        ),
        "{family}"
    );
}

/// The mirror keeps references by anchor; expressions, scoping clauses and `ISMEMBEROF` see the
/// current DN of the object referenced — after a rename, the new one.
#[test]
fn rules_read_references_as_the_current_dn() {
    use dirsync::model::{Change, Dn, Reference};
    let rules = RuleSet::from_toml(
        r#"
[[rule]]
name = "users"
source_type = "user"
target_type = "User"
[rule.scope]
family = "connect-sync"
groups = [[
  { attribute = "manager", operator = "STARTSWITH", value = "CN=Chief," },
  { attribute = "cn", operator = "ISMEMBEROF", value = "CN=Team,OU=Groups,DC=x" },
]]
[[rule.flow]]
target = "managerName"
expression = 'Item(Split([manager], ","), 1)'
[[rule.flow]]
target = "manager"
expression = 'Coalesce([manager], [secretary])'
reference = true
[[rule.flow]]
target = "directManager"
expression = '[manager]'
reference = true
"#,
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // A scope by membership: a plan of some objects needs what references them as context.
    assert!(rules.reads_member_of());
    let scim = RuleSet::from_toml(include_str!("../examples/rules/ad-to-scim.toml"), None).unwrap();
    assert!(!scim.reads_member_of());
    let dn = |s: &str| Dn::parse(s).unwrap();
    let mut m = SourceMirror::new();
    m.insert(
        Entry::new("u", "user")
            .with_dn(dn("CN=Ann,OU=People,DC=x"))
            .with("cn", "Ann")
            .with("manager", Value::dn_ref(dn("CN=Boss,OU=People,DC=x"))),
    );
    m.insert(Entry::new("b", "user").with_dn(dn("CN=Boss,OU=People,DC=x")));
    m.insert(
        Entry::new("g", "group")
            .with_dn(dn("CN=Staff,OU=Groups,DC=x"))
            .with("member", Value::dn_ref(dn("CN=Ann,OU=People,DC=x"))),
    );
    m.settle();
    let t = TargetMirror::new();
    let u = m.get(&"u".into()).unwrap().clone();
    assert_eq!(u.attributes.first("manager"), Some(&Value::anchor_ref("b")));
    // Before the renames: out of scope (the manager's DN and the group's are the old ones).
    let ctx = ProjectionContext::new(chrono::DateTime::UNIX_EPOCH, 7, &m, &t);
    assert!(matches!(rules.project(&u, &ctx), Projected::OutOfScope(_)));
    for (anchor, new_dn) in [
        ("b", "CN=Chief,OU=Managers,DC=x"),
        ("g", "CN=Team,OU=Groups,DC=x"),
    ] {
        m.apply(&Change::Move {
            anchor: anchor.into(),
            object_type: "user".into(),
            new_dn: dn(new_dn),
        });
    }
    let ctx = ProjectionContext::new(chrono::DateTime::UNIX_EPOCH, 7, &m, &t);
    let p = rules.project(&u, &ctx);
    assert!(matches!(p, Projected::InScope(_)), "{p:?}");
    assert_eq!(
        flow(&p, "managerName").unwrap()[0],
        Value::string("CN=Chief")
    );
    // A computed reference is the current DN, which the planner resolves to the manager.
    let computed = flow(&p, "manager").unwrap()[0].clone();
    let Value::Reference(r) = &computed else {
        panic!("{computed:?}")
    };
    assert!(matches!(r, Reference::Dn(d) if d == &dn("cn=chief,ou=managers,dc=x")));
    assert_eq!(m.resolve(r), Some("b".into()));
    // A direct mapping keeps the anchor.
    assert_eq!(
        flow(&p, "directManager").unwrap()[0],
        Value::anchor_ref("b")
    );
    let shown = rules.explain(&u, &ctx).to_string();
    assert!(shown.contains("CN=Chief"), "{shown}");
}

#[test]
fn join_attributes_are_the_join_groups_per_target_type() {
    use dirsync::delta::Projection;
    let attrs = example().join_attributes().unwrap();
    let names = |ty: &str| -> Vec<String> {
        attrs
            .get(&ty.into())
            .unwrap()
            .iter()
            .map(|a| a.to_string())
            .collect()
    };
    assert_eq!(attrs.len(), 2);
    assert_eq!(names("User"), ["externalId", "userName"]);
    assert_eq!(names("Group"), ["displayName", "externalId"]);
}
