//! Interoperability of the NBD server + LocalImage with real NBD clients:
//! `nbdinfo`, `nbdcopy` (libnbd-bin), `qemu-io` (qemu-utils), `nbdfuse` + loop + ext4
//! (fuse3, util-linux, e2fsprogs), and raw-socket clients for malformed requests and
//! multi-conn flush semantics.
//!
//! The server runs in-process on a tokio runtime, on a unique unix socket in a temp dir.
//! A test whose tool is missing FAILS, naming the Debian package to install
//! (scripts/install-deps.sh installs them all). The mount test needs root, /dev/fuse and loop devices; it
//! runs in private mount and pid namespaces on an autoclear loop device
//! (tests/support/blockstack.rs, src/loopdev.rs) and tears down in the order
//! umount -> (the device detaches; wait for backing_file to vanish) -> fusermount3 -u ->
//! server stop, with a Drop guard that detaches any loop device left on our file.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[path = "support/blockstack.rs"]
mod blockstack;
#[path = "support/nbd_raw.rs"]
mod nbd_raw;
use blockstack::{mount_test, qemu_io, random_bytes, require, require_mount, run};
use nbd_raw::Raw;

use pipecloud::image::LocalImage;
use pipecloud::nbd::proto::*;
use pipecloud::nbd::{NbdServer, ServerHandle};

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "pc-nbd-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server with one LocalImage export "disk0" on a unix socket. Field order matters for
/// drop: the handle (server) stops before the runtime, the dir goes last.
struct Served {
    handle: Option<ServerHandle>,
    rt: tokio::runtime::Runtime,
    image: PathBuf,
    sock: PathBuf,
    dir: TempDir,
}

impl Served {
    fn start(tag: &str, size: u64) -> Served {
        let dir = TempDir::new(tag);
        let image = dir.0.join("disk0.img");
        let sock = dir.0.join("nbd.sock");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let img = LocalImage::open(&image, size).unwrap();
        let server = NbdServer::new();
        server.add_export("disk0".into(), Arc::new(img)).unwrap();
        let handle = rt.block_on(server.serve_unix(&sock)).unwrap();
        Served {
            handle: Some(handle),
            rt,
            image,
            sock,
            dir,
        }
    }

    fn uri(&self) -> String {
        self.handle.as_ref().unwrap().uri("disk0")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(30), h.shutdown()).await
            });
        }
    }
}

// ---------------------------------------------------------------------------
// (a) nbdinfo
// ---------------------------------------------------------------------------

