//! The cluster configuration as typed records in the config raft group (group 0).
//!
//! Records live under fixed key prefixes of the group's versioned map, postcard-encoded:
//!
//! ```text
//!  node/<node id, 20 digits>            NodeRecord
//!  disk/<node id, 20 digits>/<path>     DiskRecord (what the node reports, kept by the leader)
//!  container/<name>                     ContainerRecord
//!  vdisk/<container>/<name>             VdiskRecord
//!  shard/<group id, 20 digits>          ShardRecord (the shard directory, kept by the leader)
//!  counter/container_id, counter/vdisk_id   u64, the last id handed out
//! ```
//!
//! Names are the keys, so uniqueness is a compare-and-swap condition (`Expect::Absent`) of the
//! same batch that writes the record, never a separate check. Every mutation is
//! read → validate → one CAS batch; when a concurrent mutation makes the batch conflict, it is
//! re-read and re-validated (at most [`MAX_ATTEMPTS`] times), so the precise error reported is
//! the one true of the state the mutation finally met. Two invariants that span records rely
//! on this:
//!
//! * a vdisk's create rewrites its container record under `Expect::Version`, and a container's
//!   delete requires the container at the version where it saw no vdisks: one of the two
//!   conflicts, and its retry sees the other (no vdisk outlives its container);
//! * ids come from counters advanced under `Expect::Version` in the creating batch.
//!
//! Errors are [`ConfigError`], mapped to gRPC codes as `proto/cairn/v1/config.proto` states.
//! Calls must reach the group's leader (else [`GroupError::ForwardToLeader`]).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::NodeId;
use crate::group::{GroupError, RaftGroup, ReadConsistency};
use crate::kv::{Expect, KvError, KvOp};

/// How often a mutation is retried after losing a race to another one.
pub const MAX_ATTEMPTS: u32 = 5;
/// Longest container or vdisk name, bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Largest vdisk, bytes (2^63 - 1 rounded down to a sector).
pub const MAX_VDISK_BYTES: u64 = (i64::MAX as u64) & !511;

/// Kinds of records, for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A node.
    Node,
    /// A container.
    Container,
    /// A vdisk.
    Vdisk,
}

/// A node's membership record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Cluster-unique id (> 0).
    pub node_id: NodeId,
    /// Control-plane gRPC address.
    pub control_addr: String,
    /// Data-plane replication address.
    pub data_addr: String,
    /// Block (chassis) name for failure-domain placement.
    pub block: String,
    /// Rack name.
    pub rack: String,
}

/// Where a metadata shard lives: the nodes that host it and its leader, as the shard's leader
/// last reported them (the shard directory). A node that does not host a shard finds its
/// leader here; the config leader rewrites a record when a newer term or membership is seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// The shard's raft group.
    pub group_id: crate::GroupId,
    /// Its leader when reported.
    pub leader: NodeId,
    /// The leader's term.
    pub term: u64,
    /// Voting members.
    pub voters: Vec<NodeId>,
    /// Non-voting members (being caught up to take a voter's place).
    pub learners: Vec<NodeId>,
}

impl ShardRecord {
    /// Whether `node` holds a replica of the shard.
    pub fn hosts(&self, node: NodeId) -> bool {
        self.voters.contains(&node) || self.learners.contains(&node)
    }
}

/// A disk (device) of a node, with its tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// The node that owns it.
    pub node_id: NodeId,
    /// Its path on that node.
    pub path: String,
    /// nvme, ssd, hdd or mem.
    pub tier: String,
    /// Capacity, bytes.
    pub capacity_bytes: u64,
}

/// Compression policy of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    /// None.
    Off,
    /// LZ4 inline.
    Inline,
    /// LZ4HC by the curator after this many seconds.
    PostProcess {
        /// Delay, seconds.
        delay_secs: u64,
    },
}

/// Data settings of a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSettings {
    /// Copies of every write: 1 (no redundancy: single-node clusters), 2 or 3.
    pub replication_factor: u32,
    /// Erasure coding of cold data: (data strips, parity strips), `None`: off.
    pub erasure_code: Option<(u32, u32)>,
    /// Compression.
    pub compression: Compression,
    /// Fingerprint-based dedup.
    pub dedup: bool,
}

/// A container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// Cluster-unique id.
    pub container_id: u64,
    /// Cluster-unique name.
    pub name: String,
    /// Settings.
    pub settings: ContainerSettings,
}

