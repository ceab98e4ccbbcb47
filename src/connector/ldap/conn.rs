//! Connecting and binding to an LDAP server: TLS (ldaps:// and StartTLS) with a rustls
//! configuration this crate builds, the refusal of a password over a cleartext connection,
//! SASL EXTERNAL, timeouts, and the one mapping of ldap3 errors and LDAP result codes onto
//! [`ErrorKind`] that every part of the connector uses.
//!
//! It opens connections and binds; it runs no searches and keeps no state between calls (a
//! reconnect is another [`connect`]).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use ldap3::result::LdapError;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapResult};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::config::{LdapBind, LdapConnection, Scheme, TlsOptions};
use crate::connector::{ConnectorError, ErrorKind};

/// An open, bound connection: the ldap3 handle, with the configured timeout applied to every
/// operation started through [`LdapHandle::ldap`].
///
/// Dropping the last handle closes the connection.
#[derive(Debug, Clone)]
pub struct LdapHandle {
    ldap: Ldap,
    timeout: Duration,
    protected: bool,
    url: String,
}

impl LdapHandle {
    /// The ldap3 handle, armed with the operation timeout for the next operation.
    pub fn ldap(&mut self) -> &mut Ldap {
        self.ldap.with_timeout(self.timeout)
    }

    /// Whether the connection is encrypted (TLS) or local (`ldapi://`).
    pub fn is_protected(&self) -> bool {
        self.protected
    }

    /// The server URL, for error messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The operation timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Unbinds and closes the connection (errors are ignored: the connection is gone either
    /// way).
    pub async fn close(mut self) {
        let _ = self.ldap.unbind().await;
    }
}

/// Opens a connection as `config` says, upgrades it with StartTLS when asked, and binds.
///
/// A simple bind over a connection that is neither TLS nor `ldapi://` is refused before
/// anything is sent, unless [`LdapConnection::allow_cleartext_bind`] is set (error kind
/// [`ErrorKind::Config`]). Needs a tokio runtime (the connection is driven by a spawned task).
pub async fn connect(config: &LdapConnection) -> Result<LdapHandle, ConnectorError> {
    let scheme = config.scheme()?;
    let protected = check_bind(config)?;
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(ConnectorError::new(
            ErrorKind::Config,
            "the LDAP connector must run inside a tokio runtime",
        ));
    }
    let timeout = config.timeout_duration();
    let mut settings = LdapConnSettings::new().set_conn_timeout(timeout);
    if scheme == Scheme::Ldaps || config.starttls {
        settings = settings
            .set_config(tls_config(&config.tls)?)
            .set_starttls(config.starttls);
    }
    let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &config.url)
        .await
        .map_err(|e| map_ldap_error(e).with_object(&config.url))?;
    let url = config.url.clone();
    tokio::spawn(async move {
        if let Err(e) = conn.drive().await {
            tracing::debug!(url = %url, error = %e, "LDAP connection ended");
        }
    });
    ldap.with_timeout(timeout);
    let bound = match &config.bind {
        LdapBind::Anonymous => Ok(()),
        LdapBind::Simple { dn, password } => ldap
            .simple_bind(dn, password.expose())
            .await
            .and_then(LdapResult::success)
            .map(|_| ())
            .map_err(|e| {
                let e = map_ldap_error(e);
                ConnectorError::new(
                    e.kind(),
                    format!("simple bind as {dn:?} failed: {}", e.message()),
                )
            }),
        LdapBind::SaslExternal => ldap
            .sasl_external_bind()
            .await
            .and_then(LdapResult::success)
            .map(|_| ())
            .map_err(|e| {
                let e = map_ldap_error(e);
                ConnectorError::new(
                    e.kind(),
                    format!(
                        "SASL EXTERNAL bind failed: {} (it needs a TLS client certificate or an \
                         ldapi:// socket the server maps to an identity)",
                        e.message()
                    ),
                )
            }),
    };
    bound.map_err(|e| e.with_object(&config.url))?;
    Ok(LdapHandle {
        ldap,
        timeout,
        protected,
        url: config.url.clone(),
    })
}

