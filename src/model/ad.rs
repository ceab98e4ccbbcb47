//! Active Directory binary values: `objectGUID` (Microsoft mixed-endian GUID layout) and security
//! identifiers (`objectSid`, MS-DTYP §2.4.2).
//!
//! Pure conversions between the bytes a directory server sends and typed values. Nothing here does
//! I/O or panics: every length is checked and bad input becomes a [`GuidError`] or [`SidError`]
//! saying what was wrong and where.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// objectGUID
// ---------------------------------------------------------------------------------------------

/// An `objectGUID` value that is not 16 bytes long.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid objectGUID: expected 16 bytes, got {len}")]
pub struct GuidError {
    len: usize,
}

impl GuidError {
    /// The length of the rejected value, in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the rejected value was empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Converts the 16 bytes of an AD `objectGUID` to a [`Uuid`].
///
/// AD stores GUIDs in the Microsoft layout: the first three fields little-endian, the last eight
/// bytes as they are. The result displays (lower-case, hyphenated) as Windows shows that GUID.
///
/// ```
/// use dirsync::model::guid_from_ad_bytes;
/// let bytes = [0x78, 0x56, 0x34, 0x12, 0x34, 0x12, 0x78, 0x56,
///              0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0];
/// let guid = guid_from_ad_bytes(&bytes).unwrap();
/// assert_eq!(guid.to_string(), "12345678-1234-5678-1234-56789abcdef0");
/// ```
pub fn guid_from_ad_bytes(bytes: &[u8]) -> Result<Uuid, GuidError> {
    let array: [u8; 16] = bytes
        .try_into()
        .map_err(|_| GuidError { len: bytes.len() })?;
    Ok(Uuid::from_bytes_le(array))
}

/// The inverse of [`guid_from_ad_bytes`]: the `objectGUID` bytes of a GUID, e.g. for an LDAP
/// search filter or the `<GUID=…>` extended DN form.
pub fn guid_to_ad_bytes(guid: &Uuid) -> [u8; 16] {
    guid.to_bytes_le()
}

// ---------------------------------------------------------------------------------------------
// SID
// ---------------------------------------------------------------------------------------------

/// The largest number of sub-authorities a SID may have (MS-DTYP §2.4.2.2).
pub const MAX_SUB_AUTHORITIES: usize = 15;

/// The largest identifier authority (48 bits).
const MAX_AUTHORITY: u64 = (1 << 48) - 1;

/// The only SID revision defined.
const REVISION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum SidErrorKind {
    #[error("invalid binary SID at byte {offset}: {message}")]
    Binary { offset: usize, message: String },
    #[error("invalid SID \"{input}\" at position {position}: {message}")]
    Text {
        input: String,
        position: usize,
        message: String,
    },
    #[error("invalid SID: {message}")]
    Value { message: String },
}

/// A security identifier that could not be decoded, parsed or built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(transparent)]
pub struct SidError(SidErrorKind);

impl SidError {
    fn binary(offset: usize, message: impl Into<String>) -> SidError {
        SidError(SidErrorKind::Binary {
            offset,
            message: message.into(),
        })
    }

    fn text(input: &str, position: usize, message: impl Into<String>) -> SidError {
        SidError(SidErrorKind::Text {
            input: input.to_owned(),
            position,
            message: message.into(),
        })
    }

    /// Where the problem is: a byte offset for binary input, a 0-based character position for a
    /// string, `None` for [`Sid::new`].
    pub fn position(&self) -> Option<usize> {
        match &self.0 {
            SidErrorKind::Binary { offset, .. } => Some(*offset),
            SidErrorKind::Text { position, .. } => Some(*position),
            SidErrorKind::Value { .. } => None,
        }
    }

