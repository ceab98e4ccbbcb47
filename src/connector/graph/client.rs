//! The HTTP layer of the Graph connector: requests with a bearer token (refreshed on 401),
//! client-side pacing of writes under Graph's documented write limit, retries of 429/503/504
//! after `Retry-After`, retries of a 404 that replication delay explains, JSON batching
//! (`$batch`, at most 20 requests, each response judged on its own), and OData errors turned
//! into [`ConnectorError`]s that keep `error.code`, `error.message` and the request id.
//!
//! It may not panic on a server's answer, nor log a token.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
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
        // Not run because the batched request it depended on failed: sending it again is safe.
        424 => ErrorKind::Unavailable,
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

    /// Sends one request, with pacing and retries. Inside [`Client::batched`] the request
    /// joins the `$batch` envelopes of the batched work (it is answered on its own all the same:
    /// its status, `Retry-After` and body are judged here as for a request of its own).
    pub(crate) async fn send(&self, req: Request) -> Result<Response, ConnectorError> {
        let queue = QUEUE.try_with(Arc::clone).ok();
        let url = self.url(&req.path);
        let mut attempt = 0u32;
        let mut refreshed = false;
        loop {
            let (status, retry_after, body) = match &queue {
                Some(q) => q.send(&req).await?,
                None => {
                    if req.method.is_write() {
                        self.pacer.acquire().await;
                        self.stats.writes.fetch_add(1, Ordering::Relaxed);
                    }
                    self.send_raw(req.method, &url, req.body.as_ref(), req.eventual)
                        .await?
                }
            };
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

    /// Sends independent requests (Graph may run them in any order), one outcome per request,
    /// in order: through `$batch` envelopes of at most 20 (see [`Client::batched`]).
    pub(crate) async fn batch(&self, reqs: Vec<Request>) -> Vec<Result<Response, ConnectorError>> {
        self.batched(futures::future::join_all(
            reqs.into_iter().map(|r| self.send(r)),
        ))
        .await
    }

    /// Runs `work` — any number of concurrent tasks that send requests through
    /// [`Client::send`] — with their requests combined into `$batch` envelopes: whenever every
    /// task waits for an answer (or a timer), the requests they wait for are sent, at most 20
    /// per envelope (Graph's limit), a lone request as itself. Each request of an envelope is
    /// independent of the others (no `dependsOn`): a task sends its next request only once the
    /// answer to its previous one is in, so whatever must happen in order takes successive
    /// envelopes. Writes are paced envelope by envelope (Graph counts each request of a batch
    /// against its limits).
    pub(crate) async fn batched<T>(&self, work: impl Future<Output = T>) -> T {
        if QUEUE.try_with(|_| ()).is_ok() {
            // Already inside batched work: its driver sends these requests too.
            return work.await;
        }
        let queue = Arc::new(BatchQueue::default());
        let work = QUEUE.scope(queue.clone(), work);
        futures::pin_mut!(work);
        loop {
            let polled = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
            if let Poll::Ready(out) = polled {
                return out;
            }
            // Every task that could make progress did: what they wait for is queued.
            let waiting = queue.take();
            if waiting.is_empty() {
                // Wait for the work to end, or for a task to queue a request (after a timer).
                let notified = queue.notify.notified();
                futures::pin_mut!(notified);
                let done = std::future::poll_fn(|cx| match work.as_mut().poll(cx) {
                    Poll::Ready(out) => Poll::Ready(Some(out)),
                    Poll::Pending => notified.as_mut().poll(cx).map(|()| None),
                })
                .await;
                if let Some(out) = done {
                    return out;
                }
                continue;
            }
            for chunk in chunks(waiting, MAX_BATCH) {
                self.flush(chunk).await;
            }
        }
    }

    /// Sends queued requests in one `$batch` envelope (or a lone one as itself) and hands each
    /// its answer.
    async fn flush(&self, items: Vec<Queued>) {
        for q in &items {
            if q.req.method.is_write() {
                self.pacer.acquire().await;
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
            }
        }
        if items.len() == 1 {
            for q in items {
                let url = self.url(&q.req.path);
                let a = self
                    .send_raw(q.req.method, &url, q.req.body.as_ref(), q.req.eventual)
                    .await;
                let _ = q.reply.send(a);
            }
            return;
        }
        let body = envelope(&items, |p| self.relative(p));
        let url = format!("{}/$batch", self.base);
        let (status, retry_after, resp) =
            match self.send_raw(Method::Post, &url, Some(&body), false).await {
                Ok(a) => a,
                Err(e) => {
                    for q in items {
                        let _ = q
                            .reply
                            .send(Err(ConnectorError::new(e.kind(), e.message().to_string())));
                    }
                    return;
                }
            };
        if !(200..300).contains(&status) {
            // The envelope itself was refused (throttled, unauthorized, malformed): every
            // request shares its answer, and each is judged (and retried) on its own.
            for q in items {
                let _ = q.reply.send(Ok((status, retry_after, resp.clone())));
            }
            return;
        }
        let mut answers = answers(&resp);
        for (n, q) in items.into_iter().enumerate() {
            let a = answers.remove(&(n + 1).to_string()).ok_or_else(|| {
                ConnectorError::new(
                    ErrorKind::Protocol,
                    format!(
                        "$batch: no response for request {} ({} {})",
                        n + 1,
                        q.req.method.as_str(),
                        q.req.path
                    ),
                )
            });
            let _ = q.reply.send(a);
        }
    }
}

tokio::task_local! {
    /// The queue of the batched work the current task belongs to (see [`Client::batched`]).
    static QUEUE: Arc<BatchQueue>;
}

/// A request waiting for its envelope, and where its answer goes.
struct Queued {
    req: Request,
    reply: tokio::sync::oneshot::Sender<Result<Answer, ConnectorError>>,
}

/// An HTTP answer: status, `Retry-After`, JSON body.
type Answer = (u16, Option<Duration>, Json);

/// The requests batched work waits for.
#[derive(Default)]
struct BatchQueue {
    items: std::sync::Mutex<Vec<Queued>>,
    notify: tokio::sync::Notify,
}

impl BatchQueue {
    /// Queues `req` and waits for its answer.
    async fn send(&self, req: &Request) -> Result<Answer, ConnectorError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.items
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Queued {
                req: req.clone(),
                reply,
            });
        self.notify.notify_one();
        answer.await.unwrap_or_else(|_| {
            Err(ConnectorError::new(
                ErrorKind::Other,
                format!("$batch: {} {} was not sent", req.method.as_str(), req.path),
            ))
        })
    }

    fn take(&self) -> Vec<Queued> {
        std::mem::take(
            &mut *self
                .items
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// `items` in runs of at most `n`, in order.
fn chunks<T>(items: Vec<T>, n: usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    for item in items {
        match out.last_mut() {
            Some(c) if c.len() < n => c.push(item),
            _ => out.push(vec![item]),
        }
    }
    out
}

/// The `$batch` body for `items`: ids `"1"`, `"2"`, … in order, URLs relative to the version
/// root, `Content-Type` with every body (Graph requires it), `ConsistencyLevel` when asked.
fn envelope(items: &[Queued], relative: impl Fn(&str) -> &str) -> Json {
    let requests: Vec<Json> = items
        .iter()
        .enumerate()
        .map(|(n, q)| {
            let r = &q.req;
            let mut item = json!({
                "id": (n + 1).to_string(),
                "method": r.method.as_str(),
                "url": relative(&r.path),
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
            item
        })
        .collect();
    json!({ "requests": requests })
}

/// The answers of a `$batch` response by request id (responses may come in any order).
fn answers(resp: &Json) -> HashMap<String, Answer> {
    let mut out = HashMap::new();
    for r in resp
        .get("responses")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        let Some(id) = r.get("id").and_then(Json::as_str) else {
            continue;
        };
        let status = r
            .get("status")
            .and_then(Json::as_u64)
            .and_then(|s| u16::try_from(s).ok())
            .unwrap_or(0);
        let retry_after = parse_retry_after(
            r.get("headers")
                .and_then(Json::as_object)
                .and_then(|o| {
                    o.iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
                        .map(|(_, v)| v)
                })
                .and_then(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .or_else(|| v.as_u64().map(|n| n.to_string()))
                })
                .as_deref(),
        );
        let body = r.get("body").cloned().unwrap_or(Json::Null);
        out.insert(id.to_string(), (status, retry_after, body));
    }
    out
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
    fn envelopes_and_their_answers() {
        let (reply, _rx) = tokio::sync::oneshot::channel();
        let (reply2, _rx2) = tokio::sync::oneshot::channel();
        let mut get = Request::new(Method::Get, "https://g/v1.0/users?$top=1");
        get.eventual = true;
        let items = vec![
            Queued {
                req: Request::new(Method::Patch, "/users/1").body(json!({"city": "Oslo"})),
                reply,
            },
            Queued {
                req: get,
                reply: reply2,
            },
        ];
        let e = envelope(&items, |p| p.strip_prefix("https://g/v1.0").unwrap_or(p));
        assert_eq!(
            e,
            json!({"requests": [
                {"id": "1", "method": "PATCH", "url": "/users/1", "body": {"city": "Oslo"},
                 "headers": {"Content-Type": "application/json"}},
                {"id": "2", "method": "GET", "url": "/users?$top=1",
                 "headers": {"ConsistencyLevel": "eventual"}},
            ]})
        );
        // Answers in any order, by id; Retry-After as a string or a number, any case.
        let a = answers(&json!({"responses": [
            {"id": "2", "status": 429, "headers": {"retry-after": 3}, "body": {}},
            {"id": "1", "status": 204, "headers": {"Retry-After": "x"}},
            {"status": 200},
            {"id": "9", "status": "200"},
        ]}));
        assert_eq!(a["1"].0, 204);
        assert_eq!(a["1"].1, None);
        assert_eq!(a["2"], (429, Some(Duration::from_secs(3)), json!({})));
        assert_eq!(
            a["9"].0, 0,
            "a status that is not a number is not a success"
        );
        assert_eq!(a.len(), 3);
        assert_eq!(
            chunks((0..45).collect(), 20)
                .iter()
                .map(Vec::len)
                .collect::<Vec<_>>(),
            [20, 20, 5]
        );
    }

    #[test]
    fn retry_after_parses_seconds_only() {
        assert_eq!(parse_retry_after(Some(" 3 ")), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(Some("soon")), None);
        assert_eq!(parse_retry_after(None), None);
    }
}
