//! Failback resync (issue 23 §4, docs/design.md §15): makes the fenced old
//! primary's disk image byte-identical to the active site's, sending over the
//! WAN only one hash per block and the blocks that differ.
//!
//! Two commands, one mutual-TLS connection: `backup-server resync-source` at
//! the active site serves its volume image to one `backup-server resync-fetch`
//! at the old primary (which becomes a backup site when the roles reverse, so
//! the backup server's binary is the one both sites have).
//!
//! - fetcher → source: `Hello{disk_bytes, block_bytes}`, then its blocks'
//!   SHA-256 in order (`Hashes`, [`HASHES_PER_FRAME`] a frame), `HashesDone`.
//! - source → fetcher: for each received hash that differs from its own
//!   block's, `Block{index, data}`; after `HashesDone`, `Done{blocks}`; or
//!   `Refused{reason}`.
//!
//! **Authentication** is the replication link's (crate::tls, the same CA and
//! files): the source presents the backup server's certificate and accepts
//! only a fetcher whose client certificate chains to the CA *and* is bound to
//! the group being resynced (SAN URI `pipecloud:group/<group>`, the agent
//! certificates `backup-server certs` writes); the fetcher verifies the
//! source's certificate against the CA and the expected server name. There is
//! no plain-TCP mode. A connection that fails the handshake or the group check
//! is refused (logged, told why when the handshake got that far) and the
//! source keeps waiting for the right fetcher until [`ACCEPT_TIMEOUT`], so a
//! stray connection cannot end a failback.
//!
//! The fetcher writes each block where it belongs and `fsync`s before it
//! reports done. Blocks arrive only for indices already hashed, so its hashing
//! thread never reads a block the writer is changing. Frames are a `u32` LE
//! length and postcard, at most [`MAX_FRAME`] bytes (a larger one closes the
//! connection); both sides read and write with a timeout ([`IO_TIMEOUT`]).
//! The fetcher needs both directions at once (the source's blocks must be
//! read while hashes are still going out), so it runs the connection on a
//! one-thread tokio runtime (tokio-rustls, like the agents' link); its
//! hashing thread hands frames over a queue of [`QUEUED_FRAMES`] (blocking at
//! the bound). The source answers frame by frame and is plain blocking rustls.
//!
//! Why SHA-256 (32 bytes a 4 KiB block, 0.78 % of the disk on the wire):
//! a block is skipped only when the two sites' hashes are equal, so a
//! collision would leave a stale block behind silently. A 32-bit CRC would
//! make that likely across millions of blocks (and trivial to provoke for a
//! guest that writes chosen data on both sides); SHA-256's collision
//! resistance makes it infeasible even for a guest choosing both blocks.
//!
//! Not yet: the active site keeps serving during a resync but its writes made
//! after a block was compared are not tracked; a second pass (each sends only
//! what still differs) or the switch-back's pause closes that gap.

