//! The TCX program of the kernel tagger, and the layout of the maps it shares
//! with the agent. One program per group and host, attached at the ingress of
//! every interface that leads to a protected machine of the group.
//!
//! Per packet (IPv4 over Ethernet; everything else continues untouched):
//!
//! 1. Look up `(source, destination)` in the pairs map. Not there: not a
//!    cross-host pair of this group, continue (`TCX_NEXT`).
//! 2. **Tag** (source local, destination on another host): skip pure TCP ACKs;
//!    read the source machine's options area from its slot under the slot's
//!    sequence lock; if the slot's vector is zero, pass untagged; else grow the
//!    packet by the area with `bpf_skb_adjust_room(BPF_ADJ_ROOM_NET)` (which
//!    also lowers the GSO segment size: super-packets stay whole), write the
//!    new header (IHL, total length, checksum) and the area.
//! 3. **Strip** (source on another host, destination local): the area must be
//!    exactly `NOP NOP <our option of our group>`; record it in the ring
//!    buffer for the agent to merge (unless this CPU recorded the same area for
//!    this pair last time), count it in the destination's `received`, shrink
//!    the packet and write the new header.
//! 4. **Hold** (source local, destination outside the group): pass at once
//!    when nothing needs holding: the committed vector dominates the source's
//!    pending vector (or the group's hold is bypassed), no merge for it is
//!    pending, and the agent has nothing of the group queued or held (so no
//!    flow is reordered). Otherwise count it and leave it to the hold queue.
//! 5. What it handled (tagged, stripped, or rightly left untagged) gets the
//!    handled mark bit: the agent's iptables rules let marked packets of the
//!    pair pass and send all others to the NFQUEUE tag queue. So the program
//!    **falls back** simply by not marking, and so does every packet it never
//!    saw (an interface it is not attached to, a program that is gone):
//!    fragments, fragments, other options, a slot being rewritten, a source whose
//!    received tags the agent has not merged yet (`received != drained`: its
//!    published vector may lack them), a full ring buffer, a failed resize.
//!    The userspace path then does what it always did (merges, tags, drops
//!    what it must).
//!
//! A failure after the packet was resized drops it (`TCX_DROP`): TCP sends it
//! again. Counters live in the stats row of the slots map.
//!
//! Memory ordering: the sequence lock relies on loads not being reordered
//! with loads (x86-64 TSO). Other architectures need read barriers here.

use super::asm::{Alu, Asm, Insn, Jmp, Reg, Size, FP, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9};

/// Bytes per slot (one per machine of the topology) and per stats row.
pub const SLOT_SIZE: usize = 128;
/// Sequence lock word (u32, even when stable).
pub const SLOT_SEQ: usize = 0;
/// Length of the options area (u32; 0: the vector is zero, send untagged).
pub const SLOT_LEN: usize = 4;
/// The options area (40 bytes).
pub const SLOT_AREA: usize = 8;
/// Tags recorded for this machine as receiver (u64, the program adds).
pub const SLOT_RECEIVED: usize = 48;
/// `received` as of the agent's last completed merge (u64, the agent writes).
pub const SLOT_DRAINED: usize = 56;
/// 1 while the committed vector dominates the machine's pending vector (u32,
/// the agent writes it under the machine's lock): its client-bound packets
/// need no holding.
pub const SLOT_CLEAR: usize = 64;

// Control words of the stats row (after the counters).
/// Non-zero while the group's hold is bypassed (modes async/sync).
pub const ROW_BYPASS: usize = 96;
/// Client-bound packets the program sent to the hold queue (it adds).
pub const ROW_TO_HOLD: usize = 104;
/// Of those, how many the agent has taken and decided (it writes, after
/// `ROW_USER_HELD`).
pub const ROW_ARRIVED: usize = 112;
/// Packets the agent's netqueue holds now.
pub const ROW_USER_HELD: usize = 120;

/// Counters of the stats row (u64 each, index into the row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    Tagged = 0,
    Stripped = 1,
    Fallback = 2,
    UntaggedZero = 3,
    PureAck = 4,
    ArrivedUntagged = 5,
    Errors = 6,
    Records = 7,
    HoldPassed = 8,
    HoldQueued = 9,
}

