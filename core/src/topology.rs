//! Topology files: the gray-box description of one protected application (docs/design.md §2).
//!
//! A topology file is TOML. It names the protection group, the backup server, the
//! policies, the primary hosts, the protected machines and their protected disks.
//! This module is pure: [`Topology::parse`] takes the file's text and a file name
//! (used only in messages); reading the file is the caller's job.
//!
//! Parsing collects **every** error it can find (not just the first) and each
//! [`TopologyError`] names the file, line, column and field and says what was
//! expected, e.g.
//!
//! ```text
//! topology/shop.toml:19:6: field `machine[2].ip`: duplicate IPv4 address 10.10.0.3 (already used by machine `web` at line 12); expected a unique address per machine
//! ```
//!
//! Array indices in field paths (`machine[2]`) count from 0 in file order.
//! A TOML syntax error stops parsing at once (there is no document to check yet).
//!
//! # Example (every key)
//!
//! ```toml
//! [group]
//! name = "shop"              # [A-Za-z0-9_.-], 1..=64 characters, not "." or ".."
//! id = 7                     # u16, carried in the IPv4 option of tagged packets
//! mode = "pipelined"         # async | sync | pipelined (default) | checkpoint (later)
//!
//! [backup]
//! endpoint = "10.99.0.2:7800"              # HOST:PORT of the backup server (TLS)
//! server_name = "backup.pipecloud.test"    # TLS name to verify (default: endpoint host)
//! ca = "certs/ca.pem"                      # relative paths: relative to the topology file
//! cert = "certs/shop-agent.pem"
//! key = "certs/shop-agent.key"
//!
//! [policy]                                 # optional, every key has a default
//! on_backup_loss = "stall"                 # stall (default) | degrade-to-async
//! # degrade_after_s = 30                   # required with degrade-to-async, 1..=86400
//! max_inflight_bytes = "64MiB"             # unacked replication bytes before writes slow down
//! netqueue_max_packets = 65536             # held client-bound packets, 1..=65536 (kernel limit)
//! netqueue_max_bytes = "256MiB"            # held client-bound bytes
//! replication_coalesce_us = 200            # 0..=10000: longest a write waits for earlier writes'
//!                                          # acks before it is sent anyway (0: send at once)
//! replication_async_batch_us = 1000        # 0..=10000, async mode only: writes are sent in
//!                                          # batches at most this old (0: send at once)
//! heartbeat_interval_ms = 1000             # 10..=60000: how often the agent sends the backup a
//!                                          # heartbeat (RTT figure, liveness)
//! heartbeat_timeout_ms = 5000              # 100..=600000, at least twice the interval: a backup
//!                                          # silent this long is disconnected and dialled again
//!
//! [[host]]
//! name = "dom0-a"
//! nbd_dir = "/run/pipecloud/dom0-a"        # absolute; the agent's NBD sockets: <nbd_dir>/<disk>.sock
//! ctl_socket = "/run/pipecloud/dom0-a/ctl.sock"   # optional, default <nbd_dir>/ctl.sock
//! busy_poll_us = 0                         # optional, 0..=10000 (0: off): network-path busy polling
//! kernel_tagger = true                     # optional: tagging and hold fast path in eBPF (false: NFQUEUE only)
//! metrics_listen = "127.0.0.1:9701"        # optional: Prometheus `/metrics` over HTTP (absent: none)
//!
//! [[machine]]
//! name = "web"
//! ip = "10.10.0.2"
//! mac = "02:00:00:00:00:02"               # optional, unicast
//! host = "dom0-a"
//! outbound = true                          # may talk to clients: its replies are held
//!
//! [[machine]]
//! name = "db"
//! ip = "10.10.0.3"
//! host = "dom0-a"
//! writer = true                            # optional check: must (true) / must not (false) own a disk
//!
//! [[disk]]
//! name = "db-data"
//! machine = "db"
//! image = "/var/lib/pipecloud/db-data.img" # absolute
//! size = "1GiB"                            # bytes, or K/M/G/T (10^n) / Ki/Mi/Gi/Ti (2^n), optional B;
//!                                          # > 0 and a multiple of 512
//! ```
//!
//! # Model
//!
//! *Writers* are the machines that own at least one protected disk. They are
//! numbered `0..n` ([`WriterId`]) in the order their `[[machine]]` tables appear in
//! the file. **Reordering machines renumbers writers**, and writer ids are what the
//! backup server keys its journal by: do not reorder the machines of a group that
//! already has state at the backup. At most [`MAX_WRITERS`] machines may write (the
//! IPv4 option carries at most that many entries).
//!
//! A machine is *outbound* when it may talk to clients outside the group (its
//! client-bound packets are held in the netqueue); a machine that is neither a
//! writer nor outbound is an *intermediate* (it only relays causality). At least
//! one machine must be outbound and at least one disk must be protected.
//!
//! `mode = "checkpoint"` (full-state, Remus-style) is accepted by the file format
//! so topologies need not change when it lands, but the agent does not implement
//! it yet.
//!
//! # Limits
//!
//! A file is at most [`MAX_TOPOLOGY_BYTES`]; a group has at most [`MAX_HOSTS`]
//! hosts, [`MAX_MACHINES`] machines and [`MAX_DISKS`] disks, and one host at most
//! [`MAX_DISKS_PER_HELLO`] disks (an agent announces all of its disks in one hello).
//! Unix socket paths derived from the file must fit `sun_path`
//! ([`MAX_UNIX_SOCKET_PATH`] bytes).

use crate::vector::{WriterId, MAX_WRITERS};
use crate::wire::{MAX_DISKS_PER_HELLO, MAX_NAME_LEN, MAX_WRITE_PAYLOAD};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;
use toml::Spanned;

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

// ---------------------------------------------------------------------------
// The loaded model
// ---------------------------------------------------------------------------

pub use crate::mode::{BackupLossPolicy, Mode, UnknownMode};

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
    /// (backpressure). At least one write frame ([`MAX_WRITE_PAYLOAD`]).
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
    /// Primary hosts, in file order.
    pub hosts: Vec<Host>,
    /// Protected machines, in file order.
    pub machines: Vec<Machine>,
    /// Protected disks, in file order.
    pub disks: Vec<Disk>,
}

impl Topology {
    /// Parses and validates a topology file. `file` is used only in messages.
    /// On failure returns every error found (at least one).
    pub fn parse(text: &str, file: &str) -> Result<Topology, TopologyErrors> {
        let mut cx = Cx::new(text, file);
        let topology = parse_in(&mut cx);
        match topology {
            Some(t) if cx.errors.is_empty() => Ok(t),
            _ => {
                if cx.errors.is_empty() {
                    // Unreachable by construction (a missing piece always reports an
                    // error); kept so a bug shows up as an error, not as a panic.
                    cx.error_at_start("", "internal error: incomplete topology without an error");
                }
                let mut errors = cx.errors;
                errors.sort_by_key(|e| (e.line, e.column));
                Err(TopologyErrors(errors))
            }
        }
    }

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

/// Formats a MAC address as `02:00:00:00:00:03`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Formats a byte count: `1 GiB` when exact in a binary unit, else `1536 KiB`
/// or `1000000 bytes`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 5] = [
        ("PiB", 50),
        ("TiB", 40),
        ("GiB", 30),
        ("MiB", 20),
        ("KiB", 10),
    ];
    for (unit, shift) in UNITS {
        let scale = 1u64 << shift;
        if bytes >= scale && bytes & (scale - 1) == 0 {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

/// Checks a name used on the wire and in file names: 1..=[`MAX_NAME_LEN`]
/// characters from `[A-Za-z0-9_.-]`, not `.` or `..`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "the name is {} characters long (at most {MAX_NAME_LEN})",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("`{name}` is not usable as a file name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!("`{name}` contains {c:?}"));
    }
    Ok(())
}

