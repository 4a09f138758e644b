//! Crash test: a real (unprivileged) backup-server process is killed with SIGKILL at
//! 100 random points while a test client streams writes. After every restart:
//! - the welcome's durable prefix covers every write that was acked (no acked write
//!   is lost) and nothing that was never sent;
//! - every 7th round a torn record is appended to the newest segment before the
//!   restart, and the server must log that it discarded the torn tail;
//! - the client resumes: it resends what the server does not hold.
//!
//! At the end every write is acked, and a failover image equals a reference replay of
//! all writes in seq order (overlapping blocks included). Retention is 0, so the
//! applier runs (and is killed) concurrently and segments are deleted as it goes.

mod common;

use common::*;
use pipecloud_core::wire::Frame;
use pipecloud_core::{CountVector, Seq};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SIZE: u64 = 1 << 20;
const ROUNDS: u32 = 100;
const MAX_IN_FLIGHT: usize = 512;

#[derive(Clone)]
struct W {
    offset: u64,
    len: usize,
}

fn newest_segment(data: &Path) -> Option<PathBuf> {
    let dir = data.join("groups/crash/journal");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    v.pop()
}

fn frame(seq: Seq, w: &W) -> Frame {
    write(
        0,
        1,
        seq,
        0,
        w.offset,
        CountVector::from_slice(&[seq]),
        payload(0, seq, w.len),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_no_acked_write() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let mut env = Env::new(&["crash"], "segment_bytes = 2097152\nretention_secs = 0");
    let tls = env.client_tls("crash");
    let h = hello("crash", "crash-agent", vec![disk("d", SIZE, 0, 1)]);

    let mut writes: BTreeMap<Seq, W> = BTreeMap::new(); // every write ever issued
    let mut acked_prefix: Seq = 0; // all of 1..=acked_prefix acked (or reported durable)
    let mut max_acked: Seq = 0;
    let mut torn_injected = 0;
    let mut resent_total = 0u64;
    let mut acks_during_rounds = 0u64;

    for round in 0..ROUNDS {
        let server = env.start();
        let (mut wr, mut rd, wel) = connect(server.addr(), tls.clone(), &h)
            .await
            .expect("connect");
        let durable = wel
            .writers
            .iter()
            .find(|w| w.writer.0 == 0)
            .map_or(0, |w| w.durable);
        let issued = writes.keys().next_back().copied().unwrap_or(0);
        assert!(
            durable >= max_acked,
            "round {round} (seed {seed}): acked write {max_acked} lost, server holds only 1..={durable}"
        );
        assert!(
            durable <= issued,
            "round {round}: server claims {durable} > issued {issued}"
        );
        assert_eq!(wel.committed.get(0), durable);
        acked_prefix = acked_prefix.max(durable);
        max_acked = max_acked.max(durable);

        // Resend what the server does not hold, then stream new writes until killed.
        let acked = Arc::new(Mutex::new(BTreeSet::<Seq>::new()));
        let reader = {
            let acked = acked.clone();
            tokio::spawn(async move {
                while let Ok(Some(f)) = rd.recv().await {
                    if let Frame::Ack(a) = f {
                        acked.lock().unwrap().extend(a.first..=a.last);
                    }
                }
            })
        };
        let resend: Vec<Frame> = writes
            .range(durable + 1..)
            .map(|(s, w)| frame(*s, w))
            .collect();
        resent_total += resend.len() as u64;
        let kill_after = Duration::from_millis(2 + rng.below(25));
        let killer = tokio::spawn(async move {
            tokio::time::sleep(kill_after).await;
            server.kill();
        });
        let mut ok = wr.send(&resend).await.is_ok();
        let mut next = issued + 1;
        while ok && !killer.is_finished() {
            let in_flight = (next - 1).saturating_sub(
                acked
                    .lock()
                    .unwrap()
                    .iter()
                    .next_back()
                    .copied()
                    .unwrap_or(durable),
            );
            if in_flight as usize > MAX_IN_FLIGHT {
                tokio::time::sleep(Duration::from_micros(200)).await;
                continue;
            }
            let mut batch = Vec::new();
            for _ in 0..1 + rng.below(8) {
                let len = 512 * (1 + rng.below(8)) as usize;
                let offset = rng.below((SIZE - len as u64) / 512) * 512;
                let w = W { offset, len };
                batch.push(frame(next, &w));
                writes.insert(next, w);
                next += 1;
            }
            ok = wr.send(&batch).await.is_ok();
            tokio::task::yield_now().await;
        }
        killer.await.expect("killer");
        let _ = reader.await;
        let got = acked.lock().unwrap().clone();
        acks_during_rounds += got.len() as u64;
        if let Some(&m) = got.iter().next_back() {
            max_acked = max_acked.max(m);
        }
        while got.contains(&(acked_prefix + 1)) {
            acked_prefix += 1;
        }
        // Torn tail: half a record's worth of garbage after the last record.
        if round % 7 == 6 {
            if let Some(seg) = newest_segment(&env.data) {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&seg)
                    .expect("open segment");
                let garbage: Vec<u8> = (0..100 + rng.below(3000))
                    .map(|_| rng.next() as u8)
                    .collect();
                // A plausible length header, then a partial body.
                f.write_all(&2000u32.to_le_bytes()).unwrap();
                f.write_all(&garbage).unwrap();
                torn_injected += 1;
            }
        }
    }
    assert!(torn_injected >= 10);
    assert!(
        acks_during_rounds > u64::from(ROUNDS),
        "too few acks to test anything: {acks_during_rounds}"
    );

    // Final: resume, get everything acked, fail over, compare with a replay.
    let server = env.start();
    let log = server.log_text();
    assert!(log.contains("recovered group"), "{log}");
    let (mut wr, mut rd, wel) = connect(server.addr(), tls.clone(), &h)
        .await
        .expect("connect");
    let durable = wel.writers[0].durable;
    assert!(
        durable >= max_acked,
        "final: acked write {max_acked} lost (durable {durable})"
    );
    let last = writes.keys().next_back().copied().unwrap_or(0);
    let resend: Vec<Frame> = writes
        .range(durable + 1..)
        .map(|(s, w)| frame(*s, w))
        .collect();
    wr.send(&resend).await.expect("resend");
    let mut committed = durable;
    while committed < last {
        match rd.recv().await.expect("recv") {
            Some(Frame::Committed { vector }) => committed = vector.get(0),
            Some(_) => {}
            None => panic!("closed"),
        }
    }
    let out = env.out_dir("final");
    let (ok, stdout, stderr) = env.cli(&[
        "failover",
        "--group",
        "crash",
        "--out",
        out.to_str().unwrap(),
        "--config",
        env.config.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(printed_cut(&stdout), vec![last]);
    let mut reference = vec![0u8; SIZE as usize];
    for (s, w) in &writes {
        apply_ref(&mut reference, w.offset, &payload(0, *s, w.len));
    }
    let img = std::fs::read(out.join("d.img")).expect("image");
    assert!(
        img == reference,
        "final image differs from the reference replay"
    );
    // Torn tails were discarded on the starts after injection.
    let mut torn_logged = 0;
    for i in 1..=ROUNDS + 1 {
        let t =
            std::fs::read_to_string(env.dir.join(format!("server-{i}.log"))).unwrap_or_default();
        if t.contains("discarded torn journal tail") {
            torn_logged += 1;
        }
    }
    let mut applies = 0;
    let mut interrupted = 0;
    for i in 1..=ROUNDS + 1 {
        let t =
            std::fs::read_to_string(env.dir.join(format!("server-{i}.log"))).unwrap_or_default();
        applies += t.matches("applied to base volumes").count();
        interrupted += t.matches("finishing an interrupted apply").count();
    }
    // Retention 0: every start applies; kills land inside applies too.
    assert!(applies >= 10, "the applier hardly ran: {applies}");
    eprintln!(
        "crash test: {applies} applies, {interrupted} interrupted applies finished on restart"
    );
    assert!(
        torn_logged >= torn_injected,
        "torn tails injected {torn_injected}, discarded {torn_logged}"
    );
    eprintln!(
        "crash test: {ROUNDS} kills, {} writes, {acks_during_rounds} acks before kills, {resent_total} resent, {torn_injected} torn tails injected",
        writes.len()
    );
    drop(server);
}
