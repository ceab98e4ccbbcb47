//! From what an LDAP server sends to [`Entry`]: the search result entry's BER structure read
//! with our own fallible code ([`RawEntry::parse`]), AD range options (`member;range=0-1499`)
//! recognised and merged, and values converted by an [`EntryMapper`] — objectGUID to GUID text,
//! objectSid to `S-1-5-…`, binary attributes to bytes, DN-valued attributes to references,
//! everything else to text — with the anchor and the object type chosen as configured.
//!
//! Pure code: no I/O (the range follow-up searches live in `search.rs`), no panic on any input.

use std::collections::BTreeMap;

use ldap3::asn1::{StructureTag, PL};
use smol_str::SmolStr;

use super::config::{AnchorAttribute, LdapSourceConfig};
use super::control::RangedAttr;
use crate::connector::{ConnectorError, ErrorKind};
use crate::model::{
    guid_from_ad_bytes, Anchor, AttrName, Attributes, Dn, Entry, ObjectType, Sid, Value, Values,
};

/// One search result entry as the server sent it: the DN and each attribute description with
/// its raw values, in server order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawEntry {
    /// The entry's DN.
    pub dn: String,
    /// Attribute descriptions (with options, e.g. `member;range=0-1499`) and their values.
    pub attrs: Vec<(String, Vec<Vec<u8>>)>,
}

fn protocol(dn: &str, msg: impl std::fmt::Display) -> ConnectorError {
    let e = ConnectorError::new(
        ErrorKind::Protocol,
        format!("malformed search result entry: {msg}"),
    );
    if dn.is_empty() {
        e
    } else {
        e.with_object(dn)
    }
}

fn take_primitive(t: StructureTag, dn: &str, what: &str) -> Result<Vec<u8>, ConnectorError> {
    match t.payload {
        PL::P(v) => Ok(v),
        PL::C(_) => Err(protocol(
            dn,
            format!("{what} is constructed, an OCTET STRING was expected"),
        )),
    }
}

fn take_constructed(
    t: StructureTag,
    dn: &str,
    what: &str,
) -> Result<Vec<StructureTag>, ConnectorError> {
    match t.payload {
        PL::C(v) => Ok(v),
        PL::P(_) => Err(protocol(
            dn,
            format!("{what} is primitive, a SEQUENCE was expected"),
        )),
    }
}

impl RawEntry {
    /// Reads a SearchResultEntry (`[APPLICATION 4] SEQUENCE { objectName, attributes }`, RFC
    /// 4511 §4.5.2) from the structure ldap3 decoded, moving the bytes rather than copying them.
    pub fn parse(tag: StructureTag) -> Result<RawEntry, ConnectorError> {
        if tag.id != 4 {
            return Err(protocol(
                "",
                format!("tag {} where a SearchResultEntry (4) was expected", tag.id),
            ));
        }
        let mut parts = take_constructed(tag, "", "the entry")?.into_iter();
        let dn_tag = parts
            .next()
            .ok_or_else(|| protocol("", "the entry has no DN"))?;
        let dn = String::from_utf8(take_primitive(dn_tag, "", "the DN")?)
            .map_err(|e| protocol("", format!("the DN is not UTF-8 ({e})")))?;
        let attrs_tag = parts
            .next()
            .ok_or_else(|| protocol(&dn, "the entry has no attribute list"))?;
        let list = take_constructed(attrs_tag, &dn, "the attribute list")?;
        let mut attrs = Vec::with_capacity(list.len());
        for (i, pa) in list.into_iter().enumerate() {
            let mut pa = take_constructed(pa, &dn, "a partial attribute")?.into_iter();
            let (Some(name), Some(vals)) = (pa.next(), pa.next()) else {
                return Err(protocol(
                    &dn,
                    format!("attribute {i} lacks its type or its value set"),
                ));
            };
            let name = String::from_utf8(take_primitive(name, &dn, "an attribute type")?)
                .map_err(|e| protocol(&dn, format!("attribute type {i} is not UTF-8 ({e})")))?;
            let vals = take_constructed(vals, &dn, "a value set")?
                .into_iter()
                .map(|v| take_primitive(v, &dn, "a value"))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    ConnectorError::new(e.kind(), format!("{} (attribute {name})", e.message()))
                        .with_object(&dn)
                })?;
            attrs.push((name, vals));
        }
        Ok(RawEntry { dn, attrs })
    }

    /// The ranged attributes that are not complete yet: `(index, range)` for every attribute
    /// whose range does not end in `*`.
    pub fn incomplete_ranges(&self) -> Result<Vec<(usize, RangedAttr)>, ConnectorError> {
        let mut out = Vec::new();
        for (i, (name, _)) in self.attrs.iter().enumerate() {
            if let Some(r) = RangedAttr::parse(name).map_err(|m| {
                ConnectorError::new(ErrorKind::Protocol, format!("attribute {name}: {m}"))
                    .with_object(&self.dn)
            })? {
                if r.high.is_some() {
                    out.push((i, r));
                }
            }
        }
        Ok(out)
    }
}

