//! Date and time for the expression language: the accepted date/time text and the canonical
//! rendering (spec §4.6), the .NET custom format subset of `FormatDateTime` (spec §8), the
//! `DateAdd`/`DateDiff` interval arithmetic and Active Directory file times (spec §6).
//!
//! All values are instants in UTC (or, inside `FormatDateTime`, a wall-clock time with the
//! offset it was read with). Nothing here reads a clock or the local time zone.

use chrono::{
    DateTime, Datelike, Duration, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, TimeZone,
    Timelike, Utc,
};

use crate::rules::value::{codes, describe, EvalError, EvalResult, EvalValue};

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// Seconds from 1601-01-01T00:00:00Z to the Unix epoch.
const FILETIME_EPOCH_OFFSET: i64 = 11_644_473_600;
/// File time of 9999-12-31T23:59:59.9999999Z, the last representable instant.
const FILETIME_MAX: i64 = 2_650_467_743_999_999_999;

fn bad_text(text: &str) -> EvalError {
    EvalError::new(
        codes::INVALID_DATETIME,
        format!(
            "{} is not a date/time (expected e.g. 2024-01-31, 2024-01-31T13:45:00Z, \
             1/31/2024 1:45:00 PM or 20240131134500Z)",
            describe(&EvalValue::from(text))
        ),
    )
}

fn out_of_range(what: impl std::fmt::Display) -> EvalError {
    EvalError::new(
        codes::DATETIME_OUT_OF_RANGE,
        format!("{what} is outside the supported range 0001-01-01 to 9999-12-31"),
    )
}

fn check_range<T: TimeZone>(dt: DateTime<T>) -> EvalResult<DateTime<T>> {
    let y = dt.naive_utc().year();
    if (1..=9999).contains(&y) {
        Ok(dt)
    } else {
        Err(out_of_range(dt.naive_utc()))
    }
}

// ---------------------------------------------------------------------------------------------
// Canonical rendering and accepted text (§4.6)
// ---------------------------------------------------------------------------------------------

/// The canonical rendering `M/d/yyyy h:mm:ss tt` (invariant culture, UTC, no fraction).
pub fn render_canonical(dt: &DateTime<Utc>) -> String {
    let (pm, h12) = dt.hour12();
    format!(
        "{}/{}/{:04} {}:{:02}:{:02} {}",
        dt.month(),
        dt.day(),
        dt.year(),
        h12,
        dt.minute(),
        dt.second(),
        if pm { "PM" } else { "AM" }
    )
}

/// Reads accepted date/time text (§4.6), keeping the offset it was written with (`+00:00` when
/// it has none). Errors: [`codes::INVALID_DATETIME`], [`codes::DATETIME_OUT_OF_RANGE`].
pub fn parse_text(text: &str) -> EvalResult<DateTime<FixedOffset>> {
    let t = text.trim();
    let parsed = if t.is_ascii() {
        parse_ascii(t.as_bytes())
    } else {
        None
    };
    let (date, time, offset) = parsed.ok_or_else(|| bad_text(text))?;
    let tz = FixedOffset::east_opt(offset).ok_or_else(|| bad_text(text))?;
    let dt = tz
        .from_local_datetime(&NaiveDateTime::new(date, time))
        .single()
        .ok_or_else(|| bad_text(text))?;
    check_range(dt)
}

/// [`parse_text`] converted to UTC (an offset in the text is honoured).
pub fn parse_text_utc(text: &str) -> EvalResult<DateTime<Utc>> {
    parse_text(text).map(|d| d.with_timezone(&Utc))
}

