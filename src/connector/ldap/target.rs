//! [`LdapTarget`]: an LDAP directory (OpenLDAP, 389-ds, Active Directory) as a [`Target`]:
//! add, modify with value-level add/delete/replace, delete, modrdn (rename and move), paged
//! reads of a type's container and escaped equality lookups for joins.
//!
//! Naming (where a new object goes, when an update renames or moves it) is the LDIF target's,
//! shared through [`crate::connector::dirnames`]. Errors go through the connector's one mapping
//! ([`map_ldap_error`]) and name the DN and, when the server says which, the attribute. Secret
//! attribute values (`unicodePwd`, `userPassword`, …) are sent but never appear in an error, a
//! log line or a `Debug` output of this module.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use ldap3::{Mod, Scope};
use serde::{Deserialize, Serialize};

use super::config::{
    default_object_type_map, default_reference_attributes, AnchorAttribute, LdapConnection,
    LdapSourceConfig,
};
use super::conn::{connect, is_connection_failure, map_ldap_error, LdapHandle};
use super::entry::{EntryMapper, RawEntry};
use super::search::{complete_ranges, search_raw, PagedSearch, SearchSpec};
use crate::connector::dirnames::{
    add_naming_values, base_name, constraint, create_dn, id_of, reference_dn, ObjectTypeNaming,
    Placement, Schema,
};
use crate::connector::{
    Applied, ConnectorError, ErrorKind, Target, TargetCapabilities, TargetOperation,
};
use crate::model::{
    AttrName, AttributeChange, Attributes, ChangeOp, Dn, Entry, ObjectType, Reference, TargetId,
    TargetObject, Value, Values,
};

/// Where objects of one type are created and how they are named (the same settings as the LDIF
/// target's).
pub type LdapObjectTypeConfig = ObjectTypeNaming;

/// Which directory dialect the target speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Directory {
    /// Any LDAPv3 directory: attributes are sent as they are.
    #[default]
    Generic,
    /// Active Directory (or Samba AD): `unicodePwd` values are sent as the UTF-16LE bytes of
    /// the quoted password, and only over a protected connection; the pseudo-attribute
    /// [`ACCOUNT_ENABLED`] sets or clears the ACCOUNTDISABLE bit (0x2) of
    /// `userAccountControl`, keeping its other bits, and is read back from it.
    Ad,
}

/// The pseudo-attribute (a Boolean) that enables or disables an account in the
/// [`Directory::Ad`] dialect: rules write `accountEnabled = false` (typically as the
/// deprovision policy's `set`) and the target flips bit 0x2 of `userAccountControl`.
pub const ACCOUNT_ENABLED: &str = "accountEnabled";

/// userAccountControl ACCOUNTDISABLE.
const UAC_ACCOUNTDISABLE: i64 = 0x2;
/// userAccountControl NORMAL_ACCOUNT: the value a new user starts from.
const UAC_NORMAL_ACCOUNT: i64 = 0x200;

/// How an [`LdapTarget`] reaches its directory and names, types and reads its objects.
///
/// ```
/// # use dirsync::connector::ldap::{Directory, LdapTargetConfig};
/// let c: LdapTargetConfig = toml::from_str(r#"
///     directory = "ad"
///     base_dn = "DC=corp,DC=example"
///     [connection]
///     url = "ldaps://dc1.corp.example"
///     bind = { method = "simple", dn = "CN=sync,OU=Service,DC=corp,DC=example", password = "pw" }
///     [object_types.user]
///     rdn_attribute = "cn"
///     parent = "OU=Synced,DC=corp,DC=example"
///     object_classes = ["top", "person", "organizationalPerson", "user"]
/// "#).unwrap();
/// assert_eq!(c.directory, Directory::Ad);
/// assert!(c.secret_attributes.iter().any(|a| a.is("unicodePwd")));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapTargetConfig {
    /// A short name for logs and errors (default `ldap`).
    #[serde(default = "default_name")]
    pub name: String,
    /// The server.
    pub connection: LdapConnection,
    /// The dialect (default `generic`).
    #[serde(default)]
    pub directory: Directory,
    /// Where reads and join lookups search (subtree). Default: each type's `parent`.
    #[serde(default)]
    pub base_dn: Option<String>,
    /// Per object type: the naming attribute, parent DN and object classes of created objects.
    #[serde(default)]
    pub object_types: BTreeMap<ObjectType, LdapObjectTypeConfig>,
    /// `objectClass` value → object type: the last class of an entry the map names gives its
    /// type (default: `inetOrgPerson`, `user` → `user`; `groupOfNames`, `group` → `group`).
    /// Reads of a type search for the classes that map to it.
    #[serde(default = "default_object_type_map")]
    pub object_type_map: BTreeMap<AttrName, ObjectType>,
    /// Attributes whose values are DNs: written as the DN of the referenced target object, read
    /// back as references by target id (default `member`, `uniqueMember`, `manager`,
    /// `memberOf`).
    #[serde(default = "default_reference_attributes")]
    pub reference_attributes: Vec<AttrName>,
    /// Attributes read back as bytes (besides the built-in binary ones).
    #[serde(default)]
    pub binary_attributes: Vec<AttrName>,
    /// Attributes whose values are secrets: sent, never shown in errors or logs, and not read
    /// back (default `unicodePwd`, `userPassword`).
    #[serde(default = "default_secret_attributes")]
    pub secret_attributes: Vec<AttrName>,
    /// The attributes reads return; empty = all user attributes (`*`).
    #[serde(default)]
    pub read_attributes: Vec<String>,
    /// Operations per apply call (default 100).
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Values per join-lookup search: one `(|(a=v1)(a=v2)…)` search looks up this many at
    /// most (default 100).
    #[serde(default = "default_lookup_batch")]
    pub lookup_batch: usize,
    /// Per object type, placeholder values for attributes a schema requires that the engine
    /// may fill later: `[placeholders.group] member = ""` lets a `groupOfNames` (which must have
    /// a member) be created with none — its members all out of scope, or on a cycle of nested
    /// groups whose references are added after the creates. The placeholder is added to
    /// a create or a replace that leaves the attribute empty and is never read back. A
    /// value-level removal of the last real value is still refused by the server.
    #[serde(default)]
    pub placeholders: BTreeMap<ObjectType, BTreeMap<AttrName, String>>,
}

