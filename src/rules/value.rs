//! Run-time values of the expression language and their conversions (spec §4) and comparisons
//! (spec §5), plus the evaluation error type with its stable codes.
//!
//! Everything here is a pure function of its arguments: no clock, no random source, no I/O.
//! Date/time text is read by [`crate::rules::datetime`].

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use smol_str::SmolStr;

use crate::rules::context::AppRoleValue;
use crate::rules::datetime;

/// Stable evaluation error codes (300–399). Codes are never reused for another meaning.
pub mod codes {
    /// A function was handed fewer or more slots than its arity, or a required slot was omitted.
    pub const ARGUMENT_COUNT: u16 = 300;
    /// A value cannot be converted to a string (a Multi of two or more values, or a Structured value).
    pub const NOT_A_STRING: u16 = 301;
    /// A Multi of two or more values where exactly one value is required.
    pub const MULTI_VALUED: u16 = 302;
    /// A value is not an integer (§4.4) or does not fit in 64 bits.
    pub const NOT_AN_INTEGER: u16 = 303;
    /// Null reached a control parameter (§4.9).
    pub const NULL_CONTROL: u16 = 304;
    /// An `IIF` condition is neither boolean-like nor Null (§4.5).
    pub const NOT_BOOLEAN: u16 = 305;
    /// Text is not an accepted date/time (§4.6) or names an impossible date.
    pub const INVALID_DATETIME: u16 = 306;
    /// A date/time or file time is outside 0001-01-01 … 9999-12-31, or arithmetic overflowed.
    pub const DATETIME_OUT_OF_RANGE: u16 = 307;
    /// A DateAdd/DateDiff interval is not one of `yyyy m d ww h n s`.
    pub const INVALID_INTERVAL: u16 = 308;
    /// A .NET date/time format string is malformed (§8).
    pub const INVALID_FORMAT: u16 = 309;
    /// Input text does not match the .NET input format of `FormatDateTime`.
    pub const FORMAT_MISMATCH: u16 = 310;
    /// An unknown `DateTimeStyles` name.
    pub const INVALID_DATETIME_STYLES: u16 = 311;
    /// A malformed culture name (language tag).
    pub const INVALID_CULTURE: u16 = 312;
    /// A regular expression is malformed or outside the supported dialect (§9).
    pub const INVALID_REGEX: u16 = 313;
    /// A regular expression group name or a replacement group reference is not defined.
    pub const UNKNOWN_GROUP: u16 = 314;
    /// `Item` index below 1 or beyond the last value.
    pub const INDEX_OUT_OF_RANGE: u16 = 315;
    /// `InStr` start position below 1.
    pub const INVALID_START: u16 = 316;
    /// `InStr` compare type is not `vbBinaryCompare`/`vbTextCompare`/0/1.
    pub const INVALID_COMPARE_TYPE: u16 = 317;
    /// `Split` delimiter is empty.
    pub const EMPTY_DELIMITER: u16 = 318;
    /// `RandomString` counts are invalid or contradict each other.
    pub const INVALID_RANDOM_STRING: u16 = 319;
    /// `DefaultDomain()` without a configured default domain.
    pub const NO_DEFAULT_DOMAIN: u16 = 320;
    /// `<`, `<=`, `>`, `>=` with a Boolean operand.
    pub const UNORDERED_COMPARISON: u16 = 321;
    /// `Replace` called with a combination of provided slots that selects no mode.
    pub const INVALID_REPLACE_MODE: u16 = 322;
    /// A lazy or structural function (`IIF`, `Switch`, …) was passed to the eager function library;
    /// the evaluator owns it.
    pub const EVALUATOR_OWNED: u16 = 323;
    /// `SelectUniqueValue`: every candidate is taken (the not-unique outcome, as an error).
    pub const NOT_UNIQUE: u16 = 324;
}