use anyhow::{anyhow, bail, Context, Result};
use rustls::{ClientConfig, ServerConfig, ServerConnection, StreamOwned};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Bytes per compared block (the guest file systems' block size).
pub const BLOCK_BYTES: u64 = 4096;
/// Block hashes per `Hashes` frame (1 MiB of disk).
pub const HASHES_PER_FRAME: usize = 256;
/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 64 * 1024;
/// How long a read or write on the connection may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `resync-source` waits for its (authenticated) fetcher to connect.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one connection's TLS handshake may take at the source (it
/// handles one connection at a time: a silent or trickling peer must not
/// hold it longer than twice this).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused fetcher's input is read (and dropped) while waiting
/// for it to close (see `close_gently`).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the fetcher tries to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Encoded frames the fetcher's hashing thread may have queued for the
/// connection (8 MiB of disk); it blocks at the bound.
pub const QUEUED_FRAMES: usize = 8;

/// The source's side of the mutual TLS: the backup server's CA, certificate
/// and key, and the group whose agent certificates it accepts.
#[derive(Clone)]
pub struct SourceTls {
    pub config: Arc<ServerConfig>,
    pub group: String,
}

impl SourceTls {
    pub fn from_files(ca: &Path, cert: &Path, key: &Path, group: &str) -> Result<SourceTls> {
        let config = crate::tls::server_config(ca, cert, key).context("resync-source TLS")?;
        Ok(SourceTls {
            config,
            group: group.to_string(),
        })
    }
}

/// The fetcher's side: the CA, its agent certificate and key, and the name
/// the source's certificate must carry.
#[derive(Clone)]
pub struct FetchTls {
    pub config: Arc<ClientConfig>,
    pub server_name: String,
}

impl FetchTls {
    pub fn from_files(ca: &Path, cert: &Path, key: &Path, server_name: &str) -> Result<FetchTls> {
        let config = crate::tls::client_config(ca, cert, key).context("resync-fetch TLS")?;
        Ok(FetchTls {
            config,
            server_name: server_name.to_string(),
        })
    }
}

type Hash = [u8; 32];

/// The protocol's frames.
#[derive(Serialize, Deserialize, Debug)]
enum Msg {
    Hello { disk_bytes: u64, block_bytes: u64 },
    Hashes { first: u64, hashes: Vec<Hash> },
    HashesDone,
    Block { index: u64, data: Vec<u8> },
    Done { blocks: u64 },
    Refused { reason: String },
}

/// What a resync did (printed as the `resync: done` line).
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub disk_bytes: u64,
    pub blocks: u64,
    /// Blocks that differed (sent by the source).
    pub differing: u64,
    /// Frame bytes from this side / to this side.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub elapsed: Duration,
}

impl Summary {
    /// Bytes over the WAN both ways (frames, without TCP/IP headers).
    pub fn wan_bytes(&self) -> u64 {
        self.bytes_sent + self.bytes_received
    }

    /// The `resync: done …` line.
    pub fn line(&self) -> String {
        format!(
            "resync: done disk_bytes={} blocks={} differing={} bytes_sent={} bytes_received={} \
             wan_bytes={} secs={:.2}",
            self.disk_bytes,
            self.blocks,
            self.differing,
            self.bytes_sent,
            self.bytes_received,
            self.wan_bytes(),
            self.elapsed.as_secs_f64()
        )
    }
}

/// Progress of a fetch, for `--status` and the periodic line (pure: time is an
/// argument).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Progress {
    pub blocks: u64,
    pub compared: u64,
    pub received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub done: bool,
}

impl Progress {
    /// Blocks whose hash the source has not been sent yet.
    pub fn to_go(&self) -> u64 {
        self.blocks.saturating_sub(self.compared)
    }

    /// Time left at the rate so far; `None` before the first block.
    pub fn eta(&self, elapsed: Duration) -> Option<Duration> {
        if self.done {
            return Some(Duration::ZERO);
        }
        if self.compared == 0 {
            return None;
        }
        let per_block = elapsed.as_secs_f64() / self.compared as f64;
        Some(Duration::from_secs_f64(per_block * self.to_go() as f64))
    }

    /// The same as Prometheus text (node_exporter's textfile format).
    pub fn metrics(&self, elapsed: Duration) -> String {
        let eta = self.eta(elapsed).map(|d| d.as_secs_f64()).unwrap_or(-1.0);
        let mut s = String::new();
        for (name, help, v) in [
            (
                "blocks_to_go",
                "blocks not yet compared",
                self.to_go() as f64,
            ),
            (
                "blocks_received",
                "differing blocks received",
                self.received as f64,
            ),
            (
                "bytes_sent",
                "frame bytes sent (hashes)",
                self.bytes_sent as f64,
            ),
            (
                "bytes_received",
                "frame bytes received (blocks)",
                self.bytes_received as f64,
            ),
            (
                "eta_seconds",
                "time left at the rate so far (-1: unknown)",
                eta,
            ),
            (
                "done",
                "1 once the image is identical and synced",
                f64::from(u8::from(self.done)),
            ),
        ] {
            s.push_str(&format!(
                "# HELP pipecloud_resync_{name} Failback resync: {help}.\n\
                 # TYPE pipecloud_resync_{name} gauge\npipecloud_resync_{name} {v}\n"
            ));
        }
        s
    }

