//! One NBD connection: handshake/option haggling, then transmission.
//!
//! Transmission runs two kinds of tasks:
//! - the *reader* (this connection's task) reads and validates request headers (and WRITE
//!   payloads) and spawns one task per accepted request into a per-connection `JoinSet`;
//! - *request tasks* call the backend and write their own reply under the connection's
//!   reply lock ([`ReplyWriter`]): one whole reply at a time, no hop through a writer task.
//!
//! Bounds: at most `max_in_flight` request tasks and `max_in_flight_bytes` of READ/WRITE
//! payload per connection. At either bound the reader stops reading the socket until a
//! request completes (TCP/unix back-pressure then stops the client). A request's byte
//! permit is released only once its reply is written, so read data waiting for the reply
//! lock counts too. Tasks waiting for the lock are bounded by `max_in_flight`.
//!
//! Every exit path (DISC, client EOF, protocol violation, server shutdown) first waits for
//! the in-flight request tasks, so a backend operation is never abandoned half-way.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Mutex, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, warn};

use super::proto::{self, Command, OptionAction, Payload};
use super::{Exports, NbdConfig};
use crate::block::BlockBackend;

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(std::time::Duration),
}

/// How transmission ended (for logs).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// Client sent `NBD_CMD_DISC`.
    Disconnect,
    /// Client closed the socket.
    ClientClosed,
    /// Client aborted or failed negotiation.
    NoExport,
    /// Server shutting down.
    Shutdown,
    /// Oversized write: error sent, connection closed.
    OversizedWrite,
    /// The writer lost the socket.
    WriterGone,
}

/// Replies up to this size are copied behind their header and sent with one write.
const COALESCE_REPLY: usize = 64 * 1024;

/// The write half of a connection, shared by its request tasks.
struct ReplyWriter<W> {
    w: Mutex<W>,
    /// Set once a write failed: the client is gone, the reader stops.
    broken: watch::Sender<bool>,
}

impl<W: AsyncWrite + Unpin> ReplyWriter<W> {
    /// Writes one simple reply (header, and the READ data on success).
    async fn send(&self, handle: u64, error: u32, data: &[u8]) {
        if *self.broken.borrow() {
            return;
        }
        let header = proto::encode_simple_reply(error, handle);
        let data = if error == 0 { data } else { &[][..] };
        let mut w = self.w.lock().await;
        let result = if data.len() <= COALESCE_REPLY {
            let mut frame = Vec::with_capacity(header.len() + data.len());
            frame.extend_from_slice(&header);
            frame.extend_from_slice(data);
            w.write_all(&frame).await
        } else {
            match w.write_all(&header).await {
                Ok(()) => w.write_all(data).await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = result {
            if !is_eof(&e) {
                debug!("nbd: writing a reply failed: {e}");
            }
            self.broken.send_replace(true);
        }
    }
}

pub(crate) async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return; // server handle gone: treat as shutdown
        }
    }
}

fn is_eof(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
    )
}

/// Serves one accepted connection until it ends.
pub(crate) async fn serve<B, R, W>(
    mut rd: R,
    mut wr: W,
    exports: Arc<Exports<B>>,
    config: NbdConfig,
    mut shutdown: watch::Receiver<bool>,
    conn_id: u64,
) -> Result<End, ConnError>
where
    B: BlockBackend,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let negotiated = tokio::select! {
        _ = wait_shutdown(&mut shutdown) => return Ok(End::Shutdown),
        r = tokio::time::timeout(config.handshake_timeout, handshake(&mut rd, &mut wr, &exports, &config)) => {
            match r {
                Ok(r) => r?,
                Err(_) => return Err(ConnError::HandshakeTimeout(config.handshake_timeout)),
            }
        }
    };
    let Some((name, info, backend)) = negotiated else {
        return Ok(End::NoExport);
    };
    debug!(conn_id, export = %name, size = info.size, "nbd: entering transmission");
    transmission(rd, wr, backend, info, &config, shutdown, conn_id).await
}

