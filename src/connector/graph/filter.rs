//! OData `$filter` building for join lookups: string literals escaped (single quotes doubled)
//! by one function, property paths in Graph's `a/b` form, and which filters are "advanced
//! queries" that need `ConsistencyLevel: eventual` and `$count=true`.
//!
//! Pure: no I/O.

use crate::model::Value;

/// An OData string literal: `value` in single quotes, each single quote doubled
/// (`O'Brien` → `'O''Brien'`).
pub fn string_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Reads back an OData string literal made by [`string_literal`]; `None` when `literal` is not
/// one (unquoted, or a lone single quote inside).
pub fn parse_string_literal(literal: &str) -> Option<String> {
    let inner = literal.strip_prefix('\'')?.strip_suffix('\'')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' && chars.next() != Some('\'') {
            return None;
        }
        out.push(c);
    }
    Some(out)
}

/// The literal for a value: Booleans and integers bare, everything else as a string literal.
pub fn literal(value: &Value) -> String {
    match value {
        Value::Boolean(b) => b.to_string(),
        Value::Integer(i) => i.to_string(),
        other => string_literal(&other.to_text()),
    }
}

/// `path eq literal`, with a dotted attribute path turned into OData's `a/b`.
pub fn eq(path: &str, value: &Value) -> String {
    format!("{} eq {}", path.replace('.', "/"), literal(value))
}

/// Graph's limit on the `or` clauses of one `$filter` (an `in` counts one per value) without
/// the advanced query parameters: "When using the `in` operator, the request is limited to 15
/// expressions in the filter clause by default" (Microsoft Graph known issues, query
/// parameters). Beyond it Graph answers 400 "Too many child clauses specified in search filter
/// expression containing 'OR' operators".
pub const MAX_CLAUSES: usize = 15;

/// Graph's limit on the URL of an advanced query with `in`: "… OR a URL length of 2,048
/// characters when using advanced query capabilities" (same source).
pub const MAX_ADVANCED_URL: usize = 2048;

/// `path in (l1, l2, …)` for several values, `path eq l1` for one (a dotted path in OData's
/// `a/b` form, each literal escaped by [`literal`]).
pub fn any_in(path: &str, values: &[Value]) -> String {
    match values {
        [one] => eq(path, one),
        _ => format!(
            "{} in ({})",
            path.replace('.', "/"),
            values.iter().map(literal).collect::<Vec<_>>().join(",")
        ),
    }
}

/// `path eq l1 or path eq l2 …`, for properties whose `$filter` support is `eq` only.
pub fn any_eq(path: &str, values: &[Value]) -> String {
    values
        .iter()
        .map(|v| eq(path, v))
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Whether an `eq` filter on `path` is an advanced query in Graph (it then needs
/// `ConsistencyLevel: eventual` and `$count=true`): properties of
/// `onPremisesExtensionAttributes` are.
pub fn needs_advanced_query(path: &str) -> bool {
    path.to_ascii_lowercase()
        .starts_with("onpremisesextensionattributes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn quotes_are_doubled() {
        assert_eq!(string_literal("O'Brien"), "'O''Brien'");
        assert_eq!(
            eq(
                "onPremisesExtensionAttributes.extensionAttribute1",
                &Value::string("a'b")
            ),
            "onPremisesExtensionAttributes/extensionAttribute1 eq 'a''b'"
        );
        assert_eq!(
            eq("accountEnabled", &Value::Boolean(true)),
            "accountEnabled eq true"
        );
        assert_eq!(parse_string_literal("'a'b'"), None);
        assert!(needs_advanced_query(
            "onPremisesExtensionAttributes/extensionAttribute3"
        ));
        assert!(!needs_advanced_query("employeeId"));
    }

    #[test]
    fn in_and_or_filters_escape_each_value() {
        let vs = [Value::string("O'Brien"), Value::string("a,b) or x eq ('y")];
        assert_eq!(
            any_in("mail", &vs),
            "mail in ('O''Brien','a,b) or x eq (''y')"
        );
        assert_eq!(any_in("mail", &vs[..1]), "mail eq 'O''Brien'");
        assert_eq!(
            any_in(
                "onPremisesExtensionAttributes.extensionAttribute1",
                &vs[..1]
            ),
            "onPremisesExtensionAttributes/extensionAttribute1 eq 'O''Brien'"
        );
        assert_eq!(
            any_eq("extension_1_x", &vs),
            "extension_1_x eq 'O''Brien' or extension_1_x eq 'a,b) or x eq (''y'"
        );
    }

    proptest! {
        #[test]
        fn literal_round_trips(s in ".*") {
            let lit = string_literal(&s);
            prop_assert_eq!(parse_string_literal(&lit), Some(s.clone()));
            // The inside never holds an odd run of quotes: the literal cannot be broken out of.
            let inner = &lit[1..lit.len() - 1];
            for run in inner.split(|c| c != '\'') {
                prop_assert_eq!(run.len() % 2, 0);
            }
        }
    }
}
