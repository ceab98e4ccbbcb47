//! RFC 4533 content synchronization ("syncrepl") for [`LdapSource`]: the codecs of the Sync
//! Request, Sync State and Sync Done controls and of the Sync Info intermediate response, and
//! the refreshOnly and refreshAndPersist searches behind `delta = "syncrepl"`.
//!
//! - Full import: a refreshOnly search without a cookie; every entry arrives (sync state *add*)
//!   and the final Sync Done control carries the cookie, yielded as
//!   `Checkpoint(Watermark::new("syncrepl", cookie))`.
//! - Delta import: a refreshOnly search with the cookie. Entries in state *add*/*modify* become
//!   [`Change::Replace`] (the whole entry: syncrepl never sends attribute-level changes, and
//!   slapd reports a modified entry as *add*), state *delete* and a `syncIdSet` with
//!   `refreshDeletes` TRUE become [`Change::Delete`] by anchor (the entryUUID as the model's GUID
//!   text, the form a full import's `entryUUID` anchor takes). When the server answers with a
//!   **present phase** (it cannot say what was deleted, e.g. its session log does not reach back
//!   to the cookie), unchanged entries are reported present and the connector yields
//!   [`ImportItem::Present`] batches; the final checkpoint closes the phase, and the engine then
//!   deletes every mirrored object neither present nor changed in it.
//! - [`LdapSource::persist`]: refreshAndPersist; after the refresh the stream stays open and
//!   yields changes and checkpoints as the server sends them.
//!
//! Paging and syncrepl do not combine (slapd refuses the paged-results control on a sync
//! search), so entries are yielded as they arrive rather than a page at a time: memory holds
//! what the consumer has not taken yet (ldap3 buffers arriving messages unboundedly). Every
//! server message is parsed by the fallible code below (ldap3's own sync-control parsers panic
//! on malformed input and are not used). No state is kept between searches but the cookie the
//! caller holds.

use futures::StreamExt;
use ldap3::asn1::{StructureTag, TagClass, PL};
use ldap3::controls::RawControl;
use ldap3::{LdapResult, SearchStream};
use uuid::Uuid;

use super::ber::{self, BerError, BerReader};
use super::config::{AnchorAttribute, DeltaMode};
use super::conn::{connect, map_ldap_error, result_error, LdapHandle};
use super::entry::RawEntry;
use super::search::SearchSpec;
use super::source::LdapSource;
use crate::connector::{ConnectorError, ErrorKind, ImportItem, ImportStream, Watermark};
use crate::model::{Anchor, Change, Entry, ObjectType};

/// OID of the Sync Request control.
pub const SYNC_REQUEST_OID: &str = "1.3.6.1.4.1.4203.1.9.1.1";
/// OID of the Sync State control (on entries).
pub const SYNC_STATE_OID: &str = "1.3.6.1.4.1.4203.1.9.1.2";
/// OID of the Sync Done control (on the search result).
pub const SYNC_DONE_OID: &str = "1.3.6.1.4.1.4203.1.9.1.3";
/// OID (responseName) of the Sync Info intermediate response.
pub const SYNC_INFO_OID: &str = "1.3.6.1.4.1.4203.1.9.1.4";
/// The watermark kind of syncrepl cookies.
pub const SYNCREPL_WATERMARK: &str = "syncrepl";
/// The object type of a [`Change::Delete`] built from a bare entryUUID: the server names only
/// the UUID of a deleted entry, so its type is not known (the state stores delete by anchor).
pub const UNKNOWN_OBJECT_TYPE: &str = "unknown";

const BOOLEAN: u8 = 0x01;
const ENUMERATED: u8 = 0x0a;
const SET: u8 = 0x31;

/// The mode of a sync request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// refreshOnly (1): the search ends after the refresh.
    RefreshOnly,
    /// refreshAndPersist (3): the search stays open after the refresh.
    RefreshAndPersist,
}

/// The Sync Request control (`SEQUENCE { mode ENUMERATED, cookie OCTET STRING OPTIONAL,
/// reloadHint BOOLEAN DEFAULT FALSE }`), critical.
pub fn sync_request_control(
    mode: SyncMode,
    cookie: Option<&[u8]>,
    reload_hint: bool,
) -> RawControl {
    RawControl {
        ctype: SYNC_REQUEST_OID.to_owned(),
        crit: true,
        val: Some(encode_sync_request(mode, cookie, reload_hint)),
    }
}

fn encode_sync_request(mode: SyncMode, cookie: Option<&[u8]>, reload_hint: bool) -> Vec<u8> {
    let mut inner = Vec::new();
    let m: u8 = match mode {
        SyncMode::RefreshOnly => 1,
        SyncMode::RefreshAndPersist => 3,
    };
    ber::write_tlv(&mut inner, ENUMERATED, &[m]);
    if let Some(c) = cookie {
        ber::write_octets(&mut inner, c);
    }
    if reload_hint {
        ber::write_tlv(&mut inner, BOOLEAN, &[0xff]);
    }
    ber::sequence(&inner)
}

/// The state of an entry in a Sync State control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncStateKind {
    /// present (0): unchanged since the cookie (present phase).
    Present,
    /// add (1).
    Add,
    /// modify (2).
    Modify,
    /// delete (3).
    Delete,
}

