//! The device abstraction every backend implements.
//!
//! Shaped like an SPDK bdev module: a device says what it is ([`DeviceInfo`]: size, logical block
//! size, tier, optional operations) and accepts block-aligned reads and writes from aligned
//! [`DmaBuf`]s, flushes of its volatile cache, write-zeroes and unmap. One device is owned by one
//! core, so the futures are deliberately not `Send` (thread-per-core: no locks, no cross-thread
//! wake-ups on the I/O path).
//!
//! This module must not depend on glommio, SPDK or rdma: the format code and the tests build on
//! it alone.

use std::fmt;
use std::sync::Arc;

use crate::buf::DmaBuf;

/// Storage tier of a device, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// Memory (tests, caches).
    Mem,
    /// NVMe flash.
    Nvme,
    /// SATA/SAS flash.
    Ssd,
    /// Spinning disk.
    Hdd,
}

impl Tier {
    /// The on-media code of the tier (stored in the superblock).
    pub fn code(self) -> u8 {
        match self {
            Tier::Mem => 0,
            Tier::Nvme => 1,
            Tier::Ssd => 2,
            Tier::Hdd => 3,
        }
    }

    /// The tier for an on-media code.
    pub fn from_code(code: u8) -> Option<Tier> {
        Some(match code {
            0 => Tier::Mem,
            1 => Tier::Nvme,
            2 => Tier::Ssd,
            3 => Tier::Hdd,
            _ => return None,
        })
    }

    /// Lower-case name, as used on the command line and in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Mem => "mem",
            Tier::Nvme => "nvme",
            Tier::Ssd => "ssd",
            Tier::Hdd => "hdd",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Tier {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "mem" => Ok(Tier::Mem),
            "nvme" => Ok(Tier::Nvme),
            "ssd" => Ok(Tier::Ssd),
            "hdd" => Ok(Tier::Hdd),
            other => Err(format!(
                "unknown tier '{other}' (expected nvme, ssd, hdd or mem)"
            )),
        }
    }
}

/// Which optional operations a device supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `flush` reaches stable media (false: the device has no volatile cache to flush, and
    /// `flush` is a no-op that succeeds).
    pub flush: bool,
    /// `write_zeroes` is offloaded (false: callers write zero buffers themselves).
    pub write_zeroes: bool,
    /// `unmap` releases space (false: `unmap` is refused with [`DeviceError::Unsupported`]).
    pub unmap: bool,
    /// `write_fua` is one device operation that returns once its data is durable, at about the
    /// cost of a plain write (false: it is a write followed by a whole-device flush, and a
    /// caller making several writes durable does better with plain writes and one flush).
    pub fua: bool,
}

/// What a device is.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// Name used in every error and report (a path, a bdev name, `mem0`).
    pub name: Arc<str>,
    /// Usable size in bytes (a multiple of `block_size`).
    pub size_bytes: u64,
    /// Logical block size in bytes: every offset and length is a multiple of it.
    pub block_size: u32,
    /// The tier the backend reports; the formatted superblock's tier takes precedence.
    pub tier: Tier,
    /// Optional operations.
    pub caps: Capabilities,
}

/// A device operation, named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Read.
    Read,
    /// Write.
    Write,
    /// Flush of the volatile cache.
    Flush,
    /// Write zeroes.
    WriteZeroes,
    /// Unmap / trim / deallocate.
    Unmap,
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::WriteZeroes => "write-zeroes",
            IoOp::Unmap => "unmap",
        })
    }
}

/// A failed device operation; every variant names the device, the operation and the range.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The backend reported an I/O error.
    #[error("{device}: {op} of {len} bytes at offset {offset} failed: {source}")]
    Io {
        /// Device name.
        device: Arc<str>,
        /// Operation.
        op: IoOp,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The OS or backend error.
        #[source]
        source: std::io::Error,
    },
    /// The range ends past the end of the device.
    #[error(
        "{device}: {op} of {len} bytes at offset {offset} ends past the device end ({size} bytes)"
    )]
    OutOfRange {
        /// Device name.
        device: Arc<str>,
        /// Operation.
        op: IoOp,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Device size in bytes.
        size: u64,
    },
    /// Offset or length is not a multiple of the logical block size (or zero-length).
    #[error(
        "{device}: {op} of {len} bytes at offset {offset} is not a whole number of {block_size}-byte blocks"
    )]
    Misaligned {
        /// Device name.
        device: Arc<str>,
        /// Operation.
        op: IoOp,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Logical block size.
        block_size: u32,
    },
    /// The device does not support this optional operation.
    #[error("{device}: {op} is not supported by this device")]
    Unsupported {
        /// Device name.
        device: Arc<str>,
        /// Operation.
        op: IoOp,
    },
    /// The device is gone (power cut injected, hot-removed, or closed).
    #[error("{device}: {op} at offset {offset}: device is offline")]
    Offline {
        /// Device name.
        device: Arc<str>,
        /// Operation.
        op: IoOp,
        /// Byte offset.
        offset: u64,
    },
}

