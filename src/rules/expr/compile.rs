//! The checker: [`Expr`] → [`CompiledExpr`], the resolved tree the evaluator walks (spec §3.1).
//!
//! It resolves function names, checks slot counts, omitted required slots, position rules and the
//! function-specific rules, checks literal arguments it can judge on its own (DateAdd/DateDiff
//! intervals, cultures, RandomString counts, InStr compare types, DateTimeStyles names) and runs
//! any extra [`LiteralCheck`]s the caller supplies (regular expressions and date formats belong to
//! other modules). It does not evaluate anything.

use crate::rules::diagnostic::{Code, Diagnostic, Diagnostics, Severity, Span};
use crate::rules::expr::ast::{CompareMode, CompareOp, Decimal, Expr, ExprKind};
use crate::rules::expr::parser::MAX_DEPTH;
use crate::rules::function::Function;

/// A compiled expression: the checked tree with the outer flow wrappers peeled off.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledExpr {
    /// The tree to evaluate. Never an outermost `Redact`/`IgnoreFlowIfNullOrEmpty` (those became
    /// the two flags); `Redact` may still occur further in.
    pub root: Node,
    /// An outermost `Redact(…)` was present: the outcome is redacted.
    pub redact: bool,
    /// An outermost `IgnoreFlowIfNullOrEmpty(…)` was present: a Null, `""` or all-`""` value
    /// becomes the IgnoreFlow outcome.
    pub ignore_flow_if_null_or_empty: bool,
    /// Warnings found while checking.
    pub warnings: Vec<Diagnostic>,
    /// The text the spans refer to.
    pub source: String,
}

impl CompiledExpr {
    /// The top-level-only function at the root (`SelectUniqueValue`, `AppRoleAssignmentsComplex`,
    /// `AssertiveAppRoleAssignmentsComplex`), if the root is a call of one.
    pub fn top_level_function(&self) -> Option<Function> {
        match &self.root {
            Node::Call { func, .. } if func.is_top_level_only() => Some(*func),
            _ => None,
        }
    }

    /// Whether the flow replaces the target's app roles (`AssertiveAppRoleAssignmentsComplex`).
    pub fn replaces_app_roles(&self) -> bool {
        self.top_level_function() == Some(Function::AssertiveAppRoleAssignmentsComplex)
    }
}

/// A node of the compiled tree. Parentheses are gone; names are resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// A call of a known function. `args[i]` is `None` when slot `i` was left empty (an omitted
    /// optional parameter: use the default); see [`Function::slot`] for what each slot is.
    Call {
        /// The function.
        func: Function,
        /// The slots.
        args: Vec<Option<Node>>,
        /// The whole call.
        span: Span,
    },
    /// `[name]`.
    Attr {
        /// The attribute name as written (match case-insensitively).
        name: String,
        /// Where.
        span: Span,
    },
    /// A literal or constant.
    Literal {
        /// The value.
        value: Literal,
        /// Where.
        span: Span,
    },
    /// `lhs op rhs`.
    Compare {
        /// The operator.
        op: CompareOp,
        /// Left operand.
        lhs: Box<Node>,
        /// Right operand.
        rhs: Box<Node>,
        /// The whole comparison.
        span: Span,
    },
}

impl Node {
    /// The text the node was compiled from.
    pub fn span(&self) -> Span {
        match self {
            Node::Call { span, .. }
            | Node::Attr { span, .. }
            | Node::Literal { span, .. }
            | Node::Compare { span, .. } => *span,
        }
    }

    /// The literal, if the node is one.
    pub fn literal(&self) -> Option<&Literal> {
        match self {
            Node::Literal { value, .. } => Some(value),
            _ => None,
        }
    }
}

/// A literal value in the compiled tree.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// A string.
    String(String),
    /// An integer (decimal or `&H`).
    Integer(i64),
    /// An exact decimal fraction.
    Decimal(Decimal),
    /// `True` / `False`.
    Boolean(bool),
    /// `Null` / `Nothing`.
    Null,
    /// `vbBinaryCompare` / `vbTextCompare`.
    CompareMode(CompareMode),
}

impl Literal {
    /// The string form a literal has when a String parameter receives it (spec §4.3); `None` for
    /// Null. Compare modes give their names.
    pub fn as_text(&self) -> Option<String> {
        match self {
            Literal::String(s) => Some(s.clone()),
            Literal::Integer(i) => Some(i.to_string()),
            Literal::Decimal(d) => Some(d.to_string()),
            Literal::Boolean(true) => Some("True".into()),
            Literal::Boolean(false) => Some("False".into()),
            Literal::Null => None,
            Literal::CompareMode(m) => Some(m.name().into()),
        }
    }

    /// The integer a literal converts to (spec §4.4), if it does.
    pub fn as_integer(&self) -> Option<i64> {
        match self {
            Literal::Integer(i) => Some(*i),
            Literal::Decimal(d) if d.mantissa % 10i128.pow(d.scale.min(38)) == 0 => {
                i64::try_from(d.mantissa / 10i128.pow(d.scale.min(38))).ok()
            }
            Literal::String(s) => {
                let t = s.trim();
                let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
                if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                    t.strip_prefix('+').unwrap_or(t).parse().ok()
                } else {
                    None
                }
            }
            _ => None,
        }
    }
}

/// The five modes of `Replace` (spec §6), chosen by which slots are provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplaceMode {
    /// `oldValue` and `template`.
    Template,
    /// `regexPattern`, `regexGroupName` and `replacementAttributeName`.
    Fallback,
    /// `regexPattern`, `regexGroupName` and `replacementValue`.
    Group,
    /// `regexPattern` and `replacementValue`.
    Regex,
    /// `oldValue` and `replacementValue`.
    Plain,
}

