//! Bring-up and shutdown of SPDK in a process that runs its own threads.
//!
//! SPDK's usual entry point, `spdk_app_start`, takes over the process: it starts reactors on the
//! cores of its mask and schedules SPDK threads onto them. Cairn has its own thread-per-core
//! runtime, so [`SpdkEnv`] does what `spdk_app_start` does minus the reactors, in the same
//! order (`lib/event/app.c`):
//!
//! 1. `spdk_env_init` (DPDK EAL: huge pages, PCI unless `no_pci`);
//! 2. `spdk_thread_lib_init` with *no* scheduler hook, so SPDK threads are only ever polled by
//!    whoever created them (see [`SpdkThread`]);
//! 3. the app thread (the first SPDK thread; subsystem init and fini must run on it);
//! 4. the JSON configuration's startup-time methods (`bdev_set_options`, ...);
//! 5. `spdk_subsystem_init` (accel, iobuf, bdev, ... in dependency order), then the RPC state is
//!    set to runtime;
//! 6. the JSON configuration's runtime methods (`bdev_malloc_create`,
//!    `bdev_nvme_attach_controller`, ...).
//!
//! Every wait polls the app thread on the calling OS thread until SPDK's callback fires.
//! Shutdown reverses the steps. The DPDK environment can be initialised once per process, so a
//! second [`SpdkEnv::init`] fails even after the first env was dropped.
//!
//! Needs SPDK v24.05 or later (`spdk_subsystem_load_config`, `spdk_subsystem_exists`).

use std::cell::Cell;
use std::ffi::{CString, c_int, c_void};
use std::io;
use std::ptr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::ffi;
use super::thread::{SpdkThread, ThreadError};

/// Subsystems the backend cannot work without, checked before initialisation.
const REQUIRED_SUBSYSTEMS: [(&std::ffi::CStr, &str); 1] = [(c"bdev", "bdev")];

/// Set by the first [`SpdkEnv::init`] and never cleared: DPDK's EAL cannot be initialised twice.
static ENV_CLAIMED: AtomicBool = AtomicBool::new(false);

/// Options of [`SpdkEnv::init`]; the defaults suit a development machine with huge pages.
#[derive(Debug, Clone)]
pub struct EnvOptions {
    /// Process name given to DPDK (also the prefix of its huge page files).
    pub name: String,
    /// Cores DPDK may use, as a hex mask (`"0x1"`). Only the calling thread polls SPDK; the
    /// mask matters for DPDK's per-lcore caches and the memory's NUMA placement.
    pub core_mask: String,
    /// Huge page memory to reserve at start, in MiB; `None` lets DPDK grow it on demand.
    pub mem_size_mb: Option<u32>,
    /// Do not scan or attach PCI devices (the `--no-pci` of SPDK's tools): for malloc, aio and
    /// uring bdevs, and for machines without devices bound to vfio/uio.
    pub no_pci: bool,
    /// Mount point of the hugetlbfs to use; `None` lets DPDK find one.
    pub hugedir: Option<String>,
    /// An SPDK JSON configuration (the format of `spdk_tgt -c` and `save_config`), applied in
    /// the startup phase and again in the runtime phase as `spdk_app_start` does.
    pub json_config: Option<String>,
}

impl Default for EnvOptions {
    fn default() -> Self {
        Self {
            name: "cairn".to_owned(),
            core_mask: "0x1".to_owned(),
            mem_size_mb: None,
            no_pci: false,
            hugedir: None,
            json_config: None,
        }
    }
}

/// Which pass over the JSON configuration failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigPhase {
    /// Before subsystem initialisation (`SPDK_RPC_STARTUP` methods).
    Startup,
    /// After subsystem initialisation (`SPDK_RPC_RUNTIME` methods).
    Runtime,
}

impl std::fmt::Display for ConfigPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConfigPhase::Startup => "startup",
            ConfigPhase::Runtime => "runtime",
        })
    }
}

