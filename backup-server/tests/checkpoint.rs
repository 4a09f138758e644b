//! Full-state (checkpoint) epochs against the real, unprivileged server over mutual
//! TLS, driven by a test agent that sends epochs of a small guest (RAM pages,
//! device state) interleaved with disk writes:
//!
//! - an epoch is acknowledged only once its Commit arrived and the disk writes up
//!   to its barrier are durable (withheld Commit / withheld barrier writes: no Ack);
//! - a torn last epoch (no End, no Commit) is never used;
//! - hostile checkpoint frames close the connection with a clear reason;
//! - failover writes the disk at the last acknowledged barrier exactly (not the
//!   writes after it), the RAM image and the device state of that epoch, and
//!   `checkpoint.toml`;
//! - crash: the server is SIGKILLed mid-epoch many times; after each restart the
//!   failover output is always a complete acknowledged epoch, never older than the
//!   newest Ack the agent received.
//!
//! - the run-time switch (docs/design.md §13): a seeded epoch sent as several
//!   segments (a full pre-copy without device state, a round, the pause) is
//!   acknowledged and resumed; a `Leave` is acknowledged only once the disk-only
//!   state is persisted (a SIGKILL right after its Ack still fails over disk-only,
//!   with no `checkpoint.toml`), and the epochs pending at it are dropped; a group
//!   seeding a new period fails over disk-only; after a `Leave`, a delta is refused
//!   (the next period must send all of the RAM).
//!
//! The injected fault (`--features fault-ack-on-commit`: the server acks on Commit,
//! before anything is durable) makes `acks_wait_for_commit_and_barrier…` fail.

mod common;

use common::*;
use pipecloud_core::wire::{Checkpoint, Frame, PageEncoding, PAGE_SIZE};
use pipecloud_core::{CountVector, Seq};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;
use tokio::sync::mpsc;

const DISK: u64 = 1 << 20;
const RAM_PAGES: u64 = 96;
const RAM: u64 = RAM_PAGES * PAGE_SIZE;
/// Largest pages frame the test agent sends.
const CHUNK_PAGES: u64 = 32;
/// How long the absence of an Ack is watched for (a missing Ack never fails a
/// correct server; a premature one is caught by the injected fault run).
const QUIET: Duration = Duration::from_millis(700);

/// What the resumed machine must be at one epoch.
#[derive(Clone)]
struct Snapshot {
    ram: Vec<u8>,
    dev: Vec<u8>,
    barrier: Seq,
}

/// The test agent's guest: RAM, device state, a disk written by writer 0.
struct Guest {
    ram: Vec<u8>,
    dirty: BTreeSet<u64>,
    dev: Vec<u8>,
    /// Every disk write issued: seq -> (offset, len).
    writes: BTreeMap<Seq, (u64, usize)>,
    /// Committed epochs (a restarted agent may commit an epoch number again: every
    /// version is a complete epoch the backup may hold).
    snaps: BTreeMap<u64, Vec<Snapshot>>,
    rng: Rng,
}

impl Guest {
    fn new(seed: u64) -> Guest {
        Guest {
            ram: vec![0; RAM as usize],
            dirty: BTreeSet::new(),
            dev: Vec::new(),
            writes: BTreeMap::new(),
            snaps: BTreeMap::new(),
            rng: Rng(seed | 1),
        }
    }

    /// The guest runs a little: dirties pages, changes its device state.
    fn run(&mut self) {
        for _ in 0..1 + self.rng.below(12) {
            let p = self.rng.below(RAM_PAGES);
            let b = self.rng.next() as u8;
            let o = (p * PAGE_SIZE) as usize;
            for (i, x) in self.ram[o..o + PAGE_SIZE as usize].iter_mut().enumerate() {
                *x = b.wrapping_add(i as u8);
            }
            self.dirty.insert(p);
        }
        let n = 100 + self.rng.below(3000) as usize;
        let r = self.rng.next();
        self.dev = (0..n).map(|i| (r >> (i % 56)) as u8 ^ i as u8).collect();
    }

