//! The NBD listener and the per-connection entry point, with their error types.
//!
//! [`serve`] accepts connections and runs each as its own task on the current executor (the
//! core that owns the exports' vdisks); [`handle_connection`] runs one already-accepted socket,
//! so a node can accept on any core and hand the socket to the vdisk owner. Both are generic
//! over [`Exports`]; nothing here knows what a vdisk is.

use super::io::is_transient;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::{Preallocated, TcpListener, TcpStream};
use glommio::sync::Semaphore;

use super::handshake::{self, Entered};
use super::io::{SharedStream, Signal};
use super::proto::{GeometryError, HandshakeParseError, OptionDataError, RequestMagicError};
use super::proxy;
use super::transmission;
use crate::target::Exports;

/// Connections served at once by [`serve`]; further clients wait in the listen backlog.
pub const MAX_CONNECTIONS: u64 = 1024;
/// Receive buffer of a connection: one `recv` brings in every request the client has queued
/// (32 4 KiB writes are 132 KiB) instead of two per request (header, then data); the reader
/// copies each out of it, and reads of a buffer's size or more bypass it. Per connection.
pub const RX_BUFFER_BYTES: usize = 128 << 10;
/// Pause after an accept error caused by resource exhaustion (too many open files, no memory)
/// before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// A server-wide shutdown request, cloned into every connection.
///
/// Once triggered, [`serve`] stops accepting; connections in the handshake close, and
/// connections in transmission stop reading requests, answer the ones already accepted and
/// close (the spec's "wait for inflight requests to be serviced").
#[derive(Clone)]
pub struct Shutdown {
    signal: Signal,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    /// A shutdown that has not been triggered.
    pub fn new() -> Shutdown {
        Shutdown {
            signal: Signal::new(),
        }
    }

    /// Asks every holder to stop.
    pub fn trigger(&self) {
        self.signal.fire();
    }

    /// Whether [`Shutdown::trigger`] has been called.
    pub fn is_triggered(&self) -> bool {
        self.signal.is_fired()
    }

    /// Returns once [`Shutdown::trigger`] has been called.
    pub async fn wait(&self) {
        self.signal.wait().await
    }
}

