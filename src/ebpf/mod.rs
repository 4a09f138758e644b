//! The kernel tagger: cross-host tagging and stripping, and the client-bound
//! fast path, in a TCX eBPF program in front of the NFQUEUE queues (issue 5;
//! why in [`crate::netfilter`], "GSO").
//!
//! The NFQUEUE tag queue copies every packet to the agent and back, cannot
//! take GSO super-packets (a resized GSO skb keeps a stale transport offset)
//! and so is slow for bulk streams. `bpf_skb_adjust_room` resizes the
//! network header in place, keeps the transport header and the checksum
//! offload state right and lowers the GSO segment size, so super-packets
//! pass whole and nothing leaves the kernel on the fast path.
//!
//! How causality is kept (docs/design.md, causality tracking):
//!
//! - **Tagging** needs the sender's pending vector. The agent publishes each
//!   local machine's vector, already encoded as the options area, into that
//!   machine's slot of an mmap-ed array map, under a sequence lock, every time
//!   the vector grows (from [`crate::causal::CausalState`], under the
//!   machine's lock, before the write that grew it completes to the guest).
//!   A packet the guest sends after that completion reads the new area.
//! - **Merging** needs the agent: the program puts each received tag into a
//!   ring buffer and counts it in the receiver's `received`; the agent merges
//!   the records (before any vector of that machine is read or grown: every
//!   access to the causal state drains first, and the driver thread drains
//!   when the ring buffer signals) and then sets the receiver's `drained`.
//!   While `received != drained` the program does not tag the receiver's own
//!   packets: they go to the NFQUEUE tag queue (the program leaves them
//!   unmarked), whose path drains first. So no packet leaves carrying a vector that lacks a merge
//!   its sender's stack has already seen.
//! - **Client-bound packets** pass at once when nothing needs holding: the
//!   agent keeps a per-machine "clear" flag (committed dominates pending,
//!   updated under the machine's lock with every change of either) and tells
//!   the program how many packets its netqueue holds and how many of the
//!   packets the program counted on their way to the hold queue it has
//!   decided; the program passes a packet only when the flag is set (or the
//!   hold is bypassed), no merge is pending, and nothing of the group is
//!   queued or held, so no flow is reordered. Else it counts the packet and
//!   leaves it to the hold queue.
//! - Everything the program does not handle falls back to the NFQUEUE queues
//!   with their full semantics (see [`prog`]).
//!
//! Needs `CAP_BPF` + `CAP_NET_ADMIN` and a kernel with TCX (6.6+). Attached at
//! the ingress of the interfaces that route to the group's machines (found
//! with `ip route get`), Ethernet only. Links close with the process: a killed
//! agent leaves no program behind (and its hold queue rules keep failing
//! closed).

pub mod arch;
pub mod asm;
pub mod prog;
pub mod sys;

use crate::causal::KernelTags;
use crate::netfilter::NetTopology;
use pipecloud_core::ipopt::RawTag;
use pipecloud_core::CountVector;
use prog::{MapFds, ProgParams, Stat};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Mutex;
use sys::{Map, Mapping, RingConsumer};

/// Default handled mark bit (`skb->mark`): set on the packets the program
/// handled; the rules pass those and queue the rest of a cross-host pair's
/// packets to the tag queue. Marks do not cross network namespaces (veth
/// scrubs them), so a guest cannot forge it.
pub const DEFAULT_HANDLED_MARK: u32 = 0x0200_0000;
/// Mark bit of client-bound packets the program counted on their way to the
/// hold queue: the agent counts them back when it has decided them.
pub const COUNTED_MARK: u32 = 0x0400_0000;
/// Ring buffer size: 256 KiB holds 5,000 records (48 bytes + 8 header). A full
/// ring sends packets to the NFQUEUE tag queue, which merges synchronously.
pub const RING_BYTES: usize = 256 << 10;
/// Upper bound on cross-host pairs in the pairs map.
const MAX_PAIRS: u32 = 4096;
/// Slot length that makes the program fall back (a vector that does not fit
/// the option: the NFQUEUE path drops such packets, counted).
const LEN_UNTAGGABLE: u32 = 0xffff;

/// Counters of the kernel tagger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KernelTagStats {
    /// Packets tagged in the kernel.
    pub tagged: u64,
    /// Packets stripped in the kernel.
    pub stripped: u64,
    /// Packets sent to the NFQUEUE tag queue instead.
    pub fallbacks: u64,
    /// Left untagged: the sender's vector was zero.
    pub untagged_zero: u64,
    /// Left untagged: pure TCP ACKs.
    pub pure_acks: u64,
    /// Arrived from another host without options.
    pub arrived_untagged: u64,
    /// Failed resizes or header writes (the packet fell back or was dropped).
    pub errors: u64,
    /// Tags recorded for the agent to merge (repeats of the last tag per CPU
    /// and pair are not recorded).
    pub records: u64,
    /// Client-bound packets passed at once (nothing to hold them for).
    pub hold_passed: u64,
    /// Client-bound packets left to the hold queue.
    pub hold_queued: u64,
}

