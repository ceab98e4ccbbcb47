//! Searches: one search with extra request controls returning raw items and the response
//! controls ([`search_raw`], for the delta modes), a paged (RFC 2696) streaming search that
//! reads the next page while the current one is converted and holds about two pages at most
//! ([`PagedSearch`]), and Active Directory range retrieval
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

/// How many entries the page reader hands over at a time.
const CHUNK: usize = 128;

/// What the page reader hands to [`PagedSearch::next`]: entries in server order, or the error
/// that ended the search.
type Chunk = Result<Vec<StructureTag>, ConnectorError>;

/// A paged streaming search: entries one by one, at most about two pages in memory.
///
/// The pages are read by a task of their own, which asks for the next page as soon as the
/// current one's result (with the cookie) arrives, and hands entries over in chunks through a
/// bounded channel holding at most one page: the server prepares page *n + 1* while the caller
/// converts page *n*. Memory holds the page being converted and the page being received.
///
/// Continuation references and intermediate messages are skipped. A connection failure comes
/// back as an error of a retryable kind; the search cannot continue on another connection (the
/// cookie belongs to the connection), see [`LdapSource`](super::LdapSource) for the restart.
/// Dropping the search stops the reader.
pub(crate) struct PagedSearch {
    handle: LdapHandle,
    rx: tokio::sync::mpsc::Receiver<Chunk>,
    chunk: std::vec::IntoIter<StructureTag>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for PagedSearch {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl PagedSearch {
    /// Starts the search: the first page is requested at once, on the current tokio runtime.
    pub fn new(handle: LdapHandle, spec: SearchSpec, page_size: u32) -> PagedSearch {
        let page_size = page_size.max(1);
        let chunk = CHUNK.min(page_size as usize);
        let (tx, rx) = tokio::sync::mpsc::channel((page_size as usize).div_ceil(chunk));
        let reader = tokio::spawn(read_pages(handle.clone(), spec, page_size, chunk, tx));
        PagedSearch {
            handle,
            rx,
            chunk: Vec::new().into_iter(),
            reader,
        }
    }

    /// The connection (for follow-up searches multiplexed on it).
    pub fn handle(&self) -> &LdapHandle {
        &self.handle
    }

    /// The next entry, `None` at the end.
    pub async fn next(&mut self) -> Result<Option<StructureTag>, ConnectorError> {
        loop {
            if let Some(tag) = self.chunk.next() {
                return Ok(Some(tag));
            }
            match self.rx.recv().await {
                Some(chunk) => self.chunk = chunk?.into_iter(),
                None => return Ok(None),
            }
        }
    }
}

/// The page reader of [`PagedSearch`]: requests page after page and sends the entries on in
/// chunks of `chunk`; ends after the last page, at the first error (sent on), or when the
/// receiver is gone.
async fn read_pages(
    mut handle: LdapHandle,
    spec: SearchSpec,
    page_size: u32,
    chunk: usize,
    tx: tokio::sync::mpsc::Sender<Chunk>,
) {
    if let Err(e) = pages(&mut handle, &spec, page_size, chunk, &tx).await {
        let _ = tx.send(Err(e)).await;
    }
}

async fn request_page(
    handle: &mut LdapHandle,
    spec: &SearchSpec,
    page_size: u32,
    cookie: &[u8],
) -> Result<SearchStream<'static, String, Vec<String>>, ConnectorError> {
    let mut controls = spec.controls.clone();
    controls.push(
        PagedResults {
            size: i32::try_from(page_size).unwrap_or(i32::MAX),
            cookie: cookie.to_vec(),
        }
        .to_control(),
    );
    start(handle, spec, controls).await
}

async fn pages(
    handle: &mut LdapHandle,
    spec: &SearchSpec,
    page_size: u32,
    chunk: usize,
    tx: &tokio::sync::mpsc::Sender<Chunk>,
) -> Result<(), ConnectorError> {
    let mut stream = request_page(handle, spec, page_size, &[]).await?;
    loop {
        let mut batch = Vec::with_capacity(chunk);
        while let Some(item) = stream
            .next()
            .await
            .map_err(|e| map_ldap_error(e).with_object(&spec.base))?
        {
            if item.0.id != 4 {
                continue;
            }
            batch.push(item.0);
            if batch.len() == chunk {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(chunk));
                if tx.send(Ok(full)).await.is_err() {
                    return Ok(());
                }
            }
        }
        let res = stream.finish().await;
        if res.rc != 0 {
            return Err(result_error(&res).with_object(&spec.base));
        }
        let cookie = match response_control(&res, PAGED_RESULTS_OID) {
            Some(ctrl) => PagedResults::decode(ctrl.val.as_deref().unwrap_or_default())?.cookie,
            None => Vec::new(),
        };
        if cookie.is_empty() {
            if !batch.is_empty() {
                let _ = tx.send(Ok(batch)).await;
            }
            return Ok(());
        }
        // The next page is asked for before this page's last entries are handed over (which
        // may wait for room in the channel): the server works while the caller converts.
        stream = request_page(handle, spec, page_size, &cookie).await?;
        if !batch.is_empty() && tx.send(Ok(batch)).await.is_err() {
            return Ok(());
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

    proptest::proptest! {
        /// Whatever the value, the filter parses (RFC 4515, by ldap3's parser) as exactly one
        /// equality match of the attribute against the value's bytes: no value can change the
        /// filter's structure.
        #[test]
        fn any_value_stays_one_equality_assertion(value in "\\PC*") {
            use ldap3::asn1::{ASNTag, PL};
            let filter = equality_filter("cn", &value);
            let tag = ldap3::parse_filter(&filter)
                .map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{filter}: {e:?}")))?
                .into_structure();
            // equalityMatch is [3] (context-specific, constructed).
            proptest::prop_assert_eq!(tag.id, 3, "{}", filter);
            let PL::C(parts) = tag.payload else {
                return Err(proptest::test_runner::TestCaseError::fail("not constructed"));
            };
            proptest::prop_assert_eq!(parts.len(), 2);
            proptest::prop_assert_eq!(&parts[0].payload, &PL::P(b"cn".to_vec()));
            proptest::prop_assert_eq!(&parts[1].payload, &PL::P(value.as_bytes().to_vec()));
        }
    }
}
