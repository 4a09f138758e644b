//! The full-state disaster (issue 21 "Tests"): `pipecloud-harness disaster
//! --topology topology/guest.toml --mode checkpoint --points N`.
//!
//! One point: a primary host namespace runs the agent and the guest (`pipecloud
//! vm start`, NIC on a tap, disk from the agent's NBD export); a client namespace
//! holds **one TCP connection** to the guest's counter service and keeps sending
//! requests; a backup namespace runs `backup-server`. At a random instant (the
//! first reply to reach the client after a random run time) the whole primary
//! site dies (QEMU and the agent SIGKILLed, the host namespace
//! deleted with its links). The backup fails over, `pipecloud vm restore`
//! resumes the guest in the backup namespace (same tap name and addresses), and
//! the guest's address moves: the client's route to it now goes to the backup
//! site. The client only waits on its socket; a reconnect would be a failure.
//!
//! Checks per point: the connection survived; the replies continue the counter
//! exactly (`counter_gaps`: a reply that is not the previous one + 1); no reply
//! the client saw before the disaster is unknown to the resumed guest
//! (`unsafe_replies`: replies at or above the first value after the restore);
//! after a clean power-off every acknowledged request is in the guest's on-disk
//! log and `e2fsck -fn` of the disk is clean.
//!
//! **Where the checkpoint comes from: the real pieces.** The agent runs the
//! topology's `mode = "checkpoint"` with its network path: its rules hold
//! everything the guest sends out of the tap (NFQUEUE), its epoch loop pauses the
//! guest every 20 ms (docs/design.md §9; QEMU runs with the capture shim,
//! `pipecloud vm start --preload`), tags the guest's output with the open epoch
//! and releases it only when the backup acknowledges that epoch (§11). At the
//! disaster the agent and QEMU are SIGKILLed wherever they are; `backup-server
//! failover` writes the disk at the last acknowledged epoch's barrier and that
//! epoch's `<machine>.ram` and `<machine>.devstate`, and `pipecloud vm restore`
//! resumes the guest from them. The RESULT line says `source=epochs`.
//!
//! **Showing the check can fail.** `--inject-fault release-before-ack` runs the
//! agent binary `pipecloud-fault-release-before-ack` (built by
//! `scripts/fault-fullstate.sh` with the TEST-ONLY cargo feature
//! `fault-release-before-ack`, which releases each epoch's output as soon as the
//! epoch opens, before any checkpoint of it is acknowledged). The client then sees
//! replies of guest states newer than the one resumed, and the run must fail.

use crate::netns::{addr, cleanup_prefix, route, spawn_in, veth, Netns};
use crate::run::bin;
use crate::site::render_topology;
use crate::sys::{ns_cmd, run, sh, wait_until, Guarded};
use crate::wan::{start_calibrated, RttReport, WanDelay};
use anyhow::{bail, Context, Result};
use pipecloud_core::topology::{Mode, Topology, Vm};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The backup server's address and port (the shipped guest topology's endpoint).
const BACKUP_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const BACKUP_PORT: u16 = 7800;
/// The WAN router's side of the backup link.
const WAN_BACKUP_SIDE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The primary host's link to the WAN router: the host's side and the router's.
const HOST_WAN_SIDE: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 1);
const WAN_HOST_SIDE: Ipv4Addr = Ipv4Addr::new(10, 99, 1, 254);
/// Port of the WAN calibration's echo server in the backup namespace.
const RTT_PROBE_PORT: u16 = 7900;
/// The client's link to the primary host, and the host's side of it.
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 100);
const HOST_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// The client's link to the backup site, and the backup's side of it.
const CLIENT_IP_B: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 100);
const BACKUP_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
/// The guest service's port (the guest's init default).
const SERVICE_PORT: u16 = 7000;
/// Replies the client must get after the restore before the point ends.
const REPLIES_AFTER: usize = 20;
/// Longest wait for a boot, a restore or a reply.
const PATIENCE: Duration = Duration::from_secs(120);

/// Faults a run can inject to show the check fails (harness only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// The agent releases an epoch's output before the backup acknowledged it
    /// (the agent binary built with the TEST-ONLY feature of the same name).
    ReleaseBeforeAck,
}

