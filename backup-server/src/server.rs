//! Agent connections (tokio + tokio-rustls).
//!
//! Per connection:
//! 1. TLS handshake (client certificate required, [`HANDSHAKE_TIMEOUT`]); the
//!    certificate's group URIs are read ([`crate::tls`]).
//! 2. `Hello` within [`HELLO_TIMEOUT`]: its group must be one of the certificate's
//!    groups; the codec has validated every name with `validate_name`; the journal
//!    thread registers disks and writers (a disk keeps its size and writer forever;
//!    a writer's generation may only grow) and produces the `Welcome` (per-writer
//!    durable prefixes and the committed vector).
//! 3. Then `Write` frames are checked against the hello (disk index, owning writer,
//!    generation, range within the disk) and queued to the journal thread;
//!    `Heartbeat` is answered with `HeartbeatReply`. The writer half forwards acks
//!    and every change of the group's committed vector as `Frame::Committed`.
//!    `Checkpoint` frames go to [`crate::checkpoint`] (validated there; its `Ack`s
//!    travel on the same outbound queue).
//!
//! Every rejection is logged with the peer, the agent and the reason, answered with
//! `Frame::Reject` where the stream still allows it, and only closes that one
//! connection. Bounds: [`OUTBOUND_QUEUE`] frames per connection (a connection that
//! does not read its acks is closed), the ingest queue and byte budget (see
//! [`crate::ingest`]), `limits.max_connections`, [`IDLE_TIMEOUT`] without any frame.

use crate::ingest::{ConnOut, Req, WriteReq, INGEST_BUDGET_KIB};
use crate::metrics::Metrics;
use crate::store::{lock, now_ms, Group, Store};
use crate::tls::cert_groups;
use pipecloud_core::codec::{encode_frame, negotiate_version, FrameReader};
use pipecloud_core::wire::{Frame, Hello, Write, WriteKind};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

/// TLS handshake deadline.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for the hello after the handshake.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that sends nothing (not even heartbeats) for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Frames queued towards one agent.
pub const OUTBOUND_QUEUE: usize = 8192;
/// Most writes of one connection handed to the journal thread at once (the
/// writes of one socket read, up to this many, travel as one batch).
const NET_BATCH: usize = 64;

/// Shared server context.
pub struct ServerCtx {
    pub store: Arc<Store>,
    pub ingest: mpsc::Sender<Req>,
    pub budget: Arc<Semaphore>,
    pub metrics: Arc<Metrics>,
    pub tls: TlsAcceptor,
    pub conn_limit: Arc<Semaphore>,
    next_conn: AtomicU64,
}

impl ServerCtx {
    /// A context.
    pub fn new(
        store: Arc<Store>,
        ingest: mpsc::Sender<Req>,
        metrics: Arc<Metrics>,
        tls: TlsAcceptor,
    ) -> Self {
        let max = store.limits.max_connections;
        ServerCtx {
            store,
            ingest,
            budget: Arc::new(Semaphore::new(INGEST_BUDGET_KIB)),
            metrics,
            tls,
            conn_limit: Arc::new(Semaphore::new(max)),
            next_conn: AtomicU64::new(1),
        }
    }
}

/// Accepts agents forever.
pub async fn accept_loop(listener: TcpListener, ctx: Arc<ServerCtx>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = ctx.conn_limit.clone().try_acquire_owned() else {
            warn!(%peer, max = ctx.store.limits.max_connections, "rejecting connection: too many connections");
            ctx.metrics.rejections.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        set_congestion(&tcp);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            handle(ctx, tcp, peer).await;
            drop(permit);
        });
    }
}

/// The backup's side of a replication stream (its acks) gets the first of
/// [`STREAM_CONGESTION`](pipecloud_core::wire::STREAM_CONGESTION) the kernel
/// accepts (unprivileged: usually Reno); none accepted, the host's default
/// stays (said once).
fn set_congestion(tcp: &tokio::net::TcpStream) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let sock = socket2::SockRef::from(tcp);
    let set = pipecloud_core::wire::STREAM_CONGESTION
        .iter()
        .any(|name| sock.set_tcp_congestion(name.as_bytes()).is_ok());
    if !set {
        WARNED.call_once(|| {
            warn!(wanted = ?pipecloud_core::wire::STREAM_CONGESTION,
                "cannot set the replication streams' congestion control; the host's default stays")
        });
    }
}

fn reject_log(ctx: &ServerCtx, peer: SocketAddr, agent: &str, reason: &str) {
    warn!(%peer, agent, reason, "rejecting agent");
    ctx.metrics.rejections.fetch_add(1, Ordering::Relaxed);
}

