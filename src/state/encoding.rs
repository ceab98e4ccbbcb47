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

// The decoder and the string form serve the SQLite store only.
#![cfg_attr(not(feature = "sqlite"), allow(dead_code))]

use std::fmt;
use std::marker::PhantomData;

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
            let values = map.next_value_seed(SlotSeed::<Values>(PhantomData))?;
            out.push((name, values));
        }
        Ok(Attributes::from(out))
    }
}

/// What a JSON value decodes to: an attribute's values (one value, or an array of them) or
/// one value (in such an array: arrays do not nest).
trait Slot: Sized {
    fn one(v: Value) -> Self;
    fn many<'de, A: SeqAccess<'de>>(seq: A) -> Result<Self, A::Error>;
}

impl Slot for Values {
    fn one(v: Value) -> Values {
        Values::one(v)
    }

    fn many<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Values, A::Error> {
        let mut out = Values::new();
        while let Some(v) = seq.next_element_seed(SlotSeed::<Value>(PhantomData))? {
            out.push(v);
        }
        Ok(out)
    }
}

impl Slot for Value {
    fn one(v: Value) -> Value {
        v
    }

    fn many<'de, A: SeqAccess<'de>>(_: A) -> Result<Value, A::Error> {
        Err(de::Error::custom(
            "an array is not a value (arrays do not nest)",
        ))
    }
}

/// Decodes a [`Slot`].
struct SlotSeed<T>(PhantomData<T>);

impl<'de, T: Slot> DeserializeSeed<'de> for SlotSeed<T> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T: Slot> Visitor<'de> for SlotSeed<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a string, an integer, a Boolean, a one-key object (b, t, a, d, r, p) or an array of them",
        )
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::many(seq)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        Ok(T::one(Value::string(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        Ok(T::one(Value::Integer(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        i64::try_from(v)
            .map(|i| T::one(Value::Integer(i)))
            .map_err(|_| E::custom(format!("integer {v} out of range")))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
        Ok(T::one(Value::Boolean(v)))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        tagged(map).map(T::one)
    }
}

/// A value written as a one-key object.
fn tagged<'de, A: MapAccess<'de>>(mut map: A) -> Result<Value, A::Error> {
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