/// The loaded program, its maps and links (see the module docs).
pub struct KernelTagger {
    group_id: u16,
    machines: usize,
    slots: Mapping,
    ring: RingConsumer,
    /// Serialises consumers of `ring` (checking it needs no lock).
    ring_consumer: Mutex<()>,
    ring_map: Map,
    prog: OwnedFd,
    links: Mutex<Vec<(String, OwnedFd)>>,
    // Kept alive for the program.
    _slots_map: Map,
    _pairs: Map,
    _hosts: Map,
    _last: Map,
}

impl std::fmt::Debug for KernelTagger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelTagger")
            .field("group_id", &self.group_id)
            .field("machines", &self.machines)
            .field("interfaces", &self.interfaces())
            .finish()
    }
}

impl KernelTagger {
    /// Creates the maps and loads the program for `host`'s view of `topo`.
    /// Attaches nothing yet. Refuses (`Unsupported`) any architecture but
    /// x86-64 (see [`arch`]).
    pub fn load(topo: &NetTopology, host: &str, handled_mark: u32) -> io::Result<KernelTagger> {
        arch::kernel_tagger_supported(std::env::consts::ARCH)
            .map_err(|e| io::Error::new(io::ErrorKind::Unsupported, e))?;
        let machines = topo.machines.len();
        let entries = u32::try_from(machines + 1).map_err(io::Error::other)?;
        let slots_map = Map::create(
            "pc_slots",
            sys::MAP_ARRAY,
            4,
            prog::SLOT_SIZE as u32,
            entries,
            sys::F_MMAPABLE,
        )?;
        let slots = Mapping::array(&slots_map, machines + 1)?;
        let pairs = Map::create(
            "pc_pairs",
            sys::MAP_HASH,
            8,
            prog::PAIR_VALUE_SIZE as u32,
            MAX_PAIRS,
            0,
        )?;
        let last = Map::create(
            "pc_last",
            sys::MAP_PERCPU_ARRAY,
            4,
            prog::LAST_SIZE as u32,
            MAX_PAIRS,
            0,
        )?;
        let hosts = Map::create(
            "pc_hosts",
            sys::MAP_HASH,
            4,
            prog::HOST_VALUE_SIZE as u32,
            entries,
            0,
        )?;
        for (i, m) in topo.machines.iter().enumerate() {
            let mut value = [0u8; prog::HOST_VALUE_SIZE];
            value[0..4].copy_from_slice(&(i as u32).to_ne_bytes());
            value[4..8].copy_from_slice(&u32::from(m.host == host).to_ne_bytes());
            hosts.update(&m.ip.octets(), &value)?;
        }
        let ring_map = Map::create("pc_ring", sys::MAP_RINGBUF, 0, 0, RING_BYTES as u32, 0)?;
        let ring = RingConsumer::new(&ring_map, RING_BYTES)?;
        let mut n = 0u32;
        for (kind, s, d) in cross_host_pairs(topo, host) {
            let index = if kind == prog::KIND_TAG { s } else { d };
            let key = pair_key(topo.machines[s].ip, topo.machines[d].ip);
            let mut value = [0u8; prog::PAIR_VALUE_SIZE];
            value[0..4].copy_from_slice(&kind.to_ne_bytes());
            value[4..8].copy_from_slice(&(index as u32).to_ne_bytes());
            value[8..12].copy_from_slice(&n.to_ne_bytes());
            pairs.update(&key, &value)?;
            n += 1;
            if n >= MAX_PAIRS {
                return Err(io::Error::other("more cross-host pairs than the map holds"));
            }
        }
        let fds = MapFds {
            pairs: pairs.raw_fd(),
            hosts: hosts.raw_fd(),
            slots: slots_map.raw_fd(),
            ring: ring_map.raw_fd(),
            last: last.raw_fd(),
        };
        let params = ProgParams {
            group_id: topo.group_id,
            handled_mark,
            counted_mark: COUNTED_MARK,
            stats_row: machines as u32,
        };
        let insns = prog::program(&fds, &params).map_err(io::Error::other)?;
        let prog = sys::load_program("pipecloud_tag", sys::PROG_SCHED_CLS, &insns)?;
        Ok(KernelTagger {
            group_id: topo.group_id,
            machines,
            slots,
            ring,
            ring_consumer: Mutex::new(()),
            ring_map,
            prog,
            links: Mutex::new(Vec::new()),
            _slots_map: slots_map,
            _pairs: pairs,
            _hosts: hosts,
            _last: last,
        })
    }

