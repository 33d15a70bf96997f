//! The block store: extent groups of checksummed slices on one device, with crash-safe local
//! metadata.
//!
//! A [`BlockStore`] owns one formatted device on one core. Metadata changes (allocate, free,
//! slice written, slices trimmed) are applied to an in-memory table at once and appended to a
//! pending list; [`BlockStore::flush`] writes the pending records as one *batch* of journal blocks,
//! flushes the device, and from then on they survive a power cut. (On a device with cheap FUA
//! writes, data and journal writes are FUA writes instead, and no flush follows.) When the journal ring passes
//! half full, the flush also writes a full checkpoint into the older of two checkpoint slots, which
//! frees the ring up to that point.
//!
//! The contract is a disk's: a write that returned may sit in a volatile cache; everything that
//! returned before a flush returned is durable. After a power cut, [`BlockStore::open`] recovers a
//! state that contains every flushed change; an unflushed slice write reads back as its old value,
//! its new value, or a [`StoreError::ChecksumMismatch`] — never as wrong data. Callers must not
//! issue overlapping writes to one slice concurrently (as with NVMe).
//!
//! Three rules make recovery exact:
//! * journal blocks carry the format UUID, an epoch (one per open for writing) and a sequence
//!   number, so stale blocks of an earlier format, session or lap of the ring never replay;
//! * a slot freed by a record is not reused before that record is durable, so a flushed extent
//!   group's data is never overwritten while its metadata could still come back;
//! * a journal batch is written only after the previous batch was flushed (or its FUA write
//!   completed), so a bad block
//!   followed by a later batch is damage (refused, reported by fsck), while a bad block in the last
//!   batch is a torn tail (discarded: it was never acknowledged).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::buf::DmaBuf;
use crate::device::{BlockDevice, DeviceError, Tier};
use crate::format::{
    self, CheckpointHeader, EgroupMeta, FormatError, JournalHeader, Layout, META_BLOCK_BYTES,
    RECORDS_PER_BLOCK, Record, SUPERBLOCK_BYTES, Superblock,
};

/// Identifies an extent group on a device (chosen by the caller, unique per device).
pub type ExtentGroupId = u64;

/// Pending records that make a write commit the journal itself (so memory stays bounded when
/// nobody flushes): 16 journal blocks' worth.
pub const AUTO_COMMIT_RECORDS: usize = 16 * RECORDS_PER_BLOCK;

/// How to format a device.
#[derive(Debug, Clone)]
pub struct FormatOptions {
    /// Tier to record (default: what the backend reports).
    pub tier: Option<Tier>,
    /// Extent group size.
    pub egroup_bytes: u32,
    /// Slice size (the checksum unit).
    pub slice_bytes: u32,
    /// Journal ring size; 0 picks the default.
    pub journal_bytes: u64,
    /// Format UUID (default: random).
    pub uuid: Option<u128>,
}

impl Default for FormatOptions {
    fn default() -> Self {
        Self {
            tier: None,
            egroup_bytes: format::DEFAULT_EGROUP_BYTES,
            slice_bytes: format::DEFAULT_SLICE_BYTES,
            journal_bytes: 0,
            uuid: None,
        }
    }
}

/// How to open a formatted device.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Replay past a damaged journal block (its records are lost) instead of refusing to open.
    pub salvage: bool,
}

/// A failed block-store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The device failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The device cannot be formatted with this geometry.
    #[error("{device}: {source}")]
    Geometry {
        /// Device name.
        device: Arc<str>,
        /// Why.
        #[source]
        source: FormatError,
    },
    /// Neither superblock copy is valid: the device is not (or no longer) a Cairn device.
    #[error(
        "{device}: no valid superblock (copy A at offset 0: {a}; copy B at offset {b_offset}: {b})"
    )]
    NoSuperblock {
        /// Device name.
        device: Arc<str>,
        /// What is wrong with copy A.
        a: Box<FormatError>,
        /// Where copy B was looked for.
        b_offset: u64,
        /// What is wrong with copy B.
        b: Box<FormatError>,
    },
    /// Neither checkpoint slot is valid.
    #[error("{device}: no valid checkpoint (slot 0: {slot0}; slot 1: {slot1})")]
    NoCheckpoint {
        /// Device name.
        device: Arc<str>,
        /// What is wrong with slot 0.
        slot0: Box<FormatError>,
        /// What is wrong with slot 1.
        slot1: Box<FormatError>,
    },
    /// A journal block with acknowledged records is damaged.
    #[error(
        "{device}: journal block seq {seq} at offset {offset} is damaged ({source}) and {later_blocks} later journal blocks were written after it: its records are lost; run fsck (open with salvage to replay the rest)"
    )]
    JournalDamaged {
        /// Device name.
        device: Arc<str>,
        /// Sequence number of the damaged block.
        seq: u64,
        /// Device offset of the damaged block.
        offset: u64,
        /// What is wrong with it.
        source: Box<FormatError>,
        /// Valid blocks of later batches found after it.
        later_blocks: u64,
    },
    /// The device's geometry no longer matches the superblock.
    #[error(
        "{device}: device is {size} bytes with {block_size}-byte blocks, but was formatted as {formatted_size} bytes with {formatted_block_size}-byte blocks"
    )]
    GeometryChanged {
        /// Device name.
        device: Arc<str>,
        /// Current size.
        size: u64,
        /// Current block size.
        block_size: u32,
        /// Formatted size.
        formatted_size: u64,
        /// Formatted block size.
        formatted_block_size: u32,
    },
    /// No extent group with this id.
    #[error("{device}: extent group {egid} does not exist")]
    NoSuchEgroup {
        /// Device name.
        device: Arc<str>,
        /// Extent group id.
        egid: ExtentGroupId,
    },
    /// An extent group with this id exists already.
    #[error("{device}: extent group {egid} already exists")]
    EgroupExists {
        /// Device name.
        device: Arc<str>,
        /// Extent group id.
        egid: ExtentGroupId,
    },
    /// Every extent group slot is in use (or freed but not yet flushed).
    #[error(
        "{device}: no free extent group ({used} of {total} in use, {pending_free} freed but not yet flushed)"
    )]
    NoSpace {
        /// Device name.
        device: Arc<str>,
        /// Slots in use.
        used: u32,
        /// All slots.
        total: u32,
        /// Slots freed by records not yet durable.
        pending_free: u32,
    },
    /// The slice range is outside the extent group.
    #[error("{device}: extent group {egid}: slices {first}..{end} are outside 0..{slices}")]
    SliceRange {
        /// Device name.
        device: Arc<str>,
        /// Extent group id.
        egid: ExtentGroupId,
        /// First slice.
        first: u64,
        /// One past the last slice.
        end: u64,
        /// Slices per extent group.
        slices: u32,
    },
    /// The buffer is not a whole number of slices.
    #[error(
        "{device}: buffer of {len} bytes is not a non-zero multiple of the {slice_bytes}-byte slice"
    )]
    BufferSize {
        /// Device name.
        device: Arc<str>,
        /// Buffer length.
        len: usize,
        /// Slice size.
        slice_bytes: u32,
    },
    /// A slice's data does not match its crc32c.
    #[error(
        "{device}: checksum mismatch in extent group {egid} slice {slice} at device offset {offset}: metadata has crc32c {expected:#010x}, data has {actual:#010x}"
    )]
    ChecksumMismatch {
        /// Device name.
        device: Arc<str>,
        /// Extent group id.
        egid: ExtentGroupId,
        /// Slice index in the extent group.
        slice: u32,
        /// Device byte offset of the slice.
        offset: u64,
        /// crc32c recorded in metadata.
        expected: u32,
        /// crc32c of the bytes read.
        actual: u32,
    },
    /// An earlier metadata write failed; the store refuses I/O until reopened (which recovers).
    #[error(
        "{device}: an earlier journal or checkpoint write failed; the store is offline until reopened"
    )]
    Failed {
        /// Device name.
        device: Arc<str>,
    },
}

