//! Diagnostics of the rule language: spans, stable codes, messages with labels and hints, and
//! their rendering with the offending source line and a caret.
//!
//! This module only describes and formats problems; it does not detect any. It is pure: no I/O —
//! rendering returns a `String` and the caller decides where it goes.

use std::fmt;

/// A byte range `start..end` in an expression's text.
///
/// Offsets are bytes (so slicing is cheap); [`Span::line_col`] converts to the 1-based line and
/// column, counting Unicode scalar values, that users see (spec §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Span {
    /// First byte of the range.
    pub start: usize,
    /// One past the last byte of the range.
    pub end: usize,
}

impl Span {
    /// A span from `start` to `end` (bytes); `end` below `start` is raised to `start`.
    pub fn new(start: usize, end: usize) -> Span {
        Span {
            start,
            end: end.max(start),
        }
    }

    /// The smallest span covering both.
    pub fn to(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }

    /// The 1-based line and column of `start` in `text`; the column counts Unicode scalar values
    /// (not bytes, not UTF-16 units). Lines are separated by `\n`. An offset past the end, or inside
    /// a multi-byte character, is clamped to the preceding character boundary.
    pub fn line_col(&self, text: &str) -> (usize, usize) {
        let at = floor_boundary(text, self.start);
        let before = &text[..at];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }
}

fn floor_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Severity {
    /// The rule is rejected.
    Error,
    /// The rule is accepted; the author should look at it.
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// Stable diagnostic codes. A number is never reused for a different meaning.
///
/// Ranges:
/// * `E00xx` — limits (length, nesting);
/// * `E01xx` — lexical and syntax errors (`E0101`–`E0119`) and structural checks of spec §3.1
///   (`E0120`–`E0189`); `W0190`–`W0199` — warnings of the checker;
/// * `E02xx` — invalid literal arguments (spec §3.1 item 5). `E0201`–`E0205` are checked here;
///   `E0210` (invalid regular-expression literal) and `E0211` (invalid date/time format literal) are
///   reserved for the checks of the regex and date-format modules;
/// * `E03xx` — evaluation errors; `E04xx` — scoping filters; `E05xx` — rule sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Code {
    /// The expression is longer than 10,000 characters.
    ExpressionTooLong,
    /// Calls and parentheses are nested deeper than 128 levels.
    NestingTooDeep,
    /// A string literal has no closing `"`.
    UnterminatedString,
    /// A string is delimited by typographic (`“ ”`) or single quotes instead of `"`.
    WrongQuote,
    /// `[]` or `[   ]`.
    EmptyAttributeName,
    /// `[` without a closing `]`.
    UnterminatedAttribute,
    /// A number literal does not fit a signed 64-bit integer (or, for decimals, 38 digits).
    NumberOutOfRange,
    /// A malformed number literal: leading `+`, exponent, trailing letters, `1.`, `&H` without digits.
    MalformedNumber,
    /// A character that starts no token.
    UnexpectedCharacter,
    /// A Connect Sync or other operator the language does not have (`&`, `&&`, `||`, `+`, `-`, `*`, …).
    UnsupportedOperator,
    /// A Connect Sync parameter `%Name%` or variable `$name`.
    ParameterOrVariable,
    /// A bare identifier that is not a constant.
    UnknownIdentifier,
    /// `a = b = c`.
    ChainedComparison,
    /// A token where the grammar does not allow it.
    UnexpectedToken,
    /// The text ends where more is required.
    UnexpectedEnd,
    /// A call of a function that does not exist.
    UnknownFunction,
    /// A call with a slot count outside the function's arity.
    WrongArity,
    /// An empty slot where the parameter is required.
    RequiredArgumentOmitted,
    /// `IgnoreFlowIfNullOrEmpty` that is not the outermost call.
    MisplacedFlowWrapper,
    /// `SelectUniqueValue` or an app-role-assignments function that is not the outermost call.
    MisplacedTopLevelFunction,
    /// `Switch` with an odd number of slots.
    SwitchOddSlots,
    /// `Replace` with a combination of provided slots that selects no mode.
    InvalidReplaceCombination,
    /// An app-role function whose argument is not `[appRoleAssignments]`.
    AppRoleArgument,
    /// `SelectUniqueValue` with fewer than two rules.
    SelectUniqueValueTooFewRules,
    /// A literal `DateAdd`/`DateDiff` interval that is not one of the seven.
    InvalidInterval,
    /// A literal culture name that is not a well-formed language tag.
    InvalidCulture,
    /// Literal `RandomString` counts that contradict each other or are out of range.
    InvalidRandomStringCounts,
    /// A literal `InStr` compare type that is neither binary nor text compare.
    InvalidCompareType,
    /// A literal `FormatDateTime` `dateTimeStyles` with an unknown style name.
    InvalidDateTimeStyles,
    /// A literal regular expression outside the supported .NET subset or malformed (spec §9).
    InvalidRegexLiteral,
    /// A literal .NET date/time format string that is malformed (spec §8).
    InvalidDateFormatLiteral,
    /// Another literal argument that makes the call fail for every object (spec §3.1 item 5).
    InvalidLiteralArgument,
    /// An evaluation error (`E03xx`), with its number from [`crate::rules::value::ERROR_CODES`].
    Evaluation(u16),
    /// Warning: a function name spelled differently from its canonical form.
    NonCanonicalFunctionName,
    /// Warning: an `IIF` condition form that Entra does not support.
    UnportableIifCondition,
}

