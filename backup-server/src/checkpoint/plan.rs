//! The pure part of checkpoint ingest: checkpoint frames in, what to persist and
//! which epoch to acknowledge out.
//!
//! One [`Ledger`] per group. Connection tasks feed it every checkpoint frame
//! ([`Ledger::frame`]): it validates the frame against the connection's position in
//! the per-machine sequence `Begin / Pages* / Device* / End` … `Commit` (see
//! `pipecloud_core::wire::Checkpoint`) and against what the group knows (RAM size
//! of each machine, the last acknowledged epoch, each agent's last committed
//! epoch), and answers a [`Step`] for the checkpoint thread to persist, or a
//! rejection reason (the connection is then closed). The checkpoint thread reports
//! back when an agent's commit is durable ([`Ledger::durable`]); with the group's
//! committed vector (durable per-writer disk prefixes, from the journal thread)
//! [`Ledger::ready`] names the epoch that may be acknowledged and
//! [`Ledger::ack`] records that it was (after the thread persisted it). No I/O, no
//! clocks, no locks here.
//!
//! **Rule: an epoch is acknowledged only when it is durable and complete.**
//! Epoch `E` may be acked iff
//! 1. every *member* of the group (every agent that has ever sent a checkpoint
//!    frame to it) has committed `E`: each of its machines sent `Begin … End` with
//!    the counts matching what arrived, then `Commit { E, barrier }`;
//! 2. every commit of an epoch `<= E` still pending (the ones applied to the RAM
//!    replica together with `E`) is durable: its staged pages and device state
//!    were fsync'ed and then its commit marker was written and fsync'ed;
//! 3. the group's committed vector dominates the barriers of the commits of `E`
//!    (the disk writes each writer issued before the pause are durable in the
//!    journal);
//! 4. the replica it implies is complete: a machine's epoch that is not *full*
//!    (all of its RAM sent, contiguously from offset 0) is a delta on the same
//!    machine's previous epoch, which must have been committed (enforced at `End`:
//!    a delta on an epoch the backup never got is rejected).
//!
//! Proof sketch: an epoch is acked only from [`Ledger::ready`], which checks 1–4
//! directly (4 against each machine's chain in the replica, [`Durable::chain`];
//! `End` also refuses a delta on an epoch the backup does not hold, early). The RAM replica at `E` is the in-order application of every
//! committed part `<= E` (2 makes all of them durable, 4 makes the chain of deltas
//! of each machine gap-free back to a full epoch), the device state is the newest
//! committed one `<= E`, the disks are the journal at the barrier (3). Torn parts
//! (no `End`, no `Commit`, or a connection lost in between) never enter a commit and
//! are discarded. [`Ledger::ack`] re-checks 1–4 with an always-on `assert!`: an ack
//! the rule does not allow is a bug in the checkpoint thread, and the server stops
//! rather than acknowledge a checkpoint a crash could lose.
//!
//! Bounds: at most [`MAX_PENDING_EPOCHS`] epochs beyond the acknowledged one are
//! held (a `Begin` further ahead is rejected: a member that stopped committing
//! stalls the group's output, as it must); per connection one open machine; at
//! most [`MAX_MACHINES`] machines and as many agents per group.

use pipecloud_core::codec::validate_name;
use pipecloud_core::wire::{Checkpoint, PageEncoding, PAGE_SIZE};
use pipecloud_core::CountVector;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Most epochs beyond the acknowledged one the backup holds (staged on disk).
pub const MAX_PENDING_EPOCHS: u64 = 64;
/// Most checkpointed machines, and most checkpointing agents, per group.
pub const MAX_MACHINES: usize = 64;

/// One machine's part of one epoch, as committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub machine: String,
    /// Unique id of the staged files of this part (`<machine>.<id>.pages/.dev`).
    pub id: u64,
    pub ram_bytes: u64,
    pub pages: u64,
    pub device_bytes: u64,
    /// All of the RAM was sent (a full epoch; not a delta on the previous one).
    pub full: bool,
}

/// One agent's commit of one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub agent: String,
    pub epoch: u64,
    pub barrier: CountVector,
    pub parts: Vec<Part>,
}

/// What the checkpoint thread persists for a validated frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Create the staged files of part `id` (machine `machine`, epoch `epoch`).
    Open {
        epoch: u64,
        machine: String,
        id: u64,
        /// Staged parts (epoch, id) to delete first: an older connection's epoch
        /// in progress, or the superseded commits below.
        discard: Vec<(u64, u64)>,
        /// Commit markers (epoch, agent) to delete, durably, before anything else
        /// of this connection: a restarted agent's commits it starts over from.
        drop_commits: Vec<(u64, String)>,
    },
    /// Append pages at RAM offset `offset` to part `id`'s pages file.
    Pages {
        epoch: u64,
        id: u64,
        machine: String,
        offset: u64,
        /// As received; `on_frame` decodes it to `Raw` before the step is queued
        /// (the checkpoint thread stages only full pages).
        encoding: PageEncoding,
        data: Vec<u8>,
    },
    /// Write device-state bytes at `offset` of part `id`'s device file.
    Device {
        epoch: u64,
        id: u64,
        machine: String,
        offset: u64,
        data: Vec<u8>,
    },
    /// Nothing to persist (an `End`: checked and remembered by the ledger).
    None,
    /// Make the parts durable, then the commit marker; then report
    /// [`Ledger::durable`].
    Commit(Commit),
}

