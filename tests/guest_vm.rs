//! A QEMU guest as a protected machine (issue 21 §1), end to end with the real
//! binaries: `scripts/build-guest.sh` builds the guest (Debian kernel, busybox
//! initramfs, our static counter service); `pipecloud agent` (sync mode) serves
//! its disk over NBD and replicates it to a real `backup-server`; `pipecloud vm
//! start` boots it in a network namespace of the test, NIC on a tap, disk through
//! QEMU's own NBD client. A client holds **one TCP connection** to the service.
//!
//! Then a checkpoint by hand, the way the full-state mode will take them: the
//! guest is stopped, its device state saved over QMP (RAM stays in the shared RAM
//! file), QEMU is killed (SIGKILL) and the agent stopped; the backup fails over
//! and `pipecloud vm restore` resumes the guest from the RAM image, the device
//! state and the backup's disk image. The **same connection** must go on: the
//! next replies continue the counter exactly. Last, the guest powers off from
//! its console, and the backup's image must hold every request in the service's
//! log (`debugfs`) and pass `e2fsck -fn`.
//!
//! A missing tool FAILS the test naming its Debian package. The netns (with the
//! tap), QEMU, the agent, the backup server and the RAM files are removed on
//! every exit path (guards).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/agent_topology.rs"]
mod agent_topology;
#[path = "support/backup.rs"]
mod backup;
#[path = "support/blockstack.rs"]
mod blockstack;
#[path = "support/netns.rs"]
mod netns;

use agent_topology::OneDisk;
use backup::{Backup, Scratch, PATIENCE};
use blockstack::{require, run};
use netns::Netns;
use pipecloud::fullstate::qmp::Qmp;
use serde_json::json;

const GROUP: &str = "guestvm";
const DISK: &str = "disk0";
const SIZE: u64 = 64 << 20;
const GUEST_IP: &str = "10.10.0.10";
const PORT: u16 = 7000;
/// Requests before and after the checkpoint.
const REQUESTS: u64 = 20;

/// Builds the guest (cached by its inputs) and returns the directory of
/// `vmlinuz` and `initrd.cpio.gz`.
fn build_guest() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (ok, out) = run(&mut Command::new(root.join("scripts/build-guest.sh")));
    assert!(ok, "scripts/build-guest.sh failed:\n{out}");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("guest")
}

/// A process we started; SIGKILLed on drop unless already gone.
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A daemonized QEMU known by its pid file; SIGKILLed on drop. Also removes
/// the guest's RAM file.
struct Qemu {
    pidfile: PathBuf,
    ram_file: PathBuf,
}

impl Qemu {
    fn pid(&self) -> Option<libc::pid_t> {
        std::fs::read_to_string(&self.pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    fn alive(pid: libc::pid_t) -> bool {
        // A zombie is not alive: QEMU is not our child (it daemonized), so
        // kill(pid, 0) succeeding is enough once init reaped it; check /proc.
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, r)| !r.starts_with('Z'))
        })
    }

    fn kill(&self) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on the QEMU this test started (its pid file).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            let deadline = Instant::now() + PATIENCE;
            while Self::alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = std::fs::remove_file(&self.pidfile);
    }

    fn wait_exit(&self, what: &str) {
        let pid = self.pid().expect("QEMU's pid file");
        let deadline = Instant::now() + PATIENCE;
        while Self::alive(pid) {
            assert!(Instant::now() < deadline, "QEMU did not exit after {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.ram_file);
    }
}

/// One request over the connection; returns the counter the guest replied.
fn request(conn: &mut BufReader<TcpStream>, text: &str) -> u64 {
    conn.get_mut()
        .write_all(format!("{text}\n").as_bytes())
        .expect("sending a request");
    let mut line = String::new();
    conn.read_line(&mut line).expect("reading a reply");
    line.trim()
        .parse()
        .unwrap_or_else(|_| panic!("reply {line:?} to {text:?} is not a counter"))
}

fn pipecloud() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pipecloud"))
}

