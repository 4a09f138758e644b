//! The block-device seam between the NBD server and what stores a disk.
//!
//! The NBD server ([`crate::nbd`]) is generic over [`BlockBackend`]; the local image
//! (io_uring) implements it, and the replicating disk wraps a local image and adds
//! seq/vector assignment, the replication stream and the mode rules.
//!
//! Errors are `std::io::Error`; the NBD server maps their kind/errno to NBD error
//! replies (EIO, ENOSPC, EINVAL, ...), it never disconnects because a backend failed.

use std::future::Future;
use std::io;

/// A block device served to a guest.
pub trait BlockBackend: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `len` bytes at `offset` (the server checks the range first).
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = io::Result<Vec<u8>>> + Send;
    /// Writes `data` at `offset`; with `fua` the data is durable locally when this returns.
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Writes `len` zero bytes at `offset`.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Discards `len` bytes at `offset` (reads may return zeroes afterwards).
    fn trim(&self, offset: u64, len: u32) -> impl Future<Output = io::Result<()>> + Send;
    /// Makes every write that has completed (on any connection) durable locally.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;
}
