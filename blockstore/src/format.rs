//! The on-device format: encoding and decoding of every structure, with no I/O.
//!
//! ```text
//! Device layout (byte offsets; every region is 4 KiB aligned, the data area 1 MiB aligned)
//!
//! 0            4 KiB              64 KiB                 +J              +C          +C
//! +------------+------ ... -------+----------- ... ------+----- ... -----+---- ... ---+
//! | superblock | reserved (zero)  | journal ring (J)     | checkpoint 0  | checkpoint 1|
//! | copy A     |                  | 4 KiB blocks         | (C bytes)     | (C bytes)   |
//! +------------+------ ... -------+----------- ... ------+----- ... -----+---- ... ---+
//!
//! data_offset (1 MiB aligned)                                        device_bytes - 4 KiB
//! +-------------------+-------------------+-- ... --+-------------------+---------+----------+
//! | extent group slot | extent group slot |         | extent group slot | (unused)| superblock|
//! | 0 (egroup_bytes)  | 1                 |         | egroup_count - 1  |         | copy B    |
//! +-------------------+-------------------+-- ... --+-------------------+---------+----------+
//!   each slot: egroup_bytes / slice_bytes slices, one crc32c per slice kept in local metadata
//! ```
//!
//! Local metadata (which slot holds which extent group, which slices are written and their
//! crc32c) lives in a checkpoint plus the journal records written after it. Every structure
//! carries a magic, a version, the format's UUID (so blocks left by an earlier format never
//! match) and a crc32c. `FORMAT.md` next to this crate draws each structure byte by byte.

use crate::device::Tier;

/// On-media format version written by this code.
pub const FORMAT_VERSION: u32 = 1;
/// Size of each superblock copy.
pub const SUPERBLOCK_BYTES: u64 = 4096;
/// Journal blocks and checkpoint slots are made of 4 KiB metadata blocks.
pub const META_BLOCK_BYTES: u64 = 4096;
/// Where the journal ring starts (the gap after superblock A is reserved, zeroed).
pub const JOURNAL_OFFSET: u64 = 64 * 1024;
/// The data area starts on this boundary.
pub const DATA_ALIGN_BYTES: u64 = 1 << 20;
/// Default extent group size (seed: "extent groups" of 4 MiB hold 1 MiB extents).
pub const DEFAULT_EGROUP_BYTES: u32 = 4 << 20;
/// Default slice size (seed: extent groups are made of 32 KiB slices, each checksummed).
pub const DEFAULT_SLICE_BYTES: u32 = 32 << 10;
/// Smallest journal ring.
pub const MIN_JOURNAL_BYTES: u64 = 1 << 20;
/// Largest journal ring chosen by default.
pub const MAX_DEFAULT_JOURNAL_BYTES: u64 = 256 << 20;

const SB_MAGIC: [u8; 8] = *b"CAIRNBS\0";
const CKPT_MAGIC: [u8; 8] = *b"CRNCKPT\0";
const JOURNAL_MAGIC: [u8; 4] = *b"CRNJ";

/// Offset of the crc32c in a superblock (it covers every byte before it).
pub const SB_CRC_OFFSET: usize = 4092;
/// Size of a checkpoint header.
pub const CKPT_HEADER_BYTES: usize = 80;
/// Size of a journal block header.
pub const JOURNAL_HEADER_BYTES: usize = 64;
/// Size of one journal record.
pub const RECORD_BYTES: usize = 13;
/// Records that fit in one journal block.
pub const RECORDS_PER_BLOCK: usize =
    (META_BLOCK_BYTES as usize - JOURNAL_HEADER_BYTES) / RECORD_BYTES;

const _: () = assert!(JOURNAL_OFFSET >= SUPERBLOCK_BYTES);
const _: () = assert!(DEFAULT_EGROUP_BYTES.is_multiple_of(DEFAULT_SLICE_BYTES));
const _: () = assert!(RECORDS_PER_BLOCK >= 64);
const _: () = assert!(CKPT_HEADER_BYTES as u64 <= META_BLOCK_BYTES);

