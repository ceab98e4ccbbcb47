//! Container scope: the containers (OUs) a rule includes or excludes with their subtrees, bound
//! to the containers' anchors so that renaming or moving a container keeps its objects where
//! they were — and the guard against a container change that takes many objects out of scope
//! at once.
//!
//! A rule names a container by DN (as people write it) or by anchor ([`ContainerRef`]). A DN is
//! **bound** to the anchor of the container found at it the first time it is seen
//! ([`ContainerBindings::resolve`]), and the binding is remembered (the engine keeps it in its
//! state store): after `OU=Staff` is renamed `OU=People` and moved elsewhere, the rule still
//! names that container, wherever it is now. The containers must be in the source mirror — a
//! source imports them when its filter and object type map take them (an object type no rule
//! projects, such as `container` for `organizationalUnit`); a DN no imported container has is
//! compared as a DN, without a binding.
//!
//! An object is placed by its DN: the nearest configured container at or above it decides
//! (included → in scope, excluded → out); below no configured container, it is in scope only
//! when the rule includes nothing. A configured container that is gone from the source (deleted)
//! takes nothing into scope.
//!
//! Pure: lookups come in as functions; nothing here reads a store.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::plan::{GuardViolation, Plan, Reason};
use crate::model::{Anchor, Dn, ObjectType};

/// A container a rule names: by DN, or by its anchor (objectGUID, entryUUID, …).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerRef {
    /// By DN; bound to the anchor of the container found there first.
    Dn(Dn),
    /// By anchor.
    Anchor(Anchor),
}

impl fmt::Display for ContainerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContainerRef::Dn(dn) => write!(f, "{dn}"),
            ContainerRef::Anchor(a) => write!(f, "anchor {a}"),
        }
    }
}

/// A named container as bound: its anchor and where it is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerBinding {
    /// The container as the rule names it.
    pub reference: ContainerRef,
    /// The container's anchor; `None` for a DN no container of the source mirror has had since
    /// it was named (then objects are placed by that DN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<Anchor>,
    /// The container's DN now — the last one known when it is gone from the mirror; for an
    /// unbound DN, that DN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dn: Option<Dn>,
    /// Whether the bound container is in the source mirror (false when it was deleted, and for
    /// an unbound DN).
    #[serde(default)]
    pub present: bool,
}

impl ContainerBinding {
    /// The DN objects are placed under, when there is one.
    pub fn placed_at(&self) -> Option<&Dn> {
        self.dn.as_ref()
    }

    /// Whether the binding names a container that was found once and is gone now.
    pub fn is_gone(&self) -> bool {
        self.anchor.is_some() && !self.present
    }

    /// The container as messages name it: its DN now (and, when it was bound by a DN it no
    /// longer has, that DN), and its anchor.
    pub fn describe(&self) -> String {
        let mut out = match (&self.dn, &self.reference) {
            (Some(now), ContainerRef::Dn(named)) if now != named => {
                format!("{named} (now {now})")
            }
            (Some(now), _) => now.to_string(),
            (None, r) => r.to_string(),
        };
        if let (Some(a), ContainerRef::Dn(_)) = (&self.anchor, &self.reference) {
            out.push_str(&format!(", anchor {a}"));
        }
        out
    }
}

/// What [`ContainerBindings::resolve`] looks up in the source mirror.
pub trait ContainerLookup {
    /// The anchor of the object at `dn`, if the mirror holds one.
    fn anchor_at(&self, dn: &Dn) -> Option<Anchor>;
    /// Whether the mirror holds `anchor`, and its DN.
    fn locate(&self, anchor: &Anchor) -> Option<Option<Dn>>;
}

impl ContainerLookup for super::SourceMirror {
    fn anchor_at(&self, dn: &Dn) -> Option<Anchor> {
        self.anchor_of(dn).cloned()
    }

    fn locate(&self, anchor: &Anchor) -> Option<Option<Dn>> {
        self.get(anchor).map(|e| e.dn.clone())
    }
}

/// Every container a projection names, bound ([`ContainerBinding`]): what the engine remembers
/// between runs and hands the planner ([`super::PlanInput::containers`]).
///
/// Serializes as the list of its bindings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<ContainerBinding>", into = "Vec<ContainerBinding>")]
pub struct ContainerBindings {
    bindings: BTreeMap<ContainerRef, ContainerBinding>,
}

