//! The oplog: a vdisk's persistent write log on the fastest device.
//!
//! Random and small writes land here first. The oplog is a sequence of *batches* written into
//! extent groups of the block store (4 KiB slices) reserved for it: one header slice listing the
//! batch's entries, then their data slices. Writers copy their data into the batch being filled;
//! whoever takes the commit lock writes every waiting writer's data in one `write_slices` and one
//! block-store flush (group commit), so at queue depth 32 one flush acknowledges many writes. A
//! write returns only when its batch is durable.
//!
//! ```text
//! oplog extent group (egid = OPLOG_EGID_BIT | vdisk << 24 | n), 4 KiB slices:
//! +--------+-------+-------+-----+--------+-------+-----+------ ... ----+
//! | header | data  | data  | ... | header | data  | ... | unwritten     |
//! | seq s  | (e0)  | (e0)  |     | seq s+1|       |     |               |
//! +--------+-------+-------+-----+--------+-------+-----+------ ... ----+
//!
//! header slice (4096 bytes, little-endian):
//!   0  8  magic "CRNOPLG1"        8  4  version (1)     12  4  entry count
//!  16  8  vdisk id               24  8  batch seq       32  4  data slices   36   4  zero
//!  40 16  block-store format uuid                        56   8  zero
//!  64  .  entries, 16 bytes each: vblock u64, blocks u32 (bit 31: zero entry, no data),
//!         crc32c u32 of the entry's data
//! 4092 4  crc32c of bytes 0..4092
//! ```
//!
//! Each slice also carries the block store's own crc32c, verified on every read. Recovery reads
//! the oplog extent groups in order and replays batches with consecutive sequence numbers above
//! the drained watermark (kept in metadata), stopping at the first batch that is unwritten, torn
//! or out of sequence: that batch's flush never completed, so none of its writes was acknowledged.
//!
//! The in-memory index maps each 4 KiB vdisk block to its newest oplog copy; reads consult it
//! before the cache and the extent store.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use blockstore::{BlockDevice, BlockStore, DmaBuf, ExtentGroupId, StoreError};

/// Bytes per vdisk block (and per oplog slice).
pub const BLOCK_BYTES: usize = 4096;
/// Oplog extent group ids have this bit set (extent store ids never do).
pub const OPLOG_EGID_BIT: u64 = 1 << 62;

/// The vdisk an extent group belongs to (oplog or extent store): extent-group ids carry their
/// vdisk's id above their 24-bit sequence number.
pub fn vdisk_of_egroup(egid: u64) -> u64 {
    (egid & !OPLOG_EGID_BIT) >> 24
}
/// Largest entry in blocks: writes are split into entries of at most 256 KiB.
pub const MAX_ENTRY_BLOCKS: u32 = 64;
/// Entries per batch (what fits in the header slice).
pub const MAX_BATCH_ENTRIES: usize = (BLOCK_BYTES - 64 - 4) / 16;
/// Data slices per batch (1 MiB).
pub const MAX_BATCH_DATA_BLOCKS: u32 = 256;

const MAGIC: [u8; 8] = *b"CRNOPLG1";
const VERSION: u32 = 1;
const ZERO_FLAG: u32 = 1 << 31;

const _: () = assert!(MAX_ENTRY_BLOCKS <= MAX_BATCH_DATA_BLOCKS);
const _: () = assert!(MAX_BATCH_ENTRIES >= 200);

/// Where the newest copy of a vdisk block is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OplogLoc {
    /// Batch sequence number.
    pub seq: u64,
    /// Oplog extent group.
    pub egid: ExtentGroupId,
    /// Slice in it (`None`: the block was zeroed/trimmed).
    pub slice: Option<u32>,
}

/// One entry of a batch, as kept in memory for draining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryInfo {
    /// First vdisk block.
    pub vblock: u64,
    /// Number of blocks.
    pub blocks: u32,
    /// A zero (trim / write-zeroes) entry.
    pub zero: bool,
}

/// A durable batch not yet drained.
#[derive(Debug, Clone)]
pub struct BatchInfo {
    /// Sequence number.
    pub seq: u64,
    /// Extent group holding it.
    pub egid: ExtentGroupId,
    /// Its first data slice (the data of its non-zero entries follows in entry order).
    pub data_slice: u32,
    /// Its entries.
    pub entries: Vec<EntryInfo>,
    /// Data blocks it holds.
    pub data_blocks: u32,
}

/// An oplog extent group in use.
#[derive(Debug, Clone, Copy)]
struct OplogEgroup {
    egid: ExtentGroupId,
    /// Highest batch sequence written into it.
    last_seq: u64,
}

