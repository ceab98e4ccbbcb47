//! The .NET regular-expression dialect of the rule language (spec §9), compiled onto the `regex`
//! crate.
//!
//! Entra's expressions (`Replace`, spec §6) and scoping filters (`REGEX MATCH`, spec §7.2/§7.3) take
//! .NET patterns. This module accepts the .NET-compatible subset of spec §9, translates it in one
//! pass into the syntax of the `regex` crate (linear time, no backtracking) and rejects everything
//! outside the subset with a [`RegexError`] that names the construct and its character offset —
//! a pattern is never silently reinterpreted. It also implements .NET's replacement-string
//! language (`$1`, `${name}`, `$$`, `$&`) and .NET's match iteration (an empty match right after a
//! previous match counts).
//!
//! Where dirsync's reading differs from .NET's (all deliberate, spec §9 and §6):
//!
//! * `$` without `(?m)` matches only at the very end (.NET also before a final `\n`);
//! * `\_` is a literal `_` (spec: any non-alphanumeric ASCII character may be escaped; .NET
//!   rejects it);
//! * `\a`, `\e`, `\cX`, octal escapes, `(?#…)` comments, POSIX-style `[:name:]` and `\uD800`–
//!   `\uDFFF` surrogate escapes are errors — outside the subset;
//! * in replacement strings `` $` ``, `$'`, `$+` and `$_` are literal text.
//!
//! Pure: no I/O, no clock, no global state; no input makes it panic.

use std::fmt;

/// The largest compiled program a pattern may produce, in bytes (the `regex` crate's own default).
///
/// A pattern above it is a compile error ("pattern too large"). Unicode classes are big: `\w{1,200}`
/// still fits, `\w{1,250}` does not.
pub const SIZE_LIMIT: usize = 10 << 20;

/// A pattern outside the supported subset, or a malformed one.
///
/// `offset` is the 0-based **character** (not byte) offset in the pattern where the problem is —
/// for a construct, where the construct starts. For errors from [`DotNetRegex::check_replacement`]
/// it is the offset in the replacement string instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (at offset {offset})")]
pub struct RegexError {
    /// What is wrong, in one line, with a hint where one helps.
    pub message: String,
    /// 0-based character offset of the problem.
    pub offset: usize,
}

impl RegexError {
    fn new(offset: usize, message: impl Into<String>) -> RegexError {
        RegexError {
            message: message.into(),
            offset,
        }
    }
}

/// A compiled .NET-dialect regular expression (spec §9).
///
/// Matching is a search anywhere in the text (unanchored, like .NET `Regex.IsMatch`); anchor with
/// `^…$` to match a whole value. `$` without `(?m)` matches only at the very end of the text.
///
/// Group numbers follow .NET in replacement strings and [`group_index`](Self::group_index)
/// (unnamed groups are numbered first, left to right, then named groups), while
/// [`regex`](Self::regex) exposes the translated pattern whose capture indexes are plain
/// left-to-right; [`group_index`](Self::group_index) converts to the latter.
///
/// ```
/// use dirsync::rules::regex::DotNetRegex;
///
/// let re = DotNetRegex::new(r"(?<user>[^@]+)@(?<dom>.+)").unwrap();
/// assert!(re.is_match("jane.doe@contoso.com"));
/// assert_eq!(re.replace_all("jane.doe@contoso.com", "${dom}\\$1"), "contoso.com\\jane.doe");
///
/// // `\<` and `\>` are literal angle brackets, as in .NET.
/// assert!(DotNetRegex::new(r"\<b\>").unwrap().is_match("<b>"));
///
/// // Constructs outside the subset are errors with a character offset.
/// let err = DotNetRegex::new(r"ab(?=c)").unwrap_err();
/// assert_eq!(err.offset, 2);
/// ```
#[derive(Clone)]
pub struct DotNetRegex {
    pattern: String,
    regex: regex::Regex,
    /// Index into the translated regex's captures, by .NET group number (entry 0 = whole match).
    by_number: Vec<usize>,
    /// Named groups and their index into the translated regex's captures.
    names: Vec<(String, usize)>,
}

impl fmt::Debug for DotNetRegex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DotNetRegex")
            .field("pattern", &self.pattern)
            .field("translated", &self.regex.as_str())
            .finish()
    }
}

impl DotNetRegex {
    /// Compiles a .NET pattern. Constructs outside the subset of spec §9, malformed patterns and
    /// patterns whose compiled program exceeds [`SIZE_LIMIT`] are errors.
    pub fn new(pattern: &str) -> Result<DotNetRegex, RegexError> {
        let translated = Translator::new(pattern).translate()?;
        let regex = regex::RegexBuilder::new(&translated.pattern)
            .size_limit(SIZE_LIMIT)
            .build()
            .map_err(|e| crate_error(&e, &translated))?;
        if regex.captures_len() != translated.groups.len() + 1 {
            return Err(RegexError::new(
                0,
                "internal error: the translated pattern has a different number of groups",
            ));
        }
        let mut by_number = vec![0];
        let mut names = Vec::new();
        for (i, name) in translated.groups.iter().enumerate() {
            if name.is_none() {
                by_number.push(i + 1);
            }
        }
        for (i, name) in translated.groups.iter().enumerate() {
            if let Some(name) = name {
                by_number.push(i + 1);
                names.push((name.clone(), i + 1));
            }
        }
        Ok(DotNetRegex {
            pattern: pattern.to_owned(),
            regex,
            by_number,
            names,
        })
    }

    /// The .NET pattern as given to [`new`](Self::new).
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Whether the pattern matches anywhere in `text` (unanchored search).
    pub fn is_match(&self, text: &str) -> bool {
        self.regex.is_match(text)
    }

    /// The translated pattern, compiled by the `regex` crate. Its capture indexes are plain
    /// left-to-right; use [`group_index`](Self::group_index) to find a group.
    pub fn regex(&self) -> &regex::Regex {
        &self.regex
    }

