//! HTTP for the SCIM connector: authentication (bearer, OAuth 2.0 client credentials with a
//! cached token, basic), secrets that never print, and the mapping of HTTP answers — SCIM
//! error bodies, `Retry-After`, status codes — to [`ConnectorError`]s.
//!
//! Never panics on a server's answer: anything unexpected is an error of kind `Protocol`.

use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::connector::{ConnectorError, ErrorKind, Secret};

/// How the connector authenticates.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScimAuth {
    /// No authentication.
    #[default]
    None,
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// The token.
        token: Secret,
    },
    /// HTTP basic authentication.
    Basic {
        /// The user name.
        username: String,
        /// The password.
        password: Secret,
    },
    /// OAuth 2.0 client credentials (RFC 6749 §4.4): a token is fetched from `token_url` and
    /// kept until shortly before it expires.
    #[serde(rename = "oauth2")]
    OAuth2 {
        /// The token endpoint.
        token_url: String,
        /// The client id.
        client_id: String,
        /// The client secret.
        client_secret: Secret,
        /// The scope asked for, if any.
        #[serde(default)]
        scope: Option<String>,
    },
}

/// A cached OAuth token.
#[derive(Default)]
pub(crate) struct TokenCache {
    token: Option<(Secret, Instant)>,
}

impl TokenCache {
    pub(crate) fn forget(&mut self) {
        self.token = None;
    }
}

/// Adds the credentials of `auth` to `req`, fetching an OAuth token when none is cached.
pub(crate) async fn authorize(
    http: &reqwest::Client,
    auth: &ScimAuth,
    cache: &tokio::sync::Mutex<TokenCache>,
    req: reqwest::RequestBuilder,
) -> Result<reqwest::RequestBuilder, ConnectorError> {
    Ok(match auth {
        ScimAuth::None => req,
        ScimAuth::Bearer { token } => req.bearer_auth(token.expose()),
        ScimAuth::Basic { username, password } => req.basic_auth(username, Some(password.expose())),
        ScimAuth::OAuth2 {
            token_url,
            client_id,
            client_secret,
            scope,
        } => {
            let mut c = cache.lock().await;
            let fresh = matches!(&c.token, Some((_, until)) if Instant::now() < *until);
            if !fresh {
                c.token = Some(
                    fetch_token(http, token_url, client_id, client_secret, scope.as_deref())
                        .await?,
                );
            }
            match &c.token {
                Some((t, _)) => req.bearer_auth(t.expose()),
                None => return Err(ConnectorError::new(ErrorKind::Auth, "no OAuth token")),
            }
        }
    })
}

async fn fetch_token(
    http: &reqwest::Client,
    url: &str,
    client_id: &str,
    secret: &Secret,
    scope: Option<&str>,
) -> Result<(Secret, Instant), ConnectorError> {
    let mut form = vec![
        ("grant_type", "client_credentials"),
        ("client_id", client_id),
        ("client_secret", secret.expose()),
    ];
    if let Some(s) = scope {
        form.push(("scope", s));
    }
    let body = form
        .iter()
        .map(|(k, v)| format!("{k}={}", form_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let resp = http
        .post(url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header("Accept", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| transport(e, &format!("OAuth token endpoint {url}")))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| transport(e, &format!("OAuth token endpoint {url}")))?;
    if !status.is_success() {
        let mut e = error_from(
            status,
            &headers,
            &bytes,
            &format!("OAuth token endpoint {url}"),
        );
        if matches!(status.as_u16(), 400 | 401 | 403) {
            e = ConnectorError::new(ErrorKind::Auth, e.message().to_string());
        }
        return Err(e);
    }
    let j: Json = serde_json::from_slice(&bytes).map_err(|e| {
        ConnectorError::new(
            ErrorKind::Protocol,
            format!("OAuth token endpoint {url}: the answer is not JSON ({e})"),
        )
    })?;
    let token = j
        .get("access_token")
        .and_then(Json::as_str)
        .ok_or_else(|| {
            ConnectorError::new(
                ErrorKind::Protocol,
                format!("OAuth token endpoint {url}: no access_token in the answer"),
            )
        })?;
    let life = j.get("expires_in").and_then(Json::as_u64).unwrap_or(300);
    // Renew a minute early (or at half life for short tokens).
    let keep = Duration::from_secs(life.saturating_sub(60.min(life / 2)));
    Ok((Secret::new(token), Instant::now() + keep))
}

/// `application/x-www-form-urlencoded` encoding of one value.
pub(crate) fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Percent-encodes a URL query value or path segment (RFC 3986 unreserved kept).
pub(crate) fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// An error for a request that got no HTTP answer.
pub(crate) fn transport(e: reqwest::Error, what: &str) -> ConnectorError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_connect() || e.is_request() || e.is_body() {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Other
    };
    ConnectorError::new(kind, format!("{what}: {e}")).with_source(e)
}

/// `Retry-After`: delta seconds or an HTTP date.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(s) = v.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let secs = (when.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_seconds();
    Some(Duration::from_secs(secs.max(0) as u64))
}

