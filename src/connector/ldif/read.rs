//! The RFC 2849 reader: physical lines → logical lines (unfolded, comments dropped) → records.
//!
//! It reads only from the `BufRead` it is given, one record at a time, and never follows URL
//! values. It never panics: every malformed input is an [`LdifError`] with its line and, where it
//! points at a character, its column.
//!
//! Leniencies (what it accepts beyond the RFC grammar, because common tools write it): the
//! `version: 1` line may be missing, a file may hold no records, plain
//! values may hold any UTF-8 except NUL and CR (the writer is strict and Base64-encodes them),
//! Base64 padding may be omitted, a line of only spaces where no line is open counts as a blank
//! line, the final `-` of a modify record may be left out, `changetype` values ignore case.

use std::borrow::Cow;
use std::io::BufRead;

use base64::Engine as _;

use super::{LdifBody, LdifControl, LdifError, LdifModification, LdifRecord, LdifValue, ModDn};
use smallvec::SmallVec;
use smol_str::SmolStr;

use crate::model::{AttrName, ChangeOp, Dn, Rdn, Value};

/// Base64 as RFC 2849 writes it, accepting values with or without padding.
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// A streaming LDIF reader: an iterator of records, read one at a time from `input`.
///
/// It reads `input` in large chunks into a buffer of its own and parses each record from that
/// buffer without copying its lines (only folded lines are joined); a record is held in memory
/// whole, never the file.
///
/// After the first error the iterator ends: what follows a malformed record cannot be trusted to
/// be where it seems.
///
/// ```
/// use dirsync::connector::ldif::{LdifBody, LdifReader};
/// let text = "version: 1\ndn: cn=Ada,dc=example\ncn: Ada\nmail:: YWRhQGV4YW1wbGUuY29t\n";
/// let records: Vec<_> = LdifReader::new(text.as_bytes()).collect::<Result<_, _>>()?;
/// assert_eq!(records[0].line, 2);
/// assert_eq!(records[0].attributes().first_str("mail"), Some("ada@example.com"));
/// # Ok::<(), dirsync::connector::ldif::LdifError>(())
/// ```
pub struct LdifReader<R> {
    input: R,
    /// Bytes read from `input`: `buf[..filled]` holds data, `buf[pos..filled]` is not yet split
    /// into lines.
    buf: Vec<u8>,
    filled: usize,
    /// Start of the next physical line.
    pos: usize,
    /// Where to look for the next newline (`buf[pos..scan]` has none).
    scan: usize,
    /// Physical lines read so far.
    line: usize,
    /// A physical line read ahead (to see whether it continues the previous one).
    peeked: Option<Phys>,
    eof: bool,
    /// The optional `version:` line can no longer come.
    past_version: bool,
    /// Whether the file holds change records (`Some(true)`) or content records, once known.
    changes: Option<bool>,
    done: bool,
    /// The logical lines of the record being read (reused from record to record).
    lines: Vec<LineRef>,
    /// Folded lines of the record being read, unfolded.
    joined: Vec<u8>,
}

/// How much is read from the input at a time (the buffer grows beyond it for a larger record).
const CHUNK: usize = 256 * 1024;

/// Parses a whole LDIF text.
///
/// ```
/// let records = dirsync::connector::ldif::parse_str("dn: cn=a\ncn: a\n\ndn: cn=b\ncn: b\n")?;
/// assert_eq!(records.len(), 2);
/// # Ok::<(), dirsync::connector::ldif::LdifError>(())
/// ```
pub fn parse_str(text: &str) -> Result<Vec<LdifRecord>, LdifError> {
    LdifReader::new(text.as_bytes()).collect()
}

/// A physical line: its number and where it is in the reader's buffer (without the line end).
#[derive(Clone, Copy)]
struct Phys {
    no: usize,
    start: usize,
    end: usize,
}

/// Where a logical line of the record being read is.
struct LineRef {
    /// In `joined` (a folded line, unfolded) rather than in `buf`.
    joined: bool,
    start: usize,
    end: usize,
    /// (offset in the line, physical line) of each piece; the first piece starts at 0.
    pieces: SmallVec<[(usize, usize); 1]>,
}

/// A line after unfolding, with where each of its pieces came from.
#[derive(Clone, Copy)]
struct Logical<'a> {
    bytes: &'a [u8],
    /// (offset in `bytes`, physical line) of each piece; the first piece starts at 0.
    pieces: &'a [(usize, usize)],
}

impl Logical<'_> {
    fn line(&self) -> usize {
        self.pieces.first().map_or(0, |p| p.1)
    }

    /// The physical line and 1-based character column of byte `offset`.
    fn position(&self, offset: usize) -> (usize, usize) {
        let idx = self
            .pieces
            .iter()
            .rposition(|(start, _)| *start <= offset)
            .unwrap_or(0);
        let (start, line) = self.pieces.get(idx).copied().unwrap_or((0, 0));
        let chars = self
            .bytes
            .get(start..offset)
            .unwrap_or(&[])
            .iter()
            .filter(|b| (**b & 0xC0) != 0x80)
            .count();
        // A continuation piece lost its leading space.
        (line, chars + 1 + usize::from(idx > 0))
    }

    fn error(&self, offset: usize, message: impl Into<String>) -> LdifError {
        let (line, column) = self.position(offset);
        LdifError::at(line, column, message)
    }
}

