//! Rule sets: per source object type, a rule with a scope, join groups, attribute flows and a
//! deprovision policy — loaded with serde from TOML (with line and column for every error) or
//! JSON, or built in code, compiled once, and used as the planner's [`Projection`].
//!
//! ```toml
//! [[rule]]
//! name = "users"
//! source_type = "user"
//! target_type = "User"
//! join = [["externalId"], ["userName"]]
//! deprovision = { action = "disable", set = { active = false } }
//!
//! [rule.containers]
//! include = ["OU=Staff,DC=corp,DC=example"]
//! exclude = ["OU=Contractors,OU=Staff,DC=corp,DC=example"]
//!
//! [rule.scope]
//! family = "connect-sync"
//! groups = [[{ attribute = "userAccountControl", operator = "ISNOTBITSET", value = 2 }]]
//!
//! [[rule.flow]]
//! target = "userName"
//! expression = 'ToLower([userPrincipalName])'
//! ignore_case = true
//! ```
//!
//! `[rule.containers]` ([`ContainersConfig`]) scopes the rule to OUs and their subtrees, each
//! bound to its anchor so a rename or move keeps its objects in scope; it is ANDed with
//! `[rule.scope]`.
//!
//! Pure: the rules read no clock and no randomness of their own; `now` and a per-object seed come
//! from the planner.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::delta::{
    Apply, ContainerBindings, ContainerDecision, ContainerRef, ContainerScope, Deprovision,
    DeprovisionCause, Desired, Flow, JoinGroup, Link, Projected, Projection, ProjectionContext,
    ProjectionError, WhenEmpty,
};
use crate::model::{Anchor, AttrName, Dn, Entry, ObjectType, Value, Values};
use crate::rules::context::{EvalContext, SeededRng};
use crate::rules::diagnostic::{
    render_report, Code, Diagnostic, Origin, Span, TomlSpans, TomlStep,
    TomlStep::{Index, Key},
};
use crate::rules::eval::{self, AttributeSource, EvalFailure, Outcome, Program, Slotted};
use crate::rules::function::Function;
use crate::rules::scope::{FilterSpec, ScopeError, ScopeErrorKind, ScopeExplanation, ScopeFilter};

/// A rule set as configured (the serde form of TOML and JSON files).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSetConfig {
    /// The tenant's default verified domain (`DefaultDomain()`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_domain: Option<String>,
    /// The rules, one per source object type.
    #[serde(rename = "rule", default)]
    pub rules: Vec<RuleConfig>,
}

/// One rule: a source object type mapped onto a target object type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// A name for messages.
    pub name: String,
    /// The source object type the rule applies to.
    pub source_type: String,
    /// The target object type it makes.
    pub target_type: String,
    /// The scoping filter; none = every object of the type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<FilterSpec>,
    /// Join groups, in order: each a list of target attributes (flow targets) that must all
    /// match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub join: Vec<Vec<String>>,
    /// The attribute flows.
    #[serde(rename = "flow", default)]
    pub flows: Vec<FlowConfig>,
    /// What happens to target objects whose source leaves scope or is deleted.
    #[serde(default)]
    pub deprovision: DeprovisionConfig,
    /// The containers (OUs) whose objects the rule applies to, with their subtrees; none = every
    /// container. ANDed with `scope`.
    #[serde(default, skip_serializing_if = "ContainersConfig::is_empty")]
    pub containers: ContainersConfig,
}

/// A rule's container scope: OUs (or any containers) included and excluded with their subtrees,
/// by DN or by anchor (see [`crate::delta::ContainerScope`] for how objects are placed).
///
/// ```toml
/// [rule.containers]
/// include = ["OU=Staff,DC=corp,DC=example"]
/// exclude = ["OU=Contractors,OU=Staff,DC=corp,DC=example", { anchor = "5a8e0b44-…" }]
/// ```
///
/// A container named by DN is bound to its anchor the first time the engine finds it in the
/// source mirror, and stays bound when it is renamed or moved: its objects stay in scope. The
/// source must import the containers (an object type of their own that no rule projects, e.g.
/// `organizationalUnit = "container"` in an LDAP source's `object_types`, and the filter
/// letting them through).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainersConfig {
    /// Objects at or below these containers are in scope (none: all that are not excluded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<ContainerConfig>,
    /// Objects at or below these are out of scope, unless a nearer included container holds
    /// them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<ContainerConfig>,
}

impl ContainersConfig {
    /// Whether no container is named.
    pub fn is_empty(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }
}

/// One container of a [`ContainersConfig`]: a DN (a string, or `{ dn = "…" }`) or an anchor
/// (`{ anchor = "…" }`: the objectGUID, entryUUID, … the source gives the container).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerConfig {
    /// By DN.
    Dn(String),
    /// By anchor.
    Anchor(String),
}

impl ContainerConfig {
    /// A container by DN.
    pub fn dn(dn: impl Into<String>) -> ContainerConfig {
        ContainerConfig::Dn(dn.into())
    }

    /// A container by anchor.
    pub fn anchor(anchor: impl Into<String>) -> ContainerConfig {
        ContainerConfig::Anchor(anchor.into())
    }
}

impl From<&str> for ContainerConfig {
    fn from(dn: &str) -> ContainerConfig {
        ContainerConfig::dn(dn)
    }
}

