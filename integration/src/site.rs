//! The site builder: a primary site, a WAN and a backup site out of network
//! namespaces on one machine (docs/design.md §5, testing on one machine).
//!
//! ```text
//!  [client] ──┐                                  ┌── [machine web] (10.10.0.2)
//!             │   lan bridge 10.200.0.0/24       │
//!  [dom0-a] ──┼── (ns lan, br0) ──┬── [wan] ──── [backup] 10.99.0.2
//!  [dom0-b] ──┘                   │   NFQUEUE delay RTT/2 each way
//!       └── [machine db] (10.10.1.3)
//! ```
//!
//! - every protected machine is a namespace with one veth (`eth0`) to its host's
//!   dom0 namespace; the machine's default route goes via 169.254.0.1 (an address
//!   every dom0 veth carries), so all guest traffic crosses dom0's FORWARD chain,
//!   where the host's `pipecloud agent` tags, merges and holds packets;
//! - the dom0s, the client and the WAN router share a LAN bridge; traffic between
//!   machines on different hosts crosses the LAN (so the IP option really crosses a wire);
//! - with `ipv6` (the `--ipv6-client` runs), the machines, the dom0s and the client
//!   also get IPv6 ULA addresses (`fd70:6300::/32`, [`machine_ip6`], [`CLIENT_IP6`]):
//!   each machine's IPv6 default route goes via [`MACHINE_GW6`] on its dom0, the dom0s
//!   forward IPv6 and route every machine's /128 (to its veth, or over the LAN to its
//!   host). The backup link and the links between tiers stay IPv4;
//! - the WAN router namespace delays every forwarded packet by RTT/2 in each
//!   direction (NFQUEUE verdicts held in userspace: netem is absent here) and is the
//!   only way to the backup namespace, where `backup-server` runs as `nobody`.
//!
//! Everything is named with the run's prefix and removed on drop, in the order that
//! works (docs/machine.md, "Network namespaces and mounts"): servers, mounts, loop
//! devices, FUSE, agents, backup, namespaces.

use crate::netns::{addr, route, veth, Netns};
use crate::sys::{sh, sh_quiet, wait_until, Guarded};
use anyhow::{bail, Context, Result};
use pipecloud::loopdev::{self, AttachOptions, LoopDevice};
use pipecloud_core::topology::{Mode, Topology};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Address of the backup server inside the emulated WAN.
pub const BACKUP_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// Port of the backup server.
pub const BACKUP_PORT: u16 = 7800;
/// Address of the WAN router on the backup side.
pub const WAN_BACKUP_SIDE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// Address of the WAN router on the LAN.
pub const WAN_LAN_SIDE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 254);
/// Address of the client on the LAN.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 100);
/// Gateway address every dom0 veth towards a machine carries.
pub const MACHINE_GW: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 1);

/// IPv6 address of the client on the LAN (`--ipv6-client`).
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd70, 0x6300, 0x200, 0, 0, 0, 0, 0x100);
/// IPv6 gateway address every dom0 veth towards a machine carries (`--ipv6-client`).
pub const MACHINE_GW6: Ipv6Addr = Ipv6Addr::new(0xfd70, 0x6300, 0xff, 0, 0, 0, 0, 1);

/// IPv6 LAN address of host `i` (`--ipv6-client`).
pub fn host_lan_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd70, 0x6300, 0x200, 0, 0, 0, 0, (i + 1) as u16)
}

/// IPv6 address of machine `j` (`--ipv6-client`).
pub fn machine_ip6(j: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd70, 0x6300, 0x10, 0, 0, 0, 0, (j + 2) as u16)
}

/// LAN address of host `i`.
pub fn host_lan_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, (i + 1) as u8)
}

/// Names of the namespaces of one run.
#[derive(Clone, Debug)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    pub fn client(&self) -> String {
        format!("{}-client", self.prefix)
    }
    pub fn lan(&self) -> String {
        format!("{}-lan", self.prefix)
    }
    pub fn wan(&self) -> String {
        format!("{}-wan", self.prefix)
    }
    pub fn backup(&self) -> String {
        format!("{}-backup", self.prefix)
    }
    pub fn host(&self, i: usize) -> String {
        format!("{}-h{i}", self.prefix)
    }
    pub fn machine(&self, j: usize) -> String {
        format!("{}-m{j}", self.prefix)
    }
}