/// Why an oplog operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OplogError {
    /// The block store failed (the oplog stops accepting writes).
    #[error("oplog of vdisk {vdisk}: {source}")]
    Store {
        /// Vdisk id.
        vdisk: u64,
        /// Cause.
        #[source]
        source: StoreError,
    },
    /// An earlier commit failed; the oplog accepts no more writes until the node restarts.
    #[error("oplog of vdisk {vdisk} is offline after an earlier failure")]
    Failed {
        /// Vdisk id.
        vdisk: u64,
    },
    /// A batch could not reach its replicas (the oplog stops accepting writes).
    #[error("oplog of vdisk {vdisk}: batch {seq} not replicated: {reason}")]
    Replication {
        /// Vdisk id.
        vdisk: u64,
        /// Batch sequence number.
        seq: u64,
        /// What the replication layer said.
        reason: String,
    },
    /// A replicated batch was malformed (refused; nothing stored).
    #[error("oplog replica of vdisk {vdisk}: bad batch: {reason}")]
    BadReplicaBatch {
        /// Vdisk id.
        vdisk: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A replicated batch skipped sequence numbers (refused; the primary resends from
    /// `expected`).
    #[error("oplog replica of vdisk {vdisk}: batch {got} arrived, {expected} expected")]
    ReplicaGap {
        /// Vdisk id.
        vdisk: u64,
        /// The next sequence number this replica needs.
        expected: u64,
        /// What arrived.
        got: u64,
    },
    /// The device has no free extent group for the oplog and nothing to drain.
    #[error("oplog of vdisk {vdisk}: no space on the device")]
    NoSpace {
        /// Vdisk id.
        vdisk: u64,
    },
    /// A batch found at recovery is damaged (unreadable, or its data fails its checksums), but
    /// the batch after it is on the device: the damaged one was complete, and acknowledged, so
    /// it is not a write cut short by a crash. The oplog refuses to open rather than drop it
    /// and every later batch.
    #[error(
        "oplog of vdisk {vdisk}: batch {seq} at extent group {egid:#x} slice {slice} is \
         damaged, and batch {} after it shows it was acknowledged: refusing to open without it",
        seq + 1
    )]
    Corrupt {
        /// Vdisk id.
        vdisk: u64,
        /// The damaged batch.
        seq: u64,
        /// Where it is.
        egid: ExtentGroupId,
        /// Its first slice.
        slice: u32,
    },
}

/// The batch being filled by writers.
struct Filling {
    buf: DmaBuf,
    entries: Vec<EntryInfo>,
    crcs: Vec<u32>,
    data_blocks: u32,
    /// Ticket of the last writer in this batch.
    last_ticket: u64,
}

struct State {
    filling: Filling,
    spare: Option<DmaBuf>,
    egroups: VecDeque<OplogEgroup>,
    /// Next free slice in the newest oplog extent group.
    next_slice: u32,
    next_egroup_n: u32,
    next_seq: u64,
    next_ticket: u64,
    /// Tickets up to this one are durable.
    durable_ticket: u64,
    index: BTreeMap<u64, OplogLoc>,
    batches: VecDeque<BatchInfo>,
    failed: bool,
}

/// A vdisk's oplog.
pub struct Oplog<D: BlockDevice> {
    store: Rc<BlockStore<D>>,
    vdisk: u64,
    uuid: u128,
    slices_per_egroup: u32,
    state: RefCell<State>,
    commit_lock: async_lock::Mutex<()>,
    /// Signalled whenever the commit lock is released: writers waiting for their batch sleep
    /// on it together instead of queueing on the lock (which would wake them one per turn).
    commit_released: event_listener::Event,
    /// Signalled when a batch becomes durable (the drain waits on it).
    committed: event_listener::Event,
    /// Signalled when the drain freed space (back-pressured writers wait on it).
    drained: event_listener::Event,
    cap_bytes: u64,
    held_bytes: Cell<u64>,
    replicator: RefCell<Option<Rc<Replicator>>>,
    /// Where a failed read gets good copies (the replicas).
    fetch: RefCell<Option<crate::replication::Mirror>>,
    /// Slices repaired from a replica.
    repaired: Cell<u64>,
}

/// Where a primary's oplog sends each committed batch: `(sequence, header and data slices)`,
/// resolving once the batch is durable on the replicas (see [`Oplog::set_replicator`]).
pub type Replicator = Box<
    dyn Fn(
        u64,
        Rc<[u8]>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>>>>,
>;

/// The commit lock, held; dropping it releases the lock, then wakes the waiting writers.
struct CommitGuard<'a> {
    guard: Option<async_lock::MutexGuard<'a, ()>>,
    released: &'a event_listener::Event,
}

impl Drop for CommitGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.released.notify(usize::MAX);
    }
}

/// Extent group id of the `n`-th oplog extent group of `vdisk`.
pub fn oplog_egid(vdisk: u64, n: u32) -> ExtentGroupId {
    OPLOG_EGID_BIT | (vdisk << 24) | u64::from(n & 0x00FF_FFFF)
}

fn batch_buf() -> DmaBuf {
    DmaBuf::new((1 + MAX_BATCH_DATA_BLOCKS as usize) * BLOCK_BYTES)
}

fn rd_u32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn rd_u128(b: &[u8], o: usize) -> u128 {
    u128::from_le_bytes(b[o..o + 16].try_into().expect("16 bytes"))
}
fn rd_u64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// A decoded batch header.
struct Header {
    seq: u64,
    data_slices: u32,
    entries: Vec<(EntryInfo, u32)>,
}

/// Looks for batch headers of one vdisk's oplog on its device, at recovery.
struct Probe<'a, D: BlockDevice> {
    store: &'a BlockStore<D>,
    vdisk: u64,
    uuid: u128,
}

