//! The journal bound: writer A's writes all depend on writer B's first write, which
//! is delayed, so the causal cut cannot advance and the applier cannot free any
//! segment. A's stream fills the journal to `max_journal_bytes`; the server then
//! stops taking A's writes (logged loudly; no ack is sent for them) but keeps
//! taking writes that journaled writes depend on. When B's write arrives, the cut
//! advances, the applier (under pressure, beyond the retention window) frees
//! segments, A resumes, every write is acked, and a failover image is exact.

mod common;

use common::*;
use pipecloud_core::wire::Frame;
use pipecloud_core::CountVector;
use std::time::{Duration, Instant};

const A_SIZE: u64 = 16 << 20;
const N: u64 = 160; // 160 x 64 KiB = 10 MiB > max_journal_bytes
const LEN: usize = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_bound_backpressure_then_recovery() {
    let mut env = Env::new(
        &["bnd"],
        "segment_bytes = 2097152\nmax_journal_bytes = 4194304\nretention_secs = 3600",
    );
    let server = env.start();
    let tls = env.client_tls("bnd");
    let ha = hello("bnd", "host-a", vec![disk("a", A_SIZE, 0, 1)]);
    let hb = hello("bnd", "host-b", vec![disk("b", 4096, 1, 1)]);
    let (mut wa, mut ra, _) = connect(server.addr(), tls.clone(), &ha).await.expect("a");
    let frames: Vec<Frame> = (1..=N)
        .map(|k| {
            let v = if k == 1 {
                CountVector::from_slice(&[1])
            } else {
                CountVector::from_slice(&[k, 1])
            };
            write(0, 1, k, 0, (k - 1) * LEN as u64, v, payload(0, k, LEN))
        })
        .collect();
    let sender = tokio::spawn(async move {
        wa.send(&frames).await.expect("send a");
        wa
    });
    // Wait for the server to report the bound, then count A's acks.
    server.wait_log("JOURNAL AT ITS BOUND");
    let mut acked = 0;
    let mut committed_a = 0;
    loop {
        match tokio::time::timeout(Duration::from_millis(500), ra.recv()).await {
            Ok(Ok(Some(Frame::Ack(a)))) => acked = acked.max(a.last),
            Ok(Ok(Some(Frame::Committed { vector }))) => committed_a = vector.get(0),
            Ok(Ok(Some(_))) => {}
            Ok(_) => panic!("a closed"),
            Err(_) => break, // quiet: stalled
        }
    }
    assert!(
        acked < N,
        "all writes acked although the journal was at its bound"
    );
    assert!(acked >= 40, "too few writes before the bound: {acked}");
    assert_eq!(committed_a, acked);
    let (ok, status, _) = env.cli(&["status", "--config", env.config.to_str().unwrap()]);
    assert!(
        ok && status.contains("held back by the causal cut"),
        "{status}"
    );
    assert!(status.contains("failover cut now: [1]"), "{status}");

    // B's delayed write arrives; it passes the bound (A's writes depend on it).
    let (mut wb, mut rb, _) = connect(server.addr(), tls.clone(), &hb).await.expect("b");
    wb.send(&[write(
        1,
        1,
        1,
        0,
        0,
        CountVector::from_slice(&[0, 1]),
        payload(1, 1, 4096),
    )])
    .await
    .expect("send b");
    loop {
        if let Some(Frame::Ack(a)) = rb.recv().await.expect("b recv") {
            assert_eq!(a.last, 1);
            break;
        }
    }
    let t0 = Instant::now();
    while acked < N {
        match tokio::time::timeout(Duration::from_secs(30), ra.recv()).await {
            Ok(Ok(Some(Frame::Ack(a)))) => acked = acked.max(a.last),
            Ok(Ok(Some(_))) => {}
            other => panic!(
                "a never resumed (acked {acked}): {:?}",
                other.map(|r| r.map(|_| ()))
            ),
        }
        assert!(t0.elapsed() < Duration::from_secs(60));
    }
    let _wa = sender.await.expect("sender");
    let log = server.log_text();
    assert!(
        log.contains("journal near its bound: applying beyond the retention window"),
        "{log}"
    );
    assert!(log.contains("ingest resumed"), "{log}");

    let out = env.out_dir("fo");
    let (ok, stdout, stderr) = env.cli(&[
        "failover",
        "--group",
        "bnd",
        "--out",
        out.to_str().unwrap(),
        "--config",
        env.config.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(printed_cut(&stdout), vec![N, 1]);
    let img = std::fs::read(out.join("a.img")).unwrap();
    for k in 1..=N {
        let o = ((k - 1) * LEN as u64) as usize;
        assert!(img[o..o + LEN] == payload(0, k, LEN)[..], "block {k}");
    }
    assert!(img[(N as usize) * LEN..].iter().all(|b| *b == 0));
    assert!(std::fs::read(out.join("b.img")).unwrap() == payload(1, 1, 4096));
}