/// What comes after the `:` of an attribute line.
#[derive(Clone, Copy, PartialEq)]
enum Form {
    /// `attr: value`
    Plain,
    /// `attr:: base64`
    Base64,
    /// `attr:< url`
    Url,
}

/// An attribute line split at its colon.
struct Split<'a> {
    name: &'a str,
    form: Form,
    /// The value text (after the fill spaces).
    value: &'a [u8],
    /// Offset of `value` in the logical line.
    offset: usize,
}

/// What [`LdifReader::logical`] found.
enum Item {
    Blank,
    /// A logical line, pushed onto `lines`.
    Line,
}

impl<R: BufRead> LdifReader<R> {
    /// A reader over `input`.
    pub fn new(input: R) -> LdifReader<R> {
        LdifReader {
            input,
            buf: Vec::new(),
            filled: 0,
            pos: 0,
            scan: 0,
            line: 0,
            peeked: None,
            eof: false,
            past_version: false,
            changes: None,
            done: false,
            lines: Vec::new(),
            joined: Vec::new(),
        }
    }

    /// The input (for example to learn how much was read). The reader reads ahead of the
    /// records it has returned.
    pub fn get_ref(&self) -> &R {
        &self.input
    }

    /// The number of physical lines read so far.
    pub fn lines_read(&self) -> usize {
        self.line
    }

    /// Whether the records read so far are change records (`None` before the first record).
    pub fn holds_changes(&self) -> Option<bool> {
        self.changes
    }

    /// Reads more input into the buffer. When room is short, first drops what lies before `keep`
    /// (every line the record being read still needs starts at or after it), then grows the
    /// buffer; returns how far the kept bytes moved down.
    fn refill(&mut self, keep: usize) -> Result<usize, LdifError> {
        let mut moved = 0;
        if self.buf.len() - self.filled < CHUNK / 2 && keep > 0 {
            self.buf.copy_within(keep..self.filled, 0);
            self.filled -= keep;
            self.pos -= keep;
            self.scan -= keep;
            for l in self.lines.iter_mut().filter(|l| !l.joined) {
                l.start -= keep;
                l.end -= keep;
            }
            moved = keep;
        }
        if self.buf.len() - self.filled < CHUNK / 2 {
            let len = (self.buf.len() * 2).max(CHUNK);
            self.buf.resize(len, 0);
        }
        loop {
            let room = self.buf.get_mut(self.filled..).unwrap_or(&mut []);
            match self.input.read(room) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(moved);
                }
                Ok(n) => {
                    self.filled += n;
                    return Ok(moved);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(LdifError::new(
                        self.line + 1,
                        format!("could not read the input: {e}"),
                    ))
                }
            }
        }
    }

    /// The next physical line; `keep` is where the record being read starts in the buffer.
    fn physical(&mut self, keep: &mut usize) -> Result<Option<Phys>, LdifError> {
        if let Some(p) = self.peeked.take() {
            return Ok(Some(p));
        }
        loop {
            let unread = self.buf.get(self.scan..self.filled).unwrap_or(&[]);
            if let Some(i) = memchr::memchr(b'\n', unread) {
                let start = self.pos;
                let newline = self.scan + i;
                self.pos = newline + 1;
                self.scan = self.pos;
                self.line += 1;
                let end = if newline > start && self.buf.get(newline - 1) == Some(&b'\r') {
                    newline - 1
                } else {
                    newline
                };
                return Ok(Some(Phys {
                    no: self.line,
                    start,
                    end,
                }));
            }
            self.scan = self.filled;
            if self.eof {
                if self.pos == self.filled {
                    return Ok(None);
                }
                // A last line without a line end keeps a final CR.
                let start = self.pos;
                self.pos = self.filled;
                self.scan = self.filled;
                self.line += 1;
                return Ok(Some(Phys {
                    no: self.line,
                    start,
                    end: self.filled,
                }));
            }
            let from = (*keep).min(self.pos);
            *keep -= self.refill(from)?;
        }
    }

    fn bytes(&self, p: Phys) -> &[u8] {
        self.buf.get(p.start..p.end).unwrap_or(&[])
    }

    /// The next logical line (pushed onto `lines`) or blank line; comments (and their
    /// continuations) are skipped.
    fn logical(&mut self, keep: &mut usize) -> Result<Option<Item>, LdifError> {
        loop {
            let Some(first) = self.physical(keep)? else {
                return Ok(None);
            };
            let bytes = self.bytes(first);
            match bytes.first() {
                None => return Ok(Some(Item::Blank)),
                Some(b' ') if bytes.iter().all(|b| *b == b' ') => return Ok(Some(Item::Blank)),
                Some(b' ') => {
                    return Err(LdifError::at(
                        first.no,
                        1,
                        "a continuation line (starting with a space) with no line to continue; \
                         remove the leading space or join it to the line before",
                    ))
                }
                _ => {}
            }
            let comment = bytes.first() == Some(&b'#');
            if !comment {
                self.lines.push(LineRef {
                    joined: false,
                    start: first.start,
                    end: first.end,
                    pieces: smallvec::smallvec![(0, first.no)],
                });
            }
            while let Some(next) = self.physical(keep)? {
                if self.bytes(next).first() != Some(&b' ') {
                    self.peeked = Some(next);
                    break;
                }
                if comment {
                    continue;
                }
                let Some(l) = self.lines.last_mut() else {
                    break;
                };
                if !l.joined {
                    // The first continuation: move the line to `joined`.
                    let start = self.joined.len();
                    self.joined
                        .extend_from_slice(self.buf.get(l.start..l.end).unwrap_or(&[]));
                    *l = LineRef {
                        joined: true,
                        start,
                        end: self.joined.len(),
                        pieces: std::mem::take(&mut l.pieces),
                    };
                }
                l.pieces.push((l.end - l.start, next.no));
                self.joined.extend_from_slice(
                    self.buf
                        .get(next.start..next.end)
                        .and_then(|b| b.get(1..))
                        .unwrap_or(&[]),
                );
                l.end = self.joined.len();
            }
            if !comment {
                return Ok(Some(Item::Line));
            }
        }
    }

    fn record(&mut self) -> Result<Option<LdifRecord>, LdifError> {
        loop {
            self.lines.clear();
            self.joined.clear();
            let mut keep = self.peeked.map_or(self.pos, |p| p.start);
            loop {
                match self.logical(&mut keep)? {
                    None => break,
                    Some(Item::Blank) if self.lines.is_empty() => {
                        keep = self.pos;
                    }
                    Some(Item::Blank) => break,
                    Some(Item::Line) => {}
                }
            }
            if self.lines.is_empty() {
                return Ok(None);
            }
            let (buf, joined) = (&self.buf, &self.joined);
            let mut lines: Vec<Logical<'_>> = self
                .lines
                .iter()
                .map(|l| Logical {
                    bytes: if l.joined { joined } else { buf }
                        .get(l.start..l.end)
                        .unwrap_or(&[]),
                    pieces: &l.pieces,
                })
                .collect();
            if !self.past_version {
                self.past_version = true;
                if let Some(first) = lines.first() {
                    let s = split(first)?;
                    if s.name.eq_ignore_ascii_case("version") {
                        let v = text(first, &s)?;
                        if v.trim_end() != "1" {
                            return Err(first.error(
                                s.offset,
                                format!("unsupported LDIF version {v:?}; only `version: 1` exists"),
                            ));
                        }
                        lines.remove(0);
                        if lines.is_empty() {
                            continue;
                        }
                    }
                }
            }
            let record = parse_record(lines)?;
            match self.changes {
                None => self.changes = Some(record.is_change()),
                Some(c) if c != record.is_change() => {
                    let (was, is) = if c {
                        ("change records", "a content record")
                    } else {
                        ("content records", "a change record")
                    };
                    return Err(LdifError::new(
                        record.line,
                        format!(
                            "{is} in a file of {was}: RFC 2849 does not allow mixing them; \
                             split the file"
                        ),
                    ));
                }
                Some(_) => {}
            }
            return Ok(Some(record));
        }
    }
}