impl<D: BlockDevice> Probe<'_, D> {
    /// The sequence number of the valid batch header at slice `slice` of `egid`, if there is
    /// one (and it is batch `seq`, when given).
    async fn at(&self, egid: ExtentGroupId, slice: u32, seq: Option<u64>) -> Option<u64> {
        let mut header = DmaBuf::new(BLOCK_BYTES);
        self.store
            .read_slices(egid, slice, &mut header)
            .await
            .ok()?;
        let found = decode_header(&header, self.vdisk, self.uuid)?.seq;
        seq.is_none_or(|s| s == found).then_some(found)
    }

    /// The first slice of `egid` from `from` on, within one batch's length, that holds a valid
    /// batch header (of batch `seq`, when given), and that batch's sequence number. Only slices
    /// written since the extent group was allocated are read (at the end of the log there are
    /// usually none), so nothing older than the extent group is taken for a batch.
    async fn find(&self, egid: ExtentGroupId, from: u32, seq: Option<u64>) -> Option<(u32, u64)> {
        let written = self.store.slice_crcs(egid)?;
        let end = (from + 1 + MAX_BATCH_DATA_BLOCKS).min(written.len() as u32);
        for slice in from..end {
            if written[slice as usize].is_some()
                && let Some(found) = self.at(egid, slice, seq).await
            {
                return Some((slice, found));
            }
        }
        None
    }
}

fn decode_header(b: &[u8], vdisk: u64, uuid: u128) -> Option<Header> {
    if b[0..8] != MAGIC
        || rd_u32(b, 8) != VERSION
        || rd_u64(b, 16) != vdisk
        || rd_u128(b, 40) != uuid
    {
        return None;
    }
    if rd_u32(b, 4092) != crc32c::crc32c(&b[..4092]) {
        return None;
    }
    let count = rd_u32(b, 12) as usize;
    let data_slices = rd_u32(b, 32);
    if count > MAX_BATCH_ENTRIES || data_slices > MAX_BATCH_DATA_BLOCKS {
        return None;
    }
    let mut entries = Vec::with_capacity(count);
    let mut data = 0u32;
    for i in 0..count {
        let o = 64 + 16 * i;
        let raw = rd_u32(b, o + 8);
        let zero = raw & ZERO_FLAG != 0;
        let blocks = raw & !ZERO_FLAG;
        if blocks == 0 || (!zero && blocks > MAX_ENTRY_BLOCKS) {
            return None;
        }
        if !zero {
            data += blocks;
        }
        entries.push((
            EntryInfo {
                vblock: rd_u64(b, o),
                blocks,
                zero,
            },
            rd_u32(b, o + 12),
        ));
    }
    (data == data_slices).then_some(Header {
        seq: rd_u64(b, 24),
        data_slices,
        entries,
    })
}

