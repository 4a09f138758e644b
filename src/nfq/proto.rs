//! Sans-I/O encoding and decoding of the nfnetlink_queue protocol.
//!
//! Everything here works on byte buffers: building configuration and verdict
//! messages into a `Vec<u8>`, and walking the netlink messages of one received
//! datagram. No sockets, no syscalls, so every path is unit tested.
//!
//! Byte order (from `include/uapi/linux/netfilter/nfnetlink_queue.h`): netlink
//! and attribute headers are host order; `nfgenmsg.res_id` (the queue number)
//! and every nfqueue attribute value are big-endian.
//!
//! Parsing never panics on malformed input: a datagram that lies about its
//! lengths yields [`ParseError`] for the message where the lie starts and ends
//! the walk.

use std::fmt;

/// Netlink protocol number of nfnetlink.
pub const NETLINK_NETFILTER: i32 = 12;
/// nfnetlink subsystem id of nfqueue.
pub const NFNL_SUBSYS_QUEUE: u16 = 3;

/// Length of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// Length of `struct nfgenmsg`.
pub const NFGENMSG_LEN: usize = 4;
/// Length of `struct nlattr`.
pub const NLA_HDRLEN: usize = 4;

const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;

const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;

// enum nfqnl_attr_type
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_MARK: u16 = 3;
const NFQA_IFINDEX_INDEV: u16 = 5;
const NFQA_IFINDEX_OUTDEV: u16 = 6;
const NFQA_IFINDEX_PHYSINDEV: u16 = 7;
const NFQA_IFINDEX_PHYSOUTDEV: u16 = 8;
const NFQA_PAYLOAD: u16 = 10;
const NFQA_CAP_LEN: u16 = 13;
const NFQA_SKB_INFO: u16 = 14;

// enum nfqnl_attr_config
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;

// enum nfqnl_msg_config_cmds
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_CFG_CMD_UNBIND: u8 = 2;

/// `NFQNL_COPY_PACKET`: copy (up to the copy range of) the packet to userspace.
pub const NFQNL_COPY_PACKET: u8 = 2;

/// Queue flag: accept packets when the queue is full (we never set it: fail-closed).
pub const NFQA_CFG_F_FAIL_OPEN: u32 = 0x1;
/// Queue flag: deliver GSO super-packets unsegmented (checksums may be partial).
pub const NFQA_CFG_F_GSO: u32 = 0x4;

/// `NFQA_SKB_INFO` bit: the L4 checksum is not computed yet (partial, offload).
pub const NFQA_SKB_CSUMNOTREADY: u32 = 0x1;
/// `NFQA_SKB_INFO` bit: a GSO super-packet (may exceed the MTU).
pub const NFQA_SKB_GSO: u32 = 0x2;
/// `NFQA_SKB_INFO` bit: the L4 checksum was not verified by the receiving device.
pub const NFQA_SKB_CSUM_NOTVERIFIED: u32 = 0x4;

/// Largest copy range the kernel accepts (`NFQNL_MAX_COPY_RANGE`).
pub const MAX_COPY_RANGE: u32 = 0xffff;

/// Netfilter verdict for a queued packet.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Verdict {
    /// `NF_DROP`: the kernel frees the packet.
    Drop,
    /// `NF_ACCEPT`: the packet continues after the hook.
    Accept,
}

impl Verdict {
    fn code(self) -> u32 {
        match self {
            Verdict::Drop => 0,
            Verdict::Accept => 1,
        }
    }
}

/// A malformed netlink datagram.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum ParseError {
    /// A message header is shorter than 16 bytes or its length runs past the datagram.
    #[error(
        "netlink message length {len} invalid at offset {offset} of a {datagram}-byte datagram"
    )]
    BadMessageLength {
        offset: usize,
        len: usize,
        datagram: usize,
    },
    /// An attribute's length is shorter than its header or runs past its message.
    #[error("netlink attribute length invalid in message at offset {offset}")]
    BadAttribute { offset: usize },
    /// A packet message without `NFQA_PACKET_HDR`.
    #[error("nfqueue packet message without a packet header attribute")]
    MissingPacketHeader,
    /// A fixed-size attribute with the wrong size.
    #[error("nfqueue attribute {attr} has {len} bytes, expected at least {expected}")]
    ShortAttribute {
        attr: u16,
        len: usize,
        expected: usize,
    },
}

