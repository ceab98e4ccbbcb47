//! The syntax tree of an expression as written (spec §3): every node carries its span, function
//! names are kept as spelled, groups are kept.
//!
//! Nothing here resolves names or checks arity — that is `compile`'s job — and nothing evaluates.

use std::fmt;

use crate::rules::diagnostic::Span;

/// One node of the syntax tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expr {
    /// What the node is.
    pub kind: ExprKind,
    /// The text it was parsed from.
    pub span: Span,
}

/// The kinds of syntax node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExprKind {
    /// `Name(slot, slot, …)`; `None` slots were left empty (argument omitted).
    Call {
        /// The function name as written (resolution is case-insensitive and done by `compile`).
        func_name: String,
        /// The span of the name alone.
        func_span: Span,
        /// The slots; `F()` has none, `F(x, )` has two.
        args: Vec<Option<Expr>>,
    },
    /// `[name]`, the name with surrounding whitespace removed (never empty, never containing `]`).
    Attribute(String),
    /// A string literal, escapes resolved.
    String(String),
    /// A decimal or `&H` hexadecimal integer literal.
    Integer(i64),
    /// A decimal fraction literal, kept exactly.
    Decimal(Decimal),
    /// `True` / `False`.
    Boolean(bool),
    /// `Null` / `Nothing`.
    Null,
    /// `vbBinaryCompare` / `vbTextCompare`.
    CompareMode(CompareMode),
    /// `lhs op rhs`.
    Compare {
        /// The operator.
        op: CompareOp,
        /// Left operand.
        lhs: Box<Expr>,
        /// Right operand.
        rhs: Box<Expr>,
    },
    /// `( expr )`.
    Group(Box<Expr>),
}

/// An exact decimal fraction: the value is `mantissa × 10^-scale`.
///
/// The literal `42568.75` is `{ mantissa: 4256875, scale: 2 }`; `1.50` keeps its scale 2. Literals
/// from the parser always have `scale ≥ 1` and at most 38 digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Decimal {
    /// All digits as an integer, with the sign.
    pub mantissa: i128,
    /// Number of digits after the decimal point.
    pub scale: u32,
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.mantissa.unsigned_abs().to_string();
        let scale = self.scale as usize;
        let digits = if digits.len() <= scale {
            format!("{}{digits}", "0".repeat(scale + 1 - digits.len()))
        } else {
            digits
        };
        let (int, frac) = digits.split_at(digits.len() - scale);
        if self.mantissa < 0 {
            f.write_str("-")?;
        }
        if scale == 0 {
            write!(f, "{int}")
        } else {
            write!(f, "{int}.{frac}")
        }
    }
}

/// A comparison operator (spec §2.7); the evaluator's own type.
pub use crate::rules::value::CompareOp;

/// The comparison modes of `InStr` (spec §2.5, §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompareMode {
    /// `vbBinaryCompare`: exact, case-sensitive.
    Binary,
    /// `vbTextCompare`: case-insensitive.
    Text,
}

impl CompareMode {
    /// The constant's canonical name.
    pub fn name(self) -> &'static str {
        match self {
            CompareMode::Binary => "vbBinaryCompare",
            CompareMode::Text => "vbTextCompare",
        }
    }
}

impl Expr {
    /// Structural equality ignoring spans; function names compare case-insensitively (they
    /// resolve so, and the printer writes canonical spellings).
    pub fn same_as(&self, other: &Expr) -> bool {
        use ExprKind as K;
        match (&self.kind, &other.kind) {
            (
                K::Call {
                    func_name: a,
                    args: xs,
                    ..
                },
                K::Call {
                    func_name: b,
                    args: ys,
                    ..
                },
            ) => {
                a.eq_ignore_ascii_case(b)
                    && xs.len() == ys.len()
                    && xs.iter().zip(ys).all(|(x, y)| match (x, y) {
                        (Some(x), Some(y)) => x.same_as(y),
                        (None, None) => true,
                        _ => false,
                    })
            }
            (
                K::Compare {
                    op: o1,
                    lhs: l1,
                    rhs: r1,
                },
                K::Compare {
                    op: o2,
                    lhs: l2,
                    rhs: r2,
                },
            ) => o1 == o2 && l1.same_as(l2) && r1.same_as(r2),
            (K::Group(a), K::Group(b)) => a.same_as(b),
            (a, b) => a == b,
        }
    }
}
