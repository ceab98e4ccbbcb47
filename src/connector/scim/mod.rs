//! A SCIM 2.0 (RFC 7643, RFC 7644) target: [`ScimTarget`] provisions users and groups into any
//! SCIM service — create by POST, update by PATCH (PUT when the service has no PATCH), delete,
//! disable through the rules' deprovision (`active = false`), join lookups by filter, reading
//! with paging for reconcile, `/Bulk` when the service offers it, ETags when it versions.
//!
//! The connector reads the service's `/ServiceProviderConfig`, `/ResourceTypes` and `/Schemas`
//! once and uses only what they announce. Attribute names are the rules' target names: plain
//! (`userName`), complex (`name.givenName`), filtered multi-valued (`emails[type eq
//! "work"].value`) or qualified by an extension URN
//! (`urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber`); references
//! (`members`, `manager`) are `{"value": id}` objects. Target ids are the SCIM `id`.
//!
//! This module does network I/O and nothing else: no files, no global state. It never panics
//! on a server's answer; anything unreadable is an error of kind
//! [`Protocol`](crate::connector::ErrorKind::Protocol).

mod client;
pub mod filter;
mod map;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value as Json};
use tracing::{debug, warn};

pub use crate::connector::Secret;
pub use client::ScimAuth;

use self::client::{authorize, error_from, transport, url_encode, TokenCache};
use self::map::{from_resource, pack, patch_ops, to_resource, SchemaInfo};
use crate::connector::{
    Applied, ConnectorError, ErrorKind, Target, TargetCapabilities, TargetOperation,
};
use crate::model::{AttrName, Attributes, ObjectType, TargetId, TargetObject, Value};

const PATCH_OP: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
const BULK_REQUEST: &str = "urn:ietf:params:scim:api:messages:2.0:BulkRequest";
const SCIM_JSON: &str = "application/scim+json";
/// The longest join-lookup filter sent, URL-encoded: request lines beyond 8 KiB are refused by
/// common front ends (nginx, Apache), and the rest of the URL needs room.
const MAX_FILTER_BYTES: usize = 4000;
/// `" or "` URL-encoded.
const OR_BYTES: usize = 8;

/// How the connector speaks to the service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// RFC 7644 as written.
    #[default]
    Strict,
    /// What services built for Microsoft Entra provisioning expect: capitalised PATCH `op`
    /// values (`Replace`), Booleans as the strings `"True"`/`"False"` in PATCH values, member
    /// removal by value list; string Booleans are also accepted when reading.
    Entra,
}

/// What to do with attributes of an extension schema the service does not announce for the
/// resource type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownExtensions {
    /// Leave them out of the request (with a warning in the log).
    #[default]
    Skip,
    /// Fail the operation with an error of kind `Constraint`.
    Error,
}

/// The connector's configuration (also the `[target]` section of the `sync` example).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScimConfig {
    /// The service's base URL, e.g. `https://app.example.com/scim/v2`.
    pub base_url: String,
    /// Authentication.
    pub auth: ScimAuth,
    /// The dialect.
    pub dialect: Dialect,
    /// Resources per page when reading (`count`).
    pub page_size: usize,
    /// The most member values one PATCH request adds or removes.
    pub member_chunk: usize,
    /// Use `/Bulk` for multi-operation applies when the service supports it.
    pub bulk: bool,
    /// The most operations per apply call (bounded by the service's bulk limits).
    pub max_batch: usize,
    /// Values per join-lookup query: one `a eq "v1" or a eq "v2" …` filter carries this many
    /// at most (bounded by the service's `filter.maxResults`, and split further to keep the
    /// filter under 4,000 bytes URL-encoded).
    pub lookup_batch: usize,
    /// Send `If-Match` with known versions when the service supports ETags.
    pub etags: bool,
    /// When reading groups for reconcile, read their members too (one request per group;
    /// pages are read with `excludedAttributes=members`).
    pub read_members: bool,
    /// The request timeout, in seconds.
    pub timeout_secs: u64,
    /// Concurrent requests the connector allows (0: no limit of its own).
    pub max_connections: usize,
    /// A PEM file of extra CA certificates to trust.
    pub ca_file: Option<std::path::PathBuf>,
    /// Turns off TLS certificate verification. Only for tests against throwaway services.
    pub danger_accept_invalid_certs: bool,
    /// Attributes of extension schemas the service does not announce.
    pub unknown_extensions: UnknownExtensions,
}

impl Default for ScimConfig {
    fn default() -> Self {
        ScimConfig {
            base_url: String::new(),
            auth: ScimAuth::None,
            dialect: Dialect::Strict,
            page_size: 100,
            member_chunk: 100,
            bulk: true,
            max_batch: 50,
            lookup_batch: 50,
            etags: true,
            read_members: true,
            timeout_secs: 30,
            max_connections: 0,
            ca_file: None,
            danger_accept_invalid_certs: false,
            unknown_extensions: UnknownExtensions::Skip,
        }
    }
}

