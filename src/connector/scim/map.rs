//! Between the rules' attribute names and SCIM JSON: parsing attribute paths
//! (`name.givenName`, `emails[type eq "work"].value`, `urn:…:User:employeeNumber`), turning a
//! resource into flat attributes and back, and building PATCH operations from attribute changes.
//!
//! Pure code: no I/O; every failure is an `Err` naming the attribute.

use serde_json::{json, Map, Value as Json};

use super::filter::{quote, split_urn};
use super::Dialect;
use crate::model::{AttrName, AttributeChange, Attributes, ChangeOp, Reference, Value, Values};

/// A parsed attribute name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AttrPath {
    /// The extension schema URN, for extension attributes.
    pub urn: Option<String>,
    /// The attribute.
    pub attr: String,
    /// A value filter `[key eq "value"]` selecting one element of a multi-valued attribute.
    pub filter: Option<(String, String)>,
    /// The sub-attribute.
    pub sub: Option<String>,
}

impl AttrPath {
    /// Parses `name`; `core` is the resource type's core schema (a name qualified by it is
    /// treated as unqualified).
    pub fn parse(name: &str, core: &str) -> Result<AttrPath, String> {
        let head_end = name.find('[').unwrap_or(name.len());
        let (urn, head) = split_urn(&name[..head_end]);
        let tail = &name[head_end..];
        let urn = urn
            .filter(|u| !u.eq_ignore_ascii_case(core))
            .map(str::to_string);
        let bad = |why: &str| format!("attribute {name:?}: {why}");
        let (attr, sub_in_head) = match head.split_once('.') {
            Some((a, s)) => (a, Some(s)),
            None => (head, None),
        };
        if attr.is_empty()
            || !attr
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_$".contains(c))
        {
            return Err(bad("not a SCIM attribute path"));
        }
        let mut filter = None;
        let mut sub = sub_in_head.map(str::to_string);
        if !tail.is_empty() {
            if sub.is_some() {
                return Err(bad("a value filter must follow the attribute"));
            }
            let close = tail
                .rfind(']')
                .ok_or_else(|| bad("the value filter has no closing ']'"))?;
            let inner = tail[1..close].trim();
            let (key, rest) = inner
                .split_once(char::is_whitespace)
                .ok_or_else(|| bad("expected a filter of the form [type eq \"work\"]"))?;
            let rest = rest.trim_start();
            if !(rest.len() > 3 && rest[..2].eq_ignore_ascii_case("eq")) {
                return Err(bad("only `eq` value filters are supported"));
            }
            let lit = rest[2..].trim();
            let v: String = serde_json::from_str(lit)
                .map_err(|_| bad("the value filter's value must be a quoted string"))?;
            filter = Some((key.to_string(), v));
            let after = &tail[close + 1..];
            if let Some(s) = after.strip_prefix('.') {
                sub = Some(s.to_string());
            } else if !after.is_empty() {
                return Err(bad("unexpected text after the value filter"));
            }
        }
        if let Some(s) = &sub {
            if s.is_empty()
                || !s
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_$".contains(c))
            {
                return Err(bad("not a SCIM sub-attribute"));
            }
        }
        Ok(AttrPath {
            urn,
            attr: attr.to_string(),
            filter,
            sub,
        })
    }

    /// The attribute with its URN, without filter or sub-attribute.
    pub fn qualified_attr(&self) -> String {
        match &self.urn {
            Some(u) => format!("{u}:{}", self.attr),
            None => self.attr.clone(),
        }
    }

    /// The filter as SCIM text, `[type eq "work"]`.
    fn filter_text(&self) -> String {
        match &self.filter {
            Some((k, v)) => format!("[{k} eq {}]", quote(v)),
            None => String::new(),
        }
    }

    /// The full path in SCIM syntax.
    pub fn text(&self) -> String {
        let mut s = self.qualified_attr();
        s.push_str(&self.filter_text());
        if let Some(sub) = &self.sub {
            s.push('.');
            s.push_str(sub);
        }
        s
    }
}