/// Parses a size: a non-negative integer with an optional unit `K M G T`
/// (powers of 1000) or `Ki Mi Gi Ti` (powers of 1024), optionally followed by
/// `B`, e.g. `4096`, `64MiB`, `1 G`, `512KB`. Returns `None` on syntax error or
/// overflow.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits_end = s
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_digit() || *c == '_'))
        .map_or(s.len(), |(i, _)| i);
    let (num, unit) = s.split_at(digits_end);
    let num = num.replace('_', "");
    if num.is_empty() {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    let unit = unit.trim();
    let unit = unit.strip_suffix(['B', 'b']).unwrap_or(unit);
    let mult: u64 = match unit {
        "" => 1,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" | "ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Parses `02:00:00:00:00:03` (or with `-`) into six bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let sep = if s.contains('-') { '-' } else { ':' };
    let mut mac = [0u8; 6];
    let mut parts = s.split(sep);
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(mac)
}

fn check_dns_name(h: &str) -> Result<(), String> {
    if h.is_empty() || h.len() > 253 {
        return Err(format!("`{h}` is not a host name (1 to 253 characters)"));
    }
    for label in h.trim_end_matches('.').split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("`{h}` is not a valid host name (label `{label}`)"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// One problem in a topology file, with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologyError {
    /// File name as given to [`Topology::parse`].
    pub file: String,
    /// 1-based line.
    pub line: u32,
    /// 1-based column (in characters).
    pub column: u32,
    /// Field path, e.g. `machine[2].ip` (empty for TOML syntax errors).
    pub field: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "field `{}`: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for TopologyError {}

/// Every error found in one topology file, sorted by position. Never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologyErrors(Vec<TopologyError>);

impl TopologyErrors {
    /// The errors, sorted by line and column.
    pub fn errors(&self) -> &[TopologyError] {
        &self.0
    }

    /// Number of errors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false (kept for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Iterates over the errors.
    pub fn iter(&self) -> std::slice::Iter<'_, TopologyError> {
        self.0.iter()
    }
}

impl IntoIterator for TopologyErrors {
    type Item = TopologyError;
    type IntoIter = std::vec::IntoIter<TopologyError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a TopologyErrors {
    type Item = &'a TopologyError;
    type IntoIter = std::slice::Iter<'a, TopologyError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Display for TopologyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TopologyErrors {}

// ---------------------------------------------------------------------------
// A TOML document with a span on every value
// ---------------------------------------------------------------------------

/// A TOML value that keeps the byte span of every nested value, so that
/// semantic errors can point at the offending field.
#[derive(Debug)]
enum Node {
    Str(String),
    Int(i64),
    Float,
    Bool(bool),
    Datetime,
    Array(Vec<Spanned<Node>>),
    Table(BTreeMap<String, Spanned<Node>>),
}

/// A TOML table with spans on its values.
type NodeTable = BTreeMap<String, Spanned<Node>>;

/// Key under which the toml deserializer hands out date-times.
const TOML_DATETIME_KEY: &str = "$__toml_private_datetime";

impl Node {
    fn kind(&self) -> &'static str {
        match self {
            Node::Str(_) => "a string",
            Node::Int(_) => "an integer",
            Node::Float => "a float",
            Node::Bool(_) => "a boolean",
            Node::Datetime => "a date-time",
            Node::Array(_) => "an array",
            Node::Table(_) => "a table",
        }
    }
}

struct NodeVisitor;

impl<'de> serde::de::Visitor<'de> for NodeVisitor {
    type Value = Node;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a TOML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Node, E> {
        i64::try_from(v)
            .map(Node::Int)
            .map_err(|_| E::custom("integer out of range"))
    }
    fn visit_f64<E>(self, _v: f64) -> Result<Node, E> {
        Ok(Node::Float)
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut table = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == TOML_DATETIME_KEY {
                let _: String = map.next_value()?;
                return Ok(Node::Datetime);
            }
            let value: Spanned<Node> = map.next_value()?;
            table.insert(key, value);
        }
        Ok(Node::Table(table))
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

// ---------------------------------------------------------------------------
// Error collection and positions
// ---------------------------------------------------------------------------

/// Parsing context: the text (for positions) and the errors found so far.
struct Cx<'t> {
    file: &'t str,
    text: &'t str,
    line_starts: Vec<usize>,
    errors: Vec<TopologyError>,
}

impl<'t> Cx<'t> {
    fn new(text: &'t str, file: &'t str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Cx {
            file,
            text,
            line_starts,
            errors: Vec::new(),
        }
    }

    /// 1-based line and column of byte `offset`.
    fn position(&self, offset: usize) -> (u32, u32) {
        let offset = offset.min(self.text.len());
        let line_index = self
            .line_starts
            .partition_point(|&start| start <= offset)
            .saturating_sub(1);
        let start = self.line_starts.get(line_index).copied().unwrap_or(0);
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        (
            u32::try_from(line_index + 1).unwrap_or(u32::MAX),
            u32::try_from(column + 1).unwrap_or(u32::MAX),
        )
    }

    /// 1-based line of byte `offset`.
    fn line(&self, offset: usize) -> u32 {
        self.position(offset).0
    }

    fn error(&mut self, span: &Range<usize>, field: &str, message: impl Into<String>) {
        let (line, column) = self.position(span.start);
        self.errors.push(TopologyError {
            file: self.file.to_owned(),
            line,
            column,
            field: field.to_owned(),
            message: message.into(),
        });
    }

    fn error_at_start(&mut self, field: &str, message: impl Into<String>) {
        self.error(&(0..0), field, message);
    }
}

/// A decoded value with its span and field path.
#[derive(Clone, Debug)]
struct At<T> {
    value: T,
    span: Range<usize>,
    field: String,
}

/// Reads the keys of one TOML table; whatever is left at [`TableReader::finish`]
/// is reported as an unknown field.
struct TableReader<'n> {
    /// Field path of the table (`machine[2]`), empty for the document root.
    path: String,
    span: Range<usize>,
    entries: BTreeMap<&'n str, &'n Spanned<Node>>,
    allowed: &'static [&'static str],
}

impl<'n> TableReader<'n> {
    fn new(
        path: String,
        span: Range<usize>,
        table: &'n NodeTable,
        allowed: &'static [&'static str],
    ) -> Self {
        TableReader {
            path,
            span,
            entries: table.iter().map(|(k, v)| (k.as_str(), v)).collect(),
            allowed,
        }
    }

    fn field_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Takes `key` and converts it with `conv` (which returns what is wrong).
    /// Missing: an error if `required`, else `None` silently.
    fn get<T>(
        &mut self,
        cx: &mut Cx<'_>,
        key: &str,
        required: bool,
        expected: &str,
        conv: impl FnOnce(&Node) -> Result<T, String>,
    ) -> Option<At<T>> {
        let field = self.field_path(key);
        let Some(node) = self.entries.remove(key) else {
            if required {
                let span = self.span.clone();
                cx.error(&span, &field, format!("missing; expected {expected}"));
            }
            return None;
        };
        let span = node.span();
        match conv(node.get_ref()) {
            Ok(value) => Some(At { value, span, field }),
            Err(problem) => {
                cx.error(&span, &field, format!("{problem}; expected {expected}"));
                None
            }
        }
    }

    fn required<T>(
        &mut self,
        cx: &mut Cx<'_>,
        key: &str,
        expected: &str,
        conv: impl FnOnce(&Node) -> Result<T, String>,
    ) -> Option<At<T>> {
        self.get(cx, key, true, expected, conv)
    }

    fn optional<T>(
        &mut self,
        cx: &mut Cx<'_>,
        key: &str,
        expected: &str,
        conv: impl FnOnce(&Node) -> Result<T, String>,
    ) -> Option<At<T>> {
        self.get(cx, key, false, expected, conv)
    }

    /// Takes `key` raw (for sub-tables and arrays).
    fn take(&mut self, key: &str) -> Option<&'n Spanned<Node>> {
        self.entries.remove(key)
    }

    /// Reports every key that was not taken.
    fn finish(self, cx: &mut Cx<'_>) {
        let mut left: Vec<(&str, &Spanned<Node>)> = self.entries.into_iter().collect();
        left.sort_by_key(|(_, v)| v.span().start);
        let expected = self
            .allowed
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ");
        for (key, value) in left {
            let field = if self.path.is_empty() {
                key.to_owned()
            } else {
                format!("{}.{key}", self.path)
            };
            cx.error(
                &value.span(),
                &field,
                format!("unknown field `{key}`; expected one of {expected}"),
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Value conversions (each returns what is wrong; the caller adds "expected")
// ---------------------------------------------------------------------------

fn conv_str(node: &Node) -> Result<&str, String> {
    match node {
        Node::Str(s) => Ok(s),
        other => Err(format!("found {}", other.kind())),
    }
}

fn conv_name(node: &Node) -> Result<String, String> {
    let s = conv_str(node)?;
    check_name(s).map_err(|e| format!("invalid name: {e}"))?;
    Ok(s.to_owned())
}

const NAME_EXPECTED: &str = "a name of 1 to 64 characters from [A-Za-z0-9_.-], not `.` or `..`";

fn conv_bool(node: &Node) -> Result<bool, String> {
    match node {
        Node::Bool(b) => Ok(*b),
        other => Err(format!("found {}", other.kind())),
    }
}

fn conv_int_range(node: &Node, lo: i64, hi: i64) -> Result<u64, String> {
    match node {
        Node::Int(n) if (lo..=hi).contains(n) => u64::try_from(*n).map_err(|_| format!("{n}")),
        Node::Int(n) => Err(format!("{n} is out of range")),
        other => Err(format!("found {}", other.kind())),
    }
}

fn conv_bytes(node: &Node) -> Result<u64, String> {
    match node {
        Node::Int(n) => u64::try_from(*n).map_err(|_| format!("{n} is negative")),
        Node::Str(s) => parse_size(s).ok_or_else(|| format!("`{s}` is not a size")),
        other => Err(format!("found {}", other.kind())),
    }
}

fn conv_bytes_min(node: &Node, min: u64) -> Result<u64, String> {
    let n = conv_bytes(node)?;
    if n < min {
        return Err(format!("{n} bytes is too small"));
    }
    Ok(n)
}

const BYTES_EXPECTED: &str =
    "a byte count: an integer or a string like \"64MiB\" (units K M G T, Ki Mi Gi Ti)";

fn conv_disk_size(node: &Node) -> Result<u64, String> {
    let n = conv_bytes(node)?;
    if n == 0 {
        return Err("size 0".to_owned());
    }
    if n % SECTOR_SIZE != 0 {
        return Err(format!(
            "{n} bytes is not a multiple of {SECTOR_SIZE} ({} bytes over)",
            n % SECTOR_SIZE
        ));
    }
    if n > MAX_DISK_SIZE {
        return Err(format!("{n} bytes is too large"));
    }
    Ok(n)
}

fn conv_ipv4(node: &Node) -> Result<Ipv4Addr, String> {
    let s = conv_str(node)?;
    let ip: Ipv4Addr = match s.parse() {
        Ok(ip) => ip,
        Err(_) if s.parse::<IpAddr>().is_ok() => {
            return Err(format!("`{s}` is an IPv6 address (only IPv4 is tagged)"))
        }
        Err(_) => return Err(format!("`{s}` is not an IPv4 address")),
    };
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
        return Err(format!("{ip} is not a unicast host address"));
    }
    Ok(ip)
}

fn conv_mac(node: &Node) -> Result<[u8; 6], String> {
    let s = conv_str(node)?;
    let mac = parse_mac(s).ok_or_else(|| format!("`{s}` is not a MAC address"))?;
    if mac == [0; 6] {
        return Err("the all-zero MAC".to_owned());
    }
    if mac[0] & 1 == 1 {
        return Err(format!("{s} is a multicast MAC"));
    }
    Ok(mac)
}

fn conv_abs_path(node: &Node) -> Result<PathBuf, String> {
    let s = conv_str(node)?;
    let p = Path::new(s);
    if !p.is_absolute() {
        return Err(format!("`{s}` is not an absolute path"));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(format!("`{s}` contains `..`"));
    }
    if s.contains('\0') {
        return Err("the path contains a NUL byte".to_owned());
    }
    Ok(p.to_path_buf())
}

fn conv_path(node: &Node) -> Result<PathBuf, String> {
    let s = conv_str(node)?;
    if s.is_empty() {
        return Err("an empty path".to_owned());
    }
    if s.contains('\0') {
        return Err("the path contains a NUL byte".to_owned());
    }
    Ok(PathBuf::from(s))
}

fn conv_mode(node: &Node) -> Result<Mode, String> {
    let s = conv_str(node)?;
    s.parse::<Mode>().map_err(|_| format!("unknown mode `{s}`"))
}

/// `on_backup_loss` before `degrade_after_s` is combined with it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum LossKind {
    Stall,
    Degrade,
}

fn conv_loss(node: &Node) -> Result<LossKind, String> {
    match conv_str(node)? {
        "stall" => Ok(LossKind::Stall),
        "degrade-to-async" => Ok(LossKind::Degrade),
        other => Err(format!("unknown policy `{other}`")),
    }
}

fn conv_socket_addr(node: &Node) -> Result<SocketAddr, String> {
    let s = conv_str(node)?;
    s.parse()
        .map_err(|_| format!("`{s}` is not an IP address and port"))
}

fn conv_endpoint(node: &Node) -> Result<Endpoint, String> {
    conv_str(node)?.parse()
}

fn conv_server_name(node: &Node) -> Result<String, String> {
    let s = conv_str(node)?;
    if s.parse::<IpAddr>().is_err() {
        check_dns_name(s)?;
    }
    Ok(s.to_owned())
}

// ---------------------------------------------------------------------------
// Raw (partially decoded) sections
// ---------------------------------------------------------------------------

struct RawHost {
    name: Option<At<String>>,
    nbd_dir: Option<At<PathBuf>>,
    ctl_socket: Option<At<PathBuf>>,
    busy_poll_us: Option<At<u64>>,
    kernel_tagger: Option<At<bool>>,
    metrics_listen: Option<At<SocketAddr>>,
}

struct RawMachine {
    span: Range<usize>,
    name: Option<At<String>>,
    ip: Option<At<Ipv4Addr>>,
    mac: Option<At<[u8; 6]>>,
    host: Option<At<String>>,
    outbound: bool,
    writer: Option<At<bool>>,
}

struct RawDisk {
    name: Option<At<String>>,
    machine: Option<At<String>>,
    image: Option<At<PathBuf>>,
    size: Option<At<u64>>,
}

const ROOT_KEYS: &[&str] = &["group", "backup", "policy", "host", "machine", "disk"];
const GROUP_KEYS: &[&str] = &["name", "id", "mode"];
const BACKUP_KEYS: &[&str] = &["endpoint", "server_name", "ca", "cert", "key"];
const POLICY_KEYS: &[&str] = &[
    "on_backup_loss",
    "degrade_after_s",
    "max_inflight_bytes",
    "netqueue_max_packets",
    "netqueue_max_bytes",
    "replication_coalesce_us",
    "replication_async_batch_us",
    "heartbeat_interval_ms",
    "heartbeat_timeout_ms",
];
const HOST_KEYS: &[&str] = &[
    "name",
    "nbd_dir",
    "ctl_socket",
    "busy_poll_us",
    "kernel_tagger",
    "metrics_listen",
];
const MACHINE_KEYS: &[&str] = &["name", "ip", "mac", "host", "outbound", "writer"];
const DISK_KEYS: &[&str] = &["name", "machine", "image", "size"];

/// The table at `node`, or an error naming `field`.
fn as_table<'n>(
    cx: &mut Cx<'_>,
    node: &'n Spanned<Node>,
    field: &str,
    expected: &str,
) -> Option<&'n NodeTable> {
    match node.get_ref() {
        Node::Table(t) => Some(t),
        other => {
            cx.error(
                &node.span(),
                field,
                format!("found {}; expected {expected}", other.kind()),
            );
            None
        }
    }
}

