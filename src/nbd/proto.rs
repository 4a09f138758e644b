//! NBD wire format and option negotiation, sans-I/O.
//!
//! Everything here is pure: constants of the NBD protocol (fixed newstyle handshake,
//! the `INFO` extension's `NBD_OPT_INFO`/`NBD_OPT_GO`, simple replies), decoders for
//! what a client sends (option headers, option data, request headers), the validation
//! of a request against an export (range, flags, payload limits) and encoders for what
//! the server sends. The driver (`conn.rs`) only moves bytes.
//!
//! Decoders never panic on any input; a property test feeds them random bytes.

use std::fmt;
use std::io;

// ---------------------------------------------------------------------------
// Magic numbers and sizes
// ---------------------------------------------------------------------------

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic, also the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Length of the server's greeting (`NBDMAGIC`, `IHAVEOPT`, handshake flags).
pub const GREETING_LEN: usize = 18;
/// Length of a client option header (magic, option, data length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header (magic, option, reply type, data length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of a (compact) request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// Largest READ/WRITE payload the server accepts (the de-facto limit of qemu and nbdkit,
/// advertised as the maximum block size). Larger reads get `EINVAL`; larger writes get
/// `EINVAL` and a hard disconnect (their payload is not read).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Longest string (export name) the spec allows.
pub const MAX_STRING: usize = 4096;
/// Largest option data the server reads; a client that announces more is disconnected
/// (no option this server knows needs more: a GO with a 4 KiB name and 4096 info requests).
pub const MAX_OPTION_DATA: u32 = 16 * 1024;

// ---------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------

/// Handshake flag: server supports fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: MUST always be set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: rotational medium.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` supported (structured replies only).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: FLUSH/FUA on one connection cover writes of all connections.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_CACHE` supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// The transmission flags this server advertises for every export: flush, FUA, trim,
/// write-zeroes and multi-conn (see the multi-conn argument in [`crate::nbd`]).
pub const SERVER_TRANSMISSION_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_CAN_MULTI_CONN;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (WRITE_ZEROES): do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (READ): do not fragment a structured reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (BLOCK_STATUS): one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (WRITE_ZEROES): fail fast if zeroing is slow.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---------------------------------------------------------------------------
// Options, option replies, info types
// ---------------------------------------------------------------------------

/// Option: choose export and enter transmission (cannot report errors).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: start TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: extended headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: success / end of list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export (to `NBD_OPT_LIST`).
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of export information (to INFO/GO).
pub const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
/// Option error: option unknown to this server.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Option error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// Option error: syntactically invalid.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// Option error: TLS required.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
/// Option error: export unknown.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// Option error: server shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
/// Option error: request too big.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// Info type: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info type: canonical name.
pub const INFO_NAME: u16 = 1;
/// Info type: description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------
// Commands and errors
// ---------------------------------------------------------------------------

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (carries a payload).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: cache (prefetch).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// NBD error: operation not permitted.
pub const EPERM: u32 = 1;
/// NBD error: input/output error.
pub const EIO: u32 = 5;
/// NBD error: out of memory.
pub const ENOMEM: u32 = 12;
/// NBD error: invalid argument.
pub const EINVAL: u32 = 22;
/// NBD error: no space left (writes past the end).
pub const ENOSPC: u32 = 28;
/// NBD error: value too large.
pub const EOVERFLOW: u32 = 75;
/// NBD error: operation not supported.
pub const ENOTSUP: u32 = 95;
/// NBD error: server shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Maps a backend error to one of the error values the NBD spec allows.
///
/// `EDQUOT`/`EFBIG` become `ENOSPC` as the spec asks; anything unknown becomes `EIO`.
pub fn errno_for(err: &io::Error) -> u32 {
    if let Some(code) = err.raw_os_error() {
        return match code {
            libc::EPERM | libc::EACCES | libc::EROFS => EPERM,
            libc::ENOMEM => ENOMEM,
            libc::EINVAL => EINVAL,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
            libc::EOVERFLOW => EOVERFLOW,
            libc::EOPNOTSUPP => ENOTSUP,
            libc::ESHUTDOWN => ESHUTDOWN,
            _ => EIO,
        };
    }
    match err.kind() {
        io::ErrorKind::InvalidInput => EINVAL,
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => EPERM,
        io::ErrorKind::OutOfMemory => ENOMEM,
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge => {
            ENOSPC
        }
        io::ErrorKind::Unsupported => ENOTSUP,
        _ => EIO,
    }
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// Why bytes from the client could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the fixed-size structure needs.
    #[error("short buffer: need {need} bytes, have {have}")]
    Short {
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        have: usize,
    },
    /// The magic number is wrong (the stream cannot be resynchronised).
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes(s.try_into().ok()?))
}
fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(s.try_into().ok()?))
}
fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    Some(u64::from_be_bytes(s.try_into().ok()?))
}

