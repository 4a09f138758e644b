//! The topology model: what a validated topology file says, as plain data.
//!
//! [`Topology`] and its parts ([`Group`], [`Backup`], [`Policy`], [`Host`],
//! [`Machine`], [`Disk`]) are what the agent, the backup server and the harness
//! read. A topology that comes from [`Topology::parse`] has passed every check
//! of the reader and of validation, so its users need not check again. The
//! limits and defaults here are the numbers those checks enforce. The
//! accessors answer the questions the rest of the workspace asks (which writer is
//! this machine, which disks live on this host, where is a disk's NBD socket).

use super::values::{check_dns_name, format_mac, format_size};
use super::vm::Vm;
use crate::mode::{BackupLossPolicy, Mode};
use crate::vector::{WriterId, MAX_WRITERS};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Largest topology file accepted, in bytes.
pub const MAX_TOPOLOGY_BYTES: usize = 1 << 20;
/// Most `[[host]]` tables in one file.
pub const MAX_HOSTS: usize = 64;
/// Most `[[machine]]` tables in one file.
pub const MAX_MACHINES: usize = 256;
/// Most `[[disk]]` tables in one file.
pub const MAX_DISKS: usize = 256;
/// Longest Unix socket path (`sun_path` is 108 bytes including the terminating NUL).
pub const MAX_UNIX_SOCKET_PATH: usize = 107;
/// Most packets the kernel holds in one NFQUEUE, whatever the queue length says
/// (measured, docs/machine.md "NFQUEUE"); the netqueue cannot hold more than that.
pub const MAX_NETQUEUE_PACKETS: u64 = 65_536;
/// Longest `degrade_after_s` (one day).
pub const MAX_DEGRADE_AFTER_S: u64 = 86_400;
/// Sector size: disk sizes are multiples of this.
pub const SECTOR_SIZE: u64 = 512;
/// Largest disk size (offsets must fit an `i64` for `pread`/`pwrite`).
pub const MAX_DISK_SIZE: u64 = i64::MAX as u64 / SECTOR_SIZE * SECTOR_SIZE;

/// Default `policy.replication_coalesce_us`.
pub const DEFAULT_REPLICATION_COALESCE_US: u64 = 200;
/// Largest `policy.replication_coalesce_us` (10 ms).
pub const MAX_REPLICATION_COALESCE_US: u64 = 10_000;
/// Default `policy.replication_async_batch_us`.
pub const DEFAULT_REPLICATION_ASYNC_BATCH_US: u64 = 1_000;
/// Largest `policy.replication_async_batch_us` (10 ms).
pub const MAX_REPLICATION_ASYNC_BATCH_US: u64 = 10_000;
/// Default `policy.heartbeat_interval_ms`.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 1_000;
/// Smallest `policy.heartbeat_interval_ms` (10 ms).
pub const MIN_HEARTBEAT_INTERVAL_MS: u64 = 10;
/// Largest `policy.heartbeat_interval_ms` (one minute).
pub const MAX_HEARTBEAT_INTERVAL_MS: u64 = 60_000;
/// Default `policy.heartbeat_timeout_ms`.
pub const DEFAULT_HEARTBEAT_TIMEOUT_MS: u64 = 5_000;
/// Smallest `policy.heartbeat_timeout_ms` (100 ms).
pub const MIN_HEARTBEAT_TIMEOUT_MS: u64 = 100;
/// Largest `policy.heartbeat_timeout_ms` (ten minutes).
pub const MAX_HEARTBEAT_TIMEOUT_MS: u64 = 600_000;
/// Default `policy.max_inflight_bytes` (64 MiB).
pub const DEFAULT_MAX_INFLIGHT_BYTES: u64 = 64 << 20;
/// Default `policy.netqueue_max_packets`.
pub const DEFAULT_NETQUEUE_MAX_PACKETS: u64 = MAX_NETQUEUE_PACKETS;
/// Default `policy.netqueue_max_bytes` (256 MiB).
pub const DEFAULT_NETQUEUE_MAX_BYTES: u64 = 256 << 20;
/// Smallest `policy.netqueue_max_bytes`: one largest IPv4 packet.
pub const MIN_NETQUEUE_BYTES: u64 = 65_535;

/// The protection group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// Group name (a valid wire name).
    pub name: String,
    /// Numeric id carried in the IPv4 option.
    pub id: u16,
    /// Replication mode at start.
    pub mode: Mode,
}

