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

/// Values one [`Target::find_any`] call looks up (in one pass over the objects).
const LOOKUP_BATCH: usize = 1000;

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
/// * an attribute may not hold the same value twice ([`ErrorKind::ValueExists`]);
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
/// let mut outcomes = block_on(target.apply(&[create("ada"), create("ADA")])).into_iter();
/// let id = outcomes.next().unwrap()?.id;
/// assert_eq!(id.as_str(), "t000001");
/// // userName is unique ignoring case: the second create fails and names the holder.
/// let err = outcomes.next().unwrap().unwrap_err();
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
    lookups: usize,
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
            lookups: 0,
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

/// Fails when an attribute of `attributes` (those named in `only`, or all) holds a value twice,
/// as a directory refuses.
fn check_no_duplicates(
    attributes: &Attributes,
    mut only: impl FnMut(&AttrName) -> bool,
    label: &str,
) -> Result<(), ConnectorError> {
    for (name, values) in attributes.iter().filter(|(n, _)| only(n)) {
        let mut seen = std::collections::HashSet::with_capacity(values.len());
        if let Some(v) = values.iter().find(|v| !seen.insert(*v)) {
            return Err(ConnectorError::new(
                ErrorKind::ValueExists,
                format!("{label}: {name} holds the value {v:?} twice"),
            ));
        }
    }
    Ok(())
}

/// A label for the object an operation concerns, for error messages.
fn op_label(op: &TargetOperation) -> String {
    match op {
        TargetOperation::Create { object_type, .. } => format!("new {object_type}"),
        TargetOperation::Update { id, .. } | TargetOperation::Delete { id, .. } => id.to_string(),
    }
}