    /// The index, in the captures of [`regex`](Self::regex), of the group `name`.
    ///
    /// `name` is a group name (case-sensitive, as in .NET) or, as .NET's `Groups["2"]` allows, a
    /// decimal .NET group number (`"0"` is the whole match). `None` if the pattern defines no such
    /// group.
    pub fn group_index(&self, name: &str) -> Option<usize> {
        if let Some((_, index)) = self.names.iter().find(|(n, _)| n == name) {
            return Some(*index);
        }
        if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
            let number: usize = name.parse().ok()?;
            return self.by_number.get(number).copied();
        }
        None
    }

    /// The matches of the pattern in `text` with their groups, left to right, as .NET finds them:
    /// after a non-empty match the search resumes at its end (so an empty match right there
    /// counts); after an empty match it resumes one character later.
    pub fn captures_iter<'r, 't>(&'r self, text: &'t str) -> CaptureMatches<'r, 't> {
        CaptureMatches {
            regex: &self.regex,
            text,
            next_start: Some(0),
        }
    }

    /// Replaces every match in `text` (found as [`captures_iter`](Self::captures_iter) does) by
    /// `dotnet_replacement`, with .NET `Regex.Replace` substitutions: `$n` / `${n}` numbered group
    /// (.NET numbering, digits read greedily: `$10` is group 10), `${name}` named group, `$&` and
    /// `$0` the whole match, `$$` a literal `$`. Every other `$` (including `` $` ``, `$'`, `$+`, `$_`
    /// — spec §6 keeps them literal) and every backslash are literal. As in .NET, a reference to a
    /// group the pattern does not define is literal text (`$10` with one group is the text `$10`);
    /// use [`check_replacement`](Self::check_replacement) to reject such references instead (spec
    /// §6). A group that did not participate in a match substitutes as empty.
    pub fn replace_all(&self, text: &str, dotnet_replacement: &str) -> String {
        self.replace_all_with(text, &self.replacement(dotnet_replacement))
    }

    /// Reads a .NET replacement string once (references to undefined groups are literal text,
    /// as in [`replace_all`](Self::replace_all)), for [`replace_all_with`](Self::replace_all_with)
    /// and [`replace_group_with`](Self::replace_group_with) to use many times.
    pub fn replacement(&self, dotnet_replacement: &str) -> Replacement {
        Replacement(
            self.parse_replacement(dotnet_replacement, false)
                .unwrap_or_default(),
        )
    }

    /// [`replace_all`](Self::replace_all) with a replacement read by
    /// [`replacement`](Self::replacement).
    pub fn replace_all_with(&self, text: &str, replacement: &Replacement) -> String {
        let mut out = String::with_capacity(text.len());
        let mut last = 0;
        for caps in self.captures_iter(text) {
            let Some(m) = caps.get(0) else { continue };
            out.push_str(&text[last..m.start()]);
            expand(&caps, &replacement.0, &mut out);
            last = m.end();
        }
        out.push_str(&text[last..]);
        out
    }

    /// Replaces, in every match in `text`, the text captured by the group at `group_index` (an
    /// index into [`regex`](Self::regex)'s captures, as [`group_index`](Self::group_index) returns)
    /// by `dotnet_replacement` (substitutions as in [`replace_all`](Self::replace_all), relative to
    /// that match). Matches in which the group did not participate are left as they are; so is all
    /// text outside the group. This is `Replace`'s group mode (spec §6).
    pub fn replace_group(
        &self,
        text: &str,
        group_index: usize,
        dotnet_replacement: &str,
    ) -> String {
        self.replace_group_with(text, group_index, &self.replacement(dotnet_replacement))
    }

    /// [`replace_group`](Self::replace_group) with a replacement read by
    /// [`replacement`](Self::replacement).
    pub fn replace_group_with(
        &self,
        text: &str,
        group_index: usize,
        replacement: &Replacement,
    ) -> String {
        let mut out = String::with_capacity(text.len());
        let mut last = 0;
        for caps in self.captures_iter(text) {
            let Some(g) = caps.get(group_index) else {
                continue;
            };
            out.push_str(&text[last..g.start()]);
            expand(&caps, &replacement.0, &mut out);
            last = g.end();
        }
        out.push_str(&text[last..]);
        out
    }

    /// Checks a replacement string against this pattern: every `$n`, `${n}` and `${name}` must
    /// name a group the pattern defines (spec §6: "a reference to an undefined group is an
    /// error"). The error's offset is the character offset of the `$` in `dotnet_replacement`.
    pub fn check_replacement(&self, dotnet_replacement: &str) -> Result<(), RegexError> {
        self.parse_replacement(dotnet_replacement, true).map(|_| ())
    }

    /// Parses a .NET replacement string into literal text and group references. When `strict`,
    /// a reference to an undefined group is an error; otherwise it is literal text, as in .NET.
    fn parse_replacement(&self, repl: &str, strict: bool) -> Result<Vec<Piece>, RegexError> {
        let chars: Vec<char> = repl.chars().collect();
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c != '$' {
                lit.push(c);
                i += 1;
                continue;
            }
            let reference = self.scan_dollar(&chars, i);
            match reference {
                Dollar::Literal(consumed) => {
                    lit.push('$');
                    i += consumed;
                }
                Dollar::Group(index, end) => {
                    if !lit.is_empty() {
                        pieces.push(Piece::Literal(std::mem::take(&mut lit)));
                    }
                    pieces.push(Piece::Group(index));
                    i = end;
                }
                Dollar::Undefined(what) => {
                    if strict {
                        return Err(RegexError::new(
                            i,
                            format!(
                                "the replacement refers to {what}, which the pattern does not \
                                 define; write $$ for a literal $"
                            ),
                        ));
                    }
                    lit.push('$');
                    i += 1;
                }
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Literal(lit));
        }
        Ok(pieces)
    }

    /// Reads the substitution starting at the `$` at `chars[at]` (.NET `ScanDollar`, limited to
    /// the substitutions of spec §6).
    fn scan_dollar(&self, chars: &[char], at: usize) -> Dollar {
        let Some(&next) = chars.get(at + 1) else {
            return Dollar::Literal(1);
        };
        match next {
            '$' => return Dollar::Literal(2),
            '&' => return Dollar::Group(0, at + 2),
            d if d.is_ascii_digit() => {
                let end = digits_end(chars, at + 1);
                return self.numbered(&chars[at + 1..end], end);
            }
            '{' if at + 2 < chars.len() => {
                let first = chars[at + 2];
                if first.is_ascii_digit() {
                    let end = digits_end(chars, at + 2);
                    if chars.get(end) == Some(&'}') {
                        return self.numbered(&chars[at + 2..end], end + 1);
                    }
                } else if is_word_char(first) {
                    let mut end = at + 2;
                    while end < chars.len() && is_word_char(chars[end]) {
                        end += 1;
                    }
                    if chars.get(end) == Some(&'}') {
                        let name: String = chars[at + 2..end].iter().collect();
                        return match self.names.iter().find(|(n, _)| *n == name) {
                            Some((_, index)) => Dollar::Group(*index, end + 1),
                            None => Dollar::Undefined(format!("group '{name}'")),
                        };
                    }
                }
            }
            _ => {}
        }
        Dollar::Literal(1)
    }

    fn numbered(&self, digits: &[char], end: usize) -> Dollar {
        let text: String = digits.iter().collect();
        match text
            .parse::<usize>()
            .ok()
            .and_then(|n| self.by_number.get(n))
        {
            Some(index) => Dollar::Group(*index, end),
            None => Dollar::Undefined(format!("group {text}")),
        }
    }
}

/// What a `$` in a replacement string stands for.
enum Dollar {
    /// A literal `$`; the number of characters consumed (the `$`, or `$$`).
    Literal(usize),
    /// A group reference: index into the captures and the offset just past the reference.
    Group(usize, usize),
    /// A well-formed reference to a group the pattern does not define (described for messages).
    Undefined(String),
}

/// A parsed replacement string.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Group(usize),
}

/// A .NET replacement string read once for one pattern: literal text and group references (see
/// [`DotNetRegex::replacement`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replacement(Vec<Piece>);

fn expand(caps: &regex::Captures<'_>, pieces: &[Piece], out: &mut String) {
    for piece in pieces {
        match piece {
            Piece::Literal(s) => out.push_str(s),
            Piece::Group(index) => {
                if let Some(m) = caps.get(*index) {
                    out.push_str(m.as_str());
                }
            }
        }
    }
}

fn digits_end(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() && chars[i].is_ascii_digit() {
        i += 1;
    }
    i
}

/// The matches of a [`DotNetRegex`] in a text, with .NET's iteration rule; see
/// [`DotNetRegex::captures_iter`].
#[derive(Debug)]
pub struct CaptureMatches<'r, 't> {
    regex: &'r regex::Regex,
    text: &'t str,
    /// Byte offset where the next search starts; `None` once exhausted.
    next_start: Option<usize>,
}

impl<'t> Iterator for CaptureMatches<'_, 't> {
    type Item = regex::Captures<'t>;

    fn next(&mut self) -> Option<regex::Captures<'t>> {
        let start = self.next_start?;
        let caps = self.regex.captures_at(self.text, start);
        let whole = caps.as_ref().and_then(|c| c.get(0));
        self.next_start = match whole {
            None => None,
            Some(m) if m.is_empty() => self.text[m.end()..]
                .chars()
                .next()
                .map(|c| m.end() + c.len_utf8()),
            Some(m) => Some(m.end()),
        };
        caps
    }
}

/// Escapes `literal` for the .NET dialect, as .NET `Regex.Escape` does: `\ * + ? | { [ ( ) ^ $ . #`
/// and white space get a backslash (tab, newline, carriage return, form feed and vertical tab
/// become `\t \n \r \f \v`). The result matches exactly `literal`, also under `(?x)`.
pub fn escape(literal: &str) -> String {
    let mut out = String::with_capacity(literal.len());
    for c in literal.chars() {
        match c {
            '\\' | '*' | '+' | '?' | '|' | '{' | '[' | '(' | ')' | '^' | '$' | '.' | '#' | ' ' => {
                out.push('\\');
                out.push(c);
            }
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\u{C}' => out.push_str("\\f"),
            '\u{B}' => out.push_str("\\v"),
            _ => out.push(c),
        }
    }
    out
}

/// .NET's word characters for names (group names, `${name}`): letters, digits, `_`.
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// White space that `(?x)` skips in .NET (`\t \n \f \r` and space — not `\v`).
fn is_x_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\u{C}' | '\r')
}

/// .NET's Unicode general categories (`\p{Lu}` …), all of which the `regex` crate knows except
/// `Cs` (surrogates, which a Rust string cannot contain; handled separately).
const CATEGORIES: [&str; 37] = [
    "C", "Cc", "Cf", "Cn", "Co", "Cs", "L", "Ll", "Lm", "Lo", "Lt", "Lu", "M", "Mc", "Me", "Mn",
    "N", "Nd", "Nl", "No", "P", "Pc", "Pd", "Pe", "Pf", "Pi", "Po", "Ps", "S", "Sc", "Sk", "Sm",
    "So", "Z", "Zl", "Zp", "Zs",
];