/// What one point found.
#[derive(Debug, Default)]
pub struct PointResult {
    pub replies_before: usize,
    pub replies_after: usize,
    pub resumed: bool,
    pub survived: bool,
    pub counter_gaps: usize,
    pub unsafe_replies: usize,
    pub fsck_clean: bool,
    pub missing_in_log: usize,
    pub failover_ms: u128,
    pub restore_ms: u128,
    /// The last counter value the client saw before the disaster, and the
    /// first after it (from the resumed guest).
    pub last_before: Option<u64>,
    pub first_after: Option<u64>,
    /// The acknowledged epoch the backup failed over to.
    pub epoch: u64,
    /// The agent's `ctl status` epochs line just before the disaster.
    pub status: String,
    /// Epochs the backup acknowledged per second while the client ran.
    pub acked_per_s: Option<f64>,
    pub notes: Vec<String>,
}

impl PointResult {
    /// Why the point broke the guarantee (empty: it held).
    pub fn failures(&self) -> Vec<String> {
        let mut w = self.notes.clone();
        if !self.resumed {
            w.push("the guest did not resume".into());
        }
        if !self.survived {
            w.push("the client's connection did not survive".into());
        }
        if self.counter_gaps > 0 {
            w.push(format!("{} counter gaps", self.counter_gaps));
        }
        if self.unsafe_replies > 0 {
            w.push(format!(
                "{} replies the resumed guest does not remember",
                self.unsafe_replies
            ));
        }
        if !self.fsck_clean {
            w.push("e2fsck -fn of the recovered disk is not clean".into());
        }
        if self.missing_in_log > 0 {
            w.push(format!(
                "{} acknowledged requests missing from the on-disk log",
                self.missing_in_log
            ));
        }
        if self.replies_before == 0 {
            w.push("no reply before the disaster: the point proves nothing".into());
        }
        w
    }
}

/// The run's topology: the harness's usual rendering (every path under `work`,
/// mode `checkpoint`) with each guest's `[machine.vm]` table added, its
/// kernel and initrd made absolute and its RAM file named after the run; the
/// mode, RAM size and guest workload as `o` says. Only one host is supported.
fn render(
    topo: &Topology,
    topo_dir: &Path,
    work: &Path,
    prefix: &str,
    o: &GuestOptions,
) -> Result<String> {
    if topo.hosts.len() != 1 {
        bail!(
            "the full-state disaster supports one primary host; the topology has {}",
            topo.hosts.len()
        );
    }
    let mut s = render_topology(topo, o.mode, &work.join("certs"), work);
    for m in &topo.machines {
        let vm =
            m.vm.as_ref()
                .with_context(|| format!("machine `{}` is not a guest ([machine.vm])", m.name))?;
        let abs = |p: &Path| -> Result<PathBuf> {
            let p = topo_dir.join(p);
            std::fs::canonicalize(&p)
                .with_context(|| format!("{} (run scripts/build-guest.sh)", p.display()))
        };
        let append = match o.dirty {
            Some((mib, rate)) => format!("{} pipecloud.dirty={mib}:{rate}", vm.append),
            None => vm.append.clone(),
        };
        let mut t = format!(
            "[machine.vm]\nkernel = \"{}\"\nram_mib = {}\nplatform = \"{}\"\ntap = \"{}\"\n\
             prefix_len = {}\nram_file = \"/dev/shm/{prefix}-{}.ram\"\nappend = \"{}\"\n",
            abs(&vm.kernel)?.display(),
            o.ram_mib.unwrap_or(vm.ram_mib),
            vm.platform,
            vm.tap,
            vm.prefix_len,
            m.name,
            append
        );
        if let Some(i) = &vm.initrd {
            let _ = writeln!(t, "initrd = \"{}\"", abs(i)?.display());
        }
        if let Some(gw) = vm.gateway {
            let _ = writeln!(t, "gateway = \"{gw}\"");
        }
        // After the machine's own keys (site::render_topology writes `outbound` last).
        let head = format!("name = \"{}\"\nip = \"{}\"\n", m.name, m.ip);
        let at = s
            .find(&head)
            .and_then(|i| s[i..].find("outbound = ").map(|j| i + j))
            .and_then(|i| s[i..].find('\n').map(|j| i + j + 1))
            .context("machine not found in the rendered topology")?;
        s.insert_str(at, &t);
    }
    Ok(s)
}

