//! `cairn device format` and `cairn fsck` run as an operator would, on real files through the
//! io_uring backend, with real bytes corrupted in them: one superblock copy (recovered from the
//! other), both copies (refused), a journal block, a slice.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use blockstore::format::{Layout, SUPERBLOCK_BYTES, Superblock};
use blockstore::uring::{self, UringOptions};
use blockstore::{BlockStore, DmaBuf};

const SLICE: usize = 32 << 10;

fn cairn(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .output()
        .expect("run cairn");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().expect("exit code"), text)
}

/// Formats a 64 MiB file and writes 4 extent groups in 4 flushed batches; `clean` closes the
/// store (checkpoint), otherwise it is dropped as by a crash (records only in the journal).
fn populated(dir: &Path, clean: bool) -> (PathBuf, Layout) {
    let path = dir.join("dev.img");
    let p = path.to_str().unwrap();
    let (code, out) = cairn(&[
        "device",
        "format",
        p,
        "--size",
        "64MiB",
        "--egroup-size",
        "1MiB",
    ]);
    assert_eq!(code, 0, "{out}");
    let path2 = path.clone();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let dev = uring::open(&path2, UringOptions::default()).await.unwrap();
            let store = BlockStore::open(dev).await.unwrap();
            let mut buf = DmaBuf::new(2 * SLICE);
            for egid in 0..4u64 {
                buf.fill(egid as u8 + 1);
                store.allocate(egid).unwrap();
                store.write_slices(egid, 0, &buf).await.unwrap();
                store.flush().await.unwrap();
            }
            if clean {
                store.close().await.unwrap();
            }
        })
        .unwrap()
        .join()
        .unwrap();
    let mut sb = vec![0u8; SUPERBLOCK_BYTES as usize];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut sb, 0)
        .unwrap();
    let layout = Superblock::decode(&sb).unwrap().0.layout;
    (path, layout)
}

fn corrupt(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_all().unwrap();
}

fn fsck(path: &Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["fsck", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    cairn(&args)
}

#[test]
fn clean_device_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = populated(dir.path(), true);
    let (code, out) = fsck(&path, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("4 extent groups, 8 slices written, 8 verified"),
        "{out}"
    );
    assert!(out.contains("result: clean"), "{out}");
}

#[test]
fn crashed_device_replays_its_journal() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = populated(dir.path(), false);
    let (code, out) = fsck(&path, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("unclean shutdown") && out.contains("open() replays"),
        "{out}"
    );
}

#[test]
fn one_superblock_copy_is_recovered_from_the_other() {
    for (copy, name) in [(0usize, "A"), (1, "B")] {
        let dir = tempfile::tempdir().unwrap();
        let (path, layout) = populated(dir.path(), true);
        corrupt(&path, layout.superblock_offset(copy) + 24, &[0xA5; 16]);
        let (code, out) = fsck(&path, &[]);
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains(&format!(
                "superblock copy {name} at offset {}",
                layout.superblock_offset(copy)
            )),
            "{out}"
        );
        assert!(
            out.contains("checksum mismatch") && out.contains("rewritten from copy"),
            "{out}"
        );
        let (code, out) = fsck(&path, &["--repair"]);
        assert_eq!(code, 0, "{out}");
        let (code, out) = fsck(&path, &[]);
        assert_eq!(code, 0, "after repair: {out}");
    }
}

#[test]
fn both_superblock_copies_destroyed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, layout) = populated(dir.path(), true);
    corrupt(&path, 0, &[0u8; 64]);
    corrupt(&path, layout.superblock_offset(1) + 4000, &[0xFF; 8]);
    let (code, out) = fsck(&path, &[]);
    assert_eq!(code, 8, "{out}");
    assert!(
        out.contains("no valid superblock") && out.contains("refused"),
        "{out}"
    );
    let (code, out) = fsck(&path, &["--repair"]);
    assert_eq!(code, 8, "{out}");
    assert!(out.contains("repair: refused"), "{out}");
}

#[test]
fn damaged_journal_block_is_reported_and_salvaged() {
    let dir = tempfile::tempdir().unwrap();
    let (path, layout) = populated(dir.path(), false);
    // The four flushed batches are the first journal blocks after the opening checkpoint of
    // the session that wrote them: find the oldest valid one and damage a record in it.
    let f = std::fs::File::open(&path).unwrap();
    let mut sb = vec![0u8; 4096];
    f.read_exact_at(&mut sb, 0).unwrap();
    let uuid = Superblock::decode(&sb).unwrap().0.uuid;
    let mut oldest: Option<(u64, u64)> = None;
    for pos in 0..layout.journal_blocks() {
        let mut b = vec![0u8; 4096];
        let off = layout.journal_offset + pos * 4096;
        f.read_exact_at(&mut b, off).unwrap();
        if let Ok(h) = blockstore::format::decode_journal_header(&b, uuid)
            && oldest.is_none_or(|(s, _)| h.seq < s)
        {
            oldest = Some((h.seq, off));
        }
    }
    let (seq, off) = oldest.expect("journal blocks");
    corrupt(&path, off + 64 + 3, &[0x77]);
    let (code, out) = fsck(&path, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!(
            "journal block seq {seq} at offset {off} is damaged"
        )),
        "{out}"
    );
    assert!(
        out.contains("--repair` replays the 3 later blocks"),
        "{out}"
    );
    let (code, out) = fsck(&path, &["--repair"]);
    assert!(out.contains("after repair"), "{out}");
    assert!(code == 0 || code == 2, "{out}");
    // Once repaired the device opens; the check no longer reports journal damage.
    let (_, out) = fsck(&path, &[]);
    assert!(!out.contains("is damaged"), "{out}");
}

#[test]
fn corrupt_slice_is_lost_and_named_precisely() {
    let dir = tempfile::tempdir().unwrap();
    let (path, layout) = populated(dir.path(), true);
    let slice_offset = layout.slot_offset(2) + SLICE as u64;
    corrupt(&path, slice_offset + 1000, &[0x00, 0x01, 0x02]);
    let (code, out) = fsck(&path, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!(
            "extent group 2 slice 1 at offset {slice_offset}: checksum mismatch"
        )),
        "{out}"
    );
    assert!(out.contains("7 verified"), "{out}");
    let (code, out) = fsck(&path, &["--no-verify-slices"]);
    assert_eq!(code, 0, "metadata alone is intact: {out}");
}

#[test]
fn format_refuses_bad_input_precisely() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.img");
    let p = p.to_str().unwrap();
    let (code, out) = cairn(&["device", "format", p]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("does not exist: give --size"), "{out}");
    let (code, out) = cairn(&["device", "format", p, "--size", "12XB"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("unknown unit"), "{out}");
    let (code, out) = cairn(&["device", "format", p, "--size", "2MiB"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no room for one"), "{out}");
    let (code, out) = cairn(&[
        "device",
        "format",
        p,
        "--size",
        "64MiB",
        "--slice-size",
        "3000",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("slice size 3000"), "{out}");
    let (code, out) = cairn(&["fsck", "/nonexistent/dev"]);
    assert_eq!(code, 8, "{out}");
}
