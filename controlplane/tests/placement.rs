//! Voter placement on a live 4-node cluster of in-process control planes: voters spread over
//! blocks, a voter that goes down is replaced by a caught-up node, and placement is restored when
//! it returns; metadata shards are hosted by their voters only.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use cairn_proto::v1 as pb;
use controlplane::GroupOptions;
use controlplane::client::Endpoints;
use controlplane::server::{ControlPlane, ControlPlaneHandle, ControlPlaneOptions};
use pb::cluster_service_client::ClusterServiceClient;
use pb::node_service_client::NodeServiceClient;

const SHARDS: u32 = 2;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(
    id: u64,
    dir: &Path,
    addr: &str,
    block: &str,
    peers: &BTreeMap<u64, String>,
) -> ControlPlaneHandle {
    let mut o = ControlPlaneOptions::new(id, dir.join(format!("n{id}")));
    o.listen = addr.parse().unwrap();
    o.peers = peers.clone();
    o.join = peers.is_empty();
    o.metadata_shards = SHARDS;
    o.block = block.to_string();
    o.devices = vec![pb::DeviceInfo {
        path: format!("/dev/disk-of-{id}"),
        tier: if id.is_multiple_of(2) { "hdd" } else { "ssd" }.into(),
        capacity_bytes: id << 30,
        ..pb::DeviceInfo::default()
    }];
    o.group_options = GroupOptions::for_tests;
    ControlPlane::start(o).unwrap()
}

/// Cluster status as node `addr` sees it.
async fn status(addr: &str) -> Option<pb::ClusterStatus> {
    let eps = Endpoints::new([addr])
        .ok()?
        .retry_for(Duration::from_millis(0));
    eps.call(|ch| async move {
        ClusterServiceClient::new(ch)
            .get_status(pb::GetStatusRequest {})
            .await
    })
    .await
    .ok()
    .map(|r| r.into_inner())
}

/// Polls `addr`'s status until `ok` holds for every group's voters and every metadata shard is
/// hosted by its voters alone (no learner left over: a shard lives on 3 nodes, not on every
/// node); returns the config voters.
async fn wait_voters(
    addr: &str,
    what: &str,
    ok: impl Fn(u64, &BTreeSet<u64>, &BTreeMap<u64, String>) -> bool,
) -> BTreeSet<u64> {
    let t0 = Instant::now();
    let mut last = None;
    while t0.elapsed() < Duration::from_secs(60) {
        if let Some(s) = status(addr).await {
            let blocks: BTreeMap<u64, String> = s
                .nodes
                .iter()
                .filter_map(|n| {
                    let a = n.address.as_ref()?;
                    Some((a.node_id, n.domain.as_ref()?.block.clone()))
                })
                .collect();
            let all = s.groups.len() == SHARDS as usize + 1
                && s.groups.iter().all(|g| {
                    let v: BTreeSet<u64> = g.voters.iter().copied().collect();
                    ok(g.group_id, &v, &blocks) && (g.group_id == 0 || g.learners.is_empty())
                });
            let config: BTreeSet<u64> = s.groups[0].voters.iter().copied().collect();
            if all {
                eprintln!(
                    "{what}: after {:.1} s, config voters {config:?}, blocks {blocks:?}",
                    t0.elapsed().as_secs_f64()
                );
                return config;
            }
            last = Some(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{what}: not reached in 60 s; last status {last:#?}");
}

fn distinct_blocks(v: &BTreeSet<u64>, blocks: &BTreeMap<u64, String>) -> bool {
    let b: BTreeSet<Option<&String>> = v.iter().map(|id| blocks.get(id)).collect();
    v.len() == 3 && b.len() == 3 && b.iter().all(|x| x.is_some_and(|s| !s.is_empty()))
}

#[test]
fn voters_spread_over_blocks_are_replaced_when_down_and_restored_on_return() {
    let dir = tempfile::tempdir().unwrap();
    let addrs: BTreeMap<u64, String> = (1..=4)
        .map(|id| (id, format!("127.0.0.1:{}", free_port())))
        .collect();
    let blocks = BTreeMap::from([(1, "a"), (2, "b"), (3, "c"), (4, "a")]);
    let founders: BTreeMap<u64, String> = addrs
        .iter()
        .filter(|(id, _)| **id <= 3)
        .map(|(id, a)| (*id, a.clone()))
        .collect();
    let mut nodes: BTreeMap<u64, ControlPlaneHandle> = BTreeMap::new();
    for id in 1..=3 {
        nodes.insert(
            id,
            start(id, dir.path(), &addrs[&id], blocks[&id], &founders),
        );
    }
    nodes.insert(
        4,
        start(4, dir.path(), &addrs[&4], blocks[&4], &BTreeMap::new()),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let a1 = addrs[&1].clone();
    rt.block_on(async {
        let eps = Endpoints::new([a1.as_str()])
            .unwrap()
            .retry_for(Duration::from_secs(30));
        let add = pb::AddNodeRequest {
            address: Some(pb::NodeAddress {
                node_id: 4,
                control_addr: addrs[&4].clone(),
                data_addr: String::new(),
            }),
            domain: Some(pb::FailureDomain {
                block: "a".into(),
                rack: String::new(),
            }),
        };
        eps.call(|ch| {
            let add = add.clone();
            async move { NodeServiceClient::new(ch).add_node(add).await }
        })
        .await
        .unwrap();
        // Every group: 3 voters, one per block (b and c have one node each, so both vote).
        let placed = wait_voters(&a1, "spread over blocks", |_, v, b| distinct_blocks(v, b)).await;
        assert!(placed.contains(&2) && placed.contains(&3));
    });
    // Every node's disks, with their tiers, are in the config store (what the node reports).
    let view = nodes[&1].watch_config();
    let t0 = Instant::now();
    loop {
        let disks: Vec<(u64, String, String, u64)> = view
            .borrow()
            .disks
            .iter()
            .map(|s| {
                let d = &s.record;
                (d.node_id, d.path.clone(), d.tier.clone(), d.capacity_bytes)
            })
            .collect();
        let want: Vec<(u64, String, String, u64)> = (1..=4u64)
            .map(|id| {
                let tier = if id.is_multiple_of(2) { "hdd" } else { "ssd" };
                (id, format!("/dev/disk-of-{id}"), tier.to_string(), id << 30)
            })
            .collect();
        if disks == want {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "disks {disks:?}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Node 2 (the only one in block b) goes away: its seats go to caught-up nodes.
    nodes.remove(&2).unwrap().shutdown();
    rt.block_on(async {
        let replaced = wait_voters(&a1, "node 2 down, replaced", |_, v, _| {
            v.len() == 3 && !v.contains(&2)
        })
        .await;
        assert_eq!(replaced, BTreeSet::from([1, 3, 4]));
    });

    // It returns: block awareness puts it back.
    nodes.insert(2, start(2, dir.path(), &addrs[&2], "b", &founders));
    rt.block_on(async {
        let restored = wait_voters(&a1, "node 2 back, restored", |_, v, b| {
            distinct_blocks(v, b) && v.contains(&2)
        })
        .await;
        assert!(restored.contains(&2));
    });
    for (_, n) in nodes {
        n.shutdown();
    }
}
