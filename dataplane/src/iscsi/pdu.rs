//! The iSCSI wire format (RFC 7143 §11) as pure functions: the 48-byte Basic Header Segment of
//! every initiator PDU parsed into a typed [`Request`], encoders for every target PDU header,
//! digests, padding and the `key=value\0` text format of Login and Text PDUs.
//!
//! Nothing here does I/O or keeps state: this is the only code that interprets initiator bytes
//! before a session exists, so it is unit-tested and fuzzed (`fuzz/fuzz_targets/iscsi_pdu.rs`).
//!
//! ```text
//! Basic Header Segment (all PDUs), byte offsets:
//!  0      1      2      3      4         5..8          8..16         16..20  20..48
//! +------+------+------+------+---------+-------------+-------------+-------+----------------+
//! |.I|op | F|.. | opcode-specific | AHS len | DataSegLen  | LUN / opc-  | ITT   | opcode-specific|
//! |      | flags|             | (words) | (24-bit BE) | specific    |       |                |
//! +------+------+------+------+---------+-------------+-------------+-------+----------------+
//! then: AHS (4 x AHS len bytes), HeaderDigest (4, if negotiated), data segment padded to 4,
//! DataDigest (4, if negotiated). Every target response carries StatSN@24, ExpCmdSN@28,
//! MaxCmdSN@32.
//! ```

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// Length of a CRC32C digest on the wire.
pub const DIGEST_LEN: usize = 4;
/// The reserved "no tag" value of ITT and TTT.
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Initiator opcodes.
pub mod op {
    /// NOP-Out.
    pub const NOP_OUT: u8 = 0x00;
    /// SCSI Command.
    pub const SCSI_COMMAND: u8 = 0x01;
    /// SCSI Task Management Function Request.
    pub const TASK_MGMT: u8 = 0x02;
    /// Login Request.
    pub const LOGIN: u8 = 0x03;
    /// Text Request.
    pub const TEXT: u8 = 0x04;
    /// SCSI Data-Out.
    pub const DATA_OUT: u8 = 0x05;
    /// Logout Request.
    pub const LOGOUT: u8 = 0x06;
    /// SNACK Request.
    pub const SNACK: u8 = 0x10;
    /// NOP-In.
    pub const NOP_IN: u8 = 0x20;
    /// SCSI Response.
    pub const SCSI_RESPONSE: u8 = 0x21;
    /// Task Management Function Response.
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    /// Login Response.
    pub const LOGIN_RESPONSE: u8 = 0x23;
    /// Text Response.
    pub const TEXT_RESPONSE: u8 = 0x24;
    /// SCSI Data-In.
    pub const DATA_IN: u8 = 0x25;
    /// Logout Response.
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    /// Ready To Transfer.
    pub const R2T: u8 = 0x31;
    /// Reject.
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject {
    /// Data (payload) digest error.
    pub const DATA_DIGEST: u8 = 0x02;
    /// SNACK reject.
    pub const SNACK: u8 = 0x03;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u8 = 0x04;
    /// Command not supported.
    pub const NOT_SUPPORTED: u8 = 0x05;
    /// Immediate command reject: too many immediate commands.
    pub const IMMEDIATE: u8 = 0x06;
    /// Invalid PDU field.
    pub const INVALID_FIELD: u8 = 0x09;
}

/// Why a Basic Header Segment was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// An opcode no initiator may send (a target opcode or an unassigned one).
    #[error("unknown or target-only opcode {0:#04x}")]
    Opcode(u8),
    /// The data segment is longer than the receiver accepts.
    #[error("data segment of {len} bytes, over the {limit}-byte limit")]
    DataTooLong {
        /// Declared length.
        len: u32,
        /// Limit.
        limit: u32,
    },
    /// A SCSI Command asking for both read and write (bidirectional) data.
    #[error("bidirectional SCSI commands are not supported")]
    Bidirectional,
}

/// Fields every initiator PDU carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Common {
    /// Opcode (low 6 bits of byte 0).
    pub opcode: u8,
    /// Immediate delivery bit.
    pub immediate: bool,
    /// Final (F) bit.
    pub final_bit: bool,
    /// AHS bytes that follow the BHS.
    pub ahs_len: usize,
    /// Data segment bytes (without padding).
    pub data_len: usize,
    /// Initiator Task Tag.
    pub itt: u32,
    /// The 8 bytes at offset 8 (LUN for most PDUs).
    pub lun: u64,
}