    /// One status line: phase, blocks to go, bytes sent, ETA.
    pub fn line(&self, elapsed: Duration) -> String {
        let phase = if self.done {
            "done"
        } else if self.compared < self.blocks {
            "compare"
        } else {
            "finish"
        };
        let eta = self
            .eta(elapsed)
            .map(|d| format!("{:.1}", d.as_secs_f64()))
            .unwrap_or_else(|| "-".into());
        format!(
            "resync: phase={phase} blocks_to_go={} blocks={} differing_received={} bytes_sent={} \
             bytes_received={} eta_s={eta}",
            self.to_go(),
            self.blocks,
            self.received,
            self.bytes_sent,
            self.bytes_received
        )
    }
}

fn blocks_of(disk_bytes: u64) -> u64 {
    disk_bytes.div_ceil(BLOCK_BYTES)
}

/// Byte range of block `index` on a disk of `disk_bytes` (the last may be short).
fn block_range(index: u64, disk_bytes: u64) -> (u64, usize) {
    let off = index * BLOCK_BYTES;
    (off, (disk_bytes - off).min(BLOCK_BYTES) as usize)
}

fn hash(b: &[u8]) -> Hash {
    Sha256::digest(b).into()
}

/// A frame as sent: `u32` LE length, postcard.
fn encode(m: &Msg) -> Result<Vec<u8>> {
    let body = postcard::to_allocvec(m).context("encoding a resync frame")?;
    let mut b = Vec::with_capacity(4 + body.len());
    b.extend_from_slice(&(body.len() as u32).to_le_bytes());
    b.extend_from_slice(&body);
    Ok(b)
}

/// Appends `m` to `out`; returns its size on the wire.
fn push(out: &mut Vec<u8>, m: &Msg) -> Result<u64> {
    let b = encode(m)?;
    out.extend_from_slice(&b);
    Ok(b.len() as u64)
}

/// The body length a frame header announces, refused above [`MAX_FRAME`].
fn body_len(header: [u8; 4]) -> Result<usize> {
    let n = u32::from_le_bytes(header) as usize;
    if n > MAX_FRAME {
        bail!("resync frame of {n} bytes (at most {MAX_FRAME}): closing");
    }
    Ok(n)
}

fn decode(body: &[u8]) -> Result<Msg> {
    postcard::from_bytes(body).context("decoding a resync frame")
}

fn recv(r: &mut impl Read) -> Result<(Msg, u64)> {
    let mut l = [0u8; 4];
    r.read_exact(&mut l).context("reading a resync frame")?;
    let n = body_len(l)?;
    let mut b = vec![0u8; n];
    r.read_exact(&mut b).context("reading a resync frame")?;
    Ok((decode(&b)?, 4 + n as u64))
}

async fn recv_async(r: &mut (impl AsyncRead + Unpin)) -> Result<(Msg, u64)> {
    let mut l = [0u8; 4];
    r.read_exact(&mut l)
        .await
        .context("reading a resync frame")?;
    let n = body_len(l)?;
    let mut b = vec![0u8; n];
    r.read_exact(&mut b)
        .await
        .context("reading a resync frame")?;
    Ok((decode(&b)?, 4 + n as u64))
}

/// Reads blocks `first..first + count` of `f` (one read).
fn read_blocks(f: &File, first: u64, count: u64, disk_bytes: u64) -> Result<Vec<u8>> {
    let off = first * BLOCK_BYTES;
    let len = ((first + count) * BLOCK_BYTES).min(disk_bytes) - off;
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, off)
        .with_context(|| format!("reading {len} bytes at {off}"))?;
    Ok(buf)
}

