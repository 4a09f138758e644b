//! Network-namespace guards for integration tests (needs root).
//!
//! Reusable by any test: include it with
//!
//! ```ignore
//! #[path = "support/netns.rs"]
//! mod netns;
//! ```
//!
//! - [`Netns::new`] creates `/run/netns/pc<pid>-<role><n>` (unique per process
//!   and call) and deletes it when dropped, even if the test panics. Veths with
//!   an end inside die with the namespace.
//! - [`Netns::ip`] runs `ip -n <name> ...`; [`Netns::veth_to`] makes a veth pair
//!   directly between two namespaces (never visible in the root namespace, so
//!   parallel tests cannot collide on interface names).
//! - [`Netns::spawn`] runs a closure on a thread that joined the namespace:
//!   sockets it creates live there. [`Netns::run`] does the same and waits.
//! - [`Netns::sysctl`] writes `/proc/sys/...` as seen inside the namespace.
//!
//! Processes started inside a namespace keep it alive after deletion; tests
//! that start any must kill them before the guard drops.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A network namespace owned by the test; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Netns {
    /// Creates a fresh namespace named after `role` (keep it short: a few letters)
    /// with its loopback up.
    pub fn new(role: &str) -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("pc{}-{role}{n}", std::process::id());
        sh(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip("link set lo up");
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for `setns`, `nsenter --net=` and the agent's `netns` options.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs `ip -n <name> <args>` (split on whitespace); panics on failure.
    pub fn ip(&self, args: &str) -> String {
        sh(Command::new("ip")
            .args(["-n", &self.name])
            .args(args.split_whitespace()))
    }

    /// Creates a veth pair: `local_if` here, `peer_if` in `peer`, both up.
    pub fn veth_to(&self, local_if: &str, peer: &Netns, peer_if: &str) {
        self.ip(&format!(
            "link add {local_if} type veth peer name {peer_if} netns {}",
            peer.name
        ));
        self.ip(&format!("link set {local_if} up"));
        peer.ip(&format!("link set {peer_if} up"));
    }

    /// Adds `addr` (CIDR) to `dev`.
    pub fn addr(&self, dev: &str, addr: &str) {
        self.ip(&format!("addr add {addr} dev {dev}"));
    }

    /// Writes `value` to `/proc/sys/<key with dots as slashes>` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_owned();
        self.run(move || std::fs::write(&path, value))
            .unwrap_or_else(|e| panic!("sysctl {key}: {e}"));
    }

    /// Runs `f` on a new thread inside the namespace.
    pub fn spawn<T, F>(&self, f: F) -> JoinHandle<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let ns = File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            // SAFETY: setns on a valid namespace fd, for this thread only.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// Runs `f` inside the namespace and waits for it.
    pub fn run<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        match self.spawn(f).join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// A `Command` for `prog` that runs inside the namespace (via `nsenter`).
    pub fn command(&self, prog: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display())).arg(prog);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
