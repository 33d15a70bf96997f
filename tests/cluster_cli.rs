//! The control plane through the `cairn` binary, as an operator drives it: standalone
//! `cairn controlplane run` processes and the `cluster`/`container`/`vdisk` commands.
//!
//! * one node: create, duplicates and unknown containers fail with the precise error and a
//!   non-zero exit, `--json` listings parse;
//! * three nodes: kill -9 the config leader, a new leader accepts a write within 10 s and
//!   everything committed before is still listed;
//! * three nodes, iptables (root only, skipped loudly otherwise): a partitioned minority
//!   commits nothing, the majority goes on, and the minority catches up after healing.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn single_node_config_commands_and_precise_errors() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr("127.0.0.1");
    let _node = Node::start(1, dir.path(), addr, "");
    let ep = addr.to_string();
    wait_healthy(&ep, 1);

    let created = json(&ep, &["cluster", "create", "--name", "test"]);
    // Idempotent for the same name, refused for another.
    let again = json(&ep, &["cluster", "create", "--name", "test"]);
    assert_eq!(created["cluster_id"], again["cluster_id"]);
    fails_with(
        &ep,
        &["cluster", "create", "--name", "other"],
        "AlreadyExists",
    );

    ok(
        &ep,
        &[
            "container",
            "create",
            "c1",
            "--rf",
            "2",
            "--compression",
            "lz4",
        ],
    );
    fails_with(
        &ep,
        &["container", "create", "c1"],
        "AlreadyExists: Container c1 already exists",
    );
    fails_with(
        &ep,
        &["container", "create", "c2", "--rf", "5"],
        "InvalidArgument",
    );
    fails_with(
        &ep,
        &[
            "vdisk",
            "create",
            "vd1",
            "--container",
            "nope",
            "--size",
            "4GiB",
        ],
        "NotFound: Container nope not found",
    );
    fails_with(
        &ep,
        &[
            "vdisk",
            "create",
            "vd1",
            "--container",
            "c1",
            "--size",
            "4097",
        ],
        "InvalidArgument",
    );
    ok(
        &ep,
        &[
            "vdisk",
            "create",
            "vd1",
            "--container",
            "c1",
            "--size",
            "4GiB",
        ],
    );
    ok(&ep, &["vdisk", "resize", "vd1", "--size", "8GiB"]);
    fails_with(
        &ep,
        &["vdisk", "resize", "vd1", "--size", "1GiB"],
        "FailedPrecondition",
    );
    fails_with(&ep, &["container", "delete", "c1"], "FailedPrecondition");

    let vdisks = json(&ep, &["vdisk", "list"]);
    assert_eq!(names(&vdisks), ["vd1"]);
    assert_eq!(vdisks[0]["size_bytes"], 8u64 << 30);
    assert_eq!(vdisks[0]["container"], "c1");
    let containers = json(&ep, &["container", "list"]);
    assert_eq!(containers[0]["compression"], "lz4");

    ok(&ep, &["vdisk", "delete", "vd1"]);
    ok(&ep, &["container", "delete", "c1"]);
    assert_eq!(names(&json(&ep, &["container", "list"])).len(), 0);

    // Nothing listens here: a precise UNAVAILABLE after the retry time, non-zero exit.
    let dead = free_addr("127.0.0.1").to_string();
    fails_with(
        &dead,
        &["container", "list", "--retry-secs", "0"],
        "Unavailable",
    );
}

#[test]
fn three_nodes_survive_kill_9_of_the_config_leader() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(dir.path(), ["127.0.0.1"; 3]);
    let all = endpoints(&nodes, None);
    let status = wait_healthy(&all, 3);
    ok(&all, &["cluster", "create", "--name", "three"]);
    ok(&all, &["container", "create", "before"]);
    ok(
        &all,
        &[
            "vdisk",
            "create",
            "vd",
            "--container",
            "before",
            "--size",
            "1GiB",
        ],
    );

    let leader = status["config_leader"].as_u64().unwrap();
    assert!(leader > 0);
    nodes[leader as usize - 1].kill();
    let survivors = endpoints(&nodes, Some(leader));
    let t0 = Instant::now();
    ok(
        &survivors,
        &["container", "create", "after", "--retry-secs", "10"],
    );
    let failover = t0.elapsed();
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );

    assert_eq!(
        names(&json(&survivors, &["container", "list"])),
        ["after", "before"]
    );
    assert_eq!(names(&json(&survivors, &["vdisk", "list"])), ["vd"]);
    let s = json(&survivors, &["cluster", "status"]);
    assert_ne!(s["config_leader"].as_u64().unwrap(), leader);
    let down: Vec<u64> = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["state"] == "down")
        .map(|n| n["node_id"].as_u64().unwrap())
        .collect();
    assert_eq!(down, [leader]);

    // The killed node comes back and catches up.
    nodes[leader as usize - 1].restart();
    let back = nodes[leader as usize - 1].addr.to_string();
    let restarted = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = json(&back, &["cluster", "status"]);
        if s["config_version"] == json(&survivors, &["cluster", "status"])["config_version"] {
            break;
        }
        assert!(Instant::now() < deadline, "restarted node never caught up");
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "config leader node {leader} killed (-9): a config write was accepted {:.1} s later by \
         node {}; nothing committed lost; the node, restarted, caught up in {:.1} s",
        failover.as_secs_f64(),
        s["config_leader"],
        restarted.elapsed().as_secs_f64()
    );
}

#[test]
fn a_partitioned_minority_commits_nothing_and_catches_up_after_healing() {
    if !iptables_usable("a_partitioned_minority_commits_nothing") {
        return;
    }
    let ips = ["127.0.0.61", "127.0.0.62", "127.0.0.63"];
    let dir = tempfile::tempdir().unwrap();
    let nodes = three_nodes(dir.path(), ips);
    let all = endpoints(&nodes, None);
    wait_healthy(&all, 3);
    ok(&all, &["container", "create", "before"]);

    let minority = nodes[1].addr.to_string();
    let majority = endpoints(&nodes, Some(2));
    {
        let _cut = Partition::cut(ips[1], &[ips[0], ips[2]]);
        // The minority cannot commit (directly or through a leader it cannot reach).
        fails_with(
            &minority,
            &["container", "create", "minority", "--retry-secs", "3"],
            "Unavailable",
        );
        // The majority can (possibly after electing a new leader).
        let cut_at = Instant::now();
        ok(
            &majority,
            &["container", "create", "majority", "--retry-secs", "10"],
        );
        println!(
            "partition: node 2 cut off; its write failed (Unavailable); the majority committed \
             in {} ms",
            cut_at.elapsed().as_millis()
        );
    }
    let healed = Instant::now();
    // Healed: the minority node sees the majority's write and not its own.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = cairn(
            &minority,
            &["container", "list", "--json", "--retry-secs", "2"],
        );
        if out.status.success() {
            let listed = names(&serde_json::from_slice(&out.stdout).unwrap());
            if listed == ["before", "majority"] {
                break;
            }
            assert!(!listed.contains(&"minority".to_string()), "{listed:?}");
        }
        assert!(Instant::now() < deadline, "minority never caught up");
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_healthy(&minority, 3);
    println!(
        "partition healed: node 2 has the majority's write and not its own after {} ms",
        healed.elapsed().as_millis()
    );
}
