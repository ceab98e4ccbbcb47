//! [`LdifTarget`]: a directory kept in one LDIF file, held in memory and rewritten atomically
//! after every apply.
//!
//! It reads its file once (at [`LdifTarget::open`]) and writes it only through
//! [`write_atomically`]: a temporary file in the same directory, flushed to disk, renamed over
//! the real file, then the directory flushed. It never leaves the real file half-written.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::map::{RefForm, Schema};
use super::write::valid_description;
use super::{LdifError, LdifReader, LdifWriter};
use crate::connector::dirnames::{
    add_naming_values, constraint, create_dn, id_of, ObjectTypeNaming, Placement,
};
use crate::connector::{
    Applied, ConnectorError, ErrorKind, Target, TargetCapabilities, TargetOperation,
};
use crate::model::{
    ApplyError, AttrName, Attributes, Dn, ObjectType, Rdn, Reference, TargetId, TargetObject,
    Value, Values,
};

/// Where objects of one type are created and how they are named (shared with the LDAP
/// target).
pub type LdifObjectTypeConfig = ObjectTypeNaming;

/// How an [`LdifTarget`] names, types and reads its objects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LdifTargetConfig {
    /// Per object type: the naming attribute and parent DN of created objects.
    pub object_types: BTreeMap<ObjectType, LdifObjectTypeConfig>,
    /// `objectClass` value → object type, as for [`LdifSourceConfig`](super::LdifSourceConfig):
    /// the last class of an object that the map names gives its type. Objects of the file that
    /// map to no type are kept (and written back) but are not read, found or changed.
    pub object_type_map: BTreeMap<AttrName, ObjectType>,
    /// Attributes whose values are DNs: read from the file as references to the target object
    /// of that DN ([`Reference::Target`] with the normalized DN as id), written as the DN.
    pub reference_attributes: Vec<AttrName>,
    /// Attributes whose values are always bytes.
    pub binary_attributes: Vec<AttrName>,
    /// The most operations one apply call should carry (each call rewrites the file once).
    pub max_batch: usize,
}

impl Default for LdifTargetConfig {
    fn default() -> Self {
        LdifTargetConfig {
            object_types: BTreeMap::new(),
            object_type_map: super::default_object_type_map(),
            reference_attributes: super::default_reference_attributes(),
            binary_attributes: super::default_binary_attributes(),
            max_batch: 500,
        }
    }
}

impl LdifTargetConfig {
    /// Adds the settings of `object_type` (builder style).
    pub fn with_object_type(
        mut self,
        object_type: impl Into<ObjectType>,
        rdn_attribute: impl Into<AttrName>,
        parent: Dn,
        object_classes: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.object_types.insert(
            object_type.into(),
            LdifObjectTypeConfig::new(rdn_attribute, parent, object_classes),
        );
        self
    }

    fn schema(&self) -> Schema<'_> {
        Schema {
            object_type_map: &self.object_type_map,
            references: &self.reference_attributes,
            binary: &self.binary_attributes,
        }
    }
}

/// One object of the file.
#[derive(Debug, Clone, PartialEq)]
struct Stored {
    dn: Dn,
    /// `None` for objects no type maps to (containers, …): kept, never served.
    object_type: Option<ObjectType>,
    attributes: Attributes,
}

impl Stored {
    fn to_target_object(&self) -> Option<TargetObject> {
        Some(TargetObject {
            id: id_of(&self.dn),
            object_type: self.object_type.clone()?,
            attributes: self.attributes.clone(),
        })
    }
}

type Objects = BTreeMap<Dn, Stored>;

/// A target directory kept in an LDIF file of content records.
///
/// Objects live in memory; every [`apply`](Target::apply) call that changes something rewrites
/// the whole file atomically (a `<file>.tmp` beside it, fsync, rename, fsync of the directory).
/// When the rewrite fails, none of the call's operations take effect, in memory or on disk, and
/// each reports the write error. A crash at any point leaves either the old or the new file; a
/// stale `<file>.tmp` is ignored and overwritten.
///
/// Directory semantics:
///
/// * target ids are DNs, in normalized form ([`Dn::normalized`]);
/// * a create's DN is its `dn` attribute when it carries one (not stored as an attribute), else
///   the first value of the type's [`rdn_attribute`](LdifObjectTypeConfig::rdn_attribute) under
///   its [`parent`](LdifObjectTypeConfig::parent); the naming values are added to the object
///   when missing; an existing DN is [`ErrorKind::AlreadyExists`]; parents need not exist;
/// * the object's `objectClass` values must map to the operation's type
///   ([`ErrorKind::Constraint`] otherwise), so that the file reads back the same;
/// * updates apply their changes strictly and all or nothing (adding a present value is
///   [`ErrorKind::ValueExists`], removing an absent one [`ErrorKind::NoSuchValue`]); changing
///   the naming attribute's value, or replacing `dn`, renames the object (the outcome carries the
///   new id); objects with objects below them cannot be renamed or deleted
///   ([`ErrorKind::Constraint`]);
/// * updates and deletes of a missing id are [`ErrorKind::NotFound`], of an object of another
///   type [`ErrorKind::Constraint`];
/// * reference values are stored as [`Reference::Target`] ids and written as the DN of the
///   object (its spelling as stored); references by anchor are refused
///   ([`ErrorKind::Constraint`]). References are not rewritten when their object is renamed or
///   deleted (the engine updates memberships itself).
///
/// The file lists objects parents first (ordered by their RDNs from the root down), so output
/// is deterministic and loads into a directory server as it is.
pub struct LdifTarget {
    name: String,
    path: PathBuf,
    config: LdifTargetConfig,
    objects: Mutex<Objects>,
    rewrites: std::sync::atomic::AtomicU64,
}

