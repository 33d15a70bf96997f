//! NBD wire format: constants, parsers and encoders, with no I/O.
//!
//! Everything a client sends passes through a function here before the server acts on it, so
//! this is the part that is fuzzed (`fuzz/fuzz_targets/nbd_request.rs`): every parser takes
//! arbitrary bytes and returns a value or an error, never panics. The server (`handshake.rs`,
//! `transmission.rs`) only moves bytes and calls targets.
//!
//! The protocol is the fixed-newstyle NBD protocol of
//! <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>, restricted to what
//! Cairn speaks: no TLS, no structured replies, no metadata contexts, no extended headers.
//! All integers are big-endian.
//!
//! ```text
//! Greeting (server, 18 bytes)           Option request (client, 16 bytes + data)
//!  0  u64 NBDMAGIC                        0  u64 IHAVEOPT
//!  8  u64 IHAVEOPT                        8  u32 option
//! 16  u16 handshake flags                12  u32 data length
//! Client flags (client, 4 bytes)         16  data
//!  0  u32 client flags
//!
//! Option reply (server, 20 bytes + data) NBD_OPT_INFO / NBD_OPT_GO data
//!  0  u64 option reply magic              0  u32 name length n
//!  8  u32 option                          4  n bytes name
//! 12  u32 reply type                    4+n  u16 number of info requests k
//! 16  u32 data length                   6+n  k x u16 info request
//! 20  data
//!
//! Request (client, 28 bytes + payload)   Simple reply (server, 16 bytes + payload)
//!  0  u32 request magic                   0  u32 simple reply magic
//!  4  u16 command flags                   4  u32 error (0 = success)
//!  6  u16 command type                    8  u64 handle
//!  8  u64 handle                         16  payload (successful READ only)
//! 16  u64 offset
//! 24  u32 length
//! 28  payload (WRITE only)
//! ```

use std::fmt;

/// `NBDMAGIC`: first word of the greeting.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second word of the greeting and first word of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// First word of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// First word of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// First word of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Length of the greeting the server sends first.
pub const GREETING_LEN: usize = 18;
/// Length of an option request header.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Zero padding after an `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES` was agreed.
pub const EXPORT_NAME_PADDING_LEN: usize = 124;
/// Longest string (export name, description) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// The handshake flags Cairn sends.
pub const SERVER_HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

/// Client flag: the client speaks fixed newstyle.
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

/// Option: enter transmission on the named export (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: the client gives up; the server acknowledges and closes.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: start TLS (unsupported).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: structured replies (unsupported: simple replies only).
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts (unsupported).
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts (unsupported).
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: 64-bit extended headers (unsupported).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: success, or the end of a list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of an `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of information of `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub const REP_INFO: u32 = 3;
/// Option replies with this bit set are errors.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option error: unknown or unsupported option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Option error: syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Option error: not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// Option error: TLS required first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Option error: the export does not exist.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Option error: the client must request `NBD_INFO_BLOCK_SIZE` before `NBD_OPT_GO`.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Option error: the request or reply is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Information type: export size and transmission flags (mandatory before `NBD_REP_ACK`).
pub const INFO_EXPORT: u16 = 0;
/// Information type: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Information type: human description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information type: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: always set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: rotational medium.
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` (and `NBD_CMD_FLAG_NO_HOLE`) is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported (structured replies only).
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: FLUSH and FUA are visible across all connections to the export.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_CACHE` is supported.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// The transmission flags Cairn advertises for every export.
///
/// Not advertised: `SEND_FAST_ZERO`, because [`crate::target::BlockTarget`] cannot say whether
/// its `write_zeroes` is faster than a write; `SEND_DF` and `SEND_CACHE`, which need
/// structured replies or a cache hint the targets do not take. `CAN_MULTI_CONN` holds because
/// every connection to a vdisk is served on the vdisk's owner core through the same target, so
/// a FLUSH or FUA reply covers writes acknowledged on any connection.
pub const SERVER_TRANSMISSION_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN;

/// Command flag: force unit access (durable before the reply).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (`WRITE_ZEROES`): the range must be allocated, not left as a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (`READ`): do not fragment the structured reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (`BLOCK_STATUS`): one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (`WRITE_ZEROES`): fail fast unless zeroing is faster than writing.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag (extended headers): the length is a payload length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Largest payload a client may send unasked; the spec says up to 2^25 bytes SHOULD NOT be
/// treated as a denial of service even beyond the advertised maximum.
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 25;
/// Minimum block size a client that did not negotiate sizes is expected to honour (2^9).
pub const INTEROPERABLE_MIN_BLOCK: u32 = 512;
/// Largest minimum block size the spec allows.
pub const MAX_MIN_BLOCK: u32 = 1 << 16;

