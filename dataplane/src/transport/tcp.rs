//! The TCP backend: [`TcpTransport`] (the calling side) and [`serve`] (the answering side) on
//! glommio sockets.
//!
//! **Connections per peer per core.** Each core makes its own `TcpTransport`, which keeps at most
//! one connection to each peer and pipelines every call to that peer over it: requests carry ids
//! ([`frame`]), many are in flight at once and responses are matched by id in whatever order they
//! come back. Nothing is shared between cores, so no lock is taken on the path.
//!
//! **Connecting.** A call that finds no live connection opens one (one attempt at a time per
//! peer: concurrent callers wait for it), exchanges hello frames (so both ends know the other's
//! node id and cluster: a stale address that now leads to another node is refused as
//! [`TransportError::WrongNode`], and one that leads to another cluster's node as
//! [`TransportError::WrongCluster`], see [`ClusterTag`]) and sets `TCP_NODELAY` (the writer
//! already coalesces frames, so Nagle would only add latency). A failed attempt starts a
//! back-off that doubles from [`TcpConfig::backoff_min`] to [`TcpConfig::backoff_max`]; calls
//! during the back-off fail at once with [`TransportError::Unreachable`] instead of piling
//! connection attempts on a dead peer, which lets the replication layer pick another replica
//! quickly. The first call after the back-off tries again, so a restarted peer is found without
//! anyone re-registering it.
//!
//! **Back-pressure.** At most [`TcpConfig::max_in_flight`] calls per peer are outstanding; further
//! callers wait for a slot (they do not fail). The server side answers at most as many requests
//! per connection at once and stops reading the socket while full, so a flood turns into TCP flow
//! control rather than memory growth.
//!
//! **Failures.** Each call has a time limit ([`TcpConfig::call_timeout`], counted from the call,
//! including any wait for a slot or a connection); a timed-out call is forgotten and a late
//! response to it dropped, while the connection stays up. A frame that fails its checks closes the
//! connection: the receiver of a bad request answers with a reject frame when the request id is
//! trustworthy (header crc verified), then closes; a client that receives a bad frame fails every
//! call in flight on that connection with [`TransportError::FrameCorrupt`]. A connection that
//! ends fails its calls with [`TransportError::PeerClosed`] and is replaced by the next call.
//!
//! Known cost, to remove with the replication work: each frame's payload is a fresh `Vec` (the
//! [`Message`] owns its bytes); a pool like the NBD frontend's `BufPool` would make the steady
//! state allocation-free.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::{Preallocated, TcpListener, TcpStream};
use glommio::sync::Semaphore;

use super::frame::{self, FIXED_LEN, Frame, FrameError, FrameKind, HEAD_LEN, RejectReason};
use super::{ClusterTag, Handler, Message, NodeId, Transport, TransportError};
use crate::nbd::Shutdown;
use crate::nbd::accept_connections;
use crate::nbd::io::{LocalQueue, SharedStream, Signal};

/// How a [`TcpTransport`] and [`serve`] behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpConfig {
    /// Time limit of one call, from the call to its response.
    pub call_timeout: Duration,
    /// Time limit of one connection attempt, hello exchange included.
    pub connect_timeout: Duration,
    /// Calls in flight per peer (client) and requests being answered per connection (server).
    pub max_in_flight: usize,
    /// Largest payload sent or accepted (at most [`frame::MAX_PAYLOAD_LEN`]).
    pub max_payload_bytes: u32,
    /// First pause after a failed connection attempt.
    pub backoff_min: Duration,
    /// Longest pause between connection attempts.
    pub backoff_max: Duration,
    /// Source address of outgoing connections (`None`: the kernel's choice). A node sets the
    /// address it serves on, so traffic between nodes is told apart (and filtered, or
    /// partitioned) by address even when several nodes share a host.
    pub local_ip: Option<std::net::IpAddr>,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            call_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            max_in_flight: 128,
            max_payload_bytes: 16 << 20,
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_secs(1),
            local_ip: None,
        }
    }
}

impl TcpConfig {
    fn check(&self) {
        assert!(self.max_in_flight > 0, "max_in_flight must be positive");
        assert!(
            self.max_payload_bytes <= frame::MAX_PAYLOAD_LEN,
            "max_payload_bytes {} is over the frame limit {}",
            self.max_payload_bytes,
            frame::MAX_PAYLOAD_LEN
        );
        assert!(
            self.backoff_min <= self.backoff_max,
            "back-off range is empty"
        );
        assert!(!self.connect_timeout.is_zero(), "connect timeout of zero");
    }
}

