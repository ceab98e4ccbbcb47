//! Active Directory delta import with the DirSync control (1.2.840.113556.1.4.841), and the
//! Active Directory look-ups the delta modes share (root DSE, naming context, objects by
//! objectGUID).
//!
//! The watermark is the server's DirSync cookie (`Watermark` kind `"dirsync"`). A full import
//! takes its cookie *before* its paged search starts ([`initial_cookie`]): a change made while
//! the import runs is then seen again by the next delta (harmless: the mirror is state), never
//! lost. A delta import searches the naming context with the cookie, loops while the server
//! says `moreResults`, and emits a checkpoint after each response's changes.
//!
//! DirSync reports only what changed: the changed attributes, `objectGUID` and `instanceType`.
//! Every result is therefore checked against the configured scope with one look-up per
//! response (objects by objectGUID under the base DN, with the configured filter), which also
//! gives the object's type. Then:
//! - `isDeleted: TRUE` (a tombstone under `CN=Deleted Objects`), or an object no longer in scope
//!   (moved out of the base DN, or no longer matching the filter) → [`Change::Delete`];
//! - a new object (its result carries `objectClass`), a renamed or moved one (`name` or
//!   `parentGUID` changed), or one whose change touches an attribute the filter names → the whole
//!   object is read and emitted as [`Change::Add`] (new) or [`Change::Replace`]: the connector
//!   cannot know whether the mirror held it (it may just have entered the scope), and a replace
//!   carries the new DN;
//! - any other change → [`Change::Modify`]: changed attributes replaced, and with
//!   `INCREMENTAL_VALUES` multi-valued changes as value-level adds (`member;range=1-1`) and
//!   removes (`member;range=0-0`) — a 10,000-member group with one new member costs one value;
//! - the objects in scope whose reference attributes (`member`, `manager`, …) name a renamed or
//!   moved object are read whole as [`Change::Replace`]: AD's links follow the object without
//!   changing (or reporting) the objects that hold them, and the mirror would keep the old DN.
//!
//! It only reads. It needs the objectGUID anchor (`anchor = "auto"` or `"object_guid"`).

use std::collections::{HashMap, HashSet, VecDeque};

use ldap3::Scope;

use super::config::{AnchorAttribute, LdapSourceConfig};
use super::conn::{result_code_name, result_error, LdapHandle};
use super::control::{
    show_deleted_control, DirSyncFlags, DirSyncRequest, DirSyncResponse, RangedAttr, DIRSYNC_OID,
};
use super::entry::{guid_anchor, EntryMapper, RawEntry};
use super::search::{complete_ranges, response_control, search_raw, SearchSpec};
use crate::connector::{ConnectorError, ErrorKind, ImportItem, Watermark};
use crate::model::{AttrName, AttributeChange, Change};

/// The watermark kind of a DirSync cookie.
pub const DIRSYNC_WATERMARK: &str = "dirsync";

/// How many objectGUIDs one look-up search names at most (AD answers a non-paged search with at
/// most MaxPageSize = 1,000 entries).
const LOOKUP_CHUNK: usize = 500;

/// Attributes DirSync must always be asked for: without them Samba (and AD with an attribute
/// list) does not report renames, moves and deletions.
const ALWAYS: [&str; 5] = [
    "objectGUID",
    "objectClass",
    "name",
    "isDeleted",
    "parentGUID",
];

/// What the root DSE says about the server.
#[derive(Debug, Clone, Default)]
pub(crate) struct RootDse {
    pub naming_contexts: Vec<String>,
    pub default_naming_context: Option<String>,
    pub highest_committed_usn: Option<u64>,
    pub ds_service_name: Option<String>,
}

fn protocol(msg: impl Into<String>) -> ConnectorError {
    ConnectorError::new(ErrorKind::Protocol, msg)
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

fn attr<'a>(raw: &'a RawEntry, name: &str) -> Option<&'a [Vec<u8>]> {
    raw.attrs
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// Runs a search and returns its entries, failing on an unsuccessful result.
async fn entries(
    handle: &mut LdapHandle,
    spec: &SearchSpec,
) -> Result<Vec<RawEntry>, ConnectorError> {
    let (items, res) = search_raw(handle, spec).await?;
    if res.rc != 0 {
        return Err(result_error(&res).with_object(&spec.base));
    }
    items
        .into_iter()
        .filter(|i| i.0.id == 4)
        .map(|i| RawEntry::parse(i.0))
        .collect()
}

