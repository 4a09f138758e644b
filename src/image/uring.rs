//! The io_uring engine of a [`LocalImage`](super::LocalImage): one ring per image file.
//!
//! A guest's small writes and FLUSHes are latency-bound, and on the test machines waking a
//! thread costs more than the page-cache copy it serves (`docs/machine.md`, "Wake-ups are the
//! cost"). So the ring is driven from the caller's thread: the calling task pushes its SQE and
//! enters the kernel itself (under a short mutex), and buffered I/O that completes without
//! blocking costs no thread hop. Operations the kernel finishes asynchronously (fsync,
//! fallocate, I/O that must wait) are reaped by a dedicated thread ("pipecloud-uring") and
//! handed back over a oneshot. At most [`ImageOptions::queue_depth`] operations are in flight;
//! further callers wait asynchronously for a slot.
//!
//! When nothing else is in flight on the image (queue depth 1), three fast paths spare the
//! wake-ups where they cost most:
//! - a small plain write is a `pwrite` on the calling thread ([`Ring::try_write_inline`]):
//!   ext4 has no non-blocking buffered write, so the ring could only hand it to an io-wq
//!   worker, two thread hops for a page-cache copy. Same-run A/B through `nbdfuse -C 1` +
//!   loop measured it ahead of the ring at QD1 and QD32 and on par with `nbdkit file`; taking
//!   every small write inline regardless of queue depth measured worse (`docs/machine.md`,
//!   "Block I/O and builds"). `PIPECLOUD_INLINE_WRITES=never|always` overrides the policy for
//!   such measurements;
//! - a read or write that went through the ring waits for its completion on the calling
//!   thread (at most `INLINE_WAIT`; a lone fsync at most `FSYNC_INLINE_WAIT`) instead of
//!   returning to the runtime, which saves the two wake-ups (reaper, then task) that would
//!   otherwise follow. Measured with fio's nbd engine at QD1: a lower p50 than a dedicated
//!   ring thread fed over a channel;
//! - a lone FLUSH is an `fdatasync` on the calling thread (as `nbdkit file` does), skipping
//!   the ring's io-wq hop, while the last FLUSH took under `DIRECT_FSYNC_MAX` (a slow disk
//!   sends FLUSHes back through the ring, so the runtime thread is not held for a stalled
//!   disk's fsync). Measured ahead of the ring at O_DSYNC QD1 (`docs/machine.md`, "Block
//!   path, sessions 7–8"); `PIPECLOUD_DIRECT_FSYNC=never|always` overrides.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use io_uring::{opcode, types, IoUring, Probe};
use tokio::sync::{oneshot, Semaphore};
use tracing::warn;

use super::ImageOptions;

/// One operation. Buffers are owned here until the kernel is done with them.
pub(super) enum OpKind {
    Read {
        buf: Vec<u8>,
        done: usize,
    },
    Write {
        buf: Vec<u8>,
        done: usize,
        dsync: bool,
    },
    Fsync,
    Fallocate {
        mode: i32,
        len: u32,
    },
}

struct Op {
    kind: OpKind,
    offset: u64,
    reply: oneshot::Sender<io::Result<Vec<u8>>>,
}

/// Largest write taken by the inline `pwrite` fast path ([`Ring::try_write_inline`]).
const INLINE_WRITE_MAX: usize = 128 * 1024;

/// user_data of the NOP that wakes the reaper at shutdown.
const WAKE: u64 = u64::MAX;

/// The ring and its slot table; only touched under `Shared::state`.
struct State {
    ring: IoUring,
    fd: types::Fd,
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    /// Slot permits are returned here when an op completes.
    permits: Arc<Semaphore>,
}