/// Frames the writer coalesces into one buffer before writing, when their payloads are small.
const OUT_BUFFER_BYTES: usize = 64 << 10;
/// Payloads up to this size are copied into the coalescing buffer; larger ones are written from
/// where they are. A replicated 4 KiB write is a batch of two 4 KiB slices plus its request
/// header: copied with its frame head, it leaves in one send (one TCP segment with
/// `TCP_NODELAY`) and the peer wakes once for it, not once for the head and again for the
/// payload.
const COALESCE_PAYLOAD_BYTES: usize = 32 << 10;
/// Receive buffer of a connection: a batch of frames is read with one receive.
const RX_BUFFER_BYTES: usize = 128 << 10;

// ---------------------------------------------------------------------------------------------
// Frame I/O shared by both sides

/// Why reading a frame stopped.
enum ReadError {
    /// The peer closed the connection between frames.
    Closed,
    /// The socket failed or closed mid-frame.
    Io(io::Error),
    /// The bytes are not a valid frame; `request_id` if the header verified (so a reject can be
    /// addressed to it).
    Frame {
        error: FrameError,
        request_id: Option<u64>,
    },
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

fn frame_error(error: FrameError) -> ReadError {
    let request_id = match error {
        FrameError::VersionUnsupported { request_id, .. }
        | FrameError::TooLarge { request_id, .. } => Some(request_id),
        _ => None,
    };
    ReadError::Frame { error, request_id }
}

async fn read_frame<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &SharedStream<S>,
    max_payload: u32,
) -> Result<Frame, ReadError> {
    let mut fixed = [0u8; FIXED_LEN];
    if !stream.read_exact_or_eof(&mut fixed).await? {
        return Err(ReadError::Closed);
    }
    let header_len = frame::parse_fixed(&fixed).map_err(frame_error)?.header_len as usize;
    let mut header = [0u8; frame::MAX_HEADER_LEN as usize];
    let header = &mut header[..header_len];
    stream.read_exact(header).await?;
    let head = frame::check_head(&fixed, header, max_payload).map_err(frame_error)?;
    let mut payload = vec![0u8; head.payload_len as usize];
    stream.read_exact(&mut payload).await?;
    head.into_frame(payload).map_err(|error| ReadError::Frame {
        error,
        request_id: Some(head.request_id),
    })
}

/// A frame queued for the writer: its head and the payload it covers.
struct Outgoing {
    head: [u8; HEAD_LEN],
    payload: Vec<u8>,
}

impl Outgoing {
    fn new(kind: FrameKind, request_id: u64, message: Message) -> Result<Self, FrameError> {
        Ok(Outgoing {
            head: frame::encode_head(kind, request_id, &message)?,
            payload: message.payload,
        })
    }
}

/// Writes queued frames until the queue closes, coalescing small ones; with `finish`, also the
/// frames still queued at the close (a server's last responses and rejects). Returns the first
/// write error (after which it keeps draining, dropping frames, until the queue closes).
async fn write_frames<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &SharedStream<S>,
    queue: &LocalQueue<Outgoing>,
    finish: bool,
) -> io::Result<()> {
    let mut batch = Vec::new();
    let mut out = Vec::with_capacity(OUT_BUFFER_BYTES);
    let mut result = Ok(());
    while queue.pop_all(&mut batch).await {
        if result.is_err() {
            batch.clear();
            continue;
        }
        result = write_batch(stream, &mut batch, &mut out).await;
        batch.clear();
    }
    queue.take_remaining(&mut batch);
    if finish && result.is_ok() && !batch.is_empty() {
        result = write_batch(stream, &mut batch, &mut out).await;
    }
    result
}

async fn write_batch<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &SharedStream<S>,
    batch: &mut Vec<Outgoing>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    out.clear();
    for frame in batch.drain(..) {
        if out.len() + HEAD_LEN > OUT_BUFFER_BYTES {
            stream.write_all(out).await?;
            out.clear();
        }
        out.extend_from_slice(&frame.head);
        if frame.payload.len() <= COALESCE_PAYLOAD_BYTES
            && out.len() + frame.payload.len() <= OUT_BUFFER_BYTES
        {
            out.extend_from_slice(&frame.payload);
        } else {
            stream.write_all(out).await?;
            out.clear();
            stream.write_all(&frame.payload).await?;
        }
    }
    if !out.is_empty() {
        stream.write_all(out).await?;
        out.clear();
    }
    stream.flush().await
}

