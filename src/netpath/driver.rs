//! The thin I/O driver of the network path: one dedicated OS thread per group
//! and host that owns the tag, local and hold queue sockets and feeds their
//! packets to the sans-I/O decisions of the parent module.
//!
//! # Why a thread that busy-polls
//!
//! On this kind of (virtual) machine, what a bare NFQUEUE round trip costs is
//! mostly the wake-up of the sleeping reader, not the work: an accept-all loop
//! on tokio or on a thread blocked in `poll(2)` adds about three times the
//! latency per queue traversal of the same loop kept polling for a moment after
//! each packet (`examples/netpath_bench.rs`; `docs/machine.md`, "Wake-ups are
//! the cost"). So the
//! thread, after handling anything, keeps polling its sockets (non-blocking
//! `recv`) for [`NetPathConfig::busy_poll`] before it sleeps in `poll(2)` on
//! the three sockets and a [`Wake`]. Busy polling only costs CPU while traffic
//! flows: an idle group sleeps. `busy_poll = 0` never spins, and is the default:
//! under load the spinning takes CPU from the guests: on 2 cores, pipelined
//! TPC-B at 64 clients was lower with 50 µs busy polling than without
//! (`pipecloud-harness figures --parts a --variants async,pipelined --workloads
//! tpcb --clients 64`; README, tuning). Hosts with cores to spare and
//! latency-sensitive traffic set `busy_poll_us = 50`.
//!
//! Wake-ups while asleep: a packet on any socket, a raise of the committed
//! vector ([`CausalState::wake_on_commit`]), a bypass change
//! ([`BypassSwitch::set`]), stop, or the next kernel-counter reading.
//!
//! Order of work in each pass: stop, bypass change, committed change (both
//! release held packets), then at most [`BURST`] datagrams from each of the
//! hold, tag and local sockets, each burst's verdicts in one `sendmsg`.

use super::metrics::M;
use super::{
    decide_tag, decision, Action, Directory, HoldEngine, HoldOutcome, NetPathMetrics, PacketInfo,
    TagEvent, TagPolicy,
};
use crate::causal::CausalState;
use crate::ebpf::{KernelTagger, COUNTED_MARK};
use crate::netfilter::{NetTopology, QueuePlan};
use crate::nfq::netns::in_netns;
use crate::nfq::proto::{self, Message, PacketMsg, Verdict};
use crate::nfq::{NfqError, NfqSocket, QueueConfig, Received};
use crate::wake::Wake;
use pipecloud_core::netqueue::NetQueueLimits;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Ethertype of IPv4.
const ETH_P_IP: u16 = 0x0800;
/// Most datagrams taken from one socket before its verdicts are sent and the
/// next socket gets its turn.
const BURST: usize = 64;
/// How often the kernel's queue counters are read into the metrics.
const KERNEL_STATS_EVERY: Duration = Duration::from_secs(1);
/// Default [`NetPathConfig::busy_poll`]: off. Busy polling cuts the added
/// latency per packet but takes CPU from the guests while packets flow; on a
/// 2-core host it cost pipelined TPC-B throughput at 64 clients (module docs).
pub const DEFAULT_BUSY_POLL: Duration = Duration::ZERO;
/// A busy-polling window that measured well for latency (50 µs).
pub const LOW_LATENCY_BUSY_POLL: Duration = Duration::from_micros(50);