    /// What was wrong.
    pub fn message(&self) -> &str {
        match &self.0 {
            SidErrorKind::Binary { message, .. }
            | SidErrorKind::Text { message, .. }
            | SidErrorKind::Value { message } => message,
        }
    }
}

/// A Windows security identifier: revision 1, a 48-bit identifier authority and up to 15 32-bit
/// sub-authorities, e.g. `S-1-5-21-3623811015-3361044348-30300820-1013`.
///
/// Fixed size, no heap allocation. Displays and parses in the MS-DTYP §2.4.2.1 string form
/// (serde uses the same string); [`Sid::from_bytes`] and [`Sid::to_bytes`] convert the binary
/// `objectSid` form. Ordering compares authority, then the sub-authorities lexicographically.
///
/// ```
/// use dirsync::model::Sid;
/// let sid: Sid = "S-1-5-21-3623811015-3361044348-30300820-1013".parse().unwrap();
/// assert_eq!(sid.rid(), Some(1013));
/// assert_eq!(sid.domain().unwrap().to_string(), "S-1-5-21-3623811015-3361044348-30300820");
/// assert_eq!(Sid::from_bytes(&sid.to_bytes()).unwrap(), sid);
/// ```
#[derive(Clone, Copy)]
pub struct Sid {
    authority: u64,
    count: u8,
    subs: [u32; MAX_SUB_AUTHORITIES],
}

impl Sid {
    /// A revision-1 SID from its identifier authority (below 2^48) and sub-authorities (at most
    /// 15).
    pub fn new(authority: u64, sub_authorities: &[u32]) -> Result<Sid, SidError> {
        if authority > MAX_AUTHORITY {
            return Err(SidError(SidErrorKind::Value {
                message: format!("identifier authority {authority} does not fit in 48 bits"),
            }));
        }
        if sub_authorities.len() > MAX_SUB_AUTHORITIES {
            return Err(SidError(SidErrorKind::Value {
                message: format!(
                    "{} sub-authorities, at most {MAX_SUB_AUTHORITIES} are allowed",
                    sub_authorities.len()
                ),
            }));
        }
        let mut subs = [0; MAX_SUB_AUTHORITIES];
        subs.iter_mut()
            .zip(sub_authorities)
            .for_each(|(d, s)| *d = *s);
        Ok(Sid {
            authority,
            count: sub_authorities.len() as u8,
            subs,
        })
    }

    /// Decodes a binary SID that fills `bytes` exactly (an `objectSid` value).
    ///
    /// Layout: revision (1 byte, must be 1), sub-authority count (1 byte, at most 15), identifier
    /// authority (6 bytes big-endian), then `count` little-endian 32-bit sub-authorities.
    pub fn from_bytes(bytes: &[u8]) -> Result<Sid, SidError> {
        let (sid, used) = Sid::from_bytes_prefix(bytes)?;
        if used != bytes.len() {
            return Err(SidError::binary(
                used,
                format!(
                    "{} trailing bytes after a SID of {used} bytes",
                    bytes.len() - used
                ),
            ));
        }
        Ok(sid)
    }

