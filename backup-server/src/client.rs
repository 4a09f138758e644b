//! A minimal agent-side peer of the replication protocol over mutual TLS.
//!
//! Used by the tests and `backup-server bench` to drive a real server. It is not
//! the agent (that lives in the `pipecloud` crate, which this crate never depends on):
//! it only speaks the wire protocol.

use pipecloud_core::codec::{encode_frame, CodecError, FrameReader};
use pipecloud_core::wire::{Frame, Hello, Welcome};
use rustls::ClientConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
    #[error("rejected by the server: {0}")]
    Rejected(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("tls: {0}")]
    Tls(String),
}

/// Sending half.
pub struct ClientWriter {
    wr: WriteHalf<TlsStream<TcpStream>>,
    buf: Vec<u8>,
}

/// Receiving half.
pub struct ClientReader {
    rd: ReadHalf<TlsStream<TcpStream>>,
    reader: FrameReader,
    buf: Vec<u8>,
    pending: Vec<u8>,
}

impl ClientWriter {
    /// Encodes and sends frames (one flush).
    pub async fn send(&mut self, frames: &[Frame]) -> Result<(), ClientError> {
        self.buf.clear();
        for f in frames {
            encode_frame(f, &mut self.buf)?;
        }
        self.send_raw_owned().await
    }

    async fn send_raw_owned(&mut self) -> Result<(), ClientError> {
        self.wr.write_all(&self.buf).await?;
        self.wr.flush().await?;
        Ok(())
    }

    /// Sends raw bytes (for hostile-input tests).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.wr.write_all(bytes).await?;
        self.wr.flush().await?;
        Ok(())
    }

    /// Closes the sending direction.
    pub async fn shutdown(&mut self) {
        let _ = self.wr.shutdown().await;
    }
}

impl ClientReader {
    /// The next frame, `None` on EOF. A `Reject` is returned as a frame.
    pub async fn recv(&mut self) -> Result<Option<Frame>, ClientError> {
        loop {
            let took = if self.pending.is_empty() {
                0
            } else {
                let t = self.reader.push(&self.pending);
                self.pending.drain(..t);
                t
            };
            if let Some(f) = self.reader.next()? {
                return Ok(Some(f));
            }
            if !self.pending.is_empty() {
                if took == 0 {
                    return Err(ClientError::Protocol("frame buffer overflow".into()));
                }
                continue;
            }
            let n = self.rd.read(&mut self.buf).await?;
            if n == 0 {
                return Ok(None);
            }
            self.pending.extend_from_slice(&self.buf[..n]);
        }
    }
}

/// Connects, sends `hello` and waits for the welcome.
pub async fn connect(
    addr: SocketAddr,
    server_name: &str,
    cfg: Arc<ClientConfig>,
    hello: &Hello,
) -> Result<(ClientWriter, ClientReader, Welcome), ClientError> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = crate::tls::server_name(server_name).map_err(|e| ClientError::Tls(e.to_string()))?;
    let tls = TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let (rd, wr) = tokio::io::split(tls);
    let mut w = ClientWriter {
        wr,
        buf: Vec::new(),
    };
    let mut r = ClientReader {
        rd,
        reader: FrameReader::new(),
        buf: vec![0u8; 256 * 1024],
        pending: Vec::new(),
    };
    w.send(&[Frame::Hello(hello.clone())]).await?;
    match r.recv().await? {
        Some(Frame::Welcome(wel)) => Ok((w, r, wel)),
        Some(Frame::Reject { reason }) => Err(ClientError::Rejected(reason)),
        Some(other) => Err(ClientError::Protocol(format!(
            "expected welcome, got {other:?}"
        ))),
        None => Err(ClientError::Protocol(
            "connection closed before welcome".into(),
        )),
    }
}

/// TLS connect only (no hello): for tests of raw hostile bytes.
pub async fn connect_raw(
    addr: SocketAddr,
    server_name: &str,
    cfg: Arc<ClientConfig>,
) -> Result<(ClientWriter, ClientReader), ClientError> {
    let tcp = TcpStream::connect(addr).await?;
    let name = crate::tls::server_name(server_name).map_err(|e| ClientError::Tls(e.to_string()))?;
    let tls = TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let (rd, wr) = tokio::io::split(tls);
    Ok((
        ClientWriter {
            wr,
            buf: Vec::new(),
        },
        ClientReader {
            rd,
            reader: FrameReader::new(),
            buf: vec![0u8; 256 * 1024],
            pending: Vec::new(),
        },
    ))
}