/// Settings of the network path on one host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetPathConfig {
    /// This host's name in the topology.
    pub host: String,
    /// Queue numbers (must match the installed rules).
    pub queues: QueuePlan,
    /// Network namespace of the queues (dom0); `None`: the caller's.
    pub netns: Option<PathBuf>,
    /// Receive GSO super-packets whole on the local and hold queues (the tag
    /// queue never does).
    pub gso: bool,
    /// Socket receive buffer per queue socket.
    pub rcvbuf: usize,
    /// Tagger options.
    pub tag_policy: TagPolicy,
    /// Netqueue bounds.
    pub limits: NetQueueLimits,
    /// Most packets per batch verdict when releasing.
    pub release_chunk: usize,
    /// How long the driver thread keeps polling after its last work before it
    /// sleeps (module docs); zero: sleep at once.
    pub busy_poll: Duration,
    /// `SCHED_FIFO` priority of the driver thread, 0: normal scheduling
    /// (`host.netpath_priority`, docs/design.md §18). A refusal (no
    /// `CAP_SYS_NICE`) is logged and counted; the thread runs on at normal
    /// priority.
    pub priority: u8,
    /// Tag and strip cross-host packets in the kernel ([`crate::ebpf`]),
    /// marking what it handled with this mark; the rules must be installed
    /// with the same mark (they queue the unmarked rest). `None`: the tag
    /// queue takes every cross-host packet.
    pub kernel_tagger: Option<u32>,
    /// The dom0-side interface of each local machine
    /// ([`crate::netfilter::resolve_links`]): IPv6 packets, and IPv4 ones from
    /// an address that is no machine's, are attributed by their input
    /// interface. Without it they are dropped (counted as unknown).
    pub links: Vec<crate::netfilter::MachineLink>,
    /// The group's lease gate (docs/design.md §7): while it is closed the
    /// driver sends no verdict at all, so nothing leaves (fail-closed).
    /// `None`: the group has no `[quorum]`.
    pub lease_gate: Option<Arc<pipecloud_quorum::LeaseGate>>,
}

impl NetPathConfig {
    /// Defaults for host `host`: the group's queue block, GSO on, 64 MiB socket
    /// buffers, pure ACKs untagged, netqueue limits sized to the hold queues,
    /// [`DEFAULT_BUSY_POLL`].
    pub fn new(topo: &NetTopology, host: &str, limits: NetQueueLimits) -> NetPathConfig {
        NetPathConfig {
            host: host.to_owned(),
            queues: QueuePlan::for_group(topo.group_id, limits.max_packets as u64),
            netns: None,
            gso: true,
            rcvbuf: crate::nfq::DEFAULT_RCVBUF,
            tag_policy: TagPolicy::default(),
            limits,
            release_chunk: 1024,
            busy_poll: DEFAULT_BUSY_POLL,
            priority: 0,
            kernel_tagger: None,
            links: Vec::new(),
            lease_gate: None,
        }
    }
}

/// Errors of the network path.
#[derive(Debug, thiserror::Error)]
pub enum NetPathError {
    /// The NFQUEUE driver failed.
    #[error(transparent)]
    Nfq(#[from] NfqError),
    /// The causal state does not match the topology.
    #[error("causal state tracks {state} machines, the topology has {topology}")]
    StateMismatch { state: usize, topology: usize },
    /// Creating the wake-up descriptor or the thread failed.
    #[error("network path setup: {what}: {source}")]
    Setup {
        what: &'static str,
        source: std::io::Error,
    },
    /// The driver thread panicked.
    #[error("network path thread failed: {0}")]
    Task(String),
    /// Loading or attaching the kernel tagger failed.
    #[error("kernel tagger: {0}")]
    Kernel(std::io::Error),
}

/// Turns the hold bypass on or off (see [`NetPath::bypass_switch`]).
#[derive(Clone, Debug)]
pub struct BypassSwitch {
    tx: watch::Sender<bool>,
    wake: Arc<Wake>,
}

impl BypassSwitch {
    /// Sets the bypass; returns whether it changed (and the driver was woken).
    pub fn set(&self, on: bool) -> bool {
        let changed = self.tx.send_if_modified(|b| {
            let changed = *b != on;
            *b = on;
            changed
        });
        if changed {
            self.wake.signal();
        }
        changed
    }

