//! The `[machine.vm]` section: a protected machine that is a QEMU guest.
//!
//! A machine with a `vm` table is a guest that `pipecloud vm start` launches
//! from the topology and that the agent can checkpoint (full-state mode,
//! docs/design.md §13): its RAM lives in a shared memory file the agent can read
//! (`ram_file`, `ram_mib`), QEMU answers on a QMP socket (`qmp`), its disks are
//! the machine's `[[disk]]`s served by the agent's NBD export, and its NIC is a
//! tap device on the machine's host (`tap`), so its packets cross the agent's
//! rules like any protected machine's. A machine without one (a container, a VM
//! started by other means) is protected as before in `async`, `sync` and
//! `pipelined`; a `checkpoint` group needs every machine to be a guest, because
//! every machine of the group pauses for the same epoch.
//!
//! ```toml
//! [machine.vm]                  # after the machine's [[machine]] table
//! kernel = "guest/vmlinux"      # required; relative paths: relative to the topology file
//! initrd = "guest/initrd.cpio"  # optional
//! append = "console=ttyS0"      # optional kernel command line (the launcher adds the address)
//! ram_mib = 256                 # 16..=1048576 (default 256)
//! cpus = 1                      # 1..=64 (default 1)
//! platform = "microvm"          # microvm (default) | q35
//! qemu = "qemu-system-x86_64"   # binary: a name looked up in PATH, or a path (default)
//! tap = "pc-web"                # host-side NIC, 1..=15 characters (default "pc-<machine>")
//! prefix_len = 24               # the guest's address is ip/prefix_len (default 24)
//! gateway = "10.10.0.1"         # optional default gateway (absent: default route on the NIC)
//! qmp = "/run/pipecloud/dom0-a/web.qmp"       # default <nbd_dir>/<machine>.qmp
//! ram_file = "/dev/shm/pipecloud-shop-web.ram" # default /dev/shm/pipecloud-<group>-<machine>.ram
//! pidfile = "/run/pipecloud/dom0-a/web.pid"   # default <nbd_dir>/<machine>.pid
//! extra_args = []               # appended to the QEMU command line as they are
//! ```
//!
//! The reading here checks each value; the rules across machines (a tap name
//! once per host, a QMP socket, RAM file and pid file once per group, every
//! machine a guest in `checkpoint` mode) are in [`check_vms`].

use super::convert::{conv_abs_path, conv_int_range, conv_ipv4, conv_path};
use super::document::{as_table, At, Node, TableReader};
use super::error::Cx;
use super::model::MAX_UNIX_SOCKET_PATH;
use super::read::{RawHost, RawMachine};
use crate::mode::Mode;
use crate::wire::MAX_GUEST_RAM;
use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Default `vm.ram_mib`.
pub const DEFAULT_VM_RAM_MIB: u64 = 256;
/// Smallest `vm.ram_mib` (a kernel and a busybox userland fit in 16 MiB).
pub const MIN_VM_RAM_MIB: u64 = 16;
/// Largest `vm.ram_mib`: the checkpoint frames' guest RAM limit.
pub const MAX_VM_RAM_MIB: u64 = MAX_GUEST_RAM >> 20;
/// Default `vm.cpus`.
pub const DEFAULT_VM_CPUS: u64 = 1;
/// Largest `vm.cpus`.
pub const MAX_VM_CPUS: u64 = 64;
/// Default `vm.prefix_len`.
pub const DEFAULT_VM_PREFIX_LEN: u8 = 24;
/// Default `vm.qemu`.
pub const DEFAULT_VM_QEMU: &str = "qemu-system-x86_64";
/// Default `vm.append`.
pub const DEFAULT_VM_APPEND: &str = "console=ttyS0 panic=-1";
/// Longest network interface name (`IFNAMSIZ` less the NUL).
pub const MAX_IFNAME_LEN: usize = 15;
/// Most `vm.extra_args`.
pub const MAX_VM_EXTRA_ARGS: usize = 256;

/// QEMU's machine type for a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    /// `-machine microvm`: no PCI, no firmware tables, virtio-mmio devices;
    /// the fastest boot and the smallest device state (docs/machine.md).
    Microvm,
    /// `-machine q35`: a PC with PCI, for guests that need one.
    Q35,
}

