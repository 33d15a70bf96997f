//! One raft group on one node: openraft driving the redb storage of [`crate::storage`] over a
//! [`RaftTransport`], with the client-facing calls of a versioned key-value store.
//!
//! Every replicated thing in the control plane is a [`RaftGroup`]: the config group (id 0) and
//! each metadata shard. A group is generic over how messages travel, not over what it stores:
//! typed stores (config records, metadata) encode onto its keys and CAS batches.
//!
//! Writes go to the leader: [`RaftGroup::apply`] on a follower answers
//! [`GroupError::ForwardToLeader`] with the leader it knows, and a leader that lost its quorum
//! cannot commit, so the call ends with [`GroupError::Timeout`] after
//! [`GroupOptions::write_timeout`] (the batch may still commit later if the leader regains its
//! quorum: callers retry with CAS conditions, which makes a retry safe). Reads are either
//! [`ReadConsistency::Linearizable`] (the leader confirms it still leads and waits until its
//! state machine has applied everything committed before the read) or
//! [`ReadConsistency::Local`] (this replica's state, possibly stale; no network).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Raft, RaftMetrics};

use crate::kv::{KvBatch, KvError, KvOp, KvResponse, Versioned, validate_batch};
use crate::network::{GroupNetworkFactory, RaftTransport};
use crate::storage::{self, KvReader, RedbLogStore, StoreError};
use crate::{GroupId, NodeId, TypeConfig};

/// Leader heartbeat period in production, ms (a few per election timeout).
pub const HEARTBEAT_INTERVAL_MS: u64 = 250;
/// Shortest election timeout in production, ms (a follower that heard nothing this long may
/// start an election; randomized up to [`ELECTION_TIMEOUT_MAX_MS`]).
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 1_500;
/// Longest election timeout in production, ms.
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 3_000;
/// Log entries applied since the last snapshot that trigger a new one.
pub const SNAPSHOT_EVERY_LOGS: u64 = 10_000;
/// Log entries kept behind the last snapshot, so that briefly lagging followers catch up from
/// the log instead of a whole snapshot.
pub const LOGS_KEPT_AFTER_SNAPSHOT: u64 = 1_000;
/// How long a client write waits for commit before giving up, ms.
pub const WRITE_TIMEOUT_MS: u64 = 5_000;

/// How a group is set up on this node.
#[derive(Debug, Clone)]
pub struct GroupOptions {
    /// This node's id in the group (> 0).
    pub node_id: NodeId,
    /// The group's id (0: config group).
    pub group_id: GroupId,
    /// openraft settings (timeouts, snapshot policy).
    pub raft: openraft::Config,
    /// How long [`RaftGroup::apply`] waits for its batch to commit.
    pub write_timeout: Duration,
}

impl GroupOptions {
    /// Production settings (the constants of this module).
    pub fn new(node_id: NodeId, group_id: GroupId) -> Self {
        Self {
            node_id,
            group_id,
            raft: openraft::Config {
                cluster_name: format!("cairn-group-{group_id}"),
                heartbeat_interval: HEARTBEAT_INTERVAL_MS,
                election_timeout_min: ELECTION_TIMEOUT_MIN_MS,
                election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
                snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY_LOGS),
                max_in_snapshot_log_to_keep: LOGS_KEPT_AFTER_SNAPSHOT,
                ..Default::default()
            },
            write_timeout: Duration::from_millis(WRITE_TIMEOUT_MS),
        }
    }

    /// Fast settings for tests on a loaded machine: heartbeats every 50 ms, elections after
    /// 200-400 ms, writes give up after 1 s.
    pub fn for_tests(node_id: NodeId, group_id: GroupId) -> Self {
        let mut options = Self::new(node_id, group_id);
        options.raft.heartbeat_interval = 50;
        options.raft.election_timeout_min = 200;
        options.raft.election_timeout_max = 400;
        options.write_timeout = Duration::from_secs(1);
        options
    }
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadConsistency {
    /// Sees every write committed before the read started (leader only).
    Linearizable,
    /// This replica's applied state, possibly behind the leader.
    Local,
}

