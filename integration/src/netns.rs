//! Network namespaces and veth links with Drop guards.
//!
//! Naming: every object carries the run's prefix (`pc<pid>x`), so parallel runs
//! and leftovers of a crashed run are told apart; `cleanup_prefix` removes
//! everything a crashed run left (namespaces die with their veths, rules and
//! routes inside them).

use crate::sys::{ns_sh, sh, sh_quiet};
use anyhow::{Context, Result};
use std::net::IpAddr;

/// A named network namespace, deleted (with everything inside) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates namespace `name` with loopback up.
    pub fn new(name: &str) -> Result<Netns> {
        sh_quiet(&["ip", "netns", "del", name]);
        sh(&["ip", "netns", "add", name]).with_context(|| format!("creating netns {name}"))?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns_sh(name, &["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace.
    pub fn sh(&self, args: &[&str]) -> Result<String> {
        ns_sh(&self.name, args)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.sh(&["sysctl", "-qw", &format!("{key}={value}")])?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill anything still running inside, then delete.
        if let Ok(pids) = sh(&["ip", "netns", "pids", &self.name]) {
            for p in pids.split_whitespace() {
                sh_quiet(&["kill", "-9", p]);
            }
        }
        sh_quiet(&["ip", "netns", "del", &self.name]);
    }
}

/// Creates a veth pair `a_if` in `a` and `b_if` in `b`, both up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    sh(&[
        "ip", "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ])
    .with_context(|| format!("veth {}:{a_if} <-> {}:{b_if}", a.name, b.name))?;
    a.sh(&["ip", "link", "set", a_if, "up"])?;
    b.sh(&["ip", "link", "set", b_if, "up"])?;
    Ok(())
}

/// Adds `addr/prefix` to `dev` in `ns`. IPv6 addresses skip duplicate address
/// detection (`nodad`): the emulated links are ours, and a tentative address would
/// refuse to be used for a second or so.
pub fn addr(ns: &Netns, dev: &str, ip: impl Into<IpAddr>, prefix: u8) -> Result<()> {
    let ip = ip.into();
    let cidr = format!("{ip}/{prefix}");
    let mut args = vec!["ip", "addr", "add", &cidr, "dev", dev];
    if ip.is_ipv6() {
        args.push("nodad");
    }
    ns.sh(&args)?;
    Ok(())
}

/// Adds a route `dst` (IPv4 or IPv6) via device (and optional gateway) in `ns`.
pub fn route(ns: &Netns, dst: &str, dev: &str, via: Option<impl Into<IpAddr>>) -> Result<()> {
    let mut args = vec!["ip", "route", "replace", dst];
    let via_s;
    if let Some(v) = via {
        via_s = v.into().to_string();
        args.extend(["via", &via_s]);
    }
    args.extend(["dev", dev, "onlink"]);
    ns.sh(&args)?;
    Ok(())
}

/// Removes every namespace whose name starts with `prefix` (leftovers of a crashed run).
pub fn cleanup_prefix(prefix: &str) {
    if let Ok(list) = sh(&["ip", "netns", "list"]) {
        for line in list.lines() {
            if let Some(name) = line.split_whitespace().next() {
                if name.starts_with(prefix) {
                    drop(Netns {
                        name: name.to_string(),
                    });
                }
            }
        }
    }
}

/// Moves the CALLING THREAD into namespace `ns` (threads it spawns afterwards
/// inherit it). Use from a dedicated thread: see [`spawn_in`].
pub fn enter(ns: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("opening /run/netns/{ns}"))?;
    // SAFETY: setns(2) on a valid namespace fd; affects only this thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setns into {ns}"));
    }
    Ok(())
}

/// Runs `f` on a new thread inside namespace `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns)?;
        f()
    })
}
