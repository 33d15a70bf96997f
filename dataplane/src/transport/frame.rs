//! The on-wire frame of data-plane peer messages (version 1), shared by the TCP and RDMA
//! backends.
//!
//! A frame is a fixed 32-byte header, a message header whose length the fixed header states
//! (32 bytes in version 1) and a payload. Every integer is **little-endian**; checksums are
//! **crc32c** (Castagnoli, as everywhere in Cairn: `crc32c("123456789") = 0xE3069283`).
//!
//! ```text
//! fixed header (FIXED_LEN = 32)
//!  off  len  field
//!    0    4  magic            b"CRNT"
//!    4    1  version          1 (FRAME_VERSION)
//!    5    1  kind             1 hello, 2 request, 3 response, 4 reject   (FrameKind)
//!    6    2  flags            none defined in version 1: any set bit is refused
//!    8    8  request id       chosen by the caller, echoed by the response or reject
//!   16    4  header length    bytes of message header that follow (version 1: 32;
//!                             a reader refuses more than MAX_HEADER_LEN before reading them)
//!   20    4  payload length   bytes of payload after the message header
//!                             (at most the receiver's limit, never over MAX_PAYLOAD_LEN)
//!   24    4  payload crc32c   over the payload bytes (0 for an empty payload)
//!   28    4  header crc32c    over bytes 0..28 of the fixed header, then the message header
//!
//! message header, version 1 (MESSAGE_HEADER_LEN = 32)
//!   32    8  vdisk id         }
//!   40    8  epoch            } what the replication protocol addresses (see `Message`)
//!   48    8  sequence         }
//!   56    2  op               meaning defined by the protocol above the transport
//!   58    6  reserved         zero
//!
//!   64    payload length bytes of payload
//! ```
//!
//! Kinds: a **hello** opens each connection in both directions; its payload is the sender's
//! 8-byte node id (its request id and message header are zero), so each side knows who it talks
//! to and a client notices an address that leads to the wrong node. A **request** carries a
//! [`Message`] under a request id; the **response** carries the answer under the same id, so many
//! requests can be in flight on one connection and replies may come back in any order. A
//! **reject** answers a request the receiver refused without running it; its `op` holds a
//! [`RejectReason`] code and the connection is closed after it.
//!
//! Decoding checks, in this order: magic, header length bound, header crc, version, kind, flags,
//! exact header length, reserved bytes, payload length bound, payload crc. Checking the header crc
//! before trusting any length field means a flipped bit in a length shows up as corruption rather
//! than as a bogus "too large", and the header length bound comes first so that a reader never
//! waits for more than `FIXED_LEN + MAX_HEADER_LEN` bytes before the crc is known. Later versions
//! must keep bytes 0..32 as they are (so a version 1 peer can read their request id and reject
//! them with [`RejectReason::VersionUnsupported`]). Nothing here panics on any input.

use super::Message;

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"CRNT";
/// The frame version this code writes and the only one it reads.
pub const FRAME_VERSION: u8 = 1;
/// Length of the fixed header.
pub const FIXED_LEN: usize = 32;
/// Length of the version 1 message header.
pub const MESSAGE_HEADER_LEN: usize = 32;
/// Fixed header plus version 1 message header: the bytes in front of every payload.
pub const HEAD_LEN: usize = FIXED_LEN + MESSAGE_HEADER_LEN;
/// The longest message header a reader accepts before checking the header crc (so that a
/// corrupt length cannot make it wait for or allocate much).
pub const MAX_HEADER_LEN: u32 = 256;
/// The largest payload any frame may carry; receivers may set a lower limit.
pub const MAX_PAYLOAD_LEN: u32 = 64 << 20;

const _: () = assert!(MESSAGE_HEADER_LEN as u32 <= MAX_HEADER_LEN);
const _: () = assert!(HEAD_LEN == 64);
const _: () = assert!((MAX_PAYLOAD_LEN as u64) < u32::MAX as u64);

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// First frame on a connection: the sender's node id.
    Hello,
    /// A request carrying a message.
    Request,
    /// The response to the request with the same id.
    Response,
    /// The receiver refused the request with the same id (reason in `op`).
    Reject,
}

