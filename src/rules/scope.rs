//! Scoping filters (spec §7): which objects a rule applies to.
//!
//! A filter is a list of **groups** of **clauses** `(attribute, operator, value)`: the clauses of a
//! group are combined with AND, the groups with OR, and a filter with no groups puts every object
//! in scope. Each filter belongs to one [`Family`] — the fourteen operators of Entra app
//! provisioning (§7.3) or the twenty of Entra Connect Sync (§7.4) — and the families differ on
//! purpose: provisioning compares case-sensitively and makes every clause false on a null/empty
//! attribute except `IS NULL`; Connect Sync compares ignoring case and its negative operators are
//! exact complements (true on null).
//!
//! A [`FilterSpec`] is the configuration form (TOML/JSON). [`ScopeFilter::compile`] checks it
//! once — operator names, value types, regular expressions (§9), integer masks, group DNs — and
//! reports **every** problem as a [`ScopeError`] that names the group, the clause, the attribute
//! and the operator and carries a stable code (401–412, see [`ScopeErrorKind::code`]). The
//! compiled filter is then evaluated many times ([`ScopeFilter::evaluate`]) or with a per-clause
//! account of why ([`ScopeFilter::explain`]).
//!
//! Error codes, never reused:
//!
//! | code | kind |
//! | --- | --- |
//! | 401 | [`ScopeErrorKind::EmptyGroup`] |
//! | 402 | [`ScopeErrorKind::UnknownOperator`] |
//! | 403 | [`ScopeErrorKind::OtherFamilyOperator`] |
//! | 404 | [`ScopeErrorKind::UnsupportedOperator`] |
//! | 405 | [`ScopeErrorKind::MissingAttribute`] |
//! | 406 | [`ScopeErrorKind::MissingValue`] |
//! | 407 | [`ScopeErrorKind::UnexpectedValue`] |
//! | 408 | [`ScopeErrorKind::WrongValueType`] |
//! | 409 | [`ScopeErrorKind::ZeroMask`] |
//! | 410 | [`ScopeErrorKind::InvalidRegex`] |
//! | 411 | [`ScopeErrorKind::InvalidDn`] |
//! | 412 | [`ScopeErrorKind::DnOperator`] |
//!
//! **The object's DN.** A clause whose attribute is `dn` tests the object's distinguished name
//! (for directories without a `distinguishedName` attribute, and without regular expressions):
//! the clause value is an RFC 4514 DN, parsed when the filter compiles, and the comparison is
//! DN-aware in both families — RDN by RDN, attribute types and values ignoring case, spaces
//! around separators ignored, escapes decoded, so `ou=Staff,dc=example,dc=com` never matches
//! `ou=BigStaff,dc=example,dc=com`:
//!
//! | provisioning | Connect Sync | true when the object's DN … |
//! | --- | --- | --- |
//! | `EQUALS` / `NOT EQUALS` | `EQUAL` / `NOTEQUAL`, `ISIN` / `ISNOTIN` | is (is not) the DN |
//! | `ENDS_WITH` | `ENDSWITH` / `NOTENDSWITH` | is the DN or lies below it (its subtree) |
//! | — | `STARTSWITH` / `NOTSTARTSWITH` | begins with the DN's RDNs (`cn=admin` …) |
//! | `Includes` | `CONTAINS` / `NOTCONTAINS` | holds the DN's RDNs in a row (`ou=Contractors`) |
//! | `IS NULL` / `IS NOT NULL` | `ISNULL` / `ISNOTNULL` | is absent (present) |
//! | `REGEX MATCH` / `NOT REGEX MATCH` | — | its text, as the source spells it, matches |
//!
//! The family's null rule holds (an object without a DN makes every provisioning clause but
//! `IS NULL` false; Connect Sync negatives are complements). Other operators on `dn` are error
//! 412. `ISMEMBEROF`, whose attribute is `dn` by convention, is not a DN clause.
//!
//! Pure: no I/O, no clock, no global state; group memberships come in through a callback that is
//! called only when an `ISMEMBEROF`/`ISNOTMEMBEROF` clause is evaluated. No input makes it panic.
//!
//! ```
//! use dirsync::model::{Attributes, Dn, Value};
//! use dirsync::rules::scope::{ClauseSpec, Family, FilterSpec, ScopeFilter};
//!
//! let spec = FilterSpec {
//!     family: Family::Provisioning,
//!     groups: vec![vec![
//!         ClauseSpec::new("department", "EQUALS", "Sales"),
//!         ClauseSpec::new("employeeId", "REGEX MATCH", r"^\d{5}$"),
//!     ]],
//! };
//! let filter = ScopeFilter::compile(&spec).unwrap();
//! let user: Attributes = [("department", "Sales"), ("employeeId", "12345")]
//!     .into_iter()
//!     .map(|(name, v)| (name, Value::string(v)))
//!     .collect();
//! assert!(filter.evaluate(&user, &|| Vec::<Dn>::new()));
//! ```

use std::cell::OnceCell;
use std::cmp::Ordering;
use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::regex::DotNetRegex;
use crate::model::{AttrName, Attributes, Dn, Value};
use crate::rules::eval::AttributeSource;

// ---------------------------------------------------------------------------------------------
// Configuration form
// ---------------------------------------------------------------------------------------------

/// The operator family of a filter (spec §7.1); families are never mixed within a filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// Entra app provisioning scoping filters (spec §7.3): case-sensitive, false on null.
    Provisioning,
    /// Entra Connect Sync scoping filters (spec §7.4): case-insensitive, negatives are complements.
    ConnectSync,
}

impl Family {
    /// The configuration name: `provisioning` or `connect-sync`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Provisioning => "provisioning",
            Family::ConnectSync => "connect-sync",
        }
    }

    /// Every operator of the family, in the order the spec lists them.
    pub fn operators(self) -> Vec<Operator> {
        match self {
            Family::Provisioning => ProvisioningOperator::ALL
                .iter()
                .map(|o| Operator::Provisioning(*o))
                .collect(),
            Family::ConnectSync => ConnectSyncOperator::ALL
                .iter()
                .map(|o| Operator::ConnectSync(*o))
                .collect(),
        }
    }

    /// The name used in messages: `provisioning` or `Connect Sync`.
    fn title(self) -> &'static str {
        match self {
            Family::Provisioning => "provisioning",
            Family::ConnectSync => "Connect Sync",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A scoping filter as written in configuration:
/// `{"family": "provisioning" | "connect-sync", "groups": [[clause, …], …]}`.
///
/// No groups (or `groups` left out) puts every object in scope.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    /// The operator family.
    pub family: Family,
    /// The groups (OR); each is a list of clauses (AND).
    #[serde(default)]
    pub groups: Vec<Vec<ClauseSpec>>,
}

/// One clause as written in configuration: `{"attribute": …, "operator": …, "value": …}`.
///
/// `value` may be a string, an integer or a Boolean (integers and Booleans read as their text,
/// `True`/`False`, where a string is expected), and is left out (or `null`) for unary operators
/// such as `IS NULL`. `attribute` may be left out for `ISMEMBEROF`, which ignores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClauseSpec {
    /// The attribute name (case-insensitive).
    #[serde(default)]
    pub attribute: String,
    /// The operator name, case-insensitive but otherwise exactly as the spec lists it.
    pub operator: String,
    /// The clause value, absent for unary operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
}

impl ClauseSpec {
    /// A clause with a value.
    pub fn new(
        attribute: impl Into<String>,
        operator: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> ClauseSpec {
        ClauseSpec {
            attribute: attribute.into(),
            operator: operator.into(),
            value: Some(value.into()),
        }
    }

    /// A clause without a value (`IS NULL`, `ISNOTNULL`, `IS TRUE`, …).
    pub fn unary(attribute: impl Into<String>, operator: impl Into<String>) -> ClauseSpec {
        ClauseSpec {
            attribute: attribute.into(),
            operator: operator.into(),
            value: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Operators
// ---------------------------------------------------------------------------------------------

/// The operators of the provisioning family (spec §7.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProvisioningOperator {
    /// `EQUALS`: text equals the value exactly.
    Equals,
    /// `NOT EQUALS`: text differs from the value.
    NotEquals,
    /// `IS TRUE`: Boolean-like and true.
    IsTrue,
    /// `IS FALSE`: Boolean-like and false.
    IsFalse,
    /// `IS NULL`: the attribute is null/empty.
    IsNull,
    /// `IS NOT NULL`: the attribute is not null/empty.
    IsNotNull,
    /// `REGEX MATCH`: the pattern matches somewhere in the text.
    RegexMatch,
    /// `NOT REGEX MATCH`: the pattern matches nowhere in the text.
    NotRegexMatch,
    /// `Greater_Than`: integer-like and greater than the clause integer.
    GreaterThan,
    /// `Greater_Than_OR_EQUALS`: integer-like and at least the clause integer.
    GreaterThanOrEquals,
    /// `Includes`: the text contains the value.
    Includes,
    /// `ENDS_WITH`: the text ends with the value.
    EndsWith,
    /// `&`: the text occurs in the clause value (reverse containment).
    OccursIn,
    /// `!&`: the text does not occur in the clause value.
    NotOccursIn,
}

impl ProvisioningOperator {
    /// Every provisioning operator, in the order of spec §7.3.
    pub const ALL: [ProvisioningOperator; 14] = [
        ProvisioningOperator::Equals,
        ProvisioningOperator::NotEquals,
        ProvisioningOperator::IsTrue,
        ProvisioningOperator::IsFalse,
        ProvisioningOperator::IsNull,
        ProvisioningOperator::IsNotNull,
        ProvisioningOperator::RegexMatch,
        ProvisioningOperator::NotRegexMatch,
        ProvisioningOperator::GreaterThan,
        ProvisioningOperator::GreaterThanOrEquals,
        ProvisioningOperator::Includes,
        ProvisioningOperator::EndsWith,
        ProvisioningOperator::OccursIn,
        ProvisioningOperator::NotOccursIn,
    ];

    /// The canonical name, as spec §7.3 spells it.
    pub fn name(self) -> &'static str {
        use ProvisioningOperator as P;
        match self {
            P::Equals => "EQUALS",
            P::NotEquals => "NOT EQUALS",
            P::IsTrue => "IS TRUE",
            P::IsFalse => "IS FALSE",
            P::IsNull => "IS NULL",
            P::IsNotNull => "IS NOT NULL",
            P::RegexMatch => "REGEX MATCH",
            P::NotRegexMatch => "NOT REGEX MATCH",
            P::GreaterThan => "Greater_Than",
            P::GreaterThanOrEquals => "Greater_Than_OR_EQUALS",
            P::Includes => "Includes",
            P::EndsWith => "ENDS_WITH",
            P::OccursIn => "&",
            P::NotOccursIn => "!&",
        }
    }

    fn operand(self) -> OperandKind {
        use ProvisioningOperator as P;
        match self {
            P::IsTrue | P::IsFalse | P::IsNull | P::IsNotNull => OperandKind::None,
            P::RegexMatch | P::NotRegexMatch => OperandKind::Pattern,
            P::GreaterThan | P::GreaterThanOrEquals => OperandKind::Integer,
            P::Equals | P::NotEquals | P::Includes | P::EndsWith | P::OccursIn | P::NotOccursIn => {
                OperandKind::Text
            }
        }
    }
}

/// The operators of the Connect Sync family (spec §7.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectSyncOperator {
    /// `EQUAL`: every value equals the clause value (ignoring case).
    Equal,
    /// `NOTEQUAL`: complement of `EQUAL`.
    NotEqual,
    /// `LESSTHAN`: every value is less than the clause value.
    LessThan,
    /// `LESSTHAN_OR_EQUAL`: every value is at most the clause value.
    LessThanOrEqual,
    /// `GREATERTHAN`: every value is greater than the clause value.
    GreaterThan,
    /// `GREATERTHAN_OR_EQUAL`: every value is at least the clause value.
    GreaterThanOrEqual,
    /// `CONTAINS`: every value contains the clause value.
    Contains,
    /// `NOTCONTAINS`: complement of `CONTAINS`.
    NotContains,
    /// `STARTSWITH`: every value starts with the clause value.
    StartsWith,
    /// `NOTSTARTSWITH`: complement of `STARTSWITH`.
    NotStartsWith,
    /// `ENDSWITH`: every value ends with the clause value.
    EndsWith,
    /// `NOTENDSWITH`: complement of `ENDSWITH`.
    NotEndsWith,
    /// `ISNULL`: the attribute is null/empty.
    IsNull,
    /// `ISNOTNULL`: complement of `ISNULL`.
    IsNotNull,
    /// `ISIN`: any value equals the clause value.
    IsIn,
    /// `ISNOTIN`: complement of `ISIN`.
    IsNotIn,
    /// `ISBITSET`: every value is integer-like and has all bits of the mask set.
    IsBitSet,
    /// `ISNOTBITSET`: complement of `ISBITSET`.
    IsNotBitSet,
    /// `ISMEMBEROF`: the object is a direct member of the group.
    IsMemberOf,
    /// `ISNOTMEMBEROF`: complement of `ISMEMBEROF`.
    IsNotMemberOf,
}

impl ConnectSyncOperator {
    /// Every Connect Sync operator, in the order of spec §7.4.
    pub const ALL: [ConnectSyncOperator; 20] = [
        ConnectSyncOperator::Equal,
        ConnectSyncOperator::NotEqual,
        ConnectSyncOperator::LessThan,
        ConnectSyncOperator::LessThanOrEqual,
        ConnectSyncOperator::GreaterThan,
        ConnectSyncOperator::GreaterThanOrEqual,
        ConnectSyncOperator::Contains,
        ConnectSyncOperator::NotContains,
        ConnectSyncOperator::StartsWith,
        ConnectSyncOperator::NotStartsWith,
        ConnectSyncOperator::EndsWith,
        ConnectSyncOperator::NotEndsWith,
        ConnectSyncOperator::IsNull,
        ConnectSyncOperator::IsNotNull,
        ConnectSyncOperator::IsIn,
        ConnectSyncOperator::IsNotIn,
        ConnectSyncOperator::IsBitSet,
        ConnectSyncOperator::IsNotBitSet,
        ConnectSyncOperator::IsMemberOf,
        ConnectSyncOperator::IsNotMemberOf,
    ];

    /// The canonical name, as spec §7.4 spells it.
    pub fn name(self) -> &'static str {
        use ConnectSyncOperator as C;
        match self {
            C::Equal => "EQUAL",
            C::NotEqual => "NOTEQUAL",
            C::LessThan => "LESSTHAN",
            C::LessThanOrEqual => "LESSTHAN_OR_EQUAL",
            C::GreaterThan => "GREATERTHAN",
            C::GreaterThanOrEqual => "GREATERTHAN_OR_EQUAL",
            C::Contains => "CONTAINS",
            C::NotContains => "NOTCONTAINS",
            C::StartsWith => "STARTSWITH",
            C::NotStartsWith => "NOTSTARTSWITH",
            C::EndsWith => "ENDSWITH",
            C::NotEndsWith => "NOTENDSWITH",
            C::IsNull => "ISNULL",
            C::IsNotNull => "ISNOTNULL",
            C::IsIn => "ISIN",
            C::IsNotIn => "ISNOTIN",
            C::IsBitSet => "ISBITSET",
            C::IsNotBitSet => "ISNOTBITSET",
            C::IsMemberOf => "ISMEMBEROF",
            C::IsNotMemberOf => "ISNOTMEMBEROF",
        }
    }

    /// The positive form this operator is the complement of, or `None` for a positive operator.
    pub fn complement_of(self) -> Option<ConnectSyncOperator> {
        use ConnectSyncOperator as C;
        match self {
            C::NotEqual => Some(C::Equal),
            C::NotContains => Some(C::Contains),
            C::NotStartsWith => Some(C::StartsWith),
            C::NotEndsWith => Some(C::EndsWith),
            C::IsNotNull => Some(C::IsNull),
            C::IsNotIn => Some(C::IsIn),
            C::IsNotBitSet => Some(C::IsBitSet),
            C::IsNotMemberOf => Some(C::IsMemberOf),
            _ => None,
        }
    }

    fn operand(self) -> OperandKind {
        use ConnectSyncOperator as C;
        match self {
            C::IsNull | C::IsNotNull => OperandKind::None,
            C::IsBitSet | C::IsNotBitSet => OperandKind::Mask,
            C::IsMemberOf | C::IsNotMemberOf => OperandKind::GroupDn,
            _ => OperandKind::Text,
        }
    }
}

/// An operator of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operator {
    /// A provisioning-family operator.
    Provisioning(ProvisioningOperator),
    /// A Connect-Sync-family operator.
    ConnectSync(ConnectSyncOperator),
}

impl Operator {
    /// Resolves `name` within `family`: case-insensitively, otherwise exactly as the spec lists it
    /// (spaces and underscores included).
    pub fn parse(family: Family, name: &str) -> Option<Operator> {
        match family {
            Family::Provisioning => ProvisioningOperator::ALL
                .iter()
                .find(|o| o.name().eq_ignore_ascii_case(name))
                .map(|o| Operator::Provisioning(*o)),
            Family::ConnectSync => ConnectSyncOperator::ALL
                .iter()
                .find(|o| o.name().eq_ignore_ascii_case(name))
                .map(|o| Operator::ConnectSync(*o)),
        }
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        match self {
            Operator::Provisioning(o) => o.name(),
            Operator::ConnectSync(o) => o.name(),
        }
    }

