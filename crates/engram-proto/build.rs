//! Compiles `proto/` with the pure-Rust `protox` (no system `protoc`), generates the tonic stubs,
//! and writes the file descriptor set that the services serve over gRPC reflection.

use std::path::PathBuf;

use prost::Message as _;

const PUBLIC: &str = "engram/v1/memory.proto";
const PROTOS: &[&str] = &[PUBLIC, "engram/internal/v1/internal.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto").canonicalize()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    // tonic-prost-build 0.14 no longer prints these when given a descriptor set.
    println!("cargo:rerun-if-changed=build.rs");
    for proto in PROTOS {
        println!(
            "cargo:rerun-if-changed={}",
            proto_root.join(proto).display()
        );
    }

    // Every file with the files it imports (the well-known types included), for reflection:
    // all of them for the internal services, the public API's alone for the gateway.
    let fds = protox::compile(PROTOS, [&proto_root])?;
    std::fs::write(out_dir.join("engram_descriptor.bin"), fds.encode_to_vec())?;
    let public = protox::compile([PUBLIC], [&proto_root])?;
    std::fs::write(
        out_dir.join("engram_public_descriptor.bin"),
        public.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .btree_map(".")
        .compile_fds(fds)?;
    Ok(())
}
