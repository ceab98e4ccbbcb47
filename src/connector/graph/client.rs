//! The HTTP layer of the Graph connector: requests with a bearer token (refreshed on 401),
//! client-side pacing of writes under Graph's documented write limit, retries of 429/503/504
//! after `Retry-After`, retries of a 404 that replication delay explains, JSON batching
//! (`$batch`, at most 20 requests, each response judged on its own), and OData errors turned
//! into [`ConnectorError`]s that keep `error.code`, `error.message` and the request id.
//!
//! It may not panic on a server's answer, nor log a token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};
use tracing::debug;

use super::auth::TokenProvider;
use crate::connector::{ConnectorError, ErrorKind};

/// The most requests one `$batch` may hold (Graph's limit).
pub const MAX_BATCH: usize = 20;

/// An HTTP method the connector uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Get,
    Post,
    Patch,
    Delete,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }
    fn is_write(self) -> bool {
        self != Method::Get
    }
}

/// One request: a path relative to the Graph base URL (`/users/{id}`) or an absolute URL (a
/// nextLink).
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub method: Method,
    pub path: String,
    pub body: Option<Json>,
    /// `ConsistencyLevel: eventual` (advanced queries).
    pub eventual: bool,
    /// A 404 may be replication delay (the request names an object created moments ago):
    /// retried a few times before it counts.
    pub retry_not_found: bool,
}

impl Request {
    pub fn new(method: Method, path: impl Into<String>) -> Request {
        Request {
            method,
            path: path.into(),
            body: None,
            eventual: false,
            retry_not_found: false,
        }
    }
    pub fn body(mut self, body: Json) -> Request {
        self.body = Some(body);
        self
    }
}

/// A successful response.
#[derive(Debug, Clone)]
pub(crate) struct Response {
    pub body: Json,
}

/// Counters a caller (a benchmark, a test) can read.
#[derive(Debug, Default)]
pub struct GraphStats {
    /// HTTP requests sent (a `$batch` counts once), token requests excluded.
    pub http_requests: AtomicU64,
    /// Write requests (POST, PATCH, DELETE), batched ones counted one by one.
    pub writes: AtomicU64,
    /// Requests the server throttled (429), batched ones counted one by one.
    pub throttled: AtomicU64,
    /// Requests the server found unavailable (503, 504).
    pub unavailable: AtomicU64,
    /// Requests sent again (after a throttle, an outage, a 401 or a replication-delay 404).
    pub retries: AtomicU64,
    /// Retries for any other reason than a 429.
    pub retries_not_throttled: AtomicU64,
}

/// A snapshot of [`GraphStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// See [`GraphStats::http_requests`].
    pub http_requests: u64,
    /// See [`GraphStats::writes`].
    pub writes: u64,
    /// See [`GraphStats::throttled`].
    pub throttled: u64,
    /// See [`GraphStats::unavailable`].
    pub unavailable: u64,
    /// See [`GraphStats::retries`].
    pub retries: u64,
    /// See [`GraphStats::retries_not_throttled`].
    pub retries_not_throttled: u64,
}

impl GraphStats {
    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            http_requests: l(&self.http_requests),
            writes: l(&self.writes),
            throttled: l(&self.throttled),
            unavailable: l(&self.unavailable),
            retries: l(&self.retries),
            retries_not_throttled: l(&self.retries_not_throttled),
        }
    }
}

/// Spaces writes evenly at a steady rate (no bursts).
struct Pacer {
    interval: Option<Duration>,
    next: tokio::sync::Mutex<Instant>,
}

impl Pacer {
    fn new(per_second: f64) -> Pacer {
        let interval = (per_second.is_finite() && per_second > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / per_second));
        Pacer {
            interval,
            next: tokio::sync::Mutex::new(Instant::now()),
        }
    }
    async fn acquire(&self) {
        let Some(interval) = self.interval else {
            return;
        };
        let slot = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let slot = (*next).max(now);
            *next = slot + interval;
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
    }
}

/// Retry settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetrySettings {
    pub max_retries: u32,
    pub max_retry_after: Duration,
    pub not_found_retries: u32,
}

pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    tokens: TokenProvider,
    pacer: Pacer,
    retry: RetrySettings,
    pub stats: Arc<GraphStats>,
}

/// What to do with one answer.
enum Verdict {
    Done(Result<Response, ConnectorError>),
    Retry {
        after: Duration,
        throttled: bool,
        last: ConnectorError,
    },
}

