//! Changes to attributes and to whole objects, as sources report them and plans carry them.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Anchor, AttrName, Attributes, Dn, Entry, ObjectType, Value, Values};

/// What an [`AttributeChange`] does to the values of an attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeOp {
    /// Add the values (keeping the others).
    Add,
    /// Remove the values (keeping the others).
    Remove,
    /// Replace all values with these; no values clears the attribute.
    Replace,
}

/// A change to one attribute: value-level add or remove, or a replace.
///
/// A redacted change serializes without its values.
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct AttributeChange {
    /// The attribute.
    pub attribute: AttrName,
    /// Add, remove or replace.
    pub op: ChangeOp,
    /// The values added, removed, or the new values of a replace.
    pub values: Values,
    /// For a replace: the values it replaces, as last known (for the reason shown to people).
    #[serde(default)]
    pub old: Values,
    /// The values are secret (a password, a `Redact`ed flow): they are applied but never shown,
    /// logged or serialized.
    #[serde(default)]
    pub redacted: bool,
}

impl Serialize for AttributeChange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let empty = Values::new();
        let (values, old) = if self.redacted {
            (&empty, &empty)
        } else {
            (&self.values, &self.old)
        };
        let mut st = s.serialize_struct("AttributeChange", 5)?;
        st.serialize_field("attribute", &self.attribute)?;
        st.serialize_field("op", &self.op)?;
        st.serialize_field("values", values)?;
        if !old.is_empty() {
            st.serialize_field("old", old)?;
        }
        if self.redacted {
            st.serialize_field("redacted", &true)?;
        }
        st.end()
    }
}

/// Serializes attributes with their names only (every value list empty): for secrets.
pub(crate) fn serialize_redacted_attributes<S: serde::Serializer>(
    attributes: &Attributes,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(attributes.len()))?;
    for (name, _) in attributes.iter() {
        seq.serialize_element(&(name, Values::new()))?;
    }
    seq.end()
}

impl AttributeChange {
    /// Adds `values` to the attribute.
    pub fn add(attribute: impl Into<AttrName>, values: impl Into<Values>) -> Self {
        Self::new(attribute, ChangeOp::Add, values)
    }
    /// Removes `values` from the attribute.
    pub fn remove(attribute: impl Into<AttrName>, values: impl Into<Values>) -> Self {
        Self::new(attribute, ChangeOp::Remove, values)
    }
    /// Replaces the attribute's values with `values` (none: clears it).
    pub fn replace(attribute: impl Into<AttrName>, values: impl Into<Values>) -> Self {
        Self::new(attribute, ChangeOp::Replace, values)
    }
    fn new(attribute: impl Into<AttrName>, op: ChangeOp, values: impl Into<Values>) -> Self {
        AttributeChange {
            attribute: attribute.into(),
            op,
            values: values.into(),
            old: Values::new(),
            redacted: false,
        }
    }
}

impl fmt::Debug for AttributeChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.redacted {
            return write!(f, "{:?} {} (redacted)", self.op, self.attribute);
        }
        write!(f, "{:?} {} {:?}", self.op, self.attribute, self.values)?;
        if !self.old.is_empty() {
            write!(f, " (was {:?})", self.old)?;
        }
        Ok(())
    }
}

/// Why a change could not be applied to a set of attributes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// An add of a value the attribute already has.
    #[error("attribute {attribute}: value {value} already present")]
    ValueExists {
        /// The attribute.
        attribute: AttrName,
        /// The value, as text.
        value: String,
    },
    /// A remove of a value the attribute does not have.
    #[error("attribute {attribute}: value {value} not present")]
    NoSuchValue {
        /// The attribute.
        attribute: AttrName,
        /// The value, as text.
        value: String,
    },
}

