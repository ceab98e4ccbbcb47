//! The front end of the expression language (spec §2, §3, §3.1): lexer, parser to a spanned
//! syntax tree, printer, and the checker that compiles a tree into the resolved form the evaluator
//! walks.
//!
//! Pipeline: [`parse`] (text → [`Expr`], every syntax error reported) → [`check`] (name, arity,
//! position and literal checks → [`CompiledExpr`]); [`compile`] does both. Nothing here evaluates
//! an expression or touches values; the module is pure and never panics on any input.

pub mod ast;
pub mod compile;
pub mod lexer;
pub mod parser;
pub mod print;

pub use ast::{CompareMode, CompareOp, Decimal, Expr, ExprKind};
pub use compile::{
    check, check_with, compile, compile_with, CompiledExpr, Literal, LiteralCheck, Node,
    ReplaceMode, StandardChecks,
};
pub use parser::{parse, MAX_DEPTH, MAX_LEN};

/// Edit distance between two strings (Levenshtein with adjacent transpositions counting one
/// edit), by Unicode scalar values, ASCII case ignored.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().map(|c| c.to_ascii_lowercase()).collect();
    let b: Vec<char> = b.chars().map(|c| c.to_ascii_lowercase()).collect();
    // Three rolling rows: i-2, i-1, i.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 0..a.len() {
        cur[0] = i + 1;
        for j in 0..b.len() {
            let mut d = (prev[j] + usize::from(a[i] != b[j]))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
            if i > 0 && j > 0 && a[i] == b[j - 1] && a[i - 1] == b[j] {
                d = d.min(before[j - 1] + 1);
            }
            cur[j + 1] = d;
        }
        std::mem::swap(&mut before, &mut prev);
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// The candidate closest to `name` by [`edit_distance`], if it is close enough to be a plausible
/// typo (at most a third of the name's length, and at least 1, edits). Ties go to the first.
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = edit_distance(name, c);
        if d <= limit && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::function::Function;

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("Coalese", "Coalesce"), 1);
        assert_eq!(edit_distance("Ture", "True"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("IIF", "iif"), 0);
        assert_eq!(
            closest("Coalese", Function::ALL.iter().map(|f| f.name())),
            Some("Coalesce")
        );
        assert_eq!(
            closest("ToLowr", Function::ALL.iter().map(|f| f.name())),
            Some("ToLower")
        );
        assert_eq!(
            closest("Frobnicate", Function::ALL.iter().map(|f| f.name())),
            None
        );
    }
}
