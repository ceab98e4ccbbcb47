//! The Microsoft Graph v1.0 schema for `user` and `group` (a subset of Microsoft's published
//! CSDL, `graph-v1.0-users-groups.csdl.xml`, embedded in the crate), parsed once: property
//! types for turning attribute values into Graph JSON, and validation of request bodies as Graph
//! does it (an unknown property or a wrong type is refused).
//!
//! It may not do I/O: the schema text is compiled into the crate.

use std::collections::HashMap;
use std::sync::OnceLock;

/// The embedded CSDL text.
const CSDL: &str = include_str!("graph-v1.0-users-groups.csdl.xml");

/// The type of a property, as the CSDL names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdmType {
    /// `Edm.String`.
    String,
    /// `Edm.Boolean`.
    Boolean,
    /// `Edm.Int32` or `Edm.Int64`.
    Integer,
    /// `Edm.DateTimeOffset`.
    DateTimeOffset,
    /// `Edm.Guid`.
    Guid,
    /// Another primitive (`Edm.Binary`, `Edm.Double`, …), kept by name.
    OtherPrimitive(String),
    /// A complex type of the schema, by its unqualified name.
    Complex(String),
    /// An enum type of the schema, by its unqualified name.
    Enum(String),
    /// A collection of another type.
    Collection(Box<EdmType>),
}

/// One declared property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyDef {
    /// Its type.
    pub ty: EdmType,
    /// Whether `null` is allowed.
    pub nullable: bool,
}

/// An entity or complex type: its properties (its base types' included) and whether it is open.
#[derive(Debug, Clone, Default)]
pub struct StructuredType {
    /// Properties by name (case as declared).
    pub properties: HashMap<String, PropertyDef>,
    /// Open types accept undeclared (dynamic) properties.
    pub open: bool,
}

/// The parsed schema.
#[derive(Debug, Default)]
pub struct Schema {
    types: HashMap<String, StructuredType>,
    enums: HashMap<String, Vec<String>>,
}

static SCHEMA: OnceLock<Schema> = OnceLock::new();

/// The embedded schema, parsed on first use. A parse failure (which a test rules out) leaves an
/// empty schema, under which every property is unknown.
pub fn schema() -> &'static Schema {
    SCHEMA.get_or_init(|| Schema::parse(CSDL).unwrap_or_default())
}