    /// Decodes a binary SID at the start of `bytes` (e.g. inside a security descriptor) and
    /// returns it with the number of bytes it took.
    pub fn from_bytes_prefix(bytes: &[u8]) -> Result<(Sid, usize), SidError> {
        let Some((&revision, rest)) = bytes.split_first() else {
            return Err(SidError::binary(
                0,
                "empty input, a SID is at least 8 bytes",
            ));
        };
        if revision != REVISION {
            return Err(SidError::binary(
                0,
                format!("revision {revision}, only revision 1 exists"),
            ));
        }
        let Some((&count, rest)) = rest.split_first() else {
            return Err(SidError::binary(
                1,
                "truncated: missing the sub-authority count",
            ));
        };
        let count = usize::from(count);
        if count > MAX_SUB_AUTHORITIES {
            return Err(SidError::binary(
                1,
                format!("{count} sub-authorities, at most {MAX_SUB_AUTHORITIES} are allowed"),
            ));
        }
        let need = 8 + 4 * count;
        if bytes.len() < need {
            return Err(SidError::binary(
                bytes.len(),
                format!(
                    "truncated: {count} sub-authorities need {need} bytes, got {}",
                    bytes.len()
                ),
            ));
        }
        let authority = rest
            .get(..6)
            .unwrap_or(&[])
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        let mut subs = [0u32; MAX_SUB_AUTHORITIES];
        for (slot, chunk) in subs
            .iter_mut()
            .zip(rest.get(6..6 + 4 * count).unwrap_or(&[]).chunks_exact(4))
        {
            *slot = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        Ok((
            Sid {
                authority,
                count: count as u8,
                subs,
            },
            need,
        ))
    }

    /// The binary form (see [`Sid::from_bytes`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 4 * usize::from(self.count));
        out.push(REVISION);
        out.push(self.count);
        out.extend_from_slice(&self.authority.to_be_bytes()[2..]);
        for s in self.sub_authorities() {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out
    }

    /// The revision (always 1).
    pub fn revision(&self) -> u8 {
        REVISION
    }

    /// The 48-bit identifier authority (5 for `NT AUTHORITY`).
    pub fn authority(&self) -> u64 {
        self.authority
    }

    /// The sub-authorities, in order.
    pub fn sub_authorities(&self) -> &[u32] {
        self.subs.get(..usize::from(self.count)).unwrap_or(&[])
    }

    /// The relative identifier: the last sub-authority, or `None` if there is none.
    pub fn rid(&self) -> Option<u32> {
        self.sub_authorities().last().copied()
    }

    /// The SID without its last sub-authority (for a domain account, the domain SID), or `None`
    /// if there are no sub-authorities.
    pub fn domain(&self) -> Option<Sid> {
        let count = self.count.checked_sub(1)?;
        let mut subs = self.subs;
        if let Some(last) = subs.get_mut(usize::from(count)) {
            *last = 0;
        }
        Some(Sid {
            authority: self.authority,
            count,
            subs,
        })
    }

    fn key(&self) -> (u64, &[u32]) {
        (self.authority, self.sub_authorities())
    }
}

impl PartialEq for Sid {
    fn eq(&self, other: &Sid) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Sid {}

impl Hash for Sid {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl PartialOrd for Sid {
    fn partial_cmp(&self, other: &Sid) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Sid {
    fn cmp(&self, other: &Sid) -> Ordering {
        self.key().cmp(&other.key())
    }
}

impl fmt::Display for Sid {
    /// `S-1-<authority>-<sub>-…`; the authority in decimal below 2^32, else as `0x` and 12
    /// upper-case hex digits (MS-DTYP §2.4.2.1).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "S-{REVISION}-")?;
        if self.authority < (1 << 32) {
            write!(f, "{}", self.authority)?;
        } else {
            write!(f, "0x{:012X}", self.authority)?;
        }
        for s in self.sub_authorities() {
            write!(f, "-{s}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Sid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sid({self})")
    }
}

impl FromStr for Sid {
    type Err = SidError;

