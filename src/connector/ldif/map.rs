//! Mapping LDIF values onto model values: object types from `objectClass`, references, binary
//! attributes. Shared by [`LdifSource`](super::LdifSource) and [`LdifTarget`](super::LdifTarget).
//!
//! Pure functions of a record and a configuration: no I/O.

use super::{LdifError, LdifValue};
use crate::model::{AttrName, Dn, Value};

pub use crate::connector::dirnames::{default_object_type_map, default_reference_attributes};

/// The default binary attributes: `objectGUID`, `objectSid`, `jpegPhoto`, `thumbnailPhoto`,
/// `userCertificate`.
pub fn default_binary_attributes() -> Vec<AttrName> {
    [
        "objectGUID",
        "objectSid",
        "jpegPhoto",
        "thumbnailPhoto",
        "userCertificate",
    ]
    .into_iter()
    .map(AttrName::new)
    .collect()
}

/// How reference values are represented after mapping.
#[derive(Clone, Copy)]
pub(crate) enum RefForm {
    /// `Reference::Dn` (a source's view).
    Dn,
    /// `Reference::Target` with the normalized DN as id (the LDIF target's view).
    Target,
}

// The mapping settings (`Schema`: object types from `objectClass`, reference and binary
// attributes) are shared with the LDAP target in `connector::dirnames`; the LDIF value
// conversion is added here.
pub(crate) use crate::connector::dirnames::Schema;

impl Schema<'_> {
    /// The model value of one LDIF value of the entry `dn`.
    pub fn convert(&self, v: &LdifValue, dn: &Dn, form: RefForm) -> Result<Value, LdifError> {
        self.convert_value(&v.attribute, v.value.clone(), v.line, dn, form)
    }

    /// The model value of `value` of `attribute`, read on `line` for the entry `dn`.
    pub fn convert_value(
        &self,
        attribute: &AttrName,
        value: Value,
        line: usize,
        dn: &Dn,
        form: RefForm,
    ) -> Result<Value, LdifError> {
        let kind = (self.is_binary(attribute), self.is_reference(attribute));
        self.convert_known(attribute, value, line, dn, form, kind)
    }

    /// [`Schema::convert_value`] for an attribute known to be binary (`kind.0`) or a reference
    /// (`kind.1`) or neither.
    pub(crate) fn convert_known(
        &self,
        attribute: &AttrName,
        value: Value,
        line: usize,
        dn: &Dn,
        form: RefForm,
        (binary, reference): (bool, bool),
    ) -> Result<Value, LdifError> {
        if binary {
            return Ok(match value {
                Value::String(s) => Value::Bytes(s.as_bytes().to_vec()),
                other => other,
            });
        }
        if !reference {
            return Ok(value);
        }
        let Value::String(text) = value else {
            return Err(LdifError::new(
                line,
                format!("attribute {attribute} of {dn}: a reference value is not UTF-8 text"),
            ));
        };
        let target = Dn::parse(&text).map_err(|e| {
            LdifError::new(
                line,
                format!("attribute {attribute} of {dn}: the reference is not a DN: {e}"),
            )
        })?;
        Ok(match form {
            RefForm::Dn => Value::dn_ref(target),
            RefForm::Target => Value::target_ref(target.normalized()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectType;
    use crate::model::Reference;
    use std::collections::BTreeMap;

    fn schema_parts() -> (BTreeMap<AttrName, ObjectType>, Vec<AttrName>, Vec<AttrName>) {
        (
            default_object_type_map(),
            default_reference_attributes(),
            default_binary_attributes(),
        )
    }

    #[test]
    fn most_specific_listed_class_wins() {
        let (m, r, b) = schema_parts();
        let s = Schema {
            object_type_map: &m,
            references: &r,
            binary: &b,
        };
        let classes: Vec<Value> = ["top", "person", "organizationalPerson", "inetOrgPerson"]
            .into_iter()
            .map(Value::from)
            .collect();
        assert_eq!(s.object_type(classes.iter()), Some(ObjectType::new("user")));
        let classes: Vec<Value> = ["top", "GROUPOFNAMES"]
            .into_iter()
            .map(Value::from)
            .collect();
        assert_eq!(
            s.object_type(classes.iter()),
            Some(ObjectType::new("group"))
        );
        let classes: Vec<Value> = ["top", "organizationalUnit"]
            .into_iter()
            .map(Value::from)
            .collect();
        assert_eq!(s.object_type(classes.iter()), None);
        // A later listed (more specific) mapped class wins over an earlier one.
        let mut m2 = m.clone();
        m2.insert("computer".into(), "device".into());
        let s2 = Schema {
            object_type_map: &m2,
            references: &r,
            binary: &b,
        };
        let classes: Vec<Value> = ["top", "person", "user", "computer"]
            .into_iter()
            .map(Value::from)
            .collect();
        assert_eq!(
            s2.object_type(classes.iter()),
            Some(ObjectType::new("device"))
        );
    }

    #[test]
    fn references_and_binary_values_ignore_options() {
        let (m, r, b) = schema_parts();
        let s = Schema {
            object_type_map: &m,
            references: &r,
            binary: &b,
        };
        let dn = Dn::parse("cn=g").unwrap();
        let v = s
            .convert_value(
                &"member;range=0-1".into(),
                "CN=A,DC=X".into(),
                3,
                &dn,
                RefForm::Dn,
            )
            .unwrap();
        assert_eq!(v, Value::dn_ref(Dn::parse("cn=a,dc=x").unwrap()));
        let v = s
            .convert_value(
                &"member".into(),
                "CN=A,DC=X".into(),
                3,
                &dn,
                RefForm::Target,
            )
            .unwrap();
        assert!(
            matches!(v, Value::Reference(Reference::Target(ref t)) if t.as_str() == "cn=a,dc=x")
        );
        let v = s
            .convert_value(
                &"jpegPhoto;binary".into(),
                "abc".into(),
                3,
                &dn,
                RefForm::Dn,
            )
            .unwrap();
        assert_eq!(v, Value::Bytes(b"abc".to_vec()));
        let e = s
            .convert_value(&"manager".into(), "not a dn".into(), 7, &dn, RefForm::Dn)
            .unwrap_err();
        assert_eq!(e.line, 7);
        assert!(e.message.contains("manager of cn=g"), "{e}");
        let e = s
            .convert_value(
                &"manager".into(),
                Value::Bytes(vec![0xff]),
                8,
                &dn,
                RefForm::Dn,
            )
            .unwrap_err();
        assert_eq!(e.line, 8);
    }
}
