//! The node configuration file (TOML).
//!
//! ```toml
//! node_id = 1                 # cluster-unique, > 0
//! listen = "127.0.0.1"        # address of the host frontends and the control plane
//! nbd_port = 10809
//! iscsi_port = 3260
//! grpc_port = 7100            # control plane (raft groups, cairn CLI)
//! data_port = 7200            # data plane: replication between nodes
//! # advertise = "10.0.0.5:7100" # control address others reach this node at
//! # peers = ["1=10.0.0.5:7100", "2=10.0.0.6:7100", "3=10.0.0.7:7100"]  # founding voters
//! # block = "b1"              # failure domains: raft voters are spread over blocks and racks
//! # rack = "r1"
//! # join = false              # true: wait for `cairn node add` instead of forming a cluster
//! metadata_shards = 4         # same on every node
//! fault_tolerance = 1         # 2: raft groups of 5 voters (needs 5 founders), survives 2 losses
//! cores = 0                   # data-plane executors; 0 = one per online CPU
//! pin_cores = true            # pin executor i to CPU i (false: several nodes on one machine)
//! cache_size = "256MiB"       # unified read cache of the node (split between its cores)
//! oplog_cap = "6GiB"          # per vdisk
//! drain_delay_ms = 500        # a drain waits this long for writes to accumulate (or 16 MiB)
//! disk_io_timeout_secs = 30   # an I/O in flight this long takes its disk offline
//! disk_readmit_after_secs = 60 # an offline disk is validated and re-admitted after this
//! disk_offline_limit = 3      # offline this many times within an hour: it stays offline
//! scrub_rate = "8MiB"         # per vdisk and second: checksums of every copy verified (0: off)
//! scrub_interval_secs = 3600  # pause before each scrub pass
//!
//! [[device]]
//! path = "dev0.img"           # relative paths are under the data directory
//! size = "16GiB"              # a missing file is created (sparse) and formatted
//! tier = "ssd"
//!
//! [[vdisk]]                   # created in the cluster's config store when this node forms it
//! name = "vd0"
//! size = "4GiB"
//! container = "default"       # created too (RF1 on a single node, else RF2) when missing
//! device = 0                  # index of the device that holds its oplog and extents
//! ```
//!
//! Vdisks are defined in the cluster's config store (`cairn vdisk create`); the `[[vdisk]]`
//! entries only seed a cluster this node creates. A node serves every vdisk whose ownership
//! record (in the metadata store) names it and one of its devices.
//!
//! Unknown keys and bad values are refused with the file, the key and the reason.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use blockstore::Tier;
use serde::{Deserialize, Deserializer, Serialize};

use crate::size::parse_size;

/// Name of the configuration a node writes into a new data directory.
pub const NODE_CONFIG_FILE: &str = "node.toml";
/// Default control-plane (gRPC) port.
pub const DEFAULT_GRPC_PORT: u16 = 7100;
/// Default data-plane (replication) port.
pub const DEFAULT_DATA_PORT: u16 = 7200;
/// Vdisk sizes are multiples of this (the control plane's extent alignment).
pub const VDISK_SIZE_ALIGNMENT: u64 = controlplane::server::VDISK_SIZE_ALIGNMENT_BYTES;
/// Default NBD port (IANA).
pub const DEFAULT_NBD_PORT: u16 = 10809;
/// Default iSCSI port (IANA).
pub const DEFAULT_ISCSI_PORT: u16 = 3260;
/// Default unified read cache of a node.
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;
/// Size of the device file of the embedded default (sparse: costs what is written).
pub const DEFAULT_DEVICE_BYTES: u64 = 16 << 30;
/// Size of the embedded default vdisk.
pub const DEFAULT_VDISK_BYTES: u64 = 4 << 30;

/// A size written as a number of bytes or a string with a binary unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Str(s) => parse_size(&s).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let b = self.0;
        let text = if b.is_multiple_of(1 << 30) {
            format!("{}GiB", b >> 30)
        } else if b.is_multiple_of(1 << 20) {
            format!("{}MiB", b >> 20)
        } else {
            b.to_string()
        };
        s.serialize_str(&text)
    }
}

fn tier_de<'de, D: Deserializer<'de>>(d: D) -> Result<Tier, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

fn tier_ser<S: serde::Serializer>(t: &Tier, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(t.as_str())
}

fn default_tier() -> Tier {
    Tier::Ssd
}

/// One device.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// File or raw block device; relative to the data directory.
    pub path: PathBuf,
    /// Size of a file to create when missing.
    pub size: Option<Size>,
    /// Tier.
    #[serde(
        default = "default_tier",
        deserialize_with = "tier_de",
        serialize_with = "tier_ser"
    )]
    pub tier: Tier,
}

