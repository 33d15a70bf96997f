//! `cairn bench`: in-process benchmarks of Cairn's layers, driven by the scripts in `perf/`.
//!
//! `cairn bench blockstore` measures the [`BlockStore`] slice path the way fio measures a file:
//! N tasks on one glommio executor (N is the queue depth: each task keeps exactly one I/O in
//! flight, and glommio submits everything the tasks queued in one `io_uring_enter` per reactor
//! tick), each looping uniformly random one-slice writes or reads for a fixed time, with a
//! latency histogram per task merged at the end. It is shaped for a side-by-side run against
//! fio on the same file (`perf/blockstore.sh`), so it mirrors fio's choices: no flush per write
//! (the store's own journal commits still happen, as they would in production), buffers and
//! histograms allocated before the clock starts, latency measured from the call to its return
//! (fio's `lat`, not `clat`).

use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use blockstore::uring::{self, UringOptions};
use blockstore::{BlockDevice, BlockStore, DmaBuf, FormatOptions};
use clap::{Args, Subcommand, ValueEnum};
use glommio::{LocalExecutorBuilder, Placement};

use crate::size::{human, parse_size};

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Random one-slice I/O through BlockStore on io_uring (O_DIRECT), fio-style.
    ///
    /// Formats FILE (destroying it) with --slice-size slices, allocates extent groups over the
    /// whole data area, prefills every slice for reads (not timed), then runs --qd concurrent
    /// tasks for --runtime seconds. Prints one `key=value` line (or JSON with --json).
    Blockstore(BlockstoreArgs),
    /// Metadata commit throughput and latency of a running cluster: concurrent batches of
    /// block-map updates through the gRPC metadata service (see perf/metadata.sh). Prints one
    /// `key=value` line (or JSON with --json).
    Metadata(crate::bench_meta::MetadataArgs),
}

/// Arguments of `cairn bench blockstore`.
#[derive(Debug, Args)]
pub struct BlockstoreArgs {
    /// Backing regular file (created or extended to --size; formatted, so destroyed).
    #[arg(long)]
    pub path: PathBuf,
    /// Workload.
    #[arg(long, value_enum)]
    pub rw: Workload,
    /// Queue depth: concurrent tasks, each with one I/O in flight.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub qd: u32,
    /// Seconds of timed I/O.
    #[arg(long, default_value_t = 10.0)]
    pub runtime: f64,
    /// File size (the data area is this minus the store's metadata).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub size: u64,
    /// Slice size, which is also the I/O size (one slice per I/O).
    #[arg(long, default_value = "4KiB", value_parser = parse_size)]
    pub slice_size: u64,
    /// Extent group size.
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    pub egroup_size: u64,
    /// Layer to drive: the store (checksums, metadata journal) or, to see what the store adds,
    /// the io_uring device under it at the same offsets.
    #[arg(long, value_enum, default_value_t = Layer::Store)]
    pub layer: Layer,
    /// Pin the executor to this CPU (default: not pinned, like fio without --cpus_allowed).
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Seconds to wait after the read prefill before the clock starts, so that writeback the
    /// prefill caused below the file (a host page cache, a drive's cache) settles.
    #[arg(long, default_value_t = 0.0)]
    pub settle: f64,
    /// Let the executor spin this many microseconds for completions before it sleeps in the
    /// kernel (glommio `spin_before_park`; 0: sleep at once, as fio does).
    #[arg(long, default_value_t = 0)]
    pub spin_us: u64,
    /// Seed of the offset generator (each task derives its own stream from it).
    #[arg(long, default_value_t = 0x6361_6972_6e21)]
    pub seed: u64,
    /// Print one JSON object instead of the key=value line.
    #[arg(long)]
    pub json: bool,
}

/// What `cairn bench blockstore` does in its timed phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Random one-slice writes (no flush per write).
    Randwrite,
    /// Random one-slice reads of prefilled slices (crc32c verified on every read).
    Randread,
}

/// Which layer `cairn bench blockstore` drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Layer {
    /// `BlockStore::write_slices` / `read_slices`.
    Store,
    /// `UringDevice::write` / `read` at the slice's device offset (no checksum, no journal).
    Device,
}

