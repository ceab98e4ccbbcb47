//! Searches: one search with extra request controls returning raw items and the response
//! controls ([`search_raw`], for the delta modes), a paged (RFC 2696) streaming search that
//! holds at most one page ([`PagedSearch`]), and Active Directory range retrieval
//! ([`complete_ranges`]).
//!
//! The paged-results control is encoded and parsed by [`PagedResults`] (ldap3's parser panics on
//! a malformed value). Filters are passed through as configured; values put into a filter from elsewhere go
//! through [`equality_filter`] (RFC 4515 escaping). No entry conversion here (see `entry.rs`).

use ldap3::asn1::StructureTag;
use ldap3::controls::{Control, RawControl};
use ldap3::{LdapResult, ResultEntry, Scope, SearchStream};

use super::conn::{map_ldap_error, result_error, LdapHandle};
use super::control::{PagedResults, RangedAttr, PAGED_RESULTS_OID};
use super::entry::RawEntry;
use crate::connector::{ConnectorError, ErrorKind};

/// An RFC 4515 equality filter `(attr=value)` with `value` escaped (`*`, `(`, `)`, `\`, NUL).
///
/// ```
/// assert_eq!(
///     dirsync::connector::ldap::equality_filter("cn", "a*(b)"),
///     r"(cn=a\2a\28b\29)"
/// );
/// ```
pub fn equality_filter(attribute: &str, value: &str) -> String {
    format!("({attribute}={})", ldap3::ldap_escape(value))
}

/// What to search.
#[derive(Debug, Clone)]
pub(crate) struct SearchSpec {
    pub base: String,
    pub scope: Scope,
    pub filter: String,
    pub attrs: Vec<String>,
    /// Request controls besides paging.
    pub controls: Vec<RawControl>,
}

/// The response controls of a result whose OID is `oid`.
pub(crate) fn response_control<'a>(res: &'a LdapResult, oid: &str) -> Option<&'a RawControl> {
    res.ctrls
        .iter()
        .map(|Control(_, raw)| raw)
        .find(|raw| raw.ctype == oid)
}

/// Runs one search to completion: every item (entries, references, intermediate messages, each
/// with its controls) and the final result, whatever its code — the caller decides (syncrepl
/// treats 4096 differently from DirSync). Errors are transport failures only.
pub(crate) async fn search_raw(
    handle: &mut LdapHandle,
    spec: &SearchSpec,
) -> Result<(Vec<ResultEntry>, LdapResult), ConnectorError> {
    let mut stream = start(handle, spec, spec.controls.clone()).await?;
    let mut items = Vec::new();
    while let Some(item) = stream.next().await.map_err(map_ldap_error)? {
        items.push(item);
    }
    let res = stream.finish().await;
    Ok((items, res))
}

async fn start(
    handle: &mut LdapHandle,
    spec: &SearchSpec,
    controls: Vec<RawControl>,
) -> Result<SearchStream<'static, String, Vec<String>>, ConnectorError> {
    let ldap = handle.ldap();
    if !controls.is_empty() {
        ldap.with_controls(controls);
    }
    ldap.streaming_search(&spec.base, spec.scope, &spec.filter, spec.attrs.clone())
        .await
        .map_err(|e| map_ldap_error(e).with_object(&spec.base))
}

enum PageState {
    /// The next page must be requested with this cookie (empty for the first).
    Next(Vec<u8>),
    /// Reading a page.
    Reading(Box<SearchStream<'static, String, Vec<String>>>),
    /// No more pages.
    Done,
}

/// A paged streaming search: entries one by one, one page in flight at a time.
///
/// Continuation references and intermediate messages are skipped. A connection failure comes
/// back as an error of a retryable kind; the search cannot continue on another connection (the
/// cookie belongs to the connection), see [`LdapSource`](super::LdapSource) for the restart.
pub(crate) struct PagedSearch {
    handle: LdapHandle,
    spec: SearchSpec,
    page_size: u32,
    state: PageState,
}

impl PagedSearch {
    /// A search that starts on the first call to [`PagedSearch::next`].
    pub fn new(handle: LdapHandle, spec: SearchSpec, page_size: u32) -> PagedSearch {
        PagedSearch {
            handle,
            spec,
            page_size: page_size.max(1),
            state: PageState::Next(Vec::new()),
        }
    }

    /// The connection (for follow-up searches multiplexed on it).
    pub fn handle(&self) -> &LdapHandle {
        &self.handle
    }