impl FrameKind {
    /// The on-wire code.
    pub fn code(self) -> u8 {
        match self {
            FrameKind::Hello => 1,
            FrameKind::Request => 2,
            FrameKind::Response => 3,
            FrameKind::Reject => 4,
        }
    }

    /// The kind for an on-wire code.
    pub fn from_code(code: u8) -> Option<FrameKind> {
        Some(match code {
            1 => FrameKind::Hello,
            2 => FrameKind::Request,
            3 => FrameKind::Response,
            4 => FrameKind::Reject,
            _ => return None,
        })
    }
}

/// Why a receiver refused a request (the `op` of a reject frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The frame's version is not one the receiver reads.
    VersionUnsupported,
    /// The payload is over the receiver's limit.
    TooLarge,
    /// A checksum or field did not verify.
    Corrupt,
}

impl RejectReason {
    /// The on-wire code.
    pub fn code(self) -> u16 {
        match self {
            RejectReason::VersionUnsupported => 1,
            RejectReason::TooLarge => 2,
            RejectReason::Corrupt => 3,
        }
    }

    /// The reason for an on-wire code.
    pub fn from_code(code: u16) -> Option<RejectReason> {
        Some(match code {
            1 => RejectReason::VersionUnsupported,
            2 => RejectReason::TooLarge,
            3 => RejectReason::Corrupt,
            _ => return None,
        })
    }
}

/// Which checksum of a frame failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrcPart {
    /// The header crc (fixed header bytes 0..28 and the message header).
    Header,
    /// The payload crc.
    Payload,
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than the frame needs (only from [`decode`]: a stream reader waits instead).
    #[error("frame truncated: {have} bytes of at least {needed}")]
    Truncated {
        /// Bytes the frame needs (as far as known).
        needed: usize,
        /// Bytes present.
        have: usize,
    },
    /// The first four bytes are not [`MAGIC`].
    #[error("bad frame magic {found:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// The header length is over [`MAX_HEADER_LEN`] (checked before the header crc).
    #[error("frame header length {len} is over {max}")]
    HeaderTooLong {
        /// Stated length.
        len: u32,
        /// Limit.
        max: u32,
    },
    /// A checksum did not match.
    #[error("frame {part:?} crc32c mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch {
        /// Which checksum.
        part: CrcPart,
        /// The checksum in the frame.
        stored: u32,
        /// The checksum of the bytes received.
        computed: u32,
    },
    /// A version this code does not read (the header crc verified).
    #[error("frame version {version} is not supported (this node speaks {FRAME_VERSION})")]
    VersionUnsupported {
        /// The version found.
        version: u8,
        /// The frame's request id, so the receiver can reject it.
        request_id: u64,
    },
    /// An unknown kind code.
    #[error("unknown frame kind {code}")]
    UnknownKind {
        /// The code found.
        code: u8,
    },
    /// Flag bits that version 1 does not define.
    #[error("unknown frame flags {flags:#06x}")]
    UnknownFlags {
        /// The flags found.
        flags: u16,
    },
    /// A message header length other than [`MESSAGE_HEADER_LEN`].
    #[error("frame message header is {len} bytes, version 1 has {MESSAGE_HEADER_LEN}")]
    BadHeaderLength {
        /// Stated length.
        len: u32,
    },
    /// Reserved message header bytes are not zero.
    #[error("reserved frame header bytes are not zero")]
    ReservedNotZero,
    /// The payload is over the limit.
    #[error("frame payload of {len} bytes is over the {max}-byte limit")]
    TooLarge {
        /// Stated (or attempted) payload length.
        len: u64,
        /// Limit.
        max: u32,
        /// The frame's request id (0 when encoding).
        request_id: u64,
    },
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it is.
    pub kind: FrameKind,
    /// The request id.
    pub request_id: u64,
    /// The message (for hello and reject frames, see the module documentation).
    pub message: Message,
}

/// The checked fixed header of a frame being read from a stream: how many bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixed {
    /// Bytes of message header that follow.
    pub header_len: u32,
}