/// One packet queued by the kernel (`NFQNL_MSG_PACKET`), borrowing its datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PacketMsg<'a> {
    /// Queue number the packet was queued on.
    pub queue: u16,
    /// Packet id, unique and increasing per queue; the verdict names it.
    pub id: u32,
    /// Link-layer protocol (ethertype, e.g. 0x0800 for IPv4).
    pub hw_protocol: u16,
    /// Netfilter hook number (`NF_INET_FORWARD` = 2, ...).
    pub hook: u8,
    /// The packet from its network header, up to the copy range.
    pub payload: &'a [u8],
    /// Original length when the kernel truncated the copy (`NFQA_CAP_LEN`).
    pub cap_len: Option<u32>,
    /// `NFQA_SKB_INFO` bits ([`NFQA_SKB_GSO`], [`NFQA_SKB_CSUMNOTREADY`], ...).
    pub skb_info: u32,
    /// Packet mark, if non-zero.
    pub mark: Option<u32>,
    /// Input interface index.
    pub indev: Option<u32>,
    /// Output interface index.
    pub outdev: Option<u32>,
    /// Physical input interface index (bridged packets).
    pub physindev: Option<u32>,
    /// Physical output interface index (bridged packets).
    pub physoutdev: Option<u32>,
}

impl PacketMsg<'_> {
    /// A GSO super-packet (larger than the MTU; the kernel segments it later).
    pub fn is_gso(&self) -> bool {
        self.skb_info & NFQA_SKB_GSO != 0
    }

    /// The L4 checksum is only partial (offload): complete it after modifying the packet.
    pub fn csum_not_ready(&self) -> bool {
        self.skb_info & NFQA_SKB_CSUMNOTREADY != 0
    }

    /// The copy holds the whole packet (not cut by the copy range).
    pub fn is_complete(&self) -> bool {
        match self.cap_len {
            Some(len) => len as usize <= self.payload.len(),
            None => true,
        }
    }
}

impl fmt::Debug for PacketMsg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PacketMsg")
            .field("queue", &self.queue)
            .field("id", &self.id)
            .field("hw_protocol", &format_args!("{:#06x}", self.hw_protocol))
            .field("hook", &self.hook)
            .field("payload_len", &self.payload.len())
            .field("cap_len", &self.cap_len)
            .field("skb_info", &self.skb_info)
            .finish()
    }
}

/// One netlink message of a received datagram.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Message<'a> {
    /// A queued packet.
    Packet(PacketMsg<'a>),
    /// Positive acknowledgement of the request with sequence number `seq`.
    Ack { seq: u32 },
    /// The request with sequence number `seq` failed with `errno` (positive).
    Error { seq: u32, errno: i32 },
    /// The kernel reported lost messages (`NLMSG_OVERRUN`).
    Overrun,
    /// Anything else (no-op, done, other subsystems); ignored.
    Other { msg_type: u16 },
}

fn u16_ne(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at + 2)?;
    Some(u16::from_ne_bytes([s[0], s[1]]))
}

