//! The vdisk controller: one virtual disk on its owner core.
//!
//! ```text
//! write ─► characterizer ─┬─ random/small ─► oplog (group commit, durable) ─► ack
//!                         │                      └── drain (arrival order) ──┐
//!                         └─ sequential ───────► extent store ◄──────────────┘
//! read  ─► oplog index ─► unified cache ─► extent store (crc32c verified per slice)
//! ```
//!
//! * **Characterizer**: a vdisk with more than [`SEQUENTIAL_OUTSTANDING_BYTES`] of writes in
//!   flight is sequential and writes go straight to the extent store (flushed before the ack) —
//!   unless the range still has oplog copies, whose later drain would overwrite the newer data.
//! * **Oplog** ([`oplog`]): everything else, acknowledged once durable; drained in arrival order
//!   by [`Vdisk::drain_loop`] in batches of up to [`DRAIN_BATCH_BLOCKS`], with back-pressure at
//!   the per-vdisk cap ([`DEFAULT_OPLOG_CAP_BYTES`]).
//! * **Extent store** ([`extents`]): 1 MiB extents in 4 MiB extent groups, thin.
//! * **Cache**: the core's unified read cache, filled from the extent store only and invalidated
//!   by every write, so it never serves data older than the oplog.
//!
//! Every write is durable when it is acknowledged, so FLUSH and FUA cost nothing extra.
//! Unaligned writes are read-modify-written under a lock (hosts normally send 4 KiB multiples).

pub mod extents;
pub mod oplog;

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use blockstore::{BlockDevice, BlockStore, DmaBuf};

use crate::cache::ReadCache;
use crate::metadata::{Expect, MetaError, MetaOp, MetadataStore};
use crate::target::{BlockTarget, TargetError};
use extents::{Copied, EXTENT_BLOCKS, ExtentError, ExtentStore, Scrubbed};

use crate::replication::{Mirror, ReplicaOp};
use oplog::{BLOCK_BYTES, Oplog, OplogError};

/// A vdisk with more than this many bytes of writes outstanding is sequential (seed: "more
/// than 1.5 MiB of outstanding writes").
pub const SEQUENTIAL_OUTSTANDING_BYTES: u64 = 3 << 19;
/// Per-vdisk oplog cap (seed: 6 GiB); writers wait above it.
pub const DEFAULT_OPLOG_CAP_BYTES: u64 = 6 << 30;
/// Data drained per cycle: 64 MiB.
pub const DRAIN_BATCH_BLOCKS: u32 = 16384;
/// Oplog-to-extent copies a drain keeps in flight at once.
pub const DRAIN_RUNS_IN_FLIGHT: usize = 32;

/// Consecutive vdisk blocks (within one extent) a drain copies from consecutive oplog slices.
#[derive(Debug, Clone, Copy)]
struct DrainRun {
    vblock: u64,
    blocks: u64,
    egid: blockstore::ExtentGroupId,
    /// First oplog slice; `None`: the blocks were zeroed.
    slice: Option<u32>,
}
/// Scrub rate of a vdisk (8 MiB/s: a 1 TiB vdisk in about a day and a half).
pub const DEFAULT_SCRUB_RATE: u64 = 8 << 20;
/// Pause before each scrub pass.
pub const DEFAULT_SCRUB_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);
/// Under host I/O the scrub slows to 1/this of its rate (see [`Vdisk::scrub_pace`]).
pub const SCRUB_BUSY_SLOWDOWN: u32 = 8;

/// The drain starts a cycle once this much data waits (16 MiB)...
pub const DRAIN_TRIGGER_BLOCKS: u64 = 4096;
/// ...or this long after the first undrained write (a quiet vdisk drains soon after it stops).
pub const DRAIN_DELAY: std::time::Duration = std::time::Duration::from_millis(500);

/// A vdisk's definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdiskConfig {
    /// Cluster-unique id (at most 2^30 - 1: it is part of extent group ids).
    pub id: u64,
    /// Name (the export name).
    pub name: String,
    /// Size in bytes (a multiple of 4 KiB).
    pub size_bytes: u64,
    /// Oplog cap in bytes.
    pub oplog_cap_bytes: u64,
    /// Outstanding write bytes above which writes are sequential.
    pub sequential_outstanding_bytes: u64,
    /// How long a drain cycle waits for writes to accumulate ([`DRAIN_DELAY`]).
    pub drain_delay: std::time::Duration,
}

