//! The metadata service of a three-process cluster under failures, judged by what its clients
//! saw.
//!
//! * Linearizability: concurrent clients run compare-and-swap writes, deletes and reads on a
//!   few keys through the real gRPC `MetadataService` (`MetadataClient`, failing over between
//!   nodes) while leaders are killed with -9 and restarted and a leader is partitioned with
//!   iptables and healed. Every operation is recorded with its invocation and completion on
//!   one monotonic clock; writes that time out or fail UNAVAILABLE are indeterminate. The
//!   history, split per key, must be linearizable for the versioned-register model
//!   (`controlplane::linearizability`).
//! * Membership: 2000 keys across four shards, a fourth node joins and an original voter that
//!   leads the config group is removed while a writer keeps writing; every group gets its three
//!   voters back and every acknowledged key reads back with its value and version from every
//!   remaining node, through gRPC and from each replica's own files.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use controlplane::MetadataRing;
use controlplane::client::{ClientError, Endpoints, MetadataClient};
use controlplane::kv::{Expect, KvOp, Versioned};
use controlplane::linearizability::{
    self, CheckError, Operation, RegisterInput, RegisterOutput, VersionedRegister,
};
use controlplane::server::routing_prefix;
use serde_json::Value;

/// A small deterministic generator (each client its own stream).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn vdisk_key(vdisk: u64, rest: &str) -> Vec<u8> {
    format!("v/{vdisk:016x}/{rest}").into_bytes()
}

fn shard_ring(shards: u64) -> MetadataRing {
    MetadataRing::with_shards(1..=shards)
}

fn shard_of(ring: &MetadataRing, key: &[u8]) -> u64 {
    ring.shard_for(routing_prefix(key)).unwrap()
}