impl Code {
    /// Every code (errors in number order, then warnings).
    pub const ALL: &'static [Code] = &[
        Code::ExpressionTooLong,
        Code::NestingTooDeep,
        Code::UnterminatedString,
        Code::WrongQuote,
        Code::EmptyAttributeName,
        Code::UnterminatedAttribute,
        Code::NumberOutOfRange,
        Code::MalformedNumber,
        Code::UnexpectedCharacter,
        Code::UnsupportedOperator,
        Code::ParameterOrVariable,
        Code::UnknownIdentifier,
        Code::ChainedComparison,
        Code::UnexpectedToken,
        Code::UnexpectedEnd,
        Code::UnknownFunction,
        Code::WrongArity,
        Code::RequiredArgumentOmitted,
        Code::MisplacedFlowWrapper,
        Code::MisplacedTopLevelFunction,
        Code::SwitchOddSlots,
        Code::InvalidReplaceCombination,
        Code::AppRoleArgument,
        Code::SelectUniqueValueTooFewRules,
        Code::InvalidInterval,
        Code::InvalidCulture,
        Code::InvalidRandomStringCounts,
        Code::InvalidCompareType,
        Code::InvalidDateTimeStyles,
        Code::InvalidRegexLiteral,
        Code::InvalidDateFormatLiteral,
        Code::InvalidLiteralArgument,
        Code::NonCanonicalFunctionName,
        Code::UnportableIifCondition,
    ];

    /// The stable number of the code.
    pub fn number(self) -> u16 {
        match self {
            Code::ExpressionTooLong => 1,
            Code::NestingTooDeep => 2,
            Code::UnterminatedString => 101,
            Code::WrongQuote => 102,
            Code::EmptyAttributeName => 103,
            Code::UnterminatedAttribute => 104,
            Code::NumberOutOfRange => 105,
            Code::MalformedNumber => 106,
            Code::UnexpectedCharacter => 107,
            Code::UnsupportedOperator => 108,
            Code::ParameterOrVariable => 109,
            Code::UnknownIdentifier => 110,
            Code::ChainedComparison => 111,
            Code::UnexpectedToken => 112,
            Code::UnexpectedEnd => 113,
            Code::UnknownFunction => 120,
            Code::WrongArity => 121,
            Code::RequiredArgumentOmitted => 122,
            Code::MisplacedFlowWrapper => 123,
            Code::MisplacedTopLevelFunction => 124,
            Code::SwitchOddSlots => 125,
            Code::InvalidReplaceCombination => 126,
            Code::AppRoleArgument => 127,
            Code::SelectUniqueValueTooFewRules => 128,
            Code::InvalidInterval => 201,
            Code::InvalidCulture => 202,
            Code::InvalidRandomStringCounts => 203,
            Code::InvalidCompareType => 204,
            Code::InvalidDateTimeStyles => 205,
            Code::InvalidRegexLiteral => 210,
            Code::InvalidDateFormatLiteral => 211,
            Code::InvalidLiteralArgument => 212,
            Code::Evaluation(n) => n,
            Code::NonCanonicalFunctionName => 190,
            Code::UnportableIifCondition => 191,
        }
    }

    /// The severity diagnostics with this code have.
    pub fn severity(self) -> Severity {
        match self {
            Code::NonCanonicalFunctionName | Code::UnportableIifCondition => Severity::Warning,
            _ => Severity::Error,
        }
    }

    /// The code as written in messages: `E0120`, or `W0190` for warnings.
    pub fn as_str(self) -> String {
        let letter = match self.severity() {
            Severity::Error => 'E',
            Severity::Warning => 'W',
        };
        format!("{letter}{:04}", self.number())
    }

    /// Looks a code up by its written form (`E0120`, `W0190`).
    pub fn from_str_code(s: &str) -> Option<Code> {
        Code::ALL.iter().copied().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

/// One problem found in an expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Stable code.
    pub code: Code,
    /// Error or warning.
    pub severity: Severity,
    /// One-line description of the problem.
    pub message: String,
    /// Where the problem is (the primary span).
    pub span: Span,
    /// Secondary spans with a short note each.
    pub labels: Vec<(Span, String)>,
    /// What to do about it, when there is something to suggest.
    pub hint: Option<String>,
}

