//! Fixed-newstyle option haggling: greeting, client flags, then options until the client
//! picks an export (`NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`) or leaves (`NBD_OPT_ABORT`).
//!
//! Policy, where the spec leaves a choice:
//! * Every option is answered; unknown ones, `NBD_OPT_STRUCTURED_REPLY` (simple replies only)
//!   and `NBD_OPT_STARTTLS` get `NBD_REP_ERR_UNSUP`, malformed data `NBD_REP_ERR_INVALID`.
//! * Option data over [`MAX_OPTION_DATA_BYTES`] is not read: the server answers
//!   `NBD_REP_ERR_TOO_BIG` and closes (a well-formed option is at most ~4 KiB).
//! * An export whose block sizes a non-negotiating client could violate
//!   ([`ExportGeometry::requires_size_negotiation`]) is only entered through `NBD_OPT_GO` with an
//!   `NBD_INFO_BLOCK_SIZE` request; otherwise `GO` gets `NBD_REP_ERR_BLOCK_SIZE_REQD` (after the
//!   block-size information, to save a round trip) and `EXPORT_NAME` a hard disconnect.
//!   `NBD_INFO_BLOCK_SIZE` is sent on every `INFO`/`GO`, requested or not.
//! * During server shutdown a pending option read is abandoned and the connection closed.
//! * An export another node serves is forwarded there (`super::proxy`), unless this session is
//!   itself forwarded ([`OPT_CAIRN_PROXIED`]): then `INFO`/`GO` get `NBD_REP_ERR_UNKNOWN` naming
//!   the owner's NBD address.

use std::rc::Rc;

use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncWrite};

use super::io::SharedStream;
use super::proto::{self, ExportGeometry, InfoRequest, OptionDataError};
use super::proxy::{self, OPT_CAIRN_PROXIED, Upstream};
use super::server::{HandshakeError, Shutdown};
use crate::target::{BlockTarget, Exports};

/// Largest option data the server reads.
pub const MAX_OPTION_DATA_BYTES: u32 = 64 << 10;

/// The export a successful handshake entered.
pub(super) struct Chosen<T> {
    pub(super) target: Rc<T>,
    pub(super) geometry: ExportGeometry,
}

/// How a successful handshake ends.
pub(super) enum Entered<T> {
    /// An export served here.
    Local(Chosen<T>),
    /// An export another node serves, opened there: relay the session.
    Forwarded(Upstream),
}

/// The target's geometry, checked against the spec's rules.
pub(super) fn geometry_of<T: BlockTarget>(
    target: &T,
) -> Result<ExportGeometry, proto::GeometryError> {
    ExportGeometry::new(
        target.size_bytes(),
        target.min_block_bytes(),
        target.preferred_block_bytes(),
        target.max_request_bytes(),
    )
}

/// Reads into `buf` unless the server shuts down first; `Ok(false)` on shutdown.
async fn read_unless_shutdown<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &SharedStream<S>,
    buf: &mut [u8],
    shutdown: &Shutdown,
) -> Result<bool, HandshakeError> {
    let read = async { Some(stream.read_exact(buf).await) };
    let stop = async {
        shutdown.wait().await;
        None
    };
    match future::or(read, stop).await {
        Some(result) => result.map(|()| true).map_err(HandshakeError::Io),
        None => Ok(false),
    }
}

