//! A cluster of raft groups (one group, N nodes) on the in-process router, each node with its
//! own redb directory, driven like a script: `cluster.kill(1)`, `cluster.isolate(2)`, ...

#![allow(dead_code)] // each test file uses a different part

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use controlplane::{
    Expect, GroupError, GroupOptions, KvOp, MemRouter, NodeId, RaftGroup, RaftRegistry,
    ReadConsistency, Versioned,
};
use openraft::ServerState;

/// The group every test cluster runs.
pub const GROUP: u64 = 7;

pub struct Cluster {
    pub router: MemRouter,
    dir: tempfile::TempDir,
    pub nodes: BTreeMap<NodeId, RaftGroup>,
    tweak: fn(&mut GroupOptions),
}

pub fn put(key: &str, value: &str, expect: Expect) -> KvOp {
    KvOp::Put {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        expect,
    }
}

impl Cluster {
    /// Starts `n` voters (ids 1..=n) and forms the group from node 1.
    pub async fn start(n: u64, tweak: fn(&mut GroupOptions)) -> Self {
        let mut cluster = Self {
            router: MemRouter::new(),
            dir: tempfile::tempdir().unwrap(),
            nodes: BTreeMap::new(),
            tweak,
        };
        for id in 1..=n {
            cluster.open(id).await;
        }
        let voters = (1..=n).map(|id| (id, format!("node-{id}"))).collect();
        cluster.nodes[&1].initialize(voters).await.unwrap();
        cluster
    }

    /// Opens (or reopens from its directory) node `id` and connects it to the router.
    pub async fn open(&mut self, id: NodeId) {
        let mut options = GroupOptions::for_tests(id, GROUP);
        (self.tweak)(&mut options);
        let group = RaftGroup::open(
            options,
            &self.dir.path().join(format!("node-{id}")),
            self.router.clone(),
        )
        .await
        .unwrap();
        let registry = RaftRegistry::new();
        registry.insert(GROUP, group.raft().clone());
        self.router.add_node(id, registry);
        self.nodes.insert(id, group);
    }

    /// Stops node `id` as a crash would: no more messages in or out, raft stopped.
    pub async fn kill(&mut self, id: NodeId) {
        self.router.remove_node(id);
        let group = self.nodes.remove(&id).unwrap();
        group.shutdown().await.unwrap();
    }

    pub fn node(&self, id: NodeId) -> &RaftGroup {
        &self.nodes[&id]
    }

    /// Waits until the live nodes outside `excluded` agree on one leader among them.
    pub async fn leader_among_others(&self, excluded: &[NodeId], within: Duration) -> NodeId {
        let deadline = Instant::now() + within;
        loop {
            let candidates: Vec<_> = self
                .nodes
                .iter()
                .filter(|(id, _)| !excluded.contains(id))
                .map(|(id, g)| (*id, g.metrics()))
                .collect();
            let leaders: Vec<_> = candidates
                .iter()
                .filter(|(_, m)| m.state == ServerState::Leader)
                .map(|(id, m)| (m.current_term, *id))
                .collect();
            if let Some(&(term, leader)) = leaders.iter().max() {
                let agree = candidates
                    .iter()
                    .filter(|(_, m)| m.current_term == term && m.current_leader == Some(leader))
                    .count();
                if agree * 2 > candidates.len() {
                    return leader;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no leader among {candidates:?} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn leader(&self) -> NodeId {
        self.leader_among_others(&[], Duration::from_secs(10)).await
    }

    /// Writes through `node`, retrying while the group is between leaders.
    pub async fn write(&self, ops: Vec<KvOp>) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let leader = self.leader().await;
            match self.node(leader).apply(ops.clone()).await {
                Ok(version) => return version,
                Err(GroupError::ForwardToLeader { .. } | GroupError::Timeout { .. })
                    if Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("write failed: {e}"),
            }
        }
    }

    /// This node's whole map, read locally.
    pub async fn dump(&self, id: NodeId) -> Vec<(Vec<u8>, Versioned)> {
        self.node(id)
            .scan(b"", ReadConsistency::Local)
            .await
            .unwrap()
    }

    /// Waits until node `id` has applied batch `version`.
    pub async fn wait_version(&self, id: NodeId, version: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.node(id).applied_version().unwrap() < version {
            assert!(
                Instant::now() < deadline,
                "node {id} stuck at version {} < {version}",
                self.node(id).applied_version().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every live node has applied `version`, then checks that their maps are equal.
    pub async fn assert_converged(&self, version: u64) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for &id in &ids {
            self.wait_version(id, version, Duration::from_secs(10))
                .await;
        }
        let first = self.dump(ids[0]).await;
        for &id in &ids[1..] {
            assert_eq!(
                self.dump(id).await,
                first,
                "node {id} differs from node {}",
                ids[0]
            );
        }
    }
}
