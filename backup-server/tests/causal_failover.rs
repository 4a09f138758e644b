//! Causal cut end to end: two writers (two agents of one group) with interleaved
//! causal dependencies, one stream delayed (part of it never arrives, part arrives
//! beyond a hole), writes of one writer sent out of seq order with overlapping
//! blocks. `backup-server failover` must produce exactly the expected cut (computed
//! here by brute force, independently of the server) and images equal to a replay
//! of exactly the writes inside that cut in seq order. Runs unprivileged.

mod common;

use common::*;
use pipecloud_core::wire::Frame;
use pipecloud_core::{CountVector, Seq};
use std::collections::BTreeSet;

const SIZE: u64 = 64 * 1024;
const BLOCK: u64 = 4096;
const N: u64 = 40;

/// Dependencies: A's write k depends on B's seq dep_b(k); B's write k on A's seq dep_a(k).
fn dep_b(k: u64) -> u64 {
    if k < 4 {
        0
    } else {
        (k / 2).min(N)
    }
}
fn dep_a(k: u64) -> u64 {
    k.saturating_sub(3)
}

fn vec_a(k: u64) -> CountVector {
    // Prefix-max is what a pending vector is: monotone.
    let b = (1..=k).map(dep_b).max().unwrap_or(0);
    CountVector::from_slice(&[k, b])
}
fn vec_b(k: u64) -> CountVector {
    let a = (1..=k).map(dep_a).max().unwrap_or(0);
    CountVector::from_slice(&[a, k])
}

fn off_a(k: u64) -> u64 {
    // Few blocks: lots of same-block overwrites.
    (k * 7 % 5) * BLOCK
}
fn off_b(k: u64) -> u64 {
    (k * 3 % 4) * BLOCK + 100
}

/// Largest closed cut by brute force over the seqs journaled contiguously.
fn expected_cut(durable_a: u64, durable_b: u64) -> (u64, u64) {
    let mut best = (0, 0);
    for sa in 0..=durable_a {
        for sb in 0..=durable_b {
            let closed =
                (1..=sa).all(|k| vec_a(k).get(1) <= sb) && (1..=sb).all(|k| vec_b(k).get(0) <= sa);
            if closed && sa >= best.0 && sb >= best.1 {
                best = (sa, sb);
            }
        }
    }
    // The largest closed cut dominates every closed cut.
    for sa in 0..=durable_a {
        for sb in 0..=durable_b {
            let closed =
                (1..=sa).all(|k| vec_a(k).get(1) <= sb) && (1..=sb).all(|k| vec_b(k).get(0) <= sa);
            if closed {
                assert!(
                    best.0 >= sa && best.1 >= sb,
                    "brute force: no unique largest cut"
                );
            }
        }
    }
    best
}