/// A DateTime value as is, or a value's string form read per §4.6. Null and values that are not
/// date/time text are errors (callers handle Null before).
pub fn value_to_datetime(v: &EvalValue) -> EvalResult<DateTime<Utc>> {
    match v.single()? {
        EvalValue::DateTime(d) => Ok(*d),
        EvalValue::Null => Err(EvalError::new(
            codes::NULL_CONTROL,
            "is Null where a date/time is required",
        )),
        other => {
            let text = other.to_string_value()?.unwrap_or_default();
            parse_text_utc(&text)
        }
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }
    fn at_end(&self) -> bool {
        self.i >= self.b.len()
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn eat_ci(&mut self, word: &str) -> bool {
        let w = word.as_bytes();
        if self.b.len() >= self.i + w.len()
            && self.b[self.i..self.i + w.len()].eq_ignore_ascii_case(w)
        {
            self.i += w.len();
            true
        } else {
            false
        }
    }
    fn spaces(&mut self) -> usize {
        let start = self.i;
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
        self.i - start
    }
    /// Between `min` and `max` ASCII digits (greedy); `(value, count)`.
    fn digits(&mut self, min: usize, max: usize) -> Option<(u32, usize)> {
        let mut v: u32 = 0;
        let mut n = 0;
        while n < max {
            match self.peek() {
                Some(c) if c.is_ascii_digit() => {
                    v = v * 10 + u32::from(c - b'0');
                    self.i += 1;
                    n += 1;
                }
                _ => break,
            }
        }
        (n >= min).then_some((v, n))
    }
    fn digit_run_len(&self) -> usize {
        self.b[self.i..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count()
    }
}

/// Fraction digits (1–7) as nanoseconds.
fn fraction(c: &mut Cursor) -> Option<u32> {
    let (v, n) = c.digits(1, 7)?;
    if c.peek().is_some_and(|d| d.is_ascii_digit()) {
        return None;
    }
    Some(v * 10u32.pow(9 - n as u32))
}

/// An offset: `Z`/`z`, or `±H`, `±HH`, `±HHmm`, `±HH:mm` (hours ≤ 14, minutes ≤ 59); seconds east.
fn offset(c: &mut Cursor) -> Option<i32> {
    if c.eat(b'Z') || c.eat(b'z') {
        return Some(0);
    }
    let sign = if c.eat(b'+') {
        1
    } else if c.eat(b'-') {
        -1
    } else {
        return None;
    };
    let (h, m) = match c.digit_run_len() {
        1 => (c.digits(1, 1)?.0, 0),
        2 => {
            let h = c.digits(2, 2)?.0;
            let m = if c.eat(b':') { c.digits(2, 2)?.0 } else { 0 };
            (h, m)
        }
        4 => (c.digits(2, 2)?.0, c.digits(2, 2)?.0),
        _ => return None,
    };
    if h > 14 || m > 59 {
        return None;
    }
    Some(sign * (h as i32 * 3600 + m as i32 * 60))
}

/// `H:mm`, `H:mm:ss` or `H:mm:ss.f…`, then optional AM/PM; `(hour, min, sec, nanos)`.
fn time_of_day(c: &mut Cursor) -> Option<NaiveTime> {
    let (mut h, _) = c.digits(1, 2)?;
    if !c.eat(b':') {
        return None;
    }
    let (mi, _) = c.digits(2, 2)?;
    let (mut s, mut ns) = (0, 0);
    if c.eat(b':') {
        s = c.digits(2, 2)?.0;
        if c.eat(b'.') {
            ns = fraction(c)?;
        }
    }
    let save = c.i;
    c.spaces();
    if c.eat_ci("AM") || c.eat_ci("PM") {
        let pm = c.b[c.i - 2].eq_ignore_ascii_case(&b'P');
        if !(1..=12).contains(&h) {
            return None;
        }
        h = match (pm, h) {
            (false, 12) => 0,
            (true, 12) => 12,
            (true, h) => h + 12,
            (false, h) => h,
        };
    } else {
        c.i = save;
    }
    NaiveTime::from_hms_nano_opt(h, mi, s, ns)
}

/// What may follow a date: nothing; `T` + time; spaces + time; an offset (after optional spaces).
fn after_date(c: &mut Cursor, allow_t: bool) -> Option<(NaiveTime, i32)> {
    let mut time = NaiveTime::MIN;
    if c.at_end() {
        return Some((time, 0));
    }
    if allow_t && c.eat(b'T') {
        time = time_of_day(c)?;
    } else {
        let n = c.spaces();
        if n > 0 && c.peek().is_some_and(|d| d.is_ascii_digit()) {
            time = time_of_day(c)?;
        }
    }
    c.spaces();
    let off = if c.at_end() { 0 } else { offset(c)? };
    c.at_end().then_some((time, off))
}

fn parse_ascii(b: &[u8]) -> Option<(NaiveDate, NaiveTime, i32)> {
    let mut c = Cursor { b, i: 0 };
    let lead = c.digit_run_len();
    if lead >= 14 {
        // LDAP generalized time: yyyyMMddHHmmss[.f…](Z|±HHmm)
        let y = c.digits(4, 4)?.0;
        let mo = c.digits(2, 2)?.0;
        let d = c.digits(2, 2)?.0;
        let h = c.digits(2, 2)?.0;
        let mi = c.digits(2, 2)?.0;
        let s = c.digits(2, 2)?.0;
        if c.peek().is_some_and(|d| d.is_ascii_digit()) {
            return None;
        }
        let ns = if c.eat(b'.') { fraction(&mut c)? } else { 0 };
        let off = if c.eat(b'Z') {
            0
        } else {
            let sign = if c.eat(b'+') {
                1
            } else if c.eat(b'-') {
                -1
            } else {
                return None;
            };
            let oh = c.digits(2, 2)?.0;
            let om = c.digits(2, 2)?.0;
            if oh > 14 || om > 59 {
                return None;
            }
            sign * (oh as i32 * 3600 + om as i32 * 60)
        };
        if !c.at_end() {
            return None;
        }
        let date = NaiveDate::from_ymd_opt(y as i32, mo, d)?;
        return Some((date, NaiveTime::from_hms_nano_opt(h, mi, s, ns)?, off));
    }
    if lead == 4 {
        // ISO: yyyy-MM-dd …
        let y = c.digits(4, 4)?.0;
        if !c.eat(b'-') {
            return None;
        }
        let mo = c.digits(2, 2)?.0;
        if !c.eat(b'-') {
            return None;
        }
        let d = c.digits(2, 2)?.0;
        let date = NaiveDate::from_ymd_opt(y as i32, mo, d)?;
        let (time, off) = after_date(&mut c, true)?;
        return Some((date, time, off));
    }
    if lead == 1 || lead == 2 {
        // US: M/d/yyyy …
        let mo = c.digits(1, 2)?.0;
        if !c.eat(b'/') {
            return None;
        }
        let d = c.digits(1, 2)?.0;
        if !c.eat(b'/') {
            return None;
        }
        let y = c.digits(4, 4)?.0;
        if c.peek().is_some_and(|d| d.is_ascii_digit()) {
            return None;
        }
        let date = NaiveDate::from_ymd_opt(y as i32, mo, d)?;
        let (time, off) = after_date(&mut c, false)?;
        return Some((date, time, off));
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Intervals, DateAdd, DateDiff
// ---------------------------------------------------------------------------------------------

/// A `DateAdd`/`DateDiff` interval (spec §6; REF's seven, case-sensitive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interval {
    /// `yyyy`
    Year,
    /// `m`
    Month,
    /// `d`
    Day,
    /// `ww`
    Week,
    /// `h`
    Hour,
    /// `n`
    Minute,
    /// `s`
    Second,
}

impl Interval {
    /// Reads one of `yyyy m d ww h n s` (case-sensitive); else [`codes::INVALID_INTERVAL`].
    pub fn parse(text: &str) -> EvalResult<Interval> {
        Ok(match text {
            "yyyy" => Interval::Year,
            "m" => Interval::Month,
            "d" => Interval::Day,
            "ww" => Interval::Week,
            "h" => Interval::Hour,
            "n" => Interval::Minute,
            "s" => Interval::Second,
            _ => {
                return Err(EvalError::new(
                    codes::INVALID_INTERVAL,
                    format!(
                        "{} is not an interval (use one of yyyy, m, d, ww, h, n, s; \
                         intervals are case-sensitive)",
                        describe(&EvalValue::from(text))
                    ),
                ))
            }
        })
    }
}

fn add_months(dt: DateTime<Utc>, months: i64) -> EvalResult<DateTime<Utc>> {
    let overflow = || out_of_range(format!("{dt} plus {months} months"));
    let total = i64::from(dt.year())
        .checked_mul(12)
        .and_then(|x| x.checked_add(i64::from(dt.month0())))
        .and_then(|x| x.checked_add(months))
        .ok_or_else(overflow)?;
    let year = total.div_euclid(12);
    let month0 = total.rem_euclid(12) as u32;
    if !(1..=9999).contains(&year) {
        return Err(overflow());
    }
    let year = year as i32;
    let last = days_in_month(year, month0 + 1);
    let date =
        NaiveDate::from_ymd_opt(year, month0 + 1, dt.day().min(last)).ok_or_else(overflow)?;
    Ok(Utc.from_utc_datetime(&NaiveDateTime::new(date, dt.time())))
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let (ny, nm) = if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    };
    NaiveDate::from_ymd_opt(ny, nm, 1)
        .and_then(|d| d.pred_opt())
        .map(|d| d.day())
        .unwrap_or(31)
}

/// `DateAdd`: calendar arithmetic for years and months (day clamped to the month's last day),
/// exact durations for the rest. Results outside years 1–9999 are errors.
pub fn date_add(interval: Interval, value: i64, dt: DateTime<Utc>) -> EvalResult<DateTime<Utc>> {
    let overflow = || out_of_range(format!("{dt} plus {value} {interval:?} intervals"));
    let duration = |secs_per: i64| {
        value
            .checked_mul(secs_per)
            .and_then(Duration::try_seconds)
            .ok_or_else(overflow)
    };
    let out = match interval {
        Interval::Year => add_months(dt, value.checked_mul(12).ok_or_else(overflow)?)?,
        Interval::Month => add_months(dt, value)?,
        Interval::Day => dt
            .checked_add_signed(duration(86_400)?)
            .ok_or_else(overflow)?,
        Interval::Week => dt
            .checked_add_signed(duration(7 * 86_400)?)
            .ok_or_else(overflow)?,
        Interval::Hour => dt
            .checked_add_signed(duration(3_600)?)
            .ok_or_else(overflow)?,
        Interval::Minute => dt.checked_add_signed(duration(60)?).ok_or_else(overflow)?,
        Interval::Second => dt.checked_add_signed(duration(1)?).ok_or_else(overflow)?,
    };
    check_range(out)
}

/// `DateDiff`: the number of interval boundaries crossed from `a` to `b` (Visual Basic
/// semantics); positive when `b` is later.
pub fn date_diff(interval: Interval, a: DateTime<Utc>, b: DateTime<Utc>) -> i64 {
    let days = |d: &DateTime<Utc>| i64::from(d.num_days_from_ce());
    let floor = |d: &DateTime<Utc>, unit: i64| d.timestamp().div_euclid(unit);
    match interval {
        Interval::Year => i64::from(b.year()) - i64::from(a.year()),
        Interval::Month => {
            (i64::from(b.year()) * 12 + i64::from(b.month0()))
                - (i64::from(a.year()) * 12 + i64::from(a.month0()))
        }
        Interval::Day => days(&b) - days(&a),
        // Day 7 of the common era (0001-01-07) is a Sunday, so days/7 numbers Sunday-started weeks.
        Interval::Week => days(&b).div_euclid(7) - days(&a).div_euclid(7),
        Interval::Hour => floor(&b, 3600) - floor(&a, 3600),
        Interval::Minute => floor(&b, 60) - floor(&a, 60),
        Interval::Second => b.timestamp() - a.timestamp(),
    }
}

// ---------------------------------------------------------------------------------------------
// File times
// ---------------------------------------------------------------------------------------------

/// An Active Directory file time (100 ns since 1601-01-01Z) as a DateTime. `0` and `i64::MAX`
/// ("never"/"not set") give `None`; negative values and values beyond 9999-12-31 are errors.
pub fn from_file_time(ticks: i64) -> EvalResult<Option<DateTime<Utc>>> {
    if ticks == 0 || ticks == i64::MAX {
        return Ok(None);
    }
    if !(0..=FILETIME_MAX).contains(&ticks) {
        return Err(EvalError::new(
            codes::DATETIME_OUT_OF_RANGE,
            format!("file time {ticks} is outside 0 to {FILETIME_MAX} (1601-01-01 to 9999-12-31)"),
        ));
    }
    let secs = ticks.div_euclid(10_000_000) - FILETIME_EPOCH_OFFSET;
    let nanos = (ticks.rem_euclid(10_000_000) * 100) as u32;
    Utc.timestamp_opt(secs, nanos)
        .single()
        .map(Some)
        .ok_or_else(|| out_of_range(format!("file time {ticks}")))
}

/// A DateTime as an Active Directory file time (100 ns since 1601-01-01Z). Instants before
/// 1601 are errors.
pub fn to_file_time(dt: DateTime<Utc>) -> EvalResult<i64> {
    let secs = dt.timestamp() + FILETIME_EPOCH_OFFSET;
    if secs < 0 {
        return Err(EvalError::new(
            codes::DATETIME_OUT_OF_RANGE,
            format!(
                "{} is before 1601-01-01, which has no file time",
                dt.to_rfc3339()
            ),
        ));
    }
    secs.checked_mul(10_000_000)
        .and_then(|t| t.checked_add(i64::from(dt.timestamp_subsec_nanos() / 100)))
        .ok_or_else(|| out_of_range(dt))
}

// ---------------------------------------------------------------------------------------------
// .NET custom format subset (§8)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    /// Literal text. `optional_dot`: the text ends with a `.` that input may leave out, because
    /// a trimmed fraction (`F…`) follows (as .NET renders no `.` without fraction digits).
    Lit {
        text: String,
        optional_dot: bool,
    },
    /// 1 = `y`, 2 = `yy`, 4 = `yyy`/`yyyy`
    Year(u8),
    MonthNum(u8),
    MonthName {
        full: bool,
    },
    DayNum(u8),
    DayName {
        full: bool,
    },
    Hour24(u8),
    Hour12(u8),
    Minute(u8),
    Second(u8),
    Frac {
        digits: u8,
        trim: bool,
    },
    AmPm(u8),
    Offset(u8),
    OffsetK,
}

/// A .NET custom date/time format string (spec §8), compiled once and used for rendering and
/// exact parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DotNetFormat {
    toks: Vec<Tok>,
    /// The byte layout of the text this format reads, when every token reads a fixed number of
    /// ASCII bytes (e.g. `yyyyMMddHHmmss.fZ`): such text is scanned by indexing bytes.
    fixed: Option<FixedLayout>,
    /// The template of this format's renderings, when every token renders at a fixed width
    /// (e.g. `yyyy-MM-dd`).
    template: Option<Template>,
}

/// Where the pieces of text matching an input format lie, for a format whose tokens each read a
/// fixed number of ASCII bytes: literal ASCII text and numbers of exactly as many digits as
/// their token allows at most (`yyyy`, `MM`, `dd`, `HH`, `hh`, `mm`, `ss`, `f…`, `yy`). Formats
/// beginning or ending with white space have none (input is trimmed before it is read).
///
/// Text of exactly the layout's length with the literal bytes and digits in place is read by
/// [`DotNetFormat::scan`] as these pieces, token by token: one byte is one character, every
/// number is read in full, nothing is left over, and trimming changes nothing. (A literal `Z`,
/// which sets the offset to zero, changes nothing either: such formats read no offset, so it
/// is zero.) Any other text is left to [`DotNetFormat::scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct FixedLayout {
    /// The length of matching text in bytes.
    len: usize,
    /// The literal bytes: offset and byte.
    lits: Box<[(usize, u8)]>,
    /// The numbers in format order: the field each sets and where its digits are.
    nums: Box<[(NumField, usize, usize)]>,
}

impl FixedLayout {
    /// The layout of `toks`, if every token has a fixed width in ASCII bytes.
    fn of(toks: &[Tok]) -> Option<FixedLayout> {
        let mut lits = Vec::new();
        let mut nums = Vec::new();
        let mut len = 0;
        for t in toks {
            match t {
                Tok::Lit {
                    text,
                    optional_dot: false,
                } if text.is_ascii() => {
                    lits.extend(text.bytes().enumerate().map(|(i, b)| (len + i, b)));
                    len += text.len();
                }
                t => {
                    let (field, min, max) = t.reads()?;
                    if min != max {
                        return None;
                    }
                    nums.push((field, len, len + max));
                    len += max;
                }
            }
        }
        // A literal white space character first or last would be trimmed off the input.
        let blank_at = |at: usize| {
            lits.iter()
                .any(|&(i, b)| i == at && char::from(b).is_whitespace())
        };
        if len > 0 && (blank_at(0) || blank_at(len - 1)) {
            return None;
        }
        Some(FixedLayout {
            len,
            lits: lits.into(),
            nums: nums.into(),
        })
    }

    /// The fields of `text` when it has this layout (see [`FixedLayout`]); `None` otherwise.
    fn scan(&self, text: &str) -> Option<Fields> {
        let b = text.as_bytes();
        if b.len() != self.len {
            return None;
        }
        for &(i, want) in self.lits.iter() {
            if b.get(i) != Some(&want) {
                return None;
            }
        }
        let mut r = Reading::new();
        for &(field, start, end) in self.nums.iter() {
            let digits = b.get(start..end)?;
            let v = match *digits {
                [a, b] => digit(a)? * 10 + digit(b)?,
                [a, b, c, d] => digit(a)? * 1000 + digit(b)? * 100 + digit(c)? * 10 + digit(d)?,
                _ => digits
                    .iter()
                    .try_fold(0, |v, &c| Some(v * 10 + digit(c)?))?,
            };
            r.number(field, v, digits.len()).ok()?;
        }
        Some(r.finish())
    }
}