/// The attribute type of a description: `member;range=0-1499` → `member`.
pub fn base_type(description: &str) -> &str {
    description.split(';').next().unwrap_or(description)
}

/// How values of one attribute are converted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conversion {
    Guid,
    Sid,
    Bytes,
    Reference,
    Text,
}

/// How many attribute descriptions and class values a [`ConversionMemo`] remembers.
const MEMO_MAX: usize = 256;

/// What an import has already worked out about attribute descriptions and `objectClass`
/// values, so that each entry of a large import does not work it out again: the model name
/// and the conversion of each description (plain ones, without options), and the object type
/// of each class value. Belongs to one [`EntryMapper`]; remembers at most a few hundred of
/// each, then works the rest out every time.
#[derive(Debug, Default)]
pub struct ConversionMemo {
    names: Vec<(Box<str>, AttrName, Conversion)>,
    classes: Vec<(Box<[u8]>, Option<ObjectType>)>,
}

impl ConversionMemo {
    /// The remembered slot of `description`, trying `hint` (its place in the previous entry:
    /// servers send attributes in the same order) before the others.
    fn name(&self, description: &str, hint: usize) -> Option<&(Box<str>, AttrName, Conversion)> {
        match self.names.get(hint) {
            Some(slot) if *slot.0 == *description => Some(slot),
            _ => self.names.iter().find(|slot| *slot.0 == *description),
        }
    }
}

const BUILTIN_BINARY: [&str; 3] = ["jpegPhoto", "thumbnailPhoto", "userCertificate"];

/// Turns raw entries into model entries as an [`LdapSourceConfig`] says.
#[derive(Debug, Clone)]
pub struct EntryMapper {
    anchor: AnchorAttribute,
    object_types: BTreeMap<AttrName, ObjectType>,
    references: Vec<AttrName>,
    binary: Vec<AttrName>,
}

impl EntryMapper {
    /// A mapper for `config`.
    pub fn new(config: &LdapSourceConfig) -> EntryMapper {
        let mut binary = config.binary_attributes.clone();
        binary.extend(BUILTIN_BINARY.iter().map(|b| AttrName::new(*b)));
        EntryMapper {
            anchor: config.anchor.clone(),
            object_types: config.object_types.clone(),
            references: config.reference_attributes.clone(),
            binary,
        }
    }

    fn conversion(&self, description: &str) -> Conversion {
        let base = base_type(description);
        if base.eq_ignore_ascii_case("objectGUID") {
            Conversion::Guid
        } else if base.eq_ignore_ascii_case("objectSid") {
            Conversion::Sid
        } else if self.binary.iter().any(|b| b.is(base))
            || description
                .split(';')
                .skip(1)
                .any(|o| o.eq_ignore_ascii_case("binary"))
        {
            Conversion::Bytes
        } else if self.references.iter().any(|r| r.is(base)) {
            Conversion::Reference
        } else {
            Conversion::Text
        }
    }

