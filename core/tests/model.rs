//! Deterministic model test of the whole pipelined-synchrony protocol
//! (`docs/design.md §3`, the rules).
//!
//! Every schedule is a pure function of one `u64` seed. It builds a random group
//! (1..=4 writers, 0..=2 intermediates, 1..=2 outbound machines, random edges),
//! runs a discrete-event loop over a virtual clock (writes, tagged internal
//! messages with random delays and reordering, client-bound packets pushed into
//! the real [`NetQueue`](pipecloud_core::netqueue), writes travelling to a backup
//! that journals them out of order and acks ranges with random delays and
//! duplicates into the real commit tracker, writer reconnections with a new
//! generation), and checks at random instants what a disaster at that instant
//! would leave behind (the failover cut of the real `cut` module):
//!
//! * client view ⊆ secondary view: every packet released so far has both its tag
//!   and its *true* causal history (a shadow vector maintained by the model,
//!   independent of the protocol) `<=` the cut;
//! * the cut is within the journaled prefixes, causally closed (over the vectors
//!   the backup holds and over the true histories), equals a naive reference
//!   greatest fixpoint, and so contains every committed write whose dependencies
//!   are committed;
//! * the committed vector never exceeds the journaled contiguous prefix;
//! * at every release: the tracker's committed vector dominates the tag, and each
//!   flow leaves in FIFO order (bare ACKs pushed with a zero tag make this bite);
//! * the backup's `VecHistory` agrees with the model's journal; nothing panics.
//!
//! Deliberately *not* asserted: "the cut dominates every committed vector". It is
//! false: a committed write may depend on a write of another writer that is not
//! journaled yet (see `committed_vector_need_not_be_a_closed_cut`); such a write
//! cannot be in any client's view, since every packet depending on it also
//! depends on the missing one.
//!
//! Writer reconnection follows `docs/design.md §4` (failure handling): the new
//! generation is registered with base = the backup's durable prefix, and the agent
//! resends every write above it (same seqs, same contents); writes in flight on the
//! old connection are lost, acks in flight on it arrive stale.
//!
//! A schedule without a disaster runs to quiescence and then checks liveness:
//! everything acked, every netqueue empty, every held packet released.
//!
//! Environment: `PIPECLOUD_MODEL_SCHEDULES` (default 100 000),
//! `PIPECLOUD_MODEL_SEED` (first seed, default 0), `PIPECLOUD_MODEL_THREADS`
//! (default: available parallelism), `PIPECLOUD_MODEL_TRACE=1` (print the event
//! trace of every schedule). A failing schedule's trace is printed when it is
//! replayed alone (`PIPECLOUD_MODEL_SCHEDULES=1`).

#[path = "model/adapter.rs"]
mod adapter;
#[path = "model/rng.rs"]
mod rng;

use adapter::{AckResult, Generation, History, PacketId, Pushed, Queue, Tracker};
use pipecloud_core::{CountVector, Seq, WriterId};
use rng::Rng;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

type Time = u64;

// ---------------------------------------------------------------------------
// Injected bugs (mutation check: the checker must catch every one of them)
// ---------------------------------------------------------------------------

/// A deliberately broken variant of the protocol (or `None` for the real one).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Bug {
    None,
    /// A receiving machine does not merge the vector carried by a message.
    SkipMerge,
    /// A writer's pending vector learns of its own write one write late
    /// (reading the clock before the event).
    LazyBump,
    /// The netqueue is driven by the highest acked seq instead of the
    /// contiguous acked prefix.
    NonContiguousCommit,
    /// The netqueue releases a packet when committed + 1 dominates its tag.
    OffByOneRelease,
    /// Failover uses the journaled prefixes without shrinking to a closed cut.
    OpenCut,
}

// ---------------------------------------------------------------------------
// Violations and statistics
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Check {
    ClientViewNotInCut,
    CutBeyondJournal,
    CutNotClosed,
    CutNotLargest,
    CommitBeyondJournal,
    ReleasedBeforeCommit,
    FlowReordered,
    TrackerRefusedAck,
    TrackerRefusedRegistration,
    NetQueueMisbehaved,
    NotLive,
    Panicked,
    HistoryMismatch,
}

#[derive(Debug)]
struct Violation {
    check: Check,
    time: Time,
    detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} at t={}: {}", self.check, self.time, self.detail)
    }
}

#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
struct Stats {
    schedules: u64,
    events: u64,
    disasters: u64,
    stopped: u64,
    healthy: u64,
    writes: u64,
    messages: u64,
    packets: u64,
    released: u64,
    held_at_disaster: u64,
    full_drops: u64,
    acks: u64,
    stale_acks: u64,
    dropped_writes: u64,
    reconnects: u64,
    cut_shrunk: u64,
    committed_outside_cut: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.schedules += o.schedules;
        self.events += o.events;
        self.disasters += o.disasters;
        self.stopped += o.stopped;
        self.healthy += o.healthy;
        self.writes += o.writes;
        self.messages += o.messages;
        self.packets += o.packets;
        self.released += o.released;
        self.held_at_disaster += o.held_at_disaster;
        self.full_drops += o.full_drops;
        self.acks += o.acks;
        self.stale_acks += o.stale_acks;
        self.dropped_writes += o.dropped_writes;
        self.reconnects += o.reconnects;
        self.cut_shrunk += o.cut_shrunk;
        self.committed_outside_cut += o.committed_outside_cut;
    }
}

// ---------------------------------------------------------------------------
// The simulated group
// ---------------------------------------------------------------------------

struct Machine {
    writer: Option<WriterId>,
    outbound: Option<usize>,
    neighbors: Vec<usize>,
    /// The protocol's pending vector `P_m`.
    pending: CountVector,
    /// Ground truth: the writes that happened-before the machine's current state.
    truth: CountVector,
}

