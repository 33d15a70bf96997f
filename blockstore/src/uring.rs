//! io_uring backend: a regular file or a raw block device opened with `O_DIRECT`.
//!
//! [`UringDevice`] owns one glommio [`DmaFile`] and implements [`BlockDevice`] on it, so every
//! read and write is an io_uring request that bypasses the page cache (once open, a device is never
//! used with buffered I/O, so nothing written can be stuck in a cache that `flush` does not reach;
//! the one buffered write, pitfall 2 below, is synced before the direct open). It also
//! owns a second, ordinary handle on the same path, used only for the operations io_uring (or
//! glommio) does not offer: the block-device ioctls (`BLKGETSIZE64`, `BLKSSZGET`, `BLKZEROOUT`,
//! `BLKDISCARD`) and `fallocate(FALLOC_FL_ZERO_RANGE)`. The ioctls that move data run on glommio's
//! blocking thread pool: zeroing a large range on a device without an offload can take seconds,
//! and the core must keep serving other I/O meanwhile.
//!
//! **The copy.** glommio 0.9 reads only into buffers it allocates itself
//! ([`DmaFile::read_at_aligned`] returns a `ReadResult`) and writes only from a `DmaBuffer` it
//! allocated ([`DmaFile::alloc_dma_buffer`]); there is no way to hand it the caller's [`DmaBuf`].
//! So each read is copied out of glommio's buffer and each write into one. A `memcpy` costs far
//! less than the device access; a zero-copy path needs a glommio with user-buffer I/O or our own
//! ring.
//!
//! **Pitfalls this module works around** (see `shared/DEPENDENCIES.md`):
//!
//! 1. `DmaFile::create`/`DmaFile::open` open write-only or read-only; the device is opened with
//!    `OpenOptions::new().read(true).write(true)`.
//! 2. When glommio opens a file it probes polled I/O with a read at offset 0, and caches the
//!    answer per disk and thread. If that read needs no disk access (end of an empty file, or a
//!    hole in a sparse one, such as any file just sized with `truncate`) it "succeeds", glommio
//!    decides the disk polls, and every later read fails with `EOPNOTSUPP`. [`open`] refuses
//!    files smaller than one block, and if offset 0 is a hole it writes zeroes over it with std
//!    (zeroes over a hole change no byte) and syncs, before `dma_open` ever sees the file. It
//!    cannot undo a wrong answer that another sparse file on the same disk already left cached
//!    on this thread.
//! 3. glommio classifies a file by the filesystem holding its *path*. A device node lives on
//!    `/dev`, a tmpfs, so glommio would skip `O_DIRECT` and take its alignment and queue limits
//!    from the wrong device. `O_DIRECT` is therefore always requested explicitly, and a block
//!    device's size and logical block size come from its own ioctls, never from glommio.
//! 4. A glommio executor pins `io_memory` (10 MiB by default) as registered buffers; without
//!    root that needs `RLIMIT_MEMLOCK` to cover it. The tests ask for 1 MiB.

use std::cell::Cell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use glommio::GlommioError;
use glommio::io::{DmaFile, OpenOptions};

use crate::buf::{DMA_ALIGN, DmaBuf};
use crate::device::{
    BlockDevice, Capabilities, DeviceError, DeviceInfo, IoOp, Tier, check_range,
    write_zeroes_by_writes,
};

/// Logical block size of a regular-file device unless [`UringOptions::block_size`] says otherwise.
pub const DEFAULT_FILE_BLOCK_SIZE: u32 = 4096;

/// The smallest logical block size Cairn accepts.
const MIN_BLOCK_SIZE: u32 = 512;

const _: () = assert!(DEFAULT_FILE_BLOCK_SIZE.is_power_of_two());
const _: () = assert!(DEFAULT_FILE_BLOCK_SIZE >= MIN_BLOCK_SIZE);
const _: () = assert!(DEFAULT_FILE_BLOCK_SIZE as usize <= DMA_ALIGN);

// Block-device ioctl numbers from <linux/fs.h>. libc has only BLKSSZGET; the others are encoded
// here with the generic `_IO`/`_IOR` layout, and the assertion below checks that this target
// uses that layout (the architectures with another one also number BLKSSZGET differently).
const BLK_IOCTL_TYPE: u32 = 0x12;

const fn blk_io(nr: u32) -> libc::Ioctl {
    ((BLK_IOCTL_TYPE << 8) | nr) as libc::Ioctl
}