/// An initiator PDU header, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// NOP-Out.
    NopOut {
        /// Target Transfer Tag (answer to a target ping, or reserved).
        ttt: u32,
        /// CmdSN.
        cmd_sn: u32,
    },
    /// SCSI Command.
    ScsiCommand {
        /// Read (R) bit.
        read: bool,
        /// Write (W) bit.
        write: bool,
        /// Task attribute.
        attr: u8,
        /// Expected Data Transfer Length.
        edtl: u32,
        /// CmdSN.
        cmd_sn: u32,
        /// The 16-byte CDB.
        cdb: [u8; 16],
    },
    /// Task Management Function Request.
    TaskMgmt {
        /// Function code.
        function: u8,
        /// Referenced Task Tag.
        rtt: u32,
        /// CmdSN.
        cmd_sn: u32,
        /// RefCmdSN.
        ref_cmd_sn: u32,
    },
    /// Login Request.
    Login(LoginHeader),
    /// Text Request.
    Text {
        /// Continue (C) bit.
        continue_bit: bool,
        /// Target Transfer Tag.
        ttt: u32,
        /// CmdSN.
        cmd_sn: u32,
    },
    /// SCSI Data-Out.
    DataOut {
        /// Target Transfer Tag.
        ttt: u32,
        /// DataSN.
        data_sn: u32,
        /// Buffer offset.
        offset: u32,
    },
    /// Logout Request.
    Logout {
        /// Reason code.
        reason: u8,
        /// CmdSN.
        cmd_sn: u32,
    },
    /// SNACK (not supported at ErrorRecoveryLevel 0).
    Snack,
}

/// A Login Request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginHeader {
    /// Transit (T) bit.
    pub transit: bool,
    /// Continue (C) bit.
    pub continue_bit: bool,
    /// Current stage.
    pub csg: u8,
    /// Next stage.
    pub nsg: u8,
    /// Version-max.
    pub version_max: u8,
    /// Version-min.
    pub version_min: u8,
    /// Initiator Session ID.
    pub isid: [u8; 6],
    /// Target Session Identifying Handle.
    pub tsih: u16,
    /// Connection ID.
    pub cid: u16,
    /// CmdSN.
    pub cmd_sn: u32,
    /// ExpStatSN.
    pub exp_stat_sn: u32,
}

/// A parsed initiator BHS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Fields of every PDU.
    pub common: Common,
    /// Kind-specific fields.
    pub kind: Kind,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Parses an initiator BHS, refusing data segments over `max_data_len`.
pub fn parse_bhs(b: &[u8; BHS_LEN], max_data_len: u32) -> Result<Request, PduError> {
    let opcode = b[0] & 0x3f;
    let data_len = u32::from_be_bytes([0, b[5], b[6], b[7]]);
    let common = Common {
        opcode,
        immediate: b[0] & 0x40 != 0,
        final_bit: b[1] & 0x80 != 0,
        ahs_len: usize::from(b[4]) * 4,
        data_len: data_len as usize,
        itt: be32(b, 16),
        lun: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
    };
    let kind = match opcode {
        op::NOP_OUT => Kind::NopOut {
            ttt: be32(b, 20),
            cmd_sn: be32(b, 24),
        },
        op::SCSI_COMMAND => {
            let read = b[1] & 0x40 != 0;
            let write = b[1] & 0x20 != 0;
            if read && write {
                return Err(PduError::Bidirectional);
            }
            Kind::ScsiCommand {
                read,
                write,
                attr: b[1] & 0x07,
                edtl: be32(b, 20),
                cmd_sn: be32(b, 24),
                cdb: b[32..48].try_into().expect("16 bytes"),
            }
        }
        op::TASK_MGMT => Kind::TaskMgmt {
            function: b[1] & 0x7f,
            rtt: be32(b, 20),
            cmd_sn: be32(b, 24),
            ref_cmd_sn: be32(b, 32),
        },
        op::LOGIN => Kind::Login(LoginHeader {
            transit: b[1] & 0x80 != 0,
            continue_bit: b[1] & 0x40 != 0,
            csg: (b[1] >> 2) & 0x03,
            nsg: b[1] & 0x03,
            version_max: b[2],
            version_min: b[3],
            isid: b[8..14].try_into().expect("6 bytes"),
            tsih: u16::from_be_bytes([b[14], b[15]]),
            cid: u16::from_be_bytes([b[20], b[21]]),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
        }),
        op::TEXT => Kind::Text {
            continue_bit: b[1] & 0x40 != 0,
            ttt: be32(b, 20),
            cmd_sn: be32(b, 24),
        },
        op::DATA_OUT => Kind::DataOut {
            ttt: be32(b, 20),
            data_sn: be32(b, 36),
            offset: be32(b, 40),
        },
        op::LOGOUT => Kind::Logout {
            reason: b[1] & 0x7f,
            cmd_sn: be32(b, 24),
        },
        op::SNACK => Kind::Snack,
        other => return Err(PduError::Opcode(other)),
    };
    if data_len > max_data_len {
        return Err(PduError::DataTooLong {
            len: data_len,
            limit: max_data_len,
        });
    }
    Ok(Request { common, kind })
}