    /// The next disk write (4 KiB somewhere on the disk).
    fn write(&mut self) -> Frame {
        let seq = self.writes.keys().next_back().copied().unwrap_or(0) + 1;
        let offset = self.rng.below(DISK / 4096) * 4096;
        self.writes.insert(seq, (offset, 4096));
        write_frame(seq, offset, 4096)
    }

    fn last_seq(&self) -> Seq {
        self.writes.keys().next_back().copied().unwrap_or(0)
    }

    /// One epoch of machine `vm1`: Begin / Pages / Device / End, and Commit when `commit`.
    fn epoch(&mut self, epoch: u64, full: bool, commit: bool) -> Vec<Frame> {
        let mut f = vec![ck(Checkpoint::Begin {
            machine: "vm1".into(),
            epoch,
            ram_bytes: RAM,
        })];
        let pages: Vec<u64> = if full {
            (0..RAM_PAGES).collect()
        } else {
            self.dirty.iter().copied().collect()
        };
        // Runs of consecutive pages, at most CHUNK_PAGES each.
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && pages[j] == pages[j - 1] + 1 && (j - i) < CHUNK_PAGES as usize
            {
                j += 1;
            }
            let o = (pages[i] * PAGE_SIZE) as usize;
            let e = ((pages[j - 1] + 1) * PAGE_SIZE) as usize;
            f.push(ck(Checkpoint::Pages {
                epoch,
                offset: o as u64,
                encoding: PageEncoding::Raw,
                data: self.ram[o..e].to_vec(),
            }));
            i = j;
        }
        for (k, c) in self.dev.chunks(1000).enumerate() {
            f.push(ck(Checkpoint::Device {
                epoch,
                offset: (k * 1000) as u64,
                data: c.to_vec(),
            }));
        }
        f.push(ck(Checkpoint::End {
            epoch,
            pages: pages.len() as u64,
            device_bytes: self.dev.len() as u64,
        }));
        self.dirty.clear();
        if commit {
            let barrier = self.last_seq();
            f.push(ck(Checkpoint::Commit {
                epoch,
                barrier: CountVector::from_slice(&[barrier]),
            }));
            self.snaps.entry(epoch).or_default().push(Snapshot {
                ram: self.ram.clone(),
                dev: self.dev.clone(),
                barrier,
            });
        }
        f
    }

    /// The disk at `barrier`: every write up to it, in seq order.
    fn disk_at(&self, barrier: Seq) -> Vec<u8> {
        let mut img = vec![0u8; DISK as usize];
        for (s, (o, len)) in self.writes.range(..=barrier) {
            apply_ref(&mut img, *o, &payload(0, *s, *len));
        }
        img
    }
}

fn ck(c: Checkpoint) -> Frame {
    Frame::Checkpoint(c)
}

fn write_frame(seq: Seq, offset: u64, len: usize) -> Frame {
    write(
        0,
        1,
        seq,
        0,
        offset,
        CountVector::from_slice(&[seq]),
        payload(0, seq, len),
    )
}

/// Frames from the server, collected by a reader task.
struct Inbox(mpsc::UnboundedReceiver<Frame>);