fn u32_ne(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

fn be32(attr: u16, v: &[u8]) -> Result<u32, ParseError> {
    match v {
        [a, b, c, d, ..] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => Err(ParseError::ShortAttribute {
            attr,
            len: v.len(),
            expected: 4,
        }),
    }
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Iterator over the messages of one datagram; see [`messages`].
pub struct Messages<'a> {
    buf: &'a [u8],
    offset: usize,
    failed: bool,
}

/// Walks the netlink messages of one received datagram.
pub fn messages(datagram: &[u8]) -> Messages<'_> {
    Messages {
        buf: datagram,
        offset: 0,
        failed: false,
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.offset >= self.buf.len() {
            return None;
        }
        let at = self.offset;
        let bad = |len| ParseError::BadMessageLength {
            offset: at,
            len,
            datagram: self.buf.len(),
        };
        let (Some(len), Some(msg_type), Some(seq)) = (
            u32_ne(self.buf, at),
            u16_ne(self.buf, at + 4),
            u32_ne(self.buf, at + 8),
        ) else {
            self.failed = true;
            return Some(Err(bad(self.buf.len() - at)));
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || at + len > self.buf.len() {
            self.failed = true;
            return Some(Err(bad(len)));
        }
        let body = &self.buf[at + NLMSG_HDRLEN..at + len];
        self.offset = at + align4(len);
        let msg = match msg_type {
            NLMSG_ERROR => match body.get(..4) {
                Some(e) => {
                    let code = i32::from_ne_bytes([e[0], e[1], e[2], e[3]]);
                    if code == 0 {
                        Ok(Message::Ack { seq })
                    } else {
                        Ok(Message::Error {
                            seq,
                            errno: code.checked_neg().unwrap_or(i32::MAX),
                        })
                    }
                }
                None => Err(bad(len)),
            },
            NLMSG_OVERRUN => Ok(Message::Overrun),
            NLMSG_NOOP | NLMSG_DONE => Ok(Message::Other { msg_type }),
            t if t == (NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET) => {
                parse_packet(body, at).map(Message::Packet)
            }
            t => Ok(Message::Other { msg_type: t }),
        };
        if msg.is_err() {
            self.failed = true;
        }
        Some(msg)
    }
}

/// Parses the body (after `nlmsghdr`) of an `NFQNL_MSG_PACKET`.
fn parse_packet(body: &[u8], offset: usize) -> Result<PacketMsg<'_>, ParseError> {
    let Some(gen) = body.get(..NFGENMSG_LEN) else {
        return Err(ParseError::BadAttribute { offset });
    };
    let queue = u16::from_be_bytes([gen[2], gen[3]]);
    let mut pkt = PacketMsg {
        queue,
        id: 0,
        hw_protocol: 0,
        hook: 0,
        payload: &[],
        cap_len: None,
        skb_info: 0,
        mark: None,
        indev: None,
        outdev: None,
        physindev: None,
        physoutdev: None,
    };
    let mut have_hdr = false;
    let mut pos = NFGENMSG_LEN;
    while pos + NLA_HDRLEN <= body.len() {
        let (Some(alen), Some(atype)) = (u16_ne(body, pos), u16_ne(body, pos + 2)) else {
            return Err(ParseError::BadAttribute { offset });
        };
        let alen = usize::from(alen);
        if alen < NLA_HDRLEN || pos + alen > body.len() {
            return Err(ParseError::BadAttribute { offset });
        }
        let value = &body[pos + NLA_HDRLEN..pos + alen];
        let atype = atype & 0x3fff; // strip NLA_F_NESTED / NLA_F_NET_BYTEORDER
        match atype {
            NFQA_PACKET_HDR => {
                // struct nfqnl_msg_packet_hdr { __be32 packet_id; __be16 hw_protocol; __u8 hook; }
                let [a, b, c, d, e, f, g, ..] = *value else {
                    return Err(ParseError::ShortAttribute {
                        attr: atype,
                        len: value.len(),
                        expected: 7,
                    });
                };
                pkt.id = u32::from_be_bytes([a, b, c, d]);
                pkt.hw_protocol = u16::from_be_bytes([e, f]);
                pkt.hook = g;
                have_hdr = true;
            }
            NFQA_PAYLOAD => pkt.payload = value,
            NFQA_CAP_LEN => pkt.cap_len = Some(be32(atype, value)?),
            NFQA_SKB_INFO => pkt.skb_info = be32(atype, value)?,
            NFQA_MARK => pkt.mark = Some(be32(atype, value)?),
            NFQA_IFINDEX_INDEV => pkt.indev = Some(be32(atype, value)?),
            NFQA_IFINDEX_OUTDEV => pkt.outdev = Some(be32(atype, value)?),
            NFQA_IFINDEX_PHYSINDEV => pkt.physindev = Some(be32(atype, value)?),
            NFQA_IFINDEX_PHYSOUTDEV => pkt.physoutdev = Some(be32(atype, value)?),
            _ => {}
        }
        pos += align4(alen);
    }
    if !have_hdr {
        return Err(ParseError::MissingPacketHeader);
    }
    Ok(pkt)
}