/// One vdisk.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VdiskEntry {
    /// Name (export name, iSCSI target suffix).
    pub name: String,
    /// Size.
    pub size: Size,
    /// Container.
    #[serde(default = "default_container")]
    pub container: String,
    /// Index of the device holding it.
    #[serde(default)]
    pub device: usize,
}

fn default_container() -> String {
    "default".to_string()
}

/// A node's configuration.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Cluster-unique node id (> 0).
    #[serde(default = "default_node_id")]
    pub node_id: u64,
    /// Frontend and control-plane listen address.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// NBD port.
    #[serde(default = "default_nbd_port")]
    pub nbd_port: u16,
    /// iSCSI port.
    #[serde(default = "default_iscsi_port")]
    pub iscsi_port: u16,
    /// Control-plane gRPC port.
    #[serde(default = "default_grpc_port")]
    pub grpc_port: u16,
    /// Data-plane port: replication traffic from the owners of replicated vdisks.
    #[serde(default = "default_data_port")]
    pub data_port: u16,
    /// Control address others reach this node at, host:port (default: listen:grpc_port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Founding voters `id=host:port` (this node included, the same list on every founder);
    /// empty: a single-node cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// Block (chassis) of this node, for failure-domain aware placement.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub block: String,
    /// Rack of this node.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rack: String,
    /// Wait to be added with `cairn node add` instead of forming a cluster.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub join: bool,
    /// Metadata shards of the cluster (the same on every node).
    #[serde(default = "default_shards")]
    pub metadata_shards: u32,
    /// Fault tolerance of the cluster this node forms: 1 (raft groups of 3 voters) or 2 (5).
    #[serde(default = "default_fault_tolerance")]
    pub fault_tolerance: u32,
    /// Data-plane executors (0: one per online CPU).
    #[serde(default)]
    pub cores: usize,
    /// Pin executor `i` to CPU `i` (turn off when several nodes share a machine).
    #[serde(default = "default_true")]
    pub pin_cores: bool,
    /// Unified read cache of the node (each core holds its share).
    #[serde(default = "default_cache")]
    pub cache_size: Size,
    /// Oplog cap per vdisk.
    #[serde(default = "default_oplog_cap")]
    pub oplog_cap: Size,
    /// How long a drain cycle waits for writes to accumulate in the oplog (milliseconds; it
    /// starts sooner once 16 MiB or half the cap is waiting).
    #[serde(default = "default_drain_delay")]
    pub drain_delay_ms: u64,
    /// An I/O in flight this long takes its disk offline (seconds).
    #[serde(default = "default_disk_io_timeout")]
    pub disk_io_timeout_secs: u64,
    /// An offline disk is validated and re-admitted after this long (seconds).
    #[serde(default = "default_disk_readmit_after")]
    pub disk_readmit_after_secs: u64,
    /// Offline events within an hour that keep a disk offline.
    #[serde(default = "default_disk_offline_limit")]
    pub disk_offline_limit: u32,
    /// Scrub rate per vdisk (bytes per second; 0: no scrub): the owner reads its copy, which
    /// verifies every slice's checksum, and has every replica compare its copy.
    #[serde(default = "default_scrub_rate")]
    pub scrub_rate: Size,
    /// Pause before each scrub pass (seconds).
    #[serde(default = "default_scrub_interval")]
    pub scrub_interval_secs: u64,
    /// Devices.
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
    /// Vdisks.
    #[serde(default, rename = "vdisk")]
    pub vdisks: Vec<VdiskEntry>,
}

fn default_true() -> bool {
    true
}
fn default_node_id() -> u64 {
    1
}
fn default_grpc_port() -> u16 {
    DEFAULT_GRPC_PORT
}
fn default_data_port() -> u16 {
    DEFAULT_DATA_PORT
}
fn default_fault_tolerance() -> u32 {
    1
}
fn default_shards() -> u32 {
    controlplane::server::DEFAULT_METADATA_SHARDS
}
fn default_listen() -> String {
    "127.0.0.1".to_string()
}
fn default_nbd_port() -> u16 {
    DEFAULT_NBD_PORT
}
fn default_iscsi_port() -> u16 {
    DEFAULT_ISCSI_PORT
}
fn default_cache() -> Size {
    Size(DEFAULT_CACHE_BYTES)
}
fn default_oplog_cap() -> Size {
    Size(dataplane::vdisk::DEFAULT_OPLOG_CAP_BYTES)
}
fn default_drain_delay() -> u64 {
    dataplane::vdisk::DRAIN_DELAY.as_millis() as u64
}
fn default_disk_io_timeout() -> u64 {
    blockstore::health::DEFAULT_IO_TIMEOUT.as_secs()
}
fn default_disk_readmit_after() -> u64 {
    blockstore::health::DEFAULT_READMIT_AFTER.as_secs()
}
fn default_disk_offline_limit() -> u32 {
    blockstore::health::DEFAULT_OFFLINE_LIMIT
}
fn default_scrub_rate() -> Size {
    Size(dataplane::vdisk::DEFAULT_SCRUB_RATE)
}
fn default_scrub_interval() -> u64 {
    dataplane::vdisk::DEFAULT_SCRUB_INTERVAL.as_secs()
}