impl Platform {
    /// The name in files and on QEMU's command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Microvm => "microvm",
            Platform::Q35 => "q35",
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A machine that is a QEMU guest: what the launcher and the agent need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vm {
    /// Guest RAM in MiB (`MIN_VM_RAM_MIB..=MAX_VM_RAM_MIB`).
    pub ram_mib: u64,
    /// Virtual CPUs.
    pub cpus: u64,
    /// QEMU machine type.
    pub platform: Platform,
    /// QEMU binary: a bare name is looked up in `PATH`.
    pub qemu: PathBuf,
    /// Kernel image; relative paths are relative to the topology file.
    pub kernel: PathBuf,
    /// Initial RAM disk, same rule.
    pub initrd: Option<PathBuf>,
    /// Kernel command line given by the operator.
    pub append: String,
    /// Host-side tap device of the guest's NIC (on the machine's host).
    pub tap: String,
    /// Prefix length of the guest's address.
    pub prefix_len: u8,
    /// The guest's default gateway (`None`: a default route on its NIC).
    pub gateway: Option<Ipv4Addr>,
    /// QEMU's QMP Unix socket.
    pub qmp: PathBuf,
    /// The shared file that holds guest RAM (`memory-backend-file`, `share=on`).
    pub ram_file: PathBuf,
    /// QEMU's pid file.
    pub pidfile: PathBuf,
    /// Arguments appended to the QEMU command line as they are.
    pub extra_args: Vec<String>,
}

impl Vm {
    /// Guest RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram_mib << 20
    }

    /// One-line human summary for `topology check`.
    pub fn summary(&self) -> String {
        format!(
            "vm {} MiB x{} cpu {}, qemu {}, kernel {}{}, tap {}, qmp {}, ram {}",
            self.ram_mib,
            self.cpus,
            self.platform,
            self.qemu.display(),
            self.kernel.display(),
            self.initrd
                .as_ref()
                .map(|i| format!(", initrd {}", i.display()))
                .unwrap_or_default(),
            self.tap,
            self.qmp.display(),
            self.ram_file.display()
        )
    }
}

/// `pc-<machine>`: the default tap name (may be too long; [`check_vms`] says so).
pub fn default_tap(machine: &str) -> String {
    format!("pc-{machine}")
}

/// `<nbd_dir>/<machine>.qmp`.
pub fn default_qmp(nbd_dir: &Path, machine: &str) -> PathBuf {
    nbd_dir.join(format!("{machine}.qmp"))
}

/// `/dev/shm/pipecloud-<group>-<machine>.ram`.
pub fn default_ram_file(group: &str, machine: &str) -> PathBuf {
    PathBuf::from(format!("/dev/shm/pipecloud-{group}-{machine}.ram"))
}

/// `<nbd_dir>/<machine>.pid`.
pub fn default_pidfile(nbd_dir: &Path, machine: &str) -> PathBuf {
    nbd_dir.join(format!("{machine}.pid"))
}

const VM_KEYS: &[&str] = &[
    "kernel",
    "initrd",
    "append",
    "ram_mib",
    "cpus",
    "platform",
    "qemu",
    "tap",
    "prefix_len",
    "gateway",
    "qmp",
    "ram_file",
    "pidfile",
    "extra_args",
];

/// A `[machine.vm]` table as read, each value with its span.
pub(super) struct RawVm {
    pub(super) span: Range<usize>,
    pub(super) field: String,
    pub(super) kernel: Option<At<PathBuf>>,
    pub(super) initrd: Option<At<PathBuf>>,
    pub(super) append: Option<At<String>>,
    pub(super) ram_mib: Option<At<u64>>,
    pub(super) cpus: Option<At<u64>>,
    pub(super) platform: Option<At<Platform>>,
    pub(super) qemu: Option<At<PathBuf>>,
    pub(super) tap: Option<At<String>>,
    pub(super) prefix_len: Option<At<u64>>,
    pub(super) gateway: Option<At<Ipv4Addr>>,
    pub(super) qmp: Option<At<PathBuf>>,
    pub(super) ram_file: Option<At<PathBuf>>,
    pub(super) pidfile: Option<At<PathBuf>>,
    pub(super) extra_args: Option<At<Vec<String>>>,
}

fn conv_platform(node: &Node) -> Result<Platform, String> {
    match node {
        Node::Str(s) if s == "microvm" => Ok(Platform::Microvm),
        Node::Str(s) if s == "q35" => Ok(Platform::Q35),
        Node::Str(s) => Err(format!("unknown platform `{s}`")),
        other => Err(format!("found {}", other.kind())),
    }
}

