//! The IPv4 option that carries a count vector between protected machines
//! (docs/design.md §3, PipeCloud paper §4.2).
//!
//! A packet from protected machine *a* to protected machine *b* carries *a*'s
//! pending vector; *b*'s agent merges it into *b*'s pending vector. The vector
//! rides in an IPv4 header option, so TCP/UDP checksums stay valid (their
//! pseudo-header covers addresses, protocol and L4 length, never IP options);
//! only the IPv4 header checksum, IHL and total length change.
//!
//! # Format
//!
//! The option uses the RFC 4727 experimental option number 30 with the copied
//! flag set and class 0: type byte `0x9e` (158), [`OPTION_TYPE`]. On parse all
//! four RFC 4727 experimental types (30, 94, 158, 222) are accepted. Inserted
//! into a packet without options, the options area is:
//!
//! ```text
//!  byte  0      1      2      3      4      5      6      7
//!      +------+------+------+------+------+------+------+------+
//!      | NOP  | NOP  | type | len  |  group id   |  presence   |
//!      | 0x01 | 0x01 | 0x9e | 6+4k |   u16 BE    | bitmap u16BE|
//!      +------+------+------+------+------+------+------+------+
//!    8 | entry of the lowest present index: low 32 bits, u32 BE |
//!      +------+------+------+------+
//!      | ... k entries in index order (k = popcount(presence))   |
//!      +------+------+------+------+
//! ```
//!
//! * `len` is the option length (type byte to last entry): `6 + 4k`.
//! * bit `i` of the presence bitmap (value `1 << i`) says that vector entry `i`
//!   is present (non-zero in the sender's vector). Absent entries are zero.
//! * the two leading NOPs pad the area to a multiple of 4 bytes and align the
//!   entries on 32-bit boundaries; the area is `8 + 4k` bytes, so `k <= 8`
//!   ([`MAX_TAG_ENTRIES`]) fits the 40-byte limit of IPv4 options exactly.
//!   A vector with more non-zero entries is an error ([`OptionError::TooManyEntries`]),
//!   never silently truncated. Note that 8 writers plus a non-zero epoch entry
//!   are 9 entries: groups using the epoch entry have room for 7 writers.
//!
//! # 32-bit entries
//!
//! Only the low 32 bits of each seq travel. The receiver rebuilds the 64-bit seq
//! relative to its own current vector ([`RawTag::resolve`]) with serial-number
//! arithmetic in the style of RFC 1982: of all values congruent to the wire
//! value modulo 2^32, it picks the one closest to its local entry. This is
//! exact as long as the sender's and the receiver's entries differ by less than
//! 2^31 (two billion writes of one writer between two packets that link the
//! machines). At a distance of exactly 2^31 the larger candidate is chosen
//! (over-estimating a dependency only holds packets longer; under-estimating
//! could release them early). A value that would resolve below zero resolves to
//! the smallest non-negative candidate.
//!
//! # What is not tagged
//!
//! * non-IPv4 packets ([`Classify::NotIpv4`]), never modified;
//! * packets that already carry IPv4 options ([`Classify::OtherOptions`]): passed
//!   untouched, the caller counts them (docs/design.md §3.2);
//! * fragments (MF set or a non-zero fragment offset, [`Classify::Fragment`]):
//!   only the first fragment holds the TCP/UDP header, so flows and pure ACKs
//!   cannot be recognised on the others; a receiver's reassembly keeps the
//!   options of the first fragment only; and growing a fragment by up to 40
//!   bytes can push it past the path MTU. With conntrack loaded netfilter
//!   reassembles before NFQUEUE sees packets, so fragments are rare. Because an
//!   untagged inter-machine packet loses its dependency, the caller must treat
//!   fragments conservatively (count them; merge the sender's vector directly
//!   when both machines share a host).
//! * [`is_pure_ack`] packets may be left untagged (the caller's choice).
//!
//! A fragment that already carries our option (the copied flag copies it into
//! every fragment) is still reported as [`Classify::Tagged`], so a receiver never
//! misses a merge; [`strip_tag`] also works on fragments (removing a header
//! option does not change fragment offsets).
//!
//! # Checksums
//!
//! [`insert_tag`] and [`strip_tag`] verify the IPv4 header checksum before they
//! change anything ([`OptionError::BadHeaderChecksum`]: a corrupt header is never
//! "repaired") and recompute it afterwards. They never touch the L4 checksum.
//! Packets from GSO/checksum offload arrive with only the pseudo-header sum in
//! the L4 checksum field; [`complete_l4_checksum`] computes it in software when
//! the caller knows that is the case.

use crate::vector::{CountVector, Seq, VECTOR_LEN};
use etherparse::err::ipv4::{HeaderError, HeaderSliceError};
use etherparse::Ipv4HeaderSlice;

/// Option type this build inserts: RFC 4727 experiment, copied flag, class 0, number 30.
pub const OPTION_TYPE: u8 = 0x9e;
/// The four RFC 4727 experimental option types (copied flag 0/1, class 0/2, number 30).
pub const ACCEPTED_TYPES: [u8; 4] = [30, 94, 158, 222];
/// Most bytes of IPv4 options a header can hold.
pub const MAX_OPTION_BYTES: usize = 40;
/// Most vector entries one tag carries.
pub const MAX_TAG_ENTRIES: usize = 8;
/// Bytes of the option itself (type, len, group, bitmap) before the entries.
const OPTION_FIXED_LEN: usize = 6;
/// Leading NOPs that align the entries.
const LEADING_NOPS: usize = 2;
/// Length of an IPv4 header without options.
const BASE_HEADER_LEN: usize = 20;
/// Largest IPv4 total length.
const MAX_TOTAL_LEN: usize = 65_535;

const IPOPT_EOL: u8 = 0;
const IPOPT_NOP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// Why a packet could not be tagged, stripped or checksummed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// The IPv4 header or its options are malformed.
    #[error("malformed IPv4 packet: {0}")]
    Malformed(&'static str),
    /// The packet is shorter than its total length field says (the operation
    /// needs the whole packet).
    #[error("truncated IPv4 packet: {have} bytes, total length says {need}")]
    Truncated { have: usize, need: usize },
    /// The IPv4 header checksum is wrong; the packet was not modified.
    #[error("IPv4 header checksum is wrong; packet left untouched")]
    BadHeaderChecksum,
    /// The vector has more non-zero entries than the option can carry.
    #[error("vector has {present} non-zero entries, the IPv4 option carries at most {max}")]
    TooManyEntries { present: usize, max: usize },
    /// The packet would exceed the 65,535-byte IPv4 limit with the option.
    #[error("tagged packet would be {len} bytes, more than the IPv4 limit of 65535")]
    TooLong { len: usize },
    /// Not an IPv4 packet.
    #[error("not an IPv4 packet")]
    NotIpv4,
    /// The operation needs an unfragmented packet.
    #[error("packet is an IPv4 fragment")]
    Fragment,
    /// [`complete_l4_checksum`] handles TCP and UDP only.
    #[error("IP protocol {0} is neither TCP nor UDP")]
    UnsupportedProtocol(u8),
}

