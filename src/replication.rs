//! Replication client: streams a protection group's disk writes from this agent
//! to the backup server and learns which of them are durable there.
//!
//! One [`ReplicationClient`] per (agent, group). It owns the TLS connection to
//! the backup server (mutual TLS, reconnect with exponential backoff) and a
//! **bounded buffer of unacked writes**:
//!
//! - [`ReplicationClient::submit`] first waits for room in the in-flight budget
//!   (`max_inflight_bytes`, charged payload + [`WRITE_OVERHEAD`] per write): this
//!   wait is the backpressure that slows the guest instead of growing memory.
//!   Only then does it take the write's `(seq, vector)` from the [`CausalState`]
//!   and buffer it, atomically, so each writer's writes enter the buffer (and the
//!   stream) in seq order. It returns an [`AckWaiter`] for modes that wait for
//!   the backup (sync).
//! - A buffered write leaves the buffer only when the backup acked it (an
//!   [`Ack`](pipecloud_core::wire::Ack) range or a committed vector covering it).
//!   Nothing else drops it: after a reconnection, every buffered write above the
//!   durable prefix the welcome reports is sent again.
//! - Acks (out of order, duplicated) go through the core's
//!   [`CommitTracker`](pipecloud_core::commit::CommitTracker) (contiguous prefix);
//!   the committed vector it yields, merged with the `Committed` vectors the
//!   backup pushes, is published to [`CausalState::publish_committed`], which the
//!   netqueue driver watches. Both sources are safe: an ack means durable.
//!
//! **Generations.** Each agent start picks a fresh [`Generation`] for its writers
//! ([`fresh_generation`]). Until the first welcome told a writer where its
//! numbering continues (the durable prefix of the backup), that writer issues no
//! writes: `submit` waits (see [`ReplicationClient::wait_ready`]). On the first
//! welcome the writer's entry of the causal state is raised to that prefix so
//! seqs stay monotone across agent restarts.
//!
//! **Backup loss** ([`BackupLossPolicy`]): with `Stall` (default) nothing is ever
//! released early: sync writes wait, the netqueue holds, and once the buffer is
//! full every writer blocks. With `DegradeToAsync { after }`, once the backup has
//! been silent for `after` the client logs an ERROR alarm, counts it
//! (`degrade_events` in the status) and sets the *degraded* flag
//! ([`ReplicationClient::subscribe_degraded`]): the network path then releases
//! held packets and sync writes stop waiting. The committed vector is never
//! faked. Writes keep being buffered (the bound still applies: a full buffer
//! blocks writers even when degraded; there is no spill file yet) and are re-sent
//! on reconnection; the flag clears once everything that was written when the
//! group degraded (or reconnected) is committed.
//!
//! **Detached** ([`ReplicationConfig::detached`], docs/design.md §15): an agent
//! activated at a site whose backup is gone (the old primary, after a
//! takeover) starts without its backup. Until [`ReplicationClient::attach`]
//! the session task does not connect, nothing is issued or buffered (the disk
//! writes locally only: [`ReplicationClient::detached_guard`]), so nothing
//! stalls and nothing is held; the status says `detached` loudly. Attaching
//! is one-way: it waits for every local-only write in progress to finish
//! (they hold the guard's read side), then lets the session connect; this
//! run's generation starts its numbering at the first welcome as on any
//! start. Writes made while detached reach the backup only through the
//! failback resync, which compares every block after the attach.
//!
//! Clock reads (backoff, heartbeat RTT, silence, write age) happen here in the
//! driver; the core stays clock-free.

pub mod checkpoint;
mod mode;
mod runtime;
mod send_policy;
mod session;
mod state;
mod timeline;
mod tls;

