//! `cairn`: the one binary of the Cairn block-storage fabric.
//!
//! `cairn node run` runs a node's data plane; `cairn device` and `cairn fsck` manage devices;
//! `cairn bench` measures layers in process. Cluster commands arrive with the control plane.

mod bench;
mod bench_meta;
mod cluster_cmd;
mod config;
mod device_cmd;
mod meta_store;
mod node;
mod size;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Cairn: a distributed block-storage fabric.
#[derive(Debug, Parser)]
#[command(name = "cairn", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage a raw device or file used by Cairn.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Check a formatted device: exit 0 clean, 1 repairable, 2 data lost, 8 cannot be opened.
    Fsck(device_cmd::FsckArgs),
    /// Run a node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Benchmarks (see perf/).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Create the cluster or show its status.
    Cluster(cluster_cmd::ClusterArgs),
    /// Manage containers.
    Container(cluster_cmd::ContainerArgs),
    /// Manage vdisks.
    Vdisk(cluster_cmd::VdiskArgs),
    /// Run a standalone control plane (multi-node clusters on one host: scripts/cluster.sh).
    #[command(subcommand)]
    Controlplane(cluster_cmd::ControlplaneCommand),
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Run the node in the foreground (first run: a single-node cluster with vdisk vd0).
    Run(node::RunArgs),
    /// Add a node to the cluster.
    Add(cluster_cmd::NodeAddArgs),
    /// Remove a node from the cluster.
    Remove(cluster_cmd::NodeRemoveArgs),
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Format a device or file (destroys its contents).
    Format(device_cmd::FormatArgs),
    /// Show capacity and usage of a formatted device.
    Info(device_cmd::InfoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // fsck follows e2fsck: 8 is an operational error (cannot check); other commands exit 1.
    let error_code = if matches!(cli.command, Command::Fsck(_)) {
        8
    } else {
        1
    };
    let result = match cli.command {
        Command::Device(DeviceCommand::Format(a)) => device_cmd::format(a).map(|()| 0),
        Command::Device(DeviceCommand::Info(a)) => device_cmd::info(a).map(|()| 0),
        Command::Fsck(a) => device_cmd::fsck(a),
        Command::Node(NodeCommand::Run(a)) => node::run(a).map(|()| 0),
        Command::Bench(b) => bench::run(b).map(|()| 0),
        Command::Node(NodeCommand::Add(a)) => cluster_cmd::node_add(a).map(|()| 0),
        Command::Node(NodeCommand::Remove(a)) => cluster_cmd::node_remove(a).map(|()| 0),
        Command::Cluster(a) => cluster_cmd::cluster(a).map(|()| 0),
        Command::Container(a) => cluster_cmd::container(a).map(|()| 0),
        Command::Vdisk(a) => cluster_cmd::vdisk(a).map(|()| 0),
        Command::Controlplane(c) => cluster_cmd::controlplane(c).map(|()| 0),
    };
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("cairn: error: {e:#}");
            ExitCode::from(error_code)
        }
    }
}
