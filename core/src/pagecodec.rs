//! Checkpoint page compression (issue 22 §2, docs/design.md §14): how the agent
//! encodes a machine's dirty pages into `Checkpoint::Pages` frames and how the
//! backup turns each frame back into full pages. Pure: no I/O, no clock.
//!
//! **Encoder** ([`Shadow`], agent, shipper thread). It keeps copies of the pages
//! last shipped *on the current connection* for one machine, in a direct-mapped
//! cache of at most `cap_bytes` (page `p` lives in slot `p mod slots`; a page that
//! maps to a slot holding another page has no copy). Each chunk of contiguous dirty
//! pages is split into runs of pages with and without a copy: a run with copies is
//! sent as [`PageEncoding::XorLz4`] (LZ4 of the pages XORed with their copies: a
//! page that changed in a few bytes becomes almost all zeros), a run without as
//! [`PageEncoding::Lz4`]; a run LZ4 cannot shrink goes [`PageEncoding::Raw`].
//! Every page shipped (whatever its encoding) then replaces its slot's copy, so a
//! slot tagged `p` always holds the last copy of `p` the backup received on this
//! connection. A new connection generation ([`Shadow::connection`]) or a failed
//! emit ([`Shadow::encode`]) invalidates every copy: the backup's copies belong to
//! one connection, and a partly sent chunk would leave the two sides apart.
//!
//! **Decoder** ([`Decoder`], backup, per connection and machine). It keeps the last
//! received copy of every page of the connection in a [`PageStore`] (the backup
//! uses a file) and which pages it holds ([`Received`]). A frame decodes to full
//! pages; an XOR frame whose pages were not all received before on this connection,
//! a corrupt LZ4 block or one of the wrong length is an error (the backup refuses
//! the frame and closes the connection), never a silently wrong page.
//!
//! Bounds: the shadow holds `cap_bytes` of copies plus 8 bytes of tag per slot;
//! [`Received`] one bit per page up to the highest page received (the backup bounds
//! offsets by the machine's RAM size before decoding); buffers one chunk
//! ([`MAX_CHECKPOINT_CHUNK`]) each.

use crate::codec::MAX_CHECKPOINT_CHUNK;
use crate::wire::{PageEncoding, PAGE_SIZE};
use lz4_flex::block::{compress_into_with_table, decompress_into, CompressTable};

const PAGE: usize = PAGE_SIZE as usize;

/// Default cap of one machine's shadow copies (the agent's per-guest memory for them).
pub const DEFAULT_SHADOW_BYTES: u64 = 64 << 20;

/// The agent's copies of pages last shipped on the current connection (module doc).
pub struct Shadow {
    /// Connection generation the copies belong to.
    generation: u64,
    /// Per slot: page number + 1 of its copy, 0 when empty.
    tags: Vec<u64>,
    copies: Vec<u8>,
    table: CompressTable,
    xored: Vec<u8>,
    out: Vec<u8>,
}

impl Shadow {
    /// A shadow of at most `cap_bytes` of copies (never more than the machine's
    /// `ram_bytes`; at least one page). Memory is touched as slots fill.
    pub fn new(cap_bytes: u64, ram_bytes: u64) -> Shadow {
        let slots = (cap_bytes.min(ram_bytes) / PAGE_SIZE).max(1) as usize;
        Shadow {
            generation: 0,
            tags: vec![0; slots],
            copies: vec![0; slots * PAGE],
            table: CompressTable::large(),
            xored: Vec::new(),
            out: Vec::new(),
        }
    }

    /// Bytes of page copies this shadow can hold.
    pub fn cap_bytes(&self) -> u64 {
        self.copies.len() as u64
    }

    /// Drops every copy (the backup's copies of a connection are gone).
    pub fn invalidate(&mut self) {
        self.tags.fill(0);
    }

    /// Frames are about to go on connection `generation`: copies of another
    /// generation are dropped.
    pub fn connection(&mut self, generation: u64) {
        if generation != self.generation {
            self.invalidate();
            self.generation = generation;
        }
    }

    fn slot(&self, page: u64) -> usize {
        (page % self.tags.len() as u64) as usize
    }

    fn has_copy(&self, page: u64) -> bool {
        self.tags[self.slot(page)] == page + 1
    }

