//! [`SpdkDevice`]: a [`BlockDevice`] over one SPDK bdev.
//!
//! One descriptor and one I/O channel per device, both bound to the [`SpdkThread`] of the core
//! that opened it. Each operation is a future that submits to the bdev layer, with an
//! [`IoCtx`] as the completion callback's argument, and then drives the SPDK thread itself
//! until the callback has filled the context (see the module documentation of `spdk` for why).

use std::cell::Cell;
use std::ffi::{CString, c_int, c_void};
use std::future::poll_fn;
use std::io;
use std::ptr::{self, NonNull};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use super::env::errno_error;
use super::ffi;
use super::thread::SpdkThread;
use crate::buf::{DMA_ALIGN, DmaBuf};
use crate::device::{BlockDevice, Capabilities, DeviceError, DeviceInfo, IoOp, Tier, check_range};

/// Why [`SpdkDevice::open`] failed; every variant names the bdev.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The bdev name contains a NUL byte.
    #[error("SPDK bdev {bdev:?}: the name contains a NUL byte")]
    NulInName {
        /// The requested bdev name.
        bdev: Arc<str>,
    },
    /// `spdk_bdev_open_ext` failed (`ENODEV`: no such bdev; `EPERM`: claimed by a module).
    #[error("SPDK bdev {bdev}: open failed: {source}")]
    Open {
        /// The bdev name.
        bdev: Arc<str>,
        /// The errno SPDK returned.
        #[source]
        source: io::Error,
    },
    /// The block size or size of the bdev is outside what Cairn supports (logical blocks are a
    /// power of two from 512 to 4096 bytes, as for every other backend).
    #[error("SPDK bdev {bdev}: unsupported geometry: {num_blocks} blocks of {block_size} bytes")]
    Geometry {
        /// The bdev name.
        bdev: Arc<str>,
        /// Logical block size in bytes.
        block_size: u32,
        /// Size in logical blocks.
        num_blocks: u64,
    },
    /// `spdk_bdev_get_io_channel` returned NULL (out of memory, or the thread is exiting).
    #[error("SPDK bdev {bdev}: no I/O channel could be created")]
    NoChannel {
        /// The bdev name.
        bdev: Arc<str>,
    },
}

/// State shared by the device, its in-flight I/O contexts and the bdev event callback.
#[derive(Default)]
struct DeviceState {
    /// SPDK announced the bdev's removal: fail new I/O as offline.
    removed: Cell<bool>,
    /// I/Os submitted and not yet completed; the device waits for zero before closing.
    in_flight: Cell<usize>,
    /// Submissions refused with `-ENOMEM` and retried.
    nomem_retries: Cell<u64>,
}

/// A block device backed by an SPDK bdev, owned by one core.
///
/// Open it on the core whose [`SpdkThread`] will poll it. Awaiting one of its operations polls
/// that thread, which also completes the other devices' I/O on it.
pub struct SpdkDevice {
    info: DeviceInfo,
    thread: Rc<SpdkThread>,
    desc: NonNull<ffi::spdk_bdev_desc>,
    channel: NonNull<ffi::spdk_io_channel>,
    state: Rc<DeviceState>,
    /// Alignment of bounce buffers: the bdev's required buffer alignment, at least [`DMA_ALIGN`].
    bounce_align: usize,
}