impl VdiskConfig {
    /// A vdisk with the seed defaults.
    pub fn new(id: u64, name: &str, size_bytes: u64) -> Self {
        Self {
            id,
            name: name.to_string(),
            size_bytes,
            oplog_cap_bytes: DEFAULT_OPLOG_CAP_BYTES,
            sequential_outstanding_bytes: SEQUENTIAL_OUTSTANDING_BYTES,
            drain_delay: DRAIN_DELAY,
        }
    }
}

/// Why opening a vdisk failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The oplog could not be recovered.
    #[error(transparent)]
    Oplog(#[from] OplogError),
    /// The extent store could not be loaded.
    #[error(transparent)]
    Extents(#[from] ExtentError),
    /// The definition is invalid.
    #[error("vdisk {name}: {reason}")]
    Config {
        /// Vdisk name.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Most keys one metadata batch deletes when a vdisk is purged.
pub const PURGE_BATCH_KEYS: usize = 512;

/// Why a deleted vdisk's space could not be released.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    /// Freeing its extent groups failed.
    #[error("vdisk {vdisk}: freeing its extent groups: {source}")]
    Store {
        /// Vdisk id.
        vdisk: u64,
        /// Cause.
        #[source]
        source: blockstore::StoreError,
    },
    /// Deleting its metadata failed.
    #[error("vdisk {vdisk}: deleting its metadata: {source}")]
    Meta {
        /// Vdisk id.
        vdisk: u64,
        /// Cause.
        #[source]
        source: MetaError,
    },
}

/// Releases everything a deleted vdisk holds: its extent groups on `store` (oplog and extent
/// store, freed durably), then every metadata key under its prefix. Call it only after the vdisk
/// was stopped (its drain loop ended) and deleted from the cluster's config. Safe to repeat
/// after a failure or crash part-way. Returns the number of extent groups freed.
pub async fn purge<D: BlockDevice, M: MetadataStore>(
    store: &BlockStore<D>,
    meta: &M,
    vdisk: u64,
) -> Result<usize, PurgeError> {
    let freed = crate::replication::free_vdisk_egroups(store, vdisk)
        .await
        .map_err(|source| PurgeError::Store { vdisk, source })?;
    // The data is gone before the map that pointed at it: a crash in between leaves keys of a
    // deleted vdisk (removed on the next purge), never a map pointing at reused space of a live
    // vdisk (extent group ids carry their vdisk's id).
    let keys = meta
        .scan(&extents::vdisk_prefix(vdisk))
        .await
        .map_err(|source| PurgeError::Meta { vdisk, source })?;
    for chunk in keys.chunks(PURGE_BATCH_KEYS) {
        let ops = chunk
            .iter()
            .map(|(key, _)| MetaOp::Delete {
                key: key.clone(),
                expect: Expect::Any,
            })
            .collect();
        meta.apply(ops)
            .await
            .map_err(|source| PurgeError::Meta { vdisk, source })?;
    }
    Ok(freed)
}

/// Counters of a vdisk.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VdiskStats {
    /// Writes through the oplog.
    pub oplog_writes: u64,
    /// Writes straight to the extent store.
    pub sequential_writes: u64,
    /// Blocks drained from the oplog.
    pub drained_blocks: u64,
    /// Blocks read from the oplog / cache / extent store.
    pub read_oplog_blocks: u64,
    /// Blocks read from the cache.
    pub read_cache_blocks: u64,
    /// Blocks read from the extent store.
    pub read_extent_blocks: u64,
    /// Pauses the scrub added (one scrub step each) because the host was doing I/O.
    pub scrub_yields: u64,
}

/// One virtual disk on its owner core.
pub struct Vdisk<D: BlockDevice, M: MetadataStore> {
    cfg: VdiskConfig,
    /// Current size: `cfg.size_bytes` when opened, larger once grown ([`Vdisk::grow`]).
    size: Cell<u64>,
    oplog: Oplog<D>,
    extents: ExtentStore<D, M>,
    cache: Rc<RefCell<ReadCache>>,
    outstanding: Cell<u64>,
    /// Bumped by every write; a cache fill started before a write is discarded.
    write_gen: Cell<u64>,
    rmw_lock: async_lock::Mutex<()>,
    stats: Cell<VdiskStats>,
    stopping: Cell<bool>,
    /// Wakes an idle drain loop when the vdisk stops.
    stopped: event_listener::Event,
    /// The replicas, once [`Vdisk::set_mirror`] made them copies.
    mirror: RefCell<Option<Mirror>>,
    /// Reusable 1 MiB bounce buffers (one per concurrent run; runs never cross an extent or a
    /// batch, both at most 1 MiB), so the I/O path does not allocate once warm.
    pool: RefCell<Vec<DmaBuf>>,
}

/// A bounce buffer borrowed from a vdisk's pool; returned on drop.
struct Bounce<'a> {
    buf: Option<DmaBuf>,
    pool: &'a RefCell<Vec<DmaBuf>>,
}

