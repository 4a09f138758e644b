//! The epoch loop of one checkpointed protection group (docs/design.md §9):
//! every `interval`, pause all the group's guests ([`pause_group`]), open the next
//! epoch in the pure state machine ([`Epochs`]), continue the guests, and hand the
//! captured epoch to a shipper thread that queues its frames on the replication
//! connection ([`CheckpointLink`]); acks from the backup raise the epoch entry of
//! the committed vector, which releases held output through the ordinary netqueue.
//!
//! Tagging: the epoch entry of every local machine's pending vector is raised to
//! the open epoch when it opens (inside the pause, while every guest is stopped),
//! so every client-bound packet is tagged with it by the network path as today.
//! The barrier is read from the same pending vectors after the stops: entry `w` of
//! the machine that owns writer `w` is `w`'s last issued seq.
//!
//! Threads: the loop and the shipper are plain threads (QMP and the copies are
//! blocking work; a pause must not wait for an async runtime). Staging: two
//! buffer sets per group, one in capture and one in shipping; the loop takes a
//! free set before it pauses, so when shipping falls behind the next pause waits
//! (the guests keep running, their output stays held).
//!
//! Switching (docs/design.md §13): a driver started with [`EpochDriver::start_switchable`]
//! may begin disk-only ([`Phase::Off`]: the loop idles, tags carry no epoch) and
//! is switched by [`EpochDriver::request`] (`pipecloud ctl mode`). Switching in:
//! the loop attaches to the guests, pre-copies their RAM in rounds while they run
//! (each round of each guest shipped as a segment of the seeded epoch), then
//! pauses as usual, which makes the group checkpoint. Switching out: between two
//! pauses, once every captured epoch is shipped, the open epoch is closed and the
//! shipper sends `Leave` after the last `Commit`; when the backup acknowledges it,
//! the group's mode becomes the requested one. Every frame goes through the
//! shipper thread, so the order on the connection is the order of decisions.
//!
//! Failure: a capture error (QMP gone, a guest that cannot be stopped, a scan
//! refused) fails the group's epochs for good: the alarm is logged at `error`
//! and kept in [`EpochDriver::status`]; output stays held (never a silent fall
//! back to unprotected output); the loop ends. An ack or a welcome that does not
//! fit the state (a backup acknowledging what was never shipped) does the same.

use super::capture::{pause_group, Guest, GuestSpec, PauseTimes, Staged};
use crate::causal::CausalState;
use crate::replication::checkpoint::{CheckpointEvents, CheckpointLink};
use crate::replication::{Mode, ModeSwitch};
use anyhow::{anyhow, Context, Result};
use pipecloud_core::epoch::{Captured, EpochLimits, Epochs, PauseRefused, Phase};
use pipecloud_core::pagecodec::{Shadow, DEFAULT_SHADOW_BYTES};
use pipecloud_core::wire::{Checkpoint, Frame};
use pipecloud_core::{CountVector, WriterId, EPOCH_ENTRY};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How a group is checkpointed.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Time between the starts of two pauses.
    pub interval: Duration,
    /// Deadline of every QMP command.
    pub qmp_timeout: Duration,
    pub limits: EpochLimits,
    /// Local machines (index into the causal state) and the writer each owns.
    pub writers: Vec<(usize, WriterId)>,
    /// Every local machine index (their pending vectors carry the epoch).
    pub machines: Vec<usize>,
}

/// What `ctl status` shows of the epoch loop.
#[derive(Debug, Clone, Default)]
pub struct DriverStatus {
    pub open: u64,
    pub acked: u64,
    pub shipped: u64,
    /// Set once a capture (or the backup) failed: output is held for good.
    pub alarm: Option<String>,
    pub last_pause: Option<PauseTimes>,
    pub pauses: u64,
    /// Pauses skipped because shipping or acks were behind.
    pub stalls: u64,
    /// Dirty page bytes captured and handed to the shipper (issue 22 §2).
    pub raw_bytes: u64,
    /// Page bytes queued on the connection after encoding (`Pages` data).
    pub shipped_bytes: u64,
    /// The latest pauses summarised (figures; `None` before the first).
    pub recent: Option<RecentPauses>,
    /// Where the group is in checkpointing (docs/design.md §13).
    pub phase: Option<Phase>,
    /// Progress of a switch in: pre-copy round, pages copied by the rounds so
    /// far, pages the last round's scan reported written.
    pub seed_round: u32,
    pub seed_pages: u64,
    pub seed_last_dirty: u64,
    /// Since when the switch in progress runs.
    pub switch_started: Option<Instant>,
    /// How the last switch ended (or why it was refused or aborted).
    pub switch_last: Option<String>,
}

/// The latest pauses kept that `ctl status` summarises: 10 s of pauses at the
/// 20 ms interval (fewer when fewer were kept).
pub const PAUSE_WINDOW: usize = 500;