async fn send_direct(wr: &mut WriteHalf<TlsStream<TcpStream>>, f: &Frame) -> std::io::Result<()> {
    let mut buf = Vec::new();
    encode_frame(f, &mut buf).map_err(std::io::Error::other)?;
    wr.write_all(&buf).await?;
    wr.flush().await
}

/// A reject reason clipped to the wire limit at a character boundary
/// (`String::truncate` panics inside a multi-byte character).
fn clip_reason(reason: &str) -> String {
    let max = pipecloud_core::codec::MAX_REASON_LEN;
    let mut end = reason.len().min(max);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

async fn reject_direct(wr: &mut WriteHalf<TlsStream<TcpStream>>, reason: &str) {
    let r = clip_reason(reason);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = send_direct(wr, &Frame::Reject { reason: r }).await;
        let _ = wr.shutdown().await;
    })
    .await;
}

async fn read_hello(
    rd: &mut ReadHalf<TlsStream<TcpStream>>,
    reader: &mut FrameReader,
) -> Result<Hello, String> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match reader.next() {
            Ok(Some(Frame::Hello(h))) => return Ok(h),
            Ok(Some(other)) => return Err(format!("expected hello, got {}", frame_name(&other))),
            Ok(None) => {}
            Err(e) => return Err(format!("bad frame: {e}")),
        }
        let n = rd.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before hello".into());
        }
        let mut pos = 0;
        while pos < n {
            let took = reader.push(&buf[pos..n]);
            pos += took;
            if took == 0 {
                break;
            }
        }
        if pos < n {
            return Err("hello frame larger than the frame buffer".into());
        }
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "Hello",
        Frame::Welcome(_) => "Welcome",
        Frame::Reject { .. } => "Reject",
        Frame::Write(_) => "Write",
        Frame::Ack(_) => "Ack",
        Frame::Committed { .. } => "Committed",
        Frame::Heartbeat { .. } => "Heartbeat",
        Frame::HeartbeatReply { .. } => "HeartbeatReply",
        Frame::Checkpoint(_) => "Checkpoint",
    }
}

