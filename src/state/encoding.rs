//! The stored form of attributes (the source and target mirrors' `attributes` column): compact
//! JSON an administrator can read, and query with SQLite's JSON functions.
//!
//! An entry's attributes are one JSON object, names as keys in the entry's (sorted) order. An
//! attribute with one value holds the value itself; with several, an array of them. A string is
//! a JSON string, an integer a JSON number, a Boolean `true`/`false`; the other kinds are
//! one-key objects: `{"b": Base64}` bytes, `{"t": RFC 3339}` a timestamp, and references
//! `{"a": anchor}`, `{"d": DN}`, `{"r": target id}`, `{"p": anchor}` (pending). For example
//!
//! ```text
//! {"cn":"Ann","manager":{"a":"5f0c…"},"objectClass":["top","person","user"]}
//! ```
//!
//! so `SELECT json_extract(attributes, '$.mail') FROM source_objects WHERE anchor = …` shows a
//! mail address. Schema versions before 4 stored `Attributes`' serde form (a list of
//! `[name, [{"string": …}, …]]` pairs); [`decode_attributes`] still reads it, for migrations.

use std::fmt;

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserializer, Serialize, Serializer};
use smol_str::SmolStr;

use crate::model::{AttrName, Attributes, Dn, Reference, Value, Values};

/// Appends the stored form of `attributes` to `out`.
pub(crate) fn encode_attributes_into(attributes: &Attributes, out: &mut Vec<u8>) {
    // Serializing these types to JSON cannot fail: every key is a string, every number an i64.
    let _ = serde_json::to_writer(&mut *out, &Compact(attributes));
}

/// The stored form of `attributes`.
pub(crate) fn encode_attributes(attributes: &Attributes) -> String {
    let mut out = Vec::with_capacity(64 + attributes.len() * 32);
    encode_attributes_into(attributes, &mut out);
    // serde_json writes UTF-8 only.
    String::from_utf8(out).unwrap_or_default()
}

/// Reads attributes in their stored form (or, from files older than schema version 4, in the
/// serde form of [`Attributes`]).
pub(crate) fn decode_attributes(s: &str) -> Result<Attributes, String> {
    if s.trim_start().starts_with('[') {
        return serde_json::from_str(s).map_err(|e| e.to_string());
    }
    let mut de = serde_json::Deserializer::from_str(s);
    let attrs = de
        .deserialize_map(AttributesVisitor)
        .map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(attrs)
}

struct Compact<'a>(&'a Attributes);

impl Serialize for Compact<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, values) in self.0.iter() {
            map.serialize_key(name.as_str())?;
            match &values[..] {
                [one] => map.serialize_value(&CompactValue(one))?,
                many => map.serialize_value(&CompactValues(many))?,
            }
        }
        map.end()
    }
}

struct CompactValues<'a>(&'a [Value]);

impl Serialize for CompactValues<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for v in self.0 {
            seq.serialize_element(&CompactValue(v))?;
        }
        seq.end()
    }
}

struct CompactValue<'a>(&'a Value);

impl Serialize for CompactValue<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let tagged = |tag: &str, text: &str, s: S| {
            let mut m = s.serialize_map(Some(1))?;
            m.serialize_entry(tag, text)?;
            m.end()
        };
        match self.0 {
            Value::String(t) => s.serialize_str(t),
            Value::Integer(i) => s.serialize_i64(*i),
            Value::Boolean(b) => s.serialize_bool(*b),
            Value::Bytes(b) => tagged("b", &base64::engine::general_purpose::STANDARD.encode(b), s),
            Value::Timestamp(t) => tagged("t", &t.to_rfc3339_opts(SecondsFormat::AutoSi, true), s),
            Value::Reference(Reference::Anchor(a)) => tagged("a", a.as_str(), s),
            Value::Reference(Reference::Dn(d)) => tagged("d", d.as_str(), s),
            Value::Reference(Reference::Target(t)) => tagged("r", t.as_str(), s),
            Value::Reference(Reference::Pending(a)) => tagged("p", a.as_str(), s),
        }
    }
}

struct AttributesVisitor;

impl<'de> Visitor<'de> for AttributesVisitor {
    type Value = Attributes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of attributes")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Attributes, A::Error> {
        let mut out: Vec<(AttrName, Values)> = Vec::with_capacity(map.size_hint().unwrap_or(16));
        while let Some(name) = map.next_key::<AttrName>()? {
            let values = map.next_value_seed(ValuesSeed)?;
            out.push((name, values));
        }
        Ok(Attributes::from(out))
    }
}

/// An attribute's values: one value, or an array of them.
struct ValuesSeed;

impl<'de> DeserializeSeed<'de> for ValuesSeed {
    type Value = Values;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Values, D::Error> {
        d.deserialize_any(ValuesVisitor)
    }
}

