//! Failback resync (issue 23 §4) with the real binary over loopback, always
//! over mutual TLS with the PKI `backup-server certs` writes: the issue's
//! case, 1 % of a 1 GiB disk changed on each side after a common history,
//! must leave the old primary's image byte-identical to the active site's
//! (full compare) while sending only the differing blocks plus one hash per
//! block; a second pass sends nothing; a size mismatch is refused. Refused
//! at the source: a fetcher whose certificate comes from another CA, one
//! with no certificate, one bound to another group (and the source still
//! serves the right fetcher afterwards); refused at the fetcher: a source
//! without the expected server name. The fence check against a real etcd:
//! refused while the fetcher's own site holds the generation, accepted once
//! another site does. A resync into a running backup server's base volume:
//! afterwards no image below the journal's position at its end (`restore
//! --at` an earlier time is refused, naming the earliest restorable
//! instant, across a restart too), and none at all after a resync that died
//! half-way.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

const DISK: u64 = 1 << 30;
const BLOCK: u64 = 4096;

/// splitmix64: a seeded, dependency-free stream of pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn block(&mut self) -> Vec<u8> {
        (0..BLOCK / 8)
            .flat_map(|_| self.next().to_le_bytes())
            .collect()
    }
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_backup-server")
}

const GROUP: &str = "shop";

/// The test PKI: CA, server certificate for `localhost`, agent certificates
/// for `shop` and `other`, and a foreign CA's agent certificate for `shop`.
fn pki(dir: &Path) -> PathBuf {
    let d = dir.join("pki");
    let out = Command::new(bin())
        .args(["certs", "--dir"])
        .arg(&d)
        .args(["--server-name", "localhost", "--group", GROUP])
        .args(["--group", "other"])
        .output()
        .expect("running backup-server certs");
    assert!(out.status.success(), "certs: {out:?}");
    d
}

/// Starts `resync-source` on a free loopback port; returns it and its address.
fn source(
    image: &Path,
    pki: &Path,
) -> (std::process::Child, String, std::thread::JoinHandle<String>) {
    let mut child = Command::new(bin())
        .args(["resync-source", "--listen", "127.0.0.1:0", "--image"])
        .arg(image)
        .args(["--group", GROUP, "--ca"])
        .arg(pki.join("ca.pem"))
        .arg("--cert")
        .arg(pki.join("server.pem"))
        .arg("--key")
        .arg(pki.join("server.key"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning resync-source");
    let mut err = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    err.read_line(&mut line)
        .expect("resync-source's first line");
    let addr = line
        .trim()
        .rsplit(" on ")
        .next()
        .expect("the listening address")
        .to_string();
    // Keep draining both pipes: a closed stderr would kill it at its next line.
    let mut out = child.stdout.take().expect("stdout");
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        let _ = err.read_to_string(&mut s);
        s
    });
    (child, addr, stdout)
}

/// `resync-fetch` with the group's agent certificate, no fence check.
fn fetch(image: &Path, addr: &str, status: &Path, pki: &Path) -> std::process::Output {
    fetch_with(
        image,
        addr,
        status,
        pki,
        &format!("{GROUP}-agent"),
        &["--server-name", "localhost", "--unsafe-no-fence-check"],
    )
}

/// `resync-fetch` presenting `<identity>.pem`/`.key` from `pki`, with `extra`
/// arguments (server name, fence check).
fn fetch_with(
    image: &Path,
    addr: &str,
    status: &Path,
    pki: &Path,
    identity: &str,
    extra: &[&str],
) -> std::process::Output {
    Command::new(bin())
        .args(["resync-fetch", "--from", addr, "--image"])
        .arg(image)
        .arg("--status")
        .arg(status)
        .args(["--group", GROUP, "--ca"])
        .arg(pki.join("ca.pem"))
        .arg("--cert")
        .arg(pki.join(format!("{identity}.pem")))
        .arg("--key")
        .arg(pki.join(format!("{identity}.key")))
        .args(extra)
        .output()
        .expect("running resync-fetch")
}