/// The value of an ASCII digit.
fn digit(c: u8) -> Option<u32> {
    let d = c.wrapping_sub(b'0');
    (d <= 9).then_some(u32::from(d))
}

impl DotNetFormat {
    /// Compiles a format string. Errors ([`codes::INVALID_FORMAT`]): an unterminated quote, a
    /// trailing backslash, an empty format.
    pub fn parse(format: &str) -> EvalResult<DotNetFormat> {
        let err = |what: &str, pos: usize| {
            EvalError::new(
                codes::INVALID_FORMAT,
                format!("format {format:?}: {what} at character {pos}"),
            )
        };
        if format.is_empty() {
            return Err(EvalError::new(
                codes::INVALID_FORMAT,
                "format is empty (use e.g. \"yyyy-MM-dd\")",
            ));
        }
        let chars: Vec<char> = format.chars().collect();
        let mut toks: Vec<Tok> = Vec::new();
        let mut lit = String::new();
        let flush = |lit: &mut String, toks: &mut Vec<Tok>| {
            if !lit.is_empty() {
                toks.push(Tok::Lit {
                    text: std::mem::take(lit),
                    optional_dot: false,
                });
            }
        };
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let max = match c {
                'y' | 'M' | 'd' => 4,
                'H' | 'h' | 'm' | 's' | 't' => 2,
                'f' | 'F' => 7,
                'z' => 3,
                'K' => 1,
                _ => 0,
            };
            if max > 0 {
                let run = chars[i..].iter().take_while(|&&x| x == c).count();
                let n = run.min(max) as u8;
                i += n as usize;
                flush(&mut lit, &mut toks);
                toks.push(match c {
                    'y' => Tok::Year(if n >= 3 { 4 } else { n }),
                    'M' if n >= 3 => Tok::MonthName { full: n == 4 },
                    'M' => Tok::MonthNum(n),
                    'd' if n >= 3 => Tok::DayName { full: n == 4 },
                    'd' => Tok::DayNum(n),
                    'H' => Tok::Hour24(n),
                    'h' => Tok::Hour12(n),
                    'm' => Tok::Minute(n),
                    's' => Tok::Second(n),
                    'f' => Tok::Frac {
                        digits: n,
                        trim: false,
                    },
                    'F' => Tok::Frac {
                        digits: n,
                        trim: true,
                    },
                    't' => Tok::AmPm(n),
                    'z' => Tok::Offset(n),
                    _ => Tok::OffsetK,
                });
                continue;
            }
            match c {
                '\'' | '"' => {
                    let start = i;
                    i += 1;
                    loop {
                        match chars.get(i) {
                            None => return Err(err("unterminated quoted text", start + 1)),
                            Some(&q) if q == c => {
                                i += 1;
                                break;
                            }
                            Some('\\') => {
                                let Some(&n) = chars.get(i + 1) else {
                                    return Err(err("unterminated quoted text", start + 1));
                                };
                                lit.push(n);
                                i += 2;
                            }
                            Some(&x) => {
                                lit.push(x);
                                i += 1;
                            }
                        }
                    }
                }
                '\\' => {
                    let Some(&n) = chars.get(i + 1) else {
                        return Err(err("backslash with nothing to escape", i + 1));
                    };
                    lit.push(n);
                    i += 2;
                }
                '%' => i += 1,
                other => {
                    lit.push(other);
                    i += 1;
                }
            }
        }
        flush(&mut lit, &mut toks);
        // A literal ending in '.' just before a trimmed fraction: the '.' may be absent.
        for i in 1..toks.len() {
            let before_trimmed = matches!(toks.get(i), Some(Tok::Frac { trim: true, .. }));
            if let Some(Tok::Lit { text, optional_dot }) = toks.get_mut(i - 1) {
                *optional_dot = before_trimmed && text.ends_with('.');
            }
        }
        let fixed = FixedLayout::of(&toks);
        let template = Template::of(&toks);
        Ok(DotNetFormat {
            toks,
            fixed,
            template,
        })
    }

    /// Renders `dt` (its wall-clock time and offset).
    pub fn render(&self, dt: DateTime<FixedOffset>) -> String {
        let mut out = Buf::new();
        self.render_fields(&Fields::of(dt), &mut out);
        String::from_utf8_lossy(out.as_bytes()).into_owned()
    }

    /// [`DotNetFormat::render`] as a [`SmolStr`](smol_str::SmolStr): short results (most
    /// formats) are held inline, without a heap buffer.
    pub fn render_smol(&self, dt: DateTime<FixedOffset>) -> smol_str::SmolStr {
        self.render_smol_fields(&Fields::of(dt))
    }

    /// Parses `text` with this (input) format and renders the wall-clock time and offset it
    /// holds with `output`: the same result and errors as
    /// `output.render_smol(self.parse_input(text)?)`, without building a chrono value when the
    /// fields read are plainly a valid date and time (years 2 to 9998), and reading text of a
    /// fixed layout (e.g. `yyyyMMddHHmmss.fZ`) by indexing its bytes.
    pub fn reformat(&self, text: &str, output: &DotNetFormat) -> EvalResult<smol_str::SmolStr> {
        let fields = match self.fixed.as_ref().and_then(|l| l.scan(text)) {
            Some(fields) => fields,
            None => self.scan_text(text)?,
        };
        let fields = if fields.plainly_valid() {
            fields
        } else {
            Fields::of(fields.instant(text)?)
        };
        Ok(output.render_smol_fields(&fields))
    }

    /// [`DotNetFormat::render_smol`] of wall-clock fields (valid ones): filling in the
    /// template when there is one and the numbers fit it, else token by token.
    fn render_smol_fields(&self, local: &Fields) -> smol_str::SmolStr {
        if let Some(t) = &self.template {
            if let Some(text) = t.fill(local) {
                return smol_of(text.as_bytes());
            }
        }
        self.render_smol_by_token(local)
    }

    /// [`DotNetFormat::render_smol`] of wall-clock fields (valid ones), token by token.
    fn render_smol_by_token(&self, local: &Fields) -> smol_str::SmolStr {
        let mut out = Buf::new();
        self.render_fields(local, &mut out);
        smol_of(out.as_bytes())
    }

    /// Appends the rendering of wall-clock fields (valid ones) to `out` as UTF-8 (every piece
    /// pushed is a whole `str`): literals and plain numbers here, the other tokens by
    /// [`render_other`].
    fn render_fields(&self, local: &Fields, out: &mut Buf) {
        for t in &self.toks {
            if let Tok::Lit { text, .. } = t {
                out.push_slice(text.as_bytes());
            } else if let Some((v, width)) = plain_number(t, local) {
                push_num(out, v, width);
            } else {
                render_other(t, local, out);
            }
        }
    }

    /// Parses `text` exactly against the format (leading/trailing whitespace of `text` ignored).
    /// Missing fields default to year 1, January, day 1, 00:00:00; without an offset the value
    /// is at `+00:00`. Errors: [`codes::FORMAT_MISMATCH`].
    pub fn parse_input(&self, text: &str) -> EvalResult<DateTime<FixedOffset>> {
        self.scan_text(text)?.instant(text)
    }

    /// [`DotNetFormat::scan`] of the trimmed `text`.
    fn scan_text(&self, text: &str) -> EvalResult<Fields> {
        let trimmed = text.trim();
        if trimmed.is_ascii() {
            // ASCII text (generalized time, ISO dates): one byte is one character.
            self.scan(text, trimmed.as_bytes())
        } else {
            let chars: Vec<char> = trimmed.chars().collect();
            self.scan(text, &chars)
        }
    }

    /// Reads the fields of [`DotNetFormat::parse_input`] (not yet checked to be a date and time)
    /// from the characters of the trimmed text, as bytes (ASCII text) or chars; `text` is the
    /// original, for messages.
    fn scan<C: Copy + Into<char>>(&self, text: &str, input: &[C]) -> EvalResult<Fields> {
        let at = |p: usize| input.get(p).map(|&c| c.into());
        let fail = |why: &str| mismatch(text, why);
        let mut p = 0usize;
        let mut r = Reading::new();

        let num = |p: &mut usize, min: usize, max: usize| -> Option<(u32, usize)> {
            let mut v = 0u32;
            let mut n = 0;
            while n < max {
                match at(*p).and_then(|c| c.to_digit(10)) {
                    Some(d) => {
                        v = v * 10 + d;
                        *p += 1;
                        n += 1;
                    }
                    None => break,
                }
            }
            (n >= min).then_some((v, n))
        };
        let word = |p: &mut usize, w: &str| -> bool {
            let wl: Vec<char> = w.chars().collect();
            let ok = input.len() >= *p + wl.len()
                && input[*p..*p + wl.len()]
                    .iter()
                    .zip(&wl)
                    .all(|(&a, b)| a.into().eq_ignore_ascii_case(b));
            if ok {
                *p += wl.len();
            }
            ok
        };

        for t in &self.toks {
            match t {
                Tok::Lit { text, optional_dot } => {
                    for (li, lc) in text.char_indices() {
                        if at(p) == Some(lc) {
                            p += 1;
                            if lc == 'Z' {
                                r.fields.off = 0;
                            }
                        } else if !(*optional_dot && li + lc.len_utf8() == text.len()) {
                            return Err(fail(&format!("expected {lc:?} at character {}", p + 1)));
                        }
                    }
                }
                Tok::MonthName { full } => {
                    let found = MONTHS.iter().position(|m| {
                        let w = if *full { m } else { &m[..3] };
                        word(&mut p, w)
                    });
                    r.fields.month = found.ok_or_else(|| fail("expected a month name"))? as u32 + 1;
                }
                Tok::DayName { full } => {
                    let found = WEEKDAYS.iter().any(|d| {
                        let w = if *full { d } else { &d[..3] };
                        word(&mut p, w)
                    });
                    if !found {
                        return Err(fail("expected a weekday name"));
                    }
                }
                Tok::AmPm(n) => {
                    let (a, b) = if *n == 1 { ("A", "P") } else { ("AM", "PM") };
                    if word(&mut p, a) {
                        r.pm = Some(false);
                    } else if word(&mut p, b) {
                        r.pm = Some(true);
                    } else {
                        return Err(fail("expected AM or PM"));
                    }
                }
                Tok::Offset(_) | Tok::OffsetK => {
                    let rest: String = input[p..].iter().map(|&c| c.into()).collect();
                    let mut c = Cursor {
                        b: rest.as_bytes(),
                        i: 0,
                    };
                    match offset(&mut c) {
                        Some(o) => {
                            r.fields.off = o;
                            p += rest[..c.i].chars().count();
                        }
                        None if matches!(t, Tok::OffsetK) => {}
                        None => return Err(fail("expected an offset such as +02:00 or Z")),
                    }
                }
                Tok::Year(_)
                | Tok::MonthNum(_)
                | Tok::DayNum(_)
                | Tok::Hour24(_)
                | Tok::Hour12(_)
                | Tok::Minute(_)
                | Tok::Second(_)
                | Tok::Frac { .. } => {
                    if let Some((field, min, max)) = t.reads() {
                        let (v, n) = num(&mut p, min, max).ok_or_else(|| fail(field.expected()))?;
                        r.number(field, v, n).map_err(fail)?;
                    }
                }
            }
        }
        if p != input.len() {
            return Err(fail(&format!("unexpected text at character {}", p + 1)));
        }
        Ok(r.finish())
    }
}

