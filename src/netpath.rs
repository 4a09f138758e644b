//! The agent's network path: what happens to each guest packet that the
//! netfilter rules ([`crate::netfilter`]) hand to the agent through NFQUEUE.
//!
//! Two queues per group and host (docs/design.md, causality tracking; paper §4.2-§4.3):
//!
//! - **Tag queue** (packets between a local protected machine and one on
//!   another host) and **local queue** (both ends local); one decision serves both:
//!   - sender local, receiver on another host: insert the sender's pending
//!     vector as the IPv4 option (nothing to insert while it is zero);
//!   - sender on another host, receiver local: merge the tag into the
//!     receiver's pending vector, then strip the option (here, in dom0, before
//!     the receiver's stack sees it);
//!   - both local: merge the sender's vector into the receiver's directly.
//!
//!   Untagged cases are counted: packets with other IPv4 options, fragments,
//!   non-IPv4, and (unless [`TagPolicy::tag_pure_acks`]) pure TCP ACKs.
//!   SYN/FIN/RST are always tagged. A packet that must carry a tag but cannot
//!   (e.g. it would exceed 65,535 bytes) is dropped and counted: passing it
//!   untagged would lose a dependency.
//! - **Hold queue** (packets of local protected machines leaving the group):
//!   each packet is pushed into the core [`NetQueue`] with its sender's pending
//!   vector and leaves, unmodified, once the committed vector dominates that
//!   tag; flows are never reordered. A full netqueue drops (fail-closed).
//!   A packet whose IPv4 source is no local machine (a second address) and
//!   every IPv6 packet is attributed by its input interface to the local
//!   machine(s) behind it: its tag is their pending vector (the element-wise
//!   maximum when several share the interface, e.g. a bridge: an
//!   over-approximation, always safe). One that cannot be attributed is
//!   dropped and counted (`drops(unknown=..)`), never accepted.
//!
//! Reading a pending vector *after* the guest emitted the packet is always
//! safe: vectors only grow, so the tag can only be larger than at emission.
//!
//! # Structure
//!
//! The decisions are sans-I/O and unit tested: [`decide_tag`] (one packet of
//! the tag queue), [`classify_hold`] (tag and flow of a client-bound packet)
//! and [`HoldEngine`] (the netqueue plus the bookkeeping that turns releases
//! into NFQUEUE verdicts; it takes the time as an argument). [`NetPath`]
//! (`driver`) is the thin driver: one thread that busy-polls the three queue
//! sockets for a moment after each packet, then sleeps in `poll(2)` until a
//! packet, a committed-vector raise or a bypass change wakes it. Its counters
//! and gauges are [`NetPathMetrics`] (`metrics`).
//!
//! # Verdicts and order
//!
//! Verdicts of one burst go to the kernel in one `sendmsg`, in the order the
//! packets arrived. Releases use batch verdicts ("accept every packet up to id
//! N") for the longest released prefix of each kernel queue, in chunks of
//! [`NetPathConfig::release_chunk`] packets, then single verdicts for the
//! released packets behind a still-held one, in arrival order. Because one flow
//! always hashes to one kernel queue and the netqueue releases a flow in push
//! order, no flow is reordered.
//!
//! # GSO and checksums
//!
//! The local and hold queues are opened with `NFQA_CFG_F_GSO` (when
//! [`NetPathConfig::gso`]): their packets are never resized, so super-packets
//! of up to 64 KiB pass whole. The tag queue never takes GSO packets: the
//! kernel segments them before queueing, because a GSO skb whose header length
//! changed in FORWARD fails the kernel's later MTU check at random (see
//! `netfilter`, "GSO"). The kernel marks a modified packet's checksum as
//! "none", so when the L4 checksum was only partial (`NFQA_SKB_CSUMNOTREADY`)
//! the tagger computes it fully after inserting or stripping the option.
//!
//! # Kernel tagger
//!
//! With [`NetPathConfig::kernel_tagger`] (the agent's default) a TCX eBPF
//! program ([`crate::ebpf`]) tags and strips cross-host packets before they
//! reach netfilter, GSO super-packets included; the tag queue then only sees
//! what the program left unmarked (its fallbacks). The driver thread also
//! sleeps on the program's ring buffer and merges the tags it recorded.

