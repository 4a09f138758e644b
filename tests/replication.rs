//! Replication against the real backup server (`backup-server` binary of this
//! workspace, built on first use): an agent-side `ReplicatedDisk` over a real
//! `LocalImage`, a `ReplicationClient` speaking mutual TLS with certificates from
//! `backup-server certs`, and failures made with real signals (SIGSTOP/SIGCONT
//! stall the server, SIGKILL + restart crash it).
//!
//! Every test ends by failing the group over at the backup and comparing the
//! backup's volume image byte for byte with the local image: nothing acked may
//! be missing, nothing may be applied twice or out of order.
//!
//! Timing is never asserted; timeouts only bound how long a test waits for a
//! condition that must eventually hold.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Once};
use std::time::Duration;

#[path = "support/backup.rs"]
mod backup;
use backup::{Backup, Scratch, PATIENCE};

use pipecloud::block::BlockBackend;
use pipecloud::causal::CausalState;
use pipecloud::core::WriterId;
use pipecloud::ctl::{self, Control, ControlGroup, CtlServer};
use pipecloud::disk::ReplicatedDisk;
use pipecloud::image::LocalImage;
use pipecloud::replication::{
    fresh_generation, AckState, BackupLossPolicy, DiskSpec, Mode, ModeSwitch, ReplicationClient,
    ReplicationConfig, TlsFiles, WRITE_OVERHEAD,
};

const GROUP: &str = "g1";
const DISK: &str = "d0";
const DISK_SIZE: u64 = 16 << 20;
const W0: WriterId = WriterId(0);

fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// The agent side of one test: causal state, client, replicated disk, mode.
struct Agent {
    causal: Arc<CausalState>,
    client: Arc<ReplicationClient>,
    disk: Arc<ReplicatedDisk<LocalImage>>,
    mode: ModeSwitch,
    image: PathBuf,
}

fn agent(
    scratch: &Scratch,
    backup: &Backup,
    mode: Mode,
    max_inflight_bytes: u64,
    policy: BackupLossPolicy,
) -> Agent {
    agent_started(scratch, backup, mode, max_inflight_bytes, policy, false)
}

/// [`agent`], started detached (`detached`) or not.
fn agent_started(
    scratch: &Scratch,
    backup: &Backup,
    mode: Mode,
    max_inflight_bytes: u64,
    policy: BackupLossPolicy,
    detached: bool,
) -> Agent {
    init_tracing();
    let causal = Arc::new(CausalState::new(1));
    let mode = ModeSwitch::new(mode);
    let config = ReplicationConfig {
        endpoint: format!("127.0.0.1:{}", backup.port),
        server_name: "localhost".into(),
        tls: TlsFiles {
            ca: backup.ca(),
            cert: backup.agent_cert(),
            key: backup.agent_key(),
        },
        group: GROUP.into(),
        group_id: 7,
        agent: "agent-a".into(),
        disks: vec![DiskSpec {
            name: DISK.into(),
            size: DISK_SIZE,
            writer: W0,
            machine: 0,
        }],
        generation: fresh_generation(Some(&scratch.0.join("generation"))).expect("generation"),
        max_inflight_bytes,
        backup_loss: policy,
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_millis(1500),
        connect_timeout: Duration::from_secs(2),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(500),
        coalesce: pipecloud::replication::DEFAULT_COALESCE,
        mode: mode.clone(),
        checkpoint: None,
        detached,
    };
    let client = Arc::new(ReplicationClient::start(config, Arc::clone(&causal)).expect("client"));
    let image = scratch.0.join("local.img");
    let local = LocalImage::open(&image, DISK_SIZE).expect("local image");
    let disk = Arc::new(
        ReplicatedDisk::new(local, Arc::clone(&client), DISK, mode.clone())
            .expect("replicated disk"),
    );
    Agent {
        causal,
        client,
        disk,
        mode,
        image,
    }
}

