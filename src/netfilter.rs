//! Netfilter rule management for the protected machines of one group on one host.
//!
//! The agent interposes on its guests' IPv4 traffic with `iptables -j NFQUEUE`
//! (the stand-in for Xen's netback hook, paper §4.2-§4.3). This module derives
//! the rules from the topology, installs them atomically (`iptables-restore
//! --noflush`, nf_tables backend), and removes them on exit (a [`RulesGuard`]
//! removes them when dropped) or, after a crash, on the next start
//! ([`RuleManager::install`] first clears whatever an earlier run left).
//!
//! # Emulation model (how hosts and machines are wired)
//!
//! Each protected machine is a network namespace (or a VM) with one veth to its
//! host's *dom0* namespace. dom0 routes (`net.ipv4.ip_forward=1`) between its
//! own machines, to other hosts' dom0s (in the two-host test a veth "wire"
//! between two dom0 namespaces) and to the client/WAN side. The agent runs in
//! dom0, so **every guest packet crosses dom0's FORWARD hook**, like Xen's
//! netback. The integration harness builds sites the same way.
//!
//! # The rules (table `mangle`, hook FORWARD)
//!
//! One chain per group, `PIPECLOUD-<group>`, jumped to from the top of
//! `mangle FORWARD`; every rule carries the comment `pipecloud:<group>`, which
//! is how removal finds them. For every local protected machine `L` and every
//! other protected machine `M` of the group (local or on another host), in both
//! directions where at least one end is local:
//!
//! ```text
//! # M on another host (both directions):
//! -A PIPECLOUD-g -s L -d M -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss <mss>
//! -A PIPECLOUD-g -s L -d M -j NFQUEUE --queue-num <tag queue>       (and -s M -d L)
//! # M on this host:
//! -A PIPECLOUD-g -s L -d M -j NFQUEUE --queue-num <local queue>
//! ```
//!
//! With the kernel tagger ([`crate::ebpf`], the agent's default) the pairs of
//! machines on different hosts pass what the eBPF program already tagged or
//! stripped (it sets the handled mark bit) and queue only the rest:
//!
//! ```text
//! -A PIPECLOUD-g -s L -d M -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss <mss>
//! -A PIPECLOUD-g -s L -d M -m mark --mark <bit>/<bit> -j RETURN       (and -s M -d L)
//! -A PIPECLOUD-g -s L -d M -j NFQUEUE --queue-num <tag queue>
//! ```
//!
//! then, for every local machine, everything else it sends leaves the group,
//! and last, whatever else arrives from the dom0-side interface that routes to
//! a local machine (a second address, a spoofed one) is held too:
//!
//! ```text
//! -A PIPECLOUD-g -s L -j NFQUEUE --queue-num <hold>   (or --queue-balance a:b)
//! -A PIPECLOUD-g -i <L's interface> -j NFQUEUE --queue-num <hold>
//! ```
//!
//! The same chain exists in `ip6tables`' `mangle FORWARD` (same name, same
//! comment, installed and removed together with the IPv4 one): every IPv6
//! packet forwarded from a local machine's interface goes to the hold queue,
//!
//! ```text
//! -A PIPECLOUD-g -i <L's interface> -j NFQUEUE --queue-num <hold>
//! ```
//!
//! where the agent attributes it to the machine(s) behind that interface by
//! its input interface (`netpath`). Nothing a protected machine sends out of
//! its host escapes both chains unqueued, except what the IPv4 rules hand to
//! the tag and local queues or the kernel tagger marked as handled.
//! Neighbour discovery and other link-local IPv6 is never forwarded, so it
//! never meets these rules.
//!
//! # IPv6 between protected machines: held, untagged
//!
//! IPv6 cannot carry the IPv4 tag option, so IPv6 between protected machines
//! is held in the hold queue with the sender's pending vector, like a
//! client-bound packet, and not merged at the receiver. That is safe: the
//! receiver only ever sees state the backup already holds, so what it computes
//! from it depends on nothing unreplicated, and each released vector is itself
//! a causally closed cut; the failover cut (the largest closed cut under the
//! journaled prefixes) still contains everything any client saw. The price is
//! one backup round trip per packet: use IPv4 between tiers.
//!
//! What the agent does on each queue (see `netpath`):
//!
//! - **tag queue**, sender local and receiver on another host: insert the
//!   sender's pending vector as the IPv4 option; the packet leaves on the wire
//!   tagged.
//! - **tag queue**, sender on another host and receiver local: merge the tag
//!   into the receiver's pending vector and **strip the option here in dom0**,
//!   before the receiver's stack sees it. Stripping in FORWARD (or mangle
//!   POSTROUTING) keeps TCP working; stripping in the receiver's own PREROUTING
//!   does not (its stack has already computed the transport header offset).
//! - **local queue** (both ends on this host): merge the sender's vector into
//!   the receiver's directly; the packet stays unchanged.
//! - **hold queue**: the packet is held in the netqueue with the sender's
//!   pending vector until the committed vector dominates it; it leaves
//!   unmodified (our option never reaches a client).
//!
//! Every protected machine's traffic leaving the group is held, not only that of
//! machines marked `outbound`: the flag says which machines are *expected* to
//! talk to clients, and a packet of any other machine that does leave must not
//! expose unreplicated state either.
//!
//! # Fail-closed
//!
//! No rule uses `--queue-bypass`: while no agent listens on a queue the kernel
//! drops its packets, and when the agent dies it drops every packet it was
//! holding. So nothing unreplicated leaks, and no inter-machine packet passes
//! without its tag (which could later let a dependent reply out early). The
//! kernel tagger keeps this: its links close with the agent, nothing gets the
//! handled mark any more, and every cross-host packet meets the tag queue rule.
//!
//! # What is never queued
//!
//! The agent's own replication and control traffic originates in dom0 itself
//! (OUTPUT chain, then POSTROUTING): it never traverses FORWARD, so none of
//! these rules can queue or delay it. Traffic between hosts that is not from a
//! protected machine matches no rule either. IPv6 is covered by the
//! `ip6tables` chain above; other protocols (ARP) are never forwarded.
//!
//! # MTU headroom
//!
//! A tag grows a packet by `8 + 4k` bytes (`k` non-zero vector entries, at most
//! the group's writers). SYNs between protected machines get their MSS clamped
//! to `mtu - 40 - (8 + 4k)` so full-sized tagged TCP segments still fit the
//! path MTU (measured: lowering the veth MTU instead drops bigger received frames). Non-TCP senders that
//! fill the MTU need a route MTU inside the guest (`ip route ... mtu 1460`).
//!
//! # GSO: which queues may see super-packets
//!
//! Only queues whose packets are never resized take GSO super-packets (the
//! local and hold queues). The tag queue is opened without `NFQA_CFG_F_GSO`, so
//! the kernel segments before queueing: after a verdict that changes the IPv4
//! header length in FORWARD, the skb's transport-header offset is stale, and
//! for a GSO skb the kernel's post-hook MTU check (`skb_gso_validate_network_len`)
//! then reads the TCP header length from the wrong bytes: depending on those
//! bytes (TCP timestamps, ports, tag values) the super-packet is judged too big
//! and every DF segment is refused with "fragmentation needed" (measured: a
//! 10 MB transfer between hosts stalled in about half the runs). Segmenting
//! first costs throughput between hosts (one verdict per MTU-sized packet),
//! never correctness. A real NIC doing TSO from that stale offset would build
//! broken segments too, so this holds beyond the emulation.
//!
//! So the tag queue is slow for bulk streams between hosts (measured with
//! `examples/netpath_bench.rs`; current figures in `docs/results.md`, "Network
//! path"). Two shortcuts fail (session-4 reading of the kernel code):
//! - a same-length rewrite of a GSO packet (option room inserted elsewhere,
//!   vector filled here) still breaks: `nfqnl_mangle` sets `CHECKSUM_NONE`, and
//!   a GSO skb delivered without segmentation to the receiver's stack then
//!   fails its TCP checksum (a forwarded one is re-checksummed by
//!   `tcp4_gso_segment`, a locally delivered one is not);
//! - GRO refuses IPv4 headers with options (`inet_gro_receive` wants IHL 5),
//!   so the receiving host sees every segment of a tagged stream anyway.
//!
//! What works, and is built: the kernel tagger ([`crate::ebpf`]), a TCX
//! program at the ingress of the interfaces leading to the group's machines,
//! resizing with `bpf_skb_adjust_room(BPF_ADJ_ROOM_NET)`, which keeps the
//! transport-header offset right and lowers `gso_size`. Super-packets cross
//! whole, at about the no-queue throughput and with no measurable latency added
//! per traversal (`docs/results.md`, "Network path"). The tag queue stays as
//! its fallback for what the program does not handle.
//!
//! # Kernel dependency
//!
//! Tagging and stripping rewrite the IPv4 header length through the NFQUEUE
//! verdict payload (measured to work on this kernel, docs/machine.md). An upstream patch
//! posted in June 2026 ("netfilter: nfnetlink_queue: restrict writes to network
//! header") rejects payloads whose IHL or options differ from the original; on
//! such a kernel the verdict fails and the kernel drops the packet: still
//! fail-closed, but no packet between protected machines on different hosts
//! would pass (`tests/netns_nfq.rs`, `two_host_tag_merge_strip`, detects it).
//! With the kernel tagger (default) only its fallbacks take that path: on such
//! a kernel they would be dropped (fragments, a receiver whose merges are
//! pending), which TCP survives but which would show as `tag_failures`.
//!
//! # Queue numbering
//!
//! Queues are per network namespace. Group `id` uses the block of 16 queues
//! starting at `16 * (id % 4096)`: the first is the tag queue (between hosts),
//! the second the local queue (same host), the following `2..=15` are hold
//! queues (`--queue-balance` spreads flows over them by a hash of the
//! addresses, so one flow always stays in one queue). Each queue holds at most
//! 65,536 packets (kernel limit), so more hold queues raise the host's
//! held-packet capacity.