/// A Sync State control value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncState {
    /// The entry's state.
    pub state: SyncStateKind,
    /// The entry's entryUUID.
    pub uuid: Uuid,
    /// A cookie, when the server sent one.
    pub cookie: Option<Vec<u8>>,
}

/// A Sync Done control value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncDone {
    /// The new cookie, when the server sent one.
    pub cookie: Option<Vec<u8>>,
    /// TRUE: the refresh was a delete phase; FALSE: a present phase.
    pub refresh_deletes: bool,
}

/// A Sync Info intermediate response value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncInfo {
    /// newcookie `[0]`.
    NewCookie(Vec<u8>),
    /// refreshDelete `[1]`: the end of a delete phase.
    RefreshDelete {
        /// The cookie, when sent.
        cookie: Option<Vec<u8>>,
        /// The refresh is complete (DEFAULT TRUE).
        refresh_done: bool,
    },
    /// refreshPresent `[2]`: the end of a present phase.
    RefreshPresent {
        /// The cookie, when sent.
        cookie: Option<Vec<u8>>,
        /// The refresh is complete (DEFAULT TRUE).
        refresh_done: bool,
    },
    /// syncIdSet `[3]`: many entries deleted (refreshDeletes TRUE) or present at once.
    SyncIdSet {
        /// The cookie, when sent.
        cookie: Option<Vec<u8>>,
        /// TRUE: the UUIDs were deleted; FALSE: they are present.
        refresh_deletes: bool,
        /// The entryUUIDs.
        uuids: Vec<Uuid>,
    },
}

fn proto(what: &str, e: BerError) -> ConnectorError {
    ConnectorError::new(
        ErrorKind::Protocol,
        format!("malformed {what}: {e} (RFC 4533; the server's answer cannot be read)"),
    )
}

fn read_bool(r: &mut BerReader<'_>, what: &str) -> Result<bool, BerError> {
    let probe = r.clone();
    let content = r.read(BOOLEAN, what)?;
    match content {
        [b] => Ok(*b != 0),
        _ => {
            let mut p = probe;
            let (_, _, at) = p.read_any()?;
            Err(BerError {
                offset: at,
                message: format!("{what}: a BOOLEAN of {} bytes", content.len()),
            })
        }
    }
}

/// Whether the next element has tag `tag` (without consuming it).
fn peek_is(r: &BerReader<'_>, tag: u8) -> bool {
    let mut p = r.clone();
    matches!(p.read_any(), Ok((t, _, _)) if t == tag)
}

fn read_uuid(bytes: &[u8], what: &str, at: usize) -> Result<Uuid, BerError> {
    Uuid::from_slice(bytes).map_err(|_| BerError {
        offset: at,
        message: format!("{what}: {} bytes where a UUID has 16", bytes.len()),
    })
}

/// Parses a Sync State control value.
pub fn parse_sync_state(val: &[u8]) -> Result<SyncState, ConnectorError> {
    let what = "Sync State control";
    let e = |err| proto(what, err);
    let mut r = BerReader::new(val);
    let mut s = r.read_sequence(what).map_err(e)?;
    let probe = s.clone();
    let state = s.read(ENUMERATED, "state").map_err(e)?;
    let state = match state {
        [0] => SyncStateKind::Present,
        [1] => SyncStateKind::Add,
        [2] => SyncStateKind::Modify,
        [3] => SyncStateKind::Delete,
        other => {
            let mut p = probe;
            let at = p.read_any().map(|(_, _, at)| at).unwrap_or(0);
            return Err(e(BerError {
                offset: at,
                message: format!("state: unknown value {other:02x?}"),
            }));
        }
    };
    let mut p = s.clone();
    let at = p.read_any().map(|(_, _, at)| at).unwrap_or(0);
    let uuid = read_uuid(s.read_octets("entryUUID").map_err(e)?, "entryUUID", at).map_err(e)?;
    let cookie = if s.is_empty() {
        None
    } else {
        Some(s.read_octets("cookie").map_err(e)?.to_vec())
    };
    s.finish(what).map_err(e)?;
    r.finish(what).map_err(e)?;
    Ok(SyncState {
        state,
        uuid,
        cookie,
    })
}

/// Parses a Sync Done control value (an absent value is the default: no cookie, FALSE).
pub fn parse_sync_done(val: &[u8]) -> Result<SyncDone, ConnectorError> {
    let what = "Sync Done control";
    let e = |err| proto(what, err);
    let mut r = BerReader::new(val);
    let mut s = r.read_sequence(what).map_err(e)?;
    let mut done = SyncDone::default();
    if peek_is(&s, ber::OCTET_STRING) {
        done.cookie = Some(s.read_octets("cookie").map_err(e)?.to_vec());
    }
    if !s.is_empty() {
        done.refresh_deletes = read_bool(&mut s, "refreshDeletes").map_err(e)?;
    }
    s.finish(what).map_err(e)?;
    r.finish(what).map_err(e)?;
    Ok(done)
}