impl Tok {
    /// For a numeric token: the field it sets, and the least and most digits it reads.
    fn reads(&self) -> Option<(NumField, usize, usize)> {
        let two = |field, n: u8| (field, usize::from(n), 2);
        Some(match *self {
            Tok::Year(1) => (NumField::ShortYear, 1, 2),
            Tok::Year(2) => (NumField::ShortYear, 2, 2),
            Tok::Year(_) => (NumField::Year, 4, 4),
            Tok::MonthNum(n) => two(NumField::Month, n),
            Tok::DayNum(n) => two(NumField::Day, n),
            Tok::Hour24(n) => two(NumField::Hour24, n),
            Tok::Hour12(n) => two(NumField::Hour12, n),
            Tok::Minute(n) => two(NumField::Minute, n),
            Tok::Second(n) => two(NumField::Second, n),
            Tok::Frac { digits, trim } => {
                let most = usize::from(digits);
                (NumField::Fraction, if trim { 0 } else { most }, most)
            }
            _ => return None,
        })
    }
}

/// What a numeric token of an input format reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NumField {
    /// `yyyy`: the year as written.
    Year,
    /// `y`, `yy`: 00–29 are 2000–2029, 30–99 are 1930–1999.
    ShortYear,
    Month,
    Day,
    Hour24,
    /// A 12-hour clock hour (1–12), settled with AM/PM at the end.
    Hour12,
    Minute,
    Second,
    /// Fraction digits: tenths of a second, hundredths, …
    Fraction,
}

impl NumField {
    /// What is missing when input has too few digits for this field.
    fn expected(self) -> &'static str {
        match self {
            NumField::Year | NumField::ShortYear => "expected a year",
            NumField::Month => "expected a month",
            NumField::Day => "expected a day",
            NumField::Hour24 | NumField::Hour12 => "expected an hour",
            NumField::Minute => "expected minutes",
            NumField::Second => "expected seconds",
            NumField::Fraction => "expected fraction digits",
        }
    }
}

/// The fields read so far by a scan of input text (the defaults: year 1, January, day 1,
/// 00:00:00, offset +00:00), with a 12-hour clock hour and an AM/PM designator still to be
/// combined into the hour.
struct Reading {
    fields: Fields,
    hour12: Option<u32>,
    pm: Option<bool>,
}

impl Reading {
    fn new() -> Reading {
        Reading {
            fields: Fields {
                year: 1,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0,
                nanos: 0,
                off: 0,
            },
            hour12: None,
            pm: None,
        }
    }

    /// Takes the value `v` of `field`, read as `n` digits. Errors: why the value does not fit.
    fn number(&mut self, field: NumField, v: u32, n: usize) -> Result<(), &'static str> {
        let f = &mut self.fields;
        match field {
            NumField::Year => f.year = v as i32,
            NumField::ShortYear => f.year = v as i32 + if v < 30 { 2000 } else { 1900 },
            NumField::Month => f.month = v,
            NumField::Day => f.day = v,
            NumField::Hour24 => {
                f.hour = v;
                self.hour12 = None;
            }
            NumField::Hour12 => {
                if !(1..=12).contains(&v) {
                    return Err("12-hour clock hour must be 1 to 12");
                }
                self.hour12 = Some(v);
            }
            NumField::Minute => f.minute = v,
            NumField::Second => f.second = v,
            NumField::Fraction => {
                // Nanoseconds per unit of the last of `n` (0–7) fraction digits.
                const SCALE: [u32; 8] = [
                    1_000_000_000,
                    100_000_000,
                    10_000_000,
                    1_000_000,
                    100_000,
                    10_000,
                    1_000,
                    100,
                ];
                f.nanos = v * SCALE[n.min(7)];
            }
        }
        Ok(())
    }

    /// The fields read, the hour settled by a 12-hour clock hour and AM/PM when there were.
    fn finish(self) -> Fields {
        let mut f = self.fields;
        if let Some(h) = self.hour12 {
            f.hour = match self.pm {
                Some(true) if h < 12 => h + 12,
                Some(false) if h == 12 => 0,
                _ => h,
            };
        }
        f
    }
}

/// A field rendered as a plain decimal number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plain {
    Year,
    Month,
    Day,
    Hour24,
    Hour12,
    Minute,
    Second,
}

impl Plain {
    /// The number shown; `None` for a negative year (written with its sign).
    fn value(self, local: &Fields) -> Option<u32> {
        Some(match self {
            Plain::Year => u32::try_from(local.year).ok()?,
            Plain::Month => local.month,
            Plain::Day => local.day,
            Plain::Hour24 => local.hour,
            Plain::Hour12 => hour12(local.hour),
            Plain::Minute => local.minute,
            Plain::Second => local.second,
        })
    }
}

impl Tok {
    /// For a token rendered as a plain decimal number (`yyyy`, `MM`, `d`, `HH`, `h`, `mm`, `s`,
    /// …): the field and the zero-padding width.
    fn plain(&self) -> Option<(Plain, u8)> {
        Some(match *self {
            Tok::Year(4..) => (Plain::Year, 4),
            Tok::MonthNum(n) => (Plain::Month, pad_width(n)),
            Tok::DayNum(n) => (Plain::Day, pad_width(n)),
            Tok::Hour24(n) => (Plain::Hour24, pad_width(n)),
            Tok::Hour12(n) => (Plain::Hour12, pad_width(n)),
            Tok::Minute(n) => (Plain::Minute, pad_width(n)),
            Tok::Second(n) => (Plain::Second, pad_width(n)),
            _ => return None,
        })
    }
}

/// The number and zero-padding width a token shows as a plain decimal number (see
/// [`Tok::plain`]), if it does for `local`.
fn plain_number(t: &Tok, local: &Fields) -> Option<(u32, u8)> {
    let (field, width) = t.plain()?;
    Some((field.value(local)?, width))
}

/// The rendering of a format whose every token renders at a fixed width for valid fields:
/// literals, numbers zero-padded to two or four digits (`MM`, `dd`, `HH`, `hh`, `mm`, `ss`,
/// `yyyy`) and untrimmed fractions (`f…`), at most [`Template::CAP`] bytes in all. The
/// literals are in place, zeros elsewhere; [`Template::fill`] writes each number's digits where
/// [`DotNetFormat::render_fields`] would have appended them, when every number has exactly as
/// many digits as its width (a four-digit year of 0 to 9999).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template {
    text: Filled,
    /// The numbers: what, and where (a range of byte offsets).
    nums: Box<[(Slot, usize, usize)]>,
}

/// A number in a [`Template`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// A plain number of two digits (below 100).
    Two(Plain),
    /// A plain number of four digits (below 10,000).
    Four(Plain),
    /// Fraction digits.
    Fraction,
}

/// A filled-in [`Template`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Filled {
    bytes: [u8; Template::CAP],
    len: usize,
}

impl Filled {
    fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or(&self.bytes)
    }
}

impl Template {
    /// The longest template, the longest rendering held inline by a
    /// [`SmolStr`](smol_str::SmolStr).
    const CAP: usize = smol_str::SmolStr::INLINE_CAP;

    /// The template of `toks`, if every token renders at a fixed width.
    fn of(toks: &[Tok]) -> Option<Template> {
        let mut bytes = [0u8; Template::CAP];
        let mut len = 0;
        let mut nums = Vec::new();
        for t in toks {
            let (slot, width) = match t {
                Tok::Lit { text, .. } => {
                    bytes
                        .get_mut(len..len + text.len())?
                        .copy_from_slice(text.as_bytes());
                    len += text.len();
                    continue;
                }
                Tok::Frac {
                    digits,
                    trim: false,
                } => (Slot::Fraction, usize::from(*digits)),
                t => match t.plain()? {
                    (field, 2) => (Slot::Two(field), 2),
                    (field, 4) => (Slot::Four(field), 4),
                    _ => return None,
                },
            };
            bytes.get_mut(len..len + width)?.fill(b'0');
            nums.push((slot, len, len + width));
            len += width;
        }
        Some(Template {
            text: Filled { bytes, len },
            nums: nums.into(),
        })
    }

    /// The rendering of `local`; `None` when a number does not have exactly its width in
    /// digits.
    fn fill(&self, local: &Fields) -> Option<Filled> {
        let mut text = self.text.clone();
        for &(slot, start, end) in self.nums.iter() {
            let dst = text.bytes.get_mut(start..end)?;
            match slot {
                Slot::Two(field) => match field.value(local)? {
                    v @ 0..100 => put_digits(dst, v),
                    _ => return None,
                },
                Slot::Four(field) => match field.value(local)? {
                    v @ 0..10_000 => put_digits(dst, v),
                    _ => return None,
                },
                Slot::Fraction => {
                    dst.copy_from_slice(fraction_digits(local.nanos).get(..dst.len())?)
                }
            }
        }
        Some(text)
    }
}

/// Appends the rendering of any token; [`DotNetFormat::render_fields`] leaves it the ones
/// that are not literals or [`plain_number`]s (kept apart, so that what they compute is
/// computed only for them).
#[inline(never)]
fn render_other(t: &Tok, local: &Fields, out: &mut Buf) {
    match t {
        Tok::Lit { text, .. } => out.push_slice(text.as_bytes()),
        Tok::Year(1) => push_num(out, local.year.rem_euclid(100) as u32, 1),
        Tok::Year(2) => push_num(out, local.year.rem_euclid(100) as u32, 2),
        Tok::Year(_) if local.year < 0 => {
            // Four characters wide, the sign included (as `{:04}` writes it).
            out.push_byte(b'-');
            push_num(out, local.year.unsigned_abs(), 3);
        }
        Tok::MonthName { full } => {
            let name = MONTHS[(local.month - 1) as usize];
            out.push_slice(if *full { name } else { &name[..3] }.as_bytes());
        }
        Tok::DayName { full } => {
            let name = WEEKDAYS[local.weekday_from_sunday()];
            out.push_slice(if *full { name } else { &name[..3] }.as_bytes());
        }
        Tok::Frac { digits, trim } => {
            let seven = fraction_digits(local.nanos);
            let mut part = seven.get(..*digits as usize).unwrap_or(&seven);
            if *trim {
                while let [rest @ .., b'0'] = part {
                    part = rest;
                }
                // As .NET: with no fraction digits to show, a '.' just before goes too.
                if part.is_empty() && out.last() == Some(b'.') {
                    out.pop();
                }
            }
            out.push_slice(part);
        }
        Tok::AmPm(n) => {
            let pm = local.hour >= 12;
            out.push_slice(match (pm, n) {
                (false, 1) => b"A",
                (true, 1) => b"P",
                (false, _) => b"AM",
                (true, _) => b"PM",
            });
        }
        Tok::Offset(n) if *n < 3 => {
            out.push_byte(offset_sign(local.off));
            push_num(out, local.off.unsigned_abs() / 3600, *n);
        }
        Tok::Offset(_) | Tok::OffsetK => {
            let off = local.off.unsigned_abs();
            out.push_byte(offset_sign(local.off));
            push_num(out, off / 3600, 2);
            out.push_byte(b':');
            push_num(out, (off % 3600) / 60, 2);
        }
        _ => {
            if let Some((v, width)) = plain_number(t, local) {
                push_num(out, v, width);
            }
        }
    }
}

