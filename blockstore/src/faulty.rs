//! A fault-injecting device that wraps any other device (after SPDK's `vbdev_error` and redb's
//! countdown backend).
//!
//! It models what real devices do wrong, each fault seeded and replayable:
//! * a **volatile write cache**: a completed write reaches the inner device only at the next
//!   flush; at a power cut each unflushed write is independently lost, kept whole, or **torn**:
//!   only a prefix of its sectors reaches media or, as a volatile cache may destage in any order,
//!   an arbitrary subset of its sectors;
//! * a **power cut after N operations** (or on demand): the operation fails, the cache is resolved
//!   as above, and every later operation fails with [`DeviceError::Offline`];
//! * **EIO** on reads or writes with a given probability (a failed write may still tear);
//! * **bit flips** on reads (media stays intact: a re-read can succeed);
//! * **latency**, through a caller-supplied sleep function, so this module needs no runtime.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::buf::DmaBuf;
use crate::device::{BlockDevice, DeviceError, DeviceInfo, IoOp, check_range};

/// A sleep function supplied by the runtime (glommio's timer, a simulated clock, ...).
pub type SleepFn = Rc<dyn Fn(Duration) -> Pin<Box<dyn Future<Output = ()>>>>;

/// Which faults to inject.
#[derive(Clone, Default)]
pub struct FaultConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Probability that a read fails with EIO.
    pub read_error_rate: f64,
    /// Probability that a write fails with EIO (after tearing, with probability 1/2).
    pub write_error_rate: f64,
    /// Probability that a read returns one flipped bit.
    pub bit_flip_rate: f64,
    /// Cut power when this many operations have been issued (the last one fails).
    pub power_cut_after_ops: Option<u64>,
    /// Model a volatile write cache (writes are durable only after a flush). Without it, every
    /// completed write is durable at once.
    pub volatile_cache: bool,
    /// Report cheap FUA writes ([`crate::device::Capabilities::fua`]), so that stores make
    /// writes durable with FUA instead of flushes. Either way `write_fua` is durable on
    /// completion.
    pub fua: bool,
    /// Latency range added to every operation, with the sleep function to wait it.
    pub latency: Option<(Duration, Duration, SleepFn)>,
}

impl std::fmt::Debug for FaultConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultConfig")
            .field("seed", &self.seed)
            .field("read_error_rate", &self.read_error_rate)
            .field("write_error_rate", &self.write_error_rate)
            .field("bit_flip_rate", &self.bit_flip_rate)
            .field("power_cut_after_ops", &self.power_cut_after_ops)
            .field("volatile_cache", &self.volatile_cache)
            .field("fua", &self.fua)
            .field("latency", &self.latency.as_ref().map(|(a, b, _)| (a, b)))
            .finish()
    }
}

/// Counts of what was injected.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FaultStats {
    /// Operations issued.
    pub ops: u64,
    /// Reads failed with EIO.
    pub read_errors: u64,
    /// Writes failed with EIO.
    pub write_errors: u64,
    /// Reads with a flipped bit.
    pub bit_flips: u64,
    /// Unflushed writes lost at the power cut.
    pub lost_writes: u64,
    /// Unflushed writes torn at the power cut (or by a failed write).
    pub torn_writes: u64,
    /// Unflushed writes that survived the power cut whole.
    pub kept_writes: u64,
}

/// Where byte ranges `[a, a + a_len)` and `[b, b + b_len)` overlap, as index ranges into the
/// first and into the second.
fn overlap(
    a: u64,
    a_len: usize,
    b: u64,
    b_len: usize,
) -> Option<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let from = a.max(b);
    let to = (a + a_len as u64).min(b + b_len as u64);
    (from < to).then(|| {
        (
            (from - a) as usize..(to - a) as usize,
            (from - b) as usize..(to - b) as usize,
        )
    })
}

/// A device wrapper that injects faults.
pub struct FaultyDevice<D: BlockDevice> {
    inner: D,
    /// The inner device's, with `caps.fua` from the configuration.
    info: DeviceInfo,
    cfg: FaultConfig,
    rng: RefCell<ChaCha8Rng>,
    /// Completed writes not yet flushed, in completion order.
    cache: RefCell<Vec<(u64, DmaBuf)>>,
    powered: Cell<bool>,
    stats: Cell<FaultStats>,
}

impl<D: BlockDevice> FaultyDevice<D> {
    /// Wraps `inner`.
    pub fn new(inner: D, cfg: FaultConfig) -> Self {
        let mut info = inner.info().clone();
        info.caps.fua = cfg.fua;
        Self {
            rng: RefCell::new(ChaCha8Rng::seed_from_u64(cfg.seed)),
            info,
            inner,
            cfg,
            cache: RefCell::new(Vec::new()),
            powered: Cell::new(true),
            stats: Cell::new(FaultStats::default()),
        }
    }

