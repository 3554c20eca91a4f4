//! Generates the prost types, and with the `grpc` feature the tonic presence
//! and server API services, from `proto/` with a pinned, vendored `protoc` (the
//! `protoc-bin-vendored` crate), so a fresh machine needs no manual step.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        root.join("fanout/v1/envelope.proto"),
        root.join("fanout/v1/presence.proto"),
        root.join("fanout/v1/api.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    config.bytes(["."]);
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_server(grpc)
        .build_client(grpc)
        .compile_with_config(config, &files, &[root])?;
    Ok(())
}