struct Shared {
    state: Mutex<State>,
    ring_fd: RawFd,
    depth: usize,
    closed: AtomicBool,
    file: Arc<File>,
    /// Duration of the last FLUSH, in ns (see `Ring::try_fsync_inline`).
    last_fsync_ns: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handle to the engine.
///
/// Submission happens on the caller's thread: push the SQE, `io_uring_enter`, reap
/// every completion available (buffered I/O that can complete without blocking is done
/// by then, so the caller's await returns at once, with no thread hop). Operations the
/// kernel completes asynchronously (fsync, fallocate, I/O that has to wait) are reaped
/// by the reaper thread ("pipecloud-uring"), which sleeps in `io_uring_enter` waiting
/// for completions. At most `queue_depth` operations are in flight; further callers
/// wait (asynchronously) for a free slot.
///
/// Dropping the handle wakes the reaper, which reaps what is still in flight, then
/// closes the ring and the file (without blocking the dropper).
pub(super) struct Ring {
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
}

impl Ring {
    pub(super) fn start(file: Arc<File>, options: &ImageOptions) -> io::Result<Ring> {
        let depth = options.queue_depth.clamp(1, 4096);
        // SQ >= depth + 1 (the wake NOP); CQ is twice the SQ, so it cannot overflow.
        let ring = IoUring::new((depth + 1).next_power_of_two())?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (name, code) in [
            ("READ", opcode::Read::CODE),
            ("WRITE", opcode::Write::CODE),
            ("FSYNC", opcode::Fsync::CODE),
            ("FALLOCATE", opcode::Fallocate::CODE),
            ("NOP", opcode::Nop::CODE),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring lacks {name}"),
                ));
            }
        }
        let depth = depth as usize;
        let permits = Arc::new(Semaphore::new(depth));
        let ring_fd = ring.as_raw_fd();
        let state = State {
            ring,
            fd: types::Fd(file.as_raw_fd()),
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            permits: Arc::clone(&permits),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            ring_fd,
            depth,
            closed: AtomicBool::new(false),
            file,
            last_fsync_ns: AtomicU64::new(0),
        });
        let reaper = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("pipecloud-uring".into())
            .spawn(move || reap_loop(&reaper))?;
        Ok(Ring { shared, permits })
    }

    /// A slot permit if no other operation is in flight on the image (or the
    /// policy is forced on); held for the duration of an operation done on the
    /// calling thread, so concurrent callers see it in flight. `None` when the
    /// policy is forced off.
    fn alone(&self, forced: Option<bool>) -> Option<tokio::sync::SemaphorePermit<'_>> {
        if forced == Some(false) {
            return None;
        }
        let permit = self.permits.try_acquire().ok()?;
        if forced.is_none() && self.permits.available_permits() + 1 != self.shared.depth {
            return None;
        }
        Some(permit)
    }

    /// Queue-depth-1 fast path for a small buffered write: when no operation is in
    /// flight, `pwrite` on the calling thread. ext4 has no non-blocking buffered
    /// write, so io_uring would hand the write to an io-wq worker and wake us back:
    /// two thread hops for a page-cache copy of a few microseconds. Returns `None`
    /// (use the ring) when anything else is in flight or the write is large.
    /// Durability is unchanged: FLUSH's fdatasync covers every completed write.
    pub(super) fn try_write_inline(&self, offset: u64, data: &[u8]) -> Option<io::Result<()>> {
        if data.len() > INLINE_WRITE_MAX || self.shared.closed.load(Ordering::Relaxed) {
            return None;
        }
        static OVERRIDE: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
        let forced = policy_override(&OVERRIDE, "PIPECLOUD_INLINE_WRITES");
        let permit = self.alone(forced)?;
        let r = self.shared.file.write_all_at(data, offset);
        drop(permit);
        Some(r)
    }

    /// Queue-depth-1 fast path for a FLUSH: when nothing else is in flight on this
    /// image and the last FLUSH took less than [`DIRECT_FSYNC_MAX`], `fdatasync` on
    /// the calling thread, as `nbdkit file` does. Through the ring, a fsync is always
    /// punted to an io-wq worker: a wake-up of that worker, then of the waiter.
    /// Blocking the runtime thread is bounded by the guard in practice: a FLUSH that
    /// turns out slow (a stalled disk) sends the next ones through the ring, whose
    /// completion this thread does not wait for beyond `FSYNC_INLINE_WAIT`, until
    /// one completes fast again. `PIPECLOUD_DIRECT_FSYNC=never|always` overrides
    /// the policy (for measurements).
    pub(super) fn try_fsync_inline(&self) -> Option<io::Result<()>> {
        static OVERRIDE: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
        self.try_fsync_inline_forced(policy_override(&OVERRIDE, "PIPECLOUD_DIRECT_FSYNC"))
    }

    /// [`Ring::try_fsync_inline`] with the override given: `None` is the policy,
    /// `Some(true)` always direct (when a slot is free), `Some(false)` never.
    fn try_fsync_inline_forced(&self, forced: Option<bool>) -> Option<io::Result<()>> {
        if self.shared.closed.load(Ordering::Relaxed) {
            return None;
        }
        let last = self.shared.last_fsync_ns.load(Ordering::Relaxed);
        if forced.is_none() && last >= DIRECT_FSYNC_MAX.as_nanos() as u64 {
            return None;
        }
        let permit = self.alone(forced)?;
        let started = std::time::Instant::now();
        let r = self.shared.file.sync_data();
        self.note_fsync(started.elapsed());
        drop(permit);
        Some(r)
    }

    #[cfg(test)]
    fn hold_slot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.permits.try_acquire().ok()
    }

    /// Records how long a FLUSH took (the direct-fsync guard).
    pub(super) fn note_fsync(&self, took: std::time::Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.shared.last_fsync_ns.store(ns, Ordering::Relaxed);
    }

    pub(super) async fn submit(&self, kind: OpKind, offset: u64) -> io::Result<Vec<u8>> {
        let stopped = || io::Error::other("io_uring engine stopped");
        let permit = self.permits.acquire().await.map_err(|_| stopped())?;
        // The slot permit travels with the op; it is returned when the op completes.
        permit.forget();
        let (reply, done) = oneshot::channel();
        // How long the caller may wait for its own op on this thread (see below).
        let inline_wait = match kind {
            OpKind::Read { .. } | OpKind::Write { .. } => Some(INLINE_WAIT),
            OpKind::Fsync => Some(FSYNC_INLINE_WAIT),
            OpKind::Fallocate { .. } => None,
        };
        let alone = {
            let mut st = self.shared.lock();
            let Some(idx) = st.free.pop() else {
                self.permits.add_permits(1);
                return Err(io::Error::other("io_uring slot table inconsistent"));
            };
            let mut op = Op {
                kind,
                offset,
                reply,
            };
            st.push(idx, &mut op);
            st.slots[idx] = Some(op);
            st.submit_and_reap();
            st.free.len() + 1 == self.shared.depth
        };
        // Low queue depth: the only op in flight is ours, and a read or write that was
        // punted to io-wq (ext4 buffered writes always are) finishes soon: it is a
        // page-cache copy.
        // Waiting for it here, on this thread, saves two thread wake-ups (reaper, then
        // this task). The same holds for a lone FLUSH (fdatasync), the whole cost of a
        // sync-heavy guest (O_DSYNC, database commits): nbdkit's `file` plugin calls it
        // on its request thread. Bounded by INLINE_WAIT / FSYNC_INLINE_WAIT, so other
        // disks and the replication session on this runtime thread wait at most that
        // long; past it, the reaper hands the completion over as usual. Never used
        // for fallocate.
        if let (true, Some(wait), true) = (alone, inline_wait, done.is_empty()) {
            let _ = wait_for_completion(self.shared.ring_fd, Some(wait));
            self.shared.lock().submit_and_reap();
        }
        done.await.map_err(|_| stopped())?
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        let mut st = self.shared.lock();
        let nop = opcode::Nop::new().build().user_data(WAKE);
        st.push_entry(&nop);
        // Submit only: the reaper must see the NOP's completion to wake up.
        if let Err(e) = st.ring.submit() {
            warn!("io_uring: submitting the shutdown NOP failed: {e}");
        }
    }
}