impl<R: BufRead> Iterator for LdifReader<R> {
    type Item = Result<LdifRecord, LdifError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.record() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

fn is_type_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-'
}

/// Checks an attribute description (`cn`, `cn;lang-en`, `2.5.4.3`); returns the offset of the
/// first bad byte.
fn check_description(name: &[u8]) -> Result<(), (usize, &'static str)> {
    let mut parts = name.split(|b| *b == b';');
    let ty = parts.next().unwrap_or(&[]);
    match ty.first() {
        None => return Err((0, "missing attribute name before `:`")),
        Some(b) if b.is_ascii_alphabetic() => {
            if let Some(i) = ty.iter().position(|b| !is_type_char(*b)) {
                return Err((i, "attribute names hold only letters, digits and `-`"));
            }
        }
        Some(b) if b.is_ascii_digit() => {
            let ok = ty
                .split(|b| *b == b'.')
                .all(|p| !p.is_empty() && p.iter().all(u8::is_ascii_digit));
            if !ok {
                return Err((0, "a numeric attribute type is an OID like 2.5.4.3"));
            }
        }
        Some(_) => return Err((0, "an attribute name starts with a letter (or is an OID)")),
    }
    let mut offset = ty.len();
    for opt in parts {
        offset += 1;
        if opt.is_empty() {
            return Err((offset, "empty attribute option after `;`"));
        }
        if let Some(i) = opt.iter().position(|b| !is_type_char(*b)) {
            return Err((
                offset + i,
                "attribute options hold only letters, digits and `-`",
            ));
        }
        offset += opt.len();
    }
    Ok(())
}

/// Splits `name: value` / `name:: base64` / `name:< url`.
fn split<'a>(line: &Logical<'a>) -> Result<Split<'a>, LdifError> {
    let b = line.bytes;
    let Some(colon) = memchr::memchr(b':', b) else {
        return Err(line.error(
            0,
            "expected `attribute: value` (no `:` on the line); records are separated by blank lines",
        ));
    };
    let name_bytes = b.get(..colon).unwrap_or(&[]);
    check_description(name_bytes).map_err(|(i, msg)| line.error(i, msg))?;
    // Checked ASCII above.
    let name = std::str::from_utf8(name_bytes).unwrap_or("");
    let mut i = colon + 1;
    let form = match b.get(i) {
        Some(b':') => {
            i += 1;
            Form::Base64
        }
        Some(b'<') => {
            i += 1;
            Form::Url
        }
        _ => Form::Plain,
    };
    while b.get(i) == Some(&b' ') {
        i += 1;
    }
    Ok(Split {
        name,
        form,
        value: b.get(i..).unwrap_or(&[]),
        offset: i,
    })
}

