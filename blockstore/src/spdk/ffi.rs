//! Hand-written bindings to the parts of SPDK's C API that the backend calls, and nothing else.
//!
//! There is no SPDK crate on crates.io (see `DEPENDENCIES.md`), and a bindgen run would need SPDK's
//! headers at build time, so the declarations are copied by hand from SPDK's public headers
//! (`spdk/bdev.h`, `spdk/thread.h`, `spdk/env.h`, `spdk/init.h`, `spdk/rpc.h`). Every item was
//! compared against the v24.05, v24.09 and v25.09 headers; the two structures whose layout
//! matters are pinned by compile-time assertions below. Opaque SPDK objects are zero-sized
//! `#[repr(C)]` types that can only be handled behind raw pointers (the Rustonomicon pattern), so
//! safe code can never build or move one.
//!
//! Libraries: `libspdk_bdev` (bdev calls), `libspdk_thread` (threads, I/O channels),
//! `libspdk_env_dpdk` (environment, DMA memory), `libspdk_init` (subsystems, JSON config) and
//! `libspdk_rpc` (RPC state). `build.rs` finds them with `pkg-config`.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void};
use std::marker::{PhantomData, PhantomPinned};

macro_rules! opaque {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        #[repr(C)]
        pub struct $name {
            _data: [u8; 0],
            _marker: PhantomData<(*mut u8, PhantomPinned)>,
        }
    )*};
}

opaque! {
    /// `struct spdk_bdev`: a block device registered with the bdev layer.
    spdk_bdev;
    /// `struct spdk_bdev_desc`: an open handle on a bdev, bound to the SPDK thread that opened it.
    spdk_bdev_desc;
    /// `struct spdk_bdev_io`: one I/O inside the bdev layer, handed to the completion callback.
    spdk_bdev_io;
    /// `struct spdk_io_channel`: a per-thread submission context for one descriptor.
    spdk_io_channel;
    /// `struct spdk_thread`: SPDK's lightweight thread (message queue + pollers).
    spdk_thread;
    /// `struct spdk_cpuset`: only ever passed as NULL here.
    spdk_cpuset;
    /// `struct spdk_pci_addr`: only ever passed as NULL here.
    spdk_pci_addr;
}

/// `enum spdk_bdev_io_type` (`spdk/bdev.h`); only the values the backend asks about. They have
/// been stable since the enum was introduced.
pub type spdk_bdev_io_type = c_int;
/// `SPDK_BDEV_IO_TYPE_UNMAP`.
pub const SPDK_BDEV_IO_TYPE_UNMAP: spdk_bdev_io_type = 3;
/// `SPDK_BDEV_IO_TYPE_FLUSH`.
pub const SPDK_BDEV_IO_TYPE_FLUSH: spdk_bdev_io_type = 4;
/// `SPDK_BDEV_IO_TYPE_WRITE_ZEROES`.
pub const SPDK_BDEV_IO_TYPE_WRITE_ZEROES: spdk_bdev_io_type = 9;

/// `enum spdk_bdev_event_type`.
pub type spdk_bdev_event_type = c_int;
/// `SPDK_BDEV_EVENT_REMOVE`: the bdev is going away; the descriptor must be closed.
pub const SPDK_BDEV_EVENT_REMOVE: spdk_bdev_event_type = 0;

/// `spdk_bdev_event_cb_t`: asynchronous bdev events, always called on the opening thread.
pub type spdk_bdev_event_cb_t = Option<
    unsafe extern "C" fn(kind: spdk_bdev_event_type, bdev: *mut spdk_bdev, event_ctx: *mut c_void),
>;

/// `spdk_bdev_io_completion_cb`: called once per successfully submitted I/O, on the submitting
/// thread, never from inside the submission call.
pub type spdk_bdev_io_completion_cb =
    Option<unsafe extern "C" fn(bdev_io: *mut spdk_bdev_io, success: bool, cb_arg: *mut c_void)>;

