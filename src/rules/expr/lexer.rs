//! The lexer: expression text → tokens with byte spans (spec §2).
//!
//! It never fails and never panics: a malformed piece of text becomes a diagnostic plus a *poison*
//! token ([`TokenKind::BadOperand`] or [`TokenKind::BadOperator`]) that lets the parser carry on
//! without reporting the same problem again. It does not know the grammar beyond deciding whether a
//! `-` or `+` starts a number (that depends on the previous token).

use crate::rules::diagnostic::{Code, Diagnostic, Span};
use crate::rules::expr::ast::{CompareOp, Decimal};

/// What a token is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenKind {
    /// `(`
    LParen,
    /// `)`
    RParen,
    /// `,`
    Comma,
    /// A comparison operator.
    Compare(CompareOp),
    /// A string literal, escapes resolved.
    Str(String),
    /// An attribute reference's name, trimmed and non-empty.
    Attr(String),
    /// An integer literal (decimal or `&H`).
    Int(i64),
    /// A decimal fraction literal.
    Dec(Decimal),
    /// An identifier (function name or constant).
    Ident(String),
    /// Something operand-shaped that was malformed and already reported.
    BadOperand,
    /// An unsupported operator, already reported.
    BadOperator,
    /// End of text.
    Eof,
}

/// A token and the text it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// What it is.
    pub kind: TokenKind,
    /// Where it is.
    pub span: Span,
}

/// The lexer's result.
#[derive(Debug, Clone, Default)]
pub struct Lexed {
    /// The tokens, always ending with [`TokenKind::Eof`].
    pub tokens: Vec<Token>,
    /// Problems found.
    pub diagnostics: Vec<Diagnostic>,
    /// Whether a construct ran to the end of the text unterminated (the parser then does not add
    /// an "unexpected end" for the same cause).
    pub ran_off_end: bool,
}

/// Splits `text` into tokens.
pub fn lex(text: &str) -> Lexed {
    let mut lx = Lexer {
        text,
        pos: 0,
        out: Lexed::default(),
    };
    lx.run();
    lx.out
}

struct Lexer<'a> {
    text: &'a str,
    pos: usize,
    out: Lexed,
}

const DOUBLE_QUOTES: &[char] = &['\u{201C}', '\u{201D}', '\u{201E}', '\u{201F}', '"'];
const SINGLE_QUOTES: &[char] = &['\'', '\u{2018}', '\u{2019}', '\u{201A}', '\u{201B}'];
const CONNECT_SYNC_OPERATOR_HINT: &str =
    "the expression language has no operators besides comparisons: use `Join(\"\", a, b)` or `Append(a, b)` to concatenate, nested `IIF` for and/or";

impl<'a> Lexer<'a> {
    fn peek(&self) -> Option<char> {
        self.text[self.pos..].chars().next()
    }