/// Checks a plain value: no NUL or CR.
fn check_plain(line: &Logical<'_>, s: &Split<'_>) -> Result<(), LdifError> {
    match memchr::memchr2(0, b'\r', s.value) {
        Some(i) => Err(line.error(
            s.offset + i,
            "NUL or CR in a plain value; write the value as Base64 (`attr:: …`)",
        )),
        None => Ok(()),
    }
}

/// Decodes a Base64 value.
fn decode_base64(line: &Logical<'_>, s: &Split<'_>) -> Result<Vec<u8>, LdifError> {
    let text = s.value.trim_ascii_end();
    BASE64.decode(text).map_err(|e| {
        let at = match e {
            base64::DecodeError::InvalidByte(i, _)
            | base64::DecodeError::InvalidLastSymbol(i, _) => i,
            _ => 0,
        };
        line.error(s.offset + at, format!("invalid Base64 value: {e}"))
    })
}

fn url_error(line: &Logical<'_>, s: &Split<'_>) -> LdifError {
    line.error(
        s.offset,
        format!(
            "URL values (`{}:< url`) are not supported: reading LDIF never opens files or \
             connections named by the data; put the value inline as Base64 (`{}:: …`)",
            s.name, s.name
        ),
    )
}

/// The value of a line as raw bytes.
fn value_bytes(line: &Logical<'_>, s: &Split<'_>) -> Result<Vec<u8>, LdifError> {
    match s.form {
        Form::Plain => {
            check_plain(line, s)?;
            Ok(s.value.to_vec())
        }
        Form::Base64 => decode_base64(line, s),
        Form::Url => Err(url_error(line, s)),
    }
}

/// A plain value as text.
fn plain_str<'a>(line: &Logical<'_>, s: &Split<'a>) -> Result<&'a str, LdifError> {
    check_plain(line, s)?;
    std::str::from_utf8(s.value).map_err(|e| {
        line.error(
            s.offset + e.valid_up_to(),
            "a plain value is not UTF-8; write it as Base64 (`attr:: …`)",
        )
    })
}

/// The value of a line as a model value: a string when it is UTF-8, bytes otherwise (plain
/// values must be UTF-8).
fn value(line: &Logical<'_>, s: &Split<'_>) -> Result<Value, LdifError> {
    match s.form {
        Form::Plain => Ok(Value::String(SmolStr::new(plain_str(line, s)?))),
        Form::Base64 => match String::from_utf8(decode_base64(line, s)?) {
            Ok(t) => Ok(Value::String(t.into())),
            Err(e) => Ok(Value::Bytes(e.into_bytes())),
        },
        Form::Url => Err(url_error(line, s)),
    }
}

/// The value of a line that must be text (dn, newrdn, changetype, …).
fn text<'a>(line: &Logical<'_>, s: &Split<'a>) -> Result<Cow<'a, str>, LdifError> {
    match s.form {
        Form::Plain => Ok(Cow::Borrowed(plain_str(line, s)?)),
        Form::Base64 => String::from_utf8(decode_base64(line, s)?)
            .map(Cow::Owned)
            .map_err(|_| {
                line.error(
                    s.offset,
                    format!("the `{}:` value is not UTF-8 text", s.name),
                )
            }),
        Form::Url => Err(url_error(line, s)),
    }
}

/// The byte offset of character `chars` in `s` (the end when past it).
fn char_offset(s: &str, chars: usize) -> usize {
    s.char_indices().nth(chars).map_or(s.len(), |(i, _)| i)
}

fn parse_dn(line: &Logical, s: &Split<'_>) -> Result<Dn, LdifError> {
    let dn_text = text(line, s)?;
    Dn::parse(&dn_text).map_err(|e| {
        let at = if s.form == Form::Plain {
            s.offset + char_offset(&dn_text, e.position())
        } else {
            s.offset
        };
        line.error(at, format!("invalid DN in `{}:`: {e}", s.name))
    })
}

fn is_dash(line: &Logical) -> bool {
    line.bytes.first() == Some(&b'-') && line.bytes.iter().skip(1).all(|b| *b == b' ')
}

fn attr_value(line: &Logical) -> Result<LdifValue, LdifError> {
    if is_dash(line) {
        return Err(line.error(0, "`-` outside a `changetype: modify` record"));
    }
    let s = split(line)?;
    if s.name.eq_ignore_ascii_case("dn") {
        return Err(line.error(
            0,
            "a second `dn:` line in one record; separate records with a blank line",
        ));
    }
    Ok(LdifValue {
        line: line.line(),
        attribute: AttrName::new(s.name),
        value: value(line, &s)?,
    })
}

/// The attribute values of the lines left in `it`.
fn attr_values(
    it: std::iter::Peekable<std::vec::IntoIter<Logical<'_>>>,
) -> Result<Vec<LdifValue>, LdifError> {
    let mut values = Vec::with_capacity(it.len());
    for l in it {
        values.push(attr_value(&l)?);
    }
    Ok(values)
}