/// `spdk_new_thread_fn`: the scheduler hook of `spdk_thread_lib_init`; we pass none, so nobody but
/// us polls the threads we create.
pub type spdk_new_thread_fn = Option<unsafe extern "C" fn(thread: *mut spdk_thread) -> c_int>;

/// `spdk_subsystem_init_fn` (also the completion of `spdk_subsystem_load_config`).
pub type spdk_subsystem_init_fn = Option<unsafe extern "C" fn(rc: c_int, ctx: *mut c_void)>;

/// `spdk_subsystem_fini_fn`.
pub type spdk_subsystem_fini_fn = Option<unsafe extern "C" fn(ctx: *mut c_void)>;

/// `SPDK_RPC_RUNTIME` (`spdk/rpc.h`): the RPC state after subsystem initialisation.
pub const SPDK_RPC_RUNTIME: u32 = 0x2;

/// `struct spdk_env_opts` as of SPDK v24.09 (unchanged through v25.x). v24.05 lacks the fields
/// from `opts_size` on; it memsets and reads only its own, shorter prefix, which has the same
/// layout (v24.09 named the old padding `reserved`), so passing this larger struct is compatible.
/// From v24.09 on, `opts_size` must be set *before* `spdk_env_opts_init`.
#[repr(C)]
pub struct spdk_env_opts {
    pub name: *const c_char,
    pub core_mask: *const c_char,
    pub lcore_map: *const c_char,
    pub shm_id: c_int,
    pub mem_channel: c_int,
    pub main_core: c_int,
    pub mem_size: c_int,
    pub no_pci: bool,
    pub hugepage_single_segments: bool,
    pub unlink_hugepage: bool,
    pub no_huge: bool,
    pub reserved: u32,
    pub num_pci_addr: usize,
    pub hugedir: *const c_char,
    pub pci_blocked: *mut spdk_pci_addr,
    pub pci_allowed: *mut spdk_pci_addr,
    pub iova_mode: *const c_char,
    pub base_virtaddr: u64,
    pub env_context: *mut c_void,
    pub vf_token: *const c_char,
    pub opts_size: usize,
    pub enforce_numa: bool,
    pub reserved2: [u8; 7],
}

// The layout SPDK's headers pin with SPDK_STATIC_ASSERT on LP64 targets.
#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(std::mem::offset_of!(spdk_env_opts, no_pci) == 40);
    assert!(std::mem::offset_of!(spdk_env_opts, num_pci_addr) == 48);
    assert!(std::mem::offset_of!(spdk_env_opts, hugedir) == 56);
    assert!(std::mem::offset_of!(spdk_env_opts, vf_token) == 104);
    assert!(std::mem::offset_of!(spdk_env_opts, opts_size) == 112);
    assert!(std::mem::size_of::<spdk_env_opts>() == 128);
};