impl Layer {
    fn name(self) -> &'static str {
        match self {
            Layer::Store => "store",
            Layer::Device => "device",
        }
    }
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Randwrite => "randwrite",
            Workload::Randread => "randread",
        }
    }
}

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Blockstore(args) => {
            let json = args.json;
            let report = blockstore_bench(args)?;
            if json {
                println!("{}", report.to_json());
            } else {
                println!("{}", report.to_line());
            }
            Ok(())
        }
        BenchCommand::Metadata(args) => crate::bench_meta::run(args),
    }
}

/// glommio's registered I/O memory: above what the queue depth and the prefill hold at once,
/// and within the default 8 MiB `RLIMIT_MEMLOCK` so a non-root run keeps registered buffers
/// (DEPENDENCIES.md pitfall 3). Larger requests fall back to the heap, which still works.
const IO_MEMORY_BYTES: usize = 6 << 20;

/// Bytes per write when prefilling for reads, and how many are in flight.
const PREFILL_CHUNK_BYTES: usize = 1 << 20;
const PREFILL_TASKS: usize = 4;

/// Result of one `cairn bench blockstore` run.
#[derive(Debug, Clone)]
pub struct BlockstoreReport {
    path: PathBuf,
    workload: Workload,
    layer: Layer,
    qd: u32,
    slice_bytes: u32,
    file_bytes: u64,
    data_bytes: u64,
    egroups: u32,
    prefill_s: f64,
    elapsed_s: f64,
    ios: u64,
    lat: LatencySummary,
}

impl BlockstoreReport {
    fn iops(&self) -> f64 {
        self.ios as f64 / self.elapsed_s
    }

    fn mb_per_s(&self) -> f64 {
        self.iops() * f64::from(self.slice_bytes) / 1e6
    }

    /// One line of `key=value` pairs (latencies in microseconds).
    pub fn to_line(&self) -> String {
        let us = |ns: u64| ns as f64 / 1e3;
        format!(
            "cairn-bench blockstore path={} rw={} layer={} qd={} bs={} file_bytes={} data_bytes={} egroups={} \
             runtime_s={:.3} ios={} iops={:.0} mb_s={:.1} lat_us_mean={:.1} lat_us_p50={:.1} \
             lat_us_p90={:.1} lat_us_p99={:.1} lat_us_p999={:.1} lat_us_max={:.1} prefill_s={:.2}",
            self.path.display(),
            self.workload.name(),
            self.layer.name(),
            self.qd,
            self.slice_bytes,
            self.file_bytes,
            self.data_bytes,
            self.egroups,
            self.elapsed_s,
            self.ios,
            self.iops(),
            self.mb_per_s(),
            self.lat.mean_ns / 1e3,
            us(self.lat.p50_ns),
            us(self.lat.p90_ns),
            us(self.lat.p99_ns),
            us(self.lat.p999_ns),
            us(self.lat.max_ns),
            self.prefill_s,
        )
    }