impl Agent {
    async fn ready(&self) {
        tokio::time::timeout(PATIENCE, self.client.wait_ready())
            .await
            .expect("client never registered")
            .expect("client stopped");
    }

    /// Waits until every issued write is committed (and published to the causal state).
    async fn drained(&self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let s = self.client.status();
            let w = &s.writers[0];
            if w.acked == w.written && s.inflight_bytes == 0 {
                assert_eq!(self.causal.committed().get(0), w.written);
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "writes never drained: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn written(&self) -> u64 {
        self.client.status().writers[0].written
    }
}

/// Deterministic pseudo-random bytes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `tasks` concurrent writers, each on its own region of the disk (so the final
/// contents do not depend on how concurrent writes interleave), `per_task`
/// sequential writes of 4..=64 KiB each. Returns how many writes completed.
fn spawn_writers(
    disk: &Arc<ReplicatedDisk<LocalImage>>,
    tasks: u64,
    per_task: u64,
    done: &Arc<std::sync::atomic::AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let region = DISK_SIZE / tasks;
    (0..tasks)
        .map(|t| {
            let disk = Arc::clone(disk);
            let done = Arc::clone(done);
            tokio::spawn(async move {
                for i in 0..per_task {
                    let seed = t * 1_000_003 + i;
                    let len = 4096 * (1 + (seed % 16)) as usize;
                    let slots = (region - len as u64) / 4096;
                    let offset = t * region + 4096 * (seed.wrapping_mul(2_654_435_761) % slots);
                    disk.write(offset, pattern(seed, len), false)
                        .await
                        .expect("guest write failed");
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect()
}

async fn join_all(handles: Vec<tokio::task::JoinHandle<()>>) {
    for h in handles {
        tokio::time::timeout(PATIENCE, h)
            .await
            .expect("writer task hung")
            .expect("writer task panicked");
    }
}

/// Fails over at the backup and compares its volume with the local image.
fn assert_backup_matches_local(scratch: &Scratch, backup: &Backup, agent: &Agent) {
    backup.assert_volume_equals(&scratch.0.join("failover"), DISK, &agent.image);
}

/// Polls `f` until it returns true.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Detached, then attached (docs/design.md §15, the activation): while
/// detached, writes complete locally without a backup connection, nothing is
/// issued or buffered (even past the in-flight budget: no stall), and the
/// status says so; after `attach` the client connects, and writes are sent,
/// acknowledged and committed. The backup's volume holds exactly the writes
/// made after the attach (those before are the failback resync's to carry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_writes_stay_local_until_attach_then_replicate() {
    let scratch = Scratch::new("detached");
    let backup = Backup::start(&scratch, GROUP);
    let a = agent_started(
        &scratch,
        &backup,
        Mode::Pipelined,
        // Smaller than what is written while detached: a buffered write would stall.
        64 << 10,
        BackupLossPolicy::Stall,
        true,
    );
    assert!(a.client.is_detached());
    for i in 0..64u64 {
        tokio::time::timeout(PATIENCE, a.disk.write(i * 4096, pattern(i, 4096), false))
            .await
            .expect("a detached write stalled")
            .expect("detached write");
    }
    a.disk.flush().await.expect("flush");
    let s = a.client.status();
    assert!(s.detached && !s.connected && !s.registered, "{s:?}");
    assert_eq!(s.sessions, 0, "a detached client connected: {s:?}");
    assert_eq!(
        (s.writers[0].written, s.inflight_bytes),
        (0, 0),
        "writes were issued or buffered while detached: {s:?}"
    );
    let socket = scratch.0.join("ctl.sock");
    let control = Arc::new(Control::new(vec![ControlGroup {
        client: Arc::clone(&a.client),
        mode: a.mode.clone(),
        net: None,
    }]));
    let server = CtlServer::bind(&socket, Arc::clone(&control)).expect("ctl bind");
    let serving = tokio::spawn(async move { server.run().await });
    let status = tokio::task::spawn_blocking({
        let socket = socket.clone();
        move || ctl::status(&socket, false)
    })
    .await
    .expect("join")
    .expect("ctl status");
    assert!(
        status.contains("protection=DETACHED") && status.contains("WARNING group g1: DETACHED"),
        "{status}"
    );

    let attached = tokio::task::spawn_blocking({
        let socket = socket.clone();
        move || ctl::attach(&socket, None)
    })
    .await
    .expect("join")
    .expect("ctl attach");
    assert!(attached.contains("attached"), "{attached}");
    assert!(!a.client.is_detached());
    assert!(!a.client.attach().await, "a second attach is refused");
    a.ready().await;
    let after: Vec<u64> = (64..96).collect();
    for &i in &after {
        a.disk
            .write(i * 4096, pattern(i, 4096), false)
            .await
            .expect("attached write");
    }
    a.disk.flush().await.expect("flush");
    assert!(a.written() >= after.len() as u64);
    a.drained().await;
    let s = a.client.status();
    assert!(!s.detached && s.connected, "{s:?}");
    let status = tokio::task::spawn_blocking(move || ctl::status(&socket, false))
        .await
        .expect("join")
        .expect("ctl status");
    assert!(
        status.contains("protection=replicated") && !status.contains("DETACHED"),
        "{status}"
    );
    serving.abort();

    let remote = backup.failover_image(&scratch.0.join("failover"), DISK);
    for i in 0..96u64 {
        let block = &remote[(i * 4096) as usize..((i + 1) * 4096) as usize];
        if i < 64 {
            assert!(
                block.iter().all(|&b| b == 0),
                "block {i}, written while detached, reached the backup"
            );
        } else {
            assert_eq!(block, &pattern(i, 4096)[..], "block {i} (after the attach)");
        }
    }
}

/// (a) Writes of every kind are replicated and acked, the committed vector is
/// published to the causal state, and the backup's image equals the local one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_replicated_acked_and_committed() {
    let scratch = Scratch::new("basic");
    let backup = Backup::start(&scratch, GROUP);
    let a = agent(
        &scratch,
        &backup,
        Mode::Pipelined,
        8 << 20,
        BackupLossPolicy::Stall,
    );
    a.ready().await;
    let mut committed_rx = a.causal.subscribe_committed();
    let base = a.causal.sync_pending(0).get(0);

    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    join_all(spawn_writers(&a.disk, 4, 50, &done)).await;
    // A write larger than one frame (split), zeroes, and a trim that is rewritten.
    let big = pattern(99, (1 << 20) + (1 << 19));
    a.disk.write(3 << 20, big, true).await.expect("big write");
    a.disk
        .write_zeroes(1 << 20, 64 << 10, false)
        .await
        .expect("zeroes");
    a.disk.trim(8 << 20, 128 << 10).await.expect("trim");
    a.disk
        .write(8 << 20, pattern(7, 128 << 10), false)
        .await
        .expect("rewrite after trim");
    a.disk.flush().await.expect("flush");

    // 200 writes + 2 frames + zeroes + trim + rewrite.
    let expected = base + 200 + 2 + 3;
    assert_eq!(a.written(), expected);
    a.drained().await;
    assert!(
        committed_rx.has_changed().unwrap_or(false),
        "committed vector published"
    );
    assert_eq!(committed_rx.borrow_and_update().get(0), expected);
    let s = a.client.status();
    assert!(s.connected && !s.degraded);
    assert_eq!(s.writers[0].fillers, 0);
    eventually("heartbeats measure an RTT", || {
        a.client.status().last_rtt.is_some()
    })
    .await;
    println!(
        "heartbeat RTT on loopback: {:?}",
        a.client.status().last_rtt
    );
    assert_backup_matches_local(&scratch, &backup, &a);
}

/// (b) Sync completions never precede the ack; async and pipelined completions
/// do not wait for the backup (it is stalled with SIGSTOP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_waits_for_acks_async_and_pipelined_do_not() {
    let scratch = Scratch::new("modes");
    let mut backup = Backup::start(&scratch, GROUP);
    let a = agent(
        &scratch,
        &backup,
        Mode::Sync,
        8 << 20,
        BackupLossPolicy::Stall,
    );
    a.ready().await;

    // Sync: at the instant each write completes, its ack has been received.
    for i in 0..100u64 {
        let seq = a.causal.sync_pending(0).get(0) + 1;
        a.disk
            .write(4096 * i, pattern(i, 4096 + 512 * (i as usize % 8)), false)
            .await
            .expect("sync write");
        let committed = a.causal.committed().get(0);
        assert!(
            committed >= seq,
            "sync write {seq} completed before its ack (committed {committed})"
        );
    }

    backup.stop();
    // Sync write with the backup stalled: must not complete.
    let seq = a.causal.sync_pending(0).get(0) + 1;
    let disk = Arc::clone(&a.disk);
    let mut sync_write =
        tokio::spawn(async move { disk.write(1 << 20, pattern(1, 8192), false).await });
    let early = tokio::time::timeout(Duration::from_millis(800), &mut sync_write).await;
    if let Ok(outcome) = early {
        let committed = a.causal.committed().get(0);
        panic!(
            "sync write {seq} completed while the backup was stopped ({}): {outcome:?}; status: {:?}",
            if committed >= seq {
                "its ack arrived from a stopped server"
            } else {
                "WITHOUT its ack"
            },
            a.client.status()
        );
    }
    assert!(a.causal.committed().get(0) < seq);

    // Async and pipelined writes complete while the backup is still stalled.
    for mode in [Mode::Async, Mode::Pipelined] {
        let b = ModeSwitch::new(mode);
        let disk2 = ReplicatedDisk::new(
            LocalImage::open(scratch.0.join(format!("{mode}.img")), DISK_SIZE).expect("image"),
            Arc::clone(&a.client),
            DISK,
            b,
        )
        .expect("disk");
        // Another view of the same replicated disk with its own mode switch
        // (writes land in its own local image; the backup sees one stream).
        for i in 0..20u64 {
            tokio::time::timeout(
                PATIENCE,
                disk2.write((2 << 20) + 4096 * i, pattern(i, 4096), false),
            )
            .await
            .unwrap_or_else(|_| panic!("{mode} write waited for the stalled backup"))
            .expect("write");
        }
        assert!(
            a.causal.committed().get(0) < seq,
            "backup is stalled: nothing acked"
        );
    }
    assert!(!sync_write.is_finished(), "sync write still waiting");

    backup.cont();
    tokio::time::timeout(PATIENCE, sync_write)
        .await
        .expect("sync write never completed after SIGCONT")
        .expect("task")
        .expect("sync write failed");
    assert!(a.causal.committed().get(0) >= seq);
    a.drained().await;
    backup.crash();
}

/// (c) Backpressure: with the backup stalled, in-flight bytes stop at the limit
/// and writers block (not fail); after SIGCONT all complete and none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_bounds_inflight_bytes_and_loses_nothing() {
    let scratch = Scratch::new("backpressure");
    let backup = Backup::start(&scratch, GROUP);
    let limit: u64 = 1 << 20;
    let a = agent(
        &scratch,
        &backup,
        Mode::Async,
        limit,
        BackupLossPolicy::Stall,
    );
    a.ready().await;
    let base = a.written();
    backup.stop();

    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (tasks, per_task) = (8, 40);
    let handles = spawn_writers(&a.disk, tasks, per_task, &done);
    // Wait until the writers are stuck: the count stops moving for a while.
    let mut last = u64::MAX;
    let mut stable = 0;
    let mut max_inflight = 0;
    while stable < 50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let s = a.client.status();
        max_inflight = max_inflight.max(s.inflight_bytes);
        assert!(
            s.inflight_bytes <= limit,
            "in-flight {} over the limit {limit}",
            s.inflight_bytes
        );
        let now = done.load(Ordering::SeqCst);
        if now == last {
            stable += 1;
        } else {
            stable = 0;
            last = now;
        }
    }
    let stuck = done.load(Ordering::SeqCst);
    let s = a.client.status();
    println!(
        "stalled backup: {stuck} of {} writes completed, in flight {} bytes in {} writes (limit {limit})",
        tasks * per_task,
        s.inflight_bytes,
        s.writers[0].inflight_writes
    );
    assert!(stuck < tasks * per_task, "writers must block at the limit");
    assert!(
        handles.iter().all(|h| !h.is_finished()),
        "no writer failed or finished"
    );
    // Every completed write holds its budget until acked (nothing is acked).
    assert_eq!(
        s.writers[0].written - base,
        s.writers[0].inflight_writes as u64
    );
    assert!(stuck * (4096 + WRITE_OVERHEAD) <= limit);
    assert!(
        s.inflight_bytes + 64 * 1024 + WRITE_OVERHEAD > limit,
        "the buffer filled up to the limit before blocking ({} of {limit})",
        s.inflight_bytes
    );

    backup.cont();
    join_all(handles).await;
    assert_eq!(done.load(Ordering::SeqCst), tasks * per_task);
    assert_eq!(a.written(), base + tasks * per_task);
    a.drained().await;
    assert_backup_matches_local(&scratch, &backup, &a);
}

/// (d) The backup crashes (SIGKILL) and restarts mid-stream: unacked writes are
/// re-sent and all end up durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_crash_mid_stream_resends_unacked_writes() {
    let scratch = Scratch::new("crash");
    let mut backup = Backup::start(&scratch, GROUP);
    let a = agent(
        &scratch,
        &backup,
        Mode::Async,
        4 << 20,
        BackupLossPolicy::Stall,
    );
    a.ready().await;

    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (tasks, per_task) = (4, 300);
    let handles = spawn_writers(&a.disk, tasks, per_task, &done);
    for round in 0..2 {
        let target = (round + 1) * 300;
        eventually("writes progress", || done.load(Ordering::SeqCst) >= target).await;
        let before = a.client.status();
        backup.crash();
        println!(
            "crash {round}: written {} acked {} in flight {} writes",
            before.writers[0].written, before.writers[0].acked, before.writers[0].inflight_writes
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        backup.spawn();
    }
    join_all(handles).await;
    a.drained().await;
    let s = a.client.status();
    assert!(
        s.sessions >= 3,
        "reconnected after each crash: {} sessions",
        s.sessions
    );
    assert_eq!(s.writers[0].fillers, 0);
    assert_backup_matches_local(&scratch, &backup, &a);
}

/// (e) Mode switches at run time (through the control socket) while writes are
/// in flight: no write fails, a sync write waiting on a stalled backup completes
/// when the mode switches to async, everything ends up durable, and a switch to
/// pipelined is refused (this group runs no network path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_switch_at_run_time_through_the_control_socket() {
    let scratch = Scratch::new("switch");
    let backup = Backup::start(&scratch, GROUP);
    let a = agent(
        &scratch,
        &backup,
        Mode::Pipelined,
        4 << 20,
        BackupLossPolicy::Stall,
    );
    a.ready().await;
    let control = Arc::new(Control::new(vec![ControlGroup {
        client: Arc::clone(&a.client),
        mode: a.mode.clone(),
        net: None,
    }]));
    let sock = scratch.0.join("ctl.sock");
    let server = CtlServer::bind(&sock, control).expect("ctl bind");
    let ctl_task = tokio::spawn(async move {
        let _ = server.run().await;
    });
    let ctl_call = |req: &'static str| {
        let sock = sock.clone();
        async move {
            tokio::task::spawn_blocking(move || ctl::request(&sock, req))
                .await
                .expect("ctl task")
        }
    };

    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let handles = spawn_writers(&a.disk, 4, 150, &done);
    for (i, m) in [
        "sync",
        "async",
        "pipelined",
        "sync",
        "pipelined",
        "async",
        "sync",
    ]
    .iter()
    .cycle()
    .take(14)
    .enumerate()
    {
        eventually("writes progress", || {
            done.load(Ordering::SeqCst) >= 20 * i as u64
        })
        .await;
        let req: &'static str = match *m {
            "sync" => "mode sync",
            "async" => "mode async",
            _ => "mode pipelined",
        };
        if *m == "pipelined" {
            // This group runs no network path (`net: None`): nothing would hold
            // replies, so the switch is refused and the mode stays.
            let before = a.mode.get();
            let refused = ctl_call(req)
                .await
                .expect_err("pipelined without a network path");
            assert!(
                format!("{refused:?}").contains("needs the network path"),
                "refusal {refused:?}"
            );
            assert_eq!(a.mode.get(), before);
            continue;
        }
        let answer = ctl_call(req).await.expect("mode switch");
        assert!(answer.contains(&format!("-> {m}")), "answer {answer:?}");
        assert_eq!(a.mode.get().as_str(), *m);
    }
    let table = ctl_call("status").await.expect("status");
    println!("{table}");
    assert!(
        table.contains(DISK) && table.contains("sync"),
        "status table:\n{table}"
    );
    assert!(matches!(
        ctl_call("mode checkpoint").await,
        Err(ctl::CtlError::Remote(_))
    ));
    assert!(matches!(
        ctl_call("bogus").await,
        Err(ctl::CtlError::Remote(_))
    ));

    // A sync write waiting for a stalled backup is released by a switch to async.
    assert_eq!(a.mode.get(), Mode::Sync);
    join_all(handles).await;
    backup.stop();
    let seq = a.causal.sync_pending(0).get(0) + 1;
    let disk = Arc::clone(&a.disk);
    let mut w = tokio::spawn(async move { disk.write(0, pattern(5, 4096), false).await });
    assert!(tokio::time::timeout(Duration::from_millis(500), &mut w)
        .await
        .is_err());
    ctl_call("mode async").await.expect("switch to async");
    tokio::time::timeout(PATIENCE, w)
        .await
        .expect("switch to async released the waiting sync write")
        .expect("task")
        .expect("write");
    assert!(
        a.causal.committed().get(0) < seq,
        "released without an ack (async)"
    );
    backup.cont();
    a.drained().await;
    ctl_task.abort();
    assert_backup_matches_local(&scratch, &backup, &a);
}