/// A connection's stream, read through a [`RX_BUFFER_BYTES`] buffer.
fn framed(stream: TcpStream) -> Rc<SharedStream<TcpStream<Preallocated>>> {
    Rc::new(SharedStream::new(
        stream.buffered_with(Preallocated::new(RX_BUFFER_BYTES)),
    ))
}

/// Sends our hello and reads the peer's (its node and cluster ids), within `limit`.
async fn exchange_hello<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &SharedStream<S>,
    node: NodeId,
    cluster: u64,
    limit: Duration,
) -> Result<(NodeId, u64), ReadError> {
    let exchange = async {
        let hello = frame::hello(node, cluster);
        let head = frame::encode_head(FrameKind::Hello, 0, &hello).map_err(frame_error)?;
        stream.write_all(&head).await?;
        stream.write_all(&hello.payload).await?;
        stream.flush().await?;
        let reply = read_frame(stream, 64).await?;
        match (reply.kind, frame::hello_node(&reply.message)) {
            (FrameKind::Hello, Some(peer)) => Ok(peer),
            (kind, _) => Err(ReadError::Frame {
                error: FrameError::UnknownKind { code: kind.code() },
                request_id: None,
            }),
        }
    };
    let timeout = async {
        glommio::timer::sleep(limit).await;
        Err(ReadError::Io(io::ErrorKind::TimedOut.into()))
    };
    future::or(exchange, timeout).await
}

// ---------------------------------------------------------------------------------------------
// Client

/// A call waiting for its response.
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

/// One live connection to a peer.
struct Conn {
    peer: NodeId,
    pending: RefCell<HashMap<u64, Rc<Waiter>>>,
    next_id: Cell<u64>,
    out: LocalQueue<Outgoing>,
    closed: Signal,
}

impl Conn {
    /// Ends the connection: every call in flight on it fails with `error`.
    fn close(&self, error: TransportError) {
        if self.closed.is_fired() {
            return;
        }
        self.closed.fire();
        self.out.close();
        let pending: Vec<_> = self.pending.borrow_mut().drain().collect();
        for (_, waiter) in pending {
            waiter.finish(Err(error.clone()));
        }
    }
}

/// Removes a call's waiter when the call ends, however it ends (answered, timed out, dropped).
struct PendingGuard<'a> {
    conn: &'a Conn,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.conn.pending.borrow_mut().remove(&self.id);
    }
}

struct Peer {
    id: NodeId,
    addr: Cell<SocketAddr>,
    slots: Semaphore,
    conn: RefCell<Option<Rc<Conn>>>,
    /// One connection attempt at a time.
    connecting: Semaphore,
    failures: Cell<u32>,
    retry_at: Cell<Option<Instant>>,
    last_error: RefCell<Option<TransportError>>,
}

impl Peer {
    fn live(&self) -> Option<Rc<Conn>> {
        self.conn
            .borrow()
            .as_ref()
            .filter(|c| !c.closed.is_fired())
            .cloned()
    }

    fn backing_off(&self) -> Option<TransportError> {
        let at = self.retry_at.get()?;
        if Instant::now() >= at {
            return None;
        }
        Some(
            self.last_error
                .borrow()
                .clone()
                .unwrap_or_else(|| TransportError::Unreachable {
                    peer: self.id,
                    source: Arc::new(io::ErrorKind::NotConnected.into()),
                }),
        )
    }
}

struct Client {
    node: NodeId,
    cluster: ClusterTag,
    config: TcpConfig,
    peers: RefCell<HashMap<NodeId, Rc<Peer>>>,
    shutdown: Signal,
    connects: Cell<u64>,
}

/// The calling side of the TCP backend, for one core.
pub struct TcpTransport {
    client: Rc<Client>,
}

impl TcpTransport {
    /// A transport for node `node` of the cluster `cluster` names, with no peers yet.
    pub fn new(node: NodeId, cluster: ClusterTag, config: TcpConfig) -> Self {
        config.check();
        TcpTransport {
            client: Rc::new(Client {
                node,
                cluster,
                config,
                peers: RefCell::new(HashMap::new()),
                shutdown: Signal::new(),
                connects: Cell::new(0),
            }),
        }
    }

