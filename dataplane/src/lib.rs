//! Cairn's data plane: the per-I/O path of a node.
//!
//! It owns the thread-per-core runtime (one pinned glommio executor per core), the vdisk
//! controller with its oplog, extent store and unified read cache, the host frontends (NBD
//! today; iSCSI and NVMe-oF/TCP next), and the transport that carries peer messages between
//! nodes ([`transport`]: TCP, RDMA behind the `rdma` feature, and a seeded simulated network).
//! It stands on [`blockstore`] for devices and defines the traits it needs from the control plane
//! ([`metadata::MetadataStore`]), so the control plane can be swapped without touching the I/O
//! path. See `../shared/DESIGN.md`.

#![warn(missing_docs)]

pub mod cache;
pub mod iscsi;
pub mod mesh;
pub mod metadata;
pub mod metadata_redb;
pub mod nbd;
pub mod replication;
pub mod target;
pub mod transport;
pub mod vdisk;

pub use blockstore;