const fn blk_ior_u64(nr: u32) -> libc::Ioctl {
    const IOC_READ: u32 = 2;
    const SIZE_OF_U64: u32 = 8;
    ((IOC_READ << 30) | (SIZE_OF_U64 << 16) | (BLK_IOCTL_TYPE << 8) | nr) as libc::Ioctl
}

/// `_IO(0x12, 104)`: logical block size, an `int`.
const BLKSSZGET: libc::Ioctl = libc::BLKSSZGET;
/// `_IOR(0x12, 114, size_t)`: size in bytes, a `u64`.
const BLKGETSIZE64: libc::Ioctl = blk_ior_u64(114);
/// `_IO(0x12, 119)`: discard `[start, len]`.
const BLKDISCARD: libc::Ioctl = blk_io(119);
/// `_IO(0x12, 127)`: write zeroes to `[start, len]`.
const BLKZEROOUT: libc::Ioctl = blk_io(127);

const _: () = assert!(blk_io(104) == libc::BLKSSZGET);

/// How to open a [`UringDevice`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UringOptions {
    /// Logical block size: a power of two from 512 to 4096. `None`: [`DEFAULT_FILE_BLOCK_SIZE`]
    /// for a regular file, the device's own logical block size (`BLKSSZGET`) for a block device.
    /// On a block device an explicit size must be at least the device's.
    pub block_size: Option<u32>,
    /// Tier to report. `None`: [`Tier::Ssd`] for a regular file; for a block device
    /// [`Tier::Hdd`] if sysfs says it is rotational, [`Tier::Nvme`] for an NVMe namespace, else
    /// [`Tier::Ssd`].
    pub tier: Option<Tier>,
}

/// A step of [`open`], named in [`OpenError::Io`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenStep {
    /// Reading the path's metadata.
    Stat,
    /// Opening the control handle used for ioctls and `fallocate`.
    OpenControl,
    /// `BLKGETSIZE64`.
    GetSize,
    /// `BLKSSZGET`.
    GetBlockSize,
    /// Writing zeroes over a hole at offset 0 of a regular file (pitfall 2 in the module docs).
    FillHoleAtStart,
    /// Opening through glommio with `O_DIRECT`.
    OpenDirect,
}

impl std::fmt::Display for OpenStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OpenStep::Stat => "stat",
            OpenStep::OpenControl => "open (control handle)",
            OpenStep::GetSize => "read the size (BLKGETSIZE64)",
            OpenStep::GetBlockSize => "read the logical block size (BLKSSZGET)",
            OpenStep::FillHoleAtStart => "write zeroes over the hole at offset 0",
            OpenStep::OpenDirect => "open with O_DIRECT through io_uring",
        })
    }
}

/// Why [`open`] failed; every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A system call failed.
    #[error("{}: cannot {step}: {source}", .path.display())]
    Io {
        /// The path given to [`open`].
        path: PathBuf,
        /// What was being done.
        step: OpenStep,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{}: not a regular file or a block device", .path.display())]
    NotFileOrBlockDevice {
        /// The path given to [`open`].
        path: PathBuf,
    },
    /// The block size is not a power of two from 512 to 4096, or is below what the device
    /// needs for `O_DIRECT`.
    #[error(
        "{}: block size {block_size} is not a power of two from 512 to 4096 of at least {device_block_size} bytes (the device's O_DIRECT alignment)",
        .path.display()
    )]
    BadBlockSize {
        /// The path given to [`open`].
        path: PathBuf,
        /// The block size asked for (or reported by the device).
        block_size: u32,
        /// The device's own logical block size.
        device_block_size: u32,
    },
    /// The file or device does not hold a single whole block.
    #[error("{}: {size_bytes} bytes hold no whole {block_size}-byte block", .path.display())]
    TooSmall {
        /// The path given to [`open`].
        path: PathBuf,
        /// Size of the file or device in bytes.
        size_bytes: u64,
        /// The block size in use.
        block_size: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    RegularFile,
    BlockDevice,
}

/// A regular file or raw block device driven through io_uring with `O_DIRECT`.
///
/// Must be opened, used and dropped on one glommio executor thread.
pub struct UringDevice {
    info: DeviceInfo,
    file: DmaFile,
    /// Ordinary handle on the same path for ioctls and `fallocate`, never for reads or writes;
    /// shared with blocking-pool jobs so it outlives a cancelled request.
    ctl: Arc<File>,
    kind: Kind,
    /// Regular files: `FALLOC_FL_ZERO_RANGE` has not yet been refused by the filesystem.
    zero_range: Cell<bool>,
}

