//! A lean LDAP wire path for the paged search of a full import ([`WireSearch`]): the connection
//! (`ldap://`, optionally upgraded with StartTLS, and `ldaps://`, with rustls), an anonymous or
//! simple bind, the SearchRequest with the paged-results control, and the answers read from a
//! buffered stream with length framing and decoded straight into [`RawEntry`] values: no
//! intermediate BER tree, each value's bytes copied once out of the read buffer.
//!
//! Everything else (SASL binds, `ldapi://`, the delta modes, range retrieval, the target) goes
//! through ldap3 (`conn.rs`, `search.rs`). The filter is parsed by ldap3's RFC 4515 parser and
//! its structure encoded here. Every decode is fallible: a truncated or malformed message is an
//! error of kind `Protocol` naming the byte offset (and the entry's DN once known), never a
//! panic. It converts no entries (see `entry.rs`) and keeps no state beyond one search.

use std::ops::Range;
use std::time::Duration;

use ldap3::asn1::{ASNTag, StructureTag, TagClass, PL};
use ldap3::controls::{Control, RawControl};
use ldap3::result::LdapError;
use ldap3::LdapResult;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::ber::{self, BerError, BerReader, BOOLEAN, ENUMERATED, OCTET_STRING, SEQUENCE};
use super::config::{LdapBind, LdapConnection, Scheme};
use super::conn::{check_bind, io_error, map_ldap_error, result_error, tls_config};
use super::control::{PagedResults, PAGED_RESULTS_OID};
use super::entry::RawEntry;
use super::search::{response_control, SearchSpec};
use crate::connector::{ConnectorError, ErrorKind};

/// protocolOp tags (RFC 4511 §4.2 ff.), as they appear on the wire.
const BIND_REQUEST: u8 = 0x60;
const BIND_RESPONSE: u8 = 0x61;
const UNBIND_REQUEST: u8 = 0x42;
const SEARCH_REQUEST: u8 = 0x63;
const SEARCH_ENTRY: u8 = 0x64;
const SEARCH_DONE: u8 = 0x65;
const SEARCH_REFERENCE: u8 = 0x73;
const EXTENDED_REQUEST: u8 = 0x77;
const EXTENDED_RESPONSE: u8 = 0x78;
const INTERMEDIATE_RESPONSE: u8 = 0x79;
/// `controls [0] Controls` of an LDAPMessage.
const CONTROLS: u8 = 0xa0;
/// `referral [3] Referral` of an LDAPResult.
const REFERRAL: u8 = 0xa3;
/// The StartTLS extended operation (RFC 4511 §4.14).
const STARTTLS_OID: &str = "1.3.6.1.4.1.1466.20037";
/// The largest LDAPMessage accepted (a guard against a corrupt length asking for gigabytes).
const MAX_MESSAGE: usize = 256 << 20;
/// How much the read buffer asks the socket for at a time.
const READ_SIZE: usize = 64 << 10;
/// How many entries the page reader hands over at a time.
const CHUNK: usize = 128;

/// Whether the full import of `config` can use this path: `ldap://` or `ldaps://` with an
/// anonymous or simple bind.
pub(crate) fn supports(config: &LdapConnection) -> bool {
    matches!(config.scheme(), Ok(Scheme::Ldap | Scheme::Ldaps))
        && matches!(config.bind, LdapBind::Anonymous | LdapBind::Simple { .. })
}

fn malformed(msg: impl std::fmt::Display) -> ConnectorError {
    ConnectorError::new(
        ErrorKind::Protocol,
        format!("malformed LDAP message from the server: {msg}"),
    )
}