/// Records `obj` as the holder of its values of every unique attribute of its type.
fn hold_unique(unique: &mut [Unique], obj: &TargetObject) {
    for u in unique
        .iter_mut()
        .filter(|u| u.object_type == obj.object_type)
    {
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
        hold_unique(&mut self.unique, obj);
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
        for u in &mut self.unique {
            u.holders.clear();
        }
        for obj in self.objects.values() {
            hold_unique(&mut self.unique, obj);
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
        check_no_duplicates(attributes, |_| true, &label)?;
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
        check_no_duplicates(
            &next.attributes,
            |n| changes.iter().any(|c| c.attribute == *n),
            &label,
        )
        .map_err(|e| e.with_object(id))?;
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

    /// How many lookups ([`Target::find`], [`Target::find_any`]) the target answered: one per
    /// call, as a server answers one query per request.
    pub fn lookups(&self) -> usize {
        self.lock().lookups
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
            lookup_batch: LOOKUP_BATCH,
            ..TargetCapabilities::default()
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
        self.find_any(object_type, attribute, std::slice::from_ref(value))
            .await
    }

    /// One pass over the objects for every value (values compared as
    /// [`unique_attribute`](MemoryTarget::unique_attribute) compares them: strings ignoring
    /// case).
    async fn find_any(
        &self,
        object_type: &ObjectType,
        attribute: &AttrName,
        values: &[Value],
    ) -> Result<Vec<TargetObject>, ConnectorError> {
        let wanted: std::collections::HashSet<Value> = values.iter().map(unique_key).collect();
        let mut s = self.lock();
        s.lookups += 1;
        Ok(s.objects
            .values()
            .filter(|o| o.object_type == *object_type)
            .filter(|o| {
                o.attributes
                    .get(attribute.as_str())
                    .is_some_and(|vs| vs.iter().any(|v| wanted.contains(&unique_key(v))))
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::model::{values, Values};
    use futures::TryStreamExt;

    fn create(object_type: &str, attrs: &[(&str, &str)]) -> TargetOperation {
        TargetOperation::Create {
            object_type: object_type.into(),
            attributes: attrs.iter().map(|(n, v)| (*n, Values::one(*v))).collect(),
        }
    }

    fn update(id: &str, object_type: &str, changes: Vec<AttributeChange>) -> TargetOperation {
        TargetOperation::Update {
            id: id.into(),
            object_type: object_type.into(),
            changes,
        }
    }

    fn delete(id: &str, object_type: &str) -> TargetOperation {
        TargetOperation::Delete {
            id: id.into(),
            object_type: object_type.into(),
        }
    }

    async fn one(t: &dyn Target, op: TargetOperation) -> Result<Applied, ConnectorError> {
        let mut out = t.apply(&[op]).await;
        assert_eq!(out.len(), 1);
        out.remove(0)
    }

    async fn id_of(t: &dyn Target, op: TargetOperation) -> TargetId {
        one(t, op).await.unwrap().id
    }

    fn kind(r: Result<Applied, ConnectorError>) -> ErrorKind {
        r.unwrap_err().kind()
    }

    #[tokio::test]
    async fn create_update_delete_round_trip() {
        let mem = MemoryTarget::new("scim");
        let t: Box<dyn Target> = Box::new(mem.clone());
        assert_eq!(t.name(), "scim");
        let caps = t.capabilities();
        assert!(caps.value_level_changes && caps.read);
        assert_eq!(caps.max_batch, 100);

        let a = id_of(&*t, create("User", &[("userName", "ada")])).await;
        let b = id_of(&*t, create("User", &[("userName", "bob")])).await;
        assert_eq!((a.as_str(), b.as_str()), ("t000001", "t000002"));
        let g = id_of(&*t, create("Group", &[("displayName", "staff")])).await;

        let add = AttributeChange::add("members", Values::one(Value::target_ref(a.clone())));
        one(&*t, update(g.as_str(), "Group", vec![add]))
            .await
            .unwrap();
        let got = t.get(&"Group".into(), &g).await.unwrap().unwrap();
        assert_eq!(
            got.attributes.first("members"),
            Some(&Value::target_ref(a.clone()))
        );
        assert_eq!(one(&*t, delete(b.as_str(), "User")).await.unwrap().id, b);
        assert_eq!(mem.len(), 2);
        assert!(mem.get_object(&b).is_none());
        assert_eq!(mem.applied().len(), 5);
        assert_eq!(mem.calls(), 5);
        let ids: Vec<String> = mem.objects().iter().map(|o| o.id.to_string()).collect();
        assert_eq!(ids, ["t000001", "t000003"]);
    }

    #[tokio::test]
    async fn fresh_ids_use_the_prefix_and_skip_seeded_ids() {
        let mem = MemoryTarget::new("graph").id_prefix("obj-");
        mem.insert(TargetObject::new("obj-000001", "user"));
        let t: Box<dyn Target> = Box::new(mem.clone());
        assert_eq!(id_of(&*t, create("user", &[])).await.as_str(), "obj-000002");
    }

    #[tokio::test]
    async fn missing_objects_and_type_mismatches_are_refused() {
        let mem = MemoryTarget::new("scim");
        let t: Box<dyn Target> = Box::new(mem.clone());
        let a = id_of(&*t, create("User", &[("userName", "ada")])).await;
        let r = one(&*t, update("nope", "User", vec![])).await;
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.object(), Some("nope"));
        assert_eq!(
            kind(one(&*t, delete("nope", "User")).await),
            ErrorKind::NotFound
        );
        let mismatch = update(
            a.as_str(),
            "Group",
            vec![AttributeChange::replace("x", values(["1"]))],
        );
        assert_eq!(kind(one(&*t, mismatch).await), ErrorKind::Constraint);
        assert_eq!(
            kind(one(&*t, delete(a.as_str(), "Group")).await),
            ErrorKind::Constraint
        );
        // Object types compare ignoring case.
        one(&*t, update(a.as_str(), "user", vec![])).await.unwrap();
        assert_eq!(mem.len(), 1);
        assert_eq!(mem.applied().len(), 2);
    }

    #[tokio::test]
    async fn updates_are_strict_and_all_or_nothing() {
        let mem = MemoryTarget::new("ldap");
        let t: Box<dyn Target> = Box::new(mem.clone());
        let g = id_of(
            &*t,
            create("group", &[("cn", "staff"), ("description", "x")]),
        )
        .await;
        let before = mem.get_object(&g).unwrap();

        let e = one(
            &*t,
            update(
                g.as_str(),
                "group",
                vec![AttributeChange::add("cn", values(["staff"]))],
            ),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueExists);
        assert!(e.message().contains("cn"), "{e}");
        let e = one(
            &*t,
            update(
                g.as_str(),
                "group",
                vec![AttributeChange::remove("cn", values(["nope"]))],
            ),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSuchValue);

        // The first change would succeed, the second fails: neither is applied.
        let changes = vec![
            AttributeChange::replace("description", values(["y"])),
            AttributeChange::add("mail", values(["a@x"])),
            AttributeChange::remove("cn", values(["other"])),
        ];
        assert_eq!(
            kind(one(&*t, update(g.as_str(), "group", changes)).await),
            ErrorKind::NoSuchValue
        );
        assert_eq!(mem.get_object(&g).unwrap(), before);
        assert_eq!(mem.applied().len(), 1);
    }

    #[tokio::test]
    async fn a_value_may_not_be_held_twice() {
        let mem = MemoryTarget::new("ldap");
        let t: Box<dyn Target> = Box::new(mem.clone());
        let twice = TargetOperation::Create {
            object_type: "group".into(),
            attributes: [("member", values(["a", "a"]))].into_iter().collect(),
        };
        assert_eq!(kind(one(&*t, twice).await), ErrorKind::ValueExists);
        assert!(mem.is_empty());
        let g = id_of(&*t, create("group", &[("cn", "g")])).await;
        let replace = update(
            g.as_str(),
            "group",
            vec![AttributeChange::replace("member", values(["b", "b"]))],
        );
        let e = one(&*t, replace).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueExists);
        assert_eq!(e.object(), Some(g.as_str()));
        assert!(mem
            .get_object(&g)
            .unwrap()
            .attributes
            .get("member")
            .is_none());
    }

    #[tokio::test]
    async fn unique_attributes_ignore_case_and_name_the_holder() {
        let mem = MemoryTarget::new("scim").unique_attribute("User", "userName");
        let t: Box<dyn Target> = Box::new(mem.clone());
        let a = id_of(&*t, create("User", &[("userName", "ada")])).await;
        let e = one(&*t, create("User", &[("userName", "ADA")]))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert_eq!(e.object(), Some(a.as_str()));
        assert!(
            e.message().contains("userName") && e.message().contains("t000001"),
            "{e}"
        );
        // Only within the constrained type.
        id_of(&*t, create("Group", &[("userName", "ada")])).await;
        // A failed create consumes no id.
        let b = id_of(&*t, create("User", &[("userName", "bob")])).await;
        assert_eq!(b.as_str(), "t000003");

        // An update may not take another object's value, but may keep or re-case its own.
        let take = update(
            b.as_str(),
            "User",
            vec![AttributeChange::replace("userName", values(["Ada"]))],
        );
        assert_eq!(kind(one(&*t, take).await), ErrorKind::AlreadyExists);
        let recase = update(
            a.as_str(),
            "User",
            vec![AttributeChange::replace("userName", values(["Ada"]))],
        );
        one(&*t, recase).await.unwrap();

        // Deleting the holder frees the value.
        one(&*t, delete(a.as_str(), "User")).await.unwrap();
        let free = update(
            b.as_str(),
            "User",
            vec![AttributeChange::replace("userName", values(["ada"]))],
        );
        one(&*t, free).await.unwrap();

        // Seeded objects count, and constraints added later index existing objects.
        let mem2 = MemoryTarget::new("graph");
        mem2.insert(TargetObject::new("x1", "user").with("userPrincipalName", "Ada@Example.com"));
        let mem2 = mem2.unique_attribute("user", "userPrincipalName");
        let r = one(
            &mem2,
            create("user", &[("userPrincipalName", "ada@example.com")]),
        )
        .await;
        assert_eq!(r.unwrap_err().object(), Some("x1"));
    }

    #[tokio::test]
    async fn id_attribute_makes_the_id_and_guards_it() {
        let mem = MemoryTarget::new("ldap").id_attribute("dn");
        let t: Box<dyn Target> = Box::new(mem.clone());
        let ada = "cn=Ada,ou=people,dc=example,dc=com";
        let id = id_of(&*t, create("person", &[("dn", ada), ("cn", "Ada")])).await;
        assert_eq!(id.as_str(), ada);
        let e = one(
            &*t,
            create("person", &[("dn", "CN=ADA,ou=people,dc=example,dc=com")]),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert_eq!(e.object(), Some(ada));
        assert_eq!(
            kind(one(&*t, create("person", &[("cn", "NoDn")])).await),
            ErrorKind::Constraint
        );
        let two = TargetOperation::Create {
            object_type: "person".into(),
            attributes: [("dn", values(["cn=a,dc=x", "cn=b,dc=x"]))]
                .into_iter()
                .collect(),
        };
        assert_eq!(kind(one(&*t, two).await), ErrorKind::Constraint);
        // The id attribute cannot change through an update; re-stating it is fine.
        let change = update(
            ada,
            "person",
            vec![AttributeChange::replace("dn", values(["cn=Eve,dc=x"]))],
        );
        assert_eq!(kind(one(&*t, change).await), ErrorKind::Constraint);
        let clear = update(
            ada,
            "person",
            vec![AttributeChange::replace("dn", Values::new())],
        );
        assert_eq!(kind(one(&*t, clear).await), ErrorKind::Constraint);
        let same = update(
            ada,
            "person",
            vec![AttributeChange::replace("dn", values([ada]))],
        );
        one(&*t, same).await.unwrap();
        assert_eq!(mem.len(), 1);
    }

    #[tokio::test]
    async fn references_must_be_resolved_and_vanish_with_their_object() {
        let mem = MemoryTarget::new("scim");
        let t: Box<dyn Target> = Box::new(mem.clone());
        let a = id_of(&*t, create("User", &[("userName", "ada")])).await;
        let unresolved = TargetOperation::Create {
            object_type: "Group".into(),
            attributes: [("members", Values::one(Value::anchor_ref("src-1")))]
                .into_iter()
                .collect(),
        };
        let e = one(&*t, unresolved).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Constraint);
        assert!(e.message().contains("unresolved reference"), "{e}");
        let dangling = TargetOperation::Create {
            object_type: "Group".into(),
            attributes: [("members", Values::one(Value::target_ref("t999999")))]
                .into_iter()
                .collect(),
        };
        assert_eq!(kind(one(&*t, dangling).await), ErrorKind::Constraint);

        let members = values([Value::target_ref(a.clone())]);
        let g = id_of(
            &*t,
            TargetOperation::Create {
                object_type: "Group".into(),
                attributes: [("members", members), ("displayName", Values::one("staff"))]
                    .into_iter()
                    .collect(),
            },
        )
        .await;
        let add_dangling = update(
            g.as_str(),
            "Group",
            vec![AttributeChange::add(
                "members",
                values([Value::target_ref("t999999")]),
            )],
        );
        assert_eq!(kind(one(&*t, add_dangling).await), ErrorKind::Constraint);

        one(&*t, delete(a.as_str(), "User")).await.unwrap();
        let group = mem.get_object(&g).unwrap();
        assert!(group.attributes.get("members").is_none());
        assert_eq!(group.attributes.first_str("displayName"), Some("staff"));
    }

    #[tokio::test]
    async fn one_outcome_per_operation_in_order_when_some_fail() {
        let mem = MemoryTarget::new("scim").unique_attribute("User", "userName");
        let t: Box<dyn Target> = Box::new(mem.clone());
        let ops = vec![
            create("User", &[("userName", "ada")]),
            update("missing", "User", vec![]),
            create("User", &[("userName", "ada")]),
            create("User", &[("userName", "bob")]),
            delete("t000001", "User"),
            delete("t000001", "User"),
        ];
        let out = t.apply(&ops).await;
        assert_eq!(out.len(), ops.len());
        assert_eq!(out[0].as_ref().unwrap().id.as_str(), "t000001");
        assert_eq!(out[1].as_ref().unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(
            out[2].as_ref().unwrap_err().kind(),
            ErrorKind::AlreadyExists
        );
        assert_eq!(out[3].as_ref().unwrap().id.as_str(), "t000002");
        assert!(out[4].is_ok());
        assert_eq!(out[5].as_ref().unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(
            mem.applied(),
            vec![ops[0].clone(), ops[3].clone(), ops[4].clone()]
        );
        assert_eq!(mem.calls(), 1);
        assert!(t.apply(&[]).await.is_empty());
        assert_eq!(mem.calls(), 2);
    }

    #[tokio::test]
    async fn fail_when_fails_chosen_operations_without_applying_them() {
        let mem = MemoryTarget::new("scim");
        let t: Box<dyn Target> = Box::new(mem.clone());
        let is_create = |op: &TargetOperation| matches!(op, TargetOperation::Create { .. });
        mem.fail_when(is_create, ErrorKind::Unavailable, Some(2));
        let ops = vec![
            create("User", &[]),
            create("User", &[]),
            create("User", &[]),
        ];
        let out = t.apply(&ops).await;
        assert_eq!(out[0].as_ref().unwrap_err().kind(), ErrorKind::Unavailable);
        assert_eq!(out[1].as_ref().unwrap_err().kind(), ErrorKind::Unavailable);
        assert_eq!(out[2].as_ref().unwrap().id.as_str(), "t000001");
        assert_eq!(mem.len(), 1);

        mem.fail_when(
            |op| matches!(op, TargetOperation::Delete { .. }),
            ErrorKind::Auth,
            None,
        );
        for _ in 0..3 {
            assert_eq!(
                kind(one(&*t, delete("t000001", "User")).await),
                ErrorKind::Auth
            );
        }
        assert_eq!(mem.len(), 1);
        mem.clear_faults();
        one(&*t, delete("t000001", "User")).await.unwrap();
        assert!(mem.is_empty());

        // Some(0) never fires; a predicate may inspect the target without deadlock.
        mem.fail_when(|_| true, ErrorKind::Other, Some(0));
        let probe = mem.clone();
        mem.fail_when(move |_| !probe.is_empty(), ErrorKind::Constraint, None);
        one(&*t, create("User", &[])).await.unwrap();
        assert_eq!(
            kind(one(&*t, create("User", &[])).await),
            ErrorKind::Constraint
        );
    }

    #[tokio::test]
    async fn throttle_every_nth_operation() {
        let mem = MemoryTarget::new("graph");
        let t: Box<dyn Target> = Box::new(mem.clone());
        mem.throttle_every(3, Duration::from_secs(7));
        let ops: Vec<TargetOperation> = (0..7).map(|_| create("user", &[])).collect();
        let out = t.apply(&ops).await;
        let throttled: Vec<usize> = out
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_err())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(throttled, [2, 5]);
        let e = out[2].as_ref().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Throttled);
        assert!(e.is_retryable());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(mem.len(), 5);
        assert_eq!(mem.applied().len(), 5);
        mem.throttle_every(0, Duration::ZERO);
        assert!(t.apply(&ops).await.iter().all(Result::is_ok));
    }

    #[tokio::test]
    async fn fail_after_apply_commits_but_reports_an_error() {
        let mem = MemoryTarget::new("scim");
        let t: Box<dyn Target> = Box::new(mem.clone());
        mem.fail_after_apply_when(
            |op| match op {
                TargetOperation::Create { attributes, .. } => {
                    attributes.first_str("userName") == Some("ada")
                }
                _ => false,
            },
            ErrorKind::Timeout,
        );
        let e = one(&*t, create("User", &[("userName", "ada")]))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert_eq!(e.object(), Some("t000001"));
        // The object exists: recovery finds it by a join lookup instead of creating it again.
        let found = t
            .find(&"User".into(), &"USERNAME".into(), &Value::string("ADA"))
            .await
            .unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id.as_str(), "t000001");
        assert_eq!(mem.applied().len(), 1);
        // Other operations are unaffected.
        one(&*t, create("User", &[("userName", "bob")]))
            .await
            .unwrap();
        mem.clear_faults();
        one(&*t, create("User", &[("userName", "ada")]))
            .await
            .unwrap();
        assert_eq!(mem.len(), 3);
    }

    #[tokio::test]
    async fn replace_only_targets_and_batch_limits() {
        let mem = MemoryTarget::new("old-scim")
            .value_level_changes(false)
            .max_batch(2);
        let t: Box<dyn Target> = Box::new(mem.clone());
        let caps = t.capabilities();
        assert!(!caps.value_level_changes);
        assert_eq!(caps.max_batch, 2);
        let a = id_of(&*t, create("Group", &[("displayName", "g")])).await;
        let add = update(
            a.as_str(),
            "Group",
            vec![AttributeChange::add("x", values(["1"]))],
        );
        assert_eq!(kind(one(&*t, add).await), ErrorKind::Unsupported);
        let replace = update(
            a.as_str(),
            "Group",
            vec![AttributeChange::replace("x", values(["1"]))],
        );
        one(&*t, replace).await.unwrap();

        let ops: Vec<TargetOperation> = (0..3).map(|_| create("Group", &[])).collect();
        let out = t.apply(&ops).await;
        assert_eq!(out.len(), 3);
        assert!(out
            .iter()
            .all(|r| r.as_ref().unwrap_err().kind() == ErrorKind::Unsupported));
        assert_eq!(mem.len(), 1);
    }

    #[tokio::test]
    async fn reads_filter_by_type_in_id_order() {
        let mem = MemoryTarget::new("scim");
        mem.insert(TargetObject::new("u2", "User").with("userName", "Bob"));
        mem.insert(TargetObject::new("u1", "User").with("userName", "Ada"));
        mem.insert(TargetObject::new("g1", "Group").with("userName", "ada"));
        let t: Box<dyn Target> = Box::new(mem.clone());
        let users: Vec<TargetObject> = t
            .read(&"user".into())
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let ids: Vec<&str> = users.iter().map(|o| o.id.as_str()).collect();
        assert_eq!(ids, ["u1", "u2"]);
        assert!(t
            .get(&"Group".into(), &"u1".into())
            .await
            .unwrap()
            .is_none());
        assert!(t.get(&"User".into(), &"u1".into()).await.unwrap().is_some());
        let found = t
            .find(&"User".into(), &"username".into(), &Value::string("ADA"))
            .await
            .unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id.as_str(), "u1");
        assert!(t
            .find(&"User".into(), &"mail".into(), &Value::string("ada"))
            .await
            .unwrap()
            .is_empty());
        // insert replaces and returns the object it replaced.
        let old = mem.insert(TargetObject::new("u1", "User"));
        assert_eq!(old.unwrap().attributes.first_str("userName"), Some("Ada"));
    }

    #[tokio::test]
    async fn apply_runs_on_another_task_while_the_test_keeps_a_handle() {
        let mem = MemoryTarget::default();
        let t: Box<dyn Target> = Box::new(mem.clone());
        let task = tokio::spawn(async move { t.apply(&[create("user", &[])]).await.len() });
        assert_eq!(task.await.unwrap(), 1);
        assert_eq!(mem.len(), 1);
        assert!(format!("{mem:?}").contains("objects: 1"));
    }

    /// An operation a property test applies: ids and values from small ranges so that they
    /// collide often.
    fn operation() -> impl proptest::strategy::Strategy<Value = TargetOperation> {
        use proptest::prelude::*;
        let id = (1..6u8).prop_map(|n| format!("t{n:06}"));
        let name = prop_oneof![Just("ada"), Just("ADA"), Just("bob"), Just("cy")];
        let value = prop_oneof![
            name.clone().prop_map(|n| ("userName", Value::string(n))),
            id.clone()
                .prop_map(|i| ("member", Value::target_ref(i.as_str()))),
            Just(("member", Value::anchor_ref("src"))),
        ];
        let change = (0..3u8, value.clone()).prop_map(|(op, (attr, v))| match op {
            0 => AttributeChange::add(attr, Values::one(v)),
            1 => AttributeChange::remove(attr, Values::one(v)),
            _ => AttributeChange::replace(attr, Values::one(v)),
        });
        let ty = prop_oneof![Just("User"), Just("Group")];
        prop_oneof![
            (ty.clone(), proptest::collection::vec(value, 0..3)).prop_map(|(ty, vals)| {
                TargetOperation::Create {
                    object_type: ty.into(),
                    attributes: vals.into_iter().map(|(a, v)| (a, Values::one(v))).collect(),
                }
            }),
            (
                id.clone(),
                ty.clone(),
                proptest::collection::vec(change, 0..3)
            )
                .prop_map(|(id, ty, changes)| TargetOperation::Update {
                    id: id.as_str().into(),
                    object_type: ty.into(),
                    changes,
                }),
            (id, ty).prop_map(|(id, ty)| TargetOperation::Delete {
                id: id.as_str().into(),
                object_type: ty.into(),
            }),
        ]
    }

    proptest::proptest! {
        /// Each operation takes effect entirely or not at all, and the target's constraints
        /// (unique userName among users, no dangling references) always hold.
        #[test]
        fn operations_are_atomic_and_constraints_always_hold(
            ops in proptest::collection::vec(operation(), 1..40),
            batch in 1..5usize,
        ) {
            let mem = MemoryTarget::new("p").unique_attribute("User", "userName");
            for chunk in ops.chunks(batch) {
                for op in chunk {
                    let before = mem.objects();
                    let applied = mem.applied().len();
                    let out = futures::executor::block_on(mem.apply(std::slice::from_ref(op)));
                    proptest::prop_assert_eq!(out.len(), 1);
                    match &out[0] {
                        Ok(a) => {
                            proptest::prop_assert_eq!(mem.applied().len(), applied + 1);
                            let deleted = matches!(op, TargetOperation::Delete { .. });
                            proptest::prop_assert_eq!(mem.get_object(&a.id).is_some(), !deleted);
                        }
                        Err(_) => {
                            proptest::prop_assert_eq!(&mem.objects(), &before);
                            proptest::prop_assert_eq!(mem.applied().len(), applied);
                        }
                    }
                    let objects = mem.objects();
                    let mut names = std::collections::HashSet::new();
                    for o in &objects {
                        for v in o.attributes.iter().flat_map(|(_, vs)| vs.iter()) {
                            if let Value::Reference(r) = v {
                                let Reference::Target(t) = r else {
                                    proptest::prop_assert!(false, "unresolved reference kept: {:?}", r);
                                    continue;
                                };
                                proptest::prop_assert!(mem.get_object(t).is_some(), "dangling {}", t);
                            }
                        }
                        if o.object_type == "User" {
                            let own: std::collections::HashSet<String> = o
                                .attributes
                                .get("userName")
                                .into_iter()
                                .flatten()
                                .map(|n| n.to_text().to_lowercase())
                                .collect();
                            for n in own {
                                proptest::prop_assert!(names.insert(n.clone()), "duplicate userName {}", n);
                            }
                        }
                        for (name, vs) in o.attributes.iter() {
                            let distinct: std::collections::HashSet<&Value> = vs.iter().collect();
                            proptest::prop_assert_eq!(distinct.len(), vs.len(), "{} repeats a value", name);
                        }
                    }
                }
            }
        }
    }
}