impl std::ops::Deref for Bounce<'_> {
    type Target = DmaBuf;
    fn deref(&self) -> &DmaBuf {
        self.buf.as_ref().expect("bounce buffer")
    }
}

impl std::ops::DerefMut for Bounce<'_> {
    fn deref_mut(&mut self) -> &mut DmaBuf {
        self.buf.as_mut().expect("bounce buffer")
    }
}

impl Drop for Bounce<'_> {
    fn drop(&mut self) {
        if let Some(mut b) = self.buf.take() {
            b.set_len(b.capacity());
            self.pool.borrow_mut().push(b);
        }
    }
}

/// Capacity of a pooled bounce buffer.
const BOUNCE_BYTES: usize = EXTENT_BLOCKS as usize * BLOCK_BYTES;

fn target_err(offset: u64, e: impl std::fmt::Display) -> TargetError {
    TargetError::Io {
        offset,
        reason: e.to_string(),
    }
}

fn oplog_err(offset: u64, len: u64, e: OplogError) -> TargetError {
    match e {
        OplogError::NoSpace { .. } => TargetError::NoSpace { offset, len },
        e => target_err(offset, e),
    }
}

fn extent_err(offset: u64, len: u64, e: ExtentError) -> TargetError {
    match e {
        ExtentError::NoSpace { .. } => TargetError::NoSpace { offset, len },
        e => target_err(offset, e),
    }
}

impl<D: BlockDevice, M: MetadataStore> Vdisk<D, M> {
    /// Opens `cfg` on `store`, recovering its oplog (replaying writes not yet drained).
    pub async fn open(
        store: Rc<BlockStore<D>>,
        meta: Rc<M>,
        cache: Rc<RefCell<ReadCache>>,
        cfg: VdiskConfig,
    ) -> Result<Rc<Self>, OpenError> {
        if cfg.size_bytes == 0 || !cfg.size_bytes.is_multiple_of(BLOCK_BYTES as u64) {
            return Err(OpenError::Config {
                name: cfg.name,
                reason: "size must be a non-zero multiple of 4 KiB",
            });
        }
        if cfg.id == 0 || cfg.id >= 1 << 30 {
            return Err(OpenError::Config {
                name: cfg.name,
                reason: "id must be from 1 to 2^30-1",
            });
        }
        let drained = meta
            .get(&extents::drained_key(cfg.id))
            .await
            .map_err(|source| ExtentError::Meta {
                vdisk: cfg.id,
                source,
            })?
            .and_then(|v| extents::decode_seq(&v.value))
            .unwrap_or(0);
        let extents = ExtentStore::load(store.clone(), meta, cfg.id).await?;
        let oplog = Oplog::recover(store, cfg.id, drained, cfg.oplog_cap_bytes).await?;
        cache.borrow_mut().invalidate_vdisk(cfg.id);
        Ok(Rc::new(Self {
            size: Cell::new(cfg.size_bytes),
            cfg,
            oplog,
            extents,
            cache,
            outstanding: Cell::new(0),
            write_gen: Cell::new(0),
            rmw_lock: async_lock::Mutex::new(()),
            stats: Cell::new(VdiskStats::default()),
            stopping: Cell::new(false),
            stopped: event_listener::Event::new(),
            pool: RefCell::new(Vec::new()),
            mirror: RefCell::new(None),
        }))
    }

