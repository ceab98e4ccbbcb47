//! OAuth 2.0 client credentials against the Microsoft identity platform v2.0 token endpoint:
//! a client secret, or a certificate (a client assertion JWT signed RS256, Microsoft's
//! recommendation). Tokens are cached and refreshed before they expire; secrets and tokens live
//! in [`Secret`], whose `Debug` prints `***`.
//!
//! It may not log or format a secret, a private key or a token.

use std::fmt;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::connector::{ConnectorError, ErrorKind, Secret};

/// How the application proves its identity.
#[derive(Clone)]
pub enum Credential {
    /// A client secret.
    Secret(Secret),
    /// A certificate: its RSA private key and the SHA-256 thumbprint of its DER encoding.
    Certificate(CertificateCredential),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Secret(_) => f.write_str("Secret(***)"),
            Credential::Certificate(c) => write!(f, "Certificate(x5t#S256={})", c.thumbprint),
        }
    }
}

/// A certificate credential: signs client assertions.
#[derive(Clone)]
pub struct CertificateCredential {
    key: std::sync::Arc<RsaKeyPair>,
    /// Base64url SHA-256 of the certificate's DER (the `x5t#S256` header).
    thumbprint: String,
}

/// The DER bodies of the PEM blocks labelled `label` in `pem`.
fn pem_blocks(pem: &str, label: &str) -> Vec<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(b) = rest.find(&begin) {
        let after = &rest[b + begin.len()..];
        let Some(e) = after.find(&end) else { break };
        let body: String = after[..e].chars().filter(|c| !c.is_whitespace()).collect();
        if let Ok(der) = STANDARD.decode(body) {
            out.push(der);
        }
        rest = &after[e + end.len()..];
    }
    out
}

impl CertificateCredential {
    /// From PEM text: the certificate (`CERTIFICATE`) and its RSA private key (`PRIVATE KEY`,
    /// PKCS #8, or `RSA PRIVATE KEY`, PKCS #1). They may be in one file.
    pub fn from_pem(certificate_pem: &str, key_pem: &str) -> Result<Self, ConnectorError> {
        let cfg = |m: &str| ConnectorError::new(ErrorKind::Config, m.to_string());
        let cert = pem_blocks(certificate_pem, "CERTIFICATE")
            .into_iter()
            .next()
            .ok_or_else(|| cfg("graph certificate: no CERTIFICATE block in the certificate PEM"))?;
        let key = if let Some(der) = pem_blocks(key_pem, "PRIVATE KEY").into_iter().next() {
            RsaKeyPair::from_pkcs8(&der)
        } else if let Some(der) = pem_blocks(key_pem, "RSA PRIVATE KEY").into_iter().next() {
            RsaKeyPair::from_der(&der)
        } else {
            return Err(cfg(
                "graph certificate: no PRIVATE KEY or RSA PRIVATE KEY block in the key PEM",
            ));
        }
        .map_err(|e| {
            cfg(&format!(
                "graph certificate: the private key is not a usable RSA key ({e}); hint: 2048 bits or more, unencrypted"
            ))
        })?;
        let digest = ring::digest::digest(&ring::digest::SHA256, &cert);
        Ok(CertificateCredential {
            key: std::sync::Arc::new(key),
            thumbprint: URL_SAFE_NO_PAD.encode(digest.as_ref()),
        })
    }

    /// The RSA public key (PKCS #1 DER): what the tenant (or the emulator) verifies with.
    pub fn public_key_der(&self) -> Vec<u8> {
        use ring::signature::KeyPair as _;
        self.key.public_key().as_ref().to_vec()
    }

    /// A client assertion for `client_id` at `token_url`, valid ten minutes from `now_unix`.
    pub fn assertion(
        &self,
        client_id: &str,
        token_url: &str,
        now_unix: i64,
    ) -> Result<Secret, ConnectorError> {
        let rng = SystemRandom::new();
        let mut jti = [0u8; 16];
        rng.fill(&mut jti)
            .map_err(|_| ConnectorError::new(ErrorKind::Other, "no OS randomness for a JWT id"))?;
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t#S256": self.thumbprint});
        let claims = serde_json::json!({
            "aud": token_url, "iss": client_id, "sub": client_id,
            "jti": uuid::Uuid::from_bytes(jti).to_string(),
            "nbf": now_unix, "iat": now_unix, "exp": now_unix + 600,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &rng, signing_input.as_bytes(), &mut sig)
            .map_err(|_| {
                ConnectorError::new(ErrorKind::Other, "signing the client assertion failed")
            })?;
        Ok(Secret::new(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(sig)
        )))
    }
}

/// A cached access token.
struct Cached {
    token: Secret,
    refresh_at: Instant,
}

/// Gets and caches access tokens.
pub(crate) struct TokenProvider {
    token_url: String,
    client_id: String,
    credential: Credential,
    scope: String,
    refresh_margin: Duration,
    cached: Mutex<Option<Cached>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Secret,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl TokenProvider {
    pub(crate) fn new(
        token_url: String,
        client_id: String,
        credential: Credential,
        scope: String,
        refresh_margin: Duration,
    ) -> Self {
        TokenProvider {
            token_url,
            client_id,
            credential,
            scope,
            refresh_margin,
            cached: Mutex::new(None),
        }
    }

    /// Forgets the cached token (after a 401).
    pub(crate) async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }

