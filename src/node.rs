//! `cairn node run`: one node — its control plane (raft groups, gRPC) and its data plane (a
//! pinned glommio executor per core, devices and vdisks owned by cores, NBD and iSCSI served to
//! hosts).
//!
//! Start-up: read the configuration (`--config`, else `DATA_DIR/node.toml`, else the embedded
//! default, written to `DATA_DIR/node.toml` so later runs reopen the same cluster); create and
//! format missing device files; start the control plane (`DATA_DIR/control`); a node that forms
//! the cluster (no `peers`, or the lowest founding id) creates it and, while it has no
//! containers, the `[[vdisk]]` entries; then start one executor per core. Device `i` is owned by
//! core `i % cores`. Vdisks are defined in the config store: every core follows the config view
//! ([`ControlPlaneHandle::watch_config`]), claims a new vdisk for this node when the device
//! chosen for it is one of its own (an [`Ownership`] record, compare-and-swap in the metadata
//! store, so exactly one node serves it), opens the vdisks it owns (recovering the oplog,
//! running the drain) and stops serving deleted ones. Block maps live in the Raft-replicated
//! metadata shards ([`ControlPlaneMetadata`]); a single node is the same code with one voter.
//! Cores that own devices listen on the NBD port (`SO_REUSEPORT`); core 0 alone serves iSCSI,
//! so the state shared by the sessions to a logical unit (reservations, COMPARE AND WRITE's
//! lock) is in one place. A connection for a vdisk of another core is served through the
//! cross-core mesh. SIGTERM or SIGINT stops accepting, lets accepted requests finish, checkpoints every
//! device and exits 0. Every acknowledged write is durable before its reply, so `kill -9`
//! loses nothing acknowledged.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use blockstore::health::{DeviceHealth, DiskAction, DiskState, DiskWatch, Monitored};
use blockstore::uring::{self, UringOptions};
use blockstore::{BlockStore, FormatOptions};
use clap::Args;
use controlplane::client::{Endpoints, MetadataClient};
use controlplane::config_store::VdiskRecord;
use controlplane::proto::v1 as pb;
use controlplane::server::{ConfigView, ControlPlane, ControlPlaneHandle, ControlPlaneOptions};
use dataplane::cache::ReadCache;
use dataplane::iscsi::scsi::StoreFuture;
use dataplane::mesh::{CoreTarget, Mesh, RemoteTarget};
use dataplane::metadata::{Expect, MetaError, MetaOp, MetadataStore};
use dataplane::nbd;
use dataplane::target::{ExportInfo, Exports};
use dataplane::vdisk::oplog::{OplogError, vdisk_of_egroup};
use dataplane::vdisk::{OpenError, Vdisk, VdiskConfig, purge};
use futures_lite::AsyncReadExt;
use glommio::{LocalExecutorBuilder, Placement};
use pb::cluster_service_client::ClusterServiceClient;
use pb::container_service_client::ContainerServiceClient;
use pb::vdisk_service_client::VdiskServiceClient;
use tokio::sync::watch;

use crate::config::{NODE_CONFIG_FILE, NodeConfig};
use crate::meta_store::ControlPlaneMetadata;
use crate::size::human;
use dataplane::replication::{
    HostLoad, Ownership, ReplicaCandidate, ReplicaHost, ReplicaSet, free_vdisk_egroups, op as rop,
    rank_replicas, reply, vdisk_bytes,
};
use dataplane::transport::tcp::{TcpConfig, TcpTransport};
use dataplane::transport::{ClusterTag, Message, Transport};

/// Arguments of `cairn node run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Data directory (created on first run with a single-node cluster).
    #[arg(long, default_value = "/var/lib/cairn")]
    pub data_dir: PathBuf,
    /// Node configuration file (TOML); default: DATA_DIR/node.toml, written on first run.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address the host frontends listen on.
    #[arg(long)]
    pub listen: Option<String>,
    /// NBD port.
    #[arg(long)]
    pub nbd_port: Option<u16>,
    /// iSCSI port.
    #[arg(long)]
    pub iscsi_port: Option<u16>,
    /// Control-plane (gRPC) port.
    #[arg(long)]
    pub grpc_port: Option<u16>,
    /// Data-plane (replication) port.
    #[arg(long)]
    pub data_port: Option<u16>,
    /// Data-plane executors (default: one per online CPU).
    #[arg(long)]
    pub cores: Option<usize>,
}

/// A device as the node uses it: io_uring, watched for errors and hung operations.
type Dev = Monitored<uring::UringDevice>;
type Store = BlockStore<Dev>;
type Disk = Vdisk<Dev, ControlPlaneMetadata>;
type Host = ReplicaHost<Dev, ControlPlaneMetadata>;

/// One device of a core, as its health watch sees it.
struct DiskSlot {
    /// Its file or block device.
    path: PathBuf,
    /// The health of the device handle in use.
    health: DeviceHealth,
    /// The offline / re-admission policy state.
    watch: DiskWatch,
}

/// A vdisk this node serves: name, id, owner core, size.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Export {
    name: String,
    id: u64,
    core: usize,
    size: u64,
}

/// The vdisks as one core's frontends see them (changes as the config store changes).
struct CoreExports {
    local: Rc<RefCell<HashMap<u64, Rc<Disk>>>>,
    all: RefCell<Vec<Export>>,
    mesh: dataplane::mesh::CoreMesh,
    /// Vdisks other nodes serve: name -> the owner's frontends (login redirects, NBD
    /// forwarding).
    remote: RefCell<HashMap<String, Frontends>>,
    /// The address connections to other nodes leave from.
    local_ip: Option<std::net::IpAddr>,
    /// The metadata store (iSCSI reservations are kept there).
    meta: Rc<ControlPlaneMetadata>,
}

/// A vdisk's SCSI persistent reservations in the metadata store (`v/<id>/pr`, under the
/// vdisk's prefix: replicated by raft, so they survive restarts and failover, and purged with
/// the vdisk).
struct VdiskReservations {
    meta: Rc<ControlPlaneMetadata>,
    key: Vec<u8>,
}

impl dataplane::iscsi::scsi::ReservationStore for VdiskReservations {
    fn load(&self) -> StoreFuture<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            let found = self.meta.get(&self.key).await.map_err(|e| e.to_string())?;
            Ok(found.map(|v| v.value))
        })
    }

    fn save(&self, state: Vec<u8>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let put = MetaOp::Put {
                key: self.key.clone(),
                value: state,
                expect: Expect::Any,
            };
            self.meta
                .apply(vec![put])
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

impl Exports for CoreExports {
    type Target = CoreTarget<Disk>;

    fn get(&self, name: &str) -> Option<Rc<Self::Target>> {
        let all = self.all.borrow();
        let e = if name.is_empty() {
            all.first()?
        } else {
            all.iter().find(|e| e.name == name)?
        };
        if let Some(vd) = self.local.borrow().get(&e.id) {
            return Some(Rc::new(CoreTarget::Local(vd.clone())));
        }
        let link = self.mesh.peer(e.core)?;
        Some(Rc::new(CoreTarget::Remote(RemoteTarget::new(
            e.id, e.size, link,
        ))))
    }

    fn iscsi_portal_of(&self, name: &str) -> Option<String> {
        self.remote.borrow().get(name).map(|f| f.iscsi.clone())
    }

    fn nbd_address_of(&self, name: &str) -> Option<String> {
        self.remote.borrow().get(name).map(|f| f.nbd.clone())
    }

    fn local_ip(&self) -> Option<std::net::IpAddr> {
        self.local_ip
    }

    fn reservation_store(
        &self,
        name: &str,
    ) -> Option<Rc<dyn dataplane::iscsi::scsi::ReservationStore>> {
        let id = self.all.borrow().iter().find(|e| e.name == name)?.id;
        let mut key = dataplane::vdisk::extents::vdisk_prefix(id);
        key.extend_from_slice(b"pr");
        Some(Rc::new(VdiskReservations {
            meta: self.meta.clone(),
            key,
        }))
    }

    fn served_elsewhere(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .remote
            .borrow()
            .iter()
            .map(|(n, f)| (n.clone(), f.iscsi.clone()))
            .collect();
        v.sort();
        v
    }

    fn list(&self) -> Vec<ExportInfo> {
        self.all
            .borrow()
            .iter()
            .map(|e| ExportInfo {
                name: e.name.clone(),
                description: format!("Cairn vdisk {}", e.name),
                size_bytes: e.size,
            })
            .collect()
    }
}

/// Loads or creates the configuration and applies command-line overrides.
fn configure(args: &RunArgs) -> Result<(NodeConfig, bool)> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    let default_file = args.data_dir.join(NODE_CONFIG_FILE);
    let (mut cfg, created) = match &args.config {
        Some(file) => (NodeConfig::load(file)?, false),
        None if default_file.exists() => (NodeConfig::load(&default_file)?, false),
        None => {
            let cfg = NodeConfig::embedded_default();
            std::fs::write(&default_file, cfg.to_toml())
                .with_context(|| format!("writing {}", default_file.display()))?;
            (cfg, true)
        }
    };
    if let Some(l) = &args.listen {
        cfg.listen = l.clone();
    }
    if let Some(p) = args.nbd_port {
        cfg.nbd_port = p;
    }
    if let Some(p) = args.iscsi_port {
        cfg.iscsi_port = p;
    }
    if let Some(p) = args.grpc_port {
        cfg.grpc_port = p;
    }
    if let Some(p) = args.data_port {
        cfg.data_port = p;
    }
    if let Some(c) = args.cores {
        cfg.cores = c;
    }
    cfg.validate()?;
    Ok((cfg, created))
}

