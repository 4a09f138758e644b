//! Compressed checkpoint pages are decoded on receipt, before the ledger's step
//! reaches the checkpoint thread (docs/design.md §14): staging, apply, recovery
//! and failover only ever see full pages, so re-applying a staged epoch stays
//! harmless.
//!
//! Per connection and machine a [`Decoder`] keeps the last received copy of each
//! page in a *latest* file, a sparse `memfd` (anonymous shared memory, swappable;
//! never written to the disk, whose bandwidth the staged and replica copies of
//! every page already use: with an unlinked disk file instead, one A/B run fell
//! from 38 / 10 / 35 to 18 / 0.8 / 4 acknowledged epochs/s on three page-heavy
//! loads, docs/design.md §14), and
//! which pages it holds (a bitmap: one bit per page up to the highest received,
//! the ledger having bounded offsets by the machine's RAM). Memory: at most the
//! machine's RAM per connection (a connection's first epoch sends all of it), freed
//! when the connection goes. A frame the decoder refuses (an XOR frame whose base
//! was not received on this connection, a bad LZ4 block) closes the connection like
//! any other hostile frame.

use pipecloud_core::pagecodec::{DecodeError, Decoder, PageStore};
use pipecloud_core::wire::PageEncoding;
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

/// A machine's latest copies on one connection: an unlinked sparse file.
struct LatestFile(File);

impl PageStore for LatestFile {
    fn read(&mut self, offset: u64, out: &mut [u8]) -> Result<(), String> {
        self.0
            .read_exact_at(out, offset)
            .map_err(|e| format!("read latest copies at {offset}: {e}"))
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        self.0
            .write_all_at(data, offset)
            .map_err(|e| format!("write latest copies at {offset}: {e}"))
    }
}

/// The decoders of one group's connections.
#[derive(Default)]
pub struct Decoders {
    conns: Mutex<HashMap<u64, HashMap<String, Decoder<LatestFile>>>>,
}

impl std::fmt::Debug for Decoders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = crate::store::lock(&self.conns).len();
        f.debug_struct("Decoders").field("connections", &n).finish()
    }
}

impl Decoders {
    /// The full pages of a `Pages` frame of `machine` on connection `conn`.
    pub fn decode(
        &self,
        conn: u64,
        machine: &str,
        offset: u64,
        encoding: PageEncoding,
        data: &[u8],
    ) -> Result<Vec<u8>, DecodeError> {
        let mut conns = crate::store::lock(&self.conns);
        let machines = conns.entry(conn).or_default();
        if !machines.contains_key(machine) {
            let file = latest_file(conn, machine).map_err(DecodeError::Store)?;
            machines.insert(machine.to_owned(), Decoder::new(LatestFile(file)));
        }
        let d = machines
            .get_mut(machine)
            .ok_or_else(|| DecodeError::Store("decoder vanished".into()))?;
        Ok(d.decode(offset, encoding, data)?.to_vec())
    }

    /// The connection is gone: its copies are dropped.
    pub fn forget(&self, conn: u64) {
        crate::store::lock(&self.conns).remove(&conn);
    }
}

/// A fresh anonymous memory file for one connection's copies of one machine.
fn latest_file(conn: u64, machine: &str) -> Result<File, String> {
    let name = CString::new(format!("pipecloud-latest-{conn}-{machine}"))
        .map_err(|e| format!("memfd name: {e}"))?;
    // SAFETY: a valid C string; the returned descriptor is owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!(
            "memfd_create for the latest pages of {machine}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipecloud_core::pagecodec::Shadow;
    use pipecloud_core::wire::PAGE_SIZE;

    #[test]
    fn decodes_through_a_memory_file_per_connection() {
        let d = Decoders::default();
        let mut sh = Shadow::new(1 << 20, 1 << 30);
        let mut page = vec![3u8; PAGE_SIZE as usize];
        let mut frames = Vec::new();
        for round in 0..3u8 {
            page[round as usize] = round;
            sh.encode(PAGE_SIZE, &page, |o, e, data| {
                frames.push((o, e, data));
                Ok::<(), ()>(())
            })
            .unwrap();
        }
        assert!(matches!(frames[2].1, PageEncoding::XorLz4 { .. }));
        for (o, e, data) in &frames[..2] {
            d.decode(1, "m", *o, *e, data).unwrap();
        }
        assert_eq!(
            d.decode(1, "m", frames[2].0, frames[2].1, &frames[2].2)
                .unwrap(),
            page
        );
        // Another connection has no base.
        let e = d
            .decode(2, "m", frames[2].0, frames[2].1, &frames[2].2)
            .unwrap_err();
        assert!(matches!(e, DecodeError::Refused(_)), "{e}");
        d.forget(1);
        let e = d
            .decode(1, "m", frames[2].0, frames[2].1, &frames[2].2)
            .unwrap_err();
        assert!(matches!(e, DecodeError::Refused(_)), "{e}");
    }
}
