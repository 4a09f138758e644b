//! NBD server (fixed newstyle) serving protected disks.
//!
//! [`NbdServer`] is generic over [`BlockBackend`]: it serves any number of named exports
//! (one per protected disk, keyed by disk name) on unix and TCP sockets. QEMU attaches
//! them with its built-in NBD client; containers through `nbdfuse` + a loop device.
//!
//! # Protocol subset
//! - Handshake: fixed newstyle with `NBD_FLAG_NO_ZEROES` (no oldstyle). Options:
//!   `NBD_OPT_GO`/`NBD_OPT_INFO` (export by name; the empty name is the default export
//!   when exactly one export exists), `NBD_OPT_EXPORT_NAME`, `NBD_OPT_LIST`,
//!   `NBD_OPT_ABORT`. Every other option (structured replies, TLS, metadata contexts,
//!   extended headers) is answered `NBD_REP_ERR_UNSUP`, so only simple replies are used.
//! - Transmission flags: `HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM |
//!   SEND_WRITE_ZEROES | CAN_MULTI_CONN`. Commands: READ, WRITE, FLUSH, TRIM,
//!   WRITE_ZEROES, DISC; `NBD_CMD_FLAG_FUA` on any command, `NO_HOLE` on WRITE_ZEROES.
//! - Bad requests (see [`proto::validate_request`]) get `EINVAL`/`ENOSPC` replies and the
//!   connection carries on; a bad magic, an oversized WRITE (> 32 MiB) or oversized option
//!   data close the connection. Backend errors become error replies (`EIO`, `ENOSPC`, ...),
//!   never a disconnect. Other connections are unaffected in every case.
//!
//! # Multi-conn (why `NBD_FLAG_CAN_MULTI_CONN` is honest)
//! The spec requires that a FLUSH (or FUA) reply on any connection cover every write that
//! had been *replied to* on any connection of the export. All connections of an export
//! share one `Arc<B>`, and a reply to a WRITE/TRIM/WRITE_ZEROES is sent only after the
//! backend call returned, so those writes are in the backend's shared state before the
//! client could send the FLUSH. FLUSH calls [`BlockBackend::flush`], whose contract is to
//! make every *completed* write durable whichever connection issued it. The server keeps
//! no per-connection cache, so nothing can escape the flush. For
//! [`crate::image::LocalImage`] the shared state is the one open file: completed writes
//! are in the inode's page cache and `fdatasync` on that file covers all of them.
//!
//! # Bounds
//! - connections per server: [`NbdConfig::max_connections`]; beyond it new connections
//!   are accepted and closed at once (logged);
//! - option phase: [`NbdConfig::handshake_timeout`], at most [`NbdConfig::max_options`]
//!   options, option data <= [`proto::MAX_OPTION_DATA`];
//! - per connection: [`NbdConfig::max_in_flight`] requests and
//!   [`NbdConfig::max_in_flight_bytes`] of payload in flight; at either bound the
//!   connection stops reading until a request completes (see `conn.rs`).
//!
//! Shutdown ([`ServerHandle::shutdown`]) stops accepting, lets each connection finish its
//! in-flight requests, then closes it.

mod conn;
pub mod proto;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::block::BlockBackend;

/// Limits of one server (see the module docs for behaviour at each bound).
#[derive(Debug, Clone)]
pub struct NbdConfig {
    /// Simultaneous connections (all exports together).
    pub max_connections: usize,
    /// Requests in flight per connection.
    pub max_in_flight: usize,
    /// READ/WRITE payload bytes in flight per connection (raised to at least 32 MiB).
    pub max_in_flight_bytes: u32,
    /// Time allowed from accept to the end of option haggling.
    pub handshake_timeout: Duration,
    /// Options a client may send before choosing an export.
    pub max_options: u32,
}

impl Default for NbdConfig {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_in_flight: 64,
            max_in_flight_bytes: 128 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(30),
            max_options: 64,
        }
    }
}

/// Errors of the server API.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// An export of that name exists already.
    #[error("export {0:?} already exists")]
    DuplicateExport(String),
    /// The name cannot be an NBD export name.
    #[error("invalid export name {name:?}: {reason}")]
    InvalidExportName {
        /// The rejected name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// Binding or preparing a socket failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

/// The export table shared by the server and its connections.
pub(crate) struct Exports<B> {
    map: RwLock<BTreeMap<String, Arc<B>>>,
}

impl<B: BlockBackend> proto::ExportCatalog for Exports<B> {
    type Handle = Arc<B>;

    fn resolve(&self, name: &str) -> Option<(String, proto::ExportInfo, Arc<B>)> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let (name, backend) = if name.is_empty() && map.len() == 1 {
            map.iter().next()?
        } else {
            map.get_key_value(name)?
        };
        let info = proto::ExportInfo {
            size: backend.size(),
            flags: proto::SERVER_TRANSMISSION_FLAGS,
        };
        Some((name.clone(), info, Arc::clone(backend)))
    }

    fn names(&self) -> Vec<String> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.keys().cloned().collect()
    }
}

/// An NBD server over backends of type `B`. Cheap to clone (shared export table).
pub struct NbdServer<B> {
    exports: Arc<Exports<B>>,
    config: NbdConfig,
}

impl<B> Clone for NbdServer<B> {
    fn clone(&self) -> Self {
        Self {
            exports: Arc::clone(&self.exports),
            config: self.config.clone(),
        }
    }
}

impl<B: BlockBackend> Default for NbdServer<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: BlockBackend> NbdServer<B> {
    /// A server with default limits and no exports.
    pub fn new() -> Self {
        Self::with_config(NbdConfig::default())
    }