/// Creates `path` as a regular file of at least `size_bytes` bytes (sparse), or extends an
/// existing one; never shrinks. For `cairn device format --size` on a file.
pub fn create_file(path: impl AsRef<Path>, size_bytes: u64) -> io::Result<()> {
    let path = path.as_ref();
    if let Ok(meta) = std::fs::metadata(path)
        && !meta.is_file()
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: exists and is not a regular file", path.display()),
        ));
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    if file.metadata()?.len() < size_bytes {
        file.set_len(size_bytes)?;
    }
    file.sync_all()
}

/// Opens an existing regular file or raw block device (`/dev/nvme0n1`, `/dev/loop0`) for
/// direct I/O.
///
/// A regular file's usable size is its length rounded down to the block size; a block device's
/// size and logical block size come from `BLKGETSIZE64` and `BLKSSZGET`. Must run on a glommio
/// executor.
pub async fn open(path: impl AsRef<Path>, opts: UringOptions) -> Result<UringDevice, OpenError> {
    let path = path.as_ref();
    let io_err = |step, source| OpenError::Io {
        path: path.to_path_buf(),
        step,
        source,
    };
    let meta = std::fs::metadata(path).map_err(|e| io_err(OpenStep::Stat, e))?;
    let kind = if meta.is_file() {
        Kind::RegularFile
    } else if meta.file_type().is_block_device() {
        Kind::BlockDevice
    } else {
        return Err(OpenError::NotFileOrBlockDevice {
            path: path.to_path_buf(),
        });
    };
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_err(OpenStep::OpenControl, e))?;

    let (raw_size_bytes, device_block_size) = match kind {
        Kind::RegularFile => (
            ctl.metadata().map_err(|e| io_err(OpenStep::Stat, e))?.len(),
            MIN_BLOCK_SIZE,
        ),
        Kind::BlockDevice => (
            block_device_size(&ctl).map_err(|e| io_err(OpenStep::GetSize, e))?,
            block_device_logical_block_size(&ctl).map_err(|e| io_err(OpenStep::GetBlockSize, e))?,
        ),
    };
    let block_size = match (kind, opts.block_size) {
        (_, Some(bs)) => bs,
        (Kind::RegularFile, None) => DEFAULT_FILE_BLOCK_SIZE,
        (Kind::BlockDevice, None) => device_block_size,
    };
    check_block_size(path, block_size, device_block_size)?;
    let size_bytes = raw_size_bytes - raw_size_bytes % u64::from(block_size);
    if size_bytes == 0 {
        // Also keeps an empty file away from glommio's polling probe (pitfall 2).
        return Err(OpenError::TooSmall {
            path: path.to_path_buf(),
            size_bytes: raw_size_bytes,
            block_size,
        });
    }

    if kind == Kind::RegularFile {
        fill_hole_at_start(&ctl, raw_size_bytes)
            .map_err(|e| io_err(OpenStep::FillHoleAtStart, e))?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .dma_open(path)
        .await
        .map_err(|e| io_err(OpenStep::OpenDirect, glommio_to_io(e)))?;
    if kind == Kind::RegularFile {
        // For a file glommio's alignment is the logical block size of the disk under the
        // filesystem: a smaller block size would turn every I/O into EINVAL.
        let fs_block_size = u32::try_from(file.alignment()).unwrap_or(u32::MAX);
        if let Err(e) = check_block_size(path, block_size, fs_block_size) {
            let _ = file.close().await;
            return Err(e);
        }
    }

    let (tier, unmap) = match kind {
        Kind::RegularFile => (opts.tier.unwrap_or(Tier::Ssd), true),
        Kind::BlockDevice => {
            let rdev = meta.rdev();
            let tier = opts.tier.unwrap_or_else(|| block_device_tier(rdev));
            // Unknown (no sysfs): try, and let EOPNOTSUPP answer.
            let unmap = sysfs_queue_attr(rdev, "discard_max_bytes").is_none_or(|max| max > 0);
            (tier, unmap)
        }
    };
    Ok(UringDevice {
        info: DeviceInfo {
            name: Arc::from(path.to_string_lossy().as_ref()),
            size_bytes,
            block_size,
            tier,
            caps: Capabilities {
                flush: true,
                // BLKZEROOUT falls back to writing zero pages in the kernel, so it always works.
                write_zeroes: true,
                unmap,
            },
        },
        file,
        ctl: Arc::new(ctl),
        kind,
        zero_range: Cell::new(kind == Kind::RegularFile),
    })
}

impl UringDevice {
    /// True if the device is a raw block device, false for a regular file.
    pub fn is_block_device(&self) -> bool {
        self.kind == Kind::BlockDevice
    }