/// Pause time (first stop to last cont) and pages copied over the latest
/// [`PAUSE_WINDOW`] pauses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecentPauses {
    pub n: usize,
    pub p50: Duration,
    pub p99: Duration,
    /// Mean dirty pages copied per pause (the raw bytes of a checkpoint / 4 KiB).
    pub pages_mean: f64,
}

impl RecentPauses {
    /// Summarises pauses (newest last); `None` when there are none.
    pub fn of<'a>(pauses: impl DoubleEndedIterator<Item = &'a PauseTimes>) -> Option<Self> {
        let recent: Vec<&PauseTimes> = pauses.rev().take(PAUSE_WINDOW).collect();
        if recent.is_empty() {
            return None;
        }
        let mut t: Vec<Duration> = recent.iter().map(|p| p.total).collect();
        t.sort_unstable();
        let at = |q: f64| t[((t.len() - 1) as f64 * q).round() as usize];
        Some(RecentPauses {
            n: t.len(),
            p50: at(0.5),
            p99: at(0.99),
            pages_mean: recent.iter().map(|p| p.pages as f64).sum::<f64>() / t.len() as f64,
        })
    }
}

/// Most pre-copy rounds of a switch in; the pause after them copies the rest.
pub const MAX_SEED_ROUNDS: u32 = 8;
/// A pre-copy round that finds at most this many written pages is the last:
/// the pause copies what is written after it (~4 MiB here, ~1 ms of `memcpy`).
pub const SEED_DONE_PAGES: u64 = 1024;

/// A switch asked for through [`EpochDriver::request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    /// Into `checkpoint`, from `from` (restored if the switch is abandoned).
    In { from: Mode },
    /// Out of `checkpoint` (or out of seeding) to `to`.
    Out { to: Mode },
}

/// Pause records kept for [`EpochDriver::take_pauses`] (the oldest are dropped).
pub const MAX_PAUSE_RECORDS: usize = 16_384;

struct State {
    epochs: Epochs,
    /// The latest pauses, for figures (bounded by [`MAX_PAUSE_RECORDS`]).
    pauses: std::collections::VecDeque<PauseTimes>,
    /// The synchronised connection generation frames are shipped on (see
    /// `CheckpointLink`; 0: none yet, no pause happens).
    generation: u64,
    status: DriverStatus,
    request: Option<Request>,
    /// The mode to set once a `Leave` is acknowledged, and the one to restore
    /// if a switch in is abandoned.
    leave_to: Option<Mode>,
    seed_from: Option<Mode>,
    /// The connection generation a `Leave` was last queued on.
    leave_sent: u64,
}

struct Shared {
    state: Mutex<State>,
    causal: Arc<CausalState>,
    link: Arc<CheckpointLink>,
    stop: AtomicBool,
    group: String,
    /// Local machines whose pending vectors carry the epoch.
    machines: Vec<usize>,
    /// The group's mode (set when a switch completes or is abandoned; `None`
    /// for a driver that cannot switch).
    mode: Option<ModeSwitch>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raises the committed vector's epoch entry to this run's acknowledged epoch.
    fn publish(&self, st: &State) {
        let view = st.epochs.committed_view(&CountVector::ZERO);
        self.causal.publish_committed(&view);
    }

    /// Raises the tags to the epoch the state machine says (none while
    /// disk-only or seeding).
    fn raise(&self, st: &State) {
        let e = st.epochs.tag_epoch();
        if e > 0 {
            raise_epoch(&self.causal, &self.machines, e);
        }
    }

    /// After an event that may change the phase (an ack, a reconnection): a
    /// `Leave` acknowledged gives the group the requested mode (or the one a
    /// switch in started from); a group whose mode is still `checkpoint` (its
    /// period was abandoned by a reconnection before the first ack, or its
    /// switch in aborted) seeds again; a seeding or a period abandoned by a
    /// reconnection says so.
    fn settle(&self, st: &mut State, before: Phase) {
        let now = st.epochs.phase();
        if now == before {
            return;
        }
        st.status.phase = Some(now);
        let msg = match (before, now) {
            (Phase::Seeding { epoch }, Phase::Leaving { .. }) => Some(format!(
                "switch to checkpoint aborted: the backup connection was lost while seeding epoch {epoch}; leaving"
            )),
            (Phase::On, Phase::Leaving { .. }) if st.leave_to.is_none() => Some(
                "checkpointing abandoned: the backup connection was lost before the period's first checkpoint \
                 was acknowledged; leaving, then seeding again"
                    .to_owned(),
            ),
            (Phase::Leaving { epoch }, Phase::Off) => {
                let target = st.leave_to.take().or(st.seed_from.take());
                let current = self.mode.as_ref().map(ModeSwitch::get);
                if target == Some(Mode::Checkpoint)
                    || (target.is_none() && current == Some(Mode::Checkpoint))
                {
                    st.request = Some(Request::In {
                        from: Mode::Checkpoint,
                    });
                    Some(format!(
                        "left at epoch {epoch}; the group's mode is checkpoint: seeding again"
                    ))
                } else if let Some(to) = target {
                    if let Some(m) = &self.mode {
                        m.set(to);
                    }
                    let took = st.status.switch_started.take().map(|t| t.elapsed());
                    Some(format!(
                        "left checkpoint mode at epoch {epoch} (acknowledged): mode {to}{}",
                        took.map_or_else(String::new, |t| format!(" after {:.2}s", t.as_secs_f64()))
                    ))
                } else {
                    None // the start-up Leave of a disk-only group
                }
            }
            _ => None,
        };
        if let Some(msg) = msg {
            tracing::warn!(group = %self.group, "{msg}");
            st.status.switch_last = Some(msg);
        }
    }