/// The `Retry-After` seconds of a header value.
fn parse_retry_after(v: Option<&str>) -> Option<Duration> {
    v?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The error for a failed answer: its kind from the status and OData code, its message with
/// Graph's code, message and request id.
pub(crate) fn error_from(
    method: &str,
    path: &str,
    status: u16,
    body: &Json,
    retry_after: Option<Duration>,
) -> ConnectorError {
    let err = body.get("error");
    let code = err
        .and_then(|e| e.get("code"))
        .and_then(Json::as_str)
        .unwrap_or("");
    let message = err
        .and_then(|e| e.get("message"))
        .and_then(Json::as_str)
        .unwrap_or("");
    let inner = err.and_then(|e| e.get("innerError").or_else(|| e.get("innererror")));
    let request_id = inner
        .and_then(|i| i.get("request-id"))
        .and_then(Json::as_str)
        .unwrap_or("-");
    let lower = message.to_ascii_lowercase();
    let kind = match status {
        429 => ErrorKind::Throttled,
        503 | 504 => ErrorKind::Unavailable,
        401 | 403 => ErrorKind::Auth,
        404 => ErrorKind::NotFound,
        410 => ErrorKind::InvalidWatermark,
        409 | 412 => ErrorKind::Conflict,
        _ if code == "syncStateNotFound" || code == "resyncRequired" => ErrorKind::InvalidWatermark,
        400 if lower.contains("added object references already exist") => ErrorKind::ValueExists,
        400 if lower.contains("already exists") => ErrorKind::AlreadyExists,
        400 | 422 => ErrorKind::Constraint,
        s if s >= 500 => ErrorKind::Unavailable,
        _ => ErrorKind::Other,
    };
    let mut e = ConnectorError::new(
        kind,
        format!("{method} {path}: HTTP {status} {code}: {message} (request-id {request_id})"),
    );
    if let Some(after) = retry_after {
        e = e.with_retry_after(after);
    }
    e
}

impl Client {
    pub(crate) fn new(
        http: reqwest::Client,
        base: String,
        tokens: TokenProvider,
        writes_per_second: f64,
        retry: RetrySettings,
    ) -> Client {
        Client {
            http,
            base: base.trim_end_matches('/').to_string(),
            tokens,
            pacer: Pacer::new(writes_per_second),
            retry,
            stats: Arc::new(GraphStats::default()),
        }
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{}", self.base, path)
        }
    }

    /// The path of an absolute URL below the base (for a batch), or the URL unchanged.
    fn relative<'a>(&self, path: &'a str) -> &'a str {
        path.strip_prefix(self.base.as_str()).unwrap_or(path)
    }

    fn judge(
        &self,
        req: &Request,
        status: u16,
        retry_after: Option<Duration>,
        body: Json,
        attempt: u32,
    ) -> Verdict {
        if (200..300).contains(&status) {
            return Verdict::Done(Ok(Response { body }));
        }
        let e = error_from(req.method.as_str(), &req.path, status, &body, retry_after);
        let s = &self.stats;
        match status {
            429 | 503 | 504 => {
                if status == 429 {
                    s.throttled.fetch_add(1, Ordering::Relaxed);
                } else {
                    s.unavailable.fetch_add(1, Ordering::Relaxed);
                }
                if attempt < self.retry.max_retries {
                    let backoff = Duration::from_millis(500) * 2u32.pow(attempt.min(6));
                    let after = retry_after
                        .unwrap_or(backoff)
                        .min(self.retry.max_retry_after);
                    return Verdict::Retry {
                        after,
                        throttled: status == 429,
                        last: e,
                    };
                }
            }
            404 if req.retry_not_found && attempt < self.retry.not_found_retries => {
                return Verdict::Retry {
                    after: Duration::from_millis(100) * 2u32.pow(attempt.min(6)),
                    throttled: false,
                    last: e,
                };
            }
            _ => {}
        }
        Verdict::Done(Err(e))
    }

    fn count_retry(&self, throttled: bool) {
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        if !throttled {
            self.stats
                .retries_not_throttled
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends one request over HTTP: the status, `Retry-After` and JSON body.
    async fn send_raw(
        &self,
        method: Method,
        url: &str,
        body: Option<&Json>,
        eventual: bool,
    ) -> Result<(u16, Option<Duration>, Json), ConnectorError> {
        let token = self.tokens.token(&self.http).await?;
        let m = match method {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
            Method::Patch => reqwest::Method::PATCH,
            Method::Delete => reqwest::Method::DELETE,
        };
        let mut rb = self
            .http
            .request(m, url)
            .bearer_auth(token.expose())
            .header("Accept", "application/json");
        if eventual {
            rb = rb.header("ConsistencyLevel", "eventual");
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        self.stats.http_requests.fetch_add(1, Ordering::Relaxed);
        let resp = rb.send().await.map_err(|e| {
            let kind = if e.is_timeout() {
                ErrorKind::Timeout
            } else {
                ErrorKind::Unavailable
            };
            ConnectorError::new(kind, format!("{} {url}: {e}", method.as_str()))
        })?;
        let status = resp.status().as_u16();
        let retry_after = parse_retry_after(
            resp.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
        );
        let bytes = resp.bytes().await.map_err(|e| {
            ConnectorError::new(
                ErrorKind::Unavailable,
                format!("{} {url}: reading the response: {e}", method.as_str()),
            )
        })?;
        let body = if bytes.is_empty() {
            Json::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|e| {
                ConnectorError::new(
                    ErrorKind::Protocol,
                    format!(
                        "{} {url}: HTTP {status} with a body that is not JSON: {e}",
                        method.as_str()
                    ),
                )
            })?
        };
        if status == 401 {
            self.tokens.invalidate().await;
        }
        Ok((status, retry_after, body))
    }

    /// Sends one request, with pacing and retries.
    pub(crate) async fn send(&self, req: Request) -> Result<Response, ConnectorError> {
        let url = self.url(&req.path);
        let mut attempt = 0u32;
        let mut refreshed = false;
        loop {
            if req.method.is_write() {
                self.pacer.acquire().await;
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
            }
            let (status, retry_after, body) = self
                .send_raw(req.method, &url, req.body.as_ref(), req.eventual)
                .await?;
            if status == 401 && !refreshed {
                // The token expired or was revoked early: one more try with a new one.
                refreshed = true;
                self.count_retry(false);
                continue;
            }
            match self.judge(&req, status, retry_after, body, attempt) {
                Verdict::Done(r) => return r,
                Verdict::Retry {
                    after,
                    throttled,
                    last,
                } => {
                    debug!(error = %last, ?after, "retrying");
                    attempt += 1;
                    self.count_retry(throttled);
                    tokio::time::sleep(after).await;
                }
            }
        }
    }

    /// Sends requests through `$batch` (20 at most per batch), one outcome per request, in
    /// order. Each answer inside a batch is judged on its own: throttled ones are sent again
    /// after their `Retry-After`, the others keep their outcome.
    pub(crate) async fn batch(&self, reqs: Vec<Request>) -> Vec<Result<Response, ConnectorError>> {
        if reqs.len() == 1 {
            let mut reqs = reqs;
            let r = reqs.remove(0);
            return vec![self.send(r).await];
        }
        let mut out: Vec<Option<Result<Response, ConnectorError>>> =
            (0..reqs.len()).map(|_| None).collect();
        let mut attempts = vec![0u32; reqs.len()];
        let mut pending: Vec<usize> = (0..reqs.len()).collect();
        let mut refreshed = false;
        while !pending.is_empty() {
            let mut next_round = Vec::new();
            let mut wait = Duration::ZERO;
            for chunk in pending.chunks(MAX_BATCH) {
                let mut items = Vec::with_capacity(chunk.len());
                for &i in chunk {
                    let r = &reqs[i];
                    if r.method.is_write() {
                        self.pacer.acquire().await;
                        self.stats.writes.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut item = json!({
                        "id": i.to_string(),
                        "method": r.method.as_str(),
                        "url": self.relative(&r.path),
                    });
                    let mut headers = serde_json::Map::new();
                    if let Some(b) = &r.body {
                        item["body"] = b.clone();
                        headers.insert("Content-Type".into(), "application/json".into());
                    }
                    if r.eventual {
                        headers.insert("ConsistencyLevel".into(), "eventual".into());
                    }
                    if !headers.is_empty() {
                        item["headers"] = Json::Object(headers);
                    }
                    items.push(item);
                }
                let body = json!({ "requests": items });
                let url = format!("{}/$batch", self.base);
                let answer = self.send_raw(Method::Post, &url, Some(&body), false).await;
                let (status, retry_after, resp) = match answer {
                    Ok(a) => a,
                    Err(e) => {
                        for &i in chunk {
                            out[i] =
                                Some(Err(ConnectorError::new(e.kind(), e.message().to_string())));
                        }
                        continue;
                    }
                };
                if status == 401 && !refreshed {
                    refreshed = true;
                    self.count_retry(false);
                    next_round.extend_from_slice(chunk);
                    continue;
                }
                if !(200..300).contains(&status) {
                    // The whole batch failed: each request shares its fate.
                    let probe = Request::new(Method::Post, "/$batch");
                    for &i in chunk {
                        match self.judge(&probe, status, retry_after, resp.clone(), attempts[i]) {
                            Verdict::Done(r) => out[i] = Some(r),
                            Verdict::Retry {
                                after, throttled, ..
                            } => {
                                attempts[i] += 1;
                                self.count_retry(throttled);
                                wait = wait.max(after);
                                next_round.push(i);
                            }
                        }
                    }
                    continue;
                }
                let responses = resp
                    .get("responses")
                    .and_then(Json::as_array)
                    .cloned()
                    .unwrap_or_default();
                for &i in chunk {
                    let key = i.to_string();
                    let Some(r) = responses
                        .iter()
                        .find(|r| r.get("id").and_then(Json::as_str) == Some(key.as_str()))
                    else {
                        out[i] = Some(Err(ConnectorError::new(
                            ErrorKind::Protocol,
                            format!(
                                "$batch: no response for request {key} ({} {})",
                                reqs[i].method.as_str(),
                                reqs[i].path
                            ),
                        )));
                        continue;
                    };
                    let st = r
                        .get("status")
                        .and_then(Json::as_u64)
                        .and_then(|s| u16::try_from(s).ok())
                        .unwrap_or(0);
                    let ra = parse_retry_after(
                        r.get("headers")
                            .and_then(|h| {
                                h.as_object().and_then(|o| {
                                    o.iter()
                                        .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
                                        .map(|(_, v)| v)
                                })
                            })
                            .and_then(|v| {
                                v.as_str()
                                    .map(str::to_string)
                                    .or_else(|| v.as_u64().map(|n| n.to_string()))
                            })
                            .as_deref(),
                    );
                    let b = r.get("body").cloned().unwrap_or(Json::Null);
                    match self.judge(&reqs[i], st, ra, b, attempts[i]) {
                        Verdict::Done(res) => out[i] = Some(res),
                        Verdict::Retry {
                            after, throttled, ..
                        } => {
                            attempts[i] += 1;
                            self.count_retry(throttled);
                            wait = wait.max(after);
                            next_round.push(i);
                        }
                    }
                }
            }
            if !next_round.is_empty() {
                tokio::time::sleep(wait).await;
            }
            pending = next_round;
        }
        out.into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(ConnectorError::new(
                        ErrorKind::Other,
                        "$batch: request not sent",
                    ))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odata_errors_map_to_kinds_and_keep_details() {
        let body = json!({"error": {"code": "Request_BadRequest",
            "message": "Another object with the same value for property userPrincipalName already exists.",
            "innerError": {"request-id": "r-1"}}});
        let e = error_from("POST", "/users", 400, &body, None);
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert!(e.message().contains("Request_BadRequest") && e.message().contains("r-1"));
        let t = error_from(
            "GET",
            "/users",
            429,
            &json!({}),
            Some(Duration::from_secs(2)),
        );
        assert!(t.is_throttled());
        assert_eq!(t.retry_after(), Some(Duration::from_secs(2)));
        let g = error_from(
            "GET",
            "/users/delta",
            410,
            &json!({"error": {"code": "syncStateNotFound"}}),
            None,
        );
        assert_eq!(g.kind(), ErrorKind::InvalidWatermark);
        let v = error_from(
            "PATCH",
            "/groups/1",
            400,
            &json!({"error": {"message": "One or more added object references already exist for the following modified properties: 'members'."}}),
            None,
        );
        assert_eq!(v.kind(), ErrorKind::ValueExists);
        // Garbage bodies are errors, never panics.
        assert_eq!(
            error_from("GET", "/x", 500, &json!([1, 2]), None).kind(),
            ErrorKind::Unavailable
        );
    }

    #[test]
    fn retry_after_parses_seconds_only() {
        assert_eq!(parse_retry_after(Some(" 3 ")), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(Some("soon")), None);
        assert_eq!(parse_retry_after(None), None);
    }
}
