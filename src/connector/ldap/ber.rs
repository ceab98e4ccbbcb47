//! A small BER (X.690) reader and writer for the values of LDAP controls this crate encodes and
//! parses itself: paged results (RFC 2696) here, DirSync and others beside it.
//!
//! Pure functions over byte slices: every read is bounds-checked and returns a [`BerError`]
//! with the offset, never panics. Only definite lengths (LDAP forbids indefinite ones) and
//! single-byte tags (every tag LDAP controls use).

use std::fmt;

/// Universal tag: INTEGER.
pub(crate) const INTEGER: u8 = 0x02;
/// Universal tag: OCTET STRING.
pub(crate) const OCTET_STRING: u8 = 0x04;
/// Universal tag: ENUMERATED.
pub(crate) const ENUMERATED: u8 = 0x0a;
/// Universal tag: BOOLEAN.
pub(crate) const BOOLEAN: u8 = 0x01;
/// Universal tag: SEQUENCE (constructed).
pub(crate) const SEQUENCE: u8 = 0x30;

/// A malformed BER value: what was wrong and at which byte offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BerError {
    /// Offset from the start of the value being read.
    pub offset: usize,
    /// What was wrong.
    pub message: String,
}

impl fmt::Display for BerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.message, self.offset)
    }
}

/// A cursor over BER elements.
#[derive(Debug, Clone)]
pub(crate) struct BerReader<'a> {
    data: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> BerReader<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> BerReader<'a> {
        BerReader {
            data,
            pos: 0,
            base: 0,
        }
    }

    fn err(&self, at: usize, message: impl Into<String>) -> BerError {
        BerError {
            offset: self.base + at,
            message: message.into(),
        }
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    /// A reader over `data`, reporting offsets from `base` (the position of `data` in a larger
    /// value).
    pub fn with_base(data: &'a [u8], base: usize) -> BerReader<'a> {
        BerReader { data, pos: 0, base }
    }

    /// The tag of the next element, `None` at the end.
    pub fn peek_tag(&self) -> Option<u8> {
        self.data.get(self.pos).copied()
    }

    /// The offset of the next element (from the start of the outermost value).
    pub fn offset(&self) -> usize {
        self.base + self.pos
    }

    /// Reads one element of any tag and returns its tag and a reader over its content.
    pub fn read_element(&mut self) -> Result<(u8, BerReader<'a>), BerError> {
        let (tag, content, offset) = self.read_any()?;
        Ok((tag, BerReader::with_base(content, offset)))
    }

    /// Reads an ENUMERATED (at most 8 content bytes).
    pub fn read_enumerated(&mut self, what: &str) -> Result<i64, BerError> {
        let at = self.pos;
        let bytes = self.read(ENUMERATED, what)?;
        decode_integer(bytes).ok_or_else(|| {
            self.err(
                at,
                format!("{what}: an ENUMERATED of {} bytes", bytes.len()),
            )
        })
    }

    /// Reads one element: its tag and its content.
    pub fn read_any(&mut self) -> Result<(u8, &'a [u8], usize), BerError> {
        let start = self.pos;
        let tag = *self
            .data
            .get(start)
            .ok_or_else(|| self.err(start, "truncated: an element was expected"))?;
        if tag & 0x1f == 0x1f {
            return Err(self.err(start, "multi-byte tags are not supported"));
        }
        let first = *self
            .data
            .get(start + 1)
            .ok_or_else(|| self.err(start + 1, "truncated: a length was expected"))?;
        let (len, header) = if first < 0x80 {
            (first as usize, 2)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 {
                return Err(self.err(start + 1, "indefinite length is not allowed in LDAP"));
            }
            if n > 4 {
                return Err(self.err(start + 1, format!("a {n}-byte length is too long")));
            }
            let bytes = self
                .data
                .get(start + 2..start + 2 + n)
                .ok_or_else(|| self.err(start + 2, "truncated length"))?;
            (
                bytes.iter().fold(0usize, |acc, b| (acc << 8) | *b as usize),
                2 + n,
            )
        };
        let content_start = start + header;
        let end = content_start
            .checked_add(len)
            .filter(|e| *e <= self.data.len())
            .ok_or_else(|| {
                self.err(
                    start,
                    format!(
                        "truncated: the element declares {len} bytes, running past the end \
                         ({} remain)",
                        self.data.len().saturating_sub(content_start)
                    ),
                )
            })?;
        self.pos = end;
        Ok((
            tag,
            &self.data[content_start..end],
            self.base + content_start,
        ))
    }

    /// Reads one element with tag `tag`.
    pub fn read(&mut self, tag: u8, what: &str) -> Result<&'a [u8], BerError> {
        let at = self.pos;
        let (t, content, _) = self.read_any()?;
        if t != tag {
            return Err(self.err(
                at,
                format!("{what}: expected tag 0x{tag:02x}, found 0x{t:02x}"),
            ));
        }
        Ok(content)
    }

    /// Reads a constructed element with tag `tag` and returns a reader over its content.
    pub fn read_constructed(&mut self, tag: u8, what: &str) -> Result<BerReader<'a>, BerError> {
        let at = self.pos;
        let (t, content, offset) = self.read_any()?;
        if t != tag {
            return Err(self.err(
                at,
                format!("{what}: expected tag 0x{tag:02x}, found 0x{t:02x}"),
            ));
        }
        Ok(BerReader {
            data: content,
            pos: 0,
            base: offset,
        })
    }

    /// Reads a SEQUENCE and returns a reader over its content.
    pub fn read_sequence(&mut self, what: &str) -> Result<BerReader<'a>, BerError> {
        self.read_constructed(SEQUENCE, what)
    }

    /// Reads an INTEGER (at most 8 content bytes, two's complement).
    #[cfg(test)]
    pub fn read_integer(&mut self, what: &str) -> Result<i64, BerError> {
        Ok(self.read_integer_at(what)?.1)
    }

    /// Reads an INTEGER and returns it with the offset of its tag (for errors about its value).
    pub fn read_integer_at(&mut self, what: &str) -> Result<(usize, i64), BerError> {
        let at = self.pos;
        let bytes = self.read(INTEGER, what)?;
        match decode_integer(bytes) {
            Some(v) => Ok((self.base + at, v)),
            None if bytes.is_empty() => {
                Err(self.err(at, format!("{what}: the INTEGER has no content bytes")))
            }
            None => Err(self.err(
                at,
                format!("{what}: an INTEGER of {} bytes is too big", bytes.len()),
            )),
        }
    }

    /// Reads an INTEGER that must fit in 32 bits (signed).
    pub fn read_i32(&mut self, what: &str) -> Result<i32, BerError> {
        let (at, v) = self.read_integer_at(what)?;
        i32::try_from(v).map_err(|_| BerError {
            offset: at,
            message: format!("{what}: INTEGER {v} does not fit in 32 bits"),
        })
    }

    /// Reads an OCTET STRING.
    pub fn read_octets(&mut self, what: &str) -> Result<&'a [u8], BerError> {
        self.read(OCTET_STRING, what)
    }

    /// Fails unless every byte was read.
    pub fn finish(&self, what: &str) -> Result<(), BerError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(self.err(
                self.pos,
                format!(
                    "{what}: {} unexpected trailing bytes",
                    self.data.len() - self.pos
                ),
            ))
        }
    }
}