    fn alarm(&self, st: &mut State, what: String) {
        tracing::error!(group = %self.group, "ALARM: checkpoint epochs stopped, client output held: {what}");
        st.epochs.capture_failed();
        st.status.alarm.get_or_insert(what);
        self.link.close();
    }
}

impl CheckpointEvents for Shared {
    fn connection(&self, generation: u64, backup_acked: u64) {
        let mut st = self.lock();
        if generation <= st.generation {
            return; // reported already
        }
        st.generation = generation;
        let before = st.epochs.phase();
        match st.epochs.reconnected(backup_acked) {
            Ok(()) => {
                // The first connection may move the numbering above the backup's.
                self.raise(&st);
                self.publish(&st);
                self.settle(&mut st, before);
            }
            Err(e) => self.alarm(&mut st, format!("backup connection: {e}")),
        }
    }

    fn ack(&self, generation: u64, epoch: u64) {
        let mut st = self.lock();
        if generation != st.generation {
            return; // an ack of a connection not (or no longer) ours
        }
        let before = st.epochs.phase();
        match st.epochs.ack(epoch) {
            Ok(true) => {
                self.publish(&st);
                self.settle(&mut st, before);
            }
            Ok(false) => {}
            Err(e) => self.alarm(&mut st, format!("backup ack: {e}")),
        }
    }
}

/// The running epoch loop of one group.
pub struct EpochDriver {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// What the shipper does with a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A captured epoch: its frames, then `Commit`.
    Epoch,
    /// A pre-copy round of a switch in: the frames of each guest as a segment
    /// of the seeded epoch, no `Commit`.
    Segment,
    /// `Leave { epoch }` (no staging set).
    Leave,
    /// Nothing to send: return the staging set to the pool.
    Recycle,
}

/// One job handed to the shipper.
struct ToShip {
    kind: Kind,
    epoch: u64,
    barrier: CountVector,
    names: Vec<(String, u64)>,
    staged: Vec<Staged>,
}

impl ToShip {
    fn recycle(staged: Vec<Staged>) -> Self {
        ToShip {
            kind: Kind::Recycle,
            epoch: 0,
            barrier: CountVector::ZERO,
            names: Vec::new(),
            staged,
        }
    }
}

impl EpochDriver {
    /// Starts the loop: attaches to the guests (waiting for their QMP sockets),
    /// then pauses every `interval`. Registers itself as `link`'s event handler.
    /// No pause happens before the link reports a synchronised connection
    /// (the numbering continues above the backup's acknowledged epoch).
    pub fn start(
        group: &str,
        specs: Vec<GuestSpec>,
        cfg: DriverConfig,
        causal: Arc<CausalState>,
        link: Arc<CheckpointLink>,
    ) -> Result<Self> {
        Self::launch(group, specs, cfg, causal, link, None)
    }

    /// Like [`EpochDriver::start`], for a group whose mode may be switched at run
    /// time (`mode`, shared with the disks, the network path and `ctl`): starts
    /// checkpointing if `mode` is `checkpoint`, else disk-only ([`Phase::Off`]),
    /// without touching the guests until a switch in.
    pub fn start_switchable(
        group: &str,
        specs: Vec<GuestSpec>,
        cfg: DriverConfig,
        causal: Arc<CausalState>,
        link: Arc<CheckpointLink>,
        mode: ModeSwitch,
    ) -> Result<Self> {
        Self::launch(group, specs, cfg, causal, link, Some(mode))
    }