/// Why SPDK could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// [`SpdkEnv::init`] was already called in this process.
    #[error("the SPDK environment was already initialised in this process")]
    AlreadyInitialised,
    /// A string option contains a NUL byte.
    #[error("SPDK option {option} contains a NUL byte")]
    NulInOption {
        /// The option's field name in [`EnvOptions`].
        option: &'static str,
    },
    /// `spdk_env_init` failed (no huge pages, no permission on them, DPDK EAL error).
    #[error("spdk_env_init failed: {source}")]
    Env {
        /// The negated errno SPDK returned.
        #[source]
        source: io::Error,
    },
    /// `spdk_thread_lib_init` failed.
    #[error("spdk_thread_lib_init failed: {source}")]
    ThreadLib {
        /// The negated errno SPDK returned.
        #[source]
        source: io::Error,
    },
    /// The app thread could not be created.
    #[error("SPDK app thread: {0}")]
    AppThread(#[from] ThreadError),
    /// A subsystem the backend needs was not linked in (its library registers it from a
    /// constructor, so the linker dropped it: see `-Wl,--no-as-needed` in `build.rs`).
    #[error(
        "SPDK subsystem {name:?} is not linked into this program \
         (link spdk_event_bdev inside -Wl,--no-as-needed)"
    )]
    MissingSubsystem {
        /// The subsystem's name.
        name: &'static str,
    },
    /// `spdk_subsystem_init` reported an error.
    #[error("SPDK subsystem initialisation failed: {source}")]
    SubsystemInit {
        /// The error SPDK reported.
        #[source]
        source: io::Error,
    },
    /// Applying the JSON configuration failed (SPDK logs which method failed and why).
    #[error("SPDK JSON configuration ({phase} phase) failed: {source}")]
    Config {
        /// The pass that failed.
        phase: ConfigPhase,
        /// The error SPDK reported.
        #[source]
        source: io::Error,
    },
}

/// The SPDK environment of this process: DPDK memory, the threading library, the app thread and
/// the initialised subsystems (bdev among them).
///
/// `!Send`: create it on the core that will own the app thread, and drop it there last, after
/// every [`super::SpdkDevice`] and every other [`SpdkThread`].
pub struct SpdkEnv {
    // `Option` only so that `drop` can destroy the thread before finishing the thread library.
    app_thread: Option<Rc<SpdkThread>>,
    subsystems_started: bool,
    // Kept for the lifetime of the env although SPDK copies them at init: cheap insurance.
    _option_strings: Vec<CString>,
}

