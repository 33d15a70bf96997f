//! In-memory device.
//!
//! Sparse: memory is taken in 64 KiB chunks only where something was written, so a simulated
//! 1 GiB device costs what was written to it, and a crash snapshot copies only those chunks.
//! Everything completes at once and is durable at once (there is no volatile cache; wrap it in
//! [`crate::faulty::FaultyDevice`] for one).

use std::cell::RefCell;
use std::sync::Arc;

use crate::buf::DmaBuf;
use crate::device::{BlockDevice, Capabilities, DeviceError, DeviceInfo, IoOp, Tier, check_range};

const CHUNK_BYTES: usize = 64 * 1024;

/// The bytes of a sparse in-memory device, without the device around them.
#[derive(Clone, Default)]
pub struct MemImage {
    chunks: Vec<Option<Box<[u8]>>>,
}

impl MemImage {
    fn with_size(size_bytes: u64) -> Self {
        let n = (size_bytes as usize).div_ceil(CHUNK_BYTES);
        Self {
            chunks: vec![None; n],
        }
    }

    /// Copies `out.len()` bytes at `offset` into `out` (unwritten bytes read as zero).
    pub fn read(&self, offset: u64, out: &mut [u8]) {
        let mut pos = offset as usize;
        let mut done = 0;
        while done < out.len() {
            let (idx, off) = (pos / CHUNK_BYTES, pos % CHUNK_BYTES);
            let n = (CHUNK_BYTES - off).min(out.len() - done);
            match &self.chunks[idx] {
                Some(chunk) => out[done..done + n].copy_from_slice(&chunk[off..off + n]),
                None => out[done..done + n].fill(0),
            }
            pos += n;
            done += n;
        }
    }

    /// Copies `data` to `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let mut pos = offset as usize;
        let mut done = 0;
        while done < data.len() {
            let (idx, off) = (pos / CHUNK_BYTES, pos % CHUNK_BYTES);
            let n = (CHUNK_BYTES - off).min(data.len() - done);
            let chunk = self.chunks[idx].get_or_insert_with(|| vec![0u8; CHUNK_BYTES].into());
            chunk[off..off + n].copy_from_slice(&data[done..done + n]);
            pos += n;
            done += n;
        }
    }

    /// Zeroes `len` bytes at `offset`, releasing whole chunks.
    pub fn zero(&mut self, offset: u64, len: u64) {
        let (mut pos, end) = (offset as usize, (offset + len) as usize);
        while pos < end {
            let (idx, off) = (pos / CHUNK_BYTES, pos % CHUNK_BYTES);
            let n = (CHUNK_BYTES - off).min(end - pos);
            if n == CHUNK_BYTES {
                self.chunks[idx] = None;
            } else if let Some(chunk) = &mut self.chunks[idx] {
                chunk[off..off + n].fill(0);
            }
            pos += n;
        }
    }
}

/// A device held in memory.
pub struct MemDevice {
    info: DeviceInfo,
    image: RefCell<MemImage>,
}

impl MemDevice {
    /// A zeroed device of `size_bytes` (rounded down to `block_size`) with the given block size.
    pub fn new(name: &str, size_bytes: u64, block_size: u32) -> Self {
        assert!(
            block_size.is_power_of_two() && (512..=4096).contains(&block_size),
            "block size {block_size} must be a power of two from 512 to 4096"
        );
        let size_bytes = size_bytes - size_bytes % u64::from(block_size);
        Self::from_image(
            name,
            MemImage::with_size(size_bytes),
            size_bytes,
            block_size,
        )
    }

    /// A device over an existing image (for instance the media left by a simulated power cut).
    pub fn from_image(name: &str, image: MemImage, size_bytes: u64, block_size: u32) -> Self {
        assert!(image.chunks.len() * CHUNK_BYTES >= size_bytes as usize);
        Self {
            info: DeviceInfo {
                name: Arc::from(name),
                size_bytes,
                block_size,
                tier: Tier::Mem,
                caps: Capabilities {
                    flush: true,
                    write_zeroes: true,
                    unmap: true,
                    // Every write is durable at once.
                    fua: true,
                },
            },
            image: RefCell::new(image),
        }
    }

    /// A copy of the current bytes.
    pub fn image(&self) -> MemImage {
        self.image.borrow().clone()
    }

    /// Reads bytes without alignment rules (for tests and tools that poke at media).
    pub fn peek(&self, offset: u64, out: &mut [u8]) {
        self.image.borrow().read(offset, out);
    }

    /// Writes bytes without alignment rules (for tests that corrupt media on purpose).
    pub fn poke(&self, offset: u64, data: &[u8]) {
        self.image.borrow_mut().write(offset, data);
    }

    /// The whole device as one byte vector (for writing an image file).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.info.size_bytes as usize];
        self.image.borrow().read(0, &mut out);
        out
    }
}

impl BlockDevice for MemDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    async fn read(&self, offset: u64, buf: &mut DmaBuf) -> Result<(), DeviceError> {
        check_range(&self.info, IoOp::Read, offset, buf.len() as u64)?;
        self.image.borrow().read(offset, buf);
        Ok(())
    }

    async fn write(&self, offset: u64, buf: &DmaBuf) -> Result<(), DeviceError> {
        check_range(&self.info, IoOp::Write, offset, buf.len() as u64)?;
        self.image.borrow_mut().write(offset, buf);
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    async fn write_fua(&self, offset: u64, buf: &DmaBuf) -> Result<(), DeviceError> {
        self.write(offset, buf).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(&self.info, IoOp::WriteZeroes, offset, len)?;
        self.image.borrow_mut().zero(offset, len);
        Ok(())
    }

    async fn unmap(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(&self.info, IoOp::Unmap, offset, len)?;
        self.image.borrow_mut().zero(offset, len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_back_what_was_written_across_chunks() {
        let dev = MemDevice::new("m", 1 << 20, 512);
        let mut buf = DmaBuf::new(128 * 1024);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = i as u8;
        }
        pollster::block_on(dev.write(60 * 1024, &buf)).unwrap();
        let mut back = DmaBuf::new(128 * 1024);
        pollster::block_on(dev.read(60 * 1024, &mut back)).unwrap();
        assert_eq!(&back[..], &buf[..]);
    }

    #[test]
    fn rejects_misaligned_and_out_of_range() {
        let dev = MemDevice::new("m", 1 << 20, 4096);
        let buf = DmaBuf::new(4096);
        let err = pollster::block_on(dev.write(512, &buf)).unwrap_err();
        assert!(matches!(err, DeviceError::Misaligned { .. }), "{err}");
        let err = pollster::block_on(dev.write(1 << 20, &buf)).unwrap_err();
        assert!(matches!(err, DeviceError::OutOfRange { .. }), "{err}");
    }
}