/// `HOST:PORT` of the backup server. `host` is an IP literal or a DNS name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// IP literal (IPv6 without brackets) or DNS name.
    pub host: String,
    /// TCP port, never 0.
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;
    /// Parses `HOST:PORT`, `IPV4:PORT` or `[IPV6]:PORT`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| format!("`{s}` has no `]:PORT` after the IPv6 address"))?;
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("`{h}` is not an IPv6 address"));
            }
            (h, p)
        } else {
            let (h, p) = s
                .rsplit_once(':')
                .ok_or_else(|| format!("`{s}` has no `:PORT`"))?;
            if h.contains(':') {
                return Err(format!("`{s}`: write IPv6 addresses in brackets"));
            }
            if h.parse::<Ipv4Addr>().is_err() {
                check_dns_name(h)?;
            }
            (h, p)
        };
        let port: u16 = port
            .parse()
            .map_err(|_| format!("port `{port}` is not a number in 1..=65535"))?;
        if port == 0 {
            return Err("port 0 is not a port one can connect to".to_owned());
        }
        Ok(Endpoint {
            host: host.to_owned(),
            port,
        })
    }
}

/// The backup server and the agent's TLS credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backup {
    /// Where the backup server listens.
    pub endpoint: Endpoint,
    /// Name the server's certificate must carry (default: the endpoint host).
    pub server_name: String,
    /// CA certificate (PEM) that signed the server's and the agents' certificates.
    pub ca: PathBuf,
    /// The agent's certificate chain (PEM).
    pub cert: PathBuf,
    /// The agent's private key (PEM).
    pub key: PathBuf,
}

impl Backup {
    /// The credential paths with relative ones resolved against `base_dir` (the
    /// directory that holds the topology file): `(ca, cert, key)`.
    pub fn credentials_in(&self, base_dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        (
            base_dir.join(&self.ca),
            base_dir.join(&self.cert),
            base_dir.join(&self.key),
        )
    }
}

/// Limits and policies of the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// What happens while the backup is unreachable.
    pub on_backup_loss: BackupLossPolicy,
    /// Unacked replication bytes per agent before guest writes are slowed
    /// (backpressure). At least one write frame
    /// ([`MAX_WRITE_PAYLOAD`](crate::wire::MAX_WRITE_PAYLOAD)).
    pub max_inflight_bytes: u64,
    /// Most client-bound packets held per agent, `1..=MAX_NETQUEUE_PACKETS`.
    pub netqueue_max_packets: u64,
    /// Most client-bound bytes held per agent, at least [`MIN_NETQUEUE_BYTES`].
    pub netqueue_max_bytes: u64,
    /// Longest a write waits for the acks of earlier writes before the agent
    /// sends it anyway (µs, `0..=MAX_REPLICATION_COALESCE_US`; 0: every write
    /// goes as soon as the sender runs). A write with nothing unacked before it
    /// always goes at once.
    pub replication_coalesce_us: u64,
    /// In `async` mode (nothing waits for the backup) writes are sent in
    /// batches by age instead: a write waits until the oldest unsent one is this
    /// old (or a batch's worth of bytes waits), whatever the acks do (µs,
    /// `0..=MAX_REPLICATION_ASYNC_BATCH_US`; 0: every write goes as soon as the
    /// sender runs). Adds at most this much to the async lag (RPO).
    pub replication_async_batch_us: u64,
    /// Period of the agent's heartbeats to the backup (ms,
    /// `MIN_HEARTBEAT_INTERVAL_MS..=MAX_HEARTBEAT_INTERVAL_MS`): they measure the
    /// round trip and keep an idle session heard from.
    pub heartbeat_interval_ms: u64,
    /// A backup that sent nothing (no ack, committed vector or heartbeat) for
    /// this long is taken as gone: the session is dropped and dialled again (ms,
    /// `MIN_HEARTBEAT_TIMEOUT_MS..=MAX_HEARTBEAT_TIMEOUT_MS`, at least twice the
    /// interval so one late heartbeat does not end a session). Until then
    /// `ctl status` still says connected; the time since the backup was last
    /// heard from shows the silence as it grows.
    pub heartbeat_timeout_ms: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            on_backup_loss: BackupLossPolicy::Stall,
            max_inflight_bytes: DEFAULT_MAX_INFLIGHT_BYTES,
            netqueue_max_packets: DEFAULT_NETQUEUE_MAX_PACKETS,
            netqueue_max_bytes: DEFAULT_NETQUEUE_MAX_BYTES,
            replication_coalesce_us: DEFAULT_REPLICATION_COALESCE_US,
            replication_async_batch_us: DEFAULT_REPLICATION_ASYNC_BATCH_US,
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            heartbeat_timeout_ms: DEFAULT_HEARTBEAT_TIMEOUT_MS,
        }
    }
}