/// Starts a message: writes `nlmsghdr` + `nfgenmsg`; returns its start offset.
fn begin(buf: &mut Vec<u8>, msg: u16, flags: u16, seq: u32, queue: u16) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by `finish`
    buf.extend_from_slice(&(NFNL_SUBSYS_QUEUE << 8 | msg).to_ne_bytes());
    buf.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    buf.push(libc::AF_UNSPEC as u8); // nfgen_family
    buf.push(0); // NFNETLINK_V0
    buf.extend_from_slice(&queue.to_be_bytes());
    start
}

/// Appends one attribute with `value`, padded to 4 bytes.
fn attr(buf: &mut Vec<u8>, ty: u16, value: &[u8]) {
    attr_with(buf, ty, |b| b.extend_from_slice(value));
}

/// Appends one attribute whose value `write` appends; pads to 4 bytes.
fn attr_with<R>(buf: &mut Vec<u8>, ty: u16, write: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    let start = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&ty.to_ne_bytes());
    let r = write(buf);
    let len = buf.len() - start;
    // Attribute lengths are u16: callers never write more than 0xffff bytes
    // (payloads are bounded by the IPv4 total length); saturate defensively.
    let len16 = u16::try_from(len).unwrap_or(u16::MAX);
    buf[start..start + 2].copy_from_slice(&len16.to_ne_bytes());
    buf.resize(start + align4(len), 0);
    r
}

/// Patches the length of the message started at `start`.
fn finish(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// Appends a request (acked) binding queue `queue` to this socket.
pub fn build_bind(buf: &mut Vec<u8>, seq: u32, queue: u16) {
    build_cmd(buf, seq, queue, NFQNL_CFG_CMD_BIND);
}

/// Appends a request (acked) unbinding queue `queue`.
pub fn build_unbind(buf: &mut Vec<u8>, seq: u32, queue: u16) {
    build_cmd(buf, seq, queue, NFQNL_CFG_CMD_UNBIND);
}

fn build_cmd(buf: &mut Vec<u8>, seq: u32, queue: u16, cmd: u8) {
    let start = begin(buf, NFQNL_MSG_CONFIG, NLM_F_ACK, seq, queue);
    // struct nfqnl_msg_config_cmd { __u8 command; __u8 _pad; __be16 pf; }
    attr(buf, NFQA_CFG_CMD, &[cmd, 0, 0, 0]);
    finish(buf, start);
}

/// Appends a request (acked) configuring queue `queue`: copy the packet up to
/// `copy_range` bytes, hold at most `max_len` packets, and set exactly the
/// queue flags in `flags` (every flag this module knows is in the mask, so a
/// flag left out is cleared: [`NFQA_CFG_F_FAIL_OPEN`] is never on by accident).
pub fn build_params(
    buf: &mut Vec<u8>,
    seq: u32,
    queue: u16,
    copy_range: u32,
    max_len: u32,
    flags: u32,
) {
    let start = begin(buf, NFQNL_MSG_CONFIG, NLM_F_ACK, seq, queue);
    // struct nfqnl_msg_config_params { __be32 copy_range; __u8 copy_mode; } __packed
    let mut params = [0u8; 5];
    params[..4].copy_from_slice(&copy_range.to_be_bytes());
    params[4] = NFQNL_COPY_PACKET;
    attr(buf, NFQA_CFG_PARAMS, &params);
    attr(buf, NFQA_CFG_QUEUE_MAXLEN, &max_len.to_be_bytes());
    attr(buf, NFQA_CFG_FLAGS, &flags.to_be_bytes());
    attr(
        buf,
        NFQA_CFG_MASK,
        &(NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO).to_be_bytes(),
    );
    finish(buf, start);
}

fn verdict_hdr(verdict: Verdict, id: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&verdict.code().to_be_bytes());
    h[4..].copy_from_slice(&id.to_be_bytes());
    h
}