/// Parses a Sync Info value.
pub fn parse_sync_info(val: &[u8]) -> Result<SyncInfo, ConnectorError> {
    let what = "Sync Info message";
    let e = |err| proto(what, err);
    let mut r = BerReader::new(val);
    let (tag, content, offset) = r.read_any().map_err(e)?;
    r.finish(what).map_err(e)?;
    let inner = |tag: u8| -> Result<BerReader<'_>, ConnectorError> {
        // Re-read the element as constructed to get a reader with the right offsets.
        BerReader::new(val).read_constructed(tag, what).map_err(e)
    };
    let info = match tag {
        0x80 => SyncInfo::NewCookie(content.to_vec()),
        0xa1 | 0xa2 => {
            let mut s = inner(tag)?;
            let cookie = if peek_is(&s, ber::OCTET_STRING) {
                Some(s.read_octets("cookie").map_err(e)?.to_vec())
            } else {
                None
            };
            let refresh_done = if s.is_empty() {
                true
            } else {
                read_bool(&mut s, "refreshDone").map_err(e)?
            };
            s.finish(what).map_err(e)?;
            if tag == 0xa1 {
                SyncInfo::RefreshDelete {
                    cookie,
                    refresh_done,
                }
            } else {
                SyncInfo::RefreshPresent {
                    cookie,
                    refresh_done,
                }
            }
        }
        0xa3 => {
            let mut s = inner(tag)?;
            let cookie = if peek_is(&s, ber::OCTET_STRING) {
                Some(s.read_octets("cookie").map_err(e)?.to_vec())
            } else {
                None
            };
            let refresh_deletes = if peek_is(&s, BOOLEAN) {
                read_bool(&mut s, "refreshDeletes").map_err(e)?
            } else {
                false
            };
            let mut set = s.read_constructed(SET, "syncUUIDs").map_err(e)?;
            let mut uuids = Vec::new();
            while !set.is_empty() {
                let mut p = set.clone();
                let at = p.read_any().map(|(_, _, at)| at).unwrap_or(0);
                let bytes = set.read_octets("syncUUID").map_err(e)?;
                uuids.push(read_uuid(bytes, "syncUUID", at).map_err(e)?);
            }
            s.finish(what).map_err(e)?;
            SyncInfo::SyncIdSet {
                cookie,
                refresh_deletes,
                uuids,
            }
        }
        other => {
            return Err(e(BerError {
                offset: offset.saturating_sub(2),
                message: format!("unknown Sync Info choice tag 0x{other:02x}"),
            }))
        }
    };
    Ok(info)
}

/// Reads an IntermediateResponse (`[APPLICATION 25] SEQUENCE { responseName [0] OPTIONAL,
/// responseValue [1] OPTIONAL }`) as ldap3 decoded it: `(name, value)`.
pub(crate) fn intermediate_parts(
    tag: &StructureTag,
) -> Result<(Option<String>, Option<Vec<u8>>), ConnectorError> {
    let bad = |m: &str| {
        ConnectorError::new(
            ErrorKind::Protocol,
            format!("malformed intermediate response: {m}"),
        )
    };
    let PL::C(parts) = &tag.payload else {
        return Err(bad("primitive where a SEQUENCE was expected"));
    };
    let (mut name, mut value) = (None, None);
    for p in parts {
        let bytes = match (&p.class, &p.payload) {
            (TagClass::Context, PL::P(b)) => b,
            _ => return Err(bad("a part is not a primitive context-tagged element")),
        };
        match p.id {
            0 => {
                name = Some(
                    String::from_utf8(bytes.clone())
                        .map_err(|_| bad("the responseName is not UTF-8"))?,
                )
            }
            1 => value = Some(bytes.clone()),
            n => return Err(bad(&format!("unknown part [{n}]"))),
        }
    }
    Ok((name, value))
}

/// The anchor of an entryUUID, in the form a full import's entryUUID anchor has.
pub fn uuid_anchor(uuid: &Uuid) -> Anchor {
    Anchor::from_guid(*uuid)
}

/// One message of a sync search.
#[derive(Debug)]
enum SyncEvent {
    /// An entry with its sync state (the raw entry holds no attributes for present/delete).
    Entry(SyncState, RawEntry),
    /// A Sync Info message.
    Info(SyncInfo),
    /// The search ended: the result and its Sync Done control.
    Done(LdapResult, Option<SyncDone>),
}

/// A running sync search on its own connection.
struct SyncSearch {
    handle: LdapHandle,
    stream: Option<SearchStream<'static, String, Vec<String>>>,
    msgid: i32,
    base: String,
}

impl SyncSearch {
    async fn start(
        source: &LdapSource,
        mode: SyncMode,
        cookie: Option<&[u8]>,
    ) -> Result<SyncSearch, ConnectorError> {
        let mut handle = connect(&source.config().connection).await?;
        let spec: SearchSpec = source.search_spec();
        let ldap = handle.ldap();
        if mode == SyncMode::RefreshAndPersist {
            // The operation timeout bounds each message; a persistent search waits for changes
            // as long as it takes.
            ldap.timeout = None;
        }
        ldap.with_controls(vec![sync_request_control(mode, cookie, false)]);
        let stream = ldap
            .streaming_search(&spec.base, spec.scope, &spec.filter, spec.attrs.clone())
            .await
            .map_err(|e| map_ldap_error(e).with_object(&spec.base))?;
        let msgid = handle.ldap().last_id();
        Ok(SyncSearch {
            handle,
            stream: Some(stream),
            msgid,
            base: spec.base,
        })
    }

