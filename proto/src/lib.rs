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
                state: "offline".into(),
                state_reason: "3 I/O errors".into(),
            }],
            block: "b1".into(),
            rack: "r1".into(),
            data_addr: "10.0.0.7:7200".into(),
            led_groups: vec![super::v1::LedGroup {
                group_id: 3,
                term: 9,
                voters: vec![7, 8, 9],
                learners: vec![10],
            }],
        };
        let bytes = info.encode_to_vec();
        assert_eq!(NodeInfo::decode(bytes.as_slice()).unwrap(), info);
        assert!(NodeInfo::decode(&[0xff, 0xff][..]).is_err());
    }

    #[test]
    fn metadata_batch_round_trips_and_keeps_its_conditions() {
        use super::v1::{Expect, MetaApplyRequest, MetaDelete, MetaOp, MetaPut, expect, meta_op};
        let req = MetaApplyRequest {
            ops: vec![
                MetaOp {
                    op: Some(meta_op::Op::Put(MetaPut {
                        key: b"v/1/a".to_vec(),
                        value: vec![0, 1, 2],
                        expect: Some(Expect {
                            condition: Some(expect::Condition::Version(9)),
                        }),
                    })),
                },
                MetaOp {
                    op: Some(meta_op::Op::Delete(MetaDelete {
                        key: b"v/1/b".to_vec(),
                        expect: Some(Expect {
                            condition: Some(expect::Condition::Absent(true)),
                        }),
                    })),
                },
            ],
        };
        let bytes = req.encode_to_vec();
        assert_eq!(MetaApplyRequest::decode(bytes.as_slice()).unwrap(), req);
    }

    #[test]
    fn raft_envelope_carries_group_and_format() {
        use super::v1::RaftRequest;
        let req = RaftRequest {
            group_id: u64::MAX,
            payload_format: 1,
            payload: vec![7; 100],
        };
        let bytes = req.encode_to_vec();
        assert_eq!(RaftRequest::decode(bytes.as_slice()).unwrap(), req);
        // A truncated message is refused, never misread.
        assert!(RaftRequest::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn every_service_is_generated() {
        // Compile-time presence of each server trait the control plane implements.
        fn _servers<
            A: super::v1::cluster_service_server::ClusterService,
            B: super::v1::node_service_server::NodeService,
            C: super::v1::container_service_server::ContainerService,
            D: super::v1::vdisk_service_server::VdiskService,
            E: super::v1::metadata_service_server::MetadataService,
            F: super::v1::raft_service_server::RaftService,
            G: super::v1::curator_service_server::CuratorService,
        >() {
        }
    }
}
