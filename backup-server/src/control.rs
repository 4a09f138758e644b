//! Operator commands: `status`, `failover`, `restore`, `unfence`.
//!
//! A running server listens on `<data_dir>/control.sock` (mode 0600: only the
//! server's own user). Messages are `[len: u32 LE][postcard]`, a [`Request`] one way
//! and a stream of [`Reply`]s back (`Progress` any number of times, then exactly one
//! final reply). When no server runs, the CLI opens the data directory itself
//! (guarded by the same flock the server holds) and runs the operation directly.
//!
//! `failover` fences the group first (through the journal thread in a server, so the
//! fence is a clean cut in the write stream; persisted, so a restart stays fenced),
//! then computes the largest causally closed cut of everything journaled and
//! materialises every volume of the group at exactly that cut; for a checkpoint
//! group that is `active` (not disk-only, not seeding) it writes the disks at the
//! last acknowledged epoch's barrier and the RAM and device state of that epoch
//! instead ([`crate::checkpoint::failover_output`]).
//! `restore` does not
//! fence: it materialises the latest closed cut not after a time, or a given cut.

use crate::store::{lock, Group, Store};
use crate::volume::Materialised;
use pipecloud_core::{CountVector, WriterId, MAX_WRITERS};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Largest control message.
pub const MAX_CONTROL_MSG: usize = 16 << 20;

/// Where a restore goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum At {
    /// Latest closed cut whose writes were all received at or before this time (unix ms).
    TimeMs(u64),
    /// Exactly this cut (must be causally closed and within the retention window).
    Cut(CountVector),
}

/// A command.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    Status,
    Failover { group: String, out: PathBuf },
    Restore { group: String, at: At, out: PathBuf },
    Unfence { group: String },
}

/// Per-writer status.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WriterStatus {
    pub writer: WriterId,
    pub generation: u64,
    /// Durable (committed) prefix.
    pub durable: u64,
    /// Applied into the base volumes.
    pub applied: u64,
    /// Journaled writes beyond the first hole.
    pub ahead: usize,
}

/// Per-group status.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupStatus {
    pub name: String,
    pub fenced: bool,
    pub failed: Option<String>,
    pub agents: Vec<String>,
    pub journal_bytes: u64,
    pub segments: usize,
    pub committed: CountVector,
    /// Largest causally closed cut of everything journaled (what a failover now yields).
    pub durable_cut: CountVector,
    /// Oldest restorable point (cut the base volumes are at) and its time.
    pub oldest_cut: CountVector,
    pub oldest_time_ms: u64,
    /// Journaled writes not yet in the base volumes, and those the causal cut holds back.
    pub apply_lag_writes: u64,
    pub held_by_cut_writes: u64,
    pub writers: Vec<WriterStatus>,
    /// Full-state epochs (a checkpoint group only).
    pub checkpoint: Option<crate::checkpoint::CkptStatus>,
    /// A failback's resync is writing the base volumes: the journal's apply
    /// waits for it (docs/design.md §15).
    #[serde(default)]
    pub resyncing: bool,
}

/// A reply.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Reply {
    Status(Vec<GroupStatus>),
    Progress { done: u64, total: u64 },
    Done(Materialised),
    Ok(String),
    Error(String),
}

/// Status of every group.
pub fn status(store: &Store) -> Vec<GroupStatus> {
    store
        .groups()
        .iter()
        .map(|g| {
            let resyncing = g.resyncing();
            let st = lock(&g.state);
            let durable_cut = st.durable_cut();
            let committed = st.committed();
            let mut lag = 0;
            let mut held = 0;
            let writers = st
                .writers
                .iter()
                .map(|(w, ix)| {
                    lag += ix.durable() - ix.base();
                    held += ix.durable().saturating_sub(durable_cut.get(w.index()));
                    WriterStatus {
                        writer: *w,
                        generation: ix.generation,
                        durable: ix.durable(),
                        applied: ix.base(),
                        ahead: ix.ahead_len(),
                    }
                })
                .collect();
            let h = st.horizon();
            GroupStatus {
                name: g.name.clone(),
                fenced: st.meta.fenced,
                failed: st.failed.clone(),
                agents: st.agents.values().cloned().collect(),
                journal_bytes: g.journal_bytes.load(Ordering::Relaxed),
                segments: st.segments.len(),
                committed,
                durable_cut,
                oldest_cut: h.cut,
                oldest_time_ms: h.time_ms,
                apply_lag_writes: lag,
                held_by_cut_writes: held,
                writers,
                checkpoint: g.checkpoint.status(),
                resyncing,
            }
        })
        .collect()
}

