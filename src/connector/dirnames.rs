//! Naming and typing objects of a directory target, shared by the LDIF target
//! ([`LdifTarget`](super::ldif::LdifTarget)) and the LDAP target
//! ([`LdapTarget`](super::ldap::LdapTarget)): where a new object goes and what its DN is, how an
//! update renames or moves an object, which object type `objectClass` values give, and how a
//! reference value becomes a DN.
//!
//! Pure functions of attributes, DNs and configuration: no I/O, no connector state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{ConnectorError, ErrorKind};
use crate::model::{
    AttrName, AttributeChange, Attributes, ChangeOp, Dn, ObjectType, Rdn, Reference, TargetId,
    Value,
};

/// The pseudo-attribute that names an object's DN: a create carrying it is made at that DN, an
/// update replacing it renames and/or moves the object. Never stored or sent as an attribute.
pub const DN_ATTRIBUTE: &str = "dn";

/// The pseudo-attribute that names an object's parent (container) DN: a create carrying it is
/// made below that DN instead of the type's configured parent; an update replacing it moves the
/// object there (keeping its RDN). Never stored or sent as an attribute.
pub const PARENT_ATTRIBUTE: &str = "parent";

/// Where objects of one type are created and how they are named.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectTypeNaming {
    /// The attribute whose (first) value names a new object (`cn`, `uid`, `ou`).
    pub rdn_attribute: AttrName,
    /// The DN new objects are created under (`ou=People,dc=example,dc=com`).
    pub parent: Dn,
    /// The `objectClass` values given to a new object whose create carries none. They must map
    /// back to the type through the target's `objectClass` → type map.
    #[serde(default)]
    pub object_classes: Vec<String>,
}

impl ObjectTypeNaming {
    /// Naming by `rdn_attribute` below `parent`, with these `objectClass` values for new objects.
    pub fn new(
        rdn_attribute: impl Into<AttrName>,
        parent: Dn,
        object_classes: impl IntoIterator<Item = impl Into<String>>,
    ) -> ObjectTypeNaming {
        ObjectTypeNaming {
            rdn_attribute: rdn_attribute.into(),
            parent,
            object_classes: object_classes.into_iter().map(Into::into).collect(),
        }
    }
}

/// The default `objectClass` → object type map: `user` and `inetOrgPerson` are `user`s, `group`
/// and `groupOfNames` are `group`s.
pub fn default_object_type_map() -> BTreeMap<AttrName, ObjectType> {
    [
        ("user", "user"),
        ("inetOrgPerson", "user"),
        ("group", "group"),
        ("groupOfNames", "group"),
    ]
    .into_iter()
    .map(|(c, t)| (AttrName::new(c), ObjectType::new(t)))
    .collect()
}

/// The default reference attributes: `member`, `manager`, `uniqueMember`, `memberOf`.
pub fn default_reference_attributes() -> Vec<AttrName> {
    ["member", "manager", "uniqueMember", "memberOf"]
        .into_iter()
        .map(AttrName::new)
        .collect()
}

/// The attribute type of an attribute description: `cn;lang-en` → `cn`.
pub(crate) fn base_name(attribute: &str) -> &str {
    attribute.split(';').next().unwrap_or(attribute)
}

/// The typing settings of a directory target: `objectClass` → type, reference and binary
/// attributes.
pub(crate) struct Schema<'a> {
    pub object_type_map: &'a BTreeMap<AttrName, ObjectType>,
    pub references: &'a [AttrName],
    #[cfg_attr(not(feature = "ldif"), allow(dead_code))]
    pub binary: &'a [AttrName],
}