fn conv_cmdline(node: &Node) -> Result<String, String> {
    match node {
        Node::Str(s) if s.contains(['\0', '\n']) => {
            Err("the command line contains a NUL or a newline".to_owned())
        }
        Node::Str(s) => Ok(s.clone()),
        other => Err(format!("found {}", other.kind())),
    }
}

fn conv_ifname(node: &Node) -> Result<String, String> {
    let Node::Str(s) = node else {
        return Err(format!("found {}", node.kind()));
    };
    check_ifname(s)?;
    Ok(s.clone())
}

/// A usable Linux interface name: 1..=15 bytes of `[A-Za-z0-9_.-]`, not `.`/`..`.
fn check_ifname(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_IFNAME_LEN {
        return Err(format!("`{s}` is {} bytes long", s.len()));
    }
    if s == "." || s == ".." {
        return Err(format!("`{s}` is not an interface name"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!("`{s}` contains {c:?}"));
    }
    Ok(())
}

fn conv_args(node: &Node) -> Result<Vec<String>, String> {
    let Node::Array(items) = node else {
        return Err(format!("found {}", node.kind()));
    };
    if items.len() > MAX_VM_EXTRA_ARGS {
        return Err(format!("{} arguments", items.len()));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item.get_ref() {
            Node::Str(s) if s.contains('\0') => Err(format!("argument {i} contains a NUL byte")),
            Node::Str(s) => Ok(s.clone()),
            other => Err(format!("argument {i} is {}", other.kind())),
        })
        .collect()
}

/// Reads the `vm` table of machine `i` (`node` is the value of its `vm` key).
pub(super) fn parse_vm(cx: &mut Cx<'_>, i: usize, node: &Spanned<Node>) -> Option<RawVm> {
    let field = format!("machine[{i}].vm");
    let table = as_table(cx, node, &field, "a table, written `[machine.vm]`")?;
    let mut t = TableReader::new(field.clone(), node.span(), table, VM_KEYS);
    let kernel = t.required(
        cx,
        "kernel",
        "the path of the guest's kernel image",
        conv_path,
    );
    let initrd = t.optional(
        cx,
        "initrd",
        "the path of the guest's initial RAM disk",
        conv_path,
    );
    let append = t.optional(
        cx,
        "append",
        "the kernel command line, one line",
        conv_cmdline,
    );
    let ram_mib = t.optional(
        cx,
        "ram_mib",
        &format!("guest RAM in MiB, an integer in {MIN_VM_RAM_MIB}..={MAX_VM_RAM_MIB}"),
        |n| conv_int_range(n, MIN_VM_RAM_MIB as i64, MAX_VM_RAM_MIB as i64),
    );
    let cpus = t.optional(
        cx,
        "cpus",
        &format!("an integer in 1..={MAX_VM_CPUS}"),
        |n| conv_int_range(n, 1, MAX_VM_CPUS as i64),
    );
    let platform = t.optional(cx, "platform", "\"microvm\" or \"q35\"", conv_platform);
    let qemu = t.optional(
        cx,
        "qemu",
        "the QEMU binary, a name in PATH or a path",
        conv_path,
    );
    let tap = t.optional(
        cx,
        "tap",
        &format!("an interface name of 1..={MAX_IFNAME_LEN} characters from [A-Za-z0-9_.-]"),
        conv_ifname,
    );
    let prefix_len = t.optional(cx, "prefix_len", "an integer in 1..=32", |n| {
        conv_int_range(n, 1, 32)
    });
    let gateway = t.optional(
        cx,
        "gateway",
        "the guest's default gateway, an IPv4 address",
        conv_ipv4,
    );
    let qmp = t.optional(
        cx,
        "qmp",
        "an absolute path for QEMU's QMP socket",
        conv_abs_path,
    );
    let ram_file = t.optional(
        cx,
        "ram_file",
        "an absolute path for the guest RAM file (on a tmpfs such as /dev/shm)",
        conv_abs_path,
    );
    let pidfile = t.optional(
        cx,
        "pidfile",
        "an absolute path for QEMU's pid file",
        conv_abs_path,
    );
    let extra_args = t.optional(
        cx,
        "extra_args",
        &format!("an array of at most {MAX_VM_EXTRA_ARGS} strings"),
        conv_args,
    );
    t.finish(cx);
    Some(RawVm {
        span: node.span(),
        field,
        kernel,
        initrd,
        append,
        ram_mib,
        cpus,
        platform,
        qemu,
        tap,
        prefix_len,
        gateway,
        qmp,
        ram_file,
        pidfile,
        extra_args,
    })
}

/// Where a value came from: its own field, or the `vm` table for a default.
struct Origin<T> {
    value: T,
    span: Range<usize>,
    field: String,
}

fn resolved<T: Clone>(at: Option<&At<T>>, vm: &RawVm, key: &str, default: T) -> Origin<T> {
    match at {
        Some(a) => Origin {
            value: a.value.clone(),
            span: a.span.clone(),
            field: a.field.clone(),
        },
        None => Origin {
            value: default,
            span: vm.span.clone(),
            field: format!("{}.{key}", vm.field),
        },
    }
}

/// The resolved names of one guest, for the checks across machines.
struct Names {
    machine: String,
    host: String,
    tap: Origin<String>,
    qmp: Origin<PathBuf>,
    ram_file: Origin<PathBuf>,
    pidfile: Origin<PathBuf>,
}

fn nbd_dir_of<'h>(hosts: &'h [RawHost], host: &str) -> Option<&'h Path> {
    hosts
        .iter()
        .find(|h| h.name.as_ref().is_some_and(|n| n.value == host))
        .and_then(|h| h.nbd_dir.as_ref())
        .map(|d| d.value.as_path())
}

