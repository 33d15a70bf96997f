//! The extent store of one vdisk: 1 MiB extents placed in 4 MiB extent groups of the block store.
//!
//! The block map (extent index -> extent group and slot) lives in the metadata store under the
//! vdisk's prefix and in memory on the owner core. A new mapping is committed before any data is
//! written into it, pointing at cleared slices, so a mapped extent always reads as what was
//! written to it and zeros elsewhere. Unmapped extents read as zeros and take no space (thin).
//!
//! ```text
//! metadata keys (under v/<vdisk id, 16 hex digits>/):
//!   x/<extent index, u64 big-endian>  ->  version 1, egid u64 LE, slot u8
//!   drained                            ->  version 1, oplog batch seq u64 LE
//! ```

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use blockstore::{BlockDevice, BlockStore, DmaBuf, ExtentGroupId, StoreError};

use super::oplog::{BLOCK_BYTES, OPLOG_EGID_BIT};
use crate::metadata::{Expect, MetaError, MetaOp, MetadataStore};
use crate::replication::{Mirror, ReplicaOp};

/// Blocks (4 KiB) per extent: extents are 1 MiB (seed: "1 MiB extents").
pub const EXTENT_BLOCKS: u64 = 256;
const VALUE_VERSION: u8 = 1;

/// Where an extent is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExtentLoc {
    /// Extent group.
    pub egid: ExtentGroupId,
    /// Extent slot in the group.
    pub slot: u8,
}

/// Why an extent-store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ExtentError {
    /// The block store failed.
    #[error("extent store of vdisk {vdisk}: {source}")]
    Store {
        /// Vdisk id.
        vdisk: u64,
        /// Cause.
        #[source]
        source: StoreError,
    },
    /// The metadata store failed.
    #[error("extent store of vdisk {vdisk}: {source}")]
    Meta {
        /// Vdisk id.
        vdisk: u64,
        /// Cause.
        #[source]
        source: MetaError,
    },
    /// A metadata value could not be decoded.
    #[error("extent store of vdisk {vdisk}: bad metadata value for key {key}")]
    BadValue {
        /// Vdisk id.
        vdisk: u64,
        /// Key.
        key: String,
    },
    /// No free extent group on the device.
    #[error("extent store of vdisk {vdisk}: no space on the device")]
    NoSpace {
        /// Vdisk id.
        vdisk: u64,
    },
    /// A replica did not take the change.
    #[error("extent store of vdisk {vdisk}: replication: {reason}")]
    Replication {
        /// Vdisk id.
        vdisk: u64,
        /// What went wrong.
        reason: String,
    },
}

/// Metadata key prefix of a vdisk.
pub fn vdisk_prefix(vdisk: u64) -> Vec<u8> {
    format!("v/{vdisk:016x}/").into_bytes()
}

/// Most new extent mappings committed in one metadata batch.
pub const MAP_BATCH_KEYS: usize = 1024;

fn extent_key(vdisk: u64, extent: u64) -> Vec<u8> {
    let mut k = vdisk_prefix(vdisk);
    k.extend_from_slice(b"x/");
    k.extend_from_slice(&extent.to_be_bytes());
    k
}

/// Key of the drained-oplog watermark of `vdisk`.
pub fn drained_key(vdisk: u64) -> Vec<u8> {
    let mut k = vdisk_prefix(vdisk);
    k.extend_from_slice(b"drained");
    k
}

/// Encodes the drained watermark.
pub fn encode_seq(seq: u64) -> Vec<u8> {
    let mut v = vec![VALUE_VERSION];
    v.extend_from_slice(&seq.to_le_bytes());
    v
}

/// Decodes the drained watermark.
pub fn decode_seq(v: &[u8]) -> Option<u64> {
    (v.len() == 9 && v[0] == VALUE_VERSION)
        .then(|| u64::from_le_bytes(v[1..9].try_into().expect("8")))
}

