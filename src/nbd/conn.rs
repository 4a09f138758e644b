//! One NBD connection: handshake/option haggling, then transmission.
//!
//! Transmission runs three kinds of tasks:
//! - the *reader* (this connection's task) reads and validates request headers (and WRITE
//!   payloads) and spawns one task per accepted request into a per-connection `JoinSet`;
//! - *request tasks* call the backend and hand their reply to the writer;
//! - the *writer* task serialises replies onto the socket, batching whatever is queued
//!   before each flush (one syscall for many replies at high queue depth; measured: having
//!   each task lock the socket and write its own reply lost IOPS at QD32 and gained little
//!   at QD1; current block-path figures in `docs/results.md`).
//!
//! Bounds: at most `max_in_flight` request tasks and `max_in_flight_bytes` of READ/WRITE
//! payload per connection. At either bound the reader stops reading the socket until a
//! request completes (TCP/unix back-pressure then stops the client). A request's byte
//! permit is released only once its reply is written, so queued read data counts too.
//! The reply channel holds at most `max_in_flight + 1` replies.
//!
//! Every exit path (DISC, client EOF, protocol violation, server shutdown) first waits for
//! the in-flight request tasks, so a backend operation is never abandoned half-way.

use std::future::Future;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, warn};

use super::proto::{self, Command, OptionAction, Payload};
use super::{Exports, NbdConfig};
use crate::block::BlockBackend;

/// Read buffer of a connection in transmission. Payloads larger than what is
/// buffered are read straight into their own buffer.
const READ_BUFFER: usize = 64 * 1024;

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

/// A reply queued for the writer.
struct Reply {
    handle: u64,
    error: u32,
    data: Vec<u8>,
    /// Byte budget held until the reply is on the wire.
    _permit: Option<OwnedSemaphorePermit>,
}

/// An error reply (no data, no budget).
fn error_reply(handle: u64, error: u32) -> Reply {
    Reply {
        handle,
        error,
        data: Vec::new(),
        _permit: None,
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
    // Buffered: a request header and its payload, and at queue depth > 1
    // several requests, come in with one read(2) instead of one each.
    let rd = tokio::io::BufReader::with_capacity(READ_BUFFER, rd);
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
    let (tx, rx) = mpsc::channel::<Reply>(config.max_in_flight + 1);
    let writer = tokio::spawn(write_replies(wr, rx));
    let budget = Arc::new(Semaphore::new(config.max_in_flight_bytes as usize));
    let mut tasks = JoinSet::new();
    let result = read_requests(
        &mut rd,
        &backend,
        &info,
        config,
        &tx,
        &budget,
        &mut tasks,
        &mut shutdown,
    )
    .await;
    // Finish every accepted request before closing (DISC semantics; never abandon a
    // backend operation half-way).
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            error!(conn_id, "nbd: request task failed: {e}");
        }
    }
    drop(tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if is_eof(&e) => {}
        Ok(Err(e)) => debug!(conn_id, "nbd: writing replies failed: {e}"),
        Err(e) => error!(conn_id, "nbd: reply writer failed: {e}"),
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn read_requests<B, R>(
    rd: &mut R,
    backend: &Arc<B>,
    info: &proto::ExportInfo,
    config: &NbdConfig,
    tx: &mpsc::Sender<Reply>,
    budget: &Arc<Semaphore>,
    tasks: &mut JoinSet<()>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<End, ConnError>
where
    B: BlockBackend,
    R: AsyncRead + Unpin + Send,
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
            _ = tx.closed() => return Ok(End::WriterGone),
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
                        let _ = tx.send(error_reply(handle, rej.error)).await;
                        return Ok(End::OversizedWrite);
                    }
                }
                if tx.send(error_reply(handle, rej.error)).await.is_err() {
                    return Ok(End::WriterGone);
                }
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
        let mut request = Box::pin(async move {
            let (error, data) = execute(&*backend, command, payload).await;
            Reply {
                handle,
                error,
                data,
                _permit: Some(permit),
            }
        });
        // Most requests at low queue depth finish on their first poll (a small
        // write done inline, a read from the page cache): complete those here
        // instead of paying for a task and its wake-ups. Anything that has to
        // wait becomes a task; its futures re-register the task's waker when
        // polled again (tokio primitives and oneshots all do).
        let first = {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            request.as_mut().poll(&mut cx)
        };
        match first {
            std::task::Poll::Ready(reply) => {
                if tx.send(reply).await.is_err() {
                    return Ok(End::WriterGone);
                }
            }
            std::task::Poll::Pending => {
                let tx = tx.clone();
                tasks.spawn(async move {
                    let _ = tx.send(request.await).await;
                });
            }
        }
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

/// Writes queued replies, flushing whenever the queue runs empty.
async fn write_replies<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::Receiver<Reply>,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    while let Some(reply) = rx.recv().await {
        write_reply(&mut w, reply).await?;
        while let Ok(reply) = rx.try_recv() {
            write_reply(&mut w, reply).await?;
        }
        w.flush().await?;
    }
    let _ = w.shutdown().await;
    Ok(())
}

async fn write_reply<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    reply: Reply,
) -> std::io::Result<()> {
    w.write_all(&proto::encode_simple_reply(reply.error, reply.handle))
        .await?;
    if reply.error == 0 && !reply.data.is_empty() {
        w.write_all(&reply.data).await?;
    }
    Ok(())
}
