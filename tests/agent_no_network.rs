//! `pipecloud agent --no-network` serves disks with no packet interposition, so
//! nothing holds a reply until the backup has the writes it depends on. Only
//! modes whose guarantee comes from the block path may run that way: the agent
//! refuses to start in `pipelined` (naming `sync` and `async` instead), and
//! refuses a run-time switch to `pipelined` while it keeps its mode.
//!
//! With the network path, the agent refuses to start when it cannot find the
//! interface of a local protected machine (it could not hold that machine's
//! IPv6 or other-address packets).
//!
//! Real binaries: `pipecloud` and (for the switch) a `backup-server` on loopback.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/agent_topology.rs"]
mod agent_topology;
#[path = "support/backup.rs"]
mod backup;

use agent_topology::OneDisk;
use backup::{Backup, Scratch, PATIENCE};

const GROUP: &str = "nonet";

/// A topology with one writer machine and one disk on host `h`; the backup's
/// credentials are `(endpoint, ca, cert, key)`.
fn write_topology(
    path: &Path,
    work: &Path,
    mode: &str,
    backup: (String, PathBuf, PathBuf, PathBuf),
) {
    let (endpoint, ca, cert, key) = backup;
    OneDisk {
        group: GROUP,
        id: 12,
        mode,
        endpoint,
        ca: &ca,
        cert: &cert,
        key: &key,
        work,
        disk: "disk0",
        size: 1 << 20,
        policy: "",
        host: "",
    }
    .write(path);
}

fn pipecloud() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pipecloud"));
    c.stdin(Stdio::null());
    c
}

/// Kills the agent on drop.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `pipecloud agent` (pipelined, backup absent) with `prefix` before it
/// and `extra` arguments; returns its exit status and stderr once it exits.
fn agent_exit(tag: &str, prefix: &[&str], extra: &[&str]) -> (std::process::ExitStatus, String) {
    let scratch = Scratch::new(tag);
    let work = scratch.0.clone();
    let topo = work.join("t.toml");
    // No backup is needed: the refusal comes before any connection.
    let none = work.join("absent.pem");
    write_topology(
        &topo,
        &work,
        "pipelined",
        ("127.0.0.1:9".into(), none.clone(), none.clone(), none),
    );
    let mut cmd = match prefix.split_first() {
        Some((p, rest)) => {
            let mut c = Command::new(p);
            c.args(rest).arg(env!("CARGO_BIN_EXE_pipecloud"));
            c
        }
        None => pipecloud(),
    };
    let mut child = cmd
        .args(["agent", "--topology"])
        .arg(&topo)
        .args(["--host", "h", "--connect-wait-s", "5"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning pipecloud agent");
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().expect("waiting for the agent").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("agent output");
    assert!(
        !work.join("nbd").join("disk0.sock").exists(),
        "no disk was served"
    );
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// In a fresh network namespace (`unshare --net`, util-linux) nothing routes
/// to the machine: the agent must refuse before serving anything.
#[test]
fn no_interface_for_a_local_machine_refuses_to_start() {
    let (status, stderr) = agent_exit("nolink", &["unshare", "--net", "--"], &[]);
    assert!(!status.success(), "exit status {status}");
    assert!(
        stderr.contains("finding the interface of each local protected machine")
            && stderr.contains("machine `m` (10.10.0.10): no interface routes to it"),
        "unexpected error:\n{stderr}"
    );
}

#[test]
fn pipelined_without_network_path_refuses_to_start() {
    let (status, stderr) = agent_exit("nonet-start", &[], &["--no-network"]);
    assert!(!status.success(), "exit status {status}");
    assert!(
        stderr.contains("cannot start in mode `pipelined`")
            && stderr.contains("--no-network")
            && stderr.contains("Use mode `sync`")
            && stderr.contains("`async`"),
        "unexpected error:\n{stderr}"
    );
}

/// The mode column of the disk's row of `ctl status`.
fn status_mode(ctl: &Path) -> String {
    let out = pipecloud()
        .args(["ctl", "--socket"])
        .arg(ctl)
        .arg("status")
        .output()
        .expect("pipecloud ctl status");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "ctl status failed: {text}");
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|c| c.len() > 3 && c[0] == GROUP && c[1] == "disk0")
        .map(|c| c[3].to_owned())
        .unwrap_or_else(|| panic!("no row for {GROUP}/disk0 in:\n{text}"))
}

#[test]
fn switch_to_pipelined_without_network_path_is_refused() {
    let scratch = Scratch::new("nonet-switch");
    let backup = Backup::start(&scratch, GROUP);
    let work = scratch.0.join("agent");
    std::fs::create_dir_all(work.join("nbd")).expect("creating the agent's directories");
    let topo = work.join("t.toml");
    write_topology(
        &topo,
        &work,
        "sync",
        (
            format!("127.0.0.1:{}", backup.port),
            backup.ca(),
            backup.agent_cert(),
            backup.agent_key(),
        ),
    );
    let log = work.join("agent.log");
    let log_file = std::fs::File::create(&log).expect("agent log");
    let mut agent = Agent(
        pipecloud()
            .args(["agent", "--topology"])
            .arg(&topo)
            .args(["--host", "h", "--no-network"])
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("spawning pipecloud agent"),
    );
    let ctl = work.join("ctl.sock");
    let deadline = Instant::now() + PATIENCE;
    while !ctl.exists() {
        if let Some(st) = agent.0.try_wait().expect("waiting for the agent") {
            panic!(
                "agent exited ({st}); log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "the agent never opened {ctl:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(status_mode(&ctl), "sync");
    let out = pipecloud()
        .args(["ctl", "--socket"])
        .arg(&ctl)
        .args(["mode", "pipelined"])
        .output()
        .expect("pipecloud ctl mode");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "switch accepted: {text}");
    assert!(
        text.contains("needs the network path") && text.contains("Use mode `sync`"),
        "unexpected answer: {text}"
    );
    assert_eq!(status_mode(&ctl), "sync", "the agent keeps its mode");
    // Switches that need no network path still work.
    let out = pipecloud()
        .args(["ctl", "--socket"])
        .arg(&ctl)
        .args(["mode", "async"])
        .output()
        .expect("pipecloud ctl mode");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(status_mode(&ctl), "async");
    assert!(
        agent.0.try_wait().expect("agent").is_none(),
        "agent still runs"
    );
}