    /// The family the operator belongs to.
    pub fn family(self) -> Family {
        match self {
            Operator::Provisioning(_) => Family::Provisioning,
            Operator::ConnectSync(_) => Family::ConnectSync,
        }
    }

    fn operand(self) -> OperandKind {
        match self {
            Operator::Provisioning(o) => o.operand(),
            Operator::ConnectSync(o) => o.operand(),
        }
    }
}

impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What kind of clause value an operator takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OperandKind {
    /// No value (unary).
    None,
    /// A string (integers and Booleans read as their text).
    Text,
    /// A regular expression (spec §9).
    Pattern,
    /// An integer.
    Integer,
    /// A non-zero integer bit mask.
    Mask,
    /// A group DN.
    GroupDn,
}

/// Provisioning names that the portal shows or SCOPE mentions but dirsync rejects (spec §7.3).
const UNSUPPORTED_PROVISIONING: [(&str, &str, &str); 3] = [
    (
        "IsMemberOf",
        "is not supported in the provisioning family (Entra app provisioning does not support \
         group-membership scoping)",
        "use a connect-sync filter with ISMEMBEROF, or assign the group to the application",
    ),
    (
        "Present",
        "is not supported: it is a portal-only name whose meaning is undocumented",
        "use IS NOT NULL",
    ),
    (
        "Valid Cert Match",
        "is not supported: it is a portal-only name whose meaning is undocumented",
        "",
    ),
];

/// Operators with the same meaning in the other family, for hints: (provisioning, Connect Sync).
const EQUIVALENTS: [(&str, &str); 8] = [
    ("EQUALS", "EQUAL"),
    ("NOT EQUALS", "NOTEQUAL"),
    ("IS NULL", "ISNULL"),
    ("IS NOT NULL", "ISNOTNULL"),
    ("Greater_Than", "GREATERTHAN"),
    ("Greater_Than_OR_EQUALS", "GREATERTHAN_OR_EQUAL"),
    ("Includes", "CONTAINS"),
    ("ENDS_WITH", "ENDSWITH"),
];

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// What is wrong with a clause or group. Each kind has a stable code ([`code`](Self::code)).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScopeErrorKind {
    /// 401: a group has no clauses.
    EmptyGroup,
    /// 402: the operator is not an operator of either family.
    UnknownOperator {
        /// The closest operator name of the filter's family, if one is close.
        suggestion: Option<&'static str>,
    },
    /// 403: the operator belongs to the other family.
    OtherFamilyOperator {
        /// The operator with the same meaning in the filter's family, if there is one.
        suggestion: Option<&'static str>,
    },
    /// 404: a provisioning operator dirsync does not support (`IsMemberOf`, `Present`,
    /// `Valid Cert Match`).
    UnsupportedOperator,
    /// 405: the clause names no attribute.
    MissingAttribute,
    /// 406: the operator needs a value and the clause has none.
    MissingValue,
    /// 407: the operator takes no value and the clause has one.
    UnexpectedValue,
    /// 408: the value has the wrong type (a number with a fraction, a list, a table; or not an
    /// integer where an integer is required; or not a string where a DN is required).
    WrongValueType,
    /// 409: an `ISBITSET`/`ISNOTBITSET` mask of zero.
    ZeroMask,
    /// 410: the regular expression is invalid or outside the subset of spec §9.
    InvalidRegex {
        /// 0-based character offset in the pattern.
        offset: usize,
    },
    /// 411: the group DN of `ISMEMBEROF`/`ISNOTMEMBEROF`, or the value of a `dn` clause, is
    /// empty or not a valid RFC 4514 DN.
    InvalidDn {
        /// 0-based character position in the DN.
        position: usize,
    },
    /// 412: a clause on `dn` (the object's DN) with an operator that cannot compare DNs
    /// (`Greater_Than`, `LESSTHAN`, `ISBITSET`, `IS TRUE`, `&`, …).
    DnOperator,
}

impl ScopeErrorKind {
    /// The stable code of this kind, in 401–412 (the diagnostic `E04xx`).
    pub fn code(&self) -> u16 {
        match self {
            ScopeErrorKind::EmptyGroup => 401,
            ScopeErrorKind::UnknownOperator { .. } => 402,
            ScopeErrorKind::OtherFamilyOperator { .. } => 403,
            ScopeErrorKind::UnsupportedOperator => 404,
            ScopeErrorKind::MissingAttribute => 405,
            ScopeErrorKind::MissingValue => 406,
            ScopeErrorKind::UnexpectedValue => 407,
            ScopeErrorKind::WrongValueType => 408,
            ScopeErrorKind::ZeroMask => 409,
            ScopeErrorKind::InvalidRegex { .. } => 410,
            ScopeErrorKind::InvalidDn { .. } => 411,
            ScopeErrorKind::DnOperator => 412,
        }
    }
}

/// A problem found by [`ScopeFilter::compile`], with where it is.
///
/// `group` and `clause` are 0-based indexes into [`FilterSpec::groups`]; the `Display` form counts
/// from 1: `scope group 1, clause 2 (department ENDS_WITH): …`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub struct ScopeError {
    /// 0-based group index.
    pub group: usize,
    /// 0-based clause index within the group; `None` for a problem of the group itself.
    pub clause: Option<usize>,
    /// The attribute as written (empty for a group problem).
    pub attribute: String,
    /// The operator as written (empty for a group problem).
    pub operator: String,
    /// What is wrong.
    pub kind: ScopeErrorKind,
    /// One line saying what is wrong.
    pub message: String,
    /// What to do about it, where there is something to say (`did you mean "ENDS_WITH"?`).
    pub hint: Option<String>,
}

impl ScopeError {
    /// The stable code, in 401–412 (see [`ScopeErrorKind::code`]).
    pub fn code(&self) -> u16 {
        self.kind.code()
    }

    fn group(group: usize, kind: ScopeErrorKind, message: &str, hint: &str) -> ScopeError {
        ScopeError {
            group,
            clause: None,
            attribute: String::new(),
            operator: String::new(),
            kind,
            message: message.to_owned(),
            hint: Some(hint.to_owned()),
        }
    }
}

impl fmt::Display for ScopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "scope group {}", self.group + 1)?;
        if let Some(c) = self.clause {
            write!(f, ", clause {} (", c + 1)?;
            let attribute = self.attribute.trim();
            if !attribute.is_empty() {
                write!(f, "{attribute} ")?;
            }
            write!(f, "{})", self.operator)?;
        }
        write!(f, ": {}", self.message)?;
        match &self.hint {
            Some(hint) => write!(f, "; {hint}"),
            None => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Compiled filter
// ---------------------------------------------------------------------------------------------

/// A compiled scoping filter: operators resolved, regular expressions compiled, integers, masks
/// and DNs parsed. Evaluating it cannot fail.
#[derive(Clone, Debug)]
pub struct ScopeFilter {
    family: Family,
    groups: Vec<Vec<Clause>>,
}

/// One compiled clause.
#[derive(Clone, Debug)]
struct Clause {
    attribute: String,
    /// The clause tests the object's DN (attribute `dn`), not an attribute's values.
    on_dn: bool,
    /// Index into a bound attribute table (see [`ScopeFilter::bind`]); `usize::MAX` = unbound.
    slot: usize,
    operator: Operator,
    /// The clause value as text, for explanations.
    value: Option<String>,
    operand: Operand,
}

/// A compiled clause value.
#[derive(Clone, Debug)]
enum Operand {
    None,
    Text(TextOperand),
    Regex(Box<DotNetRegex>),
    Integer(i64),
    Group(Box<Dn>),
    /// The DN a `dn` clause compares with.
    Dn(Box<Dn>),
}

/// A string clause value with its precomputed readings.
#[derive(Clone, Debug)]
struct TextOperand {
    raw: String,
    /// Case-folded (Connect Sync comparisons).
    folded: String,
    /// The value read as a Boolean, if Boolean-like.
    boolean: Option<bool>,
    /// The value read as an integer, if integer-like.
    integer: Option<i64>,
}

impl TextOperand {
    fn new(raw: String) -> TextOperand {
        TextOperand {
            folded: fold(&raw),
            boolean: boolean_text(&raw),
            integer: integer_text(&raw),
            raw,
        }
    }
}

impl ScopeFilter {
    /// Whether a clause tests group membership (`ISMEMBEROF`, `ISNOTMEMBEROF`): evaluating it
    /// calls its `member_of`.
    pub fn reads_member_of(&self) -> bool {
        self.groups.iter().flatten().any(|c| {
            matches!(
                c.operator,
                Operator::ConnectSync(
                    ConnectSyncOperator::IsMemberOf | ConnectSyncOperator::IsNotMemberOf
                )
            )
        })
    }

    /// Checks `spec` and compiles it. Returns every problem found, each naming its group, clause,
    /// attribute and operator.
    pub fn compile(spec: &FilterSpec) -> Result<ScopeFilter, Vec<ScopeError>> {
        let mut errors = Vec::new();
        let mut groups = Vec::with_capacity(spec.groups.len());
        for (gi, group) in spec.groups.iter().enumerate() {
            if group.is_empty() {
                errors.push(ScopeError::group(
                    gi,
                    ScopeErrorKind::EmptyGroup,
                    "the group has no clauses",
                    "add a clause or remove the group (a filter with no groups puts every object \
                     in scope)",
                ));
                continue;
            }
            let mut clauses = Vec::with_capacity(group.len());
            for (ci, spec_clause) in group.iter().enumerate() {
                match compile_clause(spec.family, spec_clause) {
                    Ok(c) => clauses.push(c),
                    Err(p) => errors.push(ScopeError {
                        group: gi,
                        clause: Some(ci),
                        attribute: spec_clause.attribute.clone(),
                        operator: spec_clause.operator.clone(),
                        kind: p.kind,
                        message: p.message,
                        hint: p.hint,
                    }),
                }
            }
            groups.push(clauses);
        }
        if errors.is_empty() {
            Ok(ScopeFilter {
                family: spec.family,
                groups,
            })
        } else {
            Err(errors)
        }
    }

    /// The operator family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// Whether the filter has no groups, which puts every object in scope.
    pub fn is_unrestricted(&self) -> bool {
        self.groups.is_empty()
    }

    /// Whether `entry` is in scope. `member_of` returns the object's direct group memberships; it
    /// is called at most once, and only if an `ISMEMBEROF`/`ISNOTMEMBEROF` clause is evaluated.
    /// Evaluation stops at the first false clause of a group and at the first true group.
    pub fn evaluate(&self, entry: &Attributes, member_of: &dyn Fn() -> Vec<Dn>) -> bool {
        self.evaluate_in(entry, member_of)
    }

    /// [`evaluate`](Self::evaluate) for an object with a DN, which clauses on `dn` test.
    ///
    /// ```
    /// use dirsync::model::{Attributes, Dn};
    /// use dirsync::rules::scope::{ClauseSpec, Family, FilterSpec, ScopeFilter};
    /// let filter = ScopeFilter::compile(&FilterSpec {
    ///     family: Family::Provisioning,
    ///     groups: vec![vec![ClauseSpec::new("dn", "ENDS_WITH", "ou=staff,dc=example,dc=com")]],
    /// })
    /// .unwrap();
    /// let at = |s: &str| Dn::parse(s).unwrap();
    /// let none = || Vec::<Dn>::new();
    /// let attrs = Attributes::new();
    /// assert!(filter.evaluate_with_dn(&attrs, Some(&at("CN=Ann, OU=Staff,DC=Example,DC=com")), &none));
    /// assert!(!filter.evaluate_with_dn(&attrs, Some(&at("CN=Bob,OU=BigStaff,DC=example,DC=com")), &none));
    /// ```
    pub fn evaluate_with_dn(
        &self,
        entry: &Attributes,
        dn: Option<&Dn>,
        member_of: &dyn Fn() -> Vec<Dn>,
    ) -> bool {
        self.evaluate_in(
            &WithDn {
                attributes: entry,
                dn,
            },
            member_of,
        )
    }

    /// [`explain`](Self::explain) for an object with a DN.
    pub fn explain_with_dn(
        &self,
        entry: &Attributes,
        dn: Option<&Dn>,
        member_of: &dyn Fn() -> Vec<Dn>,
    ) -> ScopeExplanation {
        self.explain_in(
            &WithDn {
                attributes: entry,
                dn,
            },
            member_of,
        )
    }

    /// The names of the attributes the clauses read (for [`bind`](Self::bind)).
    pub fn attribute_names(&self) -> Vec<&str> {
        self.groups
            .iter()
            .flatten()
            .filter(|c| !c.on_dn)
            .map(|c| c.attribute.as_str())
            .filter(|a| !a.is_empty())
            .collect()
    }

    /// Binds each clause's attribute to its position in `table` (sorted by [`AttrName`] order),
    /// so that [`evaluate_in`](Self::evaluate_in) over a [`crate::rules::eval::Slotted`] view
    /// costs an index per clause instead of a search.
    pub fn bind(&mut self, table: &[AttrName]) {
        for clause in self.groups.iter_mut().flatten() {
            clause.slot = table
                .binary_search(&AttrName::new(clause.attribute.as_str()))
                .unwrap_or(usize::MAX);
        }
    }

    /// [`evaluate`](Self::evaluate) over any attribute source (a bound filter reads a
    /// [`crate::rules::eval::Slotted`] view by index).
    pub fn evaluate_in(
        &self,
        entry: &dyn AttributeSource,
        member_of: &dyn Fn() -> Vec<Dn>,
    ) -> bool {
        if self.groups.is_empty() {
            return true;
        }
        let members = Members::new(member_of);
        self.groups
            .iter()
            .any(|group| group.iter().all(|clause| clause.holds(entry, &members)))
    }

    /// Evaluates every clause of every group and says why each is true or false. The overall
    /// result equals [`evaluate`](Self::evaluate)'s. `member_of` is called at most once.
    pub fn explain(&self, entry: &Attributes, member_of: &dyn Fn() -> Vec<Dn>) -> ScopeExplanation {
        self.explain_in(entry, member_of)
    }

    /// [`explain`](Self::explain) over any attribute source (its [`AttributeSource::dn`] is the
    /// DN clauses on `dn` test).
    pub fn explain_in(
        &self,
        entry: &dyn AttributeSource,
        member_of: &dyn Fn() -> Vec<Dn>,
    ) -> ScopeExplanation {
        let members = Members::new(member_of);
        let groups: Vec<Vec<ClauseResult>> = self
            .groups
            .iter()
            .map(|group| {
                group
                    .iter()
                    .map(|clause| {
                        let (result, detail) = clause.explain(entry, &members);
                        ClauseResult {
                            attribute: clause.attribute.clone(),
                            operator: clause.operator.name().to_owned(),
                            value: clause.value.clone(),
                            result,
                            detail,
                        }
                    })
                    .collect()
            })
            .collect();
        let in_scope = groups.is_empty() || groups.iter().any(|g| g.iter().all(|c| c.result));
        ScopeExplanation { in_scope, groups }
    }
}

/// Attributes with the object's DN, as an attribute source.
struct WithDn<'a> {
    attributes: &'a Attributes,
    dn: Option<&'a Dn>,
}

impl AttributeSource for WithDn<'_> {
    fn values(&self, name: &str, _slot: usize) -> Option<&crate::model::Values> {
        self.attributes.get(name)
    }

    fn dn(&self) -> Option<&Dn> {
        self.dn
    }
}

/// The account [`ScopeFilter::explain`] gives: every clause's result and the overall result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ScopeExplanation {
    /// Whether the object is in scope.
    pub in_scope: bool,
    /// Per group, per clause, in configuration order.
    pub groups: Vec<Vec<ClauseResult>>,
}

/// The result of one clause, for [`ScopeExplanation`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClauseResult {
    /// The attribute as configured (trimmed).
    pub attribute: String,
    /// The canonical operator name.
    pub operator: String,
    /// The clause value as text (`None` for unary operators).
    pub value: Option<String>,
    /// Whether the clause is true for the object.
    pub result: bool,
    /// Why, e.g. `department = "Sales" is not "Eng"`.
    pub detail: String,
}

