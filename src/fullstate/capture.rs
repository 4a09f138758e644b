//! One pause of a checkpointed group: stop every guest → open the next epoch →
//! scan and copy each guest's written pages and save its device state → continue
//! every guest. Shipping happens afterwards, from the staging buffers, while the
//! guests run (docs/design.md §9).
//!
//! Why this order: all guests are stopped before the epoch opens and continue
//! only after all are captured, which is what the epoch release rule rests on
//! (`pipecloud_core::epoch`). QEMU's `stop` also drains the guest's block I/O, so
//! the issued vector read between the stops and the epoch opening is exactly the
//! disk state the captured RAM remembers (the barrier).
//!
//! The pages are copied out of the agent's own read-only shared mapping of the
//! RAM file (QEMU's `memory-backend-file … share=on`), so copying takes one
//! `memcpy` per run of written pages and does not disturb QEMU's tracking.
//!
//! Bounds: a guest's [`Staged`] buffer holds one epoch's pages and device state,
//! at most the guest's RAM plus [`pipecloud_core::wire::MAX_DEVICE_STATE`]; its
//! capacity is reused from epoch to epoch. The driver keeps one buffer in capture
//! and one being shipped per guest: a pause waits while the previous epoch is
//! still being shipped.
//!
//! Failure: any error (QMP gone, a guest that does not stop, a scan refused
//! because the guest's RAM is not tracked) is returned with its guest and step;
//! the guests already stopped are continued (best effort). The caller fails the
//! group's epochs (`Epochs::capture_failed`): output stays held, an alarm is raised.

use super::pagemap::{find_ram_mapping, PagemapScanner, Rearm};
use super::qmp::Qmp;
use anyhow::{bail, ensure, Context, Result};
use pipecloud_core::pagecodec::Shadow;
use pipecloud_core::wire::{Checkpoint, MAX_DEVICE_STATE, MAX_WRITE_PAYLOAD};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where to find one guest.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// Machine name (the `machine` of `Checkpoint::Begin`).
    pub name: String,
    pub qmp: PathBuf,
    pub ram_file: PathBuf,
    /// Scratch file for QEMU's device state (on tmpfs; removed on drop).
    pub device_file: PathBuf,
}

/// The agent's read-only shared mapping of a guest's RAM file.
struct RamMap {
    ptr: *const u8,
    len: usize,
}

// SAFETY: a read-only mapping, only read through `&self`.
unsafe impl Send for RamMap {}

impl RamMap {
    fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
        let len = usize::try_from(f.metadata()?.len())?;
        ensure!(len > 0, "RAM file {} is empty", path.display());
        // SAFETY: a fresh read-only shared mapping of a file we opened; unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!(
                "mmap {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(RamMap { ptr: p.cast(), len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes and lives as long as `self`. QEMU may
        // write to it concurrently, but we read only while the guest is stopped.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for RamMap {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe {
            libc::munmap(self.ptr as *mut _, self.len);
        }
    }
}

/// A guest the agent checkpoints.
pub struct Guest {
    spec: GuestSpec,
    qmp: Qmp,
    scanner: PagemapScanner,
    qemu_ram: Range<u64>,
    ram: RamMap,
    scratch: Vec<Range<u64>>,
}

impl Guest {
    /// Connects to the guest's QMP, finds its RAM mapping in QEMU and checks that
    /// the mapping is tracked (the shim is loaded).
    pub fn attach(spec: GuestSpec, timeout: Duration) -> Result<Self> {
        let qmp = Qmp::connect(&spec.qmp, timeout)?;
        let pid = qmp.pid();
        let qemu_ram = find_ram_mapping(pid, &spec.ram_file)
            .with_context(|| format!("guest {}: QEMU pid {pid}", spec.name))?;
        let ram = RamMap::open(&spec.ram_file)?;
        ensure!(
            qemu_ram.end - qemu_ram.start == ram.len as u64,
            "guest {}: QEMU maps {} bytes of {}, the file has {}",
            spec.name,
            qemu_ram.end - qemu_ram.start,
            spec.ram_file.display(),
            ram.len
        );
        let mut scanner = PagemapScanner::open(pid)?;
        let mut scratch = Vec::new();
        scanner
            .scan(qemu_ram.clone(), Rearm::No, &mut scratch)
            .with_context(|| format!("guest {}: RAM tracking check", spec.name))?;
        Ok(Guest {
            spec,
            qmp,
            scanner,
            qemu_ram,
            ram,
            scratch,
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }
    /// Guest RAM size in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram.len as u64
    }
    /// The guest's QMP session (status queries between pauses).
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// Scans, copies the pages (all of them with `full_ram`) and the device
    /// state into `out`. The guest must be stopped.
    fn capture(&mut self, full_ram: bool, out: &mut Staged, t: &mut PauseTimes) -> Result<()> {
        out.clear();
        let at = Instant::now();
        self.scratch.clear();
        self.scanner
            .scan(self.qemu_ram.clone(), Rearm::Yes, &mut self.scratch)
            .context("scan")?;
        if full_ram {
            self.scratch.clear();
            self.scratch.push(0..self.ram.len as u64);
        }
        let scanned = Instant::now();
        t.scan += scanned - at;
        let ram = self.ram.bytes();
        for r in &self.scratch {
            out.data
                .extend_from_slice(&ram[r.start as usize..r.end as usize]);
            out.runs.push(r.clone());
        }
        let copied = Instant::now();
        t.copy += copied - scanned;
        t.pages += out.pages();
        self.qmp
            .save_device_state(&self.spec.device_file)
            .context("device state")?;
        let dev = std::fs::File::open(&self.spec.device_file)
            .with_context(|| format!("open {}", self.spec.device_file.display()))?;
        let len = dev.metadata()?.len();
        ensure!(
            len <= MAX_DEVICE_STATE,
            "device state of {len} bytes exceeds {MAX_DEVICE_STATE}"
        );
        std::io::Read::read_to_end(&mut &dev, &mut out.device).context("read device state")?;
        t.device += copied.elapsed();
        Ok(())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.spec.device_file);
    }
}

