//! The `bpf(2)` calls the kernel tagger needs: maps (hash, mmap-able array,
//! ring buffer), program load (with the verifier's log on failure), TCX links,
//! and test runs. Thin wrappers; every object is an [`OwnedFd`] and goes away
//! with it (a TCX link detaches its program when its descriptor closes, so a
//! killed agent leaves nothing attached).

use super::asm::Insn;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;

/// `BPF_MAP_TYPE_HASH`.
pub const MAP_HASH: u32 = 1;
/// `BPF_MAP_TYPE_ARRAY`.
pub const MAP_ARRAY: u32 = 2;
/// `BPF_MAP_TYPE_PERCPU_ARRAY`.
pub const MAP_PERCPU_ARRAY: u32 = 6;
/// `BPF_MAP_TYPE_RINGBUF`.
pub const MAP_RINGBUF: u32 = 27;
/// `BPF_F_MMAPABLE`.
pub const F_MMAPABLE: u32 = 1 << 10;
/// `BPF_PROG_TYPE_SCHED_CLS`.
pub const PROG_SCHED_CLS: u32 = 3;
/// `BPF_TCX_INGRESS`.
pub const TCX_INGRESS: u32 = 46;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a properly laid out, zero-padded `union bpf_attr`
    // prefix for `cmd`, valid for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd_of(rc: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(rc as RawFd) }
}

fn name16(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (o, b) in out.iter_mut().zip(
        name.bytes()
            .filter(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .take(15),
    ) {
        *o = b;
    }
    out
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// A map.
#[derive(Debug)]
pub struct Map {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl Map {
    /// Creates a map.
    pub fn create(
        name: &str,
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        flags: u32,
    ) -> io::Result<Map> {
        let mut a = MapCreateAttr {
            map_type,
            key_size,
            value_size,
            max_entries,
            map_flags: flags,
            map_name: name16(name),
            ..Default::default()
        };
        let rc = bpf(BPF_MAP_CREATE, &mut a)
            .map_err(|e| io::Error::new(e.kind(), format!("creating BPF map {name}: {e}")))?;
        Ok(Map {
            fd: fd_of(rc),
            key_size: key_size as usize,
            value_size: value_size as usize,
        })
    }

    /// The descriptor (for `ld_map_fd` and `poll(2)`).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Inserts or replaces `key`'s value.
    pub fn update(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        if key.len() != self.key_size || value.len() != self.value_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "BPF map key or value of the wrong size",
            ));
        }
        let mut a = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            pad: 0,
            key: key.as_ptr() as u64,
            value: value.as_ptr() as u64,
            flags: 0,
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(|_| ())
    }
}

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// Loads a program; on a verifier rejection the error carries the log's tail.
pub fn load_program(name: &str, prog_type: u32, insns: &[Insn]) -> io::Result<OwnedFd> {
    const LICENSE: &[u8] = b"Apache-2.0\0";
    let mut log = vec![0u8; 1 << 20];
    let mut a = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        prog_name: name16(name),
        ..Default::default()
    };
    match bpf(BPF_PROG_LOAD, &mut a) {
        Ok(rc) => Ok(fd_of(rc)),
        Err(first) => {
            // Load again with the log on, for the message.
            a.log_level = 1;
            a.log_size = log.len() as u32;
            a.log_buf = log.as_mut_ptr() as u64;
            if let Ok(rc) = bpf(BPF_PROG_LOAD, &mut a) {
                return Ok(fd_of(rc));
            }
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(io::Error::new(
                first.kind(),
                format!("loading BPF program {name}: {first}\n{}", tail.join("\n")),
            ))
        }
    }
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative: u32,
    pad: u32,
    expected_revision: u64,
}

/// Attaches `prog` to interface `ifindex` (in the calling thread's network
/// namespace) as a TCX program of `attach_type`, appended after the programs
/// already there. Closing the returned link detaches it.
pub fn tcx_attach(prog: &OwnedFd, ifindex: u32, attach_type: u32) -> io::Result<OwnedFd> {
    let mut a = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type,
        ..Default::default()
    };
    bpf(BPF_LINK_CREATE, &mut a).map(fd_of)
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// Explicit, so it is zero: the kernel rejects non-zero bytes past the
    /// last field it knows.
    pad: u32,
}

/// What one test run returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value.
    pub retval: i32,
    /// The frame as the program left it.
    pub data: Vec<u8>,
    /// `skb->mark` afterwards.
    pub mark: u32,
}