    /// The bypass now.
    pub fn get(&self) -> bool {
        *self.tx.borrow()
    }
}

/// The running network path of one group on one host: a driver thread owning
/// the tag, local and hold queue sockets. Stopping (or dropping) it closes the
/// sockets, and the kernel drops whatever was still queued (fail-closed).
pub struct NetPath {
    metrics: Arc<NetPathMetrics>,
    stop: Arc<AtomicBool>,
    wake: Arc<Wake>,
    bypass: BypassSwitch,
    state: Arc<CausalState>,
    /// The kernel tagger (detached from the causal state on stop; its links
    /// close when the last reference goes).
    kernel: Option<Arc<KernelTagger>>,
    thread: Option<JoinHandle<Result<(), NetPathError>>>,
}

impl NetPath {
    /// Opens the queues (in `cfg.netns`) and starts the driver thread. Open
    /// the queues before installing the rules, or the kernel drops what
    /// arrives in between. Needs no tokio runtime.
    pub fn start(
        topo: &NetTopology,
        state: Arc<CausalState>,
        cfg: NetPathConfig,
    ) -> Result<NetPath, NetPathError> {
        if state.machines() != topo.machines.len() {
            return Err(NetPathError::StateMismatch {
                state: state.machines(),
                topology: topo.machines.len(),
            });
        }
        let dir = Arc::new(Directory::new(topo, &cfg.host).with_links(&cfg.links));
        let queue_cfg = |queues: Vec<u16>, max_len: u32| QueueConfig {
            queues,
            max_len,
            gso: cfg.gso,
            rcvbuf: cfg.rcvbuf,
            netns: cfg.netns.clone(),
            ..QueueConfig::new(Vec::new())
        };
        let mut tag_cfg = queue_cfg(vec![cfg.queues.tag], crate::nfq::KERNEL_MAX_QUEUE_LEN);
        tag_cfg.gso = false; // resized packets must not be GSO (module docs)
        let tag_sock = NfqSocket::open_unregistered(&tag_cfg)?;
        let local_sock = NfqSocket::open_unregistered(&queue_cfg(
            vec![cfg.queues.local],
            crate::nfq::KERNEL_MAX_QUEUE_LEN,
        ))?;
        let per_queue = cfg
            .limits
            .max_packets
            .div_ceil(usize::from(cfg.queues.hold_count.max(1)))
            .clamp(1, crate::nfq::KERNEL_MAX_QUEUE_LEN as usize);
        let hold_sock = NfqSocket::open_unregistered(&queue_cfg(
            cfg.queues.hold_queues(),
            u32::try_from(per_queue).unwrap_or(crate::nfq::KERNEL_MAX_QUEUE_LEN),
        ))?;
        let wake = Arc::new(Wake::new().map_err(|source| NetPathError::Setup {
            what: "eventfd",
            source,
        })?);
        let metrics = Arc::new(NetPathMetrics::default());
        let kernel = match cfg.kernel_tagger {
            None => None,
            Some(mark) => {
                let host = cfg.host.as_str();
                let tagger = in_netns(cfg.netns.as_deref(), || {
                    let t = KernelTagger::load(topo, host, mark)?;
                    let ifaces = t.attach_routes(topo)?;
                    tracing::info!(interfaces = ?ifaces, "kernel tagger attached");
                    Ok::<_, std::io::Error>(t)
                })
                .and_then(|r| r)
                .map_err(NetPathError::Kernel)?;
                let tagger = Arc::new(tagger);
                state.attach_kernel(Arc::clone(&tagger) as Arc<dyn crate::causal::KernelTags>);
                metrics.attach_kernel(Arc::clone(&tagger));
                Some(tagger)
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (bypass_tx, bypass_rx) = watch::channel(false);
        let mut all_queues = vec![cfg.queues.tag, cfg.queues.local];
        all_queues.extend(cfg.queues.hold_queues());
        let driver = Driver {
            tag: tag_sock,
            local: local_sock,
            hold: hold_sock,
            all_queues,
            hold_queues: cfg.queues.hold_queues(),
            last_to_hold: None,
            unknown_logged: None,
            dir,
            state: Arc::clone(&state),
            policy: cfg.tag_policy,
            engine: HoldEngine::new(cfg.limits, cfg.release_chunk),
            metrics: Arc::clone(&metrics),
            stop: Arc::clone(&stop),
            wake: Arc::clone(&wake),
            bypass: bypass_rx,
            committed: state.subscribe_committed(),
            busy_poll: cfg.busy_poll,
            kernel: kernel.clone(),
            lease_gate: cfg.lease_gate.clone(),
        };
        state.wake_on_commit(Arc::clone(&wake));
        let priority = cfg.priority;
        let thread = std::thread::Builder::new()
            .name(format!("netpath-{}", cfg.host))
            .spawn(move || {
                if priority > 0 {
                    if let Err(e) = crate::sched::set_current_thread_fifo(priority) {
                        tracing::warn!(
                            error = %e,
                            priority,
                            "network-path thread stays at normal priority: held replies may \
                             wait for the CPU after their writes are durable"
                        );
                        driver.metrics.add(M::priority_refused, 1);
                    }
                }
                driver.run()
            })
            .map_err(|source| {
                state.unwake_on_commit(&wake);
                if kernel.is_some() {
                    state.detach_kernel();
                }
                NetPathError::Setup {
                    what: "spawn the driver thread",
                    source,
                }
            })?;
        Ok(NetPath {
            metrics,
            stop,
            bypass: BypassSwitch {
                tx: bypass_tx,
                wake: Arc::clone(&wake),
            },
            wake,
            state,
            kernel,
            thread: Some(thread),
        })
    }

    /// The hold bypass: while on, client-bound packets are not held (modes
    /// `async` and `sync`, or degraded to async); turning it on releases every
    /// held packet in order. The agent drives it from the group's mode.
    pub fn bypass_switch(&self) -> BypassSwitch {
        self.bypass.clone()
    }

    /// The metrics (shared; read with [`NetPathMetrics::snapshot`]).
    pub fn metrics(&self) -> &Arc<NetPathMetrics> {
        &self.metrics
    }

    /// Whether the driver thread is still running.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    fn signal_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake.signal();
        self.state.unwake_on_commit(&self.wake);
        if self.kernel.is_some() {
            self.state.detach_kernel();
        }
    }

    /// The kernel tagger, when it runs.
    pub fn kernel_tagger(&self) -> Option<&Arc<KernelTagger>> {
        self.kernel.as_ref()
    }

    /// Stops the driver and closes the sockets; returns the error the driver
    /// ended with, if any.
    pub async fn stop(mut self) -> Result<(), NetPathError> {
        self.signal_stop();
        let Some(t) = self.thread.take() else {
            return Ok(());
        };
        let joined = tokio::task::spawn_blocking(move || t.join())
            .await
            .map_err(|e| NetPathError::Task(e.to_string()))?;
        joined.map_err(|_| NetPathError::Task("driver thread panicked".into()))?
    }
}

impl Drop for NetPath {
    fn drop(&mut self) {
        self.signal_stop();
        if let Some(t) = self.thread.take() {
            // The thread checks the flag on every pass and was woken: this
            // returns within one pass.
            let _ = t.join();
        }
    }
}

/// What the driver thread owns.
struct Driver {
    tag: NfqSocket,
    local: NfqSocket,
    hold: NfqSocket,
    /// Every queue of the group (for the kernel counters).
    all_queues: Vec<u16>,
    /// The hold queues.
    hold_queues: Vec<u16>,
    /// The kernel tagger's hold count at the previous stats read.
    last_to_hold: Option<u64>,
    /// When an unattributable packet was last logged (rate limit).
    unknown_logged: Option<Instant>,
    dir: Arc<Directory>,
    state: Arc<CausalState>,
    policy: TagPolicy,
    engine: HoldEngine,
    metrics: Arc<NetPathMetrics>,
    stop: Arc<AtomicBool>,
    wake: Arc<Wake>,
    bypass: watch::Receiver<bool>,
    committed: watch::Receiver<pipecloud_core::CountVector>,
    busy_poll: Duration,
    /// The kernel tagger: its ring buffer is readable when tags wait to be
    /// merged; it learns what the hold queue holds.
    kernel: Option<Arc<KernelTagger>>,
    lease_gate: Option<Arc<pipecloud_quorum::LeaseGate>>,
}

/// How often a driver whose lease gate is closed looks at it again.
const LEASE_GATE_POLL: Duration = Duration::from_millis(5);

/// Reusable buffers of the driver thread.
struct Buffers {
    recv: Vec<u8>,
    out: Vec<u8>,
    scratch: Vec<u8>,
}

impl Driver {
    fn run(mut self) -> Result<(), NetPathError> {
        let mut b = Buffers {
            recv: vec![0u8; crate::nfq::RECV_BUF_LEN],
            out: Vec::with_capacity(256 * 1024),
            scratch: Vec::with_capacity(crate::nfq::RECV_BUF_LEN),
        };
        let mut bypassing = *self.bypass.borrow_and_update();
        if let Some(k) = &self.kernel {
            k.set_bypass(bypassing);
        }
        let mut last_work = Instant::now();
        // Start of the current run of empty passes (busy polling), if any.
        let mut idle_since: Option<Instant> = None;
        let mut next_stats = last_work + KERNEL_STATS_EVERY;
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            // Not the lease holder (docs/design.md §7): no verdicts, so held
            // packets stay held and new ones wait in the kernel queues (at
            // their bound the kernel drops: fail-closed). Mode and commit
            // changes stay pending until the gate opens again. The gate's
            // margin covers the one pass that may follow this check.
            if self.lease_gate.as_ref().is_some_and(|g| !g.is_open()) {
                std::thread::sleep(LEASE_GATE_POLL);
                continue;
            }
            let mut worked = false;
            if self.bypass.has_changed().unwrap_or(false) {
                bypassing = *self.bypass.borrow_and_update();
                if bypassing {
                    b.out.clear();
                    let n = self.engine.release_all(&mut b.out);
                    self.hold.send(&b.out)?;
                    self.metrics.count_release(n);
                    self.metrics.gauge_hold(&mut self.engine);
                    self.hold_progress(0);
                }
                if let Some(k) = &self.kernel {
                    k.set_bypass(bypassing);
                }
                worked = true;
            }
            if self.committed.has_changed().unwrap_or(false) {
                let c = *self.committed.borrow_and_update();
                b.out.clear();
                let n = self.engine.on_committed(&c, &mut b.out);
                self.hold.send(&b.out)?;
                self.metrics.count_release(n);
                self.metrics
                    .record_released(self.engine.last_released(), Instant::now());
                self.metrics.gauge_hold(&mut self.engine);
                self.hold_progress(0);
                worked = true;
            }
            // Tags the kernel stripped: merge them now, so the receivers' own
            // packets can be tagged in the kernel again.
            if self.kernel.is_some() && self.state.drain_kernel() {
                worked = true;
            }
            worked |= self.hold_burst(&mut b, bypassing)?;
            for sock in [&self.tag, &self.local] {
                worked |= tag_burst(
                    sock,
                    &mut b,
                    &self.dir,
                    &self.state,
                    self.policy,
                    &self.metrics,
                )?;
            }
            let now = Instant::now();
            if now >= next_stats {
                self.metrics.gauge_hold(&mut self.engine);
                // Read before the queue counters (see `resync_hold_count`).
                let to_hold = self.kernel.as_ref().map(|k| k.to_hold());
                match self.hold.namespace_stats() {
                    Ok(s) => {
                        self.metrics.gauge_kernel(&s, &self.all_queues);
                        self.resync_hold_count(to_hold, &s);
                    }
                    Err(e) => tracing::debug!(error = %e, "reading nfqueue counters"),
                }
                next_stats = now + KERNEL_STATS_EVERY;
            }
            if worked {
                last_work = now;
                if let Some(t) = idle_since.take() {
                    self.count_idle(now.duration_since(t));
                }
                continue;
            }
            let idle_start = *idle_since.get_or_insert(now);
            if now.duration_since(last_work) < self.busy_poll {
                std::hint::spin_loop();
                continue;
            }
            idle_since = None;
            self.count_idle(now.duration_since(idle_start));
            self.metrics.add(M::driver_sleeps, 1);
            self.sleep(next_stats.saturating_duration_since(now));
            self.wake.drain();
            last_work = Instant::now();
        }
    }