fn timed_out() -> ConnectorError {
    ConnectorError::new(
        ErrorKind::Timeout,
        "the LDAP server did not answer in time (timeout)",
    )
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Wraps `op` (an encoded protocolOp) and optional encoded controls into an LDAPMessage.
fn message(id: i32, op: &[u8], controls: Option<&[u8]>) -> Vec<u8> {
    let mut body = Vec::with_capacity(op.len() + controls.map_or(0, <[u8]>::len) + 16);
    ber::write_integer(&mut body, i64::from(id));
    body.extend_from_slice(op);
    if let Some(c) = controls {
        ber::write_tlv(&mut body, CONTROLS, c);
    }
    ber::sequence(&body)
}

/// An encoded `Control ::= SEQUENCE { controlType, criticality DEFAULT FALSE, controlValue }`.
fn write_control(out: &mut Vec<u8>, c: &RawControl) {
    let mut body = Vec::with_capacity(c.ctype.len() + c.val.as_ref().map_or(0, Vec::len) + 8);
    ber::write_octets(&mut body, c.ctype.as_bytes());
    if c.crit {
        ber::write_tlv(&mut body, BOOLEAN, &[0xff]);
    }
    if let Some(v) = &c.val {
        ber::write_octets(&mut body, v);
    }
    ber::write_tlv(out, SEQUENCE, &body);
}

/// A BindRequest (version 3, simple authentication `[0]`).
fn bind_request(id: i32, dn: &str, password: &str) -> Vec<u8> {
    let mut op = Vec::with_capacity(dn.len() + password.len() + 8);
    ber::write_integer(&mut op, 3);
    ber::write_octets(&mut op, dn.as_bytes());
    ber::write_tlv(&mut op, 0x80, password.as_bytes());
    let mut tlv = Vec::with_capacity(op.len() + 6);
    ber::write_tlv(&mut tlv, BIND_REQUEST, &op);
    message(id, &tlv, None)
}

/// The StartTLS ExtendedRequest.
fn starttls_request(id: i32) -> Vec<u8> {
    let mut op = Vec::new();
    ber::write_tlv(&mut op, 0x80, STARTTLS_OID.as_bytes());
    let mut tlv = Vec::new();
    ber::write_tlv(&mut tlv, EXTENDED_REQUEST, &op);
    message(id, &tlv, None)
}

/// An UnbindRequest.
fn unbind_request(id: i32) -> Vec<u8> {
    message(id, &[UNBIND_REQUEST, 0x00], None)
}

/// Appends the BER encoding of a structure ldap3 built (single-byte tags only).
fn write_structure(out: &mut Vec<u8>, tag: &StructureTag) -> Result<(), String> {
    let class = match tag.class {
        TagClass::Universal => 0x00,
        TagClass::Application => 0x40,
        TagClass::Context => 0x80,
        TagClass::Private => 0xc0,
    };
    let id = u8::try_from(tag.id)
        .ok()
        .filter(|id| *id < 0x1f)
        .ok_or_else(|| format!("tag number {} needs a multi-byte tag", tag.id))?;
    match &tag.payload {
        PL::P(bytes) => ber::write_tlv(out, class | id, bytes),
        PL::C(inner) => {
            let mut body = Vec::new();
            for t in inner {
                write_structure(&mut body, t)?;
            }
            ber::write_tlv(out, class | 0x20 | id, &body);
        }
    }
    Ok(())
}

/// The BER Filter of an RFC 4515 string, parsed by ldap3's parser.
pub(crate) fn encode_filter(filter: &str) -> Result<Vec<u8>, ConnectorError> {
    let tag = ldap3::parse_filter(filter)
        .map_err(|()| map_ldap_error(LdapError::FilterParsing))?
        .into_structure();
    let mut out = Vec::with_capacity(filter.len() + 8);
    write_structure(&mut out, &tag).map_err(|m| {
        ConnectorError::new(ErrorKind::Config, format!("search filter {filter:?}: {m}"))
    })?;
    Ok(out)
}

/// A paged SearchRequest, encoded once: only the message id and the cookie change from page to
/// page.
#[derive(Debug, Clone)]
pub(crate) struct SearchRequest {
    /// The `[APPLICATION 3]` element.
    op: Vec<u8>,
    /// The encoded controls besides paging.
    controls: Vec<u8>,
    page_size: i32,
}

impl SearchRequest {
    /// The request of `spec` (derefAliases never, no size or time limit, types and values).
    pub fn new(spec: &SearchSpec, page_size: u32) -> Result<SearchRequest, ConnectorError> {
        let mut body = Vec::with_capacity(spec.base.len() + spec.filter.len() + 64);
        ber::write_octets(&mut body, spec.base.as_bytes());
        ber::write_integer_tagged(&mut body, ENUMERATED, spec.scope as i64);
        ber::write_integer_tagged(&mut body, ENUMERATED, 0);
        ber::write_integer(&mut body, 0);
        ber::write_integer(&mut body, 0);
        ber::write_tlv(&mut body, BOOLEAN, &[0x00]);
        body.extend_from_slice(&encode_filter(&spec.filter)?);
        let mut attrs = Vec::new();
        for a in &spec.attrs {
            ber::write_octets(&mut attrs, a.as_bytes());
        }
        ber::write_tlv(&mut body, SEQUENCE, &attrs);
        let mut op = Vec::with_capacity(body.len() + 6);
        ber::write_tlv(&mut op, SEARCH_REQUEST, &body);
        let mut controls = Vec::new();
        for c in &spec.controls {
            write_control(&mut controls, c);
        }
        Ok(SearchRequest {
            op,
            controls,
            page_size: i32::try_from(page_size.max(1)).unwrap_or(i32::MAX),
        })
    }

    /// The LDAPMessage asking for the page after `cookie` (empty: the first page).
    pub fn page(&self, id: i32, cookie: &[u8]) -> Vec<u8> {
        let mut controls = self.controls.clone();
        let paged = PagedResults {
            size: self.page_size,
            cookie: cookie.to_vec(),
        }
        .to_control();
        write_control(&mut controls, &paged);
        message(id, &self.op, Some(&controls))
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// What one LDAPMessage holds, as far as a paged search needs it.
#[derive(Debug)]
pub(crate) enum Op {
    /// A SearchResultEntry.
    Entry(RawEntry),
    /// A SearchResultReference (continuation references are not followed).
    Reference,
    /// An IntermediateResponse.
    Intermediate,
    /// A response carrying an LDAPResult (SearchResultDone, BindResponse, ExtendedResponse):
    /// its protocolOp tag and the result with the message's controls.
    Result(u8, LdapResult),
}

fn ber_error(what: &str, e: BerError) -> ConnectorError {
    malformed(format!("{what}: {e}"))
}

/// The total length of the LDAPMessage at the start of `buf`, `None` while its header is
/// incomplete. `at` is the stream offset of `buf`, for errors.
pub(crate) fn frame_len(buf: &[u8], at: u64) -> Result<Option<usize>, ConnectorError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    if tag != SEQUENCE {
        return Err(malformed(format!(
            "expected an LDAPMessage (tag 0x30) at stream byte {at}, found tag 0x{tag:02x}"
        )));
    }
    let Some(&first) = buf.get(1) else {
        return Ok(None);
    };
    let (header, len) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return Err(malformed(format!(
                "the LDAPMessage at stream byte {at} has an invalid length form 0x{first:02x}"
            )));
        }
        let Some(bytes) = buf.get(2..2 + n) else {
            return Ok(None);
        };
        (
            2 + n,
            bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b)),
        )
    };
    if len > MAX_MESSAGE {
        return Err(malformed(format!(
            "the LDAPMessage at stream byte {at} declares {len} bytes (more than {MAX_MESSAGE})"
        )));
    }
    Ok(Some(header + len))
}

/// Decodes one LDAPMessage (exactly `msg`): its message id and what it holds.
pub(crate) fn decode_message(msg: &[u8]) -> Result<(i32, Op), ConnectorError> {
    const WHAT: &str = "LDAPMessage";
    let mut outer = BerReader::new(msg);
    let mut m = outer.read_sequence(WHAT).map_err(|e| ber_error(WHAT, e))?;
    outer.finish(WHAT).map_err(|e| ber_error(WHAT, e))?;
    let id = m.read_i32("messageID").map_err(|e| ber_error(WHAT, e))?;
    let (tag, mut body) = m.read_element().map_err(|e| ber_error(WHAT, e))?;
    let op = match tag {
        SEARCH_ENTRY => Op::Entry(decode_entry(&mut body)?),
        SEARCH_REFERENCE => Op::Reference,
        INTERMEDIATE_RESPONSE => Op::Intermediate,
        SEARCH_DONE | BIND_RESPONSE | EXTENDED_RESPONSE => {
            let what = match tag {
                SEARCH_DONE => "SearchResultDone",
                BIND_RESPONSE => "BindResponse",
                _ => "ExtendedResponse",
            };
            let mut res = decode_result(&mut body).map_err(|e| ber_error(what, e))?;
            if m.peek_tag() == Some(CONTROLS) {
                res.ctrls = decode_controls(&mut m).map_err(|e| ber_error(what, e))?;
            }
            Op::Result(tag, res)
        }
        other => {
            return Err(malformed(format!(
                "message {id}: unexpected protocolOp tag 0x{other:02x} at byte {}",
                body.offset().saturating_sub(2)
            )))
        }
    };
    Ok((id, op))
}

