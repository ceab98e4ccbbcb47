//! Attribute values and multi-valued attribute value lists.

use std::fmt;

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use smol_str::SmolStr;

use super::{Anchor, Dn, TargetId};

/// One attribute value.
///
/// Strings are [`SmolStr`]: values of up to 23 bytes (most directory values) live inline and
/// clone without allocating.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Value {
    /// Text.
    String(SmolStr),
    /// Binary data (objectGUID, jpegPhoto, certificates, …).
    Bytes(#[serde(with = "b64")] Vec<u8>),
    /// A signed 64-bit integer.
    Integer(i64),
    /// A Boolean.
    Boolean(bool),
    /// An instant, in UTC.
    Timestamp(DateTime<Utc>),
    /// A reference to another object (group member, manager).
    Reference(Reference),
}

/// A reference to another object, in the form the side that holds it uses.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reference {
    /// A source object, by anchor.
    Anchor(Anchor),
    /// A source object, by distinguished name (resolved through the source mirror's DN index).
    Dn(Dn),
    /// A target object, by its id in the target.
    Target(TargetId),
    /// A target object that a create in the same plan makes: the source anchor of that create.
    /// The engine resolves it to the new target id at export.
    Pending(Anchor),
}

impl Value {
    /// A string value.
    pub fn string(s: impl Into<SmolStr>) -> Value {
        Value::String(s.into())
    }

    /// A reference to a target object.
    pub fn target_ref(id: impl Into<TargetId>) -> Value {
        Value::Reference(Reference::Target(id.into()))
    }

    /// A reference to a source object by anchor.
    pub fn anchor_ref(anchor: impl Into<Anchor>) -> Value {
        Value::Reference(Reference::Anchor(anchor.into()))
    }

    /// A reference to a source object by DN.
    pub fn dn_ref(dn: Dn) -> Value {
        Value::Reference(Reference::Dn(dn))
    }

    /// The text if this is a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Whether this is a reference.
    pub fn is_reference(&self) -> bool {
        matches!(self, Value::Reference(_))
    }

    /// Compares ignoring letter case for strings (and DN/ids in references); other kinds exactly.
    pub fn eq_ignore_case(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::String(a), Value::String(b)) => super::name::eq_ignore_case(a, b),
            _ => self == other,
        }
    }

    /// Whether a desired value and a value read from a target are the same: equal values, or
    /// strings equal ignoring case when asked — and across kinds, a string that is the text of
    /// a Boolean (`TRUE`, `true`, `True`) or an integer, as text-based targets (LDAP, LDIF)
    /// hand them back.
    pub fn matches(&self, other: &Value, ignore_case: bool) -> bool {
        match (self, other) {
            (Value::String(a), Value::String(b)) => {
                a == b || (ignore_case && super::name::eq_ignore_case(a, b))
            }
            (Value::String(s), Value::Boolean(b)) | (Value::Boolean(b), Value::String(s)) => {
                s.eq_ignore_ascii_case(if *b { "true" } else { "false" })
            }
            (Value::String(s), Value::Integer(i)) | (Value::Integer(i), Value::String(s)) => {
                s.parse::<i64>() == Ok(*i)
            }
            _ => self == other,
        }
    }

    /// A key for hashing values consistently with [`Value::matches`] (for large multi-valued
    /// comparisons): Booleans and integers by their text, strings lower-cased when case is
    /// ignored.
    pub fn match_key(&self, ignore_case: bool) -> Value {
        match self {
            Value::String(s) if ignore_case => Value::String(s.to_lowercase().into()),
            Value::String(s) if s.eq_ignore_ascii_case("true") => Value::String("TRUE".into()),
            Value::String(s) if s.eq_ignore_ascii_case("false") => Value::String("FALSE".into()),
            Value::Boolean(b) => Value::String(if *b { "TRUE" } else { "FALSE" }.into()),
            Value::Integer(i) => Value::String(i.to_string().into()),
            other => other.clone(),
        }
    }

    /// The value as text: strings as they are, bytes as Base64, integers in decimal, Booleans as
    /// `TRUE`/`FALSE` (LDAP's form), timestamps as RFC 3339, references as their id or DN.
    pub fn to_text(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::String(s) => f.write_str(s),
            Value::Bytes(b) => f.write_str(&base64::engine::general_purpose::STANDARD.encode(b)),
            Value::Integer(i) => write!(f, "{i}"),
            Value::Boolean(true) => f.write_str("TRUE"),
            Value::Boolean(false) => f.write_str("FALSE"),
            Value::Timestamp(t) => f.write_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            Value::Reference(r) => fmt::Display::fmt(r, f),
        }
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::String(s) => fmt::Debug::fmt(&**s, f),
            Value::Bytes(b) => write!(f, "bytes({} B)", b.len()),
            Value::Reference(r) => write!(f, "{r:?}"),
            other => write!(f, "{other}"),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Anchor(a) => write!(f, "{a}"),
            Reference::Dn(d) => write!(f, "{d}"),
            Reference::Target(t) => write!(f, "{t}"),
            Reference::Pending(a) => write!(f, "(new object for {a})"),
        }
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Anchor(a) => write!(f, "anchor:{a}"),
            Reference::Dn(d) => write!(f, "dn:{d}"),
            Reference::Target(t) => write!(f, "target:{t}"),
            Reference::Pending(a) => write!(f, "pending:{a}"),
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::String(s.into())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::String(s.into())
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Value {
        Value::Integer(i)
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Boolean(b)
    }
}
impl From<DateTime<Utc>> for Value {
    fn from(t: DateTime<Utc>) -> Value {
        Value::Timestamp(t)
    }
}
impl From<Vec<u8>> for Value {
    fn from(b: Vec<u8>) -> Value {
        Value::Bytes(b)
    }
}