fn parse_record(lines: Vec<Logical<'_>>) -> Result<LdifRecord, LdifError> {
    let mut it = lines.into_iter().peekable();
    let Some(first) = it.next() else {
        return Err(LdifError::new(0, "empty record"));
    };
    if is_dash(&first) {
        return Err(first.error(0, "expected `dn:` at the start of a record, found `-`"));
    }
    let s = split(&first)?;
    if !s.name.eq_ignore_ascii_case("dn") {
        return Err(first.error(
            0,
            format!(
                "expected `dn:` at the start of a record, found `{}:`; records are separated by \
                 blank lines",
                s.name
            ),
        ));
    }
    let dn = parse_dn(&first, &s)?;
    let line = first.line();

    let mut controls = Vec::new();
    let mut changetype = None;
    while let Some(next) = it.peek() {
        if is_dash(next) {
            break;
        }
        let s = split(next)?;
        if s.name.eq_ignore_ascii_case("control") {
            controls.push(parse_control(next, &s)?);
            it.next();
        } else if s.name.eq_ignore_ascii_case("changetype") {
            let t = text(next, &s)?;
            changetype = Some((t, next.line(), next.error(s.offset, "")));
            it.next();
            break;
        } else {
            break;
        }
    }

    let Some((kind, ct_line, ct_pos)) = changetype else {
        if let Some(c) = controls.first() {
            return Err(LdifError::new(
                line,
                format!(
                    "control {} in a record without `changetype:`; controls belong to change \
                     records",
                    c.oid
                ),
            ));
        }
        let values = attr_values(it)?;
        if values.is_empty() {
            return Err(LdifError::new(
                line,
                format!("the entry {dn} has no attributes; a content record needs at least one"),
            ));
        }
        return Ok(LdifRecord {
            line,
            dn,
            controls,
            body: LdifBody::Content(values),
        });
    };

    let body = match kind.trim_end().to_ascii_lowercase().as_str() {
        "add" => {
            let values = attr_values(it)?;
            if values.is_empty() {
                return Err(LdifError::new(
                    ct_line,
                    format!("`changetype: add` of {dn} without attributes"),
                ));
            }
            LdifBody::Add(values)
        }
        "delete" => {
            if let Some(extra) = it.next() {
                return Err(extra.error(0, "`changetype: delete` takes no further lines"));
            }
            LdifBody::Delete
        }
        "modify" => LdifBody::Modify(parse_modify(it)?),
        "modrdn" | "moddn" => LdifBody::ModDn(parse_moddn(it, ct_line)?),
        other => {
            return Err(LdifError {
                message: format!(
                    "unknown changetype {other:?}; expected add, delete, modify, modrdn or moddn"
                ),
                ..ct_pos
            })
        }
    };
    Ok(LdifRecord {
        line,
        dn,
        controls,
        body,
    })
}

fn parse_control(line: &Logical, s: &Split<'_>) -> Result<LdifControl, LdifError> {
    if s.form != Form::Plain {
        return Err(line.error(s.offset, "a `control:` line is written as plain text"));
    }
    let v = s.value;
    let oid_len = v
        .iter()
        .position(|b| !(b.is_ascii_digit() || *b == b'.'))
        .unwrap_or(v.len());
    let oid = std::str::from_utf8(v.get(..oid_len).unwrap_or(&[])).unwrap_or("");
    if oid.is_empty() || !oid.split('.').all(|p| !p.is_empty()) {
        return Err(line.error(
            s.offset,
            "a control starts with its OID (like 1.2.840.113556.1.4.805)",
        ));
    }
    let mut i = oid_len;
    let mut critical = false;
    let spaces = v.iter().skip(i).take_while(|b| **b == b' ').count();
    if spaces > 0 {
        let rest = v.get(i + spaces..).unwrap_or(&[]);
        for (word, flag) in [(&b"true"[..], true), (&b"false"[..], false)] {
            if rest.starts_with(word) {
                critical = flag;
                i += spaces + word.len();
                break;
            }
        }
    }
    let rest = v.get(i..).unwrap_or(&[]);
    let value = if rest.trim_ascii().is_empty() {
        None
    } else if rest.first() == Some(&b':') {
        let (form, skip) = match rest.get(1) {
            Some(b':') => (Form::Base64, 2),
            Some(b'<') => (Form::Url, 2),
            _ => (Form::Plain, 1),
        };
        let fill = rest.iter().skip(skip).take_while(|b| **b == b' ').count();
        let sub = Split {
            name: "control",
            form,
            value: rest.get(skip + fill..).unwrap_or(&[]),
            offset: s.offset + i + skip + fill,
        };
        Some(value_bytes(line, &sub)?)
    } else {
        return Err(line.error(
            s.offset + i,
            "expected `true`, `false` or `:` and the value after the control OID",
        ));
    };
    Ok(LdifControl {
        oid: oid.to_owned(),
        critical,
        value,
    })
}

fn parse_modify(
    mut it: std::iter::Peekable<std::vec::IntoIter<Logical<'_>>>,
) -> Result<Vec<LdifModification>, LdifError> {
    let mut mods = Vec::new();
    while let Some(head) = it.next() {
        if is_dash(&head) {
            return Err(head.error(0, "`-` without an `add:`, `delete:` or `replace:` line"));
        }
        let s = split(&head)?;
        let op = match s.name.to_ascii_lowercase().as_str() {
            "add" => ChangeOp::Add,
            "delete" => ChangeOp::Remove,
            "replace" => ChangeOp::Replace,
            _ => {
                return Err(head.error(
                    0,
                    format!(
                        "expected `add:`, `delete:` or `replace:` in a modify record, found `{}:`",
                        s.name
                    ),
                ))
            }
        };
        let attr = text(&head, &s)?;
        let attr = attr.trim_end();
        check_description(attr.as_bytes()).map_err(|(i, msg)| head.error(s.offset + i, msg))?;
        let attribute = AttrName::new(attr);
        let mut values = Vec::new();
        // A missing final `-` is tolerated.
        for line in it.by_ref() {
            if is_dash(&line) {
                break;
            }
            let v = attr_value(&line)?;
            if v.attribute != attribute {
                return Err(line.error(
                    0,
                    format!(
                        "expected a value of {attribute} or `-` (ending the `{}: {attribute}` \
                         block of line {})",
                        s.name,
                        head.line()
                    ),
                ));
            }
            values.push(v);
        }
        mods.push(LdifModification {
            line: head.line(),
            op,
            attribute,
            values,
        });
    }
    Ok(mods)
}

