//! The control plane of one node: its raft groups, their gRPC services, and the tokio runtime
//! they run on.
//!
//! [`ControlPlane::start`] spawns a dedicated thread with a small multi-threaded tokio runtime
//! (the data plane runs on glommio executors and never enters tokio), opens the config group
//! (group 0) and [`ControlPlaneOptions::metadata_shards`] metadata shards (groups 1..=n) under
//! `data_dir/g<id>`, and serves every `cairn.v1` service on one address: RaftService,
//! ClusterService, NodeService, ContainerService, VdiskService and MetadataService.
//!
//! # Forming and growing a cluster
//!
//! * No peers, not joining: a single-node cluster. This node initializes every group with itself
//!   as the only voter (once; a restart resumes from the log).
//! * `peers` (node id → control address, this node included): the founding voters. The peer
//!   with the lowest id initializes every group with all of them; the others wait to be
//!   contacted. Start every founder with the same list.
//! * `join`: the node initializes nothing and waits for a `NodeService.AddNode` on the cluster.
//!
//! Membership follows the node records of the config store through a *reconciler* that runs on
//! every node, once a second and after every AddNode/RemoveNode, for the groups the node leads.
//! A group's voters are [`voter_target`] nodes (1 for 1-2 nodes, 3 from 3 nodes, 5 from 5
//! nodes at fault tolerance 2) placed by [`crate::placement`]; voter sets only ever change
//! whole (never to a transient 2 when growing 1 → 3), one change per group per pass.
//!
//! * The config group is hosted by every node: its voters, and every other recorded node as a
//!   learner (the configuration is small, and every node reads it locally).
//! * A metadata shard is hosted only by its voters, plus the nodes placement wants as voters
//!   that are not yet: those join as learners, catch up, are promoted, and the voter they
//!   replace is then removed from the group. So a shard lives on 3 nodes (5 at fault tolerance
//!   2), and adding or removing a node moves only the shards whose placement changes.
//! * The *shard directory* (`shard/<id>` records of the config store) says which nodes host
//!   each shard and which leads it: every node reports the groups it leads
//!   (`NodeInfo.led_groups`), and the config leader records the newest. A node asked about a
//!   shard it does not host forwards the call to the leader the directory names.
//!
//! # Leaders and forwarding
//!
//! Any node answers any call: a call that needs a group's leader (config writes, linearizable
//! config reads, metadata calls) is forwarded once to the leader the node knows of
//! ([`crate::status`]), so a client needs only one reachable endpoint.
//!
//! # Metadata routing
//!
//! Keys `v/<16 hex>/...` route by their vdisk prefix `v/<16 hex>/` ([`routing_prefix`]) on a
//! [`MetadataRing`] of the shards, so a data-plane batch (one vdisk's keys) stays in one shard;
//! a batch whose keys span shards is INVALID_ARGUMENT.
//!
//! # Vdisk sizes
//!
//! A vdisk's size is a multiple of [`VDISK_SIZE_ALIGNMENT_BYTES`] (1 MiB, the logical extent
//! size), so no extent is ever partly outside the disk.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_proto::v1 as pb;
use openraft::{BasicNode, ChangeMembers, ServerState};
use pb::cluster_service_server::{ClusterService, ClusterServiceServer};
use pb::container_service_client::ContainerServiceClient;
use pb::container_service_server::{ContainerService, ContainerServiceServer};
use pb::metadata_service_client::MetadataServiceClient;
use pb::metadata_service_server::{MetadataService, MetadataServiceServer};
use pb::node_service_client::NodeServiceClient;
use pb::node_service_server::{NodeService, NodeServiceServer};
use pb::vdisk_service_client::VdiskServiceClient;
use pb::vdisk_service_server::{VdiskService, VdiskServiceServer};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::config_store::{
    Compression, ConfigError, ContainerRecord, ContainerSettings, DiskRecord, NodeRecord,
    SHARD_PREFIX, ShardRecord, Stored, VdiskRecord,
};
use crate::grpc::{GrpcTransport, RaftGrpcService};
use crate::kv::{Expect, KvOp, Versioned};
use crate::placement::{NodePlace, ideal_voters, plan_voters};
use crate::status::{FORWARDED_KEY, RETRYABLE_KEY, ServeError, config_error, group_error};
use crate::{
    ConfigStore, GroupError, GroupId, GroupOptions, MetadataRing, NodeId, RaftGroup, RaftRegistry,
    ReadConsistency,
};

/// Default control-plane gRPC address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7100";
/// Default number of metadata shards (raft groups 1..=n) of a new cluster.
pub const DEFAULT_METADATA_SHARDS: u32 = 4;
/// Most metadata shards a node opens (each is a raft group with its own redb file).
pub const MAX_METADATA_SHARDS: u32 = 256;
/// The config group's id.
pub const CONFIG_GROUP: GroupId = 0;
/// Vdisk sizes are multiples of this, bytes (the logical extent size).
pub const VDISK_SIZE_ALIGNMENT_BYTES: u64 = 1 << 20;
/// How often the membership reconciler runs without being woken, ms.
pub const RECONCILE_INTERVAL_MS: u64 = 1_000;
/// A learner this many log entries behind the leader or fewer counts as caught up.
pub const CATCH_UP_SLACK_ENTRIES: u64 = 16;
/// How long a status probe of another node may take, ms.
pub const PROBE_TIMEOUT_MS: u64 = 700;
/// A node no probe has reached for this long is down: the groups it votes in give its seat to
/// a caught-up node, and take it back when it returns, ms.
pub const VOTER_DOWN_AFTER_MS: u64 = 10_000;
/// How long a forwarded call may take end to end, ms (above the groups' write timeout).
pub const FORWARD_TIMEOUT_MS: u64 = 10_000;
/// How long a shutdown waits for clients to close their connections, ms.
pub const SHUTDOWN_GRACE_MS: u64 = 1_000;
/// Config key of the [`ClusterRecord`].
pub const CLUSTER_KEY: &[u8] = b"cluster";
/// Config key marking that the founding members were recorded as nodes.
pub const FOUNDERS_KEY: &[u8] = b"founders";

/// How to start a node's control plane.
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// This node's id (> 0).
    pub node_id: NodeId,
    /// Where the raft groups keep their files (`<data_dir>/g<group id>`).
    pub data_dir: PathBuf,
    /// Address to serve gRPC on (port 0: any free port, see [`ControlPlaneHandle::local_addr`]).
    pub listen: SocketAddr,
    /// Address peers and clients reach this node at (default: the bound listen address).
    pub advertise: Option<String>,
    /// Founding voters (node id → control address, this node included); empty: single node.
    pub peers: BTreeMap<NodeId, String>,
    /// Initialize nothing: wait to be added by `NodeService.AddNode`.
    pub join: bool,
    /// Metadata shards (1..=[`MAX_METADATA_SHARDS`]); must be the same on every node.
    pub metadata_shards: u32,
    /// Tokio worker threads (1 or 2).
    pub worker_threads: usize,
    /// Devices this node reports (capacity by tier in cluster status); see
    /// [`ControlPlaneHandle::set_devices`].
    pub devices: Vec<pb::DeviceInfo>,
    /// This node's block (chassis), for failure-domain aware voter placement; empty: unknown.
    pub block: String,
    /// This node's rack; empty: unknown.
    pub rack: String,
    /// This node's data-plane replication address (host:port), reported to the cluster;
    /// empty: none.
    pub data_addr: String,
    /// Raft timing of every group (production constants of [`crate::group`] by default).
    pub group_options: fn(NodeId, GroupId) -> GroupOptions,
}

impl ControlPlaneOptions {
    /// Single-node defaults: listen on [`DEFAULT_LISTEN`], [`DEFAULT_METADATA_SHARDS`] shards,
    /// 2 worker threads, production raft timing.
    pub fn new(node_id: NodeId, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            node_id,
            data_dir: data_dir.into(),
            listen: DEFAULT_LISTEN.parse().unwrap_or_else(|_| {
                SocketAddr::from(([127, 0, 0, 1], 7100)) // unreachable: the constant parses
            }),
            advertise: None,
            peers: BTreeMap::new(),
            join: false,
            metadata_shards: DEFAULT_METADATA_SHARDS,
            worker_threads: 2,
            devices: Vec::new(),
            block: String::new(),
            rack: String::new(),
            data_addr: String::new(),
            group_options: GroupOptions::new,
        }
    }
}