impl Diagnostic {
    /// A diagnostic with the code's own severity.
    pub fn new(code: Code, span: Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            code,
            severity: code.severity(),
            message: message.into(),
            span,
            labels: Vec::new(),
            hint: None,
        }
    }

    /// Adds a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Diagnostic {
        self.hint = Some(hint.into());
        self
    }

    /// Adds a secondary label.
    pub fn with_label(mut self, span: Span, note: impl Into<String>) -> Diagnostic {
        self.labels.push((span, note.into()));
        self
    }

    /// Whether this is an error (not a warning).
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// Renders the diagnostic for a human: the code and message, the position in the file (through
    /// `origin`), the source line(s) with a caret under the span, the labels and the hint.
    ///
    /// `text` is the expression text the span refers to. Tabs are shown as four spaces (carets stay
    /// aligned); a span over several lines underlines each of its lines (at most four are shown).
    pub fn render(&self, text: &str, origin: &Origin) -> String {
        render_report(
            &format!("{}[{}]: {}", self.severity, self.code, self.message),
            text,
            origin,
            self.span,
            &self.labels,
            self.hint.as_deref(),
        )
    }
}

/// Renders a report in the layout of [`Diagnostic::render`]: `headline`, the position in the
/// file (through `origin`) with the rule and attribute, the source line(s) with a caret under
/// `span`, the `labels` and the `hint`.
///
/// For problems that are not diagnostics of an expression — a field of a configuration file —
/// `text` is the whole file and `origin` its name with the default base (line 1, column 1):
///
/// ```
/// use dirsync::rules::diagnostic::{render_report, Origin, Span};
/// let text = "[source]\ndelta = \"usn\"\n";
/// let at = text.find("\"usn\"").unwrap();
/// let origin = Origin { file: Some("sync.toml".into()), ..Origin::default() };
/// let shown = render_report("error: unknown variant `usn`", text, &origin, Span::new(at, at + 5), &[], None);
/// assert_eq!(shown, "error: unknown variant `usn`\n --> sync.toml:2:9\n  |\n2 | delta = \"usn\"\n  |         ^^^^^\n");
/// ```
pub fn render_report(
    headline: &str,
    text: &str,
    origin: &Origin,
    span: Span,
    labels: &[(Span, String)],
    hint: Option<&str>,
) -> String {
    let mut out = format!("{headline}\n");
    let (line, col) = span.line_col(text);
    let (fline, fcol) = origin.file_position(line, col);
    let mut context = Vec::new();
    if let Some(rule) = &origin.rule {
        context.push(format!("rule \"{rule}\""));
    }
    if let Some(attribute) = &origin.attribute {
        context.push(format!("attribute \"{attribute}\""));
    }
    let file = origin.file.as_deref().unwrap_or("<expression>");
    let context = if context.is_empty() {
        String::new()
    } else {
        format!(" ({})", context.join(", "))
    };
    // Every line number shown, to size the gutter.
    let mut shown = vec![span];
    shown.extend(labels.iter().map(|(s, _)| *s));
    let widest = shown
        .iter()
        .map(|s| {
            let (l, _) = Span::new(s.end, s.end).line_col(text);
            origin.file_position(l, 1).0
        })
        .max()
        .unwrap_or(fline)
        .max(fline);
    let gutter = widest.to_string().len();
    let pad = " ".repeat(gutter);
    out.push_str(&format!("{pad}--> {file}:{fline}:{fcol}{context}\n"));
    out.push_str(&format!("{pad} |\n"));
    snippet(&mut out, text, origin, span, '^', "", gutter);
    for (span, note) in labels {
        snippet(&mut out, text, origin, *span, '-', note, gutter);
    }
    if let Some(hint) = hint {
        out.push_str(&format!("{pad} = help: {hint}\n"));
    }
    out
}

