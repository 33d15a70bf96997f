//! Harness of the multi-process control-plane tests: `cairn controlplane run` processes, the
//! `cairn` CLI as an operator runs it, and iptables partitions between nodes on their own
//! loopback addresses.
//!
//! Every test binary that includes it uses a different part of it.
#![allow(dead_code)]

pub mod nbd;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_cairn");

/// A `cairn controlplane run` process, killed with -9 when dropped.
pub struct Node {
    pub id: u64,
    pub addr: SocketAddr,
    child: Option<Child>,
    args: Vec<String>,
}

impl Node {
    /// A founding node of a cluster of `peers` (`id=addr,...`; empty: single node) with two
    /// metadata shards.
    pub fn start(id: u64, dir: &Path, addr: SocketAddr, peers: &str) -> Self {
        Self::start_with(id, dir, addr, 2, Some(peers))
    }

    /// A node with `shards` metadata shards, founding with `peers` or, when `None`, waiting
    /// (`--join`) to be added with `cairn node add`.
    pub fn start_with(
        id: u64,
        dir: &Path,
        addr: SocketAddr,
        shards: u32,
        peers: Option<&str>,
    ) -> Self {
        let mut args = vec![
            "controlplane".to_string(),
            "run".into(),
            "--data-dir".into(),
            Self::data_dir(dir, id).display().to_string(),
            "--listen".into(),
            addr.to_string(),
            "--node-id".into(),
            id.to_string(),
            "--shards".into(),
            shards.to_string(),
        ];
        match peers {
            Some("") => {}
            Some(peers) => {
                args.push("--peers".into());
                args.push(peers.into());
            }
            None => args.push("--join".into()),
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

    /// Where node `id` of a cluster under `dir` keeps its raft groups.
    pub fn data_dir(dir: &Path, id: u64) -> std::path::PathBuf {
        dir.join(format!("n{id}"))
    }

    /// The node's stderr, kept in the temporary directory for post-mortems.
    pub fn log_path(&self) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "cairn-cluster-test-{}-n{}.log",
            self.addr.port(),
            self.id
        ))
    }

    pub fn restart(&mut self) {
        let log = std::fs::File::create(self.log_path()).unwrap();
        self.child = Some(
            Command::new(BIN)
                .args(&self.args)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn cairn controlplane run"),
        );
    }

    /// kill -9 (no-op when not running).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `tool` is installed. In CI (`CI=true`) a missing tool fails the test instead.
pub fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{tool} is required (install it with scripts/setup.sh)");
        }
        eprintln!("!!!!!!!! SKIPPED: {tool} is not installed (scripts/setup.sh installs it)");
    }
    ok
}

/// A port on `ip` that nothing listens on now, for a node that a test starts (and may restart).
pub fn free_addr(ip: &str) -> SocketAddr {
    let port = free_ports(ip, 1)[0];
    format!("{ip}:{port}").parse().unwrap()
}

/// `n` ports on `ip` that nothing is bound to now, chosen below the kernel's ephemeral range
/// (32768 and up by default). A port from that range (what binding port 0 hands out) can be
/// taken by any outgoing connection between the test choosing it and the node listening on it,
/// or while a killed node is down; CI saw exactly that ("Address already in use"). Each call
/// in a process gets other ports, and processes start at different places.
pub fn free_ports(ip: &str, n: usize) -> Vec<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 12_000;
    const HIGH: u32 = 32_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(2_654_435_761) % (HIGH - LOW);
    let mut found = Vec::with_capacity(n);
    for _ in 0..(HIGH - LOW) {
        let port = (LOW + (start + NEXT.fetch_add(1, Ordering::SeqCst)) % (HIGH - LOW)) as u16;
        if TcpListener::bind((ip, port)).is_ok() {
            found.push(port);
            if found.len() == n {
                return found;
            }
        }
    }
    panic!("no {n} free ports on {ip} in {LOW}..{HIGH}");
}

/// Runs `cairn <args> --endpoint <endpoint>`.
pub fn cairn(endpoint: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .args(["--endpoint", endpoint])
        .output()
        .expect("run cairn")
}

