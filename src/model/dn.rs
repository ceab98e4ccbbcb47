//! Distinguished names (RFC 4514): parsing, escaping, normalization and navigation of the tree.
//!
//! A [`Dn`] keeps the text it was parsed from (for display) next to a precomputed normalized form
//! (for comparison and hashing), so that equality, ordering and hashing never allocate. The module
//! is pure: it does no I/O, keeps no global state and never panics on input; bad input becomes a
//! [`DnError`] naming the text, the 0-based character position and what was expected.
//!
//! Normalization (what makes two DNs equal): attribute types are compared ASCII case-insensitively
//! with an `OID.` prefix dropped; string values are unescaped, case-folded (Unicode lower case) and
//! stripped of leading and trailing spaces (inner spaces are kept as they are); spaces around `,`,
//! `;`, `+` and `=` do not count; the attribute-value assertions of a multi-valued RDN are
//! compared as a set; `#hex` (BER) values compare by their lower-cased hex text. Attribute type
//! names and numeric OIDs are not mapped onto each other (`cn` and `2.5.4.3` differ).

use std::cmp::Ordering;
use std::fmt::{self, Write as _};
use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use smol_str::SmolStr;

/// A distinguished name that could not be parsed (or an attribute type that is not valid).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid DN \"{input}\" at position {position}: {message}")]
pub struct DnError {
    input: String,
    position: usize,
    message: String,
}

impl DnError {
    /// Builds an error at byte offset `byte_pos` of `input`; the stored position counts characters.
    fn at(input: &str, byte_pos: usize, message: impl Into<String>) -> DnError {
        let bytes = input.as_bytes();
        let end = byte_pos.min(bytes.len());
        let position = bytes
            .get(..end)
            .unwrap_or(&[])
            .iter()
            .filter(|b| (**b & 0xC0) != 0x80)
            .count();
        DnError {
            input: input.to_owned(),
            position,
            message: message.into(),
        }
    }

    /// The text that was being parsed.
    pub fn input(&self) -> &str {
        &self.input
    }

    /// The 0-based position (in characters, not bytes) where the problem was found.
    pub fn position(&self) -> usize {
        self.position
    }

    /// What was wrong, with a hint where one helps.
    pub fn message(&self) -> &str {
        &self.message
    }
}

// ---------------------------------------------------------------------------------------------
// Escaping
// ---------------------------------------------------------------------------------------------

/// Escapes an attribute value for use in a DN string, as RFC 4514 §2.4 requires: a leading space
/// or `#`, a trailing space, the characters `"` `+` `,` `;` `<` `>` `\` and NUL (as `\00`).
/// Every other character is left as it is.
///
/// ```
/// use dirsync::model::dn::escape_value;
/// assert_eq!(escape_value("Smith, John"), r"Smith\, John");
/// assert_eq!(escape_value(" #1 "), r"\ #1\ ");
/// ```
pub fn escape_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 4);
    // Writing into a String cannot fail.
    let _ = write_escaped(&mut out, value);
    out
}

/// Writes `value` escaped per RFC 4514 §2.4 into `w`.
fn write_escaped<W: fmt::Write>(w: &mut W, value: &str) -> fmt::Result {
    let last = value.len().saturating_sub(1);
    let mut run_start = 0;
    for (i, c) in value.char_indices() {
        let escape: Option<&str> = match c {
            ' ' if i == 0 || i == last => Some("\\ "),
            '#' if i == 0 => Some("\\#"),
            '"' => Some("\\\""),
            '+' => Some("\\+"),
            ',' => Some("\\,"),
            ';' => Some("\\;"),
            '<' => Some("\\<"),
            '>' => Some("\\>"),
            '\\' => Some("\\\\"),
            '\0' => Some("\\00"),
            _ => None,
        };
        if let Some(esc) = escape {
            w.write_str(value.get(run_start..i).unwrap_or(""))?;
            w.write_str(esc)?;
            run_start = i + c.len_utf8();
        }
    }
    w.write_str(value.get(run_start..).unwrap_or(""))
}

/// Characters that may follow a `\` in a DN string (RFC 4514 `special` plus `\` itself).
fn is_escapable(b: u8) -> bool {
    matches!(
        b,
        b'"' | b'+' | b',' | b';' | b'<' | b'>' | b' ' | b'#' | b'=' | b'\\'
    )
}

fn hex_val(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        b'A'..=b'F' => b - b'A' + 10,
        _ => 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Attribute types
// ---------------------------------------------------------------------------------------------

/// Checks an attribute type (`descr` or `numericoid`, optionally `OID.`-prefixed) and returns it
/// without the prefix, or a message saying what is wrong.
fn check_attr_type(raw: &str) -> Result<&str, String> {
    let body = match raw.get(..4) {
        Some(p) if p.eq_ignore_ascii_case("oid.") => raw.get(4..).unwrap_or(""),
        _ => raw,
    };
    let bytes = body.as_bytes();
    match bytes.first() {
        None => Err("expected an attribute type (a name such as `cn` or an OID)".into()),
        Some(b) if b.is_ascii_digit() || body.len() != raw.len() => {
            let mut parts = 0;
            for part in body.split('.') {
                parts += 1;
                let ok = !part.is_empty()
                    && part.bytes().all(|b| b.is_ascii_digit())
                    && !(part.len() > 1 && part.starts_with('0'));
                if !ok {
                    return Err(format!(
                        "invalid numeric OID \"{raw}\": numbers without leading zeros separated by '.'"
                    ));
                }
            }
            if parts < 2 {
                return Err(format!(
                    "invalid numeric OID \"{raw}\": an OID has at least two numbers, like 2.5.4.3"
                ));
            }
            Ok(body)
        }
        Some(b) if b.is_ascii_alphabetic() => {
            if bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-') {
                Ok(body)
            } else {
                Err(format!(
                    "invalid attribute type \"{raw}\": a name is a letter followed by letters, digits and '-'"
                ))
            }
        }
        Some(_) => Err(format!(
            "invalid attribute type \"{raw}\": it must start with a letter (a name) or a digit (an OID)"
        )),
    }
}

/// Writes the normalized form of an attribute type.
fn write_norm_attr(out: &mut String, attr: &str) {
    if attr.bytes().any(|b| b.is_ascii_uppercase()) {
        out.extend(attr.chars().map(|c| c.to_ascii_lowercase()));
    } else {
        out.push_str(attr);
    }
}

/// Writes one character of a normalized string value (already lower-cased).
fn push_norm_char(out: &mut String, l: char, first: bool) {
    match l {
        '#' if first => out.push_str("\\#"),
        '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
            out.push('\\');
            out.push(l);
        }
        '\0' => out.push_str("\\00"),
        _ => out.push(l),
    }
}