    /// The next entry, `None` at the end.
    pub async fn next(&mut self) -> Result<Option<StructureTag>, ConnectorError> {
        loop {
            match &mut self.state {
                PageState::Done => return Ok(None),
                PageState::Next(cookie) => {
                    let mut controls = self.spec.controls.clone();
                    controls.push(
                        PagedResults {
                            size: i32::try_from(self.page_size).unwrap_or(i32::MAX),
                            cookie: std::mem::take(cookie),
                        }
                        .to_control(),
                    );
                    let stream = start(&mut self.handle, &self.spec, controls).await?;
                    self.state = PageState::Reading(Box::new(stream));
                }
                PageState::Reading(stream) => {
                    let item = stream
                        .next()
                        .await
                        .map_err(|e| map_ldap_error(e).with_object(&self.spec.base));
                    let item = match item {
                        Ok(i) => i,
                        Err(e) => {
                            self.state = PageState::Done;
                            return Err(e);
                        }
                    };
                    match item {
                        Some(item) if item.0.id == 4 => return Ok(Some(item.0)),
                        Some(_) => continue,
                        None => {
                            let res = stream.finish().await;
                            self.state = PageState::Done;
                            if res.rc != 0 {
                                return Err(result_error(&res).with_object(&self.spec.base));
                            }
                            if let Some(ctrl) = response_control(&res, PAGED_RESULTS_OID) {
                                let PagedResults { cookie, .. } =
                                    PagedResults::decode(ctrl.val.as_deref().unwrap_or_default())?;
                                if !cookie.is_empty() {
                                    self.state = PageState::Next(cookie);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Completes the ranged attributes of `raw` (`member;range=0-1499`): fetches the following
/// slices of each with base-scope searches of the entry until the slice ending in `*`, and
/// leaves one complete `member;range=0-*` description holding every value, in order.
pub(crate) async fn complete_ranges(
    handle: &mut LdapHandle,
    raw: &mut RawEntry,
) -> Result<(), ConnectorError> {
    let pending: Vec<(usize, String, u32)> = raw
        .incomplete_ranges()?
        .into_iter()
        .filter_map(|(i, r)| r.high.map(|e| (i, r.base, e)))
        .collect();
    for (index, base, mut end) in pending {
        loop {
            let next = end.checked_add(1).ok_or_else(|| {
                ConnectorError::new(
                    ErrorKind::Protocol,
                    format!("range retrieval of {base}: the server sent a slice ending at {end}"),
                )
                .with_object(&raw.dn)
            })?;
            let attr = format!("{base};range={next}-*");
            let spec = SearchSpec {
                base: raw.dn.clone(),
                scope: Scope::Base,
                filter: "(objectClass=*)".to_owned(),
                attrs: vec![attr.clone()],
                controls: Vec::new(),
            };
            let (items, res) = search_raw(handle, &spec).await?;
            if res.rc != 0 {
                return Err(result_error(&res).with_object(&raw.dn));
            }
            let entry = items
                .into_iter()
                .find(|item| item.0.id == 4)
                .ok_or_else(|| {
                    ConnectorError::new(
                        ErrorKind::Protocol,
                        format!("range retrieval of {attr}: the entry did not come back"),
                    )
                    .with_object(&raw.dn)
                })?;
            let slice = RawEntry::parse(entry.0)?;
            let (desc, values) = slice
                .attrs
                .into_iter()
                .find(|(n, _)| {
                    matches!(RangedAttr::parse(n), Ok(Some(r)) if r.base.eq_ignore_ascii_case(&base))
                })
                .ok_or_else(|| {
                    ConnectorError::new(
                        ErrorKind::Protocol,
                        format!(
                            "range retrieval of {attr}: the answer holds no slice of {base} \
                             (the values may have changed during the read)"
                        ),
                    )
                    .with_object(&raw.dn)
                })?;
            let r = RangedAttr::parse(&desc).ok().flatten().ok_or_else(|| {
                ConnectorError::new(ErrorKind::Protocol, format!("bad range {desc}"))
                    .with_object(&raw.dn)
            })?;
            if r.low != next {
                return Err(ConnectorError::new(
                    ErrorKind::Protocol,
                    format!(
                        "range retrieval of {attr}: the server answered the slice starting at {}",
                        r.low
                    ),
                )
                .with_object(&raw.dn));
            }
            let new_end = r.high;
            if let Some((_, vals)) = raw.attrs.get_mut(index) {
                vals.extend(values);
            }
            match new_end {
                None => break,
                Some(e) => end = e,
            }
        }
        if let Some((name, _)) = raw.attrs.get_mut(index) {
            *name = format!("{base};range=0-*");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equality_filters_escape_values() {
        assert_eq!(equality_filter("uid", "plain"), "(uid=plain)");
        assert_eq!(
            equality_filter("cn", "*)(objectClass=*"),
            r"(cn=\2a\29\28objectClass=\2a)"
        );
        assert_eq!(equality_filter("cn", "a\\b\0"), r"(cn=a\5cb\00)");
    }
}