/// A failed call on a raft group.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// This node is not the leader; send the call to `leader_id` at `leader_addr` if known.
    #[error(
        "node {node_id} is not the leader of raft group {group_id} (leader: {leader_id:?} at {leader_addr:?})"
    )]
    ForwardToLeader {
        /// Group.
        group_id: GroupId,
        /// This node.
        node_id: NodeId,
        /// The leader this node knows of.
        leader_id: Option<NodeId>,
        /// Its address.
        leader_addr: Option<String>,
    },
    /// The batch was refused (CAS conflict or malformed); nothing of it was applied.
    #[error("raft group {group_id}: {source}")]
    Rejected {
        /// Group.
        group_id: GroupId,
        /// Why.
        #[source]
        source: KvError,
    },
    /// No answer in time (no quorum reachable); a write may still commit later.
    #[error("raft group {group_id}: {op} timed out after {timeout:?}")]
    Timeout {
        /// Group.
        group_id: GroupId,
        /// The call.
        op: &'static str,
        /// How long it waited.
        timeout: Duration,
    },
    /// The group is stopped or stopping on this node.
    #[error("raft group {group_id} on node {node_id} is shut down")]
    ShutDown {
        /// Group.
        group_id: GroupId,
        /// This node.
        node_id: NodeId,
    },
    /// The group was already initialized, or the initial membership is invalid.
    #[error("raft group {group_id}: cannot initialize: {reason}")]
    Initialize {
        /// Group.
        group_id: GroupId,
        /// openraft's reason.
        reason: String,
    },
    /// A membership change was refused (one already in progress, unknown node).
    #[error("raft group {group_id}: membership change refused: {reason}")]
    Membership {
        /// Group.
        group_id: GroupId,
        /// openraft's reason.
        reason: String,
    },
    /// The group's settings are invalid.
    #[error("raft group {group_id}: invalid settings: {source}")]
    Config {
        /// Group.
        group_id: GroupId,
        /// openraft's reason (boxed: it is large and rare).
        #[source]
        source: Box<openraft::ConfigError>,
    },
    /// The local storage failed.
    #[error("raft group {group_id}: {source}")]
    Storage {
        /// Group.
        group_id: GroupId,
        /// The storage error.
        #[source]
        source: StoreError,
    },
}

impl From<GroupError> for tonic::Status {
    fn from(e: GroupError) -> Self {
        let msg = e.to_string();
        match e {
            GroupError::ForwardToLeader { leader_addr, .. } => {
                let mut status = tonic::Status::unavailable(msg);
                if let Some(addr) = leader_addr
                    && let Ok(value) = addr.parse()
                {
                    status.metadata_mut().insert(LEADER_METADATA_KEY, value);
                }
                status
            }
            GroupError::Rejected {
                source: KvError::Conflict { .. },
                ..
            } => tonic::Status::aborted(msg),
            GroupError::Rejected {
                source: KvError::InvalidBatch(_),
                ..
            } => tonic::Status::invalid_argument(msg),
            GroupError::Timeout { .. } => tonic::Status::deadline_exceeded(msg),
            GroupError::ShutDown { .. } => tonic::Status::unavailable(msg),
            GroupError::Initialize { .. } | GroupError::Membership { .. } => {
                tonic::Status::failed_precondition(msg)
            }
            GroupError::Config { .. } | GroupError::Storage { .. } => tonic::Status::internal(msg),
        }
    }
}

/// gRPC metadata key naming the leader's address on an UNAVAILABLE "not the leader" status.
pub const LEADER_METADATA_KEY: &str = "cairn-leader-addr";

/// One raft group on this node.
#[derive(Clone)]
pub struct RaftGroup {
    options: Arc<GroupOptions>,
    raft: Raft<TypeConfig>,
    reader: KvReader,
    log: RedbLogStore,
}

impl std::fmt::Debug for RaftGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftGroup")
            .field("group_id", &self.options.group_id)
            .field("node_id", &self.options.node_id)
            .finish()
    }
}