pub use mode::{BackupLossPolicy, Mode, ModeSwitch, UnknownMode};
pub use runtime::ReplicationRuntime;
pub use state::{write_cost, Coalesce, Peaks, WRITE_OVERHEAD};
pub use timeline::{StreamAt, WriteTimeline, WriteTimes};
pub use tls::{client_config, TlsError, TlsFiles};

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pipecloud_core::codec::{validate_name, MAX_RANGE_LEN};
use pipecloud_core::wire::{Generation, WriteKind, MAX_DISKS_PER_HELLO, MAX_WRITE_PAYLOAD};
use pipecloud_core::{CountVector, Seq, WriterId, MAX_WRITERS};
use rustls::pki_types::ServerName;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::causal::CausalState;
use state::{DegradeChange, DiskSlot, State};

/// One disk whose writes a client replicates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// Disk name (a file name at the backup: `[A-Za-z0-9_.-]`, 1..=64 bytes).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The writer (machine of the group) that owns the disk.
    pub writer: WriterId,
    /// Index of that machine in the [`CausalState`] (the topology's machine index).
    pub machine: usize,
}

/// Default coalescing: a write waits at most 200 µs for the acks of earlier
/// writes (or until 256 KiB wait), then goes anyway; in async mode writes go in
/// batches at most 1 ms old.
pub const DEFAULT_COALESCE: Coalesce = Coalesce {
    delay: Duration::from_micros(pipecloud_core::topology::DEFAULT_REPLICATION_COALESCE_US),
    bytes: 256 << 10,
    async_delay: Duration::from_micros(
        pipecloud_core::topology::DEFAULT_REPLICATION_ASYNC_BATCH_US,
    ),
};

/// Configuration of one replication client.
#[derive(Clone, Debug)]
pub struct ReplicationConfig {
    /// Backup server address, `host:port`.
    pub endpoint: String,
    /// Name the backup server's certificate must carry.
    pub server_name: String,
    /// PEM files of the mutual TLS.
    pub tls: TlsFiles,
    /// Protection group name (must match the group bound to the agent certificate).
    pub group: String,
    /// Numeric group id (carried in the IPv4 option).
    pub group_id: u16,
    /// This agent's (host's) name.
    pub agent: String,
    /// The disks this agent serves for the group (may be empty: the client then
    /// only receives committed vectors).
    pub disks: Vec<DiskSpec>,
    /// Generation of this agent run's writers (see [`fresh_generation`]).
    pub generation: Generation,
    /// In-flight budget: bytes of unacked writes buffered at most.
    pub max_inflight_bytes: u64,
    /// What to do while the backup is unreachable.
    pub backup_loss: BackupLossPolicy,
    /// Period of heartbeats (RTT measurement, liveness).
    pub heartbeat_interval: Duration,
    /// A session whose backup sent nothing for this long is dropped and re-established.
    pub heartbeat_timeout: Duration,
    /// Limit for TCP connect + TLS handshake.
    pub connect_timeout: Duration,
    /// First reconnection delay (doubles per failed attempt).
    pub reconnect_min: Duration,
    /// Longest reconnection delay.
    pub reconnect_max: Duration,
    /// How the sender coalesces writes into socket writes (see [`Coalesce`]).
    pub coalesce: Coalesce,
    /// The group's mode switch: the sender batches by age while it says `async`.
    pub mode: ModeSwitch,
    /// Checkpoint mode: the epoch driver's link (its frames share this connection).
    pub checkpoint: Option<Arc<checkpoint::CheckpointLink>>,
    /// Start *detached* ([`ReplicationClient::attach`]): no connection to the
    /// backup until attached; writes complete locally and are not buffered.
    pub detached: bool,
}

impl Default for ReplicationConfig {
    /// Empty names and paths (fill them in), 64 MiB in flight, stall policy,
    /// 1 s heartbeats, 5 s heartbeat timeout, 5 s connect timeout, 100 ms..2 s backoff,
    /// [`DEFAULT_COALESCE`], a mode switch of its own set to the default mode.
    fn default() -> Self {
        ReplicationConfig {
            endpoint: String::new(),
            server_name: String::new(),
            tls: TlsFiles {
                ca: Default::default(),
                cert: Default::default(),
                key: Default::default(),
            },
            group: String::new(),
            group_id: 0,
            agent: String::new(),
            disks: Vec::new(),
            generation: 1,
            max_inflight_bytes: 64 << 20,
            backup_loss: BackupLossPolicy::Stall,
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(2),
            coalesce: DEFAULT_COALESCE,
            mode: ModeSwitch::default(),
            checkpoint: None,
            detached: false,
        }
    }
}