fn short(need: usize, have: usize) -> DecodeError {
    DecodeError::Short { need, have }
}

/// Decodes the client flags (4 bytes) sent after the greeting.
///
/// Returns `None` when the client sets a flag the server did not advertise; the spec
/// then requires the server to drop the connection.
pub fn decode_client_flags(buf: &[u8]) -> Result<Option<u32>, DecodeError> {
    let flags = be_u32(buf, 0).ok_or(short(4, buf.len()))?;
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Ok(None);
    }
    Ok(Some(flags))
}

/// A client option header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number (`OPT_*`).
    pub option: u32,
    /// Length of the option data that follows.
    pub length: u32,
}

/// Decodes a 16-byte option header.
pub fn decode_option_header(buf: &[u8]) -> Result<OptionHeader, DecodeError> {
    let (Some(magic), Some(option), Some(length)) =
        (be_u64(buf, 0), be_u32(buf, 8), be_u32(buf, 12))
    else {
        return Err(short(OPTION_HEADER_LEN, buf.len()));
    };
    if magic != IHAVEOPT {
        return Err(DecodeError::BadMagic(magic));
    }
    Ok(OptionHeader { option, length })
}

/// The data of an `NBD_OPT_INFO` or `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name (may be empty: the default export).
    pub name: String,
    /// Info types the client asks for (`INFO_*`).
    pub info_requests: Vec<u16>,
}

/// Why option data was rejected (becomes `NBD_REP_ERR_INVALID` with this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidOption(pub &'static str);

/// Validates an export name: at most [`MAX_STRING`] bytes, UTF-8, no NUL.
pub fn parse_name(bytes: &[u8]) -> Result<String, InvalidOption> {
    if bytes.len() > MAX_STRING {
        return Err(InvalidOption("export name longer than 4096 bytes"));
    }
    if bytes.contains(&0) {
        return Err(InvalidOption("export name contains NUL"));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| InvalidOption("export name is not UTF-8"))
}

/// Parses the data of `NBD_OPT_INFO`/`NBD_OPT_GO`:
/// `u32 name length, name, u16 count, count * u16 info type`.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, InvalidOption> {
    let too_short = InvalidOption("option data too short");
    let name_len = be_u32(data, 0).ok_or(too_short.clone())? as usize;
    let name_end = 4usize.checked_add(name_len).ok_or(too_short.clone())?;
    let name_bytes = data.get(4..name_end).ok_or(too_short.clone())?;
    let count = be_u16(data, name_end).ok_or(too_short)? as usize;
    let rest = data.get(name_end + 2..).unwrap_or(&[]);
    if rest.len() != count * 2 {
        return Err(InvalidOption(
            "info request count does not match option length",
        ));
    }
    let name = parse_name(name_bytes)?;
    let info_requests = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoRequest {
        name,
        info_requests,
    })
}

/// A transmission request header as sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub kind: u16,
    /// Opaque handle, echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (payload length for WRITE).
    pub length: u32,
}

/// Decodes a 28-byte request header.
pub fn decode_request_header(buf: &[u8]) -> Result<RequestHeader, DecodeError> {
    let (Some(magic), Some(flags), Some(kind), Some(handle), Some(offset), Some(length)) = (
        be_u32(buf, 0),
        be_u16(buf, 4),
        be_u16(buf, 6),
        be_u64(buf, 8),
        be_u64(buf, 16),
        be_u32(buf, 24),
    ) else {
        return Err(short(REQUEST_HEADER_LEN, buf.len()));
    };
    if magic != REQUEST_MAGIC {
        return Err(DecodeError::BadMagic(u64::from(magic)));
    }
    Ok(RequestHeader {
        flags,
        kind,
        handle,
        offset,
        length,
    })
}

