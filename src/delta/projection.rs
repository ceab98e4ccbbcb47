//! The [`Projection`] trait: what the planner asks of the rules — is this entry in scope, how
//! does it join, what should its target object look like, how is it deprovisioned.
//!
//! The planner knows nothing of the rule language; `rules` is one implementation, and a program
//! may write its projection in plain Rust.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::state::{Link, Links, SourceMirror, TargetMirror};
use crate::model::{Anchor, AttrName, Dn, Entry, ObjectType, Value, Values};

/// Decides, for one source object, what its target object should be.
///
/// Implementations must be pure: the same entry and context give the same answer. Randomness
/// comes from [`ProjectionContext::object_seed`], time from [`ProjectionContext::now`].
pub trait Projection: Send + Sync {
    /// Scope, join and desired attributes for `entry`.
    fn project(&self, entry: &Entry, ctx: &ProjectionContext<'_>) -> Projected;

    /// An optional fast path for the commonest case of a full sync (the planner asks it in full
    /// plans, [`PlanScope::All`](super::PlanScope::All), only): `Some(true)` when `entry` is
    /// in scope, maps onto `current` (the target object it is linked to, of the same type), and
    /// every flow already holds there — so the planner need not build a [`Desired`] to find
    /// that out. Answer `Some(true)` only when [`Projection::project`] and a diff would find
    /// nothing to do — [`ProjectionContext::flow_holds`] is the planner's own comparison, one
    /// flow at a time; `None` (the default) or `Some(false)` make the planner project as usual.
    fn unchanged(
        &self,
        entry: &Entry,
        current: &crate::model::TargetObject,
        ctx: &ProjectionContext<'_>,
    ) -> Option<bool> {
        let _ = (entry, current, ctx);
        None
    }

    /// The containers (OUs) the projection scopes by: the engine binds each to the anchor of
    /// the container it names and remembers the binding, so that a rename or move of the
    /// container keeps its objects in scope; the bindings reach [`Projection::project`] through
    /// [`ProjectionContext::containers`]. None by default.
    fn containers(&self) -> Vec<super::ContainerRef> {
        Vec::new()
    }

    /// Whether it reads [`ProjectionContext::member_of`] (a scope by group membership): a plan
    /// that decides only some objects then needs the objects that reference them as context.
    /// `true` by default; a projection that never reads it says `false`, and a full plan's
    /// pages read less ([`Reach::AnchorsAlone`](crate::state::Reach::AnchorsAlone)).
    fn reads_member_of(&self) -> bool {
        true
    }

    /// Whether what it reads of the source mirror besides the projected entry — for
    /// [`Projection::project`] and [`Projection::deprovision`] — goes through
    /// [`SourceMirror::dn_of`](super::SourceMirror::dn_of) (the DN of a referenced object) and
    /// [`ProjectionContext::member_of`] only. A paged run's survey then decides the
    /// deprovisions of its dirty objects from their own entries, and plans again with their
    /// neighbourhood only when the projection asked the DN of an object it did not hold.
    /// `false` by default.
    fn reads_mirror_by_dn(&self) -> bool {
        false
    }

    /// The target attributes its join groups look up, per target object type (every type it
    /// makes, even with no join): the engine declares them to the state store
    /// ([`StateStore::set_lookup_attributes`](crate::state::StateStore::set_lookup_attributes)),
    /// which then indexes only those target values. `None` (the default): not known, and the
    /// store keeps indexing what it did.
    fn join_attributes(
        &self,
    ) -> Option<std::collections::BTreeMap<ObjectType, std::collections::BTreeSet<AttrName>>> {
        None
    }

    /// What to do with the target object of `link`, and why ([`DeprovisionCause`]): its source
    /// object left scope (`entry` is `Some`), was deleted at the source (`entry` is `None`), or
    /// is in scope but now makes a target object of another type (`entry` is `Some`; the planner
    /// creates or joins the new object in the same plan).
    ///
    /// The planner also asks it about a linked object that is in scope, with the causes that
    /// keep the link ([`DeprovisionCause::LeftScope`], [`DeprovisionCause::DeletedAtSource`]): a
    /// [`Deprovision::Disable`] answer tells it what a disabled object looks like and what
    /// re-enables it when it returns.
    fn deprovision(
        &self,
        link: &Link,
        entry: Option<&Entry>,
        cause: DeprovisionCause,
    ) -> Deprovision;
}

/// What the planner hands a projection besides the entry.
pub struct ProjectionContext<'a> {
    pub(crate) now: DateTime<Utc>,
    pub(crate) seed: u64,
    pub(crate) mirror: &'a SourceMirror,
    pub(crate) target: &'a TargetMirror,
    pub(crate) claimed: Option<&'a HashSet<(AttrName, String)>>,
    /// The plan's links (set by the planner): what source references translate through.
    pub(crate) links: Option<&'a Links>,
    /// The bound containers of [`Projection::containers`] (set by the planner).
    pub(crate) containers: Option<&'a super::ContainerBindings>,
    /// Objects the plan creates anew while linked: references to them do not translate
    /// through their old links (set by the planner).
    pub(crate) recreated: Option<&'a HashSet<Anchor>>,
}

