//! Operator commands of the control plane: `cairn cluster|node add/remove|container|vdisk`
//! (gRPC clients of a running control plane) and `cairn controlplane run` (a standalone
//! control-plane process, for multi-node clusters on one host: `scripts/cluster.sh`).
//!
//! Every client command takes `--endpoint` (one or more `host:port`, comma-separated; any node
//! answers and forwards to the leader; unreachable endpoints and "no leader yet" are retried
//! on the next endpoint for up to `--retry-secs`) and `--json` (machine-readable output on
//! stdout). A refused call prints the gRPC code and the server's message and exits non-zero.
//! Each command builds a small current-thread tokio runtime of its own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use controlplane::client::Endpoints;
use controlplane::proto::v1 as pb;
use controlplane::server::{ControlPlane, ControlPlaneOptions, DEFAULT_LISTEN};
use pb::cluster_service_client::ClusterServiceClient;
use pb::container_service_client::ContainerServiceClient;
use pb::node_service_client::NodeServiceClient;
use pb::vdisk_service_client::VdiskServiceClient;
use serde_json::{Value, json};

use crate::size::{human, parse_size};

/// Where and how to reach the control plane.
#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// Control-plane endpoints, `host:port[,host:port...]`.
    #[arg(long, global = true, default_value = DEFAULT_LISTEN)]
    pub endpoint: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Keep retrying unreachable endpoints / leaderless groups this long, seconds.
    #[arg(long, global = true, default_value_t = 10)]
    pub retry_secs: u64,
}

/// `cairn cluster ...`.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    #[command(flatten)]
    client: ClientOpts,
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Create the cluster (idempotent for the same name).
    Create {
        /// Cluster name, [a-z0-9-].
        #[arg(long, default_value = "cairn")]
        name: String,
        /// Node failures the cluster survives: 1 or 2.
        #[arg(long, default_value_t = 1)]
        fault_tolerance: u32,
    },
    /// Nodes, raft groups and capacity as the answering node sees them.
    Status,
}

/// `cairn node add`.
#[derive(Debug, Args)]
pub struct NodeAddArgs {
    #[command(flatten)]
    client: ClientOpts,
    /// Node id (> 0, unique).
    #[arg(long)]
    id: u64,
    /// The node's control-plane address, host:port.
    #[arg(long)]
    address: String,
    /// The node's data-plane replication address, host:port.
    #[arg(long, default_value = "")]
    data_address: String,
    /// Block (chassis) of the node.
    #[arg(long, default_value = "")]
    block: String,
    /// Rack of the node.
    #[arg(long, default_value = "")]
    rack: String,
}

/// `cairn node remove`.
#[derive(Debug, Args)]
pub struct NodeRemoveArgs {
    #[command(flatten)]
    client: ClientOpts,
    /// Node id.
    #[arg(long)]
    id: u64,
    /// Remove without re-replicating its data first.
    #[arg(long)]
    force: bool,
}

/// `cairn container ...`.
#[derive(Debug, Args)]
pub struct ContainerArgs {
    #[command(flatten)]
    client: ClientOpts,
    #[command(subcommand)]
    command: ContainerCommand,
}

#[derive(Debug, Subcommand)]
enum ContainerCommand {
    /// Create a container.
    Create {
        /// Name, [A-Za-z0-9._-].
        name: String,
        /// Replication factor: 2 or 3 (1: no redundancy, for single-node clusters).
        #[arg(long, default_value_t = 2)]
        rf: u32,
        /// Erasure coding of cold data, k/m (e.g. 4/1).
        #[arg(long)]
        erasure_code: Option<String>,
        /// lz4 (inline), post (LZ4HC after --compression-delay) or none.
        #[arg(long, default_value = "none")]
        compression: String,
        /// Delay before post-process compression, seconds.
        #[arg(long, default_value_t = 3600)]
        compression_delay: u64,
        /// Fingerprint-based dedup.
        #[arg(long)]
        dedup: bool,
    },
    /// List containers.
    List,
    /// Delete an empty container.
    Delete {
        /// Name.
        name: String,
    },
}