/// The tables of an array of tables `[[key]]` (empty if absent), each with its
/// index, span and table. Reports non-table items and more than `max` items.
fn array_of_tables<'n>(
    cx: &mut Cx<'_>,
    root: &mut TableReader<'n>,
    key: &str,
    max: usize,
) -> Vec<(usize, Range<usize>, &'n NodeTable)> {
    let Some(node) = root.take(key) else {
        return Vec::new();
    };
    let items = match node.get_ref() {
        Node::Array(items) => items,
        other => {
            cx.error(
                &node.span(),
                key,
                format!(
                    "found {}; expected an array of tables, written `[[{key}]]`",
                    other.kind()
                ),
            );
            return Vec::new();
        }
    };
    if items.len() > max {
        cx.error(
            &node.span(),
            key,
            format!("{} `[[{key}]]` tables; expected at most {max}", items.len()),
        );
    }
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let field = format!("{key}[{i}]");
        if let Some(t) = as_table(cx, item, &field, &format!("a table, written `[[{key}]]`")) {
            out.push((i, item.span(), t));
        }
    }
    out
}

fn parse_group(cx: &mut Cx<'_>, node: Option<&Spanned<Node>>) -> Option<Group> {
    let Some(node) = node else {
        cx.error_at_start(
            "group",
            "missing `[group]` table; expected `[group]` with `name`, `id` and `mode`",
        );
        return None;
    };
    let table = as_table(cx, node, "group", "the `[group]` table")?;
    let mut t = TableReader::new("group".into(), node.span(), table, GROUP_KEYS);
    let name = t.required(cx, "name", NAME_EXPECTED, conv_name);
    let id = t.required(cx, "id", "a group id, an integer in 0..=65535", |n| {
        conv_int_range(n, 0, i64::from(u16::MAX))
    });
    let mode = t.optional(
        cx,
        "mode",
        "one of \"async\", \"sync\", \"pipelined\", \"checkpoint\"",
        conv_mode,
    );
    t.finish(cx);
    Some(Group {
        name: name?.value,
        id: u16::try_from(id?.value).ok()?,
        mode: mode.map_or(Mode::default(), |m| m.value),
    })
}

fn parse_backup(cx: &mut Cx<'_>, node: Option<&Spanned<Node>>) -> Option<Backup> {
    let Some(node) = node else {
        cx.error_at_start(
            "backup",
            "missing `[backup]` table; expected `[backup]` with `endpoint`, `ca`, `cert` and `key`",
        );
        return None;
    };
    let table = as_table(cx, node, "backup", "the `[backup]` table")?;
    let mut t = TableReader::new("backup".into(), node.span(), table, BACKUP_KEYS);
    let endpoint = t.required(
        cx,
        "endpoint",
        "\"HOST:PORT\" of the backup server, e.g. \"10.99.0.2:7800\" or \"[fd00::2]:7800\"",
        conv_endpoint,
    );
    let server_name = t.optional(
        cx,
        "server_name",
        "the DNS name (or IP) in the backup server's certificate",
        conv_server_name,
    );
    let path_expected = "a path to a PEM file (relative paths are relative to the topology file)";
    let ca = t.required(cx, "ca", path_expected, conv_path);
    let cert = t.required(cx, "cert", path_expected, conv_path);
    let key = t.required(cx, "key", path_expected, conv_path);
    t.finish(cx);
    let endpoint = endpoint?.value;
    let server_name = server_name.map_or_else(|| endpoint.host.clone(), |s| s.value);
    Some(Backup {
        endpoint,
        server_name,
        ca: ca?.value,
        cert: cert?.value,
        key: key?.value,
    })
}