pub fn ok(endpoint: &str, args: &[&str]) -> String {
    let out = cairn(endpoint, args);
    assert!(
        out.status.success(),
        "cairn {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn json(endpoint: &str, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    serde_json::from_str(&ok(endpoint, &all)).expect("--json output parses")
}

pub fn fails_with(endpoint: &str, args: &[&str], needle: &str) {
    let out = cairn(endpoint, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "cairn {args:?} should fail");
    assert!(
        stderr.contains(needle),
        "cairn {args:?}: expected {needle:?} in {stderr:?}"
    );
}

/// `cairn cluster status --json` as `endpoint` answers it, or `None` if it does not.
pub fn try_status(endpoint: &str) -> Option<Value> {
    let out = cairn(
        endpoint,
        &["cluster", "status", "--json", "--retry-secs", "1"],
    );
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// Polls cluster status at `endpoint` until `done` holds of it, for up to `within`.
pub fn wait_status(
    endpoint: &str,
    within: Duration,
    what: &str,
    mut done: impl FnMut(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        if let Some(s) = try_status(endpoint) {
            if done(&s) {
                return s;
            }
            last = Some(s);
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {within:?} at {endpoint}; last status {last:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until every group has a leader and `voters` voters as `endpoint` sees it.
pub fn wait_healthy(endpoint: &str, voters: usize) -> Value {
    wait_status(endpoint, Duration::from_secs(30), "healthy", |s| {
        groups(s).iter().all(|g| {
            g["healthy"] == Value::Bool(true) && g["voters"].as_array().unwrap().len() == voters
        })
    })
}

/// The `groups` of a status.
pub fn groups(status: &Value) -> &Vec<Value> {
    status["groups"].as_array().unwrap()
}

/// Node ids of a JSON array.
pub fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

pub fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

/// Founding nodes 1..=3 on `ips` with `shards` metadata shards.
pub fn three_nodes_with(dir: &Path, ips: [&str; 3], shards: u32) -> Vec<Node> {
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
        .map(|(i, a)| Node::start_with(i as u64 + 1, dir, *a, shards, Some(&peers)))
        .collect()
}

pub fn three_nodes(dir: &Path, ips: [&str; 3]) -> Vec<Node> {
    three_nodes_with(dir, ips, 2)
}

/// Comma-separated endpoints of `nodes` but `except`.
pub fn endpoints(nodes: &[Node], except: Option<u64>) -> String {
    nodes
        .iter()
        .filter(|n| Some(n.id) != except)
        .map(|n| n.addr.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

pub fn iptables(args: &[&str]) -> bool {
    Command::new("iptables")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Whether iptables can be used here for `what`. In CI (`CI=true`) it must be: the test fails
/// instead of skipping.
pub fn iptables_usable(what: &str) -> bool {
    if iptables(&["-L", "INPUT", "-n"]) {
        return true;
    }
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "{what}: iptables is required in CI (scripts/setup.sh installs it; tests run as root)"
    );
    eprintln!(
        "!!!!!!!! {what}: SKIPPED: iptables is not usable here (needs root and the iptables package)"
    );
    false
}

/// Drops traffic between `ip` and each of `others` while alive (the rules go when it is
/// dropped, also on a panic).
pub struct Partition {
    rules: Vec<Vec<String>>,
}

impl Partition {
    pub fn cut(ip: &str, others: &[&str]) -> Self {
        let mut partition = Partition { rules: Vec::new() };
        for o in others {
            for (s, d) in [(ip, *o), (*o, ip)] {
                let rule: Vec<String> = ["INPUT", "-s", s, "-d", d, "-j", "DROP"]
                    .iter()
                    .map(|x| x.to_string())
                    .collect();
                // A rule left behind by a killed test run would make this one's heal a lie.
                while iptables(&with_action("-D", &rule)) {}
                assert!(iptables(&with_action("-A", &rule)), "iptables -A {rule:?}");
                partition.rules.push(rule);
            }
        }
        partition
    }

    /// Removes the rules now.
    pub fn heal(self) {}
}

fn with_action<'a>(action: &'a str, rule: &'a [String]) -> Vec<&'a str> {
    std::iter::once(action)
        .chain(rule.iter().map(String::as_str))
        .collect()
}

impl Drop for Partition {
    fn drop(&mut self) {
        for rule in &self.rules {
            while iptables(&with_action("-D", rule)) {}
        }
    }
}

/// Waits until every running node of `nodes` answers status with every group healthy, `voters`
/// voters, a running leader, and the same leader and term per group as every other running node:
/// leaders that really lead, not a killed node or a restarted node's stale idea of itself. Returns the status of the first.
pub fn wait_settled(nodes: &[Node], voters: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(45);
    let running: Vec<u64> = nodes
        .iter()
        .filter(|n| n.is_running())
        .map(|n| n.id)
        .collect();
    loop {
        let views: Vec<Option<Value>> = nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| try_status(&n.endpoint()))
            .collect();
        let agreed = |s: &Value| -> Vec<(u64, u64, u64)> {
            groups(s)
                .iter()
                .map(|g| {
                    (
                        g["group_id"].as_u64().unwrap(),
                        g["leader"].as_u64().unwrap(),
                        g["term"].as_u64().unwrap(),
                    )
                })
                .collect()
        };
        if let Some(Some(first)) = views.first()
            && views.iter().all(|v| {
                v.as_ref().is_some_and(|v| {
                    agreed(v) == agreed(first)
                        && groups(v).iter().all(|g| {
                            g["healthy"] == Value::Bool(true)
                                && g["leader"].as_u64().is_some_and(|l| running.contains(&l))
                                && g["voters"].as_array().unwrap().len() == voters
                        })
                })
            })
        {
            return first.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the cluster never settled; last views {views:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
