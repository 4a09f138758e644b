//! Byte encoding of replication frames ([`wire::Frame`]).
//!
//! Every frame on the stream is
//!
//! ```text
//!  0        4        8
//!  +--------+--------+---------------------------+
//!  | len    | crc32c | body (postcard of Frame)  |
//!  | u32 LE | u32 LE | len bytes                 |
//!  +--------+--------+---------------------------+
//! ```
//!
//! `len` is the body length (at most [`MAX_FRAME_BODY`]); the CRC32C covers the
//! body only. A decoder reads the 8-byte header, rejects an oversized `len`
//! *before* buffering or allocating anything for the body, checks the CRC,
//! decodes the body with postcard (the whole body must be consumed) and finally
//! validates the frame semantically ([`validate_frame`]): names that may become
//! file names, writer indices, the `vector[writer] == seq` rule of writes,
//! payload and length bounds. A frame that fails any step is an error; the
//! stream has lost its framing or its peer is broken and must be closed.
//!
//! Bounds: a decoded frame never needs more memory than its body (postcard
//! pre-allocates sequences at most as long as the remaining input, and serde
//! caps pre-allocation at 1 MiB), and [`FrameReader`] never buffers more than
//! one maximal frame ([`MAX_BUFFERED`] bytes).

use crate::vector::{CountVector, EPOCH_ENTRY, MAX_WRITERS};
use crate::wire::{
    Ack, Checkpoint, Frame, Hello, PageEncoding, WriteKind, FRAME_HEADER_LEN, MAX_DEVICE_STATE,
    MAX_DISKS_PER_HELLO, MAX_FRAME_BODY, MAX_GUEST_RAM, MAX_NAME_LEN, MAX_WRITE_PAYLOAD,
    MIN_PROTOCOL_VERSION, PAGE_SIZE, PROTOCOL_VERSION,
};

/// Largest `len` of a `Zeroes` or `Trim` write (1 TiB): larger requests are split by the agent.
pub const MAX_RANGE_LEN: u64 = 1 << 40;
/// Longest human-readable reason of a `Reject` frame, in bytes.
pub const MAX_REASON_LEN: usize = 4096;
/// Largest chunk of checkpoint state carried by one `Checkpoint::Pages` or `Checkpoint::Device` frame.
pub const MAX_CHECKPOINT_CHUNK: usize = MAX_WRITE_PAYLOAD;
/// Most bytes a [`FrameReader`] ever buffers: one maximal frame with its header.
pub const MAX_BUFFERED: usize = FRAME_HEADER_LEN + MAX_FRAME_BODY;

/// Why bytes could not be turned into a frame (or a frame into bytes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The header announces (or the encoder produced) a body larger than allowed.
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The CRC32C of the body does not match the header.
    #[error("frame checksum mismatch: header says {expected:#010x}, body has {actual:#010x}")]
    Checksum { expected: u32, actual: u32 },
    /// The body is not a postcard-encoded frame (postcard's error text, or trailing bytes).
    #[error("malformed frame body: {0}")]
    Malformed(String),
    /// The frame decoded but breaks a rule of the protocol (see [`validate_frame`]).
    #[error("invalid frame: {0}")]
    Invalid(String),
    /// The peer's protocol version (range) does not overlap the versions this build speaks.
    #[error(
        "unsupported protocol version: peer speaks {peer_min}..={peer_max}, \
         this build speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}"
    )]
    UnsupportedVersion { peer_min: u16, peer_max: u16 },
    /// A [`FrameReader`] already failed; the stream has lost its framing.
    #[error("frame reader already failed earlier: {0}")]
    Poisoned(Box<CodecError>),
}

fn invalid(msg: impl Into<String>) -> CodecError {
    CodecError::Invalid(msg.into())
}

