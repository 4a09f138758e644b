//! Base volume files: applying journaled writes to them and materialising images.
//!
//! This module is plain file I/O on inputs it is given; it knows nothing of groups,
//! metadata or segments. The store ([`crate::store`]) owns that bookkeeping and
//! calls in here:
//!
//! **Applying** ([`apply_writes`]) writes journaled writes into the base volumes
//! (`volumes/<disk>.img`) in the order given (each writer's writes in seq order:
//! every disk belongs to exactly one writer, so two writes to the same block are
//! always applied in their writer's seq order and never reordered), then fsyncs
//! every volume. Re-applying the same list is idempotent, which is what lets the
//! store finish an interrupted apply on restart.
//!
//! **Materialising** ([`write_images`]) writes raw images `<disk>.img` (sized as
//! registered) into an output directory: copy of the base volume (sparse: holes
//! stay holes) plus the journaled writes given. Each image is fsync'ed, then
//! `cut.toml` (group, cut, time) is written last as the completion marker.

use crate::index::Entry;
use crate::journal;
use crate::meta::DiskMeta;
use crate::record::{self, RecordKind};
use pipecloud_core::synctarget::TargetVolume;
use pipecloud_core::{CountVector, Seq, WriterId, MAX_WRITERS};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CHUNK: usize = 1 << 20;

/// Applies one journaled write to its disk file.
fn apply_one(
    jdir: &Path,
    disks: &[DiskMeta],
    files: &[File],
    w: WriterId,
    seq: Seq,
    e: &Entry,
) -> Result<u64, String> {
    let disk = disks
        .get(e.disk as usize)
        .ok_or_else(|| format!("{w} seq {seq}: unknown disk index {}", e.disk))?;
    let f = files
        .get(e.disk as usize)
        .ok_or_else(|| format!("{w} seq {seq}: no file for disk {}", disk.name))?;
    let end = e.offset.saturating_add(e.len);
    if end > disk.size {
        return Err(format!(
            "{w} seq {seq}: write {}+{} beyond disk {} of {} bytes",
            e.offset, e.len, disk.name, disk.size
        ));
    }
    match e.kind {
        RecordKind::Data => {
            let buf = journal::read_record(jdir, e.loc.segment, e.loc.offset, e.loc.len)?;
            let rec = record::decode(&buf).map_err(|x| x.to_string())?;
            if rec.head.writer != w || rec.head.seq != seq || rec.head.disk != disk.name {
                return Err(format!("{w} seq {seq}: index points at a different record"));
            }
            f.write_all_at(rec.payload, e.offset)
                .map_err(|x| format!("{}: {x}", disk.name))?;
        }
        RecordKind::Zeroes | RecordKind::Trim => {
            zero_range(f, e.offset, e.len).map_err(|x| format!("{}: {x}", disk.name))?
        }
    }
    Ok(e.len)
}

/// Zeroes a byte range: punch a hole, or write zeroes where that is unsupported.
fn zero_range(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on an owned, open descriptor; arguments are plain integers.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        f.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

fn open_rw(p: &Path) -> Result<File, String> {
    File::options()
        .read(true)
        .write(true)
        .open(p)
        .map_err(|e| format!("{}: {e}", p.display()))
}

/// Whether a resync is writing any of `volumes` (`backup-server resync-fetch`
/// holds an exclusive `flock` on its image), as the order rule sees it
/// (`pipecloud_core::synctarget`, docs/design.md §15). When none is, the
/// returned files hold a shared `flock` on each volume, so no resync can
/// start while the caller applies or materialises; keep them until done.
pub fn resync_state(volumes: &[PathBuf]) -> Result<(TargetVolume, Vec<File>), String> {
    use std::os::fd::AsRawFd as _;
    let mut held = Vec::new();
    for p in volumes {
        let f = match File::open(p) {
            Ok(f) => f,
            // Not created yet: no resync can be writing it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("{}: {e}", p.display())),
        };
        // SAFETY: flock(2) on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Ok((TargetVolume::Resyncing, Vec::new()));
            }
            return Err(format!("flock {}: {e}", p.display()));
        }
        held.push(f);
    }
    Ok((TargetVolume::Settled, held))
}

/// What the resync marker next to a base volume (`<disk>.img.resync`) says.
/// `resync-fetch` writes `Writing` before it writes a block of a backup
/// server's base volume and `Done` after its final fsync, both durably and
/// while it holds the exclusive `flock`; the store turns a `Done` into the
/// group's resync floor and removes it (docs/design.md §15). A `Writing`
/// found without the lock is a resync that died half-way: the volume is
/// consistent at no cut until a resync completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResyncMark {
    Writing,
    Done,
}

