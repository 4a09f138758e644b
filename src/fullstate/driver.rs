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
//! Failure: a capture error (QMP gone, a guest that cannot be stopped, a scan
//! refused) fails the group's epochs for good: the alarm is logged at `error`
//! and kept in [`EpochDriver::status`]; output stays held (never a silent fall
//! back to unprotected output); the loop ends. An ack or a welcome that does not
//! fit the state (a backup acknowledging what was never shipped) does the same.

use super::capture::{pause_group, Guest, GuestSpec, PauseTimes, Staged};
use crate::causal::CausalState;
use crate::replication::checkpoint::{CheckpointEvents, CheckpointLink};
use anyhow::{anyhow, Context, Result};
use pipecloud_core::epoch::{Captured, EpochLimits, Epochs};
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
}

struct Shared {
    state: Mutex<State>,
    causal: Arc<CausalState>,
    link: Arc<CheckpointLink>,
    stop: AtomicBool,
    group: String,
    /// Local machines whose pending vectors carry the epoch.
    machines: Vec<usize>,
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
        match st.epochs.reconnected(backup_acked) {
            Ok(()) => {
                // The first connection may move the numbering above the backup's.
                raise_epoch(&self.causal, &self.machines, st.epochs.open());
                self.publish(&st);
            }
            Err(e) => self.alarm(&mut st, format!("backup connection: {e}")),
        }
    }

    fn ack(&self, generation: u64, epoch: u64) {
        let mut st = self.lock();
        if generation != st.generation {
            return; // an ack of a connection not (or no longer) ours
        }
        match st.epochs.ack(epoch) {
            Ok(true) => self.publish(&st),
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

/// One epoch handed to the shipper.
struct ToShip {
    epoch: u64,
    barrier: CountVector,
    names: Vec<(String, u64)>,
    staged: Vec<Staged>,
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
        let epochs = Epochs::new(cfg.limits);
        let first = epochs.open();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                status: DriverStatus {
                    open: epochs.open(),
                    ..DriverStatus::default()
                },
                epochs,
                pauses: std::collections::VecDeque::new(),
                generation: 0,
            }),
            causal,
            link: Arc::clone(&link),
            stop: AtomicBool::new(false),
            group: group.to_owned(),
            machines: cfg.machines.clone(),
        });
        // Output of the first epoch is tagged from the start.
        raise_epoch(&shared.causal, &cfg.machines, first);
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
        s
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
        format!(
            "epochs {group}: {alarm}open={} shipped={} acked={} pauses={} stalled={} last_pause={pause} \
             raw_bytes={} shipped_bytes={}{recent}",
            self.open, self.shipped, self.acked, self.pauses, self.stalls, self.raw_bytes, self.shipped_bytes
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

fn attach_all(shared: &Shared, specs: &[GuestSpec], cfg: &DriverConfig) -> Result<Vec<Guest>> {
    let mut guests = Vec::new();
    for spec in specs {
        let mut last_log = None::<Instant>;
        let g = loop {
            if shared.stop.load(Ordering::Acquire) {
                return Err(anyhow!("stopped"));
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

fn epoch_loop(
    shared: &Shared,
    specs: Vec<GuestSpec>,
    cfg: &DriverConfig,
    ship: SyncSender<ToShip>,
    free: Receiver<Vec<Staged>>,
) -> Result<()> {
    let mut guests = attach_all(shared, &specs, cfg)?;
    let names: Vec<(String, u64)> = guests
        .iter()
        .map(|g| (g.name().to_owned(), g.ram_bytes()))
        .collect();
    let mut next = Instant::now();
    while !shared.stop.load(Ordering::Acquire) {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next = (next + cfg.interval).max(Instant::now());
        let may = shared.lock().epochs.may_pause();
        if let Err(why) = may {
            shared.lock().status.stalls += 1;
            tracing::debug!(group = %shared.group, "no pause: {why}");
            continue;
        }
        // A free staging set: waits while shipping is behind.
        let Ok(mut staged) = free.recv() else {
            return Ok(());
        };
        let mut pause = None;
        let r = pause_group(&mut guests, &mut staged, || {
            let mut issued = CountVector::ZERO;
            for &(m, w) in &cfg.writers {
                issued.set(w.index(), shared.causal.sync_pending(m).get(w.index()));
            }
            let mut st = shared.lock();
            let p = st.epochs.begin_pause(&issued)?;
            raise_epoch(&shared.causal, &cfg.machines, st.epochs.open());
            let full = p.full_ram;
            pause = Some(p);
            Ok(full)
        });
        let mut st = shared.lock();
        let t = match r {
            Ok(t) => t,
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
                    epoch: p.epoch,
                    barrier: p.barrier,
                    names: names.clone(),
                    staged,
                };
                if ship.send(job).is_err() {
                    return Ok(());
                }
            }
            Captured::GiveUp => {
                drop(st);
                // Nothing to ship: epoch 0 only returns the set to the pool.
                let job = ToShip {
                    epoch: 0,
                    barrier: CountVector::ZERO,
                    names: Vec::new(),
                    staged,
                };
                if ship.send(job).is_err() {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

fn ship_loop(shared: &Shared, jobs: Receiver<ToShip>, free: SyncSender<Vec<Staged>>) {
    // Per guest: the copies of its pages last shipped on the connection (bounded
    // by DEFAULT_SHADOW_BYTES each), the reference of the compressed encodings.
    let mut shadows: Vec<Shadow> = Vec::new();
    for job in jobs {
        if job.epoch > 0 {
            if shadows.len() != job.names.len() {
                shadows = job
                    .names
                    .iter()
                    .map(|(_, ram)| Shadow::new(DEFAULT_SHADOW_BYTES, *ram))
                    .collect();
            }
            if let Err(e) = ship_one(shared, &job, &mut shadows) {
                let mut st = shared.lock();
                shared.alarm(&mut st, format!("shipping epoch {}: {e:#}", job.epoch));
            }
        }
        if free.send(job.staged).is_err() {
            return;
        }
    }
}

/// Queues the frames of one epoch; gives the epoch up if the connection changes.
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
    if torn {
        return Ok(()); // the reconnection gave it up
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