#[test]
fn nbdinfo_reports_size_and_flags() {
    require("nbdinfo");
    let srv = Served::start("info", 64 << 20);
    let (ok, out) = run(Command::new("nbdinfo").arg("--json").arg(srv.uri()));
    assert!(ok, "nbdinfo failed: {out}");
    let squashed: String = out.split_whitespace().collect();
    for want in [
        "\"export-size\":67108864",
        "\"can_flush\":true",
        "\"can_fua\":true",
        "\"can_trim\":true",
        "\"can_zero\":true",
        "\"can_multi_conn\":true",
        "\"is_read_only\":false",
    ] {
        assert!(
            squashed.contains(want),
            "nbdinfo output lacks {want}: {out}"
        );
    }
    // The export list has our disk.
    let (ok, out) = run(Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd+unix://?socket={}", srv.sock.display())));
    assert!(ok && out.contains("disk0"), "nbdinfo --list: {out}");
}

#[test]
fn nbdinfo_over_tcp() {
    require("nbdinfo");
    let dir = TempDir::new("tcp");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let img = LocalImage::open(dir.0.join("t.img"), 1 << 20).unwrap();
    let server = NbdServer::new();
    server.add_export("disk0".into(), Arc::new(img)).unwrap();
    let handle = rt
        .block_on(server.serve_tcp("127.0.0.1:0".parse().unwrap()))
        .unwrap();
    let (ok, out) = run(Command::new("nbdinfo")
        .arg("--size")
        .arg(handle.uri("disk0")));
    assert!(ok, "nbdinfo over TCP failed: {out}");
    assert_eq!(out.trim(), "1048576");
    rt.block_on(handle.shutdown());
}

// ---------------------------------------------------------------------------
// (b) nbdcopy round trip
// ---------------------------------------------------------------------------

#[test]
fn nbdcopy_round_trip_16mib() {
    require("nbdcopy");
    let size = 16 << 20;
    let srv = Served::start("copy", size as u64);
    let src = srv.dir.0.join("src.bin");
    let back = srv.dir.0.join("back.bin");
    let data = random_bytes(size, 0x5eed);
    std::fs::write(&src, &data).unwrap();
    // nbdcopy uses several connections (we advertise multi-conn) and many requests in
    // flight per connection.
    let (ok, out) = run(Command::new("nbdcopy").arg(&src).arg(srv.uri()));
    assert!(ok, "nbdcopy to NBD failed: {out}");
    let (ok, out) = run(Command::new("nbdcopy").arg(srv.uri()).arg(&back));
    assert!(ok, "nbdcopy from NBD failed: {out}");
    let got = std::fs::read(&back).unwrap();
    assert!(got == data, "round-tripped data differs");
    // nbdcopy flushes at the end: the image file itself holds the data.
    let img = std::fs::read(&srv.image).unwrap();
    assert!(img == data, "image file differs from the copied data");
}

// ---------------------------------------------------------------------------
// (c) qemu-io
// ---------------------------------------------------------------------------

#[test]
fn qemu_io_patterns() {
    require("qemu-io");
    let srv = Served::start("qemu", 8 << 20);
    qemu_io(
        &srv.uri(),
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write -f -P 0xcd 64k 64k",
            "read -P 0xcd 64k 64k",
            "write -z 0 4k",
            "read -P 0 0 4k",
            "read -P 0xab 4k 60k",
            "write -P 0x11 1m 512",
            "discard 2m 1m",
            "flush",
            "read -P 0x11 1m 512",
        ],
    );
    let img = std::fs::read(&srv.image).unwrap();
    assert!(img[..4096].iter().all(|&b| b == 0));
    assert!(img[4096..65536].iter().all(|&b| b == 0xab));
    assert!(img[65536..131072].iter().all(|&b| b == 0xcd));
    assert!(img[1 << 20..(1 << 20) + 512].iter().all(|&b| b == 0x11));
}

// ---------------------------------------------------------------------------
// (d) nbdfuse + loop + ext4
// ---------------------------------------------------------------------------

fn mount_stack(conns: u32) {
    let srv = Served::start(&format!("mount{conns}"), 256 << 20);
    mount_test(&srv.uri(), &srv.dir.0.join("m"), conns);
    // The ext4 superblock (magic 0xEF53 at byte 1080) is in our image file.
    let img = std::fs::read(&srv.image).unwrap();
    assert_eq!(
        &img[1080..1082],
        &[0x53, 0xef],
        "no ext4 superblock in the image"
    );
}

#[test]
fn nbdfuse_loop_ext4_mount() {
    require_mount();
    // One ordered stream, then nbdfuse's default of 4 connections (multi-conn: writes and
    // flushes land on different connections).
    mount_stack(1);
    mount_stack(4);
}

// ---------------------------------------------------------------------------
// (e) malformed requests
// ---------------------------------------------------------------------------