impl LdifTarget {
    /// Opens the directory kept at `path`, loading the file when it exists (it must hold content
    /// records). A missing file is an empty directory; it is created by the first apply.
    pub fn open(
        path: impl Into<PathBuf>,
        config: LdifTargetConfig,
    ) -> Result<LdifTarget, ConnectorError> {
        let path = path.into();
        let objects = match File::open(&path) {
            Ok(f) => load(&path, BufReader::new(f), &config)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Objects::new(),
            Err(e) => {
                return Err(ConnectorError::new(
                    ErrorKind::Other,
                    format!("cannot open the LDIF target file {}: {e}", path.display()),
                )
                .with_source(e))
            }
        };
        Ok(LdifTarget {
            name: "ldif".to_owned(),
            path,
            config,
            objects: Mutex::new(objects),
            rewrites: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// How many times [`apply`](Target::apply) has rewritten the file since it was opened:
    /// once per call that changed something, however many operations the call carried.
    pub fn rewrites(&self) -> u64 {
        self.rewrites.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets the name used in logs and errors (default `"ldif"`).
    pub fn with_name(mut self, name: impl Into<String>) -> LdifTarget {
        self.name = name.into();
        self
    }

    /// The file the directory is kept in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The number of objects in the directory (untyped ones included).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the directory holds no objects.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The directory as the LDIF text [`apply`](Target::apply) writes.
    pub fn to_ldif(&self) -> Result<Vec<u8>, ConnectorError> {
        render(&self.lock())
            .map_err(|e| ConnectorError::new(ErrorKind::Other, format!("cannot render LDIF: {e}")))
    }

    fn lock(&self) -> MutexGuard<'_, Objects> {
        self.objects.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn apply_one(
        &self,
        objects: &mut Objects,
        op: &TargetOperation,
    ) -> Result<Applied, ConnectorError> {
        match op {
            TargetOperation::Create {
                object_type,
                attributes,
            } => self.create(objects, object_type, attributes),
            TargetOperation::Update {
                id,
                object_type,
                changes,
            } => {
                let (dn, stored) = find_typed(objects, id, object_type)?;
                let mut attrs = stored.attributes.clone();
                let (placement, changes) = Placement::split(changes, &dn)?;
                for c in changes {
                    check_name(&c.attribute, &dn)?;
                    let mut c = c.clone();
                    c.values = self.normalize_values(&c.attribute, &c.values, &dn)?;
                    attrs.apply(&c, true).map_err(|e| {
                        let kind = match e {
                            ApplyError::ValueExists { .. } => ErrorKind::ValueExists,
                            ApplyError::NoSuchValue { .. } => ErrorKind::NoSuchValue,
                        };
                        ConnectorError::new(kind, e.to_string()).with_object(&dn)
                    })?;
                }
                let new_dn = placement.new_dn(&dn, &attrs)?;
                add_naming_values(&mut attrs, &new_dn);
                self.check_type(&attrs, object_type, &new_dn)?;
                if new_dn != dn {
                    if objects.contains_key(&new_dn) {
                        return Err(ConnectorError::new(
                            ErrorKind::AlreadyExists,
                            format!("cannot rename {dn} to {new_dn}: an object has that DN"),
                        )
                        .with_object(&new_dn));
                    }
                    no_children(objects, &dn, "renamed")?;
                    objects.remove(&dn);
                }
                let id = id_of(&new_dn);
                objects.insert(
                    new_dn.clone(),
                    Stored {
                        dn: new_dn,
                        object_type: Some(object_type.clone()),
                        attributes: attrs,
                    },
                );
                Ok(Applied { id })
            }
            TargetOperation::Delete { id, object_type } => {
                let (dn, _) = find_typed(objects, id, object_type)?;
                no_children(objects, &dn, "deleted")?;
                objects.remove(&dn);
                Ok(Applied { id: id.clone() })
            }
        }
    }

    fn create(
        &self,
        objects: &mut Objects,
        object_type: &ObjectType,
        attributes: &Attributes,
    ) -> Result<Applied, ConnectorError> {
        let mut attrs = attributes.clone();
        let settings = self.config.object_types.get(object_type);
        let dn = create_dn("LDIF", settings, object_type, &mut attrs)?;
        let mut normalized = Attributes::with_capacity(attrs.len());
        for (name, values) in attrs.iter() {
            check_name(name, &dn)?;
            normalized.set(name.clone(), self.normalize_values(name, values, &dn)?);
        }
        let mut attrs = normalized;
        add_naming_values(&mut attrs, &dn);
        if !attrs.contains("objectClass") {
            if let Some(s) = settings {
                attrs.set(
                    "objectClass",
                    s.object_classes
                        .iter()
                        .map(|c| Value::string(c.as_str()))
                        .collect::<Values>(),
                );
            }
        }
        self.check_type(&attrs, object_type, &dn)?;
        if objects.contains_key(&dn) {
            return Err(ConnectorError::new(
                ErrorKind::AlreadyExists,
                format!("an object {dn} exists already"),
            )
            .with_object(id_of(&dn)));
        }
        let id = id_of(&dn);
        objects.insert(
            dn.clone(),
            Stored {
                dn,
                object_type: Some(object_type.clone()),
                attributes: attrs,
            },
        );
        Ok(Applied { id })
    }

    /// Values as the file reads them back: binary attributes as bytes, references as target ids.
    fn normalize_values(
        &self,
        attribute: &AttrName,
        values: &Values,
        dn: &Dn,
    ) -> Result<Values, ConnectorError> {
        let schema = self.config.schema();
        values
            .iter()
            .map(|v| {
                let v = match v {
                    Value::Reference(Reference::Dn(d)) => Value::target_ref(d.normalized()),
                    Value::Reference(Reference::Target(t)) => match Dn::parse(t.as_str()) {
                        Ok(d) => Value::target_ref(d.normalized()),
                        Err(_) => {
                            return Err(constraint(
                                &format!("attribute {attribute}: the reference {t} is not a DN"),
                                dn,
                            ))
                        }
                    },
                    Value::Reference(r) => {
                        return Err(constraint(
                            &format!("attribute {attribute}: the reference {r} is not a target id"),
                            dn,
                        ))
                    }
                    other => other.clone(),
                };
                if matches!(v, Value::Reference(_)) {
                    return Ok(v);
                }
                schema
                    .convert_value(attribute, v, 0, dn, RefForm::Target)
                    .map_err(|e| constraint(&e.message, dn))
            })
            .collect()
    }

    fn check_type(
        &self,
        attrs: &Attributes,
        object_type: &ObjectType,
        dn: &Dn,
    ) -> Result<(), ConnectorError> {
        self.config.schema().check_type(attrs, object_type, dn)
    }
}

fn check_name(name: &AttrName, dn: &Dn) -> Result<(), ConnectorError> {
    if valid_description(name.as_str()) {
        Ok(())
    } else {
        Err(constraint(
            &format!(
                "{:?} is not an attribute name LDIF can carry",
                name.as_str()
            ),
            dn,
        ))
    }
}

/// The object `id` of `object_type`.
fn find_typed<'o>(
    objects: &'o Objects,
    id: &TargetId,
    object_type: &ObjectType,
) -> Result<(Dn, &'o Stored), ConnectorError> {
    let not_found =
        || ConnectorError::new(ErrorKind::NotFound, format!("no object {id}")).with_object(id);
    let dn = Dn::parse(id.as_str()).map_err(|_| not_found())?;
    let stored = objects.get(&dn).ok_or_else(not_found)?;
    if stored.object_type.as_ref() != Some(object_type) {
        return Err(ConnectorError::new(
            ErrorKind::Constraint,
            format!(
                "the object {id} is a {}, not a {object_type}",
                stored
                    .object_type
                    .as_ref()
                    .map_or("object of no mapped type".to_owned(), |t| t.to_string())
            ),
        )
        .with_object(id));
    }
    Ok((stored.dn.clone(), stored))
}

fn no_children(objects: &Objects, dn: &Dn, what: &str) -> Result<(), ConnectorError> {
    match objects.keys().find(|k| k.is_descendant_of(dn)) {
        Some(child) => Err(constraint(
            &format!("{dn} has objects below it ({child}) and cannot be {what}"),
            dn,
        )),
        None => Ok(()),
    }
}

/// Reads a file of content records.
fn load(
    path: &Path,
    input: impl std::io::BufRead,
    config: &LdifTargetConfig,
) -> Result<Objects, ConnectorError> {
    let err = |e: LdifError| {
        ConnectorError::new(ErrorKind::Protocol, format!("{}: {e}", path.display())).with_source(e)
    };
    let schema = config.schema();
    let mut objects = Objects::new();
    for record in LdifReader::new(input) {
        let record = record.map_err(err)?;
        if record.is_change() {
            return Err(err(LdifError::new(
                record.line,
                "the LDIF target file holds change records; it must hold content records",
            )));
        }
        if objects.contains_key(&record.dn) {
            return Err(err(LdifError::new(
                record.line,
                format!("a second entry {}", record.dn),
            )));
        }
        let mut attributes = Attributes::new();
        if let super::LdifBody::Content(values) = &record.body {
            for v in values {
                attributes.add(
                    v.attribute.clone(),
                    schema
                        .convert(v, &record.dn, RefForm::Target)
                        .map_err(err)?,
                );
            }
        }
        let classes = attributes.get("objectClass").map(|v| &v[..]).unwrap_or(&[]);
        let object_type = schema.object_type(classes.iter());
        objects.insert(
            record.dn.clone(),
            Stored {
                dn: record.dn,
                object_type,
                attributes,
            },
        );
    }
    Ok(objects)
}

/// The file's text: objects parents first, references written as DNs.
fn render(objects: &Objects) -> std::io::Result<Vec<u8>> {
    let mut order: Vec<(Vec<String>, &Stored)> = objects
        .values()
        .map(|s| (s.dn.rdns().iter().rev().map(Rdn::normalized).collect(), s))
        .collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    let mut w = LdifWriter::new(Vec::new());
    for (_, s) in order {
        let mut attrs = Attributes::with_capacity(s.attributes.len());
        for (name, values) in s.attributes.iter() {
            let written: Values = values
                .iter()
                .map(|v| match v {
                    Value::Reference(Reference::Target(t)) => {
                        let spelled = Dn::parse(t.as_str())
                            .ok()
                            .and_then(|d| objects.get(&d))
                            .map_or_else(|| t.as_str().to_owned(), |o| o.dn.as_str().to_owned());
                        Value::string(spelled)
                    }
                    other => other.clone(),
                })
                .collect();
            attrs.set(name.clone(), written);
        }
        w.write_entry(&s.dn, &attrs)?;
    }
    w.finish()
}

/// Replaces the file at `path` with `bytes` so that a crash leaves the old file or the new one:
/// writes `<path>.tmp` in the same directory, flushes it to disk, renames it over `path`, and
/// flushes the directory.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let file_name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file")
    })?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[async_trait]
impl Target for LdifTarget {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> TargetCapabilities {
        TargetCapabilities {
            value_level_changes: true,
            max_batch: self.config.max_batch.max(1),
            read: true,
            // Held in memory: any number of values in one pass.
            lookup_batch: 1000,
            ..TargetCapabilities::default()
        }
    }

