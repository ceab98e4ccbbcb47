//! The evaluator: a compiled expression ([`Program`]) evaluated over one object's attributes and
//! an [`EvalContext`], to an [`Evaluated`] outcome (spec §1): a value, ignore-flow or not-unique,
//! marked redacted or replace where the spec says so.
//!
//! [`Program::compile`] parses, checks and precompiles once — every literal regular expression,
//! .NET date format, interval and culture is compiled here, never per object. `IIF`, `Switch`,
//! `Coalesce` and `SelectUniqueValue` are lazy (spec §4.8). Pure: no clock, no I/O; randomness
//! only from the context's seeded source.

use crate::delta::SourceMirror;
use crate::model::{Anchor, Attributes, Dn, Reference, Value, Values};
use crate::rules::context::EvalContext;
use crate::rules::diagnostic::{Code, Diagnostic, Diagnostics, Span};
use crate::rules::expr::{self, CompiledExpr, Literal, LiteralCheck, Node};
use crate::rules::function::Function;
use crate::rules::functions::{self, Precompiled, SplitItemError, UniqueCheck};
use crate::rules::value::{self, codes, CompareOp, EvalError, EvalValue};

/// How a flow's result is applied.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The value(s) to write (Null: the mapping contributes nothing).
    Value(EvalValue),
    /// `IgnoreFlowIfNullOrEmpty` saw nothing: leave the target attribute out of this flow.
    IgnoreFlow,
    /// `SelectUniqueValue` found every candidate taken: hold the object back.
    NotUnique,
}

/// The result of evaluating a program.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluated {
    /// The outcome.
    pub outcome: Outcome,
    /// The value is secret (`Redact`): never shown or logged.
    pub redacted: bool,
    /// `AssertiveAppRoleAssignmentsComplex`: the target's set is replaced.
    pub replace: bool,
    /// Warnings raised while evaluating (for example `SingleAppRoleAssignment` with several
    /// roles).
    pub warnings: Vec<String>,
}

/// An evaluation error with the span of the call that failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {}", Code::Evaluation(self.error.code), self.error.message)]
pub struct EvalFailure {
    /// The error.
    pub error: EvalError,
    /// Where in the expression.
    pub span: Span,
}

impl EvalFailure {
    /// The failure as a diagnostic (code `E03xx`), to render with the expression's text.
    pub fn diagnostic(&self) -> Diagnostic {
        Diagnostic::new(
            Code::Evaluation(self.error.code),
            self.span,
            self.error.message.clone(),
        )
    }
}

/// An evaluable node: the compiled tree with each call's precompiled literal arguments.
#[derive(Debug, Clone)]
enum Op {
    Call {
        func: Function,
        args: Vec<Option<Op>>,
        pre: Box<Precompiled>,
        span: Span,
    },
    Attr {
        name: String,
        /// Index into a bound attribute table (see [`Program::bind`]); `usize::MAX` = unbound.
        slot: usize,
    },
    Lit(EvalValue),
    Compare {
        op: CompareOp,
        lhs: Box<Op>,
        rhs: Box<Op>,
        span: Span,
    },
    /// `Item(Split(source, "literal"), literal)`: the one part, without building the list.
    SplitItem {
        source: Box<Op>,
        /// `Split`'s literal delimiter (non-empty).
        delim: Box<str>,
        /// `Item`'s literal index (at least 1).
        index: i64,
        split_span: Span,
        item_span: Span,
    },
}

/// A compiled, ready-to-evaluate expression.
///
/// ```
/// use dirsync::model::{Attributes, Value};
/// use dirsync::rules::context::{EvalContext, SeededRng};
/// use dirsync::rules::eval::{Outcome, Program};
/// use dirsync::rules::value::EvalValue;
///
/// let p = Program::compile(r#"Join(" ", [givenName], ToUpper([sn]))"#).unwrap();
/// let attrs: Attributes = [("givenName", Value::from("Ada")), ("sn", Value::from("Lovelace"))]
///     .into_iter()
///     .collect();
/// let mut rng = SeededRng::from_seed(1);
/// let mut ctx = EvalContext::new(chrono::DateTime::UNIX_EPOCH, &mut rng);
/// let out = p.evaluate(&attrs, &mut ctx).unwrap();
/// assert_eq!(out.outcome, Outcome::Value(EvalValue::from("Ada LOVELACE")));
/// ```
#[derive(Debug, Clone)]
pub struct Program {
    root: Op,
    compiled: CompiledExpr,
}

/// Literal to value.
fn literal(l: &Literal) -> EvalValue {
    match l {
        Literal::String(s) => EvalValue::from(s.as_str()),
        Literal::Integer(i) => EvalValue::Integer(*i),
        Literal::Decimal(d) => value::Decimal::new(d.mantissa, d.scale)
            .map(EvalValue::Decimal)
            .unwrap_or_else(|| EvalValue::from(format!("{d}"))),
        Literal::Boolean(b) => EvalValue::Boolean(*b),
        Literal::Null => EvalValue::Null,
        Literal::CompareMode(m) => EvalValue::Integer(match m {
            expr::CompareMode::Binary => 0,
            expr::CompareMode::Text => 1,
        }),
    }
}

