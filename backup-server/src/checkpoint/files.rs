//! The durable checkpoint store of one group: staged epochs, commit markers, the
//! acknowledged state, and the RAM replica. Plain file I/O; the decisions are in
//! [`super::plan`].
//!
//! ```text
//! groups/<g>/checkpoint/state.0, state.1       acknowledged epoch, its barrier, members, RAM sizes
//!                                              (two slots written in turn, see Files::store_state)
//! groups/<g>/checkpoint/epochs/<E>/<id>.pages  staged part <id>: records
//!                                              [offset u64 LE][len u32 LE][crc32c u32 LE][bytes],
//!                                              RAM pages, or device-state chunks (offset | DEVICE)
//! groups/<g>/checkpoint/epochs/<E>/<agent>.commit   commit marker (Commit, checksummed)
//! groups/<g>/checkpoint/replica/<machine>.ram       RAM at the applied epoch (sparse)
//! groups/<g>/checkpoint/replica/<machine>.devstate  device state at the applied epoch
//! groups/<g>/checkpoint/trash/                 applied epochs on their way out
//! ```
//!
//! fsync discipline: a commit's staged files are fdatasync'ed before its marker is
//! written and fsync'ed (a torn marker fails its checksum and counts as absent): a
//! valid marker on disk means its parts are complete on disk. The state (a slot
//! written in place and fdatasync'ed) is written before the `Ack` is sent. Applying an acknowledged epoch writes its pages into the
//! replica (idempotent), replaces the device state (atomically), fsyncs, and only
//! then moves the epoch directory to `trash/` (fsync of `epochs/` after each move,
//! in epoch order, so an epoch directory still present implies every later one is
//! too). Recovery ([`recover`]) re-applies every epoch `<=` the acknowledged one
//! still present, in order, keeps the committed epochs beyond it (each has a
//! marker) and deletes staged files no marker names (torn epochs).

use super::plan::{Commit, Durable, Part};
use crate::meta::sync_dir;
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const STATE_MAGIC: &[u8; 8] = b"PCCKPT01";
const COMMIT_MAGIC: &[u8; 8] = b"PCCMIT01";
/// Bytes of a pages record header.
const REC_HEAD: usize = 16;
/// Flag in a record's offset: a device-state chunk (at the rest of the offset),
/// not RAM pages (RAM offsets stay below 2^40, device state below 2^26).
const DEVICE: u64 = 1 << 63;

/// Paths of one group's checkpoint store.
#[derive(Debug)]
pub struct Files {
    pub dir: PathBuf,
    /// Sequence number of the last state written (slot `seq % 2`).
    state_seq: std::sync::atomic::AtomicU64,
}

fn err(p: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", p.display())
}

/// `magic + crc32c(body) + body`.
fn checked(magic: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(body.len() + 12);
    bytes.extend_from_slice(magic);
    bytes.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    bytes.extend_from_slice(body);
    bytes
}

/// Reads a file written as [`checked`] bytes; `None` if absent, `Err` if corrupt.
fn read_checked(path: &Path, magic: &[u8; 8]) -> Result<Option<Vec<u8>>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(path, e)),
    };
    if bytes.len() < 12 || &bytes[..8] != magic {
        return Err(err(path, "bad magic"));
    }
    let crc = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if crc32c::crc32c(&bytes[12..]) != crc {
        return Err(err(path, "checksum mismatch"));
    }
    Ok(Some(bytes[12..].to_vec()))
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    pub state: Durable,
    /// Durable commits beyond the acknowledged epoch.
    pub pending: Vec<Commit>,
    /// Above every staged file id on disk.
    pub next_id: u64,
    /// Staged parts deleted because no commit marker names them (torn).
    pub torn_parts: usize,
    /// Acknowledged epochs re-applied to the replica.
    pub reapplied: usize,
}

