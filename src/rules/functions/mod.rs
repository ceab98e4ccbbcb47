//! The function library of the expression language (spec §6): one eager implementation per
//! function, called by the evaluator with already evaluated arguments, plus the per-call-site
//! [`Precompiled`] artefacts (regular expressions, .NET date formats, intervals, cultures, …)
//! compiled **once** from literal arguments.
//!
//! Lazy and structural functions belong to the evaluator: `IIF`, `Switch`, `Coalesce` must only
//! evaluate the arguments they need, `SelectUniqueValue` and `IgnoreFlowIfNullOrEmpty` produce
//! outcomes that are not values, and `Redact` marks results. This module provides the pieces they
//! need ([`iif_condition`], [`switch_key_matches`], [`coalesce_is_value`], [`is_null_or_empty`],
//! [`select_unique_check`]); [`call`] evaluates `IIF`, `Switch`, `Coalesce` and `Redact` eagerly
//! over given values (same value, but without the laziness) and refuses the other two.
//!
//! Pure: no clock (`Now()` reads the context), no randomness except the context's seeded source,
//! no I/O, no global state; no input panics.

mod text;

use std::borrow::Cow;

use base64::Engine as _;
use chrono::{DateTime, FixedOffset, Utc};

pub use text::{
    culture_rules, is_default_word_char, normalize_diacritics, pcase, simple_lower, simple_title,
    simple_upper, to_lower, to_upper, CaseRules,
};

use crate::rules::context::EvalContext;
use crate::rules::datetime::{self, DateTimeStyles, DotNetFormat, Interval};
use crate::rules::function::Function;
use crate::rules::regex::DotNetRegex;
use crate::rules::value::{codes, describe, EvalError, EvalResult, EvalValue};

// ---------------------------------------------------------------------------------------------
// Helpers for the evaluator's lazy functions
// ---------------------------------------------------------------------------------------------

/// `IIF` condition (spec §4.5, §6): `Ok(None)` when the condition is Null (the `IIF` yields Null),
/// otherwise its strict truthiness; non-boolean-like values and Multis of several values are
/// errors.
pub fn iif_condition(condition: &EvalValue) -> EvalResult<Option<bool>> {
    condition.truthiness()
}

/// `Switch` key matching (spec §6): source and key are converted to strings with Null as `""`
/// (Booleans as `True`/`False`) and compared ordinally, case-sensitively. A Multi of several
/// values on either side is an error (`arg` 0 = source, 1 = key).
pub fn switch_key_matches(source: &EvalValue, key: &EvalValue) -> EvalResult<bool> {
    // The usual case, a string attribute against a string literal: their texts are themselves.
    if let (EvalValue::String(s), EvalValue::String(k)) = (source, key) {
        return Ok(s == k);
    }
    let s = source
        .to_text()
        .map_err(|e| e.at(Function::Switch, 0, "source"))?;
    let k = key.to_text().map_err(|e| EvalError {
        arg: Some(1),
        ..e.in_function("Switch: key")
    })?;
    Ok(s.unwrap_or_default() == k.unwrap_or_default())
}

/// `Coalesce`: whether a candidate counts as a value (anything but Null; `""` and Multis count).
pub fn coalesce_is_value(v: &EvalValue) -> bool {
    !v.is_null()
}

/// Null, `""`, or a Multi whose values are all `""` (spec §6 `IsNullOrEmpty`,
/// `IgnoreFlowIfNullOrEmpty`). Whitespace is not empty.
pub fn is_null_or_empty(v: &EvalValue) -> bool {
    match v {
        EvalValue::Null => true,
        EvalValue::String(s) | EvalValue::Reference(s) => s.is_empty(),
        EvalValue::Binary(b) => b.is_empty(),
        EvalValue::Structured(r) => r.is_empty(),
        EvalValue::Multi(vs) => vs.iter().all(is_null_or_empty),
        _ => false,
    }
}

/// What `SelectUniqueValue` does with one evaluated candidate.
#[derive(Debug, Clone, PartialEq)]
pub enum UniqueCheck {
    /// Null or `""`: skipped.
    Skip,
    /// The oracle reports the value as used in the target; try the next rule.
    Taken,
    /// The value is free: `SelectUniqueValue` returns it.
    Free(EvalValue),
}

/// Checks one `SelectUniqueValue` candidate (spec §6) against the context's uniqueness oracle.
/// A multi-valued candidate is an error; `rule` is the 0-based slot for the error.
pub fn select_unique_check(
    candidate: &EvalValue,
    rule: usize,
    ctx: &EvalContext<'_>,
) -> EvalResult<UniqueCheck> {
    if let EvalValue::Multi(vs) = candidate {
        return Err(EvalError::new(
            codes::MULTI_VALUED,
            format!("candidate has {} values where one is required", vs.len()),
        )
        .at(Function::SelectUniqueValue, rule, ""));
    }
    let text = candidate
        .to_string_value()
        .map_err(|e| e.at(Function::SelectUniqueValue, rule, "candidate"))?;
    match text {
        None => Ok(UniqueCheck::Skip),
        Some(t) if t.is_empty() => Ok(UniqueCheck::Skip),
        Some(t) if (ctx.is_unique)(&t) => Ok(UniqueCheck::Free(candidate.clone())),
        Some(_) => Ok(UniqueCheck::Taken),
    }
}

