//! Full-state (checkpoint) mode at the backup: durable checkpoint epochs, the ack
//! rule, the RAM replica and the failover output (docs/design.md §11).
//!
//! An agent of a checkpoint group sends, per epoch, every checkpointed machine's
//! dirty RAM pages and device state, then `Commit { epoch, barrier }` (the wire
//! contract is `pipecloud_core::wire::Checkpoint`). Here:
//!
//! - connection tasks validate each frame with the group's [`plan::Ledger`] (pure:
//!   frame sequence, epoch order, RAM bounds and size, counts at `End`, delta chain)
//!   and hand what is to persist to the group's **checkpoint thread** through a
//!   bounded channel ([`QUEUE`] frames of at most 1 MiB each: at most 16 MiB per
//!   group in flight; a full channel stops the connection reading its socket, which
//!   pushes back on the agent). A rejected frame closes that connection with the
//!   reason logged, like every other frame violation.
//! - the checkpoint thread stages pages and device state on disk as they arrive
//!   (never in memory: a 256 MiB first epoch streams through), makes each commit
//!   durable ([`files`]), and, whenever a commit became durable or the group's
//!   committed vector (durable disk prefixes) moved, asks the ledger which epoch is
//!   [`ready`](plan::Ledger::ready): it persists the new acknowledged state, sends
//!   `Checkpoint::Ack { epoch }` to every connection of the group. Acknowledged
//!   epochs are applied to the RAM replica (one file per machine) and the device
//!   state by the group's **replica thread** in batches ([`APPLY_EVERY`] epochs,
//!   [`APPLY_BYTES`], after [`APPLY_IDLE`] idle; by the failover before its output):
//!   staged on disk until then, so a restart re-applies them, and the replica's
//!   writes and fsyncs are off the per-epoch path. If it falls [`APPLY_EVERY`]×4
//!   epochs behind, the checkpoint thread waits for it (bounded staging).
//! - the applier never moves a checkpoint group's base volumes beyond the last
//!   acknowledged barrier ([`GroupCkpt::disk_cap`]), so failover can write the disks
//!   at exactly that barrier.
//! - `failover` of a checkpoint group ([`failover_output`]) writes each disk at the
//!   last acknowledged epoch's barrier, `<machine>.ram`, `<machine>.devstate` and
//!   `checkpoint.toml` (epoch, barrier, sizes; written last, atomically).
//!
//! A fenced or failed group acknowledges nothing more; the failover takes the
//! checkpoint thread's I/O lock, so an epoch is either acknowledged before the
//! failover reads the state (and is what it outputs) or never.

pub mod decode;
pub mod files;
pub mod plan;

use crate::ingest::ConnOut;
use crate::store::{lock, Group};
use crate::volume::{self, Materialised};
use files::{Files, StagedFile};
use pipecloud_core::pagecodec::DecodeError;
use pipecloud_core::wire::{Checkpoint, Frame, PageEncoding};
use pipecloud_core::{CountVector, MAX_WRITERS};
use plan::{Ledger, Step};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

/// Frames queued towards one group's checkpoint thread.
pub const QUEUE: usize = 16;
/// Acknowledgements remembered for the epochs/s figure.
const RATE_WINDOW: usize = 64;
/// Acknowledged epochs staged before they are applied to the RAM replica in one go
/// (also applied after [`APPLY_IDLE`] without a new one, and before a failover).
const APPLY_EVERY: usize = 16;
/// Staged page bytes of acknowledged epochs that trigger an apply.
const APPLY_BYTES: u64 = 256 << 20;
/// An idle group applies its acknowledged epochs after this long.
const APPLY_IDLE: std::time::Duration = std::time::Duration::from_millis(500);

/// Work for the checkpoint thread.
#[derive(Debug)]
enum Work {
    Step(Step),
    /// Staged parts of a torn epoch: (epoch, id).
    Discard(Vec<(u64, u64)>),
    /// Only look whether an epoch became ready.
    Wake,
}