/// Backup-loss policy degrade-to-async: after the backup has been silent for the
/// configured time the group degrades (flag, metric, sync writes released),
/// and returns to zero RPO once the backlog is committed after it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degrade_to_async_after_silence_and_recover() {
    let scratch = Scratch::new("degrade");
    let backup = Backup::start(&scratch, GROUP);
    let policy = BackupLossPolicy::DegradeToAsync {
        after: Duration::from_secs(1),
    };
    let a = agent(&scratch, &backup, Mode::Sync, 4 << 20, policy);
    a.ready().await;
    a.disk
        .write(0, pattern(1, 4096), false)
        .await
        .expect("write");
    assert!(!a.client.is_degraded());
    let mut degraded = a.client.subscribe_degraded();

    backup.stop();
    let seq = a.causal.sync_pending(0).get(0) + 1;
    let sub = {
        let disk = Arc::clone(&a.disk);
        tokio::spawn(async move { disk.write(4096, pattern(2, 4096), false).await })
    };
    tokio::time::timeout(PATIENCE, degraded.wait_for(|d| *d))
        .await
        .expect("never degraded")
        .expect("flag");
    tokio::time::timeout(PATIENCE, sub)
        .await
        .expect("degradation released the sync write")
        .expect("task")
        .expect("write");
    assert!(
        a.causal.committed().get(0) < seq,
        "committed is never faked"
    );
    let waiter = a.client.ack_waiter(W0, seq);
    let mut waiter = waiter;
    assert_eq!(waiter.wait().await.expect("waiter"), AckState::Degraded);
    assert_eq!(a.client.status().degrade_events, 1);

    backup.cont();
    tokio::time::timeout(PATIENCE, degraded.wait_for(|d| !*d))
        .await
        .expect("never recovered")
        .expect("flag");
    assert!(
        a.causal.committed().get(0) >= seq,
        "recovered only after the backlog is committed"
    );
    a.drained().await;
    assert_backup_matches_local(&scratch, &backup, &a);
}

