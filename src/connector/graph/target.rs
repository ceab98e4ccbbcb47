//! [`GraphTarget`]: users, security groups and memberships in Microsoft Entra ID through
//! Microsoft Graph v1.0 — create (restoring a soft-deleted user when its anchor comes back),
//! PATCH of only the changed properties, delete, a new group's first 20 members in its create,
//! membership diffs by value through `members@odata.bind` (20 per request) and
//! `DELETE …/members/{id}/$ref` in `$batch`es, join lookups by `$filter` (`in` batches of 15
//! values, Graph's limit), and reads through delta queries whose deltaLink is the watermark.
//! The operations of one apply call run together, their requests combined into `$batch`
//! envelopes of up to 20 ([`Client::batched`](super::client)).
//!
//! It may not panic on a server's answer nor log a secret or a password.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::Deserialize;
use serde_json::{json, Map, Value as Json};

use super::auth::{random_password, CertificateCredential, Credential, TokenProvider};
use super::client::{Client, Method, Request, Response, RetrySettings, StatsSnapshot, MAX_BATCH};
use super::filter;
use super::map::{from_json, set_path, to_json};
use crate::connector::Secret;
use crate::connector::{
    Applied, ConnectorError, ErrorKind, Target, TargetCapabilities, TargetOperation, Watermark,
};
use crate::delta::CreateReferences;
use crate::model::{
    AttrName, AttributeChange, Attributes, ChangeOp, ObjectType, Reference, TargetId, TargetObject,
    Value, Values,
};

/// The watermark kind of a Graph deltaLink.
pub const WATERMARK_KIND: &str = "graph-delta";

/// Members per `members@odata.bind` request (Graph's limit).
const MEMBERS_PER_REQUEST: usize = 20;

fn default_authority() -> String {
    "https://login.microsoftonline.com".into()
}
fn default_graph_url() -> String {
    "https://graph.microsoft.com/v1.0".into()
}
fn default_writes_per_second() -> f64 {
    // Graph's identity write limit per app and tenant: 3,000 requests per 150 s = 20/s; pace at
    // 95 % of it.
    19.0
}
fn default_max_retries() -> u32 {
    5
}
fn default_restore_keys() -> Vec<String> {
    vec!["onPremisesImmutableId".into(), "employeeId".into()]
}
fn default_page_size() -> u32 {
    999
}
fn default_true() -> bool {
    true
}

/// How the application authenticates, as configuration: a client secret, or a certificate
/// and its private key (PEM files).
#[derive(Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    /// The client secret.
    #[serde(default)]
    pub client_secret: Option<Secret>,
    /// The certificate (PEM).
    #[serde(default)]
    pub certificate_path: Option<PathBuf>,
    /// Its private key (PEM, PKCS #8 or PKCS #1, unencrypted); default: the certificate file.
    #[serde(default)]
    pub private_key_path: Option<PathBuf>,
}

impl std::fmt::Debug for CredentialConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialConfig")
            .field("client_secret", &self.client_secret.as_ref().map(|_| "***"))
            .field("certificate_path", &self.certificate_path)
            .field("private_key_path", &self.private_key_path)
            .finish()
    }
}

impl CredentialConfig {
    /// The credential (reads the PEM files of a certificate).
    pub fn load(&self) -> Result<Credential, ConnectorError> {
        let cfg = |m: String| ConnectorError::new(ErrorKind::Config, m);
        match (&self.client_secret, &self.certificate_path) {
            (Some(s), None) => Ok(Credential::Secret(s.clone())),
            (None, Some(cert)) => {
                let read = |p: &PathBuf| {
                    std::fs::read_to_string(p)
                        .map_err(|e| cfg(format!("graph: reading {}: {e}", p.display())))
                };
                let cert_pem = read(cert)?;
                let key_pem = match &self.private_key_path {
                    Some(k) => read(k)?,
                    None => cert_pem.clone(),
                };
                Ok(Credential::Certificate(CertificateCredential::from_pem(
                    &cert_pem, &key_pem,
                )?))
            }
            (Some(_), Some(_)) => Err(cfg(
                "graph: both client_secret and certificate_path are set; hint: keep one".into(),
            )),
            (None, None) => Err(cfg(
                "graph: no credential; hint: set client_secret or certificate_path".into(),
            )),
        }
    }
}