    async fn read(
        &self,
        object_type: &ObjectType,
    ) -> Result<BoxStream<'_, Result<TargetObject, ConnectorError>>, ConnectorError> {
        let list: Vec<Result<TargetObject, ConnectorError>> = self
            .lock()
            .values()
            .filter(|s| s.object_type.as_ref() == Some(object_type))
            .filter_map(Stored::to_target_object)
            .map(Ok)
            .collect();
        Ok(futures::stream::iter(list).boxed())
    }

    async fn get(
        &self,
        object_type: &ObjectType,
        id: &TargetId,
    ) -> Result<Option<TargetObject>, ConnectorError> {
        let Ok(dn) = Dn::parse(id.as_str()) else {
            return Ok(None);
        };
        Ok(self
            .lock()
            .get(&dn)
            .filter(|s| s.object_type.as_ref() == Some(object_type))
            .and_then(Stored::to_target_object))
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

    /// One pass over the file's objects for every value.
    async fn find_any(
        &self,
        object_type: &ObjectType,
        attribute: &AttrName,
        values: &[Value],
    ) -> Result<Vec<TargetObject>, ConnectorError> {
        let wanted: Vec<Value> = values
            .iter()
            .map(|value| match value {
                Value::Reference(Reference::Dn(d)) => Value::target_ref(d.normalized()),
                Value::Reference(Reference::Target(t)) => match Dn::parse(t.as_str()) {
                    Ok(d) => Value::target_ref(d.normalized()),
                    Err(_) => value.clone(),
                },
                other => other.clone(),
            })
            .collect();
        Ok(self
            .lock()
            .values()
            .filter(|s| s.object_type.as_ref() == Some(object_type))
            .filter(|s| {
                s.attributes.get(attribute.as_str()).is_some_and(|vs| {
                    vs.iter()
                        .any(|v| wanted.iter().any(|w| v.eq_ignore_case(w)))
                })
            })
            .filter_map(Stored::to_target_object)
            .collect())
    }

    async fn apply(&self, operations: &[TargetOperation]) -> Vec<Result<Applied, ConnectorError>> {
        let mut current = self.lock();
        let mut next = current.clone();
        let mut outcomes: Vec<Result<Applied, ConnectorError>> = operations
            .iter()
            .map(|op| self.apply_one(&mut next, op))
            .collect();
        if !outcomes.iter().any(Result::is_ok) {
            return outcomes;
        }
        let written = render(&next).and_then(|bytes| write_atomically(&self.path, &bytes));
        match written {
            Ok(()) => {
                *current = next;
                self.rewrites
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                let message = format!(
                    "could not rewrite the LDIF target file {}: {e}; the operations of this call \
                     were not applied",
                    self.path.display()
                );
                for o in outcomes.iter_mut().filter(|o| o.is_ok()) {
                    *o = Err(ConnectorError::new(ErrorKind::Other, message.clone()));
                }
            }
        }
        outcomes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{values, AttributeChange};

    fn dn(s: &str) -> Dn {
        Dn::parse(s).unwrap()
    }

    fn config() -> LdifTargetConfig {
        LdifTargetConfig::default()
            .with_object_type(
                "user",
                "cn",
                dn("ou=People,dc=example,dc=com"),
                ["top", "person", "organizationalPerson", "inetOrgPerson"],
            )
            .with_object_type(
                "group",
                "cn",
                dn("ou=Groups,dc=example,dc=com"),
                ["top", "groupOfNames"],
            )
    }

    fn user(cn: &str) -> TargetOperation {
        TargetOperation::Create {
            object_type: "user".into(),
            attributes: [("cn", values([cn])), ("sn", values(["X"]))]
                .into_iter()
                .collect(),
        }
    }

    fn update(id: &TargetId, changes: Vec<AttributeChange>) -> TargetOperation {
        TargetOperation::Update {
            id: id.clone(),
            object_type: "user".into(),
            changes,
        }
    }

    async fn one(t: &LdifTarget, op: TargetOperation) -> Result<Applied, ConnectorError> {
        t.apply(&[op]).await.remove(0)
    }

    fn file(t: &LdifTarget) -> String {
        std::fs::read_to_string(t.path()).unwrap()
    }

    #[tokio::test]
    async fn a_batch_is_one_rewrite_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dir.ldif");
        let t = LdifTarget::open(&path, config()).unwrap();
        // 300 creates, one of them a duplicate DN, in one call: one rewrite.
        let mut ops: Vec<TargetOperation> = (0..300).map(|i| user(&format!("U{i}"))).collect();
        ops.push(user("U7"));
        let out = t.apply(&ops).await;
        assert_eq!(
            out[300].as_ref().unwrap_err().kind(),
            ErrorKind::AlreadyExists
        );
        assert!(out[..300].iter().all(Result::is_ok));
        assert_eq!(t.rewrites(), 1);
        assert_eq!(file(&t).matches("\ndn: ").count(), 300);
        // Updates of 100 and deletes of 100 in another call: one more rewrite.
        let ids: Vec<TargetId> = out[..300]
            .iter()
            .map(|r| r.as_ref().unwrap().id.clone())
            .collect();
        let mut ops: Vec<TargetOperation> = ids[..100]
            .iter()
            .map(|id| update(id, vec![AttributeChange::replace("sn", values(["Batch"]))]))
            .collect();
        ops.extend(ids[100..200].iter().map(|id| TargetOperation::Delete {
            id: id.clone(),
            object_type: "user".into(),
        }));
        assert!(t.apply(&ops).await.iter().all(Result::is_ok));
        assert_eq!(t.rewrites(), 2);
        assert_eq!(file(&t).matches("sn: Batch").count(), 100);
        // A call whose operations all fail writes nothing; one by one, a rewrite per call.
        assert!(t.apply(&[user("U0")]).await[0].is_err());
        assert_eq!(t.rewrites(), 2);
        for i in 0..5 {
            one(&t, user(&format!("V{i}"))).await.unwrap();
        }
        assert_eq!(t.rewrites(), 7);
        let reopened = LdifTarget::open(&path, config()).unwrap();
        assert_eq!(reopened.len(), t.len());
    }

    /// An `LdifTarget` the engine can own while the test keeps a handle on it.
    struct Shared(std::sync::Arc<LdifTarget>);

    #[async_trait]
    impl Target for Shared {
        fn name(&self) -> &str {
            self.0.name()
        }
        fn capabilities(&self) -> TargetCapabilities {
            self.0.capabilities()
        }
        async fn read(
            &self,
            object_type: &ObjectType,
        ) -> Result<BoxStream<'_, Result<TargetObject, ConnectorError>>, ConnectorError> {
            self.0.read(object_type).await
        }
        async fn get(
            &self,
            object_type: &ObjectType,
            id: &TargetId,
        ) -> Result<Option<TargetObject>, ConnectorError> {
            self.0.get(object_type, id).await
        }
        async fn find(
            &self,
            object_type: &ObjectType,
            attribute: &AttrName,
            value: &Value,
        ) -> Result<Vec<TargetObject>, ConnectorError> {
            self.0.find(object_type, attribute, value).await
        }
        async fn find_any(
            &self,
            object_type: &ObjectType,
            attribute: &AttrName,
            values: &[Value],
        ) -> Result<Vec<TargetObject>, ConnectorError> {
            self.0.find_any(object_type, attribute, values).await
        }
        async fn apply(
            &self,
            operations: &[TargetOperation],
        ) -> Vec<Result<Applied, ConnectorError>> {
            self.0.apply(operations).await
        }
    }

