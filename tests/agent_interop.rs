//! The agent as a product: `pipecloud agent` (the real binary) serves a protected
//! disk over NBD to real clients while it replicates to a real `backup-server` over
//! mutual TLS, in each mode. Clients: `nbdinfo` (size), `nbdfuse` (1 and 4
//! connections) with a loop device, `mkfs.ext4`, `fsck -n`, files with checksums and
//! a remount, an `nbdcopy` round trip of random data, and `qemu-io` patterns (write,
//! write with FUA, zeroes, discard, flush, reads).
//! Then one final flush; once the backup has acked every write (`pipecloud ctl status`:
//! lag 0; in `sync` mode that must already hold when the flush returns), the agent
//! stops, the group is failed over at the backup, and the backup's volume image must
//! equal the agent's local image byte for byte.
//!
//! A missing tool FAILS the test, naming the Debian package to install
//! (scripts/install-deps.sh installs them all).
//! Processes are killed and loop devices detached on every exit path (guards).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/agent_topology.rs"]
mod agent_topology;
#[path = "support/backup.rs"]
mod backup;
#[path = "support/blockstack.rs"]
mod blockstack;

use agent_topology::OneDisk;
use backup::{Backup, Scratch, PATIENCE};
use blockstack::{mount_test, qemu_io, random_bytes, require, require_mount, run};

const GROUP: &str = "interop";
const DISK: &str = "disk0";
const SIZE: u64 = 64 << 20;

/// The agent process; stopped (SIGTERM, then SIGKILL) on drop.
struct AgentProc {
    child: Option<Child>,
    log: PathBuf,
}

impl AgentProc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait for a clean exit (the agent finishes in-flight requests).
    fn stop(&mut self) {
        let mut child = self.child.take().expect("agent running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(st) = child.try_wait().expect("waiting for the agent") {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("agent did not stop on SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            status.success(),
            "agent exited with {status}; log:\n{}",
            self.log()
        );
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn write_topology(path: &Path, work: &Path, backup: &Backup, mode: &str) {
    OneDisk {
        group: GROUP,
        id: 11,
        mode,
        endpoint: format!("127.0.0.1:{}", backup.port),
        ca: &backup.ca(),
        cert: &backup.agent_cert(),
        key: &backup.agent_key(),
        work,
        disk: DISK,
        size: SIZE,
        policy: "",
        host: "",
    }
    .write(path);
}

/// The disk's row of `pipecloud ctl status [ARGS]`, as numbers where they are
/// (columns: group disk writer mode written acked lag infl_bytes infl_wr oldest_ms
/// peak_lag peak_ms connected degraded; text columns read as 0).
fn status_row(ctl: &Path, args: &[&str]) -> Vec<u64> {
    let (ok, out) = run(Command::new(env!("CARGO_BIN_EXE_pipecloud"))
        .args(["ctl", "--socket"])
        .arg(ctl)
        .arg("status")
        .args(args));
    assert!(ok, "pipecloud ctl status failed: {out}");
    let row = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|c| c.len() > 11 && c[0] == GROUP && c[1] == DISK)
        .unwrap_or_else(|| panic!("no row for {GROUP}/{DISK} in the status:\n{out}"));
    row.iter()
        .enumerate()
        .map(|(i, s)| match (i, s.parse::<u64>()) {
            (4..=11, Ok(n)) => n,
            (4..=11, Err(_)) => panic!("bad number {s:?} in column {i} of:\n{out}"),
            _ => 0,
        })
        .collect()
}

/// (written, acked) of the disk's writer from `pipecloud ctl status`.
fn written_acked(ctl: &Path) -> (u64, u64) {
    let row = status_row(ctl, &[]);
    (row[4], row[5])
}

