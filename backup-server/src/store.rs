//! The data directory: groups, their journals, indexes, metadata and base volumes.
//!
//! ```text
//! <data_dir>/lock                       flock: one server (or offline CLI) at a time
//! <data_dir>/control.sock               control socket of a running server (0600)
//! <data_dir>/groups/<group>/group.meta  see crate::meta
//! <data_dir>/groups/<group>/journal/    segments, see crate::journal
//! <data_dir>/groups/<group>/volumes/<disk>.img   base volumes (at meta.applied)
//! ```
//!
//! Every path component that came from the wire (group and disk names) passed
//! `pipecloud_core::codec::validate_name` first.
//!
//! The store is the one owner of a group's bookkeeping: metadata transitions
//! (registration, fence, `applying` -> `applied`) and segment accounting (which
//! segment is active, how many bytes each holds, which seqs it holds, when it is
//! deleted) happen in this file only. The ingest thread and the applier call the
//! methods here; the base volume files themselves are written by [`crate::volume`].
//!
//! Lock order: `Group::volumes` before `Group::state`; `Group::tail` is only taken
//! by the ingest thread (and never while holding `state`).

use crate::causal::{largest_closed_cut, WriterHistory};
use crate::config::Limits;
use crate::index::{Capped, Entry, Insert, Loc, NoHistory, WriterIndex};
use crate::journal::{self, ActiveSegment};
use crate::meta::{self, DiskMeta, GroupMeta, WriterMeta};
use crate::volume::{self, ImageSource, Materialised};
use pipecloud_core::codec::validate_name;
use pipecloud_core::synctarget::{journal_apply, may_materialise, Apply};
use pipecloud_core::wire::{Generation, Hello, Welcome, WriterState};
use pipecloud_core::{CountVector, Seq, WriterId, MAX_WRITERS};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;
use tracing::{error, info, warn};

/// Locks a mutex, ignoring poisoning (the guarded data stays consistent because
/// every mutation is completed before anything that can panic).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What connections of a group watch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Signal {
    /// The group's committed vector (durable prefixes).
    pub committed: CountVector,
    /// Failed over: connections are closed, hellos refused.
    pub fenced: bool,
    /// The journal failed: connections are closed, hellos refused until restart.
    pub failed: bool,
}

/// Accounting of one segment.
#[derive(Clone, Debug, Default)]
pub struct SegInfo {
    pub bytes: u64,
    /// Highest seq per writer of the records indexed from this segment.
    pub max_seq: [Seq; MAX_WRITERS],
}

/// Mutable state of a group.
#[derive(Debug)]
pub struct GroupState {
    pub meta: GroupMeta,
    pub writers: BTreeMap<WriterId, WriterIndex>,
    pub segments: BTreeMap<u64, SegInfo>,
    /// Segment currently appended to (never deleted).
    pub active_segment: Option<u64>,
    /// Element-wise max of every indexed write's vector (what journaled writes need).
    pub demand: CountVector,
    /// Connected agents: connection id -> agent name.
    pub agents: BTreeMap<u64, String>,
    /// Journal I/O failure (ingest stopped until restart).
    pub failed: Option<String>,
}

/// The ingest thread's append position.
#[derive(Debug, Default)]
pub struct JournalTail {
    pub active: Option<ActiveSegment>,
    pub next_number: u64,
}

/// One protection group.
#[derive(Debug)]
pub struct Group {
    pub name: String,
    pub dir: PathBuf,
    pub state: Mutex<GroupState>,
    /// Held while base volumes are applied to or copied, and while segments are deleted.
    pub volumes: Mutex<()>,
    /// Append position (ingest thread only).
    pub tail: Mutex<JournalTail>,
    /// Journal bytes (mirrors the segment accounting, readable without the lock).
    pub journal_bytes: AtomicU64,
    /// Bytes of writes admitted past the journal bound check but not yet journaled.
    pub queued_bytes: AtomicU64,
    pub signal: watch::Sender<Signal>,
    /// Full-state (checkpoint) epochs of the group, see [`crate::checkpoint`].
    pub checkpoint: crate::checkpoint::GroupCkpt,
}

/// Store-level errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Io(String),
    #[error("data directory {0} is in use by another backup-server process (lock held)")]
    Locked(PathBuf),
    #[error("{0}")]
    Refused(String),
}

fn io(ctx: impl std::fmt::Display, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("{ctx}: {e}"))
}

impl Group {
    /// Journal directory.
    pub fn journal_dir(&self) -> PathBuf {
        self.dir.join("journal")
    }

    /// Base volume path of a disk (name validated at registration).
    pub fn volume_path(&self, disk: &str) -> PathBuf {
        self.dir.join("volumes").join(format!("{disk}.img"))
    }

    fn meta_path(&self) -> PathBuf {
        self.dir.join("group.meta")
    }