impl Inbox {
    fn spawn(mut rd: backup_server::client::ClientReader) -> Inbox {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(f)) = rd.recv().await {
                if tx.send(f).is_err() {
                    break;
                }
            }
        });
        Inbox(rx)
    }

    /// Waits for `Ack { epoch >= e }`; returns the epoch acked.
    async fn ack(&mut self, e: u64) -> u64 {
        let r = tokio::time::timeout(PATIENCE, async {
            loop {
                match self.0.recv().await {
                    Some(Frame::Checkpoint(Checkpoint::Ack { epoch })) if epoch >= e => {
                        return epoch
                    }
                    Some(Frame::Reject { reason }) => panic!("rejected: {reason}"),
                    Some(_) => {}
                    None => panic!("connection closed while waiting for the Ack of epoch {e}"),
                }
            }
        })
        .await;
        r.unwrap_or_else(|_| panic!("no Ack of epoch {e} within {PATIENCE:?}"))
    }

    /// Waits until the group's committed vector has writer 0 at `seq` or beyond.
    async fn committed(&mut self, seq: Seq) {
        let r = tokio::time::timeout(PATIENCE, async {
            loop {
                match self.0.recv().await {
                    Some(Frame::Committed { vector }) if vector.get(0) >= seq => return,
                    Some(Frame::Reject { reason }) => panic!("rejected: {reason}"),
                    Some(_) => {}
                    None => panic!("connection closed while waiting for write {seq} to be durable"),
                }
            }
        })
        .await;
        r.unwrap_or_else(|_| panic!("write {seq} not durable within {PATIENCE:?}"))
    }

    /// Asserts that no checkpoint Ack arrives within [`QUIET`].
    async fn no_ack(&mut self, why: &str) {
        let t = tokio::time::Instant::now() + QUIET;
        loop {
            match tokio::time::timeout_at(t, self.0.recv()).await {
                Err(_) => return,
                Ok(Some(Frame::Checkpoint(Checkpoint::Ack { epoch }))) => {
                    panic!("Ack of epoch {epoch} although {why}")
                }
                Ok(Some(_)) => {}
                Ok(None) => panic!("connection closed ({why})"),
            }
        }
    }

    /// Waits for the server's Reject (and the close).
    async fn reject(&mut self) -> String {
        let r = tokio::time::timeout(PATIENCE, async {
            loop {
                match self.0.recv().await {
                    Some(Frame::Reject { reason }) => return reason,
                    Some(_) => {}
                    None => panic!("closed without a Reject"),
                }
            }
        })
        .await;
        r.expect("no Reject")
    }
}

const PATIENCE: Duration = Duration::from_secs(60);

/// Runs `failover` of group `ck` into `out` (through the server if one runs);
/// returns its stdout.
fn failover(env: &Env, out: &Path) -> String {
    let (ok, stdout, stderr) = env.cli(&[
        "failover",
        "--group",
        "ck",
        "--out",
        out.to_str().expect("utf8"),
        "--config",
        env.config.to_str().expect("utf8"),
    ]);
    assert!(ok, "failover failed: {stderr}");
    stdout
}