struct ValuesVisitor;

impl<'de> Visitor<'de> for ValuesVisitor {
    type Value = Values;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a value or an array of values")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Values, A::Error> {
        let mut out = Values::new();
        while let Some(v) = seq.next_element_seed(ValueSeed)? {
            out.push(v);
        }
        Ok(out)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Values, E> {
        ValueVisitor.visit_str(v).map(Values::one)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Values, E> {
        ValueVisitor.visit_i64(v).map(Values::one)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Values, E> {
        ValueVisitor.visit_u64(v).map(Values::one)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Values, E> {
        ValueVisitor.visit_bool(v).map(Values::one)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Values, A::Error> {
        ValueVisitor.visit_map(map).map(Values::one)
    }
}

struct ValueSeed;

impl<'de> DeserializeSeed<'de> for ValueSeed {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, an integer, a Boolean or a one-key object (b, t, a, d, r, p)")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::string(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Integer(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Integer)
            .map_err(|_| E::custom(format!("integer {v} out of range")))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Boolean(v))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let Some(tag) = map.next_key::<SmolStr>()? else {
            return Err(de::Error::custom("an empty object is not a value"));
        };
        let text: SmolStr = map.next_value()?;
        let text = text.as_str();
        let value = match tag.as_str() {
            "b" => Value::Bytes(
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|e| de::Error::custom(format!("bytes: {e}")))?,
            ),
            "t" => Value::Timestamp(
                DateTime::parse_from_rfc3339(text)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| de::Error::custom(format!("timestamp {text:?}: {e}")))?,
            ),
            "a" => Value::anchor_ref(text),
            "d" => Value::dn_ref(
                Dn::parse(text).map_err(|e| de::Error::custom(format!("DN {text:?}: {e}")))?,
            ),
            "r" => Value::target_ref(text),
            "p" => Value::Reference(Reference::Pending(text.into())),
            other => return Err(de::Error::custom(format!("unknown value tag {other:?}"))),
        };
        if map.next_key::<de::IgnoredAny>()?.is_some() {
            return Err(de::Error::custom("a value object has one key"));
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Entry;

    fn sample() -> Attributes {
        Entry::new("a", "user")
            .with("cn", "Ann \"the\" ünïcode\n")
            .with("objectClass", "top")
            .with("objectClass", "user")
            .with("photo", Value::Bytes(vec![0, 159, 255]))
            .with("uac", Value::Integer(-512))
            .with("enabled", Value::Boolean(false))
            .with(
                "when",
                Value::Timestamp(DateTime::from_timestamp(1_700_000_000, 5).unwrap()),
            )
            .with("manager", Value::anchor_ref("m1"))
            .with("member", Value::dn_ref(Dn::parse("cn=X\\,Y,dc=x").unwrap()))
            .with("member", Value::target_ref("t9"))
            .with("member", Value::Reference(Reference::Pending("p1".into())))
            .with("digits", "42")
            .attributes
    }

    #[test]
    fn every_kind_of_value_round_trips() {
        let a = sample();
        let s = encode_attributes(&a);
        assert_eq!(decode_attributes(&s).unwrap(), a, "{s}");
        // A string of digits stays a string; an integer is a number.
        assert!(
            s.contains(r#""digits":"42""#) && s.contains(r#""uac":-512"#),
            "{s}"
        );
        assert!(s.contains(r#""objectClass":["top","user"]"#), "{s}");
        assert!(s.contains(r#""manager":{"a":"m1"}"#), "{s}");
        assert_eq!(decode_attributes("{}").unwrap(), Attributes::new());
    }

    #[test]
    fn the_form_before_version_4_is_read() {
        let a = sample();
        let legacy = serde_json::to_string(&a).unwrap();
        assert!(legacy.starts_with('['));
        assert_eq!(decode_attributes(&legacy).unwrap(), a);
    }

    #[test]
    fn malformed_stored_attributes_are_errors() {
        for bad in [
            "{broken",
            "[1,2]",
            "42",
            r#"{"a":{"x":"y"}}"#,
            r#"{"a":{}}"#,
            r#"{"a":{"a":"x","d":"y"}}"#,
            r#"{"a":{"d":"not a dn"}}"#,
            r#"{"a":{"b":"%%%"}}"#,
            r#"{"a":{"t":"tomorrow"}}"#,
            r#"{"a":18446744073709551615}"#,
            r#"{"a":1.5}"#,
            r#"{"a":null}"#,
            r#"{"a":[[1]]}"#,
            r#"{"a":"x"} trailing"#,
        ] {
            assert!(decode_attributes(bad).is_err(), "{bad}");
        }
    }
}
