//! SPDK bdev backend (feature `spdk`).
//!
//! Owns everything Cairn needs to put a [`BlockDevice`](crate::BlockDevice) on an SPDK bdev
//! (an NVMe namespace driven from user space, or a malloc/aio/uring bdev): bringing SPDK up and
//! down in a process that runs its own threads ([`SpdkEnv`]), the per-core SPDK thread
//! ([`SpdkThread`]), and the device itself ([`SpdkDevice`]). The FFI is hand-written and minimal
//! (`ffi.rs`): there is no SPDK crate, and SPDK is not installed where CI runs, so the backend
//! must type-check without SPDK's headers. `build.rs` links it where `pkg-config` finds SPDK;
//! `hw-tests/spdk/run.sh` runs it against a malloc bdev. SPDK v24.05 through v25.x.
//!
//! # Design
//!
//! **Threads.** SPDK delivers completions as messages and pollers on an `spdk_thread`, and
//! something must call `spdk_thread_poll` on it. Instead of SPDK's reactors, each core owns an
//! [`SpdkThread`] (the threading library is initialised without a scheduler, so nobody else
//! polls it) and every device opened on that core shares it: one descriptor and one I/O channel
//! per device per core, like any bdev consumer. Devices and threads are `!Send`.
//!
//! **Cooperative polling.** An operation's future submits the I/O and, whenever it is polled
//! and the I/O is not complete, calls `spdk_thread_poll` once and wakes itself. This needs no
//! extra task per core and works under any executor (glommio, or `pollster` in tests), and the
//! completion callback always runs on the owning core. The price is that a core with I/O
//! outstanding spins, which is SPDK's poll-mode model anyway: the executor runs its other tasks
//! between polls. Completions for other I/Os on the same thread run inside whichever future
//! polls, so each context also stores its waker and the callback wakes it. The alternative, a
//! per-core poller task that alone drives the thread while futures only wait, saves redundant
//! polls under deep queues and is the intended next step once the runtime integration exists.
//!
//! **Completion slots.** Each I/O has a small context (`IoCtx`): a `Cell<Option<bool>>` filled by
//! the C completion callback, a waker, and the bounce buffer. The callback owns a reference to
//! it, so a future dropped mid-I/O leaves nothing dangling: the device keeps writing into memory
//! that stays alive until the callback frees it, and dropping the device waits for all
//! outstanding I/O before closing. The context is allocated per I/O for now, which the style
//! guide forbids on the hot path; a per-channel pool sized to the queue depth will replace it.
//!
//! **Bounce buffers.** SPDK can only DMA from memory its env has pinned and can translate to
//! IOVAs (huge pages from `spdk_dma_*alloc`); [`DmaBuf`](crate::DmaBuf) is ordinary aligned heap
//! memory. So reads and writes copy through an `spdk_dma_zmalloc` buffer, which also makes
//! cancellation safe (the caller's buffer is never in the device's hands). A later change can
//! make `DmaBuf` allocate from SPDK's env and hand its pointer straight to the bdev.
//!
//! **Back-pressure.** `-ENOMEM` from a submission means the bdev layer's `spdk_bdev_io` pool is
//! empty: the future polls the thread (completions refill the pool) and retries, and counts it
//! ([`SpdkDevice::nomem_retries`]). Likewise an empty DMA pool while I/O is in flight.
//!
//! **Removal.** A hot-removed bdev (`SPDK_BDEV_EVENT_REMOVE`) turns the device offline: new
//! operations fail with [`DeviceError::Offline`](crate::DeviceError::Offline), in-flight ones
//! complete with errors from SPDK, and dropping the device closes the descriptor so the removal
//! can finish.

mod device;
mod env;
mod ffi;
mod thread;

pub use device::{OpenError, SpdkDevice};
pub use env::{ConfigPhase, EnvError, EnvOptions, SpdkEnv};
pub use thread::{SpdkThread, ThreadError};

#[cfg(test)]
mod tests;