async fn handle(ctx: Arc<ServerCtx>, tcp: TcpStream, peer: SocketAddr) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, ctx.tls.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            reject_log(&ctx, peer, "-", &format!("TLS handshake failed: {e}"));
            return;
        }
        Err(_) => {
            reject_log(&ctx, peer, "-", "TLS handshake timed out");
            return;
        }
    };
    let groups = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(cert_groups)
        .unwrap_or_default();
    let (mut rd, mut wr) = tokio::io::split(tls);
    if groups.is_empty() {
        let reason =
            "client certificate is not bound to any group (no pipecloud:group/<name> URI SAN)";
        reject_log(&ctx, peer, "-", reason);
        reject_direct(&mut wr, reason).await;
        return;
    }
    let mut reader = FrameReader::new();
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut rd, &mut reader)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            reject_log(&ctx, peer, "-", &e);
            reject_direct(&mut wr, &e).await;
            return;
        }
        Err(_) => {
            reject_log(&ctx, peer, "-", "no hello within the deadline");
            reject_direct(&mut wr, "no hello within the deadline").await;
            return;
        }
    };
    let agent = hello.agent.clone();
    if !groups.contains(&hello.group) {
        let reason = format!(
            "certificate is bound to group(s) {groups:?}; hello names group {:?}",
            hello.group
        );
        reject_log(&ctx, peer, &agent, &reason);
        reject_direct(&mut wr, &reason).await;
        return;
    }
    let version = match negotiate_version(hello.min_version, hello.max_version) {
        Ok(v) => v,
        Err(e) => {
            reject_log(&ctx, peer, &agent, &e.to_string());
            reject_direct(&mut wr, &e.to_string()).await;
            return;
        }
    };
    let group = match ctx.store.group_or_create(&hello.group) {
        Ok(g) => g,
        Err(e) => {
            reject_log(&ctx, peer, &agent, &e.to_string());
            reject_direct(&mut wr, &e.to_string()).await;
            return;
        }
    };
    let (reply_tx, reply_rx) = oneshot::channel();
    let req = Req::Register {
        group: group.clone(),
        hello: hello.clone(),
        version,
        reply: reply_tx,
    };
    let welcome = match ctx.ingest.send(req).await {
        Ok(()) => reply_rx
            .await
            .unwrap_or_else(|_| Err("server shutting down".into())),
        Err(_) => Err("server shutting down".into()),
    };
    let welcome = match welcome {
        Ok(w) => w,
        Err(e) => {
            reject_log(&ctx, peer, &agent, &e);
            reject_direct(&mut wr, &e).await;
            return;
        }
    };
    // Group disk indexes of this hello's disks (all registered now).
    let disk_idx: Vec<u32> = {
        let st = lock(&group.state);
        hello
            .disks
            .iter()
            .map(|d| st.meta.disk_index(&d.name).unwrap_or(usize::MAX) as u32)
            .collect()
    };
    if let Err(e) = send_direct(&mut wr, &Frame::Welcome(welcome.clone())).await {
        warn!(%peer, agent = %agent, error = %e, "cannot send welcome");
        return;
    }
    let id = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
    let (kill, _) = watch::channel(false);
    let conn = Arc::new(ConnOut {
        id,
        agent: agent.clone(),
        tx,
        kill,
        killed: AtomicBool::new(false),
    });
    {
        let mut st = lock(&group.state);
        st.agents.insert(id, agent.clone());
    }
    crate::checkpoint::on_connect(&group, &conn);
    ctx.metrics.connections.fetch_add(1, Ordering::Relaxed);
    info!(%peer, agent = %agent, group = %group.name, conn = id, disks = hello.disks.len(),
        committed = %welcome.committed, "agent connected");
    let mut writer = tokio::spawn(outbound(
        wr,
        rx,
        group.signal.subscribe(),
        conn.kill.subscribe(),
        welcome.committed,
    ));
    let why = inbound(&ctx, &group, &conn, &hello, &disk_idx, &mut rd, reader).await;
    match &why {
        Ok(()) => info!(%peer, agent = %agent, conn = id, "agent disconnected"),
        Err(reason) => {
            reject_log(&ctx, peer, &agent, reason);
            // The writer task closes after sending a reject.
            let r = clip_reason(reason);
            let _ = conn.tx.try_send(Frame::Reject { reason: r });
        }
    }
    {
        let mut st = lock(&group.state);
        st.agents.remove(&id);
    }
    crate::checkpoint::on_disconnect(&group, id);
    if why.is_ok() {
        conn.kill.send_replace(true);
    }
    if tokio::time::timeout(Duration::from_secs(5), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// Reads frames until EOF (`Ok`) or a violation (`Err(reason)`).
async fn inbound(
    ctx: &ServerCtx,
    group: &Arc<Group>,
    conn: &Arc<ConnOut>,
    hello: &Hello,
    disk_idx: &[u32],
    rd: &mut ReadHalf<TlsStream<TcpStream>>,
    mut reader: FrameReader,
) -> Result<(), String> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut sig = group.signal.subscribe();
    let mut kill = conn.kill.subscribe();
    let mut stall_logged = false;
    let mut batch = Vec::with_capacity(NET_BATCH);
    let mut n = 0;
    loop {
        // Hand over the bytes read, draining complete frames as the buffer fills;
        // the writes of one read go to the journal thread as one batch.
        let mut pos = 0;
        loop {
            let took = reader.push(&buf[pos..n]);
            pos += took;
            let mut progressed = took > 0;
            loop {
                let r = match reader.next() {
                    Ok(Some(f)) => {
                        progressed = true;
                        let mut cx = FrameCx {
                            ctx,
                            group,
                            conn,
                            hello,
                            disk_idx,
                            stall_logged: &mut stall_logged,
                            batch: &mut batch,
                        };
                        handle_frame(&mut cx, f).await
                    }
                    Ok(None) => break,
                    Err(e) => Err(format!("bad frame: {e}")),
                };
                if let Err(e) = r {
                    // The writes before the violation were valid: journal them.
                    let _ = flush_batch(ctx, &mut batch).await;
                    return Err(e);
                }
            }
            flush_batch(ctx, &mut batch).await?;
            if pos >= n {
                break;
            }
            if !progressed {
                return Err("frame buffer full without a complete frame".into());
            }
        }
        n = tokio::select! {
            r = tokio::time::timeout(IDLE_TIMEOUT, rd.read(&mut buf)) => match r {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => { debug!(error = %e, "read error"); return Ok(()); }
                Err(_) => return Err(format!("no frame for {} s", IDLE_TIMEOUT.as_secs())),
            },
            _ = sig.wait_for(|s| s.fenced || s.failed) => return Err(format!("group {} is fenced or its journal failed", group.name)),
            _ = kill.wait_for(|k| *k) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
    }
}

/// What [`handle_frame`] works with.
struct FrameCx<'a> {
    ctx: &'a ServerCtx,
    group: &'a Arc<Group>,
    conn: &'a Arc<ConnOut>,
    hello: &'a Hello,
    disk_idx: &'a [u32],
    stall_logged: &'a mut bool,
    /// Admitted writes not yet handed to the journal thread.
    batch: &'a mut Vec<WriteReq>,
}

