//! Control interface of the agent: a unix socket answering one-line requests.
//!
//! Requests (one line each, the connection is closed after the answer):
//!
//! - `status`: one table row per replicated disk (group, disk, writer, mode,
//!   written and acked seq, lag in writes, in-flight bytes and writes, age of the
//!   oldest unacked write of the disk's writer (`OLDEST_MS`: a disk's writes are
//!   committed in its writer's order, so that write holds the disk's replies), the
//!   worst lag seen (most unacked writes at once, and the longest a write waited for
//!   the backup's ack: `PEAK_LAG`, `PEAK_MS`), the time since the backup was last
//!   heard from (`HEARD_MS`, any frame; `-` if never), connection state
//!   (`CONNECTED`: `yes`, `no`, or `late` when a session's backup has been silent
//!   for more than two heartbeat intervals, before the heartbeat timeout drops
//!   the session) and the degraded flag) followed by one summary line per group
//!   and, where the agent runs the group's network path, one line of its counters
//!   (tagged, merged, held, released, drops, driver sleeps and busy-poll time).
//!   A `hold` line per group with a network path gives the hold breakdown of
//!   released client-bound packets since the agent started (p50/p99 of the hold
//!   time and of its parts, `crate::netpath::HoldBreakdown`).
//! - `status reset-peaks`: the same, then starts the worst-lag figures afresh
//!   (peaks are kept from the agent's start until such a reset).
//! - `hold`: the hold breakdown's histograms, machine-readable, one line per
//!   group with a network path: `GROUP name=SUM;BUCKET:COUNT,... ...`
//!   ([`crate::netpath::HoldSnapshot::to_line`]); the harness diffs two of them.
//! - `tails`: the last tail episodes of held replies (holds beyond one round
//!   trip plus 25 ms, `crate::netpath::TailRing`), one line per episode:
//!   `GROUP name=value ...` ([`crate::netpath::TailEvent::to_line`]).
//! - `mode MODE [GROUP]`: switches the mode (`async`, `sync`, `pipelined`) of
//!   `GROUP` (may be omitted when the agent serves a single group) at run time.
//!   Guest I/O keeps flowing: see [`ModeSwitch`].
//! - `attach [GROUP]`: ends a detached agent's detached state (`pipecloud agent
//!   --detached`, docs/design.md §15): replication to the topology's backup
//!   starts (a fresh session of this run's generation); answers once the
//!   backup's welcome arrived, or says it has not within [`ATTACH_WELCOME_WAIT`]
//!   (the session keeps trying; `status` shows it). While detached, the group's
//!   summary line says `protection=DETACHED` and is preceded by a warning line.
//!
//! Answers start with a line `ok` or `error: <reason>`; the rest is the payload.
//! The socket is created with mode 0600 (the agent runs as root; so must `ctl`).
//!
//! Bounds: at most [`MAX_CONNECTIONS`] requests are served at once (more are
//! answered `error: busy`), a request line is at most [`MAX_REQUEST_LEN`] bytes
//! and must arrive within [`REQUEST_TIMEOUT`].
//!
//! The CLI (`pipecloud ctl ...`) calls the blocking client functions [`request`],
//! [`status`] and [`set_mode`].

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::netpath::NetPathMetrics;
use crate::replication::{Mode, ModeSwitch, ReplicationClient, ReplicationStatus};

/// Requests served concurrently; more are refused with `error: busy`.
pub const MAX_CONNECTIONS: usize = 16;
/// Longest request line in bytes.
pub const MAX_REQUEST_LEN: usize = 4096;
/// Time a client has to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer the client function accepts.
pub const MAX_ANSWER_LEN: u64 = 4 << 20;

