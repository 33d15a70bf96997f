//! Hardware test of the SPDK backend against malloc bdevs.
//!
//! Needs SPDK (linked by `build.rs` through `pkg-config`), huge pages and permission to use
//! them, so it is `#[ignore]`d and run by `hw-tests/spdk/run.sh`:
//!
//! ```text
//! cargo test -p blockstore --features spdk --lib -- --ignored --test-threads=1 spdk::
//! ```
//!
//! Everything runs in one test function because the SPDK environment can be initialised once per
//! process. Optional environment: `CAIRN_SPDK_HUGEDIR` (hugetlbfs mount), `CAIRN_SPDK_MEM_MB`
//! (huge page memory to reserve up front).

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use pollster::block_on;

use super::{EnvError, EnvOptions, OpenError, SpdkDevice, SpdkEnv, SpdkThread};
use crate::buf::DmaBuf;
use crate::device::{BlockDevice, DeviceError, Tier};

const MALLOC_BYTES: u64 = 16 << 20;

/// Small `spdk_bdev_io` pool so that the concurrency test runs into `-ENOMEM` (the minimum SPDK
/// accepts is `bdev_io_cache_size * (threads + 1)`, far below 128 here), and iobuf pools of
/// 16 MiB + 33 MiB instead of the default 64 MiB + 132 MiB so that the test fits in 256 MiB of
/// huge pages (their per-channel caches, 128 + 16 for bdev and for accel per thread, still fit).
const CONFIG: &str = r#"{
  "subsystems": [
    {
      "subsystem": "iobuf",
      "config": [
        { "method": "iobuf_set_options",
          "params": { "small_pool_count": 2048, "large_pool_count": 256 } }
      ]
    },
    {
      "subsystem": "bdev",
      "config": [
        { "method": "bdev_set_options",
          "params": { "bdev_io_pool_size": 128, "bdev_io_cache_size": 16 } },
        { "method": "bdev_malloc_create",
          "params": { "name": "cairn_malloc512", "num_blocks": 32768, "block_size": 512 } },
        { "method": "bdev_malloc_create",
          "params": { "name": "cairn_malloc4k", "num_blocks": 4096, "block_size": 4096 } }
      ]
    }
  ]
}"#;

const LATE_CONFIG: &str = r#"{
  "subsystems": [
    { "subsystem": "bdev",
      "config": [
        { "method": "bdev_malloc_create",
          "params": { "name": "cairn_malloc_late", "num_blocks": 2048, "block_size": 4096 } }
      ] }
  ]
}"#;

#[test]
#[ignore = "needs SPDK and huge pages: run hw-tests/spdk/run.sh"]
fn spdk_malloc_round_trip() {
    let options = EnvOptions {
        name: "cairn_hw_test".to_owned(),
        no_pci: true,
        hugedir: std::env::var("CAIRN_SPDK_HUGEDIR").ok(),
        mem_size_mb: std::env::var("CAIRN_SPDK_MEM_MB")
            .ok()
            .map(|mb| mb.parse().expect("CAIRN_SPDK_MEM_MB is a number of MiB")),
        json_config: Some(CONFIG.to_owned()),
        ..EnvOptions::default()
    };
    let env = SpdkEnv::init(&options).expect("SPDK environment");
    assert!(matches!(
        SpdkEnv::init(&options),
        Err(EnvError::AlreadyInitialised)
    ));
    {
        let app = env.app_thread();
        round_trip(&app, "cairn_malloc512", 512);
        round_trip(&app, "cairn_malloc4k", 4096);
        rejects_bad_ranges(&app);
        back_pressure(&app);
        dropped_future_keeps_device_sane(&app);
        open_errors(&app);

        env.load_config(LATE_CONFIG).expect("runtime configuration");
        let late = SpdkDevice::open(Rc::clone(&app), "cairn_malloc_late", Tier::Mem).unwrap();
        assert_eq!(late.info().size_bytes, 2048 * 4096);
        drop(late);

        // A second SPDK thread, as each further core would own.
        let core = Rc::new(SpdkThread::create("cairn_core1").expect("SPDK thread"));
        round_trip(&core, "cairn_malloc4k", 4096);
    }
    drop(env);
}

fn pattern(len: usize, seed: u8) -> DmaBuf {
    let mut buf = DmaBuf::new(len);
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    buf
}

