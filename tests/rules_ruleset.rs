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