/// A vdisk definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VdiskRecord {
    /// Cluster-unique id.
    pub vdisk_id: u64,
    /// Name, unique in its container.
    pub name: String,
    /// Its container's name.
    pub container: String,
    /// Size, bytes.
    pub size_bytes: u64,
}

/// A record with the config version that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored<T> {
    /// The record.
    pub record: T,
    /// The version of the config batch that wrote it (for `expected_version`).
    pub version: u64,
}

/// What is wrong with requested settings or sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SettingsProblem {
    /// Replication factor other than 1, 2 or 3.
    #[error("replication factor {0}, expected 1, 2 or 3")]
    ReplicationFactor(u32),
    /// Erasure code strips outside the supported shapes (k 2..=4, m 1..=2).
    #[error("erasure code {0}/{1}, expected 2..=4 data and 1..=2 parity strips")]
    ErasureCode(u32, u32),
    /// A vdisk size of 0, past the maximum, or not a multiple of 512.
    #[error("vdisk size {0} bytes: expected a multiple of 512 in 512..={MAX_VDISK_BYTES}")]
    VdiskSize(u64),
    /// A node id of 0.
    #[error("node id 0 is reserved")]
    NodeId,
}

/// A failed config operation.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A name that is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error("invalid {kind:?} name {name:?}")]
    InvalidName {
        /// Record kind.
        kind: RecordKind,
        /// The name.
        name: String,
    },
    /// Invalid settings or size.
    #[error("invalid request: {0}")]
    Invalid(SettingsProblem),
    /// A record of this name or id exists already.
    #[error("{kind:?} {name} already exists")]
    AlreadyExists {
        /// Record kind.
        kind: RecordKind,
        /// Its name or id.
        name: String,
    },
    /// No record of this name or id.
    #[error("{kind:?} {name} not found")]
    NotFound {
        /// Record kind.
        kind: RecordKind,
        /// Its name or id.
        name: String,
    },
    /// The container still holds vdisks.
    #[error("container {name} still holds {vdisks} vdisks")]
    ContainerNotEmpty {
        /// Container.
        name: String,
        /// How many.
        vdisks: usize,
    },
    /// A vdisk cannot shrink (data past the new end would be lost).
    #[error("vdisk {container}/{name} is {size_bytes} bytes; cannot shrink to {requested_bytes}")]
    Shrink {
        /// Container.
        container: String,
        /// Vdisk.
        name: String,
        /// Current size.
        size_bytes: u64,
        /// Requested size.
        requested_bytes: u64,
    },
    /// The record is not at the version the caller expected.
    #[error("{kind:?} {name} is at version {found}, caller expected {expected}")]
    VersionMismatch {
        /// Record kind.
        kind: RecordKind,
        /// Its name or id.
        name: String,
        /// What the caller expected.
        expected: u64,
        /// What it is.
        found: u64,
    },
    /// Concurrent mutations kept winning; try again.
    #[error("{kind:?} {name}: lost {MAX_ATTEMPTS} races to concurrent changes")]
    Contended {
        /// Record kind.
        kind: RecordKind,
        /// Its name or id.
        name: String,
    },
    /// A stored record did not decode.
    #[error("config record {key} does not decode")]
    CorruptRecord {
        /// Its key.
        key: String,
    },
    /// The config group failed (not the leader, no quorum, storage).
    #[error(transparent)]
    Group(#[from] GroupError),
}

impl From<ConfigError> for tonic::Status {
    fn from(e: ConfigError) -> Self {
        let msg = e.to_string();
        match e {
            ConfigError::InvalidName { .. } | ConfigError::Invalid(_) => {
                tonic::Status::invalid_argument(msg)
            }
            ConfigError::AlreadyExists { .. } => tonic::Status::already_exists(msg),
            ConfigError::NotFound { .. } => tonic::Status::not_found(msg),
            ConfigError::ContainerNotEmpty { .. } | ConfigError::Shrink { .. } => {
                tonic::Status::failed_precondition(msg)
            }
            ConfigError::VersionMismatch { .. } | ConfigError::Contended { .. } => {
                tonic::Status::aborted(msg)
            }
            ConfigError::CorruptRecord { .. } => tonic::Status::internal(msg),
            ConfigError::Group(g) => g.into(),
        }
    }
}