/// Regex-crate syntax for a class that matches nothing / everything.
const MATCH_NOTHING: &str = r"[^\x{0}-\x{10FFFF}]";
const MATCH_ANYTHING: &str = r"[\x{0}-\x{10FFFF}]";

/// The result of translating a .NET pattern.
struct Translated {
    /// The pattern in `regex`-crate syntax.
    pattern: String,
    /// Capturing groups in order of their opening parenthesis, with their names.
    groups: Vec<Option<String>>,
    /// `(byte offset in pattern, char offset in the .NET pattern)`, ascending: where each emitted
    /// piece came from, to map errors of the `regex` crate back.
    map: Vec<(usize, usize)>,
}

/// An open group: where it started and the `(?x)` state to restore when it closes. (The `i`, `m`
/// and `s` options are passed on to the `regex` crate, whose scoping is the same as .NET's; `x` is
/// applied by the translator itself and never passed on.)
struct Frame {
    open: usize,
    saved_x: bool,
}

/// What the last emitted item was, for quantifier checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Last {
    /// Start of the pattern or of a group, after `|` or after `(?i)`: nothing to quantify.
    Nothing,
    /// Something a quantifier may follow.
    Atom,
    /// A quantifier (another one would be nested).
    Quantifier,
}

/// One item inside a character class.
enum ClassItem {
    /// A single character; `escaped` when written as an escape (such a `-` or `[` is literal).
    Char { c: char, escaped: bool },
    /// A set (`\d`, `\p{L}`, …) or `\-`, already in `regex`-crate syntax; never a range end point.
    Set(String),
}

/// The one-pass scanner from .NET syntax to `regex`-crate syntax.
struct Translator {
    chars: Vec<char>,
    pos: usize,
    out: String,
    map: Vec<(usize, usize)>,
    /// Whether `(?x)` is in effect: blanks and `#` comments outside classes are skipped.
    x: bool,
    frames: Vec<Frame>,
    last: Last,
    groups: Vec<Option<String>>,
}

type Step = Result<(), RegexError>;