    /// Closes the device, waiting for the descriptor to be released (dropping it closes it in the
    /// background).
    pub async fn close(self) -> io::Result<()> {
        self.file.close().await.map_err(io::Error::from)
    }

    fn io_error(&self, op: IoOp, offset: u64, len: u64, source: io::Error) -> DeviceError {
        DeviceError::Io {
            device: self.info.name.clone(),
            op,
            offset,
            len,
            source,
        }
    }

    fn unsupported(&self, op: IoOp) -> DeviceError {
        DeviceError::Unsupported {
            device: self.info.name.clone(),
            op,
        }
    }

    /// Runs `job` on the control handle in glommio's blocking thread pool.
    async fn on_blocking_pool(
        &self,
        job: impl FnOnce(&File) -> io::Result<()> + Send + 'static,
    ) -> io::Result<()> {
        let ctl = Arc::clone(&self.ctl);
        glommio::executor().spawn_blocking(move || job(&ctl)).await
    }
}

impl BlockDevice for UringDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    async fn read(&self, offset: u64, buf: &mut DmaBuf) -> Result<(), DeviceError> {
        let len = buf.len();
        check_range(&self.info, IoOp::Read, offset, len as u64)?;
        buf.assert_aligned(self.info.block_size as usize);
        let data = self
            .file
            .read_at_aligned(offset, len)
            .await
            .map_err(|e| self.io_error(IoOp::Read, offset, len as u64, glommio_to_io(e)))?;
        if data.len() != len {
            return Err(self.io_error(
                IoOp::Read,
                offset,
                len as u64,
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short read: {} of {len} bytes", data.len()),
                ),
            ));
        }
        buf.copy_from_slice(&data);
        Ok(())
    }

    async fn write(&self, offset: u64, buf: &DmaBuf) -> Result<(), DeviceError> {
        let len = buf.len();
        check_range(&self.info, IoOp::Write, offset, len as u64)?;
        buf.assert_aligned(self.info.block_size as usize);
        let mut dma = self.file.alloc_dma_buffer(len);
        dma.as_bytes_mut().copy_from_slice(buf);
        let written = self
            .file
            .write_at(dma, offset)
            .await
            .map_err(|e| self.io_error(IoOp::Write, offset, len as u64, glommio_to_io(e)))?;
        if written != len {
            return Err(self.io_error(
                IoOp::Write,
                offset,
                len as u64,
                io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short write: {written} of {len} bytes"),
                ),
            ));
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.file
            .fdatasync()
            .await
            .map_err(|e| self.io_error(IoOp::Flush, 0, 0, glommio_to_io(e)))
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(&self.info, IoOp::WriteZeroes, offset, len)?;
        let result = match self.kind {
            Kind::BlockDevice => {
                self.on_blocking_pool(move |ctl| ioctl_range(ctl, BLKZEROOUT, offset, len))
                    .await
            }
            Kind::RegularFile if self.zero_range.get() => {
                self.on_blocking_pool(move |ctl| {
                    fallocate(
                        ctl,
                        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                    )
                })
                .await
            }
            Kind::RegularFile => return write_zeroes_by_writes(self, offset, len).await,
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if self.kind == Kind::RegularFile && is_unsupported(&e) => {
                // The filesystem has no ZERO_RANGE (or refuses it for this file): stop asking.
                self.zero_range.set(false);
                write_zeroes_by_writes(self, offset, len).await
            }
            Err(e) => Err(self.io_error(IoOp::WriteZeroes, offset, len, e)),
        }
    }

    async fn unmap(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(&self.info, IoOp::Unmap, offset, len)?;
        if !self.info.caps.unmap {
            return Err(self.unsupported(IoOp::Unmap));
        }
        let result = match self.kind {
            Kind::RegularFile => self
                .file
                .deallocate(offset, len)
                .await
                .map_err(glommio_to_io),
            Kind::BlockDevice => {
                self.on_blocking_pool(move |ctl| ioctl_range(ctl, BLKDISCARD, offset, len))
                    .await
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) => Err(self.unsupported(IoOp::Unmap)),
            Err(e) => Err(self.io_error(IoOp::Unmap, offset, len, e)),
        }
    }
}