/// What discovery found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceInfo {
    /// PATCH is supported.
    pub patch: bool,
    /// Bulk is supported, with this many operations per request at most (0: not supported).
    pub bulk_max_operations: usize,
    /// The largest bulk payload, in bytes.
    pub bulk_max_payload: usize,
    /// Filtering is supported.
    pub filter: bool,
    /// The most results a filtered query returns.
    pub filter_max_results: usize,
    /// ETags are supported.
    pub etag: bool,
    /// Sorting is supported.
    pub sort: bool,
    /// The resource types: lower-case name → (endpoint, core schema, extension schemas).
    pub resource_types: HashMap<String, ResourceType>,
    /// Attributes known from `/Schemas`: (lower-case schema URN, lower-case attribute name)
    /// → (multi-valued, type).
    attributes: HashMap<(String, String), (bool, String)>,
}

/// One resource type.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceType {
    /// Its name (`User`).
    pub name: String,
    /// Its endpoint (`/Users`).
    pub endpoint: String,
    /// Its core schema URN.
    pub schema: String,
    /// Its extension schema URNs.
    pub extensions: Vec<String>,
}

struct Typed<'a> {
    info: &'a ServiceInfo,
    core: &'a str,
}

impl SchemaInfo for Typed<'_> {
    fn multi_valued(&self, urn: Option<&str>, attr: &str) -> bool {
        let schema = urn.unwrap_or(self.core).to_ascii_lowercase();
        match self
            .info
            .attributes
            .get(&(schema, attr.to_ascii_lowercase()))
        {
            Some((multi, _)) => *multi,
            None => matches!(
                attr.to_ascii_lowercase().as_str(),
                "members"
                    | "emails"
                    | "phonenumbers"
                    | "addresses"
                    | "groups"
                    | "ims"
                    | "photos"
                    | "entitlements"
                    | "roles"
                    | "x509certificates"
            ),
        }
    }

    fn boolean(&self, urn: Option<&str>, attr: &str) -> bool {
        let schema = urn.unwrap_or(self.core).to_ascii_lowercase();
        match self
            .info
            .attributes
            .get(&(schema, attr.to_ascii_lowercase()))
        {
            Some((_, t)) => t.eq_ignore_ascii_case("boolean"),
            None => attr.eq_ignore_ascii_case("active"),
        }
    }
}

