//! Replication wire format shared by the agent and the backup server.
//!
//! CONTRACT (the agent and the backup server are written against these types;
//! change them only together with both sides).
//!
//! A stream starts with the agent sending [`Frame::Hello`]; the server answers
//! [`Frame::Welcome`] (or [`Frame::Reject`] and closes). Afterwards the agent
//! sends `Write`/`Heartbeat`, the server sends `Ack`/`Committed`/`HeartbeatReply`.
//!
//! On the byte level every frame is `[len: u32 LE][crc32c: u32 LE][body]` where
//! `body` is the postcard encoding of [`Frame`], `len` is the body length
//! (at most [`MAX_FRAME_BODY`]) and the CRC32C covers the body.

use crate::vector::{CountVector, Seq, WriterId};
use serde::{Deserialize, Serialize};

/// Current protocol version.
pub const PROTOCOL_VERSION: u16 = 1;
/// Oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Largest data payload of one write frame. Larger guest writes are split by the agent.
pub const MAX_WRITE_PAYLOAD: usize = 1 << 20;
/// Largest frame body accepted by the decoder (payload plus generous metadata room).
pub const MAX_FRAME_BODY: usize = MAX_WRITE_PAYLOAD + 64 * 1024;
/// Bytes of the frame header (`len` + `crc32c`).
pub const FRAME_HEADER_LEN: usize = 8;
/// Longest name (group, disk, agent) accepted on the wire.
pub const MAX_NAME_LEN: usize = 64;
/// Most disks one agent may announce in a hello.
pub const MAX_DISKS_PER_HELLO: usize = 64;
/// The congestion controls both ends of a replication stream ask for, in
/// order, whatever the host's default (docs/design.md §8): BBR, the default
/// of some hosts (the test machines'), cuts the window to 4 packets for
/// 200 ms whenever its minimum RTT is 10 s old (ProbeRTT); on a stream that
/// never idles every held reply then waits ~300 ms instead of one round trip,
/// about every 10 s. CUBIC and Reno have no such drain. An unprivileged
/// process (the backup server) may pick only what
/// `net.ipv4.tcp_allowed_congestion_control` lists, Reno on most hosts.
pub const STREAM_CONGESTION: [&str; 2] = ["cubic", "reno"];

/// Generation of a writer's sequence space. A restarted writer picks a new,
/// larger generation so that acks for an old incarnation can never be confused
/// with the new one.
pub type Generation = u64;

/// One protected disk an agent announces (index in `Hello::disks` = the `disk` field of writes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskHello {
    /// Disk name from the topology (validated: `[A-Za-z0-9_.-]`, 1..=MAX_NAME_LEN, not `.`/`..`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The writer (machine) that owns this disk.
    pub writer: WriterId,
    /// Generation of that writer's seq space.
    pub generation: Generation,
}

/// First frame of every agent connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    /// Protection group name (must match the group of the agent's TLS certificate).
    pub group: String,
    /// Numeric group id carried in the IPv4 option.
    pub group_id: u16,
    /// Agent (host) name, for logs and status.
    pub agent: String,
    /// Disks whose writes this connection will carry (may be empty: an agent of
    /// outbound machines only, which just wants committed vectors).
    pub disks: Vec<DiskHello>,
}

/// Per-writer state the server reports in its welcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterState {
    pub writer: WriterId,
    pub generation: Generation,
    /// Highest seq such that all of `1..=seq` of this generation are durable.
    /// The agent resends everything above it that it still buffers.
    pub durable: Seq,
}

/// Server's answer to a hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub version: u16,
    pub writers: Vec<WriterState>,
    /// The group's committed vector right now.
    pub committed: CountVector,
}

/// What a write does to its disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteKind {
    /// Write these bytes at the offset (len = data.len(), at most MAX_WRITE_PAYLOAD).
    Data(#[serde(with = "crate::codec::payload_bytes")] Vec<u8>),
    /// Write `len` zero bytes.
    Zeroes { len: u64 },
    /// Discard `len` bytes (the backup may zero them).
    Trim { len: u64 },
}

/// One guest disk write, tagged with the writer's pending vector at issue time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Write {
    pub writer: WriterId,
    pub generation: Generation,
    /// `vector.get(writer.index()) == seq` always holds.
    pub seq: Seq,
    /// Index into the connection's `Hello::disks`.
    pub disk: u16,
    pub offset: u64,
    /// The writer's pending vector when the write was issued (its dependencies).
    pub vector: CountVector,
    pub kind: WriteKind,
}

/// Acknowledges that writes are durable in the backup journal. Acks may arrive
/// out of order and duplicated; only contiguous prefixes make progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub writer: WriterId,
    pub generation: Generation,
    /// Inclusive range of seqs now durable.
    pub first: Seq,
    pub last: Seq,
}

/// Size of one guest RAM page as carried by checkpoint frames.
pub const PAGE_SIZE: u64 = 4096;
/// Largest guest RAM a checkpoint may describe (1 TiB).
pub const MAX_GUEST_RAM: u64 = 1 << 40;
/// Largest device-state blob of one machine in one epoch (64 MiB; QEMU's is ~4–60 KB).
pub const MAX_DEVICE_STATE: u64 = 64 << 20;