    /// Sets (or changes) the address of `peer`. A changed address takes effect at the next
    /// connection; a live connection to the old one stays until it ends.
    pub fn set_peer(&self, peer: NodeId, addr: SocketAddr) {
        let mut peers = self.client.peers.borrow_mut();
        if let Some(p) = peers.get(&peer) {
            p.addr.set(addr);
            p.retry_at.set(None);
            return;
        }
        peers.insert(
            peer,
            Rc::new(Peer {
                id: peer,
                addr: Cell::new(addr),
                slots: Semaphore::new(self.client.config.max_in_flight as u64),
                conn: RefCell::new(None),
                connecting: Semaphore::new(1),
                failures: Cell::new(0),
                retry_at: Cell::new(None),
                last_error: RefCell::new(None),
            }),
        );
    }

    /// Connections opened so far (over all peers): a reconnect shows up here.
    pub fn connections_opened(&self) -> u64 {
        self.client.connects.get()
    }

    /// Calls in flight to `peer`.
    pub fn in_flight(&self, peer: NodeId) -> usize {
        let peers = self.client.peers.borrow();
        let Some(p) = peers.get(&peer) else { return 0 };
        self.client.config.max_in_flight - p.slots.available() as usize
    }

    /// Fails every call in flight and every later one with [`TransportError::Shutdown`], and
    /// closes the connections.
    pub fn shutdown(&self) {
        self.client.shutdown.fire();
        let peers: Vec<_> = self.client.peers.borrow().values().cloned().collect();
        for peer in peers {
            if let Some(conn) = peer.conn.borrow_mut().take() {
                conn.close(TransportError::Shutdown);
            }
        }
    }
}

impl Client {
    async fn connection(self: &Rc<Self>, peer: &Rc<Peer>) -> Result<Rc<Conn>, TransportError> {
        if let Some(conn) = peer.live() {
            return Ok(conn);
        }
        if let Some(error) = peer.backing_off() {
            return Err(error);
        }
        let _attempt = peer
            .connecting
            .acquire_permit(1)
            .await
            .expect("never closed");
        // Someone else may have connected, or failed, while we waited.
        if let Some(conn) = peer.live() {
            return Ok(conn);
        }
        if let Some(error) = peer.backing_off() {
            return Err(error);
        }
        if self.shutdown.is_fired() {
            return Err(TransportError::Shutdown);
        }
        match self.connect(peer).await {
            Ok(conn) => {
                peer.failures.set(0);
                peer.retry_at.set(None);
                *peer.last_error.borrow_mut() = None;
                *peer.conn.borrow_mut() = Some(conn.clone());
                self.connects.set(self.connects.get() + 1);
                Ok(conn)
            }
            Err(error) => {
                let failures = peer.failures.get().saturating_add(1);
                peer.failures.set(failures);
                let factor = 1u32 << (failures - 1).min(16);
                let backoff = (self.config.backoff_min * factor).min(self.config.backoff_max);
                peer.retry_at.set(Some(Instant::now() + backoff));
                *peer.last_error.borrow_mut() = Some(error.clone());
                Err(error)
            }
        }
    }