/// A machine namespace's address `ip` on its `eth0` and its routes: the
/// gateway [`MACHINE_GW`] on the link, the default route via it.
pub fn machine_addr(ns: &Netns, ip: Ipv4Addr) -> Result<()> {
    addr(ns, "eth0", ip, 32)?;
    let gw = MACHINE_GW.to_string();
    ns.sh(&["ip", "route", "add", &gw, "dev", "eth0"])?;
    ns.sh(&["ip", "route", "add", "default", "via", &gw, "dev", "eth0"])?;
    Ok(())
}

/// The network of a site: namespaces, links, addresses, routes. No processes.
pub struct Network {
    pub names: Names,
    /// Dropped last-to-first: machines, hosts, client, wan, backup, lan.
    pub namespaces: Vec<Netns>,
    /// The machines and the client also have IPv6 addresses.
    pub ipv6: bool,
}

impl Network {
    /// Builds the namespaces and links for `topo` (IPv4 only).
    pub fn build(topo: &Topology, prefix: &str) -> Result<Network> {
        Network::build_with(topo, prefix, false)
    }

    /// Builds the namespaces and links for `topo`; with `ipv6` the machines, the
    /// dom0s and the client get IPv6 addresses and routes too.
    pub fn build_with(topo: &Topology, prefix: &str, ipv6: bool) -> Result<Network> {
        let names = Names {
            prefix: prefix.to_string(),
        };
        let mut namespaces = Vec::new();
        let lan = Netns::new(&names.lan())?;
        lan.sh(&["ip", "link", "add", "br0", "type", "bridge"])?;
        lan.sh(&["ip", "link", "set", "br0", "up"])?;
        let backup = Netns::new(&names.backup())?;
        let wan = Netns::new(&names.wan())?;
        let client = Netns::new(&names.client())?;
        // WAN router: LAN side + backup side.
        veth(&wan, "lan0", &lan, "pwan")?;
        lan.sh(&["ip", "link", "set", "pwan", "master", "br0"])?;
        addr(&wan, "lan0", WAN_LAN_SIDE, 24)?;
        veth(&wan, "bk0", &backup, "eth0")?;
        addr(&wan, "bk0", WAN_BACKUP_SIDE, 24)?;
        addr(&backup, "eth0", BACKUP_IP, 24)?;
        wan.sysctl("net.ipv4.ip_forward", "1")?;
        route(&backup, "10.0.0.0/8", "eth0", Some(WAN_BACKUP_SIDE))?;
        // Client on the LAN.
        veth(&client, "eth0", &lan, "pcli")?;
        lan.sh(&["ip", "link", "set", "pcli", "master", "br0"])?;
        addr(&client, "eth0", CLIENT_IP, 24)?;
        if ipv6 {
            addr(&client, "eth0", CLIENT_IP6, 64)?;
        }
        let mut host_ns = Vec::new();
        for (i, h) in topo.hosts.iter().enumerate() {
            let ns = Netns::new(&names.host(i))?;
            let lan_if = format!("ph{i}");
            veth(&ns, "lan0", &lan, &lan_if)?;
            lan.sh(&["ip", "link", "set", &lan_if, "master", "br0"])?;
            addr(&ns, "lan0", host_lan_ip(i), 24)?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            route(&ns, "10.99.0.0/24", "lan0", Some(WAN_LAN_SIDE))?;
            if ipv6 {
                addr(&ns, "lan0", host_lan_ip6(i), 64)?;
                ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            }
            let _ = h;
            host_ns.push(ns);
        }
        let mut machine_ns = Vec::new();
        for (j, m) in topo.machines.iter().enumerate() {
            let hi = topo
                .hosts
                .iter()
                .position(|h| h.name == m.host)
                .context("machine on unknown host")?;
            let ns = Netns::new(&names.machine(j))?;
            let dev = format!("m{j}");
            veth(&ns, "eth0", &host_ns[hi], &dev)?;
            machine_addr(&ns, m.ip)?;
            addr(&host_ns[hi], &dev, MACHINE_GW, 32)?;
            host_ns[hi].sh(&["ip", "route", "add", &format!("{}/32", m.ip), "dev", &dev])?;
            // Machines on other hosts: via their host over the LAN.
            for (i, hns) in host_ns.iter().enumerate() {
                if i != hi {
                    route(hns, &format!("{}/32", m.ip), "lan0", Some(host_lan_ip(hi)))?;
                }
            }
            route(
                &client,
                &format!("{}/32", m.ip),
                "eth0",
                Some(host_lan_ip(hi)),
            )?;
            if ipv6 {
                let (ip6, gw6) = (machine_ip6(j), MACHINE_GW6.to_string());
                addr(&ns, "eth0", ip6, 128)?;
                ns.sh(&["ip", "-6", "route", "add", &gw6, "dev", "eth0"])?;
                ns.sh(&[
                    "ip", "-6", "route", "add", "default", "via", &gw6, "dev", "eth0",
                ])?;
                addr(&host_ns[hi], &dev, MACHINE_GW6, 128)?;
                let dst = format!("{ip6}/128");
                route(&host_ns[hi], &dst, &dev, None::<IpAddr>)?;
                for (i, hns) in host_ns.iter().enumerate() {
                    if i != hi {
                        route(hns, &dst, "lan0", Some(host_lan_ip6(hi)))?;
                    }
                }
                route(&client, &dst, "eth0", Some(host_lan_ip6(hi)))?;
            }
            machine_ns.push(ns);
        }
        namespaces.push(lan);
        namespaces.push(backup);
        namespaces.push(wan);
        namespaces.push(client);
        namespaces.extend(host_ns);
        namespaces.extend(machine_ns);
        Ok(Network {
            names,
            namespaces,
            ipv6,
        })
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        while let Some(ns) = self.namespaces.pop() {
            drop(ns);
        }
    }
}