    /// The object type of an entry with these `objectClass` values: the last one the map
    /// names.
    pub fn object_type(&self, classes: &[Vec<u8>]) -> Option<ObjectType> {
        classes.iter().rev().find_map(|c| self.class_type(c))
    }

    fn class_type(&self, class: &[u8]) -> Option<ObjectType> {
        let c = std::str::from_utf8(class).ok()?;
        self.object_types.get(&AttrName::new(c.trim())).cloned()
    }

    fn object_type_memo(
        &self,
        classes: &[Vec<u8>],
        memo: &mut ConversionMemo,
    ) -> Option<ObjectType> {
        classes.iter().rev().find_map(|c| {
            if let Some((_, t)) = memo.classes.iter().find(|(k, _)| **k == **c) {
                return t.clone();
            }
            let t = self.class_type(c);
            if memo.classes.len() < MEMO_MAX {
                memo.classes.push((c.as_slice().into(), t.clone()));
            }
            t
        })
    }

    /// The values of one attribute converted as [`EntryMapper::to_entry`] converts them (for
    /// the delta modes, which report single attributes); an error names the bad value.
    pub(crate) fn convert_values(
        &self,
        description: &str,
        vals: Vec<Vec<u8>>,
    ) -> Result<Values, String> {
        let conv = self.conversion(description);
        vals.into_iter().map(|v| convert(conv, v)).collect()
    }

    /// The model entry of `raw`: `Ok(None)` when no `objectClass` value is mapped. Ranged
    /// descriptions must be complete (the range option is dropped from the name).
    pub fn to_entry(&self, raw: RawEntry) -> Result<Option<Entry>, ConnectorError> {
        self.to_entry_with(raw, &mut ConversionMemo::default())
    }