/// The client: one connection, requests until `stop`; every reply in `replies`.
/// Returns why it ended (Ok: stopped as asked).
fn client(
    target: SocketAddr,
    replies: Arc<Mutex<Vec<(u64, u64)>>>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let deadline = Instant::now() + PATIENCE;
    let stream = loop {
        match TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return Err(e).context("the guest's service never accepted a connection")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.set_nodelay(true)?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    for n in 1u64.. {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        out.write_all(format!("req-{n}\n").as_bytes())
            .with_context(|| format!("sending request {n}"))?;
        line.clear();
        if reader
            .read_line(&mut line)
            .with_context(|| format!("waiting for reply {n}"))?
            == 0
        {
            bail!("the connection closed at request {n}");
        }
        let v: u64 = line
            .trim()
            .parse()
            .with_context(|| format!("reply {line:?} to request {n}"))?;
        replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((n, v));
    }
    Ok(())
}

/// A daemonized QEMU, known by its pid file: SIGKILLed on drop.
pub struct QemuPid(PathBuf);

impl QemuPid {
    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.0).ok()?.trim().parse().ok()
    }
    pub fn kill(&self) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on the QEMU this run started (its pid file).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    pub fn running(&self) -> bool {
        self.pid().is_some_and(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit_once(") ")
                    .is_some_and(|(_, r)| !r.starts_with('Z'))
            })
        })
    }
}

impl Drop for QemuPid {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Builds the test guest (scripts/build-guest.sh; cached under target/guest/).
pub fn build_guest() -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-guest.sh");
    run(&mut std::process::Command::new(&script)).context("building the guest")?;
    Ok(())
}

/// The shipped guest topology (topology/guest.toml), with the guest built.
pub fn guest_topology() -> Result<PathBuf> {
    build_guest()?;
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology/guest.toml");
    std::fs::canonicalize(&p).with_context(|| p.display().to_string())
}

/// The agent binary of a run: the normal one, or the one built with the
/// injected fault (scripts/fault-fullstate.sh puts it next to the harness).
pub fn agent_bin(fault: Option<Fault>) -> Result<PathBuf> {
    match fault {
        None => Ok(bin("pipecloud")),
        Some(Fault::ReleaseBeforeAck) => {
            let p = bin("pipecloud-fault-release-before-ack");
            if !p.is_file() {
                bail!(
                    "{} not found: --inject-fault release-before-ack needs the agent built with the \
                     TEST-ONLY fault (scripts/fault-fullstate.sh builds it)",
                    p.display()
                );
            }
            Ok(p)
        }
    }
}

/// The agent's `epochs …` status line (pauses, acked epochs), or why not.
fn ctl_status(topology: &Path) -> String {
    match run(std::process::Command::new(bin("pipecloud"))
        .args(["ctl", "--topology"])
        .arg(topology)
        .arg("status"))
    {
        Ok(out) => out
            .lines()
            .find(|l| l.trim_start().starts_with("epochs "))
            .unwrap_or("no epochs line")
            .trim()
            .to_owned(),
        Err(e) => format!("ctl status: {e:#}"),
    }
}