    /// Through the engine: an initial load of 1,200 users and 12 groups of 100 members is a few
    /// rewrites of the file (500 operations per call), not one per object.
    #[tokio::test]
    async fn an_initial_load_through_the_engine_is_a_few_rewrites() {
        use crate::connector::memory::MemorySource;
        use crate::engine::{EngineConfig, Synchronizer};
        use crate::model::Entry;
        let rules = crate::rules::ruleset::RuleSet::from_toml(
            r#"
[[rule]]
name = "users"
source_type = "user"
target_type = "user"
[[rule.flow]]
target = "cn"
expression = '[cn]'
[[rule.flow]]
target = "sn"
expression = '[sn]'

[[rule]]
name = "groups"
source_type = "group"
target_type = "group"
[[rule.flow]]
target = "cn"
expression = '[cn]'
[[rule.flow]]
target = "member"
expression = '[member]'
reference = true
"#,
            None,
        )
        .unwrap();
        let source = MemorySource::new("hr");
        for i in 0..1200 {
            source
                .add(
                    Entry::new(format!("u{i}"), "user")
                        .with("cn", format!("User {i}"))
                        .with("sn", "U"),
                )
                .unwrap();
        }
        for g in 0..12 {
            let mut e = Entry::new(format!("g{g}"), "group").with("cn", format!("Group {g}"));
            for i in g * 100..g * 100 + 100 {
                e = e.with("member", Value::anchor_ref(format!("u{i}")));
            }
            source.add(e).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let t =
            std::sync::Arc::new(LdifTarget::open(dir.path().join("dir.ldif"), config()).unwrap());
        let mut sync = Synchronizer::new(
            Box::new(source),
            Box::new(Shared(t.clone())),
            Box::new(crate::state::MemoryStore::new()),
            std::sync::Arc::new(rules),
            EngineConfig::default(),
        );
        let r = sync.run_cycle().await.unwrap();
        assert!(r.failures.is_empty(), "{r}");
        assert_eq!(r.count("create"), 1212, "{r}");
        assert_eq!(t.len(), 1212);
        // 1,200 users in batches of at most 500 (the engine's first batch, before its circuit
        // breaker can judge the target, is smaller), then the groups once their members exist.
        let rewrites = t.rewrites();
        eprintln!("initial load, 1,200 users + 12 groups: {rewrites} rewrites");
        assert!(
            rewrites * 100 <= 1212,
            "{rewrites} rewrites for 1,212 creates"
        );
        let reopened = LdifTarget::open(t.path(), config()).unwrap();
        assert_eq!(reopened.len(), 1212);
    }

    #[tokio::test]
    async fn creates_name_objects_and_write_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dir.ldif");
        let t = LdifTarget::open(&path, config()).unwrap();
        assert!(t.is_empty());
        let ada = one(&t, user("Ada Lovelace")).await.unwrap().id;
        assert_eq!(ada.as_str(), "cn=ada lovelace,ou=people,dc=example,dc=com");
        let group = one(
            &t,
            TargetOperation::Create {
                object_type: "group".into(),
                attributes: [
                    ("cn", values(["Engineers"])),
                    ("member", Values::one(Value::target_ref(ada.clone()))),
                    ("jpegPhoto", Values::one(Value::Bytes(vec![0xff, 0xd8]))),
                ]
                .into_iter()
                .collect(),
            },
        )
        .await
        .unwrap()
        .id;
        assert_eq!(
            file(&t),
            "version: 1\n\n\
             dn: cn=Engineers,ou=Groups,dc=example,dc=com\n\
             cn: Engineers\njpegPhoto:: /9g=\n\
             member: cn=Ada Lovelace,ou=People,dc=example,dc=com\n\
             objectClass: top\nobjectClass: groupOfNames\n\n\
             dn: cn=Ada Lovelace,ou=People,dc=example,dc=com\n\
             cn: Ada Lovelace\n\
             objectClass: top\nobjectClass: person\nobjectClass: organizationalPerson\nobjectClass: inetOrgPerson\n\
             sn: X\n"
        );
        // Read back, references are target ids.
        let g = t.get(&"group".into(), &group).await.unwrap().unwrap();
        assert_eq!(
            g.attributes.first("member"),
            Some(&Value::target_ref(ada.clone()))
        );
        assert!(
            t.get(&"user".into(), &group).await.unwrap().is_none(),
            "type mismatch"
        );
        assert!(t
            .get(&"user".into(), &"not a dn".into())
            .await
            .unwrap()
            .is_none());

        let e = one(&t, user("ADA LOVELACE")).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert_eq!(e.object(), Some(ada.as_str()));

        // An explicit dn; the naming value is added.
        let explicit = one(
            &t,
            TargetOperation::Create {
                object_type: "user".into(),
                attributes: [
                    ("dn", values(["uid=grace,ou=Other,dc=example,dc=com"])),
                    ("objectClass", values(["inetOrgPerson"])),
                    ("sn", values(["Hopper"])),
                ]
                .into_iter()
                .collect(),
            },
        )
        .await
        .unwrap()
        .id;
        let grace = t.get(&"user".into(), &explicit).await.unwrap().unwrap();
        assert_eq!(grace.attributes.first_str("uid"), Some("grace"));
        assert!(!grace.attributes.contains("dn"));
    }