/// Renders a topology (with the run's paths and backup endpoint) back to TOML.
pub fn render_topology(topo: &Topology, mode: Mode, certs: &Path, work: &Path) -> String {
    let backup = std::net::SocketAddr::new(BACKUP_IP.into(), BACKUP_PORT);
    render_topology_at(topo, mode, certs, work, backup, "backup.pipecloud.test")
}

/// [`render_topology`] with another backup server (the failback's reverse
/// protection replicates to a backup server at the old primary's site).
pub fn render_topology_at(
    topo: &Topology,
    mode: Mode,
    certs: &Path,
    work: &Path,
    backup: std::net::SocketAddr,
    server_name: &str,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "[group]\nname = \"{}\"\nid = {}\nmode = \"{}\"\n",
        topo.group.name,
        topo.group.id,
        mode.as_str()
    );
    let g = &topo.group.name;
    let _ = writeln!(
        s,
        "[backup]\nendpoint = \"{backup}\"\nserver_name = \"{server_name}\"\n\
         ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        certs.join("ca.pem").display(),
        certs.join(format!("{g}-agent.pem")).display(),
        certs.join(format!("{g}-agent.key")).display(),
    );
    let p = &topo.policy;
    let _ = writeln!(
        s,
        "[policy]\non_backup_loss = \"stall\"\nmax_inflight_bytes = {}\nnetqueue_max_packets = {}\nnetqueue_max_bytes = {}\n",
        p.max_inflight_bytes, p.netqueue_max_packets, p.netqueue_max_bytes
    );
    for (i, h) in topo.hosts.iter().enumerate() {
        let _ = writeln!(
            s,
            "[[host]]\nname = \"{}\"\nnbd_dir = \"{}\"\n",
            h.name,
            work.join(format!("h{i}")).display()
        );
    }
    for m in &topo.machines {
        let _ = writeln!(
            s,
            "[[machine]]\nname = \"{}\"\nip = \"{}\"\nhost = \"{}\"\noutbound = {}\n",
            m.name, m.ip, m.host, m.outbound
        );
    }
    for d in &topo.disks {
        let _ = writeln!(
            s,
            "[[disk]]\nname = \"{}\"\nmachine = \"{}\"\nimage = \"{}\"\nsize = {}\n",
            d.name,
            d.machine,
            work.join("images")
                .join(format!("{}.img", d.name))
                .display(),
            d.size
        );
    }
    s
}

/// One protected disk mounted on the primary: NBD -> nbdfuse -> loop -> ext4. The loop
/// device is attached with autoclear and held here (`pipecloud::loopdev`): it goes
/// when this is dropped and the mount is gone, and with the mount namespace if the
/// harness is killed. The FUSE file's name, `pcloop-<harness pid>-<disk>`, lets a later
/// run reap a stale device ([`pipecloud::loopdev::reap_stale`]).
#[allow(dead_code)] // name: for debugging
pub struct MountedDisk {
    pub name: String,
    pub fuse_dir: PathBuf,
    pub loopdev: Option<LoopDevice>,
    pub mountpoint: PathBuf,
    pub nbdfuse: Option<Guarded>,
    mounted: bool,
}