impl Serialize for ContainerConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            ContainerConfig::Dn(dn) => s.serialize_str(dn),
            ContainerConfig::Anchor(a) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("anchor", a)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for ContainerConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ContainerConfig, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ContainerConfig;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a container DN, or a table with `dn` or `anchor`")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ContainerConfig, E> {
                Ok(ContainerConfig::Dn(v.to_owned()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ContainerConfig, A::Error> {
                use serde::de::Error as _;
                let mut found: Option<ContainerConfig> = None;
                while let Some(key) = map.next_key::<String>()? {
                    let value: String = map.next_value()?;
                    let c = match key.as_str() {
                        "dn" => ContainerConfig::Dn(value),
                        "anchor" => ContainerConfig::Anchor(value),
                        other => return Err(A::Error::unknown_field(other, &["dn", "anchor"])),
                    };
                    if found.is_some() {
                        return Err(A::Error::custom(
                            "a container is named by `dn` or by `anchor`, not both",
                        ));
                    }
                    found = Some(c);
                }
                found.ok_or_else(|| A::Error::custom("a container table needs `dn` or `anchor`"))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// One attribute flow: a target attribute computed by an expression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowConfig {
    /// The target attribute.
    pub target: String,
    /// The expression (spec: `shared/spec/expressions.md`); `[attr]` alone is a direct mapping.
    pub expression: String,
    /// When the flow applies.
    #[serde(default)]
    pub apply: Apply,
    /// A constant used when the expression gives Null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// Compare ignoring case when deciding whether the target must change.
    #[serde(default)]
    pub ignore_case: bool,
    /// Multi-valued: changed value by value. Reference flows are multi-valued unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multi: Option<bool>,
    /// The values are references to other objects (`member`, `manager`).
    #[serde(default)]
    pub reference: bool,
    /// What Null means: `keep` the target value (default for single values) or `clear` it
    /// (default for multi-valued flows and for references: a reference whose object was
    /// deleted, or left the target, must not stay behind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when_null: Option<WhenEmpty>,
}

impl FlowConfig {
    /// A flow of `expression` into `target`, with the defaults.
    pub fn new(target: impl Into<String>, expression: impl Into<String>) -> FlowConfig {
        FlowConfig {
            target: target.into(),
            expression: expression.into(),
            apply: Apply::Always,
            default: None,
            ignore_case: false,
            multi: None,
            reference: false,
            when_null: None,
        }
    }
}

/// What a rule does with a linked target object that its source object no longer wants, per
/// [`DeprovisionCause`]: left scope, deleted at the source, or now of another target type.
///
/// Two forms, in TOML and JSON alike. One policy for every cause:
///
/// ```toml
/// deprovision = { action = "disable", set = { active = false } }
/// ```
///
/// or one per cause, each optional (a cause not named deletes):
///
/// ```toml
/// deprovision = { left_scope = { action = "disable", set = { active = false } }, deleted = { action = "delete" } }
/// ```
///
/// No `deprovision` at all deletes for every cause (Entra Connect Sync's behaviour). A disable
/// keeps the link, and a returning object gets its enabled values back (`enable`, by default
/// the opposite of each Boolean of `set`): the same target object, never a new one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "DeprovisionToml", into = "DeprovisionToml")]
pub struct DeprovisionConfig {
    /// When the source object leaves scope.
    pub left_scope: DeprovisionPolicy,
    /// When the source object is deleted at the source.
    pub deleted: DeprovisionPolicy,
    /// When the rules now make a target object of another type (the old object's fate; the
    /// new one is created in the same run).
    pub type_changed: DeprovisionPolicy,
}

impl DeprovisionConfig {
    /// The same policy for every cause (the single-policy form).
    pub fn all(policy: DeprovisionPolicy) -> DeprovisionConfig {
        DeprovisionConfig {
            left_scope: policy.clone(),
            deleted: policy.clone(),
            type_changed: policy,
        }
    }

    /// The policy for `cause`.
    pub fn policy(&self, cause: DeprovisionCause) -> &DeprovisionPolicy {
        match cause {
            DeprovisionCause::LeftScope => &self.left_scope,
            DeprovisionCause::DeletedAtSource => &self.deleted,
            DeprovisionCause::TypeChanged => &self.type_changed,
        }
    }

    /// The policy for `cause`, to change it.
    pub fn policy_mut(&mut self, cause: DeprovisionCause) -> &mut DeprovisionPolicy {
        match cause {
            DeprovisionCause::LeftScope => &mut self.left_scope,
            DeprovisionCause::DeletedAtSource => &mut self.deleted,
            DeprovisionCause::TypeChanged => &mut self.type_changed,
        }
    }
}

/// One deprovision action (`action = "delete" | "disable" | "unlink"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PolicyToml", into = "PolicyToml")]
pub enum DeprovisionPolicy {
    /// Delete the target object.
    #[default]
    Delete,
    /// Set these attributes (`active = false`), keep the link; re-enable on return.
    Disable {
        /// Attribute → value (a string, number or Boolean).
        set: BTreeMap<String, serde_json::Value>,
        /// Attribute → the value that re-enables a returning object. Needed for every
        /// attribute of `set` that is not a Boolean (whose opposite is the default) and that no
        /// flow of the rule writes.
        enable: BTreeMap<String, serde_json::Value>,
    },
    /// Leave the target object and forget the link.
    Unlink,
}

/// The serde form of [`DeprovisionConfig`]: either the single-policy keys or the per-cause ones.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeprovisionToml {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    action: Option<ActionName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    set: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enable: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    left_scope: Option<DeprovisionPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deleted: Option<DeprovisionPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    type_changed: Option<DeprovisionPolicy>,
}

/// The serde form of [`DeprovisionPolicy`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyToml {
    action: ActionName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    set: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enable: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ActionName {
    Delete,
    Disable,
    Unlink,
}

impl TryFrom<PolicyToml> for DeprovisionPolicy {
    type Error = String;

    fn try_from(t: PolicyToml) -> Result<Self, String> {
        match (t.action, t.set, t.enable) {
            (ActionName::Disable, Some(set), enable) if !set.is_empty() => {
                Ok(DeprovisionPolicy::Disable {
                    set,
                    enable: enable.unwrap_or_default(),
                })
            }
            (ActionName::Disable, _, _) => Err(
                "action = \"disable\" needs `set`: the attributes that disable the object, \
                 as in `set = { active = false }`"
                    .into(),
            ),
            (action, set, enable) if set.is_some() || enable.is_some() => Err(format!(
                "`{}` is only for action = \"disable\" (this action is \"{}\")",
                if set.is_some() { "set" } else { "enable" },
                action.name()
            )),
            (ActionName::Delete, _, _) => Ok(DeprovisionPolicy::Delete),
            (ActionName::Unlink, _, _) => Ok(DeprovisionPolicy::Unlink),
        }
    }
}

impl From<DeprovisionPolicy> for PolicyToml {
    fn from(p: DeprovisionPolicy) -> PolicyToml {
        match p {
            DeprovisionPolicy::Delete => PolicyToml {
                action: ActionName::Delete,
                set: None,
                enable: None,
            },
            DeprovisionPolicy::Unlink => PolicyToml {
                action: ActionName::Unlink,
                set: None,
                enable: None,
            },
            DeprovisionPolicy::Disable { set, enable } => PolicyToml {
                action: ActionName::Disable,
                set: Some(set),
                enable: (!enable.is_empty()).then_some(enable),
            },
        }
    }
}

impl ActionName {
    fn name(self) -> &'static str {
        match self {
            ActionName::Delete => "delete",
            ActionName::Disable => "disable",
            ActionName::Unlink => "unlink",
        }
    }
}

impl TryFrom<DeprovisionToml> for DeprovisionConfig {
    type Error = String;

    fn try_from(t: DeprovisionToml) -> Result<Self, String> {
        let per_cause = t.left_scope.is_some() || t.deleted.is_some() || t.type_changed.is_some();
        match t.action {
            Some(action) => {
                if per_cause {
                    return Err(
                        "either one policy for every cause (`action = …`) or one per \
                                cause (`left_scope`, `deleted`, `type_changed`), not both"
                            .into(),
                    );
                }
                let policy = DeprovisionPolicy::try_from(PolicyToml {
                    action,
                    set: t.set,
                    enable: t.enable,
                })?;
                Ok(DeprovisionConfig::all(policy))
            }
            None if t.set.is_some() || t.enable.is_some() => Err(format!(
                "`{}` needs `action = \"disable\"` beside it (or inside a cause: \
                 `left_scope = {{ action = \"disable\", set = {{ … }} }}`)",
                if t.set.is_some() { "set" } else { "enable" }
            )),
            None => Ok(DeprovisionConfig {
                left_scope: t.left_scope.unwrap_or_default(),
                deleted: t.deleted.unwrap_or_default(),
                type_changed: t.type_changed.unwrap_or_default(),
            }),
        }
    }
}

impl From<DeprovisionConfig> for DeprovisionToml {
    fn from(c: DeprovisionConfig) -> DeprovisionToml {
        if c.left_scope == c.deleted && c.deleted == c.type_changed {
            let p = PolicyToml::from(c.left_scope);
            return DeprovisionToml {
                action: Some(p.action),
                set: p.set,
                enable: p.enable,
                ..DeprovisionToml::default()
            };
        }
        DeprovisionToml {
            left_scope: Some(c.left_scope),
            deleted: Some(c.deleted),
            type_changed: Some(c.type_changed),
            ..DeprovisionToml::default()
        }
    }
}

/// A rule-set error: what, where (rule, attribute, file line:column) and the rendered report.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleError {
    /// The stable code (`E0120`, `E0402`, `E0501`, …).
    pub code: String,
    /// The rule.
    pub rule: Option<String>,
    /// The target attribute.
    pub attribute: Option<String>,
    /// 1-based line in the file, when loaded from one.
    pub line: Option<usize>,
    /// 1-based column.
    pub column: Option<usize>,
    /// One line saying what is wrong.
    pub message: String,
    /// The full report, with the source line and a caret where there is one.
    pub rendered: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.rendered)
    }
}

/// Every error found in a rule set.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct RuleErrors(pub Vec<RuleError>);

impl fmt::Display for RuleErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Codes of rule-set errors (`E05xx`).
pub mod codes {
    /// The file is not valid TOML/JSON, or a field is unknown or of the wrong type.
    pub const SYNTAX: u16 = 501;
    /// A join group names an attribute no flow of the rule computes.
    pub const UNKNOWN_JOIN_ATTRIBUTE: u16 = 502;
    /// Two flows of one rule compute the same target attribute.
    pub const DUPLICATE_FLOW: u16 = 503;
    /// Two rules for one source object type.
    pub const DUPLICATE_RULE: u16 = 504;
    /// A deprovision value that is not a string, number or Boolean.
    pub const BAD_DEPROVISION_VALUE: u16 = 505;
    /// An empty join group.
    pub const EMPTY_JOIN_GROUP: u16 = 506;
    /// A container that is not a valid DN, or an empty anchor.
    pub const INVALID_CONTAINER: u16 = 507;
    /// One container both included and excluded.
    pub const CONTAINER_CONFLICT: u16 = 508;
    /// A deprovision disables by an attribute nothing sets back when the object returns (not a
    /// Boolean, no `enable` value, no flow of the rule writes it).
    pub const NO_WAY_BACK: u16 = 509;
    /// A deprovision's `enable` names an attribute its `set` does not.
    pub const ENABLE_WITHOUT_SET: u16 = 510;
}

