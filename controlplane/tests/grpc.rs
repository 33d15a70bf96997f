//! Raft groups over real gRPC on loopback: two groups multiplexed on one channel per peer, a
//! late node catching up through InstallSnapshot chunks, and precise status codes for bad
//! messages.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cairn_proto::v1::RaftRequest;
use cairn_proto::v1::raft_service_client::RaftServiceClient;
use controlplane::grpc::{GrpcTransport, serve};
use controlplane::{Expect, GroupOptions, KvOp, NodeId, RaftGroup, RaftRegistry, ReadConsistency};
use openraft::ServerState;

struct Node {
    addr: String,
    groups: BTreeMap<u64, RaftGroup>,
    registry: RaftRegistry,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start_node(dir: &std::path::Path, id: NodeId, groups: &[u64]) -> Node {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let registry = RaftRegistry::new();
    let transport = GrpcTransport::new();
    let mut opened = BTreeMap::new();
    for &g in groups {
        let mut options = GroupOptions::for_tests(id, g);
        options.raft.snapshot_policy = openraft::SnapshotPolicy::Never;
        options.raft.max_in_snapshot_log_to_keep = 0;
        options.raft.snapshot_max_chunk_size = 64; // many chunks on the wire
        let group = RaftGroup::open(options, &dir.join(format!("n{id}-g{g}")), transport.clone())
            .await
            .unwrap();
        registry.insert(g, group.raft().clone());
        opened.insert(g, group);
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, registry.clone(), async {
        let _ = stopped.await;
    }));
    Node {
        addr,
        groups: opened,
        registry,
        _stop: stop,
    }
}

async fn leader_of(nodes: &BTreeMap<NodeId, Node>, g: u64) -> NodeId {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for (id, node) in nodes {
            if let Some(group) = node.groups.get(&g)
                && group.metrics().state == ServerState::Leader
            {
                return *id;
            }
        }
        assert!(Instant::now() < deadline, "group {g} elected no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn put(key: &str) -> KvOp {
    KvOp::Put {
        key: key.as_bytes().to_vec(),
        value: key.as_bytes().repeat(20),
        expect: Expect::Absent,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_share_one_grpc_channel_per_peer_and_a_late_node_gets_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = BTreeMap::new();
    for id in 1..=3 {
        nodes.insert(id, start_node(dir.path(), id, &[0, 1]).await);
    }
    let voters: BTreeMap<NodeId, String> =
        nodes.iter().map(|(id, n)| (*id, n.addr.clone())).collect();
    for g in [0, 1] {
        nodes[&1].groups[&g]
            .initialize(voters.clone())
            .await
            .unwrap();
    }

    // Both groups commit independently over the same channels.
    let mut last = BTreeMap::new();
    for g in [0, 1] {
        let leader = leader_of(&nodes, g).await;
        for i in 0..30 {
            let v = nodes[&leader].groups[&g]
                .apply(vec![put(&format!("g{g}/k{i:02}"))])
                .await
                .unwrap();
            last.insert(g, v);
        }
    }

    // Compact group 1 and bring in node 4: it can only catch up from the snapshot.
    let g1_leader = leader_of(&nodes, 1).await;
    let group = nodes[&g1_leader].groups[&1].clone();
    group.snapshot_now().await.unwrap();
    let applied = group.metrics().last_applied;
    let deadline = Instant::now() + Duration::from_secs(5);
    while group.metrics().purged.map(|p| p.index) < applied.map(|a| a.index) {
        assert!(Instant::now() < deadline, "no purge");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let node4 = start_node(dir.path(), 4, &[1]).await;
    let addr4 = node4.addr.clone();
    nodes.insert(4, node4);
    let all: BTreeSet<NodeId> = (1..=4).collect();
    group.change_voters(Some((4, addr4)), all).await.unwrap();
    let g4 = nodes[&4].groups[&1].clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while g4.applied_version().unwrap() < last[&1] {
        assert!(Instant::now() < deadline, "node 4 did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        g4.metrics().snapshot.is_some(),
        "node 4 installed a snapshot"
    );
    assert_eq!(
        g4.scan(b"g1/", ReadConsistency::Local).await.unwrap(),
        group
            .scan(b"g1/", ReadConsistency::Linearizable)
            .await
            .unwrap()
    );
    // Node 4 votes now: the 4-voter group still commits.
    let v = group.apply(vec![put("g1/after")]).await.unwrap();
    assert_eq!(v, last[&1] + 1);

    // Bad messages get precise status codes, not panics.
    let mut client = RaftServiceClient::connect(format!("http://{}", nodes[&1].addr))
        .await
        .unwrap();
    let bad = |group_id, payload_format, payload: &[u8]| RaftRequest {
        group_id,
        payload_format,
        payload: payload.to_vec(),
    };
    let code = |r: Result<_, tonic::Status>| r.map(|_| ()).unwrap_err().code();
    assert_eq!(
        code(client.vote(bad(99, 1, b"")).await),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(client.vote(bad(0, 7, b"")).await),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(
        code(client.append_entries(bad(0, 1, &[0xff; 3])).await),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(client.install_snapshot(bad(1, 1, &[0x80])).await),
        tonic::Code::InvalidArgument
    );
    drop(nodes[&1].registry.remove(0));
    assert_eq!(
        code(client.vote(bad(0, 1, b"")).await),
        tonic::Code::NotFound
    );
}
