//! Cairn's control-plane wire schema: the `.proto` files under `proto/` and the prost/tonic code
//! generated from them. This crate is the only definition of what crosses the control-plane wire.

#![warn(missing_docs)]

/// Schema version 1 (`package cairn.v1`).
pub mod v1 {
    #![allow(missing_docs)] // generated code; the .proto files carry the documentation
    tonic::include_proto!("cairn.v1");
}

/// Control-plane schema versions this build serves.
pub const SCHEMA_VERSIONS: &[u32] = &[1];

#[cfg(test)]
mod tests {
    use super::v1::{DeviceInfo, NodeInfo};
    use prost::Message;

    #[test]
    fn node_info_round_trips_on_the_wire() {
        let info = NodeInfo {
            node_id: 7,
            version: "0.1.0".into(),
            schema_versions: super::SCHEMA_VERSIONS.to_vec(),
            devices: vec![DeviceInfo {
                path: "/dev/loop0".into(),
                tier: "ssd".into(),
                capacity_bytes: 1 << 30,
                used_bytes: 0,
            }],
        };
        let bytes = info.encode_to_vec();
        assert_eq!(NodeInfo::decode(bytes.as_slice()).unwrap(), info);
        assert!(NodeInfo::decode(&[0xff, 0xff][..]).is_err());
    }
}
