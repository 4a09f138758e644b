//! The netqueue: client-bound packets held until the committed vector
//! dominates their tag (docs/design.md §3.4, paper §4.3).
//!
//! # The release rule
//!
//! This module is the one place the release rule lives. A packet pushed with
//! tag `T` on flow `F` is released exactly when
//!
//! 1. `T <= C` element-wise, where `C` is the committed vector, **and**
//! 2. every packet pushed earlier on `F` has been released (a flow is never
//!    reordered: a TCP stream stays in order).
//!
//! Released packets leave in push order. The queue never reads a clock: the
//! driver passes the committed vector on every call, and [`NetQueue::oldest`]
//! returns the push sequence number of the oldest held packet, which the driver
//! maps to a time for its hold-time metric or a degrade-to-async policy.
//!
//! # Structure: cascading queues
//!
//! As in the paper, there is one queue per vector entry. A held packet sits in
//! the queue of its *first blocking entry* `i` (the lowest `i` with
//! `tag[i] > C[i]`), ordered by `tag[i]` (ordered-tree insertion: the
//! binary-search insertion of the paper, without the O(n) shifting of a sorted
//! array). When the committed vector grows, only the queues whose entry grew are
//! touched: their fronts are popped while `tag[i] <= C[i]`, and each popped
//! packet either moves on to its next blocking queue `j` (always `j > i`, since
//! entries below `i` were already covered and `C` only grows) or is released.
//! Processing the grown entries in ascending order therefore sees every packet
//! that moved, in the same update.
//!
//! Cost of one update: O(k · log n) for the k packets popped, plus a sort of the
//! released batch. A packet is popped at most [`VECTOR_LEN`] times in its life,
//! so the moves amortise to O(log n) per released packet: O(released · log n)
//! per update, and O(log n) per push.
//!
//! # Per-flow FIFO by effective tags
//!
//! Each packet gets an *effective tag* `E = max(T, E_prev)`, where `E_prev` is
//! the effective tag of the last still-held packet of its flow at push time
//! (or just `T` when nothing of the flow is held). The queues order packets by
//! `E`, and a released batch is emitted sorted by push sequence.
//!
//! *Why this equals the naive rule.* Let the committed vectors the queue sees be
//! `C_1 <= C_2 <= ...` (the queue joins every vector it is given, so the
//! sequence is monotone even if a caller passes a stale one). Write `t(X)` for
//! the first step at which `X <= C_t`. Under the naive rule the release step of
//! packet `p` with held predecessor `q` is `max(t(T_p), rel(q))`; with no held
//! predecessor it is `t(T_p)`. Because `C` is monotone, `t(max(A, B)) =
//! max(t(A), t(B))`, so by induction on the flow's packets `t(E_p) = max(t(T_p),
//! t(E_q)) = max(t(T_p), rel(q)) = rel(p)`. Packets are thus released at the same
//! step as under the naive rule, and `E_p >= E_q` means no packet overtakes its
//! predecessor; sorting each batch by push sequence restores push order within
//! the step. The property tests below check this against a literal
//! implementation of the naive rule.
//!
//! # Bounds
//!
//! [`NetQueueLimits`] bounds held packets and held bytes. A packet that cannot
//! be released at once and does not fit is refused with [`Push::Full`] and is
//! not queued; the caller drops it (TCP retransmits it; the flow order of what
//! *is* queued is unaffected). The flow table holds an entry only for flows with
//! at least one held packet, so it never has more entries than held packets
//! (at most `max_packets`).
//!
//! # Safety check
//!
//! Where handles are emitted, the rule `E <= C` (hence `T <= C`) is checked with
//! an always-on `assert!` (16 comparisons per packet). A violation is a bug in
//! this module; panicking fails closed (the agent dies and the kernel drops the
//! held packets) instead of leaking a reply the backup may not cover.

use crate::vector::{CountVector, Seq, VECTOR_LEN};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Identity of a flow (the driver hashes the 5-tuple). Packets of one flow are
/// never reordered.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct FlowId(pub u64);

/// What [`NetQueue::push`] did with a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push<H> {
    /// The packet may leave now: nothing of its flow is held and its tag is
    /// dominated by the committed vector. It was not queued.
    Release(H),
    /// The packet is held; a later [`NetQueue::release`] (or
    /// [`NetQueue::drain_all`]) hands it back.
    Held,
    /// The packet must wait but the queue is at its limit; it was not queued.
    /// The caller decides; the expected action is to drop it (TCP retransmits).
    Full(H),
}