/// A part being received.
#[derive(Clone, Debug)]
struct Open {
    machine: String,
    id: u64,
    epoch: u64,
    ram_bytes: u64,
    pages: u64,
    device_bytes: u64,
    /// End of the pages received so far while they are contiguous from 0.
    contiguous: Option<u64>,
}

/// Per connection: where it is in the frame sequence.
#[derive(Clone, Debug)]
struct Conn {
    agent: String,
    /// Epoch in progress (a `Begin` seen, no `Commit` yet).
    epoch: Option<u64>,
    open: Option<Open>,
    /// Closed parts of the epoch in progress.
    parts: Vec<Part>,
    /// The connection committed an epoch.
    committed_any: bool,
}

/// Pending (not yet acknowledged) commits of one epoch, per agent, with durability.
type Pending = BTreeMap<u64, BTreeMap<String, (Commit, bool)>>;

/// What the group's checkpoint state says, durable across restarts (see the
/// checkpoint store).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Durable {
    /// Last acknowledged epoch (0: none).
    pub acked: u64,
    /// Elementwise max of the barriers of the acknowledged epoch's commits.
    pub barrier: CountVector,
    /// Agents that checkpoint in this group.
    pub members: BTreeSet<String>,
    /// RAM size of every machine ever seen.
    pub ram: BTreeMap<String, u64>,
    /// Each machine's newest epoch in the replica (the acknowledged chain).
    pub chain: BTreeMap<String, u64>,
}

/// The group's checkpoint bookkeeping (see the module documentation).
#[derive(Debug, Default)]
pub struct Ledger {
    d: Durable,
    /// Last epoch each agent committed (pending or acked).
    agent_last: BTreeMap<String, u64>,
    /// Last committed epoch of each machine (pending or acked).
    machine_last: BTreeMap<String, u64>,
    /// Owner agent of each machine (from its commits).
    owner: BTreeMap<String, String>,
    pending: Pending,
    conns: BTreeMap<u64, Conn>,
    /// Machine -> connection currently sending a part of it.
    busy: BTreeMap<String, u64>,
    next_id: u64,
}

impl Ledger {
    /// A ledger from the durable state and the durable commits found beyond it
    /// (after a restart); `next_id` is above every staged file id still on disk.
    pub fn new(d: Durable, commits: Vec<Commit>, next_id: u64) -> Ledger {
        let mut l = Ledger {
            d,
            next_id,
            ..Ledger::default()
        };
        for c in commits {
            if c.epoch <= l.d.acked {
                continue;
            }
            l.note_commit(&c);
            l.d.members.insert(c.agent.clone());
            l.pending
                .entry(c.epoch)
                .or_default()
                .insert(c.agent.clone(), (c, true));
        }
        l
    }

    /// The durable state as of the last acknowledgement.
    pub fn durable_state(&self) -> &Durable {
        &self.d
    }

    /// Last acknowledged epoch.
    pub fn acked(&self) -> u64 {
        self.d.acked
    }

    /// Whether the group checkpoints at all (some agent ever sent a checkpoint frame).
    pub fn is_checkpoint_group(&self) -> bool {
        !self.d.members.is_empty()
    }

    /// Epochs held beyond the acknowledged one.
    pub fn pending_epochs(&self) -> usize {
        self.pending.len()
    }

    fn note_commit(&mut self, c: &Commit) {
        let a = self.agent_last.entry(c.agent.clone()).or_default();
        *a = (*a).max(c.epoch);
        for p in &c.parts {
            let m = self.machine_last.entry(p.machine.clone()).or_default();
            *m = (*m).max(c.epoch);
            self.owner.insert(p.machine.clone(), c.agent.clone());
            self.d.ram.entry(p.machine.clone()).or_insert(p.ram_bytes);
        }
    }

    /// A connection of `agent` was opened.
    pub fn connect(&mut self, conn: u64, agent: &str) {
        self.conns.insert(
            conn,
            Conn {
                agent: agent.to_string(),
                epoch: None,
                open: None,
                parts: Vec::new(),
                committed_any: false,
            },
        );
    }

    /// The connection is gone: its epoch in progress is torn. Returns the staged
    /// parts to discard (epoch, id).
    pub fn disconnect(&mut self, conn: u64) -> Vec<(u64, u64)> {
        let torn = self.tear(conn);
        self.conns.remove(&conn);
        torn
    }

    /// Drops `agent`'s pending commits of epochs `>= from` (a restarted agent
    /// starts over there). Returns their staged parts and epochs. The agent's
    /// machines without a remaining pending commit must send a full epoch next.
    fn supersede(&mut self, agent: &str, from: u64) -> (Vec<(u64, u64)>, Vec<u64>) {
        let mut parts = Vec::new();
        let mut epochs = Vec::new();
        for (e, cs) in self.pending.range_mut(from..) {
            if let Some((c, _)) = cs.remove(agent) {
                epochs.push(*e);
                parts.extend(c.parts.iter().map(|p| (*e, p.id)));
            }
        }
        self.pending.retain(|_, cs| !cs.is_empty());
        let mut last = 0;
        let mut machines: BTreeMap<String, u64> = BTreeMap::new();
        for (e, cs) in &self.pending {
            if let Some((c, _)) = cs.get(agent) {
                last = *e;
                for p in &c.parts {
                    machines.insert(p.machine.clone(), *e);
                }
            }
        }
        self.agent_last.insert(agent.to_string(), last);
        for (m, owner) in &self.owner {
            if owner == agent {
                match machines.get(m) {
                    Some(e) => self.machine_last.insert(m.clone(), *e),
                    None => self.machine_last.remove(m),
                };
            }
        }
        (parts, epochs)
    }