/// The `HEARD_MS` and `OLDEST_MS` columns of the disk's row in `ctl status`.
fn status_ages(control: &Control) -> (Option<u64>, u64, String) {
    let table = control.handle("status");
    let mut lines = table.lines().skip(1);
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    let row: Vec<&str> = lines
        .find(|l| l.split_whitespace().nth(1) == Some(DISK))
        .expect("the disk's row")
        .split_whitespace()
        .collect();
    let col = |name: &str| row[header.iter().position(|h| *h == name).expect(name)];
    (
        col("HEARD_MS").parse().ok(),
        col("OLDEST_MS").parse().expect("OLDEST_MS"),
        col("CONNECTED").to_owned(),
    )
}

/// Detection an operator can see: once the backup stops answering, the time
/// since it was last heard from and the age of the oldest unacked write grow
/// (in the status and in `ctl status`) while a sync write waits, and the
/// connection shows `late` before the heartbeat timeout ends the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_shows_as_growing_heard_and_oldest_unacked_ages() {
    let scratch = Scratch::new("heard");
    let backup = Backup::start(&scratch, GROUP);
    let a = agent(
        &scratch,
        &backup,
        Mode::Sync,
        4 << 20,
        BackupLossPolicy::Stall,
    );
    a.ready().await;
    a.disk
        .write(0, pattern(1, 4096), false)
        .await
        .expect("write");
    let control = Control::new(vec![ControlGroup {
        client: Arc::clone(&a.client),
        mode: a.mode.clone(),
        net: None,
    }]);
    eventually("the backup is heard from", || {
        a.client.status().last_heard_age.is_some()
    })
    .await;
    let (heard, oldest, _) = status_ages(&control);
    assert!(heard.is_some(), "HEARD_MS shows a figure once heard from");
    assert_eq!(oldest, 0, "nothing unacked yet");

    backup.stop();
    let sub = {
        let disk = Arc::clone(&a.disk);
        tokio::spawn(async move { disk.write(4096, pattern(2, 4096), false).await })
    };
    eventually("the sync write is in flight", || {
        a.client.status().writers[0].oldest_unacked_age.is_some()
    })
    .await;
    let first = a.client.status();
    let heard0 = first.last_heard_age.expect("heard before");
    let oldest0 = first.writers[0].oldest_unacked_age.expect("in flight");
    // Both ages grow while the write waits; the link turns `late` (two
    // heartbeat intervals of silence) or is dropped (heartbeat timeout).
    eventually("both ages grow and the link is no longer `yes`", || {
        let s = a.client.status();
        s.last_heard_age
            .is_some_and(|h| h > heard0 + Duration::from_millis(500))
            && s.writers[0]
                .oldest_unacked_age
                .is_some_and(|o| o > oldest0 + Duration::from_millis(500))
            && s.link() != pipecloud::replication::LinkState::Up
    })
    .await;
    assert!(
        !sub.is_finished(),
        "a sync write waits while the backup is stopped"
    );
    let (heard1, oldest1, link1) = status_ages(&control);
    let heard1 = heard1.expect("HEARD_MS");
    assert!(heard1 >= 500 && oldest1 >= 500, "{heard1} {oldest1}");
    assert_ne!(link1, "yes");
    eventually("ctl status shows the ages still growing", || {
        let (h, o, _) = status_ages(&control);
        h.is_some_and(|h| h > heard1) && o > oldest1
    })
    .await;

    backup.cont();
    tokio::time::timeout(PATIENCE, sub)
        .await
        .expect("the sync write completes once the backup is back")
        .expect("task")
        .expect("write");
    a.drained().await;
    eventually("the link is back and nothing is unacked", || {
        let s = a.client.status();
        s.link() == pipecloud::replication::LinkState::Up
            && s.writers[0].oldest_unacked_age.is_none()
    })
    .await;
    assert_backup_matches_local(&scratch, &backup, &a);
}