/// Reads the root DSE.
pub(crate) async fn root_dse(handle: &mut LdapHandle) -> Result<RootDse, ConnectorError> {
    let spec = SearchSpec {
        base: String::new(),
        scope: Scope::Base,
        filter: "(objectClass=*)".to_owned(),
        attrs: [
            "namingContexts",
            "defaultNamingContext",
            "highestCommittedUSN",
            "dsServiceName",
        ]
        .map(String::from)
        .to_vec(),
        controls: Vec::new(),
    };
    let raw = entries(handle, &spec)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| protocol("the root DSE did not come back"))?;
    let one = |n: &str| attr(&raw, n).and_then(|v| v.first()).map(|v| text(v));
    let usn = match one("highestCommittedUSN") {
        Some(t) => Some(t.trim().parse::<u64>().map_err(|_| {
            protocol(format!(
                "the root DSE's highestCommittedUSN {t:?} is not a number"
            ))
        })?),
        None => None,
    };
    Ok(RootDse {
        naming_contexts: attr(&raw, "namingContexts")
            .unwrap_or_default()
            .iter()
            .map(|v| text(v))
            .collect(),
        default_naming_context: one("defaultNamingContext"),
        highest_committed_usn: usn,
        ds_service_name: one("dsServiceName"),
    })
}

impl RootDse {
    /// The naming context holding `base_dn`: the longest `namingContexts` value it ends with,
    /// else the default naming context.
    pub fn naming_context_of(&self, base_dn: &str) -> Result<String, ConnectorError> {
        let base = base_dn.to_ascii_lowercase().replace(", ", ",");
        self.naming_contexts
            .iter()
            .filter(|nc| {
                let nc = nc.to_ascii_lowercase();
                base == nc || base.ends_with(&format!(",{nc}"))
            })
            .max_by_key(|nc| nc.len())
            .or(self.default_naming_context.as_ref())
            .cloned()
            .ok_or_else(|| {
                ConnectorError::new(
                    ErrorKind::Config,
                    format!(
                        "no naming context of the server holds the base DN {base_dn:?} (the root \
                         DSE lists {:?})",
                        self.naming_contexts
                    ),
                )
            })
    }
}

/// Checks that the source uses the objectGUID anchor, as the AD delta modes need.
pub(crate) fn require_guid_anchor(
    config: &LdapSourceConfig,
    mode: &str,
) -> Result<(), ConnectorError> {
    match config.anchor {
        AnchorAttribute::Auto | AnchorAttribute::ObjectGuid => Ok(()),
        ref other => Err(ConnectorError::new(
            ErrorKind::Config,
            format!(
                "source {}: delta = {mode:?} reports objects by objectGUID; anchor = {other:?} \
                 cannot be used with it (use anchor = \"auto\" or \"object_guid\")",
                config.name
            ),
        )),
    }
}

/// An objectGUID as an RFC 4515 filter value (`\xx` for every byte).
fn escape_bytes(v: &[u8]) -> String {
    let mut out = String::with_capacity(v.len() * 3);
    for b in v {
        out.push_str(&format!("\\{b:02x}"));
    }
    out
}

/// `(|(objectGUID=…)…)` for `guids`.
fn guid_filter(guids: &[&[u8]]) -> String {
    let mut f = String::from("(|");
    for g in guids {
        f.push_str("(objectGUID=");
        f.push_str(&escape_bytes(g));
        f.push(')');
    }
    f.push(')');
    f
}