/// A SCIM 2.0 service as a [`Target`].
pub struct ScimTarget {
    name: String,
    config: ScimConfig,
    base: String,
    http: reqwest::Client,
    info: tokio::sync::OnceCell<ServiceInfo>,
    tokens: tokio::sync::Mutex<TokenCache>,
    versions: Mutex<HashMap<TargetId, String>>,
    permits: Option<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for ScimTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScimTarget")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// An HTTP answer: status, headers, body.
struct Answer {
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl ScimTarget {
    /// A target for `config`. Fails (kind `Config`) on a bad URL or CA file; does no I/O.
    pub fn new(config: ScimConfig) -> Result<ScimTarget, ConnectorError> {
        let base = config.base_url.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ConnectorError::new(
                ErrorKind::Config,
                format!(
                    "SCIM base_url {:?} must start with http:// or https://",
                    config.base_url
                ),
            ));
        }
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_secs.max(1)))
            .user_agent(concat!("dirsync/", env!("CARGO_PKG_VERSION")));
        if config.danger_accept_invalid_certs {
            b = b.danger_accept_invalid_certs(true);
        }
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca).map_err(|e| {
                ConnectorError::new(
                    ErrorKind::Config,
                    format!("SCIM ca_file {}: {e}", ca.display()),
                )
            })?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                ConnectorError::new(
                    ErrorKind::Config,
                    format!("SCIM ca_file {}: {e}", ca.display()),
                )
            })? {
                b = b.add_root_certificate(cert);
            }
        }
        let http = b.build().map_err(|e| {
            ConnectorError::new(ErrorKind::Config, format!("SCIM HTTP client: {e}"))
        })?;
        let permits = (config.max_connections > 0)
            .then(|| tokio::sync::Semaphore::new(config.max_connections));
        Ok(ScimTarget {
            name: "scim".into(),
            base,
            http,
            info: tokio::sync::OnceCell::new(),
            tokens: tokio::sync::Mutex::new(TokenCache::default()),
            versions: Mutex::new(HashMap::new()),
            permits,
            config,
        })
    }

    /// Renames the target (logs, errors).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// What the service announced (discovering it on first use).
    pub async fn service_info(&self) -> Result<&ServiceInfo, ConnectorError> {
        self.info.get_or_try_init(|| self.discover()).await
    }

    async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Json>,
        if_match: Option<&str>,
    ) -> Result<Answer, ConnectorError> {
        let url = format!("{}{}", self.base, path_and_query);
        let what = format!("{} {}{}", self.name, method, path_and_query);
        let _permit = match &self.permits {
            Some(p) => Some(p.acquire().await.map_err(|_| {
                ConnectorError::new(ErrorKind::Other, format!("{what}: connector closed"))
            })?),
            None => None,
        };
        let mut req = self.http.request(method, &url).header("Accept", SCIM_JSON);
        if let Some(b) = body {
            let bytes = serde_json::to_vec(b)
                .map_err(|e| ConnectorError::new(ErrorKind::Other, format!("{what}: {e}")))?;
            req = req.header("Content-Type", SCIM_JSON).body(bytes);
        }
        if let Some(v) = if_match {
            req = req.header("If-Match", v);
        }
        let req = authorize(&self.http, &self.config.auth, &self.tokens, req).await?;
        let resp = req.send().await.map_err(|e| transport(e, &what))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .map_err(|e| transport(e, &what))?
            .to_vec();
        if status == StatusCode::UNAUTHORIZED {
            self.tokens.lock().await.forget();
        }
        if !status.is_success() {
            return Err(error_from(status, &headers, &body, &what));
        }
        Ok(Answer { headers, body })
    }

    async fn get_json(&self, path: &str) -> Result<Json, ConnectorError> {
        let a = self.request(Method::GET, path, None, None).await?;
        parse(&a.body, &format!("{} GET {path}", self.name))
    }

    async fn discover(&self) -> Result<ServiceInfo, ConnectorError> {
        let spc = self.get_json("/ServiceProviderConfig").await?;
        let flag = |k: &str| {
            spc.get(k)
                .and_then(|v| v.get("supported"))
                .map(truthy)
                .unwrap_or(false)
        };
        let num = |k: &str, f: &str| {
            spc.get(k)
                .and_then(|v| v.get(f))
                .and_then(Json::as_u64)
                .unwrap_or(0) as usize
        };
        let mut info = ServiceInfo {
            patch: flag("patch"),
            bulk_max_operations: if flag("bulk") {
                num("bulk", "maxOperations")
            } else {
                0
            },
            bulk_max_payload: num("bulk", "maxPayloadSize"),
            filter: flag("filter"),
            filter_max_results: num("filter", "maxResults"),
            etag: flag("etag"),
            sort: flag("sort"),
            ..ServiceInfo::default()
        };
        match self.get_json("/ResourceTypes").await {
            Ok(j) => {
                for r in list_resources(&j) {
                    let (Some(name), Some(endpoint), Some(schema)) = (
                        r.get("name").and_then(Json::as_str),
                        r.get("endpoint").and_then(Json::as_str),
                        r.get("schema").and_then(Json::as_str),
                    ) else {
                        continue;
                    };
                    let extensions = r
                        .get("schemaExtensions")
                        .and_then(Json::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|e| e.get("schema").and_then(Json::as_str))
                                .map(str::to_string)
                                .collect()
                        })
                        .unwrap_or_default();
                    let endpoint = if endpoint.starts_with('/') {
                        endpoint.to_string()
                    } else {
                        format!("/{endpoint}")
                    };
                    info.resource_types.insert(
                        name.to_ascii_lowercase(),
                        ResourceType {
                            name: name.to_string(),
                            endpoint,
                            schema: schema.to_string(),
                            extensions,
                        },
                    );
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                debug!("no /ResourceTypes: assuming /Users and /Groups");
            }
            Err(e) => return Err(e),
        }
        for (name, endpoint, schema, ext) in [
            (
                "User",
                "/Users",
                "urn:ietf:params:scim:schemas:core:2.0:User",
                Some("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"),
            ),
            (
                "Group",
                "/Groups",
                "urn:ietf:params:scim:schemas:core:2.0:Group",
                None,
            ),
        ] {
            info.resource_types
                .entry(name.to_ascii_lowercase())
                .or_insert_with(|| ResourceType {
                    name: name.into(),
                    endpoint: endpoint.into(),
                    schema: schema.into(),
                    extensions: ext.into_iter().map(str::to_string).collect(),
                });
        }
        match self.get_json("/Schemas").await {
            Ok(j) => {
                for s in list_resources(&j) {
                    let Some(id) = s.get("id").and_then(Json::as_str) else {
                        continue;
                    };
                    for a in s
                        .get("attributes")
                        .and_then(Json::as_array)
                        .into_iter()
                        .flatten()
                    {
                        if let Some(n) = a.get("name").and_then(Json::as_str) {
                            let multi = a.get("multiValued").map(truthy).unwrap_or(false);
                            let ty = a.get("type").and_then(Json::as_str).unwrap_or("string");
                            info.attributes.insert(
                                (id.to_ascii_lowercase(), n.to_ascii_lowercase()),
                                (multi, ty.to_string()),
                            );
                        }
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => debug!("no /Schemas"),
            Err(e) => return Err(e),
        }
        debug!(?info.patch, bulk = info.bulk_max_operations, ?info.etag, "SCIM service discovered");
        Ok(info)
    }

    fn resource_type<'a>(
        &self,
        info: &'a ServiceInfo,
        object_type: &ObjectType,
    ) -> Result<&'a ResourceType, ConnectorError> {
        info.resource_types
            .get(&object_type.as_str().to_ascii_lowercase())
            .ok_or_else(|| {
                ConnectorError::new(
                    ErrorKind::Config,
                    format!(
                        "{}: the service has no resource type {object_type} (it has: {})",
                        self.name,
                        info.resource_types
                            .values()
                            .map(|r| r.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })
    }

    fn keep<'a>(&'a self, rt: &'a ResourceType) -> impl Fn(&str) -> bool + 'a {
        move |urn: &str| rt.extensions.iter().any(|e| e.eq_ignore_ascii_case(urn))
    }

    fn skipped(&self, rt: &ResourceType, skipped: &[String]) -> Result<(), ConnectorError> {
        if skipped.is_empty() {
            return Ok(());
        }
        match self.config.unknown_extensions {
            UnknownExtensions::Skip => {
                warn!(resource_type = %rt.name, attributes = ?skipped, "attributes of extension schemas the service does not announce were left out");
                Ok(())
            }
            UnknownExtensions::Error => Err(ConnectorError::new(
                ErrorKind::Constraint,
                format!(
                    "{}: the service does not announce the extension schema of {} for {}",
                    self.name,
                    skipped.join(", "),
                    rt.name
                ),
            )),
        }
    }

    fn remember(&self, id: &TargetId, headers: &reqwest::header::HeaderMap, body: Option<&Json>) {
        let v = headers
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| {
                body.and_then(|b| b.pointer("/meta/version"))
                    .and_then(Json::as_str)
                    .map(str::to_string)
            });
        if let Ok(mut m) = self.versions.lock() {
            match v {
                Some(v) => {
                    m.insert(id.clone(), v);
                }
                None => {
                    m.remove(id);
                }
            }
        }
    }

    fn version(&self, info: &ServiceInfo, id: &TargetId) -> Option<String> {
        if !(info.etag && self.config.etags) {
            return None;
        }
        self.versions.lock().ok()?.get(id).cloned()
    }

    fn forget(&self, id: &TargetId) {
        if let Ok(mut m) = self.versions.lock() {
            m.remove(id);
        }
    }

    fn to_object(
        &self,
        info: &ServiceInfo,
        rt: &ResourceType,
        r: &Json,
    ) -> Result<TargetObject, ConnectorError> {
        let Some(m) = r.as_object() else {
            return Err(ConnectorError::new(
                ErrorKind::Protocol,
                format!("{}: a {} resource is not a JSON object", self.name, rt.name),
            ));
        };
        let id = m.get("id").and_then(Json::as_str).ok_or_else(|| {
            ConnectorError::new(
                ErrorKind::Protocol,
                format!("{}: a {} resource has no id", self.name, rt.name),
            )
        })?;
        let typed = Typed {
            info,
            core: &rt.schema,
        };
        Ok(TargetObject {
            id: TargetId::new(id),
            object_type: ObjectType::new(rt.name.as_str()),
            attributes: from_resource(m, &typed),
        })
    }

    async fn create(
        &self,
        info: &ServiceInfo,
        object_type: &ObjectType,
        attributes: &Attributes,
    ) -> Result<Applied, ConnectorError> {
        let rt = self.resource_type(info, object_type)?;
        let body = self.create_body(info, rt, attributes)?;
        let a = self
            .request(Method::POST, &rt.endpoint, Some(&body), None)
            .await?;
        let j = parse(&a.body, &format!("{} POST {}", self.name, rt.endpoint))?;
        let id = j.get("id").and_then(Json::as_str).ok_or_else(|| {
            ConnectorError::new(
                ErrorKind::Protocol,
                format!(
                    "{} POST {}: the created resource has no id",
                    self.name, rt.endpoint
                ),
            )
        })?;
        let id = TargetId::new(id);
        self.remember(&id, &a.headers, Some(&j));
        Ok(Applied { id })
    }

    fn create_body(
        &self,
        info: &ServiceInfo,
        rt: &ResourceType,
        attributes: &Attributes,
    ) -> Result<Json, ConnectorError> {
        let typed = Typed {
            info,
            core: &rt.schema,
        };
        let mut skipped = Vec::new();
        let keep = self.keep(rt);
        let body =
            to_resource(attributes, &rt.schema, &typed, &keep, &mut skipped).map_err(|m| {
                ConnectorError::new(ErrorKind::Constraint, format!("{}: {m}", self.name))
            })?;
        self.skipped(rt, &skipped)?;
        Ok(body)
    }

    async fn update(
        &self,
        info: &ServiceInfo,
        id: &TargetId,
        object_type: &ObjectType,
        changes: &[crate::model::AttributeChange],
    ) -> Result<Applied, ConnectorError> {
        let rt = self.resource_type(info, object_type)?;
        let path = format!("{}/{}", rt.endpoint, url_encode(id.as_str()));
        if !info.patch {
            return self.put(info, rt, id, &path, changes).await;
        }
        let requests = self.patch_requests(info, rt, changes)?;
        for ops in requests {
            let body = json!({ "schemas": [PATCH_OP], "Operations": ops });
            let version = self.version(info, id);
            match self
                .request(Method::PATCH, &path, Some(&body), version.as_deref())
                .await
            {
                Ok(a) => {
                    let j = if a.body.is_empty() {
                        None
                    } else {
                        serde_json::from_slice(&a.body).ok()
                    };
                    self.remember(id, &a.headers, j.as_ref());
                }
                Err(e) => return Err(self.failed(id, e, &path).await),
            }
        }
        Ok(Applied { id: id.clone() })
    }

    fn patch_requests(
        &self,
        info: &ServiceInfo,
        rt: &ResourceType,
        changes: &[crate::model::AttributeChange],
    ) -> Result<Vec<Vec<Json>>, ConnectorError> {
        let typed = Typed {
            info,
            core: &rt.schema,
        };
        let mut skipped = Vec::new();
        let keep = self.keep(rt);
        let ops = patch_ops(
            changes,
            &rt.schema,
            &typed,
            self.config.dialect,
            self.config.member_chunk,
            &keep,
            &mut skipped,
        )
        .map_err(|m| ConnectorError::new(ErrorKind::Constraint, format!("{}: {m}", self.name)))?;
        self.skipped(rt, &skipped)?;
        Ok(pack(ops, self.config.member_chunk))
    }

    /// After a failed write: a 412 forgets the known version and re-reads the object, so the
    /// next attempt is planned from what the service holds.
    async fn failed(&self, id: &TargetId, e: ConnectorError, path: &str) -> ConnectorError {
        if e.kind() == ErrorKind::Conflict {
            self.forget(id);
            if let Ok(a) = self.request(Method::GET, path, None, None).await {
                let j = serde_json::from_slice::<Json>(&a.body).ok();
                self.remember(id, &a.headers, j.as_ref());
            }
        }
        e.with_object(id)
    }

    async fn put(
        &self,
        info: &ServiceInfo,
        rt: &ResourceType,
        id: &TargetId,
        path: &str,
        changes: &[crate::model::AttributeChange],
    ) -> Result<Applied, ConnectorError> {
        let a = self.request(Method::GET, path, None, None).await?;
        let j = parse(&a.body, &format!("{} GET {path}", self.name))?;
        self.remember(id, &a.headers, Some(&j));
        let mut obj = self.to_object(info, rt, &j)?;
        for c in changes {
            obj.attributes.apply(c, false).map_err(|e| {
                ConnectorError::new(ErrorKind::Constraint, format!("{}: {e}", self.name))
                    .with_object(id)
            })?;
        }
        obj.attributes.prune();
        let mut body = self.create_body(info, rt, &obj.attributes)?;
        if let Some(m) = body.as_object_mut() {
            m.insert("id".into(), Json::String(id.as_str().to_string()));
        }
        let version = self.version(info, id);
        match self
            .request(Method::PUT, path, Some(&body), version.as_deref())
            .await
        {
            Ok(a) => {
                let j = serde_json::from_slice::<Json>(&a.body).ok();
                self.remember(id, &a.headers, j.as_ref());
                Ok(Applied { id: id.clone() })
            }
            Err(e) => Err(self.failed(id, e, path).await),
        }
    }

    async fn delete(
        &self,
        info: &ServiceInfo,
        id: &TargetId,
        object_type: &ObjectType,
    ) -> Result<Applied, ConnectorError> {
        let rt = self.resource_type(info, object_type)?;
        let path = format!("{}/{}", rt.endpoint, url_encode(id.as_str()));
        let version = self.version(info, id);
        match self
            .request(Method::DELETE, &path, None, version.as_deref())
            .await
        {
            Ok(_) => {
                self.forget(id);
                Ok(Applied { id: id.clone() })
            }
            Err(e) => Err(self.failed(id, e, &path).await),
        }
    }

    async fn apply_one(
        &self,
        info: &ServiceInfo,
        op: &TargetOperation,
    ) -> Result<Applied, ConnectorError> {
        match op {
            TargetOperation::Create {
                object_type,
                attributes,
            } => self.create(info, object_type, attributes).await,
            TargetOperation::Update {
                id,
                object_type,
                changes,
            } => self.update(info, id, object_type, changes).await,
            TargetOperation::Delete { id, object_type } => self.delete(info, id, object_type).await,
        }
    }

    /// One bulk operation for `op`, or `None` when it must go on its own (a PATCH needing
    /// several requests, or no PATCH support).
    fn bulk_op(
        &self,
        info: &ServiceInfo,
        i: usize,
        op: &TargetOperation,
    ) -> Result<Option<Json>, ConnectorError> {
        let rt = self.resource_type(info, op.object_type())?;
        Ok(match op {
            TargetOperation::Create { attributes, .. } => Some(json!({
                "method": "POST", "path": rt.endpoint, "bulkId": format!("op{i}"),
                "data": self.create_body(info, rt, attributes)?,
            })),
            TargetOperation::Update { id, changes, .. } if info.patch => {
                let mut reqs = self.patch_requests(info, rt, changes)?;
                if reqs.len() != 1 {
                    return Ok(None);
                }
                let ops = reqs.pop().unwrap_or_default();
                let mut o = json!({
                    "method": "PATCH", "path": format!("{}/{}", rt.endpoint, id.as_str()),
                    "data": { "schemas": [PATCH_OP], "Operations": ops },
                });
                if let (Some(v), Some(m)) = (self.version(info, id), o.as_object_mut()) {
                    m.insert("version".into(), Json::String(v));
                }
                Some(o)
            }
            TargetOperation::Update { .. } => None,
            TargetOperation::Delete { id, .. } => {
                let mut o = json!({ "method": "DELETE", "path": format!("{}/{}", rt.endpoint, id.as_str()) });
                if let (Some(v), Some(m)) = (self.version(info, id), o.as_object_mut()) {
                    m.insert("version".into(), Json::String(v));
                }
                Some(o)
            }
        })
    }

    /// Applies `ops` through `/Bulk`, each outcome in order. The operations go in waves: an
    /// operation on an object an earlier operation of the call also changes waits for the next
    /// wave (its `If-Match` version and its order depend on that one's outcome). Each wave is
    /// one bulk request (more where the service's `maxOperations` or `maxPayloadSize` ask for
    /// it); an operation that cannot go in a bulk request (a PATCH needing several requests)
    /// is sent on its own in its wave. `failOnErrors` is left out: the service runs every
    /// operation whatever fails (RFC 7644 §3.7.3), and each outcome is matched to its
    /// operation by `bulkId` (creates) or method and location (the others), never by position.
    async fn apply_bulk(
        &self,
        info: &ServiceInfo,
        ops: &[TargetOperation],
    ) -> Vec<Result<Applied, ConnectorError>> {
        let mut out: Vec<Option<Result<Applied, ConnectorError>>> =
            (0..ops.len()).map(|_| None).collect();
        let mut waves: Vec<Vec<usize>> = Vec::new();
        let mut last: HashMap<&TargetId, usize> = HashMap::new();
        for (i, op) in ops.iter().enumerate() {
            let w = match op.id() {
                Some(id) => {
                    let w = last.get(id).map_or(0, |w| w + 1);
                    last.insert(id, w);
                    w
                }
                None => 0,
            };
            if waves.len() <= w {
                waves.resize_with(w + 1, Vec::new);
            }
            waves[w].push(i);
        }
        for wave in waves {
            let mut pending: Vec<(usize, Json)> = Vec::new();
            for i in wave {
                match self.bulk_op(info, i, &ops[i]) {
                    Ok(Some(j)) => pending.push((i, j)),
                    Ok(None) => out[i] = Some(self.apply_one(info, &ops[i]).await),
                    Err(e) => out[i] = Some(Err(e)),
                }
            }
            for batch in self.bulk_requests(info, pending) {
                self.send_bulk(ops, &batch, &mut out).await;
            }
        }
        out.into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(ConnectorError::new(ErrorKind::Protocol, "no bulk outcome"))
                })
            })
            .collect()
    }

    /// `pending` bulk operations split into requests within the service's limits.
    fn bulk_requests(
        &self,
        info: &ServiceInfo,
        pending: Vec<(usize, Json)>,
    ) -> Vec<Vec<(usize, Json)>> {
        let max_ops = info.bulk_max_operations.max(1);
        let max_payload = if info.bulk_max_payload == 0 {
            usize::MAX
        } else {
            info.bulk_max_payload
        };
        let mut batches: Vec<Vec<(usize, Json)>> = Vec::new();
        let mut size = 0usize;
        for (i, j) in pending {
            let len = serde_json::to_vec(&j).map(|v| v.len()).unwrap_or(0) + 1;
            match batches.last_mut() {
                Some(b) if b.len() < max_ops && size + len + 200 < max_payload => {
                    size += len;
                    b.push((i, j));
                }
                _ => {
                    size = len;
                    batches.push(vec![(i, j)]);
                }
            }
        }
        batches
    }

    /// Sends one bulk request and records the outcome of each of its operations in `out`.
    async fn send_bulk(
        &self,
        ops: &[TargetOperation],
        batch: &[(usize, Json)],
        out: &mut [Option<Result<Applied, ConnectorError>>],
    ) {
        let body = json!({
            "schemas": [BULK_REQUEST],
            "Operations": batch.iter().map(|(_, j)| j.clone()).collect::<Vec<_>>(),
        });
        let results = match self.request(Method::POST, "/Bulk", Some(&body), None).await {
            Ok(a) => parse(&a.body, &format!("{} POST /Bulk", self.name)).map(|j| {
                j.get("Operations")
                    .and_then(Json::as_array)
                    .cloned()
                    .unwrap_or_default()
            }),
            Err(e) => Err(e),
        };
        match results {
            Err(e) => {
                for (i, _) in batch {
                    let mut each = ConnectorError::new(e.kind(), e.message().to_string());
                    if let Some(after) = e.retry_after() {
                        each = each.with_retry_after(after);
                    }
                    out[*i] = Some(Err(each));
                }
            }
            Ok(results) => {
                for (i, sent) in batch {
                    let r = results.iter().find(|r| same_operation(sent, r));
                    out[*i] = Some(self.bulk_result(&ops[*i], sent, r));
                }
            }
        }
    }

    fn bulk_result(
        &self,
        op: &TargetOperation,
        sent: &Json,
        r: Option<&Json>,
    ) -> Result<Applied, ConnectorError> {
        let what = format!(
            "{} /Bulk {} {}",
            self.name,
            sent["method"].as_str().unwrap_or(""),
            sent["path"].as_str().unwrap_or("")
        );
        let r = r.ok_or_else(|| {
            ConnectorError::new(
                ErrorKind::Protocol,
                format!("{what}: no result for the operation"),
            )
        })?;
        let status = match r.get("status") {
            Some(Json::String(s)) => s.trim().get(..3).and_then(|s| s.parse::<u16>().ok()),
            Some(Json::Number(n)) => n.as_u64().map(|n| n as u16),
            Some(Json::Object(m)) => m
                .get("code")
                .and_then(Json::as_str)
                .and_then(|s| s.parse().ok()),
            _ => None,
        }
        .ok_or_else(|| {
            ConnectorError::new(
                ErrorKind::Protocol,
                format!("{what}: the result has no status"),
            )
        })?;
        if !(200..300).contains(&status) {
            let resp = r.get("response");
            let st = resp
                .and_then(|x| x.get("scimType"))
                .and_then(Json::as_str)
                .map(str::to_string);
            let detail = resp
                .and_then(|x| x.get("detail"))
                .and_then(Json::as_str)
                .map(str::to_string);
            let mut e = client::error_parts(status, st, detail, b"", &what, None);
            if let Some(id) = op.id() {
                if e.kind() == ErrorKind::Conflict {
                    self.forget(id);
                }
                e = e.with_object(id);
            }
            return Err(e);
        }
        let id = match op.id() {
            Some(id) => id.clone(),
            None => {
                let loc = r.get("location").and_then(Json::as_str).ok_or_else(|| {
                    ConnectorError::new(
                        ErrorKind::Protocol,
                        format!("{what}: the created resource has no location"),
                    )
                })?;
                let id = loc.trim_end_matches('/').rsplit('/').next().unwrap_or("");
                if id.is_empty() {
                    return Err(ConnectorError::new(
                        ErrorKind::Protocol,
                        format!("{what}: no id in location {loc}"),
                    ));
                }
                TargetId::new(id)
            }
        };
        if let Ok(mut m) = self.versions.lock() {
            match r.get("version").and_then(Json::as_str) {
                Some(v) if !matches!(op, TargetOperation::Delete { .. }) => {
                    m.insert(id.clone(), v.to_string());
                }
                _ => {
                    m.remove(&id);
                }
            }
        }
        Ok(Applied { id })
    }

    /// One page of `count` resources of `rt` from `start` (1-based), members left out when
    /// `exclude_members`: the objects, `totalResults`, and how many resources the page held.
    async fn page(
        &self,
        info: &ServiceInfo,
        rt: &ResourceType,
        query: Option<&str>,
        start: usize,
        exclude_members: bool,
        count: usize,
    ) -> Result<(Vec<TargetObject>, usize, usize), ConnectorError> {
        let mut q = format!("{}?startIndex={start}&count={}", rt.endpoint, count.max(1));
        if let Some(f) = query {
            q.push_str("&filter=");
            q.push_str(&url_encode(f));
        }
        if exclude_members {
            q.push_str("&excludedAttributes=members");
        }
        let j = self.get_json(&q).await?;
        let total = j
            .get("totalResults")
            .and_then(Json::as_u64)
            .ok_or_else(|| {
                ConnectorError::new(
                    ErrorKind::Protocol,
                    format!(
                        "{} GET {q}: not a ListResponse (no totalResults)",
                        self.name
                    ),
                )
            })? as usize;
        let items = list_resources(&j);
        let n = items.len();
        let objs = items
            .iter()
            .map(|r| self.to_object(info, rt, r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((objs, total, n))
    }

    async fn members(
        &self,
        rt: &ResourceType,
        id: &TargetId,
    ) -> Result<Attributes, ConnectorError> {
        let path = format!(
            "{}/{}?attributes=members",
            rt.endpoint,
            url_encode(id.as_str())
        );
        let j = self.get_json(&path).await?;
        let mut a = Attributes::new();
        for m in j
            .get("members")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(v) = m.get("value").and_then(Json::as_str) {
                a.add("members", Value::target_ref(v));
            }
        }
        Ok(a)
    }
}

