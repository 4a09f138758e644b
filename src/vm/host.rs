//! The side effects of `pipecloud vm start` and `vm restore`: the tap, the
//! files QEMU uses, the QEMU process, and (restore) the QMP conversation that
//! loads a device state and resumes the guest.
//!
//! The tap is made persistent (`ip tuntap add`), so it outlives QEMU: a
//! restored guest finds the same interface, and the agent's rules, which match
//! it through `ip route get <guest ip>`, stay valid across QEMU restarts. With a
//! `gateway` the tap carries the gateway's address (`gateway/prefix_len`), so
//! the host is the guest's router; without one the host gets a /32 route to
//! the guest on the tap and answers its ARP by proxy.

use super::cmdline::{qemu_command, DiskSource, QemuCommand, Spec};
use crate::fullstate::qmp::Qmp;
use anyhow::{bail, Context};
use pipecloud_core::topology::{Topology, Vm};
use serde_json::json;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long QEMU may take to answer QMP, and a restore to load its state.
const QMP_TIMEOUT: Duration = Duration::from_secs(60);

/// `vm start` options.
#[derive(Clone, Debug)]
pub struct StartOptions {
    /// The topology file.
    pub topology: PathBuf,
    /// The machine to start.
    pub machine: String,
    /// Run QEMU in the foreground (no `-daemonize`) until it exits.
    pub foreground: bool,
    /// A library to preload into QEMU (the full-state capture shim); it is told
    /// the RAM file through `PIPECLOUD_SHIM_RAM_FILE`.
    pub preload: Option<PathBuf>,
    /// Image file of each disk, by disk name (a cold boot at the backup site
    /// after a disk-only failover); empty: the disks from the agent's NBD export.
    pub disks: Vec<(String, PathBuf)>,
}

/// `vm restore` options.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// The topology file.
    pub topology: PathBuf,
    /// The machine to restore.
    pub machine: String,
    /// The guest RAM image (copied to the topology's `ram_file` unless it is that file).
    pub ram: PathBuf,
    /// The saved device state (QEMU migration stream without RAM).
    pub device_state: PathBuf,
    /// Image file of each disk, by disk name.
    pub disks: Vec<(String, PathBuf)>,
    /// As for `vm start`.
    pub preload: Option<PathBuf>,
}

/// What a started or restored guest is.
#[derive(Clone, Debug)]
pub struct Started {
    /// QEMU's pid (from its pid file).
    pub pid: u32,
    /// Milliseconds from QEMU's start to a running guest (restore) or to
    /// QEMU having set the guest up (start).
    pub elapsed_ms: u128,
}

/// The topology, its directory and the machine's guest configuration.
fn load(topology: &Path, machine: &str) -> anyhow::Result<(Topology, PathBuf, Vm, Ipv4Addr)> {
    let text = std::fs::read_to_string(topology)
        .with_context(|| format!("reading topology {}", topology.display()))?;
    let t = Topology::parse(&text, &topology.display().to_string())
        .map_err(|e| anyhow::anyhow!("invalid topology {}:\n{e}", topology.display()))?;
    let dir = match topology.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let base = std::fs::canonicalize(dir)
        .with_context(|| format!("the topology's directory {}", dir.display()))?;
    let m = t
        .machine(machine)
        .with_context(|| format!("no machine `{machine}` in {}", topology.display()))?;
    let vm = m.vm.clone().with_context(|| {
        format!(
            "machine `{machine}` of {} has no `[machine.vm]` table",
            topology.display()
        )
    })?;
    let ip = m.ip;
    Ok((t, base, vm, ip))
}

/// The host's TSC frequency in kHz (`cpu MHz` of /proc/cpuinfo), if known.
pub fn host_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