/// One write as issued: the vector it carries to the backup, and its true history.
struct WriteRec {
    vector: CountVector,
    truth: CountVector,
}

/// Writer `w` runs on machine `w`.
struct Writer {
    generation: Generation,
    /// `writes[s - 1]` is write `s`.
    writes: Vec<WriteRec>,
}

struct Outbound {
    machine: usize,
    flows: u32,
    queue: Queue,
    /// Packets of each flow the netqueue holds, in push order (the model's expectation).
    held: Vec<VecDeque<PacketId>>,
    /// This outbound agent's commit tracker: fed with acks (ack fan-out mode) or
    /// with the committed vectors the backup pushes (committed-push mode).
    tracker: Tracker,
    /// What a `NonContiguousCommit` implementation would believe.
    max_acked: CountVector,
}

struct Packet {
    outbound: usize,
    flow: u32,
    tag: CountVector,
    truth: CountVector,
    released: bool,
}

struct Backup {
    generation: Vec<Generation>,
    /// `journal[w][s - 1]`: write `s` of writer `w` is durable.
    journal: Vec<Vec<bool>>,
    /// Contiguous journaled prefix of each writer.
    prefix: CountVector,
    /// The same journal as the backup's cut module sees it.
    histories: Vec<History>,
    /// Committed-push mode: the backup's tracker.
    tracker: Tracker,
    max_acked: CountVector,
}

/// How committed vectors reach the outbound machines.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum CommitMode {
    /// Every ack goes to every outbound machine's own commit tracker.
    AckFanout,
    /// The backup tracks commits itself and pushes committed vectors (merged on arrival).
    CommittedPush,
}

enum Ev {
    Tick {
        machine: usize,
    },
    Msg {
        to: usize,
        pending: CountVector,
        truth: CountVector,
    },
    WriteArrive {
        writer: usize,
        generation: Generation,
        seq: Seq,
    },
    AckArrive {
        outbound: usize,
        writer: usize,
        generation: Generation,
        first: Seq,
        last: Seq,
    },
    JournalAck {
        writer: usize,
        generation: Generation,
        first: Seq,
        last: Seq,
    },
    CommitPush {
        outbound: usize,
        committed: CountVector,
        max_acked: CountVector,
    },
    Reconnect {
        writer: usize,
    },
}

struct Sim {
    seed: u64,
    rng: Rng,
    bug: Bug,
    /// Whether the checks made at each release run (off: only disasters judge).
    release_checks: bool,
    mode: CommitMode,
    now: Time,
    order: u64,
    heap: BinaryHeap<Reverse<(Time, u64, usize)>>,
    slab: Vec<Option<Ev>>,
    machines: Vec<Machine>,
    writers: Vec<Writer>,
    outbounds: Vec<Outbound>,
    backup: Backup,
    packets: Vec<Packet>,
    budget: u32,
    /// Join of the true histories / tags of every released packet (client view).
    released_truth: CountVector,
    released_tag: CountVector,
    /// Join of every committed vector any agent ever held.
    committed_max: CountVector,
    release_buf: Vec<PacketId>,
    stats: Stats,
    trace: Option<Vec<String>>,
}

macro_rules! trace {
    ($sim:expr, $($arg:tt)*) => {
        if let Some(t) = $sim.trace.as_mut() {
            t.push(format!("t={:>5} {}", $sim.now, format_args!($($arg)*)));
        }
    };
}

macro_rules! violation {
    ($sim:expr, $check:expr, $($arg:tt)*) => {
        return Err(Violation { check: $check, time: $sim.now, detail: format!($($arg)*) })
    };
}

type Res = Result<(), Violation>;

impl Sim {
    fn new(seed: u64, bug: Bug, release_checks: bool, trace: bool) -> Sim {
        let mut rng = Rng::new(seed);
        let n_writers = rng.range(1, 4) as usize;
        let n_inter = rng.range(0, 2) as usize;
        let n_out = rng.range(1, 2) as usize;
        let mode = if rng.chance(1, 2) {
            CommitMode::AckFanout
        } else {
            CommitMode::CommittedPush
        };

        // Machines: writers first, then intermediates, then outbound-only machines.
        // An outbound role may instead fall on a writer (the single-VM case).
        let mut machines: Vec<Machine> = Vec::new();
        let new_machine = |writer| Machine {
            writer,
            outbound: None,
            neighbors: Vec::new(),
            pending: CountVector::ZERO,
            truth: CountVector::ZERO,
        };
        for w in 0..n_writers {
            machines.push(new_machine(Some(WriterId(w as u8))));
        }
        for _ in 0..n_inter {
            machines.push(new_machine(None));
        }
        let mut outbound_machines = Vec::new();
        for _ in 0..n_out {
            let free_writers: Vec<usize> = (0..n_writers)
                .filter(|&m| machines[m].outbound.is_none())
                .collect();
            let m = if !free_writers.is_empty() && rng.chance(1, 4) {
                rng.pick(&free_writers)
            } else {
                machines.push(new_machine(None));
                machines.len() - 1
            };
            machines[m].outbound = Some(outbound_machines.len());
            outbound_machines.push(m);
        }

        // Edges: a random tree in tier order (outbound -> intermediate -> writer,
        // i.e. each machine attaches to one machine of an earlier tier or its own),
        // plus random extra edges. Edges carry messages both ways (requests, replies).
        let n = machines.len();
        let tier = |m: &Machine| -> u8 {
            if m.outbound.is_some() {
                0
            } else if m.writer.is_none() {
                1
            } else {
                2
            }
        };
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&m| (tier(&machines[m]), m));
        let add_edge = |machines: &mut Vec<Machine>, a: usize, b: usize| {
            if a != b && !machines[a].neighbors.contains(&b) {
                machines[a].neighbors.push(b);
                machines[b].neighbors.push(a);
            }
        };
        for k in 1..n {
            let parent = order[rng.below(k as u64) as usize];
            add_edge(&mut machines, order[k], parent);
        }
        for a in 0..n {
            for b in (a + 1)..n {
                if rng.chance(1, 4) {
                    add_edge(&mut machines, a, b);
                }
            }
        }