/// Errors of the control interface.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Socket setup or I/O failed.
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// Another agent already answers on the socket.
    #[error("control socket {0} is in use by a running agent")]
    InUse(PathBuf),
    /// The path exists and is not a socket (refusing to remove it).
    #[error("control socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// The agent answered with an error.
    #[error("agent: {0}")]
    Remote(String),
    /// The agent's answer is not in the expected format.
    #[error("malformed answer from the agent: {0:?}")]
    Malformed(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CtlError + '_ {
    move |source| CtlError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One protection group as seen by the control interface.
#[derive(Clone)]
pub struct ControlGroup {
    /// The group's replication client (its status).
    pub client: Arc<ReplicationClient>,
    /// The group's mode.
    pub mode: ModeSwitch,
    /// The group's network path on this host, if it runs one.
    pub net: Option<Arc<NetPathMetrics>>,
}

/// What the control interface can see and change: the agent's groups.
#[derive(Clone, Default)]
pub struct Control {
    groups: Vec<ControlGroup>,
    /// One status line per checkpoint-mode group (its epoch loop, alarms first).
    epochs: Vec<EpochStatusFn>,
    /// The group's lease on etcd, when the topology has `[quorum]`.
    lease: Option<(String, Arc<pipecloud_quorum::LeaseKeeper>)>,
    /// Per group: how to switch it into or out of `checkpoint` at run time, or
    /// why it cannot be (docs/design.md §13).
    checkpoint: Vec<(String, Result<CheckpointSwitchFn, String>)>,
}

/// Asks a group's epoch loop for a run-time switch to a mode (into or out of
/// `checkpoint`); answers what will happen or why not.
pub type CheckpointSwitchFn = Arc<dyn Fn(Mode) -> Result<String, String> + Send + Sync>;

/// The group name and status of a group's epoch loop (`None` once it is gone).
pub type EpochStatusFn =
    Arc<dyn Fn() -> Option<(String, crate::fullstate::driver::DriverStatus)> + Send + Sync>;

impl Control {
    /// A control interface over `groups`.
    pub fn new(groups: Vec<ControlGroup>) -> Self {
        Control {
            groups,
            epochs: Vec::new(),
            lease: None,
            checkpoint: Vec::new(),
        }
    }

    /// How `group` switches into and out of `checkpoint` at run time (`Err`: why
    /// it cannot, shown to whoever asks).
    pub fn with_checkpoint_switch(
        mut self,
        group: &str,
        switch: Result<CheckpointSwitchFn, String>,
    ) -> Self {
        self.checkpoint.push((group.to_owned(), switch));
        self
    }

    /// Adds the status line of a checkpoint group's epoch loop to `status`.
    pub fn with_epochs(mut self, status: EpochStatusFn) -> Self {
        self.epochs.push(status);
        self
    }

    /// Also shows group `group`'s lease (role, generation, time left).
    pub fn with_lease(mut self, group: &str, keeper: Arc<pipecloud_quorum::LeaseKeeper>) -> Self {
        self.lease = Some((group.to_owned(), keeper));
        self
    }

    /// The lease status, when the agent keeps one.
    pub fn lease(&self) -> Option<(&str, pipecloud_quorum::LeaseStatus)> {
        self.lease.as_ref().map(|(g, k)| (g.as_str(), k.status()))
    }

    /// The status of every group's epoch loop (checkpoint-capable groups).
    pub fn epochs(&self) -> Vec<(String, crate::fullstate::driver::DriverStatus)> {
        self.epochs.iter().filter_map(|e| e()).collect()
    }

    /// The groups it serves.
    pub fn groups(&self) -> &[ControlGroup] {
        &self.groups
    }

    /// Answers one request line, including those that wait (`attach`).
    pub async fn handle_async(&self, line: &str) -> String {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("attach"), group, None) => match self.attach(group).await {
                Ok(msg) => format!("ok\n{msg}\n"),
                Err(e) => format!("error: {e}\n"),
            },
            _ => self.handle(line),
        }
    }

    async fn attach(&self, group: Option<&str>) -> Result<String, String> {
        let g = self.group(group)?;
        let name = g.client.group();
        if !g.client.attach().await {
            return Err(format!("group {name}: not detached (already attached)"));
        }
        match tokio::time::timeout(ATTACH_WELCOME_WAIT, g.client.wait_ready()).await {
            Ok(Ok(())) => Ok(format!(
                "group {name}: attached: replicating to {} (mode {})",
                g.client.config().endpoint,
                g.mode.get()
            )),
            Ok(Err(e)) => Err(format!("group {name}: attached, but {e}")),
            Err(_) => Err(format!(
                "group {name}: attached, but no welcome from the backup {} within {:?}; \
                 the session keeps trying (see `status`)",
                g.client.config().endpoint,
                ATTACH_WELCOME_WAIT
            )),
        }
    }

    /// The group `name` names, or the only one.
    fn group(&self, name: Option<&str>) -> Result<&ControlGroup, String> {
        match name {
            Some(name) => self
                .groups
                .iter()
                .find(|g| g.client.group() == name)
                .ok_or_else(|| format!("this agent serves no group {name:?}")),
            None => match self.groups.as_slice() {
                [only] => Ok(only),
                [] => Err("this agent serves no group".into()),
                _ => Err("this agent serves several groups: name one".into()),
            },
        }
    }

    /// Answers one request line (see the module documentation).
    pub fn handle(&self, line: &str) -> String {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("status"), None, ..) => format!("ok\n{}", self.status_table()),
            (Some("status"), Some("reset-peaks"), None, _) => {
                let table = self.status_table();
                for g in &self.groups {
                    g.client.reset_peaks();
                }
                format!("ok\n{table}")
            }
            (Some("mode"), Some(mode), group, None) => match self.switch(mode, group) {
                Ok(msg) => format!("ok\n{msg}\n"),
                Err(e) => format!("error: {e}\n"),
            },
            (Some("hold"), None, ..) => {
                let mut out = String::from("ok\n");
                for g in &self.groups {
                    if let Some(net) = &g.net {
                        let _ = writeln!(out, "{} {}", g.client.group(), net.hold.snapshot().to_line());
                    }
                }
                out
            }
            (Some("tails"), None, ..) => {
                let mut out = String::from("ok\n");
                for g in &self.groups {
                    if let Some(net) = &g.net {
                        for e in net.hold.tails.events() {
                            let _ = writeln!(out, "{} {}", g.client.group(), e.to_line());
                        }
                    }
                }
                out
            }
            (Some("help"), None, ..) => {
                "ok\nrequests: status [reset-peaks] | hold | tails | mode async|sync|pipelined [GROUP] | attach [GROUP]\n".into()
            }
            _ => format!(
                "error: unknown request {:?} (expected `status [reset-peaks]`, `mode MODE [GROUP]` or `attach [GROUP]`)\n",
                line.trim()
            ),
        }
    }

    fn switch(&self, mode: &str, group: Option<&str>) -> Result<String, String> {
        let mode: Mode = mode
            .parse()
            .map_err(|e: crate::replication::UnknownMode| e.to_string())?;
        let g = self.group(group)?;
        let from = g.mode.get();
        if from != mode && (from == Mode::Checkpoint || mode == Mode::Checkpoint) {
            let group = g.client.group();
            let switch = self
                .checkpoint
                .iter()
                .find(|(n, _)| n == group)
                .map(|(_, s)| s.clone())
                .unwrap_or_else(|| Err(crate::agent::CHECKPOINT_SWITCH_REFUSED.to_owned()))?;
            if mode == Mode::Checkpoint
                && g.client.status().link() != crate::replication::LinkState::Up
            {
                return Err(format!(
                    "group {group}: the backup is not connected; a switch to checkpoint needs it (nothing changed: try again once `ctl status` shows connected=true)"
                ));
            }
            return switch(mode);
        }
        let mode = crate::agent::switch_mode(from, mode).map_err(|e| e.to_string())?;
        if crate::agent::needs_network_path(mode) && g.net.is_none() {
            return Err(crate::agent::PIPELINED_NEEDS_NETWORK.into());
        }
        let old = g.mode.set(mode);
        tracing::warn!(group = %g.client.group(), from = %old, to = %mode, "replication mode switched");
        Ok(format!("group {}: mode {old} -> {mode}", g.client.group()))
    }

    /// The status table (see the module documentation).
    pub fn status_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<16} {:<16} {:>3} {:<9} {:>10} {:>10} {:>8} {:>12} {:>8} {:>10} {:>9} {:>8} {:>9} {:<9} {:<8}",
            "GROUP",
            "DISK",
            "W",
            "MODE",
            "WRITTEN",
            "ACKED",
            "LAG",
            "INFL_BYTES",
            "INFL_WR",
            "OLDEST_MS",
            "PEAK_LAG",
            "PEAK_MS",
            "HEARD_MS",
            "CONNECTED",
            "DEGRADED"
        );
        for g in &self.groups {
            let s = g.client.status();
            let mode = g.mode.get();
            for d in &s.disks {
                let w = s.writers.iter().find(|w| w.writer == d.writer);
                let _ = writeln!(
                    out,
                    "{:<16} {:<16} {:>3} {:<9} {:>10} {:>10} {:>8} {:>12} {:>8} {:>10} {:>9} {:>8} {:>9} {:<9} {:<8}",
                    s.group,
                    d.name,
                    d.writer.0,
                    mode.as_str(),
                    w.map_or(0, |w| w.written),
                    w.map_or(0, |w| w.acked),
                    w.map_or(0, |w| w.lag()),
                    d.inflight_bytes,
                    d.inflight_writes,
                    w.and_then(|w| w.oldest_unacked_age)
                        .map_or(0, |a| a.as_millis()),
                    w.map_or(0, |w| w.peaks.lag),
                    w.map_or(0, |w| w.peaks.commit_latency.as_millis()),
                    heard_ms(&s),
                    s.link().as_str(),
                    yes_no(s.degraded),
                );
            }
        }
        for g in &self.groups {
            let s = g.client.status();
            if s.detached {
                let _ = writeln!(
                    out,
                    "WARNING group {}: DETACHED: serving without its backup; nothing is replicated \
                     until `pipecloud ctl attach`",
                    s.group
                );
            }
            let _ = writeln!(
                out,
                "group {}: protection={} mode={} endpoint={} connected={} degraded={} degrade_events={} \
                 sessions={} rtt_ms={} heard_ms={} silent_ms={} heartbeat_ms={}/{} inflight={}/{} \
                 committed={} policy={:?}{}",
                s.group,
                if s.detached { "DETACHED" } else { "replicated" },
                g.mode.get(),
                s.endpoint,
                s.link().as_str(),
                yes_no(s.degraded),
                s.degrade_events,
                s.sessions,
                s.last_rtt.map_or_else(
                    || "-".to_owned(),
                    |r| format!("{:.3}", r.as_secs_f64() * 1e3)
                ),
                heard_ms(&s),
                s.silent_for.as_millis(),
                s.heartbeat_interval.as_millis(),
                s.heartbeat_timeout.as_millis(),
                s.inflight_bytes,
                s.max_inflight_bytes,
                s.committed,
                s.policy,
                s.last_error
                    .as_deref()
                    .map_or_else(String::new, |e| format!(" last_error={e:?}")),
            );
            if let Some(net) = &g.net {
                let _ = writeln!(out, "network {}: {}", s.group, net.snapshot());
                let _ = writeln!(out, "hold {}: {}", s.group, net.hold.snapshot().summary());
                let (episodes, packets) = net.hold.tails.totals();
                let _ = writeln!(
                    out,
                    "tails {}: episodes={episodes} packets={packets}",
                    s.group
                );
            }
        }
        for (group, s) in self.epochs() {
            let _ = writeln!(out, "{}", s.line(&group));
        }
        if let Some((group, l)) = self.lease() {
            let _ = writeln!(
                out,
                "lease {group}: role={} generation={} known_generation={} time_left_ms={}{}",
                l.role,
                l.generation,
                l.known_generation,
                l.time_left_ms,
                l.fence_reason
                    .map_or_else(String::new, |r| format!(" fenced_because={r:?}")),
            );
        }
        out
    }
}