/// Bytes of padding after a data segment of `len` bytes.
pub fn pad_len(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// The CRC32C digest of `parts`, in wire byte order (RFC 7143 §13.1: least significant byte
/// first).
pub fn digest(parts: &[&[u8]]) -> [u8; DIGEST_LEN] {
    let crc = parts
        .iter()
        .fold(0u32, |crc, part| crc32c::crc32c_append(crc, part));
    crc.to_le_bytes()
}

/// A target BHS under construction: opcode, flags, ITT and data length; the sequence numbers
/// (StatSN@24, ExpCmdSN@28, MaxCmdSN@32) are filled in by the connection's writer when it sends.
pub fn target_bhs(opcode: u8, flags: u8, itt: u32, data_len: usize) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = opcode;
    b[1] = flags;
    set_data_len(&mut b, data_len);
    put32(&mut b, 16, itt);
    b
}

/// Stores the 24-bit data segment length.
pub fn set_data_len(b: &mut [u8; BHS_LEN], len: usize) {
    assert!(len < 1 << 24, "data segment over 16 MiB");
    let bytes = (len as u32).to_be_bytes();
    b[5..8].copy_from_slice(&bytes[1..4]);
}

/// Stores StatSN, ExpCmdSN and MaxCmdSN.
pub fn set_sequence(b: &mut [u8; BHS_LEN], stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32) {
    put32(b, 24, stat_sn);
    put32(b, 28, exp_cmd_sn);
    put32(b, 32, max_cmd_sn);
}

/// Stores a big-endian u32 at `at` (for opcode-specific fields).
pub fn set_u32(b: &mut [u8; BHS_LEN], at: usize, v: u32) {
    put32(b, at, v);
}

/// Reads a big-endian u32 at `at`.
pub fn get_u32(b: &[u8; BHS_LEN], at: usize) -> u32 {
    be32(b, at)
}

/// Stores the LUN field.
pub fn set_lun(b: &mut [u8; BHS_LEN], lun: u64) {
    b[8..16].copy_from_slice(&lun.to_be_bytes());
}

/// Whether a target PDU with this header advances StatSN when sent (responses do; R2T, Data-In
/// without status, and unsolicited NOP-In do not).
pub fn advances_stat_sn(b: &[u8; BHS_LEN]) -> bool {
    match b[0] & 0x3f {
        op::DATA_IN => b[1] & 0x01 != 0,
        op::R2T => false,
        op::NOP_IN => be32(b, 16) != RESERVED_TAG,
        _ => true,
    }
}

/// A Login Response header.
pub fn login_response(
    req: &LoginHeader,
    itt: u32,
    transit: bool,
    nsg: u8,
    tsih: u16,
    status: u16,
    data_len: usize,
) -> [u8; BHS_LEN] {
    let mut flags = (req.csg & 3) << 2;
    if transit {
        flags |= 0x80 | (nsg & 3);
    }
    let mut b = target_bhs(op::LOGIN_RESPONSE, flags, itt, data_len);
    b[2] = 0; // version-max
    b[3] = 0; // version-active
    b[8..14].copy_from_slice(&req.isid);
    b[14..16].copy_from_slice(&tsih.to_be_bytes());
    b[36..38].copy_from_slice(&status.to_be_bytes());
    b
}

/// A Reject header; its data segment is the rejected BHS.
pub fn reject_bhs(reason: u8) -> [u8; BHS_LEN] {
    let mut b = target_bhs(op::REJECT, 0x80, RESERVED_TAG, BHS_LEN);
    b[2] = reason;
    b
}

/// Why a text segment (Login/Text data) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    /// A `key=value` pair without `=`, or with an empty key.
    #[error("text pair {index} is not key=value")]
    NoEquals {
        /// Index of the pair.
        index: usize,
    },
    /// A key over 63 bytes or a value over 8192 bytes.
    #[error("text pair {index} is too long")]
    TooLong {
        /// Index of the pair.
        index: usize,
    },
    /// Not UTF-8 (iSCSI text is UTF-8).
    #[error("text pair {index} is not UTF-8")]
    NotUtf8 {
        /// Index of the pair.
        index: usize,
    },
}