/// A primary host (one agent each).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// Host name (a valid wire name; the agent's name in hellos).
    pub name: String,
    /// Directory of the agent's NBD Unix sockets (`<nbd_dir>/<disk>.sock`).
    pub nbd_dir: PathBuf,
    /// The agent's control socket (`pipecloud ctl`).
    pub ctl_socket: PathBuf,
    /// How long (µs) the agent's network-path thread keeps polling its queues
    /// after a packet before it sleeps: lower per-packet latency for up to one
    /// core of CPU while traffic flows; 0 never spins.
    pub busy_poll_us: u64,
    /// `SCHED_FIFO` priority of the agent's network-path thread (0: normal
    /// scheduling). The thread releases held replies when the committed vector
    /// moves; at normal priority its wake-up waits behind the guests' work on a
    /// busy host (docs/design.md §18). It sleeps between bursts and its work
    /// per wake-up is bounded, so a real-time priority cannot starve the host;
    /// busy polling would, and the two are refused together.
    pub netpath_priority: u8,
    /// Tag and strip cross-host packets, and pass client-bound packets that
    /// need no holding, in a TCX eBPF program (GSO super-packets stay whole);
    /// `false`: the NFQUEUE queues do all of it.
    pub kernel_tagger: bool,
    /// Address of the agent's Prometheus `/metrics` endpoint (plain HTTP);
    /// `None`: no endpoint.
    pub metrics_listen: Option<SocketAddr>,
}

/// Default `host.kernel_tagger`: on (the agent falls back to the NFQUEUE tag
/// queue, with a warning, when the kernel cannot load it).
pub const DEFAULT_KERNEL_TAGGER: bool = true;

/// Default `host.busy_poll_us`: off (busy polling takes CPU from the guests
/// under load; 50 suits hosts with cores to spare).
pub const DEFAULT_BUSY_POLL_US: u64 = 0;
/// Default `host.netpath_priority`: `SCHED_FIFO` 1, the lowest real-time
/// priority (above every normal task, below the kernel's own real-time threads).
pub const DEFAULT_NETPATH_PRIORITY: u8 = 1;
/// Largest `host.netpath_priority` (`SCHED_FIFO`'s range).
pub const MAX_NETPATH_PRIORITY: u8 = 99;
/// Largest `host.busy_poll_us` (10 ms).
pub const MAX_BUSY_POLL_US: u64 = 10_000;

/// A protected machine (VM or container).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// Machine name (a valid wire name).
    pub name: String,
    /// Its IPv4 address (unique in the group).
    pub ip: Ipv4Addr,
    /// Its MAC address, if the operator pinned one.
    pub mac: Option<[u8; 6]>,
    /// Name of the host that runs it.
    pub host: String,
    /// May talk to clients outside the group.
    pub outbound: bool,
    /// Its writer id if it owns protected disks.
    pub writer: Option<WriterId>,
    /// The QEMU guest it is, if it is one (`[machine.vm]`).
    pub vm: Option<Vm>,
}

impl Machine {
    /// Neither a writer nor outbound: only relays causality.
    pub fn is_intermediate(&self) -> bool {
        self.writer.is_none() && !self.outbound
    }

