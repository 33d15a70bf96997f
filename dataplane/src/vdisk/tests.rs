//! Deterministic tests of the vdisk path on simulated devices: a reference model (a plain byte
//! vector) against random reads, writes (aligned, unaligned, sequential bursts), trims, drains,
//! and power cuts with torn writes on the `faulty` device.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use blockstore::faulty::{FaultConfig, FaultyDevice};
use blockstore::mem::MemDevice;
use blockstore::{BlockDevice, BlockStore, FormatOptions};
use pollster::block_on;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::cache::ReadCache;
use crate::metadata::MemMetadataStore;
use crate::target::TargetError;

const DISK: u64 = 16 << 20;

fn format_opts() -> FormatOptions {
    FormatOptions {
        egroup_bytes: 4 << 20,
        slice_bytes: 4096,
        journal_bytes: 1 << 20,
        uuid: Some(42),
        ..Default::default()
    }
}

fn cfg() -> VdiskConfig {
    VdiskConfig {
        oplog_cap_bytes: 16 << 20,
        ..VdiskConfig::new(1, "vd0", DISK)
    }
}

fn cache() -> Rc<RefCell<ReadCache>> {
    Rc::new(RefCell::new(ReadCache::new(1 << 20)))
}

async fn open<D: BlockDevice>(
    dev: D,
    meta: Rc<MemMetadataStore>,
) -> Rc<Vdisk<D, MemMetadataStore>> {
    let store = Rc::new(BlockStore::open(dev).await.expect("open store"));
    Vdisk::open(store, meta, cache(), cfg())
        .await
        .expect("open vdisk")
}

/// A freshly formatted 64 MiB in-memory device with format uuid `uuid`.
async fn formatted_device(name: &str, uuid: u128) -> Rc<MemDevice> {
    let dev = Rc::new(MemDevice::new(name, 64 << 20, 4096));
    BlockStore::format(
        dev.clone(),
        &FormatOptions {
            uuid: Some(uuid),
            ..format_opts()
        },
    )
    .await
    .unwrap()
    .close()
    .await
    .unwrap();
    dev
}

/// A freshly formatted 64 MiB in-memory device (the owner's, uuid 42).
async fn formatted_mem_device() -> Rc<MemDevice> {
    formatted_device("vd", 42).await
}

/// Another one with another format uuid (a replica's).
async fn formatted_replica_device() -> Rc<MemDevice> {
    formatted_device("replica", 43).await
}