fn default_name() -> String {
    "ldap".to_owned()
}

fn default_max_batch() -> usize {
    100
}

fn default_lookup_batch() -> usize {
    100
}

/// The default secret attributes: `unicodePwd`, `userPassword`.
pub fn default_secret_attributes() -> Vec<AttrName> {
    vec![AttrName::new("unicodePwd"), AttrName::new("userPassword")]
}

impl LdapTargetConfig {
    /// A target configuration for `connection` with defaults and no object types.
    pub fn new(connection: LdapConnection) -> LdapTargetConfig {
        LdapTargetConfig {
            name: default_name(),
            connection,
            directory: Directory::Generic,
            base_dn: None,
            object_types: BTreeMap::new(),
            object_type_map: default_object_type_map(),
            reference_attributes: default_reference_attributes(),
            binary_attributes: Vec::new(),
            secret_attributes: default_secret_attributes(),
            read_attributes: Vec::new(),
            max_batch: default_max_batch(),
            lookup_batch: default_lookup_batch(),
            placeholders: BTreeMap::new(),
        }
    }

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
            LdapObjectTypeConfig::new(rdn_attribute, parent, object_classes),
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

    fn placeholder(&self, object_type: &ObjectType, attribute: &str) -> Option<&str> {
        let base = base_name(attribute);
        self.placeholders
            .get(object_type)?
            .iter()
            .find(|(a, _)| a.is(base))
            .map(|(_, v)| v.as_str())
    }

    fn is_secret(&self, attribute: &AttrName) -> bool {
        let base = base_name(attribute.as_str());
        self.secret_attributes.iter().any(|s| s.is(base))
    }
}

/// An LDAP directory as a target.
///
/// * Target ids are DNs in normalized form. A create is named like the LDIF target's: its `dn`
///   pseudo-attribute, else the first value of the type's `rdn_attribute` under its `parent`
///   pseudo-attribute or the type's configured `parent`; the naming values and (when the create
///   has none) the type's `object_classes` are added, and the classes must map back to the
///   type ([`ErrorKind::Constraint`] before anything is sent).
/// * An update is one LDAP modify with its changes in order (value-level add and delete,
///   replace); a change of the naming attribute's value (or a replace of `dn`) renames the
///   object with a modrdn, a replace of `parent` (or of `dn` to another container) moves it
///   with newSuperior; the outcome carries the new id. The attribute changes are applied
///   first, then the modrdn, then the naming attribute's final values: these are separate LDAP
///   operations, so a failure of the modrdn leaves the other changes applied (the error says
///   so).
/// * Reference values are written as DNs (a target id is a DN).
/// * Errors: entryAlreadyExists → [`ErrorKind::AlreadyExists`] (the engine then joins through
///   [`find`](Target::find)), noSuchObject → [`ErrorKind::NotFound`], schema and constraint
///   violations → [`ErrorKind::Constraint`], busy/unavailable/lost connection → retryable; each
///   names the DN, and the attribute when the server's message names one of the operation's.
///
/// One connection is opened (and bound) at first use and shared by the calls; the operations of
/// one call are pipelined on it. A connection failure drops it and the next call reconnects.
pub struct LdapTarget {
    config: Arc<LdapTargetConfig>,
    mapper: Arc<EntryMapper>,
    handle: tokio::sync::Mutex<Option<LdapHandle>>,
}

impl std::fmt::Debug for LdapTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LdapTarget")
            .field("name", &self.config.name)
            .field("url", &self.config.connection.url)
            .field("directory", &self.config.directory)
            .finish_non_exhaustive()
    }
}