/// Why the control plane did not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// The options contradict each other or are out of range.
    #[error("invalid control-plane options: {0}")]
    InvalidOptions(String),
    /// The runtime or its thread could not be created.
    #[error("cannot start the control-plane runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The gRPC address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A raft group could not be opened or initialized.
    #[error("raft group {group_id}: {source}")]
    Group {
        /// The group.
        group_id: GroupId,
        /// Why.
        #[source]
        source: GroupError,
    },
    /// The control-plane thread ended before reporting.
    #[error("the control-plane thread ended during start-up")]
    ThreadGone,
}

/// The cluster's identity, written once by `ClusterService.CreateCluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// Unique id chosen at creation.
    pub cluster_id: String,
    /// Operator's name.
    pub name: String,
    /// 1 or 2.
    pub fault_tolerance: u32,
}

/// The config as this node's replica last applied it (what [`ControlPlaneHandle::watch_config`]
/// publishes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigView {
    /// Version of the last config batch applied (increases with every change).
    pub version: u64,
    /// The cluster, once created.
    pub cluster: Option<ClusterRecord>,
    /// Nodes by id.
    pub nodes: Vec<Stored<NodeRecord>>,
    /// Containers by name.
    pub containers: Vec<Stored<ContainerRecord>>,
    /// Vdisks by container, then name.
    pub vdisks: Vec<Stored<VdiskRecord>>,
    /// Disks of every node with their tiers, by node then path.
    pub disks: Vec<Stored<DiskRecord>>,
    /// The shard directory: where each metadata shard lives and who leads it.
    pub shards: Vec<Stored<ShardRecord>>,
    /// The last vdisk id handed out, read before [`Self::vdisks`]: a vdisk id at or below it
    /// that is not among them belongs to a deleted vdisk.
    pub last_vdisk_id: u64,
}

/// Starts a node's control plane.
#[derive(Debug)]
pub struct ControlPlane;

impl ControlPlane {
    /// Opens the groups, initializes them as the options say, and serves gRPC, all on a new
    /// thread with its own tokio runtime. Returns once the address is bound and the groups are
    /// open (not necessarily once a leader is elected). Callable from any thread, including
    /// from inside another runtime.
    pub fn start(options: ControlPlaneOptions) -> Result<ControlPlaneHandle, ControlPlaneError> {
        validate(&options)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.worker_threads)
            .thread_name(format!("cairn-cp-{}", options.node_id))
            .enable_all()
            .build()
            .map_err(ControlPlaneError::Runtime)?;
        let runtime_handle = runtime.handle().clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("cairn-cp-main-{}", options.node_id))
            .spawn(move || {
                runtime.block_on(async move {
                    let started = Node::open(options).await;
                    let (node, listener, config_rx) = match started {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let local_addr = listener.local_addr().ok();
                    let _ = ready_tx.send(Ok((local_addr, config_rx, node.devices.clone())));
                    node.clone().spawn_background();
                    let (stopping_tx, stopping_rx) = watch::channel(false);
                    tokio::spawn(async move {
                        let _ = stop_rx.await;
                        let _ = stopping_tx.send(true);
                    });
                    let mut graceful = stopping_rx.clone();
                    let server = node.clone().serve(listener, async move {
                        let _ = graceful.wait_for(|s| *s).await;
                    });
                    // Graceful shutdown waits for clients to hang up; idle clients that keep
                    // their connection open get SHUTDOWN_GRACE_MS, then the server is dropped.
                    let mut forced = stopping_rx;
                    tokio::select! {
                        r = server => if let Err(e) = r {
                            eprintln!("cairn control plane: gRPC server stopped: {e}");
                        },
                        _ = async move {
                            let _ = forced.wait_for(|s| *s).await;
                            tokio::time::sleep(Duration::from_millis(SHUTDOWN_GRACE_MS)).await;
                        } => {}
                    }
                    node.shutdown().await;
                });
                // Background tasks (reconciler, watchers) end with the runtime.
                runtime.shutdown_timeout(Duration::from_secs(2));
            })
            .map_err(ControlPlaneError::Runtime)?;
        match ready_rx.recv() {
            Ok(Ok((local_addr, config_rx, devices))) => Ok(ControlPlaneHandle {
                local_addr: local_addr.ok_or(ControlPlaneError::ThreadGone)?,
                config_rx,
                devices,
                runtime: runtime_handle,
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(ControlPlaneError::ThreadGone)
            }
        }
    }
}

fn validate(o: &ControlPlaneOptions) -> Result<(), ControlPlaneError> {
    let bad = |m: String| Err(ControlPlaneError::InvalidOptions(m));
    if o.node_id == 0 {
        return bad("node id 0 is reserved".into());
    }
    if !(1..=MAX_METADATA_SHARDS).contains(&o.metadata_shards) {
        return bad(format!(
            "{} metadata shards, expected 1..={MAX_METADATA_SHARDS}",
            o.metadata_shards
        ));
    }
    if !(1..=2).contains(&o.worker_threads) {
        return bad(format!(
            "{} worker threads, expected 1 or 2",
            o.worker_threads
        ));
    }
    if !o.peers.is_empty() && !o.peers.contains_key(&o.node_id) {
        return bad(format!(
            "the peer list does not name this node ({})",
            o.node_id
        ));
    }
    if !o.peers.is_empty() && o.join {
        return bad("founding peers and --join exclude each other".into());
    }
    if o.peers.contains_key(&0) {
        return bad("node id 0 in the peer list is reserved".into());
    }
    Ok(())
}

