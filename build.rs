//! Compiles `proto/` with protox (no system `protoc`) into Rust code, and
//! writes the encoded descriptor set that reflection and the gateway read.
//!
//! The descriptor set is written from `encode_file_descriptor_set()`, not by
//! re-encoding prost types: that keeps the `(google.api.http)` options, which
//! prost's `MethodOptions` does not model and would drop.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "brewmesh/payment/v1/payment.proto",
    "brewmesh/barista/v1/barista.proto",
    "brewmesh/registry/v1/registry.proto",
    // Not used by the services' code: in the set so that the gateway can
    // write error details (BadRequest, RetryInfo, …) as JSON.
    "google/rpc/status.proto",
    "google/rpc/error_details.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTOS)?;

    std::fs::write(
        out_dir.join("brewmesh_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