/// The value of `key=` in a `resync: done …` line.
fn field(out: &str, key: &str) -> u64 {
    out.lines()
        .find(|l| l.starts_with("resync: done"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {out:?}"))
}

fn identical(a: &Path, b: &Path) -> bool {
    let (fa, fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let len = fa.metadata().unwrap().len();
    assert_eq!(len, fb.metadata().unwrap().len());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0;
    while off < len {
        fa.read_exact_at(&mut ba, off).unwrap();
        fb.read_exact_at(&mut bb, off).unwrap();
        if ba != bb {
            return false;
        }
        off += 1 << 20;
    }
    true
}

#[test]
fn one_percent_each_side_resyncs_only_what_differs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = dir.path().join("old-primary.img");
    let active = dir.path().join("active.img");
    let (fo, fa) = (
        std::fs::File::create(&old).unwrap(),
        std::fs::File::create(&active).unwrap(),
    );
    fo.set_len(DISK).unwrap();
    fa.set_len(DISK).unwrap();
    let blocks = DISK / BLOCK;
    let mut rng = Rng(23);
    // A common history: 16 MiB of the same data on both sides.
    for _ in 0..(16 << 20) / BLOCK {
        let (i, b) = (rng.next() % blocks, rng.block());
        fo.write_all_at(&b, i * BLOCK).unwrap();
        fa.write_all_at(&b, i * BLOCK).unwrap();
    }
    // After the failover: 1 % of the blocks changed on each side.
    let mut changed = std::collections::BTreeSet::new();
    for f in [&fo, &fa] {
        for _ in 0..blocks / 100 {
            let i = rng.next() % blocks;
            f.write_all_at(&rng.block(), i * BLOCK).unwrap();
            changed.insert(i);
        }
    }
    fo.sync_all().unwrap();
    fa.sync_all().unwrap();
    assert!(!identical(&old, &active));

    let pki = pki(dir.path());
    let status = dir.path().join("resync.status");
    let (mut src, addr, src_out) = source(&active, &pki);
    let out = fetch(&old, &addr, &status, &pki);
    let fetched = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "resync-fetch failed: {fetched}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(src.wait().unwrap().success(), "resync-source failed");
    let served = src_out.join().unwrap();
    println!("{}", fetched.trim());
    println!("source: {}", served.trim());

    assert!(identical(&old, &active), "the resynced image differs");
    let differing = field(&fetched, "differing");
    assert_eq!(
        differing,
        changed.len() as u64,
        "exactly the changed blocks (random data never repeats a block) are sent"
    );
    assert_eq!(field(&served, "differing"), differing);
    let wan = field(&fetched, "wan_bytes");
    // One 32-byte hash per block both ways' worth of framing, plus the blocks.
    let floor = blocks * 32 + differing * BLOCK;
    assert!(
        wan >= floor,
        "wan_bytes={wan} below the protocol's own floor {floor}"
    );
    assert!(
        wan * 10 <= DISK,
        "wan_bytes={wan}: more than 10 % of a full copy ({DISK})"
    );
    println!(
        "resync-figure: failback_resync_bytes={wan} disk_bytes={DISK} ratio={:.4} differing_blocks={differing}",
        wan as f64 / DISK as f64
    );
    let st = std::fs::read_to_string(&status).expect("the status file");
    assert!(
        st.contains("phase=done") && st.contains("blocks_to_go=0"),
        "{st}"
    );

    // A second pass finds nothing to send.
    let (mut src, addr, src_out) = source(&active, &pki);
    let out = fetch(&old, &addr, &status, &pki);
    let fetched = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "second pass: {fetched}");
    assert!(src.wait().unwrap().success());
    drop(src_out.join());
    assert_eq!(field(&fetched, "differing"), 0);
}

#[test]
fn a_different_disk_size_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = dir.path().join("old.img");
    let active = dir.path().join("active.img");
    std::fs::File::create(&old)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    std::fs::File::create(&active)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let pki = pki(dir.path());
    let (mut src, addr, _out) = source(&active, &pki);
    let out = fetch(&old, &addr, &dir.path().join("st"), &pki);
    assert!(!out.status.success(), "a size mismatch must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused"), "{err}");
    assert!(!src.wait().unwrap().success());
}