/// Whether an attribute holds references (`{"value": id}` objects).
pub(crate) fn is_reference_attr(attr: &str) -> bool {
    ["members", "manager", "groups"]
        .iter()
        .any(|r| r.eq_ignore_ascii_case(attr))
}

/// Schema knowledge the mapping needs.
pub(crate) trait SchemaInfo {
    /// Whether `attr` (of extension `urn`, or the core schema) is multi-valued.
    fn multi_valued(&self, urn: Option<&str>, attr: &str) -> bool;
    /// Whether `attr` is a Boolean.
    fn boolean(&self, urn: Option<&str>, attr: &str) -> bool;
}

/// A JSON scalar for `value`; `bool_strings` writes Booleans as `"True"`/`"False"` (Entra).
pub(crate) fn scalar(value: &Value, bool_strings: bool) -> Json {
    match value {
        Value::String(s) => Json::String(s.to_string()),
        Value::Boolean(b) if bool_strings => Json::String(if *b { "True" } else { "False" }.into()),
        Value::Boolean(b) => Json::Bool(*b),
        Value::Integer(i) => json!(i),
        Value::Reference(Reference::Target(id)) => Json::String(id.as_str().to_string()),
        other => Json::String(other.to_text()),
    }
}

fn reference(value: &Value, attr: &AttrName) -> Result<Json, String> {
    match value {
        Value::Reference(Reference::Target(id)) => Ok(json!({ "value": id.as_str() })),
        Value::String(s) => Ok(json!({ "value": s.as_str() })),
        other => Err(format!(
            "attribute {attr}: the reference {other} is not resolved to a target id"
        )),
    }
}

/// Builds a resource body (POST / PUT) from flat attributes. Returns the body and the extension
/// URNs it uses. `keep` decides whether an extension URN may be sent.
pub(crate) fn to_resource(
    attributes: &Attributes,
    core: &str,
    schema: &dyn SchemaInfo,
    keep: &dyn Fn(&str) -> bool,
    skipped: &mut Vec<String>,
) -> Result<Json, String> {
    let mut root = Map::new();
    let mut schemas = vec![Json::String(core.to_string())];
    for (name, values) in attributes.iter() {
        if values.is_empty() {
            continue;
        }
        let path = AttrPath::parse(name.as_str(), core)?;
        let container = match &path.urn {
            Some(u) => {
                if !keep(u) {
                    skipped.push(name.to_string());
                    continue;
                }
                if !schemas.iter().any(|s| s.as_str() == Some(u.as_str())) {
                    schemas.push(Json::String(u.clone()));
                }
                let e = root
                    .entry(u.clone())
                    .or_insert_with(|| Json::Object(Map::new()));
                match e {
                    Json::Object(m) => m,
                    _ => return Err(format!("attribute {name}: {u} is not an object")),
                }
            }
            None => &mut root,
        };
        set_path(container, &path, name, values, schema)?;
    }
    root.insert("schemas".into(), Json::Array(schemas));
    Ok(Json::Object(root))
}