/// Checks that `s` is safe to use as a single file-name component:
/// 1..=[`MAX_NAME_LEN`] bytes of `[A-Za-z0-9_.-]`, not `.` or `..`, not starting
/// with `-` (option injection) or `.` (hidden files, `..`).
pub fn validate_name(s: &str) -> Result<(), CodecError> {
    if s.is_empty() {
        return Err(invalid("empty name"));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(invalid(format!(
            "name of {} bytes is longer than {MAX_NAME_LEN}",
            s.len()
        )));
    }
    if let Some(bad) = s
        .bytes()
        .find(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')))
    {
        return Err(invalid(format!(
            "name {:?} contains byte {bad:#04x}; allowed are [A-Za-z0-9_.-]",
            s.escape_debug().to_string()
        )));
    }
    if s.starts_with('.') || s.starts_with('-') {
        // Also covers "." and "..".
        return Err(invalid(format!(
            "name {s:?} must not start with '.' or '-'"
        )));
    }
    Ok(())
}

/// Checks a count vector carried in a frame: the entries between the writers
/// and the epoch entry (`MAX_WRITERS..EPOCH_ENTRY`) are reserved and must be zero.
pub fn validate_vector(v: &CountVector, what: &str) -> Result<(), CodecError> {
    match (MAX_WRITERS..EPOCH_ENTRY).find(|&i| v.get(i) != 0) {
        Some(i) => Err(invalid(format!(
            "{what}: reserved vector entry {i} is {} (must be 0) in {v}",
            v.get(i)
        ))),
        None => Ok(()),
    }
}

fn validate_writer(w: crate::WriterId, what: &str) -> Result<(), CodecError> {
    if w.index() >= MAX_WRITERS {
        return Err(invalid(format!(
            "{what}: writer {} out of range (max {})",
            w.0,
            MAX_WRITERS - 1
        )));
    }
    Ok(())
}

fn validate_range(offset: u64, len: u64, what: &str) -> Result<(), CodecError> {
    if offset.checked_add(len).is_none() {
        return Err(invalid(format!(
            "{what}: offset {offset} + length {len} overflows"
        )));
    }
    Ok(())
}

fn validate_hello(h: &Hello) -> Result<(), CodecError> {
    if h.min_version == 0 || h.min_version > h.max_version {
        return Err(invalid(format!(
            "hello: bad version range {}..={}",
            h.min_version, h.max_version
        )));
    }
    validate_name(&h.group)?;
    validate_name(&h.agent)?;
    if h.disks.len() > MAX_DISKS_PER_HELLO {
        return Err(invalid(format!(
            "hello announces {} disks (max {MAX_DISKS_PER_HELLO})",
            h.disks.len()
        )));
    }
    for (i, d) in h.disks.iter().enumerate() {
        validate_name(&d.name)?;
        validate_writer(d.writer, "hello disk")?;
        if h.disks[..i].iter().any(|o| o.name == d.name) {
            return Err(invalid(format!("hello announces disk {:?} twice", d.name)));
        }
    }
    Ok(())
}

fn validate_ack(a: &Ack) -> Result<(), CodecError> {
    validate_writer(a.writer, "ack")?;
    if a.first == 0 || a.first > a.last {
        return Err(invalid(format!(
            "ack of {}: bad seq range {}..={}",
            a.writer, a.first, a.last
        )));
    }
    Ok(())
}

fn validate_checkpoint(c: &Checkpoint) -> Result<(), CodecError> {
    let epoch_ok = |epoch: u64, what: &str| {
        if epoch == 0 {
            Err(invalid(format!(
                "checkpoint {what}: epoch 0 (epochs start at 1)"
            )))
        } else {
            Ok(())
        }
    };
    let chunk_ok = |len: usize, what: &str| {
        if len > MAX_CHECKPOINT_CHUNK {
            Err(invalid(format!(
                "checkpoint {what} chunk of {len} bytes (max {MAX_CHECKPOINT_CHUNK})"
            )))
        } else {
            Ok(())
        }
    };
    match c {
        Checkpoint::Begin {
            machine,
            epoch,
            ram_bytes,
        } => {
            validate_name(machine)?;
            epoch_ok(*epoch, "begin")?;
            if *ram_bytes == 0 || !ram_bytes.is_multiple_of(PAGE_SIZE) || *ram_bytes > MAX_GUEST_RAM
            {
                return Err(invalid(format!(
                    "checkpoint begin of {machine}: RAM size {ram_bytes} is not a positive \
                     multiple of {PAGE_SIZE} up to {MAX_GUEST_RAM}"
                )));
            }
            Ok(())
        }
        Checkpoint::Pages {
            epoch,
            offset,
            encoding,
            data,
        } => {
            epoch_ok(*epoch, "pages")?;
            chunk_ok(data.len(), "pages")?;
            let len = encoding.page_bytes(data.len());
            if len > MAX_CHECKPOINT_CHUNK as u64
                || (*encoding != PageEncoding::Raw && data.is_empty())
            {
                return Err(invalid(format!(
                    "checkpoint pages at {offset}: {len} bytes of pages in {} bytes of {encoding:?}",
                    data.len()
                )));
            }
            if !offset.is_multiple_of(PAGE_SIZE) || len == 0 || !len.is_multiple_of(PAGE_SIZE) {
                return Err(invalid(format!(
                    "checkpoint pages at {offset}, {len} bytes: not whole {PAGE_SIZE}-byte pages"
                )));
            }
            validate_range(*offset, len, "checkpoint pages")?;
            if offset + len > MAX_GUEST_RAM {
                return Err(invalid(format!(
                    "checkpoint pages end at {} beyond {MAX_GUEST_RAM}",
                    offset + len
                )));
            }
            Ok(())
        }
        Checkpoint::Device {
            epoch,
            offset,
            data,
        } => {
            epoch_ok(*epoch, "device")?;
            chunk_ok(data.len(), "device")?;
            validate_range(*offset, data.len() as u64, "checkpoint device chunk")?;
            if offset + data.len() as u64 > MAX_DEVICE_STATE {
                return Err(invalid(format!(
                    "checkpoint device state beyond {MAX_DEVICE_STATE} bytes"
                )));
            }
            Ok(())
        }
        Checkpoint::End {
            epoch,
            pages,
            device_bytes,
        } => {
            epoch_ok(*epoch, "end")?;
            if *pages > MAX_GUEST_RAM / PAGE_SIZE || *device_bytes > MAX_DEVICE_STATE {
                return Err(invalid(format!(
                    "checkpoint end: {pages} pages / {device_bytes} device bytes out of range"
                )));
            }
            Ok(())
        }
        Checkpoint::Commit { epoch, barrier } => {
            epoch_ok(*epoch, "commit")?;
            validate_vector(barrier, "checkpoint barrier")?;
            if barrier.get(EPOCH_ENTRY) != 0 {
                return Err(invalid("checkpoint barrier: epoch entry must be 0"));
            }
            Ok(())
        }
        Checkpoint::Ack { epoch } => epoch_ok(*epoch, "ack"),
    }
}

/// Semantic validation of a frame (called by [`decode_frame`] and [`encode_frame`]).
///
/// Rules: names pass [`validate_name`]; writers are `< MAX_WRITERS`; vectors have
/// their reserved entries zero ([`validate_vector`]); a write has `seq >= 1`,
/// `vector[writer] == seq`, a disk index `< MAX_DISKS_PER_HELLO`, a data payload
/// of at most [`MAX_WRITE_PAYLOAD`] bytes, a zeroes/trim length of at most
/// [`MAX_RANGE_LEN`] and `offset + len` without overflow; an ack has
/// `1 <= first <= last`; a hello has `1 <= min_version <= max_version`, at most
/// [`MAX_DISKS_PER_HELLO`] disks with distinct names; a welcome names a version
/// this build speaks ([`CodecError::UnsupportedVersion`] otherwise) and each
/// writer at most once; a reject reason is at most [`MAX_REASON_LEN`] bytes;
/// checkpoint frames have epochs ≥ 1, chunks of at most [`MAX_CHECKPOINT_CHUNK`]
/// bytes (of data and of the pages they encode), RAM pages whole and page aligned
/// below [`MAX_GUEST_RAM`], a compressed page frame not empty, device state
/// below [`MAX_DEVICE_STATE`] and a barrier without an epoch entry.
pub fn validate_frame(frame: &Frame) -> Result<(), CodecError> {
    match frame {
        Frame::Hello(h) => validate_hello(h),
        Frame::Welcome(w) => {
            if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&w.version) {
                return Err(CodecError::UnsupportedVersion {
                    peer_min: w.version,
                    peer_max: w.version,
                });
            }
            if w.writers.len() > MAX_WRITERS {
                return Err(invalid(format!(
                    "welcome lists {} writers (max {MAX_WRITERS})",
                    w.writers.len()
                )));
            }
            for (i, s) in w.writers.iter().enumerate() {
                validate_writer(s.writer, "welcome")?;
                if w.writers[..i].iter().any(|o| o.writer == s.writer) {
                    return Err(invalid(format!("welcome lists {} twice", s.writer)));
                }
            }
            validate_vector(&w.committed, "welcome committed vector")
        }
        Frame::Reject { reason } => {
            if reason.len() > MAX_REASON_LEN {
                return Err(invalid(format!(
                    "reject reason of {} bytes (max {MAX_REASON_LEN})",
                    reason.len()
                )));
            }
            Ok(())
        }
        Frame::Write(w) => {
            validate_writer(w.writer, "write")?;
            if w.seq == 0 {
                return Err(invalid(format!("write of {}: seq 0", w.writer)));
            }
            let own = w.vector.get(w.writer.index());
            if own != w.seq {
                return Err(invalid(format!(
                    "write of {} seq {}: vector {} has {own} in the writer's entry",
                    w.writer, w.seq, w.vector
                )));
            }
            validate_vector(&w.vector, "write vector")?;
            if usize::from(w.disk) >= MAX_DISKS_PER_HELLO {
                return Err(invalid(format!(
                    "write of {} seq {}: disk index {} out of range",
                    w.writer, w.seq, w.disk
                )));
            }
            let len = match &w.kind {
                WriteKind::Data(data) => {
                    if data.len() > MAX_WRITE_PAYLOAD {
                        return Err(invalid(format!(
                            "write of {} seq {}: payload of {} bytes (max {MAX_WRITE_PAYLOAD})",
                            w.writer,
                            w.seq,
                            data.len()
                        )));
                    }
                    data.len() as u64
                }
                WriteKind::Zeroes { len } | WriteKind::Trim { len } => {
                    if *len > MAX_RANGE_LEN {
                        return Err(invalid(format!(
                            "write of {} seq {}: zeroes/trim of {len} bytes (max {MAX_RANGE_LEN})",
                            w.writer, w.seq
                        )));
                    }
                    *len
                }
            };
            validate_range(w.offset, len, "write")
        }
        Frame::Ack(a) => validate_ack(a),
        Frame::Committed { vector } => validate_vector(vector, "committed vector"),
        Frame::Heartbeat { .. } | Frame::HeartbeatReply { .. } => Ok(()),
        Frame::Checkpoint(c) => validate_checkpoint(c),
    }
}