/// The objects among `guids` that `base`/`scope`/`filter` find, as raw entries with `attrs`
/// (ranged attributes completed when `complete`).
pub(crate) async fn lookup_guids(
    handle: &mut LdapHandle,
    base: &str,
    scope: Scope,
    filter: Option<&str>,
    guids: &[&[u8]],
    attrs: &[String],
    show_deleted: bool,
) -> Result<HashMap<Vec<u8>, RawEntry>, ConnectorError> {
    let mut out = HashMap::new();
    for chunk in guids.chunks(LOOKUP_CHUNK) {
        let by_guid = guid_filter(chunk);
        let filter = match filter {
            Some(f) => format!("(&{f}{by_guid})"),
            None => by_guid,
        };
        let mut attrs = attrs.to_vec();
        if !attrs.iter().any(|a| a.eq_ignore_ascii_case("objectGUID")) {
            attrs.push("objectGUID".to_owned());
        }
        let spec = SearchSpec {
            base: base.to_owned(),
            scope,
            filter,
            attrs,
            controls: if show_deleted {
                vec![show_deleted_control()]
            } else {
                Vec::new()
            },
        };
        for mut raw in entries(handle, &spec).await? {
            if raw.attrs.iter().any(|(n, _)| n.contains(';')) {
                complete_ranges(handle, &mut raw).await?;
            }
            let Some(guid) = attr(&raw, "objectGUID").and_then(|v| v.first()).cloned() else {
                continue;
            };
            out.insert(guid, raw);
        }
    }
    Ok(out)
}

/// The DirSync flags a source sends.
pub(crate) fn flags(config: &LdapSourceConfig) -> DirSyncFlags {
    let mut f = DirSyncFlags::INCREMENTAL_VALUES;
    if config.dirsync_object_security {
        f |= DirSyncFlags::OBJECT_SECURITY;
    }
    f
}

/// The attribute list of the DirSync searches: the configured attributes without range options
/// (none configured: every attribute), plus [`ALWAYS`].
fn dirsync_attributes(config: &LdapSourceConfig) -> Vec<String> {
    let mut out: Vec<String> = if config.attributes.is_empty() {
        vec!["*".to_owned()]
    } else {
        config
            .attributes
            .iter()
            .map(|a| a.split(';').next().unwrap_or(a).to_owned())
            .collect()
    };
    for a in ALWAYS {
        if !out.iter().any(|o| o.eq_ignore_ascii_case(a)) {
            out.push(a.to_owned());
        }
    }
    out
}

/// One DirSync search from `cookie`: the result entries and the response control.
async fn dirsync_round(
    handle: &mut LdapHandle,
    naming_context: &str,
    filter: &str,
    attrs: Vec<String>,
    flags: DirSyncFlags,
    cookie: &[u8],
) -> Result<(Vec<RawEntry>, DirSyncResponse), ConnectorError> {
    let request = DirSyncRequest {
        flags,
        max_bytes: 0,
        cookie: cookie.to_vec(),
    };
    let spec = SearchSpec {
        base: naming_context.to_owned(),
        scope: Scope::Subtree,
        filter: filter.to_owned(),
        attrs,
        controls: vec![request.to_control()],
    };
    let (items, res) = search_raw(handle, &spec).await?;
    if res.rc != 0 {
        let e = result_error(&res).with_object(naming_context);
        // A cookie the server cannot use (garbage, another domain's, too old) is refused with
        // one of these codes; busy/unavailable stay retryable.
        if !cookie.is_empty() && matches!(res.rc, 1 | 2 | 12 | 53 | 80) {
            return Err(ConnectorError::new(
                ErrorKind::InvalidWatermark,
                format!(
                    "the server refused the DirSync cookie ({}: {}); a full import is needed",
                    result_code_name(res.rc),
                    res.text.trim()
                ),
            )
            .with_source(e));
        }
        return Err(e);
    }
    let control = response_control(&res, DIRSYNC_OID).ok_or_else(|| {
        protocol(
            "the DirSync search answered without a DirSync response control (is this Active \
             Directory or Samba, and does the account hold the replication right?)",
        )
    })?;
    let response = DirSyncResponse::from_controls([control])?
        .ok_or_else(|| protocol("the DirSync response control went missing"))?;
    let raws = items
        .into_iter()
        .filter(|i| i.0.id == 4)
        .map(|i| RawEntry::parse(i.0))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((raws, response))
}