/// Errors of the replication client.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The configuration is unusable.
    #[error("replication config for group {group:?}: {msg}")]
    Config { group: String, msg: String },
    /// The TLS files could not be loaded.
    #[error("replication TLS setup: {0}")]
    Tls(#[from] TlsError),
    /// A write outside what the protocol can carry.
    #[error("write on disk {disk:?} at {offset}: {msg}")]
    BadWrite {
        disk: String,
        offset: u64,
        msg: String,
    },
    /// The client (or the causal state it publishes to) was shut down.
    #[error("replication client of group {0:?} stopped")]
    Stopped(String),
}

impl From<ReplicationError> for io::Error {
    fn from(e: ReplicationError) -> Self {
        let kind = match e {
            ReplicationError::BadWrite { .. } => io::ErrorKind::InvalidInput,
            ReplicationError::Stopped(_) => io::ErrorKind::BrokenPipe,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// Picks a fresh generation for this agent run: the wall clock in microseconds
/// since the Unix epoch, and, if `state_file` is given, at least one more than the
/// generation persisted there by the previous run (guards against a clock that
/// went backwards); the result is persisted (write to a temporary file, fsync,
/// rename) before it is returned.
pub fn fresh_generation(state_file: Option<&Path>) -> io::Result<Generation> {
    let clock = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(1)
        .max(1);
    let Some(path) = state_file else {
        return Ok(clock);
    };
    let previous = match std::fs::read_to_string(path) {
        Ok(s) => s.trim().parse::<u64>().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("generation file {}: {e}", path.display()),
            )
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let generation = clock.max(previous.saturating_add(1));
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{generation}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(generation)
}

/// A disk of a client, as returned by [`ReplicationClient::disk`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskHandle {
    index: usize,
    writer: WriterId,
    machine: usize,
}

impl DiskHandle {
    /// The disk's writer.
    pub fn writer(&self) -> WriterId {
        self.writer
    }
    /// The causal-state machine index of the disk's writer.
    pub fn machine(&self) -> usize {
        self.machine
    }
    /// Index of the disk in the hello (the `disk` field of its writes).
    pub fn index(&self) -> usize {
        self.index
    }
}

/// A write that was issued and buffered.
#[derive(Debug)]
pub struct Submitted {
    /// Its writer.
    pub writer: WriterId,
    /// Its seq.
    pub seq: Seq,
    /// Its vector (the writer's pending vector at issue time).
    pub vector: CountVector,
}

/// How an [`AckWaiter`] finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckState {
    /// The write (and every earlier write of its writer) is durable at the backup.
    Acked,
    /// The group is degraded to async (backup lost): stop waiting.
    Degraded,
}

/// Waits for a write to be committed (its writer's committed seq reaches it).
///
/// Waiting on the committed prefix rather than the single ack is what a guest
/// expects of a completed write: everything it wrote before is durable too.
#[derive(Debug)]
pub struct AckWaiter {
    writer: WriterId,
    seq: Seq,
    committed: watch::Receiver<CountVector>,
    degraded: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
    group: String,
}

impl AckWaiter {
    /// The awaited seq.
    pub fn seq(&self) -> Seq {
        self.seq
    }

    /// Whether the write is committed now.
    pub fn is_acked(&self) -> bool {
        self.committed.borrow().get(self.writer.index()) >= self.seq
    }