fn set_path(
    container: &mut Map<String, Json>,
    path: &AttrPath,
    name: &AttrName,
    values: &Values,
    schema: &dyn SchemaInfo,
) -> Result<(), String> {
    let multi = schema.multi_valued(path.urn.as_deref(), &path.attr);
    match (&path.filter, &path.sub) {
        (None, None) => {
            let v = if is_reference_attr(&path.attr) {
                let refs = values
                    .iter()
                    .map(|v| reference(v, name))
                    .collect::<Result<Vec<_>, _>>()?;
                if multi || refs.len() > 1 {
                    Json::Array(refs)
                } else {
                    refs.into_iter().next().unwrap_or(Json::Null)
                }
            } else if multi || values.len() > 1 {
                Json::Array(values.iter().map(|v| scalar(v, false)).collect())
            } else {
                values
                    .iter()
                    .next()
                    .map(|v| scalar(v, false))
                    .unwrap_or(Json::Null)
            };
            container.insert(path.attr.clone(), v);
        }
        (None, Some(sub)) => {
            let e = container
                .entry(path.attr.clone())
                .or_insert_with(|| Json::Object(Map::new()));
            let Json::Object(m) = e else {
                return Err(format!("attribute {name}: {} is not complex", path.attr));
            };
            if let Some(v) = values.iter().next() {
                m.insert(sub.clone(), scalar(v, false));
            }
        }
        (Some((key, fv)), sub) => {
            let e = container
                .entry(path.attr.clone())
                .or_insert_with(|| Json::Array(Vec::new()));
            let Json::Array(items) = e else {
                return Err(format!(
                    "attribute {name}: {} is not multi-valued",
                    path.attr
                ));
            };
            let pos = items
                .iter()
                .position(|i| i.get(key).and_then(Json::as_str) == Some(fv.as_str()));
            let pos = match pos {
                Some(p) => p,
                None => {
                    items.push(json!({ key.as_str(): fv.as_str() }));
                    items.len() - 1
                }
            };
            if let (Some(Json::Object(m)), Some(v)) = (items.get_mut(pos), values.iter().next()) {
                m.insert(
                    sub.clone().unwrap_or_else(|| "value".into()),
                    scalar(v, false),
                );
            }
        }
    }
    Ok(())
}

/// Flattens a resource into attributes named as the rules name them.
pub(crate) fn from_resource(resource: &Map<String, Json>, schema: &dyn SchemaInfo) -> Attributes {
    let mut out = Attributes::new();
    for (k, v) in resource {
        if matches!(k.as_str(), "schemas" | "id" | "meta") {
            continue;
        }
        if k.len() > 4 && k[..4].eq_ignore_ascii_case("urn:") {
            if let Json::Object(ext) = v {
                for (k2, v2) in ext {
                    flatten(&mut out, &format!("{k}:{k2}"), Some(k), k2, v2, schema);
                }
            }
            continue;
        }
        flatten(&mut out, k, None, k, v, schema);
    }
    out
}

fn json_scalar(v: &Json, boolean: bool) -> Option<Value> {
    match v {
        Json::String(s) if boolean && s.eq_ignore_ascii_case("true") => Some(Value::Boolean(true)),
        Json::String(s) if boolean && s.eq_ignore_ascii_case("false") => {
            Some(Value::Boolean(false))
        }
        Json::String(s) => Some(Value::string(s.as_str())),
        Json::Bool(b) => Some(Value::Boolean(*b)),
        Json::Number(n) => n
            .as_i64()
            .map(Value::Integer)
            .or_else(|| Some(Value::string(n.to_string()))),
        _ => None,
    }
}

fn flatten(
    out: &mut Attributes,
    name: &str,
    urn: Option<&str>,
    attr: &str,
    v: &Json,
    schema: &dyn SchemaInfo,
) {
    let boolean = schema.boolean(urn, attr);
    let reference_attr = is_reference_attr(attr);
    match v {
        Json::Array(items) => {
            for item in items {
                match item {
                    Json::Object(m) if reference_attr => {
                        if let Some(id) = m.get("value").and_then(Json::as_str) {
                            out.add(name, Value::target_ref(id));
                        }
                    }
                    Json::Object(m) => {
                        if let Some(t) = m.get("type").and_then(Json::as_str) {
                            for (sk, sv) in m {
                                if sk == "type" {
                                    continue;
                                }
                                if let Some(x) = json_scalar(sv, sk == "primary") {
                                    out.add(format!("{name}[type eq {}].{sk}", quote(t)), x);
                                }
                            }
                        } else if let Some(x) = m.get("value").and_then(|x| json_scalar(x, false)) {
                            out.add(name, x);
                        }
                    }
                    other => {
                        if let Some(x) = json_scalar(other, boolean) {
                            out.add(name, x);
                        }
                    }
                }
            }
        }
        Json::Object(m) if reference_attr => {
            if let Some(id) = m.get("value").and_then(Json::as_str) {
                out.add(name, Value::target_ref(id));
            }
        }
        Json::Object(m) => {
            for (sk, sv) in m {
                if let Some(x) = json_scalar(sv, false) {
                    out.add(format!("{name}.{sk}"), x);
                }
            }
        }
        other => {
            if let Some(x) = json_scalar(other, boolean) {
                out.add(name, x);
            }
        }
    }
}