/// Checks that `block_size` is a power of two from 512 to [`DMA_ALIGN`] and at least
/// `device_block_size`.
fn check_block_size(path: &Path, block_size: u32, device_block_size: u32) -> Result<(), OpenError> {
    let ok = block_size.is_power_of_two()
        && (MIN_BLOCK_SIZE..=DMA_ALIGN as u32).contains(&block_size)
        && block_size >= device_block_size;
    if ok {
        Ok(())
    } else {
        Err(OpenError::BadBlockSize {
            path: path.to_path_buf(),
            block_size,
            device_block_size,
        })
    }
}

/// If the file starts with a hole, writes zeroes over the start of that hole (at most 4 KiB, never
/// past the file's end or into data) and syncs, so that glommio's polling probe, a read at offset
/// 0, has to reach the disk. Zeroes over a hole change no byte of the file.
fn fill_hole_at_start(ctl: &File, file_len: u64) -> io::Result<()> {
    // SAFETY: plain system call on a descriptor we own.
    let data_at = unsafe { libc::lseek(ctl.as_raw_fd(), 0, libc::SEEK_DATA) };
    let hole_len = if data_at >= 0 {
        data_at as u64
    } else {
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // No data anywhere: the whole file is a hole.
            Some(libc::ENXIO) => file_len,
            _ => return Err(err),
        }
    };
    let fill = hole_len.min(file_len).min(DMA_ALIGN as u64) as usize;
    if fill == 0 {
        return Ok(());
    }
    std::os::unix::fs::FileExt::write_all_at(ctl, &[0u8; DMA_ALIGN][..fill], 0)?;
    ctl.sync_data()
}

/// glommio's errors as `io::Error`, keeping the errno (glommio's own conversion turns its
/// "enhanced" errors into messages without one); the device, operation and range are added by
/// [`DeviceError`].
fn glommio_to_io(err: GlommioError<()>) -> io::Error {
    match err.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::from(err),
    }
}

fn is_unsupported(err: &io::Error) -> bool {
    // EOPNOTSUPP == ENOTSUP on Linux; ENOTTY is what an ioctl a driver lacks returns.
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY)
    )
}