/// A structure failed to decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Not this structure at all.
    #[error("bad magic (not a Cairn {what})")]
    BadMagic {
        /// Which structure.
        what: &'static str,
    },
    /// A version this code does not read.
    #[error("{what} version {found} is not supported (this build reads version {FORMAT_VERSION})")]
    BadVersion {
        /// Which structure.
        what: &'static str,
        /// Version found.
        found: u32,
    },
    /// The crc32c does not match the contents.
    #[error("{what} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum {
        /// Which structure.
        what: &'static str,
        /// Checksum stored on media.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// Belongs to another format of the device.
    #[error("{what} belongs to another format (uuid {found:032x}, expected {expected:032x})")]
    ForeignUuid {
        /// Which structure.
        what: &'static str,
        /// UUID found.
        found: u128,
        /// UUID expected.
        expected: u128,
    },
    /// A journal block newer than the checkpoint in use expects (that checkpoint is not the
    /// newest one written: the newest was lost, and journal it relied on was overwritten).
    #[error(
        "journal block seq {seq} of epoch {epoch} is newer than the checkpoint in use expects: a newer checkpoint was lost"
    )]
    NewerThanCheckpoint {
        /// Sequence number found.
        seq: u64,
        /// Epoch found.
        epoch: u64,
    },
    /// A field has an impossible value.
    #[error("{what}: field {field} has an invalid value {value}")]
    BadField {
        /// Which structure.
        what: &'static str,
        /// Field name.
        field: &'static str,
        /// Value found.
        value: u64,
    },
    /// The requested geometry cannot be laid out.
    #[error("cannot lay out the device: {reason}")]
    Geometry {
        /// Why.
        reason: String,
    },
}

fn rd_u16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes"))
}
fn rd_u32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn rd_u64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}
fn rd_u128(b: &[u8], o: usize) -> u128 {
    u128::from_le_bytes(b[o..o + 16].try_into().expect("16 bytes"))
}
fn wr(b: &mut [u8], o: usize, v: &[u8]) {
    b[o..o + v.len()].copy_from_slice(v);
}

/// Where everything is on a formatted device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Formatted size (superblock B sits in its last 4 KiB).
    pub device_bytes: u64,
    /// Device logical block size at format time.
    pub block_size: u32,
    /// Extent group size.
    pub egroup_bytes: u32,
    /// Slice size (the checksum unit).
    pub slice_bytes: u32,
    /// Journal ring offset.
    pub journal_offset: u64,
    /// Journal ring size.
    pub journal_bytes: u64,
    /// Offsets of the two checkpoint slots.
    pub checkpoint_offset: [u64; 2],
    /// Size of each checkpoint slot.
    pub checkpoint_bytes: u64,
    /// First extent group slot.
    pub data_offset: u64,
    /// Number of extent group slots.
    pub egroup_count: u32,
}

impl Layout {
    /// Lays out a device of `device_bytes` with the given geometry; `journal_bytes` 0 picks
    /// the default (1/256 of the device, 1 MiB to 256 MiB).
    pub fn compute(
        device_bytes: u64,
        block_size: u32,
        egroup_bytes: u32,
        slice_bytes: u32,
        journal_bytes: u64,
    ) -> Result<Layout, FormatError> {
        let geo = |reason: String| FormatError::Geometry { reason };
        if !block_size.is_power_of_two() || !(512..=4096).contains(&block_size) {
            return Err(geo(format!(
                "device block size {block_size} is not a power of two from 512 to 4096"
            )));
        }
        if !slice_bytes.is_power_of_two() || !(4096..=(1 << 20)).contains(&slice_bytes) {
            return Err(geo(format!(
                "slice size {slice_bytes} is not a power of two from 4 KiB to 1 MiB"
            )));
        }
        if !egroup_bytes.is_power_of_two()
            || egroup_bytes < slice_bytes
            || egroup_bytes > (64 << 20)
        {
            return Err(geo(format!(
                "extent group size {egroup_bytes} is not a power of two from the slice size ({slice_bytes}) to 64 MiB"
            )));
        }
        let device_bytes = device_bytes - device_bytes % META_BLOCK_BYTES;
        let journal_bytes = if journal_bytes == 0 {
            (device_bytes / 256).clamp(MIN_JOURNAL_BYTES, MAX_DEFAULT_JOURNAL_BYTES)
                / META_BLOCK_BYTES
                * META_BLOCK_BYTES
        } else {
            journal_bytes
        };
        if journal_bytes % META_BLOCK_BYTES != 0 || journal_bytes < 4 * META_BLOCK_BYTES {
            return Err(geo(format!(
                "journal size {journal_bytes} is not a multiple of 4 KiB of at least 16 KiB"
            )));
        }
        let after_journal = JOURNAL_OFFSET + journal_bytes;
        let end = device_bytes.saturating_sub(SUPERBLOCK_BYTES);
        // First guess of the slot count ignores the checkpoints; the checkpoint size it gives
        // is an upper bound, so the final count computed with it always fits.
        let upper = end.saturating_sub(after_journal) / u64::from(egroup_bytes);
        let slices = egroup_bytes / slice_bytes;
        let checkpoint_bytes = checkpoint_bytes_for(upper, slices);
        let data_offset = (after_journal + 2 * checkpoint_bytes).next_multiple_of(DATA_ALIGN_BYTES);
        let egroup_count = end.saturating_sub(data_offset) / u64::from(egroup_bytes);
        if egroup_count == 0 {
            return Err(geo(format!(
                "a {device_bytes}-byte device has no room for one {egroup_bytes}-byte extent group after {data_offset} bytes of metadata"
            )));
        }
        let egroup_count = u32::try_from(egroup_count)
            .map_err(|_| geo(format!("{egroup_count} extent groups is more than 2^32-1")))?;
        Ok(Layout {
            device_bytes,
            block_size,
            egroup_bytes,
            slice_bytes,
            journal_offset: JOURNAL_OFFSET,
            journal_bytes,
            checkpoint_offset: [after_journal, after_journal + checkpoint_bytes],
            checkpoint_bytes,
            data_offset,
            egroup_count,
        })
    }