use pipecloud_core::ipopt::MAX_TAG_ENTRIES;
use pipecloud_core::topology::{Mode, Topology};
use pipecloud_core::WriterId;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Longest iptables chain name (`XT_EXTENSION_MAXNAMELEN - 1`).
const MAX_CHAIN_NAME: usize = 28;
/// Prefix of every chain this agent owns.
pub const CHAIN_PREFIX: &str = "PIPECLOUD-";
/// Prefix of the comment every rule of this agent carries.
pub const COMMENT_PREFIX: &str = "pipecloud:";
/// Queues per group block (tag queue, local queue, up to 14 hold queues).
pub const QUEUES_PER_GROUP: u16 = 16;
/// Most hold queues per group.
pub const MAX_HOLD_QUEUES: u16 = QUEUES_PER_GROUP - 2;
/// Default path MTU between hosts and towards guests.
pub const DEFAULT_MTU: u16 = 1500;

/// One protected machine, as far as the network path cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetMachine {
    /// Machine name.
    pub name: String,
    /// Its IPv4 address (unique in the group).
    pub ip: Ipv4Addr,
    /// Host (dom0) that runs it.
    pub host: String,
    /// Expected to talk to clients.
    pub outbound: bool,
    /// Writer id if it owns protected disks.
    pub writer: Option<WriterId>,
}

/// The part of a topology the network path needs. Machine indices (positions in
/// `machines`) are the indices of [`crate::causal::CausalState`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetTopology {
    /// Group name (`[A-Za-z0-9_.-]`).
    pub group: String,
    /// Group id carried in the IPv4 option.
    pub group_id: u16,
    /// Most non-zero entries a tag of this group can have (writers, plus the
    /// epoch entry in checkpoint mode); sizes the MSS clamp.
    pub tag_entries: usize,
    /// Protected machines, in topology order.
    pub machines: Vec<NetMachine>,
}