impl From<Vec<ContainerBinding>> for ContainerBindings {
    fn from(list: Vec<ContainerBinding>) -> ContainerBindings {
        ContainerBindings {
            bindings: list.into_iter().map(|b| (b.reference.clone(), b)).collect(),
        }
    }
}

impl From<ContainerBindings> for Vec<ContainerBinding> {
    fn from(b: ContainerBindings) -> Vec<ContainerBinding> {
        b.bindings.into_values().collect()
    }
}

impl ContainerBindings {
    /// No bindings.
    pub fn new() -> ContainerBindings {
        ContainerBindings::default()
    }

    /// The binding of `reference`.
    pub fn get(&self, reference: &ContainerRef) -> Option<&ContainerBinding> {
        self.bindings.get(reference)
    }

    /// Every binding, by reference.
    pub fn iter(&self) -> impl Iterator<Item = &ContainerBinding> {
        self.bindings.values()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bindings.is_empty()
    }

    /// Binds `references` against the source mirror, keeping what `previous` remembers:
    ///
    /// * by anchor: the container's DN now, or the last known one when it is gone;
    /// * by DN, bound before: the same container, wherever it is now — even when another
    ///   container now has the configured DN; only when the bound container is gone and another
    ///   one has the configured DN is the DN bound to that one;
    /// * by DN, never bound: the container at that DN, if the mirror has one; otherwise the DN
    ///   stays unbound and objects are placed by it.
    ///
    /// ```
    /// use dirsync::delta::{ContainerBindings, ContainerRef, SourceMirror};
    /// use dirsync::model::{Dn, Entry};
    ///
    /// let dn = |s: &str| Dn::parse(s).unwrap();
    /// let staff = ContainerRef::Dn(dn("OU=Staff,DC=corp"));
    /// let mut mirror = SourceMirror::new();
    /// mirror.insert(Entry::new("ou-1", "container").with_dn(dn("OU=Staff,DC=corp")));
    /// let first = ContainerBindings::resolve([&staff], &mirror, &ContainerBindings::new());
    /// assert_eq!(first.get(&staff).unwrap().anchor.as_ref().unwrap().as_str(), "ou-1");
    ///
    /// // Renamed: the configured DN stays bound to the same container.
    /// mirror.insert(Entry::new("ou-1", "container").with_dn(dn("OU=People,DC=corp")));
    /// let later = ContainerBindings::resolve([&staff], &mirror, &first);
    /// assert_eq!(later.get(&staff).unwrap().dn, Some(dn("ou=people,dc=corp")));
    /// ```
    pub fn resolve<'r>(
        references: impl IntoIterator<Item = &'r ContainerRef>,
        lookup: &dyn ContainerLookup,
        previous: &ContainerBindings,
    ) -> ContainerBindings {
        let mut bindings = BTreeMap::new();
        for r in references {
            if bindings.contains_key(r) {
                continue;
            }
            let before = previous.get(r);
            let bound = |anchor: Anchor, last: Option<&Dn>| match lookup.locate(&anchor) {
                Some(dn) => ContainerBinding {
                    reference: r.clone(),
                    anchor: Some(anchor),
                    dn: dn.or_else(|| last.cloned()),
                    present: true,
                },
                None => ContainerBinding {
                    reference: r.clone(),
                    anchor: Some(anchor),
                    dn: last.cloned(),
                    present: false,
                },
            };
            let binding = match r {
                ContainerRef::Anchor(a) => bound(a.clone(), before.and_then(|b| b.dn.as_ref())),
                ContainerRef::Dn(named) => {
                    let kept = before.and_then(|b| Some((b.anchor.clone()?, b.dn.as_ref())));
                    match kept {
                        Some((anchor, last)) => {
                            let b = bound(anchor, last);
                            match lookup.anchor_at(named) {
                                Some(other) if !b.present && Some(&other) != b.anchor.as_ref() => {
                                    bound(other, Some(named))
                                }
                                _ => b,
                            }
                        }
                        None => match lookup.anchor_at(named) {
                            Some(anchor) => bound(anchor, Some(named)),
                            None => ContainerBinding {
                                reference: r.clone(),
                                anchor: None,
                                dn: Some(named.clone()),
                                present: false,
                            },
                        },
                    }
                }
            };
            bindings.insert(r.clone(), binding);
        }
        ContainerBindings { bindings }
    }
}

/// The containers a rule includes and excludes, each with its subtree.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerScope {
    /// Objects at or below these are in scope (none: every object not excluded).
    #[serde(default)]
    pub include: Vec<ContainerRef>,
    /// Objects at or below these are out of scope (unless a nearer included container holds
    /// them).
    #[serde(default)]
    pub exclude: Vec<ContainerRef>,
}