/// Two small images that differ in every 7th block.
fn small_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let old = dir.join("old.img");
    let active = dir.join("active.img");
    let (fo, fa) = (
        std::fs::File::create(&old).unwrap(),
        std::fs::File::create(&active).unwrap(),
    );
    let mut rng = Rng(7);
    for i in 0..256u64 {
        let b = rng.block();
        fa.write_all_at(&b, i * BLOCK).unwrap();
        if i % 7 != 0 {
            fo.write_all_at(&b, i * BLOCK).unwrap();
        } else {
            fo.write_all_at(&rng.block(), i * BLOCK).unwrap();
        }
    }
    fo.sync_all().unwrap();
    fa.sync_all().unwrap();
    assert!(!identical(&old, &active));
    (old, active)
}

/// A TLS client that trusts the CA but presents no certificate: sends a
/// Hello frame and reads; returns what the reads ended with.
fn anonymous_client(pki: &Path, addr: &str) -> String {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in backup_server::tls::load_certs(&pki.join("ca.pem")).unwrap() {
        roots.add(c).unwrap();
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = backup_server::tls::server_name("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    // A well-formed Hello (postcard: variant 0, two varints) for the image.
    let body = [0u8, 0x80, 0x80, 0x40, 0x80, 0x20];
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    let wrote = s.write_all(&frame).and_then(|()| s.flush());
    let mut buf = [0u8; 64];
    match (wrote, s.read(&mut buf)) {
        (Err(e), _) => format!("write: {e}"),
        (_, Err(e)) => format!("read: {e}"),
        (_, Ok(0)) => "closed".into(),
        (_, Ok(n)) => panic!("the source answered a fetcher without a certificate: {n} bytes"),
    }
}

#[test]
fn only_the_groups_fetcher_from_the_ca_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki(dir.path());
    let (old, active) = small_pair(dir.path());
    let before = std::fs::read(&old).unwrap();
    let st = dir.path().join("st");
    let (mut src, addr, src_out) = source(&active, &pki);
    let tls = ["--server-name", "localhost", "--unsafe-no-fence-check"];

    // A certificate for the same group from another CA.
    let out = fetch_with(&old, &addr, &st, &pki, "foreign-agent", &tls);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "a foreign CA's fetcher must fail: {err}"
    );
    println!("foreign CA: {}", err.trim());
    // No certificate at all.
    let anon = anonymous_client(&pki, &addr);
    println!("no certificate: {anon}");
    // The right CA, the wrong group.
    let out = fetch_with(&old, &addr, &st, &pki, "other-agent", &tls);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "another group's fetcher must fail");
    assert!(err.contains("refused") && err.contains("other"), "{err}");
    assert_eq!(
        std::fs::read(&old).unwrap(),
        before,
        "a refused fetch wrote"
    );

    // The fetcher checks the source's name too.
    let wrong = ["--server-name", "elsewhere.test", "--unsafe-no-fence-check"];
    let out = fetch_with(&old, &addr, &st, &pki, &format!("{GROUP}-agent"), &wrong);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "a source without the expected name");
    assert!(err.contains("elsewhere.test"), "{err}");
    println!("wrong server name: {}", err.trim());
    assert_eq!(std::fs::read(&old).unwrap(), before);

    // The source is still waiting and serves the right fetcher.
    let out = fetch(&old, &addr, &st, &pki);
    assert!(out.status.success(), "{out:?}");
    assert!(src.wait().unwrap().success());
    let log = src_out.join().unwrap();
    println!("source: {}", log.trim());
    assert!(identical(&old, &active));
    assert_eq!(
        field(&String::from_utf8_lossy(&out.stdout), "differing"),
        37
    );
    // Each refusal is in the source's log: foreign CA, anonymous, other
    // group, and the handshake the fetcher abandoned over the server name.
    assert_eq!(log.matches("refused 127.0.0.1").count(), 4, "{log}");
    assert!(log.contains("not to \"shop\""), "{log}");
}