    /// Parses `S-1-<authority>-<sub>-…` (`S` in either case; the authority in decimal below
    /// 2^48 or `0x` and 1 to 12 hex digits; at most 15 decimal 32-bit sub-authorities).
    fn from_str(s: &str) -> Result<Sid, SidError> {
        let err = |byte_pos: usize, message: String| {
            let position = s.get(..byte_pos).map_or(byte_pos, |p| p.chars().count());
            SidError::text(s, position, message)
        };
        let mut fields = s.split('-');
        let mut pos = 0;
        // `split` always yields at least one field.
        let prefix = fields.next().unwrap_or("");
        if !prefix.eq_ignore_ascii_case("s") {
            return Err(err(0, "a SID string starts with \"S-\"".into()));
        }
        pos += prefix.len() + 1;

        let Some(revision) = fields.next() else {
            return Err(err(
                s.len(),
                "expected \"-1\" (the revision) after \"S\"".into(),
            ));
        };
        if revision != "1" {
            return Err(err(
                pos,
                format!("revision \"{revision}\", only revision 1 exists"),
            ));
        }
        pos += revision.len() + 1;

        let Some(auth) = fields.next() else {
            return Err(err(
                s.len(),
                "expected \"-\" and the identifier authority".into(),
            ));
        };
        let authority = parse_authority(auth).map_err(|m| err(pos, m))?;
        pos += auth.len() + 1;

        let mut subs = [0u32; MAX_SUB_AUTHORITIES];
        let mut count = 0;
        for field in fields {
            if count == MAX_SUB_AUTHORITIES {
                return Err(err(
                    pos,
                    format!("more than {MAX_SUB_AUTHORITIES} sub-authorities"),
                ));
            }
            if field.is_empty() || !field.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err(
                    pos,
                    format!("sub-authority \"{field}\" is not a decimal number"),
                ));
            }
            let value: u32 = field.parse().map_err(|_| {
                err(
                    pos,
                    format!("sub-authority {field} does not fit in 32 bits"),
                )
            })?;
            if let Some(slot) = subs.get_mut(count) {
                *slot = value;
            }
            count += 1;
            pos += field.len() + 1;
        }
        Ok(Sid {
            authority,
            count: count as u8,
            subs,
        })
    }
}

/// Parses the identifier authority field of a SID string.
fn parse_authority(field: &str) -> Result<u64, String> {
    let hex = field
        .strip_prefix("0x")
        .or_else(|| field.strip_prefix("0X"));
    let value = match hex {
        Some(h) => {
            if h.is_empty() || h.len() > 12 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "identifier authority \"{field}\" must be 0x and 1 to 12 hex digits"
                ));
            }
            u64::from_str_radix(h, 16).map_err(|e| format!("identifier authority: {e}"))?
        }
        None => {
            if field.is_empty() || !field.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "identifier authority \"{field}\" is not a decimal number or 0x-prefixed hex"
                ));
            }
            field.parse::<u64>().unwrap_or(u64::MAX)
        }
    };
    if value > MAX_AUTHORITY {
        return Err(format!(
            "identifier authority {field} does not fit in 48 bits"
        ));
    }
    Ok(value)
}

impl serde::Serialize for Sid {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Sid {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Sid, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Sid;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a SID string like S-1-5-32-544")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Sid, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GUID_BYTES: [u8; 16] = [
        0x78, 0x56, 0x34, 0x12, 0x34, 0x12, 0x78, 0x56, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde,
        0xf0,
    ];

    #[test]
    fn guid_known_vector() {
        let g = guid_from_ad_bytes(&GUID_BYTES).unwrap();
        assert_eq!(g.to_string(), "12345678-1234-5678-1234-56789abcdef0");
        assert_eq!(guid_to_ad_bytes(&g), GUID_BYTES);
        let parsed: Uuid = "12345678-1234-5678-1234-56789ABCDEF0".parse().unwrap();
        assert_eq!(guid_to_ad_bytes(&parsed), GUID_BYTES);
    }

    #[test]
    fn guid_wrong_length_names_the_length() {
        let e = guid_from_ad_bytes(&GUID_BYTES[..15]).unwrap_err();
        assert_eq!(e.len(), 15);
        assert_eq!(
            e.to_string(),
            "invalid objectGUID: expected 16 bytes, got 15"
        );
        assert!(guid_from_ad_bytes(&[]).unwrap_err().is_empty());
        assert_eq!(guid_from_ad_bytes(&[0; 17]).unwrap_err().len(), 17);
    }

    #[test]
    fn sid_builtin_administrators() {
        let bytes = [
            0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x05, 0x20, 0x00, 0x00, 0x00, 0x20, 0x02,
            0x00, 0x00,
        ];
        let sid = Sid::from_bytes(&bytes).unwrap();
        assert_eq!(sid.to_string(), "S-1-5-32-544");
        assert_eq!(sid.authority(), 5);
        assert_eq!(sid.sub_authorities(), &[32, 544]);
        assert_eq!(sid.rid(), Some(544));
        assert_eq!(sid.to_bytes(), bytes);
        assert_eq!("S-1-5-32-544".parse::<Sid>().unwrap(), sid);
    }