impl RaftGroup {
    /// Opens (or creates) the group's storage in `dir` and starts its raft on the current tokio
    /// runtime. A new group does nothing until [`RaftGroup::initialize`] runs on one member or a
    /// leader adds it; a reopened one resumes from its log and state machine.
    pub async fn open<T: RaftTransport>(
        options: GroupOptions,
        dir: &Path,
        transport: T,
    ) -> Result<Self, GroupError> {
        let group_id = options.group_id;
        let config = options
            .raft
            .clone()
            .validate()
            .map_err(|source| GroupError::Config {
                group_id,
                source: Box::new(source),
            })?;
        let (log, sm) =
            storage::open(dir).map_err(|source| GroupError::Storage { group_id, source })?;
        let reader = sm.reader();
        let network = GroupNetworkFactory::new(options.node_id, group_id, transport);
        let raft = Raft::new(options.node_id, Arc::new(config), network, log.clone(), sm)
            .await
            .map_err(|_| GroupError::ShutDown {
                group_id,
                node_id: options.node_id,
            })?;
        Ok(Self {
            options: Arc::new(options),
            raft,
            reader,
            log,
        })
    }

    /// The group's id.
    pub fn group_id(&self) -> GroupId {
        self.options.group_id
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.options.node_id
    }

    /// The openraft handle (to register with a [`crate::RaftRegistry`], watch metrics, or
    /// trigger snapshots).
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// The latest metrics (state, leader, term, applied and purged log ids, snapshot).
    pub fn metrics(&self) -> RaftMetrics<NodeId, BasicNode> {
        self.raft.metrics().borrow().clone()
    }

    /// Forms a new group from `voters` (node id → address). Call on one member only, once.
    pub async fn initialize(&self, voters: BTreeMap<NodeId, String>) -> Result<(), GroupError> {
        let members: BTreeMap<NodeId, BasicNode> = voters
            .into_iter()
            .map(|(id, addr)| (id, BasicNode { addr }))
            .collect();
        self.raft.initialize(members).await.map_err(|e| match e {
            RaftError::APIError(InitializeError::NotAllowed(e)) => GroupError::Initialize {
                group_id: self.group_id(),
                reason: e.to_string(),
            },
            RaftError::APIError(InitializeError::NotInMembers(e)) => GroupError::Initialize {
                group_id: self.group_id(),
                reason: e.to_string(),
            },
            RaftError::Fatal(_) => self.shut_down(),
        })
    }