/// The warning `SingleAppRoleAssignment` should emit for this context (several assignments:
/// dirsync picks the ordinally smallest role value), or `None`.
pub fn single_app_role_warning(ctx: &EvalContext<'_>) -> Option<String> {
    let n = ctx.app_role_assignments.len();
    (n > 1).then(|| {
        format!(
            "SingleAppRoleAssignment: the object has {n} app role assignments; the one with the \
             ordinally smallest role value is used"
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Precompiled arguments
// ---------------------------------------------------------------------------------------------

/// How `InStr` compares (spec §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TextCompare {
    /// `vbBinaryCompare` / `0`: exact, case-sensitive.
    #[default]
    Binary,
    /// `vbTextCompare` / `1`: case-insensitive with simple lower-case folding.
    Text,
}

pub use crate::rules::expr::ReplaceMode;

/// The mode of a `Replace` call from its provided (non-empty) slots (spec §6 precedence table);
/// any other combination is an error ([`codes::INVALID_REPLACE_MODE`]). Slots: 0 source,
/// 1 oldValue, 2 regexPattern, 3 regexGroupName, 4 replacementValue, 5 replacementAttributeName,
/// 6 template.
pub fn replace_mode(provided: &[bool]) -> EvalResult<ReplaceMode> {
    ReplaceMode::select(|i| provided.get(i).copied().unwrap_or(false)).ok_or_else(|| {
        EvalError::new(
            codes::INVALID_REPLACE_MODE,
            "Replace: the provided arguments select no mode; provide oldValue + \
             replacementValue, regexPattern + replacementValue, regexPattern + \
             regexGroupName + replacementValue, regexPattern + regexGroupName + \
             replacementAttributeName, or oldValue + template",
        )
    })
}

/// A validated `RandomString` request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RandomSpec {
    length: usize,
    mins: [usize; 4],
    classes: [Vec<char>; 4],
}

/// Per-call-site artefacts compiled once from literal arguments by [`precompile`]. Fields that
/// are absent are computed from the run-time arguments at each call. `Default` is "nothing
/// precompiled", which is always correct but slower.
#[derive(Debug, Clone, Default)]
pub struct Precompiled {
    interval: Option<Interval>,
    input_format: Option<DotNetFormat>,
    output_format: Option<DotNetFormat>,
    styles: Option<DateTimeStyles>,
    case_rules: Option<CaseRules>,
    compare: Option<TextCompare>,
    /// `PCase` separators: `Some(None)` = default classification.
    pcase_separators: Option<Option<Vec<char>>>,
    /// `Word` delimiters.
    word_delimiters: Option<Vec<char>>,
    replace_mode: Option<ReplaceMode>,
    regex: Option<DotNetRegex>,
    group: Option<usize>,
    random: Option<RandomSpec>,
    /// The literal `replacementValue` was checked against the literal pattern.
    replacement_checked: bool,
    /// A literal text control argument: `Join`'s separator, `Split`'s delimiter.
    text: Option<String>,
    /// The literal `replacementValue`, read for the literal pattern.
    replacement: Option<crate::rules::regex::Replacement>,
}

impl Precompiled {
    /// The `Replace` mode chosen at compile time, if this is a `Replace` call site.
    pub fn replace_mode(&self) -> Option<ReplaceMode> {
        self.replace_mode
    }

    /// The literal text control argument compiled for this call site: `Join`'s separator or
    /// `Split`'s (non-empty) delimiter.
    pub(crate) fn text(&self) -> Option<&str> {
        self.text.as_deref()
    }
}

/// Compiles the literal arguments of one call site (spec §3.1 item 5). `literal_args[i]`:
/// `None` = slot omitted, `Some(None)` = not a literal (known only at run time),
/// `Some(Some(v))` = the literal value. Invalid literal control arguments (interval, culture,
/// regular expression, group name, date format, styles, compare type, counts, a Null literal in
/// a control slot, …) are errors here; valid ones are compiled and reused by [`call`].
pub fn precompile(
    f: Function,
    literal_args: &[Option<Option<&EvalValue>>],
) -> EvalResult<Precompiled> {
    let mut pre = Precompiled::default();
    let n = literal_args.len();
    if !f.arity().accepts(n) {
        return Err(arity_error(f, n));
    }
    // Some(x): x = the literal or None when omitted; None: only known at run time.
    let lit = |i: usize| -> Option<Option<&EvalValue>> {
        match literal_args.get(i) {
            None | Some(None) => Some(None),
            Some(Some(None)) => None,
            Some(Some(Some(v))) => Some(Some(*v)),
        }
    };
    let slots = literal_args.len();
    let p = |i: usize| P {
        f,
        slot: i,
        name: PName::Table(slots),
    };
    match f {
        Function::DateAdd | Function::DateDiff => {
            if let Some(v) = lit(0) {
                pre.interval = Some(resolve_interval(v, p(0))?);
            }
            if f == Function::DateAdd {
                if let Some(v) = lit(1) {
                    ctl_int(v, p(1))?;
                }
            }
        }
        Function::FormatDateTime => {
            let s = fdt_slots(n);
            if let Some(i) = s.styles {
                if let Some(v) = lit(i) {
                    pre.styles = Some(resolve_styles(v, p(i))?);
                }
            }
            if let Some(i) = s.input {
                if let Some(Some(v)) = lit(i) {
                    pre.input_format = Some(resolve_format(v, p(i))?);
                }
            }
            if let Some(v) = lit(s.output) {
                pre.output_format = Some(resolve_format(req(v, p(s.output))?, p(s.output))?);
            }
        }
        Function::InStr => {
            if let Some(v) = lit(2) {
                resolve_start(v, p(2))?;
            }
            if let Some(v) = lit(3) {
                pre.compare = Some(resolve_compare(v, p(3))?);
            }
        }
        Function::Item => {
            if let Some(v) = lit(1) {
                resolve_index(v, p(1))?;
            }
        }
        Function::Join => {
            if let Some(v) = lit(0) {
                pre.text = Some(ctl_str(v, p(0))?);
            }
        }
        Function::Left => {
            if let Some(v) = lit(1) {
                ctl_int(v, p(1))?;
            }
        }
        Function::Mid => {
            for i in [1, 2] {
                if let Some(v) = lit(i) {
                    ctl_int(v, p(i))?;
                }
            }
        }
        Function::PCase => {
            if let Some(v) = lit(1) {
                pre.pcase_separators = Some(resolve_pcase_separators(v, p(1))?);
            }
        }
        Function::ToLower | Function::ToUpper => {
            if let Some(v) = lit(1) {
                pre.case_rules = Some(resolve_culture(v, p(1))?);
            }
        }
        Function::Split => {
            if let Some(v) = lit(1) {
                pre.text = Some(resolve_delimiter(v, p(1))?);
            }
        }
        Function::Word => {
            if let Some(v) = lit(1) {
                ctl_int(v, p(1))?;
            }
            if let Some(v) = lit(2) {
                pre.word_delimiters = Some(ctl_str(v, p(2))?.chars().collect());
            }
        }
        Function::RandomString => {
            let mut counts = [0i64; 5];
            let mut all = true;
            for (i, c) in counts.iter_mut().enumerate() {
                match lit(i) {
                    Some(v) => {
                        *c = ctl_int(v, p(i))?;
                        if i == 0 {
                            check_length(*c, p(0))?;
                        } else if *c < 0 {
                            return Err(negative_minimum(*c, p(i)));
                        }
                    }
                    None => all = false,
                }
            }
            let avoid = match lit(5) {
                Some(None) => Some(String::new()),
                Some(Some(v)) => Some(ctl_str(Some(v), p(5))?),
                None => None,
            };
            if let (true, Some(avoid)) = (all, avoid) {
                let mins = [counts[1], counts[2], counts[3], counts[4]];
                pre.random = Some(random_spec(counts[0], mins, &avoid)?);
            }
        }
        Function::Replace => {
            let provided: Vec<bool> = literal_args.iter().map(Option::is_some).collect();
            let mode = replace_mode(&provided)?;
            pre.replace_mode = Some(mode);
            if mode != ReplaceMode::Template && mode != ReplaceMode::Plain {
                if let Some(v) = lit(2) {
                    let re = resolve_regex(v, p(2))?;
                    if mode != ReplaceMode::Regex {
                        if let Some(g) = lit(3) {
                            pre.group = Some(resolve_group(&re, g, p(3))?);
                        }
                    }
                    if mode != ReplaceMode::Fallback {
                        if let Some(Some(r)) = lit(4) {
                            check_replacement(&re, r, p(4))?;
                            pre.replacement_checked = true;
                            if let Ok(r) = r.single() {
                                pre.replacement = Some(
                                    re.replacement(&r.to_text().ok().flatten().unwrap_or_default()),
                                );
                            }
                        }
                    }
                    pre.regex = Some(re);
                } else if mode != ReplaceMode::Regex {
                    if let Some(g) = lit(3) {
                        ctl_str(g, p(3))?;
                    }
                }
            }
        }
        _ => {}
    }
    Ok(pre)
}

// ---------------------------------------------------------------------------------------------
// Argument access
// ---------------------------------------------------------------------------------------------

/// Where an argument sits, for error messages.
#[derive(Clone, Copy)]
struct P {
    f: Function,
    slot: usize,
    name: PName,
}

/// A parameter's name: given, or looked up in the function table only when an error needs it.
#[derive(Clone, Copy)]
enum PName {
    Given(&'static str),
    /// The name of the slot in a call with this many slots ([`Function::slot`]).
    Table(usize),
}

impl P {
    fn err(self, e: EvalError) -> EvalError {
        let name = match self.name {
            PName::Given(n) => n,
            PName::Table(slots) => param_names(self.f, slots)(self.slot),
        };
        e.at(self.f, self.slot, name)
    }
}

/// The parameter names of `f` called with `slots` slots, from the function table
/// ([`Function::slot`]).
fn param_names(f: Function, slots: usize) -> impl Fn(usize) -> &'static str {
    move |i| f.slot(i, slots).map_or("argument", |s| s.name)
}

fn arity_error(f: Function, n: usize) -> EvalError {
    let a = f.arity();
    let expected = match a.max {
        Some(m) if m == a.min => format!("{m}"),
        Some(m) => format!("{} to {m}", a.min),
        None => format!("at least {}", a.min),
    };
    EvalError::new(
        codes::ARGUMENT_COUNT,
        format!("{f}: called with {n} argument slots, expected {expected}"),
    )
}

/// A required slot: omitted is an error.
fn req(v: Option<&EvalValue>, p: P) -> EvalResult<&EvalValue> {
    v.ok_or_else(|| {
        p.err(EvalError::new(
            codes::ARGUMENT_COUNT,
            "is required and was omitted",
        ))
    })
}

/// A control value: required, single, not Null.
fn ctl(v: Option<&EvalValue>, p: P) -> EvalResult<&EvalValue> {
    let v = req(v, p)?.single().map_err(|e| p.err(e))?;
    if v.is_null() {
        return Err(p.err(EvalError::new(
            codes::NULL_CONTROL,
            "is Null (a control parameter needs a value)",
        )));
    }
    Ok(v)
}

fn ctl_str(v: Option<&EvalValue>, p: P) -> EvalResult<String> {
    ctl(v, p)?
        .to_string_value()
        .map_err(|e| p.err(e))
        .map(Option::unwrap_or_default)
}

fn ctl_int(v: Option<&EvalValue>, p: P) -> EvalResult<i64> {
    ctl(v, p)?
        .to_integer()
        .map_err(|e| p.err(e))
        .map(|i| i.unwrap_or(0))
}

/// A data value's string form (Null → None), borrowed from strings and references.
fn text_of(v: &EvalValue, p: P) -> EvalResult<Option<Cow<'_, str>>> {
    v.to_text().map_err(|e| p.err(e))
}

/// A data value that must be single (Null allowed).
fn single_data(v: Option<&EvalValue>, p: P) -> EvalResult<&EvalValue> {
    req(v, p)?.single().map_err(|e| p.err(e))
}

/// Applies `f` to each value of a Multi (result normalised, Nulls dropped) or to the value.
fn per_value(
    v: &EvalValue,
    mut f: impl FnMut(&EvalValue) -> EvalResult<EvalValue>,
) -> EvalResult<EvalValue> {
    match v {
        EvalValue::Multi(vs) => {
            let out = vs.iter().map(&mut f).collect::<EvalResult<Vec<_>>>()?;
            Ok(EvalValue::multi(out))
        }
        other => f(other),
    }
}

fn resolve_interval(v: Option<&EvalValue>, p: P) -> EvalResult<Interval> {
    Interval::parse(&ctl_str(v, p)?).map_err(|e| p.err(e))
}

fn resolve_format(v: &EvalValue, p: P) -> EvalResult<DotNetFormat> {
    DotNetFormat::parse(&ctl_str(Some(v), p)?).map_err(|e| p.err(e))
}

fn resolve_styles(v: Option<&EvalValue>, p: P) -> EvalResult<DateTimeStyles> {
    match v {
        None => Ok(DateTimeStyles::default()),
        Some(v) => DateTimeStyles::parse(&ctl_str(Some(v), p)?).map_err(|e| p.err(e)),
    }
}

fn resolve_culture(v: Option<&EvalValue>, p: P) -> EvalResult<CaseRules> {
    let Some(v) = v else {
        return Ok(CaseRules::Invariant);
    };
    let tag = ctl_str(Some(v), p)?;
    culture_rules(&tag).ok_or_else(|| {
        p.err(EvalError::new(
            codes::INVALID_CULTURE,
            format!("{tag:?} is not a culture name (expected a language tag such as \"en-US\" or \"tr-TR\")"),
        ))
    })
}

fn resolve_compare(v: Option<&EvalValue>, p: P) -> EvalResult<TextCompare> {
    let Some(v) = v else {
        return Ok(TextCompare::Binary);
    };
    let v = ctl(Some(v), p)?;
    let bad = || {
        p.err(EvalError::new(
            codes::INVALID_COMPARE_TYPE,
            format!(
                "{} is not a compare type (use vbBinaryCompare or vbTextCompare)",
                describe(v)
            ),
        ))
    };
    if let EvalValue::String(s) = v {
        let t = s.trim();
        if t.eq_ignore_ascii_case("vbBinaryCompare") {
            return Ok(TextCompare::Binary);
        }
        if t.eq_ignore_ascii_case("vbTextCompare") {
            return Ok(TextCompare::Text);
        }
    }
    match v.to_integer() {
        Ok(Some(0)) => Ok(TextCompare::Binary),
        Ok(Some(1)) => Ok(TextCompare::Text),
        _ => Err(bad()),
    }
}

fn resolve_start(v: Option<&EvalValue>, p: P) -> EvalResult<i64> {
    let Some(v) = v else { return Ok(1) };
    let start = ctl_int(Some(v), p)?;
    if start < 1 {
        return Err(p.err(EvalError::new(
            codes::INVALID_START,
            format!("{start} is below 1 (positions are 1-based)"),
        )));
    }
    Ok(start)
}

fn resolve_index(v: Option<&EvalValue>, p: P) -> EvalResult<i64> {
    let index = ctl_int(v, p)?;
    if index < 1 {
        return Err(p.err(EvalError::new(
            codes::INDEX_OUT_OF_RANGE,
            format!("{index} is below 1 (Item counts from 1)"),
        )));
    }
    Ok(index)
}

fn resolve_delimiter(v: Option<&EvalValue>, p: P) -> EvalResult<String> {
    let d = ctl_str(v, p)?;
    if d.is_empty() {
        return Err(p.err(EvalError::new(
            codes::EMPTY_DELIMITER,
            "is empty (Split needs a non-empty delimiter such as \",\")",
        )));
    }
    Ok(d)
}

fn resolve_pcase_separators(v: Option<&EvalValue>, p: P) -> EvalResult<Option<Vec<char>>> {
    let Some(v) = v else { return Ok(None) };
    let s = ctl_str(Some(v), p)?;
    Ok((!s.is_empty()).then(|| s.chars().collect()))
}

fn resolve_regex(v: Option<&EvalValue>, p: P) -> EvalResult<DotNetRegex> {
    let pattern = ctl_str(v, p)?;
    DotNetRegex::new(&pattern).map_err(|e| {
        p.err(EvalError::new(
            codes::INVALID_REGEX,
            format!("{pattern:?} is not a supported regular expression: {e}"),
        ))
    })
}

fn resolve_group(re: &DotNetRegex, v: Option<&EvalValue>, p: P) -> EvalResult<usize> {
    let name = ctl_str(v, p)?;
    re.group_index(&name).ok_or_else(|| {
        p.err(EvalError::new(
            codes::UNKNOWN_GROUP,
            format!("{name:?} is not a group of the pattern {:?}", re.pattern()),
        ))
    })
}

fn check_replacement(re: &DotNetRegex, v: &EvalValue, p: P) -> EvalResult<()> {
    let Some(r) = text_of(v.single().map_err(|e| p.err(e))?, p)? else {
        return Ok(());
    };
    re.check_replacement(&r)
        .map_err(|e| p.err(EvalError::new(codes::UNKNOWN_GROUP, format!("{r:?}: {e}"))))
}

// ---------------------------------------------------------------------------------------------
// The entry point
// ---------------------------------------------------------------------------------------------

/// Calls `f` on evaluated arguments. `args[i]` is `None` when slot `i` was omitted (the default
/// applies). `pre` must come from [`precompile`] for this call site (or be
/// `Precompiled::default()`). Errors carry the function, parameter and slot.
///
/// `IgnoreFlowIfNullOrEmpty` and `SelectUniqueValue` produce outcomes that are not values and
/// return [`codes::EVALUATOR_OWNED`]; `IIF`, `Switch`, `Coalesce` and `Redact` are evaluated
/// eagerly over the given values (the evaluator should evaluate them lazily itself).
pub fn call(
    f: Function,
    args: &[Option<EvalValue>],
    pre: &Precompiled,
    ctx: &mut EvalContext<'_>,
) -> EvalResult<EvalValue> {
    let refs: smallvec::SmallVec<[Option<&EvalValue>; 8]> =
        args.iter().map(Option::as_ref).collect();
    call_refs(f, &refs, pre, ctx)
}

/// [`call`] over borrowed arguments: the evaluator passes literals and intermediate values
/// without cloning them.
pub(crate) fn call_refs(
    f: Function,
    args: &[Option<&EvalValue>],
    pre: &Precompiled,
    ctx: &mut EvalContext<'_>,
) -> EvalResult<EvalValue> {
    if !f.arity().accepts(args.len()) {
        return Err(arity_error(f, args.len()));
    }
    let slots = args.len();
    let p = |i: usize| P {
        f,
        slot: i,
        name: PName::Table(slots),
    };
    let a = |i: usize| args.get(i).copied().flatten();
    use Function::*;
    match f {
        Append => {
            let suffix = text_of(single_data(a(1), p(1))?, p(1))?;
            per_value(req(a(0), p(0))?, |v| {
                Ok(match (v, &suffix) {
                    (EvalValue::Null, _) => EvalValue::Null,
                    (v, None) => v.clone(),
                    (v, Some(s)) => EvalValue::from(text_of(v, p(0))?.unwrap_or_default() + &**s),
                })
            })
        }
        AppRoleAssignmentsComplex | AssertiveAppRoleAssignmentsComplex => {
            Ok(if ctx.app_role_assignments.is_empty() {
                EvalValue::Null
            } else {
                EvalValue::Structured(ctx.app_role_assignments.to_vec())
            })
        }
        SingleAppRoleAssignment => Ok(ctx
            .app_role_assignments
            .iter()
            .map(|r| r.value.as_str())
            .min()
            .map_or(EvalValue::Null, EvalValue::from)),
        BitAnd => {
            let x = single_data(a(0), p(0))?
                .to_integer()
                .map_err(|e| p(0).err(e))?;
            let y = single_data(a(1), p(1))?
                .to_integer()
                .map_err(|e| p(1).err(e))?;
            Ok(match (x, y) {
                (Some(x), Some(y)) => EvalValue::Integer(x & y),
                _ => EvalValue::Null,
            })
        }
        CBool => Ok(EvalValue::Boolean(req(a(0), p(0))?.truthiness_lenient())),
        Not => Ok(EvalValue::Boolean(!req(a(0), p(0))?.truthiness_lenient())),
        CDate => per_value(req(a(0), p(0))?, |v| match v {
            EvalValue::Null => Ok(EvalValue::Null),
            EvalValue::DateTime(d) => Ok(EvalValue::DateTime(*d)),
            other => datetime::value_to_datetime(other)
                .map(EvalValue::DateTime)
                .map_err(|e| p(0).err(e)),
        }),
        ConvertToBase64 => per_value(req(a(0), p(0))?, |v| {
            Ok(match text_of(v, p(0))? {
                None => EvalValue::Null,
                Some(s) => {
                    let bytes: Vec<u8> = s.encode_utf16().flat_map(u16::to_le_bytes).collect();
                    EvalValue::from(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            })
        }),
        ConvertToUTF8Hex => per_value(req(a(0), p(0))?, |v| {
            Ok(match text_of(v, p(0))? {
                None => EvalValue::Null,
                Some(s) => {
                    EvalValue::from(s.bytes().map(|b| format!("{b:02X}")).collect::<String>())
                }
            })
        }),
        Count => Ok(EvalValue::Integer(match req(a(0), p(0))? {
            EvalValue::Null => 0,
            EvalValue::Multi(v) => v.len() as i64,
            EvalValue::Structured(v) => v.len() as i64,
            _ => 1,
        })),
        CStr => per_value(req(a(0), p(0))?, |v| {
            Ok(text_of(v, p(0))?.map_or(EvalValue::Null, EvalValue::from))
        }),
        DateAdd => {
            let interval = match pre.interval {
                Some(i) => i,
                None => resolve_interval(a(0), p(0))?,
            };
            let n = ctl_int(a(1), p(1))?;
            let d = single_data(a(2), p(2))?;
            if d.is_null() {
                return Ok(EvalValue::Null);
            }
            let d = datetime::value_to_datetime(d).map_err(|e| p(2).err(e))?;
            datetime::date_add(interval, n, d)
                .map(EvalValue::DateTime)
                .map_err(|e| p(1).err(e))
        }
        DateDiff => {
            let interval = match pre.interval {
                Some(i) => i,
                None => resolve_interval(a(0), p(0))?,
            };
            let d1 = single_data(a(1), p(1))?;
            let d2 = single_data(a(2), p(2))?;
            if d1.is_null() || d2.is_null() {
                return Ok(EvalValue::Null);
            }
            let d1 = datetime::value_to_datetime(d1).map_err(|e| p(1).err(e))?;
            let d2 = datetime::value_to_datetime(d2).map_err(|e| p(2).err(e))?;
            Ok(EvalValue::Integer(datetime::date_diff(interval, d1, d2)))
        }
        DateFromNum => per_value(req(a(0), p(0))?, |v| {
            let Some(ticks) = v.to_integer().map_err(|e| p(0).err(e))? else {
                return Ok(EvalValue::Null);
            };
            Ok(datetime::from_file_time(ticks)
                .map_err(|e| p(0).err(e))?
                .map_or(EvalValue::Null, EvalValue::DateTime))
        }),
        NumFromDate => per_value(req(a(0), p(0))?, |v| match v {
            EvalValue::Null => Ok(EvalValue::Null),
            other => {
                let d = datetime::value_to_datetime(other).map_err(|e| p(0).err(e))?;
                datetime::to_file_time(d)
                    .map(EvalValue::Integer)
                    .map_err(|e| p(0).err(e))
            }
        }),
        DefaultDomain => ctx.default_domain.map(EvalValue::from).ok_or_else(|| {
            EvalError::new(
                codes::NO_DEFAULT_DOMAIN,
                "DefaultDomain: no default verified domain is configured for the tenant",
            )
        }),
        FormatDateTime => format_date_time(args, pre),
        Guid => {
            let mut bytes = [0u8; 16];
            ctx.rng.fill_bytes(&mut bytes);
            let id = uuid::Builder::from_random_bytes(bytes).into_uuid();
            Ok(EvalValue::from(id.hyphenated().to_string()))
        }
        Now => Ok(EvalValue::DateTime(ctx.now)),
        InStr => in_str(args, pre),
        IsNull => Ok(EvalValue::Boolean(req(a(0), p(0))?.is_null())),
        IsNullOrEmpty => Ok(EvalValue::Boolean(is_null_or_empty(req(a(0), p(0))?))),
        IsPresent => Ok(EvalValue::Boolean(!is_null_or_empty(req(a(0), p(0))?))),
        IsString => Ok(EvalValue::Boolean(matches!(
            req(a(0), p(0))?,
            EvalValue::String(_)
                | EvalValue::Integer(_)
                | EvalValue::Decimal(_)
                | EvalValue::Boolean(_)
                | EvalValue::DateTime(_)
                | EvalValue::Reference(_)
        ))),
        Item => {
            let index = resolve_index(a(1), p(1))?;
            let list = req(a(0), p(0))?;
            let len = match list {
                EvalValue::Null => return Ok(EvalValue::Null),
                EvalValue::Structured(r) => r.len(),
                other => other.values().len(),
            };
            let i = usize::try_from(index - 1).unwrap_or(usize::MAX);
            if i >= len {
                return Err(p(1).err(EvalError::new(
                    codes::INDEX_OUT_OF_RANGE,
                    format!("{index} is beyond the last value (there are {len})"),
                )));
            }
            Ok(match list {
                EvalValue::Structured(r) => EvalValue::Structured(vec![r[i].clone()]),
                other => other.values()[i].clone(),
            })
        }
        Join => {
            let computed;
            let sep = match &pre.text {
                Some(t) => t.as_str(),
                None => {
                    computed = ctl_str(a(0), p(0))?;
                    computed.as_str()
                }
            };
            let mut parts: smallvec::SmallVec<[Cow<'_, str>; 4]> = smallvec::SmallVec::new();
            for (i, src) in args.iter().enumerate().skip(1) {
                let Some(src) = src else { continue };
                let ps = P {
                    f,
                    slot: i,
                    name: PName::Given("source"),
                };
                if let EvalValue::Structured(_) = src {
                    return Err(ps.err(EvalError::new(
                        codes::NOT_A_STRING,
                        format!("{} cannot be joined", describe(src)),
                    )));
                }
                for v in src.values() {
                    if let Some(t) = text_of(v, ps)? {
                        if !t.is_empty() {
                            parts.push(t);
                        }
                    }
                }
            }
            Ok(if parts.is_empty() {
                EvalValue::Null
            } else {
                EvalValue::String(join_smol(&parts, sep))
            })
        }
        Left => {
            let n = ctl_int(a(1), p(1))?;
            per_value(req(a(0), p(0))?, |v| {
                let s = text_of(v, p(0))?.unwrap_or_default();
                Ok(if n < 0 {
                    EvalValue::from(s)
                } else {
                    EvalValue::String(
                        s.chars()
                            .take(usize::try_from(n).unwrap_or(usize::MAX))
                            .collect(),
                    )
                })
            })
        }
        Len => per_value(req(a(0), p(0))?, |v| {
            let s = text_of(v, p(0))?.unwrap_or_default();
            Ok(EvalValue::Integer(s.chars().count() as i64))
        }),
        Mid => {
            let start = ctl_int(a(1), p(1))?;
            let length = ctl_int(a(2), p(2))?;
            per_value(req(a(0), p(0))?, |v| {
                let s = text_of(v, p(0))?.unwrap_or_default();
                Ok(EvalValue::from(mid(&s, start, length)))
            })
        }
        NormalizeDiacritics => per_value(req(a(0), p(0))?, |v| {
            Ok(text_of(v, p(0))?.map_or(EvalValue::Null, |s| {
                EvalValue::from(normalize_diacritics(&s))
            }))
        }),
        StripSpaces => per_value(req(a(0), p(0))?, |v| {
            Ok(text_of(v, p(0))?.map_or(EvalValue::Null, |s| EvalValue::from(s.replace(' ', ""))))
        }),
        PCase => {
            let seps = match &pre.pcase_separators {
                Some(s) => s.clone(),
                None => resolve_pcase_separators(a(1), p(1))?,
            };
            per_value(req(a(0), p(0))?, |v| {
                Ok(text_of(v, p(0))?.map_or(EvalValue::Null, |s| {
                    EvalValue::from(pcase(&s, seps.as_deref()))
                }))
            })
        }
        ToLower | ToUpper => {
            let rules = match pre.case_rules {
                Some(r) => r,
                None => resolve_culture(a(1), p(1))?,
            };
            per_value(req(a(0), p(0))?, |v| {
                // An ASCII string already in the wanted case is its own result: share it.
                if let EvalValue::String(s) = v {
                    let unchanged = if f == ToLower {
                        !s.bytes().any(|b| b.is_ascii_uppercase() || !b.is_ascii())
                    } else {
                        !s.bytes().any(|b| b.is_ascii_lowercase() || !b.is_ascii())
                    };
                    if unchanged {
                        return Ok(v.clone());
                    }
                }
                Ok(text_of(v, p(0))?.map_or(EvalValue::Null, |s| {
                    EvalValue::from(if f == ToLower {
                        to_lower(&s, rules)
                    } else {
                        to_upper(&s, rules)
                    })
                }))
            })
        }
        RandomString => random_string(args, pre, ctx),
        RemoveDuplicates => Ok(match req(a(0), p(0))? {
            EvalValue::Multi(vs) => {
                let mut out: Vec<EvalValue> = Vec::with_capacity(vs.len());
                for v in vs {
                    if !out.contains(v) {
                        out.push(v.clone());
                    }
                }
                EvalValue::multi(out)
            }
            EvalValue::Structured(rs) => {
                let mut out = Vec::with_capacity(rs.len());
                for r in rs {
                    if !out.contains(r) {
                        out.push(r.clone());
                    }
                }
                EvalValue::Structured(out)
            }
            other => other.clone(),
        }),
        Replace => replace(args, pre),
        Split => {
            let source = single_data(a(0), p(0))?;
            let computed;
            let delim = match &pre.text {
                Some(t) => t.as_str(),
                None => {
                    computed = resolve_delimiter(a(1), p(1))?;
                    computed.as_str()
                }
            };
            let Some(s) = text_of(source, p(0))? else {
                return Ok(EvalValue::Null);
            };
            let mut parts: Vec<EvalValue> = Vec::new();
            for_each_split_part(&s, delim, |x| {
                parts.push(EvalValue::from(x));
                true
            });
            Ok(match parts.len() {
                0 => EvalValue::Null,
                1 => parts.pop().unwrap_or(EvalValue::Null),
                _ => EvalValue::Multi(parts),
            })
        }
        Word => {
            let n = ctl_int(a(1), p(1))?;
            let delims: Vec<char> = match &pre.word_delimiters {
                Some(d) => d.clone(),
                None => ctl_str(a(2), p(2))?.chars().collect(),
            };
            per_value(req(a(0), p(0))?, |v| {
                let s = text_of(v, p(0))?.unwrap_or_default();
                let word = if n < 1 {
                    None
                } else {
                    s.split(|c: char| delims.contains(&c))
                        .filter(|w| !w.is_empty())
                        .nth(usize::try_from(n - 1).unwrap_or(usize::MAX))
                };
                Ok(EvalValue::from(word.unwrap_or("")))
            })
        }
        IIF => match iif_condition(req(a(0), p(0))?).map_err(|e| p(0).err(e))? {
            None => Ok(EvalValue::Null),
            Some(true) => Ok(a(1).cloned().unwrap_or(EvalValue::Null)),
            Some(false) => Ok(a(2).cloned().unwrap_or(EvalValue::Null)),
        },
        Switch => {
            let source = req(a(0), p(0))?;
            let mut i = 2;
            while i < args.len() {
                let key = a(i).unwrap_or(&EvalValue::Null);
                let hit = switch_key_matches(source, key).map_err(|e| EvalError {
                    arg: Some(if e.arg == Some(0) { 0 } else { i }),
                    ..e
                })?;
                if hit {
                    return Ok(a(i + 1).cloned().unwrap_or(EvalValue::Null));
                }
                i += 2;
            }
            Ok(a(1).cloned().unwrap_or(EvalValue::Null))
        }
        Coalesce => Ok(args
            .iter()
            .flatten()
            .find(|v| coalesce_is_value(v))
            .map_or(EvalValue::Null, |v| (*v).clone())),
        Redact => Ok(req(a(0), p(0))?.clone()),
        IgnoreFlowIfNullOrEmpty | SelectUniqueValue => Err(EvalError::new(
            codes::EVALUATOR_OWNED,
            format!(
                "{f}: produces an outcome rather than a value and is evaluated by the evaluator \
                 (use is_null_or_empty / select_unique_check)"
            ),
        )),
    }
}

/// Calls `f` on each part of `s` cut at `delim`, trimmed, empty parts skipped (`Split`, spec
/// §6), until `f` returns `false`.
fn for_each_split_part(s: &str, delim: &str, mut f: impl FnMut(&str) -> bool) {
    let mut visit = |x: &str| {
        let x = x.trim();
        x.is_empty() || f(x)
    };
    let mut chars = delim.chars();
    match (chars.next(), chars.next()) {
        // One character: the same cuts as the string pattern, found without a substring search.
        (Some(c), None) => {
            for x in s.split(c) {
                if !visit(x) {
                    return;
                }
            }
        }
        _ => {
            for x in s.split(delim) {
                if !visit(x) {
                    return;
                }
            }
        }
    }
}

/// Where [`split_item`] failed: in the `Split` call or in the `Item` call around it.
#[derive(Debug)]
pub(crate) enum SplitItemError {
    /// The `Split` call (its source).
    Split(EvalError),
    /// The `Item` call (its index).
    Item(EvalError),
}

/// `Item(Split(source, delim), index)` without building the list: the same value and the same
/// errors as the two calls (`delim` is the precompiled literal delimiter, `index` the literal
/// index, already checked to be at least 1).
pub(crate) fn split_item(
    source: &EvalValue,
    delim: &str,
    index: i64,
) -> Result<EvalValue, SplitItemError> {
    let ps = P {
        f: Function::Split,
        slot: 0,
        name: PName::Table(2),
    };
    let source = single_data(Some(source), ps).map_err(SplitItemError::Split)?;
    let Some(s) = text_of(source, ps).map_err(SplitItemError::Split)? else {
        return Ok(EvalValue::Null);
    };
    let want = usize::try_from(index - 1).unwrap_or(usize::MAX);
    let (mut seen, mut found) = (0usize, None);
    for_each_split_part(&s, delim, |x| {
        if seen == want {
            found = Some(EvalValue::from(x));
        }
        seen += 1;
        found.is_none()
    });
    if let Some(v) = found {
        return Ok(v);
    }
    if seen == 0 {
        // Split gave Null, and Item of Null is Null.
        return Ok(EvalValue::Null);
    }
    let pi = P {
        f: Function::Item,
        slot: 1,
        name: PName::Table(2),
    };
    Err(SplitItemError::Item(pi.err(EvalError::new(
        codes::INDEX_OUT_OF_RANGE,
        format!("{index} is beyond the last value (there are {seen})"),
    ))))
}

/// `parts` joined by `sep`; a short result is built inline, without a heap buffer.
fn join_smol(parts: &[Cow<'_, str>], sep: &str) -> smol_str::SmolStr {
    let mut out = smol_str::SmolStrBuilder::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push_str(sep);
        }
        out.push_str(part);
    }
    out.finish()
}

/// `Mid` with CS-FUNC's edge rules (spec §6).
fn mid(s: &str, start: i64, length: i64) -> String {
    let len = s.chars().count() as i64;
    if length == 0 {
        return String::new();
    }
    if length < 0 || start <= 0 || start > len {
        return s.to_string();
    }
    s.chars()
        .skip((start - 1) as usize)
        .take(usize::try_from(length).unwrap_or(usize::MAX))
        .collect()
}

/// Slot layout of `FormatDateTime` by slot count.
struct FdtSlots {
    styles: Option<usize>,
    input: Option<usize>,
    output: usize,
}

fn fdt_slots(n: usize) -> FdtSlots {
    match n {
        2 => FdtSlots {
            styles: None,
            input: None,
            output: 1,
        },
        3 => FdtSlots {
            styles: None,
            input: Some(1),
            output: 2,
        },
        _ => FdtSlots {
            styles: Some(1),
            input: Some(2),
            output: 3,
        },
    }
}

fn format_date_time(args: &[Option<&EvalValue>], pre: &Precompiled) -> EvalResult<EvalValue> {
    let f = Function::FormatDateTime;
    let a = |i: usize| args.get(i).copied().flatten();
    let s = fdt_slots(args.len());
    let p = |i: usize, name: &'static str| P {
        f,
        slot: i,
        name: PName::Given(name),
    };
    let styles = match (pre.styles, s.styles) {
        (Some(st), _) => st,
        (None, Some(i)) => resolve_styles(a(i), p(i, "dateTimeStyles"))?,
        (None, None) => DateTimeStyles::default(),
    };
    let compiled_in;
    let input: Option<&DotNetFormat> = match (&pre.input_format, s.input) {
        (Some(fm), _) => Some(fm),
        (None, Some(i)) => match a(i) {
            None => None,
            Some(v) => {
                compiled_in = resolve_format(v, p(i, "inputFormat"))?;
                Some(&compiled_in)
            }
        },
        (None, None) => None,
    };
    let compiled_out;
    let output: &DotNetFormat = match &pre.output_format {
        Some(fm) => fm,
        None => {
            let po = p(s.output, "outputFormat");
            compiled_out = resolve_format(req(a(s.output), po)?, po)?;
            &compiled_out
        }
    };
    let ps = p(0, "source");
    let shown = |d: DateTime<FixedOffset>| {
        let d = if styles.adjust_to_universal {
            d.with_timezone(&Utc).fixed_offset()
        } else {
            d
        };
        EvalValue::String(output.render_smol(d))
    };
    per_value(req(a(0), ps)?, |v| {
        let owned;
        let text: &str = match v {
            EvalValue::Null => return Ok(EvalValue::Null),
            EvalValue::DateTime(d) => return Ok(shown(d.fixed_offset())),
            // Text as is (what `text_of` gives for it, without a copy-on-write wrapper).
            EvalValue::String(s) | EvalValue::Reference(s) => s,
            other => {
                owned = text_of(other, ps)?.unwrap_or_default();
                &owned
            }
        };
        let parsed = match (input, styles.adjust_to_universal) {
            // The wall-clock time as read is what is shown: no chrono value needed.
            (Some(fm), false) => {
                return fm
                    .reformat(text, output)
                    .map(EvalValue::String)
                    .map_err(|e| ps.err(e))
            }
            (Some(fm), true) => fm.parse_input(text),
            (None, _) => datetime::parse_text(text),
        };
        parsed.map(shown).map_err(|e| ps.err(e))
    })
}

fn in_str(args: &[Option<&EvalValue>], pre: &Precompiled) -> EvalResult<EvalValue> {
    let f = Function::InStr;
    let a = |i: usize| args.get(i).copied().flatten();
    let p = |i: usize, name: &'static str| P {
        f,
        slot: i,
        name: PName::Given(name),
    };
    let start = resolve_start(a(2), p(2, "start"))?;
    let mode = match pre.compare {
        Some(c) => c,
        None => resolve_compare(a(3), p(3, "compareType"))?,
    };
    let needle = text_of(single_data(a(1), p(1, "value2"))?, p(1, "value2"))?;
    let pv = p(0, "value1");
    per_value(req(a(0), pv)?, |v| {
        let (Some(hay), Some(needle)) = (text_of(v, pv)?, needle.as_deref()) else {
            return Ok(EvalValue::Null);
        };
        let fold = |s: &str| -> Vec<char> {
            match mode {
                TextCompare::Binary => s.chars().collect(),
                TextCompare::Text => s.chars().map(simple_lower).collect(),
            }
        };
        let hay = fold(&hay);
        let needle = fold(needle);
        if hay.is_empty() {
            return Ok(EvalValue::Integer(0));
        }
        let start_idx = usize::try_from(start - 1).unwrap_or(usize::MAX);
        if start_idx >= hay.len() {
            return Ok(EvalValue::Integer(0));
        }
        if needle.is_empty() {
            return Ok(EvalValue::Integer(start));
        }
        let pos = hay[start_idx..]
            .windows(needle.len())
            .position(|w| w == needle.as_slice());
        Ok(EvalValue::Integer(
            pos.map_or(0, |i| (start_idx + i + 1) as i64),
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// RandomString
// ---------------------------------------------------------------------------------------------

const SPECIAL: &str = "~!@#$%^&*_-+=`|\\(){}[]:;\"'<>,.?/";

fn check_length(length: i64, p: P) -> EvalResult<()> {
    if !(1..=256).contains(&length) {
        return Err(p.err(EvalError::new(
            codes::INVALID_RANDOM_STRING,
            format!("{length} is outside 1 to 256"),
        )));
    }
    Ok(())
}

fn negative_minimum(v: i64, p: P) -> EvalError {
    p.err(EvalError::new(
        codes::INVALID_RANDOM_STRING,
        format!("{v} is negative"),
    ))
}

fn random_spec(length: i64, mins: [i64; 4], avoid: &str) -> EvalResult<RandomSpec> {
    let f = Function::RandomString;
    let slots = 6;
    let p = |i: usize| P {
        f,
        slot: i,
        name: PName::Table(slots),
    };
    check_length(length, p(0))?;
    let mut m = [0usize; 4];
    for (i, &v) in mins.iter().enumerate() {
        if v < 0 {
            return Err(negative_minimum(v, p(i + 1)));
        }
        m[i] = usize::try_from(v).unwrap_or(usize::MAX);
    }
    let total = m.iter().fold(0usize, |acc, &x| acc.saturating_add(x));
    let length = length as usize;
    if total > length {
        return Err(EvalError::new(
            codes::INVALID_RANDOM_STRING,
            format!(
                "RandomString: the minimums add up to {total}, more than Length {length} \
                 (all four minimums count, including MinimumLowerCase)"
            ),
        ));
    }
    let keep = |s: &str| -> Vec<char> { s.chars().filter(|c| !avoid.contains(*c)).collect() };
    let classes = [
        keep("0123456789"),
        keep(SPECIAL),
        keep("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
        keep("abcdefghijklmnopqrstuvwxyz"),
    ];
    for i in 0..4 {
        if m[i] > 0 && classes[i].is_empty() {
            return Err(p(5).err(EvalError::new(
                codes::INVALID_RANDOM_STRING,
                format!(
                    "removes every character of the class {} requires",
                    param_names(f, slots)(i + 1)
                ),
            )));
        }
    }
    let spec = RandomSpec {
        length,
        mins: m,
        classes,
    };
    if total < length && extra_pool(&spec).is_empty() {
        return Err(p(5).err(EvalError::new(
            codes::INVALID_RANDOM_STRING,
            "removes every character the remaining positions could be drawn from",
        )));
    }
    Ok(spec)
}

fn extra_pool(spec: &RandomSpec) -> Vec<char> {
    let all_zero = spec.mins.iter().all(|&x| x == 0);
    spec.classes
        .iter()
        .zip(spec.mins)
        .filter(|(_, m)| all_zero || *m > 0)
        .flat_map(|(c, _)| c.iter().copied())
        .collect()
}

fn random_string(
    args: &[Option<&EvalValue>],
    pre: &Precompiled,
    ctx: &mut EvalContext<'_>,
) -> EvalResult<EvalValue> {
    let computed;
    let spec = match &pre.random {
        Some(s) => s,
        None => {
            let f = Function::RandomString;
            let slots = 6;
            let p = |i: usize| P {
                f,
                slot: i,
                name: PName::Table(slots),
            };
            let a = |i: usize| args.get(i).copied().flatten();
            let mut counts = [0i64; 5];
            for (i, c) in counts.iter_mut().enumerate() {
                *c = ctl_int(a(i), p(i))?;
            }
            let avoid = match a(5) {
                None => String::new(),
                Some(v) => ctl_str(Some(v), p(5))?,
            };
            computed = random_spec(
                counts[0],
                [counts[1], counts[2], counts[3], counts[4]],
                &avoid,
            )?;
            &computed
        }
    };
    let mut out: Vec<char> = Vec::with_capacity(spec.length);
    for (class, &min) in spec.classes.iter().zip(&spec.mins) {
        for _ in 0..min {
            out.push(class[ctx.rng.below(class.len())]);
        }
    }
    let pool = extra_pool(spec);
    while out.len() < spec.length && !pool.is_empty() {
        out.push(pool[ctx.rng.below(pool.len())]);
    }
    for i in (1..out.len()).rev() {
        let j = ctx.rng.below(i + 1);
        out.swap(i, j);
    }
    Ok(EvalValue::from(out.into_iter().collect::<String>()))
}

// ---------------------------------------------------------------------------------------------
// Replace
// ---------------------------------------------------------------------------------------------

fn replace(args: &[Option<&EvalValue>], pre: &Precompiled) -> EvalResult<EvalValue> {
    let f = Function::Replace;
    let slots = 7;
    let p = |i: usize| P {
        f,
        slot: i,
        name: PName::Table(slots),
    };
    let a = |i: usize| args.get(i).copied().flatten();
    let mode = match pre.replace_mode {
        Some(m) => m,
        None => {
            let provided: Vec<bool> = args.iter().map(Option::is_some).collect();
            replace_mode(&provided)?
        }
    };
    // A provided text argument that evaluates to Null counts as "".
    let text_arg = |i: usize| -> EvalResult<Cow<'_, str>> {
        match a(i) {
            None => Ok(Cow::Borrowed("")),
            Some(v) => Ok(text_of(v.single().map_err(|e| p(i).err(e))?, p(i))?.unwrap_or_default()),
        }
    };
    let source = req(a(0), p(0))?;
    match mode {
        ReplaceMode::Plain => {
            let old = text_arg(1)?;
            let new = text_arg(4)?;
            per_value(source, |v| {
                Ok(match text_of(v, p(0))? {
                    None => EvalValue::Null,
                    Some(_) if old.is_empty() => v.clone(),
                    Some(s) => EvalValue::from(s.replace(&*old, &new)),
                })
            })
        }
        ReplaceMode::Template => {
            let old = text_arg(1)?;
            let template = text_arg(6)?;
            per_value(source, |v| {
                Ok(match text_of(v, p(0))? {
                    None => EvalValue::Null,
                    Some(_) if old.is_empty() => EvalValue::from(template.clone()),
                    Some(s) => EvalValue::from(template.replace(&*old, &s)),
                })
            })
        }
        ReplaceMode::Regex | ReplaceMode::Group | ReplaceMode::Fallback => {
            let compiled;
            let re = match &pre.regex {
                Some(r) => r,
                None => {
                    compiled = resolve_regex(a(2), p(2))?;
                    &compiled
                }
            };
            let group = if mode == ReplaceMode::Regex {
                0
            } else {
                match pre.group {
                    Some(g) => g,
                    None => resolve_group(re, a(3), p(3))?,
                }
            };
            if mode == ReplaceMode::Fallback {
                if !is_null_or_empty(source) {
                    return Ok(source.clone());
                }
                let attr = a(5)
                    .unwrap_or(&EvalValue::Null)
                    .single()
                    .map_err(|e| p(5).err(e))?;
                let Some(text) = text_of(attr, p(5))? else {
                    return Ok(EvalValue::Null);
                };
                return Ok(re
                    .captures_iter(&text)
                    .next()
                    .and_then(|c| c.get(group).map(|m| EvalValue::from(m.as_str())))
                    .unwrap_or(EvalValue::Null));
            }
            let replacement = text_arg(4)?;
            if !pre.replacement_checked {
                // Not checked at compile time: check the group references now.
                if let Some(v) = a(4) {
                    check_replacement(re, v, p(4))?;
                }
            }
            let read;
            let replacement = match &pre.replacement {
                Some(r) => r,
                None => {
                    read = re.replacement(&replacement);
                    &read
                }
            };
            per_value(source, |v| {
                Ok(match text_of(v, p(0))? {
                    None => EvalValue::Null,
                    Some(s) if mode == ReplaceMode::Regex => {
                        EvalValue::from(re.replace_all_with(&s, replacement))
                    }
                    Some(s) => EvalValue::from(re.replace_group_with(&s, group, replacement)),
                })
            })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