    #[test]
    fn sid_domain_user() {
        let bytes = [
            0x01, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x05, 0x15, 0x00, 0x00, 0x00, 0xc7, 0xf7,
            0xfe, 0xd7, 0x7c, 0x77, 0x55, 0xc8, 0x94, 0x5a, 0xce, 0x01, 0xf5, 0x03, 0x00, 0x00,
        ];
        let text = "S-1-5-21-3623811015-3361044348-30300820-1013";
        let sid: Sid = text.parse().unwrap();
        assert_eq!(sid.to_bytes(), bytes);
        assert_eq!(Sid::from_bytes(&bytes).unwrap(), sid);
        assert_eq!(sid.to_string(), text);
        assert_eq!(sid.rid(), Some(1013));
        let domain = sid.domain().unwrap();
        assert_eq!(
            domain.to_string(),
            "S-1-5-21-3623811015-3361044348-30300820"
        );
        assert_eq!(
            domain,
            "S-1-5-21-3623811015-3361044348-30300820".parse().unwrap()
        );
        assert!(domain < sid);
    }

    #[test]
    fn sid_everyone_and_empty() {
        let sid: Sid = "S-1-1-0".parse().unwrap();
        assert_eq!(sid.to_bytes(), [1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(sid.rid(), Some(0));
        let nt: Sid = "s-1-5".parse().unwrap();
        assert_eq!(nt.to_string(), "S-1-5");
        assert_eq!(nt.rid(), None);
        assert_eq!(nt.domain(), None);
        assert_eq!(Sid::from_bytes(&nt.to_bytes()).unwrap(), nt);
    }

    #[test]
    fn sid_large_authority_is_hex() {
        let sid = Sid::new(0x0102_0304_0506, &[7]).unwrap();
        assert_eq!(sid.to_string(), "S-1-0x010203040506-7");
        assert_eq!("S-1-0x010203040506-7".parse::<Sid>().unwrap(), sid);
        assert_eq!("S-1-0x10203040506-7".parse::<Sid>().unwrap(), sid);
        let small = Sid::new(0xFFFF_FFFF, &[]).unwrap();
        assert_eq!(small.to_string(), "S-1-4294967295");
        assert_eq!("S-1-0x5-1".parse::<Sid>().unwrap().to_string(), "S-1-5-1");
        assert!(Sid::new(1 << 48, &[]).is_err());
        assert!(Sid::new(5, &[1; 16]).is_err());
        assert!(Sid::new(5, &[1; 15]).is_ok());
    }

    #[test]
    fn sid_string_errors_have_positions() {
        let cases: &[(&str, usize)] = &[
            ("", 0),
            ("X-1-5", 0),
            ("S", 1),
            ("S-2-5", 2),
            ("S-1", 3),
            ("S-1-", 4),
            ("S-1-abc", 4),
            ("S-1-0x", 4),
            ("S-1-0x1234567890123", 4),
            ("S-1-281474976710656", 4),
            ("S-1-5-", 6),
            ("S-1-5-21--1", 9),
            ("S-1-5-4294967296", 6),
            ("S-1-5-+1", 6),
            ("S-1-5-1-2-3-4-5-6-7-8-9-10-11-12-13-14-15-16", 42),
            ("S-1-5-é", 6),
            ("S-1-5-1é", 6),
        ];
        for (text, pos) in cases {
            let e = text.parse::<Sid>().unwrap_err();
            assert_eq!(e.position(), Some(*pos), "{text}: {e}");
            assert!(e.to_string().contains(&format!("at position {pos}")), "{e}");
        }
        let e = "S-1-5-x".parse::<Sid>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid SID \"S-1-5-x\" at position 6: sub-authority \"x\" is not a decimal number"
        );
    }

    #[test]
    fn sid_binary_errors() {
        let good = "S-1-5-32-544".parse::<Sid>().unwrap().to_bytes();
        assert_eq!(Sid::from_bytes(&[]).unwrap_err().position(), Some(0));
        let e = Sid::from_bytes(&good[..good.len() - 1]).unwrap_err();
        assert!(e.message().contains("truncated"), "{e}");
        let mut rev = good.clone();
        rev[0] = 2;
        assert!(Sid::from_bytes(&rev)
            .unwrap_err()
            .message()
            .contains("revision"));
        let mut many = good.clone();
        many[1] = 16;
        assert_eq!(Sid::from_bytes(&many).unwrap_err().position(), Some(1));
        let mut long = good.clone();
        long.push(0);
        let e = Sid::from_bytes(&long).unwrap_err();
        assert_eq!(e.position(), Some(16));
        let (sid, used) = Sid::from_bytes_prefix(&long).unwrap();
        assert_eq!((sid.to_string().as_str(), used), ("S-1-5-32-544", 16));
        assert!(Sid::from_bytes(&good[..7]).is_err());
        assert!(Sid::from_bytes(&[1]).is_err());
    }

    #[test]
    fn sid_serde_as_string() {
        let sid: Sid = "S-1-5-32-544".parse().unwrap();
        let json = serde_json::to_string(&sid).unwrap();
        assert_eq!(json, "\"S-1-5-32-544\"");
        assert_eq!(serde_json::from_str::<Sid>(&json).unwrap(), sid);
        assert!(serde_json::from_str::<Sid>("\"S-1-5-x\"").is_err());
    }

    fn arb_sid() -> impl Strategy<Value = Sid> {
        (
            prop_oneof![0u64..20, 0u64..=MAX_AUTHORITY],
            prop::collection::vec(any::<u32>(), 0..=MAX_SUB_AUTHORITIES),
        )
            .prop_map(|(a, subs)| Sid::new(a, &subs).unwrap())
    }

    proptest! {
        #[test]
        fn guid_round_trip(bytes in any::<[u8; 16]>()) {
            let g = guid_from_ad_bytes(&bytes).unwrap();
            prop_assert_eq!(guid_to_ad_bytes(&g), bytes);
            let reparsed: Uuid = g.to_string().parse().unwrap();
            prop_assert_eq!(guid_to_ad_bytes(&reparsed), bytes);
        }

        #[test]
        fn sid_bytes_string_bytes(sid in arb_sid()) {
            let bytes = sid.to_bytes();
            let decoded = Sid::from_bytes(&bytes).unwrap();
            prop_assert_eq!(decoded, sid);
            let text = decoded.to_string();
            let parsed: Sid = text.parse().unwrap();
            prop_assert_eq!(parsed, sid);
            prop_assert_eq!(parsed.to_bytes(), bytes);
            prop_assert_eq!(parsed.rid(), sid.sub_authorities().last().copied());
            if let Some(d) = sid.domain() {
                prop_assert_eq!(d.sub_authorities(), &sid.sub_authorities()[..sid.sub_authorities().len() - 1]);
                prop_assert!(d < sid);
            }
        }

        #[test]
        fn sid_from_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(sid) = Sid::from_bytes(&bytes) {
                prop_assert_eq!(sid.to_bytes(), bytes);
            }
        }

        #[test]
        fn sid_from_bytes_truncated_is_error(sid in arb_sid(), cut in any::<prop::sample::Index>()) {
            let bytes = sid.to_bytes();
            let n = cut.index(bytes.len());
            prop_assert!(Sid::from_bytes(&bytes[..n]).is_err());
        }

        #[test]
        fn sid_from_str_never_panics(s in "[sS0-9xXa-fA-F+é-]{0,40}") {
            if let Ok(sid) = s.parse::<Sid>() {
                prop_assert_eq!(sid.to_string().parse::<Sid>().unwrap(), sid);
            }
        }
    }
}