/// The QEMU command line of `machine` (what `vm cmdline` prints).
pub fn command_for(
    topology: &Path,
    machine: &str,
    disks: &DiskSource,
    incoming: bool,
    daemonize: bool,
) -> anyhow::Result<QemuCommand> {
    let (t, base, _, _) = load(topology, machine)?;
    qemu_command(&Spec {
        topology: &t,
        base_dir: &base,
        machine,
        disks,
        incoming,
        daemonize,
        host_khz: host_khz(),
    })
    .map_err(anyhow::Error::msg)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running `ip` (Debian package iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The host side's MAC: `fe:00:` + the guest's IPv4 address (locally
/// administered, unicast), the same on every site.
pub fn tap_mac(guest_ip: Ipv4Addr) -> String {
    let guest = super::cmdline::guest_mac(None, guest_ip);
    format!("fe{}", &guest[2..])
}

/// Makes the guest's tap (persistent), brings it up and gives the host its
/// side of the guest's subnet (module doc). Idempotent.
pub fn ensure_tap(vm: &Vm, guest_ip: Ipv4Addr) -> anyhow::Result<()> {
    let tap = vm.tap.as_str();
    // `ip link show`, not /sys/class/net: sysfs shows the namespace it was
    // mounted in, not ours (`nsenter --net` keeps the mounts).
    let exists = Command::new("ip")
        .args(["link", "show", "dev", tap])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !exists {
        ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
    }
    // The same MAC on every site: a restored guest's ARP entry for its gateway
    // stays right on the backup site's tap.
    ip(&["link", "set", tap, "address", &tap_mac(guest_ip)])?;
    ip(&["link", "set", tap, "up"])?;
    match vm.gateway {
        Some(gw) => {
            let cidr = format!("{gw}/{}", vm.prefix_len);
            let have = Command::new("ip")
                .args(["-4", "-o", "addr", "show", "dev", tap])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {cidr} ")))
                .unwrap_or(false);
            if !have {
                ip(&["addr", "add", &cidr, "dev", tap])?;
            }
        }
        None => {
            ip(&["route", "replace", &format!("{guest_ip}/32"), "dev", tap])?;
            let knob = format!("/proc/sys/net/ipv4/conf/{tap}/proxy_arp");
            std::fs::write(&knob, "1").with_context(|| format!("writing {knob}"))?;
        }
    }
    Ok(())
}

fn make_parent(p: &Path) -> anyhow::Result<()> {
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// Runs QEMU daemonized (returns once QEMU has set the guest up) or in the
/// foreground (returns when it exits); returns the pid from its pid file.
fn run_qemu(
    cmd: &QemuCommand,
    vm: &Vm,
    daemonize: bool,
    preload: Option<&Path>,
) -> anyhow::Result<u32> {
    for p in [&vm.qmp, &vm.console, &vm.pidfile, &vm.ram_file] {
        make_parent(p)?;
    }
    let _ = std::fs::remove_file(&vm.pidfile);
    let mut c = Command::new(&cmd.program);
    c.args(&cmd.args).stdin(Stdio::null());
    if let Some(lib) = preload {
        c.env("LD_PRELOAD", lib)
            .env("PIPECLOUD_SHIM_RAM_FILE", &vm.ram_file);
    }
    tracing::info!("starting {cmd}");
    if daemonize {
        let out = c.output().with_context(|| {
            format!(
                "running {} (Debian package qemu-system-x86)",
                cmd.program.display()
            )
        })?;
        if !out.status.success() {
            bail!(
                "QEMU failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    } else {
        let status = c
            .status()
            .with_context(|| format!("running {}", cmd.program.display()))?;
        if !status.success() {
            bail!("QEMU exited with {status}");
        }
        return Ok(0);
    }
    let text = std::fs::read_to_string(&vm.pidfile)
        .with_context(|| format!("reading QEMU's pid file {}", vm.pidfile.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("bad pid {text:?} in {}", vm.pidfile.display()))
}

/// `pipecloud vm start`: tap, then QEMU with the disks from the agent's NBD
/// export (or from image files, `StartOptions::disks`).
pub fn start(o: &StartOptions) -> anyhow::Result<Started> {
    let (t, base, vm, guest_ip) = load(&o.topology, &o.machine)?;
    let disks = if o.disks.is_empty() {
        DiskSource::Nbd
    } else {
        DiskSource::Files(absolute_disks(&o.disks)?)
    };
    let cmd = qemu_command(&Spec {
        topology: &t,
        base_dir: &base,
        machine: &o.machine,
        disks: &disks,
        incoming: false,
        daemonize: !o.foreground,
        host_khz: host_khz(),
    })
    .map_err(anyhow::Error::msg)?;
    ensure_tap(&vm, guest_ip)?;
    let t0 = Instant::now();
    let pid = run_qemu(&cmd, &vm, !o.foreground, o.preload.as_deref())?;
    Ok(Started {
        pid,
        elapsed_ms: t0.elapsed().as_millis(),
    })
}

/// Each disk's image file as an absolute path (a daemonized QEMU works in `/`).
fn absolute_disks(disks: &[(String, PathBuf)]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    disks
        .iter()
        .map(|(n, p)| {
            let abs = std::fs::canonicalize(p)
                .with_context(|| format!("no such disk image {}", p.display()))?;
            Ok((n.clone(), abs))
        })
        .collect()
}

/// Quotes `p` for the shell QEMU runs an `exec:` URI with.
fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', "'\\''"))
}

/// `pipecloud vm restore`: the RAM image into the RAM file, QEMU with
/// `-incoming defer` and the disks from files, the device state over QMP, `cont`.
pub fn restore(o: &RestoreOptions) -> anyhow::Result<Started> {
    let (t, base, vm, guest_ip) = load(&o.topology, &o.machine)?;
    // Absolute paths: a daemonized QEMU works in `/`.
    let absolute = |p: &Path| {
        std::fs::canonicalize(p).with_context(|| format!("no such file {}", p.display()))
    };
    let o = &RestoreOptions {
        ram: absolute(&o.ram)?,
        device_state: absolute(&o.device_state)?,
        disks: absolute_disks(&o.disks)?,
        ..o.clone()
    };
    let cmd = qemu_command(&Spec {
        topology: &t,
        base_dir: &base,
        machine: &o.machine,
        disks: &DiskSource::Files(o.disks.clone()),
        incoming: true,
        daemonize: true,
        host_khz: host_khz(),
    })
    .map_err(anyhow::Error::msg)?;
    let ram_len = std::fs::metadata(&o.ram)
        .with_context(|| format!("RAM image {}", o.ram.display()))?
        .len();
    if ram_len != vm.ram_bytes() {
        bail!(
            "RAM image {} is {ram_len} bytes; the guest has {} MiB ({} bytes)",
            o.ram.display(),
            vm.ram_mib,
            vm.ram_bytes()
        );
    }
    std::fs::metadata(&o.device_state)
        .with_context(|| format!("device state {}", o.device_state.display()))?;
    make_parent(&vm.ram_file)?;
    let same = std::fs::canonicalize(&o.ram).ok() == std::fs::canonicalize(&vm.ram_file).ok();
    if !same {
        std::fs::copy(&o.ram, &vm.ram_file).with_context(|| {
            format!(
                "copying the RAM image {} to {}",
                o.ram.display(),
                vm.ram_file.display()
            )
        })?;
    }
    ensure_tap(&vm, guest_ip)?;
    let t0 = Instant::now();
    let pid = run_qemu(&cmd, &vm, true, o.preload.as_deref())?;
    let result = (|| -> anyhow::Result<()> {
        let mut q = Qmp::connect(&vm.qmp, QMP_TIMEOUT)?;
        q.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
        )?;
        q.execute(
            "migrate-incoming",
            Some(json!({"uri": format!("exec:cat {}", sh_quote(&o.device_state))})),
        )?;
        // While it loads, the guest is `inmigrate`; then it runs (QEMU's
        // autostart) or waits paused for `cont`, which right after a migration
        // may answer "Migration is not finalized yet" (docs/machine.md "QEMU"):
        // retry. A stream QEMU cannot load makes it exit: the QMP read fails.
        let deadline = Instant::now() + QMP_TIMEOUT;
        loop {
            let status = q.status()?;
            match status.as_str() {
                "running" => break,
                "inmigrate" => {}
                "paused" | "postmigrate" | "prelaunch" | "finish-migrate" => {
                    if let Err(e) = q.execute("cont", None) {
                        tracing::debug!("cont: {e:#}; retrying");
                    }
                }
                other => bail!(
                    "the guest is `{other}` after loading the device state {}",
                    o.device_state.display()
                ),
            }
            if Instant::now() > deadline {
                bail!("the guest was not running {QMP_TIMEOUT:?} after migrate-incoming (last state `{status}`)");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    })();
    if let Err(e) = result {
        // SAFETY: kill(2) on the QEMU we just started (its pid file names it).
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
        return Err(e.context(format!("restoring `{}` (QEMU pid {pid} killed)", o.machine)));
    }
    Ok(Started {
        pid,
        elapsed_ms: t0.elapsed().as_millis(),
    })
}