    /// The next event; `None` after [`SyncEvent::Done`].
    async fn next(&mut self) -> Result<Option<SyncEvent>, ConnectorError> {
        loop {
            let Some(stream) = self.stream.as_mut() else {
                return Ok(None);
            };
            let item = stream
                .next()
                .await
                .map_err(|e| map_ldap_error(e).with_object(&self.base))?;
            let Some(entry) = item else {
                let res = stream.finish().await;
                self.stream = None;
                let done = ctrls_find(&res.ctrls, SYNC_DONE_OID)
                    .map(|v| parse_sync_done(v.unwrap_or_default()))
                    .transpose()?;
                return Ok(Some(SyncEvent::Done(res, done)));
            };
            let (tag, ctrls) = (entry.0, entry.1);
            match tag.id {
                4 => {
                    let raw = RawEntry::parse(tag)?;
                    let raw_ctrls: Vec<RawControl> = ctrls.into_iter().map(|c| c.1).collect();
                    let val = raw_ctrls
                        .iter()
                        .find(|c| c.ctype == SYNC_STATE_OID)
                        .ok_or_else(|| {
                            ConnectorError::new(
                                ErrorKind::Protocol,
                                "a sync search returned an entry without a Sync State control",
                            )
                            .with_object(&raw.dn)
                        })?;
                    let state = parse_sync_state(val.val.as_deref().unwrap_or_default())
                        .map_err(|e| e.with_object(&raw.dn))?;
                    return Ok(Some(SyncEvent::Entry(state, raw)));
                }
                25 => {
                    let (name, value) = intermediate_parts(&tag)?;
                    if name.as_deref() != Some(SYNC_INFO_OID) {
                        tracing::debug!(?name, "ignoring an intermediate response");
                        continue;
                    }
                    let info = parse_sync_info(value.as_deref().unwrap_or_default())?;
                    return Ok(Some(SyncEvent::Info(info)));
                }
                // Continuation references: outside what this source reads.
                _ => continue,
            }
        }
    }
}

fn ctrls_find<'a>(ctrls: &'a [ldap3::controls::Control], oid: &str) -> Option<Option<&'a [u8]>> {
    ctrls
        .iter()
        .find(|c| c.1.ctype == oid)
        .map(|c| c.1.val.as_deref())
}

impl Drop for SyncSearch {
    fn drop(&mut self) {
        if self.stream.is_none() {
            return;
        }
        // Abandon the search on the server (a persistent one would otherwise stay until the
        // connection closes, which dropping the handle does as well).
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let mut handle = self.handle.clone();
            let msgid = self.msgid;
            rt.spawn(async move {
                let _ = handle.ldap().abandon(msgid).await;
                handle.close().await;
            });
        }
    }
}

/// What a refresh turns into: the source's configuration-dependent conversion of events.
struct Converter<'a> {
    source: &'a LdapSource,
    /// The latest cookie the server sent.
    cookie: Option<Vec<u8>>,
    /// Present anchors not yielded yet.
    present: Vec<Anchor>,
    /// A present phase was seen (a `Present` item must be yielded before the checkpoint).
    present_phase: bool,
}

const PRESENT_BATCH: usize = 1000;

impl<'a> Converter<'a> {
    fn new(source: &'a LdapSource, cookie: Option<Vec<u8>>) -> Self {
        Converter {
            source,
            cookie,
            present: Vec::new(),
            present_phase: false,
        }
    }

    fn delete(uuid: &Uuid) -> Change {
        Change::Delete {
            anchor: uuid_anchor(uuid),
            object_type: ObjectType::new(UNKNOWN_OBJECT_TYPE),
        }
    }

    /// The change an entry with sync state add/modify stands for.
    fn entry_change(&self, uuid: &Uuid, raw: RawEntry) -> Result<Change, ConnectorError> {
        match self.source.mapper().to_entry(raw)? {
            Some(e) => Ok(Change::Replace(e)),
            // No longer of a mapped type (or never was): out of scope, like a deletion.
            None => Ok(Self::delete(uuid)),
        }
    }

    fn set_cookie(&mut self, c: Option<Vec<u8>>) {
        if let Some(c) = c {
            self.cookie = Some(c);
        }
    }