    /// The definition.
    pub fn config(&self) -> &VdiskConfig {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> VdiskStats {
        self.stats.get()
    }

    /// The oplog (for tests and status).
    pub fn oplog(&self) -> &Oplog<D> {
        &self.oplog
    }

    /// Makes `mirror` (the vdisk's replicas) a full copy of this vdisk — RESET (keeping the
    /// extent groups this vdisk has), every extent group (compared where a replica kept it,
    /// only what differs sent), a flush, then the undrained oplog batches — and sends it every
    /// later change: a write is acknowledged only when the local device and the mirror both
    /// have it. Call it before the vdisk serves or drains (nothing may change it during the
    /// copy). Returns what the extent copy did and the oplog batches copied.
    pub async fn set_mirror(&self, mirror: Mirror) -> Result<(Copied, usize), TargetError> {
        let failed = |e: &dyn std::fmt::Display| target_err(0, format!("copying to replicas: {e}"));
        let keep = self.extents.egroups().into_iter().map(|(e, _)| e).collect();
        let held = mirror(ReplicaOp::Reset { keep })
            .await
            .map_err(|e| failed(&e))?
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        let copied = self
            .extents
            .copy_to(&mirror, &held)
            .await
            .map_err(|e| failed(&e))?;
        mirror(ReplicaOp::Flush).await.map_err(|e| failed(&e))?;
        let batches = self.oplog.copy_to(&mirror).await.map_err(|e| failed(&e))?;
        self.extents.set_mirror(mirror.clone());
        self.oplog.set_fetch(mirror.clone());
        let m = mirror.clone();
        self.oplog.set_replicator(Box::new(move |seq, bytes| {
            let sent = m(ReplicaOp::OplogBatch { seq, bytes });
            Box::pin(async move { sent.await.map(|_| ()) })
        }));
        *self.mirror.borrow_mut() = Some(mirror);
        Ok((copied, batches))
    }

    fn bump(&self, f: impl FnOnce(&mut VdiskStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// A bounce buffer of `len` bytes (at most 1 MiB) from the pool.
    fn bounce(&self, len: usize) -> Bounce<'_> {
        assert!(len <= BOUNCE_BYTES, "bounce of {len} bytes");
        let mut buf = self
            .pool
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| DmaBuf::new(BOUNCE_BYTES));
        buf.set_len(len);
        Bounce {
            buf: Some(buf),
            pool: &self.pool,
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), TargetError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size.get() => Ok(()),
            _ => Err(TargetError::OutOfRange {
                offset,
                len,
                size: self.size.get(),
            }),
        }
    }

    /// Grows the vdisk to `size_bytes` while it is served (the new range reads as zeros and
    /// takes no space: it is thin). Shrinking is refused by the config store, and here: a
    /// smaller or misaligned size is ignored and `false` returned.
    pub fn grow(&self, size_bytes: u64) -> bool {
        if size_bytes <= self.size.get() || !size_bytes.is_multiple_of(BLOCK_BYTES as u64) {
            return false;
        }
        self.size.set(size_bytes);
        true
    }

    fn invalidate(&self, vblock: u64, blocks: u64) {
        self.write_gen.set(self.write_gen.get() + 1);
        self.cache
            .borrow_mut()
            .invalidate(self.cfg.id, vblock, blocks);
    }

    /// Reads whole blocks `vblock..` into `out` (a multiple of 4 KiB).
    async fn read_blocks(&self, vblock: u64, out: &mut [u8]) -> Result<(), TargetError> {
        let blocks = (out.len() / BLOCK_BYTES) as u64;
        let mut i = 0u64;
        while i < blocks {
            let vb = vblock + i;
            let off = vb * BLOCK_BYTES as u64;
            if let Some(loc) = self.oplog.lookup(vb) {
                // A run of consecutive slices of one oplog extent group (or of zero blocks).
                let mut n = 1u64;
                while i + n < blocks && n < EXTENT_BLOCKS {
                    match self.oplog.lookup(vb + n) {
                        Some(l)
                            if l.egid == loc.egid
                                && match (loc.slice, l.slice) {
                                    (Some(a), Some(b)) => u64::from(b) == u64::from(a) + n,
                                    (None, None) => true,
                                    _ => false,
                                } =>
                        {
                            n += 1
                        }
                        _ => break,
                    }
                }
                let dst = &mut out[(i as usize) * BLOCK_BYTES..((i + n) as usize) * BLOCK_BYTES];
                match loc.slice {
                    None => dst.fill(0),
                    Some(slice) => {
                        let mut buf = self.bounce(dst.len());
                        if let Err(e) = self.oplog.read(loc.egid, slice, &mut buf).await {
                            // The drain may have moved the block to the extent store and freed
                            // its oplog extent group while this read was in flight: look it
                            // up again rather than failing the host's read.
                            if self.oplog.lookup(vb) != Some(loc) {
                                continue;
                            }
                            return Err(target_err(off, e));
                        }
                        dst.copy_from_slice(&buf);
                    }
                }
                self.bump(|s| s.read_oplog_blocks += n);
                i += n;
                continue;
            }
            if let Some(data) = self.cache.borrow_mut().get(self.cfg.id, vb) {
                out[(i as usize) * BLOCK_BYTES..(i as usize + 1) * BLOCK_BYTES]
                    .copy_from_slice(data);
                self.bump(|s| s.read_cache_blocks += 1);
                i += 1;
                continue;
            }
            // A run of blocks of one extent with no oplog copy and not cached.
            let extent_end = (vb / EXTENT_BLOCKS + 1) * EXTENT_BLOCKS;
            let mut n = 1u64;
            while i + n < blocks
                && vb + n < extent_end
                && self.oplog.lookup(vb + n).is_none()
                && self.cache.borrow().peek(self.cfg.id, vb + n).is_none()
            {
                n += 1;
            }
            let gen_before = self.write_gen.get();
            let mut buf = self.bounce(n as usize * BLOCK_BYTES);
            self.extents
                .read(vb, &mut buf)
                .await
                .map_err(|e| target_err(off, e))?;
            out[(i as usize) * BLOCK_BYTES..((i + n) as usize) * BLOCK_BYTES].copy_from_slice(&buf);
            if self.write_gen.get() == gen_before {
                let mut cache = self.cache.borrow_mut();
                for j in 0..n as usize {
                    cache.insert(
                        self.cfg.id,
                        vb + j as u64,
                        &buf[j * BLOCK_BYTES..(j + 1) * BLOCK_BYTES],
                    );
                }
            }
            self.bump(|s| s.read_extent_blocks += n);
            i += n;
        }
        Ok(())
    }