/// A frame whose fixed and message headers verified; the payload is still to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// What it is.
    pub kind: FrameKind,
    /// The request id.
    pub request_id: u64,
    /// Bytes of payload that follow.
    pub payload_len: u32,
    /// The payload's crc32c.
    pub payload_crc: u32,
    /// Message header: vdisk id.
    pub vdisk: u64,
    /// Message header: epoch.
    pub epoch: u64,
    /// Message header: sequence.
    pub sequence: u64,
    /// Message header: op.
    pub op: u16,
}

impl Head {
    /// Verifies `payload` against this head and builds the message.
    pub fn into_frame(self, payload: Vec<u8>) -> Result<Frame, FrameError> {
        check_payload(&self, &payload)?;
        Ok(Frame {
            kind: self.kind,
            request_id: self.request_id,
            message: Message {
                op: self.op,
                vdisk: self.vdisk,
                epoch: self.epoch,
                sequence: self.sequence,
                payload,
            },
        })
    }
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// The 64 bytes in front of `message.payload`, for a writer that sends the payload from where it
/// already is. Fails only if the payload is over [`MAX_PAYLOAD_LEN`].
pub fn encode_head(
    kind: FrameKind,
    request_id: u64,
    message: &Message,
) -> Result<[u8; HEAD_LEN], FrameError> {
    let len = message.payload.len();
    if len > MAX_PAYLOAD_LEN as usize {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max: MAX_PAYLOAD_LEN,
            request_id,
        });
    }
    let mut h = [0u8; HEAD_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = FRAME_VERSION;
    h[5] = kind.code();
    // flags (6..8) stay zero
    h[8..16].copy_from_slice(&request_id.to_le_bytes());
    h[16..20].copy_from_slice(&(MESSAGE_HEADER_LEN as u32).to_le_bytes());
    h[20..24].copy_from_slice(&(len as u32).to_le_bytes());
    h[24..28].copy_from_slice(&crc32c::crc32c(&message.payload).to_le_bytes());
    h[32..40].copy_from_slice(&message.vdisk.to_le_bytes());
    h[40..48].copy_from_slice(&message.epoch.to_le_bytes());
    h[48..56].copy_from_slice(&message.sequence.to_le_bytes());
    h[56..58].copy_from_slice(&message.op.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[0..28]), &h[FIXED_LEN..HEAD_LEN]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    Ok(h)
}