    /// Converts one event of a delta (or persist) search into items.
    fn convert(
        &mut self,
        ev: SyncEvent,
        out: &mut Vec<ImportItem<Change>>,
    ) -> Result<(), ConnectorError> {
        match ev {
            SyncEvent::Entry(state, raw) => {
                match state.state {
                    SyncStateKind::Present => {
                        self.present_phase = true;
                        self.present.push(uuid_anchor(&state.uuid));
                    }
                    SyncStateKind::Add | SyncStateKind::Modify => {
                        out.push(ImportItem::Item(self.entry_change(&state.uuid, raw)?));
                    }
                    SyncStateKind::Delete => out.push(ImportItem::Item(Self::delete(&state.uuid))),
                }
                self.set_cookie(state.cookie);
            }
            SyncEvent::Info(info) => match info {
                SyncInfo::NewCookie(c) => self.set_cookie(Some(c)),
                SyncInfo::RefreshDelete { cookie, .. } => self.set_cookie(cookie),
                SyncInfo::RefreshPresent { cookie, .. } => {
                    self.present_phase = true;
                    self.set_cookie(cookie);
                }
                SyncInfo::SyncIdSet {
                    cookie,
                    refresh_deletes,
                    uuids,
                } => {
                    if refresh_deletes {
                        out.extend(uuids.iter().map(|u| ImportItem::Item(Self::delete(u))));
                    } else {
                        self.present_phase = true;
                        self.present.extend(uuids.iter().map(uuid_anchor));
                    }
                    self.set_cookie(cookie);
                }
            },
            SyncEvent::Done(res, done) => {
                if res.rc == 53 {
                    // unwillingToPerform to a refresh from a cookie: slapd's answer when the
                    // cookie is ahead of its own state ("consumer state is newer than
                    // provider", e.g. after a crash lost its unsaved contextCSN). The cookie
                    // cannot be served; a full import can.
                    return Err(ConnectorError::new(
                        ErrorKind::InvalidWatermark,
                        format!(
                            "the server refused the syncrepl cookie: unwillingToPerform (53): {}",
                            res.text
                        ),
                    )
                    .with_object(&self.source.config().base_dn));
                }
                if res.rc != 0 {
                    return Err(result_error(&res).with_object(&self.source.config().base_dn));
                }
                if let Some(d) = done {
                    if !d.refresh_deletes {
                        self.present_phase = true;
                    }
                    self.set_cookie(d.cookie);
                }
            }
        }
        if self.present.len() >= PRESENT_BATCH {
            out.push(ImportItem::Present(std::mem::take(&mut self.present)));
        }
        Ok(())
    }

    /// Yields what the present phase gathered and a checkpoint at the current cookie.
    fn checkpoint(&mut self, out: &mut Vec<ImportItem<Change>>) {
        if self.present_phase || !self.present.is_empty() {
            out.push(ImportItem::Present(std::mem::take(&mut self.present)));
            self.present_phase = false;
        }
        if let Some(c) = &self.cookie {
            out.push(ImportItem::Checkpoint(Watermark::new(
                SYNCREPL_WATERMARK,
                c.clone(),
            )));
        }
    }
}

/// Checks that `since` is a syncrepl cookie and the source can serve it.
fn check_watermark(source: &LdapSource, since: &Watermark) -> Result<(), ConnectorError> {
    check_config(source)?;
    if since.kind != SYNCREPL_WATERMARK {
        return Err(ConnectorError::new(
            ErrorKind::InvalidWatermark,
            format!(
                "source {}: a {:?} watermark cannot be served by syncrepl (a full import is \
                 needed)",
                source.config().name,
                since.kind
            ),
        ));
    }
    Ok(())
}

/// Syncrepl names deleted entries by entryUUID only: the anchor must be the entryUUID.
fn check_config(source: &LdapSource) -> Result<(), ConnectorError> {
    let c = source.config();
    if c.delta != DeltaMode::Syncrepl {
        return Err(ConnectorError::new(
            ErrorKind::Config,
            format!("source {}: delta mode is not syncrepl", c.name),
        ));
    }
    match c.anchor {
        AnchorAttribute::Auto | AnchorAttribute::EntryUuid => Ok(()),
        ref other => Err(ConnectorError::new(
            ErrorKind::Config,
            format!(
                "source {}: syncrepl reports deleted entries by entryUUID, so the anchor must be \
                 entry_uuid (or auto), not {other:?}",
                c.name
            ),
        )),
    }
}

/// Maps `e-syncRefreshRequired` (and anything the stream ended with) into the error to yield.
fn refresh_error(e: ConnectorError) -> ConnectorError {
    if e.kind() == ErrorKind::InvalidWatermark {
        ConnectorError::new(
            ErrorKind::InvalidWatermark,
            format!(
                "the server cannot serve the syncrepl cookie (e-syncRefreshRequired): {}",
                e.message()
            ),
        )
    } else {
        e
    }
}

struct StreamState<'a> {
    search: SyncSearch,
    conv: Converter<'a>,
    queue: std::collections::VecDeque<ImportItem<Change>>,
    persist: bool,
    done: bool,
}

impl<'a> StreamState<'a> {
    async fn next(&mut self) -> Result<Option<ImportItem<Change>>, ConnectorError> {
        loop {
            if let Some(item) = self.queue.pop_front() {
                return Ok(Some(item));
            }
            if self.done {
                return Ok(None);
            }
            let Some(ev) = self.search.next().await? else {
                self.done = true;
                continue;
            };
            let mut out = Vec::new();
            let end = matches!(ev, SyncEvent::Done(..));
            // In persist mode, the end of the refresh, a new cookie and a cookie on an entry
            // each make a checkpoint.
            let checkpoint = end
                || match &ev {
                    SyncEvent::Info(SyncInfo::NewCookie(_)) => self.persist,
                    SyncEvent::Info(
                        SyncInfo::RefreshDelete { refresh_done, .. }
                        | SyncInfo::RefreshPresent { refresh_done, .. },
                    ) => self.persist && *refresh_done,
                    SyncEvent::Entry(s, _) => self.persist && s.cookie.is_some(),
                    _ => false,
                };
            self.conv.convert(ev, &mut out).map_err(refresh_error)?;
            if checkpoint {
                self.conv.checkpoint(&mut out);
            }
            if end {
                self.done = true;
            }
            self.queue.extend(out);
        }
    }
}