/// Per-group checkpoint state (lives in [`Group`]).
#[derive(Debug)]
pub struct GroupCkpt {
    files: Files,
    ledger: Mutex<Ledger>,
    /// Held while acknowledging / applying, and by failover.
    io: Mutex<()>,
    tx: OnceLock<mpsc::Sender<Work>>,
    conns: Mutex<BTreeMap<u64, Arc<ConnOut>>>,
    failed: Mutex<Option<String>>,
    acks: Mutex<VecDeque<Instant>>,
    /// Acknowledged commits not yet applied to the replica (epoch order; staged on
    /// disk, so a restart re-applies them).
    unapplied: Mutex<Vec<plan::Commit>>,
    /// Wakes the replica thread.
    apply_wake: std::sync::Condvar,
    /// Held while the replica is written (replica thread, failover).
    replica: Mutex<()>,
    /// Decoders of compressed pages, per connection and machine.
    decoders: decode::Decoders,
    /// Page and device-state bytes received (as sent: compressed pages count
    /// their compressed size).
    pub bytes: AtomicU64,
    /// Page bytes received, decoded (full pages).
    pub page_bytes: AtomicU64,
    /// Epochs acknowledged since start.
    pub acked_total: AtomicU64,
}

/// Checkpoint figures of a group for `status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CkptStatus {
    pub acked_epoch: u64,
    pub barrier: CountVector,
    pub members: Vec<String>,
    pub machines: Vec<(String, u64)>,
    pub pending_epochs: usize,
    /// Acknowledged epochs per second over the last acknowledgements.
    pub epochs_per_s: f64,
    /// Page and device-state bytes received since start (as sent).
    pub bytes: u64,
    /// Page bytes received since start, decoded (full pages).
    #[serde(default)]
    pub page_bytes: u64,
    pub failed: Option<String>,
}

impl GroupCkpt {
    /// Opens (recovers) the checkpoint store of the group in `group_dir`.
    pub fn open(name: &str, group_dir: &Path) -> Result<GroupCkpt, String> {
        let files = Files::new(group_dir);
        let rec = files::recover(&files)?;
        files.create()?;
        if rec.state.acked > 0 || !rec.pending.is_empty() || rec.torn_parts > 0 {
            info!(
                group = name,
                acked = rec.state.acked,
                pending_commits = rec.pending.len(),
                torn_parts_discarded = rec.torn_parts,
                reapplied_epochs = rec.reapplied,
                "recovered checkpoint state"
            );
        }
        let ledger = Ledger::new(rec.state, rec.pending, rec.next_id);
        let decoders = decode::Decoders::new(files.latest_dir());
        Ok(GroupCkpt {
            decoders,
            files,
            ledger: Mutex::new(ledger),
            io: Mutex::new(()),
            tx: OnceLock::new(),
            conns: Mutex::new(BTreeMap::new()),
            failed: Mutex::new(None),
            acks: Mutex::new(VecDeque::new()),
            unapplied: Mutex::new(Vec::new()),
            apply_wake: std::sync::Condvar::new(),
            replica: Mutex::new(()),
            bytes: AtomicU64::new(0),
            page_bytes: AtomicU64::new(0),
            acked_total: AtomicU64::new(0),
        })
    }

    /// The cut the base volumes may be applied to at most: the last acknowledged
    /// barrier of a checkpoint group (`None`: not a checkpoint group, no cap).
    pub fn disk_cap(&self) -> Option<CountVector> {
        let l = lock(&self.ledger);
        l.is_checkpoint_group().then(|| l.durable_state().barrier)
    }

    /// Last acknowledged epoch (0: none); the welcome carries it in the
    /// committed vector's `EPOCH_ENTRY`.
    pub fn acked(&self) -> u64 {
        lock(&self.ledger).acked()
    }

    /// Whether the group checkpoints.
    pub fn is_checkpoint_group(&self) -> bool {
        lock(&self.ledger).is_checkpoint_group()
    }

    /// Figures for `status` (`None` for a group that does not checkpoint).
    pub fn status(&self) -> Option<CkptStatus> {
        let l = lock(&self.ledger);
        if !l.is_checkpoint_group() {
            return None;
        }
        let d = l.durable_state();
        let acks = lock(&self.acks);
        let epochs_per_s = match (acks.front(), acks.back()) {
            (Some(a), Some(b)) if acks.len() > 1 && b > a => {
                (acks.len() - 1) as f64 / (*b - *a).as_secs_f64()
            }
            _ => 0.0,
        };
        Some(CkptStatus {
            acked_epoch: d.acked,
            barrier: d.barrier,
            members: d.members.iter().cloned().collect(),
            machines: d.ram.iter().map(|(m, r)| (m.clone(), *r)).collect(),
            pending_epochs: l.pending_epochs(),
            epochs_per_s,
            bytes: self.bytes.load(Ordering::Relaxed),
            page_bytes: self.page_bytes.load(Ordering::Relaxed),
            failed: lock(&self.failed).clone(),
        })
    }