fn errno(res: i32) -> io::Error {
    io::Error::from_raw_os_error(-res)
}

impl State {
    /// Pushes the SQE for `op` (or what remains of it after a short transfer).
    fn push(&mut self, idx: usize, op: &mut Op) {
        let fd = self.fd;
        let entry = match &mut op.kind {
            OpKind::Read { buf, done } => {
                let rest = &mut buf[*done..];
                opcode::Read::new(fd, rest.as_mut_ptr(), rest.len() as u32)
                    .offset(op.offset + *done as u64)
                    .build()
            }
            OpKind::Write { buf, done, dsync } => {
                let rest = &buf[*done..];
                let flags = if *dsync { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32)
                    .offset(op.offset + *done as u64)
                    .rw_flags(flags)
                    .build()
            }
            OpKind::Fsync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            OpKind::Fallocate { mode, len } => opcode::Fallocate::new(fd, u64::from(*len))
                .offset(op.offset)
                .mode(*mode)
                .build(),
        };
        self.push_entry(&entry.user_data(idx as u64));
    }

    fn push_entry(&mut self, entry: &io_uring::squeue::Entry) {
        // SAFETY: every buffer an entry points to is owned by an `Op` in the slot
        // table and stays alive and unmoved until its CQE is reaped (the heap data of
        // a Vec does not move when the Vec is moved into the table).
        while unsafe { self.ring.submission().push(entry) }.is_err() {
            // Cannot happen (in-flight ops + wake <= SQ size), but never spin forever.
            if let Err(e) = self.ring.submit() {
                warn!("io_uring submit failed while the SQ was full: {e}");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    /// Submits pending SQEs and completes every available CQE, resubmitting the rest
    /// of short transfers, until nothing is left to submit.
    fn submit_and_reap(&mut self) {
        loop {
            if let Err(e) = self.ring.submit() {
                // EBUSY/EAGAIN: entries stay queued; the next call submits them.
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EBUSY) | Some(libc::EAGAIN) | Some(libc::EINTR)
                ) {
                    warn!("io_uring submit failed: {e}");
                }
            }
            let cqes: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            if cqes.is_empty() {
                return;
            }
            let mut resubmitted = false;
            for (user_data, res) in cqes {
                if user_data == WAKE {
                    continue;
                }
                let idx = user_data as usize;
                let Some(mut op) = self.slots.get_mut(idx).and_then(Option::take) else {
                    warn!(user_data, "io_uring completion for an empty slot");
                    continue;
                };
                match complete(&mut op, res) {
                    None => {
                        self.push(idx, &mut op);
                        self.slots[idx] = Some(op);
                        resubmitted = true;
                    }
                    Some(result) => {
                        let _ = op.reply.send(result);
                        self.free.push(idx);
                        self.permits.add_permits(1);
                    }
                }
            }
            if !resubmitted {
                return;
            }
        }
    }
}

/// Handles one CQE. Returns the op's result when it is complete, or `None` when the
/// (rest of the) transfer must be resubmitted.
fn complete(op: &mut Op, res: i32) -> Option<io::Result<Vec<u8>>> {
    if res == -libc::EINTR || res == -libc::EAGAIN {
        return None; // retry as is
    }
    if res < 0 {
        return Some(Err(errno(res)));
    }
    let n = res as usize;
    match &mut op.kind {
        OpKind::Read { buf, done } => {
            if n == 0 {
                return Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "image file is shorter than its size",
                )));
            }
            *done += n;
            if *done < buf.len() {
                return None;
            }
            Some(Ok(std::mem::take(buf)))
        }
        OpKind::Write { buf, done, .. } => {
            if n == 0 {
                return Some(Err(io::Error::from(io::ErrorKind::WriteZero)));
            }
            *done += n;
            if *done < buf.len() {
                return None;
            }
            Some(Ok(Vec::new()))
        }
        OpKind::Fsync | OpKind::Fallocate { .. } => Some(Ok(Vec::new())),
    }
}

