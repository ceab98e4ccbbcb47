//! [`MemoryTarget`]: a target directory held in memory that applies operations as a server
//! would — ids, uniqueness constraints, strict all-or-nothing updates, referential integrity —
//! with fault injection for tests.
//!
//! It may not do I/O, and it never holds its lock across an `await` nor while calling a test's
//! fault predicate.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;

use crate::connector::{
    Applied, ConnectorError, ErrorKind, Target, TargetCapabilities, TargetOperation,
};
use crate::model::{
    ApplyError, AttrName, AttributeChange, Attributes, ChangeOp, ObjectType, Reference, TargetId,
    TargetObject, Value,
};

/// A test's choice of operations to fail.
type Predicate = Arc<dyn Fn(&TargetOperation) -> bool + Send + Sync>;

/// An in-memory target directory.
///
/// A cheaply cloneable handle: every clone sees the same objects, so a test keeps one handle to
/// inspect and seed the target while the engine holds another as a `Box<dyn Target>`.
///
/// It applies operations as a directory server does:
///
/// * a create gets a fresh id (`t000001`, `t000002`, …; see [`id_prefix`](Self::id_prefix)), or,
///   with [`id_attribute`](Self::id_attribute), the value of that attribute — and fails with
///   [`ErrorKind::AlreadyExists`] when an object has that id already;
/// * [`unique_attribute`](Self::unique_attribute) constraints reject a create or update that
///   would duplicate a value (strings ignoring case) with [`ErrorKind::AlreadyExists`], naming the
///   attribute and the object holding the value (also as [`ConnectorError::object`]);
/// * an update applies its changes strictly and all or nothing: adding a present value is
///   [`ErrorKind::ValueExists`], removing an absent one [`ErrorKind::NoSuchValue`]; an update or
///   delete of a missing id is [`ErrorKind::NotFound`], of an object of another type
///   [`ErrorKind::Constraint`];
/// * values may reference other objects only by target id ([`Reference::Target`]) and only
///   objects that exist (otherwise [`ErrorKind::Constraint`]); deleting an object removes the
///   references to it from every other object, as group memberships vanish with their member;
/// * with [`value_level_changes(false)`](Self::value_level_changes), updates may only replace
///   ([`ErrorKind::Unsupported`] otherwise), and a call with more operations than
///   [`max_batch`](Self::max_batch) fails every one of them with [`ErrorKind::Unsupported`].
///
/// ```
/// use dirsync::connector::memory::MemoryTarget;
/// use dirsync::connector::{ErrorKind, Target, TargetOperation};
/// use dirsync::model::{Attributes, AttributeChange, Values};
/// use futures::executor::block_on;
///
/// let directory = MemoryTarget::new("scim").unique_attribute("User", "userName");
/// let target: Box<dyn Target> = Box::new(directory.clone());
///
/// let create = |name: &str| TargetOperation::Create {
///     object_type: "User".into(),
///     attributes: [("userName", Values::one(name))].into_iter().collect(),
/// };
/// let outcomes = block_on(target.apply(&[create("ada"), create("ADA")]));
/// let id = outcomes[0].as_ref().map(|a| a.id.clone())?;
/// assert_eq!(id.as_str(), "t000001");
/// // userName is unique ignoring case: the second create fails and names the holder.
/// let err = outcomes[1].as_ref().unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::AlreadyExists);
/// assert_eq!(err.object(), Some("t000001"));
///
/// let update = TargetOperation::Update {
///     id: id.clone(),
///     object_type: "User".into(),
///     changes: vec![AttributeChange::add("emails", Values::one("ada@example.com"))],
/// };
/// block_on(target.apply(&[update])).remove(0)?;
/// assert_eq!(directory.get_object(&id).unwrap().attributes.first_str("emails"), Some("ada@example.com"));
/// assert_eq!(directory.len(), 1);
/// # Ok::<(), dirsync::connector::ConnectorError>(())
/// ```
#[derive(Clone)]
pub struct MemoryTarget {
    name: Arc<str>,
    inner: Arc<Mutex<State>>,
}

struct Fault {
    id: u64,
    when: Predicate,
    kind: ErrorKind,
    /// How many more times it fires; `None` = always.
    remaining: Option<usize>,
    /// The operation is applied and then the error reported.
    after_apply: bool,
}

/// One `unique_attribute` constraint with its value index.
struct Unique {
    object_type: ObjectType,
    attribute: AttrName,
    /// Folded value → the objects holding it.
    holders: HashMap<Value, BTreeSet<TargetId>>,
}

