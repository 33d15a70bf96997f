//! `cairn bench metadata`: commit throughput and latency of the Raft-replicated metadata store,
//! measured the way the data plane uses it — batches of block-map updates, each batch under one
//! vdisk's key prefix (so it commits in one shard), several batches in flight at once.
//!
//! Every worker owns its own vdisk ids (no compare-and-swap contention between workers) and
//! loops: build a batch of `--batch` extent-map entries (10-byte values, the data plane's
//! encoding size), apply it through the gRPC metadata service, record the latency from the call
//! to its return. Batches use `Expect::Any` by default, or `Expect::Version` of the previous
//! write of the same key with `--cas` (every key read back once first), which is what a
//! data-plane remapping does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use controlplane::client::{Endpoints, MetadataClient};
use controlplane::{Expect, KvOp};

use crate::bench::LatencyHistogram;

/// Arguments of `cairn bench metadata`.
#[derive(Debug, Args)]
pub struct MetadataArgs {
    /// Control-plane endpoints, comma-separated (any node; calls are forwarded to leaders).
    #[arg(long, default_value = controlplane::server::DEFAULT_LISTEN)]
    pub endpoint: String,
    /// Keys (block-map entries) per batch.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch: u32,
    /// Batches in flight at once (one per worker task).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: u32,
    /// Seconds of the timed run.
    #[arg(long, default_value_t = 10.0)]
    pub runtime: f64,
    /// Vdisks per worker (batches rotate over them, so they spread over the shards).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub vdisks: u32,
    /// Compare-and-swap on the version each key was last written at, instead of blind puts.
    #[arg(long)]
    pub cas: bool,
    /// First vdisk id used (keys of earlier runs are overwritten, not accumulated).
    #[arg(long, default_value_t = 1 << 20)]
    pub base_vdisk: u64,
    /// Print one JSON object instead of the key=value line.
    #[arg(long)]
    pub json: bool,
}

/// The result of a run.
#[derive(Debug)]
struct Report {
    batches: u64,
    keys: u64,
    errors: u64,
    seconds: f64,
    lat: crate::bench::LatencySummary,
}

fn key(vdisk: u64, extent: u64) -> Vec<u8> {
    let mut k = format!("v/{vdisk:016x}/x/").into_bytes();
    k.extend_from_slice(&extent.to_be_bytes());
    k
}

fn value(egid: u64, slot: u8) -> Vec<u8> {
    let mut v = vec![1];
    v.extend_from_slice(&egid.to_le_bytes());
    v.push(slot);
    v
}

