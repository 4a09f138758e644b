//! Journal segment files of one group (`groups/<group>/journal/seg-<n:016x>.log`).
//!
//! A segment is a 16-byte header (`b"PCJSEG01"`, segment number u64 LE) followed by
//! records ([`crate::record`]). Segments are only appended to; the active one is
//! rolled at `segment_bytes` (the old one is fdatasync'ed, the new one created and
//! the directory fsync'ed before any record in it is acked). The ingest thread
//! makes a batch durable with one `fdatasync` per touched segment (group commit).
//!
//! **Recovery** ([`scan`]) reads every segment in order and stops at the first
//! record that is truncated, fails its checksum or does not decode. In the last
//! segment that is a torn tail (a write that was never acked): the file is
//! truncated there and the cut is logged. In an earlier segment it means damage to
//! data that was acked: the rest of that segment is cut off too and an error is
//! logged loudly (there is nothing better to do; the count is reported).

use crate::record::{self, Decoded, RecordError, RECORD_HEADER_LEN};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Segment header length.
pub const SEGMENT_HEADER_LEN: u64 = 16;
const SEGMENT_MAGIC: &[u8; 8] = b"PCJSEG01";

/// Path of segment `n` in `dir`.
pub fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("seg-{n:016x}.log"))
}

/// Segment numbers present in `dir`, ascending.
pub fn list_segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(hex) = name
            .strip_prefix("seg-")
            .and_then(|r| r.strip_suffix(".log"))
        {
            if let Ok(n) = u64::from_str_radix(hex, 16) {
                out.push(n);
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// The segment being appended to.
#[derive(Debug)]
pub struct ActiveSegment {
    pub number: u64,
    pub file: File,
    /// Bytes in the file (header included).
    pub len: u64,
}

impl ActiveSegment {
    /// Creates segment `n` in `dir` (fails if it exists) and makes it durable.
    pub fn create(dir: &Path, n: u64) -> std::io::Result<ActiveSegment> {
        let path = segment_path(dir, n);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let mut hdr = Vec::with_capacity(16);
        hdr.extend_from_slice(SEGMENT_MAGIC);
        hdr.extend_from_slice(&n.to_le_bytes());
        file.write_all(&hdr)?;
        file.sync_all()?;
        crate::meta::sync_dir(dir)?;
        Ok(ActiveSegment {
            number: n,
            file,
            len: SEGMENT_HEADER_LEN,
        })
    }

    /// Opens an existing segment for appending at `len` (after recovery).
    pub fn reopen(dir: &Path, n: u64, len: u64) -> std::io::Result<ActiveSegment> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(segment_path(dir, n))?;
        Ok(ActiveSegment {
            number: n,
            file,
            len,
        })
    }

    /// Appends bytes at the end (not yet durable).
    pub fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(bytes, self.len)?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Makes appended bytes durable.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Cuts the file back to `len` (after a failed append).
    pub fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)?;
        self.len = len;
        Ok(())
    }
}

/// A record found by [`scan`].
pub struct Scanned<'a> {
    pub offset: u64,
    pub rec: Decoded<'a>,
}

/// Outcome of scanning one segment.
#[derive(Debug, Default, Clone)]
pub struct ScanReport {
    /// Length of the valid part (where appends continue).
    pub valid_len: u64,
    /// Bytes cut off after the valid part.
    pub cut_bytes: u64,
    /// Why the scan stopped early, if it did.
    pub stopped: Option<String>,
}