/// Where an object stands with respect to a [`ContainerScope`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerDecision {
    /// In scope: under this included container (none: the scope includes everything not
    /// excluded).
    In(Option<ContainerBinding>),
    /// Out of scope because of where the object is.
    Out {
        /// Why, naming the container.
        why: String,
        /// The container the object is in now (its parent DN); none for an object without a DN.
        container: Option<Dn>,
    },
}

impl ContainerScope {
    /// Whether the scope names no container (then every object is in it).
    pub fn is_empty(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }

    /// Every container the scope names.
    pub fn references(&self) -> impl Iterator<Item = &ContainerRef> {
        self.include.iter().chain(&self.exclude)
    }

    /// Whether an object at `dn` is in the scope: [`ContainerScope::decide`]'s answer without
    /// the reason (nothing is copied).
    pub fn admits(&self, dn: Option<&Dn>, bindings: &ContainerBindings) -> bool {
        if self.is_empty() {
            return true;
        }
        let Some(dn) = dn.filter(|d| !d.is_root()) else {
            return self.include.is_empty();
        };
        match self.nearest(dn, bindings) {
            Some((excluded, b)) => !excluded && !b.is_gone(),
            None => self.include.is_empty(),
        }
    }

    /// Decides for an object at `dn`: the nearest named container at or above it decides (an
    /// exclusion wins a tie); a container gone from the source takes nothing into scope.
    /// `bindings` should bind every reference of the scope; one it lacks is placed by its DN
    /// (a reference by anchor then matches nothing).
    pub fn decide(&self, dn: Option<&Dn>, bindings: &ContainerBindings) -> ContainerDecision {
        if self.is_empty() {
            return ContainerDecision::In(None);
        }
        let Some(dn) = dn.filter(|d| !d.is_root()) else {
            return if self.include.is_empty() {
                ContainerDecision::In(None)
            } else {
                ContainerDecision::Out {
                    why: "the object has no DN to place it in an included container".into(),
                    container: None,
                }
            };
        };
        let parent = dn.parent();
        match self.nearest(dn, bindings) {
            Some((false, b)) if !b.is_gone() => ContainerDecision::In(Some(b.into_owned())),
            Some((false, b)) => ContainerDecision::Out {
                why: format!(
                    "its included container {} is gone from the source",
                    b.describe()
                ),
                container: parent,
            },
            Some((true, b)) => ContainerDecision::Out {
                why: format!("under excluded container {}", b.describe()),
                container: parent,
            },
            None if self.include.is_empty() => ContainerDecision::In(None),
            None => {
                let included: Vec<String> = self
                    .include
                    .iter()
                    .map(|r| binding(r, bindings).describe())
                    .collect();
                ContainerDecision::Out {
                    why: format!(
                        "in {}, outside the included containers ({})",
                        parent.as_ref().map_or_else(String::new, Dn::to_string),
                        included.join("; ")
                    ),
                    container: parent,
                }
            }
        }
    }

    /// The nearest named container at or above `dn`: whether it is excluded, and its binding.
    fn nearest<'b>(
        &'b self,
        dn: &Dn,
        bindings: &'b ContainerBindings,
    ) -> Option<(bool, Cow<'b, ContainerBinding>)> {
        let mut nearest: Option<(usize, bool, Cow<'b, ContainerBinding>)> = None;
        let named = self
            .include
            .iter()
            .map(|r| (false, r))
            .chain(self.exclude.iter().map(|r| (true, r)));
        for (excluded, r) in named {
            let b = binding(r, bindings);
            let Some(at) = b.placed_at() else { continue };
            if dn != at && !dn.is_descendant_of(at) {
                continue;
            }
            let depth = at.len();
            let better = match &nearest {
                None => true,
                Some((d, ex, _)) => depth > *d || (depth == *d && excluded && !ex),
            };
            if better {
                nearest = Some((depth, excluded, b));
            }
        }
        nearest.map(|(_, excluded, b)| (excluded, b))
    }
}

/// The binding of `r`, or — when `bindings` lacks it — one placing objects by its DN.
fn binding<'b>(r: &'b ContainerRef, bindings: &'b ContainerBindings) -> Cow<'b, ContainerBinding> {
    match bindings.get(r) {
        Some(b) => Cow::Borrowed(b),
        None => Cow::Owned(ContainerBinding {
            reference: r.clone(),
            anchor: None,
            dn: match r {
                ContainerRef::Dn(d) => Some(d.clone()),
                ContainerRef::Anchor(_) => None,
            },
            present: false,
        }),
    }
}