/// Runs `cairn bench metadata`.
pub fn run(args: MetadataArgs) -> Result<()> {
    if !(args.runtime > 0.0 && args.runtime.is_finite()) {
        bail!(
            "--runtime {} must be a positive number of seconds",
            args.runtime
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the client runtime")?;
    let report = rt.block_on(bench(&args))?;
    let s = &report.lat;
    let ms = |ns: u64| ns as f64 / 1e6;
    if args.json {
        println!(
            "{{\"batch\":{},\"concurrency\":{},\"cas\":{},\"seconds\":{:.3},\"batches\":{},\
             \"keys\":{},\"errors\":{},\"batches_per_s\":{:.1},\"keys_per_s\":{:.1},\
             \"lat_ms\":{{\"mean\":{:.3},\"p50\":{:.3},\"p90\":{:.3},\"p99\":{:.3},\"max\":{:.3}}}}}",
            args.batch,
            args.concurrency,
            args.cas,
            report.seconds,
            report.batches,
            report.keys,
            report.errors,
            report.batches as f64 / report.seconds,
            report.keys as f64 / report.seconds,
            s.mean_ns / 1e6,
            ms(s.p50_ns),
            ms(s.p90_ns),
            ms(s.p99_ns),
            ms(s.max_ns),
        );
    } else {
        println!(
            "batch={} concurrency={} cas={} seconds={:.2} batches={} keys={} errors={} \
             batches_per_s={:.1} keys_per_s={:.1} lat_ms_p50={:.3} lat_ms_p90={:.3} \
             lat_ms_p99={:.3} lat_ms_max={:.3}",
            args.batch,
            args.concurrency,
            args.cas,
            report.seconds,
            report.batches,
            report.keys,
            report.errors,
            report.batches as f64 / report.seconds,
            report.keys as f64 / report.seconds,
            ms(s.p50_ns),
            ms(s.p90_ns),
            ms(s.p99_ns),
            ms(s.max_ns),
        );
    }
    if report.errors > 0 {
        bail!("{} batches failed", report.errors);
    }
    Ok(())
}

async fn bench(args: &MetadataArgs) -> Result<Report> {
    let endpoints = Endpoints::new(args.endpoint.split(','))?.retry_for(Duration::from_secs(10));
    let client = MetadataClient::new(endpoints);
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    // Workers first read their keys' versions (for --cas) and wait at a barrier, so the clock
    // covers only the timed loop.
    let barrier = Arc::new(tokio::sync::Barrier::new(args.concurrency as usize + 1));
    for w in 0..u64::from(args.concurrency) {
        let client = client.clone();
        let stop = stop.clone();
        let barrier = barrier.clone();
        let (batch, vdisks, cas) = (u64::from(args.batch), u64::from(args.vdisks), args.cas);
        let first = args.base_vdisk + w * vdisks;
        workers.spawn(async move {
            let mut versions: Vec<Vec<Option<u64>>> =
                vec![vec![None; batch as usize]; vdisks as usize];
            let mut read_back = Ok(());
            if cas {
                for (i, row) in versions.iter_mut().enumerate() {
                    let prefix = format!("v/{:016x}/x/", first + i as u64).into_bytes();
                    match client.scan(&prefix).await {
                        Ok(entries) => {
                            for (k, v) in entries {
                                let e = k[prefix.len()..]
                                    .try_into()
                                    .map(u64::from_be_bytes)
                                    .unwrap_or(u64::MAX);
                                if let Some(slot) = row.get_mut(e as usize) {
                                    *slot = Some(v.version);
                                }
                            }
                        }
                        Err(e) => read_back = Err(e),
                    }
                }
            }
            barrier.wait().await;
            read_back?;
            let mut hist = LatencyHistogram::new();
            let (mut done, mut errors, mut round) = (0u64, 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let i = (round % vdisks) as usize;
                let vdisk = first + i as u64;
                let ops: Vec<KvOp> = (0..batch)
                    .map(|e| KvOp::Put {
                        key: key(vdisk, e),
                        value: value(vdisk << 24 | round, (e % 4) as u8),
                        expect: match (cas, versions[i][e as usize]) {
                            (false, _) => Expect::Any,
                            (true, None) => Expect::Absent,
                            (true, Some(v)) => Expect::Version(v),
                        },
                    })
                    .collect();
                let t0 = Instant::now();
                match client.apply(ops).await {
                    Ok(version) => {
                        hist.record(t0.elapsed().as_nanos() as u64);
                        done += 1;
                        for v in versions[i].iter_mut() {
                            *v = Some(version);
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        eprintln!("worker {w}: batch on vdisk {vdisk}: {e}");
                        if errors > 10 {
                            break;
                        }
                    }
                }
                round += 1;
            }
            anyhow::Ok((hist, done, errors))
        });
    }
    barrier.wait().await;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.runtime)).await;
    stop.store(true, Ordering::Relaxed);
    let mut hist = LatencyHistogram::new();
    let (mut batches, mut errors) = (0, 0);
    while let Some(r) = workers.join_next().await {
        let (h, d, e) = r.context("a worker panicked")??;
        hist.merge(&h);
        batches += d;
        errors += e;
    }
    let seconds = t0.elapsed().as_secs_f64();
    Ok(Report {
        batches,
        keys: batches * u64::from(args.batch),
        errors,
        seconds,
        lat: hist.summary(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use controlplane::GroupOptions;
    use controlplane::server::{ControlPlane, ControlPlaneOptions};

    #[test]
    fn bench_commits_batches_on_a_single_node_control_plane() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = ControlPlaneOptions::new(1, dir.path());
        options.listen = "127.0.0.1:0".parse().unwrap();
        options.metadata_shards = 2;
        options.group_options = GroupOptions::for_tests;
        let cp = ControlPlane::start(options).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        for cas in [false, true] {
            let args = MetadataArgs {
                endpoint: cp.local_addr().to_string(),
                batch: 4,
                concurrency: 2,
                runtime: 0.5,
                vdisks: 2,
                cas,
                base_vdisk: 1 << 20,
                json: false,
            };
            let r = rt.block_on(bench(&args)).unwrap();
            assert_eq!(r.errors, 0);
            assert!(r.batches > 0 && r.keys == r.batches * 4, "{r:?}");
            assert!(r.lat.p50_ns > 0 && r.lat.p50_ns <= r.lat.max_ns);
        }
        // What the batches wrote is there, at the version CAS expects.
        let written = rt.block_on(async {
            let eps = Endpoints::new([cp.local_addr().to_string()]).unwrap();
            MetadataClient::new(eps)
                .scan(format!("v/{:016x}/x/", 1u64 << 20).as_bytes())
                .await
                .unwrap()
        });
        assert_eq!(written.len(), 4);
        cp.shutdown();
    }
}
