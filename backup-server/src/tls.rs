//! Mutual TLS (rustls, ring provider).
//!
//! **Group binding.** An agent certificate names the protection group(s) it may
//! act for as subject-alternative-name URIs `pipecloud:group/<group>` (see
//! [`group_uri`]). A certificate without such a URI is refused even if it chains
//! to the CA. The `group` of an agent's hello must be one of its certificate's
//! groups; the server then only lets that connection touch that group's disks.
//! (The CN `agent.<group>` written by `backup-server certs` is informational.)
//!
//! The server verifies client certificates with rustls' `WebPkiClientVerifier`
//! against the configured CA; anonymous clients are refused during the handshake.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

/// URI prefix of the group binding.
pub const GROUP_URI_PREFIX: &str = "pipecloud:group/";

/// The SAN URI that binds a certificate to `group`.
pub fn group_uri(group: &str) -> String {
    format!("{GROUP_URI_PREFIX}{group}")
}

/// TLS setup errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {message}")]
    Pem { path: String, message: String },
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |message: String| TlsError::Pem {
        path: path.display().to_string(),
        message,
    };
    let f = std::fs::File::open(path).map_err(|e| pem_err(e.to_string()))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(f))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no certificate found".into()));
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem_err = |message: String| TlsError::Pem {
        path: path.display().to_string(),
        message,
    };
    let f = std::fs::File::open(path).map_err(|e| pem_err(e.to_string()))?;
    rustls_pemfile::private_key(&mut BufReader::new(f))
        .map_err(|e| pem_err(e.to_string()))?
        .ok_or_else(|| pem_err("no private key found".into()))
}

fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .map_err(|e| TlsError::Rustls(format!("CA {}: {e}", ca.display())))?;
    }
    Ok(roots)
}

/// Server config: requires a client certificate chaining to `ca`.
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
        .build()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// Client config for an agent (or the test client): trusts `ca`, presents `cert`/`key`.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// Parses a server name for a client connection.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string())
        .map_err(|e| TlsError::Rustls(format!("server name {name:?}: {e}")))
}

/// The protection groups a (verified) end-entity certificate is bound to.
pub fn cert_groups(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return Vec::new();
    };
    ee.valid_uri_names()
        .filter_map(|u| u.strip_prefix(GROUP_URI_PREFIX))
        .map(str::to_string)
        .collect()
}