    /// Slices per extent group.
    pub fn slices_per_egroup(&self) -> u32 {
        self.egroup_bytes / self.slice_bytes
    }

    /// Blocks in the journal ring.
    pub fn journal_blocks(&self) -> u64 {
        self.journal_bytes / META_BLOCK_BYTES
    }

    /// Offset of superblock copy `copy` (0 = A, 1 = B).
    pub fn superblock_offset(&self, copy: usize) -> u64 {
        if copy == 0 {
            0
        } else {
            self.device_bytes - SUPERBLOCK_BYTES
        }
    }

    /// Byte offset of extent group slot `slot`.
    pub fn slot_offset(&self, slot: u32) -> u64 {
        self.data_offset + u64::from(slot) * u64::from(self.egroup_bytes)
    }

    /// Byte offset of the journal block with sequence number `seq`.
    pub fn journal_block_offset(&self, seq: u64) -> u64 {
        self.journal_offset + (seq % self.journal_blocks()) * META_BLOCK_BYTES
    }

    /// Bytes of one checkpoint entry.
    pub fn checkpoint_entry_bytes(&self) -> usize {
        entry_bytes(self.slices_per_egroup())
    }
}

fn entry_bytes(slices: u32) -> usize {
    16 + 8 * (slices as usize).div_ceil(64) + 4 * slices as usize
}

fn checkpoint_bytes_for(egroups: u64, slices: u32) -> u64 {
    (CKPT_HEADER_BYTES as u64 + egroups * entry_bytes(slices) as u64)
        .next_multiple_of(META_BLOCK_BYTES)
}

/// One superblock copy.
///
/// ```text
/// off  size  field
///   0     8  magic "CAIRNBS\0"
///   8     4  format version
///  12     4  copy index (0 = A at offset 0, 1 = B in the last 4 KiB)
///  16     8  generation (bumped on every open for writing)
///  24    16  format uuid
///  40     8  device bytes          48  4  block size   52  1  tier   53  3  zero
///  56     4  extent group bytes    60  4  slice bytes
///  64     8  journal offset        72  8  journal bytes
///  80     8  checkpoint 0 offset   88  8  checkpoint 1 offset   96  8  checkpoint bytes
/// 104     8  data offset          112  4  extent group count
/// 116  3976  zero
/// 4092    4  crc32c of bytes 0..4092
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Bumped each time the device is opened for writing.
    pub generation: u64,
    /// Identifies this format of the device.
    pub uuid: u128,
    /// Tier chosen at format time.
    pub tier: Tier,
    /// Where everything is.
    pub layout: Layout,
}

impl Superblock {
    /// Encodes copy `copy` (0 or 1) into a 4 KiB block.
    pub fn encode(&self, copy: u32, out: &mut [u8]) {
        assert_eq!(out.len(), SUPERBLOCK_BYTES as usize);
        out.fill(0);
        let l = &self.layout;
        wr(out, 0, &SB_MAGIC);
        wr(out, 8, &FORMAT_VERSION.to_le_bytes());
        wr(out, 12, &copy.to_le_bytes());
        wr(out, 16, &self.generation.to_le_bytes());
        wr(out, 24, &self.uuid.to_le_bytes());
        wr(out, 40, &l.device_bytes.to_le_bytes());
        wr(out, 48, &l.block_size.to_le_bytes());
        out[52] = self.tier.code();
        wr(out, 56, &l.egroup_bytes.to_le_bytes());
        wr(out, 60, &l.slice_bytes.to_le_bytes());
        wr(out, 64, &l.journal_offset.to_le_bytes());
        wr(out, 72, &l.journal_bytes.to_le_bytes());
        wr(out, 80, &l.checkpoint_offset[0].to_le_bytes());
        wr(out, 88, &l.checkpoint_offset[1].to_le_bytes());
        wr(out, 96, &l.checkpoint_bytes.to_le_bytes());
        wr(out, 104, &l.data_offset.to_le_bytes());
        wr(out, 112, &l.egroup_count.to_le_bytes());
        let crc = crc32c::crc32c(&out[..SB_CRC_OFFSET]);
        wr(out, SB_CRC_OFFSET, &crc.to_le_bytes());
    }