fn parse_policy(cx: &mut Cx<'_>, node: Option<&Spanned<Node>>) -> Option<Policy> {
    let Some(node) = node else {
        return Some(Policy::default());
    };
    let table = as_table(cx, node, "policy", "the `[policy]` table")?;
    let mut t = TableReader::new("policy".into(), node.span(), table, POLICY_KEYS);
    let loss = t.optional(
        cx,
        "on_backup_loss",
        "\"stall\" or \"degrade-to-async\"",
        conv_loss,
    );
    let after = t.optional(
        cx,
        "degrade_after_s",
        "seconds, an integer in 1..=86400",
        |n| conv_int_range(n, 1, MAX_DEGRADE_AFTER_S as i64),
    );
    let inflight = t.optional(
        cx,
        "max_inflight_bytes",
        &format!("{BYTES_EXPECTED}, at least 1MiB (one write frame)"),
        |n| conv_bytes_min(n, MAX_WRITE_PAYLOAD as u64),
    );
    let packets = t.optional(
        cx,
        "netqueue_max_packets",
        "an integer in 1..=65536 (the kernel holds at most 65536 packets per NFQUEUE)",
        |n| conv_int_range(n, 1, MAX_NETQUEUE_PACKETS as i64),
    );
    let nq_bytes = t.optional(
        cx,
        "netqueue_max_bytes",
        &format!("{BYTES_EXPECTED}, at least 65535 (one IPv4 packet)"),
        |n| conv_bytes_min(n, MIN_NETQUEUE_BYTES),
    );
    let coalesce = t.optional(
        cx,
        "replication_coalesce_us",
        "microseconds, an integer in 0..=10000",
        |n| conv_int_range(n, 0, MAX_REPLICATION_COALESCE_US as i64),
    );
    let async_batch = t.optional(
        cx,
        "replication_async_batch_us",
        "microseconds, an integer in 0..=10000",
        |n| conv_int_range(n, 0, MAX_REPLICATION_ASYNC_BATCH_US as i64),
    );
    let hb_interval = t.optional(
        cx,
        "heartbeat_interval_ms",
        "milliseconds, an integer in 10..=60000",
        |n| {
            conv_int_range(
                n,
                MIN_HEARTBEAT_INTERVAL_MS as i64,
                MAX_HEARTBEAT_INTERVAL_MS as i64,
            )
        },
    );
    let hb_timeout = t.optional(
        cx,
        "heartbeat_timeout_ms",
        "milliseconds, an integer in 100..=600000",
        |n| {
            conv_int_range(
                n,
                MIN_HEARTBEAT_TIMEOUT_MS as i64,
                MAX_HEARTBEAT_TIMEOUT_MS as i64,
            )
        },
    );
    t.finish(cx);
    let heartbeat_interval_ms = hb_interval
        .as_ref()
        .map_or(DEFAULT_HEARTBEAT_INTERVAL_MS, |v| v.value);
    let heartbeat_timeout_ms = hb_timeout
        .as_ref()
        .map_or(DEFAULT_HEARTBEAT_TIMEOUT_MS, |v| v.value);
    if heartbeat_timeout_ms < heartbeat_interval_ms.saturating_mul(2) {
        // Point at whichever of the two the file sets (the timeout if both).
        let (span, field) = match (&hb_timeout, &hb_interval) {
            (Some(t), _) => (t.span.clone(), t.field.clone()),
            (None, Some(i)) => (i.span.clone(), i.field.clone()),
            (None, None) => (node.span(), "policy".to_owned()),
        };
        cx.error(
            &span,
            &field,
            format!(
                "heartbeat timeout {heartbeat_timeout_ms} ms is shorter than twice the heartbeat \
                 interval {heartbeat_interval_ms} ms; expected heartbeat_timeout_ms >= 2 * heartbeat_interval_ms \
                 (one late heartbeat must not end a session)"
            ),
        );
        return None;
    }

    let on_backup_loss = match (loss.as_ref().map(|l| l.value), &after) {
        (Some(LossKind::Degrade), Some(a)) => BackupLossPolicy::DegradeToAsync {
            after: Duration::from_secs(a.value),
        },
        (Some(LossKind::Degrade), None) => {
            if let Some(l) = &loss {
                cx.error(
                    &l.span,
                    &l.field,
                    "\"degrade-to-async\" needs a timeout; expected `degrade_after_s = SECONDS` in `[policy]`",
                );
            }
            return None;
        }
        (_, Some(a)) => {
            cx.error(
                &a.span,
                &a.field,
                "only meaningful with on_backup_loss = \"degrade-to-async\"; expected it removed, or the policy changed",
            );
            return None;
        }
        (_, None) => BackupLossPolicy::Stall,
    };
    Some(Policy {
        on_backup_loss,
        max_inflight_bytes: inflight.map_or(DEFAULT_MAX_INFLIGHT_BYTES, |v| v.value),
        netqueue_max_packets: packets.map_or(DEFAULT_NETQUEUE_MAX_PACKETS, |v| v.value),
        netqueue_max_bytes: nq_bytes.map_or(DEFAULT_NETQUEUE_MAX_BYTES, |v| v.value),
        replication_coalesce_us: coalesce.map_or(DEFAULT_REPLICATION_COALESCE_US, |v| v.value),
        replication_async_batch_us: async_batch
            .map_or(DEFAULT_REPLICATION_ASYNC_BATCH_US, |v| v.value),
        heartbeat_interval_ms,
        heartbeat_timeout_ms,
    })
}

fn parse_host(cx: &mut Cx<'_>, i: usize, span: Range<usize>, table: &NodeTable) -> RawHost {
    let mut t = TableReader::new(format!("host[{i}]"), span, table, HOST_KEYS);
    let name = t.required(cx, "name", NAME_EXPECTED, conv_name);
    let nbd_dir = t.required(
        cx,
        "nbd_dir",
        "an absolute directory path for the agent's NBD sockets",
        conv_abs_path,
    );
    let ctl_socket = t.optional(
        cx,
        "ctl_socket",
        "an absolute path for the agent's control socket",
        conv_abs_path,
    );
    let busy_poll_us = t.optional(
        cx,
        "busy_poll_us",
        "microseconds, an integer in 0..=10000",
        |n| conv_int_range(n, 0, MAX_BUSY_POLL_US as i64),
    );
    let kernel_tagger = t.optional(cx, "kernel_tagger", "true or false", conv_bool);
    let metrics_listen = t.optional(
        cx,
        "metrics_listen",
        "\"IP:PORT\" to serve Prometheus metrics on, e.g. \"127.0.0.1:9701\"",
        conv_socket_addr,
    );
    t.finish(cx);
    RawHost {
        name,
        nbd_dir,
        ctl_socket,
        busy_poll_us,
        kernel_tagger,
        metrics_listen,
    }
}

fn parse_machine(cx: &mut Cx<'_>, i: usize, span: Range<usize>, table: &NodeTable) -> RawMachine {
    let mut t = TableReader::new(format!("machine[{i}]"), span.clone(), table, MACHINE_KEYS);
    let name = t.required(cx, "name", NAME_EXPECTED, conv_name);
    let ip = t.required(
        cx,
        "ip",
        "the machine's unicast IPv4 address, e.g. \"10.10.0.3\"",
        conv_ipv4,
    );
    let mac = t.optional(
        cx,
        "mac",
        "a unicast MAC address, e.g. \"02:00:00:00:00:03\"",
        conv_mac,
    );
    let host = t.required(cx, "host", "the name of a `[[host]]`", conv_name);
    let outbound = t.optional(cx, "outbound", "true or false", conv_bool);
    let writer = t.optional(cx, "writer", "true or false", conv_bool);
    t.finish(cx);
    RawMachine {
        span,
        name,
        ip,
        mac,
        host,
        outbound: outbound.is_some_and(|o| o.value),
        writer,
    }
}

fn parse_disk(cx: &mut Cx<'_>, i: usize, span: Range<usize>, table: &NodeTable) -> RawDisk {
    let mut t = TableReader::new(format!("disk[{i}]"), span, table, DISK_KEYS);
    let name = t.required(cx, "name", NAME_EXPECTED, conv_name);
    let machine = t.required(cx, "machine", "the name of a `[[machine]]`", conv_name);
    let image = t.required(
        cx,
        "image",
        "the absolute path of the local image file",
        conv_abs_path,
    );
    let size = t.required(
        cx,
        "size",
        &format!("{BYTES_EXPECTED}, greater than 0 and a multiple of 512"),
        conv_disk_size,
    );
    t.finish(cx);
    RawDisk {
        name,
        machine,
        image,
        size,
    }
}

