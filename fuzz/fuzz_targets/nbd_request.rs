//! Fuzzes every NBD parser of client bytes (`dataplane::nbd::proto`): request headers and their
//! checks against export geometries, option headers, option data (`INFO`/`GO`, `EXPORT_NAME`,
//! `LIST`) and client flags. Besides "never panics", it checks the properties the server relies
//! on: a parsed header re-encodes to the same bytes, and a request that passes `check` is
//! aligned, inside the export and within the payload limit.

#![no_main]

use dataplane::nbd::proto::{self, Command, ExportGeometry, Op, Request};
use libfuzzer_sys::fuzz_target;

/// Export geometries the request checks run against: the default vdisk shape, a strict one,
/// byte-granular, and one whose size is not a multiple of its block.
fn geometries() -> [ExportGeometry; 4] {
    [
        ExportGeometry::new(64 << 20, 512, 4096, 32 << 20).unwrap(),
        ExportGeometry::new(1 << 40, 4096, 4096, 1 << 20).unwrap(),
        ExportGeometry::new(u64::MAX, 1, 512, u32::MAX).unwrap(),
        ExportGeometry::new((1 << 20) + 512, 4096, 65536, 10_000_000).unwrap(),
    ]
}

fn check_request(bytes: &[u8; proto::REQUEST_LEN]) {
    let Ok(request) = proto::parse_request(bytes) else {
        assert_ne!(&bytes[0..4], &proto::REQUEST_MAGIC.to_be_bytes());
        return;
    };
    assert_eq!(&request.encode(), bytes, "header does not round-trip");
    assert_eq!(
        request.payload_len() != 0,
        request.command == Command::Write && request.len != 0
    );
    for geometry in geometries() {
        check_op(&request, &geometry);
    }
}

fn check_op(request: &Request, geometry: &ExportGeometry) {
    let Ok(op) = request.check(geometry) else {
        return;
    };
    let (offset, len) = match op {
        Op::Disc | Op::Flush => return,
        Op::Read { offset, len } | Op::Write { offset, len, .. } => {
            assert!(len <= geometry.max_payload_bytes);
            (offset, len)
        }
        Op::Trim { offset, len, .. } | Op::WriteZeroes { offset, len, .. } => (offset, len),
    };
    assert_eq!((offset, len), (request.offset, request.len));
    let min = u64::from(geometry.min_block_bytes);
    assert_eq!(offset % min, 0);
    assert_eq!(u64::from(len) % min, 0);
    assert!(offset + u64::from(len) <= geometry.size_bytes);
    assert!(geometry.effect_chunk_bytes() >= geometry.min_block_bytes);
}

fn check_option_data(data: &[u8]) {
    if let Ok(info) = proto::parse_info_request(data) {
        assert!(info.name.len() <= proto::MAX_STRING_LEN);
        assert!(!info.name.contains('\0'));
        // The declared name length and info count account for every byte.
        let name_len = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
        assert_eq!(name_len, info.name.len());
        let count = u16::from_be_bytes([data[4 + name_len], data[5 + name_len]]) as usize;
        assert_eq!(data.len(), 6 + name_len + 2 * count);
    }
    if let Ok(name) = proto::parse_export_name(data) {
        assert_eq!(name.as_bytes(), data);
    }
    assert_eq!(proto::parse_empty(data).is_ok(), data.is_empty());
    // Encoders given client-controlled strings declare the length they write.
    let text = String::from_utf8_lossy(data);
    let mut out = Vec::new();
    proto::encode_option_reply(&mut out, proto::OPT_GO, proto::REP_ERR_UNKNOWN, &text);
    let declared = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
    assert_eq!(out.len(), proto::OPTION_REPLY_HEADER_LEN + declared);
    assert!(declared <= proto::MAX_STRING_LEN);
    out.clear();
    proto::encode_rep_server(&mut out, &text, &text);
    let declared = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
    assert_eq!(out.len(), proto::OPTION_REPLY_HEADER_LEN + declared);
}

fuzz_target!(|data: &[u8]| {
    if let Some(flags) = data.first_chunk::<4>() {
        let _ = proto::parse_client_flags(*flags);
    }
    if let Some(header) = data.first_chunk::<{ proto::OPTION_HEADER_LEN }>() {
        if let Ok(parsed) = proto::parse_option_header(header) {
            assert_eq!(&header[0..8], b"IHAVEOPT");
            assert_eq!(parsed.option.to_be_bytes(), header[8..12]);
            assert_eq!(parsed.len.to_be_bytes(), header[12..16]);
        }
        check_option_data(&data[proto::OPTION_HEADER_LEN..]);
    }
    if let Some(reply) = data.first_chunk::<{ proto::SIMPLE_REPLY_LEN }>()
        && let Some(parsed) = proto::parse_simple_reply(reply)
    {
        let encoded = proto::encode_simple_reply(parsed.error, parsed.handle);
        assert_eq!(&encoded, reply);
    }
    // Every 28-byte window, so a stream of pipelined requests is covered too.
    for window in data.chunks_exact(proto::REQUEST_LEN) {
        check_request(window.try_into().unwrap());
    }
    // A request header with a valid magic in front of the input reaches the checks quickly.
    if let Some(rest) = data.first_chunk::<24>() {
        let mut bytes = [0u8; proto::REQUEST_LEN];
        bytes[0..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        bytes[4..].copy_from_slice(rest);
        check_request(&bytes);
    }
    check_option_data(data);
});