fn block_device_size(ctl: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to `size`.
    let rc = unsafe { libc::ioctl(ctl.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

fn block_device_logical_block_size(ctl: &File) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to `size`.
    let rc = unsafe { libc::ioctl(ctl.as_raw_fd(), BLKSSZGET, &mut size as *mut libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(size).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("negative logical block size {size}"),
        )
    })
}

/// BLKDISCARD / BLKZEROOUT on `[offset, offset + len)`.
fn ioctl_range(ctl: &File, request: libc::Ioctl, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: both ioctls read two u64 (start, length) through the pointer, which points to
    // `range`.
    let rc = unsafe { libc::ioctl(ctl.as_raw_fd(), request, range.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn fallocate(ctl: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let too_big = || io::Error::from_raw_os_error(libc::EFBIG);
    let offset = libc::off_t::try_from(offset).map_err(|_| too_big())?;
    let len = libc::off_t::try_from(len).map_err(|_| too_big())?;
    // SAFETY: plain system call on a descriptor we own.
    let rc = unsafe { libc::fallocate(ctl.as_raw_fd(), mode, offset, len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The sysfs directory of the block device `rdev` (its parent disk for a partition).
fn sysfs_block_dir(rdev: u64) -> PathBuf {
    PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ))
}

/// A numeric attribute of the request queue of block device `rdev`, if sysfs has it.
fn sysfs_queue_attr(rdev: u64, attr: &str) -> Option<u64> {
    let dir = sysfs_block_dir(rdev);
    // A partition has no queue/ of its own: it is its disk's.
    [dir.join("queue"), dir.join("../queue")]
        .iter()
        .find_map(|queue| std::fs::read_to_string(queue.join(attr)).ok())
        .and_then(|text| text.trim().parse().ok())
}

fn block_device_tier(rdev: u64) -> Tier {
    if sysfs_queue_attr(rdev, "rotational") == Some(1) {
        return Tier::Hdd;
    }
    let is_nvme = std::fs::canonicalize(sysfs_block_dir(rdev))
        .map(|dir| dir.to_string_lossy().contains("/nvme"))
        .unwrap_or(false);
    if is_nvme { Tier::Nvme } else { Tier::Ssd }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    use glommio::LocalExecutorBuilder;

    /// Registered-buffer memory per test executor: well under the default 8 MiB memlock limit.
    const TEST_IO_MEMORY: usize = 1 << 20;

    fn run<T>(fut: impl Future<Output = T>) -> T {
        LocalExecutorBuilder::default()
            .io_memory(TEST_IO_MEMORY)
            .make()
            .expect("glommio executor")
            .run(fut)
    }

    fn pattern(len: usize, seed: u8) -> DmaBuf {
        let mut buf = DmaBuf::new(len);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed) | 1; // never zero
        }
        buf
    }

    async fn read_back(dev: &UringDevice, offset: u64, len: usize) -> DmaBuf {
        let mut buf = DmaBuf::new(len);
        dev.read(offset, &mut buf).await.expect("read");
        buf
    }

    /// Write, read back, flush, write zeroes, unmap, and every refusal; for any device.
    async fn round_trip(dev: &UringDevice) {
        let bs = u64::from(dev.info().block_size);
        let size = dev.info().size_bytes;

        // 64 KiB starting at block 1, and the very last 4 KiB of the device.
        let data = pattern(64 * 1024, 7);
        dev.write(bs, &data).await.expect("write");
        assert_eq!(&read_back(dev, bs, data.len()).await[..], &data[..]);
        let tail = pattern(4096, 99);
        dev.write(size - 4096, &tail).await.expect("write at end");
        assert_eq!(&read_back(dev, size - 4096, 4096).await[..], &tail[..]);
        dev.flush().await.expect("flush");

        // Zero 8 KiB in the middle of the pattern: only those bytes change.
        let zero_at = bs + 16 * 1024;
        dev.write_zeroes(zero_at, 8192).await.expect("write_zeroes");
        let back = read_back(dev, bs, data.len()).await;
        let (z0, z1) = (16 * 1024, 24 * 1024);
        assert_eq!(&back[..z0], &data[..z0]);
        assert!(back[z0..z1].iter().all(|&b| b == 0));
        assert_eq!(&back[z1..], &data[z1..]);

        // The generic fallback writes through the same device.
        write_zeroes_by_writes(dev, bs, bs)
            .await
            .expect("zeroes by writes");
        let back = read_back(dev, 0, 8192).await;
        assert!(back[bs as usize..2 * bs as usize].iter().all(|&b| b == 0));

        // Unmap: supported, or refused cleanly when the device says it cannot.
        let unmapped = dev.unmap(bs + 32 * 1024, 16 * 1024).await;
        if dev.info().caps.unmap {
            unmapped.expect("unmap");
        } else {
            assert!(
                matches!(unmapped, Err(DeviceError::Unsupported { .. })),
                "{unmapped:?}"
            );
        }
        // Data outside the unmapped range is untouched.
        let back = read_back(dev, bs, data.len()).await;
        assert_eq!(&back[z1..32 * 1024], &data[z1..32 * 1024]);
        assert_eq!(&back[48 * 1024..], &data[48 * 1024..]);

        // Refusals: misaligned, zero-length, past the end, overflowing.
        let one = DmaBuf::new(4096);
        let err = dev.write(bs / 2, &one).await.unwrap_err();
        assert!(matches!(err, DeviceError::Misaligned { .. }), "{err}");
        let err = dev.write_zeroes(0, 0).await.unwrap_err();
        assert!(matches!(err, DeviceError::Misaligned { .. }), "{err}");
        let err = dev.unmap(bs, bs + 1).await.unwrap_err();
        assert!(matches!(err, DeviceError::Misaligned { .. }), "{err}");
        let err = dev.write(size, &one).await.unwrap_err();
        assert!(matches!(err, DeviceError::OutOfRange { .. }), "{err}");
        let mut into = DmaBuf::new(8192);
        let err = dev.read(size - 4096, &mut into).await.unwrap_err();
        assert!(matches!(err, DeviceError::OutOfRange { .. }), "{err}");
        let err = dev.write_zeroes(size, bs).await.unwrap_err();
        assert!(matches!(err, DeviceError::OutOfRange { .. }), "{err}");
        let far = u64::MAX - u64::MAX % bs;
        let err = dev.unmap(far, bs).await.unwrap_err();
        assert!(matches!(err, DeviceError::OutOfRange { .. }), "{err}");
        assert_eq!(err.device(), &*dev.info().name);
        assert!(err.to_string().contains("unmap"), "{err}");
    }

    #[test]
    fn regular_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.img");
        // 1 MiB plus a partial block, which is not usable.
        create_file(&path, (1 << 20) + 100).unwrap();
        let expected = {
            let mut v = std::fs::read(&path).unwrap();
            v.truncate(1 << 20);
            v
        };
        assert!(expected.iter().all(|&b| b == 0));

        let written = run(async {
            let dev = open(&path, UringOptions::default()).await.expect("open");
            let info = dev.info().clone();
            assert!(!dev.is_block_device());
            assert_eq!(info.size_bytes, 1 << 20);
            assert_eq!(info.block_size, DEFAULT_FILE_BLOCK_SIZE);
            assert_eq!(info.tier, Tier::Ssd);
            assert_eq!(
                info.caps,
                Capabilities {
                    flush: true,
                    write_zeroes: true,
                    unmap: true
                }
            );
            round_trip(&dev).await;
            let mut all = DmaBuf::new(1 << 20);
            dev.read(0, &mut all).await.unwrap();
            dev.close().await.unwrap();
            all.to_vec()
        });
        // What the device read is what is in the file, seen without O_DIRECT after close.
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len(), (1 << 20) + 100);
        assert!(on_disk[..1 << 20] == written[..]);

        // Reopened, with an explicit tier.
        run(async {
            let opts = UringOptions {
                tier: Some(Tier::Hdd),
                ..UringOptions::default()
            };
            let dev = open(&path, opts).await.unwrap();
            assert_eq!(dev.info().tier, Tier::Hdd);
            let again = read_back(&dev, 0, 1 << 20).await;
            assert!(again[..] == written[..]);
        });
    }

    #[test]
    fn regular_file_with_512_byte_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev512.img");
        create_file(&path, 256 * 1024).unwrap();
        run(async {
            let opts = UringOptions {
                block_size: Some(512),
                ..UringOptions::default()
            };
            let dev = match open(&path, opts).await {
                Ok(dev) => dev,
                Err(OpenError::BadBlockSize {
                    device_block_size, ..
                }) => {
                    eprintln!(
                        "note: the disk under {} needs {device_block_size}-byte O_DIRECT I/O; \
                         512-byte file blocks correctly refused",
                        dir.path().display()
                    );
                    return;
                }
                Err(e) => panic!("open: {e}"),
            };
            assert_eq!(dev.info().block_size, 512);
            let mut small = DmaBuf::with_alignment(512, 512);
            small.fill(0xa5);
            dev.write(1536, &small).await.unwrap();
            let mut back = DmaBuf::with_alignment(1024, 512);
            dev.read(1024, &mut back).await.unwrap();
            assert!(back[..512].iter().all(|&b| b == 0));
            assert!(back[512..].iter().all(|&b| b == 0xa5));
            dev.write_zeroes(1536, 512).await.unwrap();
            dev.read(1024, &mut back).await.unwrap();
            assert!(back.iter().all(|&b| b == 0));
            round_trip(&dev).await;
        });
    }

    #[test]
    fn open_refuses_what_it_cannot_drive() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small.img");
        std::fs::write(&small, [0u8; 100]).unwrap();
        let good = dir.path().join("good.img");
        create_file(&good, 64 * 1024).unwrap();
        run(async {
            let err = open(dir.path(), UringOptions::default())
                .await
                .err()
                .unwrap();
            assert!(
                matches!(err, OpenError::NotFileOrBlockDevice { .. }),
                "{err}"
            );
            let err = open(dir.path().join("missing"), UringOptions::default())
                .await
                .err()
                .unwrap();
            assert!(
                matches!(
                    err,
                    OpenError::Io {
                        step: OpenStep::Stat,
                        ..
                    }
                ),
                "{err}"
            );
            let err = open(&small, UringOptions::default()).await.err().unwrap();
            assert!(matches!(err, OpenError::TooSmall { .. }), "{err}");
            for bad in [0, 256, 1000, 8192] {
                let opts = UringOptions {
                    block_size: Some(bad),
                    ..UringOptions::default()
                };
                let err = open(&good, opts).await.err().unwrap();
                assert!(matches!(err, OpenError::BadBlockSize { .. }), "{err}");
                assert!(err.to_string().contains("good.img"), "{err}");
            }
            let err = open("/dev/null", UringOptions::default())
                .await
                .err()
                .unwrap();
            assert!(
                matches!(err, OpenError::NotFileOrBlockDevice { .. }),
                "{err}"
            );
        });
    }

    #[test]
    fn create_file_extends_and_never_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.img");
        create_file(&path, 8192).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8192);
        create_file(&path, 1 << 20).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        create_file(&path, 4096).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        let err = create_file(dir.path(), 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn hole_at_start_is_filled_without_changing_a_byte() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.img");
        create_file(&path, 64 * 1024).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.write_all_at(&[0x5a; 4096], 8192).unwrap();
        file.sync_all().unwrap();
        let before = std::fs::read(&path).unwrap();
        fill_hole_at_start(&file, 64 * 1024).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), before);
        // SAFETY: plain system call on a descriptor we own.
        let data_at = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_DATA) };
        assert_eq!(data_at, 0, "offset 0 is still a hole");
        // Idempotent once offset 0 holds data.
        fill_hole_at_start(&file, 64 * 1024).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    /// A loop device over a sparse image; detached on drop, so also when the test fails.
    struct LoopDevice {
        path: PathBuf,
        dir: tempfile::TempDir,
    }

    impl LoopDevice {
        /// Attaches a fresh `size_bytes` image, with `sector_size` if given. `None` (after a
        /// loud message, or a panic under `CI=true`) when this machine cannot.
        fn attach(size_bytes: u64, sector_size: Option<u32>) -> Option<LoopDevice> {
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            let have_losetup = Command::new("losetup")
                .arg("--version")
                .output()
                .is_ok_and(|out| out.status.success());
            if !root || !have_losetup {
                skip_or_fail(&format!("root={root}, losetup found={have_losetup}"));
                return None;
            }
            let dir = tempfile::tempdir().unwrap();
            let image = dir.path().join("loop.img");
            // `truncate -s`: a sparse image of the size.
            create_file(&image, size_bytes).unwrap();
            let mut cmd = Command::new("losetup");
            cmd.arg("--find").arg("--show");
            if let Some(ss) = sector_size {
                cmd.arg("--sector-size").arg(ss.to_string());
            }
            let out = cmd.arg(&image).output().expect("run losetup");
            if !out.status.success() {
                skip_or_fail(&format!(
                    "losetup --find failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
                return None;
            }
            let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
            Some(LoopDevice { path, dir })
        }

        fn image(&self) -> PathBuf {
            self.dir.path().join("loop.img")
        }

        fn sysfs_logical_block_size(&self) -> u32 {
            let name = self
                .path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            std::fs::read_to_string(format!("/sys/block/{name}/queue/logical_block_size"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        }
    }

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            match Command::new("losetup").arg("-d").arg(&self.path).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "losetup -d {} failed: {}",
                    self.path.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => eprintln!("losetup -d {}: {e}", self.path.display()),
            }
        }
    }

    fn skip_or_fail(why: &str) {
        let msg = format!("SKIPPED: needs root and losetup ({why}): uring loop-device test");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}; CI=true, so this is a failure");
        }
        // Straight to the process's stderr: libtest captures `eprintln!` of passing tests, and
        // a skip must never be silent.
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "\n!!!!!!!! {msg} !!!!!!!!\n");
    }

    fn loop_device_round_trip(sector_size: Option<u32>) {
        const SIZE: u64 = 64 << 20;
        let Some(lo) = LoopDevice::attach(SIZE, sector_size) else {
            return;
        };
        let logical = lo.sysfs_logical_block_size();
        if let Some(ss) = sector_size {
            assert_eq!(logical, ss);
        }
        let path = lo.path.clone();
        let data = pattern(8192, 42);
        let offset = 3 * u64::from(logical);
        run(async {
            let dev = open(&path, UringOptions::default()).await.expect("open");
            assert!(dev.is_block_device());
            assert_eq!(dev.info().size_bytes, SIZE);
            assert_eq!(dev.info().block_size, logical);
            assert!(dev.info().caps.flush && dev.info().caps.write_zeroes);
            round_trip(&dev).await;
            // Leave a pattern for the check through the backing image below.
            dev.write(offset, &data).await.unwrap();
            dev.flush().await.unwrap();
            dev.close().await.unwrap();

            // Explicit block sizes: larger than the device's is fine, smaller is refused.
            let opts = UringOptions {
                block_size: Some(4096),
                tier: Some(Tier::Nvme),
            };
            let dev = open(&path, opts).await.expect("open with 4096");
            assert_eq!(dev.info().block_size, 4096);
            assert_eq!(dev.info().tier, Tier::Nvme);
            dev.close().await.unwrap();
            if logical > 512 {
                let opts = UringOptions {
                    block_size: Some(512),
                    ..UringOptions::default()
                };
                let err = open(&path, opts).await.err().unwrap();
                assert!(matches!(err, OpenError::BadBlockSize { .. }), "{err}");
            }
        });
        // The flushed write reached the image behind the loop device.
        let image = std::fs::read(lo.image()).unwrap();
        let at = offset as usize;
        assert!(image[at..at + data.len()] == data[..]);
    }

    #[test]
    fn loop_device_round_trip_native_sectors() {
        loop_device_round_trip(None);
    }

    #[test]
    fn loop_device_round_trip_4k_sectors() {
        loop_device_round_trip(Some(4096));
    }
}