/// The SearchResultEntry content: `objectName, attributes` (RFC 4511 §4.5.2).
fn decode_entry(r: &mut BerReader<'_>) -> Result<RawEntry, ConnectorError> {
    const WHAT: &str = "SearchResultEntry";
    let dn = r
        .read_octets("objectName")
        .map_err(|e| ber_error(WHAT, e))?;
    let dn = std::str::from_utf8(dn)
        .map_err(|e| malformed(format!("{WHAT}: the DN is not UTF-8 ({e})")))?
        .to_owned();
    let in_entry = |e: BerError| {
        ConnectorError::new(
            ErrorKind::Protocol,
            format!("malformed search result entry: {e}"),
        )
        .with_object(&dn)
    };
    let mut list = r.read_sequence("the attribute list").map_err(in_entry)?;
    let mut attrs = Vec::new();
    while !list.is_empty() {
        let mut pa = list
            .read_sequence("a partial attribute")
            .map_err(in_entry)?;
        let name = pa.read_octets("an attribute type").map_err(in_entry)?;
        let name = std::str::from_utf8(name)
            .map_err(|e| {
                in_entry(BerError {
                    offset: pa.offset(),
                    message: format!("an attribute type is not UTF-8 ({e})"),
                })
            })?
            .to_owned();
        let mut set = pa.read_constructed(0x31, "a value set").map_err(in_entry)?;
        let mut vals = Vec::new();
        while !set.is_empty() {
            let v = set.read_octets("a value").map_err(|e| {
                ConnectorError::new(
                    ErrorKind::Protocol,
                    format!("malformed search result entry: {e} (attribute {name})"),
                )
                .with_object(&dn)
            })?;
            vals.push(v.to_vec());
        }
        pa.finish("a partial attribute").map_err(in_entry)?;
        attrs.push((name, vals));
    }
    r.finish(WHAT).map_err(in_entry)?;
    Ok(RawEntry { dn, attrs })
}

/// An LDAPResult (RFC 4511 §4.1.9) and what follows it in the response, skipped.
fn decode_result(r: &mut BerReader<'_>) -> Result<LdapResult, BerError> {
    let at = r.offset();
    let rc = r.read_enumerated("resultCode")?;
    let rc = u32::try_from(rc).map_err(|_| BerError {
        offset: at,
        message: format!("resultCode {rc} is out of range"),
    })?;
    let matched = String::from_utf8_lossy(r.read_octets("matchedDN")?).into_owned();
    let text = String::from_utf8_lossy(r.read_octets("diagnosticMessage")?).into_owned();
    let mut refs = Vec::new();
    if r.peek_tag() == Some(REFERRAL) {
        let mut list = r.read_constructed(REFERRAL, "referral")?;
        while !list.is_empty() {
            refs.push(String::from_utf8_lossy(list.read_octets("a referral URI")?).into_owned());
        }
    }
    while !r.is_empty() {
        r.read_any()?;
    }
    Ok(LdapResult {
        rc,
        matched,
        text,
        refs,
        ctrls: Vec::new(),
    })
}

/// The `controls [0]` of a message.
fn decode_controls(m: &mut BerReader<'_>) -> Result<Vec<Control>, BerError> {
    let mut list = m.read_constructed(CONTROLS, "controls")?;
    let mut out = Vec::new();
    while !list.is_empty() {
        let mut c = list.read_sequence("a control")?;
        let oid = String::from_utf8_lossy(c.read_octets("controlType")?).into_owned();
        let mut crit = false;
        if c.peek_tag() == Some(BOOLEAN) {
            let at = c.offset();
            let b = c.read(BOOLEAN, "criticality")?;
            crit = match b {
                [v] => *v != 0,
                _ => {
                    return Err(BerError {
                        offset: at,
                        message: format!("criticality: a BOOLEAN of {} bytes", b.len()),
                    })
                }
            };
        }
        let val = if c.peek_tag() == Some(OCTET_STRING) {
            Some(c.read_octets("controlValue")?.to_vec())
        } else {
            None
        };
        c.finish("a control")?;
        out.push(Control(
            None,
            RawControl {
                ctype: oid,
                crit,
                val,
            },
        ));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Transport

/// A byte stream the connection runs over (TCP or TLS over TCP).
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A stream read as LDAPMessages: a read buffer, and the stream offset of its first byte.
struct Framed<S> {
    io: S,
    buf: Vec<u8>,
    /// Where the next message starts in `buf`.
    start: usize,
    /// Stream offset of `buf[0]`.
    offset: u64,
    timeout: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    fn new(io: S, timeout: Duration) -> Framed<S> {
        Framed {
            io,
            buf: Vec::with_capacity(READ_SIZE),
            start: 0,
            offset: 0,
            timeout,
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), ConnectorError> {
        let io = &mut self.io;
        tokio::time::timeout(self.timeout, async move {
            io.write_all(bytes).await?;
            io.flush().await
        })
        .await
        .map_err(|_| timed_out())?
        .map_err(io_error)
    }

    /// The range in `self.buf` of the next complete message, reading as needed.
    async fn next_message(&mut self) -> Result<Range<usize>, ConnectorError> {
        loop {
            let avail = &self.buf[self.start..];
            let at = self.offset + self.start as u64;
            let want = match frame_len(avail, at)? {
                Some(n) if avail.len() >= n => {
                    let range = self.start..self.start + n;
                    self.start += n;
                    return Ok(range);
                }
                Some(n) => n,
                None => 6,
            };
            self.fill(want).await?;
        }
    }

    /// Reads more bytes, making room for a message of `want` bytes at the buffer's start.
    async fn fill(&mut self, want: usize) -> Result<(), ConnectorError> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.offset += self.start as u64;
            self.start = 0;
        }
        let need = want.saturating_sub(self.buf.len()).max(READ_SIZE);
        if self.buf.capacity() - self.buf.len() < need / 2 {
            self.buf.reserve(need);
        }
        let n = tokio::time::timeout(self.timeout, self.io.read_buf(&mut self.buf))
            .await
            .map_err(|_| timed_out())?
            .map_err(io_error)?;
        if n == 0 {
            let partial = if self.buf.is_empty() {
                String::new()
            } else {
                format!(
                    " in the middle of a message (stream byte {}, {} bytes of it received)",
                    self.offset,
                    self.buf.len()
                )
            };
            return Err(ConnectorError::new(
                ErrorKind::Unavailable,
                format!(
                    "the connection to the LDAP server was lost: closed by the server{partial}"
                ),
            ));
        }
        Ok(())
    }

    /// Whether bytes beyond the messages read so far are buffered.
    fn has_buffered(&self) -> bool {
        self.start < self.buf.len()
    }
}

/// Reads the next message and expects the result of operation `id` with protocolOp `tag`.
async fn expect_result<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Framed<S>,
    id: i32,
    tag: u8,
    what: &str,
) -> Result<LdapResult, ConnectorError> {
    let range = conn.next_message().await?;
    match decode_message(&conn.buf[range])? {
        (mid, Op::Result(t, res)) if mid == id && t == tag => Ok(res),
        (0, Op::Result(_, res)) => Err(disconnected(&res)),
        (mid, op) => Err(malformed(format!(
            "{what}: expected the response to message {id}, got message {mid} ({})",
            op_name(&op)
        ))),
    }
}