struct State {
    objects: BTreeMap<TargetId, TargetObject>,
    /// Folded id → id, to find ids that differ only in case.
    folded_ids: HashMap<String, TargetId>,
    /// Referenced id → the objects that reference it.
    referrers: HashMap<TargetId, BTreeSet<TargetId>>,
    unique: Vec<Unique>,
    prefix: String,
    counter: u64,
    id_attribute: Option<AttrName>,
    value_level_changes: bool,
    max_batch: usize,
    applied: Vec<TargetOperation>,
    calls: usize,
    faults: Vec<Fault>,
    next_fault_id: u64,
    throttle: Option<(usize, Duration)>,
    operations_seen: usize,
}

impl Default for State {
    fn default() -> Self {
        State {
            objects: BTreeMap::new(),
            folded_ids: HashMap::new(),
            referrers: HashMap::new(),
            unique: Vec::new(),
            prefix: "t".to_string(),
            counter: 0,
            id_attribute: None,
            value_level_changes: true,
            max_batch: 100,
            applied: Vec::new(),
            calls: 0,
            faults: Vec::new(),
            next_fault_id: 0,
            throttle: None,
            operations_seen: 0,
        }
    }
}

/// Unicode simple lower-casing, as attribute names compare.
fn fold(s: &str) -> String {
    s.chars()
        .map(|c| {
            let mut lower = c.to_lowercase();
            match (lower.next(), lower.next()) {
                (Some(l), None) => l,
                _ => c,
            }
        })
        .collect()
}

/// The key a value is indexed under for uniqueness: strings fold case, others are exact.
fn unique_key(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(fold(s).into()),
        other => other.clone(),
    }
}

fn target_refs(obj: &TargetObject) -> impl Iterator<Item = &TargetId> {
    obj.attributes.iter().flat_map(|(_, values)| {
        values.iter().filter_map(|v| match v {
            Value::Reference(Reference::Target(t)) => Some(t),
            _ => None,
        })
    })
}

fn apply_error(e: ApplyError, id: &TargetId) -> ConnectorError {
    let kind = match e {
        ApplyError::ValueExists { .. } => ErrorKind::ValueExists,
        ApplyError::NoSuchValue { .. } => ErrorKind::NoSuchValue,
    };
    ConnectorError::new(kind, format!("update of {id} not applied: {e}"))
        .with_object(id)
        .with_source(e)
}

/// A label for the object an operation concerns, for error messages.
fn op_label(op: &TargetOperation) -> String {
    match op {
        TargetOperation::Create { object_type, .. } => format!("new {object_type}"),
        TargetOperation::Update { id, .. } | TargetOperation::Delete { id, .. } => id.to_string(),
    }
}

impl State {
    fn index(&mut self, obj: &TargetObject) {
        self.folded_ids
            .insert(fold(obj.id.as_str()), obj.id.clone());
        for t in target_refs(obj) {
            self.referrers
                .entry(t.clone())
                .or_default()
                .insert(obj.id.clone());
        }
        for u in &mut self.unique {
            if u.object_type != obj.object_type {
                continue;
            }
            for v in obj
                .attributes
                .get(u.attribute.as_str())
                .into_iter()
                .flatten()
            {
                u.holders
                    .entry(unique_key(v))
                    .or_default()
                    .insert(obj.id.clone());
            }
        }
    }

    fn unindex(&mut self, obj: &TargetObject) {
        let folded = fold(obj.id.as_str());
        if self.folded_ids.get(&folded) == Some(&obj.id) {
            self.folded_ids.remove(&folded);
        }
        for t in target_refs(obj) {
            if let Some(set) = self.referrers.get_mut(t) {
                set.remove(&obj.id);
                if set.is_empty() {
                    self.referrers.remove(t);
                }
            }
        }
        for u in &mut self.unique {
            if u.object_type != obj.object_type {
                continue;
            }
            for v in obj
                .attributes
                .get(u.attribute.as_str())
                .into_iter()
                .flatten()
            {
                let key = unique_key(v);
                if let Some(set) = u.holders.get_mut(&key) {
                    set.remove(&obj.id);
                    if set.is_empty() {
                        u.holders.remove(&key);
                    }
                }
            }
        }
    }

    fn put(&mut self, obj: TargetObject) -> Option<TargetObject> {
        let old = self.take(&obj.id);
        self.index(&obj);
        self.objects.insert(obj.id.clone(), obj);
        old
    }