    /// Tears the epoch in progress of `conn` (its later frames of it are refused).
    fn tear(&mut self, conn: u64) -> Vec<(u64, u64)> {
        let Some(c) = self.conns.get_mut(&conn) else {
            return Vec::new();
        };
        let mut torn = Vec::new();
        let epoch = c.epoch.take().unwrap_or(0);
        if let Some(o) = c.open.take() {
            self.busy.remove(&o.machine);
            torn.push((o.epoch, o.id));
        }
        for p in std::mem::take(&mut c.parts) {
            self.busy.remove(&p.machine);
            torn.push((epoch, p.id));
        }
        torn
    }

    /// Validates one checkpoint frame of connection `conn` (see the module docs).
    pub fn frame(&mut self, conn: u64, f: Checkpoint) -> Result<Step, String> {
        let acked = self.d.acked;
        let Some(c) = self.conns.get_mut(&conn) else {
            return Err("checkpoint frame on an unknown connection".into());
        };
        let agent = c.agent.clone();
        match f {
            Checkpoint::Begin {
                machine,
                epoch,
                ram_bytes,
            } => {
                validate_name(&machine).map_err(|e| e.to_string())?;
                let mut restart = false;
                if let Some(o) = &c.open {
                    return Err(format!(
                        "checkpoint begin of {machine} epoch {epoch} while {} epoch {} is open (no End)",
                        o.machine, o.epoch
                    ));
                }
                match c.epoch {
                    Some(e) if e != epoch => {
                        return Err(format!(
                            "checkpoint begin of {machine} for epoch {epoch} inside epoch {e} (no Commit of {e})"
                        ))
                    }
                    Some(_) => {}
                    None => {
                        let last = self.agent_last.get(&agent).copied().unwrap_or(0);
                        // A restarted agent (first epoch of a connection) may start
                        // over above the acknowledged epoch: its commits from there on
                        // are superseded.
                        restart = epoch > acked && epoch <= last && !c.committed_any;
                        if epoch <= acked || (epoch <= last && !restart) {
                            return Err(format!(
                                "checkpoint epoch {epoch} out of order: the group acknowledged epoch {acked}, \
                                 agent {agent} committed epoch {last}; epochs must increase"
                            ));
                        }
                        if epoch > acked + MAX_PENDING_EPOCHS {
                            return Err(format!(
                                "checkpoint epoch {epoch} is more than {MAX_PENDING_EPOCHS} epochs beyond the \
                                 acknowledged epoch {acked} (some agent of the group stopped committing)"
                            ));
                        }
                    }
                }
                if c.parts.iter().any(|p| p.machine == machine) {
                    return Err(format!(
                        "checkpoint begin of {machine} twice in epoch {epoch}"
                    ));
                }
                if !self.d.ram.contains_key(&machine)
                    && self.d.ram.len() + c.parts.len() >= MAX_MACHINES
                {
                    return Err(format!(
                        "checkpoint begin of {machine}: the group has {MAX_MACHINES} checkpointed machines already"
                    ));
                }
                if !self.d.members.contains(&agent) && self.d.members.len() >= MAX_MACHINES {
                    return Err(format!(
                        "checkpoint begin by agent {agent}: the group has {MAX_MACHINES} checkpointing agents already"
                    ));
                }
                if let Some(&r) = self.d.ram.get(&machine) {
                    if r != ram_bytes {
                        return Err(format!(
                            "checkpoint begin of {machine}: RAM size {ram_bytes} differs from the {r} bytes of its earlier epochs"
                        ));
                    }
                }
                if let Some(o) = self.owner.get(&machine) {
                    if *o != agent {
                        return Err(format!(
                            "checkpoint begin of {machine}: the machine is checkpointed by agent {o}, not {agent}"
                        ));
                    }
                }
                let mut discard = Vec::new();
                if let Some(&other) = self.busy.get(&machine) {
                    // The same agent reconnected while its old connection lingers
                    // (half open): the old connection's epoch in progress is torn.
                    let same = self.conns.get(&other).is_some_and(|o| o.agent == agent);
                    if !same || other == conn {
                        return Err(format!(
                            "checkpoint begin of {machine}: connection {other} is sending it"
                        ));
                    }
                    discard = self.tear(other);
                }
                let mut drop_commits = Vec::new();
                if restart {
                    let (parts, markers) = self.supersede(&agent, epoch);
                    discard.extend(parts);
                    drop_commits = markers.into_iter().map(|e| (e, agent.clone())).collect();
                }
                let Some(c) = self.conns.get_mut(&conn) else {
                    return Err("checkpoint frame on an unknown connection".into());
                };
                let id = self.next_id;
                self.next_id += 1;
                self.busy.insert(machine.clone(), conn);
                c.epoch = Some(epoch);
                c.open = Some(Open {
                    machine: machine.clone(),
                    id,
                    epoch,
                    ram_bytes,
                    pages: 0,
                    device_bytes: 0,
                    contiguous: Some(0),
                });
                self.d.members.insert(agent);
                Ok(Step::Open {
                    epoch,
                    machine,
                    id,
                    discard,
                    drop_commits,
                })
            }
            Checkpoint::Pages {
                epoch,
                offset,
                encoding,
                data,
            } => {
                let o = open_of(c, epoch, "pages")?;
                let len = encoding.page_bytes(data.len());
                if offset.checked_add(len).is_none_or(|end| end > o.ram_bytes) {
                    return Err(format!(
                        "checkpoint pages of {} at {offset}+{len} beyond its RAM of {} bytes",
                        o.machine, o.ram_bytes
                    ));
                }
                o.pages += len / PAGE_SIZE;
                o.contiguous = o.contiguous.filter(|&e| e == offset).map(|e| e + len);
                Ok(Step::Pages {
                    epoch,
                    id: o.id,
                    machine: o.machine.clone(),
                    offset,
                    encoding,
                    data,
                })
            }
            Checkpoint::Device {
                epoch,
                offset,
                data,
            } => {
                let o = open_of(c, epoch, "device")?;
                if offset != o.device_bytes {
                    return Err(format!(
                        "checkpoint device state of {} at offset {offset}, expected {} (chunks in order)",
                        o.machine, o.device_bytes
                    ));
                }
                o.device_bytes += data.len() as u64;
                Ok(Step::Device {
                    epoch,
                    id: o.id,
                    machine: o.machine.clone(),
                    offset,
                    data,
                })
            }
            Checkpoint::End {
                epoch,
                pages,
                device_bytes,
            } => {
                let o = open_of(c, epoch, "end")?;
                if o.pages != pages || o.device_bytes != device_bytes {
                    return Err(format!(
                        "checkpoint end of {} epoch {epoch}: says {pages} pages / {device_bytes} device bytes, \
                         {} / {} arrived",
                        o.machine, o.pages, o.device_bytes
                    ));
                }
                let full = o.contiguous == Some(o.ram_bytes);
                let prev = self.machine_last.get(&o.machine).copied().unwrap_or(0);
                if !full && (prev == 0 || prev + 1 != epoch) {
                    return Err(format!(
                        "checkpoint epoch {epoch} of {} is a delta, but the backup holds its epoch {prev} \
                         as the last one (not {}): send a full epoch (all of its RAM)",
                        o.machine,
                        epoch - 1
                    ));
                }
                let o = c.open.take().ok_or("no open machine")?;
                c.parts.push(Part {
                    machine: o.machine,
                    id: o.id,
                    ram_bytes: o.ram_bytes,
                    pages: o.pages,
                    device_bytes: o.device_bytes,
                    full,
                });
                Ok(Step::None)
            }
            Checkpoint::Commit { epoch, barrier } => {
                if let Some(o) = &c.open {
                    return Err(format!(
                        "checkpoint commit of epoch {epoch} while {} is open (no End)",
                        o.machine
                    ));
                }
                if c.epoch != Some(epoch) || c.parts.is_empty() {
                    return Err(format!(
                        "checkpoint commit of epoch {epoch} without its Begin/End (epoch in progress: {:?})",
                        c.epoch
                    ));
                }
                let parts = std::mem::take(&mut c.parts);
                c.epoch = None;
                c.committed_any = true;
                for p in &parts {
                    self.busy.remove(&p.machine);
                }
                let commit = Commit {
                    agent: agent.clone(),
                    epoch,
                    barrier,
                    parts,
                };
                self.note_commit(&commit);
                self.pending
                    .entry(epoch)
                    .or_default()
                    .insert(agent, (commit.clone(), false));
                Ok(Step::Commit(commit))
            }
            Checkpoint::Ack { .. } => {
                Err("checkpoint Ack frames go from the backup to agents".into())
            }
        }
    }