#[test]
fn the_fetcher_resyncs_only_when_etcd_says_its_site_is_fenced() {
    use pipecloud_core::lease::{Reply, Request};
    use pipecloud_quorum::etcd::{Etcd, EtcdConfig};
    use pipecloud_quorum::records::GroupRecords;
    let cluster = pipecloud_quorum::testkit::EtcdCluster::start_local("resync-fence")
        .expect("etcd cluster (Debian etcd-server)");
    let etcd = Arc::new(
        Etcd::new(&EtcdConfig {
            endpoints: cluster.endpoints(),
            tls: None,
            attempt_timeout: std::time::Duration::from_secs(1),
        })
        .unwrap(),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki(dir.path());
    let (old, active) = small_pair(dir.path());
    let before = std::fs::read(&old).unwrap();
    let st = dir.path().join("st");
    let endpoints = cluster.endpoints().join(",");
    let fence = |site: &'static str| -> Vec<String> {
        [
            "--server-name",
            "localhost",
            "--etcd",
            &endpoints,
            "--site",
            site,
        ]
        .map(str::to_string)
        .to_vec()
    };
    let run = |site| {
        let args = fence(site);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (mut src, addr, src_out) = source(&active, &pki);
        let out = fetch_with(&old, &addr, &st, &pki, &format!("{GROUP}-agent"), &args);
        let served = if out.status.success() {
            src.wait().unwrap().success()
        } else {
            let _ = src.kill();
            let _ = src.wait();
            false
        };
        let log = src_out.join().unwrap();
        (out, served, log)
    };

    // No generation at all: nothing was failed over.
    let (out, _, log) = run("primary");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && err.contains("no generation"),
        "{err}"
    );
    assert!(
        !log.contains("fetcher"),
        "it connected before the check: {log}"
    );

    // The fetcher's own site holds the generation: it is active, refused.
    let mut home = GroupRecords::new(etcd.clone(), GROUP, "primary", 2000).unwrap();
    assert_eq!(
        home.execute(Request::Acquire { expected: 0 }),
        Reply::Acquired { generation: 1 }
    );
    let (out, _, log) = run("primary");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    println!("own generation: {}", err.trim());
    assert!(
        !out.status.success() && err.contains("active site"),
        "{err}"
    );
    assert!(
        !log.contains("fetcher"),
        "it connected before the check: {log}"
    );
    assert_eq!(
        std::fs::read(&old).unwrap(),
        before,
        "a refused fetch wrote"
    );

    // The backup site takes over (generation 2): the old primary is fenced.
    home.resign().unwrap();
    let mut backup = GroupRecords::new(etcd.clone(), GROUP, "backup", 2000).unwrap();
    assert_eq!(
        backup.execute(Request::Acquire { expected: 1 }),
        Reply::Acquired { generation: 2 }
    );
    // ... but the fetcher at the backup site would be refused.
    let (out, _, _) = run("backup");
    assert!(!out.status.success());
    let (out, served, _) = run("primary");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    println!("fenced: {}", err.lines().next().unwrap_or_default());
    assert!(out.status.success() && served, "{err}");
    assert!(err.contains("generation 2 held by \"backup\""), "{err}");
    assert!(identical(&old, &active));

    // etcd unreachable: refused (unknown is no).
    drop(cluster);
    std::fs::write(&old, &before).unwrap();
    let (out, _, _) = run("primary");
    assert!(!out.status.success());
    assert_eq!(std::fs::read(&old).unwrap(), before);
}