    /// A valid token: the cached one until its refresh time, else a new one.
    pub(crate) async fn token(&self, http: &reqwest::Client) -> Result<Secret, ConnectorError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            if Instant::now() < c.refresh_at {
                return Ok(c.token.clone());
            }
        }
        let mut form: Vec<(&str, String)> = vec![
            ("grant_type", "client_credentials".into()),
            ("client_id", self.client_id.clone()),
            ("scope", self.scope.clone()),
        ];
        match &self.credential {
            Credential::Secret(s) => form.push(("client_secret", s.expose().to_string())),
            Credential::Certificate(c) => {
                let now = chrono::Utc::now().timestamp();
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push((
                    "client_assertion",
                    c.assertion(&self.client_id, &self.token_url, now)?
                        .expose()
                        .to_string(),
                ));
            }
        }
        let resp = http
            .post(&self.token_url)
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                ConnectorError::new(
                    ErrorKind::Unavailable,
                    format!("token endpoint {} unreachable: {e}", self.token_url),
                )
            })?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| {
            ConnectorError::new(ErrorKind::Unavailable, format!("token response: {e}"))
        })?;
        if !status.is_success() {
            // AADSTS errors: {"error": "...", "error_description": "..."}; the description
            // names the problem, never the secret.
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let what = v
                .get("error_description")
                .or_else(|| v.get("error"))
                .and_then(|x| x.as_str())
                .unwrap_or("no description");
            let kind = if status.as_u16() == 429 || status.is_server_error() {
                ErrorKind::Unavailable
            } else {
                ErrorKind::Auth
            };
            return Err(ConnectorError::new(
                kind,
                format!("token request refused ({status}): {what}; hint: check tenant, client id and credential"),
            ));
        }
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            ConnectorError::new(
                ErrorKind::Protocol,
                format!("token response unreadable: {e}"),
            )
        })?;
        let life = Duration::from_secs(t.expires_in.unwrap_or(3599));
        // Refresh `refresh_margin` before expiry, or at half-life for short-lived tokens.
        let refresh_in = if life > self.refresh_margin * 2 {
            life - self.refresh_margin
        } else {
            life / 2
        };
        *cached = Some(Cached {
            token: t.access_token.clone(),
            refresh_at: Instant::now() + refresh_in,
        });
        Ok(t.access_token)
    }
}

/// A random initial password meeting Entra's complexity rules (8–256 characters, at least
/// three of: upper case, lower case, digits, symbols — this one has all four), 20 characters,
/// from the operating system's random source.
pub fn random_password() -> Result<Secret, ConnectorError> {
    const UPPER: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ";
    const LOWER: &[u8] = b"abcdefghijkmnopqrstuvwxyz";
    const DIGIT: &[u8] = b"23456789";
    const SYMBOL: &[u8] = b"!#$%&*+-=?@^_";
    let rng = SystemRandom::new();
    let mut bytes = [0u8; 40];
    rng.fill(&mut bytes)
        .map_err(|_| ConnectorError::new(ErrorKind::Other, "no OS randomness for a password"))?;
    let all: Vec<u8> = [UPPER, LOWER, DIGIT, SYMBOL].concat();
    let mut pw: Vec<u8> = Vec::with_capacity(20);
    for (i, set) in [UPPER, LOWER, DIGIT, SYMBOL].iter().enumerate() {
        pw.push(set[bytes[i] as usize % set.len()]);
    }
    for b in &bytes[4..20] {
        pw.push(all[*b as usize % all.len()]);
    }
    // Shuffle so the classes are not in fixed positions.
    for i in (1..pw.len()).rev() {
        let j = bytes[20 + (i % 20)] as usize % (i + 1);
        pw.swap(i, j);
    }
    Ok(Secret::new(String::from_utf8_lossy(&pw).into_owned()))
}

/// Whether `pw` meets Entra's password complexity rules.
pub fn meets_complexity(pw: &str) -> bool {
    let n = pw.chars().count();
    let classes = [
        pw.chars().any(|c| c.is_ascii_uppercase()),
        pw.chars().any(|c| c.is_ascii_lowercase()),
        pw.chars().any(|c| c.is_ascii_digit()),
        pw.chars().any(|c| !c.is_ascii_alphanumeric()),
    ];
    (8..=256).contains(&n) && classes.iter().filter(|x| **x).count() >= 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "***");
        let c = Credential::Secret(s);
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn passwords_meet_complexity_and_differ() {
        let a = random_password().unwrap();
        let b = random_password().unwrap();
        assert!(meets_complexity(a.expose()), "{}", a.expose());
        assert_eq!(a.expose().len(), 20);
        assert_ne!(a, b);
        assert!(!meets_complexity("password"));
    }

    #[test]
    fn pem_blocks_are_found() {
        let pem = "x\n-----BEGIN CERTIFICATE-----\nAAEC\nAw==\n-----END CERTIFICATE-----\n";
        assert_eq!(pem_blocks(pem, "CERTIFICATE"), vec![vec![0, 1, 2, 3]]);
        assert!(pem_blocks(pem, "PRIVATE KEY").is_empty());
    }
}
