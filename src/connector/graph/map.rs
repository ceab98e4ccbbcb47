//! Attribute values ↔ Graph JSON, typed by the CSDL: a dotted attribute name
//! (`onPremisesExtensionAttributes.extensionAttribute1`, `passwordProfile.password`) is a
//! property of a complex property; `extension_{appId}_{name}` is a directory extension; a
//! Boolean property accepts `TRUE`/`false` text as well as Booleans.
//!
//! Pure: no I/O.

use serde_json::{Map, Value as Json};

use super::csdl::{is_extension_property, schema, EdmType};
use crate::connector::{ConnectorError, ErrorKind};
use crate::model::{AttrName, Attributes, Value, Values};

/// Sets `path` (dotted) in `body`, creating the enclosing objects.
pub fn set_path(body: &mut Map<String, Json>, path: &str, value: Json) {
    match path.split_once('.') {
        None => {
            body.insert(path.to_string(), value);
        }
        Some((head, rest)) => {
            let entry = body
                .entry(head.to_string())
                .or_insert_with(|| Json::Object(Map::new()));
            if !entry.is_object() {
                *entry = Json::Object(Map::new());
            }
            if let Json::Object(m) = entry {
                set_path(m, rest, value);
            }
        }
    }
}

fn bad(type_name: &str, attr: &str, what: String) -> ConnectorError {
    ConnectorError::new(ErrorKind::Constraint, format!("{type_name}.{attr}: {what}"))
}

fn convert(type_name: &str, attr: &str, v: &Value, ty: &EdmType) -> Result<Json, ConnectorError> {
    Ok(match ty {
        EdmType::Boolean => match v {
            Value::Boolean(b) => Json::Bool(*b),
            Value::String(s) if s.eq_ignore_ascii_case("true") => Json::Bool(true),
            Value::String(s) if s.eq_ignore_ascii_case("false") => Json::Bool(false),
            Value::Integer(i) => Json::Bool(*i != 0),
            other => {
                return Err(bad(
                    type_name,
                    attr,
                    format!("{other} is not a Boolean; hint: give True or False"),
                ))
            }
        },
        EdmType::Integer => match v {
            Value::Integer(i) => Json::from(*i),
            Value::String(s) => Json::from(s.trim().parse::<i64>().map_err(|_| {
                bad(type_name, attr, format!("{s:?} is not an integer"))
            })?),
            other => return Err(bad(type_name, attr, format!("{other} is not an integer"))),
        },
        EdmType::Complex(c) => {
            return Err(bad(
                type_name,
                attr,
                format!("is of complex type {c}; hint: map its properties by a dotted name ({attr}.<property>)"),
            ))
        }
        EdmType::Collection(inner) => convert(type_name, attr, v, inner)?,
        // Strings, dates, GUIDs, enums: text (timestamps in RFC 3339).
        _ => Json::String(v.to_text()),
    })
}

/// The Graph path and JSON value of attribute `attr` of a `type_name` (`user`, `group`).
pub fn to_json(
    type_name: &str,
    attr: &str,
    values: &Values,
) -> Result<(String, Json), ConnectorError> {
    if is_extension_property(attr) {
        let j = match values.len() {
            0 => Json::Null,
            1 => match values.iter().next() {
                Some(Value::Boolean(b)) => Json::Bool(*b),
                Some(Value::Integer(i)) => Json::from(*i),
                Some(v) => Json::String(v.to_text()),
                None => Json::Null,
            },
            _ => Json::Array(values.iter().map(|v| Json::String(v.to_text())).collect()),
        };
        return Ok((attr.to_string(), j));
    }
    let Some((path, def)) = schema().path(type_name, attr) else {
        return Err(ConnectorError::new(
            ErrorKind::Config,
            format!("{attr:?} is not a property of the Graph {type_name} type; hint: use a property name of Graph v1.0, a dotted name for a complex property's part, or extension_<appId>_<name>"),
        ));
    };
    let j = if let EdmType::Collection(_) = &def.ty {
        Json::Array(
            values
                .iter()
                .map(|v| convert(type_name, attr, v, &def.ty))
                .collect::<Result<_, _>>()?,
        )
    } else {
        match values.len() {
            0 => Json::Null,
            1 => match values.iter().next() {
                Some(v) => convert(type_name, attr, v, &def.ty)?,
                None => Json::Null,
            },
            n => {
                return Err(bad(
                    type_name,
                    attr,
                    format!("{n} values for a single-valued property"),
                ))
            }
        }
    };
    Ok((path, j))
}

fn scalar(v: &Json) -> Option<Value> {
    match v {
        Json::String(s) => Some(Value::string(s.as_str())),
        Json::Bool(b) => Some(Value::Boolean(*b)),
        Json::Number(n) => n
            .as_i64()
            .map(Value::Integer)
            .or_else(|| Some(Value::string(n.to_string()))),
        _ => None,
    }
}

/// Graph JSON → attributes: nested objects flattened to dotted names, arrays to multiple
/// values, nulls and annotations (`@odata.*`, `…@delta`) left out, `id` left out.
pub fn from_json(obj: &Map<String, Json>, into: &mut Attributes) {
    fn walk(prefix: &str, obj: &Map<String, Json>, into: &mut Attributes) {
        for (k, v) in obj {
            if k.contains('@') || (prefix.is_empty() && k == "id") {
                continue;
            }
            let name = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Json::Null => {}
                Json::Object(m) => walk(&name, m, into),
                Json::Array(items) => {
                    let vals: Values = items.iter().filter_map(scalar).collect();
                    if !vals.is_empty() {
                        into.set(AttrName::new(name), vals);
                    }
                }
                other => {
                    if let Some(s) = scalar(other) {
                        into.set(AttrName::new(name), Values::one(s));
                    }
                }
            }
        }
    }
    walk("", obj, into);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_convert_by_declared_type() {
        let (p, j) = to_json("user", "accountenabled", &Values::one("TRUE")).unwrap();
        assert_eq!((p.as_str(), j), ("accountEnabled", json!(true)));
        let (p, j) = to_json(
            "user",
            "onPremisesExtensionAttributes.extensionAttribute1",
            &Values::one("CC1"),
        )
        .unwrap();
        assert_eq!(p, "onPremisesExtensionAttributes.extensionAttribute1");
        assert_eq!(j, json!("CC1"));
        let (_, j) = to_json("user", "businessPhones", &Values::one("+1 555")).unwrap();
        assert_eq!(j, json!(["+1 555"]));
        assert!(to_json("user", "passwordProfile", &Values::one("x")).is_err());
        assert_eq!(
            to_json("user", "nosuch", &Values::one("x"))
                .unwrap_err()
                .kind(),
            ErrorKind::Config
        );
        assert!(to_json("user", "accountEnabled", &Values::one("maybe")).is_err());
    }

    #[test]
    fn json_flattens_and_nests_back() {
        let mut body = Map::new();
        set_path(&mut body, "a.b", json!(1));
        set_path(&mut body, "a.c", json!("x"));
        assert_eq!(Json::Object(body.clone()), json!({"a": {"b": 1, "c": "x"}}));
        let mut attrs = Attributes::new();
        body.insert("id".into(), json!("1"));
        body.insert("@odata.type".into(), json!("u"));
        body.insert("list".into(), json!(["p", "q"]));
        body.insert("gone".into(), Json::Null);
        from_json(&body, &mut attrs);
        assert_eq!(attrs.first("a.b"), Some(&Value::Integer(1)));
        assert_eq!(attrs.get("list").map(|v| v.len()), Some(2));
        assert!(!attrs.contains("id") && !attrs.contains("gone"));
    }
}
