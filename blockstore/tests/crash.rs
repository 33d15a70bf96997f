//! Crash suite: random operations on a `FaultyDevice` (volatile cache, power cut after a random
//! number of device operations, torn writes), recovery with `BlockStore::open`, and a check
//! against a reference model: every change flushed before the cut is present and correct, and no
//! slice ever reads back as data that was not written to it.
//!
//! `CAIRN_CRASH_SEEDS` sets the number of seeds (default 1000, CI); `CAIRN_CRASH_SEED` replays one
//! seed; `CAIRN_CRASH_FIRST` sets the first seed (nightly runs walk new ranges). Each seed runs
//! several crash/recover rounds on the same media.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use blockstore::faulty::{FaultConfig, FaultyDevice};
use blockstore::mem::MemDevice;
use blockstore::{BlockStore, DmaBuf, FormatOptions, StoreError};
use pollster::block_on;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// 2 MiB: 1 MiB of metadata and 15 extent group slots for 20 ids, so slots are scarce and
// freed slots are reused soon.
const DEVICE_BYTES: u64 = 2 << 20;
const SLICE: usize = 4096;
const SLICES: u32 = 16;
const EGIDS: u64 = 20;
const ROUNDS: usize = 3;

/// What a slice holds: 0 = zeros, otherwise the id of the write that produced it.
type Val = u64;
/// A slice that reads back as a checksum mismatch after recovery (it stays that way).
const BAD: Val = u64::MAX;

fn slice_data(v: Val, out: &mut [u8]) {
    if v == 0 {
        out.fill(0);
        return;
    }
    let mut x = v.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    out[..8].copy_from_slice(&v.to_le_bytes());
}

fn identify(data: &[u8]) -> Option<Val> {
    if data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let v = u64::from_le_bytes(data[..8].try_into().unwrap());
    let mut expect = vec![0u8; data.len()];
    slice_data(v, &mut expect);
    (expect == data).then_some(v)
}

/// Reference model of one round.
#[derive(Default)]
struct Model {
    /// State as of the last completed flush (or recovery).
    durable: BTreeMap<u64, Vec<Val>>,
    /// Current state, as reads must return it while the device is up.
    live: BTreeMap<u64, Vec<Val>>,
    /// Since the last flush: extent groups allocated, freed, and values written per slice.
    allocated: BTreeSet<u64>,
    freed: BTreeSet<u64>,
    written: BTreeMap<(u64, u32), Vec<Val>>,
}

impl Model {
    fn flushed(&mut self) {
        self.durable = self.live.clone();
        self.allocated.clear();
        self.freed.clear();
        self.written.clear();
    }

    /// Checks the recovered store and returns the new baseline.
    fn check<D: blockstore::BlockDevice>(
        &self,
        store: &BlockStore<D>,
    ) -> Result<BTreeMap<u64, Vec<Val>>, String> {
        let mut baseline = BTreeMap::new();
        for egid in 0..EGIDS {
            let exists = store.contains(egid);
            let durable = self.durable.get(&egid);
            let must = durable.is_some() && !self.freed.contains(&egid);
            let may = durable.is_some() || self.allocated.contains(&egid);
            if must && !exists {
                return Err(format!("extent group {egid} was flushed but is gone"));
            }
            if exists && !may {
                return Err(format!(
                    "extent group {egid} exists but was never flushed or allocated"
                ));
            }
            if !exists {
                continue;
            }
            let mut vals = Vec::new();
            for slice in 0..SLICES {
                let mut allowed: BTreeSet<Val> = BTreeSet::new();
                if let Some(d) = durable {
                    allowed.insert(d[slice as usize]);
                }
                if self.allocated.contains(&egid) {
                    allowed.insert(0);
                }
                let pending = self.written.get(&(egid, slice));
                if let Some(p) = pending {
                    allowed.extend(p.iter().copied());
                    allowed.insert(BAD);
                }
                let mut buf = DmaBuf::new(SLICE);
                let got = match block_on(store.read_slices(egid, slice, &mut buf)) {
                    Ok(()) => match identify(&buf) {
                        Some(v) => v,
                        None => {
                            return Err(format!(
                                "extent group {egid} slice {slice} returned bytes that were never written (allowed {allowed:?})"
                            ));
                        }
                    },
                    Err(StoreError::ChecksumMismatch { .. }) => BAD,
                    Err(e) => return Err(format!("extent group {egid} slice {slice}: {e}")),
                };
                if !allowed.contains(&got) {
                    let shown = |v: Val| {
                        if v == BAD {
                            "checksum mismatch".to_string()
                        } else {
                            v.to_string()
                        }
                    };
                    return Err(format!(
                        "extent group {egid} slice {slice} read {} but only {:?} are possible (durable {:?}, since flush {:?})",
                        shown(got),
                        allowed.iter().map(|&v| shown(v)).collect::<Vec<_>>(),
                        durable.map(|d| d[slice as usize]),
                        pending
                    ));
                }
                vals.push(got);
            }
            baseline.insert(egid, vals);
        }
        Ok(baseline)
    }
}