/// Milliseconds since the backup was last heard from, `-` if it never was.
fn heard_ms(s: &ReplicationStatus) -> String {
    s.last_heard_age
        .map_or_else(|| "-".to_owned(), |a| a.as_millis().to_string())
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The server side: a bound control socket. Dropping it removes the socket file.
pub struct CtlServer {
    listener: UnixListener,
    path: PathBuf,
    control: Arc<Control>,
}

impl CtlServer {
    /// Binds the socket at `path` (mode 0600). A stale socket file left by a dead
    /// agent is replaced; a socket a live agent answers on is an error.
    pub fn bind(path: &Path, control: Arc<Control>) -> Result<Self, CtlError> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(CtlError::InUse(path.to_owned()));
                }
                std::fs::remove_file(path).map_err(io_err(path))?;
            }
            Ok(_) => return Err(CtlError::NotASocket(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path)(e)),
        }
        let listener = UnixListener::bind(path).map_err(io_err(path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(path))?;
        Ok(CtlServer {
            listener,
            path: path.to_owned(),
            control,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves requests until the future is dropped.
    pub async fn run(&self) -> Result<(), CtlError> {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (stream, _) = self.listener.accept().await.map_err(io_err(&self.path))?;
            let control = Arc::clone(&self.control);
            match Arc::clone(&slots).try_acquire_owned() {
                Ok(permit) => {
                    tokio::spawn(async move {
                        if let Err(e) = serve_one(stream, &control).await {
                            tracing::debug!("control request failed: {e}");
                        }
                        drop(permit);
                    });
                }
                Err(_) => {
                    tokio::spawn(async move {
                        let mut stream = stream;
                        let _ = stream.write_all(b"error: busy\n").await;
                    });
                }
            }
        }
    }
}

impl Drop for CtlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve_one(stream: UnixStream, control: &Control) -> io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let mut rd = tokio::io::BufReader::new(rd.take(MAX_REQUEST_LEN as u64 + 1));
    let answer = match tokio::time::timeout(REQUEST_TIMEOUT, rd.read_line(&mut line)).await {
        Err(_) => "error: no request within the timeout\n".to_owned(),
        Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
            "error: request is not UTF-8\n".to_owned()
        }
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) if line.len() > MAX_REQUEST_LEN => {
            format!("error: request longer than {MAX_REQUEST_LEN} bytes\n")
        }
        Ok(Ok(_)) => control.handle_async(&line).await,
    };
    wr.write_all(answer.as_bytes()).await?;
    wr.shutdown().await
}