/// An agent restart picks a newer generation; the backup's welcome tells where
/// the writer's numbering continues, so seqs stay monotone and the new writes
/// join the old ones without a hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_continues_numbering_after_the_durable_prefix() {
    let scratch = Scratch::new("restart");
    let backup = Backup::start(&scratch, GROUP);
    let first_generation;
    let written;
    {
        let a = agent(
            &scratch,
            &backup,
            Mode::Sync,
            4 << 20,
            BackupLossPolicy::Stall,
        );
        a.ready().await;
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        join_all(spawn_writers(&a.disk, 2, 40, &done)).await;
        a.drained().await;
        let s = a.client.status();
        first_generation = s.writers[0].generation;
        written = s.writers[0].written;
        assert_eq!(written, 80);
    }
    let b = agent(
        &scratch,
        &backup,
        Mode::Sync,
        4 << 20,
        BackupLossPolicy::Stall,
    );
    b.ready().await;
    let s = b.client.status();
    assert!(s.writers[0].generation > first_generation);
    assert_eq!(
        s.writers[0].written, written,
        "registered at the durable prefix"
    );
    assert_eq!(
        b.causal.sync_pending(0).get(0),
        written,
        "causal entry raised to the prefix"
    );
    b.disk
        .write(4096, pattern(42, 8192), false)
        .await
        .expect("write after restart");
    assert_eq!(b.written(), written + 1);
    assert!(b.causal.committed().get(0) > written);
    b.drained().await;
    assert_backup_matches_local(&scratch, &backup, &b);
}