/// Reads segment `n`, calls `each` for every valid record, truncates anything
/// after the last valid record and reports what it did.
pub fn scan(dir: &Path, n: u64, mut each: impl FnMut(Scanned<'_>)) -> std::io::Result<ScanReport> {
    let path = segment_path(dir, n);
    let bytes = std::fs::read(&path)?;
    let mut report = ScanReport::default();
    let header_ok = bytes.len() >= SEGMENT_HEADER_LEN as usize
        && &bytes[..8] == SEGMENT_MAGIC
        && bytes[8..16] == n.to_le_bytes();
    let mut pos = if header_ok {
        SEGMENT_HEADER_LEN as usize
    } else {
        let head: Vec<String> = bytes.iter().take(16).map(|b| format!("{b:02x}")).collect();
        report.stopped = Some(format!(
            "bad or missing segment header (file of {} bytes starts with {})",
            bytes.len(),
            head.join("")
        ));
        0
    };
    if header_ok {
        while pos < bytes.len() {
            match record::decode(&bytes[pos..]) {
                Ok(rec) => {
                    let total = rec.total;
                    each(Scanned {
                        offset: pos as u64,
                        rec,
                    });
                    pos += total;
                }
                Err(e) => {
                    report.stopped = Some(describe(&e));
                    break;
                }
            }
        }
    }
    report.valid_len = pos as u64;
    report.cut_bytes = (bytes.len() - pos) as u64;
    if !header_ok {
        // Also an empty file (a crash between creating the segment and writing its
        // header): give it a fresh header so appends never start at offset 0.
        let f = OpenOptions::new().write(true).open(&path)?;
        f.set_len(0)?;
        let mut hdr = Vec::with_capacity(16);
        hdr.extend_from_slice(SEGMENT_MAGIC);
        hdr.extend_from_slice(&n.to_le_bytes());
        f.write_all_at(&hdr, 0)?;
        f.sync_all()?;
        report.valid_len = SEGMENT_HEADER_LEN;
    } else if report.cut_bytes > 0 {
        let f = OpenOptions::new().write(true).open(&path)?;
        f.set_len(pos as u64)?;
        f.sync_all()?;
    }
    Ok(report)
}

fn describe(e: &RecordError) -> String {
    e.to_string()
}

/// Reads and verifies the record at `offset` (length `len`) of segment `n`.
pub fn read_record(dir: &Path, n: u64, offset: u64, len: u32) -> Result<Vec<u8>, String> {
    let path = segment_path(dir, n);
    let f = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset)
        .map_err(|e| format!("{} at {offset}: {e}", path.display()))?;
    if buf.len() < RECORD_HEADER_LEN {
        return Err(format!("{} at {offset}: record too short", path.display()));
    }
    record::decode(&buf).map_err(|e| format!("{} at {offset}: {e}", path.display()))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{RecordHead, RecordKind};
    use pipecloud_core::{CountVector, WriterId};

    fn rec(seq: u64) -> Vec<u8> {
        let head = RecordHead {
            recv_ms: 1,
            writer: WriterId(0),
            generation: 1,
            seq,
            disk: "d".into(),
            offset: 0,
            kind: RecordKind::Data,
            len: 3,
            vector: CountVector::from_slice(&[seq]),
        };
        let mut out = Vec::new();
        record::encode(&head, b"abc", &mut out).unwrap();
        out
    }

    fn count(dir: &Path, n: u64) -> (usize, ScanReport) {
        let mut k = 0;
        let r = scan(dir, n, |_| k += 1).unwrap();
        (k, r)
    }

    #[test]
    fn empty_segment_gets_a_header_and_torn_tail_is_cut() {
        let d = tempfile::tempdir().unwrap();
        // A crash right after creating the file: empty, no header.
        std::fs::write(segment_path(d.path(), 3), b"").unwrap();
        let (k, r) = count(d.path(), 3);
        assert_eq!((k, r.valid_len, r.cut_bytes), (0, SEGMENT_HEADER_LEN, 0));
        let mut a = ActiveSegment::reopen(d.path(), 3, r.valid_len).unwrap();
        a.append(&rec(1)).unwrap();
        let mut torn = rec(2);
        torn.truncate(torn.len() - 1);
        a.append(&torn).unwrap();
        let (k, r) = count(d.path(), 3);
        assert_eq!(k, 1);
        assert_eq!(r.cut_bytes, torn.len() as u64);
        let (k, r2) = count(d.path(), 3);
        assert_eq!((k, r2.valid_len, r2.cut_bytes), (1, r.valid_len, 0));
        assert_eq!(list_segments(d.path()).unwrap(), vec![3]);
    }
}
