//! Live sites seen from outside: finding a running `site up`, entering its
//! namespaces (`site exec`), and removing what a stopped or crashed one left in the
//! work directory (`site down`).
//!
//! A site's processes live in two kinds of namespace. Its network namespaces are
//! named `<prefix><pid>-<role>` after the harness's pid. Its mounts (the protected
//! disks, the PostgreSQL data directories) live in the harness's own private mount
//! namespace: the harness re-executes itself under `unshare --mount` before it builds
//! anything ([`crate::sys::ensure_private_mount_ns`], same pid), and `ip netns add`
//! run from there binds the network namespace files under `/run/netns` inside that
//! mount namespace only. So reaching a machine takes two steps, in this order: enter
//! the harness's mount namespace (`/proc/<pid>/ns/mnt`), then, from inside it, the
//! machine's network namespace (`/run/netns/<name>`).

use crate::sys::sh_quiet;
use anyhow::{bail, Context, Result};
use pipecloud_core::topology::Topology;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Work directories of `site up` runs: `<base>/site-<pid>`.
const SITE_TAG: &str = "site-";

/// A `site up` work directory and the pid in its name.
#[derive(Debug, Clone)]
pub struct SiteDir {
    pub pid: u32,
    pub dir: PathBuf,
}

impl SiteDir {
    /// Is the harness that owns it still running?
    pub fn alive(&self) -> bool {
        let exe = std::fs::read_link(format!("/proc/{}/exe", self.pid));
        matches!(exe, Ok(p) if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("pipecloud-harness")))
    }
}

/// Every `site-<pid>` directory under `base`.
pub fn site_dirs(base: &Path) -> Vec<SiteDir> {
    let Ok(rd) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    let mut v: Vec<SiteDir> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix(SITE_TAG)?.parse().ok()?;
            Some(SiteDir { pid, dir: e.path() })
        })
        .collect();
    v.sort_by_key(|s| s.pid);
    v
}

/// Kills what a crashed (SIGKILLed) site left running: every process whose command
/// line names a path inside `dir` (the agent, the backup server, nbdfuse, PostgreSQL),
/// and every other process in those processes' mount namespaces (the tiers, the
/// PostgreSQL backends), which is the dead harness's private one, never ours. When
/// they are gone the mount namespace dies, and with it the mounts holding the loop
/// devices. Returns how many processes were killed.
pub fn kill_site_processes(dir: &Path) -> usize {
    let ns_of = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let own_ns = ns_of("self");
    let needle = format!("{}/", dir.display());
    let pids: Vec<String> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                .collect()
        })
        .unwrap_or_default();
    let me = std::process::id().to_string();
    let mut site_ns = Vec::new();
    for p in &pids {
        let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        if *p != me && String::from_utf8_lossy(&cmdline).contains(&needle) {
            if let Some(ns) = ns_of(p) {
                if Some(&ns) != own_ns.as_ref() && !site_ns.contains(&ns) {
                    site_ns.push(ns);
                }
            }
            sh_quiet(&["kill", "-9", p]);
        }
    }
    let mut killed = 0;
    for p in &pids {
        if *p != me && ns_of(p).is_some_and(|ns| site_ns.contains(&ns)) {
            sh_quiet(&["kill", "-9", p]);
            killed += 1;
        }
    }
    // Let the kernel reap them and release the namespace's mounts.
    let _ = crate::sys::wait_until(
        std::time::Duration::from_secs(10),
        "the site's processes to exit",
        || {
            !pids
                .iter()
                .any(|p| ns_of(p).is_some_and(|ns| site_ns.contains(&ns)))
        },
    );
    killed
}

/// Loop devices whose backing file lies inside `dir`.
fn loop_devices_under(dir: &Path) -> Vec<String> {
    pipecloud::loopdev::list()
        .into_iter()
        .filter(|(_, b)| Path::new(b).starts_with(dir))
        .map(|(dev, _)| dev.to_string_lossy().into_owned())
        .collect()
}

/// Removes a site's work directory: detaches any loop device still backed by a file
/// inside it, then deletes it.
pub fn remove_work_dir(dir: &Path) {
    for dev in loop_devices_under(dir) {
        sh_quiet(&["losetup", "-d", &dev]);
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("harness: cannot remove {}: {e}", dir.display());
        }
    }
}

/// Removes the work directory of every `site up` under `base` whose harness is gone;
/// returns how many.
pub fn remove_dead_site_dirs(base: &Path) -> usize {
    let mut n = 0;
    for s in site_dirs(base) {
        if !s.alive() {
            // Noted before the kill: once the FUSE file system is gone, a loop
            // device's backing file no longer shows a path inside the directory.
            let loops = loop_devices_under(&s.dir);
            let killed = kill_site_processes(&s.dir);
            for dev in &loops {
                sh_quiet(&["losetup", "-d", dev]);
            }
            if killed > 0 {
                eprintln!(
                    "harness: killed {killed} processes left by site {}",
                    s.dir.display()
                );
            }
            remove_work_dir(&s.dir);
            n += 1;
        }
    }
    n
}

