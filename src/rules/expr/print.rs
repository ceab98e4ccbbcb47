//! The printer: [`Expr`] → canonical expression text.
//!
//! Canonical means: known functions in their canonical spelling, `name(a, b)` with `, ` between
//! slots, strings with `"` and `\` escaped, constants as `True`/`False`/`Null`/`vbBinaryCompare`/
//! `vbTextCompare`, integers in decimal, comparisons with a space on each side of the operator.
//! For every tree [`parse`](super::parse) produces, parsing the printed text gives the same tree
//! (ignoring spans). Trees the parser cannot produce print as their nearest parsable form: a call
//! with a single empty slot prints as `F()` (zero slots), and a comparison operand that is itself a
//! comparison is parenthesised.

use std::fmt;

use crate::rules::expr::ast::{Expr, ExprKind};
use crate::rules::function::Function;

/// Writes `s` as a string literal.
pub fn write_string_literal(f: &mut impl fmt::Write, s: &str) -> fmt::Result {
    f.write_char('"')?;
    for c in s.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            c => f.write_char(c)?,
        }
    }
    f.write_char('"')
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ExprKind::Call {
                func_name, args, ..
            } => {
                match Function::from_name(func_name) {
                    Some(func) => f.write_str(func.name())?,
                    None => f.write_str(func_name)?,
                }
                f.write_str("(")?;
                for (i, arg) in args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                        if arg.is_some() {
                            f.write_str(" ")?;
                        }
                    }
                    if let Some(arg) = arg {
                        write!(f, "{arg}")?;
                    }
                }
                f.write_str(")")
            }
            ExprKind::Attribute(name) => write!(f, "[{name}]"),
            ExprKind::String(s) => write_string_literal(f, s),
            ExprKind::Integer(i) => write!(f, "{i}"),
            ExprKind::Decimal(d) => write!(f, "{d}"),
            ExprKind::Boolean(true) => f.write_str("True"),
            ExprKind::Boolean(false) => f.write_str("False"),
            ExprKind::Null => f.write_str("Null"),
            ExprKind::CompareMode(m) => f.write_str(m.name()),
            ExprKind::Compare { op, lhs, rhs } => {
                write_operand(f, lhs)?;
                write!(f, " {} ", op.symbol())?;
                write_operand(f, rhs)
            }
            ExprKind::Group(inner) => write!(f, "({inner})"),
        }
    }
}

fn write_operand(f: &mut fmt::Formatter<'_>, e: &Expr) -> fmt::Result {
    if matches!(e.kind, ExprKind::Compare { .. }) {
        write!(f, "({e})")
    } else {
        write!(f, "{e}")
    }
}
