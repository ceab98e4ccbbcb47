//! Entries: one directory object, its anchor, type, DN and attributes.

use std::fmt;

use serde::{Deserialize, Serialize};
use smol_str::SmolStr;

use super::{AttrName, Dn, ObjectType, Value, Values};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(SmolStr);

        impl $name {
            /// Wraps an identifier.
            pub fn new(id: impl Into<SmolStr>) -> Self {
                $name(id.into())
            }
            /// The identifier text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name::new(s)
            }
        }
        impl From<String> for $name {
            fn from(s: String) -> Self {
                $name::new(s)
            }
        }
    };
}

id_type!(
    /// A source object's stable, immutable identifier: objectGUID, entryUUID, nsUniqueId, a SCIM
    /// or Graph id. Never a name or a DN. Compared exactly; GUIDs are kept in canonical lower-case
    /// form (see [`Anchor::from_guid`]).
    Anchor
);

id_type!(
    /// A target object's identifier in the target system (a SCIM or Graph id, an LDAP entryUUID).
    TargetId
);

impl Anchor {
    /// The anchor of a GUID, in canonical lower-case hyphenated form.
    pub fn from_guid(guid: uuid::Uuid) -> Anchor {
        let mut buf = uuid::Uuid::encode_buffer();
        Anchor::new(&*guid.hyphenated().encode_lower(&mut buf))
    }
}

/// The attributes of an entry: names (case-insensitive) to non-empty value lists, kept sorted by
/// name so iteration, comparison and serialization are deterministic.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<(AttrName, Values)>", into = "Vec<(AttrName, Values)>")]
pub struct Attributes(Vec<(AttrName, Values)>);

impl Attributes {
    /// No attributes.
    pub fn new() -> Attributes {
        Attributes(Vec::new())
    }

    /// Room for `n` attributes.
    pub fn with_capacity(n: usize) -> Attributes {
        Attributes(Vec::with_capacity(n))
    }

    fn position(&self, name: &AttrName) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| n.cmp(name))
    }

    fn position_str(&self, name: &str) -> Result<usize, usize> {
        self.0
            .binary_search_by(|(n, _)| super::name::cmp_ignore_case(n.as_str(), name))
    }

    /// The values of `name` (case-insensitive), if present.
    pub fn get(&self, name: &str) -> Option<&Values> {
        self.position_str(name).ok().map(|i| &self.0[i].1)
    }

    /// The values of `name`, looking first at position `*hint` and then searching; `*hint` is
    /// left just after the attribute found. When names are looked up in sorted order (as flows
    /// over a sorted entry are), each lookup costs one comparison.
    pub fn get_hinted(&self, name: &AttrName, hint: &mut usize) -> Option<&Values> {
        for i in [*hint, *hint + 1] {
            if let Some((n, v)) = self.0.get(i) {
                if n == name {
                    *hint = i + 1;
                    return Some(v);
                }
            }
        }
        match self.position(name) {
            Ok(i) => {
                *hint = i + 1;
                Some(&self.0[i].1)
            }
            Err(_) => None,
        }
    }

    /// The first value of `name`, if present.
    pub fn first(&self, name: &str) -> Option<&Value> {
        self.get(name).and_then(|v| v.first())
    }

    /// The first value of `name` as text, if it is a string.
    pub fn first_str(&self, name: &str) -> Option<&str> {
        self.first(name).and_then(Value::as_str)
    }

    /// Whether `name` has at least one value.
    pub fn contains(&self, name: &str) -> bool {
        self.position_str(name).is_ok()
    }

    /// Sets `name` to `values`, replacing what it had. Empty `values` removes the attribute.
    pub fn set(&mut self, name: impl Into<AttrName>, values: impl Into<Values>) {
        let name = name.into();
        let values = values.into();
        match (self.position(&name), values.is_empty()) {
            (Ok(i), true) => {
                self.0.remove(i);
            }
            (Ok(i), false) => self.0[i].1 = values,
            (Err(_), true) => {}
            (Err(i), false) => self.0.insert(i, (name, values)),
        }
    }

    /// Adds one value to `name` (keeping existing values).
    pub fn add(&mut self, name: impl Into<AttrName>, value: impl Into<Value>) {
        let name = name.into();
        match self.position(&name) {
            Ok(i) => self.0[i].1.push(value),
            Err(i) => self.0.insert(i, (name, Values::one(value))),
        }
    }

    /// Removes `name`, returning its values.
    pub fn remove(&mut self, name: &str) -> Option<Values> {
        self.position_str(name).ok().map(|i| self.0.remove(i).1)
    }

    /// Mutable access to the values of `name`. Leaving them empty leaves an empty attribute; call
    /// [`Attributes::prune`] after bulk edits.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Values> {
        self.position_str(name).ok().map(|i| &mut self.0[i].1)
    }

    /// Drops attributes left without values.
    pub fn prune(&mut self) {
        self.0.retain(|(_, v)| !v.is_empty())
    }

    /// Iterates `(name, values)` in name order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&AttrName, &Values)> {
        self.0.iter().map(|(n, v)| (n, v))
    }

    /// Number of attributes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no attributes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<(AttrName, Values)>> for Attributes {
    fn from(mut v: Vec<(AttrName, Values)>) -> Attributes {
        // Already in order (as stored and serialized forms are): nothing to sort or merge.
        if v.iter().all(|(_, vals)| !vals.is_empty()) && v.windows(2).all(|w| w[0].0 < w[1].0) {
            return Attributes(v);
        }
        v.retain(|(_, vals)| !vals.is_empty());
        // Stable sort, then merge duplicates names (a later spelling adds values).
        v.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(AttrName, Values)> = Vec::with_capacity(v.len());
        for (n, vals) in v {
            match out.last_mut() {
                Some((last, lv)) if *last == n => {
                    for x in vals {
                        lv.push(x)
                    }
                }
                _ => out.push((n, vals)),
            }
        }
        Attributes(out)
    }
}