impl Translator {
    fn new(pattern: &str) -> Translator {
        Translator {
            chars: pattern.chars().collect(),
            pos: 0,
            out: String::with_capacity(pattern.len() + 8),
            map: Vec::new(),
            x: false,
            frames: Vec::new(),
            last: Last::Nothing,
            groups: Vec::new(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek_at(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.pos + ahead).copied()
    }

    /// Records that what is emitted next comes from character `orig` of the pattern.
    fn mark(&mut self, orig: usize) {
        self.map.push((self.out.len(), orig));
    }

    fn translate(mut self) -> Result<Translated, RegexError> {
        while let Some(c) = self.peek() {
            if self.x && self.skip_x_blank() {
                continue;
            }
            let at = self.pos;
            self.mark(at);
            match c {
                '\\' => self.escape()?,
                '[' => self.class()?,
                '(' => self.open_group()?,
                ')' => self.close_group()?,
                '|' => {
                    self.pos += 1;
                    self.out.push('|');
                    self.last = Last::Nothing;
                }
                '^' | '$' | '.' => {
                    self.pos += 1;
                    self.out.push(c);
                    self.last = Last::Atom;
                }
                '*' | '+' | '?' => self.quantifier()?,
                '{' if self.counted_quantifier_end(at).is_some() => self.quantifier()?,
                _ => {
                    self.pos += 1;
                    push_literal(&mut self.out, c);
                    self.last = Last::Atom;
                }
            }
        }
        if let Some(frame) = self.frames.last() {
            return Err(RegexError::new(
                frame.open,
                "this group is never closed: missing ')'",
            ));
        }
        Ok(Translated {
            pattern: self.out,
            groups: self.groups,
            map: self.map,
        })
    }

    /// Under `(?x)`, skips one run of white space or one `#` comment; whether anything was skipped.
    fn skip_x_blank(&mut self) -> bool {
        match self.peek() {
            Some(c) if is_x_space(c) => {
                while self.peek().is_some_and(is_x_space) {
                    self.pos += 1;
                }
                true
            }
            Some('#') => {
                while let Some(c) = self.peek() {
                    self.pos += 1;
                    if c == '\n' {
                        break;
                    }
                }
                true
            }
            _ => false,
        }
    }

    fn skip_x_blanks(&mut self) {
        while self.x && self.skip_x_blank() {}
    }

    /// If a .NET counted quantifier (`{n}`, `{n,}`, `{n,m}`) starts at `at`, the offset just past
    /// its `}`. Anything else starting with `{` is literal text in .NET.
    fn counted_quantifier_end(&self, at: usize) -> Option<usize> {
        let chars = &self.chars;
        if chars.get(at) != Some(&'{') {
            return None;
        }
        let min_end = digits_end(chars, at + 1);
        if min_end == at + 1 {
            return None;
        }
        match chars.get(min_end) {
            Some('}') => Some(min_end + 1),
            Some(',') => {
                let max_end = digits_end(chars, min_end + 1);
                (chars.get(max_end) == Some(&'}')).then_some(max_end + 1)
            }
            _ => None,
        }
    }

    /// A quantifier at `self.pos` (`*`, `+`, `?` or a counted one), its lazy `?`, and the check
    /// against possessive and nested quantifiers.
    fn quantifier(&mut self) -> Step {
        let at = self.pos;
        let c = self.chars[at];
        let shown = match self.counted_quantifier_end(at) {
            Some(end) => self.chars[at..end].iter().collect::<String>(),
            None => c.to_string(),
        };
        match self.last {
            Last::Nothing => {
                return Err(RegexError::new(
                    at,
                    format!(
                    "quantifier '{shown}' follows nothing; escape it (\\{c}) to match it literally"
                ),
                ))
            }
            Last::Quantifier => {
                return Err(RegexError::new(
                    at,
                    format!("nested quantifier '{shown}': a quantifier cannot follow another one"),
                ))
            }
            Last::Atom => {}
        }
        if c == '{' {
            let end = self.counted_quantifier_end(at).unwrap_or(at + 1);
            let body: String = self.chars[at + 1..end - 1].iter().collect();
            let (min, max) = match body.split_once(',') {
                Some((min, max)) => (min, Some(max)),
                None => (body.as_str(), None),
            };
            let min = parse_count(min, at)?;
            match max {
                None => self.out.push_str(&format!("{{{min}}}")),
                Some("") => self.out.push_str(&format!("{{{min},}}")),
                Some(max) => {
                    let max = parse_count(max, at)?;
                    if min > max {
                        return Err(RegexError::new(
                            at,
                            format!("quantifier '{shown}' has its minimum above its maximum"),
                        ));
                    }
                    self.out.push_str(&format!("{{{min},{max}}}"));
                }
            }
            self.pos = end;
        } else {
            self.out.push(c);
            self.pos += 1;
        }
        self.skip_x_blanks();
        if self.peek() == Some('?') {
            self.out.push('?');
            self.pos += 1;
        } else if self.peek() == Some('+') {
            return Err(RegexError::new(
                self.pos,
                format!("possessive quantifier '{shown}+' is not supported (spec §9)"),
            ));
        }
        self.last = Last::Quantifier;
        Ok(())
    }

    /// A backslash escape outside a character class.
    fn escape(&mut self) -> Step {
        let at = self.pos;
        let Some(c) = self.peek_at(1) else {
            return Err(RegexError::new(
                at,
                "the pattern ends with a lone backslash; write \\\\ for a literal backslash",
            ));
        };
        self.last = Last::Atom;
        match c {
            'd' | 'D' | 'w' | 'W' | 's' | 'S' | 'b' | 'B' | 'A' | 'z' => {
                self.out.push('\\');
                self.out.push(c);
                self.pos += 2;
            }
            'Z' => {
                return Err(unsupported(
                    at,
                    "\\Z (end or before a final newline)",
                    "use $ or \\z",
                ))
            }
            'G' => return Err(unsupported(at, "\\G (contiguous match)", "")),
            '1'..='9' => return Err(unsupported(at, "backreference", "")),
            'k' => return Err(unsupported(at, "named backreference \\k<name>", "")),
            'p' | 'P' => {
                let set = self.property(at, c == 'P')?;
                self.out.push_str(&set);
            }
            '<' | '\''
                if self.is_angle_backreference(at + 2, if c == '<' { '>' } else { '\'' }) =>
            {
                return Err(unsupported(
                    at,
                    "named backreference",
                    "escape the closing bracket too to match the text literally",
                ));
            }
            _ => {
                let ch = self.char_escape(at)?;
                push_literal(&mut self.out, ch);
            }
        }
        Ok(())
    }

    /// Whether the text from `from` is `digits` + `close` or `name` + `close` — a .NET
    /// backreference such as `\<1>` or `\<name>` (otherwise `\<` is a literal `<`).
    fn is_angle_backreference(&self, from: usize, close: char) -> bool {
        let chars = &self.chars;
        let Some(&first) = chars.get(from) else {
            return false;
        };
        let end = if first.is_ascii_digit() {
            digits_end(chars, from)
        } else if is_word_char(first) {
            let mut end = from;
            while end < chars.len() && is_word_char(chars[end]) {
                end += 1;
            }
            end
        } else {
            return false;
        };
        chars.get(end) == Some(&close)
    }

    /// A single-character escape at `at` (`\t`, `\xHH`, `\+`, …), consumed; its character.
    fn char_escape(&mut self, at: usize) -> Result<char, RegexError> {
        let Some(c) = self.peek_at(1) else {
            return Err(RegexError::new(
                at,
                "the pattern ends with a lone backslash",
            ));
        };
        self.pos += 2;
        let ch = match c {
            't' => '\t',
            'n' => '\n',
            'r' => '\r',
            'f' => '\u{C}',
            'v' => '\u{B}',
            'x' => self.hex(at, 2)?,
            'u' => self.hex(at, 4)?,
            '0'..='9' => {
                return Err(unsupported(
                    at,
                    "octal escape",
                    "write \\xHH or \\uHHHH instead",
                ))
            }
            c if c.is_alphanumeric() => {
                return Err(RegexError::new(
                    at,
                    format!(
                        "unrecognized escape \\{c}; the supported escapes are \\d \\D \\w \\W \\s \
                         \\S \\b \\B \\A \\z \\t \\n \\r \\f \\v \\xHH \\uHHHH \\p{{..}}"
                    ),
                ))
            }
            c => c,
        };
        Ok(ch)
    }

    /// Exactly `digits` hex digits at `self.pos` (after `\x` / `\u` at `at`), consumed.
    fn hex(&mut self, at: usize, digits: usize) -> Result<char, RegexError> {
        let mut value = 0u32;
        for _ in 0..digits {
            let d = self.peek().and_then(|c| c.to_digit(16)).ok_or_else(|| {
                RegexError::new(
                    at,
                    format!(
                        "\\{} needs exactly {digits} hex digits",
                        if digits == 2 { 'x' } else { 'u' }
                    ),
                )
            })?;
            value = value * 16 + d;
            self.pos += 1;
        }
        char::from_u32(value).ok_or_else(|| {
            RegexError::new(
                at,
                format!("\\u{value:04X} is a UTF-16 surrogate; write the character itself instead"),
            )
        })
    }

    /// `\p{Name}` / `\P{Name}` at `at`, consumed; the set in `regex`-crate syntax.
    fn property(&mut self, at: usize, negated: bool) -> Result<String, RegexError> {
        let letter = if negated { 'P' } else { 'p' };
        if self.peek_at(2) != Some('{') {
            return Err(RegexError::new(
                at,
                format!(
                    "\\{letter} must be followed by a category in braces, like \\{letter}{{Lu}}"
                ),
            ));
        }
        let start = self.pos + 3;
        let mut end = start;
        while end < self.chars.len() && self.chars[end] != '}' {
            end += 1;
        }
        if end >= self.chars.len() {
            return Err(RegexError::new(
                at,
                format!("\\{letter}{{ is never closed: missing '}}'"),
            ));
        }
        let name: String = self.chars[start..end].iter().collect();
        self.pos = end + 1;
        if name == "Cs" {
            return Ok(if negated {
                MATCH_ANYTHING
            } else {
                MATCH_NOTHING
            }
            .to_owned());
        }
        if CATEGORIES.contains(&name.as_str()) {
            return Ok(format!("\\{letter}{{{name}}}"));
        }
        if name.starts_with("Is") {
            return Err(unsupported(
                at,
                &format!(".NET named block \\{letter}{{{name}}}"),
                "list the character range instead, like [\\u0370-\\u03FF]",
            ));
        }
        Err(RegexError::new(
            at,
            format!(
                "unknown Unicode category '{name}'; use a general category such as L, Lu, Ll, Nd, \
                 P or Zs (case-sensitive)"
            ),
        ))
    }

    /// A character class `[...]` at `self.pos`.
    fn class(&mut self) -> Step {
        let open = self.pos;
        self.pos += 1;
        let mut body = String::from("[");
        if self.peek() == Some('^') {
            body.push('^');
            self.pos += 1;
        }
        let mut first = true;
        loop {
            let Some(c) = self.peek() else {
                return Err(RegexError::new(
                    open,
                    "this character class is never closed: missing ']'",
                ));
            };
            let item_at = self.pos;
            if c == ']' && !first {
                self.pos += 1;
                break;
            }
            let was_first = first;
            first = false;
            let (c, escaped) = match self.class_item()? {
                ClassItem::Set(set) => {
                    body.push_str(&set);
                    continue;
                }
                ClassItem::Char { c, escaped } => (c, escaped),
            };
            // A range `c-d`: a `-` followed by anything but the closing `]`.
            if self.peek() == Some('-') && self.peek_at(1).is_some_and(|n| n != ']') {
                let dash = self.pos;
                self.pos += 1;
                if self.peek() == Some('[') {
                    return Err(subtraction(dash));
                }
                let end =
                    match self.class_item()? {
                        ClassItem::Set(_) => return Err(RegexError::new(
                            dash + 1,
                            "a class escape like \\d or \\- cannot end a range; put the '-' last \
                             or escape it",
                        )),
                        ClassItem::Char { c, .. } => c,
                    };
                if c > end {
                    return Err(RegexError::new(
                        item_at,
                        format!("range {c:?}-{end:?} is in reverse order"),
                    ));
                }
                push_class_char(&mut body, c);
                body.push('-');
                push_class_char(&mut body, end);
            } else if c == '-' && !escaped && !was_first && self.peek() == Some('[') {
                return Err(subtraction(item_at));
            } else {
                push_class_char(&mut body, c);
            }
        }
        body.push(']');
        self.out.push_str(&body);
        self.last = Last::Atom;
        Ok(())
    }

    /// One item of a character class at `self.pos` (not the closing `]`), consumed.
    fn class_item(&mut self) -> Result<ClassItem, RegexError> {
        let at = self.pos;
        let Some(c) = self.peek() else {
            return Err(RegexError::new(at, "the character class is never closed"));
        };
        if c == '[' && self.peek_at(1) == Some(':') {
            return Err(unsupported(
                at,
                "POSIX-style class [:name:]",
                "escape the '[' to match it literally",
            ));
        }
        if c != '\\' {
            self.pos += 1;
            return Ok(ClassItem::Char { c, escaped: false });
        }
        let Some(e) = self.peek_at(1) else {
            return Err(RegexError::new(
                at,
                "the pattern ends with a lone backslash inside a character class",
            ));
        };
        match e {
            'd' | 'D' | 'w' | 'W' | 's' | 'S' => {
                self.pos += 2;
                Ok(ClassItem::Set(format!("\\{e}")))
            }
            'p' | 'P' => Ok(ClassItem::Set(self.property(at, e == 'P')?)),
            '-' => {
                self.pos += 2;
                Ok(ClassItem::Set("\\-".to_owned()))
            }
            // Inside a class .NET reads `\b` as a backspace.
            'b' => {
                self.pos += 2;
                Ok(ClassItem::Char {
                    c: '\u{8}',
                    escaped: true,
                })
            }
            _ => Ok(ClassItem::Char {
                c: self.char_escape(at)?,
                escaped: true,
            }),
        }
    }

    /// `(` at `self.pos`: a group, a named group, an inline option, or an unsupported construct.
    fn open_group(&mut self) -> Step {
        let open = self.pos;
        if self.peek_at(1) != Some('?') {
            self.pos += 1;
            self.groups.push(None);
            self.push_frame(open, "(");
            return Ok(());
        }
        let construct = |what: &str| unsupported(open, what, "");
        match self.peek_at(2) {
            Some(':') => {
                self.pos += 3;
                self.push_frame(open, "(?:");
                Ok(())
            }
            Some('=') => Err(construct("look-ahead (?=...)")),
            Some('!') => Err(construct("negative look-ahead (?!...)")),
            Some('>') => Err(construct("atomic group (?>...)")),
            Some('(') => Err(construct("conditional (?(...)...)")),
            Some('#') => Err(construct("inline comment (?#...)")),
            Some('<') if self.peek_at(3) == Some('=') => Err(construct("look-behind (?<=...)")),
            Some('<') if self.peek_at(3) == Some('!') => {
                Err(construct("negative look-behind (?<!...)"))
            }
            Some('<') => self.named_group(open, 3, '>'),
            Some('\'') => self.named_group(open, 3, '\''),
            Some('P') if self.peek_at(3) == Some('<') => self.named_group(open, 4, '>'),
            _ => self.options(open),
        }
    }

    fn push_frame(&mut self, open: usize, emit: &str) {
        self.out.push_str(emit);
        self.frames.push(Frame {
            open,
            saved_x: self.x,
        });
        self.last = Last::Nothing;
    }

    /// A named group whose name starts `name_at` characters after the `(` at `open`.
    fn named_group(&mut self, open: usize, name_at: usize, close: char) -> Step {
        let start = open + name_at;
        let mut end = start;
        while end < self.chars.len() && is_word_char(self.chars[end]) {
            end += 1;
        }
        let name: String = self.chars[start..end].iter().collect();
        match self.chars.get(end) {
            Some('-') => return Err(unsupported(open, "balancing group (?<a-b>...)", "")),
            Some(&c) if c == close && !name.is_empty() => {}
            _ => {
                return Err(RegexError::new(
                    start,
                    "invalid group name: use letters, digits and '_', like (?<name>...)",
                ))
            }
        }
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(unsupported(
                open,
                "explicitly numbered group (?<n>...)",
                "give the group a name that starts with a letter",
            ));
        }
        if self.groups.iter().flatten().any(|g| *g == name) {
            return Err(RegexError::new(
                start,
                format!("the group name '{name}' is used twice"),
            ));
        }
        self.pos = end + 1;
        self.groups.push(Some(name.clone()));
        self.push_frame(open, &format!("(?P<{name}>"));
        Ok(())
    }

    /// Inline options `(?imsx-imsx)` or `(?imsx-imsx:...)` at `open`.
    fn options(&mut self, open: usize) -> Step {
        let mut i = open + 2;
        let mut on = String::new();
        let mut off = String::new();
        let mut negate = false;
        let mut x = self.x;
        loop {
            let Some(&c) = self.chars.get(i) else {
                return Err(RegexError::new(
                    open,
                    "this group is never closed: missing ')'",
                ));
            };
            match c.to_ascii_lowercase() {
                '-' => negate = true,
                '+' => negate = false,
                o @ ('i' | 'm' | 's') => {
                    if negate {
                        off.push(o);
                    } else {
                        on.push(o);
                    }
                }
                'x' => x = !negate,
                'n' => {
                    return Err(unsupported(
                        i,
                        "the explicit-capture option (?n)",
                        "use (?:...) for groups that should not capture",
                    ))
                }
                ')' | ':' => break,
                l if l.is_ascii_alphabetic() => {
                    return Err(RegexError::new(
                        i,
                        format!(
                            "unknown inline option '{c}'; the supported options are i, m, s and x"
                        ),
                    ))
                }
                _ => {
                    return Err(RegexError::new(
                        open,
                        "unrecognized grouping construct '(?'; escape the '(' or the '?' to \
                         match it literally",
                    ))
                }
            }
            i += 1;
        }
        let mut letters = on;
        if !off.is_empty() {
            letters.push('-');
            letters.push_str(&off);
        }
        let scoped = self.chars[i] == ':';
        self.pos = i + 1;
        if scoped {
            self.push_frame(open, &format!("(?{letters}:"));
        } else {
            if !letters.is_empty() {
                self.out.push_str(&format!("(?{letters})"));
            }
            self.last = Last::Nothing;
        }
        self.x = x;
        Ok(())
    }

    fn close_group(&mut self) -> Step {
        let Some(frame) = self.frames.pop() else {
            return Err(RegexError::new(
                self.pos,
                "unmatched ')'; escape it (\\)) to match it literally",
            ));
        };
        self.x = frame.saved_x;
        self.pos += 1;
        self.out.push(')');
        self.last = Last::Atom;
        Ok(())
    }
}

fn unsupported(at: usize, what: &str, hint: &str) -> RegexError {
    let mut message = format!("{what} is not supported by dirsync's regular expressions (spec §9)");
    if !hint.is_empty() {
        message.push_str("; ");
        message.push_str(hint);
    }
    RegexError::new(at, message)
}

fn subtraction(at: usize) -> RegexError {
    unsupported(
        at,
        "character class subtraction [a-z-[...]]",
        "list the remaining characters or ranges instead",
    )
}

fn parse_count(digits: &str, at: usize) -> Result<u32, RegexError> {
    digits
        .parse::<u32>()
        .map_err(|_| RegexError::new(at, format!("the repetition count {digits} is too large")))
}

/// Appends `c` as a literal outside a class, escaped where the `regex` crate needs it.
fn push_literal(out: &mut String, c: char) {
    if regex_syntax::is_meta_character(c) {
        out.push('\\');
        out.push(c);
    } else if c.is_control() {
        out.push_str(&format!("\\x{{{:X}}}", u32::from(c)));
    } else {
        out.push(c);
    }
}

/// Appends `c` as a literal inside a class. The meta characters include `[`, `]`, `-`, `^`, `&`
/// and `~`, so `[`, `&&`, `--` and `~~` never reach the `regex` crate's class syntax unescaped.
fn push_class_char(out: &mut String, c: char) {
    push_literal(out, c);
}

/// Converts an error of the `regex` crate for a translated pattern into a [`RegexError`] with a
/// one-line message and the offset mapped back to the .NET pattern.
fn crate_error(error: &regex::Error, translated: &Translated) -> RegexError {
    match error {
        regex::Error::CompiledTooBig(limit) => RegexError::new(
            0,
            format!(
                "pattern too large: its compiled form exceeds the limit of {limit} bytes; use \
                 smaller repetition counts or fewer Unicode classes"
            ),
        ),
        _ => {
            let mut parser = regex_syntax::ParserBuilder::new().build();
            let (message, byte) = match parser.parse(&translated.pattern) {
                Err(regex_syntax::Error::Parse(e)) => (e.kind().to_string(), e.span().start.offset),
                Err(regex_syntax::Error::Translate(e)) => {
                    (e.kind().to_string(), e.span().start.offset)
                }
                _ => (
                    error
                        .to_string()
                        .lines()
                        .rev()
                        .find(|l| !l.trim().is_empty())
                        .unwrap_or("invalid pattern")
                        .trim_start_matches("error: ")
                        .to_owned(),
                    0,
                ),
            };
            let offset = translated
                .map
                .iter()
                .take_while(|(out, _)| *out <= byte)
                .last()
                .map_or(0, |(_, orig)| *orig);
            RegexError::new(offset, format!("invalid pattern: {message}"))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn re(p: &str) -> DotNetRegex {
        match DotNetRegex::new(p) {
            Ok(r) => r,
            Err(e) => panic!("{p:?} should compile: {e}"),
        }
    }

    fn err(p: &str) -> RegexError {
        match DotNetRegex::new(p) {
            Ok(r) => panic!(
                "{p:?} should be rejected, translated to {:?}",
                r.regex().as_str()
            ),
            Err(e) => e,
        }
    }

    fn find(p: &str, text: &str) -> Option<String> {
        re(p).regex().find(text).map(|m| m.as_str().to_owned())
    }

    #[test]
    fn anchored_digits() {
        let r = re(r"^\d{3}-\d{4}$");
        assert!(r.is_match("555-1234"));
        assert!(!r.is_match("555-12345"));
        assert!(!r.is_match("x555-1234"));
        assert!(!r.is_match("55-1234"));
        // Unicode digits, as .NET's \d.
        assert!(r.is_match("٥٥٥-١٢٣٤"));
    }

    #[test]
    fn named_groups_and_lookup() {
        let r = re(r"(?<user>[^@]+)@(?<dom>.+)");
        let caps = r.regex().captures("jane@contoso.com").unwrap();
        let user = r.group_index("user").unwrap();
        let dom = r.group_index("dom").unwrap();
        assert_eq!(&caps[user], "jane");
        assert_eq!(&caps[dom], "contoso.com");
        assert_eq!(
            r.group_index("User"),
            None,
            "group names are case-sensitive"
        );
        assert_eq!(r.group_index("nope"), None);
        assert_eq!(r.group_index("0"), Some(0));
        assert_eq!(r.group_index("3"), None);
    }

    #[test]
    fn alternative_named_group_syntaxes() {
        for p in [r"(?'id'\d+)", r"(?P<id>\d+)", r"(?<id>\d+)"] {
            let r = re(p);
            let caps = r.regex().captures("ab 42").unwrap();
            assert_eq!(&caps[r.group_index("id").unwrap()], "42", "{p}");
        }
    }

    #[test]
    fn non_ascii_group_names() {
        let r = re(r"(?<prénom>\w+) (?<nom>\w+)");
        assert_eq!(
            r.replace_all("Zoë Dupré", "${nom}, ${prénom}"),
            "Dupré, Zoë"
        );
        assert_eq!(
            find(r"\'x", "a'x"),
            Some("'x".into()),
            "\\' not followed by name' is literal"
        );
    }

    #[test]
    fn dotnet_group_numbering_puts_named_groups_last() {
        // .NET numbers unnamed groups first: $1 is (b), $2 is (c), $3 is <a>.
        let r = re(r"(?<a>a)(b)(c)");
        assert_eq!(r.replace_all("abc", "$1$2$3"), "bca");
        assert_eq!(r.group_index("1"), Some(2));
        assert_eq!(r.group_index("3"), Some(1));
        assert_eq!(r.group_index("a"), Some(1));
    }

    #[test]
    fn escaped_angle_brackets_are_literal() {
        let r = re(r"\<b\>");
        assert!(r.is_match("<b>"));
        assert!(r.is_match("x<b>y"));
        assert!(!r.is_match("b"));
        assert!(!r.is_match("a b c"));
        assert!(re(r"\<").is_match("<"));
        assert!(re(r"\>").is_match(">"));
        assert!(re(r"[\<\>]").is_match(">"));
        // `\<1x>` is not a backreference in .NET either: a literal `<`, then `1x>`.
        assert_eq!(find(r"\<1x>", "a<1x>"), Some("<1x>".into()));
    }

    #[test]
    fn email_like_class() {
        let r = re(r"[\w.+-]+@contoso\.com$");
        assert!(r.is_match("jane.doe+tag@contoso.com"));
        assert!(r.is_match("a-b@contoso.com"));
        assert!(!r.is_match("jane@contosoXcom"));
        assert!(!r.is_match("jane@contoso.com.evil"));
    }

    #[test]
    fn inline_options() {
        assert!(re("(?i)ABC").is_match("xabcx"));
        assert!(!re("ABC").is_match("abc"));
        assert!(re("a(?i:B)c").is_match("abc"));
        assert!(
            !re("a(?i:B)c").is_match("abC"),
            "scoped option ends with its group"
        );
        assert!(re("(?i)a(?-i)B").is_match("AB"));
        assert!(!re("(?i)a(?-i)B").is_match("Ab"));
        assert!(re("(?im)^b$").is_match("a\nB\nc"));
        assert!(!re("^b$").is_match("a\nb\nc"));
        assert!(re("(?s)a.b").is_match("a\nb"));
        assert!(!re("a.b").is_match("a\nb"));
        assert!(
            re("(?I)abc").is_match("ABC"),
            ".NET accepts upper-case option letters"
        );
        // An option set inside a group ends with the group.
        assert!(!re("(a(?i)b)B").is_match("abb"));
        assert!(re("(a(?i)b)B").is_match("aBB"));
        // Options hold across `|` up to the end of the group, as in .NET.
        assert!(re("a(?i)b|c").is_match("C"));
    }

    #[test]
    fn extended_mode_skips_blanks_and_comments() {
        let r = re("(?x) ^ \\d {3}  # area code\n - \\d{4} $");
        assert!(r.is_match("555-1234"));
        assert!(!r.is_match("555 -1234"));
        // Escaped blanks and blanks in classes stay literal.
        assert!(re(r"(?x)a\ b").is_match("a b"));
        assert!(re("(?x)a[ ]b").is_match("a b"));
        assert!(re(r"(?x)a\#b").is_match("a#b"));
        // `(?x)` scoped to a group.
        assert!(re("(?x: a b )c d").is_match("abc d"));
        // A comment may hide what would otherwise be an error.
        assert!(re("(?x)a # (?=no lookahead here\n").is_match("a"));
        // Blanks between a quantifier and its lazy `?`.
        assert_eq!(find("(?x)a+ ?", "aaa"), Some("a".into()));
    }

    #[test]
    fn lazy_and_greedy_quantifiers() {
        assert_eq!(find("a+?", "aaa"), Some("a".into()));
        assert_eq!(find("a+", "aaa"), Some("aaa".into()));
        assert_eq!(find("a*?b", "aab"), Some("aab".into()));
        assert_eq!(find("a??", "a"), Some("".into()));
        assert_eq!(find("a{2,}?", "aaaa"), Some("aa".into()));
        assert_eq!(find("a{1,3}", "aaaa"), Some("aaa".into()));
        assert_eq!(find("a{2}", "aaaa"), Some("aa".into()));
        assert_eq!(find("<.+?>", "<a><b>"), Some("<a>".into()));
    }

    #[test]
    fn braces_that_are_not_quantifiers_are_literal() {
        assert_eq!(find("a{", "a{"), Some("a{".into()));
        assert_eq!(find("a{,3}", "a{,3}"), Some("a{,3}".into()));
        assert_eq!(find("{x}", "{x}"), Some("{x}".into()));
        assert_eq!(find("a}", "a}"), Some("a}".into()));
        assert_eq!(find("]", "]"), Some("]".into()));
    }

    #[test]
    fn unicode_word_and_case() {
        assert_eq!(find(r"^\w+$", "Zoë"), Some("Zoë".into()));
        assert_eq!(find(r"\w+", "über-Straße"), Some("über".into()));
        assert!(re("(?i)ÉCOLE").is_match("école"));
        assert!(
            re(r"\s").is_match("a\u{A0}b"),
            "no-break space is white space"
        );
        assert!(re(r"^\p{Lu}\p{Ll}+$").is_match("Émile"));
        assert!(re(r"^\P{L}+$").is_match("123-"));
        assert!(re(r"[\p{N}]").is_match("٣"));
        assert!(!re(r"\p{Cs}").is_match("any text \u{FFFF}"));
        assert!(re(r"^\P{Cs}$").is_match("x"));
        assert!(!re(r"[\p{Cs}]").is_match("x"));
    }

    #[test]
    fn dollar_is_the_very_end() {
        assert!(!re("abc$").is_match("abc\n"));
        assert!(re("abc$").is_match("abc"));
        assert!(re("(?m)abc$").is_match("abc\n"));
        assert!(re(r"abc\z").is_match("xabc"));
        assert!(!re(r"abc\z").is_match("abc\n"));
        assert!(re(r"\Aabc").is_match("abcd"));
        assert!(!re(r"\Aabc").is_match("xabc"));
        assert!(!re("^abc").is_match("x\nabc"));
    }

    #[test]
    fn dot_excludes_only_newline() {
        assert!(re("^.$").is_match("\r"));
        assert!(!re("^.$").is_match("\n"));
        assert!(re("^.$").is_match("ë"));
    }

    #[test]
    fn escapes() {
        assert!(re(r"\t\n\r\f\v").is_match("\t\n\r\u{C}\u{B}"));
        assert!(re(r"\x41\u00e9").is_match("Aé"));
        assert!(re(r"\x4a").is_match("J"));
        assert!(re(r"\+\.\@\[\/\\\]\{\}\(\)\*\?\|\^\$\#\ \-\_").is_match(r"+.@[/\]{}()*?|^$# -_"));
        assert!(re(r"\bcat\b").is_match("a cat sat"));
        assert!(!re(r"\bcat\b").is_match("concatenate"));
        assert!(re(r"\Bcat\B").is_match("concatenate"));
        assert!(re(r"^\D\W\S$").is_match("a-x"));
        assert!(
            re(r"€\€").is_match("€€"),
            "a backslash before a non-word character is literal"
        );
    }

    #[test]
    fn character_classes() {
        assert_eq!(find("[a-c]+", "xxabcd"), Some("abc".into()));
        assert_eq!(find("[^a-c]+", "abxyc"), Some("xy".into()));
        assert_eq!(find("[]a]+", "x]a]"), Some("]a]".into()));
        assert_eq!(find("[^]a]+", "]ab"), Some("b".into()));
        assert_eq!(find("[a-]+", "x-a-"), Some("-a-".into()));
        assert_eq!(find("[-a]+", "x-a-"), Some("-a-".into()));
        assert_eq!(find(r"[\d-z]+", "a1-z"), Some("1-z".into()));
        assert_eq!(
            find(r"[\--/]+", "a-/."),
            Some("-/".into()),
            "\\- never starts a range"
        );
        assert_eq!(find(r"[\x41-\x43]+", "ABCD"), Some("ABC".into()));
        assert_eq!(
            find(r"[\b]", "a\u{8}b"),
            Some("\u{8}".into()),
            "\\b in a class is backspace"
        );
        // Characters the regex crate treats as set operators stay literal.
        assert_eq!(find("[a&&b]+", "x&&ab"), Some("&&ab".into()));
        assert_eq!(find(r"[a\--b]+", "x-ab"), Some("-ab".into()));
        assert_eq!(find("[--]+", "x--"), Some("--".into()));
        assert!(
            err("[a--b]").message.contains("reverse order"),
            "as in .NET"
        );
        assert_eq!(find("[a~~b]+", "x~~ab"), Some("~~ab".into()));
        assert_eq!(find("[[a]+", "x[a["), Some("[a[".into()));
        assert_eq!(find("[a^]+", "x^a"), Some("^a".into()));
        assert_eq!(find(r"[\w.]+", "é.x!"), Some("é.x".into()));
        assert_eq!(find(r"(?i)[a-c]+", "xABC"), Some("ABC".into()));
    }

    #[test]
    fn groups_alternation_leftmost_first() {
        assert_eq!(find("a|ab", "ab"), Some("a".into()));
        assert_eq!(find("(?:ab)+", "ababa"), Some("abab".into()));
        assert_eq!(find("(a|b)c", "xbc"), Some("bc".into()));
        assert_eq!(find("", "abc"), Some("".into()));
        assert_eq!(find("a|", "b"), Some("".into()));
        assert_eq!(find("()", "b"), Some("".into()));
        assert_eq!(find("(?i)(?)x", "X"), Some("X".into()));
    }

    #[test]
    fn unsupported_constructs_have_offsets() {
        let cases: &[(&str, usize, &str)] = &[
            ("ab(?=c)", 2, "look-ahead"),
            ("ab(?!c)", 2, "negative look-ahead"),
            ("x(?<=a)b", 1, "look-behind"),
            ("x(?<!a)b", 1, "negative look-behind"),
            ("(?>a+)", 0, "atomic"),
            ("a(?(x)b|c)", 1, "conditional"),
            ("(?<a>x)(?<b-a>y)", 7, "balancing"),
            ("(?<-a>y)", 0, "balancing"),
            ("(?<2>x)", 0, "numbered group"),
            ("(a)\\1", 3, "backreference"),
            ("(?<n>a)\\k<n>", 7, "named backreference"),
            ("(?<n>a)\\<n>", 7, "named backreference"),
            ("(a)\\<1>", 3, "named backreference"),
            ("(?'a'x)\\'a'", 7, "named backreference"),
            ("ab\\G", 2, "\\G"),
            ("ab\\Z", 2, "\\Z"),
            ("\\p{IsGreek}", 0, "named block"),
            ("x\\p{Lu", 1, "never closed"),
            ("\\pL", 0, "braces"),
            ("\\p{lu}", 0, "unknown Unicode category"),
            ("a*+", 2, "possessive"),
            ("a++", 2, "possessive"),
            ("a?+", 2, "possessive"),
            ("a{2}+", 4, "possessive"),
            ("a**", 2, "nested quantifier"),
            ("a{2}{3}", 4, "nested quantifier"),
            ("*a", 0, "follows nothing"),
            ("a|*", 2, "follows nothing"),
            ("(*)", 1, "follows nothing"),
            ("(?i)*", 4, "follows nothing"),
            ("{2}", 0, "follows nothing"),
            ("a{3,2}", 1, "minimum above its maximum"),
            ("a{99999999999}", 1, "too large"),
            ("(?n)a", 2, "explicit-capture"),
            ("(?r)a", 2, "unknown inline option"),
            ("(?i-e:a)", 4, "unknown inline option"),
            ("(?@a)", 0, "unrecognized grouping"),
            ("(?#note)a", 0, "inline comment"),
            ("[a-z-[aeiou]]", 4, "subtraction"),
            ("[a-[b]]", 2, "subtraction"),
            ("[z-a]", 1, "reverse order"),
            ("[a-\\d]", 3, "cannot end a range"),
            ("[[:alpha:]]", 1, "POSIX"),
            ("ab[cd", 2, "never closed"),
            ("a(b", 1, "never closed"),
            ("a(b(c)", 1, "never closed"),
            ("ab)", 2, "unmatched ')'"),
            ("ab\\", 2, "lone backslash"),
            ("[ab\\", 3, "lone backslash"),
            ("\\q", 0, "unrecognized escape \\q"),
            ("x\\e", 1, "unrecognized escape \\e"),
            ("\\K", 0, "unrecognized escape"),
            ("[\\q]", 1, "unrecognized escape"),
            ("\\0", 0, "octal"),
            ("[\\1]", 1, "octal"),
            ("\\x4", 0, "hex digits"),
            ("\\u12G4", 0, "hex digits"),
            ("\\uD83D", 0, "surrogate"),
            ("(?<a>x)(?<a>y)", 10, "used twice"),
            ("(?<>x)", 3, "invalid group name"),
            ("(?<a b>x)", 3, "invalid group name"),
            ("日本(?=x)", 2, "look-ahead"),
        ];
        for (pattern, offset, needle) in cases {
            let e = err(pattern);
            assert!(
                e.message.contains(needle),
                "{pattern:?}: message {:?} should mention {needle:?}",
                e.message
            );
            assert_eq!(e.offset, *offset, "{pattern:?}: {e}");
            assert!(!e.message.contains('\n'), "{pattern:?}: one-line message");
        }
    }

    #[test]
    fn too_large_patterns_are_errors() {
        let e = err(r"\w{1000}");
        assert!(e.message.contains("pattern too large"), "{e}");
        let e = err(r"(?:a{1000}){1000}");
        assert!(e.message.contains("pattern too large"), "{e}");
        // A realistic bound still fits.
        assert!(re(r"^\w{1,64}$").is_match("abc"));
    }

    #[test]
    fn crate_errors_are_mapped_to_one_line_with_an_offset() {
        // Nesting deeper than the regex crate allows: reported by the crate, mapped back.
        let deep = format!("ab{}x{}", "(".repeat(300), ")".repeat(300));
        let e = err(&deep);
        assert!(e.message.starts_with("invalid pattern: "), "{e}");
        assert!(!e.message.contains('\n'));
        assert!(e.offset >= 2 && e.offset < 302, "{e}");
    }

    #[test]
    fn replacement_substitutions() {
        let r = re(r"(\w+)@(?<dom>\w+)");
        assert_eq!(r.replace_all("jo@x", "$2:$1"), "x:jo");
        assert_eq!(r.replace_all("jo@x", "${dom}/${1}"), "x/jo");
        assert_eq!(r.replace_all("jo@x", "[$&|$0]"), "[jo@x|jo@x]");
        assert_eq!(r.replace_all("jo@x", "$$1 costs $$"), "$1 costs $");
        assert_eq!(
            r.replace_all("jo@x", r"\1 \$"),
            r"\1 \$",
            "backslashes are literal"
        );
        // `$name` is not a substitution (only `${name}` is); the regex crate would read it as one.
        assert_eq!(r.replace_all("jo@x", "$dom"), "$dom");
        assert_eq!(
            r.replace_all("jo@x", "$1a"),
            "joa",
            "digits end at the first non-digit"
        );
        assert_eq!(r.replace_all("jo@x", "${1}0"), "jo0");
        // Undefined groups stay literal text, as in .NET.
        assert_eq!(
            r.replace_all("jo@x", "$3|${nope}|${1x}|${}|$"),
            "$3|${nope}|${1x}|${}|$"
        );
        // Substitutions other than spec §6's are literal.
        assert_eq!(r.replace_all("jo@x", "$`$'$+$_"), "$`$'$+$_");
        // Multi-byte text around references.
        assert_eq!(r.replace_all("é jo@x ü", "«$1»"), "é «jo» ü");
    }

    #[test]
    fn dollar_ten_with_one_group_is_literal() {
        // .NET reads all digits (group 10); it does not exist, so `$10` is literal text.
        let r = re("(a)");
        assert_eq!(r.replace_all("a", "$10"), "$10");
        assert!(r.check_replacement("$10").is_err());
        // With ten groups it is group 10.
        let r = re("(a)(b)(c)(d)(e)(f)(g)(h)(i)(j)");
        assert_eq!(r.replace_all("abcdefghij", "$10$1"), "ja");
    }

    #[test]
    fn check_replacement_reports_undefined_groups() {
        let r = re(r"(\w+)@(?<dom>\w+)");
        assert_eq!(
            r.check_replacement("$1 ${dom} $& $0 $$ $2 ${2} $x ${ a} $"),
            Ok(())
        );
        let e = r.check_replacement("ab$3").unwrap_err();
        assert_eq!(e.offset, 2);
        assert!(e.message.contains("group 3"), "{e}");
        let e = r.check_replacement("é${Dom}").unwrap_err();
        assert_eq!(e.offset, 1);
        assert!(e.message.contains("'Dom'"), "{e}");
        assert!(r.check_replacement("$99999999999999999999999").is_err());
    }

    #[test]
    fn empty_matches_follow_dotnet() {
        // .NET: an empty match right after a non-empty one is also replaced.
        assert_eq!(re("a*").replace_all("baaac", "-"), "-b--c-");
        assert_eq!(re("x*").replace_all("abc", "-"), "-a-b-c-");
        assert_eq!(re("c*").replace_all("abc", "-"), "-a-b--");
        assert_eq!(re("").replace_all("éa", "-"), "-é-a-");
        assert_eq!(re("b").replace_all("abcb", "[$&]"), "a[b]c[b]");
        assert_eq!(re("^").replace_all("ab", "-"), "-ab");
        assert_eq!(re("(?m)^").replace_all("a\nb", "-"), "-a\n-b");
        assert_eq!(re(r"\b").replace_all("ab cd", "|"), "|ab| |cd|");
    }

    #[test]
    fn replace_group_replaces_only_the_group() {
        let r = re(r"(?<area>\d{3})-(?<num>\d{4})");
        let area = r.group_index("area").unwrap();
        assert_eq!(
            r.replace_group("555-1234, 666-9876", area, "XXX"),
            "XXX-1234, XXX-9876"
        );
        let num = r.group_index("num").unwrap();
        assert_eq!(r.replace_group("555-1234", num, "[${area}]"), "555-[555]");
        // A match where the group did not participate is left as is.
        let r = re(r"(?<x>a)|b");
        let x = r.group_index("x").unwrap();
        assert_eq!(r.replace_group("abab", x, "_"), "_b_b");
    }

    #[test]
    fn captures_iter_matches_dotnet_iteration() {
        let r = re("a*");
        let spans: Vec<_> = r
            .captures_iter("baaac")
            .map(|c| c.get(0).map(|m| (m.start(), m.end())))
            .collect();
        assert_eq!(
            spans,
            vec![Some((0, 0)), Some((1, 4)), Some((4, 4)), Some((5, 5))]
        );
    }

    #[test]
    fn accessors_and_debug() {
        let r = re(r"\<x\>");
        assert_eq!(r.pattern(), r"\<x\>");
        assert_eq!(r.regex().as_str(), "<x>");
        let d = format!("{r:?}");
        assert!(d.contains("DotNetRegex") && d.contains("<x>"), "{d}");
        let c = r.clone();
        assert_eq!(c.pattern(), r.pattern());
        let e = err("(?=x)");
        assert_eq!(e.to_string(), format!("{} (at offset 0)", e.message));
    }

    #[test]
    fn escape_examples() {
        assert_eq!(escape("a.b*c"), r"a\.b\*c");
        assert_eq!(escape("x y\t#"), r"x\ y\t\#");
        assert_eq!(escape("<b>"), "<b>");
        assert!(re(&format!(
            "^{}$",
            escape("(1+1)=2? [yes] {ok} $5 ^_^ a|b \\ \n")
        ))
        .is_match("(1+1)=2? [yes] {ok} $5 ^_^ a|b \\ \n"));
        assert!(re(&format!("(?x)^{}$", escape("a b # c"))).is_match("a b # c"));
    }

    /// Patterns whose .NET and `regex`-crate readings coincide: literals, classes, groups,
    /// alternation and (lazy) quantifiers over a small alphabet.
    fn common_pattern() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            "[abc]".prop_map(|s| s),
            Just(".".to_owned()),
            Just("[a-b]".to_owned()),
            Just("[^a]".to_owned()),
            Just(r"\d".to_owned()),
            Just(r"\w".to_owned()),
            Just("^".to_owned()),
            Just("$".to_owned()),
        ];
        leaf.prop_recursive(4, 24, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 1..4).prop_map(|v| v.concat()),
                (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("{a}|{b}")),
                inner.clone().prop_map(|a| format!("({a})")),
                inner.clone().prop_map(|a| format!("(?:{a})*")),
                inner.clone().prop_map(|a| format!("(?:{a})+?")),
                inner.clone().prop_map(|a| format!("(?:{a}){{1,2}}")),
                inner.prop_map(|a| format!("(?i:{a})?")),
            ]
        })
    }

    proptest! {
        #[test]
        fn common_subset_means_the_same(pattern in common_pattern(), text in "[abcAB1 \n]{0,10}") {
            let ours = DotNetRegex::new(&pattern).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let direct = ::regex::Regex::new(&pattern).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let a = ours.regex().captures(&text).map(|c| c.iter().map(|m| m.map(|m| m.range())).collect::<Vec<_>>());
            let b = direct.captures(&text).map(|c| c.iter().map(|m| m.map(|m| m.range())).collect::<Vec<_>>());
            prop_assert_eq!(a, b, "translated {:?}", ours.regex().as_str());
        }

        #[test]
        fn new_never_panics(pattern in any::<String>()) {
            if let Err(e) = DotNetRegex::new(&pattern) {
                prop_assert!(e.offset <= pattern.chars().count());
                prop_assert!(!e.message.contains('\n'));
            }
        }

        #[test]
        fn new_never_panics_on_regex_like_text(pattern in r"[\\()\[\]{}?*+|^$.a-z0-9<>:=!'#,PpkxuIsLd -]{0,24}") {
            match DotNetRegex::new(&pattern) {
                Ok(r) => {
                    // Using the result does not panic either.
                    let _ = r.is_match("ab1 <x>-[]");
                    let _ = r.replace_all("ab1 <x>", "$1${a}$$$&");
                }
                Err(e) => prop_assert!(e.offset <= pattern.chars().count(), "{e}"),
            }
        }

        #[test]
        fn escaped_literal_matches_itself(s in any::<String>()) {
            let exact = DotNetRegex::new(&format!("^{}$", escape(&s)));
            prop_assert!(exact.is_ok(), "{:?}", exact);
            if let Ok(exact) = exact {
                prop_assert!(exact.is_match(&s));
            }
            let r = DotNetRegex::new(&escape(&s));
            prop_assert!(r.is_ok(), "{:?}", r);
            if let Ok(r) = r {
                let m = r.regex().find(&s).map(|m| (m.start(), m.end()));
                prop_assert_eq!(m, Some((0, s.len())));
            }
        }

        #[test]
        fn escaped_literal_is_not_a_pattern(s in "[a-c.*+?()|]{1,8}", t in "[a-c.*+?()|]{0,8}") {
            // The escaped pattern matches text only where the literal occurs in it.
            let r = DotNetRegex::new(&escape(&s));
            prop_assert!(r.is_ok());
            if let Ok(r) = r {
                prop_assert_eq!(r.is_match(&t), t.contains(s.as_str()));
            }
        }

        #[test]
        fn replacement_without_dollar_is_literal(repl in "[^$]{0,12}", text in "[ab ]{0,8}") {
            let r = DotNetRegex::new("a").map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(r.replace_all(&text, &repl), text.replace('a', &repl));
        }
    }
}