    /// Writes whole blocks `vblock..` from `data` (a multiple of 4 KiB); durable on return.
    async fn write_blocks(&self, vblock: u64, data: &[u8]) -> Result<(), TargetError> {
        let blocks = (data.len() / BLOCK_BYTES) as u64;
        let offset = vblock * BLOCK_BYTES as u64;
        let len = data.len() as u64;
        self.invalidate(vblock, blocks);
        self.outstanding.set(self.outstanding.get() + len);
        let sequential = self.outstanding.get() > self.cfg.sequential_outstanding_bytes
            && !self.oplog.overlaps(vblock, blocks);
        let result = if sequential {
            self.write_direct(vblock, data).await
        } else {
            self.oplog
                .append(vblock, blocks as u32, Some(data))
                .await
                .map_err(|e| oplog_err(offset, len, e))
        };
        self.outstanding.set(self.outstanding.get() - len);
        // A write that raced with a cache fill: invalidate again once it landed.
        self.invalidate(vblock, blocks);
        if result.is_ok() {
            self.bump(|s| {
                if sequential {
                    s.sequential_writes += 1
                } else {
                    s.oplog_writes += 1
                }
            });
        }
        result
    }

    async fn write_direct(&self, vblock: u64, data: &[u8]) -> Result<(), TargetError> {
        let blocks = (data.len() / BLOCK_BYTES) as u64;
        let mut i = 0u64;
        while i < blocks {
            let vb = vblock + i;
            let off = vb * BLOCK_BYTES as u64;
            let n = (blocks - i).min(EXTENT_BLOCKS - vb % EXTENT_BLOCKS);
            let loc = self
                .extents
                .ensure_mapped(vb / EXTENT_BLOCKS)
                .await
                .map_err(|e| extent_err(off, n * BLOCK_BYTES as u64, e))?;
            let mut buf = self.bounce(n as usize * BLOCK_BYTES);
            buf.copy_from_slice(&data[i as usize * BLOCK_BYTES..(i + n) as usize * BLOCK_BYTES]);
            self.extents
                .write(loc, vb, &buf)
                .await
                .map_err(|e| target_err(off, e))?;
            i += n;
        }
        self.extents
            .flush()
            .await
            .map_err(|e| target_err(vblock * BLOCK_BYTES as u64, e))
    }

    /// Zeroes (thinly) whole blocks `vblock..vblock + blocks`: zero entries in the oplog (no
    /// data), all enqueued before waiting once for durability.
    async fn zero_blocks(&self, vblock: u64, blocks: u64) -> Result<(), TargetError> {
        self.invalidate(vblock, blocks);
        let offset = vblock * BLOCK_BYTES as u64;
        let mut done = 0;
        while done < blocks {
            let n = (blocks - done).min(u64::from(u32::MAX >> 1));
            self.oplog
                .append(vblock + done, n as u32, None)
                .await
                .map_err(|e| oplog_err(offset, blocks * BLOCK_BYTES as u64, e))?;
            done += n;
        }
        self.invalidate(vblock, blocks);
        Ok(())
    }