/// Every evaluation error code: `(code, name, one-line description)`.
pub const ERROR_CODES: &[(u16, &str, &str)] = &[
    (
        codes::ARGUMENT_COUNT,
        "argument-count",
        "wrong slot count or a required slot omitted",
    ),
    (
        codes::NOT_A_STRING,
        "not-a-string",
        "value cannot be converted to one string",
    ),
    (
        codes::MULTI_VALUED,
        "multi-valued",
        "several values where one is required",
    ),
    (
        codes::NOT_AN_INTEGER,
        "not-an-integer",
        "value is not a 64-bit integer",
    ),
    (
        codes::NULL_CONTROL,
        "null-control",
        "Null in a control parameter",
    ),
    (
        codes::NOT_BOOLEAN,
        "not-boolean",
        "condition is not boolean-like",
    ),
    (
        codes::INVALID_DATETIME,
        "invalid-datetime",
        "text is not an accepted date/time",
    ),
    (
        codes::DATETIME_OUT_OF_RANGE,
        "datetime-out-of-range",
        "date/time outside years 1–9999",
    ),
    (
        codes::INVALID_INTERVAL,
        "invalid-interval",
        "interval is not yyyy, m, d, ww, h, n or s",
    ),
    (
        codes::INVALID_FORMAT,
        "invalid-format",
        "malformed .NET date/time format string",
    ),
    (
        codes::FORMAT_MISMATCH,
        "format-mismatch",
        "text does not match the input format",
    ),
    (
        codes::INVALID_DATETIME_STYLES,
        "invalid-datetime-styles",
        "unknown DateTimeStyles name",
    ),
    (
        codes::INVALID_CULTURE,
        "invalid-culture",
        "malformed culture name",
    ),
    (
        codes::INVALID_REGEX,
        "invalid-regex",
        "malformed or unsupported regular expression",
    ),
    (
        codes::UNKNOWN_GROUP,
        "unknown-group",
        "regular expression group not defined",
    ),
    (
        codes::INDEX_OUT_OF_RANGE,
        "index-out-of-range",
        "Item index below 1 or past the end",
    ),
    (codes::INVALID_START, "invalid-start", "InStr start below 1"),
    (
        codes::INVALID_COMPARE_TYPE,
        "invalid-compare-type",
        "unknown InStr compare type",
    ),
    (
        codes::EMPTY_DELIMITER,
        "empty-delimiter",
        "Split delimiter is empty",
    ),
    (
        codes::INVALID_RANDOM_STRING,
        "invalid-random-string",
        "RandomString counts invalid",
    ),
    (
        codes::NO_DEFAULT_DOMAIN,
        "no-default-domain",
        "no default domain configured",
    ),
    (
        codes::UNORDERED_COMPARISON,
        "unordered-comparison",
        "ordering comparison on a Boolean",
    ),
    (
        codes::INVALID_REPLACE_MODE,
        "invalid-replace-mode",
        "Replace slots select no mode",
    ),
    (
        codes::EVALUATOR_OWNED,
        "evaluator-owned",
        "function is evaluated by the evaluator",
    ),
    (
        codes::NOT_UNIQUE,
        "not-unique",
        "SelectUniqueValue: every candidate is already used in the target",
    ),
];

/// An evaluation error: a stable code (see [`ERROR_CODES`]), a message naming what was wrong and
/// with which value, and the 0-based argument slot it concerns, if any.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("E{code}: {message}")]
pub struct EvalError {
    /// Stable code, 300–399.
    pub code: u16,
    /// Human-readable message, e.g. `Item: index "x" is not an integer`.
    pub message: String,
    /// The 0-based argument slot the error concerns.
    pub arg: Option<usize>,
}

impl EvalError {
    /// An error without slot information.
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        EvalError {
            code,
            message: message.into(),
            arg: None,
        }
    }

    /// Attaches context: the function, the slot and the parameter's name are prefixed to the
    /// message (`Item: index …`). The slot is kept if one is already set.
    pub fn at(mut self, function: impl fmt::Display, slot: usize, param: &str) -> Self {
        self.message = if param.is_empty() {
            format!("{function}: {}", self.message)
        } else {
            format!("{function}: {param} {}", self.message)
        };
        if self.arg.is_none() {
            self.arg = Some(slot);
        }
        self
    }

    /// Prefixes the function name only.
    pub fn in_function(mut self, function: impl fmt::Display) -> Self {
        self.message = format!("{function}: {}", self.message);
        self
    }
}

/// Shorthand for evaluation results.
pub type EvalResult<T> = Result<T, EvalError>;

// ---------------------------------------------------------------------------------------------
// Decimal
// ---------------------------------------------------------------------------------------------

/// An exact decimal number: `mantissa × 10^-scale`, always normalised (no trailing zero digits in
/// the fraction, so equal numbers have equal representations). Only converted and compared; the
/// language has no arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Decimal {
    /// The mantissa's two's-complement bits as two words (an `i128` field would make every
    /// expression value 16-byte aligned and half again as large).
    mantissa: [u64; 2],
    scale: u32,
}

impl Decimal {
    /// Largest supported scale (fraction digits).
    pub const MAX_SCALE: u32 = 28;

    /// `mantissa × 10^-scale`, normalised. `None` when `scale` exceeds [`Decimal::MAX_SCALE`].
    pub fn new(mantissa: i128, scale: u32) -> Option<Self> {
        if scale > Self::MAX_SCALE {
            return None;
        }
        let (mut m, mut s) = (mantissa, scale);
        while s > 0 && m % 10 == 0 {
            m /= 10;
            s -= 1;
        }
        Some(Decimal {
            mantissa: split(m),
            scale: s,
        })
    }