const _: () = assert!(SERVER_TRANSMISSION_FLAGS & TFLAG_HAS_FLAGS != 0);
const _: () = assert!(SERVER_TRANSMISSION_FLAGS & TFLAG_SEND_FAST_ZERO == 0);
const _: () = assert!(INTEROPERABLE_MIN_BLOCK.is_power_of_two());
const _: () = assert!(INTEROPERABLE_MIN_BLOCK <= MAX_MIN_BLOCK);

/// The error numbers a reply may carry (the spec restricts them to this set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Errno {
    /// `NBD_EPERM`: operation not permitted (write to a read-only export).
    Perm = 1,
    /// `NBD_EIO`: input/output error.
    Io = 5,
    /// `NBD_ENOMEM`: cannot allocate memory.
    NoMem = 12,
    /// `NBD_EINVAL`: invalid argument (misaligned, out of range reads, unknown command or flag).
    Inval = 22,
    /// `NBD_ENOSPC`: no space left (also writes past the end of the export).
    NoSpc = 28,
    /// `NBD_EOVERFLOW`: value too large.
    Overflow = 75,
    /// `NBD_ENOTSUP`: operation not supported (fast zero only).
    NotSup = 95,
    /// `NBD_ESHUTDOWN`: the server is shutting down; the client must disconnect.
    Shutdown = 108,
}

impl Errno {
    /// The value on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The error with wire value `code`, if the spec defines one.
    pub fn from_code(code: u32) -> Option<Errno> {
        Some(match code {
            1 => Errno::Perm,
            5 => Errno::Io,
            12 => Errno::NoMem,
            22 => Errno::Inval,
            28 => Errno::NoSpc,
            75 => Errno::Overflow,
            95 => Errno::NotSup,
            108 => Errno::Shutdown,
            _ => return None,
        })
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        };
        write!(f, "NBD_{name} ({})", self.code())
    }
}

/// The bytes the server sends as soon as a client connects.
pub fn encode_greeting() -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&SERVER_HANDSHAKE_FLAGS.to_be_bytes());
    out
}

/// What the client agreed to in its flags word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// The client speaks fixed newstyle (Cairn serves fixed newstyle either way).
    pub fixed_newstyle: bool,
    /// The 124 zero bytes after `NBD_OPT_EXPORT_NAME` are omitted.
    pub no_zeroes: bool,
}

/// A handshake message the server must refuse by closing the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeParseError {
    /// The client set a flag the server did not offer; the spec says to drop the connection.
    #[error("client flags {flags:#010x} include bits the server did not offer")]
    UnknownClientFlags {
        /// The flags word as received.
        flags: u32,
    },
    /// An option header did not start with `IHAVEOPT`: the stream cannot be trusted.
    #[error("option header magic is {magic:#018x}, not IHAVEOPT")]
    OptionMagic {
        /// The magic as received.
        magic: u64,
    },
}

/// Parses the client's 32-bit flags word sent after the greeting.
pub fn parse_client_flags(bytes: [u8; 4]) -> Result<ClientFlags, HandshakeParseError> {
    let flags = u32::from_be_bytes(bytes);
    let known = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;
    if flags & !known != 0 {
        return Err(HandshakeParseError::UnknownClientFlags { flags });
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & CLIENT_FLAG_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & CLIENT_FLAG_NO_ZEROES != 0,
    })
}

/// An option request header; `len` bytes of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number (`OPT_*`).
    pub option: u32,
    /// Length of the option data.
    pub len: u32,
}

/// Parses a 16-byte option request header.
pub fn parse_option_header(
    bytes: &[u8; OPTION_HEADER_LEN],
) -> Result<OptionHeader, HandshakeParseError> {
    let magic = be_u64(bytes, 0);
    if magic != IHAVEOPT {
        return Err(HandshakeParseError::OptionMagic { magic });
    }
    Ok(OptionHeader {
        option: be_u32(bytes, 8),
        len: be_u32(bytes, 12),
    })
}

/// Why option data is malformed; answered with `NBD_REP_ERR_INVALID` (the stream stays usable
/// because the option length was already consumed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OptionDataError {
    /// The data is shorter than the fixed fields of the option.
    #[error("option data of {len} bytes is shorter than the {min} bytes of fixed fields")]
    TooShort {
        /// Data length.
        len: usize,
        /// Minimum length.
        min: usize,
    },
    /// The export name length field points past the data.
    #[error("export name length {name_len} does not fit in {len} bytes of option data")]
    NameOverrun {
        /// Declared name length.
        name_len: u32,
        /// Data length.
        len: usize,
    },
    /// The declared number of information requests does not match the remaining bytes.
    #[error("{count} information requests need {need} bytes, {have} remain")]
    InfoCount {
        /// Declared count.
        count: u16,
        /// Bytes needed.
        need: usize,
        /// Bytes remaining.
        have: usize,
    },
    /// The export name is longer than the 4096 bytes the spec allows.
    #[error("export name of {len} bytes is longer than {MAX_STRING_LEN}")]
    NameTooLong {
        /// Name length.
        len: usize,
    },
    /// The export name is not UTF-8 or contains a NUL.
    #[error("export name is not a NUL-free UTF-8 string")]
    NameEncoding,
    /// The option takes no data but some was sent.
    #[error("option takes no data, {len} bytes were sent")]
    UnexpectedData {
        /// Data length.
        len: usize,
    },
}