fn agent_with_real_clients(mode: &str) {
    for tool in ["nbdinfo", "nbdcopy", "qemu-io"] {
        require(tool);
    }
    require_mount();
    let scratch = Scratch::new(&format!("interop-{mode}"));
    let backup = Backup::start(&scratch, GROUP);
    let work = scratch.0.join("agent");
    std::fs::create_dir_all(work.join("nbd")).expect("creating the agent's directories");
    let topology = work.join("topology.toml");
    write_topology(&topology, &work, &backup, mode);
    let log = work.join("agent.log");
    let log_file = std::fs::File::create(&log).expect("agent log");
    let child = Command::new(env!("CARGO_BIN_EXE_pipecloud"))
        .args(["agent", "--topology"])
        .arg(&topology)
        .args(["--host", "h"])
        .args(if mode == "pipelined" {
            &[][..]
        } else {
            &["--no-network"][..]
        })
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log fd"))
        .stderr(log_file)
        .spawn()
        .expect("spawning pipecloud agent");
    let mut agent = AgentProc {
        child: Some(child),
        log,
    };
    let sock = work.join("nbd").join(format!("{DISK}.sock"));
    let ctl = work.join("ctl.sock");
    let deadline = Instant::now() + PATIENCE;
    while !(sock.exists() && ctl.exists()) {
        if let Some(st) = agent
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            panic!("agent exited early ({st}); log:\n{}", agent.log());
        }
        assert!(
            Instant::now() < deadline,
            "agent never served {}; log:\n{}",
            sock.display(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///{DISK}?socket={}", sock.display());

    // nbdinfo: the export's size.
    let (ok, out) = run(Command::new("nbdinfo").arg("--size").arg(&uri));
    assert!(ok, "nbdinfo failed: {out}");
    assert_eq!(out.trim(), SIZE.to_string(), "nbdinfo --size");

    // nbdfuse + loop + ext4: mkfs (discards arrive as TRIM/WRITE_ZEROES), fsck -n,
    // files, remount, fsck -n again; over one ordered connection, then over nbdfuse's
    // four (multi-conn: a FLUSH on one connection covers the writes of the others).
    mount_test(&uri, &work.join("m1"), 1);
    mount_test(&uri, &work.join("m4"), 4);

    // nbdcopy round trip of 8 MiB of random data over the start of the disk.
    let data = random_bytes(8 << 20, 0x5eed_0000 + mode.len() as u64);
    let src = work.join("random.bin");
    let back = work.join("back.bin");
    std::fs::write(&src, &data).expect("writing the source file");
    let (ok, out) = run(Command::new("nbdcopy").arg(&src).arg(&uri));
    assert!(ok, "nbdcopy to the agent failed: {out}");
    let (ok, out) = run(Command::new("nbdcopy").arg(&uri).arg(&back));
    assert!(ok, "nbdcopy from the agent failed: {out}");
    let got = std::fs::read(&back).expect("reading the copy");
    assert_eq!(got.len() as u64, SIZE);
    assert!(got[..data.len()] == data[..], "nbdcopy round trip differs");

    // qemu-io patterns past the copied region, then the final flush.
    qemu_io(
        &uri,
        &[
            "write -P 0xab 16m 64k",
            "write -f -P 0xcd 17m 64k",
            "write -z 16m 4k",
            "write -P 0x11 20m 512",
            "write -P 0x77 24m 1m",
            "discard 24m 1m",
            "read -P 0 16m 4k",
            "read -P 0xab 16388k 60k",
            "read -P 0xcd 17m 64k",
            "read -P 0x11 20m 512",
            "read -P 0 24m 1m",
            "flush",
        ],
    );

    // Every write is at the backup: at once in sync mode (each write's completion
    // waited for its ack), after the stream drains in the others.
    let (written, acked) = written_acked(&ctl);
    assert!(written > 0, "the agent issued no replicated write");
    if mode == "sync" {
        assert_eq!(
            acked, written,
            "sync: the flush returned with writes not acked by the backup"
        );
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (written, acked) = written_acked(&ctl);
        if acked == written {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the backup never acked everything ({acked} of {written}); agent log:\n{}\nbackup log:\n{}",
            agent.log(),
            backup.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The worst lag seen: at least the write being issued, at most every write, and
    // no write waited longer than the test's patience. `--reset-peaks` starts afresh.
    let row = status_row(&ctl, &["--reset-peaks"]);
    let (written, peak_lag, peak_ms) = (row[4], row[10], row[11]);
    assert!(
        (1..=written).contains(&peak_lag),
        "peak lag {peak_lag} of {written} writes"
    );
    assert!(
        u128::from(peak_ms) < PATIENCE.as_millis(),
        "peak ack wait {peak_ms} ms"
    );
    let row = status_row(&ctl, &[]);
    assert_eq!((row[10], row[11]), (0, 0), "peaks after --reset-peaks");
    agent.stop();

    let local =
        backup.assert_volume_equals(&scratch.0.join("failover"), DISK, &work.join("local.img"));
    // The client saw what the image holds (nothing was lost between them).
    assert!(local[..data.len()] == data[..]);
    assert!(local[(17 << 20)..(17 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0xcd));
    eprintln!(
        "{mode}: {written} writes replicated (worst lag {peak_lag} writes, {peak_ms} ms); \
         backup volume == local image"
    );
}

#[test]
fn async_agent_serves_real_clients_and_the_backup_matches() {
    agent_with_real_clients("async");
}

/// `pipelined` needs the network path (the agent refuses `--no-network` in that
/// mode), so this one runs the agent with it, in a private network namespace of
/// its own: a veth (both ends there) routes to the machine's address, the rules and
/// queues live and die there, and the backup listens on that namespace's loopback.
#[test]
fn pipelined_agent_serves_real_clients_and_the_backup_matches() {
    let t = std::thread::spawn(|| {
        // SAFETY: unshare(2) for this thread only; its children inherit the namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET) needs root: {}",
            std::io::Error::last_os_error()
        );
        for args in [
            "link set lo up",
            "link add pcm0 type veth peer name pcm1",
            "addr add 10.10.0.1/24 dev pcm0",
            "link set pcm0 up",
            "link set pcm1 up",
        ] {
            let (ok, out) = run(Command::new("ip").args(args.split_whitespace()));
            assert!(ok, "ip {args}: {out}");
        }
        agent_with_real_clients("pipelined");
    });
    if let Err(p) = t.join() {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn sync_agent_serves_real_clients_and_the_backup_matches() {
    agent_with_real_clients("sync");
}