    /// Persists `st.meta` (caller holds the state lock).
    pub fn persist_meta(&self, st: &GroupState) -> Result<(), StoreError> {
        meta::store(&self.meta_path(), &st.meta).map_err(|e| io(self.meta_path().display(), e))
    }

    /// Publishes the committed vector / fence / failure to the group's connections.
    pub fn publish(&self, st: &GroupState) {
        let s = Signal {
            committed: st.committed(),
            fenced: st.meta.fenced,
            failed: st.failed.is_some(),
        };
        self.signal.send_if_modified(|cur| {
            if *cur != s {
                *cur = s;
                true
            } else {
                false
            }
        });
    }

    /// Registers the disks and writers of a hello (called by the ingest thread, so
    /// it is ordered with journal appends); returns the welcome.
    pub fn register(&self, hello: &Hello, version: u16) -> Result<Welcome, StoreError> {
        let mut st = lock(&self.state);
        if st.meta.fenced {
            return Err(StoreError::Refused(format!(
                "group {} is fenced (failed over); ingest refused until `backup-server unfence`",
                self.name
            )));
        }
        if let Some(f) = &st.failed {
            return Err(StoreError::Refused(format!(
                "group {} journal failed ({f}); restart the server",
                self.name
            )));
        }
        let mut changed = false;
        match st.meta.group_id {
            Some(id) if id != hello.group_id => {
                return Err(StoreError::Refused(format!(
                    "group {} has id {id}, hello says {}",
                    self.name, hello.group_id
                )))
            }
            Some(_) => {}
            None => {
                st.meta.group_id = Some(hello.group_id);
                changed = true;
            }
        }
        // Writers and generations announced (one generation per writer).
        let mut gens: BTreeMap<WriterId, Generation> = BTreeMap::new();
        for d in &hello.disks {
            validate_name(&d.name).map_err(|e| StoreError::Refused(e.to_string()))?;
            if let Some(g) = gens.insert(d.writer, d.generation) {
                if g != d.generation {
                    return Err(StoreError::Refused(format!(
                        "hello gives {} two generations ({g} and {})",
                        d.writer, d.generation
                    )));
                }
            }
            if let Some(i) = st.meta.disk_index(&d.name) {
                let m = &st.meta.disks[i];
                if m.size != d.size || m.writer != d.writer {
                    return Err(StoreError::Refused(format!(
                        "disk {} is registered with size {} and {}; hello says size {} and {}",
                        d.name, m.size, m.writer, d.size, d.writer
                    )));
                }
            }
        }
        for (w, g) in &gens {
            if let Some(cur) = st.meta.writer(*w).and_then(WriterMeta::current) {
                if *g < cur {
                    return Err(StoreError::Refused(format!(
                        "{w}: generation {g} is older than the registered generation {cur}"
                    )));
                }
            }
        }
        // All checks passed: create new disks, then new generations.
        for d in &hello.disks {
            if st.meta.disk_index(&d.name).is_none() {
                let p = self.volume_path(&d.name);
                let f = File::options()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&p)
                    .map_err(|e| io(p.display(), e))?;
                f.set_len(d.size).map_err(|e| io(p.display(), e))?;
                f.sync_all().map_err(|e| io(p.display(), e))?;
                meta::sync_dir(&self.dir.join("volumes")).map_err(|e| io(p.display(), e))?;
                st.meta.disks.push(DiskMeta {
                    name: d.name.clone(),
                    size: d.size,
                    writer: d.writer,
                });
                info!(group = %self.name, disk = %d.name, size = d.size, writer = %d.writer, "registered new disk");
                changed = true;
            }
        }
        for (w, g) in gens {
            let cur = st.meta.writer(w).and_then(WriterMeta::current);
            match cur {
                Some(c) if c == g => {}
                Some(c) => {
                    let base = st.writers.get(&w).map_or(0, WriterIndex::durable);
                    let dropped = st.writers.get_mut(&w).map_or(0, |ix| ix.new_generation(g));
                    if let Some(m) = st.meta.writers.iter_mut().find(|m| m.writer == w) {
                        m.generations.push((g, base));
                    }
                    info!(group = %self.name, writer = %w, old = c, new = g, base, dropped_beyond_hole = dropped,
                        "writer restarted with a new generation");
                    changed = true;
                }
                None => {
                    st.meta.writers.push(WriterMeta {
                        writer: w,
                        generations: vec![(g, 0)],
                    });
                    let (deps, t) = applied_base(&st.meta, w);
                    let base = st.meta.applied.get(w.index());
                    st.writers.insert(w, WriterIndex::new(g, base, deps, t));
                    changed = true;
                }
            }
        }
        if changed {
            self.persist_meta(&st)?;
        }
        let welcome = Welcome {
            version,
            writers: st
                .writers
                .iter()
                .map(|(w, ix)| WriterState {
                    writer: *w,
                    generation: ix.generation,
                    durable: ix.durable(),
                })
                .collect(),
            committed: {
                // A checkpoint agent resumes its epoch numbering above this.
                let mut c = st.committed();
                c.set(pipecloud_core::EPOCH_ENTRY, self.checkpoint.acked());
                c
            },
        };
        self.publish(&st);
        Ok(welcome)
    }

    /// Fences the group (failover): persisted; connections close, hellos and writes are refused.
    pub fn fence(&self) -> Result<(), StoreError> {
        let mut st = lock(&self.state);
        if !st.meta.fenced {
            st.meta.fenced = true;
            self.persist_meta(&st)?;
            warn!(group = %self.name, "group fenced: ingest stopped for failover");
        }
        self.publish(&st);
        Ok(())
    }

    /// Lifts the fence.
    pub fn unfence(&self) -> Result<(), StoreError> {
        let mut st = lock(&self.state);
        if st.meta.fenced {
            st.meta.fenced = false;
            self.persist_meta(&st)?;
            warn!(group = %self.name, "group unfenced: ingest allowed again");
        }
        self.publish(&st);
        Ok(())
    }

    /// Moves the base volumes to `target` (a closed cut >= the applied cut): the
    /// metadata records `applying` before the volumes are touched and the new
    /// applied cut only after they are fsync'ed (a crash in between is finished on
    /// restart; re-applying is idempotent), then the index is trimmed and segments
    /// that hold nothing beyond the applied cut are deleted.
    ///
    /// A checkpoint group's volumes never go beyond its last acknowledged barrier
    /// (failover writes the disks at exactly that barrier): `target` is clipped to
    /// it, and nothing is applied if the clipped cut is not beyond the applied one.
    pub fn apply_to(&self, target: CountVector) -> Result<(), String> {
        let target = match self.checkpoint.disk_cap() {
            Some(cap) => {
                let clipped = CountVector::from_slice(
                    &(0..MAX_WRITERS)
                        .map(|i| target.get(i).min(cap.get(i)))
                        .collect::<Vec<_>>(),
                );
                if clipped != target && !clipped.dominates(&lock(&self.state).meta.applied) {
                    return Ok(());
                }
                clipped
            }
            None => target,
        };
        let _v = lock(&self.volumes);
        // A failback's resync writing the base volumes: the journal waits
        // (docs/design.md §15); the shared locks keep a resync out until done.
        let paths = self.volume_paths(&lock(&self.state).meta.disks.clone());
        let (state, _held) = volume::resync_state(&paths)?;
        if journal_apply(state) == Apply::Defer {
            return Ok(());
        }
        self.settle_resync(&paths)?;
        let (work, disks) = {
            let mut st = lock(&self.state);
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
            self.persist_meta(&st).map_err(|e| e.to_string())?;
            (st.work_to(&target), st.meta.disks.clone())
        };
        let jdir = self.journal_dir();
        let bytes = volume::apply_writes(&jdir, &disks, &self.volume_paths(&disks), &work)?;
        let doomed = {
            let mut st = lock(&self.state);
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
            self.persist_meta(&st).map_err(|e| e.to_string())?;
            for (w, ix) in st.writers.iter_mut() {
                ix.trim_to(target.get(w.index()));
            }
            self.forget_applied_segments(&mut st, &target)
        };
        for n in &doomed {
            let p = journal::segment_path(&jdir, *n);
            if let Err(e) = std::fs::remove_file(&p) {
                warn!(path = %p.display(), error = %e, "cannot delete applied journal segment");
            }
        }
        if !doomed.is_empty() {
            meta::sync_dir(&jdir).map_err(|e| format!("{}: {e}", jdir.display()))?;
        }
        if !work.is_empty() || !doomed.is_empty() {
            info!(group = %self.name, cut = %target, writes = work.len(), bytes, segments_deleted = doomed.len(), "applied to base volumes");
        }
        Ok(())
    }

    /// Writes images of every disk at exactly `cut` into `out` (which must not
    /// exist or be empty). `progress(done, total)` is called as bytes are processed.
    pub fn materialise(
        &self,
        cut: CountVector,
        out: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Materialised, String> {
        let start = std::time::Instant::now();
        volume::prepare_out(out)?;
        let _v = lock(&self.volumes);
        let paths = self.volume_paths(&lock(&self.state).meta.disks.clone());
        let (state, _held) = volume::resync_state(&paths)?;
        if !may_materialise(state) {
            return Err(format!(
                "group {}: a resync is writing its base volumes (docs/design.md §15): \
                 no image until it is done",
                self.name
            ));
        }
        if let Some(p) = self.settle_resync(&paths)? {
            return Err(format!(
                "group {}: a failback resync into its base volumes did not finish ({} says \
                 so): they are consistent at no cut until a resync completes (docs/design.md §15)",
                self.name,
                p.display()
            ));
        }
        let (work, disks, cut_time_ms) = {
            let st = lock(&self.state);
            st.check_cut(&cut)?;
            st.check_resync_floor(&cut)?;
            let mut t = st.meta.applied_time_ms;
            for (w, ix) in &st.writers {
                t = t.max(ix.time(cut.get(w.index())));
            }
            (st.work_to(&cut), st.meta.disks.clone(), t)
        };
        let src = ImageSource {
            group: &self.name,
            disks: &disks,
            volumes: &self.volume_paths(&disks),
            jdir: &self.journal_dir(),
            work: &work,
            cut,
            cut_time_ms,
        };
        volume::write_images(&src, out, progress, start)
    }

    /// Once a failback resync into the base volumes finished (its marker says
    /// `done`, its lock is gone; the caller holds the shared locks, so no
    /// other resync starts meanwhile): records the largest closed cut
    /// journaled now as the group's resync floor, durably, then removes the
    /// markers. The journal only grew since the resync's end (the applier
    /// deferred), so the floor is at or beyond the position at the end:
    /// refusing below it is safe. Returns the marker of a resync that died
    /// half-way (`writing` without the lock), if any.
    fn settle_resync(&self, volumes: &[PathBuf]) -> Result<Option<PathBuf>, String> {
        let marks = volume::resync_marks(volumes)?;
        if let Some((p, _)) = marks
            .iter()
            .find(|(_, m)| *m == volume::ResyncMark::Writing)
        {
            return Ok(Some(p.clone()));
        }
        if marks.is_empty() {
            return Ok(None);
        }
        {
            let mut st = lock(&self.state);
            let cut = st.durable_cut();
            let mut time_ms = st.meta.applied_time_ms;
            for (w, ix) in &st.writers {
                time_ms = time_ms.max(ix.time(cut.get(w.index())));
            }
            let mut floor = meta::ResyncFloor { cut, time_ms };
            if let Some(f) = &st.meta.resync_floor {
                floor.cut.merge(&f.cut);
                floor.time_ms = floor.time_ms.max(f.time_ms);
            }
            warn!(group = %self.name, floor = %floor.cut, time_ms = floor.time_ms,
                "a failback resync ended: no image below this cut");
            st.meta.resync_floor = Some(floor);
            self.persist_meta(&st).map_err(|e| e.to_string())?;
        }
        for (p, _) in &marks {
            std::fs::remove_file(p).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        if let Some(dir) = marks.first().and_then(|(p, _)| p.parent()) {
            meta::sync_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        Ok(None)
    }

    /// Whether a failback's resync is writing this group's base volumes now.
    pub fn resyncing(&self) -> bool {
        let paths = self.volume_paths(&lock(&self.state).meta.disks.clone());
        matches!(
            volume::resync_state(&paths),
            Ok((pipecloud_core::synctarget::TargetVolume::Resyncing, _))
        )
    }

    fn volume_paths(&self, disks: &[DiskMeta]) -> Vec<PathBuf> {
        disks.iter().map(|d| self.volume_path(&d.name)).collect()
    }

    /// Drops from the accounting every segment that is not the active one and
    /// holds no seq beyond `applied`; returns their numbers (to delete).
    fn forget_applied_segments(&self, st: &mut GroupState, applied: &CountVector) -> Vec<u64> {
        let active = st.active_segment;
        let doomed: Vec<u64> = st
            .segments
            .iter()
            .filter(|(n, info)| {
                Some(**n) != active
                    && info
                        .max_seq
                        .iter()
                        .enumerate()
                        .all(|(i, m)| *m <= applied.get(i))
            })
            .map(|(n, _)| *n)
            .collect();
        for n in &doomed {
            if let Some(info) = st.segments.remove(n) {
                self.journal_bytes.fetch_sub(info.bytes, Ordering::Relaxed);
            }
        }
        doomed
    }

    /// The journal failed (ingest I/O error): ingest for the group stops until
    /// restart; connections close and hellos are refused.
    pub fn journal_failed(&self, e: &str) {
        error!(group = %self.name, error = %e, "JOURNAL I/O FAILURE: nothing of this batch is acked; ingest for the group stops until restart");
        let mut st = lock(&self.state);
        st.failed = Some(e.to_string());
        self.publish(&st);
    }

    /// Ingest opened segment `n` (empty but for its header) and appends to it now.
    pub fn segment_opened(&self, n: u64) {
        let mut st = lock(&self.state);
        st.active_segment = Some(n);
        st.segments.entry(n).or_default().bytes = journal::SEGMENT_HEADER_LEN;
        self.journal_bytes
            .fetch_add(journal::SEGMENT_HEADER_LEN, Ordering::Relaxed);
    }

    /// Ingest is about to write `writer`'s `seq` into `segment`: claim the segment
    /// for it before the record is even written, so the applier (which deletes a
    /// closed segment only when every writer's highest seq in it is applied) never
    /// deletes one a batch is about to index.
    pub fn claim_segment(&self, segment: u64, writer: WriterId, seq: Seq) {
        let mut st = lock(&self.state);
        let info = st.segments.entry(segment).or_default();
        if let Some(m) = info.max_seq.get_mut(writer.index()) {
            *m = (*m).max(seq);
        }
    }

    /// Ingest made `writer`'s `seq` durable at `entry.loc`: account its bytes and
    /// index it (caller holds the state lock).
    pub fn journaled(
        &self,
        st: &mut GroupState,
        writer: WriterId,
        seq: Seq,
        entry: Entry,
    ) -> Insert {
        let loc = entry.loc;
        self.journal_bytes
            .fetch_add(u64::from(loc.len), Ordering::Relaxed);
        if let Some(info) = st.segments.get_mut(&loc.segment) {
            info.bytes = info.bytes.max(loc.offset + u64::from(loc.len));
        }
        st.index_record(writer, seq, entry)
    }
}

fn applied_base(meta: &GroupMeta, w: WriterId) -> (CountVector, u64) {
    let deps = meta
        .applied_deps
        .get(w.index())
        .copied()
        .unwrap_or(CountVector::ZERO);
    (deps, meta.applied_time_ms)
}

/// Oldest point a restore can reach: the applied cut and its time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Horizon {
    pub cut: CountVector,
    pub time_ms: u64,
}

impl GroupState {
    /// Committed vector: each writer's durable prefix.
    pub fn committed(&self) -> CountVector {
        let mut v = CountVector::ZERO;
        for (w, ix) in &self.writers {
            v.set(w.index(), ix.durable());
        }
        v
    }

    fn cut_with_caps(&self, caps: &[Seq; MAX_WRITERS]) -> CountVector {
        let capped: Vec<Option<Capped<'_>>> = (0..MAX_WRITERS)
            .map(|i| {
                self.writers.get(&WriterId(i as u8)).map(|index| Capped {
                    index,
                    cap: caps[i],
                })
            })
            .collect();
        let refs: Vec<&dyn WriterHistory> = capped
            .iter()
            .map(|c| match c {
                Some(c) => c as &dyn WriterHistory,
                None => &NoHistory as &dyn WriterHistory,
            })
            .collect();
        largest_closed_cut(&refs)
    }

    /// Largest causally closed cut of everything journaled.
    pub fn durable_cut(&self) -> CountVector {
        self.cut_with_caps(&[Seq::MAX; MAX_WRITERS])
    }

    /// Largest causally closed cut of the writes whose whole prefix was received at
    /// or before `t_ms` (never below the applied cut).
    pub fn cut_at_time(&self, t_ms: u64) -> CountVector {
        let mut caps = [0; MAX_WRITERS];
        for (w, ix) in &self.writers {
            caps[w.index()] = ix.prefix_at_time(t_ms);
        }
        self.cut_with_caps(&caps)
    }

    /// Whether an image at `cut` is consistent after a failback resync wrote
    /// the base volumes: `cut` must dominate the resync floor.
    pub fn check_resync_floor(&self, cut: &CountVector) -> Result<(), String> {
        match &self.meta.resync_floor {
            Some(f) if !cut.dominates(&f.cut) => Err(format!(
                "cut {cut} is before the end of a failback resync into the base volumes: they are \
                 consistent only at cut {} or later; the earliest restorable instant is {} \
                 (docs/design.md §15)",
                f.cut,
                crate::control::fmt_ms(f.time_ms)
            )),
            _ => Ok(()),
        }
    }

    /// Whether `cut` is causally closed, journaled and not below the applied cut.
    pub fn check_cut(&self, cut: &CountVector) -> Result<(), String> {
        for i in 0..MAX_WRITERS {
            let w = WriterId(i as u8);
            let s = cut.get(i);
            let (durable, base) = self
                .writers
                .get(&w)
                .map_or((0, 0), |ix| (ix.durable(), ix.base()));
            if s > durable {
                return Err(format!(
                    "{w}: seq {s} is beyond the journaled prefix {durable}"
                ));
            }
            if s < base {
                return Err(format!(
                    "{w}: seq {s} is before the oldest restorable point (seq {base}); it is outside the retention window"
                ));
            }
            if let Some(ix) = self.writers.get(&w) {
                let d = ix.deps(s);
                if let Some(j) = (0..MAX_WRITERS).find(|&j| d.get(j) > cut.get(j)) {
                    return Err(format!(
                        "cut {cut} is not causally closed: {w} up to seq {s} depends on w{j} seq {}",
                        d.get(j)
                    ));
                }
            }
        }
        for i in MAX_WRITERS..cut.as_slice().len() {
            if cut.get(i) != 0 {
                return Err(format!("cut entry {i} must be 0"));
            }
        }
        Ok(())
    }

    /// The oldest restorable point.
    pub fn horizon(&self) -> Horizon {
        Horizon {
            cut: self.meta.applied,
            time_ms: self.meta.applied_time_ms,
        }
    }

    /// Entries to apply on top of the applied cut to reach `cut`, per writer in seq order.
    pub fn work_to(&self, cut: &CountVector) -> Vec<(WriterId, Seq, Entry)> {
        let mut out = Vec::new();
        for (w, ix) in &self.writers {
            for (s, e) in ix.range(self.meta.applied.get(w.index()), cut.get(w.index())) {
                out.push((*w, s, e.clone()));
            }
        }
        out
    }

    /// Records a journaled write in the index and accounting (ingest and recovery).
    pub fn index_record(&mut self, w: WriterId, seq: Seq, entry: Entry) -> Insert {
        let Some(ix) = self.writers.get_mut(&w) else {
            return Insert::Duplicate;
        };
        let seg = entry.loc.segment;
        let vector = entry.vector;
        let r = ix.insert(seq, entry);
        if r == Insert::Added {
            let info = self.segments.entry(seg).or_default();
            if let Some(m) = info.max_seq.get_mut(w.index()) {
                *m = (*m).max(seq);
            }
            self.demand.merge(&vector);
        }
        r
    }
}

/// All groups of a data directory.
#[derive(Debug)]
pub struct Store {
    pub data_dir: PathBuf,
    pub limits: Limits,
    groups: Mutex<BTreeMap<String, Arc<Group>>>,
    _lock: File,
}

/// Summary of a recovery.
#[derive(Debug, Default, Clone)]
pub struct RecoveryReport {
    pub groups: usize,
    pub records: u64,
    pub torn_bytes: u64,
}

impl Store {
    /// Opens (creating if needed) a data directory, takes its lock and recovers every group.
    pub fn open(data_dir: &Path, limits: Limits) -> Result<(Store, RecoveryReport), StoreError> {
        std::fs::create_dir_all(data_dir.join("groups")).map_err(|e| io(data_dir.display(), e))?;
        let lock_path = data_dir.join("lock");
        let lock_file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| io(lock_path.display(), e))?;
        // SAFETY: flock on an owned, open descriptor.
        let rc = unsafe { libc::flock(lock_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(StoreError::Locked(data_dir.to_path_buf()));
        }
        let store = Store {
            data_dir: data_dir.to_path_buf(),
            limits,
            groups: Mutex::new(BTreeMap::new()),
            _lock: lock_file,
        };
        let mut report = RecoveryReport::default();
        let gdir = data_dir.join("groups");
        let mut names = Vec::new();
        for e in std::fs::read_dir(&gdir).map_err(|e| io(gdir.display(), e))? {
            let e = e.map_err(|e| io(gdir.display(), e))?;
            let name = e.file_name().to_string_lossy().to_string();
            if validate_name(&name).is_err() {
                warn!(dir = %e.path().display(), "ignoring directory with an invalid group name");
                continue;
            }
            names.push(name);
        }
        names.sort();
        for name in names {
            let dir = gdir.join(&name);
            let Some(m) =
                meta::load(&dir.join("group.meta")).map_err(|e| StoreError::Io(e.to_string()))?
            else {
                warn!(group = %name, "group directory without metadata (created but never registered); ignoring");
                continue;
            };
            let (g, records, torn) = recover_group(&name, &dir, m)?;
            report.groups += 1;
            report.records += records;
            report.torn_bytes += torn;
            lock(&store.groups).insert(name, Arc::new(g));
        }
        Ok((store, report))
    }

    /// A group by name.
    pub fn group(&self, name: &str) -> Option<Arc<Group>> {
        lock(&self.groups).get(name).cloned()
    }

    /// All groups.
    pub fn groups(&self) -> Vec<Arc<Group>> {
        lock(&self.groups).values().cloned().collect()
    }

    /// Makes `image` the base volume of `disk` of `group` before an agent
    /// first registers that disk here: at a failback the old primary's disk
    /// becomes the base volume that the resync and the journal bring up to
    /// date (docs/design.md §15); registration keeps a base volume of the
    /// registered size. The file is moved (a rename: same file system).
    /// Refused if the disk is registered or a volume file is already there.
    pub fn adopt_base_volume(
        &self,
        group: &str,
        disk: &str,
        image: &Path,
    ) -> Result<PathBuf, StoreError> {
        for n in [group, disk] {
            validate_name(n).map_err(|e| StoreError::Refused(e.to_string()))?;
        }
        if let Some(g) = self.group(group) {
            if lock(&g.state).meta.disk_index(disk).is_some() {
                return Err(StoreError::Refused(format!(
                    "disk {disk} of group {group} is registered: its base volume is the journal's"
                )));
            }
        }
        let dir = self.data_dir.join("groups").join(group).join("volumes");
        std::fs::create_dir_all(&dir).map_err(|e| io(dir.display(), e))?;
        let target = dir.join(format!("{disk}.img"));
        if target.exists() {
            return Err(StoreError::Refused(format!(
                "{} exists: not replaced",
                target.display()
            )));
        }
        std::fs::rename(image, &target)
            .map_err(|e| io(format!("{} -> {}", image.display(), target.display()), e))?;
        meta::sync_dir(&dir).map_err(|e| io(dir.display(), e))?;
        Ok(target)
    }

    /// The group, created (directories + empty metadata) if new. `name` must be valid.
    pub fn group_or_create(&self, name: &str) -> Result<Arc<Group>, StoreError> {
        validate_name(name).map_err(|e| StoreError::Refused(e.to_string()))?;
        let mut groups = lock(&self.groups);
        if let Some(g) = groups.get(name) {
            return Ok(g.clone());
        }
        let dir = self.data_dir.join("groups").join(name);
        for sub in ["journal", "volumes"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| io(dir.display(), e))?;
        }
        let m = GroupMeta::default();
        meta::store(&dir.join("group.meta"), &m).map_err(|e| io(dir.display(), e))?;
        meta::sync_dir(&self.data_dir.join("groups")).map_err(|e| io(dir.display(), e))?;
        info!(group = name, "created group");
        let g = Arc::new(new_group(
            name,
            &dir,
            m,
            BTreeMap::new(),
            BTreeMap::new(),
            JournalTail::default(),
            crate::checkpoint::GroupCkpt::open(name, &dir).map_err(StoreError::Io)?,
        ));
        groups.insert(name.to_string(), g.clone());
        Ok(g)
    }
}

