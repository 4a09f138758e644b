//! A small synchronous QMP client: what `vm restore` and the tests need.
//!
//! QMP is QEMU's JSON control protocol on a Unix socket: a greeting, then
//! `qmp_capabilities`, then one `{"execute": ...}` at a time, each answered by
//! one `{"return": ...}` or `{"error": ...}` line; asynchronous `{"event": ...}`
//! lines may come in between and are kept for [`Qmp::wait_event`]. Every read
//! has a deadline: a QEMU that stops answering is an error, never a hang.

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Longest QMP line accepted (QEMU's answers to our commands are small).
const MAX_LINE_BYTES: usize = 1 << 20;
/// Events kept while waiting for a command's answer; older ones are dropped.
const MAX_EVENTS: usize = 256;

/// A QMP connection that has negotiated capabilities.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Value>,
    timeout: Duration,
}

impl Qmp {
    /// Connects to `path` (retrying until `timeout` while QEMU creates it) and
    /// enters command mode. Each later answer must come within `timeout` too.
    pub fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    tracing::trace!("QMP {} not there yet: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("connecting to QMP {}", path.display()))
                }
            }
        };
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: VecDeque::new(),
            timeout,
        };
        let greeting = q.read_line().context("reading the QMP greeting")?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_line(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        let n = std::io::Read::take(&mut self.reader, MAX_LINE_BYTES as u64)
            .read_line(&mut line)
            .context("reading from QMP")?;
        if n == 0 {
            bail!("QMP closed the connection (QEMU exited?)");
        }
        if !line.ends_with('\n') {
            bail!("QMP line longer than {MAX_LINE_BYTES} bytes");
        }
        serde_json::from_str(&line).with_context(|| format!("bad QMP line {line:?}"))
    }

    /// Runs `command` with `arguments` and returns its `return` value; a QMP
    /// `error` is an error carrying QEMU's description.
    pub fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .with_context(|| format!("sending QMP {command}"))?;
        loop {
            let v = self
                .read_line()
                .with_context(|| format!("waiting for the answer to QMP {command}"))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(anyhow!(
                    "QMP {command} failed: {}",
                    e.get("desc").and_then(Value::as_str).unwrap_or("?")
                ));
            }
            if v.get("event").is_some() {
                if self.events.len() == MAX_EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(v);
            }
        }
    }

    /// Waits for the event called `name` (one seen earlier counts) within the timeout.
    pub fn wait_event(&mut self, name: &str) -> anyhow::Result<Value> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(self.events.remove(i).unwrap_or_default());
        }
        let deadline = Instant::now() + self.timeout;
        while Instant::now() < deadline {
            let v = self.read_line()?;
            if v["event"] == name {
                return Ok(v);
            }
        }
        bail!("no QMP event {name} within {:?}", self.timeout)
    }

    /// The run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub fn status(&mut self) -> anyhow::Result<String> {
        let r = self.execute("query-status", json!({}))?;
        Ok(r["status"].as_str().unwrap_or("?").to_owned())
    }
}