    /// The checkpoint thread made `agent`'s commit of `epoch` durable.
    pub fn durable(&mut self, agent: &str, epoch: u64) {
        if let Some((_, d)) = self.pending.get_mut(&epoch).and_then(|e| e.get_mut(agent)) {
            *d = true;
        }
    }

    /// Why `epoch` may not be acked now, or its barrier if it may (rule 1–3).
    fn check(
        &self,
        epoch: u64,
        committed: &CountVector,
    ) -> Result<(CountVector, BTreeMap<String, u64>), String> {
        let Some(commits) = self.pending.get(&epoch) else {
            return Err(format!("no commit of epoch {epoch}"));
        };
        if let Some(m) = self.d.members.iter().find(|m| !commits.contains_key(*m)) {
            return Err(format!("agent {m} has not committed epoch {epoch}"));
        }
        for (e, cs) in self.pending.range(..=epoch) {
            if let Some((a, _)) = cs.iter().find(|(_, (_, d))| !*d) {
                return Err(format!("the commit of epoch {e} by {a} is not durable"));
            }
        }
        // Rule 4 again, at the ack: every machine's chain in the replica is intact
        // at E (a delta continues the previous epoch; a full epoch restarts the
        // chain). Defence in depth: End refuses a broken delta when it arrives.
        let mut chain = self.d.chain.clone();
        let mut broken: BTreeMap<String, u64> = BTreeMap::new();
        for (e, cs) in self.pending.range(..=epoch) {
            for (c, _) in cs.values() {
                for p in &c.parts {
                    let last = chain.get(&p.machine).copied().unwrap_or(0);
                    if p.full {
                        broken.remove(&p.machine);
                    } else if last == 0 || last + 1 != *e {
                        broken.insert(p.machine.clone(), *e);
                    }
                    chain.insert(p.machine.clone(), *e);
                }
            }
        }
        if let Some((m, e)) = broken.iter().next() {
            return Err(format!(
                "epoch {e} of {m} is a delta on an epoch the replica's chain does not hold, and no full epoch of {m} follows it up to {epoch}"
            ));
        }
        let mut barrier = CountVector::ZERO;
        for (c, _) in commits.values() {
            barrier.merge(&c.barrier);
        }
        if !committed.dominates(&barrier) {
            return Err(format!(
                "disk writes up to the barrier {barrier} are not all durable (committed {committed})"
            ));
        }
        Ok((barrier, chain))
    }