    /// Decodes a superblock copy and checks that its layout is self-consistent.
    pub fn decode(b: &[u8]) -> Result<(Superblock, u32), FormatError> {
        const WHAT: &str = "superblock";
        assert_eq!(b.len(), SUPERBLOCK_BYTES as usize);
        if b[0..8] != SB_MAGIC {
            return Err(FormatError::BadMagic { what: WHAT });
        }
        let stored = rd_u32(b, SB_CRC_OFFSET);
        let computed = crc32c::crc32c(&b[..SB_CRC_OFFSET]);
        if stored != computed {
            return Err(FormatError::BadChecksum {
                what: WHAT,
                stored,
                computed,
            });
        }
        let version = rd_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(FormatError::BadVersion {
                what: WHAT,
                found: version,
            });
        }
        let bad = |field, value| FormatError::BadField {
            what: WHAT,
            field,
            value,
        };
        let copy = rd_u32(b, 12);
        if copy > 1 {
            return Err(bad("copy", u64::from(copy)));
        }
        let tier = Tier::from_code(b[52]).ok_or(bad("tier", u64::from(b[52])))?;
        let stored_layout = Layout {
            device_bytes: rd_u64(b, 40),
            block_size: rd_u32(b, 48),
            egroup_bytes: rd_u32(b, 56),
            slice_bytes: rd_u32(b, 60),
            journal_offset: rd_u64(b, 64),
            journal_bytes: rd_u64(b, 72),
            checkpoint_offset: [rd_u64(b, 80), rd_u64(b, 88)],
            checkpoint_bytes: rd_u64(b, 96),
            data_offset: rd_u64(b, 104),
            egroup_count: rd_u32(b, 112),
        };
        // The layout is a pure function of the geometry: recompute it and insist on equality,
        // so a superblock with a valid crc but nonsense offsets is refused.
        let expected = Layout::compute(
            stored_layout.device_bytes,
            stored_layout.block_size,
            stored_layout.egroup_bytes,
            stored_layout.slice_bytes,
            stored_layout.journal_bytes,
        )
        .map_err(|_| bad("geometry", stored_layout.device_bytes))?;
        if expected != stored_layout {
            return Err(bad("layout", stored_layout.data_offset));
        }
        Ok((
            Superblock {
                generation: rd_u64(b, 16),
                uuid: rd_u128(b, 24),
                tier,
                layout: stored_layout,
            },
            copy,
        ))
    }
}

/// Local metadata of one allocated extent group, as kept in memory and in checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgroupMeta {
    /// The extent group's id (chosen by the caller, unique on the device).
    pub egid: u64,
    /// Bit `i` set: slice `i` was written and `crcs[i]` is its crc32c.
    pub written: Vec<u64>,
    /// crc32c of each slice's bytes.
    pub crcs: Vec<u32>,
}

impl EgroupMeta {
    /// A fresh extent group with no slice written.
    pub fn new(egid: u64, slices: u32) -> Self {
        Self {
            egid,
            written: vec![0; (slices as usize).div_ceil(64)],
            crcs: vec![0; slices as usize],
        }
    }

    /// Whether slice `i` holds data.
    pub fn is_written(&self, i: u32) -> bool {
        self.written[i as usize / 64] & (1 << (i % 64)) != 0
    }

    /// Records that slice `i` now holds data with crc32c `crc`.
    pub fn set_written(&mut self, i: u32, crc: u32) {
        self.written[i as usize / 64] |= 1 << (i % 64);
        self.crcs[i as usize] = crc;
    }

    /// Records that slice `i` holds no data (reads as zeros).
    pub fn clear(&mut self, i: u32) {
        self.written[i as usize / 64] &= !(1 << (i % 64));
        self.crcs[i as usize] = 0;
    }

    /// Number of written slices.
    pub fn written_count(&self) -> u32 {
        self.written.iter().map(|w| w.count_ones()).sum()
    }
}

/// Identity of a checkpoint: which journal records it already contains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointHeader {
    /// Increases with every checkpoint; the valid slot with the highest wins.
    pub checkpoint_seq: u64,
    /// Journal epoch: journal blocks of this epoch from `journal_start_seq` on are replayed.
    pub epoch: u64,
    /// First journal block sequence number not contained in this checkpoint.
    pub journal_start_seq: u64,
    /// Number of entries.
    pub entry_count: u32,
}