    /// Waits until the write is committed ([`AckState::Acked`]) or the group is
    /// degraded ([`AckState::Degraded`]). Cancel-safe.
    pub async fn wait(&mut self) -> Result<AckState, ReplicationError> {
        loop {
            if self.committed.borrow_and_update().get(self.writer.index()) >= self.seq {
                return Ok(AckState::Acked);
            }
            if *self.degraded.borrow_and_update() {
                return Ok(AckState::Degraded);
            }
            if *self.shutdown.borrow_and_update() {
                return Err(ReplicationError::Stopped(self.group.clone()));
            }
            tokio::select! {
                r = self.committed.changed() => r.map_err(|_| ReplicationError::Stopped(self.group.clone()))?,
                r = self.degraded.changed() => r.map_err(|_| ReplicationError::Stopped(self.group.clone()))?,
                r = self.shutdown.changed() => r.map_err(|_| ReplicationError::Stopped(self.group.clone()))?,
            }
        }
    }
}

/// Per-writer figures of a [`ReplicationStatus`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterStatus {
    pub writer: WriterId,
    pub generation: Generation,
    /// Highest seq issued.
    pub written: Seq,
    /// Committed seq (all of `1..=acked` durable at the backup).
    pub acked: Seq,
    /// Bytes charged by this writer's unacked writes.
    pub inflight_bytes: u64,
    /// Number of unacked writes.
    pub inflight_writes: usize,
    /// Age of the oldest unacked write (time lag), if any.
    pub oldest_unacked_age: Option<Duration>,
    /// Empty filler writes issued to cover skipped seqs (normally 0).
    pub fillers: u64,
    /// Worst lag seen since the client started or [`ReplicationClient::reset_peaks`].
    pub peaks: Peaks,
}

/// How the connection to the backup looks in a [`ReplicationStatus`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// No session (connecting, or backing off between attempts).
    Down,
    /// A session, but the backup has not been heard from for more than two
    /// heartbeat intervals: it is probably gone, and the session ends at the
    /// heartbeat timeout.
    Late,
    /// A session, and the backup was heard from recently.
    Up,
}

impl LinkState {
    /// `yes`, `late` or `no` (the `CONNECTED` column of `ctl status`).
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Up => "yes",
            LinkState::Late => "late",
            LinkState::Down => "no",
        }
    }
}

impl ReplicationStatus {
    /// The connection's state: [`LinkState::Late`] once a session's backup has
    /// been silent for more than two heartbeat intervals (it answers every
    /// heartbeat, so two missed answers mean the link or the backup is in trouble).
    pub fn link(&self) -> LinkState {
        if !self.connected {
            LinkState::Down
        } else if self.silent_for > self.heartbeat_interval.saturating_mul(2) {
            LinkState::Late
        } else {
            LinkState::Up
        }
    }
}

impl WriterStatus {
    /// Writes issued but not committed (seq lag).
    pub fn lag(&self) -> u64 {
        self.written.saturating_sub(self.acked)
    }
}

/// Per-disk figures of a [`ReplicationStatus`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskStatus {
    pub name: String,
    pub size: u64,
    pub writer: WriterId,
    pub inflight_bytes: u64,
    pub inflight_writes: usize,
}

/// A snapshot of a client's state ([`ReplicationClient::status`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicationStatus {
    pub group: String,
    pub endpoint: String,
    /// A session is established.
    pub connected: bool,
    /// The first welcome was received (writers may issue).
    pub registered: bool,
    /// The group is degraded to async (backup lost).
    pub degraded: bool,
    /// Started detached and not attached yet: nothing is replicated.
    pub detached: bool,
    pub policy: BackupLossPolicy,
    /// How often the group degraded (alarm metric).
    pub degrade_events: u64,
    /// Sessions established so far (reconnections + 1).
    pub sessions: u64,
    /// Last heartbeat round-trip time.
    pub last_rtt: Option<Duration>,
    /// Time since the backup last sent anything (since the client started, if
    /// it never did): what the heartbeat timeout and the backup-loss policy use.
    pub silent_for: Duration,
    /// Time since the backup last sent any frame (ack, committed vector,
    /// heartbeat or its reply); `None` if it never did in this agent run. While
    /// the backup is up this stays below about one heartbeat interval plus the
    /// round trip; a dead link shows here at once, growing, while `connected`
    /// stays true until the heartbeat timeout ends the session.
    pub last_heard_age: Option<Duration>,
    /// The client's heartbeat period (from the configuration).
    pub heartbeat_interval: Duration,
    /// The client's heartbeat timeout (from the configuration).
    pub heartbeat_timeout: Duration,
    /// Why the last session or connection attempt failed.
    pub last_error: Option<String>,
    /// The committed vector as known to this client.
    pub committed: CountVector,
    pub inflight_bytes: u64,
    pub max_inflight_bytes: u64,
    pub writers: Vec<WriterStatus>,
    pub disks: Vec<DiskStatus>,
}

