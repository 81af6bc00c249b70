//! The registry of every WGSL entry point: one enum variant per entry point.
//!
//! The variant is the pipeline-cache key; [`Kernel::entry`] is the WGSL function name and
//! [`Kernel::file`] the file it lives in.

/// A shader file of `shaders/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShaderFile {
    /// `shaders/elementwise.wgsl`
    Elementwise,
    /// `shaders/reduce.wgsl`
    Reduce,
    /// `shaders/matmul.wgsl` followed by `shaders/matmul_vec4.wgsl`
    Matmul,
    /// `shaders/matmul.wgsl`, `shaders/matmul_vec4.wgsl` and `shaders/matmul_sg.wgsl`: the
    /// kernels that need the adapter's `SUBGROUP` feature, in a module of their own
    MatmulSubgroup,
    /// `shaders/conv.wgsl` followed by `shaders/conv_reg.wgsl`
    Conv,
    /// `shaders/conv.wgsl` followed by `shaders/conv_sg.wgsl` (needs `SUBGROUP`)
    ConvSubgroup,
    /// `shaders/pool.wgsl`
    Pool,
    /// `shaders/optim.wgsl`
    Optim,
    /// `shaders/quant.wgsl`
    Quant,
}

impl ShaderFile {
    /// Every shader file, for validation.
    pub const ALL: [ShaderFile; 9] = [
        ShaderFile::Elementwise,
        ShaderFile::Reduce,
        ShaderFile::Matmul,
        ShaderFile::MatmulSubgroup,
        ShaderFile::Conv,
        ShaderFile::ConvSubgroup,
        ShaderFile::Pool,
        ShaderFile::Optim,
        ShaderFile::Quant,
    ];

    /// The WGSL source: `shaders/common.wgsl` followed by the file.
    pub fn source(self) -> &'static str {
        match self {
            ShaderFile::Elementwise => concat!(
                include_str!("../shaders/common.wgsl"),
                include_str!("../shaders/elementwise.wgsl")
            ),
            ShaderFile::Reduce => concat!(
                include_str!("../shaders/common.wgsl"),
                include_str!("../shaders/reduce.wgsl")
            ),
            ShaderFile::Matmul => concat!(
                include_str!("../shaders/common.wgsl"),
                include_str!("../shaders/matmul.wgsl"),
                include_str!("../shaders/matmul_vec4.wgsl")
            ),
            ShaderFile::MatmulSubgroup => concat!(
                include_str!("../shaders/common.wgsl"),
                include_str!("../shaders/matmul.wgsl"),
                include_str!("../shaders/matmul_vec4.wgsl"),
                include_str!("../shaders/matmul_sg.wgsl")
            ),
            ShaderFile::Conv => concat!(
                include_str!("../shaders/common.wgsl"),
                include_str!("../shaders/conv.wgsl"),
                include_str!("../shaders/conv_reg.wgsl")
            ),
            ShaderFile::ConvSubgroup => concat!(
                include_str!("../shaders/common.wgsl"),
                include_str!("../shaders/conv.wgsl"),
                include_str!("../shaders/conv_sg.wgsl")
            ),
            ShaderFile::Pool => concat!(
                include_str!("../shaders/common.wgsl"),
                include_str!("../shaders/pool.wgsl")
            ),
            ShaderFile::Optim => concat!(
                include_str!("../shaders/common.wgsl"),
                include_str!("../shaders/optim.wgsl")
            ),
            ShaderFile::Quant => concat!(
                include_str!("../shaders/common.wgsl"),
                include_str!("../shaders/quant.wgsl")
            ),
        }
    }

    /// The file name under `shaders/`.
    pub fn file_name(self) -> &'static str {
        match self {
            ShaderFile::Elementwise => "elementwise.wgsl",
            ShaderFile::Reduce => "reduce.wgsl",
            ShaderFile::Matmul => "matmul.wgsl",
            ShaderFile::MatmulSubgroup => "matmul_sg.wgsl",
            ShaderFile::Conv => "conv.wgsl",
            ShaderFile::ConvSubgroup => "conv_sg.wgsl",
            ShaderFile::Pool => "pool.wgsl",
            ShaderFile::Optim => "optim.wgsl",
            ShaderFile::Quant => "quant.wgsl",
        }
    }
}