/// Writes the normalized form of a string value: trimmed of spaces, lower-cased, escaped.
///
/// Runs of ASCII characters that stay as they are (not upper-case, not escaped) are copied
/// whole; every other character goes through [`push_norm_char`].
fn write_norm_value(out: &mut String, value: &str) {
    let trimmed = value.trim_matches(' ');
    let bytes = trimmed.as_bytes();
    // Start of the run of characters not yet written.
    let mut run = 0;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let special = !b.is_ascii()
            || b.is_ascii_uppercase()
            || matches!(b, b'"' | b'+' | b',' | b';' | b'<' | b'>' | b'\\' | 0)
            || (i == 0 && b == b'#');
        if !special {
            i += 1;
            continue;
        }
        out.push_str(trimmed.get(run..i).unwrap_or(""));
        let Some(c) = trimmed.get(i..).and_then(|t| t.chars().next()) else {
            break;
        };
        if c.is_ascii() {
            push_norm_char(out, c.to_ascii_lowercase(), i == 0);
        } else {
            let mut first = i == 0;
            for l in c.to_lowercase() {
                push_norm_char(out, l, first);
                first = false;
            }
        }
        i += c.len_utf8();
        run = i;
    }
    out.push_str(trimmed.get(run..).unwrap_or(""));
}

// ---------------------------------------------------------------------------------------------
// Ava and Rdn
// ---------------------------------------------------------------------------------------------

/// One attribute-value assertion of an RDN: `attr=value`.
///
/// Equality and hashing follow the DN normalization rules of this module.
#[derive(Debug, Clone)]
pub struct Ava {
    attr: SmolStr,
    value: SmolStr,
    hex: bool,
}

impl Ava {
    /// Builds a string-valued assertion. `value` is the unescaped value; `attr` should be a valid
    /// attribute type (a leading `OID.` is dropped) — use [`Ava::try_new`] to have it checked.
    pub fn new(attr: &str, value: &str) -> Ava {
        let attr = check_attr_type(attr).unwrap_or(attr);
        Ava {
            attr: SmolStr::new(attr),
            value: SmolStr::new(value),
            hex: false,
        }
    }

    /// Like [`Ava::new`], but returns an error if `attr` is not a valid attribute type.
    pub fn try_new(attr: &str, value: &str) -> Result<Ava, DnError> {
        let checked = check_attr_type(attr).map_err(|m| DnError::at(attr, 0, m))?;
        Ok(Ava {
            attr: SmolStr::new(checked),
            value: SmolStr::new(value),
            hex: false,
        })
    }

    /// The attribute type as written (without an `OID.` prefix).
    pub fn attr(&self) -> &str {
        &self.attr
    }

    /// The unescaped value; for a BER value ([`Ava::is_hex`]) the `#hex` text as written.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// Whether the value was written as `#hex` (a BER encoding, RFC 4514 §2.4).
    pub fn is_hex(&self) -> bool {
        self.hex
    }

    /// The decoded BER bytes of a `#hex` value, or `None` for a string value.
    pub fn ber(&self) -> Option<Vec<u8>> {
        if !self.hex {
            return None;
        }
        let digits = self.value.as_bytes().get(1..)?;
        Some(
            digits
                .chunks(2)
                .map(|p| match p {
                    [h, l] => hex_val(*h) * 16 + hex_val(*l),
                    [h] => hex_val(*h),
                    _ => 0,
                })
                .collect(),
        )
    }

    fn write_norm(&self, out: &mut String) {
        write_norm_attr(out, &self.attr);
        out.push('=');
        if self.hex {
            out.extend(self.value.chars().map(|c| c.to_ascii_lowercase()));
        } else {
            write_norm_value(out, &self.value);
        }
    }

    fn normalized(&self) -> String {
        let mut s = String::with_capacity(self.attr.len() + self.value.len() + 1);
        self.write_norm(&mut s);
        s
    }
}

impl fmt::Display for Ava {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.attr)?;
        f.write_char('=')?;
        if self.hex {
            f.write_str(&self.value)
        } else {
            write_escaped(f, &self.value)
        }
    }
}

impl PartialEq for Ava {
    fn eq(&self, other: &Ava) -> bool {
        self.normalized() == other.normalized()
    }
}

impl Eq for Ava {}

impl Hash for Ava {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.normalized().hash(state);
    }
}

#[derive(Debug, Clone)]
enum Avas {
    One(Ava),
    Many(Box<[Ava]>),
}

/// A relative distinguished name: one or more attribute-value assertions joined by `+`.
///
/// Displays in escaped RFC 4514 form. Equality and hashing follow the normalization rules of this
/// module (they build the normalized text; comparing whole [`Dn`]s does not).
#[derive(Debug, Clone)]
pub struct Rdn {
    avas: Avas,
}

impl Rdn {
    /// A single-valued RDN. `value` is the unescaped value; `attr` should be a valid attribute
    /// type (a leading `OID.` is dropped) — use [`Rdn::try_new`] to have it checked.
    pub fn new(attr: &str, value: &str) -> Rdn {
        Rdn {
            avas: Avas::One(Ava::new(attr, value)),
        }
    }

    /// Like [`Rdn::new`], but returns an error if `attr` is not a valid attribute type.
    pub fn try_new(attr: &str, value: &str) -> Result<Rdn, DnError> {
        Ok(Rdn {
            avas: Avas::One(Ava::try_new(attr, value)?),
        })
    }

    /// A (possibly multi-valued) RDN from its assertions, or `None` if there are none.
    pub fn from_avas(avas: Vec<Ava>) -> Option<Rdn> {
        let avas = match avas.len() {
            0 => return None,
            1 => Avas::One(avas.into_iter().next()?),
            _ => Avas::Many(avas.into_boxed_slice()),
        };
        Some(Rdn { avas })
    }

    /// The attribute-value assertions, in the order written.
    pub fn avas(&self) -> &[Ava] {
        match &self.avas {
            Avas::One(a) => std::slice::from_ref(a),
            Avas::Many(m) => m,
        }
    }

    /// The attribute type of the first assertion.
    pub fn attr(&self) -> &str {
        // An RDN always has at least one assertion (`from_avas` and the parser ensure it).
        self.avas().first().map_or("", Ava::attr)
    }

    /// The unescaped value of the first assertion.
    pub fn value(&self) -> &str {
        self.avas().first().map_or("", Ava::value)
    }

    /// Whether this RDN has more than one assertion (`cn=a+sn=b`).
    pub fn is_multi_valued(&self) -> bool {
        self.avas().len() > 1
    }

    fn write_norm(&self, out: &mut String) {
        match &self.avas {
            Avas::One(a) => a.write_norm(out),
            Avas::Many(m) => {
                let mut parts: Vec<String> = m.iter().map(Ava::normalized).collect();
                parts.sort_unstable();
                for (i, p) in parts.iter().enumerate() {
                    if i > 0 {
                        out.push('+');
                    }
                    out.push_str(p);
                }
            }
        }
    }

    /// The normalized text of this RDN (what equality compares).
    pub fn normalized(&self) -> String {
        let mut s = String::new();
        self.write_norm(&mut s);
        s
    }
}

impl fmt::Display for Rdn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.avas().iter().enumerate() {
            if i > 0 {
                f.write_char('+')?;
            }
            fmt::Display::fmt(a, f)?;
        }
        Ok(())
    }
}

impl PartialEq for Rdn {
    fn eq(&self, other: &Rdn) -> bool {
        self.normalized() == other.normalized()
    }
}

impl Eq for Rdn {}

impl Hash for Rdn {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.normalized().hash(state);
    }
}

impl FromStr for Rdn {
    type Err = DnError;