impl fmt::Display for ScopeExplanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.in_scope {
            "in scope"
        } else {
            "out of scope"
        };
        if self.groups.is_empty() {
            return write!(f, "{verdict} (the filter has no groups)");
        }
        writeln!(f, "{verdict}")?;
        for (gi, group) in self.groups.iter().enumerate() {
            let all = group.iter().all(|c| c.result);
            writeln!(f, "  group {}: {}", gi + 1, all)?;
            for (ci, c) in group.iter().enumerate() {
                writeln!(f, "    clause {}: {}: {}", ci + 1, c.result, c.detail)?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Compilation of one clause
// ---------------------------------------------------------------------------------------------

/// A problem with one clause, before it is placed in its group.
struct Problem {
    kind: ScopeErrorKind,
    message: String,
    hint: Option<String>,
}

impl Problem {
    fn new(kind: ScopeErrorKind, message: String) -> Problem {
        Problem {
            kind,
            message,
            hint: None,
        }
    }

    fn hint(mut self, hint: impl Into<String>) -> Problem {
        self.hint = Some(hint.into());
        self
    }
}

fn compile_clause(family: Family, spec: &ClauseSpec) -> Result<Clause, Problem> {
    let operator = resolve_operator(family, &spec.operator)?;
    let attribute = spec.attribute.trim();
    let ignores_attribute = matches!(
        operator,
        Operator::ConnectSync(ConnectSyncOperator::IsMemberOf | ConnectSyncOperator::IsNotMemberOf)
    );
    if attribute.is_empty() && !ignores_attribute {
        return Err(Problem::new(
            ScopeErrorKind::MissingAttribute,
            format!("{operator} needs an attribute name, and the clause has none"),
        ));
    }
    let value = spec.value.as_ref().filter(|v| !v.is_null());
    let on_dn = !ignores_attribute && attribute.eq_ignore_ascii_case(DN_ATTRIBUTE);
    let (value, operand) = if on_dn {
        compile_dn_operand(operator, value)?
    } else {
        compile_operand(operator, value)?
    };
    Ok(Clause {
        attribute: attribute.to_owned(),
        on_dn,
        slot: usize::MAX,
        operator,
        value,
        operand,
    })
}

/// The pseudo-attribute that names the object's DN in a clause.
pub const DN_ATTRIBUTE: &str = "dn";

/// What a `dn` clause's operator tests (see the module documentation).
#[derive(Clone, Copy, PartialEq, Eq)]
enum DnTest {
    /// No value: null tests.
    Presence,
    /// A DN value.
    Dn,
    /// A regular expression over the DN's text.
    Pattern,
}

/// How `operator` tests a DN, or `None` when it cannot.
fn dn_test(operator: Operator) -> Option<DnTest> {
    use ConnectSyncOperator as C;
    use ProvisioningOperator as P;
    match operator {
        Operator::Provisioning(P::IsNull | P::IsNotNull)
        | Operator::ConnectSync(C::IsNull | C::IsNotNull) => Some(DnTest::Presence),
        Operator::Provisioning(P::Equals | P::NotEquals | P::EndsWith | P::Includes)
        | Operator::ConnectSync(
            C::Equal
            | C::NotEqual
            | C::IsIn
            | C::IsNotIn
            | C::StartsWith
            | C::NotStartsWith
            | C::EndsWith
            | C::NotEndsWith
            | C::Contains
            | C::NotContains,
        ) => Some(DnTest::Dn),
        Operator::Provisioning(P::RegexMatch | P::NotRegexMatch) => Some(DnTest::Pattern),
        _ => None,
    }
}

/// Compiles the value of a clause on `dn`: a DN parsed now, a regular expression, or none.
fn compile_dn_operand(
    operator: Operator,
    value: Option<&serde_json::Value>,
) -> Result<(Option<String>, Operand), Problem> {
    let Some(test) = dn_test(operator) else {
        let usable: Vec<String> = operator
            .family()
            .operators()
            .into_iter()
            .filter(|o| dn_test(*o).is_some())
            .map(|o| format!("{:?}", o.name()))
            .collect();
        return Err(Problem::new(
            ScopeErrorKind::DnOperator,
            format!("{operator} cannot compare DNs (the attribute `dn` is the object's DN)"),
        )
        .hint(format!(
            "on `dn` the {} operators are {}",
            operator.family().title(),
            usable.join(", ")
        )));
    };
    if test != DnTest::Dn {
        return compile_operand(operator, value);
    }
    let Some(value) = value else {
        return Err(Problem::new(
            ScopeErrorKind::MissingValue,
            format!("{operator} on `dn` needs a DN, and the clause has none"),
        ));
    };
    let serde_json::Value::String(text) = value else {
        return Err(Problem::new(
            ScopeErrorKind::WrongValueType,
            format!(
                "{operator} on `dn` needs a DN (a string), but the value is {}",
                json_kind(value)
            ),
        ));
    };
    match Dn::parse(text) {
        Ok(dn) if !dn.is_root() => Ok((Some(text.clone()), Operand::Dn(Box::new(dn)))),
        Ok(_) => Err(Problem::new(
            ScopeErrorKind::InvalidDn { position: 0 },
            format!("{operator} on `dn` needs a DN, but the value is empty"),
        )
        .hint("write an RFC 4514 DN such as \"OU=Staff,DC=example,DC=com\"")),
        Err(e) => Err(Problem::new(
            ScopeErrorKind::InvalidDn {
                position: e.position(),
            },
            format!(
                "invalid DN {text:?} at position {}: {}",
                e.position(),
                e.message()
            ),
        )
        .hint("write an RFC 4514 DN such as \"OU=Staff,DC=example,DC=com\"")),
    }
}

/// Whether the byte at `pos` of a normalized DN is preceded by an even number of backslashes
/// (so a `,` there separates RDNs).
fn unescaped_at(b: &[u8], pos: usize) -> bool {
    let before = b.get(..pos).unwrap_or(&[]);
    before.iter().rev().take_while(|c| **c == b'\\').count() % 2 == 0
}

/// Whether `run`'s RDNs occur in `dn` one after the other, starting at an RDN boundary:
/// first (`at_start`), last (`at_end`), or anywhere when neither is asked.
fn holds_rdns(dn: &Dn, run: &Dn, at_start: bool, at_end: bool) -> bool {
    let (me, want) = (dn.normalized().as_bytes(), run.normalized().as_bytes());
    if want.is_empty() || run.len() > dn.len() {
        return false;
    }
    let boundary_before =
        |i: usize| i == 0 || (me.get(i - 1) == Some(&b',') && unescaped_at(me, i - 1));
    let boundary_after =
        |end: usize| end == me.len() || (me.get(end) == Some(&b',') && unescaped_at(me, end));
    let Some(last) = me.len().checked_sub(want.len()) else {
        return false;
    };
    let starts = match (at_start, at_end) {
        (true, _) => 0..=0,
        (false, true) => last..=last,
        (false, false) => 0..=last,
    };
    for i in starts {
        let end = i + want.len();
        if me.get(i..end) == Some(want)
            && boundary_before(i)
            && boundary_after(end)
            && (!at_end || end == me.len())
        {
            return true;
        }
    }
    false
}

fn resolve_operator(family: Family, name: &str) -> Result<Operator, Problem> {
    if let Some(op) = Operator::parse(family, name) {
        return Ok(op);
    }
    if family == Family::Provisioning {
        if let Some((canonical, message, hint)) = UNSUPPORTED_PROVISIONING
            .iter()
            .find(|(n, _, _)| n.eq_ignore_ascii_case(name))
        {
            let problem = Problem::new(
                ScopeErrorKind::UnsupportedOperator,
                format!("{canonical:?} {message}"),
            );
            return Err(if hint.is_empty() {
                problem
            } else {
                problem.hint(*hint)
            });
        }
    }
    let other = match family {
        Family::Provisioning => Family::ConnectSync,
        Family::ConnectSync => Family::Provisioning,
    };
    if let Some(op) = Operator::parse(other, name) {
        let suggestion = EQUIVALENTS.iter().find_map(|(p, c)| match family {
            Family::Provisioning => (*c == op.name()).then_some(*p),
            Family::ConnectSync => (*p == op.name()).then_some(*c),
        });
        let problem = Problem::new(
            ScopeErrorKind::OtherFamilyOperator { suggestion },
            format!(
                "{:?} is a {} operator, but this filter's family is {}",
                op.name(),
                other.title(),
                family.name()
            ),
        );
        return Err(match suggestion {
            Some(s) => problem.hint(format!("use {s:?}")),
            None => problem.hint(format!(
                "it has no {} equivalent; set the family to {:?} to use it",
                family.title(),
                other.name()
            )),
        });
    }
    let suggestion = closest_operator(family, name);
    let problem = Problem::new(
        ScopeErrorKind::UnknownOperator { suggestion },
        format!(
            "unknown operator {:?} in the {} family",
            name,
            family.name()
        ),
    );
    Err(match suggestion {
        Some(s) => problem.hint(format!("did you mean {s:?}?")),
        None => {
            let names: Vec<String> = family
                .operators()
                .iter()
                .map(|o| format!("{:?}", o.name()))
                .collect();
            problem.hint(format!("the operators are {}", names.join(", ")))
        }
    })
}

/// The family's operator closest to `name` (ignoring case, spaces and underscores), if it is
/// close enough to be a likely typo.
fn closest_operator(family: Family, name: &str) -> Option<&'static str> {
    let key = |s: &str| -> String { s.chars().filter(|c| *c != ' ' && *c != '_').collect() };
    let wanted = key(name);
    let len = wanted.chars().count();
    if len == 0 || len > 64 {
        return None;
    }
    let limit = (len / 3).max(1);
    let mut best: Option<(usize, &'static str)> = None;
    for op in family.operators() {
        let d = super::expr::edit_distance(&wanted, &key(op.name()));
        if d <= limit && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, op.name()));
        }
    }
    best.map(|(_, n)| n)
}

/// Describes a JSON value's type for messages.
fn json_kind(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "null".to_owned(),
        serde_json::Value::Bool(b) => format!("the Boolean {b}"),
        serde_json::Value::Number(n) => format!("the number {n}"),
        serde_json::Value::String(s) => format!("the string {s:?}"),
        serde_json::Value::Array(_) => "a list".to_owned(),
        serde_json::Value::Object(_) => "a table/object".to_owned(),
    }
}

/// The text of a string, integer or Boolean clause value; `None` for other JSON types.
fn json_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Bool(true) => Some("True".to_owned()),
        serde_json::Value::Bool(false) => Some("False".to_owned()),
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

