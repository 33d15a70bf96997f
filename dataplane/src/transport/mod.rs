//! Data-plane messages between nodes: the [`Transport`] trait and its backends.
//!
//! The replication protocol (oplog writes copied to RF-1 peers before the host is acknowledged)
//! is written against [`Transport`] and [`Handler`] alone, so the same code runs over TCP
//! ([`tcp`]), RDMA (`rdma`, behind the `rdma` cargo feature) or the seeded in-memory network of
//! the deterministic tests ([`sim`]).
//!
//! The shape is request/response: [`Transport::call`] sends a [`Message`] to a peer and waits
//! for the one message its [`Handler`] answers with. A message carries what replication
//! addresses — vdisk, epoch, sequence — plus an `op` code and payload bytes whose meaning
//! belongs to the protocol above; the transport checksums and frames them ([`frame`]) but never
//! looks inside. Failures are a small typed enum ([`TransportError`]), so a caller can tell a
//! peer that is down (try another replica) from one that sent garbage (close and report).
//!
//! Like blockstore's `BlockDevice`, the traits use `async fn` without `Send` bounds: each core
//! owns its own transport instance (its own connections to every peer), and nothing crosses
//! threads on the I/O path.

use std::sync::Arc;
use std::time::Duration;

#[cfg_attr(not(feature = "rdma"), allow(dead_code))] // used by the rdma backend
mod fdwatch;
pub mod frame;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod sim;
pub mod tcp;

pub use frame::FrameError;

/// A node of the cluster, as the control plane numbers them.
pub type NodeId = u64;

/// One message between nodes: a request or its response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// What the message asks or answers; defined by the protocol above the transport.
    pub op: u16,
    /// The vdisk it concerns.
    pub vdisk: u64,
    /// The vdisk ownership epoch the sender believes in (a stale owner is refused by epoch).
    pub epoch: u64,
    /// The sequence number within the vdisk's oplog.
    pub sequence: u64,
    /// The bytes (an oplog record, say); checksummed on the wire.
    pub payload: Vec<u8>,
}

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// No address is known for the peer.
    #[error("node {peer} is not known to the transport")]
    UnknownPeer {
        /// The peer.
        peer: NodeId,
    },
    /// The peer could not be reached (connect failed, or still backing off after a failure).
    #[error("node {peer} is unreachable: {source}")]
    Unreachable {
        /// The peer.
        peer: NodeId,
        /// Why.
        source: Arc<std::io::Error>,
    },
    /// No response within the call's time limit. The request may or may not have run.
    #[error("call {request_id} to node {peer} timed out after {after:?}")]
    Timeout {
        /// The peer.
        peer: NodeId,
        /// The request id.
        request_id: u64,
        /// The limit.
        after: Duration,
    },
    /// The peer sent a frame that failed its checks (crc mismatch, bad magic, bad field); the
    /// connection was closed.
    #[error("corrupt frame from node {peer}: {source}")]
    FrameCorrupt {
        /// The peer.
        peer: NodeId,
        /// What failed.
        source: FrameError,
    },
    /// The peer found a frame of ours corrupt and closed the connection.
    #[error("node {peer} rejected a frame of ours as corrupt")]
    RejectedCorrupt {
        /// The peer.
        peer: NodeId,
    },
    /// The peer speaks another frame version.
    #[error("node {peer} does not support frame version {version}")]
    VersionUnsupported {
        /// The peer.
        peer: NodeId,
        /// The version refused.
        version: u8,
    },
    /// The connection closed (peer restart, reset, shutdown) before the response arrived.
    #[error("node {peer} closed the connection")]
    PeerClosed {
        /// The peer.
        peer: NodeId,
    },
    /// The message is larger than the sender or the peer accepts.
    #[error("message of {len} bytes to node {peer} is over the {max}-byte limit")]
    TooLarge {
        /// The peer.
        peer: NodeId,
        /// Payload length.
        len: u64,
        /// Limit.
        max: u32,
    },
    /// The peer answered with a node id other than the one the address book gave.
    #[error("the address of node {peer} answered as node {answered}")]
    WrongNode {
        /// The peer called.
        peer: NodeId,
        /// The node that answered.
        answered: NodeId,
    },
    /// The peer belongs to another cluster (the address now leads to another cluster's node).
    #[error("node {peer} belongs to cluster {theirs:016x}, not to this node's {ours:016x}")]
    WrongCluster {
        /// The peer called.
        peer: NodeId,
        /// This node's cluster.
        ours: u64,
        /// The cluster the peer named.
        theirs: u64,
    },
    /// This transport was shut down.
    #[error("the transport is shut down")]
    Shutdown,
}

/// The cluster a node belongs to, as its transports tell peers in every hello and check theirs
/// against: connections between nodes of two clusters are refused, so that a stale address
/// (a node id and vdisk ids are small numbers, alike in every cluster) can never let one
/// cluster's owner change another cluster's copies. 0 while the node does not know its cluster
/// yet (it accepts, and is accepted by, any peer). Shared by a core's transport and server.
#[derive(Debug, Clone, Default)]
pub struct ClusterTag(std::rc::Rc<std::cell::Cell<u64>>);

impl ClusterTag {
    /// A tag naming cluster `id`.
    pub fn new(id: u64) -> ClusterTag {
        ClusterTag(std::rc::Rc::new(std::cell::Cell::new(id)))
    }

    /// Names cluster `id` from now on (new connections).
    pub fn set(&self, id: u64) {
        self.0.set(id);
    }

    /// The cluster named (0: not known yet).
    pub fn get(&self) -> u64 {
        self.0.get()
    }

    /// Whether a peer naming cluster `theirs` may talk to this node.
    pub fn accepts(&self, theirs: u64) -> bool {
        let ours = self.get();
        ours == 0 || theirs == 0 || ours == theirs
    }
}

/// Sends requests to peers and waits for their responses.
///
/// Implementations may run many calls at once (pipelined on one connection) and apply
/// back-pressure: when too many calls to one peer are in flight, `call` waits for a slot rather
/// than failing.
#[allow(async_fn_in_trait)] // thread-per-core: futures are deliberately !Send
pub trait Transport {
    /// This node.
    fn local_node(&self) -> NodeId;

    /// Sends `request` to `peer` and returns its handler's response.
    async fn call(&self, peer: NodeId, request: Message) -> Result<Message, TransportError>;
}

/// The server side: answers requests that peers send to this node.
///
/// Each request runs as its own task, so a slow one does not hold up the others; responses go
/// back in whatever order they finish.
#[allow(async_fn_in_trait)] // thread-per-core: futures are deliberately !Send
pub trait Handler {
    /// Answers `request` from node `from`.
    async fn handle(&self, from: NodeId, request: Message) -> Message;
}

/// A handler that answers every request with itself (tests, connectivity checks).
#[derive(Debug, Default, Clone, Copy)]
pub struct Echo;

impl Handler for Echo {
    async fn handle(&self, _from: NodeId, request: Message) -> Message {
        request
    }
}
