//! The RDMA backend (cargo feature `rdma`): [`RdmaTransport`] and [`serve`] over RC queue pairs,
//! with the same frames ([`frame`]) and the same [`Transport`]/[`Handler`] contract as TCP.
//!
//! Bindings come from `rdma-sys` (bindgen over rdma-core's `libibverbs` and `librdmacm`; Debian
//! `libibverbs-dev librdmacm-dev libclang-dev`). `async-rdma` is not used: it is built on tokio,
//! and its futures and polling threads do not fit one glommio executor per core.
//!
//! **One device context per core.** An [`RdmaDevice`] is opened on the core that uses it, from a
//! local address on the RDMA NIC (or soft-RoCE link): it owns a protection domain, one completion
//! queue with its completion channel, and one registered buffer region. Every queue pair of the
//! core (outgoing connections and accepted ones) uses that CQ, so one poller per core completes
//! everything. Peers must be reachable through that device.
//!
//! **Buffers.** The region is allocated from 2 MiB huge pages when the system has them reserved
//! (`vm.nr_hugepages`), else from ordinary page-aligned anonymous memory
//! ([`RdmaDevice::huge_pages`] says which; registration pins it either way, huge pages only save
//! IOTLB entries). It is registered once (`ibv_reg_mr`) and cut into [`RdmaConfig::slot_bytes`]
//! slots; a frame is built directly in a send slot and parsed directly from a receive slot, so
//! nothing but the payload copy into and out of the [`Message`] touches memory per message. The
//! region holds `slots` = per connection `depth` receives plus up to `depth` sends in flight;
//! running out of slots is back-pressure (a send waits for a slot), not an error.
//!
//! **Flow control.** Each side posts `depth` receives per queue pair and a client has at most
//! `depth` requests in flight per peer, each answered by one response, so a send never finds the
//! peer without a posted receive (RNR retries stay a safety net, `rnr_retry_count = 7`).
//!
//! **Completions on the owning core.** A poller task drains the CQ (`ibv_poll_cq`) every time the
//! executor runs it while sends or calls are outstanding. When nothing is outstanding it arms the
//! CQ (`ibv_req_notify_cq`), drains once more to close the race, and sleeps until the completion
//! channel's file descriptor becomes readable, so an idle core costs nothing. glommio 0.9 has no
//! public "wait until this fd is readable", so a parked helper thread per device waits in
//! `poll(2)` on the channel fd while (and only while) the core is asleep, and wakes the poller
//! through its `Waker`; the completion itself is then read and handled on the core.
//!
//! **Connections.** Connection management uses `rdma_cm` (RC, `RDMA_PS_TCP`). A client resolves
//! and connects in glommio's blocking pool (the `rdma_cm` calls block); the hello that TCP sends as
//! a frame travels as the connection's private data (node id and frame version), both ways. A
//! server's listener runs a helper thread on the CM event channel that hands connection requests
//! and disconnects to the core, which creates the queue pair, posts receives and accepts. A work
//! completion with an error (peer gone: retry exceeded, flushed) closes the connection and fails
//! its calls with [`TransportError::PeerClosed`]; the next call reconnects. A closed queue pair
//! is destroyed once its flushed work requests have come back (their slots return to the region)
//! and, for an accepted one, once the listener has reported its disconnect. Each queue pair also
//! bounds its own send queue at `depth` posted sends: a sender waits for room.
//!
//! Nothing here is exercised by `cargo test` (CI has no RDMA device); `hw-tests/rdma/run.sh` runs
//! the loopback test on a host with a NIC or soft-RoCE and skips loudly without one.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::ptr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use super::fdwatch::FdWatch;
use std::time::{Duration, Instant};

use futures_lite::future;
use glommio::sync::Semaphore;
use rdma_sys as ibv;

use super::frame::{self, FRAME_VERSION, FrameError, FrameKind, HEAD_LEN};
use super::{ClusterTag, Handler, Message, NodeId, Transport, TransportError};
use crate::nbd::Shutdown;

/// Size of a huge page the buffer region is allocated from.
pub const HUGE_PAGE_BYTES: usize = 2 << 20;
/// Completions taken from the CQ per `ibv_poll_cq`.
const POLL_BATCH: usize = 32;
/// Bytes of connection private data: node id (8, little-endian) and frame version (1).
const PRIVATE_DATA_LEN: usize = 17;

/// How an [`RdmaDevice`] and its connections behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdmaConfig {
    /// Time limit of one call.
    pub call_timeout: Duration,
    /// Time limit of address and route resolution, each.
    pub resolve_timeout: Duration,
    /// Receives posted per queue pair, and calls in flight per peer.
    pub depth: u32,
    /// Bytes per buffer slot: the largest frame (payload plus [`HEAD_LEN`]).
    pub slot_bytes: u32,
    /// Buffer slots in the registered region (sum over connections of `2 * depth`).
    pub slots: u32,
    /// Completion queue entries (at least the sum over queue pairs of sends and receives).
    pub cq_entries: u32,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            call_timeout: Duration::from_secs(5),
            resolve_timeout: Duration::from_millis(2000),
            depth: 32,
            slot_bytes: 128 << 10,
            slots: 512,
            cq_entries: 4096,
        }
    }
}

impl RdmaConfig {
    fn check(&self) {
        assert!(self.depth > 0, "depth must be positive");
        assert!(
            self.slot_bytes as usize > HEAD_LEN,
            "slots must hold a frame head"
        );
        assert!(
            self.slot_bytes.is_multiple_of(4096),
            "slot size not 4 KiB aligned"
        );
        assert!(
            self.slots >= 2 * self.depth,
            "fewer slots than one connection needs"
        );
        assert!(
            self.cq_entries >= 2 * self.depth,
            "CQ smaller than one queue pair"
        );
    }

    /// The largest payload a frame in one slot can carry.
    pub fn max_payload_bytes(&self) -> u32 {
        (self.slot_bytes - HEAD_LEN as u32).min(frame::MAX_PAYLOAD_LEN)
    }
}

/// Why opening a device failed.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// A verbs or rdma_cm call failed.
    #[error("RDMA {call} failed: {source}")]
    Verbs {
        /// The call.
        call: &'static str,
        /// errno.
        source: io::Error,
    },
    /// The address is not on an RDMA device.
    #[error("no RDMA device serves {addr}")]
    NoDevice {
        /// The address.
        addr: SocketAddr,
    },
}

fn verbs_error(call: &'static str) -> RdmaError {
    RdmaError::Verbs {
        call,
        source: io::Error::last_os_error(),
    }
}

/// A raw pointer handed to a helper thread (verbs objects are thread-safe in libibverbs).
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: only used for libibverbs/librdmacm objects, whose calls are thread-safe, and whose
// lifetime the owning core manages.
unsafe impl<T> Send for SendPtr<T> {}

