//! The control plane through the `cairn` binary, as an operator drives it: standalone
//! `cairn controlplane run` processes and the `cluster`/`container`/`vdisk` commands.
//!
//! * one node: create, duplicates and unknown containers fail with the precise error and a
//!   non-zero exit, `--json` listings parse;
//! * three nodes: kill -9 the config leader, a new leader accepts a write within 10 s and
//!   everything committed before is still listed;
//! * three nodes, iptables (root only, skipped loudly otherwise): a partitioned minority
//!   commits nothing, the majority goes on, and the minority catches up after healing.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_cairn");

/// A `cairn controlplane run` process, killed with -9 when dropped.
struct Node {
    id: u64,
    addr: SocketAddr,
    child: Option<Child>,
    args: Vec<String>,
}

impl Node {
    fn start(id: u64, dir: &Path, addr: SocketAddr, peers: &str) -> Self {
        let mut args = vec![
            "controlplane".to_string(),
            "run".into(),
            "--data-dir".into(),
            dir.join(format!("n{id}")).display().to_string(),
            "--listen".into(),
            addr.to_string(),
            "--node-id".into(),
            id.to_string(),
            "--shards".into(),
            "2".into(),
        ];
        if !peers.is_empty() {
            args.push("--peers".into());
            args.push(peers.into());
        }
        let mut node = Node {
            id,
            addr,
            child: None,
            args,
        };
        node.restart();
        node
    }

    fn restart(&mut self) {
        let log = std::fs::File::create(std::env::temp_dir().join(format!(
            "cairn-cluster-cli-{}-n{}.log",
            self.addr.port(),
            self.id
        )))
        .unwrap();
        self.child = Some(
            Command::new(BIN)
                .args(&self.args)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn cairn controlplane run"),
        );
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_addr(ip: &str) -> SocketAddr {
    TcpListener::bind(format!("{ip}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Runs `cairn <args> --endpoint <endpoint>`.
fn cairn(endpoint: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .args(["--endpoint", endpoint])
        .output()
        .expect("run cairn")
}

fn ok(endpoint: &str, args: &[&str]) -> String {
    let out = cairn(endpoint, args);
    assert!(
        out.status.success(),
        "cairn {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(endpoint: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    serde_json::from_str(&ok(endpoint, &all)).expect("--json output parses")
}

fn fails_with(endpoint: &str, args: &[&str], needle: &str) {
    let out = cairn(endpoint, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "cairn {args:?} should fail");
    assert!(
        stderr.contains(needle),
        "cairn {args:?}: expected {needle:?} in {stderr:?}"
    );
}

/// Waits until every group has a leader as `endpoint` sees it.
fn wait_healthy(endpoint: &str, voters: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = cairn(
            endpoint,
            &["cluster", "status", "--json", "--retry-secs", "1"],
        );
        if out.status.success() {
            let s: Value = serde_json::from_slice(&out.stdout).unwrap();
            let groups = s["groups"].as_array().unwrap();
            if groups.iter().all(|g| {
                g["healthy"] == Value::Bool(true) && g["voters"].as_array().unwrap().len() == voters
            }) {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "cluster at {endpoint} never became healthy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

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

fn three_nodes(dir: &Path, ips: [&str; 3]) -> Vec<Node> {
    let addrs: Vec<SocketAddr> = ips.iter().map(|ip| free_addr(ip)).collect();
    let peers = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| Node::start(i as u64 + 1, dir, *a, &peers))
        .collect()
}

fn endpoints(nodes: &[Node], except: Option<u64>) -> String {
    nodes
        .iter()
        .filter(|n| Some(n.id) != except)
        .map(|n| n.addr.to_string())
        .collect::<Vec<_>>()
        .join(",")
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
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = json(&back, &["cluster", "status"]);
        if s["config_version"] == json(&survivors, &["cluster", "status"])["config_version"] {
            break;
        }
        assert!(Instant::now() < deadline, "restarted node never caught up");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn iptables(args: &[&str]) -> bool {
    Command::new("iptables")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Drops traffic between `ip` and each of `others` while alive.
struct Partition {
    rules: Vec<Vec<String>>,
}

impl Partition {
    fn cut(ip: &str, others: &[&str]) -> Self {
        let mut rules = Vec::new();
        for o in others {
            for (s, d) in [(ip, *o), (*o, ip)] {
                let rule: Vec<String> = ["INPUT", "-s", s, "-d", d, "-j", "DROP"]
                    .iter()
                    .map(|x| x.to_string())
                    .collect();
                let mut add = vec!["-A".to_string()];
                add.extend(rule.iter().cloned());
                assert!(iptables(
                    &add.iter().map(String::as_str).collect::<Vec<_>>()
                ));
                rules.push(rule);
            }
        }
        Partition { rules }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        for rule in &self.rules {
            let mut del = vec!["-D".to_string()];
            del.extend(rule.iter().cloned());
            iptables(&del.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
}

#[test]
fn a_partitioned_minority_commits_nothing_and_catches_up_after_healing() {
    if !iptables(&["-L", "INPUT", "-n"]) {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "iptables is required in CI (scripts/setup.sh installs it; tests run as root)"
        );
        eprintln!(
            "!!!!!!!! SKIPPED: iptables is not usable here (needs root and the iptables package)"
        );
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
        ok(
            &majority,
            &["container", "create", "majority", "--retry-secs", "10"],
        );
    }
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
}