/// Extent store ids are `vdisk << 24 | n`, without the oplog bit.
fn extent_egid(vdisk: u64, n: u32) -> ExtentGroupId {
    (vdisk << 24) | u64::from(n & 0x00FF_FFFF)
}

fn is_mine(vdisk: u64, egid: ExtentGroupId) -> bool {
    egid & OPLOG_EGID_BIT == 0 && egid >> 24 == vdisk
}

/// A vdisk's extent store.
pub struct ExtentStore<D: BlockDevice, M: MetadataStore> {
    store: Rc<BlockStore<D>>,
    meta: Rc<M>,
    vdisk: u64,
    extents_per_egroup: u8,
    map: RefCell<HashMap<u64, ExtentLoc>>,
    /// Extent group being filled and its next free slot.
    open: Cell<Option<(ExtentGroupId, u8)>>,
    next_n: Cell<u32>,
    /// Serializes new mappings (rare: once per 1 MiB extent).
    map_lock: async_lock::Mutex<()>,
    /// Where every change of the vdisk's extent groups is copied (its replicas), if anywhere.
    mirror: RefCell<Option<Mirror>>,
    /// Slices repaired from a replica.
    repaired: Cell<u64>,
    /// Changes (local and mirrored) hold it shared; a repair holds it alone, so the copy it
    /// reads and the copy it writes cannot be overtaken by a write in between.
    repair_lock: async_lock::RwLock<()>,
}

/// What [`ExtentStore::copy_to`] did, in bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// Data sent to the replicas.
    pub sent: u64,
    /// Data every replica that held its extent group already had (compared, not sent).
    pub in_place: u64,
}

/// Has every replica compare slices `first..` of `egid` with `crcs` (VERIFY); the slices any
/// of them found different or damaged, ascending, each once.
async fn differing(
    mirror: &Mirror,
    egid: ExtentGroupId,
    first: u32,
    crcs: Vec<u32>,
) -> Result<Vec<u32>, String> {
    let end = first + crcs.len() as u32;
    let answers = mirror(ReplicaOp::Verify { egid, first, crcs }).await?;
    let mut bad: Vec<u32> = answers
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .filter(|s| (first..end).contains(s))
        .collect();
    bad.sort_unstable();
    bad.dedup();
    Ok(bad)
}

/// Runs of consecutive slices in `sorted` (ascending, no duplicates), as (first, count).
fn runs_of(sorted: &[u32]) -> Vec<(u32, u32)> {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &s in sorted {
        match runs.last_mut() {
            Some((first, len)) if *first + *len == s => *len += 1,
            _ => runs.push((s, 1)),
        }
    }
    runs
}

/// What one scrub step found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Scrubbed {
    /// Slices checked (here, and on every replica).
    pub slices: u64,
    /// Slices that failed their checksum here and were repaired from a replica.
    pub repaired_here: u64,
    /// Slices that differed on a replica (or failed its checksum there) and were rewritten on
    /// the replicas from this copy.
    pub rewritten_on_replicas: u64,
}

