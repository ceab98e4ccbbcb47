//! Configuration of the LDAP connector: how to reach and authenticate to a server
//! ([`LdapConnection`]) and what a source reads ([`LdapSourceConfig`]).
//!
//! Plain serde data with defaults that suit both Active Directory and OpenLDAP; no I/O. The
//! password lives in a [`Secret`], so `Debug` and serializing never show it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::connector::dirnames::{default_object_type_map, default_reference_attributes};
use crate::connector::{ConnectorError, ErrorKind, Secret};
use crate::model::{AttrName, ObjectType};

/// How to reach and authenticate to one LDAP server.
///
/// ```
/// # use dirsync::connector::ldap::{LdapBind, LdapConnection};
/// let c: LdapConnection = toml::from_str(r#"
///     url = "ldaps://dc1.corp.example:636"
///     tls = { ca_file = "/etc/dirsync/corp-ca.pem" }
///     bind = { method = "simple", dn = "CN=sync,OU=Service,DC=corp,DC=example", password = "s3cret" }
/// "#).unwrap();
/// assert_eq!(c.page_size, 1000);
/// assert!(matches!(c.bind, LdapBind::Simple { .. }));
/// assert!(!format!("{c:?}").contains("s3cret"));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapConnection {
    /// `ldap://host[:port]`, `ldaps://host[:port]` or `ldapi://<url-encoded socket path>`.
    /// Use `127.0.0.1` rather than `localhost` for a local server bound to IPv4.
    pub url: String,
    /// Upgrade an `ldap://` connection with StartTLS (RFC 4511 §4.14) before binding.
    #[serde(default)]
    pub starttls: bool,
    /// TLS settings for `ldaps://` and StartTLS.
    #[serde(default)]
    pub tls: TlsOptions,
    /// How to authenticate (default: anonymous).
    #[serde(default)]
    pub bind: LdapBind,
    /// Allow a simple bind (a password) over a connection that is neither `ldaps://` nor
    /// StartTLS nor `ldapi://`. Off by default: the password would cross the network in clear.
    #[serde(default)]
    pub allow_cleartext_bind: bool,
    /// Seconds to wait for the connection and for each server response (default 30).
    #[serde(default = "default_timeout")]
    pub timeout: u64,
    /// Entries per page of a paged search (RFC 2696), default 1000 — Active Directory's
    /// MaxPageSize.
    #[serde(default = "default_page_size")]
    pub page_size: u32,
}

fn default_timeout() -> u64 {
    30
}

fn default_page_size() -> u32 {
    1000
}

impl LdapConnection {
    /// A connection to `url` with every other setting at its default (anonymous bind).
    pub fn new(url: impl Into<String>) -> LdapConnection {
        LdapConnection {
            url: url.into(),
            starttls: false,
            tls: TlsOptions::default(),
            bind: LdapBind::Anonymous,
            allow_cleartext_bind: false,
            timeout: default_timeout(),
            page_size: default_page_size(),
        }
    }

    /// [`LdapConnection::timeout`] as a duration (at least one second).
    pub fn timeout_duration(&self) -> Duration {
        Duration::from_secs(self.timeout.max(1))
    }

    /// The URL scheme: `ldap`, `ldaps` or `ldapi`; a configuration error otherwise.
    pub fn scheme(&self) -> Result<Scheme, ConnectorError> {
        let (scheme, rest) = self.url.split_once("://").ok_or_else(|| {
            ConnectorError::new(
                ErrorKind::Config,
                format!(
                    "LDAP url {:?} has no scheme: write ldap://host, ldaps://host or ldapi://path",
                    self.url
                ),
            )
        })?;
        let s = match scheme.to_ascii_lowercase().as_str() {
            "ldap" => Scheme::Ldap,
            "ldaps" => Scheme::Ldaps,
            "ldapi" => Scheme::Ldapi,
            other => {
                return Err(ConnectorError::new(
                    ErrorKind::Config,
                    format!(
                        "LDAP url {:?}: unknown scheme {other:?} (ldap, ldaps or ldapi)",
                        self.url
                    ),
                ))
            }
        };
        let host = rest.split('/').next().unwrap_or_default();
        if host.is_empty() || host.starts_with(':') {
            return Err(ConnectorError::new(
                ErrorKind::Config,
                format!("LDAP url {:?} names no host (or socket path)", self.url),
            ));
        }
        if s == Scheme::Ldaps && self.starttls {
            return Err(ConnectorError::new(
                ErrorKind::Config,
                format!(
                    "LDAP url {:?} is ldaps:// and starttls is set: pick one (StartTLS upgrades \
                     an ldap:// connection)",
                    self.url
                ),
            ));
        }
        Ok(s)
    }