    /// Reads `-?digits(.digits)?` (no exponent, no `+`, no separators). `None` otherwise or when
    /// the value does not fit (38 significant digits, 28 fraction digits).
    pub fn parse(text: &str) -> Option<Self> {
        let n = NumText::parse(text)?;
        let mut m: i128 = 0;
        for d in n.int.bytes().chain(n.frac.bytes()) {
            m = m.checked_mul(10)?.checked_add(i128::from(d - b'0'))?;
        }
        if n.neg {
            m = -m;
        }
        Decimal::new(m, u32::try_from(n.frac.len()).ok()?)
    }

    /// The mantissa (`self = mantissa × 10^-scale`).
    pub fn mantissa(&self) -> i128 {
        let [lo, hi] = self.mantissa;
        ((u128::from(hi) << 64) | u128::from(lo)) as i128
    }

    /// The number of fraction digits.
    pub fn scale(&self) -> u32 {
        self.scale
    }

    /// `true` when there is no fractional part.
    pub fn is_integer(&self) -> bool {
        self.scale == 0
    }

    /// `true` when the value is zero.
    pub fn is_zero(&self) -> bool {
        self.mantissa == [0, 0]
    }

    /// The value as `i64` when it is an integer within range.
    pub fn to_i64(&self) -> Option<i64> {
        if self.scale == 0 {
            i64::try_from(self.mantissa()).ok()
        } else {
            None
        }
    }
}

/// An `i128`'s bits as [low, high] words.
fn split(m: i128) -> [u64; 2] {
    let bits = m as u128;
    [bits as u64, (bits >> 64) as u64]
}

impl From<i64> for Decimal {
    fn from(v: i64) -> Self {
        Decimal {
            mantissa: split(i128::from(v)),
            scale: 0,
        }
    }
}

impl fmt::Display for Decimal {
    /// Shortest text that reads back as the same value: no exponent, no trailing zeros (§4.3).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.mantissa();
        let digits = m.unsigned_abs().to_string();
        let sign = if m < 0 { "-" } else { "" };
        let scale = self.scale as usize;
        if scale == 0 {
            return write!(f, "{sign}{digits}");
        }
        let padded = if digits.len() <= scale {
            format!("{}{}", "0".repeat(scale + 1 - digits.len()), digits)
        } else {
            digits
        };
        let (int, frac) = padded.split_at(padded.len() - scale);
        write!(f, "{sign}{int}.{frac}")
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Decimal {
    fn cmp(&self, other: &Self) -> Ordering {
        NumText::parse(&self.to_string())
            .zip(NumText::parse(&other.to_string()))
            .map(|(a, b)| a.cmp_num(&b))
            .unwrap_or(Ordering::Equal)
    }
}

/// A number read from text, kept as digit strings so that comparison is exact for any length:
/// `int` without leading zeros, `frac` without trailing zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NumText {
    neg: bool,
    int: String,
    frac: String,
}

impl NumText {
    /// Optional `-`, ASCII digits, optional `.` and digits. No whitespace, no `+`.
    fn parse_strict(text: &str, allow_plus: bool) -> Option<Self> {
        let (neg, rest) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') if allow_plus => (false, &text[1..]),
            _ => (false, text),
        };
        let (int, frac) = match rest.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (rest, None),
        };
        if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if let Some(f) = frac {
            if f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
        }
        let int = int.trim_start_matches('0').to_string();
        let frac = frac.unwrap_or("").trim_end_matches('0').to_string();
        let zero = int.is_empty() && frac.is_empty();
        Some(NumText {
            neg: neg && !zero,
            int,
            frac,
        })
    }

    /// The strict form of [`Decimal::parse`].
    pub(crate) fn parse(text: &str) -> Option<Self> {
        Self::parse_strict(text, false)
    }

    /// Text that "reads as a number" for comparisons and truthiness (§4.5, §5): surrounding
    /// whitespace allowed, optional sign, digits, optional fraction.
    pub(crate) fn parse_lenient(text: &str) -> Option<Self> {
        Self::parse_strict(text.trim(), true)
    }

    fn from_value(v: &EvalValue) -> Option<Self> {
        match v {
            EvalValue::Integer(i) => Self::parse(&i.to_string()),
            EvalValue::Decimal(d) => Self::parse(&d.to_string()),
            EvalValue::String(s) | EvalValue::Reference(s) => Self::parse_lenient(s),
            _ => None,
        }
    }

    fn is_zero(&self) -> bool {
        self.int.is_empty() && self.frac.is_empty()
    }

    fn cmp_num(&self, other: &Self) -> Ordering {
        match (self.neg, other.neg) {
            (false, true) => return Ordering::Greater,
            (true, false) => return Ordering::Less,
            _ => {}
        }
        let magnitude = self
            .int
            .len()
            .cmp(&other.int.len())
            .then_with(|| self.int.cmp(&other.int))
            .then_with(|| self.frac.cmp(&other.frac));
        if self.neg {
            magnitude.reverse()
        } else {
            magnitude
        }
    }
}

// ---------------------------------------------------------------------------------------------
// EvalValue
// ---------------------------------------------------------------------------------------------

