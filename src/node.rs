//! `cairn node run`: one node's data plane — a pinned glommio executor per core, devices and
//! vdisks owned by cores, NBD served to hosts.
//!
//! Start-up: read the configuration (`--config`, else `DATA_DIR/node.toml`, else the embedded
//! default, written to `DATA_DIR/node.toml` so later runs reopen the same cluster); create and
//! format missing device files; open the metadata store; start one executor per core. Device
//! `i` is owned by core `i % cores` and each vdisk by the core of its device, which recovers the
//! vdisk's oplog and runs its drain. Cores that own vdisks listen on the NBD and iSCSI ports
//! (`SO_REUSEPORT`); a connection for a vdisk of another core is served through the cross-core
//! mesh. SIGTERM or SIGINT stops accepting, lets accepted requests finish, checkpoints every
//! device and exits 0. Every acknowledged write is durable before its reply, so `kill -9`
//! loses nothing acknowledged.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::mpsc;

use anyhow::{Context, Result, anyhow, bail};
use blockstore::uring::{self, UringOptions};
use blockstore::{BlockStore, FormatOptions};
use clap::Args;
use dataplane::cache::ReadCache;
use dataplane::mesh::{CoreTarget, Mesh, RemoteTarget};
use dataplane::metadata_redb::RedbMetadataStore;
use dataplane::nbd;
use dataplane::target::{ExportInfo, Exports};
use dataplane::vdisk::{Vdisk, VdiskConfig};
use futures_lite::AsyncReadExt;
use glommio::{LocalExecutorBuilder, Placement};

use crate::config::{NODE_CONFIG_FILE, NodeConfig};
use crate::size::human;

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
    /// Data-plane executors (default: one per online CPU).
    #[arg(long)]
    pub cores: Option<usize>,
}

type Disk = Vdisk<uring::UringDevice, RedbMetadataStore>;

/// The vdisks as one core's NBD server sees them.
struct CoreExports {
    local: HashMap<u64, Rc<Disk>>,
    /// name -> (id, owner core, size)
    all: Vec<(String, u64, usize, u64)>,
    mesh: dataplane::mesh::CoreMesh,
}

impl Exports for CoreExports {
    type Target = CoreTarget<Disk>;

    fn get(&self, name: &str) -> Option<Rc<Self::Target>> {
        let (_, id, owner, size) = if name.is_empty() {
            self.all.first()?
        } else {
            self.all.iter().find(|(n, ..)| n == name)?
        };
        if let Some(vd) = self.local.get(id) {
            return Some(Rc::new(CoreTarget::Local(vd.clone())));
        }
        let link = self.mesh.peer(*owner)?;
        Some(Rc::new(CoreTarget::Remote(RemoteTarget::new(
            *id, *size, link,
        ))))
    }

