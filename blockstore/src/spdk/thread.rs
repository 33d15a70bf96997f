//! An SPDK thread owned and polled by one core.
//!
//! SPDK does its asynchronous work (bdev completions, deferred channel releases, pollers of the
//! bdev modules and of the accel framework) as messages and pollers on a `struct spdk_thread`.
//! Something has to call `spdk_thread_poll` on it. In SPDK's own application framework a
//! reactor does that; Cairn brings its own thread-per-core runtime instead, so the threading
//! library is initialised without a scheduler (see [`super::SpdkEnv`]) and each core creates an
//! [`SpdkThread`] and polls it itself, from the futures of the devices that use it.
//!
//! An `SpdkThread` is `!Send`: it stays on the OS thread that created it, which is also the only
//! one that may poll it.

use std::ffi::CString;
use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use super::ffi;

/// Why an [`SpdkThread`] could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ThreadError {
    /// The name contains a NUL byte.
    #[error("SPDK thread name {name:?} contains a NUL byte")]
    NulInName {
        /// The requested name.
        name: String,
    },
    /// `spdk_thread_create` returned NULL: the threading library is not initialised (no
    /// [`super::SpdkEnv`]), it is shutting down, or memory ran out.
    #[error("SPDK thread {name:?}: spdk_thread_create failed (is the SPDK environment up?)")]
    Create {
        /// The requested name.
        name: String,
    },
}

/// An SPDK thread created by, owned by and polled from the current OS thread.
///
/// Dropping it exits the thread (polling until SPDK has released everything queued on it) and
/// destroys it. Drop every [`super::SpdkDevice`] using it first (they hold an `Rc` to it, so
/// that is automatic), and drop every per-core thread before the [`super::SpdkEnv`], whose
/// thread must exit last.
pub struct SpdkThread {
    raw: NonNull<ffi::spdk_thread>,
    // `!Send` and `!Sync`: SPDK threads are polled from one OS thread only.
    _not_send: PhantomData<*mut ()>,
}

impl SpdkThread {
    /// Creates an SPDK thread named `name` (names show up in SPDK's logs and statistics).
    ///
    /// The first thread created in the process is SPDK's *app thread*; [`super::SpdkEnv`]
    /// creates that one, so call this after [`super::SpdkEnv::init`].
    pub fn create(name: &str) -> Result<Self, ThreadError> {
        let c_name = CString::new(name).map_err(|_| ThreadError::NulInName {
            name: name.to_owned(),
        })?;
        // SAFETY: `c_name` is a valid C string for the duration of the call (SPDK copies it);
        // a NULL cpumask means "no preference".
        let raw = unsafe { ffi::spdk_thread_create(c_name.as_ptr(), ptr::null()) };
        let raw = NonNull::new(raw).ok_or_else(|| ThreadError::Create {
            name: name.to_owned(),
        })?;
        Ok(Self {
            raw,
            _not_send: PhantomData,
        })
    }

    /// Runs one iteration of the thread: expired and continuous pollers and up to 8 queued
    /// messages (I/O completions among them). Returns whether any work was done.
    pub fn poll(&self) -> bool {
        // SAFETY: `raw` is a live thread owned by `self`, polled only from this OS thread
        // (`SpdkThread` is `!Send`). `spdk_thread_poll` makes the thread current for the
        // duration of the call and restores the previous one afterwards.
        unsafe { ffi::spdk_thread_poll(self.raw.as_ptr(), 0, 0) > 0 }
    }

    /// Makes this the current SPDK thread of the OS thread until the guard is dropped.
    ///
    /// SPDK calls such as `spdk_bdev_open_ext`, `spdk_bdev_get_io_channel`, submissions and
    /// `spdk_put_io_channel` act on `spdk_get_thread()`.
    pub(crate) fn enter(&self) -> Entered<'_> {
        // SAFETY: reading and writing SPDK's thread-local "current thread" pointer; `raw` is
        // live for as long as `self`, and the guard restores the previous value.
        let previous = unsafe { ffi::spdk_get_thread() };
        // SAFETY: as above.
        unsafe { ffi::spdk_set_thread(self.raw.as_ptr()) };
        Entered {
            previous,
            _thread: PhantomData,
            _not_send: PhantomData,
        }
    }
}

impl Drop for SpdkThread {
    fn drop(&mut self) {
        let raw = self.raw.as_ptr();
        // SAFETY: `raw` is live and owned by `self`. `spdk_thread_exit` requires the thread to
        // be current; it then releases the thread's remaining channels and messages as it is
        // polled, and gives up after SPDK's exit timeout (5 s), so the loop ends.
        // `spdk_thread_destroy` is called only once the thread reports it has exited, and it
        // clears SPDK's current-thread pointer if that was `raw`.
        unsafe {
            let previous = ffi::spdk_get_thread();
            ffi::spdk_set_thread(raw);
            ffi::spdk_thread_exit(raw);
            while !ffi::spdk_thread_is_exited(raw) {
                ffi::spdk_thread_poll(raw, 0, 0);
            }
            ffi::spdk_thread_destroy(raw);
            ffi::spdk_set_thread(if previous == raw {
                ptr::null_mut()
            } else {
                previous
            });
        }
    }
}

impl std::fmt::Debug for SpdkThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpdkThread")
            .field("raw", &self.raw)
            .finish()
    }
}

/// Guard returned by [`SpdkThread::enter`]: restores the previously current SPDK thread.
pub(crate) struct Entered<'a> {
    previous: *mut ffi::spdk_thread,
    _thread: PhantomData<&'a SpdkThread>,
    _not_send: PhantomData<*mut ()>,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        // SAFETY: restores the value read in `enter`, on the same OS thread (`!Send`). Guards
        // live only across a few SPDK calls inside this module (open, submit, close, subsystem
        // start), none of which destroys an SPDK thread, so `previous` is still live or NULL.
        unsafe { ffi::spdk_set_thread(self.previous) }
    }
}