/// The Graph target's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphConfig {
    /// The tenant (id or domain).
    pub tenant: String,
    /// The application (client) id.
    pub client_id: String,
    /// The client secret (or use a certificate).
    #[serde(default)]
    pub client_secret: Option<Secret>,
    /// The certificate (PEM), for a signed client assertion.
    #[serde(default)]
    pub certificate_path: Option<PathBuf>,
    /// The certificate's private key (PEM); default: the certificate file.
    #[serde(default)]
    pub private_key_path: Option<PathBuf>,
    /// The identity platform authority (national clouds, the emulator).
    #[serde(default = "default_authority")]
    pub authority: String,
    /// The Graph base URL, version included.
    #[serde(default = "default_graph_url")]
    pub graph_url: String,
    /// The token scope; default: the Graph URL's origin + `/.default`.
    #[serde(default)]
    pub scope: Option<String>,
    /// Writes per second the export is paced at (default 19: 95 % of Graph's documented
    /// 3,000 writes per 150 s per app and tenant); 0 turns pacing off.
    #[serde(default = "default_writes_per_second")]
    pub writes_per_second: f64,
    /// Retries of one request after 429/503/504 (each after `Retry-After`).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// The longest `Retry-After` honoured, in seconds.
    #[serde(default)]
    pub max_retry_after_secs: Option<u64>,
    /// How long after a create a 404 on that object counts as replication delay, in seconds
    /// (default 30).
    #[serde(default)]
    pub replication_window_secs: Option<u64>,
    /// Properties looked up among deleted users, in order, to restore instead of creating.
    #[serde(default = "default_restore_keys")]
    pub restore_keys: Vec<String>,
    /// Extra properties read for users (directory extensions, …).
    #[serde(default)]
    pub user_select: Vec<String>,
    /// Extra properties read for groups.
    #[serde(default)]
    pub group_select: Vec<String>,
    /// Page size of list and delta reads.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// New users must change the generated initial password at first sign-in.
    #[serde(default = "default_true")]
    pub force_change_password: bool,
    /// HTTP timeout per request, in seconds (default 60).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

impl GraphConfig {
    /// A configuration with defaults for everything but the tenant, the client and its
    /// credential.
    pub fn new(tenant: &str, client_id: &str, credential: CredentialConfig) -> GraphConfig {
        GraphConfig {
            tenant: tenant.into(),
            client_id: client_id.into(),
            client_secret: credential.client_secret,
            certificate_path: credential.certificate_path,
            private_key_path: credential.private_key_path,
            authority: default_authority(),
            graph_url: default_graph_url(),
            scope: None,
            writes_per_second: default_writes_per_second(),
            max_retries: default_max_retries(),
            max_retry_after_secs: None,
            replication_window_secs: None,
            restore_keys: default_restore_keys(),
            user_select: Vec::new(),
            group_select: Vec::new(),
            page_size: default_page_size(),
            force_change_password: true,
            timeout_secs: None,
        }
    }
}

/// The object kinds the target handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    User,
    Group,
}

impl Kind {
    fn of(t: &ObjectType) -> Result<Kind, ConnectorError> {
        if t.as_str().eq_ignore_ascii_case("user") {
            Ok(Kind::User)
        } else if t.as_str().eq_ignore_ascii_case("group") {
            Ok(Kind::Group)
        } else {
            Err(ConnectorError::new(
                ErrorKind::Unsupported,
                format!("the Graph target handles the object types user and group, not {t}"),
            ))
        }
    }
    fn schema_name(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::Group => "group",
        }
    }
    fn collection(self) -> &'static str {
        match self {
            Kind::User => "/users",
            Kind::Group => "/groups",
        }
    }
}

/// One change a delta read reports.
#[derive(Debug, Clone, PartialEq)]
pub enum GraphChange {
    /// An object created or changed: the properties the response holds, and for groups the
    /// membership changes.
    Changed {
        /// The object (only the properties the response carried).
        object: TargetObject,
        /// Members added.
        members_added: Vec<TargetId>,
        /// Members removed.
        members_removed: Vec<TargetId>,
    },
    /// An object deleted (or out of the query's scope).
    Removed {
        /// Its id.
        id: TargetId,
    },
}

/// The Microsoft Entra ID target. See the module documentation.
#[derive(Clone)]
pub struct GraphTarget {
    name: Arc<str>,
    client: Arc<Client>,
    config: Arc<GraphConfig>,
    recent: Arc<Mutex<HashMap<String, Instant>>>,
    watermarks: Arc<Mutex<HashMap<&'static str, Watermark>>>,
}

impl std::fmt::Debug for GraphTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphTarget")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn protocol(what: String) -> ConnectorError {
    ConnectorError::new(ErrorKind::Protocol, what)
}

