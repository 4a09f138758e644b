//! How single values are spelled, in topology files and on command lines.
//!
//! Names (which become wire names and file names), sizes with units, MAC
//! addresses and DNS host names each have one syntax, parsed and printed here so
//! the file reader, the summaries and the command-line tools agree on it.

use crate::wire::MAX_NAME_LEN;

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

pub(super) fn check_dns_name(h: &str) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Endpoint, Mode};

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