/// The DirSync cookie of the directory as it is now, taken at the start of a full import.
///
/// Runs DirSync from an empty cookie with a filter no object matches (`(objectGUID=\00)`) and
/// only `objectGUID` asked for, looping while the server has more: the server walks its changes
/// but sends no entries, and the final cookie stands for "everything up to now".
pub(crate) async fn initial_cookie(
    handle: &mut LdapHandle,
    config: &LdapSourceConfig,
) -> Result<Watermark, ConnectorError> {
    require_guid_anchor(config, "dirsync")?;
    let dse = root_dse(handle).await?;
    let nc = dse.naming_context_of(&config.base_dn)?;
    let mut cookie = Vec::new();
    for _ in 0..100_000 {
        let (_, response) = dirsync_round(
            handle,
            &nc,
            "(objectGUID=\\00)",
            vec!["objectGUID".to_owned()],
            flags(config),
            &cookie,
        )
        .await?;
        cookie = response.cookie;
        if !response.more_results {
            return Ok(Watermark::new(DIRSYNC_WATERMARK, cookie));
        }
    }
    Err(protocol(
        "the server kept answering DirSync with moreResults for 100,000 rounds",
    ))
}

/// A delta import in progress: one DirSync response at a time, turned into changes followed by
/// a checkpoint.
pub(crate) struct DirSyncDelta {
    handle: LdapHandle,
    config: std::sync::Arc<LdapSourceConfig>,
    mapper: std::sync::Arc<EntryMapper>,
    naming_context: String,
    cookie: Vec<u8>,
    queue: VecDeque<ImportItem<Change>>,
    more: bool,
}

impl DirSyncDelta {
    /// Checks `since` and prepares the import (reads the root DSE).
    pub async fn start(
        mut handle: LdapHandle,
        config: std::sync::Arc<LdapSourceConfig>,
        mapper: std::sync::Arc<EntryMapper>,
        since: &Watermark,
    ) -> Result<DirSyncDelta, ConnectorError> {
        require_guid_anchor(&config, "dirsync")?;
        if since.kind != DIRSYNC_WATERMARK || since.data.is_empty() {
            return Err(ConnectorError::new(
                ErrorKind::InvalidWatermark,
                format!(
                    "source {}: a watermark of kind {:?} ({} bytes) is not a DirSync cookie",
                    config.name,
                    since.kind,
                    since.data.len()
                ),
            ));
        }
        let dse = root_dse(&mut handle).await?;
        let naming_context = dse.naming_context_of(&config.base_dn)?;
        Ok(DirSyncDelta {
            handle,
            config,
            mapper,
            naming_context,
            cookie: since.data.clone(),
            queue: VecDeque::new(),
            more: true,
        })
    }

    /// The next item, `None` at the end.
    pub async fn next(&mut self) -> Result<Option<ImportItem<Change>>, ConnectorError> {
        loop {
            if let Some(item) = self.queue.pop_front() {
                return Ok(Some(item));
            }
            if !self.more {
                return Ok(None);
            }
            self.round().await?;
        }
    }

    async fn round(&mut self) -> Result<(), ConnectorError> {
        let (raws, response) = dirsync_round(
            &mut self.handle,
            &self.naming_context,
            "(objectClass=*)",
            dirsync_attributes(&self.config),
            flags(&self.config),
            &self.cookie,
        )
        .await?;
        let changes = self.changes(raws).await?;
        self.queue.extend(changes.into_iter().map(ImportItem::Item));
        self.queue.push_back(ImportItem::Checkpoint(Watermark::new(
            DIRSYNC_WATERMARK,
            response.cookie.clone(),
        )));
        self.cookie = response.cookie;
        self.more = response.more_results;
        Ok(())
    }

