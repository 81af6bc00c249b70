//! Regenerates `src/infer/onnx/proto.rs` from `onnx.proto` (ONNX's own schema, copied here
//! from the `onnx` Python package or the onnx/onnx repository).
//!
//!     cargo run --manifest-path tools/onnx-proto/Cargo.toml
//!
//! The output is committed, so building kiln needs neither this tool nor protoc.

use std::path::Path;

fn main() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile([here.join("onnx.proto")], [here]).expect("onnx.proto compiles");
    let out = tempdir(here);
    prost_build::Config::new()
        .out_dir(&out)
        // The schema's comments hold indented text that rustdoc would run as doctests.
        .disable_comments(["."])
        .compile_fds(fds)
        .expect("prost-build generates the types");
    let generated = std::fs::read_to_string(out.join("onnx.rs")).expect("onnx.rs written");
    let header = "// Generated from tools/onnx-proto/onnx.proto by tools/onnx-proto (prost-build);\n\
                  // do not edit. Regenerate with\n\
                  // `cargo run --manifest-path tools/onnx-proto/Cargo.toml`.\n\n";
    let dest = here.join("../../src/infer/onnx/proto.rs");
    std::fs::write(&dest, format!("{header}{generated}")).expect("proto.rs written");
    std::fs::remove_dir_all(&out).ok();
    println!("wrote {}", dest.display());
}

fn tempdir(here: &Path) -> std::path::PathBuf {
    let d = here.join("target/generated");
    std::fs::create_dir_all(&d).expect("output folder");
    d
}