    fn sender(&self, group: &Arc<Group>) -> Result<&mpsc::Sender<Work>, String> {
        if let Some(tx) = self.tx.get() {
            return Ok(tx);
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        if self.tx.set(tx).is_ok() {
            let g = group.clone();
            std::thread::Builder::new()
                .name(format!("ckpt-{}", group.name))
                .spawn(move || run(g, rx))
                .map_err(|e| format!("cannot start the checkpoint thread: {e}"))?;
            let g = group.clone();
            std::thread::Builder::new()
                .name(format!("ckpt-replica-{}", group.name))
                .spawn(move || replica_thread(g))
                .map_err(|e| format!("cannot start the checkpoint replica thread: {e}"))?;
        }
        self.tx
            .get()
            .ok_or_else(|| "checkpoint thread not started".to_string())
    }
}

/// A connection of the group was opened: it receives every `Ack` from now on
/// (and the last one right away, so a reconnecting agent learns where the backup is).
pub fn on_connect(group: &Arc<Group>, conn: &Arc<ConnOut>) {
    let ck = &group.checkpoint;
    let acked = {
        let mut l = lock(&ck.ledger);
        l.connect(conn.id, &conn.agent);
        l.acked()
    };
    lock(&ck.conns).insert(conn.id, conn.clone());
    if acked > 0 {
        conn.send_or_kill(Frame::Checkpoint(Checkpoint::Ack { epoch: acked }));
        // Pending epochs may have become ready while no thread ran (restart).
        if let Ok(tx) = ck.sender(group) {
            let _ = tx.try_send(Work::Wake);
        }
    }
}

/// The connection is gone: its epoch in progress is torn (discarded).
pub fn on_disconnect(group: &Arc<Group>, conn: u64) {
    let ck = &group.checkpoint;
    lock(&ck.conns).remove(&conn);
    ck.decoders.forget(conn);
    let torn = lock(&ck.ledger).disconnect(conn);
    if !torn.is_empty() {
        info!(group = %group.name, conn, parts = torn.len(), "connection lost mid-epoch: its staged parts are discarded");
        if let Ok(tx) = ck.sender(group) {
            // Best effort: recovery deletes unreferenced staged files anyway.
            let _ = tx.try_send(Work::Discard(torn));
        }
    }
}

/// One checkpoint frame of connection `conn` (validated, then queued to the
/// checkpoint thread). `Err` closes the connection.
pub async fn on_frame(
    group: &Arc<Group>,
    conn: &Arc<ConnOut>,
    f: Checkpoint,
) -> Result<(), String> {
    let ck = &group.checkpoint;
    {
        let st = lock(&group.state);
        if st.meta.fenced || st.failed.is_some() {
            return Err(format!(
                "group {} is fenced or its journal failed",
                group.name
            ));
        }
    }
    if let Some(e) = lock(&ck.failed).as_ref() {
        return Err(format!(
            "checkpoint store of group {} failed: {e}",
            group.name
        ));
    }
    let bytes = match &f {
        Checkpoint::Pages { data, .. } | Checkpoint::Device { data, .. } => data.len() as u64,
        _ => 0,
    };
    let mut step = lock(&ck.ledger).frame(conn.id, f)?;
    ck.bytes.fetch_add(bytes, Ordering::Relaxed);
    if let Step::Pages {
        machine,
        offset,
        encoding,
        data,
        ..
    } = &mut step
    {
        // Every page frame goes through the decoder, Raw ones too: they are the
        // base of later XOR frames of the connection.
        let pages = ck
            .decoders
            .decode(conn.id, machine, *offset, *encoding, data)
            .map_err(|e| match e {
                DecodeError::Refused(why) => why,
                DecodeError::Store(why) => {
                    fail(group, &format!("decoding pages: {why}"));
                    why
                }
            })?;
        ck.page_bytes
            .fetch_add(pages.len() as u64, Ordering::Relaxed);
        *data = pages;
        *encoding = PageEncoding::Raw;
    }
    if step == Step::None {
        return Ok(());
    }
    ck.sender(group)?
        .send(Work::Step(step))
        .await
        .map_err(|_| "checkpoint thread gone".to_string())
}

/// The checkpoint thread of one group (see the module documentation).
fn run(group: Arc<Group>, mut rx: mpsc::Receiver<Work>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            fail(&group, &format!("checkpoint thread runtime: {e}"));
            return;
        }
    };
    rt.block_on(async {
        let mut sig = group.signal.subscribe();
        let mut staged = StagedFile::default();
        loop {
            tokio::select! {
                w = rx.recv() => {
                    let Some(w) = w else { break };
                    let mut next = Some(w);
                    while let Some(w) = next.take() {
                        if let Err(e) = handle(&group, &mut staged, w) {
                            fail(&group, &e);
                        }
                        next = rx.try_recv().ok();
                    }
                }
                r = sig.changed() => if r.is_err() { break },
            }
            if lock(&group.checkpoint.failed).is_none() {
                if let Err(e) = try_ack(&group) {
                    fail(&group, &e);
                }
            }
        }
    });
}