/// Greeting and option haggling. `Ok(None)`: the client aborted, closed, or asked for an
/// unknown export with `NBD_OPT_EXPORT_NAME`.
async fn handshake<B, R, W>(
    rd: &mut R,
    wr: &mut W,
    exports: &Exports<B>,
    config: &NbdConfig,
) -> Result<Option<(String, proto::ExportInfo, Arc<B>)>, ConnError>
where
    B: BlockBackend,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    wr.write_all(&proto::encode_greeting()).await?;
    wr.flush().await?;
    let mut fb = [0u8; 4];
    match rd.read_exact(&mut fb).await {
        Ok(_) => {}
        Err(e) if is_eof(&e) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let flags = proto::decode_client_flags(&fb)
        .map_err(|e| ConnError::Protocol(e.to_string()))?
        .ok_or_else(|| {
            ConnError::Protocol(format!(
                "unknown client flags {:#x}",
                u32::from_be_bytes(fb)
            ))
        })?;
    let no_zeroes = flags & proto::FLAG_C_NO_ZEROES != 0;
    for _ in 0..config.max_options {
        let mut hb = [0u8; proto::OPTION_HEADER_LEN];
        match rd.read_exact(&mut hb).await {
            Ok(_) => {}
            Err(e) if is_eof(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let h = proto::decode_option_header(&hb).map_err(|e| ConnError::Protocol(e.to_string()))?;
        if h.length > proto::MAX_OPTION_DATA {
            return Err(ConnError::Protocol(format!(
                "option {} announces {} bytes of data (limit {})",
                h.option,
                h.length,
                proto::MAX_OPTION_DATA
            )));
        }
        let mut data = vec![0u8; h.length as usize];
        rd.read_exact(&mut data).await?;
        match proto::negotiate_option(h.option, &data, no_zeroes, exports) {
            OptionAction::Reply(b) => {
                wr.write_all(&b).await?;
                wr.flush().await?;
            }
            OptionAction::ReplyAndClose(b) => {
                wr.write_all(&b).await?;
                wr.flush().await?;
                return Ok(None);
            }
            OptionAction::Enter {
                reply,
                name,
                info,
                handle,
            } => {
                wr.write_all(&reply).await?;
                wr.flush().await?;
                return Ok(Some((name, info, handle)));
            }
            OptionAction::Close => return Ok(None),
        }
    }
    Err(ConnError::Protocol(format!(
        "more than {} options",
        config.max_options
    )))
}

async fn transmission<B, R, W>(
    mut rd: R,
    wr: W,
    backend: Arc<B>,
    info: proto::ExportInfo,
    config: &NbdConfig,
    mut shutdown: watch::Receiver<bool>,
    conn_id: u64,
) -> Result<End, ConnError>
where
    B: BlockBackend,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (broken, mut broken_rx) = watch::channel(false);
    let writer = Arc::new(ReplyWriter {
        w: Mutex::new(wr),
        broken,
    });
    let budget = Arc::new(Semaphore::new(config.max_in_flight_bytes as usize));
    let mut tasks = JoinSet::new();
    let result = read_requests(
        &mut rd,
        &backend,
        &info,
        config,
        &writer,
        &budget,
        &mut tasks,
        &mut shutdown,
        &mut broken_rx,
    )
    .await;
    // Finish every accepted request before closing (DISC semantics; never abandon a
    // backend operation half-way).
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            error!(conn_id, "nbd: request task failed: {e}");
        }
    }
    let _ = writer.w.lock().await.shutdown().await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn read_requests<B, R, W>(
    rd: &mut R,
    backend: &Arc<B>,
    info: &proto::ExportInfo,
    config: &NbdConfig,
    writer: &Arc<ReplyWriter<W>>,
    budget: &Arc<Semaphore>,
    tasks: &mut JoinSet<()>,
    shutdown: &mut watch::Receiver<bool>,
    broken: &mut watch::Receiver<bool>,
) -> Result<End, ConnError>
where
    B: BlockBackend,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    loop {
        while tasks.try_join_next().is_some() {}
        if tasks.len() >= config.max_in_flight {
            // At the in-flight bound: stop reading until one request completes.
            tasks.join_next().await;
            continue;
        }
        let mut hb = [0u8; proto::REQUEST_HEADER_LEN];
        tokio::select! {
            biased;
            _ = wait_shutdown(shutdown) => return Ok(End::Shutdown),
            _ = broken.wait_for(|b| *b) => return Ok(End::WriterGone),
            r = rd.read_exact(&mut hb) => match r {
                Ok(_) => {}
                Err(e) if is_eof(&e) => return Ok(End::ClientClosed),
                Err(e) => return Err(e.into()),
            },
        }
        let header = proto::decode_request_header(&hb)
            .map_err(|e| ConnError::Protocol(format!("request header: {e}")))?;
        let handle = header.handle;
        let command = match proto::validate_request(&header, info) {
            Ok(c) => c,
            Err(rej) => {
                debug!(?header, error = rej.error, "nbd: rejecting request");
                match rej.payload {
                    Payload::None => {}
                    Payload::Discard(n) => discard(rd, n).await?,
                    Payload::Disconnect => {
                        warn!(
                            len = header.length,
                            "nbd: write larger than the payload limit, disconnecting"
                        );
                        writer.send(handle, rej.error, &[]).await;
                        return Ok(End::OversizedWrite);
                    }
                }
                writer.send(handle, rej.error, &[]).await;
                continue;
            }
        };
        let cost = match command {
            Command::Read { len, .. } | Command::Write { len, .. } => len,
            _ => 0,
        };
        // The budget is never closed and `cost` <= MAX_PAYLOAD <= budget (checked in config).
        let permit = Arc::clone(budget)
            .acquire_many_owned(cost)
            .await
            .map_err(|_| ConnError::Protocol("in-flight budget closed".into()))?;
        let payload = match command {
            Command::Write { len, .. } => {
                let mut buf = vec![0u8; len as usize];
                match rd.read_exact(&mut buf).await {
                    Ok(_) => buf,
                    Err(e) if is_eof(&e) => return Ok(End::ClientClosed),
                    Err(e) => return Err(e.into()),
                }
            }
            Command::Disconnect => return Ok(End::Disconnect),
            _ => Vec::new(),
        };
        let backend = Arc::clone(backend);
        let writer = Arc::clone(writer);
        tasks.spawn(async move {
            let (error, data) = execute(&*backend, command, payload).await;
            writer.send(handle, error, &data).await;
            drop(permit);
        });
    }
}