fn node_key(id: NodeId) -> Vec<u8> {
    format!("node/{id:020}").into_bytes()
}
/// Key prefix of the shard directory.
pub const SHARD_PREFIX: &[u8] = b"shard/";
fn shard_key(group: crate::GroupId) -> Vec<u8> {
    format!("shard/{group:020}").into_bytes()
}
fn disk_prefix(node: NodeId) -> Vec<u8> {
    format!("disk/{node:020}/").into_bytes()
}
fn container_key(name: &str) -> Vec<u8> {
    format!("container/{name}").into_bytes()
}
fn vdisk_prefix(container: &str) -> Vec<u8> {
    format!("vdisk/{container}/").into_bytes()
}
fn vdisk_key(container: &str, name: &str) -> Vec<u8> {
    format!("vdisk/{container}/{name}").into_bytes()
}
const CONTAINER_ID_KEY: &[u8] = b"counter/container_id";
/// Key of the last vdisk id handed out (a postcard `u64`).
pub const VDISK_ID_KEY: &[u8] = b"counter/vdisk_id";

fn check_name(kind: RecordKind, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::InvalidName {
            kind,
            name: name.to_string(),
        })
    }
}

fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Plain structs of strings and integers always encode.
    postcard::to_allocvec(record).unwrap_or_default()
}

/// Outcome of one attempt of a mutation.
enum Attempt<T> {
    Done(T),
    /// Lost a race (CAS conflict): read again.
    Retry,
}

/// Cluster configuration on the config raft group.
#[derive(Debug, Clone)]
pub struct ConfigStore {
    group: RaftGroup,
}

impl ConfigStore {
    /// The config store kept in `group` (normally group 0, 3 or 5 voters).
    pub fn new(group: RaftGroup) -> Self {
        Self { group }
    }

    /// The underlying raft group.
    pub fn group(&self) -> &RaftGroup {
        &self.group
    }

    async fn read<T: DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<Stored<T>>, ConfigError> {
        match self.group.get(key, ReadConsistency::Linearizable).await? {
            None => Ok(None),
            Some(v) => Ok(Some(Stored {
                record: postcard::from_bytes(&v.value).map_err(|_| ConfigError::CorruptRecord {
                    key: crate::kv::printable_key(key),
                })?,
                version: v.version,
            })),
        }
    }

    async fn list<T: DeserializeOwned>(
        &self,
        prefix: &[u8],
    ) -> Result<Vec<Stored<T>>, ConfigError> {
        self.group
            .scan(prefix, ReadConsistency::Linearizable)
            .await?
            .into_iter()
            .map(|(key, v)| {
                Ok(Stored {
                    record: postcard::from_bytes(&v.value).map_err(|_| {
                        ConfigError::CorruptRecord {
                            key: crate::kv::printable_key(&key),
                        }
                    })?,
                    version: v.version,
                })
            })
            .collect()
    }

    /// Applies a batch; a CAS conflict is a lost race (retry), anything else an error.
    async fn commit(&self, ops: Vec<KvOp>) -> Result<Attempt<u64>, ConfigError> {
        match self.group.apply(ops).await {
            Ok(v) => Ok(Attempt::Done(v)),
            Err(GroupError::Rejected {
                source: KvError::Conflict { .. },
                ..
            }) => Ok(Attempt::Retry),
            Err(e) => Err(e.into()),
        }
    }

    async fn retrying<T, F, Fut>(
        &self,
        kind: RecordKind,
        name: &str,
        mut attempt: F,
    ) -> Result<T, ConfigError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Attempt<T>, ConfigError>>,
    {
        for _ in 0..MAX_ATTEMPTS {
            if let Attempt::Done(t) = attempt().await? {
                return Ok(t);
            }
        }
        Err(ConfigError::Contended {
            kind,
            name: name.to_string(),
        })
    }

    fn expect_version(
        kind: RecordKind,
        name: &str,
        expected: u64,
        found: u64,
    ) -> Result<(), ConfigError> {
        if expected != 0 && expected != found {
            return Err(ConfigError::VersionMismatch {
                kind,
                name: name.to_string(),
                expected,
                found,
            });
        }
        Ok(())
    }

    /// Next id from a counter, and the op that advances it in the same batch.
    async fn next_id(&self, key: &[u8]) -> Result<(u64, KvOp), ConfigError> {
        let current: Option<Stored<u64>> = self.read(key).await?;
        let (last, expect) = match current {
            Some(s) => (s.record, Expect::Version(s.version)),
            None => (0, Expect::Absent),
        };
        let id = last + 1;
        Ok((
            id,
            KvOp::Put {
                key: key.to_vec(),
                value: encode(&id),
                expect,
            },
        ))
    }

