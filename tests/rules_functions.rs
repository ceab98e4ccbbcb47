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
//! Each case runs three times: through `functions::call` with every argument known at compile
//! time (literals, so `precompile` sees them), with every argument known only at run time, and
//! through the whole language — the case written as an expression (literal arguments where the
//! value has a literal form, attribute references to the object's attributes otherwise) compiled
//! with `Program::compile` and evaluated by the evaluator. All must give the expected result.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use dirsync::model::{Attributes, Value as ModelValue, Values};
use dirsync::rules::context::{AppRoleValue, EvalContext, SeededRng, UsedValues};
use dirsync::rules::eval::{self, Program};
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
        Value::String(s) => EvalValue::from(s.as_str()),
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
                "reference" => EvalValue::Reference(x.as_str().unwrap().into()),
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

/// A model value for an expression value, when the model can hold it.
fn model_value(v: &EvalValue) -> Option<ModelValue> {
    Some(match v {
        EvalValue::String(s) => ModelValue::string(s.as_str()),
        EvalValue::Integer(i) => ModelValue::Integer(*i),
        EvalValue::Boolean(b) => ModelValue::Boolean(*b),
        EvalValue::DateTime(t) => ModelValue::Timestamp(*t),
        EvalValue::Binary(b) => ModelValue::Bytes(b.clone()),
        EvalValue::Reference(r) => ModelValue::anchor_ref(r.as_str()),
        _ => return None,
    })
}

/// The literal text of a value, when it has one.
fn literal_text(v: &EvalValue) -> Option<String> {
    Some(match v {
        EvalValue::Null => "Null".into(),
        EvalValue::String(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
        EvalValue::Integer(i) => i.to_string(),
        EvalValue::Boolean(b) => {
            if *b {
                "True".into()
            } else {
                "False".into()
            }
        }
        EvalValue::Decimal(d) => d.to_string(),
        _ => return None,
    })
}

/// Runs one case through the whole language; `None` when the case's values cannot be written
/// as an expression over model attributes.
fn run_expression(f: Function, case: &toml::Table, args: &[Option<EvalValue>]) -> Option<Outcome> {
    let app_role_function = matches!(
        f,
        Function::AppRoleAssignmentsComplex
            | Function::AssertiveAppRoleAssignmentsComplex
            | Function::SingleAppRoleAssignment
    );
    // The front end is stricter than the library about empty slots of variadic functions (they
    // are compile errors there); such cases only run at the function level.
    let variadic = matches!(
        f,
        Function::Coalesce | Function::Join | Function::SelectUniqueValue
    );
    if variadic && args.iter().any(Option::is_none) {
        return None;
    }
    let mut attrs = Attributes::new();
    let mut slots = Vec::new();
    for (i, a) in args.iter().enumerate() {
        match a {
            _ if app_role_function => slots.push("[appRoleAssignments]".into()),
            None => slots.push(String::new()),
            // Roles come only from the context: elsewhere they have no expression form.
            Some(EvalValue::Structured(_)) => return None,
            Some(v) => match literal_text(v) {
                Some(t) => slots.push(t),
                None => {
                    let values: Option<Vec<ModelValue>> =
                        v.values().iter().map(model_value).collect();
                    attrs.set(format!("a{i}"), Values::from(values?));
                    slots.push(format!("[a{i}]"));
                }
            },
        }
    }
    let text = format!("{}({})", f.name(), slots.join(", "));
    let program = match Program::compile(&text) {
        Ok(p) => p,
        Err(d) => return Some(Outcome::Error(d.0.first().map_or(0, |d| d.code.number()))),
    };
    let seed = case.get("seed").and_then(Value::as_integer).unwrap_or(1) as u64;
    let mut rng = SeededRng::from_seed(seed);
    let app_roles = args
        .iter()
        .flatten()
        .find_map(|a| match a {
            EvalValue::Structured(r) => Some(r.clone()),
            _ => None,
        })
        .or_else(|| case.get("app_roles").map(roles))
        .unwrap_or_default();
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
        now: case
            .get("now")
            .and_then(Value::as_str)
            .map(|s| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
            .unwrap_or_else(|| {
                DateTime::parse_from_rfc3339("2024-06-15T10:30:00Z")
                    .unwrap()
                    .into()
            }),
        rng: &mut rng,
        default_domain: case.get("default_domain").and_then(Value::as_str),
        app_role_assignments: &app_roles,
        is_unique: &oracle,
    };
    Some(match program.evaluate(&attrs, &mut ctx) {
        Ok(e) => match e.outcome {
            eval::Outcome::Value(v) => Outcome::Value(v),
            eval::Outcome::IgnoreFlow => Outcome::IgnoreFlow,
            eval::Outcome::NotUnique => Outcome::NotUnique,
        },
        Err(e) => Outcome::Error(e.error.code),
    })
}

/// Whether an expected evaluation error and the diagnostic the compiler gave for the same literal
/// agree (a literal argument that fails for every object is a compile error, spec §3.1).
fn compile_time_equivalent(want: u16, got: u16) -> bool {
    matches!(
        (want, got),
        (300, 121)
            | (300, 122)
            | (322, 126)
            | (308, 201)
            | (312, 202)
            | (319, 203)
            | (317, 204)
            | (311, 205)
            | (313 | 314, 210)
            | (309 | 310, 211)
    ) || got == 212
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
    let mut expression_runs = 0;
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
            if let Some(got) = run_expression(f, case, &args) {
                expression_runs += 1;
                let ok = match (&got, &want) {
                    _ if case.contains_key("expect_pattern") => {
                        let re =
                            regex::Regex::new(case["expect_pattern"].as_str().unwrap()).unwrap();
                        matches!(&got, Outcome::Value(EvalValue::String(s)) if re.is_match(s))
                    }
                    (Outcome::Error(g), Outcome::Error(w)) => {
                        g == w || compile_time_equivalent(*w, *g)
                    }
                    _ => got == want,
                };
                if !ok {
                    failures.push(format!("{where_} (expression): got {got:?}, want {want:?}"));
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
    assert!(
        expression_runs * 10 >= total * 8,
        "only {expression_runs} of {total} cases ran as expressions"
    );
    for f in Function::ALL {
        let n = covered.iter().find(|(g, _)| *g == f).map_or(0, |(_, n)| *n);
        assert!(n >= 5, "{f}: only {n} data cases (at least 5 required)");
    }
}