    fn peek_at(&self, n: usize) -> Option<char> {
        self.text[self.pos..].chars().nth(n)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn push(&mut self, kind: TokenKind, start: usize) {
        self.out.tokens.push(Token {
            kind,
            span: Span::new(start, self.pos),
        });
    }

    fn error(&mut self, d: Diagnostic) {
        self.out.diagnostics.push(d);
    }

    /// Whether the previous token ends an operand, which makes a following `-`/`+` an operator.
    fn after_operand(&self) -> bool {
        matches!(
            self.out.tokens.last().map(|t| &t.kind),
            Some(
                TokenKind::RParen
                    | TokenKind::Str(_)
                    | TokenKind::Attr(_)
                    | TokenKind::Int(_)
                    | TokenKind::Dec(_)
                    | TokenKind::Ident(_)
                    | TokenKind::BadOperand
            )
        )
    }

    fn run(&mut self) {
        while let Some(c) = self.peek() {
            let start = self.pos;
            match c {
                ' ' | '\t' | '\r' | '\n' => {
                    self.bump();
                }
                '(' => {
                    self.bump();
                    self.push(TokenKind::LParen, start);
                }
                ')' => {
                    self.bump();
                    self.push(TokenKind::RParen, start);
                }
                ',' => {
                    self.bump();
                    self.push(TokenKind::Comma, start);
                }
                '=' => {
                    self.bump();
                    if self.peek() == Some('=') {
                        self.bump();
                        self.operator_error(
                            start,
                            "`==`",
                            Some("comparison for equality is a single `=`"),
                        );
                    } else {
                        self.push(TokenKind::Compare(CompareOp::Eq), start);
                    }
                }
                '<' => {
                    self.bump();
                    let op = match self.peek() {
                        Some('>') => {
                            self.bump();
                            CompareOp::Ne
                        }
                        Some('=') => {
                            self.bump();
                            CompareOp::Le
                        }
                        _ => CompareOp::Lt,
                    };
                    self.push(TokenKind::Compare(op), start);
                }
                '>' => {
                    self.bump();
                    let op = if self.peek() == Some('=') {
                        self.bump();
                        CompareOp::Ge
                    } else {
                        CompareOp::Gt
                    };
                    self.push(TokenKind::Compare(op), start);
                }
                '!' if self.peek_at(1) == Some('=') => {
                    self.bump();
                    self.bump();
                    self.operator_error(start, "`!=`", Some("inequality is written `<>`"));
                }
                '"' => self.string(),
                '[' => self.attribute(),
                '0'..='9' => self.number(start, false),
                '-' if !self.after_operand()
                    && self.peek_at(1).is_some_and(|c| c.is_ascii_digit()) =>
                {
                    self.bump();
                    self.number(start, true);
                }
                '+' if !self.after_operand()
                    && self.peek_at(1).is_some_and(|c| c.is_ascii_digit()) =>
                {
                    self.bump();
                    self.number(start, false);
                    let span = Span::new(start, self.pos);
                    // The number itself was lexed (and its own problems reported); replace it by a
                    // poison token so that the `+` is reported once.
                    if let Some(last) = self.out.tokens.last_mut() {
                        last.kind = TokenKind::BadOperand;
                        last.span = span;
                    }
                    self.error(
                        Diagnostic::new(
                            Code::MalformedNumber,
                            span,
                            "a number cannot start with `+`",
                        )
                        .with_hint("remove the `+`"),
                    );
                }
                '.' if self.peek_at(1).is_some_and(|c| c.is_ascii_digit()) => {
                    self.bump();
                    self.consume_while(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
                    self.push(TokenKind::BadOperand, start);
                    let span = Span::new(start, self.pos);
                    self.error(
                        Diagnostic::new(
                            Code::MalformedNumber,
                            span,
                            "a decimal number needs digits before the `.`",
                        )
                        .with_hint(format!("write `0{}`", &self.text[start..self.pos])),
                    );
                }
                '&' => {
                    if matches!(self.peek_at(1), Some('H' | 'h')) {
                        self.hex(start);
                    } else {
                        self.bump();
                        let what = if self.peek() == Some('&') {
                            self.bump();
                            "`&&`"
                        } else {
                            "`&`"
                        };
                        self.operator_error(start, what, None);
                    }
                }
                '|' => {
                    self.bump();
                    let what = if self.peek() == Some('|') {
                        self.bump();
                        "`||`"
                    } else {
                        "`|`"
                    };
                    self.operator_error(start, what, None);
                }
                '+' | '-' | '*' | '/' => {
                    self.bump();
                    let what = format!("`{c}`");
                    self.operator_error(start, &what, None);
                }
                '%' | '$' => self.parameter_or_variable(start, c),
                c if DOUBLE_QUOTES.contains(&c) || SINGLE_QUOTES.contains(&c) => {
                    self.wrong_quote(start, c)
                }
                c if c.is_ascii_alphabetic() || c == '_' => {
                    self.consume_while(|c| c.is_ascii_alphanumeric() || c == '_');
                    let name = self.text[start..self.pos].to_string();
                    self.push(TokenKind::Ident(name), start);
                }
                other => {
                    self.bump();
                    let span = Span::new(start, self.pos);
                    let mut d = Diagnostic::new(
                        Code::UnexpectedCharacter,
                        span,
                        format!(
                            "unexpected character `{}` (U+{:04X})",
                            other.escape_debug(),
                            other as u32
                        ),
                    );
                    if other.is_whitespace() {
                        d = d.with_hint("only space, tab, CR and LF separate tokens");
                    } else if other.is_alphabetic() {
                        d = d.with_hint("identifiers are ASCII letters, digits and `_`; put text in a string literal");
                    }
                    self.error(d);
                }
            }
        }
        let end = self.text.len();
        self.out.tokens.push(Token {
            kind: TokenKind::Eof,
            span: Span::new(end, end),
        });
    }

    fn consume_while(&mut self, pred: impl Fn(char) -> bool) {
        while let Some(c) = self.peek() {
            if !pred(c) {
                break;
            }
            self.bump();
        }
    }

    fn operator_error(&mut self, start: usize, what: &str, hint: Option<&str>) {
        let span = Span::new(start, self.pos);
        self.push(TokenKind::BadOperator, start);
        self.error(
            Diagnostic::new(
                Code::UnsupportedOperator,
                span,
                format!("unsupported operator {what}"),
            )
            .with_hint(hint.unwrap_or(CONNECT_SYNC_OPERATOR_HINT)),
        );
    }

    fn string(&mut self) {
        let start = self.pos;
        self.bump();
        let mut value = String::new();
        loop {
            match self.bump() {
                None => {
                    let span = Span::new(start, self.pos);
                    self.push(TokenKind::BadOperand, start);
                    self.out.ran_off_end = true;
                    self.error(
                        Diagnostic::new(
                            Code::UnterminatedString,
                            span,
                            "unterminated string literal",
                        )
                        .with_hint(
                            "add the closing `\"`; a `\"` inside a string is written `\\\"`",
                        ),
                    );
                    return;
                }
                Some('"') => break,
                Some('\\') => match self.peek() {
                    Some(c @ ('"' | '\\')) => {
                        self.bump();
                        value.push(c);
                    }
                    // Any other backslash is kept with the character after it (spec §2.2).
                    _ => value.push('\\'),
                },
                Some(c) => value.push(c),
            }
        }
        self.push(TokenKind::Str(value), start);
    }

    fn wrong_quote(&mut self, start: usize, open: char) {
        self.bump();
        let family = if DOUBLE_QUOTES.contains(&open) {
            DOUBLE_QUOTES
        } else {
            SINGLE_QUOTES
        };
        let mut closed = false;
        while let Some(c) = self.bump() {
            if family.contains(&c) {
                closed = true;
                break;
            }
        }
        if !closed {
            self.out.ran_off_end = true;
        }
        let span = Span::new(start, self.pos);
        self.push(TokenKind::BadOperand, start);
        let what = if open == '\'' {
            "single quotes".to_string()
        } else {
            format!("the typographic quote `{open}` (U+{:04X})", open as u32)
        };
        let suggestion: String = {
            let inner = &self.text[start + open.len_utf8()..self.pos];
            let inner = inner
                .char_indices()
                .last()
                .filter(|(_, c)| closed && family.contains(c))
                .map_or(inner, |(i, _)| &inner[..i]);
            format!(
                "write \"{}\" with straight double quotes (U+0022)",
                inner.replace('\\', "\\\\").replace('"', "\\\"")
            )
        };
        self.error(
            Diagnostic::new(
                Code::WrongQuote,
                span,
                format!("string literals are delimited by straight double quotes, not {what}"),
            )
            .with_hint(suggestion),
        );
    }

    fn attribute(&mut self) {
        let start = self.pos;
        self.bump();
        let inner_start = self.pos;
        match self.text[self.pos..].find(']') {
            None => {
                self.pos = self.text.len();
                self.push(TokenKind::BadOperand, start);
                self.out.ran_off_end = true;
                self.error(
                    Diagnostic::new(
                        Code::UnterminatedAttribute,
                        Span::new(start, self.pos),
                        "attribute reference without closing `]`",
                    )
                    .with_hint("attribute references are written `[name]`"),
                );
            }
            Some(i) => {
                let name =
                    self.text[inner_start..inner_start + i].trim_matches([' ', '\t', '\r', '\n']);
                self.pos = inner_start + i + 1;
                if name.is_empty() {
                    self.push(TokenKind::BadOperand, start);
                    self.error(
                        Diagnostic::new(
                            Code::EmptyAttributeName,
                            Span::new(start, self.pos),
                            "empty attribute name",
                        )
                        .with_hint(
                            "write the source attribute's name between the brackets, e.g. `[mail]`",
                        ),
                    );
                } else {
                    let name = name.to_string();
                    self.push(TokenKind::Attr(name), start);
                }
            }
        }
    }

    /// A decimal number; `start` includes a leading `-` (already consumed) when `negative`.
    fn number(&mut self, start: usize, negative: bool) {
        let int_start = self.pos;
        self.consume_while(|c| c.is_ascii_digit());
        let int_digits = &self.text[int_start..self.pos];
        let mut frac_digits = None;
        if self.peek() == Some('.') && self.peek_at(1).is_some_and(|c| c.is_ascii_digit()) {
            self.bump();
            let f = self.pos;
            self.consume_while(|c| c.is_ascii_digit());
            frac_digits = Some(&self.text[f..self.pos]);
        }
        // Anything glued to the number makes it malformed: `1e5`, `1.`, `12ab`, `1.2.3`.
        let tail_start = self.pos;
        self.consume_while(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        let span = Span::new(start, self.pos);
        if self.pos > tail_start {
            let tail = &self.text[tail_start..self.pos];
            let exponent = tail.starts_with(['e', 'E'])
                && tail[1..]
                    .trim_start_matches(['+', '-'])
                    .starts_with(|c: char| c.is_ascii_digit());
            // An exponent with a sign (`1e+5`, `1E-3`) also swallows the sign and its digits.
            if (tail == "e" || tail == "E") && matches!(self.peek(), Some('+' | '-')) {
                self.bump();
                self.consume_while(|c| c.is_ascii_digit());
            }
            let span = Span::new(start, self.pos);
            let (message, hint) = if exponent || tail == "e" || tail == "E" {
                (
                    "exponents are not supported in number literals",
                    "write the number out in full, e.g. `1500` or `0.0015`",
                )
            } else if tail.starts_with('.') {
                ("malformed decimal number", "a decimal number is digits, `.`, digits, e.g. `42568.75`; no thousands separators")
            } else {
                (
                    "a number cannot be followed by letters",
                    "separate the tokens, or use `&H…` for hexadecimal",
                )
            };
            self.push(TokenKind::BadOperand, start);
            self.error(Diagnostic::new(Code::MalformedNumber, span, message).with_hint(hint));
            return;
        }
        let sign = if negative { "-" } else { "" };
        match frac_digits {
            None => match format!("{sign}{int_digits}").parse::<i64>() {
                Ok(v) => self.push(TokenKind::Int(v), start),
                Err(_) => {
                    self.push(TokenKind::BadOperand, start);
                    self.error(
                        Diagnostic::new(
                            Code::NumberOutOfRange,
                            span,
                            format!("integer `{}` does not fit a signed 64-bit integer", &self.text[span.start..span.end]),
                        )
                        .with_hint("integers range from -9223372036854775808 to 9223372036854775807; write larger numbers as strings"),
                    );
                }
            },
            Some(frac) => {
                let digits = format!("{int_digits}{frac}");
                let significant = digits.trim_start_matches('0').len();
                let parsed = if significant > 38 {
                    None
                } else {
                    format!("{sign}{digits}").parse::<i128>().ok()
                };
                match parsed {
                    Some(mantissa) => self.push(
                        TokenKind::Dec(Decimal {
                            mantissa,
                            scale: frac.len() as u32,
                        }),
                        start,
                    ),
                    None => {
                        self.push(TokenKind::BadOperand, start);
                        self.error(
                            Diagnostic::new(
                                Code::NumberOutOfRange,
                                span,
                                "decimal literal has more than 38 significant digits",
                            )
                            .with_hint("write it as a string literal"),
                        );
                    }
                }
            }
        }
    }

    fn hex(&mut self, start: usize) {
        self.bump();
        self.bump();
        let digits_start = self.pos;
        self.consume_while(|c| c.is_ascii_alphanumeric() || c == '_');
        let digits = &self.text[digits_start..self.pos];
        let span = Span::new(start, self.pos);
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            self.push(TokenKind::BadOperand, start);
            let message = if digits.is_empty() {
                "`&H` must be followed by hexadecimal digits".to_string()
            } else {
                format!(
                    "`{}` is not a hexadecimal number",
                    &self.text[start..self.pos]
                )
            };
            self.error(
                Diagnostic::new(Code::MalformedNumber, span, message).with_hint(
                    "hexadecimal literals are `&H` and digits 0-9, A-F, e.g. `&H21C07000`",
                ),
            );
            return;
        }
        match u64::from_str_radix(digits, 16)
            .ok()
            .and_then(|v| i64::try_from(v).ok())
        {
            Some(v) => self.push(TokenKind::Int(v), start),
            None => {
                self.push(TokenKind::BadOperand, start);
                self.error(
                    Diagnostic::new(
                        Code::NumberOutOfRange,
                        span,
                        format!(
                            "hexadecimal literal `{}` does not fit a signed 64-bit integer",
                            &self.text[start..self.pos]
                        ),
                    )
                    .with_hint("the largest hexadecimal literal is &H7FFFFFFFFFFFFFFF"),
                );
            }
        }
    }

    fn parameter_or_variable(&mut self, start: usize, sigil: char) {
        self.bump();
        self.consume_while(|c| c.is_ascii_alphanumeric() || c == '_');
        if sigil == '%' && self.peek() == Some('%') {
            self.bump();
        }
        let span = Span::new(start, self.pos);
        let written = &self.text[start..self.pos];
        self.push(TokenKind::BadOperand, start);
        let (message, hint) = if sigil == '%' {
            (
                format!("Connect Sync parameters such as `{written}` are not supported"),
                "write the value as a literal; parameters exist only in Connect Sync rules",
            )
        } else {
            (
                format!("Connect Sync variables such as `{written}` are not supported"),
                "repeat the expression where the variable is used; `With`/`$name` exist only in Connect Sync rules",
            )
        };
        self.error(Diagnostic::new(Code::ParameterOrVariable, span, message).with_hint(hint));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<TokenKind> {
        let lx = lex(text);
        assert!(lx.diagnostics.is_empty(), "{:?}", lx.diagnostics);
        lx.tokens.into_iter().map(|t| t.kind).collect()
    }

    fn codes(text: &str) -> Vec<Code> {
        lex(text).diagnostics.iter().map(|d| d.code).collect()
    }

    #[test]
    fn tokens() {
        use TokenKind::*;
        assert_eq!(
            kinds("Join (\",\", [ given Name ], -10, 4.50, &HF, &h10) <> <= >= < > ="),
            vec![
                Ident("Join".into()),
                LParen,
                Str(",".into()),
                Comma,
                Attr("given Name".into()),
                Comma,
                Int(-10),
                Comma,
                Dec(Decimal {
                    mantissa: 450,
                    scale: 2
                }),
                Comma,
                Int(15),
                Comma,
                Int(16),
                RParen,
                Compare(CompareOp::Ne),
                Compare(CompareOp::Le),
                Compare(CompareOp::Ge),
                Compare(CompareOp::Lt),
                Compare(CompareOp::Gt),
                Compare(CompareOp::Eq),
                Eof
            ]
        );
    }

    #[test]
    fn string_escapes() {
        let k = kinds(
            r#""a\"b\\c\d\+\n" "" "x
y""#,
        );
        assert_eq!(k[0], TokenKind::Str("a\"b\\c\\d\\+\\n".into()));
        assert_eq!(k[1], TokenKind::Str(String::new()));
        assert_eq!(k[2], TokenKind::Str("x\ny".into()));
        // `"\\d"` and `"\d"` are the same string.
        assert_eq!(kinds(r#""\\d""#)[0], kinds(r#""\d""#)[0]);
    }

    #[test]
    fn integer_limits() {
        assert_eq!(kinds("-9223372036854775808")[0], TokenKind::Int(i64::MIN));
        assert_eq!(kinds("9223372036854775807")[0], TokenKind::Int(i64::MAX));
        assert_eq!(kinds("&H7FFFFFFFFFFFFFFF")[0], TokenKind::Int(i64::MAX));
        assert_eq!(codes("9223372036854775808"), vec![Code::NumberOutOfRange]);
        assert_eq!(codes("&H8000000000000000"), vec![Code::NumberOutOfRange]);
        assert_eq!(codes("&H00000000000000000001"), vec![]);
        assert_eq!(
            codes("1.000000000000000000000000000000000000001"),
            vec![Code::NumberOutOfRange]
        );
    }

    #[test]
    fn malformed_numbers() {
        for bad in [
            "+1", "1e5", "1E-3", "1.", "12ab", "1.2.3", ".5", "&H", "&HXY", "&H1G",
        ] {
            assert_eq!(codes(bad), vec![Code::MalformedNumber], "{bad}");
        }
    }

    #[test]
    fn minus_after_operand_is_an_operator() {
        assert_eq!(codes("[a]-1"), vec![Code::UnsupportedOperator]);
        assert_eq!(codes("[a] + 1"), vec![Code::UnsupportedOperator]);
        assert_eq!(codes("Mid([a], -1, 2)"), vec![]);
        assert_eq!(codes("[a]=-1"), vec![]);
    }

    #[test]
    fn operators_and_sigils() {
        for op in ["&", "&&", "||", "|", "*", "/", "==", "!=", "- [a]"] {
            assert_eq!(
                codes(&format!("[a] {op} [b]")),
                vec![Code::UnsupportedOperator],
                "{op}"
            );
        }
        assert_eq!(codes("%Domain%"), vec![Code::ParameterOrVariable]);
        assert_eq!(codes("$x"), vec![Code::ParameterOrVariable]);
    }

    #[test]
    fn quotes_and_brackets() {
        assert_eq!(codes("\u{201C}abc\u{201D}"), vec![Code::WrongQuote]);
        assert_eq!(codes("'abc'"), vec![Code::WrongQuote]);
        assert_eq!(codes("\"abc"), vec![Code::UnterminatedString]);
        assert_eq!(codes("[abc"), vec![Code::UnterminatedAttribute]);
        assert_eq!(codes("[ ]"), vec![Code::EmptyAttributeName]);
        assert_eq!(
            codes("# é"),
            vec![Code::UnexpectedCharacter, Code::UnexpectedCharacter]
        );
        let lx = lex("\u{201C}abc\u{201D}");
        assert_eq!(
            lx.diagnostics[0].hint.as_deref(),
            Some("write \"abc\" with straight double quotes (U+0022)")
        );
        assert!(lex("\"abc").ran_off_end);
    }
}