impl<'a> ProjectionContext<'a> {
    /// A context over the given mirrors (the planner makes these; tests of projections may too).
    pub fn new(
        now: DateTime<Utc>,
        seed: u64,
        mirror: &'a SourceMirror,
        target: &'a TargetMirror,
    ) -> Self {
        ProjectionContext {
            now,
            seed,
            mirror,
            target,
            claimed: None,
            links: None,
            containers: None,
            recreated: None,
        }
    }

    /// The context with these container bindings (the planner sets them; tests of projections
    /// may too), builder style.
    pub fn with_containers(mut self, containers: &'a super::ContainerBindings) -> Self {
        self.containers = Some(containers);
        self
    }

    /// The containers the projection named ([`Projection::containers`]), bound to their
    /// anchors and current DNs; `None` in a context made without them.
    pub fn containers(&self) -> Option<&'a super::ContainerBindings> {
        self.containers
    }

    /// What source references translate through (`None` in a context the planner did not
    /// make).
    pub(crate) fn refs(&self) -> Option<super::planner::Refs<'a>> {
        self.links.map(|links| super::planner::Refs {
            mirror: self.mirror,
            links,
            recreated: self.recreated,
        })
    }

    /// The instant the run is planned for (`Now()`).
    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    /// A seed for this object's random choices (`Guid()`, `RandomString()`): derived from the
    /// run's seed and the anchor, so the result does not depend on the order objects are planned.
    pub fn object_seed(&self, anchor: &Anchor) -> u64 {
        fnv1a(
            self.seed
                .to_le_bytes()
                .iter()
                .chain(anchor.as_str().as_bytes()),
        )
    }

    /// The DNs of the groups that list `anchor` directly in their `member` attribute
    /// (for `ISMEMBEROF`).
    pub fn member_of(&self, anchor: &Anchor) -> Vec<&'a Dn> {
        self.mirror.member_of(anchor)
    }

    /// The source mirror (to look up referenced objects).
    pub fn mirror(&self) -> &'a SourceMirror {
        self.mirror
    }

    /// The target objects of `object_type` whose `attribute` has `value` (joins; strings compared
    /// ignoring case).
    pub fn find_target(
        &self,
        object_type: &ObjectType,
        attribute: &AttrName,
        value: &Value,
    ) -> Vec<crate::model::TargetId> {
        self.target.find(object_type, attribute, value)
    }

    /// Whether `have`, the values of the linked target object's attribute, already hold what
    /// `flow` wants when it wants `values`: the comparison the planner makes for a linked object
    /// (single-valued flows as sets, multi-valued ones value by value, strings ignoring case when
    /// the flow says so, an empty want by [`WhenEmpty`]; `OnCreate` flows always hold). Source
    /// references are compared through the plan's links to the target ids they stand for; in a
    /// context the planner did not make ([`ProjectionContext::new`]) a flow with references does
    /// not hold. The building block of [`Projection::unchanged`].
    ///
    /// ```
    /// use chrono::Utc;
    /// use dirsync::delta::{Flow, ProjectionContext, SourceMirror, TargetMirror};
    /// use dirsync::model::{values, Values};
    ///
    /// let (mirror, target) = (SourceMirror::new(), TargetMirror::new());
    /// let ctx = ProjectionContext::new(Utc::now(), 0, &mirror, &target);
    /// let mut title = Flow::new("title", values(["Engineer"]));
    /// assert!(ctx.flow_holds(&title, &title.values, Some(&values(["Engineer"]))));
    /// assert!(!ctx.flow_holds(&title, &title.values, Some(&values(["engineer"]))));
    /// title.ignore_case = true;
    /// assert!(ctx.flow_holds(&title, &title.values, Some(&values(["engineer"]))));
    /// // Kept when empty: no values wanted leaves the target's as they are.
    /// assert!(ctx.flow_holds(&title, &Values::new(), Some(&values(["Engineer"]))));
    /// ```
    pub fn flow_holds(&self, flow: &Flow, values: &Values, have: Option<&Values>) -> bool {
        super::planner::flow_holds(flow, values, have, self.refs())
    }

    /// Whether no target object of `object_type` has `value` in `attribute` (strings compared
    /// ignoring case), and no other object of this plan has claimed it (`SelectUniqueValue`).
    pub fn is_unique(&self, object_type: &ObjectType, attribute: &AttrName, value: &str) -> bool {
        if let Some(claimed) = self.claimed {
            if claimed.contains(&(attribute.clone(), value.to_lowercase())) {
                return false;
            }
        }
        self.target
            .find(object_type, attribute, &Value::string(value))
            .is_empty()
    }
}