    /// The changes of one response's results.
    async fn changes(&mut self, raws: Vec<RawEntry>) -> Result<Vec<Change>, ConnectorError> {
        let mut results = Vec::with_capacity(raws.len());
        for raw in raws {
            let guid = attr(&raw, "objectGUID")
                .and_then(|v| v.first())
                .cloned()
                .ok_or_else(|| {
                    protocol("a DirSync result carries no objectGUID").with_object(&raw.dn)
                })?;
            results.push((guid, raw));
        }
        let live: Vec<&[u8]> = results
            .iter()
            .filter(|(_, r)| !is_deleted(r))
            .map(|(g, _)| g.as_slice())
            .collect();
        let base = self.config.base_dn.clone();
        let scope = self.config.scope.to_ldap3();
        let in_scope = lookup_guids(
            &mut self.handle,
            &base,
            scope,
            Some(&self.config.filter),
            &live,
            &["objectClass".to_owned()],
            false,
        )
        .await?;
        // Deleted objects and objects that left the scope: their type from wherever they are now
        // (tombstones keep objectClass).
        let gone: Vec<&[u8]> = results
            .iter()
            .filter(|(g, _)| !in_scope.contains_key(g))
            .map(|(g, _)| g.as_slice())
            .collect();
        let nc = self.naming_context.clone();
        let elsewhere = lookup_guids(
            &mut self.handle,
            &nc,
            Scope::Subtree,
            None,
            &gone,
            &["objectClass".to_owned()],
            true,
        )
        .await?;
        let filter_attrs = filter_attributes(&self.config.filter);
        let mut whole: Vec<&[u8]> = Vec::new();
        let mut renamed: Vec<String> = Vec::new();
        let mut planned: Vec<Planned> = Vec::with_capacity(results.len());
        for (guid, raw) in &results {
            let anchor = guid_anchor(guid)
                .map_err(|m| protocol(format!("objectGUID: {m}")).with_object(&raw.dn))?;
            let Some(found) = in_scope.get(guid) else {
                let classes = elsewhere
                    .get(guid)
                    .and_then(|r| attr(r, "objectClass"))
                    .or_else(|| attr(raw, "objectClass"));
                match classes.and_then(|c| self.mapper.object_type(c)) {
                    Some(object_type) => {
                        planned.push(Planned::Done(Change::Delete {
                            anchor,
                            object_type,
                        }));
                    }
                    None if classes.is_none() => tracing::warn!(
                        source = %self.config.name,
                        dn = %raw.dn,
                        "a DirSync result is neither in scope nor found elsewhere; skipped"
                    ),
                    None => {}
                }
                continue;
            };
            let Some(object_type) = self
                .mapper
                .object_type(attr(found, "objectClass").unwrap_or_default())
            else {
                continue;
            };
            let needs_whole = attr(raw, "objectClass").is_some()
                || raw.attrs.iter().any(|(n, _)| {
                    let base = n.split(';').next().unwrap_or(n);
                    base.eq_ignore_ascii_case("name")
                        || base.eq_ignore_ascii_case("parentGUID")
                        || filter_attrs.contains(&base.to_ascii_lowercase())
                });
            if attr(raw, "objectClass").is_none()
                && (attr(raw, "name").is_some() || attr(raw, "parentGUID").is_some())
            {
                renamed.push(found.dn.clone());
            }
            if needs_whole {
                whole.push(guid);
                planned.push(Planned::Whole {
                    guid: guid.clone(),
                    new: attr(raw, "objectClass").is_some(),
                });
            } else {
                let changes = attribute_changes(&self.config, &self.mapper, raw)?;
                if !changes.is_empty() {
                    planned.push(Planned::Done(Change::Modify {
                        anchor,
                        object_type,
                        changes,
                    }));
                }
            }
        }
        // AD's DN-valued links follow a renamed or moved object without changing the objects
        // that hold them, so DirSync does not report those: re-read them whole, or the mirror
        // keeps the old DN in their values.
        let referrers = self.referrers(&renamed).await?;
        for guid in &referrers {
            if !whole.contains(&guid.as_slice()) {
                whole.push(guid);
                planned.push(Planned::Whole {
                    guid: guid.clone(),
                    new: false,
                });
            }
        }
        let attrs = self.config.requested_attributes();
        let mut full = lookup_guids(
            &mut self.handle,
            &base,
            scope,
            Some(&self.config.filter),
            &whole,
            &attrs,
            false,
        )
        .await?;
        let mut out = Vec::with_capacity(planned.len());
        for p in planned {
            match p {
                Planned::Done(c) => out.push(c),
                Planned::Whole { guid, new } => {
                    // Gone between the look-ups: the next delta reports its deletion.
                    let Some(raw) = full.remove(&guid) else {
                        continue;
                    };
                    let Some(entry) = self.mapper.to_entry(raw)? else {
                        continue;
                    };
                    out.push(if new {
                        Change::Add(entry)
                    } else {
                        Change::Replace(entry)
                    });
                }
            }
        }
        Ok(out)
    }
}

