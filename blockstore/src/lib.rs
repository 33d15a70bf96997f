//! User-space block management on raw devices.
//!
//! `blockstore` is the lowest layer of Cairn. It owns a device (a raw block device, a file, an
//! SPDK bdev, or memory) with no filesystem in between, and offers the data plane:
//!
//! * the [`BlockDevice`] trait and its backends (`uring` on an io_uring of our own per executor, [`mem`],
//!   [`faulty`], and `spdk` behind the `spdk` feature);
//! * an on-device format (see `FORMAT.md`): two superblock copies, a local-metadata journal
//!   with two checkpoint slots, and a data area carved into extent groups made of checksummed
//!   slices;
//! * [`BlockStore`]: allocate and free extent groups, write and read slices with crc32c
//!   verification, flush, enumerate, usage statistics, crash recovery on open;
//! * [`fsck`]: a read-only check that reports every problem and what can be recovered.
//!
//! The trait, the format and the store compile without glommio, SPDK or rdma.

#![warn(missing_docs)]

pub mod buf;
pub mod device;
pub mod faulty;
pub mod format;
pub mod fsck;
pub mod health;
pub mod mem;
#[cfg(feature = "uring")]
pub mod ring;
#[cfg(feature = "spdk")]
pub mod spdk;
pub mod store;
#[cfg(feature = "uring")]
pub mod uring;

pub use buf::{DMA_ALIGN, DmaBuf};
pub use device::{BlockDevice, Capabilities, DeviceError, DeviceInfo, IoOp, Tier};
pub use store::{BlockStore, ExtentGroupId, FormatOptions, StoreError, StoreStats};