/// Where a rule set's text came from, to point errors at lines.
struct Source<'a> {
    file: Option<&'a str>,
    text: Option<&'a str>,
    /// Where the values are (nothing for JSON and code).
    spans: TomlSpans<'a>,
}

impl Source<'_> {
    /// The byte range of the value at `path` in the text, when it is written there.
    fn span(&self, path: &[TomlStep<'_>]) -> Option<Range<usize>> {
        self.spans.span(path).map(|s| s.start..s.end)
    }
}

/// Where in the text a scoping-filter error is: the clause's operator or value, the clause, the
/// group, or the filter. The position inside a regular expression or DN is pointed at when the
/// value is a string without escapes before it.
fn scope_error_span(src: &Source<'_>, rule: usize, e: &ScopeError) -> Option<Range<usize>> {
    let scope = [Key("rule"), Index(rule), Key("scope")];
    let group = [&scope[..], &[Key("groups"), Index(e.group)]].concat();
    let clause = [&group[..], &[Index(e.clause.unwrap_or(usize::MAX))]].concat();
    let field = match e.kind {
        ScopeErrorKind::UnknownOperator { .. }
        | ScopeErrorKind::OtherFamilyOperator { .. }
        | ScopeErrorKind::UnsupportedOperator => Some("operator"),
        ScopeErrorKind::UnexpectedValue
        | ScopeErrorKind::WrongValueType
        | ScopeErrorKind::ZeroMask
        | ScopeErrorKind::InvalidRegex { .. }
        | ScopeErrorKind::InvalidDn { .. } => Some("value"),
        _ => None,
    };
    let in_field = field.map(|f| [&clause[..], &[Key(f)]].concat());
    let span =
        src.spans
            .first_span(&[in_field.as_deref().unwrap_or(&[]), &clause, &group, &scope])?;
    let span = span.start..span.end;
    let inside = match e.kind {
        ScopeErrorKind::InvalidRegex { offset } => Some(offset),
        ScopeErrorKind::InvalidDn { position } => Some(position),
        _ => None,
    };
    Some(match (inside, src.text) {
        (Some(n), Some(text)) => char_in_string(text, span, n),
        _ => span,
    })
}

/// The `n`th character (0-based) of the one-line TOML string literal at `r`, or `r` itself when
/// the literal is multi-line or has an escape before that character.
fn char_in_string(text: &str, r: Range<usize>, n: usize) -> Range<usize> {
    let Some(raw) = text.get(r.clone()) else {
        return r;
    };
    let quote = raw.chars().next();
    if !matches!(quote, Some('\'' | '"')) || raw.starts_with("'''") || raw.starts_with("\"\"\"") {
        return r;
    }
    let body = &raw[1..];
    let Some((at, c)) = body.char_indices().nth(n) else {
        return r;
    };
    if quote == Some('"') && body[..at].contains('\\') {
        return r;
    }
    let start = r.start + 1 + at;
    start..start + c.len_utf8()
}

impl Source<'_> {
    /// The byte range of `rule[ri].deprovision[.cause].section.key`'s value in the text.
    fn deprovision_span(
        &self,
        ri: usize,
        cause: Option<&str>,
        section: &str,
        key: &str,
    ) -> Option<Range<usize>> {
        let mut path = vec![Key("rule"), Index(ri), Key("deprovision")];
        path.extend(cause.map(Key));
        path.extend([Key(section), Key(key)]);
        self.span(&path)
    }
}

fn line_col(text: &str, byte: usize) -> (usize, usize) {
    let before = &text[..byte.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn simple_error(
    code: u16,
    rule: Option<&str>,
    attribute: Option<&str>,
    message: String,
    src: &Source<'_>,
    at: Option<Range<usize>>,
) -> RuleError {
    let headline = format!("error[E{code:04}]: {message}");
    let origin = Origin {
        rule: rule.map(str::to_string),
        attribute: attribute.map(str::to_string),
        file: src.file.map(str::to_string),
        ..Origin::default()
    };
    let (line, column, rendered) = match (src.text, at) {
        (Some(t), Some(r)) => {
            let span = Span::new(r.start, r.end);
            let (l, c) = span.line_col(t);
            let shown = render_report(&headline, t, &origin, span, &[], None);
            (Some(l), Some(c), shown.trim_end().to_string())
        }
        _ => {
            let mut context = Vec::new();
            if let Some(r) = rule {
                context.push(format!("rule \"{r}\""));
            }
            if let Some(a) = attribute {
                context.push(format!("attribute \"{a}\""));
            }
            let place = match (src.file, context.is_empty()) {
                (Some(f), true) => format!("\n --> {f}"),
                (Some(f), false) => format!("\n --> {f} ({})", context.join(", ")),
                (None, false) => format!(" ({})", context.join(", ")),
                (None, true) => String::new(),
            };
            (None, None, format!("{headline}{place}"))
        }
    };
    RuleError {
        code: format!("E{code:04}"),
        rule: rule.map(str::to_string),
        attribute: attribute.map(str::to_string),
        line,
        column,
        message,
        rendered,
    }
}

/// Where an expression's text starts inside the file: after the opening quote(s) of its TOML
/// string (and the newline a multi-line string may start with).
fn expression_origin(
    src: &Source<'_>,
    rule: &str,
    attribute: &str,
    span: Option<&Range<usize>>,
) -> Origin {
    let mut origin = Origin {
        rule: Some(rule.to_string()),
        attribute: Some(attribute.to_string()),
        file: src.file.map(str::to_string),
        ..Origin::default()
    };
    if let (Some(text), Some(r)) = (src.text, span) {
        let raw = &text[r.start.min(text.len())..r.end.min(text.len())];
        let mut skip = if raw.starts_with("'''") || raw.starts_with("\"\"\"") {
            3
        } else {
            1
        };
        if skip == 3 && raw[3..].starts_with('\n') {
            skip += 1;
        } else if skip == 3 && raw[3..].starts_with("\r\n") {
            skip += 2;
        }
        let (l, c) = line_col(text, r.start + skip);
        origin.base_line = l;
        origin.base_col = c;
    }
    origin
}

fn diagnostic_error(d: &Diagnostic, text: &str, origin: &Origin) -> RuleError {
    let (l, c) = d.span.line_col(text);
    let (line, column) = origin.file_position(l, c);
    RuleError {
        code: d.code.to_string(),
        rule: origin.rule.clone(),
        attribute: origin.attribute.clone(),
        line: Some(line),
        column: Some(column),
        message: d.message.clone(),
        rendered: d.render(text, origin),
    }
}

/// A compiled flow.
#[derive(Debug, Clone)]
struct CompiledFlow {
    /// The flow as a projected object carries it, without values: its target attribute, when
    /// it applies, how it compares, what empty means, whether it is unique.
    shape: Flow,
    program: Program,
    default: Option<Values>,
    reference: bool,
}

/// An attribute a disable sets, its disabled values, and the rule's `Always` flow of it, if any.
type DisabledBy = (AttrName, Values, Option<usize>);

/// A compiled rule.
#[derive(Debug, Clone)]
struct CompiledRule {
    name: String,
    source_type: ObjectType,
    target_type: ObjectType,
    scope: Option<ScopeFilter>,
    /// The containers the rule applies to (empty: all).
    containers: ContainerScope,
    join: Vec<Vec<usize>>,
    flows: Vec<CompiledFlow>,
    /// The policy per cause, indexed by [`cause_index`].
    deprovision: [Deprovision; 3],
    /// The attributes a disable that keeps the link sets and can set back, with the disabled
    /// values and the rule's `Always` flow of that attribute, if any: a linked object whose
    /// target holds them is re-enabled by the planner unless that flow writes the attribute, so
    /// the fast path of [`Projection::unchanged`] answers as the planner would.
    disabled_by: Box<[DisabledBy]>,
    /// Every source attribute the flows and the scope read, sorted (in [`AttrName`] order):
    /// looked up once per object.
    attribute_names: Box<[Box<str>]>,
    /// Whether any flow draws random values; if none does, the per-object seed is not computed.
    uses_random: bool,
    /// The order [`Projection::unchanged`] evaluates the flows in: by target attribute (the
    /// order of a target object's attributes, so each lookup there is one comparison) when no
    /// flow draws random values, else the rule's own order (the random source is shared).
    compare_order: Box<[usize]>,
}

impl CompiledRule {
    /// The object's seeded random source. The seed (a hash of the anchor) is computed only when
    /// a flow draws random values: otherwise no flow reads the source, and any seed is the same.
    fn rng(&self, entry: &Entry, ctx: &ProjectionContext<'_>) -> SeededRng {
        SeededRng::from_seed(if self.uses_random {
            ctx.object_seed(&entry.anchor)
        } else {
            0
        })
    }
}

/// A compiled rule set: the planner's [`Projection`].
///
/// ```
/// use dirsync::rules::ruleset::RuleSet;
/// let rules = RuleSet::from_toml(r#"
/// [[rule]]
/// name = "users"
/// source_type = "user"
/// target_type = "User"
/// join = [["userName"]]
/// [[rule.flow]]
/// target = "userName"
/// expression = 'ToLower([mail])'
/// "#, Some("rules.toml")).unwrap();
/// assert_eq!(rules.rule_names(), ["users"]);
/// ```
#[derive(Debug, Clone)]
pub struct RuleSet {
    rules: Vec<CompiledRule>,
    default_domain: Option<String>,
    config: RuleSetConfig,
}

/// The explanation of one flow's evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlowExplanation {
    /// The target attribute.
    pub target: String,
    /// The expression.
    pub expression: String,
    /// What it produced: the values as text (`(redacted)` for secrets), `null`, `ignore flow`,
    /// `not unique`, or the error.
    pub result: String,
}

/// Why an object is (not) in scope, how it joins and what each flow gives — the data of
/// on-demand explain.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explanation {
    /// The rule that applies, if any.
    pub rule: Option<String>,
    /// Where the object stands with respect to the rule's containers (none when the rule names
    /// no container).
    pub containers: Option<String>,
    /// The scope decision with every clause (none when the rule has no filter).
    pub scope: Option<ScopeExplanation>,
    /// Whether the object is in scope.
    pub in_scope: bool,
    /// Each join group: the attributes and values it looks for, and the target objects found.
    pub join: Vec<JoinExplanation>,
    /// Every flow.
    pub flows: Vec<FlowExplanation>,
    /// What the rule does with a linked target object, per deprovision cause.
    pub deprovision: Vec<DeprovisionExplanation>,
}