/// A running control plane. Dropping it shuts it down.
#[derive(Debug)]
pub struct ControlPlaneHandle {
    local_addr: SocketAddr,
    config_rx: watch::Receiver<Arc<ConfigView>>,
    devices: Arc<Mutex<Vec<pb::DeviceInfo>>>,
    runtime: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlPlaneHandle {
    /// The bound gRPC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The config as this replica applies it; `changed()` wakes on every applied config batch.
    /// `borrow()` and `has_changed()` work from any thread without tokio (glommio can poll
    /// them).
    pub fn watch_config(&self) -> watch::Receiver<Arc<ConfigView>> {
        self.config_rx.clone()
    }

    /// The control plane's runtime, to run a [`crate::client::MetadataClient`] call on it from
    /// another executor: `handle.runtime().spawn(async move { client.get(&key).await })`
    /// returns a `JoinHandle` that any executor can await.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Replaces the devices this node reports in cluster status.
    pub fn set_devices(&self, devices: Vec<pb::DeviceInfo>) {
        if let Ok(mut d) = self.devices.lock() {
            *d = devices;
        }
    }

    /// Stops serving, shuts the raft groups down and joins the control-plane thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ControlPlaneHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Routing prefix of a metadata key: `v/<16 lowercase hex>/` for vdisk keys, else the key.
pub fn routing_prefix(key: &[u8]) -> &[u8] {
    vdisk_prefix_of(key).unwrap_or(key)
}

/// The vdisk prefix `v/<16 lowercase hex>/` a key starts with, if any.
pub fn vdisk_prefix_of(key: &[u8]) -> Option<&[u8]> {
    const LEN: usize = 19;
    let is_vdisk_key = key.len() >= LEN
        && key.starts_with(b"v/")
        && key[2..18]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        && key[18] == b'/';
    is_vdisk_key.then(|| &key[..LEN])
}

/// Voters a group should have with `nodes` recorded nodes at `fault_tolerance`.
pub fn voter_target(nodes: usize, fault_tolerance: u32) -> usize {
    if fault_tolerance >= 2 && nodes >= 5 {
        5
    } else if nodes >= 3 {
        3
    } else {
        1
    }
}

/// Everything one node's services share.
struct Node {
    node_id: NodeId,
    advertise: String,
    config: ConfigStore,
    shards: BTreeMap<GroupId, RaftGroup>,
    ring: MetadataRing,
    registry: RaftRegistry,
    channels: Mutex<HashMap<String, Channel>>,
    local_ip: Option<std::net::IpAddr>,
    devices: Arc<Mutex<Vec<pb::DeviceInfo>>>,
    reconcile: Notify,
    config_tx: watch::Sender<Arc<ConfigView>>,
    block: String,
    rack: String,
    data_addr: String,
    /// When each other node last answered a probe.
    last_seen: Mutex<HashMap<NodeId, std::time::Instant>>,
    started: std::time::Instant,
}

type Opened = (
    Arc<Node>,
    tokio::net::TcpListener,
    watch::Receiver<Arc<ConfigView>>,
);

impl Node {
    async fn open(o: ControlPlaneOptions) -> Result<Opened, ControlPlaneError> {
        let listener = tokio::net::TcpListener::bind(o.listen)
            .await
            .map_err(|source| ControlPlaneError::Bind {
                addr: o.listen,
                source,
            })?;
        let bound = listener
            .local_addr()
            .map_err(|source| ControlPlaneError::Bind {
                addr: o.listen,
                source,
            })?;
        let advertise = o.advertise.clone().unwrap_or_else(|| bound.to_string());
        // Outgoing connections leave from the listen address when it is a specific one, so a
        // node on its own loopback address is cut off completely by address-based rules.
        let local_ip = Some(bound.ip()).filter(|ip| !ip.is_unspecified());
        let transport = GrpcTransport::with_local_address(local_ip);
        let registry = RaftRegistry::new();
        let mut groups = BTreeMap::new();
        for group_id in 0..=GroupId::from(o.metadata_shards) {
            let options = (o.group_options)(o.node_id, group_id);
            let dir = o.data_dir.join(format!("g{group_id}"));
            let group = RaftGroup::open(options, &dir, transport.clone())
                .await
                .map_err(|source| ControlPlaneError::Group { group_id, source })?;
            registry.insert(group_id, group.raft().clone());
            groups.insert(group_id, group);
        }
        let founders: BTreeMap<NodeId, String> = if o.join {
            BTreeMap::new()
        } else if o.peers.is_empty() {
            [(o.node_id, advertise.clone())].into()
        } else {
            o.peers.clone()
        };
        if founders.keys().next() == Some(&o.node_id) {
            for (&group_id, group) in &groups {
                match group.initialize(founders.clone()).await {
                    // Already initialized: a restart, or formed earlier.
                    Ok(()) | Err(GroupError::Initialize { .. }) => {}
                    Err(source) => return Err(ControlPlaneError::Group { group_id, source }),
                }
            }
        }
        let config = ConfigStore::new(
            groups
                .remove(&CONFIG_GROUP)
                .ok_or(ControlPlaneError::InvalidOptions("no config group".into()))?,
        );
        let ring = MetadataRing::with_shards(groups.keys().copied());
        let (config_tx, config_rx) = watch::channel(Arc::new(ConfigView::default()));
        let node = Arc::new(Node {
            node_id: o.node_id,
            advertise,
            config,
            shards: groups,
            ring,
            registry,
            channels: Mutex::new(HashMap::new()),
            local_ip,
            devices: Arc::new(Mutex::new(o.devices)),
            reconcile: Notify::new(),
            config_tx,
            block: o.block,
            rack: o.rack,
            data_addr: o.data_addr,
            last_seen: Mutex::new(HashMap::new()),
            started: std::time::Instant::now(),
        });
        Ok((node, listener, config_rx))
    }

    fn all_groups(&self) -> impl Iterator<Item = &RaftGroup> {
        std::iter::once(self.config.group()).chain(self.shards.values())
    }

    async fn shutdown(&self) {
        for group in self.all_groups() {
            let _ = group.shutdown().await;
            self.registry.remove(group.group_id());
        }
    }

    fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        stop: impl Future<Output = ()> + Send,
    ) -> impl Future<Output = Result<(), tonic::transport::Error>> {
        let svc = Service(self.clone());
        tonic::transport::Server::builder()
            .add_service(RaftGrpcService::new(self.registry.clone()).into_server())
            .add_service(ClusterServiceServer::new(svc.clone()))
            .add_service(NodeServiceServer::new(svc.clone()))
            .add_service(ContainerServiceServer::new(svc.clone()))
            .add_service(VdiskServiceServer::new(svc.clone()))
            .add_service(MetadataServiceServer::new(svc))
            .serve_with_incoming_shutdown(crate::grpc::incoming_nodelay(listener), stop)
    }

    fn spawn_background(self: Arc<Self>) {
        let node = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(RECONCILE_INTERVAL_MS)) => {}
                    _ = node.reconcile.notified() => {}
                }
                node.reconcile_all().await;
            }
        });
        tokio::spawn(async move {
            let mut metrics = self.config.group().raft().metrics();
            let mut published = None;
            loop {
                let version = self.config.group().applied_version().ok();
                if version.is_some()
                    && version != published
                    && let Ok(view) = self.local_view().await
                {
                    published = Some(view.version);
                    self.config_tx.send_replace(Arc::new(view));
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    // ---- local reads of the config replica --------------------------------------------------

    async fn local_records<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &[u8],
    ) -> Result<Vec<Stored<T>>, GroupError> {
        let entries = self
            .config
            .group()
            .scan(prefix, ReadConsistency::Local)
            .await?;
        Ok(entries
            .into_iter()
            .filter_map(|(_, v)| {
                postcard::from_bytes(&v.value).ok().map(|record| Stored {
                    record,
                    version: v.version,
                })
            })
            .collect())
    }

    async fn cluster_record(
        &self,
        consistency: ReadConsistency,
    ) -> Result<Option<Stored<ClusterRecord>>, GroupError> {
        let found = self.config.group().get(CLUSTER_KEY, consistency).await?;
        Ok(found.and_then(|v| {
            postcard::from_bytes(&v.value).ok().map(|record| Stored {
                record,
                version: v.version,
            })
        }))
    }

    async fn local_view(&self) -> Result<ConfigView, GroupError> {
        // The counter first: every vdisk it counted that still exists is in the scan below.
        let last_vdisk_id = self
            .config
            .group()
            .get(crate::config_store::VDISK_ID_KEY, ReadConsistency::Local)
            .await?
            .and_then(|v| postcard::from_bytes::<u64>(&v.value).ok())
            .unwrap_or(0);
        Ok(ConfigView {
            last_vdisk_id,
            version: self.config.group().applied_version()?,
            cluster: self
                .cluster_record(ReadConsistency::Local)
                .await?
                .map(|s| s.record),
            nodes: self.local_records(b"node/").await?,
            containers: self.local_records(b"container/").await?,
            vdisks: self.local_records(b"vdisk/").await?,
            disks: self.local_records(b"disk/").await?,
            shards: self.local_records(SHARD_PREFIX).await?,
        })
    }

    // ---- membership ------------------------------------------------------------------------

    async fn reconcile_all(&self) {
        self.unseat_non_voting_leaders().await;
        let Ok(nodes) = self.local_records::<NodeRecord>(b"node/").await else {
            return;
        };
        let config_metrics = self.config.group().metrics();
        let founded = matches!(
            self.config
                .group()
                .get(FOUNDERS_KEY, ReadConsistency::Local)
                .await,
            Ok(Some(_))
        );
        if !founded {
            // Fresh cluster: the config leader records the founding members once, with a
            // marker in the same batch. Membership follows the records only after that, so a
            // node added before it does not make the founders look removed.
            if config_metrics.state == ServerState::Leader {
                let mut ops: Vec<KvOp> = config_metrics
                    .membership_config
                    .membership()
                    .nodes()
                    .filter(|(id, _)| !nodes.iter().any(|s| s.record.node_id == **id))
                    .map(|(id, n)| KvOp::Put {
                        key: format!("node/{id:020}").into_bytes(),
                        value: postcard::to_allocvec(&NodeRecord {
                            node_id: *id,
                            control_addr: n.addr.clone(),
                            data_addr: String::new(),
                            block: String::new(),
                            rack: String::new(),
                        })
                        .unwrap_or_default(),
                        expect: Expect::Absent,
                    })
                    .collect();
                ops.push(KvOp::Put {
                    key: FOUNDERS_KEY.to_vec(),
                    value: vec![1],
                    expect: Expect::Absent,
                });
                let _ = self.config.group().apply(ops).await;
            }
            return;
        }
        let leads: Vec<&RaftGroup> = self
            .all_groups()
            .filter(|g| g.metrics().state == ServerState::Leader)
            .collect();
        if leads.is_empty() {
            return;
        }
        let fault_tolerance = match self.cluster_record(ReadConsistency::Local).await {
            Ok(Some(c)) => c.record.fault_tolerance,
            _ => 1,
        };
        let infos = self.probe(&nodes).await;
        let places: Vec<NodePlace> = nodes
            .iter()
            .map(|s| {
                let r = &s.record;
                NodePlace {
                    node_id: r.node_id,
                    block: r.block.clone(),
                    rack: r.rack.clone(),
                    up: self.is_up(r.node_id),
                }
            })
            .collect();
        // The config leader copies each node's own view of its failure domain into its record.
        if config_metrics.state == ServerState::Leader {
            for s in &nodes {
                let r = &s.record;
                let reported = if r.node_id == self.node_id {
                    Some((
                        self.block.clone(),
                        self.rack.clone(),
                        self.data_addr.clone(),
                    ))
                } else {
                    infos
                        .get(&r.node_id)
                        .map(|i| (i.block.clone(), i.rack.clone(), i.data_addr.clone()))
                };
                // A node that reports no data address keeps the one `node add` gave it.
                if let Some((block, rack, data)) = reported
                    && let data = if data.is_empty() {
                        r.data_addr.clone()
                    } else {
                        data
                    }
                    && (block != r.block || rack != r.rack || data != r.data_addr)
                    && let Err(e) = self
                        .config
                        .set_node_domain(r.node_id, &block, &rack, &data)
                        .await
                {
                    eprintln!(
                        "cairn control plane: node {}: recording the domain of node {}: {e}",
                        self.node_id, r.node_id
                    );
                }
                // Its disks, as it reports them (only when they differ from the records).
                let devices = if r.node_id == self.node_id {
                    Some(self.devices.lock().map(|d| d.clone()).unwrap_or_default())
                } else {
                    infos.get(&r.node_id).map(|i| i.devices.clone())
                };
                if let Some(devices) = devices {
                    self.record_disks(r.node_id, devices).await;
                }
            }
        }
        // Disks of nodes that were removed go with them.
        let orphaned: BTreeSet<NodeId> = self
            .config_tx
            .borrow()
            .disks
            .iter()
            .map(|s| s.record.node_id)
            .filter(|id| !nodes.iter().any(|n| n.record.node_id == *id))
            .collect();
        if config_metrics.state == ServerState::Leader {
            for id in orphaned {
                if let Err(e) = self.config.set_node_disks(id, &[]).await {
                    eprintln!(
                        "cairn control plane: node {}: removing the disks of node {id}: {e}",
                        self.node_id
                    );
                }
            }
        }
        if config_metrics.state == ServerState::Leader {
            self.record_shard_directory(&infos).await;
        }
        let wanted: BTreeMap<NodeId, String> = nodes
            .into_iter()
            .map(|s| (s.record.node_id, s.record.control_addr))
            .collect();
        for group in leads {
            if let Err(e) = reconcile_group(group, &wanted, &places, fault_tolerance).await {
                eprintln!(
                    "cairn control plane: node {}: membership of group {}: {e}",
                    self.node_id,
                    group.group_id()
                );
            }
        }
    }

    /// A leader whose voter seat moved to another node keeps leading as a learner (openraft
    /// 0.9 has no leadership transfer, and a leader steps down only on a higher term). For
    /// each group where that is so, the best-ranked voter (by placement rank) starts an
    /// election, which puts the leadership back among the voters.
    async fn unseat_non_voting_leaders(&self) {
        for group in self.all_groups() {
            let m = group.metrics();
            let membership = m.membership_config.membership();
            let voters: Vec<NodeId> = membership.voter_ids().collect();
            let Some(leader) = m.current_leader else {
                continue;
            };
            if voters.contains(&leader) || !voters.contains(&self.node_id) {
                continue;
            }
            let best = voters
                .iter()
                .copied()
                .max_by_key(|&id| (crate::placement::rank(group.group_id(), id), id));
            if best == Some(self.node_id)
                && let Err(e) = group.raft().trigger().elect().await
            {
                eprintln!(
                    "cairn control plane: node {}: group {}: election to unseat learner \
                     leader {leader}: {e}",
                    self.node_id,
                    group.group_id()
                );
            }
        }
    }

    /// The config leader's part of the shard directory: each shard as its newest leader (by
    /// term) reports it, this node's own reports and those of the nodes probed (`infos`);
    /// writes only records that changed.
    async fn record_shard_directory(&self, infos: &HashMap<NodeId, pb::NodeInfo>) {
        let mut newest: BTreeMap<GroupId, ShardRecord> = BTreeMap::new();
        let reports = infos
            .iter()
            .map(|(&id, i)| (id, i.led_groups.clone()))
            .chain(std::iter::once((self.node_id, self.led_groups())));
        for (leader, groups) in reports {
            for g in groups {
                if g.group_id == CONFIG_GROUP || !self.shards.contains_key(&g.group_id) {
                    continue;
                }
                let record = ShardRecord {
                    group_id: g.group_id,
                    leader,
                    term: g.term,
                    voters: g.voters,
                    learners: g.learners,
                };
                match newest.get(&g.group_id) {
                    Some(r) if r.term >= record.term => {}
                    _ => {
                        newest.insert(g.group_id, record);
                    }
                }
            }
        }
        for record in newest.into_values() {
            let unchanged = self
                .config_tx
                .borrow()
                .shards
                .iter()
                .any(|s| s.record == record);
            if unchanged {
                continue;
            }
            if let Err(e) = self.config.set_shard(&record).await {
                eprintln!(
                    "cairn control plane: node {}: recording shard {} in the directory: {e}",
                    self.node_id, record.group_id
                );
            }
        }
    }

    /// The groups this node leads, with their membership.
    fn led_groups(&self) -> Vec<pb::LedGroup> {
        self.all_groups()
            .filter_map(|g| {
                let m = g.metrics();
                if m.state != ServerState::Leader {
                    return None;
                }
                let membership = m.membership_config.membership();
                Some(pb::LedGroup {
                    group_id: g.group_id(),
                    term: m.current_term,
                    voters: membership.voter_ids().collect(),
                    learners: membership.learner_ids().collect(),
                })
            })
            .collect()
    }

    /// The directory's record of `shard` if it says this node does not host the shard.
    fn shard_elsewhere(&self, shard: GroupId) -> Option<ShardRecord> {
        let view = self.config_tx.borrow();
        let record = &view
            .shards
            .iter()
            .find(|s| s.record.group_id == shard)?
            .record;
        (!record.hosts(self.node_id)).then(|| record.clone())
    }

    /// For a metadata shard this node does not host (as the directory says): the error that
    /// sends a call to the shard's leader. `None`: hosted here (or not in the directory yet),
    /// so the local replica answers or names its leader.
    fn not_hosted(&self, shard: GroupId) -> Option<ServeError> {
        let record = self.shard_elsewhere(shard)?;
        let view = self.config_tx.borrow();
        let leader = view
            .nodes
            .iter()
            .find(|n| n.record.node_id == record.leader && record.leader != self.node_id)
            .map(|n| n.record.control_addr.clone());
        Some(match leader {
            Some(leader_addr) => ServeError::NotLeader {
                group_id: shard,
                node_id: self.node_id,
                leader_addr,
            },
            None => ServeError::Status(crate::status::retryable(Status::unavailable(format!(
                "metadata shard {shard} is not hosted on node {} and the directory names no \
                 reachable leader for it (node {})",
                self.node_id, record.leader
            )))),
        })
    }

    /// A shard's status as the directory has it (for a shard this node does not host).
    fn directory_status(&self, shard: GroupId) -> Option<pb::GroupStatus> {
        let r = self.shard_elsewhere(shard)?;
        Some(pb::GroupStatus {
            group_id: shard,
            leader: r.leader,
            term: r.term,
            voters: r.voters.clone(),
            learners: r.learners.clone(),
            applied_index: 0,
            healthy: r.leader != 0,
        })
    }

    /// Makes node `node_id`'s disk records what it reports (writes only when they differ).
    async fn record_disks(&self, node_id: NodeId, devices: Vec<pb::DeviceInfo>) {
        let disks: Vec<DiskRecord> = devices
            .into_iter()
            .map(|d| DiskRecord {
                node_id,
                path: d.path,
                tier: d.tier,
                capacity_bytes: d.capacity_bytes,
            })
            .collect();
        let recorded: Vec<DiskRecord> = self
            .config_tx
            .borrow()
            .disks
            .iter()
            .filter(|s| s.record.node_id == node_id)
            .map(|s| s.record.clone())
            .collect();
        if recorded.len() == disks.len() && disks.iter().all(|d| recorded.contains(d)) {
            return;
        }
        if let Err(e) = self.config.set_node_disks(node_id, &disks).await {
            eprintln!(
                "cairn control plane: node {}: recording the disks of node {node_id}: {e}",
                self.node_id
            );
        }
    }

    /// Probes every other recorded node (what it reports about itself), noting who answered.
    async fn probe(&self, nodes: &[Stored<NodeRecord>]) -> HashMap<NodeId, pb::NodeInfo> {
        let mut probes = tokio::task::JoinSet::new();
        for s in nodes {
            let id = s.record.node_id;
            if id == self.node_id {
                continue;
            }
            let Ok(channel) = self.channel(&s.record.control_addr) else {
                continue;
            };
            probes.spawn(async move {
                let mut client = NodeServiceClient::new(channel);
                let call = client.get_node_info(pb::GetNodeInfoRequest {});
                let answer =
                    tokio::time::timeout(Duration::from_millis(PROBE_TIMEOUT_MS), call).await;
                (id, answer.ok().and_then(|r| r.ok()).map(|r| r.into_inner()))
            });
        }
        let mut out = HashMap::new();
        while let Some(Ok((id, info))) = probes.join_next().await {
            if let Some(info) = info {
                if let Ok(mut seen) = self.last_seen.lock() {
                    seen.insert(id, std::time::Instant::now());
                }
                out.insert(id, info);
            }
        }
        out
    }

    /// Whether `node` answered a probe recently (itself always; any node during this node's
    /// first [`VOTER_DOWN_AFTER_MS`], before probes could tell).
    fn is_up(&self, node: NodeId) -> bool {
        let window = Duration::from_millis(VOTER_DOWN_AFTER_MS);
        if node == self.node_id || self.started.elapsed() < window {
            return true;
        }
        self.last_seen
            .lock()
            .ok()
            .and_then(|seen| seen.get(&node).map(|t| t.elapsed() < window))
            .unwrap_or(false)
    }

    // ---- helpers ---------------------------------------------------------------------------

    fn channel(&self, addr: &str) -> Result<Channel, Status> {
        let mut channels = self
            .channels
            .lock()
            .map_err(|_| Status::internal("channel cache poisoned"))?;
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::internal(format!("bad peer address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_millis(crate::grpc::CONNECT_TIMEOUT_MS))
            .timeout(Duration::from_millis(FORWARD_TIMEOUT_MS))
            .local_address(self.local_ip)
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    async fn forward<Req, Resp, F, Fut>(
        &self,
        leader_addr: &str,
        req: Req,
        call: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let channel = self.channel(leader_addr)?;
        let mut request = Request::new(req);
        request
            .metadata_mut()
            .insert(FORWARDED_KEY, MetadataValue::from_static("1"));
        call(channel, request).await.map_err(|s| {
            if s.code() == tonic::Code::Unavailable && s.metadata().get(RETRYABLE_KEY).is_none() {
                crate::status::retryable(Status::unavailable(format!(
                    "node {} could not reach the leader at {leader_addr}: {}",
                    self.node_id,
                    s.message()
                )))
            } else {
                s
            }
        })
    }

    fn cfg_err(&self, e: ConfigError) -> ServeError {
        config_error(e, &self.advertise)
    }

    fn grp_err(&self, e: GroupError) -> ServeError {
        group_error(e, &self.advertise)
    }
}

/// One membership step of `group` (led by this node) toward `wanted` (every recorded node),
/// voters placed by [`plan_voters`].
async fn reconcile_group(
    group: &RaftGroup,
    wanted: &BTreeMap<NodeId, String>,
    places: &[NodePlace],
    fault_tolerance: u32,
) -> Result<(), String> {
    let m = group.metrics();
    let membership = m.membership_config.membership().clone();
    if membership.get_joint_config().len() > 1 {
        return Ok(()); // a change is under way
    }
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let members: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
    let raft = group.raft();
    let target = voter_target(wanted.len(), fault_tolerance);
    // Who should hold a replica: every recorded node for the config group; for a shard, its
    // voters and the live nodes placement wants as voters (which join as learners first).
    let hosts: BTreeSet<NodeId> = if group.group_id() == CONFIG_GROUP {
        wanted.keys().copied().collect()
    } else {
        let up: Vec<NodePlace> = places.iter().filter(|p| p.up).cloned().collect();
        ideal_voters(group.group_id(), &up, target)
            .into_iter()
            .chain(voters.iter().copied())
            .filter(|id| wanted.contains_key(id))
            .collect()
    };
    if let Some((&id, addr)) = wanted
        .iter()
        .find(|(id, _)| hosts.contains(id) && !members.contains(id))
    {
        raft.add_learner(id, BasicNode { addr: addr.clone() }, false)
            .await
            .map_err(|e| format!("add learner {id}: {e}"))?;
        return Ok(());
    }
    let last = m.last_log_index.unwrap_or(0);
    let replication = m.replication.clone().unwrap_or_default();
    let caught_up = |id: NodeId| {
        id == group.node_id()
            || replication
                .get(&id)
                .copied()
                .flatten()
                .is_some_and(|l| l.index + CATCH_UP_SLACK_ENTRIES >= last)
    };
    let desired = plan_voters(
        group.group_id(),
        places,
        &voters,
        group.node_id(),
        target,
        caught_up,
    );
    // Growth waits until it can be whole (never 1 -> 2 on the way to 3: two voters tolerate no
    // failure); replacing or dropping voters happens one plan at a time.
    let partial_growth = desired.len() < target && desired.len() > voters.len();
    if !partial_growth && desired != voters {
        raft.change_membership(ChangeMembers::ReplaceAllVoters(desired.clone()), true)
            .await
            .map_err(|e| format!("voters {voters:?} -> {desired:?}: {e}"))?;
        return Ok(());
    }
    let gone: BTreeSet<NodeId> = members
        .iter()
        .copied()
        .filter(|id| !hosts.contains(id) && !voters.contains(id))
        .collect();
    if !gone.is_empty() {
        raft.change_membership(ChangeMembers::RemoveNodes(gone.clone()), false)
            .await
            .map_err(|e| format!("remove {gone:?}: {e}"))?;
    }
    Ok(())
}

// ---- conversions ---------------------------------------------------------------------------

fn node_to_pb(s: &Stored<NodeRecord>, state: pb::NodeState) -> pb::NodeRecord {
    pb::NodeRecord {
        address: Some(pb::NodeAddress {
            node_id: s.record.node_id,
            control_addr: s.record.control_addr.clone(),
            data_addr: s.record.data_addr.clone(),
        }),
        domain: Some(pb::FailureDomain {
            block: s.record.block.clone(),
            rack: s.record.rack.clone(),
        }),
        state: state as i32,
        config_version: s.version,
    }
}

fn container_to_pb(s: &Stored<ContainerRecord>) -> pb::Container {
    let st = &s.record.settings;
    let (compression, delay) = match st.compression {
        Compression::Off => (pb::Compression::None, 0),
        Compression::Inline => (pb::Compression::Inline, 0),
        Compression::PostProcess { delay_secs } => (pb::Compression::PostProcess, delay_secs),
    };
    pb::Container {
        container_id: s.record.container_id,
        name: s.record.name.clone(),
        settings: Some(pb::ContainerSettings {
            replication_factor: st.replication_factor,
            erasure_code: st.erasure_code.map(|(k, m)| pb::ErasureCode {
                data_strips: k,
                parity_strips: m,
            }),
            compression: compression as i32,
            compression_delay_secs: delay,
            dedup: if st.dedup {
                pb::Dedup::OnWrite
            } else {
                pb::Dedup::Off
            } as i32,
        }),
        config_version: s.version,
    }
}

fn settings_from_pb(s: Option<&pb::ContainerSettings>) -> Result<ContainerSettings, Status> {
    let default = pb::ContainerSettings::default();
    let s = s.unwrap_or(&default);
    let compression = match pb::Compression::try_from(s.compression) {
        Ok(pb::Compression::Unspecified | pb::Compression::None) => Compression::Off,
        Ok(pb::Compression::Inline) => Compression::Inline,
        Ok(pb::Compression::PostProcess) => Compression::PostProcess {
            delay_secs: s.compression_delay_secs,
        },
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown compression value {}",
                s.compression
            )));
        }
    };
    let dedup = match pb::Dedup::try_from(s.dedup) {
        Ok(pb::Dedup::Unspecified | pb::Dedup::Off) => false,
        Ok(pb::Dedup::OnWrite) => true,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown dedup value {}",
                s.dedup
            )));
        }
    };
    Ok(ContainerSettings {
        // Unset (0) means the default RF2.
        replication_factor: if s.replication_factor == 0 {
            2
        } else {
            s.replication_factor
        },
        erasure_code: s
            .erasure_code
            .as_ref()
            .filter(|e| e.data_strips != 0 || e.parity_strips != 0)
            .map(|e| (e.data_strips, e.parity_strips)),
        compression,
        dedup,
    })
}

