//! Reading each section of a topology file into typed values with their spans.
//!
//! `[group]`, `[backup]` and `[policy]` become model values directly (their
//! rules involve only their own keys, such as the heartbeat timeout against the
//! interval). `[[host]]`, `[[machine]]` and `[[disk]]` become raw records that
//! keep each value's span and field path, because the rules across records in
//! `validate` must point at the offending field.

use super::convert::{
    conv_abs_path, conv_bool, conv_bytes_min, conv_disk_size, conv_endpoint, conv_int_range,
    conv_ipv4, conv_loss, conv_mac, conv_mode, conv_name, conv_path, conv_server_name,
    conv_socket_addr, LossKind, BYTES_EXPECTED, NAME_EXPECTED,
};
use super::document::{as_table, At, Node, NodeTable, TableReader};
use super::error::Cx;
use super::model::{
    Backup, Group, Policy, DEFAULT_HEARTBEAT_INTERVAL_MS, DEFAULT_HEARTBEAT_TIMEOUT_MS,
    DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_NETQUEUE_MAX_BYTES, DEFAULT_NETQUEUE_MAX_PACKETS,
    DEFAULT_REPLICATION_ASYNC_BATCH_US, DEFAULT_REPLICATION_COALESCE_US, MAX_BUSY_POLL_US,
    MAX_DEGRADE_AFTER_S, MAX_HEARTBEAT_INTERVAL_MS, MAX_HEARTBEAT_TIMEOUT_MS, MAX_NETPATH_PRIORITY,
    MAX_NETQUEUE_PACKETS, MAX_REPLICATION_ASYNC_BATCH_US, MAX_REPLICATION_COALESCE_US,
    MIN_HEARTBEAT_INTERVAL_MS, MIN_HEARTBEAT_TIMEOUT_MS, MIN_NETQUEUE_BYTES,
};
use super::vm::{parse_vm, RawVm};
use crate::mode::{BackupLossPolicy, Mode};
use crate::wire::MAX_WRITE_PAYLOAD;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;
use toml::Spanned;

pub(super) struct RawHost {
    pub(super) name: Option<At<String>>,
    pub(super) nbd_dir: Option<At<PathBuf>>,
    pub(super) ctl_socket: Option<At<PathBuf>>,
    pub(super) busy_poll_us: Option<At<u64>>,
    pub(super) netpath_priority: Option<At<u8>>,
    pub(super) kernel_tagger: Option<At<bool>>,
    pub(super) metrics_listen: Option<At<SocketAddr>>,
}

pub(super) struct RawMachine {
    pub(super) span: Range<usize>,
    pub(super) name: Option<At<String>>,
    pub(super) ip: Option<At<Ipv4Addr>>,
    pub(super) mac: Option<At<[u8; 6]>>,
    pub(super) host: Option<At<String>>,
    pub(super) outbound: bool,
    pub(super) writer: Option<At<bool>>,
    pub(super) vm: Option<RawVm>,
}

pub(super) struct RawDisk {
    pub(super) name: Option<At<String>>,
    pub(super) machine: Option<At<String>>,
    pub(super) image: Option<At<PathBuf>>,
    pub(super) size: Option<At<u64>>,
}

pub(super) const ROOT_KEYS: &[&str] = &[
    "group", "backup", "policy", "quorum", "host", "machine", "disk",
];
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
    "netpath_priority",
    "kernel_tagger",
    "metrics_listen",
];
const MACHINE_KEYS: &[&str] = &["name", "ip", "mac", "host", "outbound", "writer", "vm"];
const DISK_KEYS: &[&str] = &["name", "machine", "image", "size"];

pub(super) fn parse_group(cx: &mut Cx<'_>, node: Option<&Spanned<Node>>) -> Option<Group> {
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

pub(super) fn parse_backup(cx: &mut Cx<'_>, node: Option<&Spanned<Node>>) -> Option<Backup> {
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

pub(super) fn parse_policy(cx: &mut Cx<'_>, node: Option<&Spanned<Node>>) -> Option<Policy> {
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

pub(super) fn parse_host(
    cx: &mut Cx<'_>,
    i: usize,
    span: Range<usize>,
    table: &NodeTable,
) -> RawHost {
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
    let netpath_priority = t.optional(
        cx,
        "netpath_priority",
        "a SCHED_FIFO priority, an integer in 0..=99 (0: normal scheduling)",
        |n| conv_int_range(n, 0, i64::from(MAX_NETPATH_PRIORITY)).map(|v| v as u8),
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
        netpath_priority,
        kernel_tagger,
        metrics_listen,
    }
}

pub(super) fn parse_machine(
    cx: &mut Cx<'_>,
    i: usize,
    span: Range<usize>,
    table: &NodeTable,
) -> RawMachine {
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
    let vm = t.take("vm").and_then(|node| parse_vm(cx, i, node));
    t.finish(cx);
    RawMachine {
        span,
        name,
        ip,
        mac,
        host,
        outbound: outbound.is_some_and(|o| o.value),
        writer,
        vm,
    }
}

pub(super) fn parse_disk(
    cx: &mut Cx<'_>,
    i: usize,
    span: Range<usize>,
    table: &NodeTable,
) -> RawDisk {
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

#[cfg(test)]
mod tests {
    use crate::topology::test_fixture::{assert_error, errors_of, good_with, GOOD};
    use crate::topology::*;
    use std::time::Duration;

    #[test]
    fn topology_wrong_types_and_missing_fields() {
        let text = good_with("id = 7", "id = \"seven\"").replacen("name = \"db\"\n", "", 1);
        let errs = errors_of(&text);
        assert_error(&errs, 4, "group.id", "found a string; expected a group id");
        // The missing name points at the `[[machine]]` header of that machine.
        assert_error(&errs, 25, "machine[1].name", "missing; expected a name");
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
    fn host_netpath_priority_defaults_and_never_busy_polls() {
        let dir = "nbd_dir = \"/run/pipecloud/dom0-a\"";
        let t = Topology::parse(GOOD, "t").expect("valid");
        assert_eq!(t.hosts[0].netpath_priority, DEFAULT_NETPATH_PRIORITY);
        let t = Topology::parse(
            &good_with(dir, &format!("{dir}\nnetpath_priority = 0")),
            "t",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.hosts[0].netpath_priority, 0);
        // Busy polling alone: normal scheduling by default.
        let t = Topology::parse(&good_with(dir, &format!("{dir}\nbusy_poll_us = 50")), "t")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.hosts[0].netpath_priority, 0);
        let errs = errors_of(&good_with(
            dir,
            &format!("{dir}\nbusy_poll_us = 50\nnetpath_priority = 5"),
        ));
        assert_error(&errs, 18, "host[0].netpath_priority", "must not busy-poll");
        assert_eq!(errs.len(), 1, "{errs:?}");
        let errs = errors_of(&good_with(dir, &format!("{dir}\nnetpath_priority = 100")));
        assert_error(&errs, 17, "host[0].netpath_priority", "0..=99");
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
}