/// Capacity and usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// Tier recorded at format time.
    pub tier: Tier,
    /// Extent group size.
    pub egroup_bytes: u32,
    /// Slice size.
    pub slice_bytes: u32,
    /// Extent group slots on the device.
    pub egroups_total: u32,
    /// Slots holding an extent group.
    pub egroups_used: u32,
    /// Slots freed but not reusable until the next flush.
    pub egroups_pending_free: u32,
    /// Bytes of the data area (`egroups_total * egroup_bytes`).
    pub capacity_bytes: u64,
    /// Bytes in allocated extent groups.
    pub allocated_bytes: u64,
    /// Bytes in written slices.
    pub written_bytes: u64,
    /// Journal blocks in use since the last durable checkpoint.
    pub journal_blocks_used: u64,
    /// Journal blocks in the ring.
    pub journal_blocks_total: u64,
}

/// One extent group, as listed by [`BlockStore::egroups`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgroupInfo {
    /// Extent group id.
    pub egid: ExtentGroupId,
    /// Device byte offset of its first slice.
    pub offset: u64,
    /// Slices that hold data.
    pub written_slices: u32,
}

/// In-memory local metadata: the live table, changed at once by every operation.
#[derive(Clone, Debug)]
pub(crate) struct Table {
    pub(crate) slots: Vec<Option<EgroupMeta>>,
    pub(crate) by_egid: HashMap<ExtentGroupId, u32>,
}

/// What a replayed record could not be applied to (only after damage or a salvage).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplayAnomalies {
    /// Slice records for slots that hold no extent group.
    pub orphan_slice_records: u64,
    /// Free records whose slot held another extent group.
    pub mismatched_frees: u64,
}

impl Table {
    pub(crate) fn new(egroup_count: u32) -> Self {
        Self {
            slots: vec![None; egroup_count as usize],
            by_egid: HashMap::new(),
        }
    }

    pub(crate) fn apply(&mut self, rec: &Record, slices: u32, anomalies: &mut ReplayAnomalies) {
        match *rec {
            Record::Alloc { slot, egid } => {
                if let Some(old) = self.slots[slot as usize].take() {
                    self.by_egid.remove(&old.egid);
                }
                if let Some(prev) = self.by_egid.insert(egid, slot) {
                    self.slots[prev as usize] = None;
                }
                self.slots[slot as usize] = Some(EgroupMeta::new(egid, slices));
            }
            Record::Free { slot, egid } => match &self.slots[slot as usize] {
                Some(m) if m.egid == egid => {
                    self.slots[slot as usize] = None;
                    self.by_egid.remove(&egid);
                }
                _ => anomalies.mismatched_frees += 1,
            },
            Record::SliceWritten { slot, slice, crc } => match &mut self.slots[slot as usize] {
                Some(m) => m.set_written(slice, crc),
                None => anomalies.orphan_slice_records += 1,
            },
            Record::SlicesTrimmed { slot, first, count } => match &mut self.slots[slot as usize] {
                Some(m) => (first..first + count).for_each(|i| m.clear(i)),
                None => anomalies.orphan_slice_records += 1,
            },
        }
    }
}

struct State {
    table: Table,
    free: BTreeSet<u32>,
    /// Slots freed by a record not yet durable, with that record's number.
    pending_free: Vec<(u32, u64)>,
    /// Records not yet written to the journal.
    pending: Vec<Record>,
    /// Records appended in this session (the number of the next record).
    appended: u64,
}

impl State {
    fn push(&mut self, rec: Record) -> u64 {
        self.pending.push(rec);
        self.appended += 1;
        self.appended - 1
    }
}

/// Journal and checkpoint positions; changed only by the task holding the flush lock.
#[derive(Debug, Clone, Copy)]
struct JournalPos {
    epoch: u64,
    next_seq: u64,
    /// `journal_start_seq` of the newest durable checkpoint: blocks before it may be reused.
    durable_start: u64,
    checkpoint_seq: u64,
    /// Slot of the newest durable checkpoint (the next one goes to the other).
    checkpoint_slot: usize,
}

/// What recovery found, for [`BlockStore::open`] and for fsck.
#[derive(Debug)]
pub struct Recovery {
    /// The superblock in use (the valid copy with the highest generation).
    pub superblock: Superblock,
    /// Each copy's decode result.
    pub superblock_copies: [Result<Superblock, FormatError>; 2],
    /// Each checkpoint slot's header decode result (payload checked for the one used).
    pub checkpoints: [Result<CheckpointHeader, FormatError>; 2],
    /// The slot whose checkpoint was used.
    pub checkpoint_used: usize,
    /// Journal blocks replayed.
    pub replayed_blocks: u64,
    /// Journal records replayed.
    pub replayed_records: u64,
    /// How the journal ended.
    pub journal_end: JournalEnd,
    /// Records that did not fit the table.
    pub anomalies: ReplayAnomalies,
    pub(crate) table: Table,
    pub(crate) epoch: u64,
    pub(crate) next_seq: u64,
}

/// How journal replay stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalEnd {
    /// At a block of an earlier epoch, lap or format: the normal end.
    Clean,
    /// At a torn block of the last batch (a power cut during a flush that never returned); the
    /// batch's remaining blocks were discarded.
    TornTail {
        /// Sequence number of the torn block.
        seq: u64,
        /// Device offset.
        offset: u64,
        /// What was wrong with it.
        error: FormatError,
    },
    /// At a damaged block followed by later batches: acknowledged records were lost.
    Damaged {
        /// Sequence number of the damaged block.
        seq: u64,
        /// Device offset.
        offset: u64,
        /// What was wrong with it.
        error: FormatError,
        /// Valid blocks of later batches after it.
        later_blocks: u64,
        /// Whether replay continued past it (salvage).
        salvaged: bool,
    },
    /// The ring was full of valid blocks (replay stopped at its size).
    RingFull,
}