/// Longest key (RFC 7143 §6.1).
pub const MAX_KEY_LEN: usize = 63;
/// Longest value we accept (CHAP values in hex are the longest legitimate ones).
pub const MAX_VALUE_LEN: usize = 8192;

/// Parses `key=value\0` pairs (the final NUL may be missing; empty entries from padding are
/// skipped).
pub fn parse_text(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out = Vec::new();
    for (index, entry) in data.split(|&b| b == 0).enumerate() {
        if entry.is_empty() {
            continue;
        }
        let entry = std::str::from_utf8(entry).map_err(|_| TextError::NotUtf8 { index })?;
        let Some((key, value)) = entry.split_once('=') else {
            return Err(TextError::NoEquals { index });
        };
        if key.is_empty() {
            return Err(TextError::NoEquals { index });
        }
        if key.len() > MAX_KEY_LEN || value.len() > MAX_VALUE_LEN {
            return Err(TextError::TooLong { index });
        }
        out.push((key.to_owned(), value.to_owned()));
    }
    Ok(out)
}

/// Appends `key=value\0`.
pub fn encode_text(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

/// Serial number arithmetic (RFC 1982, 32 bits): whether `a < b`.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 1 << 31
}

/// Serial number arithmetic: whether `a <= b`.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scsi_command_round_trip_fields() {
        let mut b = [0u8; BHS_LEN];
        b[0] = 0x41;
        b[1] = 0x80 | 0x40 | 0x01;
        b[5..8].copy_from_slice(&[0, 2, 0]);
        b[16..20].copy_from_slice(&7u32.to_be_bytes());
        b[20..24].copy_from_slice(&4096u32.to_be_bytes());
        b[24..28].copy_from_slice(&9u32.to_be_bytes());
        b[32] = 0x28;
        let r = parse_bhs(&b, 1 << 20).unwrap();
        assert!(r.common.immediate);
        assert_eq!(r.common.data_len, 512);
        assert_eq!(r.common.itt, 7);
        let Kind::ScsiCommand {
            read,
            write,
            edtl,
            cmd_sn,
            cdb,
            attr,
        } = r.kind
        else {
            panic!("{r:?}")
        };
        assert!(read && !write);
        assert_eq!((edtl, cmd_sn, cdb[0], attr), (4096, 9, 0x28, 1));
        b[1] |= 0x20;
        assert_eq!(parse_bhs(&b, 1 << 20), Err(PduError::Bidirectional));
    }

    #[test]
    fn refuses_target_opcodes_and_long_data() {
        let mut b = [0u8; BHS_LEN];
        b[0] = op::SCSI_RESPONSE;
        assert_eq!(parse_bhs(&b, 8192), Err(PduError::Opcode(0x21)));
        b[0] = op::NOP_OUT;
        b[5] = 1;
        assert!(matches!(
            parse_bhs(&b, 8192),
            Err(PduError::DataTooLong { .. })
        ));
    }

    #[test]
    fn crc32c_matches_rfc_examples() {
        // RFC 7143 appendix B.4: the CRC bytes as they appear on the wire.
        assert_eq!(digest(&[&[0u8; 32]]), [0xaa, 0x36, 0x91, 0x8a]);
        assert_eq!(digest(&[&[0xffu8; 32]]), [0x43, 0xab, 0xa8, 0x62]);
        assert_eq!(digest(&[&[0u8; 10], &[0u8; 22]]), digest(&[&[0u8; 32]]));
    }

    #[test]
    fn text_pairs() {
        let pairs = parse_text(b"A=b\0C=\0D=x=y\0\0\0").unwrap();
        assert_eq!(
            pairs,
            [
                ("A".into(), "b".into()),
                ("C".into(), "".into()),
                ("D".into(), "x=y".into())
            ]
        );
        assert_eq!(
            parse_text(b"novalue\0"),
            Err(TextError::NoEquals { index: 0 })
        );
        assert_eq!(parse_text(b"=v"), Err(TextError::NoEquals { index: 0 }));
        let mut out = Vec::new();
        encode_text(&mut out, "K", "V");
        assert_eq!(out, b"K=V\0");
    }

    #[test]
    fn serial_numbers_wrap() {
        assert!(sn_lt(u32::MAX, 0));
        assert!(sn_lt(1, 2));
        assert!(!sn_lt(2, 2));
        assert!(sn_le(2, 2));
        assert!(!sn_lt(5, 1));
    }
}
