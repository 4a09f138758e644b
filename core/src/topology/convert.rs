//! Value conversions: one function per kind of value a topology file holds.
//!
//! Each takes a [`Node`] and returns the typed value or what is wrong with it
//! ("found a string", "70000 is out of range"); the table reader adds the field,
//! its position and what was expected. The rules for a single value (ranges,
//! unicast addresses, absolute paths, sector-aligned sizes) live here.

use super::document::Node;
use super::model::{Endpoint, MAX_DISK_SIZE, SECTOR_SIZE};
use super::values::{check_dns_name, check_name, parse_mac, parse_size};
use crate::mode::Mode;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};

fn conv_str(node: &Node) -> Result<&str, String> {
    match node {
        Node::Str(s) => Ok(s),
        other => Err(format!("found {}", other.kind())),
    }
}

pub(super) fn conv_name(node: &Node) -> Result<String, String> {
    let s = conv_str(node)?;
    check_name(s).map_err(|e| format!("invalid name: {e}"))?;
    Ok(s.to_owned())
}

pub(super) const NAME_EXPECTED: &str =
    "a name of 1 to 64 characters from [A-Za-z0-9_.-], not `.` or `..`";

pub(super) fn conv_bool(node: &Node) -> Result<bool, String> {
    match node {
        Node::Bool(b) => Ok(*b),
        other => Err(format!("found {}", other.kind())),
    }
}

pub(super) fn conv_int_range(node: &Node, lo: i64, hi: i64) -> Result<u64, String> {
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

pub(super) fn conv_bytes_min(node: &Node, min: u64) -> Result<u64, String> {
    let n = conv_bytes(node)?;
    if n < min {
        return Err(format!("{n} bytes is too small"));
    }
    Ok(n)
}

pub(super) const BYTES_EXPECTED: &str =
    "a byte count: an integer or a string like \"64MiB\" (units K M G T, Ki Mi Gi Ti)";

pub(super) fn conv_disk_size(node: &Node) -> Result<u64, String> {
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

pub(super) fn conv_ipv4(node: &Node) -> Result<Ipv4Addr, String> {
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

pub(super) fn conv_mac(node: &Node) -> Result<[u8; 6], String> {
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

pub(super) fn conv_abs_path(node: &Node) -> Result<PathBuf, String> {
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

pub(super) fn conv_path(node: &Node) -> Result<PathBuf, String> {
    let s = conv_str(node)?;
    if s.is_empty() {
        return Err("an empty path".to_owned());
    }
    if s.contains('\0') {
        return Err("the path contains a NUL byte".to_owned());
    }
    Ok(PathBuf::from(s))
}

pub(super) fn conv_mode(node: &Node) -> Result<Mode, String> {
    let s = conv_str(node)?;
    s.parse::<Mode>().map_err(|_| format!("unknown mode `{s}`"))
}

/// `on_backup_loss` before `degrade_after_s` is combined with it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum LossKind {
    Stall,
    Degrade,
}

pub(super) fn conv_loss(node: &Node) -> Result<LossKind, String> {
    match conv_str(node)? {
        "stall" => Ok(LossKind::Stall),
        "degrade-to-async" => Ok(LossKind::Degrade),
        other => Err(format!("unknown policy `{other}`")),
    }
}

pub(super) fn conv_socket_addr(node: &Node) -> Result<SocketAddr, String> {
    let s = conv_str(node)?;
    s.parse()
        .map_err(|_| format!("`{s}` is not an IP address and port"))
}

pub(super) fn conv_endpoint(node: &Node) -> Result<Endpoint, String> {
    conv_str(node)?.parse()
}

pub(super) fn conv_server_name(node: &Node) -> Result<String, String> {
    let s = conv_str(node)?;
    if s.parse::<IpAddr>().is_err() {
        check_dns_name(s)?;
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use crate::topology::test_fixture::{assert_error, errors_of, good_with};

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
}