/// Encodes a checkpoint of `entries` (slot, metadata) into `out`, returning the bytes used
/// (a multiple of 4 KiB).
///
/// ```text
/// off  size  field
///   0     8  magic "CRNCKPT\0"        8  4  version      12  4  entry bytes
///  16    16  format uuid
///  32     8  checkpoint seq          40  8  epoch        48  8  journal start seq
///  56     4  entry count             60  4  zero
///  64     8  payload bytes           72  4  payload crc32c   76  4  header crc32c (bytes 0..76)
///  80     .  entries, each: slot u32, zero u32, egid u64,
///            written bitmap (ceil(slices/64) x u64), crc32c per slice (slices x u32)
/// ```
pub fn encode_checkpoint<'a>(
    uuid: u128,
    header: &CheckpointHeader,
    slices: u32,
    entries: impl Iterator<Item = (u32, &'a EgroupMeta)>,
    out: &mut [u8],
) -> usize {
    let eb = entry_bytes(slices);
    let mut pos = CKPT_HEADER_BYTES;
    let mut count = 0u32;
    for (slot, meta) in entries {
        assert_eq!(meta.crcs.len(), slices as usize);
        let e = &mut out[pos..pos + eb];
        wr(e, 0, &slot.to_le_bytes());
        wr(e, 4, &0u32.to_le_bytes());
        wr(e, 8, &meta.egid.to_le_bytes());
        let mut o = 16;
        for w in &meta.written {
            wr(e, o, &w.to_le_bytes());
            o += 8;
        }
        for c in &meta.crcs {
            wr(e, o, &c.to_le_bytes());
            o += 4;
        }
        debug_assert_eq!(o, eb);
        pos += eb;
        count += 1;
    }
    assert_eq!(count, header.entry_count, "checkpoint entry count");
    let used = (pos as u64).next_multiple_of(META_BLOCK_BYTES) as usize;
    out[pos..used].fill(0);
    let payload_crc = crc32c::crc32c(&out[CKPT_HEADER_BYTES..pos]);
    let h = &mut out[..CKPT_HEADER_BYTES];
    wr(h, 0, &CKPT_MAGIC);
    wr(h, 8, &FORMAT_VERSION.to_le_bytes());
    wr(h, 12, &(eb as u32).to_le_bytes());
    wr(h, 16, &uuid.to_le_bytes());
    wr(h, 32, &header.checkpoint_seq.to_le_bytes());
    wr(h, 40, &header.epoch.to_le_bytes());
    wr(h, 48, &header.journal_start_seq.to_le_bytes());
    wr(h, 56, &header.entry_count.to_le_bytes());
    wr(h, 60, &0u32.to_le_bytes());
    wr(h, 64, &((pos - CKPT_HEADER_BYTES) as u64).to_le_bytes());
    wr(h, 72, &payload_crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&h[..76]);
    wr(h, 76, &header_crc.to_le_bytes());
    used
}

/// Decodes a checkpoint header; returns it with the payload length to read and check.
pub fn decode_checkpoint_header(
    b: &[u8],
    uuid: u128,
    layout: &Layout,
) -> Result<(CheckpointHeader, u64, u32), FormatError> {
    const WHAT: &str = "checkpoint";
    if b[0..8] != CKPT_MAGIC {
        return Err(FormatError::BadMagic { what: WHAT });
    }
    let stored = rd_u32(b, 76);
    let computed = crc32c::crc32c(&b[..76]);
    if stored != computed {
        return Err(FormatError::BadChecksum {
            what: WHAT,
            stored,
            computed,
        });
    }
    let version = rd_u32(b, 8);
    if version != FORMAT_VERSION {
        return Err(FormatError::BadVersion {
            what: WHAT,
            found: version,
        });
    }
    let found = rd_u128(b, 16);
    if found != uuid {
        return Err(FormatError::ForeignUuid {
            what: WHAT,
            found,
            expected: uuid,
        });
    }
    let bad = |field, value| FormatError::BadField {
        what: WHAT,
        field,
        value,
    };
    let eb = rd_u32(b, 12);
    if eb as usize != layout.checkpoint_entry_bytes() {
        return Err(bad("entry bytes", u64::from(eb)));
    }
    let header = CheckpointHeader {
        checkpoint_seq: rd_u64(b, 32),
        epoch: rd_u64(b, 40),
        journal_start_seq: rd_u64(b, 48),
        entry_count: rd_u32(b, 56),
    };
    if header.entry_count > layout.egroup_count {
        return Err(bad("entry count", u64::from(header.entry_count)));
    }
    let payload = rd_u64(b, 64);
    if payload != u64::from(header.entry_count) * u64::from(eb)
        || CKPT_HEADER_BYTES as u64 + payload > layout.checkpoint_bytes
    {
        return Err(bad("payload bytes", payload));
    }
    Ok((header, payload, rd_u32(b, 72)))
}