/// Writes the lines a span covers, each followed by an underline of `mark`s; `note` follows the
/// last underline.
fn snippet(
    out: &mut String,
    text: &str,
    origin: &Origin,
    span: Span,
    mark: char,
    note: &str,
    gutter: usize,
) {
    const MAX_LINES: usize = 4;
    let start = floor_boundary(text, span.start);
    let end = floor_boundary(text, span.end).max(start);
    let (first_line, _) = Span::new(start, start).line_col(text);
    let mut line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let mut number = first_line;
    let mut count = 0;
    loop {
        let line_end = text[line_start..]
            .find('\n')
            .map_or(text.len(), |i| line_start + i);
        let line = &text[line_start..line_end];
        let shown = line.strip_suffix('\r').unwrap_or(line);
        let from = start.max(line_start) - line_start;
        let to = end.min(line_end) - line_start;
        let file_line = origin.file_position(number, 1).0;
        let is_last = end <= line_end || line_end == text.len();
        let (lead, width) = underline_geometry(shown, from, to);
        let width = if width == 0 && (is_last || from == to) {
            1
        } else {
            width
        };
        out.push_str(&format!(
            "{file_line:>gutter$} | {}\n",
            expand_tabs(shown),
            gutter = gutter
        ));
        let mut underline = format!(
            "{} | {}{}",
            " ".repeat(gutter),
            " ".repeat(lead),
            mark.to_string().repeat(width)
        );
        count += 1;
        if is_last || count == MAX_LINES {
            if !is_last {
                underline.push_str(" ...");
            }
            if !note.is_empty() {
                underline.push(' ');
                underline.push_str(note);
            }
            out.push_str(underline.trim_end());
            out.push('\n');
            break;
        }
        out.push_str(underline.trim_end());
        out.push('\n');
        line_start = line_end + 1;
        number += 1;
    }
}

/// Display columns before byte `from` and between `from` and `to` of `line`, tabs counting four.
fn underline_geometry(line: &str, from: usize, to: usize) -> (usize, usize) {
    let width_of = |s: &str| {
        s.chars()
            .map(|c| if c == '\t' { 4 } else { 1 })
            .sum::<usize>()
    };
    let from = floor_boundary(line, from);
    let to = floor_boundary(line, to).max(from);
    (width_of(&line[..from]), width_of(&line[from..to]))
}

fn expand_tabs(line: &str) -> String {
    line.replace('\t', "    ")
}

/// Where an expression lives, so that diagnostics can name the rule and attribute and report the
/// position in the configuration file rather than in the bare expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The rule (mapping, projection) the expression belongs to.
    pub rule: Option<String>,
    /// The target attribute the expression computes.
    pub attribute: Option<String>,
    /// The configuration file, as it should be shown.
    pub file: Option<String>,
    /// 1-based line in the file where the expression text starts.
    pub base_line: usize,
    /// 1-based column (Unicode scalar values) in the file where the expression text starts.
    pub base_col: usize,
}

impl Default for Origin {
    fn default() -> Origin {
        Origin {
            rule: None,
            attribute: None,
            file: None,
            base_line: 1,
            base_col: 1,
        }
    }
}