// ---------------------------------------------------------------------------
// Request validation
// ---------------------------------------------------------------------------

/// What the server knows about an export when validating a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags advertised for it.
    pub flags: u16,
}

/// A validated command, ready for the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
    },
    /// Write the `len`-byte payload (which follows the header) at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Payload length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Write `len` zero bytes at `offset`.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Discard `len` bytes at `offset`.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Make every write replied to so far (on any connection) durable.
    Flush,
    /// Finish in-flight requests and close (no reply).
    Disconnect,
}

/// What to do with the bytes that follow a rejected request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// No payload follows.
    None,
    /// A payload of this many bytes follows: read and drop it, then carry on.
    Discard(u32),
    /// A payload too large to skip follows: send the error, then hard-disconnect.
    Disconnect,
}

/// A request the server answers with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// NBD error value for the reply.
    pub error: u32,
    /// What follows the header.
    pub payload: Payload,
}

fn allowed_flags(kind: u16, export_flags: u16) -> u16 {
    let fua = if export_flags & FLAG_SEND_FUA != 0 {
        CMD_FLAG_FUA
    } else {
        0
    };
    match kind {
        CMD_WRITE_ZEROES => {
            let fast = if export_flags & FLAG_SEND_FAST_ZERO != 0 {
                CMD_FLAG_FAST_ZERO
            } else {
                0
            };
            fua | CMD_FLAG_NO_HOLE | fast
        }
        _ => fua,
    }
}

/// Validates a request header against an export.
///
/// Rules (NBD spec "Error values" and request types):
/// - unknown command, unknown or inapplicable flag, command not advertised: `EINVAL`;
/// - write-type command on a read-only export: `EPERM`;
/// - READ or TRIM past the end: `EINVAL`; WRITE or WRITE_ZEROES past the end: `ENOSPC`;
/// - READ longer than [`MAX_PAYLOAD`]: `EINVAL`; WRITE longer than that: `EINVAL` and
///   hard disconnect (its payload is never read);
/// - any rejected WRITE within the payload limit has its payload discarded, so the
///   stream stays in sync.
///
/// FLUSH and DISC ignore offset and length (the spec says they MUST be zero; being
/// lenient costs nothing).
pub fn validate_request(h: &RequestHeader, export: &ExportInfo) -> Result<Command, Rejection> {
    let payload = if h.kind == CMD_WRITE {
        if h.length > MAX_PAYLOAD {
            return Err(Rejection {
                error: EINVAL,
                payload: Payload::Disconnect,
            });
        }
        Payload::Discard(h.length)
    } else {
        Payload::None
    };
    let reject = |error| Err(Rejection { error, payload });

    let advertised = match h.kind {
        CMD_READ | CMD_WRITE | CMD_DISC => true,
        CMD_FLUSH => export.flags & FLAG_SEND_FLUSH != 0,
        CMD_TRIM => export.flags & FLAG_SEND_TRIM != 0,
        CMD_WRITE_ZEROES => export.flags & FLAG_SEND_WRITE_ZEROES != 0,
        _ => false,
    };
    if !advertised {
        return reject(EINVAL);
    }
    if h.flags & !allowed_flags(h.kind, export.flags) != 0 {
        return reject(EINVAL);
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && export.flags & FLAG_READ_ONLY != 0 {
        return reject(EPERM);
    }
    let in_range = h
        .offset
        .checked_add(u64::from(h.length))
        .is_some_and(|end| end <= export.size);
    let (offset, len) = (h.offset, h.length);
    match h.kind {
        CMD_READ => {
            if len > MAX_PAYLOAD || !in_range {
                return reject(EINVAL);
            }
            Ok(Command::Read { offset, len })
        }
        CMD_WRITE => {
            if !in_range {
                return reject(ENOSPC);
            }
            Ok(Command::Write { offset, len, fua })
        }
        CMD_WRITE_ZEROES => {
            if !in_range {
                return reject(ENOSPC);
            }
            Ok(Command::WriteZeroes { offset, len, fua })
        }
        CMD_TRIM => {
            if !in_range {
                return reject(EINVAL);
            }
            Ok(Command::Trim { offset, len, fua })
        }
        CMD_FLUSH => Ok(Command::Flush),
        CMD_DISC => Ok(Command::Disconnect),
        _ => reject(EINVAL),
    }
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// The server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags (fixed newstyle, no zeroes).
pub fn encode_greeting() -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Appends one option reply (header + data) to `out`.
pub fn push_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    // Option data we send is bounded by MAX_STRING-sized names and fixed structs.
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
}

/// `NBD_REP_INFO` payload for `NBD_INFO_EXPORT`.
pub fn info_export(info: &ExportInfo) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&info.size.to_be_bytes());
    b[10..12].copy_from_slice(&info.flags.to_be_bytes());
    b
}