/// Reports a duplicate of `value` among `(value, at)` seen so far.
fn check_unique<K: std::hash::Hash + Eq + Clone, T>(
    cx: &mut Cx<'_>,
    seen: &mut HashMap<K, (String, usize)>,
    key: K,
    at: &At<T>,
    owner: &str,
    what: impl FnOnce(&str, u32) -> String,
) {
    if let Some((first_owner, first_offset)) = seen.get(&key) {
        let line = cx.line(*first_offset);
        let message = what(first_owner, line);
        cx.error(&at.span, &at.field, message);
    } else {
        seen.insert(key, (owner.to_owned(), at.span.start));
    }
}

fn list_names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<String> = names.map(|n| format!("`{n}`")).collect();
    if names.is_empty() {
        "(none declared)".to_owned()
    } else {
        names.join(", ")
    }
}

/// At least one host; unique host names; control socket paths fit `sun_path`.
fn check_hosts<'a>(cx: &mut Cx<'_>, hosts: &'a [RawHost]) -> Vec<&'a str> {
    if hosts.is_empty() {
        cx.error_at_start(
            "host",
            "no `[[host]]` table; expected at least one primary host",
        );
    }
    let mut seen = HashMap::new();
    for h in hosts {
        if let Some(name) = &h.name {
            check_unique(
                cx,
                &mut seen,
                name.value.clone(),
                name,
                &name.value,
                |_, line| {
                    format!(
                    "duplicate host name `{}` (already declared at line {line}); expected a unique name per host",
                    name.value
                )
                },
            );
        }
        // The explicit path, or the default under nbd_dir (reported at nbd_dir).
        let ctl = match (&h.ctl_socket, &h.nbd_dir) {
            (Some(ctl), _) => Some((ctl.value.clone(), &ctl.span, &ctl.field)),
            (None, Some(dir)) => Some((default_ctl_socket(&dir.value), &dir.span, &dir.field)),
            (None, None) => None,
        };
        if let Some((path, span, field)) = ctl {
            let len = path.as_os_str().len();
            if len > MAX_UNIX_SOCKET_PATH {
                cx.error(
                    span,
                    field,
                    format!(
                        "control socket {} would be {len} bytes; expected at most {MAX_UNIX_SOCKET_PATH} (Unix socket path limit)",
                        path.display()
                    ),
                );
            }
        }
    }
    hosts
        .iter()
        .filter_map(|h| h.name.as_ref().map(|n| n.value.as_str()))
        .collect()
}

/// At least one machine and one outbound machine; unique names, IPs and MACs;
/// every machine on a declared host.
fn check_machines<'a>(
    cx: &mut Cx<'_>,
    machines: &'a [RawMachine],
    host_names: &[&str],
) -> Vec<&'a str> {
    if machines.is_empty() {
        cx.error_at_start(
            "machine",
            "no `[[machine]]` table; expected at least one protected machine",
        );
    }
    let mut names = HashMap::new();
    let mut ips = HashMap::new();
    let mut macs = HashMap::new();
    for m in machines {
        let owner = m.name.as_ref().map_or("?", |n| n.value.as_str());
        if let Some(name) = &m.name {
            check_unique(
                cx,
                &mut names,
                name.value.clone(),
                name,
                owner,
                |_, line| {
                    format!(
                    "duplicate machine name `{}` (already declared at line {line}); expected a unique name per machine",
                    name.value
                )
                },
            );
        }
        if let Some(ip) = &m.ip {
            check_unique(cx, &mut ips, ip.value, ip, owner, |first, line| {
                format!(
                    "duplicate IPv4 address {} (already used by machine `{first}` at line {line}); expected a unique address per machine",
                    ip.value
                )
            });
        }
        if let Some(mac) = &m.mac {
            check_unique(cx, &mut macs, mac.value, mac, owner, |first, line| {
                format!(
                    "duplicate MAC address {} (already used by machine `{first}` at line {line}); expected a unique MAC per machine",
                    format_mac(mac.value)
                )
            });
        }
        if let Some(host) = &m.host {
            if !host_names.contains(&host.value.as_str()) {
                cx.error(
                    &host.span,
                    &host.field,
                    format!(
                        "unknown host `{}`; expected one of the `[[host]]` names: {}",
                        host.value,
                        list_names(host_names.iter().copied())
                    ),
                );
            }
        }
    }
    if !machines.is_empty() && !machines.iter().any(|m| m.outbound) {
        let span = machines.first().map_or(0..0, |m| m.span.clone());
        cx.error(
            &span,
            "machine",
            "no machine is outbound; expected at least one machine with `outbound = true` (the ones clients talk to)",
        );
    }
    machines
        .iter()
        .filter_map(|m| m.name.as_ref().map(|n| n.value.as_str()))
        .collect()
}

/// At least one disk; unique names and image files; every disk of a declared machine.
fn check_disks(cx: &mut Cx<'_>, disks: &[RawDisk], machine_names: &[&str]) {
    if disks.is_empty() {
        cx.error_at_start(
            "disk",
            "no `[[disk]]` table; expected at least one protected disk (a group without writers has nothing to replicate)",
        );
    }
    let mut disk_names = HashMap::new();
    let mut images = HashMap::new();
    for d in disks {
        let owner = d.name.as_ref().map_or("?", |n| n.value.as_str());
        if let Some(name) = &d.name {
            check_unique(
                cx,
                &mut disk_names,
                name.value.clone(),
                name,
                owner,
                |_, line| {
                    format!(
                    "duplicate disk name `{}` (already declared at line {line}); expected a unique name per disk",
                    name.value
                )
                },
            );
        }
        if let Some(image) = &d.image {
            check_unique(
                cx,
                &mut images,
                image.value.clone(),
                image,
                owner,
                |first, line| {
                    format!(
                    "image {} is already used by disk `{first}` at line {line}; expected a separate image file per disk",
                    image.value.display()
                )
                },
            );
        }
        if let Some(machine) = &d.machine {
            if !machine_names.contains(&machine.value.as_str()) {
                cx.error(
                    &machine.span,
                    &machine.field,
                    format!(
                        "unknown machine `{}`; expected one of the `[[machine]]` names: {}",
                        machine.value,
                        list_names(machine_names.iter().copied())
                    ),
                );
            }
        }
    }
}

/// Numbers the writers (machines owning a disk, first declaration of each name,
/// in file order); checks `writer = true/false` flags and [`MAX_WRITERS`].
fn assign_writers(
    cx: &mut Cx<'_>,
    machines: &[RawMachine],
    disks: &[RawDisk],
) -> HashMap<String, WriterId> {
    let owns_disk = |name: &str| {
        disks
            .iter()
            .any(|d| d.machine.as_ref().is_some_and(|m| m.value == name))
    };
    let mut writer_ids: HashMap<String, WriterId> = HashMap::new();
    let mut writer_count = 0usize;
    let total_writers = machines
        .iter()
        .filter_map(|m| m.name.as_ref())
        .map(|n| n.value.as_str())
        .filter(|n| owns_disk(n))
        .collect::<std::collections::HashSet<_>>()
        .len();
    for m in machines {
        let Some(name) = &m.name else { continue };
        let writes = owns_disk(&name.value);
        if let Some(flag) = &m.writer {
            if flag.value && !writes {
                cx.error(
                    &flag.span,
                    &flag.field,
                    format!(
                        "machine `{}` is declared a writer but owns no disk; expected a `[[disk]]` with machine = \"{}\", or `writer = true` removed",
                        name.value, name.value
                    ),
                );
            } else if !flag.value && writes {
                cx.error(
                    &flag.span,
                    &flag.field,
                    format!(
                        "machine `{}` is declared `writer = false` but owns a disk; expected its `[[disk]]` removed, or `writer = false` removed",
                        name.value
                    ),
                );
            }
        }
        // A duplicate machine name (already reported) does not make a second writer.
        if writes && !writer_ids.contains_key(&name.value) {
            if writer_count == MAX_WRITERS {
                cx.error(
                    &name.span,
                    &name.field,
                    format!(
                        "machine `{}` would be writer number {} ({total_writers} machines own disks); expected at most {MAX_WRITERS} writers per group (the IPv4 option carries at most {MAX_WRITERS} entries)",
                        name.value,
                        writer_count + 1
                    ),
                );
            }
            if let Ok(id) = u8::try_from(writer_count) {
                writer_ids.insert(name.value.clone(), WriterId(id));
            }
            writer_count += 1;
        }
    }
    writer_ids
}