    /// What was injected so far.
    pub fn stats(&self) -> FaultStats {
        self.stats.get()
    }

    /// Whether power was cut.
    pub fn is_cut(&self) -> bool {
        !self.powered.get()
    }

    /// The wrapped device (after a power cut: the media as it was left).
    pub fn into_inner(self) -> D {
        self.inner
    }

    fn bump(&self, f: impl FnOnce(&mut FaultStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    fn chance(&self, p: f64) -> bool {
        p > 0.0 && self.rng.borrow_mut().random_bool(p.min(1.0))
    }

    fn offline(&self, op: IoOp, offset: u64) -> DeviceError {
        DeviceError::Offline {
            device: self.inner.info().name.clone(),
            op,
            offset,
        }
    }

    fn eio(&self, op: IoOp, offset: u64, len: u64) -> DeviceError {
        DeviceError::Io {
            device: self.inner.info().name.clone(),
            op,
            offset,
            len,
            source: std::io::Error::from_raw_os_error(libc::EIO),
        }
    }

    /// Writes the first `sectors` sectors of `buf` to the inner device.
    async fn write_prefix(
        &self,
        offset: u64,
        buf: &DmaBuf,
        sectors: usize,
    ) -> Result<(), DeviceError> {
        let bs = self.inner.info().block_size as usize;
        let mut part = DmaBuf::with_alignment(sectors * bs, bs);
        part.copy_from_slice(&buf[..sectors * bs]);
        self.inner.write(offset, &part).await
    }

    /// Cuts power now: resolves the volatile cache (each write lost, kept or torn) and takes the
    /// device offline.
    pub async fn power_cut(&self) -> Result<(), DeviceError> {
        if !self.powered.replace(false) {
            return Ok(());
        }
        let cached = std::mem::take(&mut *self.cache.borrow_mut());
        for (offset, buf) in cached {
            self.resolve_at_cut(offset, &buf).await?;
        }
        Ok(())
    }

    /// Decides the fate of a write that power failed under (unflushed, or still in flight):
    /// lost, kept whole, or torn (a prefix of its sectors, or any subset).
    async fn resolve_at_cut(&self, offset: u64, buf: &DmaBuf) -> Result<(), DeviceError> {
        let bs = self.inner.info().block_size as usize;
        let sectors = buf.len() / bs;
        let fate = self.rng.borrow_mut().random_range(0..4u8);
        match fate {
            0 => self.bump(|s| s.lost_writes += 1),
            1 => {
                self.inner.write(offset, buf).await?;
                self.bump(|s| s.kept_writes += 1);
            }
            2 if sectors > 1 => {
                let keep = self.rng.borrow_mut().random_range(1..sectors);
                self.write_prefix(offset, buf, keep).await?;
                self.bump(|s| s.torn_writes += 1);
            }
            3 if sectors > 1 => {
                let mut part = DmaBuf::with_alignment(bs, bs);
                for i in 0..sectors {
                    if self.rng.borrow_mut().random_bool(0.5) {
                        part.copy_from_slice(&buf[i * bs..(i + 1) * bs]);
                        self.inner.write(offset + (i * bs) as u64, &part).await?;
                    }
                }
                self.bump(|s| s.torn_writes += 1);
            }
            _ => self.bump(|s| s.lost_writes += 1),
        }
        Ok(())
    }

    /// A failed write: counted, and torn (a prefix reaches media) with probability 1/2.
    async fn fail_write(&self, offset: u64, buf: &DmaBuf) -> Result<(), DeviceError> {
        self.bump(|s| s.write_errors += 1);
        let sectors = buf.len() / self.info().block_size as usize;
        if sectors > 1 && self.chance(0.5) {
            let keep = self.rng.borrow_mut().random_range(1..sectors);
            self.write_prefix(offset, buf, keep).await?;
            self.bump(|s| s.torn_writes += 1);
        }
        Err(self.eio(IoOp::Write, offset, buf.len() as u64))
    }

    /// Counts the operation, applies latency, and cuts power when the countdown expires.
    async fn begin(&self, op: IoOp, offset: u64) -> Result<(), DeviceError> {
        if !self.powered.get() {
            return Err(self.offline(op, offset));
        }
        self.bump(|s| s.ops += 1);
        if let Some((min, max, sleep)) = &self.cfg.latency {
            let d = if max > min {
                self.rng.borrow_mut().random_range(*min..*max)
            } else {
                *min
            };
            sleep(d).await;
        }
        if let Some(n) = self.cfg.power_cut_after_ops
            && self.stats.get().ops >= n
        {
            self.power_cut().await?;
            return Err(self.offline(op, offset));
        }
        Ok(())
    }
}

impl<D: BlockDevice> BlockDevice for FaultyDevice<D> {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    async fn read(&self, offset: u64, buf: &mut DmaBuf) -> Result<(), DeviceError> {
        check_range(self.info(), IoOp::Read, offset, buf.len() as u64)?;
        self.begin(IoOp::Read, offset).await?;
        if self.chance(self.cfg.read_error_rate) {
            self.bump(|s| s.read_errors += 1);
            return Err(self.eio(IoOp::Read, offset, buf.len() as u64));
        }
        self.inner.read(offset, buf).await?;
        // Overlay the cached writes, oldest first, so the newest wins.
        for (woff, wbuf) in self.cache.borrow().iter() {
            if let Some((mine, theirs)) = overlap(offset, buf.len(), *woff, wbuf.len()) {
                buf[mine].copy_from_slice(&wbuf[theirs]);
            }
        }
        if self.chance(self.cfg.bit_flip_rate) {
            let bit = self.rng.borrow_mut().random_range(0..buf.len() * 8);
            buf[bit / 8] ^= 1 << (bit % 8);
            self.bump(|s| s.bit_flips += 1);
        }
        Ok(())
    }

    async fn write(&self, offset: u64, buf: &DmaBuf) -> Result<(), DeviceError> {
        check_range(self.info(), IoOp::Write, offset, buf.len() as u64)?;
        self.begin(IoOp::Write, offset).await?;
        if self.chance(self.cfg.write_error_rate) {
            return self.fail_write(offset, buf).await;
        }
        if self.cfg.volatile_cache {
            let mut copy = DmaBuf::with_alignment(buf.len(), self.info().block_size as usize);
            copy.copy_from_slice(buf);
            self.cache.borrow_mut().push((offset, copy));
            Ok(())
        } else {
            self.inner.write(offset, buf).await
        }
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.begin(IoOp::Flush, 0).await?;
        let cached = std::mem::take(&mut *self.cache.borrow_mut());
        for (offset, buf) in &cached {
            self.inner.write(*offset, buf).await?;
        }
        self.inner.flush().await
    }

    /// Durable on completion, bypassing the volatile cache. Power failing while it is in flight
    /// loses, keeps or tears it like an unflushed write.
    async fn write_fua(&self, offset: u64, buf: &DmaBuf) -> Result<(), DeviceError> {
        check_range(self.info(), IoOp::Write, offset, buf.len() as u64)?;
        let was_powered = self.powered.get();
        if let Err(e) = self.begin(IoOp::Write, offset).await {
            if was_powered {
                self.resolve_at_cut(offset, buf).await?;
            }
            return Err(e);
        }
        if self.chance(self.cfg.write_error_rate) {
            return self.fail_write(offset, buf).await;
        }
        // It supersedes whatever the cache holds for its sectors: patch the cached copies, so
        // that destaging them later cannot bring older data back.
        for (woff, wbuf) in self.cache.borrow_mut().iter_mut() {
            if let Some((mine, theirs)) = overlap(offset, buf.len(), *woff, wbuf.len()) {
                wbuf[theirs].copy_from_slice(&buf[mine]);
            }
        }
        self.inner.write_fua(offset, buf).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(self.info(), IoOp::WriteZeroes, offset, len)?;
        crate::device::write_zeroes_by_writes(self, offset, len).await
    }

    async fn unmap(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(self.info(), IoOp::Unmap, offset, len)?;
        if !self.info().caps.unmap {
            return Err(DeviceError::Unsupported {
                device: self.info().name.clone(),
                op: IoOp::Unmap,
            });
        }
        // Unmapped ranges read back as unspecified data: model them as cached zero writes.
        crate::device::write_zeroes_by_writes(self, offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemDevice;
    use pollster::block_on;

    fn cfg(seed: u64) -> FaultConfig {
        FaultConfig {
            seed,
            volatile_cache: true,
            ..Default::default()
        }
    }

    /// A 1 MiB device of 512-byte sectors with a volatile cache, whose power fails at
    /// operation `ops`.
    fn cut_at(seed: u64, ops: u64) -> FaultyDevice<MemDevice> {
        FaultyDevice::new(
            MemDevice::new("f", 1 << 20, 512),
            FaultConfig {
                power_cut_after_ops: Some(ops),
                ..cfg(seed)
            },
        )
    }

    #[test]
    fn unflushed_writes_are_visible_but_not_durable() {
        block_on(async {
            let dev = FaultyDevice::new(MemDevice::new("f", 1 << 20, 512), cfg(1));
            let buf = DmaBuf::from_slice(&[7u8; 4096]);
            dev.write(0, &buf).await.unwrap();
            let mut back = DmaBuf::new(4096);
            dev.read(0, &mut back).await.unwrap();
            assert_eq!(back[0], 7);
            let mut inner = [0u8; 1];
            dev.inner.peek(0, &mut inner);
            assert_eq!(inner[0], 0, "not durable before flush");
            dev.flush().await.unwrap();
            dev.inner.peek(0, &mut inner);
            assert_eq!(inner[0], 7);
        });
    }

    #[test]
    fn power_cut_loses_keeps_or_tears_and_goes_offline() {
        let mut seen = FaultStats::default();
        for seed in 0..50 {
            block_on(async {
                let dev = cut_at(seed, 5);
                let buf = DmaBuf::from_slice(&[9u8; 4096]);
                for i in 0..4 {
                    dev.write(i * 4096, &buf).await.unwrap();
                }
                let err = dev.write(8 * 4096, &buf).await.unwrap_err();
                assert!(matches!(err, DeviceError::Offline { .. }), "{err}");
                assert!(dev.is_cut());
                let s = dev.stats();
                assert_eq!(s.lost_writes + s.kept_writes + s.torn_writes, 4);
                seen.lost_writes += s.lost_writes;
                seen.kept_writes += s.kept_writes;
                seen.torn_writes += s.torn_writes;
                // A torn write tears at sector boundaries: each sector is wholly old or new.
                let mem = dev.into_inner();
                for i in 0..4u64 {
                    let mut block = [0u8; 4096];
                    mem.peek(i * 4096, &mut block);
                    for sector in block.chunks(512) {
                        assert!(sector.iter().all(|&b| b == 9) || sector.iter().all(|&b| b == 0));
                    }
                }
            });
        }
        assert!(
            seen.lost_writes > 0 && seen.kept_writes > 0 && seen.torn_writes > 0,
            "{seen:?}"
        );
    }

    #[test]
    fn fua_writes_survive_the_cut_and_supersede_cached_ones() {
        let mut in_flight = FaultStats::default();
        for seed in 0..50 {
            block_on(async {
                let dev = cut_at(seed, 4);
                let old = DmaBuf::from_slice(&[1u8; 8192]);
                let new = DmaBuf::from_slice(&[2u8; 4096]);
                // Cached (unflushed), then half of it overwritten with FUA, then another FUA.
                dev.write(0, &old).await.unwrap();
                dev.write_fua(4096, &new).await.unwrap();
                dev.write_fua(16384, &new).await.unwrap();
                // The fourth operation cuts power while this FUA write is in flight.
                let err = dev.write_fua(32768, &new).await.unwrap_err();
                assert!(matches!(err, DeviceError::Offline { .. }), "{err}");
                let s = dev.stats();
                in_flight.lost_writes += s.lost_writes;
                in_flight.kept_writes += s.kept_writes;
                in_flight.torn_writes += s.torn_writes;
                let mem = dev.into_inner();
                let byte = |at: u64| {
                    let mut b = [0u8; 1];
                    mem.peek(at, &mut b);
                    b[0]
                };
                // Acknowledged FUA writes are on media, whatever became of the cached write
                // under the first one (it never brings the older bytes back).
                assert!((0..8).all(|i| byte(4096 + i * 512) == 2), "seed {seed}");
                assert!((0..8).all(|i| byte(16384 + i * 512) == 2), "seed {seed}");
                assert!(
                    (0..8).all(|i| [0, 1].contains(&byte(i * 512))),
                    "seed {seed}"
                );
                assert!((0..8).all(|i| [0, 2].contains(&byte(32768 + i * 512))));
            });
        }
        // Across seeds, the in-flight FUA write and the cached one were lost, kept and torn.
        assert!(
            in_flight.lost_writes > 0 && in_flight.kept_writes > 0 && in_flight.torn_writes > 0,
            "{in_flight:?}"
        );
    }

    #[test]
    fn read_errors_and_bit_flips_are_injected_and_seeded() {
        let run = |seed| {
            block_on(async {
                let dev = FaultyDevice::new(
                    MemDevice::new("f", 1 << 20, 4096),
                    FaultConfig {
                        seed,
                        read_error_rate: 0.2,
                        bit_flip_rate: 0.2,
                        ..Default::default()
                    },
                );
                let mut outcomes = Vec::new();
                for _ in 0..100 {
                    let mut b = DmaBuf::new(4096);
                    outcomes.push(match dev.read(0, &mut b).await {
                        Err(_) => 2,
                        Ok(()) if b.iter().any(|&x| x != 0) => 1,
                        Ok(()) => 0,
                    });
                }
                outcomes
            })
        };
        let a = run(3);
        assert_eq!(a, run(3), "same seed, same faults");
        assert!(a.contains(&1) && a.contains(&2) && a.contains(&0));
    }
}