/// Client: sends `line` to the agent's control socket at `path` and returns the
/// payload of an `ok` answer (blocking; for the CLI). An `error:` answer is
/// [`CtlError::Remote`].
pub fn request(path: &Path, line: &str) -> Result<String, CtlError> {
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(io_err(path))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io_err(path))?;
    s.set_write_timeout(Some(REQUEST_TIMEOUT))
        .map_err(io_err(path))?;
    let mut req = line.trim_end_matches(['\r', '\n']).to_owned();
    req.push('\n');
    s.write_all(req.as_bytes()).map_err(io_err(path))?;
    let mut rd = BufReader::new(s.take(MAX_ANSWER_LEN));
    let mut first = String::new();
    rd.read_line(&mut first).map_err(io_err(path))?;
    let mut rest = String::new();
    rd.read_to_string(&mut rest).map_err(io_err(path))?;
    let first = first.trim_end();
    if first == "ok" {
        Ok(rest)
    } else if let Some(msg) = first.strip_prefix("error: ") {
        Err(CtlError::Remote(msg.to_owned()))
    } else {
        Err(CtlError::Malformed(first.to_owned()))
    }
}

/// Client: the status table (`pipecloud ctl status`); with `reset_peaks`, the
/// worst-lag figures start afresh after this answer (`--reset-peaks`).
pub fn status(path: &Path, reset_peaks: bool) -> Result<String, CtlError> {
    request(
        path,
        if reset_peaks {
            "status reset-peaks"
        } else {
            "status"
        },
    )
}