/// docs/design.md §15: after a failback resync wrote a backup server's base
/// volume, the volume mixes the source's instants; an image is consistent
/// only at cuts at or beyond the journal's position at the resync's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_before_a_resyncs_end_is_refused() {
    use common::{connect, disk, hello, off, payload, printed_cut, rfc3339_now, send_and_wait};
    const SIZE: u64 = 256 * 1024;
    let mut env = common::Env::new(&[GROUP], "");
    let server = env.start();
    let cfg = env.config.to_str().unwrap().to_string();
    let h = hello(GROUP, "shop-agent", vec![disk("d", SIZE, 0, 5)]);
    let (mut w, mut r, _) = connect(server.addr(), env.client_tls(GROUP), &h)
        .await
        .expect("connect");
    send_and_wait(&mut w, &mut r, 1..=10).await;
    let t1 = rfc3339_now();
    std::thread::sleep(std::time::Duration::from_millis(30));
    // Journaled before the resync's end: the floor is at least [15].
    send_and_wait(&mut w, &mut r, 11..=15).await;

    // The failback resync into the base volume, from a source whose every
    // block differs.
    let volume = env
        .data
        .join("groups")
        .join(GROUP)
        .join("volumes")
        .join("d.img");
    assert!(volume.exists(), "no base volume at {}", volume.display());
    let src = env.dir.join("source.img");
    let mut rng = Rng(0x5eed);
    let blocks: Vec<u8> = (0..SIZE / BLOCK).flat_map(|_| rng.block()).collect();
    std::fs::write(&src, &blocks).unwrap();
    let pki = env.dir.join("pki");
    let (mut child, addr, _out) = source(&src, &pki);
    let status = env.dir.join("resync.status");
    let out = fetch(&volume, &addr, &status, &pki);
    let _ = child.wait();
    assert!(out.status.success(), "resync-fetch: {out:?}");

    // Writes after the resync's end (the server sees the end at its next
    // apply round or materialisation: the floor is [15] or [20]).
    send_and_wait(&mut w, &mut r, 16..=20).await;
    let t2 = rfc3339_now();
    let restore = |env: &common::Env, at: &str, name: &str| {
        let o = env.out_dir(name);
        env.cli(&[
            "restore",
            "--group",
            GROUP,
            "--at",
            at,
            "--out",
            o.to_str().unwrap(),
            "--config",
            &cfg,
        ])
    };
    for (at, name) in [(t1.as_str(), "at-t1"), ("[5]", "at-5")] {
        let (ok, stdout, stderr) = restore(&env, at, name);
        assert!(
            !ok,
            "restore --at {at} before the resync's end was served: {stdout}"
        );
        assert!(
            stderr.contains("before the end of a failback resync")
                && stderr.contains("earliest restorable instant is 20"),
            "restore --at {at}: {stderr}"
        );
    }
    // At t2 (after the resync and the writes): the source's blocks with the
    // journaled writes on top (11..=20 cover every slot 1..=10 wrote, so it
    // does not matter whether the applier applied 1..=10 before the resync).
    let (ok, stdout, stderr) = restore(&env, &t2, "at-t2");
    assert!(ok, "restore --at {t2}: {stderr}");
    assert_eq!(printed_cut(&stdout), vec![20]);
    let mut want = blocks.clone();
    for k in 11..=20 {
        let o = off(k) as usize;
        want[o..o + 5000].copy_from_slice(&payload(0, k, 5000));
    }
    assert!(std::fs::read(env.out_dir("at-t2").join("d.img")).unwrap() == want);

    // The floor is durable: still refused after a restart.
    drop(w);
    drop(r);
    server.kill();
    let server = env.start();
    let (ok, _, stderr) = restore(&env, &t1, "at-t1-again");
    assert!(
        !ok && stderr.contains("earliest restorable instant"),
        "{stderr}"
    );
    // A resync that died half-way (its marker says `writing`, no lock held):
    // no image at any cut until a resync completes.
    std::fs::write(backup_server::volume::resync_marker(&volume), "writing\n").unwrap();
    let (ok, _, stderr) = restore(&env, &t2, "at-t2-torn");
    assert!(!ok && stderr.contains("did not finish"), "{stderr}");
    server.kill();
}