fn into_stream<'a>(state: StreamState<'a>) -> ImportStream<'a, Change> {
    futures::stream::unfold((state, false), |(mut st, failed)| async move {
        if failed {
            return None;
        }
        match st.next().await {
            Ok(Some(i)) => Some((Ok(i), (st, false))),
            Ok(None) => None,
            Err(e) => Some((Err(e), (st, true))),
        }
    })
    .boxed()
}

impl LdapSource {
    /// The full import of `delta = "syncrepl"`: a refreshOnly search without a cookie, each
    /// entry yielded as it arrives, then a checkpoint with the server's cookie.
    pub(crate) async fn syncrepl_full_import(
        &self,
    ) -> Result<ImportStream<'_, Entry>, ConnectorError> {
        check_config(self)?;
        let search = SyncSearch::start(self, SyncMode::RefreshOnly, None).await?;
        struct Full<'a> {
            source: &'a LdapSource,
            search: SyncSearch,
            cookie: Option<Vec<u8>>,
            done: bool,
        }
        let st = Full {
            source: self,
            search,
            cookie: None,
            done: false,
        };
        Ok(futures::stream::unfold(st, |mut st| async move {
            if st.done {
                return None;
            }
            loop {
                let ev = match st.search.next().await {
                    Ok(Some(ev)) => ev,
                    Ok(None) => return None,
                    Err(e) => {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                };
                match ev {
                    SyncEvent::Entry(state, raw) => {
                        if let Some(c) = state.cookie {
                            st.cookie = Some(c);
                        }
                        if matches!(state.state, SyncStateKind::Add | SyncStateKind::Modify) {
                            match st.source.mapper().to_entry(raw) {
                                Ok(Some(e)) => return Some((Ok(ImportItem::Item(e)), st)),
                                Ok(None) => st.source.count_skipped(),
                                Err(e) => {
                                    st.done = true;
                                    return Some((Err(e), st));
                                }
                            }
                        }
                    }
                    SyncEvent::Info(info) => {
                        let c = match info {
                            SyncInfo::NewCookie(c) => Some(c),
                            SyncInfo::RefreshDelete { cookie, .. }
                            | SyncInfo::RefreshPresent { cookie, .. }
                            | SyncInfo::SyncIdSet { cookie, .. } => cookie,
                        };
                        if c.is_some() {
                            st.cookie = c;
                        }
                    }
                    SyncEvent::Done(res, done) => {
                        st.done = true;
                        if res.rc != 0 {
                            let e = result_error(&res).with_object(&st.source.config().base_dn);
                            return Some((Err(e), st));
                        }
                        if let Some(c) = done.and_then(|d| d.cookie) {
                            st.cookie = Some(c);
                        }
                        let item = match st.cookie.take() {
                            Some(c) => Ok(ImportItem::Checkpoint(Watermark::new(
                                SYNCREPL_WATERMARK,
                                c,
                            ))),
                            None => Err(ConnectorError::new(
                                ErrorKind::Protocol,
                                "the syncrepl refresh ended without a cookie (is the syncprov \
                                 overlay configured on this database?)",
                            )
                            .with_object(&st.source.config().base_dn)),
                        };
                        return Some((item, st));
                    }
                }
            }
        })
        .boxed())
    }

    /// The delta import of `delta = "syncrepl"`: a refreshOnly search from the cookie.
    pub(crate) async fn syncrepl_delta_import(
        &self,
        since: &Watermark,
    ) -> Result<ImportStream<'_, Change>, ConnectorError> {
        check_watermark(self, since)?;
        let search = SyncSearch::start(self, SyncMode::RefreshOnly, Some(&since.data)).await?;
        Ok(into_stream(StreamState {
            search,
            conv: Converter::new(self, Some(since.data.clone())),
            queue: Default::default(),
            persist: false,
            done: false,
        }))
    }

    /// Near-real-time changes (RFC 4533 refreshAndPersist) from the syncrepl cookie `since`:
    /// first the refresh (as [`Source::delta_import`](crate::connector::Source::delta_import)
    /// yields it, present phase included, closed by a checkpoint), then, for as long as the
    /// stream is polled, each change the server reports ([`Change::Replace`] or
    /// [`Change::Delete`]) and a checkpoint whenever the server sends a new cookie.
    ///
    /// The stream has no per-message timeout (it waits for changes); it ends with an error
    /// when the connection drops, of kind [`ErrorKind::InvalidWatermark`] when the server
    /// cannot serve the cookie. Dropping it abandons the search and closes its connection.
    /// Needs `delta = "syncrepl"` and an entryUUID anchor.
    pub async fn persist(
        &self,
        since: &Watermark,
    ) -> Result<ImportStream<'_, Change>, ConnectorError> {
        check_watermark(self, since)?;
        let search =
            SyncSearch::start(self, SyncMode::RefreshAndPersist, Some(&since.data)).await?;
        Ok(into_stream(StreamState {
            search,
            conv: Converter::new(self, Some(since.data.clone())),
            queue: Default::default(),
            persist: true,
            done: false,
        }))
    }
}