        let limits = |rng: &mut Rng| -> (usize, usize) {
            if rng.chance(1, 3) {
                (rng.range(1, 12) as usize, rng.range(1500, 12_000) as usize)
            } else {
                (4096, 1 << 24)
            }
        };
        let outbounds: Vec<Outbound> = outbound_machines
            .iter()
            .map(|&m| {
                let flows = rng.range(1, 3) as u32;
                let (max_packets, max_bytes) = limits(&mut rng);
                Outbound {
                    machine: m,
                    flows,
                    queue: Queue::new(max_packets, max_bytes),
                    held: vec![VecDeque::new(); flows as usize],
                    tracker: Tracker::new(),
                    max_acked: CountVector::ZERO,
                }
            })
            .collect();
        let writers = (0..n_writers)
            .map(|_| Writer {
                generation: 1,
                writes: Vec::new(),
            })
            .collect();
        let backup = Backup {
            generation: vec![1; n_writers],
            journal: vec![Vec::new(); n_writers],
            prefix: CountVector::ZERO,
            histories: (0..n_writers).map(|_| History::default()).collect(),
            tracker: Tracker::new(),
            max_acked: CountVector::ZERO,
        };
        let budget = rng.range(10, 160) as u32;

        let mut sim = Sim {
            seed,
            rng,
            bug,
            release_checks,
            mode,
            now: 0,
            order: 0,
            heap: BinaryHeap::new(),
            slab: Vec::new(),
            machines,
            writers,
            outbounds,
            backup,
            packets: Vec::new(),
            budget,
            released_truth: CountVector::ZERO,
            released_tag: CountVector::ZERO,
            committed_max: CountVector::ZERO,
            release_buf: Vec::new(),
            stats: Stats::default(),
            trace: if trace { Some(Vec::new()) } else { None },
        };
        for w in 0..n_writers {
            if let Err(e) = sim.register_all(w, 1, 0) {
                panic!("seed {seed}: initial registration of w{w} refused: {e}");
            }
        }
        for m in 0..n {
            let t = sim.rng.range(0, 10);
            sim.schedule(t, Ev::Tick { machine: m });
        }
        trace!(
            sim,
            "topology: writers={} intermediates={} outbound={:?} mode={:?} budget={} edges={:?}",
            n_writers,
            n_inter,
            outbound_machines,
            mode,
            budget,
            sim.machines
                .iter()
                .map(|m| m.neighbors.clone())
                .collect::<Vec<_>>()
        );
        sim
    }

    fn schedule(&mut self, delay: Time, ev: Ev) {
        let idx = self.slab.len();
        self.slab.push(Some(ev));
        self.order += 1;
        self.heap.push(Reverse((self.now + delay, self.order, idx)));
    }

    fn register_all(&mut self, w: usize, generation: Generation, base: Seq) -> Result<(), String> {
        let id = WriterId(w as u8);
        match self.mode {
            CommitMode::AckFanout => {
                for o in &mut self.outbounds {
                    o.tracker.register(id, generation, base)?;
                }
                Ok(())
            }
            CommitMode::CommittedPush => self.backup.tracker.register(id, generation, base),
        }
    }

    /// The committed vector outbound `o` really holds (what the release rule must use).
    fn committed_at(&self, o: usize) -> CountVector {
        self.outbounds[o].tracker.committed()
    }

    /// The committed vector handed to the netqueue (differs only under injected bugs).
    fn fed_to_queue(&self, o: usize) -> CountVector {
        let real = self.committed_at(o);
        match self.bug {
            Bug::NonContiguousCommit => self.outbounds[o].max_acked,
            Bug::OffByOneRelease => {
                let mut v = real;
                for w in 0..self.writers.len() {
                    v.set(w, real.get(w) + 1);
                }
                v
            }
            _ => real,
        }
    }

    /// Runs the schedule. Returns after a disaster, or at quiescence (then checks liveness).
    fn run(&mut self) -> Res {
        // A disaster stops the schedule at a random event in half of the schedules;
        // "what-if" disasters are probed at random instants in all of them.
        let disaster_rate = if self.rng.chance(1, 2) {
            self.rng.range(20, 300)
        } else {
            0
        };
        let mut probes_left = 4;
        while let Some(Reverse((t, _, idx))) = self.heap.pop() {
            self.now = t;
            let ev = self.slab[idx].take().expect("event taken twice");
            self.step(ev)?;
            self.stats.events += 1;
            if disaster_rate > 0 && self.rng.chance(1, disaster_rate) {
                trace!(self, "DISASTER");
                self.stats.stopped += 1;
                self.stats.held_at_disaster += self
                    .outbounds
                    .iter()
                    .map(|o| o.queue.len() as u64)
                    .sum::<u64>();
                return self.disaster_check();
            }
            if probes_left > 0 && self.rng.chance(1, 40) {
                probes_left -= 1;
                self.disaster_check()?;
            }
        }
        self.stats.healthy += 1;
        self.disaster_check()?;
        self.liveness_check()
    }

    fn step(&mut self, ev: Ev) -> Res {
        match ev {
            Ev::Tick { machine } => self.tick(machine),
            Ev::Msg { to, pending, truth } => {
                let m = &mut self.machines[to];
                if self.bug != Bug::SkipMerge {
                    m.pending.merge(&pending);
                }
                m.truth.merge(&truth);
                trace!(
                    self,
                    "m{to} receives {pending} -> P={}",
                    self.machines[to].pending
                );
                Ok(())
            }
            Ev::WriteArrive {
                writer,
                generation,
                seq,
            } => self.write_arrive(writer, generation, seq),
            Ev::AckArrive {
                outbound,
                writer,
                generation,
                first,
                last,
            } => {
                self.stats.acks += 1;
                let id = WriterId(writer as u8);
                let res = self.outbounds[outbound]
                    .tracker
                    .ack(id, generation, first, last);
                self.outbounds[outbound].max_acked.raise(writer, last);
                let c = self.outbounds[outbound].tracker.committed();
                trace!(
                    self,
                    "o{outbound} ack w{writer} g{generation} [{first},{last}] -> {res:?} C={c}"
                );
                self.after_ack(res, c, writer, generation, first, last)?;
                self.release(outbound)
            }
            Ev::JournalAck {
                writer,
                generation,
                first,
                last,
            } => {
                self.stats.acks += 1;
                let id = WriterId(writer as u8);
                let before = self.backup.tracker.committed();
                let res = self.backup.tracker.ack(id, generation, first, last);
                self.backup.max_acked.raise(writer, last);
                let c = self.backup.tracker.committed();
                trace!(
                    self,
                    "backup ack w{writer} g{generation} [{first},{last}] -> {res:?} C={c}"
                );
                self.after_ack(res, c, writer, generation, first, last)?;
                if c != before || self.bug == Bug::NonContiguousCommit {
                    self.push_committed();
                }
                Ok(())
            }
            Ev::CommitPush {
                outbound,
                committed,
                max_acked,
            } => {
                let o = &mut self.outbounds[outbound];
                o.tracker.observe(&committed);
                o.max_acked.merge(&max_acked);
                trace!(
                    self,
                    "o{outbound} gets committed {committed} -> {}",
                    self.outbounds[outbound].tracker.committed()
                );
                self.release(outbound)
            }
            Ev::Reconnect { writer } => self.reconnect(writer),
        }
    }

    fn after_ack(
        &mut self,
        res: AckResult,
        c: CountVector,
        writer: usize,
        generation: Generation,
        first: Seq,
        last: Seq,
    ) -> Res {
        match res {
            AckResult::Accepted => {}
            AckResult::Stale => {
                self.stats.stale_acks += 1;
                if generation == self.backup.generation[writer] {
                    violation!(
                        self,
                        Check::TrackerRefusedAck,
                        "ack w{writer} g{generation} [{first},{last}] of the current generation refused as stale"
                    );
                }
            }
            AckResult::Refused(e) => violation!(
                self,
                Check::TrackerRefusedAck,
                "valid ack w{writer} g{generation} [{first},{last}] refused: {e}"
            ),
        }
        if !self.backup.prefix.dominates(&c) {
            violation!(
                self,
                Check::CommitBeyondJournal,
                "committed {c} exceeds the journaled contiguous prefix {}",
                self.backup.prefix
            );
        }
        self.committed_max.merge(&c);
        Ok(())
    }

    fn push_committed(&mut self) {
        let committed = self.backup.tracker.committed();
        let max_acked = self.backup.max_acked;
        for o in 0..self.outbounds.len() {
            let d = self.rng.wan_delay(1, 40);
            self.schedule(
                d,
                Ev::CommitPush {
                    outbound: o,
                    committed,
                    max_acked,
                },
            );
        }
    }

    fn tick(&mut self, m: usize) -> Res {
        if self.budget == 0 {
            return Ok(());
        }
        self.budget -= 1;
        let is_writer = self.machines[m].writer.is_some();
        let is_outbound = self.machines[m].outbound.is_some();
        let can_send = !self.machines[m].neighbors.is_empty();
        loop {
            let r = self.rng.below(100);
            if r < 35 {
                if is_writer {
                    self.write(m);
                    break;
                }
            } else if r < 75 {
                if can_send {
                    self.send(m);
                    break;
                }
            } else if is_outbound {
                self.emit(m)?;
                break;
            }
        }
        if is_writer && self.rng.chance(1, 120) {
            let w = self.machines[m].writer.map_or(0, |w| w.index());
            let d = self.rng.range(1, 30);
            self.schedule(d, Ev::Reconnect { writer: w });
        }
        let d = self.rng.range(1, 20);
        self.schedule(d, Ev::Tick { machine: m });
        Ok(())
    }

    fn write(&mut self, m: usize) {
        let w = self.machines[m].writer.map_or(0, |w| w.index());
        let seq = self.writers[w].writes.len() as Seq + 1;
        let mach = &mut self.machines[m];
        mach.truth.raise(w, seq);
        // `docs/design.md §3`: seq = ++P[i][i] before the write completes to the guest.
        let visible = if self.bug == Bug::LazyBump {
            seq - 1
        } else {
            seq
        };
        mach.pending.raise(w, visible);
        let mut vector = mach.pending;
        vector.set(w, seq);
        let truth = mach.truth;
        if let Some(prev) = self.writers[w].writes.last() {
            // The cut checks rely on a writer's vectors growing with its seq.
            assert!(vector.dominates(&prev.vector) && truth.dominates(&prev.truth));
        }
        self.writers[w].writes.push(WriteRec { vector, truth });
        self.stats.writes += 1;
        let generation = self.writers[w].generation;
        trace!(self, "w{w} writes seq {seq} V={vector}");
        let d = self.rng.wan_delay(1, 60);
        self.schedule(
            d,
            Ev::WriteArrive {
                writer: w,
                generation,
                seq,
            },
        );
    }

    fn send(&mut self, m: usize) {
        let nb = &self.machines[m].neighbors;
        let to = nb[self.rng.below(nb.len() as u64) as usize];
        let pending = self.machines[m].pending;
        let truth = self.machines[m].truth;
        self.stats.messages += 1;
        trace!(self, "m{m} -> m{to} carries {pending}");
        let d = self.rng.range(1, 30);
        self.schedule(d, Ev::Msg { to, pending, truth });
    }

    fn emit(&mut self, m: usize) -> Res {
        let o = self.machines[m].outbound.unwrap_or(0);
        let flow = self.rng.below(u64::from(self.outbounds[o].flows)) as u32;
        let id = self.packets.len() as PacketId;
        // One packet in five is a bare TCP ACK pushed with a zero tag: it carries
        // no application data, but it must still not overtake its flow.
        let (tag, truth, bytes) = if self.rng.chance(1, 5) {
            (CountVector::ZERO, CountVector::ZERO, 40)
        } else {
            let m = &self.machines[m];
            (m.pending, m.truth, self.rng.range(40, 1500) as usize)
        };
        self.packets.push(Packet {
            outbound: o,
            flow,
            tag,
            truth,
            released: false,
        });
        self.stats.packets += 1;
        let fed = self.fed_to_queue(o);
        let res = self.outbounds[o].queue.push(flow, &tag, bytes, id, &fed);
        trace!(self, "o{o} emits p{id} flow {flow} tag {tag} -> {res:?}");
        match res {
            Pushed::Released(h) => {
                if h != id {
                    violation!(
                        self,
                        Check::NetQueueMisbehaved,
                        "push of p{id} released p{h}"
                    );
                }
                if !self.outbounds[o].held[flow as usize].is_empty() {
                    violation!(
                        self,
                        Check::FlowReordered,
                        "p{id} released at push while flow {flow} of o{o} still holds {:?}",
                        self.outbounds[o].held[flow as usize]
                    );
                }
                self.on_release(o, id)
            }
            Pushed::Held => {
                self.outbounds[o].held[flow as usize].push_back(id);
                Ok(())
            }
            Pushed::Full(h) => {
                if h != id {
                    violation!(
                        self,
                        Check::NetQueueMisbehaved,
                        "push of p{id} refused p{h}"
                    );
                }
                self.stats.full_drops += 1;
                Ok(())
            }
        }
    }

    fn release(&mut self, o: usize) -> Res {
        let fed = self.fed_to_queue(o);
        let mut out = std::mem::take(&mut self.release_buf);
        out.clear();
        self.outbounds[o].queue.release(&fed, &mut out);
        let mut res = Ok(());
        for &id in &out {
            let p = &self.packets[id as usize];
            let flow = p.flow as usize;
            if p.outbound != o {
                res = Err(Violation {
                    check: Check::NetQueueMisbehaved,
                    time: self.now,
                    detail: format!("o{o} released p{id} of o{}", p.outbound),
                });
                break;
            }
            if self.release_checks && self.outbounds[o].held[flow].front() != Some(&id) {
                res = Err(Violation {
                    check: Check::FlowReordered,
                    time: self.now,
                    detail: format!(
                        "o{o} released p{id} of flow {flow}, expected head of {:?}",
                        self.outbounds[o].held[flow]
                    ),
                });
                break;
            }
            if let Some(pos) = self.outbounds[o].held[flow].iter().position(|h| *h == id) {
                self.outbounds[o].held[flow].remove(pos);
            }
            res = self.on_release(o, id);
            if res.is_err() {
                break;
            }
        }
        self.release_buf = out;
        res
    }

    fn on_release(&mut self, o: usize, id: PacketId) -> Res {
        let committed = self.committed_at(o);
        let p = &mut self.packets[id as usize];
        if p.released {
            violation!(self, Check::NetQueueMisbehaved, "p{id} released twice");
        }
        p.released = true;
        let (tag, truth) = (p.tag, p.truth);
        trace!(self, "o{o} RELEASES p{id} tag {tag} (C={committed})");
        if self.release_checks && !committed.dominates(&tag) {
            violation!(
                self,
                Check::ReleasedBeforeCommit,
                "o{o} released p{id} tag {tag} while committed is {committed}"
            );
        }
        self.released_tag.merge(&tag);
        self.released_truth.merge(&truth);
        self.stats.released += 1;
        Ok(())
    }

    fn write_arrive(&mut self, w: usize, generation: Generation, seq: Seq) -> Res {
        if generation != self.backup.generation[w] {
            // Sent on a connection that has since been replaced: lost in flight.
            self.stats.dropped_writes += 1;
            trace!(self, "backup drops w{w} seq {seq} of old g{generation}");
            return Ok(());
        }
        let journal = &mut self.backup.journal[w];
        let s = seq as usize;
        if journal.len() < s {
            journal.resize(s, false);
        }
        journal[s - 1] = true;
        let mut p = self.backup.prefix.get(w) as usize;
        while journal.get(p).copied().unwrap_or(false) {
            p += 1;
        }
        self.backup.prefix.set(w, p as Seq);
        let history = &mut self.backup.histories[w];
        history.insert(seq, self.writers[w].writes[s - 1].vector);
        if history.durable_prefix() != p as Seq {
            violation!(
                self,
                Check::HistoryMismatch,
                "w{w}: history durable prefix {} but journal prefix {p}",
                self.backup.histories[w].durable_prefix()
            );
        }
        let journal = &self.backup.journal[w];
        // Ack a random range of the journaled run containing `seq`.
        let mut lo = s;
        while lo > 1 && journal[lo - 2] {
            lo -= 1;
        }
        let mut hi = s;
        while hi < journal.len() && journal[hi] {
            hi += 1;
        }
        let first = self.rng.range(lo as u64, seq);
        let last = self.rng.range(seq, hi as u64);
        trace!(
            self,
            "backup journals w{w} seq {seq} (prefix {p}), acks [{first},{last}]"
        );
        let copies = if self.rng.chance(1, 8) { 2 } else { 1 };
        for _ in 0..copies {
            match self.mode {
                CommitMode::AckFanout => {
                    for o in 0..self.outbounds.len() {
                        let d = self.rng.wan_delay(1, 40);
                        self.schedule(
                            d,
                            Ev::AckArrive {
                                outbound: o,
                                writer: w,
                                generation,
                                first,
                                last,
                            },
                        );
                    }
                }
                CommitMode::CommittedPush => {
                    let d = self.rng.range(0, 10);
                    self.schedule(
                        d,
                        Ev::JournalAck {
                            writer: w,
                            generation,
                            first,
                            last,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// The writer's connection is replaced: writes and acks in flight on the old
    /// one are lost or stale; the backup tells the writer's agent its durable
    /// prefix, the tracker(s) register the new generation with that base, and the
    /// agent resends everything above it from its buffer.
    fn reconnect(&mut self, w: usize) -> Res {
        self.stats.reconnects += 1;
        let generation = self.backup.generation[w] + 1;
        self.backup.generation[w] = generation;
        self.writers[w].generation = generation;
        let base = self.backup.prefix.get(w);
        trace!(self, "w{w} reconnects as g{generation}, durable {base}");
        if let Err(e) = self.register_all(w, generation, base) {
            violation!(
                self,
                Check::TrackerRefusedRegistration,
                "registration of w{w} g{generation} base {base} refused: {e}"
            );
        }
        let c = match self.mode {
            CommitMode::AckFanout => {
                let mut c = CountVector::ZERO;
                for o in &self.outbounds {
                    c.merge(&o.tracker.committed());
                }
                c
            }
            CommitMode::CommittedPush => self.backup.tracker.committed(),
        };
        if !self.backup.prefix.dominates(&c) {
            violation!(
                self,
                Check::CommitBeyondJournal,
                "after register: committed {c} exceeds the journaled prefix {}",
                self.backup.prefix
            );
        }
        self.committed_max.merge(&c);
        let last = self.writers[w].writes.len() as Seq;
        for seq in base + 1..=last {
            let d = self.rng.wan_delay(1, 60);
            self.schedule(
                d,
                Ev::WriteArrive {
                    writer: w,
                    generation,
                    seq,
                },
            );
        }
        match self.mode {
            CommitMode::AckFanout => {
                for o in 0..self.outbounds.len() {
                    self.release(o)?;
                }
                Ok(())
            }
            CommitMode::CommittedPush => {
                self.push_committed();
                Ok(())
            }
        }
    }

    /// What a disaster right now would leave: the failover cut and its checks.
    fn disaster_check(&mut self) -> Res {
        self.stats.disasters += 1;
        let n = self.writers.len();
        let prefixes: Vec<Vec<CountVector>> = (0..n)
            .map(|w| {
                let p = self.backup.prefix.get(w) as usize;
                self.writers[w].writes[..p]
                    .iter()
                    .map(|r| r.vector)
                    .collect()
            })
            .collect();
        let cut = if self.bug == Bug::OpenCut {
            self.backup.prefix
        } else {
            adapter::largest_closed_cut(&self.backup.histories)
        };
        trace!(
            self,
            "disaster check: journaled {} cut {cut} client view {}",
            self.backup.prefix,
            self.released_truth
        );
        if cut != self.backup.prefix {
            self.stats.cut_shrunk += 1;
        }
        if !self.backup.prefix.dominates(&cut) {
            violation!(
                self,
                Check::CutBeyondJournal,
                "cut {cut} exceeds the journaled prefixes {}",
                self.backup.prefix
            );
        }
        // Closed over what the backup holds and over the true histories. Vectors of
        // one writer grow with seq (asserted at issue), so the top write suffices.
        for (w, writer) in self.writers.iter().enumerate() {
            let s = cut.get(w);
            if s > 0 {
                let rec = &writer.writes[s as usize - 1];
                if !cut.dominates(&rec.vector) || !cut.dominates(&rec.truth) {
                    violation!(
                        self,
                        Check::CutNotClosed,
                        "cut {cut} includes w{w} seq {s} with vector {} / true history {}",
                        rec.vector,
                        rec.truth
                    );
                }
            }
        }
        let reference = reference_cut(&prefixes);
        if cut != reference {
            violation!(
                self,
                Check::CutNotLargest,
                "cut {cut} differs from the largest closed cut {reference}"
            );
        }
        // Committed writes whose dependencies are committed are in the cut.
        let committed_closed = reference_cut(
            &prefixes
                .iter()
                .enumerate()
                .map(|(w, p)| p[..self.committed_max.get(w).min(p.len() as Seq) as usize].to_vec())
                .collect::<Vec<_>>(),
        );
        if !cut.dominates(&committed_closed) {
            violation!(
                self,
                Check::CutNotLargest,
                "cut {cut} misses committed closed writes {committed_closed}"
            );
        }
        // Not a violation: a committed write may depend on an uncommitted one.
        if !cut.dominates(&self.committed_max) {
            self.stats.committed_outside_cut += 1;
        }
        // Client view ⊆ secondary view.
        if !cut.dominates(&self.released_truth) || !cut.dominates(&self.released_tag) {
            let culprit = self
                .packets
                .iter()
                .enumerate()
                .find(|(_, p)| p.released && (!cut.dominates(&p.truth) || !cut.dominates(&p.tag)))
                .map(|(i, p)| {
                    format!(
                        "p{i} of o{} tag {} true history {}",
                        p.outbound, p.tag, p.truth
                    )
                })
                .unwrap_or_default();
            violation!(
                self,
                Check::ClientViewNotInCut,
                "released {culprit} is not contained in the failover cut {cut} (journaled {})",
                self.backup.prefix
            );
        }
        Ok(())
    }

    /// Healthy backup at quiescence: everything acked, every held packet released.
    fn liveness_check(&mut self) -> Res {
        let mut all = CountVector::ZERO;
        for (w, writer) in self.writers.iter().enumerate() {
            all.set(w, writer.writes.len() as Seq);
        }
        if self.backup.prefix != all {
            violation!(
                self,
                Check::NotLive,
                "journaled {} of issued {all}",
                self.backup.prefix
            );
        }
        for o in 0..self.outbounds.len() {
            let c = self.committed_at(o);
            if c != all {
                violation!(self, Check::NotLive, "o{o} committed {c} of issued {all}");
            }
            let ob = &self.outbounds[o];
            let held: usize = ob.held.iter().map(|h| h.len()).sum();
            if ob.queue.len() != 0 || held != 0 {
                violation!(
                    self,
                    Check::NotLive,
                    "o{o} (m{}) still holds {} packets ({held} expected) at quiescence",
                    ob.machine,
                    ob.queue.len()
                );
            }
        }
        Ok(())
    }
}

/// Naive greatest fixpoint: start from the journaled prefixes, shrink any writer
/// whose top included write depends on something outside, until nothing changes.
fn reference_cut(prefixes: &[Vec<CountVector>]) -> CountVector {
    let mut cut = CountVector::ZERO;
    for (w, p) in prefixes.iter().enumerate() {
        cut.set(w, p.len() as Seq);
    }
    loop {
        let mut changed = false;
        for (w, p) in prefixes.iter().enumerate() {
            while cut.get(w) > 0 && !cut.dominates(&p[cut.get(w) as usize - 1]) {
                cut.set(w, cut.get(w) - 1);
                changed = true;
            }
        }
        if !changed {
            return cut;
        }
    }
}

// ---------------------------------------------------------------------------
// Runner
// ---------------------------------------------------------------------------

struct Failure {
    seed: u64,
    violation: Violation,
    trace: Option<Vec<String>>,
}

fn run_schedule(seed: u64, bug: Bug, release_checks: bool, trace: bool) -> Result<Stats, Failure> {
    let mut sim = Sim::new(seed, bug, release_checks, trace);
    // The modules under test assert their own invariants: a panic is a violation too.
    let res = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run())) {
        Ok(res) => res,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(Violation {
                check: Check::Panicked,
                time: sim.now,
                detail: msg,
            })
        }
    };
    sim.stats.schedules = 1;
    if trace && std::env::var("PIPECLOUD_MODEL_TRACE").is_ok_and(|v| v == "1") {
        if let Some(t) = &sim.trace {
            eprintln!("--- seed {seed} ---\n{}", t.join("\n"));
        }
    }
    match res {
        Ok(()) => Ok(sim.stats),
        Err(violation) => Err(Failure {
            seed: sim.seed,
            violation,
            trace: sim.trace.take(),
        }),
    }
}

/// Runs `count` seeds from `start` on `threads` threads; stops at the first failure.
fn run_many(
    start: u64,
    count: u64,
    bug: Bug,
    release_checks: bool,
    threads: usize,
    trace: bool,
) -> Result<Stats, Failure> {
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<Failure>> = Mutex::new(None);
    let total = Mutex::new(Stats::default());
    let threads = threads.max(1) as u64;
    // Seed each thread is running, for the no-progress diagnostic below.
    let current: Vec<AtomicU64> = (0..threads).map(|_| AtomicU64::new(u64::MAX)).collect();
    let finished = AtomicU64::new(0);
    let completed = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (stop, failure, total) = (&stop, &failure, &total);
            let (current, finished, completed) = (&current, &finished, &completed);
            s.spawn(move || {
                let mut local = Stats::default();
                let mut k = t;
                while k < count && !stop.load(Ordering::Relaxed) {
                    let seed = start.wrapping_add(k);
                    current[t as usize].store(seed, Ordering::Relaxed);
                    let res = run_schedule(seed, bug, release_checks, trace);
                    completed.fetch_add(1, Ordering::Relaxed);
                    match res {
                        Ok(st) => local.add(&st),
                        Err(f) => {
                            stop.store(true, Ordering::Relaxed);
                            let mut slot = failure.lock().unwrap();
                            if slot.as_ref().is_none_or(|g| f.seed < g.seed) {
                                *slot = Some(f);
                            }
                            break;
                        }
                    }
                    k += threads;
                }
                total.lock().unwrap().add(&local);
                finished.fetch_add(1, Ordering::Relaxed);
            });
        }
        // A module under test that loops forever would hang the test without a
        // seed: after a long stretch with no completed schedule, say which seeds
        // are running (a diagnostic only; nothing is asserted on time).
        let mut last = 0;
        let mut idle = 0;
        while finished.load(Ordering::Relaxed) < threads {
            std::thread::sleep(std::time::Duration::from_millis(100));
            let now = completed.load(Ordering::Relaxed);
            if now != last {
                (last, idle) = (now, 0);
                continue;
            }
            idle += 1;
            if idle == 600 {
                let seeds: Vec<u64> = current.iter().map(|c| c.load(Ordering::Relaxed)).collect();
                eprintln!(
                    "model: no schedule finished for a minute; seeds in progress {seeds:?} \
                     (replay one with PIPECLOUD_MODEL_SEED=<seed> PIPECLOUD_MODEL_SCHEDULES=1)"
                );
            }
        }
    });
    match failure.into_inner().unwrap() {
        Some(f) => Err(f),
        None => Ok(total.into_inner().unwrap()),
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?}: {e}")),
        Err(_) => default,
    }
}

