//! NFQUEUE driver: our own small netlink wrapper (the `nfq` crate exposes no fd).
//!
//! The kernel hands packets that hit an `-j NFQUEUE` rule to a userspace socket
//! and keeps them until the program issues a verdict. This module is the thin
//! I/O edge for that mechanism:
//!
//! - [`proto`]: sans-I/O build/parse of the nfnetlink_queue messages (config,
//!   packets, single and batch verdicts, `/proc` counters), unit tested.
//! - [`NfqSocket`]: a raw `NETLINK_NETFILTER` socket bound to one or more queues,
//!   non-blocking and registered with tokio ([`tokio::io::unix::AsyncFd`]),
//!   with a large receive buffer (`SO_RCVBUFFORCE`).
//! - [`in_netns`]: open the socket (or read `/proc`) inside another network
//!   namespace without moving the caller's thread.
//!
//! Queue configuration: copy mode *packet* with copy range 0xffff (whole
//! packets, GSO super-packets included), a queue length limit (the kernel caps
//! every queue at 65,536 packets whatever is asked; use several queues beyond
//! that), `NFQA_CFG_F_GSO` on request, and `NFQA_CFG_F_FAIL_OPEN` always
//! cleared: a full queue, a full socket buffer or a dead agent drops packets
//! instead of letting them pass (fail-closed).
//!
//! Verdicts are plain netlink messages; several can go in one `sendmsg`
//! ([`NfqSocket::send`] takes a buffer of them), and a batch verdict accepts
//! every queued packet up to an id ([`proto::build_verdict_batch`]). The kernel
//! applies them in the order sent.
//!
//! Measured facts this design rests on: `docs/machine.md`, network path.

pub mod netns;
pub mod proto;
mod socket;

pub use netns::in_netns;
pub use proto::{PacketMsg, QueueStats, Verdict};
pub use socket::{read_queue_stats, NfqSocket, Received};

use std::path::PathBuf;

/// The kernel's hard limit on packets held by one queue.
pub const KERNEL_MAX_QUEUE_LEN: u32 = 65_536;

/// Receive buffer length a caller should give [`NfqSocket::recv`]: the largest
/// copied packet (64 KiB) plus netlink headers.
pub const RECV_BUF_LEN: usize = 64 * 1024 + 4096;

/// Default socket receive buffer: 64 MiB (about a thousand 64 KiB GSO packets,
/// or tens of thousands of MTU-sized ones, queued before the agent reads them).
pub const DEFAULT_RCVBUF: usize = 64 << 20;

/// How to open a queue socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Queue numbers to bind on this one socket (e.g. the hold queues of a
    /// `--queue-balance` range). At least one.
    pub queues: Vec<u16>,
    /// Most packets each queue holds (1..=[`KERNEL_MAX_QUEUE_LEN`]); beyond it
    /// the kernel drops new packets (fail-closed) and counts them.
    pub max_len: u32,
    /// Bytes of each packet copied to userspace (1..=0xffff).
    pub copy_range: u32,
    /// Receive GSO super-packets unsegmented (`NFQA_CFG_F_GSO`).
    pub gso: bool,
    /// Socket receive buffer in bytes.
    pub rcvbuf: usize,
    /// Network namespace to open the socket in (`/run/netns/NAME`); `None`: the
    /// caller's.
    pub netns: Option<PathBuf>,
}

impl QueueConfig {
    /// Whole packets, GSO on, the kernel's maximum queue length, a 64 MiB buffer.
    pub fn new(queues: Vec<u16>) -> QueueConfig {
        QueueConfig {
            queues,
            max_len: KERNEL_MAX_QUEUE_LEN,
            copy_range: proto::MAX_COPY_RANGE,
            gso: true,
            rcvbuf: DEFAULT_RCVBUF,
            netns: None,
        }
    }

    fn validate(&self) -> Result<(), NfqError> {
        let bad = |what: &'static str| Err(NfqError::InvalidConfig(what));
        if self.queues.is_empty() {
            return bad("no queue numbers");
        }
        if self.max_len == 0 || self.max_len > KERNEL_MAX_QUEUE_LEN {
            return bad("max_len must be in 1..=65536");
        }
        if self.copy_range == 0 || self.copy_range > proto::MAX_COPY_RANGE {
            return bad("copy_range must be in 1..=65535");
        }
        Ok(())
    }
}

/// Errors of the NFQUEUE driver.
#[derive(Debug, thiserror::Error)]
pub enum NfqError {
    /// A socket call failed.
    #[error("nfqueue socket: {what}: {source}")]
    Socket {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused a queue configuration request.
    #[error("nfqueue {queue}: {op} refused: {}{}", std::io::Error::from_raw_os_error(*errno),
        if *errno == libc::EBUSY { " (the queue is bound by another process: is another agent running?)" } else { "" })]
    Config {
        queue: u16,
        op: &'static str,
        errno: i32,
    },
    /// The kernel did not acknowledge a configuration request in time.
    #[error("nfqueue {queue}: no answer to {op}")]
    Timeout { queue: u16, op: &'static str },
    /// Entering the network namespace failed.
    #[error("nfqueue: network namespace: {0}")]
    Netns(#[source] std::io::Error),
    /// The configuration is out of range.
    #[error("nfqueue: invalid configuration: {0}")]
    InvalidConfig(&'static str),
}