/// One PATCH operation, with how many member values it carries (for chunking).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PatchOp {
    /// The JSON operation.
    pub json: Json,
    /// Reference values it carries.
    pub weight: usize,
}

fn op_name(op: &str, dialect: Dialect) -> String {
    match dialect {
        Dialect::Strict => op.to_string(),
        Dialect::Entra => {
            let mut c = op.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        }
    }
}

/// PATCH operations for `changes`, membership adds and removes split into chunks of at most
/// `chunk` values. Changes to attributes of extensions `keep` refuses are listed in `skipped`.
pub(crate) fn patch_ops(
    changes: &[AttributeChange],
    core: &str,
    schema: &dyn SchemaInfo,
    dialect: Dialect,
    chunk: usize,
    keep: &dyn Fn(&str) -> bool,
    skipped: &mut Vec<String>,
) -> Result<Vec<PatchOp>, String> {
    let chunk = chunk.max(1);
    let bools = dialect == Dialect::Entra;
    let mut ops = Vec::new();
    let mut push = |op: &str, path: String, value: Option<Json>, weight: usize| {
        let mut m = Map::new();
        m.insert("op".into(), Json::String(op_name(op, dialect)));
        m.insert("path".into(), Json::String(path));
        if let Some(v) = value {
            m.insert("value".into(), v);
        }
        ops.push(PatchOp {
            json: Json::Object(m),
            weight,
        });
    };
    for c in changes {
        let path = AttrPath::parse(c.attribute.as_str(), core)?;
        if let Some(u) = &path.urn {
            if !keep(u) {
                skipped.push(c.attribute.to_string());
                continue;
            }
        }
        let multi = schema.multi_valued(path.urn.as_deref(), &path.attr);
        let is_ref = is_reference_attr(&path.attr) && path.sub.is_none() && path.filter.is_none();
        let refs = |vs: &[Value]| -> Result<Vec<Json>, String> {
            vs.iter().map(|v| reference(v, &c.attribute)).collect()
        };
        let values: Vec<Value> = c.values.iter().cloned().collect();
        match (c.op, is_ref) {
            (ChangeOp::Add, true) if multi => {
                for part in values.chunks(chunk) {
                    push(
                        "add",
                        path.qualified_attr(),
                        Some(Json::Array(refs(part)?)),
                        part.len(),
                    );
                }
            }
            (ChangeOp::Remove, true) if multi => {
                for part in values.chunks(chunk) {
                    match dialect {
                        Dialect::Strict => {
                            let ids: Vec<String> = part
                                .iter()
                                .map(|v| format!("value eq {}", super::filter::comp_value(v)))
                                .collect();
                            push(
                                "remove",
                                format!("{}[{}]", path.qualified_attr(), ids.join(" or ")),
                                None,
                                part.len(),
                            );
                        }
                        Dialect::Entra => push(
                            "remove",
                            path.qualified_attr(),
                            Some(Json::Array(refs(part)?)),
                            part.len(),
                        ),
                    }
                }
            }
            (ChangeOp::Remove, _) if values.is_empty() || !multi => {
                push("remove", removal_path(&path), None, 0);
            }
            (ChangeOp::Remove, false) => {
                for v in &values {
                    push(
                        "remove",
                        format!(
                            "{}[value eq {}]",
                            path.qualified_attr(),
                            super::filter::comp_value(v)
                        ),
                        None,
                        0,
                    );
                }
            }
            (_, _) if values.is_empty() => push("remove", removal_path(&path), None, 0),
            (op, true) => {
                let r = refs(&values)?;
                let n = r.len();
                let v = if multi || n > 1 {
                    Json::Array(r)
                } else {
                    r.into_iter().next().unwrap_or(Json::Null)
                };
                let verb = if op == ChangeOp::Add {
                    "add"
                } else {
                    "replace"
                };
                push(verb, path.qualified_attr(), Some(v), n);
            }
            (op, false) => {
                let first = values
                    .first()
                    .map(|v| scalar(v, bools))
                    .unwrap_or(Json::Null);
                if let Some((key, fv)) = &path.filter {
                    if c.old.is_empty() || op == ChangeOp::Add {
                        // No element of that type is known: add one (a replace through a value
                        // filter that matches nothing is `noTarget`).
                        let sub = path.sub.clone().unwrap_or_else(|| "value".into());
                        push(
                            "add",
                            path.qualified_attr(),
                            Some(json!([{ key.as_str(): fv.as_str(), sub: first }])),
                            0,
                        );
                    } else {
                        push("replace", path.text(), Some(first), 0);
                    }
                } else if multi && op == ChangeOp::Add {
                    let vs = values.iter().map(|v| scalar(v, bools)).collect();
                    push("add", path.text(), Some(Json::Array(vs)), 0);
                } else if multi {
                    let vs = values.iter().map(|v| scalar(v, bools)).collect();
                    push("replace", path.text(), Some(Json::Array(vs)), 0);
                } else {
                    push("replace", path.text(), Some(first), 0);
                }
            }
        }
    }
    Ok(ops)
}