impl ReplaceMode {
    /// The mode selected by the provided slots of a `Replace` call (`provided(i)` for slot `i`,
    /// 0 = source), by the precedence of spec §6; `None` for an invalid combination.
    pub fn select(provided: impl Fn(usize) -> bool) -> Option<ReplaceMode> {
        let (old, pattern, group, value, attr, template) = (
            provided(1),
            provided(2),
            provided(3),
            provided(4),
            provided(5),
            provided(6),
        );
        if old && template {
            Some(ReplaceMode::Template)
        } else if pattern && group && attr {
            Some(ReplaceMode::Fallback)
        } else if pattern && group && value {
            Some(ReplaceMode::Group)
        } else if pattern && value {
            Some(ReplaceMode::Regex)
        } else if old && value {
            Some(ReplaceMode::Plain)
        } else {
            None
        }
    }

    /// The mode of a compiled `Replace` call's slots.
    pub fn of_args<T>(args: &[Option<T>]) -> Option<ReplaceMode> {
        ReplaceMode::select(|i| args.get(i).is_some_and(Option::is_some))
    }
}

/// A compile-time check of literal arguments, run on every resolved call whose slot count is
/// valid. Implementations push a diagnostic (normally an `E02xx` error) for a literal argument that
/// would make evaluation fail for every object; non-literal arguments must be left alone.
///
/// The checks this module performs itself are [`StandardChecks`]; the regular-expression and
/// date-format modules add theirs through [`compile_with`] / [`check_with`].
pub trait LiteralCheck {
    /// Checks one call. `args` are the resolved slots; `span` is the whole call.
    fn check_call(
        &self,
        func: Function,
        args: &[Option<Node>],
        span: Span,
        out: &mut Vec<Diagnostic>,
    );
}

/// The literal checks that need no other module: DateAdd/DateDiff intervals (`E0201`),
/// ToLower/ToUpper cultures (`E0202`), RandomString counts (`E0203`), InStr compare types
/// (`E0204`) and FormatDateTime `dateTimeStyles` names (`E0205`).
#[derive(Debug, Clone, Copy, Default)]
pub struct StandardChecks;

/// The seven DateAdd/DateDiff intervals (spec §6), case-sensitive.
pub const INTERVALS: [&str; 7] = ["yyyy", "m", "d", "ww", "h", "n", "s"];

/// The .NET `DateTimeStyles` names FormatDateTime accepts (spec §6).
pub const DATE_TIME_STYLES: [&str; 10] = [
    "None",
    "AllowLeadingWhite",
    "AllowTrailingWhite",
    "AllowInnerWhite",
    "AllowWhiteSpaces",
    "NoCurrentDateDefault",
    "AdjustToUniversal",
    "AssumeLocal",
    "AssumeUniversal",
    "RoundtripKind",
];

/// Whether `tag` is a well-formed culture name (spec §6 ToLower): hyphen-separated parts of ASCII
/// letters and digits, the first of 2–3 letters.
pub fn is_well_formed_culture(tag: &str) -> bool {
    let mut parts = tag.split('-');
    let first = parts.next().unwrap_or_default();
    (2..=3).contains(&first.len())
        && first.bytes().all(|b| b.is_ascii_alphabetic())
        && parts.all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Whether `styles` is a valid `dateTimeStyles` argument: empty, or names separated by `,` or `|`,
/// each optionally prefixed `DateTimeStyles.`, case-insensitive. Returns the first bad name.
pub fn first_bad_date_time_style(styles: &str) -> Option<&str> {
    if styles.trim().is_empty() {
        return None;
    }
    styles.split([',', '|']).map(str::trim).find(|name| {
        let bare = match name.get(..15) {
            Some(prefix) if prefix.eq_ignore_ascii_case("DateTimeStyles.") => &name[15..],
            _ => name,
        };
        !DATE_TIME_STYLES
            .iter()
            .any(|s| s.eq_ignore_ascii_case(bare))
    })
}

fn literal_at(args: &[Option<Node>], i: usize) -> Option<(&Literal, Span)> {
    match args.get(i) {
        Some(Some(Node::Literal { value, span })) => Some((value, *span)),
        _ => None,
    }
}

impl LiteralCheck for StandardChecks {
    fn check_call(
        &self,
        func: Function,
        args: &[Option<Node>],
        span: Span,
        out: &mut Vec<Diagnostic>,
    ) {
        match func {
            Function::DateAdd | Function::DateDiff => {
                if let Some((lit, at)) = literal_at(args, 0) {
                    let text = lit.as_text();
                    if !text.as_deref().is_some_and(|t| INTERVALS.contains(&t)) {
                        let shown = text.map_or("Null".to_string(), |t| format!("\"{t}\""));
                        let mut d = Diagnostic::new(
                            Code::InvalidInterval,
                            at,
                            format!("{shown} is not a {func} interval"),
                        )
                        .with_hint("the intervals are \"yyyy\", \"m\", \"d\", \"ww\", \"h\", \"n\", \"s\" (case-sensitive)");
                        if let Some(t) = lit.as_text() {
                            if let Some(i) = INTERVALS.iter().find(|i| i.eq_ignore_ascii_case(&t)) {
                                d = d.with_hint(format!(
                                    "intervals are case-sensitive: did you mean \"{i}\"?"
                                ));
                            } else if matches!(t.as_str(), "q" | "y" | "w") {
                                d = d.with_hint("the Connect Sync intervals \"q\", \"y\" and \"w\" are not supported; use \"yyyy\", \"m\", \"d\", \"ww\", \"h\", \"n\" or \"s\"");
                            }
                        }
                        out.push(d);
                    }
                }
            }
            Function::ToLower | Function::ToUpper => {
                if let Some((Literal::String(tag), at)) = literal_at(args, 1) {
                    if !tag.is_empty() && !is_well_formed_culture(tag) {
                        out.push(
                            Diagnostic::new(
                                Code::InvalidCulture,
                                at,
                                format!("\"{tag}\" is not a well-formed culture name"),
                            )
                            .with_hint("a culture is a language tag such as \"en-US\" or \"tr\""),
                        );
                    }
                }
            }
            Function::RandomString => check_random_string(args, span, out),
            Function::InStr => {
                if let Some((lit, at)) = literal_at(args, 3) {
                    let ok = match lit {
                        Literal::CompareMode(_) => true,
                        Literal::Integer(i) => *i == 0 || *i == 1,
                        Literal::String(s) => {
                            let t = s.trim();
                            t == "0"
                                || t == "1"
                                || t.eq_ignore_ascii_case("vbBinaryCompare")
                                || t.eq_ignore_ascii_case("vbTextCompare")
                        }
                        _ => false,
                    };
                    if !ok {
                        out.push(
                            Diagnostic::new(Code::InvalidCompareType, at, "invalid InStr compare type")
                                .with_hint("use vbBinaryCompare (or 0) for exact, vbTextCompare (or 1) for case-insensitive comparison"),
                        );
                    }
                }
            }
            Function::FormatDateTime if args.len() == 4 => {
                if let Some((Literal::String(styles), at)) = literal_at(args, 1) {
                    if let Some(bad) = first_bad_date_time_style(styles) {
                        out.push(
                            Diagnostic::new(
                                Code::InvalidDateTimeStyles,
                                at,
                                format!("unknown DateTimeStyles name `{bad}`"),
                            )
                            .with_hint(format!("the names are {}", DATE_TIME_STYLES.join(", "))),
                        );
                    }
                }
            }
            _ => {}
        }
    }
}

fn check_random_string(args: &[Option<Node>], span: Span, out: &mut Vec<Diagnostic>) {
    let counts: Vec<Option<(i64, Span)>> = (0..5)
        .map(|i| literal_at(args, i).and_then(|(l, s)| l.as_integer().map(|v| (v, s))))
        .collect();
    let bad = |at: Span, msg: String| Diagnostic::new(Code::InvalidRandomStringCounts, at, msg);
    if let Some(Some((len, at))) = counts.first() {
        if !(1..=256).contains(len) {
            out.push(bad(
                *at,
                format!("RandomString length {len} is outside 1..=256"),
            ));
        }
    }
    for (i, c) in counts.iter().enumerate().skip(1) {
        if let Some((v, at)) = c {
            if *v < 0 {
                let name = Function::RandomString
                    .slot(i, args.len())
                    .map_or("minimum", |s| s.name);
                out.push(bad(*at, format!("RandomString {name} is negative ({v})")));
            }
        }
    }
    if counts.iter().all(Option::is_some) {
        let values: Vec<i64> = counts.iter().flatten().map(|(v, _)| *v).collect();
        let sum: i128 = values[1..].iter().map(|v| i128::from(*v)).sum();
        if values[1..].iter().all(|v| *v >= 0)
            && sum > i128::from(values[0])
            && (1..=256).contains(&values[0])
        {
            out.push(
                bad(span, format!("RandomString minimums add up to {sum}, more than the length {}", values[0]))
                    .with_hint("the four minimums (numbers, special, capital, lower case) must fit in the length"),
            );
        }
    }
}

/// Where a node sits, for the position rules of spec §3.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// The whole expression, possibly inside flow wrappers.
    Outer,
    /// Anywhere else.
    Nested,
}