impl LdapTarget {
    /// A target as `config` says. Nothing is contacted until the first call.
    pub fn new(config: LdapTargetConfig) -> LdapTarget {
        let mut source = LdapSourceConfig::new(config.connection.clone(), "");
        source.anchor = AnchorAttribute::Dn;
        source.object_types = config.object_type_map.clone();
        source.reference_attributes = config.reference_attributes.clone();
        source.binary_attributes = config.binary_attributes.clone();
        let mapper = EntryMapper::new(&source);
        LdapTarget {
            config: Arc::new(config),
            mapper: Arc::new(mapper),
            handle: tokio::sync::Mutex::new(None),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LdapTargetConfig {
        &self.config
    }

    async fn handle(&self) -> Result<LdapHandle, ConnectorError> {
        let mut slot = self.handle.lock().await;
        if let Some(h) = slot.as_ref() {
            return Ok(h.clone());
        }
        let h = connect(&self.config.connection).await?;
        *slot = Some(h.clone());
        Ok(h)
    }

    /// Forgets the shared connection after a connection failure.
    async fn note(&self, e: &ConnectorError) {
        if is_connection_failure(e) {
            *self.handle.lock().await = None;
        }
    }

    /// Where reads and lookups of `object_type` search.
    fn search_base(&self, object_type: &ObjectType) -> Result<String, ConnectorError> {
        if let Some(b) = &self.config.base_dn {
            return Ok(b.clone());
        }
        self.config
            .object_types
            .get(object_type)
            .map(|s| s.parent.as_str().to_owned())
            .ok_or_else(|| {
                ConnectorError::new(
                    ErrorKind::Config,
                    format!(
                        "the LDAP target {} has neither base_dn nor settings for object type \
                         {object_type} (object_types): there is nowhere to search",
                        self.config.name
                    ),
                )
            })
    }

    /// The filter matching entries of `object_type`: any class the map gives that type.
    fn type_filter(&self, object_type: &ObjectType) -> Result<String, ConnectorError> {
        let classes: Vec<String> = self
            .config
            .object_type_map
            .iter()
            .filter(|(_, t)| *t == object_type)
            .map(|(c, _)| format!("(objectClass={})", ldap3::ldap_escape(c.as_str())))
            .collect();
        match classes.len() {
            0 => Err(ConnectorError::new(
                ErrorKind::Config,
                format!(
                    "no objectClass maps to object type {object_type} (object_type_map of the \
                     LDAP target {})",
                    self.config.name
                ),
            )),
            1 => Ok(classes.concat()),
            _ => Ok(format!("(|{})", classes.concat())),
        }
    }

    fn requested(&self) -> Vec<String> {
        let mut attrs = if self.config.read_attributes.is_empty() {
            vec!["*".to_owned()]
        } else {
            self.config.read_attributes.clone()
        };
        if !attrs
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case("objectClass"))
        {
            attrs.push("objectClass".to_owned());
        }
        attrs
    }

    /// The target object of a read entry, `None` when it is of another type.
    fn to_object(
        &self,
        raw: RawEntry,
        object_type: &ObjectType,
    ) -> Result<Option<TargetObject>, ConnectorError> {
        let Some(entry) = self.mapper.to_entry(raw)? else {
            return Ok(None);
        };
        if &entry.object_type != object_type {
            return Ok(None);
        }
        Ok(Some(self.object_of(entry)))
    }

    fn object_of(&self, entry: Entry) -> TargetObject {
        let dn = entry.dn.unwrap_or_else(Dn::root);
        let mut attributes = Attributes::with_capacity(entry.attributes.len() + 1);
        for (name, values) in entry.attributes.iter() {
            if self.config.is_secret(name) {
                continue;
            }
            let placeholder = self.config.placeholder(&entry.object_type, name.as_str());
            let values: Values = values
                .iter()
                .filter(|v| {
                    placeholder.is_none_or(|p| !matches!(v, Value::String(s) if s.as_str() == p))
                        && placeholder.is_none_or(
                            |p| !matches!(v, Value::Reference(Reference::Dn(d)) if d.as_str() == p),
                        )
                })
                .map(|v| match v {
                    Value::Reference(Reference::Dn(d)) => Value::target_ref(d.normalized()),
                    other => other.clone(),
                })
                .collect();
            if !values.is_empty() {
                attributes.set(name.clone(), values);
            }
        }
        if self.config.directory == Directory::Ad {
            if let Some(uac) = attributes.first("userAccountControl").and_then(integer_of) {
                attributes.set(
                    ACCOUNT_ENABLED,
                    Values::one(Value::Boolean(uac & UAC_ACCOUNTDISABLE == 0)),
                );
            }
        }
        TargetObject {
            id: id_of(&dn),
            object_type: entry.object_type,
            attributes,
        }
    }

    /// Reads one entry by DN (base search); `None` when it does not exist.
    async fn read_entry(
        &self,
        dn: &str,
        attrs: Vec<String>,
    ) -> Result<Option<RawEntry>, ConnectorError> {
        let mut handle = self.handle().await?;
        let spec = SearchSpec {
            base: dn.to_owned(),
            scope: Scope::Base,
            filter: "(objectClass=*)".to_owned(),
            attrs,
            controls: Vec::new(),
        };
        let (items, res) = match search_raw(&mut handle, &spec).await {
            Ok(r) => r,
            Err(e) => {
                self.note(&e).await;
                return Err(e.with_object(dn));
            }
        };
        if res.rc == 32 {
            return Ok(None);
        }
        if res.rc != 0 {
            return Err(super::conn::result_error(&res).with_object(dn));
        }
        let Some(item) = items.into_iter().find(|i| i.0.id == 4) else {
            return Ok(None);
        };
        let mut raw = RawEntry::parse(item.0)?;
        if raw.attrs.iter().any(|(n, _)| n.contains(';')) {
            complete_ranges(&mut handle, &mut raw).await?;
        }
        Ok(Some(raw))
    }

    /// Every entry of `object_type` below the search base matching `filter` (ANDed with the
    /// type's classes), page by page.
    async fn search_objects(
        &self,
        object_type: &ObjectType,
        filter: Option<String>,
    ) -> Result<BoxStream<'_, Result<TargetObject, ConnectorError>>, ConnectorError> {
        let base = self.search_base(object_type)?;
        let classes = self.type_filter(object_type)?;
        let filter = match filter {
            Some(f) => format!("(&{classes}{f})"),
            None => classes,
        };
        let handle = self.handle().await?;
        let spec = SearchSpec {
            base,
            scope: Scope::Subtree,
            filter,
            attrs: self.requested(),
            controls: Vec::new(),
        };
        let search = PagedSearch::new(handle, spec, self.config.connection.page_size);
        let ty = object_type.clone();
        let stream = futures::stream::unfold(Some(search), move |state| {
            let ty = ty.clone();
            async move {
                let mut search = state?;
                loop {
                    let tag = match search.next().await {
                        Ok(Some(t)) => t,
                        Ok(None) => return None,
                        // The container does not exist (yet): nothing of the type.
                        Err(e) if e.kind() == ErrorKind::NotFound => return None,
                        Err(e) => {
                            self.note(&e).await;
                            return Some((Err(e), None));
                        }
                    };
                    let converted = async {
                        let mut raw = RawEntry::parse(tag)?;
                        if raw.attrs.iter().any(|(n, _)| n.contains(';')) {
                            let mut h = search.handle().clone();
                            complete_ranges(&mut h, &mut raw).await?;
                        }
                        self.to_object(raw, &ty)
                    }
                    .await;
                    match converted {
                        Ok(Some(o)) => return Some((Ok(o), Some(search))),
                        Ok(None) => continue,
                        Err(e) => return Some((Err(e), None)),
                    }
                }
            }
        });
        Ok(stream.boxed())
    }