/// State shared by the client handle and its tasks.
pub(crate) struct Shared {
    config: ReplicationConfig,
    causal: Arc<CausalState>,
    tls: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    state: Mutex<State>,
    room: Arc<Semaphore>,
    max_permits: u64,
    wake_sender: Notify,
    /// Set by [`ReplicationClient::send_now`]: the sender sends what is unsent at once.
    send_now: std::sync::atomic::AtomicBool,
    ready: watch::Sender<bool>,
    degraded: watch::Receiver<bool>,
    shutdown: watch::Sender<bool>,
    /// `false` while detached; set once, by [`ReplicationClient::attach`].
    attached: watch::Sender<bool>,
    /// Local-only writes hold the read side while detached; `attach` takes
    /// the write side, so it completes only after them.
    attach_lock: tokio::sync::RwLock<()>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic in an unrelated holder (every
        // method finishes its updates before anything that could panic).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn report_degrade_change(cfg: &ReplicationConfig, change: DegradeChange) {
    match change {
        DegradeChange::Degraded { silent_for } => tracing::error!(
            group = %cfg.group,
            endpoint = %cfg.endpoint,
            ?silent_for,
            "ALARM: backup unreachable for {silent_for:?}: group DEGRADED TO ASYNC, \
             client-bound packets are released without their writes being durable (RPO > 0)"
        ),
        DegradeChange::Recovered => tracing::warn!(
            group = %cfg.group,
            "backlog committed at the backup: group back to zero RPO"
        ),
    }
}

/// The replication client of one (agent, group). Dropping it stops its tasks.
pub struct ReplicationClient {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl ReplicationClient {
    /// Validates `config`, loads the TLS files and starts the connection tasks on
    /// the current tokio runtime (must be called inside one).
    pub fn start(
        config: ReplicationConfig,
        causal: Arc<CausalState>,
    ) -> Result<Self, ReplicationError> {
        Self::start_on(config, causal, &tokio::runtime::Handle::current())
    }

