//! Connectors: the [`Source`] and [`Target`] traits every directory system implements, the
//! change and watermark types they exchange with the engine, and their error type.
//!
//! Connectors are the only code that does network or file I/O on directories. Each system has a
//! folder of its own below this module; [`memory`] is always built and makes every engine
//! behaviour testable without a server.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::delta::{CreateReferences, Links, Operation, OperationKind, Plan, TargetMirror};
use crate::model::{
    AttrName, AttributeChange, Attributes, Change, Entry, ObjectType, TargetId, TargetObject, Value,
};

#[cfg(any(feature = "ldif", feature = "ldap"))]
pub mod dirnames;
#[cfg(feature = "graph")]
pub mod graph;
#[cfg(feature = "ldap")]
pub mod ldap;
#[cfg(feature = "ldif")]
pub mod ldif;
pub mod memory;
mod secret;
pub use secret::Secret;
#[cfg(feature = "scim")]
pub mod scim;

/// An opaque, typed position in a system's change history: a DirSync cookie, a highest USN, a
/// syncrepl cookie, a Graph deltaLink. Only the connector that made it can interpret it.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Watermark {
    /// What made the watermark (`"memory"`, `"dirsync"`, `"syncrepl"`, `"usn"`, …), so that a
    /// watermark is never handed to a connector that would misread it.
    pub kind: String,
    /// The connector's bytes.
    #[serde(with = "crate::model::b64")]
    pub data: Vec<u8>,
}

impl Watermark {
    /// A watermark from bytes.
    pub fn new(kind: impl Into<String>, data: impl Into<Vec<u8>>) -> Watermark {
        Watermark {
            kind: kind.into(),
            data: data.into(),
        }
    }

    /// The data as UTF-8 text, if it is.
    pub fn as_text(&self) -> Option<&str> {
        std::str::from_utf8(&self.data).ok()
    }
}

impl fmt::Debug for Watermark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_text() {
            Some(t) if t.len() <= 64 => write!(f, "Watermark({}:{t})", self.kind),
            _ => write!(f, "Watermark({}: {} bytes)", self.kind, self.data.len()),
        }
    }
}

/// One item of an import stream: an object (or change), or a checkpoint.
///
/// A checkpoint's watermark covers every item before it: once those are durable the engine may
/// commit it. A stream ends with a checkpoint when the source supports delta import.
#[derive(Debug, Clone, PartialEq)]
pub enum ImportItem<T> {
    /// An entry (full import) or a change (delta import).
    Item(T),
    /// Everything before this point is covered by this watermark.
    Checkpoint(Watermark),
    /// A present phase (RFC 4533 syncrepl; a delta import only): these objects still exist,
    /// unchanged since the watermark the import started from. A delta stream that yields
    /// `Present` items (even an empty one) is in a present phase until its next checkpoint: at
    /// that checkpoint every mirrored object that was neither reported present nor added or
    /// replaced since the present phase began is deleted. The engine treats the phase as a
    /// full import (the same deletion guard applies); a stream that ends before the checkpoint
    /// deletes nothing.
    Present(Vec<crate::model::Anchor>),
}

/// A stream of import items.
pub type ImportStream<'a, T> = BoxStream<'a, Result<ImportItem<T>, ConnectorError>>;

/// What a source can do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SourceCapabilities {
    /// Delta import is supported; otherwise the engine diffs full imports against the mirror.
    pub delta: bool,
    /// Delta import reports attribute-level changes ([`Change::Modify`]) rather than whole
    /// objects.
    pub partial_changes: bool,
}

impl SourceCapabilities {
    /// Capabilities with delta import on or off.
    pub fn new(delta: bool) -> Self {
        SourceCapabilities {
            delta,
            partial_changes: false,
        }
    }
}

