//! Runs the data-driven scoping-filter cases of `tests/rules/scoping/*.toml` (spec §7).
//!
//! Each case gives an object's attributes, optionally its direct group memberships, a filter in
//! the JSON contract (`{family, groups: [[{attribute, operator, value}]]}`) and either the expected
//! result or the expected compile-error codes. The runner also checks that every operator of each
//! family is covered by at least three cases, one on a null/empty attribute and one on a
//! multi-valued attribute (for `ISMEMBEROF`/`ISNOTMEMBEROF`: no memberships and several).
#![allow(clippy::expect_used, clippy::unwrap_used)] // a malformed case file should stop the test loudly

use std::cell::Cell;
use std::collections::BTreeMap;

use base64::Engine as _;
use dirsync::model::{Attributes, Dn, Value, Values};
use dirsync::rules::scope::{FilterSpec, ScopeFilter};

const PROVISIONING: &str = include_str!("rules/scoping/provisioning.toml");
const CONNECT_SYNC: &str = include_str!("rules/scoping/connect_sync.toml");
const DN: &str = include_str!("rules/scoping/dn.toml");

/// The operators of each family, as spec §7.3 and §7.4 list them.
const PROVISIONING_OPERATORS: [&str; 14] = [
    "EQUALS",
    "NOT EQUALS",
    "IS TRUE",
    "IS FALSE",
    "IS NULL",
    "IS NOT NULL",
    "REGEX MATCH",
    "NOT REGEX MATCH",
    "Greater_Than",
    "Greater_Than_OR_EQUALS",
    "Includes",
    "ENDS_WITH",
    "&",
    "!&",
];
const CONNECT_SYNC_OPERATORS: [&str; 20] = [
    "EQUAL",
    "NOTEQUAL",
    "LESSTHAN",
    "LESSTHAN_OR_EQUAL",
    "GREATERTHAN",
    "GREATERTHAN_OR_EQUAL",
    "CONTAINS",
    "NOTCONTAINS",
    "STARTSWITH",
    "NOTSTARTSWITH",
    "ENDSWITH",
    "NOTENDSWITH",
    "ISNULL",
    "ISNOTNULL",
    "ISIN",
    "ISNOTIN",
    "ISBITSET",
    "ISNOTBITSET",
    "ISMEMBEROF",
    "ISNOTMEMBEROF",
];

/// The case file's JSON contract: TOML values become the JSON values they stand for.
fn to_json(v: &toml::Value) -> serde_json::Value {
    match v {
        toml::Value::String(s) => serde_json::Value::String(s.clone()),
        toml::Value::Integer(i) => serde_json::Value::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        toml::Value::Boolean(b) => serde_json::Value::Bool(*b),
        toml::Value::Datetime(d) => serde_json::Value::String(d.to_string()),
        toml::Value::Array(a) => serde_json::Value::Array(a.iter().map(to_json).collect()),
        toml::Value::Table(t) => {
            serde_json::Value::Object(t.iter().map(|(k, v)| (k.clone(), to_json(v))).collect())
        }
    }
}

fn attribute_value(v: &toml::Value, case: &str) -> Value {
    match v {
        toml::Value::String(s) => Value::string(s.as_str()),
        toml::Value::Integer(i) => Value::Integer(*i),
        toml::Value::Boolean(b) => Value::Boolean(*b),
        toml::Value::Datetime(d) => Value::Timestamp(
            chrono::DateTime::parse_from_rfc3339(&d.to_string())
                .unwrap_or_else(|e| panic!("{case}: date-time {d}: {e}"))
                .to_utc(),
        ),
        toml::Value::Table(t) => match (t.get("bytes"), t.get("dn")) {
            (Some(toml::Value::String(b)), None) => Value::Bytes(
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .unwrap_or_else(|e| panic!("{case}: bytes: {e}")),
            ),
            (None, Some(toml::Value::String(dn))) => {
                Value::dn_ref(Dn::parse(dn).unwrap_or_else(|e| panic!("{case}: {e}")))
            }
            _ => panic!("{case}: an attribute table is {{ bytes = … }} or {{ dn = … }}"),
        },
        other => panic!("{case}: unsupported attribute value {other:?}"),
    }
}

fn attributes(t: &toml::Table, case: &str) -> Attributes {
    let mut a = Attributes::new();
    for (name, v) in t {
        let values: Values = match v {
            toml::Value::Array(items) => items.iter().map(|i| attribute_value(i, case)).collect(),
            single => Values::one(attribute_value(single, case)),
        };
        if !values.is_empty() {
            a.set(name.as_str(), values);
        }
    }
    a
}