/// The element types a kernel reads and writes. Files whose buffers are declared through the
/// `IN`/`OUT` aliases (elementwise, matmul, conv, pool) compile in every variant; arithmetic
/// stays in f32. The f16 variants need the adapter's `SHADER_F16` feature.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Variant {
    /// f32 in, f32 out.
    #[default]
    F32,
    /// f16 in, f16 out.
    F16,
    /// f16 in, f32 out (reading half-precision results back).
    F16ToF32,
    /// f32 in, f16 out (converting inputs).
    F32ToF16,
    /// i32 in, f32 out (casting integer tensors; elementwise kernels only).
    I32ToF32,
    /// f32 in, i32 out (casting to integers, truncating toward zero; elementwise kernels only).
    F32ToI32,
}

impl Variant {
    /// Every variant.
    pub const ALL: [Variant; 6] = [
        Variant::F32,
        Variant::F16,
        Variant::F16ToF32,
        Variant::F32ToF16,
        Variant::I32ToF32,
        Variant::F32ToI32,
    ];

    /// True for the variants with f16 buffers (which need `SHADER_F16`).
    pub fn needs_f16(self) -> bool {
        matches!(self, Variant::F16 | Variant::F16ToF32 | Variant::F32ToF16)
    }

    /// True for the integer casts, which only the elementwise kernels have.
    pub fn is_integer_cast(self) -> bool {
        matches!(self, Variant::I32ToF32 | Variant::F32ToI32)
    }

    fn types(self) -> (&'static str, &'static str) {
        match self {
            Variant::F32 => ("f32", "f32"),
            Variant::F16 => ("f16", "f16"),
            Variant::F16ToF32 => ("f16", "f32"),
            Variant::F32ToF16 => ("f32", "f16"),
            Variant::I32ToF32 => ("i32", "f32"),
            Variant::F32ToI32 => ("f32", "i32"),
        }
    }
}

impl ShaderFile {
    /// True when the file declares its buffers through the `IN`/`OUT` aliases.
    pub fn has_variants(self) -> bool {
        matches!(
            self,
            ShaderFile::Elementwise
                | ShaderFile::Matmul
                | ShaderFile::MatmulSubgroup
                | ShaderFile::Conv
                | ShaderFile::ConvSubgroup
                | ShaderFile::Pool
        )
    }

    /// True when the file uses subgroup operations (the adapter's `SUBGROUP` feature).
    pub fn needs_subgroups(self) -> bool {
        matches!(self, ShaderFile::MatmulSubgroup | ShaderFile::ConvSubgroup)
    }

    /// The WGSL source of `variant` (`None` when the file has no such variant).
    pub fn variant_source(self, variant: Variant) -> Option<String> {
        if variant == Variant::F32 {
            return Some(self.source().to_string());
        }
        if !self.has_variants() || (variant.is_integer_cast() && self != ShaderFile::Elementwise) {
            return None;
        }
        let (input, output) = variant.types();
        let src = self
            .source()
            .replace("alias IN = f32;", &format!("alias IN = {input};"))
            .replace("alias OUT = f32;", &format!("alias OUT = {output};"));
        Some(if variant.needs_f16() {
            format!("enable f16;\n{src}")
        } else {
            src
        })
    }
}

macro_rules! kernels {
    ($($variant:ident => ($file:ident, $entry:literal, $inputs:literal)),* $(,)?) => {
        /// One WGSL entry point.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Kernel {
            $(
                #[doc = concat!("`", $entry, "` in `shaders/", stringify!($file), "`")]
                $variant,
            )*
        }

        impl Kernel {
            /// Every kernel.
            pub const ALL: &'static [Kernel] = &[$(Kernel::$variant),*];

            /// The WGSL entry point name.
            pub fn entry(self) -> &'static str {
                match self { $(Kernel::$variant => $entry,)* }
            }

            /// The file holding it.
            pub fn file(self) -> ShaderFile {
                match self { $(Kernel::$variant => ShaderFile::$file,)* }
            }

            /// How many input buffers it binds (at bindings `0..inputs`); the output is
            /// binding 3 and the parameters binding 4.
            pub fn inputs(self) -> usize {
                match self { $(Kernel::$variant => $inputs,)* }
            }
        }
    };
}

