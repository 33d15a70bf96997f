//! One io_uring per glommio executor for device I/O, driven from the caller's own buffers.
//!
//! glommio's `DmaFile` reads only into buffers it allocates and writes only from its own, so
//! every I/O cost a copy, and its reactor arms and cancels a preemption timer around each
//! submission. Measured on this project's VMs, that capped a 4 KiB random-I/O device at about a
//! third of what fio gets from the same file. This module is the device path instead: a ring of
//! our own per executor thread, set up as the kernel recommends for a thread-per-core program
//! (`IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN`: completions are processed only when
//! this thread asks, with no inter-processor interrupt), fed directly from [`crate::DmaBuf`]s.
//!
//! **How a request flows.** [`Ring::op`] returns an [`Op`] future. Its first poll puts the
//! submission entry in the ring's queue (no system call) and wakes the ring's *driver*, a
//! glommio task. The driver runs after the tasks that were ready, so all the requests they
//! queued go to the kernel in one `io_uring_enter`, which also collects completions; each
//! completion wakes its request's task. While requests are in flight and none has completed,
//! the driver polls for [`SPIN_BEFORE_SLEEP`] (a fast device answers within it, sooner than a
//! sleep and wake-up would take: QD1 4 KiB writes on this project's ext4 VM disk went from 8.5k
//! to 16.8k IOPS), then sleeps on an eventfd the ring signals, read through glommio's own
//! reactor, so a core waiting on a slow disk burns little; with nothing in flight it sleeps
//! until a request arrives, so an idle core burns nothing.
//!
//! **Safety of borrowed buffers.** The kernel writes into (or reads from) the caller's buffer
//! until the completion arrives. An [`Op`] borrows that buffer for its whole life, and dropping
//! an [`Op`] that is in flight cancels the request and blocks this thread until its completion
//! has arrived, so the buffer can never be freed or reused while the kernel still owns it.
//! Cancellation is rare (a caller giving up on a device); it costs at most one device latency.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};

use io_uring::{IoUring, opcode, squeue, types};

/// Submission-queue entries per ring. Requests beyond this wait in the queue of the task that
/// makes them (its `op` submits the full queue first), never fail.
pub const RING_ENTRIES: u32 = 256;

/// Completion-queue entries: room for every submission twice over (the kernel also keeps any
/// overflow, `IORING_FEAT_NODROP`).
const CQ_ENTRIES: u32 = RING_ENTRIES * 4;

/// How long the driver polls for completions before it sleeps on the eventfd: about one fast
/// SSD access. Only while requests are in flight; an idle ring never polls.
pub const SPIN_BEFORE_SLEEP: std::time::Duration = std::time::Duration::from_micros(50);

/// `user_data` of the cancellation requests sent by a dropped [`Op`]; their completions are
/// ignored.
const CANCEL_TAG: u64 = u64::MAX;

/// `io_uring_enter` flag: process completions (with deferred task work, the only way they are).
const IORING_ENTER_GETEVENTS: u32 = 1;

thread_local! {
    /// The ring of each executor that ran on this thread, by glommio executor id.
    static RINGS: RefCell<HashMap<usize, Weak<Ring>>> = RefCell::new(HashMap::new());
}

/// Adds setup flags to a ring builder.
type Configure = fn(&mut io_uring::Builder);

/// The state of one request slot.
enum Slot {
    Free,
    /// In flight; the waker of the task awaiting it.
    Waiting(Option<Waker>),
    /// Completed with this result (`cqe.res`), not yet collected.
    Done(i32),
}

/// An io_uring owned by one glommio executor thread.
pub struct Ring {
    uring: RefCell<IoUring>,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u32>>,
    /// Requests submitted to the kernel or queued for it, not yet completed.
    in_flight: Cell<usize>,
    /// Entries queued since the last `io_uring_enter`.
    queued: Cell<bool>,
    /// Spare buffer for [`Ring::reap`].
    wakers: RefCell<Vec<Waker>>,
    /// The driver task, when it is parked waiting for work.
    driver: RefCell<Option<Waker>>,
    /// Signalled by the kernel when completions are posted (registered with the ring).
    eventfd: OwnedFd,
}

