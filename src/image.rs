//! The local disk image: a regular file served as a block device.
//!
//! [`LocalImage`] implements [`BlockBackend`] over one file: it checks ranges, maps NBD's
//! commands (FUA, WRITE_ZEROES, TRIM) onto file operations with their fallbacks, and hands
//! the I/O to one of two engines, chosen when the image is opened:
//! - the io_uring ring of the image (`src/image/uring.rs`: the caller submits and often
//!   completes on its own thread, a reaper thread collects the rest), the default;
//! - `pread`/`pwrite` on tokio's blocking thread pool, when io_uring cannot be set up
//!   (kernel too old, `io_uring_disabled`, seccomp: the image logs a warning) or
//!   [`ImageOptions::force_thread_pool`] asks for it.
//!
//! # Buffered I/O and durability
//! The file is opened *without* `O_DIRECT`: NBD requests may have any alignment and size,
//! and `O_DIRECT` needs offset, length and buffer aligned to the file system's block
//! size (bouncing unaligned requests would mean read-modify-write under a lock). The
//! guest side (`losetup --direct-io=on`, QEMU `cache=none`) already bypasses the guest's
//! own page cache, so the only cache is the host's page cache of this one file, and
//! durability is explicit:
//! - FLUSH: `fdatasync` (`IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC`): every write
//!   completed before it, through any connection, is durable (one file, one page cache);
//! - FUA write: `pwrite` with `RWF_DSYNC` (falls back to write + `fdatasync` where the
//!   flag is not supported);
//! - FUA on WRITE_ZEROES / TRIM: the operation, then `fdatasync`.
//!
//! TRIM punches a hole (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`); where the file
//! system cannot, TRIM is a no-op (it is advisory). WRITE_ZEROES uses
//! `FALLOC_FL_ZERO_RANGE` (keeps the allocation, honouring NBD's NO_HOLE); where that is
//! not supported it writes zero buffers of at most 1 MiB.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing::{info, warn};

use crate::block::BlockBackend;

mod uring;

/// Largest zero buffer written when `FALLOC_FL_ZERO_RANGE` is not available.
const ZERO_CHUNK: u32 = 1024 * 1024;

/// Which I/O engine an image uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring on a dedicated thread.
    IoUring,
    /// `pread`/`pwrite` on tokio's blocking thread pool (fallback).
    ThreadPool,
}

/// Tuning of a [`LocalImage`].
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// Skip io_uring and use the blocking thread pool.
    pub force_thread_pool: bool,
    /// Operations in flight in the ring (callers beyond it wait for a slot).
    pub queue_depth: u32,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            force_thread_pool: false,
            queue_depth: 128,
        }
    }
}

/// A file served as a block device (see the module docs). `Send + Sync`; share it in an
/// `Arc`.
pub struct LocalImage {
    path: PathBuf,
    size: u64,
    engine: Engine,
    zero_range_ok: AtomicBool,
    punch_hole_ok: AtomicBool,
    dsync_ok: AtomicBool,
}