/// Extent groups of checksummed slices on one device, owned by one core.
pub struct BlockStore<D: BlockDevice> {
    dev: D,
    name: Arc<str>,
    sb: RefCell<Superblock>,
    layout: Layout,
    state: RefCell<State>,
    pos: Cell<JournalPos>,
    durable_records: Cell<u64>,
    flush_lock: async_lock::Mutex<()>,
    failed: Cell<bool>,
    checkpoint_threshold_blocks: u64,
}

fn random_uuid() -> u128 {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    u128::from_le_bytes(b)
}

async fn read_meta<D: BlockDevice>(dev: &D, offset: u64, len: u64) -> Result<DmaBuf, DeviceError> {
    let mut buf = DmaBuf::new(len as usize);
    dev.read(offset, &mut buf).await?;
    Ok(buf)
}

/// Reads and decodes both superblock copies; returns the one to use (highest valid generation).
pub(crate) async fn read_superblocks<D: BlockDevice>(
    dev: &D,
) -> Result<(Superblock, [Result<Superblock, FormatError>; 2]), StoreError> {
    let info = dev.info();
    let name = info.name.clone();
    let a = read_meta(dev, 0, SUPERBLOCK_BYTES).await?;
    let a = Superblock::decode(&a).and_then(|(sb, copy)| {
        if copy == 0 {
            Ok(sb)
        } else {
            Err(FormatError::BadField {
                what: "superblock",
                field: "copy",
                value: u64::from(copy),
            })
        }
    });
    // Copy B sits in the last 4 KiB of the formatted size, which copy A tells; without a valid
    // A, look at the end of the device (formatting uses the whole device).
    let b_offset = match &a {
        Ok(sb) => sb.layout.superblock_offset(1),
        Err(_) => {
            (info.size_bytes - info.size_bytes % META_BLOCK_BYTES).saturating_sub(SUPERBLOCK_BYTES)
        }
    };
    let b = if b_offset + SUPERBLOCK_BYTES <= info.size_bytes && b_offset > 0 {
        let raw = read_meta(dev, b_offset, SUPERBLOCK_BYTES).await?;
        Superblock::decode(&raw).and_then(|(sb, copy)| {
            if copy == 1 && sb.layout.superblock_offset(1) == b_offset {
                Ok(sb)
            } else {
                Err(FormatError::BadField {
                    what: "superblock",
                    field: "copy",
                    value: u64::from(copy),
                })
            }
        })
    } else {
        Err(FormatError::BadMagic { what: "superblock" })
    };
    let chosen = match (&a, &b) {
        (Ok(x), Ok(y)) => {
            if y.generation > x.generation {
                y.clone()
            } else {
                x.clone()
            }
        }
        (Ok(x), Err(_)) | (Err(_), Ok(x)) => x.clone(),
        (Err(ea), Err(eb)) => {
            return Err(StoreError::NoSuperblock {
                device: name,
                a: Box::new(ea.clone()),
                b_offset,
                b: Box::new(eb.clone()),
            });
        }
    };
    let l = &chosen.layout;
    if info.block_size != l.block_size || info.size_bytes < l.device_bytes {
        return Err(StoreError::GeometryChanged {
            device: name,
            size: info.size_bytes,
            block_size: info.block_size,
            formatted_size: l.device_bytes,
            formatted_block_size: l.block_size,
        });
    }
    Ok((chosen, [a, b]))
}

/// Full recovery: superblocks, checkpoints, journal replay. Reads only.
pub(crate) async fn recover<D: BlockDevice>(
    dev: &D,
    opts: OpenOptions,
) -> Result<Recovery, StoreError> {
    let name = dev.info().name.clone();
    let (sb, copies) = read_superblocks(dev).await?;
    let layout = sb.layout;
    let slices = layout.slices_per_egroup();

    // Checkpoints: try the newest valid header first; fall back if its payload is bad.
    let mut headers: Vec<Result<(CheckpointHeader, u64, u32), FormatError>> = Vec::new();
    for slot in 0..2 {
        let first = read_meta(dev, layout.checkpoint_offset[slot], META_BLOCK_BYTES).await?;
        headers.push(format::decode_checkpoint_header(&first, sb.uuid, &layout));
    }
    let mut order: Vec<usize> = (0..2).filter(|&s| headers[s].is_ok()).collect();
    order.sort_by_key(|&s| {
        std::cmp::Reverse(headers[s].as_ref().map(|h| h.0.checkpoint_seq).unwrap_or(0))
    });
    let mut chosen = None;
    for slot in order {
        let (h, payload, crc) = *headers[slot].as_ref().expect("valid header");
        let len = (format::CKPT_HEADER_BYTES as u64 + payload).next_multiple_of(META_BLOCK_BYTES);
        let buf = read_meta(dev, layout.checkpoint_offset[slot], len).await?;
        match format::decode_checkpoint_entries(&buf, &h, payload, crc, &layout) {
            Ok(entries) => {
                chosen = Some((slot, h, entries));
                break;
            }
            Err(e) => headers[slot] = Err(e),
        }
    }
    let checkpoints = [
        headers[0].clone().map(|h| h.0),
        headers[1].clone().map(|h| h.0),
    ];
    let Some((checkpoint_used, ckpt, entries)) = chosen else {
        return Err(StoreError::NoCheckpoint {
            device: name,
            slot0: Box::new(checkpoints[0].clone().unwrap_err()),
            slot1: Box::new(checkpoints[1].clone().unwrap_err()),
        });
    };

    let mut table = Table::new(layout.egroup_count);
    for (slot, meta) in entries {
        table.by_egid.insert(meta.egid, slot);
        table.slots[slot as usize] = Some(meta);
    }

    // Journal replay.
    let ring = layout.journal_blocks();
    let mut anomalies = ReplayAnomalies::default();
    let mut seq = ckpt.journal_start_seq;
    let mut replayed_blocks = 0;
    let mut replayed_records = 0;
    let journal_end;
    let valid_block = |buf: &[u8],
                       seq: u64|
     -> Result<Option<(JournalHeader, Vec<Record>)>, FormatError> {
        match format::decode_journal_header(buf, sb.uuid) {
            Ok(h) if h.epoch == ckpt.epoch && h.seq == seq => {
                format::decode_journal_records(buf, &h, &layout).map(|r| Some((h, r)))
            }
            // A block of an earlier epoch or lap, or of another format: not this journal.
            Ok(h) if h.epoch < ckpt.epoch || (h.epoch == ckpt.epoch && h.seq < seq) => Ok(None),
            Err(FormatError::BadMagic { .. }) | Err(FormatError::ForeignUuid { .. }) => Ok(None),
            // Newer than this checkpoint expects: the newest checkpoint was lost and the
            // journal after this older one was overwritten since.
            Ok(h) => Err(FormatError::NewerThanCheckpoint {
                seq: h.seq,
                epoch: h.epoch,
            }),
            Err(e) => Err(e),
        }
    };
    loop {
        if seq - ckpt.journal_start_seq >= ring {
            journal_end = JournalEnd::RingFull;
            break;
        }
        let offset = layout.journal_block_offset(seq);
        let buf = read_meta(dev, offset, META_BLOCK_BYTES).await?;
        match valid_block(&buf, seq) {
            Ok(Some((_, records))) => {
                for r in &records {
                    table.apply(r, slices, &mut anomalies);
                }
                replayed_blocks += 1;
                replayed_records += records.len() as u64;
                seq += 1;
            }
            Ok(None) => {
                journal_end = JournalEnd::Clean;
                break;
            }
            Err(error) => {
                // Torn tail or damage? Look for valid blocks of a later batch after it.
                let mut later_blocks = 0;
                let mut probe = seq + 1;
                while probe - ckpt.journal_start_seq < ring {
                    let b = read_meta(dev, layout.journal_block_offset(probe), META_BLOCK_BYTES)
                        .await?;
                    if let Ok(Some((h, _))) = valid_block(&b, probe)
                        && h.batch_first_seq > seq
                    {
                        later_blocks += 1;
                    }
                    probe += 1;
                }
                if matches!(error, FormatError::NewerThanCheckpoint { .. }) {
                    later_blocks = later_blocks.max(1);
                }
                if later_blocks == 0 {
                    journal_end = JournalEnd::TornTail { seq, offset, error };
                    break;
                }
                if !opts.salvage {
                    return Err(StoreError::JournalDamaged {
                        device: name,
                        seq,
                        offset,
                        source: Box::new(error),
                        later_blocks,
                    });
                }
                // Salvage: skip every unreadable block and replay the valid ones after it.
                let damaged_seq = seq;
                seq += 1;
                while seq - ckpt.journal_start_seq < ring {
                    let b =
                        read_meta(dev, layout.journal_block_offset(seq), META_BLOCK_BYTES).await?;
                    match valid_block(&b, seq) {
                        Ok(Some((_, records))) => {
                            for r in &records {
                                table.apply(r, slices, &mut anomalies);
                            }
                            replayed_blocks += 1;
                            replayed_records += records.len() as u64;
                        }
                        Ok(None) => break,
                        Err(_) => {}
                    }
                    seq += 1;
                }
                journal_end = JournalEnd::Damaged {
                    seq: damaged_seq,
                    offset,
                    error,
                    later_blocks,
                    salvaged: true,
                };
                break;
            }
        }
    }

    Ok(Recovery {
        superblock: sb,
        superblock_copies: copies,
        checkpoints,
        checkpoint_used,
        replayed_blocks,
        replayed_records,
        journal_end,
        anomalies,
        table,
        epoch: ckpt.epoch,
        next_seq: seq,
    })
}