/// `cairn vdisk ...`.
#[derive(Debug, Args)]
pub struct VdiskArgs {
    #[command(flatten)]
    client: ClientOpts,
    #[command(subcommand)]
    command: VdiskCommand,
}

#[derive(Debug, Subcommand)]
enum VdiskCommand {
    /// Create a thin vdisk (size: a multiple of 1 MiB).
    Create {
        /// Name, unique in its container.
        name: String,
        /// Container.
        #[arg(long)]
        container: String,
        /// Size, e.g. 4GiB.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// List vdisks (of one container or all).
    List {
        /// Only this container.
        #[arg(long, default_value = "")]
        container: String,
    },
    /// Grow a vdisk.
    Resize {
        /// Name (or container/name).
        name: String,
        /// Container (found by name when the vdisk name is unique).
        #[arg(long)]
        container: Option<String>,
        /// New size, e.g. 8GiB.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Delete a vdisk.
    Delete {
        /// Name (or container/name).
        name: String,
        /// Container (found by name when the vdisk name is unique).
        #[arg(long)]
        container: Option<String>,
    },
}

/// `cairn controlplane run`.
#[derive(Debug, Args)]
pub struct ControlplaneRunArgs {
    /// Directory of the raft groups' files.
    #[arg(long)]
    data_dir: PathBuf,
    /// gRPC address to serve on.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Address others reach this node at (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// This node's id (> 0).
    #[arg(long)]
    node_id: u64,
    /// Founding voters, `id=host:port,...` (this node included; same list on every founder).
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Wait to be added with `cairn node add` instead of forming a cluster.
    #[arg(long)]
    join: bool,
    /// Metadata shards (same on every node).
    #[arg(long, default_value_t = controlplane::server::DEFAULT_METADATA_SHARDS)]
    shards: u32,
    /// This node's block (chassis), for failure-domain aware placement.
    #[arg(long, default_value = "")]
    block: String,
    /// This node's rack.
    #[arg(long, default_value = "")]
    rack: String,
}

/// `cairn controlplane ...`.
#[derive(Debug, Subcommand)]
pub enum ControlplaneCommand {
    /// Run a standalone control plane in the foreground until SIGTERM/SIGINT.
    Run(ControlplaneRunArgs),
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the client runtime")
}

fn endpoints(c: &ClientOpts) -> anyhow::Result<Endpoints> {
    Ok(Endpoints::new(c.endpoint.split(','))?.retry_for(Duration::from_secs(c.retry_secs)))
}

/// A refused call as the operator should read it.
fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow!("{:?}: {}", s.code(), s.message())
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Runs `cairn cluster ...`.
pub fn cluster(a: ClusterArgs) -> anyhow::Result<()> {
    let rt = runtime()?;
    let _enter = rt.enter();
    let eps = endpoints(&a.client)?;
    rt.block_on(async {
        match a.command {
            ClusterCommand::Create {
                name,
                fault_tolerance,
            } => {
                let req = pb::CreateClusterRequest {
                    name: name.clone(),
                    nodes: Vec::new(),
                    fault_tolerance,
                };
                let r = eps
                    .call(|ch| {
                        let req = req.clone();
                        async move { ClusterServiceClient::new(ch).create_cluster(req).await }
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                if a.client.json {
                    print_json(&json!({"name": name, "cluster_id": r.cluster_id, "config_voters": r.config_voters}));
                } else {
                    println!(
                        "cluster {name} ({}) created; config voters {:?}",
                        r.cluster_id, r.config_voters
                    );
                }
            }
            ClusterCommand::Status => {
                let s = eps
                    .call(|ch| async move {
                        ClusterServiceClient::new(ch)
                            .get_status(pb::GetStatusRequest {})
                            .await
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                print_status(&s, a.client.json);
            }
        }
        Ok(())
    })
}

fn node_state(s: i32) -> &'static str {
    match pb::NodeState::try_from(s) {
        Ok(pb::NodeState::Joining) => "joining",
        Ok(pb::NodeState::Up) => "up",
        Ok(pb::NodeState::Down) => "down",
        Ok(pb::NodeState::Removing) => "removing",
        _ => "unknown",
    }
}

fn node_json(n: &pb::NodeRecord) -> Value {
    let a = n.address.clone().unwrap_or_default();
    let d = n.domain.clone().unwrap_or_default();
    json!({"node_id": a.node_id, "control_addr": a.control_addr, "data_addr": a.data_addr,
           "block": d.block, "rack": d.rack, "state": node_state(n.state),
           "config_version": n.config_version})
}

fn print_status(s: &pb::ClusterStatus, as_json: bool) {
    if as_json {
        print_json(&json!({
            "cluster_id": s.cluster_id, "name": s.name, "created": s.created,
            "fault_tolerance": s.fault_tolerance, "config_leader": s.config_leader,
            "config_term": s.config_term, "config_version": s.config_version,
            "served_by": s.served_by,
            "nodes": s.nodes.iter().map(node_json).collect::<Vec<_>>(),
            "groups": s.groups.iter().map(|g| json!({"group_id": g.group_id, "leader": g.leader,
                "term": g.term, "voters": g.voters, "learners": g.learners,
                "applied_index": g.applied_index, "healthy": g.healthy})).collect::<Vec<_>>(),
            "capacity": s.capacity.iter().map(|c| json!({"tier": c.tier,
                "capacity_bytes": c.capacity_bytes, "used_bytes": c.used_bytes})).collect::<Vec<_>>(),
            "disk_alerts": s.disk_alerts.iter().map(|d| json!({"node_id": d.node_id,
                "path": d.path, "state": d.state, "reason": d.reason})).collect::<Vec<_>>(),
        }));
        return;
    }
    if s.created {
        println!(
            "cluster {} ({}), fault tolerance {}",
            s.name, s.cluster_id, s.fault_tolerance
        );
    } else {
        println!("cluster not created yet (cairn cluster create)");
    }
    println!(
        "config: leader node {}, term {}, version {} (as node {} sees it)",
        s.config_leader, s.config_term, s.config_version, s.served_by
    );
    println!(
        "{:>6}  {:<22} {:<8} {:<10} {:<10}",
        "NODE", "ADDRESS", "STATE", "BLOCK", "RACK"
    );
    for n in &s.nodes {
        let a = n.address.clone().unwrap_or_default();
        let d = n.domain.clone().unwrap_or_default();
        println!(
            "{:>6}  {:<22} {:<8} {:<10} {:<10}",
            a.node_id,
            a.control_addr,
            node_state(n.state),
            d.block,
            d.rack
        );
    }
    println!(
        "{:>6}  {:>6} {:>6} {:<12} {:<10} {:>9} {:<7}",
        "GROUP", "LEADER", "TERM", "VOTERS", "LEARNERS", "APPLIED", "HEALTH"
    );
    for g in &s.groups {
        let name = if g.group_id == 0 {
            "config".to_string()
        } else {
            format!("shard{}", g.group_id)
        };
        println!(
            "{:>6}  {:>6} {:>6} {:<12} {:<10} {:>9} {:<7}",
            name,
            g.leader,
            g.term,
            format!("{:?}", g.voters),
            format!("{:?}", g.learners),
            g.applied_index,
            if g.healthy { "ok" } else { "NO LEADER" }
        );
    }
    for c in &s.capacity {
        println!(
            "tier {}: {} of {} used",
            c.tier,
            human(c.used_bytes),
            human(c.capacity_bytes)
        );
    }
    for d in &s.disk_alerts {
        println!(
            "disk {} of node {}: {} ({})",
            d.path, d.node_id, d.state, d.reason
        );
    }
}

/// Runs `cairn node add`.
pub fn node_add(a: NodeAddArgs) -> anyhow::Result<()> {
    let rt = runtime()?;
    let _enter = rt.enter();
    let eps = endpoints(&a.client)?;
    let req = pb::AddNodeRequest {
        address: Some(pb::NodeAddress {
            node_id: a.id,
            control_addr: a.address.clone(),
            data_addr: a.data_address.clone(),
        }),
        domain: Some(pb::FailureDomain {
            block: a.block.clone(),
            rack: a.rack.clone(),
        }),
    };
    rt.block_on(async {
        let r = eps
            .call(|ch| {
                let req = req.clone();
                async move { NodeServiceClient::new(ch).add_node(req).await }
            })
            .await
            .map_err(status_error)?
            .into_inner();
        if a.client.json {
            print_json(&node_json(&r));
        } else {
            println!(
                "node {} at {} added (config version {}); it becomes a voter once caught up",
                a.id, a.address, r.config_version
            );
        }
        Ok(())
    })
}

/// Runs `cairn node remove`.
pub fn node_remove(a: NodeRemoveArgs) -> anyhow::Result<()> {
    let rt = runtime()?;
    let _enter = rt.enter();
    let eps = endpoints(&a.client)?;
    let req = pb::RemoveNodeRequest {
        node_id: a.id,
        force: a.force,
        expected_version: 0,
    };
    rt.block_on(async {
        let r = eps
            .call(|ch| async move { NodeServiceClient::new(ch).remove_node(req).await })
            .await
            .map_err(status_error)?
            .into_inner();
        if a.client.json {
            print_json(&json!({"node_id": a.id, "config_version": r.config_version}));
        } else {
            println!(
                "node {} removed (config version {})",
                a.id, r.config_version
            );
        }
        Ok(())
    })
}

fn compression_name(c: i32) -> &'static str {
    match pb::Compression::try_from(c) {
        Ok(pb::Compression::Inline) => "lz4",
        Ok(pb::Compression::PostProcess) => "post",
        _ => "none",
    }
}

fn container_json(c: &pb::Container) -> Value {
    let s = c.settings.unwrap_or_default();
    let ec = s
        .erasure_code
        .filter(|e| e.data_strips != 0)
        .map(|e| format!("{}/{}", e.data_strips, e.parity_strips));
    json!({"container_id": c.container_id, "name": c.name, "replication_factor": s.replication_factor,
           "erasure_code": ec, "compression": compression_name(s.compression),
           "dedup": s.dedup == pb::Dedup::OnWrite as i32, "config_version": c.config_version})
}

/// Runs `cairn container ...`.
pub fn container(a: ContainerArgs) -> anyhow::Result<()> {
    let rt = runtime()?;
    let _enter = rt.enter();
    let eps = endpoints(&a.client)?;
    let as_json = a.client.json;
    rt.block_on(async {
        match a.command {
            ContainerCommand::Create {
                name,
                rf,
                erasure_code,
                compression,
                compression_delay,
                dedup,
            } => {
                let erasure_code = match erasure_code {
                    None => None,
                    Some(ec) => {
                        let (k, m) = ec
                            .split_once('/')
                            .and_then(|(k, m)| Some((k.parse().ok()?, m.parse().ok()?)))
                            .ok_or_else(|| {
                                anyhow!("--erasure-code {ec:?}: expected k/m, e.g. 4/1")
                            })?;
                        Some(pb::ErasureCode {
                            data_strips: k,
                            parity_strips: m,
                        })
                    }
                };
                let compression = match compression.as_str() {
                    "none" | "off" => pb::Compression::None,
                    "lz4" | "inline" => pb::Compression::Inline,
                    "post" | "lz4hc" => pb::Compression::PostProcess,
                    other => bail!("--compression {other:?}: expected lz4, post or none"),
                };
                let req = pb::CreateContainerRequest {
                    name,
                    settings: Some(pb::ContainerSettings {
                        replication_factor: rf,
                        erasure_code,
                        compression: compression as i32,
                        compression_delay_secs: compression_delay,
                        dedup: if dedup {
                            pb::Dedup::OnWrite
                        } else {
                            pb::Dedup::Off
                        } as i32,
                    }),
                };
                let c = eps
                    .call(|ch| {
                        let req = req.clone();
                        async move { ContainerServiceClient::new(ch).create_container(req).await }
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                if as_json {
                    print_json(&container_json(&c));
                } else {
                    println!("container {} created (id {})", c.name, c.container_id);
                }
            }
            ContainerCommand::List => {
                let r = eps
                    .call(|ch| async move {
                        ContainerServiceClient::new(ch)
                            .list_containers(pb::ListContainersRequest {})
                            .await
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                if as_json {
                    print_json(&Value::Array(
                        r.containers.iter().map(container_json).collect(),
                    ));
                } else {
                    println!(
                        "{:>4}  {:<24} {:>3} {:<5} {:<5} {:<5}",
                        "ID", "NAME", "RF", "EC", "COMP", "DEDUP"
                    );
                    for c in &r.containers {
                        let j = container_json(c);
                        println!(
                            "{:>4}  {:<24} {:>3} {:<5} {:<5} {:<5}",
                            c.container_id,
                            c.name,
                            j["replication_factor"],
                            j["erasure_code"].as_str().unwrap_or("-"),
                            j["compression"].as_str().unwrap_or("-"),
                            j["dedup"]
                        );
                    }
                }
            }
            ContainerCommand::Delete { name } => {
                let req = pb::DeleteContainerRequest {
                    name: name.clone(),
                    expected_version: 0,
                };
                let r = eps
                    .call(|ch| {
                        let req = req.clone();
                        async move { ContainerServiceClient::new(ch).delete_container(req).await }
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                if as_json {
                    print_json(&json!({"name": name, "config_version": r.config_version}));
                } else {
                    println!("container {name} deleted");
                }
            }
        }
        Ok(())
    })
}

fn vdisk_json(v: &pb::Vdisk) -> Value {
    json!({"vdisk_id": v.vdisk_id, "name": v.name, "container": v.container,
           "size_bytes": v.size_bytes, "config_version": v.config_version})
}

async fn list_vdisks(eps: &Endpoints, container: &str) -> anyhow::Result<Vec<pb::Vdisk>> {
    let req = pb::ListVdisksRequest {
        container: container.to_string(),
    };
    Ok(eps
        .call(|ch| {
            let req = req.clone();
            async move { VdiskServiceClient::new(ch).list_vdisks(req).await }
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .vdisks)
}

/// `container/name`, `--container`, or the one container holding a vdisk of this name.
async fn locate(
    eps: &Endpoints,
    name: &str,
    container: Option<String>,
) -> anyhow::Result<(String, String)> {
    if let Some(c) = container {
        return Ok((c, name.to_string()));
    }
    if let Some((c, n)) = name.split_once('/') {
        return Ok((c.to_string(), n.to_string()));
    }
    let found: Vec<_> = list_vdisks(eps, "")
        .await?
        .into_iter()
        .filter(|v| v.name == name)
        .collect();
    match found.as_slice() {
        [one] => Ok((one.container.clone(), one.name.clone())),
        [] => bail!("NotFound: no vdisk named {name} in any container"),
        many => bail!(
            "vdisk name {name} exists in {} containers ({}): pass --container",
            many.len(),
            many.iter()
                .map(|v| v.container.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Runs `cairn vdisk ...`.
pub fn vdisk(a: VdiskArgs) -> anyhow::Result<()> {
    let rt = runtime()?;
    let _enter = rt.enter();
    let eps = endpoints(&a.client)?;
    let as_json = a.client.json;
    rt.block_on(async {
        match a.command {
            VdiskCommand::Create {
                name,
                container,
                size,
            } => {
                let req = pb::CreateVdiskRequest {
                    container,
                    name,
                    size_bytes: size,
                };
                let v = eps
                    .call(|ch| {
                        let req = req.clone();
                        async move { VdiskServiceClient::new(ch).create_vdisk(req).await }
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                if as_json {
                    print_json(&vdisk_json(&v));
                } else {
                    println!(
                        "vdisk {}/{} created (id {}, {})",
                        v.container,
                        v.name,
                        v.vdisk_id,
                        human(v.size_bytes)
                    );
                }
            }
            VdiskCommand::List { container } => {
                let all = list_vdisks(&eps, &container).await?;
                if as_json {
                    print_json(&Value::Array(all.iter().map(vdisk_json).collect()));
                } else {
                    println!("{:>4}  {:<20} {:<24} {:>12}", "ID", "CONTAINER", "NAME", "SIZE");
                    for v in &all {
                        println!(
                            "{:>4}  {:<20} {:<24} {:>12}",
                            v.vdisk_id,
                            v.container,
                            v.name,
                            human(v.size_bytes)
                        );
                    }
                }
            }
            VdiskCommand::Resize {
                name,
                container,
                size,
            } => {
                let (container, name) = locate(&eps, &name, container).await?;
                let req = pb::ResizeVdiskRequest {
                    container,
                    name,
                    new_size_bytes: size,
                    expected_version: 0,
                };
                let v = eps
                    .call(|ch| {
                        let req = req.clone();
                        async move { VdiskServiceClient::new(ch).resize_vdisk(req).await }
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                if as_json {
                    print_json(&vdisk_json(&v));
                } else {
                    println!(
                        "vdisk {}/{} is now {}",
                        v.container,
                        v.name,
                        human(v.size_bytes)
                    );
                }
            }
            VdiskCommand::Delete { name, container } => {
                let (container, name) = locate(&eps, &name, container).await?;
                let req = pb::DeleteVdiskRequest {
                    container: container.clone(),
                    name: name.clone(),
                    expected_version: 0,
                };
                let r = eps
                    .call(|ch| {
                        let req = req.clone();
                        async move { VdiskServiceClient::new(ch).delete_vdisk(req).await }
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                if as_json {
                    print_json(&json!({"container": container, "name": name, "config_version": r.config_version}));
                } else {
                    println!("vdisk {container}/{name} deleted");
                }
            }
        }
        Ok(())
    })
}

/// Runs `cairn controlplane run`: serves until SIGTERM or SIGINT.
pub fn controlplane(c: ControlplaneCommand) -> anyhow::Result<()> {
    let ControlplaneCommand::Run(a) = c;
    let mut peers = BTreeMap::new();
    for p in &a.peers {
        let (id, addr) = p
            .split_once('=')
            .ok_or_else(|| anyhow!("--peers entry {p:?}: expected id=host:port"))?;
        let id: u64 = id
            .parse()
            .map_err(|_| anyhow!("--peers entry {p:?}: {id:?} is not a node id"))?;
        peers.insert(id, addr.to_string());
    }
    let mut options = ControlPlaneOptions::new(a.node_id, &a.data_dir);
    options.listen = a.listen;
    options.advertise = a.advertise.clone();
    options.peers = peers;
    options.join = a.join;
    options.metadata_shards = a.shards;
    options.block = a.block.clone();
    options.rack = a.rack.clone();
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]);
    let mut signals = signals.context("registering signal handlers")?;
    let handle = ControlPlane::start(options)?;
    println!(
        "cairn control plane: node {} serving on {} (data {})",
        a.node_id,
        handle.local_addr(),
        a.data_dir.display()
    );
    if let Some(sig) = signals.forever().next() {
        eprintln!("cairn control plane: signal {sig}, shutting down");
    }
    handle.shutdown();
    Ok(())
}