    /// As [`ReplicationClient::start`], with the connection tasks on `runtime`
    /// (e.g. a [`ReplicationRuntime`]'s, off the thread that serves the guests).
    pub fn start_on(
        config: ReplicationConfig,
        causal: Arc<CausalState>,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Self, ReplicationError> {
        let cfg_err = |msg: String| ReplicationError::Config {
            group: config.group.clone(),
            msg,
        };
        validate_name(&config.group).map_err(|e| cfg_err(format!("group name: {e}")))?;
        validate_name(&config.agent).map_err(|e| cfg_err(format!("agent name: {e}")))?;
        if config.disks.len() > MAX_DISKS_PER_HELLO {
            return Err(cfg_err(format!(
                "{} disks (at most {MAX_DISKS_PER_HELLO} per agent and group)",
                config.disks.len()
            )));
        }
        for (i, d) in config.disks.iter().enumerate() {
            validate_name(&d.name).map_err(|e| cfg_err(format!("disk name: {e}")))?;
            if d.writer.index() >= MAX_WRITERS {
                return Err(cfg_err(format!(
                    "disk {}: writer {} out of range",
                    d.name, d.writer
                )));
            }
            if d.machine >= causal.machines() {
                return Err(cfg_err(format!(
                    "disk {}: machine index {} but the causal state has {} machines",
                    d.name,
                    d.machine,
                    causal.machines()
                )));
            }
            for o in &config.disks[..i] {
                if o.name == d.name {
                    return Err(cfg_err(format!("disk {} listed twice", d.name)));
                }
                if o.writer == d.writer && o.machine != d.machine {
                    return Err(cfg_err(format!(
                        "disks {} and {} have writer {} on different machines",
                        o.name, d.name, d.writer
                    )));
                }
            }
        }
        if config.max_inflight_bytes < WRITE_OVERHEAD {
            return Err(cfg_err(format!(
                "max_inflight_bytes {} is below the per-write overhead {WRITE_OVERHEAD}",
                config.max_inflight_bytes
            )));
        }
        if config.heartbeat_interval.is_zero()
            || config.heartbeat_timeout <= config.heartbeat_interval
        {
            return Err(cfg_err(
                "heartbeat interval must be non-zero and below the heartbeat timeout".into(),
            ));
        }
        if config.reconnect_min.is_zero() || config.reconnect_max < config.reconnect_min {
            return Err(cfg_err("reconnect backoff must be 0 < min <= max".into()));
        }
        if let BackupLossPolicy::DegradeToAsync { after } = config.backup_loss {
            if after.is_zero() {
                return Err(cfg_err("degrade-to-async delay must be non-zero".into()));
            }
        }
        let server_name = tls::server_name(&config.server_name)?;
        let tls = tokio_rustls::TlsConnector::from(client_config(&config.tls)?);
        let max_permits = config
            .max_inflight_bytes
            .min(Semaphore::MAX_PERMITS as u64)
            .min(u64::from(u32::MAX));
        let (degraded_tx, degraded_rx) = watch::channel(false);
        let disks = config
            .disks
            .iter()
            .map(|d| DiskSlot::new(d.name.clone(), d.size, d.writer, d.machine))
            .collect();
        let state = State::new(disks, config.generation, degraded_tx, Instant::now());
        let (ready, _) = watch::channel(false);
        let (shutdown, _) = watch::channel(false);
        let (attached, _) = watch::channel(!config.detached);
        let shared = Arc::new(Shared {
            room: Arc::new(Semaphore::new(max_permits as usize)),
            max_permits,
            config,
            causal,
            tls,
            server_name,
            state: Mutex::new(state),
            wake_sender: Notify::new(),
            send_now: std::sync::atomic::AtomicBool::new(false),
            ready,
            degraded: degraded_rx,
            shutdown,
            attached,
            attach_lock: tokio::sync::RwLock::new(()),
        });
        let tasks = vec![
            runtime.spawn(session::run(Arc::clone(&shared))),
            runtime.spawn(session::degrade_watch(Arc::clone(&shared))),
        ];
        Ok(ReplicationClient { shared, tasks })
    }

    /// The group this client replicates.
    pub fn group(&self) -> &str {
        &self.shared.config.group
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &ReplicationConfig {
        &self.shared.config
    }

    /// The causal state it publishes committed vectors to.
    pub fn causal(&self) -> &Arc<CausalState> {
        &self.shared.causal
    }

    /// When its recent writes were issued, sent and acked (for the network
    /// path's hold breakdown, [`WriteTimeline`]).
    pub fn timeline(&self) -> Arc<WriteTimeline> {
        Arc::clone(&self.shared.lock().timeline)
    }

    /// The handle of disk `name`, if this client replicates it.
    pub fn disk(&self, name: &str) -> Option<DiskHandle> {
        self.shared
            .config
            .disks
            .iter()
            .position(|d| d.name == name)
            .map(|index| {
                let d = &self.shared.config.disks[index];
                DiskHandle {
                    index,
                    writer: d.writer,
                    machine: d.machine,
                }
            })
    }

    fn stopped(&self) -> ReplicationError {
        ReplicationError::Stopped(self.shared.config.group.clone())
    }

    /// Waits until the first welcome registered this agent's writers (until then
    /// no write can be issued: its numbering base is unknown).
    pub async fn wait_ready(&self) -> Result<(), ReplicationError> {
        let mut ready = self.shared.ready.subscribe();
        let mut shutdown = self.shared.shutdown.subscribe();
        loop {
            if *ready.borrow_and_update() {
                return Ok(());
            }
            if *shutdown.borrow_and_update() {
                return Err(self.stopped());
            }
            tokio::select! {
                r = ready.changed() => r.map_err(|_| self.stopped())?,
                r = shutdown.changed() => r.map_err(|_| self.stopped())?,
            }
        }
    }

    /// Issues and buffers one write of `disk`.
    ///
    /// Waits (backpressure) until the client is registered and the in-flight
    /// budget has room for the write, then atomically takes `(seq, vector)` from
    /// the causal state and buffers the write for sending. Cancel-safe: if the
    /// future is dropped before it completes, nothing was issued.
    ///
    /// `Data` payloads must be at most [`MAX_WRITE_PAYLOAD`] bytes (split larger
    /// writes); a single write is charged at most the whole budget.
    pub async fn submit(
        &self,
        disk: DiskHandle,
        offset: u64,
        kind: WriteKind,
    ) -> Result<Submitted, ReplicationError> {
        let name = || {
            self.shared
                .config
                .disks
                .get(disk.index)
                .map(|d| d.name.clone())
                .unwrap_or_default()
        };
        let bad = |msg: String| ReplicationError::BadWrite {
            disk: name(),
            offset,
            msg,
        };
        let len = match &kind {
            WriteKind::Data(d) if d.len() > MAX_WRITE_PAYLOAD => {
                return Err(bad(format!(
                    "payload of {} bytes exceeds {MAX_WRITE_PAYLOAD}",
                    d.len()
                )))
            }
            WriteKind::Data(d) => d.len() as u64,
            WriteKind::Zeroes { len } | WriteKind::Trim { len } => {
                if *len > MAX_RANGE_LEN {
                    return Err(bad(format!("length {len} exceeds {MAX_RANGE_LEN}")));
                }
                *len
            }
        };
        if offset.checked_add(len).is_none() {
            return Err(bad(format!("offset + length {len} overflows")));
        }
        if disk.index >= self.shared.config.disks.len() {
            return Err(bad("unknown disk handle".into()));
        }
        // Fast path (registered, room in the budget) without subscribing to anything.
        if !*self.shared.ready.borrow() {
            self.wait_ready().await?;
        }
        if *self.shared.shutdown.borrow() {
            return Err(self.stopped());
        }
        let full_cost = write_cost(&kind);
        let cost = full_cost.min(self.shared.max_permits);
        // cost <= max_permits <= u32::MAX.
        let n = u32::try_from(cost).unwrap_or(u32::MAX);
        let permit = match Arc::clone(&self.shared.room).try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(_) => {
                // Backpressure: wait for acks to free room (or for shutdown).
                let mut shutdown = self.shared.shutdown.subscribe();
                if *shutdown.borrow_and_update() {
                    return Err(self.stopped());
                }
                tokio::select! {
                    p = Arc::clone(&self.shared.room).acquire_many_owned(n) => p.map_err(|_| self.stopped())?,
                    _ = shutdown.changed() => return Err(self.stopped()),
                }
            }
        };
        let ((writer, seq, vector), wake) = {
            let mut st = self.shared.lock();
            let issued = st.issue(
                &self.shared.causal,
                disk.index,
                offset,
                kind,
                Some(permit),
                Instant::now(),
            );
            (issued, st.wake_sender_for(full_cost))
        };
        if wake {
            self.shared.wake_sender.notify_one();
        }
        Ok(Submitted {
            writer,
            seq,
            vector,
        })
    }

    /// Asks the sender to send every buffered unsent write at once, whatever the
    /// coalescing rule (a guest FLUSH: a consistency point of the application,
    /// whose writes should reach the backup without waiting for a batch).
    pub fn send_now(&self) {
        self.shared
            .send_now
            .store(true, std::sync::atomic::Ordering::Release);
        self.shared.wake_sender.notify_one();
    }

    /// A waiter for seq `seq` of `writer`.
    pub fn ack_waiter(&self, writer: WriterId, seq: Seq) -> AckWaiter {
        AckWaiter {
            writer,
            seq,
            committed: self.shared.causal.subscribe_committed(),
            degraded: self.shared.degraded.clone(),
            shutdown: self.shared.shutdown.subscribe(),
            group: self.shared.config.group.clone(),
        }
    }

    /// Whether the group is degraded to async now.
    pub fn is_degraded(&self) -> bool {
        *self.shared.degraded.borrow()
    }

    /// Subscribes to the degraded flag (the network path releases held packets
    /// while it is `true`).
    pub fn subscribe_degraded(&self) -> watch::Receiver<bool> {
        self.shared.degraded.clone()
    }

    /// A snapshot of the client's state.
    pub fn status(&self) -> ReplicationStatus {
        let mut s = ReplicationStatus {
            group: self.shared.config.group.clone(),
            endpoint: self.shared.config.endpoint.clone(),
            policy: self.shared.config.backup_loss,
            heartbeat_interval: self.shared.config.heartbeat_interval,
            heartbeat_timeout: self.shared.config.heartbeat_timeout,
            max_inflight_bytes: self.shared.max_permits,
            ..Default::default()
        };
        self.shared.lock().snapshot(Instant::now(), &mut s);
        s.detached = self.is_detached();
        s
    }

    /// Whether the client is detached (started so and not attached yet).
    pub fn is_detached(&self) -> bool {
        !*self.shared.attached.borrow()
    }

    /// While detached: a guard under which the caller writes locally only
    /// (nothing issued, nothing buffered); [`ReplicationClient::attach`] waits
    /// for it to be dropped. `None` once attached: submit as usual.
    pub async fn detached_guard(&self) -> Option<tokio::sync::RwLockReadGuard<'_, ()>> {
        if *self.shared.attached.borrow() {
            return None;
        }
        let guard = self.shared.attach_lock.read().await;
        // Attached while this waited: the write is replicated after all.
        (!*self.shared.attached.borrow()).then_some(guard)
    }