/// The highest protocol version both this build and a peer announcing
/// `peer_min..=peer_max` speak (what the server puts in its welcome).
pub fn negotiate_version(peer_min: u16, peer_max: u16) -> Result<u16, CodecError> {
    let hi = peer_max.min(PROTOCOL_VERSION);
    let lo = peer_min.max(MIN_PROTOCOL_VERSION);
    if peer_min > peer_max || lo > hi {
        return Err(CodecError::UnsupportedVersion { peer_min, peer_max });
    }
    Ok(hi)
}

/// Serde representation of byte payloads (`WriteKind::Data`, `Checkpoint::State::data`):
/// `serialize_bytes` / `deserialize_byte_buf` instead of serde's default
/// element-by-element sequence. For postcard both are "varint length, then the
/// bytes", so the wire encoding is identical; the payload is copied with one
/// `memcpy` instead of one call per byte. Used as
/// `#[serde(with = "crate::codec::payload_bytes")]` in [`crate::wire`].
pub mod payload_bytes {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::Serializer;
    use std::fmt;

    /// Serializes `bytes` as a byte string.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    /// Deserializes a byte string (or, for self-describing formats, a sequence of u8).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // Pre-allocate at most 64 KiB on the peer's word; grow as bytes really arrive.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64 * 1024));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

/// postcard output flavor that appends to a borrowed `Vec` (copies slices with
/// one `extend_from_slice`, keeps the caller's buffer on error).
struct AppendVec<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for AppendVec<'_> {
    type Output = ();

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Validates `frame` and appends its encoding (header and body) to `out`.
/// On error `out` is left as it was.
pub fn encode_frame(frame: &Frame, out: &mut Vec<u8>) -> Result<(), CodecError> {
    validate_frame(frame)?;
    let start = out.len();
    if let Frame::Write(w) = frame {
        if let WriteKind::Data(d) = &w.kind {
            out.reserve(FRAME_HEADER_LEN + d.len() + 256);
        }
    }
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    if let Err(e) = postcard::serialize_with_flavor(frame, AppendVec(out)) {
        out.truncate(start);
        return Err(CodecError::Malformed(e.to_string()));
    }
    let body_start = start + FRAME_HEADER_LEN;
    let len = out.len() - body_start;
    if len > MAX_FRAME_BODY {
        out.truncate(start);
        return Err(CodecError::TooLarge {
            len,
            max: MAX_FRAME_BODY,
        });
    }
    let crc = crc32c::crc32c(&out[body_start..]);
    // len <= MAX_FRAME_BODY < u32::MAX, checked above.
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out[start + 4..body_start].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Reads the body length from a buffer holding at least the 4 length bytes and
/// checks it against [`MAX_FRAME_BODY`].
fn header_len(buf: &[u8]) -> Result<Option<usize>, CodecError> {
    let Some(bytes) = buf.get(..4) else {
        return Ok(None);
    };
    let mut raw = [0u8; 4];
    raw.copy_from_slice(bytes);
    let len = u32::from_le_bytes(raw) as usize;
    if len > MAX_FRAME_BODY {
        return Err(CodecError::TooLarge {
            len,
            max: MAX_FRAME_BODY,
        });
    }
    Ok(Some(len))
}

/// Decodes the first frame of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (read more and
/// call again), `Ok(Some((frame, consumed)))` with the number of bytes the frame
/// occupied, or an error when the bytes can never become a valid frame. An
/// oversized length is reported as soon as the 4 length bytes are present.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, CodecError> {
    let Some(len) = header_len(buf)? else {
        return Ok(None);
    };
    let total = FRAME_HEADER_LEN + len;
    let Some(frame_bytes) = buf.get(..total) else {
        return Ok(None);
    };
    let (header, body) = frame_bytes.split_at(FRAME_HEADER_LEN);
    let mut crc_raw = [0u8; 4];
    crc_raw.copy_from_slice(&header[4..8]);
    let expected = u32::from_le_bytes(crc_raw);
    let actual = crc32c::crc32c(body);
    if expected != actual {
        return Err(CodecError::Checksum { expected, actual });
    }
    let (frame, rest) = postcard::take_from_bytes::<Frame>(body)
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CodecError::Malformed(format!(
            "{} trailing bytes after the frame body",
            rest.len()
        )));
    }
    validate_frame(&frame)?;
    Ok(Some((frame, total)))
}

