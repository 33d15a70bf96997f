//! Raft over gRPC: `cairn.v1.RaftService` (see `proto/cairn/v1/raft.proto`).
//!
//! One [`GrpcTransport`] per node keeps one tonic channel per peer address (HTTP/2, created
//! lazily, reconnecting by itself) and sends every group's messages on it, tagged with the
//! group id; [`RaftGrpcService`] on the receiving node hands them to its [`RaftRegistry`]. A
//! node hosting hundreds of metadata shards therefore holds one connection per peer, not one per
//! shard and peer.
//!
//! Message sizes: openraft sends snapshots in chunks of at most
//! `openraft::Config::snapshot_max_chunk_size` (3 MiB by default) and at most
//! `max_payload_entries` log entries per AppendEntries; both sides accept messages up to
//! [`MAX_MESSAGE_BYTES`], which covers a full batch of entries near [`crate::kv::MAX_VALUE_BYTES`]
//! only if the group's `max_payload_entries` is lowered accordingly (metadata values are small).
//!
//! Status codes map back onto [`TransportError`]: UNAVAILABLE (no connection) → unreachable,
//! NOT_FOUND → the peer does not host the group (also unreachable to openraft: it backs off),
//! INVALID_ARGUMENT / FAILED_PRECONDITION → refused, anything else (deadline, reset) → dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_proto::v1::raft_service_client::RaftServiceClient;
use cairn_proto::v1::raft_service_server::{RaftService, RaftServiceServer};
use cairn_proto::v1::{RaftRequest, RaftResponse};
use tonic::transport::{Channel, Endpoint};

use crate::network::{
    DispatchError, PAYLOAD_FORMAT, RaftRegistry, RaftTransport, RpcKind, TransportError,
};
use crate::{GroupId, NodeId};

/// Largest raft message either side accepts, bytes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// How long a connection attempt to a peer may take.
pub const CONNECT_TIMEOUT_MS: u64 = 1_000;
/// How long one raft RPC may take end to end (a snapshot chunk included).
pub const RPC_TIMEOUT_MS: u64 = 5_000;

/// The receiving end: `cairn.v1.RaftService` backed by a node's [`RaftRegistry`].
#[derive(Debug, Clone)]
pub struct RaftGrpcService {
    registry: RaftRegistry,
}

impl RaftGrpcService {
    /// Serves the groups in `registry`.
    pub fn new(registry: RaftRegistry) -> Self {
        Self { registry }
    }

    /// The tonic service to add to a server, with [`MAX_MESSAGE_BYTES`] limits.
    pub fn into_server(self) -> RaftServiceServer<Self> {
        RaftServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    async fn handle(
        &self,
        kind: RpcKind,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftResponse>, tonic::Status> {
        let req = request.into_inner();
        let payload = self
            .registry
            .dispatch(req.group_id, kind, req.payload_format, &req.payload)
            .await?;
        Ok(tonic::Response::new(RaftResponse {
            payload_format: PAYLOAD_FORMAT,
            payload,
        }))
    }
}

#[tonic::async_trait]
impl RaftService for RaftGrpcService {
    async fn append_entries(
        &self,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftResponse>, tonic::Status> {
        self.handle(RpcKind::AppendEntries, request).await
    }

    async fn vote(
        &self,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftResponse>, tonic::Status> {
        self.handle(RpcKind::Vote, request).await
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftResponse>, tonic::Status> {
        self.handle(RpcKind::InstallSnapshot, request).await
    }
}

/// The sending end: one lazily connected tonic channel per peer address, shared by every group.
#[derive(Debug, Clone, Default)]
pub struct GrpcTransport {
    clients: Arc<Mutex<HashMap<String, RaftServiceClient<Channel>>>>,
    local_address: Option<std::net::IpAddr>,
}

impl GrpcTransport {
    /// A transport with no connections yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A transport whose connections leave from `ip` (a node bound to its own loopback
    /// address, e.g. 127.0.0.2, can then be partitioned by address with iptables).
    pub fn with_local_address(ip: Option<std::net::IpAddr>) -> Self {
        Self {
            local_address: ip,
            ..Self::default()
        }
    }

    fn client(
        &self,
        from: NodeId,
        to: NodeId,
        addr: &str,
    ) -> Result<RaftServiceClient<Channel>, TransportError> {
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| TransportError::Unreachable { from, to })?;
        if let Some(client) = clients.get(addr) {
            return Ok(client.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|_| TransportError::Unreachable { from, to })?
            .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .timeout(Duration::from_millis(RPC_TIMEOUT_MS))
            .local_address(self.local_address)
            .tcp_nodelay(true);
        let client = RaftServiceClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        clients.insert(addr.to_string(), client.clone());
        Ok(client)
    }
}

impl RaftTransport for GrpcTransport {
    async fn call(
        &self,
        from: NodeId,
        to: NodeId,
        addr: &str,
        group_id: GroupId,
        kind: RpcKind,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, TransportError> {
        let mut client = self.client(from, to, addr)?;
        let request = RaftRequest {
            group_id,
            payload_format: PAYLOAD_FORMAT,
            payload,
        };
        let response = match kind {
            RpcKind::AppendEntries => client.append_entries(request).await,
            RpcKind::Vote => client.vote(request).await,
            RpcKind::InstallSnapshot => client.install_snapshot(request).await,
        };
        let response = response.map_err(|status| match status.code() {
            tonic::Code::Unavailable => TransportError::Unreachable { from, to },
            tonic::Code::NotFound => TransportError::UnknownGroup { to, group_id },
            tonic::Code::InvalidArgument => TransportError::Refused {
                to,
                problem: DispatchError::Undecodable { group_id, kind },
            },
            tonic::Code::FailedPrecondition => TransportError::Refused {
                to,
                problem: DispatchError::UnknownFormat {
                    found: PAYLOAD_FORMAT,
                },
            },
            _ => TransportError::Dropped { from, to },
        })?;
        let response = response.into_inner();
        if response.payload_format != PAYLOAD_FORMAT {
            return Err(TransportError::Refused {
                to,
                problem: DispatchError::UnknownFormat {
                    found: response.payload_format,
                },
            });
        }
        Ok(response.payload)
    }
}

/// Serves `registry`'s groups on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: RaftRegistry,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(RaftGrpcService::new(registry).into_server())
        .serve_with_incoming_shutdown(incoming_nodelay(listener), shutdown)
        .await
}

/// The connections `listener` accepts, with Nagle's algorithm off. tonic ignores its own
/// `tcp_nodelay` setting for connections it is handed (`serve_with_incoming*`); with Nagle on,
/// a small response waiting behind the peer's delayed ACK stalls about 40 ms (seen as the p99
/// of metadata commits).
pub fn incoming_nodelay(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}