unsafe extern "C" {
    // spdk/bdev.h
    pub fn spdk_bdev_open_ext(
        bdev_name: *const c_char,
        write: bool,
        event_cb: spdk_bdev_event_cb_t,
        event_ctx: *mut c_void,
        desc: *mut *mut spdk_bdev_desc,
    ) -> c_int;
    pub fn spdk_bdev_close(desc: *mut spdk_bdev_desc);
    pub fn spdk_bdev_desc_get_bdev(desc: *mut spdk_bdev_desc) -> *mut spdk_bdev;
    pub fn spdk_bdev_get_io_channel(desc: *mut spdk_bdev_desc) -> *mut spdk_io_channel;
    pub fn spdk_bdev_get_block_size(bdev: *const spdk_bdev) -> u32;
    pub fn spdk_bdev_get_num_blocks(bdev: *const spdk_bdev) -> u64;
    pub fn spdk_bdev_get_buf_align(bdev: *const spdk_bdev) -> usize;
    pub fn spdk_bdev_io_type_supported(bdev: *mut spdk_bdev, io_type: spdk_bdev_io_type) -> bool;
    pub fn spdk_bdev_read(
        desc: *mut spdk_bdev_desc,
        ch: *mut spdk_io_channel,
        buf: *mut c_void,
        offset: u64,
        nbytes: u64,
        cb: spdk_bdev_io_completion_cb,
        cb_arg: *mut c_void,
    ) -> c_int;
    pub fn spdk_bdev_write(
        desc: *mut spdk_bdev_desc,
        ch: *mut spdk_io_channel,
        buf: *mut c_void,
        offset: u64,
        nbytes: u64,
        cb: spdk_bdev_io_completion_cb,
        cb_arg: *mut c_void,
    ) -> c_int;
    pub fn spdk_bdev_write_zeroes(
        desc: *mut spdk_bdev_desc,
        ch: *mut spdk_io_channel,
        offset: u64,
        len: u64,
        cb: spdk_bdev_io_completion_cb,
        cb_arg: *mut c_void,
    ) -> c_int;
    pub fn spdk_bdev_unmap(
        desc: *mut spdk_bdev_desc,
        ch: *mut spdk_io_channel,
        offset: u64,
        nbytes: u64,
        cb: spdk_bdev_io_completion_cb,
        cb_arg: *mut c_void,
    ) -> c_int;
    pub fn spdk_bdev_flush(
        desc: *mut spdk_bdev_desc,
        ch: *mut spdk_io_channel,
        offset: u64,
        length: u64,
        cb: spdk_bdev_io_completion_cb,
        cb_arg: *mut c_void,
    ) -> c_int;
    pub fn spdk_bdev_free_io(bdev_io: *mut spdk_bdev_io);

    // spdk/thread.h
    pub fn spdk_thread_lib_init(new_thread_fn: spdk_new_thread_fn, ctx_sz: usize) -> c_int;
    pub fn spdk_thread_lib_fini();
    pub fn spdk_thread_create(name: *const c_char, cpumask: *const spdk_cpuset)
    -> *mut spdk_thread;
    pub fn spdk_set_thread(thread: *mut spdk_thread);
    pub fn spdk_get_thread() -> *mut spdk_thread;
    pub fn spdk_thread_poll(thread: *mut spdk_thread, max_msgs: u32, now: u64) -> c_int;
    pub fn spdk_thread_exit(thread: *mut spdk_thread) -> c_int;
    pub fn spdk_thread_is_exited(thread: *mut spdk_thread) -> bool;
    pub fn spdk_thread_destroy(thread: *mut spdk_thread);
    pub fn spdk_put_io_channel(ch: *mut spdk_io_channel);

    // spdk/env.h
    pub fn spdk_env_opts_init(opts: *mut spdk_env_opts);
    pub fn spdk_env_init(opts: *const spdk_env_opts) -> c_int;
    pub fn spdk_env_fini();
    pub fn spdk_dma_zmalloc(size: usize, align: usize, unused: *mut u64) -> *mut c_void;
    pub fn spdk_dma_free(buf: *mut c_void);

    // spdk/init.h (spdk_subsystem_load_config and spdk_subsystem_exists: v24.05 and later)
    pub fn spdk_subsystem_init(cb_fn: spdk_subsystem_init_fn, cb_arg: *mut c_void);
    pub fn spdk_subsystem_fini(cb_fn: spdk_subsystem_fini_fn, cb_arg: *mut c_void);
    pub fn spdk_subsystem_load_config(
        json: *mut c_void,
        json_size: isize,
        cb_fn: spdk_subsystem_init_fn,
        cb_arg: *mut c_void,
        stop_on_error: bool,
    );
    pub fn spdk_subsystem_exists(name: *const c_char) -> bool;

    // spdk/rpc.h
    pub fn spdk_rpc_set_state(state_mask: u32);
}