    async fn connect(self: &Rc<Self>, peer: &Rc<Peer>) -> Result<Rc<Conn>, TransportError> {
        let unreachable = |e: io::Error| TransportError::Unreachable {
            peer: peer.id,
            source: Arc::new(e),
        };
        let (to, limit) = (peer.addr.get(), self.config.connect_timeout);
        let stream = match self.config.local_ip {
            None => TcpStream::connect_timeout(to, limit)
                .await
                .map_err(|e| unreachable(e.into()))?,
            Some(ip) => connect_from(ip, to, limit).await.map_err(unreachable)?,
        };
        stream
            .set_nodelay(true)
            .map_err(|e| unreachable(e.into()))?;
        let stream = framed(stream);
        let hello = exchange_hello(
            &stream,
            self.node,
            self.cluster.get(),
            self.config.connect_timeout,
        );
        let (answered, theirs) = match hello.await {
            Ok(hello) => hello,
            Err(error) => return Err(read_error(peer.id, error)),
        };
        if answered != peer.id {
            return Err(TransportError::WrongNode {
                peer: peer.id,
                answered,
            });
        }
        if !self.cluster.accepts(theirs) {
            return Err(TransportError::WrongCluster {
                peer: peer.id,
                ours: self.cluster.get(),
                theirs,
            });
        }
        let conn = Rc::new(Conn {
            peer: peer.id,
            pending: RefCell::new(HashMap::new()),
            next_id: Cell::new(1),
            out: LocalQueue::with_capacity(self.config.max_in_flight),
            closed: Signal::new(),
        });
        let max_payload = self.config.max_payload_bytes;
        {
            let conn = conn.clone();
            let stream = stream.clone();
            glommio::spawn_local(async move {
                let error = loop {
                    let read = async { Some(read_frame(&stream, max_payload).await) };
                    let closed = async {
                        conn.closed.wait().await;
                        None
                    };
                    let frame = match future::or(read, closed).await {
                        None => return,
                        Some(Ok(frame)) => frame,
                        Some(Err(error)) => break read_error(conn.peer, error),
                    };
                    if let Err(error) = deliver(&conn, frame) {
                        break error;
                    }
                };
                conn.close(error);
            })
            .detach();
        }
        {
            let conn = conn.clone();
            glommio::spawn_local(async move {
                if write_frames(&stream, &conn.out, false).await.is_err() {
                    conn.close(TransportError::PeerClosed { peer: conn.peer });
                }
            })
            .detach();
        }
        Ok(conn)
    }
}

/// The error a client reports for a connection that failed to read.
fn read_error(peer: NodeId, error: ReadError) -> TransportError {
    {
        match error {
            ReadError::Closed => TransportError::PeerClosed { peer },
            ReadError::Io(e) if e.kind() == io::ErrorKind::TimedOut => {
                TransportError::Unreachable {
                    peer,
                    source: Arc::new(e),
                }
            }
            ReadError::Io(_) => TransportError::PeerClosed { peer },
            ReadError::Frame {
                error: FrameError::VersionUnsupported { version, .. },
                ..
            } => TransportError::VersionUnsupported { peer, version },
            ReadError::Frame {
                error: FrameError::TooLarge { len, max, .. },
                ..
            } => TransportError::TooLarge { peer, len, max },
            ReadError::Frame { error, .. } => TransportError::FrameCorrupt {
                peer,
                source: error,
            },
        }
    }
}

impl Client {
    async fn call(
        self: &Rc<Self>,
        peer_id: NodeId,
        request: Message,
    ) -> Result<Message, TransportError> {
        if self.shutdown.is_fired() {
            return Err(TransportError::Shutdown);
        }
        let peer = self
            .peers
            .borrow()
            .get(&peer_id)
            .cloned()
            .ok_or(TransportError::UnknownPeer { peer: peer_id })?;
        let max = self.config.max_payload_bytes;
        if request.payload.len() > max as usize {
            return Err(TransportError::TooLarge {
                peer: peer_id,
                len: request.payload.len() as u64,
                max,
            });
        }
        let limit = self.config.call_timeout;
        let started = Instant::now();
        let id_seen = Cell::new(0u64);
        let work = async {
            let _slot = peer.slots.acquire_permit(1).await.expect("never closed");
            let conn = self.connection(&peer).await?;
            let id = conn.next_id.get();
            conn.next_id.set(id + 1);
            id_seen.set(id);
            let waiter = Rc::new(Waiter {
                result: RefCell::new(None),
                done: event_listener::Event::new(),
            });
            conn.pending.borrow_mut().insert(id, waiter.clone());
            let _guard = PendingGuard { conn: &conn, id };
            let outgoing = Outgoing::new(FrameKind::Request, id, request).map_err(|_| {
                TransportError::TooLarge {
                    peer: peer_id,
                    len: u64::from(max) + 1,
                    max,
                }
            })?;
            conn.out.push(outgoing);
            waiter.wait().await
        };
        let timeout = async {
            glommio::timer::sleep(limit.saturating_sub(started.elapsed())).await;
            Err(TransportError::Timeout {
                peer: peer_id,
                request_id: id_seen.get(),
                after: limit,
            })
        };
        future::or(work, timeout).await
    }
}

