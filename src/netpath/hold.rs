//! The hold queue: packets of local protected machines leaving the group wait
//! here until the backup holds every write they depend on.
//!
//! [`classify_hold`] gives each client-bound packet its flow and its tag (the
//! sender's pending vector, or the merged vectors of the machines behind its
//! input interface); [`HoldEngine`] pushes it into the core netqueue and turns
//! the netqueue's releases into NFQUEUE verdicts, batched per kernel queue in
//! arrival order. Both are sans-I/O (the time is an argument) so the release
//! rule can be unit tested without a kernel; the driver thread does the I/O.
//! This is a separate concept from the tag queue (`decide_tag`), which never
//! holds a packet: it only moves vectors between machines.

use super::{addresses, Directory};
use crate::causal::CausalState;
use crate::nfq::proto::{self, Verdict};
use pipecloud_core::netqueue::{FlowId, NetQueue, NetQueueLimits, Push};
use pipecloud_core::CountVector;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Instant;

/// How a client-bound packet enters the netqueue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldDecision {
    /// Push it with this flow and tag.
    Push {
        /// Flow identity (hash of addresses, protocol and ports).
        flow: FlowId,
        /// The sender's pending vector.
        tag: CountVector,
    },
    /// The sender is not a local protected machine (stale or too broad rules):
    /// drop, since nothing says what it depends on.
    UnknownSender,
}

/// Tag and flow of a packet of the hold queue that arrived on interface
/// `indev`. An IPv4 packet of a local machine's address takes that machine's
/// pending vector; any other IPv4 packet and every IPv6 packet takes the
/// element-wise maximum of the pending vectors of the local machines behind
/// `indev` (module docs). Nothing to attribute it to: [`HoldDecision::UnknownSender`].
pub fn classify_hold(
    dir: &Directory,
    state: &CausalState,
    packet: &[u8],
    indev: Option<u32>,
) -> HoldDecision {
    let flow = match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let Some((src, dst)) = addresses(packet) else {
                return HoldDecision::UnknownSender;
            };
            if let Some(sender) = dir.lookup(src).filter(|e| e.local) {
                return HoldDecision::Push {
                    flow: flow_of(src, dst, packet),
                    tag: state.sync_pending(sender.index),
                };
            }
            flow_of(src, dst, packet)
        }
        Some(6) => match flow_of_v6(packet) {
            Some(f) => f,
            None => return HoldDecision::UnknownSender,
        },
        _ => return HoldDecision::UnknownSender,
    };
    let behind = indev.map_or(&[][..], |i| dir.behind(i));
    if behind.is_empty() {
        return HoldDecision::UnknownSender;
    }
    let mut tag = CountVector::ZERO;
    for &m in behind {
        tag.merge(&state.sync_pending(m));
    }
    HoldDecision::Push { flow, tag }
}

/// Flow identity of an IPv6 packet: addresses, next header and, when the next
/// header is TCP or UDP directly, the ports (extension headers make the flow
/// coarser, which is always safe: one flow is never reordered).
fn flow_of_v6(packet: &[u8]) -> Option<FlowId> {
    let h = packet.get(..40)?;
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&h[8..24]).ok()?);
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&h[24..40]).ok()?);
    let next = h[6];
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    src.hash(&mut hasher);
    dst.hash(&mut hasher);
    next.hash(&mut hasher);
    if next == 6 || next == 17 {
        if let Some(ports) = packet.get(40..44) {
            ports.hash(&mut hasher);
        }
    }
    Some(FlowId(hasher.finish()))
}

/// Flow identity: addresses, protocol and (for TCP/UDP first fragments or
/// whole packets) ports.
fn flow_of(src: Ipv4Addr, dst: Ipv4Addr, packet: &[u8]) -> FlowId {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    src.hash(&mut h);
    dst.hash(&mut h);
    let proto = packet.get(9).copied().unwrap_or(0);
    proto.hash(&mut h);
    let ihl = usize::from(packet.first().copied().unwrap_or(0) & 0x0f) * 4;
    let frag_offset = packet
        .get(6..8)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]) & 0x1fff);
    if (proto == 6 || proto == 17) && frag_offset == 0 {
        if let Some(ports) = packet.get(ihl..ihl + 4) {
            ports.hash(&mut h);
        }
    }
    FlowId(h.finish())
}

