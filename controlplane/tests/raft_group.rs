//! A three-voter raft group on the in-process router: election, CAS batches, leader crash,
//! partitions, snapshots with log purge, restart from disk, message loss.

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, put};
use controlplane::{Expect, GroupError, KvError, KvOp, ReadConsistency};

fn no_tweak(_: &mut controlplane::GroupOptions) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_voters_elect_a_leader_and_commit_cas_batches() {
    let cluster = Cluster::start(3, no_tweak).await;
    let leader = cluster.leader().await;
    let group = cluster.node(leader);

    let v1 = group
        .apply(vec![
            put("v/1/a", "x", Expect::Absent),
            put("v/1/b", "y", Expect::Absent),
        ])
        .await
        .unwrap();
    assert_eq!(v1, 1, "first batch gets version 1");

    // A failed condition rejects the whole batch and consumes no version.
    let err = group
        .apply(vec![
            put("v/1/c", "z", Expect::Any),
            put("v/1/a", "w", Expect::Version(v1 + 5)),
        ])
        .await
        .unwrap_err();
    match err {
        GroupError::Rejected {
            source: KvError::Conflict { key, found, .. },
            ..
        } => {
            assert_eq!(key, b"v/1/a");
            assert_eq!(found, Some(v1));
        }
        e => panic!("expected a conflict, got {e}"),
    }
    assert_eq!(
        group
            .get(b"v/1/c", ReadConsistency::Linearizable)
            .await
            .unwrap(),
        None
    );

    let v2 = group
        .apply(vec![
            put("v/1/a", "x2", Expect::Version(v1)),
            KvOp::Delete {
                key: b"v/1/b".to_vec(),
                expect: Expect::Version(v1),
            },
        ])
        .await
        .unwrap();
    assert_eq!(v2, 2, "the rejected batch consumed no version");
    let a = group
        .get(b"v/1/a", ReadConsistency::Linearizable)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((a.value.as_slice(), a.version), (&b"x2"[..], 2));

    // A follower refuses writes and linearizable reads, naming the leader.
    let follower = cluster
        .nodes
        .keys()
        .copied()
        .find(|&id| id != leader)
        .unwrap();
    match cluster
        .node(follower)
        .apply(vec![put("v/1/d", "d", Expect::Any)])
        .await
    {
        Err(GroupError::ForwardToLeader {
            leader_id,
            leader_addr,
            ..
        }) => {
            assert_eq!(leader_id, Some(leader));
            assert_eq!(leader_addr, Some(format!("node-{leader}")));
        }
        other => panic!("expected ForwardToLeader, got {other:?}"),
    }
    assert!(matches!(
        cluster
            .node(follower)
            .get(b"v/1/a", ReadConsistency::Linearizable)
            .await,
        Err(GroupError::ForwardToLeader { .. })
    ));
    // An empty batch is refused before it costs a log entry.
    assert!(matches!(
        group.apply(vec![]).await,
        Err(GroupError::Rejected {
            source: KvError::InvalidBatch(_),
            ..
        })
    ));

    cluster.assert_converged(v2).await;
    assert_eq!(
        cluster.dump(follower).await.len(),
        1,
        "followers hold exactly the leader's map"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_takes_over_when_the_leader_dies_and_nothing_committed_is_lost() {
    let mut cluster = Cluster::start(3, no_tweak).await;
    let mut last = 0;
    for i in 0..20 {
        last = cluster
            .write(vec![put(&format!("k/{i:02}"), "before", Expect::Absent)])
            .await;
    }
    let before = cluster.dump(cluster.leader().await).await;
    assert_eq!(before.len(), 20);

    let old = cluster.leader().await;
    cluster.kill(old).await;
    let killed_at = Instant::now();
    let new = cluster
        .leader_among_others(&[], Duration::from_secs(10))
        .await;
    assert_ne!(new, old);
    let v = cluster
        .write(vec![put("k/after", "after", Expect::Absent)])
        .await;
    let took = killed_at.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "new leader accepted a write after {took:?}"
    );
    assert_eq!(v, last + 1);
    // Everything committed before the crash is on the survivors, with its versions.
    for (id, _) in cluster.nodes.iter() {
        cluster.wait_version(*id, v, Duration::from_secs(5)).await;
        let now = cluster.dump(*id).await;
        assert_eq!(&now[..20], &before[..], "node {id}");
    }

    // The dead node restarts from its own redb files and catches up.
    cluster.open(old).await;
    let reopened = cluster.node(old).applied_version().unwrap();
    assert!(
        reopened >= last,
        "node {old} reopened at version {reopened}, had {last}"
    );
    cluster.assert_converged(v).await;
    eprintln!("leader {old} killed; node {new} took over and committed in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_commits_nothing_and_catches_up_after_healing() {
    let cluster = Cluster::start(3, no_tweak).await;
    let base = cluster
        .write(vec![put("p/base", "0", Expect::Absent)])
        .await;
    cluster.assert_converged(base).await;

    let old = cluster.leader().await;
    cluster.router.isolate(old);
    // The minority side (the old leader alone) cannot commit: its write times out.
    let err = cluster
        .node(old)
        .apply(vec![put("p/minority", "lost", Expect::Absent)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            GroupError::Timeout { .. } | GroupError::ForwardToLeader { .. }
        ),
        "{err}"
    );

    // The majority elects a leader and goes on.
    let new = cluster
        .leader_among_others(&[old], Duration::from_secs(10))
        .await;
    assert_ne!(new, old);
    let mut last = base;
    for i in 0..10 {
        last = cluster
            .node(new)
            .apply(vec![put(&format!("p/majority/{i}"), "1", Expect::Absent)])
            .await
            .unwrap();
    }
    assert_eq!(
        cluster.node(old).applied_version().unwrap(),
        base,
        "the isolated node applied nothing"
    );

    cluster.router.heal();
    cluster.assert_converged(last).await;
    for (id, _) in cluster.nodes.iter() {
        assert_eq!(
            cluster
                .node(*id)
                .get(b"p/minority", ReadConsistency::Local)
                .await
                .unwrap(),
            None,
            "node {id}: the minority's uncommitted write was discarded"
        );
        assert_eq!(cluster.dump(*id).await.len(), 11);
    }
}

fn snapshot_tweak(options: &mut controlplane::GroupOptions) {
    // Snapshots only when asked, and no log kept behind them: a lagging node must take one.
    options.raft.snapshot_policy = openraft::SnapshotPolicy::Never;
    options.raft.max_in_snapshot_log_to_keep = 0;
    options.raft.purge_batch_size = 1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_node_catches_up_through_install_snapshot_after_log_purge() {
    let cluster = Cluster::start(3, snapshot_tweak).await;
    let leader = cluster.leader().await;
    let lagging = cluster
        .nodes
        .keys()
        .copied()
        .find(|&id| id != leader)
        .unwrap();
    cluster.router.isolate(lagging);

    let mut last = 0;
    for i in 0..40 {
        last = cluster
            .node(leader)
            .apply(vec![put(
                &format!("s/{i:02}"),
                &"v".repeat(i),
                Expect::Absent,
            )])
            .await
            .unwrap();
    }
    cluster
        .node(leader)
        .apply(vec![KvOp::Delete {
            key: b"s/00".to_vec(),
            expect: Expect::Any,
        }])
        .await
        .unwrap();
    last += 1;

    // Compact every node that may lead after the heal (the isolated node's rising term can
    // force a new election), so whoever leads can only send a snapshot.
    let applied = cluster.node(leader).metrics().last_applied.unwrap();
    for (&id, group) in cluster.nodes.iter().filter(|(id, _)| **id != lagging) {
        cluster.wait_version(id, last, Duration::from_secs(5)).await;
        group.snapshot_now().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while group
            .metrics()
            .purged
            .is_none_or(|p| p.index < applied.index)
        {
            assert!(
                Instant::now() < deadline,
                "node {id} did not purge its log: {:?}",
                group.metrics()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            group.log_entries_held().unwrap(),
            0,
            "node {id}: log compacted"
        );
    }

    cluster.router.heal();
    cluster.assert_converged(last).await;
    // Metrics are published just after the state machine changes: poll them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while cluster
        .node(lagging)
        .metrics()
        .snapshot
        .is_none_or(|s| s.index < applied.index)
    {
        assert!(
            Instant::now() < deadline,
            "node {lagging} did not catch up from a snapshot: {:?}",
            cluster.node(lagging).metrics()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cluster.dump(lagging).await.len(), 39);

    // The group goes on normally after the snapshot.
    let v = cluster
        .write(vec![put("s/after", "x", Expect::Absent)])
        .await;
    cluster.assert_converged(v).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_commit_exactly_once_under_message_loss() {
    let cluster = Cluster::start(3, no_tweak).await;
    cluster.router.set_loss(100_000, 0x5eed); // 10 % of messages lost
    let mut last = 0;
    for i in 0..20 {
        // CAS makes a retried write safe: a retry that finds its own write reports a conflict
        // on exactly the version it wrote.
        let key = format!("l/{i:02}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let leader = cluster.leader().await;
            match cluster
                .node(leader)
                .apply(vec![put(&key, "v", Expect::Absent)])
                .await
            {
                Ok(v) => {
                    last = v;
                    break;
                }
                Err(GroupError::Rejected {
                    source: KvError::Conflict { found: Some(v), .. },
                    ..
                }) => {
                    last = v;
                    break;
                }
                Err(e @ (GroupError::Timeout { .. } | GroupError::ForwardToLeader { .. })) => {
                    assert!(Instant::now() < deadline, "{key}: {e}");
                }
                Err(e) => panic!("{key}: {e}"),
            }
        }
    }
    let (delivered, lost) = cluster.router.message_counts();
    assert!(lost > 0, "the router lost messages ({delivered} delivered)");
    cluster.router.heal();
    cluster.assert_converged(last).await;
    assert_eq!(cluster.dump(1).await.len(), 20);
}