impl<D: BlockDevice> BlockStore<D> {
    /// Formats `dev` (destroying what it holds) and opens it.
    pub async fn format(dev: D, opts: &FormatOptions) -> Result<Self, StoreError> {
        let info = dev.info().clone();
        let layout = Layout::compute(
            info.size_bytes,
            info.block_size,
            opts.egroup_bytes,
            opts.slice_bytes,
            opts.journal_bytes,
        )
        .map_err(|source| StoreError::Geometry {
            device: info.name.clone(),
            source,
        })?;
        let sb = Superblock {
            generation: 1,
            uuid: opts.uuid.unwrap_or_else(random_uuid),
            tier: opts.tier.unwrap_or(info.tier),
            layout,
        };
        // 1. Invalidate both superblocks, so a format cut short leaves no device that opens.
        let zero = DmaBuf::new(SUPERBLOCK_BYTES as usize);
        dev.write(0, &zero).await?;
        dev.write(layout.superblock_offset(1), &zero).await?;
        dev.flush().await?;
        // 2. Zero the reserved gap after superblock A (room for future structures).
        let gap = DmaBuf::new((format::JOURNAL_OFFSET - SUPERBLOCK_BYTES) as usize);
        dev.write(SUPERBLOCK_BYTES, &gap).await?;
        // 3. Two empty checkpoints (journal blocks of older formats carry another UUID).
        let mut buf = DmaBuf::new(META_BLOCK_BYTES as usize);
        for (slot, seq) in [(0usize, 1u64), (1, 0)] {
            let h = CheckpointHeader {
                checkpoint_seq: seq,
                epoch: seq,
                journal_start_seq: 0,
                entry_count: 0,
            };
            format::encode_checkpoint(
                sb.uuid,
                &h,
                layout.slices_per_egroup(),
                std::iter::empty(),
                &mut buf,
            );
            dev.write(layout.checkpoint_offset[slot], &buf).await?;
        }
        dev.flush().await?;
        // 4. The superblocks, A then B.
        let mut sbuf = DmaBuf::new(SUPERBLOCK_BYTES as usize);
        for copy in 0..2u32 {
            sb.encode(copy, &mut sbuf);
            dev.write(layout.superblock_offset(copy as usize), &sbuf)
                .await?;
            dev.flush().await?;
        }
        Self::open(dev).await
    }

    /// Opens a formatted device, recovering from a crash if needed; refuses a damaged journal.
    pub async fn open(dev: D) -> Result<Self, StoreError> {
        Self::open_with(dev, OpenOptions::default()).await
    }

    /// Opens with options (see [`OpenOptions`]).
    pub async fn open_with(dev: D, opts: OpenOptions) -> Result<Self, StoreError> {
        let rec = recover(&dev, opts).await?;
        let name = dev.info().name.clone();
        let mut sb = rec.superblock.clone();
        let layout = sb.layout;

        // Rewrite both superblock copies with a new generation (this also repairs a bad copy).
        sb.generation += 1;
        let mut sbuf = DmaBuf::new(SUPERBLOCK_BYTES as usize);
        for copy in 0..2u32 {
            sb.encode(copy, &mut sbuf);
            dev.write(layout.superblock_offset(copy as usize), &sbuf)
                .await?;
            dev.flush().await?;
        }

        let mut free = BTreeSet::new();
        for (slot, m) in rec.table.slots.iter().enumerate() {
            if m.is_none() {
                free.insert(slot as u32);
            }
        }
        let prev_ckpt_seq = rec.checkpoints[rec.checkpoint_used]
            .as_ref()
            .map(|h| h.checkpoint_seq)
            .expect("checkpoint used is valid");
        let store = BlockStore {
            name,
            sb: RefCell::new(sb),
            layout,
            state: RefCell::new(State {
                table: rec.table,
                free,
                pending_free: Vec::new(),
                pending: Vec::new(),
                appended: 0,
            }),
            pos: Cell::new(JournalPos {
                epoch: rec.epoch,
                next_seq: rec.next_seq,
                durable_start: rec.next_seq,
                checkpoint_seq: prev_ckpt_seq,
                checkpoint_slot: rec.checkpoint_used,
            }),
            durable_records: Cell::new(0),
            flush_lock: async_lock::Mutex::new(()),
            failed: Cell::new(false),
            checkpoint_threshold_blocks: layout.journal_blocks() / 2,
            dev,
        };
        // A new epoch, sealed by a checkpoint, before any journal block of this session: stale
        // blocks (of the torn tail, of earlier laps) can never replay after this.
        let mut p = store.pos.get();
        p.epoch += 1;
        store.pos.set(p);
        let snapshot = store.state.borrow().table.clone();
        store.write_checkpoint(&snapshot).await?;
        Ok(store)
    }