    /// A server with the given limits.
    pub fn with_config(mut config: NbdConfig) -> Self {
        config.max_connections = config.max_connections.max(1);
        config.max_in_flight = config.max_in_flight.max(1);
        config.max_in_flight_bytes = config.max_in_flight_bytes.max(proto::MAX_PAYLOAD);
        config.max_options = config.max_options.max(1);
        Self {
            exports: Arc::new(Exports {
                map: RwLock::new(BTreeMap::new()),
            }),
            config,
        }
    }

    /// Adds an export (a disk) under `name`. Connections may choose it from now on.
    pub fn add_export(&self, name: String, backend: Arc<B>) -> Result<(), NbdError> {
        if name.is_empty() {
            return Err(NbdError::InvalidExportName {
                name,
                reason: "empty",
            });
        }
        if let Err(e) = proto::parse_name(name.as_bytes()) {
            return Err(NbdError::InvalidExportName { name, reason: e.0 });
        }
        let mut map = self.exports.map.write().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(&name) {
            return Err(NbdError::DuplicateExport(name));
        }
        map.insert(name, backend);
        Ok(())
    }

    /// Removes an export: new connections cannot choose it; connections already serving
    /// it keep their reference until they close.
    pub fn remove_export(&self, name: &str) -> Option<Arc<B>> {
        self.exports
            .map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }

    /// Names of the current exports.
    pub fn export_names(&self) -> Vec<String> {
        proto::ExportCatalog::names(&*self.exports)
    }

    /// Listens on a unix socket at `path` (a stale socket file nobody listens on is
    /// replaced). The socket file is removed on shutdown.
    pub async fn serve_unix(&self, path: impl AsRef<Path>) -> Result<ServerHandle, NbdError> {
        let path = path.as_ref().to_path_buf();
        let listener = bind_unix(&path)?;
        info!(socket = %path.display(), "nbd: listening");
        let endpoint = Endpoint::Unix(path);
        Ok(self.spawn_accept(Listener::Unix(listener), endpoint))
    }

    /// Listens on a TCP address (port 0 picks a free port; see [`ServerHandle::endpoint`]).
    pub async fn serve_tcp(&self, addr: SocketAddr) -> Result<ServerHandle, NbdError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| NbdError::Io {
                context: format!("binding NBD TCP listener on {addr}"),
                source,
            })?;
        let local = listener.local_addr().map_err(|source| NbdError::Io {
            context: "reading NBD listener address".into(),
            source,
        })?;
        info!(%local, "nbd: listening");
        Ok(self.spawn_accept(Listener::Tcp(listener), Endpoint::Tcp(local)))
    }

    fn spawn_accept(&self, listener: Listener, endpoint: Endpoint) -> ServerHandle {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            listener,
            Arc::clone(&self.exports),
            self.config.clone(),
            shutdown_rx,
            endpoint.clone(),
        ));
        ServerHandle {
            endpoint,
            shutdown: shutdown_tx,
            task: Some(task),
        }
    }
}

fn bind_unix(path: &Path) -> Result<UnixListener, NbdError> {
    let err = |source| NbdError::Io {
        context: format!("binding NBD socket {}", path.display()),
        source,
    };
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            // Replace the file only if nobody is listening on it.
            match std::os::unix::net::UnixStream::connect(path) {
                Err(c) if c.kind() == std::io::ErrorKind::ConnectionRefused => {
                    warn!(socket = %path.display(), "nbd: replacing stale socket file");
                    std::fs::remove_file(path).map_err(err)?;
                    UnixListener::bind(path).map_err(err)
                }
                _ => Err(err(e)),
            }
        }
        Err(e) => Err(err(e)),
    }
}

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

/// A running listener. Dropping it also shuts the listener down (without waiting).
pub struct ServerHandle {
    endpoint: Endpoint,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// Where the server listens.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The NBD URI of `export` on this listener (for `nbdinfo`, `nbdcopy`, `qemu-io`).
    pub fn uri(&self, export: &str) -> String {
        match &self.endpoint {
            Endpoint::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
            Endpoint::Tcp(a) => format!("nbd://{a}/{export}"),
        }
    }

    /// Stops accepting, lets every connection finish its in-flight requests, closes them
    /// and waits until all are gone.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<(BoxRead, BoxWrite, String)> {
        match self {
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                let (r, w) = s.into_split();
                Ok((Box::new(r), Box::new(w), "unix".into()))
            }
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                let (r, w) = s.into_split();
                Ok((Box::new(r), Box::new(w), peer.to_string()))
            }
        }
    }
}

async fn accept_loop<B: BlockBackend>(
    listener: Listener,
    exports: Arc<Exports<B>>,
    config: NbdConfig,
    mut shutdown: watch::Receiver<bool>,
    endpoint: Endpoint,
) {
    static NEXT_CONN: AtomicU64 = AtomicU64::new(1);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = conn::wait_shutdown(&mut shutdown) => break,
            a = listener.accept() => a,
        };
        let (rd, wr, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("nbd: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            warn!(%peer, max = config.max_connections, "nbd: connection limit reached, closing new connection");
            continue;
        };
        let conn_id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        let (exports, config, shutdown) = (Arc::clone(&exports), config.clone(), shutdown.clone());
        conns.spawn(async move {
            debug!(conn_id, %peer, "nbd: connection accepted");
            match conn::serve(rd, wr, exports, config, shutdown, conn_id).await {
                Ok(end) => debug!(conn_id, ?end, "nbd: connection closed"),
                Err(e) => warn!(conn_id, %peer, "nbd: connection closed: {e}"),
            }
            drop(slot);
        });
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
    if let Endpoint::Unix(path) = &endpoint {
        let _ = std::fs::remove_file(path);
    }
    info!(?endpoint, "nbd: listener stopped");
}

#[cfg(test)]
mod tests;