impl NetTopology {
    /// The network view of a validated topology.
    pub fn from_topology(t: &Topology) -> NetTopology {
        let writers = t.machines.iter().filter(|m| m.writer.is_some()).count();
        let epoch = usize::from(t.group.mode == Mode::Checkpoint);
        NetTopology {
            group: t.group.name.clone(),
            group_id: t.group.id,
            tag_entries: (writers + epoch).min(MAX_TAG_ENTRIES),
            machines: t
                .machines
                .iter()
                .map(|m| NetMachine {
                    name: m.name.clone(),
                    ip: m.ip,
                    host: m.host.clone(),
                    outbound: m.outbound,
                    writer: m.writer,
                })
                .collect(),
        }
    }

    /// Machines running on `host`.
    pub fn local_machines<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a NetMachine> {
        self.machines.iter().filter(move |m| m.host == host)
    }
}

/// Queue numbers of one group on one host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueuePlan {
    /// Queue for packets between a local machine and one on another host
    /// (tag / merge + strip). Never takes GSO super-packets.
    pub tag: u16,
    /// Queue for packets between two local machines (direct merge).
    pub local: u16,
    /// First hold queue (client-bound packets).
    pub hold_first: u16,
    /// Number of hold queues (1..=[`MAX_HOLD_QUEUES`]).
    pub hold_count: u16,
}

impl QueuePlan {
    /// The block of group `group_id` with enough hold queues for `max_held`
    /// packets (65,536 per queue), at most [`MAX_HOLD_QUEUES`].
    pub fn for_group(group_id: u16, max_held: u64) -> QueuePlan {
        let base = (group_id % 4096) * QUEUES_PER_GROUP;
        let needed = max_held.div_ceil(u64::from(crate::nfq::KERNEL_MAX_QUEUE_LEN));
        let hold_count =
            u16::try_from(needed.clamp(1, u64::from(MAX_HOLD_QUEUES))).unwrap_or(MAX_HOLD_QUEUES);
        QueuePlan {
            tag: base,
            local: base + 1,
            hold_first: base + 2,
            hold_count,
        }
    }

    /// The hold queue numbers.
    pub fn hold_queues(&self) -> Vec<u16> {
        (0..self.hold_count).map(|i| self.hold_first + i).collect()
    }
}

/// Errors of rule management.
#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    /// A group name iptables cannot carry.
    #[error("group name `{0}` cannot be used in iptables chain names or comments")]
    BadGroupName(String),
    /// The host runs none of the group's machines.
    #[error("host `{host}` runs no machine of group `{group}`; nothing to protect")]
    NoLocalMachines { group: String, host: String },
    /// The queue plan is outside the 16-bit queue space or has no hold queue.
    #[error("invalid queue plan {0:?}")]
    BadQueuePlan(QueuePlan),
    /// The MTU leaves no room for a tagged TCP segment.
    #[error("MTU {mtu} too small for tagged packets")]
    MtuTooSmall { mtu: u16 },
    /// A local machine has no resolvable dom0-side interface.
    #[error("machine `{machine}` ({ip}): no interface routes to it: {source}")]
    NoLink {
        machine: String,
        ip: Ipv4Addr,
        #[source]
        source: std::io::Error,
    },
    /// A local machine has no entry in [`RuleConfig::links`].
    #[error("machine `{0}` has no interface in the rule configuration")]
    MissingLink(String),
    /// A command could not be started.
    #[error("cannot run `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    /// A command failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
}

/// The dom0-side interface that routes to one local protected machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineLink {
    /// Index of the machine in the topology.
    pub machine: usize,
    /// Interface name (in the host's network namespace).
    pub iface: String,
    /// Its interface index (`NFQA_IFINDEX_INDEV` of the machine's packets).
    pub ifindex: u32,
}

/// The interface `ip route get` names for `ip` (this thread's namespace).
pub fn route_device(ip: Ipv4Addr) -> std::io::Result<String> {
    let out = Command::new("ip")
        .args(["-o", "-4", "route", "get", &ip.to_string()])
        .output()
        .map_err(|e| std::io::Error::new(e.kind(), format!("running ip route get: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "dev" {
            if let Some(d) = words.next() {
                return Ok(d.to_owned());
            }
        }
    }
    Err(std::io::Error::other(format!(
        "no route to {ip}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// The index of interface `name` (this thread's namespace).
pub fn interface_index(name: &str) -> std::io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("interface {name}: {}", std::io::Error::last_os_error()),
        ));
    }
    Ok(ifindex)
}

/// The interface of every machine of `topo` on `host`, as routed in `netns`.
/// A local machine without a route is an error: its packets could not be
/// attributed, and the agent must not start without holding them.
pub fn resolve_links(
    topo: &NetTopology,
    host: &str,
    netns: Option<&Path>,
) -> Result<Vec<MachineLink>, NetfilterError> {
    let mut links = Vec::new();
    for (machine, m) in topo.machines.iter().enumerate() {
        if m.host != host {
            continue;
        }
        let resolved = crate::nfq::in_netns(netns, || {
            let iface = route_device(m.ip)?;
            let ifindex = interface_index(&iface)?;
            Ok(MachineLink {
                machine,
                iface,
                ifindex,
            })
        });
        match resolved {
            Ok(Ok(l)) => links.push(l),
            Ok(Err(source)) | Err(source) => {
                return Err(NetfilterError::NoLink {
                    machine: m.name.clone(),
                    ip: m.ip,
                    source,
                })
            }
        }
    }
    Ok(links)
}

/// Host-specific settings of the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleConfig {
    /// This host's name in the topology.
    pub host: String,
    /// Queue numbers.
    pub queues: QueuePlan,
    /// Path MTU of the guests and the wire (sizes the MSS clamp).
    pub mtu: u16,
    /// Network namespace to manage (`/run/netns/NAME`); `None`: the caller's.
    pub netns: Option<PathBuf>,
    /// The kernel tagger ([`crate::ebpf`]) handles cross-host pairs: packets
    /// it marked with these bits (handled) return from the chain, the rest of
    /// the pair's packets (its fallbacks, and any it never saw) go to the tag
    /// queue. `None`: every packet of a cross-host pair goes to the tag queue.
    pub kernel_tagger_mark: Option<u32>,
    /// The interface of every local machine ([`resolve_links`]): IPv6 and any
    /// other-source IPv4 from it is held.
    pub links: Vec<MachineLink>,
}