use crate::causal::CausalState;
use crate::netfilter::NetTopology;
use crate::nfq::proto::{self, PacketMsg, Verdict};
use pipecloud_core::ipopt::{self, Classify, InsertOutcome, OptionError};
use pipecloud_core::netqueue::{FlowId, NetQueue, NetQueueLimits, Push};
use pipecloud_core::CountVector;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Instant;

mod driver;
mod metrics;
pub use driver::{
    BypassSwitch, NetPath, NetPathConfig, NetPathError, DEFAULT_BUSY_POLL, LOW_LATENCY_BUSY_POLL,
};
pub use metrics::{MetricsSnapshot, NetPathMetrics};

// ---------------------------------------------------------------------------
// Machine directory
// ---------------------------------------------------------------------------

/// Where a protected machine is, as seen from this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Index in the topology (and in [`CausalState`]).
    pub index: usize,
    /// Runs on this host.
    pub local: bool,
    /// Marked outbound in the topology.
    pub outbound: bool,
}

/// Protected machines of one group by IPv4 address, from one host's view.
#[derive(Clone, Debug)]
pub struct Directory {
    group_id: u16,
    machines: usize,
    by_ip: HashMap<Ipv4Addr, Endpoint>,
    /// Local machines behind each dom0-side interface index.
    by_ifindex: HashMap<u32, Vec<usize>>,
}

impl Directory {
    /// The directory of `topo` as seen from host `host`.
    pub fn new(topo: &NetTopology, host: &str) -> Directory {
        let by_ip = topo
            .machines
            .iter()
            .enumerate()
            .map(|(index, m)| {
                (
                    m.ip,
                    Endpoint {
                        index,
                        local: m.host == host,
                        outbound: m.outbound,
                    },
                )
            })
            .collect();
        Directory {
            group_id: topo.group_id,
            machines: topo.machines.len(),
            by_ip,
            by_ifindex: HashMap::new(),
        }
    }

    /// The same, attributing packets that arrive on a local machine's
    /// interface ([`crate::netfilter::resolve_links`]) to that machine.
    pub fn with_links(mut self, links: &[crate::netfilter::MachineLink]) -> Directory {
        for l in links.iter().filter(|l| l.machine < self.machines) {
            let v = self.by_ifindex.entry(l.ifindex).or_default();
            if !v.contains(&l.machine) {
                v.push(l.machine);
            }
        }
        self
    }

    /// The local machines behind interface `ifindex`.
    pub fn behind(&self, ifindex: u32) -> &[usize] {
        self.by_ifindex.get(&ifindex).map_or(&[], Vec::as_slice)
    }

    /// The group id carried in tags.
    pub fn group_id(&self) -> u16 {
        self.group_id
    }

    /// Number of machines of the group.
    pub fn machines(&self) -> usize {
        self.machines
    }

    /// The protected machine with address `ip`.
    pub fn lookup(&self, ip: Ipv4Addr) -> Option<Endpoint> {
        self.by_ip.get(&ip).copied()
    }
}

/// Source and destination of an IPv4 packet.
fn addresses(packet: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let h = packet.get(..20)?;
    if h[0] >> 4 != 4 {
        return None;
    }
    Some((
        Ipv4Addr::new(h[12], h[13], h[14], h[15]),
        Ipv4Addr::new(h[16], h[17], h[18], h[19]),
    ))
}

// ---------------------------------------------------------------------------
// Tag queue: the decision
// ---------------------------------------------------------------------------

/// Optional behaviour of the tagger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TagPolicy {
    /// Tag pure TCP ACKs too (docs/design.md allows leaving them untagged; default off).
    pub tag_pure_acks: bool,
}

/// What the kernel told us about a queued packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketInfo {
    /// The L4 checksum is partial (complete it after a modification).
    pub csum_not_ready: bool,
    /// The copy holds the whole packet.
    pub complete: bool,
}

impl PacketInfo {
    /// The info of a queued packet.
    pub fn of(p: &PacketMsg<'_>) -> PacketInfo {
        PacketInfo {
            csum_not_ready: p.csum_not_ready(),
            complete: p.is_complete(),
        }
    }
}