fn default_threads() -> usize {
    let avail = std::thread::available_parallelism().map_or(1, |n| n.get());
    env_u64("PIPECLOUD_MODEL_THREADS", avail as u64) as usize
}

#[test]
fn model_100k_schedules() {
    let count = env_u64("PIPECLOUD_MODEL_SCHEDULES", 100_000);
    assert!(
        count > 0,
        "PIPECLOUD_MODEL_SCHEDULES=0 runs no schedule, so nothing would be checked; \
         set it to 1 or more (default 100 000)"
    );
    let start = env_u64("PIPECLOUD_MODEL_SEED", 0);
    let trace = count == 1 || std::env::var("PIPECLOUD_MODEL_TRACE").is_ok_and(|v| v == "1");
    let began = std::time::Instant::now();
    match run_many(start, count, Bug::None, true, default_threads(), trace) {
        Ok(s) => {
            eprintln!(
                "model: {} schedules, {} disasters, {} packets released, 0 violations \
                 (seeds {start}..{}, {:.1?}; {} events, {} writes, {} messages, {} packets, \
                 {} held at a stopping disaster, {} refused as full, {} acks ({} stale), \
                 {} reconnects, {} writes lost in flight, {} cuts shrunk below the journal, \
                 {} cuts not dominating the committed vector, {} stopped by disaster, \
                 {} ran to quiescence)",
                s.schedules,
                s.disasters,
                s.released,
                start.wrapping_add(count),
                began.elapsed(),
                s.events,
                s.writes,
                s.messages,
                s.packets,
                s.held_at_disaster,
                s.full_drops,
                s.acks,
                s.stale_acks,
                s.reconnects,
                s.dropped_writes,
                s.cut_shrunk,
                s.committed_outside_cut,
                s.stopped,
                s.healthy,
            );
            assert_eq!(s.schedules, count);
            assert!(
                s.schedules > 0,
                "the model ran no schedule: nothing was checked"
            );
        }
        Err(f) => {
            if let Some(t) = &f.trace {
                eprintln!("--- trace of seed {} ---\n{}", f.seed, t.join("\n"));
            }
            panic!(
                "model violation at seed {}: {}\nreplay: PIPECLOUD_MODEL_SEED={} PIPECLOUD_MODEL_SCHEDULES=1 \
                 cargo test --release -p pipecloud-core --test model -- model_100k_schedules --nocapture",
                f.seed, f.violation, f.seed
            );
        }
    }
}

