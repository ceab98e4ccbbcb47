//! The stored forms of attributes (the source and target mirrors' `attributes` column).
//!
//! Since schema version 6 the mirrors store a compact binary form ([`encode_binary`]): the
//! attribute names by id (the file's `attr_names` dictionary), each value as a tag and its
//! bytes, a source value equal to the object's anchor as one byte. It is decoded by the store
//! only; an administrator reads it through `SqliteStore::dump` (the `state_dump` example),
//! which prints the compact JSON below.
//!
//! The compact JSON (what versions 4 and 5 stored, and what the dump shows): an entry's
//! attributes are one JSON object, names as keys in the entry's (sorted) order. An
//! attribute with one value holds the value itself; with several, an array of them. A string is
//! a JSON string, an integer a JSON number, a Boolean `true`/`false`; the other kinds are
//! one-key objects: `{"b": Base64}` bytes, `{"t": RFC 3339}` a timestamp, and references
//! `{"a": anchor}`, `{"d": DN}`, `{"r": target id}`, `{"p": anchor}` (pending). For example
//!
//! ```text
//! {"cn":"Ann","manager":{"a":"5f0c…"},"objectClass":["top","person","user"]}
//! ```
//!
//! Schema versions before 4 stored `Attributes`' serde form (a list of
//! `[name, [{"string": …}, …]]` pairs); [`decode_attributes`] still reads both JSON forms, for
//! migrations. The content hash of an entry (which decides "changed") is taken over
//! [`hash_form_into`]'s form (since version 6; before, over the compact JSON).

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

// --- the binary form (schema version 6) ---

/// The first byte of the binary form (a later layout would take another).
const BINARY_V1: u8 = 1;
// Value tags. A byte below 0x80 is a string of that many bytes (most values).
const T_STRING: u8 = 0x80;
const T_INTEGER: u8 = 0x81;
const T_FALSE: u8 = 0x82;
const T_TRUE: u8 = 0x83;
const T_BYTES: u8 = 0x84;
const T_TIMESTAMP: u8 = 0x85;
const T_ANCHOR: u8 = 0x86;
const T_DN: u8 = 0x87;
const T_TARGET: u8 = 0x88;
const T_PENDING: u8 = 0x89;
/// A string equal to the object's own key (a source object's anchor: AD's `objectGUID`, an
/// LDAP `entryUUID`), stored once in the row's key column and derived here.
const T_OWN: u8 = 0x8a;

/// Appends the binary form of `attributes` to `out`: a format byte, the number of attributes,
/// then per attribute its name's id (`id_of`: the file's attribute-name dictionary), the number
/// of values and each value (a tag, then its bytes; a short string is one length byte and its
/// UTF-8; a string equal to `own`, the row's key, is one byte). Integers are LEB128 varints
/// (signed ones zig-zag encoded).
pub(crate) fn encode_binary<E>(
    attributes: &Attributes,
    own: Option<&str>,
    out: &mut Vec<u8>,
    mut id_of: impl FnMut(&AttrName) -> Result<u64, E>,
) -> Result<(), E> {
    out.push(BINARY_V1);
    put_varint(out, attributes.len() as u64);
    for (name, values) in attributes.iter() {
        put_varint(out, id_of(name)?);
        put_varint(out, values.len() as u64);
        for v in values {
            match v {
                Value::String(t) if Some(t.as_str()) == own => out.push(T_OWN),
                v => put_value(out, v),
            }
        }
    }
    Ok(())
}