/// The rules of one group on one host.
#[derive(Clone, Debug)]
pub struct RuleManager {
    topo: NetTopology,
    cfg: RuleConfig,
    chain: String,
    comment: String,
    mss: u16,
}

/// The chain name of `group`: `PIPECLOUD-<group>`, or, when that exceeds
/// iptables' 28 characters, `PIPECLOUD-<first 9>-<8 hex digits of a hash>`.
pub fn chain_name(group: &str) -> String {
    let full = format!("{CHAIN_PREFIX}{group}");
    if full.len() <= MAX_CHAIN_NAME {
        return full;
    }
    // FNV-1a: stable across builds and platforms.
    let mut h: u32 = 0x811c_9dc5;
    for b in group.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let head: String = group.chars().take(9).collect();
    format!("{CHAIN_PREFIX}{head}-{h:08x}")
}

fn valid_group_name(group: &str) -> bool {
    !group.is_empty()
        && group.len() <= 200
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

impl RuleManager {
    /// Rules for `topo` on host `cfg.host`.
    pub fn new(topo: &NetTopology, cfg: RuleConfig) -> Result<RuleManager, NetfilterError> {
        if !valid_group_name(&topo.group) {
            return Err(NetfilterError::BadGroupName(topo.group.clone()));
        }
        if topo.local_machines(&cfg.host).next().is_none() {
            return Err(NetfilterError::NoLocalMachines {
                group: topo.group.clone(),
                host: cfg.host.clone(),
            });
        }
        for (i, m) in topo.machines.iter().enumerate() {
            if m.host == cfg.host && !cfg.links.iter().any(|l| l.machine == i) {
                return Err(NetfilterError::MissingLink(m.name.clone()));
            }
        }
        let q = cfg.queues;
        if q.hold_count == 0
            || q.hold_count > MAX_HOLD_QUEUES
            || u32::from(q.hold_first) + u32::from(q.hold_count) > 65_536
            || q.tag == q.local
            || [q.tag, q.local]
                .iter()
                .any(|x| (q.hold_first..q.hold_first.saturating_add(q.hold_count)).contains(x))
        {
            return Err(NetfilterError::BadQueuePlan(q));
        }
        let headroom = 40 + 8 + 4 * topo.tag_entries.min(MAX_TAG_ENTRIES);
        let mss = usize::from(cfg.mtu)
            .checked_sub(headroom)
            .filter(|m| *m >= 536)
            .ok_or(NetfilterError::MtuTooSmall { mtu: cfg.mtu })?;
        Ok(RuleManager {
            chain: chain_name(&topo.group),
            comment: format!("{COMMENT_PREFIX}{}", topo.group),
            topo: topo.clone(),
            mss: u16::try_from(mss).unwrap_or(536),
            cfg,
        })
    }

    /// The group's chain name.
    pub fn chain(&self) -> &str {
        &self.chain
    }

    /// The comment every rule carries.
    pub fn comment(&self) -> &str {
        &self.comment
    }

    /// The MSS SYNs between protected machines are clamped to.
    pub fn mss(&self) -> u16 {
        self.mss
    }

    /// The queue plan.
    pub fn queues(&self) -> QueuePlan {
        self.cfg.queues
    }

    /// The `-A` lines of the group's chain (iptables-restore syntax, no table
    /// header). Pure: what [`RuleManager::install`] loads.
    pub fn chain_rules(&self) -> String {
        let c = &self.chain;
        let m = format!("-m comment --comment \"{}\"", self.comment);
        let mut out = String::new();
        let local: Vec<&NetMachine> = self.topo.local_machines(&self.cfg.host).collect();
        let q = self.cfg.queues;
        let mut remote_pair = |src: Ipv4Addr, dst: Ipv4Addr| {
            let _ = writeln!(
                out,
                "-A {c} -s {src}/32 -d {dst}/32 -p tcp -m tcp --tcp-flags SYN,RST SYN {m} -j TCPMSS --set-mss {}",
                self.mss
            );
            match self.cfg.kernel_tagger_mark {
                None => {
                    let _ = writeln!(
                        out,
                        "-A {c} -s {src}/32 -d {dst}/32 {m} -j NFQUEUE --queue-num {}",
                        q.tag
                    );
                }
                Some(mark) => {
                    // Handled by the kernel tagger: passes (never the hold queue).
                    let _ = writeln!(
                        out,
                        "-A {c} -s {src}/32 -d {dst}/32 -m mark --mark {mark:#x}/{mark:#x} {m} -j RETURN"
                    );
                    let _ = writeln!(
                        out,
                        "-A {c} -s {src}/32 -d {dst}/32 {m} -j NFQUEUE --queue-num {}",
                        q.tag
                    );
                }
            }
        };
        for l in &local {
            for other in self
                .topo
                .machines
                .iter()
                .filter(|o| o.host != self.cfg.host)
            {
                remote_pair(l.ip, other.ip);
                remote_pair(other.ip, l.ip);
            }
        }
        for l in &local {
            for other in local.iter().filter(|o| o.ip != l.ip) {
                let _ = writeln!(
                    out,
                    "-A {c} -s {}/32 -d {}/32 {m} -j NFQUEUE --queue-num {}",
                    l.ip, other.ip, q.local
                );
            }
        }
        let hold = self.hold_target();
        for l in &local {
            if let Some(mark) = self.cfg.kernel_tagger_mark {
                // Passed by the kernel tagger: nothing to hold it for.
                let _ = writeln!(
                    out,
                    "-A {c} -s {}/32 -m mark --mark {mark:#x}/{mark:#x} {m} -j RETURN",
                    l.ip
                );
            }
            let _ = writeln!(out, "-A {c} -s {}/32 {m} -j NFQUEUE {hold}", l.ip);
        }
        // Any other source from a machine's interface (a second address, a
        // spoofed one): held, attributed to the machines behind it.
        out.push_str(&self.interface_rules(&hold));
        out
    }

    /// `-i <iface> -j NFQUEUE <hold>` for each distinct interface of the local
    /// machines (shared by both families).
    fn interface_rules(&self, hold: &str) -> String {
        let (c, mut out) = (&self.chain, String::new());
        let mut seen: Vec<&str> = Vec::new();
        for l in &self.cfg.links {
            if !seen.contains(&l.iface.as_str()) {
                seen.push(&l.iface);
                let _ = writeln!(
                    out,
                    "-A {c} -i {} -m comment --comment \"{}\" -j NFQUEUE {hold}",
                    l.iface, self.comment
                );
            }
        }
        out
    }

    /// The `-A` lines of the group's `ip6tables` chain: every IPv6 packet from
    /// a local machine's interface goes to the hold queue (module docs).
    pub fn chain_rules_v6(&self) -> String {
        self.interface_rules(&self.hold_target())
    }

    /// The NFQUEUE target arguments of the hold queue(s).
    fn hold_target(&self) -> String {
        let q = self.cfg.queues;
        if q.hold_count == 1 {
            format!("--queue-num {}", q.hold_first)
        } else {
            format!(
                "--queue-balance {}:{}",
                q.hold_first,
                q.hold_first + q.hold_count - 1
            )
        }
    }

    /// The whole iptables-restore (`--noflush`) input that replaces the group's
    /// rules, given the current `iptables-save -t mangle` output: the chain is
    /// declared (created, or flushed if it exists), refilled, and exactly one
    /// jump from FORWARD is left. Applied as one transaction.
    pub fn install_script(&self, current_mangle: &str) -> String {
        self.install_script_with(current_mangle, &self.chain_rules())
    }

    /// [`RuleManager::install_script`] for the `ip6tables` chain.
    pub fn install_script_v6(&self, current_mangle: &str) -> String {
        self.install_script_with(current_mangle, &self.chain_rules_v6())
    }

    fn install_script_with(&self, current_mangle: &str, rules: &str) -> String {
        let mut s = String::from("*mangle\n");
        let _ = writeln!(s, ":{} - [0:0]", self.chain);
        for line in foreign_references(current_mangle, &self.comment, &[self.chain.as_str()]) {
            let _ = writeln!(s, "-D{}", &line[2..]);
        }
        s.push_str(rules);
        let _ = writeln!(
            s,
            "-I FORWARD 1 -m comment --comment \"{}\" -j {}",
            self.comment, self.chain
        );
        s.push_str("COMMIT\n");
        s
    }

    /// Installs (or replaces) the group's rules in one transaction. Rules left
    /// by an earlier run (e.g. after a crash) are replaced, so calling this
    /// twice leaves one copy. Returns a guard that removes them when dropped.
    pub fn install(&self) -> Result<RulesGuard, NetfilterError> {
        let netns = self.cfg.netns.as_deref();
        let current = save_mangle(netns, Family::V4)?;
        restore(netns, Family::V4, &self.install_script(&current))?;
        let v6 = save_mangle(netns, Family::V6)
            .and_then(|current| restore(netns, Family::V6, &self.install_script_v6(&current)));
        if let Err(e) = v6 {
            // Never leave IPv4 held and IPv6 open: take both down, report.
            if let Err(r) = self.remove() {
                tracing::error!(error = %r, "removing the IPv4 rules after the IPv6 ones failed");
            }
            return Err(e);
        }
        tracing::info!(
            chain = %self.chain,
            tag_queue = self.cfg.queues.tag,
            local_queue = self.cfg.queues.local,
            hold_queues = ?self.cfg.queues.hold_queues(),
            mss = self.mss,
            "netfilter rules installed"
        );
        Ok(RulesGuard {
            manager: Some(self.clone()),
        })
    }

    /// Removes the group's rules (jumps from other chains, then its chain).
    /// Succeeds when there is nothing to remove.
    pub fn remove(&self) -> Result<(), NetfilterError> {
        remove_group(self.cfg.netns.as_deref(), &self.topo.group)
    }

    /// Whether the group's chain exists now.
    pub fn is_installed(&self) -> Result<bool, NetfilterError> {
        let current = save_mangle(self.cfg.netns.as_deref(), Family::V4)?;
        let installed = declared_chains(&current).any(|c| c == self.chain);
        Ok(installed)
    }
}

/// `-A` lines of chains not in `own` whose comment is exactly `comment`.
fn foreign_references<'a>(
    saved: &'a str,
    comment: &'a str,
    own: &'a [&'a str],
) -> impl Iterator<Item = &'a str> + 'a {
    saved.lines().filter(move |line| {
        let Some(rest) = line.strip_prefix("-A ") else {
            return false;
        };
        let chain = rest.split_whitespace().next().unwrap_or("");
        !own.contains(&chain) && has_comment(line, comment)
    })
}