impl MountedDisk {
    /// Attaches the agent's export `sock` and mounts it at `mountpoint`
    /// (creating an ext4 file system first when `mkfs`).
    pub fn attach(
        name: &str,
        sock: &Path,
        work: &Path,
        mountpoint: &Path,
        mkfs: bool,
    ) -> Result<MountedDisk> {
        let fuse_dir = work.join(format!("fuse-{name}"));
        std::fs::create_dir_all(&fuse_dir)?;
        std::fs::create_dir_all(mountpoint)?;
        let disk_file = fuse_dir.join(loopdev::owned_name(std::process::id(), name));
        let mut cmd = Command::new("nbdfuse");
        cmd.args(["-C", "1"])
            .arg(&disk_file)
            // Name the export: the agent serves every disk of its host on each
            // socket, and the default ('') export exists only when there is one.
            .arg(format!("nbd+unix:///{name}?socket={}", sock.display()));
        let nbdfuse = Guarded::spawn(
            &format!("nbdfuse-{name}"),
            &mut cmd,
            &work.join(format!("nbdfuse-{name}.log")),
        )?;
        let mut d = MountedDisk {
            name: name.to_string(),
            fuse_dir: fuse_dir.clone(),
            loopdev: None,
            mountpoint: mountpoint.to_path_buf(),
            nbdfuse: Some(nbdfuse),
            mounted: false,
        };
        wait_until(
            Duration::from_secs(20),
            "nbdfuse to expose the disk",
            || disk_file.exists(),
        )?;
        let dev = LoopDevice::attach(
            &disk_file,
            AttachOptions {
                direct_io: true,
                read_only: false,
            },
        )?;
        let dev_path = dev.path().to_string_lossy().into_owned();
        d.loopdev = Some(dev);
        if mkfs {
            sh(&["mkfs.ext4", "-q", "-F", "-E", "nodiscard", &dev_path])?;
        }
        sh(&[
            "mount",
            "-t",
            "ext4",
            "-o",
            "data=ordered",
            &dev_path,
            &mountpoint.to_string_lossy(),
        ])?;
        d.mounted = true;
        Ok(d)
    }

    /// Makes every pending and later I/O on the disk fail at once: kills
    /// nbdfuse, which aborts its FUSE connection. A fenced agent holds writes
    /// for good, and the processes waiting on them (PostgreSQL in a stalled
    /// `fsync`) cannot be killed until their I/O ends (issue 23).
    pub fn abort_io(&mut self) {
        if let Some(mut p) = self.nbdfuse.take() {
            p.kill();
        }
    }

    /// Tears down in the order that works (docs/machine.md, "Network namespaces
    /// and mounts").
    pub fn detach(&mut self) {
        if self.mounted {
            sh_quiet(&["umount", "-l", &self.mountpoint.to_string_lossy()]);
            self.mounted = false;
        }
        if let Some(dev) = self.loopdev.take() {
            // Unmounted and no longer held: the autoclear device detaches.
            let sys = Path::new("/sys/block")
                .join(dev.path().file_name().unwrap_or_default())
                .join("loop/backing_file");
            drop(dev);
            let _ = wait_until(Duration::from_secs(10), "loop device release", || {
                !sys.exists()
            });
        }
        sh_quiet(&["fusermount3", "-u", "-z", &self.fuse_dir.to_string_lossy()]);
        self.abort_io();
    }
}

impl Drop for MountedDisk {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Mounts a raw image file (a recovered volume) read-write via an autoclear loop
/// device (held here; it goes when this is dropped and the mount is gone).
pub struct MountedImage {
    /// Held: dropping it is what detaches the device (autoclear).
    pub _loopdev: LoopDevice,
    pub mountpoint: PathBuf,
}

impl MountedImage {
    pub fn mount(image: &Path, mountpoint: &Path) -> Result<MountedImage> {
        std::fs::create_dir_all(mountpoint)?;
        let dev = LoopDevice::attach(image, AttachOptions::default())?;
        let loopdev = dev.path().to_string_lossy().into_owned();
        let m = MountedImage {
            _loopdev: dev,
            mountpoint: mountpoint.to_path_buf(),
        };
        // ext4 journal replay happens at mount.
        if let Err(e) = sh(&[
            "mount",
            "-t",
            "ext4",
            &loopdev,
            &mountpoint.to_string_lossy(),
        ]) {
            bail!("mounting recovered image {}: {e:#}", image.display());
        }
        Ok(m)
    }
}

impl Drop for MountedImage {
    fn drop(&mut self) {
        sh_quiet(&["umount", "-l", &self.mountpoint.to_string_lossy()]);
        // The loop device detaches when `self._loopdev` (the last holder) is dropped.
    }
}