/// Decodes the entries of a checkpoint whose header was decoded, checking the payload crc.
pub fn decode_checkpoint_entries(
    b: &[u8],
    header: &CheckpointHeader,
    payload: u64,
    payload_crc: u32,
    layout: &Layout,
) -> Result<Vec<(u32, EgroupMeta)>, FormatError> {
    const WHAT: &str = "checkpoint";
    let end = CKPT_HEADER_BYTES + payload as usize;
    let computed = crc32c::crc32c(&b[CKPT_HEADER_BYTES..end]);
    if computed != payload_crc {
        return Err(FormatError::BadChecksum {
            what: WHAT,
            stored: payload_crc,
            computed,
        });
    }
    let slices = layout.slices_per_egroup();
    let eb = layout.checkpoint_entry_bytes();
    let words = (slices as usize).div_ceil(64);
    let mut out = Vec::with_capacity(header.entry_count as usize);
    for i in 0..header.entry_count as usize {
        let e = &b[CKPT_HEADER_BYTES + i * eb..CKPT_HEADER_BYTES + (i + 1) * eb];
        let slot = rd_u32(e, 0);
        if slot >= layout.egroup_count {
            return Err(FormatError::BadField {
                what: WHAT,
                field: "slot",
                value: u64::from(slot),
            });
        }
        let mut meta = EgroupMeta::new(rd_u64(e, 8), slices);
        for w in 0..words {
            meta.written[w] = rd_u64(e, 16 + 8 * w);
        }
        for s in 0..slices as usize {
            meta.crcs[s] = rd_u32(e, 16 + 8 * words + 4 * s);
        }
        out.push((slot, meta));
    }
    Ok(out)
}

/// One change to local metadata, as logged in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// Extent group `egid` now lives in slot `slot`, with no slice written.
    Alloc {
        /// Slot.
        slot: u32,
        /// Extent group id.
        egid: u64,
    },
    /// Slot `slot` (which held `egid`) is free.
    Free {
        /// Slot.
        slot: u32,
        /// Extent group id.
        egid: u64,
    },
    /// Slice `slice` of slot `slot` holds data with crc32c `crc`.
    SliceWritten {
        /// Slot.
        slot: u32,
        /// Slice index.
        slice: u32,
        /// crc32c of the slice.
        crc: u32,
    },
    /// Slices `[first, first + count)` of slot `slot` hold no data.
    SlicesTrimmed {
        /// Slot.
        slot: u32,
        /// First slice.
        first: u32,
        /// Number of slices.
        count: u32,
    },
}

impl Record {
    /// Encodes into exactly [`RECORD_BYTES`] bytes: a type byte, then three u32 (or u32 + u64).
    pub fn encode(&self, out: &mut [u8]) {
        match *self {
            Record::Alloc { slot, egid } | Record::Free { slot, egid } => {
                out[0] = if matches!(self, Record::Alloc { .. }) {
                    1
                } else {
                    2
                };
                wr(out, 1, &slot.to_le_bytes());
                wr(out, 5, &egid.to_le_bytes());
            }
            Record::SliceWritten { slot, slice, crc } => {
                out[0] = 3;
                wr(out, 1, &slot.to_le_bytes());
                wr(out, 5, &slice.to_le_bytes());
                wr(out, 9, &crc.to_le_bytes());
            }
            Record::SlicesTrimmed { slot, first, count } => {
                out[0] = 4;
                wr(out, 1, &slot.to_le_bytes());
                wr(out, 5, &first.to_le_bytes());
                wr(out, 9, &count.to_le_bytes());
            }
        }
    }

    /// Decodes one record, checking its fields against the layout.
    pub fn decode(b: &[u8], layout: &Layout) -> Result<Record, FormatError> {
        const WHAT: &str = "journal record";
        let bad = |field, value| FormatError::BadField {
            what: WHAT,
            field,
            value,
        };
        let slot = rd_u32(b, 1);
        if slot >= layout.egroup_count {
            return Err(bad("slot", u64::from(slot)));
        }
        let slices = layout.slices_per_egroup();
        let rec = match b[0] {
            1 => Record::Alloc {
                slot,
                egid: rd_u64(b, 5),
            },
            2 => Record::Free {
                slot,
                egid: rd_u64(b, 5),
            },
            3 => {
                let slice = rd_u32(b, 5);
                if slice >= slices {
                    return Err(bad("slice", u64::from(slice)));
                }
                Record::SliceWritten {
                    slot,
                    slice,
                    crc: rd_u32(b, 9),
                }
            }
            4 => {
                let (first, count) = (rd_u32(b, 5), rd_u32(b, 9));
                if count == 0 || u64::from(first) + u64::from(count) > u64::from(slices) {
                    return Err(bad("slice range", u64::from(first)));
                }
                Record::SlicesTrimmed { slot, first, count }
            }
            t => return Err(bad("type", u64::from(t))),
        };
        Ok(rec)
    }
}

