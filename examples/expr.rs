//! The expression builder: evaluate an expression or a scoping filter on sample attributes, as
//! Entra's portal "expression builder" does — with a machine-readable result.
//!
//! ```sh
//! cargo run --example expr -- [--context '<json>'] '<expression>' '<json attributes>'
//! cargo run --example expr -- [--context '<json>'] --filter '<json filter>' '<json attributes>'
//! ```
//!
//! Attributes: a JSON object, name → string / integer / boolean (one value) or array
//! (multi-valued); null or missing = absent. Filter: `{"family": "provisioning" |
//! "connect-sync", "groups": [[{"attribute": …, "operator": …, "value": …}, …], …]}`. Context
//! (all optional): `now` (RFC 3339), `seed`, `existing_values` (taken values for
//! `SelectUniqueValue`), `default_domain`, `app_role_assignments` (`[{"id", "value",
//! "displayName"}]`), `member_of` (group DNs, for `ISMEMBEROF`), `dn` (the object's DN, for
//! clauses on `dn`).
//!
//! Prints one JSON object: `{"value": …}`, `{"ignore_flow": true}`, or `{"error": {"kind":
//! "compile" | "evaluation" | "not_unique", "code": …, "message": …}}` (exit code 1), with
//! `"redacted": true` or `"flow_mode": "replace"` where the spec says so.

use std::process::ExitCode;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use dirsync::model::{Attributes, Dn, Value, Values};
use dirsync::rules::context::{AppRoleValue, EvalContext, SeededRng, UsedValues};
use dirsync::rules::datetime::render_canonical;
use dirsync::rules::eval::{Outcome, Program};
use dirsync::rules::scope::{FilterSpec, ScopeFilter};
use dirsync::rules::value::{codes, EvalValue};
use serde_json::{json, Map, Value as Json};

const USAGE: &str = "usage: expr [--context '<json>'] '<expression>' '<json attributes>'\n       expr [--context '<json>'] --filter '<json filter>' '<json attributes>'";

fn error(kind: &str, code: &str, message: &str) -> (Json, ExitCode) {
    (
        json!({"error": {"kind": kind, "code": code, "message": message}}),
        ExitCode::from(1),
    )
}

fn to_json(v: &EvalValue) -> Json {
    match v {
        EvalValue::Null => Json::Null,
        EvalValue::String(s) | EvalValue::Reference(s) => Json::String(s.to_string()),
        EvalValue::Integer(i) => json!(i),
        EvalValue::Decimal(d) => {
            let text = d.to_string();
            match text.parse::<f64>() {
                Ok(f) if f.to_string() == text => json!(f),
                _ => Json::String(text),
            }
        }
        EvalValue::Boolean(b) => json!(b),
        EvalValue::DateTime(t) => Json::String(render_canonical(t)),
        EvalValue::Binary(b) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
        EvalValue::Multi(vs) => Json::Array(vs.iter().map(to_json).collect()),
        EvalValue::Structured(roles) => Json::Array(
            roles
                .iter()
                .map(|r| json!({"id": r.id, "value": r.value, "displayName": r.display_name}))
                .collect(),
        ),
    }
}

fn attributes(j: &Json) -> Result<Attributes, String> {
    let Json::Object(map) = j else {
        return Err("attributes must be a JSON object".into());
    };
    let mut attrs = Attributes::new();
    for (name, v) in map {
        let one = |x: &Json| -> Result<Option<Value>, String> {
            Ok(match x {
                Json::Null => None,
                Json::String(s) => Some(Value::string(s.as_str())),
                Json::Bool(b) => Some(Value::Boolean(*b)),
                Json::Number(n) => Some(match n.as_i64() {
                    Some(i) => Value::Integer(i),
                    None => Value::string(n.to_string()),
                }),
                other => return Err(format!("attribute {name}: unsupported value {other}")),
            })
        };
        let values: Values = match v {
            Json::Array(items) => {
                let mut vs = Values::new();
                for x in items {
                    if let Some(v) = one(x)? {
                        vs.push(v);
                    }
                }
                vs
            }
            other => one(other)?.map(Values::one).unwrap_or_default(),
        };
        attrs.set(name.as_str(), values);
    }
    Ok(attrs)
}