impl<D: BlockDevice, M: MetadataStore> ExtentStore<D, M> {
    /// Loads the block map of `vdisk` and frees extent groups it does not reference (left by
    /// a crash between writing data and committing its mapping).
    pub async fn load(
        store: Rc<BlockStore<D>>,
        meta: Rc<M>,
        vdisk: u64,
    ) -> Result<Self, ExtentError> {
        let layout = *store.layout();
        assert_eq!(layout.slice_bytes as usize, BLOCK_BYTES);
        let per = (u64::from(layout.egroup_bytes) / (EXTENT_BLOCKS * BLOCK_BYTES as u64)) as u8;
        assert!(
            per >= 1,
            "extent groups must hold at least one 1 MiB extent"
        );
        let mut prefix = vdisk_prefix(vdisk);
        prefix.extend_from_slice(b"x/");
        let rows = meta
            .scan(&prefix)
            .await
            .map_err(|source| ExtentError::Meta { vdisk, source })?;
        let mut map = HashMap::with_capacity(rows.len());
        let mut used: BTreeMap<ExtentGroupId, u8> = BTreeMap::new();
        for (k, v) in rows {
            let bad = || ExtentError::BadValue {
                vdisk,
                key: crate::metadata::printable_key(&k),
            };
            let idx = u64::from_be_bytes(k[prefix.len()..].try_into().map_err(|_| bad())?);
            let val = &v.value;
            if val.len() != 10 || val[0] != VALUE_VERSION {
                return Err(bad());
            }
            let loc = ExtentLoc {
                egid: u64::from_le_bytes(val[1..9].try_into().expect("8")),
                slot: val[9],
            };
            if loc.slot >= per || !is_mine(vdisk, loc.egid) {
                return Err(bad());
            }
            map.insert(idx, loc);
            let u = used.entry(loc.egid).or_default();
            *u = (*u).max(loc.slot + 1);
        }
        // Unreferenced extent groups of this vdisk: free them.
        let mut freed = 0;
        for e in store.egroups() {
            if is_mine(vdisk, e.egid) && !used.contains_key(&e.egid) {
                store
                    .free(e.egid)
                    .map_err(|source| ExtentError::Store { vdisk, source })?;
                freed += 1;
            }
        }
        if freed > 0 {
            store
                .flush()
                .await
                .map_err(|source| ExtentError::Store { vdisk, source })?;
        }
        let open = used
            .iter()
            .next_back()
            .filter(|(_, next)| **next < per)
            .map(|(&egid, &next)| (egid, next));
        let next_n = used
            .keys()
            .next_back()
            .map_or(0, |e| (e & 0x00FF_FFFF) as u32 + 1);
        Ok(Self {
            store,
            meta,
            vdisk,
            extents_per_egroup: per,
            map: RefCell::new(map),
            open: Cell::new(open),
            next_n: Cell::new(next_n),
            map_lock: async_lock::Mutex::new(()),
            mirror: RefCell::new(None),
            repaired: Cell::new(0),
            repair_lock: async_lock::RwLock::new(()),
        })
    }

    /// Copies every later change of this extent store to `mirror` too; a change succeeds only
    /// when both the local device and the mirror have it.
    pub fn set_mirror(&self, mirror: Mirror) {
        *self.mirror.borrow_mut() = Some(mirror);
    }

    /// Runs `local` and, with a mirror, sends `change` to it at the same time.
    async fn mirrored(
        &self,
        local: impl std::future::Future<Output = Result<(), StoreError>>,
        change: impl FnOnce() -> ReplicaOp,
    ) -> Result<(), ExtentError> {
        let vdisk = self.vdisk;
        let _shared = self.repair_lock.read().await;
        let mirror = self.mirror.borrow().clone();
        let (local, remote) = match mirror {
            None => (local.await, Ok(Vec::new())),
            Some(m) => futures_lite::future::zip(local, m(change())).await,
        };
        local.map_err(|source| ExtentError::Store { vdisk, source })?;
        remote
            .map(|_| ())
            .map_err(|reason| ExtentError::Replication { vdisk, reason })
    }