impl SpdkDevice {
    /// Opens bdev `bdev_name` read-write on `thread` and takes an I/O channel on it.
    ///
    /// `tier` is reported in [`DeviceInfo::tier`]: a bdev does not say whether it is NVMe flash
    /// or something else behind a generic module (aio, uring), so the caller does.
    pub fn open(thread: Rc<SpdkThread>, bdev_name: &str, tier: Tier) -> Result<Self, OpenError> {
        let bdev_label: Arc<str> = Arc::from(bdev_name);
        let c_name = CString::new(bdev_name).map_err(|_| OpenError::NulInName {
            bdev: bdev_label.clone(),
        })?;
        let state = Rc::new(DeviceState::default());
        let _entered = thread.enter();

        let mut desc = ptr::null_mut();
        // SAFETY: `c_name` is a valid C string; `bdev_event` matches `spdk_bdev_event_cb_t`; its
        // context points at `state`, which the device keeps alive until after `spdk_bdev_close`
        // (SPDK calls the callback only on this thread and never after the close). The current
        // SPDK thread is `thread`, to which the descriptor gets bound.
        let rc = unsafe {
            ffi::spdk_bdev_open_ext(
                c_name.as_ptr(),
                true,
                Some(bdev_event),
                Rc::as_ptr(&state).cast_mut().cast(),
                &mut desc,
            )
        };
        if rc != 0 {
            return Err(OpenError::Open {
                bdev: bdev_label,
                source: errno_error(rc),
            });
        }
        let desc = NonNull::new(desc).expect("spdk_bdev_open_ext succeeded without a descriptor");
        let close = || {
            // SAFETY: `desc` is open, on the current thread, with no channel taken from it.
            unsafe { ffi::spdk_bdev_close(desc.as_ptr()) }
        };

        // SAFETY: `desc` is open; the bdev it refers to lives at least as long as the descriptor.
        let bdev = unsafe { ffi::spdk_bdev_desc_get_bdev(desc.as_ptr()) };
        // SAFETY: `bdev` is live (above); these are plain getters.
        let (block_size, num_blocks, buf_align, caps) = unsafe {
            (
                ffi::spdk_bdev_get_block_size(bdev),
                ffi::spdk_bdev_get_num_blocks(bdev),
                ffi::spdk_bdev_get_buf_align(bdev),
                Capabilities {
                    flush: ffi::spdk_bdev_io_type_supported(bdev, ffi::SPDK_BDEV_IO_TYPE_FLUSH),
                    write_zeroes: ffi::spdk_bdev_io_type_supported(
                        bdev,
                        ffi::SPDK_BDEV_IO_TYPE_WRITE_ZEROES,
                    ),
                    unmap: ffi::spdk_bdev_io_type_supported(bdev, ffi::SPDK_BDEV_IO_TYPE_UNMAP),
                    // The bdev API has no FUA flag: a durable write is a write and a flush.
                    fua: false,
                },
            )
        };
        let size_bytes = num_blocks.checked_mul(u64::from(block_size));
        let geometry_ok = block_size.is_power_of_two()
            && (512..=DMA_ALIGN as u32).contains(&block_size)
            && num_blocks > 0
            && buf_align.is_power_of_two();
        let Some(size_bytes) = size_bytes.filter(|_| geometry_ok) else {
            close();
            return Err(OpenError::Geometry {
                bdev: bdev_label,
                block_size,
                num_blocks,
            });
        };

        // SAFETY: `desc` is open and the current SPDK thread is `thread`, which the channel is
        // bound to.
        let channel = unsafe { ffi::spdk_bdev_get_io_channel(desc.as_ptr()) };
        let Some(channel) = NonNull::new(channel) else {
            close();
            return Err(OpenError::NoChannel { bdev: bdev_label });
        };

        Ok(Self {
            info: DeviceInfo {
                name: bdev_label,
                size_bytes,
                block_size,
                tier,
                caps,
            },
            thread: Rc::clone(&thread),
            desc,
            channel,
            state,
            bounce_align: buf_align.max(DMA_ALIGN),
        })
    }

    /// True once SPDK has announced the bdev's removal; every later operation fails with
    /// [`DeviceError::Offline`]. Drop the device to let the removal finish.
    pub fn is_offline(&self) -> bool {
        self.state.removed.get()
    }

    /// How many submissions SPDK refused for lack of `spdk_bdev_io`s (`-ENOMEM`) and were
    /// retried: a measure of back-pressure (raise `bdev_io_pool_size` if it grows fast).
    pub fn nomem_retries(&self) -> u64 {
        self.state.nomem_retries.get()
    }