/// One deprovision cause's policy, as explain shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeprovisionExplanation {
    /// The cause.
    pub cause: DeprovisionCause,
    /// What happens: `delete`, `unlink`, `disable: active = false (re-enabled with active = true)`.
    pub action: String,
    /// Whether it applies now: the object is out of scope (a linked target object gets it).
    pub applies: bool,
}

/// One join group's lookup.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JoinExplanation {
    /// Attribute = value pairs (a group whose values are missing is skipped).
    pub on: Vec<(String, String)>,
    /// The target objects that match them all.
    pub candidates: Vec<String>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Some(r) => writeln!(f, "rule: {r}")?,
            None => writeln!(f, "rule: none applies to this object type")?,
        }
        if let Some(c) = &self.containers {
            writeln!(f, "containers: {c}")?;
        }
        match &self.scope {
            Some(s) => write!(f, "{s}")?,
            None => writeln!(
                f,
                "scope: no filter — {}",
                if self.in_scope {
                    "in scope"
                } else {
                    "not in scope"
                }
            )?,
        }
        for (i, j) in self.join.iter().enumerate() {
            let on: Vec<String> = j.on.iter().map(|(a, v)| format!("{a}={v}")).collect();
            writeln!(
                f,
                "join group {}: {} → {} candidate(s) {}",
                i + 1,
                on.join(" AND "),
                j.candidates.len(),
                j.candidates.join(", ")
            )?;
        }
        for flow in &self.flows {
            writeln!(
                f,
                "flow {} = {}  ⇒  {}",
                flow.target, flow.expression, flow.result
            )?;
        }
        for d in &self.deprovision {
            writeln!(
                f,
                "deprovision when {}: {}{}",
                d.cause,
                d.action,
                if d.applies {
                    "  ⇐ out of scope: what a linked target object gets now"
                } else {
                    ""
                }
            )?;
        }
        Ok(())
    }
}

fn json_value(v: &serde_json::Value) -> Option<Value> {
    Some(match v {
        serde_json::Value::String(s) => Value::string(s.as_str()),
        serde_json::Value::Bool(b) => Value::Boolean(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::string(n.to_string()),
        },
        _ => return None,
    })
}

impl RuleSet {
    /// Loads a rule set from TOML; `file` names it in messages. Every error is reported with
    /// the rule, the attribute and the line and column in the file.
    pub fn from_toml(text: &str, file: Option<&str>) -> Result<RuleSet, RuleErrors> {
        let mut src = Source {
            file,
            text: Some(text),
            spans: TomlSpans::default(),
        };
        let config: RuleSetConfig = match toml::from_str(text) {
            Ok(c) => c,
            Err(e) => {
                return Err(RuleErrors(vec![simple_error(
                    codes::SYNTAX,
                    None,
                    None,
                    e.message().to_string(),
                    &src,
                    e.span(),
                )]))
            }
        };
        src.spans = TomlSpans::parse(text);
        RuleSet::compile_from(config, &src)
    }

    /// Loads a rule set from JSON (same structure as TOML: `{"rule": [...]}`).
    pub fn from_json(text: &str, file: Option<&str>) -> Result<RuleSet, RuleErrors> {
        let src = Source {
            file,
            text: None,
            spans: TomlSpans::default(),
        };
        let config: RuleSetConfig = serde_json::from_str(text).map_err(|e| {
            let mut error = simple_error(
                codes::SYNTAX,
                None,
                None,
                format!("{e} (line {}, column {})", e.line(), e.column()),
                &src,
                None,
            );
            error.line = Some(e.line());
            error.column = Some(e.column());
            RuleErrors(vec![error])
        })?;
        RuleSet::compile_from(config, &src)
    }

    /// Compiles a configuration built in code (see [`RuleSetBuilder`]).
    pub fn compile(config: RuleSetConfig) -> Result<RuleSet, RuleErrors> {
        let src = Source {
            file: None,
            text: None,
            spans: TomlSpans::default(),
        };
        RuleSet::compile_from(config, &src)
    }

    /// Starts building a rule set in code.
    pub fn builder() -> RuleSetBuilder {
        RuleSetBuilder::default()
    }

    /// The configuration it was compiled from.
    pub fn config(&self) -> &RuleSetConfig {
        &self.config
    }

    /// The rule names, in order.
    pub fn rule_names(&self) -> Vec<&str> {
        self.rules.iter().map(|r| r.name.as_str()).collect()
    }