fn precompile(func: Function, args: &[Option<Node>]) -> Result<Precompiled, EvalError> {
    let lits: Vec<Option<EvalValue>> = args
        .iter()
        .map(|a| a.as_ref().and_then(Node::literal).map(literal))
        .collect();
    let view: Vec<Option<Option<&EvalValue>>> = args
        .iter()
        .zip(&lits)
        .map(|(a, l)| a.as_ref().map(|_| l.as_ref()))
        .collect();
    functions::precompile(func, &view)
}

fn literal_code(e: &EvalError) -> Code {
    match e.code {
        codes::INVALID_REGEX | codes::UNKNOWN_GROUP => Code::InvalidRegexLiteral,
        codes::INVALID_FORMAT => Code::InvalidDateFormatLiteral,
        _ => Code::InvalidLiteralArgument,
    }
}

/// The literal checks of the function library (spec §3.1 item 5): regular expressions, date
/// formats, and every other literal argument that would make a call fail for every object. Run
/// by [`Program::compile`] through the front end's [`LiteralCheck`] hook.
pub struct FunctionLiteralChecks;

impl LiteralCheck for FunctionLiteralChecks {
    fn check_call(
        &self,
        func: Function,
        args: &[Option<Node>],
        span: Span,
        out: &mut Vec<Diagnostic>,
    ) {
        if let Err(e) = precompile(func, args) {
            let at = e
                .arg
                .and_then(|i| args.get(i).and_then(|a| a.as_ref()).map(Node::span))
                .unwrap_or(span);
            let code = literal_code(&e);
            // The front end's own checks already cover these; do not report them twice.
            let covered = matches!(
                e.code,
                codes::INVALID_INTERVAL
                    | codes::INVALID_CULTURE
                    | codes::INVALID_RANDOM_STRING
                    | codes::INVALID_COMPARE_TYPE
                    | codes::INVALID_DATETIME_STYLES
                    | codes::ARGUMENT_COUNT
            );
            if !covered {
                out.push(Diagnostic::new(code, at, e.message));
            }
        }
    }
}

/// `Item(Split(source, "delimiter"), index)` with both controls literal and valid: the fused
/// operation, else `None`.
fn split_item(node: &Node) -> Result<Option<Op>, Diagnostic> {
    let Node::Call {
        func: Function::Item,
        args,
        span: item_span,
    } = node
    else {
        return Ok(None);
    };
    let [Some(Node::Call {
        func: Function::Split,
        args: split_args,
        span: split_span,
    }), Some(index_node)] = args.as_slice()
    else {
        return Ok(None);
    };
    let [Some(source), Some(Node::Literal { .. })] = split_args.as_slice() else {
        return Ok(None);
    };
    let Some(index_lit) = index_node.literal() else {
        return Ok(None);
    };
    // Both calls compile as they would unfused (same checks, same diagnostics).
    precompile(Function::Item, args)
        .map_err(|e| Diagnostic::new(literal_code(&e), *item_span, e.message))?;
    let split_pre = precompile(Function::Split, split_args)
        .map_err(|e| Diagnostic::new(literal_code(&e), *split_span, e.message))?;
    let index = literal(index_lit)
        .single()
        .ok()
        .and_then(|v| v.to_integer().ok().flatten());
    let (Some(delim), Some(index)) = (split_pre.text(), index) else {
        return Ok(None);
    };
    if index < 1 || delim.is_empty() {
        return Ok(None);
    }
    Ok(Some(Op::SplitItem {
        source: Box::new(build(source)?),
        delim: delim.into(),
        index,
        split_span: *split_span,
        item_span: *item_span,
    }))
}

fn build(node: &Node) -> Result<Op, Diagnostic> {
    if let Some(op) = split_item(node)? {
        return Ok(op);
    }
    Ok(match node {
        Node::Call { func, args, span } => {
            let pre = precompile(*func, args)
                .map_err(|e| Diagnostic::new(literal_code(&e), *span, e.message))?;
            Op::Call {
                func: *func,
                args: args
                    .iter()
                    .map(|a| a.as_ref().map(build).transpose())
                    .collect::<Result<_, _>>()?,
                pre: Box::new(pre),
                span: *span,
            }
        }
        Node::Attr { name, .. } => Op::Attr {
            name: name.clone(),
            slot: usize::MAX,
        },
        Node::Literal { value, .. } => Op::Lit(literal(value)),
        Node::Compare { op, lhs, rhs, span } => Op::Compare {
            op: *op,
            lhs: Box::new(build(lhs)?),
            rhs: Box::new(build(rhs)?),
            span: *span,
        },
    })
}

/// A copy of `s` that shares no buffer with it.
///
/// Sharing a long string counts its buffer up (and later down): an atomic operation on the
/// source entry's memory, which a projection reads once per run and which is therefore rarely
/// in cache — and an atomic operation on a line not in cache stalls the core until the line
/// arrives, where a plain read overlaps with other work. Copying the bytes into a new buffer
/// measured faster (see `benches/rules.rs`). The price is memory: a long string kept in a
/// projected object is its own buffer, not the entry's (about 30 MB more per 100k AD users if
/// every projection of a run is kept). Short strings are held inline and simply copied.
#[inline]
pub(crate) fn detach(s: &smol_str::SmolStr) -> smol_str::SmolStr {
    if s.is_heap_allocated() {
        smol_str::SmolStr::new(s.as_str())
    } else {
        s.clone()
    }
}

