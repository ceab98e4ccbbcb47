//! Data-driven tests of the expression function library: every file
//! `tests/rules/functions/<FunctionName>.toml` holds cases for one function.
//!
//! Case format (independent of the Rust API, so the runner can later drive the full evaluator):
//!
//! ```toml
//! [[case]]
//! args = ["abc", 2]            # one entry per slot
//! expect = "ab"                # or expect_error = 303, expect_pattern = "^…$",
//!                              # expect_outcome = "IgnoreFlow" | "NotUnique"
//! now = "2024-01-01T00:00:00Z" # optional context: now, seed, default_domain, app_roles, used
//! ```
//!
//! Values: TOML strings, integers and booleans are String, Integer and Boolean; an array is a
//! multi-valued value; inline tables encode the rest: `{null = true}`, `{omitted = true}` (an
//! empty slot, arguments only), `{datetime = "RFC 3339"}`, `{decimal = "1.50"}`,
//! `{reference = "CN=…"}`, `{binary = "base64"}`, `{roles = [{id, value, display_name}, …]}`.
//!
//! Each case runs twice: once with every argument known at compile time (literals, so
//! `precompile` sees them) and once with every argument known only at run time; both must give
//! the expected result.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use dirsync::rules::context::{AppRoleValue, EvalContext, SeededRng, UsedValues};
use dirsync::rules::functions::{self, is_null_or_empty, select_unique_check, UniqueCheck};
use dirsync::rules::value::{Decimal, EvalValue};
use dirsync::rules::Function;
use toml::Value;

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Value(EvalValue),
    IgnoreFlow,
    NotUnique,
    Error(u16),
}

fn decode(v: &Value, where_: &str) -> Option<EvalValue> {
    Some(match v {
        Value::String(s) => EvalValue::String(s.clone()),
        Value::Integer(i) => EvalValue::Integer(*i),
        Value::Boolean(b) => EvalValue::Boolean(*b),
        Value::Array(a) => {
            let vals: Vec<EvalValue> = a
                .iter()
                .map(|x| decode(x, where_).unwrap_or(EvalValue::Null))
                .collect();
            if vals.len() >= 2 {
                EvalValue::Multi(vals)
            } else {
                EvalValue::multi(vals)
            }
        }
        Value::Table(t) => {
            let (k, x) = t
                .iter()
                .next()
                .unwrap_or_else(|| panic!("{where_}: empty table"));
            match k.as_str() {
                "null" => EvalValue::Null,
                "omitted" => return None,
                "datetime" => EvalValue::DateTime(
                    DateTime::parse_from_rfc3339(x.as_str().unwrap())
                        .unwrap_or_else(|e| panic!("{where_}: bad datetime {x}: {e}"))
                        .with_timezone(&Utc),
                ),
                "decimal" => EvalValue::Decimal(
                    Decimal::parse(x.as_str().unwrap())
                        .unwrap_or_else(|| panic!("{where_}: bad decimal {x}")),
                ),
                "reference" => EvalValue::Reference(x.as_str().unwrap().to_string()),
                "binary" => EvalValue::Binary(
                    base64::engine::general_purpose::STANDARD
                        .decode(x.as_str().unwrap())
                        .unwrap(),
                ),
                "roles" => EvalValue::Structured(roles(x)),
                other => panic!("{where_}: unknown value kind {other}"),
            }
        }
        other => panic!("{where_}: unsupported TOML value {other:?} (use {{decimal = \"…\"}})"),
    })
}

fn roles(v: &Value) -> Vec<AppRoleValue> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| AppRoleValue {
            id: r["id"].as_str().unwrap().to_string(),
            value: r["value"].as_str().unwrap().to_string(),
            display_name: r["display_name"].as_str().unwrap().to_string(),
        })
        .collect()
}

