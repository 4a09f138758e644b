//! Loop devices that cannot outlive their users.
//!
//! A device attached with `losetup` stays bound until someone runs `losetup -d`: a
//! process SIGKILLed between the two leaks it for good, and once the private mount
//! namespace that held its backing file (a FUSE mount) is gone, the device's
//! `backing_file` no longer even names the directory it came from (it reads `/disk`).
//!
//! [`LoopDevice::attach`] binds with `LO_FLAGS_AUTOCLEAR` (`LOOP_CONFIGURE`, Linux ≥ 5.8):
//! the kernel detaches the device when its last opener closes it. The value returned
//! holds the device open, and a mount of it holds it too, so the device lives exactly as
//! long as its holder or a mount of it; a mount in a private mount namespace goes away
//! when the namespace's last process dies, however it dies. `pipecloud-loop attach` is
//! the same for scripts: it holds the device while a command runs.
//!
//! Stale devices of an earlier run (a kernel that kept one, a device attached some other
//! way) are reaped by [`reap_stale`], which touches only devices whose backing file's
//! name is [`owned_name`]'s: `pcloop-<pid>-<tag>`, where `<pid>` is the process whose
//! life bounds the device's use and is gone. The name survives the loss of the
//! namespace (the kernel keeps the file's own name), and a device someone else uses,
//! or one of a live process, is never touched.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

// <linux/loop.h>; the libc crate does not carry them.
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Prefix of the backing-file names [`reap_stale`] may act on.
pub const OWNED_PREFIX: &str = "pcloop-";

/// The backing-file name for a device whose use ends with process `pid`:
/// `pcloop-<pid>-<tag>` (`tag` should be unique within that process).
pub fn owned_name(pid: u32, tag: &str) -> String {
    format!("{OWNED_PREFIX}{pid}-{tag}")
}

/// How to attach.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttachOptions {
    /// Open the backing file with `O_DIRECT` (no second page cache; what `losetup
    /// --direct-io=on` does).
    pub direct_io: bool,
    /// A read-only device.
    pub read_only: bool,
}

/// An attached, auto-clearing loop device, held open (see the module docs). Dropping it
/// closes the holder's descriptor: the kernel detaches the device then, or when its
/// last mount goes.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    _held: File,
}

impl LoopDevice {
    /// Attaches `backing` to a free loop device with `LO_FLAGS_AUTOCLEAR`.
    pub fn attach(backing: &Path, opts: AttachOptions) -> Result<LoopDevice> {
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(backing)
            .with_context(|| format!("opening {} to back a loop device", backing.display()))?;
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .context("opening /dev/loop-control (load the loop driver: modprobe loop)")?;
        let mut flags = LO_FLAGS_AUTOCLEAR;
        if opts.direct_io {
            flags |= LO_FLAGS_DIRECT_IO;
        }
        if opts.read_only {
            flags |= LO_FLAGS_READ_ONLY;
        }
        // Another process may take the free device between GET_FREE and CONFIGURE.
        for _ in 0..64 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
            let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
            if n < 0 {
                return Err(io::Error::last_os_error()).context("LOOP_CTL_GET_FREE");
            }
            let path = PathBuf::from(format!("/dev/loop{n}"));
            let dev = OpenOptions::new()
                .read(true)
                .write(!opts.read_only)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            let mut cfg = LoopConfig {
                fd: file.as_raw_fd() as u32,
                block_size: 0,
                info: LoopInfo64 {
                    lo_device: 0,
                    lo_inode: 0,
                    lo_rdevice: 0,
                    lo_offset: 0,
                    lo_sizelimit: 0,
                    lo_number: 0,
                    lo_encrypt_type: 0,
                    lo_encrypt_key_size: 0,
                    lo_flags: flags,
                    lo_file_name: [0; LO_NAME_SIZE],
                    lo_crypt_name: [0; LO_NAME_SIZE],
                    lo_encrypt_key: [0; 32],
                    lo_init: [0; 2],
                },
                reserved: [0; 8],
            };
            let name = backing.as_os_str().as_encoded_bytes();
            let len = name.len().min(LO_NAME_SIZE - 1);
            cfg.info.lo_file_name[..len].copy_from_slice(&name[..len]);
            // SAFETY: `cfg` is a valid `struct loop_config` that outlives the call.
            let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &cfg) };
            if r == 0 {
                return Ok(LoopDevice { path, _held: dev });
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) {
                return Err(e).with_context(|| {
                    format!(
                        "LOOP_CONFIGURE {} on {} (needs Linux >= 5.8 and root)",
                        path.display(),
                        backing.display()
                    )
                });
            }
        }
        bail!("no free loop device stayed free for {}", backing.display())
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Loop devices and their backing files (`/dev/loopN`, as the kernel shows the file).
pub fn list() -> Vec<(PathBuf, String)> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let b = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            let dev = PathBuf::from(format!("/dev/{}", e.file_name().to_string_lossy()));
            Some((dev, b.trim_end_matches('\n').to_string()))
        })
        .collect()
}

/// The pid in an [`owned_name`] backing file (any directory, a ` (deleted)` suffix allowed).
pub fn owner_pid(backing: &str) -> Option<u32> {
    let b = backing.strip_suffix(" (deleted)").unwrap_or(backing);
    let name = b.rsplit('/').next()?;
    let rest = name.strip_prefix(OWNED_PREFIX)?;
    rest.split_once('-')?.0.parse().ok()
}

/// Devices backed by an [`owned_name`] file whose process is gone.
pub fn stale() -> Vec<(PathBuf, String)> {
    list()
        .into_iter()
        .filter(|(_, b)| owner_pid(b).is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()))
        .collect()
}

/// Detaches every [`stale`] device (a mounted one is marked auto-clearing instead: it
/// goes with its mount); returns those it acted on.
pub fn reap_stale() -> Vec<PathBuf> {
    let mut done = Vec::new();
    for (dev, backing) in stale() {
        let r = File::open(&dev).and_then(|f| {
            // SAFETY: LOOP_CLR_FD takes no argument.
            match unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD as _, 0) } {
                0 => Ok(()),
                _ => Err(io::Error::last_os_error()),
            }
        });
        match r {
            Ok(()) => {
                eprintln!("loopdev: reaped stale {} ({backing})", dev.display());
                done.push(dev);
            }
            // ENXIO: already detached (raced with the kernel's autoclear).
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
            Err(e) => eprintln!("loopdev: cannot detach stale {}: {e}", dev.display()),
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_owned_names() {
        assert_eq!(owner_pid("/a/b/pcloop-123-disk"), Some(123));
        assert_eq!(owner_pid("/pcloop-9-x-y (deleted)"), Some(9));
        assert_eq!(owner_pid(&owned_name(42, "t")), Some(42));
        assert_eq!(owner_pid("/disk"), None);
        assert_eq!(owner_pid("/x/pcloop-abc-disk"), None);
        assert_eq!(owner_pid("/x/pcloop-12"), None);
    }

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