struct Checker<'a> {
    diagnostics: Vec<Diagnostic>,
    extra: &'a [&'a dyn LiteralCheck],
}

/// Connect-Sync-only functions (spec §11) and, where one exists, the dirsync function to use.
const CONNECT_SYNC_FUNCTIONS: &[(&str, Option<&str>)] = &[
    ("BitOr", None),
    ("CGuid", None),
    ("CNum", None),
    ("CRef", None),
    ("IsCert", None),
    ("Contains", Some("InStr")),
    ("ConvertFromBase64", None),
    ("ConvertFromUTF8Hex", None),
    ("DNComponent", None),
    ("DNComponentRev", None),
    ("EscapeDNComponent", None),
    ("Error", None),
    ("InStrRev", None),
    ("IsBitSet", Some("BitAnd")),
    ("IsDate", None),
    ("IsEmpty", Some("IsNullOrEmpty")),
    ("IsGuid", None),
    ("IsNumeric", None),
    ("ItemOrNull", Some("Item")),
    ("LCase", Some("ToLower")),
    ("UCase", Some("ToUpper")),
    ("LTrim", None),
    ("RTrim", None),
    ("Trim", None),
    ("PadLeft", None),
    ("PadRight", None),
    ("RandomNum", None),
    ("ReplaceChars", Some("Replace")),
    ("Right", None),
    ("StringFromGuid", None),
    ("StringFromSid", None),
    ("Where", None),
    ("Select", None),
    ("With", None),
    ("ImportedValue", None),
];

fn unknown_function(name: &str, span: Span) -> Diagnostic {
    let foreign = CONNECT_SYNC_FUNCTIONS
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .copied()
        .or_else(|| {
            // The `Cert*` family.
            (name.len() > 4 && name[..4].eq_ignore_ascii_case("cert")).then_some(("Cert*", None))
        });
    if let Some((_, instead)) = foreign {
        let d = Diagnostic::new(
            Code::UnknownFunction,
            span,
            format!("`{name}` is a Connect Sync function, not part of the Entra provisioning expression language"),
        );
        return match instead {
            Some(f) => d.with_hint(format!("see `{f}` for the provisioning equivalent")),
            None => d.with_hint("it has no equivalent here; see the function list (spec §6)"),
        };
    }
    let d = Diagnostic::new(
        Code::UnknownFunction,
        span,
        format!("unknown function `{name}`"),
    );
    match super::closest(name, Function::ALL.iter().map(|f| f.name())) {
        Some(c) => d.with_hint(format!("did you mean `{c}`?")),
        None => d,
    }
}

