//! Shared helpers of the backup-server integration tests.
//!
//! Every test runs the real `backup-server` binary. When the tests run as root, the
//! server (and the CLI commands) run as uid/gid 65534 through
//! `setpriv --reuid=65534 --regid=65534 --clear-groups`, which proves that no
//! privilege is needed; the test directory is chowned to that uid first.

#![allow(dead_code)]

use backup_server::client::{self, ClientReader, ClientWriter};
use backup_server::tls::client_config;
use pipecloud_core::wire::{DiskHello, Frame, Hello, Welcome, Write, WriteKind, PROTOCOL_VERSION};
use pipecloud_core::{CountVector, Seq, WriterId};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Unprivileged uid/gid used when the tests run as root.
pub const NOBODY: u32 = 65534;

pub fn is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

/// A test directory with a PKI and a config, owned by the unprivileged user.
pub struct Env {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub data: PathBuf,
    starts: u32,
}

fn chown_r(p: &Path) {
    if !is_root() {
        return;
    }
    let st = Command::new("chown")
        .args(["-R", &format!("{NOBODY}:{NOBODY}")])
        .arg(p)
        .status()
        .expect("chown");
    assert!(st.success());
}

impl Env {
    /// Creates certs for `groups` and a config with `limits` (TOML lines for `[limits]`).
    pub fn new(groups: &[&str], limits: &str) -> Env {
        let mut tmp = tempfile::Builder::new()
            .prefix("bs-test-")
            .tempdir()
            .expect("tempdir");
        if std::env::var_os("BS_TEST_KEEP").is_some() {
            tmp.disable_cleanup(true);
            eprintln!("keeping test directory {}", tmp.path().display());
        }
        let dir = tmp.path().to_path_buf();
        let groups: Vec<String> = groups.iter().map(|s| s.to_string()).collect();
        let g =
            backup_server::certs::generate(&dir.join("pki"), "localhost", &groups, "127.0.0.1:0")
                .expect("certs");
        let text = std::fs::read_to_string(&g.config).expect("config");
        // `certs` writes `data_dir = "<pki>/data"`: keep the data next to the PKI instead.
        let mut text: String = text
            .lines()
            .map(|l| {
                if l.starts_with("data_dir") {
                    format!("data_dir = \"{}\"\n", dir.join("data").display())
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        text.push_str(limits);
        text.push('\n');
        std::fs::write(&g.config, text).expect("write config");
        chown_r(&dir);
        Env {
            config: g.config,
            data: dir.join("data"),
            dir,
            tmp,
            starts: 0,
        }
    }

    pub fn pki(&self, f: &str) -> PathBuf {
        self.dir.join("pki").join(f)
    }

    /// Client TLS config for an agent of `group` (`foreign` for the foreign CA's agent).
    pub fn client_tls(&self, who: &str) -> Arc<rustls::ClientConfig> {
        client_config(
            &self.pki("ca.pem"),
            &self.pki(&format!("{who}-agent.pem")),
            &self.pki(&format!("{who}-agent.key")),
        )
        .expect("client config")
    }

    /// A command running the server binary, unprivileged when we are root.
    pub fn command(&self, args: &[&str]) -> Command {
        let bin = env!("CARGO_BIN_EXE_backup-server");
        let mut c = if is_root() {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
                bin,
            ]);
            c
        } else {
            Command::new(bin)
        };
        c.args(args);
        c.env("RUST_LOG", "info");
        c
    }

    /// Starts the server; waits until it serves.
    pub fn start(&mut self) -> Server {
        self.starts += 1;
        let log = self.dir.join(format!("server-{}.log", self.starts));
        let f = std::fs::File::create(&log).expect("log");
        let child = self
            .command(&["serve", "--config", self.config.to_str().expect("utf8")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn server");
        let mut s = Server {
            child,
            log,
            addr: None,
        };
        let t0 = Instant::now();
        loop {
            let text = s.log_text();
            if let Some(line) = text.lines().find(|l| l.contains("backup-server serving")) {
                let addr = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .expect("addr in log")
                    .parse()
                    .expect("addr");
                s.addr = Some(addr);
                if is_root() {
                    assert!(
                        line.contains(&format!("uid={NOBODY}")),
                        "server not unprivileged: {line}"
                    );
                }
                return s;
            }
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("server exited with {st} during start:\n{text}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "server did not start:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs a CLI subcommand (unprivileged); returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = self
            .command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run cli");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// A fresh output directory path (not created; the parent is writable by the server).
    pub fn out_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A running server process (killed on drop).
pub struct Server {
    pub child: Child,
    pub log: PathBuf,
    addr: Option<SocketAddr>,
}

impl Server {
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("addr")
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str) -> String {
        let t0 = Instant::now();
        loop {
            let t = self.log_text();
            if t.contains(needle) {
                return t;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "log never contained {needle:?}:\n{t}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A disk announcement.
pub fn disk(name: &str, size: u64, writer: u8, generation: u64) -> DiskHello {
    DiskHello {
        name: name.into(),
        size,
        writer: WriterId(writer),
        generation,
    }
}

pub fn hello(group: &str, agent: &str, disks: Vec<DiskHello>) -> Hello {
    Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        group: group.into(),
        group_id: 7,
        agent: agent.into(),
        disks,
    }
}

pub async fn connect(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    h: &Hello,
) -> Result<(ClientWriter, ClientReader, Welcome), client::ClientError> {
    client::connect(addr, "localhost", tls, h).await
}

/// Deterministic payload of a write.
pub fn payload(writer: u8, seq: Seq, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut x = (u64::from(writer) << 56) ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5555;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A data write.
pub fn write(
    writer: u8,
    generation: u64,
    seq: Seq,
    disk: u16,
    offset: u64,
    vector: CountVector,
    data: Vec<u8>,
) -> Frame {
    Frame::Write(Write {
        writer: WriterId(writer),
        generation,
        seq,
        disk,
        offset,
        vector,
        kind: WriteKind::Data(data),
    })
}

/// Applies data writes to an in-memory reference image.
pub fn apply_ref(img: &mut [u8], offset: u64, data: &[u8]) {
    let o = offset as usize;
    img[o..o + data.len()].copy_from_slice(data);
}

/// Parses the `cut: [..]` line printed by failover / restore.
pub fn printed_cut(stdout: &str) -> Vec<u64> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("cut: "))
        .expect("cut line");
    let inner = line
        .trim_start_matches("cut: ")
        .trim_matches(|c| c == '[' || c == ']');
    if inner.is_empty() {
        return Vec::new();
    }
    inner
        .split(',')
        .map(|x| x.trim().parse().expect("seq"))
        .collect()
}

/// A xorshift generator for seeded test schedules.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The offset of write `k` in the two-phase tests: nine 8 KiB slots.
pub fn off(k: u64) -> u64 {
    (k % 9) * 8192
}

/// Now, as RFC 3339 (what `restore --at` takes).
pub fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format")
}

/// Sends writes `seqs` of writer 0 (generation 5, disk 0, 5000 bytes at
/// [`off`]) and waits until the server committed the last.
pub async fn send_and_wait(
    w: &mut ClientWriter,
    r: &mut ClientReader,
    seqs: std::ops::RangeInclusive<Seq>,
) {
    let last = *seqs.end();
    let frames: Vec<Frame> = seqs
        .map(|k| {
            write(
                0,
                5,
                k,
                0,
                off(k),
                CountVector::from_slice(&[k]),
                payload(0, k, 5000),
            )
        })
        .collect();
    w.send(&frames).await.expect("send");
    loop {
        match r.recv().await.expect("recv") {
            Some(Frame::Committed { vector }) if vector.get(0) >= last => break,
            Some(_) => {}
            None => panic!("closed"),
        }
    }
}