/// Deletes a directory when dropped (`site up`'s work directory: on Ctrl-C and on a
/// failed start alike). Declare it before the site, so the site tears down first.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        remove_work_dir(&self.0);
    }
}

/// The network namespace name (without prefix and pid) of `who` in the site whose
/// rendered topology is `topo_file`: a machine name (`m<j>`), a host name (its
/// dom0, `h<i>`), or one of `client`, `backup`, `wan`, `lan`.
pub fn role_of(topo_file: &Path, who: &str) -> Result<String> {
    if matches!(who, "client" | "backup" | "wan" | "lan") {
        return Ok(who.to_string());
    }
    let text = std::fs::read_to_string(topo_file)
        .with_context(|| format!("reading the site's topology {}", topo_file.display()))?;
    let topo = Topology::parse(&text, &topo_file.display().to_string())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(j) = topo.machines.iter().position(|m| m.name == who) {
        return Ok(format!("m{j}"));
    }
    if let Some(i) = topo.hosts.iter().position(|h| h.name == who) {
        return Ok(format!("h{i}"));
    }
    let machines: Vec<&str> = topo.machines.iter().map(|m| m.name.as_str()).collect();
    let hosts: Vec<&str> = topo.hosts.iter().map(|h| h.name.as_str()).collect();
    bail!(
        "no {who:?} in the site: machines {machines:?}, hosts (dom0) {hosts:?}, or client, backup, wan, lan"
    )
}

/// The live site to enter: the one with `pid`, or the only live one under `base`.
pub fn pick_site(base: &Path, pid: Option<u32>) -> Result<SiteDir> {
    let live: Vec<SiteDir> = site_dirs(base).into_iter().filter(|s| s.alive()).collect();
    match pid {
        Some(p) => live
            .into_iter()
            .find(|s| s.pid == p)
            .with_context(|| format!("no live `site up` with pid {p} under {}", base.display())),
        None => match live.len() {
            0 => bail!("no live `site up` under {}", base.display()),
            1 => Ok(live.into_iter().next().expect("one")),
            _ => {
                let pids: Vec<u32> = live.iter().map(|s| s.pid).collect();
                bail!("several live sites (pids {pids:?}): choose one with --pid")
            }
        },
    }
}

/// The command that runs `cmd` as `who` inside a live site: the site's mount
/// namespace first, then (from inside it) the network namespace.
pub fn exec_command(site: &SiteDir, prefix: &str, who: &str, cmd: &[String]) -> Result<Command> {
    let role = role_of(&site.dir.join("topology.toml"), who)?;
    let (prog, args) = cmd.split_first().context("no command given after --")?;
    let mut c = Command::new("nsenter");
    c.arg(format!("--mount=/proc/{}/ns/mnt", site.pid))
        .args(["--", "nsenter"])
        .arg(format!("--net=/run/netns/{prefix}{}-{role}", site.pid))
        .arg("--")
        .arg(prog)
        .args(args);
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pc-live-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn site_dirs_are_site_dash_pid_only() {
        let base = scratch("dirs");
        for n in ["site-123", "site-abc", "other", "disaster-x-9", "site-7"] {
            std::fs::create_dir_all(base.join(n)).unwrap();
        }
        let got: Vec<u32> = site_dirs(&base).iter().map(|s| s.pid).collect();
        assert_eq!(got, vec![7, 123]);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn exec_enters_the_mount_namespace_then_the_machines_net_namespace() {
        let base = scratch("exec");
        let topo = concat!(env!("CARGO_MANIFEST_DIR"), "/../topology/two-tier.toml");
        std::fs::copy(topo, base.join("topology.toml")).unwrap();
        let site = SiteDir {
            pid: 42,
            dir: base.clone(),
        };
        let cmd = |who: &str| {
            exec_command(&site, "pch", who, &["df".to_string(), "-h".to_string()]).map(|c| {
                c.get_args()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
        };
        // Machines in file order: web = m0, db = m1; the host is h0.
        assert_eq!(
            cmd("db").unwrap(),
            [
                "--mount=/proc/42/ns/mnt",
                "--",
                "nsenter",
                "--net=/run/netns/pch42-m1",
                "--",
                "df",
                "-h"
            ]
        );
        assert!(cmd("dom0-a")
            .unwrap()
            .contains(&"--net=/run/netns/pch42-h0".to_string()));
        assert!(cmd("client")
            .unwrap()
            .contains(&"--net=/run/netns/pch42-client".to_string()));
        let err = format!("{:#}", cmd("nosuch").unwrap_err());
        assert!(err.contains("web") && err.contains("dom0-a"), "{err}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