    fn launch(
        group: &str,
        specs: Vec<GuestSpec>,
        cfg: DriverConfig,
        causal: Arc<CausalState>,
        link: Arc<CheckpointLink>,
        mode: Option<ModeSwitch>,
    ) -> Result<Self> {
        let on = mode.as_ref().is_none_or(|m| m.get() == Mode::Checkpoint);
        let epochs = if on {
            Epochs::new(cfg.limits)
        } else {
            Epochs::new_off(cfg.limits)
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                status: DriverStatus {
                    open: epochs.open(),
                    phase: Some(epochs.phase()),
                    ..DriverStatus::default()
                },
                epochs,
                pauses: std::collections::VecDeque::new(),
                generation: 0,
                request: None,
                leave_to: None,
                seed_from: None,
                leave_sent: 0,
            }),
            causal,
            link: Arc::clone(&link),
            stop: AtomicBool::new(false),
            group: group.to_owned(),
            machines: cfg.machines.clone(),
            mode,
        });
        // Checkpointing: output of the first epoch is tagged from the start.
        shared.raise(&shared.lock());
        link.set_events(Arc::clone(&shared) as Arc<dyn CheckpointEvents>);
        let (ship_tx, ship_rx) = sync_channel::<ToShip>(1);
        let (free_tx, free_rx) = sync_channel::<Vec<Staged>>(2);
        for _ in 0..2 {
            free_tx
                .send((0..specs.len()).map(|_| Staged::default()).collect())
                .map_err(|_| anyhow!("staging pool"))?;
        }
        let s = Arc::clone(&shared);
        let shipper = std::thread::Builder::new()
            .name(format!("pc-ship-{group}"))
            .spawn(move || ship_loop(&s, ship_rx, free_tx))
            .context("spawn the shipper thread")?;
        let s = Arc::clone(&shared);
        let looper = std::thread::Builder::new()
            .name(format!("pc-epoch-{group}"))
            .spawn(move || {
                if let Err(e) = epoch_loop(&s, specs, &cfg, ship_tx, free_rx) {
                    let mut st = s.lock();
                    s.alarm(&mut st, format!("{e:#}"));
                }
            })
            .context("spawn the epoch thread")?;
        Ok(EpochDriver {
            shared,
            threads: vec![shipper, looper],
        })
    }

    /// The pauses recorded since the last call (figures).
    pub fn take_pauses(&self) -> Vec<PauseTimes> {
        self.shared.lock().pauses.drain(..).collect()
    }

    /// The loop's state now.
    pub fn status(&self) -> DriverStatus {
        let st = self.shared.lock();
        let mut s = st.status.clone();
        s.open = st.epochs.open();
        s.acked = st.epochs.acked();
        s.shipped = st.epochs.shipped();
        s.recent = RecentPauses::of(st.pauses.iter());
        s.phase = Some(st.epochs.phase());
        s
    }

    /// Asks for a run-time switch to `to` (docs/design.md §13); answers at once
    /// with what will happen, or why not. `ctl status` shows the progress.
    /// Switching in needs the replication connection up (the caller checks the
    /// session; this checks that the backup's epoch is known).
    pub fn request(&self, to: Mode) -> Result<String, String> {
        let Some(mode) = &self.shared.mode else {
            return Err("this group's epoch loop cannot switch modes".into());
        };
        let mut st = self.shared.lock();
        if let Some(a) = &st.status.alarm {
            return Err(format!(
                "the group's checkpoint epochs failed ({a}); restart the agent"
            ));
        }
        let from = mode.get();
        let phase = st.epochs.phase();
        let busy = |st: &State| {
            st.request.map(|r| {
                format!("a switch is already requested ({r:?}); wait for it (`ctl status`)")
            })
        };
        let group = &self.shared.group;
        match (phase, to) {
            (Phase::Off, Mode::Checkpoint) => {
                if let Some(b) = busy(&st) {
                    return Err(b);
                }
                if !st.epochs.synced() || st.generation == 0 {
                    return Err("the backup's acknowledged epoch is not known yet (not connected): try again once `ctl status` shows the group connected"
                        .into());
                }
                st.request = Some(Request::In { from });
                st.status.switch_started = Some(Instant::now());
                st.status.switch_last = None;
                // Output is held by the disk rule from now on (as `pipelined`);
                // the epoch rule starts at the first pause.
                mode.set(Mode::Checkpoint);
                Ok(format!(
                    "group {group}: mode {from} -> checkpoint: pre-copying the guests' RAM, then the first checkpoint (`ctl status` shows the progress)"
                ))
            }
            (Phase::Off, _) => Err(format!("group {group} is not checkpointing")),
            (Phase::On | Phase::Seeding { .. }, Mode::Checkpoint) => Err(format!(
                "group {group} is already {}",
                if phase == Phase::On { "checkpointing" } else { "switching to checkpoint (seeding)" }
            )),
            (Phase::On | Phase::Seeding { .. }, _) => {
                if matches!(st.request, Some(Request::Out { .. })) {
                    return Err(busy(&st).unwrap_or_default());
                }
                st.request = Some(Request::Out { to });
                st.status.switch_started = Some(Instant::now());
                Ok(format!(
                    "group {group}: mode checkpoint -> {to}: leaving after the epoch in progress (`ctl status` shows when the backup acknowledged it)"
                ))
            }
            (Phase::Leaving { epoch }, _) => Err(format!(
                "group {group} is leaving checkpoint mode (epoch {epoch} not yet acknowledged by the backup); wait for it"
            )),
        }
    }
}