/// How the bytes of a [`Checkpoint::Pages`] frame encode the pages. The backup,
/// which always stores full pages, decodes each frame on receipt
/// (`crate::pagecodec`, docs/design.md §14). The compressed encodings use the
/// LZ4 block format (no size prefix; the size is `pages` × [`PAGE_SIZE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PageEncoding {
    /// `data` is the pages themselves, `data.len()` a multiple of [`PAGE_SIZE`].
    Raw,
    /// `data` is the LZ4 block of `pages` pages.
    Lz4 { pages: u32 },
    /// `data` is the LZ4 block of `pages` pages, each XORed with the copy of the
    /// same page of the same machine last sent *on this connection* (whatever its
    /// encoding). Every page of the frame must have been sent before on the
    /// connection, or the backup refuses the frame.
    XorLz4 { pages: u32 },
}

impl PageEncoding {
    /// Bytes of guest RAM a frame with `data_len` bytes of this encoding stands for.
    pub fn page_bytes(&self, data_len: usize) -> u64 {
        match self {
            PageEncoding::Raw => data_len as u64,
            PageEncoding::Lz4 { pages } | PageEncoding::XorLz4 { pages } => {
                u64::from(*pages) * PAGE_SIZE
            }
        }
    }
}

/// Frames of the full-state (checkpoint) mode. One epoch of one agent is sent as
///
/// ```text
/// for each checkpointed machine of the agent:
///     Begin { machine, epoch, ram_bytes }
///     Pages { epoch, .. }*      dirty RAM since the previous epoch (epoch 1: all of it)
///     Device { epoch, .. }*     the device state blob, in order
///     End { epoch, pages, device_bytes }
/// Commit { epoch, barrier }     this agent's part of the epoch is complete
/// ```
///
/// interleaved with the agent's ordinary `Write` frames. A machine may be sent in
/// several `Begin … End` *segments* within one epoch, each a part of its own: a
/// group switched to full-state mode at run time pre-copies the RAM while the
/// guests run (segments without device state), and sends the pages written since
/// then and the device state at the pause (docs/design.md §13). The later copy of
/// a page wins; the machine's epoch is *full* if one of its segments sent all of
/// its RAM contiguously from offset 0. `barrier[w]` is the last
/// seq writer `w` issued before the pause of `epoch` (the disk writes that belong
/// to checkpoint `epoch`). The backup answers `Ack { epoch }` only once, for every
/// agent of the group, all pages, device state and the writes up to the barrier
/// are durable; the agent then raises entry [`crate::EPOCH_ENTRY`] of its
/// committed view to `epoch`, which releases the output that epoch produced.
/// An epoch whose `End`/`Commit` never arrived (torn) is never used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Checkpoint {
    /// Start of `machine`'s part of `epoch` (≥ 1). `ram_bytes` is the guest RAM
    /// size, a multiple of [`PAGE_SIZE`] at most [`MAX_GUEST_RAM`], the same in
    /// every epoch of the machine. Following `Pages`/`Device` frames of the
    /// connection belong to this machine until its `End`.
    Begin {
        machine: String,
        epoch: u64,
        ram_bytes: u64,
    },
    /// Guest RAM pages at RAM offset `offset` (page aligned), contiguous, as
    /// `encoding` says (at most [`crate::codec::MAX_CHECKPOINT_CHUNK`] bytes of
    /// pages, and of `data`).
    Pages {
        epoch: u64,
        offset: u64,
        encoding: PageEncoding,
        #[serde(with = "crate::codec::payload_bytes")]
        data: Vec<u8>,
    },
    /// A chunk of the machine's device state, at byte `offset` of the blob.
    Device {
        epoch: u64,
        offset: u64,
        #[serde(with = "crate::codec::payload_bytes")]
        data: Vec<u8>,
    },
    /// End of the machine opened by `Begin`: `pages` pages and `device_bytes`
    /// bytes of device state were sent (lets the backup detect a torn epoch).
    End {
        epoch: u64,
        pages: u64,
        device_bytes: u64,
    },
    /// All of this agent's part of `epoch` has been sent; `barrier` as above.
    Commit { epoch: u64, barrier: CountVector },
    /// Backup → agent: the group's `epoch` is durable (entry EPOCH_ENTRY of the committed vector).
    Ack { epoch: u64 },
    /// Agent → backup: the group leaves full-state mode (run-time switch back to a
    /// disk-only mode). `epoch` is the agent's open epoch, which is never captured.
    /// The backup records durably that the group's failover is disk-only again (the
    /// causal cut; no RAM to resume), drops the group's epochs not yet acknowledged,
    /// and answers `Ack { epoch }`: the output tagged up to `epoch` is then covered by
    /// the disk rule alone, which every tag already carries. Sent between epochs
    /// (never inside a `Begin … Commit`), repeated on a new connection until acked.
    Leave { epoch: u64 },
}

/// Every frame of the replication protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    /// Refusal with a human-readable reason; the sender closes afterwards.
    Reject {
        reason: String,
    },
    Write(Write),
    Ack(Ack),
    /// The group's committed vector (pushed to every agent of the group).
    Committed {
        vector: CountVector,
    },
    /// Liveness probe; the peer answers with `HeartbeatReply` carrying the same nonce.
    Heartbeat {
        nonce: u64,
    },
    HeartbeatReply {
        nonce: u64,
    },
    Checkpoint(Checkpoint),
}