/// The rules across guests: each tap name once per host and a usable interface
/// name, each QMP socket, RAM file and pid file once per group, QMP paths fit
/// `sun_path`, and in `checkpoint` mode every machine is a guest.
pub(super) fn check_vms(
    cx: &mut Cx<'_>,
    mode: Option<Mode>,
    group: Option<&str>,
    hosts: &[RawHost],
    machines: &[RawMachine],
) {
    let mut names = Vec::new();
    for m in machines {
        let Some(name) = &m.name else { continue };
        let Some(vm) = &m.vm else {
            if mode == Some(Mode::Checkpoint) {
                cx.error(
                    &name.span,
                    &name.field,
                    format!(
                        "machine `{}` has no `[machine.vm]` table; expected every machine of a `checkpoint` group to be a QEMU guest (every machine pauses for the same epoch)",
                        name.value
                    ),
                );
            }
            continue;
        };
        let Some(host) = &m.host else { continue };
        let Some(nbd_dir) = nbd_dir_of(hosts, &host.value) else {
            continue;
        };
        let tap = resolved(vm.tap.as_ref(), vm, "tap", default_tap(&name.value));
        if vm.tap.is_none() {
            if let Err(problem) = check_ifname(&tap.value) {
                cx.error(
                    &tap.span,
                    &tap.field,
                    format!(
                        "the default tap name is not usable ({problem}); expected `tap = \"NAME\"` of at most {MAX_IFNAME_LEN} characters"
                    ),
                );
            }
        }
        let qmp = resolved(
            vm.qmp.as_ref(),
            vm,
            "qmp",
            default_qmp(nbd_dir, &name.value),
        );
        if qmp.value.as_os_str().len() > MAX_UNIX_SOCKET_PATH {
            cx.error(
                &qmp.span,
                &qmp.field,
                format!(
                    "QMP socket {} is {} bytes; expected at most {MAX_UNIX_SOCKET_PATH} (Unix socket paths are limited)",
                    qmp.value.display(),
                    qmp.value.as_os_str().len()
                ),
            );
        }
        let ram_file = resolved(
            vm.ram_file.as_ref(),
            vm,
            "ram_file",
            default_ram_file(group.unwrap_or("?"), &name.value),
        );
        let pidfile = resolved(
            vm.pidfile.as_ref(),
            vm,
            "pidfile",
            default_pidfile(nbd_dir, &name.value),
        );
        names.push(Names {
            machine: name.value.clone(),
            host: host.value.clone(),
            tap,
            qmp,
            ram_file,
            pidfile,
        });
    }
    let mut taps: HashMap<(String, String), String> = HashMap::new();
    let mut files: HashMap<PathBuf, String> = HashMap::new();
    for n in &names {
        let key = (n.host.clone(), n.tap.value.clone());
        if let Some(first) = taps.get(&key) {
            cx.error(
                &n.tap.span,
                &n.tap.field,
                format!(
                    "tap `{}` is already the NIC of machine `{first}` on host `{}`; expected one tap per guest",
                    n.tap.value, n.host
                ),
            );
        } else {
            taps.insert(key, n.machine.clone());
        }
        for (what, o) in [
            ("QMP socket", &n.qmp),
            ("RAM file", &n.ram_file),
            ("pid file", &n.pidfile),
        ] {
            if let Some(first) = files.get(&o.value) {
                cx.error(
                    &o.span,
                    &o.field,
                    format!(
                        "{what} {} is already used by machine `{first}`; expected a file of its own per guest",
                        o.value.display()
                    ),
                );
            } else {
                files.insert(o.value.clone(), n.machine.clone());
            }
        }
    }
}