/// Header of one journal block.
///
/// ```text
/// off  size  field
///   0     4  magic "CRNJ"            4  2  version       6  2  record count
///   8    16  format uuid
///  24     8  epoch                  32  8  block seq
///  40     8  first seq of the batch 48  4  blocks in the batch
///  52     4  zero                   56  4  zero          60  4  crc32c of the block (this field zero)
///  64     .  records, 13 bytes each; the rest of the block is zero
/// ```
///
/// A batch is the set of blocks written by one flush. Blocks of one batch are written together,
/// so after a power cut any of them may be torn; a later batch is only written after the earlier
/// one was flushed. A bad block followed by a good block of a *later* batch is therefore damage,
/// not a torn tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalHeader {
    /// Epoch (one per open of the device for writing).
    pub epoch: u64,
    /// Block sequence number.
    pub seq: u64,
    /// Sequence number of the batch's first block.
    pub batch_first_seq: u64,
    /// Number of blocks in the batch.
    pub batch_blocks: u32,
    /// Records in this block.
    pub record_count: u16,
}

/// Encodes one journal block from `records` (at most [`RECORDS_PER_BLOCK`]).
pub fn encode_journal_block(uuid: u128, h: &JournalHeader, records: &[Record], out: &mut [u8]) {
    assert_eq!(out.len(), META_BLOCK_BYTES as usize);
    assert!(records.len() <= RECORDS_PER_BLOCK);
    assert_eq!(records.len(), h.record_count as usize);
    out.fill(0);
    wr(out, 0, &JOURNAL_MAGIC);
    wr(out, 4, &(FORMAT_VERSION as u16).to_le_bytes());
    wr(out, 6, &h.record_count.to_le_bytes());
    wr(out, 8, &uuid.to_le_bytes());
    wr(out, 24, &h.epoch.to_le_bytes());
    wr(out, 32, &h.seq.to_le_bytes());
    wr(out, 40, &h.batch_first_seq.to_le_bytes());
    wr(out, 48, &h.batch_blocks.to_le_bytes());
    for (i, r) in records.iter().enumerate() {
        let o = JOURNAL_HEADER_BYTES + i * RECORD_BYTES;
        r.encode(&mut out[o..o + RECORD_BYTES]);
    }
    let crc = crc32c::crc32c(out);
    wr(out, 60, &crc.to_le_bytes());
}

/// Decodes a journal block's header, checking magic, version, uuid and crc.
pub fn decode_journal_header(b: &[u8], uuid: u128) -> Result<JournalHeader, FormatError> {
    const WHAT: &str = "journal block";
    if b[0..4] != JOURNAL_MAGIC {
        return Err(FormatError::BadMagic { what: WHAT });
    }
    let stored = rd_u32(b, 60);
    // The crc was computed with its own field zero.
    let computed = crc32c::crc32c_append(
        crc32c::crc32c_append(crc32c::crc32c(&b[..60]), &[0; 4]),
        &b[64..],
    );
    if stored != computed {
        return Err(FormatError::BadChecksum {
            what: WHAT,
            stored,
            computed,
        });
    }
    let version = u32::from(rd_u16(b, 4));
    if version != FORMAT_VERSION {
        return Err(FormatError::BadVersion {
            what: WHAT,
            found: version,
        });
    }
    let found = rd_u128(b, 8);
    if found != uuid {
        return Err(FormatError::ForeignUuid {
            what: WHAT,
            found,
            expected: uuid,
        });
    }
    let h = JournalHeader {
        record_count: rd_u16(b, 6),
        epoch: rd_u64(b, 24),
        seq: rd_u64(b, 32),
        batch_first_seq: rd_u64(b, 40),
        batch_blocks: rd_u32(b, 48),
    };
    let bad = |field, value| FormatError::BadField {
        what: WHAT,
        field,
        value,
    };
    if h.record_count as usize > RECORDS_PER_BLOCK {
        return Err(bad("record count", u64::from(h.record_count)));
    }
    if h.batch_blocks == 0
        || h.seq < h.batch_first_seq
        || h.seq - h.batch_first_seq >= u64::from(h.batch_blocks)
    {
        return Err(bad("batch", h.batch_first_seq));
    }
    Ok(h)
}