/// `NBD_REP_INFO` payload for `NBD_INFO_BLOCK_SIZE` (minimum 1: any alignment works).
pub fn info_block_size() -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&1u32.to_be_bytes());
    b[6..10].copy_from_slice(&PREFERRED_BLOCK_SIZE.to_be_bytes());
    b[10..14].copy_from_slice(&MAX_PAYLOAD.to_be_bytes());
    b
}

/// Reply to a successful `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes unless
/// the client negotiated `NBD_FLAG_C_NO_ZEROES`.
pub fn encode_export_name_reply(info: &ExportInfo, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&info.size.to_be_bytes());
    b.extend_from_slice(&info.flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

/// A simple reply header (the READ payload, if any, follows it).
pub fn encode_simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A request header (used by tests and raw clients).
pub fn encode_request_header(h: &RequestHeader) -> [u8; REQUEST_HEADER_LEN] {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.kind.to_be_bytes());
    b[8..16].copy_from_slice(&h.handle.to_be_bytes());
    b[16..24].copy_from_slice(&h.offset.to_be_bytes());
    b[24..28].copy_from_slice(&h.length.to_be_bytes());
    b
}

/// A whole request as a client sends it: the header, then `payload` (a write's data).
/// The client side, for tests and raw clients.
pub fn encode_request(
    kind: u16,
    flags: u16,
    handle: u64,
    offset: u64,
    length: u32,
    payload: &[u8],
) -> Vec<u8> {
    let h = RequestHeader {
        flags,
        kind,
        handle,
        offset,
        length,
    };
    let mut b = encode_request_header(&h).to_vec();
    b.extend_from_slice(payload);
    b
}

/// `(error, handle)` of a simple reply header: the client side of
/// [`encode_simple_reply`], for tests and raw clients.
pub fn decode_simple_reply(buf: &[u8; SIMPLE_REPLY_LEN]) -> Result<(u32, u64), DecodeError> {
    let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(DecodeError::BadMagic(magic.into()));
    }
    let mut handle = [0u8; 8];
    handle.copy_from_slice(&buf[8..16]);
    Ok((
        u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
        u64::from_be_bytes(handle),
    ))
}

/// An option as a client sends it (`IHAVEOPT`, option, length, data); with
/// [`encode_go_data`] for `NBD_OPT_GO`. For tests and raw clients.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// The data of `NBD_OPT_GO` for export `name`, with no information requests.
pub fn encode_go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

// ---------------------------------------------------------------------------
// Option negotiation
// ---------------------------------------------------------------------------

/// The server's exports as seen by option negotiation.
pub trait ExportCatalog {
    /// What the driver needs to serve a chosen export (e.g. an `Arc` of the backend).
    type Handle;
    /// Resolves a client-supplied name to (canonical name, info, handle). The empty name
    /// is the default export.
    fn resolve(&self, name: &str) -> Option<(String, ExportInfo, Self::Handle)>;
    /// Names of all exports (for `NBD_OPT_LIST`).
    fn names(&self) -> Vec<String>;
}

/// What the driver does after one option.
pub enum OptionAction<H> {
    /// Send these bytes and read the next option.
    Reply(Vec<u8>),
    /// Send these bytes and close the connection (`NBD_OPT_ABORT`).
    ReplyAndClose(Vec<u8>),
    /// Send these bytes and enter transmission on this export.
    Enter {
        /// Bytes to send first.
        reply: Vec<u8>,
        /// Canonical export name.
        name: String,
        /// Export information.
        info: ExportInfo,
        /// Driver's handle.
        handle: H,
    },
    /// Close without a reply (`NBD_OPT_EXPORT_NAME` of an unknown export: the spec
    /// gives no way to report the error).
    Close,
}