/// Capacity of a netqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetQueueLimits {
    /// Most packets held at once.
    pub max_packets: usize,
    /// Most bytes (as passed to `push`) held at once.
    pub max_bytes: usize,
}

impl Default for NetQueueLimits {
    /// 65,536 packets (the kernel's NFQUEUE limit) and 64 MiB.
    fn default() -> Self {
        NetQueueLimits {
            max_packets: 1 << 16,
            max_bytes: 64 << 20,
        }
    }
}

/// A held packet.
#[derive(Debug)]
struct HeldPacket<H> {
    flow: FlowId,
    /// Effective tag: max of the packet's tag and its held flow predecessor's.
    eff: CountVector,
    bytes: usize,
    handle: H,
}

/// Per-flow state, present only while the flow has held packets.
#[derive(Debug)]
struct FlowState {
    held: usize,
    /// Effective tag of the flow's last pushed (still held) packet.
    last_eff: CountVector,
}

/// Client-bound packets held until the committed vector dominates their tag.
/// `H` is the caller's handle for a packet (e.g. an NFQUEUE packet id).
#[derive(Debug)]
pub struct NetQueue<H> {
    limits: NetQueueLimits,
    /// Join of every committed vector passed to `release`.
    committed: CountVector,
    /// Push sequence number the next `push` gets.
    next_seq: u64,
    /// Held packets by push sequence number.
    packets: BTreeMap<u64, HeldPacket<H>>,
    /// Cascading queues: entry `i` holds `(eff[i], push seq)` of the packets
    /// whose first blocking entry is `i`.
    queues: Vec<BTreeSet<(Seq, u64)>>,
    flows: HashMap<FlowId, FlowState>,
    bytes: usize,
    /// Reused buffer for the released batch.
    batch: Vec<u64>,
}

impl<H> NetQueue<H> {
    /// An empty netqueue with the given limits; committed vector zero.
    pub fn new(limits: NetQueueLimits) -> Self {
        NetQueue {
            limits,
            committed: CountVector::ZERO,
            next_seq: 0,
            packets: BTreeMap::new(),
            queues: (0..VECTOR_LEN).map(|_| BTreeSet::new()).collect(),
            flows: HashMap::new(),
            bytes: 0,
            batch: Vec::new(),
        }
    }