fn vdisk_to_pb(s: &Stored<VdiskRecord>) -> pb::Vdisk {
    pb::Vdisk {
        vdisk_id: s.record.vdisk_id,
        name: s.record.name.clone(),
        container: s.record.container.clone(),
        size_bytes: s.record.size_bytes,
        config_version: s.version,
    }
}

fn check_vdisk_size(size_bytes: u64) -> Result<(), Status> {
    if size_bytes == 0 || !size_bytes.is_multiple_of(VDISK_SIZE_ALIGNMENT_BYTES) {
        return Err(Status::invalid_argument(format!(
            "vdisk size {size_bytes} bytes: expected a non-zero multiple of 1 MiB ({VDISK_SIZE_ALIGNMENT_BYTES} bytes)"
        )));
    }
    Ok(())
}

fn op_from_pb(op: pb::MetaOp) -> Result<KvOp, Status> {
    let expect = |e: Option<pb::Expect>| match e.and_then(|e| e.condition) {
        None | Some(pb::expect::Condition::Any(_)) => Expect::Any,
        Some(pb::expect::Condition::Absent(_)) => Expect::Absent,
        Some(pb::expect::Condition::Version(v)) => Expect::Version(v),
    };
    match op.op {
        Some(pb::meta_op::Op::Put(p)) => Ok(KvOp::Put {
            key: p.key,
            value: p.value,
            expect: expect(p.expect),
        }),
        Some(pb::meta_op::Op::Delete(d)) => Ok(KvOp::Delete {
            key: d.key,
            expect: expect(d.expect),
        }),
        None => Err(Status::invalid_argument(
            "metadata operation without put or delete",
        )),
    }
}