impl Checker<'_> {
    fn error(&mut self, d: Diagnostic) {
        self.diagnostics.push(d);
    }

    fn node(&mut self, expr: &Expr, pos: Position, depth: usize) -> Option<Node> {
        if depth > MAX_DEPTH {
            self.error(
                Diagnostic::new(
                    Code::NestingTooDeep,
                    expr.span,
                    format!("calls and parentheses are nested more than {MAX_DEPTH} levels deep"),
                )
                .with_hint("simplify the expression"),
            );
            return None;
        }
        let span = expr.span;
        let literal = |value| Some(Node::Literal { value, span });
        match &expr.kind {
            ExprKind::Attribute(name) => Some(Node::Attr {
                name: name.clone(),
                span,
            }),
            ExprKind::String(s) => literal(Literal::String(s.clone())),
            ExprKind::Integer(i) => literal(Literal::Integer(*i)),
            ExprKind::Decimal(d) => literal(Literal::Decimal(*d)),
            ExprKind::Boolean(b) => literal(Literal::Boolean(*b)),
            ExprKind::Null => literal(Literal::Null),
            ExprKind::CompareMode(m) => literal(Literal::CompareMode(*m)),
            ExprKind::Group(inner) => self.node(inner, pos, depth + 1),
            ExprKind::Compare { op, lhs, rhs } => {
                // Like the parser, count only calls and parentheses as nesting (a comparison
                // operand that is itself a comparison only occurs in hand-built trees).
                let level = |e: &Expr| match e.kind {
                    ExprKind::Compare { .. } => depth + 1,
                    _ => depth,
                };
                let l = self.node(lhs, Position::Nested, level(lhs));
                let r = self.node(rhs, Position::Nested, level(rhs));
                Some(Node::Compare {
                    op: *op,
                    lhs: Box::new(l?),
                    rhs: Box::new(r?),
                    span,
                })
            }
            ExprKind::Call {
                func_name,
                func_span,
                args,
            } => self.call(func_name, *func_span, args, span, pos, depth),
        }
    }

    fn call(
        &mut self,
        name: &str,
        name_span: Span,
        args: &[Option<Expr>],
        span: Span,
        pos: Position,
        depth: usize,
    ) -> Option<Node> {
        let func = Function::from_name(name);
        let ok_before = self.error_count();
        match func {
            None => self.error(unknown_function(name, name_span)),
            Some(f) => self.check_call_shape(f, name, name_span, args, span, pos),
        }
        let shape_ok = self.error_count() == ok_before;
        // Argument positions: a flow wrapper passes `Outer` on; everything else is `Nested`.
        let inner_pos = match func {
            Some(f) if f.is_flow_wrapper() && pos == Position::Outer => Position::Outer,
            _ => Position::Nested,
        };
        let mut nodes = Vec::with_capacity(args.len());
        let mut args_ok = true;
        for arg in args {
            match arg {
                None => nodes.push(None),
                Some(e) => match self.node(e, inner_pos, depth + 1) {
                    Some(n) => nodes.push(Some(n)),
                    None => args_ok = false,
                },
            }
        }
        let func = func?;
        if !(shape_ok && args_ok) {
            return None;
        }
        let before = self.diagnostics.len();
        let mut found = Vec::new();
        StandardChecks.check_call(func, &nodes, span, &mut found);
        for check in self.extra {
            check.check_call(func, &nodes, span, &mut found);
        }
        self.diagnostics.extend(found);
        if self.diagnostics[before..].iter().any(Diagnostic::is_error) {
            return None;
        }
        Some(Node::Call {
            func,
            args: nodes,
            span,
        })
    }

    fn error_count(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }

    fn check_call_shape(
        &mut self,
        f: Function,
        name: &str,
        name_span: Span,
        args: &[Option<Expr>],
        span: Span,
        pos: Position,
    ) {
        if name != f.name() {
            self.error(
                Diagnostic::new(
                    Code::NonCanonicalFunctionName,
                    name_span,
                    format!("function `{name}` is spelled `{}`", f.name()),
                )
                .with_hint(format!(
                    "write `{}`; Entra documents function names as case-sensitive",
                    f.name()
                )),
            );
        }
        let slots = args.len();
        let arity = f.arity();
        if f == Function::SelectUniqueValue && slots < 2 {
            self.error(
                Diagnostic::new(
                    Code::SelectUniqueValueTooFewRules,
                    span,
                    format!("SelectUniqueValue needs at least two rules, found {slots}"),
                )
                .with_hint("give two or more candidate expressions, tried in order"),
            );
        } else if !arity.accepts(slots) {
            let expected = match arity.max {
                Some(max) if max == arity.min => format!("{max}"),
                Some(max) => format!("{} to {max}", arity.min),
                None => format!("at least {}", arity.min),
            };
            let mut d = Diagnostic::new(
                Code::WrongArity,
                span,
                format!(
                    "`{}` takes {expected} argument{}, found {slots}",
                    f.name(),
                    if expected == "1" { "" } else { "s" }
                ),
            );
            let names: Vec<&str> = (0..arity.max.unwrap_or(arity.min).max(arity.min))
                .filter_map(|i| f.slot(i, arity.max.unwrap_or(arity.min)).map(|s| s.name))
                .collect();
            if !names.is_empty() {
                d = d.with_hint(format!(
                    "{}({}{})",
                    f.name(),
                    names.join(", "),
                    if arity.max.is_none() { ", …" } else { "" }
                ));
            }
            if let Some(max) = arity.max {
                if let Some(Some(first_extra)) = args.get(max) {
                    d = d.with_label(first_extra.span, "first extra argument");
                }
            }
            self.error(d);
        } else {
            if f == Function::Switch && slots % 2 == 1 {
                self.error(
                    Diagnostic::new(
                        Code::SwitchOddSlots,
                        span,
                        format!("Switch needs an even number of arguments (source, default, then key/value pairs), found {slots}"),
                    )
                    .with_hint("every key needs a value; leave the default empty (`Switch([x], , \"k\", \"v\")`) for Null"),
                );
            }
            for (i, arg) in args.iter().enumerate() {
                if arg.is_none() {
                    if let Some(slot) = f.slot(i, slots).filter(|s| !s.optional) {
                        self.error(
                            Diagnostic::new(
                                Code::RequiredArgumentOmitted,
                                empty_slot_span(args, i, span),
                                format!(
                                    "required argument `{}` of `{}` is omitted",
                                    slot.name,
                                    f.name()
                                ),
                            )
                            .with_label(name_span, "in this call"),
                        );
                    }
                }
            }
            if f == Function::Replace
                && args.first().is_some_and(Option::is_some)
                && ReplaceMode::of_args(args).is_none()
            {
                self.error(
                    Diagnostic::new(
                        Code::InvalidReplaceCombination,
                        span,
                        "this combination of Replace arguments selects no replacement mode",
                    )
                    .with_hint("provide oldValue+replacementValue (plain), regexPattern+replacementValue (regex), regexPattern+regexGroupName+replacementValue (group), regexPattern+regexGroupName+replacementAttributeName (fallback) or oldValue+template (template)"),
                );
            }
            if f.takes_app_role_assignments() {
                let ok = matches!(
                    args.first(),
                    Some(Some(Expr { kind: ExprKind::Attribute(a), .. })) if a.eq_ignore_ascii_case("appRoleAssignments")
                );
                if !ok {
                    let at = args
                        .first()
                        .and_then(|a| a.as_ref())
                        .map_or(span, |e| e.span);
                    self.error(
                        Diagnostic::new(
                            Code::AppRoleArgument,
                            at,
                            format!(
                                "the argument of `{}` must be `[appRoleAssignments]`",
                                f.name()
                            ),
                        )
                        .with_hint(format!("write `{}([appRoleAssignments])`", f.name())),
                    );
                }
            }
        }
        if f == Function::IgnoreFlowIfNullOrEmpty && pos != Position::Outer {
            self.error(
                Diagnostic::new(
                    Code::MisplacedFlowWrapper,
                    name_span,
                    "`IgnoreFlowIfNullOrEmpty` must be the outermost call (optionally inside `Redact`)",
                )
                .with_hint("move it around the whole expression; inside IIF return \"\" and wrap the IIF instead"),
            );
        }
        if f.is_top_level_only() && pos != Position::Outer {
            self.error(
                Diagnostic::new(
                    Code::MisplacedTopLevelFunction,
                    name_span,
                    format!("`{}` must be the outermost call (optionally inside `Redact`/`IgnoreFlowIfNullOrEmpty`)", f.name()),
                )
                .with_hint("it decides the whole flow and cannot feed another function"),
            );
        }
        if f == Function::IIF && slots == 3 {
            if let Some(Some(cond)) = args.first() {
                if let Some(what) = unportable_condition(cond) {
                    self.error(
                        Diagnostic::new(
                            Code::UnportableIifCondition,
                            cond.span,
                            format!("Entra does not support {what} as an IIF condition; dirsync evaluates it as written"),
                        )
                        .with_hint("for portability write `Switch([x], [x], \"\", default)`"),
                    );
                }
            }
        }
    }
}