impl Files {
    /// The store under `group_dir/checkpoint`.
    pub fn new(group_dir: &Path) -> Files {
        Files {
            dir: group_dir.join("checkpoint"),
            state_seq: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn epochs(&self) -> PathBuf {
        self.dir.join("epochs")
    }

    fn epoch_dir(&self, epoch: u64) -> PathBuf {
        self.epochs().join(format!("{epoch:020}"))
    }

    /// Where the decoders keep their connections' latest page copies.
    pub fn latest_dir(&self) -> PathBuf {
        self.dir.join("latest")
    }

    fn replica(&self) -> PathBuf {
        self.dir.join("replica")
    }

    /// RAM replica of `machine` (name validated).
    pub fn ram_path(&self, machine: &str) -> PathBuf {
        self.replica().join(format!("{machine}.ram"))
    }

    /// Device state of `machine` at the applied epoch.
    pub fn devstate_path(&self, machine: &str) -> PathBuf {
        self.replica().join(format!("{machine}.devstate"))
    }

    fn pages_path(&self, epoch: u64, id: u64) -> PathBuf {
        self.epoch_dir(epoch).join(format!("{id}.pages"))
    }

    /// Creates the directories.
    pub fn create(&self) -> Result<(), String> {
        for d in [self.epochs(), self.replica(), self.dir.join("trash")] {
            std::fs::create_dir_all(&d).map_err(|e| err(&d, e))?;
        }
        Ok(())
    }

    /// Creates (truncates) the staged files of a part.
    pub fn open_part(&self, epoch: u64, id: u64) -> Result<(), String> {
        let d = self.epoch_dir(epoch);
        if !d.exists() {
            std::fs::create_dir_all(&d).map_err(|e| err(&d, e))?;
        }
        let p = self.pages_path(epoch, id);
        File::create(&p).map_err(|e| err(&p, e))?;
        Ok(())
    }

    /// Appends a pages record to part `id`.
    pub fn append_pages(
        &self,
        f: &mut StagedFile,
        epoch: u64,
        id: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(), String> {
        let p = self.pages_path(epoch, id);
        let file = f.get(&p, (epoch, id))?;
        let mut head = [0u8; REC_HEAD];
        head[..8].copy_from_slice(&offset.to_le_bytes());
        head[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        head[12..].copy_from_slice(&crc32c::crc32c(data).to_le_bytes());
        file.write_all(&head).map_err(|e| err(&p, e))?;
        file.write_all(data).map_err(|e| err(&p, e))
    }

    /// Appends a device-state chunk (at `offset` of the blob) to part `id`: one
    /// staged file per part, so one fdatasync at its commit.
    pub fn write_device(
        &self,
        f: &mut StagedFile,
        epoch: u64,
        id: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<(), String> {
        self.append_pages(f, epoch, id, offset | DEVICE, data)
    }

    /// Deletes a torn part's staged files.
    pub fn discard(&self, epoch: u64, id: u64) {
        let _ = std::fs::remove_file(self.pages_path(epoch, id));
    }

    /// Deletes superseded commit markers durably (a restarted agent starts over).
    pub fn drop_commits(&self, markers: &[(u64, String)]) -> Result<(), String> {
        for (epoch, agent) in markers {
            let d = self.epoch_dir(*epoch);
            let p = d.join(format!("{agent}.commit"));
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err(&p, e)),
            }
            sync_dir(&d).map_err(|e| err(&d, e))?;
        }
        Ok(())
    }

    /// Makes a commit durable: its parts' files, then its marker.
    pub fn commit(&self, c: &Commit) -> Result<(), String> {
        for part in &c.parts {
            let p = self.pages_path(c.epoch, part.id);
            let f = File::open(&p).map_err(|e| err(&p, e))?;
            f.sync_data().map_err(|e| err(&p, e))?;
        }
        // Written in place (no rename: a marker is written once): a torn marker
        // fails its checksum and counts as absent, which is right, since only a
        // marker that was fsync'ed ever counts as durable.
        let body = postcard::to_stdvec(c).map_err(|e| e.to_string())?;
        let marker = self.epoch_dir(c.epoch).join(format!("{}.commit", c.agent));
        let bytes = checked(COMMIT_MAGIC, &body);
        let mut f = File::create(&marker).map_err(|e| err(&marker, e))?;
        f.write_all(&bytes).map_err(|e| err(&marker, e))?;
        f.sync_data().map_err(|e| err(&marker, e))?;
        let d = self.epoch_dir(c.epoch);
        sync_dir(&d).map_err(|e| err(&d, e))?;
        sync_dir(&self.epochs()).map_err(|e| err(&self.epochs(), e))
    }

    /// Persists the acknowledged state (before the `Ack` is sent): two slots
    /// `state.0` / `state.1` written in turn in place (one fdatasync; the slot's
    /// directory entry is fsync'ed once, when it is created), each checksummed with
    /// a sequence number; recovery takes the valid slot with the higher one, so a
    /// torn write leaves the previous state.
    pub fn store_state(&self, d: &Durable) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        let seq = self.state_seq.load(Ordering::Relaxed) + 1;
        let body = postcard::to_stdvec(&(seq, d)).map_err(|e| e.to_string())?;
        let bytes = checked(STATE_MAGIC, &body);
        let p = self.dir.join(format!("state.{}", seq % 2));
        let new = !p.exists();
        let f = File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .map_err(|e| err(&p, e))?;
        f.write_all_at(&bytes, 0).map_err(|e| err(&p, e))?;
        f.set_len(bytes.len() as u64).map_err(|e| err(&p, e))?;
        f.sync_data().map_err(|e| err(&p, e))?;
        if new {
            sync_dir(&self.dir).map_err(|e| err(&self.dir, e))?;
        }
        self.state_seq.store(seq, Ordering::Relaxed);
        Ok(())
    }

    /// The newest valid state slot, if any (and sets the sequence to continue from).
    fn load_state(&self) -> Option<Durable> {
        let mut best: Option<(u64, Durable)> = None;
        for slot in 0..2 {
            let p = self.dir.join(format!("state.{slot}"));
            let Some(body) = read_checked(&p, STATE_MAGIC).ok().flatten() else {
                continue;
            };
            if let Ok((seq, d)) = postcard::from_bytes::<(u64, Durable)>(&body) {
                if best.as_ref().is_none_or(|b| seq > b.0) {
                    best = Some((seq, d));
                }
            }
        }
        let (seq, d) = best?;
        self.state_seq
            .store(seq, std::sync::atomic::Ordering::Relaxed);
        Some(d)
    }

    /// Applies acknowledged commits (epoch order) to the replica, fsyncs it, then
    /// retires their epoch directories. Returns the page bytes applied.
    pub fn apply(&self, commits: &[Commit]) -> Result<u64, String> {
        let mut bytes = 0;
        let mut touched: BTreeSet<String> = BTreeSet::new();
        let mut files: std::collections::BTreeMap<String, File> = Default::default();
        for c in commits {
            for part in &c.parts {
                if !files.contains_key(&part.machine) {
                    let p = self.ram_path(&part.machine);
                    let f = File::options()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&p)
                        .map_err(|e| err(&p, e))?;
                    if f.metadata().map_err(|e| err(&p, e))?.len() != part.ram_bytes {
                        f.set_len(part.ram_bytes).map_err(|e| err(&p, e))?;
                    }
                    files.insert(part.machine.clone(), f);
                }
                let ram = &files[&part.machine];
                let path = self.pages_path(c.epoch, part.id);
                let (b, dev) = apply_part(&path, ram, part)?;
                bytes += b;
                self.install_devstate(part, &dev)?;
                touched.insert(part.machine.clone());
            }
        }
        for (m, f) in &files {
            f.sync_data().map_err(|e| err(&self.ram_path(m), e))?;
        }
        if !touched.is_empty() {
            sync_dir(&self.replica()).map_err(|e| err(&self.replica(), e))?;
        }
        let epochs: BTreeSet<u64> = commits.iter().map(|c| c.epoch).collect();
        for e in epochs {
            self.retire(e)?;
        }
        Ok(bytes)
    }

    fn install_devstate(&self, part: &Part, data: &[u8]) -> Result<(), String> {
        let dst = self.devstate_path(&part.machine);
        let tmp = dst.with_extension("devstate.tmp");
        {
            let mut f = File::create(&tmp).map_err(|e| err(&tmp, e))?;
            f.write_all(data).map_err(|e| err(&tmp, e))?;
            f.sync_all().map_err(|e| err(&tmp, e))?;
        }
        std::fs::rename(&tmp, &dst).map_err(|e| err(&dst, e))
    }

    /// Moves an applied epoch's directory to `trash/` (durably) and deletes it.
    fn retire(&self, epoch: u64) -> Result<(), String> {
        let from = self.epoch_dir(epoch);
        if !from.exists() {
            return Ok(());
        }
        let to = self.dir.join("trash").join(format!("{epoch:020}"));
        let _ = std::fs::remove_dir_all(&to);
        std::fs::rename(&from, &to).map_err(|e| err(&from, e))?;
        sync_dir(&self.epochs()).map_err(|e| err(&self.epochs(), e))?;
        let _ = std::fs::remove_dir_all(&to);
        Ok(())
    }
}

/// Applies the pages records of one part to the RAM replica; returns the page
/// bytes applied and the part's device state.
fn apply_part(path: &Path, ram: &File, part: &Part) -> Result<(u64, Vec<u8>), String> {
    let f = File::open(path).map_err(|e| err(path, e))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut head = [0u8; REC_HEAD];
    let mut buf = Vec::new();
    let mut pages = 0u64;
    let mut bytes = 0u64;
    let mut dev = Vec::new();
    loop {
        match r.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(err(path, e)),
        }
        let offset = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(head[8..12].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(head[12..].try_into().unwrap_or_default());
        let is_dev = offset & DEVICE != 0;
        let (offset, limit) = if is_dev {
            (offset & !DEVICE, part.device_bytes)
        } else {
            (offset, part.ram_bytes)
        };
        if len > pipecloud_core::codec::MAX_CHECKPOINT_CHUNK
            || offset.saturating_add(len as u64) > limit
        {
            return Err(err(
                path,
                format!("bad pages record at RAM offset {offset}"),
            ));
        }
        buf.resize(len, 0);
        r.read_exact(&mut buf).map_err(|e| err(path, e))?;
        if crc32c::crc32c(&buf) != crc {
            return Err(err(
                path,
                format!("checksum mismatch at RAM offset {offset}"),
            ));
        }
        if is_dev {
            let end = offset as usize + len;
            if dev.len() < end {
                dev.resize(end, 0);
            }
            dev[offset as usize..end].copy_from_slice(&buf);
            continue;
        }
        ram.write_all_at(&buf, offset).map_err(|e| err(path, e))?;
        pages += len as u64 / pipecloud_core::wire::PAGE_SIZE;
        bytes += len as u64;
    }
    if pages != part.pages || dev.len() as u64 != part.device_bytes {
        return Err(err(
            path,
            format!(
                "{pages} pages and {} device-state bytes staged, the commit says {} and {}",
                dev.len(),
                part.pages,
                part.device_bytes
            ),
        ));
    }
    Ok((bytes, dev))
}

/// The staged file being appended to (one at a time: frames of a part arrive in a
/// row), kept open between frames.
#[derive(Debug, Default)]
pub struct StagedFile {
    cur: Option<((u64, u64), File)>,
}

impl StagedFile {
    fn get(&mut self, p: &Path, key: (u64, u64)) -> Result<&mut File, String> {
        if self.cur.as_ref().map(|c| c.0) != Some(key) {
            let f = File::options()
                .append(true)
                .open(p)
                .map_err(|e| err(p, e))?;
            self.cur = Some((key, f));
        }
        match self.cur.as_mut() {
            Some((_, f)) => Ok(f),
            None => Err(err(p, "no staged file")),
        }
    }