/// Pair kinds (pairs map value, first u32).
pub const KIND_TAG: u32 = 1;
pub const KIND_STRIP: u32 = 2;
/// Hosts map: key = address of a machine of the group (4 bytes, as in the
/// header), value = machine index, 1 if it runs on this host (u32 each).
pub const HOST_VALUE_SIZE: usize = 8;
/// Pairs map: key = source and destination address as in the header (8
/// bytes), value = kind, machine index (source for tag, destination for
/// strip), pair index (u32 each).
pub const PAIR_VALUE_SIZE: usize = 12;
/// Ring buffer record: receiver machine (u32), area length (u32), area (40).
pub const RECORD_SIZE: usize = 48;
/// Per-CPU "last recorded area" per strip pair: length (u32), pad, area (40).
pub const LAST_SIZE: usize = 48;

/// `TCX_NEXT`: continue with the next program / the stack.
pub const TCX_NEXT: i32 = -1;
/// `TCX_DROP`.
pub const TCX_DROP: i32 = 2;

const HELPER_MAP_LOOKUP: i32 = 1;
const HELPER_SKB_STORE_BYTES: i32 = 9;
const HELPER_SKB_LOAD_BYTES: i32 = 26;
const HELPER_CSUM_DIFF: i32 = 28;
const HELPER_SKB_ADJUST_ROOM: i32 = 50;
const HELPER_RINGBUF_OUTPUT: i32 = 130;

/// `__sk_buff` offsets.
const SKB_MARK: i16 = 8;
const SKB_PROTOCOL: i16 = 16;
/// `htons(ETH_P_IP)` as the program reads it on a little-endian machine.
const ETH_P_IP_BE: i32 = 0x0008;
const ETH_HLEN: i32 = 14;
const IP_BASE: i32 = 20;

// Stack layout (offsets from the frame pointer; 8-byte loads 8-aligned).
/// The IPv4 header, 20 bytes, then the options area right after it.
const HDR: i16 = -76;
/// Source and destination (the pairs key): `HDR + 12`.
const KEY: i16 = HDR + 12;
/// Options area (40 bytes), `HDR + 20`.
const AREA: i16 = HDR + 20;
/// u32 key for array lookups.
const IDX: i16 = -80;
/// u32 pair index (key of the per-CPU last-area map).
const PAIR: i16 = -84;
/// Ring buffer record (48 bytes).
const REC: i16 = -136;
/// Two bytes of the TCP header (data offset, flags).
const TCP: i16 = -144;

/// The maps the program refers to (file descriptors).
#[derive(Clone, Copy, Debug)]
pub struct MapFds {
    pub pairs: i32,
    pub hosts: i32,
    pub slots: i32,
    pub ring: i32,
    pub last: i32,
}

/// What the program is built for.
#[derive(Clone, Copy, Debug)]
pub struct ProgParams {
    pub group_id: u16,
    /// Bit(s) OR-ed into `skb->mark` of the packets the program handled.
    pub handled_mark: u32,
    /// Bit(s) OR-ed into `skb->mark` of client-bound packets it counted in
    /// `ROW_TO_HOLD` (the agent counts them back in `ROW_ARRIVED`).
    pub counted_mark: u32,
    /// Index of the stats row in the slots map (= number of machines).
    pub stats_row: u32,
}

/// Emits `stats[stat] += 1` (clobbers R0..R5).
fn count(a: &mut Asm, maps: &MapFds, p: &ProgParams, stat: Stat) {
    a.st_imm(Size::W, FP, IDX, p.stats_row as i32)
        .ld_map_fd(R1, maps.slots)
        .mov(R2, FP)
        .alu_imm(Alu::Add, R2, i32::from(IDX))
        .call(HELPER_MAP_LOOKUP)
        .skip_imm(Jmp::Eq, R0, 0, 2)
        .mov_imm(R1, 1)
        .atomic_add64(R0, (stat as i16) * 8, R1);
}