    /// Whether the connection is protected (TLS or a local socket), so that a password may be
    /// sent over it.
    pub fn is_protected(&self) -> Result<bool, ConnectorError> {
        Ok(match self.scheme()? {
            Scheme::Ldaps | Scheme::Ldapi => true,
            Scheme::Ldap => self.starttls,
        })
    }
}

/// The scheme of an LDAP URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `ldap://`: plain TCP, optionally upgraded with StartTLS.
    Ldap,
    /// `ldaps://`: TLS from the first byte.
    Ldaps,
    /// `ldapi://`: a Unix domain socket.
    Ldapi,
}

/// TLS settings. Certificate verification is on unless
/// [`danger_accept_invalid_certs`](TlsOptions::danger_accept_invalid_certs) is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsOptions {
    /// PEM file of the certificate authorities to trust. Without it, the system trust store.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to the server (for SASL EXTERNAL over TLS).
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of [`client_cert_file`](TlsOptions::client_cert_file).
    pub client_key_file: Option<PathBuf>,
    /// Accept any server certificate: no check of the chain, the name or the dates (the
    /// handshake signatures are still checked). Anyone on the path can then read and change the
    /// traffic, password included. For test servers only.
    pub danger_accept_invalid_certs: bool,
}

/// How to authenticate after connecting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum LdapBind {
    /// No bind: the server's anonymous access.
    #[default]
    Anonymous,
    /// A simple bind with a DN (or, for Active Directory, a user principal name) and password.
    Simple {
        /// The bind DN.
        dn: String,
        /// The password.
        password: Secret,
    },
    /// SASL EXTERNAL: the identity the connection already carries (a TLS client certificate,
    /// or the peer credentials of an `ldapi://` socket).
    SaslExternal,
}

/// The scope of a search.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SearchScope {
    /// The base entry only.
    Base,
    /// The immediate children of the base.
    One,
    /// The base and everything below it.
    #[default]
    Sub,
}

impl SearchScope {
    pub(crate) fn to_ldap3(self) -> ldap3::Scope {
        match self {
            SearchScope::Base => ldap3::Scope::Base,
            SearchScope::One => ldap3::Scope::OneLevel,
            SearchScope::Sub => ldap3::Scope::Subtree,
        }
    }
}

/// Where an entry's anchor comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnchorAttribute {
    /// `objectGUID` when the entry has one (Active Directory), else `entryUUID` (OpenLDAP and
    /// RFC 4530 servers), else `nsUniqueId` (389-ds).
    #[default]
    Auto,
    /// Active Directory's `objectGUID` (16 bytes): the canonical GUID form.
    ObjectGuid,
    /// RFC 4530 `entryUUID`: the canonical lower-case UUID form.
    EntryUuid,
    /// 389-ds / Oracle `nsUniqueId`, as the server writes it.
    NsUniqueId,
    /// The normalized DN. Not stable across renames: only for directories without an id.
    Dn,
    /// A named attribute with exactly one value, taken as it is.
    Attribute(String),
}

impl AnchorAttribute {
    /// The attributes a search must request to see the anchor (operational ones are not
    /// returned by `*`).
    pub fn requested(&self) -> &[&str] {
        match self {
            AnchorAttribute::Auto => &["objectGUID", "entryUUID", "nsUniqueId"],
            AnchorAttribute::ObjectGuid => &["objectGUID"],
            AnchorAttribute::EntryUuid => &["entryUUID"],
            AnchorAttribute::NsUniqueId => &["nsUniqueId"],
            AnchorAttribute::Dn | AnchorAttribute::Attribute(_) => &[],
        }
    }
}

/// Which delta mechanism a source uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeltaMode {
    /// Full imports only; the engine diffs them.
    #[default]
    None,
    /// Active Directory's DirSync control (needs the replication right).
    Dirsync,
    /// Active Directory uSNChanged polling against `highestCommittedUSN`.
    UsnChanged,
    /// RFC 4533 content synchronization (OpenLDAP `syncprov`).
    Syncrepl,
}

/// Active Directory range retrieval (values of one multi-valued attribute fetched in slices,
/// `member;range=0-1499`, `member;range=1500-*`, …).
///
/// A server that truncates an attribute answers with a ranged description; the source then
/// fetches the following slices with base-scope searches until the slice ending in `*`,
/// whatever this setting says. `force` additionally asks for ranges from the first request,
/// for servers (Samba) that return every value to a plain request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RangeRetrieval {
    /// Request the [`attributes`](RangeRetrieval::attributes) as ranges from the start.
    pub force: bool,
    /// The attributes requested as ranges when forced (default `member`).
    pub attributes: Vec<String>,
    /// Values per forced slice (default 1500, Active Directory's MaxValRange).
    pub step: u32,
}