/// The error for a non-success answer: the kind from the status (and `scimType`), the SCIM
/// error body's `scimType` and `detail` in the message, `Retry-After` kept.
pub(crate) fn error_from(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    what: &str,
) -> ConnectorError {
    let parsed: Option<Json> = serde_json::from_slice(body).ok();
    let scim_type = parsed
        .as_ref()
        .and_then(|j| j.get("scimType"))
        .and_then(Json::as_str)
        .map(str::to_string);
    let detail = parsed
        .as_ref()
        .and_then(|j| j.get("detail"))
        .and_then(Json::as_str)
        .map(str::to_string);
    error_parts(
        status.as_u16(),
        scim_type,
        detail,
        body,
        what,
        retry_after(headers),
    )
}

/// The error for a status, `scimType` and `detail` (also used for bulk operation results).
pub(crate) fn error_parts(
    status: u16,
    scim_type: Option<String>,
    detail: Option<String>,
    body: &[u8],
    what: &str,
    after: Option<Duration>,
) -> ConnectorError {
    let kind = match (status, scim_type.as_deref()) {
        (409, _) | (_, Some("uniqueness")) => ErrorKind::AlreadyExists,
        (401 | 403, _) => ErrorKind::Auth,
        (404, _) => ErrorKind::NotFound,
        (412, _) => ErrorKind::Conflict,
        (429, _) => ErrorKind::Throttled,
        (408 | 504, _) => ErrorKind::Timeout,
        (500 | 502 | 503, _) => ErrorKind::Unavailable,
        (
            400,
            Some("mutability" | "invalidValue" | "invalidSyntax" | "noTarget" | "invalidPath"),
        ) => ErrorKind::Constraint,
        (400 | 413 | 422, _) => ErrorKind::Constraint,
        (501, _) => ErrorKind::Unsupported,
        _ => ErrorKind::Other,
    };
    let mut msg = format!("{what}: HTTP {status}");
    if let Some(t) = &scim_type {
        msg.push_str(&format!(", scimType {t}"));
    }
    match &detail {
        Some(d) => msg.push_str(&format!(": {d}")),
        None if !body.is_empty() => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).to_string();
            msg.push_str(&format!(": {}", text.trim()));
        }
        None => {}
    }
    if kind == ErrorKind::Auth {
        msg.push_str(" (check the credentials and the client's permissions)");
    }
    let mut e = ConnectorError::new(kind, msg);
    if let Some(a) = after {
        e = e.with_retry_after(a);
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn secrets_do_not_print() {
        let a = ScimAuth::OAuth2 {
            token_url: "https://t".into(),
            client_id: "c".into(),
            client_secret: Secret::new("hunter2"),
            scope: None,
        };
        let d = format!("{a:?}");
        assert!(!d.contains("hunter2") && d.contains("***"), "{d}");
        let b = ScimAuth::Bearer {
            token: Secret::new("tok"),
        };
        assert!(!format!("{b:?}").contains("tok\""));
    }

    #[test]
    fn maps_statuses() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        let e = error_from(StatusCode::TOO_MANY_REQUESTS, &h, b"", "POST /Users");
        assert_eq!(e.kind(), ErrorKind::Throttled);
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        let body = br#"{"schemas":["urn:ietf:params:scim:api:messages:2.0:Error"],"status":"409","scimType":"uniqueness","detail":"userName taken"}"#;
        let e = error_from(StatusCode::CONFLICT, &HeaderMap::new(), body, "POST /Users");
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert!(e.message().contains("uniqueness") && e.message().contains("userName taken"));
        let e = error_from(
            StatusCode::PRECONDITION_FAILED,
            &HeaderMap::new(),
            b"{",
            "PATCH",
        );
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!(
            error_from(StatusCode::UNAUTHORIZED, &HeaderMap::new(), b"", "x").kind(),
            ErrorKind::Auth
        );
        assert_eq!(
            error_from(
                StatusCode::INTERNAL_SERVER_ERROR,
                &HeaderMap::new(),
                b"",
                "x"
            )
            .kind(),
            ErrorKind::Unavailable
        );
        assert!(
            error_from(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new(), b"", "x").is_retryable()
        );
    }

    #[test]
    fn encodes() {
        assert_eq!(
            url_encode("userName eq \"a&b\""),
            "userName%20eq%20%22a%26b%22"
        );
        assert_eq!(form_encode("a b+c"), "a+b%2Bc");
    }
}