impl Schema<'_> {
    /// The object type of an entry with these `objectClass` values: the last value the map names
    /// wins (directories list classes from the most general to the most specific).
    pub fn object_type<'v>(
        &self,
        classes: impl DoubleEndedIterator<Item = &'v Value>,
    ) -> Option<ObjectType> {
        classes
            .rev()
            .filter_map(Value::as_str)
            .find_map(|c| self.object_type_map.get(&AttrName::new(c.trim())).cloned())
    }

    /// Whether `attribute` (options ignored) is a reference attribute.
    pub fn is_reference(&self, attribute: &AttrName) -> bool {
        let base = base_name(attribute.as_str());
        self.references.iter().any(|r| r.is(base))
    }

    /// Whether `attribute` (options ignored) is a binary attribute.
    #[cfg_attr(not(feature = "ldif"), allow(dead_code))]
    pub fn is_binary(&self, attribute: &AttrName) -> bool {
        let base = base_name(attribute.as_str());
        self.binary.iter().any(|r| r.is(base))
    }

    /// Checks that `attrs`' `objectClass` values map to `object_type`, so that the object reads
    /// back as that type.
    pub fn check_type(
        &self,
        attrs: &Attributes,
        object_type: &ObjectType,
        dn: &Dn,
    ) -> Result<(), ConnectorError> {
        let classes = attrs.get("objectClass").map(|v| &v[..]).unwrap_or(&[]);
        let detected = self.object_type(classes.iter());
        if detected.as_ref() == Some(object_type) {
            return Ok(());
        }
        let list: Vec<String> = classes.iter().map(Value::to_text).collect();
        Err(constraint(
            &format!(
                "the objectClass values [{}] map to {}, not {object_type}; give the create \
                 objectClass values (or object_classes in the type's settings) that \
                 object_type_map maps to {object_type}",
                list.join(", "),
                detected.map_or("no type".to_owned(), |t| t.to_string())
            ),
            dn,
        ))
    }
}

/// The target id of the object at `dn`: its normalized DN.
pub(crate) fn id_of(dn: &Dn) -> TargetId {
    TargetId::new(dn.normalized())
}

/// A constraint error about the object at `dn`.
pub(crate) fn constraint(message: &str, dn: &Dn) -> ConnectorError {
    ConnectorError::new(ErrorKind::Constraint, message.to_owned()).with_object(id_of(dn))
}

/// A DN given as a value (the `dn` or `parent` pseudo-attribute, a reference).
pub(crate) fn dn_value(attribute: &str, v: &Value) -> Result<Dn, ConnectorError> {
    let parsed = match v {
        Value::String(s) => Dn::parse(s),
        Value::Reference(Reference::Dn(d)) => Ok(d.clone()),
        Value::Reference(Reference::Target(t)) => Dn::parse(t.as_str()),
        other => Dn::parse(&other.to_text()),
    };
    parsed.map_err(|e| {
        ConnectorError::new(
            ErrorKind::Constraint,
            format!("the {attribute} attribute: {e}"),
        )
    })
}

/// The DN a reference value points at: a DN reference, or a target id (a normalized DN).
/// References by anchor (unresolved) are refused.
#[cfg_attr(not(feature = "ldap"), allow(dead_code))]
pub(crate) fn reference_dn(attribute: &AttrName, v: &Value, dn: &Dn) -> Result<Dn, ConnectorError> {
    let text = match v {
        Value::Reference(Reference::Dn(d)) => return Ok(d.clone()),
        Value::Reference(Reference::Target(t)) => t.as_str().to_owned(),
        Value::Reference(r) => {
            return Err(constraint(
                &format!("attribute {attribute}: the reference {r} is not a target id"),
                dn,
            ))
        }
        Value::String(s) => s.to_string(),
        other => {
            return Err(constraint(
                &format!("attribute {attribute}: a {other:?} value is not a DN"),
                dn,
            ))
        }
    };
    Dn::parse(&text).map_err(|e| {
        constraint(
            &format!("attribute {attribute}: the reference {text:?} is not a DN: {e}"),
            dn,
        )
    })
}

fn has_value(attrs: &Attributes, attr: &str, value: &str) -> bool {
    attrs
        .get(attr)
        .is_some_and(|vs| vs.iter().any(|v| v.eq_ignore_case(&Value::string(value))))
}

/// Adds the RDN values of `dn` the attributes lack.
pub(crate) fn add_naming_values(attrs: &mut Attributes, dn: &Dn) {
    if let Some(rdn) = dn.rdn() {
        for ava in rdn.avas() {
            if !has_value(attrs, ava.attr(), ava.value()) {
                attrs.add(ava.attr(), Value::string(ava.value()));
            }
        }
    }
}