/// Runs the handshake; `Ok(None)` when the session ends without entering transmission
/// (`NBD_OPT_ABORT`, or server shutdown).
pub(super) async fn negotiate<E: Exports, S: AsyncRead + AsyncWrite + Unpin>(
    stream: &SharedStream<S>,
    exports: &E,
    shutdown: &Shutdown,
) -> Result<Option<Entered<E::Target>>, HandshakeError> {
    stream
        .write_all(&proto::encode_greeting())
        .await
        .map_err(HandshakeError::Io)?;
    let mut flags = [0u8; 4];
    if !read_unless_shutdown(stream, &mut flags, shutdown).await? {
        return Ok(None);
    }
    let client = proto::parse_client_flags(flags)?;

    let mut header = [0u8; proto::OPTION_HEADER_LEN];
    let mut data = Vec::new();
    let mut out = Vec::with_capacity(256);
    // Set by a forwarding node's marker: never forward this session again.
    let mut forwarded_here = false;
    loop {
        if !read_unless_shutdown(stream, &mut header, shutdown).await? {
            return Ok(None);
        }
        let header = proto::parse_option_header(&header)?;
        let option = header.option;
        if header.len > MAX_OPTION_DATA_BYTES {
            if option != proto::OPT_EXPORT_NAME {
                out.clear();
                proto::encode_option_reply(
                    &mut out,
                    option,
                    proto::REP_ERR_TOO_BIG,
                    "option data too large",
                );
                // Best effort: the connection is closed either way.
                let _ = stream.write_all(&out).await;
            }
            return Err(HandshakeError::OptionTooLarge {
                option,
                len: header.len,
                limit: MAX_OPTION_DATA_BYTES,
            });
        }
        data.resize(header.len as usize, 0);
        stream
            .read_exact(&mut data)
            .await
            .map_err(HandshakeError::Io)?;

        out.clear();
        if shutdown.is_triggered() {
            if option != proto::OPT_EXPORT_NAME {
                proto::encode_option_reply(
                    &mut out,
                    option,
                    proto::REP_ERR_SHUTDOWN,
                    "server shutting down",
                );
                let _ = stream.write_all(&out).await;
            }
            return Ok(None);
        }
        let step = match option {
            proto::OPT_EXPORT_NAME => {
                let name = proto::parse_export_name(&data).map_err(HandshakeError::ExportName)?;
                match forward_address(exports, name, forwarded_here) {
                    Some(addr) => {
                        let upstream = export_name_forwarded(exports, name, &addr).await?;
                        let g = upstream.geometry;
                        let no_zeroes = client.no_zeroes;
                        proto::encode_export_name_reply(
                            &mut out,
                            g.size_bytes,
                            upstream.flags,
                            no_zeroes,
                        );
                        Step::Forward(upstream)
                    }
                    None => Step::Enter(export_name(exports, name, client.no_zeroes, &mut out)?),
                }
            }
            OPT_CAIRN_PROXIED => {
                match proto::parse_empty(&data) {
                    Ok(()) => {
                        forwarded_here = true;
                        proto::encode_option_reply(&mut out, option, proto::REP_ACK, "");
                    }
                    Err(error) => invalid(&mut out, option, error),
                }
                Step::Continue
            }
            proto::OPT_ABORT => {
                // The spec asks for an ACK, and asks the server to cope with a client that
                // closes without reading it.
                proto::encode_option_reply(&mut out, option, proto::REP_ACK, "");
                let _ = stream.write_all(&out).await;
                return Ok(None);
            }
            proto::OPT_LIST => {
                list(exports, &data, &mut out);
                Step::Continue
            }
            proto::OPT_INFO | proto::OPT_GO => match proto::parse_info_request(&data) {
                Err(error) => {
                    invalid(&mut out, option, error);
                    Step::Continue
                }
                Ok(request) => match forward_address(exports, request.name, forwarded_here) {
                    Some(addr) => {
                        forward_info_or_go(exports, option, request, &addr, &mut out).await
                    }
                    None => info_or_go(exports, option, request, &mut out),
                },
            },
            proto::OPT_STRUCTURED_REPLY => {
                let message = "structured replies are not supported";
                proto::encode_option_reply(&mut out, option, proto::REP_ERR_UNSUP, message);
                Step::Continue
            }
            _ => {
                let message = "option not supported";
                proto::encode_option_reply(&mut out, option, proto::REP_ERR_UNSUP, message);
                Step::Continue
            }
        };
        stream.write_all(&out).await.map_err(HandshakeError::Io)?;
        match step {
            Step::Continue => {}
            Step::Enter(chosen) => return Ok(Some(Entered::Local(chosen))),
            Step::Forward(upstream) => return Ok(Some(Entered::Forwarded(upstream))),
        }
    }
}

enum Step<T> {
    Continue,
    Enter(Chosen<T>),
    Forward(Upstream),
}

/// The owner's NBD address if `name` is served by another node and this session may be
/// forwarded there.
fn forward_address<E: Exports>(exports: &E, name: &str, forwarded_here: bool) -> Option<String> {
    if forwarded_here || exports.get(name).is_some() {
        return None;
    }
    exports.nbd_address_of(name)
}