fn unqualify(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

fn parse_type(t: &str, enums: &HashMap<String, Vec<String>>) -> EdmType {
    if let Some(inner) = t
        .strip_prefix("Collection(")
        .and_then(|s| s.strip_suffix(')'))
    {
        return EdmType::Collection(Box::new(parse_type(inner, enums)));
    }
    match t {
        "Edm.String" => EdmType::String,
        "Edm.Boolean" => EdmType::Boolean,
        "Edm.Int32" | "Edm.Int64" | "Edm.Int16" | "Edm.Byte" => EdmType::Integer,
        "Edm.DateTimeOffset" => EdmType::DateTimeOffset,
        "Edm.Guid" => EdmType::Guid,
        p if p.starts_with("Edm.") => EdmType::OtherPrimitive(p.to_string()),
        other => {
            let n = unqualify(other).to_string();
            if enums.contains_key(&n) {
                EdmType::Enum(n)
            } else {
                EdmType::Complex(n)
            }
        }
    }
}

impl Schema {
    /// Parses CSDL text (one `Schema` element with entity, complex and enum types).
    pub fn parse(text: &str) -> Result<Schema, String> {
        let doc = roxmltree::Document::parse(text).map_err(|e| format!("CSDL: {e}"))?;
        let mut enums = HashMap::new();
        for n in doc.descendants().filter(|n| n.has_tag_name("EnumType")) {
            let name = n.attribute("Name").unwrap_or_default().to_string();
            let members = n
                .children()
                .filter(|c| c.has_tag_name("Member"))
                .filter_map(|c| c.attribute("Name").map(str::to_string))
                .collect();
            enums.insert(name, members);
        }
        // Declared properties and base type of each structured type, before inheritance.
        let mut raw: HashMap<String, (Option<String>, StructuredType)> = HashMap::new();
        for n in doc
            .descendants()
            .filter(|n| n.has_tag_name("EntityType") || n.has_tag_name("ComplexType"))
        {
            let name = n.attribute("Name").unwrap_or_default().to_string();
            let base = n.attribute("BaseType").map(|b| unqualify(b).to_string());
            let mut st = StructuredType {
                open: n.attribute("OpenType") == Some("true"),
                ..StructuredType::default()
            };
            for p in n.children().filter(|c| c.has_tag_name("Property")) {
                let (Some(pn), Some(pt)) = (p.attribute("Name"), p.attribute("Type")) else {
                    return Err(format!("CSDL: a property of {name} lacks Name or Type"));
                };
                st.properties.insert(
                    pn.to_string(),
                    PropertyDef {
                        ty: parse_type(pt, &enums),
                        nullable: p.attribute("Nullable") != Some("false"),
                    },
                );
            }
            raw.insert(name, (base, st));
        }
        let mut types = HashMap::new();
        for name in raw.keys() {
            let mut st = StructuredType::default();
            let mut cur = Some(name.clone());
            let mut depth = 0;
            while let Some(c) = cur {
                depth += 1;
                let Some((base, own)) = raw.get(&c) else {
                    return Err(format!("CSDL: unknown base type {c}"));
                };
                if depth == 1 {
                    st.open = own.open;
                }
                for (k, v) in &own.properties {
                    st.properties.entry(k.clone()).or_insert_with(|| v.clone());
                }
                cur = if depth > 16 { None } else { base.clone() };
            }
            types.insert(name.clone(), st);
        }
        Ok(Schema { types, enums })
    }

    /// A structured type by unqualified name (`user`, `group`, `passwordProfile`).
    pub fn structured(&self, name: &str) -> Option<&StructuredType> {
        self.types.get(name)
    }

    /// A property of a structured type; names compare ignoring case, as Graph's do.
    pub fn property(&self, type_name: &str, property: &str) -> Option<(&str, &PropertyDef)> {
        let t = self.types.get(type_name)?;
        t.properties
            .get_key_value(property)
            .or_else(|| {
                t.properties
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(property))
            })
            .map(|(k, v)| (k.as_str(), v))
    }

    /// The type of a dotted path (`onPremisesExtensionAttributes.extensionAttribute1`) below an
    /// entity type, with the path's declared spelling.
    pub fn path(&self, type_name: &str, path: &str) -> Option<(String, &PropertyDef)> {
        let mut ty = type_name.to_string();
        let mut spelled = Vec::new();
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let (name, def) = self.property(&ty, part)?;
            spelled.push(name.to_string());
            if parts.peek().is_none() {
                return Some((spelled.join("."), def));
            }
            match &def.ty {
                EdmType::Complex(c) => ty = c.clone(),
                _ => return None,
            }
        }
        None
    }

    /// Checks a JSON request body for an entity of `type_name` as Graph does: every property
    /// declared (or a directory extension `extension_{appId}_{name}`, or an `@odata` annotation
    /// such as `members@odata.bind`), every value of its declared type. The error is Graph's
    /// message for the first offending property.
    pub fn validate(
        &self,
        type_name: &str,
        body: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), String> {
        let Some(t) = self.types.get(type_name) else {
            return Err(format!("Unknown type '{type_name}'."));
        };
        for (k, v) in body {
            if k.contains('@') {
                if k.starts_with('@') || k.ends_with("@odata.bind") || k.ends_with("@odata.type") {
                    continue;
                }
                return Err(format!("Invalid annotation '{k}'."));
            }
            if is_extension_property(k) {
                continue;
            }
            let Some(def) = t.properties.get(k.as_str()) else {
                return Err(format!(
                    "Property '{k}' does not exist as a declared property or extension property."
                ));
            };
            self.check_value(k, &def.ty, def.nullable, v)?;
        }
        Ok(())
    }

    fn check_value(
        &self,
        name: &str,
        ty: &EdmType,
        nullable: bool,
        v: &serde_json::Value,
    ) -> Result<(), String> {
        use serde_json::Value as J;
        let wrong = |expected: &str| {
            Err(format!(
                "Cannot convert the literal '{v}' to the expected type '{expected}' of property '{name}'."
            ))
        };
        if v.is_null() {
            if nullable {
                return Ok(());
            }
            return Err(format!("Property '{name}' does not accept null."));
        }
        match ty {
            EdmType::String => match v {
                J::String(_) => Ok(()),
                _ => wrong("Edm.String"),
            },
            EdmType::Boolean => match v {
                J::Bool(_) => Ok(()),
                _ => wrong("Edm.Boolean"),
            },
            EdmType::Integer => match v {
                J::Number(n) if n.is_i64() => Ok(()),
                _ => wrong("Edm.Int32"),
            },
            EdmType::DateTimeOffset => match v {
                J::String(s) if chrono::DateTime::parse_from_rfc3339(s).is_ok() => Ok(()),
                _ => wrong("Edm.DateTimeOffset"),
            },
            EdmType::Guid => match v {
                J::String(s) if uuid::Uuid::parse_str(s).is_ok() => Ok(()),
                _ => wrong("Edm.Guid"),
            },
            EdmType::OtherPrimitive(_) => Ok(()),
            EdmType::Enum(e) => match v {
                J::String(s) if self.enums.get(e).is_some_and(|m| m.iter().any(|x| x == s)) => {
                    Ok(())
                }
                _ => wrong(&format!("microsoft.graph.{e}")),
            },
            EdmType::Collection(inner) => match v {
                J::Array(items) => {
                    for i in items {
                        self.check_value(name, inner, false, i)?;
                    }
                    Ok(())
                }
                _ => wrong("Collection"),
            },
            EdmType::Complex(c) => match v {
                J::Object(m) => {
                    let Some(t) = self.types.get(c) else {
                        return Ok(());
                    };
                    for (k, iv) in m {
                        if k.starts_with('@') {
                            continue;
                        }
                        match t.properties.get(k.as_str()) {
                            Some(d) => self.check_value(k, &d.ty, d.nullable, iv)?,
                            None if t.open => {}
                            None => {
                                return Err(format!(
                                    "Property '{k}' does not exist on type 'microsoft.graph.{c}'."
                                ))
                            }
                        }
                    }
                    Ok(())
                }
                _ => wrong(&format!("microsoft.graph.{c}")),
            },
        }
    }
}