impl std::fmt::Debug for LocalImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalImage")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("engine", &self.engine())
            .finish()
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl LocalImage {
    /// Opens (creating or extending, sparsely, if needed) the image at `path` as a disk of
    /// `size` bytes. A regular file larger than `size`, or anything but a regular file, is
    /// an error.
    pub fn open(path: impl AsRef<Path>, size: u64) -> io::Result<LocalImage> {
        Self::open_with(path, size, ImageOptions::default())
    }

    /// [`LocalImage::open`] with explicit options.
    pub fn open_with(
        path: impl AsRef<Path>,
        size: u64,
        options: ImageOptions,
    ) -> io::Result<LocalImage> {
        let path = path.as_ref().to_path_buf();
        if size == 0 {
            return Err(invalid(format!(
                "image {}: size must be > 0",
                path.display()
            )));
        }
        let ctx = |what: &str, e: io::Error| {
            io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
        };
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| ctx("opening image", e))?;
        let meta = file.metadata().map_err(|e| ctx("stat of image", e))?;
        if !meta.file_type().is_file() {
            return Err(invalid(format!(
                "image {} is not a regular file",
                path.display()
            )));
        }
        if meta.len() > size {
            return Err(invalid(format!(
                "image {} is {} bytes, larger than the configured size {size}",
                path.display(),
                meta.len()
            )));
        }
        if meta.len() < size {
            file.set_len(size).map_err(|e| ctx("extending image", e))?;
            file.sync_all().map_err(|e| ctx("syncing image", e))?;
            if !existed {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(|e| ctx("syncing directory of image", e))?;
                }
            }
        }
        let file = Arc::new(file);
        let engine = if options.force_thread_pool {
            Engine::Pool(file)
        } else {
            match uring::Ring::start(Arc::clone(&file), &options) {
                Ok(ring) => Engine::Uring(ring),
                Err(e) => {
                    warn!(
                        image = %path.display(),
                        "io_uring unavailable ({e}); falling back to the blocking thread pool"
                    );
                    Engine::Pool(file)
                }
            }
        };
        let image = LocalImage {
            path,
            size,
            engine,
            zero_range_ok: AtomicBool::new(true),
            punch_hole_ok: AtomicBool::new(true),
            dsync_ok: AtomicBool::new(true),
        };
        info!(image = %image.path.display(), size, engine = ?image.engine(), "image opened");
        Ok(image)
    }

    /// Path of the image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The I/O engine in use.
    pub fn engine(&self) -> IoEngine {
        match self.engine {
            Engine::Uring(_) => IoEngine::IoUring,
            Engine::Pool(_) => IoEngine::ThreadPool,
        }
    }

    fn check_range(&self, offset: u64, len: u32, past_end: i32) -> io::Result<()> {
        match offset.checked_add(u64::from(len)) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::from_raw_os_error(past_end)),
        }
    }

    async fn write_zero_buffers(&self, offset: u64, len: u32) -> io::Result<()> {
        let mut done = 0u32;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK);
            self.engine
                .write(offset + u64::from(done), vec![0u8; n as usize], false)
                .await?;
            done += n;
        }
        Ok(())
    }
}

/// `fallocate` modes a file system may not support.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