/// The bind rules every connection follows, checked before anything is sent: a simple bind is
/// refused over a connection that is neither TLS nor `ldapi://` unless
/// [`LdapConnection::allow_cleartext_bind`] is set, and a simple bind with an empty password
/// (an unauthenticated bind) is refused. Returns whether the connection is protected.
pub(crate) fn check_bind(config: &LdapConnection) -> Result<bool, ConnectorError> {
    let protected = config.is_protected()?;
    if let LdapBind::Simple { dn, password } = &config.bind {
        if !protected && !config.allow_cleartext_bind {
            return Err(ConnectorError::new(
                ErrorKind::Config,
                format!(
                    "refusing a simple bind as {dn:?} over the cleartext connection {}: the \
                     password would cross the network unencrypted. Use ldaps://, set \
                     starttls = true, or (for a test server) allow_cleartext_bind = true",
                    config.url
                ),
            ));
        }
        if password.is_empty() {
            return Err(ConnectorError::new(
                ErrorKind::Config,
                format!(
                    "the simple bind as {dn:?} has an empty password: that is an \
                     unauthenticated bind (RFC 4513 §5.1.2); use method = \"anonymous\" for \
                     anonymous access"
                ),
            ));
        }
    }
    Ok(protected)
}

/// The rustls client configuration for `opts`: the CA file's certificates (or the system trust
/// store) as trust anchors, an optional client certificate, and — only when
/// [`TlsOptions::danger_accept_invalid_certs`] is set — a verifier that accepts any server
/// certificate.
pub fn tls_config(opts: &TlsOptions) -> Result<Arc<ClientConfig>, ConnectorError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnectorError::new(ErrorKind::Config, format!("TLS setup: {e}")))?;
    let builder = if opts.danger_accept_invalid_certs {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(provider)))
    } else {
        builder.with_root_certificates(trust_anchors(opts)?)
    };
    let config =
        match (&opts.client_cert_file, &opts.client_key_file) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert)?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    ConnectorError::new(
                        ErrorKind::Config,
                        format!("tls.client_key_file {}: {e}", key.display()),
                    )
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    ConnectorError::new(
                        ErrorKind::Config,
                        format!("tls.client_cert_file and client_key_file do not make a pair: {e}"),
                    )
                })?
            }
            _ => return Err(ConnectorError::new(
                ErrorKind::Config,
                "tls.client_cert_file and tls.client_key_file go together: give both or neither",
            )),
        };
    Ok(Arc::new(config))
}

fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, ConnectorError> {
    let err = |e: &dyn std::fmt::Display| {
        ConnectorError::new(
            ErrorKind::Config,
            format!("certificate file {}: {e}", path.display()),
        )
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(&e))?;
    if certs.is_empty() {
        return Err(err(&"no PEM certificate in it"));
    }
    Ok(certs)
}

fn trust_anchors(opts: &TlsOptions) -> Result<RootCertStore, ConnectorError> {
    let mut roots = RootCertStore::empty();
    if let Some(path) = &opts.ca_file {
        for cert in read_certs(path)? {
            roots.add(cert).map_err(|e| {
                ConnectorError::new(
                    ErrorKind::Config,
                    format!(
                        "tls.ca_file {}: not a usable CA certificate: {e}",
                        path.display()
                    ),
                )
            })?;
        }
    } else {
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
        if roots.is_empty() {
            return Err(ConnectorError::new(
                ErrorKind::Config,
                "no trusted certificate authority: the system trust store is empty or \
                 unreadable; set tls.ca_file to the PEM file of the CA that signed the server's \
                 certificate",
            ));
        }
    }
    Ok(roots)
}

/// The verifier installed by `danger_accept_invalid_certs`: any certificate chain and name
/// pass; handshake signatures are still verified with the provider's algorithms.
#[derive(Debug)]
struct AcceptAnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The error kind of an LDAP result code (RFC 4511 appendix A, RFC 4533 for 4096).
///
/// busy, unavailable and unwillingToPerform are retryable ([`ErrorKind::Unavailable`]);
/// credentials and access problems are [`ErrorKind::Auth`].
pub fn result_code_kind(rc: u32) -> ErrorKind {
    match rc {
        3 => ErrorKind::Timeout,
        7 | 8 | 13 | 48 | 49 | 50 => ErrorKind::Auth,
        12 => ErrorKind::Unsupported,
        2 => ErrorKind::Protocol,
        16 => ErrorKind::NoSuchValue,
        20 => ErrorKind::ValueExists,
        17 | 18 | 19 | 21 | 34 | 64 | 65 | 66 | 67 | 69 => ErrorKind::Constraint,
        32 => ErrorKind::NotFound,
        51..=53 => ErrorKind::Unavailable,
        68 => ErrorKind::AlreadyExists,
        122 => ErrorKind::Conflict,
        4096 => ErrorKind::InvalidWatermark,
        _ => ErrorKind::Other,
    }
}

