//! Server configuration (TOML).
//!
//! ```toml
//! listen = "0.0.0.0:7070"          # agents connect here (mutual TLS)
//! data_dir = "data"                # journal, volumes, control socket, lock
//! metrics = "127.0.0.1:9700"       # optional: Prometheus /metrics over HTTP (alias
//!                                  # metrics_listen; `serve --metrics-listen` overrides)
//!
//! [tls]
//! ca = "ca.pem"                    # CA that signs agent certificates
//! cert = "server.pem"              # server certificate chain
//! key = "server.key"               # server private key
//!
//! [limits]
//! segment_bytes = 67108864         # roll journal segments at this size
//! max_journal_bytes = 4294967296   # per group; see README "At the bounds"
//! retention_secs = 3600            # point-in-time window kept in the journal
//! max_connections = 256            # concurrent agent connections
//! ```
//!
//! Relative paths are resolved against the directory of the config file.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML or misses / mistypes a field.
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is out of its allowed range.
    #[error("invalid config {path}: {message}")]
    Value { path: PathBuf, message: String },
}

/// TLS material paths.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA whose certificates agents must present.
    pub ca: PathBuf,
    /// PEM certificate chain of this server.
    pub cert: PathBuf,
    /// PEM private key of this server.
    pub key: PathBuf,
}

/// Bounds on resources (all per group unless noted).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// A journal segment is closed and a new one started once it reaches this size.
    pub segment_bytes: u64,
    /// Journal bytes a group may hold. At the bound the applier moves the oldest
    /// restorable point forward (shrinking the point-in-time window); if that frees
    /// nothing, new writes are no longer read from the agents (backpressure) except
    /// writes some journaled write depends on.
    pub max_journal_bytes: u64,
    /// Seconds of history kept for point-in-time restore.
    pub retention_secs: u64,
    /// Concurrent agent connections (server-wide); more are refused at accept.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            segment_bytes: 64 << 20,
            max_journal_bytes: 4 << 30,
            retention_secs: 3600,
            max_connections: 256,
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address agents connect to.
    pub listen: SocketAddr,
    /// Directory holding the journal, volumes, the control socket and the lock.
    pub data_dir: PathBuf,
    /// Address of the Prometheus metrics endpoint (none when absent; also
    /// accepted as `metrics_listen`, the agent's name for it; `serve
    /// --metrics-listen` overrides it).
    #[serde(default, alias = "metrics_listen")]
    pub metrics: Option<SocketAddr>,
    /// TLS material.
    pub tls: TlsConfig,
    /// Resource bounds.
    #[serde(default)]
    pub limits: Limits,
}

/// Smallest allowed segment size (a segment must hold at least one maximal record).
pub const MIN_SEGMENT_BYTES: u64 = 2 << 20;

impl Config {
    /// Reads and validates a config file; relative paths are resolved against its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve(base);
        cfg.validate().map_err(|message| ConfigError::Value {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    fn resolve(&mut self, base: &Path) {
        for p in [
            &mut self.data_dir,
            &mut self.tls.ca,
            &mut self.tls.cert,
            &mut self.tls.key,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Range checks on the limits.
    pub fn validate(&self) -> Result<(), String> {
        let l = &self.limits;
        if l.segment_bytes < MIN_SEGMENT_BYTES {
            return Err(format!(
                "limits.segment_bytes = {} is below the minimum {MIN_SEGMENT_BYTES}",
                l.segment_bytes
            ));
        }
        if l.max_journal_bytes < 2 * l.segment_bytes {
            return Err(format!(
                "limits.max_journal_bytes = {} must be at least twice limits.segment_bytes = {}",
                l.max_journal_bytes, l.segment_bytes
            ));
        }
        if l.max_connections == 0 {
            return Err("limits.max_connections must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "listen = \"127.0.0.1:7070\"\ndata_dir = \"d\"\n[tls]\nca=\"ca.pem\"\ncert=\"/abs/s.pem\"\nkey=\"k\"\n[limits]\nretention_secs = 5\n",
        )
        .unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.data_dir, dir.path().join("d"));
        assert_eq!(c.tls.cert, PathBuf::from("/abs/s.pem"));
        assert_eq!(c.limits.retention_secs, 5);
        assert_eq!(c.limits.segment_bytes, 64 << 20);
        assert_eq!(c.metrics, None);
        // The metrics endpoint, under its own name or the agent's.
        for key in ["metrics", "metrics_listen"] {
            std::fs::write(
                &p,
                format!("listen = \"127.0.0.1:7070\"\ndata_dir = \"d\"\n{key} = \"127.0.0.1:9700\"\n[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n"),
            )
            .unwrap();
            let c = Config::load(&p).unwrap();
            assert_eq!(c.metrics, Some("127.0.0.1:9700".parse().unwrap()), "{key}");
        }
        std::fs::write(&p, "listen = \"x\"\n").unwrap();
        assert!(matches!(Config::load(&p), Err(ConfigError::Parse { .. })));
    }
}