    fn take(&mut self, id: &TargetId) -> Option<TargetObject> {
        let old = self.objects.remove(id)?;
        self.unindex(&old);
        Some(old)
    }

    fn reindex_unique(&mut self) {
        let objects: Vec<TargetObject> = self.objects.values().cloned().collect();
        for u in &mut self.unique {
            u.holders.clear();
        }
        for obj in &objects {
            for u in &mut self.unique {
                if u.object_type != obj.object_type {
                    continue;
                }
                for v in obj
                    .attributes
                    .get(u.attribute.as_str())
                    .into_iter()
                    .flatten()
                {
                    u.holders
                        .entry(unique_key(v))
                        .or_default()
                        .insert(obj.id.clone());
                }
            }
        }
    }

    /// Fails when `attributes` (of an object of `object_type`, id `me` if it exists) would
    /// duplicate a unique value another object holds.
    fn check_unique(
        &self,
        object_type: &ObjectType,
        attributes: &Attributes,
        me: Option<&TargetId>,
    ) -> Result<(), ConnectorError> {
        for u in &self.unique {
            if u.object_type != *object_type {
                continue;
            }
            for v in attributes.get(u.attribute.as_str()).into_iter().flatten() {
                let holder = u
                    .holders
                    .get(&unique_key(v))
                    .and_then(|set| set.iter().find(|id| Some(*id) != me));
                if let Some(holder) = holder {
                    return Err(ConnectorError::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "{} value {v:?} must be unique among {object_type} objects and is \
                             already used by object {holder}",
                            u.attribute
                        ),
                    )
                    .with_object(holder));
                }
            }
        }
        Ok(())
    }

    /// Fails when a value refers to anything but an existing target object.
    fn check_references<'v>(
        &self,
        values: impl IntoIterator<Item = (&'v AttrName, &'v Value)>,
        label: &str,
    ) -> Result<(), ConnectorError> {
        for (name, v) in values {
            let Value::Reference(r) = v else { continue };
            match r {
                Reference::Target(t) if self.objects.contains_key(t) => {}
                Reference::Target(t) => {
                    return Err(ConnectorError::new(
                        ErrorKind::Constraint,
                        format!(
                            "{label}: {name} refers to object {t}, which does not exist in the \
                             target"
                        ),
                    ));
                }
                other => {
                    return Err(ConnectorError::new(
                        ErrorKind::Constraint,
                        format!(
                            "{label}: {name} holds the unresolved reference {other:?}; a target \
                             accepts only references by target id"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn fresh_id(&mut self) -> TargetId {
        loop {
            self.counter += 1;
            let id = TargetId::new(format!("{}{:06}", self.prefix, self.counter));
            if !self.folded_ids.contains_key(&fold(id.as_str())) {
                return id;
            }
        }
    }

    /// Applies one operation, atomically: on error nothing changed.
    fn execute(&mut self, op: &TargetOperation) -> Result<Applied, ConnectorError> {
        match op {
            TargetOperation::Create {
                object_type,
                attributes,
            } => self.create(object_type, attributes),
            TargetOperation::Update {
                id,
                object_type,
                changes,
            } => self.update(id, object_type, changes),
            TargetOperation::Delete { id, object_type } => self.delete(id, object_type),
        }
    }

    fn create(
        &mut self,
        object_type: &ObjectType,
        attributes: &Attributes,
    ) -> Result<Applied, ConnectorError> {
        let label = format!("create of {object_type}");
        self.check_references(
            attributes
                .iter()
                .flat_map(|(n, vs)| vs.iter().map(move |v| (n, v))),
            &label,
        )?;
        // Checked before an id is taken so that a failed create consumes none.
        self.check_unique(object_type, attributes, None)?;
        let id = match &self.id_attribute {
            Some(attr) => {
                let id = match attributes.get(attr.as_str()).map(|v| &v[..]) {
                    Some([one]) => TargetId::new(one.to_text()),
                    Some(_) => {
                        return Err(ConnectorError::new(
                            ErrorKind::Constraint,
                            format!(
                                "{label}: id attribute {attr} has several values; it needs one"
                            ),
                        ))
                    }
                    None => {
                        return Err(ConnectorError::new(
                            ErrorKind::Constraint,
                            format!("{label}: id attribute {attr} is missing"),
                        ))
                    }
                };
                if let Some(existing) = self.folded_ids.get(&fold(id.as_str())) {
                    return Err(ConnectorError::new(
                        ErrorKind::AlreadyExists,
                        format!("{label}: an object with id {existing} ({attr}) already exists"),
                    )
                    .with_object(existing));
                }
                id
            }
            None => self.fresh_id(),
        };
        self.put(TargetObject {
            id: id.clone(),
            object_type: object_type.clone(),
            attributes: attributes.clone(),
        });
        Ok(Applied { id })
    }

    fn existing(
        &self,
        id: &TargetId,
        object_type: &ObjectType,
        what: &str,
    ) -> Result<&TargetObject, ConnectorError> {
        let obj = self.objects.get(id).ok_or_else(|| {
            ConnectorError::new(
                ErrorKind::NotFound,
                format!("{what} of {object_type} {id}: no object has this id"),
            )
            .with_object(id)
        })?;
        if obj.object_type != *object_type {
            return Err(ConnectorError::new(
                ErrorKind::Constraint,
                format!(
                    "{what} of {id} as a {object_type}: the object is a {}",
                    obj.object_type
                ),
            )
            .with_object(id));
        }
        Ok(obj)
    }

    fn update(
        &mut self,
        id: &TargetId,
        object_type: &ObjectType,
        changes: &[AttributeChange],
    ) -> Result<Applied, ConnectorError> {
        let current = self.existing(id, object_type, "update")?;
        let label = format!("update of {id}");
        if !self.value_level_changes {
            if let Some(c) = changes.iter().find(|c| c.op != ChangeOp::Replace) {
                return Err(ConnectorError::new(
                    ErrorKind::Unsupported,
                    format!(
                        "{label}: this target applies only replaces, not a value-level {:?} of {}",
                        c.op, c.attribute
                    ),
                )
                .with_object(id));
            }
        }
        self.check_references(
            changes
                .iter()
                .filter(|c| c.op != ChangeOp::Remove)
                .flat_map(|c| c.values.iter().map(move |v| (&c.attribute, v))),
            &label,
        )
        .map_err(|e| e.with_object(id))?;
        let mut next = current.clone();
        for change in changes {
            next.attributes
                .apply(change, true)
                .map_err(|e| apply_error(e, id))?;
        }
        if let Some(attr) = &self.id_attribute {
            let keeps_id = matches!(
                next.attributes.get(attr.as_str()).map(|v| &v[..]),
                Some([one]) if crate::model::eq_ignore_case(&one.to_text(), id.as_str())
            );
            if !keeps_id {
                return Err(ConnectorError::new(
                    ErrorKind::Constraint,
                    format!(
                        "{label}: {attr} is the object's id and an update cannot change or \
                         remove it"
                    ),
                )
                .with_object(id));
            }
        }
        self.check_unique(object_type, &next.attributes, Some(id))?;
        self.put(next);
        Ok(Applied { id: id.clone() })
    }

    fn delete(
        &mut self,
        id: &TargetId,
        object_type: &ObjectType,
    ) -> Result<Applied, ConnectorError> {
        self.existing(id, object_type, "delete")?;
        self.take(id);
        // References to the deleted object vanish from every object that held them.
        let referrers = self.referrers.remove(id).unwrap_or_default();
        let gone = Value::Reference(Reference::Target(id.clone()));
        for r in referrers {
            if let Some(mut obj) = self.objects.get(&r).cloned() {
                let names: Vec<AttrName> = obj.attributes.iter().map(|(n, _)| n.clone()).collect();
                for n in names {
                    if let Some(values) = obj.attributes.get_mut(n.as_str()) {
                        values.remove(&gone);
                    }
                }
                obj.attributes.prune();
                self.put(obj);
            }
        }
        Ok(Applied { id: id.clone() })
    }
}

impl Default for MemoryTarget {
    fn default() -> Self {
        MemoryTarget::new("memory")
    }
}

impl MemoryTarget {
    /// An empty target named `name`: fresh ids `t000001`, `t000002`, …, value-level changes,
    /// batches of up to 100 operations.
    pub fn new(name: impl Into<String>) -> MemoryTarget {
        MemoryTarget {
            name: Arc::from(name.into()),
            inner: Arc::new(Mutex::new(State::default())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes fresh ids start with `prefix` instead of `t`.
    pub fn id_prefix(self, prefix: impl Into<String>) -> MemoryTarget {
        self.lock().prefix = prefix.into();
        self
    }

    /// Takes the id of a created object from its attribute `name` (`"dn"`, `"userName"`): a
    /// create must carry exactly one value of it, one whose text (ignoring case) no object has
    /// as its id yet, and an update may not change it.
    pub fn id_attribute(self, name: impl Into<AttrName>) -> MemoryTarget {
        self.lock().id_attribute = Some(name.into());
        self
    }

    /// Requires the values of `attribute` to be unique among objects of `object_type` (strings
    /// ignoring case), as SCIM's `userName` or Graph's `userPrincipalName`.
    pub fn unique_attribute(
        self,
        object_type: impl Into<ObjectType>,
        attribute: impl Into<AttrName>,
    ) -> MemoryTarget {
        {
            let mut s = self.lock();
            s.unique.push(Unique {
                object_type: object_type.into(),
                attribute: attribute.into(),
                holders: HashMap::new(),
            });
            s.reindex_unique();
        }
        self
    }

    /// Whether the target applies value-level adds and removes (default `true`); without them,
    /// an update holding one fails with [`ErrorKind::Unsupported`].
    pub fn value_level_changes(self, yes: bool) -> MemoryTarget {
        self.lock().value_level_changes = yes;
        self
    }

    /// The most operations one [`Target::apply`] call may carry (default 100; at least 1).
    pub fn max_batch(self, n: usize) -> MemoryTarget {
        self.lock().max_batch = n.max(1);
        self
    }

    /// Every object, in id order.
    pub fn objects(&self) -> Vec<TargetObject> {
        self.lock().objects.values().cloned().collect()
    }

    /// The object with `id`, of any type.
    pub fn get_object(&self, id: &TargetId) -> Option<TargetObject> {
        self.lock().objects.get(id).cloned()
    }

    /// The number of objects.
    pub fn len(&self) -> usize {
        self.lock().objects.len()
    }

    /// Whether the target holds no objects.
    pub fn is_empty(&self) -> bool {
        self.lock().objects.is_empty()
    }

    /// Every operation the target applied, in order — including those whose outcome
    /// [`fail_after_apply_when`](Self::fail_after_apply_when) reported as failed.
    pub fn applied(&self) -> Vec<TargetOperation> {
        self.lock().applied.clone()
    }

    /// How many times [`Target::apply`] was called.
    pub fn calls(&self) -> usize {
        self.lock().calls
    }

    /// Seeds an object as it is, without checks (objects that existed before the sync, for join
    /// tests); returns the object it replaced.
    pub fn insert(&self, object: TargetObject) -> Option<TargetObject> {
        self.lock().put(object)
    }

    /// Makes the operations `when` accepts fail with `kind` without being applied: `times`
    /// times, or always (`None`). Faults are checked in the order they were added.
    pub fn fail_when(
        &self,
        when: impl Fn(&TargetOperation) -> bool + Send + Sync + 'static,
        kind: ErrorKind,
        times: Option<usize>,
    ) {
        self.add_fault(Arc::new(when), kind, times, false);
    }

    /// Makes every `n`-th operation (counted across calls, from now) fail with
    /// [`ErrorKind::Throttled`] and `retry_after`, without being applied; `n = 0` stops it.
    pub fn throttle_every(&self, n: usize, retry_after: Duration) {
        let mut s = self.lock();
        s.operations_seen = 0;
        s.throttle = (n > 0).then_some((n, retry_after));
    }

    /// Makes the operations `when` accepts take effect but report an error of `kind`, as when
    /// the response is lost after the server committed: a retried create would duplicate the
    /// object unless the engine looks it up first. Fires for every matching operation until
    /// [`clear_faults`](Self::clear_faults).
    pub fn fail_after_apply_when(
        &self,
        when: impl Fn(&TargetOperation) -> bool + Send + Sync + 'static,
        kind: ErrorKind,
    ) {
        self.add_fault(Arc::new(when), kind, None, true);
    }

    /// Removes every fault and the throttle.
    pub fn clear_faults(&self) {
        let mut s = self.lock();
        s.faults.clear();
        s.throttle = None;
        s.operations_seen = 0;
    }

    fn add_fault(&self, when: Predicate, kind: ErrorKind, times: Option<usize>, after: bool) {
        if times == Some(0) {
            return;
        }
        let mut s = self.lock();
        s.next_fault_id += 1;
        let id = s.next_fault_id;
        s.faults.push(Fault {
            id,
            when,
            kind,
            remaining: times,
            after_apply: after,
        });
    }

    /// Marks a fault as fired once, dropping it when it is used up.
    fn fired(s: &mut State, fault: u64) {
        if let Some(i) = s.faults.iter().position(|f| f.id == fault) {
            if let Some(n) = &mut s.faults[i].remaining {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    s.faults.remove(i);
                }
            }
        }
    }

    fn apply_one(&self, op: &TargetOperation) -> Result<Applied, ConnectorError> {
        let label = op_label(op);
        // 1. Throttling and a copy of the faults, under the lock.
        let faults: Vec<(u64, Predicate, ErrorKind, bool)> = {
            let mut s = self.lock();
            s.operations_seen += 1;
            if let Some((n, after)) = s.throttle {
                if s.operations_seen % n == 0 {
                    return Err(ConnectorError::new(
                        ErrorKind::Throttled,
                        format!("target {}: too many requests (injected)", self.name),
                    )
                    .with_retry_after(after)
                    .with_object(label));
                }
            }
            s.faults
                .iter()
                .map(|f| (f.id, f.when.clone(), f.kind, f.after_apply))
                .collect()
        };
        // 2. The test's predicates, without the lock (they may inspect this target).
        let before = faults.iter().find(|(_, when, _, after)| !after && when(op));
        let after = faults.iter().find(|(_, when, _, after)| *after && when(op));
        // 3. The operation, atomically.
        let mut s = self.lock();
        if let Some((id, _, kind, _)) = before {
            Self::fired(&mut s, *id);
            return Err(ConnectorError::new(
                *kind,
                format!("target {}: injected failure, not applied", self.name),
            )
            .with_object(label));
        }
        let applied = s.execute(op)?;
        s.applied.push(op.clone());
        if let Some((id, _, kind, _)) = after {
            Self::fired(&mut s, *id);
            return Err(ConnectorError::new(
                *kind,
                format!(
                    "target {}: injected failure after the operation was applied (response lost)",
                    self.name
                ),
            )
            .with_object(applied.id));
        }
        Ok(applied)
    }
}

#[async_trait]
impl Target for MemoryTarget {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> TargetCapabilities {
        let s = self.lock();
        TargetCapabilities {
            value_level_changes: s.value_level_changes,
            max_batch: s.max_batch,
            read: true,
        }
    }

    async fn read(
        &self,
        object_type: &ObjectType,
    ) -> Result<BoxStream<'_, Result<TargetObject, ConnectorError>>, ConnectorError> {
        let objects: Vec<Result<TargetObject, ConnectorError>> = self
            .lock()
            .objects
            .values()
            .filter(|o| o.object_type == *object_type)
            .cloned()
            .map(Ok)
            .collect();
        Ok(futures::stream::iter(objects).boxed())
    }

    async fn get(
        &self,
        object_type: &ObjectType,
        id: &TargetId,
    ) -> Result<Option<TargetObject>, ConnectorError> {
        Ok(self
            .lock()
            .objects
            .get(id)
            .filter(|o| o.object_type == *object_type)
            .cloned())
    }

    async fn find(
        &self,
        object_type: &ObjectType,
        attribute: &AttrName,
        value: &Value,
    ) -> Result<Vec<TargetObject>, ConnectorError> {
        Ok(self
            .lock()
            .objects
            .values()
            .filter(|o| o.object_type == *object_type)
            .filter(|o| {
                o.attributes
                    .get(attribute.as_str())
                    .is_some_and(|vs| vs.iter().any(|v| v.eq_ignore_case(value)))
            })
            .cloned()
            .collect())
    }

    async fn apply(&self, operations: &[TargetOperation]) -> Vec<Result<Applied, ConnectorError>> {
        let max = {
            let mut s = self.lock();
            s.calls += 1;
            s.max_batch
        };
        if operations.len() > max {
            return operations
                .iter()
                .map(|op| {
                    Err(ConnectorError::new(
                        ErrorKind::Unsupported,
                        format!(
                            "target {}: a batch of {} operations exceeds max_batch {max}; split \
                             it",
                            self.name,
                            operations.len()
                        ),
                    )
                    .with_object(op_label(op)))
                })
                .collect();
        }
        operations.iter().map(|op| self.apply_one(op)).collect()
    }
}

impl std::fmt::Debug for MemoryTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("MemoryTarget")
            .field("name", &self.name)
            .field("objects", &s.objects.len())
            .field("calls", &s.calls)
            .finish()
    }
}