    /// Parses exactly one RDN (`cn=a` or `cn=a+sn=b`).
    fn from_str(s: &str) -> Result<Rdn, DnError> {
        let mut p = Parser::new(s);
        p.skip_spaces();
        if p.at_end() {
            return Err(DnError::at(s, p.i, "empty RDN"));
        }
        let rdn = p.parse_rdn()?;
        if !p.at_end() {
            return Err(DnError::at(
                s,
                p.i,
                "expected exactly one RDN, found a separator; parse a whole DN with `Dn::parse`",
            ));
        }
        Ok(rdn)
    }
}

// ---------------------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------------------

struct Parser<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
    scratch: Vec<u8>,
}

impl<'a> Parser<'a> {
    fn new(s: &'a str) -> Parser<'a> {
        Parser {
            s,
            b: s.as_bytes(),
            i: 0,
            scratch: Vec::new(),
        }
    }

    fn at_end(&self) -> bool {
        self.i >= self.b.len()
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn skip_spaces(&mut self) {
        while self.peek() == Some(b' ') {
            self.i += 1;
        }
    }

    fn err(&self, at: usize, message: impl Into<String>) -> DnError {
        DnError::at(self.s, at, message)
    }

    /// Parses an RDN; stops at a `,` or `;` separator or at the end, spaces skipped.
    fn parse_rdn(&mut self) -> Result<Rdn, DnError> {
        let first = self.parse_ava()?;
        self.skip_spaces();
        if self.peek() != Some(b'+') {
            return Ok(Rdn {
                avas: Avas::One(first),
            });
        }
        let mut avas = vec![first];
        while self.peek() == Some(b'+') {
            self.i += 1;
            self.skip_spaces();
            avas.push(self.parse_ava()?);
            self.skip_spaces();
        }
        Ok(Rdn {
            avas: Avas::Many(avas.into_boxed_slice()),
        })
    }

    fn parse_ava(&mut self) -> Result<Ava, DnError> {
        let start = self.i;
        while let Some(b) = self.peek() {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'.' {
                self.i += 1;
            } else {
                break;
            }
        }
        if self.i == start {
            return Err(match self.peek() {
                None => self.err(start, "expected an attribute type, found the end"),
                Some(b'+') => self.err(start, "empty attribute-value assertion after '+'"),
                Some(_) => self.err(
                    start,
                    "expected an attribute type (a name such as `cn` or an OID)",
                ),
            });
        }
        let raw = self.s.get(start..self.i).unwrap_or("");
        let attr = check_attr_type(raw).map_err(|m| self.err(start, m))?;
        self.skip_spaces();
        if self.peek() != Some(b'=') {
            return Err(self.err(
                self.i,
                format!("expected '=' after attribute type \"{raw}\""),
            ));
        }
        self.i += 1;
        self.skip_spaces();
        if self.peek() == Some(b'#') {
            let value = self.parse_hex()?;
            return Ok(Ava {
                attr: SmolStr::new(attr),
                value: SmolStr::new(value),
                hex: true,
            });
        }
        self.parse_string()?;
        let value = std::str::from_utf8(&self.scratch)
            .map_err(|_| self.err(start, "value is not valid UTF-8"))?;
        Ok(Ava {
            attr: SmolStr::new(attr),
            value: SmolStr::new(value),
            hex: false,
        })
    }

    /// Parses `#hex` (the `#` is at `self.i`) and returns the text including the `#`.
    fn parse_hex(&mut self) -> Result<&'a str, DnError> {
        let start = self.i;
        self.i += 1;
        while self.peek().is_some_and(|b| b.is_ascii_hexdigit()) {
            self.i += 1;
        }
        let digits = self.i - start - 1;
        if digits == 0 || digits % 2 == 1 {
            return Err(self.err(
                self.i,
                "a value starting with '#' is a BER encoding and needs an even number of hex \
                 digits; write a literal leading '#' as '\\#'",
            ));
        }
        let end = self.i;
        self.skip_spaces();
        match self.peek() {
            None | Some(b',' | b';' | b'+') => Ok(self.s.get(start..end).unwrap_or("")),
            Some(_) => Err(self.err(
                self.i,
                "unexpected character after a '#' hex value; expected ',', '+' or the end",
            )),
        }
    }

    /// Parses a string value into `self.scratch` (unescaped, unescaped trailing spaces removed).
    fn parse_string(&mut self) -> Result<(), DnError> {
        self.scratch.clear();
        let b = self.b;
        // Length of the value up to its last significant (non-space or escaped) byte.
        let mut keep = 0;
        // A run of `\XX` escapes: (offset in scratch, byte offset in input) of its first escape.
        let mut run: Option<(usize, usize)> = None;
        while let Some(c) = self.peek() {
            match c {
                b',' | b';' | b'+' => break,
                b'\\' => {
                    let at = self.i;
                    match b.get(at + 1).copied() {
                        None => {
                            return Err(self.err(
                                at,
                                "a '\\' at the end of the text must be followed by a special \
                                 character or two hex digits",
                            ))
                        }
                        Some(h) if h.is_ascii_hexdigit() => {
                            let Some(l) = b.get(at + 2).copied().filter(u8::is_ascii_hexdigit)
                            else {
                                return Err(self.err(at, "expected two hex digits after '\\'"));
                            };
                            if run.is_none() {
                                run = Some((self.scratch.len(), at));
                            }
                            self.scratch.push(hex_val(h) * 16 + hex_val(l));
                            self.i += 3;
                        }
                        Some(e) if is_escapable(e) => {
                            self.flush_run(&mut run)?;
                            self.scratch.push(e);
                            self.i += 2;
                        }
                        Some(_) => {
                            return Err(self.err(
                                at,
                                "invalid escape: '\\' may only precede one of \
                                 `\" + , ; < > # = \\`, a space, or two hex digits",
                            ))
                        }
                    }
                    keep = self.scratch.len();
                }
                0 => return Err(self.err(self.i, "a NUL character must be escaped as '\\00'")),
                b' ' => {
                    self.flush_run(&mut run)?;
                    self.scratch.push(b' ');
                    self.i += 1;
                }
                _ => {
                    self.flush_run(&mut run)?;
                    let st = self.i;
                    while self
                        .peek()
                        .is_some_and(|c| !matches!(c, b',' | b';' | b'+' | b'\\' | 0 | b' '))
                    {
                        self.i += 1;
                    }
                    self.scratch
                        .extend_from_slice(b.get(st..self.i).unwrap_or(&[]));
                    keep = self.scratch.len();
                }
            }
        }
        self.flush_run(&mut run)?;
        self.scratch.truncate(keep);
        Ok(())
    }

    /// Checks that the bytes of a finished run of `\XX` escapes form valid UTF-8.
    fn flush_run(&self, run: &mut Option<(usize, usize)>) -> Result<(), DnError> {
        if let Some((from, at)) = run.take() {
            let bytes = self.scratch.get(from..).unwrap_or(&[]);
            if let Err(e) = std::str::from_utf8(bytes) {
                return Err(self.err(
                    at + 3 * e.valid_up_to(),
                    "the escaped bytes are not valid UTF-8 (each '\\XX' is one byte of a UTF-8 \
                     sequence)",
                ));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Dn
// ---------------------------------------------------------------------------------------------

/// A parsed distinguished name: a sequence of RDNs, most specific first (as written).
///
/// Keeps the text it was parsed from (see [`Dn::as_str`]) and a normalized form (see
/// [`Dn::normalized`] and the [module documentation](self)); `==`, `Ord` and `Hash` use only the
/// normalized form and never allocate. Serializes as its text; deserializing parses.
///
/// ```
/// use dirsync::model::Dn;
/// let a = Dn::parse("CN=Smith\\, John , OU=Sales;DC=Example").unwrap();
/// let b: Dn = "cn=smith\\, john,ou=sales,dc=example".parse().unwrap();
/// assert_eq!(a, b);
/// assert_eq!(a.rdn().unwrap().value(), "Smith, John");
/// assert_eq!(a.parent().unwrap().as_str(), "OU=Sales;DC=Example");
/// ```
///
/// The parts are shared: cloning a `Dn` is a reference-count increment. A parsed DN keeps its
/// text, its normalized form and the number of its RDNs; the RDNs themselves are parsed from the
/// text again when first asked for ([`Dn::rdns`], [`Dn::rdn`], [`Dn::parent`]'s), then kept. A
/// million parsed DNs (a large group's members) take a third of the memory they would otherwise.
#[derive(Clone)]
pub struct Dn(Arc<DnParts>);

/// The immutable parts of a [`Dn`].
struct DnParts {
    text: Box<str>,
    /// `None` when the normalized form is the text itself.
    norm: Option<Box<str>>,
    /// The number of RDNs.
    len: usize,
    /// The RDNs, parsed from `text` again when first asked for: a parsed DN keeps only its two
    /// texts (most DNs, references above all, are compared and hashed, never taken apart).
    rdns: OnceLock<Box<[Rdn]>>,
}

impl DnParts {
    fn new(text: Box<str>, norm: Option<Box<str>>, rdns: Option<Box<[Rdn]>>, len: usize) -> Self {
        let lazy = OnceLock::new();
        if let Some(rdns) = rdns {
            let _ = lazy.set(rdns);
        }
        DnParts {
            text,
            norm,
            len,
            rdns: lazy,
        }
    }

    fn rdns(&self) -> &[Rdn] {
        // The text parsed once; should it not again, the DN reads as having no RDNs.
        self.rdns
            .get_or_init(|| parse_rdns(&self.text).unwrap_or_default())
    }
}

impl Dn {
    /// Parses an RFC 4514 DN string. The empty string (or only spaces) is the root DN.
    ///
    /// Accepts `\` followed by a special character or by two hex digits (the bytes of a run of
    /// such escapes must be UTF-8), `#hex` BER values, spaces around `,` `+` `=`, `;` as a legacy
    /// separator and multi-valued RDNs joined with `+`. Unescaped `"`, `<`, `>` and `=` inside a
    /// value are tolerated.
    pub fn parse(s: &str) -> Result<Dn, DnError> {
        let rdns = parse_rdns(s)?;
        // The RDNs are dropped: `rdns()` parses the text again if asked.
        Ok(Dn::assemble(Box::from(s), rdns, false))
    }

    /// Builds the normalized form for `rdns` and stores it unless it equals `text`; keeps
    /// `rdns` when `keep`.
    fn assemble(text: Box<str>, rdns: Box<[Rdn]>, keep: bool) -> Dn {
        let mut norm = String::with_capacity(text.len());
        for (i, r) in rdns.iter().enumerate() {
            if i > 0 {
                norm.push(',');
            }
            r.write_norm(&mut norm);
        }
        let norm = (norm != *text).then(|| norm.into_boxed_str());
        let len = rdns.len();
        Dn(Arc::new(DnParts::new(
            text,
            norm,
            keep.then_some(rdns),
            len,
        )))
    }

    /// The root (empty) DN, `""`.
    pub fn root() -> Dn {
        Dn(Arc::new(DnParts::new(
            Box::from(""),
            None,
            Some(Box::new([])),
            0,
        )))
    }

    /// A DN from its RDNs, most specific first; the text is their escaped RFC 4514 form.
    pub fn from_rdns(rdns: impl IntoIterator<Item = Rdn>) -> Dn {
        let rdns: Box<[Rdn]> = rdns.into_iter().collect();
        let mut text = String::new();
        for (i, r) in rdns.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            let _ = write!(text, "{r}");
        }
        Dn::assemble(text.into_boxed_str(), rdns, true)
    }

    /// Whether this is the root (empty) DN.
    pub fn is_root(&self) -> bool {
        self.0.len == 0
    }

    /// The most specific RDN (the first one written), or `None` for the root.
    pub fn rdn(&self) -> Option<&Rdn> {
        self.0.rdns().first()
    }

    /// All RDNs, most specific first.
    pub fn rdns(&self) -> &[Rdn] {
        self.0.rdns()
    }

    /// The DN one level up (keeping the original spelling), or `None` for the root.
    pub fn parent(&self) -> Option<Dn> {
        match self.0.len {
            0 => None,
            1 => Some(Dn::root()),
            _ => {
                let (Some(text), Some(norm)) = (
                    after_first_separator(&self.0.text, true),
                    after_first_separator(self.normalized(), false),
                ) else {
                    return Some(Dn::from_rdns(self.rdns().get(1..).unwrap_or(&[]).to_vec()));
                };
                // The parent's text parses to this DN's RDNs but the first: they are copied
                // when this DN holds them, else parsed when asked for.
                let rdns = self.0.rdns.get().map(|r| r.get(1..).unwrap_or(&[]).into());
                let norm = (norm != text).then(|| Box::from(norm));
                Some(Dn(Arc::new(DnParts::new(
                    Box::from(text),
                    norm,
                    rdns,
                    self.0.len - 1,
                ))))
            }
        }
    }

    /// The DN of a child of this one: `rdn` followed by this DN.
    pub fn child(&self, rdn: Rdn) -> Dn {
        let mut text = rdn.to_string();
        let mut norm = rdn.normalized();
        if !self.is_root() {
            text.push(',');
            text.push_str(&self.0.text);
            norm.push(',');
            norm.push_str(self.normalized());
        }
        let mut rdns = Vec::with_capacity(self.0.len + 1);
        rdns.push(rdn);
        rdns.extend_from_slice(self.0.rdns());
        let norm = (norm != text).then(|| norm.into_boxed_str());
        let len = rdns.len();
        Dn(Arc::new(DnParts::new(
            text.into_boxed_str(),
            norm,
            Some(rdns.into_boxed_slice()),
            len,
        )))
    }

    /// Whether `ancestor` is a strict ancestor of this DN (a DN is not its own descendant; every
    /// DN except the root descends from the root).
    pub fn is_descendant_of(&self, ancestor: &Dn) -> bool {
        if self.0.len <= ancestor.0.len {
            return false;
        }
        let (me, anc) = (self.normalized(), ancestor.normalized());
        if anc.is_empty() {
            return true;
        }
        if me.len() <= anc.len() || !me.ends_with(anc) {
            return false;
        }
        let cut = me.len() - anc.len() - 1;
        me.as_bytes().get(cut) == Some(&b',') && is_unescaped(me.as_bytes(), cut)
    }

    /// The number of RDNs (0 for the root).
    pub fn len(&self) -> usize {
        self.0.len
    }

    /// Whether this DN has no RDNs (is the root).
    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }

    /// This DN renamed: same parent, new RDN. For the root, the DN made of `rdn` alone.
    pub fn with_rdn(&self, rdn: Rdn) -> Dn {
        match self.parent() {
            Some(p) => p.child(rdn),
            None => Dn::root().child(rdn),
        }
    }

    /// This DN moved under `new_parent`, keeping its RDN. The root has no RDN: moving it gives
    /// `new_parent`.
    pub fn move_to(&self, new_parent: &Dn) -> Dn {
        match self.rdn() {
            Some(r) => new_parent.child(r.clone()),
            None => new_parent.clone(),
        }
    }

    /// The text as given to [`Dn::parse`], or as built by [`Dn::child`] and friends.
    pub fn as_str(&self) -> &str {
        &self.0.text
    }

    /// The normalized form that equality, ordering and hashing use; itself a valid DN string.
    pub fn normalized(&self) -> &str {
        self.0.norm.as_deref().unwrap_or(&self.0.text)
    }
}

/// Parses the RDNs of a DN string in one pass.
fn parse_rdns(s: &str) -> Result<Box<[Rdn]>, DnError> {
    let mut p = Parser::new(s);
    p.skip_spaces();
    if p.at_end() {
        return Ok(Box::new([]));
    }
    // Room for one RDN per separator (an escaped one gives one too many): no regrowth.
    let mut rdns = Vec::with_capacity(1 + memchr::memchr2_iter(b',', b';', s.as_bytes()).count());
    // A value is never longer than the text.
    p.scratch.reserve(s.len());
    loop {
        match p.peek() {
            None | Some(b',' | b';') => return Err(p.err(p.i, "empty RDN")),
            Some(_) => rdns.push(p.parse_rdn()?),
        }
        match p.peek() {
            None => return Ok(rdns.into_boxed_slice()),
            Some(b',' | b';') => {
                p.i += 1;
                p.skip_spaces();
            }
            Some(_) => return Err(p.err(p.i, "expected ',' between RDNs")),
        }
    }
}

/// Whether the byte at `pos` is preceded by an even number of backslashes.
fn is_unescaped(b: &[u8], pos: usize) -> bool {
    let before = b.get(..pos).unwrap_or(&[]);
    before.iter().rev().take_while(|c| **c == b'\\').count() % 2 == 0
}

/// The text after the first RDN separator (`,`, or `;` when `semicolon`), leading spaces skipped.
fn after_first_separator(s: &str, semicolon: bool) -> Option<&str> {
    let b = s.as_bytes();
    let pos = b
        .iter()
        .enumerate()
        .position(|(i, c)| (*c == b',' || (semicolon && *c == b';')) && is_unescaped(b, i))?;
    Some(s.get(pos + 1..)?.trim_start_matches(' '))
}

impl Default for Dn {
    fn default() -> Dn {
        Dn::root()
    }
}

impl PartialEq for Dn {
    fn eq(&self, other: &Dn) -> bool {
        self.normalized() == other.normalized()
    }
}

impl Eq for Dn {}

impl Hash for Dn {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.normalized().hash(state);
    }
}

impl PartialOrd for Dn {
    fn partial_cmp(&self, other: &Dn) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Dn {
    fn cmp(&self, other: &Dn) -> Ordering {
        self.normalized().cmp(other.normalized())
    }
}

impl fmt::Display for Dn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.text)
    }
}