/// Emits `R0 = lookup(map, FP + key)`, jumping to `none` when absent
/// (clobbers R0..R5).
fn lookup(a: &mut Asm, map: i32, key: i16, none: &'static str) {
    a.ld_map_fd(R1, map)
        .mov(R2, FP)
        .alu_imm(Alu::Add, R2, i32::from(key))
        .call(HELPER_MAP_LOOKUP)
        .jmp_imm(Jmp::Eq, R0, 0, none);
}

/// Emits `stats[stat] += 1; goto target`.
fn count_then(a: &mut Asm, maps: &MapFds, p: &ProgParams, stat: Stat, target: &'static str) {
    count(a, maps, p, stat);
    a.ja(target);
}

/// Copies the 40-byte area between stack/map locations with 5 u64 moves.
fn copy40(a: &mut Asm, dst: Reg, dst_off: i16, src: Reg, src_off: i16) {
    for i in 0..5 {
        a.ldx(Size::DW, R2, src, src_off + 8 * i)
            .stx(Size::DW, dst, dst_off + 8 * i, R2);
    }
}

/// `R3` = the header at `HDR`, `R4` = its length (20 plus `len` area bytes).
fn header_at_r3_len_r4(a: &mut Asm, len: Option<Reg>) {
    a.mov(R3, FP).alu_imm(Alu::Add, R3, i32::from(HDR));
    match len {
        Some(r) => a.mov(R4, r).alu_imm(Alu::Add, R4, IP_BASE),
        None => a.mov_imm(R4, IP_BASE),
    };
}

/// Computes the IPv4 header checksum of the header at `HDR` (20 + `len` bytes)
/// (checksum field zeroed first) and stores it (clobbers R0..R5).
fn header_checksum(a: &mut Asm, len: Option<Reg>) {
    a.st_imm(Size::H, FP, HDR + 10, 0)
        .mov_imm(R1, 0)
        .mov_imm(R2, 0);
    header_at_r3_len_r4(a, len);
    a.mov_imm(R5, 0)
        .call(HELPER_CSUM_DIFF)
        .mov(R1, R0)
        .alu_imm(Alu::And, R1, 0xffff)
        .alu_imm(Alu::Rsh, R0, 16)
        .alu(Alu::Add, R0, R1)
        .mov(R1, R0)
        .alu_imm(Alu::And, R1, 0xffff)
        .alu_imm(Alu::Rsh, R0, 16)
        .alu(Alu::Add, R0, R1)
        .alu_imm(Alu::Xor, R0, 0xffff)
        .stx(Size::H, FP, HDR + 10, R0);
}

/// Writes the header at `HDR` (20 bytes plus `len` area bytes) back into the
/// packet; a failure drops it.
fn store_header(a: &mut Asm, len: Option<Reg>) {
    a.mov(R1, R6).mov_imm(R2, ETH_HLEN);
    header_at_r3_len_r4(a, len);
    a.mov_imm(R5, 0)
        .call(HELPER_SKB_STORE_BYTES)
        .jmp_imm(Jmp::Ne, R0, 0, "error_drop");
}