    /// Flushes and writes a checkpoint without giving up the store (clean shutdown while other
    /// owners still hold it): the next open replays nothing written before this call.
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        self.check_failed()?;
        let _guard = self.flush_lock.lock().await;
        self.commit(true)
            .await
            .inspect_err(|_| self.failed.set(true))
    }

    /// Flushes and writes a checkpoint, so the next open replays nothing.
    pub async fn close(self) -> Result<D, StoreError> {
        self.check_failed()?;
        {
            let _guard = self.flush_lock.lock().await;
            self.commit(true)
                .await
                .inspect_err(|_| self.failed.set(true))?;
        }
        Ok(self.dev)
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The superblock in use.
    pub fn superblock(&self) -> Superblock {
        self.sb.borrow().clone()
    }

    /// Where everything is.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn check_failed(&self) -> Result<(), StoreError> {
        if self.failed.get() {
            return Err(StoreError::Failed {
                device: self.name.clone(),
            });
        }
        Ok(())
    }

    /// Allocates extent group `egid` in a free slot (lowest first).
    pub fn allocate(&self, egid: ExtentGroupId) -> Result<(), StoreError> {
        self.check_failed()?;
        let mut st = self.state.borrow_mut();
        if st.table.by_egid.contains_key(&egid) {
            return Err(StoreError::EgroupExists {
                device: self.name.clone(),
                egid,
            });
        }
        let Some(slot) = st.free.pop_first() else {
            return Err(StoreError::NoSpace {
                device: self.name.clone(),
                used: st.table.by_egid.len() as u32,
                total: self.layout.egroup_count,
                pending_free: st.pending_free.len() as u32,
            });
        };
        st.table.slots[slot as usize] =
            Some(EgroupMeta::new(egid, self.layout.slices_per_egroup()));
        st.table.by_egid.insert(egid, slot);
        st.push(Record::Alloc { slot, egid });
        Ok(())
    }

    /// Frees extent group `egid`; its slot is reused only after the next flush.
    pub fn free(&self, egid: ExtentGroupId) -> Result<(), StoreError> {
        self.check_failed()?;
        let mut st = self.state.borrow_mut();
        let Some(slot) = st.table.by_egid.remove(&egid) else {
            return Err(StoreError::NoSuchEgroup {
                device: self.name.clone(),
                egid,
            });
        };
        st.table.slots[slot as usize] = None;
        let n = st.push(Record::Free { slot, egid });
        st.pending_free.push((slot, n));
        Ok(())
    }

    fn locate(
        &self,
        st: &State,
        egid: ExtentGroupId,
        first: u32,
        len: usize,
    ) -> Result<(u32, u32), StoreError> {
        let sbytes = self.layout.slice_bytes as usize;
        if len == 0 || !len.is_multiple_of(sbytes) {
            return Err(StoreError::BufferSize {
                device: self.name.clone(),
                len,
                slice_bytes: self.layout.slice_bytes,
            });
        }
        let Some(&slot) = st.table.by_egid.get(&egid) else {
            return Err(StoreError::NoSuchEgroup {
                device: self.name.clone(),
                egid,
            });
        };
        let count = len / sbytes;
        let slices = self.layout.slices_per_egroup();
        if u64::from(first) + count as u64 > u64::from(slices) {
            return Err(StoreError::SliceRange {
                device: self.name.clone(),
                egid,
                first: u64::from(first),
                end: u64::from(first) + count as u64,
                slices,
            });
        }
        Ok((slot, count as u32))
    }

    fn slice_offset(&self, slot: u32, slice: u32) -> u64 {
        self.layout.slot_offset(slot) + u64::from(slice) * u64::from(self.layout.slice_bytes)
    }

    /// Writes whole slices `first..` of extent group `egid` from `buf` (a multiple of the slice
    /// size), recording each slice's crc32c. Durable after the next [`flush`](Self::flush) (at
    /// once on a device with cheap FUA writes, but not recorded as written until that flush).
    pub async fn write_slices(
        &self,
        egid: ExtentGroupId,
        first: u32,
        buf: &DmaBuf,
    ) -> Result<(), StoreError> {
        self.check_failed()?;
        let (slot, count) = self.locate(&self.state.borrow(), egid, first, buf.len())?;
        let offset = self.slice_offset(slot, first);
        // Durable at once where that is as cheap as not: then no commit has to flush for it.
        self.dev_write(offset, buf, self.dev.info().caps.fua)
            .await?;
        let sbytes = self.layout.slice_bytes as usize;
        let commit_now = {
            let mut st = self.state.borrow_mut();
            // The extent group may have been freed while the data was in flight.
            match &st.table.slots[slot as usize] {
                Some(m) if m.egid == egid => {}
                _ => {
                    return Err(StoreError::NoSuchEgroup {
                        device: self.name.clone(),
                        egid,
                    });
                }
            }
            for i in 0..count {
                let crc = crc32c::crc32c(&buf[i as usize * sbytes..(i as usize + 1) * sbytes]);
                let slice = first + i;
                st.table.slots[slot as usize]
                    .as_mut()
                    .expect("checked above")
                    .set_written(slice, crc);
                st.push(Record::SliceWritten { slot, slice, crc });
            }
            st.pending.len() >= AUTO_COMMIT_RECORDS && self.flush_lock.try_lock().is_some()
        };
        if commit_now {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes slices of an extent group and makes them durable: `write_slices` then `flush`,
    /// but with the data write and the journal write of the commit in flight together before
    /// the one device flush (neither is durable before that flush, so their order never
    /// mattered), which saves one device round trip per commit. On a device with cheap FUA
    /// writes ([`Capabilities::fua`](crate::device::Capabilities::fua)), and no plain write
    /// awaiting a flush, both are FUA writes and there is no flush: one round trip.
    ///
    /// Only for slices that hold nothing acknowledged, such as an append-only log: a crash
    /// before the commit completes may leave them recorded as written with data that fails its
    /// checksum (read as a typed checksum error, as a torn write is).
    pub async fn write_slices_durable(
        &self,
        egid: ExtentGroupId,
        first: u32,
        buf: &DmaBuf,
    ) -> Result<(), StoreError> {
        self.check_failed()?;
        let _guard = self.flush_lock.lock().await;
        self.check_failed()?;
        // Under the flush lock and with no await until the records are in: the extent group
        // cannot be freed (and its slot reused) between this check and the write.
        let (slot, count) = self.locate(&self.state.borrow(), egid, first, buf.len())?;
        let offset = self.slice_offset(slot, first);
        let sbytes = self.layout.slice_bytes as usize;
        {
            let mut st = self.state.borrow_mut();
            for i in 0..count {
                let crc = crc32c::crc32c(&buf[i as usize * sbytes..(i as usize + 1) * sbytes]);
                let slice = first + i;
                st.table.slots[slot as usize]
                    .as_mut()
                    .expect("located above")
                    .set_written(slice, crc);
                st.push(Record::SliceWritten { slot, slice, crc });
            }
        }
        self.commit_with(false, Some((offset, buf)))
            .await
            .inspect_err(|_| self.failed.set(true))
    }

    /// Reads whole slices `first..` of extent group `egid` into `buf`, verifying every written
    /// slice's crc32c; unwritten slices read as zeros.
    pub async fn read_slices(
        &self,
        egid: ExtentGroupId,
        first: u32,
        buf: &mut DmaBuf,
    ) -> Result<(), StoreError> {
        self.check_failed()?;
        let (slot, count, any_written) = {
            let st = self.state.borrow();
            let (slot, count) = self.locate(&st, egid, first, buf.len())?;
            let m = st.table.slots[slot as usize].as_ref().expect("located");
            (slot, count, (first..first + count).any(|i| m.is_written(i)))
        };
        if !any_written {
            buf.fill(0);
            return Ok(());
        }
        self.dev.read(self.slice_offset(slot, first), buf).await?;
        let sbytes = self.layout.slice_bytes as usize;
        let st = self.state.borrow();
        let m = match &st.table.slots[slot as usize] {
            Some(m) if m.egid == egid => m,
            _ => {
                return Err(StoreError::NoSuchEgroup {
                    device: self.name.clone(),
                    egid,
                });
            }
        };
        for i in 0..count {
            let slice = first + i;
            let data = &mut buf[i as usize * sbytes..(i as usize + 1) * sbytes];
            if !m.is_written(slice) {
                data.fill(0);
                continue;
            }
            let actual = crc32c::crc32c(data);
            let expected = m.crcs[slice as usize];
            if actual != expected {
                return Err(StoreError::ChecksumMismatch {
                    device: self.name.clone(),
                    egid,
                    slice,
                    offset: self.slice_offset(slot, slice),
                    expected,
                    actual,
                });
            }
        }
        Ok(())
    }

    /// Marks slices `first..first + count` of `egid` unwritten (they read as zeros) and unmaps
    /// them on devices that support it.
    pub async fn trim_slices(
        &self,
        egid: ExtentGroupId,
        first: u32,
        count: u32,
    ) -> Result<(), StoreError> {
        self.check_failed()?;
        let len = count as usize * self.layout.slice_bytes as usize;
        let slot = {
            let mut st = self.state.borrow_mut();
            let (slot, _) = self.locate(&st, egid, first, len)?;
            let m = st.table.slots[slot as usize].as_mut().expect("located");
            (first..first + count).for_each(|i| m.clear(i));
            st.push(Record::SlicesTrimmed { slot, first, count });
            slot
        };
        if self.dev.info().caps.unmap {
            match self
                .dev
                .unmap(self.slice_offset(slot, first), len as u64)
                .await
            {
                Ok(()) | Err(DeviceError::Unsupported { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Makes every change that returned before this call durable (group commit: concurrent
    /// callers share one journal write and one device flush).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.check_failed()?;
        let target = self.state.borrow().appended;
        let _guard = self.flush_lock.lock().await;
        self.check_failed()?;
        if self.durable_records.get() >= target {
            // Still flush the device: data writes without metadata changes (rewrites with the
            // same content) must be durable too.
            self.dev.flush().await?;
            return Ok(());
        }
        self.commit(false)
            .await
            .inspect_err(|_| self.failed.set(true))
    }

    /// Writes pending records (or a checkpoint that contains them) and flushes. Caller holds
    /// the flush lock.
    async fn commit(&self, force_checkpoint: bool) -> Result<(), StoreError> {
        self.commit_with(force_checkpoint, None).await
    }

    /// [`Self::commit`], writing `data` (offset, bytes) alongside the journal records.
    async fn commit_with(
        &self,
        force_checkpoint: bool,
        data: Option<(u64, &DmaBuf)>,
    ) -> Result<(), StoreError> {
        let ring = self.layout.journal_blocks();
        let (records, upto, snapshot) = {
            let mut st = self.state.borrow_mut();
            let records = std::mem::take(&mut st.pending);
            let upto = st.appended;
            let p = self.pos.get();
            let blocks = records.len().div_ceil(RECORDS_PER_BLOCK) as u64;
            let used_after = p.next_seq + blocks - p.durable_start;
            let fits = used_after <= ring;
            let want = force_checkpoint || !fits || used_after > self.checkpoint_threshold_blocks;
            // The snapshot is taken in the same instant the records leave the pending list, so
            // it holds exactly their effects: a checkpoint of it may start after them.
            let snapshot = want.then(|| st.table.clone());
            (if fits { records } else { Vec::new() }, upto, snapshot)
        };
        // Where the device has cheap FUA writes (and the store's data writes use them, so none
        // awaits a flush), the commit's own writes carry FUA and no flush follows: one device
        // round trip, not two.
        let fua = self.dev.info().caps.fua;
        let journal = async {
            if records.is_empty() {
                Ok(())
            } else {
                self.write_journal_batch(&records, fua).await
            }
        };
        let data = async {
            match data {
                Some((offset, buf)) => self
                    .dev_write(offset, buf, fua)
                    .await
                    .map_err(StoreError::from),
                None => Ok(()),
            }
        };
        let (journaled, written) = futures_lite::future::zip(journal, data).await;
        journaled?;
        written?;
        if !fua {
            self.dev.flush().await?;
        }
        if let Some(table) = snapshot {
            self.write_checkpoint(&table).await?;
        }
        self.durable_records.set(upto);
        let mut st = self.state.borrow_mut();
        let State {
            pending_free, free, ..
        } = &mut *st;
        pending_free.retain(|&(slot, n)| {
            if n < upto {
                free.insert(slot);
                false
            } else {
                true
            }
        });
        Ok(())
    }

    /// A device write, with FUA or without.
    async fn dev_write(&self, offset: u64, buf: &DmaBuf, fua: bool) -> Result<(), DeviceError> {
        if fua {
            self.dev.write_fua(offset, buf).await
        } else {
            self.dev.write(offset, buf).await
        }
    }

    async fn write_journal_batch(&self, records: &[Record], fua: bool) -> Result<(), StoreError> {
        let mut p = self.pos.get();
        let blocks = records.len().div_ceil(RECORDS_PER_BLOCK);
        let bsz = META_BLOCK_BYTES as usize;
        let mut buf = DmaBuf::new(blocks * bsz);
        for (i, chunk) in records.chunks(RECORDS_PER_BLOCK).enumerate() {
            let h = JournalHeader {
                epoch: p.epoch,
                seq: p.next_seq + i as u64,
                batch_first_seq: p.next_seq,
                batch_blocks: blocks as u32,
                record_count: chunk.len() as u16,
            };
            format::encode_journal_block(
                self.sb.borrow().uuid,
                &h,
                chunk,
                &mut buf[i * bsz..(i + 1) * bsz],
            );
        }
        // The ring may wrap inside the batch: write the part up to its end, then the rest.
        let ring = self.layout.journal_blocks();
        let first_pos = p.next_seq % ring;
        let until_end = ((ring - first_pos) as usize).min(blocks);
        if until_end == blocks {
            self.dev_write(self.layout.journal_block_offset(p.next_seq), &buf, fua)
                .await?;
        } else {
            let mut head = DmaBuf::new(until_end * bsz);
            head.copy_from_slice(&buf[..until_end * bsz]);
            let mut tail = DmaBuf::new((blocks - until_end) * bsz);
            tail.copy_from_slice(&buf[until_end * bsz..]);
            self.dev_write(self.layout.journal_block_offset(p.next_seq), &head, fua)
                .await?;
            self.dev_write(
                self.layout
                    .journal_block_offset(p.next_seq + until_end as u64),
                &tail,
                fua,
            )
            .await?;
        }
        p.next_seq += blocks as u64;
        self.pos.set(p);
        Ok(())
    }

    /// Writes `table` as a checkpoint into the older slot and flushes; the journal before
    /// `next_seq` becomes reusable.
    async fn write_checkpoint(&self, table: &Table) -> Result<(), StoreError> {
        let mut p = self.pos.get();
        let slot = 1 - p.checkpoint_slot;
        let entries: Vec<(u32, &EgroupMeta)> = table
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, m)| m.as_ref().map(|m| (i as u32, m)))
            .collect();
        let header = CheckpointHeader {
            checkpoint_seq: p.checkpoint_seq + 1,
            epoch: p.epoch,
            journal_start_seq: p.next_seq,
            entry_count: entries.len() as u32,
        };
        let need = (format::CKPT_HEADER_BYTES
            + entries.len() * self.layout.checkpoint_entry_bytes())
        .next_multiple_of(META_BLOCK_BYTES as usize);
        let mut buf = DmaBuf::new(need);
        let used = format::encode_checkpoint(
            self.sb.borrow().uuid,
            &header,
            self.layout.slices_per_egroup(),
            entries.into_iter(),
            &mut buf,
        );
        assert_eq!(used, need, "checkpoint size");
        assert!(
            used as u64 <= self.layout.checkpoint_bytes,
            "checkpoint exceeds its slot"
        );
        self.dev
            .write(self.layout.checkpoint_offset[slot], &buf)
            .await?;
        self.dev.flush().await?;
        p.checkpoint_seq = header.checkpoint_seq;
        p.checkpoint_slot = slot;
        p.durable_start = header.journal_start_seq;
        self.pos.set(p);
        Ok(())
    }

    /// The recorded crc32c of each slice of extent group `egid` (`None`: never written, reads
    /// as zeros), from metadata alone; `None` if there is no such extent group.
    pub fn slice_crcs(&self, egid: ExtentGroupId) -> Option<Vec<Option<u32>>> {
        let st = self.state.borrow();
        let &slot = st.table.by_egid.get(&egid)?;
        let m = st.table.slots[slot as usize].as_ref()?;
        Some(
            (0..m.crcs.len() as u32)
                .map(|i| m.is_written(i).then(|| m.crcs[i as usize]))
                .collect(),
        )
    }

    /// Whether extent group `egid` exists.
    pub fn contains(&self, egid: ExtentGroupId) -> bool {
        self.state.borrow().table.by_egid.contains_key(&egid)
    }

    /// Every extent group, in slot order.
    pub fn egroups(&self) -> Vec<EgroupInfo> {
        let st = self.state.borrow();
        st.table
            .slots
            .iter()
            .enumerate()
            .filter_map(|(slot, m)| {
                m.as_ref().map(|m| EgroupInfo {
                    egid: m.egid,
                    offset: self.layout.slot_offset(slot as u32),
                    written_slices: m.written_count(),
                })
            })
            .collect()
    }

    /// Whether slice `slice` of `egid` holds data (`None`: no such extent group).
    pub fn is_slice_written(&self, egid: ExtentGroupId, slice: u32) -> Option<bool> {
        let st = self.state.borrow();
        let slot = *st.table.by_egid.get(&egid)?;
        let m = st.table.slots[slot as usize].as_ref()?;
        (slice < self.layout.slices_per_egroup()).then(|| m.is_written(slice))
    }

    /// Capacity and usage.
    pub fn stats(&self) -> StoreStats {
        let st = self.state.borrow();
        let p = self.pos.get();
        let used = st.table.by_egid.len() as u32;
        let written: u64 = st
            .table
            .slots
            .iter()
            .flatten()
            .map(|m| u64::from(m.written_count()))
            .sum();
        StoreStats {
            tier: self.sb.borrow().tier,
            egroup_bytes: self.layout.egroup_bytes,
            slice_bytes: self.layout.slice_bytes,
            egroups_total: self.layout.egroup_count,
            egroups_used: used,
            egroups_pending_free: st.pending_free.len() as u32,
            capacity_bytes: u64::from(self.layout.egroup_count)
                * u64::from(self.layout.egroup_bytes),
            allocated_bytes: u64::from(used) * u64::from(self.layout.egroup_bytes),
            written_bytes: written * u64::from(self.layout.slice_bytes),
            journal_blocks_used: p.next_seq - p.durable_start,
            journal_blocks_total: self.layout.journal_blocks(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemDevice;
    use pollster::block_on;

    fn small_opts() -> FormatOptions {
        FormatOptions {
            egroup_bytes: 256 << 10,
            slice_bytes: 4096,
            journal_bytes: 64 << 10,
            ..Default::default()
        }
    }

    fn pattern(len: usize, seed: u8) -> DmaBuf {
        let mut b = DmaBuf::new(len);
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
        b
    }

    #[test]
    fn write_flush_reopen_read() {
        block_on(async {
            let dev = MemDevice::new("m0", 32 << 20, 4096);
            let store = BlockStore::format(dev, &small_opts()).await.unwrap();
            store.allocate(7).unwrap();
            store.write_slices(7, 2, &pattern(8192, 1)).await.unwrap();
            store.flush().await.unwrap();
            // Crash: drop without close; reopen from the same media.
            let img = store.device().image();
            drop(store);
            let store = BlockStore::open(MemDevice::from_image("m0", img, 32 << 20, 4096))
                .await
                .unwrap();
            let mut back = DmaBuf::new(16384);
            store.read_slices(7, 1, &mut back).await.unwrap();
            assert!(back[..4096].iter().all(|&b| b == 0));
            assert_eq!(&back[4096..12288], &pattern(8192, 1)[..]);
            assert!(back[12288..].iter().all(|&b| b == 0));
            assert_eq!(store.stats().written_bytes, 8192);
        });
    }

    #[test]
    fn checksum_mismatch_names_device_egroup_and_offset() {
        block_on(async {
            let dev = MemDevice::new("m1", 32 << 20, 4096);
            let store = BlockStore::format(dev, &small_opts()).await.unwrap();
            store.allocate(9).unwrap();
            store.write_slices(9, 0, &pattern(4096, 2)).await.unwrap();
            let off = store.egroups()[0].offset;
            store.device().poke(off + 100, &[0xff]);
            let mut back = DmaBuf::new(4096);
            let err = store.read_slices(9, 0, &mut back).await.unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(
                    err,
                    StoreError::ChecksumMismatch {
                        egid: 9,
                        slice: 0,
                        ..
                    }
                ),
                "{msg}"
            );
            assert!(
                msg.contains("m1") && msg.contains(&off.to_string()),
                "{msg}"
            );
        });
    }

    #[test]
    fn journal_wraps_and_checkpoints() {
        block_on(async {
            let dev = MemDevice::new("m2", 32 << 20, 4096);
            let store = BlockStore::format(dev, &small_opts()).await.unwrap();
            store.allocate(1).unwrap();
            // 16-block journal: many flushes force checkpoints and laps of the ring.
            for round in 0..200u32 {
                store
                    .write_slices(1, round % 64, &pattern(4096, round as u8))
                    .await
                    .unwrap();
                store.flush().await.unwrap();
            }
            let img = store.device().image();
            drop(store);
            let store = BlockStore::open(MemDevice::from_image("m2", img, 32 << 20, 4096))
                .await
                .unwrap();
            for slice in 0..64u32 {
                let last = (0..200u32).filter(|r| r % 64 == slice).max().unwrap();
                let mut back = DmaBuf::new(4096);
                store.read_slices(1, slice, &mut back).await.unwrap();
                assert_eq!(&back[..], &pattern(4096, last as u8)[..], "slice {slice}");
            }
        });
    }

    #[test]
    fn freed_slot_not_reused_before_flush() {
        block_on(async {
            let dev = MemDevice::new("m3", 4 << 20, 4096);
            let store = BlockStore::format(dev, &small_opts()).await.unwrap();
            let total = store.stats().egroups_total;
            for e in 0..u64::from(total) {
                store.allocate(e).unwrap();
            }
            store.free(0).unwrap();
            assert!(matches!(
                store.allocate(100),
                Err(StoreError::NoSpace {
                    pending_free: 1,
                    ..
                })
            ));
            store.flush().await.unwrap();
            store.allocate(100).unwrap();
            assert!(matches!(
                store.allocate(1),
                Err(StoreError::EgroupExists { egid: 1, .. })
            ));
        });
    }

    #[test]
    fn bad_requests_get_precise_errors() {
        block_on(async {
            let dev = MemDevice::new("m4", 32 << 20, 4096);
            let store = BlockStore::format(dev, &small_opts()).await.unwrap();
            store.allocate(1).unwrap();
            let e = store
                .write_slices(1, 63, &pattern(8192, 0))
                .await
                .unwrap_err();
            assert!(
                matches!(
                    e,
                    StoreError::SliceRange {
                        first: 63,
                        end: 65,
                        ..
                    }
                ),
                "{e}"
            );
            let e = store
                .write_slices(2, 0, &pattern(4096, 0))
                .await
                .unwrap_err();
            assert!(matches!(e, StoreError::NoSuchEgroup { egid: 2, .. }), "{e}");
            let e = store.free(2).unwrap_err();
            assert!(matches!(e, StoreError::NoSuchEgroup { egid: 2, .. }), "{e}");
        });
    }

    #[test]
    fn trim_reads_zero_and_survives_reopen() {
        block_on(async {
            let dev = MemDevice::new("m5", 32 << 20, 512);
            let store = BlockStore::format(dev, &small_opts()).await.unwrap();
            store.allocate(3).unwrap();
            store
                .write_slices(3, 0, &pattern(4 * 4096, 5))
                .await
                .unwrap();
            store.trim_slices(3, 1, 2).await.unwrap();
            store.flush().await.unwrap();
            let img = store.device().image();
            drop(store);
            let store = BlockStore::open(MemDevice::from_image("m5", img, 32 << 20, 512))
                .await
                .unwrap();
            assert_eq!(store.is_slice_written(3, 0), Some(true));
            assert_eq!(store.is_slice_written(3, 1), Some(false));
            let mut back = DmaBuf::new(4 * 4096);
            store.read_slices(3, 0, &mut back).await.unwrap();
            assert!(back[4096..3 * 4096].iter().all(|&b| b == 0));
            assert_eq!(&back[3 * 4096..], &pattern(4 * 4096, 5)[3 * 4096..]);
        });
    }
}

#[cfg(test)]
mod stale_journal_tests {
    use super::*;
    use crate::mem::MemDevice;
    use pollster::block_on;
    use std::rc::Rc;

    /// A batch of two journal blocks whose first block is torn and second durable: the second
    /// must never replay, not even after the next session wrote a block at the torn position.
    #[test]
    fn stale_blocks_of_a_torn_batch_never_replay() {
        block_on(async {
            let opts = FormatOptions {
                egroup_bytes: 256 << 10,
                slice_bytes: 4096,
                journal_bytes: 1 << 20,
                ..Default::default()
            };
            let dev = Rc::new(MemDevice::new("stale", 64 << 20, 4096));
            let store = BlockStore::format(dev.clone(), &opts).await.unwrap();
            // More than one block of records in one batch: allocations plus slice writes.
            let buf = DmaBuf::new(64 * 4096);
            for egid in 0..8 {
                store.allocate(egid).unwrap();
                store.write_slices(egid, 0, &buf).await.unwrap();
            }
            let first = store.pos.get().next_seq;
            store.flush().await.unwrap();
            assert!(
                store.pos.get().next_seq >= first + 2,
                "batch spans two blocks"
            );
            drop(store);
            // Tear the batch's first block; its later blocks stay valid.
            let l = Layout::compute(64 << 20, 4096, 256 << 10, 4096, 1 << 20).unwrap();
            dev.poke(l.journal_block_offset(first) + 100, &[0xAA; 16]);
            let store = BlockStore::open(dev.clone()).await.unwrap();
            assert!(
                store.egroups().is_empty(),
                "the torn batch is discarded whole"
            );
            // The next session writes exactly one block where the torn one was, then crashes.
            store.allocate(100).unwrap();
            store.flush().await.unwrap();
            assert_eq!(store.pos.get().next_seq, first + 1);
            drop(store);
            let store = BlockStore::open(dev.clone()).await.unwrap();
            let ids: Vec<u64> = store.egroups().iter().map(|e| e.egid).collect();
            assert_eq!(
                ids,
                vec![100],
                "stale blocks of the earlier session replayed"
            );
        });
    }
}