fn fnv1a<'b>(bytes: impl Iterator<Item = &'b u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A projection's answer for one entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Projected {
    /// Not in scope; the text says why (the failing scope clause).
    OutOfScope(String),
    /// Not in scope because of where the object is: outside the rule's included containers, in
    /// an excluded one, or in one that is gone (see [`ContainerScope`](super::ContainerScope)).
    /// A linked object deprovisioned for this is reported with its container, and the deletion
    /// guard holds many of them under one container as a wave.
    OutOfContainer {
        /// Why, naming the container.
        why: String,
        /// The container the object is in now (its parent DN).
        container: Option<Dn>,
    },
    /// In scope: the desired target object.
    InScope(Desired),
    /// In scope but held back (for example no unique value is free); reported, not exported.
    Held(String),
    /// The rules failed for this object; reported with the object, nothing is planned for it.
    Failed(ProjectionError),
}

/// A rule error for one object: which attribute (and rule) and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}{}{message}", rule.as_ref().map(|r| format!("rule {r}: ")).unwrap_or_default(), attribute.as_ref().map(|a| format!("attribute {a}: ")).unwrap_or_default())]
pub struct ProjectionError {
    /// The rule, if the projection has named rules.
    pub rule: Option<String>,
    /// The target attribute whose flow failed, if one did.
    pub attribute: Option<AttrName>,
    /// What went wrong.
    pub message: String,
}

/// The desired state of one target object.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// The target object type.
    pub target_type: ObjectType,
    /// Join groups, tried in order for an unlinked object: the attributes of a group are ANDed,
    /// and the first group with exactly one candidate wins.
    pub join: Vec<JoinGroup>,
    /// The attribute flows: the values each managed target attribute should have.
    pub flows: Vec<Flow>,
}

impl Desired {
    /// A desired object of `target_type` without flows or joins.
    pub fn new(target_type: impl Into<ObjectType>) -> Desired {
        Desired {
            target_type: target_type.into(),
            join: Vec::new(),
            flows: Vec::new(),
        }
    }

    /// Adds a flow (builder style).
    pub fn flow(mut self, flow: Flow) -> Desired {
        self.flows.push(flow);
        self
    }

    /// Adds a join group (builder style).
    pub fn join_on(mut self, group: JoinGroup) -> Desired {
        self.join.push(group);
        self
    }
}

/// A join group: target attributes and the values they must have, all of them.
///
/// Most groups name one attribute; that one is held inline, without an allocation.
///
/// ```
/// use dirsync::delta::JoinGroup;
/// let g = JoinGroup::on("mail", "ada@example.com").and("employeeId", "42");
/// assert_eq!(g.len(), 2);
/// assert_eq!(g.pairs()[1].0.as_str(), "employeeId");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JoinGroup(smallvec::SmallVec<[(AttrName, Value); 1]>);

impl JoinGroup {
    /// A group without attributes (it never matches; add attributes with [`JoinGroup::push`]).
    pub fn new() -> JoinGroup {
        JoinGroup(smallvec::SmallVec::new())
    }

    /// An empty group with room for `n` attributes.
    pub fn with_capacity(n: usize) -> JoinGroup {
        JoinGroup(smallvec::SmallVec::with_capacity(n))
    }

    /// A group of one attribute.
    pub fn on(attribute: impl Into<AttrName>, value: impl Into<Value>) -> JoinGroup {
        let mut g = JoinGroup::new();
        g.push(attribute, value);
        g
    }

    /// Adds an attribute to the group (builder style).
    pub fn and(mut self, attribute: impl Into<AttrName>, value: impl Into<Value>) -> JoinGroup {
        self.push(attribute, value);
        self
    }

    /// Adds an attribute to the group.
    pub fn push(&mut self, attribute: impl Into<AttrName>, value: impl Into<Value>) {
        self.0.push((attribute.into(), value.into()));
    }