fn versioned_to_pb(v: Versioned) -> pb::VersionedValue {
    pb::VersionedValue {
        value: v.value,
        version: v.version,
    }
}

fn group_status(group: &RaftGroup) -> pb::GroupStatus {
    let m = group.metrics();
    let membership = m.membership_config.membership();
    let healthy = match m.state {
        ServerState::Leader => m
            .millis_since_quorum_ack
            .is_some_and(|ms| ms < crate::group::ELECTION_TIMEOUT_MAX_MS),
        _ => m.current_leader.is_some(),
    };
    pb::GroupStatus {
        group_id: group.group_id(),
        leader: m.current_leader.unwrap_or(0),
        term: m.current_term,
        voters: membership.voter_ids().collect(),
        learners: membership.learner_ids().collect(),
        applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
        healthy,
    }
}

// ---- services ------------------------------------------------------------------------------

#[derive(Clone)]
struct Service(Arc<Node>);

/// Runs `$local` here, or forwards the request once to the leader it names.
macro_rules! serve_or_forward {
    ($self:ident, $request:ident, $local:ident, $client:ident, $method:ident) => {{
        let forwarded = $request.metadata().contains_key(FORWARDED_KEY);
        let req = $request.into_inner();
        match $self.$local(&req).await {
            Err(ServeError::NotLeader { leader_addr, .. }) if !forwarded => {
                $self
                    .0
                    .forward(&leader_addr, req, |channel, r| async move {
                        $client::new(channel).$method(r).await
                    })
                    .await
            }
            other => other.map(Response::new).map_err(Status::from),
        }
    }};
}