fn op_name(op: &Op) -> String {
    match op {
        Op::Entry(_) => "a search result entry".into(),
        Op::Reference => "a search result reference".into(),
        Op::Intermediate => "an intermediate response".into(),
        Op::Result(t, _) => format!("a response with tag 0x{t:02x}"),
    }
}

/// The error of an unsolicited notification (message id 0): the server is closing.
fn disconnected(res: &LdapResult) -> ConnectorError {
    ConnectorError::new(
        ErrorKind::Unavailable,
        format!(
            "the connection to the LDAP server was lost: the server sent a notice of \
             disconnection ({})",
            result_error(res).message()
        ),
    )
}

/// Host and port of an `ldap://` or `ldaps://` URL (default ports 389 and 636).
fn host_port(url: &str, scheme: Scheme) -> Result<(String, u16), ConnectorError> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let default = if scheme == Scheme::Ldaps { 636 } else { 389 };
    let bad = |m: &str| ConnectorError::new(ErrorKind::Config, format!("LDAP url {url:?}: {m}"));
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("an IPv6 address lacks its closing ]"))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port = match port {
        None | Some("") => default,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| bad(&format!("port {p:?} is not a number from 0 to 65535")))?,
    };
    Ok((host.to_owned(), port))
}

/// Opens a connection as `config` says (TCP, then TLS for `ldaps://` or after StartTLS) and
/// binds; returns it with the next free message id. The bind rules of [`check_bind`] apply.
async fn open(config: &LdapConnection) -> Result<(Framed<Box<dyn Io>>, i32), ConnectorError> {
    let scheme = config.scheme()?;
    check_bind(config)?;
    let (host, port) = host_port(&config.url, scheme)?;
    let timeout = config.timeout_duration();
    let tls = |host: &str| -> Result<_, ConnectorError> {
        let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| {
            ConnectorError::new(
                ErrorKind::Config,
                format!(
                    "LDAP url {:?}: {host:?} is not a TLS server name ({e})",
                    config.url
                ),
            )
        })?;
        Ok((
            tokio_rustls::TlsConnector::from(tls_config(&config.tls)?),
            name,
        ))
    };
    let connecting = async {
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(io_error)?;
        let _ = tcp.set_nodelay(true);
        let mut next_id = 1;
        let io: Box<dyn Io> = match (scheme, config.starttls) {
            (Scheme::Ldaps, _) => {
                let (connector, name) = tls(&host)?;
                Box::new(connector.connect(name, tcp).await.map_err(io_error)?)
            }
            (_, true) => {
                let (connector, name) = tls(&host)?;
                let mut plain = Framed::new(tcp, timeout);
                plain.send(&starttls_request(next_id)).await?;
                let res = expect_result(&mut plain, next_id, EXTENDED_RESPONSE, "StartTLS").await?;
                next_id += 1;
                if res.rc != 0 {
                    let e = result_error(&res);
                    return Err(ConnectorError::new(
                        e.kind(),
                        format!("StartTLS failed: {}", e.message()),
                    ));
                }
                if plain.has_buffered() {
                    return Err(malformed(
                        "the server sent data after the StartTLS response, before the TLS \
                         handshake",
                    ));
                }
                Box::new(connector.connect(name, plain.io).await.map_err(io_error)?)
            }
            _ => Box::new(tcp),
        };
        Ok::<_, ConnectorError>((io, next_id))
    };
    let (io, mut next_id) = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| e.with_object(&config.url))?;
    let mut conn = Framed::new(io, timeout);
    if let LdapBind::Simple { dn, password } = &config.bind {
        let failed = |e: ConnectorError| {
            ConnectorError::new(
                e.kind(),
                format!("simple bind as {dn:?} failed: {}", e.message()),
            )
            .with_object(&config.url)
        };
        conn.send(&bind_request(next_id, dn, password.expose()))
            .await
            .map_err(failed)?;
        let res = expect_result(&mut conn, next_id, BIND_RESPONSE, "bind")
            .await
            .map_err(failed)?;
        next_id += 1;
        if res.rc != 0 {
            return Err(failed(result_error(&res)));
        }
    }
    Ok((conn, next_id))
}

// ---------------------------------------------------------------------------------------------
// The paged search

/// What the page reader hands to [`WireSearch::next`].
type Chunk = Result<Vec<RawEntry>, ConnectorError>;