    /// Makes the replicas' copy of the extent store this one (after their RESET, which kept
    /// the extent groups this store has and said which of them `held` some replica): every
    /// extent group is allocated there; one no replica held gets its non-zero 1 MiB runs; one
    /// that some replica held is compared 1 MiB at a time (VERIFY, with the checksums this
    /// store's metadata records, no data read here) and only the slices that differ are sent.
    /// So a replica that comes back with its copy (a restart) costs a read of its own copy and
    /// the checksums on the network, not the data. Nothing may change the store meanwhile.
    pub async fn copy_to(
        &self,
        mirror: &Mirror,
        held: &std::collections::HashSet<ExtentGroupId>,
    ) -> Result<Copied, ExtentError> {
        let vdisk = self.vdisk;
        let layout = *self.store.layout();
        let slices = layout.egroup_bytes / layout.slice_bytes;
        let chunk = EXTENT_BLOCKS as u32;
        let zero_crc = crc32c::crc32c(&[0u8; BLOCK_BYTES]);
        let mut copied = Copied::default();
        let mut buf = DmaBuf::new(chunk as usize * BLOCK_BYTES);
        let remote = |reason| ExtentError::Replication { vdisk, reason };
        for (egid, _) in self.egroups() {
            mirror(ReplicaOp::Allocate { egid }).await.map_err(remote)?;
            let recorded = self.store.slice_crcs(egid).unwrap_or_default();
            let mut first = 0;
            while first < slices {
                let n = chunk.min(slices - first);
                // The runs to send: all of it (skipped if zeros) where no replica held the
                // extent group, else what a replica found different.
                let runs: Vec<(u32, u32)> = if held.contains(&egid) {
                    let crcs = (first..first + n)
                        .map(|i| {
                            recorded
                                .get(i as usize)
                                .copied()
                                .flatten()
                                .unwrap_or(zero_crc)
                        })
                        .collect();
                    let bad = differing(mirror, egid, first, crcs).await.map_err(remote)?;
                    copied.in_place += (u64::from(n) - bad.len() as u64) * BLOCK_BYTES as u64;
                    runs_of(&bad)
                } else {
                    vec![(first, n)]
                };
                for (at, len) in runs {
                    if self
                        .send_run(mirror, egid, at, len, &mut buf, !held.contains(&egid))
                        .await?
                    {
                        copied.sent += buf.len() as u64;
                    }
                }
                first += n;
            }
        }
        Ok(copied)
    }

    /// Reads slices `at..at + len` of `egid` here into `buf` and writes them on the replicas;
    /// false, with nothing sent, when `skip_zeros` and they are all zeros.
    async fn send_run(
        &self,
        mirror: &Mirror,
        egid: ExtentGroupId,
        at: u32,
        len: u32,
        buf: &mut DmaBuf,
        skip_zeros: bool,
    ) -> Result<bool, ExtentError> {
        let vdisk = self.vdisk;
        buf.set_len(len as usize * BLOCK_BYTES);
        self.store
            .read_slices(egid, at, buf)
            .await
            .map_err(|source| ExtentError::Store { vdisk, source })?;
        if skip_zeros && buf.iter().all(|&b| b == 0) {
            return Ok(false);
        }
        mirror(ReplicaOp::Write {
            egid,
            first: at,
            data: Rc::from(&buf[..]),
        })
        .await
        .map_err(|reason| ExtentError::Replication { vdisk, reason })?;
        Ok(true)
    }

    /// Where extent `extent` is, if mapped.
    pub fn lookup(&self, extent: u64) -> Option<ExtentLoc> {
        self.map.borrow().get(&extent).copied()
    }

    /// Mapped extents.
    pub fn mapped_extents(&self) -> usize {
        self.map.borrow().len()
    }

    /// Maps `extent` if it is not mapped yet, durably: the slot is cleared and the block store
    /// flushed before the mapping is committed, so after any crash a mapped extent reads as its
    /// written blocks and zeros elsewhere. Costs a metadata commit per new 1 MiB extent only.
    pub async fn ensure_mapped(&self, extent: u64) -> Result<ExtentLoc, ExtentError> {
        if let Some(loc) = self.lookup(extent) {
            return Ok(loc);
        }
        self.ensure_mapped_many([extent]).await?;
        self.lookup(extent)
            .ok_or(ExtentError::NoSpace { vdisk: self.vdisk })
    }