/// The values of one attribute, in the source's order. Most attributes have one value, which is
/// stored inline.
#[derive(Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Values(SmallVec<[Value; 1]>);

impl Clone for Values {
    fn clone(&self) -> Values {
        // Most lists hold one value: copy it without the general extend loop.
        match self.0.as_slice() {
            [v] => Values::one(v.clone()),
            s => Values(SmallVec::from(s)),
        }
    }
}

impl Values {
    /// No values.
    pub fn new() -> Values {
        Values(SmallVec::new())
    }

    /// One value.
    pub fn one(v: impl Into<Value>) -> Values {
        let mut s = SmallVec::new();
        s.push(v.into());
        Values(s)
    }

    /// Appends a value.
    pub fn push(&mut self, v: impl Into<Value>) {
        self.0.push(v.into())
    }

    /// Removes every value equal to `v`; returns whether one was removed.
    pub fn remove(&mut self, v: &Value) -> bool {
        let before = self.0.len();
        self.0.retain(|x| x != v);
        before != self.0.len()
    }

    /// Keeps the values `keep` accepts.
    pub fn retain(&mut self, keep: impl FnMut(&mut Value) -> bool) {
        self.0.retain(keep)
    }

    /// Sorts the values (for order-insensitive comparison and deterministic output).
    pub fn sort(&mut self) {
        self.0.sort_unstable()
    }

    /// Whether both lists hold the same values, ignoring order (and duplicates).
    pub fn same_set(&self, other: &Values, ignore_case: bool) -> bool {
        same_set(&self.0, &other.0, ignore_case)
    }
}

/// Whether two value lists hold the same values ignoring order.
fn same_set(a: &[Value], b: &[Value], ignore_case: bool) -> bool {
    let eq = |x: &Value, y: &Value| x.matches(y, ignore_case);
    match (a, b) {
        ([x], [y]) => eq(x, y),
        _ if a.len() <= 8 && b.len() <= 8 => {
            a.iter().all(|x| b.iter().any(|y| eq(x, y)))
                && b.iter().all(|y| a.iter().any(|x| eq(x, y)))
        }
        _ => {
            let sa: std::collections::HashSet<Value> =
                a.iter().map(|v| v.match_key(ignore_case)).collect();
            let sb: std::collections::HashSet<Value> =
                b.iter().map(|v| v.match_key(ignore_case)).collect();
            sa == sb
        }
    }
}

impl std::ops::Deref for Values {
    type Target = [Value];
    fn deref(&self) -> &[Value] {
        &self.0
    }
}

impl fmt::Debug for Values {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter()).finish()
    }
}

impl<V: Into<Value>> FromIterator<V> for Values {
    fn from_iter<I: IntoIterator<Item = V>>(iter: I) -> Self {
        Values(iter.into_iter().map(Into::into).collect())
    }
}

impl IntoIterator for Values {
    type Item = Value;
    type IntoIter = smallvec::IntoIter<[Value; 1]>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a Values {
    type Item = &'a Value;
    type IntoIter = std::slice::Iter<'a, Value>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl From<Value> for Values {
    fn from(v: Value) -> Values {
        Values::one(v)
    }
}

impl From<Vec<Value>> for Values {
    fn from(v: Vec<Value>) -> Values {
        Values(SmallVec::from_vec(v))
    }
}

/// Serde helpers: bytes as standard Base64 text.
pub(crate) mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_values_match_their_text_as_targets_return_it() {
        assert!(Value::Boolean(true).matches(&Value::string("TRUE"), false));
        assert!(Value::string("true").matches(&Value::Boolean(true), false));
        assert!(!Value::Boolean(false).matches(&Value::string("TRUE"), false));
        assert!(Value::Integer(512).matches(&Value::string("512"), false));
        assert!(!Value::Integer(512).matches(&Value::string("0512x"), false));
        assert!(!Value::string("Ann").matches(&Value::string("ann"), false));
        assert!(Value::string("Ann").matches(&Value::string("ann"), true));
        let many: Values = (0..20).map(|i: i64| Value::Integer(i)).collect();
        let text: Values = (0..20).map(|i| Value::string(i.to_string())).collect();
        assert!(many.same_set(&text, false));
    }

    #[test]
    fn same_set_ignores_order_and_case_when_asked() {
        let a: Values = ["a", "B", "c"].into_iter().collect();
        let b: Values = ["c", "a", "b"].into_iter().collect();
        assert!(!a.same_set(&b, false));
        assert!(a.same_set(&b, true));
        let big_a: Values = (0..100).map(|i: i64| Value::Integer(i)).collect();
        let big_b: Values = (0..100).rev().map(|i: i64| Value::Integer(i)).collect();
        assert!(big_a.same_set(&big_b, false));
        let big_c: Values = (1..101).map(|i: i64| Value::Integer(i)).collect();
        assert!(!big_a.same_set(&big_c, false));
    }

    #[test]
    fn values_serialize_with_kinds() {
        let v = vec![
            Value::string("x"),
            Value::Bytes(vec![1, 2, 3]),
            Value::Integer(-4),
            Value::Boolean(true),
            Value::target_ref("t1"),
        ];
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(
            json,
            r#"[{"string":"x"},{"bytes":"AQID"},{"integer":-4},{"boolean":true},{"reference":{"target":"t1"}}]"#
        );
        let back: Vec<Value> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn single_value_is_inline() {
        assert!(
            std::mem::size_of::<Value>() <= 32,
            "{}",
            std::mem::size_of::<Value>()
        );
    }
}