/// Runs `prog` once on the frame `data` (`BPF_PROG_TEST_RUN`, `skb->mark` 0).
pub fn test_run(prog: &OwnedFd, data: &[u8]) -> io::Result<TestRun> {
    /// Room for `struct __sk_buff` (the kernel copies what it has).
    const CTX_LEN: usize = 512;
    const SKB_MARK: usize = 8;
    let mut out = vec![0u8; data.len() + 256];
    let mut ctx = vec![0u8; CTX_LEN];
    let mut a = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: data.len() as u32,
        data_size_out: out.len() as u32,
        data_in: data.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ctx_size_out: CTX_LEN as u32,
        ctx_out: ctx.as_mut_ptr() as u64,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut a)?;
    out.truncate(a.data_size_out as usize);
    let mark = u32::from_ne_bytes([
        ctx[SKB_MARK],
        ctx[SKB_MARK + 1],
        ctx[SKB_MARK + 2],
        ctx[SKB_MARK + 3],
    ]);
    Ok(TestRun {
        retval: a.retval as i32,
        data: out,
        mark,
    })
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096).max(4096)
}

/// A shared memory mapping of a map, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all access goes through atomics.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(fd: RawFd, len: usize, prot: libc::c_int, offset: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh shared mapping of a BPF map descriptor; the kernel
        // checks length, offset and protection.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The mmap-able array `map` (`entries` values of `value_size` bytes), read-write.
    pub fn array(map: &Map, entries: usize) -> io::Result<Mapping> {
        let len = (map.value_size * entries).div_ceil(page_size()) * page_size();
        Mapping::new(map.raw_fd(), len, libc::PROT_READ | libc::PROT_WRITE, 0)
    }

    /// The 64-bit word at byte `off` (8-aligned, inside the mapping).
    pub fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(
            off.is_multiple_of(8) && off + 8 <= self.len,
            "mapping offset {off}"
        );
        // SAFETY: in bounds and aligned (checked); the memory lives as long as
        // `self` and is only accessed atomically.
        unsafe { &*(self.ptr.add(off) as *const AtomicU64) }
    }

    /// The 32-bit word at byte `off` (4-aligned, inside the mapping).
    pub fn u32_at(&self, off: usize) -> &AtomicU32 {
        assert!(
            off.is_multiple_of(4) && off + 4 <= self.len,
            "mapping offset {off}"
        );
        // SAFETY: as in `u64_at`.
        unsafe { &*(self.ptr.add(off) as *const AtomicU32) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The consumer side of a `BPF_MAP_TYPE_RINGBUF` (one consumer at a time:
/// callers serialise [`RingConsumer::consume`]).
#[derive(Debug)]
pub struct RingConsumer {
    consumer: Mapping,
    /// Producer position page, then the data area mapped twice.
    producer: Mapping,
    page: usize,
    mask: u64,
}

const RINGBUF_BUSY: u32 = 1 << 31;
const RINGBUF_DISCARD: u32 = 1 << 30;
const RINGBUF_HDR: u64 = 8;

impl RingConsumer {
    /// Maps ring buffer `map` of `size` bytes (its `max_entries`).
    pub fn new(map: &Map, size: usize) -> io::Result<RingConsumer> {
        let page = page_size();
        let consumer = Mapping::new(map.raw_fd(), page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(map.raw_fd(), page + 2 * size, libc::PROT_READ, page)?;
        Ok(RingConsumer {
            consumer,
            producer,
            page,
            mask: size as u64 - 1,
        })
    }

    /// Whether records are waiting.
    pub fn has_records(&self) -> bool {
        let cons = self.consumer.u64_at(0).load(Ordering::Relaxed);
        let prod = self.producer.u64_at(0).load(Ordering::Acquire);
        cons < prod
    }

    /// Hands every committed record to `f`, in order, and frees them. Returns
    /// how many there were. Stops at a record still being written.
    pub fn consume(&self, mut f: impl FnMut(&[u8])) -> usize {
        let cons_pos = self.consumer.u64_at(0);
        let mut cons = cons_pos.load(Ordering::Relaxed);
        let mut n = 0;
        loop {
            let prod = self.producer.u64_at(0).load(Ordering::Acquire);
            if cons >= prod {
                break;
            }
            let at = self.page + (cons & self.mask) as usize;
            let hdr = self.producer.u32_at(at).load(Ordering::Acquire);
            if hdr & RINGBUF_BUSY != 0 {
                break;
            }
            let len = u64::from(hdr & !(RINGBUF_BUSY | RINGBUF_DISCARD));
            if hdr & RINGBUF_DISCARD == 0 {
                let start = at + RINGBUF_HDR as usize;
                // SAFETY: the kernel maps the data area twice, so a record
                // never wraps; `len` is at most the ring's size.
                let rec = unsafe {
                    std::slice::from_raw_parts(
                        self.producer.ptr.add(start),
                        (len as usize).min(self.producer.len - start),
                    )
                };
                f(rec);
                n += 1;
            }
            cons += (len + RINGBUF_HDR).div_ceil(8) * 8;
            cons_pos.store(cons, Ordering::Release);
        }
        n
    }
}