async fn wait_acks(
    r: &mut backup_server::client::ClientReader,
    want: &BTreeSet<Seq>,
) -> CountVector {
    let mut got = BTreeSet::new();
    let mut committed = CountVector::ZERO;
    while !want.is_subset(&got) {
        match r.recv().await.expect("recv") {
            Some(Frame::Ack(a)) => got.extend(a.first..=a.last),
            Some(Frame::Committed { vector }) => committed = vector,
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!("closed while waiting for acks"),
        }
    }
    committed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_produces_exactly_the_expected_cut() {
    let mut env = Env::new(&["shop"], "retention_secs = 3600");
    let server = env.start();
    let tls = env.client_tls("shop");

    let ha = hello("shop", "host-a", vec![disk("a", SIZE, 0, 1)]);
    let hb = hello("shop", "host-b", vec![disk("b", SIZE, 1, 1)]);
    let (mut wa, mut ra, wel) = connect(server.addr(), tls.clone(), &ha)
        .await
        .expect("connect a");
    assert_eq!(wel.committed, CountVector::ZERO);
    let (mut wb, mut rb, _) = connect(server.addr(), tls.clone(), &hb)
        .await
        .expect("connect b");
    // An agent of outbound machines only (no disks): it just receives committed vectors.
    let ho = hello("shop", "host-out", vec![]);
    let (_wo, mut ro, _) = connect(server.addr(), tls.clone(), &ho)
        .await
        .expect("connect outbound");

    // A: all N writes, sent in a scrambled order (each block of 8 reversed).
    let mut order: Vec<u64> = Vec::new();
    for chunk in (1..=N).collect::<Vec<_>>().chunks(8) {
        order.extend(chunk.iter().rev());
    }
    let frames: Vec<Frame> = order
        .iter()
        .map(|&k| {
            write(
                0,
                1,
                k,
                0,
                off_a(k),
                vec_a(k),
                payload(0, k, BLOCK as usize),
            )
        })
        .collect();
    wa.send(&frames).await.expect("send a");
    // B: the delayed stream: only 1..=12 and, beyond a hole, 15..=16.
    let b_sent: Vec<u64> = (1..=12).chain(15..=16).collect();
    let frames: Vec<Frame> = b_sent
        .iter()
        .map(|&k| write(1, 1, k, 0, off_b(k), vec_b(k), payload(1, k, 3000)))
        .collect();
    wb.send(&frames).await.expect("send b");

    wait_acks(&mut ra, &(1..=N).collect()).await;
    let mut seen_b = wait_acks(&mut rb, &b_sent.iter().copied().collect()).await;

    // The committed vector (durable prefixes) reaches every agent of the group.
    let want = CountVector::from_slice(&[N, 12]);
    let mut seen_o = CountVector::ZERO;
    for (r, seen) in [(&mut ro, &mut seen_o), (&mut rb, &mut seen_b)] {
        while *seen != want {
            match r.recv().await.expect("recv") {
                Some(Frame::Committed { vector }) => {
                    assert!(
                        want.dominates(&vector) && vector.dominates(seen),
                        "{vector}"
                    );
                    *seen = vector;
                }
                Some(Frame::Ack(_)) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    let (sa, sb) = expected_cut(N, 12);
    assert!(
        sa < N && sb == 12,
        "test must exercise shrinking: {sa},{sb}"
    );

    // Status before failover names both agents and the committed vector.
    let (ok, status, err) = env.cli(&["status", "--config", env.config.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(status.contains("committed vector: [40,12]"), "{status}");
    assert!(
        status.contains(&format!("failover cut now: [{sa},{sb}]")),
        "{status}"
    );
    assert!(status.contains("connected agents: 3"), "{status}");

    let out = env.out_dir("failover");
    let (ok, stdout, stderr) = env.cli(&[
        "failover",
        "--group",
        "shop",
        "--out",
        out.to_str().unwrap(),
        "--config",
        env.config.to_str().unwrap(),
    ]);
    assert!(ok, "failover failed: {stderr}");
    assert_eq!(printed_cut(&stdout), vec![sa, sb], "{stdout}");
    assert!(stdout.contains("time taken:"), "{stdout}");

    // Reference replay of exactly the cut, per writer in seq order.
    let mut img_a = vec![0u8; SIZE as usize];
    for k in 1..=sa {
        apply_ref(&mut img_a, off_a(k), &payload(0, k, BLOCK as usize));
    }
    let mut img_b = vec![0u8; SIZE as usize];
    for k in 1..=sb {
        apply_ref(&mut img_b, off_b(k), &payload(1, k, 3000));
    }
    let got_a = std::fs::read(out.join("a.img")).expect("a.img");
    let got_b = std::fs::read(out.join("b.img")).expect("b.img");
    assert_eq!(got_a.len(), SIZE as usize);
    assert!(got_a == img_a, "image a differs from the replay of the cut");
    assert!(got_b == img_b, "image b differs from the replay of the cut");
    let marker = std::fs::read_to_string(out.join("cut.toml")).expect("cut.toml");
    assert!(
        marker.contains(&format!("cut = [{sa}, {sb}, 0")),
        "{marker}"
    );

    // Fenced: the agents were disconnected and new hellos are refused.
    let mut closed = false;
    while let Ok(Some(f)) = ra.recv().await {
        if matches!(f, Frame::Reject { .. }) {
            closed = true;
        }
    }
    assert!(closed, "agent a got no reject after the fence");
    match connect(server.addr(), tls.clone(), &ha).await {
        Err(backup_server::client::ClientError::Rejected(r)) => {
            assert!(r.contains("fenced"), "{r}")
        }
        other => panic!("hello after failover not refused: {:?}", other.map(|x| x.2)),
    }
    drop((wa, wb, rb));
    // Restore at the same cut (given explicitly) yields the same images; a cut that
    // is not closed is refused.
    let out2 = env.out_dir("restore-cut");
    let (ok, stdout, stderr) = env.cli(&[
        "restore",
        "--group",
        "shop",
        "--at",
        &format!("[{sa},{sb}]"),
        "--out",
        out2.to_str().unwrap(),
        "--config",
        env.config.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(printed_cut(&stdout), vec![sa, sb]);
    assert!(std::fs::read(out2.join("a.img")).unwrap() == img_a);
    let (ok, _, stderr) = env.cli(&[
        "restore",
        "--group",
        "shop",
        "--at",
        &format!("[{N},{sb}]"),
        "--out",
        env.out_dir("restore-bad").to_str().unwrap(),
        "--config",
        env.config.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("not causally closed"), "{stderr}");
    drop(server);
}