    async fn apply_one(&self, op: &TargetOperation) -> Result<Applied, ConnectorError> {
        let result = match op {
            TargetOperation::Create {
                object_type,
                attributes,
            } => self.create(object_type, attributes).await,
            TargetOperation::Update {
                id,
                object_type,
                changes,
            } => self.update(object_type, id, changes).await,
            TargetOperation::Delete { id, .. } => {
                let dn = parse_id(id)?;
                let mut h = self.handle().await?;
                let r = h.ldap().delete(dn.as_str()).await.and_then(|r| r.success());
                r.map(|_| Applied { id: id.clone() })
                    .map_err(|e| op_error(map_ldap_error(e), "delete", &dn, &[]))
            }
        };
        if let Err(e) = &result {
            self.note(e).await;
        }
        result
    }

    async fn create(
        &self,
        object_type: &ObjectType,
        attributes: &Attributes,
    ) -> Result<Applied, ConnectorError> {
        let mut attrs = attributes.clone();
        let settings = self.config.object_types.get(object_type);
        let dn = create_dn("LDAP", settings, object_type, &mut attrs)?;
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
        if self.config.directory == Directory::Ad {
            if let Some(enabled) = attrs.remove(ACCOUNT_ENABLED) {
                let enabled = enabled_of(&enabled, &dn)?;
                let base = attrs
                    .first("userAccountControl")
                    .and_then(integer_of)
                    .unwrap_or(UAC_NORMAL_ACCOUNT);
                attrs.set(
                    "userAccountControl",
                    Values::one(Value::Integer(with_enabled(base, enabled))),
                );
            }
        }
        self.config.schema().check_type(&attrs, object_type, &dn)?;
        for (name, value) in self
            .config
            .placeholders
            .get(object_type)
            .into_iter()
            .flatten()
        {
            if attrs.get(name.as_str()).is_none_or(|v| v.is_empty()) {
                attrs.set(name.clone(), Values::one(value.as_str()));
            }
        }
        let mut list: Vec<(Vec<u8>, HashSet<Vec<u8>>)> = Vec::with_capacity(attrs.len());
        let mut names = Vec::with_capacity(attrs.len());
        for (name, values) in attrs.iter() {
            if values.is_empty() {
                continue;
            }
            let set = self.encode_values(Some(object_type), name, values, &dn)?;
            names.push(name.as_str());
            list.push((name.as_str().as_bytes().to_vec(), set));
        }
        let mut h = self.handle().await?;
        h.ldap()
            .add(dn.as_str(), list)
            .await
            .and_then(|r| r.success())
            .map_err(|e| op_error(map_ldap_error(e), "add", &dn, &names))?;
        Ok(Applied { id: id_of(&dn) })
    }