/// What a target can do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TargetCapabilities {
    /// The target applies value-level adds and removes of multi-valued attributes; otherwise the
    /// engine turns them into replaces.
    pub value_level_changes: bool,
    /// How many operations one [`Target::apply`] call should carry at most (1 = no batching).
    pub max_batch: usize,
    /// The target can be read back (reconcile, join lookups).
    pub read: bool,
    /// How many values one [`Target::find_any`] call should carry at most: what the target looks
    /// up in one request (one LDAP search, one SCIM or Graph query). 1 = the target looks values
    /// up one by one (the default [`Target::find_any`]).
    pub lookup_batch: usize,
    /// The reference attributes (members, manager) a create may carry. The planner puts the
    /// references of these into the create itself — to existing objects and to objects the same
    /// run creates first — and writes the others after the create. Every target of this crate
    /// takes every reference in a create ([`CreateReferences::All`]) except Microsoft Graph,
    /// which takes only a group's `members` (`members@odata.bind`, up to 20 per request).
    pub create_references: CreateReferences,
}

impl Default for TargetCapabilities {
    fn default() -> Self {
        TargetCapabilities {
            value_level_changes: true,
            max_batch: 1,
            read: true,
            lookup_batch: 1,
            create_references: CreateReferences::All,
        }
    }
}

/// The source side of a synchronization.
///
/// Object-safe: a program may hold a `Box<dyn Source>`.
#[async_trait]
pub trait Source: Send + Sync {
    /// A short name for logs and errors (`"corp-ad"`).
    fn name(&self) -> &str;

    /// What the source supports.
    fn capabilities(&self) -> SourceCapabilities;

    /// Every object in scope of the connector's configuration, ending with a checkpoint when the
    /// source supports delta import.
    async fn full_import(&self) -> Result<ImportStream<'_, Entry>, ConnectorError>;

    /// The changes since `since`, ending with a checkpoint. A watermark the source can no longer
    /// serve is an error of kind [`ErrorKind::InvalidWatermark`]: the engine then runs a full
    /// import.
    async fn delta_import(
        &self,
        since: &Watermark,
    ) -> Result<ImportStream<'_, Change>, ConnectorError> {
        let _ = since;
        Err(ConnectorError::new(
            ErrorKind::Unsupported,
            format!("source {} does not support delta import", self.name()),
        ))
    }
}

/// One operation on a target, with every reference already translated to a target id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum TargetOperation {
    /// Create an object.
    Create {
        /// The target object type.
        object_type: ObjectType,
        /// Its attributes.
        attributes: Attributes,
    },
    /// Change an object's attributes.
    Update {
        /// The object.
        id: TargetId,
        /// The target object type.
        object_type: ObjectType,
        /// The changes, applied in order, all or nothing.
        changes: Vec<AttributeChange>,
    },
    /// Delete an object.
    Delete {
        /// The object.
        id: TargetId,
        /// The target object type.
        object_type: ObjectType,
    },
}

impl TargetOperation {
    /// The target object type the operation is about.
    pub fn object_type(&self) -> &ObjectType {
        match self {
            TargetOperation::Create { object_type, .. }
            | TargetOperation::Update { object_type, .. }
            | TargetOperation::Delete { object_type, .. } => object_type,
        }
    }

    /// The target id, for updates and deletes.
    pub fn id(&self) -> Option<&TargetId> {
        match self {
            TargetOperation::Create { .. } => None,
            TargetOperation::Update { id, .. } | TargetOperation::Delete { id, .. } => Some(id),
        }
    }
}

/// The result of one applied operation.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The id of the object (the new id for a create).
    pub id: TargetId,
}

/// The target side of a synchronization.
///
/// Object-safe: a program may hold a `Box<dyn Target>`.
#[async_trait]
pub trait Target: Send + Sync {
    /// A short name for logs and errors.
    fn name(&self) -> &str;

    /// What the target supports.
    fn capabilities(&self) -> TargetCapabilities;