/// Decodes the records of a journal block whose header was decoded.
pub fn decode_journal_records(
    b: &[u8],
    h: &JournalHeader,
    layout: &Layout,
) -> Result<Vec<Record>, FormatError> {
    (0..h.record_count as usize)
        .map(|i| {
            let o = JOURNAL_HEADER_BYTES + i * RECORD_BYTES;
            Record::decode(&b[o..o + RECORD_BYTES], layout)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::compute(8 << 30, 4096, DEFAULT_EGROUP_BYTES, DEFAULT_SLICE_BYTES, 0).unwrap()
    }

    #[test]
    fn default_layout_for_8_gib() {
        let l = layout();
        assert_eq!(l.journal_bytes, 32 << 20);
        assert_eq!(l.slices_per_egroup(), 128);
        assert!(
            l.egroup_count >= 2000 && l.egroup_count < 2048,
            "{}",
            l.egroup_count
        );
        assert_eq!(l.data_offset % DATA_ALIGN_BYTES, 0);
        assert!(l.checkpoint_offset[1] + l.checkpoint_bytes <= l.data_offset);
        assert!(l.slot_offset(l.egroup_count) <= l.superblock_offset(1));
    }

    #[test]
    fn superblock_round_trip_and_corruption() {
        let sb = Superblock {
            generation: 7,
            uuid: 0x1234_5678_9abc_def0_1122_3344_5566_7788,
            tier: Tier::Ssd,
            layout: layout(),
        };
        let mut b = vec![0u8; 4096];
        sb.encode(1, &mut b);
        let (back, copy) = Superblock::decode(&b).unwrap();
        assert_eq!((back, copy), (sb, 1));
        b[100] ^= 1;
        assert!(matches!(
            Superblock::decode(&b),
            Err(FormatError::BadChecksum { .. })
        ));
    }

    #[test]
    fn checkpoint_round_trip() {
        let l = Layout::compute(64 << 20, 512, 1 << 20, 4096, 1 << 20).unwrap();
        let mut m = EgroupMeta::new(42, l.slices_per_egroup());
        m.set_written(3, 0xdead_beef);
        m.set_written(255, 7);
        let h = CheckpointHeader {
            checkpoint_seq: 3,
            epoch: 2,
            journal_start_seq: 99,
            entry_count: 1,
        };
        let mut out = vec![0u8; l.checkpoint_bytes as usize];
        let used = encode_checkpoint(
            9,
            &h,
            l.slices_per_egroup(),
            [(5u32, &m)].into_iter(),
            &mut out,
        );
        assert_eq!(used % 4096, 0);
        let (h2, payload, crc) = decode_checkpoint_header(&out, 9, &l).unwrap();
        assert_eq!(h2, h);
        let entries = decode_checkpoint_entries(&out, &h2, payload, crc, &l).unwrap();
        assert_eq!(entries, vec![(5, m)]);
        assert!(matches!(
            decode_checkpoint_header(&out, 10, &l),
            Err(FormatError::ForeignUuid { .. })
        ));
        out[CKPT_HEADER_BYTES + 20] ^= 0x40;
        assert!(decode_checkpoint_entries(&out, &h2, payload, crc, &l).is_err());
    }

    #[test]
    fn journal_block_round_trip() {
        let l = layout();
        let recs = vec![
            Record::Alloc { slot: 1, egid: 77 },
            Record::SliceWritten {
                slot: 1,
                slice: 127,
                crc: 5,
            },
            Record::SlicesTrimmed {
                slot: 1,
                first: 0,
                count: 128,
            },
            Record::Free { slot: 1, egid: 77 },
        ];
        let h = JournalHeader {
            epoch: 4,
            seq: 10,
            batch_first_seq: 9,
            batch_blocks: 2,
            record_count: recs.len() as u16,
        };
        let mut b = vec![0u8; 4096];
        encode_journal_block(1, &h, &recs, &mut b);
        let h2 = decode_journal_header(&b, 1).unwrap();
        assert_eq!(h2, h);
        assert_eq!(decode_journal_records(&b, &h2, &l).unwrap(), recs);
        b[4000] = 1;
        assert!(decode_journal_header(&b, 1).is_err());
    }

    #[test]
    fn default_journal_is_block_aligned_for_any_size() {
        for size in [10_000_000_000u64, (300 << 20) + 4096, (8 << 30) - 4096] {
            let l =
                Layout::compute(size, 4096, DEFAULT_EGROUP_BYTES, DEFAULT_SLICE_BYTES, 0).unwrap();
            assert_eq!(l.journal_bytes % META_BLOCK_BYTES, 0, "{size}");
        }
    }

    #[test]
    fn geometry_errors_are_precise() {
        let e = Layout::compute(4 << 20, 4096, 4 << 20, 32 << 10, 0).unwrap_err();
        assert!(e.to_string().contains("no room"), "{e}");
        let e = Layout::compute(8 << 30, 4096, 4 << 20, 3000, 0).unwrap_err();
        assert!(e.to_string().contains("slice size"), "{e}");
    }
}