fn fail(group: &Group, e: &str) {
    let mut f = lock(&group.checkpoint.failed);
    if f.is_none() {
        error!(group = %group.name, error = %e,
            "CHECKPOINT STORE FAILURE: no further epoch is acknowledged (output stays held) until restart");
        *f = Some(e.to_string());
    }
}

fn handle(group: &Group, staged: &mut StagedFile, w: Work) -> Result<(), String> {
    let ck = &group.checkpoint;
    if lock(&ck.failed).is_some() {
        return Ok(());
    }
    match w {
        Work::Discard(parts) => {
            staged.close();
            for (epoch, id) in parts {
                ck.files.discard(epoch, id);
            }
        }
        Work::Step(Step::Open {
            epoch,
            id,
            discard,
            drop_commits,
            ..
        }) => {
            staged.close();
            ck.files.drop_commits(&drop_commits)?;
            for (e, i) in discard {
                ck.files.discard(e, i);
            }
            ck.files.open_part(epoch, id)?;
        }
        Work::Step(Step::Pages {
            epoch,
            id,
            offset,
            encoding,
            data,
            ..
        }) => {
            if encoding != PageEncoding::Raw {
                return Err(format!("pages of epoch {epoch} reached staging undecoded"));
            }
            ck.files.append_pages(staged, epoch, id, offset, &data)?
        }
        Work::Step(Step::Device {
            epoch,
            id,
            offset,
            data,
            ..
        }) => ck.files.write_device(staged, epoch, id, offset, &data)?,
        Work::Step(Step::None) | Work::Wake => {}
        Work::Step(Step::Commit(c)) => {
            #[cfg(feature = "fault-ack-on-commit")]
            send_ack(group, c.epoch);
            staged.close();
            ck.files.commit(&c)?;
            lock(&ck.ledger).durable(&c.agent, c.epoch);
        }
    }
    Ok(())
}

/// Acknowledges the newest ready epoch, if any, then applies it to the replica.
fn try_ack(group: &Group) -> Result<(), String> {
    let ck = &group.checkpoint;
    let _io = lock(&ck.io);
    let committed = {
        let st = lock(&group.state);
        if st.meta.fenced || st.failed.is_some() {
            return Ok(());
        }
        st.committed()
    };
    let (epoch, commits) = {
        let mut l = lock(&ck.ledger);
        let Some(epoch) = l.ready(&committed) else {
            return Ok(());
        };
        let d = l.would_ack(epoch, &committed)?;
        ck.files.store_state(&d)?;
        (epoch, l.ack(epoch, &committed))
    };
    send_ack(group, epoch);
    ck.acked_total.fetch_add(1, Ordering::Relaxed);
    {
        let mut a = lock(&ck.acks);
        a.push_back(Instant::now());
        if a.len() > RATE_WINDOW {
            a.pop_front();
        }
    }
    let backlog = {
        let mut u = lock(&ck.unapplied);
        u.extend(commits);
        let due = due(&u);
        if due {
            ck.apply_wake.notify_one();
        }
        u.len() >= 4 * APPLY_EVERY
    };
    if backlog {
        // The replica thread fell behind: wait for it (bounds the staged epochs).
        let _r = lock(&ck.replica);
        apply_acked(ck)?;
    }
    Ok(())
}

/// Whether the acknowledged, unapplied commits are due for applying.
fn due(u: &[plan::Commit]) -> bool {
    let epochs = u
        .iter()
        .map(|c| c.epoch)
        .collect::<std::collections::BTreeSet<_>>();
    let bytes: u64 = u
        .iter()
        .flat_map(|c| &c.parts)
        .map(|p| p.pages * pipecloud_core::wire::PAGE_SIZE)
        .sum();
    epochs.len() >= APPLY_EVERY || bytes >= APPLY_BYTES
}