impl NodeConfig {
    /// Where other nodes reach this node's data port: the advertised host (else the listen
    /// address) with `data_port`.
    pub fn data_addr(&self) -> String {
        self.reachable_at(self.data_port)
    }

    /// Where hosts reach this node's NBD server (named by other nodes' refusals).
    pub fn nbd_addr(&self) -> String {
        self.reachable_at(self.nbd_port)
    }

    /// Where hosts reach this node's iSCSI portal (for redirects from other nodes).
    pub fn iscsi_addr(&self) -> String {
        self.reachable_at(self.iscsi_port)
    }

    fn reachable_at(&self, port: u16) -> String {
        let host = self
            .advertise
            .as_deref()
            .and_then(|a| a.rsplit_once(':').map(|(h, _)| h))
            .unwrap_or(&self.listen);
        format!("{host}:{port}")
    }

    /// The disk health policy these keys describe.
    pub fn health_policy(&self) -> blockstore::health::HealthPolicy {
        blockstore::health::HealthPolicy {
            io_timeout: std::time::Duration::from_secs(self.disk_io_timeout_secs),
            readmit_after: std::time::Duration::from_secs(self.disk_readmit_after_secs),
            offline_limit: self.disk_offline_limit,
            window: blockstore::health::DEFAULT_OFFLINE_WINDOW,
        }
    }

    /// The embedded default: one file-backed device and a thin 4 GiB vdisk `vd0`.
    pub fn embedded_default() -> Self {
        Self {
            node_id: default_node_id(),
            listen: default_listen(),
            nbd_port: DEFAULT_NBD_PORT,
            iscsi_port: DEFAULT_ISCSI_PORT,
            grpc_port: DEFAULT_GRPC_PORT,
            data_port: DEFAULT_DATA_PORT,
            advertise: None,
            peers: Vec::new(),
            block: String::new(),
            rack: String::new(),
            join: false,
            metadata_shards: default_shards(),
            fault_tolerance: default_fault_tolerance(),
            cores: 0,
            pin_cores: true,
            cache_size: default_cache(),
            oplog_cap: default_oplog_cap(),
            drain_delay_ms: default_drain_delay(),
            disk_io_timeout_secs: default_disk_io_timeout(),
            disk_readmit_after_secs: default_disk_readmit_after(),
            disk_offline_limit: default_disk_offline_limit(),
            scrub_rate: default_scrub_rate(),
            scrub_interval_secs: default_scrub_interval(),
            devices: vec![DeviceConfig {
                path: PathBuf::from("dev0.img"),
                size: Some(Size(DEFAULT_DEVICE_BYTES)),
                tier: Tier::Ssd,
            }],
            vdisks: vec![VdiskEntry {
                name: "vd0".to_string(),
                size: Size(DEFAULT_VDISK_BYTES),
                container: default_container(),
                device: 0,
            }],
        }
    }