    /// Forgets the open file (before it may be deleted or synced by path).
    pub fn close(&mut self) {
        self.cur = None;
    }
}

/// Recovers a group's checkpoint store (see the module documentation).
pub fn recover(files: &Files) -> Result<Recovered, String> {
    let mut rec = Recovered::default();
    if !files.dir.exists() {
        return Ok(rec);
    }
    files.create()?;
    let trash = files.dir.join("trash");
    for e in std::fs::read_dir(&trash)
        .map_err(|e| err(&trash, e))?
        .flatten()
    {
        let _ = std::fs::remove_dir_all(e.path());
    }
    if let Some(d) = files.load_state() {
        rec.state = d;
    }
    let mut epochs: Vec<u64> = Vec::new();
    let ed = files.epochs();
    for e in std::fs::read_dir(&ed).map_err(|e| err(&ed, e))?.flatten() {
        match e.file_name().to_string_lossy().parse::<u64>() {
            Ok(n) => epochs.push(n),
            Err(_) => {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    epochs.sort_unstable();
    let mut to_apply = Vec::new();
    for epoch in epochs {
        let d = files.epoch_dir(epoch);
        let mut commits = Vec::new();
        let mut ids: BTreeSet<u64> = BTreeSet::new();
        let mut staged: Vec<(PathBuf, u64)> = Vec::new();
        for e in std::fs::read_dir(&d).map_err(|e| err(&d, e))?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let p = e.path();
            if name.ends_with(".commit") {
                let c = read_checked(&p, COMMIT_MAGIC)
                    .ok()
                    .flatten()
                    .and_then(|b| postcard::from_bytes::<Commit>(&b).ok());
                match c {
                    Some(c) => {
                        ids.extend(c.parts.iter().map(|p| p.id));
                        commits.push(c);
                    }
                    None => {
                        // Torn while being written: never durable, never acked.
                        tracing::warn!(path = %p.display(), "discarding a torn checkpoint commit marker");
                        let _ = std::fs::remove_file(&p);
                    }
                }
            } else if let Some(id) = name
                .strip_suffix(".pages")
                .and_then(|s| s.parse::<u64>().ok())
            {
                rec.next_id = rec.next_id.max(id + 1);
                staged.push((p, id));
            } else {
                let _ = std::fs::remove_file(&p);
            }
        }
        for (p, id) in staged {
            if !ids.contains(&id) {
                rec.torn_parts += 1;
                let _ = std::fs::remove_file(&p);
            }
        }
        if commits.is_empty() {
            let _ = std::fs::remove_dir_all(&d);
        } else if epoch <= rec.state.acked {
            to_apply.extend(commits);
        } else {
            rec.pending.extend(commits);
        }
    }
    if !to_apply.is_empty() {
        rec.reapplied = to_apply
            .iter()
            .map(|c| c.epoch)
            .collect::<BTreeSet<_>>()
            .len();
        files.apply(&to_apply)?;
    }
    sync_dir(&ed).map_err(|e| err(&ed, e))?;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipecloud_core::wire::PAGE_SIZE;
    use pipecloud_core::CountVector;

    const RAM: u64 = 8 * PAGE_SIZE;

    fn part(machine: &str, id: u64, pages: u64, dev: u64, full: bool) -> Part {
        Part {
            machine: machine.into(),
            id,
            ram_bytes: RAM,
            pages,
            device_bytes: dev,
            full,
        }
    }

    fn stage(f: &Files, s: &mut StagedFile, epoch: u64, id: u64, pages: &[(u64, u8)], dev: &[u8]) {
        f.open_part(epoch, id).unwrap();
        s.close();
        for &(p, b) in pages {
            f.append_pages(s, epoch, id, p * PAGE_SIZE, &vec![b; PAGE_SIZE as usize])
                .unwrap();
        }
        f.write_device(s, epoch, id, 0, dev).unwrap();
        s.close();
    }

    fn page(path: &Path, p: u64) -> u8 {
        let mut b = [0u8; 1];
        File::open(path)
            .unwrap()
            .read_exact_at(&mut b, p * PAGE_SIZE)
            .unwrap();
        b[0]
    }

    #[test]
    fn commit_ack_apply_and_recover_ignoring_torn_parts() {
        let tmp = tempfile::tempdir().unwrap();
        let f = Files::new(tmp.path());
        f.create().unwrap();
        let mut s = StagedFile::default();
        // Epoch 1 full, epoch 2 a delta, both committed; epoch 3 torn (no marker).
        let all: Vec<(u64, u8)> = (0..8).map(|p| (p, 1)).collect();
        stage(&f, &mut s, 1, 1, &all, b"dev1");
        let c1 = Commit {
            agent: "a".into(),
            epoch: 1,
            barrier: CountVector::from_slice(&[1]),
            parts: vec![part("vm", 1, 8, 4, true)],
        };
        f.commit(&c1).unwrap();
        stage(&f, &mut s, 2, 2, &[(3, 2)], b"dev-2");
        let c2 = Commit {
            agent: "a".into(),
            epoch: 2,
            barrier: CountVector::from_slice(&[2]),
            parts: vec![part("vm", 2, 1, 5, false)],
        };
        f.commit(&c2).unwrap();
        stage(&f, &mut s, 3, 3, &[(5, 3)], b"torn");
        // Ack epoch 1 and apply it.
        let d = Durable {
            acked: 1,
            barrier: c1.barrier,
            members: ["a".to_string()].into(),
            ram: [("vm".to_string(), RAM)].into(),
            chain: Default::default(),
        };
        f.store_state(&d).unwrap();
        assert_eq!(f.apply(std::slice::from_ref(&c1)).unwrap(), RAM);
        assert_eq!(page(&f.ram_path("vm"), 3), 1);
        assert_eq!(std::fs::read(f.devstate_path("vm")).unwrap(), b"dev1");
        // Crash: epoch 2 committed (pending), epoch 3 torn.
        let r = recover(&f).unwrap();
        assert_eq!(r.state, d);
        assert_eq!(r.pending, vec![c2.clone()]);
        assert_eq!(r.torn_parts, 1);
        assert!(r.next_id >= 3);
        assert!(!f.pages_path(3, 3).exists());
        // Ack 2, crash before it is applied: recovery applies it.
        let d2 = Durable {
            acked: 2,
            barrier: c2.barrier,
            ..d
        };
        f.store_state(&d2).unwrap();
        let r = recover(&f).unwrap();
        assert_eq!((r.reapplied, r.pending.len()), (1, 0));
        assert_eq!(page(&f.ram_path("vm"), 3), 2);
        assert_eq!(page(&f.ram_path("vm"), 4), 1);
        assert_eq!(std::fs::read(f.devstate_path("vm")).unwrap(), b"dev-2");
        assert!(!f.epoch_dir(2).exists());
    }

    #[test]
    fn a_torn_state_slot_leaves_the_previous_state() {
        let tmp = tempfile::tempdir().unwrap();
        let f = Files::new(tmp.path());
        f.create().unwrap();
        let d = |acked| Durable {
            acked,
            ..Durable::default()
        };
        for e in 1..=3 {
            f.store_state(&d(e)).unwrap();
        }
        assert_eq!(recover(&Files::new(tmp.path())).unwrap().state, d(3));
        // Epoch 3 went to slot 1: tear it.
        let p = f.dir.join("state.1");
        let mut b = std::fs::read(&p).unwrap();
        let last = b.len() - 1;
        b[last] ^= 1;
        std::fs::write(&p, b).unwrap();
        let g = Files::new(tmp.path());
        assert_eq!(recover(&g).unwrap().state, d(2));
        // Writing on continues above the surviving slot's sequence.
        g.store_state(&d(4)).unwrap();
        assert_eq!(recover(&Files::new(tmp.path())).unwrap().state, d(4));
    }

    #[test]
    fn a_corrupt_staged_page_is_an_error_not_a_replica() {
        let tmp = tempfile::tempdir().unwrap();
        let f = Files::new(tmp.path());
        f.create().unwrap();
        let mut s = StagedFile::default();
        stage(&f, &mut s, 1, 1, &[(0, 9)], b"");
        let c = Commit {
            agent: "a".into(),
            epoch: 1,
            barrier: CountVector::ZERO,
            parts: vec![part("vm", 1, 1, 0, false)],
        };
        let p = f.pages_path(1, 1);
        let mut b = std::fs::read(&p).unwrap();
        let last = b.len() - 1;
        b[last] ^= 1;
        std::fs::write(&p, b).unwrap();
        let e = f.apply(&[c]).unwrap_err();
        assert!(e.contains("checksum"), "{e}");
    }
}