/// Each injected bug must be caught within this many schedules.
const MUTATION_BUDGET: u64 = 20_000;

/// Runs the broken variant `bug` until a check fires; with `release_checks`
/// off only the disaster checks judge. Returns the check that fired.
fn assert_caught(bug: Bug, release_checks: bool) -> Check {
    match run_many(0, MUTATION_BUDGET, bug, release_checks, 1, false) {
        Ok(s) => panic!(
            "injected bug {bug:?} (release checks {release_checks}) went unnoticed through {} \
             schedules: the model is vacuous",
            s.schedules
        ),
        Err(f) => {
            eprintln!(
                "model: injected bug {bug:?} (release checks {release_checks}) caught at seed {}: {}",
                f.seed, f.violation
            );
            f.violation.check
        }
    }
}

/// The bug is caught, and also caught by the failover (client view ⊆ secondary
/// view) check alone.
fn assert_caught_by_disaster(bug: Bug) {
    assert_caught(bug, true);
    let check = assert_caught(bug, false);
    assert_eq!(check, Check::ClientViewNotInCut, "{bug:?}");
}

#[test]
fn catches_skipped_merge() {
    assert_caught_by_disaster(Bug::SkipMerge);
}

#[test]
fn catches_bump_after_completion() {
    assert_caught_by_disaster(Bug::LazyBump);
}

