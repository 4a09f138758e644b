//! Mutual-TLS client configuration of the replication stream.
//!
//! The agent authenticates the backup server against a private CA and presents
//! its own certificate (which the backup binds to the agent's protection group).
//! rustls with the ring provider; TLS 1.2 and 1.3 with rustls' safe defaults.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Paths of the PEM files of the replication stream's mutual TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate(s) that sign the backup server's certificate.
    pub ca: PathBuf,
    /// This agent's certificate chain (leaf first).
    pub cert: PathBuf,
    /// This agent's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why the TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be opened or parsed.
    #[error("reading {what} from {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A PEM file holds no item of the expected kind.
    #[error("{path} contains no {what}")]
    Empty { what: &'static str, path: PathBuf },
    /// rustls refused the certificates or the key.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The configured server name is not a valid DNS name or IP address.
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
}

fn open(path: &Path, what: &'static str) -> Result<BufReader<File>, TlsError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        })
}

/// Reads every certificate of a PEM file (at least one).
pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let mut rd = open(path, what)?;
    let certs = rustls_pemfile::certs(&mut rd)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    const WHAT: &str = "private key";
    let mut rd = open(path, WHAT)?;
    rustls_pemfile::private_key(&mut rd)
        .map_err(|source| TlsError::Read {
            what: WHAT,
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::Empty {
            what: WHAT,
            path: path.to_owned(),
        })
}

/// Builds the client configuration: server verified against `files.ca`, client
/// certificate `files.cert` with key `files.key`.
pub fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in load_certs(&files.ca, "CA certificate")? {
        roots.add(ca)?;
    }
    let chain = load_certs(&files.cert, "client certificate")?;
    let key = load_key(&files.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// Parses the name the server certificate must carry (DNS name or IP address).
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_owned()).map_err(|_| TlsError::ServerName(name.to_owned()))
}
