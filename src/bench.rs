//! `cairn bench`: in-process benchmarks of Cairn's layers, driven by perf/ scripts.

use anyhow::Result;
use clap::Subcommand;

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {}

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {}
}