/// Why option haggling ended the connection.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket failed or the client left mid-message.
    #[error("socket error during the NBD handshake: {0}")]
    Io(#[source] io::Error),
    /// The client sent bad flags or a bad option magic.
    #[error("NBD handshake: {0}")]
    Parse(#[from] HandshakeParseError),
    /// Option data over the limit; answered with `NBD_REP_ERR_TOO_BIG` where possible.
    #[error("NBD option {option} carries {len} bytes, over the {limit}-byte limit")]
    OptionTooLarge {
        /// Option number.
        option: u32,
        /// Declared data length.
        len: u32,
        /// Limit.
        limit: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` carried an unusable name.
    #[error("NBD_OPT_EXPORT_NAME: {0}")]
    ExportName(#[source] OptionDataError),
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist.
    #[error("NBD_OPT_EXPORT_NAME: no export named {name:?}")]
    UnknownExport {
        /// Requested name.
        name: String,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export whose block sizes must be negotiated with
    /// `NBD_OPT_GO`.
    #[error("NBD_OPT_EXPORT_NAME: export {name:?} requires block-size negotiation (NBD_OPT_GO)")]
    BlockSizeRequired {
        /// Requested name.
        name: String,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export another node serves, which could not be opened
    /// there.
    #[error("NBD_OPT_EXPORT_NAME: export {name:?} could not be forwarded: {source}")]
    Forward {
        /// Requested name.
        name: String,
        /// Why.
        source: super::proxy::UpstreamError,
    },
    /// The export's target reports block sizes NBD cannot advertise.
    #[error("NBD_OPT_EXPORT_NAME: export {name:?} has unusable block sizes: {source}")]
    Geometry {
        /// Export name.
        name: String,
        /// What is wrong.
        source: GeometryError,
    },
}

/// Why the transmission phase ended the connection.
#[derive(Debug, thiserror::Error)]
pub enum TransmissionError {
    /// The socket failed or the client left mid-request.
    #[error("socket error during NBD transmission: {0}")]
    Io(#[source] io::Error),
    /// A request header with a bad magic: the stream cannot be resynchronised.
    #[error("NBD transmission: {0}")]
    RequestMagic(#[from] RequestMagicError),
    /// A rejected WRITE whose payload is too long to read and drop.
    #[error(
        "NBD WRITE (handle {handle:#x}, offset {offset}) carries {len} bytes, over the \
         {limit}-byte limit"
    )]
    PayloadTooLarge {
        /// Request handle.
        handle: u64,
        /// Request offset.
        offset: u64,
        /// Payload length.
        len: u32,
        /// Longest payload the server drops in-stream.
        limit: u32,
    },
}

/// Why an NBD connection ended abnormally (a client `NBD_OPT_ABORT`, `NBD_CMD_DISC`, a close
/// between messages and server shutdown are all `Ok`).
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Setting up the socket failed.
    #[error("NBD connection setup: {0}")]
    Socket(#[source] io::Error),
    /// During option haggling.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// During transmission.
    #[error(transparent)]
    Transmission(#[from] TransmissionError),
}

/// Why [`serve`] stopped before shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// `accept` failed with an error that retrying will not fix.
    #[error("NBD accept on {addr:?} failed: {source}")]
    Accept {
        /// The listening address, if known.
        addr: Option<SocketAddr>,
        /// The error.
        source: io::Error,
    },
}

/// What [`serve`] did, returned once it has shut down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeSummary {
    /// Connections accepted.
    pub connections: u64,
    /// Connections that ended with an [`NbdError`].
    pub failed: u64,
}

/// Serves NBD on `listener` until `shutdown` is triggered, running each connection as a task
/// on the current executor; returns once every connection has finished.
///
/// Errors of single connections (a client sending garbage, a reset socket) end only that
/// connection and are counted in [`ServeSummary::failed`].
pub async fn serve<E: Exports + 'static>(
    listener: TcpListener,
    exports: Rc<E>,
    shutdown: Shutdown,
) -> Result<ServeSummary, ServeError> {
    let summary = Rc::new(std::cell::Cell::new(ServeSummary::default()));
    let addr = listener.local_addr().ok();
    let counts = summary.clone();
    accept_connections(listener, MAX_CONNECTIONS, &shutdown, |stream| {
        let (exports, shutdown, summary) = (exports.clone(), shutdown.clone(), counts.clone());
        async move {
            let result = handle_connection_until(stream, exports, shutdown).await;
            let mut counts = summary.get();
            counts.connections += 1;
            counts.failed += u64::from(result.is_err());
            summary.set(counts);
        }
    })
    .await
    .map_err(|source| ServeError::Accept { addr, source })?;
    Ok(summary.get())
}

/// Accepts connections on `listener` until `shutdown` is triggered, at most `max_connections`
/// at once, and runs `serve_one(stream)` for each as a task on the current executor: the accept
/// loop of every TCP server of the data plane (NBD, iSCSI, the peer transport). Accept errors
/// that say "not now" ([`is_transient`]) back off and retry; any other ends the loop. Either way
/// it then stops listening (new peers are refused rather than left waiting) and returns once
/// every connection task has finished.
pub(crate) async fn accept_connections<F, Fut>(
    listener: TcpListener,
    max_connections: u64,
    shutdown: &Shutdown,
    mut serve_one: F,
) -> io::Result<()>
where
    F: FnMut(TcpStream) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    let slots = Rc::new(Semaphore::new(max_connections));
    let result = loop {
        let slot = async { Some(slots.acquire_static_permit(1).await) };
        let stop = async {
            shutdown.wait().await;
            None
        };
        let Some(slot) = future::or(stop, slot).await else {
            break Ok(());
        };
        let slot = slot.expect("connection slots are never closed");
        let accept = async { Some(listener.accept().await) };
        let stop = async {
            shutdown.wait().await;
            None
        };
        let stream = match future::or(stop, accept).await {
            None => break Ok(()),
            Some(Ok(stream)) => stream,
            Some(Err(error)) => {
                let error = io::Error::from(error);
                if is_transient(&error) {
                    glommio::timer::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
                break Err(error);
            }
        };
        let connection = serve_one(stream);
        glommio::spawn_local(async move {
            connection.await;
            drop(slot);
        })
        .detach();
    };
    drop(listener);
    // Wait for every connection task to give its slot back.
    slots
        .acquire(max_connections)
        .await
        .expect("connection slots are never closed");
    result
}

/// Runs one NBD session (handshake, then transmission) on an accepted socket, on the current
/// executor, until the client disconnects.
pub async fn handle_connection<E: Exports + 'static>(
    stream: TcpStream,
    exports: Rc<E>,
) -> Result<(), NbdError> {
    handle_connection_until(stream, exports, Shutdown::new()).await
}

/// [`handle_connection`], ending early (after answering accepted requests) when `shutdown` is
/// triggered.
pub async fn handle_connection_until<E: Exports + 'static>(
    stream: TcpStream,
    exports: Rc<E>,
    shutdown: Shutdown,
) -> Result<(), NbdError> {
    // Replies are coalesced by the writer, so Nagle would only add latency.
    stream
        .set_nodelay(true)
        .map_err(|e| NbdError::Socket(e.into()))?;
    let stream = stream.buffered_with(Preallocated::new(RX_BUFFER_BYTES));
    serve_stream(stream, exports, shutdown).await
}

/// One NBD session over any byte stream.
pub(super) async fn serve_stream<E, S>(
    stream: S,
    exports: Rc<E>,
    shutdown: Shutdown,
) -> Result<(), NbdError>
where
    E: Exports + 'static,
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let stream = Rc::new(SharedStream::new(stream));
    let Some(chosen) = handshake::negotiate(&stream, &*exports, &shutdown).await? else {
        return Ok(());
    };
    drop(exports);
    match chosen {
        Entered::Local(chosen) => {
            transmission::run(stream, chosen.target, chosen.geometry, &shutdown).await?;
        }
        Entered::Forwarded(upstream) => proxy::relay(&stream, upstream, &shutdown)
            .await
            .map_err(TransmissionError::Io)?,
    }
    Ok(())
}