/// Whether the case's attribute `name` is null/empty in the case file's terms.
fn is_null(attrs: &toml::Table, name: &str) -> bool {
    let found = attrs.iter().find(|(k, _)| k.eq_ignore_ascii_case(name));
    match found.map(|(_, v)| v) {
        None => true,
        Some(toml::Value::String(s)) => s.is_empty(),
        Some(toml::Value::Array(items)) => items
            .iter()
            .all(|i| matches!(i, toml::Value::String(s) if s.is_empty())),
        Some(_) => false,
    }
}

fn is_multi(attrs: &toml::Table, name: &str) -> bool {
    attrs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .is_some_and(|(_, v)| matches!(v, toml::Value::Array(items) if items.len() >= 2))
}

#[derive(Default)]
struct Coverage {
    cases: usize,
    null: usize,
    multi: usize,
}

/// Runs one case file; returns the failures and records operator coverage.
fn run_file(
    file: &str,
    text: &str,
    operators: &[&str],
    coverage: &mut BTreeMap<String, Coverage>,
) -> (usize, Vec<String>) {
    let doc: toml::Table = toml::from_str(text).unwrap_or_else(|e| panic!("{file}: {e}"));
    let cases = doc
        .get("case")
        .and_then(toml::Value::as_array)
        .unwrap_or_else(|| panic!("{file}: no [[case]]"));
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let case = case.as_table().expect("case is a table");
        let name = format!(
            "{file} case {} ({})",
            i + 1,
            case.get("name")
                .and_then(toml::Value::as_str)
                .expect("name")
        );
        let empty = toml::Table::new();
        let attrs_table = case
            .get("attributes")
            .and_then(toml::Value::as_table)
            .unwrap_or(&empty);
        let entry = attributes(attrs_table, &name);
        let member_of: Vec<Dn> = case
            .get("member_of")
            .and_then(toml::Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|d| {
                        let d = d.as_str().expect("member_of holds DN strings");
                        Dn::parse(d).unwrap_or_else(|e| panic!("{name}: {e}"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let dn: Option<Dn> = case.get("dn").map(|d| {
            let d = d.as_str().expect("dn is a DN string");
            Dn::parse(d).unwrap_or_else(|e| panic!("{name}: {e}"))
        });
        let filter_json = to_json(case.get("filter").expect("filter"));
        let spec: FilterSpec = serde_json::from_value(filter_json.clone())
            .unwrap_or_else(|e| panic!("{name}: filter does not deserialize: {e}"));
        let membership_clauses = spec
            .groups
            .iter()
            .flatten()
            .any(|c| c.operator.to_ascii_uppercase().contains("MEMBEROF"));

        let compiled = ScopeFilter::compile(&spec);
        match (case.get("expect"), compiled) {
            (Some(expect), Ok(filter)) => {
                let expect = expect.as_bool().expect("expect is a Boolean");
                let calls = Cell::new(0);
                let fetch = || {
                    calls.set(calls.get() + 1);
                    member_of.clone()
                };
                let got = filter.evaluate_with_dn(&entry, dn.as_ref(), &fetch);
                let explained = filter.explain_with_dn(&entry, dn.as_ref(), &fetch);
                if dn.is_none() && got != filter.evaluate(&entry, &|| member_of.clone()) {
                    failures.push(format!("{name}: evaluate disagrees with evaluate_with_dn"));
                }
                if got != expect {
                    failures.push(format!("{name}: expected {expect}, got {got}\n{explained}"));
                }
                if explained.in_scope != got {
                    failures.push(format!("{name}: explain disagrees with evaluate"));
                }
                if !membership_clauses && calls.get() != 0 {
                    failures.push(format!("{name}: member_of called without ISMEMBEROF"));
                }
                if calls.get() > 2 {
                    failures.push(format!("{name}: member_of called {} times", calls.get()));
                }
                for clause in spec.groups.iter().flatten() {
                    let Some(op) = operators
                        .iter()
                        .find(|o| o.eq_ignore_ascii_case(&clause.operator))
                    else {
                        continue;
                    };
                    let c = coverage.entry((*op).to_owned()).or_default();
                    c.cases += 1;
                    if clause.attribute.eq_ignore_ascii_case("dn") && !op.contains("MEMBEROF") {
                        // The object's DN: single-valued; null when the case gives none.
                        c.null += usize::from(dn.is_none());
                        c.multi += 1;
                    } else if op.contains("MEMBEROF") {
                        c.null += usize::from(member_of.is_empty());
                        c.multi += usize::from(member_of.len() >= 2);
                    } else {
                        c.null += usize::from(is_null(attrs_table, &clause.attribute));
                        c.multi += usize::from(is_multi(attrs_table, &clause.attribute));
                    }
                }
            }
            (Some(_), Err(errors)) => {
                let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
                failures.push(format!(
                    "{name}: does not compile:\n  {}",
                    text.join("\n  ")
                ));
            }
            (None, Ok(_)) => failures.push(format!("{name}: compiled, but an error was expected")),
            (None, Err(errors)) => {
                let codes: Vec<i64> = errors.iter().map(|e| i64::from(e.code())).collect();
                let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
                let wanted_one = case.get("expect_error").and_then(toml::Value::as_integer);
                let wanted_all: Option<Vec<i64>> = case
                    .get("expect_errors")
                    .and_then(toml::Value::as_array)
                    .map(|a| a.iter().map(|c| c.as_integer().expect("code")).collect());
                let relevant: Vec<&String> = match (wanted_one, &wanted_all) {
                    (Some(code), None) => {
                        if !codes.contains(&code) {
                            failures.push(format!(
                                "{name}: expected error {code}, got {codes:?}:\n  {}",
                                text.join("\n  ")
                            ));
                        }
                        codes
                            .iter()
                            .zip(&text)
                            .filter(|(c, _)| **c == code)
                            .map(|(_, t)| t)
                            .collect()
                    }
                    (None, Some(all)) => {
                        if &codes != all {
                            failures.push(format!(
                                "{name}: expected errors {all:?}, got {codes:?}:\n  {}",
                                text.join("\n  ")
                            ));
                        }
                        text.iter().collect()
                    }
                    _ => panic!("{name}: give expect, expect_error or expect_errors"),
                };
                if let Some(m) = case.get("expect_message").and_then(toml::Value::as_str) {
                    if !relevant.iter().any(|t| t.contains(m)) {
                        failures.push(format!(
                            "{name}: no error message contains {m:?}:\n  {}",
                            text.join("\n  ")
                        ));
                    }
                }
            }
        }
    }
    (cases.len(), failures)
}

fn check_file(file: &str, text: &str, operators: &[&str]) {
    let mut coverage = BTreeMap::new();
    let (count, mut failures) = run_file(file, text, operators, &mut coverage);
    for op in operators {
        let c = coverage.get(*op);
        let (cases, null, multi) = c.map_or((0, 0, 0), |c| (c.cases, c.null, c.multi));
        if cases < 3 || null < 1 || multi < 1 {
            failures.push(format!(
                "{file}: operator {op:?} needs at least 3 cases with one null and one \
                 multi-valued case (has {cases}, {null} null, {multi} multi-valued)"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} checks failed in {file}:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn provisioning_cases() {
    check_file("provisioning.toml", PROVISIONING, &PROVISIONING_OPERATORS);
}

#[test]
fn connect_sync_cases() {
    check_file("connect_sync.toml", CONNECT_SYNC, &CONNECT_SYNC_OPERATORS);
}

/// The operators usable on `dn`, the object's DN (both families).
const DN_OPERATORS: [&str; 20] = [
    "EQUALS",
    "NOT EQUALS",
    "ENDS_WITH",
    "Includes",
    "IS NULL",
    "IS NOT NULL",
    "REGEX MATCH",
    "NOT REGEX MATCH",
    "EQUAL",
    "NOTEQUAL",
    "ISIN",
    "ISNOTIN",
    "ENDSWITH",
    "NOTENDSWITH",
    "STARTSWITH",
    "NOTSTARTSWITH",
    "CONTAINS",
    "NOTCONTAINS",
    "ISNULL",
    "ISNOTNULL",
];

#[test]
fn dn_cases() {
    // Every operator usable on `dn` is run on at least one object; its null case (no DN) is
    // checked where the family's null rule decides something other than the positive test.
    let mut coverage = BTreeMap::new();
    let (count, mut failures) = run_file("dn.toml", DN, &DN_OPERATORS, &mut coverage);
    for op in DN_OPERATORS {
        if coverage.get(op).map_or(0, |c| c.cases) == 0 {
            failures.push(format!("dn.toml: no case for operator {op:?} on dn"));
        }
    }
    for op in [
        "EQUALS",
        "NOT EQUALS",
        "ENDS_WITH",
        "ENDSWITH",
        "NOTENDSWITH",
        "NOTEQUAL",
    ] {
        if coverage.get(op).map_or(0, |c| c.null) == 0 {
            failures.push(format!("dn.toml: no case without a DN for {op:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} checks failed in dn.toml:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn runner_detects_a_wrong_expectation() {
    let text = r#"
[[case]]
name = "deliberately wrong"
attributes = { department = "Sales" }
filter = { family = "provisioning", groups = [[{ attribute = "department", operator = "EQUALS", value = "Sales" }]] }
expect = false

[[case]]
name = "deliberately wrong code"
filter = { family = "provisioning", groups = [[]] }
expect_error = 402
"#;
    let (count, failures) = run_file("inline", text, &[], &mut BTreeMap::new());
    assert_eq!(count, 2);
    assert_eq!(failures.len(), 2, "{failures:#?}");
}
