//! Thin helpers for running system commands with context, inside network
//! namespaces, and for processes that must die with the harness.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs a command to completion; returns stdout. Fails with the command line,
/// exit status and stderr in the error.
pub fn run(cmd: &mut Command) -> Result<String> {
    let line = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `args` (program first) to completion; returns stdout.
pub fn sh(args: &[&str]) -> Result<String> {
    let (prog, rest) = args.split_first().context("empty command")?;
    run(Command::new(prog).args(rest))
}

/// Like [`sh`] but ignores failure (teardown paths).
pub fn sh_quiet(args: &[&str]) {
    if let Some((prog, rest)) = args.split_first() {
        let _ = Command::new(prog)
            .args(rest)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A command that runs inside network namespace `ns` (entered with nsenter so that
/// the caller's mount namespace, and the mounts the harness made, stay visible).
pub fn ns_cmd(ns: &str, prog: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(prog);
    c
}

/// Runs `args` inside namespace `ns`; returns stdout.
pub fn ns_sh(ns: &str, args: &[&str]) -> Result<String> {
    let (prog, rest) = args.split_first().context("empty command")?;
    run(ns_cmd(ns, prog).args(rest))
}

/// A child process that is killed (SIGKILL) and reaped when dropped.
pub struct Guarded {
    pub name: String,
    pub child: Option<Child>,
}

impl Guarded {
    /// Spawns `cmd` with stdio redirected to `log` (daemons started from a test
    /// must not hold the harness's pipes: docs/machine.md,
    /// "Network namespaces and mounts").
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Guarded> {
        let f =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let f2 = f.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Guarded {
            name: name.to_string(),
            child: Some(child),
        })
    }

    /// Process id, if still owned.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// Sends a signal (e.g. libc::SIGKILL, SIGSTOP).
    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: plain kill(2) on a pid we own.
            unsafe {
                libc::kill(pid as i32, sig);
            }
        }
    }

    /// SIGKILL and reap, waiting at most [`REAP_WAIT`]: a process in
    /// uninterruptible sleep (a write stalled on a fenced agent's disk) dies
    /// only when its I/O ends, and teardown must not hang on it. Past the
    /// bound it is left to die as a zombie of the harness, and said so.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            reap_bounded(&self.name, &mut c);
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our child.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let t0 = Instant::now();
            while t0.elapsed() < grace {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            reap_bounded(&self.name, &mut c);
        }
    }
}

/// How long [`Guarded::kill`] waits for a killed process to be reaped.
pub const REAP_WAIT: Duration = Duration::from_secs(15);

/// Waits up to [`REAP_WAIT`] for a killed child to exit.
fn reap_bounded(name: &str, c: &mut Child) {
    let t0 = Instant::now();
    while t0.elapsed() < REAP_WAIT {
        if !matches!(c.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "harness: {name} (pid {}) did not exit {REAP_WAIT:?} after SIGKILL \
         (uninterruptible I/O?): left behind as a zombie",
        c.id()
    );
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// Re-executes the current program inside a private mount namespace (once), so
/// every mount the harness makes is invisible to the rest of the machine and
/// vanishes with it (docs/design.md §5, testing on one machine;
/// docs/machine.md, "Network namespaces and mounts").
pub fn ensure_private_mount_ns() -> Result<()> {
    const MARK: &str = "PIPECLOUD_HARNESS_PRIVATE_MNT";
    if std::env::var_os(MARK).is_some() {
        // Every run first reaps loop devices a dead harness left (src/loopdev.rs).
        pipecloud::loopdev::reap_stale();
        return Ok(());
    }
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("current_exe")?;
    // exec (not spawn): the pid stays the same, so signals (Ctrl-C, timeout's
    // SIGTERM) reach the harness that owns the site and it tears down.
    let err = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(MARK, "1")
        .exec();
    Err(err).context("re-executing the harness under unshare --mount")
}

/// Puts every thread of process `pid` (or of its direct children, when it is
/// a wrapper) whose name starts with `prefix` at `SCHED_FIFO` priority 1
/// (`on`) or back to `SCHED_OTHER`, with `chrt`. Errors when no such thread
/// exists: an A/B that changed nothing must not pass for one.
pub fn set_thread_realtime(pid: u32, prefix: &str, on: bool) -> Result<()> {
    let mut pids = vec![pid];
    if let Ok(c) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        pids.extend(c.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    let mut n = 0;
    for p in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if !comm.trim().starts_with(prefix) {
                continue;
            }
            let tid = t.file_name().to_string_lossy().to_string();
            if on {
                sh(&["chrt", "-f", "-p", "1", &tid])?;
            } else {
                sh(&["chrt", "-o", "-p", "0", &tid])?;
            }
            n += 1;
        }
    }
    if n == 0 {
        bail!("no thread named {prefix}* in process {pid} or its children");
    }
    Ok(())
}