impl fmt::Debug for Dn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dn({:?})", &*self.0.text)
    }
}

impl FromStr for Dn {
    type Err = DnError;

    fn from_str(s: &str) -> Result<Dn, DnError> {
        Dn::parse(s)
    }
}

impl TryFrom<&str> for Dn {
    type Error = DnError;

    fn try_from(s: &str) -> Result<Dn, DnError> {
        Dn::parse(s)
    }
}

impl TryFrom<String> for Dn {
    type Error = DnError;

    /// Parses `s`, reusing its allocation for the kept text.
    fn try_from(s: String) -> Result<Dn, DnError> {
        let rdns = parse_rdns(&s)?;
        Ok(Dn::assemble(s.into_boxed_str(), rdns, false))
    }
}

impl serde::Serialize for Dn {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0.text)
    }
}

impl<'de> serde::Deserialize<'de> for Dn {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Dn, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Dn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 4514 distinguished name string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Dn, E> {
                Dn::parse(v).map_err(E::custom)
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Dn, E> {
                Dn::try_from(v).map_err(E::custom)
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
    use std::collections::hash_map::DefaultHasher;

    fn dn(s: &str) -> Dn {
        Dn::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    fn hash_of<T: Hash>(v: &T) -> u64 {
        let mut h = DefaultHasher::new();
        v.hash(&mut h);
        h.finish()
    }

    fn err(s: &str) -> DnError {
        match Dn::parse(s) {
            Ok(d) => panic!("{s:?} parsed as {d:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn rfc4514_simple() {
        let d = dn("UID=jsmith,DC=example,DC=net");
        assert_eq!(d.len(), 3);
        assert_eq!(d.rdn().unwrap().attr(), "UID");
        assert_eq!(d.rdn().unwrap().value(), "jsmith");
        assert_eq!(d.normalized(), "uid=jsmith,dc=example,dc=net");
        assert_eq!(d.as_str(), "UID=jsmith,DC=example,DC=net");
        assert_eq!(d.to_string(), "UID=jsmith,DC=example,DC=net");
        let values: Vec<_> = d.rdns().iter().map(Rdn::value).collect();
        assert_eq!(values, ["jsmith", "example", "net"]);
    }

    #[test]
    fn rfc4514_multi_valued() {
        let d = dn("OU=Sales+CN=J.  Smith,DC=example,DC=net");
        let rdn = d.rdn().unwrap();
        assert!(rdn.is_multi_valued());
        let avas: Vec<_> = rdn.avas().iter().map(|a| (a.attr(), a.value())).collect();
        assert_eq!(avas, [("OU", "Sales"), ("CN", "J.  Smith")]);
        assert_eq!((rdn.attr(), rdn.value()), ("OU", "Sales"));
        assert_eq!(d.normalized(), "cn=j.  smith+ou=sales,dc=example,dc=net");
        assert_eq!(d, dn("cn = j.  SMITH + ou=sales , dc=example;dc=net"));
        assert_ne!(d, dn("OU=Sales+CN=J. Smith,DC=example,DC=net"));
        assert_eq!(rdn.to_string(), "OU=Sales+CN=J.  Smith");
    }

    #[test]
    fn rfc4514_escapes() {
        let d = dn(r#"CN=James \"Jim\" Smith\, III,DC=example,DC=net"#);
        assert_eq!(d.rdn().unwrap().value(), r#"James "Jim" Smith, III"#);
        assert_eq!(d.len(), 3);
        assert_eq!(
            d.rdn().unwrap().to_string(),
            r#"CN=James \"Jim\" Smith\, III"#
        );

        let d = dn(r"CN=Before\0dAfter,DC=example,DC=net");
        assert_eq!(d.rdn().unwrap().value(), "Before\rAfter");

        let d = dn(r"CN=Lu\C4\8Di\C4\87");
        assert_eq!(d.rdn().unwrap().value(), "Lučić");
        assert_eq!(d, dn("cn=LUČIĆ"));
        assert_eq!(d.normalized(), "cn=lučić");

        let d = dn(r"cn=\ \#a\=\+\;\<\>\\b\ ");
        assert_eq!(d.rdn().unwrap().value(), r" #a=+;<>\b ");
        assert_eq!(dn("cn=a=b\"<>").rdn().unwrap().value(), "a=b\"<>");
        assert_eq!(dn("cn=  a b  ,dc=x").rdn().unwrap().value(), "a b");
        assert_eq!(dn(r"cn=  a b\  ,dc=x").rdn().unwrap().value(), "a b ");
        assert_eq!(dn("cn=,dc=x").rdn().unwrap().value(), "");
    }

    #[test]
    fn rfc4514_hex_value() {
        let d = dn("1.3.6.1.4.1.1466.0=#04024869,DC=example,DC=com");
        let ava = &d.rdn().unwrap().avas()[0];
        assert_eq!(ava.attr(), "1.3.6.1.4.1.1466.0");
        assert!(ava.is_hex());
        assert_eq!(ava.value(), "#04024869");
        assert_eq!(ava.ber(), Some(vec![0x04, 0x02, 0x48, 0x69]));
        assert_eq!(d.rdn().unwrap().to_string(), "1.3.6.1.4.1.1466.0=#04024869");
        assert_eq!(d, dn("1.3.6.1.4.1.1466.0 = #04024869 ,dc=EXAMPLE,dc=com"));
        assert_eq!(dn("cn=#4A"), dn("cn=#4a"));
        assert_eq!(dn("cn=#4a").normalized(), "cn=#4a");
        assert_ne!(dn("cn=#4a"), dn(r"cn=\#4a"));
        assert_ne!(dn("cn=#41"), dn("cn=A"));
        assert_eq!(Ava::new("cn", "x").ber(), None);
    }

    #[test]
    fn root_dn() {
        for s in ["", "   "] {
            let d = dn(s);
            assert!(d.is_root() && d.is_empty());
            assert_eq!(d, Dn::root());
            assert_eq!(d.len(), 0);
            assert_eq!(d.rdn(), None);
            assert_eq!(d.parent(), None);
            assert_eq!(d.normalized(), "");
        }
        assert_eq!(Dn::root().as_str(), "");
        assert_eq!(Dn::default(), Dn::root());
        assert!(!Dn::root().is_descendant_of(&Dn::root()));
        assert_eq!(Dn::root().child(Rdn::new("dc", "com")).as_str(), "dc=com");
        assert_eq!(Dn::root().with_rdn(Rdn::new("dc", "com")), dn("dc=com"));
        assert_eq!(Dn::root().move_to(&dn("dc=com")), dn("dc=com"));
    }

    #[test]
    fn error_display_and_positions() {
        let e = err("cn=a,,dc=x");
        assert_eq!(
            e.to_string(),
            r#"invalid DN "cn=a,,dc=x" at position 5: empty RDN"#
        );
        assert_eq!(
            (e.input(), e.position(), e.message()),
            ("cn=a,,dc=x", 5, "empty RDN")
        );

        let cases: &[(&str, usize, &str)] = &[
            (",cn=a", 0, "empty RDN"),
            ("cn=a,", 5, "empty RDN"),
            ("cn=a;", 5, "empty RDN"),
            ("cn=a, ;dc=x", 6, "empty RDN"),
            ("cn", 2, "expected '='"),
            ("c n=a", 2, "expected '='"),
            ("a_b=x", 1, "expected '='"),
            ("=a", 0, "attribute type"),
            ("1cn=a", 0, "numeric OID"),
            ("2=x", 0, "at least two numbers"),
            ("2.5.04.3=x", 0, "leading zeros"),
            ("oid.cn=x", 0, "numeric OID"),
            ("cn-=a,x.y=b", 6, "invalid attribute type"),
            ("cn=a+", 5, "found the end"),
            ("cn=a++sn=b", 5, "after '+'"),
            ("cn=a\\", 4, "'\\'"),
            ("cn=a\\zz", 4, "invalid escape"),
            ("cn=a\\4", 4, "two hex digits"),
            ("cn=a\\4x", 4, "two hex digits"),
            ("cn=#", 4, "even number"),
            ("cn=#0", 5, "even number"),
            ("cn=#0g", 5, "even number"),
            ("cn=#00 x", 7, "after a '#' hex value"),
            ("cn=\\C4", 3, "not valid UTF-8"),
            ("cn=a\\C4\\C4", 4, "not valid UTF-8"),
            ("cn=\\41\\C4x", 6, "not valid UTF-8"),
            ("cn=\\C4é", 3, "not valid UTF-8"),
            ("cn=a\0b", 4, "NUL"),
            ("cn=é,=x", 5, "attribute type"),
            ("cn=ééé\\q", 6, "invalid escape"),
        ];
        for (input, pos, msg) in cases {
            let e = err(input);
            assert_eq!(e.position(), *pos, "{input:?}: {e}");
            assert!(e.message().contains(msg), "{input:?}: {e}");
            assert_eq!(e.input(), *input);
        }
    }

    #[test]
    fn attribute_types() {
        let d = dn("OID.2.5.4.3=x");
        assert_eq!(d.rdn().unwrap().attr(), "2.5.4.3");
        assert_eq!(d, dn("2.5.4.3=X"));
        assert_ne!(d, dn("cn=x"));
        assert_eq!(dn("x-Custom-1=v").normalized(), "x-custom-1=v");
        assert_eq!(Rdn::new("oid.2.5.4.3", "v").attr(), "2.5.4.3");
        assert!(Rdn::try_new("cn", "v").is_ok());
        let e = Rdn::try_new("c n", "v").unwrap_err();
        assert!(e.message().contains("invalid attribute type"), "{e}");
        assert!(Ava::try_new("", "v").is_err());
    }

    #[test]
    fn navigation() {
        let d = dn("CN=John Smith , OU=Users;DC=Example,DC=com");
        let p = d.parent().unwrap();
        assert_eq!(p.as_str(), "OU=Users;DC=Example,DC=com");
        assert_eq!(p, dn("ou=users,dc=example,dc=com"));
        assert_eq!(p.normalized(), "ou=users,dc=example,dc=com");
        let gp = p.parent().unwrap();
        assert_eq!(gp.as_str(), "DC=Example,DC=com");
        assert_eq!(gp.parent().unwrap().as_str(), "DC=com");
        assert_eq!(gp.parent().unwrap().parent(), Some(Dn::root()));
        assert_eq!(d.rdn().unwrap().value(), "John Smith");
        assert_eq!(d.rdns()[1].value(), "Users");

        // Escaped separators are not separators.
        let e = dn(r"cn=a\,b\;c,ou=x\\,dc=y");
        assert_eq!(e.len(), 3);
        assert_eq!(e.parent().unwrap().as_str(), r"ou=x\\,dc=y");
        assert_eq!(e.parent().unwrap().parent().unwrap().as_str(), "dc=y");

        let base = dn("DC=Example,DC=com");
        assert!(d.is_descendant_of(&base));
        assert!(d.is_descendant_of(&p));
        assert!(d.is_descendant_of(&Dn::root()));
        assert!(!d.is_descendant_of(&d));
        assert!(!d.is_descendant_of(&dn("cn=john smith,ou=users,dc=example,dc=com")));
        assert!(!base.is_descendant_of(&d));
        assert!(!d.is_descendant_of(&dn("dc=other,dc=com")));
        assert!(!dn("cn=x,xdc=example,dc=com").is_descendant_of(&base));
        // The suffix text matches, but at an escaped comma inside a value.
        assert!(!dn(r"cn=x,cn=a\,dc=example,dc=com").is_descendant_of(&base));
        assert!(dn(r"cn=x,cn=a\\,dc=example,dc=com").is_descendant_of(&base));

        let c = base.child(Rdn::new("cn", "Smith, John"));
        assert_eq!(c.as_str(), r"cn=Smith\, John,DC=Example,DC=com");
        assert_eq!(c, dn(r"CN=smith\2C john,dc=example,dc=com"));
        assert_eq!(c.rdn().unwrap().value(), "Smith, John");
        assert_eq!(c.parent().unwrap(), base);
        assert!(c.is_descendant_of(&base));
        assert_eq!(c.len(), 3);

        let renamed = d.with_rdn(Rdn::new("cn", "Jane"));
        assert_eq!(renamed.as_str(), "cn=Jane,OU=Users;DC=Example,DC=com");
        assert_eq!(renamed.parent(), d.parent());

        let moved = d.move_to(&dn("ou=Former,dc=example,dc=com"));
        assert_eq!(moved.as_str(), "CN=John Smith,ou=Former,dc=example,dc=com");
        assert_eq!(moved.rdn(), d.rdn());
        assert_eq!(Dn::from_rdns(d.rdns().to_vec()), d);
    }

    #[test]
    fn a_parsed_dn_parses_its_rdns_when_asked() {
        let d = Dn::parse("CN=Smith\\, John , OU=Sales;DC=Example").unwrap();
        assert!(d.0.rdns.get().is_none(), "not kept by parse");
        assert_eq!(d.len(), 3);
        assert!(d.is_descendant_of(&Dn::parse("dc=example").unwrap()));
        let p = d.parent().unwrap();
        assert!(p.0.rdns.get().is_none(), "nor by parent");
        assert_eq!(p.as_str(), "OU=Sales;DC=Example");
        assert_eq!(p.len(), 2);
        assert_eq!(p.rdn().unwrap().value(), "Sales");
        assert_eq!(d.rdn().unwrap().value(), "Smith, John");
        assert!(d.0.rdns.get().is_some());
        // Once parsed, a parent copies them.
        assert_eq!(d.parent().unwrap().0.rdns.get().map(|r| r.len()), Some(2));
        let rebuilt = Dn::from_rdns(d.rdns().to_vec());
        assert_eq!(rebuilt, d);
        assert!(
            rebuilt.0.rdns.get().is_some(),
            "built from RDNs, it keeps them"
        );
        assert_eq!(
            Dn::try_from(String::from("cn=a,dc=b")).unwrap().rdns()[1].value(),
            "b"
        );
    }

    #[test]
    fn equality_normalization() {
        let a = dn("CN=John Smith,OU=Users,DC=Example,DC=COM");
        let b = dn("  cn = john smith ,ou=users ; dc=example,dc=com ");
        assert_eq!(a, b);
        assert_eq!(hash_of(&a), hash_of(&b));
        assert_eq!(a.cmp(&b), Ordering::Equal);
        assert_ne!(dn("cn=a  b"), dn("cn=a b"));
        assert_eq!(dn(r"cn=\ a\ "), dn("cn=a"));
        assert_eq!(dn(r"cn=A\,B"), dn(r"cn=a\2cb"));
        assert_eq!(dn("cn=ÄÖ"), dn("cn=äö"));
        assert_ne!(dn("cn=a"), dn("sn=a"));
        assert_ne!(dn("cn=a,dc=b"), dn("cn=a+dc=b"));
        assert_ne!(dn(r"cn=a\,dc=b"), dn("cn=a,dc=b"));
        assert_eq!(dn("cn=a+sn=b"), dn("sn=B + cn=A"));
        assert_eq!(hash_of(&dn("cn=a+sn=b")), hash_of(&dn("sn=B + cn=A")));
        assert_eq!(Rdn::new("CN", "X"), "cn=x".parse::<Rdn>().unwrap());
        assert_eq!(
            hash_of(&Rdn::new("CN", "X")),
            hash_of(&Rdn::new("cn", " x"))
        );
        assert_ne!(Rdn::new("cn", "x"), Rdn::new("cn", "y"));
        assert_eq!(Ava::new("CN", "X"), Ava::new("cn", "x"));

        let mut v = vec![dn("dc=b"), dn("DC=A"), dn("cn=x,dc=a")];
        v.sort();
        assert_eq!(v, [dn("cn=x,dc=a"), dn("dc=a"), dn("dc=b")]);
        // An already-normalized text does not store a second copy.
        assert!(dn("cn=x,dc=a").0.norm.is_none());
        assert!(dn("CN=x,dc=a").0.norm.is_some());
    }

    #[test]
    fn ad_tombstone_name() {
        let text =
            r"CN=Jane Doe\0ADEL:4a3b2c1d-0000-1111-2222-333344445555,CN=Deleted Objects,DC=x";
        let d = dn(text);
        assert_eq!(d.len(), 3);
        assert_eq!(
            d.rdn().unwrap().value(),
            "Jane Doe\nDEL:4a3b2c1d-0000-1111-2222-333344445555"
        );
        assert_eq!(d.parent().unwrap(), dn("cn=deleted objects,dc=x"));
        assert!(d.is_descendant_of(&dn("DC=x")));
        let rebuilt = Dn::from_rdns(d.rdns().to_vec());
        assert_eq!(rebuilt, d);
        assert_eq!(dn(rebuilt.as_str()), d);
    }

    #[test]
    fn escape_value_cases() {
        assert_eq!(escape_value(""), "");
        assert_eq!(escape_value(" "), r"\ ");
        assert_eq!(escape_value("  "), r"\ \ ");
        assert_eq!(escape_value("   "), r"\  \ ");
        assert_eq!(escape_value("#a#"), r"\#a#");
        assert_eq!(escape_value("a b"), "a b");
        assert_eq!(escape_value("\"+,;<>\\"), r#"\"\+\,\;\<\>\\"#);
        assert_eq!(escape_value("a\0b"), r"a\00b");
        assert_eq!(escape_value("é=ü"), "é=ü");
    }

    #[test]
    fn serde_and_conversions() {
        let d = dn("CN=a\\,b,DC=x");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, r#""CN=a\\,b,DC=x""#);
        let back: Dn = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.as_str(), d.as_str());
        let e = serde_json::from_str::<Dn>(r#""cn=a,,dc=x""#).unwrap_err();
        assert!(e.to_string().contains("empty RDN"), "{e}");
        assert_eq!(format!("{d:?}"), r#"Dn("CN=a\\,b,DC=x")"#);
        assert_eq!(
            Dn::try_from(String::from("CN=A,dc=x")).unwrap(),
            dn("cn=a,dc=x")
        );
        assert_eq!(Dn::try_from("cn=a").unwrap(), dn("CN=A"));
        assert!("cn=a,dc=b".parse::<Rdn>().is_err());
        assert!("".parse::<Rdn>().is_err());
        assert!(Rdn::from_avas(vec![]).is_none());
        let multi = Rdn::from_avas(vec![Ava::new("cn", "a"), Ava::new("sn", "b")]).unwrap();
        assert_eq!(multi.to_string(), "cn=a+sn=b");
    }

    // ---- property tests ----

    fn arb_value() -> impl Strategy<Value = String> {
        let special = prop::sample::select(vec![
            ' ', '#', ',', '+', ';', '"', '\\', '<', '>', '=', '\0', 'A', 'z', 'é', 'İ', '\n',
        ]);
        prop::collection::vec(prop_oneof![2 => any::<char>(), 3 => special], 0..12)
            .prop_map(|v| v.into_iter().collect())
    }

    fn arb_attr() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "cn",
            "CN",
            "ou",
            "Dc",
            "uid",
            "x-Attr-1",
            "2.5.4.3",
            "1.3.6.1.4.1.1466.0",
        ])
        .prop_map(String::from)
    }

    type Parts = Vec<Vec<(String, String)>>;

    fn arb_parts() -> impl Strategy<Value = Parts> {
        prop::collection::vec(prop::collection::vec((arb_attr(), arb_value()), 1..3), 0..5)
    }

    fn build(parts: &Parts) -> Dn {
        Dn::from_rdns(parts.iter().map(|avas| {
            Rdn::from_avas(avas.iter().map(|(a, v)| Ava::new(a, v)).collect()).unwrap()
        }))
    }

    /// The same DN written differently: other ASCII case, spaces around separators, `;`, and
    /// the assertions of each RDN in reverse order.
    fn variant(parts: &Parts) -> String {
        let rdns: Vec<String> = parts
            .iter()
            .map(|avas| {
                let avas: Vec<String> = avas
                    .iter()
                    .rev()
                    .map(|(a, v)| {
                        format!(
                            "{}  =  {}",
                            a.to_ascii_uppercase(),
                            escape_value(&v.to_ascii_uppercase())
                        )
                    })
                    .collect();
                avas.join(" + ")
            })
            .collect();
        format!("  {}  ", rdns.join(" ; "))
    }

    /// The normalized value as first written (one character at a time), which the run-copying
    /// [`write_norm_value`] must match byte for byte.
    fn norm_value_reference(value: &str) -> String {
        let mut out = String::new();
        let mut first = true;
        for c in value.trim_matches(' ').chars() {
            for l in c.to_lowercase() {
                match l {
                    '#' if first => out.push_str("\\#"),
                    '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                        out.push('\\');
                        out.push(l);
                    }
                    '\0' => out.push_str("\\00"),
                    _ => out.push(l),
                }
                first = false;
            }
        }
        out
    }

    #[test]
    fn normalized_values_match_the_reference() {
        for v in [
            "",
            " ",
            "#",
            " #a",
            "a#",
            "ABC def",
            "İstanbul",
            "\u{212a}elvin",
            "ß",
            "a\0b",
            "x,y+z;\"<>\\",
            "Émile Zola ",
            "#Ä",
            "ΣΑΣ",
            "mixed Ü and ascii",
        ] {
            let mut out = String::new();
            write_norm_value(&mut out, v);
            assert_eq!(out, norm_value_reference(v), "{v:?}");
        }
    }

    proptest! {
        #[test]
        fn normalized_value_matches_the_reference(v in any::<String>(), w in "[ #A-Za-z\"+,;<>\\\\\u{0}ÄäİΣ\u{212a} ]{0,12}") {
            for v in [&v, &w] {
                let mut out = String::new();
                write_norm_value(&mut out, v);
                prop_assert_eq!(out, norm_value_reference(v));
            }
        }

        #[test]
        fn escaped_value_round_trips(v in arb_value()) {
            let text = format!("cn={},dc=example", escape_value(&v));
            let d = Dn::parse(&text).unwrap();
            prop_assert_eq!(d.len(), 2);
            prop_assert_eq!(d.rdn().unwrap().value(), v.as_str());
            prop_assert_eq!(d.rdns()[1].value(), "example");
        }

        #[test]
        fn any_string_value_round_trips(v in any::<String>()) {
            let d = Dn::parse(&format!("cn={},dc=example", escape_value(&v))).unwrap();
            prop_assert_eq!(d.rdn().unwrap().value(), v.as_str());
        }

        #[test]
        fn display_parse_round_trip(parts in arb_parts()) {
            let d = build(&parts);
            let again = Dn::parse(&d.to_string()).unwrap();
            prop_assert_eq!(&again, &d);
            prop_assert_eq!(again.as_str(), d.as_str());
            prop_assert_eq!(again.len(), parts.len());
            for (rdn, avas) in again.rdns().iter().zip(&parts) {
                let got: Vec<&str> = rdn.avas().iter().map(Ava::value).collect();
                let want: Vec<&str> = avas.iter().map(|(_, v)| v.as_str()).collect();
                prop_assert_eq!(got, want);
            }
            // The normalized form is itself a DN that normalizes to itself.
            let n = Dn::parse(d.normalized()).unwrap();
            prop_assert_eq!(n.normalized(), d.normalized());
        }

        #[test]
        fn equal_dns_hash_equal(parts in arb_parts()) {
            let d = build(&parts);
            let v = Dn::parse(&variant(&parts)).unwrap();
            prop_assert_eq!(&v, &d);
            prop_assert_eq!(hash_of(&v), hash_of(&d));
            prop_assert_eq!(v.cmp(&d), Ordering::Equal);
            // Spaces around separators are not part of the values.
            for (rdn, avas) in v.rdns().iter().zip(&parts) {
                let got: Vec<&str> = rdn.avas().iter().map(Ava::value).collect();
                let want: Vec<String> = avas.iter().rev().map(|(_, x)| x.to_ascii_uppercase()).collect();
                prop_assert_eq!(got, want);
            }
        }

        #[test]
        fn navigation_is_consistent(parts in arb_parts(), leaf in arb_value()) {
            let d = build(&parts);
            prop_assert!(!d.is_descendant_of(&d));
            let mut anc = d.parent();
            let mut depth = d.len();
            while let Some(a) = anc {
                depth -= 1;
                prop_assert_eq!(a.len(), depth);
                prop_assert!(d.is_descendant_of(&a));
                prop_assert!(!a.is_descendant_of(&d));
                prop_assert_eq!(&Dn::parse(a.as_str()).unwrap(), &a);
                anc = a.parent();
            }
            let c = d.child(Rdn::new("cn", &leaf));
            prop_assert_eq!(c.parent().unwrap(), d.clone());
            prop_assert!(c.is_descendant_of(&d));
            prop_assert_eq!(Dn::parse(c.as_str()).unwrap(), c);
        }

        #[test]
        fn parse_never_panics(s in any::<String>()) {
            let _ = Dn::parse(&s);
        }

        #[test]
        fn parse_never_panics_dn_like(s in r#"[a-zA-Z0-9=,;+ \\#"<>.é\x00-]{0,40}"#) {
            if let Ok(d) = Dn::parse(&s) {
                // Whatever parses has a consistent normalized form and navigation.
                let n = Dn::parse(d.normalized()).unwrap();
                prop_assert_eq!(&n, &d);
                if let Some(p) = d.parent() {
                    prop_assert!(d.is_descendant_of(&p));
                    prop_assert_eq!(Dn::parse(p.as_str()).unwrap(), p);
                }
            } else {
                let e = Dn::parse(&s).unwrap_err();
                prop_assert!(e.position() <= s.chars().count());
            }
        }
    }
}
