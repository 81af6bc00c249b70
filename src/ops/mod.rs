//! Operations, one file per family: shape checks on the CPU, then one or more dispatches.

pub(crate) mod compose;
pub(crate) mod conv;
pub(crate) mod create;
pub(crate) mod dtype;
pub(crate) mod elementwise;
pub(crate) mod index;
pub(crate) mod matmul;
pub(crate) mod norm;
pub(crate) mod pool;
pub(crate) mod quant;
pub(crate) mod reduce;
pub(crate) mod tune;

use crate::shape::MAX_RANK;

/// Workgroups of `per_group` invocations covering `n` items, spread over x and y so that no
/// dimension exceeds 65535 (the WebGPU minimum for `max_compute_workgroups_per_dimension`).
pub(crate) fn grid(n: usize, per_group: usize) -> [u32; 3] {
    let groups = n.div_ceil(per_group);
    if groups == 0 {
        return [0, 1, 1];
    }
    let x = groups.min(65535);
    let y = groups.div_ceil(x);
    [x as u32, y as u32, 1]
}

/// Packs up to [`MAX_RANK`] values into the `array<vec4<u32>, 2>` layout of the shaders.
pub(crate) fn pack(values: impl IntoIterator<Item = usize>) -> [u32; MAX_RANK] {
    let mut out = [0u32; MAX_RANK];
    for (o, v) in out.iter_mut().zip(values) {
        *o = v as u32;
    }
    out
}

/// The optional tail of a producing kernel (matmul, conv2d): a bias along the output
/// channels and an activation, applied before the result is stored.
#[derive(Clone, Copy, Default)]
pub(crate) struct Epilogue<'a> {
    pub bias: Option<&'a crate::tensor::Tensor>,
    /// The bias runs along the output's rows, not its columns (matmul kernels only: a
    /// convolution run as weight @ im2col matrix, whose rows are its channels).
    pub bias_rows: bool,
    pub activation: Option<(elementwise::UnaryOp, f32)>,
    /// Element types of the kernel's buffers.
    pub variant: crate::kernels::Variant,
}

/// The bits of an epilogue word that ask for an activation (its flag and op code).
pub(crate) const EPILOGUE_ACTIVATION_BITS: u32 = 2 | 0xff00;

impl Epilogue<'_> {
    /// True with no bias and no activation.
    pub fn is_plain(&self) -> bool {
        self.bias.is_none() && self.activation.is_none()
    }

    /// The `epilogue` word of the kernel parameters (see `shaders/common.wgsl`).
    pub fn flags(&self) -> u32 {
        let mut f = 0;
        if self.bias.is_some() {
            f |= 1;
            if self.bias_rows {
                f |= 4;
            }
        }
        if let Some((op, _)) = self.activation {
            f |= 2 | ((op as u32) << 8);
        }
        f
    }

    pub fn alpha(&self) -> f32 {
        self.activation.map_or(0.0, |(_, a)| a)
    }

    pub fn off_bias(&self) -> u32 {
        self.bias.map_or(0, |b| b.layout.offset as u32)
    }
}