    /// [`EntryMapper::to_entry`] remembering in `memo` what it works out about attribute
    /// descriptions and classes, for the next entries of the same import (`memo` must only be
    /// used with this mapper).
    pub fn to_entry_with(
        &self,
        raw: RawEntry,
        memo: &mut ConversionMemo,
    ) -> Result<Option<Entry>, ConnectorError> {
        let RawEntry { dn, attrs } = raw;
        let classes = attrs
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("objectClass"))
            .map(|(_, v)| v.as_slice())
            .unwrap_or_default();
        let Some(object_type) = self.object_type_memo(classes, memo) else {
            return Ok(None);
        };
        let parsed_dn = Dn::parse(&dn).map_err(|e| {
            ConnectorError::new(
                ErrorKind::Protocol,
                format!("the entry's DN is invalid: {e}"),
            )
            .with_object(&dn)
        })?;
        let anchor = self.anchor(&dn, &parsed_dn, &attrs)?;
        let mut list: Vec<(AttrName, Values)> = Vec::with_capacity(attrs.len());
        for (i, (name, vals)) in attrs.into_iter().enumerate() {
            let (attr, conv) = match memo.name(&name, i) {
                Some((_, attr, conv)) => (attr.clone(), *conv),
                None => {
                    let (attr, conv) = self.description(&name, &dn)?;
                    if !name.contains(';') && memo.names.len() < MEMO_MAX {
                        memo.names.push((name.as_str().into(), attr.clone(), conv));
                    }
                    (attr, conv)
                }
            };
            let mut values = Values::new();
            for v in vals {
                values.push(convert(conv, v).map_err(|m| {
                    ConnectorError::new(ErrorKind::Protocol, format!("attribute {name}: {m}"))
                        .with_object(&dn)
                })?);
            }
            list.push((attr, values));
        }
        Ok(Some(Entry {
            anchor,
            object_type,
            dn: Some(parsed_dn),
            attributes: Attributes::from(list),
        }))
    }

    /// The model name and the conversion of an attribute description: a complete range
    /// option is dropped, a slice is an error.
    fn description(&self, name: &str, dn: &str) -> Result<(AttrName, Conversion), ConnectorError> {
        let attr = match RangedAttr::parse(name) {
            Ok(Some(r)) if r.is_last() => SmolStr::new(r.base),
            Ok(Some(r)) => {
                return Err(ConnectorError::new(
                    ErrorKind::Protocol,
                    format!(
                        "attribute {name} is only a slice ({}-{:?}); range retrieval did not \
                         complete it",
                        r.low, r.high
                    ),
                )
                .with_object(dn))
            }
            Ok(None) => SmolStr::new(name),
            Err(m) => {
                return Err(ConnectorError::new(
                    ErrorKind::Protocol,
                    format!("attribute {name}: {m}"),
                )
                .with_object(dn))
            }
        };
        let conv = self.conversion(&attr);
        Ok((AttrName::new(attr), conv))
    }

    fn anchor<'a>(
        &self,
        dn: &str,
        parsed: &Dn,
        attrs: &'a [(String, Vec<Vec<u8>>)],
    ) -> Result<Anchor, ConnectorError> {
        let find = |name: &str| {
            attrs
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_slice())
        };
        let err = |m: String| ConnectorError::new(ErrorKind::Protocol, m).with_object(dn);
        let single = |name: &str, vals: &'a [Vec<u8>]| -> Result<&'a [u8], ConnectorError> {
            match vals {
                [one] => Ok(one.as_slice()),
                other => Err(err(format!(
                    "the anchor attribute {name} has {} values; an anchor has one",
                    other.len()
                ))),
            }
        };
        let guid = |vals: &'a [Vec<u8>]| -> Result<Anchor, ConnectorError> {
            let v = single("objectGUID", vals)?;
            guid_anchor(v).map_err(|m| err(format!("objectGUID: {m}")))
        };
        let uuid = |name: &str, vals: &'a [Vec<u8>]| -> Result<Anchor, ConnectorError> {
            let v = single(name, vals)?;
            let text = std::str::from_utf8(v).map_err(|_| err(format!("{name} is not text")))?;
            uuid::Uuid::parse_str(text.trim())
                .map(Anchor::from_guid)
                .map_err(|e| err(format!("{name} {text:?} is not a UUID: {e}")))
        };
        let text = |name: &str, vals: &'a [Vec<u8>]| -> Result<Anchor, ConnectorError> {
            let v = single(name, vals)?;
            let t = std::str::from_utf8(v).map_err(|_| err(format!("{name} is not text")))?;
            if t.is_empty() {
                return Err(err(format!("the anchor attribute {name} is empty")));
            }
            Ok(Anchor::new(t))
        };
        let missing = |name: &str| {
            err(format!(
                "the entry has no {name} (the anchor attribute); is it requested and readable?"
            ))
        };
        match &self.anchor {
            AnchorAttribute::Auto => {
                if let Some(v) = find("objectGUID") {
                    guid(v)
                } else if let Some(v) = find("entryUUID") {
                    uuid("entryUUID", v)
                } else if let Some(v) = find("nsUniqueId") {
                    text("nsUniqueId", v)
                } else {
                    Err(missing("objectGUID, entryUUID or nsUniqueId"))
                }
            }
            AnchorAttribute::ObjectGuid => {
                guid(find("objectGUID").ok_or_else(|| missing("objectGUID"))?)
            }
            AnchorAttribute::EntryUuid => uuid(
                "entryUUID",
                find("entryUUID").ok_or_else(|| missing("entryUUID"))?,
            ),
            AnchorAttribute::NsUniqueId => text(
                "nsUniqueId",
                find("nsUniqueId").ok_or_else(|| missing("nsUniqueId"))?,
            ),
            AnchorAttribute::Dn => Ok(Anchor::new(parsed.normalized())),
            AnchorAttribute::Attribute(a) => text(a, find(a).ok_or_else(|| missing(a))?),
        }
    }
}

