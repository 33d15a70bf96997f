//! Offline check of a formatted device: what is wrong, and what can be recovered.
//!
//! [`check`] only reads. It runs the same recovery as [`BlockStore::open`] (in salvage mode, so
//! it can look past damage), then reads every written slice and verifies its crc32c. Each problem
//! becomes a [`Finding`] with a severity that says what recovery can do:
//!
//! | severity | meaning | exit code |
//! | --- | --- | --- |
//! | `Info` | normal after a crash (journal to replay, torn last batch): open() handles it | 0 |
//! | `Repairable` | damage with an intact second copy (superblock, checkpoint): open() or `--repair` rewrites it | 1 |
//! | `Lost` | acknowledged data or metadata on this device is gone (damaged journal block, slice checksum mismatch): must be restored from a replica | 2 |
//! | `Fatal` | the device cannot be opened at all (both superblocks or both checkpoints bad) | 8 |
//!
//! [`repair`] opens the device in salvage mode, which rewrites both superblocks and writes fresh
//! checkpoints; slices that fail their checksum are left for the data plane to re-replicate.

use std::fmt;

use crate::buf::DmaBuf;
use crate::device::BlockDevice;
use crate::format::{FormatError, Layout, SUPERBLOCK_BYTES, Superblock};
use crate::store::{BlockStore, JournalEnd, OpenOptions, StoreError, recover};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Expected after a crash; handled by open().
    Info,
    /// Damaged, with a good second copy: open() or `--repair` fixes it.
    Repairable,
    /// Acknowledged data or metadata lost on this device.
    Lost,
    /// The device cannot be opened.
    Fatal,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Info => "info",
            Severity::Repairable => "repairable",
            Severity::Lost => "LOST",
            Severity::Fatal => "FATAL",
        })
    }
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// How bad it is.
    pub severity: Severity,
    /// What is wrong, with device offsets.
    pub problem: String,
    /// What can be recovered and how.
    pub recovery: String,
}

/// The result of a check.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Device name.
    pub device: String,
    /// The superblock in use, when one was valid.
    pub superblock: Option<Superblock>,
    /// Extent groups allocated.
    pub egroups: u64,
    /// Written slices.
    pub slices_written: u64,
    /// Written slices whose checksum was verified good.
    pub slices_verified: u64,
    /// Journal records that open() replays.
    pub journal_records_to_replay: u64,
    /// Everything found, worst first.
    pub findings: Vec<Finding>,
}

impl Report {
    /// The worst severity found, if any.
    pub fn worst(&self) -> Option<Severity> {
        self.findings.iter().map(|f| f.severity).max()
    }

    /// Process exit code: 0 clean (or only info), 1 repairable, 2 data lost, 8 cannot open.
    pub fn exit_code(&self) -> i32 {
        match self.worst() {
            None | Some(Severity::Info) => 0,
            Some(Severity::Repairable) => 1,
            Some(Severity::Lost) => 2,
            Some(Severity::Fatal) => 8,
        }
    }

    fn add(&mut self, severity: Severity, problem: String, recovery: String) {
        self.findings.push(Finding {
            severity,
            problem,
            recovery,
        });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "device {}", self.device)?;
        if let Some(sb) = &self.superblock {
            let l = &sb.layout;
            writeln!(
                f,
                "  format v{}, uuid {:032x}, generation {}, tier {}, {} bytes, {}-byte blocks",
                crate::format::FORMAT_VERSION,
                sb.uuid,
                sb.generation,
                sb.tier,
                l.device_bytes,
                l.block_size
            )?;
            writeln!(
                f,
                "  {} extent group slots of {} KiB ({} KiB slices), journal {} KiB, data at offset {}",
                l.egroup_count,
                l.egroup_bytes / 1024,
                l.slice_bytes / 1024,
                l.journal_bytes / 1024,
                l.data_offset
            )?;
            writeln!(
                f,
                "  {} extent groups, {} slices written, {} verified, {} journal records to replay",
                self.egroups,
                self.slices_written,
                self.slices_verified,
                self.journal_records_to_replay
            )?;
        }
        if self.findings.is_empty() {
            writeln!(f, "clean")?;
        }
        for finding in &self.findings {
            writeln!(f, "[{}] {}", finding.severity, finding.problem)?;
            writeln!(f, "    recovery: {}", finding.recovery)?;
        }
        let verdict = match self.worst() {
            None | Some(Severity::Info) => "clean",
            Some(Severity::Repairable) => "damaged, fully recoverable (run `cairn fsck --repair`)",
            Some(Severity::Lost) => "damaged, data lost on this device (restore it from a replica)",
            Some(Severity::Fatal) => "unusable (cannot be opened)",
        };
        write!(f, "result: {verdict} (exit {})", self.exit_code())
    }
}

