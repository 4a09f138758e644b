//! Point-in-time restore, the retention window, `status` and the Prometheus endpoint.
//!
//! Two phases of writes separated in time; `restore --at <time>` between the phases
//! yields exactly phase 1, after the phases everything. With `retention_secs = 2` the
//! applier then moves the base volumes forward: a restore to the first time is
//! refused (outside the window) and `status` shows the new oldest restorable point.

mod common;

use common::*;
use pipecloud_core::Seq;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const SIZE: u64 = 256 * 1024;

fn replay(upto: Seq) -> Vec<u8> {
    let mut img = vec![0u8; SIZE as usize];
    for k in 1..=upto {
        apply_ref(&mut img, off(k), &payload(0, k, 5000));
    }
    img
}

fn http_get(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("metrics connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_restore_retention_status_and_metrics() {
    let mut env = Env::new(&["pit"], "retention_secs = 2");
    // Metrics on an ephemeral port.
    let cfg = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        cfg.replace(
            "# metrics = \"127.0.0.1:9700\"",
            "metrics = \"127.0.0.1:0\"",
        ),
    )
    .unwrap();
    let server = env.start();
    let log = server.wait_log("metrics endpoint listening");
    let maddr = log
        .lines()
        .find(|l| l.contains("metrics endpoint listening"))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")))
        .expect("metrics addr")
        .to_string();
    let cfgp = env.config.to_str().unwrap().to_string();

    let tls = env.client_tls("pit");
    let h = hello("pit", "pit-agent", vec![disk("d", SIZE, 0, 5)]);
    let (mut w, mut r, _) = connect(server.addr(), tls, &h).await.expect("connect");
    send_and_wait(&mut w, &mut r, 1..=10).await;
    let t1 = rfc3339_now();
    std::thread::sleep(Duration::from_millis(30));
    send_and_wait(&mut w, &mut r, 11..=20).await;
    let t2 = rfc3339_now();

    for (at, upto, name) in [(&t1, 10, "at-t1"), (&t2, 20, "at-t2")] {
        let out = env.out_dir(name);
        let (ok, stdout, stderr) = env.cli(&[
            "restore",
            "--group",
            "pit",
            "--at",
            at,
            "--out",
            out.to_str().unwrap(),
            "--config",
            &cfgp,
        ]);
        assert!(ok, "{stderr}");
        assert_eq!(
            printed_cut(&stdout),
            vec![upto],
            "restore at {at}: {stdout}"
        );
        assert!(
            std::fs::read(out.join("d.img")).unwrap() == replay(upto),
            "image at {at}"
        );
    }
    // A time before any write: the empty cut.
    let out = env.out_dir("at-zero");
    let (ok, stdout, stderr) = env.cli(&[
        "restore",
        "--group",
        "pit",
        "--at",
        "2001-01-01T00:00:00Z",
        "--out",
        out.to_str().unwrap(),
        "--config",
        &cfgp,
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(printed_cut(&stdout), Vec::<u64>::new());
    // Garbage --at and a non-empty out dir are refused.
    let (ok, _, stderr) = env.cli(&[
        "restore",
        "--group",
        "pit",
        "--at",
        "yesterday",
        "--out",
        "/tmp/x",
        "--config",
        &cfgp,
    ]);
    assert!(!ok && stderr.contains("RFC 3339"), "{stderr}");
    let (ok, _, stderr) = env.cli(&[
        "restore",
        "--group",
        "pit",
        "--at",
        &t2,
        "--out",
        env.out_dir("at-t1").to_str().unwrap(),
        "--config",
        &cfgp,
    ]);
    assert!(!ok && stderr.contains("not empty"), "{stderr}");

    // Metrics.
    let m = http_get(&maddr);
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(m.contains("pipecloud_backup_writes_total 20"), "{m}");
    assert!(
        m.contains("pipecloud_backup_committed_seq{group=\"pit\",writer=\"0\"} 20"),
        "{m}"
    );
    assert!(
        m.contains("pipecloud_backup_connected_agents{group=\"pit\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("pipecloud_backup_ack_latency_seconds_count 20"),
        "{m}"
    );

    // Retention: once the writes are older than 2 s the applier moves the base.
    let t0 = Instant::now();
    loop {
        let (ok, status, err) = env.cli(&["status", "--config", &cfgp]);
        assert!(ok, "{err}");
        if status.contains("applied 20") {
            assert!(status.contains("connected agents: 1"), "{status}");
            assert!(status.contains("committed vector: [20]"), "{status}");
            assert!(status.contains("oldest restorable point: 2"), "{status}");
            assert!(status.contains("(cut [20])"), "{status}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "applier never caught up: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, _, stderr) = env.cli(&[
        "restore",
        "--group",
        "pit",
        "--at",
        &t1,
        "--out",
        env.out_dir("late").to_str().unwrap(),
        "--config",
        &cfgp,
    ]);
    assert!(
        !ok && stderr.contains("oldest restorable point"),
        "{stderr}"
    );
    let out = env.out_dir("now");
    let (ok, stdout, stderr) = env.cli(&[
        "restore",
        "--group",
        "pit",
        "--at",
        &rfc3339_now(),
        "--out",
        out.to_str().unwrap(),
        "--config",
        &cfgp,
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(printed_cut(&stdout), vec![20]);
    assert!(std::fs::read(out.join("d.img")).unwrap() == replay(20));

    // Offline: with the server stopped, the CLI opens the data dir itself.
    drop((w, r));
    server.kill();
    let (ok, status, err) = env.cli(&["status", "--config", &cfgp]);
    assert!(ok, "{err}");
    assert!(
        status.contains("committed vector: [20]") && status.contains("connected agents: 0"),
        "{status}"
    );
    let out = env.out_dir("offline");
    let (ok, stdout, stderr) = env.cli(&[
        "failover",
        "--group",
        "pit",
        "--out",
        out.to_str().unwrap(),
        "--config",
        &cfgp,
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(printed_cut(&stdout), vec![20]);
    assert!(std::fs::read(out.join("d.img")).unwrap() == replay(20));
    let (ok, status, _) = env.cli(&["status", "--config", &cfgp]);
    assert!(ok && status.contains("FENCED"), "{status}");
    let (ok, stdout, _) = env.cli(&["unfence", "--group", "pit", "--config", &cfgp]);
    assert!(ok && stdout.contains("unfenced"), "{stdout}");
}
