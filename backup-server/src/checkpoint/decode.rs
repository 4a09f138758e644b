//! Compressed checkpoint pages are decoded on receipt, before the ledger's step
//! reaches the checkpoint thread (docs/design.md §14): staging, apply, recovery
//! and failover only ever see full pages, so re-applying a staged epoch stays
//! harmless.
//!
//! Per connection and machine a [`Decoder`] keeps the last received copy of each
//! page in a *latest* file under `checkpoint/latest/`, unlinked as soon as it is
//! created (it is the connection's, never durable: the kernel frees it when the
//! connection's decoders are dropped, or the process dies), and which pages it
//! holds (a bitmap: one bit per page up to the highest received, the ledger having
//! bounded offsets by the machine's RAM). A frame the decoder refuses (an XOR
//! frame whose base was not received on this connection, a bad LZ4 block) closes
//! the connection like any other hostile frame.

use pipecloud_core::pagecodec::{DecodeError, Decoder, PageStore};
use pipecloud_core::wire::PageEncoding;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
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
pub struct Decoders {
    dir: PathBuf,
    conns: Mutex<HashMap<u64, HashMap<String, Decoder<LatestFile>>>>,
}

impl std::fmt::Debug for Decoders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoders").field("dir", &self.dir).finish()
    }
}

impl Decoders {
    /// Decoders keeping their files in `dir` (emptied now: files of an earlier
    /// process are of connections that are gone).
    pub fn new(dir: PathBuf) -> Decoders {
        let _ = std::fs::remove_dir_all(&dir);
        Decoders {
            dir,
            conns: Mutex::new(HashMap::new()),
        }
    }

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
            let file = self.create(conn, machine).map_err(DecodeError::Store)?;
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

    fn create(&self, conn: u64, machine: &str) -> Result<File, String> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("create {}: {e}", self.dir.display()))?;
        let path = self.dir.join(format!("{conn}-{machine}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| format!("create {}: {e}", path.display()))?;
        std::fs::remove_file(&path).map_err(|e| format!("unlink {}: {e}", path.display()))?;
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipecloud_core::pagecodec::Shadow;
    use pipecloud_core::wire::PAGE_SIZE;

    #[test]
    fn decodes_through_an_unlinked_file_per_connection() {
        let tmp = tempfile::tempdir().unwrap();
        let d = Decoders::new(tmp.path().join("latest"));
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
        // No file is left behind; another connection has no base.
        assert_eq!(
            std::fs::read_dir(tmp.path().join("latest"))
                .unwrap()
                .count(),
            0
        );
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
