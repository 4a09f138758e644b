//! The nfnetlink_queue socket: a raw `NETLINK_NETFILTER` socket, non-blocking,
//! either registered with tokio's reactor ([`AsyncFd`], [`NfqSocket::open`]) or
//! left to a caller that polls it on its own thread
//! ([`NfqSocket::open_unregistered`]; the network path does, see
//! `netpath::driver`).

use super::netns::in_netns;
use super::proto::{self, Message, QueueStats};
use super::{NfqError, QueueConfig};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// How long the kernel may take to acknowledge a configuration request.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(5);
/// Size of the buffer used while waiting for acknowledgements.
const SETUP_BUF: usize = 128 * 1024;
/// Most datagrams that arrive while configuring and are kept for the first
/// receives (packets queued between the bind and its acknowledgement). Beyond
/// this the setup fails rather than hold unbounded memory.
const MAX_SETUP_BACKLOG: usize = 4096;
/// Largest single `sendmsg`; bigger verdict buffers are split at message
/// boundaries (the kernel refuses messages above the send buffer).
const MAX_SEND: usize = 1 << 20;
/// The nfqueue counters of the reading thread's network namespace.
const STATS_PATH: &str = "/proc/thread-self/net/netfilter/nfnetlink_queue";
/// Send buffer requested (`SO_SNDBUFFORCE`): room for [`MAX_SEND`] with margin.
const SNDBUF: usize = 4 << 20;

/// What one receive produced.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Received {
    /// A datagram of this many bytes is at the start of the buffer.
    Datagram(usize),
    /// The socket receive buffer overflowed (`ENOBUFS`): the kernel dropped
    /// packets it could not deliver (fail-closed; counted in the queue's
    /// user-drop counter).
    Overrun,
}

/// A netlink socket bound to one or more NFQUEUE queues.
///
/// Dropping it closes the socket: the kernel unbinds its queues and drops
/// every packet still waiting for a verdict (fail-closed).
pub struct NfqSocket {
    fd: SockFd,
    queues: Vec<u16>,
    netns: Option<PathBuf>,
    /// Datagrams received while waiting for configuration acks.
    backlog: Mutex<VecDeque<Vec<u8>>>,
    /// Whether `backlog` may still hold datagrams: once it ran empty it never
    /// fills again, so receives skip its lock (busy polling calls them a lot).
    backlog_left: AtomicBool,
    /// `/proc/.../nfnetlink_queue` of the socket's namespace, opened there.
    stats_file: Mutex<Option<std::fs::File>>,
}

/// The descriptor, with or without a reactor registration.
enum SockFd {
    Reactor(AsyncFd<OwnedFd>),
    Plain(OwnedFd),
}

impl SockFd {
    fn raw(&self) -> RawFd {
        match self {
            SockFd::Reactor(a) => a.get_ref().as_raw_fd(),
            SockFd::Plain(f) => f.as_raw_fd(),
        }
    }
}

impl std::fmt::Debug for NfqSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NfqSocket")
            .field("fd", &self.fd.raw())
            .field("queues", &self.queues)
            .field("netns", &self.netns)
            .finish()
    }
}

