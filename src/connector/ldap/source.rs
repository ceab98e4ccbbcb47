//! [`LdapSource`]: an LDAP directory (Active Directory, OpenLDAP, 389-ds) as a [`Source`].
//!
//! Full import is a paged search streamed entry by entry. Delta import is chosen by
//! [`DeltaMode`]; modes are added beside this file (`dirsync.rs`, `usn.rs`, `syncrepl.rs`) and
//! plugged into [`LdapSource::delta_import`]. It only reads; it never writes to the directory.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::StreamExt;

use super::config::{DeltaMode, LdapSourceConfig};
use super::conn::{connect, is_connection_failure, LdapHandle};
use super::dirsync::{self, DirSyncDelta};
use super::entry::{ConversionMemo, EntryMapper, RawEntry};
use super::search::{complete_ranges, PagedSearch, SearchSpec};
use super::usn::{self, UsnDelta};
use super::wire::{self, WireSearch};
use crate::connector::{
    ConnectorError, ErrorKind, ImportItem, ImportStream, Source, SourceCapabilities, Watermark,
};
use crate::model::{Anchor, Change, Entry};

/// An LDAP directory as a source.
///
/// # Full import and dropped connections
///
/// A full import is one paged search (RFC 2696) over one connection, converted entry by entry:
/// memory holds the page being converted and the next one being received, not the directory.
/// For `ldap://` (with or without StartTLS) and `ldaps://` with an anonymous or simple bind the
/// search runs on the crate's own lean wire path (`wire.rs`); SASL EXTERNAL and `ldapi://` use
/// ldap3, as do the delta checkpoint and AD range retrieval (on a second connection, opened when
/// first needed).
/// A paged-search cookie is only valid on the connection that made it, so when the connection
/// drops (or a page times out) the import reconnects and **restarts the search from the
/// beginning**, up to
/// [`LdapSourceConfig::max_reconnects`] times, with a short pause growing with each attempt.
/// Entries already yielded are not yielded again: the stream remembers a 128-bit hash of each
/// anchor it yielded (16 bytes per entry, kept only when `max_reconnects > 0`) and, after a
/// restart, skips anchors it has seen. An entry changed while the connection was down is thus
/// seen in its earlier state (a full import is never an atomic snapshot anyway; the next import
/// or delta sees the change), and an entry created meanwhile is yielded when the restarted
/// search reaches it.
#[derive(Debug)]
pub struct LdapSource {
    config: Arc<LdapSourceConfig>,
    mapper: Arc<EntryMapper>,
    skipped: Arc<AtomicU64>,
    reconnects: Arc<AtomicU64>,
}