    /// Every object of `object_type`, for reconcile.
    async fn read(
        &self,
        object_type: &ObjectType,
    ) -> Result<BoxStream<'_, Result<TargetObject, ConnectorError>>, ConnectorError>;

    /// One object by id; `None` when it does not exist.
    async fn get(
        &self,
        object_type: &ObjectType,
        id: &TargetId,
    ) -> Result<Option<TargetObject>, ConnectorError>;

    /// The objects of `object_type` whose `attribute` has `value` (join lookups; strings compare
    /// ignoring case, as directories do).
    async fn find(
        &self,
        object_type: &ObjectType,
        attribute: &AttrName,
        value: &Value,
    ) -> Result<Vec<TargetObject>, ConnectorError>;

    /// Many join lookups at once: the objects of `object_type` whose `attribute` has any of
    /// `values` (strings compare ignoring case, as in [`find`](Self::find)). Each object comes
    /// back once, in no particular order, whichever values it matched; the caller matches
    /// objects to values. An empty `values` finds nothing.
    ///
    /// The engine calls it before creating objects the target mirror cannot vouch for (see
    /// [`crate::engine::JoinLookup`]), with at most [`TargetCapabilities::lookup_batch`] values
    /// per call. The default asks [`find`](Self::find) once per value; connectors whose protocol
    /// can ask for several values in one request override it (an LDAP `(|(a=v1)(a=v2)…)`
    /// search, a SCIM `a eq "v1" or a eq "v2"` filter, a Graph `$filter=a in ('v1','v2')`), and
    /// may split a call into several requests where the protocol limits one.
    async fn find_any(
        &self,
        object_type: &ObjectType,
        attribute: &AttrName,
        values: &[Value],
    ) -> Result<Vec<TargetObject>, ConnectorError> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for v in values {
            for o in self.find(object_type, attribute, v).await? {
                if seen.insert(o.id.clone()) {
                    out.push(o);
                }
            }
        }
        Ok(out)
    }

    /// Applies `operations`, returning exactly one outcome per operation, in order. A partial
    /// failure is ordinary data: each failed operation has its error, and the others took effect.
    ///
    /// The engine hands at most [`TargetCapabilities::max_batch`] operations per call, of objects
    /// it could as well have sent concurrently: a connector may send operations on different
    /// objects in any order or together (one `/Bulk`, one `$batch`, one file rewrite), but
    /// operations on the same target object take effect in their order.
    async fn apply(&self, operations: &[TargetOperation]) -> Vec<Result<Applied, ConnectorError>>;
}

/// Splits `items` into consecutive runs of at most `max_count` items whose `cost` sums to at
/// most `max_cost` (an item costlier than `max_cost` by itself gets a run of its own): how a
/// connector keeps a batched lookup within a protocol's limits (values per filter, URL length).
#[cfg_attr(not(any(feature = "scim", feature = "graph")), allow(dead_code))]
pub(crate) fn split_runs<T>(
    items: &[T],
    max_count: usize,
    max_cost: usize,
    cost: impl Fn(&T) -> usize,
) -> Vec<&[T]> {
    let max_count = max_count.max(1);
    let mut out = Vec::new();
    let (mut start, mut sum) = (0, 0usize);
    for (i, item) in items.iter().enumerate() {
        let c = cost(item);
        if i > start && (i - start >= max_count || sum.saturating_add(c) > max_cost) {
            out.push(&items[start..i]);
            start = i;
            sum = 0;
        }
        sum = sum.saturating_add(c);
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

/// Applies `operations` with `apply_one`, those on different objects concurrently and those on
/// the same object (the same target id) one after the other in their order; a create is an
/// object of its own. One outcome per operation, in order. This is how a connector whose
/// protocol runs independent requests together (a Graph `$batch`, requests pipelined on one
/// LDAP connection) keeps the promise of [`Target::apply`].
#[cfg_attr(not(any(feature = "graph", feature = "ldap")), allow(dead_code))]
pub(crate) async fn apply_per_object<'a, F, Fut>(
    operations: &'a [TargetOperation],
    apply_one: F,
) -> Vec<Result<Applied, ConnectorError>>
where
    F: Fn(&'a TargetOperation) -> Fut,
    Fut: std::future::Future<Output = Result<Applied, ConnectorError>>,
{
    let mut chains: Vec<Vec<usize>> = Vec::new();
    let mut by_id: std::collections::HashMap<&TargetId, usize> = std::collections::HashMap::new();
    for (i, op) in operations.iter().enumerate() {
        match op.id() {
            Some(id) => match by_id.get(id) {
                Some(&c) => chains[c].push(i),
                None => {
                    by_id.insert(id, chains.len());
                    chains.push(vec![i]);
                }
            },
            None => chains.push(vec![i]),
        }
    }
    let apply_one = &apply_one;
    let done = futures::future::join_all(chains.into_iter().map(|chain| async move {
        let mut out = Vec::with_capacity(chain.len());
        for i in chain {
            out.push((i, apply_one(&operations[i]).await));
        }
        out
    }))
    .await;
    let mut outcomes: Vec<Option<Result<Applied, ConnectorError>>> =
        operations.iter().map(|_| None).collect();
    for (i, r) in done.into_iter().flatten() {
        outcomes[i] = Some(r);
    }
    outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| Err(ConnectorError::new(ErrorKind::Other, "operation not run")))
        })
        .collect()
}