    /// Human description of the role: `writer w0, outbound`, `intermediate`, ...
    pub fn role(&self) -> String {
        let mut parts = Vec::new();
        if let Some(w) = self.writer {
            parts.push(format!("writer {w}"));
        }
        if self.outbound {
            parts.push("outbound".to_owned());
        }
        if parts.is_empty() {
            "intermediate".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

/// A protected disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// Disk name (a valid wire name; the NBD export and backup volume name).
    pub name: String,
    /// The machine that writes it.
    pub machine: String,
    /// The local image file (absolute path on the machine's host).
    pub image: PathBuf,
    /// Size in bytes (> 0, a multiple of [`SECTOR_SIZE`]).
    pub size: u64,
}

/// A validated topology.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// The protection group.
    pub group: Group,
    /// The backup server.
    pub backup: Backup,
    /// Limits and policies.
    pub policy: Policy,
    /// The group's lease on etcd (`[quorum]`, docs/design.md §7); `None`: no lease.
    pub quorum: Option<super::Quorum>,
    /// Primary hosts, in file order.
    pub hosts: Vec<Host>,
    /// Protected machines, in file order.
    pub machines: Vec<Machine>,
    /// Protected disks, in file order.
    pub disks: Vec<Disk>,
}

impl Topology {
    /// Writers with their ids, in id order.
    pub fn writers(&self) -> Vec<(WriterId, &Machine)> {
        self.machines
            .iter()
            .filter_map(|m| m.writer.map(|w| (w, m)))
            .collect()
    }

    /// Writer id of the machine called `machine`, if it is a writer.
    pub fn writer_of(&self, machine: &str) -> Option<WriterId> {
        self.machine(machine).and_then(|m| m.writer)
    }

    /// The machine called `name`.
    pub fn machine(&self, name: &str) -> Option<&Machine> {
        self.machines.iter().find(|m| m.name == name)
    }

    /// The guest configuration of machine `name`, if it is a QEMU guest.
    pub fn vm(&self, name: &str) -> Option<&Vm> {
        self.machine(name).and_then(|m| m.vm.as_ref())
    }

    /// The host called `name`.
    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// The disk called `name`.
    pub fn disk(&self, name: &str) -> Option<&Disk> {
        self.disks.iter().find(|d| d.name == name)
    }

    /// Machines run by host `host`, in file order.
    pub fn machines_on(&self, host: &str) -> Vec<&Machine> {
        self.machines.iter().filter(|m| m.host == host).collect()
    }

    /// Outbound machines, in file order.
    pub fn outbound_machines(&self) -> Vec<&Machine> {
        self.machines.iter().filter(|m| m.outbound).collect()
    }

    /// Disks whose machine runs on host `host`, in file order.
    pub fn disks_on(&self, host: &str) -> Vec<&Disk> {
        self.disks
            .iter()
            .filter(|d| self.machine(&d.machine).is_some_and(|m| m.host == host))
            .collect()
    }

    /// Disks of machine `machine`, in file order.
    pub fn disks_of(&self, machine: &str) -> Vec<&Disk> {
        self.disks.iter().filter(|d| d.machine == machine).collect()
    }

    /// The machine with address `ip`.
    pub fn machine_by_ip(&self, ip: Ipv4Addr) -> Option<&Machine> {
        self.machines.iter().find(|m| m.ip == ip)
    }

    /// The NBD Unix socket the agent serves `disk` on: `<nbd_dir>/<disk>.sock`
    /// of the disk's host (None if the disk is not part of this topology).
    pub fn nbd_socket(&self, disk: &str) -> Option<PathBuf> {
        let d = self.disk(disk)?;
        let m = self.machine(&d.machine)?;
        let h = self.host(&m.host)?;
        Some(nbd_socket_path(&h.nbd_dir, &d.name))
    }

