//! Raft messages between nodes: one byte-level transport trait, two implementations.
//!
//! openraft hands a group's network ([`GroupNetworkFactory`]) typed requests; this module
//! encodes them with postcard ([`PAYLOAD_FORMAT`]) and passes bytes to a [`RaftTransport`],
//! which carries them to the target node, where a [`RaftRegistry`] finds the group by its id,
//! decodes, calls the local [`openraft::Raft`] and encodes the result. Both transports move the
//! same bytes:
//!
//! * [`MemRouter`]: in-process, for deterministic tests. It can isolate a node (every message to
//!   or from it fails as unreachable), cut single directed links, and drop a seeded fraction of
//!   messages (a dropped message is a network error; openraft retries).
//! * `grpc::GrpcTransport`: tonic, one channel per peer address, every group multiplexed on
//!   it by `group_id` (`cairn.v1.RaftService`).
//!
//! Because the in-process router encodes exactly what goes on the wire, the tests exercise the
//! serialization of every message kind, including snapshot chunks.
//!
//! Error mapping to openraft: a transport that cannot reach the node gives
//! [`openraft::error::Unreachable`] (openraft backs off), a dropped or undecodable message gives
//! [`openraft::error::NetworkError`] (retried), and the remote raft's own refusal travels in the
//! payload and becomes [`openraft::error::RemoteError`].

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{GroupId, NodeId, TypeConfig};

/// Layout of raft payloads on the wire: 1 = postcard-encoded openraft 0.9 messages.
pub const PAYLOAD_FORMAT: u32 = 1;

/// Which raft RPC a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RpcKind {
    /// AppendEntries (also heartbeats).
    AppendEntries,
    /// RequestVote.
    Vote,
    /// One chunk of InstallSnapshot.
    InstallSnapshot,
}

/// Why a transport could not deliver a message or bring back its answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The target cannot be reached (down, partitioned away, no connection).
    #[error("node {to} unreachable from node {from}")]
    Unreachable {
        /// Sender.
        from: NodeId,
        /// Target.
        to: NodeId,
    },
    /// The message was lost on the way (fault injection or a broken stream).
    #[error("message from node {from} to node {to} dropped")]
    Dropped {
        /// Sender.
        from: NodeId,
        /// Target.
        to: NodeId,
    },
    /// The target does not host the group.
    #[error("node {to} does not host raft group {group_id}")]
    UnknownGroup {
        /// Target.
        to: NodeId,
        /// Group.
        group_id: GroupId,
    },
    /// The target refused the message's bytes.
    #[error("node {to} refused the message: {problem}")]
    Refused {
        /// Target.
        to: NodeId,
        /// What it said.
        problem: DispatchError,
    },
}

/// Carries encoded raft messages between nodes.
pub trait RaftTransport: Clone + Send + Sync + 'static {
    /// Delivers `payload` (a [`PAYLOAD_FORMAT`] request of `kind` for `group_id`) from node
    /// `from` to node `to` at `addr` and returns the encoded answer.
    fn call(
        &self,
        from: NodeId,
        to: NodeId,
        addr: &str,
        group_id: GroupId,
        kind: RpcKind,
        payload: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, TransportError>> + Send;
}

/// Why a node could not handle an incoming raft message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError {
    /// This node does not host the group.
    #[error("raft group {group_id} is not hosted here")]
    UnknownGroup {
        /// Group.
        group_id: GroupId,
    },
    /// The payload is in a format this build does not read.
    #[error("raft payload format {found}, this build reads {PAYLOAD_FORMAT}")]
    UnknownFormat {
        /// Format found.
        found: u32,
    },
    /// The payload did not decode as the request it claims to be.
    #[error("undecodable {kind:?} payload for raft group {group_id}")]
    Undecodable {
        /// Group.
        group_id: GroupId,
        /// Request kind.
        kind: RpcKind,
    },
}

impl From<DispatchError> for tonic::Status {
    fn from(e: DispatchError) -> Self {
        match e {
            DispatchError::UnknownGroup { .. } => tonic::Status::not_found(e.to_string()),
            DispatchError::UnknownFormat { .. } => {
                tonic::Status::failed_precondition(e.to_string())
            }
            DispatchError::Undecodable { .. } => tonic::Status::invalid_argument(e.to_string()),
        }
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // postcard into a Vec fails only for types serde cannot describe, none of which are sent.
    postcard::to_allocvec(value).unwrap_or_default()
}

/// The raft groups one node hosts, by group id: the receiving end of every transport.
#[derive(Clone, Default)]
pub struct RaftRegistry {
    groups: Arc<RwLock<HashMap<GroupId, Raft<TypeConfig>>>>,
}

impl std::fmt::Debug for RaftRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let groups: BTreeSet<GroupId> = self
            .groups
            .read()
            .map(|g| g.keys().copied().collect())
            .unwrap_or_default();
        f.debug_struct("RaftRegistry")
            .field("groups", &groups)
            .finish()
    }
}

