//! Generates the prost messages and tonic services from `proto/` (protoc from Debian's
//! protobuf-compiler, installed by scripts/setup.sh).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(&["proto/cairn/v1/node.proto"], &["proto"])?;
    Ok(())
}