impl Attributes {
    /// Applies `change`. `strict` behaves as an LDAP server does: adding a present value or
    /// removing an absent one is an error, and nothing is changed. Lenient mode (used for mirrors)
    /// skips such values.
    pub fn apply(&mut self, change: &AttributeChange, strict: bool) -> Result<(), ApplyError> {
        let name = change.attribute.clone();
        match change.op {
            ChangeOp::Replace => {
                self.set(name, change.values.clone());
            }
            ChangeOp::Add => {
                let current = self.get(name.as_str()).cloned().unwrap_or_default();
                let mut next = current.clone();
                for v in &change.values {
                    if current.contains(v) || next.contains(v) {
                        if strict {
                            return Err(ApplyError::ValueExists {
                                attribute: name,
                                value: v.to_string(),
                            });
                        }
                        continue;
                    }
                    next.push(v.clone());
                }
                self.set(name, next);
            }
            ChangeOp::Remove => {
                let mut next = self.get(name.as_str()).cloned().unwrap_or_default();
                if change.values.is_empty() {
                    // LDAP: a delete without values removes the attribute.
                    self.set(name, Values::new());
                    return Ok(());
                }
                for v in &change.values {
                    if !next.remove(v) && strict {
                        return Err(ApplyError::NoSuchValue {
                            attribute: name,
                            value: v.to_string(),
                        });
                    }
                }
                self.set(name, next);
            }
        }
        Ok(())
    }
}

/// A change to one source object, as a delta import reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "change")]
pub enum Change {
    /// A new object.
    Add(Entry),
    /// The whole current state of an existing object (sources that report modified objects
    /// whole, such as syncrepl); it replaces what the mirror holds.
    Replace(Entry),
    /// Attribute-level changes to an existing object (DirSync, LDIF `changetype: modify`).
    Modify {
        /// The object.
        anchor: Anchor,
        /// Its type.
        object_type: ObjectType,
        /// The changes, in order.
        changes: Vec<AttributeChange>,
    },
    /// The object was renamed or moved to a new DN.
    Move {
        /// The object.
        anchor: Anchor,
        /// Its type.
        object_type: ObjectType,
        /// The new DN.
        new_dn: Dn,
    },
    /// The object was deleted.
    Delete {
        /// The object.
        anchor: Anchor,
        /// Its type.
        object_type: ObjectType,
    },
}

impl Change {
    /// The anchor of the object the change is about.
    pub fn anchor(&self) -> &Anchor {
        match self {
            Change::Add(e) | Change::Replace(e) => &e.anchor,
            Change::Modify { anchor, .. }
            | Change::Move { anchor, .. }
            | Change::Delete { anchor, .. } => anchor,
        }
    }

    /// The object type of the object the change is about.
    pub fn object_type(&self) -> &ObjectType {
        match self {
            Change::Add(e) | Change::Replace(e) => &e.object_type,
            Change::Modify { object_type, .. }
            | Change::Move { object_type, .. }
            | Change::Delete { object_type, .. } => object_type,
        }
    }
}

/// Creates a value list from one value; shorthand for tests and builders.
pub fn values<V: Into<Value>>(vs: impl IntoIterator<Item = V>) -> Values {
    vs.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_apply_behaves_like_ldap() {
        let mut a: Attributes = [("member", values(["a", "b"]))].into_iter().collect();
        a.apply(&AttributeChange::add("member", values(["c"])), true)
            .unwrap();
        assert_eq!(a.get("member").unwrap().len(), 3);
        assert!(matches!(
            a.apply(&AttributeChange::add("member", values(["a"])), true),
            Err(ApplyError::ValueExists { .. })
        ));
        assert!(matches!(
            a.apply(&AttributeChange::remove("member", values(["z"])), true),
            Err(ApplyError::NoSuchValue { .. })
        ));
        // Nothing half-applied: a failing add of [d, a] leaves the values unchanged.
        let before = a.clone();
        assert!(a
            .apply(&AttributeChange::add("member", values(["d", "a"])), true)
            .is_err());
        assert_eq!(a, before);
        a.apply(
            &AttributeChange::remove("member", values(["z", "a"])),
            false,
        )
        .unwrap();
        assert_eq!(a.get("member").unwrap().len(), 2);
        a.apply(&AttributeChange::replace("member", Values::new()), true)
            .unwrap();
        assert!(a.get("member").is_none());
    }

    #[test]
    fn redacted_changes_do_not_print_values() {
        let mut c = AttributeChange::replace("userPassword", values(["hunter2"]));
        c.redacted = true;
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!serde_json::to_string(&c).unwrap().contains("hunter2"));
    }
}