/// Whether an iptables-save line carries exactly `--comment <comment>`.
fn has_comment(line: &str, comment: &str) -> bool {
    let quoted = format!("--comment \"{comment}\"");
    let bare = format!("--comment {comment}");
    [quoted, bare].iter().any(|pat| {
        line.match_indices(pat.as_str()).any(|(i, _)| {
            let after = &line[i + pat.len()..];
            after.is_empty() || after.starts_with(' ')
        })
    })
}

/// User chains declared in an iptables-save table dump.
fn declared_chains(saved: &str) -> impl Iterator<Item = &str> {
    saved.lines().filter_map(|l| {
        let name = l.strip_prefix(':')?.split_whitespace().next()?;
        Some(name)
    })
}

/// The restore script that removes the rules and chain of `group` (or, for
/// `None`, of every group and every `PIPECLOUD-` chain); `None` when there is
/// nothing to remove.
fn removal_script(saved: &str, group: Option<&str>) -> Option<String> {
    let pick = |g: &str| group.is_none_or(|want| want == g);
    let mut groups: Vec<&str> = Vec::new();
    for line in saved.lines().filter(|l| l.starts_with("-A ")) {
        if let Some(g) = comment_group(line) {
            if pick(g) && !groups.contains(&g) {
                groups.push(g);
            }
        }
    }
    let doomed: Vec<&str> = declared_chains(saved)
        .filter(|c| match group {
            Some(g) => *c == chain_name(g),
            None => c.starts_with(CHAIN_PREFIX),
        })
        .collect();
    let mut s = String::from("*mangle\n");
    let mut any = false;
    for g in &groups {
        let comment = format!("{COMMENT_PREFIX}{g}");
        for line in foreign_references(saved, &comment, &doomed) {
            let _ = writeln!(s, "-D{}", &line[2..]);
            any = true;
        }
    }
    for c in &doomed {
        let _ = writeln!(s, "-F {c}\n-X {c}");
        any = true;
    }
    s.push_str("COMMIT\n");
    any.then_some(s)
}