/// The program (see the module docs).
pub fn program(maps: &MapFds, p: &ProgParams) -> Result<Vec<Insn>, String> {
    let mut a = Asm::new();
    let a = &mut a;
    // R6 = skb for the whole program; R7 = machine; R8 = area length; R9 = slot.
    a.mov(R6, R1)
        .ldx(Size::W, R1, R6, SKB_PROTOCOL)
        .jmp_imm(Jmp::Ne, R1, ETH_P_IP_BE, "next")
        .mov(R1, R6)
        .mov_imm(R2, ETH_HLEN)
        .mov(R3, FP)
        .alu_imm(Alu::Add, R3, i32::from(HDR))
        .mov_imm(R4, IP_BASE)
        .call(HELPER_SKB_LOAD_BYTES)
        .jmp_imm(Jmp::Ne, R0, 0, "next");
    lookup(a, maps.pairs, KEY, "maybe_hold");
    a.ldx(Size::W, R7, R0, 4)
        .ldx(Size::W, R1, R0, 8)
        .stx(Size::W, FP, PAIR, R1)
        .ldx(Size::W, R8, R0, 0)
        .stx(Size::W, FP, IDX, R7);
    lookup(a, maps.slots, IDX, "next");
    a.mov(R9, R0)
        .jmp_imm(Jmp::Eq, R8, KIND_STRIP as i32, "strip")
        .jmp_imm(Jmp::Ne, R8, KIND_TAG as i32, "next");

    // ---- tag ----
    a.ldx(Size::B, R1, FP, HDR)
        .jmp_imm(Jmp::Ne, R1, 0x45, "fallback")
        .ldx(Size::H, R1, FP, HDR + 6)
        .be16(R1)
        .alu_imm(Alu::And, R1, 0x3fff)
        .jmp_imm(Jmp::Ne, R1, 0, "fallback")
        // Pure ACK: TCP, only ACK among ACK/SYN/FIN/RST, no payload.
        .ldx(Size::B, R1, FP, HDR + 9)
        .jmp_imm(Jmp::Ne, R1, 6, "tag_vector")
        .mov(R1, R6)
        .mov_imm(R2, ETH_HLEN + IP_BASE + 12)
        .mov(R3, FP)
        .alu_imm(Alu::Add, R3, i32::from(TCP))
        .mov_imm(R4, 2)
        .call(HELPER_SKB_LOAD_BYTES)
        .jmp_imm(Jmp::Ne, R0, 0, "tag_vector")
        .ldx(Size::B, R1, FP, TCP + 1)
        .mov(R2, R1)
        .alu_imm(Alu::And, R2, 0x07)
        .jmp_imm(Jmp::Ne, R2, 0, "tag_vector")
        .alu_imm(Alu::And, R1, 0x10)
        .jmp_imm(Jmp::Eq, R1, 0, "tag_vector")
        .ldx(Size::B, R1, FP, TCP)
        .alu_imm(Alu::Rsh, R1, 4)
        .alu_imm(Alu::Lsh, R1, 2)
        .alu_imm(Alu::Add, R1, IP_BASE)
        .ldx(Size::H, R2, FP, HDR + 2)
        .be16(R2)
        .jmp(Jmp::Ne, R1, R2, "tag_vector");
    count_then(a, maps, p, Stat::PureAck, "done");

    a.label("tag_vector")
        .ldx(Size::W, R1, R9, SLOT_SEQ as i16)
        .mov(R2, R1)
        .alu_imm(Alu::And, R2, 1)
        .jmp_imm(Jmp::Ne, R2, 0, "fallback")
        .ldx(Size::DW, R2, R9, SLOT_RECEIVED as i16)
        .ldx(Size::DW, R3, R9, SLOT_DRAINED as i16)
        .jmp(Jmp::Ne, R2, R3, "fallback")
        .ldx(Size::W, R8, R9, SLOT_LEN as i16);
    copy40(a, FP, AREA, R9, SLOT_AREA as i16);
    a.ldx(Size::W, R2, R9, SLOT_SEQ as i16)
        .jmp(Jmp::Ne, R2, R1, "fallback")
        .jmp_imm(Jmp::Eq, R8, 0, "tag_zero")
        .jmp_imm(Jmp::Gt, R8, 40, "fallback")
        .jmp_imm(Jmp::Lt, R8, 8, "fallback")
        .mov(R1, R8)
        .alu_imm(Alu::And, R1, 3)
        .jmp_imm(Jmp::Ne, R1, 0, "fallback")
        // New total length; a BIG TCP header (0) or an overflow falls back.
        .ldx(Size::H, R1, FP, HDR + 2)
        .be16(R1)
        .jmp_imm(Jmp::Lt, R1, IP_BASE, "fallback")
        .alu(Alu::Add, R1, R8)
        .jmp_imm(Jmp::Gt, R1, 0xffff, "fallback")
        .be16(R1)
        .stx(Size::H, FP, HDR + 2, R1)
        .mov(R1, R8)
        .alu_imm(Alu::Rsh, R1, 2)
        .alu_imm(Alu::Add, R1, 0x45)
        .stx(Size::B, FP, HDR, R1)
        .mov(R1, R6)
        .mov(R2, R8)
        .mov_imm(R3, 0) // BPF_ADJ_ROOM_NET
        .mov_imm(R4, 0)
        .call(HELPER_SKB_ADJUST_ROOM)
        .jmp_imm(Jmp::Ne, R0, 0, "error_fallback");
    header_checksum(a, Some(R8));
    store_header(a, Some(R8));
    count_then(a, maps, p, Stat::Tagged, "done");

    a.label("tag_zero");
    count_then(a, maps, p, Stat::UntaggedZero, "done");

    // ---- strip ----
    a.label("strip")
        .ldx(Size::B, R1, FP, HDR)
        .jmp_imm(Jmp::Eq, R1, 0x45, "arrived_untagged")
        .mov(R2, R1)
        .alu_imm(Alu::Rsh, R2, 4)
        .jmp_imm(Jmp::Ne, R2, 4, "next")
        .alu_imm(Alu::And, R1, 0x0f)
        .alu_imm(Alu::Lsh, R1, 2)
        .alu_imm(Alu::Sub, R1, IP_BASE)
        .mov(R8, R1)
        .jmp_imm(Jmp::Lt, R8, 8, "fallback")
        .jmp_imm(Jmp::Gt, R8, 40, "fallback");
    for i in 0..5 {
        a.st_imm(Size::DW, FP, AREA + 8 * i, 0);
    }
    a.mov(R1, R6)
        .mov_imm(R2, ETH_HLEN + IP_BASE)
        .mov(R3, FP)
        .alu_imm(Alu::Add, R3, i32::from(AREA))
        .mov(R4, R8)
        .call(HELPER_SKB_LOAD_BYTES)
        .jmp_imm(Jmp::Ne, R0, 0, "fallback")
        .ldx(Size::B, R1, FP, AREA)
        .jmp_imm(Jmp::Ne, R1, 1, "fallback")
        .ldx(Size::B, R1, FP, AREA + 1)
        .jmp_imm(Jmp::Ne, R1, 1, "fallback")
        .ldx(Size::B, R1, FP, AREA + 2)
        .jmp_imm(
            Jmp::Ne,
            R1,
            i32::from(pipecloud_core::ipopt::OPTION_TYPE),
            "fallback",
        )
        .ldx(Size::B, R1, FP, AREA + 3)
        .alu_imm(Alu::Add, R1, 2)
        .jmp(Jmp::Ne, R1, R8, "fallback")
        .ldx(Size::H, R1, FP, AREA + 4)
        .jmp_imm(Jmp::Ne, R1, i32::from(p.group_id.swap_bytes()), "fallback")
        // New total length (checked before anything changes).
        .ldx(Size::H, R1, FP, HDR + 2)
        .be16(R1)
        .mov(R2, R8)
        .alu_imm(Alu::Add, R2, IP_BASE)
        .jmp(Jmp::Lt, R1, R2, "fallback")
        .alu(Alu::Sub, R1, R8)
        .be16(R1)
        .stx(Size::H, FP, HDR + 2, R1);
    // Same area as this CPU last recorded for this pair: nothing new.
    lookup(a, maps.last, PAIR, "record");
    a.ldx(Size::W, R1, R0, 0).jmp(Jmp::Ne, R1, R8, "record");
    for i in 0..5 {
        a.ldx(Size::DW, R1, R0, 8 + 8 * i)
            .ldx(Size::DW, R2, FP, AREA + 8 * i)
            .jmp(Jmp::Ne, R1, R2, "record");
    }
    a.ja("shrink");

    a.label("record")
        .stx(Size::W, FP, REC, R7)
        .stx(Size::W, FP, REC + 4, R8);
    copy40(a, FP, REC + 8, FP, AREA);
    a.ld_map_fd(R1, maps.ring)
        .mov(R2, FP)
        .alu_imm(Alu::Add, R2, i32::from(REC))
        .mov_imm(R3, RECORD_SIZE as i32)
        .mov_imm(R4, 0)
        .call(HELPER_RINGBUF_OUTPUT)
        .jmp_imm(Jmp::Ne, R0, 0, "fallback")
        .mov_imm(R1, 1)
        .atomic_add64(R9, SLOT_RECEIVED as i16, R1);
    count(a, maps, p, Stat::Records);
    lookup(a, maps.last, PAIR, "shrink");
    a.stx(Size::W, R0, 0, R8);
    copy40(a, R0, 8, FP, AREA);

    a.label("shrink")
        .mov_imm(R2, 0)
        .alu(Alu::Sub, R2, R8)
        .mov(R1, R6)
        .mov_imm(R3, 0)
        .mov_imm(R4, 0)
        .call(HELPER_SKB_ADJUST_ROOM)
        .jmp_imm(Jmp::Ne, R0, 0, "error_fallback")
        .st_imm(Size::B, FP, HDR, 0x45);
    header_checksum(a, None);
    store_header(a, None);
    count_then(a, maps, p, Stat::Stripped, "done");

    a.label("arrived_untagged");
    count_then(a, maps, p, Stat::ArrivedUntagged, "done");

    // ---- hold: a local machine's packet leaving the group ----
    a.label("maybe_hold");
    lookup(a, maps.hosts, KEY, "next");
    a.ldx(Size::W, R1, R0, 4)
        .jmp_imm(Jmp::Eq, R1, 0, "next")
        .ldx(Size::W, R7, R0, 0)
        .ld_map_fd(R1, maps.hosts)
        .mov(R2, FP)
        .alu_imm(Alu::Add, R2, i32::from(KEY + 4))
        .call(HELPER_MAP_LOOKUP)
        // To a machine of the group: the tag or local queue's business.
        .jmp_imm(Jmp::Ne, R0, 0, "next")
        .stx(Size::W, FP, IDX, R7);
    lookup(a, maps.slots, IDX, "next");
    a.mov(R9, R0).st_imm(Size::W, FP, IDX, p.stats_row as i32);
    lookup(a, maps.slots, IDX, "next");
    a.mov(R8, R0)
        .ldx(Size::DW, R1, R8, ROW_BYPASS as i16)
        .jmp_imm(Jmp::Ne, R1, 0, "hold_outstanding")
        .ldx(Size::W, R1, R9, SLOT_CLEAR as i16)
        .jmp_imm(Jmp::Eq, R1, 0, "hold_queue")
        .ldx(Size::DW, R1, R9, SLOT_RECEIVED as i16)
        .ldx(Size::DW, R2, R9, SLOT_DRAINED as i16)
        .jmp(Jmp::Ne, R1, R2, "hold_queue")
        // Nothing of the group may be queued or held in the agent: a packet
        // passing here must not overtake one of its flow still there.
        .label("hold_outstanding")
        .ldx(Size::DW, R1, R8, ROW_TO_HOLD as i16)
        .ldx(Size::DW, R2, R8, ROW_ARRIVED as i16)
        .jmp(Jmp::Ne, R1, R2, "hold_queue")
        .ldx(Size::DW, R1, R8, ROW_USER_HELD as i16)
        .jmp_imm(Jmp::Ne, R1, 0, "hold_queue");
    count_then(a, maps, p, Stat::HoldPassed, "done");

    a.label("hold_queue")
        .mov_imm(R1, 1)
        .atomic_add64(R8, ROW_TO_HOLD as i16, R1)
        .ldx(Size::W, R1, R6, SKB_MARK)
        .alu_imm(Alu::Or, R1, p.counted_mark as i32)
        .stx(Size::W, R6, SKB_MARK, R1);
    count_then(a, maps, p, Stat::HoldQueued, "next");

    // ---- endings ----
    a.label("error_fallback");
    count(a, maps, p, Stat::Errors);
    a.label("fallback");
    count(a, maps, p, Stat::Fallback);
    a.label("next").mov_imm(R0, TCX_NEXT).exit();

    a.label("done")
        .ldx(Size::W, R1, R6, SKB_MARK)
        .alu_imm(Alu::Or, R1, p.handled_mark as i32)
        .stx(Size::W, R6, SKB_MARK, R1)
        .mov_imm(R0, TCX_NEXT)
        .exit();

    a.label("error_drop");
    count(a, maps, p, Stat::Errors);
    a.mov_imm(R0, TCX_DROP).exit();

    std::mem::take(a).finish()
}
