//! The parser: tokens → [`Expr`] (spec §3), hand-written recursive descent.
//!
//! It reports every problem it can find in one pass: after an error it resynchronises at the next
//! `,` or `)` of the enclosing call. It enforces the length (10,000 characters) and nesting (128
//! levels) limits and never panics. It does not resolve function names or check arity.

use crate::rules::diagnostic::{Code, Diagnostic, Diagnostics, Span};
use crate::rules::expr::ast::{CompareMode, Expr, ExprKind};
use crate::rules::expr::lexer::{lex, Token, TokenKind};
use crate::rules::function::Function;

/// Longest accepted expression, in characters (spec §2).
pub const MAX_LEN: usize = 10_000;
/// Deepest accepted nesting of calls and parentheses (spec §3).
pub const MAX_DEPTH: usize = 128;

/// Connect Sync literals and HR-guide names that are not constants here (spec §2.5, §11).
const FOREIGN_LITERALS: &[(&str, &str)] = &[
    ("IgnoreThisFlow", "a Connect Sync literal"),
    ("AuthoritativeNull", "a Connect Sync literal"),
    ("CRLF", "a Connect Sync literal"),
    (
        "IgnoreAttributeFlow",
        "a name used only in the Workday/SuccessFactors guides",
    ),
    (
        "IgnoreObjectFlow",
        "a name used only in the Workday/SuccessFactors guides",
    ),
];

/// Parses an expression. Returns every error found; never panics.
pub fn parse(text: &str) -> Result<Expr, Diagnostics> {
    let chars = text.chars().count();
    if chars > MAX_LEN {
        let start = text
            .char_indices()
            .nth(MAX_LEN)
            .map_or(text.len(), |(i, _)| i);
        return Err(Diagnostics(vec![Diagnostic::new(
            Code::ExpressionTooLong,
            Span::new(start, text.len()),
            format!("expression is {chars} characters long; the limit is {MAX_LEN}"),
        )
        .with_hint("split the logic over several attribute mappings")]));
    }
    let lexed = lex(text);
    let mut p = Parser {
        tokens: lexed.tokens,
        pos: 0,
        diagnostics: lexed.diagnostics,
        ran_off_end: lexed.ran_off_end,
    };
    let result = p.top();
    let mut diagnostics = p.diagnostics;
    diagnostics.sort_by_key(|d| (d.span.start, d.span.end));
    match result {
        Ok(expr) if diagnostics.is_empty() => Ok(expr),
        _ => Err(Diagnostics(diagnostics)),
    }
}

/// Raised when parsing cannot sensibly continue (nesting limit); the diagnostic is already recorded.
struct Abort;

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    diagnostics: Vec<Diagnostic>,
    ran_off_end: bool,
}

