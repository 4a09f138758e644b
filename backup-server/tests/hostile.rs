//! Hostile inputs: random, truncated and oversized frames, a wrong group, bad
//! certificates, path-like disk names, writes outside the hello's disks. Each is
//! rejected with a clear log line, the server keeps serving a well-behaved agent
//! throughout, and nothing of the hostile input is written.

mod common;

use backup_server::client::{self, ClientError};
use common::*;
use pipecloud_core::wire::{Frame, FRAME_HEADER_LEN, MAX_FRAME_BODY};
use pipecloud_core::CountVector;
use std::time::Duration;

/// Encodes a frame WITHOUT the codec's validation (what a hostile peer can send).
fn raw_frame(f: &Frame) -> Vec<u8> {
    let body = postcard::to_stdvec(f).expect("postcard");
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Reads until the server closes; returns the reject reason, if any.
async fn rejected(r: &mut client::ClientReader) -> Option<String> {
    let mut reason = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), r.recv()).await {
            Ok(Ok(Some(Frame::Reject { reason: x }))) => reason = Some(x),
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) | Ok(Err(_)) => return reason,
            Err(_) => panic!("server did not close a hostile connection"),
        }
    }
}

async fn good_write(gw: &mut client::ClientWriter, gr: &mut client::ClientReader, seq: &mut u64) {
    *seq += 1;
    let s = *seq;
    gw.send(&[write(
        0,
        1,
        s,
        0,
        0,
        CountVector::from_slice(&[s]),
        vec![s as u8; 512],
    )])
    .await
    .expect("good send");
    loop {
        match gr.recv().await.expect("good recv") {
            Some(Frame::Ack(a)) if a.last == s => break,
            Some(_) => {}
            None => panic!("good agent disconnected"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_are_rejected_and_the_server_keeps_serving() {
    let mut env = Env::new(&["shop", "other"], "");
    let server = env.start();
    let addr = server.addr();
    let tls = env.client_tls("shop");

    // The well-behaved agent, writing throughout.
    let good = hello("shop", "good", vec![disk("vol", 1 << 20, 0, 1)]);
    let (mut gw, mut gr, _) = connect(addr, tls.clone(), &good).await.expect("good agent");
    let mut seq = 0u64;
    good_write(&mut gw, &mut gr, &mut seq).await;

    // 1. Random bytes after the handshake.
    let (mut w, mut r) = client::connect_raw(addr, "localhost", tls.clone())
        .await
        .expect("raw");
    let mut junk = Vec::new();
    let mut x = 0x1234_5678_9abc_def1u64;
    for _ in 0..300 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        junk.push(x as u8);
    }
    junk[0..4].copy_from_slice(&200u32.to_le_bytes());
    w.send_raw(&junk).await.expect("send junk");
    let reason = rejected(&mut r).await.expect("reject for junk");
    assert!(reason.contains("bad frame"), "{reason}");
    good_write(&mut gw, &mut gr, &mut seq).await;

    // 2. Truncated frame, then the peer goes away.
    let (mut w, r) = client::connect_raw(addr, "localhost", tls.clone())
        .await
        .expect("raw");
    let h = raw_frame(&Frame::Hello(hello(
        "shop",
        "trunc",
        vec![disk("trunc", 4096, 1, 1)],
    )));
    w.send_raw(&h[..h.len() / 2]).await.expect("send half");
    w.shutdown().await;
    drop((w, r));
    good_write(&mut gw, &mut gr, &mut seq).await;

    // 3. Oversized frame header: refused before any body is read.
    let (mut w, mut r) = client::connect_raw(addr, "localhost", tls.clone())
        .await
        .expect("raw");
    let mut big = ((MAX_FRAME_BODY + 1) as u32).to_le_bytes().to_vec();
    big.extend_from_slice(&[0u8; 4]);
    w.send_raw(&big).await.expect("send big header");
    let reason = rejected(&mut r).await.expect("reject for oversized");
    assert!(reason.contains("exceeds the limit"), "{reason}");

    // 4. Wrong group: a shop certificate naming group "other".
    match connect(
        addr,
        tls.clone(),
        &hello("other", "sneaky", vec![disk("x", 4096, 0, 1)]),
    )
    .await
    {
        Err(ClientError::Rejected(r)) => assert!(r.contains("bound to group"), "{r}"),
        other => panic!("wrong group accepted: {:?}", other.map(|x| x.2)),
    }
    good_write(&mut gw, &mut gr, &mut seq).await;

    // 5. Bad certificates: signed by a foreign CA; none at all.
    let foreign = backup_server::tls::client_config(
        &env.pki("ca.pem"),
        &env.pki("foreign-agent.pem"),
        &env.pki("foreign-agent.key"),
    )
    .expect("foreign cfg");
    let r = connect(addr, foreign, &good).await;
    assert!(r.is_err(), "foreign certificate accepted");
    let anon = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates({
        let mut roots = rustls::RootCertStore::empty();
        for c in backup_server::tls::load_certs(&env.pki("ca.pem")).unwrap() {
            roots.add(c).unwrap();
        }
        roots
    })
    .with_no_client_auth();
    let r = connect(addr, std::sync::Arc::new(anon), &good).await;
    assert!(r.is_err(), "anonymous client accepted");
    good_write(&mut gw, &mut gr, &mut seq).await;

    // 6. Path-like disk names (sent raw: the codec would refuse to encode them).
    for name in ["../../etc/passwd", "/abs", "a/b", ".hidden", "-opt", ""] {
        let (mut w, mut r) = client::connect_raw(addr, "localhost", tls.clone())
            .await
            .expect("raw");
        w.send_raw(&raw_frame(&Frame::Hello(hello(
            "shop",
            "paths",
            vec![disk(name, 4096, 2, 1)],
        ))))
        .await
        .expect("send");
        let reason = rejected(&mut r).await.unwrap_or_default();
        assert!(reason.contains("name"), "disk name {name:?}: {reason}");
    }
    // Path-like group name too.
    let (mut w, mut r) = client::connect_raw(addr, "localhost", tls.clone())
        .await
        .expect("raw");
    w.send_raw(&raw_frame(&Frame::Hello(hello("../shop", "paths", vec![]))))
        .await
        .expect("send");
    assert!(rejected(&mut r).await.unwrap_or_default().contains("name"));
    good_write(&mut gw, &mut gr, &mut seq).await;

    // 7. Writes outside what the hello allows: another writer's disk, beyond the
    //    disk's end, a disk index that was never announced, a changed disk size.
    let h7 = hello("shop", "evil", vec![disk("evil", 8192, 3, 1)]);
    let bad_writes = [
        write(0, 1, 1, 0, 0, CountVector::from_slice(&[1]), vec![1; 512]),
        write(
            3,
            1,
            1,
            0,
            8000,
            CountVector::from_slice(&[0, 0, 0, 1]),
            vec![1; 512],
        ),
        write(
            3,
            1,
            1,
            5,
            0,
            CountVector::from_slice(&[0, 0, 0, 1]),
            vec![1; 512],
        ),
    ];
    for (i, bw) in bad_writes.iter().enumerate() {
        let (mut w, mut r, _) = connect(addr, tls.clone(), &h7).await.expect("evil connect");
        w.send(std::slice::from_ref(bw)).await.expect("send");
        let reason = rejected(&mut r).await.expect("reject for a bad write");
        assert!(
            reason.contains("write of") || reason.contains("write w3"),
            "case {i}: {reason}"
        );
    }
    match connect(
        addr,
        tls.clone(),
        &hello("shop", "resize", vec![disk("vol", 2 << 20, 0, 2)]),
    )
    .await
    {
        Err(ClientError::Rejected(r)) => assert!(r.contains("registered with size"), "{r}"),
        other => panic!("disk resize accepted: {:?}", other.map(|x| x.2)),
    }
    good_write(&mut gw, &mut gr, &mut seq).await;

    // Nothing hostile was written: only the good writes are journaled, no group
    // "other", no stray files; the evil disk exists (registered) but is all zeroes.
    drop((gw, gr));
    let (ok, status, err) = env.cli(&["status", "--config", env.config.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        status.contains(&format!("w0: generation 1 durable {seq}")),
        "{status}"
    );
    assert!(!status.contains("w3: generation 1 durable 1"), "{status}");
    assert!(!env.data.join("groups/other").exists());
    assert!(!env.dir.join("etc").exists() && !env.data.join("etc").exists());
    let vols: Vec<String> = std::fs::read_dir(env.data.join("groups/shop/volumes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    for v in &vols {
        assert!(v == "vol.img" || v == "evil.img", "unexpected volume {v}");
    }
    let evil = std::fs::read(env.data.join("groups/shop/volumes/evil.img")).unwrap();
    assert!(evil.iter().all(|b| *b == 0));

    // Every rejection has a log line naming the reason.
    let log = server.log_text();
    for needle in [
        "bad frame",
        "exceeds the limit",
        "bound to group",
        "TLS handshake failed",
        "must not start with",
        "contains byte",
        "belongs to w3",
        "beyond disk evil",
        "names disk index 5",
        "registered with size",
    ] {
        assert!(log.contains(needle), "no log line with {needle:?}:\n{log}");
    }
    assert!(log.matches("rejecting agent").count() >= 15, "{log}");
    if std::env::var_os("BS_TEST_SHOW_LOG").is_some() {
        eprintln!("{log}");
    }
}
