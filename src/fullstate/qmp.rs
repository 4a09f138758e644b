//! A minimal QMP client: the agent's control line to one QEMU guest.
//!
//! QMP is QEMU's JSON protocol on a unix socket: QEMU greets, the client sends
//! `qmp_capabilities`, then each `{"execute": …, "id": n}` gets one
//! `{"return": …}` or `{"error": …}` with the same id; asynchronous
//! `{"event": …}` lines may come in between and are skipped. The epoch loop uses
//! `stop`, `cont` and `xen-save-devices-state` (the device state without RAM,
//! ~1 ms on this machine; see docs/design.md §9), so the client is synchronous
//! (std, blocking with a timeout): one command at a time is all a pause needs, and
//! a thread blocked on a socket read costs nothing while the guest runs.
//!
//! Every read has a deadline ([`Qmp::connect`]'s `timeout`): a QEMU that hangs
//! or died makes the call fail with context (an alarm for the caller), never a
//! pause that waits forever. One response line is at most [`MAX_LINE`] bytes.
//! QEMU's process id comes from the socket itself (`SO_PEERCRED`): it is the
//! process whose `/proc/PID/pagemap` the agent scans.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest QMP line accepted (QEMU's answers to our commands are < 1 KiB).
pub const MAX_LINE: u64 = 1 << 20;

/// A connected QMP session.
pub struct Qmp {
    path: PathBuf,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    pid: u32,
    next_id: u64,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and enters
    /// command mode. `timeout` bounds every later read and write.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let ctx = || format!("QMP {}", path.display());
        let stream = UnixStream::connect(path).with_context(ctx)?;
        stream.set_read_timeout(Some(timeout)).with_context(ctx)?;
        stream.set_write_timeout(Some(timeout)).with_context(ctx)?;
        let pid = peer_pid(&stream).with_context(ctx)?;
        let mut qmp = Qmp {
            path: path.to_owned(),
            reader: BufReader::new(stream.try_clone().with_context(ctx)?),
            writer: stream,
            pid,
            next_id: 1,
        };
        let greeting = qmp.read_message().with_context(ctx)?;
        if greeting.get("QMP").is_none() {
            bail!("{}: no QMP greeting: {greeting}", path.display());
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// The QEMU process on the other end of the socket.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let what = format!("QMP {} `{command}`", self.path.display());
        let ctx = || what.clone();
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).with_context(ctx)?;
        loop {
            let m = self.read_message().with_context(ctx)?;
            if m.get("event").is_some() {
                continue;
            }
            if m.get("id").and_then(Value::as_u64) != Some(id) {
                bail!("{}: answer for another command: {m}", ctx());
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                bail!("{}: {e}", ctx());
            }
            bail!("{}: neither return nor error: {m}", ctx());
        }
    }

    /// Stops the guest's vCPUs (QEMU also drains its block I/O).
    pub fn stop(&mut self) -> Result<()> {
        self.execute("stop", None).map(drop)
    }

    /// Lets the guest run again.
    pub fn cont(&mut self) -> Result<()> {
        self.execute("cont", None).map(drop)
    }

    /// The run state (`running`, `paused`, …).
    pub fn status(&mut self) -> Result<String> {
        let r = self.execute("query-status", None)?;
        r.get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("QMP query-status: no status in {r}"))
    }

    /// Writes the guest's device state (no RAM) to `file` (the guest must be stopped).
    pub fn save_device_state(&mut self, file: &Path) -> Result<()> {
        let name = file
            .to_str()
            .ok_or_else(|| anyhow!("device state path {} is not UTF-8", file.display()))?;
        self.execute(
            "xen-save-devices-state",
            Some(json!({ "filename": name, "live": false })),
        )
        .map(drop)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .context("read")?;
        if n == 0 {
            bail!("QEMU closed the socket");
        }
        if line.last() != Some(&b'\n') {
            bail!("line longer than {MAX_LINE} bytes");
        }
        serde_json::from_slice(&line).context("not JSON")
    }
}

/// The process id of the peer of a unix socket (`SO_PEERCRED`).
pub fn peer_pid(s: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for the call and sized for SO_PEERCRED.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    u32::try_from(cred.pid)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| std::io::Error::other("SO_PEERCRED: no peer process"))
}
