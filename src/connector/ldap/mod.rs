//! The LDAP connector (cargo feature `ldap`): Active Directory, OpenLDAP and other LDAP
//! directories as sources, over [`ldap3`] with rustls.
//!
//! - [`config`]: what to connect to and what to read ([`LdapConnection`],
//!   [`LdapSourceConfig`]), serde data for the `sync` example's TOML.
//! - [`conn`]: connecting, TLS (verification on unless explicitly turned off), binding, and the
//!   one mapping of LDAP errors onto [`ErrorKind`](crate::connector::ErrorKind).
//! - `search`: paged streaming searches, searches with extra controls, AD range retrieval.
//! - `wire`: the lean wire path of the full-import paged search (`ldap://`, StartTLS, `ldaps://`
//!   with an anonymous or simple bind): our own BER framing and decoding straight into
//!   [`RawEntry`] values; everything else stays on ldap3.
//! - [`entry`]: server answers to [`Entry`](crate::model::Entry) values.
//! - [`LdapSource`]: the [`Source`](crate::connector::Source).
//! - [`syncrepl`]: RFC 4533 content synchronization (full and delta import, refreshAndPersist).
//! - [`LdapTarget`]: the [`Target`](crate::connector::Target): add, modify, delete, modrdn, with
//!   an Active Directory dialect ([`Directory::Ad`]).
//! - `dirsync`, `usn`: Active Directory delta import with the DirSync control, and by
//!   uSNChanged polling with deletions from the Deleted Objects container.
//! - [`control`]: the codecs of the request and response controls this crate sends and reads
//!   (DirSync, Show Deleted, paged results) and of AD's ranged attribute names.
//!
//! Everything a server sends is parsed by fallible code of this crate (ldap3's own parsers of
//! entries and of the paged-results control panic on malformed data and are not used): a
//! malformed answer is an error of kind `Protocol` naming the entry and attribute. The connector
//! never sends a password over an unprotected connection unless told to, and never logs one.
//! It does no planning and keeps no state between imports.

mod ber;
pub mod config;
pub mod conn;
pub mod control;
mod dirsync;
pub mod entry;
mod search;
mod source;
pub mod syncrepl;
mod target;
pub mod usn;
mod wire;

pub use self::dirsync::DIRSYNC_WATERMARK;
pub use config::{
    default_object_type_map, default_reference_attributes, AnchorAttribute, DeltaMode, LdapBind,
    LdapConnection, LdapSourceConfig, RangeRetrieval, Scheme, SearchScope, TlsOptions,
};
pub use conn::{connect, map_ldap_error, result_code_kind, LdapHandle};
pub use control::PAGED_RESULTS_OID;
pub use entry::{EntryMapper, RawEntry};
pub use search::equality_filter;
pub use source::LdapSource;
pub use target::{
    default_secret_attributes, Directory, LdapObjectTypeConfig, LdapTarget, LdapTargetConfig,
    ACCOUNT_ENABLED,
};
pub use usn::{UsnWatermark, USN_WATERMARK};