/// Per host: at most [`MAX_DISKS_PER_HELLO`] disks, NBD socket paths fit `sun_path`.
fn check_host_limits(
    cx: &mut Cx<'_>,
    hosts: &[RawHost],
    machines: &[RawMachine],
    disks: &[RawDisk],
) {
    for h in hosts {
        let (Some(name), Some(dir)) = (&h.name, &h.nbd_dir) else {
            continue;
        };
        let on_host = |machine: &str| {
            machines.iter().any(|m| {
                m.name.as_ref().is_some_and(|n| n.value == machine)
                    && m.host.as_ref().is_some_and(|mh| mh.value == name.value)
            })
        };
        let host_disks: Vec<&RawDisk> = disks
            .iter()
            .filter(|d| d.machine.as_ref().is_some_and(|dm| on_host(&dm.value)))
            .collect();
        if host_disks.len() > MAX_DISKS_PER_HELLO {
            cx.error(
                &name.span,
                &name.field,
                format!(
                    "host `{}` serves {} disks; expected at most {MAX_DISKS_PER_HELLO} per host",
                    name.value,
                    host_disks.len()
                ),
            );
        }
        let longest = host_disks
            .iter()
            .filter_map(|d| d.name.as_ref())
            .map(|n| nbd_socket_path(&dir.value, &n.value))
            .max_by_key(|p| p.as_os_str().len());
        if let Some(p) = longest {
            if p.as_os_str().len() > MAX_UNIX_SOCKET_PATH {
                cx.error(
                    &dir.span,
                    &dir.field,
                    format!(
                        "NBD socket {} would be {} bytes; expected a shorter directory (Unix socket paths are limited to {MAX_UNIX_SOCKET_PATH} bytes)",
                        p.display(),
                        p.as_os_str().len()
                    ),
                );
            }
        }
    }
}