kernels! {
    UnaryFwd => (Elementwise, "unary_fwd", 1),
    BinaryFwd => (Elementwise, "binary_fwd", 2),
    UnaryVec4Fwd => (Elementwise, "unary_vec4_fwd", 1),
    BinaryVec4Fwd => (Elementwise, "binary_vec4_fwd", 2),
    BinaryScalarVec4Fwd => (Elementwise, "binary_scalar_vec4_fwd", 1),
    UnaryVec4Bwd => (Elementwise, "unary_vec4_bwd", 2),
    UnaryInplaceVec4Fwd => (Elementwise, "unary_inplace_vec4_fwd", 0),
    BinaryScalarFwd => (Elementwise, "binary_scalar_fwd", 1),
    WhereFwd => (Elementwise, "where_fwd", 3),
    FillFwd => (Elementwise, "fill_fwd", 0),
    ArangeFwd => (Elementwise, "arange_fwd", 0),
    RandFwd => (Elementwise, "rand_fwd", 0),
    RandnFwd => (Elementwise, "randn_fwd", 0),
    GatherFwd => (Elementwise, "gather_fwd", 2),
    UnaryBwd => (Elementwise, "unary_bwd", 2),
    GatherBwd => (Elementwise, "gather_bwd", 2),
    ReduceFwd => (Reduce, "reduce_fwd", 1),
    ReduceSerialFwd => (Reduce, "reduce_serial_fwd", 1),
    SoftmaxFwd => (Reduce, "softmax_fwd", 1),
    LogSoftmaxFwd => (Reduce, "log_softmax_fwd", 1),
    MatmulFwd => (Matmul, "matmul_fwd", 3),
    MatmulTiledFwd => (Matmul, "matmul_tiled_fwd", 3),
    MatmulTiled128Fwd => (Matmul, "matmul_tiled128_fwd", 3),
    MatmulReg8Fwd => (Matmul, "matmul_reg8_fwd", 3),
    MatmulVec4NnFwd => (Matmul, "matmul_vec4_nn_fwd", 3),
    MatmulVec4NtFwd => (Matmul, "matmul_vec4_nt_fwd", 3),
    MatmulVec4TnFwd => (Matmul, "matmul_vec4_tn_fwd", 3),
    MatmulT128v4NnFwd => (Matmul, "matmul_t128v4_nn_fwd", 3),
    MatmulT128v4NtFwd => (Matmul, "matmul_t128v4_nt_fwd", 3),
    MatmulT128v4TnFwd => (Matmul, "matmul_t128v4_tn_fwd", 3),
    MatmulSg8NnFwd => (MatmulSubgroup, "matmul_sg8_nn_fwd", 3),
    MatmulSg8NtFwd => (MatmulSubgroup, "matmul_sg8_nt_fwd", 3),
    MatmulSg8TnFwd => (MatmulSubgroup, "matmul_sg8_tn_fwd", 3),
    MatmulSg32NnFwd => (MatmulSubgroup, "matmul_sg32_nn_fwd", 3),
    MatmulSg32NtFwd => (MatmulSubgroup, "matmul_sg32_nt_fwd", 3),
    MatmulSg32TnFwd => (MatmulSubgroup, "matmul_sg32_tn_fwd", 3),
    DropoutMaskFwd => (Elementwise, "dropout_mask_fwd", 0),
    Conv2dFwd => (Conv, "conv2d_fwd", 3),
    Conv2dTiledFwd => (Conv, "conv2d_tiled_fwd", 3),
    Conv2dBwdInput => (Conv, "conv2d_bwd_input", 2),
    Conv2dSgFwd => (ConvSubgroup, "conv2d_sg_fwd", 3),
    Conv2dSgBwdInput => (ConvSubgroup, "conv2d_sg_bwd_input", 2),
    Conv2dSgBwdWeight => (ConvSubgroup, "conv2d_sg_bwd_weight", 2),
    Conv2dBwdInputTiled => (Conv, "conv2d_bwd_input_tiled", 2),
    Conv2dBwdWeight => (Conv, "conv2d_bwd_weight", 2),
    Conv2dBwdWeightTiled => (Conv, "conv2d_bwd_weight_tiled", 2),
    Pool2dFwd => (Pool, "pool2d_fwd", 1),
    MaxPool2dBwd => (Pool, "max_pool2d_bwd", 2),
    AvgPool2dBwd => (Pool, "avg_pool2d_bwd", 1),
    SgdStep => (Optim, "sgd_step", 1),
    SgdMomentumStep => (Optim, "sgd_momentum_step", 1),
    AdamStep => (Optim, "adam_step", 1),
    SgdVec4Step => (Optim, "sgd_vec4_step", 1),
    SgdMomentumVec4Step => (Optim, "sgd_momentum_vec4_step", 1),
    AdamVec4Step => (Optim, "adam_vec4_step", 1),
    QuantizeFwd => (Quant, "quantize_fwd", 1),
    DequantizeFwd => (Quant, "dequantize_fwd", 1),
    QgemmFwd => (Quant, "qgemm_fwd", 3),
    QgemmActFwd => (Quant, "qgemm_act_fwd", 3),
    QgemmManualFwd => (Quant, "qgemm_manual_fwd", 3),
    QuantizeIm2colFwd => (Quant, "quantize_im2col_fwd", 2),
    QuantizeDynFwd => (Quant, "quantize_dyn_fwd", 2),
}