/// The model of a guest that passed every check.
pub(super) fn build_vm(vm: RawVm, group: &str, machine: &str, nbd_dir: &Path) -> Option<Vm> {
    Some(Vm {
        kernel: vm.kernel?.value,
        initrd: vm.initrd.map(|v| v.value),
        append: vm
            .append
            .map_or_else(|| DEFAULT_VM_APPEND.to_owned(), |v| v.value),
        ram_mib: vm.ram_mib.map_or(DEFAULT_VM_RAM_MIB, |v| v.value),
        cpus: vm.cpus.map_or(DEFAULT_VM_CPUS, |v| v.value),
        platform: vm.platform.map_or(Platform::Microvm, |v| v.value),
        qemu: vm
            .qemu
            .map_or_else(|| PathBuf::from(DEFAULT_VM_QEMU), |v| v.value),
        tap: vm.tap.map_or_else(|| default_tap(machine), |v| v.value),
        prefix_len: vm
            .prefix_len
            .map_or(DEFAULT_VM_PREFIX_LEN, |v| v.value as u8),
        gateway: vm.gateway.map(|v| v.value),
        qmp: vm
            .qmp
            .map_or_else(|| default_qmp(nbd_dir, machine), |v| v.value),
        ram_file: vm
            .ram_file
            .map_or_else(|| default_ram_file(group, machine), |v| v.value),
        pidfile: vm
            .pidfile
            .map_or_else(|| default_pidfile(nbd_dir, machine), |v| v.value),
        extra_args: vm.extra_args.map(|v| v.value).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use crate::topology::test_fixture::{assert_error, errors_of, good_with};
    use crate::topology::*;
    use std::path::PathBuf;

    /// GOOD with a `[machine.vm]` table after the machine `db` (the last one).
    fn with_db_vm(vm: &str) -> String {
        good_with(
            "writer = true\n",
            &format!("writer = true\n\n[machine.vm]\n{vm}"),
        )
    }

    #[test]
    fn vm_defaults_and_summary() {
        let text = with_db_vm("kernel = \"guest/vmlinux\"\n");
        let t = Topology::parse(&text, "t.toml").unwrap_or_else(|e| panic!("{e}"));
        let vm = t.vm("db").expect("db is a guest");
        assert_eq!(vm.ram_mib, DEFAULT_VM_RAM_MIB);
        assert_eq!(vm.ram_bytes(), 256 << 20);
        assert_eq!(vm.cpus, 1);
        assert_eq!(vm.platform, Platform::Microvm);
        assert_eq!(vm.qemu, PathBuf::from("qemu-system-x86_64"));
        assert_eq!(vm.kernel, PathBuf::from("guest/vmlinux"));
        assert_eq!(vm.initrd, None);
        assert_eq!(vm.tap, "pc-db");
        assert_eq!(vm.qmp, PathBuf::from("/run/pipecloud/dom0-a/db.qmp"));
        assert_eq!(vm.ram_file, PathBuf::from("/dev/shm/pipecloud-shop-db.ram"));
        assert_eq!(vm.pidfile, PathBuf::from("/run/pipecloud/dom0-a/db.pid"));
        assert_eq!(vm.prefix_len, 24);
        assert_eq!(vm.gateway, None);
        assert!(vm.extra_args.is_empty());
        assert!(t.vm("web").is_none());
        let s = t.summary();
        assert!(s.contains("vm 256 MiB x1 cpu microvm"), "{s}");
        assert!(s.contains("tap pc-db"), "{s}");
    }

    #[test]
    fn vm_every_key() {
        let text = with_db_vm(
            "kernel = \"/k\"\ninitrd = \"/i\"\nappend = \"console=ttyS0 quiet\"\nram_mib = 64\n\
             cpus = 2\nplatform = \"q35\"\nqemu = \"/usr/bin/qemu-system-x86_64\"\ntap = \"tdb\"\n\
             prefix_len = 16\ngateway = \"10.10.0.1\"\nqmp = \"/run/q.sock\"\n\
             ram_file = \"/dev/shm/x.ram\"\npidfile = \"/run/x.pid\"\nextra_args = [\"-S\"]\n",
        );
        let t = Topology::parse(&text, "t.toml").unwrap_or_else(|e| panic!("{e}"));
        let vm = t.vm("db").expect("guest");
        assert_eq!(vm.ram_mib, 64);
        assert_eq!(vm.cpus, 2);
        assert_eq!(vm.platform, Platform::Q35);
        assert_eq!(vm.initrd, Some(PathBuf::from("/i")));
        assert_eq!(vm.append, "console=ttyS0 quiet");
        assert_eq!(vm.tap, "tdb");
        assert_eq!(vm.prefix_len, 16);
        assert_eq!(vm.gateway, Some(std::net::Ipv4Addr::new(10, 10, 0, 1)));
        assert_eq!(vm.qmp, PathBuf::from("/run/q.sock"));
        assert_eq!(vm.extra_args, vec!["-S".to_owned()]);
    }

    #[test]
    fn vm_values_are_checked() {
        let text = with_db_vm(
            "ram_mib = 8\ncpus = 0\nplatform = \"pc\"\ntap = \"a-name-far-too-long\"\n\
             qmp = \"rel.sock\"\nextra_args = [1]\ncolour = 1\n",
        );
        let errs = errors_of(&text);
        let line = |needle: &str| {
            text.lines()
                .position(|l| l.starts_with(needle))
                .map(|i| i as u32 + 1)
                .expect("line")
        };
        assert_error(
            &errs,
            line("[machine.vm]"),
            "machine[1].vm.kernel",
            "missing",
        );
        assert_error(
            &errs,
            line("ram_mib"),
            "machine[1].vm.ram_mib",
            "8 is out of range",
        );
        assert_error(&errs, line("cpus"), "machine[1].vm.cpus", "out of range");
        assert_error(
            &errs,
            line("platform"),
            "machine[1].vm.platform",
            "unknown platform",
        );
        assert_error(&errs, line("tap"), "machine[1].vm.tap", "19 bytes");
        assert_error(
            &errs,
            line("qmp"),
            "machine[1].vm.qmp",
            "not an absolute path",
        );
        assert_error(
            &errs,
            line("extra_args"),
            "machine[1].vm.extra_args",
            "argument 0",
        );
        assert_error(
            &errs,
            line("colour"),
            "machine[1].vm.colour",
            "unknown field",
        );
        assert_eq!(errs.len(), 8, "{errs:?}");
    }

    #[test]
    fn vm_rules_across_guests() {
        // Two guests on one host with the same tap and RAM file.
        let text = good_with(
            "outbound = true\n",
            "outbound = true\n\n[machine.vm]\nkernel = \"/k\"\ntap = \"t0\"\nram_file = \"/dev/shm/r\"\n",
        )
        .replacen(
            "writer = true\n",
            "writer = true\n\n[machine.vm]\nkernel = \"/k\"\ntap = \"t0\"\nram_file = \"/dev/shm/r\"\n",
            1,
        );
        let errs = errors_of(&text);
        assert!(
            errs.iter()
                .any(|e| e.field == "machine[1].vm.tap" && e.message.contains("already the NIC")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.field == "machine[1].vm.ram_file"
                && e.message.contains("already used by machine `web`")),
            "{errs:?}"
        );
        assert_eq!(errs.len(), 2, "{errs:?}");

        // A machine name too long for the default tap name.
        let long = "a-long-machine-name";
        let text = with_db_vm("kernel = \"/k\"\n")
            .replace("name = \"db\"", &format!("name = \"{long}\""))
            .replace("machine = \"db\"", &format!("machine = \"{long}\""));
        let errs = errors_of(&text);
        assert!(
            errs.iter().any(|e| e.field == "machine[1].vm.tap"
                && e.message.contains("default tap name is not usable")),
            "{errs:?}"
        );
    }

    #[test]
    fn vm_checkpoint_mode_needs_every_machine_a_guest() {
        let text = with_db_vm("kernel = \"/k\"\n")
            .replace("mode = \"pipelined\"", "mode = \"checkpoint\"");
        let errs = errors_of(&text);
        assert_error(&errs, 19, "machine[0].name", "has no `[machine.vm]` table");
        assert_eq!(errs.len(), 1, "{errs:?}");
        // The same file in pipelined mode is fine: guests run in every mode.
        let text = with_db_vm("kernel = \"/k\"\n");
        assert!(Topology::parse(&text, "t.toml").is_ok());
    }
}