impl From<Attributes> for Vec<(AttrName, Values)> {
    fn from(a: Attributes) -> Self {
        a.0
    }
}

impl<N: Into<AttrName>, V: Into<Values>> FromIterator<(N, V)> for Attributes {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        Attributes::from(
            iter.into_iter()
                .map(|(n, v)| (n.into(), v.into()))
                .collect::<Vec<_>>(),
        )
    }
}

impl fmt::Debug for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(n, v)| (n, v)))
            .finish()
    }
}

/// One directory object as a source presents it.
///
/// ```
/// use dirsync::model::{Entry, Value};
/// let e = Entry::new("5f0c…", "user")
///     .with("givenName", "Ada")
///     .with("memberOf", Value::anchor_ref("g1"));
/// assert_eq!(e.attributes.first_str("GIVENNAME"), Some("Ada"));
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The immutable id of the object.
    pub anchor: super::Anchor,
    /// The object type (`user`, `group`, …).
    pub object_type: ObjectType,
    /// The distinguished name, for directories that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dn: Option<Dn>,
    /// The attributes.
    pub attributes: Attributes,
}

impl Entry {
    /// An entry without a DN or attributes.
    pub fn new(anchor: impl Into<super::Anchor>, object_type: impl Into<ObjectType>) -> Entry {
        Entry {
            anchor: anchor.into(),
            object_type: object_type.into(),
            dn: None,
            attributes: Attributes::new(),
        }
    }

    /// Sets the DN (builder style).
    pub fn with_dn(mut self, dn: Dn) -> Entry {
        self.dn = Some(dn);
        self
    }

    /// Adds one value of `name` (builder style).
    pub fn with(mut self, name: impl Into<AttrName>, value: impl Into<Value>) -> Entry {
        self.attributes.add(name, value);
        self
    }

    /// Sets all values of `name` (builder style).
    pub fn with_values(mut self, name: impl Into<AttrName>, values: impl Into<Values>) -> Entry {
        self.attributes.set(name, values);
        self
    }

    /// The values of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Values> {
        self.attributes.get(name)
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Entry");
        d.field("anchor", &self.anchor)
            .field("object_type", &self.object_type);
        if let Some(dn) = &self.dn {
            d.field("dn", &format_args!("{dn}"));
        }
        d.field("attributes", &self.attributes).finish()
    }
}

/// One object as the target holds it (the target mirror keeps these).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetObject {
    /// The target's id of the object.
    pub id: TargetId,
    /// The target object type.
    pub object_type: ObjectType,
    /// The target's attributes, as last read or written.
    pub attributes: Attributes,
}

impl TargetObject {
    /// A target object without attributes.
    pub fn new(id: impl Into<TargetId>, object_type: impl Into<ObjectType>) -> TargetObject {
        TargetObject {
            id: id.into(),
            object_type: object_type.into(),
            attributes: Attributes::new(),
        }
    }

    /// Adds one value of `name` (builder style).
    pub fn with(mut self, name: impl Into<AttrName>, value: impl Into<Value>) -> TargetObject {
        self.attributes.add(name, value);
        self
    }
}

impl fmt::Debug for TargetObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetObject")
            .field("id", &self.id)
            .field("object_type", &self.object_type)
            .field("attributes", &self.attributes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_case_insensitive_and_sorted() {
        let mut a = Attributes::new();
        a.add("mail", "a@x");
        a.add("CN", "Ada");
        a.add("Mail", "b@x");
        assert_eq!(a.get("MAIL").map(|v| v.len()), Some(2));
        let names: Vec<_> = a.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["CN", "mail"]);
        a.set("cn", Values::new());
        assert!(!a.contains("cn"));
        let merged: Attributes = vec![("x", Values::one("1")), ("X", Values::one("2"))]
            .into_iter()
            .collect();
        assert_eq!(merged.get("x").map(|v| v.len()), Some(2));
    }

    #[test]
    fn anchor_from_guid_is_lowercase() {
        let g = uuid::Uuid::parse_str("12345678-1234-5678-1234-56789ABCDEF0").unwrap();
        assert_eq!(
            Anchor::from_guid(g).as_str(),
            "12345678-1234-5678-1234-56789abcdef0"
        );
    }

    #[test]
    fn entry_round_trips_through_json() {
        let e = Entry::new("a1", "user")
            .with_dn(Dn::parse("cn=Ada,ou=People,dc=example,dc=com").unwrap())
            .with("cn", "Ada")
            .with("uidNumber", 1000i64);
        let json = serde_json::to_string(&e).unwrap();
        let back: Entry = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e);
    }
}
