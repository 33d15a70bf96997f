//! Fuzzes the data-plane peer frame decoder (`dataplane::transport::frame`): whole-buffer
//! `decode` at several payload limits and the staged path a stream reader takes. Besides
//! "never panics", it checks the properties the TCP and RDMA backends rely on: a decoded frame
//! re-encodes to exactly the bytes it was decoded from, `Truncated` always asks for more bytes
//! than were given, the staged path agrees with `decode`, and no accepted payload is over the
//! limit.

#![no_main]

use dataplane::transport::frame::{self, FIXED_LEN, FrameError, MAX_PAYLOAD_LEN};
use libfuzzer_sys::fuzz_target;

fn check(data: &[u8], max_payload: u32) {
    match frame::decode(data, max_payload) {
        Ok((decoded, used)) => {
            assert!(used <= data.len());
            assert!(decoded.message.payload.len() <= max_payload as usize);
            let mut again = Vec::new();
            frame::encode(decoded.kind, decoded.request_id, &decoded.message, &mut again)
                .expect("a decoded frame encodes");
            assert_eq!(&again[..], &data[..used], "frame does not round-trip");
            // The staged stream path accepts the same frame.
            let fixed: &[u8; FIXED_LEN] = data.first_chunk().unwrap();
            let header_len = frame::parse_fixed(fixed).unwrap().header_len as usize;
            let head = frame::check_head(fixed, &data[FIXED_LEN..FIXED_LEN + header_len], max_payload)
                .expect("staged head");
            let payload = data[FIXED_LEN + header_len..used].to_vec();
            assert_eq!(head.into_frame(payload).expect("staged payload"), decoded);
        }
        Err(FrameError::Truncated { needed, have }) => {
            assert_eq!(have, data.len());
            assert!(needed > have);
        }
        Err(FrameError::TooLarge { len, max, .. }) => assert!(len > u64::from(max)),
        Err(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    check(data, MAX_PAYLOAD_LEN);
    check(data, 64);
    check(data, 0);
    // A valid-looking fixed header in front of the input gets past the magic quickly.
    if data.len() >= 28 {
        let mut bytes = Vec::with_capacity(data.len() + 4);
        bytes.extend_from_slice(&frame::MAGIC);
        bytes.extend_from_slice(data);
        // Reseal the header crc when the stated header length fits, to reach the field checks.
        let header_len = u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as usize;
        if let Some(header) = bytes.get(FIXED_LEN..FIXED_LEN + header_len) {
            let crc = crc32c_append(&bytes[0..28], header);
            bytes[28..32].copy_from_slice(&crc.to_le_bytes());
        }
        check(&bytes, MAX_PAYLOAD_LEN);
        check(&bytes, 4096);
    }
});

/// crc32c of `a` then `b`: a bitwise reference implementation (Castagnoli, reflected), which also
/// cross-checks the `crc32c` crate the decoder uses.
fn crc32c_append(a: &[u8], b: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in a.iter().chain(b) {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}
