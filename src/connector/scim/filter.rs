//! SCIM filter text (RFC 7644 §3.4.2.2): the one place where filter values are quoted and
//! attribute paths are checked, so that no filter is ever concatenated from raw input.
//!
//! Pure string code: no I/O.

use crate::model::{Reference, Value};

/// Quotes `value` as a SCIM filter string (`compValue` is a JSON string literal: `"`, `\` and
/// control characters are escaped; everything else is kept as it is).
pub fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || c == '\u{7f}' || c == '\u{2028}' || c == '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Whether `name` is a SCIM attribute path a filter may name: `ATTRNAME *("." ATTRNAME)`,
/// optionally prefixed by a schema URN (`urn:…:User:employeeNumber`). `ATTRNAME` is
/// `ALPHA *(nameChar)` with `nameChar = "-" / "_" / DIGIT / ALPHA`, plus `$ref`.
pub fn is_attr_path(name: &str) -> bool {
    let (urn, rest) = split_urn(name);
    if let Some(u) = urn {
        if !u
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '.' | '-' | '_'))
        {
            return false;
        }
    }
    !rest.is_empty() && rest.split('.').all(is_attr_name)
}

fn is_attr_name(s: &str) -> bool {
    if s == "$ref" {
        return true;
    }
    let mut cs = s.chars();
    matches!(cs.next(), Some(c) if c.is_ascii_alphabetic())
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Splits a fully qualified attribute name (`urn:…:User:employeeNumber`) into its schema URN
/// and the attribute path; a name without a URN has none.
pub fn split_urn(name: &str) -> (Option<&str>, &str) {
    if name.len() > 4 && name[..4].eq_ignore_ascii_case("urn:") {
        match name.rfind(':') {
            Some(i) => (Some(&name[..i]), &name[i + 1..]),
            None => (None, name),
        }
    } else {
        (None, name)
    }
}

/// The filter value of `value`: strings, ids and references quoted, Booleans and integers bare.
/// Bytes are compared as their Base64 text, timestamps as RFC 3339.
pub fn comp_value(value: &Value) -> String {
    match value {
        Value::Boolean(b) => b.to_string(),
        Value::Integer(i) => i.to_string(),
        Value::Reference(Reference::Target(id)) => quote(id.as_str()),
        other => quote(&other.to_text()),
    }
}

/// `attribute eq value`, or `None` when `attribute` is not a valid attribute path.
pub fn eq(attribute: &str, value: &Value) -> Option<String> {
    is_attr_path(attribute).then(|| format!("{attribute} eq {}", comp_value(value)))
}

/// `attribute eq v1 or attribute eq v2 …` for `values` (each quoted by [`comp_value`]), or
/// `None` when `attribute` is not a valid attribute path or `values` is empty.
pub fn any_eq(attribute: &str, values: &[Value]) -> Option<String> {
    if values.is_empty() || !is_attr_path(attribute) {
        return None;
    }
    let clauses: Vec<String> = values
        .iter()
        .map(|v| format!("{attribute} eq {}", comp_value(v)))
        .collect();
    Some(clauses.join(" or "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The filter's clauses, split at the `or`s outside string literals.
    fn top_level_clauses(f: &str) -> Vec<String> {
        let (mut out, mut cur) = (Vec::new(), String::new());
        let (mut in_str, mut esc) = (false, false);
        let mut rest = f;
        while let Some(c) = rest.chars().next() {
            if !in_str && rest.starts_with(" or ") {
                out.push(std::mem::take(&mut cur));
                rest = &rest[4..];
                continue;
            }
            if in_str && esc {
                esc = false;
            } else if in_str && c == '\\' {
                esc = true;
            } else if c == '"' {
                in_str = !in_str;
            }
            cur.push(c);
            rest = &rest[c.len_utf8()..];
        }
        out.push(cur);
        out
    }

    #[test]
    fn any_eq_ors_quoted_values() {
        let sneaky = Value::string(r#"a" or displayName pr or ""#);
        let f = any_eq("displayName", &[Value::string("Staff"), sneaky]).unwrap();
        assert_eq!(
            f,
            r#"displayName eq "Staff" or displayName eq "a\" or displayName pr or \"""#
        );
        // The quote in the value stays inside its literal: two clauses, not four.
        assert_eq!(top_level_clauses(&f).len(), 2);
        assert_eq!(any_eq("userName", &[]), None);
        assert_eq!(any_eq("bad name", &[Value::string("x")]), None);
        assert_eq!(
            any_eq("active", &[Value::Boolean(true)]).unwrap(),
            "active eq true"
        );
    }

    proptest! {
        /// However the values are spelled, the filter has one clause per value, each reading
        /// back as `attribute eq <the value>`.
        #[test]
        fn any_eq_has_one_clause_per_value(vs in proptest::collection::vec(any::<String>(), 1..6)) {
            let values: Vec<Value> = vs.iter().map(|s| Value::string(s.clone())).collect();
            let f = any_eq("userName", &values).unwrap();
            let clauses = top_level_clauses(&f);
            prop_assert_eq!(clauses.len(), vs.len());
            for (c, v) in clauses.iter().zip(&vs) {
                let lit = c.strip_prefix("userName eq ").unwrap();
                let back: String = serde_json::from_str(lit).unwrap();
                prop_assert_eq!(&back, v);
            }
        }
    }

    #[test]
    fn quotes_specials() {
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(quote("x\ny\u{1}"), "\"x\\ny\\u0001\"");
        assert_eq!(quote("Zoë"), "\"Zoë\"");
        assert_eq!(
            eq("userName", &Value::string("o\"neil")).unwrap(),
            r#"userName eq "o\"neil""#
        );
        assert_eq!(
            eq("active", &Value::Boolean(true)).unwrap(),
            "active eq true"
        );
        assert_eq!(eq("bad name", &Value::string("x")), None);
        assert_eq!(eq("emails[type eq \"work\"]", &Value::string("x")), None);
        assert!(is_attr_path(
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber"
        ));
        assert!(is_attr_path("name.givenName"));
        assert!(!is_attr_path("name..givenName"));
    }

    proptest! {
        /// The quoted text is one JSON string literal that reads back as the value, and a
        /// filter built from it has exactly one string token.
        #[test]
        fn quote_round_trips(s in any::<String>()) {
            let q = quote(&s);
            let back: String = serde_json::from_str(&q).unwrap();
            prop_assert_eq!(&back, &s);
            // No unescaped quote inside: the literal ends only at the last character.
            let inner = &q[1..q.len() - 1];
            let mut escaped = false;
            for c in inner.chars() {
                if escaped { escaped = false; continue; }
                prop_assert!(c != '"');
                prop_assert!((c as u32) >= 0x20);
                if c == '\\' { escaped = true; }
            }
            prop_assert!(!escaped);
        }

        #[test]
        fn eq_filters_parse_back(s in any::<String>(), attr in "[a-zA-Z][a-zA-Z0-9_-]{0,8}") {
            let f = eq(&attr, &Value::string(s.clone())).unwrap();
            let prefix = format!("{attr} eq ");
            prop_assert!(f.starts_with(&prefix));
            let back: String = serde_json::from_str(&f[prefix.len()..]).unwrap();
            prop_assert_eq!(back, s);
        }
    }
}