/// `NBD_OPT_EXPORT_NAME` of an export another node serves: opened there, or a hard disconnect.
async fn export_name_forwarded<E: Exports>(
    exports: &E,
    name: &str,
    addr: &str,
) -> Result<Upstream, HandshakeError> {
    let upstream = proxy::open(addr, name, exports.local_ip())
        .await
        .map_err(|source| HandshakeError::Forward {
            name: name.to_owned(),
            source,
        })?;
    if upstream.geometry.requires_size_negotiation() {
        return Err(HandshakeError::BlockSizeRequired {
            name: name.to_owned(),
        });
    }
    Ok(upstream)
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` of an export another node serves: the owner's information
/// (its size, flags and block sizes), then `NBD_REP_ACK` and, on `GO`, the forwarded session.
/// An owner that cannot be reached or refuses gives the host an error naming it.
async fn forward_info_or_go<E: Exports>(
    exports: &E,
    option: u32,
    request: InfoRequest<'_>,
    addr: &str,
    out: &mut Vec<u8>,
) -> Step<E::Target> {
    let name = request.name;
    let upstream = match proxy::open(addr, name, exports.local_ip()).await {
        Ok(upstream) => upstream,
        Err(error) => {
            let message = format!(
                "export {name:?} is served by another node (nbd://{addr}/{name}), which this \
                 node could not forward to: {error}"
            );
            proto::encode_option_reply(out, option, error.reply(), &message);
            return Step::Continue;
        }
    };
    let description = format!("Cairn vdisk {name}, served by nbd://{addr}");
    let (geometry, flags) = (upstream.geometry, upstream.flags);
    match encode_info(out, option, request, &geometry, flags, &description) {
        true => Step::Forward(upstream),
        false => Step::Continue,
    }
}

/// The information replies of `NBD_OPT_INFO`/`NBD_OPT_GO` for an export, then `NBD_REP_ACK`
/// or `NBD_REP_ERR_BLOCK_SIZE_REQD`; true when a `GO` was acknowledged (enter transmission).
fn encode_info(
    out: &mut Vec<u8>,
    option: u32,
    request: InfoRequest<'_>,
    geometry: &ExportGeometry,
    flags: u16,
    description: &str,
) -> bool {
    proto::encode_info_export(out, option, geometry.size_bytes, flags);
    proto::encode_info_block_size(out, option, geometry);
    if request.wants_name && !request.name.is_empty() {
        proto::encode_info_string(out, option, proto::INFO_NAME, request.name);
    }
    if request.wants_description && !description.is_empty() {
        proto::encode_info_string(out, option, proto::INFO_DESCRIPTION, description);
    }
    if option == proto::OPT_GO && !request.wants_block_size && geometry.requires_size_negotiation()
    {
        let message = "this export needs NBD_INFO_BLOCK_SIZE to be requested";
        proto::encode_option_reply(out, option, proto::REP_ERR_BLOCK_SIZE_REQD, message);
        return false;
    }
    proto::encode_option_reply(out, option, proto::REP_ACK, "");
    option == proto::OPT_GO
}

fn invalid(out: &mut Vec<u8>, option: u32, error: OptionDataError) {
    let message = error.to_string();
    proto::encode_option_reply(out, option, proto::REP_ERR_INVALID, &message);
}

/// `NBD_OPT_EXPORT_NAME`: no error reply exists, so every refusal is a hard disconnect.
fn export_name<E: Exports>(
    exports: &E,
    name: &str,
    no_zeroes: bool,
    out: &mut Vec<u8>,
) -> Result<Chosen<E::Target>, HandshakeError> {
    let target = exports
        .get(name)
        .ok_or_else(|| HandshakeError::UnknownExport {
            name: name.to_owned(),
        })?;
    let geometry = geometry_of(&*target).map_err(|source| HandshakeError::Geometry {
        name: name.to_owned(),
        source,
    })?;
    if geometry.requires_size_negotiation() {
        return Err(HandshakeError::BlockSizeRequired {
            name: name.to_owned(),
        });
    }
    proto::encode_export_name_reply(
        out,
        geometry.size_bytes,
        proto::SERVER_TRANSMISSION_FLAGS,
        no_zeroes,
    );
    Ok(Chosen { target, geometry })
}

/// `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export (with its description), then `NBD_REP_ACK`.
fn list<E: Exports>(exports: &E, data: &[u8], out: &mut Vec<u8>) {
    if let Err(error) = proto::parse_empty(data) {
        invalid(out, proto::OPT_LIST, error);
        return;
    }
    for export in exports.list() {
        proto::encode_rep_server(out, &export.name, &export.description);
    }
    proto::encode_option_reply(out, proto::OPT_LIST, proto::REP_ACK, "");
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`: the export's information, then `NBD_REP_ACK` (entering
/// transmission on `GO`) or an error.
fn info_or_go<E: Exports>(
    exports: &E,
    option: u32,
    request: InfoRequest<'_>,
    out: &mut Vec<u8>,
) -> Step<E::Target> {
    let Some(target) = exports.get(request.name) else {
        let message = match exports.nbd_address_of(request.name) {
            Some(addr) => format!(
                "export {:?} is served by another node: nbd://{addr}/{}",
                request.name, request.name
            ),
            None => format!("no export named {:?}", request.name),
        };
        proto::encode_option_reply(out, option, proto::REP_ERR_UNKNOWN, &message);
        return Step::Continue;
    };
    let geometry = match geometry_of(&*target) {
        Ok(geometry) => geometry,
        Err(error) => {
            let message = format!("export {:?} is unusable: {error}", request.name);
            proto::encode_option_reply(out, option, proto::REP_ERR_UNKNOWN, &message);
            return Step::Continue;
        }
    };
    let description = exports
        .list()
        .into_iter()
        .find(|e| e.name == request.name)
        .map(|e| e.description)
        .unwrap_or_default();
    match encode_info(
        out,
        option,
        request,
        &geometry,
        proto::SERVER_TRANSMISSION_FLAGS,
        &description,
    ) {
        true => Step::Enter(Chosen { target, geometry }),
        false => Step::Continue,
    }
}