impl BlockBackend for LocalImage {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.check_range(offset, len, libc::EINVAL)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        self.engine.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        let len =
            u32::try_from(data.len()).map_err(|_| invalid("write larger than 4 GiB".into()))?;
        self.check_range(offset, len, libc::ENOSPC)?;
        if len == 0 {
            return if fua { self.flush().await } else { Ok(()) };
        }
        if fua && self.dsync_ok.load(Ordering::Relaxed) {
            // RWF_DSYNC is rejected before any byte is written, so retrying is safe.
            match self.engine.write(offset, data.clone(), true).await {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    warn!(image = %self.path.display(), "RWF_DSYNC unsupported; FUA uses write + fdatasync");
                    self.dsync_ok.store(false, Ordering::Relaxed);
                }
                r => return r,
            }
        }
        self.engine.write(offset, data, false).await?;
        if fua {
            self.engine.fsync().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        self.check_range(offset, len, libc::ENOSPC)?;
        if len == 0 {
            return if fua { self.flush().await } else { Ok(()) };
        }
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        let mut zeroed = false;
        if self.zero_range_ok.load(Ordering::Relaxed) {
            match self.engine.fallocate(mode, offset, len).await {
                Ok(()) => zeroed = true,
                Err(e) if unsupported(&e) => {
                    warn!(image = %self.path.display(), "FALLOC_FL_ZERO_RANGE unsupported ({e}); writing zero buffers");
                    self.zero_range_ok.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        if !zeroed {
            self.write_zero_buffers(offset, len).await?;
        }
        if fua {
            self.engine.fsync().await?;
        }
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32) -> io::Result<()> {
        self.check_range(offset, len, libc::EINVAL)?;
        if len == 0 || !self.punch_hole_ok.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.engine.fallocate(mode, offset, len).await {
            Err(e) if unsupported(&e) => {
                warn!(image = %self.path.display(), "hole punching unsupported ({e}); TRIM is a no-op");
                self.punch_hole_ok.store(false, Ordering::Relaxed);
                Ok(())
            }
            r => r,
        }
    }

    async fn flush(&self) -> io::Result<()> {
        self.engine.fsync().await
    }
}

/// The two I/O engines behind one small interface.
enum Engine {
    Uring(uring::Ring),
    Pool(Arc<File>),
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blocking I/O task failed: {e}")))?
}

impl Engine {
    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        match self {
            Engine::Uring(r) => {
                r.submit(
                    uring::OpKind::Read {
                        buf: vec![0u8; len as usize],
                        done: 0,
                    },
                    offset,
                )
                .await
            }
            Engine::Pool(f) => {
                let f = Arc::clone(f);
                blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    f.read_exact_at(&mut buf, offset)?;
                    Ok(buf)
                })
                .await
            }
        }
    }

    async fn write(&self, offset: u64, data: Vec<u8>, dsync: bool) -> io::Result<()> {
        match self {
            Engine::Uring(r) => {
                if !dsync {
                    if let Some(done) = r.try_write_inline(offset, &data) {
                        return done;
                    }
                }
                r.submit(
                    uring::OpKind::Write {
                        buf: data,
                        done: 0,
                        dsync,
                    },
                    offset,
                )
                .await
                .map(drop)
            }
            Engine::Pool(f) => {
                let f = Arc::clone(f);
                blocking(move || {
                    f.write_all_at(&data, offset)?;
                    if dsync {
                        f.sync_data()?;
                    }
                    Ok(())
                })
                .await
            }
        }
    }

    async fn fsync(&self) -> io::Result<()> {
        match self {
            Engine::Uring(r) => {
                if let Some(done) = r.try_fsync_inline() {
                    return done;
                }
                let started = std::time::Instant::now();
                let done = r.submit(uring::OpKind::Fsync, 0).await.map(drop);
                r.note_fsync(started.elapsed());
                done
            }
            Engine::Pool(f) => {
                let f = Arc::clone(f);
                blocking(move || f.sync_data()).await
            }
        }
    }

    async fn fallocate(&self, mode: i32, offset: u64, len: u32) -> io::Result<()> {
        match self {
            Engine::Uring(r) => r
                .submit(uring::OpKind::Fallocate { mode, len }, offset)
                .await
                .map(drop),
            Engine::Pool(f) => {
                let f = Arc::clone(f);
                blocking(move || {
                    let off =
                        i64::try_from(offset).map_err(|_| invalid("offset too large".into()))?;
                    // SAFETY: plain syscall on a valid fd owned by `f`.
                    let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, off, i64::from(len)) };
                    if rc == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::last_os_error())
                    }
                })
                .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicUsize;

    /// A scratch directory, removed on drop.
    pub(super) struct TempDir(pub(super) PathBuf);
    impl TempDir {
        pub(super) fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let d = std::env::temp_dir().join(format!(
                "pipecloud-image-{}-{}",
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

    fn engines() -> [ImageOptions; 2] {
        [
            ImageOptions::default(),
            ImageOptions {
                force_thread_pool: true,
                ..ImageOptions::default()
            },
        ]
    }

    pub(super) fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn uring_is_used_when_available() {
        let t = TempDir::new();
        let img = LocalImage::open(t.0.join("a.img"), 1 << 20).unwrap();
        let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .map(|s| s.trim() != "0")
            .unwrap_or(false);
        if disabled {
            eprintln!("io_uring disabled on this kernel: checking the fallback instead");
            assert_eq!(img.engine(), IoEngine::ThreadPool);
        } else {
            assert_eq!(img.engine(), IoEngine::IoUring);
        }
    }

    #[test]
    fn open_creates_extends_and_rejects() {
        let t = TempDir::new();
        let p = t.0.join("disk.img");
        let img = LocalImage::open(&p, 1 << 20).unwrap();
        assert_eq!(img.size(), 1 << 20);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        drop(img);
        // extend
        let img = LocalImage::open(&p, 2 << 20).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 << 20);
        drop(img);
        // file larger than the configured size
        let e = LocalImage::open(&p, 1 << 20).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            LocalImage::open(&p, 0).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        // a directory is not an image
        assert!(LocalImage::open(&t.0, 4096).is_err());
    }

    #[test]
    fn data_reaches_the_file_and_survives_reopen() {
        for opts in engines() {
            let t = TempDir::new();
            let p = t.0.join("disk.img");
            let rt = rt();
            let img = LocalImage::open_with(&p, 1 << 20, opts.clone()).unwrap();
            rt.block_on(async {
                img.write(4096, vec![0xab; 8192], false).await.unwrap();
                img.write(100, vec![1, 2, 3], true).await.unwrap();
                img.flush().await.unwrap();
            });
            let on_disk = std::fs::read(&p).unwrap();
            assert_eq!(&on_disk[4096..4096 + 8192], &[0xab; 8192][..]);
            assert_eq!(&on_disk[100..103], &[1, 2, 3]);
            drop(img);
            let img = LocalImage::open_with(&p, 1 << 20, opts).unwrap();
            rt.block_on(async {
                assert_eq!(img.read(4095, 3).await.unwrap(), vec![0, 0xab, 0xab]);
                img.write_zeroes(4096, 4096, true).await.unwrap();
                assert_eq!(img.read(4096, 8192).await.unwrap()[..4096], [0u8; 4096][..]);
                img.trim(8192, 4096).await.unwrap();
                // out of range
                let e = img.read((1 << 20) - 1, 2).await.unwrap_err();
                assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
                let e = img.write(1 << 20, vec![1], false).await.unwrap_err();
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
                assert!(img.read(0, 0).await.unwrap().is_empty());
            });
        }
    }

    #[test]
    fn concurrent_operations_complete() {
        for opts in engines() {
            let t = TempDir::new();
            let img = Arc::new(LocalImage::open_with(t.0.join("d.img"), 8 << 20, opts).unwrap());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for i in 0..256u64 {
                    let img = Arc::clone(&img);
                    set.spawn(async move {
                        img.write(i * 32768, vec![i as u8; 32768], i % 7 == 0)
                            .await
                            .unwrap();
                        if i % 16 == 0 {
                            img.flush().await.unwrap();
                        }
                    });
                }
                while let Some(r) = set.join_next().await {
                    r.unwrap();
                }
                for i in 0..256u64 {
                    assert_eq!(
                        img.read(i * 32768, 32768).await.unwrap(),
                        vec![i as u8; 32768]
                    );
                }
            });
        }
    }

    fn open_fds_to(path: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
            .count()
    }

    #[test]
    fn dropping_an_image_stops_the_engine_and_closes_the_file() {
        for opts in engines() {
            let t = TempDir::new();
            let p = t.0.join("close.img");
            let img = LocalImage::open_with(&p, 1 << 20, opts).unwrap();
            rt().block_on(async {
                img.write(0, vec![1; 4096], false).await.unwrap();
                img.flush().await.unwrap();
            });
            assert_eq!(open_fds_to(&p), 1);
            drop(img);
            // The reaper thread drains and exits on its own; give it up to 10 s.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while open_fds_to(&p) > 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            assert_eq!(open_fds_to(&p), 0, "image file still open after drop");
        }
    }

    #[derive(Debug, Clone)]
    enum ModelOp {
        Write(u64, Vec<u8>, bool),
        Zero(u64, u32, bool),
        Trim(u64, u32),
        Read(u64, u32),
        Flush,
    }

    const MODEL_SIZE: u64 = 256 * 1024;

    fn model_op() -> impl Strategy<Value = ModelOp> {
        let off = 0..MODEL_SIZE;
        prop_oneof![
            (
                off.clone(),
                proptest::collection::vec(any::<u8>(), 1..20000),
                any::<bool>()
            )
                .prop_map(|(o, d, f)| ModelOp::Write(o, d, f)),
            (off.clone(), 1u32..70000, any::<bool>()).prop_map(|(o, l, f)| ModelOp::Zero(o, l, f)),
            (off.clone(), 1u32..70000).prop_map(|(o, l)| ModelOp::Trim(o, l)),
            (off, 1u32..70000).prop_map(|(o, l)| ModelOp::Read(o, l)),
            Just(ModelOp::Flush),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Both engines behave like a byte array (trimmed bytes are "unknown" until
        /// rewritten); out-of-range requests fail without touching anything.
        #[test]
        fn image_matches_model(ops in proptest::collection::vec(model_op(), 1..40)) {
            // io_uring, thread pool, and io_uring with every fallback path forced
            // (write zero buffers, TRIM as no-op, FUA as write + fdatasync).
            for (opts, fallbacks) in engines().into_iter().map(|o| (o, false))
                .chain([(ImageOptions::default(), true)])
            {
                let t = TempDir::new();
                let img = LocalImage::open_with(t.0.join("m.img"), MODEL_SIZE, opts).unwrap();
                if fallbacks {
                    img.zero_range_ok.store(false, Ordering::Relaxed);
                    img.punch_hole_ok.store(false, Ordering::Relaxed);
                    img.dsync_ok.store(false, Ordering::Relaxed);
                }
                let mut model: Vec<Option<u8>> = vec![Some(0); MODEL_SIZE as usize];
                let rt = rt();
                for op in &ops {
                    rt.block_on(async {
                        match op.clone() {
                            ModelOp::Write(o, d, fua) => {
                                let fits = o + d.len() as u64 <= MODEL_SIZE;
                                let r = img.write(o, d.clone(), fua).await;
                                prop_assert_eq!(r.is_ok(), fits);
                                if fits {
                                    for (i, b) in d.iter().enumerate() { model[o as usize + i] = Some(*b); }
                                }
                            }
                            ModelOp::Zero(o, l, fua) => {
                                let fits = o + u64::from(l) <= MODEL_SIZE;
                                prop_assert_eq!(img.write_zeroes(o, l, fua).await.is_ok(), fits);
                                if fits { model[o as usize..(o + u64::from(l)) as usize].fill(Some(0)); }
                            }
                            ModelOp::Trim(o, l) => {
                                let fits = o + u64::from(l) <= MODEL_SIZE;
                                prop_assert_eq!(img.trim(o, l).await.is_ok(), fits);
                                if fits { model[o as usize..(o + u64::from(l)) as usize].fill(None); }
                            }
                            ModelOp::Read(o, l) => {
                                let fits = o + u64::from(l) <= MODEL_SIZE;
                                match img.read(o, l).await {
                                    Ok(d) => {
                                        prop_assert!(fits);
                                        prop_assert_eq!(d.len(), l as usize);
                                        for (i, b) in d.iter().enumerate() {
                                            if let Some(m) = model[o as usize + i] {
                                                prop_assert_eq!(*b, m, "byte {} differs", o as usize + i);
                                            }
                                        }
                                    }
                                    Err(_) => prop_assert!(!fits),
                                }
                            }
                            ModelOp::Flush => prop_assert!(img.flush().await.is_ok()),
                        }
                        Ok(())
                    })?;
                }
                // Final state of the file itself matches the model.
                rt.block_on(img.flush()).unwrap();
                let on_disk = std::fs::read(t.0.join("m.img")).unwrap();
                prop_assert_eq!(on_disk.len() as u64, MODEL_SIZE);
                for (i, m) in model.iter().enumerate() {
                    if let Some(m) = m {
                        prop_assert_eq!(on_disk[i], *m, "file byte {} differs", i);
                    }
                }
            }
        }
    }
}