    fn compile_from(config: RuleSetConfig, src: &Source<'_>) -> Result<RuleSet, RuleErrors> {
        let mut errors = Vec::new();
        let mut rules = Vec::new();
        let mut seen_types: Vec<ObjectType> = Vec::new();
        for (ri, rc) in config.rules.iter().enumerate() {
            let rname = rc.name.as_str();
            let source_type = ObjectType::new(rc.source_type.as_str());
            if seen_types.contains(&source_type) {
                let at = src.span(&[Key("rule"), Index(ri), Key("source_type")]);
                errors.push(simple_error(codes::DUPLICATE_RULE, Some(rname), None, format!("a rule for source type {source_type} already exists; one rule per source object type"), src, at));
            }
            seen_types.push(source_type.clone());
            let scope = match &rc.scope {
                None => None,
                Some(spec) => match ScopeFilter::compile(spec) {
                    Ok(f) => Some(f),
                    Err(es) => {
                        for e in es {
                            errors.push(simple_error(
                                e.code(),
                                Some(rname),
                                None,
                                format!("{e}"),
                                src,
                                scope_error_span(src, ri, &e),
                            ));
                        }
                        None
                    }
                },
            };
            let containers = compile_containers(ri, rc, src, &mut errors);
            let mut flows: Vec<CompiledFlow> = Vec::new();
            for (fi, fc) in rc.flows.iter().enumerate() {
                let span = src.span(&[
                    Key("rule"),
                    Index(ri),
                    Key("flow"),
                    Index(fi),
                    Key("expression"),
                ]);
                let origin = expression_origin(src, rname, &fc.target, span.as_ref());
                if flows.iter().any(|f| f.shape.attribute.is(&fc.target)) {
                    errors.push(simple_error(
                        codes::DUPLICATE_FLOW,
                        Some(rname),
                        Some(&fc.target),
                        format!("{} is computed by two flows of this rule", fc.target),
                        src,
                        src.span(&[
                            Key("rule"),
                            Index(ri),
                            Key("flow"),
                            Index(fi),
                            Key("target"),
                        ]),
                    ));
                    continue;
                }
                match Program::compile(&fc.expression) {
                    Ok(program) => {
                        let multi = fc.multi.unwrap_or(fc.reference);
                        let unique = program.compiled().top_level_function()
                            == Some(Function::SelectUniqueValue);
                        flows.push(CompiledFlow {
                            shape: Flow {
                                attribute: AttrName::new(fc.target.as_str()),
                                values: Values::new(),
                                apply: fc.apply,
                                ignore_case: fc.ignore_case,
                                multi,
                                when_empty: fc.when_null.unwrap_or(if multi || fc.reference {
                                    WhenEmpty::Clear
                                } else {
                                    WhenEmpty::Keep
                                }),
                                redacted: false,
                                unique,
                            },
                            default: fc.default.as_ref().map(|d| Values::one(d.as_str())),
                            reference: fc.reference,
                            program,
                        });
                    }
                    Err(ds) => {
                        for d in ds.0.iter().filter(|d| d.is_error()) {
                            errors.push(diagnostic_error(d, &fc.expression, &origin));
                        }
                    }
                }
            }
            let mut join = Vec::new();
            for (gi, group) in rc.join.iter().enumerate() {
                let group_path = [Key("rule"), Index(ri), Key("join"), Index(gi)];
                if group.is_empty() {
                    errors.push(simple_error(
                        codes::EMPTY_JOIN_GROUP,
                        Some(rname),
                        None,
                        "a join group needs at least one attribute".into(),
                        src,
                        src.span(&group_path),
                    ));
                    continue;
                }
                let mut idx = Vec::new();
                for (ai, attr) in group.iter().enumerate() {
                    match rc
                        .flows
                        .iter()
                        .position(|f| AttrName::new(f.target.as_str()).is(attr))
                    {
                        Some(i) => idx.push(i),
                        None => {
                            let at = src.span(&[&group_path[..], &[Index(ai)]].concat());
                            errors.push(simple_error(codes::UNKNOWN_JOIN_ATTRIBUTE, Some(rname), Some(attr), format!("join attribute {attr} is not the target of any flow of this rule; join groups name target attributes"), src, at));
                        }
                    }
                }
                join.push(idx);
            }
            let (deprovision, disabled_by) = compile_deprovision(ri, rc, src, &mut errors);
            let mut attributes: Vec<AttrName> = flows
                .iter()
                .flat_map(|f| f.program.attribute_names())
                .chain(scope.iter().flat_map(|s| s.attribute_names()))
                .map(AttrName::new)
                .collect();
            attributes.sort();
            attributes.dedup();
            for f in &mut flows {
                f.program.bind(&attributes);
            }
            let mut scope = scope;
            if let Some(s) = &mut scope {
                s.bind(&attributes);
            }
            let uses_random = flows.iter().any(|f| f.program.uses_random());
            let mut compare_order: Vec<usize> = (0..flows.len()).collect();
            if !uses_random {
                compare_order
                    .sort_by(|&a, &b| flows[a].shape.attribute.cmp(&flows[b].shape.attribute));
            }
            rules.push(CompiledRule {
                attribute_names: attributes.iter().map(|a| a.as_str().into()).collect(),
                uses_random,
                compare_order: compare_order.into(),
                name: rc.name.clone(),
                source_type,
                target_type: ObjectType::new(rc.target_type.as_str()),
                scope,
                containers,
                join,
                flows,
                deprovision,
                disabled_by,
            });
        }
        if !errors.is_empty() {
            return Err(RuleErrors(errors));
        }
        // Only a rule set that compiled interns its names (see `AttrName::interned`): every
        // projected object copies them, and a `'static` name is copied without counting.
        for rule in &mut rules {
            rule.target_type = ObjectType::interned(rule.target_type.as_str());
            for flow in &mut rule.flows {
                flow.shape.attribute = AttrName::interned(flow.shape.attribute.as_str());
            }
        }
        Ok(RuleSet {
            rules,
            default_domain: config.default_domain.clone(),
            config,
        })
    }

    fn rule_for(&self, object_type: &ObjectType) -> Option<&CompiledRule> {
        self.rules.iter().find(|r| r.source_type == *object_type)
    }

    /// Evaluates one flow: `Ok(None)` = leave the attribute out (ignore flow).
    #[inline(always)]
    fn flow_values(
        &self,
        rule: &CompiledRule,
        flow: &CompiledFlow,
        view: &Slotted<'_>,
        ctx: &ProjectionContext<'_>,
        rng: &mut SeededRng,
    ) -> Result<Option<(Values, bool)>, FlowFailure> {
        // Direct mappings flow the source values as they are (typed, references kept).
        if let Some((name, slot)) = flow.program.direct_attribute() {
            let values = view
                .values(name, slot)
                .map(eval::detach_values)
                .unwrap_or_default();
            if values.is_empty() {
                if let Some(d) = &flow.default {
                    return Ok(Some((d.clone(), false)));
                }
            }
            return Ok(Some((values, flow.program.compiled().redact)));
        }
        let target_type = &rule.target_type;
        let oracle = |v: &str| ctx.is_unique(target_type, &flow.shape.attribute, v);
        let mut ectx = EvalContext {
            now: ctx.now(),
            rng,
            default_domain: self.default_domain.as_deref(),
            app_role_assignments: &[],
            is_unique: &oracle,
        };
        let redacted = flow.program.compiled().redact;
        let outcome = flow
            .program
            .outcome(view, &mut ectx)
            .map_err(FlowFailure::Eval)?;
        match outcome {
            Outcome::IgnoreFlow => Ok(None),
            Outcome::NotUnique => Err(FlowFailure::NotUnique),
            Outcome::Value(v) => {
                let mut values = eval::into_model(v, flow.reference).map_err(|error| {
                    FlowFailure::Eval(Box::new(EvalFailure {
                        error,
                        span: Span::default(),
                    }))
                })?;
                if values.is_empty() {
                    if let Some(d) = &flow.default {
                        values = d.clone();
                    }
                }
                Ok(Some((values, redacted)))
            }
        }
    }

    /// Why `entry` is outside the rule's containers (and the container it is in now), or
    /// `None` when it is within them — the common case, decided without building a reason.
    fn outside_containers(
        &self,
        rule: &CompiledRule,
        entry: &Entry,
        ctx: &ProjectionContext<'_>,
    ) -> Option<(String, Option<Dn>)> {
        if rule.containers.is_empty() {
            return None;
        }
        let unbound = ContainerBindings::new();
        let bindings = ctx.containers().unwrap_or(&unbound);
        if rule.containers.admits(entry.dn.as_ref(), bindings) {
            return None;
        }
        match rule.containers.decide(entry.dn.as_ref(), bindings) {
            ContainerDecision::Out { why, container } => Some((why, container)),
            ContainerDecision::In(_) => None,
        }
    }