/// `values` for a flow's result: strings [`detach`]ed, other values cloned.
pub(crate) fn detach_values(values: &Values) -> Values {
    match &values[..] {
        [Value::String(s)] => Values::one(Value::String(detach(s))),
        many => many
            .iter()
            .map(|v| match v {
                Value::String(s) => Value::String(detach(s)),
                other => other.clone(),
            })
            .collect(),
    }
}

/// A model value as an expression value (spec §4.1).
pub fn from_model(v: &Value) -> EvalValue {
    match v {
        Value::String(s) => EvalValue::String(detach(s)),
        Value::Bytes(b) => EvalValue::Binary(b.clone()),
        Value::Integer(i) => EvalValue::Integer(*i),
        Value::Boolean(b) => EvalValue::Boolean(*b),
        Value::Timestamp(t) => EvalValue::DateTime(*t),
        Value::Reference(r) => EvalValue::Reference(r.to_string().into()),
    }
}

/// Where the evaluator reads attribute values from.
pub trait AttributeSource {
    /// The values of attribute `name`, which a bound program also knows as `slot`.
    fn values(&self, name: &str, slot: usize) -> Option<&Values>;

    /// The object's DN, which scoping clauses on `dn` test (none by default).
    fn dn(&self) -> Option<&crate::model::Dn> {
        None
    }

    /// The current DN of the object a reference by anchor names: what an expression or a
    /// scoping clause sees of such a reference (the source mirror keeps references by anchor).
    /// `None` (the default): the anchor's text.
    fn reference_dn(&self, anchor: &Anchor) -> Option<&Dn> {
        let _ = anchor;
        None
    }
}

/// The text a reference value shows expressions and scoping clauses: the current DN of the
/// object it names (through `attrs`), else its DN or id.
pub(crate) fn reference_text<A: AttributeSource + ?Sized>(attrs: &A, r: &Reference) -> String {
    match r {
        Reference::Anchor(a) => match attrs.reference_dn(a) {
            Some(dn) => dn.as_str().to_owned(),
            None => a.as_str().to_owned(),
        },
        other => other.to_string(),
    }
}

/// A reference value as `attrs` shows it ([`reference_text`]). Out of line: rare, and kept out
/// of the evaluator's hot path.
#[cold]
#[inline(never)]
fn reference_value<A: AttributeSource + ?Sized>(attrs: &A, r: &Reference) -> EvalValue {
    EvalValue::Reference(reference_text(attrs, r).into())
}

/// Several values as an expression value, references read as `attrs` shows them.
#[inline(never)]
fn multi_value<A: AttributeSource + ?Sized>(attrs: &A, many: &[Value]) -> EvalValue {
    EvalValue::multi(
        many.iter()
            .map(|v| match v {
                Value::Reference(r) => reference_value(attrs, r),
                other => from_model(other),
            })
            .collect(),
    )
}

impl AttributeSource for Attributes {
    fn values(&self, name: &str, _slot: usize) -> Option<&Values> {
        self.get(name)
    }
}

/// An object's attributes looked up once for a bound attribute table (see [`Program::bind`]):
/// each attribute reference then costs an index instead of a search.
pub struct Slotted<'a> {
    slots: smallvec::SmallVec<[Option<&'a Values>; 32]>,
    attrs: &'a Attributes,
    dn: Option<&'a crate::model::Dn>,
    /// Where references by anchor find the current DN of their object.
    mirror: Option<&'a SourceMirror>,
}