    async fn update(
        &self,
        object_type: &ObjectType,
        id: &TargetId,
        changes: &[AttributeChange],
    ) -> Result<Applied, ConnectorError> {
        let dn = parse_id(id)?;
        let (placement, changes) = Placement::split(changes, &dn)?;
        let rdn_attrs: Vec<String> = dn
            .rdn()
            .map(|r| r.avas().iter().map(|a| a.attr().to_owned()).collect())
            .unwrap_or_default();
        let is_naming = |a: &AttrName| rdn_attrs.iter().any(|r| a.is(base_name(r)));
        let touches_naming = changes.iter().any(|c| is_naming(&c.attribute));
        let ad = self.config.directory == Directory::Ad;
        let touches_enabled = ad && changes.iter().any(|c| c.attribute.is(ACCOUNT_ENABLED));

        // The naming attribute's values after the update (read when a change touches them).
        let mut naming = Attributes::new();
        let mut current_uac = None;
        if touches_naming || touches_enabled {
            let mut wanted = rdn_attrs.clone();
            if touches_enabled {
                wanted.push("userAccountControl".to_owned());
            }
            let raw = self.read_entry(dn.as_str(), wanted).await?.ok_or_else(|| {
                ConnectorError::new(ErrorKind::NotFound, format!("no object {dn}")).with_object(id)
            })?;
            for (name, vals) in raw.attrs {
                let values: Values = vals
                    .into_iter()
                    .map(|v| Value::string(String::from_utf8_lossy(&v).as_ref()))
                    .collect();
                if name.eq_ignore_ascii_case("userAccountControl") {
                    current_uac = values.first().and_then(integer_of);
                } else {
                    naming.set(AttrName::new(name), values);
                }
            }
        } else {
            add_naming_values(&mut naming, &dn);
        }
        for c in changes.iter().filter(|c| is_naming(&c.attribute)) {
            naming
                .apply(c, false)
                .map_err(|e| ConnectorError::new(ErrorKind::Constraint, e.to_string()))?;
        }
        let new_dn = placement.new_dn(&dn, &naming)?;
        let renaming = new_dn != dn;

        // 1. The attribute changes on the current DN (the naming ones after a rename).
        let mut mods: Vec<Mod<Vec<u8>>> = Vec::with_capacity(changes.len());
        let mut names: Vec<&str> = Vec::with_capacity(changes.len());
        for c in &changes {
            if renaming && is_naming(&c.attribute) {
                continue;
            }
            if ad && c.attribute.is(ACCOUNT_ENABLED) {
                let value = match (c.op, c.values.len()) {
                    (ChangeOp::Replace, 1) | (ChangeOp::Add, 1) => c.values.clone(),
                    _ => {
                        return Err(constraint(
                            &format!("{ACCOUNT_ENABLED} is replaced by one Boolean value"),
                            &dn,
                        ))
                    }
                };
                let enabled = enabled_of(&value, &dn)?;
                let base = explicit_uac(&changes)
                    .or(current_uac)
                    .unwrap_or(UAC_NORMAL_ACCOUNT);
                mods.push(Mod::Replace(
                    b"userAccountControl".to_vec(),
                    HashSet::from([with_enabled(base, enabled).to_string().into_bytes()]),
                ));
                names.push("userAccountControl");
                continue;
            }
            if ad && touches_enabled && c.attribute.is("userAccountControl") {
                // Folded into the accountEnabled replace above.
                continue;
            }
            let set = self.encode_values(Some(object_type), &c.attribute, &c.values, &dn)?;
            let name = c.attribute.as_str().as_bytes().to_vec();
            names.push(c.attribute.as_str());
            mods.push(match c.op {
                ChangeOp::Replace if set.is_empty() => {
                    match self.config.placeholder(object_type, c.attribute.as_str()) {
                        Some(p) => Mod::Replace(name, HashSet::from([p.as_bytes().to_vec()])),
                        None => Mod::Replace(name, set),
                    }
                }
                ChangeOp::Replace => Mod::Replace(name, set),
                ChangeOp::Add if set.is_empty() => continue,
                ChangeOp::Add => Mod::Add(name, set),
                ChangeOp::Remove if set.is_empty() => continue,
                ChangeOp::Remove => Mod::Delete(name, set),
            });
        }
        if !mods.is_empty() {
            let mut h = self.handle().await?;
            h.ldap()
                .modify(dn.as_str(), mods)
                .await
                .and_then(|r| r.success())
                .map_err(|e| op_error(map_ldap_error(e), "modify", &dn, &names))?;
        }
        if !renaming {
            return Ok(Applied { id: id.clone() });
        }

        // 2. The modrdn, with newSuperior when the container changes.
        let new_rdn = new_dn.rdn().map(ToString::to_string).unwrap_or_default();
        let old_parent = dn.parent().unwrap_or_else(Dn::root);
        let new_parent = new_dn.parent().unwrap_or_else(Dn::root);
        let superior = (old_parent.normalized() != new_parent.normalized())
            .then(|| new_parent.as_str().to_owned());
        let mut h = self.handle().await?;
        h.ldap()
            .modifydn(dn.as_str(), &new_rdn, true, superior.as_deref())
            .await
            .and_then(|r| r.success())
            .map_err(|e| {
                let e = op_error(map_ldap_error(e), "modrdn", &dn, &[]);
                let applied = if names.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (the attribute changes to {} were applied)",
                        names.join(", ")
                    )
                };
                ConnectorError::new(e.kind(), format!("{} to {new_dn}{applied}", e.message()))
                    .with_object(id)
            })?;

        // 3. The naming attribute's final values, when the update changed them.
        let final_mods: Vec<Mod<Vec<u8>>> = changes
            .iter()
            .filter(|c| is_naming(&c.attribute))
            .map(|c| base_name(c.attribute.as_str()).to_owned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter_map(|attr| {
                let values = naming.get(&attr)?;
                let set = values
                    .iter()
                    .map(|v| v.to_text().into_bytes())
                    .collect::<HashSet<_>>();
                Some(Mod::Replace(attr.into_bytes(), set))
            })
            .collect();
        if !final_mods.is_empty() {
            h.ldap()
                .modify(new_dn.as_str(), final_mods)
                .await
                .and_then(|r| r.success())
                .map_err(|e| op_error(map_ldap_error(e), "modify", &new_dn, &[]))?;
        }
        Ok(Applied { id: id_of(&new_dn) })
    }

    /// The bytes sent for `values` of `attribute`.
    fn encode_values(
        &self,
        object_type: Option<&ObjectType>,
        attribute: &AttrName,
        values: &Values,
        dn: &Dn,
    ) -> Result<HashSet<Vec<u8>>, ConnectorError> {
        let base = base_name(attribute.as_str());
        if self.config.directory == Directory::Ad && base.eq_ignore_ascii_case("unicodePwd") {
            if !self.config.connection.is_protected()? {
                return Err(ConnectorError::new(
                    ErrorKind::Config,
                    format!(
                        "refusing to send unicodePwd of {dn} over the cleartext connection {}: \
                         Active Directory accepts passwords only over an encrypted connection; \
                         use ldaps:// or starttls = true",
                        self.config.connection.url
                    ),
                )
                .with_object(id_of(dn)));
            }
            return values
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(unicode_pwd(s)),
                    _ => Err(constraint(
                        "attribute unicodePwd: the password must be text",
                        dn,
                    )),
                })
                .collect();
        }
        let schema = self.config.schema();
        values
            .iter()
            .map(|v| {
                Ok(match v {
                    Value::Reference(_) => {
                        reference_dn(attribute, v, dn)?.as_str().as_bytes().to_vec()
                    }
                    Value::String(s)
                        if object_type.is_some_and(|t| {
                            self.config.placeholder(t, attribute.as_str()) == Some(s)
                        }) =>
                    {
                        s.as_bytes().to_vec()
                    }
                    Value::String(s) if schema.is_reference(attribute) => {
                        // Validated so that a malformed DN is our error, not the server's.
                        reference_dn(attribute, v, dn)?;
                        s.as_bytes().to_vec()
                    }
                    Value::String(s) => s.as_bytes().to_vec(),
                    Value::Bytes(b) => b.clone(),
                    Value::Integer(i) => i.to_string().into_bytes(),
                    Value::Boolean(b) => (if *b { "TRUE" } else { "FALSE" }).as_bytes().to_vec(),
                    Value::Timestamp(t) => t.format("%Y%m%d%H%M%SZ").to_string().into_bytes(),
                })
            })
            .collect()
    }
}