/// A held packet: which kernel queue, its kernel id, and its arrival ordinal
/// on that queue. Client-bound packets leave unmodified (our option must never
/// reach a client), so no payload is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldHandle {
    /// Kernel queue number.
    pub queue: u16,
    /// Kernel packet id.
    pub id: u32,
    /// Arrival number on that queue (does not wrap, unlike `id`).
    pub ordinal: u64,
    /// Its tag (what it waits for): for the hold breakdown.
    pub tag: CountVector,
    /// When it was pushed into the netqueue.
    pub arrived: Instant,
    /// Writes its tag needed beyond the committed vector when it arrived.
    pub waits_for: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    /// Waiting in the netqueue.
    Held,
    /// Released, verdict not sent yet.
    Released,
    /// Verdict already sent (released behind a held packet).
    Done,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    ordinal: u64,
    id: u32,
    state: SlotState,
}

/// The hold path without I/O: the netqueue plus the per-kernel-queue
/// bookkeeping that turns releases into (batch) verdicts. Verdicts are appended
/// to a caller's buffer, to be sent in that order.
pub struct HoldEngine {
    netqueue: NetQueue<HoldHandle>,
    /// Per kernel queue: held packets (and released ones behind a held one) in
    /// arrival order.
    slots: BTreeMap<u16, VecDeque<Slot>>,
    /// Next arrival ordinal per kernel queue.
    next_ordinal: HashMap<u16, u64>,
    /// (push seq, time) of pushes that were held, oldest first.
    pushed_at: VecDeque<(u64, Instant)>,
    /// Most packets one batch verdict covers.
    chunk: usize,
    released: Vec<HoldHandle>,
}

/// What [`HoldEngine::on_packet`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldOutcome {
    /// Accepted at once (committed already dominates its tag).
    ReleasedNow,
    /// Held in the netqueue.
    Held,
    /// Dropped: the netqueue is full.
    DroppedFull,
    /// Dropped: unknown sender.
    DroppedUnknown,
}

impl HoldEngine {
    /// An empty engine; `chunk` (>= 1) bounds each batch verdict.
    pub fn new(limits: NetQueueLimits, chunk: usize) -> HoldEngine {
        HoldEngine {
            netqueue: NetQueue::new(limits),
            slots: BTreeMap::new(),
            next_ordinal: HashMap::new(),
            pushed_at: VecDeque::new(),
            chunk: chunk.max(1),
            released: Vec::new(),
        }
    }