fn sys<T: Copy + PartialOrd + Default>(what: &'static str, rc: T) -> Result<T, NfqError> {
    if rc < T::default() {
        Err(NfqError::Socket {
            what,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(rc)
    }
}

fn setsockopt_int(fd: RawFd, level: i32, opt: i32, value: usize) -> io::Result<()> {
    let v = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: valid fd, pointer to a c_int of the size we pass.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sets a socket buffer size, forcing past the sysctl limit when privileged.
fn set_buffer(fd: RawFd, force: i32, plain: i32, bytes: usize) -> Result<(), NfqError> {
    if setsockopt_int(fd, libc::SOL_SOCKET, force, bytes).is_ok() {
        return Ok(());
    }
    setsockopt_int(fd, libc::SOL_SOCKET, plain, bytes).map_err(|source| NfqError::Socket {
        what: "setsockopt buffer size",
        source,
    })
}

/// Creates, binds and sizes the socket (in the calling thread's namespace).
fn create_socket(rcvbuf: usize) -> Result<OwnedFd, NfqError> {
    // SAFETY: plain socket(2) call.
    let raw = sys("socket(AF_NETLINK)", unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            proto::NETLINK_NETFILTER,
        )
    })?;
    // SAFETY: `raw` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: zeroed sockaddr_nl is valid (pid 0: the kernel assigns one).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: valid fd and address of the right size.
    sys("bind(AF_NETLINK)", unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    })?;
    set_buffer(
        fd.as_raw_fd(),
        libc::SO_RCVBUFFORCE,
        libc::SO_RCVBUF,
        rcvbuf,
    )?;
    set_buffer(
        fd.as_raw_fd(),
        libc::SO_SNDBUFFORCE,
        libc::SO_SNDBUF,
        SNDBUF,
    )?;
    Ok(fd)
}

