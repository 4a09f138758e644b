//! The running server: wires the store, the journal thread, the applier thread,
//! the agent listener, the control socket and the metrics endpoint together.
//!
//! Threads: one tokio runtime (2 workers) for the network, the journal thread
//! ([`crate::ingest`]) and the applier thread ([`applier`]).
//!
//! **Applier.** Every [`APPLY_INTERVAL`] it moves each group's base volumes to the
//! largest causally closed cut of the writes received more than `retention_secs`
//! ago (so everything newer stays restorable from the journal). When a group's
//! journal exceeds 90 % of `max_journal_bytes`, it applies up to the largest closed
//! cut of everything journaled instead (the oldest restorable point moves forward;
//! logged as a warning) so whole segments can be deleted.

use crate::config::Config;
use crate::control::{self, Reply, Request};
use crate::ingest::{self, Req, INGEST_QUEUE};
use crate::metrics::Metrics;
use crate::server::{accept_loop, ServerCtx};
use crate::store::{lock, now_ms, Group, Store};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

/// Period of the applier.
pub const APPLY_INTERVAL: Duration = Duration::from_millis(200);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DaemonError(pub String);

/// A started server.
pub struct Daemon {
    /// Address agents connect to.
    pub addr: SocketAddr,
    /// Metrics address, if configured.
    pub metrics_addr: Option<SocketAddr>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Arc<AtomicBool>,
}

impl Daemon {
    /// Opens the store (recovery), then starts every component.
    pub fn start(cfg: &Config) -> Result<Daemon, DaemonError> {
        let err = |e: &dyn std::fmt::Display| DaemonError(e.to_string());
        let tls = crate::tls::server_config(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)
            .map_err(|e| err(&e))?;
        let t0 = std::time::Instant::now();
        let (store, rep) = Store::open(&cfg.data_dir, cfg.limits.clone()).map_err(|e| err(&e))?;
        info!(
            groups = rep.groups,
            records = rep.records,
            torn_bytes = rep.torn_bytes,
            ms = t0.elapsed().as_millis() as u64,
            "recovery done"
        );
        let store = Arc::new(store);
        let metrics = Arc::new(Metrics::default());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("backup-net")
            .build()
            .map_err(|e| err(&e))?;
        let (tx, rx) = mpsc::channel::<Req>(INGEST_QUEUE);
        {
            let store = store.clone();
            let metrics = metrics.clone();
            std::thread::Builder::new()
                .name("backup-journal".into())
                .spawn(move || ingest::run(store, rx, metrics))
                .map_err(|e| err(&e))?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        {
            let store = store.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("backup-applier".into())
                .spawn(move || applier(store, stop))
                .map_err(|e| err(&e))?;
        }
        let listener = runtime
            .block_on(TcpListener::bind(cfg.listen))
            .map_err(|e| DaemonError(format!("listen on {}: {e}", cfg.listen)))?;
        let addr = listener.local_addr().map_err(|e| err(&e))?;
        let ctx = Arc::new(ServerCtx::new(
            store.clone(),
            tx.clone(),
            metrics.clone(),
            tokio_rustls::TlsAcceptor::from(tls),
        ));
        runtime.spawn(accept_loop(listener, ctx));
        let sock = control::socket_path(&cfg.data_dir);
        let _ = std::fs::remove_file(&sock); // stale: we hold the data dir lock
        let ul = {
            let _guard = runtime.enter();
            UnixListener::bind(&sock)
                .map_err(|e| DaemonError(format!("control socket {}: {e}", sock.display())))?
        };
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| err(&e))?;
        }
        runtime.spawn(control_loop(ul, store.clone(), tx));
        let mut metrics_addr = None;
        if let Some(ma) = cfg.metrics {
            let ml = runtime
                .block_on(TcpListener::bind(ma))
                .map_err(|e| DaemonError(format!("metrics listen on {ma}: {e}")))?;
            metrics_addr = ml.local_addr().ok();
            runtime.spawn(crate::metrics::serve(ml, metrics.clone(), store.clone()));
        }
        info!(%addr, data_dir = %cfg.data_dir.display(), uid = unsafe_uid(), "backup-server serving");
        Ok(Daemon {
            addr,
            metrics_addr,
            store,
            metrics,
            runtime: Some(runtime),
            stop,
        })
    }

    /// Blocks until SIGINT or SIGTERM.
    pub fn wait_for_signal(&self) {
        if let Some(rt) = &self.runtime {
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                match (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) {
                    (Ok(mut i), Ok(mut t)) => {
                        tokio::select! { _ = i.recv() => {}, _ = t.recv() => {} }
                    }
                    _ => std::future::pending::<()>().await,
                }
            });
        }
        info!("signal received; stopping (the journal is durable, nothing to flush)");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