impl Origin {
    /// Maps a 1-based line/column inside the expression to the file: the first line is shifted by
    /// `base_col`, every line by `base_line`.
    pub fn file_position(&self, line: usize, col: usize) -> (usize, usize) {
        let base_line = self.base_line.max(1);
        let base_col = self.base_col.max(1);
        if line <= 1 {
            (base_line, base_col + col.saturating_sub(1))
        } else {
            (base_line + line - 1, col)
        }
    }
}

impl fmt::Display for Diagnostic {
    /// One line without the source text: code, message, byte offset and hint.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}[{}]: {} (at byte {})",
            self.severity, self.code, self.message, self.span.start
        )?;
        if let Some(hint) = &self.hint {
            write!(f, "; help: {hint}")?;
        }
        Ok(())
    }
}

/// One step of a path into a TOML document: a table key or an array index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TomlStep<'k> {
    /// A key of a table.
    Key(&'k str),
    /// An index into an array (of tables, too: `[[rule]]`).
    Index(usize),
}

/// Where the values of a TOML document are, so that a message about a field — found after the
/// document was read, by a check serde cannot make — points at its line and column.
///
/// ```
/// use dirsync::rules::diagnostic::{TomlSpans, TomlStep::{Index, Key}};
/// let text = "[[rule]]\nname = \"users\"\njoin = [[\"mail\"]]\n";
/// let spans = TomlSpans::parse(text);
/// let at = spans.span(&[Key("rule"), Index(0), Key("join"), Index(0), Index(0)]).unwrap();
/// assert_eq!(&text[at.start..at.end], "\"mail\"");
/// assert_eq!(at.line_col(text), (3, 10));
/// assert!(spans.span(&[Key("rule"), Index(1)]).is_none());
/// ```
#[derive(Default)]
pub struct TomlSpans<'a> {
    doc: Option<toml::Spanned<toml::de::DeTable<'a>>>,
}

impl fmt::Debug for TomlSpans<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TomlSpans")
            .field("parsed", &self.doc.is_some())
            .finish()
    }
}

impl<'a> TomlSpans<'a> {
    /// The positions in `text`; none at all when it is not valid TOML.
    pub fn parse(text: &'a str) -> TomlSpans<'a> {
        TomlSpans {
            doc: toml::de::DeTable::parse(text).ok(),
        }
    }

    /// The span of the value at `path` (for a table written as `[header]`, its header), if the
    /// document has it.
    pub fn span(&self, path: &[TomlStep<'_>]) -> Option<Span> {
        use toml::de::DeValue;
        let doc = self.doc.as_ref()?;
        let mut span = doc.span();
        let mut node: Option<&DeValue<'_>> = None;
        for step in path {
            let value = match (step, node) {
                (TomlStep::Key(k), None) => toml_lookup(doc.get_ref(), k)?,
                (TomlStep::Key(k), Some(DeValue::Table(t))) => toml_lookup(t, k)?,
                (TomlStep::Index(i), Some(DeValue::Array(a))) => a.get(*i)?,
                _ => return None,
            };
            span = value.span();
            node = Some(value.get_ref());
        }
        Some(Span::new(span.start, span.end))
    }

    /// The span of the first of `paths` the document has.
    pub fn first_span(&self, paths: &[&[TomlStep<'_>]]) -> Option<Span> {
        paths.iter().find_map(|p| self.span(p))
    }
}

fn toml_lookup<'t, 'i>(
    table: &'t toml::de::DeTable<'i>,
    key: &str,
) -> Option<&'t toml::Spanned<toml::de::DeValue<'i>>> {
    table
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == key)
        .map(|(_, v)| v)
}

/// A list of diagnostics; the error type of parsing and compiling.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// Whether at least one diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.0.iter().any(Diagnostic::is_error)
    }

    /// The diagnostics, in the order they were found.
    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.0.iter()
    }