fn parse_name(bytes: &[u8]) -> Result<&str, OptionDataError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(OptionDataError::NameTooLong { len: bytes.len() });
    }
    let name = std::str::from_utf8(bytes).map_err(|_| OptionDataError::NameEncoding)?;
    if name.contains('\0') {
        return Err(OptionDataError::NameEncoding);
    }
    Ok(name)
}

/// Parses the data of `NBD_OPT_EXPORT_NAME`: the whole data is the name.
pub fn parse_export_name(data: &[u8]) -> Result<&str, OptionDataError> {
    parse_name(data)
}

/// Checks that an option which takes no data (`NBD_OPT_LIST`) got none.
pub fn parse_empty(data: &[u8]) -> Result<(), OptionDataError> {
    if data.is_empty() {
        Ok(())
    } else {
        Err(OptionDataError::UnexpectedData { len: data.len() })
    }
}

/// The data of `NBD_OPT_INFO` or `NBD_OPT_GO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// Export name (`""` is the default export).
    pub name: &'a str,
    /// The client asked for `NBD_INFO_NAME`.
    pub wants_name: bool,
    /// The client asked for `NBD_INFO_DESCRIPTION`.
    pub wants_description: bool,
    /// The client asked for `NBD_INFO_BLOCK_SIZE`, and so promises to obey it (on `GO`).
    pub wants_block_size: bool,
}

/// Parses the data of `NBD_OPT_INFO`/`NBD_OPT_GO`; unknown information types are ignored, as
/// the spec requires, and so are duplicates.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, OptionDataError> {
    const FIXED: usize = 4 + 2;
    if data.len() < FIXED {
        return Err(OptionDataError::TooShort {
            len: data.len(),
            min: FIXED,
        });
    }
    let name_len = be_u32(data, 0);
    let name_end = usize::try_from(name_len)
        .ok()
        .and_then(|n| n.checked_add(4))
        .filter(|end| end.checked_add(2).is_some_and(|e| e <= data.len()))
        .ok_or(OptionDataError::NameOverrun {
            name_len,
            len: data.len(),
        })?;
    let name = parse_name(&data[4..name_end])?;
    let count = be_u16(data, name_end);
    let rest = &data[name_end + 2..];
    let need = usize::from(count) * 2;
    if rest.len() != need {
        return Err(OptionDataError::InfoCount {
            count,
            need,
            have: rest.len(),
        });
    }
    let mut request = InfoRequest {
        name,
        wants_name: false,
        wants_description: false,
        wants_block_size: false,
    };
    for info in rest.chunks_exact(2) {
        match u16::from_be_bytes([info[0], info[1]]) {
            INFO_NAME => request.wants_name = true,
            INFO_DESCRIPTION => request.wants_description = true,
            INFO_BLOCK_SIZE => request.wants_block_size = true,
            _ => {} // INFO_EXPORT is always sent; unknown types are ignored
        }
    }
    Ok(request)
}

/// Appends an option reply header announcing `len` bytes of reply data.
pub fn encode_option_reply_header(out: &mut Vec<u8>, option: u32, reply: u32, len: u32) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Clamps a string to the protocol's 4096-byte limit without splitting a character.
fn clamp_str(s: &str) -> &str {
    if s.len() <= MAX_STRING_LEN {
        return s;
    }
    let mut end = MAX_STRING_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).expect("option reply data is bounded by MAX_STRING_LEN")
}

/// Appends a complete option reply with `message` as its data (for errors: a human message).
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, message: &str) {
    let message = clamp_str(message);
    encode_option_reply_header(out, option, reply, len_u32(message.len()));
    out.extend_from_slice(message.as_bytes());
}

