//! Runs the data-driven diagnostic cases of `tests/rules/diagnostics.txt`: every case must produce
//! a diagnostic with the stated code at the stated line and column, and every code must be covered.
#![allow(clippy::expect_used, clippy::unwrap_used)] // a malformed case file should stop the test loudly

use dirsync::rules::diagnostic::{Code, Diagnostic, Origin};
use dirsync::rules::eval::FunctionLiteralChecks;
use dirsync::rules::expr::compile_with;

const CASES: &str = include_str!("rules/diagnostics.txt");

struct Case {
    header_line: usize,
    code: String,
    line: usize,
    col: usize,
    text: String,
}

/// Expands `{{N*text}}`.
fn expand(mut body: &str) -> String {
    let mut out = String::new();
    while let Some(open) = body.find("{{") {
        out.push_str(&body[..open]);
        let rest = &body[open + 2..];
        let close = rest.find("}}").expect("unclosed {{");
        let (count, piece) = rest[..close].split_once('*').expect("{{N*text}}");
        out.push_str(&piece.repeat(count.parse().expect("repeat count")));
        body = &rest[close + 2..];
    }
    out.push_str(body);
    out
}

fn cases() -> Vec<Case> {
    let mut cases: Vec<Case> = Vec::new();
    let mut body: Option<Vec<&str>> = None;
    let finish = |cases: &mut Vec<Case>, body: &mut Option<Vec<&str>>| {
        if let (Some(lines), Some(case)) = (body.take(), cases.last_mut()) {
            case.text = expand(&lines.join("\n"));
        }
    };
    for (i, line) in CASES.lines().enumerate() {
        if let Some(header) = line.strip_prefix("=== ") {
            finish(&mut cases, &mut body);
            let mut words = header.split_whitespace();
            let code = words.next().expect("code").to_string();
            let (l, c) = words
                .next()
                .and_then(|p| p.split_once(':'))
                .expect("LINE:COL");
            cases.push(Case {
                header_line: i + 1,
                code,
                line: l.parse().expect("line"),
                col: c.parse().expect("col"),
                text: String::new(),
            });
            body = Some(Vec::new());
        } else if let Some(lines) = body.as_mut() {
            lines.push(line);
        }
    }
    finish(&mut cases, &mut body);
    cases
}

fn diagnostics(text: &str) -> Vec<Diagnostic> {
    // The full compile: the front end's checks plus the function library's literal checks.
    match compile_with(text, &[&FunctionLiteralChecks]) {
        Ok(compiled) => compiled.warnings,
        Err(ds) => ds.0,
    }
}

#[test]
fn every_case_produces_its_diagnostic() {
    let cases = cases();
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let found = diagnostics(&case.text);
        let hit = found.iter().any(|d| {
            d.code.as_str() == case.code && d.span.line_col(&case.text) == (case.line, case.col)
        });
        if !hit {
            let got: Vec<String> = found
                .iter()
                .map(|d| {
                    let (l, c) = d.span.line_col(&case.text);
                    format!("{} {l}:{c} {}", d.code, d.message)
                })
                .collect();
            failures.push(format!(
                "diagnostics.txt:{}: expected {} at {}:{}, got {:?}",
                case.header_line, case.code, case.line, case.col, got
            ));
        }
        // Rendering works for every case.
        for d in &found {
            let rendered = d.render(&case.text, &Origin::default());
            assert!(rendered.contains(&d.code.as_str()), "{rendered}");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_code_has_a_case() {
    let cases = cases();
    let missing: Vec<String> = Code::ALL
        .iter()
        .map(|c| c.as_str())
        .filter(|c| !cases.iter().any(|case| &case.code == c))
        .collect();
    assert!(missing.is_empty(), "codes without a case: {missing:?}");
    for case in &cases {
        assert!(
            Code::from_str_code(&case.code).is_some(),
            "diagnostics.txt:{}: unknown code {}",
            case.header_line,
            case.code
        );
    }
}