/// A run-time value (spec §4.1).
///
/// Invariant kept by [`EvalValue::multi`]: a `Multi` holds at least two values, none of them Null
/// or Multi.
#[derive(Debug, Clone, PartialEq)]
pub enum EvalValue {
    /// No value (absent attribute, `Null` literal, functions as stated).
    Null,
    /// A string of Unicode scalar values. A [`SmolStr`]: reading a model attribute value is a
    /// reference-count increment (short strings are held inline), not a copy.
    String(SmolStr),
    /// A signed 64-bit integer.
    Integer(i64),
    /// An exact decimal.
    Decimal(Decimal),
    /// A Boolean.
    Boolean(bool),
    /// An instant, held in UTC.
    DateTime(DateTime<Utc>),
    /// A reference (DN or identifier); behaves as its string form.
    Reference(SmolStr),
    /// Binary data; its string form is standard Base64.
    Binary(Vec<u8>),
    /// Two or more non-null values, in order.
    Multi(Vec<EvalValue>),
    /// App role entries (app-role functions only).
    Structured(Vec<AppRoleValue>),
}

impl From<&str> for EvalValue {
    fn from(s: &str) -> Self {
        EvalValue::String(SmolStr::new(s))
    }
}

impl From<String> for EvalValue {
    fn from(s: String) -> Self {
        EvalValue::String(SmolStr::from(s))
    }
}

impl From<Cow<'_, str>> for EvalValue {
    fn from(s: Cow<'_, str>) -> Self {
        EvalValue::String(SmolStr::from(s))
    }
}

impl From<SmolStr> for EvalValue {
    fn from(s: SmolStr) -> Self {
        EvalValue::String(s)
    }
}

impl From<i64> for EvalValue {
    fn from(i: i64) -> Self {
        EvalValue::Integer(i)
    }
}

impl From<bool> for EvalValue {
    fn from(b: bool) -> Self {
        EvalValue::Boolean(b)
    }
}

impl EvalValue {
    /// Builds a multi-valued result with the normalisation of §4.1: Nulls are dropped, nested
    /// Multis are flattened, one remaining value is returned as itself, none gives Null.
    pub fn multi(values: Vec<EvalValue>) -> EvalValue {
        let mut out = Vec::with_capacity(values.len());
        for v in values {
            match v {
                EvalValue::Null => {}
                EvalValue::Multi(inner) => {
                    out.extend(inner.into_iter().filter(|x| !matches!(x, EvalValue::Null)))
                }
                other => out.push(other),
            }
        }
        match out.len() {
            0 => EvalValue::Null,
            1 => out.pop().unwrap_or(EvalValue::Null),
            _ => EvalValue::Multi(out),
        }
    }

    /// `true` for [`EvalValue::Null`].
    pub fn is_null(&self) -> bool {
        matches!(self, EvalValue::Null)
    }