    /// Parses `text` (from `file`), then validates.
    pub fn parse(text: &str, file: &Path) -> Result<Self> {
        let cfg: NodeConfig = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("{}: {}", file.display(), e.to_string().trim_end()))?;
        cfg.validate()
            .with_context(|| format!("{}", file.display()))?;
        Ok(cfg)
    }

    /// Reads and parses `file`.
    pub fn load(file: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        Self::parse(&text, file)
    }

    /// Checks values that the types cannot.
    pub fn validate(&self) -> Result<()> {
        if self.devices.is_empty() {
            bail!("key `device`: at least one device is needed");
        }
        if self.node_id == 0 {
            bail!("key `node_id`: 0 is reserved, use 1 or more");
        }
        if !(1..=controlplane::server::MAX_METADATA_SHARDS).contains(&self.metadata_shards) {
            bail!(
                "key `metadata_shards`: {} is outside 1..={}",
                self.metadata_shards,
                controlplane::server::MAX_METADATA_SHARDS
            );
        }
        let founders = self.founders()?;
        if !(1..=2).contains(&self.fault_tolerance) {
            bail!(
                "key `fault_tolerance`: {} is not 1 or 2",
                self.fault_tolerance
            );
        }
        if self.fault_tolerance == 2 && !founders.is_empty() && founders.len() < 5 {
            bail!(
                "key `fault_tolerance`: 2 needs at least 5 founding `peers`, not {}",
                founders.len()
            );
        }
        if self.join && !self.peers.is_empty() {
            bail!("key `join`: a joining node has no founding `peers`");
        }
        let mut names = std::collections::HashSet::new();
        for (i, v) in self.vdisks.iter().enumerate() {
            let key = format!("vdisk[{i}]");
            if v.name.is_empty()
                || v.name.len() > 200
                || !v
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                bail!(
                    "key `{key}.name`: '{}' must be 1 to 200 characters of letters, digits, '-', '_' or '.'",
                    v.name
                );
            }
            if !names.insert(v.name.clone()) {
                bail!("key `{key}.name`: duplicate vdisk name '{}'", v.name);
            }
            if v.size.0 == 0 || !v.size.0.is_multiple_of(VDISK_SIZE_ALIGNMENT) {
                bail!(
                    "key `{key}.size`: {} bytes is not a non-zero multiple of 1 MiB",
                    v.size.0
                );
            }
            if v.device >= self.devices.len() {
                bail!(
                    "key `{key}.device`: device {} does not exist ({} configured)",
                    v.device,
                    self.devices.len()
                );
            }
        }
        if self.cache_size.0 < 4096 * 16 {
            bail!(
                "key `cache_size`: {} bytes is below the 64 KiB minimum",
                self.cache_size.0
            );
        }
        if self.oplog_cap.0 < 8 << 20 {
            bail!(
                "key `oplog_cap`: {} bytes is below the 8 MiB minimum",
                self.oplog_cap.0
            );
        }
        if self.disk_io_timeout_secs == 0 {
            bail!("key `disk_io_timeout_secs`: must be at least 1");
        }
        if self.disk_offline_limit == 0 {
            bail!("key `disk_offline_limit`: must be at least 1");
        }
        if self.scrub_interval_secs == 0 {
            bail!("key `scrub_interval_secs`: must be at least 1");
        }
        Ok(())
    }

    /// The founding voters from `peers` (node id -> control address); empty: single node.
    pub fn founders(&self) -> Result<std::collections::BTreeMap<u64, String>> {
        let mut out = std::collections::BTreeMap::new();
        for (i, p) in self.peers.iter().enumerate() {
            let Some((id, addr)) = p.split_once('=') else {
                bail!("key `peers[{i}]`: '{p}' is not id=host:port");
            };
            let id: u64 = match id.trim().parse() {
                Ok(id) if id > 0 => id,
                _ => bail!("key `peers[{i}]`: '{id}' is not a node id (> 0)"),
            };
            if addr
                .trim()
                .rsplit_once(':')
                .is_none_or(|(h, port)| h.is_empty() || port.parse::<u16>().is_err())
            {
                bail!("key `peers[{i}]`: '{addr}' is not host:port");
            }
            if out.insert(id, addr.trim().to_string()).is_some() {
                bail!("key `peers[{i}]`: node id {id} appears twice");
            }
        }
        if !out.is_empty() && !out.contains_key(&self.node_id) {
            bail!(
                "key `peers`: this node ({}) is not among the founding voters",
                self.node_id
            );
        }
        Ok(out)
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a node config always serializes")
    }

    /// `path` resolved against the data directory.
    pub fn resolve(data_dir: &Path, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            data_dir.join(path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig> {
        NodeConfig::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn embedded_default_round_trips() {
        let d = NodeConfig::embedded_default();
        assert_eq!(parse(&d.to_toml()).unwrap(), d);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_file_key_and_reason() {
        let base = NodeConfig::embedded_default().to_toml();
        let e = parse(&format!("bogus = 1\n{base}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("test.toml") && e.contains("bogus"), "{e}");
        let e = parse(&base.replace("size = \"4GiB\"", "size = \"4XB\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown unit"), "{e}");
        let e = format!(
            "{:#}",
            parse(&base.replace("node_id = 1", "node_id = 0")).unwrap_err()
        );
        assert!(e.contains("node_id") && e.contains("test.toml"), "{e}");
        let e = format!(
            "{:#}",
            parse(&format!("peers = [\"1=a:1\", \"2=b\"]\n{base}")).unwrap_err()
        );
        assert!(e.contains("peers[1]") && e.contains("host:port"), "{e}");
        let e = format!(
            "{:#}",
            parse(&format!("peers = [\"2=a:1\"]\n{base}")).unwrap_err()
        );
        assert!(e.contains("not among the founding voters"), "{e}");
        let e = parse(&base.replace("tier = \"ssd\"", "tier = \"tape\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown tier 'tape'"), "{e}");
        let e = format!(
            "{:#}",
            parse(&base.replace("size = \"4GiB\"", "size = 1000")).unwrap_err()
        );
        assert!(e.contains("multiple of 1 MiB"), "{e}");
    }
}