    /// Drains oplog batches into the extent store until told to stop. Run it on the owner core.
    pub async fn drain_loop(self: Rc<Self>) {
        let mut backoff = std::time::Duration::from_millis(100);
        while !self.stopping.get() {
            let stop = self.stopped.listen();
            if self.stopping.get() {
                return;
            }
            futures_lite::future::or(self.oplog.wait_for_work(), stop).await;
            // Each cycle costs a flush and a metadata commit: let batches accumulate rather
            // than draining every write (which would cost more than the write itself), unless
            // the oplog fills up.
            let first = std::time::Instant::now();
            while self.oplog.undrained_blocks() < DRAIN_TRIGGER_BLOCKS
                && first.elapsed() < self.cfg.drain_delay
                && self.oplog.held_bytes() < self.oplog.cap_bytes() / 2
                && !self.stopping.get()
            {
                glommio::timer::sleep(std::time::Duration::from_millis(20)).await;
            }
            if self.stopping.get() || self.oplog.is_failed() {
                return;
            }
            match self.drain_once().await {
                Ok(_) => backoff = std::time::Duration::from_millis(100),
                Err(e) => {
                    // The vdisk keeps serving from the oplog (writers wait at its cap); the
                    // failure is reported and the cycle retried with a growing pause.
                    eprintln!(
                        "vdisk {}: drain failed (retrying in {backoff:?}): {e}",
                        self.cfg.name
                    );
                    glommio::timer::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
                }
            }
        }
    }

    /// Sleeps for `d`; false (at once) if the vdisk stops meanwhile.
    async fn sleep_unless_stopped(&self, d: std::time::Duration) -> bool {
        let stop = self.stopped.listen();
        if self.stopping.get() {
            return false;
        }
        futures_lite::future::or(
            async {
                glommio::timer::sleep(d).await;
                true
            },
            async {
                stop.await;
                false
            },
        )
        .await
    }

    /// One scrub pass over the vdisk's extent store: [`ExtentStore::scrub`] on each 1 MiB of
    /// each of its extent groups (checksums here, and every replica's copy compared with this
    /// one, damage repaired either way), awaiting `pace()` after each. Ends early, with what it
    /// found so far, when the vdisk stops.
    pub async fn scrub_pass<F: std::future::Future<Output = bool>>(
        &self,
        mut pace: impl FnMut() -> F,
    ) -> Result<Scrubbed, TargetError> {
        let mut total = Scrubbed::default();
        for (egid, slices) in self.extents.egroups() {
            let mut first = 0;
            while first < slices {
                if self.stopping.get() {
                    return Ok(total);
                }
                let n = (slices - first).min(EXTENT_BLOCKS as u32);
                let s = self
                    .extents
                    .scrub(egid, first, n)
                    .await
                    .map_err(|e| target_err(0, format!("scrub: {e}")))?;
                total.slices += s.slices;
                total.repaired_here += s.repaired_here;
                total.rewritten_on_replicas += s.rewritten_on_replicas;
                first += n;
                if !pace().await {
                    return Ok(total);
                }
            }
        }
        Ok(total)
    }

    /// Scrubs the vdisk until it stops, so that damage is found and repaired on every copy even
    /// where no host reads (seed: "consistently scan through extent groups and perform checksum
    /// validation"): waits `interval`, makes a pass at no more than `rate` bytes per second,
    /// and again. A rate of 0 turns it off. A failed pass (a replica unreachable, say) is
    /// reported and the next one starts after the interval.
    pub async fn scrub_loop(self: Rc<Self>, rate: u64, interval: std::time::Duration) {
        if rate == 0 {
            return;
        }
        let step = std::time::Duration::from_secs_f64(BOUNCE_BYTES as f64 / rate as f64);
        while self.sleep_unless_stopped(interval).await {
            let started = std::time::Instant::now();
            match self.scrub_pass(|| self.scrub_pace(step)).await {
                Ok(s) if s.repaired_here + s.rewritten_on_replicas > 0 => eprintln!(
                    "cairn: vdisk {}: scrub pass: {} MiB checked in {:.1} s; {} slice(s) \
                     repaired here, {} rewritten on replicas",
                    self.cfg.name,
                    (s.slices * BLOCK_BYTES as u64) >> 20,
                    started.elapsed().as_secs_f64(),
                    s.repaired_here,
                    s.rewritten_on_replicas
                ),
                Ok(_) => {}
                Err(e) => eprintln!("cairn: vdisk {}: scrub pass stopped: {e}", self.cfg.name),
            }
        }
    }