/// The number after `key` in a status line (`acked=`, `pauses=`).
pub fn status_field(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// How [`GuestSite::up`] runs the guest.
#[derive(Clone, Debug)]
pub struct GuestOptions {
    /// The group's mode at start (`checkpoint`: the epoch loop; QEMU with the shim).
    pub mode: Mode,
    /// Guest RAM, MiB (`None`: the topology's).
    pub ram_mib: Option<u64>,
    /// A memory-writing workload in the guest: (MiB, pages per second)
    /// (`pipecloud.dirty=`, scripts/guest/init).
    pub dirty: Option<(u64, u64)>,
    /// Round trip of the emulated WAN between the primary host and the backup
    /// (`None`: no delay).
    pub rtt: Option<Duration>,
    pub fault: Option<Fault>,
}

impl Default for GuestOptions {
    fn default() -> Self {
        GuestOptions {
            mode: Mode::Checkpoint,
            ram_mib: None,
            dirty: None,
            rtt: None,
            fault: None,
        }
    }
}

/// A file removed when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One running full-state site (see the module doc): client, primary host,
/// WAN router and backup namespaces; the backup server; the agent; the guest.
/// Dropping it kills QEMU, the agent and the backup, then deletes the
/// namespaces (fields drop in declaration order).
pub struct GuestSite {
    pub qemu: QemuPid,
    pub agent: Guarded,
    _backup: Guarded,
    _wan: Option<WanDelay>,
    /// The primary host (taken by a disaster).
    pub host_ns: Option<Netns>,
    _wan_ns: Netns,
    pub client_ns: Netns,
    pub backup_ns: Netns,
    _ram_guard: RemoveOnDrop,
    _dev_guard: RemoveOnDrop,
    /// The measured WAN round trip (with [`GuestOptions::rtt`]).
    pub rtt: Option<RttReport>,
    /// The run's rendered topology.
    pub run_topo: PathBuf,
    pub vm: Vm,
    /// The guest machine, its disk and its group.
    pub machine: String,
    pub disk: String,
    pub group: String,
    /// The backup server's data directory.
    pub data: PathBuf,
    /// The guest service's address.
    pub target: SocketAddr,
}

impl GuestSite {
    /// Builds the site in `work` with namespaces named `<prefix>-…` and boots the
    /// guest (returns once `pipecloud vm start` did; the service may still boot).
    pub fn up(topo_path: &Path, work: &Path, prefix: &str, o: &GuestOptions) -> Result<GuestSite> {
        let text = std::fs::read_to_string(topo_path)
            .with_context(|| format!("reading {}", topo_path.display()))?;
        let topo = Topology::parse(&text, &topo_path.display().to_string())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let topo_dir = std::fs::canonicalize(
            topo_path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        )?;
        let m = topo
            .machines
            .iter()
            .find(|m| m.outbound && m.vm.is_some())
            .context("no outbound guest in the topology")?
            .clone();
        let disk = topo
            .disks_of(&m.name)
            .first()
            .map(|d| d.name.clone())
            .context("the guest has no disk")?;
        cleanup_prefix(prefix);
        std::fs::create_dir_all(work.join("images"))?;
        std::fs::create_dir_all(work.join("h0"))?;
        let run_topo = work.join("topology.toml");
        std::fs::write(&run_topo, render(&topo, &topo_dir, work, prefix, o)?)?;
        let rt = Topology::parse(&std::fs::read_to_string(&run_topo)?, "run topology")
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let vm = rt.vm(&m.name).context("guest")?.clone();
        let ram_guard = RemoveOnDrop(vm.ram_file.clone());
        // The agent's device-state scratch file next to the RAM file (src/agent.rs):
        // a SIGKILLed agent leaves it behind.
        let dev_guard = RemoveOnDrop(PathBuf::from(format!("{}.devstate", vm.ram_file.display())));

        // Network: client, backup, WAN router, primary host.
        let client_ns = Netns::new(&format!("{prefix}-client"))?;
        let backup_ns = Netns::new(&format!("{prefix}-backup"))?;
        let wan_ns = Netns::new(&format!("{prefix}-wan"))?;
        let host_ns = Netns::new(&format!("{prefix}-h0"))?;
        veth(&host_ns, "c0", &client_ns, "eth0")?;
        addr(&host_ns, "c0", HOST_CLIENT_SIDE, 24)?;
        addr(&client_ns, "eth0", CLIENT_IP, 24)?;
        // The client's address must outlive the primary site: on `eth0` alone it
        // would vanish with the veth when the host namespace dies, and the client's
        // kernel would then drop every reply the resumed guest sends to it (a real
        // client's address does not depend on the primary site's link).
        addr(&client_ns, "lo", CLIENT_IP, 32)?;
        // Primary host -> WAN router -> backup (the router delays with --rtt).
        veth(&host_ns, "b0", &wan_ns, "h0")?;
        addr(&host_ns, "b0", HOST_WAN_SIDE, 24)?;
        addr(&wan_ns, "h0", WAN_HOST_SIDE, 24)?;
        veth(&wan_ns, "b0", &backup_ns, "eth0")?;
        addr(&wan_ns, "b0", WAN_BACKUP_SIDE, 24)?;
        addr(&backup_ns, "eth0", BACKUP_IP, 24)?;
        wan_ns.sysctl("net.ipv4.ip_forward", "1")?;
        route(&host_ns, "10.99.0.0/24", "b0", Some(WAN_HOST_SIDE))?;
        route(&backup_ns, "10.99.1.0/24", "eth0", Some(WAN_BACKUP_SIDE))?;
        veth(&client_ns, "eth1", &backup_ns, "c0")?;
        addr(&client_ns, "eth1", CLIENT_IP_B, 24)?;
        addr(&backup_ns, "c0", BACKUP_CLIENT_SIDE, 24)?;
        host_ns.sysctl("net.ipv4.ip_forward", "1")?;
        backup_ns.sysctl("net.ipv4.ip_forward", "1")?;
        route(
            &client_ns,
            &format!("{}/32", m.ip),
            "eth0",
            Some(HOST_CLIENT_SIDE),
        )?;
        // The backup site reaches the client's address over its own link (the
        // connection keeps the client's primary-side address).
        route(
            &backup_ns,
            &format!("{CLIENT_IP}/32"),
            "c0",
            Some(CLIENT_IP_B),
        )?;
        let (wan, rtt) = match o.rtt {
            Some(rtt) => {
                let (w, r) = start_calibrated(
                    &wan_ns.name,
                    rtt,
                    &host_ns.name,
                    &backup_ns.name,
                    SocketAddr::new(BACKUP_IP.into(), RTT_PROBE_PORT),
                    50,
                )?;
                (Some(w), Some(r))
            }
            None => (None, None),
        };

        // Backup server (unprivileged) and its PKI.
        let g = topo.group.name.clone();
        let certs = work.join("certs");
        let data = work.join("backup");
        run(std::process::Command::new(bin("backup-server"))
            .args(["certs", "--dir"])
            .arg(&certs)
            .args(["--server-name", "backup.pipecloud.test", "--group", &g])
            .args(["--listen", &format!("{BACKUP_IP}:{BACKUP_PORT}")]))?;
        std::fs::create_dir_all(&data)?;
        sh(&["chown", "-R", "nobody:nogroup", &data.to_string_lossy()])?;
        sh(&["chmod", "-R", "a+rX", &certs.to_string_lossy()])?;
        sh(&["chmod", "a+x", &work.to_string_lossy()])?;
        let cfg = work.join("backup.toml");
        std::fs::write(
            &cfg,
            format!(
                "listen = \"{BACKUP_IP}:{BACKUP_PORT}\"\ndata_dir = \"{}\"\n\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                data.display(),
                certs.join("ca.pem").display(),
                certs.join("server.pem").display(),
                certs.join("server.key").display()
            ),
        )?;
        let mut cmd = ns_cmd(&backup_ns.name, "setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin("backup-server"))
            .args(["serve", "--config"])
            .arg(&cfg);
        let backup = Guarded::spawn("backup-server", &mut cmd, &work.join("backup-server.log"))?;

        // The agent and the guest on the primary host. The tap first: the agent's
        // rules name the interface `ip route get <guest ip>` finds.
        {
            let (vm, ip) = (vm.clone(), m.ip);
            spawn_in(&host_ns.name, move || {
                pipecloud::vm::host::ensure_tap(&vm, ip)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the tap thread panicked"))?
            .context("the guest's tap")?;
        }
        let mut cmd = ns_cmd(&host_ns.name, &agent_bin(o.fault)?.to_string_lossy());
        cmd.args(["agent", "--topology"])
            .arg(&run_topo)
            .args(["--host", &topo.hosts[0].name]);
        let agent = Guarded::spawn("agent", &mut cmd, &work.join("agent.log"))?;
        let sock = rt.nbd_socket(&disk).context("NBD socket")?;
        wait_until(PATIENCE, "the agent's NBD export", || sock.exists())?;
        let qemu = QemuPid(vm.pidfile.clone());
        let mut start = ns_cmd(&host_ns.name, &bin("pipecloud").to_string_lossy());
        start
            .args(["vm", "start", "--topology"])
            .arg(&run_topo)
            .args(["--machine", &m.name]);
        if o.mode == Mode::Checkpoint {
            let shim = bin("libpipecloud_shim.so");
            if !shim.is_file() {
                bail!(
                    "{} not found (cargo build --release -p pipecloud-shim)",
                    shim.display()
                );
            }
            start.arg("--preload").arg(&shim);
        }
        run(&mut start).context("pipecloud vm start")?;
        Ok(GuestSite {
            qemu,
            agent,
            _backup: backup,
            _wan: wan,
            host_ns: Some(host_ns),
            _wan_ns: wan_ns,
            client_ns,
            backup_ns,
            _ram_guard: ram_guard,
            _dev_guard: dev_guard,
            rtt,
            run_topo,
            vm,
            target: SocketAddr::new(m.ip.into(), SERVICE_PORT),
            machine: m.name,
            disk,
            group: g,
            data,
        })
    }

    /// The agent's `epochs …` status line (pauses, acked epochs), or why not.
    pub fn epochs_status(&self) -> String {
        ctl_status(&self.run_topo)
    }

    /// Switches the group's mode at run time (`pipecloud ctl mode`).
    pub fn set_mode(&self, mode: Mode) -> Result<String> {
        run(std::process::Command::new(bin("pipecloud"))
            .args(["ctl", "--topology"])
            .arg(&self.run_topo)
            .args(["mode", mode.as_str()]))
        .with_context(|| format!("pipecloud ctl mode {mode}"))
    }
}

/// Runs one point in `work` with namespaces named `<prefix>-…`.
pub fn run_point(
    topo_path: &Path,
    work: &Path,
    prefix: &str,
    run_for: Duration,
    fault: Option<Fault>,
) -> Result<PointResult> {
    let opts = GuestOptions {
        fault,
        ..GuestOptions::default()
    };
    let mut site = GuestSite::up(topo_path, work, prefix, &opts)?;
    let (run_topo, vm, g, data) = (
        site.run_topo.clone(),
        site.vm.clone(),
        site.group.clone(),
        site.data.clone(),
    );
    let (disk, machine) = (site.disk.clone(), site.machine.clone());

    // The client and its one connection.
    let replies: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let target = site.target;
    let handle = {
        let (r, s) = (replies.clone(), stop.clone());
        spawn_in(&site.client_ns.name, move || client(target, r, s))
    };
    let count = || replies.lock().unwrap_or_else(|p| p.into_inner()).len();
    wait_until(PATIENCE, "the first reply of the guest", || {
        count() > 0 || handle.is_finished()
    })?;
    let (t_run, status_run) = (Instant::now(), ctl_status(&run_topo));
    std::thread::sleep(run_for);

    // The disaster: the whole primary site dies wherever its epoch loop is, at
    // the most demanding instant for output commit: right after a reply reached
    // the client (so the guest state that sent it must be in an acknowledged
    // epoch; a reply released earlier than that is caught every time, not only
    // when a later reply happens to fall between a checkpoint and the kill).
    let status = ctl_status(&run_topo);
    let run_secs = t_run.elapsed().as_secs_f64();
    let seen = count();
    let deadline = Instant::now() + PATIENCE;
    while count() == seen && !handle.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(100));
    }
    site.qemu.kill();
    site.agent.kill();
    let replies_before = count();
    drop(site.host_ns.take()); // the primary site's links die with it
    let t0 = Instant::now();
    let failover = work.join("failover");
    std::fs::create_dir_all(&failover)?;
    sh(&["chown", "nobody:nogroup", &failover.to_string_lossy()])?;
    let out = run(std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin("backup-server"))
        .args(["failover", "--group", &g, "--out"])
        .arg(&failover)
        .arg("--data-dir")
        .arg(&data))?;
    let image = out
        .lines()
        .filter_map(|l| l.strip_prefix("image: "))
        .map(PathBuf::from)
        .find(|p| p.file_stem().is_some_and(|s| s.to_string_lossy() == disk))
        .with_context(|| format!("no image of {disk} in the failover output:\n{out}"))?;
    let epoch = out
        .lines()
        .find_map(|l| l.strip_prefix("checkpoint epoch: "))
        .and_then(|e| e.trim().parse::<u64>().ok())
        .with_context(|| format!("no checkpoint epoch in the failover output:\n{out}"))?;
    let ram = failover.join(format!("{machine}.ram"));
    let state = failover.join(format!("{machine}.devstate"));
    let failover_ms = t0.elapsed().as_millis();
    let t1 = Instant::now();
    let restored = run(
        ns_cmd(&site.backup_ns.name, &bin("pipecloud").to_string_lossy())
            .args(["vm", "restore", "--topology"])
            .arg(&run_topo)
            .args(["--machine", &machine, "--ram"])
            .arg(&ram)
            .arg("--device-state")
            .arg(&state)
            .arg("--disk")
            .arg(format!("{disk}={}", image.display())),
    );
    let restore_ms = t1.elapsed().as_millis();
    let mut r = PointResult {
        replies_before,
        epoch,
        acked_per_s: status_field(&status, "acked=")
            .zip(status_field(&status_run, "acked="))
            .map(|(b, a)| b.saturating_sub(a) as f64 / run_secs),
        status,
        failover_ms,
        restore_ms,
        ..PointResult::default()
    };
    if let Err(e) = &restored {
        r.notes.push(format!("restore failed: {e:#}"));
    }
    r.resumed = restored.is_ok();
    // The guest's address moves to the backup site.
    site.client_ns.sh(&[
        "ip",
        "route",
        "replace",
        &format!("{}/32", target.ip()),
        "via",
        &BACKUP_CLIENT_SIDE.to_string(),
    ])?;
    if r.resumed {
        let _ = wait_until(PATIENCE, "replies from the resumed guest", || {
            count() >= replies_before + REPLIES_AFTER || handle.is_finished()
        });
    }
    stop.store(true, Ordering::SeqCst);
    if r.resumed {
        match handle.join() {
            Ok(Ok(())) => r.survived = true,
            Ok(Err(e)) => r.notes.push(format!("client: {e:#}")),
            Err(_) => r.notes.push("the client thread panicked".into()),
        }
    }
    let got = replies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    r.replies_after = got.len().saturating_sub(replies_before);
    r.last_before = replies_before
        .checked_sub(1)
        .and_then(|i| got.get(i))
        .map(|x| x.1);
    r.first_after = got.get(replies_before).map(|x| x.1);
    r.counter_gaps = got.windows(2).filter(|w| w[1].1 != w[0].1 + 1).count()
        + usize::from(got.first().is_some_and(|f| f.1 != 1));
    if let Some(first_after) = got.get(replies_before) {
        r.unsafe_replies = got[..replies_before]
            .iter()
            .filter(|x| x.1 >= first_after.1)
            .count();
    }

    // Clean power-off, then the disk.
    if r.resumed {
        // The console connection stays open until QEMU exits: QEMU drops the
        // input it has not read yet when its client hangs up (the guest then
        // saw `poweroff` without its newline and never powered off).
        let mut con = std::os::unix::net::UnixStream::connect(&vm.console).ok();
        if let Some(c) = con.as_mut() {
            let _ = c.write_all(b"poweroff\n");
        }
        if wait_until(PATIENCE, "the resumed guest's power-off", || {
            !site.qemu.running()
        })
        .is_err()
        {
            r.notes.push("the resumed guest did not power off".into());
        }
        drop(con);
    }
    site.qemu.kill();
    r.fsck_clean = run(std::process::Command::new("e2fsck").arg("-fn").arg(&image)).is_ok();
    let log = run(std::process::Command::new("debugfs")
        .args(["-R", "cat /requests.log"])
        .arg(&image))
    .unwrap_or_default();
    let on_disk: HashMap<String, u64> = log
        .lines()
        .filter_map(|l| {
            let (v, req) = l.split_once(' ')?;
            Some((req.to_owned(), v.parse().ok()?))
        })
        .collect();
    r.missing_in_log = got
        .iter()
        .filter(|(n, v)| on_disk.get(&format!("req-{n}")) != Some(v))
        .count();
    Ok(r)
}