    #[tokio::test]
    async fn create_errors() {
        let dir = tempfile::tempdir().unwrap();
        let t = LdifTarget::open(dir.path().join("d.ldif"), config()).unwrap();
        let cases = [
            (
                TargetOperation::Create {
                    object_type: "device".into(),
                    attributes: Attributes::new(),
                },
                ErrorKind::Config,
            ),
            (
                TargetOperation::Create {
                    object_type: "user".into(),
                    attributes: [("sn", values(["x"]))].into_iter().collect(),
                },
                ErrorKind::Constraint,
            ),
            (
                TargetOperation::Create {
                    object_type: "user".into(),
                    attributes: [
                        ("cn", values(["x"])),
                        ("objectClass", values(["groupOfNames"])),
                    ]
                    .into_iter()
                    .collect(),
                },
                ErrorKind::Constraint,
            ),
            (
                TargetOperation::Create {
                    object_type: "user".into(),
                    attributes: [
                        ("cn", values(["x"])),
                        ("manager", Values::one(Value::anchor_ref("a1"))),
                    ]
                    .into_iter()
                    .collect(),
                },
                ErrorKind::Constraint,
            ),
            (
                TargetOperation::Create {
                    object_type: "user".into(),
                    attributes: [("cn", values(["x"])), ("manager", values(["not a dn"]))]
                        .into_iter()
                        .collect(),
                },
                ErrorKind::Constraint,
            ),
            (
                TargetOperation::Create {
                    object_type: "user".into(),
                    attributes: [("cn", values(["x"])), ("bad name", values(["v"]))]
                        .into_iter()
                        .collect(),
                },
                ErrorKind::Constraint,
            ),
            (
                TargetOperation::Create {
                    object_type: "user".into(),
                    attributes: [("dn", values(["cn=a,,"]))].into_iter().collect(),
                },
                ErrorKind::Constraint,
            ),
        ];
        for (op, kind) in cases {
            let e = one(&t, op.clone()).await.unwrap_err();
            assert_eq!(e.kind(), kind, "{op:?}: {e}");
        }
        assert!(t.is_empty());
        assert!(!t.path().exists(), "nothing succeeded: no file written");
    }