impl RaftRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts routing messages for `group_id` to `raft` (replacing any previous one).
    pub fn insert(&self, group_id: GroupId, raft: Raft<TypeConfig>) {
        if let Ok(mut groups) = self.groups.write() {
            groups.insert(group_id, raft);
        }
    }

    /// Stops routing messages for `group_id`; later messages get [`DispatchError::UnknownGroup`].
    pub fn remove(&self, group_id: GroupId) -> Option<Raft<TypeConfig>> {
        self.groups.write().ok()?.remove(&group_id)
    }

    fn get(&self, group_id: GroupId) -> Result<Raft<TypeConfig>, DispatchError> {
        self.groups
            .read()
            .ok()
            .and_then(|g| g.get(&group_id).cloned())
            .ok_or(DispatchError::UnknownGroup { group_id })
    }

    /// Handles one encoded request for a hosted group and returns the encoded
    /// `Result<response, RaftError>` to send back.
    pub async fn dispatch(
        &self,
        group_id: GroupId,
        kind: RpcKind,
        payload_format: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, DispatchError> {
        if payload_format != PAYLOAD_FORMAT {
            return Err(DispatchError::UnknownFormat {
                found: payload_format,
            });
        }
        let raft = self.get(group_id)?;
        let undecodable = DispatchError::Undecodable { group_id, kind };
        Ok(match kind {
            RpcKind::AppendEntries => {
                let req: AppendEntriesRequest<TypeConfig> =
                    postcard::from_bytes(payload).map_err(|_| undecodable)?;
                encode(&raft.append_entries(req).await)
            }
            RpcKind::Vote => {
                let req: VoteRequest<NodeId> =
                    postcard::from_bytes(payload).map_err(|_| undecodable)?;
                encode(&raft.vote(req).await)
            }
            RpcKind::InstallSnapshot => {
                let req: InstallSnapshotRequest<TypeConfig> =
                    postcard::from_bytes(payload).map_err(|_| undecodable)?;
                encode(&raft.install_snapshot(req).await)
            }
        })
    }
}

/// openraft's network factory for one group on one node, over any [`RaftTransport`].
#[derive(Debug, Clone)]
pub struct GroupNetworkFactory<T> {
    node_id: NodeId,
    group_id: GroupId,
    transport: T,
}

impl<T: RaftTransport> GroupNetworkFactory<T> {
    /// The network of group `group_id` as seen from node `node_id`.
    pub fn new(node_id: NodeId, group_id: GroupId, transport: T) -> Self {
        Self {
            node_id,
            group_id,
            transport,
        }
    }
}

impl<T: RaftTransport> RaftNetworkFactory<TypeConfig> for GroupNetworkFactory<T> {
    type Network = GroupNetwork<T>;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        GroupNetwork {
            from: self.node_id,
            target,
            addr: node.addr.clone(),
            group_id: self.group_id,
            transport: self.transport.clone(),
        }
    }
}

/// The connection of one group from one node to one peer.
#[derive(Debug)]
pub struct GroupNetwork<T> {
    from: NodeId,
    target: NodeId,
    addr: String,
    group_id: GroupId,
    transport: T,
}

impl<T: RaftTransport> GroupNetwork<T> {
    async fn call<
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    >(
        &self,
        kind: RpcKind,
        req: &Req,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>> {
        let bytes = self
            .transport
            .call(
                self.from,
                self.target,
                &self.addr,
                self.group_id,
                kind,
                encode(req),
            )
            .await
            .map_err(|e| match e {
                TransportError::Unreachable { .. } | TransportError::UnknownGroup { .. } => {
                    RPCError::Unreachable(Unreachable::new(&e))
                }
                TransportError::Dropped { .. } | TransportError::Refused { .. } => {
                    RPCError::Network(NetworkError::new(&e))
                }
            })?;
        let result: Result<Resp, E> = postcard::from_bytes(&bytes).map_err(|_| {
            let e = TransportError::Refused {
                to: self.target,
                problem: DispatchError::Undecodable {
                    group_id: self.group_id,
                    kind,
                },
            };
            RPCError::Network(NetworkError::new(&e))
        })?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl<T: RaftTransport> RaftNetwork<TypeConfig> for GroupNetwork<T> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(RpcKind::AppendEntries, &rpc).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(RpcKind::InstallSnapshot, &rpc).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(RpcKind::Vote, &rpc).await
    }
}

/// Faults the in-process router injects.
#[derive(Debug, Default)]
struct Faults {
    /// Nodes cut off from everyone.
    isolated: BTreeSet<NodeId>,
    /// Directed links (from, to) that lose every message.
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Messages lost per million.
    loss_per_million: u32,
    /// xorshift64 state for the loss draws (seeded: same seed, same losses).
    rng: u64,
    /// Messages delivered and lost, for tests.
    delivered: u64,
    lost: u64,
}

/// In-process transport for deterministic tests: every node's [`RaftRegistry`] in one map, with
/// partitions and message loss (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct MemRouter {
    nodes: Arc<Mutex<HashMap<NodeId, RaftRegistry>>>,
    faults: Arc<Mutex<Faults>>,
}