/// Client: the hold breakdown of each group with a network path (`hold` request).
pub fn hold(path: &Path) -> Result<Vec<(String, crate::netpath::HoldSnapshot)>, CtlError> {
    per_group(path, "hold", crate::netpath::HoldSnapshot::parse_line)
}

/// The `GROUP rest` lines of the answer to `req`, `rest` parsed by `parse`.
fn per_group<T>(
    path: &Path,
    req: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<(String, T)>, CtlError> {
    request(path, req)?
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(g, rest)| {
            parse(rest)
                .map(|v| (g.to_owned(), v))
                .map_err(CtlError::Malformed)
        })
        .collect()
}

/// How long `attach` waits for the backup's welcome before answering.
pub const ATTACH_WELCOME_WAIT: Duration = Duration::from_secs(20);

/// Client: attaches a detached agent's group (`pipecloud ctl attach`).
pub fn attach(path: &Path, group: Option<&str>) -> Result<String, CtlError> {
    match group {
        Some(g) => request(path, &format!("attach {g}")),
        None => request(path, "attach"),
    }
}

/// Client: the tail episodes of each group with a network path (`tails` request).
pub fn tails(path: &Path) -> Result<Vec<(String, crate::netpath::TailEvent)>, CtlError> {
    per_group(path, "tails", crate::netpath::TailEvent::parse_line)
}