impl DirSyncDelta {
    /// The objectGUIDs of the objects in scope whose reference attributes name one of `dns`.
    async fn referrers(&mut self, dns: &[String]) -> Result<Vec<Vec<u8>>, ConnectorError> {
        let mut out = Vec::new();
        if self.config.reference_attributes.is_empty() {
            return Ok(out);
        }
        for chunk in dns.chunks(50) {
            let mut any = String::from("(|");
            for dn in chunk {
                for a in &self.config.reference_attributes {
                    any.push_str(&format!("({}={})", a, ldap3::ldap_escape(dn.as_str())));
                }
            }
            any.push(')');
            let spec = SearchSpec {
                base: self.config.base_dn.clone(),
                scope: self.config.scope.to_ldap3(),
                filter: format!("(&{}{any})", self.config.filter),
                attrs: vec!["objectGUID".to_owned()],
                controls: Vec::new(),
            };
            for raw in entries(&mut self.handle, &spec).await? {
                if let Some(g) = attr(&raw, "objectGUID").and_then(|v| v.first()) {
                    out.push(g.clone());
                }
            }
        }
        Ok(out)
    }
}

/// The attribute-level changes of a modified object's result.
fn attribute_changes(
    config: &LdapSourceConfig,
    mapper: &EntryMapper,
    raw: &RawEntry,
) -> Result<Vec<AttributeChange>, ConnectorError> {
    let wanted = |base: &str| {
        if ALWAYS.iter().any(|a| a.eq_ignore_ascii_case(base)) {
            return false;
        }
        config.attributes.is_empty()
            || config.attributes.iter().any(|a| {
                a.split(';')
                    .next()
                    .is_some_and(|a| a.eq_ignore_ascii_case(base))
            })
    };
    let mut out = Vec::new();
    for (name, vals) in &raw.attrs {
        let ranged =
            RangedAttr::parse(name).map_err(|e| ConnectorError::from(e).with_object(&raw.dn))?;
        let base = ranged.as_ref().map_or(name.as_str(), |r| r.base.as_str());
        if !wanted(base) {
            continue;
        }
        let values = mapper
            .convert_values(base, vals.clone())
            .map_err(|m| protocol(format!("attribute {name}: {m}")).with_object(&raw.dn))?;
        let attribute = AttrName::new(base);
        out.push(match ranged {
            // INCREMENTAL_VALUES: `range=1-1` holds added values, `range=0-0` removed ones.
            Some(RangedAttr {
                low: 1,
                high: Some(1),
                ..
            }) => AttributeChange::add(attribute, values),
            Some(RangedAttr {
                low: 0,
                high: Some(0),
                ..
            }) => {
                if values.is_empty() {
                    continue;
                }
                AttributeChange::remove(attribute, values)
            }
            Some(r) => {
                return Err(protocol(format!(
                    "attribute {name}: a DirSync result with range {}-{:?}, where \
                     incremental values use 0-0 (removed) and 1-1 (added)",
                    r.low, r.high
                ))
                .with_object(&raw.dn))
            }
            None => AttributeChange::replace(attribute, values),
        });
    }
    Ok(out)
}

enum Planned {
    Done(Change),
    Whole { guid: Vec<u8>, new: bool },
}

fn is_deleted(raw: &RawEntry) -> bool {
    attr(raw, "isDeleted")
        .and_then(|v| v.first())
        .is_some_and(|v| v.eq_ignore_ascii_case(b"TRUE"))
}

