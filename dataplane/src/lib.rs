//! Cairn's data plane: the per-I/O path of a node.
//!
//! It will own the thread-per-core runtime (one pinned glommio executor per core), the vdisk
//! controller, the oplog, the extent store and unified cache, replication to peers, and the host
//! frontends (NBD, iSCSI, NVMe-oF/TCP). It stands on [`blockstore`] for devices and defines the
//! traits it needs from the control plane (metadata lookups, cluster view), so the control plane
//! can be swapped without touching the I/O path. See `../shared/DESIGN.md`.
//!
//! Today it re-exports the device layer it is built on; the vdisk path lands with the
//! single-node data-plane issue.

#![warn(missing_docs)]

pub use blockstore;