/// Appends the form of `attributes` an entry's content hash is taken over: the binary form
/// with each name spelled out (length and bytes) instead of an id, so the hash does not depend
/// on a file's dictionary.
pub(crate) fn hash_form_into(attributes: &Attributes, out: &mut Vec<u8>) {
    out.push(BINARY_V1);
    put_varint(out, attributes.len() as u64);
    for (name, values) in attributes.iter() {
        put_varint(out, name.as_str().len() as u64);
        out.extend_from_slice(name.as_str().as_bytes());
        put_varint(out, values.len() as u64);
        for v in values {
            put_value(out, v);
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_signed(out: &mut Vec<u8>, v: i64) {
    put_varint(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_bytes(out: &mut Vec<u8>, tag: u8, b: &[u8]) {
    out.push(tag);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::String(s) if s.len() < 0x80 => {
            out.push(s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        }
        Value::String(s) => put_bytes(out, T_STRING, s.as_bytes()),
        Value::Integer(i) => {
            out.push(T_INTEGER);
            put_signed(out, *i);
        }
        Value::Boolean(false) => out.push(T_FALSE),
        Value::Boolean(true) => out.push(T_TRUE),
        Value::Bytes(b) => put_bytes(out, T_BYTES, b),
        Value::Timestamp(t) => {
            out.push(T_TIMESTAMP);
            put_signed(out, t.timestamp());
            put_varint(out, u64::from(t.timestamp_subsec_nanos()));
        }
        Value::Reference(Reference::Anchor(a)) => put_bytes(out, T_ANCHOR, a.as_str().as_bytes()),
        Value::Reference(Reference::Dn(d)) => put_bytes(out, T_DN, d.as_str().as_bytes()),
        Value::Reference(Reference::Target(t)) => put_bytes(out, T_TARGET, t.as_str().as_bytes()),
        Value::Reference(Reference::Pending(a)) => put_bytes(out, T_PENDING, a.as_str().as_bytes()),
    }
}

/// Reads attributes in the binary form of [`encode_binary`] (`own`: the row's key, as
/// encoded); `name_of` maps a name id back to its name (`None`: an id the dictionary does not
/// hold, an error).
pub(crate) fn decode_binary(
    bytes: &[u8],
    own: Option<&str>,
    name_of: impl Fn(u64) -> Option<AttrName>,
) -> Result<Attributes, String> {
    let mut r = Reader { bytes, at: 0, own };
    if r.byte()? != BINARY_V1 {
        return Err("not the binary form of attributes".into());
    }
    let n = r.len()?;
    let mut out: Vec<(AttrName, Values)> = Vec::with_capacity(n);
    for _ in 0..n {
        let id = r.varint()?;
        let name =
            name_of(id).ok_or_else(|| format!("attribute name id {id} is not in attr_names"))?;
        let count = r.len()?;
        let mut values = Values::new();
        for _ in 0..count {
            values.push(r.value()?);
        }
        out.push((name, values));
    }
    if r.at != bytes.len() {
        return Err(format!("{} bytes after the attributes", bytes.len() - r.at));
    }
    Ok(Attributes::from(out))
}

/// A reference value as the stored form holds it: what [`decode_binary_refs`] asks its filter.
pub(crate) enum StoredRef<'a> {
    /// A reference by anchor (or a pending one, which waits for that anchor's object).
    Anchor(&'a str),
    /// A reference by DN, not resolved to an anchor yet.
    Dn(&'a Dn),
}

/// [`decode_binary`] keeping only the reference values `keep` accepts, and the attributes that
/// hold one: what an entry held as context needs ([`crate::delta::SourceMirror::is_partial`]).
/// The other values are checked and skipped, not decoded: a group of 50,000 members costs a
/// scan, not 50,000 allocations.
pub(crate) fn decode_binary_refs(
    bytes: &[u8],
    name_of: impl Fn(u64) -> Option<AttrName>,
    keep: impl Fn(StoredRef<'_>) -> bool,
) -> Result<Attributes, String> {
    let mut r = Reader {
        bytes,
        at: 0,
        own: None,
    };
    if r.byte()? != BINARY_V1 {
        return Err("not the binary form of attributes".into());
    }
    let n = r.len()?;
    let mut out: Vec<(AttrName, Values)> = Vec::new();
    for _ in 0..n {
        let id = r.varint()?;
        let count = r.len()?;
        let mut values = Values::new();
        for _ in 0..count {
            let tag = r.byte()?;
            match tag {
                T_ANCHOR | T_PENDING => {
                    let t = r.text()?;
                    if keep(StoredRef::Anchor(t)) {
                        values.push(if tag == T_ANCHOR {
                            Value::anchor_ref(t)
                        } else {
                            Value::Reference(Reference::Pending(t.into()))
                        });
                    }
                }
                T_DN => {
                    let t = r.text()?;
                    let dn = Dn::parse(t).map_err(|e| format!("DN {t:?}: {e}"))?;
                    if keep(StoredRef::Dn(&dn)) {
                        values.push(Value::dn_ref(dn));
                    }
                }
                _ => r.skip(tag)?,
            }
        }
        if !values.is_empty() {
            let name = name_of(id)
                .ok_or_else(|| format!("attribute name id {id} is not in attr_names"))?;
            out.push((name, values));
        }
    }
    if r.at != bytes.len() {
        return Err(format!("{} bytes after the attributes", bytes.len() - r.at));
    }
    Ok(Attributes::from(out))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    own: Option<&'a str>,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, String> {
        let b = *self
            .bytes
            .get(self.at)
            .ok_or_else(|| format!("truncated at byte {}", self.at))?;
        self.at += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(format!("a varint too long at byte {}", self.at))
    }

    /// A count or length: at most the bytes left (each item takes at least one).
    fn len(&mut self) -> Result<usize, String> {
        let n = self.varint()?;
        if n > (self.bytes.len() - self.at) as u64 {
            return Err(format!("a length of {n} past the end at byte {}", self.at));
        }
        Ok(n as usize)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at + n;
        let s = self
            .bytes
            .get(self.at..end)
            .ok_or_else(|| format!("truncated at byte {}", self.at))?;
        self.at = end;
        Ok(s)
    }

    fn str(&mut self, n: usize) -> Result<&'a str, String> {
        let at = self.at;
        std::str::from_utf8(self.take(n)?).map_err(|e| format!("text at byte {at}: {e}"))
    }

    fn text(&mut self) -> Result<&'a str, String> {
        let n = self.len()?;
        self.str(n)
    }

    /// Skips the value whose tag (`tag`, read) is not a reference by anchor or DN.
    fn skip(&mut self, tag: u8) -> Result<(), String> {
        match tag {
            0..=0x7f => {
                self.take(tag as usize)?;
            }
            T_STRING | T_TARGET => {
                self.text()?;
            }
            T_INTEGER => {
                self.varint()?;
            }
            T_FALSE | T_TRUE | T_OWN => {}
            T_BYTES => {
                let n = self.len()?;
                self.take(n)?;
            }
            T_TIMESTAMP => {
                self.varint()?;
                self.varint()?;
            }
            other => {
                return Err(format!(
                    "unknown value tag {other:#x} at byte {}",
                    self.at - 1
                ))
            }
        }
        Ok(())
    }

    fn value(&mut self) -> Result<Value, String> {
        let tag = self.byte()?;
        Ok(match tag {
            0..=0x7f => Value::string(self.str(tag as usize)?),
            T_STRING => Value::string(self.text()?),
            T_INTEGER => {
                let z = self.varint()?;
                Value::Integer(((z >> 1) as i64) ^ -((z & 1) as i64))
            }
            T_FALSE => Value::Boolean(false),
            T_TRUE => Value::Boolean(true),
            T_BYTES => {
                let n = self.len()?;
                Value::Bytes(self.take(n)?.to_vec())
            }
            T_TIMESTAMP => {
                let z = self.varint()?;
                let secs = ((z >> 1) as i64) ^ -((z & 1) as i64);
                let nanos = u32::try_from(self.varint()?).map_err(|e| e.to_string())?;
                Value::Timestamp(
                    DateTime::from_timestamp(secs, nanos)
                        .ok_or_else(|| format!("timestamp {secs}.{nanos} out of range"))?,
                )
            }
            T_ANCHOR => Value::anchor_ref(self.text()?),
            T_DN => {
                let t = self.text()?;
                Value::dn_ref(Dn::parse(t).map_err(|e| format!("DN {t:?}: {e}"))?)
            }
            T_TARGET => Value::target_ref(self.text()?),
            T_PENDING => Value::Reference(Reference::Pending(self.text()?.into())),
            T_OWN => Value::string(self.own.ok_or_else(|| {
                format!("the row's own key at byte {}, but it has none", self.at - 1)
            })?),
            other => {
                return Err(format!(
                    "unknown value tag {other:#x} at byte {}",
                    self.at - 1
                ))
            }
        })
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
    fn the_references_alone_are_decoded_when_asked() {
        let a = sample();
        let names: Vec<AttrName> = a.iter().map(|(n, _)| n.clone()).collect();
        let ids: std::collections::HashMap<&str, u64> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i as u64))
            .collect();
        let mut bytes = Vec::new();
        encode_binary(&a, Some("own"), &mut bytes, |n| {
            Ok::<_, ()>(ids[n.as_str()])
        })
        .unwrap();
        let name_of = |id: u64| names.get(id as usize).cloned();
        // Every kind of value is skipped; the references kept are the ones accepted.
        let kept = decode_binary_refs(&bytes, name_of, |r| match r {
            StoredRef::Anchor(a) => a == "m1",
            StoredRef::Dn(d) => d.normalized() == "cn=x\\,y,dc=x",
        })
        .unwrap();
        let want = Entry::new("a", "user")
            .with("manager", Value::anchor_ref("m1"))
            .with("member", Value::dn_ref(Dn::parse("cn=X\\,Y,dc=x").unwrap()))
            .attributes;
        assert_eq!(kept, want);
        let none = decode_binary_refs(&bytes, name_of, |_| false).unwrap();
        assert!(none.is_empty());
        // What decode_binary refuses, this refuses too.
        for cut in 1..bytes.len() {
            assert!(
                decode_binary_refs(&bytes[..cut], name_of, |_| true).is_err(),
                "{cut}"
            );
        }
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

    /// A dictionary for the binary form's tests: ids in first-use order.
    fn binary(a: &Attributes, own: Option<&str>) -> (Vec<u8>, Vec<AttrName>) {
        let mut names: Vec<AttrName> = Vec::new();
        let mut out = Vec::new();
        encode_binary(a, own, &mut out, |n| {
            let id = names.iter().position(|x| x.as_str() == n.as_str());
            Ok::<_, ()>(id.unwrap_or_else(|| {
                names.push(n.clone());
                names.len() - 1
            }) as u64)
        })
        .unwrap();
        (out, names)
    }

    #[test]
    fn every_kind_of_value_round_trips_in_binary() {
        let mut a = sample();
        a.add("long", Value::string("x".repeat(300)));
        a.add("guid", Value::string("a"));
        let (bytes, names) = binary(&a, Some("a"));
        let name_of = |id: u64| names.get(id as usize).cloned();
        assert_eq!(decode_binary(&bytes, Some("a"), name_of).unwrap(), a);
        // Names are not in the row; the own key is one byte.
        assert!(!bytes.windows(11).any(|w| w == b"objectClass"));
        assert!(bytes.contains(&T_OWN));
        let (no_own, _) = binary(&a, None);
        assert!(decode_binary(&no_own, None, name_of).unwrap() == a);
        assert!(decode_binary(&bytes, None, name_of).is_err());
        assert_eq!(
            decode_binary(&binary(&Attributes::new(), None).0, None, |_| None).unwrap(),
            Attributes::new()
        );
    }

    #[test]
    fn malformed_binary_attributes_are_errors() {
        let (bytes, names) = binary(&sample(), None);
        let name_of = |id: u64| names.get(id as usize).cloned();
        // Every truncation, a trailing byte, an unknown name id, an unknown tag.
        for n in 0..bytes.len() {
            assert!(decode_binary(&bytes[..n], None, name_of).is_err(), "{n}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode_binary(&long, None, name_of).is_err());
        assert!(decode_binary(&bytes, None, |_| None).is_err());
        assert!(decode_binary(&[BINARY_V1, 1, 0, 1, 0xff], None, name_of).is_err());
        assert!(decode_binary(&[BINARY_V1, 1, 0, 200, 1], None, name_of).is_err());
        assert!(decode_binary(b"{}", None, name_of).is_err());
    }
}