    /// The program (for test runs).
    pub fn program_fd(&self) -> &OwnedFd {
        &self.prog
    }

    /// Attaches the program at the TCX ingress of interface `name` (in the
    /// calling thread's network namespace).
    pub fn attach(&self, name: &str) -> io::Result<()> {
        let ifindex = crate::netfilter::interface_index(name)?;
        let link = sys::tcx_attach(&self.prog, ifindex, sys::TCX_INGRESS).map_err(|e| {
            io::Error::new(e.kind(), format!("attaching the tagger to {name}: {e}"))
        })?;
        lock(&self.links).push((name.to_owned(), link));
        Ok(())
    }

    /// Attaches the program to every Ethernet interface that routes to a
    /// machine of `topo` (local machines: their own link; remote ones: the
    /// uplink). Call it inside the host's network namespace. Returns the
    /// interfaces. Machines without a route are skipped with a warning (their
    /// packets keep using the tag queue).
    pub fn attach_routes(&self, topo: &NetTopology) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = Vec::new();
        for m in &topo.machines {
            match crate::netfilter::route_device(m.ip) {
                Ok(dev) if !names.contains(&dev) => names.push(dev),
                Ok(_) => {}
                // Its packets are not seen by the program, so not marked: the
                // rules send them to the tag queue. Slower, not unsafe.
                Err(e) => tracing::warn!(machine = %m.name, "kernel tagger: {e}"),
            }
        }
        let mut attached = Vec::new();
        for n in names {
            if !is_ethernet(&n)? {
                tracing::warn!(
                    interface = %n,
                    "kernel tagger: not Ethernet (needs a 14-byte link header); its packets use the tag queue"
                );
                continue;
            }
            self.attach(&n)?;
            attached.push(n);
        }
        Ok(attached)
    }

    /// Interfaces the program is attached to.
    pub fn interfaces(&self) -> Vec<String> {
        lock(&self.links).iter().map(|(n, _)| n.clone()).collect()
    }

    /// The ring buffer's descriptor (readable when records wait).
    pub fn ring_fd(&self) -> RawFd {
        self.ring_map.raw_fd()
    }

    fn slot_off(&self, machine: usize) -> usize {
        machine * prog::SLOT_SIZE
    }

    /// The counters.
    pub fn stats(&self) -> KernelTagStats {
        let row = self.slot_off(self.machines);
        let g = |s: Stat| {
            self.slots
                .u64_at(row + 8 * s as usize)
                .load(Ordering::Relaxed)
        };
        KernelTagStats {
            tagged: g(Stat::Tagged),
            stripped: g(Stat::Stripped),
            fallbacks: g(Stat::Fallback),
            untagged_zero: g(Stat::UntaggedZero),
            pure_acks: g(Stat::PureAck),
            arrived_untagged: g(Stat::ArrivedUntagged),
            errors: g(Stat::Errors),
            records: g(Stat::Records),
            hold_passed: g(Stat::HoldPassed),
            hold_queued: g(Stat::HoldQueued),
        }
    }

    fn row_word(&self, off: usize) -> &std::sync::atomic::AtomicU64 {
        self.slots.u64_at(self.slot_off(self.machines) + off)
    }

    /// The group's hold is bypassed (modes async/sync) or not. Call it after
    /// the agent released what it held when turning the bypass on.
    pub fn set_bypass(&self, on: bool) {
        self.row_word(prog::ROW_BYPASS)
            .store(u64::from(on), Ordering::Release);
    }

    /// Client-bound packets the program has counted on their way to the
    /// hold queue.
    pub fn to_hold(&self) -> u64 {
        self.row_word(prog::ROW_TO_HOLD).load(Ordering::Acquire)
    }

    /// Raises the agent's decided count to `n` (see the driver's resync:
    /// only when nothing counted before `n` can still be on its way).
    pub fn hold_count_at_least(&self, n: u64) {
        self.row_word(prog::ROW_ARRIVED)
            .fetch_max(n, Ordering::Release);
    }

    /// The agent decided `counted` more of the packets the program counted
    /// (verdicts sent) and now holds `held` packets: publishes `held` first,
    /// then the count, so the program never sees the count without the
    /// packets it implies are held.
    pub fn hold_progress(&self, held: usize, counted: u64) {
        self.row_word(prog::ROW_USER_HELD)
            .store(held as u64, Ordering::Release);
        if counted > 0 {
            self.row_word(prog::ROW_ARRIVED)
                .fetch_add(counted, Ordering::Release);
        }
    }
}