    /// Adds `node_id` as a learner (it receives the log but does not vote), waiting until it has
    /// caught up, then makes the voters exactly `voters`. Leader only.
    pub async fn change_voters(
        &self,
        learner: Option<(NodeId, String)>,
        voters: std::collections::BTreeSet<NodeId>,
    ) -> Result<(), GroupError> {
        if let Some((id, addr)) = learner {
            self.raft
                .add_learner(id, BasicNode { addr }, true)
                .await
                .map_err(|e| self.write_error(e))?;
        }
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| self.write_error(e))?;
        Ok(())
    }

    fn shut_down(&self) -> GroupError {
        GroupError::ShutDown {
            group_id: self.group_id(),
            node_id: self.node_id(),
        }
    }

    fn write_error(&self, e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> GroupError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                GroupError::ForwardToLeader {
                    group_id: self.group_id(),
                    node_id: self.node_id(),
                    leader_id: f.leader_id,
                    leader_addr: f.leader_node.map(|n| n.addr),
                }
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                GroupError::Membership {
                    group_id: self.group_id(),
                    reason: e.to_string(),
                }
            }
            RaftError::Fatal(_) => self.shut_down(),
        }
    }

    /// Applies `ops` atomically on a majority of the group, or none of them if a condition
    /// fails. Returns the version the batch was written at. Leader only.
    pub async fn apply(&self, ops: Vec<KvOp>) -> Result<u64, GroupError> {
        let group_id = self.group_id();
        validate_batch(&ops).map_err(|source| GroupError::Rejected { group_id, source })?;
        let timeout = self.options.write_timeout;
        let write = self.raft.client_write(KvBatch { ops });
        let response = tokio::time::timeout(timeout, write)
            .await
            .map_err(|_| GroupError::Timeout {
                group_id,
                op: "apply",
                timeout,
            })?
            .map_err(|e| self.write_error(e))?;
        match response.data {
            KvResponse::Applied { version } => Ok(version),
            KvResponse::Rejected(source) => Err(GroupError::Rejected { group_id, source }),
            // A normal entry always produces a batch outcome; anything else is a bug in storage.
            KvResponse::NoBatch => Err(GroupError::ShutDown {
                group_id,
                node_id: self.node_id(),
            }),
        }
    }

    async fn read_barrier(&self, consistency: ReadConsistency) -> Result<(), GroupError> {
        if consistency == ReadConsistency::Local {
            return Ok(());
        }
        let group_id = self.group_id();
        let timeout = self.options.write_timeout;
        tokio::time::timeout(timeout, self.raft.ensure_linearizable())
            .await
            .map_err(|_| GroupError::Timeout {
                group_id,
                op: "linearizable read",
                timeout,
            })?
            .map_err(|e| match e {
                RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => {
                    GroupError::ForwardToLeader {
                        group_id,
                        node_id: self.node_id(),
                        leader_id: f.leader_id,
                        leader_addr: f.leader_node.map(|n| n.addr),
                    }
                }
                RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)) => {
                    GroupError::Timeout {
                        group_id,
                        op: "linearizable read (no quorum)",
                        timeout,
                    }
                }
                RaftError::Fatal(_) => self.shut_down(),
            })?;
        Ok(())
    }

    /// The value of `key`.
    pub async fn get(
        &self,
        key: &[u8],
        consistency: ReadConsistency,
    ) -> Result<Option<Versioned>, GroupError> {
        self.read_barrier(consistency).await?;
        self.reader.get(key).map_err(|source| GroupError::Storage {
            group_id: self.group_id(),
            source,
        })
    }

    /// Every key starting with `prefix`, in key order.
    pub async fn scan(
        &self,
        prefix: &[u8],
        consistency: ReadConsistency,
    ) -> Result<Vec<(Vec<u8>, Versioned)>, GroupError> {
        self.read_barrier(consistency).await?;
        self.reader
            .scan(prefix)
            .map_err(|source| GroupError::Storage {
                group_id: self.group_id(),
                source,
            })
    }

    /// Version of the last batch applied on this replica (0: none).
    pub fn applied_version(&self) -> Result<u64, GroupError> {
        self.reader.version().map_err(|source| GroupError::Storage {
            group_id: self.group_id(),
            source,
        })
    }

    /// Log entries this replica still holds (after purges).
    pub fn log_entries_held(&self) -> Result<u64, GroupError> {
        self.log
            .entry_count()
            .map_err(|source| GroupError::Storage {
                group_id: self.group_id(),
                source,
            })
    }

    /// Builds a snapshot now and waits until it exists (openraft then purges the log behind it,
    /// keeping `max_in_snapshot_log_to_keep` entries).
    pub async fn snapshot_now(&self) -> Result<(), GroupError> {
        let applied = self.metrics().last_applied.map(|l| l.index).unwrap_or(0);
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|_| self.shut_down())?;
        let timeout = self.options.write_timeout;
        self.raft
            .wait(Some(timeout))
            .metrics(
                |m| m.snapshot.map(|s| s.index).unwrap_or(0) >= applied,
                "snapshot built",
            )
            .await
            .map_err(|_| GroupError::Timeout {
                group_id: self.group_id(),
                op: "snapshot",
                timeout,
            })?;
        Ok(())
    }

    /// Stops the group on this node (its storage closes when the last handle is dropped).
    pub async fn shutdown(&self) -> Result<(), GroupError> {
        self.raft.shutdown().await.map_err(|_| self.shut_down())
    }
}