/// A tag as it travels: present entries with the low 32 bits of their seqs.
/// Turn it into a vector with [`RawTag::resolve`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct RawTag {
    /// Bit `i` set: entry `i` present.
    present: u16,
    /// Values of the present entries, in index order; `values[popcount..]` are 0.
    values: [u32; MAX_TAG_ENTRIES],
}

impl RawTag {
    /// The wire form of `vector`: its non-zero entries, truncated to 32 bits.
    /// Errors when more than [`MAX_TAG_ENTRIES`] entries are non-zero.
    pub fn from_vector(vector: &CountVector) -> Result<RawTag, OptionError> {
        let present = vector.nonzero().count();
        if present > MAX_TAG_ENTRIES {
            return Err(OptionError::TooManyEntries {
                present,
                max: MAX_TAG_ENTRIES,
            });
        }
        let mut tag = RawTag::default();
        for (slot, (i, seq)) in vector.nonzero().enumerate() {
            tag.present |= 1 << i;
            tag.values[slot] = seq as u32; // low 32 bits travel
        }
        Ok(tag)
    }

    /// The presence bitmap (bit `i` = entry `i` present).
    pub fn presence(&self) -> u16 {
        self.present
    }

    /// Number of present entries.
    pub fn len(&self) -> usize {
        self.present.count_ones() as usize
    }

    /// Whether no entry is present (the sender's vector was zero).
    pub fn is_empty(&self) -> bool {
        self.present == 0
    }

    /// `(index, low 32 bits of the seq)` of every present entry, in index order.
    pub fn entries(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        (0..VECTOR_LEN)
            .filter(move |i| self.present & (1 << i) != 0)
            .zip(self.values.iter().copied())
    }

    /// Rebuilds the sender's vector relative to the receiver's current vector
    /// `local` (see the module docs: nearest value modulo 2^32, exact while the
    /// two differ by less than 2^31 per entry). Absent entries are 0. The result
    /// is meant to be merged into `local`.
    pub fn resolve(&self, local: &CountVector) -> CountVector {
        let mut out = CountVector::ZERO;
        for (i, wire) in self.entries() {
            out.set(i, resolve_seq(local.get(i), wire));
        }
        out
    }

    /// Bytes of the options area this tag needs (leading NOPs included).
    pub fn option_area_len(&self) -> usize {
        LEADING_NOPS + OPTION_FIXED_LEN + 4 * self.len()
    }

    /// The options area this tag takes in a packet that had no options (NOP,
    /// NOP, the option), as inserted by [`insert_tag`]: the bytes and their
    /// length (`8 + 4k`). What a kernel-side tagger copies into packets.
    pub fn area(&self, group: u16) -> ([u8; MAX_OPTION_BYTES], usize) {
        let mut out = [0u8; MAX_OPTION_BYTES];
        let len = self.write_area(group, &mut out);
        (out, len)
    }

    /// Parses an options area in exactly the form [`RawTag::area`] writes (NOP,
    /// NOP, our option, nothing after it): the group and the tag.
    pub fn from_area(area: &[u8]) -> Result<(u16, RawTag), &'static str> {
        match area {
            [IPOPT_NOP, IPOPT_NOP, ty, len, ..]
                if ACCEPTED_TYPES.contains(ty)
                    && usize::from(*len) + LEADING_NOPS == area.len() =>
            {
                RawTag::parse(&area[LEADING_NOPS..])
            }
            _ => Err("not a NOP, NOP, tag option area"),
        }
    }

    /// Writes the options area (NOP, NOP, option) into `out`; returns its length.
    fn write_area(&self, group: u16, out: &mut [u8; MAX_OPTION_BYTES]) -> usize {
        let n = self.len();
        let area = self.option_area_len();
        out[0] = IPOPT_NOP;
        out[1] = IPOPT_NOP;
        out[2] = OPTION_TYPE;
        out[3] = (OPTION_FIXED_LEN + 4 * n) as u8; // <= 38
        out[4..6].copy_from_slice(&group.to_be_bytes());
        out[6..8].copy_from_slice(&self.present.to_be_bytes());
        for (k, v) in self.values[..n].iter().enumerate() {
            let at = 8 + 4 * k;
            out[at..at + 4].copy_from_slice(&v.to_be_bytes());
        }
        area
    }

    /// Parses the body of one of our options (`opt` = type byte to end).
    fn parse(opt: &[u8]) -> Result<(u16, RawTag), &'static str> {
        if opt.len() < OPTION_FIXED_LEN {
            return Err("tag option shorter than 6 bytes");
        }
        let group = u16::from_be_bytes([opt[2], opt[3]]);
        let present = u16::from_be_bytes([opt[4], opt[5]]);
        let n = present.count_ones() as usize;
        if n > MAX_TAG_ENTRIES {
            return Err("tag option marks more than 8 entries present");
        }
        if opt.len() != OPTION_FIXED_LEN + 4 * n {
            return Err("tag option length disagrees with its presence bitmap");
        }
        let mut tag = RawTag {
            present,
            values: [0; MAX_TAG_ENTRIES],
        };
        for (k, chunk) in opt[OPTION_FIXED_LEN..].chunks_exact(4).enumerate() {
            tag.values[k] = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        Ok((group, tag))
    }
}

/// The 64-bit seq congruent to `wire` modulo 2^32 closest to `local` (ties upward).
fn resolve_seq(local: Seq, wire: u32) -> Seq {
    let ahead = wire.wrapping_sub(local as u32); // forward distance modulo 2^32
    let forward = local.checked_add(u64::from(ahead));
    if ahead <= 1 << 31 {
        if let Some(v) = forward {
            return v;
        }
        // Above u64::MAX: only the lower candidate exists.
        return local - ((1u64 << 32) - u64::from(ahead));
    }
    let behind = (1u64 << 32) - u64::from(ahead);
    match local.checked_sub(behind) {
        Some(v) => v,
        // Would be negative: the smallest non-negative candidate (local < 2^31 here).
        None => forward.unwrap_or(u64::from(wire)),
    }
}