    #[tokio::test]
    async fn updates_are_strict_and_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let t = LdifTarget::open(dir.path().join("d.ldif"), config()).unwrap();
        let id = one(&t, user("Ada")).await.unwrap().id;
        one(
            &t,
            update(&id, vec![AttributeChange::add("mail", values(["a@x"]))]),
        )
        .await
        .unwrap();
        let before = file(&t);
        let e = one(
            &t,
            update(
                &id,
                vec![
                    AttributeChange::add("mail", values(["b@x"])),
                    AttributeChange::add("mail", values(["a@x"])),
                ],
            ),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueExists);
        let e = one(
            &t,
            update(&id, vec![AttributeChange::remove("mail", values(["z@x"]))]),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSuchValue);
        assert_eq!(file(&t), before, "failed updates change nothing");
        let o = t.get(&"user".into(), &id).await.unwrap().unwrap();
        assert_eq!(o.attributes.get("mail").unwrap().len(), 1);

        let missing = TargetId::new("cn=nobody,ou=people,dc=example,dc=com");
        assert_eq!(
            one(&t, update(&missing, vec![])).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            one(
                &t,
                TargetOperation::Delete {
                    id: missing,
                    object_type: "user".into()
                }
            )
            .await
            .unwrap_err()
            .kind(),
            ErrorKind::NotFound
        );
        let wrong_type = TargetOperation::Delete {
            id: id.clone(),
            object_type: "group".into(),
        };
        assert_eq!(
            one(&t, wrong_type).await.unwrap_err().kind(),
            ErrorKind::Constraint
        );
    }

    #[tokio::test]
    async fn changing_the_naming_value_renames() {
        let dir = tempfile::tempdir().unwrap();
        let t = LdifTarget::open(dir.path().join("d.ldif"), config()).unwrap();
        let ada = one(&t, user("Ada")).await.unwrap().id;
        let bob = one(&t, user("Bob")).await.unwrap().id;
        let renamed = one(
            &t,
            update(
                &ada,
                vec![AttributeChange::replace("cn", values(["Ada King"]))],
            ),
        )
        .await
        .unwrap()
        .id;
        assert_eq!(renamed.as_str(), "cn=ada king,ou=people,dc=example,dc=com");
        assert!(t.get(&"user".into(), &ada).await.unwrap().is_none());
        assert!(file(&t).contains("dn: cn=Ada King,ou=People,dc=example,dc=com\n"));
        // Onto an existing DN.
        let e = one(
            &t,
            update(
                &renamed,
                vec![AttributeChange::replace("cn", values(["Bob"]))],
            ),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        // Removing the naming attribute altogether.
        let e = one(
            &t,
            update(&bob, vec![AttributeChange::remove("cn", Values::new())]),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Constraint);
        // Replacing dn moves; the old naming value stays (deleteoldrdn: 0).
        let moved = one(
            &t,
            update(
                &bob,
                vec![AttributeChange::replace(
                    "dn",
                    values(["uid=bob,ou=Moved,dc=example,dc=com"]),
                )],
            ),
        )
        .await
        .unwrap()
        .id;
        let o = t.get(&"user".into(), &moved).await.unwrap().unwrap();
        assert_eq!(
            (o.attributes.first_str("uid"), o.attributes.first_str("cn")),
            (Some("bob"), Some("Bob"))
        );
    }

    #[tokio::test]
    async fn objects_with_children_cannot_be_deleted_or_renamed() {
        let dir = tempfile::tempdir().unwrap();
        let t = LdifTarget::open(dir.path().join("d.ldif"), config()).unwrap();
        let parent = one(&t, user("Parent")).await.unwrap().id;
        one(
            &t,
            TargetOperation::Create {
                object_type: "user".into(),
                attributes: [
                    (
                        "dn",
                        values(["cn=Child,cn=Parent,ou=People,dc=example,dc=com"]),
                    ),
                    ("objectClass", values(["inetOrgPerson"])),
                ]
                .into_iter()
                .collect(),
            },
        )
        .await
        .unwrap();
        let e = one(
            &t,
            TargetOperation::Delete {
                id: parent.clone(),
                object_type: "user".into(),
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Constraint);
        let e = one(
            &t,
            update(
                &parent,
                vec![AttributeChange::replace("cn", values(["P2"]))],
            ),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Constraint);
        // Parents come first in the file.
        let text = file(&t);
        assert!(text.find("dn: cn=Parent").unwrap() < text.find("dn: cn=Child").unwrap());
    }

    #[tokio::test]
    async fn read_and_find() {
        let dir = tempfile::tempdir().unwrap();
        let t = LdifTarget::open(dir.path().join("d.ldif"), config()).unwrap();
        let outcomes = t.apply(&[user("Ada"), user("Bob"), user("Ada")]).await;
        assert!(outcomes[0].is_ok() && outcomes[1].is_ok());
        assert_eq!(
            outcomes[2].as_ref().unwrap_err().kind(),
            ErrorKind::AlreadyExists
        );
        let ada = outcomes[0].as_ref().unwrap().id.clone();
        let users: Vec<TargetObject> = t
            .read(&"user".into())
            .await
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
            .await;
        assert_eq!(users.len(), 2);
        assert!(t
            .read(&"group".into())
            .await
            .unwrap()
            .collect::<Vec<_>>()
            .await
            .is_empty());
        let found = t
            .find(&"user".into(), &"CN".into(), &Value::from("ada"))
            .await
            .unwrap();
        assert_eq!(
            found.iter().map(|o| o.id.clone()).collect::<Vec<_>>(),
            vec![ada.clone()]
        );
        let g = one(
            &t,
            TargetOperation::Create {
                object_type: "group".into(),
                attributes: [
                    ("cn", values(["G"])),
                    (
                        "member",
                        Values::one(Value::target_ref(ada.as_str().to_uppercase())),
                    ),
                ]
                .into_iter()
                .collect(),
            },
        )
        .await
        .unwrap()
        .id;
        let found = t
            .find(
                &"group".into(),
                &"member".into(),
                &Value::target_ref(ada.clone()),
            )
            .await
            .unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id, g);
        let by_dn = Value::dn_ref(dn("CN=Ada,OU=People,DC=example,DC=com"));
        assert_eq!(
            t.find(&"group".into(), &"member".into(), &by_dn)
                .await
                .unwrap()
                .len(),
            1
        );
        assert!(t
            .find(&"user".into(), &"cn".into(), &Value::from("zed"))
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn reopening_after_many_applies_gives_the_same_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.ldif");
        // A file with a container no type maps to: it is kept.
        std::fs::write(
            &path,
            "dn: ou=People,dc=example,dc=com\nobjectClass: organizationalUnit\nou: People\n",
        )
        .unwrap();
        let t = LdifTarget::open(&path, config()).unwrap();
        assert_eq!(t.len(), 1);
        let mut ids = Vec::new();
        for i in 0..30 {
            ids.push(one(&t, user(&format!("User {i:02}"))).await.unwrap().id);
        }
        let g = one(
            &t,
            TargetOperation::Create {
                object_type: "group".into(),
                attributes: [("cn", values(["All"]))].into_iter().collect(),
            },
        )
        .await
        .unwrap()
        .id;
        for (i, id) in ids.iter().enumerate() {
            let mut ops = vec![TargetOperation::Update {
                id: g.clone(),
                object_type: "group".into(),
                changes: vec![AttributeChange::add(
                    "member",
                    Values::one(Value::target_ref(id.clone())),
                )],
            }];
            if i % 3 == 0 {
                ops.push(TargetOperation::Delete {
                    id: id.clone(),
                    object_type: "user".into(),
                });
            } else {
                ops.push(update(
                    id,
                    vec![AttributeChange::replace(
                        "description",
                        values([format!(" spaced {i} ")]),
                    )],
                ));
            }
            assert!(t.apply(&ops).await.iter().all(Result::is_ok));
        }
        let reopened = LdifTarget::open(&path, config()).unwrap();
        assert_eq!(reopened.to_ldif().unwrap(), t.to_ldif().unwrap());
        assert_eq!(reopened.to_ldif().unwrap(), std::fs::read(&path).unwrap());
        for ty in ["user", "group"] {
            let a: Vec<_> = t.read(&ty.into()).await.unwrap().collect().await;
            let b: Vec<_> = reopened.read(&ty.into()).await.unwrap().collect().await;
            let a: Vec<TargetObject> = a.into_iter().map(Result::unwrap).collect();
            let b: Vec<TargetObject> = b.into_iter().map(Result::unwrap).collect();
            assert_eq!(a, b);
        }
        assert_eq!(reopened.len(), 1 + 20 + 1);
        // Dangling references (deleted members) are written as the id and read back the same.
        let group = reopened.get(&"group".into(), &g).await.unwrap().unwrap();
        assert_eq!(group.attributes.get("member").unwrap().len(), 30);
    }

    #[tokio::test]
    async fn a_crash_mid_write_does_not_corrupt_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.ldif");
        let t = LdifTarget::open(&path, config()).unwrap();
        one(&t, user("Ada")).await.unwrap();
        let good = std::fs::read(&path).unwrap();
        // A crash while writing the next version leaves a partial temporary file behind.
        let tmp = dir.path().join("d.ldif.tmp");
        std::fs::write(&tmp, "dn: cn=Half,ou=Peo").unwrap();
        let reopened = LdifTarget::open(&path, config()).unwrap();
        assert_eq!(reopened.to_ldif().unwrap(), good);
        assert_eq!(std::fs::read(&path).unwrap(), good);
        // The next apply replaces the leftover.
        one(&reopened, user("Bob")).await.unwrap();
        assert!(!tmp.exists());
        assert_eq!(LdifTarget::open(&path, config()).unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_failed_write_applies_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.ldif");
        let t = LdifTarget::open(&path, config()).unwrap();
        let ada = one(&t, user("Ada")).await.unwrap().id;
        let good = std::fs::read(&path).unwrap();
        // The temporary file cannot be created: a directory is in its way.
        std::fs::create_dir(dir.path().join("d.ldif.tmp")).unwrap();
        let outcomes = t
            .apply(&[
                user("Bob"),
                update(&ada, vec![AttributeChange::add("mail", values(["a@x"]))]),
                user("Ada"),
            ])
            .await;
        assert_eq!(outcomes[0].as_ref().unwrap_err().kind(), ErrorKind::Other);
        assert!(outcomes[0]
            .as_ref()
            .unwrap_err()
            .message()
            .contains("were not applied"));
        assert_eq!(outcomes[1].as_ref().unwrap_err().kind(), ErrorKind::Other);
        assert_eq!(
            outcomes[2].as_ref().unwrap_err().kind(),
            ErrorKind::AlreadyExists
        );
        assert_eq!(t.len(), 1);
        assert!(t
            .get(&"user".into(), &ada)
            .await
            .unwrap()
            .unwrap()
            .attributes
            .get("mail")
            .is_none());
        assert_eq!(std::fs::read(&path).unwrap(), good);
        std::fs::remove_dir(dir.path().join("d.ldif.tmp")).unwrap();
        assert!(one(&t, user("Bob")).await.is_ok());
    }

    #[test]
    fn opening_a_bad_file_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.ldif");
        for (text, needle) in [
            (
                "dn: cn=a\nchangetype: delete\n",
                "line 1: the LDIF target file holds change records",
            ),
            (
                "dn: cn=a\ncn: a\n\ndn: cn=A\ncn: a\n",
                "line 4: a second entry cn=A",
            ),
            (
                "dn: cn=a\nmember: ???\n",
                "line 2: attribute member of cn=a",
            ),
            ("dn: cn=a\ncn a\n", "line 2: expected `attribute: value`"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = LdifTarget::open(&path, config()).err().unwrap();
            assert_eq!(e.kind(), ErrorKind::Protocol);
            assert!(e.message().contains("d.ldif: "), "{e}");
            assert!(e.message().contains(needle), "{needle:?} not in {e}");
        }
    }

    #[test]
    fn capabilities_follow_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let t = LdifTarget::open(
            dir.path().join("d.ldif"),
            LdifTargetConfig {
                max_batch: 0,
                ..config()
            },
        )
        .unwrap()
        .with_name("file");
        assert_eq!(t.name(), "file");
        let c = t.capabilities();
        assert!(c.value_level_changes && c.read);
        assert_eq!(c.max_batch, 1);
    }
}
