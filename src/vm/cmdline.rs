//! The QEMU command line of a guest, written from the topology (pure).
//!
//! One function, [`qemu_command`], so `vm start`, `vm restore` and
//! `vm cmdline` cannot disagree: a restore must run the *same* configuration
//! as the guest it resumes (same machine type, devices in the same order, same
//! RAM backend), or QEMU refuses the device state. The only differences a
//! restore makes are `-incoming defer` and where the disks come from.
//!
//! Choices, with the measurements behind them in docs/machine.md ("QEMU"):
//! `microvm` by default (boots in ~2 s under TCG, 3.8 KB of device state);
//! a microvm kernel command line gets `tsc_early_khz=<host kHz>` (without it
//! ~15 % of boots hang calibrating the TSC against the PIT);
//! `-global migration.send-configuration=off` on both sides, so a device state
//! saved without the configuration section loads.

use pipecloud_core::topology::{Accel, Platform, Topology, Vm};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Where the guest's disks come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSource {
    /// The agent's NBD export of each disk (`<nbd_dir>/<disk>.sock`).
    Nbd,
    /// Raw image files by disk name (every disk of the machine must be named).
    Files(Vec<(String, PathBuf)>),
}

/// What to write a command line for.
#[derive(Clone, Debug)]
pub struct Spec<'a> {
    /// The validated topology.
    pub topology: &'a Topology,
    /// Directory of the topology file (relative kernel/initrd paths are relative to it).
    pub base_dir: &'a Path,
    /// The machine (must have a `[machine.vm]` table).
    pub machine: &'a str,
    /// Disks from the agent or from files.
    pub disks: &'a DiskSource,
    /// `-incoming defer` (a restore).
    pub incoming: bool,
    /// `-daemonize`: QEMU returns once the guest is set up.
    pub daemonize: bool,
    /// The host's TSC frequency in kHz, for `tsc_early_khz=` on microvm.
    pub host_khz: Option<u64>,
}

/// A program and its arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuCommand {
    /// The QEMU binary.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
}

impl fmt::Display for QemuCommand {
    /// The command as a shell would need it (arguments quoted where needed).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", shell_quote(&self.program.to_string_lossy()))?;
        for a in &self.args {
            write!(f, " {}", shell_quote(a))?;
        }
        Ok(())
    }
}

fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A value inside a QEMU option list: commas are doubled.
fn opt(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// The MAC of the guest's NIC: the topology's, or `02:00:` + its IPv4 address
/// (locally administered, unique per address).
pub fn guest_mac(pinned: Option<[u8; 6]>, ip: Ipv4Addr) -> String {
    let m = pinned.unwrap_or_else(|| {
        let o = ip.octets();
        [0x02, 0x00, o[0], o[1], o[2], o[3]]
    });
    pipecloud_core::topology::format_mac(m)
}

/// The kernel command line: the operator's, then what the launcher adds.
pub fn kernel_append(vm: &Vm, ip: Ipv4Addr, host_khz: Option<u64>) -> String {
    let mut s = vm.append.clone();
    if vm.platform == Platform::Microvm {
        if let Some(khz) = host_khz {
            s.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    s.push_str(&format!(" pipecloud.ip={ip}/{}", vm.prefix_len));
    if let Some(gw) = vm.gateway {
        s.push_str(&format!(" pipecloud.gw={gw}"));
    }
    s.trim().to_owned()
}

/// The guest's QEMU command line (module doc). Errors name what is missing.
pub fn qemu_command(spec: &Spec<'_>) -> Result<QemuCommand, String> {
    let t = spec.topology;
    let m = t
        .machine(spec.machine)
        .ok_or_else(|| format!("no machine `{}` in the topology", spec.machine))?;
    let vm = m.vm.as_ref().ok_or_else(|| {
        format!(
            "machine `{}` has no `[machine.vm]` table: it is not a QEMU guest",
            m.name
        )
    })?;
    let (blk, net) = match vm.platform {
        Platform::Microvm => ("virtio-blk-device", "virtio-net-device"),
        Platform::Q35 => ("virtio-blk-pci", "virtio-net-pci"),
    };
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|x| (*x).to_owned()));
    push(&["-name", &format!("guest={},process=pc-{}", m.name, m.name)]);
    push(&[
        "-machine",
        &format!("{},memory-backend=mem", vm.platform.as_str()),
    ]);
    push(&["-accel", vm.accel.as_str()]);
    push(&[
        "-cpu",
        if vm.accel == Accel::Kvm {
            "host"
        } else {
            "max"
        },
    ]);
    push(&["-smp", &vm.cpus.to_string()]);
    push(&["-m", &format!("{}M", vm.ram_mib)]);
    push(&[
        "-object",
        &format!(
            "memory-backend-file,id=mem,size={}M,mem-path={},share=on",
            vm.ram_mib,
            opt(&vm.ram_file)
        ),
    ]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    push(&["-kernel", &opt(&spec.base_dir.join(&vm.kernel))]);
    if let Some(initrd) = &vm.initrd {
        push(&["-initrd", &opt(&spec.base_dir.join(initrd))]);
    }
    push(&["-append", &kernel_append(vm, m.ip, spec.host_khz)]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=con0,path={},server=on,wait=off,logfile={}.log,logappend=on",
            opt(&vm.console),
            opt(&vm.console)
        ),
    ]);
    push(&["-serial", "chardev:con0"]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", opt(&vm.qmp))]);
    push(&[
        "-netdev",
        &format!("tap,id=net0,ifname={},script=no,downscript=no", vm.tap),
    ]);
    push(&[
        "-device",
        &format!("{net},netdev=net0,mac={}", guest_mac(m.mac, m.ip)),
    ]);
    for (i, d) in t.disks_of(&m.name).iter().enumerate() {
        let file = match spec.disks {
            DiskSource::Nbd => {
                let sock = t
                    .nbd_socket(&d.name)
                    .ok_or_else(|| format!("disk `{}` has no NBD socket", d.name))?;
                format!(
                    "file.driver=nbd,file.server.type=unix,file.server.path={},file.export={}",
                    opt(&sock),
                    d.name
                )
            }
            DiskSource::Files(files) => {
                let (_, path) = files.iter().find(|(n, _)| n == &d.name).ok_or_else(|| {
                    format!("no image file given for disk `{}` of `{}`", d.name, m.name)
                })?;
                format!("file.driver=file,file.filename={}", opt(path))
            }
        };
        push(&["-drive", &format!("id=disk{i},if=none,format=raw,{file}")]);
        push(&["-device", &format!("{blk},drive=disk{i}")]);
    }
    if let DiskSource::Files(files) = spec.disks {
        if let Some((name, _)) = files
            .iter()
            .find(|(n, _)| t.disk(n).is_none_or(|d| d.machine != m.name))
        {
            return Err(format!(
                "disk `{name}` is not a disk of machine `{}`",
                m.name
            ));
        }
    }
    push(&["-global", "migration.send-configuration=off"]);
    push(&["-pidfile", &opt(&vm.pidfile)]);
    if spec.daemonize {
        push(&["-daemonize"]);
    }
    if spec.incoming {
        push(&["-incoming", "defer"]);
    }
    a.extend(vm.extra_args.iter().cloned());
    Ok(QemuCommand {
        program: vm.qemu.clone(),
        args: a,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPOLOGY: &str = r#"
[group]
name = "g"
id = 1
mode = "pipelined"
[backup]
endpoint = "127.0.0.1:7800"
ca = "ca.pem"
cert = "a.pem"
key = "a.key"
[[host]]
name = "h"
nbd_dir = "/run/pc/h"
[[machine]]
name = "app"
ip = "10.10.0.10"
host = "h"
outbound = true
writer = true
[machine.vm]
kernel = "guest/vmlinuz"
initrd = "/abs/initrd"
gateway = "10.10.0.1"
extra_args = ["-S"]
[[disk]]
name = "data"
machine = "app"
image = "/var/lib/pc/data.img"
size = "64MiB"
"#;

    fn spec<'a>(t: &'a Topology, disks: &'a DiskSource, incoming: bool) -> Spec<'a> {
        Spec {
            topology: t,
            base_dir: Path::new("/etc/pc"),
            machine: "app",
            disks,
            incoming,
            daemonize: true,
            host_khz: Some(2_300_000),
        }
    }

    #[test]
    fn vm_cmdline_from_the_topology() {
        let t = Topology::parse(TOPOLOGY, "t.toml").unwrap_or_else(|e| panic!("{e}"));
        let c = qemu_command(&spec(&t, &DiskSource::Nbd, false)).expect("command");
        let line = c.to_string();
        for needle in [
            "qemu-system-x86_64 -name guest=app,process=pc-app -machine microvm,memory-backend=mem -accel tcg",
            "-m 256M -object memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/pipecloud-g-app.ram,share=on",
            "-kernel /etc/pc/guest/vmlinuz -initrd /abs/initrd",
            "-append 'console=ttyS0 panic=-1 tsc_early_khz=2300000 pipecloud.ip=10.10.0.10/24 pipecloud.gw=10.10.0.1'",
            "-qmp unix:/run/pc/h/app.qmp,server=on,wait=off",
            "-netdev tap,id=net0,ifname=pc-app,script=no,downscript=no -device virtio-net-device,netdev=net0,mac=02:00:0a:0a:00:0a",
            "-drive id=disk0,if=none,format=raw,file.driver=nbd,file.server.type=unix,file.server.path=/run/pc/h/data.sock,file.export=data -device virtio-blk-device,drive=disk0",
            "-pidfile /run/pc/h/app.pid -daemonize -S",
        ] {
            assert!(line.contains(needle), "{needle}\nnot in\n{line}");
        }
        assert!(!line.contains("-incoming"));

        // A restore: same configuration, disks from files, -incoming defer.
        let files = DiskSource::Files(vec![("data".into(), "/b/da,ta.img".into())]);
        let r = qemu_command(&spec(&t, &files, true)).expect("command");
        let rl = r.to_string();
        assert!(
            rl.contains("file.driver=file,file.filename=/b/da,,ta.img"),
            "{rl}"
        );
        assert!(rl.contains("-daemonize -incoming defer -S"), "{rl}");
        let strip = |c: &QemuCommand| {
            c.args
                .iter()
                .filter(|a| !a.starts_with("id=disk") && *a != "-incoming" && *a != "defer")
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            strip(&c),
            strip(&r),
            "a restore runs the same configuration"
        );

        // Wrong inputs are errors that say what is wrong.
        let none = DiskSource::Files(vec![]);
        assert!(qemu_command(&spec(&t, &none, true))
            .unwrap_err()
            .contains("no image file given for disk `data`"));
        let stray = DiskSource::Files(vec![
            ("data".into(), "/x".into()),
            ("nope".into(), "/y".into()),
        ]);
        assert!(qemu_command(&spec(&t, &stray, true))
            .unwrap_err()
            .contains("disk `nope` is not a disk"));
        let plain = TOPOLOGY.replace("[machine.vm]", "[nothing]");
        assert!(Topology::parse(&plain, "t").is_err());
    }

    #[test]
    fn vm_cmdline_q35_and_kvm() {
        let text = TOPOLOGY.replace(
            "gateway = \"10.10.0.1\"",
            "platform = \"q35\"\naccel = \"kvm\"",
        );
        let t = Topology::parse(&text, "t.toml").unwrap_or_else(|e| panic!("{e}"));
        let line = qemu_command(&spec(&t, &DiskSource::Nbd, false))
            .expect("command")
            .to_string();
        assert!(
            line.contains("-machine q35,memory-backend=mem -accel kvm -cpu host"),
            "{line}"
        );
        assert!(
            line.contains("virtio-blk-pci") && line.contains("virtio-net-pci"),
            "{line}"
        );
        assert!(!line.contains("tsc_early_khz"), "{line}");
        assert!(!line.contains("pipecloud.gw"), "{line}");
    }
}