/// Percent-encodes a query parameter value.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl GraphTarget {
    /// A target from its configuration (reads the certificate files, if any).
    pub fn new(name: &str, config: GraphConfig) -> Result<GraphTarget, ConnectorError> {
        let credential = CredentialConfig {
            client_secret: config.client_secret.clone(),
            certificate_path: config.certificate_path.clone(),
            private_key_path: config.private_key_path.clone(),
        }
        .load()?;
        GraphTarget::with_credential(name, config, credential)
    }

    /// A target with a credential built by the caller.
    pub fn with_credential(
        name: &str,
        config: GraphConfig,
        credential: Credential,
    ) -> Result<GraphTarget, ConnectorError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_secs.unwrap_or(60)))
            .build()
            .map_err(|e| {
                ConnectorError::new(ErrorKind::Config, format!("graph: HTTP client: {e}"))
            })?;
        let authority = config.authority.trim_end_matches('/');
        let token_url = format!("{authority}/{}/oauth2/v2.0/token", config.tenant);
        let scope = config.scope.clone().unwrap_or_else(|| {
            let u = config.graph_url.trim_end_matches('/');
            let origin = u
                .find("://")
                .and_then(|i| u[i + 3..].find('/').map(|j| &u[..i + 3 + j]))
                .unwrap_or(u);
            format!("{origin}/.default")
        });
        let tokens = TokenProvider::new(
            token_url,
            config.client_id.clone(),
            credential,
            scope,
            Duration::from_secs(300),
        );
        let client = Client::new(
            http,
            config.graph_url.clone(),
            tokens,
            config.writes_per_second,
            RetrySettings {
                max_retries: config.max_retries,
                max_retry_after: Duration::from_secs(config.max_retry_after_secs.unwrap_or(120)),
                not_found_retries: 7,
            },
        );
        Ok(GraphTarget {
            name: name.into(),
            client: Arc::new(client),
            config: Arc::new(config),
            recent: Arc::default(),
            watermarks: Arc::default(),
        })
    }

    /// Request counters (requests, writes, throttles, retries) since the target was made.
    pub fn stats(&self) -> StatsSnapshot {
        self.client.stats.snapshot()
    }

    /// The deltaLink of the last complete read of `object_type` (by [`Target::read`] or
    /// [`GraphTarget::read_changes`]), as a watermark.
    pub fn watermark(&self, object_type: &ObjectType) -> Option<Watermark> {
        let k = Kind::of(object_type).ok()?;
        lock(&self.watermarks).get(k.schema_name()).cloned()
    }

    fn select(&self, kind: Kind) -> String {
        let mut s: Vec<&str> = match kind {
            Kind::User => vec![
                "id",
                "accountEnabled",
                "displayName",
                "givenName",
                "surname",
                "mail",
                "mailNickname",
                "userPrincipalName",
                "jobTitle",
                "department",
                "companyName",
                "employeeId",
                "employeeType",
                "onPremisesImmutableId",
                "onPremisesExtensionAttributes",
                "businessPhones",
                "mobilePhone",
                "officeLocation",
                "city",
                "country",
                "usageLocation",
                "otherMails",
            ],
            Kind::Group => vec![
                "id",
                "displayName",
                "description",
                "mailNickname",
                "mailEnabled",
                "securityEnabled",
                "groupTypes",
            ],
        };
        let extra = match kind {
            Kind::User => &self.config.user_select,
            Kind::Group => &self.config.group_select,
        };
        for e in extra {
            if !s.iter().any(|x| x.eq_ignore_ascii_case(e)) {
                s.push(e);
            }
        }
        s.join(",")
    }

    fn is_recent(&self, id: &str) -> bool {
        let window = Duration::from_secs(self.config.replication_window_secs.unwrap_or(30));
        let mut recent = lock(&self.recent);
        recent.retain(|_, t| t.elapsed() < window);
        recent.contains_key(id)
    }

    fn remember_create(&self, id: &str) {
        lock(&self.recent).insert(id.to_string(), Instant::now());
    }

    fn request(&self, method: Method, path: String, ids: &[&str]) -> Request {
        let mut r = Request::new(method, path);
        r.retry_not_found = ids.iter().any(|i| self.is_recent(i));
        r
    }

    /// The JSON body for `attributes` of a `kind` (members left out).
    fn body(kind: Kind, attributes: &Attributes) -> Result<Map<String, Json>, ConnectorError> {
        let mut body = Map::new();
        for (name, values) in attributes.iter() {
            if kind == Kind::Group && name.is("members") {
                continue;
            }
            let (path, j) = to_json(kind.schema_name(), name.as_str(), values)?;
            set_path(&mut body, &path, j);
        }
        Ok(body)
    }

    fn member_ids(values: &Values) -> Result<Vec<String>, ConnectorError> {
        values
            .iter()
            .map(|v| match v {
                Value::Reference(Reference::Target(t)) => Ok(t.as_str().to_string()),
                Value::String(s) => Ok(s.to_string()),
                other => Err(ConnectorError::new(
                    ErrorKind::Constraint,
                    format!("group member {other} is not a target id"),
                )),
            })
            .collect()
    }

    /// The `members@odata.bind` value for `ids`: their `directoryObjects` URLs.
    fn binds(&self, ids: &[String]) -> Json {
        let base = self.config.graph_url.trim_end_matches('/');
        Json::Array(
            ids.iter()
                .map(|m| Json::String(format!("{base}/directoryObjects/{m}")))
                .collect(),
        )
    }

    /// Adds and removes members, in `$batch`es; adding a present member or removing an absent
    /// one counts as done.
    async fn change_members(
        &self,
        group: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<(), ConnectorError> {
        let base = self.config.graph_url.trim_end_matches('/');
        let mut reqs = Vec::new();
        let mut chunks: Vec<&[String]> = Vec::new();
        for chunk in add.chunks(MEMBERS_PER_REQUEST) {
            let mut ids: Vec<&str> = chunk.iter().map(String::as_str).collect();
            ids.push(group);
            reqs.push(
                self.request(Method::Patch, format!("/groups/{group}"), &ids)
                    .body(json!({ "members@odata.bind": self.binds(chunk) })),
            );
            chunks.push(chunk);
        }
        for m in remove {
            reqs.push(self.request(
                Method::Delete,
                format!("/groups/{group}/members/{m}/$ref"),
                &[group, m],
            ));
        }
        let results = self.client.batch(reqs).await;
        let mut singles = Vec::new();
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(_) => {}
                Err(e) if i < chunks.len() && e.kind() == ErrorKind::ValueExists => {
                    // Some of the chunk were members already: add them one by one.
                    singles.extend(chunks[i].iter().cloned());
                }
                Err(e) if i >= chunks.len() && e.kind() == ErrorKind::NotFound => {
                    // Not a member (any more): the removal has its effect — unless the group
                    // itself is gone, which the next read shows.
                }
                Err(e) => return Err(e.with_object(group)),
            }
        }
        if !singles.is_empty() {
            let reqs = singles
                .iter()
                .map(|m| {
                    self.request(
                        Method::Post,
                        format!("/groups/{group}/members/$ref"),
                        &[group, m],
                    )
                    .body(json!({ "@odata.id": format!("{base}/directoryObjects/{m}") }))
                })
                .collect();
            for r in self.client.batch(reqs).await {
                match r {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::ValueExists => {}
                    Err(e) => return Err(e.with_object(group)),
                }
            }
        }
        Ok(())
    }

    /// Every page of a collection read, following `@odata.nextLink`; the last page's
    /// `@odata.deltaLink`, if any.
    async fn pages(
        &self,
        first: Request,
    ) -> Result<(Vec<Map<String, Json>>, Option<String>), ConnectorError> {
        let mut items = Vec::new();
        let mut req = first;
        loop {
            let Response { body, .. } = self.client.send(req.clone()).await?;
            let Json::Object(mut page) = body else {
                return Err(protocol(format!(
                    "GET {}: the answer is not an object",
                    req.path
                )));
            };
            match page.remove("value") {
                Some(Json::Array(vals)) => {
                    for v in vals {
                        if let Json::Object(o) = v {
                            items.push(o);
                        }
                    }
                }
                Some(_) => {
                    return Err(protocol(format!("GET {}: value is not an array", req.path)))
                }
                None => {}
            }
            if let Some(next) = page.get("@odata.nextLink").and_then(Json::as_str) {
                req = Request {
                    path: next.to_string(),
                    ..req
                };
                continue;
            }
            let delta = page
                .get("@odata.deltaLink")
                .and_then(Json::as_str)
                .map(str::to_string);
            return Ok((items, delta));
        }
    }

    async fn members_of(&self, group: &str) -> Result<Vec<TargetId>, ConnectorError> {
        let req = self.request(
            Method::Get,
            format!(
                "/groups/{group}/members?$select=id&$top={}",
                self.config.page_size
            ),
            &[group],
        );
        let (items, _) = self.pages(req).await?;
        Ok(items
            .iter()
            .filter_map(|m| m.get("id").and_then(Json::as_str).map(TargetId::new))
            .collect())
    }

    fn object(kind: Kind, o: &Map<String, Json>) -> Result<TargetObject, ConnectorError> {
        let id = o
            .get("id")
            .and_then(Json::as_str)
            .ok_or_else(|| protocol(format!("a {} without an id", kind.schema_name())))?;
        let mut t = TargetObject::new(id, kind.schema_name());
        from_json(o, &mut t.attributes);
        Ok(t)
    }

    async fn with_members(&self, mut t: TargetObject) -> Result<TargetObject, ConnectorError> {
        let members = self.members_of(t.id.as_str()).await?;
        if !members.is_empty() {
            t.attributes.set(
                "members",
                members
                    .into_iter()
                    .map(Value::target_ref)
                    .collect::<Values>(),
            );
        }
        Ok(t)
    }

    async fn create(&self, kind: Kind, attributes: &Attributes) -> Result<Applied, ConnectorError> {
        let mut body = Self::body(kind, attributes)?;
        let id = match kind {
            Kind::User => {
                if let Some(id) = self.restore(attributes, &body).await? {
                    return Ok(Applied {
                        id: TargetId::new(id),
                    });
                }
                body.entry("accountEnabled").or_insert(Json::Bool(true));
                let has_password = body
                    .get("passwordProfile")
                    .and_then(|p| p.get("password"))
                    .is_some_and(|p| p.is_string());
                if !has_password {
                    let pw = random_password()?;
                    set_path(
                        &mut body,
                        "passwordProfile.password",
                        Json::String(pw.expose().to_string()),
                    );
                    set_path(
                        &mut body,
                        "passwordProfile.forceChangePasswordNextSignIn",
                        Json::Bool(self.config.force_change_password),
                    );
                }
                self.post_create(kind, body, false).await?
            }
            Kind::Group => {
                body.entry("securityEnabled").or_insert(Json::Bool(true));
                body.entry("mailEnabled").or_insert(Json::Bool(false));
                if !body.contains_key("mailNickname") {
                    let nick: String = body
                        .get("displayName")
                        .and_then(Json::as_str)
                        .unwrap_or("group")
                        .chars()
                        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                        .take(64)
                        .collect();
                    body.insert("mailNickname".into(), Json::String(nick));
                }
                // The first members go in the create (`members@odata.bind`: at most 20
                // relationships per request), the rest in `$batch`ed adds after it.
                let members = match attributes.get("members") {
                    Some(m) => Self::member_ids(m)?,
                    None => Vec::new(),
                };
                let (first, rest) = members.split_at(members.len().min(MEMBERS_PER_REQUEST));
                let recent = first.iter().any(|m| self.is_recent(m));
                if !first.is_empty() {
                    body.insert("members@odata.bind".into(), self.binds(first));
                }
                let id = self.post_create(kind, body, recent).await?;
                if !rest.is_empty() {
                    self.change_members(&id, rest, &[]).await?;
                }
                id
            }
        };
        Ok(Applied {
            id: TargetId::new(id),
        })
    }

    /// POSTs a create; `retry_not_found` when it references objects created moments ago (a 404
    /// may be replication delay).
    async fn post_create(
        &self,
        kind: Kind,
        body: Map<String, Json>,
        retry_not_found: bool,
    ) -> Result<String, ConnectorError> {
        let mut req = Request::new(Method::Post, kind.collection()).body(Json::Object(body));
        req.retry_not_found = retry_not_found;
        let resp = self.client.send(req).await?;
        let id = resp
            .body
            .get("id")
            .and_then(Json::as_str)
            .ok_or_else(|| protocol(format!("POST {}: the answer has no id", kind.collection())))?
            .to_string();
        self.remember_create(&id);
        Ok(id)
    }

    /// A deleted user with the create's restore key, restored and updated; `None` when there
    /// is none.
    async fn restore(
        &self,
        attributes: &Attributes,
        body: &Map<String, Json>,
    ) -> Result<Option<String>, ConnectorError> {
        let Some((key, value)) = self.config.restore_keys.iter().find_map(|k| {
            attributes
                .get(k)
                .and_then(|v| v.iter().next())
                .map(|v| (k, v))
        }) else {
            return Ok(None);
        };
        let f = filter::eq(key, value);
        let mut req = Request::new(
            Method::Get,
            format!(
                "/directory/deletedItems/microsoft.graph.user?$filter={}&$select=id&$count=true",
                enc(&f)
            ),
        );
        req.eventual = true;
        let (found, _) = self.pages(req).await?;
        let [only] = found.as_slice() else {
            return Ok(None);
        };
        let Some(id) = only.get("id").and_then(Json::as_str) else {
            return Ok(None);
        };
        self.client
            .send(Request::new(
                Method::Post,
                format!("/directory/deletedItems/{id}/restore"),
            ))
            .await?;
        self.remember_create(id);
        let mut patch = body.clone();
        patch.remove("passwordProfile");
        if !patch.is_empty() {
            self.client
                .send(
                    self.request(Method::Patch, format!("/users/{id}"), &[id])
                        .body(Json::Object(patch)),
                )
                .await?;
        }
        tracing::info!(
            id,
            key = key.as_str(),
            "deleted user restored instead of created"
        );
        Ok(Some(id.to_string()))
    }

    async fn update(
        &self,
        kind: Kind,
        id: &TargetId,
        changes: &[AttributeChange],
    ) -> Result<Applied, ConnectorError> {
        let idc = id.as_str();
        let mut body = Map::new();
        let mut add = Vec::new();
        let mut remove = Vec::new();
        let mut current: Option<TargetObject> = None;
        for c in changes {
            if kind == Kind::Group && c.attribute.is("members") {
                let vals = Self::member_ids(&c.values)?;
                match c.op {
                    ChangeOp::Add => add.extend(vals),
                    ChangeOp::Remove => remove.extend(vals),
                    ChangeOp::Replace => {
                        let now = self.members_of(idc).await?;
                        let now: Vec<String> = now.iter().map(|t| t.as_str().to_string()).collect();
                        add.extend(vals.iter().filter(|v| !now.contains(v)).cloned());
                        remove.extend(now.into_iter().filter(|n| !vals.contains(n)));
                    }
                }
                continue;
            }
            let values = match c.op {
                ChangeOp::Replace => c.values.clone(),
                ChangeOp::Add | ChangeOp::Remove => {
                    // A collection property: Graph replaces it whole, so start from its value.
                    if current.is_none() {
                        let (path, _) =
                            to_json(kind.schema_name(), c.attribute.as_str(), &c.values)?;
                        let top = path.split('.').next().unwrap_or(&path).to_string();
                        let resp = self
                            .client
                            .send(self.request(
                                Method::Get,
                                format!("{}/{idc}?$select={top}", kind.collection()),
                                &[idc],
                            ))
                            .await?;
                        let o = resp.body.as_object().cloned().unwrap_or_default();
                        current = Some(Self::object(kind, &o)?);
                    }
                    let cur = current.as_mut().map(|o| &mut o.attributes);
                    let mut vals = cur
                        .as_ref()
                        .and_then(|a| a.get(c.attribute.as_str()).cloned())
                        .unwrap_or_default();
                    for v in c.values.iter() {
                        if c.op == ChangeOp::Add {
                            if !vals.iter().any(|x| x.eq_ignore_case(v)) {
                                vals.push(v.clone());
                            }
                        } else {
                            vals.retain(|x| !x.eq_ignore_case(v));
                        }
                    }
                    if let Some(a) = cur {
                        a.set(c.attribute.clone(), vals.clone());
                    }
                    vals
                }
            };
            let (path, j) = to_json(kind.schema_name(), c.attribute.as_str(), &values)?;
            set_path(&mut body, &path, j);
        }
        if !body.is_empty() {
            self.client
                .send(
                    self.request(
                        Method::Patch,
                        format!("{}/{idc}", kind.collection()),
                        &[idc],
                    )
                    .body(Json::Object(body)),
                )
                .await
                .map_err(|e| e.with_object(id))?;
        }
        if !add.is_empty() || !remove.is_empty() {
            self.change_members(idc, &add, &remove).await?;
        }
        Ok(Applied { id: id.clone() })
    }

    async fn apply_one(&self, op: &TargetOperation) -> Result<Applied, ConnectorError> {
        let kind = Kind::of(op.object_type())?;
        match op {
            TargetOperation::Create { attributes, .. } => self.create(kind, attributes).await,
            TargetOperation::Update { id, changes, .. } => self.update(kind, id, changes).await,
            TargetOperation::Delete { id, .. } => {
                self.client
                    .send(self.request(
                        Method::Delete,
                        format!("{}/{}", kind.collection(), id.as_str()),
                        &[id.as_str()],
                    ))
                    .await
                    .map_err(|e| e.with_object(id))?;
                Ok(Applied { id: id.clone() })
            }
        }
    }

    /// Runs a delta query: from `since` (a deltaLink watermark), or from the start. Returns the
    /// changes and the new watermark. A deltaLink Graph no longer serves is an error of kind
    /// [`ErrorKind::InvalidWatermark`]: read everything again.
    pub async fn read_changes(
        &self,
        object_type: &ObjectType,
        since: Option<&Watermark>,
    ) -> Result<(Vec<GraphChange>, Watermark), ConnectorError> {
        let kind = Kind::of(object_type)?;
        let first = match since {
            Some(w) => {
                if w.kind != WATERMARK_KIND {
                    return Err(ConnectorError::new(
                        ErrorKind::InvalidWatermark,
                        format!("a {} watermark is not a Graph deltaLink", w.kind),
                    ));
                }
                let link = w.as_text().ok_or_else(|| {
                    ConnectorError::new(ErrorKind::InvalidWatermark, "the deltaLink is not text")
                })?;
                Request::new(Method::Get, link)
            }
            None => {
                let mut select = self.select(kind);
                if kind == Kind::Group {
                    select.push_str(",members");
                }
                Request::new(
                    Method::Get,
                    format!("{}/delta?$select={}", kind.collection(), enc(&select)),
                )
            }
        };
        let (items, delta) = self.pages(first).await?;
        let delta =
            delta.ok_or_else(|| protocol("a delta query ended without a deltaLink".into()))?;
        // One entry per object: a group can come back on several pages.
        let mut order: Vec<String> = Vec::new();
        let mut changes: HashMap<String, GraphChange> = HashMap::new();
        for o in items {
            let id = o
                .get("id")
                .and_then(Json::as_str)
                .ok_or_else(|| protocol("a delta item without an id".into()))?
                .to_string();
            if o.contains_key("@removed") {
                if !changes.contains_key(&id) {
                    order.push(id.clone());
                }
                changes.insert(
                    id.clone(),
                    GraphChange::Removed {
                        id: TargetId::new(id),
                    },
                );
                continue;
            }
            let mut added = Vec::new();
            let mut removed = Vec::new();
            if let Some(Json::Array(ms)) = o.get("members@delta") {
                for m in ms {
                    let Some(mid) = m.get("id").and_then(Json::as_str) else {
                        continue;
                    };
                    if m.get("@removed").is_some() {
                        removed.push(TargetId::new(mid));
                    } else {
                        added.push(TargetId::new(mid));
                    }
                }
            }
            let obj = Self::object(kind, &o)?;
            match changes.get_mut(&id) {
                Some(GraphChange::Changed {
                    object,
                    members_added,
                    members_removed,
                }) => {
                    for (k, v) in obj.attributes.iter() {
                        object.attributes.set(k.clone(), v.clone());
                    }
                    members_added.extend(added);
                    members_removed.extend(removed);
                }
                _ => {
                    if !changes.contains_key(&id) {
                        order.push(id.clone());
                    }
                    changes.insert(
                        id,
                        GraphChange::Changed {
                            object: obj,
                            members_added: added,
                            members_removed: removed,
                        },
                    );
                }
            }
        }
        let w = Watermark::new(WATERMARK_KIND, delta.into_bytes());
        lock(&self.watermarks).insert(kind.schema_name(), w.clone());
        let out = order
            .into_iter()
            .filter_map(|id| changes.remove(&id))
            .collect();
        Ok((out, w))
    }
}