impl Ring {
    /// The ring of the glommio executor running on this thread, made (with its driver task) on
    /// first use. Must be called on a glommio executor.
    pub fn current() -> io::Result<Rc<Ring>> {
        let id = glommio::executor().id();
        if let Some(ring) = RINGS.with(|r| r.borrow().get(&id).and_then(Weak::upgrade)) {
            return Ok(ring);
        }
        let ring = Rc::new(Ring::new()?);
        RINGS.with(|r| {
            let mut rings = r.borrow_mut();
            rings.retain(|_, weak| weak.strong_count() > 0);
            rings.insert(id, Rc::downgrade(&ring));
        });
        let eventfd = ring.eventfd.try_clone()?;
        glommio::spawn_local(drive(Rc::downgrade(&ring), eventfd)).detach();
        Ok(ring)
    }

    fn new() -> io::Result<Ring> {
        // Newest setup first; older kernels refuse the flags they do not know with EINVAL.
        let attempts: [Configure; 3] = [
            // Single issuer, deferred task work (6.1+).
            |b| {
                b.setup_single_issuer().setup_defer_taskrun();
            },
            // Cooperative task work (5.19+).
            |b| {
                b.setup_coop_taskrun().setup_taskrun_flag();
            },
            |_| {},
        ];
        let mut last_err = None;
        for configure in attempts {
            let mut builder = IoUring::builder();
            builder.setup_cqsize(CQ_ENTRIES).setup_clamp();
            configure(&mut builder);
            match builder.build(RING_ENTRIES) {
                Ok(uring) => return Ring::with(uring),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)))
    }

    fn with(uring: IoUring) -> io::Result<Ring> {
        // Blocking on purpose: io_uring answers a read of a non-blocking descriptor with EAGAIN
        // instead of waiting for it to become readable.
        // SAFETY: plain system call.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        uring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Ring {
            uring: RefCell::new(uring),
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
            in_flight: Cell::new(0),
            queued: Cell::new(false),
            wakers: RefCell::new(Vec::new()),
            driver: RefCell::new(None),
            eventfd,
        })
    }

    /// A request for `entry`, which must refer only to memory that outlives `'a` (the buffer the
    /// caller lends for the request's whole life).
    ///
    /// # Safety
    ///
    /// Every pointer in `entry` must stay valid for `'a`, and the descriptor it names must stay
    /// open until the returned future completes or is dropped.
    pub unsafe fn op<'a>(self: &Rc<Self>, entry: squeue::Entry) -> Op<'a> {
        Op {
            ring: Rc::clone(self),
            state: OpState::Unsubmitted(entry),
            _borrow: PhantomData,
        }
    }

    fn start(&self, entry: squeue::Entry, waker: Waker) -> io::Result<u32> {
        let idx = {
            let mut slots = self.slots.borrow_mut();
            match self.free.borrow_mut().pop() {
                Some(idx) => {
                    slots[idx as usize] = Slot::Waiting(Some(waker));
                    idx
                }
                None => {
                    slots.push(Slot::Waiting(Some(waker)));
                    u32::try_from(slots.len() - 1).expect("fewer than 2^32 requests")
                }
            }
        };
        let entry = entry.user_data(u64::from(idx));
        if let Err(e) = self.push(&entry) {
            self.release(idx);
            return Err(e);
        }
        self.in_flight.set(self.in_flight.get() + 1);
        self.wake_driver();
        Ok(idx)
    }

    /// Queues `entry`, submitting what is queued first if the queue is full.
    fn push(&self, entry: &squeue::Entry) -> io::Result<()> {
        let mut uring = self.uring.borrow_mut();
        loop {
            // SAFETY: the entry's pointers are valid for the request's life (`Ring::op`).
            if unsafe { uring.submission().push(entry) }.is_ok() {
                self.queued.set(true);
                return Ok(());
            }
            match uring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // The completion queue is full too: collect completions to make room.
                    drop(uring);
                    self.reap();
                    uring = self.uring.borrow_mut();
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn release(&self, idx: u32) {
        self.slots.borrow_mut()[idx as usize] = Slot::Free;
        self.free.borrow_mut().push(idx);
    }

    /// The result of request `idx` if it completed (releasing its slot), else records `waker`.
    fn check(&self, idx: u32, waker: &Waker) -> Option<i32> {
        let mut slots = self.slots.borrow_mut();
        match &mut slots[idx as usize] {
            Slot::Done(res) => {
                let res = *res;
                drop(slots);
                self.release(idx);
                Some(res)
            }
            Slot::Waiting(w) => {
                if !w.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    *w = Some(waker.clone());
                }
                None
            }
            Slot::Free => unreachable!("request slot {idx} released while awaited"),
        }
    }

    fn wake_driver(&self) {
        if let Some(w) = self.driver.borrow_mut().take() {
            w.wake();
        }
    }

    /// Submits what is queued and runs the kernel's deferred completion work, without waiting.
    fn enter(&self, min_complete: u32) -> io::Result<()> {
        let mut uring = self.uring.borrow_mut();
        let to_submit = uring.submission().len();
        // SAFETY: a plain io_uring_enter on our ring with no extra argument.
        let res = unsafe {
            uring.submitter().enter::<libc::sigset_t>(
                to_submit as u32,
                min_complete,
                IORING_ENTER_GETEVENTS,
                None,
            )
        };
        let res = match res {
            Ok(_) => Ok(()),
            // Interrupted, or the completion queue is full: the caller reaps and comes back.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        };
        // Whatever the kernel did not take (interrupted, short of memory) stays queued, and the
        // driver comes back for it instead of sleeping.
        self.queued.set(!uring.submission().is_empty());
        res
    }

    /// Moves posted completions into their slots and wakes their tasks; returns how many.
    fn reap(&self) -> usize {
        // The wakers to call, in a buffer kept between calls (no allocation per reap).
        let mut wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        let mut n = 0;
        {
            let mut uring = self.uring.borrow_mut();
            let mut slots = self.slots.borrow_mut();
            for cqe in uring.completion() {
                if cqe.user_data() == CANCEL_TAG {
                    continue;
                }
                n += 1;
                let slot = &mut slots[cqe.user_data() as usize];
                if let Slot::Waiting(w) = slot {
                    if let Some(w) = w.take() {
                        wakers.push(w);
                    }
                    *slot = Slot::Done(cqe.result());
                }
            }
        }
        self.in_flight.set(self.in_flight.get() - n);
        for w in wakers.drain(..) {
            w.wake();
        }
        *self.wakers.borrow_mut() = wakers;
        n
    }

    /// For a dropped [`Op`]: cancels request `idx` and blocks until its completion arrives, so
    /// the memory it names is free again; then releases the slot.
    fn abandon(&self, idx: u32) {
        let cancel = opcode::AsyncCancel::new(u64::from(idx))
            .build()
            .user_data(CANCEL_TAG);
        // If the cancel cannot be queued the request still completes on its own.
        let _ = self.push(&cancel);
        loop {
            if matches!(self.slots.borrow()[idx as usize], Slot::Done(_)) {
                break;
            }
            if let Err(e) = self.enter(1) {
                // Nothing else is safe: the kernel may still write into the caller's buffer.
                panic!("io_uring_enter failed while waiting for a cancelled request: {e}");
            }
            self.reap();
        }
        self.release(idx);
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Every Op holds the ring, so nothing is in flight; stop the driver.
        self.wake_driver();
    }
}

/// A request on a [`Ring`]; resolves to the completion's result (bytes moved) or the error the
/// kernel gave.
pub struct Op<'a> {
    ring: Rc<Ring>,
    state: OpState,
    _borrow: PhantomData<&'a mut [u8]>,
}

