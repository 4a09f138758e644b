//! Durable per-group metadata (`groups/<group>/group.meta`).
//!
//! Holds what the journal alone cannot say: the registered disks (a disk name
//! keeps its size and writer forever), each writer's generation history, the cut
//! the base volumes are at (`applied`), an apply in progress (`applying`), and
//! whether the group is fenced (failed over: no more ingest), and the earliest
//! cut the base volumes are consistent at after a failback resync wrote them
//! (`resync_floor`, docs/design.md §15).
//!
//! Format: `b"PCMETA01"`, crc32c (u32 LE) of the body, body = postcard of
//! [`GroupMeta`] followed by postcard of [`MetaExt`] (fields added later:
//! absent in older files, which read as its default; older binaries ignore
//! it). Written atomically: temp file, fsync, rename, fsync directory.

use pipecloud_core::wire::Generation;
use pipecloud_core::{CountVector, Seq, WriterId};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

const MAGIC: &[u8; 8] = b"PCMETA01";

/// A registered disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskMeta {
    pub name: String,
    pub size: u64,
    pub writer: WriterId,
}

/// A writer's generations, oldest first: `(generation, base)` where `base` is the
/// seq the generation started after. A record of generation `g_k` with seq `s` is
/// valid iff `g_k` is the newest generation or `s <= base(g_{k+1})`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterMeta {
    pub writer: WriterId,
    pub generations: Vec<(Generation, Seq)>,
}

impl WriterMeta {
    /// The newest generation.
    pub fn current(&self) -> Option<Generation> {
        self.generations.last().map(|g| g.0)
    }

    /// Whether a journaled record `(generation, seq)` still counts.
    pub fn record_valid(&self, generation: Generation, seq: Seq) -> bool {
        let Some(k) = self.generations.iter().position(|g| g.0 == generation) else {
            return false;
        };
        match self.generations.get(k + 1) {
            None => true,
            Some(next) => seq <= next.1,
        }
    }
}

/// Everything durable about a group besides its journal and volumes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMeta {
    /// Numeric group id from the first hello (must stay the same).
    pub group_id: Option<u16>,
    pub disks: Vec<DiskMeta>,
    pub writers: Vec<WriterMeta>,
    /// The base volumes hold exactly this (causally closed) cut.
    pub applied: CountVector,
    /// Newest receive time (unix ms) of any write inside `applied`.
    pub applied_time_ms: u64,
    /// Prefix-max dependency vector of each writer at its `applied` seq.
    pub applied_deps: Vec<CountVector>,
    /// An apply to this cut was started and may be partly in the volumes.
    pub applying: Option<CountVector>,
    /// Failed over: ingest refused until `unfence`.
    pub fenced: bool,
    /// After a failback resync wrote the base volumes: no image at a cut
    /// below this (stored in [`MetaExt`]).
    #[serde(skip)]
    pub resync_floor: Option<ResyncFloor>,
}

/// The journal position when a failback resync into the base volumes ended
/// (docs/design.md §15): the volumes then mix the source's instants and are
/// consistent only at cuts that dominate `cut`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncFloor {
    /// The largest causally closed cut journaled when the end was seen.
    pub cut: CountVector,
    /// Newest receive time (unix ms) of a write inside `cut`: the earliest
    /// restorable instant.
    pub time_ms: u64,
}

/// Metadata fields stored after [`GroupMeta`]'s body (see the format).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaExt {
    pub resync_floor: Option<ResyncFloor>,
}

impl GroupMeta {
    /// The writer's metadata, if registered.
    pub fn writer(&self, w: WriterId) -> Option<&WriterMeta> {
        self.writers.iter().find(|m| m.writer == w)
    }

    /// Index of a disk by name.
    pub fn disk_index(&self, name: &str) -> Option<usize> {
        self.disks.iter().position(|d| d.name == name)
    }
}

/// Errors reading the metadata file.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: corrupt group metadata: {message}")]
    Corrupt { path: String, message: String },
}

/// Loads the metadata; `Ok(None)` if the file does not exist.
pub fn load(path: &Path) -> Result<Option<GroupMeta>, MetaError> {
    let p = path.display().to_string();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(MetaError::Io { path: p, source }),
    };
    let corrupt = |message: String| MetaError::Corrupt {
        path: path.display().to_string(),
        message,
    };
    if bytes.len() < 12 || &bytes[..8] != MAGIC {
        return Err(corrupt("bad magic".into()));
    }
    let crc = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let body = &bytes[12..];
    if crc32c::crc32c(body) != crc {
        return Err(corrupt("checksum mismatch".into()));
    }
    let (mut meta, rest): (GroupMeta, _) =
        postcard::take_from_bytes(body).map_err(|e| corrupt(e.to_string()))?;
    if !rest.is_empty() {
        let ext: MetaExt = postcard::from_bytes(rest).map_err(|e| corrupt(e.to_string()))?;
        meta.resync_floor = ext.resync_floor;
    }
    Ok(Some(meta))
}

/// Writes the metadata atomically and durably.
pub fn store(path: &Path, meta: &GroupMeta) -> std::io::Result<()> {
    let mut body = postcard::to_stdvec(meta).map_err(std::io::Error::other)?;
    let ext = MetaExt {
        resync_floor: meta.resync_floor.clone(),
    };
    body.extend(postcard::to_stdvec(&ext).map_err(std::io::Error::other)?);
    let mut bytes = Vec::with_capacity(body.len() + 12);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    bytes.extend_from_slice(&body);
    let tmp = path.with_extension("meta.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// fsyncs a directory (makes created / renamed / removed entries durable).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_validity() {
        let w = WriterMeta {
            writer: WriterId(0),
            generations: vec![(1, 0), (5, 10), (9, 20)],
        };
        assert!(w.record_valid(1, 10));
        assert!(!w.record_valid(1, 11));
        assert!(w.record_valid(5, 20));
        assert!(!w.record_valid(5, 21));
        assert!(w.record_valid(9, 1000));
        assert!(!w.record_valid(7, 1));
    }

    #[test]
    fn store_load_roundtrip_and_corruption() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("group.meta");
        assert!(load(&p).unwrap().is_none());
        let m = GroupMeta {
            group_id: Some(3),
            fenced: true,
            resync_floor: Some(ResyncFloor {
                cut: CountVector::from_slice(&[7, 2]),
                time_ms: 1234,
            }),
            ..Default::default()
        };
        store(&p, &m).unwrap();
        assert_eq!(load(&p).unwrap(), Some(m.clone()));
        // A file written before the extension (no bytes after the body).
        let old = GroupMeta {
            resync_floor: None,
            ..m
        };
        let body = postcard::to_stdvec(&old).unwrap();
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        std::fs::write(&p, bytes).unwrap();
        assert_eq!(load(&p).unwrap(), Some(old.clone()));
        store(&p, &old).unwrap();
        let mut b = std::fs::read(&p).unwrap();
        let last = b.len() - 1;
        b[last] ^= 1;
        std::fs::write(&p, b).unwrap();
        assert!(matches!(load(&p), Err(MetaError::Corrupt { .. })));
    }
}