impl MemRouter {
    /// A router with no nodes and no faults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Connects a node (its registry receives messages addressed to `node_id`).
    pub fn add_node(&self, node_id: NodeId, registry: RaftRegistry) {
        if let Ok(mut nodes) = self.nodes.lock() {
            nodes.insert(node_id, registry);
        }
    }

    /// Disconnects a node, as if its process died: messages to it are unreachable.
    pub fn remove_node(&self, node_id: NodeId) {
        if let Ok(mut nodes) = self.nodes.lock() {
            nodes.remove(&node_id);
        }
    }

    fn with_faults(&self, f: impl FnOnce(&mut Faults)) {
        if let Ok(mut faults) = self.faults.lock() {
            f(&mut faults);
        }
    }

    /// Cuts `node_id` off from every other node (both directions).
    pub fn isolate(&self, node_id: NodeId) {
        self.with_faults(|f| {
            f.isolated.insert(node_id);
        });
    }

    /// Undoes [`MemRouter::isolate`] for `node_id`.
    pub fn rejoin(&self, node_id: NodeId) {
        self.with_faults(|f| {
            f.isolated.remove(&node_id);
        });
    }

    /// Loses every message from `from` to `to` (one direction).
    pub fn cut_link(&self, from: NodeId, to: NodeId) {
        self.with_faults(|f| {
            f.cut.insert((from, to));
        });
    }

    /// Loses `per_million` of all messages, drawn from a generator seeded with `seed`.
    pub fn set_loss(&self, per_million: u32, seed: u64) {
        self.with_faults(|f| {
            f.loss_per_million = per_million.min(1_000_000);
            f.rng = seed | 1;
        });
    }

    /// Removes every partition, cut link and loss.
    pub fn heal(&self) {
        self.with_faults(|f| {
            f.isolated.clear();
            f.cut.clear();
            f.loss_per_million = 0;
        });
    }

    /// (delivered, lost) message counts so far.
    pub fn message_counts(&self) -> (u64, u64) {
        self.faults
            .lock()
            .map(|f| (f.delivered, f.lost))
            .unwrap_or_default()
    }

    /// Decides the fate of one message.
    fn admit(&self, from: NodeId, to: NodeId) -> Result<(), TransportError> {
        let Ok(mut f) = self.faults.lock() else {
            return Err(TransportError::Unreachable { from, to });
        };
        if f.isolated.contains(&from) || f.isolated.contains(&to) {
            f.lost += 1;
            return Err(TransportError::Unreachable { from, to });
        }
        if f.cut.contains(&(from, to)) {
            f.lost += 1;
            return Err(TransportError::Dropped { from, to });
        }
        if f.loss_per_million > 0 {
            let mut x = f.rng;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            f.rng = x;
            if (x % 1_000_000) < u64::from(f.loss_per_million) {
                f.lost += 1;
                return Err(TransportError::Dropped { from, to });
            }
        }
        f.delivered += 1;
        Ok(())
    }
}

impl RaftTransport for MemRouter {
    async fn call(
        &self,
        from: NodeId,
        to: NodeId,
        _addr: &str,
        group_id: GroupId,
        kind: RpcKind,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, TransportError> {
        self.admit(from, to)?;
        let registry = self
            .nodes
            .lock()
            .ok()
            .and_then(|n| n.get(&to).cloned())
            .ok_or(TransportError::Unreachable { from, to })?;
        let answer = registry
            .dispatch(group_id, kind, PAYLOAD_FORMAT, &payload)
            .await
            .map_err(|problem| match problem {
                DispatchError::UnknownGroup { group_id } => {
                    TransportError::UnknownGroup { to, group_id }
                }
                problem => TransportError::Refused { to, problem },
            })?;
        // The answer crosses the same (possibly partitioned-meanwhile) network.
        self.admit(to, from)?;
        Ok(answer)
    }
}