    /// Maps every extent of `extents` that is not mapped yet, with one block-store flush and one
    /// metadata batch for all of them (a drain cycle maps hundreds of extents at once; one
    /// commit each would cost a metadata round trip each).
    pub async fn ensure_mapped_many(
        &self,
        extents: impl IntoIterator<Item = u64>,
    ) -> Result<(), ExtentError> {
        let mut wanted: Vec<u64> = extents
            .into_iter()
            .filter(|&e| self.lookup(e).is_none())
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let _guard = self.map_lock.lock().await;
        wanted.retain(|&e| self.lookup(e).is_none());
        wanted.sort_unstable();
        wanted.dedup();
        let vdisk = self.vdisk;
        let err = |source| ExtentError::Store { vdisk, source };
        let mut placed = Vec::with_capacity(wanted.len());
        for &extent in &wanted {
            let loc = match self.open.get() {
                Some((egid, slot)) => {
                    // The slot may hold slices of a mapping that was never committed: clear
                    // them so unwritten blocks of the new extent read as zeros.
                    let first = u32::from(slot) * EXTENT_BLOCKS as u32;
                    let blocks = EXTENT_BLOCKS as u32;
                    self.mirrored(self.store.trim_slices(egid, first, blocks), || {
                        ReplicaOp::Trim {
                            egid,
                            first,
                            blocks,
                        }
                    })
                    .await?;
                    ExtentLoc { egid, slot }
                }
                None => loop {
                    let n = self.next_n.get();
                    self.next_n.set((n + 1) & 0x00FF_FFFF);
                    let egid = extent_egid(vdisk, n);
                    match self.store.allocate(egid) {
                        Ok(()) => {
                            self.mirrored(async { Ok(()) }, || ReplicaOp::Allocate { egid })
                                .await?;
                            break ExtentLoc { egid, slot: 0 };
                        }
                        Err(StoreError::EgroupExists { .. }) => continue,
                        Err(StoreError::NoSpace { .. }) => {
                            return Err(ExtentError::NoSpace { vdisk });
                        }
                        Err(e) => return Err(err(e)),
                    }
                },
            };
            let next = loc.slot + 1;
            self.open
                .set((next < self.extents_per_egroup).then_some((loc.egid, next)));
            placed.push((extent, loc));
        }
        self.mirrored(self.store.flush(), || ReplicaOp::Flush)
            .await?;
        for chunk in placed.chunks(MAP_BATCH_KEYS) {
            let ops = chunk
                .iter()
                .map(|(extent, loc)| {
                    let mut value = vec![VALUE_VERSION];
                    value.extend_from_slice(&loc.egid.to_le_bytes());
                    value.push(loc.slot);
                    MetaOp::Put {
                        key: extent_key(vdisk, *extent),
                        value,
                        expect: Expect::Absent,
                    }
                })
                .collect();
            self.commit(ops).await?;
            let mut map = self.map.borrow_mut();
            for (extent, loc) in chunk {
                map.insert(*extent, *loc);
            }
        }
        Ok(())
    }

    fn first_slice(loc: ExtentLoc, vblock: u64) -> u32 {
        (u64::from(loc.slot) * EXTENT_BLOCKS + vblock % EXTENT_BLOCKS) as u32
    }

    /// Reads blocks `vblock..` (within one extent) into `buf`; unmapped extents read as zeros.
    pub async fn read(&self, vblock: u64, buf: &mut DmaBuf) -> Result<(), ExtentError> {
        debug_assert!(vblock % EXTENT_BLOCKS + (buf.len() / BLOCK_BYTES) as u64 <= EXTENT_BLOCKS);
        match self.lookup(vblock / EXTENT_BLOCKS) {
            None => {
                buf.fill(0);
                Ok(())
            }
            Some(loc) => {
                let first = Self::first_slice(loc, vblock);
                match self.store.read_slices(loc.egid, first, buf).await {
                    Err(bad @ StoreError::ChecksumMismatch { .. }) => {
                        self.repair(loc.egid, first, buf, bad).await
                    }
                    r => r.map_err(|source| ExtentError::Store {
                        vdisk: self.vdisk,
                        source,
                    }),
                }
            }
        }
    }