/// What [`classify`] sees in a packet.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Classify {
    /// Carries our option (possibly among other options, possibly a fragment).
    Tagged { group: u16, raw: RawTag },
    /// Plain IPv4 without options, not a fragment: can be tagged.
    Untagged,
    /// Carries IPv4 options, none of them ours: pass untouched (and count).
    OtherOptions,
    /// An IPv4 fragment without our option: not tagged (see module docs).
    Fragment,
    /// Not IPv4 (e.g. IPv6): never modified.
    NotIpv4,
    /// Broken header or options.
    Malformed(&'static str),
}

/// The fields of an IPv4 header the option code needs.
#[derive(Clone, Copy, Debug)]
struct Header {
    /// IHL in bytes.
    header_len: usize,
    /// Total length field.
    total_len: usize,
    fragment: bool,
    protocol: u8,
}

enum HeaderProblem {
    NotIpv4,
    Malformed(&'static str),
}

impl From<HeaderProblem> for OptionError {
    fn from(p: HeaderProblem) -> Self {
        match p {
            HeaderProblem::NotIpv4 => OptionError::NotIpv4,
            HeaderProblem::Malformed(m) => OptionError::Malformed(m),
        }
    }
}

/// Parses the IPv4 header at the start of `packet` (the header must be complete,
/// the payload may be truncated).
fn parse_header(packet: &[u8]) -> Result<Header, HeaderProblem> {
    if packet.is_empty() {
        return Err(HeaderProblem::Malformed("empty packet"));
    }
    let slice = match Ipv4HeaderSlice::from_slice(packet) {
        Ok(s) => s,
        Err(HeaderSliceError::Content(HeaderError::UnexpectedVersion { .. })) => {
            return Err(HeaderProblem::NotIpv4)
        }
        Err(HeaderSliceError::Content(_)) => {
            return Err(HeaderProblem::Malformed("IHL smaller than 5"))
        }
        Err(HeaderSliceError::Len(_)) => {
            return Err(HeaderProblem::Malformed("truncated IPv4 header"))
        }
    };
    let header_len = slice.slice().len();
    let total_len = usize::from(slice.total_len());
    if total_len < header_len {
        return Err(HeaderProblem::Malformed(
            "total length shorter than the header",
        ));
    }
    Ok(Header {
        header_len,
        total_len,
        fragment: slice.more_fragments() || slice.fragments_offset().value() != 0,
        protocol: slice.protocol().0,
    })
}

/// Result of walking an options area.
#[derive(Default)]
struct OptionsScan {
    /// Byte range (within the options area) of our option.
    ours: Option<(usize, usize)>,
    /// Whether any option other than ours, NOP and EOL is present.
    others: bool,
}

/// Walks the options area (RFC 791: EOL ends the list, NOP is one byte, every
/// other option has a length byte >= 2 that must stay inside the area).
fn scan_options(opts: &[u8]) -> Result<OptionsScan, &'static str> {
    let mut scan = OptionsScan::default();
    let mut i = 0;
    while let Some(&kind) = opts.get(i) {
        match kind {
            IPOPT_EOL => break,
            IPOPT_NOP => i += 1,
            _ => {
                let Some(&len) = opts.get(i + 1) else {
                    return Err("IPv4 option without its length byte");
                };
                let len = usize::from(len);
                if len < 2 || i + len > opts.len() {
                    return Err("IPv4 option length out of bounds");
                }
                if ACCEPTED_TYPES.contains(&kind) {
                    if scan.ours.is_some() {
                        return Err("two tag options in one packet");
                    }
                    scan.ours = Some((i, i + len));
                } else {
                    scan.others = true;
                }
                i += len;
            }
        }
    }
    Ok(scan)
}

/// Classifies a packet that starts at its IPv4 header (an NFQUEUE payload).
/// Only the header must be complete; the payload may be truncated (a short
/// copy range is enough).
pub fn classify(packet: &[u8]) -> Classify {
    let h = match parse_header(packet) {
        Ok(h) => h,
        Err(HeaderProblem::NotIpv4) => return Classify::NotIpv4,
        Err(HeaderProblem::Malformed(m)) => return Classify::Malformed(m),
    };
    if h.header_len > BASE_HEADER_LEN {
        let opts = &packet[BASE_HEADER_LEN..h.header_len];
        let scan = match scan_options(opts) {
            Ok(s) => s,
            Err(m) => return Classify::Malformed(m),
        };
        if let Some((a, b)) = scan.ours {
            return match RawTag::parse(&opts[a..b]) {
                Ok((group, raw)) => Classify::Tagged { group, raw },
                Err(m) => Classify::Malformed(m),
            };
        }
        if h.fragment {
            return Classify::Fragment;
        }
        return Classify::OtherOptions;
    }
    if h.fragment {
        Classify::Fragment
    } else {
        Classify::Untagged
    }
}

/// What [`insert_tag`] did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum InsertOutcome {
    /// The option was inserted; the packet grew by `added` bytes (8..=40).
    Inserted { added: usize },
    /// Not IPv4: untouched.
    NotIpv4,
    /// Already carries IPv4 options (not ours): untouched, count it.
    OtherOptions,
    /// Already carries our option (of group `group`): untouched.
    AlreadyTagged { group: u16 },
    /// An IPv4 fragment: untouched (see module docs).
    Fragment,
}

