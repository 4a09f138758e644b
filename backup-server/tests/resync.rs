//! Failback resync (issue 23 §4) with the real binary over loopback: the
//! issue's case, 1 % of a 1 GiB disk changed on each side after a common
//! history, must leave the old primary's image byte-identical to the active
//! site's (full compare) while sending only the differing blocks plus one
//! hash per block; a second pass sends nothing; a size mismatch is refused.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

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

/// Starts `resync-source` on a free loopback port; returns it and its address.
fn source(image: &Path) -> (std::process::Child, String, std::thread::JoinHandle<String>) {
    let mut child = Command::new(bin())
        .args(["resync-source", "--listen", "127.0.0.1:0", "--image"])
        .arg(image)
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

fn fetch(image: &Path, addr: &str, status: &Path) -> std::process::Output {
    Command::new(bin())
        .args(["resync-fetch", "--from", addr, "--image"])
        .arg(image)
        .arg("--status")
        .arg(status)
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
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0;
    while off < DISK {
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

    let status = dir.path().join("resync.status");
    let (mut src, addr, src_out) = source(&active);
    let out = fetch(&old, &addr, &status);
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
    let (mut src, addr, src_out) = source(&active);
    let out = fetch(&old, &addr, &status);
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
    let (mut src, addr, _out) = source(&active);
    let out = fetch(&old, &addr, &dir.path().join("st"));
    assert!(!out.status.success(), "a size mismatch must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused"), "{err}");
    assert!(!src.wait().unwrap().success());
}
