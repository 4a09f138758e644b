//! In-process tests of the server over a real unix socket, with a raw protocol client
//! and an in-memory backend that can inject failures and observe concurrency.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::proto::*;
use super::*;

/// In-memory disk. `barrier` (if set) makes every WRITE wait until that many writes are
/// in progress at once; `fail_reads` makes READ fail with EIO.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    fail_reads: AtomicBool,
    active: AtomicUsize,
    max_active: AtomicUsize,
    flushes: AtomicUsize,
    barrier: Option<tokio::sync::Barrier>,
}

impl MemDisk {
    fn new(size: usize) -> Self {
        Self {
            data: Mutex::new(vec![0; size]),
            fail_reads: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
            barrier: None,
        }
    }
    fn bytes(&self, off: usize, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[off..off + len].to_vec()
    }
}

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(self.bytes(offset as usize, len as usize))
    }
    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> io::Result<()> {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active.fetch_max(now, Ordering::SeqCst);
        if let Some(b) = &self.barrier {
            b.wait().await;
        }
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(&data);
        self.active.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> io::Result<()> {
        self.data.lock().unwrap()[offset as usize..(offset + u64::from(len)) as usize].fill(0);
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u32) -> io::Result<()> {
        self.write_zeroes(offset, len, false).await
    }
    async fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct TempSock(PathBuf);
impl TempSock {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pipecloud-nbd-unit-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempSock(dir)
    }
    fn path(&self) -> PathBuf {
        self.0.join("nbd.sock")
    }
}
impl Drop for TempSock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Raw protocol client.
struct Client {
    s: UnixStream,
}

impl Client {
    /// Connects and completes the greeting (client flags = fixed newstyle + no zeroes).
    async fn connect(path: &std::path::Path) -> Client {
        let mut s = UnixStream::connect(path).await.unwrap();
        let mut g = [0u8; GREETING_LEN];
        s.read_exact(&mut g).await.unwrap();
        assert_eq!(g, encode_greeting());
        s.write_all(&3u32.to_be_bytes()).await.unwrap();
        Client { s }
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) {
        self.s
            .write_all(&encode_option(option, data))
            .await
            .unwrap();
    }

