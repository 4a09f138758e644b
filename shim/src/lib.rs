//! # pipecloud-shim: dirty-page tracking inside QEMU, set up by a preload library
//!
//! The full-state mode (docs/design.md §9) must know, at each pause, exactly which
//! guest RAM pages changed since the previous pause. Linux offers this for a
//! *foreign* process only through the `PAGEMAP_SCAN` ioctl on `/proc/PID/pagemap`,
//! and only for memory that the owning process registered with a userfaultfd in
//! write-protect **async** mode (soft-dirty is compiled out of this kernel). The
//! registration must be done by the process that owns the mapping — QEMU — which
//! has no such option. So this library is preloaded into QEMU
//! (`LD_PRELOAD=libpipecloud_shim.so`) and interposes `mmap`/`mmap64`:
//!
//! * every call goes straight to the kernel (`syscall(SYS_mmap)`, no `dlsym`, so
//!   no allocation or recursion while the loader is still resolving symbols);
//! * when a **shared** mapping of the file named by `PIPECLOUD_SHIM_RAM_FILE` is
//!   created (matched by device and inode of the fd, so any path spelling works),
//!   the new range is registered with a userfaultfd (`UFFD_FEATURE_WP_ASYNC` +
//!   `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`, `UFFDIO_REGISTER_MODE_WP`) and the whole
//!   range is write-protected. In async mode a write to a protected page never
//!   blocks the writer and produces no message: the kernel just lifts the
//!   protection and the page reads as "written" in `PAGEMAP_SCAN` until the agent
//!   re-protects it (`PM_SCAN_WP_MATCHING`). The userfaultfd is kept open (close
//!   would drop the registration) and is `O_CLOEXEC`.
//!
//! Failure is loud, never silent: if the kernel lacks a feature or a step fails,
//! the shim writes one line to stderr, unmaps the range and returns `MAP_FAILED`
//! (`errno` = the failing step's), so QEMU refuses to start ("unable to map
//! backing store"). A guest whose RAM is not tracked would make checkpoints that
//! silently miss pages. The agent checks the other side as well: its scans use
//! `PM_SCAN_CHECK_WPASYNC`, which fails on any page not registered this way.
//!
//! Only writes through this mapping are tracked (QEMU's vCPUs and its device
//! emulation both use it). The code in the `mmap` path makes only raw system
//! calls, `getenv` and stack formatting: no allocation, no locks.
//! x86_64 and aarch64 Linux (the `ioctl` numbers below are the generic encoding).

#![allow(clippy::missing_safety_doc)]

use core::ffi::{c_int, c_long, c_void};
use core::fmt::Write as _;
use core::sync::atomic::{AtomicU32, Ordering};

/// Environment variable naming the guest RAM file (the `mem-path` of QEMU's
/// `memory-backend-file`).
pub const ENV_RAM_FILE: &str = "PIPECLOUD_SHIM_RAM_FILE";
const ENV_RAM_FILE_C: &[u8] = b"PIPECLOUD_SHIM_RAM_FILE\0";

// --- userfaultfd ABI (include/uapi/linux/userfaultfd.h) --------------------
const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFD_FEATURES_NEEDED: u64 = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}
#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `_IOWR(type, nr, size)` of the generic ioctl encoding.
const fn iowr(ty: u64, nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
const UFFDIO_API: u64 = iowr(0xAA, 0x3F, core::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0xAA, 0x00, core::mem::size_of::<UffdioRegister>());
const UFFDIO_WRITEPROTECT: u64 = iowr(0xAA, 0x06, core::mem::size_of::<UffdioWriteprotect>());

/// Mappings registered so far (for the one log line per mapping, and tests).
static REGISTERED: AtomicU32 = AtomicU32::new(0);

/// A failed registration step: its name and `errno`.
struct StepError(&'static str, c_int);

fn errno() -> c_int {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Interposed `mmap` (see the module doc).
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    // The real mmap. syscall() returns -1 and sets errno on failure: the same contract
    // as mmap's MAP_FAILED ((void *)-1).
    let p = libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) as *mut c_void;
    if p == libc::MAP_FAILED || fd < 0 || !is_shared(flags) || !is_ram_file(fd) {
        return p;
    }
    match register(p, len) {
        Ok(()) => {
            let n = REGISTERED.fetch_add(1, Ordering::Relaxed) + 1;
            log(format_args!(
                "pipecloud-shim: guest RAM {:#x}+{:#x} write-protect tracked (mapping {n})",
                p as usize, len
            ));
            p
        }
        Err(StepError(step, e)) => {
            log(format_args!(
                "pipecloud-shim: FATAL: cannot track guest RAM {:#x}+{:#x}: {step} failed (errno {e}); \
                 the kernel needs userfaultfd WP_ASYNC + WP_HUGETLBFS_SHMEM (Linux >= 6.7); \
                 refusing the mapping so that the guest does not run untracked",
                p as usize, len
            ));
            libc::syscall(libc::SYS_munmap, p, len);
            *libc::__errno_location() = e;
            libc::MAP_FAILED
        }
    }
}

/// Interposed `mmap64` (the same call on 64-bit Linux).
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    mmap(addr, len, prot, flags, fd, off)
}