fn compile_operand(
    operator: Operator,
    value: Option<&serde_json::Value>,
) -> Result<(Option<String>, Operand), Problem> {
    let kind = operator.operand();
    if kind == OperandKind::None {
        return match value {
            None => Ok((None, Operand::None)),
            Some(serde_json::Value::String(s)) if s.is_empty() => Ok((None, Operand::None)),
            Some(v) => Err(Problem::new(
                ScopeErrorKind::UnexpectedValue,
                format!(
                    "{operator} takes no value, but the clause has {}",
                    json_kind(v)
                ),
            )
            .hint("remove the value")),
        };
    }
    let expected = match kind {
        OperandKind::Pattern => "a regular expression (a string)",
        OperandKind::Integer => "an integer",
        OperandKind::Mask => "a non-zero integer bit mask",
        OperandKind::GroupDn => "a group DN (a string)",
        OperandKind::Text | OperandKind::None => "a string",
    };
    let Some(value) = value else {
        return Err(Problem::new(
            ScopeErrorKind::MissingValue,
            format!("{operator} needs a value ({expected}), and the clause has none"),
        ));
    };
    let wrong_type = || {
        Problem::new(
            ScopeErrorKind::WrongValueType,
            format!(
                "{operator} needs {expected}, but the value is {}",
                json_kind(value)
            ),
        )
    };
    match kind {
        OperandKind::None | OperandKind::Text => {
            let text = json_text(value).ok_or_else(wrong_type)?;
            Ok((Some(text.clone()), Operand::Text(TextOperand::new(text))))
        }
        OperandKind::Pattern => {
            let serde_json::Value::String(pattern) = value else {
                return Err(wrong_type());
            };
            match DotNetRegex::new(pattern) {
                Ok(re) => Ok((Some(pattern.clone()), Operand::Regex(Box::new(re)))),
                Err(e) => Err(Problem::new(
                    ScopeErrorKind::InvalidRegex { offset: e.offset },
                    format!(
                        "invalid regular expression {pattern:?} at offset {}: {}",
                        e.offset, e.message
                    ),
                )),
            }
        }
        OperandKind::Integer | OperandKind::Mask => {
            let n = match value {
                serde_json::Value::Number(n) => n.as_i64(),
                serde_json::Value::String(s) => integer_text(s),
                _ => None,
            }
            .ok_or_else(|| {
                wrong_type().hint("write decimal digits with an optional sign, e.g. 10 or \"10\"")
            })?;
            if kind == OperandKind::Mask && n == 0 {
                return Err(Problem::new(
                    ScopeErrorKind::ZeroMask,
                    format!("{operator} needs a non-zero mask, and 0 has no bits to test"),
                )
                .hint("use the bit value, e.g. 2 for ACCOUNTDISABLE in userAccountControl"));
            }
            Ok((Some(n.to_string()), Operand::Integer(n)))
        }
        OperandKind::GroupDn => {
            let serde_json::Value::String(text) = value else {
                return Err(wrong_type());
            };
            if text.trim().is_empty() {
                return Err(Problem::new(
                    ScopeErrorKind::InvalidDn { position: 0 },
                    format!("{operator} needs a group DN, but the value is empty"),
                ));
            }
            match Dn::parse(text) {
                Ok(dn) => Ok((Some(text.clone()), Operand::Group(Box::new(dn)))),
                Err(e) => Err(Problem::new(
                    ScopeErrorKind::InvalidDn {
                        position: e.position(),
                    },
                    format!(
                        "invalid group DN {text:?} at position {}: {}",
                        e.position(),
                        e.message()
                    ),
                )
                .hint("write an RFC 4514 DN such as \"CN=Sales,OU=Groups,DC=example,DC=com\"")),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

/// The object's direct group memberships, fetched at most once and only when needed.
struct Members<'a> {
    fetch: &'a dyn Fn() -> Vec<Dn>,
    groups: OnceCell<Vec<Dn>>,
}

impl<'a> Members<'a> {
    fn new(fetch: &'a dyn Fn() -> Vec<Dn>) -> Members<'a> {
        Members {
            fetch,
            groups: OnceCell::new(),
        }
    }

    fn get(&self) -> &[Dn] {
        self.groups.get_or_init(|| (self.fetch)())
    }
}

/// One attribute value as a clause sees it (spec §7.2): the value and its text, the text read
/// once — borrowed for strings and Booleans, kept as the number for integers (written out only
/// when a test reads it as text), made once for timestamps, bytes and references. Built only for
/// values whose text is not empty.
struct Item<'v> {
    value: &'v Value,
    text: ItemText<'v>,
}

/// The text of an [`Item`] as it is kept.
enum ItemText<'v> {
    Borrowed(&'v str),
    Integer(i64),
    Owned(String),
}

impl<'v> Item<'v> {
    /// The item for `value`, or `None` when its text is empty (such values are dropped, §7.2).
    /// Strings, integers and Booleans cost no allocation.
    #[inline]
    fn new(value: &'v Value, entry: &dyn AttributeSource) -> Option<Item<'v>> {
        let text = match value {
            Value::String(s) => {
                let s = s.as_str();
                if s.is_empty() {
                    return None;
                }
                ItemText::Borrowed(s)
            }
            Value::Integer(i) => ItemText::Integer(*i),
            Value::Boolean(true) => ItemText::Borrowed("True"),
            Value::Boolean(false) => ItemText::Borrowed("False"),
            _ => {
                let owned = match value {
                    Value::Reference(r) => crate::rules::eval::reference_text(entry, r),
                    other => owned_text(other),
                };
                if owned.is_empty() {
                    return None;
                }
                ItemText::Owned(owned)
            }
        };
        Some(Item { value, text })
    }

    /// The value's text (spec §7.2, §4.3): strings as they are, integers in decimal, Booleans as
    /// `True`/`False`, timestamps as `M/d/yyyy h:mm:ss tt` in UTC, bytes as Base64, references as
    /// their DN or id.
    #[inline]
    fn text(&self) -> Text<'_> {
        match &self.text {
            ItemText::Borrowed(s) => Text::Borrowed(s),
            ItemText::Owned(s) => Text::Borrowed(s),
            ItemText::Integer(i) => Text::Integer(IntText::new(*i)),
        }
    }
}

/// The text of a timestamp, bytes or a reference (see [`Item::text`]); empty for other values,
/// whose text [`Item::new`] borrows.
#[cold]
fn owned_text(value: &Value) -> String {
    match value {
        Value::Timestamp(t) => t.format("%-m/%-d/%Y %-I:%M:%S %p").to_string(),
        Value::Bytes(b) => base64::engine::general_purpose::STANDARD.encode(b),
        Value::Reference(r) => r.to_string(),
        Value::String(_) | Value::Integer(_) | Value::Boolean(_) => String::new(),
    }
}

/// A value's text: borrowed, or an integer written on the stack.
enum Text<'a> {
    Borrowed(&'a str),
    Integer(IntText),
}

impl std::ops::Deref for Text<'_> {
    type Target = str;

    #[inline]
    fn deref(&self) -> &str {
        match self {
            Text::Borrowed(s) => s,
            Text::Integer(d) => d.as_str(),
        }
    }
}

/// An `i64` in decimal, in a buffer wide enough for `-9223372036854775808`.
struct IntText {
    digits: [u8; 20],
    start: usize,
}

impl IntText {
    fn new(n: i64) -> IntText {
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        let mut rest = n.unsigned_abs();
        loop {
            start -= 1;
            digits[start] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        if n < 0 {
            start -= 1;
            digits[start] = b'-';
        }
        IntText { digits, start }
    }

    fn as_str(&self) -> &str {
        // Only ASCII digits and '-' are ever written, so this never falls back.
        self.digits
            .get(self.start..)
            .and_then(|d| std::str::from_utf8(d).ok())
            .unwrap_or_default()
    }
}

/// The values of `name` (bound as `slot`) with empty texts dropped (spec §7.2), collected (for
/// explanations).
fn items<'v>(
    entry: &'v dyn AttributeSource,
    name: &str,
    slot: usize,
) -> smallvec::SmallVec<[Item<'v>; 2]> {
    entry
        .values(name, slot)
        .map(|values| values.iter().filter_map(|v| Item::new(v, entry)).collect())
        .unwrap_or_default()
}

/// Integer-like text: optional sign and ASCII digits, within 64 bits.
fn integer_text(s: &str) -> Option<i64> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Boolean-like text: `true`/`false` in any case.
fn boolean_text(s: &str) -> Option<bool> {
    if s.eq_ignore_ascii_case("true") {
        Some(true)
    } else if s.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

fn integer_like(item: &Item<'_>) -> Option<i64> {
    match item.value {
        Value::Integer(i) => Some(*i),
        _ => integer_text(&item.text()),
    }
}

fn boolean_like(item: &Item<'_>) -> Option<bool> {
    match item.value {
        Value::Boolean(b) => Some(*b),
        _ => boolean_text(&item.text()),
    }
}

/// Simple case folding of one character: the lower case of its upper case, where both are single
/// characters (so `ς`, `ſ` and `µ` fold like `σ`, `s` and `μ`); dotless `ı` and dotted `İ` fold to
/// themselves, as in Unicode's simple (non-Turkic) folding.
fn fold_char(c: char) -> char {
    if c.is_ascii() {
        return c.to_ascii_lowercase();
    }
    if c == '\u{131}' {
        return c;
    }
    let upper = single(c.to_uppercase()).unwrap_or(c);
    single(upper.to_lowercase())
        .or_else(|| single(c.to_lowercase()))
        .unwrap_or(c)
}

/// The only character of `it`, if it yields exactly one.
fn single(mut it: impl Iterator<Item = char>) -> Option<char> {
    let first = it.next()?;
    it.next().is_none().then_some(first)
}

/// Simple case folding of a string.
fn fold(s: &str) -> String {
    s.chars().map(fold_char).collect()
}

/// How many leading bytes of `text` fold to the leading bytes of `folded` one for one: the
/// length of the ASCII run of `text` whose lower case `folded` starts with (an ASCII character
/// folds to one ASCII byte). Both strings have a character boundary there.
#[inline(always)]
fn ascii_folded_prefix(text: &str, folded: &str) -> usize {
    text.bytes()
        .zip(folded.bytes())
        .take_while(|(a, b)| a.is_ascii() && a.to_ascii_lowercase() == *b)
        .count()
}

/// `fold(text) == folded`, without allocating: byte by byte while `text` is ASCII, then character
/// by character.
#[inline(always)]
fn folded_eq(text: &str, folded: &str) -> bool {
    let n = ascii_folded_prefix(text, folded);
    match text.as_bytes().get(n) {
        None => n == folded.len(),
        // An ASCII character that differs, or more text than `folded`.
        Some(b) if b.is_ascii() => false,
        Some(_) => folded_eq_from(text, folded, n),
    }
}

/// [`folded_eq`] from byte `n` of both strings on, character by character.
fn folded_eq_from(text: &str, folded: &str, n: usize) -> bool {
    match (text.get(n..), folded.get(n..)) {
        (Some(text), Some(folded)) => text.chars().map(fold_char).eq(folded.chars()),
        _ => false,
    }
}

/// `fold(text).starts_with(folded)`, without allocating: byte by byte while `text` is ASCII, then
/// character by character.
#[inline(always)]
fn folded_starts_with(text: &str, folded: &str) -> bool {
    let n = ascii_folded_prefix(text, folded);
    if n == folded.len() {
        return true;
    }
    match text.as_bytes().get(n) {
        Some(b) if !b.is_ascii() => folded_starts_with_from(text, folded, n),
        // The text ended, or an ASCII character differs.
        _ => false,
    }
}

/// [`folded_starts_with`] from byte `n` of both strings on, character by character.
fn folded_starts_with_from(text: &str, folded: &str, n: usize) -> bool {
    match (text.get(n..), folded.get(n..)) {
        (Some(text), Some(folded)) => {
            let mut t = text.chars().map(fold_char);
            folded.chars().all(|c| t.next() == Some(c))
        }
        _ => false,
    }
}

/// `fold(text).ends_with(folded)`, without allocating for ASCII text.
fn folded_ends_with(text: &str, folded: &str) -> bool {
    if text.is_ascii() {
        text.len()
            .checked_sub(folded.len())
            .and_then(|start| text.as_bytes().get(start..))
            .is_some_and(|tail| {
                tail.iter()
                    .zip(folded.bytes())
                    .all(|(a, b)| a.to_ascii_lowercase() == b)
            })
    } else {
        fold(text).ends_with(folded)
    }
}

/// `fold(text).contains(folded)`, without allocating for ASCII text.
fn folded_contains(text: &str, folded: &str) -> bool {
    if text.is_ascii() {
        let n = folded.len();
        n == 0
            || text.as_bytes().windows(n).any(|w| {
                w.iter()
                    .zip(folded.bytes())
                    .all(|(a, b)| a.to_ascii_lowercase() == b)
            })
    } else {
        fold(text).contains(folded)
    }
}

/// Renders attribute values for explanations: `"Sales"` or `["a", "b"]` (at most five shown).
fn render_items(items: &[Item<'_>]) -> String {
    match items {
        [one] => format!("{:?}", &*one.text()),
        _ => {
            let shown: Vec<String> = items
                .iter()
                .take(5)
                .map(|i| format!("{:?}", &*i.text()))
                .collect();
            let more = if items.len() > 5 {
                format!(", … ({} values)", items.len())
            } else {
                String::new()
            };
            format!("[{}{more}]", shown.join(", "))
        }
    }
}

/// How the per-value results of a clause combine.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quantifier {
    All,
    Any,
}

impl Quantifier {
    /// Whether a value whose test came out `holds` decides the clause: a failing one for "all",
    /// a passing one for "any". Both evaluation paths stop at the first such value.
    #[inline]
    fn decides(self, holds: bool) -> bool {
        match self {
            Quantifier::All => !holds,
            Quantifier::Any => holds,
        }
    }

    /// The clause's outcome on a non-null attribute, given whether a deciding value was found.
    #[inline]
    fn outcome(self, decided: bool) -> bool {
        match self {
            Quantifier::All => !decided,
            Quantifier::Any => decided,
        }
    }
}

/// The per-value test the boolean path applies (see [`Clause::walk`]).
#[derive(Clone, Copy)]
enum ValueTest {
    Provisioning(ProvisioningOperator),
    ConnectSync(ConnectSyncOperator),
}

/// How a positive Connect Sync operator tests a non-null attribute: the quantifier and the
/// per-value test (`ISIN` is "any value equals").
fn connect_sync_per_value(op: ConnectSyncOperator) -> (Quantifier, ConnectSyncOperator) {
    match op {
        ConnectSyncOperator::IsIn => (Quantifier::Any, ConnectSyncOperator::Equal),
        _ => (Quantifier::All, op),
    }
}

impl Clause {
    /// Whether the clause is true for the object: the result [`explain`](Self::explain) gives,
    /// without its detail. The values are tested one at a time as they come (none is collected,
    /// no message is built) and the walk stops at the value that decides.
    #[inline(always)]
    fn holds(&self, entry: &dyn AttributeSource, members: &Members<'_>) -> bool {
        if self.on_dn {
            return self.dn_result(entry.dn());
        }
        match self.operator {
            Operator::Provisioning(op) => self.provisioning_result(op, entry),
            Operator::ConnectSync(op) => match op.complement_of() {
                None => self.connect_sync_result(op, entry, members),
                Some(positive) => !self.connect_sync_result(positive, entry, members),
            },
        }
    }

    /// [`check_provisioning`](Self::check_provisioning)'s result alone.
    #[inline(always)]
    fn provisioning_result(&self, op: ProvisioningOperator, entry: &dyn AttributeSource) -> bool {
        use ProvisioningOperator as P;
        match op {
            P::IsNull => !self.has_value(entry),
            P::IsNotNull => self.has_value(entry),
            _ => self.walk(entry, Quantifier::All, ValueTest::Provisioning(op)),
        }
    }

    /// [`check_connect_sync`](Self::check_connect_sync)'s result alone, for a positive operator.
    #[inline(always)]
    fn connect_sync_result(
        &self,
        op: ConnectSyncOperator,
        entry: &dyn AttributeSource,
        members: &Members<'_>,
    ) -> bool {
        use ConnectSyncOperator as C;
        match op {
            C::IsMemberOf | C::IsNotMemberOf => self
                .membership(members)
                .is_some_and(|(member, _, _)| member),
            C::IsNull => !self.has_value(entry),
            C::IsNotNull => self.has_value(entry),
            _ => {
                let (q, test) = connect_sync_per_value(op);
                self.walk(entry, q, ValueTest::ConnectSync(test))
            }
        }
    }

    /// Whether the clause's attribute has a value whose text is not empty (is not null, §7.2).
    #[inline]
    fn has_value(&self, entry: &dyn AttributeSource) -> bool {
        entry
            .values(&self.attribute, self.slot)
            .is_some_and(|values| values.iter().any(|v| Item::new(v, entry).is_some()))
    }

    /// Tests the values of the clause's attribute one at a time, skipping those with empty text,
    /// up to the value that decides; false on a null attribute (every operator tested per value
    /// is false there).
    #[inline(always)]
    fn walk(&self, entry: &dyn AttributeSource, quantifier: Quantifier, test: ValueTest) -> bool {
        let Some(values) = entry.values(&self.attribute, self.slot) else {
            return false;
        };
        let mut seen = false;
        for value in values.iter() {
            if let Some(item) = Item::new(value, entry) {
                let holds = match test {
                    ValueTest::Provisioning(op) => self.provisioning_holds(op, &item),
                    ValueTest::ConnectSync(op) => self.connect_sync_holds(op, &item),
                };
                if quantifier.decides(holds) {
                    return quantifier.outcome(true);
                }
                seen = true;
            }
        }
        seen && quantifier.outcome(false)
    }

    /// Whether the object is a direct member of the clause's group, with the group and the
    /// object's memberships (fetched at most once per evaluation); `None` for a clause without a
    /// group.
    fn membership<'s, 'm>(&'s self, members: &'m Members<'_>) -> Option<(bool, &'s Dn, &'m [Dn])> {
        let Operand::Group(group) = &self.operand else {
            return None;
        };
        let groups = members.get();
        Some((groups.iter().any(|g| g == group.as_ref()), group, groups))
    }

    /// The positive test of a `dn` clause on the object's DN (root or none is null).
    fn dn_positive(&self, positive: Operator, dn: Option<&Dn>) -> bool {
        use ConnectSyncOperator as C;
        use ProvisioningOperator as P;
        let Some(dn) = dn.filter(|d| !d.is_root()) else {
            return matches!(
                positive,
                Operator::Provisioning(P::IsNull) | Operator::ConnectSync(C::IsNull)
            );
        };
        match (positive, &self.operand) {
            (Operator::Provisioning(P::IsNotNull) | Operator::ConnectSync(C::IsNotNull), _) => true,
            (
                Operator::Provisioning(P::Equals) | Operator::ConnectSync(C::Equal | C::IsIn),
                Operand::Dn(v),
            ) => dn == v.as_ref(),
            (Operator::Provisioning(P::NotEquals), Operand::Dn(v)) => dn != v.as_ref(),
            (
                Operator::Provisioning(P::EndsWith) | Operator::ConnectSync(C::EndsWith),
                Operand::Dn(v),
            ) => holds_rdns(dn, v, false, true),
            (Operator::ConnectSync(C::StartsWith), Operand::Dn(v)) => {
                holds_rdns(dn, v, true, false)
            }
            (
                Operator::Provisioning(P::Includes) | Operator::ConnectSync(C::Contains),
                Operand::Dn(v),
            ) => holds_rdns(dn, v, false, false),
            (Operator::Provisioning(P::RegexMatch), Operand::Regex(re)) => re.is_match(dn.as_str()),
            (Operator::Provisioning(P::NotRegexMatch), Operand::Regex(re)) => {
                !re.is_match(dn.as_str())
            }
            // IS NULL on a DN, and operators compile refuses on `dn`.
            _ => false,
        }
    }

    /// Whether a `dn` clause holds (Connect Sync negatives as complements, §7.4).
    #[inline]
    fn dn_result(&self, dn: Option<&Dn>) -> bool {
        match self.operator {
            Operator::ConnectSync(op) => match op.complement_of() {
                Some(positive) => !self.dn_positive(Operator::ConnectSync(positive), dn),
                None => self.dn_positive(self.operator, dn),
            },
            Operator::Provisioning(_) => self.dn_positive(self.operator, dn),
        }
    }

    /// [`dn_result`](Self::dn_result) and why.
    fn dn_explain(&self, dn: Option<&Dn>) -> (bool, String) {
        use ConnectSyncOperator as C;
        use ProvisioningOperator as P;
        let result = self.dn_result(dn);
        let Some(dn) = dn.filter(|d| !d.is_root()) else {
            return (
                result,
                format!("the object has no DN, so {} is {result}", self.operator),
            );
        };
        let positive = match self.operator {
            Operator::ConnectSync(op) => Operator::ConnectSync(op.complement_of().unwrap_or(op)),
            Operator::Provisioning(P::NotEquals) => Operator::Provisioning(P::Equals),
            Operator::Provisioning(P::NotRegexMatch) => Operator::Provisioning(P::RegexMatch),
            other => other,
        };
        let holds = self.dn_positive(positive, Some(dn));
        let t = |yes: &str, no: &str| if holds { yes } else { no }.to_owned();
        let value = match &self.operand {
            Operand::Dn(v) => format!("{:?}", v.as_str()),
            Operand::Regex(re) => format!("/{}/", re.pattern()),
            _ => String::new(),
        };
        let how = match positive {
            Operator::Provisioning(P::IsNotNull | P::IsNull)
            | Operator::ConnectSync(C::IsNotNull | C::IsNull) => "is present".to_owned(),
            Operator::Provisioning(P::Equals) | Operator::ConnectSync(C::Equal | C::IsIn) => {
                t("is ", "is not ") + &value
            }
            Operator::Provisioning(P::EndsWith) | Operator::ConnectSync(C::EndsWith) => {
                t("is at or below ", "is not at or below ") + &value
            }
            Operator::ConnectSync(C::StartsWith) => {
                t(
                    "starts with the RDNs of ",
                    "does not start with the RDNs of ",
                ) + &value
            }
            Operator::Provisioning(P::Includes) | Operator::ConnectSync(C::Contains) => {
                t("holds the RDNs of ", "does not hold the RDNs of ") + &value
            }
            Operator::Provisioning(P::RegexMatch) => t("matches ", "does not match ") + &value,
            _ => String::new(),
        };
        let mut detail = format!("dn {:?} {how}", dn.as_str());
        if positive != self.operator {
            detail.push_str(&format!(", so {} is {result}", self.operator));
        }
        (result, detail)
    }

    /// Evaluates the clause and says why it is true or false.
    fn explain(&self, entry: &dyn AttributeSource, members: &Members<'_>) -> (bool, String) {
        if self.on_dn {
            return self.dn_explain(entry.dn());
        }
        match self.operator {
            Operator::Provisioning(op) => self.check_provisioning(op, entry),
            Operator::ConnectSync(op) => match op.complement_of() {
                None => self.check_connect_sync(op, entry, members, false),
                Some(positive) => {
                    let (result, detail) = self.check_connect_sync(positive, entry, members, true);
                    let detail = format!(
                        "{detail}, so {} is {result} and {} is {}",
                        positive.name(),
                        op.name(),
                        !result
                    );
                    (!result, detail)
                }
            },
        }
    }

    fn check_provisioning(
        &self,
        op: ProvisioningOperator,
        entry: &dyn AttributeSource,
    ) -> (bool, String) {
        use ProvisioningOperator as P;
        let items = items(entry, &self.attribute, self.slot);
        let attr = &self.attribute;
        if items.is_empty() {
            let result = op == P::IsNull;
            let detail = if result {
                format!("{attr} is null/empty")
            } else {
                format!("{attr} is null/empty, so {} is false", op.name())
            };
            return (result, detail);
        }
        match op {
            P::IsNull | P::IsNotNull => {
                let result = op == P::IsNotNull;
                let detail = format!("{attr} = {} is not null/empty", render_items(&items));
                (result, detail)
            }
            _ => self.quantified(&items, Quantifier::All, |item| {
                self.provisioning_holds(op, item)
            }),
        }
    }

    /// The provisioning test on one value (both evaluation paths).
    #[inline(always)]
    fn provisioning_holds(&self, op: ProvisioningOperator, item: &Item<'_>) -> bool {
        use ProvisioningOperator as P;
        match (op, &self.operand) {
            (P::Equals, Operand::Text(t)) => *item.text() == *t.raw,
            (P::NotEquals, Operand::Text(t)) => *item.text() != *t.raw,
            (P::Includes, Operand::Text(t)) => item.text().contains(t.raw.as_str()),
            (P::EndsWith, Operand::Text(t)) => item.text().ends_with(t.raw.as_str()),
            (P::OccursIn, Operand::Text(t)) => t.raw.contains(&*item.text()),
            (P::NotOccursIn, Operand::Text(t)) => !t.raw.contains(&*item.text()),
            (P::IsTrue, _) => boolean_like(item) == Some(true),
            (P::IsFalse, _) => boolean_like(item) == Some(false),
            (P::RegexMatch, Operand::Regex(re)) => re.is_match(&item.text()),
            (P::NotRegexMatch, Operand::Regex(re)) => !re.is_match(&item.text()),
            (P::GreaterThan, Operand::Integer(n)) => integer_like(item).is_some_and(|v| v > *n),
            (P::GreaterThanOrEquals, Operand::Integer(n)) => {
                integer_like(item).is_some_and(|v| v >= *n)
            }
            // IS NULL / IS NOT NULL are decided on the attribute, and compile pairs every other
            // operator with its operand kind.
            _ => false,
        }
    }

    /// Evaluates a positive Connect Sync operator. `negated` is set when the clause's operator is
    /// its complement; the caller then states the conclusion in the detail.
    fn check_connect_sync(
        &self,
        op: ConnectSyncOperator,
        entry: &dyn AttributeSource,
        members: &Members<'_>,
        negated: bool,
    ) -> (bool, String) {
        use ConnectSyncOperator as C;
        if matches!(op, C::IsMemberOf | C::IsNotMemberOf) {
            let Some((result, group, groups)) = self.membership(members) else {
                return (false, String::new());
            };
            let detail = if result {
                format!("the object is a direct member of {:?}", group.as_str())
            } else {
                format!(
                    "the object is not a direct member of {:?} (it is a direct member of {} group{})",
                    group.as_str(),
                    groups.len(),
                    if groups.len() == 1 { "" } else { "s" }
                )
            };
            return (result, detail);
        }
        let items = items(entry, &self.attribute, self.slot);
        let attr = &self.attribute;
        if items.is_empty() {
            let result = op == C::IsNull;
            let detail = if result || negated {
                format!("{attr} is null/empty")
            } else {
                format!("{attr} is null/empty, so {} is false", op.name())
            };
            return (result, detail);
        }
        match op {
            C::IsNull | C::IsNotNull => {
                let result = op == C::IsNotNull;
                let detail = format!("{attr} = {} is not null/empty", render_items(&items));
                (result, detail)
            }
            _ => {
                let (q, test) = connect_sync_per_value(op);
                self.quantified(&items, q, |item| self.connect_sync_holds(test, item))
            }
        }
    }

    /// The positive Connect Sync test on one value (both evaluation paths).
    #[inline(always)]
    fn connect_sync_holds(&self, op: ConnectSyncOperator, item: &Item<'_>) -> bool {
        use ConnectSyncOperator as C;
        match (&self.operand, op) {
            (Operand::Integer(mask), C::IsBitSet) => {
                integer_like(item).is_some_and(|v| v & *mask == *mask)
            }
            (Operand::Text(t), C::Equal | C::IsIn) => match (item.value, t.boolean) {
                (Value::Boolean(b), Some(c)) => *b == c,
                _ => folded_eq(&item.text(), &t.folded),
            },
            (Operand::Text(t), C::Contains) => folded_contains(&item.text(), &t.folded),
            (Operand::Text(t), C::StartsWith) => folded_starts_with(&item.text(), &t.folded),
            (Operand::Text(t), C::EndsWith) => folded_ends_with(&item.text(), &t.folded),
            (Operand::Text(t), C::LessThan) => order(item, t) == Ordering::Less,
            (Operand::Text(t), C::LessThanOrEqual) => order(item, t) != Ordering::Greater,
            (Operand::Text(t), C::GreaterThan) => order(item, t) == Ordering::Greater,
            (Operand::Text(t), C::GreaterThanOrEqual) => order(item, t) != Ordering::Less,
            // Negative forms are evaluated through their positive form; null tests and
            // memberships are decided before per-value tests.
            _ => false,
        }
    }

    /// Combines a per-value test over `items` and says which value decided.
    fn quantified(
        &self,
        items: &[Item<'_>],
        quantifier: Quantifier,
        holds: impl Fn(&Item<'_>) -> bool,
    ) -> (bool, String) {
        let decisive = items.iter().find(|i| quantifier.decides(holds(i)));
        let result = quantifier.outcome(decisive.is_some());
        let head = format!("{} = {}", self.attribute, render_items(items));
        let detail = match (decisive, items) {
            (Some(item), [_]) => format!("{head} {}", self.phrase(item, result)),
            (Some(item), _) => format!("{head}: {:?} {}", &*item.text(), self.phrase(item, result)),
            (None, [item]) => format!("{head} {}", self.phrase(item, result)),
            (None, _) => {
                let (first, prefix) = match items.first() {
                    Some(first) if quantifier == Quantifier::All => (first, "every value"),
                    Some(first) => (first, "no value"),
                    None => return (result, head),
                };
                // Positive wording after both "every value" and "no value".
                format!("{head}: {prefix} {}", self.phrase(first, true))
            }
        };
        (result, detail)
    }

    /// Says what the clause's per-value test found for `item`: `holds` tells whether it passed.
    fn phrase(&self, item: &Item<'_>, holds: bool) -> String {
        use ConnectSyncOperator as C;
        use ProvisioningOperator as P;
        let t = |holds: bool, yes: &str, no: &str| if holds { yes } else { no }.to_owned();
        match (self.operator, &self.operand) {
            (Operator::Provisioning(op), operand) => {
                let raw = match operand {
                    Operand::Text(t) => format!("{:?}", t.raw),
                    Operand::Regex(re) => format!("/{}/", re.pattern()),
                    Operand::Integer(n) => n.to_string(),
                    _ => String::new(),
                };
                match op {
                    P::Equals => t(holds, "equals ", "is not ") + &raw,
                    P::NotEquals => t(holds, "is not ", "equals ") + &raw,
                    P::IsTrue => t(holds, "is true", "is not Boolean true"),
                    P::IsFalse => t(holds, "is false", "is not Boolean false"),
                    P::RegexMatch => t(holds, "matches ", "does not match ") + &raw,
                    P::NotRegexMatch => t(holds, "does not match ", "matches ") + &raw,
                    P::GreaterThan | P::GreaterThanOrEquals => {
                        let cmp = if op == P::GreaterThan { ">" } else { ">=" };
                        if integer_like(item).is_none() {
                            "is not an integer".to_owned()
                        } else {
                            t(holds, "is ", "is not ") + &format!("{cmp} {raw}")
                        }
                    }
                    P::Includes => t(holds, "contains ", "does not contain ") + &raw,
                    P::EndsWith => t(holds, "ends with ", "does not end with ") + &raw,
                    P::OccursIn => t(holds, "occurs in ", "does not occur in ") + &raw,
                    P::NotOccursIn => t(holds, "does not occur in ", "occurs in ") + &raw,
                    P::IsNull | P::IsNotNull => String::new(),
                }
            }
            (Operator::ConnectSync(_), Operand::Integer(mask)) => {
                if integer_like(item).is_none() {
                    "is not an integer".to_owned()
                } else {
                    t(holds, "has every bit of mask ", "lacks a bit of mask ") + &mask.to_string()
                }
            }
            (Operator::ConnectSync(op), Operand::Text(tx)) => {
                let raw = format!("{:?}", tx.raw);
                let how = if tx.integer.is_some() && integer_like(item).is_some() {
                    " (numerically)"
                } else {
                    " (as text, ignoring case)"
                };
                let ordered = |yes: &str, no: &str| t(holds, yes, no) + &raw + how;
                match op.complement_of().unwrap_or(op) {
                    C::Equal | C::IsIn => t(holds, "equals ", "is not ") + &raw,
                    C::Contains => t(holds, "contains ", "does not contain ") + &raw,
                    C::StartsWith => t(holds, "starts with ", "does not start with ") + &raw,
                    C::EndsWith => t(holds, "ends with ", "does not end with ") + &raw,
                    C::LessThan => ordered("is less than ", "is not less than "),
                    C::LessThanOrEqual => ordered("is at most ", "is greater than "),
                    C::GreaterThan => ordered("is greater than ", "is not greater than "),
                    C::GreaterThanOrEqual => ordered("is at least ", "is less than "),
                    _ => String::new(),
                }
            }
            (Operator::ConnectSync(_), _) => String::new(),
        }
    }
}

/// Orders an attribute value against a Connect Sync clause value (attribute on the left):
/// numerically when both are integer-like, else as case-folded strings by scalar value.
fn order(item: &Item<'_>, operand: &TextOperand) -> Ordering {
    match (integer_like(item), operand.integer) {
        (Some(a), Some(b)) => a.cmp(&b),
        // UTF-8 byte order is code point order: compare the folded characters as they come.
        _ => item
            .text()
            .chars()
            .map(fold_char)
            .cmp(operand.folded.chars()),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use chrono::TimeZone as _;
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn attrs(name: &str, values: Vec<Value>) -> Attributes {
        let mut a = Attributes::new();
        if !values.is_empty() {
            a.set(name, crate::model::Values::from(values));
        }
        a
    }

    fn s(v: &str) -> Value {
        Value::string(v)
    }

    fn one(family: Family, clause: ClauseSpec) -> ScopeFilter {
        let spec = FilterSpec {
            family,
            groups: vec![vec![clause]],
        };
        match ScopeFilter::compile(&spec) {
            Ok(f) => f,
            Err(e) => panic!("{spec:?} does not compile: {e:?}"),
        }
    }

    fn no_groups() -> Vec<Dn> {
        panic!("member_of must not be called")
    }

    /// Evaluates one clause on attribute `a`; checks that `explain` agrees with `evaluate`.
    fn run(family: Family, values: Vec<Value>, op: &str, value: Option<serde_json::Value>) -> bool {
        let f = one(
            family,
            ClauseSpec {
                attribute: "a".into(),
                operator: op.into(),
                value,
            },
        );
        let entry = attrs("a", values);
        let result = f.evaluate(&entry, &no_groups);
        let explanation = f.explain(&entry, &no_groups);
        assert_eq!(explanation.in_scope, result, "{explanation}");
        assert_eq!(explanation.groups[0][0].result, result);
        result
    }

    fn p(values: Vec<Value>, op: &str, value: impl Into<serde_json::Value>) -> bool {
        run(Family::Provisioning, values, op, Some(value.into()))
    }

    fn p0(values: Vec<Value>, op: &str) -> bool {
        run(Family::Provisioning, values, op, None)
    }

    fn c(values: Vec<Value>, op: &str, value: impl Into<serde_json::Value>) -> bool {
        run(Family::ConnectSync, values, op, Some(value.into()))
    }

    fn c0(values: Vec<Value>, op: &str) -> bool {
        run(Family::ConnectSync, values, op, None)
    }

    fn errors(family: Family, groups: Vec<Vec<ClauseSpec>>) -> Vec<ScopeError> {
        match ScopeFilter::compile(&FilterSpec { family, groups }) {
            Ok(_) => panic!("compiled"),
            Err(e) => e,
        }
    }

    fn error(family: Family, clause: ClauseSpec) -> ScopeError {
        let mut e = errors(family, vec![vec![clause]]);
        assert_eq!(e.len(), 1, "{e:?}");
        e.remove(0)
    }

    // ---- provisioning family --------------------------------------------------------------

    #[test]
    fn p_equals() {
        assert!(p(vec![s("Sales")], "EQUALS", "Sales"));
        assert!(!p(vec![s("Sales")], "EQUALS", "Eng"));
        assert!(!p(vec![s("sales")], "EQUALS", "Sales"), "case-sensitive");
        assert!(!p(vec![], "EQUALS", "Sales"));
        assert!(!p(vec![s("")], "EQUALS", ""), "empty values are discarded");
        assert!(p(vec![s("Sales"), s("Sales")], "EQUALS", "Sales"));
        assert!(
            !p(vec![s("Sales"), s("Eng")], "EQUALS", "Sales"),
            "all values"
        );
        assert!(p(vec![Value::Integer(5)], "EQUALS", "5"));
        assert!(p(vec![Value::Integer(5)], "EQUALS", 5));
        assert!(p(vec![Value::Boolean(true)], "EQUALS", "True"));
        assert!(p(vec![Value::Boolean(true)], "EQUALS", true));
        assert!(!p(vec![Value::Boolean(true)], "EQUALS", "TRUE"));
    }

    #[test]
    fn p_not_equals() {
        assert!(p(vec![s("Eng")], "NOT EQUALS", "Sales"));
        assert!(!p(vec![s("Sales")], "NOT EQUALS", "Sales"));
        assert!(p(vec![s("sales")], "NOT EQUALS", "Sales"), "case-sensitive");
        assert!(!p(vec![], "NOT EQUALS", "Sales"), "false on null");
        assert!(p(vec![s("a"), s("b")], "NOT EQUALS", "c"));
        assert!(!p(vec![s("a"), s("c")], "NOT EQUALS", "c"));
    }

    #[test]
    fn p_is_true_and_is_false() {
        assert!(p0(vec![Value::Boolean(true)], "IS TRUE"));
        assert!(p0(vec![s("TRUE")], "IS TRUE"));
        assert!(p0(vec![s("true")], "IS TRUE"));
        assert!(!p0(vec![s("yes")], "IS TRUE"));
        assert!(!p0(vec![Value::Integer(1)], "IS TRUE"), "not Boolean-like");
        assert!(!p0(vec![Value::Boolean(false)], "IS TRUE"));
        assert!(!p0(vec![], "IS TRUE"));
        assert!(p0(vec![Value::Boolean(true), s("True")], "IS TRUE"));
        assert!(!p0(vec![Value::Boolean(true), s("False")], "IS TRUE"));

        assert!(p0(vec![Value::Boolean(false)], "IS FALSE"));
        assert!(p0(vec![s("fAlSe")], "IS FALSE"));
        assert!(!p0(vec![s("no")], "IS FALSE"));
        assert!(!p0(vec![Value::Boolean(true)], "IS FALSE"));
        assert!(!p0(vec![], "IS FALSE"), "null is not false");
        assert!(!p0(vec![s("false"), s("true")], "IS FALSE"));
    }

    #[test]
    fn p_is_null_and_is_not_null() {
        assert!(p0(vec![], "IS NULL"));
        assert!(p0(vec![s("")], "IS NULL"));
        assert!(p0(vec![s(""), s("")], "IS NULL"));
        assert!(!p0(vec![s("x")], "IS NULL"));
        assert!(!p0(vec![s("x"), s("y")], "IS NULL"));
        assert!(!p0(vec![], "IS NOT NULL"));
        assert!(!p0(vec![s("")], "IS NOT NULL"));
        assert!(p0(vec![s("x")], "IS NOT NULL"));
        assert!(p0(vec![s(""), s("y")], "IS NOT NULL"));
        // An empty string value is accepted as "no value".
        assert!(p(vec![], "IS NULL", ""));
    }

    #[test]
    fn p_regex_match() {
        assert!(p(vec![s("12345")], "REGEX MATCH", r"^\d{5}$"));
        assert!(!p(vec![s("1234")], "REGEX MATCH", r"^\d{5}$"));
        assert!(
            p(vec![s("ab12")], "REGEX MATCH", r"\d"),
            "unanchored search"
        );
        assert!(!p(vec![s("ABC")], "REGEX MATCH", "abc"), "case-sensitive");
        assert!(p(vec![s("ABC")], "REGEX MATCH", "(?i)abc"));
        assert!(!p(vec![], "REGEX MATCH", ".*"));
        assert!(p(vec![s("a1"), s("b2")], "REGEX MATCH", r"\d"));
        assert!(!p(vec![s("a1"), s("b")], "REGEX MATCH", r"\d"));
        assert!(
            !p(vec![s("ab\n")], "REGEX MATCH", "b$"),
            "$ only at the very end"
        );
    }

    #[test]
    fn p_not_regex_match() {
        assert!(p(vec![s("abc")], "NOT REGEX MATCH", r"\d"));
        assert!(!p(vec![s("a1")], "NOT REGEX MATCH", r"\d"));
        assert!(
            !p(vec![], "NOT REGEX MATCH", r"\d"),
            "false on null (SCOPE)"
        );
        assert!(p(vec![s("a"), s("b")], "NOT REGEX MATCH", r"\d"));
        assert!(!p(vec![s("a"), s("b2")], "NOT REGEX MATCH", r"\d"));
        assert!(
            p(vec![s("ABC")], "NOT REGEX MATCH", "abc"),
            "case-sensitive"
        );
    }

    #[test]
    fn p_greater_than() {
        assert!(p(vec![Value::Integer(10)], "Greater_Than", 5));
        assert!(p(vec![s("10")], "Greater_Than", 5));
        assert!(p(vec![s("10")], "Greater_Than", "5"));
        assert!(!p(vec![Value::Integer(5)], "Greater_Than", 5));
        assert!(
            !p(vec![s("abc")], "Greater_Than", 5),
            "non-integer is false"
        );
        assert!(!p(vec![s("5.5")], "Greater_Than", 5));
        assert!(!p(vec![], "Greater_Than", 5));
        assert!(p(vec![s("-3")], "Greater_Than", -4));
        assert!(p(vec![Value::Integer(6), s("7")], "Greater_Than", 5));
        assert!(!p(vec![Value::Integer(6), s("4")], "Greater_Than", 5));
        assert!(!p(vec![s("9")], "greater_than", 10), "numeric, not text");
    }

    #[test]
    fn p_greater_than_or_equals() {
        assert!(p(vec![Value::Integer(5)], "Greater_Than_OR_EQUALS", 5));
        assert!(p(vec![s("6")], "Greater_Than_OR_EQUALS", 5));
        assert!(!p(vec![s("4")], "Greater_Than_OR_EQUALS", 5));
        assert!(!p(vec![s("x")], "Greater_Than_OR_EQUALS", 5));
        assert!(!p(vec![], "Greater_Than_OR_EQUALS", 5));
        assert!(p(vec![s("5"), s("+8")], "Greater_Than_OR_EQUALS", 5));
        assert!(!p(vec![s("5"), s("1")], "Greater_Than_OR_EQUALS", 5));
    }

    #[test]
    fn p_includes() {
        assert!(p(vec![s("Sales Team")], "Includes", "Sales"));
        assert!(
            !p(vec![s("sales team")], "Includes", "Sales"),
            "case-sensitive"
        );
        assert!(
            p(vec![s("anything")], "Includes", ""),
            "empty value is contained"
        );
        assert!(!p(vec![], "Includes", ""));
        assert!(p(vec![s("a-x"), s("x-b")], "Includes", "x"));
        assert!(!p(vec![s("a-x"), s("b")], "Includes", "x"));
    }

    #[test]
    fn p_ends_with() {
        assert!(p(vec![s("jo@contoso.com")], "ENDS_WITH", "@contoso.com"));
        assert!(!p(vec![s("jo@CONTOSO.COM")], "ENDS_WITH", "@contoso.com"));
        assert!(!p(vec![s("jo@fabrikam.com")], "ENDS_WITH", "@contoso.com"));
        assert!(!p(vec![], "ENDS_WITH", "@contoso.com"));
        assert!(p(vec![s("a.com"), s("b.com")], "ENDS_WITH", ".com"));
        assert!(!p(vec![s("a.com"), s("b.org")], "ENDS_WITH", ".com"));
    }

    #[test]
    fn p_occurs_in() {
        assert!(p(vec![s("B")], "&", "A,B,C"));
        assert!(!p(vec![s("D")], "&", "A,B,C"));
        assert!(!p(vec![s("b")], "&", "A,B,C"), "case-sensitive");
        assert!(!p(vec![s("A,B,C,D")], "&", "A,B,C"), "reverse containment");
        assert!(!p(vec![], "&", "A,B,C"));
        assert!(p(vec![s("A"), s("C")], "&", "A,B,C"));
        assert!(!p(vec![s("A"), s("D")], "&", "A,B,C"));
    }

    #[test]
    fn p_not_occurs_in() {
        assert!(p(vec![s("D")], "!&", "A,B,C"));
        assert!(!p(vec![s("B")], "!&", "A,B,C"));
        assert!(p(vec![s("b")], "!&", "A,B,C"), "case-sensitive");
        assert!(!p(vec![], "!&", "A,B,C"), "false on null");
        assert!(p(vec![s("D"), s("E")], "!&", "A,B,C"));
        assert!(!p(vec![s("D"), s("A")], "!&", "A,B,C"));
    }

    #[test]
    fn p_operator_names_are_case_insensitive_but_exact() {
        assert!(p(vec![s("x")], "equals", "x"));
        assert!(p(vec![s("y")], "Not Equals", "x"));
        assert!(p(vec![Value::Integer(3)], "GREATER_THAN", 2));
        assert!(p(vec![s("x")], "includes", "x"));
        assert!(p(vec![s("x")], "ends_with", "x"));
        let e = error(
            Family::Provisioning,
            ClauseSpec::new("a", "NOT  EQUALS", "x"),
        );
        assert_eq!(e.code(), 402);
        let e = error(Family::Provisioning, ClauseSpec::new("a", " EQUALS", "x"));
        assert_eq!(e.code(), 402);
    }

    // ---- Connect Sync family --------------------------------------------------------------

    #[test]
    fn c_equal_and_notequal() {
        assert!(c(vec![s("Sales")], "EQUAL", "sales"), "case-insensitive");
        assert!(!c(vec![s("Sales")], "EQUAL", "Eng"));
        assert!(!c(vec![], "EQUAL", "Sales"));
        assert!(c(vec![s("a"), s("A")], "EQUAL", "a"));
        assert!(!c(vec![s("a"), s("b")], "EQUAL", "a"));
        assert!(c(vec![Value::Boolean(true)], "EQUAL", "true"));
        assert!(c(vec![Value::Boolean(true)], "EQUAL", true));
        assert!(!c(vec![Value::Boolean(false)], "EQUAL", "True"));
        assert!(c(vec![s("ΣΊΣΥΦΟΣ")], "EQUAL", "σίσυφος"), "Unicode folding");
        assert!(c(vec![s("straße")], "EQUAL", "STRAßE"));

        assert!(c(vec![], "NOTEQUAL", "True"), "complement: true on null");
        assert!(c(vec![s("")], "NOTEQUAL", "True"));
        assert!(!c(vec![Value::Boolean(true)], "NOTEQUAL", "True"));
        assert!(c(vec![Value::Boolean(false)], "NOTEQUAL", "True"));
        assert!(!c(vec![s("SALES")], "NOTEQUAL", "sales"));
        assert!(
            c(vec![s("a"), s("b")], "NOTEQUAL", "a"),
            "complement of all"
        );
        assert!(!c(vec![s("a"), s("a")], "NOTEQUAL", "a"));
    }

    #[test]
    fn c_ordering() {
        assert!(
            c(vec![s("5")], "LESSTHAN", "10"),
            "numeric when both integer-like"
        );
        assert!(!c(vec![s("5")], "LESSTHAN", "10x"), "text otherwise");
        assert!(c(vec![s("apple")], "LESSTHAN", "Banana"), "ignoring case");
        assert!(!c(vec![s("b")], "LESSTHAN", "B"));
        assert!(!c(vec![], "LESSTHAN", "10"));
        assert!(c(vec![Value::Integer(1), Value::Integer(2)], "LESSTHAN", 3));
        assert!(!c(
            vec![Value::Integer(1), Value::Integer(4)],
            "LESSTHAN",
            3
        ));

        assert!(c(vec![s("10")], "LESSTHAN_OR_EQUAL", "10"));
        assert!(c(vec![s("b")], "LESSTHAN_OR_EQUAL", "B"));
        assert!(!c(vec![s("11")], "LESSTHAN_OR_EQUAL", "10"));
        assert!(!c(vec![], "LESSTHAN_OR_EQUAL", "10"));
        assert!(c(vec![s("1"), s("10")], "LESSTHAN_OR_EQUAL", "10"));

        assert!(c(vec![s("10")], "GREATERTHAN", "9"), "numeric");
        assert!(
            !c(vec![s("10")], "GREATERTHAN", "9a"),
            "\"10\" < \"9a\" as text"
        );
        assert!(c(vec![s("b")], "GREATERTHAN", "A"));
        assert!(!c(vec![s("a")], "GREATERTHAN", "A"));
        assert!(!c(vec![], "GREATERTHAN", "0"));
        assert!(!c(vec![s("5"), s("1")], "GREATERTHAN", "2"));

        assert!(c(vec![s("a")], "GREATERTHAN_OR_EQUAL", "A"));
        assert!(c(vec![Value::Integer(-1)], "GREATERTHAN_OR_EQUAL", -1));
        assert!(!c(vec![Value::Integer(-2)], "GREATERTHAN_OR_EQUAL", -1));
        assert!(!c(vec![], "GREATERTHAN_OR_EQUAL", "0"));
        assert!(c(vec![s("3"), s("7")], "GREATERTHAN_OR_EQUAL", "3"));
    }

    #[test]
    fn c_contains_startswith_endswith() {
        assert!(c(vec![s("Sales Team")], "CONTAINS", "team"));
        assert!(!c(vec![s("Sales")], "CONTAINS", "eng"));
        assert!(!c(vec![], "CONTAINS", "x"));
        assert!(c(vec![s("ax"), s("xb")], "CONTAINS", "X"));
        assert!(!c(vec![s("ax"), s("b")], "CONTAINS", "X"));
        assert!(c(vec![], "NOTCONTAINS", "x"));
        assert!(!c(vec![s("Sales Team")], "NOTCONTAINS", "TEAM"));
        assert!(c(vec![s("ax"), s("b")], "NOTCONTAINS", "x"));

        assert!(c(vec![s("OU=Users")], "STARTSWITH", "ou="));
        assert!(!c(vec![s("CN=x")], "STARTSWITH", "ou="));
        assert!(!c(vec![], "STARTSWITH", "ou="));
        assert!(!c(vec![s("ou=a"), s("cn=b")], "STARTSWITH", "ou="));
        assert!(c(vec![], "NOTSTARTSWITH", "x"));
        assert!(c(vec![s("CN=x")], "NOTSTARTSWITH", "ou="));
        assert!(!c(vec![s("OU=x")], "NOTSTARTSWITH", "ou="));

        assert!(c(vec![s("jo@Contoso.com")], "ENDSWITH", "@CONTOSO.COM"));
        assert!(!c(vec![s("jo@fabrikam.com")], "ENDSWITH", "@contoso.com"));
        assert!(!c(vec![], "ENDSWITH", "x"));
        assert!(c(vec![s("a.COM"), s("b.com")], "ENDSWITH", ".com"));
        assert!(c(vec![], "NOTENDSWITH", "x"));
        assert!(!c(vec![s("a.com")], "NOTENDSWITH", ".COM"));
        assert!(c(vec![s("a.com"), s("b.org")], "NOTENDSWITH", ".com"));
    }

    #[test]
    fn c_isnull_isnotnull() {
        assert!(c0(vec![], "ISNULL"));
        assert!(c0(vec![s("")], "ISNULL"), "empty strings count as null");
        assert!(!c0(vec![s("x")], "ISNULL"));
        assert!(!c0(vec![s(""), s("x")], "ISNULL"));
        assert!(!c0(vec![], "ISNOTNULL"));
        assert!(c0(vec![s("x")], "ISNOTNULL"));
        assert!(c0(vec![s("x"), s("y")], "isnotnull"));
    }

    #[test]
    fn c_isin_isnotin() {
        assert!(c(vec![s("a"), s("b")], "ISIN", "B"), "any value");
        assert!(c(vec![s("b")], "ISIN", "b"));
        assert!(!c(vec![s("a"), s("c")], "ISIN", "b"));
        assert!(!c(vec![], "ISIN", "b"));
        assert!(c(vec![], "ISNOTIN", "b"));
        assert!(!c(vec![s("a"), s("B")], "ISNOTIN", "b"));
        assert!(c(vec![s("a"), s("c")], "ISNOTIN", "b"));
    }

    #[test]
    fn c_isbitset_isnotbitset() {
        assert!(c(vec![Value::Integer(514)], "ISBITSET", 2));
        assert!(!c(vec![Value::Integer(512)], "ISBITSET", 2));
        assert!(
            !c(vec![Value::Integer(514)], "ISBITSET", 6),
            "all bits of the mask"
        );
        assert!(c(vec![Value::Integer(518)], "ISBITSET", 6));
        assert!(c(vec![s("514")], "ISBITSET", "2"));
        assert!(!c(vec![s("abc")], "ISBITSET", 2));
        assert!(!c(vec![], "ISBITSET", 2));
        assert!(c(vec![Value::Integer(2), Value::Integer(3)], "ISBITSET", 2));
        assert!(!c(
            vec![Value::Integer(2), Value::Integer(4)],
            "ISBITSET",
            2
        ));
        assert!(c(vec![Value::Integer(-1)], "ISBITSET", i64::MIN));

        assert!(c(vec![Value::Integer(512)], "ISNOTBITSET", 2));
        assert!(!c(vec![Value::Integer(514)], "ISNOTBITSET", 2));
        assert!(c(vec![], "ISNOTBITSET", 2));
        assert!(c(vec![s("abc")], "ISNOTBITSET", 2), "complement of false");
        assert!(c(
            vec![Value::Integer(2), Value::Integer(4)],
            "ISNOTBITSET",
            2
        ));
    }

    fn membership(op: &str, group: &str, groups: &[&str]) -> (bool, usize) {
        let f = one(Family::ConnectSync, ClauseSpec::new("dn", op, group));
        let calls = Cell::new(0);
        let groups: Vec<Dn> = groups.iter().map(|g| Dn::parse(g).unwrap()).collect();
        let member_of = || {
            calls.set(calls.get() + 1);
            groups.clone()
        };
        let r = f.evaluate(&Attributes::new(), &member_of);
        (r, calls.get())
    }

    #[test]
    fn c_ismemberof_isnotmemberof() {
        let g = "CN=Sales,OU=Groups,DC=example,DC=com";
        assert_eq!(
            membership("ISMEMBEROF", g, &["cn=sales, ou=groups,dc=EXAMPLE,dc=com"]),
            (true, 1)
        );
        assert_eq!(
            membership("ISMEMBEROF", g, &["CN=Eng,OU=Groups,DC=example,DC=com"]),
            (false, 1)
        );
        assert_eq!(membership("ISMEMBEROF", g, &[]), (false, 1));
        assert_eq!(
            membership("ISNOTMEMBEROF", g, &["CN=Eng,OU=Groups,DC=example,DC=com"]),
            (true, 1)
        );
        assert_eq!(membership("ISNOTMEMBEROF", g, &[g]), (false, 1));
        assert_eq!(membership("ISNOTMEMBEROF", g, &[]), (true, 1));
        // The attribute name is ignored, and may be left out.
        let f = one(Family::ConnectSync, ClauseSpec::new("", "ismemberof", g));
        let entry = attrs("other", vec![s("x")]);
        assert!(f.evaluate(&entry, &|| vec![Dn::parse(g).unwrap()]));
    }

    #[test]
    fn member_of_is_lazy_and_called_once() {
        let g = "CN=G,DC=x";
        let spec = FilterSpec {
            family: Family::ConnectSync,
            groups: vec![
                vec![
                    ClauseSpec::new("a", "EQUAL", "no"),
                    ClauseSpec::new("dn", "ISMEMBEROF", g),
                ],
                vec![
                    ClauseSpec::new("dn", "ISMEMBEROF", g),
                    ClauseSpec::new("dn", "ISNOTMEMBEROF", "CN=H,DC=x"),
                ],
            ],
        };
        let f = ScopeFilter::compile(&spec).unwrap();
        let calls = Cell::new(0);
        let member_of = || {
            calls.set(calls.get() + 1);
            vec![Dn::parse(g).unwrap()]
        };
        assert!(f.evaluate(&attrs("a", vec![s("x")]), &member_of));
        assert_eq!(calls.get(), 1, "cached across clauses");
        calls.set(0);
        assert!(f.explain(&attrs("a", vec![s("x")]), &member_of).in_scope);
        assert_eq!(calls.get(), 1);
        // No membership clause reached: never called.
        let f = one(Family::ConnectSync, ClauseSpec::new("a", "EQUAL", "x"));
        assert!(f.evaluate(&attrs("a", vec![s("x")]), &no_groups));
        let spec = FilterSpec {
            family: Family::ConnectSync,
            groups: vec![vec![
                ClauseSpec::new("a", "EQUAL", "no"),
                ClauseSpec::new("dn", "ISMEMBEROF", g),
            ]],
        };
        let f = ScopeFilter::compile(&spec).unwrap();
        assert!(!f.evaluate(&attrs("a", vec![s("x")]), &no_groups));
    }

    // ---- structure and values --------------------------------------------------------------

    #[test]
    fn and_within_groups_or_across() {
        let spec: FilterSpec = serde_json::from_value(json!({
            "family": "provisioning",
            "groups": [
                [
                    {"attribute": "department", "operator": "EQUALS", "value": "Sales"},
                    {"attribute": "country", "operator": "EQUALS", "value": "DE"}
                ],
                [{"attribute": "employeeType", "operator": "EQUALS", "value": "Contractor"}]
            ]
        }))
        .unwrap();
        let f = ScopeFilter::compile(&spec).unwrap();
        let user = |d: &str, c: &str, t: &str| -> Attributes {
            [("department", d), ("country", c), ("employeeType", t)]
                .into_iter()
                .map(|(n, v)| (n, s(v)))
                .collect()
        };
        assert!(f.evaluate(&user("Sales", "DE", "Employee"), &no_groups));
        assert!(!f.evaluate(&user("Sales", "FR", "Employee"), &no_groups));
        assert!(f.evaluate(&user("Eng", "FR", "Contractor"), &no_groups));
        assert!(!f.evaluate(&user("Eng", "DE", "Employee"), &no_groups));
    }

    #[test]
    fn no_groups_puts_everything_in_scope() {
        for family in [Family::Provisioning, Family::ConnectSync] {
            let f = ScopeFilter::compile(&FilterSpec {
                family,
                groups: vec![],
            })
            .unwrap();
            assert!(f.is_unrestricted());
            assert!(f.evaluate(&Attributes::new(), &no_groups));
            let e = f.explain(&Attributes::new(), &no_groups);
            assert!(e.in_scope);
            assert!(e.groups.is_empty());
        }
        let spec: FilterSpec = serde_json::from_str(r#"{"family": "connect-sync"}"#).unwrap();
        assert!(ScopeFilter::compile(&spec).unwrap().is_unrestricted());
    }

    #[test]
    fn attribute_names_are_case_insensitive_and_trimmed() {
        let f = one(
            Family::Provisioning,
            ClauseSpec::new(" Department ", "EQUALS", "Sales"),
        );
        assert!(f.evaluate(&attrs("DEPARTMENT", vec![s("Sales")]), &no_groups));
    }

    #[test]
    fn value_texts() {
        let t = chrono::Utc.with_ymd_and_hms(2024, 3, 5, 14, 7, 9).unwrap();
        assert!(p(
            vec![Value::Timestamp(t)],
            "EQUALS",
            "3/5/2024 2:07:09 PM"
        ));
        let midnight = chrono::Utc.with_ymd_and_hms(2024, 12, 25, 0, 0, 0).unwrap();
        assert!(p(
            vec![Value::Timestamp(midnight)],
            "EQUALS",
            "12/25/2024 12:00:00 AM"
        ));
        assert!(p(vec![Value::Bytes(vec![1, 2, 3])], "EQUALS", "AQID"));
        assert!(p(vec![Value::Integer(-42)], "EQUALS", "-42"));
        assert!(p(vec![Value::Boolean(false)], "EQUALS", "False"));
        let dn = Dn::parse("CN=Boss,DC=x").unwrap();
        assert!(p(vec![Value::dn_ref(dn)], "EQUALS", "CN=Boss,DC=x"));
        assert!(
            p0(vec![Value::Bytes(vec![])], "IS NULL"),
            "empty text is discarded"
        );
    }

    #[test]
    fn integer_and_boolean_text_rules() {
        assert_eq!(integer_text("+5"), Some(5));
        assert_eq!(integer_text("-0"), Some(0));
        assert_eq!(integer_text(" 5"), None);
        assert_eq!(integer_text("5 "), None);
        assert_eq!(integer_text("-"), None);
        assert_eq!(integer_text("+-5"), None);
        assert_eq!(integer_text("99999999999999999999"), None);
        assert_eq!(integer_text("&H10"), None);
        assert_eq!(boolean_text("TRUE"), Some(true));
        assert_eq!(boolean_text("False"), Some(false));
        assert_eq!(boolean_text("1"), None);
        assert_eq!(fold("ΣΊΣΥΦΟΣ"), fold("σίσυφος"));
        assert_eq!(fold("ſ"), "s");
        assert_eq!(fold("İı"), "İı");
    }

    #[test]
    fn serde_form() {
        let spec: FilterSpec = serde_json::from_value(json!({
            "family": "connect-sync",
            "groups": [[
                {"attribute": "isCriticalSystemObject", "operator": "NOTEQUAL", "value": true},
                {"attribute": "userAccountControl", "operator": "ISNOTBITSET", "value": 2},
                {"attribute": "mail", "operator": "ISNOTNULL"},
                {"attribute": "x", "operator": "ISNULL", "value": null}
            ]]
        }))
        .unwrap();
        assert_eq!(spec.family, Family::ConnectSync);
        assert_eq!(spec.groups[0][2].value, None);
        assert_eq!(spec.groups[0][3].value, None);
        let back: FilterSpec =
            serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
        let f = ScopeFilter::compile(&spec).unwrap();
        let entry: Attributes = [
            ("userAccountControl", Value::Integer(512)),
            ("mail", s("a@b")),
        ]
        .into_iter()
        .collect();
        assert!(f.evaluate(&entry, &no_groups));
        assert!(serde_json::from_value::<FilterSpec>(
            json!({"family": "provisioning", "groups": [[{"attribute": "a", "operater": "EQUALS"}]]})
        )
        .is_err());
        assert!(serde_json::from_value::<FilterSpec>(json!({"family": "ldap"})).is_err());
    }

    #[test]
    fn thirty_four_operators() {
        assert_eq!(
            Family::Provisioning.operators().len() + Family::ConnectSync.operators().len(),
            34
        );
        for family in [Family::Provisioning, Family::ConnectSync] {
            for op in family.operators() {
                assert_eq!(Operator::parse(family, op.name()), Some(op));
                assert_eq!(Operator::parse(family, &op.name().to_lowercase()), Some(op));
                assert_eq!(op.family(), family);
            }
        }
    }

    // ---- compile errors -----------------------------------------------------------------------

    #[test]
    fn unknown_operator_suggests_the_closest_name() {
        let e = error(
            Family::Provisioning,
            ClauseSpec::new("mail", "ENDSWTH", "x"),
        );
        assert_eq!(e.code(), 402);
        assert_eq!(
            e.kind,
            ScopeErrorKind::UnknownOperator {
                suggestion: Some("ENDS_WITH")
            }
        );
        assert_eq!(
            e.to_string(),
            "scope group 1, clause 1 (mail ENDSWTH): unknown operator \"ENDSWTH\" in the \
             provisioning family; did you mean \"ENDS_WITH\"?"
        );
        let e = error(
            Family::Provisioning,
            ClauseSpec::new("a", "NOT_EQUALS", "x"),
        );
        assert_eq!(
            e.kind,
            ScopeErrorKind::UnknownOperator {
                suggestion: Some("NOT EQUALS")
            }
        );
        let e = error(
            Family::ConnectSync,
            ClauseSpec::new("a", "IS_NOT_NULL", "x"),
        );
        assert_eq!(
            e.kind,
            ScopeErrorKind::UnknownOperator {
                suggestion: Some("ISNOTNULL")
            }
        );
        let e = error(Family::ConnectSync, ClauseSpec::new("a", "frobnicate", "x"));
        assert_eq!(e.kind, ScopeErrorKind::UnknownOperator { suggestion: None });
        assert!(e.hint.unwrap().contains("\"ISNOTMEMBEROF\""));
    }

    #[test]
    fn operator_of_the_other_family() {
        let e = error(Family::Provisioning, ClauseSpec::new("a", "ENDSWITH", "x"));
        assert_eq!(e.code(), 403);
        assert_eq!(
            e.kind,
            ScopeErrorKind::OtherFamilyOperator {
                suggestion: Some("ENDS_WITH")
            }
        );
        assert!(e.to_string().contains("Connect Sync operator"), "{e}");
        let e = error(Family::ConnectSync, ClauseSpec::new("a", "Includes", "x"));
        assert_eq!(
            e.kind,
            ScopeErrorKind::OtherFamilyOperator {
                suggestion: Some("CONTAINS")
            }
        );
        let e = error(
            Family::Provisioning,
            ClauseSpec::new("a", "startswith", "x"),
        );
        assert_eq!(
            e.kind,
            ScopeErrorKind::OtherFamilyOperator { suggestion: None }
        );
        assert!(e.hint.unwrap().contains("connect-sync"));
    }

    #[test]
    fn unsupported_provisioning_operators() {
        for op in ["IsMemberOf", "ISMEMBEROF", "Present", "valid cert match"] {
            let e = error(Family::Provisioning, ClauseSpec::new("a", op, "x"));
            assert_eq!(e.code(), 404, "{op}");
            assert!(e.message.contains("not supported"), "{e}");
        }
        // In the Connect Sync family, `Present` is simply unknown.
        let e = error(Family::ConnectSync, ClauseSpec::unary("a", "Present"));
        assert_eq!(e.code(), 402);
    }

    #[test]
    fn value_errors() {
        let code = |family, clause| error(family, clause).code();
        let prov = Family::Provisioning;
        let cs = Family::ConnectSync;
        assert_eq!(code(prov, ClauseSpec::unary("", "IS NULL")), 405);
        assert_eq!(code(cs, ClauseSpec::new("  ", "EQUAL", "x")), 405);
        assert_eq!(code(prov, ClauseSpec::unary("a", "EQUALS")), 406);
        assert_eq!(code(prov, ClauseSpec::unary("a", "REGEX MATCH")), 406);
        assert_eq!(code(cs, ClauseSpec::unary("a", "ISBITSET")), 406);
        assert_eq!(code(cs, ClauseSpec::unary("dn", "ISMEMBEROF")), 406);
        assert_eq!(code(prov, ClauseSpec::new("a", "IS NULL", "x")), 407);
        assert_eq!(code(cs, ClauseSpec::new("a", "ISNOTNULL", 0)), 407);
        assert_eq!(code(prov, ClauseSpec::new("a", "Greater_Than", "abc")), 408);
        assert_eq!(code(prov, ClauseSpec::new("a", "Greater_Than", true)), 408);
        assert_eq!(code(prov, ClauseSpec::new("a", "Greater_Than", 1.5)), 408);
        assert_eq!(code(prov, ClauseSpec::new("a", "Greater_Than", " 5")), 408);
        assert_eq!(code(prov, ClauseSpec::new("a", "EQUALS", 1.5)), 408);
        assert_eq!(
            code(prov, ClauseSpec::new("a", "EQUALS", json!(["x"]))),
            408
        );
        assert_eq!(code(prov, ClauseSpec::new("a", "EQUALS", json!({}))), 408);
        assert_eq!(code(prov, ClauseSpec::new("a", "REGEX MATCH", 5)), 408);
        assert_eq!(code(cs, ClauseSpec::new("a", "ISBITSET", "two")), 408);
        assert_eq!(code(cs, ClauseSpec::new("dn", "ISMEMBEROF", 5)), 408);
        assert_eq!(code(cs, ClauseSpec::new("a", "ISBITSET", 0)), 409);
        assert_eq!(code(cs, ClauseSpec::new("a", "ISNOTBITSET", "-0")), 409);
        let e = error(prov, ClauseSpec::new("a", "Greater_Than", "abc"));
        assert_eq!(
            e.to_string(),
            "scope group 1, clause 1 (a Greater_Than): Greater_Than needs an integer, but the \
             value is the string \"abc\"; write decimal digits with an optional sign, e.g. 10 or \
             \"10\""
        );
    }

    #[test]
    fn bad_regex_reports_the_offset() {
        let e = error(
            Family::Provisioning,
            ClauseSpec::new("a", "REGEX MATCH", "ab(?=c)"),
        );
        assert_eq!(e.code(), 410);
        assert_eq!(e.kind, ScopeErrorKind::InvalidRegex { offset: 2 });
        assert!(e.message.contains("at offset 2"), "{e}");
        let e = error(
            Family::Provisioning,
            ClauseSpec::new("a", "NOT REGEX MATCH", "(unclosed"),
        );
        assert_eq!(e.code(), 410);
    }

    #[test]
    fn rdn_runs_respect_boundaries_escapes_and_multi_valued_rdns() {
        let d = |s: &str| Dn::parse(s).unwrap();
        let dn = d("CN=a+SN=b, OU=x,DC=y");
        assert!(
            holds_rdns(&dn, &d("sn=b+cn=a"), true, false),
            "multi-valued RDN in any order"
        );
        assert!(holds_rdns(&dn, &d("ou=x,dc=y"), false, true));
        assert!(holds_rdns(&dn, &d("ou=x"), false, false));
        assert!(holds_rdns(&dn, &dn, true, false) && holds_rdns(&dn, &dn, false, true));
        assert!(!holds_rdns(&dn, &d("sn=b"), false, false), "part of an RDN");
        assert!(
            !holds_rdns(&d("OU=x,DC=y"), &dn, false, false),
            "longer than the DN"
        );
        let escaped = d(r"CN=a\,ou=x,DC=y");
        assert_eq!(escaped.len(), 2);
        assert!(!holds_rdns(&escaped, &d("ou=x,dc=y"), false, true));
        assert!(!holds_rdns(&escaped, &d("ou=x"), false, false));
        assert!(holds_rdns(&escaped, &d(r"cn=A\2COU=X"), true, false));
        let backslash = d(r"CN=a\\,OU=x,DC=y");
        assert!(
            holds_rdns(&backslash, &d("ou=x,dc=y"), false, true),
            "an escaped backslash"
        );
    }

    #[test]
    fn bad_dn_reports_the_position() {
        let e = error(
            Family::ConnectSync,
            ClauseSpec::new("dn", "ISMEMBEROF", "CN=Sales,,DC=x"),
        );
        assert_eq!(e.code(), 411);
        assert!(
            matches!(e.kind, ScopeErrorKind::InvalidDn { position: 9 }),
            "{e:?}"
        );
        let e = error(
            Family::ConnectSync,
            ClauseSpec::new("dn", "ISNOTMEMBEROF", " "),
        );
        assert_eq!(e.code(), 411);
        let e = error(
            Family::ConnectSync,
            ClauseSpec::new("dn", "ISMEMBEROF", "Sales"),
        );
        assert_eq!(e.code(), 411);
    }

    #[test]
    fn every_error_is_reported_with_its_place() {
        let errs = errors(
            Family::Provisioning,
            vec![
                vec![
                    ClauseSpec::new("a", "EQUALS", "ok"),
                    ClauseSpec::new("department", "ENDS_WITH", json!([1])),
                ],
                vec![],
                vec![
                    ClauseSpec::new("b", "BOGUS", "x"),
                    ClauseSpec::new("c", "REGEX MATCH", "("),
                ],
            ],
        );
        let places: Vec<(usize, Option<usize>, u16)> =
            errs.iter().map(|e| (e.group, e.clause, e.code())).collect();
        assert_eq!(
            places,
            vec![
                (0, Some(1), 408),
                (1, None, 401),
                (2, Some(0), 402),
                (2, Some(1), 410)
            ]
        );
        assert!(errs[0]
            .to_string()
            .starts_with("scope group 1, clause 2 (department ENDS_WITH): "));
        assert_eq!(
            errs[1].to_string(),
            "scope group 2: the group has no clauses; add a clause or remove the group (a filter \
             with no groups puts every object in scope)"
        );
        assert_eq!(errs[2].attribute, "b");
        assert_eq!(errs[2].operator, "BOGUS");
    }

    // ---- explain -----------------------------------------------------------------------------

    fn explain_one(
        family: Family,
        clause: ClauseSpec,
        entry: &Attributes,
        groups: &[&str],
    ) -> ClauseResult {
        let f = one(family, clause);
        let groups: Vec<Dn> = groups.iter().map(|g| Dn::parse(g).unwrap()).collect();
        let e = f.explain(entry, &|| groups.clone());
        assert_eq!(e.groups.len(), 1);
        e.groups[0][0].clone()
    }

    #[test]
    fn explain_details() {
        let prov = Family::Provisioning;
        let cs = Family::ConnectSync;
        let dept = |v: Vec<Value>| attrs("department", v);
        let r = explain_one(
            prov,
            ClauseSpec::new("department", "EQUALS", "Eng"),
            &dept(vec![s("Sales")]),
            &[],
        );
        assert_eq!(
            r,
            ClauseResult {
                attribute: "department".into(),
                operator: "EQUALS".into(),
                value: Some("Eng".into()),
                result: false,
                detail: "department = \"Sales\" is not \"Eng\"".into(),
            }
        );
        let detail = |family, clause, values: Vec<Value>| {
            explain_one(family, clause, &dept(values), &[]).detail
        };
        assert_eq!(
            detail(
                prov,
                ClauseSpec::new("department", "equals", "Sales"),
                vec![s("Sales")]
            ),
            "department = \"Sales\" equals \"Sales\""
        );
        assert_eq!(
            detail(
                prov,
                ClauseSpec::new("department", "EQUALS", "Sales"),
                vec![]
            ),
            "department is null/empty, so EQUALS is false"
        );
        assert_eq!(
            detail(prov, ClauseSpec::unary("department", "IS NULL"), vec![]),
            "department is null/empty"
        );
        assert_eq!(
            detail(
                prov,
                ClauseSpec::new("department", "EQUALS", "Sales"),
                vec![s("Sales"), s("Eng")]
            ),
            "department = [\"Sales\", \"Eng\"]: \"Eng\" is not \"Sales\""
        );
        assert_eq!(
            detail(
                prov,
                ClauseSpec::new("department", "Includes", "a"),
                vec![s("Sales"), s("Eng a")]
            ),
            "department = [\"Sales\", \"Eng a\"]: every value contains \"a\""
        );
        assert_eq!(
            detail(
                prov,
                ClauseSpec::new("department", "Greater_Than", 5),
                vec![s("x")]
            ),
            "department = \"x\" is not an integer"
        );
        assert_eq!(
            detail(
                prov,
                ClauseSpec::new("department", "REGEX MATCH", "^S"),
                vec![s("Sales")]
            ),
            "department = \"Sales\" matches /^S/"
        );
        assert_eq!(
            detail(
                cs,
                ClauseSpec::new("department", "NOTEQUAL", "sales"),
                vec![s("Sales")]
            ),
            "department = \"Sales\" equals \"sales\", so EQUAL is true and NOTEQUAL is false"
        );
        assert_eq!(
            detail(cs, ClauseSpec::new("department", "NOTEQUAL", "x"), vec![]),
            "department is null/empty, so EQUAL is false and NOTEQUAL is true"
        );
        assert_eq!(
            detail(
                cs,
                ClauseSpec::new("department", "ISIN", "b"),
                vec![s("a"), s("B")]
            ),
            "department = [\"a\", \"B\"]: \"B\" equals \"b\""
        );
        assert_eq!(
            detail(
                cs,
                ClauseSpec::new("department", "ISIN", "c"),
                vec![s("a"), s("B")]
            ),
            "department = [\"a\", \"B\"]: no value equals \"c\""
        );
        assert_eq!(
            detail(
                cs,
                ClauseSpec::new("department", "LESSTHAN", "10"),
                vec![s("9")]
            ),
            "department = \"9\" is less than \"10\" (numerically)"
        );
        assert_eq!(
            detail(
                cs,
                ClauseSpec::new("department", "ISBITSET", 2),
                vec![s("512")]
            ),
            "department = \"512\" lacks a bit of mask 2"
        );
        let many: Vec<Value> = (0..7).map(|i: i64| Value::Integer(i)).collect();
        assert_eq!(
            detail(
                prov,
                ClauseSpec::new("department", "Greater_Than", -1),
                many
            ),
            "department = [\"0\", \"1\", \"2\", \"3\", \"4\", … (7 values)]: every value is > -1"
        );
        let g = "CN=G,DC=x";
        let r = explain_one(
            cs,
            ClauseSpec::new("dn", "ISMEMBEROF", g),
            &Attributes::new(),
            &[],
        );
        assert_eq!(
            r.detail,
            "the object is not a direct member of \"CN=G,DC=x\" (it is a direct member of 0 groups)"
        );
        let r = explain_one(
            cs,
            ClauseSpec::new("dn", "ISNOTMEMBEROF", g),
            &Attributes::new(),
            &[g],
        );
        assert!(!r.result);
        assert_eq!(
            r.detail,
            "the object is a direct member of \"CN=G,DC=x\", so ISMEMBEROF is true and \
             ISNOTMEMBEROF is false"
        );
    }

    #[test]
    fn explain_evaluates_every_clause() {
        let spec = FilterSpec {
            family: Family::Provisioning,
            groups: vec![
                vec![
                    ClauseSpec::new("a", "EQUALS", "no"),
                    ClauseSpec::unary("b", "IS NOT NULL"),
                ],
                vec![ClauseSpec::unary("b", "IS NOT NULL")],
            ],
        };
        let f = ScopeFilter::compile(&spec).unwrap();
        let entry: Attributes = [("a", s("x")), ("b", s("y"))].into_iter().collect();
        let e = f.explain(&entry, &no_groups);
        assert!(e.in_scope);
        let results: Vec<Vec<bool>> = e
            .groups
            .iter()
            .map(|g| g.iter().map(|c| c.result).collect())
            .collect();
        assert_eq!(results, vec![vec![false, true], vec![true]]);
        let text = e.to_string();
        assert!(text.starts_with("in scope\n  group 1: false\n"), "{text}");
        assert!(
            text.contains("    clause 1: false: a = \"x\" is not \"no\"\n"),
            "{text}"
        );
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["in_scope"], json!(true));
        assert_eq!(json["groups"][0][0]["operator"], json!("EQUALS"));
    }

    // ---- properties ----------------------------------------------------------------------------

    fn operator_name() -> impl Strategy<Value = String> {
        let names: Vec<String> = Family::Provisioning
            .operators()
            .into_iter()
            .chain(Family::ConnectSync.operators())
            .map(|o| o.name().to_owned())
            .chain(["IsMemberOf", "Present", "Valid Cert Match"].map(String::from))
            .collect();
        prop_oneof![
            proptest::sample::select(names.clone()),
            proptest::sample::select(names).prop_map(|n| n.to_lowercase()),
            "\\PC{0,30}",
            "[A-Z _&!]{0,25}",
        ]
    }

    fn json_value() -> impl Strategy<Value = Option<serde_json::Value>> {
        prop_oneof![
            Just(None),
            Just(Some(serde_json::Value::Null)),
            any::<bool>().prop_map(|b| Some(json!(b))),
            any::<i64>().prop_map(|i| Some(json!(i))),
            any::<u64>().prop_map(|i| Some(json!(i))),
            any::<f64>().prop_map(|f| Some(json!(f))),
            "\\PC{0,30}".prop_map(|s| Some(json!(s))),
            "[()\\[\\]\\\\?*+{}^$.|a-c0-9=,]{0,20}".prop_map(|s| Some(json!(s))),
            "(CN|OU|DC)=[a-z,=+ \\\\]{0,12}".prop_map(|s| Some(json!(s))),
            Just(Some(json!(["x", 1]))),
        ]
    }

    fn attr_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            "\\PC{0,12}".prop_map(Value::string),
            "[0-9-+]{0,6}".prop_map(Value::string),
            any::<i64>().prop_map(Value::Integer),
            any::<bool>().prop_map(Value::Boolean),
            proptest::collection::vec(any::<u8>(), 0..4).prop_map(Value::Bytes),
            (-100_000_000_000i64..100_000_000_000).prop_map(|secs| {
                Value::Timestamp(chrono::DateTime::from_timestamp(secs, 0).unwrap_or_default())
            }),
        ]
    }

    // ---- the fast path agrees with the explanation ---------------------------------------------

    const P_TEXT: [&str; 6] = ["EQUALS", "NOT EQUALS", "Includes", "ENDS_WITH", "&", "!&"];
    const P_UNARY: [&str; 4] = ["IS TRUE", "IS FALSE", "IS NULL", "IS NOT NULL"];
    const P_REGEX: [&str; 2] = ["REGEX MATCH", "NOT REGEX MATCH"];
    const P_INTEGER: [&str; 2] = ["Greater_Than", "Greater_Than_OR_EQUALS"];
    const C_TEXT: [&str; 14] = [
        "EQUAL",
        "NOTEQUAL",
        "LESSTHAN",
        "LESSTHAN_OR_EQUAL",
        "GREATERTHAN",
        "GREATERTHAN_OR_EQUAL",
        "CONTAINS",
        "NOTCONTAINS",
        "STARTSWITH",
        "NOTSTARTSWITH",
        "ENDSWITH",
        "NOTENDSWITH",
        "ISIN",
        "ISNOTIN",
    ];
    const C_UNARY: [&str; 2] = ["ISNULL", "ISNOTNULL"];
    const C_MASK: [&str; 2] = ["ISBITSET", "ISNOTBITSET"];
    const C_GROUP: [&str; 2] = ["ISMEMBEROF", "ISNOTMEMBEROF"];
    const GROUP_DNS: [&str; 3] = ["CN=Sales,DC=x", "cn=sales, dc=X", "CN=Eng,DC=x"];

    /// The strategies below draw from every operator of both families.
    #[test]
    fn agreement_strategies_cover_every_operator() {
        let mut drawn: Vec<&str> = [&P_TEXT[..], &P_UNARY, &P_REGEX, &P_INTEGER]
            .concat()
            .into_iter()
            .chain([&C_TEXT[..], &C_UNARY, &C_MASK, &C_GROUP].concat())
            .collect();
        drawn.sort_unstable();
        let mut all: Vec<&str> = Family::Provisioning
            .operators()
            .into_iter()
            .chain(Family::ConnectSync.operators())
            .map(|o| o.name())
            .collect();
        all.sort_unstable();
        assert_eq!(drawn, all);
    }

    /// Attribute names the clauses read (`A` is `a` in another case; `d` is never set).
    fn scoped_attribute() -> impl Strategy<Value = &'static str> {
        proptest::sample::select(vec!["a", "b", "c", "A", "d"])
    }

    /// Texts both clause values and attribute values draw from, so that they often meet: empty,
    /// ASCII in both cases, non-ASCII text that folds to ASCII (`ſ`, the Kelvin sign), that folds
    /// to several characters or none (`ß`, `İ`), integer- and Boolean-like texts, and the texts of
    /// the non-string values of [`scoped_value`].
    const WORDS: [&str; 24] = [
        "",
        "a",
        "A",
        "ab",
        "aB",
        "svc-",
        "SVC-x",
        "ſvc-",
        "\u{212a}",
        "k",
        "5",
        "-5",
        "+5",
        "007",
        "True",
        "false",
        "ß",
        "ss",
        "İ",
        "é",
        "σς",
        "Σ",
        "AQID",
        "12/25/2024 12:00:00 AM",
    ];

    /// Text clause values.
    fn text_operand() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            4 => proptest::sample::select(WORDS.to_vec()).prop_map(|s| json!(s)),
            1 => "[aAbſ\u{212a}k5ß -]{0,3}".prop_map(|s| json!(s)),
            1 => (-8i64..8).prop_map(|i| json!(i)),
            1 => any::<bool>().prop_map(|b| json!(b)),
        ]
    }

    /// A clause of `family` with a supported operator and an operand of its kind.
    fn valid_clause(family: Family) -> BoxedStrategy<ClauseSpec> {
        let select = |names: &[&'static str]| proptest::sample::select(names.to_vec());
        match family {
            Family::Provisioning => prop_oneof![
                (scoped_attribute(), select(&P_TEXT), text_operand())
                    .prop_map(|(a, o, v)| ClauseSpec::new(a, o, v)),
                (scoped_attribute(), select(&P_UNARY)).prop_map(|(a, o)| ClauseSpec::unary(a, o)),
                (
                    scoped_attribute(),
                    select(&P_REGEX),
                    select(&["^a", "b$", "[0-9]+", "^(True|False)$", "é", "^$", "s"]),
                )
                    .prop_map(|(a, o, v)| ClauseSpec::new(a, o, v)),
                (scoped_attribute(), select(&P_INTEGER), -50i64..50)
                    .prop_map(|(a, o, v)| ClauseSpec::new(a, o, v)),
            ]
            .boxed(),
            Family::ConnectSync => prop_oneof![
                (scoped_attribute(), select(&C_TEXT), text_operand())
                    .prop_map(|(a, o, v)| ClauseSpec::new(a, o, v)),
                (scoped_attribute(), select(&C_UNARY)).prop_map(|(a, o)| ClauseSpec::unary(a, o)),
                (scoped_attribute(), select(&C_MASK), 1i64..16)
                    .prop_map(|(a, o, v)| ClauseSpec::new(a, o, v)),
                (select(&C_GROUP), select(&GROUP_DNS)).prop_map(|(o, g)| ClauseSpec::new("", o, g)),
            ]
            .boxed(),
        }
    }

    /// A filter of either family: zero to three groups of one to four valid clauses.
    fn valid_filter() -> impl Strategy<Value = FilterSpec> {
        prop_oneof![Just(Family::Provisioning), Just(Family::ConnectSync)].prop_flat_map(|family| {
            proptest::collection::vec(proptest::collection::vec(valid_clause(family), 1..5), 0..4)
                .prop_map(move |groups| FilterSpec { family, groups })
        })
    }

    /// Attribute values: the texts of [`WORDS`] and random ones, integers, Booleans, bytes
    /// (empty ones too), a timestamp and a reference.
    fn scoped_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            8 => proptest::sample::select(WORDS.to_vec()).prop_map(Value::string),
            2 => "[aAbſ\u{212a}k5ß -]{0,4}".prop_map(Value::string),
            2 => (-8i64..8).prop_map(Value::Integer),
            1 => any::<i64>().prop_map(Value::Integer),
            2 => any::<bool>().prop_map(Value::Boolean),
            1 => proptest::collection::vec(1u8..4, 0..4).prop_map(Value::Bytes),
            1 => Just(Value::Timestamp(
                chrono::Utc.with_ymd_and_hms(2024, 12, 25, 0, 0, 0).unwrap()
            )),
            1 => Just(Value::dn_ref(Dn::parse("CN=Boss,DC=x").unwrap())),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// The boolean path (`evaluate`, `evaluate_in` over a bound view, each clause's `holds`)
        /// gives exactly the explanation's results, and fetches memberships at most once (never
        /// without a membership clause).
        #[test]
        fn evaluation_agrees_with_explain(
            spec in valid_filter(),
            values in proptest::collection::vec(proptest::collection::vec(scoped_value(), 0..5), 3),
            member_of_groups in proptest::collection::vec(proptest::sample::select(GROUP_DNS.to_vec()), 0..3),
        ) {
            let f = match ScopeFilter::compile(&spec) {
                Ok(f) => f,
                Err(e) => return Err(TestCaseError::fail(format!("{spec:?}: {e:?}"))),
            };
            let mut entry = Attributes::new();
            for (name, v) in ["a", "b", "c"].into_iter().zip(values) {
                entry.set(name, crate::model::Values::from(v));
            }
            let groups: Vec<Dn> = member_of_groups.iter().map(|g| Dn::parse(g).unwrap()).collect();
            let calls = Cell::new(0);
            let member_of = || {
                calls.set(calls.get() + 1);
                groups.clone()
            };
            let most = usize::from(spec.groups.iter().flatten().any(|c| C_GROUP.contains(&c.operator.as_str())));

            let explanation = f.explain(&entry, &member_of);
            prop_assert!(calls.replace(0) <= most);
            prop_assert_eq!(f.evaluate(&entry, &member_of), explanation.in_scope, "{}", explanation);
            prop_assert!(calls.replace(0) <= most);

            let mut table: Vec<AttrName> = f.attribute_names().into_iter().map(AttrName::new).collect();
            table.sort();
            table.dedup();
            let mut bound = f.clone();
            bound.bind(&table);
            let view = crate::rules::eval::Slotted::new(&table, &entry);
            prop_assert_eq!(bound.evaluate_in(&view, &member_of), explanation.in_scope, "{}", explanation);
            prop_assert!(calls.replace(0) <= most);

            let members = Members::new(&member_of);
            for ((group, bound_group), results) in f.groups.iter().zip(&bound.groups).zip(&explanation.groups) {
                for ((clause, bound_clause), result) in group.iter().zip(bound_group).zip(results) {
                    prop_assert_eq!(clause.holds(&entry, &members), result.result, "{}", result.detail);
                    prop_assert_eq!(bound_clause.holds(&view, &members), result.result, "{}", result.detail);
                }
            }
            prop_assert!(calls.get() <= most);
        }
    }

    proptest! {
        #[test]
        fn compile_and_evaluate_never_panic(
            family in prop_oneof![Just(Family::Provisioning), Just(Family::ConnectSync)],
            clauses in proptest::collection::vec(("[a-c ]{0,2}", operator_name(), json_value()), 0..4),
            values in proptest::collection::vec(attr_value(), 0..4),
            groups in proptest::collection::vec("(CN|cn)=[ab], ?DC=[xy]", 0..3),
        ) {
            let spec = FilterSpec {
                family,
                groups: vec![clauses
                    .into_iter()
                    .map(|(attribute, operator, value)| ClauseSpec { attribute, operator, value })
                    .collect()],
            };
            match ScopeFilter::compile(&spec) {
                Ok(f) => {
                    let mut entry = Attributes::new();
                    for name in ["a", "b", "c"] {
                        entry.set(name, crate::model::Values::from(values.clone()));
                    }
                    let groups: Vec<Dn> = groups.iter().filter_map(|g| Dn::parse(g).ok()).collect();
                    let member_of = || groups.clone();
                    let result = f.evaluate(&entry, &member_of);
                    let explanation = f.explain(&entry, &member_of);
                    prop_assert_eq!(explanation.in_scope, result);
                }
                Err(errors) => {
                    prop_assert!(!errors.is_empty());
                    for e in &errors {
                        prop_assert!((401..=412).contains(&e.code()));
                        prop_assert!(e.group == 0);
                        let _ = e.to_string();
                    }
                }
            }
        }

        #[test]
        fn negatives_are_complements(
            values in proptest::collection::vec(attr_value(), 0..3),
            value in "[a-c0-9]{0,3}",
            mask in 1i64..64,
        ) {
            let entry = attrs("a", values);
            for (pos, neg) in [("EQUAL", "NOTEQUAL"), ("CONTAINS", "NOTCONTAINS"),
                ("STARTSWITH", "NOTSTARTSWITH"), ("ENDSWITH", "NOTENDSWITH"), ("ISIN", "ISNOTIN")] {
                let a = one(Family::ConnectSync, ClauseSpec::new("a", pos, value.clone()));
                let b = one(Family::ConnectSync, ClauseSpec::new("a", neg, value.clone()));
                prop_assert_ne!(a.evaluate(&entry, &no_groups), b.evaluate(&entry, &no_groups));
            }
            let a = one(Family::ConnectSync, ClauseSpec::new("a", "ISBITSET", mask));
            let b = one(Family::ConnectSync, ClauseSpec::new("a", "ISNOTBITSET", mask));
            prop_assert_ne!(a.evaluate(&entry, &no_groups), b.evaluate(&entry, &no_groups));
            let a = one(Family::ConnectSync, ClauseSpec::unary("a", "ISNULL"));
            let b = one(Family::ConnectSync, ClauseSpec::unary("a", "ISNOTNULL"));
            prop_assert_ne!(a.evaluate(&entry, &no_groups), b.evaluate(&entry, &no_groups));
        }

        /// An integer's text written on the stack is its decimal form.
        #[test]
        fn integer_text_on_the_stack(n in prop_oneof![any::<i64>(), Just(i64::MIN), Just(i64::MAX), Just(0i64)]) {
            let value = Value::Integer(n);
            let item = Item::new(&value, &Attributes::new()).unwrap();
            prop_assert_eq!(item.text().to_string(), n.to_string());
        }

        /// The allocation-free comparisons agree with comparing folded strings.
        #[test]
        fn folded_comparisons_agree_with_fold(
            text in "[a-zA-Z0-9ſKİıΣσς ß-]{0,8}",
            operand in "[a-zA-Z0-9ſKİıΣσς ß-]{0,4}",
        ) {
            let (t, o) = (fold(&text), fold(&operand));
            prop_assert_eq!(folded_eq(&text, &o), t == o);
            prop_assert_eq!(folded_starts_with(&text, &o), t.starts_with(o.as_str()));
            prop_assert_eq!(folded_ends_with(&text, &o), t.ends_with(o.as_str()));
            prop_assert_eq!(folded_contains(&text, &o), t.contains(o.as_str()));
            prop_assert_eq!(text.chars().map(fold_char).cmp(o.chars()), t.cmp(&o));
        }
    }
}
