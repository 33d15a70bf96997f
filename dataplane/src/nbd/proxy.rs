//! Forwarding: a node asked for an export another node serves opens the export at that node
//! (the *upstream*) as an NBD client and relays the session, so a host reaches every vdisk
//! through any node (NBD has no redirect; iSCSI redirects instead).
//!
//! * The upstream is opened with `NBD_OPT_GO` requesting `NBD_INFO_BLOCK_SIZE`; the host gets
//!   the upstream's size, transmission flags and block sizes, so it obeys the owner's rules.
//! * Both sides speak simple replies only, so after the handshake the transmission phase is
//!   relayed byte for byte in both directions: every request, reply and error number is the
//!   owner's, and nothing is acknowledged by the forwarding node itself.
//! * A forwarding node first sends [`OPT_CAIRN_PROXIED`]: a Cairn node that receives it never
//!   forwards that session again (two nodes that briefly disagree about the owner during a
//!   failover would otherwise forward to each other without end); it refuses with the usual
//!   "served by another node" message. Other NBD servers answer it `NBD_REP_ERR_UNSUP`, which
//!   is ignored.
//! * When the owner dies or drops the session, the host's connection is closed; the host
//!   reconnects (to any node) and reaches the new owner.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

use super::io::SharedStream;
use super::proto::{self, ExportGeometry};
use super::server::Shutdown;

/// Option a forwarding node sends on its upstream connection before anything else (no data):
/// "this session is already forwarded, do not forward it again". ASCII `CAIR`.
pub const OPT_CAIRN_PROXIED: u32 = 0x4341_4952;

/// Time limit for opening the upstream session (connect and handshake).
pub const UPSTREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes relayed per socket read.
const RELAY_CHUNK: usize = 256 << 10;

/// Largest option reply the client side reads from an upstream.
const MAX_UPSTREAM_REPLY: u32 = 64 << 10;

/// Why the upstream session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The address does not parse as `host:port`.
    #[error("owner address {0:?} is not an IP address and port")]
    Address(String),
    /// Connecting or talking to the owner failed.
    #[error("owner {addr} is unreachable: {source}")]
    Io {
        /// The owner's NBD address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// The owner did not answer in time.
    #[error("owner {0} did not answer within {UPSTREAM_OPEN_TIMEOUT:?}")]
    Timeout(SocketAddr),
    /// The owner refused the export (its reply type and message are relayed to the host).
    #[error("owner {addr} refused: {message}")]
    Refused {
        /// The owner's NBD address.
        addr: SocketAddr,
        /// `NBD_REP_ERR_*`.
        reply: u32,
        /// Its message.
        message: String,
    },
    /// The owner broke the protocol.
    #[error("owner {addr} broke the NBD handshake: {what}")]
    Protocol {
        /// The owner's NBD address.
        addr: SocketAddr,
        /// What was wrong.
        what: String,
    },
}

impl UpstreamError {
    /// The option reply a host gets for this failure.
    pub fn reply(&self) -> u32 {
        match self {
            UpstreamError::Refused { reply, .. } => *reply,
            _ => proto::REP_ERR_UNKNOWN,
        }
    }
}

/// An export opened at its owner, in transmission phase.
pub(super) struct Upstream {
    pub(super) stream: SharedStream<TcpStream>,
    pub(super) flags: u16,
    pub(super) geometry: ExportGeometry,
}

/// What the upstream said about the export before `NBD_REP_ACK`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Announced {
    export: Option<(u64, u16)>,
    block_size: Option<(u32, u32, u32)>,
}

/// Parses one `NBD_REP_INFO` payload into `into`; unknown information types are ignored.
fn parse_info(data: &[u8], into: &mut Announced) -> Result<(), String> {
    let Some(kind) = data.get(..2) else {
        return Err(format!("NBD_REP_INFO of {} bytes", data.len()));
    };
    let be32 = |at: usize| u32::from_be_bytes(data[at..at + 4].try_into().expect("4 bytes"));
    match u16::from_be_bytes([kind[0], kind[1]]) {
        proto::INFO_EXPORT if data.len() == 12 => {
            let size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
            into.export = Some((size, u16::from_be_bytes([data[10], data[11]])));
        }
        proto::INFO_BLOCK_SIZE if data.len() == 14 => {
            into.block_size = Some((be32(2), be32(6), be32(10)));
        }
        proto::INFO_EXPORT | proto::INFO_BLOCK_SIZE => {
            return Err(format!("information reply of {} bytes", data.len()));
        }
        _ => {}
    }
    Ok(())
}