    fn in_scope(
        &self,
        rule: &CompiledRule,
        entry: &Entry,
        view: &Slotted<'_>,
        ctx: &ProjectionContext<'_>,
    ) -> bool {
        match &rule.scope {
            None => true,
            Some(f) => f.evaluate_in(view, &|| {
                ctx.member_of(&entry.anchor).into_iter().cloned().collect()
            }),
        }
    }

    /// Explains the decision for one entry: scope clauses, join lookups and every flow's value.
    pub fn explain(&self, entry: &Entry, ctx: &ProjectionContext<'_>) -> Explanation {
        let Some(rule) = self.rule_for(&entry.object_type) else {
            return Explanation {
                rule: None,
                containers: None,
                scope: None,
                in_scope: false,
                join: Vec::new(),
                flows: Vec::new(),
                deprovision: Vec::new(),
            };
        };
        let view = Slotted::new(&rule.attribute_names, &entry.attributes)
            .with_dn(entry.dn.as_ref())
            .with_mirror(ctx.mirror());
        let scope = rule.scope.as_ref().map(|f| {
            f.explain_in(&view, &|| {
                ctx.member_of(&entry.anchor).into_iter().cloned().collect()
            })
        });
        let unbound = ContainerBindings::new();
        let bindings = ctx.containers().unwrap_or(&unbound);
        let (in_containers, containers) = match rule.containers.decide(entry.dn.as_ref(), bindings)
        {
            _ if rule.containers.is_empty() => (true, None),
            ContainerDecision::In(Some(b)) => (
                true,
                Some(format!("under included container {}", b.describe())),
            ),
            ContainerDecision::In(None) => (true, Some("under no excluded container".into())),
            ContainerDecision::Out { why, .. } => (false, Some(why)),
        };
        let in_scope = in_containers && scope.as_ref().is_none_or(|s| s.in_scope);
        let mut rng = rule.rng(entry, ctx);
        let mut flows = Vec::new();
        let mut values: Vec<Option<Values>> = Vec::new();
        for flow in &rule.flows {
            let (result, vals) = match self.flow_values(rule, flow, &view, ctx, &mut rng) {
                Ok(None) => ("ignore flow".to_string(), None),
                Ok(Some((v, true))) => ("(redacted)".to_string(), Some(v)),
                Ok(Some((v, false))) if v.is_empty() => ("null".to_string(), Some(v)),
                Ok(Some((v, false))) => (
                    v.iter()
                        .map(|x| format!("{x:?}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    Some(v),
                ),
                Err(FlowFailure::NotUnique) => {
                    ("not unique: every candidate is taken".to_string(), None)
                }
                Err(FlowFailure::Eval(e)) => (format!("error: {e}"), None),
            };
            flows.push(FlowExplanation {
                target: flow.shape.attribute.to_string(),
                expression: flow.program.compiled().source.clone(),
                result,
            });
            values.push(vals);
        }
        let join = rule
            .join
            .iter()
            .map(|g| {
                let on: Vec<(AttrName, Value)> = g
                    .iter()
                    .filter_map(|&i| {
                        values
                            .get(i)
                            .and_then(|v| v.as_ref())
                            .and_then(|v| v.first())
                            .map(|v| (rule.flows[i].shape.attribute.clone(), v.clone()))
                    })
                    .collect();
                let mut candidates: Option<Vec<String>> = None;
                if on.len() == g.len() {
                    for (a, v) in &on {
                        let found: Vec<String> = ctx
                            .find_target(&rule.target_type, a, v)
                            .into_iter()
                            .map(|t| t.to_string())
                            .collect();
                        candidates = Some(match candidates {
                            None => found,
                            Some(prev) => prev.into_iter().filter(|c| found.contains(c)).collect(),
                        });
                    }
                }
                JoinExplanation {
                    on: on
                        .iter()
                        .map(|(a, v)| (a.to_string(), v.to_string()))
                        .collect(),
                    candidates: candidates.unwrap_or_default(),
                }
            })
            .collect();
        let deprovision = DeprovisionCause::ALL
            .into_iter()
            .map(|cause| DeprovisionExplanation {
                cause,
                action: rule.deprovision[cause_index(cause)].to_string(),
                applies: !in_scope && cause == DeprovisionCause::LeftScope,
            })
            .collect();
        Explanation {
            rule: Some(rule.name.clone()),
            containers,
            scope,
            in_scope,
            join,
            flows,
            deprovision,
        }
    }
}

enum FlowFailure {
    Eval(Box<EvalFailure>),
    NotUnique,
}

impl Projection for RuleSet {
    fn reads_member_of(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.scope.as_ref().is_some_and(ScopeFilter::reads_member_of))
    }

    /// Rules read a referenced object as its DN (through the view's mirror), and nothing
    /// else of the mirror but `member_of`.
    fn reads_mirror_by_dn(&self) -> bool {
        true
    }

    fn project(&self, entry: &Entry, ctx: &ProjectionContext<'_>) -> Projected {
        let Some(rule) = self.rule_for(&entry.object_type) else {
            return Projected::OutOfScope(format!("no rule for object type {}", entry.object_type));
        };
        if let Some((why, container)) = self.outside_containers(rule, entry, ctx) {
            return Projected::OutOfContainer {
                why: format!("rule {}: {why}", rule.name),
                container,
            };
        }
        let view = Slotted::new(&rule.attribute_names, &entry.attributes)
            .with_dn(entry.dn.as_ref())
            .with_mirror(ctx.mirror());
        if !self.in_scope(rule, entry, &view, ctx) {
            return Projected::OutOfScope(format!("rule {}: scoping filter", rule.name));
        }
        let mut rng = rule.rng(entry, ctx);
        // Allocated at their final size at once (cheaper than growing an empty vector).
        let mut desired = Desired {
            target_type: rule.target_type.clone(),
            join: Vec::with_capacity(rule.join.len()),
            flows: Vec::with_capacity(rule.flows.len()),
        };
        // For each flow, where its values went in `desired.flows` (joins read the first value).
        let mut placed: smallvec::SmallVec<[Option<usize>; 32]> = smallvec::SmallVec::new();
        for flow in &rule.flows {
            match self.flow_values(rule, flow, &view, ctx, &mut rng) {
                Ok(None) => placed.push(None),
                Ok(Some((values, redacted))) => {
                    placed.push(Some(desired.flows.len()));
                    desired.flows.push(Flow {
                        attribute: flow.shape.attribute.clone(),
                        values,
                        redacted,
                        ..flow.shape
                    });
                }
                Err(FlowFailure::NotUnique) => {
                    return Projected::Held(format!(
                        "rule {}: no unique value is free for {}",
                        rule.name, flow.shape.attribute
                    ))
                }
                Err(FlowFailure::Eval(e)) => {
                    let (line, col) = e.span.line_col(&flow.program.compiled().source);
                    return Projected::Failed(ProjectionError {
                        rule: Some(rule.name.clone()),
                        attribute: Some(flow.shape.attribute.clone()),
                        message: format!(
                            "{} at {line}:{col} in `{}`: {}",
                            Code::Evaluation(e.error.code),
                            flow.program.compiled().source,
                            e.error.message
                        ),
                    });
                }
            }
        }
        for group in &rule.join {
            let mut pairs = JoinGroup::with_capacity(group.len());
            for &i in group {
                let found = placed
                    .get(i)
                    .copied()
                    .flatten()
                    .and_then(|at| desired.flows.get(at)?.values.first())
                    .zip(rule.flows.get(i));
                match found {
                    Some((first, flow)) => pairs.push(flow.shape.attribute.clone(), first.clone()),
                    None => break,
                }
            }
            if pairs.len() == group.len() {
                desired.join.push(pairs);
            }
        }
        Projected::InScope(desired)
    }

    /// The fast path of a full sync: the same scope and flows as [`RuleSet::project`], each
    /// flow's values compared with the linked target object's as soon as they are made (the
    /// first difference ends it) — nothing is built, and an attribute mapped directly is
    /// compared where it lies in the entry, without a copy. Up to the first difference every
    /// flow is evaluated, `OnCreate` ones too, and in the rule's order when a flow draws random
    /// values (so they come out as `project`'s would); an error or a held value answers
    /// `Some(false)`, and `project` reports it.
    fn unchanged(
        &self,
        entry: &Entry,
        current: &crate::model::TargetObject,
        ctx: &ProjectionContext<'_>,
    ) -> Option<bool> {
        let rule = self.rule_for(&entry.object_type)?;
        if rule.target_type != current.object_type {
            return Some(false);
        }
        if self.outside_containers(rule, entry, ctx).is_some() {
            return Some(false);
        }
        // A target object holding disabled values is re-enabled by the planner, unless a flow
        // writes the attribute: those flows must then give values.
        let mut must_write: smallvec::SmallVec<[usize; 2]> = smallvec::SmallVec::new();
        for (a, disabled, flow) in rule.disabled_by.iter() {
            if current
                .attributes
                .get(a.as_str())
                .is_some_and(|h| disabled.same_set(h, true))
            {
                match flow {
                    Some(i) => must_write.push(*i),
                    None => return Some(false),
                }
            }
        }
        let view = Slotted::new(&rule.attribute_names, &entry.attributes)
            .with_dn(entry.dn.as_ref())
            .with_mirror(ctx.mirror());
        if !self.in_scope(rule, entry, &view, ctx) {
            return Some(false);
        }
        let mut rng = rule.rng(entry, ctx);
        let mut hint = 0;
        let empty = Values::new();
        for &i in rule.compare_order.iter() {
            let Some(flow) = rule.flows.get(i) else {
                continue;
            };
            let made;
            let values = match flow.program.direct_attribute() {
                Some((name, slot)) => match view.values(name, slot) {
                    Some(v) if !v.is_empty() => v,
                    _ => flow.default.as_ref().unwrap_or(&empty),
                },
                None => match self.flow_values(rule, flow, &view, ctx, &mut rng) {
                    Ok(None) if must_write.contains(&i) => return Some(false),
                    Ok(None) => continue,
                    Ok(Some((v, _))) => {
                        made = v;
                        &made
                    }
                    Err(_) => return Some(false),
                },
            };
            if values.is_empty()
                && flow.shape.when_empty == WhenEmpty::Keep
                && must_write.contains(&i)
            {
                return Some(false);
            }
            if flow.shape.apply != Apply::OnCreate {
                let have = current
                    .attributes
                    .get_hinted(&flow.shape.attribute, &mut hint);
                if !ctx.flow_holds(&flow.shape, values, have) {
                    return Some(false);
                }
            }
        }
        Some(true)
    }

    fn join_attributes(
        &self,
    ) -> Option<BTreeMap<ObjectType, std::collections::BTreeSet<AttrName>>> {
        let mut out: BTreeMap<ObjectType, std::collections::BTreeSet<AttrName>> = BTreeMap::new();
        for r in &self.rules {
            let attrs = out.entry(r.target_type.clone()).or_default();
            for &i in r.join.iter().flatten() {
                if let Some(f) = r.flows.get(i) {
                    attrs.insert(f.shape.attribute.clone());
                }
            }
        }
        Some(out)
    }

    fn containers(&self) -> Vec<ContainerRef> {
        let mut out: Vec<ContainerRef> = Vec::new();
        for r in self.rules.iter().flat_map(|r| r.containers.references()) {
            if !out.contains(r) {
                out.push(r.clone());
            }
        }
        out
    }

    /// The rule's policy for `cause`; a link whose source type no rule names any more is
    /// deleted.
    fn deprovision(
        &self,
        link: &Link,
        _entry: Option<&Entry>,
        cause: DeprovisionCause,
    ) -> Deprovision {
        self.rule_for(&link.source_type)
            .map(|r| r.deprovision[cause_index(cause)].clone())
            .unwrap_or_default()
    }
}

/// Compiles a rule's containers: DNs parsed, anchors checked, a container both included and
/// excluded refused — each error at its line:column.
fn compile_containers(
    ri: usize,
    rc: &RuleConfig,
    src: &Source<'_>,
    errors: &mut Vec<RuleError>,
) -> ContainerScope {
    let rname = rc.name.as_str();
    let mut scope = ContainerScope::default();
    let lists = [
        (false, &rc.containers.include),
        (true, &rc.containers.exclude),
    ];
    for (excluded, list) in lists {
        for (i, c) in list.iter().enumerate() {
            let side = if excluded { "exclude" } else { "include" };
            let at = src.span(&[
                Key("rule"),
                Index(ri),
                Key("containers"),
                Key(side),
                Index(i),
            ]);
            let reference = match c {
                ContainerConfig::Dn(text) => match Dn::parse(text) {
                    Ok(dn) if !dn.is_root() => ContainerRef::Dn(dn),
                    Ok(_) => {
                        errors.push(simple_error(
                            codes::INVALID_CONTAINER,
                            Some(rname),
                            None,
                            format!("containers.{side}[{i}]: a container DN cannot be empty (the root holds every object: leave `{side}` out instead)"),
                            src,
                            at,
                        ));
                        continue;
                    }
                    Err(e) => {
                        errors.push(simple_error(
                            codes::INVALID_CONTAINER,
                            Some(rname),
                            None,
                            format!(
                                "containers.{side}[{i}]: invalid DN {text:?} at position {}: {}; write an RFC 4514 DN such as \"OU=Staff,DC=example,DC=com\"",
                                e.position(),
                                e.message()
                            ),
                            src,
                            at,
                        ));
                        continue;
                    }
                },
                ContainerConfig::Anchor(a) if a.trim().is_empty() => {
                    errors.push(simple_error(
                        codes::INVALID_CONTAINER,
                        Some(rname),
                        None,
                        format!("containers.{side}[{i}]: the anchor is empty"),
                        src,
                        at,
                    ));
                    continue;
                }
                ContainerConfig::Anchor(a) => ContainerRef::Anchor(Anchor::from(a.trim())),
            };
            let other = if excluded {
                &scope.include
            } else {
                &scope.exclude
            };
            if other.contains(&reference) {
                errors.push(simple_error(
                    codes::CONTAINER_CONFLICT,
                    Some(rname),
                    None,
                    format!("containers: {reference} is both included and excluded"),
                    src,
                    at,
                ));
                continue;
            }
            let mine = if excluded {
                &mut scope.exclude
            } else {
                &mut scope.include
            };
            if !mine.contains(&reference) {
                mine.push(reference);
            }
        }
    }
    scope
}

/// Builds a rule set in code, through the same compile step as files.
///
/// ```
/// use dirsync::rules::ruleset::{RuleSet, RuleBuilder};
/// let rules = RuleSet::builder()
///     .rule(
///         RuleBuilder::new("users", "user", "User")
///             .flow("userName", "ToLower([userPrincipalName])")
///             .flow("displayName", r#"Join(" ", [givenName], [sn])"#)
///             .join(["userName"])
///             .disable_with("active", false),
///     )
///     .build()
///     .unwrap();
/// assert_eq!(rules.rule_names(), ["users"]);
/// ```
#[derive(Debug, Clone, Default)]
pub struct RuleSetBuilder {
    config: RuleSetConfig,
}

impl RuleSetBuilder {
    /// Adds a rule.
    pub fn rule(mut self, rule: RuleBuilder) -> Self {
        self.config.rules.push(rule.config);
        self
    }