impl Default for RangeRetrieval {
    fn default() -> Self {
        RangeRetrieval {
            force: false,
            attributes: vec!["member".to_owned()],
            step: 1500,
        }
    }
}

/// What an [`LdapSource`](super::LdapSource) reads and how it maps entries.
///
/// ```
/// # use dirsync::connector::ldap::{AnchorAttribute, LdapSourceConfig};
/// let c: LdapSourceConfig = toml::from_str(r#"
///     base_dn = "dc=example,dc=test"
///     anchor = "entry_uuid"
///     filter = "(|(objectClass=inetOrgPerson)(objectClass=groupOfNames))"
///     [connection]
///     url = "ldap://127.0.0.1:1389"
///     starttls = true
/// "#).unwrap();
/// assert_eq!(c.anchor, AnchorAttribute::EntryUuid);
/// assert_eq!(c.object_types.get(&"inetOrgPerson".into()).map(|t| t.as_str()), Some("user"));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapSourceConfig {
    /// A short name for logs and errors (default `ldap`).
    #[serde(default = "default_name")]
    pub name: String,
    /// The server.
    pub connection: LdapConnection,
    /// Where the search starts.
    pub base_dn: String,
    /// How deep it goes (default `sub`).
    #[serde(default)]
    pub scope: SearchScope,
    /// An RFC 4515 filter (default `(objectClass=*)`). Values put into a filter from elsewhere
    /// must be escaped with [`ldap3::ldap_escape`] (see [`super::equality_filter`]).
    #[serde(default = "default_filter")]
    pub filter: String,
    /// The attributes to read; empty = all user attributes. `objectClass` and the anchor
    /// attribute are always requested.
    #[serde(default)]
    pub attributes: Vec<String>,
    /// Where the anchor comes from (default [`AnchorAttribute::Auto`]).
    #[serde(default)]
    pub anchor: AnchorAttribute,
    /// `objectClass` value → object type. Of an entry's classes, the last one the server lists
    /// that this map names wins (servers list them from general to specific). Entries matching
    /// none are skipped. Default: `user`, `inetOrgPerson` → `user`; `group`, `groupOfNames` →
    /// `group`. AD computers are `user`s too: map `computer` to a type of its own to tell them
    /// apart.
    #[serde(default = "default_object_type_map")]
    pub object_types: BTreeMap<AttrName, ObjectType>,
    /// Attributes whose values are DNs of other objects: they become DN references. Default
    /// `member`, `uniqueMember`, `manager`, `memberOf`.
    #[serde(default = "default_reference_attributes")]
    pub reference_attributes: Vec<AttrName>,
    /// Attributes to keep as bytes, besides the built-in `objectGUID` and `objectSid` (which
    /// become GUID and `S-1-5-…` text), `jpegPhoto`, `thumbnailPhoto`, `userCertificate`, values
    /// returned with the `;binary` option, and any value that is not UTF-8.
    #[serde(default)]
    pub binary_attributes: Vec<AttrName>,
    /// Range retrieval of large multi-valued attributes.
    #[serde(default)]
    pub range_retrieval: RangeRetrieval,
    /// How many times a full import reconnects and restarts its search after the connection
    /// dropped (default 2; 0 = fail at once). See [`LdapSource`](super::LdapSource) for the
    /// restart strategy.
    #[serde(default = "default_reconnects")]
    pub max_reconnects: u32,
    /// The delta mechanism (default none: full imports only).
    #[serde(default)]
    pub delta: DeltaMode,
    /// With `delta = "dirsync"`: send the `LDAP_DIRSYNC_OBJECT_SECURITY` flag, for an account
    /// that lacks the "Replicating Directory Changes" right. The server then returns only the
    /// objects and attributes the account may read (default false: the account has the right
    /// and sees every change, including deletions of objects it could not read).
    #[serde(default)]
    pub dirsync_object_security: bool,
}

fn default_name() -> String {
    "ldap".to_owned()
}

fn default_filter() -> String {
    "(objectClass=*)".to_owned()
}

fn default_reconnects() -> u32 {
    2
}

impl LdapSourceConfig {
    /// A source configuration reading everything below `base_dn` with defaults.
    pub fn new(connection: LdapConnection, base_dn: impl Into<String>) -> LdapSourceConfig {
        LdapSourceConfig {
            name: default_name(),
            connection,
            base_dn: base_dn.into(),
            scope: SearchScope::Sub,
            filter: default_filter(),
            attributes: Vec::new(),
            anchor: AnchorAttribute::Auto,
            object_types: default_object_type_map(),
            reference_attributes: default_reference_attributes(),
            binary_attributes: Vec::new(),
            range_retrieval: RangeRetrieval::default(),
            max_reconnects: default_reconnects(),
            delta: DeltaMode::None,
            dirsync_object_security: false,
        }
    }

