//! Generates the prost messages and tonic services from `proto/` (protoc from Debian's
//! protobuf-compiler, installed by scripts/setup.sh).

/// Every schema file of `cairn.v1`; they compile together into one Rust module.
const PROTOS: &[&str] = &[
    "proto/cairn/v1/node.proto",
    "proto/cairn/v1/config.proto",
    "proto/cairn/v1/metadata.proto",
    "proto/cairn/v1/raft.proto",
    "proto/cairn/v1/curator.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(PROTOS, &["proto"])?;
    Ok(())
}