/// The option request bytes of `NBD_OPT_GO` for `name`, asking for the block sizes.
fn encode_go(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + name.len());
    let data_len = 4 + name.len() + 2 + 2;
    out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    out.extend_from_slice(&(data_len as u32).to_be_bytes());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
    out
}

fn encode_empty_option(option: u32) -> [u8; proto::OPTION_HEADER_LEN] {
    let mut out = [0u8; proto::OPTION_HEADER_LEN];
    out[..8].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
    out[8..12].copy_from_slice(&option.to_be_bytes());
    out
}

/// Opens `name` at the owner's NBD address `addr`, connecting from `local_ip` when given.
pub(super) async fn open(
    addr: &str,
    name: &str,
    local_ip: Option<IpAddr>,
) -> Result<Upstream, UpstreamError> {
    let to: SocketAddr = addr
        .parse()
        .map_err(|_| UpstreamError::Address(addr.to_owned()))?;
    let opening = async {
        let stream = match local_ip {
            Some(ip) => crate::transport::tcp::connect_from(ip, to, UPSTREAM_OPEN_TIMEOUT).await,
            None => TcpStream::connect_timeout(to, UPSTREAM_OPEN_TIMEOUT)
                .await
                .map_err(io::Error::from),
        }
        .map_err(|source| UpstreamError::Io { addr: to, source })?;
        stream.set_nodelay(true).map_err(|e| UpstreamError::Io {
            addr: to,
            source: e.into(),
        })?;
        let stream = SharedStream::new(stream);
        let (flags, geometry) = handshake(&stream, to, name).await?;
        Ok(Upstream {
            stream,
            flags,
            geometry,
        })
    };
    let timeout = async {
        glommio::timer::sleep(UPSTREAM_OPEN_TIMEOUT * 2).await;
        Err(UpstreamError::Timeout(to))
    };
    future::or(opening, timeout).await
}