enum OpState {
    Unsubmitted(squeue::Entry),
    InFlight(u32),
    Finished,
}

impl Future for Op<'_> {
    type Output = io::Result<u32>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match std::mem::replace(&mut this.state, OpState::Finished) {
            OpState::Unsubmitted(entry) => match this.ring.start(entry, cx.waker().clone()) {
                Ok(idx) => {
                    this.state = OpState::InFlight(idx);
                    Poll::Pending
                }
                Err(e) => Poll::Ready(Err(e)),
            },
            OpState::InFlight(idx) => match this.ring.check(idx, cx.waker()) {
                Some(res) if res < 0 => Poll::Ready(Err(io::Error::from_raw_os_error(-res))),
                Some(res) => Poll::Ready(Ok(res as u32)),
                None => {
                    this.state = OpState::InFlight(idx);
                    Poll::Pending
                }
            },
            OpState::Finished => panic!("io_uring request polled after it completed"),
        }
    }
}

impl Drop for Op<'_> {
    fn drop(&mut self) {
        if let OpState::InFlight(idx) = self.state {
            self.ring.abandon(idx);
        }
    }
}

/// The driver task: submits queued requests, collects completions, and sleeps when there is
/// nothing to do (see the module docs).
async fn drive(ring: Weak<Ring>, eventfd: OwnedFd) {
    // SAFETY: the descriptor is ours (a duplicate of the ring's eventfd); the glommio file owns
    // and closes it.
    let notifier = unsafe { glommio::io::BufferedFile::from_raw_fd(eventfd.into_raw_fd()) };
    // One read of the eventfd is always outstanding, and never dropped before it completes: a
    // read given up on may already have consumed the count, and the signal would be lost.
    let mut signalled = Box::pin(notifier.read_at(0, 8));
    // When the current wait for a completion began (requests in flight, none completed).
    let mut waiting_since: Option<std::time::Instant> = None;
    loop {
        let Some(r) = ring.upgrade() else { break };
        if let Err(e) = r.enter(0) {
            // Not expected from a healthy kernel; the requests stay queued and the next round
            // tries again, after other tasks ran.
            eprintln!("cairn: io_uring_enter failed: {e}");
        }
        let reaped = r.reap();
        if r.in_flight.get() == 0 && !r.queued.get() {
            // Idle: park until a request arrives (or the ring goes away).
            drop(r);
            Park { ring: &ring }.await;
            continue;
        }
        if reaped > 0 || r.queued.get() {
            waiting_since = None;
            drop(r);
            futures_lite::future::yield_now().await;
            continue;
        }
        drop(r);
        // Requests in flight, none completed: poll for a while (a fast device answers sooner
        // than a sleep and a wake-up through the eventfd take), then sleep until the kernel
        // signals completions or a task queues a new request.
        let since = *waiting_since.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() < SPIN_BEFORE_SLEEP {
            futures_lite::future::yield_now().await;
            continue;
        }
        waiting_since = None;
        let mut park = Park { ring: &ring };
        let by_kernel = std::future::poll_fn(|cx| {
            if signalled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(true);
            }
            Pin::new(&mut park).poll(cx).map(|()| false)
        })
        .await;
        if by_kernel {
            signalled = Box::pin(notifier.read_at(0, 8));
        }
    }
    drop(signalled);
    let _ = notifier.close().await;
}