impl ResyncMark {
    fn text(self) -> &'static str {
        match self {
            ResyncMark::Writing => "writing\n",
            ResyncMark::Done => "done\n",
        }
    }
}

/// `<volume>.resync`.
pub fn resync_marker(volume: &Path) -> PathBuf {
    let mut name = volume.as_os_str().to_owned();
    name.push(".resync");
    PathBuf::from(name)
}

/// Whether `image` is a backup server's base volume
/// (`<group dir>/volumes/<disk>.img` with `<group dir>/group.meta`).
pub fn is_base_volume(image: &Path) -> bool {
    let Some(dir) = image.parent() else {
        return false;
    };
    dir.file_name().is_some_and(|n| n == "volumes")
        && dir.parent().is_some_and(|g| g.join("group.meta").exists())
}

/// Records `mark` durably next to `volume` (temp file, fsync, rename, fsync
/// of the directory).
pub fn write_resync_mark(volume: &Path, mark: ResyncMark) -> Result<(), String> {
    let path = resync_marker(volume);
    let tmp = path.with_extension("resync.tmp");
    let ctx = |e: std::io::Error| format!("{}: {e}", path.display());
    {
        let mut f = File::create(&tmp).map_err(ctx)?;
        f.write_all(mark.text().as_bytes()).map_err(ctx)?;
        f.sync_all().map_err(ctx)?;
    }
    std::fs::rename(&tmp, &path).map_err(ctx)?;
    if let Some(dir) = path.parent() {
        crate::meta::sync_dir(dir).map_err(ctx)?;
    }
    Ok(())
}

/// The markers next to `volumes`: each volume's, if it has one.
pub fn resync_marks(volumes: &[PathBuf]) -> Result<Vec<(PathBuf, ResyncMark)>, String> {
    let mut out = Vec::new();
    for v in volumes {
        let path = resync_marker(v);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let mark = match text.as_str() {
            "writing\n" => ResyncMark::Writing,
            "done\n" => ResyncMark::Done,
            _ => return Err(format!("{}: not a resync marker: {text:?}", path.display())),
        };
        out.push((path, mark));
    }
    Ok(out)
}

/// One journaled write to apply: its writer, seq and index entry.
pub type Work = (WriterId, Seq, Entry);