impl SpdkEnv {
    /// Initialises SPDK as described in the module documentation.
    pub fn init(options: &EnvOptions) -> Result<Self, EnvError> {
        let c_string =
            |value: &str, option| CString::new(value).map_err(|_| EnvError::NulInOption { option });
        let name = c_string(&options.name, "name")?;
        let core_mask = c_string(&options.core_mask, "core_mask")?;
        let hugedir = options
            .hugedir
            .as_deref()
            .map(|dir| c_string(dir, "hugedir"))
            .transpose()?;
        if ENV_CLAIMED.swap(true, Ordering::SeqCst) {
            return Err(EnvError::AlreadyInitialised);
        }

        // SAFETY: `spdk_env_opts` is plain data (pointers, integers, bools); all-zero is a valid
        // value, and `spdk_env_opts_init` overwrites it with SPDK's defaults.
        let mut opts: ffi::spdk_env_opts = unsafe { std::mem::zeroed() };
        opts.opts_size = std::mem::size_of::<ffi::spdk_env_opts>();
        // SAFETY: `opts` is a valid, writable `spdk_env_opts` whose `opts_size` is set, as
        // v24.09+ requires; older versions write only their shorter prefix of it.
        unsafe { ffi::spdk_env_opts_init(&mut opts) };
        opts.name = name.as_ptr();
        opts.core_mask = core_mask.as_ptr();
        opts.no_pci = options.no_pci;
        if let Some(mb) = options.mem_size_mb {
            opts.mem_size = c_int::try_from(mb).unwrap_or(c_int::MAX);
        }
        if let Some(dir) = &hugedir {
            opts.hugedir = dir.as_ptr();
        }
        // SAFETY: `opts` was initialised by SPDK; every string it points to outlives the call.
        let rc = unsafe { ffi::spdk_env_init(&opts) };
        if rc != 0 {
            return Err(EnvError::Env {
                source: errno_error(rc),
            });
        }
        // SAFETY: the env is up; no scheduler hook and no per-thread context.
        let rc = unsafe { ffi::spdk_thread_lib_init(None, 0) };
        if rc != 0 {
            // SAFETY: undoes the successful `spdk_env_init` above; nothing else was started.
            unsafe { ffi::spdk_env_fini() };
            return Err(EnvError::ThreadLib {
                source: errno_error(rc),
            });
        }
        let app_thread = match SpdkThread::create("cairn_app") {
            Ok(thread) => Rc::new(thread),
            Err(err) => {
                // SAFETY: undoes the two successful calls above, in reverse order.
                unsafe {
                    ffi::spdk_thread_lib_fini();
                    ffi::spdk_env_fini();
                }
                return Err(err.into());
            }
        };
        let mut option_strings = vec![name, core_mask];
        option_strings.extend(hugedir);
        // From here on `Drop` undoes whatever was done.
        let mut env = SpdkEnv {
            app_thread: Some(app_thread),
            subsystems_started: false,
            _option_strings: option_strings,
        };

        for (c_name, name) in REQUIRED_SUBSYSTEMS {
            // SAFETY: a static C string; the subsystem list is filled by constructors before
            // `main`, so reading it needs no SPDK thread.
            if !unsafe { ffi::spdk_subsystem_exists(c_name.as_ptr()) } {
                return Err(EnvError::MissingSubsystem { name });
            }
        }
        if let Some(json) = &options.json_config {
            env.apply_config(json, ConfigPhase::Startup)?;
        }
        // Set first: SPDK's own error path (`spdk_app_stop`) also finishes subsystems after a
        // failed initialisation, which tears down the ones that did start.
        env.subsystems_started = true;
        let rc = env.wait_rc(|done, arg| {
            // SAFETY: called on the app thread (current via `wait_rc`); `done` is a valid
            // `spdk_subsystem_init_fn` and `arg` outlives the wait.
            unsafe { ffi::spdk_subsystem_init(done, arg) }
        });
        if rc != 0 {
            return Err(EnvError::SubsystemInit {
                source: errno_error(rc),
            });
        }
        // SAFETY: plain setter of the RPC layer's global state, as `spdk_app_start` does
        // after subsystem initialisation.
        unsafe { ffi::spdk_rpc_set_state(ffi::SPDK_RPC_RUNTIME) };
        if let Some(json) = &options.json_config {
            env.apply_config(json, ConfigPhase::Runtime)?;
        }
        Ok(env)
    }

    /// The app thread, for opening devices on the core that owns the env (tests, tools). A
    /// multi-core program creates one [`SpdkThread`] per core instead.
    pub fn app_thread(&self) -> Rc<SpdkThread> {
        Rc::clone(self.thread())
    }

    /// Applies the runtime methods of an SPDK JSON configuration (creating or attaching bdevs
    /// after start-up); startup-only methods in it are skipped.
    pub fn load_config(&self, json: &str) -> Result<(), EnvError> {
        self.apply_config(json, ConfigPhase::Runtime)
    }

    fn thread(&self) -> &Rc<SpdkThread> {
        self.app_thread
            .as_ref()
            .expect("the app thread lives until SpdkEnv is dropped")
    }