/// Hands the batched writes to the journal thread (one wake-up for all).
async fn flush_batch(ctx: &ServerCtx, batch: &mut Vec<WriteReq>) -> Result<(), String> {
    if batch.is_empty() {
        return Ok(());
    }
    let writes = std::mem::replace(batch, Vec::with_capacity(NET_BATCH));
    ctx.ingest
        .send(Req::Writes(writes))
        .await
        .map_err(|_| "server shutting down".to_string())
}

async fn handle_frame(cx: &mut FrameCx<'_>, frame: Frame) -> Result<(), String> {
    let (ctx, group, conn) = (cx.ctx, cx.group, cx.conn);
    match frame {
        Frame::Write(w) => {
            let mut req = check_write(group, conn, cx.hello, cx.disk_idx, w, Instant::now())?;
            // Admission may wait (journal bound, ingest budget): never wait while
            // holding admitted writes back from the journal thread, or they could
            // be what the wait is for.
            req.queued = match try_admit(ctx, group, &req.write, cx.stall_logged) {
                Some(size) => size,
                None => {
                    flush_batch(ctx, cx.batch).await?;
                    gate_journal_bound(ctx, group, &req.write, cx.stall_logged).await
                }
            };
            let kib = (payload(&req.write) / 1024 + 1).min(INGEST_BUDGET_KIB) as u32;
            let permit = match ctx.budget.clone().try_acquire_many_owned(kib) {
                Ok(p) => p,
                Err(_) => {
                    flush_batch(ctx, cx.batch).await?;
                    ctx.budget
                        .clone()
                        .acquire_many_owned(kib)
                        .await
                        .map_err(|_| "server shutting down".to_string())?
                }
            };
            req.permit = Some(permit);
            cx.batch.push(req);
            if cx.batch.len() >= NET_BATCH {
                flush_batch(ctx, cx.batch).await?;
            }
            Ok(())
        }
        Frame::Heartbeat { nonce } => {
            conn.send_or_kill(Frame::HeartbeatReply { nonce });
            Ok(())
        }
        Frame::HeartbeatReply { .. } => Ok(()),
        Frame::Checkpoint(c) => crate::checkpoint::on_frame(group, conn, c).await,
        other => Err(format!(
            "unexpected {} frame from an agent",
            frame_name(&other)
        )),
    }
}

fn payload(w: &Write) -> usize {
    match &w.kind {
        WriteKind::Data(d) => d.len(),
        _ => 0,
    }
}

fn check_write(
    group: &Arc<Group>,
    conn: &Arc<ConnOut>,
    hello: &Hello,
    disk_idx: &[u32],
    w: Write,
    recv_at: Instant,
) -> Result<WriteReq, String> {
    let i = usize::from(w.disk);
    let (Some(d), Some(&gi)) = (hello.disks.get(i), disk_idx.get(i)) else {
        return Err(format!(
            "write {} seq {} names disk index {} but the hello announced {} disk(s)",
            w.writer,
            w.seq,
            w.disk,
            hello.disks.len()
        ));
    };
    if d.writer != w.writer {
        return Err(format!(
            "write of {} seq {} to disk {} which belongs to {}",
            w.writer, w.seq, d.name, d.writer
        ));
    }
    if d.generation != w.generation {
        return Err(format!(
            "write of {} seq {} has generation {}, the hello announced {}",
            w.writer, w.seq, w.generation, d.generation
        ));
    }
    let len = match &w.kind {
        WriteKind::Data(x) => x.len() as u64,
        WriteKind::Zeroes { len } | WriteKind::Trim { len } => *len,
    };
    if w.offset.checked_add(len).is_none_or(|end| end > d.size) {
        return Err(format!(
            "write of {} seq {} at {}+{len} is beyond disk {} of {} bytes",
            w.writer, w.seq, w.offset, d.name, d.size
        ));
    }
    Ok(WriteReq {
        group: group.clone(),
        conn: conn.clone(),
        disk: gi,
        disk_name: d.name.clone(),
        write: w,
        recv_ms: now_ms(),
        recv_at,
        permit: None,
        queued: 0,
    })
}