/// The sign of an offset from UTC as written (`+` for zero).
fn offset_sign(off: i32) -> u8 {
    if off < 0 {
        b'-'
    } else {
        b'+'
    }
}

/// The error of text that does not match a `FormatDateTime` input format.
fn mismatch(text: &str, why: &str) -> EvalError {
    EvalError::new(
        codes::FORMAT_MISMATCH,
        format!(
            "{} does not match the input format: {why}",
            describe(&EvalValue::from(text))
        ),
    )
}

/// A wall-clock date and time with its offset from UTC (seconds east), as read by
/// [`DotNetFormat::scan`] (unchecked) or taken from a chrono value (valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fields {
    year: i32,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    nanos: u32,
    off: i32,
}

impl Fields {
    /// The wall-clock fields of `dt`.
    fn of(dt: DateTime<FixedOffset>) -> Fields {
        let local = dt.naive_local();
        Fields {
            year: local.year(),
            month: local.month(),
            day: local.day(),
            hour: local.hour(),
            minute: local.minute(),
            second: local.second(),
            nanos: local.nanosecond(),
            off: dt.offset().local_minus_utc(),
        }
    }

    /// Whether [`Fields::instant`] surely succeeds with these very fields: a real date in
    /// years 2 to 9998 (so that the instant, at most a day away, is within years 1 to 9999), a
    /// time of day without a leap second, an offset under a day.
    fn plainly_valid(&self) -> bool {
        (2..=9998).contains(&self.year)
            && (1..=12).contains(&self.month)
            && self.day >= 1
            && self.day <= month_length(self.year, self.month)
            && self.hour < 24
            && self.minute < 60
            && self.second < 60
            && self.nanos < 1_000_000_000
            && self.off.unsigned_abs() < 86_400
    }

    /// The instant these fields name. Errors ([`codes::FORMAT_MISMATCH`],
    /// [`codes::DATETIME_OUT_OF_RANGE`]): not a date, not a time, an offset out of range, an
    /// instant outside years 1 to 9999.
    fn instant(&self, text: &str) -> EvalResult<DateTime<FixedOffset>> {
        let Fields {
            year,
            month,
            day,
            hour,
            minute,
            second,
            nanos,
            off,
        } = *self;
        let fail = |why: &str| mismatch(text, why);
        let date = NaiveDate::from_ymd_opt(year, month, day)
            .ok_or_else(|| fail(&format!("{year:04}-{month:02}-{day:02} is not a date")))?;
        let time = NaiveTime::from_hms_nano_opt(hour, minute, second, nanos)
            .ok_or_else(|| fail(&format!("{hour}:{minute:02}:{second:02} is not a time")))?;
        let tz = FixedOffset::east_opt(off).ok_or_else(|| fail("offset out of range"))?;
        let dt = tz
            .from_local_datetime(&NaiveDateTime::new(date, time))
            .single()
            .ok_or_else(|| fail("not a valid local time"))?;
        check_range(dt)
    }

    /// The weekday, 0 = Sunday (0 for fields that are not a date, which valid ones always are).
    fn weekday_from_sunday(&self) -> usize {
        NaiveDate::from_ymd_opt(self.year, self.month, self.day)
            .map_or(0, |d| d.weekday().num_days_from_sunday() as usize)
    }
}

/// The hour on a 12-hour clock (12, 1, …, 11) of a 24-hour clock hour.
fn hour12(hour: u32) -> u32 {
    match hour % 12 {
        0 => 12,
        h => h,
    }
}

/// The number of days of `month` (1–12) in the proleptic Gregorian `year`.
fn month_length(year: i32, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The zero-padding width of a numeric field written with `n` letters (`d` → 1, `dd` → 2).
fn pad_width(n: u8) -> u8 {
    if n >= 2 {
        2
    } else {
        1
    }
}

/// A rendering buffer: on the stack while the text is short, on the heap beyond. Pieces are
/// pushed byte by byte (they are a few bytes each).
struct Buf {
    inline: [u8; 48],
    /// The length of the text in `inline`, or [`Buf::SPILLED`]: the text is in `heap`.
    len: usize,
    heap: Vec<u8>,
}

impl Buf {
    const SPILLED: usize = usize::MAX;

    fn new() -> Buf {
        Buf {
            inline: [0; 48],
            len: 0,
            heap: Vec::new(),
        }
    }

    fn push_byte(&mut self, b: u8) {
        match self.inline.get_mut(self.len) {
            Some(slot) => {
                *slot = b;
                self.len += 1;
            }
            None => self.spill(b),
        }
    }

    /// Pushes `b` onto the heap text, moving the text there first when `inline` is full.
    #[cold]
    fn spill(&mut self, b: u8) {
        if self.len != Buf::SPILLED {
            let text = self.inline.get(..self.len).unwrap_or(&self.inline);
            self.heap.extend_from_slice(text);
            self.len = Buf::SPILLED;
        }
        self.heap.push(b);
    }

    fn push_slice(&mut self, s: &[u8]) {
        for &b in s {
            self.push_byte(b);
        }
    }

    fn last(&self) -> Option<u8> {
        self.as_bytes().last().copied()
    }

    fn pop(&mut self) {
        if self.len == Buf::SPILLED {
            self.heap.pop();
        } else {
            self.len = self.len.saturating_sub(1);
        }
    }

    fn as_bytes(&self) -> &[u8] {
        self.inline.get(..self.len).unwrap_or(&self.heap)
    }
}

/// Writes `v` in decimal, zero-padded to at least `width` digits (at most ten).
fn push_num(out: &mut Buf, v: u32, width: u8) {
    let mut digits = [b'0'; 10];
    let len = v.checked_ilog10().map_or(1, |l| l as usize + 1);
    let start = digits.len() - len.max(usize::from(width)).min(digits.len());
    let shown = digits.get_mut(start..).unwrap_or_default();
    put_digits(shown, v);
    out.push_slice(shown);
}

/// The two-digit decimal renderings of 0 to 99.
const PAIRS: [[u8; 2]; 100] = {
    let mut pairs = [[0u8; 2]; 100];
    let mut i = 0;
    while i < 100 {
        pairs[i] = [b'0' + (i / 10) as u8, b'0' + (i % 10) as u8];
        i += 1;
    }
    pairs
};

/// Fills `dst` with the last `dst.len()` decimal digits of `v`, zero-padded.
fn put_digits(dst: &mut [u8], v: u32) {
    match dst {
        [a, b] => [*a, *b] = PAIRS[(v % 100) as usize],
        [a, b, c, d] => {
            [*a, *b] = PAIRS[(v / 100 % 100) as usize];
            [*c, *d] = PAIRS[(v % 100) as usize];
        }
        _ => {
            let mut x = v;
            for d in dst.iter_mut().rev() {
                *d = b'0' + (x % 10) as u8;
                x /= 10;
            }
        }
    }
}

/// The fraction of a second in 100 ns ticks, as exactly seven digits. (Not inlined: what it
/// computes is computed only for formats with a fraction.)
#[inline(never)]
fn fraction_digits(nanos: u32) -> [u8; 7] {
    let mut seven = [b'0'; 7];
    put_digits(&mut seven, (nanos % 1_000_000_000) / 100);
    seven
}

/// A rendering as a [`SmolStr`](smol_str::SmolStr) (inline when short).
fn smol_of(bytes: &[u8]) -> smol_str::SmolStr {
    match std::str::from_utf8(bytes) {
        Ok(s) if s.len() <= smol_str::SmolStr::INLINE_CAP => smol_str::SmolStr::new_inline(s),
        Ok(s) => smol_str::SmolStr::new(s),
        Err(_) => smol_str::SmolStr::new(String::from_utf8_lossy(bytes)),
    }
}

/// The effect of a `FormatDateTime` `dateTimeStyles` argument: only `AdjustToUniversal` changes
/// the result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DateTimeStyles {
    /// Convert the parsed value to UTC before rendering.
    pub adjust_to_universal: bool,
}