/// Creates and formats device files that do not exist yet.
fn prepare_devices(cfg: &NodeConfig, data_dir: &Path) -> Result<()> {
    for (i, d) in cfg.devices.iter().enumerate() {
        let path = NodeConfig::resolve(data_dir, &d.path);
        if path.exists() {
            continue;
        }
        let Some(size) = d.size else {
            bail!(
                "device[{i}] {} does not exist and has no size to create it with",
                path.display()
            );
        };
        uring::create_file(&path, size.0)
            .with_context(|| format!("creating {}", path.display()))?;
        let tier = d.tier;
        let p = path.clone();
        crate::device_cmd::on_executor(async move || {
            let dev = uring::open(
                &p,
                UringOptions {
                    block_size: None,
                    tier: Some(tier),
                },
            )
            .await?;
            let opts = FormatOptions {
                tier: Some(tier),
                // 4 KiB slices: host blocks are 4 KiB, so oplog and extent writes never
                // read-modify-write a slice.
                slice_bytes: 4096,
                ..Default::default()
            };
            BlockStore::format(dev, &opts).await?.close().await?;
            Ok(())
        })
        .with_context(|| format!("formatting {}", path.display()))?;
        println!(
            "cairn node: created device {} ({}, {})",
            path.display(),
            d.tier,
            human(size.0)
        );
    }
    Ok(())
}

enum CoreEvent {
    Ready,
    Failed(usize, String),
    Stopped,
    /// A core now serves this vdisk.
    Serving(Export),
    /// A core stopped serving a vdisk deleted from the config store (extent groups freed).
    Removed(String, usize),
    /// A core's devices (capacity and usage for `cluster status`).
    Devices(usize, Vec<pb::DeviceInfo>),
}

/// How long the founder waits for the cluster's config leader and the seed vdisks.
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a data-plane metadata call keeps retrying a shard without a leader.
const METADATA_RETRY: Duration = Duration::from_secs(10);
/// How often a core looks at the config view for added and deleted vdisks.
const RECONCILE_INTERVAL: Duration = Duration::from_millis(500);
/// How long a starting core waits for every vdisk of the config to be placed and opened.
const STARTUP_SETTLE: Duration = Duration::from_secs(30);
/// How long the owner of a replicated vdisk must stay silent (no answer to pings on its data
/// port) before a replica takes the vdisk over.
const FAILOVER_AFTER: Duration = Duration::from_secs(3);
/// The id a cluster record's id string gives the transport's [`ClusterTag`]: a hash of it,
/// never 0 (which means "not known yet").
fn cluster_tag_id(cluster_id: &str) -> u64 {
    controlplane::ring::ring_hash(cluster_id.as_bytes()).max(1)
}

/// How long closing a vdisk waits for its drain to stop before leaving it behind.
const DRAIN_STOP_WAIT: Duration = Duration::from_secs(5);
/// How long a ping waits for its answer.
const PING_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a record must leave this node's copy of a vdisk out before the copy is freed: an
/// owner opening the vdisk records no replica until it has made them copies again, and the
/// stream that keeps this one starts only after the owner raised the epoch.
const SURPLUS_GRACE: Duration = Duration::from_secs(10);
/// How long a starting node waits for a vdisk's recorded replica to answer before it chooses
/// another (which would need the whole copy sent).
const RECORDED_REPLICA_GRACE: Duration = Duration::from_secs(10);
/// How often a core reports its devices' usage.
const DEVICE_REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// How long a starting node waits for its ports to be released by a node that just died.
const PORT_RELEASE_WAIT: Duration = Duration::from_secs(10);
/// Name of the cluster a founder creates.
const DEFAULT_CLUSTER_NAME: &str = "cairn";

/// Refuses to start when another process listens on one of the data-plane ports. The cores
/// bind them with `SO_REUSEPORT` (every core accepts NBD and iSCSI connections), which the
/// kernel would also grant a second process started with the same ports: it would silently get
/// a share of the hosts' connections, or of the replication traffic. A connection attempt
/// tells a live listener from connections of an earlier run still in TIME_WAIT (which a test
/// bind would trip over).
fn check_ports_free(cfg: &NodeConfig) -> Result<()> {
    for (what, port) in [
        ("NBD", cfg.nbd_port),
        ("iSCSI", cfg.iscsi_port),
        ("data", cfg.data_port),
    ] {
        let Some(mut addr) = (cfg.listen.as_str(), port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
        else {
            continue; // reported by the bind itself
        };
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        // A node killed a moment ago may still answer: io_uring tears a dead process's ring
        // down in a kernel worker, and the ring's pending accept keeps the listening socket
        // alive until then (seen after kill -9 on a loaded machine). A live process keeps
        // answering for the whole wait.
        let deadline = std::time::Instant::now() + PORT_RELEASE_WAIT;
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            if std::time::Instant::now() >= deadline {
                bail!(
                    "{what} port {addr} is taken by another process: is another node running \
                     with the same address and ports?"
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

/// `cairn node run`.
pub fn run(args: RunArgs) -> Result<()> {
    let (cfg, created) = configure(&args)?;
    check_ports_free(&cfg)?;
    let data_dir = args.data_dir.clone();
    prepare_devices(&cfg, &data_dir)?;
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cores = if cfg.cores == 0 { online } else { cfg.cores };

    let founders = cfg.founders()?;
    let listen: SocketAddr = (cfg.listen.as_str(), cfg.grpc_port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            anyhow!(
                "listen address {}:{} does not resolve",
                cfg.listen,
                cfg.grpc_port
            )
        })?;
    let mut options = ControlPlaneOptions::new(cfg.node_id, data_dir.join("control"));
    options.listen = listen;
    options.advertise = cfg.advertise.clone();
    options.peers = founders.clone();
    options.join = cfg.join;
    options.metadata_shards = cfg.metadata_shards;
    options.block = cfg.block.clone();
    options.rack = cfg.rack.clone();
    options.data_addr = cfg.data_addr();
    let cp = ControlPlane::start(options).context("starting the control plane")?;
    let control = cp.local_addr();
    let forms_cluster = !cfg.join && founders.keys().next().is_none_or(|&id| id == cfg.node_id);
    if forms_cluster {
        let seeded = cp
            .runtime()
            .block_on(bootstrap(&cfg, control, founders.len().max(1)))?;
        if created || !seeded.is_empty() {
            println!(
                "cairn node: created cluster '{DEFAULT_CLUSTER_NAME}' in {} with {}",
                data_dir.display(),
                if seeded.is_empty() {
                    "no vdisks".to_string()
                } else {
                    seeded.join(", ")
                }
            );
        }
        wait_for_vdisks(&cp, &seeded)?;
    }
    let meta = {
        let _in_runtime = cp.runtime().enter();
        let endpoints = Endpoints::new([control.to_string()])?.retry_for(METADATA_RETRY);
        ControlPlaneMetadata::new(MetadataClient::new(endpoints), cp.runtime().clone())
    };

    let links = Mesh::links(cores);
    let uuid_core: Arc<Mutex<HashMap<u128, usize>>> = Arc::default();
    let hints: HashMap<String, usize> = cfg
        .vdisks
        .iter()
        .map(|v| (v.name.clone(), v.device))
        .collect();
    let (events_tx, events_rx) = mpsc::channel::<CoreEvent>();
    let mut handles = Vec::new();
    for (core, link) in links.into_iter().enumerate() {
        // One socket pair per core carries SIGTERM/SIGINT into its executor.
        let (sig_rx, sig_tx) =
            std::os::unix::net::UnixStream::pair().context("signal socket pair")?;
        sig_rx.set_nonblocking(true)?;
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::low_level::pipe::register(sig, sig_tx.try_clone()?)
                .context("registering signals")?;
        }
        let ctx = CoreSetup {
            core,
            cores,
            cfg: cfg.clone(),
            data_dir: data_dir.clone(),
            meta: meta.clone(),
            view: cp.watch_config(),
            uuid_core: uuid_core.clone(),
            hints: hints.clone(),
        };
        let events = events_tx.clone();
        let placement = if cfg.pin_cores && core < online {
            Placement::Fixed(core)
        } else {
            Placement::Unbound
        };
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("cairn-core{core}"))
            .spawn(move || async move {
                let sig_fd = sig_rx.into_raw_fd();
                // SAFETY: the fd was just released by a UnixStream we own.
                let sig = unsafe { glommio::net::UnixStream::from_raw_fd(sig_fd) };
                if let Err(e) = run_core(ctx, link, sig, &events).await {
                    let _ = events.send(CoreEvent::Failed(core, format!("{e:#}")));
                }
                let _ = events.send(CoreEvent::Stopped);
            })
            .map_err(|e| anyhow!("starting executor for core {core}: {e}"))?;
        handles.push(handle);
    }
    drop(events_tx);

    let mut ready = 0;
    let mut failure = None;
    let mut stopped = 0;
    let mut devices: BTreeMap<usize, Vec<pb::DeviceInfo>> = BTreeMap::new();
    for ev in events_rx.iter() {
        match ev {
            CoreEvent::Ready => {
                ready += 1;
                if ready == cores {
                    println!(
                        "cairn node: node {} with {cores} cores, data in {}",
                        cfg.node_id,
                        data_dir.display()
                    );
                    println!("cairn node: control plane (gRPC) on {control}");
                    println!("cairn node: ready");
                }
            }
            CoreEvent::Serving(e) => {
                println!(
                    "cairn node: vdisk {} (id {}, {}) on core {}",
                    e.name,
                    e.id,
                    human(e.size),
                    e.core
                );
                println!(
                    "cairn node: NBD nbd://{}:{}/{}",
                    cfg.listen, cfg.nbd_port, e.name
                );
                println!(
                    "cairn node: iSCSI {}:{} iqn.2026-11.io.cairn:{}",
                    cfg.listen, cfg.iscsi_port, e.name
                );
            }
            CoreEvent::Removed(name, freed) => {
                println!(
                    "cairn node: vdisk {name} deleted from the cluster, no longer served \
                     ({freed} extent groups freed)"
                );
            }
            CoreEvent::Devices(core, infos) => {
                devices.insert(core, infos);
                cp.set_devices(devices.values().flatten().cloned().collect());
            }
            CoreEvent::Failed(core, e) => {
                eprintln!("cairn node: core {core} failed: {e}");
                failure.get_or_insert(e);
                // Bring the other cores down too.
                let _ = signal_hook::low_level::raise(signal_hook::consts::SIGTERM);
            }
            CoreEvent::Stopped => {
                stopped += 1;
                if stopped == cores {
                    break;
                }
            }
        }
    }
    for h in handles {
        let _ = h.join();
    }
    cp.shutdown();
    match failure {
        Some(e) => Err(anyhow!("node stopped after a failure: {e}")),
        None => {
            println!("cairn node: stopped cleanly");
            Ok(())
        }
    }
}

/// Creates the cluster (once) and, in a cluster without containers, the `[[vdisk]]` entries of
/// the node's configuration with their containers. Returns the vdisks it created.
async fn bootstrap(cfg: &NodeConfig, control: SocketAddr, founders: usize) -> Result<Vec<String>> {
    let eps = Endpoints::new([control.to_string()])?.retry_for(BOOTSTRAP_TIMEOUT);
    let req = pb::CreateClusterRequest {
        name: DEFAULT_CLUSTER_NAME.to_string(),
        nodes: Vec::new(),
        fault_tolerance: cfg.fault_tolerance,
    };
    match eps
        .call(|ch| {
            let req = req.clone();
            async move { ClusterServiceClient::new(ch).create_cluster(req).await }
        })
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::AlreadyExists => {}
        Err(s) => bail!("creating the cluster: {}", s.message()),
    }
    let containers = eps
        .call(|ch| async move {
            ContainerServiceClient::new(ch)
                .list_containers(pb::ListContainersRequest {})
                .await
        })
        .await
        .map_err(|s| anyhow!("listing containers: {}", s.message()))?
        .into_inner()
        .containers;
    if !containers.is_empty() {
        return Ok(Vec::new());
    }
    // A single node cannot keep a second copy: its containers are RF1.
    let rf = if founders >= 2 { 2 } else { 1 };
    let mut seeded = Vec::new();
    for v in &cfg.vdisks {
        let req = pb::CreateContainerRequest {
            name: v.container.clone(),
            settings: Some(pb::ContainerSettings {
                replication_factor: rf,
                ..Default::default()
            }),
        };
        match eps
            .call(|ch| {
                let req = req.clone();
                async move { ContainerServiceClient::new(ch).create_container(req).await }
            })
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::AlreadyExists => {}
            Err(s) => bail!("creating container {}: {}", v.container, s.message()),
        }
        let req = pb::CreateVdiskRequest {
            container: v.container.clone(),
            name: v.name.clone(),
            size_bytes: v.size.0,
        };
        match eps
            .call(|ch| {
                let req = req.clone();
                async move { VdiskServiceClient::new(ch).create_vdisk(req).await }
            })
            .await
        {
            Ok(_) => seeded.push(format!("{} ({})", v.name, human(v.size.0))),
            Err(s) if s.code() == tonic::Code::AlreadyExists => {}
            Err(s) => bail!("creating vdisk {}: {}", v.name, s.message()),
        }
    }
    Ok(seeded)
}