/// One guest's part of one epoch: its written pages (as runs of RAM offsets,
/// with their bytes concatenated) and its device state.
#[derive(Default)]
pub struct Staged {
    pub runs: Vec<Range<u64>>,
    pub data: Vec<u8>,
    pub device: Vec<u8>,
}

impl Staged {
    fn clear(&mut self) {
        self.runs.clear();
        self.data.clear();
        self.device.clear();
    }

    /// Pages staged.
    pub fn pages(&self) -> u64 {
        self.data.len() as u64 / pipecloud_core::wire::PAGE_SIZE
    }

    /// The checkpoint frames of this guest's part of `epoch`
    /// (`Begin`, `Pages`*, `Device`*, `End`; each chunk at most
    /// [`MAX_WRITE_PAYLOAD`] bytes of pages), handed to `emit` in order. The
    /// pages are compressed against `shadow`, the guest's copies of the pages
    /// last shipped on this connection (`pipecloud_core::pagecodec`; the caller
    /// keeps it on the connection's generation).
    pub fn frames(
        &self,
        machine: &str,
        epoch: u64,
        ram_bytes: u64,
        shadow: &mut Shadow,
        mut emit: impl FnMut(Checkpoint) -> Result<()>,
    ) -> Result<()> {
        emit(Checkpoint::Begin {
            machine: machine.to_owned(),
            epoch,
            ram_bytes,
        })?;
        let mut at = 0usize;
        for r in &self.runs {
            let mut off = r.start;
            while off < r.end {
                let n = (r.end - off).min(MAX_WRITE_PAYLOAD as u64) as usize;
                shadow.encode(off, &self.data[at..at + n], |offset, encoding, data| {
                    emit(Checkpoint::Pages {
                        epoch,
                        offset,
                        encoding,
                        data,
                    })
                })?;
                at += n;
                off += n as u64;
            }
        }
        for (i, chunk) in self.device.chunks(MAX_WRITE_PAYLOAD).enumerate() {
            emit(Checkpoint::Device {
                epoch,
                offset: (i * MAX_WRITE_PAYLOAD) as u64,
                data: chunk.to_vec(),
            })?;
        }
        emit(Checkpoint::End {
            epoch,
            pages: self.pages(),
            device_bytes: self.device.len() as u64,
        })
    }
}

/// Where the time of one pause went (summed over the group's guests).
#[derive(Debug, Default, Clone, Copy)]
pub struct PauseTimes {
    pub stop: Duration,
    pub scan: Duration,
    pub copy: Duration,
    pub device: Duration,
    pub cont: Duration,
    /// From the first `stop` sent to the last `cont` answered.
    pub total: Duration,
    pub pages: u64,
}

/// One pause of the group (module doc). `open_epoch` runs once every guest is
/// stopped: it opens the next epoch and says whether this one ships the whole RAM.
/// `staged[i]` receives guest `i`'s part.
pub fn pause_group(
    guests: &mut [Guest],
    staged: &mut [Staged],
    open_epoch: impl FnOnce() -> Result<bool>,
) -> Result<PauseTimes> {
    assert_eq!(guests.len(), staged.len(), "one staging buffer per guest");
    let mut t = PauseTimes::default();
    let began = Instant::now();
    let mut stopped = 0;
    let result: Result<()> = (|| {
        for g in guests.iter_mut() {
            g.qmp
                .stop()
                .with_context(|| format!("guest {}: stop", g.spec.name))?;
            stopped += 1;
        }
        t.stop = began.elapsed();
        let full_ram = open_epoch()?;
        for (g, s) in guests.iter_mut().zip(staged.iter_mut()) {
            g.capture(full_ram, s, &mut t)
                .with_context(|| format!("guest {}: capture", g.spec.name))?;
        }
        Ok(())
    })();
    let conting = Instant::now();
    let mut cont_err = None;
    for g in guests.iter_mut().take(stopped) {
        if let Err(e) = g.qmp.cont() {
            cont_err.get_or_insert(e.context(format!("guest {}: cont", g.spec.name)));
        }
    }
    t.cont = conting.elapsed();
    t.total = began.elapsed();
    result?;
    match cont_err {
        Some(e) => Err(e),
        None => Ok(t),
    }
}