    /// A short name of the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            EvalValue::Null => "Null",
            EvalValue::String(_) => "String",
            EvalValue::Integer(_) => "Integer",
            EvalValue::Decimal(_) => "Decimal",
            EvalValue::Boolean(_) => "Boolean",
            EvalValue::DateTime(_) => "DateTime",
            EvalValue::Reference(_) => "Reference",
            EvalValue::Binary(_) => "Binary",
            EvalValue::Multi(_) => "Multi",
            EvalValue::Structured(_) => "Structured",
        }
    }

    /// The values as a list: Null → none, Multi → its values, anything else → itself.
    pub fn values(&self) -> &[EvalValue] {
        match self {
            EvalValue::Null => &[],
            EvalValue::Multi(v) => v,
            other => std::slice::from_ref(other),
        }
    }

    /// A Multi of one value unwrapped; a Multi of two or more values is an error
    /// ([`codes::MULTI_VALUED`]). Used where exactly one value is required (§4.7).
    pub fn single(&self) -> EvalResult<&EvalValue> {
        match self {
            EvalValue::Multi(v) if v.len() == 1 => Ok(&v[0]),
            EvalValue::Multi(v) if v.is_empty() => Ok(&EvalValue::Null),
            EvalValue::Multi(v) => Err(EvalError::new(
                codes::MULTI_VALUED,
                format!("has {} values where one is required", v.len()),
            )),
            other => Ok(other),
        }
    }

    /// Conversion to String (§4.3). Null → `Ok(None)`. A Multi of two or more values or a
    /// Structured value is an error ([`codes::NOT_A_STRING`]).
    pub fn to_string_value(&self) -> EvalResult<Option<String>> {
        Ok(self.to_text()?.map(Cow::into_owned))
    }

    /// [`EvalValue::to_string_value`] without copying: strings and references are borrowed,
    /// other values are rendered.
    pub fn to_text(&self) -> EvalResult<Option<Cow<'_, str>>> {
        Ok(match self.single()? {
            EvalValue::Null => None,
            EvalValue::String(s) | EvalValue::Reference(s) => Some(Cow::Borrowed(s.as_str())),
            EvalValue::Integer(i) => Some(Cow::Owned(i.to_string())),
            EvalValue::Decimal(d) => Some(Cow::Owned(d.to_string())),
            EvalValue::Boolean(b) => Some(Cow::Borrowed(if *b { "True" } else { "False" })),
            EvalValue::DateTime(dt) => Some(Cow::Owned(datetime::render_canonical(dt))),
            EvalValue::Binary(b) => Some(Cow::Owned(
                base64::engine::general_purpose::STANDARD.encode(b),
            )),
            EvalValue::Multi(_) | EvalValue::Structured(_) => {
                return Err(EvalError::new(
                    codes::NOT_A_STRING,
                    format!("{} cannot be converted to a string", describe(self)),
                ))
            }
        })
    }

    /// Conversion to Integer (§4.4). Null → `Ok(None)`. Integer as is; Decimal without fraction;
    /// String/Reference of optional whitespace, optional sign and ASCII digits within 64 bits.
    /// Anything else is an error ([`codes::NOT_AN_INTEGER`]).
    pub fn to_integer(&self) -> EvalResult<Option<i64>> {
        let v = self.single()?;
        let fail = || {
            EvalError::new(
                codes::NOT_AN_INTEGER,
                format!("{} is not an integer", describe(v)),
            )
        };
        match v {
            EvalValue::Null => Ok(None),
            EvalValue::Integer(i) => Ok(Some(*i)),
            EvalValue::Decimal(d) => d.to_i64().map(Some).ok_or_else(fail),
            EvalValue::String(s) | EvalValue::Reference(s) => {
                parse_integer_text(s).map(Some).ok_or_else(fail)
            }
            _ => Err(fail()),
        }
    }

    /// Strict truthiness for `IIF` conditions (§4.5): `Ok(None)` for Null; Boolean itself;
    /// numbers non-zero; text `true`/`false` in any case or a number; otherwise an error
    /// ([`codes::NOT_BOOLEAN`]).
    pub fn truthiness(&self) -> EvalResult<Option<bool>> {
        let v = self.single()?;
        let fail = || {
            EvalError::new(
                codes::NOT_BOOLEAN,
                format!("condition is not boolean: {}", describe(v)),
            )
        };
        match v {
            EvalValue::Null => Ok(None),
            EvalValue::Boolean(b) => Ok(Some(*b)),
            EvalValue::Integer(i) => Ok(Some(*i != 0)),
            EvalValue::Decimal(d) => Ok(Some(!d.is_zero())),
            EvalValue::String(s) | EvalValue::Reference(s) => {
                text_truthiness(s).map(Some).ok_or_else(fail)
            }
            _ => Err(fail()),
        }
    }

    /// Lenient truthiness of `CBool`/`Not` (§4.5): never fails; Null, non-boolean non-numeric
    /// text and every other type count as false.
    pub fn truthiness_lenient(&self) -> bool {
        match self {
            EvalValue::Boolean(b) => *b,
            EvalValue::Integer(i) => *i != 0,
            EvalValue::Decimal(d) => !d.is_zero(),
            EvalValue::String(s) | EvalValue::Reference(s) => text_truthiness(s).unwrap_or(false),
            _ => false,
        }
    }
}

/// Reads `true`/`false` (any case) or a number (non-zero → true).
fn text_truthiness(s: &str) -> Option<bool> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("true") {
        Some(true)
    } else if t.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        NumText::parse_lenient(t).map(|n| !n.is_zero())
    }
}

/// Optional whitespace, optional sign, ASCII digits, within `i64` (§4.4).
pub(crate) fn parse_integer_text(s: &str) -> Option<i64> {
    let t = s.trim();
    let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // i64::from_str accepts exactly this shape (sign + digits) and checks the range.
    t.parse::<i64>().ok()
}

/// A short description of a value for error messages: its type and, for scalars, its text
/// (truncated to 60 characters).
pub fn describe(v: &EvalValue) -> String {
    fn quoted(s: &str) -> String {
        let mut t: String = s.chars().take(60).collect();
        if s.chars().nth(60).is_some() {
            t.push('…');
        }
        format!("{t:?}")
    }
    match v {
        EvalValue::Null => "Null".to_string(),
        EvalValue::String(s) => quoted(s),
        EvalValue::Reference(s) => format!("reference {}", quoted(s)),
        EvalValue::Integer(i) => i.to_string(),
        EvalValue::Decimal(d) => d.to_string(),
        EvalValue::Boolean(b) => if *b { "True" } else { "False" }.to_string(),
        EvalValue::DateTime(dt) => format!("DateTime {}", dt.to_rfc3339()),
        EvalValue::Binary(b) => format!("binary value of {} bytes", b.len()),
        EvalValue::Multi(v) => format!("multi-valued value with {} values", v.len()),
        EvalValue::Structured(v) => format!("app role list with {} entries", v.len()),
    }
}