/// Client: switches the mode of `group` (or of the agent's only group)
/// (`pipecloud ctl mode MODE [GROUP]`). Returns the agent's confirmation line.
pub fn set_mode(path: &Path, mode: Mode, group: Option<&str>) -> Result<String, CtlError> {
    match group {
        Some(g) => request(path, &format!("mode {mode} {g}")),
        None => request(path, &format!("mode {mode}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causal::CausalState;
    use crate::replication::{DiskSpec, ReplicationConfig, TlsFiles};
    use pipecloud_core::WriterId;

    /// A client whose backup never answers (nothing listens on its endpoint):
    /// enough for the control interface, which only reads status and switches modes.
    fn client(dir: &Path, group: &str) -> Arc<ReplicationClient> {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        std::fs::write(dir.join("c.pem"), cert.pem()).expect("write cert");
        std::fs::write(dir.join("c.key"), key.serialize_pem()).expect("write key");
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        let endpoint = probe.local_addr().expect("addr").to_string();
        drop(probe);
        let cfg = ReplicationConfig {
            endpoint,
            server_name: "localhost".into(),
            tls: TlsFiles {
                ca: dir.join("c.pem"),
                cert: dir.join("c.pem"),
                key: dir.join("c.key"),
            },
            group: group.into(),
            group_id: 1,
            agent: "a".into(),
            disks: vec![DiskSpec {
                name: format!("{group}-disk"),
                size: 1 << 20,
                writer: WriterId(0),
                machine: 0,
            }],
            ..ReplicationConfig::default()
        };
        Arc::new(ReplicationClient::start(cfg, Arc::new(CausalState::new(1))).expect("client"))
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pipecloud-ctl-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch");
        d
    }

    #[tokio::test]
    async fn requests_switch_modes_and_report_status() {
        let dir = scratch("handle");
        let g1 = ControlGroup {
            client: client(&dir, "g1"),
            mode: ModeSwitch::new(Mode::Pipelined),
            net: None,
        };
        let control = Control::new(vec![g1.clone()]);
        assert_eq!(
            control.handle("mode sync\n"),
            "ok\ngroup g1: mode pipelined -> sync\n"
        );
        assert_eq!(g1.mode.get(), Mode::Sync);
        assert!(control.handle("mode checkpoint").starts_with(
            "error: switching into or out of mode `checkpoint` at run time goes through"
        ));
        assert!(control
            .handle("mode SYNC")
            .starts_with("error: unknown mode `SYNC`; expected one of async, sync"));
        assert!(control
            .handle("mode async g2")
            .starts_with("error: this agent serves no group"));
        assert!(control
            .handle("frobnicate")
            .starts_with("error: unknown request"));
        assert!(control.handle("mode").starts_with("error:"));
        assert_eq!(g1.mode.get(), Mode::Sync, "failed requests change nothing");
        let status = control.handle("status");
        assert!(status.starts_with("ok\nGROUP"), "{status}");
        let row = status
            .lines()
            .find(|l| l.contains("g1-disk"))
            .expect("a row per disk");
        assert!(row.contains(" sync ") && row.contains(" no "), "{row}");
        assert!(status.contains("connected=no"), "{status}");
        // Never heard from: `-`, not the time since the start; the heartbeat settings.
        assert!(
            status.contains("HEARD_MS") && status.contains("heard_ms=- "),
            "{status}"
        );
        assert!(status.contains("heartbeat_ms=1000/5000"), "{status}");
        // The worst-lag columns; `reset-peaks` answers the same table, other words are refused.
        assert!(
            status.contains("PEAK_LAG") && status.contains("PEAK_MS"),
            "{status}"
        );
        assert!(control
            .handle("status reset-peaks")
            .starts_with("ok\nGROUP"));
        assert!(control
            .handle("status now")
            .starts_with("error: unknown request"));

        // Two groups: the group must be named.
        let g2 = ControlGroup {
            client: client(&dir, "g2"),
            mode: ModeSwitch::new(Mode::Async),
            net: Some(Arc::new(NetPathMetrics::default())),
        };
        let control = Control::new(vec![g1.clone(), g2.clone()]);
        let status = control.handle("status");
        assert!(
            status.contains("network g2: tagged=0") && status.contains("driver(sleeps=0"),
            "{status}"
        );
        assert!(!status.contains("network g1"), "{status}");
        // The metrics endpoint reads the same snapshots: network-path families only
        // for the group that runs one, no RTT before a heartbeat was answered.
        let m = crate::metrics::render(Arc::new(control.clone()));
        for line in [
            "# TYPE pipecloud_disk_written_seq gauge",
            "pipecloud_disk_written_seq{group=\"g1\",disk=\"g1-disk\",writer=\"0\"} 0",
            "pipecloud_disk_oldest_unacked_age_seconds{group=\"g2\",disk=\"g2-disk\",writer=\"0\"} 0.0",
            "pipecloud_replication_connected{group=\"g1\"} 0",
            "pipecloud_group_mode{group=\"g1\",mode=\"sync\"} 1",
            "pipecloud_group_mode{group=\"g2\",mode=\"sync\"} 0",
            "pipecloud_group_mode{group=\"g2\",mode=\"async\"} 1",
            "pipecloud_group_degraded{group=\"g2\"} 0",
            "# TYPE pipecloud_group_degrade_events_total counter",
            "pipecloud_group_held_packets{group=\"g2\"} 0",
            "pipecloud_group_released_packets_total{group=\"g2\",when=\"after_hold\"} 0",
            "pipecloud_group_dropped_packets_total{group=\"g2\",reason=\"full\"} 0",
        ] {
            assert!(m.lines().any(|l| l == line), "no {line:?} in:\n{m}");
        }
        assert!(
            !m.contains("pipecloud_group_held_packets{group=\"g1\"}"),
            "{m}"
        );
        assert!(
            !m.contains("pipecloud_replication_heartbeat_rtt_seconds{"),
            "{m}"
        );
        assert!(control
            .handle("mode sync")
            .starts_with("error: this agent serves several groups"));
        assert!(control.handle("mode pipelined g2").starts_with("ok\n"));
        assert_eq!(
            (g1.mode.get(), g2.mode.get()),
            (Mode::Sync, Mode::Pipelined)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn socket_round_trip_stale_socket_and_in_use() {
        let dir = scratch("sock");
        let g = ControlGroup {
            client: client(&dir, "g1"),
            mode: ModeSwitch::new(Mode::Pipelined),
            net: None,
        };
        let control = Arc::new(Control::new(vec![g.clone()]));
        let path = dir.join("ctl.sock");
        // A stale socket file (nobody listening) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
        let server = CtlServer::bind(&path, Arc::clone(&control)).expect("bind over stale socket");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let task = tokio::spawn(async move {
            let _ = server.run().await;
        });
        let p = path.clone();
        let (answer, status, err, in_use) = tokio::task::spawn_blocking(move || {
            (
                set_mode(&p, Mode::Async, None),
                status(&p, true),
                request(&p, "mode nonsense"),
                CtlServer::bind(&p, Arc::new(Control::default())).err(),
            )
        })
        .await
        .expect("client");
        assert_eq!(
            answer.expect("set_mode"),
            "group g1: mode pipelined -> async\n"
        );
        assert_eq!(g.mode.get(), Mode::Async);
        assert!(status.expect("status").contains("g1-disk"));
        assert!(matches!(err, Err(CtlError::Remote(_))));
        assert!(matches!(in_use, Some(CtlError::InUse(_))));
        // A path that is not a socket is never removed.
        let file = dir.join("plain");
        std::fs::write(&file, b"x").expect("file");
        assert!(matches!(
            CtlServer::bind(&file, Arc::new(Control::default())),
            Err(CtlError::NotASocket(_))
        ));
        assert!(file.exists());
        task.abort();
        let _ = task.await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