    fn list(&self) -> Vec<ExportInfo> {
        self.all
            .iter()
            .map(|(name, _, _, size)| ExportInfo {
                name: name.clone(),
                description: format!("Cairn vdisk {name}"),
                size_bytes: *size,
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
}

/// `cairn node run`.
pub fn run(args: RunArgs) -> Result<()> {
    let (cfg, created) = configure(&args)?;
    let data_dir = args.data_dir.clone();
    if created {
        println!(
            "cairn node: created a single-node cluster in {} (container default, thin vdisk vd0 of {})",
            data_dir.display(),
            human(cfg.vdisks[0].size.0)
        );
    }
    prepare_devices(&cfg, &data_dir)?;
    let meta = RedbMetadataStore::open(&data_dir.join("metadata.redb"))
        .map_err(|e| anyhow!("metadata store: {e}"))?;
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cores = if cfg.cores == 0 { online } else { cfg.cores };
    let owner_of_device = |d: usize| d % cores;
    let all: Vec<(String, u64, usize, u64)> = cfg
        .vdisks
        .iter()
        .map(|v| (v.name.clone(), v.id, owner_of_device(v.device), v.size.0))
        .collect();

    let links = Mesh::links(cores);
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
        let cfg = cfg.clone();
        let data_dir = data_dir.clone();
        let meta = meta.clone();
        let all = all.clone();
        let events = events_tx.clone();
        let placement = if core < online {
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
                if let Err(e) =
                    run_core(core, cores, cfg, data_dir, meta, all, link, sig, &events).await
                {
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
    for ev in events_rx.iter() {
        match ev {
            CoreEvent::Ready => {
                ready += 1;
                if ready == cores {
                    print_endpoints(&cfg, &data_dir, cores, &all);
                }
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
    match failure {
        Some(e) => Err(anyhow!("node stopped after a failure: {e}")),
        None => {
            println!("cairn node: stopped cleanly");
            Ok(())
        }
    }
}

fn print_endpoints(
    cfg: &NodeConfig,
    data_dir: &Path,
    cores: usize,
    all: &[(String, u64, usize, u64)],
) {
    println!("cairn node: {cores} cores, data in {}", data_dir.display());
    for (i, d) in cfg.devices.iter().enumerate() {
        let path = NodeConfig::resolve(data_dir, &d.path);
        println!(
            "cairn node: device {} ({}) on core {}",
            path.display(),
            d.tier,
            i % cores
        );
    }
    for (name, id, core, size) in all {
        println!(
            "cairn node: vdisk {name} (id {id}, {}) on core {core}",
            human(*size)
        );
        println!(
            "cairn node: NBD nbd://{}:{}/{name}",
            cfg.listen, cfg.nbd_port
        );
    }
    println!("cairn node: ready");
}

#[allow(clippy::too_many_arguments)]
async fn run_core(
    core: usize,
    cores: usize,
    cfg: NodeConfig,
    data_dir: PathBuf,
    meta: RedbMetadataStore,
    all: Vec<(String, u64, usize, u64)>,
    link: dataplane::mesh::CoreLinks,
    mut sig: glommio::net::UnixStream,
    events: &mpsc::Sender<CoreEvent>,
) -> Result<()> {
    let meta = Rc::new(meta);
    // The cache size is per node; each core holds its share.
    let cache_share = (cfg.cache_size.0 as usize / cores).max(64 << 10);
    let cache = Rc::new(RefCell::new(ReadCache::new(cache_share)));
    let mut stores = Vec::new();
    let mut local: HashMap<u64, Rc<Disk>> = HashMap::new();
    for (i, d) in cfg
        .devices
        .iter()
        .enumerate()
        .filter(|(i, _)| i % cores == core)
    {
        let path = NodeConfig::resolve(&data_dir, &d.path);
        let dev = crate::device_cmd::open_formatted(&path).await?;
        let store = Rc::new(
            BlockStore::open(dev)
                .await
                .with_context(|| format!("opening device {}", path.display()))?,
        );
        for v in cfg.vdisks.iter().filter(|v| v.device == i) {
            let vcfg = VdiskConfig {
                oplog_cap_bytes: cfg.oplog_cap.0,
                ..VdiskConfig::new(v.id, &v.name, v.size.0)
            };
            let vd = Vdisk::open(store.clone(), meta.clone(), cache.clone(), vcfg)
                .await
                .with_context(|| format!("opening vdisk {}", v.name))?;
            glommio::spawn_local(vd.clone().drain_loop()).detach();
            local.insert(v.id, vd);
        }
        stores.push(store);
    }
    let lookup_map = local.clone();
    let mesh = link.connect(move |id| lookup_map.get(&id).cloned()).await;
    let serves_nbd = !local.is_empty();
    let exports = Rc::new(CoreExports {
        local: local.clone(),
        all,
        mesh,
    });
    let stats_exports = exports.clone();
    let shutdown = nbd::Shutdown::new();
    let mut servers = Vec::new();
    if serves_nbd {
        let listener = glommio::net::TcpListener::bind((cfg.listen.as_str(), cfg.nbd_port))
            .map_err(|e| anyhow!("NBD: cannot listen on {}:{}: {e}", cfg.listen, cfg.nbd_port))?;
        let (ex, stop) = (exports.clone(), shutdown.clone());
        servers.push(glommio::spawn_local(async move {
            nbd::serve(listener, ex, stop)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }));
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

    // Wait for SIGTERM / SIGINT.
    let mut byte = [0u8; 1];
    let _ = sig.read(&mut byte).await;
    shutdown.trigger();
    for server in servers {
        if let Err(e) = server.await {
            eprintln!("cairn node: core {core}: frontend stopped with an error: {e}");
        }
    }
    for vd in local.values() {
        vd.stop();
    }
    println!(
        "cairn node: core {core} forwarded {} requests to other cores",
        stats_exports.mesh.forwarded()
    );
    for store in &stores {
        store
            .checkpoint()
            .await
            .context("checkpointing a device at shutdown")?;
    }
    Ok(())
}