    /// Tells the kernel tagger what the netqueue holds and how many of the
    /// packets it counted were decided (after their verdicts were sent).
    fn hold_progress(&self, counted: u64) {
        if let Some(k) = &self.kernel {
            k.hold_progress(self.engine.held(), counted);
        }
    }

    /// Packets the kernel tagger counted on their way to the hold queue but
    /// that never reached the agent (socket overrun, full queue) would keep
    /// its fast path off for good. When the hold queues are empty and the
    /// netqueue holds nothing, and the program counted nothing new for a
    /// whole stats period (so no counted packet can still be between the
    /// program and the queue), every packet counted before `to_hold` was
    /// read has had its verdict or was dropped: the count can catch up.
    fn resync_hold_count(&mut self, to_hold: Option<u64>, stats: &[crate::nfq::QueueStats]) {
        let (Some(k), Some(t)) = (&self.kernel, to_hold) else {
            return;
        };
        let queued = stats
            .iter()
            .any(|q| self.hold_queues.contains(&q.queue) && q.queued > 0);
        if !queued && self.engine.held() == 0 && self.last_to_hold == Some(t) {
            k.hold_count_at_least(t);
        }
        self.last_to_hold = Some(t);
    }

    fn count_idle(&self, d: Duration) {
        self.metrics.add(
            M::busy_poll_idle_us,
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
        );
    }

