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
//!   each packet is pushed into the core
//!   [`NetQueue`](pipecloud_core::netqueue::NetQueue) with its sender's
//!   pending vector and leaves, unmodified, once the committed vector
//!   dominates that tag; flows are never reordered. A full netqueue drops (fail-closed).
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
//! packet, a committed-vector raise or a bypass change wakes it. The hold
//! queue's code is in `hold`, the counters and gauges ([`NetPathMetrics`]) in
//! `metrics`.
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
use crate::nfq::proto::PacketMsg;
use pipecloud_core::ipopt::{self, Classify, InsertOutcome, OptionError};
use std::collections::HashMap;
use std::net::Ipv4Addr;

mod breakdown;
mod driver;
mod histogram;
mod hold;
mod metrics;
mod tails;
pub use breakdown::{HoldBreakdown, HoldSnapshot};
pub use driver::{
    BypassSwitch, NetPath, NetPathConfig, NetPathError, DEFAULT_BUSY_POLL, LOW_LATENCY_BUSY_POLL,
};
pub use histogram::{HistSnapshot, LogHistogram};
pub use hold::{classify_hold, HoldDecision, HoldEngine, HoldHandle, HoldOutcome};
pub use metrics::{MetricsSnapshot, NetPathMetrics};
pub use tails::{TailEvent, TailRing, BURST_WINDOW, EPISODE_GAP, TAIL_EXCESS_US};

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
pub(super) fn addresses(packet: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::NetMachine;
    use etherparse::PacketBuilder;
    use pipecloud_core::{CountVector, WriterId};

    pub(super) const WEB: [u8; 4] = [10, 1, 1, 2];
    pub(super) const APP: [u8; 4] = [10, 1, 1, 3];
    pub(super) const DB: [u8; 4] = [10, 1, 2, 2];
    pub(super) const CLIENT: [u8; 4] = [10, 9, 0, 2];

    pub(super) fn topo() -> NetTopology {
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

    pub(super) fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4(src, dst, 64).udp(sport, 53);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    const FULL: PacketInfo = PacketInfo {
        csum_not_ready: false,
        complete: true,
    };

    pub(super) fn v(x: &[u64]) -> CountVector {
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
}