/// Runs one case in one mode (`literal`: arguments visible to `precompile`).
fn run(f: Function, case: &toml::Table, args: &[Option<EvalValue>], literal: bool) -> Outcome {
    let now = case
        .get("now")
        .and_then(Value::as_str)
        .map(|s| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
        .unwrap_or_else(|| {
            DateTime::parse_from_rfc3339("2024-06-15T10:30:00Z")
                .unwrap()
                .into()
        });
    let seed = case.get("seed").and_then(Value::as_integer).unwrap_or(1) as u64;
    let mut rng = SeededRng::from_seed(seed);
    let app_roles = case.get("app_roles").map(roles).unwrap_or_default();
    let mut used = UsedValues::new();
    for u in case
        .get("used")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        used.insert(u.as_str().unwrap());
    }
    let oracle = |v: &str| used.is_unique(v);
    let mut ctx = EvalContext {
        now,
        rng: &mut rng,
        default_domain: case.get("default_domain").and_then(Value::as_str),
        app_role_assignments: &app_roles,
        is_unique: &oracle,
    };
    // The two functions whose outcome is not a value are driven the way the evaluator will.
    match f {
        Function::IgnoreFlowIfNullOrEmpty => {
            let v = args[0].clone().unwrap_or(EvalValue::Null);
            return if is_null_or_empty(&v) {
                Outcome::IgnoreFlow
            } else {
                Outcome::Value(v)
            };
        }
        Function::SelectUniqueValue => {
            for (i, a) in args.iter().enumerate() {
                let a = a.clone().unwrap_or(EvalValue::Null);
                match select_unique_check(&a, i, &ctx) {
                    Err(e) => return Outcome::Error(e.code),
                    Ok(UniqueCheck::Free(v)) => return Outcome::Value(v),
                    Ok(_) => {}
                }
            }
            return Outcome::NotUnique;
        }
        _ => {}
    }
    let lits: Vec<Option<Option<&EvalValue>>> = args
        .iter()
        .map(|a| a.as_ref().map(|v| if literal { Some(v) } else { None }))
        .collect();
    let pre = match functions::precompile(f, &lits) {
        Ok(p) => p,
        Err(e) => return Outcome::Error(e.code),
    };
    match functions::call(f, args, &pre, &mut ctx) {
        Ok(v) => Outcome::Value(v),
        Err(e) => {
            assert!(
                !e.message.is_empty() && (300..400).contains(&e.code),
                "bad error {e:?}"
            );
            Outcome::Error(e.code)
        }
    }
}

#[test]
fn function_cases() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/rules/functions");
    let mut failures = Vec::new();
    let mut covered = Vec::new();
    let mut total = 0;
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for path in files {
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        let f =
            Function::from_name(&stem).unwrap_or_else(|| panic!("unknown function file {stem}"));
        assert_eq!(f.name(), stem, "file name must be the canonical spelling");
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{stem}: {e}"));
        let cases = doc["case"].as_array().unwrap();
        covered.push((f, cases.len()));
        for (n, case) in cases.iter().enumerate() {
            total += 1;
            let case = case.as_table().unwrap();
            let where_ = format!("{stem} case {}", n + 1);
            let args: Vec<Option<EvalValue>> = case["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| decode(a, &where_))
                .collect();
            let want = if let Some(e) = case.get("expect_error") {
                Outcome::Error(e.as_integer().unwrap() as u16)
            } else if let Some(o) = case.get("expect_outcome") {
                match o.as_str().unwrap() {
                    "IgnoreFlow" => Outcome::IgnoreFlow,
                    "NotUnique" => Outcome::NotUnique,
                    other => panic!("{where_}: unknown outcome {other}"),
                }
            } else if case.contains_key("expect_pattern") {
                Outcome::Value(EvalValue::Null) // checked below
            } else {
                Outcome::Value(
                    decode(
                        case.get("expect")
                            .unwrap_or_else(|| panic!("{where_}: no expectation")),
                        &where_,
                    )
                    .unwrap(),
                )
            };
            for literal in [true, false] {
                let got = run(f, case, &args, literal);
                let mode = if literal { "literal" } else { "run-time" };
                if let Some(pat) = case.get("expect_pattern").and_then(Value::as_str) {
                    let re = regex::Regex::new(pat).unwrap();
                    match &got {
                        Outcome::Value(EvalValue::String(s)) if re.is_match(s) => {}
                        other => failures.push(format!(
                            "{where_} ({mode}): {other:?} does not match /{pat}/"
                        )),
                    }
                } else if got != want {
                    failures.push(format!("{where_} ({mode}): got {got:?}, want {want:?}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    for f in Function::ALL {
        let n = covered.iter().find(|(g, _)| *g == f).map_or(0, |(_, n)| *n);
        assert!(n >= 5, "{f}: only {n} data cases (at least 5 required)");
    }
}