    /// One JSON object (latencies in nanoseconds, like fio's `lat_ns`).
    pub fn to_json(&self) -> String {
        format!(
            concat!(
                "{{\"bench\":\"blockstore\",\"path\":{},\"rw\":\"{}\",\"layer\":\"{}\",\"qd\":{},\"bs\":{},",
                "\"file_bytes\":{},\"data_bytes\":{},\"egroups\":{},\"runtime_s\":{:.6},",
                "\"ios\":{},\"iops\":{:.1},\"mb_s\":{:.3},\"lat_ns\":{{\"mean\":{:.1},",
                "\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{}}},\"prefill_s\":{:.3}}}"
            ),
            json_string(&self.path.to_string_lossy()),
            self.workload.name(),
            self.layer.name(),
            self.qd,
            self.slice_bytes,
            self.file_bytes,
            self.data_bytes,
            self.egroups,
            self.elapsed_s,
            self.ios,
            self.iops(),
            self.mb_per_s(),
            self.lat.mean_ns,
            self.lat.p50_ns,
            self.lat.p90_ns,
            self.lat.p99_ns,
            self.lat.p999_ns,
            self.lat.max_ns,
            self.prefill_s,
        )
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `cairn bench blockstore`.
pub fn blockstore_bench(args: BlockstoreArgs) -> Result<BlockstoreReport> {
    ensure!(
        args.runtime.is_finite() && args.runtime > 0.0,
        "--runtime must be a positive number of seconds"
    );
    ensure!(
        args.settle.is_finite() && args.settle >= 0.0,
        "--settle must be a number of seconds"
    );
    let slice_bytes = u32::try_from(args.slice_size).context("--slice-size is too large")?;
    let egroup_bytes = u32::try_from(args.egroup_size).context("--egroup-size is too large")?;
    ensure!(
        slice_bytes.is_power_of_two() && slice_bytes >= 4096,
        "--slice-size must be a power of two of at least 4KiB"
    );
    if let Ok(meta) = std::fs::metadata(&args.path)
        && !meta.is_file()
    {
        bail!(
            "{}: the benchmark formats its target, so it takes regular files only",
            args.path.display()
        );
    }
    uring::create_file(&args.path, args.size)
        .with_context(|| format!("creating {} with {}", args.path.display(), human(args.size)))?;
    let file_bytes = std::fs::metadata(&args.path)?.len();

    let placement = match args.cpu {
        Some(cpu) => Placement::Fixed(cpu),
        None => Placement::Unbound,
    };
    // Room for every task's request plus the journal and checkpoint writes beside them.
    let ring_depth = (2 * args.qd as usize + 32).max(128);
    let mut builder = LocalExecutorBuilder::new(placement);
    if args.spin_us > 0 {
        builder = builder.spin_before_park(Duration::from_micros(args.spin_us));
    }
    let handle = builder
        .name("cairn-bench")
        .io_memory(IO_MEMORY_BYTES)
        .ring_depth(ring_depth)
        .spawn(move || async move { bench_on_executor(args, slice_bytes, egroup_bytes).await })
        .map_err(|e| anyhow::anyhow!("starting the I/O executor: {e}"))?;
    let mut report = handle
        .join()
        .map_err(|e| anyhow::anyhow!("the I/O executor failed: {e}"))??;
    report.file_bytes = file_bytes;
    Ok(report)
}

async fn bench_on_executor(
    args: BlockstoreArgs,
    slice_bytes: u32,
    egroup_bytes: u32,
) -> Result<BlockstoreReport> {
    let path = args.path.clone();
    let dev = uring::open(&path, UringOptions::default())
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    let opts = FormatOptions {
        tier: None,
        egroup_bytes,
        slice_bytes,
        journal_bytes: 0,
        uuid: None,
    };
    let store = BlockStore::format(dev, &opts)
        .await
        .with_context(|| format!("formatting {}", path.display()))?;
    let layout = *store.layout();
    let egroups = layout.egroup_count;
    let slices_per_egroup = layout.slices_per_egroup();
    for egid in 0..u64::from(egroups) {
        store.allocate(egid)?;
    }
    store.flush().await?;
    let store = Rc::new(store);

    let prefill_started = Instant::now();
    if args.rw == Workload::Randread {
        prefill(&store, egroups, egroup_bytes, slice_bytes).await?;
        if args.settle > 0.0 {
            glommio::timer::sleep(Duration::from_secs_f64(args.settle)).await;
        }
    }
    let prefill_s = prefill_started.elapsed().as_secs_f64();

    let total_slices = u64::from(egroups) * u64::from(slices_per_egroup);
    let qd = u64::from(args.qd);
    ensure!(
        total_slices >= qd,
        "{} slices cannot keep {qd} tasks on distinct slices: give a larger --size",
        total_slices
    );
    // Task t owns the slices whose global index is t modulo qd, so no two writes to one slice
    // are ever in flight together (the store's contract) and the union is still uniform.
    let per_task_slices = total_slices / qd;
    let plan = Rc::new(Plan {
        workload: args.rw,
        layer: args.layer,
        data_offset: layout.data_offset,
        slice_bytes: u64::from(slice_bytes),
        slices_per_egroup: u64::from(slices_per_egroup),
        per_task_slices,
        qd,
        stop: Cell::new(false),
    });

    // Everything the timed loop touches is allocated here.
    let mut tasks = Vec::with_capacity(args.qd as usize);
    let mut ready = Vec::with_capacity(args.qd as usize);
    for t in 0..qd {
        let mut buf = DmaBuf::new(slice_bytes as usize);
        let mut rng = SplitMix64::new(args.seed ^ t.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        fill_random(&mut buf, &mut rng);
        ready.push((t, buf, rng, LatencyHistogram::new()));
    }

    let runtime = Duration::from_secs_f64(args.runtime);
    let started = Instant::now();
    let deadline = started + runtime;
    for (t, buf, rng, hist) in ready {
        let store = Rc::clone(&store);
        let plan = Rc::clone(&plan);
        tasks.push(glommio::spawn_local(async move {
            io_loop(&store, &plan, t, buf, rng, hist, deadline).await
        }));
    }
    let mut merged = LatencyHistogram::new();
    let mut ios = 0;
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok((n, hist)) => {
                ios += n;
                merged.merge(&hist);
            }
            Err(e) => {
                plan.stop.set(true);
                first_error.get_or_insert(e);
            }
        }
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    if let Some(e) = first_error {
        return Err(e);
    }
    assert_eq!(merged.count(), ios, "one latency recorded per I/O");
    let store = Rc::into_inner(store).expect("all tasks finished");
    store.close().await.context("closing the store")?;
    Ok(BlockstoreReport {
        path,
        workload: args.rw,
        layer: args.layer,
        qd: args.qd,
        slice_bytes,
        file_bytes: 0,
        data_bytes: u64::from(egroups) * u64::from(egroup_bytes),
        egroups,
        prefill_s,
        elapsed_s,
        ios,
        lat: merged.summary(),
    })
}

/// What every I/O task shares.
struct Plan {
    workload: Workload,
    layer: Layer,
    /// Device offset of slot 0: extent group `egid` sits in slot `egid` (allocated in order
    /// on a fresh format), so slice `g` of the whole data area is at `data_offset + g * slice`.
    data_offset: u64,
    slice_bytes: u64,
    slices_per_egroup: u64,
    per_task_slices: u64,
    qd: u64,
    /// Set when a task failed, so the others stop early.
    stop: Cell<bool>,
}

async fn io_loop(
    store: &BlockStore<uring::UringDevice>,
    plan: &Plan,
    task: u64,
    mut buf: DmaBuf,
    mut rng: SplitMix64,
    mut hist: LatencyHistogram,
    deadline: Instant,
) -> Result<(u64, LatencyHistogram)> {
    let mut ios = 0u64;
    loop {
        let global = (rng.next() % plan.per_task_slices) * plan.qd + task;
        let egid = global / plan.slices_per_egroup;
        let slice = (global % plan.slices_per_egroup) as u32;
        let offset = plan.data_offset + global * plan.slice_bytes;
        let t0 = Instant::now();
        match (plan.layer, plan.workload) {
            (Layer::Store, Workload::Randwrite) => store.write_slices(egid, slice, &buf).await,
            (Layer::Store, Workload::Randread) => store.read_slices(egid, slice, &mut buf).await,
            (Layer::Device, Workload::Randwrite) => {
                store.device().write(offset, &buf).await.map_err(Into::into)
            }
            (Layer::Device, Workload::Randread) => store
                .device()
                .read(offset, &mut buf)
                .await
                .map_err(Into::into),
        }
        .with_context(|| {
            format!(
                "{} of extent group {egid} slice {slice}",
                plan.workload.name()
            )
        })?;
        let t1 = Instant::now();
        hist.record(t1.duration_since(t0).as_nanos() as u64);
        ios += 1;
        if t1 >= deadline || plan.stop.get() {
            return Ok((ios, hist));
        }
    }
}

/// Writes every slice of every extent group with large sequential writes, then flushes, so a
/// random read always reaches the device (an unwritten slice reads as zeros without I/O).
async fn prefill(
    store: &Rc<BlockStore<uring::UringDevice>>,
    egroups: u32,
    egroup_bytes: u32,
    slice_bytes: u32,
) -> Result<()> {
    let chunk = PREFILL_CHUNK_BYTES.min(egroup_bytes as usize);
    let chunks_per_egroup = egroup_bytes as usize / chunk;
    let slices_per_chunk = (chunk / slice_bytes as usize) as u32;
    let total = u64::from(egroups) * chunks_per_egroup as u64;
    let next = Rc::new(Cell::new(0u64));
    let mut tasks = Vec::with_capacity(PREFILL_TASKS);
    for t in 0..PREFILL_TASKS as u64 {
        let store = Rc::clone(store);
        let next = Rc::clone(&next);
        tasks.push(glommio::spawn_local(async move {
            let mut buf = DmaBuf::new(chunk);
            let mut rng = SplitMix64::new(0x7072_6566_696c_6c00 ^ t);
            fill_random(&mut buf, &mut rng);
            loop {
                let i = next.get();
                if i >= total {
                    return Ok::<(), anyhow::Error>(());
                }
                next.set(i + 1);
                let egid = i / chunks_per_egroup as u64;
                let first = (i % chunks_per_egroup as u64) as u32 * slices_per_chunk;
                store
                    .write_slices(egid, first, &buf)
                    .await
                    .with_context(|| format!("prefilling extent group {egid}"))?;
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    store.flush().await.context("flushing the prefill")?;
    Ok(())
}

fn fill_random(buf: &mut DmaBuf, rng: &mut SplitMix64) {
    for word in buf.chunks_exact_mut(8) {
        word.copy_from_slice(&rng.next().to_le_bytes());
    }
}

/// SplitMix64: a tiny, allocation-free generator, good enough for picking offsets.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Sub-buckets per power of two: values are kept to within 1/128 (under 0.8 %), like an HDR
/// histogram with two significant decimal digits.
const SUB_BUCKET_BITS: u32 = 7;
const SUB_BUCKETS: usize = 1 << SUB_BUCKET_BITS;
/// Values below `SUB_BUCKETS` get one bucket each; each power of two above gets `SUB_BUCKETS`.
const HISTOGRAM_BUCKETS: usize = (64 - SUB_BUCKET_BITS as usize + 1) * SUB_BUCKETS;

/// A log-linear latency histogram (HDR-style): fixed size, no allocation after construction.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    counts: Box<[u64]>,
    total: u64,
    sum: u128,
    max: u64,
}

/// Percentiles of a [`LatencyHistogram`], in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencySummary {
    /// Mean (exact).
    pub mean_ns: f64,
    /// Median.
    pub p50_ns: u64,
    /// 90th percentile.
    pub p90_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Largest value (exact).
    pub max_ns: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self {
            counts: vec![0; HISTOGRAM_BUCKETS].into_boxed_slice(),
            total: 0,
            sum: 0,
            max: 0,
        }
    }

    fn bucket(v: u64) -> usize {
        if v < SUB_BUCKETS as u64 {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros(); // >= SUB_BUCKET_BITS
        let shift = exp - SUB_BUCKET_BITS;
        let mantissa = (v >> shift) as usize - SUB_BUCKETS; // 0..SUB_BUCKETS
        (shift as usize + 1) * SUB_BUCKETS + mantissa
    }

    /// The smallest and largest value that land in bucket `b`.
    fn bucket_range(b: usize) -> (u64, u64) {
        if b < SUB_BUCKETS {
            return (b as u64, b as u64);
        }
        let shift = (b / SUB_BUCKETS - 1) as u32;
        let mantissa = (b % SUB_BUCKETS + SUB_BUCKETS) as u64;
        let low = mantissa << shift;
        (low, low + ((1u64 << shift) - 1))
    }

    /// Records one value.
    pub fn record(&mut self, v: u64) {
        self.counts[Self::bucket(v)] += 1;
        self.total += 1;
        self.sum += u128::from(v);
        self.max = self.max.max(v);
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The value at quantile `q` (0..=1): the midpoint of the bucket holding it, never above
    /// the largest value recorded (which is what quantile 1 returns). 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        if rank >= self.total {
            return self.max;
        }
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (low, high) = Self::bucket_range(b);
                return (low + (high - low) / 2).min(self.max);
            }
        }
        self.max
    }

    /// Mean and the usual percentiles.
    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            mean_ns: if self.total == 0 {
                0.0
            } else {
                self.sum as f64 / self.total as f64
            },
            p50_ns: self.quantile(0.50),
            p90_ns: self.quantile(0.90),
            p99_ns: self.quantile(0.99),
            p999_ns: self.quantile(0.999),
            max_ns: self.max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_cover_every_value_in_order() {
        let mut last = 0;
        for v in (0..5000u64).chain([1 << 20, (1 << 20) + 1, u64::MAX / 3, u64::MAX]) {
            let b = LatencyHistogram::bucket(v);
            assert!(b < HISTOGRAM_BUCKETS, "{v} -> {b}");
            let (low, high) = LatencyHistogram::bucket_range(b);
            assert!(low <= v && v <= high, "{v} not in {low}..={high}");
            if v < 5000 {
                assert!(b >= last);
                last = b;
            }
            // Relative width under 1/SUB_BUCKETS.
            assert!((high - low) as f64 <= v as f64 / SUB_BUCKETS as f64 + 1.0);
        }
    }

    #[test]
    fn histogram_percentiles() {
        let mut h = LatencyHistogram::new();
        assert_eq!(h.quantile(0.5), 0);
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let s = h.summary();
        let near = |got: u64, want: f64| (got as f64 - want).abs() / want < 0.01;
        assert!(near(s.p50_ns, 5_000_000.0), "{s:?}");
        assert!(near(s.p99_ns, 9_900_000.0), "{s:?}");
        assert!(near(s.p999_ns, 9_990_000.0), "{s:?}");
        assert_eq!(s.max_ns, 10_000_000);
        assert!((s.mean_ns - 5_000_500.0).abs() < 1.0);

        let mut other = LatencyHistogram::new();
        other.record(50_000_000);
        h.merge(&other);
        assert_eq!(h.count(), 10_001);
        assert_eq!(h.quantile(1.0), 50_000_000);
    }

    fn args(path: PathBuf, rw: Workload, qd: u32) -> BlockstoreArgs {
        BlockstoreArgs {
            path,
            rw,
            qd,
            layer: Layer::Store,
            runtime: 0.2,
            size: 24 << 20,
            slice_size: 4096,
            egroup_size: 4 << 20,
            cpu: None,
            spin_us: 0,
            settle: 0.0,
            seed: 1,
            json: false,
        }
    }

    #[test]
    fn blockstore_bench_writes_then_reads_a_small_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.img");
        let w = blockstore_bench(args(path.clone(), Workload::Randwrite, 4)).expect("randwrite");
        assert!(w.ios > 0 && w.egroups > 0, "{w:?}");
        assert_eq!(w.file_bytes, 24 << 20);
        assert!(
            w.to_line()
                .contains(" rw=randwrite layer=store qd=4 bs=4096 ")
        );
        let r = blockstore_bench(args(path.clone(), Workload::Randread, 2)).expect("randread");
        assert!(r.ios > 0, "{r:?}");
        let json = r.to_json();
        assert!(json.starts_with("{\"bench\":\"blockstore\""), "{json}");
        assert!(
            json.contains("\"rw\":\"randread\",\"layer\":\"store\",\"qd\":2,"),
            "{json}"
        );
        assert!(r.lat.p50_ns > 0 && r.lat.p50_ns <= r.lat.p99_ns);
    }

    #[test]
    fn blockstore_bench_refuses_bad_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(dir.path().join("x.img"), Workload::Randwrite, 1);
        a.slice_size = 512;
        assert!(blockstore_bench(a).is_err());
        let a = args(dir.path().to_path_buf(), Workload::Randwrite, 1);
        let err = blockstore_bench(a).unwrap_err().to_string();
        assert!(err.contains("regular files only"), "{err}");
    }
}