/// Hands a frame read by a client connection to its caller.
fn deliver(conn: &Conn, frame: Frame) -> Result<(), TransportError> {
    let peer = conn.peer;
    let result = match frame.kind {
        FrameKind::Response => Ok(frame.message),
        FrameKind::Reject => Err(match RejectReason::from_code(frame.message.op) {
            Some(RejectReason::VersionUnsupported) => TransportError::VersionUnsupported {
                peer,
                version: frame::FRAME_VERSION,
            },
            Some(RejectReason::TooLarge) => TransportError::TooLarge {
                peer,
                len: 0,
                max: 0,
            },
            Some(RejectReason::Corrupt) | None => TransportError::RejectedCorrupt { peer },
        }),
        FrameKind::Hello | FrameKind::Request => {
            return Err(TransportError::FrameCorrupt {
                peer,
                source: FrameError::UnknownKind {
                    code: frame.kind.code(),
                },
            });
        }
    };
    // A response to a call that timed out finds no waiter and is dropped.
    let waiter = conn.pending.borrow_mut().remove(&frame.request_id);
    if let Some(waiter) = waiter {
        waiter.finish(result);
    }
    Ok(())
}

impl Transport for TcpTransport {
    fn local_node(&self) -> NodeId {
        self.client.node
    }

    async fn call(&self, peer: NodeId, request: Message) -> Result<Message, TransportError> {
        self.client.call(peer, request).await
    }
}

// ---------------------------------------------------------------------------------------------
// Server

/// Connections [`serve`] answers at once; further peers wait in the listen backlog.
pub const MAX_SERVER_CONNECTIONS: u64 = 1024;

/// What [`serve`] did, returned once it has shut down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeSummary {
    /// Connections accepted.
    pub connections: u64,
    /// Connections closed because of a bad frame or a protocol violation.
    pub refused: u64,
    /// Requests answered.
    pub requests: u64,
}

/// Why [`serve`] stopped before shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// `accept` failed with an error that retrying will not fix.
    #[error("transport accept on {addr:?} failed: {source}")]
    Accept {
        /// The listening address, if known.
        addr: Option<SocketAddr>,
        /// The error.
        source: io::Error,
    },
}

/// Connects to `to` from address `ip` (any port) within `limit`. glommio connects only from the
/// kernel's choice of address, so the socket is bound and connected (socket2) on a short-lived
/// thread of its own, then handed to glommio like one of its own (blocking mode, as glommio
/// makes them). Not glommio's `spawn_blocking`: its pool also runs the node's metadata calls,
/// which can block for seconds while a raft group elects a leader, and a connect queued
/// behind them missed every ping's deadline (a partition test saw a new owner find no replica).
pub(crate) async fn connect_from(
    ip: std::net::IpAddr,
    to: SocketAddr,
    limit: Duration,
) -> io::Result<TcpStream> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    type Slot = std::sync::Mutex<Option<io::Result<socket2::Socket>>>;
    let slot: Arc<Slot> = Arc::default();
    let done = Arc::new(event_listener::Event::new());
    {
        let (slot, done) = (slot.clone(), done.clone());
        std::thread::Builder::new()
            .name("cairn-connect".into())
            .spawn(move || {
                let connected = (|| {
                    let s = socket2::Socket::new(
                        socket2::Domain::for_address(to),
                        socket2::Type::STREAM,
                        Some(socket2::Protocol::TCP),
                    )?;
                    s.bind(&SocketAddr::new(ip, 0).into())?;
                    s.connect_timeout(&to.into(), limit)?;
                    Ok(s)
                })();
                if let Ok(mut slot) = slot.lock() {
                    *slot = Some(connected);
                }
                done.notify(usize::MAX);
            })?;
    }
    loop {
        let listener = done.listen();
        let taken = slot.lock().ok().and_then(|mut s| s.take());
        if let Some(connected) = taken {
            let fd = connected?.into_raw_fd();
            // SAFETY: `fd` is a connected TCP socket released by its only owner just above.
            return Ok(unsafe { TcpStream::from_raw_fd(fd) });
        }
        listener.await;
    }
}