    /// The attribute list sent with the search: the configured attributes (or `*`), plus
    /// `objectClass` and the anchor attributes, with forced range attributes as their first
    /// slice.
    pub fn requested_attributes(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::with_capacity(self.attributes.len() + 4);
        let forced = |name: &str| {
            self.range_retrieval.force
                && self
                    .range_retrieval
                    .attributes
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case(name))
        };
        let first_slice = |name: &str| {
            format!(
                "{name};range=0-{}",
                self.range_retrieval.step.max(1).saturating_sub(1)
            )
        };
        if self.attributes.is_empty() {
            out.push("*".to_owned());
            if self.range_retrieval.force {
                out.extend(
                    self.range_retrieval
                        .attributes
                        .iter()
                        .map(|a| first_slice(a)),
                );
            }
        } else {
            for a in &self.attributes {
                out.push(if forced(a) { first_slice(a) } else { a.clone() });
            }
        }
        let mut push = |name: &str| {
            if !out.iter().any(|a| a.eq_ignore_ascii_case(name)) {
                out.push(name.to_owned());
            }
        };
        if !self.attributes.is_empty() {
            push("objectClass");
        }
        for a in self.anchor.requested() {
            push(a);
        }
        if let AnchorAttribute::Attribute(a) = &self.anchor {
            if !self.attributes.is_empty() {
                push(a);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_debug_hide_the_password() {
        let c: LdapSourceConfig = toml::from_str(
            r#"
            base_dn = "DC=corp,DC=example"
            [connection]
            url = "ldaps://dc1:636"
            bind = { method = "simple", dn = "CN=sync", password = "hunter2" }
            "#,
        )
        .unwrap();
        assert_eq!(c.scope, SearchScope::Sub);
        assert_eq!(c.filter, "(objectClass=*)");
        assert_eq!(c.connection.timeout, 30);
        assert_eq!(c.connection.page_size, 1000);
        assert!(!c.connection.tls.danger_accept_invalid_certs);
        assert!(!c.connection.allow_cleartext_bind);
        assert_eq!(c.anchor, AnchorAttribute::Auto);
        assert_eq!(c.delta, DeltaMode::None);
        assert_eq!(c.range_retrieval.attributes, vec!["member".to_owned()]);
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        let back = toml::to_string(&c).unwrap();
        assert!(!back.contains("hunter2"), "{back}");
    }

    #[test]
    fn anchor_forms_parse() {
        #[derive(Deserialize)]
        struct A {
            anchor: AnchorAttribute,
        }
        let a: A = toml::from_str(r#"anchor = "object_guid""#).unwrap();
        assert_eq!(a.anchor, AnchorAttribute::ObjectGuid);
        let a: A = toml::from_str(r#"anchor = { attribute = "employeeNumber" }"#).unwrap();
        assert_eq!(
            a.anchor,
            AnchorAttribute::Attribute("employeeNumber".into())
        );
        assert!(toml::from_str::<A>(r#"anchor = "guid""#).is_err());
    }

    #[test]
    fn scheme_checks() {
        let mut c = LdapConnection::new("ldap://127.0.0.1:389");
        assert_eq!(c.scheme().unwrap(), Scheme::Ldap);
        assert!(!c.is_protected().unwrap());
        c.starttls = true;
        assert!(c.is_protected().unwrap());
        c.url = "ldaps://127.0.0.1".into();
        assert_eq!(c.scheme().unwrap_err().kind(), ErrorKind::Config);
        c.starttls = false;
        assert_eq!(c.scheme().unwrap(), Scheme::Ldaps);
        assert!(c.is_protected().unwrap());
        for bad in ["127.0.0.1:389", "http://x", "ldap://", "ldap://:389"] {
            let e = LdapConnection::new(bad).scheme().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{bad}");
        }
    }

    #[test]
    fn requested_attributes_add_class_anchor_and_forced_ranges() {
        let mut c = LdapSourceConfig::new(LdapConnection::new("ldap://h"), "dc=x");
        assert_eq!(
            c.requested_attributes(),
            ["*", "objectGUID", "entryUUID", "nsUniqueId"]
        );
        c.attributes = vec!["cn".into(), "member".into()];
        c.anchor = AnchorAttribute::EntryUuid;
        assert_eq!(
            c.requested_attributes(),
            ["cn", "member", "objectClass", "entryUUID"]
        );
        c.range_retrieval.force = true;
        c.range_retrieval.step = 100;
        c.anchor = AnchorAttribute::Attribute("uid".into());
        assert_eq!(
            c.requested_attributes(),
            ["cn", "member;range=0-99", "objectClass", "uid"]
        );
        c.attributes.clear();
        assert_eq!(c.requested_attributes(), ["*", "member;range=0-99"]);
    }
}