fn new_group(
    name: &str,
    dir: &Path,
    meta: GroupMeta,
    writers: BTreeMap<WriterId, WriterIndex>,
    segments: BTreeMap<u64, SegInfo>,
    tail: JournalTail,
    checkpoint: crate::checkpoint::GroupCkpt,
) -> Group {
    let bytes = segments.values().map(|s| s.bytes).sum();
    let st = GroupState {
        meta,
        writers,
        segments,
        active_segment: tail.active.as_ref().map(|a| a.number),
        demand: CountVector::ZERO,
        agents: BTreeMap::new(),
        failed: None,
    };
    let (signal, _) = watch::channel(Signal {
        committed: st.committed(),
        fenced: st.meta.fenced,
        failed: false,
    });
    Group {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        state: Mutex::new(st),
        volumes: Mutex::new(()),
        tail: Mutex::new(tail),
        journal_bytes: AtomicU64::new(bytes),
        queued_bytes: AtomicU64::new(0),
        signal,
        checkpoint,
    }
}

/// Rebuilds a group from its metadata and segments (see `crate::journal` for torn tails).
fn recover_group(name: &str, dir: &Path, m: GroupMeta) -> Result<(Group, u64, u64), StoreError> {
    let jdir = dir.join("journal");
    std::fs::create_dir_all(&jdir).map_err(|e| io(jdir.display(), e))?;
    std::fs::create_dir_all(dir.join("volumes")).map_err(|e| io(dir.display(), e))?;
    let mut writers = BTreeMap::new();
    for wm in &m.writers {
        if let Some(g) = wm.current() {
            let (deps, t) = applied_base(&m, wm.writer);
            writers.insert(
                wm.writer,
                WriterIndex::new(g, m.applied.get(wm.writer.index()), deps, t),
            );
        }
    }
    let ckpt = crate::checkpoint::GroupCkpt::open(name, dir).map_err(StoreError::Io)?;
    let group = new_group(
        name,
        dir,
        m,
        writers,
        BTreeMap::new(),
        JournalTail::default(),
        ckpt,
    );
    let segs = journal::list_segments(&jdir).map_err(|e| io(jdir.display(), e))?;
    let mut records = 0u64;
    let mut torn = 0u64;
    let mut last_len = 0;
    {
        let mut st = lock(&group.state);
        for (k, &n) in segs.iter().enumerate() {
            let is_last = k + 1 == segs.len();
            let mut skipped = 0u64;
            let report = journal::scan(&jdir, n, |s| {
                let h = &s.rec.head;
                let valid = st
                    .meta
                    .writer(h.writer)
                    .is_some_and(|wm| wm.record_valid(h.generation, h.seq));
                let disk = st.meta.disk_index(&h.disk);
                let disk_ok = disk.is_some_and(|d| st.meta.disks[d].writer == h.writer);
                let applied = h.seq <= st.meta.applied.get(h.writer.index());
                if !valid || !disk_ok || applied {
                    skipped += 1;
                    return;
                }
                let entry = Entry {
                    loc: Loc {
                        segment: n,
                        offset: s.offset,
                        len: s.rec.total as u32,
                    },
                    disk: disk.unwrap_or(0) as u32,
                    offset: h.offset,
                    kind: h.kind,
                    len: h.len,
                    recv_ms: h.recv_ms,
                    vector: h.vector,
                    prefix_deps: CountVector::ZERO,
                    prefix_time: 0,
                };
                records += 1;
                st.index_record(h.writer, h.seq, entry);
            })
            .map_err(|e| io(journal::segment_path(&jdir, n).display(), e))?;
            st.segments.entry(n).or_default().bytes = report.valid_len;
            if report.cut_bytes > 0 {
                torn += report.cut_bytes;
                let why = report.stopped.clone().unwrap_or_default();
                if is_last {
                    warn!(group = name, segment = n, offset = report.valid_len, bytes = report.cut_bytes, reason = %why,
                        "discarded torn journal tail (writes never acked)");
                } else {
                    error!(group = name, segment = n, offset = report.valid_len, bytes = report.cut_bytes, reason = %why,
                        "CORRUPTION in a closed journal segment: cut off the rest of the segment; acked writes may be lost");
                }
            }
            if skipped > 0 {
                info!(
                    group = name,
                    segment = n,
                    skipped,
                    "skipped applied or superseded records"
                );
            }
            last_len = report.valid_len;
        }
        let total: u64 = st.segments.values().map(|s| s.bytes).sum();
        group.journal_bytes.store(total, Ordering::Relaxed);
    }
    {
        let mut tail = lock(&group.tail);
        tail.next_number = segs.last().map_or(0, |n| n + 1);
        if let Some(&n) = segs.last() {
            tail.active =
                Some(ActiveSegment::reopen(&jdir, n, last_len).map_err(|e| io(jdir.display(), e))?);
            lock(&group.state).active_segment = Some(n);
        }
    }
    // Finish an apply that was interrupted.
    let pending = lock(&group.state).meta.applying;
    if let Some(target) = pending {
        info!(group = name, cut = %target, "finishing an interrupted apply");
        group.apply_to(target).map_err(StoreError::Io)?;
    }
    {
        let st = lock(&group.state);
        let c = st.committed();
        info!(group = name, records, committed = %c, applied = %st.meta.applied, fenced = st.meta.fenced, "recovered group");
        group.publish(&st);
    }
    Ok((group, records, torn))
}