fn is_shared(flags: c_int) -> bool {
    let ty = flags & 0x0f; // MAP_TYPE
    ty == libc::MAP_SHARED || ty == libc::MAP_SHARED_VALIDATE
}

/// Whether `fd` is the file named by [`ENV_RAM_FILE`] (same device and inode).
unsafe fn is_ram_file(fd: c_int) -> bool {
    let path = libc::getenv(ENV_RAM_FILE_C.as_ptr().cast());
    if path.is_null() {
        return false;
    }
    let mut want: libc::stat = core::mem::zeroed();
    let mut have: libc::stat = core::mem::zeroed();
    if libc::stat(path, &mut want) != 0 || libc::fstat(fd, &mut have) != 0 {
        return false;
    }
    want.st_dev == have.st_dev && want.st_ino == have.st_ino
}

/// Registers `[p, p+len)` with a new userfaultfd in WP-async mode and protects it.
unsafe fn register(p: *mut c_void, len: usize) -> Result<(), StepError> {
    let page = libc::sysconf(libc::_SC_PAGESIZE).max(4096) as usize;
    let len = len.div_ceil(page) * page;
    // Probe the supported features on a first descriptor (UFFDIO_API may be
    // called once per descriptor), then open the real one.
    let probe = new_uffd()?;
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    let r = libc::ioctl(probe, UFFDIO_API as _, &mut api);
    let e = errno();
    libc::close(probe);
    if r != 0 {
        return Err(StepError("UFFDIO_API probe", e));
    }
    if api.features & UFFD_FEATURES_NEEDED != UFFD_FEATURES_NEEDED {
        return Err(StepError(
            "feature check (WP_ASYNC, WP_HUGETLBFS_SHMEM)",
            libc::ENOTSUP,
        ));
    }
    let uffd = new_uffd()?;
    let fail = |step: &'static str| {
        let e = errno();
        libc::close(uffd);
        Err(StepError(step, e))
    };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURES_NEEDED,
        ioctls: 0,
    };
    if libc::ioctl(uffd, UFFDIO_API as _, &mut api) != 0 {
        return fail("UFFDIO_API");
    }
    let range = || UffdioRange {
        start: p as u64,
        len: len as u64,
    };
    let mut reg = UffdioRegister {
        range: range(),
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    if libc::ioctl(uffd, UFFDIO_REGISTER as _, &mut reg) != 0 {
        return fail("UFFDIO_REGISTER (mode WP)");
    }
    let mut wp = UffdioWriteprotect {
        range: range(),
        mode: UFFDIO_WRITEPROTECT_MODE_WP,
    };
    if libc::ioctl(uffd, UFFDIO_WRITEPROTECT as _, &mut wp) != 0 {
        return fail("UFFDIO_WRITEPROTECT");
    }
    // `uffd` stays open for the life of the process: closing it unregisters.
    Ok(())
}

unsafe fn new_uffd() -> Result<c_int, StepError> {
    let fd = libc::syscall(
        libc::SYS_userfaultfd,
        (libc::O_CLOEXEC | libc::O_NONBLOCK) as c_long,
    );
    if fd < 0 {
        Err(StepError("userfaultfd()", errno()))
    } else {
        Ok(fd as c_int)
    }
}

/// Writes one line to stderr from a stack buffer (no allocation).
fn log(args: core::fmt::Arguments<'_>) {
    struct Buf {
        bytes: [u8; 512],
        len: usize,
    }
    impl core::fmt::Write for Buf {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            let room = self.bytes.len() - 1 - self.len;
            let n = s.len().min(room);
            self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
            self.len += n;
            Ok(())
        }
    }
    let mut b = Buf {
        bytes: [0; 512],
        len: 0,
    };
    let _ = b.write_fmt(args);
    b.bytes[b.len] = b'\n';
    // SAFETY: writing a valid stack buffer to fd 2.
    unsafe {
        libc::write(2, b.bytes.as_ptr().cast(), b.len + 1);
    }
}