    fn apply_config(&self, json: &str, phase: ConfigPhase) -> Result<(), EnvError> {
        // SPDK copies the JSON before parsing it in place, but takes a `void *`: give it a copy
        // of our own anyway.
        let mut bytes = json.as_bytes().to_vec();
        let len = isize::try_from(bytes.len()).expect("a JSON document fits in isize");
        let rc = self.wait_rc(|done, arg| {
            // SAFETY: called on the app thread; `bytes` is valid for `len` bytes and outlives
            // the wait; `done`/`arg` as in `wait_rc`. The loader runs a temporary RPC server
            // (a Unix socket under /var/tmp) whose pollers run on the app thread.
            unsafe {
                ffi::spdk_subsystem_load_config(bytes.as_mut_ptr().cast(), len, done, arg, true)
            }
        });
        if rc != 0 {
            return Err(EnvError::Config {
                phase,
                source: errno_error(rc),
            });
        }
        Ok(())
    }

    /// Starts an operation that reports `(rc, ctx)` through an `spdk_subsystem_init_fn`, and
    /// polls the app thread until it has.
    fn wait_rc(&self, start: impl FnOnce(ffi::spdk_subsystem_init_fn, *mut c_void)) -> c_int {
        unsafe extern "C" fn done(rc: c_int, ctx: *mut c_void) {
            // SAFETY: `ctx` is the `Cell` on `wait_rc`'s stack, alive until it has seen this
            // call; SPDK calls back on the app thread, which `wait_rc` polls on this OS thread.
            unsafe { (*ctx.cast::<Cell<Option<c_int>>>()).set(Some(rc)) }
        }
        let slot: Cell<Option<c_int>> = Cell::new(None);
        let thread = self.thread();
        {
            let _entered = thread.enter();
            start(Some(done), ptr::from_ref(&slot).cast_mut().cast());
        }
        loop {
            if let Some(rc) = slot.get() {
                return rc;
            }
            thread.poll();
        }
    }
}

impl Drop for SpdkEnv {
    fn drop(&mut self) {
        let app_thread = self.app_thread.take().expect("dropped once");
        if Rc::strong_count(&app_thread) > 1 {
            // A device or clone still uses the app thread: finishing the subsystems under it
            // would leave dangling descriptors. Leak SPDK instead (the process is ending or
            // already panicking); assert when that is a plain ordering bug.
            assert!(
                std::thread::panicking(),
                "SpdkEnv dropped while an SpdkDevice or app-thread handle is alive: drop them first"
            );
            std::mem::forget(app_thread);
            return;
        }
        if self.subsystems_started {
            unsafe extern "C" fn finished(ctx: *mut c_void) {
                // SAFETY: `ctx` is the `Cell` below, alive until it has seen this call.
                unsafe { (*ctx.cast::<Cell<bool>>()).set(true) }
            }
            let done = Cell::new(false);
            {
                let _entered = app_thread.enter();
                // SAFETY: on the app thread, after a (possibly failed) `spdk_subsystem_init`;
                // `done` outlives the polling loop below.
                unsafe {
                    ffi::spdk_subsystem_fini(Some(finished), ptr::from_ref(&done).cast_mut().cast())
                };
            }
            while !done.get() {
                app_thread.poll();
            }
        }
        // Exits and destroys the app thread (the last SPDK thread, as SPDK requires).
        drop(app_thread);
        // SAFETY: no SPDK thread is left; these undo `spdk_thread_lib_init` and `spdk_env_init`.
        unsafe {
            ffi::spdk_thread_lib_fini();
            ffi::spdk_env_fini();
        }
    }
}

impl std::fmt::Debug for SpdkEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpdkEnv")
            .field("app_thread", &self.app_thread)
            .field("subsystems_started", &self.subsystems_started)
            .finish()
    }
}

/// An `io::Error` for SPDK's "0 or negated errno" return convention (either sign accepted).
pub(crate) fn errno_error(rc: c_int) -> io::Error {
    io::Error::from_raw_os_error(rc.checked_abs().unwrap_or(libc::EINVAL))
}