/// A paged streaming search over a connection of its own: entries one by one, at most about
/// two pages in memory.
///
/// A task reads the answers, asks for the next page as soon as a page's SearchResultDone
/// (with the cookie) arrives, and hands entries over in chunks through a bounded channel
/// holding at most one page. Continuation references and intermediate messages are skipped.
/// A failure of the connection is an error of a retryable kind; a cookie belongs to its
/// connection, so a search that failed is restarted by the caller, not continued. Dropping
/// the search stops the task and closes the connection.
pub(crate) struct WireSearch {
    rx: tokio::sync::mpsc::Receiver<Chunk>,
    chunk: std::vec::IntoIter<RawEntry>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for WireSearch {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl WireSearch {
    /// Connects and binds as `config` says (errors come back here), then starts the search on
    /// the current tokio runtime (a filter error comes back from the first
    /// [`WireSearch::next`]).
    pub async fn start(
        config: &LdapConnection,
        spec: SearchSpec,
        page_size: u32,
    ) -> Result<WireSearch, ConnectorError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ConnectorError::new(
                ErrorKind::Config,
                "the LDAP connector must run inside a tokio runtime",
            ));
        }
        let (conn, next_id) = open(config).await?;
        let page_size = page_size.max(1);
        let chunk = CHUNK.min(page_size as usize);
        let (tx, rx) = tokio::sync::mpsc::channel((page_size as usize).div_ceil(chunk));
        let reader = tokio::spawn(run(conn, next_id, spec, page_size, chunk, tx));
        Ok(WireSearch {
            rx,
            chunk: Vec::new().into_iter(),
            reader,
        })
    }

    /// The next entry, `None` at the end.
    pub async fn next(&mut self) -> Result<Option<RawEntry>, ConnectorError> {
        loop {
            if let Some(e) = self.chunk.next() {
                return Ok(Some(e));
            }
            match self.rx.recv().await {
                Some(chunk) => self.chunk = chunk?.into_iter(),
                None => return Ok(None),
            }
        }
    }
}

async fn run(
    mut conn: Framed<Box<dyn Io>>,
    mut id: i32,
    spec: SearchSpec,
    page_size: u32,
    chunk: usize,
    tx: tokio::sync::mpsc::Sender<Chunk>,
) {
    match pages(&mut conn, &mut id, &spec, page_size, chunk, &tx).await {
        Ok(()) => {
            let _ = conn.send(&unbind_request(id)).await;
        }
        Err(e) => {
            // An error about an entry names the entry; the others name the search base.
            let e = match e.object() {
                Some(_) => e,
                None => e.with_object(&spec.base),
            };
            let _ = tx.send(Err(e)).await;
        }
    }
}