#[test]
fn malformed_requests_do_not_hurt_the_server() {
    let srv = Served::start("bad", 1 << 20);
    // A well-behaved connection stays open throughout.
    let (mut good, size) = Raw::go(&srv.sock, "disk0");
    assert_eq!(size, 1 << 20);
    assert_eq!(good.call(CMD_WRITE, 0, 1, 0, 4, &[1, 2, 3, 4]), 0);

    let (mut c, _) = Raw::go(&srv.sock, "disk0");
    assert_eq!(c.read(1, 1 << 20, 512), Err(EINVAL), "read past the end");
    assert_eq!(
        c.read(2, u64::MAX - 10, 512),
        Err(EINVAL),
        "offset overflow"
    );
    assert_eq!(c.read(3, 0, MAX_PAYLOAD + 1), Err(EINVAL), "huge read");
    assert_eq!(c.call(42, 0, 4, 0, 0, &[]), EINVAL, "unknown command");
    assert_eq!(c.call(CMD_BLOCK_STATUS, 0, 5, 0, 4096, &[]), EINVAL);
    assert_eq!(
        c.call(CMD_READ, 0x8000, 6, 0, 0, &[]),
        EINVAL,
        "unknown flag"
    );
    assert_eq!(
        c.call(CMD_WRITE, 0, 7, (1 << 20) - 2, 4, &[9; 4]),
        ENOSPC,
        "write past the end"
    );
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 8, 1 << 20, 1, &[]), ENOSPC);
    assert_eq!(c.call(CMD_TRIM, 0, 9, 1 << 20, 1, &[]), EINVAL);
    // still in sync after all that
    assert_eq!(c.read(10, 0, 4).unwrap(), vec![1, 2, 3, 4]);
    // huge write: error reply, then the server closes the connection
    c.send(CMD_WRITE, 0, 11, 0, u32::MAX, &[]);
    assert_eq!(c.reply(), (EINVAL, 11));
    assert!(c.closed_by_server());

    // bad request magic: closed
    let (mut c, _) = Raw::go(&srv.sock, "disk0");
    c.s.write_all(&[0x55; REQUEST_HEADER_LEN]).unwrap();
    assert!(c.closed_by_server());

    // garbage instead of client flags / options: closed
    let mut c = Raw::connect(&srv.sock);
    c.s.write_all(&[0xff; 64]).unwrap();
    assert!(c.closed_by_server());

    // a client vanishing mid-request
    let (mut c, _) = Raw::go(&srv.sock, "disk0");
    c.send(CMD_WRITE, 0, 12, 0, 4096, &[7; 100]);
    drop(c);

    // the good connection and new connections still work; nothing was corrupted
    assert_eq!(good.read(2, 0, 4).unwrap(), vec![1, 2, 3, 4]);
    let (mut fresh, _) = Raw::go(&srv.sock, "disk0");
    assert_eq!(fresh.read(1, 0, 4).unwrap(), vec![1, 2, 3, 4]);
    // A real client still negotiates and sees the export's size.
    require("nbdinfo");
    let (ok, out) = run(Command::new("nbdinfo").arg("--size").arg(srv.uri()));
    assert!(ok, "nbdinfo after the malformed requests failed: {out}");
    assert_eq!(out.trim(), "1048576", "nbdinfo --size");
    let img = std::fs::read(&srv.image).unwrap();
    assert_eq!(&img[0..4], &[1, 2, 3, 4]);
    assert!(
        img[4..].iter().all(|&b| b == 0),
        "rejected writes touched the image"
    );
}

// ---------------------------------------------------------------------------
// (f) multi-conn
// ---------------------------------------------------------------------------

#[test]
fn flush_on_one_connection_covers_writes_of_another() {
    let srv = Served::start("multiconn", 4 << 20);
    let (mut a, _) = Raw::go(&srv.sock, "disk0");
    let (mut b, _) = Raw::go(&srv.sock, "disk0");
    // Pipelined writes on A: all sent, then all replies collected.
    let chunks: Vec<Vec<u8>> = (0..32u64).map(|i| random_bytes(65536, i + 1)).collect();
    for (i, d) in chunks.iter().enumerate() {
        a.send(CMD_WRITE, 0, 100 + i as u64, i as u64 * 65536, 65536, d);
    }
    let mut handles: Vec<u64> = (0..32)
        .map(|_| a.reply())
        .map(|(e, h)| {
            assert_eq!(e, 0);
            h
        })
        .collect();
    handles.sort_unstable();
    assert_eq!(handles, (100..132).collect::<Vec<_>>());
    // FLUSH on B after A's writes were replied to.
    assert_eq!(b.call(CMD_FLUSH, 0, 1, 0, 0, &[]), 0);
    // B sees A's data, and so does the image file on disk.
    assert_eq!(b.read(2, 5 * 65536, 65536).unwrap(), chunks[5]);
    let img = std::fs::read(&srv.image).unwrap();
    for (i, d) in chunks.iter().enumerate() {
        assert!(
            &img[i * 65536..(i + 1) * 65536] == d.as_slice(),
            "chunk {i} not in the image file"
        );
    }
    // FUA write on B, visible to A.
    assert_eq!(b.call(CMD_WRITE, CMD_FLAG_FUA, 3, 0, 3, &[9, 8, 7]), 0);
    assert_eq!(a.read(4, 0, 3).unwrap(), vec![9, 8, 7]);
    // DISC on both: clean close.
    a.send(CMD_DISC, 0, 5, 0, 0, &[]);
    b.send(CMD_DISC, 0, 6, 0, 0, &[]);
    assert!(a.closed_by_server());
    assert!(b.closed_by_server());
}