/// What [`export_sequential`] did.
#[derive(Debug, Default)]
pub struct ExportReport {
    /// Operations that took effect (including link-only ones).
    pub applied: usize,
    /// Operations that failed, with the error.
    pub failed: Vec<(Operation, ConnectorError)>,
    /// A guard held the plan: nothing was applied.
    pub held: bool,
}

/// The simplest exporter: applies `plan` through `target` one operation at a time, in plan order,
/// recording each outcome in `links` and `mirror`. Failed operations are reported and skipped;
/// references to objects whose create failed are left out of the operations that carry them
/// (see [`Operation::without_unresolved`]), for the next plan to bring.
///
/// It keeps no journal and does not retry: it is for tests, examples and small tools. Programs
/// that must survive crashes and throttling use the engine's exporter.
///
/// A plan a guard holds ([`Plan::is_held`]) is not applied at all: the report says so. To apply
/// it anyway, a caller clears `plan.guard_violations` — explicitly, for that plan only.
pub async fn export_sequential(
    plan: &Plan,
    target: &dyn Target,
    links: &mut Links,
    mirror: &mut TargetMirror,
) -> ExportReport {
    let mut report = ExportReport::default();
    if plan.is_held() {
        report.held = true;
        return report;
    }
    for op in &plan.operations {
        // A create whose referenced create failed is still made, without that reference.
        let stripped = op.without_unresolved(links);
        let op = stripped.as_ref().unwrap_or(op);
        let top = match op.to_target_operation(links) {
            Ok(Some(t)) => t,
            Ok(None) => {
                if let OperationKind::Join { target_id, .. } = &op.kind {
                    links.record(op, Some(target_id));
                } else {
                    links.record(op, None);
                }
                report.applied += 1;
                continue;
            }
            Err(e) => {
                report.failed.push((
                    op.clone(),
                    ConnectorError::new(ErrorKind::NotFound, e.to_string()),
                ));
                continue;
            }
        };
        let outcome = target.apply(std::slice::from_ref(&top)).await.pop();
        match outcome {
            Some(Ok(applied)) => {
                mirror.record(&top, &applied.id);
                links.record(op, Some(&applied.id));
                report.applied += 1;
            }
            Some(Err(e)) => report.failed.push((op.clone(), e)),
            None => report.failed.push((
                op.clone(),
                ConnectorError::new(ErrorKind::Protocol, "target returned no outcome"),
            )),
        }
    }
    report
}

