//! TLS for the PostgreSQL session: `sslmode` and `sslrootcert` taken out of
//! the URL, and the rustls verifiers that give them libpq's meaning.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

pub(super) struct TlsOptions {
    pub(super) mode: SslMode,
    pub(super) root_cert: Option<String>,
}

/// Take the TLS parameters tokio-postgres does not understand (`sslmode` beyond
/// disable/prefer/require, `sslrootcert`) out of the URL's query, so the rest
/// can be parsed by `tokio_postgres::Config`. Works on the raw text so that
/// multi-host URLs (`h1:5432,h2:5433`) keep working.
pub(super) fn split_tls_params(url: &str) -> Result<(String, TlsOptions), String> {
    let mut opts = TlsOptions { mode: SslMode::Prefer, root_cert: None };
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), opts));
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let value = || percent_decode(v);
        match k {
            "sslmode" => {
                opts.mode = match value().as_str() {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => return Err(format!("sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full")),
                }
            }
            "sslrootcert" => opts.root_cert = Some(value()),
            "sslcert" | "sslkey" | "sslpassword" => {
                return Err(format!("{k}: client certificates are not supported; use password or trust authentication"));
            }
            _ => kept.push(pair),
        }
    }
    let stripped = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
    Ok((stripped, opts))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The TLS side of a connection, built once per `connect`.
pub(super) struct TlsSetup {
    pub(super) mode: SslMode,
    pub(super) connector: Option<MakeRustlsConnect>,
}

impl TlsSetup {
    pub(super) fn new(opts: &TlsOptions) -> Result<Self, String> {
        if opts.mode == SslMode::Disable {
            return Ok(TlsSetup { mode: opts.mode, connector: None });
        }
        // An explicit provider: the workspace may also enable aws-lc-rs through
        // another crate, and then rustls cannot pick a default on its own.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder =
            ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().map_err(|e| format!("TLS setup: {e}"))?;
        // libpq semantics: `require` with an explicit root certificate verifies the chain.
        let mode = match (opts.mode, &opts.root_cert) {
            (SslMode::Require, Some(_)) => SslMode::VerifyCa,
            (m, _) => m,
        };
        let config = match mode {
            SslMode::Prefer | SslMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoCertificateCheck { algs: provider.signature_verification_algorithms }))
                .with_no_client_auth(),
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let roots = Arc::new(root_store(opts.root_cert.as_deref())?);
                let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone()).build().map_err(|e| format!("TLS setup: {e}"))?;
                if mode == SslMode::VerifyFull {
                    builder.with_webpki_verifier(inner).with_no_client_auth()
                } else {
                    builder.dangerous().with_custom_certificate_verifier(Arc::new(ChainOnly { inner })).with_no_client_auth()
                }
            }
            SslMode::Disable => unreachable!("handled above"),
        };
        Ok(TlsSetup { mode: opts.mode, connector: Some(MakeRustlsConnect::new(config)) })
    }

    pub(super) fn pg_mode(&self) -> PgSslMode {
        match self.mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        }
    }
}

/// Roots for verify-ca / verify-full: `sslrootcert` (a PEM file, or `system`
/// for the public web roots), else libpq's `~/.postgresql/root.crt`, else the
/// public web roots.
fn root_store(root_cert: Option<&str>) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    let default_file = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".postgresql/root.crt")).filter(|p| p.exists());
    let file = match root_cert {
        Some("system") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => default_file,
    };
    match file {
        Some(path) => {
            let pem = std::fs::read(&path).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                store.add(cert).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            }
            if store.is_empty() {
                return Err(format!("sslrootcert {}: no certificate found", path.display()));
            }
        }
        None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(store)
}

/// `sslmode=prefer/require` as libpq does them: encrypted, certificate not
/// checked. The handshake signatures are still verified, so the server does
/// hold the key of the certificate it shows.
#[derive(Debug)]
struct NoCertificateCheck {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NoCertificateCheck {
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the host name
/// is not checked.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_params_are_taken_out() {
        let (u, o) =
            split_tls_params("postgres://u:p@h1:5432,h2:5433/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem").unwrap();
        assert_eq!(u, "postgres://u:p@h1:5432,h2:5433/db?application_name=x");
        assert_eq!(o.mode, SslMode::VerifyFull);
        assert_eq!(o.root_cert.as_deref(), Some("/tmp/ca.pem"));
        let (u, o) = split_tls_params("postgres://h/db").unwrap();
        assert_eq!((u.as_str(), o.mode), ("postgres://h/db", SslMode::Prefer));
        assert!(split_tls_params("postgres://h/db?sslmode=bogus").is_err());
        assert_eq!(percent_decode("a%20b%2"), "a b%2");
    }
}