// ---------------------------------------------------------------------------------------------
// Comparison (§5)
// ---------------------------------------------------------------------------------------------

/// A comparison operator (spec §2.7, §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompareOp {
    /// `=`
    Eq,
    /// `<>`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl CompareOp {
    /// The operator's source text.
    pub fn symbol(self) -> &'static str {
        match self {
            CompareOp::Eq => "=",
            CompareOp::Ne => "<>",
            CompareOp::Lt => "<",
            CompareOp::Le => "<=",
            CompareOp::Gt => ">",
            CompareOp::Ge => ">=",
        }
    }

    fn holds(self, ord: Ordering) -> bool {
        match self {
            CompareOp::Eq => ord == Ordering::Equal,
            CompareOp::Ne => ord != Ordering::Equal,
            CompareOp::Lt => ord == Ordering::Less,
            CompareOp::Le => ord != Ordering::Greater,
            CompareOp::Gt => ord == Ordering::Greater,
            CompareOp::Ge => ord != Ordering::Less,
        }
    }

    fn is_ordering(self) -> bool {
        !matches!(self, CompareOp::Eq | CompareOp::Ne)
    }
}

impl fmt::Display for CompareOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.symbol())
    }
}

/// Compares two values per spec §5. Returns `Boolean`, or `Null` when either side is Null.
///
/// Errors carry `arg` 0 (left) or 1 (right) for the operand at fault.
pub fn compare(op: CompareOp, a: &EvalValue, b: &EvalValue) -> EvalResult<EvalValue> {
    let ctx = |e: EvalError, side: usize| {
        let name = if side == 0 {
            "left operand"
        } else {
            "right operand"
        };
        EvalError {
            message: format!("comparison {op}: {name} {}", e.message),
            arg: Some(side),
            ..e
        }
    };
    let a = a.single().map_err(|e| ctx(e, 0))?;
    let b = b.single().map_err(|e| ctx(e, 1))?;
    if a.is_null() || b.is_null() {
        return Ok(EvalValue::Null);
    }
    // Rule 3: Booleans.
    if matches!(a, EvalValue::Boolean(_)) || matches!(b, EvalValue::Boolean(_)) {
        if op.is_ordering() {
            return Err(EvalError::new(
                codes::UNORDERED_COMPARISON,
                format!(
                    "comparison {op}: Booleans have no order ({} {op} {})",
                    describe(a),
                    describe(b)
                ),
            ));
        }
        if let (Some(x), Some(y)) = (boolean_like(a), boolean_like(b)) {
            return Ok(EvalValue::Boolean(op.holds(x.cmp(&y))));
        }
        return compare_strings(op, a, b).map_err(|e| ctx(e, 0));
    }
    // Rule 4: DateTimes.
    if matches!(a, EvalValue::DateTime(_)) || matches!(b, EvalValue::DateTime(_)) {
        let x = datetime::value_to_datetime(a).map_err(|e| ctx(e, 0))?;
        let y = datetime::value_to_datetime(b).map_err(|e| ctx(e, 1))?;
        return Ok(EvalValue::Boolean(op.holds(x.cmp(&y))));
    }
    // Rule 5: numbers (two integers compare as integers, without reading them as text).
    if let (EvalValue::Integer(x), EvalValue::Integer(y)) = (a, b) {
        return Ok(EvalValue::Boolean(op.holds(x.cmp(y))));
    }
    if let (Some(x), Some(y)) = (NumText::from_value(a), NumText::from_value(b)) {
        return Ok(EvalValue::Boolean(op.holds(x.cmp_num(&y))));
    }
    // Rule 6: ordinal strings.
    compare_strings(op, a, b)
}

fn boolean_like(v: &EvalValue) -> Option<bool> {
    match v {
        EvalValue::Boolean(b) => Some(*b),
        EvalValue::String(s) | EvalValue::Reference(s) => {
            let t = s.trim();
            if t.eq_ignore_ascii_case("true") {
                Some(true)
            } else if t.eq_ignore_ascii_case("false") {
                Some(false)
            } else {
                None
            }
        }
        _ => None,
    }
}