    /// A multi-line human summary (group, mode, backup, policy, hosts, machines
    /// with their roles, disks with sizes).
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let g = &self.group;
        let _ = writeln!(s, "group     {} (id {}), mode {}", g.name, g.id, g.mode);
        if g.mode == Mode::Checkpoint {
            let _ = writeln!(
                s,
                "          note: checkpoint (full-state) mode is not implemented by the agent yet"
            );
        }
        let b = &self.backup;
        let _ = writeln!(
            s,
            "backup    {} (TLS name {}; ca {}, cert {}, key {})",
            b.endpoint,
            b.server_name,
            b.ca.display(),
            b.cert.display(),
            b.key.display()
        );
        let p = &self.policy;
        let _ = writeln!(
            s,
            "policy    on backup loss: {}; max in-flight {}; netqueue at most {} packets / {}; coalesce writes {} us (async: batches of {} us); heartbeat every {} ms, backup gone after {} ms silent",
            p.on_backup_loss,
            format_size(p.max_inflight_bytes),
            p.netqueue_max_packets,
            format_size(p.netqueue_max_bytes),
            p.replication_coalesce_us,
            p.replication_async_batch_us,
            p.heartbeat_interval_ms,
            p.heartbeat_timeout_ms
        );
        let writers = self.writers().len();
        let _ = writeln!(
            s,
            "writers   {writers} of at most {MAX_WRITERS}; outbound machines: {}",
            self.outbound_machines()
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(s, "hosts ({})", self.hosts.len());
        for h in &self.hosts {
            let machines: Vec<&str> = self
                .machines_on(&h.name)
                .iter()
                .map(|m| m.name.as_str())
                .collect();
            let _ = writeln!(
                s,
                "  {:<12} nbd_dir {}, ctl {}, metrics {}, machines: {}",
                h.name,
                h.nbd_dir.display(),
                h.ctl_socket.display(),
                h.metrics_listen
                    .map_or_else(|| "off".to_owned(), |a| format!("http://{a}/metrics")),
                if machines.is_empty() {
                    "(none)".to_owned()
                } else {
                    machines.join(", ")
                }
            );
        }
        let _ = writeln!(s, "machines ({})", self.machines.len());
        for m in &self.machines {
            let mac = m.mac.map(format_mac).unwrap_or_else(|| "-".to_owned());
            let _ = writeln!(
                s,
                "  {:<12} {:<15} mac {:<17} on {:<12} {}",
                m.name,
                m.ip,
                mac,
                m.host,
                m.role()
            );
            if let Some(vm) = &m.vm {
                let _ = writeln!(s, "  {:<12} {}", "", vm.summary());
            }
        }
        let _ = writeln!(s, "disks ({})", self.disks.len());
        for d in &self.disks {
            let writer = self
                .writer_of(&d.machine)
                .map(|w| format!(" ({w})"))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "  {:<12} {:<10} of {}{}, image {}",
                d.name,
                format_size(d.size),
                d.machine,
                writer,
                d.image.display()
            );
        }
        s
    }
}

/// `<nbd_dir>/<disk>.sock`.
pub fn nbd_socket_path(nbd_dir: &Path, disk: &str) -> PathBuf {
    nbd_dir.join(format!("{disk}.sock"))
}

/// The control socket of a host that does not name one: `<nbd_dir>/ctl.sock`.
pub fn default_ctl_socket(nbd_dir: &Path) -> PathBuf {
    nbd_dir.join("ctl.sock")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::test_fixture::GOOD;

    #[test]
    fn topology_good_file_parses_into_the_model() {
        let t = Topology::parse(GOOD, "t.toml").expect("valid");
        assert_eq!(t.group.name, "shop");
        assert_eq!(t.group.id, 7);
        assert_eq!(t.group.mode, Mode::Pipelined);
        assert_eq!(
            t.backup.endpoint,
            Endpoint {
                host: "10.99.0.2".into(),
                port: 7800
            }
        );
        assert_eq!(t.policy, Policy::default());
        assert_eq!(t.hosts.len(), 1);
        assert_eq!(
            t.hosts[0].ctl_socket,
            PathBuf::from("/run/pipecloud/dom0-a/ctl.sock")
        );
        assert_eq!(t.hosts[0].busy_poll_us, DEFAULT_BUSY_POLL_US);
        assert_eq!(t.machines[0].mac, Some([2, 0, 0, 0, 0, 2]));
        assert_eq!(t.disks[0].size, 1 << 30);
        assert_eq!(t.writer_of("db"), Some(WriterId(0)));
        assert_eq!(t.writer_of("web"), None);
        assert_eq!(t.writers().len(), 1);
        assert_eq!(t.outbound_machines().len(), 1);
        assert_eq!(t.outbound_machines()[0].name, "web");
        assert_eq!(t.machines_on("dom0-a").len(), 2);
        assert_eq!(t.disks_on("dom0-a").len(), 1);
        assert!(t.disks_on("nope").is_empty());
        assert_eq!(
            t.machine_by_ip(Ipv4Addr::new(10, 10, 0, 3))
                .map(|m| m.name.as_str()),
            Some("db")
        );
        assert_eq!(
            t.nbd_socket("db-data"),
            Some(PathBuf::from("/run/pipecloud/dom0-a/db-data.sock"))
        );
        let s = t.summary();
        for needle in [
            "shop",
            "pipelined",
            "10.99.0.2:7800",
            "writer w0",
            "outbound",
            "1 GiB",
        ] {
            assert!(s.contains(needle), "summary lacks {needle}:\n{s}");
        }
    }
}