impl DriverStatus {
    /// One line for `ctl status`; an alarm comes first and loud.
    pub fn line(&self, group: &str) -> String {
        let alarm = self
            .alarm
            .as_deref()
            .map_or_else(String::new, |a| format!("ALARM (output held): {a}; "));
        let pause = self.last_pause.map_or_else(
            || "-".to_owned(),
            |p| format!("{:.2}ms/{}pages", p.total.as_secs_f64() * 1e3, p.pages),
        );
        let recent = self.recent.map_or_else(String::new, |r| {
            format!(
                " recent_pauses={} pause_p50_ms={:.2} pause_p99_ms={:.2} pages_per_pause={:.1}",
                r.n,
                r.p50.as_secs_f64() * 1e3,
                r.p99.as_secs_f64() * 1e3,
                r.pages_mean
            )
        });
        let phase = match self.phase {
            Some(Phase::Off) | None => "off".to_owned(),
            Some(Phase::Seeding { epoch }) => format!("seeding:{epoch}"),
            Some(Phase::On) => "on".to_owned(),
            Some(Phase::Leaving { epoch }) => format!("leaving:{epoch}"),
        };
        let took = self.switch_started.map_or_else(String::new, |t| {
            format!(" switching_for={:.1}s", t.elapsed().as_secs_f64())
        });
        let last = self
            .switch_last
            .as_deref()
            .map_or_else(String::new, |l| format!(" last_switch={l:?}"));
        format!(
            "epochs {group}: {alarm}phase={phase} open={} shipped={} acked={} lag={} pauses={} stalled={} last_pause={pause} seed_round={} seed_pages={} seed_last_dirty={} raw_bytes={} shipped_bytes={}{took}{last}{recent}",
            self.open,
            self.shipped,
            self.acked,
            match self.phase {
                Some(Phase::On | Phase::Leaving { .. }) => self.open.saturating_sub(self.acked + 1),
                _ => 0,
            },
            self.pauses,
            self.stalls,
            self.seed_round,
            self.seed_pages,
            self.seed_last_dirty,
            self.raw_bytes,
            self.shipped_bytes
        )
    }
}