/// A fast path's policy override from the environment, read once:
/// `always` = `Some(true)`, `never` = `Some(false)`, unset = `None` (the policy).
fn policy_override(cell: &std::sync::OnceLock<Option<bool>>, var: &'static str) -> Option<bool> {
    *cell.get_or_init(|| match std::env::var(var).as_deref() {
        Ok("always") => Some(true),
        Ok("never") => Some(false),
        _ => None,
    })
}

/// Longest a submitter waits inline for its own read/write (see `Ring::submit`).
const INLINE_WAIT: std::time::Duration = std::time::Duration::from_micros(100);
/// Longest a submitter waits inline for its own lone fsync (see `Ring::submit`): long
/// enough for a 4 KiB write + fdatasync on the test machines' virtual disk. A same-run A/B
/// through `nbdfuse -C 1` + loop (fio O_DSYNC QD1) measured this wait ahead of the reaper's
/// two wake-ups (why wake-ups cost: `docs/machine.md`, "Wake-ups are the cost").
const FSYNC_INLINE_WAIT: std::time::Duration = std::time::Duration::from_micros(500);
/// A lone FLUSH is an `fdatasync` on the calling thread while the last FLUSH took
/// less than this (see `Ring::try_fsync_inline`): the most a FLUSH is expected to
/// hold the runtime thread, well above what a 4 KiB write + fdatasync takes on a healthy
/// disk of the test machines.
const DIRECT_FSYNC_MAX: std::time::Duration = std::time::Duration::from_millis(2);