impl Service {
    async fn create_cluster_local(
        &self,
        req: &pb::CreateClusterRequest,
    ) -> Result<pb::CreateClusterResponse, ServeError> {
        let n = &self.0;
        let name_ok = !req.name.is_empty()
            && req.name.len() <= 63
            && req
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            return Err(Status::invalid_argument(format!(
                "invalid cluster name {:?}: expected [a-z0-9-], 1..=63 bytes",
                req.name
            ))
            .into());
        }
        let fault_tolerance = match req.fault_tolerance {
            0 | 1 => 1,
            2 => 2,
            other => {
                return Err(Status::invalid_argument(format!(
                    "fault tolerance {other}: expected 1 or 2"
                ))
                .into());
            }
        };
        for a in &req.nodes {
            let record = NodeRecord {
                node_id: a.node_id,
                control_addr: a.control_addr.clone(),
                data_addr: a.data_addr.clone(),
                block: String::new(),
                rack: String::new(),
            };
            match n.config.add_node(record).await {
                Ok(_) | Err(ConfigError::AlreadyExists { .. }) => {}
                Err(e) => return Err(n.cfg_err(e)),
            }
        }
        let existing = n
            .cluster_record(ReadConsistency::Linearizable)
            .await
            .map_err(|e| n.grp_err(e))?;
        let record = match existing {
            Some(s) if s.record.name == req.name => s.record, // idempotent
            Some(s) => {
                return Err(Status::already_exists(format!(
                    "the cluster exists already as {:?} (id {})",
                    s.record.name, s.record.cluster_id
                ))
                .into());
            }
            None => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                let record = ClusterRecord {
                    cluster_id: format!("{:016x}", crate::ring::ring_hash(&nanos.to_le_bytes())),
                    name: req.name.clone(),
                    fault_tolerance,
                };
                let put = KvOp::Put {
                    key: CLUSTER_KEY.to_vec(),
                    value: postcard::to_allocvec(&record).unwrap_or_default(),
                    expect: Expect::Absent,
                };
                match n.config.group().apply(vec![put]).await {
                    Ok(_) => record,
                    // Lost a race with another CreateCluster: report what won.
                    Err(GroupError::Rejected { .. }) => {
                        let won = n
                            .cluster_record(ReadConsistency::Linearizable)
                            .await
                            .map_err(|e| n.grp_err(e))?;
                        match won {
                            Some(s) if s.record.name == req.name => s.record,
                            _ => {
                                return Err(Status::already_exists(
                                    "the cluster was created concurrently under another name",
                                )
                                .into());
                            }
                        }
                    }
                    Err(e) => return Err(n.grp_err(e)),
                }
            }
        };
        n.reconcile.notify_one();
        let m = n.config.group().metrics();
        Ok(pb::CreateClusterResponse {
            cluster_id: record.cluster_id,
            config_voters: m.membership_config.membership().voter_ids().collect(),
        })
    }

    async fn status_local(&self) -> Result<pb::ClusterStatus, ServeError> {
        let n = &self.0;
        let view = n.local_view().await.map_err(|e| n.grp_err(e))?;
        let config_metrics = n.config.group().metrics();
        let members: BTreeSet<NodeId> = config_metrics
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect();
        let mut infos: BTreeMap<NodeId, Option<pb::NodeInfo>> = view
            .nodes
            .iter()
            .map(|s| (s.record.node_id, None))
            .collect();
        infos.extend(
            n.probe(&view.nodes)
                .await
                .into_iter()
                .map(|(id, i)| (id, Some(i))),
        );
        infos.insert(n.node_id, Some(self.node_info()));
        let mut capacity: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let mut disk_alerts = Vec::new();
        let nodes = view
            .nodes
            .iter()
            .map(|s| {
                let info = infos.get(&s.record.node_id).cloned().flatten();
                let state = if !members.contains(&s.record.node_id) {
                    pb::NodeState::Joining
                } else if info.is_some() {
                    pb::NodeState::Up
                } else {
                    pb::NodeState::Down
                };
                for d in info.iter().flat_map(|i| i.devices.iter()) {
                    if !d.state.is_empty() && d.state != "online" {
                        disk_alerts.push(pb::DiskAlert {
                            node_id: s.record.node_id,
                            path: d.path.clone(),
                            state: d.state.clone(),
                            reason: d.state_reason.clone(),
                        });
                        continue;
                    }
                    let e = capacity.entry(d.tier.clone()).or_default();
                    e.0 += d.capacity_bytes;
                    e.1 += d.used_bytes;
                }
                node_to_pb(s, state)
            })
            .collect();
        let cluster = view.cluster.clone();
        Ok(pb::ClusterStatus {
            cluster_id: cluster
                .as_ref()
                .map(|c| c.cluster_id.clone())
                .unwrap_or_default(),
            name: cluster.as_ref().map(|c| c.name.clone()).unwrap_or_default(),
            fault_tolerance: cluster.as_ref().map_or(1, |c| c.fault_tolerance),
            config_leader: config_metrics.current_leader.unwrap_or(0),
            config_term: config_metrics.current_term,
            config_version: view.version,
            nodes,
            groups: n
                .all_groups()
                .map(|g| {
                    n.directory_status(g.group_id())
                        .unwrap_or_else(|| group_status(g))
                })
                .collect(),
            capacity: capacity
                .into_iter()
                .map(|(tier, (capacity_bytes, used_bytes))| pb::TierCapacity {
                    tier,
                    capacity_bytes,
                    used_bytes,
                })
                .collect(),
            served_by: n.node_id,
            created: cluster.is_some(),
            disk_alerts,
        })
    }

    fn node_info(&self) -> pb::NodeInfo {
        pb::NodeInfo {
            node_id: self.0.node_id,
            version: env!("CARGO_PKG_VERSION").to_string(),
            schema_versions: cairn_proto::SCHEMA_VERSIONS.to_vec(),
            devices: self.0.devices.lock().map(|d| d.clone()).unwrap_or_default(),
            block: self.0.block.clone(),
            rack: self.0.rack.clone(),
            data_addr: self.0.data_addr.clone(),
            led_groups: self.0.led_groups(),
        }
    }

    async fn add_node_local(&self, req: &pb::AddNodeRequest) -> Result<pb::NodeRecord, ServeError> {
        let n = &self.0;
        let Some(addr) = req.address.as_ref() else {
            return Err(Status::invalid_argument("AddNode without an address").into());
        };
        if addr.control_addr.parse::<SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "control address {:?} is not host:port",
                addr.control_addr
            ))
            .into());
        }
        let domain = req.domain.clone().unwrap_or_default();
        let record = NodeRecord {
            node_id: addr.node_id,
            control_addr: addr.control_addr.clone(),
            data_addr: addr.data_addr.clone(),
            block: domain.block,
            rack: domain.rack,
        };
        let stored = n.config.add_node(record).await.map_err(|e| n.cfg_err(e))?;
        n.reconcile.notify_one();
        Ok(node_to_pb(&stored, pb::NodeState::Joining))
    }

    async fn remove_node_local(
        &self,
        req: &pb::RemoveNodeRequest,
    ) -> Result<pb::RemoveNodeResponse, ServeError> {
        let n = &self.0;
        let nodes = n.config.nodes().await.map_err(|e| n.cfg_err(e))?;
        if nodes.len() == 1 && nodes[0].record.node_id == req.node_id {
            return Err(Status::failed_precondition(format!(
                "node {} is the cluster's last node",
                req.node_id
            ))
            .into());
        }
        let config_version = n
            .config
            .remove_node(req.node_id, req.expected_version)
            .await
            .map_err(|e| n.cfg_err(e))?;
        n.reconcile.notify_one();
        Ok(pb::RemoveNodeResponse { config_version })
    }

    async fn create_container_local(
        &self,
        req: &pb::CreateContainerRequest,
    ) -> Result<pb::Container, ServeError> {
        let n = &self.0;
        let settings = settings_from_pb(req.settings.as_ref())?;
        let stored = n
            .config
            .create_container(&req.name, settings)
            .await
            .map_err(|e| n.cfg_err(e))?;
        Ok(container_to_pb(&stored))
    }

    async fn list_containers_local(
        &self,
        _req: &pb::ListContainersRequest,
    ) -> Result<pb::ListContainersResponse, ServeError> {
        let n = &self.0;
        let all = n.config.containers().await.map_err(|e| n.cfg_err(e))?;
        Ok(pb::ListContainersResponse {
            containers: all.iter().map(container_to_pb).collect(),
        })
    }

    async fn delete_container_local(
        &self,
        req: &pb::DeleteContainerRequest,
    ) -> Result<pb::DeleteContainerResponse, ServeError> {
        let n = &self.0;
        let config_version = n
            .config
            .delete_container(&req.name, req.expected_version)
            .await
            .map_err(|e| n.cfg_err(e))?;
        Ok(pb::DeleteContainerResponse { config_version })
    }

    async fn create_vdisk_local(
        &self,
        req: &pb::CreateVdiskRequest,
    ) -> Result<pb::Vdisk, ServeError> {
        let n = &self.0;
        check_vdisk_size(req.size_bytes)?;
        let stored = n
            .config
            .create_vdisk(&req.container, &req.name, req.size_bytes)
            .await
            .map_err(|e| n.cfg_err(e))?;
        Ok(vdisk_to_pb(&stored))
    }

    async fn list_vdisks_local(
        &self,
        req: &pb::ListVdisksRequest,
    ) -> Result<pb::ListVdisksResponse, ServeError> {
        let n = &self.0;
        if !req.container.is_empty() {
            let containers = n.config.containers().await.map_err(|e| n.cfg_err(e))?;
            if !containers.iter().any(|c| c.record.name == req.container) {
                return Err(
                    Status::not_found(format!("Container {} not found", req.container)).into(),
                );
            }
        }
        let all = n
            .config
            .vdisks(&req.container)
            .await
            .map_err(|e| n.cfg_err(e))?;
        Ok(pb::ListVdisksResponse {
            vdisks: all.iter().map(vdisk_to_pb).collect(),
        })
    }

    async fn resize_vdisk_local(
        &self,
        req: &pb::ResizeVdiskRequest,
    ) -> Result<pb::Vdisk, ServeError> {
        let n = &self.0;
        check_vdisk_size(req.new_size_bytes)?;
        let stored = n
            .config
            .resize_vdisk(
                &req.container,
                &req.name,
                req.new_size_bytes,
                req.expected_version,
            )
            .await
            .map_err(|e| n.cfg_err(e))?;
        Ok(vdisk_to_pb(&stored))
    }

    async fn delete_vdisk_local(
        &self,
        req: &pb::DeleteVdiskRequest,
    ) -> Result<pb::DeleteVdiskResponse, ServeError> {
        let n = &self.0;
        let config_version = n
            .config
            .delete_vdisk(&req.container, &req.name, req.expected_version)
            .await
            .map_err(|e| n.cfg_err(e))?;
        Ok(pb::DeleteVdiskResponse { config_version })
    }

    fn shard_of(&self, key: &[u8]) -> Result<&RaftGroup, Status> {
        let shard = self
            .0
            .ring
            .shard_for(routing_prefix(key))
            .ok_or_else(|| Status::internal("the metadata ring has no shards"))?;
        self.0
            .shards
            .get(&shard)
            .ok_or_else(|| Status::internal(format!("shard {shard} is not hosted here")))
    }

    async fn meta_get_local(
        &self,
        req: &pb::MetaGetRequest,
    ) -> Result<pb::MetaGetResponse, ServeError> {
        let group = self.shard_of(&req.key)?;
        if let Some(elsewhere) = self.0.not_hosted(group.group_id()) {
            return Err(elsewhere);
        }
        let value = group
            .get(&req.key, ReadConsistency::Linearizable)
            .await
            .map_err(|e| self.0.grp_err(e))?;
        Ok(pb::MetaGetResponse {
            value: value.map(versioned_to_pb),
        })
    }

    async fn meta_apply_local(
        &self,
        req: &pb::MetaApplyRequest,
    ) -> Result<pb::MetaApplyResponse, ServeError> {
        let ops = req
            .ops
            .iter()
            .cloned()
            .map(op_from_pb)
            .collect::<Result<Vec<_>, _>>()?;
        let Some(first) = ops.first() else {
            return Err(Status::invalid_argument("empty metadata batch").into());
        };
        let group = self.shard_of(first.key())?;
        if let Some(other) = ops
            .iter()
            .find(|op| self.0.ring.shard_for(routing_prefix(op.key())) != Some(group.group_id()))
        {
            return Err(Status::invalid_argument(format!(
                "metadata batch spans shards: key {} and key {} route to different shards (keep a batch under one vdisk prefix v/<16 hex>/)",
                crate::kv::printable_key(first.key()),
                crate::kv::printable_key(other.key())
            ))
            .into());
        }
        if let Some(elsewhere) = self.0.not_hosted(group.group_id()) {
            return Err(elsewhere);
        }
        let version = group.apply(ops).await.map_err(|e| self.0.grp_err(e))?;
        Ok(pb::MetaApplyResponse { version })
    }
}