#[cfg(test)]
pub(crate) mod encode {
    //! Encoders of the server-side values, for tests.
    use super::*;

    pub fn sync_state(s: &SyncState) -> Vec<u8> {
        let mut inner = Vec::new();
        let v = match s.state {
            SyncStateKind::Present => 0,
            SyncStateKind::Add => 1,
            SyncStateKind::Modify => 2,
            SyncStateKind::Delete => 3,
        };
        ber::write_tlv(&mut inner, ENUMERATED, &[v]);
        ber::write_octets(&mut inner, s.uuid.as_bytes());
        if let Some(c) = &s.cookie {
            ber::write_octets(&mut inner, c);
        }
        ber::sequence(&inner)
    }

    pub fn sync_done(d: &SyncDone) -> Vec<u8> {
        let mut inner = Vec::new();
        if let Some(c) = &d.cookie {
            ber::write_octets(&mut inner, c);
        }
        if d.refresh_deletes {
            ber::write_tlv(&mut inner, BOOLEAN, &[0xff]);
        }
        ber::sequence(&inner)
    }

    pub fn sync_info(i: &SyncInfo) -> Vec<u8> {
        let mut out = Vec::new();
        match i {
            SyncInfo::NewCookie(c) => ber::write_tlv(&mut out, 0x80, c),
            SyncInfo::RefreshDelete {
                cookie,
                refresh_done,
            }
            | SyncInfo::RefreshPresent {
                cookie,
                refresh_done,
            } => {
                let mut inner = Vec::new();
                if let Some(c) = cookie {
                    ber::write_octets(&mut inner, c);
                }
                if !refresh_done {
                    ber::write_tlv(&mut inner, BOOLEAN, &[0]);
                }
                let tag = if matches!(i, SyncInfo::RefreshDelete { .. }) {
                    0xa1
                } else {
                    0xa2
                };
                ber::write_tlv(&mut out, tag, &inner);
            }
            SyncInfo::SyncIdSet {
                cookie,
                refresh_deletes,
                uuids,
            } => {
                let mut inner = Vec::new();
                if let Some(c) = cookie {
                    ber::write_octets(&mut inner, c);
                }
                if *refresh_deletes {
                    ber::write_tlv(&mut inner, BOOLEAN, &[0xff]);
                }
                let mut set = Vec::new();
                for u in uuids {
                    ber::write_octets(&mut set, u.as_bytes());
                }
                ber::write_tlv(&mut inner, SET, &set);
                ber::write_tlv(&mut out, 0xa3, &inner);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn u(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    #[test]
    fn sync_request_encodes_as_rfc_4533_says() {
        let c = sync_request_control(SyncMode::RefreshOnly, None, false);
        assert_eq!(c.ctype, SYNC_REQUEST_OID);
        assert!(c.crit);
        assert_eq!(c.val.unwrap(), [0x30, 0x03, 0x0a, 0x01, 0x01]);
        let c = sync_request_control(SyncMode::RefreshAndPersist, Some(b"rid=000"), true);
        assert_eq!(
            c.val.unwrap(),
            [
                0x30, 0x0f, 0x0a, 0x01, 0x03, 0x04, 0x07, b'r', b'i', b'd', b'=', b'0', b'0', b'0',
                0x01, 0x01, 0xff
            ]
        );
    }

    #[test]
    fn sync_state_parses_and_rejects() {
        let mut v = vec![0x30, 0x15, 0x0a, 0x01, 0x03, 0x04, 0x10];
        v.extend_from_slice(&[7u8; 16]);
        let s = parse_sync_state(&v).unwrap();
        assert_eq!(s.state, SyncStateKind::Delete);
        assert_eq!(s.uuid, u(7));
        assert_eq!(s.cookie, None);
        // Unknown state value, short UUID, trailing bytes.
        let mut bad = v.clone();
        bad[4] = 9;
        let e = parse_sync_state(&bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(e.message().contains("state"), "{e}");
        let e = parse_sync_state(&[0x30, 0x06, 0x0a, 0x01, 0x01, 0x04, 0x01, 0x00]).unwrap_err();
        assert!(e.message().contains("16"), "{e}");
        let mut trailing = v.clone();
        trailing.push(0);
        assert!(parse_sync_state(&trailing).is_err());
    }

    #[test]
    fn sync_done_defaults() {
        assert_eq!(parse_sync_done(&[0x30, 0x00]).unwrap(), SyncDone::default());
        let d = parse_sync_done(&[0x30, 0x06, 0x04, 0x01, b'c', 0x01, 0x01, 0xff]).unwrap();
        assert_eq!(d.cookie.as_deref(), Some(&b"c"[..]));
        assert!(d.refresh_deletes);
        assert!(parse_sync_done(&[0x30, 0x03, 0x01, 0x02, 0xff]).is_err());
    }

    #[test]
    fn sync_info_choices() {
        assert_eq!(
            parse_sync_info(&[0x80, 0x02, b'a', b'b']).unwrap(),
            SyncInfo::NewCookie(b"ab".to_vec())
        );
        assert_eq!(
            parse_sync_info(&[0xa2, 0x00]).unwrap(),
            SyncInfo::RefreshPresent {
                cookie: None,
                refresh_done: true
            }
        );
        let mut v = vec![0xa3, 0x29, 0x01, 0x01, 0xff, 0x31, 0x24];
        for n in [1u8, 2] {
            v.extend_from_slice(&[0x04, 0x10]);
            v.extend_from_slice(&[n; 16]);
        }
        assert_eq!(
            parse_sync_info(&v).unwrap(),
            SyncInfo::SyncIdSet {
                cookie: None,
                refresh_deletes: true,
                uuids: vec![u(1), u(2)]
            }
        );
        let e = parse_sync_info(&[0xa5, 0x00]).unwrap_err();
        assert!(e.message().contains("0xa5"), "{e}");
        assert!(parse_sync_info(&[0xa3, 0x00]).is_err());
    }

    #[test]
    fn uuid_anchors_match_entry_uuid_text_anchors() {
        let text = "6f1e2d3c-0000-1000-8000-00aa00bb00cc";
        let uuid = Uuid::parse_str(text).unwrap();
        assert_eq!(
            uuid_anchor(&uuid),
            Anchor::from_guid(Uuid::parse_str(&text.to_uppercase()).unwrap())
        );
    }

    #[test]
    fn intermediate_parts_reads_name_and_value() {
        let t = StructureTag {
            class: TagClass::Application,
            id: 25,
            payload: PL::C(vec![
                StructureTag {
                    class: TagClass::Context,
                    id: 0,
                    payload: PL::P(SYNC_INFO_OID.as_bytes().to_vec()),
                },
                StructureTag {
                    class: TagClass::Context,
                    id: 1,
                    payload: PL::P(vec![0x80, 0x00]),
                },
            ]),
        };
        let (n, v) = intermediate_parts(&t).unwrap();
        assert_eq!(n.as_deref(), Some(SYNC_INFO_OID));
        assert_eq!(v.unwrap(), [0x80, 0x00]);
        let bad = StructureTag {
            class: TagClass::Application,
            id: 25,
            payload: PL::P(vec![]),
        };
        assert!(intermediate_parts(&bad).is_err());
    }

    fn state_kind() -> impl Strategy<Value = SyncStateKind> {
        prop_oneof![
            Just(SyncStateKind::Present),
            Just(SyncStateKind::Add),
            Just(SyncStateKind::Modify),
            Just(SyncStateKind::Delete)
        ]
    }

    fn cookie() -> impl Strategy<Value = Option<Vec<u8>>> {
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200))
    }

    fn uuid() -> impl Strategy<Value = Uuid> {
        any::<[u8; 16]>().prop_map(Uuid::from_bytes)
    }

    fn info() -> impl Strategy<Value = SyncInfo> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200).prop_map(SyncInfo::NewCookie),
            (cookie(), any::<bool>()).prop_map(|(cookie, refresh_done)| {
                SyncInfo::RefreshDelete {
                    cookie,
                    refresh_done,
                }
            }),
            (cookie(), any::<bool>()).prop_map(|(cookie, refresh_done)| {
                SyncInfo::RefreshPresent {
                    cookie,
                    refresh_done,
                }
            }),
            (
                cookie(),
                any::<bool>(),
                proptest::collection::vec(uuid(), 0..20)
            )
                .prop_map(|(cookie, refresh_deletes, uuids)| SyncInfo::SyncIdSet {
                    cookie,
                    refresh_deletes,
                    uuids
                }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = parse_sync_state(&data);
            let _ = parse_sync_done(&data);
            let _ = parse_sync_info(&data);
        }

        #[test]
        fn mutated_values_never_panic(
            i in info(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        ) {
            let mut v = encode::sync_info(&i);
            for (at, b) in flips {
                if !v.is_empty() {
                    let n = v.len();
                    v[at % n] = b;
                }
            }
            let _ = parse_sync_info(&v);
        }

        #[test]
        fn sync_state_round_trips(state in state_kind(), id in uuid(), c in cookie()) {
            let s = SyncState { state, uuid: id, cookie: c };
            prop_assert_eq!(parse_sync_state(&encode::sync_state(&s)).unwrap(), s);
        }

        #[test]
        fn sync_done_round_trips(c in cookie(), refresh_deletes in any::<bool>()) {
            let d = SyncDone { cookie: c, refresh_deletes };
            prop_assert_eq!(parse_sync_done(&encode::sync_done(&d)).unwrap(), d);
        }

        #[test]
        fn sync_info_round_trips(i in info()) {
            prop_assert_eq!(parse_sync_info(&encode::sync_info(&i)).unwrap(), i);
        }
    }
}