impl Drop for EpochDriver {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.link.close();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn raise_epoch(causal: &CausalState, machines: &[usize], epoch: u64) {
    // The epoch entry is "one more entry" of the pending vector (core::vector).
    for &m in machines {
        causal.raise_writer(m, WriterId(EPOCH_ENTRY as u8), epoch);
    }
}

/// Attaches to every guest, waiting for each (forever, or up to `deadline`:
/// a switch in fails rather than waits for a guest that is not there).
fn attach_all(
    shared: &Shared,
    specs: &[GuestSpec],
    cfg: &DriverConfig,
    deadline: Option<Duration>,
) -> Result<Vec<Guest>> {
    let began = Instant::now();
    let mut guests = Vec::new();
    for spec in specs {
        let mut last_log = None::<Instant>;
        let mut last_err = None;
        let g = loop {
            if shared.stop.load(Ordering::Acquire) {
                return Err(anyhow!("stopped"));
            }
            if deadline.is_some_and(|d| began.elapsed() > d) {
                return Err(anyhow!(
                    "guest {} not attachable and running within {deadline:?}: {}",
                    spec.name,
                    last_err.unwrap_or_else(|| "not running".to_owned())
                ));
            }
            match Guest::attach(spec.clone(), cfg.qmp_timeout) {
                Ok(mut g) => {
                    // A guest the launcher keeps stopped (-S, `prelaunch`) is not
                    // checkpointed yet; one left `paused` by an agent killed
                    // mid-pause is (its first pause continues it).
                    match g.qmp().status() {
                        Ok(s) if s == "running" => break g,
                        Ok(s) if s == "paused" => {
                            tracing::warn!(group = %shared.group, guest = %spec.name,
                                "guest found paused (an agent stopped mid-pause?): the next pause continues it");
                            break g;
                        }
                        _ => {}
                    }
                }
                Err(e) => {
                    last_err = Some(format!("{e:#}"));
                    if last_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::info!(group = %shared.group, guest = %spec.name,
                            "waiting for the guest (output held): {e:#}");
                        last_log = Some(Instant::now());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        tracing::info!(group = %shared.group, guest = %spec.name, ram_bytes = g.ram_bytes(),
            "checkpointing the guest");
        guests.push(g);
    }
    Ok(guests)
}

/// What the epoch thread does next (decided under the state lock).
enum Next {
    /// Nothing to do now: wait a little.
    Idle,
    /// Switch in: pre-copy epoch `S`, then pause.
    Seed(u64),
    /// Queue `Leave { epoch }` on the connection.
    Leave(u64),
    /// Pause when the interval is up.
    Pause,
}

fn next_step(shared: &Shared, st: &mut State) -> Next {
    let before = st.epochs.phase();
    match (before, st.request) {
        (Phase::Off, Some(Request::In { from })) => {
            st.request = None;
            match st.epochs.start_seeding() {
                Ok(epoch) => {
                    st.seed_from = Some(from);
                    st.status.phase = Some(st.epochs.phase());
                    st.status.seed_round = 0;
                    st.status.seed_pages = 0;
                    st.status.seed_last_dirty = 0;
                    tracing::warn!(group = %shared.group, epoch, "switching to checkpoint: pre-copying");
                    Next::Seed(epoch)
                }
                Err(e) => {
                    if let Some(m) = &shared.mode {
                        m.set(from);
                    }
                    st.status.switch_started = None;
                    st.status.switch_last = Some(format!("switch to checkpoint refused: {e}"));
                    Next::Idle
                }
            }
        }
        (Phase::On | Phase::Seeding { .. }, Some(Request::Out { to })) => match st.epochs.leave() {
            Ok(epoch) => {
                st.request = None;
                st.leave_to = Some(to);
                if matches!(before, Phase::Seeding { .. }) {
                    // Abandoned: the mode to return to is the requested one.
                    st.seed_from = None;
                }
                st.status.phase = Some(st.epochs.phase());
                shared.raise(st);
                st.leave_sent = u64::MAX; // queued; the shipper records the generation
                tracing::warn!(group = %shared.group, epoch, %to, "leaving checkpoint mode");
                Next::Leave(epoch)
            }
            // Shipping behind or a pause in progress: the next turn.
            Err(_) => Next::Idle,
        },
        (Phase::Off, Some(Request::Out { to })) => {
            // A switch out asked for while seeding, which a reconnection aborted.
            st.request = None;
            if let Some(m) = &shared.mode {
                m.set(to);
            }
            st.status.switch_started = None;
            Next::Idle
        }
        (Phase::Leaving { epoch }, _)
            if st.leave_sent != st.generation && st.leave_sent != u64::MAX && st.generation > 0 =>
        {
            st.leave_sent = u64::MAX; // queued; the shipper records the generation
            Next::Leave(epoch)
        }
        (Phase::On | Phase::Seeding { .. }, _) => Next::Pause,
        _ => Next::Idle,
    }
}

fn epoch_loop(
    shared: &Shared,
    specs: Vec<GuestSpec>,
    cfg: &DriverConfig,
    ship: SyncSender<ToShip>,
    free: Receiver<Vec<Staged>>,
) -> Result<()> {
    // Checkpointing from the start: wait for the guests (output held). A
    // switchable group that starts disk-only attaches at its first switch in.
    let mut guests = if shared.lock().epochs.phase() == Phase::On {
        Some(attach_all(shared, &specs, cfg, None)?)
    } else {
        None
    };
    let mut next = Instant::now();
    while !shared.stop.load(Ordering::Acquire) {
        let step = {
            let mut st = shared.lock();
            next_step(shared, &mut st)
        };
        match step {
            Next::Idle => {
                std::thread::sleep(cfg.interval.min(Duration::from_millis(20)));
                continue;
            }
            Next::Leave(epoch) => {
                let job = ToShip {
                    kind: Kind::Leave,
                    epoch,
                    barrier: CountVector::ZERO,
                    names: Vec::new(),
                    staged: Vec::new(),
                };
                if ship.send(job).is_err() {
                    return Ok(());
                }
                continue;
            }
            Next::Seed(epoch) => {
                if guests.is_none() {
                    match attach_all(shared, &specs, cfg, Some(cfg.qmp_timeout * 2)) {
                        Ok(g) => guests = Some(g),
                        Err(e) => {
                            abandon_seeding(shared, format!("attaching to the guests: {e:#}"));
                            continue;
                        }
                    }
                }
                let Some(g) = guests.as_mut() else { continue };
                match seed(shared, g, epoch, &ship, &free) {
                    Ok(true) => next = Instant::now(), // the first pause at once
                    Ok(false) => continue,             // aborted or abandoned
                    Err(e) => {
                        abandon_seeding(shared, format!("pre-copy: {e:#}"));
                        continue;
                    }
                }
            }
            Next::Pause => {}
        }
        let Some(guests) = guests.as_mut() else {
            continue;
        };
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next = (next + cfg.interval).max(Instant::now());
        let may = shared.lock().epochs.may_pause();
        if let Err(why) = may {
            if !matches!(why, PauseRefused::NotOn(_)) {
                shared.lock().status.stalls += 1;
            }
            tracing::debug!(group = %shared.group, "no pause: {why}");
            continue;
        }
        // A free staging set: waits while shipping is behind.
        let Ok(mut staged) = free.recv() else {
            return Ok(());
        };
        let mut pause = None;
        let r = pause_group(guests, &mut staged, || {
            let mut issued = CountVector::ZERO;
            for &(m, w) in &cfg.writers {
                issued.set(w.index(), shared.causal.sync_pending(m).get(w.index()));
            }
            let mut st = shared.lock();
            let before = st.epochs.phase();
            let p = st.epochs.begin_pause(&issued)?;
            shared.raise(&st);
            if before != Phase::On {
                st.status.phase = Some(Phase::On);
                tracing::warn!(group = %shared.group, epoch = p.epoch,
                    "switch to checkpoint: first checkpoint captured; output now waits for its epoch");
            }
            let full = p.full_ram;
            pause = Some(p);
            Ok(full)
        });
        let mut st = shared.lock();
        let t = match r {
            Ok(t) => t,
            Err(e) if pause.is_none() && e.downcast_ref::<PauseRefused>().is_some() => {
                // The phase changed between the check and the stop (a seeding
                // aborted by a reconnection): nothing was captured.
                drop(st);
                if ship.send(ToShip::recycle(staged)).is_err() {
                    return Ok(());
                }
                continue;
            }
            Err(e) => {
                shared.alarm(&mut st, format!("capture: {e:#}"));
                return Ok(());
            }
        };
        let p = pause.ok_or_else(|| anyhow!("pause without an epoch"))?;
        st.status.pauses += 1;
        st.status.last_pause = Some(t);
        if st.pauses.len() == MAX_PAUSE_RECORDS {
            st.pauses.pop_front();
        }
        st.pauses.push_back(t);
        match st.epochs.capture_done(p.epoch)? {
            Captured::Ship => {
                drop(st);
                // TEST-ONLY (scripts/fault-fullstate.sh): release the output of
                // the epoch just opened at once, before any checkpoint holds it
                // (let alone an acknowledged one).
                #[cfg(feature = "fault-release-before-ack")]
                {
                    let mut c = CountVector::ZERO;
                    c.set(EPOCH_ENTRY, p.epoch + 1);
                    shared.causal.publish_committed(&c);
                }
                let job = ToShip {
                    kind: Kind::Epoch,
                    epoch: p.epoch,
                    barrier: p.barrier,
                    names: guest_names(guests),
                    staged,
                };
                if ship.send(job).is_err() {
                    return Ok(());
                }
            }
            Captured::GiveUp => {
                drop(st);
                if ship.send(ToShip::recycle(staged)).is_err() {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

fn guest_names(guests: &[Guest]) -> Vec<(String, u64)> {
    guests
        .iter()
        .map(|g| (g.name().to_owned(), g.ram_bytes()))
        .collect()
}

/// The pre-copy of a switch in (docs/design.md §13): rounds of
/// [`Guest::precopy`] while the guests run, each shipped as segments of
/// `epoch`, until a round finds at most [`SEED_DONE_PAGES`] written pages or
/// [`MAX_SEED_ROUNDS`] ran. `Ok(false)`: the seeding ended otherwise (a
/// reconnection aborted it, or a switch out abandoned it).
fn seed(
    shared: &Shared,
    guests: &mut [Guest],
    epoch: u64,
    ship: &SyncSender<ToShip>,
    free: &Receiver<Vec<Staged>>,
) -> Result<bool> {
    let names = guest_names(guests);
    for round in 1..=MAX_SEED_ROUNDS {
        let seeding =
            |st: &State| st.epochs.phase() == (Phase::Seeding { epoch }) && st.request.is_none();
        if shared.stop.load(Ordering::Acquire) || !seeding(&shared.lock()) {
            return Ok(false);
        }
        // A free staging set: waits while the previous round is being shipped.
        let Ok(mut staged) = free.recv() else {
            return Ok(false);
        };
        let mut dirty = 0;
        let mut copied = 0;
        let mut failed = None;
        for (g, s) in guests.iter_mut().zip(staged.iter_mut()) {
            match g.precopy(round == 1, s) {
                Ok(d) => {
                    dirty += d;
                    copied += s.pages();
                }
                Err(e) => {
                    failed = Some(e.context(format!("guest {}", g.name())));
                    break;
                }
            }
        }
        let go_on = {
            let mut st = shared.lock();
            st.status.seed_round = round;
            st.status.seed_pages += copied;
            st.status.seed_last_dirty = dirty;
            failed.is_none() && seeding(&st)
        };
        if !go_on {
            if ship.send(ToShip::recycle(staged)).is_err() {
                return Ok(false);
            }
            return match failed {
                Some(e) => Err(e),
                None => Ok(false),
            };
        }
        tracing::info!(group = %shared.group, epoch, round, dirty, copied, "pre-copy round");
        let job = ToShip {
            kind: Kind::Segment,
            epoch,
            barrier: CountVector::ZERO,
            names: names.clone(),
            staged,
        };
        if ship.send(job).is_err() {
            return Ok(false);
        }
        if round > 1 && dirty <= SEED_DONE_PAGES {
            break;
        }
    }
    Ok(true)
}

/// A switch in that cannot go on (the guests cannot be attached or read):
/// leave like a switch out (the backup drops the segments), back to the mode
/// the group had.
fn abandon_seeding(shared: &Shared, why: String) {
    let mut st = shared.lock();
    let from = st.seed_from.take().unwrap_or(Mode::Pipelined);
    let msg = format!("switch to checkpoint abandoned: {why}; back to mode {from}");
    tracing::error!(group = %shared.group, "{msg}");
    st.status.switch_last = Some(msg);
    if st.epochs.phase() != Phase::Off {
        st.request = Some(Request::Out { to: from });
    } else if let Some(m) = &shared.mode {
        m.set(from);
        st.status.switch_started = None;
    }
}

fn ship_loop(shared: &Shared, jobs: Receiver<ToShip>, free: SyncSender<Vec<Staged>>) {
    // Per guest: the copies of its pages last shipped on the connection (bounded
    // by DEFAULT_SHADOW_BYTES each), the reference of the compressed encodings.
    let mut shadows: Vec<Shadow> = Vec::new();
    for job in jobs {
        if matches!(job.kind, Kind::Epoch | Kind::Segment) && shadows.len() != job.names.len() {
            // PIPECLOUD_CKPT_RAW=1: uncompressed pages (A/B figures);
            // PIPECLOUD_CKPT_SHADOW_MIB: the shadow cap (docs/design.md §14).
            let raw = std::env::var_os("PIPECLOUD_CKPT_RAW").is_some_and(|v| v == "1");
            let cap = std::env::var("PIPECLOUD_CKPT_SHADOW_MIB")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(DEFAULT_SHADOW_BYTES, |m| m << 20);
            shadows = job
                .names
                .iter()
                .map(|(_, ram)| {
                    if raw {
                        Shadow::raw_only()
                    } else {
                        Shadow::new(cap, *ram)
                    }
                })
                .collect();
        }
        let r = match job.kind {
            Kind::Epoch | Kind::Segment => ship_one(shared, &job, &mut shadows),
            Kind::Leave => ship_leave(shared, job.epoch),
            Kind::Recycle => Ok(()),
        };
        if let Err(e) = r {
            let mut st = shared.lock();
            shared.alarm(&mut st, format!("shipping epoch {}: {e:#}", job.epoch));
        }
        if job.kind != Kind::Leave && free.send(job.staged).is_err() {
            return;
        }
    }
}

/// Queues `Leave { epoch }` after everything shipped before it.
fn ship_leave(shared: &Shared, epoch: u64) -> Result<()> {
    let generation = shared.lock().generation;
    let sent = shared
        .link
        .push(generation, &Frame::Checkpoint(Checkpoint::Leave { epoch }))?;
    let mut st = shared.lock();
    // Not queued (the connection changed): the loop sends it on the new one.
    st.leave_sent = if sent { generation } else { 0 };
    Ok(())
}

/// Queues the frames of one epoch (or one pre-copy round of it: no `Commit`);
/// gives the epoch up if the connection changes.
fn ship_one(shared: &Shared, job: &ToShip, shadows: &mut [Shadow]) -> Result<()> {
    let generation = {
        let st = shared.lock();
        if job.epoch <= st.epochs.shipped() {
            return Ok(()); // given up at a reconnection
        }
        st.generation
    };
    let link = &shared.link;
    let mut torn = false;
    let (mut raw, mut shipped) = (0u64, 0u64);
    for (((name, ram_bytes), staged), shadow) in job.names.iter().zip(&job.staged).zip(shadows) {
        raw += staged.data.len() as u64;
        shadow.connection(generation);
        staged.frames(name, job.epoch, *ram_bytes, shadow, |f| {
            if let Checkpoint::Pages { data, .. } = &f {
                shipped += data.len() as u64;
            }
            if !torn && !link.push(generation, &Frame::Checkpoint(f))? {
                torn = true;
            }
            Ok(())
        })?;
    }
    {
        let mut st = shared.lock();
        st.status.raw_bytes += raw;
        st.status.shipped_bytes += shipped;
    }
    if torn || job.kind == Kind::Segment {
        return Ok(()); // a segment has no Commit; a torn epoch was given up
    }
    // Shipped before the Commit is queued: its ack cannot arrive earlier. Should
    // the Commit not go out, a reconnection (which gives the epoch up) is why.
    shared.lock().epochs.ship_done(job.epoch)?;
    let commit = Frame::Checkpoint(Checkpoint::Commit {
        epoch: job.epoch,
        barrier: job.barrier,
    });
    link.push(generation, &commit)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pause(ms: u64, pages: u64) -> PauseTimes {
        PauseTimes {
            total: Duration::from_millis(ms),
            pages,
            ..PauseTimes::default()
        }
    }

    #[test]
    fn recent_pauses_summarise_the_latest_window_only() {
        assert_eq!(RecentPauses::of(std::iter::empty()), None);
        // 100 old long pauses, then a full window of 1..=500 ms.
        let mut v: Vec<PauseTimes> = (0..100).map(|_| pause(10_000, 7)).collect();
        v.extend((1..=PAUSE_WINDOW as u64).map(|ms| pause(ms, 2)));
        let r = RecentPauses::of(v.iter()).expect("pauses");
        assert_eq!(r.n, PAUSE_WINDOW);
        assert_eq!(r.p50, Duration::from_millis(251));
        assert_eq!(r.p99, Duration::from_millis(495));
        assert!((r.pages_mean - 2.0).abs() < 1e-9);
        let line = DriverStatus {
            recent: Some(r),
            ..DriverStatus::default()
        }
        .line("g");
        assert!(
            line.ends_with(
                " recent_pauses=500 pause_p50_ms=251.00 pause_p99_ms=495.00 pages_per_pause=2.0"
            ),
            "{line}"
        );
    }
}