fn unsafe_uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

/// The applier thread (see module docs).
fn applier(store: Arc<Store>, stop: Arc<AtomicBool>) {
    let mut failing: std::collections::HashMap<String, String> = Default::default();
    while !stop.load(Ordering::Relaxed) {
        for g in store.groups() {
            match apply_step(&store, &g) {
                Ok(()) => {
                    failing.remove(&g.name);
                }
                Err(e) => {
                    if failing.get(&g.name) != Some(&e) {
                        error!(group = %g.name, error = %e, "applier failed (will retry)");
                        failing.insert(g.name.clone(), e);
                    }
                }
            }
        }
        std::thread::sleep(APPLY_INTERVAL);
    }
}

fn apply_step(store: &Store, g: &Group) -> Result<(), String> {
    let retention_ms = store.limits.retention_secs.saturating_mul(1000);
    let bytes = g.journal_bytes.load(Ordering::Relaxed);
    let pressure = bytes > store.limits.max_journal_bytes / 10 * 9;
    let (target, applied) = {
        let st = lock(&g.state);
        let t = if pressure {
            st.durable_cut()
        } else {
            st.cut_at_time(now_ms().saturating_sub(retention_ms))
        };
        (t, st.meta.applied)
    };
    if target == applied {
        return Ok(());
    }
    if pressure {
        warn!(group = %g.name, bytes, max = store.limits.max_journal_bytes, cut = %target,
            "journal near its bound: applying beyond the retention window; the oldest restorable point moves forward");
    }
    g.apply_to(target)
}

async fn control_loop(ul: UnixListener, store: Arc<Store>, ingest: mpsc::Sender<Req>) {
    loop {
        let Ok((s, _)) = ul.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let store = store.clone();
        let ingest = ingest.clone();
        tokio::spawn(async move {
            let Ok(std_s) = s.into_std() else { return };
            let _ = std_s.set_nonblocking(false);
            let handle = tokio::runtime::Handle::current();
            let _ = tokio::task::spawn_blocking(move || control_conn(std_s, store, ingest, handle))
                .await;
        });
    }
}

fn control_conn(
    mut s: std::os::unix::net::UnixStream,
    store: Arc<Store>,
    ingest: mpsc::Sender<Req>,
    rt: tokio::runtime::Handle,
) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let req: Request = match control::read_msg(&mut s) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "bad control request");
            return;
        }
    };
    let _ = s.set_read_timeout(None);
    info!(?req, "control request");
    let mut out = s.try_clone().ok();
    let mut last = std::time::Instant::now();
    let mut progress = |done: u64, total: u64| {
        if last.elapsed() >= Duration::from_millis(100) || done == total {
            last = std::time::Instant::now();
            if let Some(o) = out.as_mut() {
                let _ = control::write_msg(o, &Reply::Progress { done, total });
            }
        }
    };
    let reply = match req {
        Request::Status => Reply::Status(control::status(&store)),
        Request::Failover { group, out } => {
            let fence = |g: &Arc<Group>| -> Result<(), String> {
                let (tx, rx) = oneshot::channel();
                rt.block_on(async {
                    ingest
                        .send(Req::Fence {
                            group: g.clone(),
                            reply: tx,
                        })
                        .await
                        .map_err(|_| "journal thread gone".to_string())?;
                    rx.await.map_err(|_| "journal thread gone".to_string())?
                })
            };
            match control::failover(&store, &group, &out, &fence, &mut progress) {
                Ok(m) => {
                    info!(group = %m.group, cut = %m.cut, ms = m.elapsed.as_millis() as u64, "failover images written");
                    Reply::Done(m)
                }
                Err(e) => {
                    error!(group = %group, error = %e, "failover failed");
                    Reply::Error(e)
                }
            }
        }
        Request::Restore { group, at, out } => {
            match control::restore(&store, &group, &at, &out, &mut progress) {
                Ok(m) => {
                    info!(group = %m.group, cut = %m.cut, "restore images written");
                    Reply::Done(m)
                }
                Err(e) => {
                    warn!(group = %group, error = %e, "restore failed");
                    Reply::Error(e)
                }
            }
        }
        Request::Unfence { group } => match store.group(&group) {
            Some(g) => match g.unfence() {
                Ok(()) => Reply::Ok(format!("group {group} unfenced")),
                Err(e) => Reply::Error(e.to_string()),
            },
            None => Reply::Error(format!("no group named {group:?}")),
        },
    };
    let _ = control::write_msg(&mut s, &reply);
}