    /// An SPDK DMA buffer of `len` bytes. Running out of DMA memory while I/O is in flight is
    /// back-pressure (completions free bounce buffers); with nothing in flight it is an error.
    async fn bounce(&self, op: IoOp, offset: u64, len: u64) -> Result<Bounce, DeviceError> {
        poll_fn(|cx| {
            if let Some(bounce) = Bounce::zeroed(len as usize, self.bounce_align) {
                return Poll::Ready(Ok(bounce));
            }
            if self.state.in_flight.get() == 0 {
                return Poll::Ready(Err(self.io_error(op, offset, len, libc::ENOMEM)));
            }
            self.thread.poll();
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    }

    /// Submits one operation and waits for its completion; returns the context, whose bounce
    /// buffer a read copies out of.
    async fn execute(
        &self,
        op: IoOp,
        offset: u64,
        len: u64,
        bounce: Option<Bounce>,
    ) -> Result<Rc<IoCtx>, DeviceError> {
        let ctx = Rc::new(IoCtx {
            success: Cell::new(None),
            waker: Cell::new(None),
            bounce,
            device: Rc::clone(&self.state),
        });
        let mut submitted = false;
        let success = poll_fn(|cx| {
            if !submitted {
                if self.state.removed.get() {
                    return Poll::Ready(Err(self.offline(op, offset)));
                }
                match self.submit(op, offset, len, &ctx) {
                    0 => submitted = true,
                    rc if rc == -libc::ENOMEM => {
                        // Back-pressure: let completions return `spdk_bdev_io`s to the pool,
                        // then try again on the next poll.
                        let retries = &self.state.nomem_retries;
                        retries.set(retries.get() + 1);
                        self.thread.poll();
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    rc => {
                        let errno = rc.checked_abs().unwrap_or(libc::EINVAL);
                        return Poll::Ready(Err(self.io_error(op, offset, len, errno)));
                    }
                }
            }
            if let Some(success) = ctx.success.get() {
                return Poll::Ready(Ok(success));
            }
            ctx.set_waker(cx.waker());
            self.thread.poll();
            if let Some(success) = ctx.success.get() {
                return Poll::Ready(Ok(success));
            }
            // Cooperative polling: nobody else is guaranteed to poll the SPDK thread, so ask to
            // be polled again; the executor runs its other tasks in between.
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await?;
        if !success {
            return Err(self.io_error(op, offset, len, libc::EIO));
        }
        Ok(ctx)
    }

    /// One submission attempt: 0, or SPDK's negated errno (then the callback will not run).
    fn submit(&self, op: IoOp, offset: u64, len: u64, ctx: &Rc<IoCtx>) -> c_int {
        let _entered = self.thread.enter();
        let buf = ctx
            .bounce
            .as_ref()
            .map_or(ptr::null_mut(), |bounce| bounce.ptr.as_ptr());
        assert!(
            !matches!(op, IoOp::Read | IoOp::Write) || !buf.is_null(),
            "{op} submitted without a buffer"
        );
        // Counted before the call so that the count never underflows, whatever SPDK does.
        let in_flight = &self.state.in_flight;
        in_flight.set(in_flight.get() + 1);
        // The callback's reference; `io_complete` turns it back into an `Rc` and drops it.
        let cb_arg = Rc::into_raw(Rc::clone(ctx)).cast_mut().cast::<c_void>();
        let (desc, ch) = (self.desc.as_ptr(), self.channel.as_ptr());
        let cb: ffi::spdk_bdev_io_completion_cb = Some(io_complete);
        // SAFETY: `desc` and `ch` are open and bound to `self.thread`, which is current. `buf`
        // (reads and writes) is an SPDK DMA buffer of `len` bytes owned by `ctx`, which the
        // callback keeps alive until the I/O completes, even if this future is dropped. The
        // range was checked against the device, so SPDK's own checks pass. `cb_arg` is a
        // leaked `Rc<IoCtx>` that `io_complete` reclaims exactly once.
        let rc = unsafe {
            match op {
                IoOp::Read => ffi::spdk_bdev_read(desc, ch, buf.cast(), offset, len, cb, cb_arg),
                IoOp::Write => ffi::spdk_bdev_write(desc, ch, buf.cast(), offset, len, cb, cb_arg),
                IoOp::Flush => ffi::spdk_bdev_flush(desc, ch, offset, len, cb, cb_arg),
                IoOp::WriteZeroes => ffi::spdk_bdev_write_zeroes(desc, ch, offset, len, cb, cb_arg),
                IoOp::Unmap => ffi::spdk_bdev_unmap(desc, ch, offset, len, cb, cb_arg),
            }
        };
        if rc != 0 {
            in_flight.set(in_flight.get() - 1);
            // SAFETY: SPDK refused the I/O, so the callback will never reclaim `cb_arg`.
            drop(unsafe { Rc::from_raw(cb_arg.cast::<IoCtx>().cast_const()) });
        }
        rc
    }

    fn io_error(&self, op: IoOp, offset: u64, len: u64, errno: i32) -> DeviceError {
        DeviceError::Io {
            device: self.info.name.clone(),
            op,
            offset,
            len,
            source: io::Error::from_raw_os_error(errno),
        }
    }

    fn offline(&self, op: IoOp, offset: u64) -> DeviceError {
        DeviceError::Offline {
            device: self.info.name.clone(),
            op,
            offset,
        }
    }
}

impl BlockDevice for SpdkDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    async fn read(&self, offset: u64, buf: &mut DmaBuf) -> Result<(), DeviceError> {
        let len = buf.len() as u64;
        check_range(&self.info, IoOp::Read, offset, len)?;
        buf.assert_aligned(self.info.block_size as usize);
        let bounce = self.bounce(IoOp::Read, offset, len).await?;
        let ctx = self.execute(IoOp::Read, offset, len, Some(bounce)).await?;
        let data = ctx
            .completed_data()
            .expect("a completed read owns its bounce buffer");
        assert_eq!(data.len(), buf.len(), "bounce buffer length");
        buf.copy_from_slice(data);
        Ok(())
    }

    async fn write(&self, offset: u64, buf: &DmaBuf) -> Result<(), DeviceError> {
        let len = buf.len() as u64;
        check_range(&self.info, IoOp::Write, offset, len)?;
        buf.assert_aligned(self.info.block_size as usize);
        let mut bounce = self.bounce(IoOp::Write, offset, len).await?;
        bounce.as_mut_slice().copy_from_slice(buf);
        self.execute(IoOp::Write, offset, len, Some(bounce)).await?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        if !self.info.caps.flush {
            // No volatile cache to flush (the `Capabilities::flush` contract).
            return Ok(());
        }
        self.execute(IoOp::Flush, 0, self.info.size_bytes, None)
            .await?;
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(&self.info, IoOp::WriteZeroes, offset, len)?;
        // Without the offload the bdev layer writes from its shared zero buffer, which is still
        // cheaper than sending our own zero buffers through bounce copies.
        self.execute(IoOp::WriteZeroes, offset, len, None).await?;
        Ok(())
    }

    async fn unmap(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(&self.info, IoOp::Unmap, offset, len)?;
        if !self.info.caps.unmap {
            return Err(DeviceError::Unsupported {
                device: self.info.name.clone(),
                op: IoOp::Unmap,
            });
        }
        self.execute(IoOp::Unmap, offset, len, None).await?;
        Ok(())
    }
}

impl Drop for SpdkDevice {
    fn drop(&mut self) {
        // The channel must outlive every I/O submitted on it, including those whose futures
        // were dropped. A device that never completes them hangs here: SPDK offers no way to
        // abandon an I/O, and closing under it would be a use-after-free.
        while self.state.in_flight.get() > 0 {
            self.thread.poll();
        }
        {
            let _entered = self.thread.enter();
            // SAFETY: no I/O is in flight; the channel and descriptor were taken on
            // `self.thread`, which is current, and are released exactly once. After the close
            // SPDK no longer calls `bdev_event`, so `state` may go.
            unsafe {
                ffi::spdk_put_io_channel(self.channel.as_ptr());
                ffi::spdk_bdev_close(self.desc.as_ptr());
            }
        }
        // Run the deferred channel release now rather than at some later poll.
        self.thread.poll();
    }
}

impl std::fmt::Debug for SpdkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpdkDevice")
            .field("info", &self.info)
            .field("in_flight", &self.state.in_flight.get())
            .field("removed", &self.state.removed.get())
            .finish()
    }
}

/// The completion slot of one I/O, shared by its future and SPDK's completion callback.
///
/// Allocated per I/O (an `Rc` and, for reads and writes, a DMA bounce buffer). That breaks the
/// "no allocation per I/O" rule on purpose for this first version; the planned shape is a
/// per-channel pool of contexts sized to the queue depth, with buffers from SPDK's env so that
/// no bounce is needed.
struct IoCtx {
    /// `None` while in flight; then whether SPDK reported success.
    success: Cell<Option<bool>>,
    /// The task to wake on completion, in case another task polls the SPDK thread.
    waker: Cell<Option<Waker>>,
    /// The DMA memory the device reads from or writes into; freed with the last reference,
    /// which is the callback's if the future was dropped first.
    bounce: Option<Bounce>,
    device: Rc<DeviceState>,
}

impl IoCtx {
    fn set_waker(&self, waker: &Waker) {
        let current = self.waker.take();
        self.waker.set(Some(match current {
            Some(current) if current.will_wake(waker) => current,
            _ => waker.clone(),
        }));
    }

    /// The bounce buffer's bytes, once the device is done with them.
    fn completed_data(&self) -> Option<&[u8]> {
        self.success.get()?;
        let bounce = self.bounce.as_ref()?;
        // SAFETY: the I/O has completed, so the device no longer writes to the buffer, and
        // nothing else writes to it while `self` is borrowed.
        Some(unsafe { std::slice::from_raw_parts(bounce.ptr.as_ptr(), bounce.len) })
    }
}

/// `spdk_bdev_io_completion_cb` of every I/O.
unsafe extern "C" fn io_complete(
    bdev_io: *mut ffi::spdk_bdev_io,
    success: bool,
    cb_arg: *mut c_void,
) {
    // SAFETY: `cb_arg` is the `Rc<IoCtx>` leaked by `SpdkDevice::submit` for this I/O; SPDK
    // calls this exactly once per accepted I/O, on the thread that submitted it.
    let ctx = unsafe { Rc::from_raw(cb_arg.cast::<IoCtx>().cast_const()) };
    // SAFETY: `bdev_io` is the completed I/O, released exactly once and not used afterwards.
    unsafe { ffi::spdk_bdev_free_io(bdev_io) };
    ctx.success.set(Some(success));
    let in_flight = &ctx.device.in_flight;
    in_flight.set(in_flight.get() - 1);
    if let Some(waker) = ctx.waker.take() {
        waker.wake();
    }
}

/// `spdk_bdev_event_cb_t` of every descriptor.
unsafe extern "C" fn bdev_event(
    kind: ffi::spdk_bdev_event_type,
    _bdev: *mut ffi::spdk_bdev,
    event_ctx: *mut c_void,
) {
    if kind == ffi::SPDK_BDEV_EVENT_REMOVE {
        // SAFETY: `event_ctx` is the device's `DeviceState`, alive until after
        // `spdk_bdev_close`, after which SPDK calls no event callback; called on the thread
        // that opened the descriptor.
        let state = unsafe { &*event_ctx.cast::<DeviceState>().cast_const() };
        state.removed.set(true);
    }
    // Resize and media-management events need nothing: the size is read once at open.
}

/// A zeroed buffer from SPDK's DMA-able (pinned, IOVA-translated) huge page memory.
struct Bounce {
    ptr: NonNull<u8>,
    len: usize,
}

impl Bounce {
    /// `None` when SPDK's memory is exhausted.
    fn zeroed(len: usize, align: usize) -> Option<Self> {
        assert!(len > 0, "empty bounce buffer");
        assert!(align.is_power_of_two(), "bounce alignment {align}");
        // SAFETY: plain allocation; a NULL `unused` pointer is allowed.
        let raw = unsafe { ffi::spdk_dma_zmalloc(len, align, ptr::null_mut()) };
        let ptr = NonNull::new(raw.cast::<u8>())?;
        assert!(
            (ptr.as_ptr() as usize).is_multiple_of(align),
            "spdk_dma_zmalloc ignored alignment"
        );
        Some(Self { ptr, len })
    }

    /// The bytes, while no I/O uses them (guaranteed by `&mut`: once submitted, the buffer is
    /// only reachable through a shared `Rc<IoCtx>`).
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of `len` initialised (zeroed) bytes, exclusively
        // borrowed through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated by `spdk_dma_zmalloc`, freed once; no I/O uses it any more (the last
        // `IoCtx` reference is gone only after completion).
        unsafe { ffi::spdk_dma_free(self.ptr.as_ptr().cast()) }
    }
}