/// Current time, unix milliseconds (the server's clock; never read in the core).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod adopt_tests {
    use super::*;
    use pipecloud_core::wire::{DiskHello, PROTOCOL_VERSION};

    /// A failback's adopted disk survives the agent's first registration
    /// (its content is the base volume), and nothing is adopted over a
    /// registered disk or an existing volume.
    #[test]
    fn an_adopted_disk_is_kept_by_registration_and_never_replaced() {
        let dir = std::env::temp_dir().join(format!("pipecloud-test-adopt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let size = 64 * 1024;
        let old: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let image = dir.join("old-primary.img");
        std::fs::write(&image, &old).unwrap();
        let (store, _) = Store::open(&dir.join("data"), Limits::default()).unwrap();
        assert!(store.adopt_base_volume("g", "../d", &image).is_err());
        let base = store.adopt_base_volume("g", "d", &image).unwrap();
        assert!(!image.exists());
        std::fs::write(&image, b"other").unwrap();
        assert!(
            store.adopt_base_volume("g", "d", &image).is_err(),
            "an existing volume was replaced"
        );
        let g = store.group_or_create("g").unwrap();
        let hello = Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            group: "g".into(),
            group_id: 7,
            agent: "a".into(),
            disks: vec![DiskHello {
                name: "d".into(),
                size: size as u64,
                writer: WriterId(0),
                generation: 1,
            }],
        };
        g.register(&hello, PROTOCOL_VERSION).unwrap();
        assert_eq!(g.volume_path("d"), base);
        assert_eq!(
            std::fs::read(&base).unwrap(),
            old,
            "registration changed the adopted disk"
        );
        std::fs::remove_file(&image).unwrap();
        std::fs::write(&image, b"other").unwrap();
        assert!(
            store.adopt_base_volume("g", "e", &image).is_ok(),
            "an unregistered disk of a registered group"
        );
        std::fs::write(&image, b"other").unwrap();
        let e = store.adopt_base_volume("g", "d", &image).unwrap_err();
        assert!(e.to_string().contains("is registered"), "{e}");
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