#[test]
fn catches_non_contiguous_commit() {
    assert_caught_by_disaster(Bug::NonContiguousCommit);
}

#[test]
fn catches_off_by_one_release() {
    assert_caught_by_disaster(Bug::OffByOneRelease);
}

#[test]
fn catches_unclosed_failover_cut() {
    let check = assert_caught(Bug::OpenCut, true);
    assert!(
        matches!(check, Check::CutNotClosed | Check::CutNotLargest),
        "{check:?}"
    );
}

/// Why the model does not assert "cut >= every committed vector": writer 1's
/// first write depends on writer 0's first write; the backup journals (and acks)
/// writer 1's before writer 0's arrives. Committed is `[0,1]`, yet the failover
/// cut must drop writer 1's write. No packet can depend on it without also
/// depending on writer 0's write, so no client ever saw it.
#[test]
fn committed_vector_need_not_be_a_closed_cut() {
    let mut histories = vec![History::default(), History::default()];
    histories[1].insert(1, CountVector::from_slice(&[1, 1]));
    let cut = adapter::largest_closed_cut(&histories);
    let committed = CountVector::from_slice(&[0, 1]);
    assert_eq!(cut, CountVector::ZERO);
    assert!(!cut.dominates(&committed));
    // Once writer 0's write is journaled too, both are in.
    histories[0].insert(1, CountVector::from_slice(&[1]));
    let cut = adapter::largest_closed_cut(&histories);
    assert_eq!(cut, CountVector::from_slice(&[1, 1]));
}

#[test]
fn schedules_replay_identically() {
    for seed in [0, 1, 7, 12_345, u64::MAX] {
        let a = run_schedule(seed, Bug::None, true, true)
            .ok()
            .expect("schedule failed");
        let b = run_schedule(seed, Bug::None, true, true)
            .ok()
            .expect("schedule failed");
        assert_eq!(a, b, "seed {seed} is not deterministic");
    }
}