/// Takes an exclusive `flock` on the image for this process's lifetime of
/// `f`, so two resyncs (or a cooperating writer) never share it.
fn lock(f: &File, image: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "{} is locked by another process (a running resync?): {}",
            image.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

type SourceStream = StreamOwned<ServerConnection, TcpStream>;

/// Sends the frames gathered in `out` (one write, one flush).
fn flush_frames(w: &mut SourceStream, out: &mut Vec<u8>) -> Result<()> {
    w.write_all(out).context("sending to the fetcher")?;
    w.flush().context("sending to the fetcher")?;
    out.clear();
    Ok(())
}

/// Tells the fetcher why it is refused; returns the error to fail with.
fn refuse(w: &mut SourceStream, s: &mut Summary, reason: String) -> anyhow::Error {
    let mut out = Vec::new();
    if let Ok(n) = push(
        &mut out,
        &Msg::Refused {
            reason: reason.clone(),
        },
    ) {
        if flush_frames(w, &mut out).is_ok() {
            s.bytes_sent += n;
        }
    }
    close_gently(w);
    anyhow!("refused the fetcher: {reason}")
}

/// Ends the connection so that the fetcher reads what was sent: closing a
/// socket with unread input (the fetcher's hashes) sends a reset, which can
/// make the fetcher's kernel drop the `Refused` frame unread. So: close
/// notify, shut the sending side, and read until the fetcher closes (bounded).
fn close_gently(w: &mut SourceStream) {
    w.conn.send_close_notify();
    let _ = w.flush();
    let _ = w.sock.shutdown(std::net::Shutdown::Write);
    let t0 = Instant::now();
    let _ = w.sock.set_read_timeout(Some(DRAIN_TIMEOUT));
    let mut sink = [0u8; 64 * 1024];
    while t0.elapsed() < DRAIN_TIMEOUT {
        match w.sock.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// Waits for the next connection until `deadline`.
fn accept_until(listener: &TcpListener, deadline: Instant) -> Result<(TcpStream, SocketAddr)> {
    loop {
        match listener.accept() {
            Ok(c) => return Ok(c),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!(
                        "no authenticated fetcher connected to {} within {ACCEPT_TIMEOUT:?}",
                        listener.local_addr()?
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("accepting the fetcher"),
        }
    }
}

/// The TLS handshake with one connection and the group check: the client
/// certificate must chain to the CA (rustls' verifier, during the handshake)
/// and be bound to `tls.group`.
fn authenticate(tcp: TcpStream, tls: &SourceTls) -> Result<SourceStream> {
    tcp.set_nonblocking(false)?;
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    tcp.set_nodelay(true)?;
    let conn = ServerConnection::new(tls.config.clone()).context("a TLS server connection")?;
    let mut w = StreamOwned::new(conn, tcp);
    let t0 = Instant::now();
    while w.conn.is_handshaking() {
        // Each read is bounded too, so a trickling peer ends within twice the bound.
        if t0.elapsed() > HANDSHAKE_TIMEOUT {
            bail!("TLS handshake not done within {HANDSHAKE_TIMEOUT:?}");
        }
        w.conn
            .complete_io(&mut w.sock)
            .context("TLS handshake (the fetcher must present a certificate chaining to the CA)")?;
    }
    let groups = w
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(crate::tls::cert_groups)
        .unwrap_or_default();
    if !groups.contains(&tls.group) {
        let reason = format!(
            "the fetcher's certificate is bound to groups {groups:?}, not to {:?}",
            tls.group
        );
        return Err(refuse(&mut w, &mut Summary::default(), reason));
    }
    w.sock.set_read_timeout(Some(IO_TIMEOUT))?;
    w.sock.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(w)
}

/// `resync-source`: serves `image` to one authenticated fetcher connecting
/// to `listen` (connections refused by [`authenticate`] are logged and the
/// wait goes on).
pub fn serve(image: &Path, listen: SocketAddr, tls: &SourceTls) -> Result<Summary> {
    let f = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let disk_bytes = f.metadata()?.len();
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let listen = listener.local_addr()?;
    // The first line, ending in the address (a port 0 is resolved here).
    eprintln!(
        "resync-source: {} ({disk_bytes} bytes, group {}, mutual TLS) on {listen}",
        image.display(),
        tls.group
    );
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + ACCEPT_TIMEOUT;
    let stream = loop {
        let (tcp, peer) = accept_until(&listener, deadline)?;
        match authenticate(tcp, tls) {
            Ok(w) => {
                eprintln!("resync-source: fetcher {peer} authenticated");
                break w;
            }
            Err(e) => eprintln!("resync-source: refused {peer}: {e:#}"),
        }
    };
    let mut rx = BufReader::with_capacity(256 * 1024, stream);
    let mut out = Vec::with_capacity(HASHES_PER_FRAME * (BLOCK_BYTES as usize + 16));
    let t0 = Instant::now();
    let mut s = Summary {
        disk_bytes,
        blocks: blocks_of(disk_bytes),
        ..Summary::default()
    };
    let (hello, n) = recv(&mut rx)?;
    s.bytes_received += n;
    match hello {
        Msg::Hello {
            disk_bytes: d,
            block_bytes,
        } if d == disk_bytes && block_bytes == BLOCK_BYTES => {}
        other => {
            return Err(refuse(
                rx.get_mut(),
                &mut s,
                format!(
                    "expected Hello with disk_bytes={disk_bytes} block_bytes={BLOCK_BYTES}, got \
                     {other:?}"
                ),
            ))
        }
    }
    let mut next = 0u64;
    loop {
        let (m, n) = recv(&mut rx)?;
        s.bytes_received += n;
        match m {
            Msg::Hashes { first, hashes }
                if first == next
                    && !hashes.is_empty()
                    && hashes.len() <= HASHES_PER_FRAME
                    && first + hashes.len() as u64 <= s.blocks =>
            {
                let data = read_blocks(&f, first, hashes.len() as u64, disk_bytes)?;
                for (i, theirs) in hashes.iter().enumerate() {
                    let index = first + i as u64;
                    let (off, len) = block_range(index, disk_bytes);
                    let at = (off - first * BLOCK_BYTES) as usize;
                    let mine = &data[at..at + len];
                    if hash(mine) != *theirs {
                        s.bytes_sent += push(
                            &mut out,
                            &Msg::Block {
                                index,
                                data: mine.to_vec(),
                            },
                        )?;
                        s.differing += 1;
                    }
                }
                if !out.is_empty() {
                    flush_frames(rx.get_mut(), &mut out)?;
                }
                next = first + hashes.len() as u64;
            }
            Msg::HashesDone if next == s.blocks => {
                s.bytes_sent += push(
                    &mut out,
                    &Msg::Done {
                        blocks: s.differing,
                    },
                )?;
                let w = rx.get_mut();
                flush_frames(w, &mut out)?;
                // A clean end; the fetcher may already be gone.
                w.conn.send_close_notify();
                let _ = w.flush();
                break;
            }
            other => {
                let what = format!("{other:?}");
                let what: String = what.chars().take(120).collect();
                let reason = format!("unexpected frame at block {next} of {}: {what}", s.blocks);
                return Err(refuse(rx.get_mut(), &mut s, reason));
            }
        }
    }
    s.elapsed = t0.elapsed();
    Ok(s)
}

/// Writes `path` whole, by rename (a reader never sees half a file).
fn replace(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// `resync-fetch`: makes `image` byte-identical to the source's at `from`
/// (over mutual TLS); prints progress every second, and writes it to
/// `status` and as metrics to `status` with extension `prom` (each replaced
/// by rename). The caller checks that this site is fenced first
/// (crate::fenced).
pub fn fetch(
    image: &Path,
    from: SocketAddr,
    tls: &FetchTls,
    status: Option<&Path>,
) -> Result<Summary> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .with_context(|| format!("opening {}", image.display()))?;
    lock(&f, image)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("the fetcher's runtime")?;
    // A backup server's base volume: its journal's position at this
    // resync's end bounds what may be restored (docs/design.md §15).
    let base = crate::volume::is_base_volume(image);
    if base {
        crate::volume::write_resync_mark(image, crate::volume::ResyncMark::Writing)
            .map_err(|e| anyhow!(e))?;
    }
    let summary = rt.block_on(fetch_into(&f, from, tls, status))?;
    if base {
        crate::volume::write_resync_mark(image, crate::volume::ResyncMark::Done)
            .map_err(|e| anyhow!(e))?;
    }
    Ok(summary)
}

/// Bounds `fut` by [`IO_TIMEOUT`].
async fn timed<T>(what: &str, fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(IO_TIMEOUT, fut)
        .await
        .map_err(|_| anyhow!("{what}: nothing for {IO_TIMEOUT:?}"))?
}

async fn fetch_into(
    f: &File,
    from: SocketAddr,
    tls: &FetchTls,
    status: Option<&Path>,
) -> Result<Summary> {
    let disk_bytes = f.metadata()?.len();
    let blocks = blocks_of(disk_bytes);
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(from))
        .await
        .map_err(|_| anyhow!("connecting to the resync source {from}: no answer"))?
        .with_context(|| format!("connecting to the resync source {from}"))?;
    tcp.set_nodelay(true)?;
    let name = crate::tls::server_name(&tls.server_name)?;
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    let stream = timed("TLS handshake with the resync source", async {
        connector.connect(name, tcp).await.with_context(|| {
            format!(
                "TLS handshake with the resync source {from} (expected server name {:?})",
                tls.server_name
            )
        })
    })
    .await?;
    let (rd, mut wr) = tokio::io::split(stream);
    let t0 = Instant::now();
    let compared = Arc::new(AtomicU64::new(0));
    let sent = AtomicU64::new(0);
    // The hashing side: Hello, every block's hash in order, HashesDone, as
    // encoded frames into a bounded queue that the connection drains.
    let (queue, mut frames) = tokio::sync::mpsc::channel::<Vec<u8>>(QUEUED_FRAMES);
    let hasher = {
        let f = f.try_clone()?;
        let compared = compared.clone();
        std::thread::spawn(move || -> Result<()> {
            let put = |m: &Msg| -> Result<()> {
                queue
                    .blocking_send(encode(m)?)
                    .map_err(|_| anyhow!("the connection to the source ended"))
            };
            put(&Msg::Hello {
                disk_bytes,
                block_bytes: BLOCK_BYTES,
            })?;
            let mut first = 0u64;
            while first < blocks {
                let count = (blocks - first).min(HASHES_PER_FRAME as u64);
                let data = read_blocks(&f, first, count, disk_bytes)?;
                let hashes = data.chunks(BLOCK_BYTES as usize).map(hash).collect();
                put(&Msg::Hashes { first, hashes })?;
                first += count;
                compared.store(first, Ordering::Relaxed);
            }
            put(&Msg::HashesDone)
        })
    };
    let writer = async {
        while let Some(frame) = frames.recv().await {
            timed("sending hashes to the source", async {
                wr.write_all(&frame).await.context("sending to the source")
            })
            .await?;
            sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
        }
        timed("sending hashes to the source", async {
            wr.flush().await.context("sending to the source")
        })
        .await?;
        // Dropping the queue's end here (not only when the connection ends)
        // lets a hashing thread blocked on it fail at once.
        drop(frames);
        Ok::<_, anyhow::Error>(())
    };
    let reader = async {
        let mut rx = tokio::io::BufReader::with_capacity(256 * 1024, rd);
        let mut p = Progress {
            blocks,
            ..Progress::default()
        };
        let mut last_report = Instant::now();
        loop {
            let (m, n) = timed("waiting for the source", recv_async(&mut rx))
                .await
                .context("from the resync source (refused our certificate?)")?;
            p.bytes_received += n;
            match m {
                Msg::Block { index, data }
                    if index < blocks && data.len() == block_range(index, disk_bytes).1 =>
                {
                    f.write_all_at(&data, index * BLOCK_BYTES)
                        .with_context(|| format!("writing block {index}"))?;
                    p.received += 1;
                }
                Msg::Done { blocks: b } if b == p.received => return Ok(p),
                Msg::Refused { reason } => bail!("the source refused: {reason}"),
                other => {
                    let what: String = format!("{other:?}").chars().take(120).collect();
                    bail!("unexpected frame from the source: {what}");
                }
            }
            if last_report.elapsed() >= Duration::from_secs(1) {
                p.compared = compared.load(Ordering::Relaxed);
                p.bytes_sent = sent.load(Ordering::Relaxed);
                report(&p, t0.elapsed(), status)?;
                last_report = Instant::now();
            }
        }
    };
    // On an error the other side is dropped with its end of the queue, which
    // ends the hashing thread.
    let outcome = tokio::try_join!(writer, reader);
    let hashed = hasher
        .join()
        .map_err(|_| anyhow!("the hashing thread panicked"))?;
    let ((), mut p) = outcome?;
    hashed?;
    f.sync_all().context("fsync of the resynced image")?;
    p.compared = compared.load(Ordering::Relaxed);
    p.bytes_sent = sent.load(Ordering::Relaxed);
    p.done = true;
    report(&p, t0.elapsed(), status)?;
    Ok(Summary {
        disk_bytes,
        blocks,
        differing: p.received,
        bytes_sent: p.bytes_sent,
        bytes_received: p.bytes_received,
        elapsed: t0.elapsed(),
    })
}

/// Prints the progress line and writes it (and the metrics) to `status`.
fn report(p: &Progress, elapsed: Duration, status: Option<&Path>) -> Result<()> {
    let line = p.line(elapsed);
    eprintln!("{line}");
    if let Some(st) = status {
        replace(st, &format!("{line}\n"))?;
        replace(&st.with_extension("prom"), &p.metrics(elapsed))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_from_the_rate_so_far() {
        let mut p = Progress {
            blocks: 1000,
            compared: 250,
            ..Progress::default()
        };
        assert_eq!(p.to_go(), 750);
        assert_eq!(p.eta(Duration::from_secs(2)), Some(Duration::from_secs(6)));
        assert!(p.line(Duration::from_secs(2)).contains("phase=compare"));
        assert!(p.line(Duration::from_secs(2)).contains("eta_s=6.0"));
        p.compared = 0;
        assert_eq!(p.eta(Duration::from_secs(2)), None);
        p.done = true;
        assert!(p.line(Duration::from_secs(2)).contains("phase=done"));
        let m = p.metrics(Duration::from_secs(2));
        assert!(m.contains("pipecloud_resync_done 1\n"), "{m}");
        assert!(m.contains("pipecloud_resync_eta_seconds 0\n"), "{m}");
    }

    #[test]
    fn last_block_may_be_short() {
        assert_eq!(blocks_of(4096 * 3 + 1), 4);
        assert_eq!(block_range(3, 4096 * 3 + 1), (4096 * 3, 1));
        assert_eq!(block_range(1, 4096 * 3 + 1), (4096, 4096));
    }

    #[test]
    fn oversized_frame_is_refused() {
        let mut b = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        b.extend(vec![0u8; 16]);
        assert!(recv(&mut b.as_slice()).is_err());
    }
}