fn group(store: &Store, name: &str) -> Result<Arc<Group>, String> {
    store
        .group(name)
        .ok_or_else(|| format!("no group named {name:?} in {}", store.data_dir.display()))
}

/// Failover: `fence` the group, then materialise the largest closed cut into `out`.
pub fn failover(
    store: &Store,
    name: &str,
    out: &Path,
    fence: &dyn Fn(&Arc<Group>) -> Result<(), String>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Materialised, String> {
    let g = group(store, name)?;
    fence(&g)?;
    // Full state only while `active`; a group seeding a period or disk-only again
    // after a `Leave` fails over to the causal cut (docs/design.md §13).
    if let Some((mut m, c)) = crate::checkpoint::failover_output(&g, out, progress)? {
        m.checkpoint = Some(Box::new(c));
        return Ok(m);
    }
    let cut = lock(&g.state).durable_cut();
    g.materialise(cut, out, progress)
}

/// Restore: materialise the cut selected by `at` into `out` (no fence).
pub fn restore(
    store: &Store,
    name: &str,
    at: &At,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Materialised, String> {
    let g = group(store, name)?;
    let cut = {
        let st = lock(&g.state);
        match at {
            At::TimeMs(t) => {
                let h = st.horizon();
                if !h.cut.is_zero() && *t < h.time_ms {
                    return Err(format!(
                        "time {} is before the oldest restorable point {} (cut {}); it fell out of the retention window",
                        fmt_ms(*t),
                        fmt_ms(h.time_ms),
                        h.cut
                    ));
                }
                st.cut_at_time(*t)
            }
            At::Cut(c) => {
                st.check_cut(c)?;
                *c
            }
        }
    };
    g.materialise(cut, out, progress)
}

/// Formats unix ms as RFC 3339 (UTC).
pub fn fmt_ms(ms: u64) -> String {
    let ns = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(ns)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// Parses `--at`: an RFC 3339 time, or a cut like `[3,0,7]` / `3,0,7`.
pub fn parse_at(s: &str) -> Result<At, String> {
    let t = s.trim();
    if let Ok(dt) = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339) {
        let ms = dt.unix_timestamp_nanos() / 1_000_000;
        return u64::try_from(ms)
            .map(At::TimeMs)
            .map_err(|_| format!("time {t} is before 1970"));
    }
    let inner = t.trim_start_matches('[').trim_end_matches(']');
    let parts: Result<Vec<u64>, _> = inner.split(',').map(|p| p.trim().parse::<u64>()).collect();
    match parts {
        Ok(v) if !v.is_empty() && v.len() <= MAX_WRITERS => Ok(At::Cut(CountVector::from_slice(&v))),
        _ => Err(format!(
            "--at {t:?}: expected an RFC 3339 time (2024-05-01T12:00:00Z) or a cut of at most {MAX_WRITERS} seqs ([3,0,7])"
        )),
    }
}

/// Writes one length-prefixed message.
pub fn write_msg<T: Serialize>(w: &mut impl Write, m: &T) -> std::io::Result<()> {
    let body = postcard::to_stdvec(m).map_err(std::io::Error::other)?;
    w.write_all(&(body.len() as u32).to_le_bytes())?;
    w.write_all(&body)?;
    w.flush()
}

/// Reads one length-prefixed message.
pub fn read_msg<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_CONTROL_MSG {
        return Err(std::io::Error::other(format!(
            "control message of {len} bytes is too large"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    postcard::from_bytes(&body).map_err(std::io::Error::other)
}

/// Path of the control socket.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}

/// Sends a request to a running server; `None` if no server listens.
pub fn call(
    data_dir: &Path,
    req: &Request,
    progress: &mut dyn FnMut(u64, u64),
) -> Option<Result<Reply, String>> {
    let mut s = std::os::unix::net::UnixStream::connect(socket_path(data_dir)).ok()?;
    Some((|| {
        write_msg(&mut s, req).map_err(|e| format!("control socket: {e}"))?;
        loop {
            match read_msg::<Reply>(&mut s).map_err(|e| format!("control socket: {e}"))? {
                Reply::Progress { done, total } => progress(done, total),
                other => return Ok(other),
            }
        }
    })())
}