/// Waits until this node's config replica has applied the vdisks the founder just created, so
/// that the cores serve them from the start.
fn wait_for_vdisks(cp: &ControlPlaneHandle, seeded: &[String]) -> Result<()> {
    let deadline = std::time::Instant::now() + BOOTSTRAP_TIMEOUT;
    let rx = cp.watch_config();
    while rx.borrow().vdisks.len() < seeded.len() {
        if std::time::Instant::now() > deadline {
            bail!("the config store did not show the new vdisks within {BOOTSTRAP_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// What a core starts from.
struct CoreSetup {
    core: usize,
    cores: usize,
    cfg: NodeConfig,
    data_dir: PathBuf,
    meta: ControlPlaneMetadata,
    view: watch::Receiver<Arc<ConfigView>>,
    /// Device format uuid -> owning core, filled in by each core as it opens its devices.
    uuid_core: Arc<Mutex<HashMap<u128, usize>>>,
    /// Vdisk name -> device index from `[[vdisk]]` entries (where a new vdisk is placed).
    hints: HashMap<String, usize>,
}

/// One core's vdisks: follows the config store, claims and opens the vdisks placed on its
/// devices, and keeps the frontends' export list current.
struct CoreVdisks {
    setup: CoreSetup,
    meta: Rc<ControlPlaneMetadata>,
    cache: Rc<RefCell<ReadCache>>,
    /// Device uuid -> (device index, its block store); a device is reopened when it is
    /// re-admitted after being offline.
    stores: RefCell<HashMap<u128, (usize, Rc<Store>)>>,
    /// Device uuid -> its health watch.
    disks: RefCell<HashMap<u128, DiskSlot>>,
    /// Vdisk id -> the device it is served from (here).
    served_on: RefCell<HashMap<u64, u128>>,
    /// The config version whose deleted vdisks were last swept from the devices.
    swept: Cell<Option<u64>>,
    exports: Rc<CoreExports>,
    /// Ownership records of the unreplicated vdisks (they change only when a vdisk is deleted).
    owners: RefCell<HashMap<u64, (Ownership, u64)>>,
    /// This core's connections to the other nodes' data ports.
    transport: Rc<TcpTransport>,
    /// The cluster this node's transport and data port name in their hellos (set from the
    /// config once the cluster record is known).
    cluster: ClusterTag,
    /// Data addresses given to `transport`.
    peer_addrs: RefCell<HashMap<u64, SocketAddr>>,
    /// The replica side (core 0 only): copies of other nodes' vdisks on this core's first
    /// device, served on the data port.
    host: Option<Rc<Host>>,
    /// Replica sets of the replicated vdisks this core serves.
    mirrors: RefCell<HashMap<u64, Rc<ReplicaSet<TcpTransport>>>>,
    /// Since when the owner of a vdisk this node holds a replica of has not answered.
    owner_silent: RefCell<HashMap<u64, std::time::Instant>>,
    /// Other nodes' frontend addresses, as they published them, and when they were read.
    portals: RefCell<HashMap<u64, (Frontends, std::time::Instant)>>,
    /// Whether this node's own portal is published (core 0 publishes it).
    published: Cell<bool>,
    /// Drain and scrub loops of the open vdisks.
    drains: RefCell<HashMap<u64, glommio::Task<()>>>,
    /// When this core started (a replica recorded for a vdisk is waited for while the node is
    /// starting: the whole cluster may be starting).
    started: std::time::Instant,
    /// Vdisks whose record does not count this node's copy: since which epoch and when it was
    /// first seen so ([`SURPLUS_GRACE`]).
    surplus_since: RefCell<HashMap<u64, (u64, std::time::Instant)>>,
    /// Problems already reported (vdisk id -> message), so a retry does not flood the log.
    reported: RefCell<HashMap<u64, String>>,
    stopping: Cell<bool>,
}

impl CoreVdisks {
    fn report(&self, id: u64, msg: String) {
        if self.reported.borrow().get(&id) != Some(&msg) {
            eprintln!("cairn node: core {}: {msg}", self.setup.core);
            self.reported.borrow_mut().insert(id, msg);
        }
    }

    /// Who serves vdisk `v`, with the record's version: the recorded owner, or this node if the
    /// device chosen for it is on this core and the claim wins. `None`: not decided yet
    /// (another core's device, or a claim that lost a race and is read back on the next pass).
    /// Records of replicated vdisks are read afresh every time (owners and epochs change).
    async fn owner(&self, v: &VdiskRecord, replicated: bool) -> Result<Option<(Ownership, u64)>> {
        if !replicated && let Some(o) = self.owners.borrow().get(&v.vdisk_id) {
            return Ok(Some(o.clone()));
        }
        let key = Ownership::key(v.vdisk_id);
        if let Some(found) = self.meta.get(&key).await? {
            let o =
                Ownership::decode(&found.value).map_err(|e| anyhow!("vdisk {}: {e}", v.name))?;
            if !replicated {
                self.owners
                    .borrow_mut()
                    .insert(v.vdisk_id, (o.clone(), found.version));
            }
            return Ok(Some((o, found.version)));
        }
        let devices = self.setup.cfg.devices.len();
        let index = self
            .setup
            .hints
            .get(&v.name)
            .copied()
            .filter(|&i| i < devices)
            .unwrap_or((v.vdisk_id % devices as u64) as usize);
        let found = self
            .stores
            .borrow()
            .iter()
            .find(|(_, (i, _))| *i == index)
            .map(|(&uuid, _)| uuid);
        let Some(uuid) = found.filter(|&uuid| self.online_store(uuid).is_some()) else {
            return Ok(None);
        };
        let claim = Ownership {
            node_id: self.setup.cfg.node_id,
            device_uuid: uuid,
            epoch: 1,
            replicas: Vec::new(),
        };
        match self
            .meta
            .apply(vec![MetaOp::Put {
                key,
                value: claim.encode(),
                expect: Expect::Absent,
            }])
            .await
        {
            Ok(version) => {
                if !replicated {
                    self.owners
                        .borrow_mut()
                        .insert(v.vdisk_id, (claim.clone(), version));
                }
                Ok(Some((claim, version)))
            }
            Err(MetaError::Conflict { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn open(&self, v: &VdiskRecord, store: Rc<Store>) -> Result<()> {
        let device = store.superblock().uuid;
        let vd = self.open_vdisk(v, store).await?;
        self.serve(v.vdisk_id, device, vd);
        Ok(())
    }

    async fn open_vdisk(&self, v: &VdiskRecord, store: Rc<Store>) -> Result<Rc<Disk>> {
        let vcfg = VdiskConfig {
            oplog_cap_bytes: self.setup.cfg.oplog_cap.0,
            drain_delay: Duration::from_millis(self.setup.cfg.drain_delay_ms),
            ..VdiskConfig::new(v.vdisk_id, &v.name, v.size_bytes)
        };
        Vdisk::open(store, self.meta.clone(), self.cache.clone(), vcfg)
            .await
            .with_context(|| format!("opening vdisk {}", v.name))
    }

    /// Starts the drain and the scrub of an opened vdisk (on device `device`) and exports it.
    fn serve(&self, id: u64, device: u128, vd: Rc<Disk>) {
        self.served_on.borrow_mut().insert(id, device);
        let cfg = &self.setup.cfg;
        let scrub = vd.clone().scrub_loop(
            cfg.scrub_rate.0,
            Duration::from_secs(cfg.scrub_interval_secs),
        );
        let drain = vd.clone().drain_loop();
        let drain = glommio::spawn_local(async move {
            futures_lite::future::zip(drain, scrub).await;
        });
        self.drains.borrow_mut().insert(id, drain);
        if self.stopping.get() {
            vd.stop();
        }
        self.exports.local.borrow_mut().insert(id, vd);
    }

    /// Opens a replicated vdisk this node owns (`rec`, at `version`): recovers it from the
    /// local device, chooses its replicas, raises the epoch with no replica recorded, makes each
    /// replica a whole copy (compared where the replica kept one: [`Vdisk::set_mirror`]), then
    /// records them. The record names only complete copies, so a takeover never starts from a
    /// partial one.
    ///
    /// Recovery comes first, while the record still names the replicas: a local oplog that
    /// refuses to open because an acknowledged batch is damaged ([`OplogError::Corrupt`]) has
    /// good copies on the replicas, so the vdisk is released to them (as when a disk goes
    /// offline) rather than the record dropping them and their copies being freed as surplus.
    async fn open_replicated(
        &self,
        v: &VdiskRecord,
        store: Rc<Store>,
        rec: Ownership,
        version: u64,
        rf: usize,
        view: &ConfigView,
    ) -> Result<()> {
        let id = v.vdisk_id;
        let vd = match self.open_vdisk(v, store).await {
            Ok(vd) => vd,
            Err(e) => {
                let damaged = e.chain().any(|c| {
                    matches!(
                        c.downcast_ref::<OpenError>(),
                        Some(OpenError::Oplog(OplogError::Corrupt { .. }))
                    )
                });
                if damaged {
                    let why = format!("{e:#}");
                    self.release_to_replicas(id, &v.name, rec.device_uuid, &why)
                        .await;
                }
                return Err(e);
            }
        };
        let key = Ownership::key(id);
        let mut own = Ownership {
            replicas: Vec::new(),
            epoch: rec.epoch + 1,
            ..rec.clone()
        };
        let raised = async {
            let peers = self.choose_replicas(id, &rec, rf - 1, view).await?;
            let copying = self
                .meta
                .apply(vec![MetaOp::Put {
                    key: key.clone(),
                    value: own.encode(),
                    expect: Expect::Version(version),
                }])
                .await
                .with_context(|| format!("vdisk {}: raising the ownership epoch", v.name))?;
            anyhow::Ok((peers, copying))
        };
        let (peers, copying) = match raised.await {
            Ok(r) => r,
            Err(e) => {
                vd.stop();
                return Err(e);
            }
        };
        let set = ReplicaSet::new(self.transport.clone(), id, own.epoch, peers.clone());
        let copied = vd.set_mirror(set.mirror()).await;
        let (copied, batches) = match copied {
            Ok(c) => c,
            Err(e) => {
                vd.stop();
                bail!("vdisk {}: making replicas on nodes {peers:?}: {e}", v.name);
            }
        };
        own.replicas = peers.clone();
        self.meta
            .apply(vec![MetaOp::Put {
                key,
                value: own.encode(),
                expect: Expect::Version(copying),
            }])
            .await
            .with_context(|| format!("vdisk {}: recording its replicas", v.name))?;
        println!(
            "cairn node: vdisk {} replicated to nodes {peers:?} at epoch {} ({} sent, {} already \
             in place, and {batches} oplog batches copied)",
            v.name,
            own.epoch,
            human(copied.sent),
            human(copied.in_place)
        );
        self.mirrors.borrow_mut().insert(id, set);
        // Where its data is, for a purge when it is deleted.
        let device = own.device_uuid;
        self.owners.borrow_mut().insert(id, (own, version));
        self.serve(id, device, vd);
        Ok(())
    }

    /// `want` live nodes other than this one for the replicas of `vdisk`, none sharing a block
    /// or rack with this node or each other (as far as nodes name them). The current replicas
    /// come first, then the nearest by ping round trip, then an order by a hash of (vdisk,
    /// node), which spreads vdisks evenly.
    async fn choose_replicas(
        &self,
        vdisk: u64,
        rec: &Ownership,
        want: usize,
        view: &ConfigView,
    ) -> Result<Vec<u64>> {
        let me = self.setup.cfg.node_id;
        let domain = |id: u64| {
            view.nodes
                .iter()
                .find(|n| n.record.node_id == id)
                .map(|n| (n.record.block.clone(), n.record.rack.clone()))
                .unwrap_or_default()
        };
        let candidates: Vec<u64> = view
            .nodes
            .iter()
            .filter(|n| n.record.node_id != me && !n.record.data_addr.is_empty())
            .map(|n| n.record.node_id)
            .collect();
        // Ping them all at once: the live ones, with their round-trip times, load and room.
        // While this node is starting, a recorded replica that does not answer yet may be
        // starting with it (the whole cluster restarts): it is waited for a little, since it
        // keeps its copy, which is then compared rather than sent again.
        let deadline = std::time::Instant::now()
            + if self.started.elapsed() < STARTUP_SETTLE {
                RECORDED_REPLICA_GRACE
            } else {
                Duration::ZERO
            };
        let live = loop {
            let pings = candidates.iter().map(|&node| async move {
                let start = std::time::Instant::now();
                let load = self.ping_load(node).await?;
                Some(ReplicaCandidate {
                    node,
                    rtt: start.elapsed(),
                    load,
                })
            });
            let live: Vec<ReplicaCandidate> = futures_util::future::join_all(pings)
                .await
                .into_iter()
                .flatten()
                .collect();
            let awaited = rec
                .replicas
                .iter()
                .any(|r| candidates.contains(r) && !live.iter().any(|c| c.node == *r));
            if !awaited || std::time::Instant::now() >= deadline {
                break live;
            }
            glommio::timer::sleep(PING_TIMEOUT).await;
        };
        let need = self
            .online_store(rec.device_uuid)
            .map_or(0, |store| vdisk_bytes(&store, vdisk));
        let ranked = rank_replicas(vdisk, &rec.replicas, need, &live);
        let mut taken = vec![domain(me)];
        let mut chosen = Vec::new();
        for n in ranked {
            if chosen.len() == want {
                break;
            }
            let (block, rack) = domain(n);
            let clash = taken.iter().any(|(b, r)| {
                (!block.is_empty() && *b == block) || (!rack.is_empty() && *r == rack)
            });
            if clash {
                continue;
            }
            taken.push((block, rack));
            chosen.push(n);
        }
        if chosen.len() < want {
            bail!(
                "vdisk {vdisk} needs {want} replica node(s) in other failure domains; {} \
                 answered",
                chosen.len()
            );
        }
        Ok(chosen)
    }

    /// Whether `node` answers a ping on its data port.
    async fn ping(&self, node: u64) -> bool {
        self.ping_load(node).await.is_some()
    }

    /// `node`'s answer to a ping on its data port: what it says of its replica device (`None`
    /// inside: nothing, an older node); `None`: no answer in time, or its device is offline.
    async fn ping_load(&self, node: u64) -> Option<Option<HostLoad>> {
        let call = self.transport.call(
            node,
            Message {
                op: rop::PING,
                ..Message::default()
            },
        );
        let limit = async {
            glommio::timer::sleep(PING_TIMEOUT).await;
            Err(dataplane::transport::TransportError::Shutdown)
        };
        match futures_lite::future::or(call, limit).await {
            Ok(r) if r.op == reply::OK => Some(HostLoad::decode(&r.payload)),
            _ => None,
        }
    }

    /// A replica's watch over the owner of `id`: true once the owner has not answered for
    /// [`FAILOVER_AFTER`].
    async fn owner_gone(&self, id: u64, owner: u64) -> bool {
        if self.ping(owner).await {
            self.owner_silent.borrow_mut().remove(&id);
            return false;
        }
        let since = *self
            .owner_silent
            .borrow_mut()
            .entry(id)
            .or_insert_with(std::time::Instant::now);
        since.elapsed() >= FAILOVER_AFTER
    }

    /// Takes vdisk `v` over from its silent owner (`rec` at `version`): compare-and-swap of the
    /// record to this node and its replica device at the next epoch, which fences the old owner
    /// (the replicas refuse its epoch); then the replica stops taking changes. The next pass
    /// opens the vdisk from the replica, replaying its oplog. Returns whether the swap won.
    async fn take_over(&self, v: &VdiskRecord, rec: &Ownership, version: u64) -> Result<bool> {
        let Some(host) = &self.host else {
            return Ok(false);
        };
        let me = self.setup.cfg.node_id;
        let new = Ownership {
            node_id: me,
            device_uuid: host.store().superblock().uuid,
            epoch: rec.epoch + 1,
            replicas: rec.replicas.iter().copied().filter(|&r| r != me).collect(),
        };
        let swapped = self
            .meta
            .apply(vec![MetaOp::Put {
                key: Ownership::key(v.vdisk_id),
                value: new.encode(),
                expect: Expect::Version(version),
            }])
            .await;
        match swapped {
            Ok(_) => {
                host.take_over(v.vdisk_id, new.epoch).await;
                self.owner_silent.borrow_mut().remove(&v.vdisk_id);
                if rec.node_id == 0 {
                    println!(
                        "cairn node: node {me} takes vdisk {} over (released by its owner, whose \
                         disk is offline), epoch {}",
                        v.name, new.epoch
                    );
                } else {
                    println!(
                        "cairn node: node {me} takes vdisk {} over from node {} (silent for \
                         {:?}), epoch {}",
                        v.name, rec.node_id, FAILOVER_AFTER, new.epoch
                    );
                }
                Ok(true)
            }
            Err(MetaError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Stops serving vdisk `id` (deleted, fenced, failed or owned by another node now): no new
    /// requests, drain stopped.
    async fn close(&self, id: u64) -> Option<Rc<Disk>> {
        let vd = self.exports.local.borrow_mut().remove(&id)?;
        vd.stop();
        // Writers still waiting on it (for a commit or for oplog space) fail now.
        vd.oplog().close();
        let drain = self.drains.borrow_mut().remove(&id);
        if let Some(drain) = drain {
            // A drain waiting on a stuck device (the reason it went offline) never ends; it is
            // left behind rather than cancelled (an I/O the kernel still owns cannot be taken
            // back: cancelling it would block the core until the device answers), and ends
            // itself if the device ever does.
            let stuck = async {
                glommio::timer::sleep(DRAIN_STOP_WAIT).await;
                true
            };
            // Detached: dropping a glommio task would cancel it.
            let drain = drain.detach();
            let stopped = async {
                drain.await;
                false
            };
            if futures_lite::future::or(stopped, stuck).await {
                eprintln!(
                    "cairn node: vdisk {id}: its drain did not stop within {} s (an I/O on its \
                     device is stuck); left behind",
                    DRAIN_STOP_WAIT.as_secs()
                );
            }
        }
        self.mirrors.borrow_mut().remove(&id);
        self.served_on.borrow_mut().remove(&id);
        Some(vd)
    }

    /// Frees what deleted vdisks left on this core's devices: extent groups (and metadata
    /// keys) of vdisk ids the config counted (`view.last_vdisk_id`, read before its vdisks)
    /// but no longer has: vdisks deleted while this node was down, or whose purge stopped
    /// part-way. Once per config version.
    async fn sweep_orphans(&self, view: &ConfigView) {
        if self.swept.get() == Some(view.version) || view.last_vdisk_id == 0 {
            return;
        }
        self.swept.set(Some(view.version));
        let live: std::collections::HashSet<u64> =
            view.vdisks.iter().map(|s| s.record.vdisk_id).collect();
        let stores: Vec<u128> = self.stores.borrow().keys().copied().collect();
        for uuid in stores {
            let Some(store) = self.online_store(uuid) else {
                continue;
            };
            let orphans: std::collections::BTreeSet<u64> = store
                .egroups()
                .iter()
                .map(|e| vdisk_of_egroup(e.egid))
                .filter(|id| *id <= view.last_vdisk_id && !live.contains(id))
                .collect();
            for id in orphans {
                if self.exports.local.borrow().contains_key(&id) {
                    continue; // still being stopped: the deleted-vdisk path purges it
                }
                match purge(&store, &*self.meta, id).await {
                    Ok(n) => println!(
                        "cairn node: {n} extent groups of deleted vdisk {id} freed on {}",
                        self.disk_path(uuid)
                    ),
                    Err(e) => self.report(id, format!("freeing deleted vdisk {id}: {e}")),
                }
            }
        }
    }

    /// The block store of device `uuid` if this core has it and it is online.
    fn online_store(&self, uuid: u128) -> Option<Rc<Store>> {
        let offline = self
            .disks
            .borrow()
            .get(&uuid)
            .is_some_and(|d| !matches!(d.watch.state(), DiskState::Online));
        if offline {
            return None;
        }
        self.stores.borrow().get(&uuid).map(|(_, s)| s.clone())
    }

    /// Looks at the health of this core's devices: takes a failing one offline, validates and
    /// re-admits one that has rested. Returns whether any device changed state.
    async fn check_disks(&self) -> bool {
        let uuids: Vec<u128> = self.disks.borrow().keys().copied().collect();
        let mut changed = false;
        for uuid in uuids {
            let action = {
                let mut disks = self.disks.borrow_mut();
                let Some(d) = disks.get_mut(&uuid) else {
                    continue;
                };
                let health = d.health.clone();
                d.watch.check(std::time::Instant::now(), &health)
            };
            let action = match action {
                Some(DiskAction::Validate) => {
                    changed = true;
                    self.readmit(uuid).await
                }
                other => other,
            };
            if let Some(DiskAction::TakeOffline {
                reason,
                events,
                retired,
            }) = action
            {
                changed = true;
                self.disk_offline(uuid, &reason, events, retired).await;
            }
        }
        changed
    }

    fn disk_path(&self, uuid: u128) -> String {
        self.disks
            .borrow()
            .get(&uuid)
            .map(|d| d.path.display().to_string())
            .unwrap_or_else(|| format!("{uuid:032x}"))
    }

    /// Device `uuid` went offline: nothing touches it any more. The vdisks served from it stop;
    /// those with replicas are released to them (ownership record without an owner, at the
    /// next epoch, which also fences anything of this node still in flight), so a replica
    /// takes each over at once. Replicas kept on it refuse their owners, which choose others.
    async fn disk_offline(&self, uuid: u128, reason: &str, events: u32, retired: bool) {
        let path = self.disk_path(uuid);
        let next = if retired {
            "it stays offline until an operator replaces it".to_string()
        } else {
            format!(
                "it is validated for re-admission in {} s",
                self.setup.cfg.disk_readmit_after_secs
            )
        };
        eprintln!(
            "cairn node: disk {path} is offline ({events} time(s) within the last hour; {next}): \
             {reason}"
        );
        if let Some(host) = &self.host
            && host.store().superblock().uuid == uuid
        {
            host.set_offline();
        }
        let served: Vec<u64> = self
            .served_on
            .borrow()
            .iter()
            .filter(|(_, d)| **d == uuid)
            .map(|(id, _)| *id)
            .collect();
        for id in served {
            let name = match self.close(id).await {
                Some(vd) => vd.config().name.clone(),
                None => id.to_string(),
            };
            let why = format!("disk {path} is offline");
            self.release_to_replicas(id, &name, uuid, &why).await;
        }
    }

    /// Releases vdisk `id`, served here from device `uuid`, to its replicas: its ownership
    /// record without an owner, at the next epoch (which also fences anything of this node
    /// still in flight), so that a replica takes it over at once ([`Self::claim_released`]).
    /// Nothing happens if the record names another owner or device, or no replica.
    async fn release_to_replicas(&self, id: u64, name: &str, uuid: u128, why: &str) {
        let me = self.setup.cfg.node_id;
        let key = Ownership::key(id);
        let Ok(Some(found)) = self.meta.get(&key).await else {
            return;
        };
        let Ok(rec) = Ownership::decode(&found.value) else {
            return;
        };
        if rec.node_id != me || rec.device_uuid != uuid || rec.replicas.is_empty() {
            return; // not ours on this device, or no copy elsewhere to serve it
        }
        let released = Ownership {
            node_id: 0,
            epoch: rec.epoch + 1,
            ..rec.clone()
        };
        let put = MetaOp::Put {
            key,
            value: released.encode(),
            expect: Expect::Version(found.version),
        };
        match self.meta.apply(vec![put]).await {
            Ok(_) => println!(
                "cairn node: vdisk {name} released to its replicas {:?} at epoch {} ({why})",
                rec.replicas, released.epoch
            ),
            Err(e) => self.report(id, format!("vdisk {name}: releasing it: {e}")),
        }
    }

    /// Validates offline device `uuid` (a fresh handle: fsck of its superblocks, checkpoint and
    /// journal, then a full reopen with recovery and a flush) and puts it back in service, or
    /// counts the failure as another offline event.
    async fn readmit(&self, uuid: u128) -> Option<DiskAction> {
        let path = self.disks.borrow().get(&uuid)?.path.clone();
        let validated = validate_disk(uuid, &path).await;
        let now = std::time::Instant::now();
        let mut disks = self.disks.borrow_mut();
        let d = disks.get_mut(&uuid)?;
        match validated {
            Ok((store, health, summary)) => {
                d.health = health.clone();
                let next = d.watch.validated(now, &health, Ok(()));
                drop(disks);
                if let Some(slot) = self.stores.borrow_mut().get_mut(&uuid) {
                    slot.1 = store.clone();
                }
                if let Some(host) = &self.host
                    && host.store().superblock().uuid == uuid
                {
                    host.readmit(store);
                }
                println!(
                    "cairn node: disk {} re-admitted after validation ({summary})",
                    path.display()
                );
                next
            }
            Err(why) => {
                let health = d.health.clone();
                d.watch.validated(now, &health, Err(why))
            }
        }
    }

    /// A vdisk whose owner released it (its disk went offline): a replica here takes it over at
    /// once. The node holding the released device takes it back once the device is online
    /// again, if no replica took it within twice [`FAILOVER_AFTER`] (or it has none): nothing
    /// was acknowledged after the release, so its copy is as new as any. Returns whether the
    /// record changed.
    async fn claim_released(&self, v: &VdiskRecord, rec: &Ownership, version: u64) -> bool {
        let me = self.setup.cfg.node_id;
        let host_online = self.host.as_ref().is_some_and(|h| !h.is_offline());
        if rec.replicas.contains(&me) && host_online {
            return match self.take_over(v, rec, version).await {
                Ok(won) => won,
                Err(e) => {
                    self.report(v.vdisk_id, format!("vdisk {}: {e:#}", v.name));
                    false
                }
            };
        }
        if self.online_store(rec.device_uuid).is_none() {
            return false;
        }
        let since = *self
            .owner_silent
            .borrow_mut()
            .entry(v.vdisk_id)
            .or_insert_with(std::time::Instant::now);
        if !rec.replicas.is_empty() && since.elapsed() < FAILOVER_AFTER * 2 {
            return false;
        }
        let back = Ownership {
            node_id: me,
            epoch: rec.epoch + 1,
            ..rec.clone()
        };
        let put = MetaOp::Put {
            key: Ownership::key(v.vdisk_id),
            value: back.encode(),
            expect: Expect::Version(version),
        };
        match self.meta.apply(vec![put]).await {
            Ok(_) => {
                self.owner_silent.borrow_mut().remove(&v.vdisk_id);
                println!(
                    "cairn node: node {me} takes vdisk {} back on its re-admitted disk, epoch {}",
                    v.name, back.epoch
                );
                true
            }
            Err(e) => {
                self.report(v.vdisk_id, format!("vdisk {}: taking it back: {e}", v.name));
                false
            }
        }
    }

    /// Publishes this node's iSCSI portal in the metadata store (core 0, once), so that other
    /// nodes can redirect initiators of the vdisks served here.
    async fn publish_portal(&self) {
        if self.setup.core != 0 || self.published.get() {
            return;
        }
        let mine = Frontends {
            iscsi: self.setup.cfg.iscsi_addr(),
            nbd: self.setup.cfg.nbd_addr(),
        };
        let put = MetaOp::Put {
            key: portal_key(self.setup.cfg.node_id),
            value: mine.encode(),
            expect: Expect::Any,
        };
        match self.meta.apply(vec![put]).await {
            Ok(_) => self.published.set(true),
            Err(e) => self.report(0, format!("publishing the iSCSI portal: {e}")),
        }
    }

    /// The frontend addresses node `node` published (re-read every 30 s).
    async fn portal_of(&self, node: u64) -> Option<Frontends> {
        if let Some((p, at)) = self.portals.borrow().get(&node)
            && at.elapsed() < Duration::from_secs(30)
        {
            return Some(p.clone());
        }
        let found = self.meta.get(&portal_key(node)).await.ok()??;
        let portal = Frontends::decode(&found.value)?;
        self.portals
            .borrow_mut()
            .insert(node, (portal.clone(), std::time::Instant::now()));
        Some(portal)
    }

    /// Gives `transport` the data addresses of the nodes in `view`.
    fn update_peers(&self, view: &ConfigView) {
        if let Some(c) = &view.cluster {
            self.cluster.set(cluster_tag_id(&c.cluster_id));
        }
        for n in &view.nodes {
            let r = &n.record;
            let Ok(addr) = r.data_addr.parse::<SocketAddr>() else {
                continue;
            };
            if self.peer_addrs.borrow().get(&r.node_id) != Some(&addr) {
                self.transport.set_peer(r.node_id, addr);
                self.peer_addrs.borrow_mut().insert(r.node_id, addr);
            }
        }
    }

    /// Brings the served vdisks in line with `view`. Returns whether everything was decided.
    async fn reconcile(&self, view: &ConfigView, events: &mpsc::Sender<CoreEvent>) -> bool {
        let me = self.setup.cfg.node_id;
        self.update_peers(view);
        self.publish_portal().await;
        let mut complete = true;
        let mut all = Vec::new();
        let mut remote = HashMap::new();
        // Vdisks deleted from the config are never looked at again.
        self.surplus_since
            .borrow_mut()
            .retain(|id, _| view.vdisks.iter().any(|s| s.record.vdisk_id == *id));
        for s in &view.vdisks {
            let v = &s.record;
            let rf = view
                .containers
                .iter()
                .find(|c| c.record.name == v.container)
                .map_or(1, |c| c.record.settings.replication_factor as usize);
            let replicated = rf >= 2;
            let (owner, version) = match self.owner(v, replicated).await {
                Ok(Some(o)) => o,
                Ok(None) => {
                    complete = false;
                    continue;
                }
                Err(e) => {
                    self.report(v.vdisk_id, format!("vdisk {}: {e:#}", v.name));
                    complete = false;
                    continue;
                }
            };
            if owner.node_id == 0 {
                // Released by an owner whose disk went offline.
                if self.claim_released(v, &owner, version).await {
                    complete = false;
                }
                continue;
            }
            if owner.node_id != me {
                if let Some(portal) = self.portal_of(owner.node_id).await {
                    remote.insert(v.name.clone(), portal);
                }
                if self.close(v.vdisk_id).await.is_some() {
                    println!(
                        "cairn node: vdisk {} is served by node {} now (epoch {}); stopped \
                         serving it",
                        v.name, owner.node_id, owner.epoch
                    );
                }
                // A copy here that the record no longer counts (this node owned or held the
                // vdisk before it moved on): free it, once the record has said so for a while.
                // While an owner makes its replicas anew, its record names none until the copy
                // is done, and the stream that keeps this copy may not have begun yet.
                let surplus = replicated && !owner.replicas.contains(&me);
                let surplus_for = if surplus {
                    let now = std::time::Instant::now();
                    let mut seen = self.surplus_since.borrow_mut();
                    let since = seen.entry(v.vdisk_id).or_insert((owner.epoch, now));
                    if since.0 != owner.epoch {
                        *since = (owner.epoch, now);
                    }
                    now - since.1
                } else {
                    self.surplus_since.borrow_mut().remove(&v.vdisk_id);
                    Duration::ZERO
                };
                if let Some(host) = self.host.as_ref().filter(|h| !h.is_offline())
                    && surplus
                    && surplus_for >= SURPLUS_GRACE
                {
                    match host.trim_surplus(v.vdisk_id).await {
                        Ok(0) => {}
                        Ok(n) => println!(
                            "cairn node: vdisk {}: {n} extent groups freed (node {me} no longer \
                             holds a copy; node {} owns it at epoch {})",
                            v.name, owner.node_id, owner.epoch
                        ),
                        Err(e) => self.report(
                            v.vdisk_id,
                            format!("vdisk {}: freeing a surplus copy: {e}", v.name),
                        ),
                    }
                }
                if replicated
                    && self.host.as_ref().is_some_and(|h| !h.is_offline())
                    && owner.replicas.contains(&me)
                    && self.owner_gone(v.vdisk_id, owner.node_id).await
                {
                    match self.take_over(v, &owner, version).await {
                        Ok(_) => complete = false, // opened on the next pass
                        Err(e) => self.report(v.vdisk_id, format!("vdisk {}: {e:#}", v.name)),
                    }
                }
                continue; // served by another node
            }
            // Served here, but its replicas refused it or its oplog failed: close it and open
            // it again (new epoch, replicas chosen again) on the next pass.
            let broken = self
                .exports
                .local
                .borrow()
                .get(&v.vdisk_id)
                .is_some_and(|vd| vd.oplog().is_failed())
                || self
                    .mirrors
                    .borrow()
                    .get(&v.vdisk_id)
                    .is_some_and(|m| m.is_fenced());
            if broken {
                self.close(v.vdisk_id).await;
                self.report(
                    v.vdisk_id,
                    format!(
                        "vdisk {} lost a replica or its oplog failed; reopening it",
                        v.name
                    ),
                );
                complete = false;
                continue;
            }
            let core = self
                .setup
                .uuid_core
                .lock()
                .ok()
                .and_then(|m| m.get(&owner.device_uuid).copied());
            let Some(core) = core else {
                self.report(
                    v.vdisk_id,
                    format!(
                        "vdisk {} is placed on device {:032x}, which this node does not have",
                        v.name, owner.device_uuid
                    ),
                );
                complete = false;
                continue;
            };
            let export = Export {
                name: v.name.clone(),
                id: v.vdisk_id,
                core,
                size: v.size_bytes,
            };
            if core == self.setup.core && !self.exports.local.borrow().contains_key(&v.vdisk_id) {
                let Some(store) = self.online_store(owner.device_uuid) else {
                    self.report(
                        v.vdisk_id,
                        format!(
                            "vdisk {} is not served: its device {:032x} is offline",
                            v.name, owner.device_uuid
                        ),
                    );
                    complete = false;
                    continue;
                };
                let opened = if replicated {
                    self.open_replicated(v, store.clone(), owner, version, rf, view)
                        .await
                } else {
                    self.open(v, store.clone()).await
                };
                if let Err(e) = opened {
                    self.report(v.vdisk_id, format!("{e:#}"));
                    complete = false;
                    continue;
                }
                self.reported.borrow_mut().remove(&v.vdisk_id);
                let _ = events.send(CoreEvent::Serving(export.clone()));
            }
            // Grown in the config (`cairn vdisk resize`): grown while served.
            let grown = self
                .exports
                .local
                .borrow()
                .get(&v.vdisk_id)
                .is_some_and(|vd| vd.grow(v.size_bytes));
            if grown {
                println!(
                    "cairn node: vdisk {} grown to {} while served",
                    v.name,
                    human(v.size_bytes)
                );
            }
            all.push(export);
        }
        let gone: Vec<u64> = self
            .exports
            .local
            .borrow()
            .keys()
            .copied()
            .filter(|id| !view.vdisks.iter().any(|s| s.record.vdisk_id == *id))
            .collect();
        // Hosts can no longer reach a deleted vdisk; stop it and release its space.
        *self.exports.all.borrow_mut() = all;
        *self.exports.remote.borrow_mut() = remote;
        for id in gone {
            let Some(vd) = self.close(id).await else {
                continue;
            };
            let owner = self.owners.borrow_mut().remove(&id).map(|(o, _)| o);
            let name = vd.config().name.clone();
            let store = owner.and_then(|o| self.online_store(o.device_uuid));
            let freed = match store {
                Some(store) => match purge(&store, &*self.meta, id).await {
                    Ok(n) => n,
                    Err(e) => {
                        self.report(id, format!("vdisk {name} deleted, space not released: {e}"));
                        0
                    }
                },
                None => 0,
            };
            let _ = events.send(CoreEvent::Removed(name, freed));
        }
        self.sweep_orphans(view).await;
        // Replicas of deleted vdisks: free their copies (once the device is in service).
        if let Some(host) = self.host.as_ref().filter(|h| !h.is_offline()) {
            for id in host.known() {
                if view.vdisks.iter().any(|s| s.record.vdisk_id == id) {
                    continue;
                }
                host.forget(id);
                if let Err(e) = free_vdisk_egroups(&host.store(), id).await {
                    self.report(
                        id,
                        format!("freeing the replica of deleted vdisk {id}: {e}"),
                    );
                }
            }
        }
        complete
    }

    fn device_infos(&self) -> Vec<pb::DeviceInfo> {
        let disks = self.disks.borrow();
        let mut out: Vec<(usize, pb::DeviceInfo)> = self
            .stores
            .borrow()
            .iter()
            .map(|(uuid, (i, store))| {
                let s = store.stats();
                let d = &self.setup.cfg.devices[*i];
                let (state, state_reason) = match disks.get(uuid).map(|d| d.watch.state()) {
                    Some(DiskState::Offline { reason, .. }) => ("offline", reason.clone()),
                    Some(DiskState::Retired { reason }) => ("retired", reason.clone()),
                    _ => ("online", String::new()),
                };
                (
                    *i,
                    pb::DeviceInfo {
                        path: NodeConfig::resolve(&self.setup.data_dir, &d.path)
                            .display()
                            .to_string(),
                        tier: d.tier.as_str().to_string(),
                        capacity_bytes: s.capacity_bytes,
                        used_bytes: s.allocated_bytes,
                        state: state.to_string(),
                        state_reason,
                    },
                )
            })
            .collect();
        out.sort_by_key(|(i, _)| *i);
        out.into_iter().map(|(_, d)| d).collect()
    }
}

async fn run_core(
    setup: CoreSetup,
    link: dataplane::mesh::CoreLinks,
    mut sig: glommio::net::UnixStream,
    events: &mpsc::Sender<CoreEvent>,
) -> Result<()> {
    let (core, cores) = (setup.core, setup.cores);
    // The cache size is per node; each core holds its share.
    let cache_share = (setup.cfg.cache_size.0 as usize / cores).max(64 << 10);
    let cache = Rc::new(RefCell::new(ReadCache::new(cache_share)));
    let mut stores = HashMap::new();
    let mut disks = HashMap::new();
    for (i, d) in setup
        .cfg
        .devices
        .iter()
        .enumerate()
        .filter(|(i, _)| i % cores == core)
    {
        let path = NodeConfig::resolve(&setup.data_dir, &d.path);
        let dev = Monitored::new(crate::device_cmd::open_formatted(&path).await?);
        let health = dev.health();
        let store = Rc::new(
            BlockStore::open(dev)
                .await
                .with_context(|| format!("opening device {}", path.display()))?,
        );
        let uuid = store.superblock().uuid;
        let watch = DiskWatch::new(setup.cfg.health_policy(), health.errors());
        disks.insert(
            uuid,
            DiskSlot {
                path: path.clone(),
                health,
                watch,
            },
        );
        if stores.insert(uuid, (i, store)).is_some() {
            bail!(
                "device {} has the same format uuid as another device of this core",
                path.display()
            );
        }
        let mut map = setup
            .uuid_core
            .lock()
            .map_err(|_| anyhow!("device map poisoned"))?;
        if map.insert(uuid, core).is_some() {
            bail!(
                "device {} has the same format uuid {uuid:032x} as another device of this node",
                path.display()
            );
        }
    }
    let local: Rc<RefCell<HashMap<u64, Rc<Disk>>>> = Rc::default();
    let lookup_map = local.clone();
    let mesh = link
        .connect(move |id| lookup_map.borrow().get(&id).cloned())
        .await;
    let serves_frontends = !stores.is_empty();
    let node_id = setup.cfg.node_id;
    // Connections to other nodes leave from the address this node serves on.
    let tcp = TcpConfig {
        local_ip: setup
            .cfg
            .listen
            .parse::<std::net::IpAddr>()
            .ok()
            .filter(|ip| !ip.is_unspecified()),
        ..TcpConfig::default()
    };
    let local_ip = tcp.local_ip;
    // The cluster id is known once the config has the cluster record (before the first
    // reconcile on a node that formed or already joined the cluster).
    let cluster = ClusterTag::default();
    if let Some(c) = &setup.view.borrow().cluster {
        cluster.set(cluster_tag_id(&c.cluster_id));
    }
    let transport = Rc::new(TcpTransport::new(node_id, cluster.clone(), tcp));
    // Core 0 keeps the replicas of other nodes' vdisks, on its first device.
    let host = (core == 0)
        .then(|| {
            stores
                .values()
                .min_by_key(|(i, _)| *i)
                .map(|(_, s)| s.clone())
        })
        .flatten()
        .map(|store| {
            Rc::new(Host::new(
                node_id,
                store,
                Rc::new(setup.meta.clone()),
                setup.cfg.oplog_cap.0,
            ))
        });
    let exports = Rc::new(CoreExports {
        local,
        all: RefCell::new(Vec::new()),
        mesh,
        remote: RefCell::default(),
        local_ip,
        meta: Rc::new(setup.meta.clone()),
    });
    let vdisks = Rc::new(CoreVdisks {
        meta: Rc::new(setup.meta.clone()),
        setup,
        cache,
        stores: RefCell::new(stores),
        disks: RefCell::new(disks),
        served_on: RefCell::default(),
        swept: Cell::new(None),
        exports: exports.clone(),
        owners: RefCell::default(),
        transport: transport.clone(),
        cluster: cluster.clone(),
        peer_addrs: RefCell::default(),
        host: host.clone(),
        mirrors: RefCell::default(),
        owner_silent: RefCell::default(),
        portals: RefCell::default(),
        published: Cell::new(false),
        drains: RefCell::default(),
        started: std::time::Instant::now(),
        surplus_since: RefCell::default(),
        reported: RefCell::default(),
        stopping: Cell::new(false),
    });
    let _ = events.send(CoreEvent::Devices(core, vdisks.device_infos()));
    let shutdown = nbd::Shutdown::new();
    let mut servers = Vec::new();
    // The data port first: owners opening replicated vdisks (on this node or others starting
    // at the same time) need their replicas to answer.
    if let Some(host) = host {
        let cfg = &vdisks.setup.cfg;
        let listener = glommio::net::TcpListener::bind((cfg.listen.as_str(), cfg.data_port))
            .map_err(|e| {
                anyhow!(
                    "data port: cannot listen on {}:{}: {e}",
                    cfg.listen,
                    cfg.data_port
                )
            })?;
        let stop = shutdown.clone();
        servers.push(glommio::spawn_local(async move {
            dataplane::transport::tcp::serve(listener, node_id, cluster, host, tcp, stop)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }));
    }
    // Ready means serving: wait (boundedly) until the other cores have claimed and opened
    // theirs, so that a host connecting to any core right after "ready" finds every vdisk.
    let first = vdisks.setup.view.borrow().clone();
    let mut complete = vdisks.reconcile(&first, events).await;
    let settle = std::time::Instant::now() + STARTUP_SETTLE;
    let mut first = first;
    while !complete && std::time::Instant::now() < settle {
        glommio::timer::sleep(Duration::from_millis(50)).await;
        first = vdisks.setup.view.borrow().clone();
        complete = vdisks.reconcile(&first, events).await;
    }
    let cfg = &vdisks.setup.cfg;
    if serves_frontends {
        let listener = glommio::net::TcpListener::bind((cfg.listen.as_str(), cfg.nbd_port))
            .map_err(|e| anyhow!("NBD: cannot listen on {}:{}: {e}", cfg.listen, cfg.nbd_port))?;
        let (ex, stop) = (exports.clone(), shutdown.clone());
        servers.push(glommio::spawn_local(async move {
            nbd::serve(listener, ex, stop)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }));
    }
    // iSCSI on core 0 alone (it owns device 0, so it serves frontends whenever any core
    // does): the state iSCSI shares between the sessions to a logical unit (persistent
    // reservations, COMPARE AND WRITE's range lock, unit attentions) lives in one registry on
    // one core, whichever core owns the vdisk (reached through the mesh).
    if serves_frontends && core == 0 {
        let listener = glommio::net::TcpListener::bind((cfg.listen.as_str(), cfg.iscsi_port))
            .map_err(|e| {
                anyhow!(
                    "iSCSI: cannot listen on {}:{}: {e}",
                    cfg.listen,
                    cfg.iscsi_port
                )
            })?;
        let portal = format!("{}:{}", cfg.listen, cfg.iscsi_port);
        let config = Rc::new(dataplane::iscsi::IscsiConfig::new(portal));
        let (ex, stop) = (exports.clone(), shutdown.clone());
        servers.push(glommio::spawn_local(async move {
            dataplane::iscsi::serve(listener, ex, config, stop)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }));
    }
    let _ = events.send(CoreEvent::Ready);

    // Follow the config store until SIGTERM / SIGINT.
    let follower = {
        let (vdisks, events) = (vdisks.clone(), events.clone());
        glommio::spawn_local(async move {
            let mut seen = first.version;
            let mut last_report = std::time::Instant::now();
            while !vdisks.stopping.get() {
                glommio::timer::sleep(RECONCILE_INTERVAL).await;
                let view = vdisks.setup.view.borrow().clone();
                // Replicated vdisks are looked at on every pass: their owners can change (or
                // go silent) without any change of the config.
                let watch = view.vdisks.iter().any(|v| {
                    view.containers.iter().any(|c| {
                        c.record.name == v.record.container
                            && c.record.settings.replication_factor >= 2
                    })
                });
                if vdisks.check_disks().await {
                    complete = false;
                }
                if (view.version != seen || !complete || watch) && !vdisks.stopping.get() {
                    complete = vdisks.reconcile(&view, &events).await;
                    seen = view.version;
                }
                if last_report.elapsed() >= DEVICE_REPORT_INTERVAL {
                    last_report = std::time::Instant::now();
                    let _ =
                        events.send(CoreEvent::Devices(vdisks.setup.core, vdisks.device_infos()));
                }
            }
        })
    };
    let mut byte = [0u8; 1];
    let _ = sig.read(&mut byte).await;
    vdisks.stopping.set(true);
    shutdown.trigger();
    for server in servers {
        if let Err(e) = server.await {
            eprintln!("cairn node: core {core}: frontend stopped with an error: {e}");
        }
    }
    follower.await;
    for vd in exports.local.borrow().values() {
        vd.stop();
    }
    let drains: Vec<_> = vdisks.drains.borrow_mut().drain().map(|(_, t)| t).collect();
    for drain in drains {
        drain.await;
    }
    vdisks.transport.shutdown();
    println!(
        "cairn node: core {core} forwarded {} requests to other cores",
        exports.mesh.forwarded()
    );
    let stores: Vec<(u128, Rc<Store>)> = vdisks
        .stores
        .borrow()
        .iter()
        .map(|(&uuid, (_, store))| (uuid, store.clone()))
        .collect();
    for (uuid, store) in stores {
        if vdisks.online_store(uuid).is_none() {
            continue; // offline: it takes no writes, a checkpoint included
        }
        store
            .checkpoint()
            .await
            .context("checkpointing a device at shutdown")?;
    }
    Ok(())
}

/// Validates device `uuid` at `path` for re-admission through a fresh handle: fsck (superblock
/// copies, checkpoint, journal) must find nothing lost and the same format uuid, then the store
/// is reopened with recovery and flushed. Returns the new store, its health and a summary.
async fn validate_disk(
    uuid: u128,
    path: &Path,
) -> std::result::Result<(Rc<Store>, DeviceHealth, String), String> {
    let dev = crate::device_cmd::open_formatted(path)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let report = blockstore::fsck::check(&dev, false).await;
    if report.worst() >= Some(blockstore::fsck::Severity::Lost) {
        let worst = report.findings.iter().max_by_key(|f| f.severity);
        return Err(worst.map(|f| f.problem.clone()).unwrap_or_default());
    }
    match &report.superblock {
        Some(sb) if sb.uuid == uuid => {}
        Some(sb) => return Err(format!("it now carries format uuid {:032x}", sb.uuid)),
        None => return Err("no valid superblock".into()),
    }
    let dev = Monitored::new(dev);
    let health = dev.health();
    let store = BlockStore::open(dev).await.map_err(|e| e.to_string())?;
    store.flush().await.map_err(|e| e.to_string())?;
    let summary = format!(
        "{} extent groups, {} journal records replayed",
        report.egroups, report.journal_records_to_replay
    );
    Ok((Rc::new(store), health, summary))
}

/// Metadata key of node `node`'s published frontend addresses.
fn portal_key(node: u64) -> Vec<u8> {
    format!("node/{node:020}/frontends").into_bytes()
}

/// Where hosts reach a node's frontends, as it publishes them: `v1 iscsi=host:port
/// nbd=host:port` (text, so an operator reading the metadata store understands it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Frontends {
    iscsi: String,
    nbd: String,
}

impl Frontends {
    fn encode(&self) -> Vec<u8> {
        format!("v1 iscsi={} nbd={}", self.iscsi, self.nbd).into_bytes()
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(b).ok()?;
        let mut parts = text.split(' ');
        if parts.next()? != "v1" {
            return None;
        }
        let iscsi = parts.next()?.strip_prefix("iscsi=")?.to_string();
        let nbd = parts.next()?.strip_prefix("nbd=")?.to_string();
        Some(Self { iscsi, nbd })
    }
}

#[cfg(test)]
mod tests {
    use super::Frontends;

    #[test]
    fn frontends_round_trip_and_refuse_garbage() {
        let f = Frontends {
            iscsi: "10.0.0.5:3260".into(),
            nbd: "10.0.0.5:10809".into(),
        };
        assert_eq!(Frontends::decode(&f.encode()), Some(f));
        for bad in [
            &b"v2 iscsi=a nbd=b"[..],
            b"v1 nbd=b iscsi=a",
            b"v1",
            b"\xff",
        ] {
            assert_eq!(Frontends::decode(bad), None);
        }
    }
}