/// REF lists `IIF([x]="",…)`, `IIF(IsNullOrEmpty([x]),…)` and `IIF(IsPresent([x]),…)` as
/// unsupported in Entra (spec §6 IIF).
fn unportable_condition(cond: &Expr) -> Option<&'static str> {
    match &cond.kind {
        ExprKind::Group(inner) => unportable_condition(inner),
        ExprKind::Call { func_name, .. } => match Function::from_name(func_name) {
            Some(Function::IsNullOrEmpty) => Some("`IsNullOrEmpty`"),
            Some(Function::IsPresent) => Some("`IsPresent`"),
            _ => None,
        },
        ExprKind::Compare { lhs, rhs, .. } => {
            let empty = |e: &Expr| matches!(&e.kind, ExprKind::String(s) if s.is_empty());
            (empty(lhs) || empty(rhs)).then_some("a comparison with \"\"")
        }
        _ => None,
    }
}

/// The span of an empty slot: between the separators around it.
fn empty_slot_span(args: &[Option<Expr>], i: usize, call: Span) -> Span {
    let before = args[..i].iter().rev().flatten().next().map(|e| e.span.end);
    let after = args[i + 1..].iter().flatten().next().map(|e| e.span.start);
    match (before, after) {
        (Some(b), Some(a)) => Span::new(b, a),
        (Some(b), None) => Span::new(b, call.end),
        (None, Some(a)) => Span::new(call.start, a),
        (None, None) => call,
    }
}

/// Checks a parsed expression with the [`StandardChecks`]. The compiled form, if there are no
/// errors, and every diagnostic (warnings included). `source` of the result is the canonical
/// printing of `expr`; use [`check_with`] to keep the original text.
pub fn check(expr: &Expr) -> (Option<CompiledExpr>, Vec<Diagnostic>) {
    check_with(expr, &expr.to_string(), &[])
}

/// [`check`] with the original `source` text and extra literal checks.
pub fn check_with(
    expr: &Expr,
    source: &str,
    extra: &[&dyn LiteralCheck],
) -> (Option<CompiledExpr>, Vec<Diagnostic>) {
    let mut checker = Checker {
        diagnostics: Vec::new(),
        extra,
    };
    let root = checker.node(expr, Position::Outer, 0);
    let mut diagnostics = checker.diagnostics;
    diagnostics.sort_by_key(|d| (d.span.start, d.span.end));
    let has_errors = diagnostics.iter().any(Diagnostic::is_error);
    let compiled = match root {
        Some(root) if !has_errors => {
            let (root, redact, ignore) = peel(root);
            Some(CompiledExpr {
                root,
                redact,
                ignore_flow_if_null_or_empty: ignore,
                warnings: diagnostics
                    .iter()
                    .filter(|d| d.severity == Severity::Warning)
                    .cloned()
                    .collect(),
                source: source.to_string(),
            })
        }
        _ => None,
    };
    (compiled, diagnostics)
}

/// Removes the outer chain of flow wrappers, returning the flags they set.
fn peel(mut root: Node) -> (Node, bool, bool) {
    let (mut redact, mut ignore) = (false, false);
    loop {
        let inner = match &mut root {
            Node::Call { func, args, .. } if func.is_flow_wrapper() && args.len() == 1 => {
                let func = *func;
                args[0].take().map(|n| (func, n))
            }
            _ => None,
        };
        match inner {
            Some((Function::Redact, n)) => {
                redact = true;
                root = n;
            }
            Some((_, n)) => {
                ignore = true;
                root = n;
            }
            None => return (root, redact, ignore),
        }
    }
}