fn round_trip(thread: &Rc<SpdkThread>, bdev: &str, block_size: u32) {
    let dev = SpdkDevice::open(Rc::clone(thread), bdev, Tier::Mem).expect("open malloc bdev");
    let info = dev.info().clone();
    assert_eq!(&*info.name, bdev);
    assert_eq!(info.block_size, block_size);
    assert_eq!(info.size_bytes, MALLOC_BYTES);
    assert!(info.caps.flush, "malloc supports flush");
    assert!(info.caps.write_zeroes, "malloc supports write-zeroes");
    assert!(info.caps.unmap, "malloc supports unmap");

    let offset = 1 << 20;
    let data = pattern(64 * 1024, 7);
    block_on(dev.write(offset, &data)).unwrap();
    let mut back = DmaBuf::new(64 * 1024);
    block_on(dev.read(offset, &mut back)).unwrap();
    assert_eq!(&back[..], &data[..]);
    block_on(dev.flush()).unwrap();

    // The last 4 KiB of the device, and a block-aligned (not 4 KiB-aligned) offset.
    let tail = pattern(4096, 9);
    block_on(dev.write(MALLOC_BYTES - 4096, &tail)).unwrap();
    let odd_offset = 2 * 4096 + u64::from(block_size);
    block_on(dev.write(odd_offset, &tail)).unwrap();
    let mut back = DmaBuf::new(4096);
    block_on(dev.read(MALLOC_BYTES - 4096, &mut back)).unwrap();
    assert_eq!(&back[..], &tail[..]);
    block_on(dev.read(odd_offset, &mut back)).unwrap();
    assert_eq!(&back[..], &tail[..]);

    // Zero 8 KiB in the middle of the pattern; the rest must be untouched.
    block_on(dev.write_zeroes(offset + 4096, 8192)).unwrap();
    let mut back = DmaBuf::new(64 * 1024);
    block_on(dev.read(offset, &mut back)).unwrap();
    assert_eq!(&back[..4096], &data[..4096]);
    assert!(back[4096..12288].iter().all(|&b| b == 0));
    assert_eq!(&back[12288..], &data[12288..]);

    // Unmapped contents are unspecified: only the call itself is checked.
    block_on(dev.unmap(offset, 64 * 1024)).unwrap();
    block_on(dev.flush()).unwrap();
    assert_eq!(dev.nomem_retries(), 0);
    assert!(!dev.is_offline());
}

fn rejects_bad_ranges(thread: &Rc<SpdkThread>) {
    let dev = SpdkDevice::open(Rc::clone(thread), "cairn_malloc4k", Tier::Mem).unwrap();
    let buf = DmaBuf::new(4096);
    let err = block_on(dev.write(512, &buf)).unwrap_err();
    assert!(matches!(err, DeviceError::Misaligned { .. }), "{err}");
    let err = block_on(dev.write(MALLOC_BYTES, &buf)).unwrap_err();
    assert!(matches!(err, DeviceError::OutOfRange { .. }), "{err}");
    let err = block_on(dev.unmap(0, 0)).unwrap_err();
    assert!(matches!(err, DeviceError::Misaligned { .. }), "{err}");
}

/// Far more concurrent I/Os than `spdk_bdev_io`s: submissions must queue, not fail.
fn back_pressure(thread: &Rc<SpdkThread>) {
    let dev = SpdkDevice::open(Rc::clone(thread), "cairn_malloc512", Tier::Mem).unwrap();
    let bufs: Vec<DmaBuf> = (0..512).map(|i| pattern(4096, i as u8)).collect();
    let writes = join_all(
        bufs.iter()
            .enumerate()
            .map(|(i, buf)| dev.write(i as u64 * 4096, buf))
            .collect(),
    );
    for result in writes {
        result.unwrap();
    }
    assert!(dev.nomem_retries() > 0, "512 I/Os fit a pool of 128?");
    let mut backs: Vec<DmaBuf> = (0..512).map(|_| DmaBuf::new(4096)).collect();
    let reads = join_all(
        backs
            .iter_mut()
            .enumerate()
            .map(|(i, back)| dev.read(i as u64 * 4096, back))
            .collect(),
    );
    for result in reads {
        result.unwrap();
    }
    for (buf, back) in bufs.iter().zip(&backs) {
        assert_eq!(&back[..], &buf[..]);
    }
}

/// A future dropped after submission: the I/O still completes into memory that stays alive,
/// and the device keeps working and closes cleanly.
fn dropped_future_keeps_device_sane(thread: &Rc<SpdkThread>) {
    let dev = SpdkDevice::open(Rc::clone(thread), "cairn_malloc4k", Tier::Mem).unwrap();
    let data = pattern(1 << 20, 3);
    {
        let mut write = Box::pin(dev.write(0, &data));
        let mut cx = Context::from_waker(Waker::noop());
        let _ = write.as_mut().poll(&mut cx);
    }
    let mut back = DmaBuf::new(4096);
    block_on(dev.read(4 << 20, &mut back)).unwrap();
    drop(dev); // waits for the abandoned write
}

fn open_errors(thread: &Rc<SpdkThread>) {
    match SpdkDevice::open(Rc::clone(thread), "cairn_no_such_bdev", Tier::Nvme) {
        Err(OpenError::Open { source, .. }) => {
            assert_eq!(source.raw_os_error(), Some(libc::ENODEV))
        }
        other => panic!("expected ENODEV, got {other:?}"),
    }
    assert!(matches!(
        SpdkDevice::open(Rc::clone(thread), "bad\0name", Tier::Nvme),
        Err(OpenError::NulInName { .. })
    ));
}

/// Polls every future on the current thread until all are done.
fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    block_on(poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }));
    outputs
        .into_iter()
        .map(|output| output.expect("polled to completion"))
        .collect()
}