fn compare_strings(op: CompareOp, a: &EvalValue, b: &EvalValue) -> EvalResult<EvalValue> {
    let x = a.to_text()?.unwrap_or_default();
    let y = b.to_text()?.unwrap_or_default();
    // UTF-8 byte order equals Unicode scalar value order.
    Ok(EvalValue::Boolean(op.holds(x.as_ref().cmp(y.as_ref()))))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn s(x: &str) -> EvalValue {
        EvalValue::from(x)
    }

    #[test]
    fn decimal_mantissa_round_trips_through_its_words() {
        for m in [
            0i128,
            1,
            -1,
            i128::from(i64::MAX) + 1,
            i128::from(i64::MIN) - 1,
            -12_345_678_901_234_567_890_123_456_789,
            9_999_999_999_999_999_999_999_999_999_999_999_999,
            -9_999_999_999_999_999_999_999_999_999_999_999_999,
        ] {
            let d = Decimal::new(m * 10 + 1, 1).unwrap();
            assert_eq!(d.mantissa(), m * 10 + 1, "{m}");
            assert_eq!(d.scale(), 1);
        }
        assert_eq!(Decimal::parse("-0.50").unwrap().to_string(), "-0.5");
        assert!(Decimal::parse("0.000").unwrap().is_zero());
        assert_eq!(Decimal::from(-7).to_i64(), Some(-7));
    }

    #[test]
    fn expression_values_stay_small() {
        // Every argument and result moves by value through the evaluator: a 16-byte-aligned
        // or wider value costs on every call (an i128 inside made it 48 bytes).
        assert!(std::mem::size_of::<EvalValue>() <= 32);
        assert_eq!(std::mem::align_of::<EvalValue>(), 8);
    }
    fn dec(x: &str) -> EvalValue {
        EvalValue::Decimal(Decimal::parse(x).unwrap())
    }

    #[test]
    fn multi_normalises() {
        assert_eq!(EvalValue::multi(vec![]), EvalValue::Null);
        assert_eq!(EvalValue::multi(vec![EvalValue::Null, s("a")]), s("a"));
        assert_eq!(
            EvalValue::multi(vec![s("a"), EvalValue::Null, s("b")]),
            EvalValue::Multi(vec![s("a"), s("b")])
        );
        assert_eq!(
            EvalValue::multi(vec![EvalValue::Multi(vec![s("a"), s("b")]), s("c")]),
            EvalValue::Multi(vec![s("a"), s("b"), s("c")])
        );
        assert_eq!(EvalValue::multi(vec![EvalValue::Null]), EvalValue::Null);
    }

    #[test]
    fn decimal_text_is_shortest() {
        for (input, out) in [
            ("42568.75", "42568.75"),
            ("1.50", "1.5"),
            ("-0.050", "-0.05"),
            ("100", "100"),
            ("100.000", "100"),
            ("-0.0", "0"),
            ("0.001", "0.001"),
            ("007.5", "7.5"),
        ] {
            assert_eq!(Decimal::parse(input).unwrap().to_string(), out, "{input}");
        }
        for bad in ["", "1.", ".5", "1e5", "+1", "1,000", " 1", "--1", "0x1"] {
            assert!(Decimal::parse(bad).is_none(), "{bad}");
        }
        assert!(Decimal::parse("1.5").unwrap() < Decimal::parse("1.50001").unwrap());
        assert!(Decimal::parse("-2").unwrap() < Decimal::parse("-1.5").unwrap());
        assert_eq!(
            Decimal::new(1500, 3).unwrap(),
            Decimal::parse("1.5").unwrap()
        );
        assert!(Decimal::new(1, 29).is_none());
    }

    #[test]
    fn string_conversion() {
        let dt = Utc.with_ymd_and_hms(2024, 3, 5, 0, 7, 9).unwrap();
        let cases = [
            (s("x"), "x"),
            (EvalValue::Integer(-42), "-42"),
            (dec("3.10"), "3.1"),
            (EvalValue::Boolean(true), "True"),
            (EvalValue::Boolean(false), "False"),
            (EvalValue::DateTime(dt), "3/5/2024 12:07:09 AM"),
            (EvalValue::Reference("CN=a".into()), "CN=a"),
            (EvalValue::Binary(vec![1, 2, 3, 4]), "AQIDBA=="),
        ];
        for (v, want) in cases {
            assert_eq!(v.to_string_value().unwrap().as_deref(), Some(want));
        }
        assert_eq!(EvalValue::Null.to_string_value().unwrap(), None);
        let err = EvalValue::Multi(vec![s("a"), s("b")])
            .to_string_value()
            .unwrap_err();
        assert_eq!(err.code, codes::MULTI_VALUED);
        assert_eq!(
            EvalValue::Structured(vec![])
                .to_string_value()
                .unwrap_err()
                .code,
            codes::NOT_A_STRING
        );
    }

    #[test]
    fn integer_conversion() {
        assert_eq!(s(" -12 ").to_integer().unwrap(), Some(-12));
        assert_eq!(s("+7").to_integer().unwrap(), Some(7));
        assert_eq!(dec("5.0").to_integer().unwrap(), Some(5));
        assert_eq!(EvalValue::Null.to_integer().unwrap(), None);
        for bad in [
            s("x"),
            s("&HF"),
            s("0x1F"),
            s("1.5"),
            s(""),
            s("99999999999999999999"),
            dec("1.5"),
            EvalValue::Boolean(true),
            EvalValue::DateTime(Utc.timestamp_opt(0, 0).unwrap()),
        ] {
            let e = bad.to_integer().unwrap_err();
            assert_eq!(e.code, codes::NOT_AN_INTEGER, "{bad:?}");
        }
        assert!(s("x")
            .to_integer()
            .unwrap_err()
            .message
            .contains("\"x\" is not an integer"));
    }

    #[test]
    fn truthiness_strict_and_lenient() {
        assert_eq!(s("TRUE").truthiness().unwrap(), Some(true));
        assert_eq!(s("false").truthiness().unwrap(), Some(false));
        assert_eq!(s("0").truthiness().unwrap(), Some(false));
        assert_eq!(s("-2.5").truthiness().unwrap(), Some(true));
        assert_eq!(EvalValue::Integer(0).truthiness().unwrap(), Some(false));
        assert_eq!(dec("0.1").truthiness().unwrap(), Some(true));
        assert_eq!(EvalValue::Null.truthiness().unwrap(), None);
        assert_eq!(s("yes").truthiness().unwrap_err().code, codes::NOT_BOOLEAN);
        assert_eq!(s("").truthiness().unwrap_err().code, codes::NOT_BOOLEAN);
        assert!(!s("yes").truthiness_lenient());
        assert!(!EvalValue::Null.truthiness_lenient());
        assert!(s("True").truthiness_lenient());
        assert!(s("3").truthiness_lenient());
        assert!(!EvalValue::Multi(vec![s("true"), s("true")]).truthiness_lenient());
    }

    fn cmp(op: CompareOp, a: EvalValue, b: EvalValue) -> EvalValue {
        compare(op, &a, &b).unwrap()
    }

    #[test]
    fn comparisons() {
        use CompareOp::*;
        let t = EvalValue::Boolean(true);
        let f = EvalValue::Boolean(false);
        // Null
        assert_eq!(cmp(Eq, EvalValue::Null, s("")), EvalValue::Null);
        assert_eq!(cmp(Ne, s("a"), EvalValue::Null), EvalValue::Null);
        assert_eq!(cmp(Eq, s(""), s("")), t);
        // numeric
        assert_eq!(cmp(Eq, s("1"), EvalValue::Integer(1)), t);
        assert_eq!(cmp(Eq, s("01.0"), EvalValue::Integer(1)), t);
        assert_eq!(cmp(Lt, s("9"), s("10")), t);
        assert_eq!(cmp(Gt, dec("1.5"), EvalValue::Integer(1)), t);
        assert_eq!(cmp(Lt, s("-3"), s("-2.5")), t);
        assert_eq!(
            cmp(
                Eq,
                s("123456789012345678901234567890"),
                s("123456789012345678901234567890.0")
            ),
            t
        );
        // strings: ordinal, case-sensitive, scalar order
        assert_eq!(cmp(Eq, s("abc"), s("ABC")), f);
        assert_eq!(cmp(Lt, s("B"), s("a")), t);
        assert_eq!(cmp(Lt, s("9"), s("a")), t);
        assert_eq!(cmp(Lt, s("\u{FFFD}"), s("\u{1F600}")), t);
        // booleans
        assert_eq!(cmp(Eq, t.clone(), s("TRUE")), t);
        assert_eq!(cmp(Ne, f.clone(), s("false")), f);
        assert_eq!(cmp(Eq, t.clone(), s("1")), f); // compared as strings "True" vs "1"
        assert_eq!(cmp(Eq, t.clone(), s("True")), t);
        assert_eq!(
            compare(Lt, &t, &f).unwrap_err().code,
            codes::UNORDERED_COMPARISON
        );
        // datetimes
        let dt = EvalValue::DateTime(Utc.with_ymd_and_hms(2024, 1, 2, 3, 4, 5).unwrap());
        assert_eq!(cmp(Eq, dt.clone(), s("2024-01-02T03:04:05Z")), t);
        assert_eq!(cmp(Lt, s("2024-01-01"), dt.clone()), t);
        assert_eq!(cmp(Eq, dt.clone(), s("2024-01-02T04:04:05+01:00")), t);
        let e = compare(Eq, &dt, &s("tomorrow")).unwrap_err();
        assert_eq!((e.code, e.arg), (codes::INVALID_DATETIME, Some(1)));
        // multi
        let m = EvalValue::Multi(vec![s("a"), s("b")]);
        let e = compare(Eq, &s("a"), &m).unwrap_err();
        assert_eq!((e.code, e.arg), (codes::MULTI_VALUED, Some(1)));
    }

    #[test]
    fn error_codes_are_unique_and_in_range() {
        let mut seen = std::collections::HashSet::new();
        for (code, name, desc) in ERROR_CODES {
            assert!((300..400).contains(code));
            assert!(seen.insert(*code), "duplicate {code}");
            assert!(!name.is_empty() && !desc.is_empty());
        }
    }
}
