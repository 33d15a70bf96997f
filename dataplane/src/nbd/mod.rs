//! The NBD (Network Block Device) frontend: serves [`Exports`](crate::target::Exports) to NBD
//! clients (the Linux kernel's `nbd`, qemu, libnbd tools, fio's `nbd` engine).
//!
//! It speaks the fixed-newstyle protocol with simple replies only: `NBD_OPT_EXPORT_NAME`,
//! `ABORT`, `LIST`, `INFO` and `GO` in the handshake; `READ`, `WRITE`, `DISC`, `FLUSH`, `TRIM`
//! and `WRITE_ZEROES` (with `FUA` and `NO_HOLE`) in transmission, and advertises
//! `CAN_MULTI_CONN`. Structured replies, metadata contexts, TLS and fast-zero are not offered.
//!
//! Layout, from the wire inwards:
//! * [`proto`]: the wire format as pure functions (parsers, checks, encoders) — the only code
//!   that interprets client bytes, unit-tested and fuzzed (`fuzz/`).
//! * `handshake`: option haggling; ends with a chosen export or a closed session.
//! * `transmission`: a connection's reader, workers and writer, with per-connection
//!   back-pressure (request slots and a buffer byte budget) and reply batching.
//! * `server`: [`serve`] and [`handle_connection`], the error types and [`Shutdown`].
//! * `proxy`: a session for an export another node serves, forwarded to that node.
//!
//! Everything runs on the executor of the core that owns the exports: futures are not `Send`,
//! and a connection never crosses cores once its socket is handed over.

mod handshake;
pub(crate) mod io;
pub mod proto;
mod proxy;
mod server;
mod transmission;

pub use handshake::MAX_OPTION_DATA_BYTES;
pub use proxy::{OPT_CAIRN_PROXIED, UPSTREAM_OPEN_TIMEOUT, UpstreamError};
pub(crate) use server::accept_connections;
pub use server::{
    HandshakeError, MAX_CONNECTIONS, NbdError, ServeError, ServeSummary, Shutdown,
    TransmissionError, handle_connection, handle_connection_until, serve,
};
pub use transmission::{IN_FLIGHT_BYTES, MAX_IN_FLIGHT, RETAINED_BUFFER_BYTES};