/// The attribute names a filter mentions (lower case): a change to one of them may move an object
/// into or out of the filter's scope.
fn filter_attributes(filter: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    for part in filter.split('(').skip(1) {
        let name: String = part
            .trim_start_matches(['&', '|', '!'])
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.' || *c == ';')
            .collect();
        let name = name.split(';').next().unwrap_or_default();
        if !name.is_empty() && !name.eq_ignore_ascii_case("objectClass") {
            out.insert(name.to_ascii_lowercase());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::ldap::config::LdapConnection;

    fn config() -> LdapSourceConfig {
        LdapSourceConfig::new(
            LdapConnection::new("ldaps://127.0.0.1"),
            "OU=People,DC=contoso,DC=test",
        )
    }

    #[test]
    fn naming_context_is_the_longest_suffix() {
        let dse = RootDse {
            naming_contexts: vec![
                "DC=contoso,DC=test".into(),
                "CN=Configuration,DC=contoso,DC=test".into(),
                "DC=DomainDnsZones,DC=contoso,DC=test".into(),
            ],
            ..RootDse::default()
        };
        assert_eq!(
            dse.naming_context_of("OU=People,DC=contoso,DC=test")
                .unwrap(),
            "DC=contoso,DC=test"
        );
        assert_eq!(
            dse.naming_context_of("cn=x,CN=Configuration,DC=Contoso,DC=test")
                .unwrap(),
            "CN=Configuration,DC=contoso,DC=test"
        );
        assert_eq!(
            dse.naming_context_of("dc=other").unwrap_err().kind(),
            ErrorKind::Config
        );
    }

    #[test]
    fn guid_filters_escape_every_byte() {
        assert_eq!(
            guid_filter(&[&[0x00, 0x2a, 0xff], &[0x28]]),
            r"(|(objectGUID=\00\2a\ff)(objectGUID=\28))"
        );
    }

    #[test]
    fn dirsync_always_asks_for_renames_moves_and_deletes() {
        let mut c = config();
        let a = dirsync_attributes(&c);
        assert_eq!(a[0], "*");
        for must in ALWAYS {
            assert!(a.iter().any(|x| x == must), "{must}");
        }
        c.attributes = vec!["member;range=0-1499".into(), "name".into()];
        let a = dirsync_attributes(&c);
        assert_eq!(a[0], "member");
        assert_eq!(
            a.iter().filter(|x| x.eq_ignore_ascii_case("name")).count(),
            1
        );
        assert_eq!(flags(&c), DirSyncFlags::INCREMENTAL_VALUES);
        c.dirsync_object_security = true;
        assert!(flags(&c).contains(DirSyncFlags::OBJECT_SECURITY));
    }

    #[test]
    fn filter_attribute_names() {
        let f = filter_attributes("(&(objectClass=user)(|(department=Sales)(!(title=x*))))");
        let mut v: Vec<_> = f.into_iter().collect();
        v.sort();
        assert_eq!(v, ["department", "title"]);
        assert!(filter_attributes("(objectClass=*)").is_empty());
    }

    #[test]
    fn other_anchors_are_refused() {
        let mut c = config();
        assert!(require_guid_anchor(&c, "dirsync").is_ok());
        c.anchor = AnchorAttribute::EntryUuid;
        assert_eq!(
            require_guid_anchor(&c, "dirsync").unwrap_err().kind(),
            ErrorKind::Config
        );
    }

    #[test]
    fn incremental_values_become_value_level_changes() {
        let c = config();
        let mapper = EntryMapper::new(&c);
        let raw = RawEntry {
            dn: "CN=G,OU=Groups,DC=contoso,DC=test".into(),
            attrs: vec![
                ("objectGUID".into(), vec![vec![1; 16]]),
                ("instanceType".into(), vec![b"4".to_vec()]),
                (
                    "member;range=1-1".into(),
                    vec![b"CN=A,DC=contoso,DC=test".to_vec()],
                ),
                (
                    "member;range=0-0".into(),
                    vec![b"CN=B,DC=contoso,DC=test".to_vec()],
                ),
                ("description".into(), vec![]),
            ],
        };
        let changes = attribute_changes(&c, &mapper, &raw).unwrap();
        assert_eq!(changes.len(), 4, "{changes:?}");
        assert_eq!(changes[1].op, crate::model::ChangeOp::Add);
        assert_eq!(changes[1].attribute.as_str(), "member");
        assert_eq!(changes[2].op, crate::model::ChangeOp::Remove);
        assert_eq!(changes[3].op, crate::model::ChangeOp::Replace);
        assert!(changes[3].values.is_empty());
        let bad = RawEntry {
            attrs: vec![("member;range=0-1499".into(), vec![])],
            ..raw
        };
        assert!(attribute_changes(&c, &mapper, &bad).is_err());
    }
}