    /// Reads one option reply: (option, type, data).
    async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).await.unwrap();
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            OPTION_REPLY_MAGIC
        );
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0; len];
        self.s.read_exact(&mut d).await.unwrap();
        (opt, ty, d)
    }

    /// NBD_OPT_GO; returns (size, flags) or the error reply type.
    async fn go(&mut self, name: &str) -> Result<(u64, u16), u32> {
        self.send_option(OPT_GO, &encode_go_data(name)).await;
        let mut export = None;
        loop {
            let (opt, ty, data) = self.option_reply().await;
            assert_eq!(opt, OPT_GO);
            match ty {
                REP_INFO if data[0..2] == INFO_EXPORT.to_be_bytes() => {
                    export = Some((
                        u64::from_be_bytes(data[2..10].try_into().unwrap()),
                        u16::from_be_bytes(data[10..12].try_into().unwrap()),
                    ))
                }
                REP_INFO => {}
                REP_ACK => return Ok(export.expect("INFO_EXPORT before ACK")),
                err => return Err(err),
            }
        }
    }

    async fn request(
        &mut self,
        kind: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let b = encode_request(kind, flags, handle, offset, length, payload);
        self.s.write_all(&b).await.unwrap();
    }

    /// Reads a simple reply header: (error, handle).
    async fn reply(&mut self) -> io::Result<(u32, u64)> {
        let mut r = [0u8; SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut r).await?;
        Ok(decode_simple_reply(&r).expect("a simple reply"))
    }

    async fn read(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let err = self.simple(CMD_READ, 0, handle, offset, len, &[]).await;
        if err != 0 {
            return Err(err);
        }
        let mut d = vec![0; len as usize];
        self.s.read_exact(&mut d).await.unwrap();
        Ok(d)
    }

    async fn simple(
        &mut self,
        kind: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u32 {
        self.request(kind, flags, handle, offset, length, payload)
            .await;
        let (err, h) = self.reply().await.unwrap();
        assert_eq!(h, handle);
        err
    }

    /// True when the server closed the connection.
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

async fn start(
    disk: Arc<MemDisk>,
    config: NbdConfig,
) -> (TempSock, ServerHandle, NbdServer<MemDisk>) {
    let dir = TempSock::new("srv");
    let server = NbdServer::with_config(config);
    server.add_export("disk0".into(), disk).unwrap();
    let handle = server.serve_unix(dir.path()).await.unwrap();
    (dir, handle, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_read_write_flush_trim_zeroes_disc() {
    let disk = Arc::new(MemDisk::new(1 << 20));
    let (dir, handle, _srv) = start(disk.clone(), NbdConfig::default()).await;
    let mut c = Client::connect(&dir.path()).await;
    let (size, flags) = c.go("disk0").await.unwrap();
    assert_eq!(size, 1 << 20);
    assert_eq!(flags, SERVER_TRANSMISSION_FLAGS);
    assert_ne!(flags & FLAG_CAN_MULTI_CONN, 0);

    let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        c.simple(CMD_WRITE, CMD_FLAG_FUA, 1, 4096, 8192, &pattern)
            .await,
        0
    );
    assert_eq!(disk.bytes(4096, 8192), pattern);
    assert_eq!(c.read(2, 4096, 8192).await.unwrap(), pattern);
    // unaligned read
    assert_eq!(c.read(3, 4097, 3).await.unwrap(), pattern[1..4].to_vec());
    assert_eq!(c.simple(CMD_FLUSH, 0, 4, 0, 0, &[]).await, 0);
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 1);
    assert_eq!(
        c.simple(CMD_TRIM, CMD_FLAG_FUA, 5, 4096, 4096, &[]).await,
        0
    );
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 2, "TRIM+FUA flushes");
    assert_eq!(
        c.simple(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 6, 8192, 100, &[])
            .await,
        0
    );
    let mut expect = vec![0u8; 4096];
    expect.extend_from_slice(&[0; 100]);
    expect.extend_from_slice(&pattern[4096 + 100..]);
    assert_eq!(disk.bytes(4096, 8192), expect);
    c.request(CMD_DISC, 0, 7, 0, 0, &[]).await;
    assert!(c.closed().await);
    handle.shutdown().await;
    assert!(!dir.path().exists(), "socket file removed on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_haggling() {
    let disk = Arc::new(MemDisk::new(65536));
    let (dir, handle, srv) = start(disk.clone(), NbdConfig::default()).await;
    let mut c = Client::connect(&dir.path()).await;
    assert_eq!(c.go("nope").await, Err(REP_ERR_UNKNOWN));
    c.send_option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.option_reply().await.1, REP_ERR_UNSUP);
    c.send_option(OPT_LIST, &[]).await;
    let (_, ty, d) = c.option_reply().await;
    assert_eq!((ty, &d[4..]), (REP_SERVER, &b"disk0"[..]));
    assert_eq!(c.option_reply().await.1, REP_ACK);
    // default export (only one exists)
    assert_eq!(c.go("").await, Ok((65536, SERVER_TRANSMISSION_FLAGS)));
    assert_eq!(c.read(1, 0, 16).await.unwrap(), vec![0; 16]);

    // NBD_OPT_EXPORT_NAME with no-zeroes
    let mut c = Client::connect(&dir.path()).await;
    c.send_option(OPT_EXPORT_NAME, b"disk0").await;
    let mut r = [0u8; 10];
    c.s.read_exact(&mut r).await.unwrap();
    assert_eq!(u64::from_be_bytes(r[0..8].try_into().unwrap()), 65536);
    assert_eq!(c.read(1, 100, 4).await.unwrap(), vec![0; 4]);

    // unknown export with EXPORT_NAME: closed
    let mut c = Client::connect(&dir.path()).await;
    c.send_option(OPT_EXPORT_NAME, b"other").await;
    assert!(c.closed().await);

    // abort
    let mut c = Client::connect(&dir.path()).await;
    c.send_option(OPT_ABORT, &[]).await;
    assert_eq!(c.option_reply().await.1, REP_ACK);
    assert!(c.closed().await);

    // unknown client flags: closed
    let mut s = UnixStream::connect(dir.path()).await.unwrap();
    let mut g = [0u8; GREETING_LEN];
    s.read_exact(&mut g).await.unwrap();
    s.write_all(&0x80u32.to_be_bytes()).await.unwrap();
    let mut c = Client { s };
    assert!(c.closed().await);

    // oversized option data: closed
    let mut c = Client::connect(&dir.path()).await;
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&b).await.unwrap();
    assert!(c.closed().await);

    // a second export appears at run time
    srv.add_export("disk1".into(), Arc::new(MemDisk::new(4096)))
        .unwrap();
    assert!(matches!(
        srv.add_export("disk1".into(), disk),
        Err(NbdError::DuplicateExport(_))
    ));
    let mut c = Client::connect(&dir.path()).await;
    assert_eq!(c.go("disk1").await, Ok((4096, SERVER_TRANSMISSION_FLAGS)));
    let mut c = Client::connect(&dir.path()).await;
    assert_eq!(
        c.go("").await,
        Err(REP_ERR_UNKNOWN),
        "default export is ambiguous with two"
    );
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_errors_and_server_survives() {
    let disk = Arc::new(MemDisk::new(1 << 20));
    let (dir, handle, _srv) = start(disk.clone(), NbdConfig::default()).await;
    let mut c = Client::connect(&dir.path()).await;
    c.go("disk0").await.unwrap();
    assert_eq!(c.read(1, 1 << 20, 1).await, Err(EINVAL));
    assert_eq!(c.read(2, u64::MAX, 4096).await, Err(EINVAL));
    assert_eq!(c.read(3, 0, MAX_PAYLOAD + 1).await, Err(EINVAL));
    assert_eq!(c.simple(CMD_CACHE, 0, 4, 0, 512, &[]).await, EINVAL);
    assert_eq!(c.simple(99, 0, 5, 0, 0, &[]).await, EINVAL);
    assert_eq!(
        c.simple(CMD_WRITE, 0, 6, (1 << 20) - 1, 2, &[1, 2]).await,
        ENOSPC
    );
    assert_eq!(
        c.simple(CMD_WRITE, CMD_FLAG_DF, 7, 0, 3, &[9, 9, 9]).await,
        EINVAL
    );
    assert_eq!(
        disk.bytes(0, 3),
        vec![0, 0, 0],
        "rejected write not applied"
    );
    assert_eq!(c.simple(CMD_TRIM, 0, 8, 1 << 20, 1, &[]).await, EINVAL);
    assert_eq!(
        c.simple(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 9, 0, 1, &[])
            .await,
        EINVAL
    );
    // backend failure -> EIO, no payload, stream stays in sync
    disk.fail_reads.store(true, Ordering::SeqCst);
    assert_eq!(c.read(10, 0, 4096).await, Err(EIO));
    disk.fail_reads.store(false, Ordering::SeqCst);
    assert_eq!(c.simple(CMD_WRITE, 0, 11, 0, 2, &[7, 7]).await, 0);
    assert_eq!(c.read(12, 0, 2).await.unwrap(), vec![7, 7]);

    // oversized write: error reply, then close
    c.request(CMD_WRITE, 0, 13, 0, MAX_PAYLOAD + 1, &[]).await;
    assert_eq!(c.reply().await.unwrap(), (EINVAL, 13));
    assert!(c.closed().await);

    // bad magic: close
    let mut d = Client::connect(&dir.path()).await;
    d.go("disk0").await.unwrap();
    d.s.write_all(&[0xde; REQUEST_HEADER_LEN]).await.unwrap();
    assert!(d.closed().await);

    // the server still serves new connections
    let mut e = Client::connect(&dir.path()).await;
    e.go("disk0").await.unwrap();
    assert_eq!(e.read(1, 0, 2).await.unwrap(), vec![7, 7]);
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_within_bound() {
    let mut disk = MemDisk::new(1 << 20);
    // Every write waits until 4 writes are in progress: completes only if the server
    // really runs requests concurrently.
    disk.barrier = Some(tokio::sync::Barrier::new(4));
    let disk = Arc::new(disk);
    let config = NbdConfig {
        max_in_flight: 8,
        ..NbdConfig::default()
    };
    let (dir, handle, _srv) = start(disk.clone(), config).await;
    let mut c = Client::connect(&dir.path()).await;
    c.go("disk0").await.unwrap();
    let n = 200u64;
    let mut batch = Vec::new();
    for i in 0..n {
        let h = RequestHeader {
            flags: 0,
            kind: CMD_WRITE,
            handle: 1000 + i,
            offset: i * 512,
            length: 512,
        };
        batch.extend_from_slice(&encode_request_header(&h));
        batch.extend_from_slice(&[(i % 256) as u8; 512]);
    }
    let (mut rd, mut wr) = c.s.into_split();
    let sender = tokio::spawn(async move {
        wr.write_all(&batch).await.unwrap();
        wr
    });
    let mut seen = std::collections::BTreeSet::new();
    let replies = async {
        for _ in 0..n {
            let mut r = [0u8; SIMPLE_REPLY_LEN];
            rd.read_exact(&mut r).await.unwrap();
            assert_eq!(&r[4..8], &[0, 0, 0, 0]);
            assert!(seen.insert(u64::from_be_bytes(r[8..16].try_into().unwrap())));
        }
    };
    tokio::time::timeout(Duration::from_secs(60), replies)
        .await
        .expect("requests did not run concurrently");
    assert_eq!(seen, (1000..1000 + n).collect());
    let max = disk.max_active.load(Ordering::SeqCst);
    assert!(
        (4..=8).contains(&max),
        "max concurrent writes {max} outside 4..=8"
    );
    for i in 0..n {
        assert_eq!(
            disk.bytes((i * 512) as usize, 512),
            vec![(i % 256) as u8; 512]
        );
    }
    drop(sender.await.unwrap());
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_requests() {
    let mut disk = MemDisk::new(1 << 20);
    disk.barrier = Some(tokio::sync::Barrier::new(2));
    let disk = Arc::new(disk);
    let (dir, handle, _srv) = start(disk.clone(), NbdConfig::default()).await;
    let mut c = Client::connect(&dir.path()).await;
    c.go("disk0").await.unwrap();
    // One write is stuck on the barrier; shutdown must wait for it.
    c.request(CMD_WRITE, 0, 1, 0, 4, &[1, 2, 3, 4]).await;
    while disk.active.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let shut = tokio::spawn(handle.shutdown());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !shut.is_finished(),
        "shutdown waits for the in-flight write"
    );
    // Release the stuck write from the side; then shutdown can complete.
    disk.barrier.as_ref().unwrap().wait().await;
    shut.await.unwrap();
    assert_eq!(c.reply().await.unwrap(), (0, 1));
    assert_eq!(disk.bytes(0, 4), vec![1, 2, 3, 4]);
}