fn parse_in(cx: &mut Cx<'_>) -> Option<Topology> {
    if cx.text.len() > MAX_TOPOLOGY_BYTES {
        cx.error_at_start(
            "",
            format!(
                "the file is {} bytes; expected at most {MAX_TOPOLOGY_BYTES}",
                cx.text.len()
            ),
        );
        return None;
    }
    let root: Node = match toml::from_str(cx.text) {
        Ok(root) => root,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let mut message = e.message().trim().replace('\n', "; ");
            if !message.contains("expected") {
                message.push_str("; expected valid TOML (https://toml.io)");
            }
            cx.error(&span, "", format!("TOML syntax: {message}"));
            return None;
        }
    };
    let Node::Table(root_table) = &root else {
        cx.error_at_start("", "the document is not a table");
        return None;
    };
    let mut root = TableReader::new(String::new(), 0..0, root_table, ROOT_KEYS);

    let group = parse_group(cx, root.take("group"));
    let backup = parse_backup(cx, root.take("backup"));
    let policy = parse_policy(cx, root.take("policy"));
    let host_tables = array_of_tables(cx, &mut root, "host", MAX_HOSTS);
    let machine_tables = array_of_tables(cx, &mut root, "machine", MAX_MACHINES);
    let disk_tables = array_of_tables(cx, &mut root, "disk", MAX_DISKS);
    root.finish(cx);

    let hosts: Vec<RawHost> = host_tables
        .into_iter()
        .map(|(i, span, t)| parse_host(cx, i, span, t))
        .collect();
    let machines: Vec<RawMachine> = machine_tables
        .into_iter()
        .map(|(i, span, t)| parse_machine(cx, i, span, t))
        .collect();
    let disks: Vec<RawDisk> = disk_tables
        .into_iter()
        .map(|(i, span, t)| parse_disk(cx, i, span, t))
        .collect();

    let host_names = check_hosts(cx, &hosts);
    let machine_names = check_machines(cx, &machines, &host_names);
    check_disks(cx, &disks, &machine_names);
    let writer_ids = assign_writers(cx, &machines, &disks);
    check_host_limits(cx, &hosts, &machines, &disks);

    // --- build -----------------------------------------------------------
    let group = group?;
    let backup = backup?;
    let policy = policy?;
    let hosts = hosts
        .into_iter()
        .map(|h| {
            let nbd_dir = h.nbd_dir?.value;
            let ctl_socket = h
                .ctl_socket
                .map_or_else(|| default_ctl_socket(&nbd_dir), |c| c.value);
            Some(Host {
                name: h.name?.value,
                nbd_dir,
                ctl_socket,
                busy_poll_us: h.busy_poll_us.map_or(DEFAULT_BUSY_POLL_US, |v| v.value),
                kernel_tagger: h.kernel_tagger.map_or(DEFAULT_KERNEL_TAGGER, |v| v.value),
                metrics_listen: h.metrics_listen.map(|v| v.value),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    let machines = machines
        .into_iter()
        .map(|m| {
            let name = m.name?.value;
            Some(Machine {
                writer: writer_ids.get(&name).copied(),
                name,
                ip: m.ip?.value,
                mac: m.mac.map(|x| x.value),
                host: m.host?.value,
                outbound: m.outbound,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    let disks = disks
        .into_iter()
        .map(|d| {
            Some(Disk {
                name: d.name?.value,
                machine: d.machine?.value,
                image: d.image?.value,
                size: d.size?.value,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Topology {
        group,
        backup,
        policy,
        hosts,
        machines,
        disks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"# a two-tier test topology
[group]
name = "shop"
id = 7
mode = "pipelined"

[backup]
endpoint = "10.99.0.2:7800"
server_name = "backup.pipecloud.test"
ca = "certs/ca.pem"
cert = "certs/shop-agent.pem"
key = "certs/shop-agent.key"

[[host]]
name = "dom0-a"
nbd_dir = "/run/pipecloud/dom0-a"

[[machine]]
name = "web"
ip = "10.10.0.2"
mac = "02:00:00:00:00:02"
host = "dom0-a"
outbound = true

[[machine]]
name = "db"
ip = "10.10.0.3"
host = "dom0-a"
writer = true

[[disk]]
name = "db-data"
machine = "db"
image = "/var/lib/pipecloud/db-data.img"
size = "1GiB"
"#;

    fn errors_of(text: &str) -> Vec<TopologyError> {
        match Topology::parse(text, "t.toml") {
            Ok(t) => panic!("expected errors, parsed {t:?}"),
            Err(e) => e.into_iter().collect(),
        }
    }

    /// Asserts that some error is at `line` on `field` and its message contains `needle`.
    fn assert_error(errors: &[TopologyError], line: u32, field: &str, needle: &str) {
        assert!(
            errors
                .iter()
                .any(|e| e.line == line && e.field == field && e.message.contains(needle)),
            "no error at line {line} on `{field}` containing {needle:?}; got:\n{}",
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    /// Replaces the first occurrence of `from` (which must exist) in GOOD.
    fn good_with(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "GOOD lacks {from:?}");
        GOOD.replacen(from, to, 1)
    }

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

    #[test]
    fn topology_writers_numbered_in_machine_order_not_disk_order() {
        let text = GOOD.replace("writer = true\n", "")
            + "\n[[disk]]\nname = \"web-logs\"\nmachine = \"web\"\nimage = \"/i/w.img\"\nsize = 4096\n";
        let t = Topology::parse(&text, "t.toml").expect("valid");
        // web is declared before db, although its disk comes after db's.
        assert_eq!(t.writer_of("web"), Some(WriterId(0)));
        assert_eq!(t.writer_of("db"), Some(WriterId(1)));
        assert_eq!(t.machines[0].role(), "writer w0, outbound");
    }

    #[test]
    fn topology_error_display_names_file_line_column_and_field() {
        let text = good_with("ip = \"10.10.0.3\"", "ip = \"10.10.0.2\"");
        let errs = Topology::parse(&text, "topology/x.toml").unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(
            errs.to_string(),
            "topology/x.toml:27:6: field `machine[1].ip`: duplicate IPv4 address 10.10.0.2 \
             (already used by machine `web` at line 20); expected a unique address per machine"
        );
    }

    #[test]
    fn topology_syntax_error_has_position() {
        let errs = errors_of("[group]\nname = \"x\"\nid = \n");
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, 3);
        assert!(errs[0].message.starts_with("TOML syntax"), "{}", errs[0]);
    }

    #[test]
    fn topology_unknown_keys_rejected_everywhere() {
        let text = good_with("id = 7\n", "id = 7\ncolour = \"red\"\n").replacen(
            "outbound = true\n",
            "outbound = true\noutbund = 1\n",
            1,
        ) + "\n[extra]\nx = 1\n";
        let errs = errors_of(&text);
        assert_error(&errs, 5, "group.colour", "unknown field `colour`");
        assert_error(
            &errs,
            25,
            "machine[0].outbund",
            "expected one of `name`, `ip`",
        );
        assert_error(&errs, 39, "extra", "unknown field `extra`");
        assert_eq!(errs.len(), 3, "{errs:?}");
    }

    #[test]
    fn topology_wrong_types_and_missing_fields() {
        let text = good_with("id = 7", "id = \"seven\"").replacen("name = \"db\"\n", "", 1);
        let errs = errors_of(&text);
        assert_error(&errs, 4, "group.id", "found a string; expected a group id");
        // The missing name points at the `[[machine]]` header of that machine.
        assert_error(&errs, 25, "machine[1].name", "missing; expected a name");
    }

    #[test]
    fn topology_duplicates() {
        let dup_machine = good_with("name = \"db\"\n", "name = \"web\"\n");
        assert_error(
            &errors_of(&dup_machine),
            26,
            "machine[1].name",
            "duplicate machine name `web` (already declared at line 19)",
        );

        let dup_mac = good_with(
            "host = \"dom0-a\"\nwriter",
            "mac = \"02:00:00:00:00:02\"\nhost = \"dom0-a\"\nwriter",
        );
        assert_error(
            &errors_of(&dup_mac),
            28,
            "machine[1].mac",
            "duplicate MAC address 02:00:00:00:00:02 (already used by machine `web` at line 21)",
        );

        let dup_host = good_with(
            "[[machine]]\nname = \"web\"",
            "[[host]]\nname = \"dom0-a\"\nnbd_dir = \"/run/b\"\n\n[[machine]]\nname = \"web\"",
        );
        assert_error(
            &errors_of(&dup_host),
            19,
            "host[1].name",
            "duplicate host name `dom0-a` (already declared at line 15)",
        );

        let dup_disk = GOOD.to_owned()
            + "\n[[disk]]\nname = \"db-data\"\nmachine = \"db\"\nimage = \"/var/lib/pipecloud/db-data.img\"\nsize = 512\n";
        let errs = errors_of(&dup_disk);
        assert_error(
            &errs,
            38,
            "disk[1].name",
            "duplicate disk name `db-data` (already declared at line 32)",
        );
        assert_error(
            &errs,
            40,
            "disk[1].image",
            "already used by disk `db-data` at line 34",
        );
    }

    #[test]
    fn topology_unknown_references() {
        let text = good_with("host = \"dom0-a\"\nwriter", "host = \"dom0-b\"\nwriter").replacen(
            "machine = \"db\"",
            "machine = \"dbx\"",
            1,
        );
        let errs = errors_of(&text);
        assert_error(
            &errs,
            28,
            "machine[1].host",
            "unknown host `dom0-b`; expected one of the `[[host]]` names: `dom0-a`",
        );
        assert_error(
            &errs,
            33,
            "disk[0].machine",
            "unknown machine `dbx`; expected one of the `[[machine]]` names: `web`, `db`",
        );
    }

    #[test]
    fn topology_writer_flag_must_match_disks() {
        let text = good_with("outbound = true\n", "outbound = true\nwriter = true\n");
        assert_error(
            &errors_of(&text),
            24,
            "machine[0].writer",
            "declared a writer but owns no disk",
        );
        let text = good_with("writer = true", "writer = false");
        assert_error(
            &errors_of(&text),
            29,
            "machine[1].writer",
            "`writer = false` but owns a disk",
        );
    }

    #[test]
    fn topology_too_many_writers() {
        let mut text = GOOD.to_owned();
        for i in 0..MAX_WRITERS {
            text.push_str(&format!(
                "\n[[machine]]\nname = \"w{i}\"\nip = \"10.10.1.{}\"\nhost = \"dom0-a\"\n\n[[disk]]\nname = \"d{i}\"\nmachine = \"w{i}\"\nimage = \"/i/{i}.img\"\nsize = 4096\n",
                i + 1
            ));
        }
        let errs = errors_of(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        // db is writer 1..=1, w0..w6 are 2..=8, w7 is the 9th: its name line.
        let w7_line = text.lines().position(|l| l == "name = \"w7\"").expect("w7") as u32 + 1;
        assert_error(
            &errs,
            w7_line,
            "machine[9].name",
            "writer number 9 (9 machines own disks); expected at most 8 writers",
        );
    }

    #[test]
    fn topology_group_level_requirements() {
        let text = good_with("outbound = true\n", "");
        assert_error(&errors_of(&text), 18, "machine", "no machine is outbound");
        let cut = GOOD.find("[[disk]]").expect("disk");
        let text = GOOD[..cut].replace("writer = true\n", "");
        assert_error(&errors_of(&text), 1, "disk", "no `[[disk]]` table");
        let errs = errors_of("");
        assert_error(&errs, 1, "group", "missing `[group]`");
        assert_error(&errs, 1, "backup", "missing `[backup]`");
        assert_error(&errs, 1, "host", "no `[[host]]`");
        assert_error(&errs, 1, "machine", "no `[[machine]]`");
        let text = good_with("[[machine]]\nname = \"web\"", "[machine]\nname = \"web\"");
        assert!(Topology::parse(&text, "t").is_err());
    }

    #[test]
    fn topology_values_are_validated() {
        let cases: &[(&str, &str, u32, &str, &str)] = &[
            (
                "name = \"shop\"",
                "name = \"sh/op\"",
                3,
                "group.name",
                "contains '/'",
            ),
            (
                "name = \"shop\"",
                "name = \"..\"",
                3,
                "group.name",
                "not usable as a file name",
            ),
            (
                "id = 7",
                "id = 70000",
                4,
                "group.id",
                "70000 is out of range",
            ),
            (
                "mode = \"pipelined\"",
                "mode = \"fast\"",
                5,
                "group.mode",
                "unknown mode `fast`",
            ),
            (
                "\"10.99.0.2:7800\"",
                "\"10.99.0.2\"",
                8,
                "backup.endpoint",
                "no `:PORT`",
            ),
            (
                "\"10.99.0.2:7800\"",
                "\"10.99.0.2:0\"",
                8,
                "backup.endpoint",
                "port 0",
            ),
            (
                "ip = \"10.10.0.2\"",
                "ip = \"10.10.0.256\"",
                20,
                "machine[0].ip",
                "not an IPv4 address",
            ),
            (
                "ip = \"10.10.0.2\"",
                "ip = \"fd00::2\"",
                20,
                "machine[0].ip",
                "IPv6",
            ),
            (
                "ip = \"10.10.0.2\"",
                "ip = \"224.0.0.1\"",
                20,
                "machine[0].ip",
                "not a unicast",
            ),
            (
                "mac = \"02:00:00:00:00:02\"",
                "mac = \"02:00:00:00:02\"",
                21,
                "machine[0].mac",
                "not a MAC address",
            ),
            (
                "mac = \"02:00:00:00:00:02\"",
                "mac = \"01:00:5e:00:00:02\"",
                21,
                "machine[0].mac",
                "multicast",
            ),
            (
                "outbound = true",
                "outbound = \"yes\"",
                23,
                "machine[0].outbound",
                "found a string; expected true or false",
            ),
            (
                "image = \"/var",
                "image = \"var",
                34,
                "disk[0].image",
                "not an absolute path",
            ),
            (
                "size = \"1GiB\"",
                "size = 1000",
                35,
                "disk[0].size",
                "not a multiple of 512 (488 bytes over)",
            ),
            ("size = \"1GiB\"", "size = 0", 35, "disk[0].size", "size 0"),
            (
                "size = \"1GiB\"",
                "size = \"1 KB\"",
                35,
                "disk[0].size",
                "not a multiple of 512",
            ),
            (
                "size = \"1GiB\"",
                "size = \"lots\"",
                35,
                "disk[0].size",
                "`lots` is not a size",
            ),
            (
                "size = \"1GiB\"",
                "size = -512",
                35,
                "disk[0].size",
                "negative",
            ),
            (
                "nbd_dir = \"/run",
                "nbd_dir = \"run",
                16,
                "host[0].nbd_dir",
                "not an absolute path",
            ),
        ];
        for (from, to, line, field, needle) in cases {
            let errs = errors_of(&good_with(from, to));
            assert_error(&errs, *line, field, needle);
        }
    }

    #[test]
    fn topology_policies() {
        let with =
            |policy: &str| GOOD.replacen("[[host]]", &format!("[policy]\n{policy}\n\n[[host]]"), 1);
        let t = Topology::parse(
            &with("on_backup_loss = \"degrade-to-async\"\ndegrade_after_s = 30\nmax_inflight_bytes = \"8MiB\"\nnetqueue_max_packets = 1000\nnetqueue_max_bytes = 1048576\nreplication_coalesce_us = 0\nreplication_async_batch_us = 250"),
            "t",
        )
        .expect("valid");
        assert_eq!(
            t.policy,
            Policy {
                on_backup_loss: BackupLossPolicy::DegradeToAsync {
                    after: Duration::from_secs(30)
                },
                max_inflight_bytes: 8 << 20,
                netqueue_max_packets: 1000,
                netqueue_max_bytes: 1 << 20,
                replication_coalesce_us: 0,
                replication_async_batch_us: 250,
                heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
                heartbeat_timeout_ms: DEFAULT_HEARTBEAT_TIMEOUT_MS,
            }
        );
        assert!(t.summary().contains("degrade-to-async after 30 s"));
        assert_error(
            &errors_of(&with("on_backup_loss = \"degrade-to-async\"")),
            15,
            "policy.on_backup_loss",
            "needs a timeout",
        );
        assert_error(
            &errors_of(&with("degrade_after_s = 5")),
            15,
            "policy.degrade_after_s",
            "only meaningful with",
        );
        assert_error(
            &errors_of(&with("on_backup_loss = \"panic\"")),
            15,
            "policy.on_backup_loss",
            "unknown policy `panic`",
        );
        assert_error(
            &errors_of(&with("netqueue_max_packets = 100000")),
            15,
            "policy.netqueue_max_packets",
            "1..=65536",
        );
        assert_error(
            &errors_of(&with("max_inflight_bytes = 4096")),
            15,
            "policy.max_inflight_bytes",
            "too small",
        );
        assert_error(
            &errors_of(&with("replication_coalesce_us = 10001")),
            15,
            "policy.replication_coalesce_us",
            "0..=10000",
        );
        assert_error(
            &errors_of(&with("replication_async_batch_us = 10001")),
            15,
            "policy.replication_async_batch_us",
            "0..=10000",
        );
        // Heartbeats: bounded, and the timeout leaves room for a late heartbeat.
        let t = Topology::parse(
            &with("heartbeat_interval_ms = 200\nheartbeat_timeout_ms = 1500"),
            "t",
        )
        .expect("valid");
        assert_eq!(
            (
                t.policy.heartbeat_interval_ms,
                t.policy.heartbeat_timeout_ms
            ),
            (200, 1500)
        );
        assert!(t
            .summary()
            .contains("heartbeat every 200 ms, backup gone after 1500 ms"));
        assert_error(
            &errors_of(&with("heartbeat_interval_ms = 5")),
            15,
            "policy.heartbeat_interval_ms",
            "10..=60000",
        );
        assert_error(
            &errors_of(&with("heartbeat_interval_ms = \"1s\"")),
            15,
            "policy.heartbeat_interval_ms",
            "milliseconds",
        );
        assert_error(
            &errors_of(&with("heartbeat_timeout_ms = 600001")),
            15,
            "policy.heartbeat_timeout_ms",
            "100..=600000",
        );
        // Timeout below twice the interval: named at the timeout when set...
        let errs = errors_of(&with(
            "heartbeat_interval_ms = 1000\nheartbeat_timeout_ms = 1999",
        ));
        assert_error(
            &errs,
            16,
            "policy.heartbeat_timeout_ms",
            "twice the heartbeat interval",
        );
        assert_eq!(errs.len(), 1, "{errs:?}");
        // ... at the interval when only it is set (against the default timeout).
        assert_error(
            &errors_of(&with("heartbeat_interval_ms = 3000")),
            15,
            "policy.heartbeat_interval_ms",
            "heartbeat timeout 5000 ms",
        );
        let defaults = Topology::parse(&with(""), "t").expect("valid").policy;
        assert_eq!(
            (
                defaults.heartbeat_interval_ms,
                defaults.heartbeat_timeout_ms
            ),
            (DEFAULT_HEARTBEAT_INTERVAL_MS, DEFAULT_HEARTBEAT_TIMEOUT_MS)
        );
        assert_eq!(
            defaults.replication_coalesce_us,
            DEFAULT_REPLICATION_COALESCE_US
        );
        assert_eq!(
            defaults.replication_async_batch_us,
            DEFAULT_REPLICATION_ASYNC_BATCH_US
        );
    }

    #[test]
    fn topology_collects_all_errors_sorted() {
        let text = good_with("id = 7", "id = -1")
            .replacen("ip = \"10.10.0.3\"", "ip = \"10.10.0.2\"", 1)
            .replacen("size = \"1GiB\"", "size = 1", 1);
        let errs = errors_of(&text);
        let lines: Vec<u32> = errs.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![4, 27, 35], "{errs:?}");
    }

    #[test]
    fn topology_socket_path_limit() {
        let long = format!("/run/{}", "x".repeat(100));
        let text = good_with(
            "nbd_dir = \"/run/pipecloud/dom0-a\"",
            &format!("nbd_dir = \"{long}\""),
        );
        assert_error(
            &errors_of(&text),
            16,
            "host[0].nbd_dir",
            "Unix socket paths are limited",
        );
        let errs = errors_of(&text);
        assert_error(&errs, 16, "host[0].nbd_dir", "control socket");
        let text = good_with(
            "nbd_dir = \"/run/pipecloud/dom0-a\"",
            &format!("nbd_dir = \"/run/p\"\nctl_socket = \"{long}.sock\""),
        );
        let errs = errors_of(&text);
        assert_error(&errs, 17, "host[0].ctl_socket", "Unix socket path limit");
        assert_eq!(errs.len(), 1, "{errs:?}");
    }

    #[test]
    fn host_busy_poll_is_bounded() {
        let dir = "nbd_dir = \"/run/pipecloud/dom0-a\"";
        let t = Topology::parse(&good_with(dir, &format!("{dir}\nbusy_poll_us = 0")), "t")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.hosts[0].busy_poll_us, 0);
        let t = Topology::parse(&good_with(dir, &format!("{dir}\nbusy_poll_us = 50")), "t")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.hosts[0].busy_poll_us, 50);
        assert!(t.hosts[0].kernel_tagger, "on by default");
        let t = Topology::parse(
            &good_with(dir, &format!("{dir}\nkernel_tagger = false")),
            "t",
        )
        .unwrap();
        assert!(!t.hosts[0].kernel_tagger);
        let errs = errors_of(&good_with(dir, &format!("{dir}\nbusy_poll_us = 10001")));
        assert_error(&errs, 17, "host[0].busy_poll_us", "0..=10000");
        assert_eq!(errs.len(), 1, "{errs:?}");
    }

    #[test]
    fn host_metrics_listen_is_an_optional_socket_address() {
        let dir = "nbd_dir = \"/run/pipecloud/dom0-a\"";
        let t = Topology::parse(GOOD, "t").expect("valid");
        assert_eq!(t.hosts[0].metrics_listen, None, "off by default");
        assert!(t.summary().contains("metrics off"));
        let t = Topology::parse(
            &good_with(dir, &format!("{dir}\nmetrics_listen = \"127.0.0.1:9701\"")),
            "t",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            t.hosts[0].metrics_listen,
            Some("127.0.0.1:9701".parse().expect("addr"))
        );
        assert!(t
            .summary()
            .contains("metrics http://127.0.0.1:9701/metrics"));
        let t = Topology::parse(
            &good_with(dir, &format!("{dir}\nmetrics_listen = \"[::1]:0\"")),
            "t",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(t.hosts[0].metrics_listen.is_some_and(|a| a.is_ipv6()));
        for bad in ["\"localhost:9701\"", "\"127.0.0.1\"", "9701"] {
            let errs = errors_of(&good_with(dir, &format!("{dir}\nmetrics_listen = {bad}")));
            assert_error(&errs, 17, "host[0].metrics_listen", "IP:PORT");
            assert_eq!(errs.len(), 1, "{errs:?}");
        }
    }

    #[test]
    fn topology_module_doc_example_is_valid() {
        let source = include_str!("topology.rs");
        let example: String = source
            .lines()
            .skip_while(|l| *l != "//! ```toml")
            .skip(1)
            .take_while(|l| *l != "//! ```")
            .map(|l| format!("{}\n", l.trim_start_matches("//!").trim_start_matches(' ')))
            .collect();
        assert!(example.contains("[[disk]]"), "example not found");
        let t = Topology::parse(&example, "doc").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.writer_of("db"), Some(WriterId(0)));
        assert_eq!(t.policy.max_inflight_bytes, 64 << 20);
    }

    #[test]
    fn topology_helpers() {
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("1 G"), Some(1_000_000_000));
        assert_eq!(parse_size("512KB"), Some(512_000));
        assert_eq!(parse_size("4_096"), Some(4096));
        assert_eq!(parse_size("99999999999Ti"), None);
        assert_eq!(parse_size("MiB"), None);
        assert_eq!(parse_mac("02-00-00-00-00-0a"), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(parse_mac("02:00:00:00:00:00:00"), None);
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(1536 << 10), "1536 KiB");
        assert_eq!(format_size(1000), "1000 bytes");
        assert_eq!(
            "[fd00::2]:7800".parse::<Endpoint>().map(|e| e.to_string()),
            Ok("[fd00::2]:7800".to_owned())
        );
        assert_eq!(
            "backup.example:1".parse::<Endpoint>().map(|e| e.host),
            Ok("backup.example".to_owned())
        );
        assert!("fd00::2:7800".parse::<Endpoint>().is_err());
        for m in Mode::ALL {
            assert_eq!(m.as_str().parse::<Mode>(), Ok(m));
        }
        assert!(check_name(&"a".repeat(65)).is_err());
        assert!(check_name("db-data_1.img").is_ok());
    }
}