/// Appends an `NBD_REP_SERVER` reply describing one export for `NBD_OPT_LIST`.
pub fn encode_rep_server(out: &mut Vec<u8>, name: &str, description: &str) {
    let name = clamp_str(name);
    let description = clamp_str(description);
    let len = 4 + name.len() + description.len();
    encode_option_reply_header(out, OPT_LIST, REP_SERVER, len_u32(len));
    out.extend_from_slice(&len_u32(name.len()).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(description.as_bytes());
}

/// Appends an `NBD_REP_INFO` / `NBD_INFO_EXPORT` reply.
pub fn encode_info_export(out: &mut Vec<u8>, option: u32, size_bytes: u64, flags: u16) {
    encode_option_reply_header(out, option, REP_INFO, 12);
    out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
}

/// Appends an `NBD_REP_INFO` reply carrying a string (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`).
pub fn encode_info_string(out: &mut Vec<u8>, option: u32, info: u16, value: &str) {
    let value = clamp_str(value);
    encode_option_reply_header(out, option, REP_INFO, len_u32(2 + value.len()));
    out.extend_from_slice(&info.to_be_bytes());
    out.extend_from_slice(value.as_bytes());
}

/// Appends an `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE` reply.
pub fn encode_info_block_size(out: &mut Vec<u8>, option: u32, geometry: &ExportGeometry) {
    encode_option_reply_header(out, option, REP_INFO, 14);
    out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&geometry.min_block_bytes.to_be_bytes());
    out.extend_from_slice(&geometry.preferred_block_bytes.to_be_bytes());
    out.extend_from_slice(&geometry.max_payload_bytes.to_be_bytes());
}

/// Appends the reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags and, unless the client
/// agreed to `NO_ZEROES`, 124 zero bytes.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size_bytes: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_PADDING_LEN]);
    }
}

/// An export's size and block-size constraints, checked against the spec's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportGeometry {
    /// Export size in bytes.
    pub size_bytes: u64,
    /// Alignment and granularity of every request offset and length.
    pub min_block_bytes: u32,
    /// Size from which aligned I/O is efficient.
    pub preferred_block_bytes: u32,
    /// Largest READ or WRITE payload.
    pub max_payload_bytes: u32,
}

/// Block sizes the spec does not allow a server to advertise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    /// The minimum block size is not a power of two between 1 and 64 KiB.
    #[error("minimum block size {min} is not a power of two in 1..=65536")]
    MinBlock {
        /// Minimum block size.
        min: u32,
    },
    /// The preferred block size is not a power of two at least max(minimum, 512).
    #[error("preferred block size {preferred} is not a power of two >= max({min}, 512)")]
    PreferredBlock {
        /// Preferred block size.
        preferred: u32,
        /// Minimum block size.
        min: u32,
    },
    /// The maximum payload is smaller than the preferred block size.
    #[error("maximum payload {max} is smaller than the preferred block size {preferred}")]
    MaxPayload {
        /// Maximum payload.
        max: u32,
        /// Preferred block size.
        preferred: u32,
    },
}

impl ExportGeometry {
    /// Checks the constraints the spec puts on advertised block sizes.
    pub fn new(
        size_bytes: u64,
        min_block_bytes: u32,
        preferred_block_bytes: u32,
        max_payload_bytes: u32,
    ) -> Result<ExportGeometry, GeometryError> {
        let min = min_block_bytes;
        if !min.is_power_of_two() || min > MAX_MIN_BLOCK {
            return Err(GeometryError::MinBlock { min });
        }
        let preferred = preferred_block_bytes;
        if !preferred.is_power_of_two() || preferred < min.max(INTEROPERABLE_MIN_BLOCK) {
            return Err(GeometryError::PreferredBlock { preferred, min });
        }
        if max_payload_bytes < preferred {
            return Err(GeometryError::MaxPayload {
                max: max_payload_bytes,
                preferred,
            });
        }
        Ok(ExportGeometry {
            size_bytes,
            min_block_bytes,
            preferred_block_bytes,
            max_payload_bytes,
        })
    }