impl Parser {
    fn peek(&self) -> &Token {
        // The token list always ends with Eof and `pos` never passes it.
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn peek_kind(&self) -> &TokenKind {
        &self.peek().kind
    }

    fn nth_kind(&self, n: usize) -> &TokenKind {
        &self.tokens[(self.pos + n).min(self.tokens.len() - 1)].kind
    }

    fn bump(&mut self) -> Token {
        let t = self.peek().clone();
        if t.kind != TokenKind::Eof {
            self.pos += 1;
        }
        t
    }

    fn error(&mut self, d: Diagnostic) {
        self.diagnostics.push(d);
    }

    /// Reports an unexpected token or end of text (the latter only once, and not when the lexer
    /// already explained it).
    fn unexpected(&mut self, expected: &str, context: Option<(Span, &str)>) {
        let t = self.peek().clone();
        match t.kind {
            TokenKind::Eof => {
                if self.ran_off_end {
                    return;
                }
                self.ran_off_end = true;
                let mut d = Diagnostic::new(
                    Code::UnexpectedEnd,
                    t.span,
                    format!("unexpected end of expression: expected {expected}"),
                );
                if let Some((span, note)) = context {
                    d = d.with_label(span, note);
                }
                self.error(d);
            }
            TokenKind::BadOperand | TokenKind::BadOperator => {}
            ref kind => {
                let mut d = Diagnostic::new(
                    Code::UnexpectedToken,
                    t.span,
                    format!("expected {expected}, found {}", describe(kind)),
                );
                if let Some((span, note)) = context {
                    d = d.with_label(span, note);
                }
                if *kind == TokenKind::RParen {
                    d = d.with_hint("parentheses are unbalanced");
                }
                self.error(d);
            }
        }
    }

    fn top(&mut self) -> Result<Expr, Abort> {
        if *self.peek_kind() == TokenKind::Eof {
            let span = self.peek().span;
            if !self.ran_off_end {
                self.error(Diagnostic::new(
                    Code::UnexpectedEnd,
                    span,
                    "empty expression",
                ));
            }
            return Ok(placeholder(span));
        }
        let expr = self.expression(0)?;
        if *self.peek_kind() != TokenKind::Eof {
            let starts_operand = starts_operand(self.peek_kind());
            self.unexpected("the end of the expression", None);
            if starts_operand {
                if let Some(d) = self.diagnostics.last_mut() {
                    if d.hint.is_none() {
                        d.hint = Some(
                            "two operands in a row: to concatenate use `Join(\"\", a, b)` or `Append(a, b)`"
                                .into(),
                        );
                    }
                }
            }
        }
        Ok(expr)
    }

    /// `expression = operand [ compare-op operand ]`.
    fn expression(&mut self, depth: usize) -> Result<Expr, Abort> {
        let lhs = self.operand_with_bad_operators(depth)?;
        let TokenKind::Compare(op) = *self.peek_kind() else {
            return Ok(lhs);
        };
        self.bump();
        let rhs = self.operand_with_bad_operators(depth)?;
        let span = lhs.span.to(rhs.span);
        if let TokenKind::Compare(_) = self.peek_kind() {
            let second = self.peek().span;
            let mut end = span;
            while let TokenKind::Compare(_) = self.peek_kind() {
                self.bump();
                end = end.to(self.operand_with_bad_operators(depth)?.span);
            }
            self.error(
                Diagnostic::new(
                    Code::ChainedComparison,
                    span.to(end),
                    "comparisons cannot be chained: a comparison takes exactly two operands",
                )
                .with_label(second, "second comparison operator")
                .with_hint(
                    "compare two values at a time and combine the results with nested `IIF`",
                ),
            );
        }
        Ok(Expr {
            kind: ExprKind::Compare {
                op,
                lhs: Box::new(lhs),
                rhs: Box::new(rhs),
            },
            span,
        })
    }

    /// An operand, absorbing already-reported unsupported operators (`a & b`, `-[x]`) so that they
    /// do not cause further errors.
    fn operand_with_bad_operators(&mut self, depth: usize) -> Result<Expr, Abort> {
        let mut had_bad = false;
        let start = self.peek().span;
        while *self.peek_kind() == TokenKind::BadOperator {
            self.bump();
            had_bad = true;
        }
        let mut expr = self.operand(depth)?;
        while *self.peek_kind() == TokenKind::BadOperator {
            self.bump();
            had_bad = true;
            let rhs = self.operand(depth)?;
            expr = placeholder(expr.span.to(rhs.span));
        }
        if had_bad {
            expr = placeholder(start.to(expr.span));
        }
        Ok(expr)
    }

    fn operand(&mut self, depth: usize) -> Result<Expr, Abort> {
        let t = self.peek().clone();
        let kind = match t.kind {
            TokenKind::Str(s) => ExprKind::String(s),
            TokenKind::Attr(a) => ExprKind::Attribute(a),
            TokenKind::Int(i) => ExprKind::Integer(i),
            TokenKind::Dec(d) => ExprKind::Decimal(d),
            TokenKind::BadOperand => {
                self.bump();
                return Ok(placeholder(t.span));
            }
            TokenKind::Ident(name) => {
                if *self.nth_kind(1) == TokenKind::LParen {
                    return self.call(name, t.span, depth);
                }
                self.bump();
                return Ok(self.constant(&name, t.span));
            }
            TokenKind::LParen => return self.group(depth),
            TokenKind::Compare(_) => {
                // A missing left operand: report it and read the right one, so that it does not
                // cause a second error.
                self.unexpected("an expression", None);
                self.bump();
                if !starts_operand(self.peek_kind()) {
                    return Ok(placeholder(t.span));
                }
                let rhs = self.operand_with_bad_operators(depth)?;
                return Ok(placeholder(t.span.to(rhs.span)));
            }
            _ => {
                self.unexpected("an expression", None);
                // Do not consume `,` or `)`: the enclosing call resynchronises on them.
                if !matches!(
                    self.peek_kind(),
                    TokenKind::Comma | TokenKind::RParen | TokenKind::Eof
                ) {
                    self.bump();
                }
                return Ok(placeholder(t.span));
            }
        };
        self.bump();
        Ok(Expr { kind, span: t.span })
    }

    fn enter(&mut self, depth: usize, span: Span) -> Result<usize, Abort> {
        let depth = depth + 1;
        if depth > MAX_DEPTH {
            self.error(
                Diagnostic::new(
                    Code::NestingTooDeep,
                    span,
                    format!("calls and parentheses are nested more than {MAX_DEPTH} levels deep"),
                )
                .with_hint("simplify the expression"),
            );
            return Err(Abort);
        }
        Ok(depth)
    }

    fn group(&mut self, depth: usize) -> Result<Expr, Abort> {
        let open = self.bump().span;
        let depth = self.enter(depth, open)?;
        let inner = self.expression(depth)?;
        let end = if *self.peek_kind() == TokenKind::RParen {
            self.bump().span
        } else {
            self.unexpected("`)`", Some((open, "to close this parenthesis")));
            self.skip_to_close();
            inner.span
        };
        Ok(Expr {
            span: open.to(end),
            kind: ExprKind::Group(Box::new(inner)),
        })
    }

    /// Skips tokens up to and including the `)` closing the current level (or to the end).
    fn skip_to_close(&mut self) {
        let mut level = 0usize;
        loop {
            match self.peek_kind() {
                TokenKind::Eof => return,
                TokenKind::LParen => level += 1,
                TokenKind::RParen if level == 0 => {
                    self.bump();
                    return;
                }
                TokenKind::RParen => level -= 1,
                _ => {}
            }
            self.bump();
        }
    }

    /// Skips to the next `,` or `)` of the current level, without consuming it.
    fn skip_to_separator(&mut self) {
        let mut level = 0usize;
        loop {
            match self.peek_kind() {
                TokenKind::Eof => return,
                TokenKind::Comma | TokenKind::RParen if level == 0 => return,
                TokenKind::LParen => level += 1,
                TokenKind::RParen => level -= 1,
                _ => {}
            }
            self.bump();
        }
    }

    fn call(&mut self, func_name: String, func_span: Span, depth: usize) -> Result<Expr, Abort> {
        self.bump(); // name
        let open = self.bump().span; // `(`
        let depth = self.enter(depth, func_span.to(open))?;
        let mut args = Vec::new();
        let end;
        if *self.peek_kind() == TokenKind::RParen {
            end = self.bump().span;
        } else {
            loop {
                let slot = match self.peek_kind() {
                    TokenKind::Comma | TokenKind::RParen => None,
                    TokenKind::Eof => {
                        self.unexpected("an argument or `)`", Some((open, "to close this call")));
                        end = self.peek().span;
                        break;
                    }
                    _ => Some(self.expression(depth)?),
                };
                args.push(slot);
                match self.peek_kind() {
                    TokenKind::Comma => {
                        self.bump();
                    }
                    TokenKind::RParen => {
                        end = self.bump().span;
                        break;
                    }
                    TokenKind::Eof => {
                        self.unexpected("`,` or `)`", Some((open, "to close this call")));
                        end = self.peek().span;
                        break;
                    }
                    kind => {
                        let missing_comma = starts_operand(kind);
                        self.unexpected(
                            "`,` or `)` after the argument",
                            Some((open, "in the call opened here")),
                        );
                        if missing_comma {
                            // Carry on as if the comma were there.
                            if let Some(d) = self.diagnostics.last_mut() {
                                if d.hint.is_none() {
                                    d.hint = Some(
                                        "arguments are separated by `,`; to concatenate use `Join` or `Append`"
                                            .into(),
                                    );
                                }
                            }
                            continue;
                        }
                        self.skip_to_separator();
                        if *self.peek_kind() == TokenKind::Comma {
                            self.bump();
                            continue;
                        }
                        if *self.peek_kind() == TokenKind::RParen {
                            end = self.bump().span;
                        } else {
                            end = self.peek().span;
                        }
                        break;
                    }
                }
            }
        }
        Ok(Expr {
            span: func_span.to(end),
            kind: ExprKind::Call {
                func_name,
                func_span,
                args,
            },
        })
    }

    fn constant(&mut self, name: &str, span: Span) -> Expr {
        let kind = match name.to_ascii_lowercase().as_str() {
            "true" => ExprKind::Boolean(true),
            "false" => ExprKind::Boolean(false),
            "null" | "nothing" => ExprKind::Null,
            "vbbinarycompare" => ExprKind::CompareMode(CompareMode::Binary),
            "vbtextcompare" => ExprKind::CompareMode(CompareMode::Text),
            _ => {
                self.error(unknown_identifier(name, span));
                return placeholder(span);
            }
        };
        Expr { kind, span }
    }
}

fn unknown_identifier(name: &str, span: Span) -> Diagnostic {
    let mut d = Diagnostic::new(
        Code::UnknownIdentifier,
        span,
        format!("unknown identifier `{name}`"),
    );
    if let Some((lit, what)) = FOREIGN_LITERALS
        .iter()
        .find(|(lit, _)| lit.eq_ignore_ascii_case(name))
    {
        d.message = format!("`{lit}` is {what} and is not supported");
        d = d.with_hint(match *lit {
            "CRLF" => "write the characters inside a string literal",
            "AuthoritativeNull" => "use `Null` for no value",
            _ => "wrap the expression in `IgnoreFlowIfNullOrEmpty(…)` to skip the flow when it has no value",
        });
    } else if let Some(f) = Function::from_name(name) {
        d = d.with_hint(format!(
            "`{}` is a function: call it with parentheses, e.g. `{}(…)`",
            f.name(),
            f.name()
        ));
    } else if let Some(c) = super::closest(
        name,
        [
            "True",
            "False",
            "Null",
            "Nothing",
            "vbBinaryCompare",
            "vbTextCompare",
        ],
    ) {
        d = d.with_hint(format!("did you mean `{c}`?"));
    } else {
        d = d.with_hint(
            "bare words are not allowed: write attributes as `[name]` and text as `\"text\"`; the constants are True, False, Null, Nothing, vbBinaryCompare, vbTextCompare",
        );
    }
    d
}

fn starts_operand(kind: &TokenKind) -> bool {
    matches!(
        kind,
        TokenKind::Str(_)
            | TokenKind::Attr(_)
            | TokenKind::Int(_)
            | TokenKind::Dec(_)
            | TokenKind::Ident(_)
            | TokenKind::LParen
            | TokenKind::BadOperand
    )
}

fn describe(kind: &TokenKind) -> String {
    match kind {
        TokenKind::LParen => "`(`".into(),
        TokenKind::RParen => "`)`".into(),
        TokenKind::Comma => "`,`".into(),
        TokenKind::Compare(op) => format!("`{}`", op.symbol()),
        TokenKind::Str(_) => "a string literal".into(),
        TokenKind::Attr(a) => format!("attribute reference `[{a}]`"),
        TokenKind::Int(_) | TokenKind::Dec(_) => "a number".into(),
        TokenKind::Ident(i) => format!("`{i}`"),
        TokenKind::BadOperand | TokenKind::BadOperator => "an invalid token".into(),
        TokenKind::Eof => "the end of the expression".into(),
    }
}

/// A stand-in node used after an error; never returned from [`parse`].
fn placeholder(span: Span) -> Expr {
    Expr {
        kind: ExprKind::Null,
        span,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::expr::ast::{CompareOp, Decimal};

    fn ok(text: &str) -> Expr {
        match parse(text) {
            Ok(e) => e,
            Err(d) => panic!("{text}: {d}"),
        }
    }

    fn errs(text: &str) -> Vec<(Code, (usize, usize))> {
        match parse(text) {
            Ok(e) => panic!("{text} parsed as {e:?}"),
            Err(d) => d.iter().map(|d| (d.code, d.span.line_col(text))).collect(),
        }
    }

    fn slots(e: &Expr) -> Vec<Option<String>> {
        match &e.kind {
            ExprKind::Call { args, .. } => args
                .iter()
                .map(|a| a.as_ref().map(|a| a.to_string()))
                .collect(),
            other => panic!("not a call: {other:?}"),
        }
    }

    #[test]
    fn operands() {
        assert_eq!(ok("[mail]").kind, ExprKind::Attribute("mail".into()));
        assert_eq!(
            ok("[ urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber ]")
                .kind,
            ExprKind::Attribute(
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber".into()
            )
        );
        assert_eq!(ok("\"\"").kind, ExprKind::String(String::new()));
        assert_eq!(ok("-10").kind, ExprKind::Integer(-10));
        assert_eq!(ok("&H21C07000").kind, ExprKind::Integer(0x21C0_7000));
        assert_eq!(
            ok("42568.75").kind,
            ExprKind::Decimal(Decimal {
                mantissa: 4_256_875,
                scale: 2
            })
        );
        assert_eq!(ok("true").kind, ExprKind::Boolean(true));
        assert_eq!(ok("FALSE").kind, ExprKind::Boolean(false));
        assert_eq!(ok("Nothing").kind, ExprKind::Null);
        assert_eq!(ok("null").kind, ExprKind::Null);
        assert_eq!(
            ok("VBTEXTCOMPARE").kind,
            ExprKind::CompareMode(CompareMode::Text)
        );
        assert_eq!(
            ok("vbBinaryCompare").kind,
            ExprKind::CompareMode(CompareMode::Binary)
        );
    }

    #[test]
    fn slots_and_spans() {
        let e = ok("Join (\",\", [a], [b])");
        assert_eq!(e.span, Span::new(0, 20));
        match &e.kind {
            ExprKind::Call {
                func_name,
                func_span,
                args,
            } => {
                assert_eq!(func_name, "Join");
                assert_eq!(*func_span, Span::new(0, 4));
                assert_eq!(args.len(), 3);
                assert_eq!(args[1].as_ref().map(|a| a.span), Some(Span::new(11, 14)));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(slots(&ok("Now()")), Vec::<Option<String>>::new());
        assert_eq!(slots(&ok("Now( \n )")), Vec::<Option<String>>::new());
        assert_eq!(slots(&ok("F([x], )")), vec![Some("[x]".into()), None]);
        assert_eq!(
            slots(&ok("F(, , [x])")),
            vec![None, None, Some("[x]".into())]
        );
        assert_eq!(slots(&ok("F(,)")), vec![None, None]);
        assert_eq!(
            slots(&ok("Replace([x], , \"re\", , \"\", , )")),
            vec![
                Some("[x]".into()),
                None,
                Some("\"re\"".into()),
                None,
                Some("\"\"".into()),
                None,
                None
            ]
        );
    }

    #[test]
    fn comparisons_and_groups() {
        let e = ok("IIF([a] <> \"x\", 1, 2)");
        match &e.kind {
            ExprKind::Call { args, .. } => match &args[0].as_ref().map(|a| &a.kind) {
                Some(ExprKind::Compare { op, lhs, rhs }) => {
                    assert_eq!(*op, CompareOp::Ne);
                    assert_eq!(lhs.kind, ExprKind::Attribute("a".into()));
                    assert_eq!(rhs.kind, ExprKind::String("x".into()));
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        for (text, op) in [
            ("1 = 2", CompareOp::Eq),
            ("1<2", CompareOp::Lt),
            ("1 <= 2", CompareOp::Le),
            ("1>2", CompareOp::Gt),
            ("1 >= 2", CompareOp::Ge),
            ("[a]=-1", CompareOp::Eq),
        ] {
            assert!(
                matches!(ok(text).kind, ExprKind::Compare { op: o, .. } if o == op),
                "{text}"
            );
        }
        let e = ok("(([a] = 1)) = True");
        match e.kind {
            ExprKind::Compare { lhs, .. } => {
                assert!(matches!(lhs.kind, ExprKind::Group(_)));
                assert_eq!(lhs.span, Span::new(0, 11));
            }
            other => panic!("{other:?}"),
        }
        // A bare comparison, literal or attribute is a whole rule.
        ok("[a] = [b]");
        ok("\"constant\"");
    }

    #[test]
    fn multi_line_and_whitespace() {
        let text = "Switch([country],\n\t\"Unknown\",\r\n\t\"DE\", \"Germany\"\n)";
        assert_eq!(slots(&ok(text)).len(), 4);
        assert_eq!(
            errs("Join(\",\",\n  [a]\n  [b])"),
            vec![(Code::UnexpectedToken, (3, 3))]
        );
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(errs(""), vec![(Code::UnexpectedEnd, (1, 1))]);
        assert_eq!(errs("  "), vec![(Code::UnexpectedEnd, (1, 3))]);
        assert_eq!(
            errs("Join(\",\", [a]"),
            vec![(Code::UnexpectedEnd, (1, 14))]
        );
        assert_eq!(errs("([a]"), vec![(Code::UnexpectedEnd, (1, 5))]);
        assert_eq!(errs("[a] = "), vec![(Code::UnexpectedEnd, (1, 7))]);
        assert_eq!(errs("[a])"), vec![(Code::UnexpectedToken, (1, 4))]);
        assert_eq!(errs("[a] [b]"), vec![(Code::UnexpectedToken, (1, 5))]);
        assert_eq!(errs("= 1"), vec![(Code::UnexpectedToken, (1, 1))]);
        assert_eq!(errs("F(=)"), vec![(Code::UnexpectedToken, (1, 3))]);
        assert_eq!(
            errs("[a] = [b] = [c]"),
            vec![(Code::ChainedComparison, (1, 1))]
        );
        assert_eq!(errs("Ture"), vec![(Code::UnknownIdentifier, (1, 1))]);
        // An unterminated string is not reported a second time as an unexpected end.
        assert_eq!(
            errs("Join(\",\", \"x)"),
            vec![(Code::UnterminatedString, (1, 11))]
        );
    }

    #[test]
    fn reports_every_error() {
        let text = "IIF([a] & [b], $x,\n  Join(\",\" [c] 1e5))";
        assert_eq!(
            errs(text),
            vec![
                (Code::UnsupportedOperator, (1, 9)),
                (Code::ParameterOrVariable, (1, 16)),
                (Code::UnexpectedToken, (2, 12)),
                (Code::MalformedNumber, (2, 16)),
            ]
        );
    }

    #[test]
    fn unknown_identifier_hints() {
        let hint = |text: &str| parse(text).err().and_then(|d| d.0[0].hint.clone());
        let msg = |text: &str| parse(text).err().map(|d| d.0[0].message.clone());
        assert_eq!(hint("Ture").as_deref(), Some("did you mean `True`?"));
        assert!(msg("IgnoreThisFlow").is_some_and(|m| m.contains("Connect Sync literal")));
        assert!(msg("crlf").is_some_and(|m| m.contains("`CRLF` is a Connect Sync literal")));
        assert!(msg("IgnoreObjectFlow").is_some_and(|m| m.contains("guides")));
        assert!(hint("Now").is_some_and(|h| h.contains("call it with parentheses")));
    }

    #[test]
    fn limits() {
        let deep = |n: usize| format!("{}[a]{}", "CStr(".repeat(n), ")".repeat(n));
        ok(&deep(MAX_DEPTH));
        assert_eq!(
            errs(&deep(MAX_DEPTH + 1)),
            vec![(Code::NestingTooDeep, (1, 5 * MAX_DEPTH + 1))]
        );
        let groups = format!(
            "{}1{}",
            "(".repeat(MAX_DEPTH + 1),
            ")".repeat(MAX_DEPTH + 1)
        );
        assert_eq!(errs(&groups)[0].0, Code::NestingTooDeep);
        // Very deep input is rejected without exhausting the stack.
        let huge = "(".repeat(9_000);
        assert_eq!(errs(&huge)[0].0, Code::NestingTooDeep);

        let long = format!("\"{}\"", "é".repeat(MAX_LEN - 2));
        ok(&long);
        let too_long = format!("\"{}\"", "é".repeat(MAX_LEN - 1));
        assert_eq!(
            errs(&too_long),
            vec![(Code::ExpressionTooLong, (1, MAX_LEN + 1))]
        );
    }
}