    /// Adds a node; its id must be new.
    pub async fn add_node(&self, node: NodeRecord) -> Result<Stored<NodeRecord>, ConfigError> {
        if node.node_id == 0 {
            return Err(ConfigError::Invalid(SettingsProblem::NodeId));
        }
        let name = node.node_id.to_string();
        match self
            .group
            .apply(vec![KvOp::Put {
                key: node_key(node.node_id),
                value: encode(&node),
                expect: Expect::Absent,
            }])
            .await
        {
            Ok(version) => Ok(Stored {
                record: node,
                version,
            }),
            Err(GroupError::Rejected {
                source: KvError::Conflict { .. },
                ..
            }) => Err(ConfigError::AlreadyExists {
                kind: RecordKind::Node,
                name,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes a node (`expected_version` 0: unconditionally).
    pub async fn remove_node(
        &self,
        node_id: NodeId,
        expected_version: u64,
    ) -> Result<u64, ConfigError> {
        let name = node_id.to_string();
        self.retrying(RecordKind::Node, &name, || async {
            let Some(found) = self.read::<NodeRecord>(&node_key(node_id)).await? else {
                return Err(ConfigError::NotFound {
                    kind: RecordKind::Node,
                    name: name.clone(),
                });
            };
            Self::expect_version(RecordKind::Node, &name, expected_version, found.version)?;
            self.commit(vec![KvOp::Delete {
                key: node_key(node_id),
                expect: Expect::Version(found.version),
            }])
            .await
        })
        .await
    }

    /// Sets what a node reports of itself: its failure domain (block, rack) and data-plane
    /// address; `NotFound` for an unknown node. Returns the
    /// config version written (or the record's version when it already had that domain).
    pub async fn set_node_domain(
        &self,
        node_id: NodeId,
        block: &str,
        rack: &str,
        data_addr: &str,
    ) -> Result<u64, ConfigError> {
        let name = node_id.to_string();
        self.retrying(RecordKind::Node, &name, || async {
            let Some(found) = self.read::<NodeRecord>(&node_key(node_id)).await? else {
                return Err(ConfigError::NotFound {
                    kind: RecordKind::Node,
                    name: name.clone(),
                });
            };
            if found.record.block == block
                && found.record.rack == rack
                && found.record.data_addr == data_addr
            {
                return Ok(Attempt::Done(found.version));
            }
            let record = NodeRecord {
                block: block.to_string(),
                rack: rack.to_string(),
                data_addr: data_addr.to_string(),
                ..found.record
            };
            self.commit(vec![KvOp::Put {
                key: node_key(node_id),
                value: encode(&record),
                expect: Expect::Version(found.version),
            }])
            .await
        })
        .await
    }

    /// Records where a shard lives, unless the record holds a newer term already. Returns
    /// whether it wrote.
    pub async fn set_shard(&self, shard: &ShardRecord) -> Result<bool, ConfigError> {
        let name = format!("shard {}", shard.group_id);
        self.retrying(RecordKind::Node, &name, || async {
            let key = shard_key(shard.group_id);
            let found = self.read::<ShardRecord>(&key).await?;
            let expect = match &found {
                Some(f) if f.record == *shard || f.record.term > shard.term => {
                    return Ok(Attempt::Done(false));
                }
                Some(f) => Expect::Version(f.version),
                None => Expect::Absent,
            };
            let value = encode(shard);
            match self.commit(vec![KvOp::Put { key, value, expect }]).await? {
                Attempt::Done(_) => Ok(Attempt::Done(true)),
                Attempt::Retry => Ok(Attempt::Retry),
            }
        })
        .await
    }

    /// Makes node `node_id`'s disk records exactly `disks` (what the node reports about its
    /// devices): adds new ones, rewrites changed ones, deletes vanished ones, in one batch.
    /// Returns whether anything changed.
    pub async fn set_node_disks(
        &self,
        node_id: NodeId,
        disks: &[DiskRecord],
    ) -> Result<bool, ConfigError> {
        let name = node_id.to_string();
        self.retrying(RecordKind::Node, &name, || async {
            let prefix = disk_prefix(node_id);
            let current: Vec<(Vec<u8>, Stored<DiskRecord>)> = self
                .group
                .scan(&prefix, ReadConsistency::Linearizable)
                .await?
                .into_iter()
                .filter_map(|(k, v)| {
                    let record = postcard::from_bytes(&v.value).ok()?;
                    Some((
                        k,
                        Stored {
                            record,
                            version: v.version,
                        },
                    ))
                })
                .collect();
            let mut ops = Vec::new();
            for d in disks {
                let mut key = prefix.clone();
                key.extend_from_slice(d.path.as_bytes());
                match current.iter().find(|(k, _)| *k == key) {
                    Some((_, s)) if s.record == *d => {}
                    Some((_, s)) => ops.push(KvOp::Put {
                        key,
                        value: encode(d),
                        expect: Expect::Version(s.version),
                    }),
                    None => ops.push(KvOp::Put {
                        key,
                        value: encode(d),
                        expect: Expect::Absent,
                    }),
                }
            }
            for (key, s) in &current {
                if !disks.iter().any(|d| d.path == s.record.path) {
                    ops.push(KvOp::Delete {
                        key: key.clone(),
                        expect: Expect::Version(s.version),
                    });
                }
            }
            if ops.is_empty() {
                return Ok(Attempt::Done(false));
            }
            Ok(match self.commit(ops).await? {
                Attempt::Done(_) => Attempt::Done(true),
                Attempt::Retry => Attempt::Retry,
            })
        })
        .await
    }

    /// Every disk of every node, by node then path.
    pub async fn disks(&self) -> Result<Vec<Stored<DiskRecord>>, ConfigError> {
        self.list(b"disk/").await
    }

    /// Every node, by id.
    pub async fn nodes(&self) -> Result<Vec<Stored<NodeRecord>>, ConfigError> {
        self.list(b"node/").await
    }

    /// Creates a container with a new name.
    pub async fn create_container(
        &self,
        name: &str,
        settings: ContainerSettings,
    ) -> Result<Stored<ContainerRecord>, ConfigError> {
        check_name(RecordKind::Container, name)?;
        if !(1..=3).contains(&settings.replication_factor) {
            return Err(ConfigError::Invalid(SettingsProblem::ReplicationFactor(
                settings.replication_factor,
            )));
        }
        if let Some((k, m)) = settings.erasure_code
            && !((2..=4).contains(&k) && (1..=2).contains(&m))
        {
            return Err(ConfigError::Invalid(SettingsProblem::ErasureCode(k, m)));
        }
        self.retrying(RecordKind::Container, name, || async {
            if self
                .read::<ContainerRecord>(&container_key(name))
                .await?
                .is_some()
            {
                return Err(ConfigError::AlreadyExists {
                    kind: RecordKind::Container,
                    name: name.to_string(),
                });
            }
            let (container_id, counter) = self.next_id(CONTAINER_ID_KEY).await?;
            let record = ContainerRecord {
                container_id,
                name: name.to_string(),
                settings: settings.clone(),
            };
            let put = KvOp::Put {
                key: container_key(name),
                value: encode(&record),
                expect: Expect::Absent,
            };
            Ok(match self.commit(vec![counter, put]).await? {
                Attempt::Done(version) => Attempt::Done(Stored { record, version }),
                Attempt::Retry => Attempt::Retry,
            })
        })
        .await
    }

    /// Every container, by name.
    pub async fn containers(&self) -> Result<Vec<Stored<ContainerRecord>>, ConfigError> {
        self.list(b"container/").await
    }

    /// Deletes an empty container (`expected_version` 0: unconditionally).
    pub async fn delete_container(
        &self,
        name: &str,
        expected_version: u64,
    ) -> Result<u64, ConfigError> {
        check_name(RecordKind::Container, name)?;
        self.retrying(RecordKind::Container, name, || async {
            let Some(found) = self.read::<ContainerRecord>(&container_key(name)).await? else {
                return Err(ConfigError::NotFound {
                    kind: RecordKind::Container,
                    name: name.to_string(),
                });
            };
            Self::expect_version(RecordKind::Container, name, expected_version, found.version)?;
            let vdisks = self.vdisks(name).await?.len();
            if vdisks > 0 {
                return Err(ConfigError::ContainerNotEmpty {
                    name: name.to_string(),
                    vdisks,
                });
            }
            self.commit(vec![KvOp::Delete {
                key: container_key(name),
                expect: Expect::Version(found.version),
            }])
            .await
        })
        .await
    }

    /// Creates a vdisk in an existing container.
    pub async fn create_vdisk(
        &self,
        container: &str,
        name: &str,
        size_bytes: u64,
    ) -> Result<Stored<VdiskRecord>, ConfigError> {
        check_name(RecordKind::Container, container)?;
        check_name(RecordKind::Vdisk, name)?;
        check_size(size_bytes)?;
        let full = format!("{container}/{name}");
        self.retrying(RecordKind::Vdisk, &full, || async {
            let Some(parent) = self
                .read::<ContainerRecord>(&container_key(container))
                .await?
            else {
                return Err(ConfigError::NotFound {
                    kind: RecordKind::Container,
                    name: container.to_string(),
                });
            };
            if self
                .read::<VdiskRecord>(&vdisk_key(container, name))
                .await?
                .is_some()
            {
                return Err(ConfigError::AlreadyExists {
                    kind: RecordKind::Vdisk,
                    name: full.clone(),
                });
            }
            let (vdisk_id, counter) = self.next_id(VDISK_ID_KEY).await?;
            let record = VdiskRecord {
                vdisk_id,
                name: name.to_string(),
                container: container.to_string(),
                size_bytes,
            };
            let ops = vec![
                counter,
                // Rewriting the container under its version orders this create against a
                // concurrent delete of the container (see the module docs).
                KvOp::Put {
                    key: container_key(container),
                    value: encode(&parent.record),
                    expect: Expect::Version(parent.version),
                },
                KvOp::Put {
                    key: vdisk_key(container, name),
                    value: encode(&record),
                    expect: Expect::Absent,
                },
            ];
            Ok(match self.commit(ops).await? {
                Attempt::Done(version) => Attempt::Done(Stored { record, version }),
                Attempt::Retry => Attempt::Retry,
            })
        })
        .await
    }

    /// The vdisks of `container` (every container if empty), by container then name.
    pub async fn vdisks(&self, container: &str) -> Result<Vec<Stored<VdiskRecord>>, ConfigError> {
        if container.is_empty() {
            return self.list(b"vdisk/").await;
        }
        check_name(RecordKind::Container, container)?;
        self.list(&vdisk_prefix(container)).await
    }

    /// Grows a vdisk (`expected_version` 0: unconditionally).
    pub async fn resize_vdisk(
        &self,
        container: &str,
        name: &str,
        new_size_bytes: u64,
        expected_version: u64,
    ) -> Result<Stored<VdiskRecord>, ConfigError> {
        check_name(RecordKind::Container, container)?;
        check_name(RecordKind::Vdisk, name)?;
        check_size(new_size_bytes)?;
        let full = format!("{container}/{name}");
        self.retrying(RecordKind::Vdisk, &full, || async {
            let found = self.existing_vdisk(container, name).await?;
            Self::expect_version(RecordKind::Vdisk, &full, expected_version, found.version)?;
            if new_size_bytes < found.record.size_bytes {
                return Err(ConfigError::Shrink {
                    container: container.to_string(),
                    name: name.to_string(),
                    size_bytes: found.record.size_bytes,
                    requested_bytes: new_size_bytes,
                });
            }
            let record = VdiskRecord {
                size_bytes: new_size_bytes,
                ..found.record
            };
            let put = KvOp::Put {
                key: vdisk_key(container, name),
                value: encode(&record),
                expect: Expect::Version(found.version),
            };
            Ok(match self.commit(vec![put]).await? {
                Attempt::Done(version) => Attempt::Done(Stored { record, version }),
                Attempt::Retry => Attempt::Retry,
            })
        })
        .await
    }

    /// Deletes a vdisk definition (`expected_version` 0: unconditionally).
    pub async fn delete_vdisk(
        &self,
        container: &str,
        name: &str,
        expected_version: u64,
    ) -> Result<u64, ConfigError> {
        check_name(RecordKind::Container, container)?;
        check_name(RecordKind::Vdisk, name)?;
        let full = format!("{container}/{name}");
        self.retrying(RecordKind::Vdisk, &full, || async {
            let found = self.existing_vdisk(container, name).await?;
            Self::expect_version(RecordKind::Vdisk, &full, expected_version, found.version)?;
            self.commit(vec![KvOp::Delete {
                key: vdisk_key(container, name),
                expect: Expect::Version(found.version),
            }])
            .await
        })
        .await
    }

    async fn existing_vdisk(
        &self,
        container: &str,
        name: &str,
    ) -> Result<Stored<VdiskRecord>, ConfigError> {
        self.read(&vdisk_key(container, name))
            .await?
            .ok_or_else(|| ConfigError::NotFound {
                kind: RecordKind::Vdisk,
                name: format!("{container}/{name}"),
            })
    }
}

fn check_size(size_bytes: u64) -> Result<(), ConfigError> {
    if size_bytes == 0 || size_bytes > MAX_VDISK_BYTES || !size_bytes.is_multiple_of(512) {
        return Err(ConfigError::Invalid(SettingsProblem::VdiskSize(size_bytes)));
    }
    Ok(())
}
