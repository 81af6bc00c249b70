//! Every WGSL source (`shaders/common.wgsl` + one family file) parses and validates with naga:
//! no GPU needed. Every file in `shaders/` is registered.

use std::fs;
use std::path::Path;

use kiln::kernels::{Kernel, ShaderFile, Variant};

fn validate(name: &str, source: &str) -> naga::Module {
    let module = naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(source)));
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::default()
            | naga::valid::Capabilities::SHADER_FLOAT16
            | naga::valid::Capabilities::SUBGROUP
            | naga::valid::Capabilities::COOPERATIVE_MATRIX,
    )
    .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
    .subgroup_operations(naga::valid::SubgroupOperationSet::all())
    .validate(&module)
    .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(source)));
    module
}

#[test]
fn every_shader_parses_and_validates() {
    for file in ShaderFile::ALL {
        let module = validate(file.file_name(), file.source());
        assert!(
            !module.entry_points.is_empty(),
            "{} has no entry point",
            file.file_name()
        );
        for ep in &module.entry_points {
            assert!(
                ep.name.ends_with("_fwd") || ep.name.contains("_bwd") || ep.name.ends_with("_step"),
                "{}: entry point {} should be named <op>_<pass>",
                file.file_name(),
                ep.name
            );
            assert!(
                Kernel::ALL.iter().any(|k| k.entry() == ep.name),
                "{} is not in the kernel registry",
                ep.name
            );
        }
    }
}

#[test]
fn half_precision_variants_validate() {
    for file in ShaderFile::ALL {
        for v in Variant::ALL {
            match file.variant_source(v) {
                Some(src) => {
                    validate(&format!("{} {v:?}", file.file_name()), &src);
                }
                None => assert!(
                    (!file.has_variants() && v != Variant::F32)
                        || (v.is_integer_cast() && file != ShaderFile::Elementwise)
                ),
            }
        }
    }
}

/// The cooperative-matrix kernels, which no adapter here may run, at least translate to
/// SPIR-V (what the Vulkan backend hands the driver) in the f16 variants the tuner takes.
#[test]
fn cooperative_matrix_kernels_translate_to_spirv() {
    let file = ShaderFile::MatmulCoop;
    for v in [Variant::F16, Variant::F16ToF32] {
        let name = format!("{} {v:?}", file.file_name());
        let src = file.variant_source(v).expect("an f16 variant");
        let module = naga::front::wgsl::parse_str(&src)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&src)));
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::default()
                | naga::valid::Capabilities::SHADER_FLOAT16
                | naga::valid::Capabilities::COOPERATIVE_MATRIX,
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&src)));
        for entry in ["matmul_coop16_nn_fwd", "matmul_coop16_nt_fwd"] {
            let pipeline = naga::back::spv::PipelineOptions {
                shader_stage: naga::ShaderStage::Compute,
                entry_point: entry.to_string(),
            };
            let words = naga::back::spv::write_vec(
                &module,
                &info,
                &naga::back::spv::Options::default(),
                Some(&pipeline),
            )
            .unwrap_or_else(|e| panic!("{name} {entry}: {e}"));
            assert!(words.len() > 100, "{name} {entry}: {} words", words.len());
        }
    }
}

#[test]
fn every_shader_file_is_registered() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    for entry in fs::read_dir(&dir).expect("shaders/ exists") {
        let name = entry
            .expect("readable entry")
            .file_name()
            .to_string_lossy()
            .to_string();
        if name.ends_with(".wgsl") {
            // Each file is compiled as (part of) the source of some ShaderFile.
            let text = fs::read_to_string(dir.join(&name)).expect("readable shader");
            assert!(
                ShaderFile::ALL.iter().any(|f| f.source().contains(&text)),
                "{name} is in no ShaderFile's source"
            );
        }
    }
}