/// Applies `work` (in order) to the base volumes `volumes` (one path per disk of
/// `disks`, same order), reading payloads from the journal in `jdir`, then fsyncs
/// every volume. Returns the bytes applied.
pub fn apply_writes(
    jdir: &Path,
    disks: &[DiskMeta],
    volumes: &[PathBuf],
    work: &[Work],
) -> Result<u64, String> {
    let files = volumes
        .iter()
        .map(|p| open_rw(p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut bytes = 0;
    for (w, s, e) in work {
        bytes += apply_one(jdir, disks, &files, *w, *s, e)?;
    }
    for (f, d) in files.iter().zip(disks) {
        f.sync_all().map_err(|e| format!("{}: {e}", d.name))?;
    }
    Ok(bytes)
}

/// What a materialisation produced.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Materialised {
    pub group: String,
    /// The cut the images are at.
    pub cut: CountVector,
    /// Newest receive time (unix ms) of a write inside the cut.
    pub cut_time_ms: u64,
    pub images: Vec<PathBuf>,
    /// Journaled writes applied on top of the base volumes.
    pub writes_applied: u64,
    pub elapsed: Duration,
    /// A checkpoint group's failover: the epoch and the RAM / device-state files.
    pub checkpoint: Option<Box<crate::checkpoint::CkptOutput>>,
}

/// Makes sure `out` exists and is empty (created if missing).
pub fn prepare_out(out: &Path) -> Result<(), String> {
    match std::fs::read_dir(out) {
        Ok(mut it) => {
            if it.next().is_some() {
                return Err(format!(
                    "output directory {} is not empty; refusing to overwrite",
                    out.display()
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))
        }
        Err(e) => Err(format!("{}: {e}", out.display())),
    }
}

/// Copies `src` to `dst` (created), skipping holes and all-zero chunks, sized `size`.
pub(crate) fn copy_sparse(
    src: &Path,
    dst: &Path,
    size: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<File, String> {
    let ctx = |e: std::io::Error| format!("{} -> {}: {e}", src.display(), dst.display());
    let s = File::open(src).map_err(ctx)?;
    let d = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(ctx)?;
    d.set_len(size).map_err(ctx)?;
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on an owned descriptor.
        let data = unsafe { libc::lseek(s.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data after pos.
            progress(size - pos);
            break;
        }
        let data = data as u64;
        if data > pos {
            progress(data.min(size) - pos);
            pos = data;
            continue;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(s.as_raw_fd(), pos as libc::off_t, libc::SEEK_HOLE) };
        let end = if hole < 0 {
            size
        } else {
            (hole as u64).min(size)
        };
        while pos < end {
            let n = ((end - pos) as usize).min(CHUNK);
            let chunk = &mut buf[..n];
            s.read_exact_at(chunk, pos).map_err(ctx)?;
            if chunk.iter().any(|b| *b != 0) {
                d.write_all_at(chunk, pos).map_err(ctx)?;
            }
            pos += n as u64;
            progress(n as u64);
        }
    }
    Ok(d)
}

/// What images are made of: the group's disks, their base volumes, the journal
/// and the journaled writes to put on top, and the cut they reach.
pub struct ImageSource<'a> {
    pub group: &'a str,
    pub disks: &'a [DiskMeta],
    /// Base volume per disk (same order as `disks`).
    pub volumes: &'a [PathBuf],
    pub jdir: &'a Path,
    pub work: &'a [Work],
    pub cut: CountVector,
    /// Newest receive time (unix ms) of a write inside the cut.
    pub cut_time_ms: u64,
}

/// Writes an image of every disk of `src` into `out` (prepared by [`prepare_out`]).
/// `progress(done, total)` is called as bytes are processed.
pub fn write_images(
    src: &ImageSource<'_>,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
    start: Instant,
) -> Result<Materialised, String> {
    let (work, disks, cut, cut_time) = (src.work, src.disks, src.cut, src.cut_time_ms);
    let total: u64 =
        disks.iter().map(|d| d.size).sum::<u64>() + work.iter().map(|(_, _, e)| e.len).sum::<u64>();
    let mut done = 0u64;
    let mut files = Vec::new();
    let mut images = Vec::new();
    for (d, vol) in disks.iter().zip(src.volumes) {
        let dst = out.join(format!("{}.img", d.name));
        let f = copy_sparse(vol, &dst, d.size, &mut |n| {
            done += n;
            progress(done, total);
        })?;
        files.push(f);
        images.push(dst);
    }
    for (w, s, e) in work {
        done += apply_one(src.jdir, disks, &files, *w, *s, e)?;
        progress(done, total);
    }
    for (f, p) in files.iter().zip(&images) {
        f.sync_all().map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let marker = out.join("cut.toml");
    let entries: Vec<String> = (0..MAX_WRITERS).map(|i| cut.get(i).to_string()).collect();
    let text = format!(
        "# Written by backup-server after every image was fsync'ed.\ngroup = \"{}\"\ncut = [{}]\ncut_time_ms = {}\nwrites_applied = {}\n",
        src.group,
        entries.join(", "),
        cut_time,
        work.len()
    );
    let mut f = File::create(&marker).map_err(|e| format!("{}: {e}", marker.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{}: {e}", marker.display()))?;
    crate::meta::sync_dir(out).map_err(|e| format!("{}: {e}", out.display()))?;
    progress(total, total);
    Ok(Materialised {
        group: src.group.to_owned(),
        cut,
        cut_time_ms: cut_time,
        images,
        writes_applied: work.len() as u64,
        elapsed: start.elapsed(),
        checkpoint: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flock(f: &File, op: i32) -> bool {
        // SAFETY: flock(2) on a descriptor we own.
        unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) == 0 }
    }

    /// The order rule's driver: a resync's exclusive lock (what
    /// `resync-fetch` takes) makes the volume `Resyncing`; a settled volume's
    /// shared locks keep a resync from starting until they are dropped.
    #[test]
    fn a_resync_lock_defers_and_a_settled_hold_keeps_resyncs_out() {
        let dir =
            std::env::temp_dir().join(format!("pipecloud-test-synctarget-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("d.img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let paths = vec![p.clone(), dir.join("absent.img")];
        let resync = File::options().read(true).write(true).open(&p).unwrap();
        assert!(flock(&resync, libc::LOCK_EX));
        let (s, held) = resync_state(&paths).unwrap();
        assert_eq!(s, TargetVolume::Resyncing);
        assert!(held.is_empty());
        assert!(flock(&resync, libc::LOCK_UN));
        drop(resync);
        let (s, held) = resync_state(&paths).unwrap();
        assert_eq!(s, TargetVolume::Settled);
        assert_eq!(held.len(), 1);
        let late = File::options().read(true).write(true).open(&p).unwrap();
        assert!(
            !flock(&late, libc::LOCK_EX),
            "a resync started during an apply"
        );
        drop(held);
        assert!(flock(&late, libc::LOCK_EX));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