/// What kind of failure a [`ConnectorError`] is; callers match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// A create collided with an existing object (the engine joins it instead).
    AlreadyExists,
    /// The object does not exist.
    NotFound,
    /// An add of a value that is already present.
    ValueExists,
    /// A remove of a value that is not present.
    NoSuchValue,
    /// The target refused the values (schema, constraint, policy).
    Constraint,
    /// The object changed since it was read (ETag / precondition).
    Conflict,
    /// The server asks to slow down; see [`ConnectorError::retry_after`].
    Throttled,
    /// The server is busy or unavailable; retry later.
    Unavailable,
    /// The request timed out.
    Timeout,
    /// Authentication or authorization failed.
    Auth,
    /// The watermark can no longer be served; a full import is needed.
    InvalidWatermark,
    /// The server sent something this crate cannot read.
    Protocol,
    /// The connector's configuration is invalid.
    Config,
    /// The operation is not supported by this connector.
    Unsupported,
    /// Anything else.
    Other,
}

/// An error from a connector: its kind, what happened, and which object it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{kind:?}: {message}{}", object.as_ref().map(|o| format!(" (object {o})")).unwrap_or_default())]
pub struct ConnectorError {
    kind: ErrorKind,
    message: String,
    object: Option<String>,
    retry_after: Option<Duration>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ConnectorError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ConnectorError {
        ConnectorError {
            kind,
            message: message.into(),
            object: None,
            retry_after: None,
            source: None,
        }
    }

    /// Names the object (anchor, id or DN) the error concerns.
    pub fn with_object(mut self, object: impl fmt::Display) -> Self {
        self.object = Some(object.to_string());
        self
    }

    /// How long the server asked to wait.
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Keeps the underlying error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The object the error concerns, if known.
    pub fn object(&self) -> Option<&str> {
        self.object.as_deref()
    }

    /// How long the server asked to wait before retrying, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Whether retrying the same request later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Throttled | ErrorKind::Unavailable | ErrorKind::Timeout
        )
    }

    /// Whether the server asked to slow down.
    pub fn is_throttled(&self) -> bool {
        self.kind == ErrorKind::Throttled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_display_names_kind_and_object() {
        let e = ConnectorError::new(ErrorKind::NotFound, "no such object").with_object("cn=x");
        assert_eq!(e.to_string(), "NotFound: no such object (object cn=x)");
        assert!(!e.is_retryable());
        let t = ConnectorError::new(ErrorKind::Throttled, "slow down")
            .with_retry_after(Duration::from_secs(3));
        assert!(t.is_retryable() && t.is_throttled());
        assert_eq!(t.retry_after(), Some(Duration::from_secs(3)));
    }

    #[test]
    fn traits_are_object_safe() {
        fn takes(_: Option<Box<dyn Source>>, _: Option<Box<dyn Target>>) {}
        takes(None, None);
    }

    #[test]
    fn split_runs_bounds_count_and_cost() {
        let items = [3, 3, 3, 10, 1, 1, 1, 1];
        let runs = split_runs(&items, 3, 7, |n| *n);
        // 3+3 fits 7, a third 3 would not; 10 alone exceeds the cost and stands by itself;
        // four 1s are split by the count.
        assert_eq!(
            runs,
            [&[3, 3][..], &[3][..], &[10][..], &[1, 1, 1][..], &[1][..]]
        );
        assert!(split_runs::<u8>(&[], 5, 5, |_| 1).is_empty());
        // A count of 0 is taken as 1.
        assert_eq!(split_runs(&[1, 1], 0, 100, |n| *n).len(), 2);
    }

    #[test]
    fn watermark_serializes_as_base64() {
        let w = Watermark::new("usn", b"12345".to_vec());
        let j = serde_json::to_string(&w).unwrap();
        assert_eq!(j, r#"{"kind":"usn","data":"MTIzNDU="}"#);
        assert_eq!(serde_json::from_str::<Watermark>(&j).unwrap(), w);
    }
}
