//! The replication protocol in the deterministic simulation: three nodes on the seeded
//! simulated network (`transport::sim`: lossy, reordering links, virtual time), each with a
//! `ReplicaHost` on an in-memory device, one shared metadata store standing for the Raft one.
//! Vdisk 1 (RF2) is written by four writers while its owner drains; a lost message fails a
//! write (no retries here), and the owner reopens the vdisk with a full copy to a replica, as
//! a node does; sometimes the replica's process restarts (its stream state gone), which also
//! takes a full copy. Then, at a seeded moment, the owner crashes or is partitioned away; its replica
//! takes the vdisk over by compare-and-swap at the next epoch, copies it to the third node and
//! serves it. Checked: every acknowledged block reads back (an unacknowledged write reads back
//! as its old or its new contents), the old owner never gets another write acknowledged, and
//! the same seed gives the same run, message for message.
//!
//! `CAIRN_SIM_SEEDS=N` runs seeds 0..N (default 30); `CAIRN_SIM_SEED=S` replays one.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use blockstore::mem::MemDevice;
use blockstore::{BlockStore, FormatOptions};
use dataplane::cache::ReadCache;
use dataplane::metadata::{Expect, MemMetadataStore, MetaOp, MetadataStore};
use dataplane::replication::{Ownership, ReplicaHost, ReplicaSet};
use dataplane::target::BlockTarget;
use dataplane::transport::sim::{LinkConfig, SimConfig, SimNetwork, SimTransport};
use dataplane::vdisk::{Vdisk, VdiskConfig};
use glommio::LocalExecutorBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DISK: u64 = 16 << 20;
const BLOCKS: u64 = 256; // the blocks the writers use (1 MiB), a quarter each
const WRITERS: u64 = 4;
const VDISK: u64 = 1;

type Dev = Rc<MemDevice>;
type Host = ReplicaHost<Dev, MemMetadataStore>;
type Net = SimNetwork<Host>;
type Sim = SimTransport<Host>;
type Disk = Vdisk<Dev, MemMetadataStore>;

struct Node {
    id: u64,
    uuid: u128,
    store: Rc<BlockStore<Dev>>,
    host: Rc<Host>,
    transport: Rc<Sim>,
}

/// Per block: the last acknowledged tag, and tags sent since that were not acknowledged.
type Model = Rc<RefCell<Vec<(Option<u64>, Vec<u64>)>>>;

fn block(tag: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in b.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    b
}

/// Runs `f` as a task and moves the virtual clock until it finishes.
async fn pumped<T: 'static>(
    what: &str,
    net: &Net,
    f: impl std::future::Future<Output = T> + 'static,
) -> T {
    let slot = Rc::new(RefCell::new(None));
    let s = slot.clone();
    glommio::spawn_local(async move {
        let v = f.await;
        *s.borrow_mut() = Some(v);
    })
    .detach();
    for _ in 0..600_000 {
        if let Some(v) = slot.borrow_mut().take() {
            return v;
        }
        net.run_for(Duration::from_millis(1)).await;
    }
    panic!("{what} did not finish in 10 minutes of virtual time");
}

async fn record(meta: &MemMetadataStore) -> (Ownership, u64) {
    let v = meta
        .get(&Ownership::key(VDISK))
        .await
        .unwrap()
        .expect("an ownership record");
    (Ownership::decode(&v.value).unwrap(), v.version)
}

async fn put_record(meta: &MemMetadataStore, o: &Ownership, expect: Expect) -> Result<u64, String> {
    meta.apply(vec![MetaOp::Put {
        key: Ownership::key(VDISK),
        value: o.encode(),
        expect,
    }])
    .await
    .map_err(|e| e.to_string())
}

fn vdisk_config() -> VdiskConfig {
    VdiskConfig {
        oplog_cap_bytes: 8 << 20,
        ..VdiskConfig::new(VDISK, "vd1", DISK)
    }
}