    /// The newest epoch that may be acknowledged now given the group's committed
    /// vector (durable disk prefixes), if any.
    pub fn ready(&self, committed: &CountVector) -> Option<u64> {
        self.pending
            .keys()
            .rev()
            .copied()
            .find(|&e| self.check(e, committed).is_ok())
    }

    /// What an acknowledgement of `epoch` makes durable (to persist before acking).
    pub fn would_ack(&self, epoch: u64, committed: &CountVector) -> Result<Durable, String> {
        let (barrier, chain) = self.check(epoch, committed)?;
        let mut d = self.d.clone();
        d.acked = epoch;
        d.barrier = barrier;
        d.chain = chain;
        Ok(d)
    }

    /// Records that `epoch` was acknowledged (its [`Ledger::would_ack`] state is
    /// persisted). Returns the commits `<= epoch` to apply to the RAM replica, in
    /// epoch order.
    ///
    /// # Panics
    /// If `epoch` may not be acknowledged (rule 1–4 of the module documentation).
    pub fn ack(&mut self, epoch: u64, committed: &CountVector) -> Vec<Commit> {
        let (barrier, chain) = match self.check(epoch, committed) {
            Ok(b) => b,
            Err(why) => panic!("BUG: acknowledging checkpoint epoch {epoch}: {why}"),
        };
        self.d.acked = epoch;
        self.d.barrier = barrier;
        self.d.chain = chain;
        let rest = self.pending.split_off(&(epoch + 1));
        let done = std::mem::replace(&mut self.pending, rest);
        done.into_values()
            .flat_map(|cs| cs.into_values().map(|(c, _)| c))
            .collect()
    }
}