/// Checks `dev` without writing to it; `verify_slices` also reads and checks every written slice.
pub async fn check<D: BlockDevice>(dev: &D, verify_slices: bool) -> Report {
    let mut report = Report {
        device: dev.info().name.to_string(),
        ..Default::default()
    };
    let rec = match recover(dev, OpenOptions { salvage: true }).await {
        Ok(rec) => rec,
        Err(e) => {
            let recovery = match &e {
                StoreError::NoSuperblock { .. } => {
                    "none: without a superblock the layout is unknown; the device is refused (format it and re-replicate its data)"
                }
                StoreError::NoCheckpoint { .. } => {
                    "none locally: the extent group table is gone; the device is refused (re-replicate its data)"
                }
                StoreError::GeometryChanged { .. } => {
                    "restore the device to its formatted size and block size, or reformat it"
                }
                _ => "check the device (I/O failed while reading metadata)",
            };
            report.add(Severity::Fatal, e.to_string(), recovery.to_string());
            return report;
        }
    };
    let sb = rec.superblock.clone();
    let layout = sb.layout;
    report.superblock = Some(sb.clone());

    for (copy, result) in rec.superblock_copies.iter().enumerate() {
        let name = ["A", "B"][copy];
        let offset = layout.superblock_offset(copy);
        match result {
            Err(e) => report.add(
                Severity::Repairable,
                format!("superblock copy {name} at offset {offset} is invalid: {e}"),
                format!(
                    "rewritten from copy {} (generation {}) by `cairn fsck --repair` or the next open",
                    ["B", "A"][copy],
                    sb.generation
                ),
            ),
            Ok(other) if other.generation != sb.generation => report.add(
                Severity::Info,
                format!(
                    "superblock copy {name} at offset {offset} has generation {} (the other has {}): an open was cut short",
                    other.generation, sb.generation
                ),
                "the newer copy is used; the next open rewrites both".to_string(),
            ),
            Ok(_) => {}
        }
    }

    let used = rec.checkpoint_used;
    for (slot, result) in rec.checkpoints.iter().enumerate() {
        let offset = layout.checkpoint_offset[slot];
        if let Err(e) = result {
            report.add(
                Severity::Repairable,
                format!("checkpoint slot {slot} at offset {offset} is invalid: {e}"),
                format!(
                    "slot {used} is used instead with the journal after it; the next checkpoint rewrites slot {slot}"
                ),
            );
        }
    }

    report.journal_records_to_replay = rec.replayed_records;
    if rec.replayed_records > 0 {
        report.add(
            Severity::Info,
            format!(
                "journal holds {} records in {} blocks after the last checkpoint (unclean shutdown)",
                rec.replayed_records, rec.replayed_blocks
            ),
            "open() replays them".to_string(),
        );
    }
    match &rec.journal_end {
        JournalEnd::Clean | JournalEnd::RingFull => {}
        JournalEnd::TornTail { seq, offset, error } => report.add(
            Severity::Info,
            format!(
                "journal block seq {seq} at offset {offset} is unreadable ({error}) and no later batch follows: a flush cut by power loss"
            ),
            "discarded by open(): that flush never completed, so nothing acknowledged is lost".to_string(),
        ),
        JournalEnd::Damaged {
            seq,
            offset,
            error,
            later_blocks,
            ..
        } => report.add(
            Severity::Lost,
            format!(
                "journal block seq {seq} at offset {offset} is damaged ({error}) and {later_blocks} blocks of later batches follow it: flushed metadata changes in it are lost"
            ),
            format!(
                "`cairn fsck --repair` replays the {later_blocks} later blocks and checkpoints; extent groups touched by the lost records may fail their checksums and must be re-replicated"
            ),
        ),
    }
    let anomalies = rec.anomalies;
    if anomalies.orphan_slice_records + anomalies.mismatched_frees > 0 {
        report.add(
            Severity::Lost,
            format!(
                "{} journal records refer to extent groups that do not exist ({} slice records, {} frees)",
                anomalies.orphan_slice_records + anomalies.mismatched_frees,
                anomalies.orphan_slice_records,
                anomalies.mismatched_frees
            ),
            "ignored on replay; the extent groups they belonged to must be re-replicated".to_string(),
        );
    }

    let table = rec.table;
    for (slot, meta) in table.slots.iter().enumerate() {
        let Some(meta) = meta else { continue };
        report.egroups += 1;
        let written = u64::from(meta.written_count());
        report.slices_written += written;
        if !verify_slices || written == 0 {
            continue;
        }
        let offset = layout.slot_offset(slot as u32);
        let mut buf = DmaBuf::new(layout.egroup_bytes as usize);
        if let Err(e) = dev.read(offset, &mut buf).await {
            report.add(
                Severity::Lost,
                format!(
                    "extent group {} at offset {offset}: read failed: {e}",
                    meta.egid
                ),
                "re-replicate this extent group from a replica".to_string(),
            );
            continue;
        }
        let sbytes = layout.slice_bytes as usize;
        for i in 0..layout.slices_per_egroup() {
            if !meta.is_written(i) {
                continue;
            }
            let data = &buf[i as usize * sbytes..(i as usize + 1) * sbytes];
            let actual = crc32c::crc32c(data);
            if actual == meta.crcs[i as usize] {
                report.slices_verified += 1;
            } else {
                report.add(
                    Severity::Lost,
                    format!(
                        "extent group {} slice {i} at offset {}: checksum mismatch (metadata {:#010x}, data {actual:#010x})",
                        meta.egid,
                        offset + u64::from(i) * u64::from(layout.slice_bytes),
                        meta.crcs[i as usize]
                    ),
                    "reads of this slice fail with a checksum error (never wrong data); re-replicate it from a replica".to_string(),
                );
            }
        }
    }
    report
        .findings
        .sort_by_key(|f| std::cmp::Reverse(f.severity));
    report
}