    /// The scrub's pause after each 1 MiB: one `step`, and more while the host did I/O on the
    /// vdisk during the last one, up to [`SCRUB_BUSY_SLOWDOWN`] steps in all (the seed's
    /// scrubber works "when disks aren't heavily utilized"; under host I/O that never stops it
    /// still goes on, at that fraction of its rate). False once the vdisk stops.
    pub async fn scrub_pace(&self, step: std::time::Duration) -> bool {
        for waited in 1..=SCRUB_BUSY_SLOWDOWN {
            let before = self.host_activity();
            if !self.sleep_unless_stopped(step).await {
                return false;
            }
            if self.host_activity() == before || waited == SCRUB_BUSY_SLOWDOWN {
                break;
            }
            self.bump(|s| s.scrub_yields += 1);
        }
        true
    }

    /// Grows with every host request that reached the devices: writes of any kind (they bump
    /// the write generation) and blocks read from the oplog, the cache or the extent store.
    fn host_activity(&self) -> u64 {
        let s = self.stats.get();
        self.write_gen.get() + s.read_oplog_blocks + s.read_cache_blocks + s.read_extent_blocks
    }

    /// Stops the drain loop after its current cycle (at once when it is idle).
    pub fn stop(&self) {
        self.stopping.set(true);
        self.stopped.notify(usize::MAX);
    }

    /// Drains one cycle of up to [`DRAIN_BATCH_BLOCKS`]; returns the blocks written.
    pub async fn drain_once(&self) -> Result<u64, TargetError> {
        let batches = self.oplog.batches_to_drain(DRAIN_BATCH_BLOCKS);
        let Some(cutoff) = batches.last().map(|b| b.seq) else {
            return Ok(0);
        };
        let runs = self.drain_runs(&batches);
        // Map every extent this cycle writes first, with one flush and one metadata batch.
        let needed: std::collections::BTreeSet<u64> = runs
            .iter()
            .filter(|r| r.slice.is_some())
            .map(|r| r.vblock / EXTENT_BLOCKS)
            .collect();
        self.extents
            .ensure_mapped_many(needed)
            .await
            .map_err(|e| extent_err(0, 0, e))?;
        // Each block appears in at most one run (its newest copy), so runs are independent:
        // copy them with up to DRAIN_RUNS_IN_FLIGHT at once.
        let mut drained = 0u64;
        for chunk in runs.chunks(DRAIN_RUNS_IN_FLIGHT) {
            let copies = chunk.iter().map(|r| self.drain_run(r));
            for r in futures_util::future::join_all(copies).await {
                drained += r?;
            }
        }
        self.extents.flush().await.map_err(|e| target_err(0, e))?;
        self.extents
            .commit(vec![MetaOp::Put {
                key: extents::drained_key(self.cfg.id),
                value: extents::encode_seq(cutoff),
                expect: Expect::Any,
            }])
            .await
            .map_err(|e| target_err(0, e))?;
        self.oplog.drained(cutoff).map_err(|e| target_err(0, e))?;
        // The replicas may free those batches too. Best effort: a replica that misses it frees
        // them at the next watermark, or replays them harmlessly after a takeover (they are
        // below the drained watermark in the metadata store).
        let mirror = self.mirror.borrow().clone();
        if let Some(m) = mirror {
            let _ = m(ReplicaOp::OplogDrained { seq: cutoff }).await;
        }
        self.bump(|s| s.drained_blocks += drained);
        Ok(drained)
    }

    /// The blocks of `batches` whose newest oplog copy is in them, as runs that are contiguous
    /// both in the vdisk (within one extent) and in one oplog extent group.
    fn drain_runs(&self, batches: &[oplog::BatchInfo]) -> Vec<DrainRun> {
        let mut runs: Vec<DrainRun> = Vec::new();
        for b in batches {
            let mut data_off = 0u32;
            for e in &b.entries {
                for i in 0..e.blocks {
                    let vb = e.vblock + u64::from(i);
                    let slice = (!e.zero).then_some(b.data_slice + data_off + i);
                    // Only this batch's copy, and only the last one if the batch wrote the block
                    // twice: newer copies drain with their own batch.
                    if self
                        .oplog
                        .lookup(vb)
                        .is_none_or(|l| l.seq != b.seq || l.slice != slice)
                    {
                        continue;
                    }
                    match runs.last_mut() {
                        Some(r)
                            if r.egid == b.egid
                                && r.vblock + r.blocks == vb
                                && vb % EXTENT_BLOCKS != 0
                                && r.slice.map(|s| s + r.blocks as u32) == slice =>
                        {
                            r.blocks += 1;
                        }
                        _ => runs.push(DrainRun {
                            vblock: vb,
                            blocks: 1,
                            egid: b.egid,
                            slice,
                        }),
                    }
                }
                if !e.zero {
                    data_off += e.blocks;
                }
            }
        }
        runs
    }