fn sockaddr_of(addr: &SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain old data; zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
        }
    }
    storage
}

// ---------------------------------------------------------------------------------------------
// Registered buffers

/// The registered region and its slots.
struct Region {
    base: *mut u8,
    len: usize,
    huge: bool,
    mr: *mut ibv::ibv_mr,
    slot_bytes: usize,
    free: RefCell<Vec<u32>>,
    available: Semaphore,
}

impl Region {
    fn new(pd: *mut ibv::ibv_pd, config: &RdmaConfig) -> Result<Region, RdmaError> {
        let slot_bytes = config.slot_bytes as usize;
        let wanted = slot_bytes * config.slots as usize;
        let len = wanted.next_multiple_of(HUGE_PAGE_BYTES);
        let map = |extra: libc::c_int| {
            // SAFETY: anonymous private mapping, checked below.
            unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | extra,
                    -1,
                    0,
                )
            }
        };
        let (base, huge) = match map(libc::MAP_HUGETLB) {
            libc::MAP_FAILED => match map(0) {
                libc::MAP_FAILED => return Err(verbs_error("mmap of the buffer region")),
                p => (p as *mut u8, false),
            },
            p => (p as *mut u8, true),
        };
        assert!(
            (base as usize).is_multiple_of(4096),
            "region not page aligned"
        );
        let access = ibv::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as libc::c_int;
        // SAFETY: `base..base+len` is a live mapping owned by the region.
        let mr = unsafe { ibv::ibv_reg_mr(pd, base as *mut c_void, len, access) };
        if mr.is_null() {
            let error = verbs_error("ibv_reg_mr");
            // SAFETY: unmapping what was just mapped.
            unsafe { libc::munmap(base as *mut c_void, len) };
            return Err(error);
        }
        Ok(Region {
            base,
            len,
            huge,
            mr,
            slot_bytes,
            free: RefCell::new((0..config.slots).rev().collect()),
            available: Semaphore::new(u64::from(config.slots)),
        })
    }

    fn lkey(&self) -> u32 {
        // SAFETY: `mr` is valid while the region lives.
        unsafe { (*self.mr).lkey }
    }

    /// A slot, waiting while none is free (back-pressure).
    async fn take(&self) -> u32 {
        let permit = self
            .available
            .acquire_permit(1)
            .await
            .expect("never closed");
        std::mem::forget(permit); // given back by `give`
        self.free
            .borrow_mut()
            .pop()
            .expect("the semaphore counts free slots")
    }

    fn give(&self, slot: u32) {
        self.free.borrow_mut().push(slot);
        self.available.signal(1);
    }

    fn addr(&self, slot: u32) -> *mut u8 {
        assert!(
            (slot as usize + 1) * self.slot_bytes <= self.len,
            "slot out of the region"
        );
        // SAFETY: in bounds, checked above.
        unsafe { self.base.add(slot as usize * self.slot_bytes) }
    }

    fn bytes(&self, slot: u32, len: usize) -> &[u8] {
        assert!(len <= self.slot_bytes);
        // SAFETY: in bounds; the slot is owned by the caller until given back, and the NIC has
        // finished with it (its completion was seen).
        unsafe { std::slice::from_raw_parts(self.addr(slot), len) }
    }

    #[allow(clippy::mut_from_ref)] // slots are owned exclusively between take and give
    fn bytes_mut(&self, slot: u32, len: usize) -> &mut [u8] {
        assert!(len <= self.slot_bytes);
        // SAFETY: as for `bytes`; the slot is not posted to the NIC while written.
        unsafe { std::slice::from_raw_parts_mut(self.addr(slot), len) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: every queue pair using the region is destroyed before the device drops it.
        unsafe {
            ibv::ibv_dereg_mr(self.mr);
            libc::munmap(self.base as *mut c_void, self.len);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Device, queue pairs, completions

/// Work request ids: bit 63 says receive, bits 32..63 the connection, bits 0..32 the slot.
fn wr_id(recv: bool, conn: u32, slot: u32) -> u64 {
    (u64::from(recv) << 63) | (u64::from(conn & 0x7fff_ffff) << 32) | u64::from(slot)
}

fn split_wr_id(id: u64) -> (bool, u32, u32) {
    (id >> 63 == 1, ((id >> 32) & 0x7fff_ffff) as u32, id as u32)
}

struct Waiter {
    result: RefCell<Option<Result<Message, TransportError>>>,
    done: event_listener::Event,
}

impl Waiter {
    fn finish(&self, result: Result<Message, TransportError>) {
        *self.result.borrow_mut() = Some(result);
        self.done.notify(usize::MAX);
    }

    async fn wait(&self) -> Result<Message, TransportError> {
        loop {
            let listener = self.done.listen();
            if let Some(r) = self.result.borrow_mut().take() {
                return r;
            }
            listener.await;
        }
    }
}

/// What a connection does with the frames it receives.
enum Role {
    /// Ours: responses go to waiting calls.
    Client {
        pending: RefCell<HashMap<u64, Rc<Waiter>>>,
        next_id: Cell<u64>,
        credits: Semaphore,
    },
    /// Accepted: requests go to the handler.
    Server { handler: Rc<dyn DynHandler> },
}

/// A queue pair and what belongs to it.
struct Qp {
    no: u32,
    peer: NodeId,
    id: *mut ibv::rdma_cm_id,
    /// The client's own CM event channel (a server's ids use the listener's).
    channel: *mut ibv::rdma_event_channel,
    role: Role,
    closed: Cell<bool>,
    /// Work requests posted and not completed yet (receives and sends).
    posted: Cell<u32>,
    /// Sends the send queue has room for (`depth`): a sender waits for one (back-pressure).
    sends: Semaphore,
    /// No more CM events will name this id (always for a client's own channel; for an accepted
    /// id once the listener reported its disconnect), so it may be destroyed.
    cm_done: Cell<bool>,
    reaped: Cell<bool>,
}

impl Qp {
    #[allow(clippy::too_many_arguments)] // one place builds every queue pair's bookkeeping
    fn new(
        no: u32,
        peer: NodeId,
        id: *mut ibv::rdma_cm_id,
        channel: *mut ibv::rdma_event_channel,
        role: Role,
        depth: u32,
        posted: u32,
        cm_done: bool,
    ) -> Qp {
        Qp {
            no,
            peer,
            id,
            channel,
            role,
            closed: Cell::new(false),
            posted: Cell::new(posted),
            sends: Semaphore::new(u64::from(depth)),
            cm_done: Cell::new(cm_done),
            reaped: Cell::new(false),
        }
    }
}

/// The per-core RDMA state: device context, PD, CQ, buffers, connections.
pub struct RdmaDevice {
    config: RdmaConfig,
    ctx: *mut ibv::ibv_context,
    pd: *mut ibv::ibv_pd,
    channel: *mut ibv::ibv_comp_channel,
    cq: *mut ibv::ibv_cq,
    /// The id bound to the local address (keeps the device context open).
    bound: *mut ibv::rdma_cm_id,
    bound_channel: *mut ibv::rdma_event_channel,
    region: std::mem::ManuallyDrop<Region>,
    watch: Rc<FdWatch>,
    qps: RefCell<HashMap<u32, Rc<Qp>>>,
    next_qp: Cell<u32>,
    /// Sends posted and calls waiting: the poller spins while this is not zero.
    outstanding: Cell<usize>,
    stopped: Cell<bool>,
}

impl RdmaDevice {
    /// Opens the RDMA device that serves `local` (an address of the NIC or soft-RoCE link) on
    /// this core and starts its completion poller. Blocks while binding (start-up only).
    pub fn open(local: SocketAddr, config: RdmaConfig) -> Result<Rc<RdmaDevice>, RdmaError> {
        config.check();
        // SAFETY: FFI calls with checked results; every object is owned by the device and
        // released in Drop in reverse order.
        unsafe {
            let bound_channel = ibv::rdma_create_event_channel();
            if bound_channel.is_null() {
                return Err(verbs_error("rdma_create_event_channel"));
            }
            let mut bound = ptr::null_mut();
            if ibv::rdma_create_id(
                bound_channel,
                &mut bound,
                ptr::null_mut(),
                ibv::rdma_port_space::RDMA_PS_TCP,
            ) != 0
            {
                return Err(verbs_error("rdma_create_id"));
            }
            let mut addr = sockaddr_of(&SocketAddr::new(local.ip(), 0));
            if ibv::rdma_bind_addr(bound, &mut addr as *mut _ as *mut libc::sockaddr) != 0 {
                return Err(verbs_error("rdma_bind_addr"));
            }
            let ctx = (*bound).verbs;
            if ctx.is_null() {
                return Err(RdmaError::NoDevice { addr: local });
            }
            let pd = ibv::ibv_alloc_pd(ctx);
            if pd.is_null() {
                return Err(verbs_error("ibv_alloc_pd"));
            }
            let channel = ibv::ibv_create_comp_channel(ctx);
            if channel.is_null() {
                return Err(verbs_error("ibv_create_comp_channel"));
            }
            let fd = (*channel).fd;
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            let cq = ibv::ibv_create_cq(
                ctx,
                config.cq_entries as libc::c_int,
                ptr::null_mut(),
                channel,
                0,
            );
            if cq.is_null() {
                return Err(verbs_error("ibv_create_cq"));
            }
            let region = Region::new(pd, &config)?;
            let watch = FdWatch::new(fd).map_err(|source| RdmaError::Verbs {
                call: "helper thread",
                source,
            })?;
            let device = Rc::new(RdmaDevice {
                config,
                ctx,
                pd,
                channel,
                cq,
                bound,
                bound_channel,
                region: std::mem::ManuallyDrop::new(region),
                watch: Rc::new(watch),
                qps: RefCell::new(HashMap::new()),
                next_qp: Cell::new(1),
                outstanding: Cell::new(0),
                stopped: Cell::new(false),
            });
            let weak = Rc::downgrade(&device);
            let watch = device.watch.clone();
            glommio::spawn_local(async move {
                // Holds the device only between awaits, so dropping it ends the poller.
                loop {
                    let sleep = {
                        let Some(device) = weak.upgrade() else { break };
                        if device.stopped.get() {
                            break;
                        }
                        device.poll_step()
                    };
                    if !sleep {
                        futures_lite::future::yield_now().await;
                        continue;
                    }
                    watch.readable().await;
                    let Some(device) = weak.upgrade() else { break };
                    device.consume_cq_event();
                }
            })
            .detach();
            Ok(device)
        }
    }

    /// Whether the buffer region came from huge pages.
    pub fn huge_pages(&self) -> bool {
        self.region.huge
    }

    /// Stops the poller (the device is released when the last user drops it).
    pub fn stop(&self) {
        self.stopped.set(true);
        let qps: Vec<_> = self.qps.borrow().values().cloned().collect();
        for qp in qps {
            self.close_qp(&qp, TransportError::Shutdown);
        }
    }

    /// One round of the poller: drains completions; returns true when nothing is outstanding and
    /// the CQ is armed, so the poller may sleep on the completion channel.
    fn poll_step(self: &Rc<Self>) -> bool {
        if self.drain() > 0 || self.outstanding.get() > 0 {
            return false;
        }
        // SAFETY: `cq` is valid while the device lives.
        unsafe { ibv::ibv_req_notify_cq(self.cq, 0) };
        // A completion that arrived before arming raises no event: look once more.
        self.drain() == 0
    }

    /// Takes the completion event that woke the poller (the CQ is re-armed by the next sleep).
    fn consume_cq_event(&self) {
        let mut cq = ptr::null_mut();
        let mut cq_ctx = ptr::null_mut();
        // SAFETY: the channel fd is readable (non-blocking anyway); one event is acked.
        unsafe {
            if ibv::ibv_get_cq_event(self.channel, &mut cq, &mut cq_ctx) == 0 {
                ibv::ibv_ack_cq_events(cq, 1);
            }
        }
    }

    /// Handles every completion in the CQ; returns how many.
    fn drain(self: &Rc<Self>) -> usize {
        let mut total = 0;
        loop {
            // SAFETY: ibv_wc is plain old data.
            let mut wcs: [ibv::ibv_wc; POLL_BATCH] = unsafe { std::mem::zeroed() };
            // SAFETY: `wcs` has room for POLL_BATCH completions.
            let n = unsafe { ibv::ibv_poll_cq(self.cq, POLL_BATCH as i32, wcs.as_mut_ptr()) };
            if n <= 0 {
                return total;
            }
            for wc in &wcs[..n as usize] {
                self.complete(wc);
            }
            total += n as usize;
        }
    }

    fn complete(self: &Rc<Self>, wc: &ibv::ibv_wc) {
        let (recv, no, slot) = split_wr_id(wc.wr_id);
        let qp = self.qps.borrow().get(&no).cloned();
        if !recv {
            self.outstanding.set(self.outstanding.get() - 1);
            self.region.give(slot);
        }
        let Some(qp) = qp else {
            if recv {
                self.region.give(slot);
            }
            return;
        };
        qp.posted.set(qp.posted.get() - 1);
        if !recv {
            qp.sends.signal(1);
        }
        if wc.status != ibv::ibv_wc_status::IBV_WC_SUCCESS {
            if recv {
                self.region.give(slot);
            }
            self.close_qp(&qp, TransportError::PeerClosed { peer: qp.peer });
            self.reap(&qp);
            return;
        }
        if !recv {
            self.reap(&qp);
            return;
        }
        let len = wc.byte_len as usize;
        let decoded = frame::decode(
            self.region.bytes(slot, len),
            self.config.max_payload_bytes(),
        );
        // The bytes are copied out: the slot goes straight back to the receive queue.
        if self.post_recv(&qp, slot).is_err() {
            self.region.give(slot);
            self.reap(&qp);
        }
        let frame = match decoded {
            Ok((frame, used)) if used == len => frame,
            Ok(_) => {
                self.close_qp(
                    &qp,
                    TransportError::FrameCorrupt {
                        peer: qp.peer,
                        source: FrameError::Truncated {
                            needed: len,
                            have: len,
                        },
                    },
                );
                return;
            }
            Err(error) => {
                let error = match error {
                    FrameError::VersionUnsupported { version, .. } => {
                        TransportError::VersionUnsupported {
                            peer: qp.peer,
                            version,
                        }
                    }
                    FrameError::TooLarge { len, max, .. } => TransportError::TooLarge {
                        peer: qp.peer,
                        len,
                        max,
                    },
                    source => TransportError::FrameCorrupt {
                        peer: qp.peer,
                        source,
                    },
                };
                self.close_qp(&qp, error);
                return;
            }
        };
        match &qp.role {
            Role::Client { pending, .. } => {
                if frame.kind != FrameKind::Response {
                    self.close_qp(
                        &qp,
                        TransportError::FrameCorrupt {
                            peer: qp.peer,
                            source: FrameError::UnknownKind {
                                code: frame.kind.code(),
                            },
                        },
                    );
                    return;
                }
                let waiter = pending.borrow_mut().remove(&frame.request_id);
                if let Some(w) = waiter {
                    w.finish(Ok(frame.message));
                }
            }
            Role::Server { handler } => {
                if frame.kind != FrameKind::Request {
                    self.close_qp(&qp, TransportError::PeerClosed { peer: qp.peer });
                    return;
                }
                let handler = handler.clone();
                let qp = qp.clone();
                let device = self.clone();
                glommio::spawn_local(async move {
                    let response = handler.handle_dyn(qp.peer, frame.message).await;
                    let _ = device
                        .send(&qp, FrameKind::Response, frame.request_id, &response)
                        .await;
                })
                .detach();
            }
        }
    }

    fn post_recv(&self, qp: &Qp, slot: u32) -> io::Result<()> {
        if qp.closed.get() {
            return Err(io::ErrorKind::NotConnected.into());
        }
        let mut sge = ibv::ibv_sge {
            addr: self.region.addr(slot) as u64,
            length: self.region.slot_bytes as u32,
            lkey: self.region.lkey(),
        };
        let mut wr = ibv::ibv_recv_wr {
            wr_id: wr_id(true, qp.no, slot),
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad = ptr::null_mut();
        // SAFETY: the QP is live (not closed); the slot is registered and ours until completion.
        let rc = unsafe { ibv::ibv_post_recv((*qp.id).qp, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        qp.posted.set(qp.posted.get() + 1);
        Ok(())
    }

    /// Builds the frame in a send slot and posts it.
    async fn send(
        &self,
        qp: &Qp,
        kind: FrameKind,
        request_id: u64,
        message: &Message,
    ) -> Result<(), TransportError> {
        let max = self.config.max_payload_bytes();
        if message.payload.len() > max as usize {
            return Err(TransportError::TooLarge {
                peer: qp.peer,
                len: message.payload.len() as u64,
                max,
            });
        }
        let head = frame::encode_head(kind, request_id, message).map_err(|_| {
            TransportError::TooLarge {
                peer: qp.peer,
                len: message.payload.len() as u64,
                max,
            }
        })?;
        // Room in the send queue first (given back by the send's completion), then a buffer.
        let room = qp
            .sends
            .acquire_permit(1)
            .await
            .map_err(|_| TransportError::PeerClosed { peer: qp.peer })?;
        let slot = self.region.take().await;
        let len = HEAD_LEN + message.payload.len();
        let buf = self.region.bytes_mut(slot, len);
        buf[..HEAD_LEN].copy_from_slice(&head);
        buf[HEAD_LEN..].copy_from_slice(&message.payload);
        if qp.closed.get() {
            self.region.give(slot);
            return Err(TransportError::PeerClosed { peer: qp.peer });
        }
        std::mem::forget(room); // signalled back by the completion
        let mut sge = ibv::ibv_sge {
            addr: self.region.addr(slot) as u64,
            length: len as u32,
            lkey: self.region.lkey(),
        };
        // SAFETY: ibv_send_wr is plain old data; zero is "no extra fields".
        let mut wr: ibv::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id(false, qp.no, slot);
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = ibv::ibv_wr_opcode::IBV_WR_SEND;
        wr.send_flags = ibv::ibv_send_flags::IBV_SEND_SIGNALED.0;
        let mut bad = ptr::null_mut();
        // SAFETY: the QP is live; the slot stays ours until the send completion gives it back.
        let rc = unsafe { ibv::ibv_post_send((*qp.id).qp, &mut wr, &mut bad) };
        if rc != 0 {
            self.region.give(slot);
            qp.sends.signal(1);
            self.close_qp(qp, TransportError::PeerClosed { peer: qp.peer });
            return Err(TransportError::PeerClosed { peer: qp.peer });
        }
        qp.posted.set(qp.posted.get() + 1);
        self.outstanding.set(self.outstanding.get() + 1);
        Ok(())
    }

    /// Registers a new queue pair's bookkeeping and posts its receives.
    async fn add_qp(
        &self,
        peer: NodeId,
        id: *mut ibv::rdma_cm_id,
        channel: *mut ibv::rdma_event_channel,
        role: Role,
    ) -> Rc<Qp> {
        let no = self.next_qp.get();
        self.next_qp.set(no.wrapping_add(1).max(1) & 0x7fff_ffff);
        let qp = Rc::new(Qp::new(
            no,
            peer,
            id,
            channel,
            role,
            self.config.depth,
            0,
            false,
        ));
        self.qps.borrow_mut().insert(no, qp.clone());
        for _ in 0..self.config.depth {
            let slot = self.region.take().await;
            if self.post_recv(&qp, slot).is_err() {
                self.region.give(slot);
            }
        }
        qp
    }

    /// Fails the connection's calls, disconnects and releases it (its posted receives come back
    /// as flushed completions and return their slots).
    fn close_qp(&self, qp: &Qp, error: TransportError) {
        if qp.closed.replace(true) {
            return;
        }
        if let Role::Client {
            pending, credits, ..
        } = &qp.role
        {
            let waiters: Vec<_> = pending.borrow_mut().drain().collect();
            for (_, w) in waiters {
                w.finish(Err(error.clone()));
            }
            credits.close();
        }
        qp.sends.close();
        // SAFETY: the id is ours; the QP moves to the error state and flushes its work requests,
        // whose completions (handled by `complete`) return the slots; once none is left and the
        // CM is done with the id, `reap` destroys it.
        unsafe {
            ibv::rdma_disconnect(qp.id);
        }
    }

    /// Destroys a closed queue pair once nothing is posted on it and no CM event can name it.
    fn reap(&self, qp: &Qp) {
        if !qp.closed.get() || qp.posted.get() != 0 || !qp.cm_done.get() || qp.reaped.replace(true)
        {
            return;
        }
        self.qps.borrow_mut().remove(&qp.no);
        // SAFETY: closed, nothing posted, no CM event pending for it: nobody uses the id again.
        unsafe {
            ibv::rdma_destroy_qp(qp.id);
            ibv::rdma_destroy_id(qp.id);
            if !qp.channel.is_null() {
                ibv::rdma_destroy_event_channel(qp.channel);
            }
        }
    }

    fn qp_init_attr(&self) -> ibv::ibv_qp_init_attr {
        // SAFETY: plain old data.
        let mut attr: ibv::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = self.cq;
        attr.recv_cq = self.cq;
        attr.qp_type = ibv::ibv_qp_type::IBV_QPT_RC;
        attr.cap.max_send_wr = self.config.depth;
        attr.cap.max_recv_wr = self.config.depth;
        attr.cap.max_send_sge = 1;
        attr.cap.max_recv_sge = 1;
        attr
    }
}

impl Drop for RdmaDevice {
    fn drop(&mut self) {
        // SAFETY: reverse order of creation; every QP is destroyed before the CQ and PD.
        unsafe {
            for (_, qp) in self.qps.borrow_mut().drain() {
                ibv::rdma_destroy_qp(qp.id);
                ibv::rdma_destroy_id(qp.id);
                if !qp.channel.is_null() {
                    ibv::rdma_destroy_event_channel(qp.channel);
                }
            }
            // Deregister the buffers before the PD goes; the poller (which shares the fd watch)
            // has ended, since it only upgrades a weak reference to the device.
            std::mem::ManuallyDrop::drop(&mut self.region);
            ibv::ibv_destroy_cq(self.cq);
            ibv::ibv_dealloc_pd(self.pd);
            ibv::rdma_destroy_id(self.bound);
            ibv::rdma_destroy_event_channel(self.bound_channel);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Handler as a trait object (server queue pairs of one core may serve different handler types)

trait DynHandler {
    fn handle_dyn(
        &self,
        from: NodeId,
        request: Message,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Message> + '_>>;
}

impl<H: Handler> DynHandler for H {
    fn handle_dyn(
        &self,
        from: NodeId,
        request: Message,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Message> + '_>> {
        Box::pin(self.handle(from, request))
    }
}

// ---------------------------------------------------------------------------------------------
// Client

struct Peer {
    addr: SocketAddr,
    qp: RefCell<Option<Rc<Qp>>>,
    connecting: Semaphore,
}

/// The calling side of the RDMA backend, for one core.
pub struct RdmaTransport {
    node: NodeId,
    cluster: ClusterTag,
    device: Rc<RdmaDevice>,
    peers: RefCell<HashMap<NodeId, Rc<Peer>>>,
}

impl RdmaTransport {
    /// A transport for node `node` of the cluster `cluster` names, on `device`.
    pub fn new(node: NodeId, cluster: ClusterTag, device: Rc<RdmaDevice>) -> Self {
        RdmaTransport {
            node,
            cluster,
            device,
            peers: RefCell::new(HashMap::new()),
        }
    }

    /// Sets the RDMA address (IP and rdma_cm port) of `peer`.
    pub fn set_peer(&self, peer: NodeId, addr: SocketAddr) {
        self.peers.borrow_mut().insert(
            peer,
            Rc::new(Peer {
                addr,
                qp: RefCell::new(None),
                connecting: Semaphore::new(1),
            }),
        );
    }

    async fn connection(&self, peer_id: NodeId, peer: &Peer) -> Result<Rc<Qp>, TransportError> {
        let live = |p: &Peer| p.qp.borrow().as_ref().filter(|q| !q.closed.get()).cloned();
        if let Some(qp) = live(peer) {
            return Ok(qp);
        }
        let _one = peer
            .connecting
            .acquire_permit(1)
            .await
            .expect("never closed");
        if let Some(qp) = live(peer) {
            return Ok(qp);
        }
        let device = &self.device;
        let unreachable = |source: io::Error| TransportError::Unreachable {
            peer: peer_id,
            source: Arc::new(source),
        };
        // Receives must be posted before the peer can send: take the slots now, on the core.
        let depth = device.config.depth;
        let mut slots = Vec::with_capacity(depth as usize);
        for _ in 0..depth {
            slots.push(device.region.take().await);
        }
        let no = device.next_qp.get();
        device.next_qp.set(no.wrapping_add(1).max(1) & 0x7fff_ffff);
        let recvs: Vec<(u64, u64)> = slots
            .iter()
            .map(|&s| (wr_id(true, no, s), device.region.addr(s) as u64))
            .collect();
        let setup = ConnectSetup {
            addr: peer.addr,
            node: self.node,
            cluster: self.cluster.get(),
            timeout_ms: device.config.resolve_timeout.as_millis() as i32,
            pd: SendPtr(device.pd),
            ctx: SendPtr(device.ctx),
            attr: device.qp_init_attr(),
            recvs,
            slot_bytes: device.region.slot_bytes as u32,
            lkey: device.region.lkey(),
        };
        let connected = glommio::executor()
            .spawn_blocking(move || connect_blocking(setup))
            .await;
        let (id, channel, (answered, theirs)) = match connected {
            Ok(c) => c,
            Err(e) => {
                for s in slots {
                    device.region.give(s);
                }
                return Err(unreachable(e));
            }
        };
        let qp = Rc::new(Qp::new(
            no,
            peer_id,
            id.0,
            channel.0,
            Role::Client {
                pending: RefCell::new(HashMap::new()),
                next_id: Cell::new(1),
                credits: Semaphore::new(u64::from(depth)),
            },
            depth,
            depth, // connect_blocking posted every receive or failed
            true,  // its own event channel: nothing else reads events for it
        ));
        device.qps.borrow_mut().insert(no, qp.clone());
        let wrong = if answered != peer_id {
            Some(TransportError::WrongNode {
                peer: peer_id,
                answered,
            })
        } else if !self.cluster.accepts(theirs) {
            Some(TransportError::WrongCluster {
                peer: peer_id,
                ours: self.cluster.get(),
                theirs,
            })
        } else {
            None
        };
        if let Some(error) = wrong {
            // Closing flushes the posted receives back into the region and then reaps the QP.
            device.close_qp(&qp, error.clone());
            device.reap(&qp);
            return Err(error);
        }
        *peer.qp.borrow_mut() = Some(qp.clone());
        Ok(qp)
    }

    async fn call_inner(
        &self,
        peer_id: NodeId,
        request: Message,
        id_seen: &Cell<u64>,
    ) -> Result<Message, TransportError> {
        let peer = self
            .peers
            .borrow()
            .get(&peer_id)
            .cloned()
            .ok_or(TransportError::UnknownPeer { peer: peer_id })?;
        let qp = self.connection(peer_id, &peer).await?;
        let Role::Client {
            pending,
            next_id,
            credits,
        } = &qp.role
        else {
            unreachable!("client connections have the client role");
        };
        let _credit = credits
            .acquire_permit(1)
            .await
            .map_err(|_| TransportError::PeerClosed { peer: peer_id })?;
        let id = next_id.get();
        next_id.set(id + 1);
        id_seen.set(id);
        let waiter = Rc::new(Waiter {
            result: RefCell::new(None),
            done: event_listener::Event::new(),
        });
        pending.borrow_mut().insert(id, waiter.clone());
        let device = &self.device;
        device.outstanding.set(device.outstanding.get() + 1);
        let _guard = CallGuard {
            device,
            pending,
            id,
        };
        device.send(&qp, FrameKind::Request, id, &request).await?;
        waiter.wait().await
    }
}

impl Transport for RdmaTransport {
    fn local_node(&self) -> NodeId {
        self.node
    }

    async fn call(&self, peer: NodeId, request: Message) -> Result<Message, TransportError> {
        let limit = self.device.config.call_timeout;
        let started = Instant::now();
        let id_seen = Cell::new(0);
        let work = self.call_inner(peer, request, &id_seen);
        let timeout = async {
            glommio::timer::sleep(limit.saturating_sub(started.elapsed())).await;
            Err(TransportError::Timeout {
                peer,
                request_id: id_seen.get(),
                after: limit,
            })
        };
        future::or(work, timeout).await
    }
}

/// Ends a call's accounting however the call ends (answered, failed, or dropped at its timeout):
/// the poller stops spinning for it and a late response finds no waiter.
struct CallGuard<'a> {
    device: &'a RdmaDevice,
    pending: &'a RefCell<HashMap<u64, Rc<Waiter>>>,
    id: u64,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.device
            .outstanding
            .set(self.device.outstanding.get() - 1);
        self.pending.borrow_mut().remove(&self.id);
    }
}

struct ConnectSetup {
    addr: SocketAddr,
    node: NodeId,
    cluster: u64,
    timeout_ms: i32,
    pd: SendPtr<ibv::ibv_pd>,
    ctx: SendPtr<ibv::ibv_context>,
    attr: ibv::ibv_qp_init_attr,
    /// (wr id, address) of each receive to post before connecting.
    recvs: Vec<(u64, u64)>,
    slot_bytes: u32,
    lkey: u32,
}

// SAFETY: the init attributes hold CQ pointers (thread-safe verbs objects owned by the core).
unsafe impl Send for ConnectSetup {}

/// The connection, its event channel, and the peer's hello (node id, cluster id).
type Connected = (
    SendPtr<ibv::rdma_cm_id>,
    SendPtr<ibv::rdma_event_channel>,
    (NodeId, u64),
);

/// Waits for the next CM event on `channel` and returns its type, status and private data.
///
/// # Safety
/// `channel` must be a live event channel.
unsafe fn next_event(
    channel: *mut ibv::rdma_event_channel,
) -> io::Result<(u32, i32, Option<[u8; PRIVATE_DATA_LEN]>)> {
    let mut event = ptr::null_mut();
    // SAFETY: per the function contract.
    unsafe {
        if ibv::rdma_get_cm_event(channel, &mut event) != 0 {
            return Err(io::Error::last_os_error());
        }
        let kind = (*event).event;
        let status = (*event).status;
        let conn = (*event).param.conn;
        let data =
            if !conn.private_data.is_null() && conn.private_data_len as usize >= PRIVATE_DATA_LEN {
                let mut d = [0u8; PRIVATE_DATA_LEN];
                ptr::copy_nonoverlapping(conn.private_data as *const u8, d.as_mut_ptr(), d.len());
                Some(d)
            } else {
                None
            };
        ibv::rdma_ack_cm_event(event);
        Ok((kind, status, data))
    }
}

/// The hello in the connection's private data: node id u64, frame version u8, cluster id u64
/// (see [`ClusterTag`]), little-endian.
fn private_data(node: NodeId, cluster: u64) -> [u8; PRIVATE_DATA_LEN] {
    let mut d = [0u8; PRIVATE_DATA_LEN];
    d[..8].copy_from_slice(&node.to_le_bytes());
    d[8] = FRAME_VERSION;
    d[9..].copy_from_slice(&cluster.to_le_bytes());
    d
}

fn parse_private_data(d: &[u8; PRIVATE_DATA_LEN]) -> io::Result<(NodeId, u64)> {
    if d[8] != FRAME_VERSION {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "peer speaks another frame version",
        ));
    }
    let node = u64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
    Ok((
        node,
        u64::from_le_bytes(d[9..].try_into().expect("8 bytes")),
    ))
}

fn conn_param(data: &[u8; PRIVATE_DATA_LEN]) -> ibv::rdma_conn_param {
    ibv::rdma_conn_param {
        private_data: data.as_ptr() as *const c_void,
        private_data_len: PRIVATE_DATA_LEN as u8,
        responder_resources: 0,
        initiator_depth: 0,
        flow_control: 0,
        retry_count: 7,
        rnr_retry_count: 7,
        srq: 0,
        qp_num: 0,
    }
}

/// Resolves, creates the QP on the core's PD and CQ, posts the receives and connects. Runs in
/// glommio's blocking pool.
fn connect_blocking(mut s: ConnectSetup) -> io::Result<Connected> {
    let fail = |what: &str| io::Error::other(format!("{what}: {}", io::Error::last_os_error()));
    // SAFETY: FFI with checked results; on failure everything created here is destroyed.
    unsafe {
        let channel = ibv::rdma_create_event_channel();
        if channel.is_null() {
            return Err(fail("rdma_create_event_channel"));
        }
        let mut id = ptr::null_mut();
        if ibv::rdma_create_id(
            channel,
            &mut id,
            ptr::null_mut(),
            ibv::rdma_port_space::RDMA_PS_TCP,
        ) != 0
        {
            ibv::rdma_destroy_event_channel(channel);
            return Err(fail("rdma_create_id"));
        }
        let cleanup = |id: *mut ibv::rdma_cm_id, qp: bool| {
            if qp {
                ibv::rdma_destroy_qp(id);
            }
            ibv::rdma_destroy_id(id);
            ibv::rdma_destroy_event_channel(channel);
        };
        let mut dst = sockaddr_of(&s.addr);
        let expect = |want: u32, what: &str| -> io::Result<Option<[u8; PRIVATE_DATA_LEN]>> {
            let (kind, status, data) = next_event(channel)?;
            if kind != want {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("{what}: rdma_cm event {kind} (status {status})"),
                ));
            }
            Ok(data)
        };
        if ibv::rdma_resolve_addr(
            id,
            ptr::null_mut(),
            &mut dst as *mut _ as *mut libc::sockaddr,
            s.timeout_ms,
        ) != 0
        {
            cleanup(id, false);
            return Err(fail("rdma_resolve_addr"));
        }
        if let Err(e) = expect(
            ibv::rdma_cm_event_type::RDMA_CM_EVENT_ADDR_RESOLVED,
            "address resolution",
        ) {
            cleanup(id, false);
            return Err(e);
        }
        if ibv::rdma_resolve_route(id, s.timeout_ms) != 0 {
            cleanup(id, false);
            return Err(fail("rdma_resolve_route"));
        }
        if let Err(e) = expect(
            ibv::rdma_cm_event_type::RDMA_CM_EVENT_ROUTE_RESOLVED,
            "route resolution",
        ) {
            cleanup(id, false);
            return Err(e);
        }
        if (*id).verbs != s.ctx.0 {
            cleanup(id, false);
            return Err(io::Error::other(
                "the peer is reached through another RDMA device than this core's",
            ));
        }
        if ibv::rdma_create_qp(id, s.pd.0, &mut s.attr) != 0 {
            cleanup(id, false);
            return Err(fail("rdma_create_qp"));
        }
        for &(wr, addr) in &s.recvs {
            let mut sge = ibv::ibv_sge {
                addr,
                length: s.slot_bytes,
                lkey: s.lkey,
            };
            let mut rwr = ibv::ibv_recv_wr {
                wr_id: wr,
                next: ptr::null_mut(),
                sg_list: &mut sge,
                num_sge: 1,
            };
            let mut bad = ptr::null_mut();
            let rc = ibv::ibv_post_recv((*id).qp, &mut rwr, &mut bad);
            if rc != 0 {
                cleanup(id, true);
                return Err(io::Error::from_raw_os_error(rc));
            }
        }
        let data = private_data(s.node, s.cluster);
        let mut param = conn_param(&data);
        if ibv::rdma_connect(id, &mut param) != 0 {
            cleanup(id, true);
            return Err(fail("rdma_connect"));
        }
        let answer = match expect(
            ibv::rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED,
            "connect",
        ) {
            Ok(a) => a,
            Err(e) => {
                cleanup(id, true);
                return Err(e);
            }
        };
        let Some(answer) = answer else {
            ibv::rdma_disconnect(id);
            cleanup(id, true);
            return Err(io::Error::other("the peer sent no hello"));
        };
        match parse_private_data(&answer) {
            Ok(node) => Ok((SendPtr(id), SendPtr(channel), node)),
            Err(e) => {
                ibv::rdma_disconnect(id);
                cleanup(id, true);
                Err(e)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server

/// What the listener thread hands to the core.
enum CmNews {
    Request {
        id: SendPtr<ibv::rdma_cm_id>,
        hello: Option<[u8; PRIVATE_DATA_LEN]>,
    },
    Disconnected {
        id: SendPtr<ibv::rdma_cm_id>,
    },
    Failed(io::Error),
}

#[derive(Default)]
struct Inbox {
    news: VecDeque<CmNews>,
    waker: Option<Waker>,
    stop: bool,
}

/// Answers requests to node `node` arriving at `listen` (an address of `device`'s NIC, with the
/// rdma_cm port) with `handler` until `shutdown` is triggered. A peer of another cluster than
/// `cluster` is rejected.
pub async fn serve<H: Handler + 'static>(
    device: Rc<RdmaDevice>,
    listen: SocketAddr,
    node: NodeId,
    cluster: ClusterTag,
    handler: Rc<H>,
    shutdown: Shutdown,
) -> Result<(), RdmaError> {
    let handler: Rc<dyn DynHandler> = handler;
    // SAFETY: FFI with checked results; the listener id and channel are destroyed on return.
    let (channel, listen_id) = unsafe {
        let channel = ibv::rdma_create_event_channel();
        if channel.is_null() {
            return Err(verbs_error("rdma_create_event_channel"));
        }
        let mut id = ptr::null_mut();
        if ibv::rdma_create_id(
            channel,
            &mut id,
            ptr::null_mut(),
            ibv::rdma_port_space::RDMA_PS_TCP,
        ) != 0
        {
            return Err(verbs_error("rdma_create_id"));
        }
        let mut addr = sockaddr_of(&listen);
        if ibv::rdma_bind_addr(id, &mut addr as *mut _ as *mut libc::sockaddr) != 0 {
            return Err(verbs_error("rdma_bind_addr"));
        }
        if (*id).verbs != device.ctx {
            return Err(RdmaError::NoDevice { addr: listen });
        }
        if ibv::rdma_listen(id, 128) != 0 {
            return Err(verbs_error("rdma_listen"));
        }
        (channel, id)
    };
    let inbox = Arc::new(Mutex::new(Inbox::default()));
    let listener = {
        let inbox = inbox.clone();
        let channel = SendPtr(channel);
        std::thread::Builder::new()
            .name("cairn-rdma-cm".into())
            .spawn(move || listen_loop(channel, &inbox))
            .map_err(|source| RdmaError::Verbs {
                call: "listener thread",
                source,
            })?
    };
    let by_id: RefCell<HashMap<usize, Rc<Qp>>> = RefCell::new(HashMap::new());
    loop {
        let news = async {
            Some(
                poll_fn(|cx| {
                    let mut inbox = inbox.lock().expect("inbox");
                    if let Some(n) = inbox.news.pop_front() {
                        return Poll::Ready(n);
                    }
                    inbox.waker = Some(cx.waker().clone());
                    Poll::Pending
                })
                .await,
            )
        };
        let stop = async {
            shutdown.wait().await;
            None
        };
        let Some(news) = future::or(news, stop).await else {
            break;
        };
        match news {
            CmNews::Request { id, hello } => {
                let id = id.0;
                let peer = hello.as_ref().map(parse_private_data);
                // SAFETY: a connection request id handed over by the listener thread.
                unsafe {
                    let Some(Ok((peer, _))) = peer
                        .filter(|p| p.as_ref().is_ok_and(|&(_, theirs)| cluster.accepts(theirs)))
                    else {
                        ibv::rdma_reject(id, ptr::null(), 0);
                        ibv::rdma_destroy_id(id);
                        continue;
                    };
                    let mut attr = device.qp_init_attr();
                    if ibv::rdma_create_qp(id, device.pd, &mut attr) != 0 {
                        ibv::rdma_reject(id, ptr::null(), 0);
                        ibv::rdma_destroy_id(id);
                        continue;
                    }
                    let qp = device
                        .add_qp(
                            peer,
                            id,
                            ptr::null_mut(),
                            Role::Server {
                                handler: handler.clone(),
                            },
                        )
                        .await;
                    let data = private_data(node, cluster.get());
                    let mut param = conn_param(&data);
                    if ibv::rdma_accept(id, &mut param) != 0 {
                        device.close_qp(&qp, TransportError::PeerClosed { peer });
                        continue;
                    }
                    by_id.borrow_mut().insert(id as usize, qp);
                }
            }
            CmNews::Disconnected { id } => {
                let qp = by_id.borrow_mut().remove(&(id.0 as usize));
                if let Some(qp) = qp {
                    device.close_qp(&qp, TransportError::PeerClosed { peer: qp.peer });
                    qp.cm_done.set(true);
                    device.reap(&qp);
                }
            }
            CmNews::Failed(source) => {
                return Err(RdmaError::Verbs {
                    call: "rdma_get_cm_event",
                    source,
                });
            }
        }
    }
    inbox.lock().expect("inbox").stop = true;
    // SAFETY: destroying the listening id wakes the listener thread's rdma_get_cm_event with an
    // error, after which it sees `stop` and exits.
    unsafe {
        ibv::rdma_destroy_id(listen_id);
    }
    let _ = listener.join();
    // SAFETY: the listener thread has exited; nothing else uses the channel.
    unsafe { ibv::rdma_destroy_event_channel(channel) };
    Ok(())
}

fn listen_loop(channel: SendPtr<ibv::rdma_event_channel>, inbox: &Mutex<Inbox>) {
    loop {
        let mut event = ptr::null_mut();
        // SAFETY: the channel lives until this thread is joined.
        let rc = unsafe { ibv::rdma_get_cm_event(channel.0, &mut event) };
        let news = if rc != 0 {
            let stop = inbox.lock().expect("inbox").stop;
            if stop {
                return;
            }
            CmNews::Failed(io::Error::last_os_error())
        } else {
            // SAFETY: a valid event until acked.
            unsafe {
                let kind = (*event).event;
                let id = SendPtr((*event).id);
                let conn = (*event).param.conn;
                let hello = if !conn.private_data.is_null()
                    && conn.private_data_len as usize >= PRIVATE_DATA_LEN
                {
                    let mut d = [0u8; PRIVATE_DATA_LEN];
                    ptr::copy_nonoverlapping(
                        conn.private_data as *const u8,
                        d.as_mut_ptr(),
                        d.len(),
                    );
                    Some(d)
                } else {
                    None
                };
                ibv::rdma_ack_cm_event(event);
                use ibv::rdma_cm_event_type as ev;
                match kind {
                    ev::RDMA_CM_EVENT_CONNECT_REQUEST => CmNews::Request { id, hello },
                    ev::RDMA_CM_EVENT_DISCONNECTED | ev::RDMA_CM_EVENT_TIMEWAIT_EXIT => {
                        CmNews::Disconnected { id }
                    }
                    _ => continue,
                }
            }
        };
        let failed = matches!(news, CmNews::Failed(_));
        let waker = {
            let mut i = inbox.lock().expect("inbox");
            i.news.push_back(news);
            i.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        if failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_request_ids_round_trip() {
        for (recv, conn, slot) in [(true, 1, 0), (false, 0x7fff_ffff, u32::MAX), (true, 5, 77)] {
            assert_eq!(split_wr_id(wr_id(recv, conn, slot)), (recv, conn, slot));
        }
    }

    #[test]
    fn private_data_carries_node_and_version() {
        let d = private_data(0x1234_5678_9abc, 0xC1);
        assert_eq!(parse_private_data(&d).unwrap(), (0x1234_5678_9abc, 0xC1));
        let mut newer = d;
        newer[8] = FRAME_VERSION + 1;
        assert!(parse_private_data(&newer).is_err());
    }

    #[test]
    fn default_config_is_consistent() {
        let c = RdmaConfig::default();
        c.check();
        assert_eq!(c.max_payload_bytes() as usize, (128 << 10) - HEAD_LEN);
    }

    /// Loopback over a real RDMA device (or soft-RoCE). Needs `CAIRN_RDMA_ADDR=<ip>` of an
    /// RDMA-capable interface; run by `hw-tests/rdma/run.sh`.
    #[test]
    #[ignore = "needs an RDMA device: hw-tests/rdma/run.sh"]
    fn rdma_loopback() {
        let Ok(ip) = std::env::var("CAIRN_RDMA_ADDR") else {
            panic!("set CAIRN_RDMA_ADDR to an address of an RDMA device (hw-tests/rdma/run.sh)");
        };
        let ip: std::net::IpAddr = ip.parse().expect("CAIRN_RDMA_ADDR is an IP address");
        glommio::LocalExecutorBuilder::default()
            .io_memory(1 << 20)
            .make()
            .expect("executor")
            .run(async move {
                let config = RdmaConfig {
                    slots: 256,
                    ..RdmaConfig::default()
                };
                let device = RdmaDevice::open(SocketAddr::new(ip, 0), config).expect("open");
                println!(
                    "RDMA device opened; buffers from {}",
                    if device.huge_pages() {
                        "2 MiB huge pages"
                    } else {
                        "regular pages (no huge pages reserved)"
                    }
                );
                let listen = SocketAddr::new(ip, 20_886);
                let shutdown = Shutdown::new();
                let server = glommio::spawn_local(serve(
                    device.clone(),
                    listen,
                    2,
                    ClusterTag::default(),
                    Rc::new(super::super::Echo),
                    shutdown.clone(),
                ));
                glommio::timer::sleep(Duration::from_millis(100)).await;
                let client = Rc::new(RdmaTransport::new(1, ClusterTag::default(), device.clone()));
                client.set_peer(2, listen);
                let m = |seq: u64, len: usize| Message {
                    op: 1,
                    vdisk: 9,
                    epoch: 1,
                    sequence: seq,
                    payload: vec![seq as u8; len],
                };
                for (i, len) in [0usize, 1, 4096, 100_000].into_iter().enumerate() {
                    let got = client.call(2, m(i as u64, len)).await.expect("round trip");
                    assert_eq!(got, m(i as u64, len));
                }
                let calls: Vec<_> = (0..200u64)
                    .map(|i| {
                        let c = client.clone();
                        glommio::spawn_local(async move { c.call(2, m(i, 512)).await })
                    })
                    .collect();
                for (i, c) in calls.into_iter().enumerate() {
                    assert_eq!(c.await.expect("pipelined call"), m(i as u64, 512));
                }
                assert!(matches!(
                    client
                        .call(2, m(0, config.max_payload_bytes() as usize + 1))
                        .await,
                    Err(TransportError::TooLarge { .. })
                ));
                shutdown.trigger();
                server.await.expect("serve");
                device.stop();
                println!("RDMA loopback: 205 calls answered");
            });
    }
}