/// Streaming decoder: feed it bytes as they arrive, take frames out.
///
/// The internal buffer never holds more than [`MAX_BUFFERED`] bytes (one maximal
/// frame with its header). [`push`](Self::push) accepts only as many bytes as fit
/// and returns how many it took; the caller drains frames with
/// [`next`](Self::next) and pushes the rest. When the buffer is full, `next`
/// always makes progress (a frame or an error), so this never deadlocks.
///
/// After the first error the reader is poisoned: the stream has lost its
/// framing and every later `next` returns [`CodecError::Poisoned`].
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Bytes of `buf` before `start` were consumed by earlier frames.
    start: usize,
    failed: Option<CodecError>,
}

impl FrameReader {
    /// An empty reader (allocates lazily, up to [`MAX_BUFFERED`] bytes).
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether the reader has failed (see [`CodecError::Poisoned`]).
    pub fn is_poisoned(&self) -> bool {
        self.failed.is_some()
    }

    /// Appends as much of `bytes` as fits below [`MAX_BUFFERED`]; returns the
    /// number of bytes taken (the caller keeps the rest and pushes it after
    /// draining [`next`](Self::next)). Takes nothing once poisoned.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        if self.failed.is_some() {
            return 0;
        }
        // Compact when room is needed, or when the consumed prefix is large and at
        // least as long as what must move (copying stays amortised O(1) per byte).
        let needs_room = self.buf.len() + bytes.len() > MAX_BUFFERED;
        let worth_it = self.start >= 4096 && self.start >= self.buffered();
        if self.start > 0 && (needs_room || worth_it) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let room = MAX_BUFFERED - self.buf.len();
        let take = bytes.len().min(room);
        self.buf.extend_from_slice(&bytes[..take]);
        take
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or an error
    /// (oversized length as soon as the header is in, bad checksum, malformed or
    /// invalid frame).
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Frame>, CodecError> {
        if let Some(e) = &self.failed {
            return Err(CodecError::Poisoned(Box::new(e.clone())));
        }
        match decode_frame(&self.buf[self.start..]) {
            Ok(Some((frame, used))) => {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                Ok(Some(frame))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.failed = Some(e.clone());
                self.buf = Vec::new();
                self.start = 0;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vector::{Seq, VECTOR_LEN};
    use crate::wire::{DiskHello, Welcome, Write, WriterState};
    use crate::WriterId;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}"
    }

    fn writer() -> impl Strategy<Value = WriterId> {
        (0..MAX_WRITERS as u8).prop_map(WriterId)
    }

    /// Vectors with reserved entries zero (valid on the wire).
    fn vector() -> impl Strategy<Value = CountVector> {
        (
            proptest::collection::vec(any::<u64>(), MAX_WRITERS),
            any::<u64>(),
        )
            .prop_map(|(ws, epoch)| {
                let mut v = CountVector::from_slice(&ws);
                v.set(EPOCH_ENTRY, epoch);
                v
            })
    }

    fn hello() -> impl Strategy<Value = Hello> {
        (
            1u16..5,
            0u16..5,
            name(),
            any::<u16>(),
            name(),
            proptest::collection::vec((name(), any::<u64>(), writer(), any::<u64>()), 0..8),
        )
            .prop_map(|(min, extra, group, group_id, agent, disks)| {
                let mut seen = std::collections::HashSet::new();
                let disks = disks
                    .into_iter()
                    .filter(|d| seen.insert(d.0.clone()))
                    .map(|(name, size, writer, generation)| DiskHello {
                        name,
                        size,
                        writer,
                        generation,
                    })
                    .collect();
                Hello {
                    min_version: min,
                    max_version: min + extra,
                    group,
                    group_id,
                    agent,
                    disks,
                }
            })
    }

    fn welcome() -> impl Strategy<Value = Welcome> {
        (
            proptest::collection::btree_map(
                0..MAX_WRITERS as u8,
                (any::<u64>(), any::<u64>()),
                0..=MAX_WRITERS,
            ),
            vector(),
        )
            .prop_map(|(ws, committed)| Welcome {
                version: PROTOCOL_VERSION,
                writers: ws
                    .into_iter()
                    .map(|(w, (generation, durable))| WriterState {
                        writer: WriterId(w),
                        generation,
                        durable,
                    })
                    .collect(),
                committed,
            })
    }

    fn write_kind() -> impl Strategy<Value = WriteKind> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..2048).prop_map(WriteKind::Data),
            (0..=MAX_RANGE_LEN).prop_map(|len| WriteKind::Zeroes { len }),
            (0..=MAX_RANGE_LEN).prop_map(|len| WriteKind::Trim { len }),
        ]
    }

    fn write() -> impl Strategy<Value = Write> {
        (
            writer(),
            any::<u64>(),
            1..Seq::MAX,
            0..MAX_DISKS_PER_HELLO as u16,
            0..u64::MAX / 2,
            vector(),
            write_kind(),
        )
            .prop_map(
                |(writer, generation, seq, disk, offset, mut vector, kind)| {
                    vector.set(writer.index(), seq);
                    Write {
                        writer,
                        generation,
                        seq,
                        disk,
                        offset,
                        vector,
                        kind,
                    }
                },
            )
    }

    fn checkpoint() -> impl Strategy<Value = Checkpoint> {
        let page = PAGE_SIZE as usize;
        prop_oneof![
            (name(), 1..u64::MAX, 1..=MAX_GUEST_RAM / PAGE_SIZE).prop_map(
                |(machine, epoch, pages)| Checkpoint::Begin {
                    machine,
                    epoch,
                    ram_bytes: pages * PAGE_SIZE
                }
            ),
            (
                1..u64::MAX,
                0..MAX_GUEST_RAM / PAGE_SIZE - 2,
                1..3usize,
                any::<u8>()
            )
                .prop_map(move |(epoch, page_no, n, b)| Checkpoint::Pages {
                    epoch,
                    offset: page_no * PAGE_SIZE,
                    encoding: crate::wire::PageEncoding::Raw,
                    data: vec![b; n * page]
                }),
            (
                1..u64::MAX,
                0..MAX_GUEST_RAM / PAGE_SIZE - 256,
                1..=256u32,
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 1..64)
            )
                .prop_map(|(epoch, page_no, pages, xor, data)| Checkpoint::Pages {
                    epoch,
                    offset: page_no * PAGE_SIZE,
                    encoding: if xor {
                        PageEncoding::XorLz4 { pages }
                    } else {
                        PageEncoding::Lz4 { pages }
                    },
                    data
                }),
            (
                1..u64::MAX,
                0..MAX_DEVICE_STATE / 2,
                proptest::collection::vec(any::<u8>(), 0..512)
            )
                .prop_map(|(epoch, offset, data)| Checkpoint::Device {
                    epoch,
                    offset,
                    data
                }),
            (
                1..u64::MAX,
                0..=MAX_GUEST_RAM / PAGE_SIZE,
                0..=MAX_DEVICE_STATE
            )
                .prop_map(|(epoch, pages, device_bytes)| Checkpoint::End {
                    epoch,
                    pages,
                    device_bytes
                }),
            (1..u64::MAX, vector()).prop_map(|(epoch, mut barrier)| {
                barrier.set(EPOCH_ENTRY, 0);
                Checkpoint::Commit { epoch, barrier }
            }),
            (1..u64::MAX).prop_map(|epoch| Checkpoint::Ack { epoch }),
        ]
    }

    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            hello().prop_map(Frame::Hello),
            welcome().prop_map(Frame::Welcome),
            ".{0,100}".prop_map(|reason| Frame::Reject { reason }),
            write().prop_map(Frame::Write),
            (writer(), any::<u64>(), 1..Seq::MAX / 2, 0..Seq::MAX / 2).prop_map(
                |(writer, generation, first, extra)| Frame::Ack(Ack {
                    writer,
                    generation,
                    first,
                    last: first + extra
                })
            ),
            vector().prop_map(|vector| Frame::Committed { vector }),
            any::<u64>().prop_map(|nonce| Frame::Heartbeat { nonce }),
            any::<u64>().prop_map(|nonce| Frame::HeartbeatReply { nonce }),
            checkpoint().prop_map(Frame::Checkpoint),
        ]
    }

    fn encoded(frame: &Frame) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(frame, &mut out).unwrap();
        out
    }

    fn data_write(seq: Seq, len: usize) -> Frame {
        let mut vector = CountVector::ZERO;
        vector.set(1, seq);
        vector.set(0, 7);
        Frame::Write(Write {
            writer: WriterId(1),
            generation: 3,
            seq,
            disk: 0,
            offset: 4096,
            vector,
            kind: WriteKind::Data((0..len).map(|i| i as u8).collect()),
        })
    }

    #[test]
    fn header_layout_is_len_crc_body() {
        let f = Frame::Heartbeat { nonce: 5 };
        let bytes = encoded(&f);
        let len = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
        assert_eq!(len, bytes.len() - FRAME_HEADER_LEN);
        assert_eq!(crc, crc32c::crc32c(&bytes[8..]));
        assert_eq!(&bytes[8..], postcard::to_allocvec(&f).unwrap().as_slice());
    }

    #[test]
    fn encode_appends_and_frames_decode_in_sequence() {
        let a = data_write(1, 4096);
        let b = Frame::Heartbeat { nonce: 9 };
        let mut out = vec![0xAA];
        encode_frame(&a, &mut out).unwrap();
        encode_frame(&b, &mut out).unwrap();
        assert_eq!(out[0], 0xAA);
        let (fa, na) = decode_frame(&out[1..]).unwrap().unwrap();
        let (fb, nb) = decode_frame(&out[1 + na..]).unwrap().unwrap();
        assert_eq!((fa, fb), (a, b));
        assert_eq!(1 + na + nb, out.len());
    }

    #[test]
    fn oversized_length_errors_immediately() {
        let bad = ((MAX_FRAME_BODY + 1) as u32).to_le_bytes();
        // Only the 4 length bytes: already an error, no waiting for the body.
        assert_eq!(
            decode_frame(&bad),
            Err(CodecError::TooLarge {
                len: MAX_FRAME_BODY + 1,
                max: MAX_FRAME_BODY
            })
        );
        assert!(matches!(
            decode_frame(&u32::MAX.to_le_bytes()),
            Err(CodecError::TooLarge { .. })
        ));
        let mut r = FrameReader::new();
        assert_eq!(r.push(&bad), 4);
        assert!(matches!(r.next(), Err(CodecError::TooLarge { .. })));
        assert!(matches!(r.next(), Err(CodecError::Poisoned(_))));
        assert_eq!(r.push(&[1, 2, 3]), 0);
        // Exactly the limit is fine (just incomplete).
        assert_eq!(
            decode_frame(&(MAX_FRAME_BODY as u32).to_le_bytes()),
            Ok(None)
        );
    }

    #[test]
    fn encoder_refuses_invalid_frames_and_keeps_buffer() {
        let mut out = vec![1, 2, 3];
        let mut f = data_write(4, 16);
        if let Frame::Write(w) = &mut f {
            w.seq = 5; // vector says 4
        }
        assert!(matches!(
            encode_frame(&f, &mut out),
            Err(CodecError::Invalid(_))
        ));
        let big = data_write(1, MAX_WRITE_PAYLOAD + 1);
        assert!(matches!(
            encode_frame(&big, &mut out),
            Err(CodecError::Invalid(_))
        ));
        assert_eq!(out, vec![1, 2, 3]);
        // The largest legal write fits in a frame.
        encode_frame(&data_write(1, MAX_WRITE_PAYLOAD), &mut out).unwrap();
        assert!(out.len() - 3 <= MAX_BUFFERED);
    }

    /// Builds a correctly checksummed frame around an arbitrary body.
    fn raw_frame(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn semantic_violations_are_rejected_on_decode() {
        let mut cases: Vec<Frame> = Vec::new();
        let Frame::Write(w) = data_write(3, 8) else {
            unreachable!()
        };
        let mut bad = w.clone();
        bad.writer = WriterId(MAX_WRITERS as u8);
        cases.push(Frame::Write(bad));
        let mut bad = w.clone();
        bad.vector.set(1, 2);
        cases.push(Frame::Write(bad));
        let mut bad = w.clone();
        bad.seq = 0;
        bad.vector.set(1, 0);
        cases.push(Frame::Write(bad));
        let mut bad = w.clone();
        bad.vector.set(MAX_WRITERS, 1);
        cases.push(Frame::Write(bad));
        let mut bad = w.clone();
        bad.kind = WriteKind::Trim {
            len: MAX_RANGE_LEN + 1,
        };
        cases.push(Frame::Write(bad));
        let mut bad = w.clone();
        bad.offset = u64::MAX - 2;
        cases.push(Frame::Write(bad));
        let mut bad = w.clone();
        bad.disk = MAX_DISKS_PER_HELLO as u16;
        cases.push(Frame::Write(bad));
        for (first, last) in [(0, 3), (5, 4)] {
            cases.push(Frame::Ack(Ack {
                writer: WriterId(0),
                generation: 1,
                first,
                last,
            }));
        }
        let hello = Hello {
            min_version: 1,
            max_version: 1,
            group: "g".into(),
            group_id: 1,
            agent: "host-1".into(),
            disks: vec![],
        };
        for group in ["", ".", "..", "../etc", "-rf", ".hidden", "a/b", "a b", "é"] {
            cases.push(Frame::Hello(Hello {
                group: group.into(),
                ..hello.clone()
            }));
        }
        cases.push(Frame::Hello(Hello {
            group: "x".repeat(MAX_NAME_LEN + 1),
            ..hello.clone()
        }));
        cases.push(Frame::Hello(Hello {
            min_version: 2,
            max_version: 1,
            ..hello.clone()
        }));
        let disk = DiskHello {
            name: "d".into(),
            size: 1,
            writer: WriterId(0),
            generation: 1,
        };
        cases.push(Frame::Hello(Hello {
            disks: vec![disk.clone(); 2],
            ..hello.clone()
        }));
        cases.push(Frame::Hello(Hello {
            disks: (0..=MAX_DISKS_PER_HELLO)
                .map(|i| DiskHello {
                    name: format!("d{i}"),
                    ..disk.clone()
                })
                .collect(),
            ..hello.clone()
        }));
        cases.push(Frame::Reject {
            reason: "x".repeat(MAX_REASON_LEN + 1),
        });
        let pages = |epoch, offset, len| {
            Frame::Checkpoint(Checkpoint::Pages {
                epoch,
                offset,
                encoding: crate::wire::PageEncoding::Raw,
                data: vec![0; len],
            })
        };
        let page = PAGE_SIZE as usize;
        cases.push(pages(1, 0, MAX_CHECKPOINT_CHUNK + page));
        cases.push(pages(0, 0, page));
        cases.push(pages(1, 1, page));
        cases.push(pages(1, 0, page + 1));
        cases.push(pages(1, 0, 0));
        cases.push(pages(1, MAX_GUEST_RAM, page));
        let lz4 = |offset, pages, data: Vec<u8>| {
            Frame::Checkpoint(Checkpoint::Pages {
                epoch: 1,
                offset,
                encoding: PageEncoding::Lz4 { pages },
                data,
            })
        };
        let chunk_pages = (MAX_CHECKPOINT_CHUNK / page) as u32;
        cases.push(lz4(0, chunk_pages + 1, vec![0; 8]));
        cases.push(lz4(0, 0, vec![0; 8]));
        cases.push(lz4(0, 1, Vec::new()));
        cases.push(lz4(1, 1, vec![0; 8]));
        cases.push(lz4(MAX_GUEST_RAM - PAGE_SIZE, 2, vec![0; 8]));
        cases.push(Frame::Checkpoint(Checkpoint::Pages {
            epoch: 1,
            offset: 0,
            encoding: PageEncoding::XorLz4 { pages: 1 },
            data: vec![0; MAX_CHECKPOINT_CHUNK + 1],
        }));
        cases.push(pages(1, u64::MAX - PAGE_SIZE + 1, page));
        cases.push(Frame::Checkpoint(Checkpoint::Device {
            epoch: 1,
            offset: MAX_DEVICE_STATE,
            data: vec![0; 1],
        }));
        cases.push(Frame::Checkpoint(Checkpoint::Begin {
            machine: "..".into(),
            epoch: 1,
            ram_bytes: PAGE_SIZE,
        }));
        for ram_bytes in [0, PAGE_SIZE + 1, MAX_GUEST_RAM + PAGE_SIZE] {
            cases.push(Frame::Checkpoint(Checkpoint::Begin {
                machine: "vm".into(),
                epoch: 1,
                ram_bytes,
            }));
        }
        cases.push(Frame::Checkpoint(Checkpoint::End {
            epoch: 1,
            pages: 0,
            device_bytes: MAX_DEVICE_STATE + 1,
        }));
        let mut barrier = CountVector::ZERO;
        barrier.set(EPOCH_ENTRY, 3);
        cases.push(Frame::Checkpoint(Checkpoint::Commit { epoch: 1, barrier }));
        cases.push(Frame::Checkpoint(Checkpoint::Ack { epoch: 0 }));
        for f in cases {
            let body = postcard::to_allocvec(&f).unwrap();
            let r = decode_frame(&raw_frame(&body));
            assert!(matches!(r, Err(CodecError::Invalid(_))), "{f:?} -> {r:?}");
        }
        let bad_version = Frame::Welcome(Welcome {
            version: PROTOCOL_VERSION + 1,
            writers: vec![],
            committed: CountVector::ZERO,
        });
        let body = postcard::to_allocvec(&bad_version).unwrap();
        assert!(matches!(
            decode_frame(&raw_frame(&body)),
            Err(CodecError::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn valid_names() {
        for ok in [
            "a",
            "db-0",
            "web_1.img",
            "A.b-c_d",
            &"z".repeat(MAX_NAME_LEN),
        ] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn version_negotiation() {
        assert_eq!(negotiate_version(1, 9), Ok(PROTOCOL_VERSION));
        assert!(negotiate_version(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3).is_err());
        assert!(negotiate_version(0, 0).is_err());
        assert!(negotiate_version(2, 1).is_err());
    }

    #[test]
    fn trailing_bytes_in_body_are_malformed() {
        let mut body = postcard::to_allocvec(&Frame::Heartbeat { nonce: 1 }).unwrap();
        body.push(0);
        assert!(matches!(
            decode_frame(&raw_frame(&body)),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(
            decode_frame(&raw_frame(&[])),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn huge_sequence_length_does_not_allocate_it() {
        // Write frame whose Data claims 2^60 bytes: postcard must fail on the end of
        // input, not pre-allocate (this test would abort with OOM otherwise).
        let mut body = postcard::to_allocvec(&data_write(1, 0)).unwrap();
        body.pop(); // the varint 0 of the empty payload
        body.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(matches!(
            decode_frame(&raw_frame(&body)),
            Err(CodecError::Malformed(_))
        ));
        // Same for a hello announcing 2^60 disks.
        let mut body = vec![0u8]; // variant Hello
        body.extend_from_slice(&[1, 1, 1, b'g', 0, 1, b'a']);
        body.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(matches!(
            decode_frame(&raw_frame(&body)),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn reader_handles_byte_at_a_time_and_full_buffer() {
        let frames = vec![
            data_write(1, 100),
            Frame::Heartbeat { nonce: 1 },
            data_write(2, MAX_WRITE_PAYLOAD),
            Frame::Committed {
                vector: CountVector::from_slice(&[1, 2]),
            },
        ];
        let mut bytes = Vec::new();
        for f in &frames {
            encode_frame(f, &mut bytes).unwrap();
        }
        // Small pieces.
        let mut r = FrameReader::new();
        let mut got = Vec::new();
        for piece in bytes.chunks(7919) {
            let mut rest = piece;
            while !rest.is_empty() {
                let n = r.push(rest);
                rest = &rest[n..];
                assert!(r.buffered() <= MAX_BUFFERED);
                while let Some(f) = r.next().unwrap() {
                    got.push(f);
                }
            }
        }
        assert_eq!(got, frames);
        assert_eq!(r.buffered(), 0);
        // Everything at once: push takes at most MAX_BUFFERED, next always progresses.
        let mut r = FrameReader::new();
        let mut got = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let n = r.push(rest);
            assert!(n > 0, "push made no progress");
            rest = &rest[n..];
            assert!(r.buffered() <= MAX_BUFFERED);
            while let Some(f) = r.next().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn every_frame_round_trips(f in frame()) {
            let bytes = encoded(&f);
            let (back, used) = decode_frame(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(&back, &f);
            // Through the streaming reader in random-ish pieces.
            let mut r = FrameReader::new();
            let mut got = None;
            for piece in bytes.chunks(13) {
                prop_assert_eq!(r.push(piece), piece.len());
                if let Some(x) = r.next().unwrap() {
                    prop_assert!(got.is_none());
                    got = Some(x);
                }
            }
            prop_assert_eq!(got, Some(f));
        }

        #[test]
        fn truncation_is_incomplete_not_error(f in frame()) {
            let bytes = encoded(&f);
            for cut in 0..bytes.len() {
                prop_assert_eq!(decode_frame(&bytes[..cut]), Ok(None), "cut at {}", cut);
            }
        }

        #[test]
        fn corruption_is_detected(f in frame(), pos in any::<prop::sample::Index>(), flip in 1u8..=255) {
            let mut bytes = encoded(&f);
            let i = pos.index(bytes.len());
            bytes[i] ^= flip;
            match decode_frame(&bytes) {
                // A corrupted length may just make the frame look longer.
                Ok(None) => prop_assert!(i < 4),
                Ok(Some(_)) => prop_assert!(false, "corruption at byte {} not detected", i),
                Err(_) => {}
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = decode_frame(&bytes);
            let mut r = FrameReader::new();
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let n = r.push(rest);
                rest = &rest[n..];
                prop_assert!(r.buffered() <= MAX_BUFFERED);
                match r.next() {
                    Ok(Some(_)) | Ok(None) => if n == 0 { break },
                    Err(_) => break,
                }
            }
        }

        #[test]
        fn random_bodies_with_valid_crc_never_panic(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
            // Past the CRC: exercises postcard and validation on hostile bodies.
            let bytes = raw_frame(&body);
            if let Ok(Some((f, used))) = decode_frame(&bytes) {
                prop_assert_eq!(used, bytes.len());
                prop_assert_eq!(validate_frame(&f), Ok(()));
            }
        }

        #[test]
        fn mutated_bodies_never_panic(
            f in frame(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
        ) {
            // Mutate the postcard body, then re-checksum so decoding gets past the CRC.
            let mut body = postcard::to_allocvec(&f).unwrap();
            for (pos, byte, op) in edits {
                match op {
                    0 if !body.is_empty() => { let i = pos.index(body.len()); body[i] = byte; }
                    1 => { let i = pos.index(body.len() + 1); body.insert(i, byte); }
                    _ if !body.is_empty() => { let i = pos.index(body.len()); body.truncate(i); }
                    _ => {}
                }
            }
            let bytes = raw_frame(&body);
            let _ = decode_frame(&bytes);
            let mut r = FrameReader::new();
            prop_assert_eq!(r.push(&bytes), bytes.len());
            let _ = r.next();
            prop_assert!(r.buffered() <= MAX_BUFFERED);
        }
    }

    #[test]
    fn payload_bytes_keep_the_default_postcard_encoding() {
        // What serde's default Vec<u8> (sequence of u8) would produce.
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        enum DefaultKind {
            Data(Vec<u8>),
            Zeroes { len: u64 },
            Trim { len: u64 },
        }
        for len in [0usize, 1, 127, 128, 300, 70_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31) as u8).collect();
            let ours = postcard::to_allocvec(&WriteKind::Data(data.clone())).unwrap();
            let default = postcard::to_allocvec(&DefaultKind::Data(data.clone())).unwrap();
            assert_eq!(ours, default, "len {len}");
            let back: WriteKind = postcard::from_bytes(&default).unwrap();
            assert_eq!(back, WriteKind::Data(data));
        }
    }

    /// Peak of live heap bytes allocated by the current thread since [`alloc_probe::reset`].
    mod alloc_probe {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        thread_local! {
            static LIVE: Cell<isize> = const { Cell::new(0) };
            static PEAK: Cell<isize> = const { Cell::new(0) };
        }

        fn add(delta: isize) {
            let _ = LIVE.try_with(|l| {
                let now = l.get() + delta;
                l.set(now);
                let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
            });
        }

        /// Counts the test binary's allocations per thread (test-only global allocator).
        pub struct Probe;

        // SAFETY: forwards every call to `System` unchanged; only counts sizes.
        unsafe impl GlobalAlloc for Probe {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                add(layout.size() as isize);
                System.alloc(layout)
            }
            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                add(-(layout.size() as isize));
                System.dealloc(ptr, layout)
            }
            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
                add(new as isize - layout.size() as isize);
                System.realloc(ptr, layout, new)
            }
        }

        /// Starts a measurement on this thread.
        pub fn reset() {
            let _ = LIVE.try_with(|l| l.set(0));
            let _ = PEAK.try_with(|p| p.set(0));
        }

        /// Peak live bytes since `reset`.
        pub fn peak() -> usize {
            PEAK.try_with(|p| p.get().max(0) as usize).unwrap_or(0)
        }
    }

    #[global_allocator]
    static PROBE: alloc_probe::Probe = alloc_probe::Probe;

    /// Decodes `bytes` with both entry points and checks the heap high-water mark:
    /// never more than the buffered input plus a bounded multiple of it (decoded
    /// frame, serde's capped pre-allocation), and never more than two maximal frames.
    fn decode_within_bound(bytes: &[u8]) -> Result<(), TestCaseError> {
        alloc_probe::reset();
        let _ = decode_frame(bytes);
        let peak = alloc_probe::peak();
        prop_assert!(
            peak <= 64 * bytes.len() + 4096,
            "decode_frame of {} bytes peaked at {} heap bytes",
            bytes.len(),
            peak
        );
        alloc_probe::reset();
        let mut r = FrameReader::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = r.push(rest);
            rest = &rest[n..];
            match r.next() {
                Ok(Some(_)) => {}
                Ok(None) if n > 0 => {}
                Ok(None) | Err(_) => break,
            }
        }
        let peak = alloc_probe::peak();
        prop_assert!(
            peak <= 2 * MAX_BUFFERED && peak <= 64 * bytes.len() + 4096,
            "FrameReader over {} bytes peaked at {} heap bytes",
            bytes.len(),
            peak
        );
        Ok(())
    }

    #[test]
    fn hostile_lengths_stay_within_allocation_bound() {
        // A maximal length header with a little body: nothing is allocated for the
        // announced size (FrameReader buffers only what was pushed).
        let mut b = (MAX_FRAME_BODY as u32).to_le_bytes().to_vec();
        b.extend_from_slice(&[0; 100]);
        decode_within_bound(&b).unwrap();
        // Hello claiming 2^60 disks inside a valid CRC.
        let mut body = vec![0u8, 1, 1, 1, b'g', 0, 1, b'a'];
        body.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        body.extend_from_slice(&[0; 64]);
        decode_within_bound(&raw_frame(&body)).unwrap();
        // Hello whose disk count equals the remaining bytes (postcard's size hint
        // then passes it to serde, which caps the pre-allocation).
        let mut body = vec![0u8, 1, 1, 1, b'g', 0, 1, b'a', 0xe8, 0x07];
        body.extend_from_slice(&[0; 1000]);
        decode_within_bound(&raw_frame(&body)).unwrap();
        // A maximal legal write: the decoded payload is the only big allocation.
        let mut big = Vec::new();
        encode_frame(&data_write(1, MAX_WRITE_PAYLOAD), &mut big).unwrap();
        alloc_probe::reset();
        let (f, _) = decode_frame(&big).unwrap().unwrap();
        assert!(
            alloc_probe::peak() <= MAX_WRITE_PAYLOAD + 4096,
            "{}",
            alloc_probe::peak()
        );
        drop(f);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_input_stays_within_allocation_bound(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            body in proptest::collection::vec(any::<u8>(), 0..1024),
        ) {
            decode_within_bound(&bytes)?;
            decode_within_bound(&raw_frame(&body))?;
        }

        #[test]
        fn mutated_frames_stay_within_allocation_bound(
            f in frame(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let mut body = postcard::to_allocvec(&f).unwrap();
            if !body.is_empty() {
                for (pos, byte) in edits {
                    let i = pos.index(body.len());
                    body[i] = byte;
                }
            }
            decode_within_bound(&raw_frame(&body))?;
        }
    }

    #[test]
    fn vector_len_assumption() {
        // validate_vector relies on the reserved block lying between writers and epoch.
        const { assert!(MAX_WRITERS <= EPOCH_ENTRY && EPOCH_ENTRY < VECTOR_LEN) };
    }
}