/// One raw non-blocking receive.
fn raw_recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buffer pointer and length describe `buf`.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One raw send to the kernel.
fn raw_send(fd: RawFd, data: &[u8]) -> io::Result<()> {
    // SAFETY: zeroed sockaddr_nl addresses the kernel (pid 0).
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    loop {
        // SAFETY: valid fd, buffer and address.
        let n = unsafe {
            libc::sendto(
                fd,
                data.as_ptr().cast(),
                data.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Splits `data` (whole netlink messages) into runs of at most `max` bytes at
/// message boundaries. A single message larger than `max` is its own run.
fn split_runs(data: &[u8], max: usize) -> Vec<&[u8]> {
    let mut runs = Vec::new();
    let mut run_start = 0;
    let mut at = 0;
    while at + 4 <= data.len() {
        let len = u32::from_ne_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        let next = (at + ((len + 3) & !3)).min(data.len());
        if len < proto::NLMSG_HDRLEN {
            break;
        }
        if next - run_start > max && at > run_start {
            runs.push(&data[run_start..at]);
            run_start = at;
        }
        at = next;
    }
    if run_start < data.len() {
        runs.push(&data[run_start..]);
    }
    runs
}

impl NfqSocket {
    /// Opens a socket in `cfg.netns` (or the current namespace), binds and
    /// configures every queue of `cfg.queues`, and registers the socket with
    /// the tokio reactor. Must be called inside a tokio runtime with I/O enabled.
    ///
    /// Errors: no permission (needs `CAP_NET_ADMIN`), a queue already bound by
    /// another socket (`EBUSY`: another agent is running), a timeout.
    pub fn open(cfg: &QueueConfig) -> Result<NfqSocket, NfqError> {
        Self::open_inner(cfg, true)
    }

    /// Like [`NfqSocket::open`], but not registered with any reactor (works
    /// outside tokio): for a caller that waits with its own `poll(2)` or
    /// busy-polls [`NfqSocket::try_recv`] on a dedicated thread. The async
    /// [`NfqSocket::recv`] fails on such a socket.
    pub fn open_unregistered(cfg: &QueueConfig) -> Result<NfqSocket, NfqError> {
        Self::open_inner(cfg, false)
    }

    fn open_inner(cfg: &QueueConfig, register: bool) -> Result<NfqSocket, NfqError> {
        cfg.validate()?;
        let rcvbuf = cfg.rcvbuf;
        let (fd, stats_file) = in_netns(cfg.netns.as_deref(), || {
            create_socket(rcvbuf).map(|fd| (fd, std::fs::File::open(STATS_PATH).ok()))
        })
        .map_err(NfqError::Netns)??;
        let mut backlog = VecDeque::new();
        let mut seq = 1u32;
        let mut msg = Vec::new();
        for &q in &cfg.queues {
            msg.clear();
            proto::build_bind(&mut msg, seq, q);
            request(&fd, &msg, seq, q, "bind", &mut backlog)?;
            seq += 1;
            msg.clear();
            proto::build_params(
                &mut msg,
                seq,
                q,
                cfg.copy_range,
                cfg.max_len,
                if cfg.gso { proto::NFQA_CFG_F_GSO } else { 0 },
            );
            request(&fd, &msg, seq, q, "configure", &mut backlog)?;
            seq += 1;
        }
        let fd = if register {
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(NfqError::Socket {
                    what: "register with the tokio reactor",
                    source: io::Error::other("called outside a tokio runtime"),
                });
            }
            // SAFETY: an `OwnedFd` always returns the same open descriptor and
            // closes it only when dropped, after the registration is gone.
            SockFd::Reactor(
                unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(
                    |e| NfqError::Socket {
                        what: "register with the tokio reactor",
                        source: e.into(),
                    },
                )?,
            )
        } else {
            SockFd::Plain(fd)
        };
        Ok(NfqSocket {
            fd,
            queues: cfg.queues.clone(),
            netns: cfg.netns.clone(),
            backlog_left: AtomicBool::new(!backlog.is_empty()),
            backlog: Mutex::new(backlog),
            stats_file: Mutex::new(stats_file),
        })
    }

    /// The queue numbers bound to this socket.
    pub fn queues(&self) -> &[u16] {
        &self.queues
    }

    fn pop_backlog(&self, buf: &mut [u8]) -> Option<usize> {
        if !self.backlog_left.load(Ordering::Acquire) {
            return None;
        }
        let mut b = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
        if b.len() <= 1 {
            self.backlog_left.store(false, Ordering::Release);
        }
        let d = b.pop_front()?;
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
        Some(n)
    }

    /// Waits for and receives one datagram into `buf` (give it at least
    /// [`super::RECV_BUF_LEN`] bytes so a 64 KiB packet fits).
    pub async fn recv(&self, buf: &mut [u8]) -> Result<Received, NfqError> {
        if let Some(n) = self.pop_backlog(buf) {
            return Ok(Received::Datagram(n));
        }
        let SockFd::Reactor(fd) = &self.fd else {
            return Err(NfqError::Socket {
                what: "recv",
                source: io::Error::other("socket opened without a reactor registration"),
            });
        };
        let r = fd
            .async_io(Interest::READABLE, |fd| raw_recv(fd.as_raw_fd(), buf))
            .await;
        map_recv(r)
    }

    /// Receives one datagram if one is ready, without waiting.
    pub fn try_recv(&self, buf: &mut [u8]) -> Result<Option<Received>, NfqError> {
        if let Some(n) = self.pop_backlog(buf) {
            return Ok(Some(Received::Datagram(n)));
        }
        match map_recv(raw_recv(self.fd.raw(), buf)) {
            Ok(r) => Ok(Some(r)),
            Err(NfqError::Socket { source, .. }) if source.kind() == io::ErrorKind::WouldBlock => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Sends whole netlink messages (verdicts built with [`super::proto`]),
    /// split into `sendmsg` calls of at most 1 MiB at message boundaries. The
    /// kernel processes them in order.
    pub fn send(&self, messages: &[u8]) -> Result<(), NfqError> {
        for run in split_runs(messages, MAX_SEND) {
            raw_send(self.fd.raw(), run).map_err(|source| NfqError::Socket {
                what: "send verdicts",
                source,
            })?;
        }
        Ok(())
    }

    /// Kernel counters of this socket's queues (`/proc/net/netfilter/nfnetlink_queue`
    /// of the socket's namespace): held packets, queue-full drops, user drops.
    pub fn stats(&self) -> Result<Vec<QueueStats>, NfqError> {
        let mut all = self.namespace_stats()?;
        all.retain(|s| self.queues.contains(&s.queue));
        Ok(all)
    }

    /// Kernel counters of every queue bound in the socket's namespace.
    pub fn namespace_stats(&self) -> Result<Vec<QueueStats>, NfqError> {
        use std::io::{Read, Seek};
        let mut file = self.stats_file.lock().unwrap_or_else(|e| e.into_inner());
        let Some(f) = file.as_mut() else {
            return read_queue_stats(self.netns.as_deref());
        };
        let mut text = String::new();
        f.rewind()
            .and_then(|_| f.read_to_string(&mut text))
            .map_err(|source| NfqError::Socket {
                what: "read /proc/net/netfilter/nfnetlink_queue",
                source,
            })?;
        Ok(proto::parse_queue_stats(&text))
    }
}

fn map_recv(r: io::Result<usize>) -> Result<Received, NfqError> {
    match r {
        Ok(n) => Ok(Received::Datagram(n)),
        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(Received::Overrun),
        Err(source) => Err(NfqError::Socket {
            what: "recv",
            source,
        }),
    }
}

/// Sends one configuration request and waits for its acknowledgement, keeping
/// any packet datagram that arrives meanwhile in `backlog`.
fn request(
    fd: &OwnedFd,
    msg: &[u8],
    seq: u32,
    queue: u16,
    op: &'static str,
    backlog: &mut VecDeque<Vec<u8>>,
) -> Result<(), NfqError> {
    raw_send(fd.as_raw_fd(), msg).map_err(|source| NfqError::Socket {
        what: "send configuration",
        source,
    })?;
    let deadline = Instant::now() + CONFIG_TIMEOUT;
    let mut buf = vec![0u8; SETUP_BUF];
    loop {
        let n = match raw_recv(fd.as_raw_fd(), &mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(NfqError::Timeout { queue, op });
                }
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(1000);
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, ms) };
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
            Err(source) => {
                return Err(NfqError::Socket {
                    what: "recv configuration ack",
                    source,
                })
            }
        };
        let data = &buf[..n];
        let mut done = None;
        let mut has_packet = false;
        for m in proto::messages(data) {
            match m {
                Ok(Message::Ack { seq: s }) if s == seq => done = Some(Ok(())),
                Ok(Message::Error { seq: s, errno }) if s == seq => {
                    done = Some(Err(NfqError::Config { queue, op, errno }))
                }
                Ok(Message::Packet(_)) => has_packet = true,
                _ => {}
            }
        }
        if has_packet {
            if backlog.len() >= MAX_SETUP_BACKLOG {
                return Err(NfqError::Timeout { queue, op });
            }
            backlog.push_back(data.to_vec());
        }
        if let Some(r) = done {
            return r;
        }
    }
}

/// Reads `/proc/net/netfilter/nfnetlink_queue` of namespace `netns` (or the
/// current thread's): every bound queue's held count and drop counters.
pub fn read_queue_stats(netns: Option<&std::path::Path>) -> Result<Vec<QueueStats>, NfqError> {
    let text = in_netns(netns, || std::fs::read_to_string(STATS_PATH))
        .map_err(NfqError::Netns)?
        .map_err(|source| NfqError::Socket {
            what: "read /proc/net/netfilter/nfnetlink_queue",
            source,
        })?;
    Ok(proto::parse_queue_stats(&text))
}

/// The raw descriptor, for callers that wait with their own poll (e.g. a
/// precise-timeout `ppoll` in the harness's WAN emulator). Reading through it
/// directly bypasses the configuration backlog: use [`NfqSocket::try_recv`].
impl AsRawFd for NfqSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.raw()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_message_boundaries() {
        let mut buf = Vec::new();
        for id in 0..10 {
            proto::build_verdict(&mut buf, 0, id, proto::Verdict::Accept);
        }
        let one = buf.len() / 10;
        let runs = split_runs(&buf, one * 3 + 1);
        assert_eq!(runs.len(), 4);
        assert_eq!(runs.iter().map(|r| r.len()).sum::<usize>(), buf.len());
        assert!(runs[..3].iter().all(|r| r.len() == one * 3));
        assert_eq!(split_runs(&buf, usize::MAX).len(), 1);
        // A message bigger than the limit still goes out whole.
        assert_eq!(split_runs(&buf, 1).len(), 10);
    }
}