/// Group id → node leading it, from a status.
fn leaders(status: &Value) -> BTreeMap<u64, u64> {
    groups(status)
        .iter()
        .map(|g| {
            (
                g["group_id"].as_u64().unwrap(),
                g["leader"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn groups_led_by(status: &Value, node: u64) -> Vec<u64> {
    leaders(status)
        .into_iter()
        .filter(|&(_, l)| l == node)
        .map(|(g, _)| g)
        .collect()
}

// ---- linearizability -------------------------------------------------------------------------

/// Clients running concurrently.
const CLIENTS: usize = 8;
/// How long a client waits for one operation before calling it indeterminate.
const OP_TIMEOUT: Duration = Duration::from_secs(6);
/// Search steps the checker may take per key.
const CHECK_BUDGET_STEPS: u64 = 20_000_000;

type Op = Operation<RegisterInput, RegisterOutput>;

/// What one client recorded: (key index, operation).
type ClientHistory = Vec<(usize, Op)>;

#[derive(Default, Debug, Clone, Copy)]
struct Tally {
    reads: usize,
    reads_failed: usize,
    written: usize,
    conflicts: usize,
    indeterminate: usize,
}

fn encode_value(v: u64) -> Vec<u8> {
    v.to_string().into_bytes()
}

fn decode_value(b: &[u8]) -> u64 {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a value no client wrote: {b:?}"))
}

/// Runs one client until `stop`, recording every operation that has an outcome (failed reads
/// are left out: they constrain nothing).
async fn run_client(
    client: usize,
    mut addrs: Vec<String>,
    keys: Arc<Vec<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    start: Instant,
) -> (ClientHistory, Tally) {
    let n = addrs.len();
    addrs.rotate_left(client % n);
    let endpoints = Endpoints::new(&addrs)
        .unwrap()
        .retry_for(Duration::from_secs(3));
    let meta = MetadataClient::new(endpoints);
    let mut rng = SplitMix(0xc0ff_ee00 + client as u64);
    // What this client last learned of each key: None unknown, Some(None) absent.
    let mut known: Vec<Option<Option<u64>>> = vec![None; keys.len()];
    let mut history = Vec::new();
    let mut tally = Tally::default();
    let mut seq = 0u64;
    let now_ns = || start.elapsed().as_nanos() as u64;
    while !stop.load(Ordering::Relaxed) {
        let k = rng.below(keys.len() as u64) as usize;
        let key = &keys[k];
        seq += 1;
        let value = ((client as u64 + 1) << 32) | seq;
        let input = match known[k] {
            None => RegisterInput::Get,
            Some(_) if rng.below(10) < 3 => RegisterInput::Get,
            _ if rng.below(20) == 0 => RegisterInput::Put {
                value,
                expect: Expect::Any,
            },
            Some(None) => RegisterInput::Put {
                value,
                expect: Expect::Absent,
            },
            Some(Some(v)) if rng.below(8) == 0 => RegisterInput::Delete {
                expect: Expect::Version(v),
            },
            Some(Some(v)) => RegisterInput::Put {
                value,
                expect: Expect::Version(v),
            },
        };
        let call_ns = now_ns();
        let (output, learned) = match input {
            RegisterInput::Get => match tokio::time::timeout(OP_TIMEOUT, meta.get(key)).await {
                Ok(Ok(found)) => {
                    tally.reads += 1;
                    let found = found.map(|v| (decode_value(&v.value), v.version));
                    (
                        RegisterOutput::Read(found),
                        Some(found.map(|(_, version)| version)),
                    )
                }
                _ => {
                    tally.reads_failed += 1;
                    known[k] = None;
                    continue;
                }
            },
            RegisterInput::Put { .. } | RegisterInput::Delete { .. } => {
                let op = match input {
                    RegisterInput::Put { value, expect } => KvOp::Put {
                        key: key.clone(),
                        value: encode_value(value),
                        expect,
                    },
                    RegisterInput::Delete { expect } => KvOp::Delete {
                        key: key.clone(),
                        expect,
                    },
                    RegisterInput::Get => unreachable!(),
                };
                match tokio::time::timeout(OP_TIMEOUT, meta.apply(vec![op])).await {
                    Ok(Ok(version)) => {
                        tally.written += 1;
                        let now = matches!(input, RegisterInput::Put { .. }).then_some(version);
                        (RegisterOutput::Written { version }, Some(now))
                    }
                    Ok(Err(ClientError::Conflict { found, .. })) => {
                        tally.conflicts += 1;
                        (RegisterOutput::Conflict { found }, Some(found))
                    }
                    _ => {
                        tally.indeterminate += 1;
                        (RegisterOutput::Unknown, None)
                    }
                }
            }
        };
        known[k] = learned;
        let return_ns = (output != RegisterOutput::Unknown).then(now_ns);
        history.push((
            k,
            Operation {
                client,
                input,
                output,
                call_ns,
                return_ns,
            },
        ));
    }
    (history, tally)
}

fn print_history(key: &[u8], ops: &[Op], marked: &BTreeSet<usize>) -> String {
    let mut out = format!("history of {}:\n", String::from_utf8_lossy(key));
    for (i, o) in ops.iter().enumerate() {
        let ret = o.return_ns.map_or("        ?".to_string(), |r| {
            format!("{:9.3}", r as f64 / 1e9)
        });
        out += &format!(
            "{} #{i:<5} client {} [{:9.3} .. {ret}] {:?} -> {:?}\n",
            if marked.contains(&i) { "!!" } else { "  " },
            o.client,
            o.call_ns as f64 / 1e9,
            o.input,
            o.output
        );
    }
    out
}

/// Waits for the clients and splits what they recorded per key.
fn collect_histories(
    rt: &tokio::runtime::Runtime,
    clients: Vec<tokio::task::JoinHandle<(ClientHistory, Tally)>>,
    keys: usize,
) -> (Vec<Vec<Op>>, Tally) {
    let mut per_key: Vec<Vec<Op>> = vec![Vec::new(); keys];
    let mut tally = Tally::default();
    for c in clients {
        let (history, t) = rt.block_on(c).unwrap();
        for (k, op) in history {
            per_key[k].push(op);
        }
        tally.reads += t.reads;
        tally.reads_failed += t.reads_failed;
        tally.written += t.written;
        tally.conflicts += t.conflicts;
        tally.indeterminate += t.indeterminate;
    }
    (per_key, tally)
}

/// Checks each key's history (each must have at least `min_applied` applied writes); on a
/// violation, writes the key's history to a file and panics with the operations that matter.
/// Returns the number of operations checked.
fn check_histories(keys: &[Vec<u8>], per_key: &[Vec<Op>], min_applied: usize) -> usize {
    for (k, history) in per_key.iter().enumerate() {
        let applied = history
            .iter()
            .filter(|o| matches!(o.output, RegisterOutput::Written { .. }))
            .count();
        assert!(
            applied >= min_applied,
            "key {k}: only {applied} writes applied: the workload tests nothing"
        );
        match linearizability::check(&VersionedRegister, history, CHECK_BUDGET_STEPS) {
            Ok(()) => {}
            Err(CheckError::NotLinearizable {
                linearized, stuck, ..
            }) => {
                let dump = std::env::temp_dir().join(format!(
                    "cairn-linearizability-{}-key{k}.txt",
                    std::process::id()
                ));
                let marked: BTreeSet<usize> = [stuck].into();
                std::fs::write(&dump, print_history(&keys[k], history, &marked)).unwrap();
                let last: Vec<String> = linearized
                    .iter()
                    .rev()
                    .take(8)
                    .rev()
                    .map(|&i| format!("#{i} {:?} -> {:?}", history[i].input, history[i].output))
                    .collect();
                panic!(
                    "key {}: NOT linearizable: {} of {} operations ordered, then #{stuck} {:?} -> {:?} (client {}) has no place; last ordered: {last:#?}; full history in {}",
                    String::from_utf8_lossy(&keys[k]),
                    linearized.len(),
                    history.len(),
                    history[stuck].input,
                    history[stuck].output,
                    history[stuck].client,
                    dump.display()
                );
            }
            Err(e) => panic!("key {}: {e}", String::from_utf8_lossy(&keys[k])),
        }
    }
    per_key.iter().map(Vec::len).sum()
}

#[test]
fn metadata_cas_history_is_linearizable_across_leader_kills_and_a_partition() {
    let t0 = Instant::now();
    let ips = ["127.0.0.71", "127.0.0.72", "127.0.0.73"];
    let partitions = iptables_usable("the partition of the linearizability test");
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(dir.path(), ips);
    wait_settled(&nodes, 3);

    // Two vdisk keys on each of the two shards, and one key outside any vdisk.
    let ring = shard_ring(2);
    let mut keys = Vec::new();
    for shard in [1, 2] {
        keys.extend(
            (1u64..)
                .map(|vdisk| vdisk_key(vdisk, "lin"))
                .filter(|k| shard_of(&ring, k) == shard)
                .take(2),
        );
    }
    keys.push(b"lin/plain".to_vec());
    let keys = Arc::new(keys);

    let rt = runtime();
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let addrs: Vec<String> = nodes.iter().map(Node::endpoint).collect();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            rt.spawn(run_client(
                c,
                addrs.clone(),
                keys.clone(),
                stop.clone(),
                start,
            ))
        })
        .collect();
    let at = |what: &str| eprintln!("[{:6.2} s] {what}", start.elapsed().as_secs_f64());

    // Faults, one at a time, each followed by recovery; CAIRN_HISTORY_ROUNDS=n repeats them
    // (soak runs; later rounds partition a follower of shard 1 instead of its leader).
    let rounds: usize = std::env::var("CAIRN_HISTORY_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    std::thread::sleep(Duration::from_secs(3));
    let mut kills = 0;
    let mut cuts = 0;
    for round in 0..rounds {
        for group in [1u64, 2] {
            let s = wait_settled(&nodes, 3);
            let victim = leaders(&s)[&group];
            at(&format!(
                "kill -9 node {victim} (leads groups {:?})",
                groups_led_by(&s, victim)
            ));
            nodes[victim as usize - 1].kill();
            kills += 1;
            let s = wait_settled(&nodes, 3);
            at(&format!("survivors elected leaders {:?}", leaders(&s)));
            std::thread::sleep(Duration::from_secs(2));
            nodes[victim as usize - 1].restart();
            at(&format!("node {victim} restarted"));
            wait_settled(&nodes, 3);
            at("settled");
            std::thread::sleep(Duration::from_secs(2));
        }
        if partitions {
            let s = wait_settled(&nodes, 3);
            let leader = leaders(&s)[&1] as usize;
            let victim = if round % 2 == 0 {
                leader
            } else {
                leader % 3 + 1
            };
            let others: Vec<&str> = (0..3)
                .filter(|&i| i != victim - 1)
                .map(|i| ips[i])
                .collect();
            at(&format!(
                "partition node {victim} (leads groups {:?}) from the others",
                groups_led_by(&s, victim as u64)
            ));
            let cut = Partition::cut(ips[victim - 1], &others);
            cuts += 1;
            std::thread::sleep(Duration::from_secs(7));
            cut.heal();
            at("healed");
            wait_settled(&nodes, 3);
            at("settled");
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let (per_key, tally) = collect_histories(&rt, clients, keys.len());
    let workload = start.elapsed();
    at(&format!("clients stopped: {tally:?}"));
    let checking = Instant::now();
    let ops = check_histories(&keys, &per_key, 5);
    let teeth = stale_read_refused(&per_key);
    // Availability, for the record: the longest time no operation completed.
    let mut completions: Vec<u64> = per_key
        .iter()
        .flatten()
        .filter_map(|o| o.return_ns)
        .collect();
    completions.sort_unstable();
    let longest_gap_s = completions
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(0) as f64
        / 1e9;
    println!(
        "linearizability: {ops} ops ({} indeterminate) on {} keys, {kills} leader kills, {cuts} partition{}: linearizable \
         ({} reads, {} applied writes, {} conflicts, {} failed reads left out; workload {:.1} s, check {:.2} s, total {:.1} s)",
        tally.indeterminate,
        keys.len(),
        if cuts == 1 { "" } else { "s" },
        tally.reads,
        tally.written,
        tally.conflicts,
        tally.reads_failed,
        workload.as_secs_f64(),
        checking.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    println!(
        "linearizability: {teeth}; longest time without a completed operation {longest_gap_s:.1} s"
    );
}

/// Shows the checker is not blind on this very history: one completed read is made to return
/// the first value a key ever had, after a later write with a higher version completed. That is
/// never linearizable (values are unique and versions of a key only grow), so it must be refused.
fn stale_read_refused(per_key: &[Vec<Op>]) -> String {
    for (k, history) in per_key.iter().enumerate() {
        let written = |o: &Op| match (o.input, o.output, o.return_ns) {
            (RegisterInput::Put { value, .. }, RegisterOutput::Written { version }, Some(ret)) => {
                Some((value, version, ret))
            }
            _ => None,
        };
        let Some((first_value, first_version, first_ret)) =
            history.iter().filter_map(written).min_by_key(|w| w.2)
        else {
            continue;
        };
        let Some((_, _, later_ret)) = history
            .iter()
            .filter_map(written)
            .filter(|w| w.1 > first_version && w.2 > first_ret)
            .min_by_key(|w| w.2)
        else {
            continue;
        };
        let Some(read) = history.iter().position(|o| {
            o.input == RegisterInput::Get && o.return_ns.is_some() && o.call_ns > later_ret
        }) else {
            continue;
        };
        let mut mutated = history.clone();
        mutated[read].output = RegisterOutput::Read(Some((first_value, first_version)));
        let verdict = linearizability::check(&VersionedRegister, &mutated, CHECK_BUDGET_STEPS);
        assert!(
            matches!(verdict, Err(CheckError::NotLinearizable { .. })),
            "key {k}: the checker accepted a read of overwritten value {first_value} at version {first_version} (operation #{read}): {verdict:?}"
        );
        return format!(
            "the same history with read #{read} of key {k} made stale is refused (checker has teeth)"
        );
    }
    panic!("no key had a read after two completed writes: the workload tests nothing");
}

// ---- membership ------------------------------------------------------------------------------

/// Metadata shards of the membership test's cluster.
const SHARDS: u64 = 4;
/// Vdisks whose keys are written in one batch each, and keys per vdisk.
const VDISKS: u64 = 100;
const KEYS_PER_VDISK: u64 = 19;
/// Keys outside any vdisk, written one per batch.
const PLAIN_KEYS: u64 = 100;

/// What a key must hold afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expected {
    /// An acknowledged write: this value at this version.
    Exactly(Versioned),
    /// A write whose outcome is unknown (the error it got): absent, or this value.
    Maybe(Vec<u8>, String),
}

/// Puts of one batch: key, value, condition.
type Batch = Vec<(Vec<u8>, Vec<u8>, Expect)>;

/// Writes every key of `batches` (each a batch of new keys under one routing prefix) with
/// `tasks` concurrent writers; every write must be acknowledged.
async fn write_batches(
    meta: &MetadataClient,
    batches: Vec<Batch>,
    tasks: usize,
) -> Vec<(Vec<u8>, Versioned)> {
    let mut set = tokio::task::JoinSet::new();
    let mut chunks: Vec<Vec<_>> = vec![Vec::new(); tasks];
    for (i, b) in batches.into_iter().enumerate() {
        chunks[i % tasks].push(b);
    }
    for chunk in chunks {
        let meta = meta.clone();
        set.spawn(async move {
            let mut written = Vec::new();
            for batch in chunk {
                let ops = batch
                    .iter()
                    .map(|(key, value, expect)| KvOp::Put {
                        key: key.clone(),
                        value: value.clone(),
                        expect: *expect,
                    })
                    .collect();
                let version = meta.apply(ops).await.expect("write on a healthy cluster");
                written.extend(
                    batch
                        .into_iter()
                        .map(|(key, value, _)| (key, Versioned { value, version })),
                );
            }
            written
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.unwrap());
    }
    all
}

/// Writes new keys one at a time until `stop`; what each must hold afterwards.
async fn live_writer(meta: MetadataClient, stop: Arc<AtomicBool>) -> BTreeMap<Vec<u8>, Expected> {
    let mut expected = BTreeMap::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = vdisk_key(10_000 + n % 50, &format!("live/{n:06}"));
        let value = format!("live-{n}").into_bytes();
        n += 1;
        let op = KvOp::Put {
            key: key.clone(),
            value: value.clone(),
            expect: Expect::Absent,
        };
        let outcome = match tokio::time::timeout(OP_TIMEOUT, meta.apply(vec![op])).await {
            Ok(Ok(version)) => Expected::Exactly(Versioned { value, version }),
            Ok(Err(e)) => Expected::Maybe(value, e.to_string()),
            Err(_) => Expected::Maybe(value, format!("no answer within {OP_TIMEOUT:?}")),
        };
        expected.insert(key, outcome);
    }
    expected
}

/// Compares what a node or replica holds with what must be there; returns the errors of the
/// writes with an unknown outcome that were applied.
fn verify(
    who: &str,
    found: &BTreeMap<Vec<u8>, Versioned>,
    expected: &BTreeMap<Vec<u8>, Expected>,
) -> Vec<String> {
    let mut applied_unknown = Vec::new();
    for (key, want) in expected {
        let got = found.get(key);
        match (want, got) {
            (Expected::Exactly(w), Some(g)) if w == g => {}
            (Expected::Maybe(..), None) => {}
            (Expected::Maybe(v, error), Some(g)) if &g.value == v => {
                applied_unknown.push(error.clone())
            }
            _ => panic!(
                "{who}: key {} holds {got:?}, expected {want:?}",
                String::from_utf8_lossy(key)
            ),
        }
    }
    let foreign: Vec<String> = found
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert!(foreign.is_empty(), "{who}: keys nobody wrote: {foreign:?}");
    applied_unknown
}

/// Group id → (voters, learners, leader).
fn membership(status: &Value) -> BTreeMap<u64, (Vec<u64>, Vec<u64>, u64)> {
    groups(status)
        .iter()
        .map(|g| {
            (
                g["group_id"].as_u64().unwrap(),
                (
                    ids(&g["voters"]),
                    ids(&g["learners"]),
                    g["leader"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

fn group_name(g: u64) -> String {
    if g == 0 {
        "config".into()
    } else {
        format!("shard{g}")
    }
}

#[test]
fn node_add_and_remove_move_voters_and_lose_no_key() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes_with(dir.path(), ["127.0.0.1"; 3], SHARDS as u32);
    wait_settled(&nodes, 3);
    let all = endpoints(&nodes, None);
    let rt = runtime();
    let meta = {
        let _enter = rt.enter();
        MetadataClient::new(
            Endpoints::new(all.split(','))
                .unwrap()
                .retry_for(Duration::from_secs(5)),
        )
    };

    // 2000 keys, every shard, then a second version of every seventh key.
    let ring = shard_ring(SHARDS);
    let mut batches: Vec<Batch> = (0..VDISKS)
        .map(|v| {
            (0..KEYS_PER_VDISK)
                .map(|j| {
                    let key = vdisk_key(v * 7919, &format!("extent/{j:04}"));
                    let value = format!("first-{}", String::from_utf8_lossy(&key)).into_bytes();
                    (key, value, Expect::Absent)
                })
                .collect()
        })
        .collect();
    batches.extend((0..PLAIN_KEYS).map(|i| {
        let key = format!("plain/{i:04}").into_bytes();
        vec![(key, format!("first-plain-{i}").into_bytes(), Expect::Absent)]
    }));
    let first = rt.block_on(write_batches(&meta, batches, 8));
    let updates = first
        .iter()
        .step_by(7)
        .map(|(key, v)| {
            let value = format!("second-{}", String::from_utf8_lossy(key)).into_bytes();
            vec![(key.clone(), value, Expect::Version(v.version))]
        })
        .collect();
    let second = rt.block_on(write_batches(&meta, updates, 8));
    let mut expected: BTreeMap<Vec<u8>, Expected> = first
        .into_iter()
        .chain(second)
        .map(|(k, v)| (k, Expected::Exactly(v)))
        .collect();
    let mut per_shard = BTreeMap::<u64, usize>::new();
    for k in expected.keys() {
        *per_shard.entry(shard_of(&ring, k)).or_default() += 1;
    }
    println!(
        "membership: wrote {} keys (shard -> keys {per_shard:?}) in {:.1} s",
        expected.len(),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(expected.len() as u64, VDISKS * KEYS_PER_VDISK + PLAIN_KEYS);
    assert_eq!(per_shard.len() as u64, SHARDS, "keys on every shard");

    // A writer keeps writing new keys through the membership changes, and CAS clients keep
    // a history of a few more keys.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = rt.spawn(live_writer(meta.clone(), stop.clone()));
    let addr4 = free_addr("127.0.0.1");
    let lin_keys = Arc::new(vec![
        vdisk_key(555_555, "lin"),
        vdisk_key(777_777, "lin"),
        b"lin/membership".to_vec(),
    ]);
    let start = Instant::now();
    let mut addrs: Vec<String> = nodes.iter().map(Node::endpoint).collect();
    addrs.push(addr4.to_string());
    let clients: Vec<_> = (0..CLIENTS / 2)
        .map(|c| {
            rt.spawn(run_client(
                c,
                addrs.clone(),
                lin_keys.clone(),
                stop.clone(),
                start,
            ))
        })
        .collect();

    let before = membership(&wait_settled(&nodes, 3));
    nodes.push(Node::start_with(4, dir.path(), addr4, SHARDS as u32, None));
    ok(
        &all,
        &["node", "add", "--id", "4", "--address", &addr4.to_string()],
    );
    // Four nodes: still three voters a group. The config group is on every node (node 4 as a
    // learner); each metadata shard is on exactly three nodes, and moves to node 4 only where
    // placement wants it there.
    let joined = wait_status(&all, Duration::from_secs(90), "node 4 joins", |s| {
        let up = s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node_id"] == 4 && n["state"] == "up");
        up && membership(s).iter().all(|(g, (voters, learners, leader))| {
            let placed = if *g == 0 {
                voters.contains(&4) || learners.contains(&4)
            } else {
                learners.is_empty()
            };
            // A leader whose seat moved is unseated: every group is led by a voter.
            *leader != 0 && voters.contains(leader) && voters.len() == 3 && placed
        }) && membership(s)
            .iter()
            .any(|(g, (voters, _, _))| *g != 0 && voters.contains(&4))
    });
    let on_4 = membership(&joined)
        .iter()
        .filter(|(g, (voters, _, _))| **g != 0 && voters.contains(&4))
        .count();
    println!(
        "membership: node 4 joined after {:.1} s and hosts {on_4} of {SHARDS} shards (each \
         shard on 3 nodes): {:?}",
        t0.elapsed().as_secs_f64(),
        membership(&joined)
    );

    // Remove the config leader (it leads at least the config group).
    let settled = wait_settled(&nodes, 3);
    let victim = settled["config_leader"].as_u64().unwrap();
    let led = groups_led_by(&settled, victim);
    assert!(led.contains(&0));
    let led_names = led
        .iter()
        .map(|&g| group_name(g))
        .collect::<Vec<_>>()
        .join(", ");
    let survivors: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|&n| n != victim).collect();
    let survivor_eps = endpoints(&nodes, Some(victim));
    ok(
        &survivor_eps,
        &["node", "remove", "--id", &victim.to_string()],
    );
    println!("membership: removing node {victim}, leader of {led_names}");
    wait_status(
        &survivor_eps,
        Duration::from_secs(90),
        "voters re-formed without the removed node",
        |s| {
            let gone = s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["node_id"] != victim);
            gone && membership(s).values().all(|(voters, learners, leader)| {
                let mut v = voters.clone();
                v.sort();
                v == survivors && !learners.contains(&victim) && *leader != victim && *leader != 0
            })
        },
    );
    let removal_done = t0.elapsed();
    nodes[victim as usize - 1].kill();
    let after = membership(&wait_settled(&nodes, 3));
    let moved = after.iter().filter(|(g, a)| before[*g].0 != a.0).count();
    for (g, (voters, _, leader)) in &after {
        let (old_voters, _, old_leader) = &before[g];
        println!(
            "membership: {:<7} voters {old_voters:?} -> {voters:?}, leader {old_leader} -> {leader}{}",
            group_name(*g),
            if old_voters == voters {
                ""
            } else {
                "  (moved)"
            }
        );
    }
    stop.store(true, Ordering::Relaxed);
    let live = rt.block_on(writer).unwrap();
    let live_acked = live
        .values()
        .filter(|e| matches!(e, Expected::Exactly(_)))
        .count();
    let live_unknown = live.len() - live_acked;
    let (per_key, tally) = collect_histories(&rt, clients, lin_keys.len());
    let lin_ops = check_histories(&lin_keys, &per_key, 3);
    println!(
        "membership: linearizability: {lin_ops} ops ({} indeterminate) on {} keys through the add and the remove: linearizable",
        tally.indeterminate,
        lin_keys.len()
    );
    let not_lin =
        |found: &mut BTreeMap<Vec<u8>, Versioned>| found.retain(|k, _| !lin_keys.contains(k));
    expected.extend(live);

    // Every remaining node answers every key, over gRPC.
    for id in &survivors {
        let ep = nodes[*id as usize - 1].endpoint();
        let one = {
            let _enter = rt.enter();
            MetadataClient::new(
                Endpoints::new([ep.as_str()])
                    .unwrap()
                    .retry_for(Duration::from_secs(10)),
            )
        };
        let mut found: BTreeMap<Vec<u8>, Versioned> = rt
            .block_on(one.scan(b""))
            .unwrap_or_else(|e| panic!("node {id}: scan: {e}; status {:#?}", try_status(&ep)))
            .into_iter()
            .collect();
        not_lin(&mut found);
        verify(&format!("node {id} (scan)"), &found, &expected);
        for (key, want) in expected.iter().step_by(25) {
            let got = rt.block_on(one.get(key)).unwrap_or_else(|e| {
                panic!(
                    "node {id}: get {}: {e}; status {:#?}",
                    String::from_utf8_lossy(key),
                    try_status(&ep)
                )
            });
            if let Expected::Exactly(w) = want {
                assert_eq!(got.as_ref(), Some(w), "node {id}: get");
            }
        }
    }

    // And every remaining replica holds them in its own files, once all have applied the same
    // log.
    wait_status(
        &survivor_eps,
        Duration::from_secs(30),
        "replicas converge",
        |_| {
            let views: Vec<Option<Value>> = survivors
                .iter()
                .map(|id| try_status(&nodes[*id as usize - 1].endpoint()))
                .collect();
            views.iter().all(Option::is_some) && {
                let applied = |v: &Value| -> Vec<u64> {
                    groups(v)
                        .iter()
                        .map(|g| g["applied_index"].as_u64().unwrap())
                        .collect()
                };
                let first = applied(views[0].as_ref().unwrap());
                views.iter().all(|v| applied(v.as_ref().unwrap()) == first)
            }
        },
    );
    for id in &survivors {
        nodes[*id as usize - 1].kill();
    }
    let mut unknown_applied = Vec::new();
    for id in &survivors {
        let mut found = BTreeMap::new();
        for shard in 1..=SHARDS {
            let (_log, sm) = controlplane::storage::open(
                &Node::data_dir(dir.path(), *id).join(format!("g{shard}")),
            )
            .unwrap();
            found.extend(sm.reader().scan(b"").unwrap());
        }
        not_lin(&mut found);
        unknown_applied = verify(&format!("replica on node {id}"), &found, &expected);
    }
    println!(
        "membership: node 4 added, node {victim} (leader of {led_names}) removed; {moved} of {} groups changed voters; \
         {} keys ({} initial, {live_acked} acknowledged and {live_unknown} unknown writes during the changes, {} of those applied) \
         read back with value and version from nodes {survivors:?} over gRPC and from their replicas' files; \
         removal done at {:.1} s, total {:.1} s",
        after.len(),
        expected.len(),
        VDISKS * KEYS_PER_VDISK + PLAIN_KEYS,
        unknown_applied.len(),
        removal_done.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    let unknown: BTreeSet<&String> = expected
        .values()
        .filter_map(|e| match e {
            Expected::Maybe(_, error) => Some(error),
            Expected::Exactly(_) => None,
        })
        .collect();
    if !unknown.is_empty() {
        println!("membership: errors of the writes with an unknown outcome: {unknown:#?}");
    }
}