/// Parses and checks `text` with the [`StandardChecks`]. On success the compiled expression
/// carries any warnings; on failure every diagnostic found is returned.
pub fn compile(text: &str) -> Result<CompiledExpr, Diagnostics> {
    compile_with(text, &[])
}

/// [`compile`] with extra literal checks (regular expressions, date formats, …).
pub fn compile_with(text: &str, extra: &[&dyn LiteralCheck]) -> Result<CompiledExpr, Diagnostics> {
    let expr = super::parse(text)?;
    match check_with(&expr, text, extra) {
        (Some(compiled), _) => Ok(compiled),
        (None, diagnostics) => Err(Diagnostics(diagnostics)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> CompiledExpr {
        match compile(text) {
            Ok(c) => c,
            Err(d) => panic!("{text}: {d}"),
        }
    }

    fn errs(text: &str) -> Vec<(Code, (usize, usize))> {
        match compile(text) {
            Ok(c) => panic!("{text} compiled: {c:?}"),
            Err(d) => d
                .iter()
                .filter(|d| d.is_error())
                .map(|d| (d.code, d.span.line_col(text)))
                .collect(),
        }
    }

    fn err1(text: &str) -> Diagnostic {
        match compile(text) {
            Ok(c) => panic!("{text} compiled: {c:?}"),
            Err(d) => {
                d.0.into_iter()
                    .find(Diagnostic::is_error)
                    .unwrap_or_else(|| panic!("no error"))
            }
        }
    }

    #[test]
    fn resolved_tree() {
        let c = ok("IIF(([a] = \"x\"), Left([b], 2), vbTextCompare)");
        assert!(!c.redact && !c.ignore_flow_if_null_or_empty);
        assert!(c.warnings.is_empty());
        match &c.root {
            Node::Call { func, args, span } => {
                assert_eq!(*func, Function::IIF);
                assert_eq!(span.start, 0);
                // The group is gone.
                assert!(
                    matches!(&args[0], Some(Node::Compare { op: CompareOp::Eq, lhs, .. })
                    if matches!(&**lhs, Node::Attr { name, .. } if name == "a"))
                );
                assert!(matches!(
                    &args[1],
                    Some(Node::Call {
                        func: Function::Left,
                        ..
                    })
                ));
                assert!(matches!(
                    &args[2],
                    Some(Node::Literal {
                        value: Literal::CompareMode(CompareMode::Text),
                        ..
                    })
                ));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.source, "IIF(([a] = \"x\"), Left([b], 2), vbTextCompare)");
    }

    #[test]
    fn flow_wrappers_are_peeled() {
        let c = ok("Redact(IgnoreFlowIfNullOrEmpty(IIF([a]=\"1\", [b], \"\")))");
        assert!(c.redact && c.ignore_flow_if_null_or_empty);
        assert!(matches!(
            c.root,
            Node::Call {
                func: Function::IIF,
                ..
            }
        ));
        let c = ok("IgnoreFlowIfNullOrEmpty((Redact([a])))");
        assert!(c.redact && c.ignore_flow_if_null_or_empty);
        assert!(matches!(c.root, Node::Attr { .. }));
        // A nested Redact stays in the tree.
        let c = ok("Join(\",\", Redact([a]), [b])");
        assert!(!c.redact);
        match &c.root {
            Node::Call { args, .. } => {
                assert!(matches!(
                    &args[1],
                    Some(Node::Call {
                        func: Function::Redact,
                        ..
                    })
                ))
            }
            other => panic!("{other:?}"),
        }
        let c = ok("Redact(SelectUniqueValue([a], [b]))");
        assert_eq!(c.top_level_function(), Some(Function::SelectUniqueValue));
        let c = ok("AssertiveAppRoleAssignmentsComplex([appRoleAssignments])");
        assert!(c.replaces_app_roles());
        assert!(!ok("AppRoleAssignmentsComplex([AppRoleAssignments])").replaces_app_roles());
    }

    #[test]
    fn unknown_functions() {
        let d = err1("Coalese([givenName], \"x\")");
        assert_eq!((d.code, d.span), (Code::UnknownFunction, Span::new(0, 7)));
        assert_eq!(d.hint.as_deref(), Some("did you mean `Coalesce`?"));
        let d = err1("Trim([a])");
        assert!(d.message.contains("Connect Sync function"), "{}", d.message);
        let d = err1("LCase([a])");
        assert_eq!(
            d.hint.as_deref(),
            Some("see `ToLower` for the provisioning equivalent")
        );
        let d = err1("CertThumbprint([a])");
        assert!(d.message.contains("Connect Sync function"));
        assert!(err1("Frobnicate([a])").hint.is_none());
        // Errors inside the arguments of an unknown function are reported too.
        assert_eq!(
            errs("Coalese(Left([a]))"),
            vec![(Code::UnknownFunction, (1, 1)), (Code::WrongArity, (1, 9))]
        );
    }

    #[test]
    fn arity_and_omitted_slots() {
        assert_eq!(errs("Left([a])"), vec![(Code::WrongArity, (1, 1))]);
        let d = err1("Left([a], 1, 2)");
        assert_eq!(d.message, "`Left` takes 2 arguments, found 3");
        assert_eq!(d.hint.as_deref(), Some("Left(string, numChars)"));
        assert_eq!(d.labels.len(), 1);
        assert_eq!(err1("Now(1)").message, "`Now` takes 0 arguments, found 1");
        assert_eq!(
            err1("Join(\",\")").message,
            "`Join` takes at least 2 arguments, found 1"
        );
        ok("Now( )");
        assert_eq!(
            errs("Left([a], )"),
            vec![(Code::RequiredArgumentOmitted, (1, 9))]
        );
        assert_eq!(
            err1("Mid([a], , 2)").message,
            "required argument `start` of `Mid` is omitted"
        );
        // Optional slots may be empty.
        ok("InStr([a], \"b\", , vbTextCompare)");
        ok("InStr([a], \"b\", )");
        ok("FormatDateTime([d], , \"yyyyMMdd\", \"yyyy-MM-dd\")");
        ok("FormatDateTime([d], \"yyyyMMdd\", \"yyyy-MM-dd\")");
        ok("FormatDateTime(Now(), \"yyyy-MM-dd\")");
        assert_eq!(
            errs("FormatDateTime([d], , \"yyyy-MM-dd\")"),
            vec![(Code::RequiredArgumentOmitted, (1, 19))]
        );
        ok("PCase([a], )");
        ok("ToUpper([a], )");
        ok("RandomString(8, 1, 1, 1, 1, )");
        assert_eq!(
            errs("RandomString(8, , 1, 1, 1)"),
            vec![(Code::RequiredArgumentOmitted, (1, 15))]
        );
        ok("Switch([x], , \"1\", \"a\")");
        assert_eq!(
            errs("Switch([x], \"d\", , \"a\")"),
            vec![(Code::RequiredArgumentOmitted, (1, 16))]
        );
        assert_eq!(
            errs("Coalesce(, \"x\")"),
            vec![(Code::RequiredArgumentOmitted, (1, 1))]
        );
    }

    #[test]
    fn position_rules() {
        assert_eq!(
            errs("IIF(IgnoreFlowIfNullOrEmpty([a]), 1, 2)"),
            vec![(Code::MisplacedFlowWrapper, (1, 5))]
        );
        assert_eq!(
            errs("Redact(Join(\",\", IgnoreFlowIfNullOrEmpty([a]), [b]))"),
            vec![(Code::MisplacedFlowWrapper, (1, 18))]
        );
        assert_eq!(
            errs("ToLower(SelectUniqueValue([a], [b]))"),
            vec![(Code::MisplacedTopLevelFunction, (1, 9))]
        );
        assert_eq!(
            errs("Count(AppRoleAssignmentsComplex([appRoleAssignments]))"),
            vec![(Code::MisplacedTopLevelFunction, (1, 7))]
        );
        assert_eq!(
            errs("[a] = SelectUniqueValue([a], [b])"),
            vec![(Code::MisplacedTopLevelFunction, (1, 7))]
        );
        ok("IgnoreFlowIfNullOrEmpty(SelectUniqueValue([a], [b]))");
        ok("Join(\",\", SingleAppRoleAssignment([appRoleAssignments]), \"x\")");
        ok("IIF(IsPresent(Redact([a])), Redact([b]), \"\")");
    }

    #[test]
    fn function_specific_rules() {
        assert_eq!(
            errs("Switch([x], , \"1\", \"a\", \"2\")"),
            vec![(Code::SwitchOddSlots, (1, 1))]
        );
        assert_eq!(
            errs("Switch([x], , \"1\")"),
            vec![(Code::WrongArity, (1, 1))]
        );
        for good in [
            "Replace([x], \"a\", , , \"b\", , )",
            "Replace([x], , \"[0-9]\", , \"\", , )",
            "Replace([x], , \"(?<n>\\d+)\", \"n\", \"#\", , )",
            "Replace([x], , \"(?<n>\\d+)\", \"n\", , [mobile], )",
            "Replace([x], \"{x}\", , , , , \"id-{x}\")",
        ] {
            ok(good);
        }
        assert_eq!(
            ReplaceMode::of_args(&[Some(1), Some(2), None, None, None, None, Some(3)]),
            Some(ReplaceMode::Template)
        );
        assert_eq!(
            ReplaceMode::of_args(&[Some(1), None, Some(2), Some(3), Some(4), Some(5)]),
            Some(ReplaceMode::Fallback)
        );
        assert_eq!(
            ReplaceMode::of_args(&[Some(1), Some(0), Some(2), None, Some(4)]),
            Some(ReplaceMode::Regex)
        );
        assert_eq!(
            errs("Replace([x], \"a\")"),
            vec![(Code::InvalidReplaceCombination, (1, 1))]
        );
        assert_eq!(
            errs("Replace([x], , \"re\", \"g\", , , )"),
            vec![(Code::InvalidReplaceCombination, (1, 1))]
        );
        assert_eq!(
            errs("Replace(, \"a\", , , \"b\", , )"),
            vec![(Code::RequiredArgumentOmitted, (1, 1))]
        );
        assert_eq!(
            errs("SingleAppRoleAssignment([roles])"),
            vec![(Code::AppRoleArgument, (1, 25))]
        );
        assert_eq!(
            errs("AppRoleAssignmentsComplex(\"appRoleAssignments\")"),
            vec![(Code::AppRoleArgument, (1, 27))]
        );
        assert_eq!(
            errs("SelectUniqueValue([a])"),
            vec![(Code::SelectUniqueValueTooFewRules, (1, 1))]
        );
    }

    #[test]
    fn literal_checks() {
        ok("DateAdd(\"ww\", 2, [d])");
        ok("DateDiff(\"yyyy\", [a], [b])");
        ok("DateAdd([interval], 2, [d])");
        assert_eq!(
            errs("DateAdd(\"q\", 1, [d])"),
            vec![(Code::InvalidInterval, (1, 9))]
        );
        assert_eq!(
            err1("DateAdd(\"YYYY\", 1, [d])").hint.as_deref(),
            Some("intervals are case-sensitive: did you mean \"yyyy\"?")
        );
        assert_eq!(
            errs("DateDiff(Null, [a], [b])"),
            vec![(Code::InvalidInterval, (1, 10))]
        );
        assert_eq!(
            errs("DateDiff(1, [a], [b])"),
            vec![(Code::InvalidInterval, (1, 10))]
        );

        ok("ToLower([a], \"tr-TR\")");
        ok("ToUpper([a], \"az-Latn-AZ\")");
        ok("ToUpper([a], \"\")");
        assert_eq!(
            errs("ToLower([a], \"english\")"),
            vec![(Code::InvalidCulture, (1, 14))]
        );
        assert_eq!(
            errs("ToUpper([a], \"en_US\")"),
            vec![(Code::InvalidCulture, (1, 14))]
        );
        assert!(is_well_formed_culture("en"));
        assert!(!is_well_formed_culture("e1"));
        assert!(!is_well_formed_culture("en-"));

        ok("RandomString(6, 3, 0, 0, 3, \"O0\")");
        ok("RandomString([len], 3, 0, 0, 3)");
        assert_eq!(
            errs("RandomString(0, 0, 0, 0, 0)"),
            vec![(Code::InvalidRandomStringCounts, (1, 14))]
        );
        assert_eq!(
            errs("RandomString(300, 0, 0, 0, 0)"),
            vec![(Code::InvalidRandomStringCounts, (1, 14))]
        );
        assert_eq!(
            errs("RandomString(8, \"-1\", 0, 0, 0)"),
            vec![(Code::InvalidRandomStringCounts, (1, 17))]
        );
        assert_eq!(
            errs("RandomString(4, 2, 1, 1, 1)"),
            vec![(Code::InvalidRandomStringCounts, (1, 1))]
        );

        ok("InStr([a], \"b\", 1, 1)");
        ok("InStr([a], \"b\", 1, \"vbTextCompare\")");
        assert_eq!(
            errs("InStr([a], \"b\", 1, 2)"),
            vec![(Code::InvalidCompareType, (1, 20))]
        );
        assert_eq!(
            errs("InStr([a], \"b\", 1, True)"),
            vec![(Code::InvalidCompareType, (1, 20))]
        );

        ok("FormatDateTime([d], \"DateTimeStyles.AdjustToUniversal | assumeLocal\", \"yyyyMMdd\", \"yyyy\")");
        ok("FormatDateTime([d], \"\", \"yyyyMMdd\", \"yyyy\")");
        assert_eq!(
            errs("FormatDateTime([d], \"None, Bogus\", \"yyyyMMdd\", \"yyyy\")"),
            vec![(Code::InvalidDateTimeStyles, (1, 21))]
        );
        assert_eq!(first_bad_date_time_style("None, Bogus"), Some("Bogus"));
    }

    struct NoEmptyRegex;
    impl LiteralCheck for NoEmptyRegex {
        fn check_call(
            &self,
            func: Function,
            args: &[Option<Node>],
            _: Span,
            out: &mut Vec<Diagnostic>,
        ) {
            if func == Function::Replace {
                if let Some(Some(Node::Literal {
                    value: Literal::String(s),
                    span,
                })) = args.get(2)
                {
                    if s.is_empty() {
                        out.push(Diagnostic::new(
                            Code::UnexpectedToken,
                            *span,
                            "empty pattern",
                        ));
                    }
                }
            }
        }
    }

    #[test]
    fn extra_literal_checks_run() {
        let text = "Replace([x], , \"\", , \"b\", , )";
        ok(text);
        let err = compile_with(text, &[&NoEmptyRegex])
            .err()
            .map(|d| d.0[0].message.clone());
        assert_eq!(err.as_deref(), Some("empty pattern"));
    }

    #[test]
    fn warnings() {
        let c = ok("coalesce([a], JOIN(\",\", [b], [c]))");
        let w: Vec<_> = c
            .warnings
            .iter()
            .map(|w| (w.code, w.span.start, w.message.as_str()))
            .collect();
        assert_eq!(
            w,
            vec![
                (
                    Code::NonCanonicalFunctionName,
                    0,
                    "function `coalesce` is spelled `Coalesce`"
                ),
                (
                    Code::NonCanonicalFunctionName,
                    14,
                    "function `JOIN` is spelled `Join`"
                ),
            ]
        );
        assert!(c.warnings.iter().all(|w| w.severity == Severity::Warning));
        let c = ok("IIF(IsNullOrEmpty([a]), \"x\", [a])");
        assert_eq!(c.warnings[0].code, Code::UnportableIifCondition);
        assert_eq!(
            ok("IIF([a] = \"\", 1, 2)").warnings[0].code,
            Code::UnportableIifCondition
        );
        assert!(ok("IIF([a] = \"x\", 1, 2)").warnings.is_empty());
        // `check` returns the warnings beside the compiled form.
        let expr = crate::rules::expr::parse("iif(IsPresent([a]), 1, 2)")
            .unwrap_or_else(|d| panic!("{d}"));
        let (compiled, diags) = check(&expr);
        assert!(compiled.is_some());
        assert_eq!(diags.len(), 2);
    }

    #[test]
    fn several_check_errors_at_once() {
        assert_eq!(
            errs("IIF(Coalese([a]), Left([b]), Switch([c], \"d\", \"e\"))"),
            vec![
                (Code::UnknownFunction, (1, 5)),
                (Code::WrongArity, (1, 19)),
                (Code::WrongArity, (1, 30)),
            ]
        );
    }

    #[test]
    fn rendered_compile_error() {
        use crate::rules::diagnostic::Origin;
        let text = "Join(\" \",\n\tCoalese([givenName], \"x\"))";
        let origin = Origin {
            rule: Some("users".into()),
            attribute: Some("displayName".into()),
            file: Some("rules.toml".into()),
            base_line: 14,
            base_col: 16,
        };
        let rendered = compile(text)
            .err()
            .map(|d| d.render(text, &origin))
            .unwrap_or_default();
        let expected = "\
error[E0120]: unknown function `Coalese`
  --> rules.toml:15:2 (rule \"users\", attribute \"displayName\")
   |
15 |     Coalese([givenName], \"x\"))
   |     ^^^^^^^
   = help: did you mean `Coalesce`?
";
        assert_eq!(rendered, expected);
    }

    #[test]
    fn deepest_parsable_nesting_compiles() {
        let mut text = "1".to_string();
        for _ in 0..MAX_DEPTH {
            text = format!("IIF([a] = {text}, 1, 2)");
        }
        ok(&text);
    }

    #[test]
    fn check_limits_depth_of_hand_built_trees() {
        let mut e = Expr {
            kind: ExprKind::Null,
            span: Span::default(),
        };
        for _ in 0..(MAX_DEPTH + 5) {
            e = Expr {
                kind: ExprKind::Group(Box::new(e)),
                span: Span::default(),
            };
        }
        let (c, d) = check(&e);
        assert!(c.is_none());
        assert_eq!(d[0].code, Code::NestingTooDeep);
    }
}