    /// Subscribes to the attached flag (`false` while detached).
    pub fn subscribe_attached(&self) -> watch::Receiver<bool> {
        self.shared.attached.subscribe()
    }

    /// Ends the detached state (one-way): waits until no local-only write is
    /// in progress, then lets the session connect to the backup. Every write
    /// that completes after this returns is issued and replicated. Returns
    /// `false` if the client was attached already.
    pub async fn attach(&self) -> bool {
        let _exclusive = self.shared.attach_lock.write().await;
        if *self.shared.attached.borrow() {
            return false;
        }
        // The backup's silence counts from now, not from the agent's start.
        self.shared.lock().restart_silence(Instant::now());
        self.shared.attached.send_replace(true);
        tracing::warn!(group = %self.shared.config.group, endpoint = %self.shared.config.endpoint,
            "attached: replicating to the backup from now on");
        true
    }

    /// Starts every writer's high-water marks ([`WriterStatus::peaks`]) afresh.
    pub fn reset_peaks(&self) {
        self.shared.lock().reset_peaks();
    }

    /// Stops the connection tasks; pending and later submits fail with
    /// [`ReplicationError::Stopped`]. Buffered writes are not sent any more.
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
        self.shared.room.close();
    }
}

impl Drop for ReplicationClient {
    fn drop(&mut self) {
        self.shutdown();
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_grow_across_runs_even_if_the_clock_does_not() {
        let dir = std::env::temp_dir().join(format!("pipecloud-gen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("generation");
        let a = fresh_generation(Some(&f)).unwrap();
        // A previous run far in the future (clock went backwards since).
        std::fs::write(&f, format!("{}\n", a + 1_000_000_000)).unwrap();
        let b = fresh_generation(Some(&f)).unwrap();
        assert_eq!(b, a + 1_000_000_001);
        let c = fresh_generation(Some(&f)).unwrap();
        assert!(c > b);
        std::fs::write(&f, "garbage").unwrap();
        assert!(fresh_generation(Some(&f)).is_err());
        assert!(fresh_generation(None).unwrap() > 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