impl<D: BlockDevice> Oplog<D> {
    /// Recovers the oplog of `vdisk` from `store`: replays durable batches above `drained_seq`
    /// and frees oplog extent groups that hold nothing undrained.
    pub async fn recover(
        store: Rc<BlockStore<D>>,
        vdisk: u64,
        drained_seq: u64,
        cap_bytes: u64,
    ) -> Result<Self, OplogError> {
        let err = |source| OplogError::Store { vdisk, source };
        let layout = *store.layout();
        assert_eq!(
            layout.slice_bytes as usize, BLOCK_BYTES,
            "oplog needs 4 KiB slices"
        );
        let slices_per_egroup = layout.slices_per_egroup();
        let mut mine: Vec<ExtentGroupId> = store
            .egroups()
            .iter()
            .map(|e| e.egid)
            .filter(|&e| e & OPLOG_EGID_BIT != 0 && vdisk_of_egroup(e) == vdisk)
            .collect();
        mine.sort_by_key(|e| e & 0x00FF_FFFF);
        let uuid = store.superblock().uuid;
        let mut index = BTreeMap::new();
        let mut batches = VecDeque::new();
        let mut egroups = VecDeque::new();
        let mut expected: Option<u64> = None;
        let mut last_seq = drained_seq;
        let mut next_slice = slices_per_egroup;
        // After the first extent group without a valid batch in sequence, nothing later was
        // acknowledged (batches are written one at a time, each flushed before the next).
        let mut stopped = false;
        let mut header = DmaBuf::new(BLOCK_BYTES);
        let mut to_free = Vec::new();
        let probe = Probe {
            store: &store,
            vdisk,
            uuid,
        };
        for (i, &egid) in mine.iter().enumerate() {
            if stopped {
                to_free.push(egid);
                continue;
            }
            let mut slice = 0;
            let mut eg_last = None;
            let next_egid = mine.get(i + 1).copied();
            while slice < slices_per_egroup {
                let h = if store.read_slices(egid, slice, &mut header).await.is_ok() {
                    decode_header(&header, vdisk, uuid)
                } else {
                    None
                };
                let Some(h) = h else {
                    // No batch here: the end of the log, or a damaged header. Only the batch
                    // being written at a crash can be cut short, and it has no successor; if
                    // the expected batch's successor is on the device (any batch, for the
                    // oldest one, whose number is not known yet), this one was complete.
                    let successor = expected.map(|k| k + 1);
                    let found = probe.find(egid, slice + 1, successor).await;
                    let next = match (found, next_egid) {
                        (None, Some(n)) => probe.at(n, 0, successor).await,
                        _ => None,
                    };
                    let Some(k) = found
                        .map(|(_, q)| q)
                        .or(next)
                        .and_then(|q| q.checked_sub(1))
                    else {
                        break;
                    };
                    if k > drained_seq {
                        return Err(OplogError::Corrupt {
                            vdisk,
                            seq: k,
                            egid,
                            slice,
                        });
                    }
                    // Drained already: its data is in the extent store; go on after it (this
                    // extent group stays, freed with the other drained ones below).
                    expected = Some(k + 1);
                    eg_last = Some(k);
                    last_seq = last_seq.max(k);
                    match found {
                        Some((at, _)) => {
                            slice = at;
                            continue;
                        }
                        None => break,
                    }
                };
                if expected.is_some_and(|e| h.seq != e)
                    || slice + 1 + h.data_slices > slices_per_egroup
                {
                    break;
                }
                // Verify the batch's data before believing it.
                if h.data_slices > 0 {
                    let mut data = DmaBuf::new(h.data_slices as usize * BLOCK_BYTES);
                    let mut ok = store.read_slices(egid, slice + 1, &mut data).await.is_ok();
                    let mut off = 0;
                    for (e, crc) in h.entries.iter().filter(|(e, _)| !e.zero) {
                        let len = e.blocks as usize * BLOCK_BYTES;
                        ok &= crc32c::crc32c(&data[off..off + len]) == *crc;
                        off += len;
                    }
                    if !ok {
                        // Cut short by a crash (nothing after it), or damaged since (its
                        // successor is where the writer put it: right after it, or at the
                        // start of the next extent group when it did not fit).
                        let after = slice + 1 + h.data_slices;
                        let next = Some(h.seq + 1);
                        let here = if after < slices_per_egroup {
                            probe.at(egid, after, next).await
                        } else {
                            None
                        };
                        let there = match (here, next_egid) {
                            (None, Some(n)) => probe.at(n, 0, next).await,
                            _ => None,
                        };
                        let successor = here.or(there).is_some();
                        if !successor {
                            break;
                        }
                        if h.seq > drained_seq {
                            return Err(OplogError::Corrupt {
                                vdisk,
                                seq: h.seq,
                                egid,
                                slice,
                            });
                        }
                        // Drained already: not needed; go on after it.
                        expected = Some(h.seq + 1);
                        eg_last = Some(h.seq);
                        last_seq = last_seq.max(h.seq);
                        slice = after;
                        continue;
                    }
                }
                expected = Some(h.seq + 1);
                eg_last = Some(h.seq);
                last_seq = last_seq.max(h.seq);
                if h.seq > drained_seq {
                    let mut data_slice = slice + 1;
                    let mut infos = Vec::with_capacity(h.entries.len());
                    for (e, _) in &h.entries {
                        for i in 0..e.blocks {
                            let loc = OplogLoc {
                                seq: h.seq,
                                egid,
                                slice: (!e.zero).then_some(data_slice + i),
                            };
                            index.insert(e.vblock + u64::from(i), loc);
                        }
                        if !e.zero {
                            data_slice += e.blocks;
                        }
                        infos.push(*e);
                    }
                    batches.push_back(BatchInfo {
                        seq: h.seq,
                        egid,
                        data_slice: slice + 1,
                        entries: infos,
                        data_blocks: h.data_slices,
                    });
                }
                slice += 1 + h.data_slices;
            }
            match eg_last {
                None => {
                    to_free.push(egid);
                    stopped = true;
                }
                Some(last) => {
                    egroups.push_back(OplogEgroup {
                        egid,
                        last_seq: last,
                    });
                    next_slice = slice;
                }
            }
        }
        // Oplog extent groups whose batches are all drained hold nothing needed.
        while let Some(front) = egroups.front() {
            if front.last_seq <= drained_seq && egroups.len() > 1 {
                to_free.push(front.egid);
                egroups.pop_front();
            } else {
                break;
            }
        }
        let next_egroup_n = mine.last().map_or(0, |e| (e & 0x00FF_FFFF) as u32 + 1);
        for egid in to_free {
            store.free(egid).map_err(err)?;
        }
        store.flush().await.map_err(err)?;
        let held = egroups.len() as u64 * u64::from(layout.egroup_bytes);
        Ok(Self {
            store,
            vdisk,
            uuid,
            slices_per_egroup,
            state: RefCell::new(State {
                filling: Filling {
                    buf: batch_buf(),
                    entries: Vec::with_capacity(MAX_BATCH_ENTRIES),
                    crcs: Vec::with_capacity(MAX_BATCH_ENTRIES),
                    data_blocks: 0,
                    last_ticket: 0,
                },
                spare: Some(batch_buf()),
                egroups,
                next_slice,
                next_egroup_n,
                next_seq: last_seq + 1,
                next_ticket: 1,
                durable_ticket: 0,
                index,
                batches,
                failed: false,
            }),
            commit_lock: async_lock::Mutex::new(()),
            commit_released: event_listener::Event::new(),
            committed: event_listener::Event::new(),
            drained: event_listener::Event::new(),
            cap_bytes,
            held_bytes: Cell::new(held),
            replicator: RefCell::new(None),
            fetch: RefCell::new(None),
            repaired: Cell::new(0),
        })
    }

