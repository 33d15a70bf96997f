//! The iSCSI listener, its configuration, the per-target shared state registry and the error
//! types.
//!
//! [`serve`] accepts connections and runs each as a task on the current executor (the core
//! that owns the exports); [`handle_connection`] runs one already-accepted socket. Shutdown is
//! the NBD frontend's [`Shutdown`], so a node stops both frontends with one trigger.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;

use glommio::net::{Preallocated, TcpListener, TcpStream};

use crate::nbd::accept_connections;

use super::login::ChapSecrets;
use super::pdu::PduError;
use super::scsi::LuShared;
use super::session;
use crate::nbd::Shutdown;
use crate::target::Exports;

/// Connections served at once by [`serve`]; further initiators wait in the listen backlog.
pub const MAX_CONNECTIONS: u64 = 1024;
/// Receive buffer of a connection. The reader takes a PDU as a 48-byte header and then its data
/// segment; unbuffered, that is two `recv` calls per PDU at least. With a buffer one `recv` brings
/// in every PDU the initiator has queued (32 4 KiB writes with immediate data are 130 KiB), and
/// the reader copies each out of it. Per connection, so [`MAX_CONNECTIONS`] of them at most.
pub const RX_BUFFER_BYTES: usize = 128 << 10;
/// The default target name prefix; a target is `<prefix>:<vdisk name>`.
pub const DEFAULT_TARGET_PREFIX: &str = "iqn.2026-11.io.cairn";

/// Frontend configuration.
#[derive(Debug, Clone)]
pub struct IscsiConfig {
    /// Target names are `<target_prefix>:<export name>`.
    pub target_prefix: String,
    /// `host:port` advertised in SendTargets' TargetAddress (IPv6 hosts in brackets).
    pub portal: String,
    /// Target Portal Group Tag.
    pub portal_group_tag: u16,
    /// CHAP secrets required per export name; exports not listed accept AuthMethod=None.
    pub chap: HashMap<String, ChapSecrets>,
    /// CHAP secrets required for discovery sessions (`None`: open discovery).
    pub discovery_chap: Option<ChapSecrets>,
    /// Write data a connection may hold or have solicited at once (writes beyond it wait for
    /// their R2Ts); one write alone is always let in.
    pub write_buffer_bytes: u64,
}

/// Default of [`IscsiConfig::write_buffer_bytes`]: two of the largest writes accepted.
pub const DEFAULT_WRITE_BUFFER_BYTES: u64 = 128 << 20;

impl IscsiConfig {
    /// A configuration advertising `portal`, with the default prefix, tag 1 and no CHAP.
    pub fn new(portal: impl Into<String>) -> IscsiConfig {
        IscsiConfig {
            target_prefix: DEFAULT_TARGET_PREFIX.to_owned(),
            portal: portal.into(),
            portal_group_tag: 1,
            chap: HashMap::new(),
            discovery_chap: None,
            write_buffer_bytes: DEFAULT_WRITE_BUFFER_BYTES,
        }
    }

    /// The iSCSI name of `export`.
    pub fn target_name(&self, export: &str) -> String {
        format!("{}:{export}", self.target_prefix)
    }

    /// The export named by the iSCSI name `iqn` (prefix compared case-insensitively, as iSCSI
    /// names are), if it has our prefix.
    pub fn export_of(&self, iqn: &str) -> Option<String> {
        let prefix_len = self.target_prefix.len();
        let prefix = iqn.get(..prefix_len)?;
        if !prefix.eq_ignore_ascii_case(&self.target_prefix) {
            return None;
        }
        let export = iqn[prefix_len..].strip_prefix(':')?;
        (!export.is_empty()).then(|| export.to_owned())
    }
}

/// Logical-unit state of every target served on this core, shared by its sessions.
#[derive(Default)]
pub struct Registry {
    units: RefCell<HashMap<String, Rc<LuShared>>>,
}

impl Registry {
    /// The shared state of `export`, created on first use.
    pub fn shared(&self, export: &str) -> Rc<LuShared> {
        self.units
            .borrow_mut()
            .entry(export.to_owned())
            .or_default()
            .clone()
    }
}