/// The group named by a `pipecloud:<group>` comment on an iptables-save line.
fn comment_group(line: &str) -> Option<&str> {
    let i = line.find("--comment ")?;
    let rest = &line[i + "--comment ".len()..];
    let rest = rest.strip_prefix('"').unwrap_or(rest);
    let rest = rest.strip_prefix(COMMENT_PREFIX)?;
    let end = rest.find(['"', ' ']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// Removes every rule and chain of `group` in namespace `netns` (both families;
/// both are tried even when one fails, the first error is returned).
pub fn remove_group(netns: Option<&Path>, group: &str) -> Result<(), NetfilterError> {
    let mut first = Ok(());
    for family in [Family::V4, Family::V6] {
        let r = save_mangle(netns, family).and_then(|saved| {
            match removal_script(&saved, Some(group)) {
                Some(script) => restore(netns, family, &script),
                None => Ok(()),
            }
        });
        if first.is_ok() {
            first = r;
        }
    }
    if first.is_ok() {
        tracing::info!(group, "netfilter rules removed");
    }
    first
}

/// Removes the rules and chains of **every** group (stale state of any earlier
/// agent) in namespace `netns`.
pub fn remove_all(netns: Option<&Path>) -> Result<(), NetfilterError> {
    for family in [Family::V4, Family::V6] {
        let saved = save_mangle(netns, family)?;
        if let Some(script) = removal_script(&saved, None) {
            restore(netns, family, &script)?;
        }
    }
    Ok(())
}

/// Counts the rules this agent owns (any group, both families) in namespace `netns`.
pub fn count_rules(netns: Option<&Path>) -> Result<usize, NetfilterError> {
    let mut n = 0;
    for family in [Family::V4, Family::V6] {
        let saved = save_mangle(netns, family)?;
        n += saved
            .lines()
            .filter(|l| l.starts_with("-A ") && comment_group(l).is_some())
            .count();
    }
    Ok(n)
}

/// Which netfilter family (`iptables` or `ip6tables`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
}

fn save_mangle(netns: Option<&Path>, family: Family) -> Result<String, NetfilterError> {
    run(netns, family.save(), &["-t", "mangle"], None)
}

fn restore(netns: Option<&Path>, family: Family, script: &str) -> Result<(), NetfilterError> {
    run(netns, family.restore(), &["--noflush"], Some(script)).map(|_| ())
}

/// Runs `prog args` inside `netns`, feeding `stdin`; returns its stdout.
fn run(
    netns: Option<&Path>,
    prog: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, NetfilterError> {
    let cmd = format!("{prog} {}", args.join(" "));
    let spawn_err = |source| NetfilterError::Spawn {
        cmd: cmd.clone(),
        source,
    };
    let output = crate::nfq::in_netns(netns, || {
        let mut child = Command::new(prog)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())?;
        }
        child.wait_with_output()
    })
    .map_err(spawn_err)?
    .map_err(spawn_err)?;
    if !output.status.success() {
        return Err(NetfilterError::Command {
            cmd,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Removes the group's rules when dropped (unless [`RulesGuard::keep`] was called).
#[derive(Debug)]
pub struct RulesGuard {
    manager: Option<RuleManager>,
}

impl RulesGuard {
    /// Removes the rules now and reports the result.
    pub fn remove(mut self) -> Result<(), NetfilterError> {
        match self.manager.take() {
            Some(m) => m.remove(),
            None => Ok(()),
        }
    }

    /// Leaves the rules installed when the guard is dropped (fail-closed
    /// hand-over: the packets stay blocked until the next agent starts).
    pub fn keep(mut self) {
        self.manager = None;
    }
}

impl Drop for RulesGuard {
    fn drop(&mut self) {
        if let Some(m) = self.manager.take() {
            if let Err(e) = m.remove() {
                tracing::error!(error = %e, chain = %m.chain, "removing netfilter rules failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo() -> NetTopology {
        let m = |name: &str, ip: [u8; 4], host: &str, outbound: bool, w: Option<u8>| NetMachine {
            name: name.into(),
            ip: Ipv4Addr::from(ip),
            host: host.into(),
            outbound,
            writer: w.map(WriterId),
        };
        NetTopology {
            group: "shop".into(),
            group_id: 3,
            tag_entries: 2,
            machines: vec![
                m("web", [10, 1, 1, 2], "a", true, None),
                m("app", [10, 1, 1, 3], "a", false, Some(0)),
                m("db", [10, 1, 2, 2], "b", false, Some(1)),
            ],
        }
    }

    /// web and app share host a's bridge `br0`; db has `vb0` on host b.
    fn links(host: &str) -> Vec<MachineLink> {
        let l = |machine, iface: &str, ifindex| MachineLink {
            machine,
            iface: iface.into(),
            ifindex,
        };
        match host {
            "a" => vec![l(0, "br0", 7), l(1, "br0", 7)],
            "b" => vec![l(2, "vb0", 9)],
            _ => vec![],
        }
    }

    fn manager(host: &str) -> RuleManager {
        manager_with(host, 65_536, None)
    }

    fn manager_with(host: &str, max_held: u64, kernel_tagger_mark: Option<u32>) -> RuleManager {
        RuleManager::new(
            &topo(),
            RuleConfig {
                host: host.into(),
                queues: QueuePlan::for_group(3, max_held),
                mtu: 1500,
                netns: None,
                kernel_tagger_mark,
                links: links(host),
            },
        )
        .unwrap()
    }

    #[test]
    fn queue_plan_blocks() {
        let p = QueuePlan::for_group(3, 65_536);
        assert_eq!(
            (p.tag, p.local, p.hold_first, p.hold_count),
            (48, 49, 50, 1)
        );
        assert_eq!(
            QueuePlan::for_group(0, 200_000).hold_queues(),
            vec![2, 3, 4, 5]
        );
        assert_eq!(QueuePlan::for_group(4095, u64::MAX).hold_count, 14);
        assert_eq!(
            QueuePlan::for_group(4095, u64::MAX).hold_queues().last(),
            Some(&65_535)
        );
        assert_eq!(QueuePlan::for_group(4095, 1).tag, 65_520);
    }

    #[test]
    fn chain_names_fit_iptables() {
        assert_eq!(chain_name("shop"), "PIPECLOUD-shop");
        let long = chain_name("a-very-long-group-name-indeed");
        assert!(long.len() <= MAX_CHAIN_NAME, "{long}");
        assert_ne!(long, chain_name("a-very-long-group-name-indeeD"));
    }

    #[test]
    fn rules_for_host_a() {
        let m = manager("a");
        assert_eq!(m.mss(), 1500 - 40 - 16);
        let rules = m.chain_rules();
        let lines: Vec<&str> = rules.lines().collect();
        // web->db, db->web, app->db, db->app: 4 remote pairs, 2 lines each;
        // web->app, app->web: 2 local lines; 2 hold rules; 1 rule for the
        // interface both share.
        assert_eq!(lines.len(), 4 * 2 + 2 + 2 + 1, "{rules}");
        assert!(rules.contains(
            "-A PIPECLOUD-shop -s 10.1.2.2/32 -d 10.1.1.2/32 -m comment --comment \"pipecloud:shop\" -j NFQUEUE --queue-num 48"
        ));
        assert!(rules.contains("-s 10.1.1.2/32 -d 10.1.2.2/32 -p tcp -m tcp --tcp-flags SYN,RST SYN -m comment --comment \"pipecloud:shop\" -j TCPMSS --set-mss 1444"));
        assert!(rules.contains(
            "-A PIPECLOUD-shop -s 10.1.1.2/32 -d 10.1.1.3/32 -m comment --comment \"pipecloud:shop\" -j NFQUEUE --queue-num 49"
        ));
        assert!(
            !rules.contains("-s 10.1.1.2/32 -d 10.1.1.3/32 -p tcp"),
            "no clamp between local machines"
        );
        assert!(rules.contains("-A PIPECLOUD-shop -s 10.1.1.3/32 -m comment --comment \"pipecloud:shop\" -j NFQUEUE --queue-num 50"));
        // Fail-closed: never a bypass.
        assert!(!rules.contains("bypass"));
        // Hold rules come after every inter-machine rule, the interface
        // catch-all last.
        let first_hold = lines.iter().position(|l| !l.contains(" -d ")).unwrap();
        assert!(lines[first_hold..].iter().all(|l| !l.contains(" -d ")));
        assert_eq!(
            lines.last().copied(),
            Some("-A PIPECLOUD-shop -i br0 -m comment --comment \"pipecloud:shop\" -j NFQUEUE --queue-num 50")
        );
        assert_eq!(rules.matches(" -i ").count(), 1);
        // Every rule is tagged with the group comment.
        assert!(lines
            .iter()
            .all(|l| l.contains("--comment \"pipecloud:shop\"")));
    }

    #[test]
    fn kernel_tagger_rules_pass_only_marked_packets() {
        let m = manager_with("a", 65_536, Some(0x0200_0000));
        let rules = m.chain_rules();
        let lines: Vec<&str> = rules.lines().collect();
        // 4 remote pairs, 3 lines each (clamp, return if marked, tag queue);
        // 2 local lines; 2 hold rules, each after a return-if-marked; the
        // interface catch-all, never passed on a mark.
        assert_eq!(lines.len(), 4 * 3 + 2 + 2 * 2 + 1, "{rules}");
        assert!(lines
            .last()
            .is_some_and(|l| l.contains("-i br0 ") && !l.contains("mark")));
        let pair = "-A PIPECLOUD-shop -s 10.1.1.2/32 -d 10.1.2.2/32";
        let passed = lines
            .iter()
            .position(|l| l.starts_with(pair) && l.ends_with("-j RETURN"))
            .expect("return rule");
        assert!(lines[passed].contains("-m mark --mark 0x2000000/0x2000000"));
        assert!(lines[passed + 1].starts_with(pair));
        assert!(
            lines[passed + 1].ends_with("-j NFQUEUE --queue-num 48")
                && !lines[passed + 1].contains("mark"),
            "every unmarked packet of the pair goes to the tag queue"
        );
        let hold = lines
            .iter()
            .position(|l| l.contains("-s 10.1.1.2/32 -m comment"))
            .unwrap();
        assert!(hold > passed + 1, "the pair is done before the hold rule");
    }

    #[test]
    fn ipv6_rules_queue_everything_from_the_machines_interfaces() {
        let v6 = manager("a").chain_rules_v6();
        assert_eq!(
            v6,
            "-A PIPECLOUD-shop -i br0 -m comment --comment \"pipecloud:shop\" -j NFQUEUE --queue-num 50\n"
        );
        assert!(!v6.contains("bypass"), "fail-closed");
        let s = manager("a").install_script_v6(SAVED);
        assert!(s.starts_with("*mangle\n:PIPECLOUD-shop - [0:0]\n"));
        assert!(s.contains(&v6));
        assert!(s.ends_with(
            "-I FORWARD 1 -m comment --comment \"pipecloud:shop\" -j PIPECLOUD-shop\nCOMMIT\n"
        ));
        let b = manager_with("b", 3 * 65_536, None);
        assert_eq!(
            b.chain_rules_v6(),
            "-A PIPECLOUD-shop -i vb0 -m comment --comment \"pipecloud:shop\" -j NFQUEUE --queue-balance 50:52\n"
        );
    }

    #[test]
    fn every_local_machine_needs_an_interface() {
        let mut cfg = RuleConfig {
            host: "a".into(),
            queues: QueuePlan::for_group(3, 1),
            mtu: 1500,
            netns: None,
            kernel_tagger_mark: None,
            links: links("a"),
        };
        cfg.links.remove(1);
        assert!(matches!(
            RuleManager::new(&topo(), cfg),
            Err(NetfilterError::MissingLink(m)) if m == "app"
        ));
    }

    #[test]
    fn multiple_hold_queues_balance() {
        let m = manager_with("b", 3 * 65_536, None);
        assert!(m
            .chain_rules()
            .contains("-s 10.1.2.2/32 -m comment --comment \"pipecloud:shop\" -j NFQUEUE --queue-balance 50:52"));
    }

    #[test]
    fn rejects_bad_inputs() {
        let cfg = |host: &str, mtu| RuleConfig {
            host: host.into(),
            queues: QueuePlan::for_group(3, 1),
            mtu,
            netns: None,
            kernel_tagger_mark: None,
            links: links(host),
        };
        assert!(matches!(
            RuleManager::new(&topo(), cfg("nowhere", 1500)),
            Err(NetfilterError::NoLocalMachines { .. })
        ));
        assert!(matches!(
            RuleManager::new(&topo(), cfg("a", 560)),
            Err(NetfilterError::MtuTooSmall { .. })
        ));
        let mut t = topo();
        t.group = "bad\"name".into();
        assert!(matches!(
            RuleManager::new(&t, cfg("a", 1500)),
            Err(NetfilterError::BadGroupName(_))
        ));
        let mut c = cfg("a", 1500);
        c.queues.tag = c.queues.hold_first;
        assert!(matches!(
            RuleManager::new(&topo(), c),
            Err(NetfilterError::BadQueuePlan(_))
        ));
    }

    const SAVED: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:PIPECLOUD-shop - [0:0]
:PIPECLOUD-shop2 - [0:0]
-A FORWARD -m comment --comment \"pipecloud:shop2\" -j PIPECLOUD-shop2
-A FORWARD -m comment --comment \"pipecloud:shop\" -j PIPECLOUD-shop
-A FORWARD -s 10.9.9.9/32 -m comment --comment \"pipecloud:shop\" -j ACCEPT
-A FORWARD -m comment --comment \"someone else\" -j ACCEPT
-A PIPECLOUD-shop -s 10.1.1.2/32 -m comment --comment \"pipecloud:shop\" -j NFQUEUE --queue-num 49
-A PIPECLOUD-shop2 -s 10.1.1.7/32 -m comment --comment \"pipecloud:shop2\" -j NFQUEUE --queue-num 50
COMMIT
";

    #[test]
    fn install_script_replaces_stale_rules_atomically() {
        let s = manager("a").install_script(SAVED);
        assert!(s.starts_with("*mangle\n:PIPECLOUD-shop - [0:0]\n"));
        assert!(
            s.contains("-D FORWARD -m comment --comment \"pipecloud:shop\" -j PIPECLOUD-shop\n")
        );
        assert!(s.contains(
            "-D FORWARD -s 10.9.9.9/32 -m comment --comment \"pipecloud:shop\" -j ACCEPT\n"
        ));
        assert!(!s.contains("-D FORWARD -m comment --comment \"pipecloud:shop2\""));
        assert!(!s.contains("someone else"));
        assert_eq!(s.matches("-I FORWARD 1").count(), 1);
        assert!(s.ends_with("COMMIT\n"));
    }

    #[test]
    fn removal_touches_only_the_named_group() {
        let s = removal_script(SAVED, Some("shop")).unwrap();
        assert_eq!(
            s,
            "*mangle\n\
             -D FORWARD -m comment --comment \"pipecloud:shop\" -j PIPECLOUD-shop\n\
             -D FORWARD -s 10.9.9.9/32 -m comment --comment \"pipecloud:shop\" -j ACCEPT\n\
             -F PIPECLOUD-shop\n-X PIPECLOUD-shop\nCOMMIT\n"
        );
        let all = removal_script(SAVED, None).unwrap();
        assert!(all.contains("-X PIPECLOUD-shop\n") && all.contains("-X PIPECLOUD-shop2\n"));
        assert!(!all.contains("someone else"));
        assert_eq!(removal_script("*mangle\nCOMMIT\n", None), None);
    }

    #[test]
    fn comment_matching_is_exact() {
        assert!(has_comment(
            "-A X -m comment --comment \"pipecloud:a\" -j Y",
            "pipecloud:a"
        ));
        assert!(!has_comment(
            "-A X -m comment --comment \"pipecloud:ab\" -j Y",
            "pipecloud:a"
        ));
        assert!(has_comment(
            "-A X -m comment --comment pipecloud:a -j Y",
            "pipecloud:a"
        ));
        assert_eq!(
            comment_group("-A X -m comment --comment \"pipecloud:a.b\" -j Y"),
            Some("a.b")
        );
        assert_eq!(
            comment_group("-A X -m comment --comment pipecloud:a"),
            Some("a")
        );
        assert_eq!(comment_group("-A X -j Y"), None);
    }
}