impl KernelTags for KernelTagger {
    /// Writes `pending`'s options area into `machine`'s slot (sequence lock:
    /// odd while writing). Callers serialise per machine (the causal state
    /// calls this under the machine's lock).
    fn publish(&self, machine: usize, pending: &CountVector) {
        if machine >= self.machines {
            return;
        }
        let (area, len) = match RawTag::from_vector(pending) {
            Ok(t) if t.is_empty() => ([0u8; 40], 0u32),
            Ok(t) => {
                let (a, l) = t.area(self.group_id);
                (a, l as u32)
            }
            Err(_) => ([0u8; 40], LEN_UNTAGGABLE),
        };
        let base = self.slot_off(machine);
        let seq = self.slots.u32_at(base + prog::SLOT_SEQ);
        let s = seq.load(Ordering::Relaxed);
        seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        self.slots
            .u32_at(base + prog::SLOT_LEN)
            .store(len, Ordering::Relaxed);
        for (i, w) in area.chunks_exact(8).enumerate() {
            let v = u64::from_ne_bytes(w.try_into().unwrap_or([0; 8]));
            self.slots
                .u64_at(base + prog::SLOT_AREA + 8 * i)
                .store(v, Ordering::Relaxed);
        }
        fence(Ordering::Release);
        seq.store(s.wrapping_add(2), Ordering::Release);
    }

    fn set_clear(&self, machine: usize, clear: bool) {
        if machine < self.machines {
            self.slots
                .u32_at(self.slot_off(machine) + prog::SLOT_CLEAR)
                .store(u32::from(clear), Ordering::Release);
        }
    }

    fn needs_drain(&self) -> bool {
        if self.ring.has_records() {
            return true;
        }
        (0..self.machines).any(|m| {
            let b = self.slot_off(m);
            self.slots
                .u64_at(b + prog::SLOT_RECEIVED)
                .load(Ordering::Acquire)
                != self
                    .slots
                    .u64_at(b + prog::SLOT_DRAINED)
                    .load(Ordering::Relaxed)
        })
    }

    fn drain(&self, merge: &mut dyn FnMut(usize, &RawTag)) {
        let _consumer = lock(&self.ring_consumer);
        let received: Vec<u64> = (0..self.machines)
            .map(|m| {
                self.slots
                    .u64_at(self.slot_off(m) + prog::SLOT_RECEIVED)
                    .load(Ordering::Acquire)
            })
            .collect();
        self.ring.consume(|rec| {
            let Some((machine, area)) = parse_record(rec) else {
                return;
            };
            if machine >= self.machines {
                return;
            }
            match RawTag::from_area(area) {
                Ok((group, raw)) if group == self.group_id => merge(machine, &raw),
                // The program checks both; a mismatch cannot be merged safely
                // and cannot happen short of a bug: leave a trace.
                _ => tracing::warn!(machine, "kernel tagger recorded an unparsable tag"),
            }
        });
        for (m, r) in received.into_iter().enumerate() {
            self.slots
                .u64_at(self.slot_off(m) + prog::SLOT_DRAINED)
                .store(r, Ordering::Release);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `(receiver, area)` of a ring buffer record.
fn parse_record(rec: &[u8]) -> Option<(usize, &[u8])> {
    let machine = u32::from_ne_bytes(rec.get(0..4)?.try_into().ok()?);
    let len = u32::from_ne_bytes(rec.get(4..8)?.try_into().ok()?);
    let area = rec.get(8..8 + usize::try_from(len).ok()?)?;
    Some((usize::try_from(machine).ok()?, area))
}

/// Pairs-map key: source and destination address as they sit in the header.
fn pair_key(src: Ipv4Addr, dst: Ipv4Addr) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&src.octets());
    k[4..].copy_from_slice(&dst.octets());
    k
}

/// `(kind, source index, destination index)` of every cross-host pair that
/// involves a machine on `host`.
fn cross_host_pairs(topo: &NetTopology, host: &str) -> Vec<(u32, usize, usize)> {
    let mut out = Vec::new();
    for (l, lm) in topo.machines.iter().enumerate() {
        if lm.host != host {
            continue;
        }
        for (r, rm) in topo.machines.iter().enumerate() {
            if rm.host == host {
                continue;
            }
            out.push((prog::KIND_TAG, l, r));
            out.push((prog::KIND_STRIP, r, l));
        }
    }
    out
}

fn is_ethernet(dev: &str) -> io::Result<bool> {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show", "dev", dev])
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running ip link show: {e}")))?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("link/ether"))
}

#[cfg(test)]
mod tests;