/// Sleeps until at least one completion is available (does not consume it), or until
/// `timeout` passed.
fn wait_for_completion(ring_fd: RawFd, timeout: Option<std::time::Duration>) -> io::Result<()> {
    const IORING_ENTER_GETEVENTS: libc::c_uint = 1;
    const IORING_ENTER_EXT_ARG: libc::c_uint = 8;
    #[repr(C)]
    struct KernelTimespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    #[repr(C)]
    struct GeteventsArg {
        sigmask: u64,
        sigmask_sz: u32,
        min_wait_usec: u32,
        ts: u64,
    }
    let ts = timeout.map(|t| KernelTimespec {
        tv_sec: t.as_secs() as i64,
        tv_nsec: i64::from(t.subsec_nanos()),
    });
    let arg = GeteventsArg {
        sigmask: 0,
        sigmask_sz: 0,
        min_wait_usec: 0,
        ts: ts.as_ref().map_or(0, |t| t as *const KernelTimespec as u64),
    };
    let (flags, argp, argsz) = if ts.is_some() {
        (
            IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG,
            &arg as *const GeteventsArg as *const libc::c_void,
            std::mem::size_of::<GeteventsArg>(),
        )
    } else {
        (IORING_ENTER_GETEVENTS, std::ptr::null(), 0)
    };
    // SAFETY: io_uring_enter on our ring fd with nothing to submit; `arg` and `ts`
    // outlive the call. It only waits for the completion queue to be non-empty.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_enter,
            ring_fd,
            0 as libc::c_uint,
            1 as libc::c_uint,
            flags,
            argp,
            argsz,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn reap_loop(shared: &Shared) {
    loop {
        if let Err(e) = wait_for_completion(shared.ring_fd, None) {
            if e.raw_os_error() != Some(libc::EINTR) {
                warn!("io_uring wait failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        let mut st = shared.lock();
        st.submit_and_reap();
        if shared.closed.load(Ordering::SeqCst) && st.free.len() == shared.depth {
            // Nothing references our buffers any more; the last Arc closes ring + file.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BlockBackend;
    use crate::image::tests::{rt, TempDir};
    use crate::image::{Engine, LocalImage};
    use std::path::Path;

    #[test]
    fn a_lone_flush_is_direct_unless_the_last_was_slow_or_io_is_in_flight() {
        // The policy itself (`None`) and both overrides, whatever
        // PIPECLOUD_DIRECT_FSYNC says in this process's environment.
        // tmpfs where there is one: fast fsyncs, so the guard's recovery is deterministic.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            let d = shm.join(format!("pipecloud-image-direct-{}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            TempDir(d)
        } else {
            TempDir::new()
        };
        let img = LocalImage::open(dir.0.join("f.img"), 1 << 20).unwrap();
        let Engine::Uring(ring) = &img.engine else {
            panic!(
                "io_uring is unavailable here (see the warning above: kernel, seccomp or \
                 kernel.io_uring_disabled), so the direct-FLUSH policy of the io_uring \
                 engine cannot be checked"
            );
        };
        let policy = || ring.try_fsync_inline_forced(None);
        let rt = rt();
        rt.block_on(img.write(0, vec![1; 4096], false)).unwrap();
        assert!(matches!(policy(), Some(Ok(()))));
        // After a slow FLUSH, FLUSHes go through the ring...
        ring.note_fsync(DIRECT_FSYNC_MAX);
        assert!(policy().is_none());
        // ... unless forced (`always`) ...
        assert!(matches!(
            ring.try_fsync_inline_forced(Some(true)),
            Some(Ok(()))
        ));
        ring.note_fsync(DIRECT_FSYNC_MAX);
        // ... until one through the ring was fast again.
        let recovered = (0..50).any(|_| {
            rt.block_on(img.flush()).unwrap();
            policy().is_some()
        });
        assert!(
            recovered,
            "a fast FLUSH through the ring re-enables the direct path"
        );
        // `never` is never direct, even after a fast FLUSH with nothing in flight.
        assert!(ring.try_fsync_inline_forced(Some(false)).is_none());
        // Never while another operation is in flight on the image (`always`: as
        // long as a slot is free).
        ring.note_fsync(std::time::Duration::ZERO);
        let slot = ring.hold_slot();
        assert!(slot.is_some());
        assert!(policy().is_none());
        assert!(ring.try_fsync_inline_forced(Some(true)).is_some());
        drop(slot);
        assert!(policy().is_some());
    }
}