/// The client side of fixed newstyle up to `NBD_REP_ACK` of `NBD_OPT_GO`.
async fn handshake(
    stream: &SharedStream<TcpStream>,
    addr: SocketAddr,
    name: &str,
) -> Result<(u16, ExportGeometry), UpstreamError> {
    let io = |source| UpstreamError::Io { addr, source };
    let broke = |what: String| UpstreamError::Protocol { addr, what };
    let mut greeting = [0u8; proto::GREETING_LEN];
    stream.read_exact(&mut greeting).await.map_err(io)?;
    let magic = u64::from_be_bytes(greeting[..8].try_into().expect("8 bytes"));
    let opt = u64::from_be_bytes(greeting[8..16].try_into().expect("8 bytes"));
    let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    if magic != proto::NBD_MAGIC || opt != proto::IHAVEOPT {
        return Err(broke("not a newstyle NBD greeting".into()));
    }
    if server_flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(broke("the server does not speak fixed newstyle".into()));
    }
    let mut client_flags = proto::CLIENT_FLAG_FIXED_NEWSTYLE;
    if server_flags & proto::FLAG_NO_ZEROES != 0 {
        client_flags |= proto::CLIENT_FLAG_NO_ZEROES;
    }
    let mut out = client_flags.to_be_bytes().to_vec();
    out.extend_from_slice(&encode_empty_option(OPT_CAIRN_PROXIED));
    out.extend_from_slice(&encode_go(name));
    stream.write_all(&out).await.map_err(io)?;

    // The marker's one reply: ACK from a Cairn node, ERR_UNSUP from anything else.
    let (option, reply, _) = read_reply(stream, addr).await?;
    if option != OPT_CAIRN_PROXIED
        || (reply != proto::REP_ACK && reply & proto::REP_FLAG_ERROR == 0)
    {
        return Err(broke(format!(
            "reply {reply:#x} to option {option} where the forwarding marker's was expected"
        )));
    }
    let mut announced = Announced::default();
    loop {
        let (option, reply, data) = read_reply(stream, addr).await?;
        if option != proto::OPT_GO {
            return Err(broke(format!("reply to option {option}, not NBD_OPT_GO")));
        }
        match reply {
            proto::REP_INFO => parse_info(&data, &mut announced).map_err(broke)?,
            proto::REP_ACK => break,
            r if r & proto::REP_FLAG_ERROR != 0 => {
                return Err(UpstreamError::Refused {
                    addr,
                    reply: r,
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            r => return Err(broke(format!("unexpected reply type {r:#x} to NBD_OPT_GO"))),
        }
    }
    let Some((size, flags)) = announced.export else {
        return Err(broke(
            "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into(),
        ));
    };
    // No NBD_INFO_BLOCK_SIZE: the spec's defaults (any alignment, 4 KiB preferred, 32 MiB).
    let (min, preferred, max) =
        announced
            .block_size
            .unwrap_or((1, 4096, proto::DEFAULT_MAX_PAYLOAD));
    let geometry = ExportGeometry::new(size, min, preferred, max)
        .map_err(|e| broke(format!("unusable block sizes: {e}")))?;
    Ok((flags, geometry))
}

/// Reads one option reply: (option, reply type, data).
async fn read_reply(
    stream: &SharedStream<TcpStream>,
    addr: SocketAddr,
) -> Result<(u32, u32, Vec<u8>), UpstreamError> {
    let mut header = [0u8; proto::OPTION_REPLY_HEADER_LEN];
    stream
        .read_exact(&mut header)
        .await
        .map_err(|source| UpstreamError::Io { addr, source })?;
    let magic = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let (option, reply, len) = (be32(8), be32(12), be32(16));
    if magic != proto::OPTION_REPLY_MAGIC {
        return Err(UpstreamError::Protocol {
            addr,
            what: format!("option reply magic {magic:#018x}"),
        });
    }
    if len > MAX_UPSTREAM_REPLY {
        return Err(UpstreamError::Protocol {
            addr,
            what: format!("option reply of {len} bytes"),
        });
    }
    let mut data = vec![0u8; len as usize];
    stream
        .read_exact(&mut data)
        .await
        .map_err(|source| UpstreamError::Io { addr, source })?;
    Ok((option, reply, data))
}

/// Relays the transmission phase between the host and the owner until either side closes or
/// the node shuts down. The host closing its side is passed on (the owner still answers what
/// it was sent); the owner closing ends the session.
pub(super) async fn relay<S>(
    host: &SharedStream<S>,
    upstream: Upstream,
    shutdown: &Shutdown,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let owner = &upstream.stream;
    let to_host = async {
        let mut buf = vec![0u8; RELAY_CHUNK];
        loop {
            let n = owner.read_some(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            host.write_all(&buf[..n]).await?;
            host.flush().await?;
        }
    };
    let to_owner = async {
        let mut buf = vec![0u8; RELAY_CHUNK];
        loop {
            let n = host.read_some(&mut buf).await?;
            if n == 0 {
                owner.close().await?;
                // Keep relaying the owner's last replies until it closes.
                return future::pending::<io::Result<()>>().await;
            }
            owner.write_all(&buf[..n]).await?;
        }
    };
    let stop = async {
        shutdown.wait().await;
        Ok(())
    };
    future::or(stop, future::or(to_host, to_owner)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_replies_are_parsed_and_checked() {
        let mut a = Announced::default();
        let mut export = vec![0, 0];
        export.extend_from_slice(&(4u64 << 30).to_be_bytes());
        export.extend_from_slice(&0x1234u16.to_be_bytes());
        parse_info(&export, &mut a).unwrap();
        assert_eq!(a.export, Some((4 << 30, 0x1234)));
        let mut bs = vec![0, 3];
        for v in [512u32, 4096, 1 << 25] {
            bs.extend_from_slice(&v.to_be_bytes());
        }
        parse_info(&bs, &mut a).unwrap();
        assert_eq!(a.block_size, Some((512, 4096, 1 << 25)));
        // Unknown types are ignored; short known ones and empty payloads are refused.
        parse_info(&[0, 9, 1, 2], &mut a).unwrap();
        assert!(parse_info(&export[..11], &mut a).is_err());
        assert!(parse_info(&[0], &mut a).is_err());
    }

    #[test]
    fn the_go_request_asks_for_block_sizes() {
        let go = encode_go("vd0");
        let header: [u8; 16] = go[..16].try_into().unwrap();
        let h = proto::parse_option_header(&header).unwrap();
        assert_eq!(h.option, proto::OPT_GO);
        let req = proto::parse_info_request(&go[16..]).unwrap();
        assert_eq!(req.name, "vd0");
        assert!(req.wants_block_size);
        assert_eq!(h.len as usize, go.len() - 16);
    }
}