#[tonic::async_trait]
impl ClusterService for Service {
    async fn create_cluster(
        &self,
        request: Request<pb::CreateClusterRequest>,
    ) -> Result<Response<pb::CreateClusterResponse>, Status> {
        use pb::cluster_service_client::ClusterServiceClient;
        serve_or_forward!(
            self,
            request,
            create_cluster_local,
            ClusterServiceClient,
            create_cluster
        )
    }

    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        self.status_local()
            .await
            .map(Response::new)
            .map_err(Status::from)
    }
}

#[tonic::async_trait]
impl NodeService for Service {
    async fn get_node_info(
        &self,
        _request: Request<pb::GetNodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        Ok(Response::new(self.node_info()))
    }

    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::NodeRecord>, Status> {
        serve_or_forward!(self, request, add_node_local, NodeServiceClient, add_node)
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        serve_or_forward!(
            self,
            request,
            remove_node_local,
            NodeServiceClient,
            remove_node
        )
    }
}

#[tonic::async_trait]
impl ContainerService for Service {
    async fn create_container(
        &self,
        request: Request<pb::CreateContainerRequest>,
    ) -> Result<Response<pb::Container>, Status> {
        serve_or_forward!(
            self,
            request,
            create_container_local,
            ContainerServiceClient,
            create_container
        )
    }