    /// Sets the tenant's default domain.
    pub fn default_domain(mut self, domain: impl Into<String>) -> Self {
        self.config.default_domain = Some(domain.into());
        self
    }

    /// Compiles.
    pub fn build(self) -> Result<RuleSet, RuleErrors> {
        RuleSet::compile(self.config)
    }
}

/// Builds one rule.
#[derive(Debug, Clone)]
pub struct RuleBuilder {
    config: RuleConfig,
}

impl RuleBuilder {
    /// A rule mapping `source_type` onto `target_type`.
    pub fn new(
        name: impl Into<String>,
        source_type: impl Into<String>,
        target_type: impl Into<String>,
    ) -> Self {
        RuleBuilder {
            config: RuleConfig {
                name: name.into(),
                source_type: source_type.into(),
                target_type: target_type.into(),
                scope: None,
                join: Vec::new(),
                flows: Vec::new(),
                deprovision: DeprovisionConfig::default(),
                containers: ContainersConfig::default(),
            },
        }
    }

    /// Adds a flow with default options.
    pub fn flow(self, target: impl Into<String>, expression: impl Into<String>) -> Self {
        self.flow_with(FlowConfig::new(target, expression))
    }

    /// Adds a flow with options.
    pub fn flow_with(mut self, flow: FlowConfig) -> Self {
        self.config.flows.push(flow);
        self
    }