/// Whether `name` is a directory extension property: `extension_{appId without dashes}_{name}`.
pub fn is_extension_property(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("extension_") else {
        return false;
    };
    let Some((app, prop)) = rest.split_once('_') else {
        return false;
    };
    app.len() == 32
        && app.chars().all(|c| c.is_ascii_hexdigit())
        && !prop.is_empty()
        && prop.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn embedded_schema_parses_with_inheritance() {
        let s = Schema::parse(CSDL).unwrap();
        let user = s.structured("user").unwrap();
        assert!(user.properties.contains_key("id"), "inherited from entity");
        assert!(user.properties.contains_key("deletedDateTime"));
        assert_eq!(
            s.path("user", "onPremisesExtensionAttributes.extensionAttribute15")
                .unwrap()
                .0,
            "onPremisesExtensionAttributes.extensionAttribute15"
        );
        assert_eq!(
            s.path("user", "ACCOUNTENABLED").unwrap().1.ty,
            EdmType::Boolean
        );
        assert!(s.path("user", "nosuch").is_none());
    }

    #[test]
    fn validation_refuses_unknown_properties_and_wrong_types() {
        let s = schema();
        let good = obj(json!({
            "accountEnabled": true, "displayName": "Ada", "businessPhones": ["1"],
            "passwordProfile": {"password": "x", "forceChangePasswordNextSignIn": true},
            "onPremisesExtensionAttributes": {"extensionAttribute1": "a"},
            "extension_0123456789abcdef0123456789abcdef_costCenter": "CC1",
        }));
        s.validate("user", &good).unwrap();
        let e = s
            .validate("user", &obj(json!({"favouriteColour": "red"})))
            .unwrap_err();
        assert!(e.contains("favouriteColour"), "{e}");
        let e = s
            .validate("user", &obj(json!({"accountEnabled": "yes"})))
            .unwrap_err();
        assert!(e.contains("Edm.Boolean"), "{e}");
        assert!(s
            .validate("user", &obj(json!({"businessPhones": "1"})))
            .is_err());
        assert!(s
            .validate("user", &obj(json!({"passwordProfile": {"pwd": "x"}})))
            .is_err());
        assert!(s
            .validate("group", &obj(json!({"members@odata.bind": ["x"]})))
            .is_ok());
        assert!(s.validate("user", &obj(json!({"birthday": null}))).is_err());
    }

    #[test]
    fn extension_property_names() {
        assert!(is_extension_property(
            "extension_0123456789abcdef0123456789abcdef_costCenter"
        ));
        assert!(!is_extension_property("extension_123_costCenter"));
        assert!(!is_extension_property("extensionAttribute1"));
    }
}