    /// Slices `first..` of `egid` failed their checksum here (`bad`): reads them from a replica
    /// into `buf` and rewrites the local copy. Without a replica, or when no replica has a good
    /// copy, the checksum error stands.
    async fn repair(
        &self,
        egid: ExtentGroupId,
        first: u32,
        buf: &mut DmaBuf,
        bad: StoreError,
    ) -> Result<(), ExtentError> {
        let vdisk = self.vdisk;
        let mirror = self.mirror.borrow().clone();
        let Some(mirror) = mirror else {
            return Err(ExtentError::Store { vdisk, source: bad });
        };
        let blocks = (buf.len() / BLOCK_BYTES) as u32;
        // Alone: a write landing between the replica's read and the rewrite here would be
        // undone by it.
        let _alone = self.repair_lock.write().await;
        let good = match mirror(ReplicaOp::Read {
            egid,
            first,
            blocks,
        })
        .await
        {
            Ok(data) if data.len() == buf.len() => data,
            Ok(data) => {
                return Err(ExtentError::Replication {
                    vdisk,
                    reason: format!(
                        "repairing after \"{bad}\": a replica returned {} bytes, not {}",
                        data.len(),
                        buf.len()
                    ),
                });
            }
            Err(reason) => {
                return Err(ExtentError::Replication {
                    vdisk,
                    reason: format!("repairing after \"{bad}\": {reason}"),
                });
            }
        };
        buf.copy_from_slice(&good);
        self.store
            .write_slices(egid, first, buf)
            .await
            .map_err(|source| ExtentError::Store { vdisk, source })?;
        self.repaired.set(self.repaired.get() + u64::from(blocks));
        eprintln!(
            "cairn: vdisk {vdisk}: {bad}; {blocks} slice(s) from slice {first} read from a \
             replica and rewritten"
        );
        Ok(())
    }

    /// The block store holding the extents.
    pub fn store(&self) -> &Rc<BlockStore<D>> {
        &self.store
    }

    /// The vdisk's extent groups, with the slices each holds: what a scrub pass walks.
    pub fn egroups(&self) -> Vec<(ExtentGroupId, u32)> {
        let layout = self.store.layout();
        let slices = layout.egroup_bytes / layout.slice_bytes;
        self.store
            .egroups()
            .iter()
            .filter(|e| is_mine(self.vdisk, e.egid))
            .map(|e| (e.egid, slices))
            .collect()
    }