/// Repairs what can be repaired locally: opens in salvage mode (rewriting both superblocks and
/// checkpointing), then closes cleanly. Returns the device.
pub async fn repair<D: BlockDevice>(dev: D) -> Result<D, StoreError> {
    let store = BlockStore::open_with(dev, OpenOptions { salvage: true }).await?;
    store.close().await
}

/// Offsets of the structures fsck checks, for tools and tests that corrupt them on purpose.
pub fn superblock_offsets(layout: &Layout) -> [u64; 2] {
    [layout.superblock_offset(0), layout.superblock_offset(1)]
}

const _: () = assert!(SUPERBLOCK_BYTES == 4096);

/// Whether a decode error means "not this structure" rather than damage.
pub fn is_absent(e: &FormatError) -> bool {
    matches!(e, FormatError::BadMagic { .. })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{JournalHeader, META_BLOCK_BYTES};
    use crate::mem::MemDevice;
    use crate::store::FormatOptions;
    use pollster::block_on;
    use std::rc::Rc;

    const SIZE: u64 = 32 << 20;

    fn opts() -> FormatOptions {
        FormatOptions {
            egroup_bytes: 1 << 20,
            slice_bytes: 32 << 10,
            journal_bytes: 1 << 20,
            ..Default::default()
        }
    }

    /// A device with data, left as after a crash (journal records not checkpointed) when
    /// `unclean`, with several journal batches.
    fn populated(unclean: bool) -> (Rc<MemDevice>, Layout) {
        block_on(async {
            let dev = Rc::new(MemDevice::new("fsck", SIZE, 4096));
            let store = BlockStore::format(dev.clone(), &opts()).await.unwrap();
            let buf = DmaBuf::new(2 * (32 << 10));
            for egid in 0..4 {
                store.allocate(egid).unwrap();
                store.write_slices(egid, 0, &buf).await.unwrap();
                store.flush().await.unwrap();
            }
            let layout = *store.layout();
            if unclean {
                drop(store);
            } else {
                store.close().await.unwrap();
            }
            (dev, layout)
        })
    }

    #[test]
    fn clean_device_is_clean() {
        let (dev, _) = populated(false);
        let r = block_on(check(&*dev, true));
        assert_eq!(r.exit_code(), 0, "{r}");
        assert_eq!((r.egroups, r.slices_written, r.slices_verified), (4, 8, 8));
        assert!(r.findings.is_empty(), "{r}");
    }

    #[test]
    fn unclean_device_needs_replay_only() {
        let (dev, _) = populated(true);
        let r = block_on(check(&*dev, true));
        assert_eq!(r.exit_code(), 0, "{r}");
        assert!(r.journal_records_to_replay > 0, "{r}");
    }

    #[test]
    fn one_superblock_copy_is_recovered_from_the_other() {
        for copy in 0..2 {
            let (dev, layout) = populated(false);
            dev.poke(layout.superblock_offset(copy) + 200, &[0x5A; 8]);
            let r = block_on(check(&*dev, true));
            assert_eq!(r.exit_code(), 1, "{r}");
            assert!(r.to_string().contains("superblock copy"), "{r}");
            block_on(repair(dev.clone())).unwrap();
            let r = block_on(check(&*dev, true));
            assert_eq!(r.exit_code(), 0, "after repair: {r}");
        }
    }

    #[test]
    fn both_superblocks_bad_is_refused() {
        let (dev, layout) = populated(false);
        dev.poke(layout.superblock_offset(0) + 200, &[0x5A; 8]);
        dev.poke(layout.superblock_offset(1) + 200, &[0x5A; 8]);
        let r = block_on(check(&*dev, true));
        assert_eq!(r.exit_code(), 8, "{r}");
        assert!(block_on(BlockStore::open(dev.clone())).is_err());
    }

    #[test]
    fn damaged_journal_block_followed_by_later_batches_is_lost_and_salvageable() {
        let (dev, layout) = populated(true);
        // The first batch after the opening checkpoint: find its block by header.
        let mut first = None;
        for pos in 0..layout.journal_blocks() {
            let mut b = vec![0u8; META_BLOCK_BYTES as usize];
            dev.peek(layout.journal_offset + pos * META_BLOCK_BYTES, &mut b);
            let uuid = block_on(crate::store::read_superblocks(&*dev))
                .unwrap()
                .0
                .uuid;
            if let Ok(JournalHeader { seq, .. }) = crate::format::decode_journal_header(&b, uuid) {
                first = Some(first.map_or(seq, |f: u64| f.min(seq)));
            }
        }
        let seq = first.expect("journal blocks");
        dev.poke(layout.journal_block_offset(seq) + 70, &[0xFF; 4]);
        let r = block_on(check(&*dev, true));
        assert_eq!(r.exit_code(), 2, "{r}");
        assert!(r.to_string().contains("is damaged"), "{r}");
        let err = block_on(BlockStore::open(dev.clone()))
            .err()
            .expect("open refuses");
        assert!(matches!(err, StoreError::JournalDamaged { .. }), "{err}");
        block_on(repair(dev.clone())).unwrap();
        let r = block_on(check(&*dev, true));
        assert!(r.exit_code() <= 2, "{r}");
        assert!(block_on(BlockStore::open(dev.clone())).is_ok());
    }

    #[test]
    fn corrupt_slice_is_reported_with_its_offset() {
        let (dev, layout) = populated(false);
        let off = layout.slot_offset(2) + (32 << 10) + 7;
        dev.poke(off, &[0x01]);
        let r = block_on(check(&*dev, true));
        assert_eq!(r.exit_code(), 2, "{r}");
        let text = r.to_string();
        assert!(
            text.contains("slice 1") && text.contains("checksum mismatch"),
            "{text}"
        );
        assert!(text.contains(&(off - 7).to_string()), "{text}");
    }

    #[test]
    fn torn_checkpoint_falls_back_to_the_other_slot() {
        let (dev, layout) = populated(false);
        // The newest checkpoint is in one of the slots: tear both in turn.
        for slot in 0..2 {
            let (dev2, _) = populated(false);
            let _ = &dev;
            dev2.poke(layout.checkpoint_offset[slot] + 40, &[0xEE; 8]);
            let r = block_on(check(&*dev2, true));
            assert_eq!(r.exit_code(), 1, "slot {slot}: {r}");
            block_on(repair(dev2.clone())).unwrap();
            assert_eq!(block_on(check(&*dev2, true)).exit_code(), 0);
        }
    }
}