/// Answers requests to node `node` arriving on `listener` with `handler` until `shutdown` is
/// triggered; then stops accepting, finishes the requests already being answered, closes every
/// connection and returns. A peer whose hello names another cluster than `cluster` gets this
/// node's hello (so it can tell why) and is refused.
pub async fn serve<H: Handler + 'static>(
    listener: TcpListener,
    node: NodeId,
    cluster: ClusterTag,
    handler: Rc<H>,
    config: TcpConfig,
    shutdown: Shutdown,
) -> Result<ServeSummary, ServeError> {
    config.check();
    let summary = Rc::new(Cell::new(ServeSummary::default()));
    let addr = listener.local_addr().ok();
    let counts = summary.clone();
    accept_connections(listener, MAX_SERVER_CONNECTIONS, &shutdown, |stream| {
        let (handler, shutdown, summary) = (handler.clone(), shutdown.clone(), counts.clone());
        let cluster = cluster.clone();
        async move {
            let (requests, refused) =
                serve_connection(stream, node, cluster, handler, config, shutdown).await;
            let mut s = summary.get();
            s.connections += 1;
            s.requests += requests;
            s.refused += u64::from(refused);
            summary.set(s);
        }
    })
    .await
    .map_err(|source| ServeError::Accept { addr, source })?;
    Ok(summary.get())
}

/// One incoming connection; returns the requests answered and whether it was refused.
async fn serve_connection<H: Handler + 'static>(
    stream: TcpStream,
    node: NodeId,
    cluster: ClusterTag,
    handler: Rc<H>,
    config: TcpConfig,
    shutdown: Shutdown,
) -> (u64, bool) {
    if stream.set_nodelay(true).is_err() {
        return (0, false);
    }
    let stream = framed(stream);
    let hello =
        async { Some(exchange_hello(&stream, node, cluster.get(), config.connect_timeout).await) };
    let stop = async {
        shutdown.wait().await;
        None
    };
    let from = match future::or(hello, stop).await {
        Some(Ok((from, theirs))) if cluster.accepts(theirs) => from,
        Some(Ok(_)) | Some(Err(ReadError::Frame { .. })) => return (0, true),
        _ => return (0, false),
    };
    let out = Rc::new(LocalQueue::with_capacity(config.max_in_flight));
    let broken = Signal::new();
    let writer = {
        let stream = stream.clone();
        let out = out.clone();
        let broken = broken.clone();
        glommio::spawn_local(async move {
            if write_frames(&stream, &out, true).await.is_err() {
                broken.fire();
            }
        })
    };
    let slots = Rc::new(Semaphore::new(config.max_in_flight as u64));
    let answered = Rc::new(Cell::new(0u64));
    let mut refused = false;
    loop {
        // Back-pressure: no more reading while every slot is busy.
        let slot = async { Some(slots.acquire_static_permit(1).await) };
        let stop = async {
            future::or(shutdown.wait(), broken.wait()).await;
            None
        };
        let Some(Ok(slot)) = future::or(slot, stop).await else {
            break;
        };
        let read = async { Some(read_frame(&stream, config.max_payload_bytes).await) };
        let stop = async {
            future::or(shutdown.wait(), broken.wait()).await;
            None
        };
        let frame = match future::or(read, stop).await {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(ReadError::Closed | ReadError::Io(_))) => break,
            Some(Err(ReadError::Frame { error, request_id })) => {
                refused = true;
                let reason = match error {
                    FrameError::VersionUnsupported { .. } => RejectReason::VersionUnsupported,
                    FrameError::TooLarge { .. } => RejectReason::TooLarge,
                    _ => RejectReason::Corrupt,
                };
                if let Some(id) = request_id
                    && let Ok(reject) = Outgoing::new(FrameKind::Reject, id, frame::reject(reason))
                {
                    out.push(reject);
                }
                break;
            }
        };
        if frame.kind != FrameKind::Request {
            refused = true;
            break;
        }
        let handler = handler.clone();
        let out = out.clone();
        let answered = answered.clone();
        glommio::spawn_local(async move {
            let response = handler.handle(from, frame.message).await;
            let id = frame.request_id;
            let outgoing = Outgoing::new(FrameKind::Response, id, response).or_else(|_| {
                Outgoing::new(FrameKind::Reject, id, frame::reject(RejectReason::TooLarge))
            });
            if let Ok(outgoing) = outgoing {
                out.push(outgoing);
            }
            answered.set(answered.get() + 1);
            drop(slot);
        })
        .detach();
    }
    // Answer what was accepted, then close.
    let _ = slots.acquire(config.max_in_flight as u64).await;
    out.close();
    writer.await;
    (answered.get(), refused)
}

#[cfg(test)]
mod tests;