/// The path that removes what `path` names: a filtered element as a whole.
fn removal_path(path: &AttrPath) -> String {
    if path.filter.is_some() {
        format!("{}{}", path.qualified_attr(), path.filter_text())
    } else {
        path.text()
    }
}

/// Groups operations into PATCH requests carrying at most `chunk` member values each.
pub(crate) fn pack(ops: Vec<PatchOp>, chunk: usize) -> Vec<Vec<Json>> {
    let mut out: Vec<Vec<Json>> = Vec::new();
    let mut weight = 0usize;
    for op in ops {
        match out.last_mut() {
            Some(last) if weight + op.weight <= chunk.max(1) => {
                weight += op.weight;
                last.push(op.json);
            }
            _ => {
                weight = op.weight;
                out.push(vec![op.json]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CORE: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
    const ENT: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";

    struct Plain;
    impl SchemaInfo for Plain {
        fn multi_valued(&self, _: Option<&str>, attr: &str) -> bool {
            matches!(attr, "emails" | "members" | "phoneNumbers")
        }
        fn boolean(&self, _: Option<&str>, attr: &str) -> bool {
            attr == "active"
        }
    }

    #[test]
    fn parses_paths() {
        let p = AttrPath::parse("emails[type eq \"work\"].value", CORE).unwrap();
        assert_eq!(p.attr, "emails");
        assert_eq!(p.filter, Some(("type".into(), "work".into())));
        assert_eq!(p.sub.as_deref(), Some("value"));
        assert_eq!(p.text(), "emails[type eq \"work\"].value");
        let p = AttrPath::parse(&format!("{ENT}:employeeNumber"), CORE).unwrap();
        assert_eq!(p.urn.as_deref(), Some(ENT));
        assert_eq!(p.attr, "employeeNumber");
        let p = AttrPath::parse(&format!("{CORE}:userName"), CORE).unwrap();
        assert_eq!((p.urn, p.attr.as_str()), (None, "userName"));
        for bad in [
            "",
            "a b",
            "emails[type eq work]",
            "emails[type",
            "x.y[type eq \"a\"]",
            "e[t eq \"a\"]x",
        ] {
            assert!(AttrPath::parse(bad, CORE).is_err(), "{bad}");
        }
    }

    #[test]
    fn resource_round_trip() {
        let mut a = Attributes::new();
        a.set("userName", Values::one("ada"));
        a.set("active", Values::one(true));
        a.set("name.givenName", Values::one("Ada"));
        a.set("emails[type eq \"work\"].value", Values::one("ada@x"));
        a.set(format!("{ENT}:employeeNumber").as_str(), Values::one("42"));
        a.set(
            format!("{ENT}:manager").as_str(),
            Values::one(Value::target_ref("m1")),
        );
        let mut skipped = Vec::new();
        let body = to_resource(&a, CORE, &Plain, &|_| true, &mut skipped).unwrap();
        assert_eq!(body["emails"], json!([{"type": "work", "value": "ada@x"}]));
        assert_eq!(body[ENT]["manager"], json!({"value": "m1"}));
        assert_eq!(body["schemas"], json!([CORE, ENT]));
        let back = from_resource(body.as_object().unwrap(), &Plain);
        for (n, v) in a.iter() {
            assert_eq!(back.get(n.as_str()), Some(v), "{n}");
        }
        let mut skipped = Vec::new();
        let body = to_resource(&a, CORE, &Plain, &|_| false, &mut skipped).unwrap();
        assert!(body.get(ENT).is_none());
        assert_eq!(skipped.len(), 2);
    }

    #[test]
    fn patches_and_chunks() {
        let members: Values = (0..250)
            .map(|i| Value::target_ref(format!("u{i}")))
            .collect();
        let mut email =
            AttributeChange::replace("emails[type eq \"work\"].value", Values::one("n@x"));
        let changes = vec![
            AttributeChange::replace("name.givenName", Values::one("Ada")),
            AttributeChange::replace("active", Values::one(false)),
            email.clone(),
            AttributeChange::add("members", members.clone()),
            AttributeChange::remove("members", Values::one(Value::target_ref("a\"b"))),
        ];
        let mut sk = Vec::new();
        let ops = patch_ops(
            &changes,
            CORE,
            &Plain,
            Dialect::Strict,
            100,
            &|_| true,
            &mut sk,
        )
        .unwrap();
        assert_eq!(
            ops[0].json,
            json!({"op": "replace", "path": "name.givenName", "value": "Ada"})
        );
        assert_eq!(ops[1].json["value"], json!(false));
        assert_eq!(
            ops[2].json,
            json!({"op": "add", "path": "emails", "value": [{"type": "work", "value": "n@x"}]})
        );
        assert_eq!(
            ops.iter().filter(|o| o.json["path"] == "members").count(),
            3
        );
        assert_eq!(
            ops.last().unwrap().json,
            json!({"op": "remove", "path": "members[value eq \"a\\\"b\"]"})
        );
        let reqs = pack(ops, 100);
        assert_eq!(reqs.len(), 3);
        let member_values = |r: &Vec<Json>| -> usize {
            r.iter()
                .filter(|o| o["path"].as_str().is_some_and(|p| p.starts_with("members")))
                .map(|o| o["value"].as_array().map_or(1, Vec::len))
                .sum()
        };
        assert!(reqs.iter().all(|r| member_values(r) <= 100));
        assert_eq!(reqs.iter().map(member_values).sum::<usize>(), 251);
        email.old = Values::one("o@x");
        let ops = patch_ops(
            &[email, AttributeChange::replace("active", Values::one(true))],
            CORE,
            &Plain,
            Dialect::Entra,
            100,
            &|_| true,
            &mut sk,
        )
        .unwrap();
        assert_eq!(
            ops[0].json,
            json!({"op": "Replace", "path": "emails[type eq \"work\"].value", "value": "n@x"})
        );
        assert_eq!(ops[1].json["value"], json!("True"));
        let ops = patch_ops(
            &[AttributeChange::replace("title", Values::new())],
            CORE,
            &Plain,
            Dialect::Strict,
            100,
            &|_| true,
            &mut sk,
        )
        .unwrap();
        assert_eq!(ops[0].json, json!({"op": "remove", "path": "title"}));
    }

    #[test]
    fn reads_entra_booleans_and_members() {
        let r = json!({"id": "g", "displayName": "G", "active": "False", "members": [{"value": "u1", "display": "x"}]});
        let a = from_resource(r.as_object().unwrap(), &Plain);
        assert_eq!(a.get("active"), Some(&Values::one(false)));
        assert_eq!(
            a.get("members"),
            Some(&Values::one(Value::target_ref("u1")))
        );
        assert!(a.get("id").is_none());
    }
}