fn parse_moddn(
    mut it: std::iter::Peekable<std::vec::IntoIter<Logical<'_>>>,
    ct_line: usize,
) -> Result<ModDn, LdifError> {
    let mut expect = |name: &str| -> Result<Option<(Logical, usize, Form)>, LdifError> {
        let Some(line) = it.next() else {
            return Ok(None);
        };
        let s = split(&line)?;
        if !s.name.eq_ignore_ascii_case(name) {
            return Err(line.error(0, format!("expected `{name}:`, found `{}:`", s.name)));
        }
        let (offset, form) = (s.offset, s.form);
        Ok(Some((line, offset, form)))
    };
    let Some((rdn_line, _, _)) = expect("newrdn")? else {
        return Err(LdifError::new(
            ct_line,
            "a modrdn record needs a `newrdn:` line",
        ));
    };
    let s = split(&rdn_line)?;
    let rdn_text = text(&rdn_line, &s)?;
    let new_rdn: Rdn = rdn_text.parse().map_err(|e: crate::model::DnError| {
        let at = if s.form == Form::Plain {
            s.offset + char_offset(&rdn_text, e.position())
        } else {
            s.offset
        };
        rdn_line.error(at, format!("invalid RDN in `newrdn:`: {e}"))
    })?;
    let Some((del_line, _, _)) = expect("deleteoldrdn")? else {
        return Err(LdifError::new(
            rdn_line.line(),
            "a modrdn record needs a `deleteoldrdn: 0|1` line after `newrdn:`",
        ));
    };
    let s = split(&del_line)?;
    let delete_old_rdn = match text(&del_line, &s)?.trim_end() {
        "0" => false,
        "1" => true,
        other => {
            return Err(del_line.error(
                s.offset,
                format!("`deleteoldrdn:` is 0 or 1, not {other:?}"),
            ))
        }
    };
    let new_superior = match expect("newsuperior")? {
        None => None,
        Some((line, _, _)) => {
            let s = split(&line)?;
            Some(parse_dn(&line, &s)?)
        }
    };
    if let Some(extra) = it.next() {
        return Err(extra.error(0, "unexpected line after a modrdn record's fields"));
    }
    Ok(ModDn {
        new_rdn,
        delete_old_rdn,
        new_superior,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> LdifError {
        match parse_str(text) {
            Ok(r) => panic!("expected an error, got {r:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn folding_joins_continuations_and_keeps_line_numbers() {
        let text = "dn: cn=Ada,\r\n dc=example\r\ndescription: one \r\n two\r\n\r\n";
        let r = parse_str(text).unwrap();
        assert_eq!(r[0].dn.as_str(), "cn=Ada,dc=example");
        assert_eq!(r[0].attributes().first_str("description"), Some("one two"));
        let LdifBody::Content(v) = &r[0].body else {
            panic!()
        };
        assert_eq!(v[0].line, 3);
    }

    #[test]
    fn comments_and_their_continuations_are_skipped() {
        let text = "# a comment\n  that goes on\ndn: cn=a\n# inside\n more comment\ncn: a\n";
        let r = parse_str(text).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].line, 3);
        assert_eq!(r[0].attributes().len(), 1);
    }

    #[test]
    fn version_line_is_optional_and_checked() {
        assert_eq!(
            parse_str("version: 1\n\ndn: cn=a\ncn: a\n").unwrap().len(),
            1
        );
        assert_eq!(parse_str("version: 1\n").unwrap().len(), 0);
        let e = err("version: 2\ndn: cn=a\ncn: a\n");
        assert_eq!((e.line, e.column), (1, Some(10)));
        assert!(e.message.contains("unsupported LDIF version"));
    }

    #[test]
    fn base64_values_decode_to_strings_or_bytes() {
        let r = parse_str("dn:: Y249QWRh\nx:: w6k=\ny:: /wA=\nz:: w6k\n").unwrap();
        assert_eq!(r[0].dn.as_str(), "cn=Ada");
        let a = r[0].attributes();
        assert_eq!(a.first_str("x"), Some("é"));
        assert_eq!(a.first("y"), Some(&Value::Bytes(vec![0xff, 0])));
        assert_eq!(a.first_str("z"), Some("é"), "padding may be omitted");
    }

    #[test]
    fn options_and_empty_values() {
        let r = parse_str("dn: cn=a\ncn;lang-en: Ada\ndescription:\n").unwrap();
        let a = r[0].attributes();
        assert_eq!(a.first_str("cn;lang-en"), Some("Ada"));
        assert_eq!(a.first_str("description"), Some(""));
    }

    #[test]
    fn error_positions() {
        let cases: &[(&str, usize, Option<usize>, &str)] = &[
            ("dn: cn=a\ncn: x\n\n z\n", 4, Some(1), "continuation"),
            ("dn: cn=a\ncn x\n", 2, Some(1), "no `:`"),
            ("dn: cn=a\nc_n: x\n", 2, Some(2), "letters, digits"),
            ("dn: cn=a\n1.x: x\n", 2, Some(1), "OID"),
            ("dn: cn=a\ncn;: x\n", 2, Some(4), "empty attribute option"),
            ("dn: cn=a\n: x\n", 2, Some(1), "missing attribute name"),
            ("dn: cn=a\ncn:: ab!d\n", 2, Some(8), "Base64"),
            (
                "dn: cn=a\njpegPhoto:< file:///etc/passwd\n",
                2,
                Some(13),
                "URL values",
            ),
            ("dn: cn=a\ncn: a\u{0}b\n", 2, Some(6), "NUL"),
            ("dn: cn=a\ncn: a\rb\n", 2, Some(6), "NUL or CR"),
            ("cn: a\n", 1, Some(1), "expected `dn:`"),
            ("dn: cn=a\n", 1, None, "no attributes"),
            ("dn: cn=a,,dc=x\ncn: a\n", 1, Some(10), "invalid DN"),
            ("dn: cn=a\ncn: a\ndn: cn=b\n", 3, Some(1), "second `dn:`"),
            (
                "dn: cn=a\nchangetype: frob\n",
                2,
                Some(13),
                "unknown changetype",
            ),
            ("dn: cn=a\nchangetype: add\n", 2, None, "without attributes"),
            (
                "dn: cn=a\nchangetype: delete\ncn: a\n",
                3,
                Some(1),
                "no further lines",
            ),
            (
                "dn: cn=a\ncontrol: 1.2.3\ncn: a\n",
                1,
                None,
                "without `changetype:`",
            ),
            (
                "dn: cn=a\ncontrol: x\nchangetype: delete\n",
                2,
                Some(10),
                "OID",
            ),
            (
                "dn: cn=a\ncontrol: 1.2 maybe\nchangetype: delete\n",
                2,
                Some(13),
                "expected `true`",
            ),
            (
                "dn: cn=a\nchangetype: modify\nadd: cn\nsn: x\n-\n",
                4,
                Some(1),
                "expected a value of cn",
            ),
            (
                "dn: cn=a\nchangetype: modify\nfrob: cn\n",
                3,
                Some(1),
                "expected `add:`",
            ),
            (
                "dn: cn=a\nchangetype: modify\n-\n",
                3,
                Some(1),
                "`-` without",
            ),
            ("dn: cn=a\ncn: a\n-\n", 3, Some(1), "`-` outside"),
            (
                "dn: cn=a\nchangetype: modify\nadd: c n\n",
                3,
                Some(7),
                "letters",
            ),
            ("dn: cn=a\nchangetype: modrdn\n", 2, None, "`newrdn:`"),
            (
                "dn: cn=a\nchangetype: modrdn\nnewrdn: cn=b\n",
                3,
                None,
                "deleteoldrdn",
            ),
            (
                "dn: cn=a\nchangetype: modrdn\nnewrdn: cn=b\ndeleteoldrdn: 2\n",
                4,
                Some(15),
                "0 or 1",
            ),
            (
                "dn: cn=a\nchangetype: modrdn\nnewrdn: cn\n",
                3,
                Some(11),
                "invalid RDN",
            ),
            (
                "dn: cn=a\nchangetype: modrdn\nnewrdn: cn=b\ndeleteoldrdn: 1\nfoo: x\n",
                5,
                Some(1),
                "expected `newsuperior:`",
            ),
            (
                "dn: cn=a\nchangetype: delete\n\ndn: cn=b\ncn: b\n",
                4,
                None,
                "mixing",
            ),
            (
                "dn: cn=a\ncn: a\n\ndn: cn=b\nchangetype: delete\n",
                4,
                None,
                "mixing",
            ),
        ];
        let mut failures = Vec::new();
        for (text, line, column, needle) in cases {
            let e = err(text);
            let column_ok = column.is_none() || e.column == *column;
            if e.line != *line || !column_ok || !e.message.contains(needle) {
                failures.push(format!("{text:?}: got {e:?}"));
            }
            assert!(
                e.to_string().starts_with(&format!("line {}: ", e.line)),
                "{e}"
            );
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn invalid_utf8_in_a_plain_value_is_an_error_with_its_column() {
        let mut bytes = b"dn: cn=a\ncn: ab".to_vec();
        bytes.push(0xff);
        bytes.push(b'\n');
        let e = LdifReader::new(&bytes[..]).next().unwrap().unwrap_err();
        assert_eq!((e.line, e.column), (2, Some(7)));
        assert!(e.message.contains("not UTF-8"));
    }

    #[test]
    fn column_on_a_continuation_line_counts_the_fold_space() {
        // The bad Base64 byte `!` is the 3rd character of the continuation line " a!".
        let e = err("dn: cn=a\ncn:: YW\n a!\n");
        assert_eq!((e.line, e.column), (3, Some(3)));
    }

    #[test]
    fn reader_stops_after_an_error() {
        let mut r = LdifReader::new("dn: cn=a\ncn x\n\ndn: cn=b\ncn: b\n".as_bytes());
        assert!(r.next().unwrap().is_err());
        assert!(r.next().is_none());
    }

    #[test]
    fn controls_are_kept() {
        let text = "dn: cn=a\ncontrol: 1.2.840.113556.1.4.805 true\ncontrol: 1.2.3 false:: AQI=\n\
                    control: 1.2.4: text\nchangetype: delete\n";
        let r = parse_str(text).unwrap();
        assert_eq!(
            r[0].controls,
            vec![
                LdifControl {
                    oid: "1.2.840.113556.1.4.805".into(),
                    critical: true,
                    value: None
                },
                LdifControl {
                    oid: "1.2.3".into(),
                    critical: false,
                    value: Some(vec![1, 2])
                },
                LdifControl {
                    oid: "1.2.4".into(),
                    critical: false,
                    value: Some(b"text".to_vec())
                },
            ]
        );
        assert_eq!(r[0].body, LdifBody::Delete);
    }

    #[test]
    fn modify_without_final_dash_and_empty_deletes() {
        let text = "dn: cn=a\nchangetype: modify\ndelete: description\n-\nreplace: mail\n\
                    mail: a@x\nmail: b@x\n-\nadd: member\nmember: cn=b\n";
        let r = parse_str(text).unwrap();
        let LdifBody::Modify(m) = &r[0].body else {
            panic!()
        };
        assert_eq!(m.len(), 3);
        assert_eq!(
            (m[0].op, m[0].values.len(), m[0].line),
            (ChangeOp::Remove, 0, 3)
        );
        assert_eq!((m[1].op, m[1].values.len()), (ChangeOp::Replace, 2));
        assert_eq!((m[2].op, m[2].values.len()), (ChangeOp::Add, 1));
    }

    #[test]
    fn io_errors_become_ldif_errors() {
        struct Broken;
        impl std::io::Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk on fire"))
            }
        }
        let mut r = LdifReader::new(std::io::BufReader::new(Broken));
        let e = r.next().unwrap().unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("disk on fire"));
    }

    /// Hands out its bytes at most `step` at a time, as a pipe or a slow disk may.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len());
            let (head, tail) = self.data.split_at(n);
            buf[..n].copy_from_slice(head);
            self.data = tail;
            Ok(n)
        }
    }

    /// Every record (or the error) of `bytes`, as text (a `Dn`'s text included), read in pieces
    /// of `step` bytes.
    fn read_in_steps(bytes: &[u8], step: usize) -> Vec<String> {
        let input = std::io::BufReader::with_capacity(1, Trickle { data: bytes, step });
        LdifReader::new(input).map(|r| format!("{r:?}")).collect()
    }

    #[test]
    fn records_do_not_depend_on_how_the_input_arrives() {
        // Folded lines, CRLF, comments, a final line without a line end, and records larger
        // than the reader's chunk (the buffer grows and moves while a record is read).
        let mut text = String::from("version: 1\r\n# a comment\r\n  continued\r\n\r\n");
        for i in 0..3000 {
            text.push_str(&format!(
                "dn: cn=user {i},\r\n ou=people,dc=example\ncn: user {i}\ndescription:: \
                 w6k=\nmember: cn=a\n b,dc=x\n# note\n\n"
            ));
        }
        text.push_str("dn: cn=big,dc=example\ncn: big\n");
        for i in 0..20_000 {
            text.push_str(&format!(
                "member: cn=member number {i},ou=people,dc=example\n"
            ));
        }
        text.push_str("\n \ndn: cn=last,dc=example\ncn: last");
        assert!(text.len() > 3 * CHUNK);
        let whole = read_in_steps(text.as_bytes(), usize::MAX);
        assert_eq!(whole.len(), 3002);
        assert!(
            whole.iter().all(|r| r.starts_with("Ok(")),
            "{:?}",
            whole.first()
        );
        assert!(
            whole[4].contains("cn=user 4,ou=people,dc=example"),
            "{}",
            whole[4]
        );
        for step in [1, 7, 4096, CHUNK - 1, CHUNK + 3] {
            let pieces = read_in_steps(text.as_bytes(), step);
            assert!(pieces == whole, "read {step} bytes at a time");
        }
        // An error's line and column do not depend on it either.
        let bad = format!("{text}\n\ndn: cn=x\ncn:: ab!d\n");
        let whole = read_in_steps(bad.as_bytes(), usize::MAX);
        assert!(whole.last().is_some_and(|e| e.starts_with("Err(")));
        assert_eq!(read_in_steps(bad.as_bytes(), 5), whole);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            for r in LdifReader::new(&bytes[..]) {
                if let Err(e) = r {
                    proptest::prop_assert!(e.line >= 1);
                }
            }
        }

        #[test]
        fn chunking_changes_nothing(text in "(dn: |cn: |cn:: |changetype: |modify|add: cn|-|#| |a|=|,|\n|\r\n|\r|w6k=|\n \n|[a-z=,]{0,6}){0,80}", step in 1usize..12) {
            let whole = read_in_steps(text.as_bytes(), usize::MAX);
            proptest::prop_assert_eq!(read_in_steps(text.as_bytes(), step), whole);
        }

        #[test]
        fn never_panics_on_ldif_like_text(text in "(dn|cn|changetype|add|delete|replace|-|control|newrdn|deleteoldrdn|newsuperior|version|#| |:|::|: |=|,|\n|\r\n|a|1|\\.|modify|modrdn|true|<|[a-z=,]{0,6}){0,60}") {
            for r in LdifReader::new(text.as_bytes()) {
                if let Err(e) = r {
                    proptest::prop_assert!(e.line >= 1);
                }
            }
        }
    }
}