/// The error of an unsuccessful LDAP result, named after its code, with the server's text and
/// matched DN.
pub fn result_error(res: &LdapResult) -> ConnectorError {
    let mut msg = format!("the server answered {}", result_code_name(res.rc));
    if !res.text.is_empty() {
        msg.push_str(": ");
        msg.push_str(res.text.trim());
    }
    if !res.matched.is_empty() {
        msg.push_str(&format!(" (matched DN {:?})", res.matched));
    }
    ConnectorError::new(result_code_kind(res.rc), msg)
}

/// The name of an LDAP result code, with the number.
pub fn result_code_name(rc: u32) -> String {
    let name = match rc {
        0 => "success",
        1 => "operationsError",
        2 => "protocolError",
        3 => "timeLimitExceeded",
        4 => "sizeLimitExceeded",
        7 => "authMethodNotSupported",
        8 => "strongerAuthRequired",
        10 => "referral",
        11 => "adminLimitExceeded",
        12 => "unavailableCriticalExtension",
        13 => "confidentialityRequired",
        16 => "noSuchAttribute",
        17 => "undefinedAttributeType",
        18 => "inappropriateMatching",
        19 => "constraintViolation",
        20 => "attributeOrValueExists",
        21 => "invalidAttributeSyntax",
        32 => "noSuchObject",
        34 => "invalidDNSyntax",
        48 => "inappropriateAuthentication",
        49 => "invalidCredentials",
        50 => "insufficientAccessRights",
        51 => "busy",
        52 => "unavailable",
        53 => "unwillingToPerform",
        64 => "namingViolation",
        65 => "objectClassViolation",
        66 => "notAllowedOnNonLeaf",
        67 => "notAllowedOnRDN",
        68 => "entryAlreadyExists",
        69 => "objectClassModsProhibited",
        80 => "other",
        88 => "abandoned",
        122 => "assertionFailed",
        4096 => "e-syncRefreshRequired",
        _ => "an unknown result code",
    };
    format!("{name} ({rc})")
}

/// The one mapping of ldap3 errors onto connector errors.
///
/// A lost or refused connection is [`ErrorKind::Unavailable`] (retryable), a timeout
/// [`ErrorKind::Timeout`], an untrusted server certificate [`ErrorKind::Auth`] with a hint, an
/// unsuccessful result its code's kind ([`result_code_kind`]), a filter the parser refuses
/// [`ErrorKind::Config`].
pub fn map_ldap_error(e: LdapError) -> ConnectorError {
    match e {
        LdapError::LdapResult { result } => result_error(&result),
        LdapError::Io { source } => io_error(source),
        LdapError::Rustls { source } => tls_error(&source),
        LdapError::Timeout { .. } => ConnectorError::new(
            ErrorKind::Timeout,
            "the LDAP server did not answer in time (timeout)",
        ),
        LdapError::FilterParsing => ConnectorError::new(
            ErrorKind::Config,
            "the search filter is not a valid RFC 4515 filter (check parentheses, and escape \
             values with ldap3::ldap_escape)",
        ),
        e @ (LdapError::OpSend { .. }
        | LdapError::ResultRecv { .. }
        | LdapError::IdScrubSend { .. }
        | LdapError::MiscSend { .. }
        | LdapError::EndOfStream) => ConnectorError::new(
            ErrorKind::Unavailable,
            format!("the connection to the LDAP server was lost ({e})"),
        ),
        e @ (LdapError::UrlParsing { .. }
        | LdapError::UnknownScheme(_)
        | LdapError::DNSName { .. }
        | LdapError::EmptyUnixPath
        | LdapError::PortInUnixPath) => {
            ConnectorError::new(ErrorKind::Config, format!("LDAP url: {e}"))
        }
        other => ConnectorError::new(ErrorKind::Other, other.to_string()),
    }
}

pub(crate) fn io_error(e: io::Error) -> ConnectorError {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return tls_error(tls);
    }
    let kind = match e.kind() {
        io::ErrorKind::TimedOut => ErrorKind::Timeout,
        _ => ErrorKind::Unavailable,
    };
    ConnectorError::new(kind, format!("LDAP connection: {e}")).with_source(e)
}

