//! Compiles `proto/vesper/v1/*.proto` with protox (pure Rust, so no system `protoc` is needed) and generates the
//! tonic client and server code from the resulting descriptor set.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "vesper/v1/common.proto",
    "vesper/v1/leaf.proto",
    "vesper/v1/cluster.proto",
    "vesper/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // The encoded descriptor set is kept for gRPC reflection.
    std::fs::write(
        out_dir.join("vesper_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    // Every generated client and server uses our codec: prost with small per-call buffers (see src/codec.rs).
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
