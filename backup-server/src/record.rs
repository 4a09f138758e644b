//! Journal records: one per journaled write.
//!
//! ```text
//! +----------+-----------+------------------------------+---------------+
//! | len u32  | crc32c u32| head: postcard(RecordHead)   | payload bytes |
//! +----------+-----------+------------------------------+---------------+
//!            <------ crc covers head ++ payload (len bytes) ------------->
//! ```
//!
//! `RecordHead` carries writer, generation, seq, disk name, offset, kind/length,
//! the write's vector and the server's receive time (unix ms). A record is valid
//! only if its length is within [`MAX_RECORD_BODY`], its checksum matches, the head
//! decodes and the payload length matches the head. Anything else at the end of the
//! last segment is a torn tail (see [`crate::journal`]).

use pipecloud_core::wire::{Generation, MAX_FRAME_BODY};
use pipecloud_core::{CountVector, Seq, WriterId};
use serde::{Deserialize, Serialize};

/// Bytes before the body: `len` and `crc32c`.
pub const RECORD_HEADER_LEN: usize = 8;
/// Largest record body (a maximal write plus its head).
pub const MAX_RECORD_BODY: usize = MAX_FRAME_BODY + 4096;

/// What the write does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordKind {
    /// `len` payload bytes follow the head.
    Data,
    /// Write `len` zero bytes (no payload).
    Zeroes,
    /// Discard `len` bytes (applied as zeroes; no payload).
    Trim,
}

/// The metadata of a journaled write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordHead {
    /// Server receive time, unix milliseconds.
    pub recv_ms: u64,
    pub writer: WriterId,
    pub generation: Generation,
    pub seq: Seq,
    /// Disk name (validated at registration).
    pub disk: String,
    pub offset: u64,
    pub kind: RecordKind,
    /// Bytes affected (payload length for `Data`).
    pub len: u64,
    /// The writer's pending vector at issue time.
    pub vector: CountVector,
}

/// Why bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Fewer bytes than the header or the announced body (torn tail).
    #[error("truncated record: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    /// Announced length out of range.
    #[error("record length {0} out of range")]
    BadLength(usize),
    /// Checksum mismatch.
    #[error("record checksum mismatch")]
    Checksum,
    /// Head does not decode or payload length disagrees.
    #[error("malformed record: {0}")]
    Malformed(String),
}

/// Appends one encoded record to `out`; returns `(record_len, payload_offset_in_record)`.
pub fn encode(
    head: &RecordHead,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(usize, usize), RecordError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
    let head_bytes =
        postcard::to_stdvec(head).map_err(|e| RecordError::Malformed(e.to_string()))?;
    out.extend_from_slice(&head_bytes);
    let payload_off = out.len() - start;
    out.extend_from_slice(payload);
    let body_len = out.len() - start - RECORD_HEADER_LEN;
    if body_len > MAX_RECORD_BODY {
        out.truncate(start);
        return Err(RecordError::BadLength(body_len));
    }
    let crc = crc32c::crc32c(&out[start + RECORD_HEADER_LEN..]);
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok((out.len() - start, payload_off))
}

/// A decoded record borrowing its payload.
#[derive(Debug)]
pub struct Decoded<'a> {
    pub head: RecordHead,
    pub payload: &'a [u8],
    /// Offset of the payload from the start of the record.
    pub payload_off: usize,
    /// Total bytes of the record (header + body).
    pub total: usize,
}

/// Reads the body length from a record header, if the header is complete.
pub fn body_len(buf: &[u8]) -> Result<usize, RecordError> {
    let hdr = buf.get(..RECORD_HEADER_LEN).ok_or(RecordError::Truncated {
        need: RECORD_HEADER_LEN,
        have: buf.len(),
    })?;
    let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
    if len == 0 || len > MAX_RECORD_BODY {
        return Err(RecordError::BadLength(len));
    }
    Ok(len)
}

/// Decodes the record at the start of `buf`.
pub fn decode(buf: &[u8]) -> Result<Decoded<'_>, RecordError> {
    let len = body_len(buf)?;
    let total = RECORD_HEADER_LEN + len;
    let rec = buf.get(..total).ok_or(RecordError::Truncated {
        need: total,
        have: buf.len(),
    })?;
    let crc = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]);
    let body = &rec[RECORD_HEADER_LEN..];
    if crc32c::crc32c(body) != crc {
        return Err(RecordError::Checksum);
    }
    let (head, rest) = postcard::take_from_bytes::<RecordHead>(body)
        .map_err(|e| RecordError::Malformed(e.to_string()))?;
    let want = match head.kind {
        RecordKind::Data => head.len,
        RecordKind::Zeroes | RecordKind::Trim => 0,
    };
    if rest.len() as u64 != want {
        return Err(RecordError::Malformed(format!(
            "payload of {} bytes, head says {want}",
            rest.len()
        )));
    }
    Ok(Decoded {
        payload_off: total - rest.len(),
        head,
        payload: rest,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> RecordHead {
        RecordHead {
            recv_ms: 17,
            writer: WriterId(1),
            generation: 3,
            seq: 9,
            disk: "db".into(),
            offset: 4096,
            kind: RecordKind::Data,
            len: 5,
            vector: CountVector::from_slice(&[2, 9]),
        }
    }

    #[test]
    fn roundtrip_and_every_truncation_is_rejected() {
        let mut buf = Vec::new();
        let (n, poff) = encode(&head(), b"hello", &mut buf).unwrap();
        assert_eq!(n, buf.len());
        let d = decode(&buf).unwrap();
        assert_eq!(d.head, head());
        assert_eq!(d.payload, b"hello");
        assert_eq!(d.payload_off, poff);
        for cut in 0..buf.len() {
            assert!(decode(&buf[..cut]).is_err(), "cut {cut}");
        }
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x40;
            assert!(decode(&b).is_err(), "flip {i}");
        }
    }
}