    async fn list_containers(
        &self,
        request: Request<pb::ListContainersRequest>,
    ) -> Result<Response<pb::ListContainersResponse>, Status> {
        serve_or_forward!(
            self,
            request,
            list_containers_local,
            ContainerServiceClient,
            list_containers
        )
    }

    async fn delete_container(
        &self,
        request: Request<pb::DeleteContainerRequest>,
    ) -> Result<Response<pb::DeleteContainerResponse>, Status> {
        serve_or_forward!(
            self,
            request,
            delete_container_local,
            ContainerServiceClient,
            delete_container
        )
    }
}

#[tonic::async_trait]
impl VdiskService for Service {
    async fn create_vdisk(
        &self,
        request: Request<pb::CreateVdiskRequest>,
    ) -> Result<Response<pb::Vdisk>, Status> {
        serve_or_forward!(
            self,
            request,
            create_vdisk_local,
            VdiskServiceClient,
            create_vdisk
        )
    }

    async fn list_vdisks(
        &self,
        request: Request<pb::ListVdisksRequest>,
    ) -> Result<Response<pb::ListVdisksResponse>, Status> {
        serve_or_forward!(
            self,
            request,
            list_vdisks_local,
            VdiskServiceClient,
            list_vdisks
        )
    }

    async fn resize_vdisk(
        &self,
        request: Request<pb::ResizeVdiskRequest>,
    ) -> Result<Response<pb::Vdisk>, Status> {
        serve_or_forward!(
            self,
            request,
            resize_vdisk_local,
            VdiskServiceClient,
            resize_vdisk
        )
    }

    async fn delete_vdisk(
        &self,
        request: Request<pb::DeleteVdiskRequest>,
    ) -> Result<Response<pb::DeleteVdiskResponse>, Status> {
        serve_or_forward!(
            self,
            request,
            delete_vdisk_local,
            VdiskServiceClient,
            delete_vdisk
        )
    }
}

#[tonic::async_trait]
impl MetadataService for Service {
    async fn get(
        &self,
        request: Request<pb::MetaGetRequest>,
    ) -> Result<Response<pb::MetaGetResponse>, Status> {
        serve_or_forward!(self, request, meta_get_local, MetadataServiceClient, get)
    }

    async fn scan(
        &self,
        request: Request<pb::MetaScanRequest>,
    ) -> Result<Response<pb::MetaScanResponse>, Status> {
        let forwarded = request.metadata().contains_key(FORWARDED_KEY);
        let req = request.into_inner();
        let shards: Vec<GroupId> = if req.shard != 0 {
            if !self.0.shards.contains_key(&req.shard) {
                return Err(Status::invalid_argument(format!(
                    "no metadata shard {}",
                    req.shard
                )));
            }
            vec![req.shard]
        } else if vdisk_prefix_of(&req.prefix).is_some() {
            vec![self.shard_of(&req.prefix)?.group_id()]
        } else {
            self.0.shards.keys().copied().collect()
        };
        let mut entries = Vec::new();
        for shard in shards {
            let group = &self.0.shards[&shard];
            let scanned = match self.0.not_hosted(shard) {
                Some(elsewhere) => Err(elsewhere),
                None => group
                    .scan(&req.prefix, ReadConsistency::Linearizable)
                    .await
                    .map_err(|e| self.0.grp_err(e)),
            };
            match scanned {
                Ok(found) => entries.extend(found.into_iter().map(|(key, v)| pb::MetaEntry {
                    key,
                    value: Some(versioned_to_pb(v)),
                })),
                Err(e) => match e {
                    ServeError::NotLeader { leader_addr, .. } if !forwarded => {
                        let part = pb::MetaScanRequest {
                            prefix: req.prefix.clone(),
                            shard,
                        };
                        let found = self
                            .0
                            .forward(&leader_addr, part, |channel, r| async move {
                                MetadataServiceClient::new(channel).scan(r).await
                            })
                            .await?;
                        entries.extend(found.into_inner().entries);
                    }
                    e => return Err(e.into()),
                },
            }
        }
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Response::new(pb::MetaScanResponse { entries }))
    }

    async fn apply(
        &self,
        request: Request<pb::MetaApplyRequest>,
    ) -> Result<Response<pb::MetaApplyResponse>, Status> {
        serve_or_forward!(
            self,
            request,
            meta_apply_local,
            MetadataServiceClient,
            apply
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vdisk_keys_route_by_their_vdisk_prefix() {
        let k = b"v/00000000000000ab/x/\x00\x01";
        assert_eq!(routing_prefix(k), b"v/00000000000000ab/");
        assert_eq!(
            routing_prefix(b"v/00000000000000ab/"),
            b"v/00000000000000ab/"
        );
        // Not the vdisk form: upper case hex, short, other prefixes route by the whole key.
        assert_eq!(
            routing_prefix(b"v/00000000000000AB/x"),
            b"v/00000000000000AB/x"
        );
        assert_eq!(routing_prefix(b"v/12/x"), b"v/12/x");
        assert_eq!(routing_prefix(b"other"), b"other");
    }

    #[test]
    fn voter_counts_follow_cluster_size_and_fault_tolerance() {
        assert_eq!(voter_target(1, 1), 1);
        assert_eq!(voter_target(2, 1), 1);
        assert_eq!(voter_target(3, 1), 3);
        assert_eq!(voter_target(7, 1), 3);
        assert_eq!(voter_target(4, 2), 3);
        assert_eq!(voter_target(5, 2), 5);
    }

    #[test]
    fn vdisk_sizes_must_be_whole_mebibytes() {
        assert!(check_vdisk_size(4 << 30).is_ok());
        assert_eq!(
            check_vdisk_size(4097).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert!(check_vdisk_size(0).is_err());
    }
}