/// The replica thread of one group: applies acknowledged epochs to the RAM
/// replica in batches, off the checkpoint thread's per-epoch path.
fn replica_thread(group: Arc<Group>) {
    let ck = &group.checkpoint;
    loop {
        {
            let mut u = lock(&ck.unapplied);
            loop {
                if due(&u) {
                    break;
                }
                if u.is_empty() {
                    u = ck.apply_wake.wait(u).unwrap_or_else(|e| e.into_inner());
                } else {
                    let (g, t) = ck
                        .apply_wake
                        .wait_timeout(u, APPLY_IDLE)
                        .unwrap_or_else(|e| e.into_inner());
                    u = g;
                    if t.timed_out() && !u.is_empty() {
                        break;
                    }
                }
            }
        }
        if lock(&ck.failed).is_some() {
            return;
        }
        let _r = lock(&ck.replica);
        if let Err(e) = apply_acked(ck) {
            fail(&group, &e);
        }
    }
}

/// Applies the acknowledged, not yet applied commits to the RAM replica (caller
/// holds the replica lock).
fn apply_acked(ck: &GroupCkpt) -> Result<(), String> {
    let commits = std::mem::take(&mut *lock(&ck.unapplied));
    if !commits.is_empty() {
        ck.files.apply(&commits)?;
    }
    Ok(())
}

fn send_ack(group: &Group, epoch: u64) {
    for c in lock(&group.checkpoint.conns).values() {
        c.send_or_kill(Frame::Checkpoint(Checkpoint::Ack { epoch }));
    }
}

/// What a checkpoint failover wrote besides the disk images.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CkptOutput {
    pub epoch: u64,
    /// Per machine: name, RAM bytes, device-state bytes.
    pub machines: Vec<(String, u64, u64)>,
}

/// Failover output of a checkpoint group (the group is fenced already): the disks
/// at the last acknowledged epoch's barrier, each machine's RAM and device state
/// at that epoch, and `checkpoint.toml` last.
pub fn failover_output(
    g: &Group,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Materialised, CkptOutput), String> {
    let ck = &g.checkpoint;
    let _io = lock(&ck.io);
    let d = lock(&ck.ledger).durable_state().clone();
    let _r = lock(&ck.replica);
    apply_acked(ck)?;
    if d.acked == 0 {
        return Err(format!(
            "checkpoint group {} has no acknowledged epoch: there is no state to resume",
            g.name
        ));
    }
    let m = g.materialise(d.barrier, out, progress)?;
    let mut machines = Vec::new();
    for (name, ram) in &d.ram {
        let src = ck.files.ram_path(name);
        if !src.exists() {
            continue;
        }
        let dst = out.join(format!("{name}.ram"));
        let f = volume::copy_sparse(&src, &dst, *ram, &mut |_| {})?;
        f.sync_all()
            .map_err(|e| format!("{}: {e}", dst.display()))?;
        let dev = ck.files.devstate_path(name);
        let dev_dst = out.join(format!("{name}.devstate"));
        let len = std::fs::copy(&dev, &dev_dst)
            .map_err(|e| format!("{} -> {}: {e}", dev.display(), dev_dst.display()))?;
        std::fs::File::open(&dev_dst)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("{}: {e}", dev_dst.display()))?;
        machines.push((name.clone(), *ram, len));
    }
    let entries: Vec<String> = (0..MAX_WRITERS)
        .map(|i| d.barrier.get(i).to_string())
        .collect();
    let mut text = format!(
        "# Written by backup-server failover after every file was fsync'ed.\ngroup = \"{}\"\nepoch = {}\nbarrier = [{}]\n",
        g.name,
        d.acked,
        entries.join(", ")
    );
    for (name, ram, dev) in &machines {
        text.push_str(&format!(
            "\n[[machine]]\nname = \"{name}\"\nram = \"{name}.ram\"\nram_bytes = {ram}\ndevstate = \"{name}.devstate\"\ndevstate_bytes = {dev}\n"
        ));
    }
    let tmp = out.join("checkpoint.toml.tmp");
    let dst = out.join("checkpoint.toml");
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
    }
    std::fs::rename(&tmp, &dst).map_err(|e| format!("{}: {e}", dst.display()))?;
    crate::meta::sync_dir(out).map_err(|e| format!("{}: {e}", out.display()))?;
    info!(group = %g.name, epoch = d.acked, barrier = %d.barrier, machines = machines.len(), "checkpoint failover output written");
    if machines.is_empty() {
        warn!(group = %g.name, "checkpoint failover: no machine has a RAM replica");
    }
    Ok((
        m,
        CkptOutput {
            epoch: d.acked,
            machines,
        },
    ))
}