/// Appends a verdict for packet `id` of queue `queue` (not acked: errors still
/// come back as [`Message::Error`]).
pub fn build_verdict(buf: &mut Vec<u8>, queue: u16, id: u32, verdict: Verdict) {
    let start = begin(buf, NFQNL_MSG_VERDICT, 0, 0, queue);
    attr(buf, NFQA_VERDICT_HDR, &verdict_hdr(verdict, id));
    finish(buf, start);
}

/// Appends an accept verdict for packet `id` whose payload is replaced by
/// what `write` appends to the buffer (the whole new packet from its IPv4
/// header). If `write` fails, the buffer is restored and the error returned.
/// The new payload must not exceed 65,535 bytes (the kernel rejects it).
pub fn try_build_verdict_with_payload<E>(
    buf: &mut Vec<u8>,
    queue: u16,
    id: u32,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<(), E> {
    let rollback = buf.len();
    let start = begin(buf, NFQNL_MSG_VERDICT, 0, 0, queue);
    attr(buf, NFQA_VERDICT_HDR, &verdict_hdr(Verdict::Accept, id));
    let r = attr_with(buf, NFQA_PAYLOAD, write);
    if r.is_err() {
        buf.truncate(rollback);
        return r;
    }
    finish(buf, start);
    Ok(())
}

/// Appends a batch verdict: every packet of `queue` with an id up to and
/// including `upto_id` that is still queued gets `verdict`, in id order.
pub fn build_verdict_batch(buf: &mut Vec<u8>, queue: u16, upto_id: u32, verdict: Verdict) {
    let start = begin(buf, NFQNL_MSG_VERDICT_BATCH, 0, 0, queue);
    attr(buf, NFQA_VERDICT_HDR, &verdict_hdr(verdict, upto_id));
    finish(buf, start);
}

/// One line of `/proc/net/netfilter/nfnetlink_queue`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct QueueStats {
    /// Queue number.
    pub queue: u16,
    /// Netlink port id of the listening socket.
    pub portid: u32,
    /// Packets currently queued (waiting for a verdict).
    pub queued: u32,
    /// Copy mode (2 = packet).
    pub copy_mode: u8,
    /// Copy range.
    pub copy_range: u32,
    /// Packets dropped because the queue was full.
    pub queue_dropped: u64,
    /// Packets dropped because delivery to userspace failed (socket buffer full).
    pub user_dropped: u64,
    /// Last packet id handed out.
    pub id_sequence: u32,
}