    /// Encodes the contiguous whole pages `pages` at RAM offset `offset` (at most
    /// [`MAX_CHECKPOINT_CHUNK`] bytes) into frames, handed to `emit` as
    /// `(offset, encoding, data)` in RAM order, then records them as shipped. An
    /// error from `emit` invalidates the shadow and is returned.
    ///
    /// # Panics
    /// If `offset` or `pages` is not whole pages, or `pages` exceeds the chunk
    /// (the caller's invariant, not outside input).
    pub fn encode<E>(
        &mut self,
        offset: u64,
        pages: &[u8],
        mut emit: impl FnMut(u64, PageEncoding, Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        assert!(
            offset.is_multiple_of(PAGE_SIZE)
                && pages.len().is_multiple_of(PAGE)
                && pages.len() <= MAX_CHECKPOINT_CHUNK,
            "encode: {} bytes at {offset} are not whole pages of one chunk",
            pages.len()
        );
        let first = offset / PAGE_SIZE;
        let n = pages.len() / PAGE;
        let mut i = 0;
        while i < n {
            let xor = self.has_copy(first + i as u64);
            let mut j = i + 1;
            while j < n && self.has_copy(first + j as u64) == xor {
                j += 1;
            }
            let raw = &pages[i * PAGE..j * PAGE];
            let (encoding, data) = self.encode_run(first + i as u64, raw, xor);
            if let Err(e) = emit(offset + (i * PAGE) as u64, encoding, data) {
                self.invalidate();
                return Err(e);
            }
            i = j;
        }
        for (k, page) in pages.chunks_exact(PAGE).enumerate() {
            let p = first + k as u64;
            let s = self.slot(p);
            self.tags[s] = p + 1;
            self.copies[s * PAGE..(s + 1) * PAGE].copy_from_slice(page);
        }
        Ok(())
    }

    /// One run of pages starting at page `first`, all with (`xor`) or all without copies.
    fn encode_run(&mut self, first: u64, raw: &[u8], xor: bool) -> (PageEncoding, Vec<u8>) {
        let pages = (raw.len() / PAGE) as u32;
        let input: &[u8] = if xor {
            self.xored.clear();
            self.xored.extend_from_slice(raw);
            let slots = self.tags.len() as u64;
            for (k, page) in self.xored.chunks_exact_mut(PAGE).enumerate() {
                let s = ((first + k as u64) % slots) as usize;
                xor_into(page, &self.copies[s * PAGE..(s + 1) * PAGE]);
            }
            &self.xored
        } else {
            raw
        };
        self.out
            .resize(lz4_flex::block::get_maximum_output_size(raw.len()), 0);
        match compress_into_with_table(input, &mut self.out, &mut self.table) {
            Ok(len) if len < raw.len() => {
                let encoding = if xor {
                    PageEncoding::XorLz4 { pages }
                } else {
                    PageEncoding::Lz4 { pages }
                };
                (encoding, self.out[..len].to_vec())
            }
            _ => (PageEncoding::Raw, raw.to_vec()),
        }
    }
}

/// `dst ^= base`, byte for byte (equal lengths).
pub fn xor_into(dst: &mut [u8], base: &[u8]) {
    assert_eq!(dst.len(), base.len(), "xor of unequal lengths");
    for (d, b) in dst.chunks_exact_mut(8).zip(base.chunks_exact(8)) {
        let x = u64::from_ne_bytes(d.try_into().expect("8 bytes"))
            ^ u64::from_ne_bytes(b.try_into().expect("8 bytes"));
        d.copy_from_slice(&x.to_ne_bytes());
    }
    let tail = dst.len() - dst.len() % 8;
    for (d, b) in dst[tail..].iter_mut().zip(&base[tail..]) {
        *d ^= b;
    }
}

/// Which pages of one machine were received on one connection (one bit per page,
/// grown to the highest page received).
#[derive(Debug, Default, Clone)]
pub struct Received {
    bits: Vec<u64>,
}

impl Received {
    /// Marks pages `first .. first + n`.
    pub fn mark(&mut self, first: u64, n: u64) {
        let end = first + n;
        let words = end.div_ceil(64) as usize;
        if self.bits.len() < words {
            self.bits.resize(words, 0);
        }
        for p in first..end {
            self.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    /// Whether every page of `first .. first + n` was received.
    pub fn all(&self, first: u64, n: u64) -> bool {
        (first..first + n).all(|p| {
            self.bits
                .get((p / 64) as usize)
                .is_some_and(|w| w & (1 << (p % 64)) != 0)
        })
    }
}

/// Where a [`Decoder`] keeps the last received copy of each page (RAM offsets).
pub trait PageStore {
    /// Reads `out.len()` bytes at `offset` (pages written before).
    fn read(&mut self, offset: u64, out: &mut [u8]) -> Result<(), String>;
    /// Writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), String>;
}

/// Why a `Pages` frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame is bad (the peer's fault): refuse it and close the connection.
    #[error("{0}")]
    Refused(String),
    /// The page store failed (ours).
    #[error("page store: {0}")]
    Store(String),
}

/// The backup's decoder of one machine's pages on one connection (module doc).
pub struct Decoder<S> {
    store: S,
    received: Received,
    buf: Vec<u8>,
    base: Vec<u8>,
}

impl<S: PageStore> Decoder<S> {
    pub fn new(store: S) -> Decoder<S> {
        Decoder {
            store,
            received: Received::default(),
            buf: Vec::new(),
            base: Vec::new(),
        }
    }