/// Figures (not a check): per-mode latency of 4 KiB writes at queue depth 1 and
/// throughput of 64 KiB writes at queue depth 8, agent and backup on loopback.
/// Run with `cargo test -p pipecloud --release --test replication -- --ignored --nocapture figures`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn figures_write_latency_and_throughput_per_mode() {
    let scratch = Scratch::new("figures");
    let backup = Backup::start(&scratch, GROUP);
    let a = agent(
        &scratch,
        &backup,
        Mode::Async,
        64 << 20,
        BackupLossPolicy::Stall,
    );
    a.ready().await;
    for mode in [Mode::Async, Mode::Pipelined, Mode::Sync] {
        a.mode.set(mode);
        let mut lat = Vec::new();
        for i in 0..2000u64 {
            let t = std::time::Instant::now();
            a.disk
                .write(4096 * (i % 1024), pattern(i, 4096), false)
                .await
                .expect("write");
            lat.push(t.elapsed());
        }
        lat.sort();
        let pct = |p: usize| lat[(lat.len() * p / 100).min(lat.len() - 1)];
        a.drained().await;
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let t = std::time::Instant::now();
        let handles: Vec<_> = (0..8u64)
            .map(|k| {
                let disk = Arc::clone(&a.disk);
                let done = Arc::clone(&done);
                tokio::spawn(async move {
                    for i in 0..200u64 {
                        let off = ((k * 2) << 20) + 65536 * (i % 32);
                        disk.write(off, pattern(i + k, 65536), false)
                            .await
                            .expect("write");
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        join_all(handles).await;
        let el = t.elapsed();
        a.drained().await;
        let mib = (8 * 200 * 65536) as f64 / (1 << 20) as f64;
        println!(
            "mode {mode:<9} 4KiB QD1: p50 {:?} p99 {:?} | 64KiB QD8: {:.0} MiB/s ({:.0} writes/s)",
            pct(50),
            pct(99),
            mib / el.as_secs_f64(),
            1600.0 / el.as_secs_f64()
        );
    }
}
