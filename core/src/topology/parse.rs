//! [`Topology::parse`]: the stages of reading a topology file, run in order.
//!
//! Size limit, TOML syntax, the root table, each section, the rules across
//! records, then the model is built from what survived. Every stage reports into
//! one collector, so a file with several problems gets them all at once.

use super::document::{array_of_tables, Node, TableReader};
use super::error::{Cx, TopologyErrors};
use super::model::{
    default_ctl_socket, Disk, Host, Machine, Topology, DEFAULT_BUSY_POLL_US, DEFAULT_KERNEL_TAGGER,
    DEFAULT_NETPATH_PRIORITY, MAX_DISKS, MAX_HOSTS, MAX_MACHINES, MAX_TOPOLOGY_BYTES,
};
use super::read::{
    parse_backup, parse_disk, parse_group, parse_host, parse_machine, parse_policy, RawDisk,
    RawHost, RawMachine, ROOT_KEYS,
};
use super::validate::{
    assign_writers, check_disks, check_host_limits, check_hosts, check_machines,
};
use super::vm::{build_vm, check_vms};

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
    let quorum = super::quorum::parse_quorum(cx, root.take("quorum"));
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
    check_vms(
        cx,
        group.as_ref().map(|g| g.mode),
        group.as_ref().map(|g| g.name.as_str()),
        &hosts,
        &machines,
    );

    // --- build -----------------------------------------------------------
    let group = group?;
    let backup = backup?;
    let policy = policy?;
    let quorum = quorum?;
    let hosts = hosts
        .into_iter()
        .map(|h| {
            let nbd_dir = h.nbd_dir?.value;
            let ctl_socket = h
                .ctl_socket
                .map_or_else(|| default_ctl_socket(&nbd_dir), |c| c.value);
            let busy_poll_us = h.busy_poll_us.map_or(DEFAULT_BUSY_POLL_US, |v| v.value);
            Some(Host {
                name: h.name?.value,
                nbd_dir,
                ctl_socket,
                busy_poll_us,
                // A busy-polling thread keeps normal scheduling unless told
                // otherwise (and told otherwise is refused: validate.rs).
                netpath_priority: h.netpath_priority.map_or(
                    if busy_poll_us > 0 {
                        0
                    } else {
                        DEFAULT_NETPATH_PRIORITY
                    },
                    |v| v.value,
                ),
                kernel_tagger: h.kernel_tagger.map_or(DEFAULT_KERNEL_TAGGER, |v| v.value),
                metrics_listen: h.metrics_listen.map(|v| v.value),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    let machines = machines
        .into_iter()
        .map(|m| {
            let name = m.name?.value;
            let host = m.host?.value;
            let vm = match m.vm {
                Some(vm) => {
                    let nbd_dir = &hosts.iter().find(|h| h.name == host)?.nbd_dir;
                    Some(build_vm(vm, &group.name, &name, nbd_dir)?)
                }
                None => None,
            };
            Some(Machine {
                writer: writer_ids.get(&name).copied(),
                name,
                ip: m.ip?.value,
                mac: m.mac.map(|x| x.value),
                host,
                outbound: m.outbound,
                vm,
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
        quorum,
        hosts,
        machines,
        disks,
    })
}

#[cfg(test)]
mod tests {
    use crate::topology::test_fixture::errors_of;

    #[test]
    fn topology_syntax_error_has_position() {
        let errs = errors_of("[group]\nname = \"x\"\nid = \n");
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, 3);
        assert!(errs[0].message.starts_with("TOML syntax"), "{}", errs[0]);
    }
}
