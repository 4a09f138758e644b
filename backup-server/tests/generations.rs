//! Writer restarts (generations) across server restarts: writes of an old
//! generation beyond its durable prefix are superseded by the new generation's
//! writes of the same seqs, also after recovery from the journal; an older
//! generation is refused; duplicates (resends) are acked without being journaled twice.

mod common;

use common::*;
use pipecloud_core::wire::Frame;
use pipecloud_core::{CountVector, Seq};

const SIZE: u64 = 64 * 1024;

fn w(generation: u64, k: Seq) -> Frame {
    let tag = generation as u8 * 100;
    write(
        0,
        generation,
        k,
        0,
        (k % 4) * 4096,
        CountVector::from_slice(&[k]),
        payload(tag, k, 4096),
    )
}

async fn acks(r: &mut backup_server::client::ClientReader, n: usize) {
    let mut got = 0;
    while got < n {
        match r.recv().await.expect("recv") {
            Some(Frame::Ack(a)) => got += (a.last - a.first + 1) as usize,
            Some(_) => {}
            None => panic!("closed"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_supersede_beyond_the_durable_prefix() {
    let mut env = Env::new(&["gen"], "");
    let tls = env.client_tls("gen");
    let h1 = hello("gen", "h", vec![disk("d", SIZE, 0, 1)]);
    let h2 = hello("gen", "h", vec![disk("d", SIZE, 0, 2)]);

    let server = env.start();
    let (mut wr, mut rd, wel) = connect(server.addr(), tls.clone(), &h1).await.expect("c1");
    assert_eq!((wel.writers.len(), wel.writers[0].durable), (1, 0));
    let first: Vec<Frame> = (1..=5).chain([7]).map(|k| w(1, k)).collect();
    wr.send(&first).await.unwrap();
    acks(&mut rd, 6).await;
    // Resend of journaled writes: acked again.
    wr.send(&[w(1, 2), w(1, 7)]).await.unwrap();
    acks(&mut rd, 2).await;
    drop((wr, rd));
    server.kill();

    // Restart; the writer comes back with generation 2.
    let server = env.start();
    let (mut wr, mut rd, wel) = connect(server.addr(), tls.clone(), &h2).await.expect("c2");
    assert_eq!(wel.writers[0].durable, 5);
    assert_eq!(wel.writers[0].generation, 2);
    wr.send(&(6..=8).map(|k| w(2, k)).collect::<Vec<_>>())
        .await
        .unwrap();
    acks(&mut rd, 3).await;
    drop((wr, rd));
    server.wait_log("writer restarted with a new generation");
    server.kill();

    // Recovery must keep generation 2's seq 7, not generation 1's.
    let server = env.start();
    let log = server.log_text();
    assert!(
        log.contains("skipped applied or superseded records"),
        "{log}"
    );
    match connect(server.addr(), tls.clone(), &h1).await {
        Err(backup_server::client::ClientError::Rejected(r)) => {
            assert!(r.contains("older than"), "{r}")
        }
        other => panic!("old generation accepted: {:?}", other.map(|x| x.2)),
    }
    let (_wr, _rd, wel) = connect(server.addr(), tls.clone(), &h2).await.expect("c3");
    assert_eq!(wel.writers[0].durable, 8);
    assert_eq!(wel.committed, CountVector::from_slice(&[8]));
    let out = env.out_dir("fo");
    let (ok, stdout, stderr) = env.cli(&[
        "failover",
        "--group",
        "gen",
        "--out",
        out.to_str().unwrap(),
        "--config",
        env.config.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(printed_cut(&stdout), vec![8]);
    let mut img = vec![0u8; SIZE as usize];
    for k in 1..=8u64 {
        let tag = if k <= 5 { 100 } else { 200 };
        apply_ref(&mut img, (k % 4) * 4096, &payload(tag, k, 4096));
    }
    assert!(std::fs::read(out.join("d.img")).unwrap() == img);
    let m = server.log_text();
    assert_eq!(m.matches("write not journaled").count(), 0, "{m}");
}