/// Resolves once a task queues a request (the ring wakes its driver) or the ring is gone.
struct Park<'a> {
    ring: &'a Weak<Ring>,
}

impl Future for Park<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(ring) = self.ring.upgrade() else {
            return Poll::Ready(());
        };
        if ring.queued.get() {
            return Poll::Ready(());
        }
        *ring.driver.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Length of one request for `buf`: all of it, up to what an SQE can say (the caller goes on
/// after a short transfer).
fn request_len(buf: &[u8]) -> u32 {
    u32::try_from(buf.len()).unwrap_or(u32::MAX)
}

/// Reads `buf.len()` bytes at `offset` of `fd`.
pub fn read_entry(fd: RawFd, offset: u64, buf: &mut [u8]) -> squeue::Entry {
    opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), request_len(buf))
        .offset(offset)
        .build()
}

/// Writes `buf` at `offset` of `fd`.
pub fn write_entry(fd: RawFd, offset: u64, buf: &[u8]) -> squeue::Entry {
    opcode::Write::new(types::Fd(fd), buf.as_ptr(), request_len(buf))
        .offset(offset)
        .build()
}

/// Writes `buf` at `offset` of `fd` with `RWF_DSYNC`: it completes once durable (a FUA write on
/// a block device opened with `O_DIRECT`).
pub fn write_dsync_entry(fd: RawFd, offset: u64, buf: &[u8]) -> squeue::Entry {
    opcode::Write::new(types::Fd(fd), buf.as_ptr(), request_len(buf))
        .offset(offset)
        .rw_flags(libc::RWF_DSYNC)
        .build()
}

/// `fdatasync(fd)`.
pub fn fdatasync_entry(fd: RawFd) -> squeue::Entry {
    opcode::Fsync::new(types::Fd(fd))
        .flags(types::FsyncFlags::DATASYNC)
        .build()
}

/// `fallocate(fd, mode, offset, len)`.
pub fn fallocate_entry(fd: RawFd, mode: i32, offset: u64, len: u64) -> squeue::Entry {
    opcode::Fallocate::new(types::Fd(fd), len)
        .offset(offset)
        .mode(mode)
        .build()
}