fn opts(seed: u64) -> FormatOptions {
    FormatOptions {
        egroup_bytes: SLICE as u32 * SLICES,
        slice_bytes: SLICE as u32,
        // 16 journal blocks: checkpoints and laps of the ring happen every few flushes.
        journal_bytes: 64 << 10,
        uuid: Some(u128::from(seed) + 1),
        ..Default::default()
    }
}

/// Runs one round of random operations until the power cut; returns the model.
fn run_round(
    store: &BlockStore<FaultyDevice<Rc<MemDevice>>>,
    rng: &mut ChaCha8Rng,
    mut model: Model,
    next_val: &mut Val,
) -> Model {
    // Rounds differ in shape: some flush often, some rarely, so that batches span several
    // journal blocks (310 records each) and torn multi-block batches occur.
    let ops = rng.random_range(10..600);
    let flush_pct = [2, 6, 12][rng.random_range(0..3)];
    let max_run = [4, SLICES][rng.random_range(0..2)];
    for _ in 0..ops {
        let roll = rng.random_range(0..100 - 12 + flush_pct);
        // Pick an id that suits the operation: a free one to allocate, a live one otherwise.
        let want_free = roll < 12;
        let candidates: Vec<u64> = (0..EGIDS)
            .filter(|e| model.live.contains_key(e) != want_free)
            .collect();
        if candidates.is_empty() && roll < 88 {
            continue;
        }
        let egid = if candidates.is_empty() {
            0
        } else {
            candidates[rng.random_range(0..candidates.len())]
        };
        let exists = !want_free;
        let result = if roll < 12 && !exists {
            let r = store.allocate(egid);
            if r.is_ok() {
                model.allocated.insert(egid);
                model.live.insert(egid, vec![0; SLICES as usize]);
            }
            r
        } else if roll < 16 && exists {
            let r = store.free(egid);
            if r.is_ok() {
                model.freed.insert(egid);
                model.live.remove(&egid);
            }
            r
        } else if roll < 70 && exists {
            let first = rng.random_range(0..SLICES);
            let count = rng.random_range(1..=(SLICES - first).min(max_run));
            let mut buf = DmaBuf::new(count as usize * SLICE);
            let mut vals = Vec::new();
            for i in 0..count as usize {
                *next_val += 1;
                slice_data(*next_val, &mut buf[i * SLICE..(i + 1) * SLICE]);
                vals.push(*next_val);
            }
            // Recorded before the write: a failed write may still have reached media.
            for (i, v) in vals.iter().enumerate() {
                model
                    .written
                    .entry((egid, first + i as u32))
                    .or_default()
                    .push(*v);
            }
            let r = block_on(store.write_slices(egid, first, &buf));
            if r.is_ok() {
                let live = model.live.get_mut(&egid).unwrap();
                live[first as usize..(first + count) as usize].copy_from_slice(&vals);
            }
            r
        } else if roll < 75 && exists {
            let first = rng.random_range(0..SLICES);
            let count = rng.random_range(1..=(SLICES - first));
            for s in first..first + count {
                model.written.entry((egid, s)).or_default().push(0);
            }
            let r = block_on(store.trim_slices(egid, first, count));
            if r.is_ok() {
                model.live.get_mut(&egid).unwrap()[first as usize..(first + count) as usize]
                    .fill(0);
            }
            r
        } else if roll < 88 && exists {
            let slice = rng.random_range(0..SLICES);
            let mut buf = DmaBuf::new(SLICE);
            let r = block_on(store.read_slices(egid, slice, &mut buf));
            if r.is_ok() {
                let want = model.live[&egid][slice as usize];
                let got = identify(&buf);
                // Slices that failed their checksum at recovery stay failed until rewritten.
                assert!(
                    want != BAD,
                    "slice {egid}/{slice} marked bad read back fine: {got:?}"
                );
                assert_eq!(got, Some(want), "live read of {egid}/{slice}");
            } else if let Err(StoreError::ChecksumMismatch { .. }) = &r
                && model.live[&egid][slice as usize] == BAD
            {
                continue;
            }
            r
        } else {
            let r = block_on(store.flush());
            if r.is_ok() {
                model.flushed();
            }
            r
        };
        if let Err(StoreError::NoSpace { .. }) = result {
            continue;
        }
        if let Err(e) = result {
            assert!(
                store.device().is_cut(),
                "operation failed before the power cut: {e}"
            );
            return model;
        }
    }
    block_on(store.device().power_cut()).expect("power cut");
    model
}