/// The container waves of `plan`: per target type, the containers under which more than
/// `limit` linked objects are deleted or disabled because they left a rule's container scope
/// (their [`Reason::LeftScope`] names the container they are in now). A container is reported
/// when none of its child containers holds all of its count — the deepest container of each
/// wave: a moved OU, and a common parent above several at once.
pub(crate) fn waves(
    plan: &Plan,
    limit: usize,
    linked: &dyn Fn(&ObjectType) -> usize,
) -> Vec<GuardViolation> {
    let mut counts: BTreeMap<(&ObjectType, Dn), usize> = BTreeMap::new();
    for op in plan.operations.iter().filter(|o| o.kind.is_deletion()) {
        let Reason::LeftScope {
            container: Some(c), ..
        } = &op.reason
        else {
            continue;
        };
        let mut at = Some(c.clone());
        while let Some(dn) = at.filter(|d| !d.is_root()) {
            at = dn.parent();
            *counts.entry((&op.target_type, dn)).or_default() += 1;
        }
    }
    let over: BTreeSet<(&ObjectType, &Dn)> = counts
        .iter()
        .filter(|(_, n)| **n > limit)
        .map(|((t, d), _)| (*t, d))
        .collect();
    let count = |t: &ObjectType, d: &Dn| counts.get(&(t, d.clone())).copied().unwrap_or(0);
    over.iter()
        .filter(|(t, d)| {
            // No child container holds the whole count.
            !over.iter().any(|(t2, d2)| {
                t2 == t && d2.parent().as_ref() == Some(*d) && count(t2, d2) == count(t, d)
            })
        })
        .map(|(t, d)| GuardViolation {
            target_type: (*t).clone(),
            deletions: counts.get(&((*t), (*d).clone())).copied().unwrap_or(0),
            linked: linked(t),
            limit,
            container: Some((*d).clone()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::SourceMirror;
    use crate::model::Entry;

    fn dn(s: &str) -> Dn {
        Dn::parse(s).unwrap()
    }

    fn ou(anchor: &str, at: &str) -> Entry {
        Entry::new(anchor, "container").with_dn(dn(at))
    }

    fn staff_scope() -> ContainerScope {
        ContainerScope {
            include: vec![ContainerRef::Dn(dn("OU=Staff,DC=corp"))],
            exclude: vec![ContainerRef::Dn(dn("OU=Contractors,OU=Staff,DC=corp"))],
        }
    }

    fn mirror() -> SourceMirror {
        let mut m = SourceMirror::new();
        m.insert(ou("staff", "OU=Staff,DC=corp"));
        m.insert(ou("contractors", "OU=Contractors,OU=Staff,DC=corp"));
        m.insert(ou("archive", "OU=Archive,DC=corp"));
        m
    }

    fn inside(d: &ContainerDecision) -> bool {
        matches!(d, ContainerDecision::In(_))
    }

    #[test]
    fn nearest_named_container_decides() {
        let scope = staff_scope();
        let m = mirror();
        let b = ContainerBindings::resolve(scope.references(), &m, &ContainerBindings::new());
        let at = |s: &str| scope.decide(Some(&dn(s)), &b);
        assert!(inside(&at("CN=Ann,OU=Staff,DC=corp")));
        assert!(inside(&at("CN=Ann,OU=Team,OU=Sales,OU=Staff,DC=corp")));
        assert!(inside(&at("OU=Staff,DC=corp")), "the container itself");
        match at("CN=Cy,OU=Contractors,OU=Staff,DC=corp") {
            ContainerDecision::Out { why, container } => {
                assert!(why.contains("excluded container OU=Contractors"), "{why}");
                assert_eq!(container, Some(dn("ou=contractors,ou=staff,dc=corp")));
            }
            other => panic!("{other:?}"),
        }
        match at("CN=Ann,OU=Archive,DC=corp") {
            ContainerDecision::Out { why, .. } => {
                assert!(why.contains("outside the included containers"), "{why}");
                assert!(why.contains("OU=Staff,DC=corp, anchor staff"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        assert!(!inside(&scope.decide(None, &b)), "no DN, no container");
        // An included container inside an excluded one: the nearer decides.
        let nested = ContainerScope {
            include: vec![ContainerRef::Dn(dn(
                "OU=Keep,OU=Contractors,OU=Staff,DC=corp",
            ))],
            exclude: vec![ContainerRef::Dn(dn("OU=Contractors,OU=Staff,DC=corp"))],
        };
        let b2 = ContainerBindings::resolve(nested.references(), &m, &ContainerBindings::new());
        assert!(inside(&nested.decide(
            Some(&dn("CN=K,OU=Keep,OU=Contractors,OU=Staff,DC=corp")),
            &b2
        )));
        assert!(!inside(
            &nested.decide(Some(&dn("CN=C,OU=Contractors,OU=Staff,DC=corp")), &b2)
        ));
        // Only exclusions: everything else is in.
        let only = ContainerScope {
            include: vec![],
            exclude: vec![ContainerRef::Anchor("contractors".into())],
        };
        let b3 = ContainerBindings::resolve(only.references(), &m, &ContainerBindings::new());
        assert!(inside(&only.decide(Some(&dn("CN=X,DC=corp")), &b3)));
        assert!(inside(&only.decide(None, &b3)));
        assert!(!inside(
            &only.decide(Some(&dn("CN=X,OU=Contractors,OU=Staff,DC=corp")), &b3)
        ));
    }

    #[test]
    fn bindings_follow_a_renamed_and_moved_container() {
        let scope = staff_scope();
        let mut m = mirror();
        let first = ContainerBindings::resolve(scope.references(), &m, &ContainerBindings::new());
        // Staff is renamed People and moved under Archive; its children move with it (the
        // mirror keeps their DNs current), and a new OU takes the old DN.
        m.insert(ou("staff", "OU=People,OU=Archive,DC=corp"));
        m.insert(ou(
            "contractors",
            "OU=Contractors,OU=People,OU=Archive,DC=corp",
        ));
        m.insert(ou("new-staff", "OU=Staff,DC=corp"));
        let later = ContainerBindings::resolve(scope.references(), &m, &first);
        let staff = later
            .get(&ContainerRef::Dn(dn("OU=Staff,DC=corp")))
            .unwrap();
        assert_eq!(staff.anchor.as_ref().map(|a| a.as_str()), Some("staff"));
        assert_eq!(staff.dn, Some(dn("OU=People,OU=Archive,DC=corp")));
        assert!(staff
            .describe()
            .contains("(now OU=People,OU=Archive,DC=corp)"));
        assert!(inside(&scope.decide(
            Some(&dn("CN=Ann,OU=People,OU=Archive,DC=corp")),
            &later
        )));
        assert!(!inside(
            &scope.decide(Some(&dn("CN=Ann,OU=Staff,DC=corp")), &later)
        ));
        assert!(!inside(&scope.decide(
            Some(&dn("CN=C,OU=Contractors,OU=People,OU=Archive,DC=corp")),
            &later
        )));
        // Staff is deleted: objects left below its last DN are out, and the old DN binds the
        // container that now has it.
        m.remove(&"staff".into());
        let gone = ContainerBindings::resolve(scope.references(), &m, &later);
        let staff = gone.get(&ContainerRef::Dn(dn("OU=Staff,DC=corp"))).unwrap();
        assert_eq!(staff.anchor.as_ref().map(|a| a.as_str()), Some("new-staff"));
        let mut m2 = mirror();
        m2.remove(&"staff".into());
        let deleted = ContainerBindings::resolve(scope.references(), &m2, &first);
        let b = deleted
            .get(&ContainerRef::Dn(dn("OU=Staff,DC=corp")))
            .unwrap();
        assert!(b.is_gone());
        match scope.decide(Some(&dn("CN=Ann,OU=Staff,DC=corp")), &deleted) {
            ContainerDecision::Out { why, .. } => assert!(why.contains("is gone"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_unknown_dn_is_compared_as_a_dn() {
        let scope = staff_scope();
        let empty = SourceMirror::new();
        let b = ContainerBindings::resolve(scope.references(), &empty, &ContainerBindings::new());
        let staff = b.get(&ContainerRef::Dn(dn("OU=Staff,DC=corp"))).unwrap();
        assert!(staff.anchor.is_none() && !staff.is_gone());
        assert!(inside(
            &scope.decide(Some(&dn("cn=a,ou=staff,dc=corp")), &b)
        ));
        // Bound later, once the container is imported.
        let m = mirror();
        let again = ContainerBindings::resolve(scope.references(), &m, &b);
        let staff = again
            .get(&ContainerRef::Dn(dn("OU=Staff,DC=corp")))
            .unwrap();
        assert_eq!(staff.anchor.as_ref().map(|a| a.as_str()), Some("staff"));
        // An anchor the mirror never had places nothing.
        let by_anchor = ContainerScope {
            include: vec![ContainerRef::Anchor("nowhere".into())],
            exclude: vec![],
        };
        let b = ContainerBindings::resolve(by_anchor.references(), &m, &ContainerBindings::new());
        assert!(!inside(
            &by_anchor.decide(Some(&dn("cn=a,ou=staff,dc=corp")), &b)
        ));
    }

    #[test]
    fn admits_agrees_with_decide() {
        let scope = staff_scope();
        let m = mirror();
        let bound = ContainerBindings::resolve(scope.references(), &m, &ContainerBindings::new());
        let mut gone_mirror = mirror();
        gone_mirror.remove(&"staff".into());
        let gone = ContainerBindings::resolve(scope.references(), &gone_mirror, &bound);
        let scopes = [
            scope.clone(),
            ContainerScope::default(),
            ContainerScope {
                include: vec![],
                exclude: scope.exclude.clone(),
            },
            ContainerScope {
                include: vec![ContainerRef::Anchor("archive".into())],
                exclude: vec![],
            },
        ];
        let dns = [
            None,
            Some(Dn::root()),
            Some(dn("OU=Staff,DC=corp")),
            Some(dn("CN=A,OU=Staff,DC=corp")),
            Some(dn("CN=A,OU=Contractors,OU=Staff,DC=corp")),
            Some(dn("CN=A,OU=Archive,DC=corp")),
            Some(dn("CN=A,DC=elsewhere")),
        ];
        for s in &scopes {
            for b in [&bound, &gone, &ContainerBindings::new()] {
                for d in &dns {
                    assert_eq!(
                        s.admits(d.as_ref(), b),
                        inside(&s.decide(d.as_ref(), b)),
                        "{s:?} {d:?} {b:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn waves_name_the_deepest_container_of_each_wave() {
        use crate::delta::{Operation, OperationKind};
        let op = |anchor: &str, ty: &str, container: Option<&str>, delete: bool| Operation {
            anchor: anchor.into(),
            source_type: "user".into(),
            target_type: ty.into(),
            kind: if delete {
                OperationKind::Delete {
                    target_id: anchor.into(),
                }
            } else {
                OperationKind::Unlink {
                    target_id: anchor.into(),
                }
            },
            reason: Reason::LeftScope {
                why: "x".into(),
                container: container.map(dn),
            },
        };
        let mut plan = Plan::default();
        // Three in Sales, two in Sales/Team (5 under Sales), one in Marketing, one without a
        // container (an attribute filter), two unlinks (not deletions), and one of another type.
        for i in 0..3 {
            plan.operations
                .push(op(&format!("s{i}"), "User", Some("OU=Sales,DC=corp"), true));
        }
        for i in 0..2 {
            plan.operations.push(op(
                &format!("t{i}"),
                "User",
                Some("OU=Team,OU=Sales,DC=corp"),
                true,
            ));
        }
        plan.operations
            .push(op("m", "User", Some("OU=Marketing,DC=corp"), true));
        plan.operations.push(op("f", "User", None, true));
        for i in 0..2 {
            plan.operations.push(op(
                &format!("u{i}"),
                "User",
                Some("OU=Sales,DC=corp"),
                false,
            ));
        }
        plan.operations
            .push(op("g", "Group", Some("OU=Sales,DC=corp"), true));
        let linked = |_: &ObjectType| 100;
        let found = |limit: usize| -> Vec<(String, usize)> {
            waves(&plan, limit, &linked)
                .into_iter()
                .map(|v| (v.container.unwrap().to_string(), v.deletions))
                .collect()
        };
        assert_eq!(found(6), Vec::<(String, usize)>::new());
        assert_eq!(found(5), [("DC=corp".to_owned(), 6)]);
        assert_eq!(
            found(4),
            [
                ("DC=corp".to_owned(), 6),
                ("OU=Sales,DC=corp".to_owned(), 5)
            ]
        );
        // Sales (5) and, above it, DC=corp with Marketing too (6).
        assert_eq!(
            found(1),
            [
                ("DC=corp".to_owned(), 6),
                ("OU=Sales,DC=corp".to_owned(), 5),
                ("OU=Team,OU=Sales,DC=corp".to_owned(), 2)
            ]
        );
    }
}