/// The DN of a target id.
fn parse_id(id: &TargetId) -> Result<Dn, ConnectorError> {
    Dn::parse(id.as_str()).map_err(|e| {
        ConnectorError::new(
            ErrorKind::NotFound,
            format!("the target id {id} is not a DN: {e}"),
        )
        .with_object(id)
    })
}

/// `unicodePwd`'s value: the UTF-16LE bytes of the password in double quotes.
fn unicode_pwd(password: &str) -> Vec<u8> {
    format!("\"{password}\"")
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect()
}

fn integer_of(v: &Value) -> Option<i64> {
    match v {
        Value::Integer(i) => Some(*i),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The Boolean of an `accountEnabled` value: a Boolean, `true`/`false` text, or 0/1.
fn enabled_of(values: &Values, dn: &Dn) -> Result<bool, ConnectorError> {
    let bad = || {
        constraint(
            &format!("attribute {ACCOUNT_ENABLED}: one Boolean value (true or false) is expected"),
            dn,
        )
    };
    match (values.first(), values.len()) {
        (Some(Value::Boolean(b)), 1) => Ok(*b),
        (Some(Value::Integer(i)), 1) => Ok(*i != 0),
        (Some(Value::String(s)), 1) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

fn with_enabled(uac: i64, enabled: bool) -> i64 {
    if enabled {
        uac & !UAC_ACCOUNTDISABLE
    } else {
        uac | UAC_ACCOUNTDISABLE
    }
}

/// A userAccountControl value an update replaces explicitly.
fn explicit_uac(changes: &[&AttributeChange]) -> Option<i64> {
    changes
        .iter()
        .rev()
        .find(|c| c.attribute.is("userAccountControl") && c.op == ChangeOp::Replace)
        .and_then(|c| c.values.first())
        .and_then(integer_of)
}

/// Whether `text` names `attr` as a word (not as part of a longer name).
fn mentions(text: &str, attr: &str) -> bool {
    let t = text.to_ascii_lowercase();
    let a = attr.to_ascii_lowercase();
    if a.is_empty() {
        return false;
    }
    let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-');
    let mut from = 0;
    while let Some(pos) = t.get(from..).and_then(|s| s.find(&a)) {
        let at = from + pos;
        let before = t.get(..at).and_then(|s| s.chars().last());
        let after = t.get(at + a.len()..).and_then(|s| s.chars().next());
        if !word(before) && !word(after) {
            return true;
        }
        from = at + a.len();
    }
    false
}

/// An error of `what` (add, modify, …) on `dn`, naming the attributes of the operation the
/// server's message mentions (or the only one).
fn op_error(e: ConnectorError, what: &str, dn: &Dn, attributes: &[&str]) -> ConnectorError {
    let mut named: Vec<&str> = attributes
        .iter()
        .copied()
        .filter(|a| mentions(e.message(), a))
        .collect();
    named.dedup();
    if named.is_empty() && attributes.len() == 1 && e.kind() != ErrorKind::NotFound {
        named = attributes.to_vec();
    }
    let attrs = match named.as_slice() {
        [] => String::new(),
        [one] => format!(" (attribute {one})"),
        many => format!(" (attributes {})", many.join(", ")),
    };
    let mut out = ConnectorError::new(e.kind(), format!("{what} {dn}{attrs}: {}", e.message()))
        .with_object(id_of(dn));
    if let Some(after) = e.retry_after() {
        out = out.with_retry_after(after);
    }
    out
}

/// The filter that finds entries whose `attribute` equals any of `values`: `(a=v)` for one
/// value, `(|(a=v1)(a=v2)…)` for several, `None` for none. Values are RFC 4515 escaped (strings
/// by [`ldap3::ldap_escape`], bytes byte by byte, references as their DN, timestamps as
/// GeneralizedTime); the attribute name must be one a filter can carry.
fn lookup_filter(attribute: &AttrName, values: &[Value]) -> Result<Option<String>, ConnectorError> {
    let name = base_name(attribute.as_str());
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        || name.is_empty()
    {
        return Err(ConnectorError::new(
            ErrorKind::Config,
            format!("{name:?} is not an attribute name a filter can carry"),
        ));
    }
    let mut clauses = Vec::with_capacity(values.len());
    for value in values {
        let escaped = match value {
            Value::Reference(_) => {
                let dn = reference_dn(attribute, value, &Dn::root())?;
                ldap3::ldap_escape(dn.as_str()).into_owned()
            }
            Value::Bytes(b) => escape_bytes(b),
            Value::Timestamp(t) => t.format("%Y%m%d%H%M%SZ").to_string(),
            other => ldap3::ldap_escape(other.to_text()).into_owned(),
        };
        clauses.push(format!("({name}={escaped})"));
    }
    Ok(match clauses.len() {
        0 => None,
        1 => clauses.pop(),
        _ => Some(format!("(|{})", clauses.concat())),
    })
}

/// RFC 4515 escaping of raw bytes: every byte as `\xx`.
fn escape_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:02x}")).collect()
}

#[async_trait]
impl Target for LdapTarget {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn capabilities(&self) -> TargetCapabilities {
        TargetCapabilities {
            value_level_changes: true,
            max_batch: self.config.max_batch.max(1),
            read: true,
            lookup_batch: self.config.lookup_batch.max(1),
            ..TargetCapabilities::default()
        }
    }

    async fn read(
        &self,
        object_type: &ObjectType,
    ) -> Result<BoxStream<'_, Result<TargetObject, ConnectorError>>, ConnectorError> {
        self.search_objects(object_type, None).await
    }

    async fn get(
        &self,
        object_type: &ObjectType,
        id: &TargetId,
    ) -> Result<Option<TargetObject>, ConnectorError> {
        let Ok(dn) = Dn::parse(id.as_str()) else {
            return Ok(None);
        };
        match self.read_entry(dn.as_str(), self.requested()).await? {
            Some(raw) => self.to_object(raw, object_type),
            None => Ok(None),
        }
    }

    async fn find(
        &self,
        object_type: &ObjectType,
        attribute: &AttrName,
        value: &Value,
    ) -> Result<Vec<TargetObject>, ConnectorError> {
        if attribute.is("dn") {
            let id = match value {
                Value::Reference(Reference::Dn(d)) => TargetId::new(d.normalized()),
                other => TargetId::new(other.to_text()),
            };
            return Ok(self.get(object_type, &id).await?.into_iter().collect());
        }
        self.find_any(object_type, attribute, std::slice::from_ref(value))
            .await
    }

    /// One subtree search `(&(classes)(|(a=v1)(a=v2)…))` for all `values` (RFC 4515 escaped);
    /// `dn` is looked up by reading each entry.
    async fn find_any(
        &self,
        object_type: &ObjectType,
        attribute: &AttrName,
        values: &[Value],
    ) -> Result<Vec<TargetObject>, ConnectorError> {
        if attribute.is("dn") {
            let mut out = Vec::new();
            for value in values {
                let id = match value {
                    Value::Reference(Reference::Dn(d)) => TargetId::new(d.normalized()),
                    other => TargetId::new(other.to_text()),
                };
                if let Some(o) = self.get(object_type, &id).await? {
                    if !out.iter().any(|x: &TargetObject| x.id == o.id) {
                        out.push(o);
                    }
                }
            }
            return Ok(out);
        }
        let Some(filter) = lookup_filter(attribute, values)? else {
            return Ok(Vec::new());
        };
        let mut stream = self.search_objects(object_type, Some(filter)).await?;
        let mut out = Vec::new();
        while let Some(o) = stream.next().await {
            out.push(o?);
        }
        Ok(out)
    }

    /// The operations are pipelined on the one connection: those on different entries are
    /// all sent without waiting for each other's answers (LDAP matches answers to requests by
    /// message id), those on the same entry one after the other in their order.
    async fn apply(&self, operations: &[TargetOperation]) -> Vec<Result<Applied, ConnectorError>> {
        crate::connector::apply_per_object(operations, |op| self.apply_one(op)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_filters_or_their_values_and_escape_each() {
        let a = AttrName::new("mail");
        assert_eq!(lookup_filter(&a, &[]).unwrap(), None);
        assert_eq!(
            lookup_filter(&a, &[Value::string("a@x")]).unwrap().unwrap(),
            "(mail=a@x)"
        );
        // Every RFC 4515 special (`*`, `(`, `)`, `\`, NUL) is escaped in every value: a value
        // cannot widen the search or break out of its clause.
        let f = lookup_filter(
            &a,
            &[
                Value::string("*"),
                Value::string("x)(objectClass=*"),
                Value::string("back\\slash\0nul"),
                Value::string("Zoë"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            f,
            "(|(mail=\\2a)(mail=x\\29\\28objectClass=\\2a)(mail=back\\5cslash\\00nul)(mail=Zoë))"
        );
        // Bytes byte by byte, references as their DN, options dropped from the name.
        let f = lookup_filter(
            &AttrName::new("member;range=0-*"),
            &[
                Value::Bytes(vec![0x01, 0x2a]),
                Value::target_ref("cn=a\\,b,dc=x"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(f, "(|(member=\\01\\2a)(member=cn=a\\5c,b,dc=x))");
        assert_eq!(
            lookup_filter(&AttrName::new("bad name"), &[Value::string("x")])
                .unwrap_err()
                .kind(),
            ErrorKind::Config
        );
    }

    #[test]
    fn unicode_pwd_is_quoted_utf16le() {
        assert_eq!(
            unicode_pwd("Ab1"),
            vec![b'"', 0, b'A', 0, b'b', 0, b'1', 0, b'"', 0]
        );
        assert_eq!(unicode_pwd("é").len(), 6);
    }

    #[test]
    fn account_enabled_flips_only_the_disable_bit() {
        assert_eq!(with_enabled(0x202, true), 0x200);
        assert_eq!(with_enabled(0x10200, false), 0x10202);
        let dn = Dn::parse("cn=a").unwrap();
        assert!(!enabled_of(&Values::one(false), &dn).unwrap());
        assert!(enabled_of(&Values::one("TRUE"), &dn).unwrap());
        assert!(enabled_of(&Values::one("maybe"), &dn).is_err());
        assert!(enabled_of(&Values::new(), &dn).is_err());
    }

    #[test]
    fn errors_name_mentioned_attributes_only() {
        assert!(mentions("attribute 'mail' not allowed", "mail"));
        assert!(!mentions("attribute 'mailHost' not allowed", "mail"));
        assert!(mentions("objectClass: value #0 invalid", "objectClass"));
        let dn = Dn::parse("uid=a,dc=x").unwrap();
        let e = op_error(
            ConnectorError::new(ErrorKind::Constraint, "attribute 'mail' not allowed"),
            "add",
            &dn,
            &["uid", "mail", "cn"],
        );
        assert_eq!(e.kind(), ErrorKind::Constraint);
        assert!(
            e.message().starts_with("add uid=a,dc=x (attribute mail): "),
            "{e}"
        );
        assert_eq!(e.object(), Some("uid=a,dc=x"));
    }

    #[test]
    fn config_defaults_and_secret_attributes() {
        let c = LdapTargetConfig::new(LdapConnection::new("ldap://h"));
        assert_eq!(c.directory, Directory::Generic);
        assert!(c.is_secret(&"userPassword".into()));
        assert!(c.is_secret(&"UNICODEPWD".into()));
        assert!(!c.is_secret(&"cn".into()));
        assert_eq!(escape_bytes(&[0, 0xff]), r"\00\ff");
        let t = LdapTarget::new(c);
        assert_eq!(
            t.type_filter(&"user".into()).unwrap(),
            "(|(objectClass=inetOrgPerson)(objectClass=user))"
        );
        assert_eq!(
            t.search_base(&"user".into()).unwrap_err().kind(),
            ErrorKind::Config
        );
        assert!(!format!("{t:?}").is_empty());
    }

    #[tokio::test]
    async fn unicode_pwd_over_cleartext_is_refused_before_connecting() {
        // Port 9 of 127.0.0.1: nothing listens; the refusal comes before any connection.
        let mut conn = LdapConnection::new("ldap://127.0.0.1:9");
        conn.allow_cleartext_bind = true;
        let mut c = LdapTargetConfig::new(conn).with_object_type(
            "user",
            "cn",
            Dn::parse("OU=People,DC=x").unwrap(),
            ["user"],
        );
        c.directory = Directory::Ad;
        let t = LdapTarget::new(c);
        let mut attrs = Attributes::new();
        attrs.add("cn", "Jane");
        attrs.add("unicodePwd", "Sup3r-Secret!");
        let out = t
            .apply(&[TargetOperation::Create {
                object_type: "user".into(),
                attributes: attrs,
            }])
            .await;
        let e = out.into_iter().next().unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.message().contains("unicodePwd"), "{e}");
        assert!(!format!("{e:?}").contains("Sup3r"), "{e:?}");
    }
}