    /// A client-bound packet arrived on kernel queue `queue` with id `id`
    /// from interface `indev`. Appends its verdict to `out` when it is decided now.
    #[allow(clippy::too_many_arguments)]
    pub fn on_packet(
        &mut self,
        dir: &Directory,
        state: &CausalState,
        queue: u16,
        id: u32,
        packet: &[u8],
        indev: Option<u32>,
        wire_len: usize,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> HoldOutcome {
        let HoldDecision::Push { flow, tag } = classify_hold(dir, state, packet, indev) else {
            proto::build_verdict(out, queue, id, Verdict::Drop);
            return HoldOutcome::DroppedUnknown;
        };
        let ord = self.next_ordinal.entry(queue).or_insert(0);
        let ordinal = *ord;
        *ord += 1;
        let committed = state.committed();
        let waits_for = tag
            .as_slice()
            .iter()
            .zip(committed.as_slice())
            .map(|(t, c)| t.saturating_sub(*c))
            .sum();
        let handle = HoldHandle {
            queue,
            id,
            ordinal,
            tag,
            arrived: now,
            waits_for,
        };
        let seq = self.netqueue.next_push_seq();
        match self.netqueue.push(flow, &tag, wire_len, handle, &committed) {
            Push::Release(h) => {
                proto::build_verdict(out, h.queue, h.id, Verdict::Accept);
                HoldOutcome::ReleasedNow
            }
            Push::Full(h) => {
                proto::build_verdict(out, h.queue, h.id, Verdict::Drop);
                HoldOutcome::DroppedFull
            }
            Push::Held => {
                self.slots.entry(queue).or_default().push_back(Slot {
                    ordinal,
                    id,
                    state: SlotState::Held,
                });
                self.pushed_at.push_back((seq, now));
                HoldOutcome::Held
            }
        }
    }

    /// The committed vector is now `committed`: appends the verdicts of every
    /// packet it releases to `out` (batch verdicts for released prefixes, then
    /// single ones) and returns how many were released.
    pub fn on_committed(&mut self, committed: &CountVector, out: &mut Vec<u8>) -> usize {
        let mut released = std::mem::take(&mut self.released);
        released.clear();
        let n = self.netqueue.release(committed, &mut released);
        for h in &released {
            let Some(q) = self.slots.get_mut(&h.queue) else {
                debug_assert!(false, "released packet of unknown queue {}", h.queue);
                continue;
            };
            match q.binary_search_by_key(&h.ordinal, |s| s.ordinal) {
                Ok(i) => q[i].state = SlotState::Released,
                Err(_) => debug_assert!(false, "released packet {h:?} not tracked"),
            }
        }
        self.released = released;
        if n == 0 {
            return 0;
        }
        self.emit_verdicts(out);
        n
    }

    /// Releases every held packet regardless of the committed vector (modes
    /// `async`/`sync` and degrade-to-async: the block path, not the netqueue,
    /// decides durability then). Per-queue arrival order is kept. Returns how
    /// many were released.
    pub fn release_all(&mut self, out: &mut Vec<u8>) -> usize {
        let mut all = Vec::new();
        self.netqueue.drain_all(&mut all);
        self.released.clear();
        for q in self.slots.values_mut() {
            for s in q.iter_mut() {
                if s.state == SlotState::Held {
                    s.state = SlotState::Released;
                }
            }
        }
        self.emit_verdicts(out);
        debug_assert!(self.slots.is_empty(), "a held packet survived release_all");
        self.slots.clear();
        self.pushed_at.clear();
        all.len()
    }

    /// Appends the verdicts of every released packet, per kernel queue in arrival
    /// order: batch verdicts (in chunks) for the released prefix, then single
    /// verdicts for released packets behind a still-held one.
    fn emit_verdicts(&mut self, out: &mut Vec<u8>) {
        for (&queue, q) in self.slots.iter_mut() {
            // Released prefix: batch verdicts in chunks.
            let mut in_chunk = 0;
            let mut last = None;
            while let Some(front) = q.front().copied() {
                match front.state {
                    SlotState::Held => break,
                    SlotState::Done => {}
                    SlotState::Released => {
                        last = Some(front.id);
                        in_chunk += 1;
                        if in_chunk == self.chunk {
                            proto::build_verdict_batch(out, queue, front.id, Verdict::Accept);
                            in_chunk = 0;
                            last = None;
                        }
                    }
                }
                q.pop_front();
            }
            if let Some(id) = last {
                proto::build_verdict_batch(out, queue, id, Verdict::Accept);
            }
            // Released behind a held packet: single verdicts, arrival order.
            for s in q.iter_mut().filter(|s| s.state == SlotState::Released) {
                proto::build_verdict(out, queue, s.id, Verdict::Accept);
                s.state = SlotState::Done;
            }
        }
        self.slots.retain(|_, q| !q.is_empty());
    }

    /// The packets the latest [`on_committed`](Self::on_committed) released
    /// (for the hold breakdown; [`release_all`](Self::release_all) clears it:
    /// a bypass release says nothing about the backup).
    pub fn last_released(&self) -> &[HoldHandle] {
        &self.released
    }

    /// Packets held.
    pub fn held(&self) -> usize {
        self.netqueue.len()
    }

    /// Bytes held.
    pub fn held_bytes(&self) -> usize {
        self.netqueue.bytes()
    }

    /// When the oldest held packet arrived.
    pub fn oldest_since(&mut self) -> Option<Instant> {
        let oldest = self.netqueue.oldest()?;
        while self.pushed_at.front().is_some_and(|(s, _)| *s < oldest) {
            self.pushed_at.pop_front();
        }
        self.pushed_at.front().map(|(_, t)| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{topo, udp, v, APP, CLIENT, DB, WEB};
    use super::*;
    use etherparse::PacketBuilder;
    use pipecloud_core::WriterId;

    fn verdicts(out: &[u8]) -> Vec<(u16, u32, bool)> {
        // (msg type low byte, id, accept) from our own encoding.
        let mut v = Vec::new();
        let mut at = 0;
        while at + 16 <= out.len() {
            let len = u32::from_ne_bytes(out[at..at + 4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(out[at + 4..at + 6].try_into().unwrap()) & 0xff;
            let verdict = u32::from_be_bytes(out[at + 24..at + 28].try_into().unwrap());
            let id = u32::from_be_bytes(out[at + 28..at + 32].try_into().unwrap());
            v.push((ty, id, verdict == 1));
            at += (len + 3) & !3;
        }
        v
    }

    const SINGLE: u16 = 1;
    const BATCH: u16 = 3;

    #[test]
    fn hold_releases_exactly_when_committed_dominates() {
        let t = topo();
        let a = Directory::new(&t, "a");
        let s = CausalState::new(3);
        for _ in 0..5 {
            s.issue_write(1, WriterId(0));
        }
        s.merge(0, &s.sync_pending(1)); // web depends on app's write 5
        let mut e = HoldEngine::new(NetQueueLimits::default(), 1024);
        let mut out = Vec::new();
        let now = Instant::now();
        for id in 1..=3 {
            let p = udp(WEB, CLIENT, 1000, &[id as u8]);
            assert_eq!(
                e.on_packet(&a, &s, 49, id, &p, None, p.len(), now, &mut out),
                HoldOutcome::Held
            );
        }
        assert!(out.is_empty());
        assert_eq!(e.held(), 3);
        assert_eq!(e.oldest_since(), Some(now));
        assert_eq!(e.on_committed(&v(&[4]), &mut out), 0);
        assert!(out.is_empty());
        assert_eq!(e.on_committed(&v(&[5]), &mut out), 3);
        assert_eq!(verdicts(&out), vec![(BATCH, 3, true)]);
        // What the hold breakdown reads: the released packets, their tag,
        // arrival and the writes they needed beyond the committed vector.
        let ids: Vec<u32> = e.last_released().iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        assert!(e
            .last_released()
            .iter()
            .all(|h| h.tag == v(&[5]) && h.arrived == now && h.waits_for == 5));
        assert_eq!(e.held(), 0);
        assert_eq!(e.oldest_since(), None);
        // Committed now covers web's vector: the next packet leaves at once.
        s.publish_committed(&v(&[5]));
        out.clear();
        let p = udp(WEB, CLIENT, 1000, b"z");
        assert_eq!(
            e.on_packet(&a, &s, 49, 4, &p, None, p.len(), now, &mut out),
            HoldOutcome::ReleasedNow
        );
        assert_eq!(verdicts(&out), vec![(SINGLE, 4, true)]);
        // Unknown sender: dropped.
        out.clear();
        let p = udp(DB, CLIENT, 1000, b"z"); // db is not local on host a
        assert_eq!(
            e.on_packet(&a, &s, 49, 5, &p, None, p.len(), now, &mut out),
            HoldOutcome::DroppedUnknown
        );
        assert_eq!(verdicts(&out), vec![(SINGLE, 5, false)]);
    }

    fn udp6(sport: u16, payload: &[u8]) -> Vec<u8> {
        let src = [0xfd, 0x50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let dst = [0xfd, 0x50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
        let b = PacketBuilder::ipv6(src, dst, 64).udp(sport, 53);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn link(machine: usize, ifindex: u32) -> crate::netfilter::MachineLink {
        crate::netfilter::MachineLink {
            machine,
            iface: format!("if{ifindex}"),
            ifindex,
        }
    }

    #[test]
    fn ipv6_and_other_sources_are_attributed_by_interface() {
        let t = topo();
        // web behind ifindex 7, app behind 8; db (host b) is ignored on a.
        let a = Directory::new(&t, "a").with_links(&[link(0, 7), link(1, 8)]);
        let s = CausalState::new(3);
        for _ in 0..5 {
            s.issue_write(1, WriterId(0));
        }
        let tag_of = |p: &[u8], indev| match classify_hold(&a, &s, p, indev) {
            HoldDecision::Push { tag, .. } => Some(tag),
            HoldDecision::UnknownSender => None,
        };
        let p6 = udp6(1000, b"x");
        assert_eq!(tag_of(&p6, Some(8)), Some(v(&[5])));
        assert_eq!(tag_of(&p6, Some(7)), Some(CountVector::ZERO));
        assert_eq!(tag_of(&p6, None), None, "no interface: dropped");
        assert_eq!(tag_of(&p6, Some(99)), None, "not a machine's interface");
        // IPv4 from a second address of app: app's vector; from a known
        // local address the address decides, whatever the interface.
        let other = udp([10, 1, 1, 99], CLIENT, 1, b"x");
        assert_eq!(tag_of(&other, Some(8)), Some(v(&[5])));
        assert_eq!(tag_of(&other, None), None);
        assert_eq!(
            tag_of(&udp(WEB, CLIENT, 1, b"x"), Some(8)),
            Some(CountVector::ZERO)
        );
        assert_eq!(tag_of(&[0x60, 0, 0], Some(8)), None, "truncated IPv6");
        assert_eq!(tag_of(&[0x20; 40], Some(8)), None, "neither IPv4 nor IPv6");
        // Several machines behind one interface (a bridge): the maximum.
        let shared = Directory::new(&t, "a").with_links(&[link(0, 7), link(1, 7)]);
        s.merge(0, &v(&[0, 3]));
        match classify_hold(&shared, &s, &p6, Some(7)) {
            HoldDecision::Push { tag, .. } => assert_eq!(tag, v(&[5, 3])),
            d => panic!("{d:?}"),
        }
        // Flows: ports count for UDP/TCP directly after the IPv6 header.
        let flow = |p: &[u8]| match classify_hold(&a, &s, p, Some(8)) {
            HoldDecision::Push { flow, .. } => flow,
            d => panic!("{d:?}"),
        };
        assert_eq!(flow(&udp6(1000, b"a")), flow(&udp6(1000, b"bb")));
        assert_ne!(flow(&udp6(1000, b"a")), flow(&udp6(1001, b"a")));
        // Held until committed covers app's vector, then released.
        let mut e = HoldEngine::new(NetQueueLimits::default(), 1024);
        let mut out = Vec::new();
        let now = Instant::now();
        assert_eq!(
            e.on_packet(&a, &s, 50, 1, &p6, Some(8), p6.len(), now, &mut out),
            HoldOutcome::Held
        );
        assert_eq!(
            e.on_packet(&a, &s, 50, 2, &p6, None, p6.len(), now, &mut out),
            HoldOutcome::DroppedUnknown
        );
        assert_eq!(verdicts(&out), vec![(SINGLE, 2, false)]);
        out.clear();
        assert_eq!(e.on_committed(&v(&[5]), &mut out), 1);
        assert_eq!(verdicts(&out), vec![(BATCH, 1, true)]);
    }

    #[test]
    fn release_all_frees_every_held_packet_in_order() {
        let t = topo();
        let a = Directory::new(&t, "a");
        let s = CausalState::new(3);
        s.issue_write(1, WriterId(0));
        s.merge(0, &s.sync_pending(1));
        let mut e = HoldEngine::new(NetQueueLimits::default(), 2);
        let mut out = Vec::new();
        let now = Instant::now();
        for id in 1..=5 {
            let p = udp(WEB, CLIENT, 1000, &[id as u8]);
            e.on_packet(&a, &s, 49, id, &p, None, p.len(), now, &mut out);
        }
        assert!(out.is_empty(), "nothing is committed: all held");
        assert_eq!(e.release_all(&mut out), 5);
        // Chunks of 2 on one kernel queue: batch up to 2, up to 4, then up to 5.
        assert_eq!(
            verdicts(&out),
            vec![(BATCH, 2, true), (BATCH, 4, true), (BATCH, 5, true)]
        );
        assert_eq!(e.held(), 0);
        assert_eq!(e.oldest_since(), None);
        out.clear();
        assert_eq!(
            e.on_committed(&v(&[1]), &mut out),
            0,
            "nothing left to release"
        );
        assert!(out.is_empty());
    }

    #[test]
    fn release_uses_prefix_batches_in_chunks_then_singles() {
        let t = topo();
        let a = Directory::new(&t, "a");
        let s = CausalState::new(3);
        let mut e = HoldEngine::new(NetQueueLimits::default(), 2);
        let mut out = Vec::new();
        let now = Instant::now();
        // Flow X (web, port 1) tagged [1]; flow Y (app, port 2) tagged [2] later.
        s.issue_write(1, WriterId(0)); // app: [1]
        s.merge(0, &s.sync_pending(1)); // web: [1]
        let x = |id: u32| udp(WEB, CLIENT, 1, &[id as u8]);
        e.on_packet(&a, &s, 49, 1, &x(1), None, 10, now, &mut out);
        e.on_packet(&a, &s, 49, 2, &x(2), None, 10, now, &mut out);
        s.issue_write(1, WriterId(0)); // app: [2]
        let y = |id: u32| udp(APP, CLIENT, 2, &[id as u8]);
        e.on_packet(&a, &s, 49, 3, &y(3), None, 10, now, &mut out);
        e.on_packet(&a, &s, 49, 4, &x(4), None, 10, now, &mut out);
        e.on_packet(&a, &s, 49, 5, &x(5), None, 10, now, &mut out);
        e.on_packet(&a, &s, 49, 6, &x(6), None, 10, now, &mut out);
        assert!(out.is_empty());
        // [1] releases X's 1,2 (prefix, one chunk of 2) and X's 4,5,6 behind Y's 3.
        assert_eq!(e.on_committed(&v(&[1]), &mut out), 5);
        assert_eq!(
            verdicts(&out),
            vec![
                (BATCH, 2, true),
                (SINGLE, 4, true),
                (SINGLE, 5, true),
                (SINGLE, 6, true)
            ]
        );
        out.clear();
        assert_eq!(e.held(), 1);
        // [2] releases Y's 3; the batch stops at it (4..6 already have verdicts).
        assert_eq!(e.on_committed(&v(&[2]), &mut out), 1);
        assert_eq!(verdicts(&out), vec![(BATCH, 3, true)]);
        assert!(e.slots.is_empty());
    }

    #[test]
    fn chunking_splits_long_prefixes() {
        let t = topo();
        let a = Directory::new(&t, "a");
        let s = CausalState::new(3);
        s.issue_write(0, WriterId(0));
        let mut e = HoldEngine::new(NetQueueLimits::default(), 3);
        let mut out = Vec::new();
        for id in 1..=7 {
            e.on_packet(
                &a,
                &s,
                49,
                id,
                &udp(WEB, CLIENT, 1, b"a"),
                None,
                10,
                Instant::now(),
                &mut out,
            );
        }
        assert_eq!(e.on_committed(&v(&[1]), &mut out), 7);
        assert_eq!(
            verdicts(&out),
            vec![(BATCH, 3, true), (BATCH, 6, true), (BATCH, 7, true)]
        );
    }

    #[test]
    fn full_netqueue_drops() {
        let t = topo();
        let a = Directory::new(&t, "a");
        let s = CausalState::new(3);
        s.issue_write(0, WriterId(0));
        let mut e = HoldEngine::new(
            NetQueueLimits {
                max_packets: 2,
                max_bytes: 1 << 20,
            },
            8,
        );
        let mut out = Vec::new();
        let p = udp(WEB, CLIENT, 1, b"a");
        for id in 1..=2 {
            assert_eq!(
                e.on_packet(&a, &s, 49, id, &p, None, 10, Instant::now(), &mut out),
                HoldOutcome::Held
            );
        }
        assert_eq!(
            e.on_packet(&a, &s, 49, 3, &p, None, 10, Instant::now(), &mut out),
            HoldOutcome::DroppedFull
        );
        assert_eq!(verdicts(&out), vec![(SINGLE, 3, false)]);
    }
}