    /// Whether a client must acknowledge the block sizes (request `NBD_INFO_BLOCK_SIZE` in
    /// `NBD_OPT_GO`) before it may enter transmission.
    ///
    /// A client that does not negotiate sizes is expected, for interoperability, to keep to
    /// 512-byte alignment and payloads up to 2^25 bytes. An export within those bounds admits
    /// such clients (misaligned requests still get a clean `NBD_EINVAL`); an export with a
    /// larger minimum block or a smaller maximum payload refuses them with
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD` (or, for `NBD_OPT_EXPORT_NAME`, a hard disconnect), as the
    /// spec's "Size constraints" section permits.
    pub fn requires_size_negotiation(&self) -> bool {
        self.min_block_bytes > INTEROPERABLE_MIN_BLOCK
            || self.max_payload_bytes < DEFAULT_MAX_PAYLOAD
    }

    /// Longest WRITE payload the server reads and discards (to stay in sync with the stream)
    /// rather than dropping the connection: the advertised maximum, or 2^25 bytes, which the
    /// spec says must not be treated as a denial of service.
    pub fn discard_limit_bytes(&self) -> u32 {
        self.max_payload_bytes.max(DEFAULT_MAX_PAYLOAD)
    }

    /// Largest chunk a long TRIM or WRITE_ZEROES is split into: the maximum payload rounded
    /// down to the minimum block size.
    pub fn effect_chunk_bytes(&self) -> u32 {
        self.max_payload_bytes - self.max_payload_bytes % self.min_block_bytes
    }
}

/// A transmission command type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ` (0).
    Read,
    /// `NBD_CMD_WRITE` (1): `length` bytes of payload follow the header.
    Write,
    /// `NBD_CMD_DISC` (2): soft disconnect, no reply.
    Disc,
    /// `NBD_CMD_FLUSH` (3).
    Flush,
    /// `NBD_CMD_TRIM` (4).
    Trim,
    /// `NBD_CMD_CACHE` (5): not advertised.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES` (6).
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS` (7): needs structured replies, not advertised.
    BlockStatus,
    /// `NBD_CMD_RESIZE` (8): experimental, not advertised.
    Resize,
    /// Any other type.
    Unknown(u16),
}

impl Command {
    /// The command with wire type `code`.
    pub fn from_code(code: u16) -> Command {
        match code {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            8 => Command::Resize,
            other => Command::Unknown(other),
        }
    }

    /// The wire type.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Resize => 8,
            Command::Unknown(code) => code,
        }
    }
}

/// A transmission request header as received (not yet validated against the export).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type.
    pub command: Command,
    /// Opaque handle echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (the payload length for `WRITE`).
    pub len: u32,
}

/// A request header the server cannot act on and cannot skip: after it the stream is out of
/// sync, so the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request header magic is {magic:#010x}, not {REQUEST_MAGIC:#010x}")]
pub struct RequestMagicError {
    /// The magic as received.
    pub magic: u32,
}

/// Parses a 28-byte request header.
pub fn parse_request(bytes: &[u8; REQUEST_LEN]) -> Result<Request, RequestMagicError> {
    let magic = be_u32(bytes, 0);
    if magic != REQUEST_MAGIC {
        return Err(RequestMagicError { magic });
    }
    Ok(Request {
        flags: be_u16(bytes, 4),
        command: Command::from_code(be_u16(bytes, 6)),
        handle: be_u64(bytes, 8),
        offset: be_u64(bytes, 16),
        len: be_u32(bytes, 24),
    })
}

impl Request {
    /// The 28 header bytes a client sends for this request (used by tests and fuzzing).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.code().to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.len
        } else {
            0
        }
    }

    /// Checks the request against the export and says what to do.
    ///
    /// Error choices follow the spec's "Error values" section: unknown commands and flags,
    /// misalignment to the minimum block size, READ/WRITE payloads over the maximum, and reads
    /// or trims past the end get `NBD_EINVAL`; writes and write-zeroes past the end get
    /// `NBD_ENOSPC`. FLUSH ignores its reserved offset and length. A zero-length request
    /// inside the export succeeds without touching the target.
    pub fn check(&self, geometry: &ExportGeometry) -> Result<Op, Errno> {
        let fua = self.flags & CMD_FLAG_FUA != 0;
        let allowed = match self.command {
            Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            Command::Read | Command::Write | Command::Disc | Command::Flush | Command::Trim => {
                CMD_FLAG_FUA
            }
            Command::Cache | Command::BlockStatus | Command::Resize | Command::Unknown(_) => {
                return Err(Errno::Inval);
            }
        };
        if self.flags & !allowed != 0 {
            return Err(Errno::Inval);
        }
        let offset = self.offset;
        let len = self.len;
        match self.command {
            Command::Disc => return Ok(Op::Disc),
            Command::Flush => return Ok(Op::Flush),
            _ => {}
        }
        let has_payload = matches!(self.command, Command::Read | Command::Write);
        if has_payload && len > geometry.max_payload_bytes {
            return Err(Errno::Inval);
        }
        let min = u64::from(geometry.min_block_bytes);
        if !offset.is_multiple_of(min) || !u64::from(len).is_multiple_of(min) {
            return Err(Errno::Inval);
        }
        let inside = offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= geometry.size_bytes);
        if !inside {
            return Err(match self.command {
                Command::Write | Command::WriteZeroes => Errno::NoSpc,
                _ => Errno::Inval,
            });
        }
        Ok(match self.command {
            Command::Read => Op::Read { offset, len },
            Command::Write => Op::Write { offset, len, fua },
            Command::Trim => Op::Trim { offset, len, fua },
            Command::WriteZeroes => Op::WriteZeroes {
                offset,
                len,
                fua,
                no_hole: self.flags & CMD_FLAG_NO_HOLE != 0,
            },
            _ => unreachable!("other commands returned above"),
        })
    }
}

/// A request that passed [`Request::check`]: aligned, inside the export, within limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
    },
    /// Write the `len`-byte payload at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Soft disconnect.
    Disc,
    /// Make acknowledged writes durable.
    Flush,
    /// Discard a range.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Zero a range.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u32,
        /// Durable before the reply.
        fua: bool,
        /// The range must stay allocated.
        no_hole: bool,
    },
}

/// The 16-byte simple reply header; a successful READ's data follows it.
pub fn encode_simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out
}

/// A simple reply header as a client reads it (used by tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// Error number (0 = success).
    pub error: u32,
    /// Handle of the request.
    pub handle: u64,
}

/// Parses a simple reply header; `None` if the magic is wrong.
pub fn parse_simple_reply(bytes: &[u8; SIMPLE_REPLY_LEN]) -> Option<SimpleReply> {
    (be_u32(bytes, 0) == SIMPLE_REPLY_MAGIC).then(|| SimpleReply {
        error: be_u32(bytes, 4),
        handle: be_u64(bytes, 8),
    })
}

fn be_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(word)
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u32 = 1 << 20;

    fn geometry() -> ExportGeometry {
        ExportGeometry::new(64 * u64::from(MIB), 512, 4096, 32 * MIB).unwrap()
    }

    fn request(command: Command, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            command,
            handle: 0x1122_3344_5566_7788,
            offset,
            len,
        }
    }

    #[test]
    fn greeting_bytes() {
        let g = encode_greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            parse_client_flags([0, 0, 0, 3]),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(
            parse_client_flags([0, 0, 0, 0]),
            Ok(ClientFlags {
                fixed_newstyle: false,
                no_zeroes: false
            })
        );
        assert_eq!(
            parse_client_flags([0, 0, 0, 4]),
            Err(HandshakeParseError::UnknownClientFlags { flags: 4 })
        );
        assert!(parse_client_flags([0x80, 0, 0, 1]).is_err());
    }

    #[test]
    fn option_header() {
        let mut bytes = [0u8; 16];
        bytes[0..8].copy_from_slice(b"IHAVEOPT");
        bytes[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        bytes[12..16].copy_from_slice(&77u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&bytes),
            Ok(OptionHeader {
                option: OPT_GO,
                len: 77
            })
        );
        bytes[0] = b'J';
        assert!(matches!(
            parse_option_header(&bytes),
            Err(HandshakeParseError::OptionMagic { .. })
        ));
    }

    fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut data = Vec::new();
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name);
        data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for info in infos {
            data.extend_from_slice(&info.to_be_bytes());
        }
        data
    }

    #[test]
    fn info_request_ok() {
        let data = info_data(b"vd0", &[INFO_BLOCK_SIZE, 99, INFO_NAME, INFO_BLOCK_SIZE]);
        let req = parse_info_request(&data).unwrap();
        assert_eq!(req.name, "vd0");
        assert!(req.wants_block_size);
        assert!(req.wants_name);
        assert!(!req.wants_description);
        let data = info_data(b"", &[]);
        let empty = parse_info_request(&data).unwrap();
        assert_eq!(empty.name, "");
        assert!(!empty.wants_block_size);
    }

    #[test]
    fn info_request_malformed() {
        assert!(matches!(
            parse_info_request(&[0, 0, 0, 0, 0]),
            Err(OptionDataError::TooShort { len: 5, min: 6 })
        ));
        // Name length runs past the data (also the u32::MAX overflow case).
        let mut data = info_data(b"vd0", &[]);
        data[3] = 4;
        assert!(matches!(
            parse_info_request(&data),
            Err(OptionDataError::NameOverrun { .. })
        ));
        data[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            parse_info_request(&data),
            Err(OptionDataError::NameOverrun { .. })
        ));
        // Count says 2 requests, only one present; and trailing junk.
        let mut data = info_data(b"vd0", &[INFO_NAME]);
        data[8] = 2;
        assert!(matches!(
            parse_info_request(&data),
            Err(OptionDataError::InfoCount { count: 2, .. })
        ));
        let mut data = info_data(b"vd0", &[INFO_NAME]);
        data.push(0);
        assert!(matches!(
            parse_info_request(&data),
            Err(OptionDataError::InfoCount { .. })
        ));
        // Bad names.
        assert_eq!(
            parse_info_request(&info_data(b"a\0b", &[])),
            Err(OptionDataError::NameEncoding)
        );
        assert_eq!(
            parse_info_request(&info_data(&[0xff, 0xfe], &[])),
            Err(OptionDataError::NameEncoding)
        );
        let long = vec![b'x'; MAX_STRING_LEN + 1];
        assert!(matches!(
            parse_info_request(&info_data(&long, &[])),
            Err(OptionDataError::NameTooLong { .. })
        ));
    }

    #[test]
    fn export_name_and_empty() {
        assert_eq!(parse_export_name(b"vd0"), Ok("vd0"));
        assert_eq!(parse_export_name(b""), Ok(""));
        assert!(parse_export_name(b"\xc3").is_err());
        assert_eq!(parse_empty(b""), Ok(()));
        assert_eq!(
            parse_empty(b"x"),
            Err(OptionDataError::UnexpectedData { len: 1 })
        );
    }

    #[test]
    fn option_reply_encodings() {
        let mut out = Vec::new();
        encode_option_reply(&mut out, OPT_GO, REP_ERR_UNKNOWN, "no");
        assert_eq!(out.len(), 22);
        assert_eq!(&out[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[8..12], &OPT_GO.to_be_bytes());
        assert_eq!(&out[12..16], &REP_ERR_UNKNOWN.to_be_bytes());
        assert_eq!(&out[16..20], &2u32.to_be_bytes());
        assert_eq!(&out[20..], b"no");

        out.clear();
        encode_info_export(&mut out, OPT_INFO, 1 << 30, SERVER_TRANSMISSION_FLAGS);
        assert_eq!(out.len(), 20 + 12);
        assert_eq!(&out[16..20], &12u32.to_be_bytes());
        assert_eq!(&out[20..22], &INFO_EXPORT.to_be_bytes());
        assert_eq!(&out[22..30], &(1u64 << 30).to_be_bytes());
        assert_eq!(&out[30..32], &SERVER_TRANSMISSION_FLAGS.to_be_bytes());

        out.clear();
        encode_info_block_size(&mut out, OPT_GO, &geometry());
        assert_eq!(out.len(), 20 + 14);
        assert_eq!(&out[20..22], &INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(&out[22..26], &512u32.to_be_bytes());
        assert_eq!(&out[26..30], &4096u32.to_be_bytes());
        assert_eq!(&out[30..34], &(32 * MIB).to_be_bytes());

        out.clear();
        encode_rep_server(&mut out, "vd0", "a disk");
        assert_eq!(&out[12..16], &REP_SERVER.to_be_bytes());
        assert_eq!(&out[16..20], &(4u32 + 3 + 6).to_be_bytes());
        assert_eq!(&out[20..24], &3u32.to_be_bytes());
        assert_eq!(&out[24..], b"vd0a disk");

        out.clear();
        encode_info_string(&mut out, OPT_GO, INFO_NAME, "vd0");
        assert_eq!(&out[16..20], &5u32.to_be_bytes());
        assert_eq!(&out[20..], &[0, 1, b'v', b'd', b'0']);

        out.clear();
        encode_export_name_reply(&mut out, 4096, 0x0123, false);
        assert_eq!(out.len(), 10 + 124);
        out.clear();
        encode_export_name_reply(&mut out, 4096, 0x0123, true);
        assert_eq!(out, [0, 0, 0, 0, 0, 0, 0x10, 0, 0x01, 0x23]);
    }

    #[test]
    fn long_strings_are_clamped_on_a_char_boundary() {
        let mut out = Vec::new();
        let long = "é".repeat(MAX_STRING_LEN); // 2 bytes each
        encode_option_reply(&mut out, OPT_LIST, REP_ERR_POLICY, &long);
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert_eq!(len, MAX_STRING_LEN);
        assert!(std::str::from_utf8(&out[20..]).is_ok());
    }

    #[test]
    fn geometry_rules() {
        assert!(ExportGeometry::new(0, 512, 4096, 32 * MIB).is_ok());
        assert!(ExportGeometry::new(0, 1, 512, 512).is_ok());
        assert_eq!(
            ExportGeometry::new(0, 3, 4096, MIB),
            Err(GeometryError::MinBlock { min: 3 })
        );
        assert_eq!(
            ExportGeometry::new(0, 0, 4096, MIB),
            Err(GeometryError::MinBlock { min: 0 })
        );
        assert!(ExportGeometry::new(0, 1 << 17, 1 << 17, MIB).is_err());
        assert!(ExportGeometry::new(0, 4096, 2048, MIB).is_err());
        assert!(ExportGeometry::new(0, 1, 256, MIB).is_err());
        assert!(ExportGeometry::new(0, 512, 4096, 2048).is_err());
        let g = geometry();
        assert!(!g.requires_size_negotiation());
        assert_eq!(g.discard_limit_bytes(), 32 * MIB);
        assert_eq!(g.effect_chunk_bytes(), 32 * MIB);
        let strict = ExportGeometry::new(1 << 30, 4096, 4096, MIB).unwrap();
        assert!(strict.requires_size_negotiation());
        assert_eq!(strict.discard_limit_bytes(), 32 * MIB);
        let odd = ExportGeometry::new(1 << 30, 4096, 4096, 10_000).unwrap();
        assert_eq!(odd.effect_chunk_bytes(), 8192);
    }

    #[test]
    fn request_roundtrip_and_magic() {
        let req = request(Command::Write, CMD_FLAG_FUA, 4096, 8192);
        let bytes = req.encode();
        assert_eq!(parse_request(&bytes), Ok(req));
        assert_eq!(req.payload_len(), 8192);
        assert_eq!(request(Command::Read, 0, 0, 8192).payload_len(), 0);
        let mut bad = bytes;
        bad[0] ^= 1;
        assert_eq!(
            parse_request(&bad),
            Err(RequestMagicError { magic: 0x2460_9513 })
        );
        let unknown = request(Command::Unknown(42), 0, 0, 0);
        assert_eq!(parse_request(&unknown.encode()), Ok(unknown));
        for code in 0..=9u16 {
            assert_eq!(Command::from_code(code).code(), code);
        }
    }

    #[test]
    fn check_accepts_valid_requests() {
        let g = geometry();
        assert_eq!(
            request(Command::Read, 0, 0, 4096).check(&g),
            Ok(Op::Read {
                offset: 0,
                len: 4096
            })
        );
        let end = g.size_bytes - 512;
        assert_eq!(
            request(Command::Write, CMD_FLAG_FUA, end, 512).check(&g),
            Ok(Op::Write {
                offset: end,
                len: 512,
                fua: true
            })
        );
        assert_eq!(
            request(Command::WriteZeroes, CMD_FLAG_NO_HOLE, 0, 0).check(&g),
            Ok(Op::WriteZeroes {
                offset: 0,
                len: 0,
                fua: false,
                no_hole: true
            })
        );
        // Effect-only commands may exceed the maximum payload.
        let whole = u32::try_from(g.size_bytes).unwrap();
        assert!(request(Command::Trim, 0, 0, whole).check(&g).is_ok());
        // FLUSH ignores its reserved fields; FUA is accepted on every command.
        assert_eq!(
            request(Command::Flush, CMD_FLAG_FUA, 7, 9).check(&g),
            Ok(Op::Flush)
        );
        assert_eq!(request(Command::Disc, 0, 0, 0).check(&g), Ok(Op::Disc));
        // Zero-length at the very end is inside.
        assert!(request(Command::Read, 0, g.size_bytes, 0).check(&g).is_ok());
    }

    #[test]
    fn check_error_numbers_follow_the_spec() {
        let g = geometry();
        let size = g.size_bytes;
        let inval = Err(Errno::Inval);
        // Misaligned offset or length.
        assert_eq!(request(Command::Read, 0, 1, 512).check(&g), inval);
        assert_eq!(request(Command::Read, 0, 0, 100).check(&g), inval);
        assert_eq!(request(Command::Write, 0, 512, 513).check(&g), inval);
        assert_eq!(request(Command::Trim, 0, 3, 512).check(&g), inval);
        // Past the end: EINVAL for read and trim, ENOSPC for write and write-zeroes.
        assert_eq!(request(Command::Read, 0, size, 512).check(&g), inval);
        assert_eq!(request(Command::Trim, 0, size - 512, 1024).check(&g), inval);
        assert_eq!(
            request(Command::Write, 0, size, 512).check(&g),
            Err(Errno::NoSpc)
        );
        assert_eq!(
            request(Command::WriteZeroes, 0, size, 512).check(&g),
            Err(Errno::NoSpc)
        );
        assert_eq!(
            request(Command::Write, 0, u64::MAX - 511, 512).check(&g),
            Err(Errno::NoSpc)
        );
        // READ/WRITE payload over the maximum.
        assert_eq!(
            request(Command::Read, 0, 0, 32 * MIB + 512).check(&g),
            inval
        );
        assert_eq!(request(Command::Write, 0, 0, 64 * MIB).check(&g), inval);
        // Unknown or unadvertised commands and flags.
        assert_eq!(request(Command::Unknown(99), 0, 0, 0).check(&g), inval);
        assert_eq!(request(Command::Cache, 0, 0, 512).check(&g), inval);
        assert_eq!(request(Command::BlockStatus, 0, 0, 512).check(&g), inval);
        assert_eq!(request(Command::Read, CMD_FLAG_DF, 0, 512).check(&g), inval);
        assert_eq!(
            request(Command::Write, CMD_FLAG_NO_HOLE, 0, 512).check(&g),
            inval
        );
        assert_eq!(
            request(Command::WriteZeroes, CMD_FLAG_FAST_ZERO, 0, 512).check(&g),
            inval
        );
        assert_eq!(request(Command::Read, 1 << 15, 0, 512).check(&g), inval);
    }

    #[test]
    fn simple_reply_roundtrip() {
        let bytes = encode_simple_reply(Errno::NoSpc.code(), 42);
        assert_eq!(
            parse_simple_reply(&bytes),
            Some(SimpleReply {
                error: 28,
                handle: 42
            })
        );
        let mut bad = bytes;
        bad[3] = 0;
        assert_eq!(parse_simple_reply(&bad), None);
    }

    #[test]
    fn errno_codes() {
        for errno in [
            Errno::Perm,
            Errno::Io,
            Errno::NoMem,
            Errno::Inval,
            Errno::NoSpc,
            Errno::Overflow,
            Errno::NotSup,
            Errno::Shutdown,
        ] {
            assert_eq!(Errno::from_code(errno.code()), Some(errno));
        }
        assert_eq!(Errno::from_code(0), None);
        assert_eq!(Errno::Inval.to_string(), "NBD_EINVAL (22)");
    }
}