/// The verdict of a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Accept the packet unchanged.
    Accept,
    /// Accept the modified packet left in the scratch buffer.
    AcceptModified,
    /// Drop the packet.
    Drop,
}

/// What happened to a packet (one counter each, see [`NetPathMetrics`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TagEvent {
    /// The sender's pending vector was inserted.
    Tagged,
    /// The sender's pending vector is zero: nothing to carry.
    UntaggedZero,
    /// A tag of our group was merged into the receiver and stripped.
    MergedStripped,
    /// A tag was merged but could not be stripped (the receiver sees it; harmless).
    MergedUnstripped,
    /// Both ends local: merged directly, packet unchanged.
    MergedLocal,
    /// A tag of another group was stripped without merging.
    ForeignStripped,
    /// Carries other IPv4 options: passed untagged.
    UntaggedOtherOptions,
    /// An IPv4 fragment: passed untagged.
    UntaggedFragment,
    /// Not IPv4: passed.
    UntaggedNonIpv4,
    /// A pure TCP ACK: passed untagged.
    PureAckUntagged,
    /// Arrived from another host without a tag (e.g. a pure ACK): passed.
    ArrivedUntagged,
    /// Neither end is a local protected machine (a rule matched too much): passed.
    NotOurs,
    /// A header the option code could not parse: passed.
    Malformed,
    /// Needed a tag but could not get one: dropped.
    TagFailed,
}

/// A decision about one packet of the tag queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TagDecision {
    /// The verdict.
    pub action: Action,
    /// What happened, for the counters.
    pub event: TagEvent,
}

fn decision(action: Action, event: TagEvent) -> TagDecision {
    TagDecision { action, event }
}

/// Decides the fate of one packet of the tag queue and applies its causal
/// effect (merges into `state`). When the action is [`Action::AcceptModified`],
/// `scratch` holds the new packet.
pub fn decide_tag(
    dir: &Directory,
    state: &CausalState,
    policy: TagPolicy,
    packet: &[u8],
    info: PacketInfo,
    scratch: &mut Vec<u8>,
) -> TagDecision {
    let Some((src, dst)) = addresses(packet) else {
        return decision(Action::Accept, TagEvent::UntaggedNonIpv4);
    };
    match (dir.lookup(src), dir.lookup(dst)) {
        (Some(s), Some(d)) if s.local && d.local => {
            let tag = state.sync_pending(s.index);
            state.merge(d.index, &tag);
            decision(Action::Accept, TagEvent::MergedLocal)
        }
        (Some(s), Some(_)) if s.local => tag_outgoing(dir, state, policy, s, packet, info, scratch),
        (Some(_), Some(d)) if d.local => merge_incoming(dir, state, d, packet, info, scratch),
        _ => decision(Action::Accept, TagEvent::NotOurs),
    }
}

/// Completes the L4 checksum of a modified packet when it was partial.
fn finish_checksum(scratch: &mut [u8], info: PacketInfo) -> Result<(), OptionError> {
    if !info.csum_not_ready {
        return Ok(());
    }
    match ipopt::complete_l4_checksum(scratch) {
        // Partial checksums of other protocols are left to the kernel/receiver.
        Err(OptionError::UnsupportedProtocol(_)) => Ok(()),
        r => r,
    }
}