impl LdapSource {
    /// A source reading as `config` says. Nothing is contacted until an import.
    pub fn new(config: LdapSourceConfig) -> LdapSource {
        let mapper = EntryMapper::new(&config);
        LdapSource {
            config: Arc::new(config),
            mapper: Arc::new(mapper),
            skipped: Arc::new(AtomicU64::new(0)),
            reconnects: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LdapSourceConfig {
        &self.config
    }

    /// Entries left out so far because no `objectClass` of theirs is mapped to an object type.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// How many times imports of this source reconnected after a dropped connection.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    pub(crate) fn search_spec(&self) -> SearchSpec {
        SearchSpec {
            base: self.config.base_dn.clone(),
            scope: self.config.scope.to_ldap3(),
            filter: self.config.filter.clone(),
            attrs: self.config.requested_attributes(),
            controls: Vec::new(),
        }
    }

    /// Counts an entry left out because no `objectClass` of it is mapped (delta modes).
    pub(crate) fn count_skipped(&self) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// The mapper that turns raw entries into entries (for the delta modes beside this file).
    pub(crate) fn mapper(&self) -> &EntryMapper {
        &self.mapper
    }
}

/// A 128-bit key of an anchor (two SipHash-1-3 sums with fixed keys): collisions among even
/// billions of anchors are beyond any practical chance.
fn anchor_key(anchor: &Anchor) -> u128 {
    let mut a = DefaultHasher::new();
    0u8.hash(&mut a);
    anchor.as_str().hash(&mut a);
    let mut b = DefaultHasher::new();
    1u8.hash(&mut b);
    anchor.as_str().hash(&mut b);
    (u128::from(a.finish()) << 64) | u128::from(b.finish())
}

struct FullImport {
    config: Arc<LdapSourceConfig>,
    mapper: Arc<EntryMapper>,
    skipped: Arc<AtomicU64>,
    reconnects: Arc<AtomicU64>,
    search: Search,
    /// The ldap3 connection for range retrieval: the search's own on the ldap3 path; on the
    /// wire path the one that took the checkpoint, or one opened at the first ranged entry.
    ranges: Option<LdapHandle>,
    spec: SearchSpec,
    /// Anchor keys yielded so far; they are hashes already, so the table hashes them with Fx.
    seen: Option<HashSet<u128, rustc_hash::FxBuildHasher>>,
    memo: ConversionMemo,
    restarted: bool,
    reconnects_left: u32,
    /// The watermark taken before the search began, emitted after the last entry.
    final_checkpoint: Option<Watermark>,
    done: bool,
}

impl FullImport {
    async fn next(&mut self) -> Result<Option<Entry>, ConnectorError> {
        loop {
            match self.next_attempt().await {
                Ok(Some(e)) => return Ok(Some(e)),
                Ok(None) => return Ok(None),
                Err(e) if is_connection_failure(&e) && self.reconnects_left > 0 => {
                    self.reconnects_left -= 1;
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    let attempt = self.config.max_reconnects - self.reconnects_left;
                    tracing::warn!(
                        source = %self.config.name,
                        error = %e,
                        attempt,
                        "LDAP connection lost during a full import; restarting the search"
                    );
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    match open_search(&self.config, &self.spec, None).await {
                        Ok((search, ranges)) => {
                            self.search = search;
                            self.ranges = ranges;
                        }
                        Err(e) if is_connection_failure(&e) && self.reconnects_left > 0 => {
                            // Counted as an attempt; the next loop turn tries again.
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                    self.restarted = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn next_attempt(&mut self) -> Result<Option<Entry>, ConnectorError> {
        loop {
            let Some(mut raw) = self.search.next().await? else {
                return Ok(None);
            };
            if raw.attrs.iter().any(|(n, _)| n.contains(';')) {
                let handle = match &mut self.ranges {
                    Some(h) => h,
                    None => self.ranges.insert(connect(&self.config.connection).await?),
                };
                complete_ranges(handle, &mut raw).await?;
            }
            let Some(entry) = self.mapper.to_entry_with(raw, &mut self.memo)? else {
                if !self.restarted {
                    self.skipped.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            };
            if let Some(seen) = &mut self.seen {
                let fresh = seen.insert(anchor_key(&entry.anchor));
                if !fresh && self.restarted {
                    continue;
                }
            }
            return Ok(Some(entry));
        }
    }
}

/// The paged search of a full import: on the lean wire path for `ldap://` and `ldaps://` with
/// an anonymous or simple bind, on ldap3 otherwise.
enum Search {
    Ldap3(PagedSearch),
    Wire(WireSearch),
}

impl Search {
    async fn next(&mut self) -> Result<Option<RawEntry>, ConnectorError> {
        match self {
            Search::Ldap3(s) => s.next().await?.map(RawEntry::parse).transpose(),
            Search::Wire(s) => s.next().await,
        }
    }
}

/// Starts the full-import search of `config`, with its range-retrieval connection: `handle`
/// (an ldap3 connection already open, if any) or, on the ldap3 path, a new one.
async fn open_search(
    config: &LdapSourceConfig,
    spec: &SearchSpec,
    handle: Option<LdapHandle>,
) -> Result<(Search, Option<LdapHandle>), ConnectorError> {
    let page_size = config.connection.page_size;
    if wire::supports(&config.connection) {
        let search = WireSearch::start(&config.connection, spec.clone(), page_size).await?;
        return Ok((Search::Wire(search), handle));
    }
    let handle = match handle {
        Some(h) => h,
        None => connect(&config.connection).await?,
    };
    let search = PagedSearch::new(handle.clone(), spec.clone(), page_size);
    Ok((Search::Ldap3(search), Some(handle)))
}

/// The `next` method of a delta import's state, boxed.
type NextChange<S> =
    for<'s> fn(&'s mut S) -> BoxFuture<'s, Result<Option<ImportItem<Change>>, ConnectorError>>;

/// A stream of delta items from a state whose `next` yields them, ending after the first error.
fn changes_stream<'a, S: Send + 'a>(state: S, next: NextChange<S>) -> ImportStream<'a, Change> {
    futures::stream::unfold(Some(state), move |st| async move {
        let mut st = st?;
        match next(&mut st).await {
            Ok(Some(item)) => Some((Ok(item), Some(st))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    })
    .boxed()
}

#[async_trait]
impl Source for LdapSource {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn capabilities(&self) -> SourceCapabilities {
        match self.config.delta {
            DeltaMode::Dirsync => {
                let mut c = SourceCapabilities::new(true);
                c.partial_changes = true;
                c
            }
            DeltaMode::UsnChanged | DeltaMode::Syncrepl => SourceCapabilities::new(true),
            DeltaMode::None => SourceCapabilities::new(false),
        }
    }

    async fn full_import(&self) -> Result<ImportStream<'_, Entry>, ConnectorError> {
        if self.config.delta == DeltaMode::Syncrepl {
            return self.syncrepl_full_import().await;
        }
        // The delta position is taken before the search starts: a change made during the
        // import is seen again by the next delta, never lost. The wire path needs no ldap3
        // connection unless there is a position to take.
        let needs_ldap3 =
            self.config.delta != DeltaMode::None || !wire::supports(&self.config.connection);
        let mut handle = match needs_ldap3 {
            true => Some(connect(&self.config.connection).await?),
            false => None,
        };
        let final_checkpoint = match (&mut handle, self.config.delta) {
            (Some(h), DeltaMode::Dirsync) => Some(dirsync::initial_cookie(h, &self.config).await?),
            (Some(h), DeltaMode::UsnChanged) => {
                Some(usn::initial_watermark(h, &self.config).await?)
            }
            _ => None,
        };
        let spec = self.search_spec();
        let (search, ranges) = open_search(&self.config, &spec, handle).await?;
        let state = FullImport {
            config: self.config.clone(),
            mapper: self.mapper.clone(),
            skipped: self.skipped.clone(),
            reconnects: self.reconnects.clone(),
            search,
            ranges,
            spec,
            seen: (self.config.max_reconnects > 0).then(HashSet::default),
            memo: ConversionMemo::default(),
            restarted: false,
            reconnects_left: self.config.max_reconnects,
            final_checkpoint,
            done: false,
        };
        Ok(futures::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            match st.next().await {
                Ok(Some(e)) => Some((Ok(ImportItem::Item(e)), st)),
                Ok(None) => {
                    st.done = true;
                    let w = st.final_checkpoint.take()?;
                    Some((Ok(ImportItem::Checkpoint(w)), st))
                }
                Err(e) => {
                    st.done = true;
                    Some((Err(e), st))
                }
            }
        })
        .boxed())
    }

    async fn delta_import(
        &self,
        since: &Watermark,
    ) -> Result<ImportStream<'_, Change>, ConnectorError> {
        match self.config.delta {
            DeltaMode::None => Err(ConnectorError::new(
                ErrorKind::Unsupported,
                format!(
                    "source {} is configured with delta = \"none\": full imports only",
                    self.config.name
                ),
            )),
            DeltaMode::Dirsync => {
                let handle = connect(&self.config.connection).await?;
                let delta =
                    DirSyncDelta::start(handle, self.config.clone(), self.mapper.clone(), since)
                        .await?;
                Ok(changes_stream(delta, |d| Box::pin(d.next())))
            }
            DeltaMode::UsnChanged => {
                let handle = connect(&self.config.connection).await?;
                let delta =
                    UsnDelta::start(handle, self.config.clone(), self.mapper.clone(), since)
                        .await?;
                Ok(changes_stream(delta, |d| Box::pin(d.next())))
            }
            DeltaMode::Syncrepl => self.syncrepl_delta_import(since).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::ldap::config::LdapConnection;

    #[test]
    fn anchor_keys_differ_and_are_stable() {
        let a = anchor_key(&Anchor::new("6f1e2d3c-0000-1000-8000-00aa00bb00cc"));
        let b = anchor_key(&Anchor::new("6f1e2d3c-0000-1000-8000-00aa00bb00cd"));
        assert_ne!(a, b);
        assert_eq!(
            a,
            anchor_key(&Anchor::new("6f1e2d3c-0000-1000-8000-00aa00bb00cc"))
        );
    }

    #[tokio::test]
    async fn delta_import_says_which_mode_is_missing() {
        let mut c = LdapSourceConfig::new(LdapConnection::new("ldap://127.0.0.1:9"), "dc=x");
        let s = LdapSource::new(c.clone());
        let w = Watermark::new("x", b"1".to_vec());
        let e = s.delta_import(&w).await.err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.message().contains("none"), "{e}");
        c.delta = DeltaMode::Syncrepl;
        let e = LdapSource::new(c).delta_import(&w).await.err().unwrap();
        assert!(e.message().contains("syncrepl"), "{e}");
        assert!(!s.capabilities().delta);
    }

    #[tokio::test]
    async fn a_refused_connection_is_retryable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = LdapSourceConfig::new(
            LdapConnection::new(format!("ldap://127.0.0.1:{port}")),
            "dc=x",
        );
        let e = LdapSource::new(c).full_import().await.err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(e.is_retryable());
    }
}