#[test]
fn guest_boots_on_the_agents_export_and_resumes_from_a_checkpoint_on_one_connection() {
    for tool in ["qemu-system-x86_64", "debugfs", "e2fsck", "nsenter"] {
        require(tool);
    }
    let guest = build_guest();
    let scratch = Scratch::new("guest");
    let backup = Backup::start(&scratch, GROUP);
    let work = scratch.0.join("agent");
    std::fs::create_dir_all(work.join("nbd")).expect("creating the agent's directories");
    let ns = Netns::new("g");
    let ram_file = PathBuf::from(format!(
        "/dev/shm/pipecloud-test-{}.ram",
        std::process::id()
    ));
    let run_dir = work.join("nbd");
    let vm = format!(
        "[machine.vm]\nkernel = \"{}\"\ninitrd = \"{}\"\nram_mib = 128\ntap = \"pct0\"\n\
         gateway = \"10.10.0.1\"\nram_file = \"{}\"\n",
        guest.join("vmlinuz").display(),
        guest.join("initrd.cpio.gz").display(),
        ram_file.display(),
    );
    let text = OneDisk {
        group: GROUP,
        id: 21,
        mode: "sync",
        endpoint: format!("127.0.0.1:{}", backup.port),
        ca: &backup.ca(),
        cert: &backup.agent_cert(),
        key: &backup.agent_key(),
        work: &work,
        disk: DISK,
        size: SIZE,
        policy: "",
        host: "",
    }
    .toml()
    .replacen("writer = true\n", &format!("writer = true\n{vm}"), 1);
    let topology = work.join("topology.toml");
    std::fs::write(&topology, &text).expect("writing the topology");
    let qemu = Qemu {
        pidfile: run_dir.join("m.pid"),
        ram_file: ram_file.clone(),
    };

    // The agent: serves disk0 over NBD, replicates it synchronously.
    let log = work.join("agent.log");
    let log_file = std::fs::File::create(&log).expect("agent log");
    let child = pipecloud()
        .args(["agent", "--topology"])
        .arg(&topology)
        .args(["--host", "h", "--no-network"])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log fd"))
        .stderr(log_file)
        .spawn()
        .expect("spawning pipecloud agent");
    let mut agent = Proc {
        child: Some(child),
        log,
    };
    let sock = run_dir.join(format!("{DISK}.sock"));
    let deadline = Instant::now() + PATIENCE;
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "the agent never served {}; log:\n{}",
            sock.display(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The guest, in the test's namespace (its tap lives there).
    let t0 = Instant::now();
    let (ok, out) = run(Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg(env!("CARGO_BIN_EXE_pipecloud"))
        .args(["vm", "start", "--topology"])
        .arg(&topology)
        .args(["--machine", "m"]));
    assert!(ok, "pipecloud vm start failed:\n{out}");
    let console_log = run_dir.join("m.console.log");
    let console = || std::fs::read_to_string(&console_log).unwrap_or_default();

    // One connection, made inside the namespace, kept for the whole test.
    let stream = ns
        .spawn(move || {
            let deadline = Instant::now() + PATIENCE;
            loop {
                match TcpStream::connect_timeout(
                    &format!("{GUEST_IP}:{PORT}").parse().expect("address"),
                    Duration::from_secs(1),
                ) {
                    Ok(s) => return Ok(s),
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })
        .join()
        .expect("connect thread");
    let stream = stream.unwrap_or_else(|e| {
        panic!(
            "the guest's service never answered: {e}; console:\n{}",
            console()
        )
    });
    let boot_ms = t0.elapsed().as_millis();
    stream
        .set_read_timeout(Some(PATIENCE))
        .expect("read timeout");
    let mut conn = BufReader::new(stream);
    for i in 1..=REQUESTS {
        assert_eq!(request(&mut conn, &format!("before-{i}")), i, "counter");
    }

    // A checkpoint by hand: stop, device state to a file (RAM stays in the RAM
    // file), then the primary dies: QEMU killed, agent gone.
    let state = scratch.0.join("device-state.bin");
    let ram_copy = scratch.0.join("ram.img");
    {
        let mut q = Qmp::connect(&run_dir.join("m.qmp"), PATIENCE).expect("QMP");
        q.execute("stop", None).expect("stop");
        q.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
        )
        .expect("x-ignore-shared");
        q.execute(
            "migrate",
            Some(json!({"uri": format!("exec:cat > '{}'", state.display())})),
        )
        .expect("migrate");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let m = q.execute("query-migrate", None).expect("query-migrate");
            match m["status"].as_str() {
                Some("completed") => break,
                Some("failed") => panic!("saving the device state failed: {m}"),
                _ => assert!(Instant::now() < deadline, "migrate never completed"),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // `completed` can come before `cat` has written everything: kill QEMU (its
    // `cat` child finishes on its own) and copy the RAM of the stopped guest.
    std::fs::copy(&ram_file, &ram_copy).expect("copying the RAM file");
    qemu.kill();
    std::thread::sleep(Duration::from_millis(200));
    if let Some(mut c) = agent.child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = std::fs::remove_file(&ram_file);

    // Failover at the backup, restore from its image on the same tap.
    let failover = scratch.0.join("failover");
    let (ok, out) = run(Command::new(backup::backup_server_bin())
        .args(["failover", "--group", GROUP, "--out"])
        .arg(&failover)
        .arg("--config")
        .arg(backup.config()));
    assert!(ok, "backup-server failover failed:\n{out}");
    let image = out
        .lines()
        .filter_map(|l| l.strip_prefix("image: "))
        .map(PathBuf::from)
        .find(|p| p.file_stem().is_some_and(|s| s == DISK))
        .unwrap_or_else(|| panic!("no image of {DISK} in the failover output:\n{out}"));
    let (ok, out) = run(Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg(env!("CARGO_BIN_EXE_pipecloud"))
        .args(["vm", "restore", "--topology"])
        .arg(&topology)
        .args(["--machine", "m", "--ram"])
        .arg(&ram_copy)
        .arg("--device-state")
        .arg(&state)
        .arg("--disk")
        .arg(&image));
    assert!(ok, "pipecloud vm restore failed:\n{out}");
    eprintln!(
        "guest_vm: booted to service in {boot_ms} ms; {}",
        out.trim()
    );

    // The same connection goes on: the counter continues exactly.
    for i in REQUESTS + 1..=2 * REQUESTS {
        assert_eq!(
            request(&mut conn, &format!("after-{i}")),
            i,
            "the counter after the restore; console:\n{}",
            console()
        );
    }
    drop(conn);

    // Clean power-off from the console, then the backup's image holds the log.
    let mut con = UnixStream::connect(run_dir.join("m.console")).expect("console socket");
    con.write_all(b"poweroff\n")
        .expect("writing to the console");
    qemu.wait_exit("poweroff");
    assert!(
        console().contains("pipecloud-guest: powered off"),
        "no clean power-off; console:\n{}",
        console()
    );
    let (ok, out) = run(Command::new("e2fsck").arg("-fn").arg(&image));
    assert!(ok, "e2fsck -fn of the backup's image is not clean:\n{out}");
    let (ok, out) = run(Command::new("debugfs")
        .args(["-R", "cat /requests.log"])
        .arg(&image));
    assert!(ok, "debugfs failed:\n{out}");
    let logged: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("before-") || l.contains("after-"))
        .collect();
    let expected: Vec<String> = (1..=2 * REQUESTS)
        .map(|i| {
            let tag = if i <= REQUESTS { "before" } else { "after" };
            format!("{i} {tag}-{i}")
        })
        .collect();
    assert_eq!(logged, expected, "the service's log on the backup's image");
    eprintln!(
        "guest_vm: {} requests on one connection across a restore; log on the backup's image, e2fsck clean",
        2 * REQUESTS
    );
}