fn tag_outgoing(
    dir: &Directory,
    state: &CausalState,
    policy: TagPolicy,
    sender: Endpoint,
    packet: &[u8],
    info: PacketInfo,
    scratch: &mut Vec<u8>,
) -> TagDecision {
    let forged = match ipopt::classify(packet) {
        Classify::NotIpv4 => return decision(Action::Accept, TagEvent::UntaggedNonIpv4),
        Classify::Malformed(_) => return decision(Action::Accept, TagEvent::Malformed),
        Classify::OtherOptions => return decision(Action::Accept, TagEvent::UntaggedOtherOptions),
        // A fragment cannot carry the tag (docs/design.md, tags): passing it untagged would
        // lose the sender's dependencies on the other host, so it is dropped
        // (fail-closed, counted) unless the sender depends on nothing yet. TCP
        // never fragments here (MSS clamp + DF); a UDP sender must fit its MTU.
        Classify::Fragment => {
            return if state.sync_pending(sender.index).is_zero() {
                decision(Action::Accept, TagEvent::UntaggedFragment)
            } else {
                decision(Action::Drop, TagEvent::TagFailed)
            };
        }
        // A guest-made option of ours would stand in for the real tag: replace it.
        Classify::Tagged { .. } => true,
        Classify::Untagged => false,
    };
    if !forged && !policy.tag_pure_acks && ipopt::is_pure_ack(packet) {
        return decision(Action::Accept, TagEvent::PureAckUntagged);
    }
    let tag = state.sync_pending(sender.index);
    if tag.is_zero() && !forged {
        return decision(Action::Accept, TagEvent::UntaggedZero);
    }
    if !info.complete {
        return decision(Action::Drop, TagEvent::TagFailed);
    }
    scratch.clear();
    scratch.extend_from_slice(packet);
    if forged && ipopt::strip_tag(scratch).is_err() {
        return decision(Action::Drop, TagEvent::TagFailed);
    }
    let event = if tag.is_zero() {
        TagEvent::UntaggedZero
    } else {
        match ipopt::insert_tag(scratch, dir.group_id(), &tag) {
            Ok(InsertOutcome::Inserted { .. }) => TagEvent::Tagged,
            // Left after stripping a forged tag: other options remain.
            Ok(InsertOutcome::OtherOptions) => TagEvent::UntaggedOtherOptions,
            Ok(_) | Err(_) => return decision(Action::Drop, TagEvent::TagFailed),
        }
    };
    if finish_checksum(scratch, info).is_err() {
        return decision(Action::Drop, TagEvent::TagFailed);
    }
    decision(Action::AcceptModified, event)
}

fn merge_incoming(
    dir: &Directory,
    state: &CausalState,
    receiver: Endpoint,
    packet: &[u8],
    info: PacketInfo,
    scratch: &mut Vec<u8>,
) -> TagDecision {
    let Classify::Tagged { group, raw } = ipopt::classify(packet) else {
        return decision(Action::Accept, TagEvent::ArrivedUntagged);
    };
    let ours = group == dir.group_id();
    if ours {
        // Merge before the verdict: the receiver sees the packet only afterwards.
        let tag = raw.resolve(&state.sync_pending(receiver.index));
        state.merge(receiver.index, &tag);
    }
    if !info.complete {
        return decision(Action::Accept, TagEvent::MergedUnstripped);
    }
    scratch.clear();
    scratch.extend_from_slice(packet);
    match ipopt::strip_tag(scratch) {
        Ok(Some(_)) if finish_checksum(scratch, info).is_ok() => {}
        _ => return decision(Action::Accept, TagEvent::MergedUnstripped),
    }
    let event = if ours {
        TagEvent::MergedStripped
    } else {
        TagEvent::ForeignStripped
    };
    decision(Action::AcceptModified, event)
}

