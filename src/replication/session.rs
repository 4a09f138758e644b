//! The connection driver: connect (TCP + mutual TLS), hello/welcome, then stream
//! buffered writes and heartbeats while reading acks, committed vectors and
//! heartbeat replies; on any failure drop the connection, back off and start
//! again. Every unacked write is re-sent on the next connection.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pipecloud_core::codec::{encode_frame, FrameReader};
use pipecloud_core::wire::{
    Checkpoint, DiskHello, Frame, Hello, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use pipecloud_core::{Seq, WriterId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::state::{SendDecision, SendRule};
use super::Shared;

/// Most bytes of write frames gathered into one socket write.
const MAX_BATCH_BYTES: u64 = 4 << 20;
/// Read buffer size.
const READ_CHUNK: usize = 64 * 1024;

/// Why a session ended (logged, and kept as the status' last error).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connecting to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("connecting to {endpoint}: timed out after {after:?}")]
    ConnectTimeout { endpoint: String, after: Duration },
    #[error("backup rejected the hello: {0}")]
    Rejected(String),
    #[error("connection I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("backup closed the connection")]
    Closed,
    #[error("backup sent an undecodable frame: {0}")]
    Codec(#[from] pipecloud_core::codec::CodecError),
    #[error(transparent)]
    Protocol(#[from] super::state::ProtocolViolation),
    #[error("unexpected {0} frame from the backup")]
    Unexpected(&'static str),
    #[error("backup silent for {0:?} (heartbeat timeout)")]
    Silent(Duration),
    #[error("client shut down")]
    Shutdown,
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "hello",
        Frame::Welcome(_) => "welcome",
        Frame::Reject { .. } => "reject",
        Frame::Write(_) => "write",
        Frame::Ack(_) => "ack",
        Frame::Committed { .. } => "committed",
        Frame::Heartbeat { .. } => "heartbeat",
        Frame::HeartbeatReply { .. } => "heartbeat-reply",
        Frame::Checkpoint(_) => "checkpoint",
    }
}

/// Runs sessions until the client shuts down.
pub async fn run(shared: Arc<Shared>) {
    let cfg = &shared.config;
    let mut backoff = cfg.reconnect_min;
    let mut shutdown = shared.shutdown.subscribe();
    // Detached: no connection until attached (module docs of `replication`).
    let mut attached = shared.attached.subscribe();
    while !*attached.borrow_and_update() {
        if *shutdown.borrow_and_update() {
            return;
        }
        tokio::select! {
            r = attached.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        let result = tokio::select! {
            r = session(&shared) => r,
            _ = shutdown.changed() => Err(SessionError::Shutdown),
        };
        let established = match result {
            Err(SessionError::Shutdown) => return,
            Ok(()) => true,
            Err(e) => {
                let established = shared.lock().connected();
                let msg = e.to_string();
                // A refusal or a broken peer needs an operator; a lost connection does not.
                let alarming = matches!(
                    e,
                    SessionError::Rejected(_)
                        | SessionError::Protocol(_)
                        | SessionError::Codec(_)
                        | SessionError::Unexpected(_)
                );
                match (established, alarming) {
                    (true, false) => tracing::warn!(group = %cfg.group, endpoint = %cfg.endpoint,
                        "replication session ended: {msg}"),
                    (true, true) => tracing::error!(group = %cfg.group, endpoint = %cfg.endpoint,
                        "replication session ended: {msg}"),
                    (false, false) => tracing::warn!(group = %cfg.group, endpoint = %cfg.endpoint,
                        retry_in = ?backoff, "cannot reach the backup: {msg}"),
                    (false, true) => tracing::error!(group = %cfg.group, endpoint = %cfg.endpoint,
                        retry_in = ?backoff, "backup refuses this agent: {msg}"),
                }
                let mut st = shared.lock();
                if established {
                    st.disconnected(msg);
                } else {
                    st.connect_failed(msg);
                }
                established
            }
        };
        if established {
            backoff = cfg.reconnect_min;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        if !established {
            backoff = (backoff * 2).min(cfg.reconnect_max);
        }
    }
}

/// Sets `tcp`'s congestion control to the first of
/// [`STREAM_CONGESTION`](pipecloud_core::wire::STREAM_CONGESTION) the kernel
/// accepts; if it accepts none, says so and keeps the host's default.
fn set_congestion(tcp: &TcpStream) {
    let sock = socket2::SockRef::from(tcp);
    let mut last = None;
    for name in pipecloud_core::wire::STREAM_CONGESTION {
        match sock.set_tcp_congestion(name.as_bytes()) {
            Ok(()) => return,
            Err(e) => last = Some(e),
        }
    }
    tracing::warn!(wanted = ?pipecloud_core::wire::STREAM_CONGESTION, error = ?last,
        "cannot set the replication stream's congestion control; the host's default stays");
}

async fn connect(
    shared: &Shared,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, SessionError> {
    let cfg = &shared.config;
    let endpoint = cfg.endpoint.clone();
    let fut = async {
        let tcp =
            TcpStream::connect(&cfg.endpoint)
                .await
                .map_err(|source| SessionError::Connect {
                    endpoint: endpoint.clone(),
                    source,
                })?;
        tcp.set_nodelay(true)?;
        set_congestion(&tcp);
        let tls = shared
            .tls
            .connect(shared.server_name.clone(), tcp)
            .await
            .map_err(|source| SessionError::Connect {
                endpoint: endpoint.clone(),
                source,
            })?;
        Ok::<_, SessionError>(tls)
    };
    tokio::time::timeout(cfg.connect_timeout, fut)
        .await
        .map_err(|_| SessionError::ConnectTimeout {
            endpoint: endpoint.clone(),
            after: cfg.connect_timeout,
        })?
}

fn hello(shared: &Shared) -> Frame {
    let cfg = &shared.config;
    Frame::Hello(Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        group: cfg.group.clone(),
        group_id: cfg.group_id,
        agent: cfg.agent.clone(),
        disks: cfg
            .disks
            .iter()
            .map(|d| DiskHello {
                name: d.name.clone(),
                size: d.size,
                writer: d.writer,
                generation: cfg.generation,
            })
            .collect(),
    })
}

async fn write_frame<W: AsyncWrite + Unpin>(
    wr: &mut W,
    frame: &Frame,
    buf: &mut Vec<u8>,
) -> Result<(), SessionError> {
    buf.clear();
    encode_frame(frame, buf)?;
    wr.write_all(buf).await?;
    wr.flush().await?;
    Ok(())
}

/// The receiving side of a connection: bytes in, frames out.
struct Inbound<R> {
    rd: R,
    reader: FrameReader,
    /// Bytes read but not yet taken by the reader (it takes at most one maximal frame).
    pending: Vec<u8>,
    buf: Box<[u8]>,
}

impl<R: AsyncRead + Unpin> Inbound<R> {
    fn new(rd: R) -> Self {
        Inbound {
            rd,
            reader: FrameReader::new(),
            pending: Vec::new(),
            buf: vec![0u8; READ_CHUNK].into_boxed_slice(),
        }
    }

    /// Reads until the reader yields one frame.
    async fn next_frame(&mut self) -> Result<Frame, SessionError> {
        loop {
            while !self.pending.is_empty() {
                let took = self.reader.push(&self.pending);
                self.pending.drain(..took);
                if took == 0 {
                    break;
                }
            }
            if let Some(f) = self.reader.next()? {
                return Ok(f);
            }
            let n = self.rd.read(&mut self.buf).await?;
            if n == 0 {
                return Err(SessionError::Closed);
            }
            let bytes = &self.buf[..n];
            let took = self.reader.push(bytes);
            self.pending.extend_from_slice(&bytes[took..]);
        }
    }
}

/// One connection: hello, welcome, then the streaming loop. Returns only with an error.
async fn session(shared: &Arc<Shared>) -> Result<(), SessionError> {
    let cfg = &shared.config;
    let stream = connect(shared).await?;
    let (rd, mut wr) = tokio::io::split(stream);
    let mut out = Vec::new();
    write_frame(&mut wr, &hello(shared), &mut out).await?;
    let mut inbound = Inbound::new(rd);
    let welcome = tokio::time::timeout(
        cfg.heartbeat_timeout.max(cfg.connect_timeout),
        inbound.next_frame(),
    )
    .await
    .map_err(|_| SessionError::Silent(cfg.heartbeat_timeout.max(cfg.connect_timeout)))??;
    let next = match welcome {
        Frame::Welcome(w) => {
            let next = shared
                .lock()
                .on_welcome(&w, &shared.causal, Instant::now())?;
            tracing::info!(group = %cfg.group, endpoint = %cfg.endpoint, committed = %w.committed,
                "connected to the backup; re-sending unacked writes");
            if let Some(link) = shared.config.checkpoint.as_deref() {
                link.on_welcome();
            }
            next
        }
        Frame::Reject { reason } => return Err(SessionError::Rejected(reason)),
        other => return Err(SessionError::Unexpected(frame_name(&other))),
    };
    let _ = shared.ready.send_replace(true);
    shared.wake_sender.notify_one();

    tokio::select! {
        r = receive(shared, &mut inbound) => r,
        r = send(shared, &mut wr, next) => r,
        r = watchdog(shared) => r,
    }
}

/// Reads and handles frames from the backup until the connection fails.
async fn receive<R: AsyncRead + Unpin>(
    shared: &Shared,
    inbound: &mut Inbound<R>,
) -> Result<(), SessionError> {
    loop {
        let frame = inbound.next_frame().await?;
        let now = Instant::now();
        let mut st = shared.lock();
        match frame {
            Frame::Ack(a) => {
                st.on_ack(&a, &shared.causal, now)?;
                // Writes held back while this one was unacked may go now.
                shared.wake_sender.notify_one();
            }
            Frame::Committed { vector } => {
                st.on_committed(&vector, &shared.causal, now);
                shared.wake_sender.notify_one();
            }
            Frame::HeartbeatReply { nonce } => {
                if let Some(rtt) = st.heartbeat_reply(nonce, now) {
                    tracing::trace!(?rtt, "heartbeat reply");
                }
                if let Some(link) = shared.config.checkpoint.as_deref() {
                    drop(st);
                    link.on_heartbeat_reply();
                    st = shared.lock();
                }
            }
            Frame::Heartbeat { nonce } => {
                st.heartbeat_to_answer(nonce, now);
                shared.wake_sender.notify_one();
            }
            Frame::Reject { reason } => return Err(SessionError::Rejected(reason)),
            Frame::Checkpoint(Checkpoint::Ack { epoch }) => {
                st.heard(now);
                if let Some(link) = shared.config.checkpoint.as_deref() {
                    drop(st);
                    link.on_ack(epoch);
                    st = shared.lock();
                }
            }
            Frame::Checkpoint(_) => {
                return Err(SessionError::Unexpected("checkpoint (not an ack)"))
            }
            other @ (Frame::Hello(_) | Frame::Welcome(_) | Frame::Write(_)) => {
                return Err(SessionError::Unexpected(frame_name(&other)))
            }
        }
        let change = st.check_degrade(shared.config.backup_loss, now);
        drop(st);
        if let Some(c) = change {
            super::report_degrade_change(&shared.config, c);
        }
    }
}

/// Sends buffered writes (from `next` on, per writer), coalesced per the config's
/// [`Coalesce`](super::Coalesce) rule, and heartbeats.
async fn send<W: AsyncWrite + Unpin>(
    shared: &Shared,
    wr: &mut W,
    mut next: BTreeMap<WriterId, Seq>,
) -> Result<(), SessionError> {
    let interval = shared.config.heartbeat_interval;
    // The first heartbeat goes out at once (an RTT figure right after connecting).
    let mut last_heartbeat: Option<Instant> = None;
    let mut nonce: u64 = 0;
    let mut out = Vec::new();
    // The batching rule follows the mode: by age in async, ack-clocked otherwise.
    let mut mode = shared.config.mode.subscribe();
    let mut mode_alive = true;
    let timeline = Arc::clone(&shared.lock().timeline);
    loop {
        out.clear();
        let now = Instant::now();
        if last_heartbeat.is_none_or(|t| now.saturating_duration_since(t) >= interval) {
            nonce = nonce.wrapping_add(1);
            shared.lock().heartbeat_sent(nonce, now);
            encode_frame(&Frame::Heartbeat { nonce }, &mut out)?;
            last_heartbeat = Some(now);
        }
        let (answer, batch, due) = {
            let mut st = shared.lock();
            let answer = st.take_heartbeat_answer();
            let rule = if shared.send_now.swap(false, Ordering::AcqRel) {
                SendRule::AtOnce
            } else if *mode.borrow_and_update() == super::Mode::Async {
                SendRule::ByAge
            } else {
                SendRule::AckClocked
            };
            match st.send_decision(&next, shared.config.coalesce, rule, now) {
                SendDecision::Now => (answer, st.unsent(&mut next, MAX_BATCH_BYTES), None),
                SendDecision::At(due) => (answer, Vec::new(), Some(due)),
                SendDecision::Nothing => (answer, Vec::new(), None),
            }
        };
        if let Some(nonce) = answer {
            encode_frame(&Frame::HeartbeatReply { nonce }, &mut out)?;
        }
        for f in &batch {
            encode_frame(f, &mut out)?;
        }
        if let Some(link) = shared.config.checkpoint.as_deref() {
            link.take(&mut out, MAX_BATCH_BYTES as usize);
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
            wr.flush().await?;
            if !batch.is_empty() {
                let sent_at = Instant::now();
                for f in &batch {
                    if let Frame::Write(w) = &**f {
                        timeline.sent(w.writer, w.seq, sent_at);
                    }
                }
            }
            continue;
        }
        drop(batch);
        let heartbeat_due = last_heartbeat.map_or(now, |t| t + interval);
        let wake_at = due.map_or(heartbeat_due, |d| d.min(heartbeat_due));
        // Woken by a new write, an ack (coalesced writes may go), a heartbeat to
        // answer or a mode switch (a batch waiting by age may go at once in sync).
        tokio::select! {
            _ = shared.wake_sender.notified() => {}
            _ = tokio::time::sleep_until(wake_at.into()) => {}
            r = mode.changed(), if mode_alive => mode_alive = r.is_ok(),
            _ = checkpoint_ready(shared) => {}
        }
    }
}

/// Checkpoint frames were queued (never, without a checkpoint link).
async fn checkpoint_ready(shared: &Shared) {
    match shared.config.checkpoint.as_deref() {
        Some(link) => link.ready().notified().await,
        None => std::future::pending().await,
    }
}

/// Ends the session when the backup stays silent longer than the heartbeat timeout.
async fn watchdog(shared: &Shared) -> Result<(), SessionError> {
    let timeout = shared.config.heartbeat_timeout;
    let tick = (timeout / 4).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(tick).await;
        let silent = shared.lock().silent_for(Instant::now());
        if silent >= timeout {
            return Err(SessionError::Silent(silent));
        }
    }
}

/// Applies the backup-loss policy periodically (runs for the client's lifetime).
pub async fn degrade_watch(shared: Arc<Shared>) {
    let super::BackupLossPolicy::DegradeToAsync { after } = shared.config.backup_loss else {
        return;
    };
    let tick = (after / 10).clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = shutdown.changed() => return,
        }
        // Detached: there is no backup to lose yet.
        if !*shared.attached.borrow() {
            continue;
        }
        let change = shared
            .lock()
            .check_degrade(shared.config.backup_loss, Instant::now());
        if let Some(c) = change {
            super::report_degrade_change(&shared.config, c);
        }
    }
}