impl<'a> Slotted<'a> {
    /// Looks up every name of `table` (sorted, as [`Program::bind`] wants it) in `attrs`.
    #[inline]
    pub fn new<N: AsRef<str>>(table: &[N], attrs: &'a Attributes) -> Slotted<'a> {
        // Built in place: the slot array is a few hundred bytes, not worth a copy.
        let mut view = Slotted {
            slots: smallvec::SmallVec::new(),
            attrs,
            dn: None,
            mirror: None,
        };
        view.fill(table);
        view
    }

    /// The view with the object's DN (for scoping clauses on `dn`), builder style.
    #[inline]
    pub fn with_dn(mut self, dn: Option<&'a crate::model::Dn>) -> Slotted<'a> {
        self.dn = dn;
        self
    }

    /// References by anchor read as the current DN of their object in `mirror` (builder style).
    #[inline]
    pub fn with_mirror(mut self, mirror: &'a SourceMirror) -> Slotted<'a> {
        self.mirror = Some(mirror);
        self
    }

    /// One merge walk over two lists sorted in the same (case-insensitive) order.
    fn fill<N: AsRef<str>>(&mut self, table: &[N]) {
        let slots = &mut self.slots;
        slots.reserve_exact(table.len());
        let mut entries = self.attrs.iter().map(|(n, v)| (n.as_str(), v));
        // The entry attribute under the cursor, its name read once.
        let mut cur = entries.next();
        for name in table {
            let want = name.as_ref();
            let mut found = None;
            while let Some((have, values)) = cur {
                // The common case first: the same spelling.
                if crate::model::name::same_spelling(have, want) {
                    // Read a DN reference's shared record now, on purpose: a reference flow
                    // counts it later, and a count (an atomic operation) on memory not in
                    // cache stalls the core, where this plain read overlaps with the work
                    // between (measured; `black_box` keeps the read).
                    if let Some(Value::Reference(Reference::Dn(dn))) = values.first() {
                        std::hint::black_box(dn.as_str().len());
                    }
                    found = Some(values);
                    cur = entries.next();
                    break;
                }
                match crate::model::cmp_ignore_case(have, want) {
                    std::cmp::Ordering::Less => cur = entries.next(),
                    std::cmp::Ordering::Equal => {
                        found = Some(values);
                        cur = entries.next();
                        break;
                    }
                    std::cmp::Ordering::Greater => break,
                }
            }
            slots.push(found);
        }
    }
}

impl AttributeSource for Slotted<'_> {
    fn values(&self, name: &str, slot: usize) -> Option<&Values> {
        match self.slots.get(slot) {
            Some(v) => *v,
            None => self.attrs.get(name),
        }
    }

    fn dn(&self) -> Option<&crate::model::Dn> {
        self.dn
    }

    fn reference_dn(&self, anchor: &Anchor) -> Option<&Dn> {
        self.mirror?.dn_of(anchor)
    }
}

/// The values of an attribute as one expression value: Null, a single value or a Multi.
pub fn attribute_value(attrs: &Attributes, name: &str) -> EvalValue {
    values_value(attrs.get(name))
}

fn values_value(values: Option<&Values>) -> EvalValue {
    match values.map(|v| &v[..]) {
        None | Some([]) => EvalValue::Null,
        Some([one]) => from_model(one),
        Some(many) => EvalValue::multi(many.iter().map(from_model).collect()),
    }
}

/// [`values_value`] of `attrs`' attribute `name` (bound as `slot`), references read as `attrs`
/// shows them.
#[inline]
fn attr_value<A: AttributeSource + ?Sized>(attrs: &A, name: &str, slot: usize) -> EvalValue {
    match attrs.values(name, slot).map(|v| &v[..]) {
        None | Some([]) => EvalValue::Null,
        Some([Value::Reference(r)]) => reference_value(attrs, r),
        Some([one]) => from_model(one),
        Some(many) => multi_value(attrs, many),
    }
}

/// An expression value as model values for a target attribute: strings stay strings, dates
/// render canonically (spec §4.6) as Entra writes them, and for a reference attribute each
/// value becomes a reference (a DN when it parses as one, else an anchor).
pub fn to_model(v: &EvalValue, reference: bool) -> Result<Values, EvalError> {
    let mut out = Values::new();
    for x in v.values() {
        if reference {
            if let EvalValue::String(s) | EvalValue::Reference(s) = x {
                out.push(match Dn::parse(s) {
                    Ok(dn) if !dn.is_root() => Value::dn_ref(dn),
                    _ => Value::Reference(Reference::Anchor(s.as_str().into())),
                });
                continue;
            }
            if let Some(text) = x.to_string_value()? {
                out.push(match Dn::parse(&text) {
                    Ok(dn) if !dn.is_root() => Value::dn_ref(dn),
                    _ => Value::Reference(Reference::Anchor(text.into())),
                });
            }
            continue;
        }
        push_model(&mut out, x)?;
    }
    Ok(out)
}

/// One value of an expression result (not a Multi's list: its elements) as model values, for
/// a non-reference attribute.
fn push_model(out: &mut Values, x: &EvalValue) -> Result<(), EvalError> {
    match x {
        EvalValue::Null => {}
        EvalValue::Integer(i) => out.push(*i),
        EvalValue::Boolean(b) => out.push(*b),
        EvalValue::Binary(b) => out.push(b.clone()),
        EvalValue::Structured(roles) => {
            for r in roles {
                out.push(Value::string(r.value.as_str()));
            }
        }
        // A SmolStr clone: inline copy or reference-count increment, never a new buffer.
        EvalValue::String(s) | EvalValue::Reference(s) => out.push(Value::String(s.clone())),
        other => {
            if let Some(text) = other.to_string_value()? {
                out.push(Value::string(text));
            }
        }
    }
    Ok(())
}

/// [`to_model`] taking the value: strings and binary data move into the model values instead
/// of being copied (or their shared buffers counted up and down).
pub fn into_model(v: EvalValue, reference: bool) -> Result<Values, EvalError> {
    if reference {
        return to_model(&v, true);
    }
    match v {
        EvalValue::String(s) | EvalValue::Reference(s) => Ok(Values::one(Value::String(s))),
        EvalValue::Binary(b) => Ok(Values::one(Value::Bytes(b))),
        EvalValue::Multi(vs) => {
            let mut out = Values::new();
            for x in vs {
                match x {
                    EvalValue::String(s) | EvalValue::Reference(s) => out.push(Value::String(s)),
                    EvalValue::Binary(b) => out.push(Value::Bytes(b)),
                    other => push_model(&mut out, &other)?,
                }
            }
            Ok(out)
        }
        other => to_model(&other, false),
    }
}

impl Program {
    /// Parses, checks and precompiles `text`. Every problem is reported, with spans.
    pub fn compile(text: &str) -> Result<Program, Diagnostics> {
        let compiled = expr::compile_with(text, &[&FunctionLiteralChecks])?;
        Program::from_compiled(compiled)
    }

    /// Precompiles an already checked expression.
    pub fn from_compiled(compiled: CompiledExpr) -> Result<Program, Diagnostics> {
        let root = build(&compiled.root).map_err(|d| Diagnostics(vec![d]))?;
        Ok(Program { root, compiled })
    }

    /// The checked expression (source text, flags, warnings).
    pub fn compiled(&self) -> &CompiledExpr {
        &self.compiled
    }

    /// The names of the attributes the expression reads.
    pub fn attribute_names(&self) -> Vec<&str> {
        fn walk<'a>(op: &'a Op, out: &mut Vec<&'a str>) {
            match op {
                Op::Attr { name, .. } => out.push(name),
                Op::Call { args, .. } => args.iter().flatten().for_each(|a| walk(a, out)),
                Op::Compare { lhs, rhs, .. } => {
                    walk(lhs, out);
                    walk(rhs, out);
                }
                Op::SplitItem { source, .. } => walk(source, out),
                Op::Lit(_) => {}
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &mut out);
        out
    }

    /// Binds attribute references to positions in `table` (sorted by [`crate::model::AttrName`]
    /// order), so that evaluating over a [`Slotted`] view costs an index per reference.
    pub fn bind(&mut self, table: &[crate::model::AttrName]) {
        fn walk(op: &mut Op, table: &[crate::model::AttrName]) {
            match op {
                Op::Attr { name, slot } => {
                    *slot = table
                        .binary_search(&crate::model::AttrName::new(name.as_str()))
                        .unwrap_or(usize::MAX)
                }
                Op::Call { args, .. } => args.iter_mut().flatten().for_each(|a| walk(a, table)),
                Op::Compare { lhs, rhs, .. } => {
                    walk(lhs, table);
                    walk(rhs, table);
                }
                Op::SplitItem { source, .. } => walk(source, table),
                Op::Lit(_) => {}
            }
        }
        walk(&mut self.root, table)
    }

    /// Whether the expression calls a function that draws from the context's seeded random
    /// source (`Guid`, `RandomString`); when it does not, evaluating never touches `ctx.rng`.
    pub fn uses_random(&self) -> bool {
        fn walk(op: &Op) -> bool {
            match op {
                Op::Call { func, args, .. } => {
                    matches!(func, Function::Guid | Function::RandomString)
                        || args.iter().flatten().any(walk)
                }
                Op::Compare { lhs, rhs, .. } => walk(lhs) || walk(rhs),
                Op::SplitItem { source, .. } => walk(source),
                Op::Attr { .. } | Op::Lit(_) => false,
            }
        }
        walk(&self.root)
    }

    /// If the whole expression is one attribute reference, its name (a direct mapping, which
    /// the rule set flows without conversion).
    pub fn direct_attribute(&self) -> Option<(&str, usize)> {
        match &self.root {
            Op::Attr { name, slot } if !self.compiled.ignore_flow_if_null_or_empty => {
                Some((name, *slot))
            }
            _ => None,
        }
    }

    /// The outcome alone, for the projection's hot path: no [`Evaluated`] record, and the
    /// warnings are dropped (the rule set reports no warnings per object; the flags it needs
    /// are on [`Program::compiled`]).
    #[inline]
    pub(crate) fn outcome<A: AttributeSource + ?Sized>(
        &self,
        attrs: &A,
        ctx: &mut EvalContext<'_>,
    ) -> Result<Outcome, Box<EvalFailure>> {
        self.outcome_with(attrs, ctx, &mut Vec::new())
    }

    #[inline(always)]
    fn outcome_with<A: AttributeSource + ?Sized>(
        &self,
        attrs: &A,
        ctx: &mut EvalContext<'_>,
        warnings: &mut Vec<String>,
    ) -> Result<Outcome, Box<EvalFailure>> {
        Ok(match eval_top(&self.root, attrs, ctx, warnings)? {
            None => Outcome::NotUnique,
            Some(v) => {
                if self.compiled.ignore_flow_if_null_or_empty && functions::is_null_or_empty(&v) {
                    Outcome::IgnoreFlow
                } else {
                    Outcome::Value(v)
                }
            }
        })
    }

    /// Evaluates over `attrs`.
    pub fn evaluate(
        &self,
        attrs: &dyn AttributeSource,
        ctx: &mut EvalContext<'_>,
    ) -> Result<Evaluated, EvalFailure> {
        let mut warnings = Vec::new();
        let outcome = self
            .outcome_with(attrs, ctx, &mut warnings)
            .map_err(|e| *e)?;
        Ok(Evaluated {
            outcome,
            redacted: self.compiled.redact,
            replace: self.compiled.replaces_app_roles(),
            warnings,
        })
    }
}

/// Evaluation results inside the evaluator: the failure is boxed so that the common (value)
/// path moves a small result.
type EvalRes<T> = Result<T, Box<EvalFailure>>;

fn fail(span: Span) -> impl Fn(EvalError) -> Box<EvalFailure> {
    move |error| Box::new(EvalFailure { error, span })
}

/// The root of a program: `SelectUniqueValue` there may find no free value (`Ok(None)`, the
/// not-unique outcome). The checker keeps `SelectUniqueValue` at the top level; anywhere else
/// its not-unique result reads as Null (see [`eval`]).
#[inline(always)]
fn eval_top<A: AttributeSource + ?Sized>(
    op: &Op,
    attrs: &A,
    ctx: &mut EvalContext<'_>,
    w: &mut Vec<String>,
) -> EvalRes<Option<EvalValue>> {
    match op {
        Op::Call {
            func: Function::SelectUniqueValue,
            args,
            span,
            ..
        } => select_unique(args, *span, attrs, ctx, w),
        _ => eval(op, attrs, ctx, w).map(Some),
    }
}

fn select_unique<A: AttributeSource + ?Sized>(
    args: &[Option<Op>],
    span: Span,
    attrs: &A,
    ctx: &mut EvalContext<'_>,
    w: &mut Vec<String>,
) -> EvalRes<Option<EvalValue>> {
    for (i, a) in args.iter().enumerate() {
        let Some(a) = a else { continue };
        let v = eval_arg(a, attrs, ctx, w)?;
        match functions::select_unique_check(&v, i, ctx).map_err(fail(span))? {
            UniqueCheck::Free(v) => return Ok(Some(v)),
            UniqueCheck::Skip | UniqueCheck::Taken => {}
        }
    }
    Ok(None)
}

/// [`eval`] for an argument: attribute references and literals — most arguments — are read
/// here, without a call into the evaluator.
#[inline(always)]
fn eval_arg<A: AttributeSource + ?Sized>(
    op: &Op,
    attrs: &A,
    ctx: &mut EvalContext<'_>,
    w: &mut Vec<String>,
) -> EvalRes<EvalValue> {
    match op {
        Op::Attr { name, slot } => Ok(attr_value(attrs, name, *slot)),
        Op::Lit(v) => Ok(v.clone()),
        _ => eval(op, attrs, ctx, w),
    }
}

fn eval<A: AttributeSource + ?Sized>(
    op: &Op,
    attrs: &A,
    ctx: &mut EvalContext<'_>,
    w: &mut Vec<String>,
) -> EvalRes<EvalValue> {
    match op {
        Op::Lit(_) | Op::Attr { .. } => eval_arg(op, attrs, ctx, w),
        Op::Compare { op, lhs, rhs, span } => {
            let a = eval_arg(lhs, attrs, ctx, w)?;
            let b = eval_arg(rhs, attrs, ctx, w)?;
            value::compare(*op, &a, &b).map_err(fail(*span))
        }
        Op::Call {
            func,
            args,
            pre,
            span,
        } => eval_call(*func, args, pre, *span, attrs, ctx, w),
        Op::SplitItem {
            source,
            delim,
            index,
            split_span,
            item_span,
        } => {
            let source = eval_arg(source, attrs, ctx, w)?;
            functions::split_item(&source, delim, *index).map_err(|e| match e {
                SplitItemError::Split(error) => Box::new(EvalFailure {
                    error,
                    span: *split_span,
                }),
                SplitItemError::Item(error) => Box::new(EvalFailure {
                    error,
                    span: *item_span,
                }),
            })
        }
    }
}

fn opt_value<A: AttributeSource + ?Sized>(
    op: Option<&Op>,
    attrs: &A,
    ctx: &mut EvalContext<'_>,
    w: &mut Vec<String>,
) -> EvalRes<EvalValue> {
    match op {
        Some(op) => eval_arg(op, attrs, ctx, w),
        None => Ok(EvalValue::Null),
    }
}

#[allow(clippy::too_many_arguments)]
fn eval_call<A: AttributeSource + ?Sized>(
    func: Function,
    args: &[Option<Op>],
    pre: &Precompiled,
    span: Span,
    attrs: &A,
    ctx: &mut EvalContext<'_>,
    w: &mut Vec<String>,
) -> EvalRes<EvalValue> {
    let arg = |i: usize| args.get(i).and_then(|a| a.as_ref());
    match func {
        Function::IIF => {
            let cond = opt_value(arg(0), attrs, ctx, w)?;
            match functions::iif_condition(&cond).map_err(|e| {
                Box::new(EvalFailure {
                    error: e.at(Function::IIF, 0, "condition"),
                    span,
                })
            })? {
                None => Ok(EvalValue::Null),
                Some(true) => opt_value(arg(1), attrs, ctx, w),
                Some(false) => opt_value(arg(2), attrs, ctx, w),
            }
        }
        Function::Switch => {
            let source = opt_value(arg(0), attrs, ctx, w)?;
            let mut i = 2;
            while i < args.len() {
                let evaluated;
                let key = match arg(i) {
                    Some(Op::Lit(lit)) => lit,
                    other => {
                        evaluated = opt_value(other, attrs, ctx, w)?;
                        &evaluated
                    }
                };
                if functions::switch_key_matches(&source, key).map_err(fail(span))? {
                    return opt_value(arg(i + 1), attrs, ctx, w);
                }
                i += 2;
            }
            opt_value(arg(1), attrs, ctx, w)
        }
        Function::Coalesce => {
            for a in args.iter().flatten() {
                let v = eval_arg(a, attrs, ctx, w)?;
                if functions::coalesce_is_value(&v) {
                    return Ok(v);
                }
            }
            Ok(EvalValue::Null)
        }
        // Below the top level, not-unique reads as Null (the checker keeps SelectUniqueValue
        // at the top).
        Function::SelectUniqueValue => {
            Ok(select_unique(args, span, attrs, ctx, w)?.unwrap_or(EvalValue::Null))
        }
        Function::IgnoreFlowIfNullOrEmpty => {
            // Only reachable nested under Redact at the top (the checker peels the rest);
            // the flag on the program decides the outcome.
            opt_value(arg(0), attrs, ctx, w)
        }
        Function::SingleAppRoleAssignment => {
            if let Some(warning) = functions::single_app_role_warning(ctx) {
                w.push(warning);
            }
            call(func, args, pre, span, attrs, ctx, w)
        }
        _ => call(func, args, pre, span, attrs, ctx, w),
    }
}

/// Up to this many slots, a call's arguments live in fixed arrays on the stack.
const FIXED_ARGS: usize = 4;

#[allow(clippy::too_many_arguments)]
fn call<A: AttributeSource + ?Sized>(
    func: Function,
    args: &[Option<Op>],
    pre: &Precompiled,
    span: Span,
    attrs: &A,
    ctx: &mut EvalContext<'_>,
    w: &mut Vec<String>,
) -> EvalRes<EvalValue> {
    // The most common shape — `F([attribute], literal, …)`: the attribute's value is read
    // here and the literals lent, without the general argument loop.
    if let [Some(Op::Attr { name, slot }), rest @ ..] = args {
        if rest.len() < FIXED_ARGS && rest.iter().all(|a| matches!(a, None | Some(Op::Lit(_)))) {
            let first = attr_value(attrs, name, *slot);
            let mut refs: [Option<&EvalValue>; FIXED_ARGS] = [Some(&first), None, None, None];
            for (r, a) in refs[1..].iter_mut().zip(rest) {
                if let Some(Op::Lit(lit)) = a {
                    *r = Some(lit);
                }
            }
            return functions::call_refs(func, &refs[..args.len()], pre, ctx).map_err(fail(span));
        }
    }
    // Literal arguments are lent, not cloned; the others are evaluated into `owned` first.
    if args.len() <= FIXED_ARGS {
        let mut owned: [Option<EvalValue>; FIXED_ARGS] = [None, None, None, None];
        for (a, slot) in args.iter().zip(owned.iter_mut()) {
            if let Some(op) = a {
                if !matches!(op, Op::Lit(_)) {
                    *slot = Some(eval_arg(op, attrs, ctx, w)?);
                }
            }
        }
        let mut refs: [Option<&EvalValue>; FIXED_ARGS] = [None; FIXED_ARGS];
        for ((a, v), r) in args.iter().zip(&owned).zip(refs.iter_mut()) {
            *r = match a {
                Some(Op::Lit(lit)) => Some(lit),
                _ => v.as_ref(),
            };
        }
        return functions::call_refs(func, &refs[..args.len()], pre, ctx).map_err(fail(span));
    }
    let mut owned: Vec<Option<EvalValue>> = Vec::with_capacity(args.len());
    for a in args {
        owned.push(match a {
            Some(Op::Lit(_)) | None => None,
            Some(op) => Some(eval_arg(op, attrs, ctx, w)?),
        });
    }
    let refs: Vec<Option<&EvalValue>> = args
        .iter()
        .zip(&owned)
        .map(|(a, v)| match a {
            Some(Op::Lit(lit)) => Some(lit),
            _ => v.as_ref(),
        })
        .collect();
    functions::call_refs(func, &refs, pre, ctx).map_err(fail(span))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::context::SeededRng;

    #[test]
    fn detached_values_are_equal_and_share_no_buffer() {
        let long = smol_str::SmolStr::new("5f0c0000-0000-4000-8000-000000000001");
        let copy = detach(&long);
        assert_eq!(copy, long);
        assert_ne!(copy.as_ptr(), long.as_ptr());
        let short = smol_str::SmolStr::new("Ada");
        assert_eq!(detach(&short), short);
        let values: Values = vec![
            Value::String(long.clone()),
            Value::Integer(7),
            Value::dn_ref(Dn::parse("CN=A,DC=x").unwrap()),
        ]
        .into_iter()
        .collect();
        let out = detach_values(&values);
        assert_eq!(out, values);
        assert_ne!(out[0].as_str().unwrap().as_ptr(), long.as_ptr());
        let one = Values::one(Value::String(long.clone()));
        assert_eq!(detach_values(&one), one);
    }

    /// Evaluates `text` over `x` (values of attribute `x`) and `d` = `"-"` / `"--"` attributes.
    fn run(text: &str, x: &[Value]) -> Result<Outcome, (u16, String, String)> {
        let p = Program::compile(text).unwrap_or_else(|d| panic!("{text}: {d:?}"));
        let mut attrs = Attributes::default();
        for v in x {
            attrs.add("x", v.clone());
        }
        attrs.add("d", "-");
        attrs.add("dd", "--");
        let mut rng = SeededRng::from_seed(1);
        let mut ctx = EvalContext::new(chrono::DateTime::UNIX_EPOCH, &mut rng);
        p.evaluate(&attrs, &mut ctx)
            .map(|e| e.outcome)
            .map_err(|e| {
                (
                    e.error.code,
                    e.error.message,
                    text[e.span.start..e.span.end].to_string(),
                )
            })
    }

    #[test]
    fn item_of_split_is_fused_and_behaves_as_the_two_calls() {
        let fused = Program::compile(r#"Item(Split([x], "-"), 2)"#).unwrap();
        assert!(matches!(fused.root, Op::SplitItem { .. }));
        let inputs: Vec<Vec<Value>> = vec![
            vec![],
            vec![Value::from("CC1234-Engineering")],
            vec![Value::from(" a - - b -")],
            vec![Value::from("abc")],
            vec![Value::from("")],
            vec![Value::from(" - ")],
            vec![Value::from("a--b--c")],
            vec![Value::from(123i64)],
            vec![Value::from("a-b"), Value::from("c")],
            vec![Value::from("ünï-cödé-ß")],
        ];
        for x in &inputs {
            for index in 1..=4 {
                for (lit, attr) in [(r#""-""#, "[d]"), (r#""--""#, "[dd]")] {
                    let a = run(&format!("Item(Split([x], {lit}), {index})"), x);
                    let b = run(&format!("Item(Split([x], {attr}), {index})"), x);
                    match (&a, &b) {
                        (Ok(a), Ok(b)) => assert_eq!(a, b, "{x:?} {index} {lit}"),
                        (Err((ca, ma, sa)), Err((cb, mb, sb))) => {
                            assert_eq!((ca, ma), (cb, mb), "{x:?} {index} {lit}");
                            // The failing call is the same one in both spellings.
                            assert_eq!(sa.starts_with("Item("), sb.starts_with("Item("));
                            assert_eq!(sa.starts_with("Split("), sb.starts_with("Split("));
                        }
                        _ => panic!("{x:?} {index} {lit}: fused {a:?}, unfused {b:?}"),
                    }
                }
            }
        }
        assert_eq!(
            run(r#"Item(Split([x], "-"), 2)"#, &[Value::from("CC1234-Eng")]),
            Ok(Outcome::Value(EvalValue::from("Eng")))
        );
        let (code, message, span) =
            run(r#"Item(Split([x], "-"), 3)"#, &[Value::from("a-b")]).unwrap_err();
        assert_eq!(code, codes::INDEX_OUT_OF_RANGE);
        assert!(
            message.contains("3 is beyond the last value (there are 2)"),
            "{message}"
        );
        assert_eq!(span, r#"Item(Split([x], "-"), 3)"#);
        let (code, _, span) = run(
            r#"Item(Split([x], "-"), 1)"#,
            &[Value::from("a"), Value::from("b")],
        )
        .unwrap_err();
        assert_eq!(code, codes::MULTI_VALUED);
        assert_eq!(span, r#"Split([x], "-")"#);
    }

    #[test]
    fn uses_random_finds_guid_and_random_string_anywhere() {
        let uses = |t: &str| Program::compile(t).unwrap().uses_random();
        assert!(uses("Guid()"));
        assert!(uses(r#"Join("-", [x], Guid())"#));
        assert!(uses(r#"IIF(IsPresent([x]), [x], ToLower(Guid()))"#));
        assert!(uses(r#"IIF(Len(Guid()) = 36, "a", "b")"#));
        assert!(uses("RandomString(8, 1, 1, 1, 1)"));
        assert!(!uses("[x]"));
        assert!(!uses(r#"Coalesce([x], Join(" ", [y], [z]))"#));
        assert!(!uses(r#"Item(Split([x], "-"), 1)"#));
    }

    #[test]
    fn into_model_equals_to_model() {
        use crate::rules::context::AppRoleValue;
        let role = AppRoleValue {
            id: "1".into(),
            value: "Admin".into(),
            display_name: "Administrator".into(),
        };
        let long = "a string well over twenty-three bytes long";
        let samples = vec![
            EvalValue::Null,
            EvalValue::from(""),
            EvalValue::from("short"),
            EvalValue::from(long),
            EvalValue::Reference("CN=A,DC=x".into()),
            EvalValue::Reference("not a dn".into()),
            EvalValue::Integer(-4),
            EvalValue::Boolean(true),
            EvalValue::Binary(vec![1, 2, 3]),
            EvalValue::Decimal(value::Decimal::new(125, 2).unwrap()),
            EvalValue::DateTime(chrono::DateTime::UNIX_EPOCH),
            EvalValue::Structured(vec![role]),
            EvalValue::Multi(vec![
                EvalValue::from("a"),
                EvalValue::from(long),
                EvalValue::Integer(1),
                EvalValue::Binary(vec![9]),
                EvalValue::Reference("CN=B,DC=x".into()),
            ]),
            EvalValue::Multi(vec![EvalValue::Multi(vec![
                EvalValue::from("x"),
                EvalValue::from("y"),
            ])]),
        ];
        for v in samples {
            for reference in [false, true] {
                assert_eq!(
                    into_model(v.clone(), reference),
                    to_model(&v, reference),
                    "{v:?} reference={reference}"
                );
            }
        }
    }
}