/// Whether the bulk response operation `r` answers the bulk request operation `sent`: the same
/// `bulkId` (creates), or the same method and a location ending with the sent path.
fn same_operation(sent: &Json, r: &Json) -> bool {
    if let Some(b) = sent.get("bulkId") {
        return r.get("bulkId") == Some(b);
    }
    let method = |j: &Json| {
        j.get("method")
            .and_then(Json::as_str)
            .map(str::to_ascii_uppercase)
    };
    let (Some(path), Some(location)) = (
        sent.get("path").and_then(Json::as_str),
        r.get("location").and_then(Json::as_str),
    ) else {
        return false;
    };
    method(sent) == method(r)
        && r.get("bulkId").is_none_or(Json::is_null)
        && location
            .trim_end_matches('/')
            .ends_with(path.trim_end_matches('/'))
}

fn truthy(v: &Json) -> bool {
    match v {
        Json::Bool(b) => *b,
        Json::String(s) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

fn parse(body: &[u8], what: &str) -> Result<Json, ConnectorError> {
    serde_json::from_slice(body).map_err(|e| {
        ConnectorError::new(
            ErrorKind::Protocol,
            format!("{what}: the answer is not JSON ({e}; {} bytes)", body.len()),
        )
    })
}

fn list_resources(j: &Json) -> Vec<Json> {
    j.get("Resources")
        .and_then(Json::as_array)
        .cloned()
        .unwrap_or_default()
}

#[async_trait]
impl Target for ScimTarget {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> TargetCapabilities {
        // Before discovery (nothing asked of the service yet) the configured size: a service
        // without bulk then gets its operations one request each, within the call.
        let max_batch = match (self.config.bulk, self.info.get()) {
            (false, _) => 1,
            (true, None) => self.config.max_batch.max(1),
            (true, Some(i)) if i.bulk_max_operations > 1 => {
                self.config.max_batch.clamp(1, i.bulk_max_operations)
            }
            (true, Some(_)) => 1,
        };
        TargetCapabilities {
            value_level_changes: true,
            max_batch,
            read: true,
            lookup_batch: self.config.lookup_batch.max(1),
            ..TargetCapabilities::default()
        }
    }

    async fn read(
        &self,
        object_type: &ObjectType,
    ) -> Result<BoxStream<'_, Result<TargetObject, ConnectorError>>, ConnectorError> {
        let info = self.service_info().await?;
        let rt = self.resource_type(info, object_type)?.clone();
        let is_group = info
            .attributes
            .contains_key(&(rt.schema.to_ascii_lowercase(), "members".into()))
            || rt.name.eq_ignore_ascii_case("group");
        let init = (Some(1usize), Vec::<TargetObject>::new().into_iter(), rt);
        let s = stream::unfold(init, move |(mut next, mut buf, rt)| async move {
            loop {
                if let Some(o) = buf.next() {
                    let o = if is_group && self.config.read_members {
                        self.members(&rt, &o.id).await.map(|m| {
                            let mut o = o;
                            for (n, v) in m.iter() {
                                o.attributes.set(n.clone(), v.clone());
                            }
                            o
                        })
                    } else {
                        Ok(o)
                    };
                    return Some((o, (next, buf, rt)));
                }
                let start = next?;
                let count = self.config.page_size;
                match self.page(info, &rt, None, start, is_group, count).await {
                    Ok((objs, total, n)) => {
                        let after = start + n;
                        next = (n > 0 && after <= total).then_some(after);
                        buf = objs.into_iter();
                    }
                    Err(e) => return Some((Err(e), (None, Vec::new().into_iter(), rt))),
                }
            }
        });
        Ok(s.boxed())
    }

    async fn get(
        &self,
        object_type: &ObjectType,
        id: &TargetId,
    ) -> Result<Option<TargetObject>, ConnectorError> {
        let info = self.service_info().await?;
        let rt = self.resource_type(info, object_type)?;
        let path = format!("{}/{}", rt.endpoint, url_encode(id.as_str()));
        match self.request(Method::GET, &path, None, None).await {
            Ok(a) => {
                let j = parse(&a.body, &format!("{} GET {path}", self.name))?;
                self.remember(id, &a.headers, Some(&j));
                Ok(Some(self.to_object(info, rt, &j)?))
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

    /// One filtered query per run of values, `a eq "v1" or a eq "v2" …` (each value quoted by
    /// [`filter::comp_value`]), every page of its answer read; without filtering, one read of
    /// the resource type compared here.
    async fn find_any(
        &self,
        object_type: &ObjectType,
        attribute: &AttrName,
        values: &[Value],
    ) -> Result<Vec<TargetObject>, ConnectorError> {
        let info = self.service_info().await?;
        let rt = self.resource_type(info, object_type)?;
        if !filter::is_attr_path(attribute.as_str()) {
            return Err(ConnectorError::new(
                ErrorKind::Config,
                format!(
                    "{}: {attribute:?} cannot be looked up by filter (not an attribute path)",
                    self.name
                ),
            ));
        }
        if values.is_empty() {
            return Ok(Vec::new());
        }
        if !info.filter {
            // No filtering: read everything and compare here.
            let mut out = Vec::new();
            let mut s = self.read(object_type).await?;
            while let Some(o) = s.next().await {
                let o = o?;
                if o.attributes.get(attribute.as_str()).is_some_and(|vs| {
                    vs.iter()
                        .any(|v| values.iter().any(|w| v.eq_ignore_case(w)))
                }) {
                    out.push(o);
                }
            }
            return Ok(out);
        }
        let mut per_query = self.config.lookup_batch.max(1);
        if info.filter_max_results > 0 {
            per_query = per_query.min(info.filter_max_results);
        }
        let runs = crate::connector::split_runs(values, per_query, MAX_FILTER_BYTES, |v| {
            filter::eq(attribute.as_str(), v).map_or(0, |c| url_encode(&c).len() + OR_BYTES)
        });
        let mut out: Vec<TargetObject> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for run in runs {
            let f = filter::any_eq(attribute.as_str(), run).ok_or_else(|| {
                ConnectorError::new(
                    ErrorKind::Config,
                    format!("{}: {attribute:?} is not an attribute path", self.name),
                )
            })?;
            let count = self.config.page_size.max(run.len());
            let mut start = 1;
            loop {
                let (objs, total, n) = self.page(info, rt, Some(&f), start, false, count).await?;
                for o in objs {
                    if seen.insert(o.id.clone()) {
                        out.push(o);
                    }
                }
                start += n;
                if n == 0 || start > total {
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn apply(&self, operations: &[TargetOperation]) -> Vec<Result<Applied, ConnectorError>> {
        let info = match self.service_info().await {
            Ok(i) => i,
            Err(e) => {
                return operations
                    .iter()
                    .map(|_| Err(ConnectorError::new(e.kind(), e.message().to_string())))
                    .collect()
            }
        };
        if operations.len() > 1 && self.config.bulk && info.bulk_max_operations > 0 {
            return self.apply_bulk(info, operations).await;
        }
        let mut out = Vec::with_capacity(operations.len());
        for op in operations {
            out.push(self.apply_one(info, op).await);
        }
        out
    }
}