fn run(args: &[String]) -> Result<(Json, ExitCode), String> {
    let mut context = Map::new();
    let mut filter: Option<String> = None;
    let mut positional = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--context" => {
                let c = it.next().ok_or("--context needs a JSON object")?;
                match serde_json::from_str::<Json>(c).map_err(|e| format!("--context: {e}"))? {
                    Json::Object(m) => context = m,
                    _ => return Err("--context must be a JSON object".into()),
                }
            }
            "--filter" => filter = Some(it.next().ok_or("--filter needs a JSON filter")?.clone()),
            _ => positional.push(a.clone()),
        }
    }
    let now = match context.get("now").and_then(Json::as_str) {
        Some(t) => DateTime::parse_from_rfc3339(t)
            .map_err(|e| format!("context.now: {e}"))?
            .with_timezone(&Utc),
        None => DateTime::<Utc>::UNIX_EPOCH,
    };
    let seed = context.get("seed").and_then(Json::as_u64).unwrap_or(0);
    let member_of: Vec<Dn> = context
        .get("member_of")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter_map(Json::as_str)
        .map(|s| Dn::parse(s).map_err(|e| format!("context.member_of: {e}")))
        .collect::<Result<_, _>>()?;
    let dn: Option<Dn> = context
        .get("dn")
        .and_then(Json::as_str)
        .map(|s| Dn::parse(s).map_err(|e| format!("context.dn: {e}")))
        .transpose()?;

    if let Some(filter) = filter {
        let [attrs_json] = positional.as_slice() else {
            return Err(USAGE.into());
        };
        let attrs =
            attributes(&serde_json::from_str(attrs_json).map_err(|e| format!("attributes: {e}"))?)?;
        let spec: FilterSpec = serde_json::from_str(&filter).map_err(|e| format!("filter: {e}"))?;
        return Ok(match ScopeFilter::compile(&spec) {
            Ok(f) => (
                json!({"value": f.evaluate_with_dn(&attrs, dn.as_ref(), &|| member_of.clone())}),
                ExitCode::SUCCESS,
            ),
            Err(errs) => {
                let e = &errs[0];
                error("compile", &format!("E{:04}", e.code()), &e.to_string())
            }
        });
    }

    let [expression, attrs_json] = positional.as_slice() else {
        return Err(USAGE.into());
    };
    let attrs =
        attributes(&serde_json::from_str(attrs_json).map_err(|e| format!("attributes: {e}"))?)?;
    let program = match Program::compile(expression) {
        Ok(p) => p,
        Err(ds) => {
            let d = ds.0.iter().find(|d| d.is_error()).or(ds.0.first());
            return Ok(match d {
                Some(d) => error("compile", &d.code.to_string(), &d.message),
                None => error("compile", "E0000", "invalid expression"),
            });
        }
    };
    let mut used = UsedValues::new();
    for v in context
        .get("existing_values")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(s) = v.as_str() {
            used.insert(s);
        }
    }
    let roles: Vec<AppRoleValue> = context
        .get("app_role_assignments")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .map(|r| AppRoleValue {
            id: r
                .get("id")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string(),
            value: r
                .get("value")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string(),
            display_name: r
                .get("displayName")
                .or_else(|| r.get("display_name"))
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_string(),
        })
        .collect();
    let mut rng = SeededRng::from_seed(seed);
    let oracle = |v: &str| used.is_unique(v);
    let mut ctx = EvalContext {
        now,
        rng: &mut rng,
        default_domain: context.get("default_domain").and_then(Json::as_str),
        app_role_assignments: &roles,
        is_unique: &oracle,
    };
    Ok(match program.evaluate(&attrs, &mut ctx) {
        Err(e) => error(
            "evaluation",
            &format!("E{:04}", e.error.code),
            &e.error.message,
        ),
        Ok(out) => {
            let mut obj = match out.outcome {
                Outcome::Value(v) => json!({"value": to_json(&v)}),
                Outcome::IgnoreFlow => json!({"ignore_flow": true}),
                Outcome::NotUnique => {
                    let (j, code) = error(
                        "not_unique",
                        &format!("E{:04}", codes::NOT_UNIQUE),
                        "SelectUniqueValue: every candidate is already used in the target",
                    );
                    return Ok((j, code));
                }
            };
            if out.redacted {
                obj["redacted"] = json!(true);
            }
            if out.replace {
                obj["flow_mode"] = json!("replace");
            }
            (obj, ExitCode::SUCCESS)
        }
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok((json, code)) => {
            println!("{json}");
            code
        }
        Err(message) => {
            eprintln!("{message}");
            ExitCode::from(2)
        }
    }
}
