//! Causal applier and materialisation of volumes.
//!
//! **Applying** ([`apply_to`]) moves the base volumes (`volumes/<disk>.img`) from
//! the applied cut to a larger causally closed cut: the journaled writes of each
//! writer are applied in seq order (every disk belongs to exactly one writer, so
//! two writes to the same block are always applied in their writer's seq order and
//! never reordered). The target is recorded in the metadata *before* the volumes are
//! touched (`applying`) and the new applied cut only after they are fsync'ed; a
//! crash in between is finished on restart (re-applying is idempotent because the
//! order is the same). Then segments that hold nothing beyond the applied cut are
//! deleted.
//!
//! **Materialising** ([`materialise`]) writes raw images `<disk>.img` (sized as
//! registered) of every disk of a group at exactly a given closed cut into an
//! output directory: copy of the base volume (sparse: holes stay holes) plus the
//! journaled writes between the applied cut and the cut. Each image is fsync'ed, then
//! `cut.toml` (group, cut, time) is written last as the completion marker.

use crate::index::Entry;
use crate::journal;
use crate::meta::DiskMeta;
use crate::record::{self, RecordKind};
use crate::store::{lock, Group};
use pipecloud_core::{CountVector, Seq, WriterId, MAX_WRITERS};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{info, warn};

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

/// Moves the group's base volumes to `target` (a closed cut >= the applied cut),
/// then trims the index and deletes segments that are no longer needed.
pub fn apply_to(group: &Group, target: CountVector) -> Result<(), String> {
    let _v = lock(&group.volumes);
    let (work, disks) = {
        let mut st = lock(&group.state);
        if !target.dominates(&st.meta.applied) {
            return Err(format!(
                "apply target {target} is below the applied cut {}",
                st.meta.applied
            ));
        }
        st.check_cut(&target)?;
        if target == st.meta.applied && st.meta.applying.is_none() {
            return Ok(());
        }
        st.meta.applying = Some(target);
        group.persist_meta(&st).map_err(|e| e.to_string())?;
        (st.work_to(&target), st.meta.disks.clone())
    };
    let files = disks
        .iter()
        .map(|d| open_rw(&group.volume_path(&d.name)))
        .collect::<Result<Vec<_>, _>>()?;
    let jdir = group.journal_dir();
    let mut bytes = 0;
    for (w, s, e) in &work {
        bytes += apply_one(&jdir, &disks, &files, *w, *s, e)?;
    }
    for (f, d) in files.iter().zip(&disks) {
        f.sync_all().map_err(|e| format!("{}: {e}", d.name))?;
    }
    let mut doomed = Vec::new();
    {
        let mut st = lock(&group.state);
        let mut deps = vec![CountVector::ZERO; MAX_WRITERS];
        let mut t = st.meta.applied_time_ms;
        for (w, ix) in &st.writers {
            let s = target.get(w.index());
            if let Some(d) = deps.get_mut(w.index()) {
                *d = ix.deps(s);
            }
            t = t.max(ix.time(s));
        }
        st.meta.applied = target;
        st.meta.applied_deps = deps;
        st.meta.applied_time_ms = t;
        st.meta.applying = None;
        group.persist_meta(&st).map_err(|e| e.to_string())?;
        for (w, ix) in st.writers.iter_mut() {
            ix.trim_to(target.get(w.index()));
        }
        let active = st.active_segment;
        let keep: Vec<u64> = st
            .segments
            .iter()
            .filter(|(n, info)| {
                Some(**n) == active
                    || info
                        .max_seq
                        .iter()
                        .enumerate()
                        .any(|(i, m)| *m > target.get(i))
            })
            .map(|(n, _)| *n)
            .collect();
        let all: Vec<u64> = st.segments.keys().copied().collect();
        for n in all {
            if !keep.contains(&n) {
                if let Some(info) = st.segments.remove(&n) {
                    group.journal_bytes.fetch_sub(info.bytes, Ordering::Relaxed);
                    doomed.push(n);
                }
            }
        }
    }
    for n in &doomed {
        let p = journal::segment_path(&jdir, *n);
        if let Err(e) = std::fs::remove_file(&p) {
            warn!(path = %p.display(), error = %e, "cannot delete applied journal segment");
        }
    }
    if !doomed.is_empty() {
        crate::meta::sync_dir(&jdir).map_err(|e| format!("{}: {e}", jdir.display()))?;
    }
    if !work.is_empty() || !doomed.is_empty() {
        info!(group = %group.name, cut = %target, writes = work.len(), bytes, segments_deleted = doomed.len(), "applied to base volumes");
    }
    Ok(())
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
}

fn prepare_out(out: &Path) -> Result<(), String> {
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
fn copy_sparse(
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

/// Writes images of every disk of `group` at exactly `cut` into `out` (which must
/// not exist or be empty). `progress(done, total)` is called as bytes are processed.
pub fn materialise(
    group: &Group,
    cut: CountVector,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Materialised, String> {
    let start = Instant::now();
    prepare_out(out)?;
    let _v = lock(&group.volumes);
    let (work, disks, cut_time) = {
        let st = lock(&group.state);
        st.check_cut(&cut)?;
        let mut t = st.meta.applied_time_ms;
        for (w, ix) in &st.writers {
            t = t.max(ix.time(cut.get(w.index())));
        }
        (st.work_to(&cut), st.meta.disks.clone(), t)
    };
    let total: u64 =
        disks.iter().map(|d| d.size).sum::<u64>() + work.iter().map(|(_, _, e)| e.len).sum::<u64>();
    let mut done = 0u64;
    let mut files = Vec::new();
    let mut images = Vec::new();
    for d in &disks {
        let dst = out.join(format!("{}.img", d.name));
        let f = copy_sparse(&group.volume_path(&d.name), &dst, d.size, &mut |n| {
            done += n;
            progress(done, total);
        })?;
        files.push(f);
        images.push(dst);
    }
    let jdir = group.journal_dir();
    for (w, s, e) in &work {
        done += apply_one(&jdir, &disks, &files, *w, *s, e)?;
        progress(done, total);
    }
    for (f, p) in files.iter().zip(&images) {
        f.sync_all().map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let marker = out.join("cut.toml");
    let entries: Vec<String> = (0..MAX_WRITERS).map(|i| cut.get(i).to_string()).collect();
    let text = format!(
        "# Written by backup-server after every image was fsync'ed.\ngroup = \"{}\"\ncut = [{}]\ncut_time_ms = {}\nwrites_applied = {}\n",
        group.name,
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
        group: group.name.clone(),
        cut,
        cut_time_ms: cut_time,
        images,
        writes_applied: work.len() as u64,
        elapsed: start.elapsed(),
    })
}