fn tls_error(e: &rustls::Error) -> ConnectorError {
    let hint = match e {
        rustls::Error::InvalidCertificate(_) => {
            "the server's certificate is not trusted: set tls.ca_file to the CA that signed it \
             (and connect by a name or address the certificate lists)"
        }
        _ => "check the server's TLS setup",
    };
    ConnectorError::new(
        ErrorKind::Auth,
        format!("TLS handshake failed: {e}; {hint}"),
    )
}

/// Whether an error means the connection (not the request) failed, so that the same request on
/// a new connection may succeed.
pub(crate) fn is_connection_failure(e: &ConnectorError) -> bool {
    matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::Secret;

    fn result(rc: u32, text: &str) -> LdapResult {
        LdapResult {
            rc,
            matched: String::new(),
            text: text.into(),
            refs: vec![],
            ctrls: vec![],
        }
    }

    #[test]
    fn result_codes_map_to_kinds() {
        for (rc, kind) in [
            (68, ErrorKind::AlreadyExists),
            (32, ErrorKind::NotFound),
            (19, ErrorKind::Constraint),
            (65, ErrorKind::Constraint),
            (20, ErrorKind::ValueExists),
            (16, ErrorKind::NoSuchValue),
            (51, ErrorKind::Unavailable),
            (52, ErrorKind::Unavailable),
            (53, ErrorKind::Unavailable),
            (49, ErrorKind::Auth),
            (50, ErrorKind::Auth),
            (3, ErrorKind::Timeout),
            (4096, ErrorKind::InvalidWatermark),
            (80, ErrorKind::Other),
        ] {
            assert_eq!(result_code_kind(rc), kind, "rc {rc}");
        }
        let e = map_ldap_error(LdapError::LdapResult {
            result: result(49, "80090308: LdapErr: DSID-0C09044E"),
        });
        assert_eq!(e.kind(), ErrorKind::Auth);
        assert!(e.message().contains("invalidCredentials (49)"), "{e}");
        assert!(e.message().contains("DSID"), "{e}");
        assert!(map_ldap_error(LdapError::LdapResult {
            result: result(52, "")
        })
        .is_retryable());
    }

    #[test]
    fn transport_errors_map_to_kinds() {
        let e = map_ldap_error(LdapError::EndOfStream);
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(is_connection_failure(&e));
        let e = map_ldap_error(LdapError::Io {
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        });
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        let tls = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let e = map_ldap_error(LdapError::Io { source: tls });
        assert_eq!(e.kind(), ErrorKind::Auth);
        assert!(e.message().contains("tls.ca_file"), "{e}");
        assert!(!is_connection_failure(&e));
        assert_eq!(
            map_ldap_error(LdapError::FilterParsing).kind(),
            ErrorKind::Config
        );
    }

    #[tokio::test]
    async fn cleartext_simple_bind_is_refused_before_connecting() {
        // Port 9 on 127.0.0.1: nothing listens, but the refusal comes first anyway.
        let mut c = LdapConnection::new("ldap://127.0.0.1:9");
        c.bind = LdapBind::Simple {
            dn: "cn=admin".into(),
            password: Secret::new("pw"),
        };
        let e = connect(&c).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.message().contains("refusing a simple bind"), "{e}");
        assert!(!e.to_string().contains("pw\""), "{e}");
        c.bind = LdapBind::Simple {
            dn: "cn=admin".into(),
            password: Secret::new(""),
        };
        c.allow_cleartext_bind = true;
        assert_eq!(connect(&c).await.unwrap_err().kind(), ErrorKind::Config);
    }

    #[test]
    fn tls_config_needs_both_client_files_and_a_readable_ca() {
        let opts = TlsOptions {
            client_cert_file: Some("/nonexistent/cert.pem".into()),
            ..TlsOptions::default()
        };
        assert_eq!(tls_config(&opts).unwrap_err().kind(), ErrorKind::Config);
        let opts = TlsOptions {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsOptions::default()
        };
        let e = tls_config(&opts).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.message().contains("/nonexistent/ca.pem"), "{e}");
        let opts = TlsOptions {
            danger_accept_invalid_certs: true,
            ..TlsOptions::default()
        };
        assert!(tls_config(&opts).is_ok());
    }
}