/// Parses the text of `/proc/net/netfilter/nfnetlink_queue`; lines that do not
/// parse are skipped.
pub fn parse_queue_stats(text: &str) -> Vec<QueueStats> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            Some(QueueStats {
                queue: f[0].parse().ok()?,
                portid: f[1].parse().ok()?,
                queued: f[2].parse().ok()?,
                copy_mode: f[3].parse().ok()?,
                copy_range: f[4].parse().ok()?,
                queue_dropped: f[5].parse().ok()?,
                user_dropped: f[6].parse().ok()?,
                id_sequence: f[7].parse().ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a kernel-style packet message for tests.
    fn packet_message(queue: u16, id: u32, payload: &[u8], skb_info: Option<u32>) -> Vec<u8> {
        let mut buf = Vec::new();
        let start = begin(&mut buf, NFQNL_MSG_PACKET, 0, 0, queue);
        let mut hdr = [0u8; 7];
        hdr[..4].copy_from_slice(&id.to_be_bytes());
        hdr[4..6].copy_from_slice(&0x0800u16.to_be_bytes());
        hdr[6] = 2;
        attr(&mut buf, NFQA_PACKET_HDR, &hdr);
        attr(&mut buf, NFQA_IFINDEX_INDEV, &7u32.to_be_bytes());
        if let Some(info) = skb_info {
            attr(&mut buf, NFQA_SKB_INFO, &info.to_be_bytes());
        }
        attr(&mut buf, NFQA_PAYLOAD, payload);
        finish(&mut buf, start);
        buf
    }

    fn error_message(seq: u32, code: i32) -> Vec<u8> {
        let mut buf = Vec::new();
        buf.extend_from_slice(&(NLMSG_HDRLEN as u32 + 20).to_ne_bytes());
        buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        buf.extend_from_slice(&0u16.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&code.to_ne_bytes());
        buf.extend_from_slice(&[0u8; 16]);
        buf
    }

    #[test]
    fn parses_packet_with_odd_payload() {
        let payload: Vec<u8> = (0..61).collect();
        let mut dgram = packet_message(3, 0xdead_beef, &payload, Some(NFQA_SKB_GSO | 1));
        dgram.extend(error_message(9, -2));
        dgram.extend(error_message(10, 0));
        let msgs: Vec<_> = messages(&dgram).collect();
        assert_eq!(msgs.len(), 3);
        let Ok(Message::Packet(p)) = msgs[0] else {
            panic!("not a packet: {:?}", msgs[0])
        };
        assert_eq!(p.queue, 3);
        assert_eq!(p.id, 0xdead_beef);
        assert_eq!(p.hw_protocol, 0x0800);
        assert_eq!(p.hook, 2);
        assert_eq!(p.payload, &payload[..]);
        assert_eq!(p.indev, Some(7));
        assert!(p.is_gso() && p.csum_not_ready() && p.is_complete());
        assert_eq!(msgs[1], Ok(Message::Error { seq: 9, errno: 2 }));
        assert_eq!(msgs[2], Ok(Message::Ack { seq: 10 }));
    }

    #[test]
    fn cap_len_marks_truncated_copies() {
        let mut buf = Vec::new();
        let start = begin(&mut buf, NFQNL_MSG_PACKET, 0, 0, 0);
        attr(&mut buf, NFQA_PACKET_HDR, &[0, 0, 0, 1, 8, 0, 2]);
        attr(&mut buf, NFQA_CAP_LEN, &100_000u32.to_be_bytes());
        attr(&mut buf, NFQA_PAYLOAD, &[0x45; 40]);
        finish(&mut buf, start);
        let Some(Ok(Message::Packet(p))) = messages(&buf).next() else {
            panic!("no packet")
        };
        assert!(!p.is_complete());
    }

    #[test]
    fn rejects_lying_lengths_without_panicking() {
        let good = packet_message(0, 1, &[1, 2, 3, 4, 5], None);
        // Every truncation and every single-byte corruption of the length fields.
        for cut in 0..good.len() {
            let _ = messages(&good[..cut]).count();
        }
        for i in 0..good.len() {
            for v in [0u8, 1, 3, 4, 0x7f, 0xff] {
                let mut bad = good.clone();
                bad[i] = v;
                for m in messages(&bad) {
                    let _ = m;
                }
            }
        }
        let mut short = good.clone();
        short[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(matches!(
            messages(&short).next(),
            Some(Err(ParseError::BadMessageLength { .. }))
        ));
        // Attribute running past the message.
        let mut bad_attr = good.clone();
        let at = NLMSG_HDRLEN + NFGENMSG_LEN;
        bad_attr[at..at + 2].copy_from_slice(&500u16.to_ne_bytes());
        assert_eq!(
            messages(&bad_attr).next(),
            Some(Err(ParseError::BadAttribute { offset: 0 }))
        );
        // No packet header.
        let mut buf = Vec::new();
        let start = begin(&mut buf, NFQNL_MSG_PACKET, 0, 0, 0);
        attr(&mut buf, NFQA_PAYLOAD, &[1]);
        finish(&mut buf, start);
        assert_eq!(
            messages(&buf).next(),
            Some(Err(ParseError::MissingPacketHeader))
        );
    }

    #[test]
    fn builds_config_messages() {
        let mut buf = Vec::new();
        build_bind(&mut buf, 5, 0x0102);
        assert_eq!(buf.len(), NLMSG_HDRLEN + NFGENMSG_LEN + 8);
        assert_eq!(u32_ne(&buf, 0), Some(buf.len() as u32));
        assert_eq!(u16_ne(&buf, 4), Some(0x0302));
        assert_eq!(u16_ne(&buf, 6), Some(NLM_F_REQUEST | NLM_F_ACK));
        assert_eq!(u32_ne(&buf, 8), Some(5));
        assert_eq!(&buf[18..20], &[0x01, 0x02]); // res_id big-endian
        assert_eq!(&buf[24..28], &[NFQNL_CFG_CMD_BIND, 0, 0, 0]);

        let mut p = Vec::new();
        build_params(&mut p, 6, 1, MAX_COPY_RANGE, 65_536, NFQA_CFG_F_GSO);
        // header 20 + params(4+5 -> 12) + maxlen 8 + flags 8 + mask 8
        assert_eq!(p.len(), 20 + 12 + 8 + 8 + 8);
        assert_eq!(u32_ne(&p, 0), Some(p.len() as u32));
        assert_eq!(u16_ne(&p, 20), Some(9)); // unpadded attribute length
        assert_eq!(&p[24..29], &[0, 0, 0xff, 0xff, NFQNL_COPY_PACKET]);
        assert_eq!(&p[36..40], &65_536u32.to_be_bytes());
        assert_eq!(&p[44..48], &NFQA_CFG_F_GSO.to_be_bytes());
        assert_eq!(&p[52..56], &5u32.to_be_bytes()); // mask: fail-open + gso
    }

    #[test]
    fn builds_verdicts_back_to_back() {
        let mut buf = Vec::new();
        build_verdict(&mut buf, 2, 41, Verdict::Drop);
        let first = buf.len();
        assert_eq!(first, 20 + 12);
        try_build_verdict_with_payload::<()>(&mut buf, 2, 42, |b| {
            b.extend_from_slice(&[9; 5]);
            Ok(())
        })
        .unwrap();
        let second = buf.len();
        assert_eq!(second - first, 20 + 12 + 12);
        assert_eq!(u32_ne(&buf, first), Some((second - first) as u32));
        assert_eq!(u16_ne(&buf, first + 32), Some(9)); // payload attr len 4 + 5
        build_verdict_batch(&mut buf, 2, 99, Verdict::Accept);
        assert_eq!(u16_ne(&buf, second + 4), Some(0x0303));
        assert_eq!(&buf[second + 24..second + 32], &[0, 0, 0, 1, 0, 0, 0, 99]);
        // A failing writer leaves the buffer as it was.
        let before = buf.clone();
        let r = try_build_verdict_with_payload(&mut buf, 2, 43, |b| {
            b.push(1);
            Err("nope")
        });
        assert_eq!(r, Err("nope"));
        assert_eq!(buf, before);
    }

    #[test]
    fn parses_proc_stats() {
        let text = "    0  23456     5 2 65535     7     9       42  1\n  garbage\n\
                    65535  1     0 2 65535     0     0        0  1\n";
        let s = parse_queue_stats(text);
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[0],
            QueueStats {
                queue: 0,
                portid: 23456,
                queued: 5,
                copy_mode: 2,
                copy_range: 65535,
                queue_dropped: 7,
                user_dropped: 9,
                id_sequence: 42
            }
        );
        assert_eq!(s[1].queue, 65535);
    }
}