    /// The attributes and the values they must have, in order.
    pub fn pairs(&self) -> &[(AttrName, Value)] {
        &self.0
    }

    /// How many attributes the group ANDs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the group names no attribute.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<(AttrName, Value)>> for JoinGroup {
    fn from(pairs: Vec<(AttrName, Value)>) -> JoinGroup {
        JoinGroup(pairs.into())
    }
}

impl FromIterator<(AttrName, Value)> for JoinGroup {
    fn from_iter<I: IntoIterator<Item = (AttrName, Value)>>(iter: I) -> JoinGroup {
        JoinGroup(iter.into_iter().collect())
    }
}

/// When a flow is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Apply {
    /// On create and on every update.
    #[default]
    Always,
    /// Only when the object is created (an initial password, a generated id).
    OnCreate,
}

/// What a flow without values means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenEmpty {
    /// Leave the target attribute as it is (Entra's behaviour for a null mapping).
    #[default]
    Keep,
    /// Clear the target attribute.
    Clear,
}

/// One target attribute's desired values.
#[derive(Debug, Clone, PartialEq)]
pub struct Flow {
    /// The target attribute.
    pub attribute: AttrName,
    /// The values it should have.
    pub values: Values,
    /// When the flow applies.
    pub apply: Apply,
    /// Compare strings ignoring case when deciding whether the target must change.
    pub ignore_case: bool,
    /// Multi-valued: diffed value by value (add and remove), never replaced whole.
    pub multi: bool,
    /// What no values means.
    pub when_empty: WhenEmpty,
    /// The values are secret: applied, never shown.
    pub redacted: bool,
    /// The value must be unique in the target (`SelectUniqueValue`): the planner makes sure no
    /// two objects of one plan claim the same value.
    pub unique: bool,
}

impl Flow {
    /// A single-valued flow applied always, compared exactly, kept when empty.
    pub fn new(attribute: impl Into<AttrName>, values: impl Into<Values>) -> Flow {
        Flow {
            attribute: attribute.into(),
            values: values.into(),
            apply: Apply::Always,
            ignore_case: false,
            multi: false,
            when_empty: WhenEmpty::Keep,
            redacted: false,
            unique: false,
        }
    }

    /// A multi-valued flow (diffed by value; empty clears).
    pub fn multi(attribute: impl Into<AttrName>, values: impl Into<Values>) -> Flow {
        Flow {
            multi: true,
            when_empty: WhenEmpty::Clear,
            ..Flow::new(attribute, values)
        }
    }

    /// Applies only on create (builder style).
    pub fn on_create(mut self) -> Flow {
        self.apply = Apply::OnCreate;
        self
    }

    /// Compares ignoring case (builder style).
    pub fn ignore_case(mut self) -> Flow {
        self.ignore_case = true;
        self
    }

    /// Clears the target attribute when there are no values (builder style).
    pub fn clear_when_empty(mut self) -> Flow {
        self.when_empty = WhenEmpty::Clear;
        self
    }

    /// Marks the values secret (builder style).
    pub fn redacted(mut self) -> Flow {
        self.redacted = true;
        self
    }
}

/// Why a linked target object is deprovisioned: rules choose a [`Deprovision`] per cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeprovisionCause {
    /// The source object still exists but is no longer in scope (a scoping filter, a container,
    /// a rule that no longer applies). It may come back.
    LeftScope,
    /// The source object was deleted at the source.
    #[serde(rename = "deleted")]
    DeletedAtSource,
    /// The source object is in scope, but the rules now make a target object of another type:
    /// the old one is deprovisioned and a new one created (or joined) in the same plan.
    TypeChanged,
}

impl DeprovisionCause {
    /// Every cause, in order.
    pub const ALL: [DeprovisionCause; 3] = [
        DeprovisionCause::LeftScope,
        DeprovisionCause::DeletedAtSource,
        DeprovisionCause::TypeChanged,
    ];

    /// The causes whose deprovision keeps the link (a disable): the object may return to them.
    pub const KEEPING_THE_LINK: [DeprovisionCause; 2] = [
        DeprovisionCause::LeftScope,
        DeprovisionCause::DeletedAtSource,
    ];

    /// The name rule files use: `left_scope`, `deleted`, `type_changed`.
    pub fn name(self) -> &'static str {
        match self {
            DeprovisionCause::LeftScope => "left_scope",
            DeprovisionCause::DeletedAtSource => "deleted",
            DeprovisionCause::TypeChanged => "type_changed",
        }
    }
}