/// The DN of a new object of `object_type`, taking the `dn` and `parent` pseudo-attributes out
/// of `attrs`: the `dn` value when there is one, else the first value of the type's
/// `rdn_attribute` under the `parent` value or the type's configured parent. `target` names the
/// target in configuration errors.
pub(crate) fn create_dn(
    target: &str,
    settings: Option<&ObjectTypeNaming>,
    object_type: &ObjectType,
    attrs: &mut Attributes,
) -> Result<Dn, ConnectorError> {
    let single = |attrs: &mut Attributes, name: &str| match attrs.remove(name) {
        Some(v) if v.len() == 1 => v.first().map(|v| dn_value(name, v)).transpose(),
        Some(_) => Err(ConnectorError::new(
            ErrorKind::Constraint,
            format!("the {name} attribute of a create has one value"),
        )),
        None => Ok(None),
    };
    let explicit = single(attrs, DN_ATTRIBUTE)?;
    let parent = single(attrs, PARENT_ATTRIBUTE)?;
    let dn = match explicit {
        Some(dn) => dn,
        None => {
            let Some(s) = settings else {
                return Err(ConnectorError::new(
                    ErrorKind::Config,
                    format!(
                        "the {target} target has no settings for object type {object_type} \
                         (object_types) and the create carries no dn attribute"
                    ),
                ));
            };
            let Some(value) = attrs.first(s.rdn_attribute.as_str()) else {
                return Err(ConnectorError::new(
                    ErrorKind::Constraint,
                    format!(
                        "a new {object_type} needs a value of {} to be named",
                        s.rdn_attribute
                    ),
                ));
            };
            let rdn = Rdn::try_new(s.rdn_attribute.as_str(), &value.to_text()).map_err(|e| {
                ConnectorError::new(ErrorKind::Config, format!("rdn_attribute: {e}"))
            })?;
            parent.unwrap_or_else(|| s.parent.clone()).child(rdn)
        }
    };
    if dn.is_root() {
        return Err(constraint("an object cannot have the root DN", &dn));
    }
    Ok(dn)
}

/// The `dn` and `parent` pseudo-attribute replaces of an update, taken out of `changes`.
#[derive(Debug, Default)]
pub(crate) struct Placement {
    /// A replace of `dn`: the object's new DN.
    pub dn: Option<Dn>,
    /// A replace of `parent`: the object's new container.
    pub parent: Option<Dn>,
}

impl Placement {
    /// Splits `changes` into the placement and the attribute changes proper.
    pub fn split<'c>(
        changes: &'c [AttributeChange],
        dn: &Dn,
    ) -> Result<(Placement, Vec<&'c AttributeChange>), ConnectorError> {
        let mut placement = Placement::default();
        let mut rest = Vec::with_capacity(changes.len());
        for c in changes {
            let slot = if c.attribute.is(DN_ATTRIBUTE) {
                &mut placement.dn
            } else if c.attribute.is(PARENT_ATTRIBUTE) {
                &mut placement.parent
            } else {
                rest.push(c);
                continue;
            };
            *slot = Some(match (c.op, c.values.first(), c.values.len()) {
                (ChangeOp::Replace, Some(v), 1) => dn_value(c.attribute.as_str(), v)?,
                _ => {
                    return Err(constraint(
                        &format!(
                            "the {} of an object can only be replaced by one value",
                            c.attribute
                        ),
                        dn,
                    ))
                }
            });
        }
        Ok((placement, rest))
    }

    /// The DN of the object at `dn` after the update: the explicit `dn` if given; else the RDN
    /// from [`renamed`] (the naming attribute's values in `attrs`, the attributes after the
    /// update) under the new `parent` if given, else the current one.
    pub fn new_dn(&self, dn: &Dn, attrs: &Attributes) -> Result<Dn, ConnectorError> {
        if let Some(d) = &self.dn {
            return Ok(d.clone());
        }
        let renamed = renamed(dn, attrs)?;
        Ok(match &self.parent {
            Some(p) => renamed.move_to(p),
            None => renamed,
        })
    }
}