fn open_of<'a>(c: &'a mut Conn, epoch: u64, what: &str) -> Result<&'a mut Open, String> {
    match c.open.as_mut() {
        Some(o) if o.epoch == epoch => Ok(o),
        Some(o) => Err(format!(
            "checkpoint {what} for epoch {epoch} while {} epoch {} is open",
            o.machine, o.epoch
        )),
        None => Err(format!(
            "checkpoint {what} for epoch {epoch} without a Begin"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RAM: u64 = 4 * PAGE_SIZE;

    fn begin(m: &str, epoch: u64) -> Checkpoint {
        Checkpoint::Begin {
            machine: m.into(),
            epoch,
            ram_bytes: RAM,
        }
    }
    fn pages(epoch: u64, page: u64, n: u64) -> Checkpoint {
        Checkpoint::Pages {
            epoch,
            offset: page * PAGE_SIZE,
            encoding: PageEncoding::Raw,
            data: vec![7; (n * PAGE_SIZE) as usize],
        }
    }
    fn dev(epoch: u64, offset: u64, n: usize) -> Checkpoint {
        Checkpoint::Device {
            epoch,
            offset,
            data: vec![1; n],
        }
    }
    fn end(epoch: u64, pages: u64, device_bytes: u64) -> Checkpoint {
        Checkpoint::End {
            epoch,
            pages,
            device_bytes,
        }
    }
    fn commit(epoch: u64, barrier: &[u64]) -> Checkpoint {
        Checkpoint::Commit {
            epoch,
            barrier: CountVector::from_slice(barrier),
        }
    }
    fn v(x: &[u64]) -> CountVector {
        CountVector::from_slice(x)
    }

    /// A recovered, durable one-page delta commit of vm1 by agent a.
    fn delta_commit(epoch: u64, barrier: &[u64], id: u64) -> Commit {
        Commit {
            agent: "a".into(),
            epoch,
            barrier: v(barrier),
            parts: vec![Part {
                machine: "vm1".into(),
                id,
                ram_bytes: RAM,
                pages: 1,
                device_bytes: 0,
                full: false,
            }],
        }
    }

    /// A recovered state: epoch `acked` acknowledged, vm1's chain at `chain`.
    fn recovered(acked: u64, chain: u64) -> Durable {
        Durable {
            acked,
            members: ["a".to_string()].into(),
            chain: [("vm1".to_string(), chain)].into(),
            ..Durable::default()
        }
    }

    /// A whole machine epoch: full (all pages) or a delta of one page.
    fn machine(l: &mut Ledger, conn: u64, m: &str, epoch: u64, full: bool) {
        l.frame(conn, begin(m, epoch)).unwrap();
        let n = if full { 4 } else { 1 };
        l.frame(conn, pages(epoch, 0, n)).unwrap();
        l.frame(conn, dev(epoch, 0, 10)).unwrap();
        l.frame(conn, end(epoch, n, 10)).unwrap();
    }

    #[test]
    fn one_agent_epoch_is_acked_only_when_durable_and_barrier_durable() {
        let mut l = Ledger::default();
        l.connect(1, "a");
        machine(&mut l, 1, "vm1", 1, true);
        machine(&mut l, 1, "vm2", 1, true);
        let Step::Commit(c) = l.frame(1, commit(1, &[5])).unwrap() else {
            panic!("commit step expected")
        };
        assert_eq!(c.parts.len(), 2);
        assert!(c
            .parts
            .iter()
            .all(|p| p.full && p.pages == 4 && p.device_bytes == 10));
        assert_eq!(l.ready(&v(&[9])), None, "not durable yet");
        l.durable("a", 1);
        assert_eq!(l.ready(&v(&[4])), None, "barrier write 5 not durable");
        assert_eq!(l.ready(&v(&[5])), Some(1));
        let d = l.would_ack(1, &v(&[5])).unwrap();
        assert_eq!((d.acked, d.barrier), (1, v(&[5])));
        let applied = l.ack(1, &v(&[5]));
        assert_eq!(applied, vec![c]);
        assert_eq!(l.acked(), 1);
        assert_eq!(l.ready(&v(&[5])), None);
        // A delta on epoch 1 is fine now.
        machine(&mut l, 1, "vm1", 2, false);
    }

    #[test]
    fn all_members_must_commit() {
        let mut l = Ledger::default();
        l.connect(1, "a");
        l.connect(2, "b");
        machine(&mut l, 1, "vm1", 1, true);
        l.frame(1, commit(1, &[3, 0])).unwrap();
        l.durable("a", 1);
        machine(&mut l, 2, "vm2", 1, true);
        assert_eq!(l.ready(&v(&[9, 9])), None, "b has not committed epoch 1");
        l.frame(2, commit(1, &[0, 4])).unwrap();
        l.durable("b", 1);
        assert_eq!(l.ready(&v(&[3, 3])), None, "union barrier is [3,4]");
        assert_eq!(l.ready(&v(&[3, 4])), Some(1));
        assert_eq!(l.would_ack(1, &v(&[3, 4])).unwrap().barrier, v(&[3, 4]));
    }

    #[test]
    fn newest_complete_epoch_is_acked_with_every_commit_before_it() {
        let mut l = Ledger::default();
        l.connect(1, "a");
        l.connect(2, "b");
        // Epoch 1: a commits, b is torn (its connection drops).
        machine(&mut l, 1, "vm1", 1, true);
        l.frame(1, commit(1, &[1])).unwrap();
        l.durable("a", 1);
        machine(&mut l, 2, "vm2", 1, true);
        assert_eq!(l.disconnect(2).len(), 1);
        l.connect(3, "b");
        // b must send a full epoch 2 (its epoch 1 never arrived)...
        l.frame(3, begin("vm2", 2)).unwrap();
        l.frame(3, pages(2, 0, 1)).unwrap();
        let e = l.frame(3, end(2, 1, 0)).unwrap_err();
        assert!(e.contains("send a full epoch"), "{e}");
        l.disconnect(3); // the server closes a connection whose frame it rejects
        l.connect(4, "b");
        machine(&mut l, 4, "vm2", 2, true);
        l.frame(4, commit(2, &[0])).unwrap();
        l.durable("b", 2);
        machine(&mut l, 1, "vm1", 2, false);
        l.frame(1, commit(2, &[2])).unwrap();
        assert_eq!(l.ready(&v(&[2])), None, "a's epoch 2 not durable");
        l.durable("a", 2);
        assert_eq!(l.ready(&v(&[2])), Some(2));
        let applied = l.ack(2, &v(&[2]));
        let epochs: Vec<(u64, String)> =
            applied.iter().map(|c| (c.epoch, c.agent.clone())).collect();
        assert_eq!(
            epochs,
            vec![(1, "a".into()), (2, "a".into()), (2, "b".into())],
            "a's epoch 1 is applied under a's delta of epoch 2"
        );
    }

    #[test]
    fn hostile_frames_are_rejected() {
        let mut l = Ledger::default();
        l.connect(1, "a");
        let expect = |l: &mut Ledger, f: Checkpoint, what: &str| {
            let e = l.frame(1, f).unwrap_err();
            assert!(e.contains(what), "{e:?} should mention {what:?}");
        };
        expect(&mut l, commit(1, &[0]), "without its Begin");
        expect(&mut l, pages(1, 0, 1), "without a Begin");
        expect(&mut l, end(1, 0, 0), "without a Begin");
        expect(&mut l, Checkpoint::Ack { epoch: 1 }, "backup to agents");
        l.frame(1, begin("vm1", 3)).unwrap();
        expect(&mut l, begin("vm2", 3), "is open");
        expect(&mut l, pages(2, 0, 1), "is open");
        expect(&mut l, pages(3, 3, 2), "beyond its RAM");
        expect(&mut l, dev(3, 5, 1), "expected 0");
        expect(&mut l, commit(3, &[0]), "is open");
        l.frame(1, pages(3, 0, 4)).unwrap();
        expect(&mut l, end(3, 3, 0), "arrived");
        l.frame(1, end(3, 4, 0)).unwrap();
        expect(&mut l, begin("vm1", 3), "twice");
        expect(&mut l, begin("vm2", 4), "inside epoch 3");
        expect(&mut l, commit(4, &[0]), "without its Begin");
        l.frame(1, commit(3, &[0])).unwrap();
        expect(&mut l, begin("vm1", 3), "out of order");
        expect(&mut l, begin("vm1", 2), "out of order");
        expect(
            &mut l,
            Checkpoint::Begin {
                machine: "vm1".into(),
                epoch: 4,
                ram_bytes: RAM * 2,
            },
            "differs",
        );
        expect(&mut l, begin("vm1", 3 + MAX_PENDING_EPOCHS + 1), "beyond");
        // Bounded machines per group.
        l.frame(1, begin("vm1", 4)).unwrap();
        l.frame(1, pages(4, 0, 1)).unwrap();
        l.frame(1, end(4, 1, 0)).unwrap();
        for i in 2..MAX_MACHINES {
            let m = format!("m{i}");
            l.frame(1, begin(&m, 4)).unwrap();
            l.frame(1, pages(4, 0, 4)).unwrap();
            l.frame(1, end(4, 4, 0)).unwrap();
        }
        expect(
            &mut l,
            begin("one-too-many", 4),
            "checkpointed machines already",
        );
        l.disconnect(1);
        l.connect(1, "a");
        // Another agent may not checkpoint a machine of a.
        l.connect(2, "b");
        let e = l.frame(2, begin("vm1", 4)).unwrap_err();
        assert!(e.contains("checkpointed by agent a"), "{e}");
        // A second connection of a supersedes the first one's epoch in progress.
        l.connect(3, "a");
        l.frame(1, begin("vm1", 4)).unwrap();
        let Step::Open { discard, .. } = l.frame(3, begin("vm1", 4)).unwrap() else {
            panic!("open step expected")
        };
        assert_eq!(discard.len(), 1);
        let e = l.frame(1, pages(4, 0, 1)).unwrap_err();
        assert!(e.contains("without a Begin"), "{e}");
    }

    #[test]
    fn a_restarted_agent_starts_over_above_the_ack() {
        let mut l = Ledger::default();
        l.connect(1, "a");
        for e in 1..=4 {
            machine(&mut l, 1, "vm1", e, e == 1);
            l.frame(1, commit(e, &[0])).unwrap();
            l.durable("a", e);
        }
        l.ack(2, &v(&[0]));
        // The agent restarts and starts over at epoch 3 (it learned epoch 2 from the
        // Ack on connect): its commits 3 and 4 are superseded.
        l.connect(2, "a");
        assert!(l
            .frame(2, begin("vm1", 2))
            .unwrap_err()
            .contains("out of order"));
        l.disconnect(2);
        l.connect(3, "a");
        let Step::Open {
            discard,
            drop_commits,
            ..
        } = l.frame(3, begin("vm1", 3)).unwrap()
        else {
            panic!("open step expected")
        };
        assert_eq!(discard.len(), 2);
        assert_eq!(
            drop_commits,
            vec![(3, "a".to_string()), (4, "a".to_string())]
        );
        assert_eq!(l.pending_epochs(), 0);
        // Its machine must send a full epoch: the chain was cut.
        l.frame(3, pages(3, 0, 1)).unwrap();
        assert!(l.frame(3, end(3, 1, 0)).unwrap_err().contains("full epoch"));
        l.disconnect(3);
        l.connect(4, "a");
        machine(&mut l, 4, "vm1", 3, true);
        l.frame(4, commit(3, &[0])).unwrap();
        // Within a connection, epochs still only increase.
        assert!(l
            .frame(4, begin("vm1", 3))
            .unwrap_err()
            .contains("out of order"));
    }

    #[test]
    fn a_delta_whose_chain_is_broken_is_never_acked() {
        // A delta on epoch 4 recovered while the replica's chain of vm1 ends at 2
        // (epochs 3-4 of vm1 never made it): epoch 5 must not be acknowledged.
        let c = delta_commit(5, &[0], 1);
        let d = recovered(4, 2);
        let mut l = Ledger::new(d, vec![c], 2);
        assert_eq!(l.ready(&v(&[0])), None);
        assert!(l
            .would_ack(5, &v(&[0]))
            .unwrap_err()
            .contains("chain does not hold"));
        // A full epoch of vm1 restores the chain: epoch 6 may be acknowledged.
        l.connect(1, "a");
        machine(&mut l, 1, "vm1", 6, true);
        l.frame(1, commit(6, &[0])).unwrap();
        l.durable("a", 6);
        assert_eq!(l.ready(&v(&[0])), Some(6));
    }

    #[test]
    #[should_panic(expected = "is not durable")]
    fn ack_before_the_commit_is_durable_is_refused_loudly() {
        let mut l = Ledger::default();
        l.connect(1, "a");
        machine(&mut l, 1, "vm1", 1, true);
        l.frame(1, commit(1, &[0])).unwrap();
        // The injected bug: the thread acks on Commit, before the marker is fsync'ed.
        l.ack(1, &v(&[0]));
    }

    #[test]
    #[should_panic(expected = "not all durable")]
    fn ack_before_the_barrier_is_durable_is_refused_loudly() {
        let mut l = Ledger::default();
        l.connect(1, "a");
        machine(&mut l, 1, "vm1", 1, true);
        l.frame(1, commit(1, &[2])).unwrap();
        l.durable("a", 1);
        l.ack(1, &v(&[1]));
    }

    #[test]
    fn recovery_keeps_durable_commits_beyond_the_ack() {
        let c = delta_commit(5, &[1], 9);
        let d = recovered(4, 4);
        let mut l = Ledger::new(d, vec![c], 10);
        assert_eq!(l.ready(&v(&[1])), Some(5));
        l.connect(1, "a");
        let Step::Open { id, .. } = l.frame(1, begin("vm1", 6)).unwrap() else {
            panic!("open step expected")
        };
        assert_eq!(id, 10, "ids continue above the ones on disk");
        l.frame(1, pages(6, 2, 1)).unwrap();
        l.frame(1, end(6, 1, 0)).unwrap(); // a delta on the recovered epoch 5
    }

    /// One agent action in the random schedules.
    #[derive(Clone, Debug)]
    enum Act {
        /// Agent `a` sends a whole epoch of its machine (full or delta), maybe torn
        /// before `End` or before `Commit`.
        Epoch { a: usize, full: bool, torn: u8 },
        /// The thread makes agent `a`'s oldest non-durable commit durable.
        Durable { a: usize },
        /// The journal makes writer `a`'s next write durable.
        Disk { a: usize },
        /// Agent `a` reconnects.
        Reconnect { a: usize },
    }

    fn act() -> impl Strategy<Value = Act> {
        prop_oneof![
            (0..2usize, any::<bool>(), 0..6u8).prop_map(|(a, full, torn)| Act::Epoch {
                a,
                full,
                torn
            }),
            (0..2usize).prop_map(|a| Act::Durable { a }),
            (0..2usize).prop_map(|a| Act::Disk { a }),
            (0..2usize).prop_map(|a| Act::Reconnect { a }),
        ]
    }

    proptest! {
        /// Against an independent reference: every ack names an epoch that each
        /// member committed with matching counts, every commit up to it is durable,
        /// the disk barrier is durable, and each machine's applied chain starts
        /// with a full epoch and has no gap.
        #[test]
        fn acks_follow_the_rule(acts in proptest::collection::vec(act(), 1..120)) {
            let agents = ["a", "b"];
            let mut l = Ledger::default();
            let mut conn = [1u64, 2];
            let mut next_conn = 3;
            l.connect(1, "a");
            l.connect(2, "b");
            let mut epoch = [0u64; 2];          // last epoch each agent started
            let mut seq = [0u64; 2];            // writes issued per writer
            let mut disk = [0u64; 2];           // durable prefix per writer
            let mut committed: Vec<(usize, u64, u64, bool)> = Vec::new(); // agent, epoch, barrier, durable
            let mut applied: [Vec<(u64, bool)>; 2] = [Vec::new(), Vec::new()];
            let mut members = std::collections::BTreeSet::new();
            for a in acts {
                match a {
                    Act::Epoch { a, full, torn } => {
                        let e = epoch[0].max(epoch[1]).max(l.acked()) + 1;
                        epoch[a] = e;
                        seq[a] += 1;
                        let c = conn[a];
                        // A rejected frame closes the connection (the agent reconnects).
                        let mut reject = |l: &mut Ledger| {
                            l.disconnect(conn[a]);
                            conn[a] = next_conn;
                            l.connect(next_conn, agents[a]);
                            next_conn += 1;
                        };
                        if l.frame(c, begin(agents[a], e)).is_err() { reject(&mut l); continue; }
                        members.insert(a);
                        let n = if full { 4 } else { 1 };
                        prop_assert!(l.frame(c, pages(e, 0, n)).is_ok());
                        if torn == 0 { reject(&mut l); continue; }
                        if l.frame(c, end(e, n, 0)).is_err() {
                            // Only a delta without its previous epoch may be refused.
                            prop_assert!(!full);
                            reject(&mut l);
                            continue;
                        }
                        if torn == 1 { reject(&mut l); continue; }
                        let mut b = [0u64; 2];
                        b[a] = seq[a];
                        prop_assert!(l.frame(c, commit(e, &b)).is_ok());
                        committed.push((a, e, seq[a], false));
                    }
                    Act::Durable { a } => {
                        if let Some(x) = committed.iter_mut().find(|x| x.0 == a && !x.3) {
                            x.3 = true;
                            l.durable(agents[a], x.1);
                        }
                    }
                    Act::Disk { a } => disk[a] = (disk[a] + 1).min(seq[a]),
                    Act::Reconnect { a } => {
                        l.disconnect(conn[a]);
                        conn[a] = next_conn;
                        l.connect(next_conn, agents[a]);
                        next_conn += 1;
                    }
                }
                let cv = v(&disk);
                if let Some(e) = l.ready(&cv) {
                    // Reference check of the rule.
                    for &m in &members {
                        let c = committed.iter().find(|x| x.0 == m && x.1 == e);
                        prop_assert!(c.is_some_and(|c| c.3), "member {m} has no durable commit of {e}");
                        prop_assert!(c.is_some_and(|c| disk[m] >= c.2), "barrier of {m} not durable");
                    }
                    prop_assert!(committed.iter().filter(|x| x.1 <= e).all(|x| x.3));
                    for c in l.ack(e, &cv) {
                        let a = agents.iter().position(|x| *x == c.agent).unwrap_or(0);
                        for p in c.parts {
                            applied[a].push((c.epoch, p.full));
                        }
                    }
                    committed.retain(|x| x.1 > e);
                }
            }
            for chain in &applied {
                if let Some(first) = chain.first() {
                    prop_assert!(first.1, "a machine's first applied epoch must be full: {chain:?}");
                }
                for w in chain.windows(2) {
                    prop_assert!(w[1].1 || w[1].0 == w[0].0 + 1, "gap in the delta chain: {chain:?}");
                }
            }
        }
    }
}