// ---------------------------------------------------------------------------
// Hold queue: the decision and the engine
// ---------------------------------------------------------------------------

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
        let handle = HoldHandle { queue, id, ordinal };
        let seq = self.netqueue.next_push_seq();
        match self
            .netqueue
            .push(flow, &tag, wire_len, handle, &state.committed())
        {
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
    use super::*;
    use crate::netfilter::NetMachine;
    use etherparse::PacketBuilder;
    use pipecloud_core::WriterId;

    const WEB: [u8; 4] = [10, 1, 1, 2];
    const APP: [u8; 4] = [10, 1, 1, 3];
    const DB: [u8; 4] = [10, 1, 2, 2];
    const CLIENT: [u8; 4] = [10, 9, 0, 2];

    fn topo() -> NetTopology {
        let m = |name: &str, ip: [u8; 4], host: &str, outbound, w: Option<u8>| NetMachine {
            name: name.into(),
            ip: Ipv4Addr::from(ip),
            host: host.into(),
            outbound,
            writer: w.map(WriterId),
        };
        NetTopology {
            group: "shop".into(),
            group_id: 7,
            tag_entries: 2,
            machines: vec![
                m("web", WEB, "a", true, None),
                m("app", APP, "a", false, Some(0)),
                m("db", DB, "b", false, Some(1)),
            ],
        }
    }

    fn tcp(src: [u8; 4], dst: [u8; 4], payload: &[u8], syn: bool) -> Vec<u8> {
        let mut b = PacketBuilder::ipv4(src, dst, 64)
            .tcp(40000, 5432, 1, 1000)
            .ack(9);
        if syn {
            b = b.syn();
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src, dst, 64).udp(sport, 53);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    const FULL: PacketInfo = PacketInfo {
        csum_not_ready: false,
        complete: true,
    };

    fn v(x: &[u64]) -> CountVector {
        CountVector::from_slice(x)
    }

    #[test]
    fn tag_then_merge_and_strip_across_hosts() {
        let t = topo();
        let (a, b) = (Directory::new(&t, "a"), Directory::new(&t, "b"));
        let (sa, sb) = (CausalState::new(3), CausalState::new(3));
        for _ in 0..5 {
            sa.issue_write(1, WriterId(0)); // app writes
        }
        sa.merge(0, &sa.sync_pending(1)); // web learned app's writes
        let original = tcp(WEB, DB, b"GET /", false);
        let mut scratch = Vec::new();
        let d = decide_tag(&a, &sa, TagPolicy::default(), &original, FULL, &mut scratch);
        assert_eq!(d, decision(Action::AcceptModified, TagEvent::Tagged));
        let tagged = scratch.clone();
        assert_eq!(tagged.len(), original.len() + 12);
        assert_eq!(tagged[22], ipopt::OPTION_TYPE);

        // On host b: merged into db's vector and stripped back to the original.
        let d = decide_tag(&b, &sb, TagPolicy::default(), &tagged, FULL, &mut scratch);
        assert_eq!(
            d,
            decision(Action::AcceptModified, TagEvent::MergedStripped)
        );
        assert_eq!(scratch, original);
        assert_eq!(sb.sync_pending(2), v(&[5]));
        assert_eq!(
            sb.sync_pending(0),
            CountVector::ZERO,
            "only the receiver merges"
        );
    }

    #[test]
    fn local_pairs_merge_directly() {
        let t = topo();
        let a = Directory::new(&t, "a");
        let s = CausalState::new(3);
        s.issue_write(1, WriterId(0));
        let pkt = tcp(APP, WEB, b"x", false);
        let d = decide_tag(&a, &s, TagPolicy::default(), &pkt, FULL, &mut Vec::new());
        assert_eq!(d, decision(Action::Accept, TagEvent::MergedLocal));
        assert_eq!(s.sync_pending(0), v(&[1]));
    }

    #[test]
    fn untagged_classes() {
        let t = topo();
        let a = Directory::new(&t, "a");
        let s = CausalState::new(3);
        let mut scratch = Vec::new();
        let pol = TagPolicy::default();
        // Zero vector: nothing to carry.
        let d = decide_tag(&a, &s, pol, &tcp(WEB, DB, b"x", false), FULL, &mut scratch);
        assert_eq!(d.event, TagEvent::UntaggedZero);
        s.issue_write(0, WriterId(0));
        // Pure ACK untagged by default, tagged on request; SYN always tagged.
        let ack = tcp(WEB, DB, b"", false);
        assert_eq!(
            decide_tag(&a, &s, pol, &ack, FULL, &mut scratch).event,
            TagEvent::PureAckUntagged
        );
        let all = TagPolicy {
            tag_pure_acks: true,
        };
        assert_eq!(
            decide_tag(&a, &s, all, &ack, FULL, &mut scratch).event,
            TagEvent::Tagged
        );
        let syn = tcp(WEB, DB, b"", true);
        assert_eq!(
            decide_tag(&a, &s, pol, &syn, FULL, &mut scratch).event,
            TagEvent::Tagged
        );
        // Other options.
        let mut opt = tcp(WEB, DB, b"x", false);
        opt.splice(20..20, [1, 1, 1, 0]); // NOP NOP NOP EOL
        opt[0] = 0x46;
        let tl = (opt.len() as u16).to_be_bytes();
        opt[2..4].copy_from_slice(&tl);
        assert_eq!(
            decide_tag(&a, &s, pol, &opt, FULL, &mut scratch).event,
            TagEvent::UntaggedOtherOptions
        );
        // Fragment of a sender with dependencies: cannot carry the tag, dropped.
        let mut frag = tcp(WEB, DB, b"x", false);
        frag[6] |= 0x20; // MF
        assert_eq!(
            decide_tag(&a, &s, pol, &frag, FULL, &mut scratch),
            decision(Action::Drop, TagEvent::TagFailed)
        );
        // ... and passed (counted) while the sender depends on nothing.
        let fresh = CausalState::new(3);
        assert_eq!(
            decide_tag(&a, &fresh, pol, &frag, FULL, &mut scratch).event,
            TagEvent::UntaggedFragment
        );
        // Not IPv4.
        let mut v6 = tcp(WEB, DB, b"x", false);
        v6[0] = 0x60;
        assert_eq!(
            decide_tag(&a, &s, pol, &v6, FULL, &mut scratch).event,
            TagEvent::UntaggedNonIpv4
        );
        // Truncated copy that needs a tag: dropped, never passed untagged.
        let d = decide_tag(
            &a,
            &s,
            pol,
            &tcp(WEB, DB, b"x", false),
            PacketInfo {
                csum_not_ready: false,
                complete: false,
            },
            &mut scratch,
        );
        assert_eq!(d, decision(Action::Drop, TagEvent::TagFailed));
        // Not our machines.
        let d = decide_tag(
            &a,
            &s,
            pol,
            &tcp(CLIENT, WEB, b"x", false),
            FULL,
            &mut scratch,
        );
        assert_eq!(d.event, TagEvent::NotOurs);
        // Untagged arrival from the other host.
        let b = Directory::new(&t, "b");
        let d = decide_tag(&b, &s, pol, &tcp(WEB, DB, b"x", false), FULL, &mut scratch);
        assert_eq!(d, decision(Action::Accept, TagEvent::ArrivedUntagged));
    }

    #[test]
    fn forged_tags_are_replaced_and_foreign_ones_stripped() {
        let t = topo();
        let (a, b) = (Directory::new(&t, "a"), Directory::new(&t, "b"));
        let s = CausalState::new(3);
        s.issue_write(0, WriterId(1));
        let mut forged = tcp(WEB, DB, b"x", false);
        ipopt::insert_tag(&mut forged, 7, &v(&[0, 99])).unwrap();
        let mut scratch = Vec::new();
        let d = decide_tag(&a, &s, TagPolicy::default(), &forged, FULL, &mut scratch);
        assert_eq!(d.event, TagEvent::Tagged);
        let Classify::Tagged { raw, .. } = ipopt::classify(&scratch) else {
            panic!()
        };
        assert_eq!(
            raw.resolve(&CountVector::ZERO),
            v(&[0, 1]),
            "the real pending vector travels"
        );

        let mut foreign = tcp(WEB, DB, b"x", false);
        ipopt::insert_tag(&mut foreign, 8, &v(&[3])).unwrap();
        let sb = CausalState::new(3);
        let d = decide_tag(&b, &sb, TagPolicy::default(), &foreign, FULL, &mut scratch);
        assert_eq!(
            d,
            decision(Action::AcceptModified, TagEvent::ForeignStripped)
        );
        assert_eq!(sb.sync_pending(2), CountVector::ZERO);
        assert_eq!(scratch, tcp(WEB, DB, b"x", false));
    }

    #[test]
    fn partial_checksums_are_completed() {
        let t = topo();
        let a = Directory::new(&t, "a");
        let s = CausalState::new(3);
        s.issue_write(1, WriterId(0));
        s.merge(0, &s.sync_pending(1));
        let good = udp(WEB, DB, 1000, b"hello");
        let mut partial = good.clone();
        partial[26] = 0x12; // garbage where offload left a pseudo-header sum
        partial[27] = 0x34;
        let mut scratch = Vec::new();
        let info = PacketInfo {
            csum_not_ready: true,
            complete: true,
        };
        let d = decide_tag(&a, &s, TagPolicy::default(), &partial, info, &mut scratch);
        assert_eq!(d.action, Action::AcceptModified);
        // Checksum now equals the one of the correctly built packet.
        assert_eq!(&scratch[26 + 12..28 + 12], &good[26..28]);
    }

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
