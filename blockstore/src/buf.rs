//! Aligned DMA buffers.
//!
//! Every byte that crosses a [`crate::BlockDevice`] lives in a [`DmaBuf`]: a heap allocation whose
//! start address and length are multiples of its alignment (4 KiB by default, enough for any
//! O_DIRECT file, raw block device or SPDK bdev with logical blocks up to 4 KiB). The alignment is
//! checked when the buffer is made and asserted again by backends before they hand the pointer to
//! the kernel or to SPDK, so a misaligned buffer fails loudly instead of turning into EINVAL deep in
//! io_uring.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

/// The alignment of every [`DmaBuf`] made by [`DmaBuf::new`]: the largest logical block size that
/// Cairn supports.
pub const DMA_ALIGN: usize = 4096;

/// An owned, zero-initialised, aligned byte buffer for device I/O.
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    align: usize,
}

// SAFETY: `DmaBuf` owns its allocation exclusively, like a `Box<[u8]>`.
unsafe impl Send for DmaBuf {}
// SAFETY: shared references only give `&[u8]`.
unsafe impl Sync for DmaBuf {}

impl DmaBuf {
    /// A zeroed buffer of `len` bytes aligned to [`DMA_ALIGN`]; `len` must be a non-zero multiple
    /// of [`DMA_ALIGN`].
    pub fn new(len: usize) -> Self {
        Self::with_alignment(len, DMA_ALIGN)
    }

    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two of at least 512);
    /// `len` must be a non-zero multiple of `align`.
    pub fn with_alignment(len: usize, align: usize) -> Self {
        assert!(
            align.is_power_of_two(),
            "DMA alignment {align} is not a power of two"
        );
        assert!(align >= 512, "DMA alignment {align} is below 512");
        assert!(len > 0, "DMA buffer of zero bytes");
        assert!(
            len.is_multiple_of(align),
            "DMA buffer length {len} is not a multiple of {align}"
        );
        let layout = Layout::from_size_align(len, align).expect("DMA buffer layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        let buf = Self {
            ptr,
            len,
            cap: len,
            align,
        };
        buf.assert_aligned(align);
        buf
    }

    /// A buffer holding a copy of `data`, padded with zeros up to a multiple of [`DMA_ALIGN`].
    pub fn from_slice(data: &[u8]) -> Self {
        let len = data.len().max(1).next_multiple_of(DMA_ALIGN);
        let mut buf = Self::new(len);
        buf[..data.len()].copy_from_slice(data);
        buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a `DmaBuf` is never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The length the buffer was allocated with.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Shrinks or regrows the visible length within the capacity, so a pooled buffer can carry a
    /// shorter I/O without a new allocation; `len` must be a non-zero multiple of the alignment.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len > 0 && len <= self.cap,
            "DMA buffer length {len} outside 1..={}",
            self.cap
        );
        assert!(
            len.is_multiple_of(self.align),
            "DMA buffer length {len} is not a multiple of {}",
            self.align
        );
        self.len = len;
    }

    /// The alignment the buffer was made with.
    pub fn alignment(&self) -> usize {
        self.align
    }

    /// Panics unless the start address and the length are multiples of `block_size`.
    ///
    /// Backends call this before every I/O (a pair assertion with the one in the constructor).
    pub fn assert_aligned(&self, block_size: usize) {
        assert!(
            (self.ptr.as_ptr() as usize).is_multiple_of(block_size),
            "DMA buffer at {:p} is not aligned to {block_size}",
            self.ptr
        );
        assert!(
            self.len.is_multiple_of(block_size),
            "DMA buffer length {} is not a multiple of {block_size}",
            self.len
        );
    }

    /// Raw pointer to the first byte, for backends.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Raw mutable pointer to the first byte, for backends.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for DmaBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for DmaBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `len` initialised bytes owned exclusively by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, self.align).expect("DMA buffer layout");
        // SAFETY: allocated in `with_alignment` with this very layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaBuf")
            .field("len", &self.len)
            .field("align", &self.align)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_buffer_is_zeroed_and_aligned() {
        let buf = DmaBuf::new(8192);
        assert_eq!(buf.len(), 8192);
        assert!(buf.iter().all(|&b| b == 0));
        buf.assert_aligned(4096);
    }

    #[test]
    fn from_slice_pads() {
        let buf = DmaBuf::from_slice(b"hello");
        assert_eq!(buf.len(), 4096);
        assert_eq!(&buf[..5], b"hello");
        assert!(buf[5..].iter().all(|&b| b == 0));
    }

    #[test]
    fn set_len_shrinks_and_regrows_within_capacity() {
        let mut buf = DmaBuf::new(16384);
        buf[8192] = 7;
        buf.set_len(4096);
        assert_eq!((buf.len(), buf.capacity()), (4096, 16384));
        buf.set_len(16384);
        assert_eq!(buf[8192], 7);
    }

    #[test]
    #[should_panic(expected = "not a multiple")]
    fn unaligned_length_panics() {
        let _ = DmaBuf::new(1000);
    }
}