fn fill(rng: &mut ChaCha8Rng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

#[test]
fn random_io_matches_model_with_drains() {
    block_on(async {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let dev = formatted_mem_device().await;
        let meta = Rc::new(MemMetadataStore::new());
        let vd = open(dev.clone(), meta.clone()).await;
        let mut model = vec![0u8; DISK as usize];
        for step in 0..600 {
            let roll = rng.random_range(0..100);
            if roll < 40 {
                let blocks = rng.random_range(1..=16u64);
                let off = rng.random_range(0..DISK / 4096 - blocks) * 4096;
                let data = fill(&mut rng, (blocks * 4096) as usize);
                vd.write(off, &data, false).await.unwrap();
                model[off as usize..off as usize + data.len()].copy_from_slice(&data);
            } else if roll < 50 {
                let len = rng.random_range(1..10_000u64);
                let off = rng.random_range(0..DISK - len);
                let data = fill(&mut rng, len as usize);
                vd.write(off, &data, false).await.unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            } else if roll < 57 {
                let len = rng.random_range(1..300_000u64);
                let off = rng.random_range(0..DISK - len);
                vd.write_zeroes(off, len, false).await.unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            } else if roll < 85 {
                let len = rng.random_range(1..200_000u64);
                let off = rng.random_range(0..DISK - len);
                let mut out = vec![0u8; len as usize];
                vd.read(off, &mut out).await.unwrap();
                assert!(
                    out == model[off as usize..(off + len) as usize],
                    "step {step}: read {off}+{len}"
                );
            } else {
                vd.drain_once().await.unwrap();
            }
        }
        vd.drain_all().await.unwrap();
        assert!(
            vd.stats().drained_blocks > 0 && vd.stats().read_extent_blocks > 0,
            "{:?}",
            vd.stats()
        );
        let mut all = vec![0u8; DISK as usize];
        vd.read(0, &mut all).await.unwrap();
        assert!(all == model, "after draining everything");
        // Reopen (clean): the extent store alone holds the data.
        drop(vd);
        let vd = open(dev.clone(), meta.clone()).await;
        let mut all = vec![0u8; DISK as usize];
        vd.read(0, &mut all).await.unwrap();
        assert!(all == model, "after reopen");
    });
}

#[test]
fn sequential_writes_bypass_the_oplog() {
    block_on(async {
        let dev = Rc::new(MemDevice::new("vd", 64 << 20, 4096));
        BlockStore::format(dev.clone(), &format_opts())
            .await
            .unwrap();
        let meta = Rc::new(MemMetadataStore::new());
        let vd = open(dev.clone(), meta.clone()).await;
        // A 2 MiB write alone puts 2 MiB outstanding (> 1.5 MiB): sequential. A small one
        // afterwards is random and goes to the oplog.
        let a = vec![0xAAu8; 2 << 20];
        vd.write(0, &a, false).await.unwrap();
        let b = vec![0xBBu8; 1 << 20];
        vd.write(2 << 20, &b, false).await.unwrap();
        assert_eq!(vd.stats().oplog_writes, 1, "{:?}", vd.stats());
        assert!(vd.stats().sequential_writes >= 1, "{:?}", vd.stats());
        let mut out = vec![0u8; 3 << 20];
        vd.read(0, &mut out).await.unwrap();
        assert!(out[..2 << 20] == a[..] && out[2 << 20..] == b[..]);
        // A sequential write over a range with oplog copies must go through the oplog.
        let c = vec![0xCCu8; 2 << 20];
        vd.write(1 << 20, &c, false).await.unwrap();
        assert_eq!(vd.stats().sequential_writes, 1, "{:?}", vd.stats());
        vd.read(0, &mut out).await.unwrap();
        assert!(out[..1 << 20] == a[..1 << 20] && out[1 << 20..] == c[..]);
    });
}

/// Power cuts at random points: every acknowledged write survives; a write cut mid-way reads
/// as its old or new contents per block, never anything else.
#[test]
fn acknowledged_writes_survive_power_cuts() {
    let seeds: u64 = std::env::var("CAIRN_VDISK_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    for seed in 0..seeds {
        block_on(crash_seed(seed));
    }
}

async fn crash_seed(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let media = Rc::new(MemDevice::new("vd", 64 << 20, 4096));
    BlockStore::format(media.clone(), &format_opts())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let meta = Rc::new(MemMetadataStore::new());
    // Per block: the acknowledged value and the values of the write cut by the power loss.
    let mut acked: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for round in 0..3 {
        let faulty = FaultyDevice::new(
            media.clone(),
            FaultConfig {
                seed: rng.random(),
                volatile_cache: true,
                fua: rng.random_bool(0.5),
                power_cut_after_ops: Some(rng.random_range(20..400)),
                ..Default::default()
            },
        );
        let Ok(store) = BlockStore::open(faulty).await else {
            continue;
        };
        let store = Rc::new(store);
        let vd = match Vdisk::open(store.clone(), meta.clone(), cache(), cfg()).await {
            Ok(vd) => vd,
            Err(_) => continue,
        };
        let mut pending: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for _ in 0..200 {
            let roll = rng.random_range(0..10);
            let r = if roll < 7 {
                let blocks = rng.random_range(1..=8u64);
                let vb = rng.random_range(0..DISK / 4096 - blocks);
                let data = fill(&mut rng, (blocks * 4096) as usize);
                pending.clear();
                for i in 0..blocks as usize {
                    pending.insert(vb + i as u64, data[i * 4096..(i + 1) * 4096].to_vec());
                }
                let r = vd.write(vb * 4096, &data, false).await;
                if r.is_ok() {
                    acked.extend(std::mem::take(&mut pending));
                }
                r
            } else {
                vd.drain_once().await.map(|_| ())
            };
            if r.is_err() {
                break;
            }
        }
        drop(vd);
        drop(store);
        // Recover on the bare media and check.
        let vd = open(media.clone(), meta.clone()).await;
        for (&vb, want) in &acked {
            let mut got = vec![0u8; 4096];
            vd.read(vb * 4096, &mut got).await.unwrap();
            let cut = pending.get(&vb);
            assert!(
                got == *want || cut.is_some_and(|c| *c == got),
                "seed {seed} round {round}: block {vb} lost its acknowledged value"
            );
        }
        for (vb, c) in &pending {
            let mut got = vec![0u8; 4096];
            vd.read(vb * 4096, &mut got).await.unwrap();
            let old = acked.get(vb).cloned().unwrap_or_else(|| vec![0u8; 4096]);
            assert!(
                got == old || got == *c,
                "seed {seed} round {round}: block {vb} holds garbage"
            );
            acked.insert(*vb, got);
        }
        drop(vd);
    }
}

/// Injected EIO and bit flips: operations may fail, but a read never returns anything but the
/// acknowledged contents (bit flips are caught by the slice checksums), and after a failed
/// oplog commit the vdisk refuses writes instead of acknowledging what it cannot store.
#[test]
fn device_errors_never_return_wrong_data() {
    for seed in 0..20u64 {
        block_on(async {
            let mut rng = ChaCha8Rng::seed_from_u64(1000 + seed);
            let media = Rc::new(MemDevice::new("vd", 64 << 20, 4096));
            BlockStore::format(media.clone(), &format_opts())
                .await
                .unwrap()
                .close()
                .await
                .unwrap();
            let faulty = FaultyDevice::new(
                media.clone(),
                FaultConfig {
                    seed,
                    read_error_rate: 0.02,
                    write_error_rate: 0.01,
                    bit_flip_rate: 0.02,
                    ..Default::default()
                },
            );
            let Ok(store) = BlockStore::open(faulty).await else {
                return;
            };
            let meta = Rc::new(MemMetadataStore::new());
            let Ok(vd) = Vdisk::open(Rc::new(store), meta, cache(), cfg()).await else {
                return;
            };
            let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            let mut write_failed = false;
            for _ in 0..300 {
                let vb = rng.random_range(0..512u64);
                if rng.random_bool(0.5) {
                    let data = fill(&mut rng, 4096);
                    match vd.write(vb * 4096, &data, false).await {
                        Ok(()) => {
                            assert!(
                                !write_failed,
                                "seed {seed}: a write was acknowledged after the oplog failed"
                            );
                            model.insert(vb, data);
                        }
                        Err(TargetError::Io { .. }) => {
                            write_failed = true;
                            // The block may now hold either version: forget it.
                            model.remove(&vb);
                        }
                        Err(e) => panic!("seed {seed}: unexpected {e}"),
                    }
                } else if rng.random_bool(0.2) {
                    let _ = vd.drain_once().await;
                } else {
                    let mut out = vec![0u8; 4096];
                    match vd.read(vb * 4096, &mut out).await {
                        Ok(()) => {
                            if let Some(want) = model.get(&vb) {
                                assert!(out == *want, "seed {seed}: block {vb} read wrong data");
                            }
                        }
                        Err(TargetError::Io { .. }) => {}
                        Err(e) => panic!("seed {seed}: unexpected {e}"),
                    }
                }
            }
        });
    }
}

#[test]
fn purge_releases_a_deleted_vdisk_and_nothing_else() {
    block_on(async {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let dev = formatted_mem_device().await;
        let store = Rc::new(BlockStore::open(dev.clone()).await.unwrap());
        let meta = Rc::new(MemMetadataStore::new());
        let keep = Vdisk::open(store.clone(), meta.clone(), cache(), cfg())
            .await
            .unwrap();
        let doomed = Vdisk::open(
            store.clone(),
            meta.clone(),
            cache(),
            VdiskConfig {
                oplog_cap_bytes: 16 << 20,
                ..VdiskConfig::new(2, "vd1", DISK)
            },
        )
        .await
        .unwrap();
        let a = fill(&mut rng, 256 << 10);
        keep.write(0, &a, false).await.unwrap();
        for vd in [&keep, &doomed] {
            vd.write(1 << 20, &fill(&mut rng, 64 << 10), false)
                .await
                .unwrap();
            vd.drain_all().await.unwrap();
            // Undrained oplog data too.
            vd.write(4 << 20, &fill(&mut rng, 8 << 10), false)
                .await
                .unwrap();
        }
        let used = |v: u64| {
            store
                .egroups()
                .iter()
                .filter(|e| oplog::vdisk_of_egroup(e.egid) == v)
                .count()
        };
        let (keep_groups, doomed_groups) = (used(1), used(2));
        assert!(doomed_groups >= 2, "oplog and extent groups");
        doomed.stop();
        let freed = purge(&store, &*meta, 2).await.unwrap();
        assert_eq!(freed, doomed_groups);
        assert_eq!(used(2), 0);
        assert_eq!(used(1), keep_groups);
        assert!(meta.scan(b"v/0000000000000002/").await.unwrap().is_empty());
        assert!(!meta.scan(b"v/0000000000000001/").await.unwrap().is_empty());
        // Repeating it is harmless.
        assert_eq!(purge(&store, &*meta, 2).await.unwrap(), 0);
        let mut back = vec![0u8; a.len()];
        keep.read(0, &mut back).await.unwrap();
        assert!(back == a);
    });
}

/// A batch a replicator was handed: (sequence, bytes).
type Sent = (u64, Vec<u8>);

/// A primary vdisk whose oplog replicates every batch into a replica oplog on another device:
/// after the primary is gone, the vdisk opened on the replica's device (a failover) reads every
/// acknowledged write back. The replica refuses gaps and corrupt batches and acknowledges
/// retries.
#[test]
fn a_replica_oplog_replays_on_its_own_device_after_failover() {
    block_on(async {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let dev_a = formatted_mem_device().await;
        let dev_b = formatted_replica_device().await;
        let meta = Rc::new(MemMetadataStore::new());
        let store_b = Rc::new(BlockStore::open(dev_b.clone()).await.unwrap());
        let replica = Rc::new(
            oplog::Oplog::recover(store_b.clone(), 1, 0, 16 << 20)
                .await
                .unwrap(),
        );
        let primary = open(dev_a.clone(), meta.clone()).await;
        let sent: Rc<RefCell<Vec<Sent>>> = Rc::default();
        {
            let (replica, sent) = (replica.clone(), sent.clone());
            primary.oplog().set_replicator(Box::new(move |seq, bytes| {
                let (replica, sent) = (replica.clone(), sent.clone());
                Box::pin(async move {
                    sent.borrow_mut().push((seq, bytes.to_vec()));
                    let got = replica
                        .append_replica(&bytes)
                        .await
                        .map_err(|e| e.to_string())?;
                    assert_eq!(got, seq);
                    Ok(())
                })
            }));
        }
        let mut model = vec![0u8; DISK as usize];
        for _ in 0..200 {
            let blocks = rng.random_range(1..=8u64);
            let off = rng.random_range(0..DISK / 4096 - blocks) * 4096;
            if rng.random_range(0..10) == 0 {
                primary.trim(off, blocks * 4096).await.unwrap();
                model[off as usize..(off + blocks * 4096) as usize].fill(0);
            } else {
                let data = fill(&mut rng, (blocks * 4096) as usize);
                primary.write(off, &data, false).await.unwrap();
                model[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
        }
        let batches = sent.borrow().clone();
        assert!(batches.len() > 10, "{} batches", batches.len());
        // Retries are acknowledged, gaps and damage refused, and none of it changes anything.
        let (seq, bytes) = batches.last().unwrap().clone();
        assert_eq!(replica.append_replica(&bytes).await.unwrap(), seq);
        let mut ahead = bytes.clone();
        ahead[24..32].copy_from_slice(&(seq + 5).to_le_bytes());
        let crc = crc32c::crc32c(&ahead[..4092]);
        ahead[4092..4096].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            replica.append_replica(&ahead).await,
            Err(oplog::OplogError::ReplicaGap { expected, got, .. }) if expected == seq + 1 && got == seq + 5
        ));
        let mut torn = bytes.clone();
        let last = torn.len() - 1;
        torn[last] ^= 1;
        assert!(matches!(
            replica.append_replica(&torn).await,
            Err(oplog::OplogError::BadReplicaBatch { .. })
        ));
        assert!(replica.append_replica(&bytes[..100]).await.is_err());

        // Failover: the primary's device is gone; the vdisk opens on the replica's device.
        drop(primary);
        drop(replica);
        drop(store_b);
        let failed_over = open(dev_b.clone(), meta.clone()).await;
        let mut back = vec![0u8; DISK as usize];
        failed_over.read(0, &mut back).await.unwrap();
        assert!(back == model, "the replica lost acknowledged writes");
        // And it goes on as the primary: writes after the failover land behind the replayed log.
        let data = fill(&mut rng, 4096);
        failed_over.write(8192, &data, false).await.unwrap();
        failed_over.drain_all().await.unwrap();
        let mut one = vec![0u8; 4096];
        failed_over.read(8192, &mut one).await.unwrap();
        assert!(one == data);
    });
}

/// The whole replication path without a network: the owner's vdisk copies its state (a full
/// copy of data written before the replica existed, then every change) to a `ReplicaHost` on
/// another device; the owner is lost; the replica's node takes the vdisk over at a higher epoch
/// and every acknowledged write reads back. The old owner is fenced: the replica refuses it.
#[test]
fn a_replica_host_holds_everything_acknowledged_and_fences_the_old_owner() {
    use crate::replication::{Mirror, Ownership, ReplicaHost, ReplicaOp, reply};
    use crate::transport::Handler;
    block_on(async {
        let mut rng = ChaCha8Rng::seed_from_u64(77);
        let dev_a = formatted_mem_device().await;
        let dev_b = formatted_replica_device().await;
        let meta = Rc::new(MemMetadataStore::new());
        let record = |node: u64, uuid: u128, epoch: u64, replicas: Vec<u64>| {
            Ownership {
                node_id: node,
                device_uuid: uuid,
                epoch,
                replicas,
            }
            .encode()
        };
        meta.apply(vec![MetaOp::Put {
            key: Ownership::key(1),
            value: record(1, 42, 1, vec![2]),
            expect: Expect::Absent,
        }])
        .await
        .unwrap();
        let store_b = Rc::new(BlockStore::open(dev_b.clone()).await.unwrap());
        let host = Rc::new(ReplicaHost::new(2, store_b.clone(), meta.clone(), 16 << 20));
        let primary = open(dev_a.clone(), meta.clone()).await;
        let mut model = vec![0u8; DISK as usize];
        let mut step = async |primary: &Rc<Vdisk<_, _>>, model: &mut Vec<u8>, n: usize| {
            for i in 0..n {
                let blocks = rng.random_range(1..=16u64);
                let off = rng.random_range(0..DISK / 4096 - blocks) * 4096;
                if rng.random_range(0..10) == 0 {
                    primary.trim(off, blocks * 4096).await.unwrap();
                    model[off as usize..(off + blocks * 4096) as usize].fill(0);
                } else {
                    let data = fill(&mut rng, (blocks * 4096) as usize);
                    primary.write(off, &data, false).await.unwrap();
                    model[off as usize..off as usize + data.len()].copy_from_slice(&data);
                }
                if i % 25 == 24 {
                    primary.drain_once().await.unwrap();
                }
            }
        };
        // Data from before the replica existed: drained and undrained.
        step(&primary, &mut model, 120).await;
        assert!(primary.oplog().undrained_batches() > 0);
        let mirror: Mirror = {
            let host = host.clone();
            Rc::new(move |change: ReplicaOp| {
                let host = host.clone();
                Box::pin(async move {
                    let r = host.handle(1, change.to_message(1, 1)).await;
                    if r.op == reply::OK {
                        Ok(r.payload)
                    } else {
                        Err(String::from_utf8_lossy(&r.payload).into_owned())
                    }
                })
            })
        };
        let (copied, batches) = primary.set_mirror(mirror.clone()).await.unwrap();
        assert!(
            copied.sent > 0 && copied.in_place == 0 && batches > 0,
            "copied {copied:?}, {batches} batches"
        );
        // The replica comes back with its copy (the owner restarted, say): the new stream
        // compares it and sends nothing, or only what differs.
        let (again, _) = primary.set_mirror(mirror.clone()).await.unwrap();
        assert_eq!(again.sent, 0, "{again:?}");
        assert!(again.in_place >= copied.sent, "{again:?} after {copied:?}");
        // One slice of the replica's copy rotted meanwhile: that slice alone is sent.
        let (egid, slice, at) = store_b
            .egroups()
            .iter()
            .find_map(|e| {
                let crcs = store_b.slice_crcs(e.egid)?;
                let i = crcs.iter().position(Option::is_some)?;
                (e.egid & crate::vdisk::oplog::OPLOG_EGID_BIT == 0)
                    .then(|| (e.egid, i as u32, e.offset + i as u64 * 4096 + 5))
            })
            .expect("a written slice on the replica");
        let mut b = [0u8; 1];
        dev_b.peek(at, &mut b);
        dev_b.poke(at, &[b[0] ^ 0x10]);
        let (fixed, _) = primary.set_mirror(mirror.clone()).await.unwrap();
        assert_eq!(fixed.sent, 4096, "{fixed:?}");
        let mut one = blockstore::DmaBuf::new(4096);
        store_b.read_slices(egid, slice, &mut one).await.unwrap();
        // Bit rot in the owner's extent store: the read is served from the replica and the
        // local copy rewritten.
        let data = fill(&mut ChaCha8Rng::seed_from_u64(5), 8192);
        primary.write(0, &data, false).await.unwrap();
        model[..8192].copy_from_slice(&data);
        primary.drain_all().await.unwrap();
        let loc = primary.extents.lookup(0).unwrap();
        let store_a = primary.extents.store().clone();
        // Device offset of byte `at` of vdisk block `vb`, stored in extent `loc`.
        let extent_byte = |store: &BlockStore<_>, loc: extents::ExtentLoc, vb: u64, at: u64| {
            store
                .egroups()
                .iter()
                .find(|e| e.egid == loc.egid)
                .unwrap()
                .offset
                + u64::from(loc.slot) * EXTENT_BLOCKS * 4096
                + vb % EXTENT_BLOCKS * 4096
                + at
        };
        let at = extent_byte(&store_a, loc, 1, 17);
        let mut byte = [0u8; 1];
        dev_a.peek(at, &mut byte);
        dev_a.poke(at, &[byte[0] ^ 0x40]);
        primary.cache.borrow_mut().invalidate_vdisk(1);
        let mut two = vec![0u8; 8192];
        primary.read(0, &mut two).await.unwrap();
        assert!(two == data, "the rotten slice was served");
        assert_eq!(
            primary.extents.repaired_slices(),
            2,
            "the read's 2 slices repaired"
        );
        primary.cache.borrow_mut().invalidate_vdisk(1);
        primary.read(0, &mut two).await.unwrap();
        assert!(two == data);
        assert_eq!(
            primary.extents.repaired_slices(),
            2,
            "the local copy is good again"
        );
        // Bit rot that no host read meets: in the replica's copy of block 1 and in the owner's
        // copy of another drained block. A scrub pass finds both: the owner's from its own
        // checksum (repaired from the replica), the replica's by comparing checksums (rewritten
        // there from the owner's copy).
        let far = DISK / 4096 - EXTENT_BLOCKS;
        let data = fill(&mut ChaCha8Rng::seed_from_u64(8), 4096);
        primary.write(far * 4096, &data, false).await.unwrap();
        model[(far * 4096) as usize..(far * 4096) as usize + 4096].copy_from_slice(&data);
        primary.drain_all().await.unwrap();
        let far_at = extent_byte(
            &store_a,
            primary.extents.lookup(far / EXTENT_BLOCKS).unwrap(),
            far,
            333,
        );
        dev_a.peek(far_at, &mut byte);
        dev_a.poke(far_at, &[byte[0] ^ 0x01]);
        let replica_at = extent_byte(&store_b, loc, 1, 333);
        dev_b.peek(replica_at, &mut byte);
        dev_b.poke(replica_at, &[byte[0] ^ 0x80]);
        let mismatches = host.verify_mismatches();
        let found = primary.scrub_pass(|| async { true }).await.unwrap();
        assert_eq!(
            (found.repaired_here, found.rewritten_on_replicas),
            (1, 1),
            "{found:?}"
        );
        assert!(found.slices >= 2 * EXTENT_BLOCKS, "{found:?}");
        // Found by the comparison, and confirmed by the second one made with writes held back.
        assert_eq!(host.verify_mismatches(), mismatches + 2);
        let mut slice = blockstore::DmaBuf::new(4096);
        store_b
            .read_slices(
                loc.egid,
                u32::from(loc.slot) * EXTENT_BLOCKS as u32 + 1,
                &mut slice,
            )
            .await
            .expect("the replica's copy is whole again");
        assert!(slice[..] == model[4096..8192]);
        // A second pass finds nothing.
        let again = primary.scrub_pass(|| async { true }).await.unwrap();
        assert_eq!((again.repaired_here, again.rewritten_on_replicas), (0, 0));
        assert_eq!(host.verify_mismatches(), mismatches + 2);
        step(&primary, &mut model, 140).await;
        assert!(primary.oplog().undrained_batches() > 0);
        // Bit rot in the owner's oplog (undrained data): the same, from the replica's oplog.
        let data = fill(&mut ChaCha8Rng::seed_from_u64(6), 4096);
        let vb = DISK / 4096 - 1;
        primary.write(vb * 4096, &data, false).await.unwrap();
        model[(vb * 4096) as usize..].copy_from_slice(&data);
        let loc = primary.oplog().lookup(vb).unwrap();
        let at = store_a
            .egroups()
            .iter()
            .find(|e| e.egid == loc.egid)
            .unwrap()
            .offset
            + u64::from(loc.slice.unwrap()) * 4096
            + 99;
        dev_a.peek(at, &mut byte);
        dev_a.poke(at, &[byte[0] ^ 0x08]);
        primary.cache.borrow_mut().invalidate_vdisk(1);
        let mut one = vec![0u8; 4096];
        primary.read(vb * 4096, &mut one).await.unwrap();
        assert!(one == data, "the rotten oplog slice was served");
        assert_eq!(primary.oplog().repaired_slices(), 1);

        // The owner is lost; node 2 takes over at epoch 2 and opens the vdisk on its replica.
        drop(primary);
        meta.apply(vec![MetaOp::Put {
            key: Ownership::key(1),
            value: record(2, 43, 2, vec![]),
            expect: Expect::Any,
        }])
        .await
        .unwrap();
        host.take_over(1, 2).await;
        let stale = host.handle(1, ReplicaOp::Flush.to_message(1, 1)).await;
        assert_eq!(stale.op, reply::STALE, "the old owner is fenced");
        let failed_over = Vdisk::open(store_b.clone(), meta.clone(), cache(), cfg())
            .await
            .unwrap();
        let mut back = vec![0u8; DISK as usize];
        failed_over.read(0, &mut back).await.unwrap();
        assert!(back == model, "the replica lost acknowledged writes");

        // A host that never saw the vdisk checks the record: node 1 at epoch 1 is refused.
        let dev_c = formatted_mem_device().await;
        let store_c = Rc::new(BlockStore::open(dev_c).await.unwrap());
        let other = ReplicaHost::new(3, store_c, meta.clone(), 16 << 20);
        let r = other.handle(1, ReplicaOp::Flush.to_message(1, 1)).await;
        assert_eq!(r.op, reply::STALE);
        assert!(String::from_utf8_lossy(&r.payload).contains("owned by node 2 at epoch 2"));
        // The owner's changes need a stream begun with RESET (a replica that restarted may have
        // lost unflushed changes it acknowledged).
        let r = other.handle(2, ReplicaOp::Flush.to_message(1, 2)).await;
        assert_eq!(r.op, reply::FAILED);
        assert!(String::from_utf8_lossy(&r.payload).contains("needs a new copy"));
        let r = other
            .handle(2, ReplicaOp::Reset { keep: vec![] }.to_message(1, 2))
            .await;
        assert_eq!(r.op, reply::OK, "{}", String::from_utf8_lossy(&r.payload));
        let r = other.handle(2, ReplicaOp::Flush.to_message(1, 2)).await;
        assert_eq!(r.op, reply::OK, "{}", String::from_utf8_lossy(&r.payload));
    });
}

/// The scrub gives way to host I/O: while a host writes, each of its pauses grows by steps (up
/// to `SCRUB_BUSY_SLOWDOWN`, so it still moves on); on an idle vdisk it is one step.
#[test]
fn the_scrub_slows_down_while_the_host_does_io() {
    glommio::LocalExecutorBuilder::default()
        .spawn(|| async {
            let dev = formatted_mem_device().await;
            let vd = open(dev, Rc::new(MemMetadataStore::new())).await;
            let step = std::time::Duration::from_millis(20);
            assert!(vd.scrub_pace(step).await);
            assert_eq!(vd.stats().scrub_yields, 0, "idle: one step");
            // A host writing every millisecond, for longer than the slowest pause.
            let busy = Rc::new(std::cell::Cell::new(true));
            let writer = {
                let (vd, busy) = (vd.clone(), busy.clone());
                glommio::spawn_local(async move {
                    let block = vec![7u8; 4096];
                    let mut i = 0u64;
                    while busy.get() {
                        vd.write((i % 64) * 4096, &block, false).await.unwrap();
                        i += 1;
                        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
                    }
                })
            };
            let started = std::time::Instant::now();
            assert!(vd.scrub_pace(step).await);
            let waited = started.elapsed();
            busy.set(false);
            writer.await;
            // Every step but the last was added (fewer only if this thread was kept off the
            // CPU for a whole step, so that no write landed in it).
            let yields = vd.stats().scrub_yields;
            assert!(
                (1..u64::from(SCRUB_BUSY_SLOWDOWN)).contains(&yields),
                "busy: {yields} step(s) added"
            );
            assert!(waited >= step * (yields as u32 + 1), "{waited:?}");
            // Quiet again: back to one step.
            assert!(vd.scrub_pace(step).await);
            assert_eq!(vd.stats().scrub_yields, yields);
            // A stopped vdisk ends the pause.
            vd.stop();
            assert!(!vd.scrub_pace(step).await);
        })
        .unwrap()
        .join()
        .unwrap();
}

/// Bit rot in an oplog batch that later batches follow is damage, not a write cut short by a
/// crash: recovery refuses to open (naming the batch) instead of dropping it and everything
/// after it, unless the batch was drained already (then it is not needed and recovery goes on).
/// A damaged last batch is indistinguishable from a torn write and is dropped, as before.
#[test]
fn damage_in_the_middle_of_the_oplog_is_refused_not_truncated() {
    block_on(async {
        let dev = formatted_mem_device().await;
        let store = Rc::new(BlockStore::open(dev.clone()).await.unwrap());
        let oplog = oplog::Oplog::recover(store.clone(), 1, 0, 16 << 20)
            .await
            .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(31);
        let blocks: Vec<Vec<u8>> = (0..6).map(|_| fill(&mut rng, 4096)).collect();
        for (i, b) in blocks.iter().enumerate() {
            oplog.append(i as u64 * 8, 1, Some(b)).await.unwrap();
        }
        let batches = oplog.batches_to_drain(u32::MAX);
        assert_eq!(batches.len(), 6, "one batch per append");
        drop(oplog);
        // Device offset of byte `at` of slice `slice` of `egid`.
        let byte_of = |egid, slice: u32, at: u64| {
            store
                .egroups()
                .iter()
                .find(|e| e.egid == egid)
                .unwrap()
                .offset
                + u64::from(slice) * 4096
                + at
        };
        let flip = |offset: u64| {
            let mut b = [0u8; 1];
            dev.peek(offset, &mut b);
            dev.poke(offset, &[b[0] ^ 0x10]);
        };
        let reopen = |drained: u64| {
            let store = store.clone();
            async move { oplog::Oplog::recover(store, 1, drained, 16 << 20).await }
        };
        // The data of batch 3 (of 6), then its header: refused either way, naming batch 3.
        let third = &batches[2];
        for (slice, what) in [(third.data_slice, "data"), (third.data_slice - 1, "header")] {
            let at = byte_of(third.egid, slice, 100);
            flip(at);
            match reopen(0).await {
                Err(OplogError::Corrupt { vdisk: 1, seq, .. }) => {
                    assert_eq!(seq, third.seq, "damaged {what}")
                }
                Err(e) => panic!("damaged {what}: {e}"),
                Ok(_) => panic!(
                    "damaged {what}: the oplog opened without batch {}",
                    third.seq
                ),
            }
            // Drained up to batch 3: it is not needed, and every later batch is recovered.
            let o = reopen(third.seq).await.unwrap();
            let kept: Vec<u64> = o.batches_to_drain(u32::MAX).iter().map(|b| b.seq).collect();
            assert_eq!(kept, batches[3..].iter().map(|b| b.seq).collect::<Vec<_>>());
            for (i, b) in blocks.iter().enumerate().skip(3) {
                let loc = o.lookup(i as u64 * 8).unwrap();
                let mut out = blockstore::DmaBuf::new(4096);
                o.read(loc.egid, loc.slice.unwrap(), &mut out)
                    .await
                    .unwrap();
                assert!(out[..] == b[..], "block {i}");
            }
            drop(o);
            flip(at);
        }
        // The oldest batch's header: its number is not known, but its successor's is.
        let first = &batches[0];
        let at = byte_of(first.egid, first.data_slice - 1, 50);
        flip(at);
        assert!(matches!(
            reopen(0).await,
            Err(OplogError::Corrupt { seq, .. }) if seq == first.seq
        ));
        let o = reopen(first.seq).await.unwrap();
        let kept: Vec<u64> = o.batches_to_drain(u32::MAX).iter().map(|b| b.seq).collect();
        assert_eq!(kept, batches[1..].iter().map(|b| b.seq).collect::<Vec<_>>());
        drop(o);
        flip(at);
        // The last batch damaged: a torn write as far as anyone can tell; the rest is there.
        let last = batches.last().unwrap();
        flip(byte_of(last.egid, last.data_slice, 7));
        let o = reopen(0).await.unwrap();
        let kept: Vec<u64> = o.batches_to_drain(u32::MAX).iter().map(|b| b.seq).collect();
        assert_eq!(kept, batches[..5].iter().map(|b| b.seq).collect::<Vec<_>>());
        flip(byte_of(last.egid, last.data_slice, 7));
        // Across extent groups: 256 KiB batches, 15 to a 4 MiB extent group; the header of the
        // last batch of the first group damaged, its successor at the start of the next.
        for i in 0..20u64 {
            let data = fill(&mut rng, 64 * 4096);
            o.append(1000 + i * 64, 64, Some(&data)).await.unwrap();
        }
        let all = o.batches_to_drain(u32::MAX);
        drop(o);
        let edge = all
            .windows(2)
            .find(|w| w[0].egid != w[1].egid && w[0].seq > batches[5].seq)
            .map(|w| w[0].clone())
            .expect("a batch that ends an extent group");
        flip(byte_of(edge.egid, edge.data_slice - 1, 40));
        assert!(matches!(
            reopen(0).await,
            Err(OplogError::Corrupt { seq, .. }) if seq == edge.seq
        ));
        let o = reopen(edge.seq).await.unwrap();
        let after: Vec<u64> = all
            .iter()
            .map(|b| b.seq)
            .filter(|&q| q > edge.seq)
            .collect();
        let kept: Vec<u64> = o.batches_to_drain(u32::MAX).iter().map(|b| b.seq).collect();
        assert_eq!(kept, after, "every batch after the drained, damaged one");
    });
}