/// Backpressure at the journal bound (see README "At the bounds"). Journaled plus
/// queued bytes must stay below `max_journal_bytes`, except for writes that some
/// journaled write depends on. Returns the bytes now counted as queued.
/// Admits `w` under the journal bound if there is room now (or it must enter
/// regardless): returns the bytes it was counted with, `None` if it must wait.
fn try_admit(ctx: &ServerCtx, group: &Group, w: &Write, logged: &mut bool) -> Option<u64> {
    let max = ctx.store.limits.max_journal_bytes;
    let size = payload(w) as u64 + 256;
    let used =
        group.journal_bytes.load(Ordering::Relaxed) + group.queued_bytes.load(Ordering::Relaxed);
    let admit = if used + size <= max {
        if *logged {
            info!(group = %group.name, "journal below its bound again; ingest resumed");
            *logged = false;
        }
        true
    } else {
        let st = lock(&group.state);
        // Fenced / failed: let the journal thread drop it (logged there). A write
        // some journaled write depends on may always enter: it can only help the
        // causal cut (and thus the applier) advance.
        st.meta.fenced || st.failed.is_some() || w.seq <= st.demand.get(w.writer.index())
    };
    if admit {
        group.queued_bytes.fetch_add(size, Ordering::Relaxed);
        Some(size)
    } else {
        None
    }
}

async fn gate_journal_bound(ctx: &ServerCtx, group: &Group, w: &Write, logged: &mut bool) -> u64 {
    let mut counted = false;
    loop {
        if let Some(size) = try_admit(ctx, group, w, logged) {
            return size;
        }
        if !counted {
            ctx.metrics.stalled.fetch_add(1, Ordering::Relaxed);
            counted = true;
        }
        if !*logged {
            warn!(group = %group.name, bytes = group.journal_bytes.load(Ordering::Relaxed),
                max = ctx.store.limits.max_journal_bytes,
                "JOURNAL AT ITS BOUND: holding back new writes (agents stall or degrade by their policy) until the applier frees segments");
            *logged = true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes queued frames and committed-vector updates to the agent.
async fn outbound(
    mut wr: WriteHalf<TlsStream<TcpStream>>,
    mut rx: mpsc::Receiver<Frame>,
    mut sig: watch::Receiver<crate::store::Signal>,
    mut kill: watch::Receiver<bool>,
    mut last_committed: pipecloud_core::CountVector,
) {
    let mut buf = Vec::with_capacity(64 * 1024);
    // Forward a change that happened between the welcome and the subscription.
    sig.mark_changed();
    loop {
        buf.clear();
        let mut close = false;
        tokio::select! {
            f = rx.recv() => {
                let Some(f) = f else { break };
                close |= push_frame(&mut buf, &f);
            }
            r = sig.changed() => {
                if r.is_err() { break; }
                close |= push_signal(&mut buf, &mut sig, &mut last_committed);
            }
            _ = kill.wait_for(|k| *k) => break,
        }
        // Whatever else is ready goes in the same socket write: the journal thread
        // publishes the committed vector and queues the acks of one batch together.
        while buf.len() < 256 * 1024 && !close {
            match rx.try_recv() {
                Ok(f) => close |= push_frame(&mut buf, &f),
                Err(_) => break,
            }
        }
        if !close && sig.has_changed().unwrap_or(false) {
            close |= push_signal(&mut buf, &mut sig, &mut last_committed);
        }
        if !buf.is_empty() {
            let r = tokio::time::timeout(Duration::from_secs(30), async {
                wr.write_all(&buf).await?;
                wr.flush().await
            })
            .await;
            if !matches!(r, Ok(Ok(()))) {
                break;
            }
        }
        if close {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), wr.shutdown()).await;
}

/// Encodes what the group's signal says (a new committed vector, or a reject when
/// it is fenced or failed) into `buf`; returns whether the connection closes.
fn push_signal(
    buf: &mut Vec<u8>,
    sig: &mut watch::Receiver<crate::store::Signal>,
    last_committed: &mut pipecloud_core::CountVector,
) -> bool {
    let s = sig.borrow_and_update().clone();
    if s.fenced || s.failed {
        push_frame(
            buf,
            &Frame::Reject {
                reason: "group fenced (failover) or journal failed; closing".into(),
            },
        );
        true
    } else {
        if s.committed != *last_committed {
            *last_committed = s.committed;
            push_frame(
                buf,
                &Frame::Committed {
                    vector: s.committed,
                },
            );
        }
        false
    }
}

/// Encodes `f` into `buf`; returns whether the connection closes after it (a reject).
fn push_frame(buf: &mut Vec<u8>, f: &Frame) -> bool {
    if let Err(e) = encode_frame(f, buf) {
        warn!(error = %e, "cannot encode outbound frame");
    }
    matches!(f, Frame::Reject { .. })
}