/// Why a connection ended abnormally (logout, a clean close and shutdown are `Ok`).
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The logical unit's saved reservation state could not be read.
    #[error("loading the persistent reservations: {0}")]
    Reservations(String),
    /// The socket failed or the initiator left mid-PDU.
    #[error("iSCSI socket error: {0}")]
    Io(#[source] io::Error),
    /// A header digest mismatch: the stream cannot be trusted (ERL 0 closes).
    #[error("iSCSI header digest mismatch")]
    HeaderDigest,
    /// A data digest mismatch (ERL 0 closes).
    #[error("iSCSI data digest mismatch")]
    DataDigest,
    /// A data segment over the negotiated limit.
    #[error("iSCSI data segment of {len} bytes, over the {limit}-byte limit")]
    DataTooLong {
        /// Declared length.
        len: u32,
        /// Limit.
        limit: u32,
    },
    /// A header that could not be parsed where no Reject is possible.
    #[error("iSCSI PDU: {0}")]
    Pdu(#[from] PduError),
    /// A protocol violation that ends the connection.
    #[error("iSCSI protocol error: {0}")]
    Protocol(&'static str),
}

/// Why [`serve`] stopped before shutdown.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// `accept` failed with an error that retrying will not fix.
    #[error("iSCSI accept on {addr:?} failed: {source}")]
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
    /// Connections that ended with a [`ConnError`].
    pub failed: u64,
}

/// Serves iSCSI on `listener` until `shutdown` is triggered, each connection a task on the
/// current executor; returns once every connection has finished.
pub async fn serve<E: Exports + 'static>(
    listener: TcpListener,
    exports: Rc<E>,
    config: Rc<IscsiConfig>,
    shutdown: Shutdown,
) -> Result<ServeSummary, ServeError> {
    let registry = Rc::new(Registry::default());
    let summary = Rc::new(Cell::new(ServeSummary::default()));
    let addr = listener.local_addr().ok();
    let counts = summary.clone();
    accept_connections(listener, MAX_CONNECTIONS, &shutdown, |stream| {
        let (exports, config, registry) = (exports.clone(), config.clone(), registry.clone());
        let (shutdown, summary) = (shutdown.clone(), counts.clone());
        async move {
            let result = handle_connection_with(stream, exports, config, registry, shutdown).await;
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

/// Runs one iSCSI connection (login, then the full feature phase) on an accepted socket, with
/// its own reservation registry (use [`serve`] to share reservations between connections).
pub async fn handle_connection<E: Exports + 'static>(
    stream: TcpStream,
    exports: Rc<E>,
    config: Rc<IscsiConfig>,
    shutdown: Shutdown,
) -> Result<(), ConnError> {
    handle_connection_with(stream, exports, config, Rc::default(), shutdown).await
}

/// [`handle_connection`] with a registry shared by the connections of one core.
pub async fn handle_connection_with<E: Exports + 'static>(
    stream: TcpStream,
    exports: Rc<E>,
    config: Rc<IscsiConfig>,
    registry: Rc<Registry>,
    shutdown: Shutdown,
) -> Result<(), ConnError> {
    stream
        .set_nodelay(true)
        .map_err(|e| ConnError::Io(e.into()))?;
    let stream = stream.buffered_with(Preallocated::new(RX_BUFFER_BYTES));
    session::run(stream, exports, config, registry, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_names_map_to_exports() {
        let c = IscsiConfig::new("127.0.0.1:3260");
        assert_eq!(c.target_name("vd0"), "iqn.2026-11.io.cairn:vd0");
        assert_eq!(
            c.export_of("iqn.2026-11.io.cairn:vd0").as_deref(),
            Some("vd0")
        );
        assert_eq!(
            c.export_of("IQN.2026-11.IO.CAIRN:vd0").as_deref(),
            Some("vd0")
        );
        assert_eq!(c.export_of("iqn.2026-11.io.cairn:"), None);
        assert_eq!(c.export_of("iqn.2026-11.io.cairnx:vd0"), None);
        assert_eq!(c.export_of("iqn"), None);
    }
}