impl Kernel {
    /// Elements each invocation of an elementwise kernel handles (see `PER_INVOCATION` in
    /// `shaders/elementwise.wgsl`).
    pub fn per_invocation(self) -> usize {
        match self {
            Kernel::UnaryFwd | Kernel::BinaryFwd => 4,
            Kernel::UnaryVec4Fwd
            | Kernel::BinaryVec4Fwd
            | Kernel::BinaryScalarVec4Fwd
            | Kernel::UnaryVec4Bwd
            | Kernel::UnaryInplaceVec4Fwd => 16,
            _ => 1,
        }
    }
}

/// Binding indices of a kernel's read-write buffers: the output first, then (for in-place
/// kernels such as the optimizers) the state buffers.
pub const OUTPUT_BINDINGS: [u32; 4] = [3, 5, 6, 7];
/// Binding index of a kernel's uniform parameters.
pub const PARAMS_BINDING: u32 = 4;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::elementwise::ElementwiseParams;
    use crate::ops::matmul::MatmulParams;
    use crate::ops::reduce::ReduceParams;

    fn parse(file: ShaderFile) -> naga::Module {
        naga::front::wgsl::parse_str(file.source())
            .unwrap_or_else(|e| panic!("{}: {}", file.file_name(), e.emit_to_string(file.source())))
    }

    /// The Rust `#[repr(C)]` parameter structs must match the WGSL `Params` structs byte for byte.
    #[test]
    fn params_structs_match_wgsl_layout() {
        let expected = [
            (
                ShaderFile::Elementwise,
                std::mem::size_of::<ElementwiseParams>(),
            ),
            (ShaderFile::Reduce, std::mem::size_of::<ReduceParams>()),
            (ShaderFile::Matmul, std::mem::size_of::<MatmulParams>()),
            (
                ShaderFile::MatmulSubgroup,
                std::mem::size_of::<MatmulParams>(),
            ),
            (
                ShaderFile::Conv,
                std::mem::size_of::<crate::ops::conv::ConvParams>(),
            ),
            (
                ShaderFile::ConvSubgroup,
                std::mem::size_of::<crate::ops::conv::ConvParams>(),
            ),
            (
                ShaderFile::Pool,
                std::mem::size_of::<crate::ops::pool::PoolParams>(),
            ),
            (
                ShaderFile::Optim,
                std::mem::size_of::<crate::optim::OptimParams>(),
            ),
            (
                ShaderFile::Quant,
                std::mem::size_of::<crate::ops::quant::QuantParams>(),
            ),
        ];
        for (file, rust_size) in expected {
            let module = parse(file);
            let mut layouter = naga::proc::Layouter::default();
            layouter.update(module.to_ctx()).unwrap();
            let (handle, _) = module
                .types
                .iter()
                .find(|(_, t)| t.name.as_deref() == Some("Params"))
                .unwrap_or_else(|| panic!("{} has no Params struct", file.file_name()));
            assert_eq!(
                layouter[handle].size as usize,
                rust_size,
                "{}",
                file.file_name()
            );
            assert!(rust_size <= 256, "params must fit the per-dispatch stride");
        }
    }

    /// Every registered kernel names an entry point that exists, with the bindings it declares.
    #[test]
    fn every_kernel_has_its_entry_point() {
        for &k in Kernel::ALL {
            let module = parse(k.file());
            assert!(
                module.entry_points.iter().any(|e| e.name == k.entry()),
                "{} is missing from {}",
                k.entry(),
                k.file().file_name()
            );
        }
    }
}