    /// The full pages of one `Pages` frame at `offset` (validated by the codec:
    /// page aligned, at most one chunk), remembered as the pages' last copies.
    pub fn decode(
        &mut self,
        offset: u64,
        encoding: PageEncoding,
        data: &[u8],
    ) -> Result<&[u8], DecodeError> {
        let len = encoding.page_bytes(data.len());
        if !offset.is_multiple_of(PAGE_SIZE)
            || len == 0
            || !len.is_multiple_of(PAGE_SIZE)
            || len > MAX_CHECKPOINT_CHUNK as u64
        {
            return Err(DecodeError::Refused(format!(
                "checkpoint pages at {offset}, {len} bytes: not whole pages of one chunk"
            )));
        }
        let (first, n) = (offset / PAGE_SIZE, len / PAGE_SIZE);
        self.buf.clear();
        match encoding {
            PageEncoding::Raw => self.buf.extend_from_slice(data),
            PageEncoding::Lz4 { .. } | PageEncoding::XorLz4 { .. } => {
                self.buf.resize(len as usize, 0);
                match decompress_into(data, &mut self.buf) {
                    Ok(got) if got as u64 == len => {}
                    Ok(got) => {
                        return Err(DecodeError::Refused(format!(
                        "checkpoint pages at {offset}: LZ4 block of {got} bytes, {len} announced"
                    )))
                    }
                    Err(e) => {
                        return Err(DecodeError::Refused(format!(
                            "checkpoint pages at {offset}: corrupt LZ4 block: {e}"
                        )))
                    }
                }
            }
        }
        if let PageEncoding::XorLz4 { .. } = encoding {
            if !self.received.all(first, n) {
                return Err(DecodeError::Refused(format!(
                    "checkpoint pages at {offset}: XOR against pages not received on this connection"
                )));
            }
            self.base.resize(len as usize, 0);
            self.store
                .read(offset, &mut self.base)
                .map_err(DecodeError::Store)?;
            xor_into(&mut self.buf, &self.base);
        }
        self.store
            .write(offset, &self.buf)
            .map_err(DecodeError::Store)?;
        self.received.mark(first, n);
        Ok(&self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// In-memory page store.
    #[derive(Default)]
    struct Mem(HashMap<u64, Vec<u8>>);

    impl PageStore for Mem {
        fn read(&mut self, offset: u64, out: &mut [u8]) -> Result<(), String> {
            for (k, page) in out.chunks_exact_mut(PAGE).enumerate() {
                let p = offset / PAGE_SIZE + k as u64;
                page.copy_from_slice(self.0.get(&p).ok_or(format!("page {p} unset"))?);
            }
            Ok(())
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
            for (k, page) in data.chunks_exact(PAGE).enumerate() {
                self.0.insert(offset / PAGE_SIZE + k as u64, page.to_vec());
            }
            Ok(())
        }
    }

    type Frames = Vec<(u64, PageEncoding, Vec<u8>)>;

    fn encode_all(sh: &mut Shadow, offset: u64, pages: &[u8]) -> Frames {
        let mut v = Vec::new();
        sh.encode(offset, pages, |o, e, d| {
            v.push((o, e, d));
            Ok::<(), ()>(())
        })
        .unwrap();
        v
    }

    fn decode_all(dec: &mut Decoder<Mem>, frames: &Frames) -> Vec<u8> {
        let mut out = Vec::new();
        for (o, e, d) in frames {
            out.extend_from_slice(dec.decode(*o, *e, d).unwrap());
        }
        out
    }

    #[test]
    fn a_small_change_is_sent_as_a_tiny_xor_frame() {
        let mut sh = Shadow::new(1 << 20, 1 << 30);
        let mut dec = Decoder::new(Mem::default());
        let mut page: Vec<u8> = (0..PAGE).map(|i| (i * 7 % 251) as u8).collect();
        let f = encode_all(&mut sh, 8 * PAGE_SIZE, &page);
        assert!(matches!(
            f[0].1,
            PageEncoding::Lz4 { pages: 1 } | PageEncoding::Raw
        ));
        assert_eq!(decode_all(&mut dec, &f), page);
        page[100] ^= 0xff;
        let f = encode_all(&mut sh, 8 * PAGE_SIZE, &page);
        assert_eq!(f[0].1, PageEncoding::XorLz4 { pages: 1 });
        assert!(f[0].2.len() < 64, "{} bytes", f[0].2.len());
        assert_eq!(decode_all(&mut dec, &f), page);
    }

    #[test]
    fn incompressible_pages_go_raw() {
        let mut sh = Shadow::new(1 << 20, 1 << 30);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let page: Vec<u8> = (0..2 * PAGE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let f = encode_all(&mut sh, 0, &page);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].1, PageEncoding::Raw);
    }

    #[test]
    fn hostile_frames_are_refused() {
        let mut dec = Decoder::new(Mem::default());
        let zero = lz4_flex::block::compress(&[0u8; PAGE]);
        // XOR without a base received on this connection.
        let e = dec
            .decode(0, PageEncoding::XorLz4 { pages: 1 }, &zero)
            .unwrap_err();
        assert!(
            matches!(e, DecodeError::Refused(ref m) if m.contains("not received")),
            "{e}"
        );
        // A block that decodes to fewer bytes than announced.
        let e = dec
            .decode(0, PageEncoding::Lz4 { pages: 2 }, &zero)
            .unwrap_err();
        assert!(matches!(e, DecodeError::Refused(_)), "{e}");
        // Garbage.
        let e = dec
            .decode(0, PageEncoding::Lz4 { pages: 1 }, &[0xff; 16])
            .unwrap_err();
        assert!(matches!(e, DecodeError::Refused(_)), "{e}");
        // Too many pages for one chunk, and zero pages.
        let chunk_pages = (MAX_CHECKPOINT_CHUNK / PAGE) as u32;
        for pages in [chunk_pages + 1, 0] {
            let e = dec
                .decode(0, PageEncoding::Lz4 { pages }, &zero)
                .unwrap_err();
            assert!(matches!(e, DecodeError::Refused(_)), "{e}");
        }
        // After a page arrived, XOR against it decodes.
        dec.decode(0, PageEncoding::Lz4 { pages: 1 }, &zero)
            .unwrap();
        let got = dec
            .decode(0, PageEncoding::XorLz4 { pages: 1 }, &zero)
            .unwrap();
        assert_eq!(got, &[0u8; PAGE][..]);
    }

    /// One agent epoch: which pages change and how.
    #[derive(Debug, Clone)]
    enum Step {
        /// Dirty pages (page number, kind of change) shipped as one epoch.
        Epoch(Vec<(u16, u8, u8)>),
        /// A new connection: the backup's copies are gone.
        Reconnect,
        /// A connection breaks after `n` frames of the next epoch were sent.
        Torn(Vec<(u16, u8, u8)>, usize),
    }

    fn change(page: &mut [u8], kind: u8, seed: u8) {
        match kind % 4 {
            0 => page[seed as usize * 13 % PAGE] = seed,
            1 => {
                let at = seed as usize * 15;
                for (i, b) in page[at..at + 200].iter_mut().enumerate() {
                    *b = (i as u8).wrapping_mul(seed).wrapping_add(kind);
                }
            }
            2 => {
                let mut x = u64::from(seed) + 1;
                for b in page.iter_mut() {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    *b = (x >> 56) as u8;
                }
            }
            _ => page.fill(0),
        }
    }

    fn step() -> impl Strategy<Value = Step> {
        let dirty = proptest::collection::vec((0u16..600, any::<u8>(), any::<u8>()), 0..80);
        prop_oneof![
            8 => dirty.clone().prop_map(Step::Epoch),
            1 => Just(Step::Reconnect),
            1 => (dirty, 0usize..6).prop_map(|(d, n)| Step::Torn(d, n)),
        ]
    }

    /// Runs of the sorted dirty pages, split at the chunk size (as the agent does).
    fn runs(dirty: &[(u16, u8, u8)], chunk_pages: u64) -> Vec<(u64, u64)> {
        let mut pages: Vec<u64> = dirty.iter().map(|d| u64::from(d.0)).collect();
        pages.sort_unstable();
        pages.dedup();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for p in pages {
            match out.last_mut() {
                Some((s, n)) if *s + *n == p && *n < chunk_pages => *n += 1,
                _ => out.push((p, 1)),
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random page histories, evictions (a shadow far smaller than the RAM),
        /// reconnections and torn epochs: the backup's decoded pages always equal
        /// the agent's, and its copies equal the last pages it received.
        #[test]
        fn backup_decodes_what_the_agent_had(
            cap_pages in 1u64..700,
            chunk_pages in 1u64..40,
            steps in proptest::collection::vec(step(), 1..40),
        ) {
            let ram_pages = 600u64;
            let mut ram = vec![0u8; (ram_pages * PAGE_SIZE) as usize];
            let mut sh = Shadow::new(cap_pages * PAGE_SIZE, ram_pages * PAGE_SIZE);
            let mut generation = 1;
            sh.connection(generation);
            let mut dec = Decoder::new(Mem::default());
            for s in steps {
                let (dirty, tear_after) = match s {
                    Step::Reconnect => {
                        generation += 1;
                        sh.connection(generation);
                        dec = Decoder::new(Mem::default());
                        continue;
                    }
                    Step::Epoch(d) => (d, None),
                    Step::Torn(d, n) => (d, Some(n)),
                };
                for &(p, kind, seed) in &dirty {
                    let at = p as usize * PAGE;
                    change(&mut ram[at..at + PAGE], kind, seed);
                }
                let mut sent = 0usize;
                for (first, n) in runs(&dirty, chunk_pages) {
                    let bytes = &ram[(first * PAGE_SIZE) as usize..((first + n) * PAGE_SIZE) as usize];
                    // A torn connection: frames past `tear_after` are lost (the
                    // agent's push reports it only later, by a new generation).
                    let frames = encode_all(&mut sh, first * PAGE_SIZE, bytes);
                    let mut got = Vec::new();
                    for (o, e, d) in &frames {
                        if tear_after.is_some_and(|t| sent >= t) {
                            continue;
                        }
                        sent += 1;
                        got.extend_from_slice(dec.decode(*o, *e, d).unwrap());
                        let at = *o as usize;
                        prop_assert_eq!(&got[got.len() - e.page_bytes(d.len()) as usize..],
                            &ram[at..at + e.page_bytes(d.len()) as usize]);
                    }
                }
                if tear_after.is_some() {
                    generation += 1;
                    sh.connection(generation);
                    dec = Decoder::new(Mem::default());
                }
            }
        }
    }

    #[test]
    fn a_failed_emit_invalidates_the_shadow() {
        let mut sh = Shadow::new(1 << 20, 1 << 30);
        let page = vec![1u8; PAGE];
        encode_all(&mut sh, 0, &page);
        assert!(sh.has_copy(0));
        let r = sh.encode(0, &page, |_, _, _| Err("gone"));
        assert_eq!(r, Err("gone"));
        assert!(!sh.has_copy(0));
        let f = encode_all(&mut sh, 0, &page);
        assert!(matches!(f[0].1, PageEncoding::Lz4 { .. }));
    }
}