    /// Copies one run from the oplog into the extent store (not yet flushed); returns its blocks.
    async fn drain_run(&self, r: &DrainRun) -> Result<u64, TargetError> {
        let at = r.vblock * BLOCK_BYTES as u64;
        let len = r.blocks as usize * BLOCK_BYTES;
        match r.slice {
            None => self
                .extents
                .trim(r.vblock, r.blocks as u32)
                .await
                .map_err(|e| target_err(at, e))?,
            Some(slice) => {
                let mut buf = self.bounce(len);
                self.oplog
                    .read(r.egid, slice, &mut buf)
                    .await
                    .map_err(|e| target_err(at, e))?;
                let ext = self
                    .extents
                    .ensure_mapped(r.vblock / EXTENT_BLOCKS)
                    .await
                    .map_err(|e| extent_err(at, len as u64, e))?;
                self.extents
                    .write(ext, r.vblock, &buf)
                    .await
                    .map_err(|e| target_err(at, e))?;
            }
        }
        Ok(r.blocks)
    }

    /// Drains until the oplog holds nothing undrained (tests, clean shutdown).
    pub async fn drain_all(&self) -> Result<(), TargetError> {
        while self.oplog.undrained_batches() > 0 {
            self.drain_once().await?;
        }
        Ok(())
    }
}

impl<D: BlockDevice, M: MetadataStore> BlockTarget for Vdisk<D, M> {
    fn size_bytes(&self) -> u64 {
        self.size.get()
    }

    fn min_block_bytes(&self) -> u32 {
        1
    }

    async fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), TargetError> {
        self.check_range(offset, out.len() as u64)?;
        if out.is_empty() {
            return Ok(());
        }
        let bb = BLOCK_BYTES as u64;
        if offset.is_multiple_of(bb) && out.len().is_multiple_of(BLOCK_BYTES) {
            return self.read_blocks(offset / bb, out).await;
        }
        let first = offset / bb;
        let end = (offset + out.len() as u64).div_ceil(bb);
        let mut cover = vec![0u8; ((end - first) * bb) as usize];
        self.read_blocks(first, &mut cover).await?;
        let skip = (offset - first * bb) as usize;
        out.copy_from_slice(&cover[skip..skip + out.len()]);
        Ok(())
    }

    async fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), TargetError> {
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let bb = BLOCK_BYTES as u64;
        if offset.is_multiple_of(bb) && data.len().is_multiple_of(BLOCK_BYTES) {
            return self.write_blocks(offset / bb, data).await;
        }
        // Read-modify-write of the covering blocks, serialized so two partial writes of one
        // block cannot lose each other's bytes.
        let _guard = self.rmw_lock.lock().await;
        let first = offset / bb;
        let end = (offset + data.len() as u64).div_ceil(bb);
        let mut cover = vec![0u8; ((end - first) * bb) as usize];
        self.read_blocks(first, &mut cover).await?;
        let skip = (offset - first * bb) as usize;
        cover[skip..skip + data.len()].copy_from_slice(data);
        self.write_blocks(first, &cover).await
    }

    async fn flush(&self) -> Result<(), TargetError> {
        // Every acknowledged write is already durable.
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), TargetError> {
        self.write_zeroes(offset, len, false).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), TargetError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let bb = BLOCK_BYTES as u64;
        let end = offset + len;
        let first_full = offset.div_ceil(bb);
        let last_full = end / bb;
        if first_full >= last_full {
            // Inside one block: an ordinary write of zeros.
            let zeros = vec![0u8; len as usize];
            return self.write(offset, &zeros, false).await;
        }
        if !offset.is_multiple_of(bb) {
            let head = vec![0u8; (first_full * bb - offset) as usize];
            self.write(offset, &head, false).await?;
        }
        self.zero_blocks(first_full, last_full - first_full).await?;
        if !end.is_multiple_of(bb) {
            let tail = vec![0u8; (end - last_full * bb) as usize];
            self.write(last_full * bb, &tail, false).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