    /// Offers a client-bound packet of `bytes` bytes on `flow`, tagged `tag`.
    ///
    /// `committed` is the caller's current committed vector; the decision uses
    /// its join with what the queue has seen. Every call consumes one push
    /// sequence number (see [`NetQueue::next_push_seq`]), whatever the result.
    /// A packet that can leave at once is released even when the queue is full.
    ///
    /// Held packets that a grown `committed` would free are *not* released here:
    /// call [`NetQueue::release`] whenever the committed vector grows.
    pub fn push(
        &mut self,
        flow: FlowId,
        tag: &CountVector,
        bytes: usize,
        handle: H,
        committed: &CountVector,
    ) -> Push<H> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let eff = match self.flows.get(&flow) {
            None => {
                let mut now = self.committed;
                now.merge(committed);
                // The release rule itself: nothing of the flow held, tag covered.
                if tag.le(&now) {
                    return Push::Release(handle);
                }
                *tag
            }
            Some(state) => {
                let mut eff = state.last_eff;
                eff.merge(tag);
                eff
            }
        };
        if self.packets.len() >= self.limits.max_packets
            || self.bytes.saturating_add(bytes) > self.limits.max_bytes
        {
            return Push::Full(handle);
        }
        // Invariant: no held packet's effective tag is dominated by
        // `self.committed` (release processes every grown entry completely), so
        // a flow's `last_eff`, and anything above it, has a blocking entry; a new
        // flow's tag is not dominated by `now >= self.committed`.
        let blocking = eff.first_blocking(&self.committed);
        debug_assert!(
            blocking.is_some(),
            "held packet {eff} not blocked by {}",
            self.committed
        );
        // Fallback for the impossible case: the last queue keeps it held (safe).
        let queue = blocking.unwrap_or(VECTOR_LEN - 1);
        self.queues[queue].insert((eff.get(queue), seq));
        self.packets.insert(
            seq,
            HeldPacket {
                flow,
                eff,
                bytes,
                handle,
            },
        );
        let state = self.flows.entry(flow).or_insert(FlowState {
            held: 0,
            last_eff: eff,
        });
        state.held += 1;
        state.last_eff = eff;
        self.bytes += bytes;
        Push::Held
    }

    /// Adopts `committed` (joined with what the queue has seen; never lowers) and
    /// appends every packet that may now leave to `out`, in push order (so each
    /// flow stays in order). Returns how many were appended.
    pub fn release(&mut self, committed: &CountVector, out: &mut Vec<H>) -> usize {
        let old = self.committed;
        if !self.committed.merge(committed) {
            return 0;
        }
        let c = self.committed;
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        for i in 0..VECTOR_LEN {
            let limit = c.get(i);
            if limit == old.get(i) {
                continue;
            }
            while let Some(&(value, seq)) = self.queues[i].first() {
                if value > limit {
                    break;
                }
                self.queues[i].pop_first();
                let Some(packet) = self.packets.get(&seq) else {
                    debug_assert!(false, "queue {i} names unknown packet {seq}");
                    continue;
                };
                match packet.eff.first_blocking(&c) {
                    Some(j) => {
                        debug_assert!(j > i, "packet moved back from queue {i} to {j}");
                        self.queues[j].insert((packet.eff.get(j), seq));
                    }
                    None => batch.push(seq),
                }
            }
        }
        batch.sort_unstable();
        let released = batch.len();
        for seq in batch.drain(..) {
            let Some(packet) = self.packets.remove(&seq) else {
                debug_assert!(false, "released unknown packet {seq}");
                continue;
            };
            // The safety rule, always on: nothing leaves above the committed vector.
            assert!(
                packet.eff.le(&c),
                "netqueue safety: releasing {} above committed {c}",
                packet.eff
            );
            self.bytes -= packet.bytes;
            if let Some(state) = self.flows.get_mut(&packet.flow) {
                state.held -= 1;
                if state.held == 0 {
                    self.flows.remove(&packet.flow);
                }
            }
            out.push(packet.handle);
        }
        self.batch = batch;
        released
    }

    /// Number of held packets.
    pub fn len(&self) -> usize {
        self.packets.len()
    }

    /// Bytes of the held packets.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// Push sequence number of the oldest held packet (the driver maps it to the
    /// time of that push), or `None` when nothing is held.
    pub fn oldest(&self) -> Option<u64> {
        self.packets.first_key_value().map(|(seq, _)| *seq)
    }

    /// The push sequence number the next [`NetQueue::push`] gets. Numbers start at
    /// 0 and every push consumes one, whatever its result.
    pub fn next_push_seq(&self) -> u64 {
        self.next_seq
    }

    /// Number of flows with at least one held packet (never more than [`NetQueue::len`]).
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// The committed vector the queue has seen (join of every `release` argument).
    pub fn committed(&self) -> &CountVector {
        &self.committed
    }

    /// The limits.
    pub fn limits(&self) -> NetQueueLimits {
        self.limits
    }

    /// Appends **every** held packet to `out` in push order and empties the queue.
    ///
    /// Only for teardown or a degrade-to-async policy: this ignores the release
    /// rule, so a client may see replies that depend on writes the backup does not
    /// hold; the client RPO is no longer zero (docs/design.md §4). The committed vector
    /// and the push sequence numbers are kept.
    pub fn drain_all(&mut self, out: &mut Vec<H>) {
        let packets = std::mem::take(&mut self.packets);
        out.extend(packets.into_values().map(|p| p.handle));
        for q in &mut self.queues {
            q.clear();
        }
        self.flows.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn v(s: &[Seq]) -> CountVector {
        CountVector::from_slice(s)
    }

    fn big() -> NetQueueLimits {
        NetQueueLimits {
            max_packets: 1000,
            max_bytes: 1 << 20,
        }
    }

    /// A literal implementation of the naive rule: a Vec scanned in push order.
    struct Model {
        limits: NetQueueLimits,
        committed: CountVector,
        held: Vec<(u64, FlowId, CountVector, usize)>,
        next_seq: u64,
    }

    impl Model {
        fn new(limits: NetQueueLimits) -> Self {
            Model {
                limits,
                committed: CountVector::ZERO,
                held: Vec::new(),
                next_seq: 0,
            }
        }

        fn push(
            &mut self,
            flow: FlowId,
            tag: &CountVector,
            bytes: usize,
            c: &CountVector,
        ) -> Push<u64> {
            let seq = self.next_seq;
            self.next_seq += 1;
            let mut now = self.committed;
            now.merge(c);
            let flow_held = self.held.iter().any(|p| p.1 == flow);
            if !flow_held && tag.le(&now) {
                return Push::Release(seq);
            }
            let held_bytes: usize = self.held.iter().map(|p| p.3).sum();
            if self.held.len() >= self.limits.max_packets
                || held_bytes + bytes > self.limits.max_bytes
            {
                return Push::Full(seq);
            }
            self.held.push((seq, flow, *tag, bytes));
            Push::Held
        }

        fn release(&mut self, c: &CountVector, out: &mut Vec<u64>) -> usize {
            self.committed.merge(c);
            let mut blocked = HashSet::new();
            let before = out.len();
            let committed = self.committed;
            self.held.retain(|p| {
                if blocked.contains(&p.1) {
                    true
                } else if p.2.le(&committed) {
                    out.push(p.0);
                    false
                } else {
                    blocked.insert(p.1);
                    true
                }
            });
            out.len() - before
        }

        fn bytes(&self) -> usize {
            self.held.iter().map(|p| p.3).sum()
        }
    }

    #[test]
    fn releases_when_dominated_and_in_flow_order() {
        let mut q = NetQueue::new(big());
        let z = CountVector::ZERO;
        assert_eq!(q.push(FlowId(1), &z, 10, 'a', &z), Push::Release('a'));
        assert_eq!(q.push(FlowId(1), &v(&[2]), 10, 'b', &z), Push::Held);
        // Nothing of flow 2 held: a dominated tag leaves at once.
        assert_eq!(
            q.push(FlowId(2), &v(&[0, 0]), 10, 'c', &z),
            Push::Release('c')
        );
        // Flow 1 has a held packet: even a zero tag must wait behind it.
        assert_eq!(q.push(FlowId(1), &z, 10, 'd', &z), Push::Held);
        assert_eq!(
            (q.len(), q.bytes(), q.flows(), q.oldest()),
            (2, 20, 1, Some(1))
        );
        let mut out = Vec::new();
        assert_eq!(q.release(&v(&[1]), &mut out), 0);
        assert_eq!(q.release(&v(&[2]), &mut out), 2);
        assert_eq!(out, vec!['b', 'd']);
        assert!(q.is_empty());
        assert_eq!(
            (q.bytes(), q.flows(), q.oldest(), q.next_push_seq()),
            (0, 0, None, 4)
        );
    }

    #[test]
    fn regression_non_monotone_tags_in_one_flow() {
        let mut q = NetQueue::new(big());
        let z = CountVector::ZERO;
        let f = FlowId(9);
        assert_eq!(q.push(f, &v(&[5, 0]), 1, 1, &z), Push::Held);
        assert_eq!(q.push(f, &v(&[0, 3]), 1, 2, &z), Push::Held);
        assert_eq!(q.push(f, &v(&[1, 1]), 1, 3, &z), Push::Held);
        let mut out = Vec::new();
        // Packet 2's own tag is covered, but packet 1 still blocks the flow.
        assert_eq!(q.release(&v(&[4, 3]), &mut out), 0);
        assert_eq!(q.release(&v(&[4, 2]), &mut out), 0);
        // Joined committed becomes [5,3]: everything goes, in push order.
        assert_eq!(q.release(&v(&[5, 0]), &mut out), 3);
        assert_eq!(out, vec![1, 2, 3]);
    }

    #[test]
    fn regression_commit_jumps_several_entries() {
        let mut q = NetQueue::new(big());
        let z = CountVector::ZERO;
        // Packets blocked first on entry 0, then cascading through 1, 2, 3.
        assert_eq!(q.push(FlowId(1), &v(&[3, 4, 5, 6]), 1, 'a', &z), Push::Held);
        assert_eq!(q.push(FlowId(2), &v(&[1, 0, 0, 9]), 1, 'b', &z), Push::Held);
        assert_eq!(q.push(FlowId(3), &v(&[0, 2, 7]), 1, 'c', &z), Push::Held);
        assert_eq!(q.push(FlowId(4), &v(&[2, 2, 2, 2]), 1, 'd', &z), Push::Held);
        let mut out = Vec::new();
        assert_eq!(q.release(&v(&[10, 10, 10, 8]), &mut out), 3);
        assert_eq!(out, vec!['a', 'c', 'd']);
        assert_eq!(q.release(&v(&[0, 0, 0, 9]), &mut out), 1);
        assert_eq!(out, vec!['a', 'c', 'd', 'b']);
        // The epoch entry is just another entry.
        let e = crate::EPOCH_ENTRY;
        let mut tag = z;
        tag.set(e, 1);
        assert_eq!(
            q.push(FlowId(1), &tag, 1, 'e', &v(&[10, 10, 10, 9])),
            Push::Held
        );
        let mut c = v(&[10, 10, 10, 9]);
        assert_eq!(q.release(&c, &mut out), 0);
        c.set(e, 1);
        assert_eq!(q.release(&c, &mut out), 1);
    }

    #[test]
    fn limits_refuse_only_packets_that_must_wait() {
        let mut q = NetQueue::new(NetQueueLimits {
            max_packets: 2,
            max_bytes: 100,
        });
        let z = CountVector::ZERO;
        let t = v(&[1]);
        assert_eq!(q.push(FlowId(1), &t, 60, 1, &z), Push::Held);
        assert_eq!(q.push(FlowId(2), &t, 41, 2, &z), Push::Full(2));
        assert_eq!(q.push(FlowId(2), &t, 40, 3, &z), Push::Held);
        assert_eq!(q.push(FlowId(3), &t, 0, 4, &z), Push::Full(4));
        // Releasable now: no room needed.
        assert_eq!(q.push(FlowId(3), &z, 1000, 5, &z), Push::Release(5));
        let mut out = Vec::new();
        q.drain_all(&mut out);
        assert_eq!(out, vec![1, 3]);
        assert!(q.is_empty() && q.flows() == 0 && q.bytes() == 0);
        assert_eq!(q.next_push_seq(), 5);
    }

    #[test]
    fn stale_committed_never_lowers() {
        let mut q = NetQueue::new(big());
        let mut out = Vec::new();
        assert_eq!(q.release(&v(&[5, 5]), &mut out), 0);
        // A stale committed vector on push is joined with what the queue saw.
        assert_eq!(
            q.push(FlowId(1), &v(&[5, 5]), 1, 1, &v(&[1])),
            Push::Release(1)
        );
        assert_eq!(q.push(FlowId(1), &v(&[6, 5]), 1, 2, &v(&[1])), Push::Held);
        assert_eq!(q.release(&v(&[2, 2]), &mut out), 0);
        assert_eq!(q.committed(), &v(&[5, 5]));
        assert_eq!(q.release(&v(&[6]), &mut out), 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// flow, tag entries, bytes, committed passed to push lags/leads by `ahead`.
        Push(u64, Vec<Seq>, usize),
        /// Raise entries of the latest committed vector (possibly several at once),
        /// then call release if the flag says so.
        Commit(Vec<(usize, Seq)>, bool),
        Release,
    }

    fn op(width: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0u64..6, proptest::collection::vec(0u64..8, width), 1usize..1500)
                .prop_map(|(f, t, b)| Op::Push(f, t, b)),
            2 => (proptest::collection::vec((0..width, 0u64..4), 1..4), any::<bool>())
                .prop_map(|(r, rel)| Op::Commit(r, rel)),
            1 => Just(Op::Release),
        ]
    }

    fn scenario() -> impl Strategy<Value = (NetQueueLimits, Vec<Op>)> {
        (1usize..=VECTOR_LEN, 1usize..40, 500usize..40_000).prop_flat_map(|(width, mp, mb)| {
            (
                Just(NetQueueLimits {
                    max_packets: mp,
                    max_bytes: mb,
                }),
                proptest::collection::vec(op(width), 0..250),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn cascading_queues_equal_the_naive_rule((limits, ops) in scenario()) {
            let mut q = NetQueue::new(limits);
            let mut m = Model::new(limits);
            let mut latest = CountVector::ZERO;
            let (mut out_q, mut out_m) = (Vec::new(), Vec::new());
            for op in ops {
                match op {
                    Op::Push(f, t, b) => {
                        let tag = CountVector::from_slice(&t);
                        let handle = q.next_push_seq();
                        let got = q.push(FlowId(f), &tag, b, handle, &latest);
                        let want = m.push(FlowId(f), &tag, b, &latest);
                        prop_assert_eq!(got, want);
                    }
                    Op::Commit(raises, rel) => {
                        for (i, d) in raises {
                            latest.set(i, latest.get(i) + d);
                        }
                        if rel {
                            let a = q.release(&latest, &mut out_q);
                            let b = m.release(&latest, &mut out_m);
                            prop_assert_eq!(a, b);
                        }
                    }
                    Op::Release => {
                        let a = q.release(&latest, &mut out_q);
                        let b = m.release(&latest, &mut out_m);
                        prop_assert_eq!(a, b);
                    }
                }
                prop_assert_eq!(&out_q, &out_m);
                prop_assert_eq!(q.len(), m.held.len());
                prop_assert_eq!(q.bytes(), m.bytes());
                prop_assert_eq!(q.oldest(), m.held.first().map(|p| p.0));
                prop_assert!(q.flows() <= q.len());
            }
            // Identical held sets, in the same order.
            let mut rest = Vec::new();
            q.drain_all(&mut rest);
            let want: Vec<u64> = m.held.iter().map(|p| p.0).collect();
            prop_assert_eq!(rest, want);
        }
    }
}