    /// Renders every diagnostic (see [`Diagnostic::render`]), separated by blank lines.
    pub fn render(&self, text: &str, origin: &Origin) -> String {
        self.0
            .iter()
            .map(|d| d.render(text, origin))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl From<Vec<Diagnostic>> for Diagnostics {
    fn from(v: Vec<Diagnostic>) -> Diagnostics {
        Diagnostics(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_numbers_are_unique_and_all_is_complete() {
        let mut numbers: Vec<u16> = Code::ALL.iter().map(|c| c.number()).collect();
        let n = numbers.len();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), n, "duplicate code numbers");
        for c in Code::ALL {
            assert_eq!(Code::from_str_code(&c.as_str()), Some(*c));
        }
        assert_eq!(Code::UnknownFunction.as_str(), "E0120");
        assert_eq!(Code::NonCanonicalFunctionName.as_str(), "W0190");
        assert_eq!(Code::ExpressionTooLong.as_str(), "E0001");
    }

    #[test]
    fn line_col_counts_scalar_values() {
        let text = "ab\nçé[x]";
        let at = text.find('[').map_or(0, |i| i);
        assert_eq!(Span::new(at, at + 1).line_col(text), (2, 3));
        assert_eq!(Span::new(0, 0).line_col(text), (1, 1));
        assert_eq!(Span::new(100, 100).line_col(text), (2, 6));
        // Inside a multi-byte character: clamped back.
        assert_eq!(Span::new(4, 4).line_col(text), (2, 1));
    }

    #[test]
    fn render_with_origin() {
        let text = "Coalese([givenName], \"x\")";
        let d = Diagnostic::new(
            Code::UnknownFunction,
            Span::new(0, 7),
            "unknown function `Coalese`",
        )
        .with_hint("did you mean `Coalesce`?");
        let origin = Origin {
            rule: Some("users".into()),
            attribute: Some("displayName".into()),
            file: Some("rules.toml".into()),
            base_line: 14,
            base_col: 16,
        };
        let expected = "\
error[E0120]: unknown function `Coalese`
  --> rules.toml:14:16 (rule \"users\", attribute \"displayName\")
   |
14 | Coalese([givenName], \"x\")
   | ^^^^^^^
   = help: did you mean `Coalesce`?
";
        assert_eq!(d.render(text, &origin), expected);
    }

    #[test]
    fn render_multiline_tabs_and_labels() {
        let text = "IIF(\n\t[a] = 1,\n\t\"x\" \"y\")";
        let start = text.find("\"y\"").map_or(0, |i| i);
        let d = Diagnostic::new(
            Code::UnexpectedToken,
            Span::new(start, start + 3),
            "unexpected string",
        )
        .with_label(Span::new(3, 4), "call opened here");
        let origin = Origin {
            base_line: 9,
            base_col: 5,
            ..Origin::default()
        };
        let expected = "\
error[E0112]: unexpected string
  --> <expression>:11:6
   |
11 |     \"x\" \"y\")
   |         ^^^
 9 | IIF(
   |    - call opened here
";
        assert_eq!(d.render(text, &origin), expected);
    }

    #[test]
    fn render_span_over_lines_and_at_end() {
        let text = "Join(\",\",\n[a]";
        let d = Diagnostic::new(Code::UnexpectedEnd, Span::new(4, text.len()), "unclosed");
        let out = d.render(text, &Origin::default());
        assert!(
            out.contains("1 | Join(\",\",\n  |     ^^^^^\n2 | [a]\n  | ^^^\n"),
            "{out}"
        );
        let d = Diagnostic::new(
            Code::UnexpectedEnd,
            Span::new(text.len(), text.len()),
            "end",
        );
        let out = d.render(text, &Origin::default());
        assert!(out.contains("2 | [a]\n  |    ^\n"), "{out}");
        assert!(out.contains("--> <expression>:2:4"), "{out}");
    }

    #[test]
    fn display_lists_all_messages() {
        let ds = Diagnostics(vec![
            Diagnostic::new(Code::UnexpectedEnd, Span::new(1, 1), "one"),
            Diagnostic::new(Code::UnknownIdentifier, Span::new(2, 3), "two").with_hint("h"),
        ]);
        assert_eq!(
            ds.to_string(),
            "error[E0113]: one (at byte 1)\nerror[E0110]: two (at byte 2); help: h"
        );
        assert!(ds.has_errors());
    }
}