/// Runs one validated command on the backend; returns (NBD error, read data).
async fn execute<B: BlockBackend>(
    backend: &B,
    command: Command,
    payload: Vec<u8>,
) -> (u32, Vec<u8>) {
    let result = match command {
        Command::Read { offset, len } => match backend.read(offset, len).await {
            Ok(data) if data.len() == len as usize => return (0, data),
            Ok(data) => Err(std::io::Error::other(format!(
                "backend returned {} bytes for a {len}-byte read",
                data.len()
            ))),
            Err(e) => Err(e),
        },
        Command::Write { offset, fua, .. } => backend.write(offset, payload, fua).await,
        Command::WriteZeroes { offset, len, fua } => backend.write_zeroes(offset, len, fua).await,
        Command::Trim { offset, len, fua } => match backend.trim(offset, len).await {
            Ok(()) if fua => backend.flush().await,
            r => r,
        },
        Command::Flush => backend.flush().await,
        Command::Disconnect => Ok(()),
    };
    match result {
        Ok(()) => (0, Vec::new()),
        Err(e) => {
            warn!(?command, "nbd: backend error: {e}");
            (proto::errno_for(&e), Vec::new())
        }
    }
}

/// Reads and drops `n` payload bytes (n <= MAX_PAYLOAD) to keep the stream in sync.
async fn discard<R: AsyncRead + Unpin>(rd: &mut R, n: u32) -> Result<(), ConnError> {
    let mut left = u64::from(n);
    let mut sink = vec![0u8; 64 * 1024];
    while left > 0 {
        let chunk = left.min(sink.len() as u64) as usize;
        rd.read_exact(&mut sink[..chunk]).await?;
        left -= chunk as u64;
    }
    Ok(())
}
