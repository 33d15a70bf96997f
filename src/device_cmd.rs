//! `cairn device format|info` and `cairn fsck`: the operator's tools for one device.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use blockstore::format::{SUPERBLOCK_BYTES, Superblock};
use blockstore::uring::{self, UringOptions};
use blockstore::{BlockDevice, BlockStore, DmaBuf, FormatOptions, Tier, fsck};
use clap::Args;

use crate::size::{human, parse_size};

/// Arguments of `cairn device format`.
#[derive(Debug, Args)]
pub struct FormatArgs {
    /// Raw block device or file (a file is created when --size is given).
    pub path: PathBuf,
    /// Storage tier: nvme, ssd, hdd.
    #[arg(long, default_value = "ssd")]
    pub tier: Tier,
    /// Create or extend a regular file to this size (e.g. 8GiB).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Extent group size.
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    pub egroup_size: u64,
    /// Slice size (the checksum unit).
    #[arg(long, default_value = "32KiB", value_parser = parse_size)]
    pub slice_size: u64,
    /// Journal size (default: 1/256 of the device, 1 MiB to 256 MiB).
    #[arg(long, value_parser = parse_size)]
    pub journal_size: Option<u64>,
    /// Logical block size for a regular file (512 or 4096; a block device reports its own).
    #[arg(long, value_parser = parse_size)]
    pub block_size: Option<u64>,
    /// Format even if the device already holds a Cairn format.
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `cairn fsck`.
#[derive(Debug, Args)]
pub struct FsckArgs {
    /// Formatted device or file.
    pub path: PathBuf,
    /// Repair what can be repaired locally (superblock copies, checkpoints, salvage of a damaged
    /// journal), then check again.
    #[arg(long)]
    pub repair: bool,
    /// Skip reading and verifying every written slice (metadata only).
    #[arg(long)]
    pub no_verify_slices: bool,
}

/// Arguments of `cairn device info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Formatted device or file.
    pub path: PathBuf,
}

fn u32_arg(name: &str, v: u64) -> Result<u32> {
    u32::try_from(v).with_context(|| format!("--{name} {v} is too large"))
}

/// Runs `f` on a fresh single-threaded glommio executor (the CLI is one core's worth of work).
pub fn on_executor<T: Send + 'static>(
    f: impl AsyncFnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    glommio::LocalExecutorBuilder::default()
        .name("cairn-cli")
        .spawn(move || async move { f().await })
        .map_err(|e| anyhow::anyhow!("starting the I/O executor: {e}"))?
        .join()
        .map_err(|e| anyhow::anyhow!("the I/O executor failed: {e}"))?
}

fn open_opts(block_size: Option<u64>, tier: Option<Tier>) -> Result<UringOptions> {
    Ok(UringOptions {
        block_size: block_size.map(|b| u32_arg("block-size", b)).transpose()?,
        tier,
    })
}

/// `cairn device format`.
pub fn format(args: FormatArgs) -> Result<()> {
    let path = args.path.clone();
    match args.size {
        Some(size) => {
            let meta = std::fs::metadata(&path);
            if let Ok(m) = &meta
                && !m.is_file()
            {
                bail!(
                    "{}: --size applies to regular files only; a block device has its own size",
                    path.display()
                );
            }
            uring::create_file(&path, size)
                .with_context(|| format!("creating {} with {}", path.display(), human(size)))?;
        }
        None if !path.exists() => bail!(
            "{} does not exist: give --size to create a file, or name a block device",
            path.display()
        ),
        None => {}
    }
    let opts = FormatOptions {
        tier: Some(args.tier),
        egroup_bytes: u32_arg("egroup-size", args.egroup_size)?,
        slice_bytes: u32_arg("slice-size", args.slice_size)?,
        journal_bytes: args.journal_size.unwrap_or(0),
        uuid: None,
    };
    let uopts = open_opts(args.block_size, Some(args.tier))?;
    let force = args.force;
    on_executor(async move || {
        let dev = uring::open(&path, uopts)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        if !force {
            let report = fsck::check(&dev, false).await;
            if let Some(sb) = report.superblock {
                bail!(
                    "{} already holds a Cairn format (uuid {:032x}, {} extent groups in use): pass --force to destroy it",
                    path.display(),
                    sb.uuid,
                    report.egroups
                );
            }
        }
        let store = BlockStore::format(dev, &opts).await?;
        let sb = store.superblock();
        let stats = store.stats();
        let l = sb.layout;
        println!(
            "formatted {}: uuid {:032x}, tier {}, {} ({}-byte blocks)",
            path.display(),
            sb.uuid,
            sb.tier,
            human(l.device_bytes),
            l.block_size
        );
        println!(
            "  {} extent groups of {} ({} slices), data {}, journal {}, checkpoints 2 x {}",
            l.egroup_count,
            human(u64::from(l.egroup_bytes)),
            human(u64::from(l.slice_bytes)),
            human(stats.capacity_bytes),
            human(l.journal_bytes),
            human(l.checkpoint_bytes)
        );
        store.close().await?;
        Ok(())
    })
}

/// `cairn device info`.
pub fn info(args: InfoArgs) -> Result<()> {
    let path = args.path;
    on_executor(async move || {
        let dev = open_formatted(&path).await?;
        let store = BlockStore::open(dev).await?;
        let s = store.stats();
        println!("{}: tier {}", path.display(), s.tier);
        println!(
            "  extent groups: {} used of {} ({} free pending flush), {} each",
            s.egroups_used,
            s.egroups_total,
            s.egroups_pending_free,
            human(u64::from(s.egroup_bytes))
        );
        println!(
            "  capacity {}, allocated {}, written {}",
            human(s.capacity_bytes),
            human(s.allocated_bytes),
            human(s.written_bytes)
        );
        store.close().await?;
        Ok(())
    })
}

/// `cairn fsck`: returns the process exit code.
pub fn fsck(args: FsckArgs) -> Result<i32> {
    let path = args.path;
    let verify = !args.no_verify_slices;
    let repair = args.repair;
    on_executor(async move || {
        let dev = open_formatted(&path).await?;
        let report = fsck::check(&dev, verify).await;
        println!("{report}");
        if !repair || report.exit_code() == 0 {
            return Ok(report.exit_code());
        }
        if report.exit_code() >= 8 {
            println!("repair: refused (the device cannot be opened)");
            return Ok(report.exit_code());
        }
        println!("repair: opening in salvage mode, rewriting superblocks and checkpoints");
        let dev = fsck::repair(dev).await?;
        let after = fsck::check(&dev, verify).await;
        println!("after repair:\n{after}");
        Ok(after.exit_code())
    })
}

/// Opens a formatted file or device with the block size its superblock records (a regular file
/// has no block size of its own: 4096 unless it was formatted with 512).
pub async fn open_formatted(path: &Path) -> Result<uring::UringDevice> {
    let dev = uring::open(path, UringOptions::default())
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    let mut buf = DmaBuf::new(SUPERBLOCK_BYTES as usize);
    dev.read(0, &mut buf)
        .await
        .with_context(|| format!("reading the superblock of {}", path.display()))?;
    if let Ok((sb, _)) = Superblock::decode(&buf)
        && sb.layout.block_size != dev.info().block_size
        && !dev.is_block_device()
    {
        drop(dev);
        return uring::open(
            path,
            UringOptions {
                block_size: Some(sb.layout.block_size),
                tier: None,
            },
        )
        .await
        .with_context(|| format!("opening {}", path.display()));
    }
    Ok(dev)
}