impl DeviceError {
    /// The name of the device the error came from.
    pub fn device(&self) -> &str {
        match self {
            DeviceError::Io { device, .. }
            | DeviceError::OutOfRange { device, .. }
            | DeviceError::Misaligned { device, .. }
            | DeviceError::Unsupported { device, .. }
            | DeviceError::Offline { device, .. } => device,
        }
    }
}

/// Checks that `[offset, offset + len)` is a non-empty, block-aligned range inside the device.
pub fn check_range(info: &DeviceInfo, op: IoOp, offset: u64, len: u64) -> Result<(), DeviceError> {
    let bs = u64::from(info.block_size);
    if len == 0 || !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
        return Err(DeviceError::Misaligned {
            device: info.name.clone(),
            op,
            offset,
            len,
            block_size: info.block_size,
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= info.size_bytes => Ok(()),
        _ => Err(DeviceError::OutOfRange {
            device: info.name.clone(),
            op,
            offset,
            len,
            size: info.size_bytes,
        }),
    }
}

/// A block device owned by one core.
///
/// Offsets and lengths are bytes and must be multiples of [`DeviceInfo::block_size`]; buffers
/// must be aligned to it. A write that has completed may still sit in a volatile cache until a
/// later [`BlockDevice::flush`] completes: only flushed writes survive a power cut.
#[allow(async_fn_in_trait)] // thread-per-core: futures are deliberately !Send
pub trait BlockDevice {
    /// What the device is.
    fn info(&self) -> &DeviceInfo;

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    async fn read(&self, offset: u64, buf: &mut DmaBuf) -> Result<(), DeviceError>;

    /// Writes `buf` at `offset`.
    async fn write(&self, offset: u64, buf: &DmaBuf) -> Result<(), DeviceError>;

    /// Makes every write that completed before this call durable.
    async fn flush(&self) -> Result<(), DeviceError>;

    /// Writes `buf` at `offset` and returns once it is durable (Force Unit Access). Other
    /// writes are not made durable by it. Native where [`Capabilities::fua`]; otherwise a
    /// write then a flush.
    async fn write_fua(&self, offset: u64, buf: &DmaBuf) -> Result<(), DeviceError> {
        self.write(offset, buf).await?;
        self.flush().await
    }

    /// Writes `len` zero bytes at `offset` (offloaded where [`Capabilities::write_zeroes`]).
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError>;

    /// Releases `[offset, offset + len)`; later reads of it return unspecified data.
    async fn unmap(&self, offset: u64, len: u64) -> Result<(), DeviceError>;
}

/// Writes zeroes through ordinary writes, for backends without an offload.
pub async fn write_zeroes_by_writes<D: BlockDevice + ?Sized>(
    dev: &D,
    offset: u64,
    len: u64,
) -> Result<(), DeviceError> {
    check_range(dev.info(), IoOp::WriteZeroes, offset, len)?;
    const CHUNK: u64 = 1 << 20;
    let zeros = DmaBuf::new(CHUNK.min(len.next_multiple_of(crate::buf::DMA_ALIGN as u64)) as usize);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64);
        if n == zeros.len() as u64 {
            dev.write(offset + done, &zeros).await?;
        } else {
            let tail = DmaBuf::with_alignment(n as usize, dev.info().block_size as usize);
            dev.write(offset + done, &tail).await?;
        }
        done += n;
    }
    Ok(())
}

macro_rules! forward_device {
    ($($ty:ty),*) => {$(
        impl<D: BlockDevice + ?Sized> BlockDevice for $ty {
            fn info(&self) -> &DeviceInfo {
                (**self).info()
            }
            async fn read(&self, offset: u64, buf: &mut DmaBuf) -> Result<(), DeviceError> {
                (**self).read(offset, buf).await
            }
            async fn write(&self, offset: u64, buf: &DmaBuf) -> Result<(), DeviceError> {
                (**self).write(offset, buf).await
            }
            async fn flush(&self) -> Result<(), DeviceError> {
                (**self).flush().await
            }
            async fn write_fua(&self, offset: u64, buf: &DmaBuf) -> Result<(), DeviceError> {
                (**self).write_fua(offset, buf).await
            }
            async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
                (**self).write_zeroes(offset, len).await
            }
            async fn unmap(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
                (**self).unmap(offset, len).await
            }
        }
    )*};
}

// A shared handle to a device is a device: tests keep one to inspect media after a crash, and
// a core may hand its device to several stores' tools (fsck, bench) in turn.
forward_device!(&D, std::rc::Rc<D>);