    /// Bytes of extent groups the oplog holds.
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes.get()
    }

    /// Undrained durable batches.
    pub fn undrained_batches(&self) -> usize {
        self.state.borrow().batches.len()
    }

    /// Data blocks in undrained durable batches.
    pub fn undrained_blocks(&self) -> u64 {
        self.state
            .borrow()
            .batches
            .iter()
            .map(|b| u64::from(b.data_blocks))
            .sum()
    }

    /// The per-vdisk cap in bytes.
    pub fn cap_bytes(&self) -> u64 {
        self.cap_bytes
    }

    /// The newest oplog copy of `vblock`, if any.
    pub fn lookup(&self, vblock: u64) -> Option<OplogLoc> {
        self.state.borrow().index.get(&vblock).copied()
    }

    /// Whether any block in `[vblock, vblock + blocks)` has an oplog copy.
    pub fn overlaps(&self, vblock: u64, blocks: u64) -> bool {
        self.state
            .borrow()
            .index
            .range(vblock..vblock + blocks)
            .next()
            .is_some()
    }

    /// Reads `blocks` consecutive oplog slices starting at `loc` into `buf`. A slice that fails
    /// its checksum is read from a replica's copy of its batch (when the oplog has replicas,
    /// [`Oplog::set_fetch`]) and rewritten here.
    pub async fn read(
        &self,
        egid: ExtentGroupId,
        slice: u32,
        buf: &mut DmaBuf,
    ) -> Result<(), OplogError> {
        let vdisk = self.vdisk;
        match self.store.read_slices(egid, slice, buf).await {
            Err(bad @ StoreError::ChecksumMismatch { .. }) => {
                self.repair(egid, slice, buf, bad).await
            }
            r => r.map_err(|source| OplogError::Store { vdisk, source }),
        }
    }

    /// Where a failed oplog read gets good copies of slices from (the vdisk's replicas).
    pub fn set_fetch(&self, mirror: crate::replication::Mirror) {
        *self.fetch.borrow_mut() = Some(mirror);
    }

    /// Slices repaired from a replica after failing their checksum here.
    pub fn repaired_slices(&self) -> u64 {
        self.repaired.get()
    }

    /// Reads slices `slice..` of `egid` one by one from a replica (by batch sequence and offset:
    /// a replica places batches in extent groups of its own) and rewrites them here.
    async fn repair(
        &self,
        egid: ExtentGroupId,
        slice: u32,
        buf: &mut DmaBuf,
        bad: StoreError,
    ) -> Result<(), OplogError> {
        let vdisk = self.vdisk;
        let fetch = self.fetch.borrow().clone();
        let Some(fetch) = fetch else {
            return Err(OplogError::Store { vdisk, source: bad });
        };
        let n = (buf.len() / BLOCK_BYTES) as u32;
        for i in 0..n {
            let s = slice + i;
            let found = self.state.borrow().batches.iter().find_map(|b| {
                (b.egid == egid && s >= b.data_slice && s < b.data_slice + b.data_blocks)
                    .then_some((b.seq, s - b.data_slice))
            });
            let Some((seq, offset)) = found else {
                return Err(OplogError::Store { vdisk, source: bad });
            };
            let good = fetch(crate::replication::ReplicaOp::OplogRead {
                seq,
                offset,
                blocks: 1,
            })
            .await
            .map_err(|reason| OplogError::Replication { vdisk, seq, reason })?;
            if good.len() != BLOCK_BYTES {
                return Err(OplogError::Replication {
                    vdisk,
                    seq,
                    reason: format!("a replica returned {} bytes for one slice", good.len()),
                });
            }
            buf[i as usize * BLOCK_BYTES..(i as usize + 1) * BLOCK_BYTES].copy_from_slice(&good);
        }
        self.store
            .write_slices(egid, slice, buf)
            .await
            .map_err(|source| OplogError::Store { vdisk, source })?;
        self.repaired.set(self.repaired.get() + u64::from(n));
        eprintln!(
            "cairn: vdisk {vdisk}: {bad}; {n} oplog slice(s) from slice {slice} read from a \
             replica and rewritten"
        );
        Ok(())
    }

    /// The undrained batch `seq`, if this oplog holds it.
    pub fn batch(&self, seq: u64) -> Option<BatchInfo> {
        self.state
            .borrow()
            .batches
            .iter()
            .find(|b| b.seq == seq)
            .cloned()
    }

    /// Appends a write of whole blocks (`data` is `blocks * 4 KiB`, or `None` for zeroes, at
    /// most 2^31 - 1 blocks) and returns once it is durable.
    pub async fn append(
        &self,
        vblock: u64,
        blocks: u32,
        data: Option<&[u8]>,
    ) -> Result<(), OplogError> {
        assert!(blocks > 0);
        if let Some(d) = data {
            assert_eq!(d.len(), blocks as usize * BLOCK_BYTES);
        }
        // Back-pressure: wait while the oplog holds more than its cap.
        while self.held_bytes.get() >= self.cap_bytes {
            let listener = self.drained.listen();
            if self.held_bytes.get() < self.cap_bytes {
                break;
            }
            if self.state.borrow().failed {
                return Err(OplogError::Failed { vdisk: self.vdisk });
            }
            listener.await;
        }
        let mut done = 0u32;
        let mut last_ticket = 0;
        // Data entries carry at most 256 KiB; zero entries carry no data and may be long.
        let max_entry = if data.is_some() {
            MAX_ENTRY_BLOCKS
        } else {
            ZERO_FLAG - 1
        };
        while done < blocks {
            let n = (blocks - done).min(max_entry);
            let part =
                data.map(|d| &d[done as usize * BLOCK_BYTES..(done + n) as usize * BLOCK_BYTES]);
            last_ticket = self.enqueue(vblock + u64::from(done), n, part).await?;
            done += n;
        }
        self.wait_durable(last_ticket).await
    }

    /// Copies one entry into the batch being filled (committing first when it is full).
    async fn enqueue(
        &self,
        vblock: u64,
        blocks: u32,
        data: Option<&[u8]>,
    ) -> Result<u64, OplogError> {
        loop {
            {
                let mut st = self.state.borrow_mut();
                if st.failed {
                    return Err(OplogError::Failed { vdisk: self.vdisk });
                }
                let need = if data.is_some() { blocks } else { 0 };
                let f = &mut st.filling;
                if f.entries.len() < MAX_BATCH_ENTRIES
                    && f.data_blocks + need <= MAX_BATCH_DATA_BLOCKS
                {
                    let crc = match data {
                        Some(d) => {
                            let off = (1 + f.data_blocks as usize) * BLOCK_BYTES;
                            f.buf[off..off + d.len()].copy_from_slice(d);
                            crc32c::crc32c(d)
                        }
                        None => 0,
                    };
                    f.entries.push(EntryInfo {
                        vblock,
                        blocks,
                        zero: data.is_none(),
                    });
                    f.crcs.push(crc);
                    f.data_blocks += need;
                    let ticket = st.next_ticket;
                    st.next_ticket += 1;
                    st.filling.last_ticket = ticket;
                    return Ok(ticket);
                }
            }
            // Full: commit it (or wait for whoever is committing) and try again.
            let _guard = self.lock_commit().await;
            self.commit_filling().await?;
        }
    }

    async fn wait_durable(&self, ticket: u64) -> Result<(), OplogError> {
        loop {
            // Listen before looking, so a release between the look and the wait is not missed.
            let released = self.commit_released.listen();
            {
                let st = self.state.borrow();
                if st.durable_ticket >= ticket {
                    return Ok(());
                }
                if st.failed {
                    return Err(OplogError::Failed { vdisk: self.vdisk });
                }
            }
            match self.try_lock_commit() {
                // Nobody is committing: commit the filling batch (ours is in it).
                Some(_guard) => self.commit_filling().await?,
                // A commit is under way, maybe of our batch: every waiter wakes when it ends.
                None => released.await,
            }
        }
    }

    /// Takes the commit lock; releasing it wakes every writer waiting for durability.
    async fn lock_commit(&self) -> CommitGuard<'_> {
        CommitGuard {
            guard: Some(self.commit_lock.lock().await),
            released: &self.commit_released,
        }
    }

    fn try_lock_commit(&self) -> Option<CommitGuard<'_>> {
        self.commit_lock.try_lock().map(|g| CommitGuard {
            guard: Some(g),
            released: &self.commit_released,
        })
    }

    /// Writes the filling batch and flushes. Caller holds the commit lock.
    async fn commit_filling(&self) -> Result<(), OplogError> {
        let r = self.commit_inner().await;
        if r.is_err() {
            self.close();
        }
        r
    }

    async fn commit_inner(&self) -> Result<(), OplogError> {
        let vdisk = self.vdisk;
        let err = |source| OplogError::Store { vdisk, source };
        // Take the filled batch, leaving the spare buffer for writers to fill meanwhile.
        let (mut buf, entries, crcs, data_blocks, last_ticket, seq) = {
            let mut st = self.state.borrow_mut();
            if st.filling.entries.is_empty() {
                return Ok(());
            }
            let spare = st.spare.take().expect("spare batch buffer");
            let f = std::mem::replace(
                &mut st.filling,
                Filling {
                    buf: spare,
                    entries: Vec::with_capacity(MAX_BATCH_ENTRIES),
                    crcs: Vec::with_capacity(MAX_BATCH_ENTRIES),
                    data_blocks: 0,
                    last_ticket: 0,
                },
            );
            let seq = st.next_seq;
            st.next_seq += 1;
            (f.buf, f.entries, f.crcs, f.data_blocks, f.last_ticket, seq)
        };
        // Header.
        {
            let h = &mut buf[..BLOCK_BYTES];
            h.fill(0);
            h[0..8].copy_from_slice(&MAGIC);
            h[8..12].copy_from_slice(&VERSION.to_le_bytes());
            h[12..16].copy_from_slice(&(entries.len() as u32).to_le_bytes());
            h[16..24].copy_from_slice(&self.vdisk.to_le_bytes());
            h[24..32].copy_from_slice(&seq.to_le_bytes());
            h[32..36].copy_from_slice(&data_blocks.to_le_bytes());
            // The block store's format uuid: a guest block crafted to look like a header
            // cannot know it, so stale data slices never parse as a batch.
            h[40..56].copy_from_slice(&self.uuid.to_le_bytes());
            for (i, (e, crc)) in entries.iter().zip(&crcs).enumerate() {
                let o = 64 + 16 * i;
                h[o..o + 8].copy_from_slice(&e.vblock.to_le_bytes());
                let raw = e.blocks | if e.zero { ZERO_FLAG } else { 0 };
                h[o + 8..o + 12].copy_from_slice(&raw.to_le_bytes());
                h[o + 12..o + 16].copy_from_slice(&crc.to_le_bytes());
            }
            let crc = crc32c::crc32c(&h[..4092]);
            h[4092..].copy_from_slice(&crc.to_le_bytes());
        }
        let slices = 1 + data_blocks;
        let (egid, first) = self.place(seq, slices).await?;
        // Write only the filled part of the pooled batch buffer.
        buf.set_len(slices as usize * BLOCK_BYTES);
        // The batch's slices held nothing acknowledged: its data and the store's journal go to
        // the device together, then one flush makes both durable. With replicas, the batch
        // goes to them at the same time; it counts as durable once everyone has it.
        let replicator = self.replicator.borrow().clone();
        let result = match replicator {
            None => self.store.write_slices_durable(egid, first, &buf).await,
            Some(replicate) => {
                let copy: Rc<[u8]> = Rc::from(&buf[..]);
                let (local, remote) = futures_lite::future::zip(
                    self.store.write_slices_durable(egid, first, &buf),
                    replicate(seq, copy),
                )
                .await;
                if let Err(reason) = remote {
                    buf.set_len(buf.capacity());
                    return Err(OplogError::Replication { vdisk, seq, reason });
                }
                local
            }
        };
        buf.set_len(buf.capacity());
        result.map_err(err)?;
        // Durable: index the batch and release its writers.
        let mut st = self.state.borrow_mut();
        let mut data_slice = first + 1;
        for e in &entries {
            for i in 0..e.blocks {
                let loc = OplogLoc {
                    seq,
                    egid,
                    slice: (!e.zero).then_some(data_slice + i),
                };
                st.index.insert(e.vblock + u64::from(i), loc);
            }
            if !e.zero {
                data_slice += e.blocks;
            }
        }
        st.batches.push_back(BatchInfo {
            seq,
            egid,
            data_slice: first + 1,
            entries,
            data_blocks,
        });
        st.durable_ticket = st.durable_ticket.max(last_ticket);
        st.spare = Some(buf);
        drop(st);
        self.committed.notify(usize::MAX);
        Ok(())
    }

    /// Reserves `slices` slices for batch `seq`: in the newest oplog extent group if they fit,
    /// else in a new one. Caller holds the commit lock.
    async fn place(&self, seq: u64, slices: u32) -> Result<(ExtentGroupId, u32), OplogError> {
        let need_new = {
            let st = self.state.borrow();
            st.egroups.is_empty() || st.next_slice + slices > self.slices_per_egroup
        };
        if need_new {
            let egid = self.allocate_egroup().await?;
            let mut st = self.state.borrow_mut();
            st.egroups.push_back(OplogEgroup {
                egid,
                last_seq: seq,
            });
            st.next_slice = 0;
        }
        let mut st = self.state.borrow_mut();
        let first = st.next_slice;
        st.next_slice += slices;
        let back = st.egroups.back_mut().expect("an oplog extent group");
        back.last_seq = seq;
        Ok((back.egid, first))
    }

    /// Sends every batch this oplog commits to `replicate` as well (its sequence number and its
    /// bytes: the header slice, then the data slices), alongside the local write; a batch is
    /// durable, and its writers acknowledged, only when both succeed. `replicate` is the
    /// replication layer: it retries and re-chooses peers itself and returns an error only
    /// when the batch cannot reach its replication factor, which takes the oplog offline like
    /// a local device failure.
    pub fn set_replicator(&self, replicate: Replicator) {
        *self.replicator.borrow_mut() = Some(Rc::new(replicate));
    }

    /// Stores a batch of the primary's oplog of this vdisk (the bytes its replicator got) in
    /// this replica, durably. Batches must arrive in sequence order; a batch already stored is
    /// acknowledged again (a retry); a gap is refused, except into an empty replica (one that
    /// joins mid-stream: the replication layer must make sure the primary drained, or this
    /// replica already holds, everything before it). The header is re-stamped with this
    /// device's format uuid, so [`Oplog::recover`] on this device — a failover — replays the
    /// batch like one of its own. Returns the batch's sequence number.
    pub async fn append_replica(&self, batch: &[u8]) -> Result<u64, OplogError> {
        let vdisk = self.vdisk;
        let bad = |reason: &'static str| OplogError::BadReplicaBatch { vdisk, reason };
        if batch.len() < BLOCK_BYTES || !batch.len().is_multiple_of(BLOCK_BYTES) {
            return Err(bad("not a whole number of 4 KiB slices"));
        }
        let sender_uuid = rd_u128(batch, 40);
        let h = decode_header(&batch[..BLOCK_BYTES], vdisk, sender_uuid)
            .ok_or_else(|| bad("header does not decode for this vdisk"))?;
        if batch.len() != (1 + h.data_slices as usize) * BLOCK_BYTES {
            return Err(bad("length does not match the header"));
        }
        let mut off = BLOCK_BYTES;
        for (e, crc) in h.entries.iter().filter(|(e, _)| !e.zero) {
            let len = e.blocks as usize * BLOCK_BYTES;
            if crc32c::crc32c(&batch[off..off + len]) != *crc {
                return Err(bad("entry data fails its checksum"));
            }
            off += len;
        }
        let _guard = self.lock_commit().await;
        {
            let mut st = self.state.borrow_mut();
            if st.failed {
                return Err(OplogError::Failed { vdisk });
            }
            if h.seq < st.next_seq {
                return Ok(h.seq); // stored already
            }
            if h.seq > st.next_seq {
                if !st.batches.is_empty() {
                    return Err(OplogError::ReplicaGap {
                        vdisk,
                        expected: st.next_seq,
                        got: h.seq,
                    });
                }
                st.next_seq = h.seq;
            }
            st.next_seq += 1;
        }
        let slices = 1 + h.data_slices;
        let mut buf = DmaBuf::new(batch.len());
        buf.copy_from_slice(batch);
        buf[40..56].copy_from_slice(&self.uuid.to_le_bytes());
        let crc = crc32c::crc32c(&buf[..4092]);
        buf[4092..BLOCK_BYTES].copy_from_slice(&crc.to_le_bytes());
        let stored = async {
            let (egid, first) = self.place(h.seq, slices).await?;
            self.store
                .write_slices_durable(egid, first, &buf)
                .await
                .map_err(|source| OplogError::Store { vdisk, source })?;
            Ok::<_, OplogError>((egid, first))
        };
        let (egid, first) = match stored.await {
            Ok(placed) => placed,
            Err(e) => {
                self.close();
                return Err(e);
            }
        };
        // Kept for `drained` (which frees extent groups); a replica serves no reads, so its
        // blocks are not indexed.
        self.state.borrow_mut().batches.push_back(BatchInfo {
            seq: h.seq,
            egid,
            data_slice: first + 1,
            entries: h.entries.into_iter().map(|(e, _)| e).collect(),
            data_blocks: h.data_slices,
        });
        Ok(h.seq)
    }

    async fn allocate_egroup(&self) -> Result<ExtentGroupId, OplogError> {
        loop {
            let egid = {
                let mut st = self.state.borrow_mut();
                let n = st.next_egroup_n;
                st.next_egroup_n = (n + 1) & 0x00FF_FFFF;
                oplog_egid(self.vdisk, n)
            };
            match self.store.allocate(egid) {
                Ok(()) => {
                    self.held_bytes
                        .set(self.held_bytes.get() + u64::from(self.store.layout().egroup_bytes));
                    return Ok(egid);
                }
                Err(StoreError::EgroupExists { .. }) => continue,
                Err(StoreError::NoSpace { pending_free, .. }) => {
                    // Space comes back when the drain frees oplog extent groups (and they are
                    // flushed); with nothing to drain, the device is full.
                    if self.state.borrow().batches.is_empty() && pending_free == 0 {
                        return Err(OplogError::NoSpace { vdisk: self.vdisk });
                    }
                    if pending_free > 0 {
                        self.store
                            .flush()
                            .await
                            .map_err(|source| OplogError::Store {
                                vdisk: self.vdisk,
                                source,
                            })?;
                        continue;
                    }
                    let listener = self.drained.listen();
                    if self.state.borrow().failed {
                        return Err(OplogError::Failed { vdisk: self.vdisk });
                    }
                    listener.await;
                }
                Err(source) => {
                    return Err(OplogError::Store {
                        vdisk: self.vdisk,
                        source,
                    });
                }
            }
        }
    }

    /// Waits until at least one durable batch is undrained.
    pub async fn wait_for_work(&self) {
        loop {
            let listener = self.committed.listen();
            if !self.state.borrow().batches.is_empty() || self.state.borrow().failed {
                return;
            }
            listener.await;
        }
    }

    /// The oldest undrained batches, up to about `max_blocks` of data (at least one batch).
    pub fn batches_to_drain(&self, max_blocks: u32) -> Vec<BatchInfo> {
        let st = self.state.borrow();
        let mut out = Vec::new();
        let mut total = 0;
        for b in &st.batches {
            if !out.is_empty() && total + b.data_blocks > max_blocks {
                break;
            }
            total += b.data_blocks;
            out.push(b.clone());
        }
        out
    }

    /// Marks batches up to `seq` drained: drops their index entries (unless overwritten by a
    /// newer batch) and frees oplog extent groups that hold nothing newer.
    pub fn drained(&self, seq: u64) -> Result<(), OplogError> {
        let mut st = self.state.borrow_mut();
        while st.batches.front().is_some_and(|b| b.seq <= seq) {
            let b = st.batches.pop_front().expect("front");
            for e in &b.entries {
                for i in 0..e.blocks {
                    let vb = e.vblock + u64::from(i);
                    if st.index.get(&vb).is_some_and(|l| l.seq <= seq) {
                        st.index.remove(&vb);
                    }
                }
            }
        }
        // Free fully drained extent groups, except the newest (still being appended to).
        let mut freed = 0;
        while st.egroups.len() > 1 && st.egroups.front().is_some_and(|g| g.last_seq <= seq) {
            let g = st.egroups.pop_front().expect("front");
            self.store
                .free(g.egid)
                .map_err(|source| OplogError::Store {
                    vdisk: self.vdisk,
                    source,
                })?;
            freed += 1;
        }
        drop(st);
        if freed > 0 {
            let eg = u64::from(self.store.layout().egroup_bytes);
            self.held_bytes.set(self.held_bytes.get() - freed * eg);
            self.drained.notify(usize::MAX);
        }
        Ok(())
    }

    /// Sends every undrained batch, oldest first, to `mirror` (a new or re-joining replica,
    /// after its RESET and the extent store's copy). Nothing may commit meanwhile. Returns the
    /// number of batches sent.
    pub async fn copy_to(&self, mirror: &crate::replication::Mirror) -> Result<usize, OplogError> {
        let vdisk = self.vdisk;
        let batches: Vec<BatchInfo> = self.state.borrow().batches.iter().cloned().collect();
        for b in &batches {
            let mut buf = DmaBuf::new((1 + b.data_blocks as usize) * BLOCK_BYTES);
            self.store
                .read_slices(b.egid, b.data_slice - 1, &mut buf)
                .await
                .map_err(|source| OplogError::Store { vdisk, source })?;
            mirror(crate::replication::ReplicaOp::OplogBatch {
                seq: b.seq,
                bytes: Rc::from(&buf[..]),
            })
            .await
            .map_err(|reason| OplogError::Replication {
                vdisk,
                seq: b.seq,
                reason,
            })?;
        }
        Ok(batches.len())
    }

    /// Takes the oplog offline (after a failure, or when its vdisk stops being served here):
    /// every later append fails, and so do writers waiting for a commit or for space.
    pub fn close(&self) {
        self.state.borrow_mut().failed = true;
        self.committed.notify(usize::MAX);
        self.drained.notify(usize::MAX);
    }

    /// Whether the oplog has failed.
    pub fn is_failed(&self) -> bool {
        self.state.borrow().failed
    }
}