impl DateTimeStyles {
    /// Reads `""` (default) or names separated by `,` or `|`, each optionally prefixed
    /// `DateTimeStyles.`, case-insensitive. Unknown names: [`codes::INVALID_DATETIME_STYLES`].
    pub fn parse(text: &str) -> EvalResult<DateTimeStyles> {
        let mut styles = DateTimeStyles::default();
        if text.trim().is_empty() {
            return Ok(styles);
        }
        const KNOWN: [&str; 10] = [
            "none",
            "allowleadingwhite",
            "allowtrailingwhite",
            "allowinnerwhite",
            "allowwhitespaces",
            "nocurrentdatedefault",
            "adjusttouniversal",
            "assumelocal",
            "assumeuniversal",
            "roundtripkind",
        ];
        for part in text.split([',', '|']) {
            let name = part.trim();
            let lower = name.to_ascii_lowercase();
            let bare = lower.strip_prefix("datetimestyles.").unwrap_or(&lower);
            if !KNOWN.contains(&bare) {
                return Err(EvalError::new(
                    codes::INVALID_DATETIME_STYLES,
                    format!(
                        "{name:?} is not a DateTimeStyles name (known: None, AllowWhiteSpaces, \
                         AdjustToUniversal, AssumeUniversal, AssumeLocal, RoundtripKind, …)"
                    ),
                ));
            }
            if bare == "adjusttouniversal" {
                styles.adjust_to_universal = true;
            }
        }
        Ok(styles)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    #[test]
    fn canonical_rendering() {
        assert_eq!(
            render_canonical(&utc(2024, 1, 5, 0, 0, 0)),
            "1/5/2024 12:00:00 AM"
        );
        assert_eq!(
            render_canonical(&utc(2024, 12, 25, 12, 3, 4)),
            "12/25/2024 12:03:04 PM"
        );
        assert_eq!(
            render_canonical(&utc(999, 7, 1, 23, 59, 59)),
            "7/1/0999 11:59:59 PM"
        );
    }

    #[test]
    fn accepted_text_forms() {
        let cases = [
            ("2024-01-31", utc(2024, 1, 31, 0, 0, 0)),
            ("  2024-01-31  ", utc(2024, 1, 31, 0, 0, 0)),
            ("2024-01-31T13:45", utc(2024, 1, 31, 13, 45, 0)),
            ("2024-01-31T13:45:10Z", utc(2024, 1, 31, 13, 45, 10)),
            ("2024-01-31 13:45:10", utc(2024, 1, 31, 13, 45, 10)),
            ("2024-01-31T1:45:10 PM", utc(2024, 1, 31, 13, 45, 10)),
            ("2024-01-31 12:00:00 AM", utc(2024, 1, 31, 0, 0, 0)),
            ("2024-01-31T13:45:10+02:00", utc(2024, 1, 31, 11, 45, 10)),
            ("2024-01-31T13:45:10 -0530", utc(2024, 1, 31, 19, 15, 10)),
            ("2024-01-31T13:45:10-5", utc(2024, 1, 31, 18, 45, 10)),
            ("2024-01-31-08:00", utc(2024, 1, 31, 8, 0, 0)),
            ("2024-01-31+01:00", utc(2024, 1, 30, 23, 0, 0)),
            ("2024-01-31Z", utc(2024, 1, 31, 0, 0, 0)),
            ("1/31/2024", utc(2024, 1, 31, 0, 0, 0)),
            ("01/05/2024 1:02:03 PM", utc(2024, 1, 5, 13, 2, 3)),
            ("1/5/2024 1:02:03 pm +01:00", utc(2024, 1, 5, 12, 2, 3)),
            ("12/31/2024 23:59", utc(2024, 12, 31, 23, 59, 0)),
            ("20240131134510Z", utc(2024, 1, 31, 13, 45, 10)),
            ("20240131134510+0100", utc(2024, 1, 31, 12, 45, 10)),
            ("20240131134510.0Z", utc(2024, 1, 31, 13, 45, 10)),
            ("2024-02-29", utc(2024, 2, 29, 0, 0, 0)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_text_utc(text).unwrap(), want, "{text}");
        }
        let f = parse_text_utc("2024-01-31T13:45:10.1234567Z").unwrap();
        assert_eq!(f.timestamp_subsec_nanos(), 123_456_700);
        let f = parse_text_utc("20240131134510.5-0000").unwrap();
        assert_eq!(f.timestamp_subsec_nanos(), 500_000_000);
        // The offset is kept by parse_text.
        assert_eq!(
            parse_text("2024-01-31T13:45:10+02:00")
                .unwrap()
                .offset()
                .local_minus_utc(),
            7200
        );
    }

    #[test]
    fn rejected_text_forms() {
        for bad in [
            "",
            "   ",
            "tomorrow",
            "2024-1-31",
            "2024-02-30",
            "2023-02-29",
            "2024/01/31",
            "31.01.2024",
            "1/31/24",
            "13/1/2024",
            "2024-01-31T",
            "2024-01-31T25:00",
            "2024-01-31T13:60",
            "2024-01-31T13:45:10.12345678Z",
            "2024-01-31T13:45:10+15:00",
            "2024-01-31T13:45:10+01:60",
            "2024-01-31T13:45:10+123",
            "2024-01-31T13:45:10 XYZ",
            "2024-01-31T13:45 PM",
            "2024-01-31T00:45 AM",
            "20240131134510",
            "20240131134510+01",
            "202401311345101Z",
            "2024-01-31T13:45:10Z extra",
            "2024-01-31T13:45:10ZZ",
            "２０２４-01-31",
        ] {
            let e = parse_text(bad).unwrap_err();
            assert_eq!(e.code, codes::INVALID_DATETIME, "{bad}");
        }
        assert_eq!(
            parse_text("0000-01-01").unwrap_err().code,
            codes::DATETIME_OUT_OF_RANGE
        );
        assert_eq!(
            parse_text("0001-01-01T00:00:00+01:00").unwrap_err().code,
            codes::DATETIME_OUT_OF_RANGE
        );
    }

    #[test]
    fn intervals() {
        for (t, i) in [
            ("yyyy", Interval::Year),
            ("m", Interval::Month),
            ("d", Interval::Day),
            ("ww", Interval::Week),
            ("h", Interval::Hour),
            ("n", Interval::Minute),
            ("s", Interval::Second),
        ] {
            assert_eq!(Interval::parse(t).unwrap(), i);
        }
        for bad in ["M", "y", "q", "w", "YYYY", "", "mi", "ss"] {
            assert_eq!(
                Interval::parse(bad).unwrap_err().code,
                codes::INVALID_INTERVAL
            );
        }
    }

    #[test]
    fn date_add_clamps_and_counts() {
        let jan31 = utc(2024, 1, 31, 10, 0, 0);
        assert_eq!(
            date_add(Interval::Month, 1, jan31).unwrap(),
            utc(2024, 2, 29, 10, 0, 0)
        );
        assert_eq!(
            date_add(Interval::Month, 1, utc(2023, 1, 31, 0, 0, 0)).unwrap(),
            utc(2023, 2, 28, 0, 0, 0)
        );
        assert_eq!(
            date_add(Interval::Year, 1, utc(2024, 2, 29, 0, 0, 0)).unwrap(),
            utc(2025, 2, 28, 0, 0, 0)
        );
        assert_eq!(
            date_add(Interval::Month, -13, jan31).unwrap(),
            utc(2022, 12, 31, 10, 0, 0)
        );
        assert_eq!(
            date_add(Interval::Month, 3, jan31).unwrap(),
            utc(2024, 4, 30, 10, 0, 0)
        );
        assert_eq!(
            date_add(Interval::Day, 1, jan31).unwrap(),
            utc(2024, 2, 1, 10, 0, 0)
        );
        assert_eq!(
            date_add(Interval::Week, -1, jan31).unwrap(),
            utc(2024, 1, 24, 10, 0, 0)
        );
        assert_eq!(
            date_add(Interval::Hour, 15, jan31).unwrap(),
            utc(2024, 2, 1, 1, 0, 0)
        );
        assert_eq!(
            date_add(Interval::Minute, -61, jan31).unwrap(),
            utc(2024, 1, 31, 8, 59, 0)
        );
        assert_eq!(
            date_add(Interval::Second, 3600, jan31).unwrap(),
            utc(2024, 1, 31, 11, 0, 0)
        );
        for (i, n) in [
            (Interval::Year, 8000),
            (Interval::Year, i64::MAX),
            (Interval::Month, i64::MIN),
            (Interval::Day, i64::MAX),
            (Interval::Second, i64::MIN),
            (Interval::Week, 1_000_000),
        ] {
            assert_eq!(
                date_add(i, n, jan31).unwrap_err().code,
                codes::DATETIME_OUT_OF_RANGE,
                "{i:?} {n}"
            );
        }
    }

    #[test]
    fn date_diff_counts_boundaries() {
        let a = utc(2023, 12, 31, 23, 59, 59);
        let b = utc(2024, 1, 1, 0, 0, 0);
        for i in [
            Interval::Year,
            Interval::Month,
            Interval::Day,
            Interval::Hour,
            Interval::Minute,
            Interval::Second,
        ] {
            assert_eq!(date_diff(i, a, b), 1, "{i:?}");
            assert_eq!(date_diff(i, b, a), -1, "{i:?}");
        }
        assert_eq!(
            date_diff(
                Interval::Year,
                utc(2024, 1, 1, 0, 0, 0),
                utc(2024, 12, 31, 0, 0, 0)
            ),
            0
        );
        assert_eq!(
            date_diff(
                Interval::Month,
                utc(2024, 1, 31, 0, 0, 0),
                utc(2024, 2, 1, 0, 0, 0)
            ),
            1
        );
        assert_eq!(
            date_diff(
                Interval::Day,
                utc(2024, 1, 1, 0, 0, 0),
                utc(2024, 1, 1, 23, 59, 59)
            ),
            0
        );
        assert_eq!(
            date_diff(
                Interval::Hour,
                utc(2024, 1, 1, 0, 59, 0),
                utc(2024, 1, 1, 1, 0, 0)
            ),
            1
        );
        assert_eq!(
            date_diff(
                Interval::Minute,
                utc(2024, 1, 1, 0, 0, 59),
                utc(2024, 1, 1, 0, 1, 0)
            ),
            1
        );
        assert_eq!(date_diff(Interval::Day, a, a), 0);
        // 2024-01-06 is a Saturday, 2024-01-07 a Sunday.
        let sat = utc(2024, 1, 6, 12, 0, 0);
        let sun = utc(2024, 1, 7, 0, 0, 0);
        assert_eq!(date_diff(Interval::Week, sat, sun), 1);
        assert_eq!(
            date_diff(Interval::Week, sun, utc(2024, 1, 13, 23, 0, 0)),
            0
        );
        assert_eq!(date_diff(Interval::Week, sun, utc(2024, 1, 14, 0, 0, 0)), 1);
        assert_eq!(
            date_diff(
                Interval::Week,
                utc(2024, 1, 1, 0, 0, 0),
                utc(2024, 1, 31, 0, 0, 0)
            ),
            4
        );
        assert_eq!(date_diff(Interval::Week, sun, sat), -1);
        assert_eq!(utc(1, 1, 7, 0, 0, 0).weekday(), chrono::Weekday::Sun);
    }

    #[test]
    fn file_times() {
        assert_eq!(from_file_time(0).unwrap(), None);
        assert_eq!(from_file_time(i64::MAX).unwrap(), None);
        assert_eq!(
            from_file_time(1).unwrap().unwrap().timestamp_subsec_nanos(),
            100
        );
        assert_eq!(
            from_file_time(116_444_736_000_000_000).unwrap(),
            Some(utc(1970, 1, 1, 0, 0, 0))
        );
        assert_eq!(
            from_file_time(-1).unwrap_err().code,
            codes::DATETIME_OUT_OF_RANGE
        );
        assert_eq!(
            from_file_time(FILETIME_MAX + 1).unwrap_err().code,
            codes::DATETIME_OUT_OF_RANGE
        );
        let last = from_file_time(FILETIME_MAX).unwrap().unwrap();
        assert_eq!(last.year(), 9999);
        assert_eq!(to_file_time(last).unwrap(), FILETIME_MAX);
        let d = utc(2024, 5, 6, 7, 8, 9);
        assert_eq!(from_file_time(to_file_time(d).unwrap()).unwrap(), Some(d));
        assert_eq!(to_file_time(utc(1601, 1, 1, 0, 0, 0)).unwrap(), 0);
        assert_eq!(
            to_file_time(utc(1600, 12, 31, 23, 59, 59))
                .unwrap_err()
                .code,
            codes::DATETIME_OUT_OF_RANGE
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn fixed(
        y: i32,
        mo: u32,
        d: u32,
        h: u32,
        mi: u32,
        s: u32,
        ns: u32,
        off: i32,
    ) -> DateTime<FixedOffset> {
        FixedOffset::east_opt(off)
            .unwrap()
            .with_ymd_and_hms(y, mo, d, h, mi, s)
            .unwrap()
            + Duration::nanoseconds(i64::from(ns))
    }

    #[test]
    fn format_tokens_render() {
        let dt = fixed(2024, 3, 5, 14, 7, 9, 123_456_700, 5 * 3600 + 30 * 60);
        let cases = [
            ("yyyy", "2024"),
            ("yyy", "2024"),
            ("yy", "24"),
            ("y", "24"),
            ("yyyyy", "202424"),
            ("MMMM", "March"),
            ("MMM", "Mar"),
            ("MM", "03"),
            ("M", "3"),
            ("dddd", "Tuesday"),
            ("ddd", "Tue"),
            ("dd", "05"),
            ("d", "5"),
            ("HH", "14"),
            ("H", "14"),
            ("hh", "02"),
            ("h", "2"),
            ("mm", "07"),
            ("m", "7"),
            ("ss", "09"),
            ("s", "9"),
            ("f", "1"),
            ("fff", "123"),
            ("fffffff", "1234567"),
            ("FFFFFFF", "1234567"),
            ("tt", "PM"),
            ("t", "P"),
            ("zzz", "+05:30"),
            ("zz", "+05"),
            ("z", "+5"),
            ("K", "+05:30"),
            ("'yyyy'", "yyyy"),
            ("\"at\" H", "at 14"),
            ("\\d", "d"),
            ("%d", "5"),
            ("yyyy-MM-ddTHH:mm:ssZ", "2024-03-05T14:07:09Z"),
            ("M/d/yyyy h:mm:ss tt", "3/5/2024 2:07:09 PM"),
            ("yyyyMMddHHmmss.0Z", "20240305140709.0Z"),
        ];
        for (f, want) in cases {
            assert_eq!(DotNetFormat::parse(f).unwrap().render(dt), want, "{f}");
        }
        let round = fixed(2024, 3, 5, 0, 7, 9, 500_000_000, -3600);
        assert_eq!(DotNetFormat::parse("ss.FFF").unwrap().render(round), "09.5");
        assert_eq!(
            DotNetFormat::parse("h tt zzz").unwrap().render(round),
            "12 AM -01:00"
        );
        assert_eq!(DotNetFormat::parse("z").unwrap().render(round), "-1");
        let whole = fixed(2024, 3, 5, 0, 7, 9, 0, 0);
        assert_eq!(DotNetFormat::parse("ss.FFF").unwrap().render(whole), "09");
        assert_eq!(
            DotNetFormat::parse("ss.fff").unwrap().render(whole),
            "09.000"
        );
        assert_eq!(DotNetFormat::parse("K").unwrap().render(whole), "+00:00");
    }

    #[test]
    fn format_tokens_parse() {
        let p = |f: &str, t: &str| DotNetFormat::parse(f).unwrap().parse_input(t);
        assert_eq!(
            p("yyyyMMdd", "20240305").unwrap(),
            fixed(2024, 3, 5, 0, 0, 0, 0, 0)
        );
        assert_eq!(
            p("yy-M-d", "29-3-5").unwrap(),
            fixed(2029, 3, 5, 0, 0, 0, 0, 0)
        );
        assert_eq!(p("yy", "30").unwrap().year(), 1930);
        assert_eq!(p("y", "5").unwrap().year(), 2005);
        assert_eq!(
            p("MMMM d, yyyy", " march 5, 2024 ").unwrap(),
            fixed(2024, 3, 5, 0, 0, 0, 0, 0)
        );
        assert_eq!(p("dd-MMM-yyyy", "05-SEP-2024").unwrap().month(), 9);
        assert_eq!(
            p("dddd, d MMM", "friday, 2 Feb").unwrap(),
            fixed(1, 2, 2, 0, 0, 0, 0, 0)
        );
        assert_eq!(p("ddd d", "Mon 2").unwrap().day(), 2);
        assert_eq!(p("HH:mm:ss", "23:04:05").unwrap().hour(), 23);
        assert_eq!(p("H:m:s", "3:4:5").unwrap(), fixed(1, 1, 1, 3, 4, 5, 0, 0));
        assert_eq!(p("h:mm tt", "12:30 am").unwrap().hour(), 0);
        assert_eq!(p("h:mm tt", "12:30 PM").unwrap().hour(), 12);
        assert_eq!(p("hh:mm t", "01:30 P").unwrap().hour(), 13);
        assert_eq!(p("ss.fff", "01.250").unwrap().nanosecond(), 250_000_000);
        assert_eq!(p("ss.FFF", "01.25").unwrap().nanosecond(), 250_000_000);
        assert_eq!(p("ss.FFF", "01").unwrap().nanosecond(), 0);
        assert_eq!(
            p("ss.fffffff", "01.1234567").unwrap().nanosecond(),
            123_456_700
        );
        for (off_text, secs) in [
            ("Z", 0),
            ("+5", 18000),
            ("-05", -18000),
            ("+0530", 19800),
            ("-05:30", -19800),
        ] {
            let d = p("yyyy-MM-ddzzz", &format!("2024-01-01{off_text}")).unwrap();
            assert_eq!(d.offset().local_minus_utc(), secs, "{off_text}");
        }
        assert_eq!(p("HHK", "10").unwrap().offset().local_minus_utc(), 0);
        assert_eq!(
            p("HHK", "10+02:00").unwrap().offset().local_minus_utc(),
            7200
        );
        assert_eq!(
            p("yyyy-MM-ddTHH:mm:ssZ", "2024-01-01T10:00:00Z")
                .unwrap()
                .hour(),
            10
        );
        assert_eq!(p("'Date:' yyyy", "Date: 2024").unwrap().year(), 2024);
        // Every render parses back.
        let dt = fixed(2024, 11, 9, 17, 5, 3, 120_000_000, -7200);
        for f in [
            "yyyy-MM-dd HH:mm:ss.fff zzz",
            "dddd, MMMM d, yyyy h:mm:ss.FF tt K",
            "yyMMddHHmmss.FFFzz",
        ] {
            let fmt = DotNetFormat::parse(f).unwrap();
            assert_eq!(fmt.parse_input(&fmt.render(dt)).unwrap(), dt, "{f}");
        }
        for (f, t) in [
            ("yyyy", "24"),
            ("yyyy", "20245"),
            ("MM", "3"),
            ("MM/dd", "02/30"),
            ("HH", "24"),
            ("hh", "13"),
            ("h tt", "1 XM"),
            ("MMM", "Sept"),
            ("ddd", "Xyz"),
            ("fff", "12"),
            ("yyyy-MM-dd", "2024/01/01"),
            ("yyyy-MM-dd", "2024-01-01T00"),
            ("zzz", "+15:00"),
            ("yyyy'Z'", "2024z"),
        ] {
            assert_eq!(p(f, t).unwrap_err().code, codes::FORMAT_MISMATCH, "{f} {t}");
        }
    }

    #[test]
    fn malformed_formats_and_styles() {
        for bad in ["", "'abc", "yyyy\\", "\"x"] {
            assert_eq!(
                DotNetFormat::parse(bad).unwrap_err().code,
                codes::INVALID_FORMAT,
                "{bad}"
            );
        }
        assert_eq!(
            DateTimeStyles::parse("").unwrap(),
            DateTimeStyles::default()
        );
        assert!(
            DateTimeStyles::parse("DateTimeStyles.AdjustToUniversal")
                .unwrap()
                .adjust_to_universal
        );
        assert!(
            DateTimeStyles::parse("AllowWhiteSpaces | adjusttouniversal")
                .unwrap()
                .adjust_to_universal
        );
        assert!(
            !DateTimeStyles::parse("None,AssumeLocal")
                .unwrap()
                .adjust_to_universal
        );
        assert_eq!(
            DateTimeStyles::parse("Bogus").unwrap_err().code,
            codes::INVALID_DATETIME_STYLES
        );
    }

    #[test]
    fn reformat_matches_parse_then_render() {
        let inputs = [
            ("yyyyMMddHHmmss.fZ", "20240229134500.0Z"),
            ("yyyyMMddHHmmss.fZ", "20230229134500.0Z"),
            ("yyyyMMddHHmmss.fZ", "00010101000000.0Z"),
            ("yyyyMMddHHmmss.fZ", "99991231235959.0Z"),
            ("yyyyMMddHHmmss.fZ", "20241301000000.0Z"),
            ("yyyyMMddHHmmss.fZ", "20240101240000.0Z"),
            ("yyyyMMddHHmmss.fZ", "20240101006000.0Z"),
            ("yyyyMMddHHmmss.fZ", "2024010100000.0Z"),
            ("yyyy-MM-ddTHH:mm:ssK", "0001-01-01T00:30:00+01:00"),
            ("yyyy-MM-ddTHH:mm:ssK", "9999-12-31T23:30:00-01:00"),
            ("yyyy-MM-ddTHH:mm:ssK", "2024-06-30T23:30:00-05:30"),
            ("yyyy-MM-ddTHH:mm:ssK", "2024-06-30T23:30:00+24:00"),
            ("yyyy-MM-dd h:mm tt", "1900-02-29 12:05 AM"),
            ("yyyy-MM-dd h:mm tt", "2000-02-29 12:05 PM"),
            ("dd MMM yyyy", " 07 Mar 2021 "),
            ("yyyyMMdd", "20240431"),
            ("yyyyMMdd", "20240430"),
        ];
        let outputs = [
            "yyyy-MM-dd",
            "dddd, d MMMM yy h:mm:ss.FFF tt zzz",
            "ddd MMM yyyy-MM-ddTHH:mm:ss.fffffffK z zz",
        ];
        for (inf, text) in inputs {
            let input = DotNetFormat::parse(inf).unwrap();
            for outf in outputs {
                let output = DotNetFormat::parse(outf).unwrap();
                let slow = input.parse_input(text).map(|d| output.render_smol(d));
                let fast = input.reformat(text, &output);
                assert_eq!(fast, slow, "{inf:?} {text:?} {outf:?}");
            }
        }
        // The fast path renders at least the plain case the same as chrono's fields.
        let input = DotNetFormat::parse("yyyyMMddHHmmss.fZ").unwrap();
        let output = DotNetFormat::parse("yyyy-MM-dd dddd").unwrap();
        assert_eq!(
            input.reformat("20240229134500.0Z", &output).unwrap(),
            "2024-02-29 Thursday"
        );
    }

    #[test]
    fn fixed_layouts() {
        let has = |f: &str| DotNetFormat::parse(f).unwrap().fixed.is_some();
        for f in [
            "yyyyMMddHHmmss.fZ",
            "yyyy-MM-dd",
            "yyyyMMdd",
            "yy/MM/dd hh:mm:ss.fffffff",
            "'0'yyyy",
            "%",
        ] {
            assert!(has(f), "{f}");
        }
        for f in [
            " yyyy",
            "yyyy\t",
            "%y%y",
            "yyyy-M-dd",
            "y",
            "ss.FFF",
            "yyyy-MM-dd tt",
            "MMM yyyy",
            "yyyyMMddzzz",
            "yyyyK",
            "'é'yyyy",
        ] {
            assert!(!has(f), "{f}");
        }
        let fx = DotNetFormat::parse("yyyyMMddHHmmss.fZ").unwrap();
        let layout = fx.fixed.as_ref().unwrap();
        assert_eq!(layout.len, 17);
        assert_eq!(
            layout.scan("20240312093000.5Z"),
            Some(Fields {
                year: 2024,
                month: 3,
                day: 12,
                hour: 9,
                minute: 30,
                second: 0,
                nanos: 500_000_000,
                off: 0,
            })
        );
        for other in [
            " 20240312093000.5Z",
            "20240312093000.5z",
            "2024031209300.5Z",
            "2024031209300x.5Z",
            "20240312093000,5Z",
            "２0240312093000.5Z",
        ] {
            assert_eq!(layout.scan(other), None, "{other}");
        }
        // Out-of-range fields are read as they are; the date check comes after.
        assert_eq!(layout.scan("20241332250000.0Z").unwrap().month, 13);
        let hh = DotNetFormat::parse("hh:mm").unwrap();
        assert_eq!(hh.fixed.as_ref().unwrap().scan("13:00"), None);
        assert_eq!(hh.fixed.as_ref().unwrap().scan("12:00").unwrap().hour, 12);
    }

    #[test]
    fn templates() {
        let has = |f: &str| DotNetFormat::parse(f).unwrap().template.is_some();
        for f in [
            "yyyy-MM-dd",
            "yyyyMMddHHmmss.fZ",
            "dd/MM/yyyy hh:mm:ss.fff",
            "'é' yyyy",
            "%",
        ] {
            assert!(has(f), "{f}");
        }
        for f in [
            "yyyy-M-dd",
            "yy",
            "MMM yyyy",
            "ss.FFF",
            "HH tt",
            "HHzzz",
            "yyyy-MM-dd HH:mm:ss.fffffff",
        ] {
            assert!(!has(f), "{f}");
        }
        let f = DotNetFormat::parse("yyyy-MM-dd HH:mm:ss.fff").unwrap();
        let dt = fixed(2024, 3, 5, 14, 7, 9, 123_456_700, 0);
        assert_eq!(f.render_smol(dt), "2024-03-05 14:07:09.123");
        // A year the template has no room for is rendered token by token.
        let late = fixed(9999, 12, 31, 23, 0, 0, 0, 0) + Duration::hours(2);
        let f = DotNetFormat::parse("yyyy-MM-dd").unwrap();
        assert_eq!(f.render_smol(late), "10000-01-01");
        let early = fixed(1, 1, 1, 0, 0, 0, 0, 0) - Duration::days(1);
        assert_eq!(f.render_smol(early), "0000-12-31");
        // Long renderings, past the inline buffers.
        let long = "dddd, MMMM dd, yyyy 'at' HH:mm:ss.fffffff zzz (dddd, MMMM dd, yyyy)";
        let want = "Tuesday, March 05, 2024 at 14:07:09.1234567 +00:00 \
                    (Tuesday, March 05, 2024)";
        let f = DotNetFormat::parse(long).unwrap();
        assert_eq!(f.render(dt), want);
        assert_eq!(f.render_smol(dt), want);
    }

    /// Format pieces: every token letter run and literals (quoted, escaped, non-ASCII, blank).
    const PIECES: [&str; 46] = [
        "yyyy", "yyy", "yy", "y", "MMMM", "MMM", "MM", "M", "dddd", "ddd", "dd", "d", "HH", "H",
        "hh", "h", "mm", "m", "ss", "s", "f", "ff", "fff", "fffffff", "F", "FF", "FFFFFFF", "tt",
        "t", "z", "zz", "zzz", "K", "-", ":", ".", " ", "T", "Z", "/", "'at'", "\\Z", ", ", "é",
        "'0'", "%",
    ];
    /// Pieces of formats with a fixed byte layout (and a few that break it).
    const FIXED_PIECES: [&str; 19] = [
        "yyyy", "yy", "MM", "dd", "HH", "hh", "mm", "ss", "f", "fff", "fffffff", "-", ":", ".",
        "Z", "T", " ", "'0'", "F",
    ];

    fn format_from(pieces: &[&str], picks: &[usize]) -> Option<DotNetFormat> {
        let f: String = picks.iter().map(|&i| pieces[i % pieces.len()]).collect();
        DotNetFormat::parse(&f).ok()
    }

    /// Input text for `fm` from the random numbers `r`: each token written with a plausible,
    /// boundary or wrong value, width or spelling; then blank or non-ASCII text around or inside.
    fn text_for(fm: &DotNetFormat, r: &[u32]) -> String {
        let mut k = 0;
        let mut next = |n: u32| {
            k += 1;
            r[k % r.len()] % n.max(1)
        };
        let mut out = String::new();
        for t in &fm.toks {
            let pick = |n: u32, list: &[&str]| list[(n as usize) % list.len()].to_string();
            let piece = match t {
                Tok::Lit { text, .. } => match next(16) {
                    0 => String::new(),
                    1 => text.replace('.', ","),
                    _ => text.clone(),
                },
                Tok::MonthName { full } => {
                    let m = MONTHS[next(12) as usize];
                    let m = if *full {
                        m.to_string()
                    } else {
                        m[..3].to_string()
                    };
                    match next(4) {
                        0 => m.to_uppercase(),
                        1 => pick(next(3), &["Sept", "Foo", ""]),
                        _ => m,
                    }
                }
                Tok::DayName { full } => {
                    let d = WEEKDAYS[next(7) as usize];
                    if *full {
                        d.to_string()
                    } else {
                        d[..3].to_lowercase()
                    }
                }
                Tok::AmPm(_) => pick(next(8), &["AM", "PM", "am", "pm", "A", "P", "XM", ""]),
                Tok::Offset(_) | Tok::OffsetK => pick(
                    next(9),
                    &[
                        "Z", "+05:30", "-0800", "+14", "-1", "+15:00", "+01:60", "", "+24:00",
                    ],
                ),
                t => {
                    let (_, min, max) = t.reads().unwrap();
                    let edges: &[u32] = match t {
                        Tok::Year(4) => &[0, 1, 1600, 1900, 2000, 2023, 2024, 9998, 9999],
                        Tok::Year(_) => &[0, 29, 30, 99],
                        Tok::MonthNum(_) => &[0, 1, 2, 12, 13],
                        Tok::DayNum(_) => &[0, 1, 28, 29, 30, 31, 32],
                        Tok::Hour24(_) | Tok::Hour12(_) => &[0, 1, 11, 12, 13, 23, 24],
                        Tok::Minute(_) | Tok::Second(_) => &[0, 30, 59, 60, 99],
                        _ => &[0, 5, 9_999_999],
                    };
                    let v = if next(2) == 0 {
                        edges[next(edges.len() as u32) as usize]
                    } else {
                        next(10u32.pow(max as u32))
                    };
                    let width = match next(20) {
                        0 => min.saturating_sub(1),
                        1 => max + 1,
                        _ => min.max(1) + next((max - min.max(1) + 1) as u32) as usize,
                    };
                    format!("{v:0width$}")
                }
            };
            out.push_str(&piece);
        }
        match next(16) {
            0 => format!(" {out}"),
            1 => format!("{out}\t\n"),
            2 => format!("\u{a0}{out}\u{2003}"),
            3 => format!("{out}é"),
            4 => {
                let at = next(out.len() as u32 + 1) as usize;
                let at = (0..=at)
                    .rev()
                    .find(|&i| out.is_char_boundary(i))
                    .unwrap_or(0);
                format!("{}５{}", &out[..at], &out[at..])
            }
            5 => {
                let cut = next(out.len() as u32 + 1) as usize;
                let cut = (0..=cut)
                    .rev()
                    .find(|&i| out.is_char_boundary(i))
                    .unwrap_or(0);
                out[..cut].to_string()
            }
            _ => out,
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]

        /// Filling in a template renders what rendering token by token does.
        #[test]
        fn template_equals_token_rendering(
            fixed_only in proptest::bool::ANY,
            picks in proptest::collection::vec(0usize..100, 1..8),
            secs in -62_200_000_000i64..253_500_000_000,
            nanos in 0u32..1_000_000_000,
            off_minutes in -1439i32..1440,
        ) {
            let pieces: &[&str] = if fixed_only { &FIXED_PIECES } else { &PIECES };
            let Some(fm) = format_from(pieces, &picks) else { return Ok(()) };
            let Some(utc) = Utc.timestamp_opt(secs, nanos).single() else { return Ok(()) };
            let dt = utc.with_timezone(&FixedOffset::east_opt(off_minutes * 60).unwrap());
            let smol = fm.render_smol(dt);
            proptest::prop_assert_eq!(&smol, &fm.render_smol_by_token(&Fields::of(dt)));
            proptest::prop_assert_eq!(smol.to_string(), fm.render(dt));
        }

        /// `reformat` (the fixed-layout scan and the chrono-free check) gives exactly what
        /// parsing and then rendering gives: the same text, or an error with the same code and
        /// message; and a fixed-layout scan reads what the general scan reads.
        #[test]
        fn reformat_equals_parse_then_render(
            fixed_only in proptest::bool::ANY,
            in_picks in proptest::collection::vec(0usize..100, 1..8),
            out_picks in proptest::collection::vec(0usize..100, 1..8),
            r in proptest::collection::vec(proptest::num::u32::ANY, 1..40),
            any_text in proptest::option::weighted(0.1, ".{0,24}"),
        ) {
            let input = if fixed_only {
                format_from(&FIXED_PIECES, &in_picks)
            } else {
                format_from(&PIECES, &in_picks)
            };
            let (Some(input), Some(output)) = (input, format_from(&PIECES, &out_picks)) else {
                return Ok(());
            };
            let text = any_text.unwrap_or_else(|| text_for(&input, &r));
            let slow = input.parse_input(&text).map(|d| output.render_smol(d));
            let fast = input.reformat(&text, &output);
            proptest::prop_assert_eq!(&fast, &slow, "{:?} {:?}", input, text);
            if let Some(fields) = input.fixed.as_ref().and_then(|l| l.scan(&text)) {
                proptest::prop_assert_eq!(input.scan_text(&text), Ok(fields));
            }
        }
    }
}
