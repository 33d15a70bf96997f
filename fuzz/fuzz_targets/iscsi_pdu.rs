//! Fuzzes the iSCSI parsers of initiator bytes (`dataplane::iscsi::pdu` and `::login`): Basic
//! Header Segments, login/text key segments, CHAP binary values, and the login negotiation fed
//! with parsed keys. Besides "never panics", it checks what the connection relies on: a parsed
//! header's lengths and tags are the bytes on the wire, a refused header says why truthfully,
//! text pairs re-encode to a parse-equivalent segment, and negotiation never completes login
//! with an error status or before authentication.

#![no_main]

use dataplane::iscsi::login::{self, ChapSecrets, Negotiation, TargetDirectory};
use dataplane::iscsi::pdu::{self, BHS_LEN, Kind, PduError};
use libfuzzer_sys::fuzz_target;

struct Dir {
    chap: bool,
}

impl TargetDirectory for Dir {
    fn lookup(&self, iqn: &str) -> Option<String> {
        iqn.strip_prefix("iqn.2026-11.io.cairn:").map(str::to_owned)
    }
    fn chap(&self, _export: &str) -> Option<ChapSecrets> {
        self.chap.then(|| ChapSecrets {
            initiator_user: "user".into(),
            initiator_secret: b"secretsecret".to_vec(),
            target: Some(("tgt".into(), b"targetsecret".to_vec())),
        })
    }
    fn discovery_chap(&self) -> Option<ChapSecrets> {
        None
    }
    fn portal_group_tag(&self) -> u16 {
        1
    }
}

fn check_bhs(b: &[u8; BHS_LEN], limit: u32) {
    let declared = u32::from_be_bytes([0, b[5], b[6], b[7]]);
    match pdu::parse_bhs(b, limit) {
        Ok(r) => {
            assert!(declared <= limit);
            assert_eq!(r.common.data_len, declared as usize);
            assert_eq!(r.common.ahs_len, usize::from(b[4]) * 4);
            assert_eq!(r.common.itt.to_be_bytes(), b[16..20]);
            assert_eq!(r.common.opcode, b[0] & 0x3f);
            if let Kind::ScsiCommand {
                read, write, cdb, ..
            } = r.kind
            {
                assert!(!(read && write));
                assert_eq!(cdb[..], b[32..48]);
            }
            if let Kind::Login(h) = r.kind {
                assert!(h.csg <= 3 && h.nsg <= 3);
            }
        }
        Err(PduError::DataTooLong { len, limit: l }) => assert!(len > l && l == limit),
        Err(PduError::Opcode(op)) => assert_eq!(op, b[0] & 0x3f),
        Err(PduError::Bidirectional) => assert_eq!(b[1] & 0x60, 0x60),
    }
}

fn check_text(data: &[u8]) {
    let Ok(pairs) = pdu::parse_text(data) else {
        return;
    };
    let mut encoded = Vec::new();
    for (k, v) in &pairs {
        assert!(!k.is_empty() && k.len() <= pdu::MAX_KEY_LEN);
        assert!(!k.contains('=') && !k.contains('\0') && !v.contains('\0'));
        pdu::encode_text(&mut encoded, k, v);
    }
    assert_eq!(pdu::parse_text(&encoded).unwrap(), pairs);
    for (_, v) in &pairs {
        let _ = login::decode_binary(v);
    }

    // Drive a negotiation with the keys, as first request and as a follow-up.
    for chap in [false, true] {
        let dir = Dir { chap };
        let mut n = Negotiation::new([1; 16], 7);
        for (csg, nsg) in [(0u8, 1u8), (0, 1), (1, 3)] {
            let header = pdu::LoginHeader {
                transit: true,
                continue_bit: false,
                csg,
                nsg,
                version_max: 0,
                version_min: 0,
                isid: [0; 6],
                tsih: 0,
                cid: 0,
                cmd_sn: 0,
                exp_stat_sn: 0,
            };
            let step = n.step(&header, &pairs, &dir);
            if step.done.is_some() {
                assert_eq!(step.status, login::status::SUCCESS);
                assert!(step.transit);
            }
            if step.status != login::status::SUCCESS {
                assert!(step.done.is_none());
                break;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(header) = data.first_chunk::<BHS_LEN>() {
        for limit in [0, 8192, 262_144, u32::MAX] {
            check_bhs(header, limit);
        }
        check_text(&data[BHS_LEN..]);
    }
    // Every 48-byte window, as a stream of pipelined PDUs would present them.
    for window in data.chunks_exact(BHS_LEN) {
        check_bhs(window.try_into().unwrap(), 262_144);
    }
    check_text(data);
});