#[async_trait]
impl Target for GraphTarget {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> TargetCapabilities {
        TargetCapabilities {
            value_level_changes: true,
            // One `$batch` envelope's worth of operations per call.
            max_batch: MAX_BATCH,
            read: true,
            // A `$batch` of 20 queries of 15 values (Graph's limit per `$filter`).
            lookup_batch: filter::MAX_CLAUSES * MAX_BATCH,
            // `POST /groups` takes members as `members@odata.bind`; a user's manager can only
            // be assigned once the user exists (`PUT /users/{id}/manager/$ref`).
            create_references: CreateReferences::Only(vec![(
                ObjectType::new("Group"),
                AttrName::new("members"),
            )]),
        }
    }

    async fn read(
        &self,
        object_type: &ObjectType,
    ) -> Result<BoxStream<'_, Result<TargetObject, ConnectorError>>, ConnectorError> {
        let (changes, _) = self.read_changes(object_type, None).await?;
        let objects: Vec<Result<TargetObject, ConnectorError>> = changes
            .into_iter()
            .filter_map(|c| match c {
                GraphChange::Changed {
                    mut object,
                    members_added,
                    ..
                } => {
                    if !members_added.is_empty() {
                        object.attributes.set(
                            "members",
                            members_added
                                .into_iter()
                                .map(Value::target_ref)
                                .collect::<Values>(),
                        );
                    }
                    Some(Ok(object))
                }
                GraphChange::Removed { .. } => None,
            })
            .collect();
        Ok(Box::pin(futures::stream::iter(objects)))
    }

    async fn get(
        &self,
        object_type: &ObjectType,
        id: &TargetId,
    ) -> Result<Option<TargetObject>, ConnectorError> {
        let kind = Kind::of(object_type)?;
        let req = self.request(
            Method::Get,
            format!(
                "{}/{}?$select={}",
                kind.collection(),
                id.as_str(),
                enc(&self.select(kind))
            ),
            &[id.as_str()],
        );
        match self.client.send(req).await {
            Ok(r) => {
                let o = r.body.as_object().cloned().unwrap_or_default();
                let t = Self::object(kind, &o)?;
                if kind == Kind::Group {
                    Ok(Some(self.with_members(t).await?))
                } else {
                    Ok(Some(t))
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
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

    /// `$filter=path in ('v1','v2',…)` (directory extension properties, documented with `eq`
    /// only: `path eq 'v1' or path eq 'v2' …`), at most 15 values per request as Graph allows
    /// without the advanced query parameters; with them (properties of
    /// `onPremisesExtensionAttributes`), as many as fit a URL of 2,048 characters. The
    /// requests go together in `$batch`es of 20. Every page is read; a group found comes with
    /// its members. `id` is looked up by reading each object.
    async fn find_any(
        &self,
        object_type: &ObjectType,
        attribute: &AttrName,
        values: &[Value],
    ) -> Result<Vec<TargetObject>, ConnectorError> {
        let kind = Kind::of(object_type)?;
        if attribute.is("id") {
            let mut out: Vec<TargetObject> = Vec::new();
            for value in values {
                let id = TargetId::new(value.to_text());
                if let Some(o) = self.get(object_type, &id).await? {
                    if !out.iter().any(|x| x.id == o.id) {
                        out.push(o);
                    }
                }
            }
            return Ok(out);
        }
        let extension = super::csdl::is_extension_property(attribute.as_str());
        let path = if extension {
            attribute.as_str().to_string()
        } else {
            super::csdl::schema()
                .path(kind.schema_name(), attribute.as_str())
                .map(|(p, _)| p)
                .ok_or_else(|| {
                    ConnectorError::new(
                        ErrorKind::Config,
                        format!(
                            "join attribute {attribute} is not a property of {}",
                            kind.schema_name()
                        ),
                    )
                })?
        };
        let advanced = filter::needs_advanced_query(&path);
        let select = enc(&self.select(kind));
        let query = |vals: &[Value]| {
            let f = if extension {
                filter::any_eq(&path, vals)
            } else {
                filter::any_in(&path, vals)
            };
            format!(
                "{}?$filter={}&$select={select}&$top={}{}",
                kind.collection(),
                enc(&f),
                self.config.page_size,
                if advanced { "&$count=true" } else { "" }
            )
        };
        let base = self.config.graph_url.trim_end_matches('/').len();
        let fits = |vals: &[Value]| {
            if advanced {
                vals.len() == 1 || base + query(vals).len() <= filter::MAX_ADVANCED_URL
            } else {
                vals.len() <= filter::MAX_CLAUSES
            }
        };
        let mut queries = Vec::new();
        let mut start = 0;
        while start < values.len() {
            let mut end = start + 1;
            while end < values.len() && fits(&values[start..=end]) {
                end += 1;
            }
            let mut req = Request::new(Method::Get, query(&values[start..end]));
            req.eventual = advanced;
            queries.push(req);
            start = end;
        }
        // The queries (and then the found groups' member reads) go together, in `$batch`es.
        let answers = self
            .client
            .batched(futures::future::join_all(
                queries.into_iter().map(|q| self.pages(q)),
            ))
            .await;
        let mut out: Vec<TargetObject> = Vec::new();
        for answer in answers {
            for o in &answer?.0 {
                let t = Self::object(kind, o)?;
                if !out.iter().any(|x| x.id == t.id) {
                    out.push(t);
                }
            }
        }
        if kind == Kind::Group {
            out = self
                .client
                .batched(futures::future::join_all(
                    out.into_iter().map(|t| self.with_members(t)),
                ))
                .await
                .into_iter()
                .collect::<Result<_, _>>()?;
        }
        Ok(out)
    }

    /// The operations run together, those on one object in order (see
    /// [`Target::apply`]): their requests go out in shared `$batch` envelopes of up to 20 —
    /// the first request of every operation in the first envelopes, the next ones (a group's
    /// further members, a restored user's update) in later ones as answers come in.
    async fn apply(&self, operations: &[TargetOperation]) -> Vec<Result<Applied, ConnectorError>> {
        self.client
            .batched(crate::connector::apply_per_object(operations, |op| {
                self.apply_one(op)
            }))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(enc("a eq 'b&c'"), "a%20eq%20%27b%26c%27");
    }

    #[test]
    fn config_defaults_and_secret_redaction() {
        let c: GraphConfig = toml::from_str(
            "tenant = \"contoso\"\nclient_id = \"app\"\nclient_secret = \"s3cret\"\n",
        )
        .unwrap();
        assert_eq!(c.authority, "https://login.microsoftonline.com");
        assert!((c.writes_per_second - 19.0).abs() < 1e-9);
        assert!(!format!("{c:?}").contains("s3cret"));
        let t = GraphTarget::new("entra", c).unwrap();
        assert!(!format!("{t:?}").contains("s3cret"));
        assert!(Kind::of(&ObjectType::new("device")).is_err());
    }
}
