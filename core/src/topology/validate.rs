//! The rules across records of a topology file.
//!
//! Once every section is read, these checks see the whole group: host, machine
//! and disk names are unique, IPs, MACs and image files are not shared, every
//! reference names a declared host or machine, writers are numbered and bounded,
//! and per-host limits (disks per hello, Unix socket path lengths) hold. Each
//! reports at the field that breaks the rule and names the earlier one it
//! clashes with.

use super::document::At;
use super::error::Cx;
use super::model::{default_ctl_socket, nbd_socket_path, MAX_UNIX_SOCKET_PATH};
use super::read::{RawDisk, RawHost, RawMachine};
use super::values::format_mac;
use crate::vector::{WriterId, MAX_WRITERS};
use crate::wire::MAX_DISKS_PER_HELLO;
use std::collections::HashMap;

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
pub(super) fn check_hosts<'a>(cx: &mut Cx<'_>, hosts: &'a [RawHost]) -> Vec<&'a str> {
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
pub(super) fn check_machines<'a>(
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
pub(super) fn check_disks(cx: &mut Cx<'_>, disks: &[RawDisk], machine_names: &[&str]) {
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
pub(super) fn assign_writers(
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

/// Per host: at most [`MAX_DISKS_PER_HELLO`] disks, NBD socket paths fit `sun_path`,
/// no busy polling at real-time priority.
pub(super) fn check_host_limits(
    cx: &mut Cx<'_>,
    hosts: &[RawHost],
    machines: &[RawMachine],
    disks: &[RawDisk],
) {
    for h in hosts {
        if let (Some(p), Some(b)) = (&h.netpath_priority, &h.busy_poll_us) {
            if p.value > 0 && b.value > 0 {
                cx.error(
                    &p.span,
                    &p.field,
                    "a real-time network-path thread must not busy-poll: set netpath_priority = 0 \
                     or busy_poll_us = 0"
                        .to_string(),
                );
            }
        }
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

#[cfg(test)]
mod tests {
    use crate::topology::test_fixture::{assert_error, errors_of, good_with, GOOD};
    use crate::topology::Topology;
    use crate::vector::{WriterId, MAX_WRITERS};

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
}
