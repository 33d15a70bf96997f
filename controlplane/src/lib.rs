//! Cairn's control plane: cluster configuration and sharded metadata replicated by Raft, served
//! over gRPC ([`cairn_proto`]), placement across failure domains, and curator scans.
//!
//! It reaches a node's data plane only through the traits `dataplane` defines or through gRPC.
//! Today it carries the wire schema it will serve; the config and metadata stores land with the
//! control-plane issue.

#![warn(missing_docs)]

pub use cairn_proto as proto;