    /// Adds a join group of target attributes.
    pub fn join<S: Into<String>>(mut self, attributes: impl IntoIterator<Item = S>) -> Self {
        self.config
            .join
            .push(attributes.into_iter().map(Into::into).collect());
        self
    }

    /// Sets the scoping filter.
    pub fn scope(mut self, filter: FilterSpec) -> Self {
        self.config.scope = Some(filter);
        self
    }

    /// Includes a container (by DN: `"OU=Staff,DC=corp"`, or [`ContainerConfig::anchor`]) with
    /// its subtree in the rule's scope.
    pub fn include_container(mut self, container: impl Into<ContainerConfig>) -> Self {
        self.config.containers.include.push(container.into());
        self
    }

    /// Excludes a container with its subtree from the rule's scope.
    pub fn exclude_container(mut self, container: impl Into<ContainerConfig>) -> Self {
        self.config.containers.exclude.push(container.into());
        self
    }

    /// Deprovisions by setting `attribute` to `value`, for every cause (adds to the attributes
    /// a disable sets; the single-policy form).
    pub fn disable_with(
        mut self,
        attribute: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        let (attribute, value) = (attribute.into(), value.into());
        for cause in DeprovisionCause::ALL {
            let policy = self.config.deprovision.policy_mut(cause);
            if !matches!(policy, DeprovisionPolicy::Disable { .. }) {
                *policy = DeprovisionPolicy::Disable {
                    set: BTreeMap::new(),
                    enable: BTreeMap::new(),
                };
            }
            if let DeprovisionPolicy::Disable { set, .. } = policy {
                set.insert(attribute.clone(), value.clone());
            }
        }
        self
    }

    /// Sets the deprovision policy of every cause.
    pub fn deprovision(mut self, policy: DeprovisionConfig) -> Self {
        self.config.deprovision = policy;
        self
    }

    /// Sets the deprovision policy of one cause.
    ///
    /// ```
    /// use std::collections::BTreeMap;
    /// use dirsync::delta::DeprovisionCause;
    /// use dirsync::rules::ruleset::{DeprovisionPolicy, RuleBuilder, RuleSet};
    ///
    /// // Entra provisioning's policy: disable who leaves scope, delete who is deleted.
    /// let rules = RuleSet::builder()
    ///     .rule(
    ///         RuleBuilder::new("users", "user", "User")
    ///             .flow("userName", "[sAMAccountName]")
    ///             .deprovision_on(
    ///                 DeprovisionCause::LeftScope,
    ///                 DeprovisionPolicy::Disable {
    ///                     set: BTreeMap::from([("active".into(), false.into())]),
    ///                     enable: BTreeMap::new(), // `active = true`, the opposite
    ///                 },
    ///             )
    ///             .deprovision_on(DeprovisionCause::DeletedAtSource, DeprovisionPolicy::Delete),
    ///     )
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(rules.config().rules[0].deprovision.deleted, DeprovisionPolicy::Delete);
    /// ```
    pub fn deprovision_on(mut self, cause: DeprovisionCause, policy: DeprovisionPolicy) -> Self {
        *self.config.deprovision.policy_mut(cause) = policy;
        self
    }
}

/// The index of `cause` in a compiled rule's policies.
fn cause_index(cause: DeprovisionCause) -> usize {
    match cause {
        DeprovisionCause::LeftScope => 0,
        DeprovisionCause::DeletedAtSource => 1,
        DeprovisionCause::TypeChanged => 2,
    }
}

/// Compiles rule `ri`'s deprovision policies: the planner's [`Deprovision`] per cause, and the
/// attributes a disable that keeps the link sets and can set back (with their disabled values).
/// Errors point at the value in the file: a value that is not a string, number or Boolean; an
/// attribute nothing sets back; an `enable` without its `set`.
fn compile_deprovision(
    ri: usize,
    rc: &RuleConfig,
    src: &Source<'_>,
    errors: &mut Vec<RuleError>,
) -> ([Deprovision; 3], Box<[DisabledBy]>) {
    let rname = rc.name.as_str();
    let mut out: [Deprovision; 3] = Default::default();
    let mut disabled_by: Vec<DisabledBy> = Vec::new();
    let mut found: Vec<RuleError> = Vec::new();
    for cause in DeprovisionCause::ALL {
        let DeprovisionPolicy::Disable { set, enable } = rc.deprovision.policy(cause) else {
            out[cause_index(cause)] = match rc.deprovision.policy(cause) {
                DeprovisionPolicy::Unlink => Deprovision::Unlink,
                _ => Deprovision::Delete,
            };
            continue;
        };
        // The value's place: under the cause's own table, or the single policy's.
        let at = |section: &str, key: &str| {
            src.deprovision_span(ri, Some(cause.name()), section, key)
                .or_else(|| src.deprovision_span(ri, None, section, key))
        };
        let value = |section: &str, k: &str, v: &serde_json::Value, found: &mut Vec<RuleError>| {
            let got = json_value(v).map(Values::one);
            if got.is_none() {
                found.push(simple_error(
                    codes::BAD_DEPROVISION_VALUE,
                    Some(rname),
                    Some(k),
                    format!("deprovision value of {k} must be a string, number or Boolean"),
                    src,
                    at(section, k),
                ));
            }
            got
        };
        for k in enable.keys().filter(|k| !set.contains_key(*k)) {
            found.push(simple_error(
                codes::ENABLE_WITHOUT_SET,
                Some(rname),
                Some(k),
                format!("deprovision enables {k}, which its `set` does not disable"),
                src,
                at("enable", k),
            ));
        }
        let mut sets: Vec<(AttrName, Values)> = Vec::new();
        let mut enables: Vec<(AttrName, Values)> = Vec::new();
        for (k, v) in set {
            let Some(disabled) = value("set", k, v, &mut found) else {
                continue;
            };
            let name = AttrName::new(k.as_str());
            let back = match enable.get(k) {
                Some(e) => value("enable", k, e, &mut found),
                None => crate::delta::enabled_values(&disabled),
            };
            let flowed = rc
                .flows
                .iter()
                .position(|f| f.apply == Apply::Always && name.is(&f.target));
            if back.is_none()
                && flowed.is_none()
                && !enable.contains_key(k)
                && cause != DeprovisionCause::TypeChanged
            {
                found.push(simple_error(
                    codes::NO_WAY_BACK,
                    Some(rname),
                    Some(k),
                    format!(
                        "deprovision sets {k} = {v}, and nothing sets it back when the object \
                         returns: the value is not a Boolean and no flow of this rule writes \
                         {k}; say what an enabled object has with `enable = {{ {k} = … }}` \
                         beside `set`"
                    ),
                    src,
                    at("set", k),
                ));
            }
            if let Some(back) = back {
                if DeprovisionCause::KEEPING_THE_LINK.contains(&cause)
                    && !disabled_by
                        .iter()
                        .any(|(a, d, _)| *a == name && *d == disabled)
                {
                    disabled_by.push((name.clone(), disabled.clone(), flowed));
                }
                enables.push((name.clone(), back));
            }
            sets.push((name, disabled));
        }
        out[cause_index(cause)] = Deprovision::Disable {
            set: sets,
            enable: enables,
        };
    }
    // The single-policy form gives every cause the same policy: report each problem once.
    for e in found {
        if !errors.iter().any(|x| x.rendered == e.rendered) {
            errors.push(e);
        }
    }
    (out, disabled_by.into_boxed_slice())
}