impl std::fmt::Display for DeprovisionCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeprovisionCause::LeftScope => "left scope",
            DeprovisionCause::DeletedAtSource => "deleted at source",
            DeprovisionCause::TypeChanged => "target type changed",
        })
    }
}

/// What happens to a linked target object for one [`DeprovisionCause`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Deprovision {
    /// Delete the target object (and forget the link).
    #[default]
    Delete,
    /// Disable it by setting attributes (`active = false`, `accountEnabled = false`), keeping
    /// the link: when the source object is in scope again, the same target object is
    /// re-enabled, never created anew.
    ///
    /// For a changed target type the attributes are set on the old object, which then keeps
    /// no link (the new object takes it).
    Disable {
        /// The attributes and values that disable the object.
        set: Vec<(AttrName, Values)>,
        /// The values that re-enable it. The planner sets them on a linked object that is in
        /// scope when its target object holds an attribute's disabled values (from `set`) and
        /// no flow of the object writes that attribute (a flow that does brings it back
        /// itself). An attribute of `set` without an entry here is not re-enabled by the
        /// planner.
        enable: Vec<(AttrName, Values)>,
    },
    /// Leave the target object as it is and forget the link.
    Unlink,
}

impl Deprovision {
    /// A disable by `set`, re-enabled by the opposite of each Boolean value (`active = false`
    /// is undone by `active = true`); other values are not re-enabled unless given with
    /// [`Deprovision::enable`].
    ///
    /// ```
    /// use dirsync::delta::Deprovision;
    /// use dirsync::model::Values;
    ///
    /// let d = Deprovision::disable([("active", false)]);
    /// let Deprovision::Disable { enable, .. } = &d else { unreachable!() };
    /// assert_eq!(enable[0].1, Values::one(true));
    /// let d = Deprovision::disable([("employeeType", "Disabled")]).enable("employeeType", "Employee");
    /// assert_eq!(d.to_string(), "disable: employeeType = Disabled (re-enabled with employeeType = Employee)");
    /// ```
    pub fn disable<A: Into<AttrName>, V: Into<Value>>(
        set: impl IntoIterator<Item = (A, V)>,
    ) -> Deprovision {
        let set: Vec<(AttrName, Values)> = set
            .into_iter()
            .map(|(a, v)| (a.into(), Values::one(v)))
            .collect();
        let enable = set
            .iter()
            .filter_map(|(a, v)| Some((a.clone(), enabled_values(v)?)))
            .collect();
        Deprovision::Disable { set, enable }
    }

    /// Sets the value that re-enables `attribute` (builder style; no effect unless a disable).
    pub fn enable(mut self, attribute: impl Into<AttrName>, value: impl Into<Value>) -> Self {
        if let Deprovision::Disable { enable, .. } = &mut self {
            let attribute = attribute.into();
            enable.retain(|(a, _)| *a != attribute);
            enable.push((attribute, Values::one(value)));
        }
        self
    }

    /// A short name: `delete`, `disable`, `unlink`.
    pub fn name(&self) -> &'static str {
        match self {
            Deprovision::Delete => "delete",
            Deprovision::Disable { .. } => "disable",
            Deprovision::Unlink => "unlink",
        }
    }
}

/// The values that undo `disabled` when it is one Boolean: its opposite.
pub fn enabled_values(disabled: &Values) -> Option<Values> {
    match &disabled[..] {
        [Value::Boolean(b)] => Some(Values::one(!*b)),
        _ => None,
    }
}

impl std::fmt::Display for Deprovision {
    /// `delete`, `unlink`, or `disable: active = false (re-enabled with active = true)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pairs = |f: &mut std::fmt::Formatter<'_>, list: &[(AttrName, Values)]| {
            for (i, (a, v)) in list.iter().enumerate() {
                // Booleans as a rule file writes them (`false`), not as LDAP does (`FALSE`).
                let text: Vec<String> = v
                    .iter()
                    .map(|x| match x {
                        Value::Boolean(b) => b.to_string(),
                        other => other.to_string(),
                    })
                    .collect();
                write!(
                    f,
                    "{}{a} = {}",
                    if i > 0 { ", " } else { "" },
                    text.join(" | ")
                )?;
            }
            Ok(())
        };
        match self {
            Deprovision::Disable { set, enable } => {
                f.write_str("disable: ")?;
                pairs(f, set)?;
                if !enable.is_empty() {
                    f.write_str(" (re-enabled with ")?;
                    pairs(f, enable)?;
                    f.write_str(")")?;
                }
                Ok(())
            }
            other => f.write_str(other.name()),
        }
    }
}