    /// Sleeps in `poll(2)` until a socket is readable, the wake is signalled
    /// or `timeout` passed.
    fn sleep(&self, timeout: Duration) {
        let fd = |raw| libc::pollfd {
            fd: raw,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = [
            fd(self.hold.as_raw_fd()),
            fd(self.tag.as_raw_fd()),
            fd(self.local.as_raw_fd()),
            fd(self.wake.as_raw_fd()),
            // poll(2) skips negative fds.
            fd(self.kernel.as_ref().map_or(-1, |k| k.ring_fd())),
        ];
        // Round up so a sub-millisecond remainder does not busy-loop.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of pollfd of the given length. EINTR
        // and other errors just end the sleep early.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    }

    /// Takes up to [`BURST`] datagrams from the hold socket; returns whether
    /// any arrived.
    fn hold_burst(&mut self, b: &mut Buffers, bypassing: bool) -> Result<bool, NetPathError> {
        b.out.clear();
        let mut n = 0;
        let mut now = None;
        let mut counted = 0u64;
        while n < BURST {
            let Some(r) = self.hold.try_recv(&mut b.recv)? else {
                break;
            };
            // Read the clock once per burst, and only when something arrived.
            let now = *now.get_or_insert_with(Instant::now);
            n += 1;
            match r {
                Received::Datagram(len) => {
                    let (engine, metrics, dir, state, unknown_logged) = (
                        &mut self.engine,
                        &self.metrics,
                        &self.dir,
                        &self.state,
                        &mut self.unknown_logged,
                    );
                    for_each_packet(&b.recv[..len], metrics, |p| {
                        if p.mark.is_some_and(|m| m & COUNTED_MARK != 0) {
                            counted += 1;
                        }
                        if bypassing {
                            proto::build_verdict(&mut b.out, p.queue, p.id, Verdict::Accept);
                            return;
                        }
                        let o = engine.on_packet(
                            dir,
                            state,
                            p.queue,
                            p.id,
                            p.payload,
                            p.indev,
                            p.cap_len.map_or(p.payload.len(), |l| l as usize),
                            now,
                            &mut b.out,
                        );
                        metrics.count_hold(o);
                        if o == HoldOutcome::DroppedUnknown {
                            log_unknown(unknown_logged, now, p, metrics);
                        }
                    });
                }
                Received::Overrun => self.metrics.add(M::socket_overruns, 1),
            }
        }
        if n > 0 {
            self.hold.send(&b.out)?;
            self.metrics.gauge_hold(&mut self.engine);
            self.hold_progress(counted);
        }
        Ok(n > 0)
    }
}

/// How often a dropped, unattributable packet of the hold queue is logged.
const UNKNOWN_LOG_EVERY: Duration = Duration::from_secs(10);

/// Logs a hold-queue packet that could not be attributed to a local machine
/// (dropped), at most once per [`UNKNOWN_LOG_EVERY`]; the counter has them all.
fn log_unknown(
    last: &mut Option<Instant>,
    now: Instant,
    p: &PacketMsg<'_>,
    metrics: &NetPathMetrics,
) {
    if last.is_some_and(|t| now.duration_since(t) < UNKNOWN_LOG_EVERY) {
        return;
    }
    *last = Some(now);
    tracing::warn!(
        version = p.payload.first().map_or(0, |b| b >> 4),
        indev = ?p.indev,
        dropped_total = metrics.snapshot().hold_unknown_drops,
        "hold queue: dropped a packet no local protected machine can be attributed to \
         (unknown source address and interface); counted in drops(unknown=..)"
    );
}

/// Takes up to [`BURST`] datagrams from a tag (or local) socket, decides each
/// packet and sends the verdicts; returns whether any arrived.
fn tag_burst(
    sock: &NfqSocket,
    b: &mut Buffers,
    dir: &Directory,
    state: &CausalState,
    policy: TagPolicy,
    metrics: &NetPathMetrics,
) -> Result<bool, NetPathError> {
    b.out.clear();
    let mut n = 0;
    while n < BURST {
        let Some(r) = sock.try_recv(&mut b.recv)? else {
            break;
        };
        n += 1;
        match r {
            Received::Datagram(len) => {
                let (out, scratch) = (&mut b.out, &mut b.scratch);
                for_each_packet(&b.recv[..len], metrics, |p| {
                    let d = if p.hw_protocol == ETH_P_IP || p.hw_protocol == 0 {
                        decide_tag(dir, state, policy, p.payload, PacketInfo::of(p), scratch)
                    } else {
                        decision(Action::Accept, TagEvent::UntaggedNonIpv4)
                    };
                    metrics.count_tag(d.event);
                    match d.action {
                        Action::Accept => proto::build_verdict(out, p.queue, p.id, Verdict::Accept),
                        Action::Drop => proto::build_verdict(out, p.queue, p.id, Verdict::Drop),
                        Action::AcceptModified => {
                            let _ = proto::try_build_verdict_with_payload::<()>(
                                out,
                                p.queue,
                                p.id,
                                |o| {
                                    o.extend_from_slice(scratch);
                                    Ok(())
                                },
                            );
                        }
                    }
                });
            }
            Received::Overrun => metrics.add(M::socket_overruns, 1),
        }
    }
    if n > 0 {
        sock.send(&b.out)?;
    }
    Ok(n > 0)
}

/// Parses one datagram, calling `on_packet` for each packet message and
/// counting kernel errors.
fn for_each_packet(
    data: &[u8],
    metrics: &NetPathMetrics,
    mut on_packet: impl FnMut(&PacketMsg<'_>),
) {
    for m in proto::messages(data) {
        match m {
            Ok(Message::Packet(p)) => on_packet(&p),
            Ok(Message::Error { errno, .. }) => {
                metrics.add(M::verdict_errors, 1);
                tracing::warn!(errno, "nfqueue verdict refused by the kernel");
            }
            Ok(Message::Overrun) => metrics.add(M::socket_overruns, 1),
            Ok(_) => {}
            Err(e) => {
                metrics.add(M::parse_errors, 1);
                tracing::warn!(error = %e, "undecodable nfqueue datagram");
            }
        }
    }
}