/// Appends the whole frame to `out`.
pub fn encode(
    kind: FrameKind,
    request_id: u64,
    message: &Message,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let head = encode_head(kind, request_id, message)?;
    out.reserve(HEAD_LEN + message.payload.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(&message.payload);
    Ok(())
}

/// First step of reading a frame from a stream: checks the magic and bounds the header length,
/// so the reader knows how many bytes to read next (`header_len`).
pub fn parse_fixed(fixed: &[u8; FIXED_LEN]) -> Result<Fixed, FrameError> {
    if fixed[0..4] != MAGIC {
        return Err(FrameError::BadMagic {
            found: [fixed[0], fixed[1], fixed[2], fixed[3]],
        });
    }
    let header_len = le_u32(fixed, 16);
    if header_len > MAX_HEADER_LEN {
        return Err(FrameError::HeaderTooLong {
            len: header_len,
            max: MAX_HEADER_LEN,
        });
    }
    Ok(Fixed { header_len })
}

/// Second step: verifies the header crc over `fixed` and `header` (which must be exactly the
/// `header_len` bytes [`parse_fixed`] asked for), then every header field; `max_payload` is the
/// receiver's payload limit (clamped to [`MAX_PAYLOAD_LEN`]).
pub fn check_head(
    fixed: &[u8; FIXED_LEN],
    header: &[u8],
    max_payload: u32,
) -> Result<Head, FrameError> {
    let Fixed { header_len } = parse_fixed(fixed)?;
    if header.len() != header_len as usize {
        return Err(FrameError::Truncated {
            needed: FIXED_LEN + header_len as usize,
            have: FIXED_LEN + header.len(),
        });
    }
    let stored = le_u32(fixed, 28);
    let computed = crc32c::crc32c_append(crc32c::crc32c(&fixed[0..28]), header);
    if stored != computed {
        return Err(FrameError::CrcMismatch {
            part: CrcPart::Header,
            stored,
            computed,
        });
    }
    let request_id = le_u64(fixed, 8);
    let version = fixed[4];
    if version != FRAME_VERSION {
        return Err(FrameError::VersionUnsupported {
            version,
            request_id,
        });
    }
    let kind = FrameKind::from_code(fixed[5]).ok_or(FrameError::UnknownKind { code: fixed[5] })?;
    let flags = le_u16(fixed, 6);
    if flags != 0 {
        return Err(FrameError::UnknownFlags { flags });
    }
    if header_len as usize != MESSAGE_HEADER_LEN {
        return Err(FrameError::BadHeaderLength { len: header_len });
    }
    if header[26..32].iter().any(|&b| b != 0) {
        return Err(FrameError::ReservedNotZero);
    }
    let payload_len = le_u32(fixed, 20);
    let max = max_payload.min(MAX_PAYLOAD_LEN);
    if payload_len > max {
        return Err(FrameError::TooLarge {
            len: u64::from(payload_len),
            max,
            request_id,
        });
    }
    Ok(Head {
        kind,
        request_id,
        payload_len,
        payload_crc: le_u32(fixed, 24),
        vdisk: le_u64(header, 0),
        epoch: le_u64(header, 8),
        sequence: le_u64(header, 16),
        op: le_u16(header, 24),
    })
}

/// Last step: verifies the payload's length and crc.
pub fn check_payload(head: &Head, payload: &[u8]) -> Result<(), FrameError> {
    if payload.len() != head.payload_len as usize {
        return Err(FrameError::Truncated {
            needed: HEAD_LEN + head.payload_len as usize,
            have: HEAD_LEN + payload.len(),
        });
    }
    let computed = crc32c::crc32c(payload);
    if computed != head.payload_crc {
        return Err(FrameError::CrcMismatch {
            part: CrcPart::Payload,
            stored: head.payload_crc,
            computed,
        });
    }
    Ok(())
}

/// Decodes the frame at the start of `bytes`, returning it and the number of bytes it took.
/// [`FrameError::Truncated`] says how many bytes are needed (as far as the bytes present tell).
pub fn decode(bytes: &[u8], max_payload: u32) -> Result<(Frame, usize), FrameError> {
    let Some(fixed) = bytes.first_chunk::<FIXED_LEN>() else {
        if bytes.len() >= 4 && bytes[0..4] != MAGIC {
            return Err(FrameError::BadMagic {
                found: [bytes[0], bytes[1], bytes[2], bytes[3]],
            });
        }
        return Err(FrameError::Truncated {
            needed: FIXED_LEN,
            have: bytes.len(),
        });
    };
    let Fixed { header_len } = parse_fixed(fixed)?;
    let header_end = FIXED_LEN + header_len as usize;
    let Some(header) = bytes.get(FIXED_LEN..header_end) else {
        return Err(FrameError::Truncated {
            needed: header_end,
            have: bytes.len(),
        });
    };
    let head = check_head(fixed, header, max_payload)?;
    let end = header_end + head.payload_len as usize;
    let Some(payload) = bytes.get(header_end..end) else {
        return Err(FrameError::Truncated {
            needed: end,
            have: bytes.len(),
        });
    };
    let frame = head.into_frame(payload.to_vec())?;
    Ok((frame, end))
}

/// The hello frame a node sends first on each connection: its node id u64 and the id of the
/// cluster it belongs to u64 (0 while it does not know yet), little-endian.
pub fn hello(node: super::NodeId, cluster: u64) -> Message {
    let mut payload = node.to_le_bytes().to_vec();
    payload.extend_from_slice(&cluster.to_le_bytes());
    Message {
        payload,
        ..Message::default()
    }
}

/// The node id and cluster id in a hello frame's message, if it has the right shape. A hello
/// of 8 bytes (a node id alone) names no cluster (0).
pub fn hello_node(message: &Message) -> Option<(super::NodeId, u64)> {
    let p = message.payload.as_slice();
    let node = u64::from_le_bytes(p.get(..8)?.try_into().ok()?);
    let cluster = match p.len() {
        8 => 0,
        16 => u64::from_le_bytes(p[8..].try_into().ok()?),
        _ => return None,
    };
    Some((node, cluster))
}

/// The message of a reject frame.
pub fn reject(reason: RejectReason) -> Message {
    Message {
        op: reason.code(),
        ..Message::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Message {
        Message {
            op: 7,
            vdisk: 0x0102_0304_0506_0708,
            epoch: 9,
            sequence: 0xdead_beef,
            payload: (0..100u8).collect(),
        }
    }

    fn frame_bytes() -> Vec<u8> {
        let mut out = Vec::new();
        encode(FrameKind::Request, 42, &sample(), &mut out).unwrap();
        out
    }

    /// Recomputes the header crc after a test edits header fields, so the check behind it runs.
    fn reseal(b: &mut [u8]) {
        let header_len = le_u32(b, 16) as usize;
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&b[0..28]),
            &b[FIXED_LEN..FIXED_LEN + header_len],
        );
        b[28..32].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn round_trip_and_layout() {
        let b = frame_bytes();
        assert_eq!(b.len(), HEAD_LEN + 100);
        assert_eq!(&b[0..4], b"CRNT");
        assert_eq!(b[4], 1);
        assert_eq!(b[5], 2);
        assert_eq!(le_u64(&b, 8), 42);
        assert_eq!(le_u32(&b, 16), 32);
        assert_eq!(le_u32(&b, 20), 100);
        assert_eq!(le_u32(&b, 24), crc32c::crc32c(&b[64..]));
        assert_eq!(le_u64(&b, 32), 0x0102_0304_0506_0708);
        assert_eq!(le_u16(&b, 56), 7);
        let (frame, used) = decode(&b, MAX_PAYLOAD_LEN).unwrap();
        assert_eq!(used, b.len());
        assert_eq!(frame.kind, FrameKind::Request);
        assert_eq!(frame.request_id, 42);
        assert_eq!(frame.message, sample());
        // An empty payload has crc 0 and decodes too; trailing bytes are not consumed.
        let mut out = Vec::new();
        encode(FrameKind::Response, 1, &Message::default(), &mut out).unwrap();
        assert_eq!(le_u32(&out, 24), 0);
        out.extend_from_slice(b"next");
        let (frame, used) = decode(&out, 0).unwrap();
        assert_eq!((frame.kind, used), (FrameKind::Response, HEAD_LEN));
    }

    #[test]
    fn known_crc() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn every_truncation_is_reported_not_panicked() {
        let b = frame_bytes();
        for len in 0..b.len() {
            match decode(&b[..len], MAX_PAYLOAD_LEN) {
                Err(FrameError::Truncated { needed, have }) => {
                    assert_eq!(have, len);
                    assert!(needed > len, "needed {needed} at {len}");
                    let expect = if len < FIXED_LEN {
                        FIXED_LEN
                    } else if len < HEAD_LEN {
                        HEAD_LEN
                    } else {
                        b.len()
                    };
                    assert_eq!(needed, expect);
                }
                other => panic!("{len} bytes: {other:?}"),
            }
        }
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let b = frame_bytes();
        for byte in 0..b.len() {
            for bit in 0..8 {
                let mut c = b.clone();
                c[byte] ^= 1 << bit;
                let err = decode(&c, MAX_PAYLOAD_LEN).expect_err("a flipped bit decoded");
                let expected_ok = match byte {
                    0..4 => matches!(err, FrameError::BadMagic { .. }),
                    // A flip in the header length may leave it short (crc fails), long but
                    // bounded (truncated: the frame is too short for it) or over the bound.
                    16..20 => matches!(
                        err,
                        FrameError::CrcMismatch { .. }
                            | FrameError::Truncated { .. }
                            | FrameError::HeaderTooLong { .. }
                    ),
                    4..64 => matches!(
                        err,
                        FrameError::CrcMismatch {
                            part: CrcPart::Header,
                            ..
                        }
                    ),
                    _ => matches!(
                        err,
                        FrameError::CrcMismatch {
                            part: CrcPart::Payload,
                            ..
                        }
                    ),
                };
                assert!(expected_ok, "byte {byte} bit {bit}: {err:?}");
            }
        }
    }

    #[test]
    fn field_checks_behind_the_crc() {
        let b = frame_bytes();
        let edit = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut c = b.clone();
            f(&mut c);
            reseal(&mut c);
            decode(&c, MAX_PAYLOAD_LEN).unwrap_err()
        };
        assert_eq!(
            edit(&|c| c[4] = 2),
            FrameError::VersionUnsupported {
                version: 2,
                request_id: 42
            }
        );
        assert_eq!(edit(&|c| c[5] = 0), FrameError::UnknownKind { code: 0 });
        assert_eq!(edit(&|c| c[5] = 5), FrameError::UnknownKind { code: 5 });
        assert_eq!(
            edit(&|c| c[7] = 0x80),
            FrameError::UnknownFlags { flags: 0x8000 }
        );
        assert_eq!(edit(&|c| c[60] = 1), FrameError::ReservedNotZero);
        // A shorter message header (the payload then starts earlier).
        assert_eq!(
            edit(&|c| c[16] = 24),
            FrameError::BadHeaderLength { len: 24 }
        );
        // Over the hard bound: refused before the crc, so no reseal is needed to see it.
        let mut c = b.clone();
        c[16..20].copy_from_slice(&(MAX_HEADER_LEN + 1).to_le_bytes());
        assert_eq!(
            decode(&c, MAX_PAYLOAD_LEN).unwrap_err(),
            FrameError::HeaderTooLong {
                len: MAX_HEADER_LEN + 1,
                max: MAX_HEADER_LEN
            }
        );
    }

    #[test]
    fn payload_limits() {
        let b = frame_bytes();
        assert_eq!(
            decode(&b, 99).unwrap_err(),
            FrameError::TooLarge {
                len: 100,
                max: 99,
                request_id: 42
            }
        );
        assert!(decode(&b, 100).is_ok());
        // A stated length over the hard cap is refused whatever the receiver's limit.
        let mut c = b.clone();
        c[20..24].copy_from_slice(&(MAX_PAYLOAD_LEN + 1).to_le_bytes());
        reseal(&mut c);
        assert!(matches!(
            decode(&c, u32::MAX).unwrap_err(),
            FrameError::TooLarge {
                max: MAX_PAYLOAD_LEN,
                ..
            }
        ));
        // Encoding refuses too.
        let big = Message {
            payload: vec![0; MAX_PAYLOAD_LEN as usize + 1],
            ..Message::default()
        };
        assert!(matches!(
            encode_head(FrameKind::Request, 3, &big),
            Err(FrameError::TooLarge { request_id: 3, .. })
        ));
    }

    #[test]
    fn staged_stream_reading_matches_decode() {
        let b = frame_bytes();
        let fixed: &[u8; FIXED_LEN] = b.first_chunk().unwrap();
        let Fixed { header_len } = parse_fixed(fixed).unwrap();
        let header = &b[FIXED_LEN..FIXED_LEN + header_len as usize];
        let head = check_head(fixed, header, MAX_PAYLOAD_LEN).unwrap();
        let frame = head.into_frame(b[HEAD_LEN..].to_vec()).unwrap();
        assert_eq!(frame, decode(&b, MAX_PAYLOAD_LEN).unwrap().0);
        // A payload of the wrong length is caught, not sliced past.
        assert!(matches!(
            check_payload(&head, &b[HEAD_LEN + 1..]),
            Err(FrameError::Truncated { .. })
        ));
    }

    #[test]
    fn hello_and_reject_messages() {
        assert_eq!(hello_node(&hello(77, 0xC1)), Some((77, 0xC1)));
        let node_only = Message {
            payload: 77u64.to_le_bytes().to_vec(),
            ..Message::default()
        };
        assert_eq!(hello_node(&node_only), Some((77, 0)));
        assert_eq!(hello_node(&Message::default()), None);
        for len in [1, 7, 9, 15, 17] {
            let odd = Message {
                payload: vec![0; len],
                ..Message::default()
            };
            assert_eq!(hello_node(&odd), None, "{len} bytes");
        }
        let r = reject(RejectReason::TooLarge);
        assert_eq!(RejectReason::from_code(r.op), Some(RejectReason::TooLarge));
        assert_eq!(RejectReason::from_code(0), None);
        for code in 0..=255u8 {
            if let Some(kind) = FrameKind::from_code(code) {
                assert_eq!(kind.code(), code);
            }
        }
    }
}