/// Runs `failover` and checks its output against the guest's snapshot of the
/// epoch it names; returns that epoch and which committed version of it matched.
fn check_failover(env: &Env, g: &Guest, out: &Path) -> (u64, usize) {
    let stdout = failover(env, out);
    let manifest = std::fs::read_to_string(out.join("checkpoint.toml")).expect("checkpoint.toml");
    let epoch: u64 = manifest
        .lines()
        .find_map(|l| l.strip_prefix("epoch = "))
        .expect("epoch in manifest")
        .parse()
        .expect("epoch");
    let snaps = g
        .snaps
        .get(&epoch)
        .unwrap_or_else(|| panic!("failover names epoch {epoch}, which the agent never committed"));
    assert!(
        stdout.contains(&format!("checkpoint epoch: {epoch}")),
        "{stdout}"
    );
    let ram = std::fs::read(out.join("vm1.ram")).expect("vm1.ram");
    let dev = std::fs::read(out.join("vm1.devstate")).expect("vm1.devstate");
    let img = std::fs::read(out.join("d.img")).expect("d.img");
    let cut = printed_cut(&stdout);
    let matches = |snap: &Snapshot| {
        cut == vec![snap.barrier]
            && manifest.contains(&format!("barrier = [{}, 0", snap.barrier))
            && ram == snap.ram
            && dev == snap.dev
            && img == g.disk_at(snap.barrier)
    };
    for (i, snap) in snaps.iter().enumerate() {
        if matches(snap) {
            return (epoch, i);
        }
    }
    for (i, snap) in snaps.iter().enumerate() {
        eprintln!(
            "epoch {epoch} version {i}: cut {:?} vs barrier {}, ram {}, dev {}, disk {}",
            cut,
            snap.barrier,
            ram == snap.ram,
            dev == snap.dev,
            img == g.disk_at(snap.barrier)
        );
    }
    let snap = &snaps[snaps.len() - 1];
    assert_eq!(
        cut,
        vec![snap.barrier],
        "disk not at the barrier of epoch {epoch}"
    );
    assert!(ram == snap.ram, "RAM image differs from epoch {epoch}");
    assert!(dev == snap.dev, "device state differs from epoch {epoch}");
    assert!(
        img == g.disk_at(snap.barrier),
        "disk differs from the writes up to the barrier {} of epoch {epoch}",
        snap.barrier
    );
    panic!("failover output of epoch {epoch} matches no version the agent committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_wait_for_commit_and_barrier_and_failover_resumes_the_last_acked_epoch() {
    // retention 0: the applier runs all the time and must stop at the acked barrier.
    let mut env = Env::new(&["ck"], "retention_secs = 0");
    let tls = env.client_tls("ck");
    let h = hello("ck", "agent-a", vec![disk("d", DISK, 0, 1)]);
    let server = env.start();
    let (mut wr, rd, _) = connect(server.addr(), tls.clone(), &h)
        .await
        .expect("connect");
    let mut inbox = Inbox::spawn(rd);
    let mut g = Guest::new(42);

    // Epoch 1 (full): three writes, then the epoch, but the Commit is withheld.
    g.run();
    let mut f: Vec<Frame> = (0..3).map(|_| g.write()).collect();
    let mut e1 = g.epoch(1, true, true);
    let commit1 = e1.pop().expect("commit");
    f.extend(e1);
    wr.send(&f).await.expect("send");
    inbox.no_ack("the Commit of epoch 1 was withheld").await;
    wr.send(&[commit1]).await.expect("send");
    assert_eq!(inbox.ack(1).await, 1);

    // Epoch 2 (delta) names barrier 5, but writes 4 and 5 are withheld.
    g.run();
    let w4 = g.write();
    let w5 = g.write();
    let e2 = g.epoch(2, false, true);
    wr.send(&e2).await.expect("send");
    inbox
        .no_ack("the disk writes up to the barrier of epoch 2 were not sent")
        .await;
    wr.send(&[w4]).await.expect("send");
    inbox
        .no_ack("disk write 5 of the barrier of epoch 2 was not sent")
        .await;
    wr.send(&[w5]).await.expect("send");
    assert_eq!(inbox.ack(2).await, 2);

    // Epoch 3 (delta) fully acked; then writes after its barrier.
    g.run();
    let mut f = vec![g.write()];
    f.extend(g.epoch(3, false, true));
    wr.send(&f).await.expect("send");
    assert_eq!(inbox.ack(3).await, 3);
    let after: Vec<Frame> = (0..4).map(|_| g.write()).collect();
    wr.send(&after).await.expect("send");

    // Epoch 4: complete but never committed; epoch 5 torn mid-pages.
    g.run();
    let e4 = g.epoch(4, false, false);
    wr.send(&e4).await.expect("send");
    inbox.no_ack("epoch 4 was never committed").await;
    // The agent reconnects; its old connection lingers (half open): the new one
    // takes the machine over.
    drop(inbox);
    let (mut wr, rd, wel) = connect(server.addr(), tls.clone(), &h)
        .await
        .expect("reconnect");
    // The welcome carries the acknowledged epoch (the agent numbers on above it).
    assert_eq!(wel.committed.get(pipecloud_core::EPOCH_ENTRY), 3);
    let mut inbox = Inbox::spawn(rd);
    // A reconnecting agent is told the last acknowledged epoch.
    assert_eq!(inbox.ack(3).await, 3);
    g.run();
    let mut e5 = g.epoch(5, true, false);
    e5.truncate(2); // Begin + the first pages frame
    wr.send(&e5).await.expect("send");
    // Wait until the server has seen the frames (a heartbeat round trip).
    wr.send(&[Frame::Heartbeat { nonce: 5 }])
        .await
        .expect("send");

    // The status shows the checkpoint group.
    let (ok, stdout, stderr) = env.cli(&["status", "--config", env.config.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("checkpoint: active") && stdout.contains("last acked epoch 3"),
        "{stdout}"
    );

    // Failover (through the running server): epoch 3 exactly.
    let out = env.out_dir("failover");
    assert_eq!(check_failover(&env, &g, &out), (3, 0));
    // The applier never went beyond the barrier although retention is 0.
    let log = server.log_text();
    assert!(log.contains("checkpoint failover output written"), "{log}");
    drop(server);
}

impl Guest {
    /// A pre-copy segment of `epoch` while the guest runs: all of the RAM (`full`)
    /// or the pages written since the previous one; no device state, no Commit.
    fn precopy(&mut self, epoch: u64, full: bool) -> Vec<Frame> {
        let dev = std::mem::take(&mut self.dev);
        let f = self.epoch(epoch, full, false);
        self.dev = dev;
        f
    }
}

/// The group's status lines.
fn status(env: &Env) -> String {
    let (ok, stdout, stderr) = env.cli(&["status", "--config", env.config.to_str().expect("utf8")]);
    assert!(ok, "{stderr}");
    stdout
}

/// Runs `failover` and checks that it wrote the disk-only causal cut: no RAM, no
/// device state, no `checkpoint.toml`, the disk at the cut, and the cut at least
/// `min` (beyond the last checkpoint's barrier). Returns the cut.
fn check_disk_only_failover(env: &Env, g: &Guest, out: &Path, min: Seq) -> Seq {
    let stdout = failover(env, out);
    assert!(!stdout.contains("checkpoint epoch"), "{stdout}");
    for f in ["checkpoint.toml", "vm1.ram", "vm1.devstate"] {
        assert!(!out.join(f).exists(), "a disk-only failover wrote {f}");
    }
    let cut = printed_cut(&stdout);
    let c = cut.first().copied().unwrap_or(0);
    assert!(c >= min, "failover cut {cut:?}, expected at least {min}");
    let img = std::fs::read(out.join("d.img")).expect("d.img");
    assert!(
        img == g.disk_at(c),
        "disk differs from the writes up to {c}"
    );
    c
}

/// A switch test: a server (retention 0: the applier runs all the time) and one
/// connected test agent.
struct Switch {
    env: Env,
    /// `None` while killed.
    server: Option<Server>,
    tls: std::sync::Arc<rustls::ClientConfig>,
    h: pipecloud_core::wire::Hello,
    wr: backup_server::client::ClientWriter,
    inbox: Inbox,
    g: Guest,
}

impl Switch {
    async fn start(agent: &str, seed: u64) -> Switch {
        let mut env = Env::new(&["ck"], "retention_secs = 0");
        let tls = env.client_tls("ck");
        let h = hello("ck", agent, vec![disk("d", DISK, 0, 1)]);
        let server = env.start();
        let (wr, rd, _) = connect(server.addr(), tls.clone(), &h)
            .await
            .expect("connect");
        Switch {
            env,
            server: Some(server),
            tls,
            h,
            wr,
            inbox: Inbox::spawn(rd),
            g: Guest::new(seed),
        }
    }

    /// A new connection of the agent; returns the acknowledged epoch its welcome
    /// carries (the Ack that follows is checked too).
    async fn reconnect(&mut self) -> u64 {
        let addr = self.server.as_ref().expect("server running").addr();
        let (wr, rd, wel) = connect(addr, self.tls.clone(), &self.h)
            .await
            .expect("reconnect");
        self.wr = wr;
        self.inbox = Inbox::spawn(rd);
        let acked = wel.committed.get(pipecloud_core::EPOCH_ENTRY);
        if acked > 0 {
            assert_eq!(self.inbox.ack(acked).await, acked);
        }
        acked
    }

    /// `writes` disk writes and a full epoch 1, acknowledged.
    async fn first_checkpoint(&mut self, writes: usize) {
        self.g.run();
        let mut f: Vec<Frame> = (0..writes).map(|_| self.g.write()).collect();
        f.extend(self.g.epoch(1, true, true));
        self.wr.send(&f).await.expect("send");
        assert_eq!(self.inbox.ack(1).await, 1);
    }

    async fn send(&mut self, f: &[Frame]) {
        self.wr.send(f).await.expect("send");
    }

    /// SIGKILLs the server (and reaps it).
    fn kill(&mut self) {
        if let Some(s) = self.server.take() {
            s.kill();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_epoch_in_segments_is_acked_and_resumed() {
    let mut t = Switch::start("agent-s", 7).await;
    let g = &mut t.g;
    // Disk-only: writes are applied freely.
    g.run();
    let f: Vec<Frame> = (0..3).map(|_| g.write()).collect();
    t.wr.send(&f).await.expect("send");
    t.inbox.committed(3).await;
    // Switch in: a full pre-copy, a round of pages written meanwhile, then the
    // pause (pages written since, and the device state) and the Commit.
    let mut f = g.precopy(1, true);
    g.run();
    f.push(g.write());
    f.extend(g.precopy(1, false));
    g.run();
    f.push(g.write());
    f.extend(g.epoch(1, false, true));
    t.wr.send(&f).await.expect("send");
    assert_eq!(t.inbox.ack(1).await, 1);
    assert!(status(&t.env).contains("checkpoint: active"));
    // Epoch 2, a delta on the seeded one (two segments), acked; writes after it.
    g.run();
    let mut f = g.precopy(2, false);
    g.run();
    f.push(g.write());
    f.extend(g.epoch(2, false, true));
    t.wr.send(&f).await.expect("send");
    assert_eq!(t.inbox.ack(2).await, 2);
    let after: Vec<Frame> = (0..3).map(|_| g.write()).collect();
    t.wr.send(&after).await.expect("send");
    t.inbox.committed(g.last_seq()).await;
    let out = t.env.out_dir("failover");
    assert_eq!(check_failover(&t.env, g, &out), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_is_acked_once_persisted_and_failover_is_then_disk_only() {
    let mut t = Switch::start("agent-l", 11).await;
    t.first_checkpoint(3).await;
    // Epoch 2 committed, but its barrier writes are withheld: pending at the Leave.
    t.g.run();
    let w4 = t.g.write();
    let e2 = t.g.epoch(2, false, true);
    t.send(&e2).await;
    t.inbox
        .no_ack("write 4 of the barrier of epoch 2 was withheld")
        .await;
    // Leave { 3 }: acknowledged although epoch 2 never became ready.
    t.send(&[ck(Checkpoint::Leave { epoch: 3 })]).await;
    assert_eq!(t.inbox.ack(3).await, 3);
    // Killed right after the Ack: the restarted server must be disk-only.
    t.kill();
    let st = status(&t.env);
    assert!(
        st.contains("checkpoint: disk-only")
            && st.contains("last acked epoch 3")
            && st.contains("0 epochs pending"),
        "{st}"
    );
    t.server = Some(t.env.start());
    assert_eq!(t.reconnect().await, 3);
    // A repeated Leave (the agent reconnected before it saw the Ack): acked again.
    t.send(&[ck(Checkpoint::Leave { epoch: 3 })]).await;
    assert_eq!(t.inbox.ack(3).await, 3);
    // Disk-only: the writes after the last checkpoint's barrier are applied and
    // failed over.
    let mut f = vec![w4];
    f.extend((0..3).map(|_| t.g.write()));
    t.send(&f).await;
    t.inbox.committed(t.g.last_seq()).await;
    let out = t.env.out_dir("failover");
    let cut = check_disk_only_failover(&t.env, &t.g, &out, t.g.last_seq());
    assert!(cut > t.g.snaps[&1][0].barrier);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_leave_a_delta_is_refused_and_a_seeding_group_fails_over_disk_only() {
    let mut t = Switch::start("agent-d", 13).await;
    t.first_checkpoint(2).await;
    t.send(&[ck(Checkpoint::Leave { epoch: 2 })]).await;
    assert_eq!(t.inbox.ack(2).await, 2);
    // Switching in again with a delta on the old period is refused.
    t.g.run();
    let e3 = t.g.epoch(3, false, true);
    t.send(&e3).await;
    let why = t.inbox.reject().await;
    assert!(why.contains("send a full epoch"), "{why}");
    // Seeding epoch 3 (full pre-copy and a round, no pause yet), writes meanwhile.
    assert_eq!(t.reconnect().await, 2);
    let g = &mut t.g;
    let mut f = g.precopy(3, true);
    g.run();
    f.extend((0..3).map(|_| g.write()));
    f.extend(g.precopy(3, false));
    t.wr.send(&f).await.expect("send");
    t.inbox.committed(g.last_seq()).await;
    let st = status(&t.env);
    assert!(st.contains("checkpoint: seeding"), "{st}");
    // The disaster strikes while seeding: the causal cut, no checkpoint.
    let out = t.env.out_dir("failover");
    check_disk_only_failover(&t.env, g, &out, g.last_seq());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_checkpoint_frames_close_the_connection() {
    let mut env = Env::new(&["ck"], "");
    let tls = env.client_tls("ck");
    let h = hello("ck", "agent-h", vec![disk("d", DISK, 0, 1)]);
    let server = env.start();
    let begin = |epoch, ram_bytes| {
        ck(Checkpoint::Begin {
            machine: "vm1".into(),
            epoch,
            ram_bytes,
        })
    };
    let pages = |epoch, offset, n: u64| {
        ck(Checkpoint::Pages {
            epoch,
            offset,
            encoding: PageEncoding::Raw,
            data: vec![1; (n * PAGE_SIZE) as usize],
        })
    };
    let end = |epoch, pages, device_bytes| {
        ck(Checkpoint::End {
            epoch,
            pages,
            device_bytes,
        })
    };
    let commit = |epoch| {
        ck(Checkpoint::Commit {
            epoch,
            barrier: CountVector::ZERO,
        })
    };
    let cases: Vec<(Vec<Frame>, &str)> = vec![
        (vec![commit(1)], "without its Begin"),
        (
            vec![begin(1, RAM), pages(1, RAM - PAGE_SIZE, 2)],
            "beyond its RAM",
        ),
        (vec![begin(1, RAM), pages(1, 0, 2), end(1, 3, 0)], "arrived"),
        (vec![begin(1, RAM), pages(2, 0, 1)], "is open"),
        (
            vec![begin(1, RAM), pages(1, 0, 1), end(1, 1, 0)],
            "send a full epoch",
        ),
        (
            vec![
                begin(1, RAM),
                pages(1, 0, RAM_PAGES),
                end(1, RAM_PAGES, 0),
                commit(1),
                begin(2, 2 * RAM),
            ],
            "differs",
        ),
        (
            vec![
                begin(3, RAM),
                pages(3, 0, RAM_PAGES),
                end(3, RAM_PAGES, 0),
                commit(3),
                begin(2, RAM),
            ],
            "out of order",
        ),
        (vec![ck(Checkpoint::Ack { epoch: 1 })], "backup to agents"),
    ];
    for (frames, why) in cases {
        let (mut wr, rd, _) = connect(server.addr(), tls.clone(), &h)
            .await
            .expect("connect");
        let mut inbox = Inbox::spawn(rd);
        wr.send(&frames).await.expect("send");
        let reason = inbox.reject().await;
        assert!(reason.contains(why), "reject {reason:?} should say {why:?}");
        server.wait_log(why);
    }
    // The server still serves checkpoints.
    let (mut wr, rd, _) = connect(server.addr(), tls.clone(), &h)
        .await
        .expect("connect");
    let mut inbox = Inbox::spawn(rd);
    let mut g = Guest::new(7);
    g.run();
    let f = g.epoch(9, true, true);
    wr.send(&f).await.expect("send");
    assert_eq!(inbox.ack(9).await, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_epoch_failover_is_always_a_complete_acked_epoch() {
    const ROUNDS: u32 = 60;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("checkpoint crash test seed {seed}");
    let mut rng = Rng(seed);
    let mut env = Env::new(&["ck"], "retention_secs = 0");
    let tls = env.client_tls("ck");
    let h = hello("ck", "agent-c", vec![disk("d", DISK, 0, 1)]);
    let mut g = Guest::new(seed);
    let mut epoch = 0u64;
    let mut max_acked = 0u64;
    let mut verified = 0;
    let mut restarts = 0u64;
    for round in 0..ROUNDS {
        let server = env.start();
        let (mut wr, rd, wel) = connect(server.addr(), tls.clone(), &h)
            .await
            .expect("connect");
        let mut inbox = Inbox::spawn(rd);
        // Resend the writes the server does not hold.
        let durable = wel.writers.first().map_or(0, |w| w.durable);
        let resend: Vec<Frame> = g
            .writes
            .range(durable + 1..)
            .map(|(s, (o, l))| write_frame(*s, *o, *l))
            .collect();
        wr.send(&resend).await.expect("resend");
        // Every few rounds: fail over from what a restart recovered, first.
        if round % 5 == 4 {
            drop(wr);
            drop(inbox);
            server.kill();
            if max_acked > 0 {
                let out = env.out_dir(&format!("failover-{round}"));
                let (e, _) = check_failover(&env, &g, &out);
                assert!(
                    e >= max_acked,
                    "failover at epoch {e}, the agent saw Ack {max_acked}"
                );
                verified += 1;
                let (ok, _, stderr) = env.cli(&[
                    "unfence",
                    "--group",
                    "ck",
                    "--config",
                    env.config.to_str().unwrap(),
                ]);
                assert!(ok, "{stderr}");
            }
            continue;
        }
        let kill_after = Duration::from_millis(5 + rng.below(60));
        let killer = tokio::spawn(async move {
            tokio::time::sleep(kill_after).await;
            server.kill();
        });
        // Every third round the agent "restarted": it starts over right above the
        // newest Ack it saw (its later commits, if the backup holds them, are
        // superseded; an epoch the backup acked already is refused).
        if round % 3 == 2 && std::env::var_os("CKPT_NO_RESTART").is_none() {
            restarts += u64::from(epoch > max_acked);
            epoch = max_acked;
        }
        // The first epoch of a connection is full (the previous one may be torn).
        let mut full = true;
        while !killer.is_finished() {
            g.run();
            let mut f: Vec<Frame> = (0..1 + rng.below(3)).map(|_| g.write()).collect();
            epoch += 1;
            f.extend(g.epoch(epoch, full, true));
            full = false;
            // Split the epoch across sends so kills land inside it.
            let cut = rng.below(f.len() as u64) as usize;
            let rest = f.split_off(cut);
            if wr.send(&f).await.is_err() || wr.send(&rest).await.is_err() {
                break;
            }
            // Collect the Acks that arrived so far.
            while let Ok(fr) = inbox.0.try_recv() {
                if let Frame::Checkpoint(Checkpoint::Ack { epoch: e }) = fr {
                    max_acked = max_acked.max(e);
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.below(4))).await;
        }
        killer.await.expect("killer");
        while let Some(fr) = inbox.0.recv().await {
            if let Frame::Checkpoint(Checkpoint::Ack { epoch: e }) = fr {
                max_acked = max_acked.max(e);
            }
        }
    }
    assert!(max_acked > 0, "no epoch was ever acknowledged");
    // Final: restart, fail over, compare.
    let server = env.start();
    let out = env.out_dir("final");
    let (e, _) = check_failover(&env, &g, &out);
    assert!(e >= max_acked);
    verified += 1;
    let mut torn = 0;
    for i in 1..=env_starts(&env) {
        let t =
            std::fs::read_to_string(env.dir.join(format!("server-{i}.log"))).unwrap_or_default();
        torn += t
            .lines()
            .filter(|l| {
                l.contains("recovered checkpoint state") && !l.contains("torn_parts_discarded=0")
            })
            .count();
    }
    eprintln!(
        "checkpoint crash test: {ROUNDS} rounds, last epoch number {epoch}, newest Ack seen {max_acked}, \
         failover checked {verified} times (final epoch {e}), {torn} restarts discarded torn parts, \
         {restarts} agent restarts below its last epoch"
    );
    drop(server);
}

fn env_starts(env: &Env) -> u32 {
    (1..)
        .take_while(|i| env.dir.join(format!("server-{i}.log")).exists())
        .count() as u32
}
