//! The front end of the expression language (spec §2, §3, §3.1): lexer, parser to a spanned
//! syntax tree, printer, and the checker that compiles a tree into the resolved form the evaluator
//! walks.
//!
//! Pipeline: [`parse`] (text → [`Expr`], every syntax error reported) → [`check`] (name, arity,
//! position and literal checks → [`CompiledExpr`]); [`compile()`] does both. Nothing here evaluates
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

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::rules::diagnostic::{Origin, Span};
    use crate::rules::function::Function;
    use proptest::prelude::*;

    fn e(kind: ExprKind) -> Expr {
        Expr {
            kind,
            span: Span::default(),
        }
    }

    fn leaf() -> impl Strategy<Value = Expr> {
        prop_oneof![
            "[A-Za-z_][A-Za-z0-9_ .:/@-]{0,12}"
                .prop_map(|s| e(ExprKind::Attribute(s.trim().to_string()))),
            "(\\PC|[\"\\\\\n\t\u{201C}])*".prop_map(|s| e(ExprKind::String(s))),
            any::<i64>().prop_map(|i| e(ExprKind::Integer(i))),
            (any::<i64>(), 1u32..8).prop_map(|(m, scale)| e(ExprKind::Decimal(Decimal {
                mantissa: i128::from(m),
                scale
            }))),
            any::<bool>().prop_map(|b| e(ExprKind::Boolean(b))),
            Just(e(ExprKind::Null)),
            prop_oneof![Just(CompareMode::Binary), Just(CompareMode::Text)]
                .prop_map(|m| e(ExprKind::CompareMode(m))),
        ]
    }

    fn func_name() -> impl Strategy<Value = String> {
        let names: Vec<&'static str> = Function::ALL.iter().map(|f| f.name()).collect();
        prop_oneof![
            (prop::sample::select(names), any::<u64>()).prop_map(|(n, bits)| {
                n.chars()
                    .enumerate()
                    .map(|(i, c)| {
                        if bits >> (i % 64) & 1 == 1 {
                            c.to_ascii_uppercase()
                        } else {
                            c.to_ascii_lowercase()
                        }
                    })
                    .collect()
            }),
            "[A-Za-z_][A-Za-z0-9_]{0,8}",
        ]
    }

    fn not_compare(x: Expr) -> Expr {
        if matches!(x.kind, ExprKind::Compare { .. }) {
            e(ExprKind::Group(Box::new(x)))
        } else {
            x
        }
    }

    fn op() -> impl Strategy<Value = CompareOp> {
        prop::sample::select(vec![
            CompareOp::Eq,
            CompareOp::Ne,
            CompareOp::Lt,
            CompareOp::Le,
            CompareOp::Gt,
            CompareOp::Ge,
        ])
    }

    /// Trees the parser can produce (a call never has exactly one empty slot; comparison operands
    /// are not comparisons).
    fn tree() -> impl Strategy<Value = Expr> {
        leaf().prop_recursive(5, 48, 5, |inner| {
            prop_oneof![
                (
                    func_name(),
                    prop::collection::vec(prop::option::weighted(0.8, inner.clone()), 0..6)
                )
                    .prop_filter("one empty slot prints as zero slots", |(_, a)| {
                        !(a.len() == 1 && a[0].is_none())
                    })
                    .prop_map(|(func_name, args)| e(ExprKind::Call {
                        func_name,
                        func_span: Span::default(),
                        args
                    })),
                (op(), inner.clone(), inner.clone()).prop_map(|(op, l, r)| e(ExprKind::Compare {
                    op,
                    lhs: Box::new(not_compare(l)),
                    rhs: Box::new(not_compare(r)),
                })),
                inner.prop_map(|x| e(ExprKind::Group(Box::new(x)))),
            ]
        })
    }

    fn token_soup() -> impl Strategy<Value = String> {
        let pieces = vec![
            "IIF(",
            "Join(",
            "Replace(",
            "Switch(",
            "Redact(",
            "IgnoreFlowIfNullOrEmpty(",
            "SelectUniqueValue(",
            "DateAdd(",
            "RandomString(",
            "InStr(",
            "Coalese(",
            "Left(",
            "AppRoleAssignmentsComplex(",
            "[appRoleAssignments]",
            "(",
            ")",
            ",",
            ", ",
            "[a]",
            "\"x\"",
            "\"",
            "\\",
            "1",
            "-1",
            "4.5",
            "&H1F",
            "=",
            "<>",
            "<",
            ">=",
            "&",
            "+",
            "Null",
            "vbTextCompare",
            "Ture",
            "$v",
            "%P%",
            "“",
            "\n",
            "\t",
            "é",
            "[",
            "]",
            "\"ww\"",
        ];
        prop::collection::vec(prop::sample::select(pieces), 0..30).prop_map(|v| v.concat())
    }

    fn exercise(text: &str) {
        let origin = Origin::default();
        match compile(text) {
            Ok(c) => {
                for w in &c.warnings {
                    let _ = w.render(text, &origin);
                }
            }
            Err(ds) => {
                assert!(ds.has_errors(), "{text:?}");
                for d in ds.iter() {
                    assert!(
                        d.span.start <= d.span.end && d.span.end <= text.len(),
                        "{d:?}"
                    );
                    let _ = d.render(text, &origin);
                }
            }
        }
        if let Ok(parsed) = parse(text) {
            let printed = parsed.to_string();
            let reparsed = parse(&printed);
            assert!(
                reparsed.as_ref().is_ok_and(|r| r.same_as(&parsed)),
                "{text:?} printed as {printed:?} reparsed as {reparsed:?}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics_on_any_text(text in "\\PC*") {
            exercise(&text);
        }

        #[test]
        fn never_panics_on_any_string(text in any::<String>()) {
            exercise(&text);
        }

        #[test]
        fn never_panics_on_token_alphabet(text in "[\\[\\]\"(),=<>&H0-9a-zA-Z \\\\]*") {
            exercise(&text);
        }

        #[test]
        fn never_panics_on_token_soup(text in token_soup()) {
            exercise(&text);
        }

        #[test]
        fn print_then_parse_is_identity(tree in tree()) {
            let printed = tree.to_string();
            let parsed = parse(&printed);
            prop_assert!(
                parsed.as_ref().is_ok_and(|p| p.same_as(&tree)),
                "{:?} printed as {:?} parsed as {:?}", tree, printed, parsed
            );
            // Printing is canonical: a second round gives the same text.
            if let Ok(p) = parsed {
                prop_assert_eq!(p.to_string(), printed);
            }
        }
    }
}