fn run_seed(seed: u64) -> Result<(), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let block_size = if rng.random_bool(0.5) { 512 } else { 4096 };
    // The test keeps a handle on the media, so it survives whatever happens to the stores.
    let media = Rc::new(MemDevice::new("crash", DEVICE_BYTES, block_size));
    let store =
        block_on(BlockStore::format(media.clone(), &opts(seed))).map_err(|e| e.to_string())?;
    block_on(store.close()).map_err(|e| e.to_string())?;
    let mut baseline: BTreeMap<u64, Vec<Val>> = BTreeMap::new();
    let mut next_val: Val = 0;
    for round in 0..ROUNDS {
        let cfg = FaultConfig {
            seed: rng.random(),
            volatile_cache: true,
            // Half the rounds make writes durable with FUA writes instead of flushes.
            fua: rng.random_bool(0.5),
            power_cut_after_ops: Some(rng.random_range(1..1000)),
            ..Default::default()
        };
        let faulty = FaultyDevice::new(media.clone(), cfg);
        let model = Model {
            durable: baseline.clone(),
            live: baseline.clone(),
            ..Default::default()
        };
        let model = match block_on(BlockStore::open(faulty)) {
            Ok(store) => run_round(&store, &mut rng, model, &mut next_val),
            // Power cut inside open's own writes (superblocks, checkpoint): no operation ran.
            Err(StoreError::Device(blockstore::DeviceError::Offline { .. })) => model,
            Err(e) => return Err(format!("round {round}: open before the cut: {e}")),
        };
        let store = block_on(BlockStore::open(media.clone()))
            .map_err(|e| format!("round {round}: recovery: {e}"))?;
        baseline = model
            .check(&store)
            .map_err(|e| format!("round {round}: {e}"))?;
        block_on(store.close()).map_err(|e| format!("round {round}: close: {e}"))?;
    }
    Ok(())
}

#[test]
fn crash_recovery_matches_reference_model() {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let seeds: Vec<u64> = match env("CAIRN_CRASH_SEED") {
        Some(one) => vec![one],
        None => {
            let first = env("CAIRN_CRASH_FIRST").unwrap_or(0);
            (first..first + env("CAIRN_CRASH_SEEDS").unwrap_or(1000)).collect()
        }
    };
    let mut failures = Vec::new();
    for &seed in &seeds {
        let outcome = std::panic::catch_unwind(|| run_seed(seed));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("seed {seed}: {e}")),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("seed {seed}: panic: {msg}"));
            }
        }
    }
    println!(
        "crash suite: {} seeds x {ROUNDS} power cuts, {} failed",
        seeds.len(),
        failures.len()
    );
    for f in failures.iter().take(20) {
        println!("  {f}  (replay: CAIRN_CRASH_SEED=<seed> cargo test -p blockstore --test crash)");
    }
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed; first: {}",
        failures.len(),
        seeds.len(),
        failures[0]
    );
}