/// The anchor of an objectGUID value: 16 bytes in AD's layout, or GUID text.
pub fn guid_anchor(v: &[u8]) -> Result<Anchor, String> {
    if v.len() == 16 {
        return guid_from_ad_bytes(v)
            .map(Anchor::from_guid)
            .map_err(|e| e.to_string());
    }
    std::str::from_utf8(v)
        .ok()
        .and_then(|t| uuid::Uuid::parse_str(t.trim()).ok())
        .map(Anchor::from_guid)
        .ok_or_else(|| format!("{} bytes where a GUID has 16", v.len()))
}

fn convert(conv: Conversion, v: Vec<u8>) -> Result<Value, String> {
    match conv {
        Conversion::Guid => guid_anchor(&v).map(|a| Value::String(a.as_str().into())),
        Conversion::Sid => Sid::from_bytes(&v)
            .map(|s| Value::String(s.to_string().into()))
            .map_err(|e| format!("not a binary SID: {e}")),
        Conversion::Bytes => Ok(Value::Bytes(v)),
        Conversion::Reference => {
            let text = std::str::from_utf8(&v).map_err(|_| "a DN value is not UTF-8".to_owned())?;
            Dn::parse(text)
                .map(Value::dn_ref)
                .map_err(|e| format!("the value {text:?} is not a DN: {e}"))
        }
        Conversion::Text => Ok(match String::from_utf8(v) {
            Ok(s) => Value::String(s.into()),
            Err(e) => Value::Bytes(e.into_bytes()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::ldap::config::LdapConnection;
    use crate::model::{guid_to_ad_bytes, Reference};
    use ldap3::asn1::TagClass;

    fn prim(v: &[u8]) -> StructureTag {
        StructureTag {
            class: TagClass::Universal,
            id: 4,
            payload: PL::P(v.to_vec()),
        }
    }

    fn cons(id: u64, inner: Vec<StructureTag>) -> StructureTag {
        StructureTag {
            class: TagClass::Universal,
            id,
            payload: PL::C(inner),
        }
    }

    fn wire(dn: &str, attrs: &[(&str, &[&[u8]])]) -> StructureTag {
        let list = attrs
            .iter()
            .map(|(n, vs)| {
                cons(
                    16,
                    vec![
                        prim(n.as_bytes()),
                        cons(17, vs.iter().map(|v| prim(v)).collect()),
                    ],
                )
            })
            .collect();
        StructureTag {
            class: TagClass::Application,
            id: 4,
            payload: PL::C(vec![prim(dn.as_bytes()), cons(16, list)]),
        }
    }

    fn mapper() -> EntryMapper {
        EntryMapper::new(&LdapSourceConfig::new(
            LdapConnection::new("ldap://h"),
            "dc=x",
        ))
    }

    #[test]
    fn ad_user_converts_guid_sid_and_references() {
        let guid = uuid::Uuid::parse_str("5f0c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b").unwrap();
        let gbytes = guid_to_ad_bytes(&guid);
        let sid: Sid = "S-1-5-21-1-2-3-1013".parse().unwrap();
        let sbytes = sid.to_bytes();
        let tag = wire(
            "CN=Ada,OU=Users,DC=corp,DC=example",
            &[
                ("objectClass", &[b"top", b"person", b"user"]),
                ("objectGUID", &[&gbytes]),
                ("objectSid", &[&sbytes]),
                ("manager", &[b"CN=Boss,OU=Users,DC=corp,DC=example"]),
                ("cn", &[b"Ada"]),
                ("thumbnailPhoto", &[b"ok"]),
                ("weird", &[&[0xff, 0xfe]]),
            ],
        );
        let e = mapper()
            .to_entry(RawEntry::parse(tag).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(e.anchor, Anchor::from_guid(guid));
        assert_eq!(e.object_type.as_str(), "user");
        assert_eq!(
            e.attributes.first_str("objectGUID"),
            Some("5f0c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b")
        );
        assert_eq!(
            e.attributes.first_str("objectSid"),
            Some("S-1-5-21-1-2-3-1013")
        );
        assert!(matches!(
            e.attributes.first("manager"),
            Some(Value::Reference(Reference::Dn(_)))
        ));
        assert_eq!(
            e.attributes.first("thumbnailPhoto"),
            Some(&Value::Bytes(b"ok".to_vec()))
        );
        assert_eq!(
            e.attributes.first("weird"),
            Some(&Value::Bytes(vec![0xff, 0xfe]))
        );
        assert_eq!(
            e.dn.unwrap().to_string(),
            "CN=Ada,OU=Users,DC=corp,DC=example"
        );
    }

    #[test]
    fn a_memo_converts_like_a_fresh_mapper_whatever_the_attribute_order() {
        let m = mapper();
        let mut memo = ConversionMemo::default();
        let entries = [
            wire(
                "uid=a,dc=x",
                &[
                    ("objectClass", &[b"inetOrgPerson"]),
                    ("entryUUID", &[b"6f1e2d3c-0000-1000-8000-00aa00bb00cc"]),
                    ("manager", &[b"uid=b,dc=x"]),
                    ("cn", &[b"A"]),
                ],
            ),
            // Another order, another spelling, a ranged description, an unmapped class.
            wire(
                "cn=g,dc=x",
                &[
                    ("CN", &[b"G"]),
                    ("member;range=0-*", &[b"uid=a,dc=x", b"uid=b,dc=x"]),
                    ("manager", &[b"uid=b,dc=x"]),
                    ("entryUUID", &[b"6f1e2d3c-0000-1000-8000-00aa00bb00cd"]),
                    ("objectClass", &[b"top", b"groupOfNames"]),
                ],
            ),
            wire("ou=x,dc=x", &[("objectClass", &[b"organizationalUnit"])]),
            wire(
                "uid=c,dc=x",
                &[
                    ("objectClass", &[b"inetOrgPerson"]),
                    ("entryUUID", &[b"6f1e2d3c-0000-1000-8000-00aa00bb00ce"]),
                    ("manager", &[b"uid=b,dc=x"]),
                    ("cn", &[b"C"]),
                ],
            ),
        ];
        for _ in 0..2 {
            for tag in &entries {
                let fresh = m.to_entry(RawEntry::parse(tag.clone()).unwrap()).unwrap();
                let memoized = m
                    .to_entry_with(RawEntry::parse(tag.clone()).unwrap(), &mut memo)
                    .unwrap();
                assert_eq!(fresh, memoized);
            }
        }
        let g = m
            .to_entry_with(RawEntry::parse(entries[1].clone()).unwrap(), &mut memo)
            .unwrap()
            .unwrap();
        assert_eq!(g.object_type.as_str(), "group");
        assert_eq!(g.attributes.get("member").map(|v| v.len()), Some(2));
        assert!(matches!(
            g.attributes.first("member"),
            Some(Value::Reference(Reference::Dn(_)))
        ));
        // Ranged descriptions are not remembered; plain ones once each, whatever the case.
        assert!(memo.names.iter().all(|(n, _, _)| !n.contains(';')));
        assert_eq!(memo.names.len(), 5, "{:?}", memo.names);
        assert_eq!(memo.classes.len(), 3, "{:?}", memo.classes);
    }

    #[test]
    fn entry_uuid_anchor_and_unmapped_classes() {
        let tag = wire(
            "uid=a,dc=x",
            &[
                ("objectClass", &[b"inetOrgPerson"]),
                ("entryUUID", &[b"6F1E2D3C-0000-1000-8000-00AA00BB00CC"]),
            ],
        );
        let e = mapper()
            .to_entry(RawEntry::parse(tag).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(e.anchor.as_str(), "6f1e2d3c-0000-1000-8000-00aa00bb00cc");
        let tag = wire("ou=x,dc=x", &[("objectClass", &[b"organizationalUnit"])]);
        assert!(mapper()
            .to_entry(RawEntry::parse(tag).unwrap())
            .unwrap()
            .is_none());
    }

    #[test]
    fn malformed_values_are_errors_with_context() {
        for (attrs, needle) in [
            (vec![("objectGUID", vec![&b"short"[..]])], "objectGUID"),
            (vec![("entryUUID", vec![&b"a"[..], &b"b"[..]])], "2 values"),
            (vec![("entryUUID", vec![&b"not-a-uuid"[..]])], "not a UUID"),
            (
                vec![
                    (
                        "entryUUID",
                        vec![&b"6f1e2d3c-0000-1000-8000-00aa00bb00cc"[..]],
                    ),
                    ("objectSid", vec![&[1u8, 9, 0][..]]),
                ],
                "objectSid",
            ),
            (
                vec![
                    (
                        "entryUUID",
                        vec![&b"6f1e2d3c-0000-1000-8000-00aa00bb00cc"[..]],
                    ),
                    ("member", vec![&b"not a dn"[..]]),
                ],
                "member",
            ),
            (vec![], "no objectGUID, entryUUID or nsUniqueId"),
        ] {
            let mut all: Vec<(&str, &[&[u8]])> = vec![("objectClass", &[b"groupOfNames"])];
            let owned: Vec<(&str, Vec<&[u8]>)> = attrs;
            for (n, v) in &owned {
                all.push((n, v.as_slice()));
            }
            let raw = RawEntry::parse(wire("cn=g,dc=x", &all)).unwrap();
            let e = mapper().to_entry(raw).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Protocol);
            assert_eq!(e.object(), Some("cn=g,dc=x"));
            assert!(e.message().contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn malformed_structures_are_errors() {
        assert!(RawEntry::parse(prim(b"x")).is_err());
        let no_attrs = StructureTag {
            class: TagClass::Application,
            id: 4,
            payload: PL::C(vec![prim(b"cn=x")]),
        };
        let e = RawEntry::parse(no_attrs).unwrap_err();
        assert_eq!(e.object(), Some("cn=x"));
        let bad_dn = StructureTag {
            class: TagClass::Application,
            id: 4,
            payload: PL::C(vec![prim(&[0xff]), cons(16, vec![])]),
        };
        assert!(RawEntry::parse(bad_dn).is_err());
        let bad_attr = StructureTag {
            class: TagClass::Application,
            id: 4,
            payload: PL::C(vec![
                prim(b"cn=x"),
                cons(16, vec![cons(16, vec![prim(b"cn")])]),
            ]),
        };
        assert!(RawEntry::parse(bad_attr)
            .unwrap_err()
            .message()
            .contains("value set"));
    }

    #[test]
    fn an_incomplete_slice_is_not_an_entry() {
        let tag = wire(
            "cn=g,dc=x",
            &[
                ("objectClass", &[b"group"]),
                ("objectGUID", &[&[7u8; 16]]),
                ("member;range=0-1", &[b"cn=a,dc=x", b"cn=b,dc=x"]),
            ],
        );
        let raw = RawEntry::parse(tag).unwrap();
        assert_eq!(raw.incomplete_ranges().unwrap().len(), 1);
        assert!(mapper().to_entry(raw.clone()).is_err());
        let mut done = raw;
        done.attrs[2].0 = "member;range=0-*".into();
        assert!(done.incomplete_ranges().unwrap().is_empty());
        let e = mapper().to_entry(done).unwrap().unwrap();
        assert_eq!(e.get("member").unwrap().len(), 2);
    }
}