impl<H> fmt::Debug for OptionAction<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Reply(b) => write!(f, "Reply({} bytes)", b.len()),
            Self::ReplyAndClose(b) => write!(f, "ReplyAndClose({} bytes)", b.len()),
            Self::Enter { name, info, .. } => write!(f, "Enter({name:?}, {info:?})"),
            Self::Close => write!(f, "Close"),
        }
    }
}

fn error_reply(option: u32, reply_type: u32, message: &str) -> Vec<u8> {
    let mut out = Vec::new();
    push_option_reply(&mut out, option, reply_type, message.as_bytes());
    out
}

/// Handles one option (header already decoded, data fully read).
///
/// Supported: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`. Everything else (including
/// `STRUCTURED_REPLY`, `STARTTLS`, metadata contexts and extended headers) gets
/// `NBD_REP_ERR_UNSUP`, so only simple replies are ever used.
pub fn negotiate_option<C: ExportCatalog>(
    option: u32,
    data: &[u8],
    no_zeroes: bool,
    catalog: &C,
) -> OptionAction<C::Handle> {
    match option {
        OPT_EXPORT_NAME => {
            let Ok(name) = parse_name(data) else {
                return OptionAction::Close;
            };
            match catalog.resolve(&name) {
                Some((name, info, handle)) => OptionAction::Enter {
                    reply: encode_export_name_reply(&info, no_zeroes),
                    name,
                    info,
                    handle,
                },
                None => OptionAction::Close,
            }
        }
        OPT_ABORT => {
            let mut out = Vec::new();
            push_option_reply(&mut out, option, REP_ACK, &[]);
            OptionAction::ReplyAndClose(out)
        }
        OPT_LIST => {
            if !data.is_empty() {
                return OptionAction::Reply(error_reply(
                    option,
                    REP_ERR_INVALID,
                    "NBD_OPT_LIST takes no data",
                ));
            }
            let mut out = Vec::new();
            for name in catalog.names() {
                let mut d = Vec::with_capacity(4 + name.len());
                d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                d.extend_from_slice(name.as_bytes());
                push_option_reply(&mut out, option, REP_SERVER, &d);
            }
            push_option_reply(&mut out, option, REP_ACK, &[]);
            OptionAction::Reply(out)
        }
        OPT_INFO | OPT_GO => {
            let req = match parse_info_request(data) {
                Ok(r) => r,
                Err(InvalidOption(msg)) => {
                    return OptionAction::Reply(error_reply(option, REP_ERR_INVALID, msg))
                }
            };
            let Some((name, info, handle)) = catalog.resolve(&req.name) else {
                return OptionAction::Reply(error_reply(option, REP_ERR_UNKNOWN, "no such export"));
            };
            let mut out = Vec::new();
            if req.info_requests.contains(&INFO_NAME) {
                let mut d = INFO_NAME.to_be_bytes().to_vec();
                d.extend_from_slice(name.as_bytes());
                push_option_reply(&mut out, option, REP_INFO, &d);
            }
            // Block sizes are always sent: they tell the client the 32 MiB maximum.
            push_option_reply(&mut out, option, REP_INFO, &info_block_size());
            push_option_reply(&mut out, option, REP_INFO, &info_export(&info));
            push_option_reply(&mut out, option, REP_ACK, &[]);
            if option == OPT_GO {
                OptionAction::Enter {
                    reply: out,
                    name,
                    info,
                    handle,
                }
            } else {
                OptionAction::Reply(out)
            }
        }
        _ => OptionAction::Reply(error_reply(option, REP_ERR_UNSUP, "option not supported")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Catalog(Vec<(String, ExportInfo)>);
    impl ExportCatalog for Catalog {
        type Handle = usize;
        fn resolve(&self, name: &str) -> Option<(String, ExportInfo, usize)> {
            if name.is_empty() && self.0.len() == 1 {
                return Some((self.0[0].0.clone(), self.0[0].1, 0));
            }
            self.0
                .iter()
                .position(|(n, _)| n == name)
                .map(|i| (self.0[i].0.clone(), self.0[i].1, i))
        }
        fn names(&self) -> Vec<String> {
            self.0.iter().map(|(n, _)| n.clone()).collect()
        }
    }

    const DISK: ExportInfo = ExportInfo {
        size: 1 << 20,
        flags: SERVER_TRANSMISSION_FLAGS,
    };

    fn catalog() -> Catalog {
        Catalog(vec![
            ("disk0".into(), DISK),
            ("disk1".into(), ExportInfo { size: 4096, ..DISK }),
        ])
    }

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// Splits a byte string of option replies into (option, type, data).
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            assert_eq!(be_u64(b, 0), Some(OPTION_REPLY_MAGIC));
            let opt = be_u32(b, 8).unwrap();
            let ty = be_u32(b, 12).unwrap();
            let len = be_u32(b, 16).unwrap() as usize;
            out.push((opt, ty, b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        out
    }

    fn hdr(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            handle: 7,
            offset,
            length,
        }
    }

    #[test]
    fn greeting_is_fixed_newstyle_no_zeroes() {
        let g = encode_greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
    }

    #[test]
    fn client_flags_reject_unknown_bits() {
        assert_eq!(decode_client_flags(&3u32.to_be_bytes()), Ok(Some(3)));
        assert_eq!(decode_client_flags(&0u32.to_be_bytes()), Ok(Some(0)));
        assert_eq!(decode_client_flags(&4u32.to_be_bytes()), Ok(None));
        assert!(decode_client_flags(&[0, 0]).is_err());
    }

    #[test]
    fn option_header_roundtrip_and_bad_magic() {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&OPT_GO.to_be_bytes());
        b.extend_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            decode_option_header(&b),
            Ok(OptionHeader {
                option: OPT_GO,
                length: 9
            })
        );
        b[0] ^= 1;
        assert!(matches!(
            decode_option_header(&b),
            Err(DecodeError::BadMagic(_))
        ));
        assert!(matches!(
            decode_option_header(&b[..15]),
            Err(DecodeError::Short { .. })
        ));
    }

    #[test]
    fn request_header_roundtrip() {
        let h = RequestHeader {
            flags: 1,
            kind: CMD_WRITE,
            handle: 0xdead_beef,
            offset: 4096,
            length: 512,
        };
        let b = encode_request_header(&h);
        assert_eq!(decode_request_header(&b), Ok(h));
        let mut bad = b;
        bad[3] = 0;
        assert!(matches!(
            decode_request_header(&bad),
            Err(DecodeError::BadMagic(_))
        ));
    }

    #[test]
    fn info_request_parsing() {
        let d = go_data("disk0", &[INFO_NAME, INFO_BLOCK_SIZE]);
        assert_eq!(
            parse_info_request(&d),
            Ok(InfoRequest {
                name: "disk0".into(),
                info_requests: vec![1, 3]
            })
        );
        // count disagrees with length
        let mut bad = d.clone();
        bad.push(0);
        assert!(parse_info_request(&bad).is_err());
        // name length beyond data
        let mut bad = d;
        bad[3] = 200;
        assert!(parse_info_request(&bad).is_err());
        assert!(parse_info_request(&go_data("a\0b", &[])).is_err());
        assert!(parse_info_request(&go_data(&"x".repeat(4097), &[])).is_err());
    }

    #[test]
    fn go_known_export_enters_with_info() {
        let action = negotiate_option(OPT_GO, &go_data("disk1", &[INFO_NAME]), true, &catalog());
        let OptionAction::Enter {
            reply,
            name,
            info,
            handle,
        } = action
        else {
            panic!("{action:?}")
        };
        assert_eq!((name.as_str(), info.size, handle), ("disk1", 4096, 1));
        let r = replies(&reply);
        assert_eq!(r.len(), 4);
        assert!(r.iter().all(|(o, _, _)| *o == OPT_GO));
        assert_eq!((r[0].1, &r[0].2[2..]), (REP_INFO, &b"disk1"[..]));
        assert_eq!(r[1].2, info_block_size().to_vec());
        let exp = &r[2].2;
        assert_eq!(u16::from_be_bytes([exp[0], exp[1]]), INFO_EXPORT);
        assert_eq!(be_u64(exp, 2), Some(4096));
        assert_eq!(be_u16(exp, 10), Some(SERVER_TRANSMISSION_FLAGS));
        assert_eq!(r[3], (OPT_GO, REP_ACK, vec![]));
    }

    #[test]
    fn info_does_not_enter_and_unknown_export_errors() {
        let a = negotiate_option(OPT_INFO, &go_data("disk0", &[]), true, &catalog());
        let OptionAction::Reply(b) = a else {
            panic!("{a:?}")
        };
        assert_eq!(replies(&b).last().map(|r| r.1), Some(REP_ACK));
        let a = negotiate_option(OPT_GO, &go_data("nope", &[]), true, &catalog());
        let OptionAction::Reply(b) = a else {
            panic!("{a:?}")
        };
        assert_eq!(replies(&b)[0].1, REP_ERR_UNKNOWN);
        // default export is ambiguous with two exports
        let a = negotiate_option(OPT_GO, &go_data("", &[]), true, &catalog());
        assert!(matches!(a, OptionAction::Reply(_)));
        let a = negotiate_option(OPT_GO, &[1, 2], true, &catalog());
        let OptionAction::Reply(b) = a else {
            panic!("{a:?}")
        };
        assert_eq!(replies(&b)[0].1, REP_ERR_INVALID);
    }

    #[test]
    fn list_abort_unsupported_export_name() {
        let OptionAction::Reply(b) = negotiate_option(OPT_LIST, &[], true, &catalog()) else {
            panic!()
        };
        let r = replies(&b);
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].1, &r[0].2[4..]), (REP_SERVER, &b"disk0"[..]));
        assert_eq!(r[2].1, REP_ACK);
        assert!(matches!(
            negotiate_option(OPT_ABORT, &[], true, &catalog()),
            OptionAction::ReplyAndClose(_)
        ));
        for opt in [
            OPT_STRUCTURED_REPLY,
            OPT_STARTTLS,
            OPT_EXTENDED_HEADERS,
            999,
        ] {
            let OptionAction::Reply(b) = negotiate_option(opt, &[], true, &catalog()) else {
                panic!()
            };
            assert_eq!(replies(&b)[0].1, REP_ERR_UNSUP);
        }
        let a = negotiate_option(OPT_EXPORT_NAME, b"disk0", false, &catalog());
        let OptionAction::Enter { reply, .. } = a else {
            panic!()
        };
        assert_eq!(reply.len(), 8 + 2 + 124);
        assert!(matches!(
            negotiate_option(OPT_EXPORT_NAME, b"nope", false, &catalog()),
            OptionAction::Close
        ));
    }

    #[test]
    fn validation_ranges_and_errors() {
        let e = DISK;
        let ok = |h| validate_request(&h, &e);
        assert_eq!(
            ok(hdr(CMD_READ, 0, 0, 4096)),
            Ok(Command::Read {
                offset: 0,
                len: 4096
            })
        );
        assert_eq!(
            ok(hdr(CMD_WRITE, CMD_FLAG_FUA, (1 << 20) - 512, 512)),
            Ok(Command::Write {
                offset: (1 << 20) - 512,
                len: 512,
                fua: true
            })
        );
        // past the end
        assert_eq!(
            ok(hdr(CMD_READ, 0, 1 << 20, 1)),
            Err(Rejection {
                error: EINVAL,
                payload: Payload::None
            })
        );
        assert_eq!(
            ok(hdr(CMD_WRITE, 0, 1 << 20, 512)),
            Err(Rejection {
                error: ENOSPC,
                payload: Payload::Discard(512)
            })
        );
        assert_eq!(
            ok(hdr(CMD_WRITE_ZEROES, 0, u64::MAX, 512)).map_err(|r| r.error),
            Err(ENOSPC)
        );
        assert_eq!(
            ok(hdr(CMD_TRIM, 0, u64::MAX - 1, 512)).map_err(|r| r.error),
            Err(EINVAL)
        );
        // oversize
        assert_eq!(
            ok(hdr(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1)),
            Err(Rejection {
                error: EINVAL,
                payload: Payload::Disconnect
            })
        );
        let big = ExportInfo {
            size: u64::MAX,
            ..e
        };
        assert_eq!(
            validate_request(&hdr(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &big),
            Err(Rejection {
                error: EINVAL,
                payload: Payload::None
            })
        );
        // unknown commands and flags
        for kind in [CMD_CACHE, CMD_BLOCK_STATUS, 8, 0xffff] {
            assert_eq!(
                ok(hdr(kind, 0, 0, 0)).map_err(|r| r.payload),
                Err(Payload::None)
            );
        }
        assert_eq!(
            ok(hdr(CMD_WRITE, CMD_FLAG_DF, 0, 512)),
            Err(Rejection {
                error: EINVAL,
                payload: Payload::Discard(512)
            })
        );
        assert_eq!(
            ok(hdr(CMD_READ, CMD_FLAG_NO_HOLE, 0, 512)).map_err(|r| r.error),
            Err(EINVAL)
        );
        assert_eq!(
            ok(hdr(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512)).map_err(|r| r.error),
            Err(EINVAL)
        );
        assert_eq!(
            ok(hdr(
                CMD_WRITE_ZEROES,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
                0,
                512
            )),
            Ok(Command::WriteZeroes {
                offset: 0,
                len: 512,
                fua: true
            })
        );
        // FUA on flush is accepted, flush/disc ignore offset+length
        assert_eq!(ok(hdr(CMD_FLUSH, CMD_FLAG_FUA, 5, 5)), Ok(Command::Flush));
        assert_eq!(ok(hdr(CMD_DISC, 0, 0, 0)), Ok(Command::Disconnect));
        // read-only export and unadvertised commands
        let ro = ExportInfo {
            flags: FLAG_HAS_FLAGS | FLAG_READ_ONLY,
            ..e
        };
        assert_eq!(
            validate_request(&hdr(CMD_WRITE, 0, 0, 512), &ro).map_err(|r| r.error),
            Err(EPERM)
        );
        assert_eq!(
            validate_request(&hdr(CMD_FLUSH, 0, 0, 0), &ro).map_err(|r| r.error),
            Err(EINVAL)
        );
        assert_eq!(
            validate_request(&hdr(CMD_READ, CMD_FLAG_FUA, 0, 1), &ro).map_err(|r| r.error),
            Err(EINVAL)
        );
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(
            errno_for(&io::Error::from_raw_os_error(libc::EDQUOT)),
            ENOSPC
        );
        assert_eq!(errno_for(&io::Error::from_raw_os_error(libc::EIO)), EIO);
        assert_eq!(errno_for(&io::Error::from_raw_os_error(libc::ENOENT)), EIO);
        assert_eq!(
            errno_for(&io::Error::new(io::ErrorKind::InvalidInput, "x")),
            EINVAL
        );
        assert_eq!(errno_for(&io::Error::other("x")), EIO);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_client_flags(&bytes);
            let _ = decode_option_header(&bytes);
            let _ = decode_request_header(&bytes);
            let _ = parse_info_request(&bytes);
            let _ = parse_name(&bytes);
        }

        #[test]
        fn negotiation_never_panics(option in 0u32..16, bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = negotiate_option(option, &bytes, true, &catalog());
        }

        #[test]
        fn accepted_requests_are_in_range(
            kind in 0u16..10, flags in any::<u16>(), offset in any::<u64>(), length in any::<u32>(),
            size in 0u64..(1 << 40),
        ) {
            let e = ExportInfo { size, flags: SERVER_TRANSMISSION_FLAGS };
            let h = RequestHeader { flags, kind, handle: 1, offset, length };
            match validate_request(&h, &e) {
                Ok(Command::Read { offset, len }) | Ok(Command::Write { offset, len, .. })
                | Ok(Command::Trim { offset, len, .. }) | Ok(Command::WriteZeroes { offset, len, .. }) => {
                    prop_assert!(offset + u64::from(len) <= size);
                    prop_assert!(len <= MAX_PAYLOAD || matches!(kind, CMD_TRIM | CMD_WRITE_ZEROES));
                }
                Ok(_) => {}
                Err(r) => {
                    prop_assert!(r.error != 0);
                    // A rejected write keeps the stream in sync or closes it.
                    if kind == CMD_WRITE {
                        prop_assert!(r.payload != Payload::None);
                    } else {
                        prop_assert_eq!(r.payload, Payload::None);
                    }
                }
            }
        }

        #[test]
        fn random_bytes_as_go_data(name in "[a-z0-9]{0,20}", infos in proptest::collection::vec(any::<u16>(), 0..8)) {
            let d = go_data(&name, &infos);
            let r = parse_info_request(&d).map_err(|e| e.0);
            prop_assert_eq!(r, Ok(InfoRequest { name, info_requests: infos }));
        }
    }
}
