//! Cairn's control plane: cluster configuration and sharded metadata replicated by Raft, served
//! over gRPC ([`cairn_proto`]), placement across failure domains, and curator scans.
//!
//! It reaches a node's data plane only through the traits `dataplane` defines or through gRPC.
//!
//! # Layers
//!
//! * [`kv`]: the semantics every replicated store shares — a versioned key-value map with
//!   atomic compare-and-swap batches (the data plane's `MetadataStore` contract).
//! * [`storage`]: a raft group's log, vote, state machine and snapshots in one redb file.
//! * [`network`]: raft messages as bytes over a [`RaftTransport`]: an in-process router with
//!   fault injection for tests, and [`grpc`] (tonic, many groups multiplexed per channel).
//! * [`group`]: [`RaftGroup`], one group on one node, with leader-aware writes and reads.
//! * [`config_store`]: [`ConfigStore`], nodes, containers and vdisks as typed records in the
//!   config group, with name uniqueness and precise errors.
//! * [`ring`]: [`MetadataRing`], which metadata shard owns a key (consistent hashing).
//! * [`server`]: [`server::ControlPlane`], a node's groups and gRPC services on their own
//!   tokio runtime, membership reconciliation, leader forwarding, metadata routing.
//! * [`client`]: [`client::MetadataClient`] (the data plane's `MetadataStore` over gRPC) and
//!   [`client::Endpoints`] (failover and safe retries); [`status`]: errors → gRPC statuses.
//! * [`linearizability`]: a checker of recorded client histories against a model of one key,
//!   used by the cluster tests that kill and partition nodes under concurrent CAS clients.
//!
//! All of it runs on tokio (the control plane's 1-2 threads); storage writes go to tokio's
//! blocking pool so an fsync never stalls the other groups of the node.

#![warn(missing_docs)]

use std::io::Cursor;

pub use cairn_proto as proto;

pub mod client;
pub mod config_store;
pub mod group;
pub mod grpc;
pub mod kv;
pub mod linearizability;
pub mod network;
pub mod placement;
pub mod ring;
pub mod server;
pub mod status;
pub mod storage;

pub use config_store::{ConfigError, ConfigStore};
pub use group::{GroupError, GroupOptions, RaftGroup, ReadConsistency};
pub use kv::{Expect, KvError, KvOp, Versioned};
pub use network::{MemRouter, RaftRegistry, RaftTransport};
pub use ring::MetadataRing;

/// A node's id, unique in the cluster, > 0.
pub type NodeId = u64;
/// A raft group's id: 0 is the config group, metadata shards follow.
pub type GroupId = u64;

openraft::declare_raft_types!(
    /// openraft's type configuration of every Cairn raft group: batches of [`KvOp`]s in the log,
    /// their outcome as the response, nodes addressed by their control-plane gRPC address.
    pub TypeConfig:
        D = kv::KvBatch,
        R = kv::KvResponse,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);