async fn pages(
    conn: &mut Framed<Box<dyn Io>>,
    id: &mut i32,
    spec: &SearchSpec,
    page_size: u32,
    chunk: usize,
    tx: &tokio::sync::mpsc::Sender<Chunk>,
) -> Result<(), ConnectorError> {
    let request = SearchRequest::new(spec, page_size)?;
    conn.send(&request.page(*id, &[])).await?;
    let mut batch = Vec::with_capacity(chunk);
    loop {
        let range = conn.next_message().await?;
        let (mid, op) = decode_message(&conn.buf[range])?;
        if mid != *id {
            return Err(match op {
                Op::Result(_, res) if mid == 0 => disconnected(&res),
                op => malformed(format!(
                    "got message {mid} ({}) during the search, message {}",
                    op_name(&op),
                    *id
                )),
            });
        }
        match op {
            Op::Entry(e) => {
                batch.push(e);
                if batch.len() == chunk {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(chunk));
                    if tx.send(Ok(full)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            Op::Reference | Op::Intermediate => {}
            Op::Result(SEARCH_DONE, res) => {
                if res.rc != 0 {
                    return Err(result_error(&res));
                }
                let cookie = match response_control(&res, PAGED_RESULTS_OID) {
                    Some(c) => PagedResults::decode(c.val.as_deref().unwrap_or_default())?.cookie,
                    None => Vec::new(),
                };
                if cookie.is_empty() {
                    if !batch.is_empty() {
                        let _ = tx.send(Ok(std::mem::take(&mut batch))).await;
                    }
                    *id = id.wrapping_add(1).max(1);
                    return Ok(());
                }
                // The next page is asked for before this page's last entries are handed over:
                // the server works while the caller converts.
                *id = id.wrapping_add(1).max(1);
                conn.send(&request.page(*id, &cookie)).await?;
                if !batch.is_empty() {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(chunk));
                    if tx.send(Ok(full)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            Op::Result(tag, _) => {
                return Err(malformed(format!(
                    "a response with tag 0x{tag:02x} answered the search (message {mid})"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ldap3::asn1::{parse_tag, Boolean, Enumerated, Integer, OctetString, Sequence, Tag};
    use ldap3::Scope;
    use proptest::prelude::*;

    fn octets(out: &mut Vec<u8>, v: &[u8]) {
        ber::write_octets(out, v);
    }

    /// A SearchResultEntry message as a server would send it.
    fn entry_message(id: i32, dn: &str, attrs: &[(&str, &[&[u8]])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (name, vals) in attrs {
            let mut set = Vec::new();
            for v in *vals {
                octets(&mut set, v);
            }
            let mut pa = Vec::new();
            octets(&mut pa, name.as_bytes());
            ber::write_tlv(&mut pa, 0x31, &set);
            ber::write_tlv(&mut list, SEQUENCE, &pa);
        }
        let mut body = Vec::new();
        octets(&mut body, dn.as_bytes());
        ber::write_tlv(&mut body, SEQUENCE, &list);
        let mut op = Vec::new();
        ber::write_tlv(&mut op, SEARCH_ENTRY, &body);
        message(id, &op, None)
    }

    /// A SearchResultDone with a paged-results response control holding `cookie`.
    fn done_message(id: i32, rc: i64, text: &str, cookie: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        ber::write_integer_tagged(&mut body, ENUMERATED, rc);
        octets(&mut body, b"");
        octets(&mut body, text.as_bytes());
        let mut op = Vec::new();
        ber::write_tlv(&mut op, SEARCH_DONE, &body);
        let mut controls = Vec::new();
        write_control(
            &mut controls,
            &RawControl {
                ctype: PAGED_RESULTS_OID.into(),
                crit: false,
                val: Some(
                    PagedResults {
                        size: 0,
                        cookie: cookie.to_vec(),
                    }
                    .encode(),
                ),
            },
        );
        message(id, &op, Some(&controls))
    }

    #[test]
    fn decodes_a_known_search_result_entry() {
        // Hand-assembled: messageID 2, entry "cn=a" with cn: a and objectClass: top, per.
        let bytes: Vec<u8> = vec![
            0x30, 0x33, 0x02, 0x01, 0x02, 0x64, 0x2e, 0x04, 0x04, b'c', b'n', b'=', b'a', 0x30,
            0x26, 0x30, 0x09, 0x04, 0x02, b'c', b'n', 0x31, 0x03, 0x04, 0x01, b'a', 0x30, 0x19,
            0x04, 0x0b, b'o', b'b', b'j', b'e', b'c', b't', b'C', b'l', b'a', b's', b's', 0x31,
            0x0a, 0x04, 0x03, b't', b'o', b'p', 0x04, 0x03, b'p', b'e', b'r',
        ];
        let (id, op) = decode_message(&bytes).unwrap();
        assert_eq!(id, 2);
        let Op::Entry(e) = op else { panic!("{op:?}") };
        assert_eq!(e.dn, "cn=a");
        assert_eq!(
            e.attrs,
            vec![
                ("cn".to_string(), vec![b"a".to_vec()]),
                (
                    "objectClass".to_string(),
                    vec![b"top".to_vec(), b"per".to_vec()]
                ),
            ]
        );
        assert_eq!(
            bytes,
            entry_message(
                2,
                "cn=a",
                &[("cn", &[b"a"]), ("objectClass", &[b"top", b"per"])]
            )
        );
        assert_eq!(frame_len(&bytes, 0).unwrap(), Some(bytes.len()));
    }

    #[test]
    fn decodes_a_known_search_result_done_with_a_cookie() {
        let bytes: Vec<u8> = vec![
            0x30, 0x2d, 0x02, 0x01, 0x05, 0x65, 0x07, 0x0a, 0x01, 0x00, 0x04, 0x00, 0x04, 0x00,
            0xa0, 0x1f, 0x30, 0x1d, 0x04, 0x16, b'1', b'.', b'2', b'.', b'8', b'4', b'0', b'.',
            b'1', b'1', b'3', b'5', b'5', b'6', b'.', b'1', b'.', b'4', b'.', b'3', b'1', b'9',
            0x04, 0x03, 0x30, 0x01, 0x00,
        ];
        // A control value `30 01 00` is malformed (the cookie is missing): the message decodes,
        // the paged-results value does not.
        let (id, op) = decode_message(&bytes).unwrap();
        assert_eq!(id, 5);
        let Op::Result(SEARCH_DONE, res) = op else {
            panic!("{op:?}")
        };
        assert_eq!(res.rc, 0);
        let c = response_control(&res, PAGED_RESULTS_OID).unwrap();
        assert!(PagedResults::decode(c.val.as_deref().unwrap()).is_err());

        let good = done_message(7, 0, "", b"abc");
        let (id, op) = decode_message(&good).unwrap();
        assert_eq!(id, 7);
        let Op::Result(SEARCH_DONE, res) = op else {
            panic!("{op:?}")
        };
        let c = response_control(&res, PAGED_RESULTS_OID).unwrap();
        assert_eq!(
            PagedResults::decode(c.val.as_deref().unwrap())
                .unwrap()
                .cookie,
            b"abc"
        );
        let (_, op) = decode_message(&done_message(7, 32, "no such object", b"")).unwrap();
        let Op::Result(_, res) = op else {
            panic!("{op:?}")
        };
        assert_eq!(res.rc, 32);
        assert_eq!(result_error(&res).kind(), ErrorKind::NotFound);
        assert!(result_error(&res).message().contains("no such object"));
    }

    #[test]
    fn every_truncation_is_an_error_never_a_panic() {
        let msgs = [
            entry_message(
                3,
                "cn=x,dc=y",
                &[("member", &[b"cn=a", b"cn=b"]), ("sn", &[b"z"])],
            ),
            done_message(3, 0, "ok", b"cookie"),
        ];
        for msg in msgs {
            for cut in 0..msg.len() {
                let part = &msg[..cut];
                match frame_len(part, 0) {
                    Ok(Some(n)) => assert!(n > cut),
                    Ok(None) => {}
                    Err(e) => panic!("framing a prefix failed: {e}"),
                }
                let e = decode_message(part).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
            }
            // Shortening the outer length while keeping the bytes: an inner element overruns.
            let mut bad = msg.clone();
            bad[1] -= 1;
            bad.pop();
            let e = decode_message(&bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Protocol);
            assert!(e.to_string().contains("byte"), "{e}");
        }
    }

    #[test]
    fn errors_inside_an_entry_name_its_dn() {
        let mut msg = entry_message(3, "cn=x,dc=y", &[("sn", &[b"z"])]);
        let n = msg.len();
        msg[n - 3] = 0x02; // the value's OCTET STRING tag becomes INTEGER
        let e = decode_message(&msg).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(e.to_string().contains("cn=x,dc=y"), "{e}");
        assert!(e.to_string().contains("attribute sn"), "{e}");
    }

    #[test]
    fn framing_rejects_garbage_and_huge_lengths() {
        assert!(frame_len(&[0x04, 0x00], 10)
            .unwrap_err()
            .to_string()
            .contains("stream byte 10"));
        assert!(frame_len(&[0x30, 0x80], 0).is_err());
        assert!(frame_len(&[0x30, 0x84, 0x7f, 0xff, 0xff, 0xff], 0).is_err());
        assert_eq!(frame_len(&[0x30, 0x82, 0x01], 0).unwrap(), None);
        assert_eq!(frame_len(&[0x30, 0x82, 0x01, 0x00], 0).unwrap(), Some(260));
        assert_eq!(frame_len(&[], 0).unwrap(), None);
    }

    #[test]
    fn filters_encode_as_ldap3_builds_them() {
        for f in [
            "(objectClass=*)",
            "(&(objectClass=person)(|(uid=a*b*c)(cn=\\2a))(!(sn>=x)))",
            "(cn~=foo)",
            "(member:1.2.840.113556.1.4.1941:=cn=x)",
        ] {
            let bytes = encode_filter(f).unwrap();
            let (rest, back) = parse_tag(&bytes).unwrap();
            assert!(rest.is_empty());
            assert_eq!(
                back,
                ldap3::parse_filter(f).unwrap().into_structure(),
                "{f}"
            );
        }
        // (objectClass=*) is a present filter: [7] "objectClass".
        assert_eq!(
            encode_filter("(objectClass=*)").unwrap(),
            [&[0x87, 11][..], b"objectClass"].concat()
        );
        assert_eq!(
            encode_filter("(cn=a").unwrap_err().kind(),
            ErrorKind::Config
        );
    }

    #[test]
    fn the_search_request_is_what_ldap3_sends() {
        let spec = SearchSpec {
            base: "dc=example,dc=org".into(),
            scope: Scope::Subtree,
            filter: "(objectClass=person)".into(),
            attrs: vec!["*".into(), "entryUUID".into()],
            controls: Vec::new(),
        };
        let req = SearchRequest::new(&spec, 500).unwrap();
        let bytes = req.page(4, b"ck");
        // ldap3's SearchRequest structure (search.rs `start_inner`).
        let ldap3_req = Tag::Sequence(Sequence {
            id: 3,
            class: TagClass::Application,
            inner: vec![
                Tag::OctetString(OctetString {
                    inner: spec.base.as_bytes().to_vec(),
                    ..Default::default()
                }),
                Tag::Enumerated(Enumerated {
                    inner: 2,
                    ..Default::default()
                }),
                Tag::Enumerated(Enumerated {
                    inner: 0,
                    ..Default::default()
                }),
                Tag::Integer(Integer {
                    inner: 0,
                    ..Default::default()
                }),
                Tag::Integer(Integer {
                    inner: 0,
                    ..Default::default()
                }),
                Tag::Boolean(Boolean {
                    inner: false,
                    ..Default::default()
                }),
                ldap3::parse_filter(&spec.filter).unwrap(),
                Tag::Sequence(Sequence {
                    inner: spec
                        .attrs
                        .iter()
                        .map(|a| {
                            Tag::OctetString(OctetString {
                                inner: a.as_bytes().to_vec(),
                                ..Default::default()
                            })
                        })
                        .collect(),
                    ..Default::default()
                }),
            ],
        })
        .into_structure();
        let (rest, msg) = parse_tag(&bytes).unwrap();
        assert!(rest.is_empty());
        let PL::C(parts) = msg.payload else { panic!() };
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].payload, PL::P(vec![4]));
        assert_eq!(parts[1], ldap3_req);
        // The controls: one paged-results control (not critical, as ldap3 sends it), size 500
        // and the cookie.
        let PL::C(controls) = &parts[2].payload else {
            panic!()
        };
        assert_eq!(parts[2].id, 0);
        let PL::C(c) = &controls[0].payload else {
            panic!()
        };
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].payload, PL::P(PAGED_RESULTS_OID.as_bytes().to_vec()));
        let PL::P(value) = &c[1].payload else {
            panic!()
        };
        let paged = PagedResults::decode(value).unwrap();
        assert_eq!((paged.size, paged.cookie.as_slice()), (500, &b"ck"[..]));
    }

    #[test]
    fn bind_and_unbind_requests() {
        let bytes = bind_request(1, "cn=admin", "pw");
        assert_eq!(
            bytes,
            [
                &[0x30, 0x16, 0x02, 0x01, 0x01, 0x60, 0x11, 0x02, 0x01, 0x03, 0x04, 0x08][..],
                b"cn=admin",
                &[0x80, 0x02, b'p', b'w'],
            ]
            .concat()
        );
        assert_eq!(
            unbind_request(9),
            [0x30, 0x05, 0x02, 0x01, 0x09, 0x42, 0x00]
        );
        let starttls = starttls_request(1);
        let (rest, t) = parse_tag(&starttls).unwrap();
        assert!(rest.is_empty());
        let PL::C(parts) = t.payload else { panic!() };
        assert_eq!(parts[1].id, 23);
    }

    #[test]
    fn urls_give_host_and_port() {
        let h = |u: &str, s| host_port(u, s).map_err(|e| e.kind());
        assert_eq!(
            h("ldap://127.0.0.1:3890", Scheme::Ldap),
            Ok(("127.0.0.1".into(), 3890))
        );
        assert_eq!(
            h("ldaps://dc.example.org", Scheme::Ldaps),
            Ok(("dc.example.org".into(), 636))
        );
        assert_eq!(
            h("ldap://host/dc=x??sub", Scheme::Ldap),
            Ok(("host".into(), 389))
        );
        assert_eq!(
            h("ldap://[::1]:10389", Scheme::Ldap),
            Ok(("::1".into(), 10389))
        );
        assert_eq!(h("ldap://host:99999", Scheme::Ldap), Err(ErrorKind::Config));
        assert_eq!(h("ldap://:389", Scheme::Ldap), Err(ErrorKind::Config));
    }

    #[test]
    fn which_connections_take_this_path() {
        let mut c = LdapConnection::new("ldap://127.0.0.1");
        assert!(supports(&c));
        c.bind = LdapBind::SaslExternal;
        assert!(!supports(&c));
        let c = LdapConnection::new("ldapi://%2Frun%2Fslapd.sock");
        assert!(!supports(&c));
    }

    #[test]
    fn controls_round_trip_with_criticality() {
        let mut enc = Vec::new();
        let c = RawControl {
            ctype: "1.2.3".into(),
            crit: true,
            val: None,
        };
        write_control(&mut enc, &c);
        let wrapped = [&[CONTROLS, enc.len() as u8][..], &enc].concat();
        let back = decode_controls(&mut BerReader::new(&wrapped)).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(
            (back[0].1.ctype.as_str(), back[0].1.crit, &back[0].1.val),
            ("1.2.3", true, &None)
        );
    }

    fn page_request(msg: &[u8]) -> (i32, Vec<u8>) {
        let (_, t) = parse_tag(msg).unwrap();
        let PL::C(parts) = t.payload else { panic!() };
        let PL::P(id) = &parts[0].payload else {
            panic!()
        };
        let PL::C(controls) = &parts[2].payload else {
            panic!()
        };
        let PL::C(c) = &controls[0].payload else {
            panic!()
        };
        let PL::P(value) = &c[1].payload else {
            panic!()
        };
        (
            i32::from(id[0]),
            PagedResults::decode(value).unwrap().cookie,
        )
    }

    fn spec() -> SearchSpec {
        SearchSpec {
            base: "dc=x".into(),
            scope: Scope::Subtree,
            filter: "(objectClass=*)".into(),
            attrs: vec!["*".into()],
            controls: Vec::new(),
        }
    }

    /// A server on 127.0.0.1 that answers each request it reads with the next reply of
    /// `replies`, written in pieces of 7 bytes, and closes after the last one; returns the URL
    /// and the requests it read.
    async fn serve(replies: Vec<Vec<u8>>) -> (String, tokio::task::JoinHandle<Vec<Vec<u8>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ldap://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let mut f = Framed::new(sock, Duration::from_secs(10));
            let mut requests = Vec::new();
            for reply in replies {
                let r = f.next_message().await.unwrap();
                requests.push(f.buf[r].to_vec());
                for piece in reply.chunks(7) {
                    f.io.write_all(piece).await.unwrap();
                    f.io.flush().await.unwrap();
                }
            }
            // Closes the sending side, then reads the unbind, if the client sends one.
            f.io.shutdown().await.unwrap();
            if let Ok(r) = f.next_message().await {
                requests.push(f.buf[r].to_vec());
            }
            requests
        });
        (url, server)
    }

    #[tokio::test]
    async fn pages_follow_the_cookie_and_entries_stream_in_order() {
        let e = |id, dn: &str| entry_message(id, dn, &[("objectClass", &[b"person"])]);
        let page1 = [
            e(1, "cn=a"),
            e(1, "cn=b"),
            message(1, &[SEARCH_REFERENCE, 0x00], None),
            e(1, "cn=c"),
            done_message(1, 0, "", b"c1"),
        ]
        .concat();
        let page2 = [e(2, "cn=d"), done_message(2, 0, "", b"")].concat();
        let (url, server) = serve(vec![page1, page2]).await;
        let mut s = WireSearch::start(&LdapConnection::new(url), spec(), 3)
            .await
            .unwrap();
        let mut dns = Vec::new();
        while let Some(e) = s.next().await.unwrap() {
            dns.push(e.dn);
        }
        assert_eq!(dns, ["cn=a", "cn=b", "cn=c", "cn=d"]);
        let requests = server.await.unwrap();
        assert_eq!(requests.len(), 3);
        assert_eq!(page_request(&requests[0]), (1, Vec::new()));
        assert_eq!(page_request(&requests[1]), (2, b"c1".to_vec()));
        assert_eq!(requests[2], unbind_request(3));
    }

    async fn search_error(replies: Vec<Vec<u8>>) -> ConnectorError {
        let (url, _server) = serve(replies).await;
        let mut s = WireSearch::start(&LdapConnection::new(url), spec(), 10)
            .await
            .unwrap();
        loop {
            match s.next().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the search ended without an error"),
                Err(e) => return e,
            }
        }
    }

    #[tokio::test]
    async fn failures_during_a_search_are_errors_of_the_right_kind() {
        // The connection closes in the middle of an entry: retryable.
        let entry = entry_message(1, "cn=a", &[("cn", &[b"a"])]);
        let e = search_error(vec![entry[..entry.len() - 2].to_vec()]).await;
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(e.message().contains("middle of a message"), "{e}");
        // A malformed entry: a protocol error naming the entry.
        let mut bad = entry_message(1, "cn=broken", &[("cn", &[b"a"])]);
        let n = bad.len();
        bad[n - 3] = 0x30;
        let e = search_error(vec![bad]).await;
        assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
        assert!(e.to_string().contains("cn=broken"), "{e}");
        // An unsuccessful result: its code's kind.
        let e = search_error(vec![done_message(1, 32, "no such base", b"")]).await;
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        // A notice of disconnection: retryable.
        let mut notice = Vec::new();
        ber::write_integer_tagged(&mut notice, ENUMERATED, 52);
        octets(&mut notice, b"");
        octets(&mut notice, b"shutting down");
        let mut op = Vec::new();
        ber::write_tlv(&mut op, EXTENDED_RESPONSE, &notice);
        let e = search_error(vec![message(0, &op, None)]).await;
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(e.message().contains("shutting down"), "{e}");
        // A bad filter: a configuration error from the first next().
        let (url, _server) = serve(vec![]).await;
        let mut sp = spec();
        sp.filter = "(cn=a".into();
        let mut s = WireSearch::start(&LdapConnection::new(url), sp, 10)
            .await
            .unwrap();
        assert_eq!(s.next().await.unwrap_err().kind(), ErrorKind::Config);
    }

    #[tokio::test]
    async fn a_refused_simple_bind_names_the_dn_and_the_code() {
        let mut res = Vec::new();
        ber::write_integer_tagged(&mut res, ENUMERATED, 49);
        octets(&mut res, b"");
        octets(&mut res, b"");
        let mut op = Vec::new();
        ber::write_tlv(&mut op, BIND_RESPONSE, &res);
        let (url, server) = serve(vec![message(1, &op, None)]).await;
        let mut c = LdapConnection::new(url);
        c.bind = LdapBind::Simple {
            dn: "cn=admin".into(),
            password: crate::connector::Secret::new("pw"),
        };
        c.allow_cleartext_bind = true;
        let e = WireSearch::start(&c, spec(), 10).await.err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
        assert!(
            e.message().contains("simple bind as \"cn=admin\" failed"),
            "{e}"
        );
        assert!(e.message().contains("invalidCredentials (49)"), "{e}");
        let requests = server.await.unwrap();
        assert_eq!(requests[0], bind_request(1, "cn=admin", "pw"));
        // Over cleartext without the explicit allowance, nothing is sent.
        c.allow_cleartext_bind = false;
        let e = WireSearch::start(&c, spec(), 10).await.err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = frame_len(&data, 0);
            let _ = decode_message(&data);
        }

        #[test]
        fn mutated_messages_never_panic(
            at in 0usize..64,
            byte in any::<u8>(),
        ) {
            let mut msg = entry_message(2, "cn=x", &[("objectClass", &[b"top", b"person"]), ("cn", &[b"x"])]);
            let i = at % msg.len();
            msg[i] = byte;
            let _ = decode_message(&msg);
            let mut done = done_message(2, 0, "", b"ck");
            let i = at % done.len();
            done[i] = byte;
            let _ = decode_message(&done);
        }
    }
}
