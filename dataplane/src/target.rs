//! What a host frontend (NBD, iSCSI, NVMe-oF) needs from a virtual disk.
//!
//! A frontend decodes a host command and calls a [`BlockTarget`]; it never sees oplogs, extents
//! or devices. Targets are found by export name through [`Exports`]. Both traits are used on one
//! core (the vdisk's owner), so their futures are not `Send`.

use std::fmt;
use std::rc::Rc;

/// Why a vdisk operation failed, in terms every host protocol can express.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The range ends past the end of the disk.
    #[error("range {offset}+{len} is outside the disk ({size} bytes)")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// No space left to store the data (thin pool exhausted).
    #[error("no space left for {len} bytes at offset {offset}")]
    NoSpace {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A medium or device error; the data in the range may be unreadable.
    #[error("I/O error at offset {offset}: {reason}")]
    Io {
        /// Byte offset.
        offset: u64,
        /// What failed (device, extent group, checksum).
        reason: String,
    },
    /// The disk is shutting down or its owner moved; the host should retry elsewhere.
    #[error("the disk is not available: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// A virtual disk as a frontend sees it: a byte-addressed disk with a volatile-cache contract
/// (a write that returned is durable after the next `flush`, or at once when `fua` was set).
///
/// Cairn's vdisks are stricter — they acknowledge a write only once durable — but frontends must
/// still forward FLUSH and FUA: other targets (and later remote ones) may rely on them.
#[allow(async_fn_in_trait)] // thread-per-core: futures stay on the owner core
pub trait BlockTarget {
    /// Size in bytes.
    fn size_bytes(&self) -> u64;
    /// Smallest I/O alignment the target accepts (requests not aligned to it are refused).
    fn min_block_bytes(&self) -> u32 {
        512
    }
    /// Alignment below which I/O costs a read-modify-write.
    fn preferred_block_bytes(&self) -> u32 {
        4096
    }
    /// Largest single request.
    fn max_request_bytes(&self) -> u32 {
        32 << 20
    }
    /// Reads `out.len()` bytes at `offset`.
    async fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), TargetError>;
    /// Writes `data` at `offset`; with `fua` it is durable when this returns.
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), TargetError>;
    /// Makes every write that returned before this call durable.
    async fn flush(&self) -> Result<(), TargetError>;
    /// Releases `len` bytes at `offset`: they read back as zeros and take no space.
    async fn trim(&self, offset: u64, len: u64) -> Result<(), TargetError>;
    /// Writes `len` zero bytes at `offset` (thin: takes no space).
    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), TargetError>;
}

/// One export as listed to hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name (the vdisk name).
    pub name: String,
    /// Human description.
    pub description: String,
    /// Size in bytes.
    pub size_bytes: u64,
}

impl fmt::Display for ExportInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} bytes)", self.name, self.size_bytes)
    }
}

/// The exports a frontend serves, by name.
pub trait Exports {
    /// The disk type.
    type Target: BlockTarget;
    /// The target named `name` (`""` means the default export, if any).
    fn get(&self, name: &str) -> Option<Rc<Self::Target>>;
    /// Every export.
    fn list(&self) -> Vec<ExportInfo>;
    /// Where hosts find `name` when another node serves it: that node's iSCSI portal
    /// (`host:port`), for a login redirect. `None`: not known to be served elsewhere.
    fn iscsi_portal_of(&self, _name: &str) -> Option<String> {
        None
    }
    /// Where NBD hosts find `name` when another node serves it (`host:port`). NBD has no
    /// redirect: the session is forwarded there (or, for a session that is itself forwarded,
    /// the refusal names it).
    fn nbd_address_of(&self, _name: &str) -> Option<String> {
        None
    }
    /// The address forwarded sessions leave from (`None`: the kernel's choice).
    fn local_ip(&self) -> Option<std::net::IpAddr> {
        None
    }
    /// The exports other nodes serve, with their iSCSI portals (for SendTargets).
    fn served_elsewhere(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Where the SCSI persistent reservations of export `name` are kept (`None`: in memory
    /// only, lost with the process).
    fn reservation_store(
        &self,
        _name: &str,
    ) -> Option<Rc<dyn crate::iscsi::scsi::ReservationStore>> {
        None
    }
}
