//! How fast the drain copies random 4 KiB writes from the oplog into the extent store, on an
//! io_uring file (CAIRN_DRAIN_DIR, default /dev/shm). A measurement, not a pass/fail test:
//! `cargo test --release -p dataplane --test drain_speed -- --ignored --nocapture`.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

use blockstore::uring::{self, UringOptions};
use blockstore::{BlockStore, FormatOptions};
use dataplane::cache::ReadCache;
use dataplane::metadata::MemMetadataStore;
use dataplane::target::BlockTarget;
use dataplane::vdisk::{Vdisk, VdiskConfig};

#[test]
#[ignore = "a measurement; run with --ignored --nocapture"]
fn drain_speed_of_random_4k_writes() {
    let dir = std::env::var("CAIRN_DRAIN_DIR").unwrap_or_else(|_| "/dev/shm".into());
    let dir = tempfile::tempdir_in(dir).unwrap();
    let path = dir.path().join("dev.img");
    // Written through once, like a real device: allocating writes into a sparse file's holes
    // would measure the filesystem, not the drain.
    std::fs::write(&path, vec![0u8; 1 << 30]).unwrap();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let dev = uring::open(&path, UringOptions::default()).await.unwrap();
            let opts = FormatOptions {
                slice_bytes: 4096,
                ..Default::default()
            };
            let store = Rc::new(BlockStore::format(dev, &opts).await.unwrap());
            let meta = Rc::new(MemMetadataStore::new());
            let cache = Rc::new(RefCell::new(ReadCache::new(1 << 20)));
            let cfg = VdiskConfig::new(1, "vd", 512 << 20);
            let vd = Vdisk::open(store, meta, cache, cfg).await.unwrap();
            let blocks = 16384u64;
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut offsets = Vec::new();
            for _ in 0..blocks {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                offsets.push((x % ((512 << 20) / 4096)) * 4096);
            }
            let data = vec![0xa5u8; 4096];
            let t0 = Instant::now();
            for chunk in offsets.chunks(32) {
                let writes: Vec<_> = chunk.iter().map(|&o| vd.write(o, &data, false)).collect();
                for w in writes {
                    w.await.unwrap();
                }
            }
            let wrote = t0.elapsed();
            let t1 = Instant::now();
            vd.drain_all().await.unwrap();
            let drained = t1.elapsed();
            println!(
                "drain: {blocks} random 4 KiB blocks written in {:.0} ms, drained in {:.0} ms ({:.2} us/block)",
                wrote.as_secs_f64() * 1e3,
                drained.as_secs_f64() * 1e3,
                drained.as_secs_f64() * 1e6 / blocks as f64
            );
        })
        .unwrap()
        .join()
        .unwrap();
}