    /// Scrubs slices `first..first + blocks` (at most 1 MiB) of extent group `egid`: reads them
    /// here, which verifies their checksums and repairs a bad one from a replica, then has every
    /// replica compare its copy with this one's checksums (VERIFY) and rewrites on the replicas,
    /// from this copy, each slice one of them found different or damaged. An extent group freed
    /// meanwhile is skipped.
    pub async fn scrub(
        &self,
        egid: ExtentGroupId,
        first: u32,
        blocks: u32,
    ) -> Result<Scrubbed, ExtentError> {
        let vdisk = self.vdisk;
        let store_err = |source| ExtentError::Store { vdisk, source };
        let remote = |reason| ExtentError::Replication { vdisk, reason };
        let mut buf = DmaBuf::new(blocks as usize * BLOCK_BYTES);
        let repaired_before = self.repaired.get();
        match self.store.read_slices(egid, first, &mut buf).await {
            Ok(()) => {}
            Err(StoreError::NoSuchEgroup { .. }) => return Ok(Scrubbed::default()),
            Err(StoreError::ChecksumMismatch { .. }) => {
                // Which ones: slice by slice (rare), each bad one repaired from a replica.
                let mut one = DmaBuf::new(BLOCK_BYTES);
                for (i, into) in buf.chunks_mut(BLOCK_BYTES).enumerate() {
                    let slice = first + i as u32;
                    match self.store.read_slices(egid, slice, &mut one).await {
                        Ok(()) => {}
                        Err(bad @ StoreError::ChecksumMismatch { .. }) => {
                            self.repair(egid, slice, &mut one, bad).await?;
                        }
                        Err(StoreError::NoSuchEgroup { .. }) => return Ok(Scrubbed::default()),
                        Err(e) => return Err(store_err(e)),
                    }
                    into.copy_from_slice(&one);
                }
            }
            Err(e) => return Err(store_err(e)),
        }
        let mut found = Scrubbed {
            slices: u64::from(blocks),
            repaired_here: self.repaired.get() - repaired_before,
            rewritten_on_replicas: 0,
        };
        let Some(mirror) = self.mirror.borrow().clone() else {
            return Ok(found);
        };
        // Compared once as writes go on; if anything differs, again alone, from what this copy
        // holds then: a host write between this read and the replicas' may have made the
        // difference, and it has finished on every copy once the lock is held. What still
        // differs is damage, rewritten before anything writes again (a replica whose copy was
        // good gets the same bytes).
        let mut alone = None;
        let bad = loop {
            let crcs = buf.chunks(BLOCK_BYTES).map(crc32c::crc32c).collect();
            let bad = differing(&mirror, egid, first, crcs)
                .await
                .map_err(remote)?;
            if bad.is_empty() {
                return Ok(found);
            }
            if alone.is_some() {
                break bad;
            }
            alone = Some(self.repair_lock.write().await);
            match self.store.read_slices(egid, first, &mut buf).await {
                Ok(()) => {}
                Err(StoreError::NoSuchEgroup { .. }) => return Ok(found),
                Err(e) => return Err(store_err(e)),
            }
        };
        for (at, len) in runs_of(&bad) {
            match self.send_run(&mirror, egid, at, len, &mut buf, false).await {
                Ok(_) => {}
                Err(ExtentError::Store {
                    source: StoreError::NoSuchEgroup { .. },
                    ..
                }) => return Ok(found),
                Err(e) => return Err(e),
            }
        }
        mirror(ReplicaOp::Flush).await.map_err(remote)?;
        found.rewritten_on_replicas = bad.len() as u64;
        eprintln!(
            "cairn: vdisk {vdisk}: scrub: {} slice(s) of extent group {egid:#x} differed on a \
             replica and were rewritten there from this copy",
            bad.len()
        );
        Ok(found)
    }

    /// Slices repaired from a replica after failing their checksum here.
    pub fn repaired_slices(&self) -> u64 {
        self.repaired.get()
    }

    /// Writes blocks `vblock..` (within one mapped extent) from `buf`.
    pub async fn write(
        &self,
        loc: ExtentLoc,
        vblock: u64,
        buf: &DmaBuf,
    ) -> Result<(), ExtentError> {
        let first = Self::first_slice(loc, vblock);
        self.mirrored(self.store.write_slices(loc.egid, first, buf), || {
            ReplicaOp::Write {
                egid: loc.egid,
                first,
                data: Rc::from(&buf[..]),
            }
        })
        .await
    }

    /// Releases blocks `vblock..vblock + blocks` (within one extent): they read as zeros.
    pub async fn trim(&self, vblock: u64, blocks: u32) -> Result<(), ExtentError> {
        let Some(loc) = self.lookup(vblock / EXTENT_BLOCKS) else {
            return Ok(());
        };
        let first = Self::first_slice(loc, vblock);
        self.mirrored(self.store.trim_slices(loc.egid, first, blocks), || {
            ReplicaOp::Trim {
                egid: loc.egid,
                first,
                blocks,
            }
        })
        .await
    }

    /// Makes written data durable (block store flush).
    pub async fn flush(&self) -> Result<(), ExtentError> {
        self.mirrored(self.store.flush(), || ReplicaOp::Flush).await
    }

    /// Commits metadata operations (new mappings, the drained watermark).
    pub async fn commit(&self, ops: Vec<MetaOp>) -> Result<(), ExtentError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.meta
            .apply(ops)
            .await
            .map(|_| ())
            .map_err(|source| ExtentError::Meta {
                vdisk: self.vdisk,
                source,
            })
    }
}