/// Ones'-complement sum of `data` (as big-endian 16-bit words, odd tail padded
/// with zero) added to `acc`, unfolded.
fn sum_words(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    let mut pairs = rest.chunks_exact(2);
    for c in &mut pairs {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds an unfolded sum to 16 bits with end-around carry.
fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Whether the IPv4 header checksum of `header` (exactly IHL bytes) is right.
fn header_checksum_ok(header: &[u8]) -> bool {
    fold(sum_words(header, 0)) == 0xffff
}

/// Recomputes the IPv4 header checksum of the first `header_len` bytes.
fn write_header_checksum(packet: &mut [u8], header_len: usize) {
    packet[10] = 0;
    packet[11] = 0;
    let c = !fold(sum_words(&packet[..header_len], 0));
    packet[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Checks that the whole packet is present and the header checksum is right.
fn check_complete(packet: &[u8], h: &Header) -> Result<(), OptionError> {
    if packet.len() < h.total_len {
        return Err(OptionError::Truncated {
            have: packet.len(),
            need: h.total_len,
        });
    }
    if !header_checksum_ok(&packet[..h.header_len]) {
        return Err(OptionError::BadHeaderChecksum);
    }
    Ok(())
}

/// Sets IHL and total length after the header grew or shrank.
fn set_lengths(packet: &mut [u8], header_len: usize, total_len: usize) {
    packet[0] = 0x40 | (header_len / 4) as u8;
    packet[2..4].copy_from_slice(&(total_len as u16).to_be_bytes());
}

/// Tags `packet` (starting at its IPv4 header, complete) with `tag` for `group`.
///
/// Only plain IPv4 packets without options and not fragmented are tagged; the
/// others are reported and left untouched (see [`InsertOutcome`]). On success
/// IHL, total length and the header checksum are updated; the L4 checksum stays
/// valid because the pseudo-header does not cover options. Bytes beyond the
/// total length (if any) are kept after the packet. On error the packet is
/// unchanged.
pub fn insert_tag(
    packet: &mut Vec<u8>,
    group: u16,
    tag: &CountVector,
) -> Result<InsertOutcome, OptionError> {
    let h = match parse_header(packet) {
        Ok(h) => h,
        Err(HeaderProblem::NotIpv4) => return Ok(InsertOutcome::NotIpv4),
        Err(p) => return Err(p.into()),
    };
    if h.header_len > BASE_HEADER_LEN {
        let scan =
            scan_options(&packet[BASE_HEADER_LEN..h.header_len]).map_err(OptionError::Malformed)?;
        if let Some((a, b)) = scan.ours {
            let opt = &packet[BASE_HEADER_LEN + a..BASE_HEADER_LEN + b];
            let (g, _) = RawTag::parse(opt).map_err(OptionError::Malformed)?;
            return Ok(InsertOutcome::AlreadyTagged { group: g });
        }
        if h.fragment {
            return Ok(InsertOutcome::Fragment);
        }
        return Ok(InsertOutcome::OtherOptions);
    }
    if h.fragment {
        return Ok(InsertOutcome::Fragment);
    }
    check_complete(packet, &h)?;
    let raw = RawTag::from_vector(tag)?;
    let mut area = [0u8; MAX_OPTION_BYTES];
    let added = raw.write_area(group, &mut area);
    let new_total = h.total_len + added;
    if new_total > MAX_TOTAL_LEN {
        return Err(OptionError::TooLong { len: new_total });
    }
    let old_len = packet.len();
    packet.resize(old_len + added, 0);
    packet.copy_within(BASE_HEADER_LEN..old_len, BASE_HEADER_LEN + added);
    packet[BASE_HEADER_LEN..BASE_HEADER_LEN + added].copy_from_slice(&area[..added]);
    let header_len = BASE_HEADER_LEN + added;
    set_lengths(packet, header_len, new_total);
    write_header_checksum(packet, header_len);
    Ok(InsertOutcome::Inserted { added })
}

/// Removes our option from `packet` (starting at its IPv4 header, complete) and
/// returns its group and tag; `Ok(None)` (untouched) when it carries none or is
/// not IPv4. Other options are kept (re-padded with EOL to a multiple of 4
/// bytes); when only NOP/EOL padding would remain, the options area is removed
/// entirely, so `strip_tag` after [`insert_tag`] restores the original bytes.
/// IHL, total length and header checksum are updated; on error the packet is
/// unchanged.
pub fn strip_tag(packet: &mut Vec<u8>) -> Result<Option<(u16, RawTag)>, OptionError> {
    let h = match parse_header(packet) {
        Ok(h) => h,
        Err(HeaderProblem::NotIpv4) => return Ok(None),
        Err(p) => return Err(p.into()),
    };
    if h.header_len == BASE_HEADER_LEN {
        return Ok(None);
    }
    let opts = &packet[BASE_HEADER_LEN..h.header_len];
    let scan = scan_options(opts).map_err(OptionError::Malformed)?;
    let Some((a, b)) = scan.ours else {
        return Ok(None);
    };
    let (group, raw) = RawTag::parse(&opts[a..b]).map_err(OptionError::Malformed)?;
    check_complete(packet, &h)?;

    // New options area: everything but our option, padded; empty if only padding is left.
    let mut area = [0u8; MAX_OPTION_BYTES];
    let mut n = 0;
    if scan.others {
        for &byte in opts[..a].iter().chain(&opts[b..]) {
            area[n] = byte;
            n += 1;
        }
        n = n.div_ceil(4) * 4; // EOL (0) padding, area was zeroed
    }
    let opts_len = h.header_len - BASE_HEADER_LEN;
    let removed = opts_len - n;
    packet[BASE_HEADER_LEN..BASE_HEADER_LEN + n].copy_from_slice(&area[..n]);
    packet.drain(BASE_HEADER_LEN + n..BASE_HEADER_LEN + opts_len);
    let header_len = BASE_HEADER_LEN + n;
    set_lengths(packet, header_len, h.total_len - removed);
    write_header_checksum(packet, header_len);
    Ok(Some((group, raw)))
}

/// Whether `packet` is a TCP segment without payload and without SYN, FIN or
/// RST, with ACK set (docs/design.md §3.2: may be left untagged). Anything unparsable,
/// fragmented or truncated before the TCP flags is *not* a pure ACK (so it
/// gets tagged).
pub fn is_pure_ack(packet: &[u8]) -> bool {
    const FIN: u8 = 0x01;
    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;
    let Ok(h) = parse_header(packet) else {
        return false;
    };
    if h.fragment || h.protocol != PROTO_TCP {
        return false;
    }
    let (Some(&offset_byte), Some(&flags)) =
        (packet.get(h.header_len + 12), packet.get(h.header_len + 13))
    else {
        return false;
    };
    let tcp_header_len = usize::from(offset_byte >> 4) * 4;
    if tcp_header_len < 20 {
        return false;
    }
    h.header_len + tcp_header_len == h.total_len
        && flags & ACK != 0
        && flags & (FIN | SYN | RST) == 0
}

/// Computes the TCP or UDP checksum of `packet` (complete, unfragmented IPv4)
/// entirely in software and stores it. For packets delivered with a partial
/// checksum (GSO / checksum offload: the field holds only the pseudo-header
/// sum); the caller decides when that is the case. A UDP checksum that computes
/// to 0 is sent as 0xffff (RFC 768).
pub fn complete_l4_checksum(packet: &mut [u8]) -> Result<(), OptionError> {
    let h = parse_header(packet)?;
    if h.fragment {
        return Err(OptionError::Fragment);
    }
    if packet.len() < h.total_len {
        return Err(OptionError::Truncated {
            have: packet.len(),
            need: h.total_len,
        });
    }
    let (csum_at, min_len) = match h.protocol {
        PROTO_TCP => (16, 20),
        PROTO_UDP => (6, 8),
        p => return Err(OptionError::UnsupportedProtocol(p)),
    };
    let l4_len = h.total_len - h.header_len;
    if l4_len < min_len {
        return Err(OptionError::Malformed("L4 segment shorter than its header"));
    }
    let seg_start = h.header_len;
    if h.protocol == PROTO_UDP {
        let udp_len = usize::from(u16::from_be_bytes([
            packet[seg_start + 4],
            packet[seg_start + 5],
        ]));
        if udp_len != l4_len {
            return Err(OptionError::Malformed(
                "UDP length disagrees with the IPv4 total length",
            ));
        }
    }
    packet[seg_start + csum_at] = 0;
    packet[seg_start + csum_at + 1] = 0;
    // Pseudo-header: source, destination, zero + protocol, L4 length.
    let mut acc = sum_words(&packet[12..20], 0);
    acc += u64::from(h.protocol);
    acc += l4_len as u64;
    acc = sum_words(&packet[seg_start..h.total_len], acc);
    let mut c = !fold(acc);
    if h.protocol == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    packet[seg_start + csum_at..seg_start + csum_at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vector::{EPOCH_ENTRY, MAX_WRITERS};
    use etherparse::{Ipv4Header, PacketBuilder, TcpSlice, UdpHeader};
    use proptest::prelude::*;

    const SRC: [u8; 4] = [10, 0, 0, 1];
    const DST: [u8; 4] = [10, 0, 0, 2];

    fn tcp_packet(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4(SRC, DST, 64)
            .tcp(40000, 5432, 12345, 64240)
            .ack(777);
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).unwrap();
        out
    }

    #[test]
    fn area_is_what_insert_tag_inserts() {
        let mut v = CountVector::ZERO;
        v.set(0, 7);
        v.set(3, (1 << 32) + 9);
        let raw = RawTag::from_vector(&v).unwrap();
        let (area, len) = raw.area(0x0102);
        assert_eq!(len, raw.option_area_len());
        let mut p = tcp_packet(b"x");
        insert_tag(&mut p, 0x0102, &v).unwrap();
        assert_eq!(&p[20..20 + len], &area[..len]);
        assert_eq!(RawTag::from_area(&area[..len]), Ok((0x0102, raw)));
        assert!(
            RawTag::from_area(&area[..len - 4]).is_err(),
            "length must agree"
        );
        assert!(RawTag::from_area(&area[2..len]).is_err(), "NOPs required");
    }

    fn tcp_packet_flags(payload: &[u8], syn: bool, fin: bool, rst: bool, ack: bool) -> Vec<u8> {
        let mut b = PacketBuilder::ipv4(SRC, DST, 64).tcp(40000, 80, 1, 1000);
        if syn {
            b = b.syn();
        }
        if fin {
            b = b.fin();
        }
        if rst {
            b = b.rst();
        }
        if ack {
            b = b.ack(5);
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    fn udp_packet(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ipv4(SRC, DST, 64).udp(5353, 53);
        let mut out = Vec::new();
        b.write(&mut out, payload).unwrap();
        out
    }

    /// Independent check with etherparse: header checksum and L4 checksum valid.
    fn checksums_ok(packet: &[u8]) -> bool {
        let (ip, rest) = Ipv4Header::from_slice(packet).unwrap();
        if ip.calc_header_checksum() != ip.header_checksum {
            return false;
        }
        let l4 = &rest[..usize::from(ip.total_len) - ip.header_len()];
        match ip.protocol.0 {
            PROTO_TCP => {
                let tcp = TcpSlice::from_slice(l4).unwrap();
                tcp.calc_checksum_ipv4(ip.source, ip.destination).unwrap() == tcp.checksum()
            }
            PROTO_UDP => {
                let (udp, payload) = UdpHeader::from_slice(l4).unwrap();
                udp.calc_checksum_ipv4_raw(ip.source, ip.destination, payload)
                    .unwrap()
                    == udp.checksum
            }
            _ => true,
        }
    }

    fn vec_of(entries: &[(usize, Seq)]) -> CountVector {
        let mut v = CountVector::ZERO;
        for &(i, s) in entries {
            v.set(i, s);
        }
        v
    }

    /// Recomputes the header checksum after a test edited the header.
    fn fix_header(packet: &mut [u8]) {
        let hl = usize::from(packet[0] & 0xf) * 4;
        write_header_checksum(packet, hl);
    }

    #[test]
    fn insert_matches_documented_layout() {
        let mut p = tcp_packet(b"hello");
        let tag = vec_of(&[(0, 5), (3, (7 << 32) | 9), (EPOCH_ENTRY, 2)]);
        let out = insert_tag(&mut p, 0x1234, &tag).unwrap();
        assert_eq!(out, InsertOutcome::Inserted { added: 20 });
        assert_eq!(p[0], 0x40 | 10);
        assert_eq!(
            &p[20..40],
            &[1, 1, 0x9e, 18, 0x12, 0x34, 0x80, 0x09, 0, 0, 0, 5, 0, 0, 0, 9, 0, 0, 0, 2]
        );
        match classify(&p) {
            Classify::Tagged { group, raw } => {
                assert_eq!(group, 0x1234);
                assert_eq!(
                    raw.entries().collect::<Vec<_>>(),
                    vec![(0, 5), (3, 9), (EPOCH_ENTRY, 2)]
                );
                let local = vec_of(&[(3, 7 << 32)]);
                assert_eq!(raw.resolve(&local), tag);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tcp_and_udp_checksums_survive_insert_and_strip() {
        for original in [
            tcp_packet(b""),
            tcp_packet(&[0xab; 1460]),
            tcp_packet(b"odd"),
            udp_packet(b""),
            udp_packet(&[7; 1472]),
            udp_packet(b"x"),
        ] {
            assert!(checksums_ok(&original));
            assert_eq!(classify(&original), Classify::Untagged);
            let l4_before = original[20..].to_vec();
            for n in 0..=MAX_TAG_ENTRIES {
                let tag = CountVector::from_slice(
                    &(1..=n as u64).map(|s| s * 1_000_003).collect::<Vec<_>>(),
                );
                let mut p = original.clone();
                let out = insert_tag(&mut p, 7, &tag).unwrap();
                assert_eq!(out, InsertOutcome::Inserted { added: 8 + 4 * n });
                assert_eq!(p.len(), original.len() + 8 + 4 * n);
                assert!(checksums_ok(&p), "after insert, {n} entries");
                assert_eq!(&p[20 + 8 + 4 * n..], &l4_before[..], "L4 bytes changed");
                let (group, raw) = strip_tag(&mut p).unwrap().unwrap();
                assert_eq!(group, 7);
                assert_eq!(raw.resolve(&CountVector::ZERO), tag);
                assert_eq!(p, original, "strip did not restore the original");
                assert!(checksums_ok(&p));
            }
        }
    }

    #[test]
    fn too_many_entries_is_an_error_and_leaves_packet() {
        let tag = CountVector::from_slice(&[1; MAX_TAG_ENTRIES + 1]);
        let original = tcp_packet(b"data");
        let mut p = original.clone();
        assert_eq!(
            insert_tag(&mut p, 1, &tag),
            Err(OptionError::TooManyEntries {
                present: 9,
                max: MAX_TAG_ENTRIES
            })
        );
        assert_eq!(p, original);
        // 8 writers + epoch: one too many.
        let mut tag = CountVector::from_slice(&[1; MAX_WRITERS]);
        tag.set(EPOCH_ENTRY, 1);
        assert!(insert_tag(&mut p, 1, &tag).is_err());
    }

    #[test]
    fn zero_vector_gets_an_empty_tag() {
        let original = udp_packet(b"abc");
        let mut p = original.clone();
        assert_eq!(
            insert_tag(&mut p, 9, &CountVector::ZERO),
            Ok(InsertOutcome::Inserted { added: 8 })
        );
        match classify(&p) {
            Classify::Tagged { group: 9, raw } => assert!(raw.is_empty()),
            other => panic!("{other:?}"),
        }
        strip_tag(&mut p).unwrap();
        assert_eq!(p, original);
    }

    #[test]
    fn non_ipv4_is_never_touched() {
        let mut v6 = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
        v6.extend_from_slice(&[0; 40]);
        let original = v6.clone();
        assert_eq!(classify(&v6), Classify::NotIpv4);
        assert_eq!(
            insert_tag(&mut v6, 1, &CountVector::ZERO),
            Ok(InsertOutcome::NotIpv4)
        );
        assert_eq!(strip_tag(&mut v6), Ok(None));
        assert_eq!(complete_l4_checksum(&mut v6), Err(OptionError::NotIpv4));
        assert!(!is_pure_ack(&v6));
        assert_eq!(v6, original);
    }

    #[test]
    fn fragments_are_not_tagged() {
        for (mf, offset) in [(true, 0u16), (false, 185), (true, 3)] {
            let mut p = udp_packet(&[1; 64]);
            let word = (u16::from(mf) << 13) | offset;
            p[6..8].copy_from_slice(&word.to_be_bytes());
            fix_header(&mut p);
            let original = p.clone();
            assert_eq!(classify(&p), Classify::Fragment);
            assert_eq!(
                insert_tag(&mut p, 1, &vec_of(&[(0, 1)])),
                Ok(InsertOutcome::Fragment)
            );
            assert_eq!(complete_l4_checksum(&mut p), Err(OptionError::Fragment));
            assert_eq!(p, original);
        }
    }

    #[test]
    fn tagged_fragment_is_still_seen_and_strippable() {
        let mut p = udp_packet(&[1; 64]);
        let tag = vec_of(&[(2, 40)]);
        insert_tag(&mut p, 3, &tag).unwrap();
        p[6] |= 0x20; // MF: the kernel fragmented it after tagging
        fix_header(&mut p);
        assert!(matches!(classify(&p), Classify::Tagged { group: 3, .. }));
        assert_eq!(
            insert_tag(&mut p, 3, &tag),
            Ok(InsertOutcome::AlreadyTagged { group: 3 })
        );
        let (g, raw) = strip_tag(&mut p).unwrap().unwrap();
        assert_eq!((g, raw.resolve(&CountVector::ZERO)), (3, tag));
        assert_eq!(classify(&p), Classify::Fragment);
        assert!(header_checksum_ok(&p[..20]));
    }

    /// Adds a Router Alert option (type 148, len 4) to a packet without options.
    fn with_router_alert(mut p: Vec<u8>) -> Vec<u8> {
        p.splice(20..20, [148, 4, 0, 0]);
        let total = u16::from_be_bytes([p[2], p[3]]) + 4;
        set_lengths(&mut p, 24, usize::from(total));
        fix_header(&mut p);
        p
    }

    #[test]
    fn packets_with_other_options_pass_untouched() {
        let original = with_router_alert(tcp_packet(b"q"));
        assert!(checksums_ok(&original));
        let mut p = original.clone();
        assert_eq!(classify(&p), Classify::OtherOptions);
        assert_eq!(
            insert_tag(&mut p, 1, &vec_of(&[(0, 1)])),
            Ok(InsertOutcome::OtherOptions)
        );
        assert_eq!(strip_tag(&mut p), Ok(None));
        assert_eq!(p, original);
    }

    #[test]
    fn strip_keeps_other_options() {
        // Our option first (as inserted), then someone else's Router Alert.
        let mut p = tcp_packet(b"payload");
        insert_tag(&mut p, 5, &vec_of(&[(1, 10), (4, 20), (6, 30)])).unwrap();
        let hl = usize::from(p[0] & 0xf) * 4;
        p.splice(hl..hl, [148, 4, 0, 0]);
        let total = u16::from_be_bytes([p[2], p[3]]) + 4;
        set_lengths(&mut p, hl + 4, usize::from(total));
        fix_header(&mut p);
        assert!(checksums_ok(&p));
        assert!(matches!(classify(&p), Classify::Tagged { group: 5, .. }));
        let (g, _) = strip_tag(&mut p).unwrap().unwrap();
        assert_eq!(g, 5);
        // NOP NOP RA -> padded to 8 bytes with EOL.
        assert_eq!(p[0] & 0xf, 7);
        assert_eq!(&p[20..28], &[1, 1, 148, 4, 0, 0, 0, 0]);
        assert_eq!(classify(&p), Classify::OtherOptions);
        assert!(checksums_ok(&p));
        assert_eq!(&p[28..], &tcp_packet(b"payload")[20..]);
    }

    #[test]
    fn accepts_all_experimental_types_on_parse() {
        for ty in ACCEPTED_TYPES {
            let original = tcp_packet(b"z");
            let mut p = original.clone();
            insert_tag(&mut p, 2, &vec_of(&[(0, 3)])).unwrap();
            p[22] = ty;
            fix_header(&mut p);
            assert!(
                matches!(classify(&p), Classify::Tagged { group: 2, .. }),
                "{ty}"
            );
            assert!(strip_tag(&mut p).unwrap().is_some());
            assert_eq!(p, original);
        }
        // Number 30 in class 1 is not an RFC 4727 type.
        let mut p = tcp_packet(b"z");
        insert_tag(&mut p, 2, &vec_of(&[(0, 3)])).unwrap();
        p[22] = 62;
        fix_header(&mut p);
        assert_eq!(classify(&p), Classify::OtherOptions);
    }

    #[test]
    fn malformed_options_are_reported() {
        let mut base = tcp_packet(b"z");
        insert_tag(&mut base, 2, &vec_of(&[(0, 3), (1, 4)])).unwrap();
        // Length byte disagreeing with the bitmap.
        let mut p = base.clone();
        p[27] |= 0x04; // one more entry present than carried
        fix_header(&mut p);
        assert!(matches!(classify(&p), Classify::Malformed(_)));
        let before = p.clone();
        assert!(matches!(strip_tag(&mut p), Err(OptionError::Malformed(_))));
        assert_eq!(p, before);
        // Option length running past the header.
        let mut p = base.clone();
        p[23] = 40;
        fix_header(&mut p);
        assert!(matches!(classify(&p), Classify::Malformed(_)));
        assert!(matches!(
            insert_tag(&mut p, 1, &CountVector::ZERO),
            Err(OptionError::Malformed(_))
        ));
        // Length byte < 2.
        let mut p = base.clone();
        p[23] = 1;
        fix_header(&mut p);
        assert!(matches!(classify(&p), Classify::Malformed(_)));
    }

    #[test]
    fn bad_header_checksum_is_not_repaired() {
        let original = tcp_packet(b"abc");
        let mut p = original.clone();
        p[10] ^= 0xff;
        let corrupt = p.clone();
        assert_eq!(
            insert_tag(&mut p, 1, &CountVector::ZERO),
            Err(OptionError::BadHeaderChecksum)
        );
        assert_eq!(p, corrupt);
        let mut t = original.clone();
        insert_tag(&mut t, 1, &CountVector::ZERO).unwrap();
        t[10] ^= 0x01;
        let corrupt = t.clone();
        assert_eq!(strip_tag(&mut t), Err(OptionError::BadHeaderChecksum));
        assert_eq!(t, corrupt);
    }

    #[test]
    fn truncated_and_broken_headers() {
        let full = tcp_packet(&[9; 100]);
        for cut in 0..full.len() {
            let mut p = full[..cut].to_vec();
            let c = classify(&p);
            if cut < 20 {
                assert!(matches!(c, Classify::Malformed(_)), "cut {cut}: {c:?}");
            } else {
                assert_eq!(c, Classify::Untagged, "header-only capture classifies");
            }
            let r = insert_tag(&mut p, 1, &CountVector::ZERO);
            assert!(r.is_err(), "cut {cut}: {r:?}");
            assert_eq!(p, &full[..cut]);
        }
        let mut p = full.clone();
        p[0] = 0x44; // IHL 4
        assert!(matches!(classify(&p), Classify::Malformed(_)));
        let mut p = full.clone();
        p[2..4].copy_from_slice(&10u16.to_be_bytes()); // total < header
        assert!(matches!(classify(&p), Classify::Malformed(_)));
        assert!(matches!(classify(&[]), Classify::Malformed(_)));
    }

    #[test]
    fn total_length_limit() {
        // UDP payload so large the tag does not fit under 65535.
        let mut p = udp_packet(&vec![0u8; MAX_TOTAL_LEN - 28 - 4]);
        assert_eq!(p.len(), MAX_TOTAL_LEN - 4);
        let original = p.clone();
        assert_eq!(
            insert_tag(&mut p, 1, &CountVector::ZERO),
            Err(OptionError::TooLong {
                len: MAX_TOTAL_LEN + 4
            })
        );
        assert_eq!(p, original);
        let mut p = udp_packet(&vec![0u8; MAX_TOTAL_LEN - 28 - 8]);
        assert_eq!(
            insert_tag(&mut p, 1, &CountVector::ZERO),
            Ok(InsertOutcome::Inserted { added: 8 })
        );
        assert_eq!(p.len(), MAX_TOTAL_LEN);
        assert!(checksums_ok(&p));
    }

    #[test]
    fn pure_ack_detection() {
        assert!(is_pure_ack(&tcp_packet(b"")));
        assert!(!is_pure_ack(&tcp_packet(b"x")));
        assert!(!is_pure_ack(&tcp_packet_flags(
            b"", true, false, false, true
        )));
        assert!(!is_pure_ack(&tcp_packet_flags(
            b"", false, true, false, true
        )));
        assert!(!is_pure_ack(&tcp_packet_flags(
            b"", false, false, true, true
        )));
        assert!(!is_pure_ack(&tcp_packet_flags(
            b"", false, false, false, false
        )));
        assert!(!is_pure_ack(&udp_packet(b"")));
        // Still a pure ACK when tagged (IHL > 5) and when only the headers were captured.
        let mut t = tcp_packet(b"");
        insert_tag(&mut t, 1, &vec_of(&[(0, 1)])).unwrap();
        assert!(is_pure_ack(&t));
        let p = tcp_packet(b"");
        assert!(!is_pure_ack(&p[..33]));
    }

    #[test]
    fn complete_checksum_from_partial() {
        for original in [
            tcp_packet(&[3; 1000]),
            tcp_packet(b"odd"),
            udp_packet(&[4; 999]),
            udp_packet(b""),
        ] {
            let at = if original[9] == PROTO_TCP { 36 } else { 26 };
            let mut p = original.clone();
            // What offload leaves: the folded pseudo-header sum, not complemented.
            let l4_len = (p.len() - 20) as u64;
            let partial = fold(sum_words(&p[12..20], u64::from(p[9]) + l4_len));
            p[at..at + 2].copy_from_slice(&partial.to_be_bytes());
            assert!(!checksums_ok(&p) || partial == 0);
            complete_l4_checksum(&mut p).unwrap();
            assert_eq!(p, original);
            // And on a tagged packet (options are not in the pseudo-header).
            let mut t = original.clone();
            insert_tag(&mut t, 1, &vec_of(&[(0, 99)])).unwrap();
            let tagged = t.clone();
            let tat = at + 12;
            t[tat..tat + 2].copy_from_slice(&partial.to_be_bytes());
            complete_l4_checksum(&mut t).unwrap();
            assert_eq!(t, tagged);
        }
        let mut icmp = tcp_packet(b"");
        icmp[9] = 1;
        fix_header(&mut icmp);
        assert_eq!(
            complete_l4_checksum(&mut icmp),
            Err(OptionError::UnsupportedProtocol(1))
        );
    }

    #[test]
    fn resolve_edges() {
        assert_eq!(resolve_seq(0, 0), 0);
        assert_eq!(resolve_seq(0, 5), 5);
        assert_eq!(resolve_seq(5, 3), 3);
        // Would be negative: smallest non-negative candidate.
        assert_eq!(resolve_seq(5, u32::MAX), u64::from(u32::MAX));
        // Wrap forward across 2^32.
        assert_eq!(resolve_seq(u64::from(u32::MAX) - 1, 3), (1 << 32) + 3);
        // Wrap backward across 2^32.
        assert_eq!(resolve_seq((1 << 32) + 2, u32::MAX), u64::from(u32::MAX));
        // Exactly 2^31 away: upward.
        assert_eq!(resolve_seq(1 << 40, 1 << 31), (1 << 40) + (1 << 31));
        // Near u64::MAX only the lower candidate exists.
        assert_eq!(resolve_seq(u64::MAX, 0), u64::MAX - u64::from(u32::MAX));
    }

    fn small_tag() -> impl Strategy<Value = CountVector> {
        proptest::collection::btree_map(0..VECTOR_LEN, 1..u64::MAX, 0..=MAX_TAG_ENTRIES).prop_map(
            |m| {
                let mut v = CountVector::ZERO;
                for (i, s) in m {
                    v.set(i, s);
                }
                v
            },
        )
    }

    fn any_packet() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..1600),
        )
            .prop_map(|(tcp, payload)| {
                if tcp {
                    tcp_packet(&payload)
                } else {
                    udp_packet(&payload[..payload.len().min(1472)])
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn insert_strip_round_trip(original in any_packet(), group in any::<u16>(), tag in small_tag()) {
            let mut p = original.clone();
            let out = insert_tag(&mut p, group, &tag).unwrap();
            let added = 8 + 4 * tag.nonzero().count();
            prop_assert_eq!(out, InsertOutcome::Inserted { added });
            prop_assert!(checksums_ok(&p));
            let Classify::Tagged { group: g, raw } = classify(&p) else {
                return Err(TestCaseError::fail("not tagged"));
            };
            prop_assert_eq!(g, group);
            // Receiver whose local vector is within 2^31 of the tag resolves it exactly.
            let mut local = CountVector::ZERO;
            for (i, s) in tag.nonzero() {
                local.set(i, s.saturating_sub(u64::from(s as u32 % 1000)));
            }
            prop_assert_eq!(raw.resolve(&local), tag);
            let (g2, raw2) = strip_tag(&mut p).unwrap().unwrap();
            prop_assert_eq!((g2, raw2), (g, raw));
            prop_assert_eq!(p, original);
        }

        #[test]
        fn resolve_is_exact_within_window(truth in any::<u64>(), delta in -(1i64 << 31) + 1..(1i64 << 31)) {
            let local = truth.checked_add_signed(delta);
            prop_assume!(local.is_some());
            let local = local.unwrap();
            prop_assert_eq!(resolve_seq(local, truth as u32), truth);
        }

        #[test]
        fn random_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..200), v4 in any::<bool>(), tag in small_tag()) {
            if v4 && !bytes.is_empty() {
                bytes[0] = 0x40 | (bytes[0] & 0x0f); // reach deeper than the version check
            }
            fuzz_one(bytes, &tag)?;
        }

        #[test]
        fn mutated_packets_never_panic(
            original in any_packet(),
            tagged in any::<bool>(),
            tag in small_tag(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut p = original;
            if tagged {
                insert_tag(&mut p, 1, &tag).unwrap();
            }
            let hl = usize::from(p[0] & 0xf) * 4;
            for (pos, byte) in edits {
                // Mostly hit the header, where the parsing is.
                let i = pos.index(hl + 4);
                p[i] = byte;
            }
            if p[0] >> 4 == 4 {
                let hl = usize::from(p[0] & 0xf) * 4;
                if hl >= 20 && hl <= p.len() {
                    write_header_checksum(&mut p, hl); // get past the checksum check
                }
            }
            if truncate {
                p.truncate(cut.index(p.len() + 1));
            }
            fuzz_one(p, &tag)?;
        }
    }

    /// Runs every entry point on hostile bytes; checks invariants of successes.
    fn fuzz_one(bytes: Vec<u8>, tag: &CountVector) -> Result<(), TestCaseError> {
        let _ = classify(&bytes);
        let _ = is_pure_ack(&bytes);
        let mut c = bytes.clone();
        let _ = complete_l4_checksum(&mut c);
        let mut p = bytes.clone();
        match insert_tag(&mut p, 1, tag) {
            Ok(InsertOutcome::Inserted { added }) => {
                prop_assert_eq!(p.len(), bytes.len() + added);
                let hl = usize::from(p[0] & 0xf) * 4;
                prop_assert!(header_checksum_ok(&p[..hl]));
                prop_assert!(
                    matches!(classify(&p), Classify::Tagged { .. }),
                    "not tagged after insert"
                );
                prop_assert!(strip_tag(&mut p).unwrap().is_some());
                prop_assert_eq!(&p, &bytes);
            }
            Ok(_) | Err(_) => prop_assert_eq!(&p, &bytes),
        }
        let mut s = bytes.clone();
        match strip_tag(&mut s) {
            Ok(Some(_)) => {
                let hl = usize::from(s[0] & 0xf) * 4;
                prop_assert!(header_checksum_ok(&s[..hl]));
                prop_assert!(
                    !matches!(classify(&s), Classify::Tagged { .. }),
                    "still tagged after strip"
                );
            }
            Ok(None) | Err(_) => prop_assert_eq!(&s, &bytes),
        }
        Ok(())
    }
}