fn decode_integer(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() || bytes.len() > 8 {
        return None;
    }
    let negative = bytes[0] & 0x80 != 0;
    let mut v: i64 = if negative { -1 } else { 0 };
    for b in bytes {
        v = (v << 8) | *b as i64;
    }
    Some(v)
}

/// Appends one element with `tag` and `content`.
pub(crate) fn write_tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = (len as u64).to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (8 - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
}

/// Appends an INTEGER in its minimal two's-complement form.
pub(crate) fn write_integer(out: &mut Vec<u8>, v: i64) {
    write_integer_tagged(out, INTEGER, v);
}

/// Appends an integer-like element (INTEGER, ENUMERATED) with `tag`, minimal two's complement.
pub(crate) fn write_integer_tagged(out: &mut Vec<u8>, tag: u8, v: i64) {
    let bytes = v.to_be_bytes();
    let mut start = 0;
    while start < 7 {
        let (b, next) = (bytes[start], bytes[start + 1]);
        if (b == 0 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    write_tlv(out, tag, &bytes[start..]);
}

/// Appends an OCTET STRING.
pub(crate) fn write_octets(out: &mut Vec<u8>, v: &[u8]) {
    write_tlv(out, OCTET_STRING, v);
}

/// Wraps `content` (already encoded elements) in a SEQUENCE.
pub(crate) fn sequence(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    write_tlv(&mut out, SEQUENCE, content);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_what_it_writes() {
        let mut inner = Vec::new();
        write_integer(&mut inner, 1000);
        write_octets(&mut inner, &[7u8; 300]);
        let v = sequence(&inner);
        let mut r = BerReader::new(&v);
        let mut s = r.read_sequence("value").unwrap();
        assert_eq!(s.read_integer("size").unwrap(), 1000);
        assert_eq!(s.read_octets("cookie").unwrap(), &[7u8; 300][..]);
        s.finish("value").unwrap();
        r.finish("value").unwrap();
    }

    #[test]
    fn malformed_input_is_an_error_with_an_offset() {
        // Truncated content.
        let e = BerReader::new(&[0x30, 0x05, 0x02, 0x01])
            .read_sequence("v")
            .unwrap_err();
        assert_eq!(e.offset, 0);
        assert!(e.message.contains("truncated"), "{e}");
        // Wrong tag inside, with the inner offset.
        let v = [0x30, 0x03, 0x04, 0x01, 0x00];
        let mut s = BerReader::new(&v).read_sequence("v").unwrap();
        let e = s.read_integer("size").unwrap_err();
        assert_eq!(e.offset, 2);
        // Indefinite length, huge length, empty input, oversized integer.
        assert!(BerReader::new(&[0x30, 0x80]).read_any().is_err());
        assert!(BerReader::new(&[0x04, 0x85, 1, 1, 1, 1, 1])
            .read_any()
            .is_err());
        assert!(BerReader::new(&[]).read_any().is_err());
        assert!(BerReader::new(&[0x02, 0x09, 1, 2, 3, 4, 5, 6, 7, 8, 9])
            .read_integer("i")
            .is_err());
        assert!(BerReader::new(&[0x02, 0x00]).read_integer("i").is_err());
    }

    proptest! {
        #[test]
        fn integers_round_trip(v in any::<i64>()) {
            let mut out = Vec::new();
            write_integer(&mut out, v);
            prop_assert_eq!(BerReader::new(&out).read_integer("i").unwrap(), v);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut r = BerReader::new(&data);
            while !r.is_empty() {
                if r.read_any().is_err() { break; }
            }
        }
    }
}