/// What a node does to serve the vdisk it owns (`open_replicated` in the node): raise the epoch
/// with no replica recorded, open the vdisk, make `peer` a full copy, record it.
async fn open_owner(
    net: &Net,
    meta: &Rc<MemMetadataStore>,
    node: &Node,
    peer: u64,
) -> Result<(Rc<Disk>, Rc<ReplicaSet<Sim>>), String> {
    let (rec, version) = record(meta).await;
    assert_eq!(rec.node_id, node.id);
    let mut own = Ownership {
        epoch: rec.epoch + 1,
        replicas: Vec::new(),
        ..rec
    };
    let copying = put_record(meta, &own, Expect::Version(version)).await?;
    let cache = Rc::new(RefCell::new(ReadCache::new(1 << 20)));
    let vd = Vdisk::open(node.store.clone(), meta.clone(), cache, vdisk_config())
        .await
        .map_err(|e| e.to_string())?;
    let set = ReplicaSet::with_retry(
        node.transport.clone(),
        VDISK,
        own.epoch,
        vec![peer],
        Duration::ZERO,
    );
    let (v, m) = (vd.clone(), set.mirror());
    pumped("set_mirror", net, async move { v.set_mirror(m).await })
        .await
        .map_err(|e| e.to_string())?;
    own.replicas = vec![peer];
    put_record(meta, &own, Expect::Version(copying)).await?;
    Ok((vd, set))
}