/// The DN after an update: the same while the RDN's values are present in `attrs`, else
/// renamed to the naming attribute's (first) new value.
pub(crate) fn renamed(dn: &Dn, attrs: &Attributes) -> Result<Dn, ConnectorError> {
    let Some(rdn) = dn.rdn() else {
        return Ok(dn.clone());
    };
    if rdn
        .avas()
        .iter()
        .all(|a| has_value(attrs, a.attr(), a.value()))
    {
        return Ok(dn.clone());
    }
    if rdn.is_multi_valued() {
        return Err(constraint(
            "the update removes a value of a multi-valued RDN; replace `dn` to rename",
            dn,
        ));
    }
    let Some(value) = attrs.first(rdn.attr()) else {
        return Err(constraint(
            &format!("the update removes the naming attribute {}", rdn.attr()),
            dn,
        ));
    };
    let new =
        Rdn::try_new(rdn.attr(), &value.to_text()).map_err(|e| constraint(&e.to_string(), dn))?;
    Ok(dn.with_rdn(new))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naming() -> ObjectTypeNaming {
        ObjectTypeNaming {
            rdn_attribute: "uid".into(),
            parent: Dn::parse("ou=People,dc=x").unwrap(),
            object_classes: vec!["inetOrgPerson".into()],
        }
    }

    #[test]
    fn create_dn_from_rdn_parent_or_explicit_dn() {
        let ty = ObjectType::new("user");
        let mut a = Attributes::new();
        a.add("uid", "jdoe");
        let dn = create_dn("t", Some(&naming()), &ty, &mut a).unwrap();
        assert_eq!(dn.normalized(), "uid=jdoe,ou=people,dc=x");
        a.add("parent", "ou=Staff,dc=x");
        let dn = create_dn("t", Some(&naming()), &ty, &mut a).unwrap();
        assert_eq!(dn.normalized(), "uid=jdoe,ou=staff,dc=x");
        assert!(!a.contains("parent"));
        a.add("dn", "cn=Other,dc=x");
        let dn = create_dn("t", None, &ty, &mut a).unwrap();
        assert_eq!(dn.normalized(), "cn=other,dc=x");
        assert!(!a.contains("dn"));
        let e = create_dn("t", None, &ty, &mut a).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        let mut empty = Attributes::new();
        let e = create_dn("t", Some(&naming()), &ty, &mut empty).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Constraint);
        assert!(e.message().contains("uid"), "{e}");
    }

    #[test]
    fn placement_renames_and_moves() {
        let dn = Dn::parse("uid=a,ou=People,dc=x").unwrap();
        let changes = vec![
            AttributeChange::replace("uid", Values::one("b")),
            AttributeChange::replace("parent", Values::one("ou=Former,dc=x")),
            AttributeChange::replace("mail", Values::one("b@x")),
        ];
        let (p, rest) = Placement::split(&changes, &dn).unwrap();
        assert_eq!(rest.len(), 2);
        let mut after = Attributes::new();
        after.add("uid", "b");
        assert_eq!(
            p.new_dn(&dn, &after).unwrap().normalized(),
            "uid=b,ou=former,dc=x"
        );
        let mut same = Attributes::new();
        same.add("uid", "A");
        assert_eq!(Placement::default().new_dn(&dn, &same).unwrap(), dn);
        let bad = vec![AttributeChange::add("dn", Values::one("cn=z"))];
        assert!(Placement::split(&bad, &dn).is_err());
        let e = renamed(&dn, &Attributes::new()).unwrap_err();
        assert!(e.message().contains("naming attribute uid"), "{e}");
    }

    #[test]
    fn references_become_dns() {
        let dn = Dn::parse("cn=g").unwrap();
        let attr = AttrName::new("member");
        let v = Value::target_ref("uid=a,dc=x");
        assert_eq!(
            reference_dn(&attr, &v, &dn).unwrap().normalized(),
            "uid=a,dc=x"
        );
        assert!(reference_dn(&attr, &Value::anchor_ref("abc"), &dn).is_err());
        assert!(reference_dn(&attr, &Value::string("not a dn"), &dn).is_err());
    }

    use crate::model::Values;
}