/// [`open_owner`] until it succeeds (a lost message fails the copy); counts the attempts that
/// failed in `reopens`.
async fn open_owner_until(
    net: &Net,
    meta: &Rc<MemMetadataStore>,
    node: &Node,
    peer: u64,
    reopens: &mut u32,
) -> (Rc<Disk>, Rc<ReplicaSet<Sim>>) {
    loop {
        match open_owner(net, meta, node, peer).await {
            Ok(o) => return o,
            Err(_) => *reopens += 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Crash,
    Partition,
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    fault: Fault,
    replica_restarted: bool,
    acked: u64,
    failed: u64,
    reopens: u32,
    checked: u64,
    messages: usize,
}

fn scenario(seed: u64) -> Outcome {
    LocalExecutorBuilder::default()
        .io_memory(1 << 20)
        .make()
        .expect("glommio executor")
        .run(run(seed))
}

async fn run(seed: u64) -> Outcome {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED);
    let mut config = SimConfig::seeded(seed);
    config.call_timeout = Duration::from_millis(200);
    config.link = LinkConfig {
        drop_probability: 0.002,
        ..LinkConfig::default()
    };
    let net: Net = SimNetwork::new(config);
    let meta = Rc::new(MemMetadataStore::new());
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let dev = Rc::new(MemDevice::new(&format!("n{id}"), 64 << 20, 4096));
        let uuid = u128::from(id) << 64 | 0xCA1;
        BlockStore::format(
            dev.clone(),
            &FormatOptions {
                egroup_bytes: 4 << 20,
                slice_bytes: 4096,
                journal_bytes: 1 << 20,
                uuid: Some(uuid),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
        let store = Rc::new(BlockStore::open(dev).await.unwrap());
        let host = Rc::new(ReplicaHost::new(id, store.clone(), meta.clone(), 8 << 20));
        let transport = Rc::new(net.add_node(id, host.clone()));
        nodes.push(Node {
            id,
            uuid,
            store,
            host,
            transport,
        });
    }
    // Node 1 claims the vdisk and serves it with its replica on node 2.
    let claim = Ownership {
        node_id: 1,
        device_uuid: nodes[0].uuid,
        epoch: 1,
        replicas: Vec::new(),
    };
    put_record(&meta, &claim, Expect::Absent).await.unwrap();
    let mut reopens = 0u32;
    let mut owner = open_owner_until(&net, &meta, &nodes[0], 2, &mut reopens).await;

    // Writers and a drain, on whatever vdisk `serving` holds.
    let model: Model = Rc::new(RefCell::new(vec![(None, Vec::new()); BLOCKS as usize]));
    let serving: Rc<RefCell<Option<Rc<Disk>>>> = Rc::new(RefCell::new(Some(owner.0.clone())));
    let stop = Rc::new(Cell::new(false));
    let acked = Rc::new(Cell::new(0u64));
    let failed = Rc::new(Cell::new(0u64));
    for w in 0..WRITERS {
        let (model, serving, stop, acked, failed, net) = (
            model.clone(),
            serving.clone(),
            stop.clone(),
            acked.clone(),
            failed.clone(),
            net.clone(),
        );
        let mut wrng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(31) + w);
        glommio::spawn_local(async move {
            let mut n = 0u64;
            while !stop.get() {
                let vd = serving.borrow().clone();
                let Some(vd) = vd else {
                    net.sleep(Duration::from_millis(1)).await;
                    continue;
                };
                // Each writer has blocks of its own, written one at a time: an acknowledged
                // write is then the newest of its block, whatever came before it.
                let per = BLOCKS / WRITERS;
                let b = w * per + wrng.random_range(0..per);
                n += 1;
                let tag = (w << 40) | n;
                model.borrow_mut()[b as usize].1.push(tag);
                match vd.write(b * 4096, &block(tag), false).await {
                    Ok(()) => {
                        model.borrow_mut()[b as usize] = (Some(tag), Vec::new());
                        acked.set(acked.get() + 1);
                    }
                    Err(_) => {
                        failed.set(failed.get() + 1);
                        net.sleep(Duration::from_millis(2)).await;
                    }
                }
                net.sleep(Duration::from_micros(wrng.random_range(0..300)))
                    .await;
            }
        })
        .detach();
    }
    {
        let (serving, stop, net) = (serving.clone(), stop.clone(), net.clone());
        glommio::spawn_local(async move {
            while !stop.get() {
                net.sleep(Duration::from_millis(5)).await;
                let vd = serving.borrow().clone();
                if let Some(vd) = vd {
                    let _ = vd.drain_once().await;
                }
            }
        })
        .detach();
    }

    // Run; a failed oplog (a lost message) makes the owner reopen with a full copy.
    let fault_at = rng.random_range(40..120u64);
    // Sometimes the replica's process restarts first (same device, no stream state): the owner
    // must notice and copy the vdisk again.
    let restart_at = rng.random_bool(0.4).then(|| rng.random_range(10..fault_at));
    for t in 0..fault_at {
        if restart_at == Some(t) {
            let host = Rc::new(ReplicaHost::new(
                2,
                nodes[1].store.clone(),
                meta.clone(),
                8 << 20,
            ));
            net.restart(2, host.clone());
            nodes[1].host = host;
        }
        net.run_for(Duration::from_millis(1)).await;
        if owner.0.oplog().is_failed() {
            *serving.borrow_mut() = None;
            owner.0.stop();
            owner = open_owner_until(&net, &meta, &nodes[0], 2, &mut reopens).await;
            reopens += 1;
            *serving.borrow_mut() = Some(owner.0.clone());
        }
    }

    // The fault. Writers keep going at the old owner until the takeover.
    let fault = if rng.random_bool(0.5) {
        Fault::Crash
    } else {
        Fault::Partition
    };
    match fault {
        Fault::Crash => {
            net.crash(1);
            *serving.borrow_mut() = None;
        }
        Fault::Partition => net.partition(&[&[1], &[2, 3]]),
    }
    // The replica notices (in a node: 3 s of silence) and takes over.
    net.run_for(Duration::from_millis(rng.random_range(5..300)))
        .await;
    let (rec, version) = record(&meta).await;
    let replica = rec.replicas[0];
    assert_eq!(replica, 2, "the record names the complete copy");
    let new = Ownership {
        node_id: 2,
        device_uuid: nodes[1].uuid,
        epoch: rec.epoch + 1,
        replicas: Vec::new(),
    };
    put_record(&meta, &new, Expect::Version(version))
        .await
        .unwrap();
    let host = nodes[1].host.clone();
    pumped("take_over", &net, async move {
        host.take_over(VDISK, new.epoch).await
    })
    .await;
    // The old owner never gets a write acknowledged again.
    let old = owner.0.clone();
    let mut taken = open_owner_until(&net, &meta, &nodes[1], 3, &mut reopens).await;
    if fault == Fault::Partition {
        let o = old.clone();
        let tried = pumped("old write", &net, async move {
            o.write(0, &block(u64::MAX), false).await
        })
        .await;
        assert!(
            tried.is_err(),
            "seed {seed}: the partitioned owner acknowledged a write"
        );
        net.heal();
        let o = old.clone();
        let tried = pumped("old write", &net, async move {
            o.write(0, &block(u64::MAX), false).await
        })
        .await;
        assert!(
            tried.is_err(),
            "seed {seed}: the fenced owner acknowledged a write"
        );
    }
    *serving.borrow_mut() = Some(taken.0.clone());
    // The new owner serves: run until it has acknowledged 100 writes (writers still waiting on
    // the old owner give up at their call timeout first).
    let at_takeover = acked.get();
    for _ in 0..5_000 {
        if acked.get() >= at_takeover + 100 {
            break;
        }
        net.run_for(Duration::from_millis(1)).await;
        if taken.0.oplog().is_failed() {
            *serving.borrow_mut() = None;
            taken.0.stop();
            taken = open_owner_until(&net, &meta, &nodes[1], 3, &mut reopens).await;
            reopens += 1;
            *serving.borrow_mut() = Some(taken.0.clone());
        }
    }
    assert!(
        acked.get() >= at_takeover + 100,
        "seed {seed}: the new owner acknowledged only {} writes",
        acked.get() - at_takeover
    );
    stop.set(true);
    net.run_for(Duration::from_secs(2)).await;

    // Every block reads back from the new owner as the model allows.
    let vd = serving.borrow().clone().expect("the new owner serves");
    let mut checked = 0;
    let model = model.borrow().clone();
    for (b, (ack, pending)) in model.iter().enumerate() {
        let mut got = vec![0u8; 4096];
        vd.read(b as u64 * 4096, &mut got).await.unwrap();
        let ok = ack.iter().chain(pending.iter()).any(|&t| got == block(t))
            || (ack.is_none() && got.iter().all(|&x| x == 0));
        assert!(
            ok,
            "seed {seed} ({fault:?}): block {b}: acknowledged {ack:?}, unacknowledged \
             {pending:?}, read something else (replay: CAIRN_SIM_SEED={seed})"
        );
        checked += 1;
    }
    Outcome {
        fault,
        replica_restarted: restart_at.is_some(),
        acked: acked.get(),
        failed: failed.get(),
        reopens,
        checked,
        messages: net.trace().len(),
    }
}

#[test]
fn replication_survives_crashes_and_partitions_in_the_simulation() {
    let seeds: Vec<u64> = match std::env::var("CAIRN_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("CAIRN_SIM_SEED")],
        Err(_) => {
            let n = std::env::var("CAIRN_SIM_SEEDS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(30);
            (0..n).collect()
        }
    };
    let (mut acked, mut failed, mut reopens, mut crashes, mut restarts) = (0, 0, 0, 0, 0);
    for &seed in &seeds {
        let o = scenario(seed);
        if seeds.len() == 1 {
            println!("seed {seed}: {o:?}");
        }
        assert!(
            o.acked > 50,
            "seed {seed}: only {} writes acknowledged",
            o.acked
        );
        acked += o.acked;
        failed += o.failed;
        reopens += o.reopens;
        crashes += u32::from(o.fault == Fault::Crash);
        restarts += u32::from(o.replica_restarted);
    }
    // Replayable: the same seed, the same run.
    let first = seeds[0];
    assert_eq!(
        scenario(first),
        scenario(first),
        "seed {first} is not deterministic"
    );
    println!(
        "simulation: {} seeds ({crashes} owner crashes, {} partitions, {restarts} replica \
         restarts before them): {acked} writes acknowledged, {failed} failed, {reopens} reopens \
         after lost messages or restarts; every acknowledged block read back",
        seeds.len(),
        seeds.len() as u32 - crashes
    );
}
